/*
 * Child watchers under faults (issues 13 and 16): SIGCHLD taken away by foreign code, a foreign
 * handler left in place by close, fork while another thread holds the SIGCHLD keep-lock, Fast
 * with children that other code reaps, the signals a loop must refuse.
 */
#include "harness.h"

#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <spawn.h>
#include <stdatomic.h>
#include <sys/wait.h>
#include <time.h>

extern char **environ;

static pid_t spawn_exit(int code)
{
    char arg[32];
    snprintf(arg, sizeof arg, "exit %d", code);
    char *argv[] = {"sh", "-c", arg, NULL};
    pid_t pid;
    if (posix_spawn(&pid, "/bin/sh", NULL, NULL, argv, environ) != 0) return -1;
    return pid;
}

/* ----- the fault signals ------------------------------------------------------------------- */

static void nop(void *arg) {}

LOOP_TEST(signal_handler_refuses_fault_signals)
{
    const int sigs[] = {SIGSEGV, SIGBUS, SIGFPE, SIGILL, SIGKILL, SIGSTOP};
    for (size_t i = 0; i < sizeof sigs / sizeof sigs[0]; i++) {
        int r = ca_loop_add_signal_handler(loop, sigs[i], nop, NULL);
        /* A custom loop without signal handlers says -ENOTSUP only for valid signals. */
        CHECK_ERR(r, -EINVAL);
    }
    if (strcmp(t_loop_kind, "custom") != 0) {
        CHECK_OK(ca_loop_add_signal_handler(loop, SIGUSR1, nop, NULL));
        CHECK_EQ(ca_loop_remove_signal_handler(loop, SIGUSR1), 1);
    }
}

/* ----- SIGCHLD taken away ----------------------------------------------------------------- */

static atomic_int warnings;
static char last_warning[512];

static void count_log(int level, const char *msg, void *arg)
{
    if (level >= CA_LOG_WARNING && strstr(msg, "SIGCHLD no longer reaches")) {
        atomic_fetch_add(&warnings, 1);
        snprintf(last_warning, sizeof last_warning, "%s", msg);
    }
}

/* A foreign handler that does not chain to the previous one. */
static atomic_int foreign_calls;
static void foreign_handler(int sig) { atomic_fetch_add(&foreign_calls, 1); }

static void install_foreign(struct sigaction *old)
{
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = foreign_handler;
    sa.sa_flags = SA_RESTART | SA_NOCLDSTOP;
    sigemptyset(&sa.sa_mask);
    CHECK(sigaction(SIGCHLD, &sa, old) == 0);
}

static bool is_foreign_installed(void)
{
    struct sigaction cur;
    CHECK(sigaction(SIGCHLD, NULL, &cur) == 0);
    return cur.sa_handler == foreign_handler;
}

#define NKIDS 40
static int got_rc[NKIDS];
static atomic_int got;

static void on_exit_cb(pid_t pid, int rc, void *arg)
{
    got_rc[(intptr_t)arg] = rc;
    atomic_fetch_add(&got, 1);
}

static bool all_got(void *arg) { return atomic_load(&got) == NKIDS; }

/* Every exit still comes, within bounded time, after a foreign non-chaining SIGCHLD handler
 * replaced the library's; a warning says so once; closing leaves the foreign handler. */
static void taken_away(ca_loop *loop, ca_child_watcher *w, bool attach)
{
    atomic_store(&got, 0);
    atomic_store(&warnings, 0);
    ca_set_log_handler(count_log, NULL);
    if (attach) CHECK_OK(ca_child_watcher_attach_loop(w, loop));
    /* The check that attach_loop posts runs now, before any child exists: after this, only
     * the slow check can find the exits. */
    t_run_for(loop, 0.05);
    struct sigaction old;
    install_foreign(&old);
    CHECK_OK(ca_set_event_loop(loop));
    /* The children exit only once every handler is added (they wait for the pipe's end), so
     * that no add finds its child exited already: only the slow check can see them. */
    int gate[2];
    CHECK(pipe2(gate, O_CLOEXEC) == 0);
    CHECK(fcntl(gate[0], F_SETFD, 0) == 0);
    char fd[16];
    snprintf(fd, sizeof fd, "%d", gate[0]);
    for (int i = 0; i < NKIDS; i++) {
        char script[64];
        snprintf(script, sizeof script, "read x <&$0; exit %d", i % 5);
        char *argv[] = {"sh", "-c", script, fd, NULL};
        pid_t pid;
        CHECK(posix_spawn(&pid, "/bin/sh", NULL, NULL, argv, environ) == 0);
        CHECK_OK(ca_child_watcher_add_child_handler(w, pid, on_exit_cb, (void *)(intptr_t)i));
    }
    close(gate[1]);
    close(gate[0]);
    CHECK(t_run_until(loop, all_got, NULL, 20.0));
    for (int i = 0; i < NKIDS; i++) CHECK_EQ(got_rc[i], i % 5);
    CHECK_EQ(atomic_load(&warnings), 1);
    CHECK(atomic_load(&foreign_calls) > 0);
    CHECK_OK(ca_child_watcher_close(w));
    CHECK(is_foreign_installed()); /* not SIG_DFL over it */
    ca_child_watcher_unref(w);
    CHECK_OK(ca_set_event_loop(NULL));
    sigaction(SIGCHLD, &old, NULL);
    ca_set_log_handler(NULL, NULL);
}

