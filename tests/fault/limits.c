/*
 * Resource-limit checks (docs/testing.md, `make sweep`): spawns and add_child_handler with
 * every watcher while file descriptors (RLIMIT_NOFILE, several values) or threads and
 * processes (RLIMIT_NPROC, as the unprivileged user `nobody`) run out. Each call must succeed
 * or give the documented error (-EMFILE/-ENFILE, -EAGAIN), never crash, leave no zombie, no fd
 * and (under ASan) no leak behind, and everything must work again once the limit is lifted.
 *
 * Each case runs in a child process of its own (limits and the user id are per process), made
 * while this program has no thread. Closing line: "limits: N passed, N failed, N skipped".
 */
#include "casyncio.h"

#include <dirent.h>
#include <errno.h>
#include <pwd.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static int failures;
static bool verbose;

static void fail(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fputs("    FAIL: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
    failures++;
}

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static void quiet(int level, const char *msg, void *arg) { (void)level, (void)msg, (void)arg; }
static void stop_cb(void *arg) { ca_loop_stop(arg); }

/* Runs loop in slices until *flag or secs pass. false if a slice could not be scheduled
 * (the limits do not touch memory: that is a failure). */
static bool run_until(ca_loop *loop, volatile int *flag, double secs)
{
    double deadline = now() + secs;
    while (!*flag && now() < deadline) {
        ca_handle *h = NULL;
        int r = ca_loop_call_later(loop, 0.01, stop_cb, loop, &h);
        if (r < 0) {
            fail("call_later: %s", ca_strerror(r));
            return false;
        }
        ca_loop_run_forever(loop);
        ca_handle_cancel(h);
        ca_handle_unref(h);
    }
    return *flag != 0;
}

static int count_fds(void)
{
    DIR *d = opendir("/proc/self/fd");
    if (!d) return -1;
    int n = 0;
    struct dirent *e;
    while ((e = readdir(d)))
        if (e->d_name[0] != '.') n++;
    closedir(d);
    return n - 1;
}

#include <fcntl.h>
/* The RLIMIT_NOFILE value that leaves exactly `extra` fd numbers free below it (the limit
 * bounds fd numbers, and fds already open above it stay usable). */
static int limit_leaving(int extra)
{
    int fd = 0;
    for (int free_seen = 0;; fd++) {
        if (fcntl(fd, F_GETFD) < 0 && errno == EBADF) {
            if (free_seen == extra) return fd;
            free_seen++;
        }
    }
}

static bool allowed(int r, const int *ok)
{
    if (r >= 0) return true;
    for (; *ok; ok++)
        if (r == *ok) return true;
    return false;
}

static const char *const wnames[] = {"threaded", "multiloop", "safe", "fast", "pidfd"};

static int new_watcher(int kind, ca_child_watcher **w)
{
    switch (kind) {
    case 0: return ca_threaded_child_watcher_new(w);
    case 1: return ca_multiloop_child_watcher_new(w);
    case 2: return ca_safe_child_watcher_new(w);
    case 3: return ca_fast_child_watcher_new(w);
    default: return ca_pidfd_child_watcher_new(w);
    }
}

static void exited(ca_process *p, void *arg)
{
    (void)p;
    *(volatile int *)arg = 1;
    ca_loop_stop(ca_get_running_loop());
}

/* One spawn with three pipes: 0, or an error from `ok` (then nothing may be left behind); if
 * it succeeded, the exit must come. Returns the spawn's result. */
static int spawn_one(ca_loop *loop, const int *ok, const char *what)
{
    static const char *const argv[] = {"/bin/sh", "-c", "exit 3", NULL};
    ca_subprocess_options o = {.argv = argv, .stdin_mode = CA_PIPE, .stdout_mode = CA_PIPE,
                               .stderr_mode = CA_PIPE};
    ca_subprocess_protocol proto = {.process_exited = exited};
    volatile int done = 0;
    ca_process *p = NULL;
    int r = ca_loop_subprocess_exec(loop, &o, &proto, (void *)&done, &p);
    if (verbose) fprintf(stderr, "    %s: spawn: %s\n", what, r ? ca_strerror(r) : "ok");
    if (!allowed(r, ok)) {
        fail("%s: spawn gave %d (%s)", what, r, ca_strerror(r));
    } else if (r == 0) {
        ca_process_close_stdin(p);
        if (!run_until(loop, &done, 20)) {
            fail("%s: the exit of pid %d never came", what, (int)ca_process_pid(p));
        } else {
            int rc = -1;
            ca_process_returncode(p, &rc);
            if (rc != 3) fail("%s: returncode %d, want 3", what, rc);
        }
    }
    ca_process_unref(p);
    return r;
}

struct raw {
    volatile int done;
    int rc;
};
static void raw_cb(pid_t pid, int rc, void *arg)
{
    (void)pid;
    struct raw *x = arg;
    x->rc = rc;
    x->done = 1;
    ca_loop_stop(ca_get_running_loop());
}
struct raw_job {
    ca_child_watcher *w;
    const int *ok;
    const char *what;
    struct raw x;
    volatile int ran;
    int r;
    pid_t pid;
};
static void raw_add(void *arg)
{
    struct raw_job *j = arg;
    j->ran = 1;
    ca_child_watcher_enter(j->w);
    j->pid = fork();
    if (j->pid == 0) _exit(4);
    if (j->pid < 0) {
        j->r = -errno; /* the process limit: nothing to add */
    } else {
        j->r = ca_child_watcher_add_child_handler(j->w, j->pid, raw_cb, &j->x);
        if (verbose)
            fprintf(stderr, "    %s: add_child_handler: %s\n", j->what, j->r ? ca_strerror(j->r) : "ok");
        if (!allowed(j->r, j->ok))
            fail("%s: add_child_handler gave %d (%s)", j->what, j->r, ca_strerror(j->r));
        if (j->r < 0) waitpid(j->pid, NULL, 0); /* not watched: ours */
    }
    ca_child_watcher_exit(j->w);
}

/* add_child_handler from a callback on the running loop (so that loop delivers). */
static void add_one(ca_loop *loop, ca_child_watcher *w, const int *ok, const char *what)
{
    struct raw_job j = {.w = w, .ok = ok, .what = what};
    if (ca_loop_call_soon(loop, raw_add, &j, NULL) < 0 || !run_until(loop, &j.ran, 5)) {
        fail("%s: call_soon did not run", what);
        return;
    }
    if (j.pid > 0 && j.r == 0) {
        if (!run_until(loop, &j.x.done, 20)) fail("%s: raw child %d never reported", what, (int)j.pid);
        else if (j.x.rc != 4) fail("%s: raw child returncode %d, want 4", what, j.x.rc);
    }
}

static void check_end(int fds0, const char *what)
{
    siginfo_t si = {0};
    double deadline = now() + 5;
    while (waitid(P_ALL, 0, &si, WEXITED | WNOHANG | WNOWAIT) == 0 && now() < deadline)
        usleep(2000);
    if (waitid(P_ALL, 0, &si, WEXITED | WNOHANG | WNOWAIT) == 0)
        fail("%s: a child is left (pid %d; 0: running)", what, (int)si.si_pid);
    int fds = count_fds();
    if (fds != fds0) fail("%s: %d fds at the start, %d at the end", what, fds0, fds);
}

/* ----- RLIMIT_NOFILE ---------------------------------------------------------------------- */

static void nofile_case(int kind)
{
    static const int ok[] = {-EMFILE, -ENFILE, 0};
    char what[64];
    int fds0 = count_fds();
    ca_policy *pol = NULL;
    ca_default_policy_new(&pol);
    ca_set_event_loop_policy(pol);
    ca_policy_unref(pol);
    ca_loop *loop = NULL;
    ca_child_watcher *w = NULL;
    int r = ca_selector_loop_new(&loop);
    if (r == 0) r = new_watcher(kind, &w);
    if (r == 0) r = ca_set_child_watcher(w);
    if (r == 0) r = ca_set_event_loop(loop);
    if (r < 0) {
        fail("%s: setup: %s", wnames[kind], ca_strerror(r));
        goto out;
    }
    struct rlimit old;
    getrlimit(RLIMIT_NOFILE, &old);
    for (int extra = 0; extra <= 12; extra++) {
        int l = limit_leaving(extra);
        snprintf(what, sizeof what, "%s, RLIMIT_NOFILE %d (%d free)", wnames[kind], l, extra);
        struct rlimit lim = {.rlim_cur = (rlim_t)l, .rlim_max = old.rlim_max};
        setrlimit(RLIMIT_NOFILE, &lim);
        spawn_one(loop, ok, what);
        add_one(loop, w, ok, what);
        /* Making things under the limit: a watcher, a loop. */
        ca_child_watcher *w2 = NULL;
        r = new_watcher(kind, &w2);
        if (!allowed(r, ok)) fail("%s: new watcher gave %d (%s)", what, r, ca_strerror(r));
        if (w2) ca_child_watcher_close(w2);
        ca_child_watcher_unref(w2);
        ca_loop *l2 = NULL;
        r = ca_poll_loop_new(&l2);
        if (!allowed(r, ok)) fail("%s: new loop gave %d (%s)", what, r, ca_strerror(r));
        if (l2) ca_loop_close(l2);
        ca_loop_unref(l2);
        setrlimit(RLIMIT_NOFILE, &old);
        /* Lifted: everything works again. */
        static const int none[] = {0};
        snprintf(what, sizeof what, "%s, after RLIMIT_NOFILE +%d was lifted", wnames[kind], extra);
        spawn_one(loop, none, what);
        add_one(loop, w, none, what);
    }
out:
    ca_set_event_loop(NULL);
    ca_set_child_watcher(NULL);
    if (loop) ca_loop_close(loop);
    ca_loop_unref(loop);
    if (w) ca_child_watcher_close(w);
    ca_child_watcher_unref(w);
    ca_set_event_loop_policy(NULL);
    check_end(fds0, wnames[kind]);
}

/* ----- RLIMIT_NPROC, as nobody ------------------------------------------------------------- */

static int become_nobody(rlim_t nproc)
{
    struct passwd *pw = getpwnam("nobody");
    if (!pw) return -ENOENT;
    /* The soft limit is lowered, the hard one kept: the unprivileged process may lift the
     * soft one again (up to the hard one; raising that would need CAP_SYS_RESOURCE). */
    struct rlimit lim;
    getrlimit(RLIMIT_NPROC, &lim);
    lim.rlim_cur = nproc < lim.rlim_max ? nproc : lim.rlim_max;
    if (setrlimit(RLIMIT_NPROC, &lim) < 0) return -errno;
    if (setgid(pw->pw_gid) < 0 || setuid(pw->pw_uid) < 0) return -errno;
    return 0;
}

static void nproc_case(int kind, rlim_t n)
{
    static const int ok[] = {-EAGAIN, 0};
    char what[80];
    snprintf(what, sizeof what, "%s, RLIMIT_NPROC %d as nobody", wnames[kind], (int)n);
    int fds0 = count_fds();
    ca_loop *loop = NULL;
    ca_child_watcher *w = NULL;
    int r = ca_selector_loop_new(&loop);
    if (r < 0) {
        fail("%s: loop: %s", what, ca_strerror(r));
        return;
    }
    ca_set_event_loop(loop);
    struct rlimit lim;
    getrlimit(RLIMIT_NPROC, &lim);
    lim.rlim_cur = n;
    if (setrlimit(RLIMIT_NPROC, &lim) < 0) fail("%s: setrlimit: %s", what, strerror(errno));
    r = new_watcher(kind, &w);
    if (!allowed(r, ok)) fail("%s: new watcher gave %d (%s)", what, r, ca_strerror(r));
    if (r == 0) {
        ca_set_child_watcher(w);
        ca_set_event_loop(loop);
        spawn_one(loop, ok, what);
        add_one(loop, w, ok, what);
    }
    /* Lifted. */
    lim.rlim_cur = lim.rlim_max;
    setrlimit(RLIMIT_NPROC, &lim);
    static const int none[] = {0};
    snprintf(what, sizeof what, "%s, after RLIMIT_NPROC %d was lifted", wnames[kind], (int)n);
    if (!w && (r = new_watcher(kind, &w)) < 0) fail("%s: new watcher: %s", what, ca_strerror(r));
    if (w) {
        ca_set_child_watcher(w);
        ca_set_event_loop(loop);
        spawn_one(loop, none, what);
        add_one(loop, w, none, what);
    }
    ca_set_event_loop(NULL);
    ca_set_child_watcher(NULL);
    ca_loop_close(loop);
    ca_loop_unref(loop);
    if (w) ca_child_watcher_close(w);
    ca_child_watcher_unref(w);
    ca_set_event_loop_policy(NULL);
    check_end(fds0, what);
}

/* ----- driver ------------------------------------------------------------------------------ */

static int passed, failed, skipped;

/* Runs fn(arg...) in a child; 0 passed, 1 failed, 77 skipped. */
static void run_case(const char *name, int kind, rlim_t n, bool nproc)
{
    fflush(stdout);
    fflush(stderr);
    pid_t pid = fork();
    if (pid == 0) {
        ca_set_log_handler(quiet, NULL);
        verbose = getenv("LIMITS_VERBOSE") != NULL;
        alarm(120);
        if (nproc) {
            int r = become_nobody(RLIM_INFINITY);
            if (r < 0) {
                fprintf(stderr, "    cannot become nobody: %s\n", strerror(-r));
                exit(77);
            }
            nproc_case(kind, n);
        } else {
            nofile_case(kind);
        }
        exit(failures ? 1 : 0); /* exit, not _exit: LeakSanitizer runs at exit */
    }
    int st = 0;
    waitpid(pid, &st, 0);
    if (WIFEXITED(st) && WEXITSTATUS(st) == 0) {
        passed++;
        printf("ok   %s\n", name);
    } else if (WIFEXITED(st) && WEXITSTATUS(st) == 77) {
        skipped++;
        printf("skip %s\n", name);
    } else {
        failed++;
        if (WIFSIGNALED(st)) printf("FAIL %s: killed by signal %d\n", name, WTERMSIG(st));
        else printf("FAIL %s: exit status %d\n", name, WEXITSTATUS(st));
    }
}

int main(void)
{
    char name[96];
    for (int k = 0; k < 5; k++) {
        snprintf(name, sizeof name, "RLIMIT_NOFILE, %s watcher", wnames[k]);
        run_case(name, k, 0, false);
    }
    if (geteuid() != 0) {
        /* setuid needs root; as an ordinary user, the limit would apply to all of its
         * processes, so it is not tried. */
        printf("skip RLIMIT_NPROC cases: not root\n");
        skipped += 6;
    } else {
        /* 1: not even one more process (clone fails); 2: the child but no thread; 3: one
         * thread. Threads count toward RLIMIT_NPROC. */
        for (int k = 0; k < 2; k++) {
            for (rlim_t n = 1; n <= 3; n++) {
                snprintf(name, sizeof name, "RLIMIT_NPROC %d, %s watcher", (int)n, wnames[k]);
                run_case(name, k, n, true);
            }
        }
    }
    printf("limits: %d passed, %d failed, %d skipped\n", passed, failed, skipped);
    return failed ? 1 : 0;
}
