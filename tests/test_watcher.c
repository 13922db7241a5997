/* Child watchers: every watcher on every loop kind, with real children. */
#include "harness.h"
#include "contract_util.h" /* the watcher kinds: W_*, wname, wnew */

#include <dirent.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <sched.h>
#include <stddef.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <spawn.h>
#include <stdatomic.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <time.h>
#include <string.h>
#include <stdlib.h>
#include <unistd.h>

extern char **environ;

/* ----- helpers ------------------------------------------------------------------------- */

static bool needs_attach(int k) { return k == W_SAFE || k == W_FAST; }

/* A watcher of kind k that delivers to loop: loop is made current here (and attached for
 * Safe/Fast). NULL when the kind is unavailable (pidfd without kernel support). */
static ca_child_watcher *wmake(int k, ca_loop *loop)
{
    ca_child_watcher *w = NULL;
    int r = wnew(k, &w);
    if (r == -ENOSYS && (k == W_PIDFD || k == W_URING)) return NULL; /* old kernel, valgrind */
    CHECK_OK(r);
    CHECK_OK(ca_set_event_loop(loop));
    if (needs_attach(k)) {
        r = ca_child_watcher_attach_loop(w, loop);
        if (r == -ENOTSUP && strcmp(t_loop_kind, "custom") == 0) {
            /* Safe and Fast need the loop's signal handlers; the test's custom loop has none. */
            ca_child_watcher_unref(w);
            CHECK_OK(ca_set_event_loop(NULL));
            return NULL;
        }
        CHECK_OK(r);
    }
    CHECK(ca_child_watcher_is_active(w));
    return w;
}

static void wdone(ca_child_watcher *w)
{
    CHECK_OK(ca_child_watcher_close(w));
    ca_child_watcher_unref(w);
    CHECK_OK(ca_set_event_loop(NULL));
}

static pid_t spawn_fds(const char *cmd, int in_fd)
{
    posix_spawn_file_actions_t fa;
    posix_spawn_file_actions_init(&fa);
    if (in_fd >= 0) posix_spawn_file_actions_adddup2(&fa, in_fd, 0);
    char *argv[] = {"sh", "-c", (char *)cmd, NULL};
    pid_t pid = -1;
    int e = posix_spawn(&pid, "/bin/sh", &fa, NULL, argv, environ);
    posix_spawn_file_actions_destroy(&fa);
    if (e) t_fail(__FILE__, __LINE__, "posix_spawn: %s", strerror(e));
    return pid;
}

static pid_t spawn(const char *cmd) { return spawn_fds(cmd, -1); }

/* A child that exits with 0 when the write end of *pipe_w is closed. */
static pid_t spawn_cat(int rfd)
{
    posix_spawn_file_actions_t fa;
    posix_spawn_file_actions_init(&fa);
    posix_spawn_file_actions_adddup2(&fa, rfd, 0);
    posix_spawn_file_actions_addopen(&fa, 1, "/dev/null", O_WRONLY, 0);
    char *argv[] = {"cat", NULL};
    pid_t pid = -1;
    int e = posix_spawn(&pid, "/bin/cat", &fa, NULL, argv, environ);
    posix_spawn_file_actions_destroy(&fa);
    if (e) t_fail(__FILE__, __LINE__, "posix_spawn: %s", strerror(e));
    return pid;
}

/* Waits (without reaping) until pid has exited. */
static void wait_zombie(pid_t pid)
{
    siginfo_t si;
    memset(&si, 0, sizeof si);
    CHECK_EQ(waitid(P_PID, (id_t)pid, &si, WEXITED | WNOWAIT), 0);
}

/* Waits until pid has exited (a zombie) or has been reaped by somebody else. */
static void wait_exited(pid_t pid)
{
    siginfo_t si;
    memset(&si, 0, sizeof si);
    int r = waitid(P_PID, (id_t)pid, &si, WEXITED | WNOWAIT);
    CHECK(r == 0 || errno == ECHILD);
}

struct gone {
    pid_t pid;
};

/* Predicate: somebody reaped the pid. */
static bool is_gone(void *arg)
{
    siginfo_t si;
    memset(&si, 0, sizeof si);
    return waitid(P_PID, (id_t)((struct gone *)arg)->pid, &si, WEXITED | WNOWAIT | WNOHANG) < 0;
}

/* Reaps pid if still ours; returns its status, or -1 if somebody else reaped it. */
static int reap(pid_t pid)
{
    int st;
    pid_t r;
    do {
        r = waitpid(pid, &st, 0);
    } while (r < 0 && errno == EINTR);
    return r == pid ? st : -1;
}

/* Written by the callback, in whatever thread the watcher calls it from: all atomic. */
typedef struct rec {
    atomic_int calls;
    atomic_int rc;
    atomic_int pid;
    _Atomic unsigned long thread;
} rec;

static void on_exit_rec(pid_t pid, int rc, void *arg)
{
    rec *r = arg;
    atomic_store(&r->rc, rc);
    atomic_store(&r->pid, (int)pid);
    atomic_store(&r->thread, (unsigned long)pthread_self());
    atomic_fetch_add(&r->calls, 1);
}

/* Spawns a cat, registers it with w (its exit goes to *r), then closes its pipe: it exits 0. */
static pid_t watch_cat_exiting(ca_child_watcher *w, rec *r)
{
    int p[2];
    CHECK_EQ(pipe2(p, O_CLOEXEC), 0);
    pid_t pid = spawn_cat(p[0]);
    CHECK_OK(ca_child_watcher_add_child_handler(w, pid, on_exit_rec, r));
    close(p[0]);
    close(p[1]);
    return pid;
}

static bool on_this_thread(rec *r)
{
    return pthread_equal((pthread_t)atomic_load(&r->thread), pthread_self());
}

/* Predicate: the callback of *(rec *)arg ran. */
static bool called(void *arg) { return atomic_load(&((rec *)arg)->calls) != 0; }

typedef struct recs {
    rec *r;
    int n;
} recs;

static bool all_called(void *arg)
{
    recs *rs = arg;
    for (int i = 0; i < rs->n; i++)
        if (atomic_load(&rs->r[i].calls) == 0) return false;
    return true;
}

/* ----- log capture ------------------------------------------------------------------------ */

static pthread_mutex_t log_mu = PTHREAD_MUTEX_INITIALIZER;
static char log_buf[16384];
static size_t log_len;

static void log_capture(int level, const char *msg, void *arg)
{
    pthread_mutex_lock(&log_mu);
    size_t n = strlen(msg);
    if (log_len + n + 2 < sizeof log_buf) {
        memcpy(log_buf + log_len, msg, n);
        log_len += n;
        log_buf[log_len++] = '\n';
        log_buf[log_len] = 0;
    }
    pthread_mutex_unlock(&log_mu);
}

static bool log_has(const char *needle)
{
    pthread_mutex_lock(&log_mu);
    bool r = strstr(log_buf, needle) != NULL;
    pthread_mutex_unlock(&log_mu);
    return r;
}

static void log_reset(void)
{
    pthread_mutex_lock(&log_mu);
    log_len = 0;
    log_buf[0] = 0;
    pthread_mutex_unlock(&log_mu);
}

/* ----- exit codes --------------------------------------------------------------------------- */

LOOP_TEST(exit_codes) /* timeout: 60 */
{
    static const char *cmds[] = {"exit 0", "exit 7", "exit 255", "kill -9 $$", "kill -15 $$"};
    static const int want[] = {0, 7, 255, -9, -15};
    for (int k = 0; k < W_COUNT; k++) {
        ca_child_watcher *w = wmake(k, loop);
        if (!w) continue;
        rec r[5];
        memset(r, 0, sizeof r);
        pid_t pids[5];
        for (int i = 0; i < 5; i++) {
            CHECK_OK(ca_child_watcher_enter(w));
            pids[i] = spawn(cmds[i]);
            CHECK_OK(ca_child_watcher_add_child_handler(w, pids[i], on_exit_rec, &r[i]));
            CHECK_OK(ca_child_watcher_exit(w));
        }
        recs rs = {r, 5};
        if (!t_run_until(loop, all_called, &rs, 10))
            t_fail(__FILE__, __LINE__, "%s: not every exit was delivered", wname[k]);
        t_run_for(loop, 0.02);
        for (int i = 0; i < 5; i++) {
            if (atomic_load(&r[i].rc) != want[i] || atomic_load(&r[i].calls) != 1)
                t_fail(__FILE__, __LINE__, "%s: '%s' gave rc %d in %d calls, want %d once",
                       wname[k], cmds[i], atomic_load(&r[i].rc), atomic_load(&r[i].calls),
                       want[i]);
            CHECK_EQ(atomic_load(&r[i].pid), pids[i]);
            /* Every watcher calls back on the delivery loop's thread: this one. */
            CHECK(on_this_thread(&r[i]));
        }
        CHECK_EQ(ca_child_watcher_remove_child_handler(w, pids[0]), 0);
        wdone(w);
    }
}

LOOP_TEST(exited_before_add)
{
    for (int k = 0; k < W_COUNT; k++) {
        ca_child_watcher *w = wmake(k, loop);
        if (!w) continue;
        rec r = {0};
        CHECK_OK(ca_child_watcher_enter(w));
        pid_t pid = spawn("exit 3");
        wait_zombie(pid);
        CHECK_OK(ca_child_watcher_add_child_handler(w, pid, on_exit_rec, &r));
        CHECK_OK(ca_child_watcher_exit(w));
        CHECK(t_run_until(loop, called, &r, 5));
        CHECK_EQ(atomic_load(&r.rc), 3);
        t_run_for(loop, 0.02);
        CHECK_EQ(atomic_load(&r.calls), 1);
        wdone(w);
    }
}

/* ----- many children exiting at the same moment (SIGCHLD coalescing) ---------------------- */

static void many(ca_loop *loop, int k)
{
    /* 500 on epoll; the other loop kinds and slow builds (sanitizers, valgrind) fewer. */
    int n = strcmp(t_loop_kind, "epoll") == 0 ? 500 : 100;
    if (t_slow() > 1) n = 50;
    ca_child_watcher *w = wmake(k, loop);
    if (!w) SKIP("this watcher is unavailable on this loop kind");
    int p[2];
    CHECK_EQ(pipe2(p, O_CLOEXEC), 0);
    rec *r = calloc((size_t)n, sizeof *r);
    pid_t *pids = calloc((size_t)n, sizeof *pids);
    CHECK(r && pids);
    for (int i = 0; i < n; i++) {
        CHECK_OK(ca_child_watcher_enter(w));
        pids[i] = spawn_cat(p[0]);
        CHECK_OK(ca_child_watcher_add_child_handler(w, pids[i], on_exit_rec, &r[i]));
        CHECK_OK(ca_child_watcher_exit(w));
    }
    close(p[0]);
    close(p[1]); /* every cat sees EOF at once */
    recs rs = {r, n};
    bool ok = t_run_until(loop, all_called, &rs, 30);
    t_run_for(loop, 0.05);
    int missing = 0, twice = 0;
    for (int i = 0; i < n; i++) {
        int c = atomic_load(&r[i].calls);
        if (c == 0) missing++;
        if (c > 1) twice++;
        if (c == 1) CHECK_EQ(atomic_load(&r[i].rc), 0);
    }
    if (!ok || missing || twice)
        t_fail(__FILE__, __LINE__, "%s: %d of %d exits missing, %d delivered twice", wname[k],
               missing, n, twice);
    wdone(w);
    free(r);
    free(pids);
}

