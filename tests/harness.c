/* The test runner: see harness.h. Prints one line per test and a closing
 * "NAME: N passed, N failed, N skipped" line; exits 1 if any test failed. */
#include "harness.h"
#include "test_list.h"
/* The library's tables of loop and watcher kinds: internal, but the tests link the static
 * library, where they are visible. */
#include "../src/kinds.h"

#include <dirent.h>
#include <fcntl.h>
#include <math.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>

const char *t_loop_kind = "none";
const char *t_watcher_kind = "none";
static bool t_checks = true;

double t_slow(void)
{
    const char *s = getenv("CA_TEST_SLOW");
    double v = s ? atof(s) : 1.0;
    return v >= 1.0 ? v : 1.0;
}

void t_fail(const char *file, int line, const char *fmt, ...)
{
    va_list ap;
    fprintf(stderr, "    %s:%d: ", file, line);
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputc('\n', stderr);
    fflush(stderr);
    _exit(1);
}

void t_skip(const char *why)
{
    fprintf(stderr, "    skipped: %s\n", why);
    fflush(stderr);
    _exit(77);
}

void t_child_exit(int code)
{
    char cmd[32];
    snprintf(cmd, sizeof cmd, "exit %d", code & 255);
    execl("/bin/sh", "sh", "-c", cmd, (char *)NULL);
    _exit(code);
}

void t_no_leftover_checks(void) { t_checks = false; }

bool t_flag_set(void *arg) { return *(volatile int *)arg != 0; }

static void stop_cb(void *arg) { ca_loop_stop(arg); }

void t_run_for(ca_loop *loop, double seconds)
{
    ca_handle *h = NULL;
    CHECK_OK(ca_loop_call_later(loop, seconds, stop_cb, loop, &h));
    CHECK_OK(ca_loop_run_forever(loop));
    ca_handle_cancel(h);
    ca_handle_unref(h);
}

bool t_run_until(ca_loop *loop, bool (*pred)(void *), void *arg, double timeout)
{
    double deadline = ca_loop_time(loop) + timeout * t_slow();
    while (!pred(arg)) {
        if (ca_loop_time(loop) > deadline) return false;
        t_run_for(loop, 0.002);
    }
    return true;
}

int t_new_loop(ca_loop **out)
{
    if (strcmp(t_loop_kind, "custom") == 0) return t_custom_loop_new(out);
    const ca__loop_kind *k = ca__loop_kind_find(t_loop_kind);
    return k ? k->make(out) : ca_selector_loop_new(out);
}

static unsigned watcher_flags(const char *kind)
{
    const ca__watcher_kind *k = ca__watcher_kind_find(kind);
    return k ? k->flags : 0;
}

bool t_watcher_needs_attach(const char *kind) { return watcher_flags(kind) & CA__WK_ATTACH; }
bool t_watcher_keeps_zombie(const char *kind) { return watcher_flags(kind) & CA__WK_NO_PIDFD; }
bool t_watcher_reaps_all(const char *kind) { return watcher_flags(kind) & CA__WK_REAPS_ALL; }

/* WATCHER_TEST's setup: a watcher of kind wkind delivering to loop; skips the test when the
 * pair cannot work here. */
static ca_child_watcher *watcher_for(const char *wkind, ca_loop *loop)
{
    const ca__watcher_kind *k = ca__watcher_kind_find(wkind);
    if (!k) t_fail(__FILE__, __LINE__, "unknown watcher kind %s", wkind);
    ca_child_watcher *w = NULL;
    int r = k->make(&w);
    if (r == -ENOSYS) t_skip("this watcher kind is unavailable here");
    CHECK_OK(r);
    CHECK_OK(ca_set_event_loop(loop));
    if (k->flags & CA__WK_ATTACH) {
        r = ca_child_watcher_attach_loop(w, loop);
        if (r == -ENOTSUP) {
            ca_child_watcher_unref(w);
            ca_set_event_loop(NULL);
            ca_loop_close(loop);
            ca_loop_unref(loop);
            t_skip("this watcher needs the loop's signal handlers");
        }
        CHECK_OK(r);
    }
    CHECK(ca_child_watcher_is_active(w));
    return w;
}

/* ----- leftovers ---------------------------------------------------------------------- */

#define MAX_FDS 4096
static unsigned char fd_snapshot[MAX_FDS];