TEST(multiloop_sigchld_taken_away) /* timeout: 60 */
{
    ca_loop *loop;
    ca_child_watcher *w;
    CHECK_OK(ca_selector_loop_new(&loop));
    CHECK_OK(ca_multiloop_child_watcher_new(&w));
    taken_away(loop, w, false);
    CHECK_OK(ca_loop_close(loop));
    ca_loop_unref(loop);
}

TEST(safe_sigchld_taken_away) /* timeout: 60 */
{
    ca_loop *loop;
    ca_child_watcher *w;
    CHECK_OK(ca_selector_loop_new(&loop));
    CHECK_OK(ca_safe_child_watcher_new(&w));
    taken_away(loop, w, true);
    CHECK_OK(ca_loop_close(loop));
    ca_loop_unref(loop);
}

TEST(fast_sigchld_taken_away) /* timeout: 60 */
{
    ca_loop *loop;
    ca_child_watcher *w;
    CHECK_OK(ca_selector_loop_new(&loop));
    CHECK_OK(ca_fast_child_watcher_new(&w));
    taken_away(loop, w, true);
    CHECK_OK(ca_loop_close(loop));
    ca_loop_unref(loop);
}

/* A host that routes SIGCHLD itself with ca_sigchld_notify: no warning, every exit. */
static void routing_handler(int sig) { ca_sigchld_notify(); }

TEST(multiloop_sigchld_notify_routes) /* timeout: 60 */
{
    ca_loop *loop;
    ca_child_watcher *w;
    atomic_store(&got, 0);
    atomic_store(&warnings, 0);
    ca_set_log_handler(count_log, NULL);
    CHECK_OK(ca_selector_loop_new(&loop));
    CHECK_OK(ca_multiloop_child_watcher_new(&w));
    struct sigaction sa, old;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = routing_handler;
    sa.sa_flags = SA_RESTART | SA_NOCLDSTOP;
    sigemptyset(&sa.sa_mask);
    CHECK(sigaction(SIGCHLD, &sa, &old) == 0);
    ca_sigchld_notify(); /* the host says it routes SIGCHLD, before any child exits */
    for (int i = 0; i < NKIDS; i++) {
        pid_t pid = spawn_exit(3);
        CHECK(pid > 0);
        CHECK_OK(ca_child_watcher_add_child_handler_on(w, loop, pid, on_exit_cb,
                                                       (void *)(intptr_t)i));
    }
    CHECK(t_run_until(loop, all_got, NULL, 20.0));
    for (int i = 0; i < NKIDS; i++) CHECK_EQ(got_rc[i], 3);
    CHECK_EQ(atomic_load(&warnings), 0);
    CHECK_OK(ca_child_watcher_close(w));
    struct sigaction cur;
    CHECK(sigaction(SIGCHLD, NULL, &cur) == 0);
    CHECK(cur.sa_handler == routing_handler);
    ca_child_watcher_unref(w);
    sigaction(SIGCHLD, &old, NULL);
    CHECK_OK(ca_loop_close(loop));
    ca_loop_unref(loop);
    ca_set_log_handler(NULL, NULL);
}

/* Closing a loop whose signal handler is the last one puts the saved disposition back only
 * over the library's own handler. */