LOOP_TEST(many_threaded) /* timeout: 60 */ { many(loop, W_THREADED); }
LOOP_TEST(many_multiloop) /* timeout: 60 */ { many(loop, W_MULTILOOP); }
LOOP_TEST(many_safe) /* timeout: 60 */ { many(loop, W_SAFE); }
LOOP_TEST(many_fast) /* timeout: 60 */ { many(loop, W_FAST); }
LOOP_TEST(many_pidfd) /* timeout: 60 */ { many(loop, W_PIDFD); }
LOOP_TEST(many_uring) /* timeout: 60 */ { many(loop, W_URING); }

/* ----- replace, remove ------------------------------------------------------------------------ */

LOOP_TEST(handler_replaced)
{
    for (int k = 0; k < W_COUNT; k++) {
        ca_child_watcher *w = wmake(k, loop);
        if (!w) continue;
        rec r1 = {0}, r2 = {0};
        CHECK_OK(ca_child_watcher_enter(w));
        pid_t pid = spawn("sleep 0.05; exit 4");
        CHECK_OK(ca_child_watcher_add_child_handler(w, pid, on_exit_rec, &r1));
        CHECK_OK(ca_child_watcher_add_child_handler(w, pid, on_exit_rec, &r2));
        CHECK_OK(ca_child_watcher_exit(w));
        CHECK(t_run_until(loop, called, &r2, 5));
        t_run_for(loop, 0.05);
        CHECK_EQ(atomic_load(&r1.calls), 0);
        CHECK_EQ(atomic_load(&r2.calls), 1);
        CHECK_EQ(atomic_load(&r2.rc), 4);
        wdone(w);
    }
}

LOOP_TEST(handler_removed_before_exit)
{
    for (int k = 0; k < W_COUNT; k++) {
        ca_child_watcher *w = wmake(k, loop);
        if (!w) continue;
        ca_set_log_handler(log_capture, NULL);
        log_reset();
        rec r = {0};
        pid_t pid = spawn("sleep 0.05; exit 4");
        CHECK_OK(ca_child_watcher_add_child_handler(w, pid, on_exit_rec, &r));
        CHECK_EQ(ca_child_watcher_remove_child_handler(w, pid), 1);
        CHECK_EQ(ca_child_watcher_remove_child_handler(w, pid), 0);
        wait_exited(pid);
        t_run_for(loop, 0.05);
        if (k == W_FAST) {
            /* Fast reaps every child, registered or not, once its loop sees SIGCHLD. */
            struct gone g = {pid};
            CHECK(t_run_until(loop, is_gone, &g, 5));
        }
        CHECK_EQ(atomic_load(&r.calls), 0);
        int st = reap(pid);
        if (k == W_SAFE || k == W_MULTILOOP || k == W_PIDFD || k == W_URING) {
            /* These never reap a child that is not registered. */
            CHECK(st >= 0 && WIFEXITED(st) && WEXITSTATUS(st) == 4);
        } else if (k == W_FAST) {
            /* The status went to its log. */
            CHECK_EQ(st, -1);
            CHECK(log_has("unknown pid"));
        }
        /* Threaded: its thread reaps the removed child, quietly (or we did first). */
        CHECK(!log_has("returncode 255"));
        wdone(w);
        ca_set_log_handler(NULL, NULL);
    }
}

/* The exit was already reaped (and, for the threaded ones, posted) when the handler is
 * removed: the callback must still never run. */
LOOP_TEST(handler_removed_after_reap)
{
    ca_set_log_handler(log_capture, NULL); /* Fast logs the removed child it reaps */
    for (int k = 0; k < W_COUNT; k++) {
        ca_child_watcher *w = wmake(k, loop);
        if (!w) continue;
        rec r = {0};
        pid_t pid = spawn("exit 2");
        CHECK_OK(ca_child_watcher_add_child_handler(w, pid, on_exit_rec, &r));
        if (k == W_THREADED || k == W_MULTILOOP) {
            /* Their own thread reaps and posts: wait until the pid is gone. */
            struct gone g = {pid};
            double t0 = ca_loop_time(loop);
            while (!is_gone(&g)) {
                if (ca_loop_time(loop) - t0 > 5 * t_slow()) t_fail(__FILE__, __LINE__, "not reaped");
                sleep_s(0.001);
            }
            sleep_s(0.01);
        } else {
            wait_exited(pid); /* Safe may have reaped it at once in add (and posted it) */
        }
        CHECK_EQ(ca_child_watcher_remove_child_handler(w, pid), 1);
        t_run_for(loop, 0.1);
        CHECK_EQ(atomic_load(&r.calls), 0);
        /* Pidfd and Uring reap only on the loop (Uring after the callback) */
        if (k == W_PIDFD || k == W_URING) CHECK(reap(pid) >= 0);
        else reap(pid);
        wdone(w);
    }
}

/* ----- somebody else reaped the child: 255 --------------------------------------------------- */

LOOP_TEST(echild_gives_255)
{
    ca_set_log_handler(log_capture, NULL);
    for (int k = 0; k < W_COUNT; k++) {
        ca_child_watcher *w = wmake(k, loop);
        if (!w) continue;
        log_reset();
        rec r = {0};
        pid_t pid = spawn("exit 0");
        CHECK(reap(pid) >= 0);
        CHECK_OK(ca_child_watcher_add_child_handler(w, pid, on_exit_rec, &r));
        {
            /* Fast too (issue 16): waitpid(-1) never sees it, its slow check does. */
            CHECK(t_run_until(loop, called, &r, 5));
            CHECK_EQ(atomic_load(&r.rc), 255);
            char needle[64];
            snprintf(needle, sizeof needle, "pid %d", (int)pid);
            if (!log_has(needle)) t_fail(__FILE__, __LINE__, "%s: no log line: %s", wname[k], log_buf);
        }
        wdone(w);
    }
    ca_set_log_handler(NULL, NULL);
}

/* Safe and MultiLoop find exits with waitid(WNOWAIT) and poll every child only now and then:
 * a watched child that other code reaped must still be reported (255), also when the same
 * SIGCHLD brought an exit that the watcher reaps itself. Safe reaps on the loop, so the theft
 * is certain; MultiLoop's thread may win the race, and then reports the real status. */
LOOP_TEST(poller_reports_stolen_child_beside_own_exit)
{
    ca_set_log_handler(log_capture, NULL);
    static const int kinds[] = {W_SAFE, W_MULTILOOP};
    for (int ki = 0; ki < 2; ki++) {
        int k = kinds[ki];
        ca_child_watcher *w = wmake(k, loop);
        if (!w) continue;
        t_run_for(loop, 0.05); /* the poll of every child that attaching asks for is done */
        log_reset();
        int p[2], q[2], o[2];
        CHECK_EQ(pipe2(p, O_CLOEXEC), 0);
        CHECK_EQ(pipe2(q, O_CLOEXEC), 0);
        CHECK_EQ(pipe2(o, O_CLOEXEC), 0);
        rec stolen = {0}, own = {0};
        /* Another child that runs meanwhile: with none left, waitid answers ECHILD and the
         * watcher polls every child at once; here it has to come back for the stolen one. */
        pid_t other = spawn_cat(o[0]);
        pid_t b = spawn_cat(p[0]);
        pid_t a = spawn_cat(q[0]);
        CHECK_OK(ca_child_watcher_add_child_handler(w, b, on_exit_rec, &stolen));
        CHECK_OK(ca_child_watcher_add_child_handler(w, a, on_exit_rec, &own));
        close(p[0]);
        close(p[1]);
        bool stole = reap(b) >= 0; /* other code's waitpid(b) */
        if (k == W_SAFE) CHECK(stole);
        close(q[0]);
        close(q[1]);
        CHECK(t_run_until(loop, called, &own, 5));
        CHECK_EQ(atomic_load(&own.rc), 0);
        CHECK(t_run_until(loop, called, &stolen, 5));
        CHECK_EQ(atomic_load(&stolen.rc), stole ? 255 : 0);
        t_run_for(loop, 0.15); /* past the deferred poll: nothing is reported twice */
        CHECK_EQ(atomic_load(&own.calls), 1);
        CHECK_EQ(atomic_load(&stolen.calls), 1);
        if (stole) {
            char needle[64];
            snprintf(needle, sizeof needle, "pid %d", (int)b);
            if (!log_has(needle)) t_fail(__FILE__, __LINE__, "%s: no log line: %s", wname[k], log_buf);
        }
        wdone(w);
        close(o[0]);
        close(o[1]);
        CHECK(reap(other) >= 0);
    }
    ca_set_log_handler(NULL, NULL);
}

/* The polls of every registration made so far (src/watcher.c, for tests). */
unsigned long ca__watcher_full_polls(void);

static double mono_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec / 1e9;
}

#define NIDLE 50

/* Runs the block once for Safe and once for MultiLoop: k the kind, w a watcher of it on loop
 * (a kind the loop cannot have is skipped). The block ends with wdone(w). */