static void snapshot_fds(unsigned char *set)
{
    memset(set, 0, MAX_FDS);
    DIR *d = opendir("/proc/self/fd");
    if (!d) return;
    int self = dirfd(d);
    struct dirent *e;
    while ((e = readdir(d)) != NULL) {
        int fd = atoi(e->d_name);
        if (e->d_name[0] != '.' && fd != self && fd < MAX_FDS) set[fd] = 1;
    }
    closedir(d);
}

int t_count_threads(void)
{
    int n = 0;
    DIR *d = opendir("/proc/self/task");
    if (!d) return -1;
    struct dirent *e;
    while ((e = readdir(d)) != NULL)
        if (e->d_name[0] != '.') n++;
    closedir(d);
    return n;
}

/* ThreadSanitizer starts a background thread of its own once the process has threads. */
#ifdef T_TSAN
#define RUNTIME_THREADS 1
#else
#define RUNTIME_THREADS 0
#endif

static void check_leftovers(int threads_before)
{
    threads_before += RUNTIME_THREADS;
    if (!t_checks) return;
    /* Children: none running, none unreaped. */
    int status;
    pid_t p = waitpid(-1, &status, WNOHANG);
    if (p > 0) t_fail(__FILE__, __LINE__, "leftover: zombie child %d was never reaped", (int)p);
    if (p == 0) {
        kill(0, SIGKILL); /* our own group: the harness parent is outside it */
        t_fail(__FILE__, __LINE__, "leftover: a child process is still running");
    }
    /* Threads: detached helper threads get a moment to finish. */
    double limit = 2.0 * t_slow();
    int n = t_count_threads();
    for (double waited = 0; n > threads_before && waited < limit; waited += 0.01) {
        struct timespec ts = {0, 10 * 1000 * 1000};
        nanosleep(&ts, NULL);
        n = t_count_threads();
    }
    if (n > threads_before) t_fail(__FILE__, __LINE__, "leftover: %d extra thread(s)", n - threads_before);
    /* Fds. */
    static unsigned char now[MAX_FDS];
    snapshot_fds(now);
    for (int fd = 0; fd < MAX_FDS; fd++) {
        if (now[fd] && !fd_snapshot[fd]) {
            char path[64], target[256] = "?";
            snprintf(path, sizeof path, "/proc/self/fd/%d", fd);
            ssize_t k = readlink(path, target, sizeof target - 1);
            if (k > 0) target[k] = 0;
            t_fail(__FILE__, __LINE__, "leftover: fd %d (%s) is still open", fd, target);
        }
    }
}

/* ----- running one test ------------------------------------------------------------ */

static void run_body(const struct t_entry *t, const char *kind, const char *wkind)
{
    setpgid(0, 0);
    t_loop_kind = kind ? kind : "none";
    t_watcher_kind = wkind ? wkind : "none";
    snapshot_fds(fd_snapshot);
    int threads_before = t_count_threads();
    if (kind) {
        ca_loop *loop = NULL;
        int r = t_new_loop(&loop);
        if (r == -ENOSYS || r == -EPERM) t_skip("this loop kind is unavailable here");
        CHECK_OK(r);
        if (wkind) {
            ca_child_watcher *w = watcher_for(wkind, loop);
            t->watcher_fn(loop, w);
            CHECK_OK(ca_child_watcher_close(w));
            ca_child_watcher_unref(w);
            CHECK_OK(ca_set_event_loop(NULL));
        } else {
            t->loop_fn(loop);
        }
        if (!ca_loop_is_closed(loop) && ca_loop_close(loop) < 0)
            t_fail(__FILE__, __LINE__, "the test left its loop running");
        ca_loop_unref(loop);
    } else {
        t->fn();
    }
    check_leftovers(threads_before);
    fflush(NULL);
    exit(0); /* exit, not _exit: LeakSanitizer and valgrind check for leaks here */
}

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

double t_now(void) { return now_s(); }

bool t_stress_go_on(int done, int min, int max, double started, double seconds)
{
    if (done >= max) return false;
    return done < min || now_s() - started < seconds;
}