TEST(signal_close_leaves_foreign_handler)
{
    ca_loop *loop;
    CHECK_OK(ca_selector_loop_new(&loop));
    CHECK_OK(ca_loop_add_signal_handler(loop, SIGCHLD, nop, NULL));
    struct sigaction old;
    install_foreign(&old);
    CHECK_EQ(ca_loop_remove_signal_handler(loop, SIGCHLD), 1);
    CHECK(is_foreign_installed());
    sigaction(SIGCHLD, &old, NULL);
    CHECK_OK(ca_loop_close(loop));
    ca_loop_unref(loop);
}

/* ----- add_child_handler_on's rules --------------------------------------------------------- */

static void never(pid_t pid, int rc, void *arg) { CHECK(!"never called"); }
static int cw_add(ca_child_watcher *w, pid_t pid, ca_child_fn cb, void *arg) { return 0; }
static int cw_remove(ca_child_watcher *w, pid_t pid) { return 0; }
static bool cw_active(ca_child_watcher *w) { return true; }

TEST(add_on_errors)
{
    ca_loop *loop, *other;
    CHECK_OK(ca_selector_loop_new(&loop));
    CHECK_OK(ca_selector_loop_new(&other));
    ca_child_watcher *safe;
    CHECK_OK(ca_safe_child_watcher_new(&safe));
    /* Not attached, or another loop than the attached one: -EINVAL. */
    CHECK_ERR(ca_child_watcher_add_child_handler_on(safe, loop, 1234, never, NULL), -EINVAL);
    CHECK_OK(ca_child_watcher_attach_loop(safe, loop));
    CHECK_ERR(ca_child_watcher_add_child_handler_on(safe, other, 1234, never, NULL), -EINVAL);
    CHECK_OK(ca_child_watcher_close(safe));
    ca_child_watcher_unref(safe);
    /* A closed loop: -EBADF. */
    ca_child_watcher *thr;
    CHECK_OK(ca_threaded_child_watcher_new(&thr));
    CHECK_OK(ca_loop_close(other));
    CHECK_ERR(ca_child_watcher_add_child_handler_on(thr, other, 1234, never, NULL), -EBADF);
    CHECK_ERR(ca_child_watcher_add_child_handler_on(NULL, loop, 1234, never, NULL), -EINVAL);
    CHECK_OK(ca_child_watcher_close(thr));
    ca_child_watcher_unref(thr);
    /* A custom watcher has no loop argument: -ENOTSUP. */
    static const ca_child_watcher_ops ops = {
        .add_child_handler = cw_add,
        .remove_child_handler = cw_remove,
        .is_active = cw_active,
    };
    ca_child_watcher *cw;
    CHECK_OK(ca_child_watcher_new_custom(&ops, NULL, &cw));
    CHECK_ERR(ca_child_watcher_add_child_handler_on(cw, loop, 1234, never, NULL), -ENOTSUP);
    ca_child_watcher_unref(cw);
    ca_loop_unref(other);
    CHECK_OK(ca_loop_close(loop));
    ca_loop_unref(loop);
}

/* A delivery loop given explicitly gets the exit even though nothing runs in C terms in the
 * adding thread and it is not the current loop. */
static void *add_from_thread(void *arg)
{
    void **a = arg;
    pid_t pid = spawn_exit(9);
    if (pid > 0)
        a[2] = (void *)(intptr_t)ca_child_watcher_add_child_handler_on(a[0], a[1], pid,
                                                                         on_exit_cb, 0);
    return NULL;
}

static bool got_one(void *arg) { return atomic_load(&got) == 1; }

TEST(add_on_from_another_thread)
{
    int (*makers[])(ca_child_watcher **) = {ca_threaded_child_watcher_new,
                                            ca_multiloop_child_watcher_new,
                                            ca_pidfd_child_watcher_new};
    for (size_t k = 0; k < 3; k++) {
        ca_loop *loop;
        ca_child_watcher *w;
        CHECK_OK(ca_selector_loop_new(&loop));
        int r = makers[k](&w);
        if (r == -ENOSYS) {
            ca_loop_unref(loop);
            continue;
        }
        CHECK_OK(r);
        atomic_store(&got, 0);
        got_rc[0] = -1;
        void *a[3] = {w, loop, (void *)(intptr_t)-1};
        pthread_t t;
        CHECK(pthread_create(&t, NULL, add_from_thread, a) == 0);
        pthread_join(t, NULL);
        CHECK_EQ((intptr_t)a[2], 0);
        CHECK(t_run_until(loop, got_one, NULL, 10.0));
        CHECK_EQ(got_rc[0], 9);
        CHECK_OK(ca_child_watcher_close(w));
        ca_child_watcher_unref(w);
        CHECK_OK(ca_loop_close(loop));
        ca_loop_unref(loop);
    }
}