#define FOR_POLLERS(k, w)                                                                      \
    for (int k##_i = 0, k = W_SAFE; k##_i < 2; k = ++k##_i == 1 ? W_MULTILOOP : k)             \
        for (ca_child_watcher *w = wmake(k, loop); w != NULL; w = NULL)

/* Issue 13: Safe and MultiLoop find exits with waitid(WNOWAIT); every registration is polled
 * only when that cannot tell and at the slow check (once a second), not after every SIGCHLD:
 * the cost of an exit does not grow with the number of idle watched children. (Before: one
 * poll of every child at most 0.1 s after each SIGCHLD.) */
LOOP_TEST(poller_polls_every_child_only_at_slow_check) /* timeout: 60 */
{
    FOR_POLLERS(k, w) {
        int ip[2];
        CHECK_EQ(pipe2(ip, O_CLOEXEC), 0);
        pid_t idle[NIDLE];
        static rec irec[NIDLE];
        memset(irec, 0, sizeof irec);
        for (int i = 0; i < NIDLE; i++) {
            idle[i] = spawn_cat(ip[0]);
            CHECK_OK(ca_child_watcher_add_child_handler(w, idle[i], on_exit_rec, &irec[i]));
        }
        t_run_for(loop, 0.05); /* the poll of every child that attaching asks for is done */
        unsigned long p0 = ca__watcher_full_polls();
        double t0 = mono_s();
        enum { ROUNDS = 6 };
        for (int i = 0; i < ROUNDS; i++) {
            rec r = {0};
            watch_cat_exiting(w, &r);
            CHECK(t_run_until(loop, called, &r, 5));
            CHECK_EQ(atomic_load(&r.rc), 0);
            t_run_for(loop, 0.15); /* past the 0.1 s of the poll the old code made */
            CHECK_EQ(atomic_load(&r.calls), 1);
        }
        double dt = mono_s() - t0;
        unsigned long polls = ca__watcher_full_polls() - p0;
        /* One per started second at most (the slow check), one more for luck. */
        unsigned long allowed = (unsigned long)dt + 2;
        if (polls > allowed)
            t_fail(__FILE__, __LINE__, "%s: %lu polls of every child in %.2f s, want <= %lu",
                   wname[k], polls, dt, allowed);
        close(ip[0]);
        close(ip[1]);
        recs rs = {irec, NIDLE};
        CHECK(t_run_until(loop, all_called, &rs, 10));
        for (int i = 0; i < NIDLE; i++) CHECK_EQ(atomic_load(&irec[i].calls), 1);
        wdone(w);
    }
}

/* An exited child that is not watched (other code's, which it has not reaped yet) stays first
 * in waitid's answer and hides the watched ones behind it: they are still delivered, once and
 * promptly (well before the slow check), the other child is left alone (Safe and MultiLoop
 * never reap it), and a watched child that other code reaped still gives 255 and a warning. */
LOOP_TEST(poller_foreign_zombie_hides_nothing) /* timeout: 60 */
{
    ca_set_log_handler(log_capture, NULL);
    static const int kinds[] = {W_SAFE, W_MULTILOOP};
    for (int ki = 0; ki < 2; ki++) {
        int k = kinds[ki];
        ca_child_watcher *w = wmake(k, loop);
        if (!w) continue;
        t_run_for(loop, 0.05);
        log_reset();
        pid_t foreign = spawn("exit 4"); /* older than the watched ones: first in waitid */
        wait_zombie(foreign);
        t_run_for(loop, 0.03); /* its SIGCHLD is handled: it is known not to be ours */
        enum { N = 5 };
        for (int round = 0; round < 3; round++) {
            int p[N][2];
            rec r[N];
            memset(r, 0, sizeof r);
            for (int i = 0; i < N; i++) {
                CHECK_EQ(pipe2(p[i], O_CLOEXEC), 0);
                pid_t pid = spawn_cat(p[i][0]);
                CHECK_OK(ca_child_watcher_add_child_handler(w, pid, on_exit_rec, &r[i]));
            }
            double t0 = mono_s();
            for (int i = 0; i < N; i++) {
                close(p[i][0]);
                close(p[i][1]);
            }
            recs rs = {r, N};
            CHECK(t_run_until(loop, all_called, &rs, 5));
            double dt = mono_s() - t0;
            if (dt > 0.5 * t_slow())
                t_fail(__FILE__, __LINE__, "%s: round %d: delivered after %.3f s", wname[k],
                       round, dt);
            t_run_for(loop, 0.05);
            for (int i = 0; i < N; i++) {
                CHECK_EQ(atomic_load(&r[i].calls), 1);
                CHECK_EQ(atomic_load(&r[i].rc), 0);
            }
        }
        /* Other code reaps a watched child: 255 and a warning, at the slow check. */
        rec stolen = {0};
        pid_t s = watch_cat_exiting(w, &stolen);
        bool stole = reap(s) >= 0; /* MultiLoop's thread may win the race */
        if (k == W_SAFE) CHECK(stole);
        CHECK(t_run_until(loop, called, &stolen, 5));
        CHECK_EQ(atomic_load(&stolen.rc), stole ? 255 : 0);
        if (stole) {
            char needle[64];
            snprintf(needle, sizeof needle, "pid %d", (int)s);
            if (!log_has(needle)) t_fail(__FILE__, __LINE__, "%s: no log line: %s", wname[k], log_buf);
        }
        t_run_for(loop, 0.05);
        CHECK_EQ(atomic_load(&stolen.calls), 1);
        /* The other child was never reaped by the watcher. */
        int st = 0;
        CHECK_EQ(waitpid(foreign, &st, WNOHANG), foreign);
        CHECK(WIFEXITED(st) && WEXITSTATUS(st) == 4);
        wdone(w);
    }
    ca_set_log_handler(NULL, NULL);
}

/* asyncio adds the handler after the spawn returns: a short child may have exited by then, and
 * until its add it hides the exited watched children behind it. Both are delivered, once. */
LOOP_TEST(poller_handler_added_after_exit)
{
    static const int kinds[] = {W_SAFE, W_MULTILOOP};
    for (int ki = 0; ki < 2; ki++) {
        int k = kinds[ki];
        ca_child_watcher *w = wmake(k, loop);
        if (!w) continue;
        t_run_for(loop, 0.05);
        for (int round = 0; round < 5; round++) {
            int p[2];
            CHECK_EQ(pipe2(p, O_CLOEXEC), 0);
            rec late = {0}, y = {0};
            pid_t x = spawn("exit 6");
            pid_t yp = spawn_cat(p[0]);
            CHECK_OK(ca_child_watcher_add_child_handler(w, yp, on_exit_rec, &y));
            close(p[0]);
            close(p[1]);
            wait_zombie(x);
            wait_exited(yp);
            t_run_for(loop, 0.002 * (round + 1)); /* the watcher sees x first */
            CHECK_OK(ca_child_watcher_add_child_handler(w, x, on_exit_rec, &late));
            CHECK(t_run_until(loop, called, &late, 5));
            CHECK(t_run_until(loop, called, &y, 5));
            t_run_for(loop, 0.03);
            CHECK_EQ(atomic_load(&late.calls), 1);
            CHECK_EQ(atomic_load(&late.rc), 6);
            CHECK_EQ(atomic_load(&y.calls), 1);
            CHECK_EQ(atomic_load(&y.rc), 0);
        }
        wdone(w);
    }
}

/* ----- candidates checked by pid before the walk (SIGCHLD hints, newest registrations) ------- */

/* The looks (waitid(P_ALL) walks of the list of children) that Safe and MultiLoop made, and the
 * SIGCHLD hints (src/watcher.c, src/signal.c, for tests). */
unsigned long ca__watcher_looks(void);
uint64_t ca__sigchld_hint_seq(void);
int ca__sigchld_hints(uint64_t *seq, pid_t *pids, int max);

/* A host's SIGCHLD handler that routes the signal to the library: no si_pid reaches it. */
static void routing_handler(int sig)
{
    (void)sig;
    ca_sigchld_notify();
}

/* nidle idle watched children (cats on the pipe *ip made here), their exits to irec. */
static void idle_start(ca_child_watcher *w, int ip[2], rec *irec, int nidle)
{
    CHECK_EQ(pipe2(ip, O_CLOEXEC), 0);
    for (int i = 0; i < nidle; i++)
        CHECK_OK(ca_child_watcher_add_child_handler(w, spawn_cat(ip[0]), on_exit_rec, &irec[i]));
}

/* Lets idle_start's children exit: each is delivered once. */
static void idle_end(ca_loop *loop, int ip[2], rec *irec, int nidle)
{
    close(ip[0]);
    close(ip[1]);
    recs rs = {irec, nidle};
    CHECK(t_run_until(loop, all_called, &rs, 10));
    t_run_for(loop, 0.02);
    for (int i = 0; i < nidle; i++) CHECK_EQ(atomic_load(&irec[i].calls), 1);
}

/* With nidle idle watched children, `rounds` watched children exit one at a time: each is
 * delivered once, with its status, and so are the idle ones at the end. Returns the looks made
 * meanwhile (the idle ones' exits not counted), and the time it took in *secs. routed: SIGCHLD
 * comes through a host's handler (ca_sigchld_notify), as asyncio's add_signal_handler brings it
 * to Safe in Python: the watcher has no hint. */
static unsigned long looks_for_exits(ca_loop *loop, ca_child_watcher *w, int nidle, int rounds,
                                     bool routed, double *secs)
{
    struct sigaction sa, old;
    if (routed) {
        memset(&sa, 0, sizeof sa);
        sa.sa_handler = routing_handler;
        sa.sa_flags = SA_RESTART | SA_NOCLDSTOP;
        sigemptyset(&sa.sa_mask);
        CHECK_EQ(sigaction(SIGCHLD, &sa, &old), 0);
    }
    int ip[2];
    rec *irec = calloc((size_t)nidle, sizeof *irec);
    CHECK(irec != NULL);
    idle_start(w, ip, irec, nidle);
    t_run_for(loop, 0.05); /* the poll of every child that attaching asks for is done */
    unsigned long l0 = ca__watcher_looks();
    double t0 = mono_s();
    for (int i = 0; i < rounds; i++) {
        rec r = {0};
        watch_cat_exiting(w, &r);
        CHECK(t_run_until(loop, called, &r, 5));
        t_run_for(loop, 0.01);
        CHECK_EQ(atomic_load(&r.calls), 1);
        CHECK_EQ(atomic_load(&r.rc), 0);
    }
    unsigned long looks = ca__watcher_looks() - l0;
    *secs = mono_s() - t0;
    idle_end(loop, ip, irec, nidle);
    free(irec);
    if (routed) CHECK_EQ(sigaction(SIGCHLD, &old, NULL), 0);
    return looks;
}

/* An exit next to many idle watched children costs one look (the one that finds nothing left,
 * which SIGCHLD coalescing needs), not two: the exited child is found by pid first, from the
 * pid the library's SIGCHLD handler saw, or (routed, no pid) among the newest registrations. The
 * old code looked once to find the child and once more to find nothing. MultiLoop's thread also
 * looks once a second (its slow check). */
static void one_look_per_exit(ca_loop *loop, bool routed)
{
    static const int kinds[] = {W_SAFE, W_MULTILOOP};
    for (int ki = 0; ki < 2; ki++) {
        int k = kinds[ki];
        ca_child_watcher *w = wmake(k, loop);
        if (!w) continue;
        enum { ROUNDS = 10 };
        double secs;
        unsigned long looks = looks_for_exits(loop, w, NIDLE, ROUNDS, routed, &secs);
        unsigned long allowed = ROUNDS + (unsigned long)secs + 1;
        if (looks > allowed)
            t_fail(__FILE__, __LINE__, "%s%s: %lu looks for %d exits in %.2f s, want <= %lu",
                   wname[k], routed ? " (routed SIGCHLD)" : "", looks, ROUNDS, secs, allowed);
        wdone(w);
    }
}

LOOP_TEST(poller_exit_beside_idle_children_one_look) /* timeout: 60 */
{
    one_look_per_exit(loop, false);
}

LOOP_TEST(poller_routed_exit_beside_idle_children_one_look) /* timeout: 60 */
{
    one_look_per_exit(loop, true);
}

/* MultiLoop's deferred look (the one that only finds exits whose SIGCHLD coalesced with another)
 * waits twice as long after each one that found nothing, up to CA__WLOOK_DEFER_MAX_NS (32 ms):
 * a stream of exits about 12 ms apart, beside many idle children, costs a look per 32 ms, not
 * one per exit as with a fixed 2 ms. A SIGCHLD whose pid is not watched yet (the child exited
 * before its add, which reaps it) defers the look too. */
LOOP_TEST(multiloop_deferred_looks_back_off) /* timeout: 60 */
{
    ca_child_watcher *w = wmake(W_MULTILOOP, loop);
    enum { ROUNDS = 40 };
    double secs;
    unsigned long looks = looks_for_exits(loop, w, NIDLE, ROUNDS, false, &secs);
    unsigned long allowed = 6 + (unsigned long)(secs / 0.025);
    if (looks > allowed)
        t_fail(__FILE__, __LINE__, "%lu looks for %d exits in %.2f s, want <= %lu", looks,
               ROUNDS, secs, allowed);
    wdone(w);
}

/* With no more waiting registrations than the candidates (16: asyncio's subprocess tests and
 * a job runner's "16 in flight"), every one is checked by pid and no look is needed at all,
 * with and without hints: a look could meet a child whose handler is on its way, and have to
 * look again later on a timer. 14 idle and the one that exits: 15. */
LOOP_TEST(poller_few_children_no_look) /* timeout: 60 */
{
    static const int kinds[] = {W_SAFE, W_MULTILOOP};
    for (int routed = 0; routed < 2; routed++) {
        for (int ki = 0; ki < 2; ki++) {
            int k = kinds[ki];
            ca_child_watcher *w = wmake(k, loop);
            if (!w) continue;
            double secs;
            unsigned long looks = looks_for_exits(loop, w, 14, 10, routed, &secs);
            if (looks != 0)
                t_fail(__FILE__, __LINE__, "%s%s: %lu looks, want 0", wname[k],
                       routed ? " (routed SIGCHLD)" : "", looks);
            wdone(w);
        }
    }
}

/* Two watched children exit while SIGCHLD is blocked in every thread, beside many idle ones:
 * one signal comes, with one pid (they coalesce), and MultiLoop's thread reaps that one by its
 * hint and defers the look that finds the other (CA__WLOOK_DEFER_NS, 2 ms), which must come
 * long before the slow check (1 s). Safe looks at once. */
LOOP_TEST(poller_coalesced_exit_found_by_the_look) /* timeout: 60 */
{
    FOR_POLLERS(k, w) {
        int ip[2];
        rec irec[NIDLE];
        memset(irec, 0, sizeof irec);
        idle_start(w, ip, irec, NIDLE);
        t_run_for(loop, 0.05);
        sigset_t chld, old;
        sigemptyset(&chld);
        sigaddset(&chld, SIGCHLD);
        CHECK_EQ(pthread_sigmask(SIG_BLOCK, &chld, &old), 0);
        rec r[2];
        memset(r, 0, sizeof r);
        pid_t pids[2];
        int p[2];
        CHECK_EQ(pipe2(p, O_CLOEXEC), 0);
        for (int i = 0; i < 2; i++) { /* they run until the pipe closes: the adds find them */
            pids[i] = spawn_cat(p[0]);
            CHECK_OK(ca_child_watcher_add_child_handler(w, pids[i], on_exit_rec, &r[i]));
        }
        close(p[0]);
        close(p[1]);
        for (int i = 0; i < 2; i++) wait_zombie(pids[i]);
        unsigned long l0 = ca__watcher_looks();
        double t0 = mono_s();
        CHECK_EQ(pthread_sigmask(SIG_SETMASK, &old, NULL), 0); /* one SIGCHLD now */
        recs rs = {r, 2};
        CHECK(t_run_until(loop, all_called, &rs, 5));
        double took = mono_s() - t0;
        if (took > 0.5 * t_slow())
            t_fail(__FILE__, __LINE__, "%s: the coalesced exit took %.3f s", wname[k], took);
        CHECK(ca__watcher_looks() - l0 >= 1);
        for (int i = 0; i < 2; i++) {
            CHECK_EQ(atomic_load(&r[i].calls), 1);
            CHECK_EQ(atomic_load(&r[i].rc), 0);
        }
        idle_end(loop, ip, irec, NIDLE);
        wdone(w);
    }
}

/* Waits until the SIGCHLD hints since *seq hold pid (the signal may come a little after the
 * exit). */
static bool hint_seen(uint64_t *seq, pid_t pid)
{
    for (double t0 = mono_s(); mono_s() - t0 < 2 * t_slow(); sleep_s(0.001)) {
        pid_t h[64];
        int n = ca__sigchld_hints(seq, h, 64);
        for (int i = 0; i < n; i++)
            if (h[i] == pid) return true;
    }
    return false;
}

/* A hint names a child that is not watched (other code's): the watcher does not reap it, with
 * few registrations (no look) and with many (the look finds it first and cannot look past it). */
LOOP_TEST(poller_foreign_hint_not_reaped) /* timeout: 60 */
{
    static const int kinds[] = {W_SAFE, W_MULTILOOP};
    static const int idle_counts[] = {2, NIDLE};
    for (int ki = 0; ki < 2; ki++) {
        for (int ni = 0; ni < 2; ni++) {
            int k = kinds[ki], nidle = idle_counts[ni];
            ca_child_watcher *w = wmake(k, loop);
            if (!w) continue;
            int ip[2], p[2];
            CHECK_EQ(pipe2(p, O_CLOEXEC), 0);
            rec irec[NIDLE], r = {0};
            memset(irec, 0, sizeof irec);
            idle_start(w, ip, irec, nidle);
            t_run_for(loop, 0.05);
            uint64_t seq = ca__sigchld_hint_seq();
            pid_t watched = spawn_cat(p[0]);
            CHECK_OK(ca_child_watcher_add_child_handler(w, watched, on_exit_rec, &r));
            pid_t foreign = spawn("exit 3");
            wait_zombie(foreign);
            /* The library's handler saw it exit (alone: SIGCHLDs that coalesce bring one pid). */
            CHECK(hint_seen(&seq, foreign));
            close(p[0]);
            close(p[1]);
            CHECK(t_run_until(loop, called, &r, 5));
            t_run_for(loop, 0.1); /* past CA__WHIDE_NS: the poll of every child ran */
            CHECK_EQ(atomic_load(&r.calls), 1);
            CHECK_EQ(atomic_load(&r.rc), 0);
            int st = 0;
            CHECK_EQ(waitpid(foreign, &st, WNOHANG), foreign);
            CHECK(WIFEXITED(st) && WEXITSTATUS(st) == 3);
            idle_end(loop, ip, irec, nidle);
            wdone(w);
        }
    }
}

/* The hints are a broadcast: every reader sees every hint, whatever the others read; a SIGCHLD
 * that a process sent (kill) is no hint; the handler is installed with SA_SIGINFO, and the
 * disposition before it comes back exactly. */
static void nop_cb(void *arg) { (void)arg; }

LOOP_TEST(sigchld_hints_broadcast)
{
    if (strcmp(t_loop_kind, "custom") == 0) SKIP("the custom loop has no signal handlers");
    struct sigaction before, during, after;
    CHECK_EQ(sigaction(SIGCHLD, NULL, &before), 0);
    CHECK_OK(ca_loop_add_signal_handler(loop, SIGCHLD, nop_cb, NULL));
    CHECK_EQ(sigaction(SIGCHLD, NULL, &during), 0);
    CHECK(during.sa_flags & SA_SIGINFO);
    uint64_t a = ca__sigchld_hint_seq(), b = a;
    pid_t pid = spawn("exit 0");
    wait_zombie(pid);
    CHECK(hint_seen(&a, pid));
    CHECK(hint_seen(&b, pid)); /* a's read took nothing away from b */
    pid_t h[64];
    CHECK_EQ(ca__sigchld_hints(&a, h, 64), 0);
    CHECK(reap(pid) >= 0);
    kill(getpid(), SIGCHLD);
    t_run_for(loop, 0.02);
    CHECK_EQ(ca__sigchld_hints(&a, h, 64), 0);
    CHECK_OK(ca_loop_remove_signal_handler(loop, SIGCHLD));
    CHECK_EQ(sigaction(SIGCHLD, NULL, &after), 0);
    CHECK(after.sa_handler == before.sa_handler);
    CHECK_EQ(after.sa_flags & (SA_SIGINFO | SA_RESTART | SA_NOCLDSTOP),
             before.sa_flags & (SA_SIGINFO | SA_RESTART | SA_NOCLDSTOP));
}

/* ----- other code's children ---------------------------------------------------------------- */

LOOP_TEST(other_code_waitpid_and_system) /* timeout: 60 */
{
    ca_set_log_handler(log_capture, NULL);
    for (int k = 0; k < W_COUNT; k++) {
        ca_child_watcher *w = wmake(k, loop);
        if (!w) continue;
        log_reset();
        /* One watched child that keeps running, so the watcher is busy. */
        int p[2];
        CHECK_EQ(pipe2(p, O_CLOEXEC), 0);
        rec r = {0};
        pid_t watched = spawn_cat(p[0]);
        CHECK_OK(ca_child_watcher_add_child_handler(w, watched, on_exit_rec, &r));

        pid_t other = spawn("exit 5");
        wait_zombie(other);
        t_run_for(loop, 0.1); /* SIGCHLD is handled meanwhile */
        if (k == W_FAST) {
            struct gone g = {other};
            CHECK(t_run_until(loop, is_gone, &g, 5));
        }
        int st = reap(other);
        if (k == W_FAST) {
            CHECK_EQ(st, -1);
            char needle[64];
            snprintf(needle, sizeof needle, "unknown pid: %d -> 5", (int)other);
            if (!log_has(needle)) t_fail(__FILE__, __LINE__, "fast: no log line: %s", log_buf);
        } else {
            if (!(st >= 0 && WIFEXITED(st) && WEXITSTATUS(st) == 5))
                t_fail(__FILE__, __LINE__, "%s: other code's waitpid got %d", wname[k], st);
            /* system() blocks SIGCHLD in its thread and waits for its own child. */
            int s = system("exit 3");
            if (!(WIFEXITED(s) && WEXITSTATUS(s) == 3))
                t_fail(__FILE__, __LINE__, "%s: system() returned %d", wname[k], s);
        }
        close(p[0]);
        close(p[1]);
        CHECK(t_run_until(loop, called, &r, 5));
        CHECK_EQ(atomic_load(&r.rc), 0);
        wdone(w);
    }
    ca_set_log_handler(NULL, NULL);
}

/* ----- loops in several threads ---------------------------------------------------------------- */

typedef struct thr_arg {
    ca_child_watcher *w;
    int fails;
    char why[200];
} thr_arg;

#define PER_THREAD 10

static void *thr_main(void *p)
{
    thr_arg *a = p;
    ca_loop *l = NULL;
    if (t_new_loop(&l) < 0) {
        snprintf(a->why, sizeof a->why, "t_new_loop failed");
        a->fails++;
        return NULL;
    }
    ca_set_event_loop(l);
    rec r[PER_THREAD];
    memset(r, 0, sizeof r);
    for (int i = 0; i < PER_THREAD; i++) {
        char cmd[32];
        snprintf(cmd, sizeof cmd, "exit %d", i + 1);
        pid_t pid = spawn(cmd);
        int e = ca_child_watcher_add_child_handler(a->w, pid, on_exit_rec, &r[i]);
        if (e < 0) {
            snprintf(a->why, sizeof a->why, "add: %s", ca_strerror(e));
            a->fails++;
            reap(pid);
            atomic_store(&r[i].calls, 1);
            atomic_store(&r[i].rc, i + 1);
            atomic_store(&r[i].thread, (unsigned long)pthread_self());
        }
    }
    recs rs = {r, PER_THREAD};
    if (!t_run_until(l, all_called, &rs, 10)) {
        snprintf(a->why, sizeof a->why, "not all delivered");
        a->fails++;
    }
    for (int i = 0; i < PER_THREAD; i++) {
        if (atomic_load(&r[i].rc) != i + 1 || !on_this_thread(&r[i])) {
            snprintf(a->why, sizeof a->why, "child %d: rc %d, right thread %d", i,
                     atomic_load(&r[i].rc), on_this_thread(&r[i]));
            a->fails++;
        }
    }
    ca_set_event_loop(NULL);
    ca_loop_close(l);
    ca_loop_unref(l);
    return NULL;
}

LOOP_TEST(loops_in_four_threads) /* timeout: 60 */
{
    static const int kinds[] = {W_THREADED, W_MULTILOOP, W_PIDFD, W_URING};
    for (int i = 0; i < 4; i++) {
        int k = kinds[i];
        ca_child_watcher *w = NULL;
        int e = wnew(k, &w);
        if (e == -ENOSYS) continue;
        CHECK_OK(e);
        pthread_t t[4];
        thr_arg a[4];
        memset(a, 0, sizeof a);
        for (int j = 0; j < 4; j++) {
            a[j].w = w;
            CHECK_EQ(pthread_create(&t[j], NULL, thr_main, &a[j]), 0);
        }
        for (int j = 0; j < 4; j++) pthread_join(t[j], NULL);
        for (int j = 0; j < 4; j++)
            if (a[j].fails) t_fail(__FILE__, __LINE__, "%s, thread %d: %s", wname[k], j, a[j].why);
        CHECK_OK(ca_child_watcher_close(w));
        ca_child_watcher_unref(w);
    }
}

/* Pidfd's reader must be added on the delivery loop's thread. */
typedef struct runner {
    ca_loop *loop;
    atomic_int started;
} runner;

static void mark_started(void *arg) { atomic_store(&((runner *)arg)->started, 1); }

static void *run_loop_thread(void *p)
{
    runner *r = p;
    ca_loop_call_soon(r->loop, mark_started, r, NULL);
    ca_loop_run_forever(r->loop);
    return NULL;
}

LOOP_TEST(pidfd_other_thread_running_loop)
{
    ca_child_watcher *w = NULL;
    int e = ca_pidfd_child_watcher_new(&w);
    if (e == -ENOSYS) SKIP("pidfd is unavailable");
    CHECK_OK(e);
    CHECK_OK(ca_set_event_loop(loop));
    runner r = {loop, 0};
    pthread_t t;
    CHECK_EQ(pthread_create(&t, NULL, run_loop_thread, &r), 0);
    while (!atomic_load(&r.started)) sleep_s(0.001);
    pid_t pid = spawn("exit 1");
    rec rr = {0};
    CHECK_ERR(ca_child_watcher_add_child_handler(w, pid, on_exit_rec, &rr), -EPERM);
    ca_loop_stop(loop);
    pthread_join(t, NULL);
    CHECK(reap(pid) >= 0);
    wdone(w);
}

/* ----- Safe and Fast: attachment ------------------------------------------------------------- */

LOOP_TEST(safe_fast_attach_detach)
{
    static const int kinds[] = {W_SAFE, W_FAST};
    for (int i = 0; i < 2; i++) {
        int k = kinds[i];
        ca_child_watcher *w = NULL;
        CHECK_OK(wnew(k, &w));
        CHECK(!ca_child_watcher_is_active(w));
        pid_t pid = spawn("exit 6");
        rec r = {0};
        CHECK_ERR(ca_child_watcher_add_child_handler(w, pid, on_exit_rec, &r), -ENOTCONN);
        int e = ca_child_watcher_attach_loop(w, loop);
        if (e == -ENOTSUP && strcmp(t_loop_kind, "custom") == 0) {
            ca_child_watcher_unref(w);
            reap(pid);
            SKIP("the test's custom loop has no signal handlers");
        }
        CHECK_OK(e);
        CHECK(ca_child_watcher_is_active(w));
        CHECK_OK(ca_child_watcher_attach_loop(w, loop)); /* same loop: nothing to do */
        CHECK_OK(ca_child_watcher_attach_loop(w, NULL));
        CHECK(!ca_child_watcher_is_active(w));
        CHECK_ERR(ca_child_watcher_add_child_handler(w, pid, on_exit_rec, &r), -ENOTCONN);

        /* Re-attach to another loop: the exit arrives there, not on the first one. */
        ca_loop *l2 = NULL;
        CHECK_OK(t_new_loop(&l2));
        CHECK_OK(ca_child_watcher_attach_loop(w, loop));
        CHECK_OK(ca_child_watcher_enter(w));
        CHECK_OK(ca_child_watcher_add_child_handler(w, pid, on_exit_rec, &r));
        CHECK_OK(ca_child_watcher_exit(w));
        CHECK_OK(ca_child_watcher_attach_loop(w, l2));
        t_run_for(loop, 0.05);
        CHECK(t_run_until(l2, called, &r, 5));
        CHECK_EQ(atomic_load(&r.rc), 6);

        /* The attached loop closed: inactive. */
        CHECK_OK(ca_loop_close(l2));
        CHECK(!ca_child_watcher_is_active(w));
        pid = spawn("exit 1");
        CHECK_ERR(ca_child_watcher_add_child_handler(w, pid, on_exit_rec, &r), -ENOTCONN);
        CHECK(reap(pid) >= 0);
        CHECK_OK(ca_child_watcher_attach_loop(w, NULL));
        ca_loop_unref(l2);
        CHECK_OK(ca_child_watcher_close(w));
        ca_child_watcher_unref(w);
    }
}

LOOP_TEST(fast_keeps_early_exits_inside_enter_exit)
{
    ca_set_log_handler(log_capture, NULL);
    ca_child_watcher *w = wmake(W_FAST, loop);
    if (!w) SKIP("the test's custom loop has no signal handlers");
    /* Reaped before its handler comes, inside enter/exit: kept and delivered. */
    CHECK_OK(ca_child_watcher_enter(w));
    pid_t pid = spawn("exit 9");
    wait_zombie(pid);
    struct gone g = {pid};
    CHECK(t_run_until(loop, is_gone, &g, 5)); /* Fast took it */
    rec r = {0};
    CHECK_OK(ca_child_watcher_add_child_handler(w, pid, on_exit_rec, &r));
    CHECK_OK(ca_child_watcher_exit(w));
    CHECK(t_run_until(loop, called, &r, 5));
    CHECK_EQ(atomic_load(&r.rc), 9);
    CHECK(!log_has("unknown"));

    /* One that nobody registers: logged at exit(). */
    CHECK_OK(ca_child_watcher_enter(w));
    pid = spawn("exit 8");
    wait_zombie(pid);
    g.pid = pid;
    CHECK(t_run_until(loop, is_gone, &g, 5));
    CHECK(!log_has("unknown"));
    CHECK_OK(ca_child_watcher_exit(w));
    char needle[64];
    snprintf(needle, sizeof needle, "%d: 8", (int)pid);
    CHECK(log_has("unknown pids"));
    CHECK(log_has(needle));
    CHECK_ERR(ca_child_watcher_exit(w), -EINVAL);
    wdone(w);
    ca_set_log_handler(NULL, NULL);
}

/* n `cat` children reading the new pipe p[0], each watched by w into r[i] (zeroed first). */
static void watch_cats(ca_child_watcher *w, int p[2], pid_t *pids, rec *r, int n)
{
    CHECK_EQ(pipe2(p, O_CLOEXEC), 0);
    memset(r, 0, sizeof *r * (size_t)n);
    for (int i = 0; i < n; i++) {
        pids[i] = spawn_cat(p[0]);
        CHECK_OK(ca_child_watcher_add_child_handler(w, pids[i], on_exit_rec, &r[i]));
    }
}

/* ----- close ---------------------------------------------------------------------------------- */

LOOP_TEST(close_with_children_running)
{
    for (int k = 0; k < W_COUNT; k++) {
        ca_child_watcher *w = wmake(k, loop);
        if (!w) continue;
        int p[2];
        rec r[3];
        pid_t pids[3];
        watch_cats(w, p, pids, r, 3);
        CHECK_OK(ca_child_watcher_close(w));
        CHECK_OK(ca_child_watcher_close(w)); /* idempotent */
        CHECK(!ca_child_watcher_is_active(w));
        CHECK_ERR(ca_child_watcher_add_child_handler(w, pids[0], on_exit_rec, &r[0]), -EBADF);
        CHECK_ERR(ca_child_watcher_remove_child_handler(w, pids[0]), -EBADF);
        CHECK_ERR(ca_child_watcher_attach_loop(w, loop), -EBADF);
        ca_child_watcher_unref(w);
        for (int i = 0; i < 3; i++) kill(pids[i], SIGKILL);
        close(p[0]);
        close(p[1]);
        for (int i = 0; i < 3; i++) reap(pids[i]); /* Threaded's threads may win */
        t_run_for(loop, 0.05);
        for (int i = 0; i < 3; i++) CHECK_EQ(atomic_load(&r[i].calls), 0);
        CHECK_OK(ca_set_event_loop(NULL));
    }
}

/* The delivery loop is closed before the exit arrives: a warning, no leak, no fd left. */
LOOP_TEST(loop_closed_before_exit)
{
    ca_set_log_handler(log_capture, NULL);
    for (int k = 0; k < W_COUNT; k++) {
        ca_loop *l = NULL;
        CHECK_OK(t_new_loop(&l));
        ca_child_watcher *w = wmake(k, l);
        if (!w) {
            ca_set_event_loop(NULL);
            ca_loop_unref(l);
            continue;
        }
        log_reset();
        int p[2];
        CHECK_EQ(pipe2(p, O_CLOEXEC), 0);
        rec r = {0};
        pid_t pid = spawn_cat(p[0]);
        CHECK_OK(ca_child_watcher_add_child_handler(w, pid, on_exit_rec, &r));
        /* A second child that has exited and, for threaded ones, been posted already. */
        rec r2 = {0};
        pid_t pid2 = spawn("exit 1");
        CHECK_OK(ca_child_watcher_add_child_handler(w, pid2, on_exit_rec, &r2));
        wait_exited(pid2);
        sleep_s(0.05);
        CHECK_OK(ca_set_event_loop(NULL));
        CHECK_OK(ca_loop_close(l));
        /* Its exit can never be delivered now: remove says so (1), as the subprocess code,
         * which owns the child, expects from its own close hook. */
        CHECK_EQ(ca_child_watcher_remove_child_handler(w, pid2), 1);
        close(p[0]);
        close(p[1]);
        if (k == W_THREADED || k == W_MULTILOOP) {
            double t0 = ca_loop_time(loop);
            char needle[64];
            snprintf(needle, sizeof needle, "pid %d", (int)pid);
            while (!log_has(needle) && ca_loop_time(loop) - t0 < 5 * t_slow()) sleep_s(0.01);
            if (!log_has(needle)) t_fail(__FILE__, __LINE__, "%s: no warning: %s", wname[k], log_buf);
        } else {
            reap(pid);
            reap(pid2);
        }
        CHECK_EQ(atomic_load(&r.calls), 0);
        CHECK_EQ(atomic_load(&r2.calls), 0);
        CHECK_OK(ca_child_watcher_close(w));
        ca_child_watcher_unref(w);
        ca_loop_unref(l);
        reap(pid);
        reap(pid2);
    }
    ca_set_log_handler(NULL, NULL);
}

/* ----- SIGCHLD disposition ----------------------------------------------------------------- */

static void dummy_handler(int sig) { (void)sig; }

static void check_disposition(void (*want)(int), int line)
{
    struct sigaction sa;
    sigaction(SIGCHLD, NULL, &sa);
    if (sa.sa_handler != want)
        t_fail(__FILE__, line, "SIGCHLD disposition is not the expected one");
}

LOOP_TEST(sigchld_disposition_restored)
{
    ca_set_log_handler(log_capture, NULL);
    for (int k = 0; k < W_COUNT; k++) {
        struct sigaction sa;
        memset(&sa, 0, sizeof sa);
        sa.sa_handler = dummy_handler;
        sigaction(SIGCHLD, &sa, NULL);
        ca_child_watcher *w = wmake(k, loop);
        if (!w) continue;
        wdone(w);
        check_disposition(dummy_handler, __LINE__);

        /* Inherited SIG_IGN (bpo-32115): children must not vanish while a watcher is active. */
        log_reset();
        sa.sa_handler = SIG_IGN;
        sigaction(SIGCHLD, &sa, NULL);
        w = wmake(k, loop);
        CHECK(log_has("SIG_IGN"));
        struct sigaction cur;
        sigaction(SIGCHLD, NULL, &cur);
        CHECK(cur.sa_handler != SIG_IGN);
        rec r = {0};
        CHECK_OK(ca_child_watcher_enter(w));
        pid_t pid = spawn("exit 7");
        CHECK_OK(ca_child_watcher_add_child_handler(w, pid, on_exit_rec, &r));
        CHECK_OK(ca_child_watcher_exit(w));
        CHECK(t_run_until(loop, called, &r, 5));
        if (atomic_load(&r.rc) != 7)
            t_fail(__FILE__, __LINE__, "%s: rc %d under SIG_IGN", wname[k], atomic_load(&r.rc));
        wdone(w);
        check_disposition(SIG_IGN, __LINE__);
        sa.sa_handler = SIG_DFL;
        sigaction(SIGCHLD, &sa, NULL);
    }
    ca_set_log_handler(NULL, NULL);
}

/* ----- bad input, custom watchers, fork ------------------------------------------------------ */

static void never_cb(pid_t pid, int rc, void *arg) { (void)pid, (void)rc, (void)arg; }

TEST(bad_input)
{
    CHECK_ERR(ca_child_watcher_add_child_handler(NULL, 1, never_cb, NULL), -EINVAL);
    CHECK_ERR(ca_child_watcher_remove_child_handler(NULL, 1), -EINVAL);
    CHECK_ERR(ca_child_watcher_attach_loop(NULL, NULL), -EINVAL);
    CHECK_ERR(ca_child_watcher_close(NULL), -EINVAL);
    CHECK_ERR(ca_child_watcher_enter(NULL), -EINVAL);
    CHECK_ERR(ca_child_watcher_exit(NULL), -EINVAL);
    CHECK(!ca_child_watcher_is_active(NULL));
    CHECK(ca_child_watcher_unref(NULL) == NULL);
    CHECK(ca_child_watcher_data(NULL) == NULL);
    CHECK_ERR(ca_threaded_child_watcher_new(NULL), -EINVAL);
    CHECK_ERR(ca_child_watcher_new_custom(NULL, NULL, NULL), -EINVAL);
    for (int k = 0; k < W_COUNT; k++) {
        ca_child_watcher *w = NULL;
        int e = wnew(k, &w);
        if (e == -ENOSYS) continue;
        CHECK_OK(e);
        CHECK_ERR(ca_child_watcher_add_child_handler(w, 0, never_cb, NULL), -EINVAL);
        CHECK_ERR(ca_child_watcher_add_child_handler(w, -5, never_cb, NULL), -EINVAL);
        CHECK_ERR(ca_child_watcher_add_child_handler(w, 1234, NULL, NULL), -EINVAL);
        CHECK_ERR(ca_child_watcher_remove_child_handler(w, 0), -EINVAL);
        CHECK_EQ(ca_child_watcher_remove_child_handler(w, 1234), 0);
        CHECK_OK(ca_child_watcher_close(w));
        CHECK_ERR(ca_child_watcher_add_child_handler(w, 0, never_cb, NULL), -EINVAL);
        CHECK_ERR(ca_child_watcher_add_child_handler(w, 1234, never_cb, NULL), -EBADF);
        CHECK_ERR(ca_child_watcher_remove_child_handler(w, 1234), -EBADF);
        CHECK_ERR(ca_child_watcher_attach_loop(w, NULL), -EBADF);
        CHECK_ERR(ca_child_watcher_enter(w), -EBADF);
        CHECK_ERR(ca_child_watcher_exit(w), -EBADF);
        CHECK(!ca_child_watcher_is_active(w));
        CHECK_OK(ca_child_watcher_close(w));
        CHECK(ca_child_watcher_ref(w) == w);
        ca_child_watcher_unref(w);
        ca_child_watcher_unref(w);
    }
    CHECK_OK(ca_set_event_loop(NULL));
}

/* No current loop in a thread: -ENOENT for the ones that deliver to the caller's loop. */
static void *no_loop_thread(void *p)
{
    ca_child_watcher *w = p;
    return (void *)(intptr_t)ca_child_watcher_add_child_handler(w, 1, never_cb, NULL);
}

TEST(no_loop_in_thread)
{
    static const int kinds[] = {W_THREADED, W_MULTILOOP, W_PIDFD, W_URING};
    for (int i = 0; i < 4; i++) {
        ca_child_watcher *w = NULL;
        int e = wnew(kinds[i], &w);
        if (e == -ENOSYS) continue;
        CHECK_OK(e);
        pthread_t t;
        void *res;
        CHECK_EQ(pthread_create(&t, NULL, no_loop_thread, w), 0);
        pthread_join(t, &res);
        CHECK_EQ((int)(intptr_t)res, -ENOENT);
        ca_child_watcher_unref(w);
    }
}

typedef struct custom_state {
    int add, remove, attach, active, close, enter, exit, destroy;
    pid_t last_pid;
    ca_loop *last_loop;
} custom_state;

static int c_add(ca_child_watcher *w, pid_t pid, ca_child_fn cb, void *arg)
{
    custom_state *s = ca_child_watcher_data(w);
    s->add++;
    s->last_pid = pid;
    cb(pid, 42, arg);
    return 0;
}
static int c_remove(ca_child_watcher *w, pid_t pid)
{
    ((custom_state *)ca_child_watcher_data(w))->remove++;
    return pid == 77;
}
static int c_attach(ca_child_watcher *w, ca_loop *loop)
{
    custom_state *s = ca_child_watcher_data(w);
    s->attach++;
    s->last_loop = loop;
    return 0;
}
static bool c_active(ca_child_watcher *w)
{
    ((custom_state *)ca_child_watcher_data(w))->active++;
    return true;
}
static int c_close(ca_child_watcher *w)
{
    ((custom_state *)ca_child_watcher_data(w))->close++;
    return 0;
}
static int c_enter(ca_child_watcher *w)
{
    ((custom_state *)ca_child_watcher_data(w))->enter++;
    return 0;
}
static int c_exit(ca_child_watcher *w)
{
    ((custom_state *)ca_child_watcher_data(w))->exit++;
    return 0;
}
static void c_destroy(ca_child_watcher *w)
{
    ((custom_state *)ca_child_watcher_data(w))->destroy++;
}

TEST(custom_watcher_dispatch)
{
    static const ca_child_watcher_ops ops = {
        .add_child_handler = c_add,
        .remove_child_handler = c_remove,
        .attach_loop = c_attach,
        .is_active = c_active,
        .close = c_close,
        .enter = c_enter,
        .exit = c_exit,
        .destroy = c_destroy,
    };
    static const ca_child_watcher_ops no_add = {.remove_child_handler = c_remove,
                                                .is_active = c_active};
    custom_state s = {0};
    ca_child_watcher *w = NULL;
    CHECK_ERR(ca_child_watcher_new_custom(&no_add, &s, &w), -EINVAL);
    CHECK(w == NULL);
    CHECK_OK(ca_child_watcher_new_custom(&ops, &s, &w));
    CHECK(ca_child_watcher_data(w) == &s);
    rec r = {0};
    CHECK_OK(ca_child_watcher_add_child_handler(w, 55, on_exit_rec, &r));
    CHECK_EQ(s.add, 1);
    CHECK_EQ(s.last_pid, 55);
    CHECK_EQ(atomic_load(&r.rc), 42);
    CHECK_ERR(ca_child_watcher_add_child_handler(w, 0, on_exit_rec, &r), -EINVAL);
    CHECK_EQ(s.add, 1); /* checked before the op */
    CHECK_EQ(ca_child_watcher_remove_child_handler(w, 77), 1);
    CHECK_EQ(ca_child_watcher_remove_child_handler(w, 78), 0);
    CHECK_EQ(s.remove, 2);
    ca_loop *l = (ca_loop *)&s; /* only compared, never used */
    CHECK_OK(ca_child_watcher_attach_loop(w, l));
    CHECK(s.last_loop == l);
    CHECK(ca_child_watcher_is_active(w));
    CHECK_OK(ca_child_watcher_enter(w));
    CHECK_OK(ca_child_watcher_exit(w));
    CHECK_EQ(s.enter, 1);
    CHECK_EQ(s.exit, 1);
    CHECK_OK(ca_child_watcher_close(w));
    CHECK_OK(ca_child_watcher_close(w));
    CHECK_EQ(s.close, 1);
    CHECK_ERR(ca_child_watcher_add_child_handler(w, 55, on_exit_rec, &r), -EBADF);
    CHECK_EQ(s.add, 1);
    CHECK(!ca_child_watcher_is_active(w));
    CHECK_EQ(s.destroy, 0);
    ca_child_watcher_unref(w);
    CHECK_EQ(s.destroy, 1);
    CHECK_EQ(s.close, 1);

    /* Optional members left NULL: nothing to do. Last unref closes first. */
    static const ca_child_watcher_ops minimal = {
        .add_child_handler = c_add,
        .remove_child_handler = c_remove,
        .is_active = c_active,
        .close = c_close,
    };
    memset(&s, 0, sizeof s);
    CHECK_OK(ca_child_watcher_new_custom(&minimal, &s, &w));
    CHECK_OK(ca_child_watcher_attach_loop(w, NULL));
    CHECK_OK(ca_child_watcher_enter(w));
    CHECK_OK(ca_child_watcher_exit(w));
    ca_child_watcher_unref(w);
    CHECK_EQ(s.close, 1);
}

LOOP_TEST(forked_child_gets_echild)
{
    for (int k = 0; k < W_COUNT; k++) {
        ca_child_watcher *w = wmake(k, loop);
        if (!w) continue;
        fflush(NULL);
        pid_t pid = fork();
        CHECK(pid >= 0);
        if (pid == 0) {
            int bad = 0;
            bad += ca_child_watcher_add_child_handler(w, 1, never_cb, NULL) != -ECHILD;
            bad += ca_child_watcher_remove_child_handler(w, 1) != -ECHILD;
            bad += ca_child_watcher_attach_loop(w, NULL) != -ECHILD;
            bad += ca_child_watcher_enter(w) != -ECHILD;
            bad += ca_child_watcher_is_active(w);
            bad += ca_child_watcher_close(w) != 0;
            ca_child_watcher_unref(w);
            t_child_exit(bad);
        }
        int st = reap(pid);
        if (!(st >= 0 && WIFEXITED(st) && WEXITSTATUS(st) == 0))
            t_fail(__FILE__, __LINE__, "%s: forked child status %d", wname[k], st);
        CHECK(ca_child_watcher_is_active(w));
        wdone(w);
    }
}

/* Out of fds: Pidfd says so, and the child is still ours to reap (never silently lost). */
LOOP_TEST(pidfd_emfile_is_an_error)
{
    ca_child_watcher *w = wmake(W_PIDFD, loop);
    if (!w) SKIP("pidfd is unavailable");
    pid_t pid = spawn("exit 3");
    struct rlimit old, low;
    CHECK_EQ(getrlimit(RLIMIT_NOFILE, &old), 0);
    /* Fill the fd table up to a low limit. */
    int fds[64], nfds = 0;
    low = old;
    int probe = dup(0);
    CHECK(probe >= 0);
    close(probe);
    low.rlim_cur = (rlim_t)probe + 8;
    CHECK_EQ(setrlimit(RLIMIT_NOFILE, &low), 0);
    for (;;) {
        int fd = dup(0);
        if (fd < 0) break;
        CHECK(nfds < 64);
        fds[nfds++] = fd;
    }
    rec r = {0};
    CHECK_ERR(ca_child_watcher_add_child_handler(w, pid, on_exit_rec, &r), -EMFILE);
    for (int i = 0; i < nfds; i++) close(fds[i]);
    CHECK_EQ(setrlimit(RLIMIT_NOFILE, &old), 0);
    t_run_for(loop, 0.02);
    CHECK_EQ(atomic_load(&r.calls), 0);
    int st = reap(pid);
    CHECK(st >= 0 && WIFEXITED(st) && WEXITSTATUS(st) == 3);
    wdone(w);
}

/* Pidfd: removed from another thread while its loop runs: never called, fd released there. */
LOOP_TEST(pidfd_remove_from_other_thread)
{
    ca_child_watcher *w = wmake(W_PIDFD, loop);
    if (!w) SKIP("pidfd is unavailable");
    int p[2];
    CHECK_EQ(pipe2(p, O_CLOEXEC), 0);
    pid_t pid = spawn_cat(p[0]);
    rec r = {0};
    CHECK_OK(ca_child_watcher_add_child_handler(w, pid, on_exit_rec, &r));
    runner rn = {loop, 0};
    pthread_t t;
    CHECK_EQ(pthread_create(&t, NULL, run_loop_thread, &rn), 0);
    while (!atomic_load(&rn.started)) sleep_s(0.001);
    CHECK_EQ(ca_child_watcher_remove_child_handler(w, pid), 1);
    close(p[0]);
    close(p[1]);
    wait_zombie(pid);
    sleep_s(0.05);
    ca_loop_stop(loop);
    pthread_join(t, NULL);
    CHECK_EQ(atomic_load(&r.calls), 0);
    int st = reap(pid); /* a removed child is not reaped by Pidfd */
    CHECK(st >= 0 && WIFEXITED(st) && WEXITSTATUS(st) == 0);
    wdone(w); /* the harness checks that the pidfd is gone */
}

/* Safe and Fast: handlers added from another thread while the attached loop runs here. */
typedef struct adder {
    ca_child_watcher *w;
    rec r[5];
    int err;
} adder;

static void *adder_main(void *p)
{
    adder *a = p;
    for (int i = 0; i < 5; i++) {
        char cmd[32];
        snprintf(cmd, sizeof cmd, "exit %d", 20 + i);
        ca_child_watcher_enter(a->w);
        pid_t pid = spawn(cmd);
        int e = ca_child_watcher_add_child_handler(a->w, pid, on_exit_rec, &a->r[i]);
        ca_child_watcher_exit(a->w);
        if (e < 0) {
            a->err = e;
            reap(pid);
        }
    }
    return NULL;
}

LOOP_TEST(safe_fast_add_from_other_thread)
{
    static const int kinds[] = {W_SAFE, W_FAST};
    for (int i = 0; i < 2; i++) {
        ca_child_watcher *w = wmake(kinds[i], loop);
        if (!w) SKIP("the test's custom loop has no signal handlers");
        adder a;
        memset(&a, 0, sizeof a);
        a.w = w;
        pthread_t t;
        CHECK_EQ(pthread_create(&t, NULL, adder_main, &a), 0);
        recs rs = {a.r, 5};
        bool ok = t_run_until(loop, all_called, &rs, 10);
        pthread_join(t, NULL);
        CHECK_OK(a.err);
        CHECK(ok);
        for (int j = 0; j < 5; j++) {
            CHECK_EQ(atomic_load(&a.r[j].rc), 20 + j);
            CHECK_EQ(atomic_load(&a.r[j].calls), 1);
            CHECK(on_this_thread(&a.r[j]));
        }
        wdone(w);
    }
}

/* Removal races with delivery: remove answering 1 means never called, 0 means called once. */
#define RACE_N 40

typedef struct racer {
    ca_child_watcher *w;
    pid_t pids[RACE_N];
    int removed[RACE_N];
    atomic_int go, done;
} racer;

static void *racer_main(void *p)
{
    racer *rc = p;
    while (!atomic_load(&rc->go)) sleep_s(0.0005);
    for (int i = 0; i < RACE_N; i += 2) {
        rc->removed[i] = ca_child_watcher_remove_child_handler(rc->w, rc->pids[i]);
        sleep_s(0.0002 * (i % 5));
    }
    atomic_store(&rc->done, 1);
    return NULL;
}

static void start_racer(void *arg) { atomic_store(&((racer *)arg)->go, 1); }

static bool racer_done(void *arg) { return atomic_load(&((racer *)arg)->done) != 0; }

LOOP_TEST(remove_races_with_delivery) /* timeout: 60 */
{
    ca_set_log_handler(log_capture, NULL); /* Fast logs the removed children it reaps */
    for (int k = 0; k < W_COUNT; k++) {
        ca_child_watcher *w = wmake(k, loop);
        if (!w) continue;
        racer rc;
        memset(&rc, 0, sizeof rc);
        rc.w = w;
        rec r[RACE_N];
        memset(r, 0, sizeof r);
        int p[2];
        CHECK_EQ(pipe2(p, O_CLOEXEC), 0);
        for (int i = 0; i < RACE_N; i++) {
            CHECK_OK(ca_child_watcher_enter(w));
            rc.pids[i] = spawn_fds("read x; exit 1", p[0]);
            CHECK_OK(ca_child_watcher_add_child_handler(w, rc.pids[i], on_exit_rec, &r[i]));
            CHECK_OK(ca_child_watcher_exit(w));
        }
        pthread_t t;
        CHECK_EQ(pthread_create(&t, NULL, racer_main, &rc), 0);
        close(p[0]);
        close(p[1]); /* they all exit now, while the racer removes every other one */
        CHECK_OK(ca_loop_call_soon(loop, start_racer, &rc, NULL));
        CHECK(t_run_until(loop, racer_done, &rc, 10));
        pthread_join(t, NULL);
        /* Everything not removed gets delivered. */
        for (int i = 0; i < RACE_N; i++) {
            if (rc.removed[i] == 1) continue;
            CHECK(t_run_until(loop, called, &r[i], 10));
        }
        t_run_for(loop, 0.05);
        for (int i = 0; i < RACE_N; i++) {
            int calls = atomic_load(&r[i].calls);
            if (rc.removed[i] == 1 && calls != 0)
                t_fail(__FILE__, __LINE__, "%s: child %d removed (1) but called", wname[k], i);
            if (rc.removed[i] == 0 && calls != 1)
                t_fail(__FILE__, __LINE__, "%s: child %d: %d calls", wname[k], i, calls);
            if (calls) CHECK_EQ(atomic_load(&r[i].rc), 1);
        }
        wdone(w);
        for (int i = 0; i < RACE_N; i++)
            if (rc.removed[i] == 1) reap(rc.pids[i]);
    }
}

/* Threaded: one waiting thread per child, named after its pid, gone once the child exited. */
static bool thread_named(const char *name)
{
    DIR *d = opendir("/proc/self/task");
    if (!d) return false;
    bool found = false;
    struct dirent *e;
    while (!found && (e = readdir(d)) != NULL) {
        if (e->d_name[0] == '.') continue;
        char path[300], comm[32];
        snprintf(path, sizeof path, "/proc/self/task/%s/comm", e->d_name);
        FILE *f = fopen(path, "r");
        if (!f) continue;
        if (fgets(comm, sizeof comm, f) && strncmp(comm, name, strlen(name)) == 0) found = true;
        fclose(f);
    }
    closedir(d);
    return found;
}

TEST(threaded_thread_per_child_named_after_pid)
{
    ca_loop *loop = NULL;
    CHECK_OK(ca_selector_loop_new(&loop));
    ca_child_watcher *w = wmake(W_THREADED, loop);
    int p[2];
    CHECK_EQ(pipe2(p, O_CLOEXEC), 0);
    pid_t pid = spawn_cat(p[0]);
    rec r = {0};
    CHECK_OK(ca_child_watcher_add_child_handler(w, pid, on_exit_rec, &r));
    char name[16];
    snprintf(name, sizeof name, "ca-wait-%d", (int)pid);
    double t0 = ca_loop_time(loop);
    while (!thread_named(name) && ca_loop_time(loop) - t0 < 2 * t_slow()) sleep_s(0.005);
    CHECK(thread_named(name));
    close(p[0]);
    close(p[1]);
    CHECK(t_run_until(loop, called, &r, 5));
    CHECK_EQ(atomic_load(&r.rc), 0);
    t0 = ca_loop_time(loop);
    while (thread_named(name) && ca_loop_time(loop) - t0 < 2 * t_slow()) sleep_s(0.005);
    CHECK(!thread_named(name));
    wdone(w);
    CHECK_OK(ca_loop_close(loop));
    ca_loop_unref(loop);
}

/* Threaded calls out of the library (the log handler here; a loop's op likewise) on its posting
 * thread, which has a full stack: the waiting threads' stacks are 1 KiB (32 KiB before: a
 * Python logging handler on 3.8 overflowed it). The handler uses 512 KiB of stack, page by page
 * from the top, so that a small stack faults at its guard page. */
static atomic_int big_logs;
static void big_stack_log(int level, const char *msg, void *arg)
{
    (void)level;
    (void)msg;
    (void)arg;
    volatile char buf[512 * 1024];
    for (long i = (long)sizeof buf - 1; i >= 0; i -= 1024) buf[i] = (char)i;
    atomic_fetch_add(&big_logs, buf[0] == 0 ? 1 : 1);
}

TEST(threaded_log_handler_gets_a_full_stack)
{
    atomic_store(&big_logs, 0);
    ca_set_log_handler(big_stack_log, NULL);
    ca_loop *loop = NULL;
    CHECK_OK(ca_selector_loop_new(&loop));
    ca_child_watcher *w = wmake(W_THREADED, loop);
    /* Reaped by us first: the watcher's thread finds no child, logs it and reports 255. */
    pid_t pid = spawn("exit 3");
    CHECK(reap(pid) >= 0);
    rec r = {0};
    CHECK_OK(ca_child_watcher_add_child_handler(w, pid, on_exit_rec, &r));
    CHECK(t_run_until(loop, called, &r, 5));
    CHECK_EQ(atomic_load(&r.rc), 255);
    CHECK(atomic_load(&big_logs) >= 1);
    ca_set_log_handler(NULL, NULL);
    wdone(w);
    CHECK_OK(ca_loop_close(loop));
    ca_loop_unref(loop);
}

/* Resident memory per waiting thread: raw kernel threads on 1 KiB stacks (header: about 1 KiB
 * per child, against 8.5 KiB for a glibc thread on the smallest stack). Not under the
 * sanitizers (glibc threads there) nor valgrind (its own memory). */
static long rss_kib(void)
{
    FILE *f = fopen("/proc/self/statm", "r");
    long size = 0, res = 0;
    if (f) {
        if (fscanf(f, "%ld %ld", &size, &res) != 2) res = 0;
        fclose(f);
    }
    return res * (sysconf(_SC_PAGESIZE) / 1024);
}

TEST(threaded_waiting_threads_cost_about_a_kib)
{
#if defined(T_SANITIZED)
    SKIP("the sanitizers' builds use glibc threads");
#endif
    const char *pre = getenv("LD_PRELOAD");
    if (pre && strstr(pre, "vgpreload")) SKIP("valgrind");
    enum { N = 256 };
    ca_loop *loop = NULL;
    CHECK_OK(ca_selector_loop_new(&loop));
    ca_child_watcher *w = wmake(W_THREADED, loop);
    int p[2];
    CHECK_EQ(pipe2(p, O_CLOEXEC), 0);
    static rec r[N + 1];
    memset(r, 0, sizeof r);
    static pid_t pids[N + 1];
    /* One first: the posting thread and the first chunk of stacks are not per child. */
    pids[N] = spawn_cat(p[0]);
    CHECK_OK(ca_child_watcher_add_child_handler(w, pids[N], on_exit_rec, &r[N]));
    for (int i = 0; i < N; i++) pids[i] = spawn_cat(p[0]);
    int t0 = t_count_threads();
    long base = rss_kib();
    for (int i = 0; i < N; i++)
        CHECK_OK(ca_child_watcher_add_child_handler(w, pids[i], on_exit_rec, &r[i]));
    double start = ca_loop_time(loop);
    while (t_count_threads() < t0 + N && ca_loop_time(loop) - start < 5 * t_slow()) sleep_s(0.005);
    CHECK(t_count_threads() >= t0 + N); /* one waiting thread per child */
    long per = (rss_kib() - base) * 1024 / N;
    close(p[0]);
    close(p[1]);
    for (int i = 0; i <= N; i++) CHECK(t_run_until(loop, called, &r[i], 10));
    if (per > 3 * 1024) t_fail(__FILE__, __LINE__, "%ld bytes resident per waiting thread", per);
    wdone(w);
    CHECK_OK(ca_loop_close(loop));
    ca_loop_unref(loop);
}

/* A sandbox that refuses our raw clone (a seccomp filter: EPERM for a thread made without
 * CLONE_SETTLS, as glibc's never is) gets glibc waiting threads instead: adds still succeed,
 * exits still arrive, the threads are still named after their pid. */
TEST(threaded_glibc_threads_when_raw_clone_is_refused)
{
    const char *pre = getenv("LD_PRELOAD");
    if (pre && strstr(pre, "vgpreload")) SKIP("valgrind makes threads its own way");
    struct sock_filter prog[] = {
        BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr)),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, __NR_clone, 0, 4),
        BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, args[0])),
        BPF_JUMP(BPF_JMP | BPF_JSET | BPF_K, CLONE_THREAD, 0, 2),
        BPF_JUMP(BPF_JMP | BPF_JSET | BPF_K, CLONE_SETTLS, 1, 0),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ERRNO | (EPERM & SECCOMP_RET_DATA)),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
    };
    struct sock_fprog fprog = {.len = sizeof prog / sizeof prog[0], .filter = prog};
    CHECK_OK(prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0));
    CHECK_OK(prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &fprog, 0, 0));
    ca_loop *loop = NULL;
    CHECK_OK(ca_selector_loop_new(&loop));
    ca_child_watcher *w = wmake(W_THREADED, loop);
    int p[2];
    rec r[3];
    pid_t pids[3];
    watch_cats(w, p, pids, r, 3);
    char name[16];
    snprintf(name, sizeof name, "ca-wait-%d", (int)pids[2]);
    double t0 = ca_loop_time(loop);
    while (!thread_named(name) && ca_loop_time(loop) - t0 < 2 * t_slow()) sleep_s(0.005);
    CHECK(thread_named(name));
    close(p[0]);
    close(p[1]);
    for (int i = 0; i < 3; i++) {
        CHECK(t_run_until(loop, called, &r[i], 5));
        CHECK_EQ(atomic_load(&r[i].rc), 0);
    }
    wdone(w);
    CHECK_OK(ca_loop_close(loop));
    ca_loop_unref(loop);
}