/* 0 pass, 1 fail, 2 skip */
static int run_one(const struct t_entry *t, const char *kind, const char *wkind)
{
    fflush(NULL);
    double t0 = now_s();
    pid_t pid = fork();
    if (pid < 0) {
        perror("fork");
        return 1;
    }
    if (pid == 0) run_body(t, kind, wkind);
    setpgid(pid, pid);
    int pfd = (int)syscall(SYS_pidfd_open, pid, 0);
    double limit = t->timeout * t_slow();
    int status = 0;
    bool timed_out = false, reaped = false;
    if (pfd >= 0) {
        struct pollfd p = {.fd = pfd, .events = POLLIN};
        int r;
        do {
            r = poll(&p, 1, (int)(limit * 1000));
        } while (r < 0 && errno == EINTR);
        if (r == 0) timed_out = true;
        close(pfd);
    } else {
        /* No pidfd (valgrind 3.19 answers ENOSYS for pidfd_open): the limit must hold all the
         * same, so poll the child's state every 10 ms until it exits or the time is up. */
        double deadline = t0 + limit;
        for (;;) {
            pid_t r = waitpid(pid, &status, WNOHANG);
            if (r == pid || (r < 0 && errno != EINTR)) {
                if (r != pid) status = 1 << 8; /* cannot happen: counted as a failure */
                reaped = true;
                break;
            }
            if (now_s() >= deadline) {
                timed_out = true;
                break;
            }
            nanosleep(&(struct timespec){0, 10 * 1000 * 1000}, NULL);
        }
    }
    if (timed_out) kill(-pid, SIGKILL);
    while (!reaped && waitpid(pid, &status, 0) < 0 && errno == EINTR) {
    }
    kill(-pid, SIGKILL); /* anything the test left in its group */
    double dt = now_s() - t0;
    const char *verdict;
    int res;
    if (timed_out) {
        verdict = "FAIL (timeout)";
        res = 1;
    } else if (WIFEXITED(status) && WEXITSTATUS(status) == 0) {
        verdict = "ok";
        res = 0;
    } else if (WIFEXITED(status) && WEXITSTATUS(status) == 77) {
        verdict = "skip";
        res = 2;
    } else {
        verdict = "FAIL";
        res = 1;
    }
    char extra[64] = "";
    if (!timed_out && WIFSIGNALED(status)) snprintf(extra, sizeof extra, " (signal %d)", WTERMSIG(status));
    else if (res == 1 && !timed_out && WIFEXITED(status) && WEXITSTATUS(status) != 1)
        snprintf(extra, sizeof extra, " (exit %d)", WEXITSTATUS(status));
    printf("%-5s %s%s%s%s%s%s %.2fs%s\n", verdict, t->name, kind ? " [" : "", kind ? kind : "",
           wkind ? "/" : "", wkind ? wkind : "", kind ? "]" : "", dt, extra);
    fflush(stdout);
    return res;
}

static bool wanted(const char *name, int argc, char **argv)
{
    if (argc <= 1) return true;
    for (int i = 1; i < argc; i++)
        if (strstr(name, argv[i])) return true;
    return false;
}

static bool kind_wanted(const char *kind)
{
    const char *only = getenv("CA_TEST_LOOPS");
    if (!only || !*only) return true;
    char buf[256];
    snprintf(buf, sizeof buf, ",%s,", only);
    char k[32];
    snprintf(k, sizeof k, ",%s,", kind);
    return strstr(buf, k) != NULL;
}

int main(int argc, char **argv)
{
    /* The library's loop kinds, then the tests' own custom loop (tests/custom_loop.c). */
    const char *kinds[16];
    int nkinds = 0;
    for (size_t i = 0; i < ca__loop_kind_count && nkinds < 15; i++)
        kinds[nkinds++] = ca__loop_kinds[i].name;
    kinds[nkinds++] = "custom";
    int passed = 0, failed = 0, skipped = 0;
    signal(SIGPIPE, SIG_IGN);
    for (size_t i = 0; i < t_count; i++) {
        const struct t_entry *t = &t_list[i];
        if (!wanted(t->name, argc, argv)) continue;
        bool per_loop = t->loop_fn || t->watcher_fn;
        for (int k = 0; k < (per_loop ? nkinds : 1); k++) {
            const char *kind = per_loop ? kinds[k] : NULL;
            if (kind && !kind_wanted(kind)) continue;
            size_t nw = t->watcher_fn ? ca__watcher_kind_count : 1;
            for (size_t j = 0; j < nw; j++) {
                const char *wkind = t->watcher_fn ? ca__watcher_kinds[j].name : NULL;
                int r = run_one(t, kind, wkind);
                if (r == 0) passed++;
                else if (r == 1) failed++;
                else skipped++;
            }
        }
    }
    printf("[%s] %d passed, %d failed, %d skipped\n", t_suite_name, passed, failed, skipped);
    return failed ? 1 : 0;
}