/* ----- fork while the keep-lock is busy ---------------------------------------------------- */

/* The library's SIGCHLD keep-lock (watcher.c), taken by every watcher that becomes active. */
void ca__sigchld_keep_acquire(void);
void ca__sigchld_keep_release(void);

static atomic_bool hammer_stop;

static void *hammer(void *arg)
{
    /* Every Threaded watcher made and closed takes and releases the SIGCHLD keep-lock. */
    while (!atomic_load(&hammer_stop)) {
        ca_child_watcher *w;
        if (ca_threaded_child_watcher_new(&w) == 0) ca_child_watcher_unref(w);
    }
    return NULL;
}

TEST(fork_while_keep_lock_busy) /* timeout: 60 */
{
    pthread_t t;
    CHECK(pthread_create(&t, NULL, hammer, NULL) == 0);
    int hung = 0;
    double started = t_now();
    for (int i = 0; t_stress_go_on(i, 3, 150, started, 10); i++) {
        pid_t pid = fork();
        CHECK(pid >= 0);
        if (pid == 0) {
            /* Takes the keep-lock in the child (as any new watcher there does): it hangs if a
             * parent's thread held it at the fork. Called directly, without the allocations
             * of a watcher: the sanitizers' allocators do not survive a fork() that another
             * thread's malloc was in. */
            ca__sigchld_keep_acquire();
            ca__sigchld_keep_release();
            t_child_exit(0);
        }
        int status = 0;
        pid_t r = 0;
        for (int ms = 0; ms < (int)(5000 * t_slow()) && r == 0; ms++) {
            r = waitpid(pid, &status, WNOHANG);
            if (r == 0) {
                struct timespec ts = {0, 1000000};
                nanosleep(&ts, NULL);
            }
        }
        if (r == 0) {
            hung++;
            kill(pid, SIGKILL);
            waitpid(pid, &status, 0);
        } else {
            CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0);
        }
    }
    atomic_store(&hammer_stop, true);
    pthread_join(t, NULL);
    CHECK_EQ(hung, 0);
}

/* ----- Fast and foreign reaps ---------------------------------------------------------------- */

#define NFAST 300
static atomic_int fast_calls[NFAST];
static int fast_rc[NFAST];
static atomic_int fast_done;

static void fast_cb(pid_t pid, int rc, void *arg)
{
    int i = (int)(intptr_t)arg;
    fast_rc[i] = rc;
    if (atomic_fetch_add(&fast_calls[i], 1) == 0) atomic_fetch_add(&fast_done, 1);
}

static bool fast_all(void *arg) { return atomic_load(&fast_done) == NFAST; }

static pid_t fast_pids[NFAST];
static atomic_int foreign_reaped;

/* Reaps every even-numbered child itself, as other code in the process would. */
static void *foreign_reaper(void *arg)
{
    for (int i = 0; i < NFAST; i += 2) {
        int st;
        if (waitpid(fast_pids[i], &st, 0) == fast_pids[i]) atomic_fetch_add(&foreign_reaped, 1);
    }
    return NULL;
}

static void quiet(int level, const char *msg, void *arg) {}

TEST(fast_reports_foreign_reaps) /* timeout: 90 */
{
    ca_set_log_handler(quiet, NULL);
    ca_loop *loop;
    ca_child_watcher *w;
    CHECK_OK(ca_selector_loop_new(&loop));
    CHECK_OK(ca_fast_child_watcher_new(&w));
    CHECK_OK(ca_child_watcher_attach_loop(w, loop));
    /* The children wait for their handler to be added (they read a pipe that stays open until
     * then), so that every one is registered before anybody reaps it. */
    int gate[2];
    CHECK(pipe2(gate, O_CLOEXEC) == 0);
    CHECK(fcntl(gate[0], F_SETFD, 0) == 0); /* the children read it; only we may write */
    for (int i = 0; i < NFAST; i++) {
        char fd[16];
        snprintf(fd, sizeof fd, "%d", gate[0]);
        char *argv[] = {"sh", "-c", "read x <&$0; exit 5", fd, NULL};
        CHECK(posix_spawn(&fast_pids[i], "/bin/sh", NULL, NULL, argv, environ) == 0);
        CHECK_OK(ca_child_watcher_add_child_handler(w, fast_pids[i], fast_cb,
                                                    (void *)(intptr_t)i));
    }
    pthread_t t;
    CHECK(pthread_create(&t, NULL, foreign_reaper, NULL) == 0);
    close(gate[1]);
    close(gate[0]);
    CHECK(t_run_until(loop, fast_all, NULL, 60.0));
    pthread_join(t, NULL);
    t_run_for(loop, 0.3); /* a duplicate would come now */
    int n255 = 0;
    for (int i = 0; i < NFAST; i++) {
        CHECK_EQ(atomic_load(&fast_calls[i]), 1);
        if (fast_rc[i] == 255) n255++;
        else CHECK_EQ(fast_rc[i], 5);
    }
    /* Each child the foreign thread reaped was reported 255 (the others it found reaped). */
    CHECK_EQ(n255, atomic_load(&foreign_reaped));
    if (getenv("CA_TEST_VERBOSE")) printf("foreign reaps: %d\n", n255);
    CHECK_OK(ca_child_watcher_close(w));
    ca_child_watcher_unref(w);
    CHECK_OK(ca_loop_close(loop));
    ca_loop_unref(loop);
    ca_set_log_handler(NULL, NULL);
}