/* A forked child of a process whose Threaded watcher has waiting threads (they stay in the
 * parent) starts its own posting and waiting threads for a new watcher: its exits arrive. */
TEST(threaded_new_watcher_in_a_forked_child)
{
#if defined(T_TSAN)
    SKIP("ThreadSanitizer starts no thread after a fork of a threaded process");
#elif defined(T_SANITIZED)
    /* A thread started in the parent just before the fork leaves AddressSanitizer's own
     * thread bookkeeping locked in the child now and then (gcc 12's runtime): the child's new
     * threads then block before their first line. */
    SKIP("AddressSanitizer's runtime is not fork-safe while threads start");
#endif
    ca_loop *loop = NULL;
    CHECK_OK(ca_selector_loop_new(&loop));
    ca_child_watcher *w = wmake(W_THREADED, loop);
    int p[2];
    CHECK_EQ(pipe2(p, O_CLOEXEC), 0);
    pid_t waiting = spawn_cat(p[0]);
    rec r = {0};
    CHECK_OK(ca_child_watcher_add_child_handler(w, waiting, on_exit_rec, &r));
    pid_t pid = fork();
    if (pid == 0) {
        int bad = 0;
        ca_loop *l2 = NULL;
        ca_child_watcher *w2 = NULL;
        if (ca_selector_loop_new(&l2) < 0 || ca_threaded_child_watcher_new(&w2) < 0) t_child_exit(100);
        if (ca_set_event_loop(l2) < 0) t_child_exit(101);
        for (int i = 0; i < 3 && !bad; i++) {
            rec r2 = {0};
            pid_t c = spawn("exit 7");
            if (ca_child_watcher_add_child_handler(w2, c, on_exit_rec, &r2) < 0) bad = 1;
            else if (!t_run_until(l2, called, &r2, 5)) bad = 2;
            else if (atomic_load(&r2.rc) != 7) bad = 3;
        }
        ca_child_watcher_close(w2);
        ca_child_watcher_unref(w2);
        ca_set_event_loop(NULL);
        ca_loop_close(l2);
        ca_loop_unref(l2);
        t_child_exit(bad);
    }
    CHECK(pid > 0);
    int st = reap(pid);
    CHECK(WIFEXITED(st));
    CHECK_EQ(WEXITSTATUS(st), 0);
    close(p[0]);
    close(p[1]);
    CHECK(t_run_until(loop, called, &r, 5));
    CHECK_EQ(atomic_load(&r.rc), 0);
    wdone(w);
    CHECK_OK(ca_loop_close(loop));
    ca_loop_unref(loop);
}