/* ----- the delivery loop while another thread replaces the policy (issue 16, item 2) -------- */

static atomic_bool policy_stop;

static void *replace_policies(void *arg)
{
    while (!atomic_load(&policy_stop)) {
        ca_policy *p;
        if (ca_default_policy_new(&p) == 0) {
            ca_set_event_loop_policy(p);
            ca_policy_unref(p);
        }
    }
    return NULL;
}

static atomic_int stress_exits;
static void count_exit(pid_t pid, int rc, void *arg) { atomic_fetch_add(&stress_exits, 1); }

TEST(add_while_policy_replaced) /* timeout: 60 */
{
    ca_set_log_handler(quiet, NULL); /* exits posted to loops closed meanwhile are logged */
    int (*makers[])(ca_child_watcher **) = {ca_threaded_child_watcher_new,
                                            ca_multiloop_child_watcher_new,
                                            ca_pidfd_child_watcher_new};
    for (size_t k = 0; k < 3; k++) {
        ca_child_watcher *w;
        int r = makers[k](&w);
        if (r == -ENOSYS) continue;
        CHECK_OK(r);
        atomic_store(&policy_stop, false);
        pthread_t t;
        CHECK(pthread_create(&t, NULL, replace_policies, NULL) == 0);
        struct timespec t0, t1;
        clock_gettime(CLOCK_MONOTONIC, &t0);
        int n = 0;
        do {
            /* No loop set in the main thread: the delivery loop is the policy's own, which
             * the other thread's replacement frees as soon as nothing else holds it. */
            pid_t pid = spawn_exit(0);
            CHECK(pid > 0);
            r = ca_child_watcher_add_child_handler(w, pid, count_exit, NULL);
            CHECK(r == 0 || r == -ENOENT);
            /* The loop is nobody's to run: take the child back and reap it. */
            if (r == 0 && ca_child_watcher_remove_child_handler(w, pid) == 1) {
                while (waitpid(pid, NULL, 0) < 0 && errno == EINTR) {
                }
            } else if (r < 0) {
                waitpid(pid, NULL, 0);
            }
            n++;
            clock_gettime(CLOCK_MONOTONIC, &t1);
        } while ((t1.tv_sec - t0.tv_sec) + (t1.tv_nsec - t0.tv_nsec) / 1e9 < 1.0);
        atomic_store(&policy_stop, true);
        pthread_join(t, NULL);
        /* Enough rounds to mean something; valgrind runs the threads one at a time, and the
         * replacing thread may hold the only slot for most of the second there. */
        if (t_slow() > 1) CHECK(n > 0);
        else CHECK(n > 10);
        CHECK_OK(ca_child_watcher_close(w));
        ca_child_watcher_unref(w);
        /* A fresh policy: the last one's main-thread loop goes with it. */
        ca_policy *p;
        CHECK_OK(ca_default_policy_new(&p));
        CHECK_OK(ca_set_event_loop_policy(p));
        ca_policy_unref(p);
    }
    /* Threaded's threads end once their (reaped) child is gone: give them a moment. */
    struct timespec ts = {0, 200000000};
    nanosleep(&ts, NULL);
    while (waitpid(-1, NULL, WNOHANG) > 0) {
    }
    ca_set_log_handler(NULL, NULL);
}