/* Pidfd watching a plain pid (not one of our subprocesses) opens a pidfd of its own and closes
 * it itself: on remove, and once the exit is delivered. */
static int pidfds_open(void)
{
    DIR *d = opendir("/proc/self/fd");
    CHECK(d != NULL);
    int n = 0, self = dirfd(d);
    struct dirent *e;
    while ((e = readdir(d)) != NULL) {
        int fd = atoi(e->d_name);
        if (e->d_name[0] == '.' || fd == self) continue;
        char path[64], link[64];
        snprintf(path, sizeof path, "/proc/self/fd/%d", fd);
        ssize_t k = readlink(path, link, sizeof link - 1);
        if (k <= 0) continue;
        link[k] = 0;
        n += strcmp(link, "anon_inode:[pidfd]") == 0 || strncmp(link, "pidfd:", 6) == 0;
    }
    closedir(d);
    return n;
}

LOOP_TEST(pidfd_plain_pid_owns_its_fd)
{
    ca_child_watcher *w = wmake(W_PIDFD, loop);
    if (!w) SKIP("pidfd is unavailable");
    CHECK_EQ(pidfds_open(), 0);
    pid_t pid = spawn("exit 6");
    rec r = {0};
    CHECK_OK(ca_child_watcher_add_child_handler(w, pid, on_exit_rec, &r));
    CHECK_EQ(pidfds_open(), 1);
    CHECK_EQ(ca_child_watcher_remove_child_handler(w, pid), 1);
    CHECK_EQ(pidfds_open(), 0);
    wait_zombie(pid);
    CHECK_OK(ca_child_watcher_add_child_handler(w, pid, on_exit_rec, &r));
    CHECK_EQ(pidfds_open(), 1);
    CHECK(t_run_until(loop, called, &r, 10));
    CHECK_EQ(atomic_load(&r.rc), 6);
    CHECK_EQ(pidfds_open(), 0);
    wdone(w);
}
