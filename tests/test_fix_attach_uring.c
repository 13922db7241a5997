/*
 * Two fixes of the fault sweep's findings (docs/testing.md):
 *
 * 3. The Uring watcher's reader used to grow an array with realloc for the exits it read, and
 *    dropped an exit (leaving the child a zombie) when that failed. Here every allocation of
 *    the loop's thread fails while the exits are read and delivered: they must all come, once,
 *    with their statuses, and every child must be reaped. malloc, calloc and realloc are
 *    interposed in this test program (over glibc's __libc_*); the sanitizers own malloc, so
 *    there that test skips.
 *
 * 5. The default policy's ca_set_event_loop in the main thread attaches the policy's watcher to
 *    the new loop. A Safe watcher attached by another thread to that thread's loop, which it
 *    runs, must stay there: the main thread must not take the SIGCHLD handler off a loop that
 *    thread may be running at any moment (TSan saw that race in the soak). set_event_loop
 *    still sets the loop and answers 0; an explicit attach_loop gives -EPERM while the loop
 *    runs; once that loop is closed, set_event_loop moves the watcher again.
 */
#include "harness.h"

#include <fcntl.h>
#include <pthread.h>
#include <spawn.h>
#include <stdatomic.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

extern char **environ;

/* ----- finding 3: the Uring watcher's delivery without memory ------------------------------ */

static atomic_bool armed;
static pthread_t armed_thread;

#ifndef T_SANITIZED
/* Fails in the armed thread only: the other threads (the watchdog) allocate as usual. */
static bool fail_now(void)
{
    return atomic_load_explicit(&armed, memory_order_acquire) &&
           pthread_equal(pthread_self(), armed_thread);
}

void *__libc_malloc(size_t n);
void *__libc_calloc(size_t k, size_t n);
void *__libc_realloc(void *p, size_t n);

void *malloc(size_t n)
{
    if (fail_now()) {
        errno = ENOMEM;
        return NULL;
    }
    return __libc_malloc(n);
}

void *calloc(size_t k, size_t n)
{
    if (fail_now()) {
        errno = ENOMEM;
        return NULL;
    }
    return __libc_calloc(k, n);
}

void *realloc(void *p, size_t n)
{
    if (fail_now()) {
        errno = ENOMEM;
        return NULL;
    }
    return __libc_realloc(p, n);
}
#endif

#define N 24
static atomic_int calls[N];
static int rcs[N];
static atomic_int done;
static atomic_bool finished, timed_out;
static ca_loop *ur_loop;

static void stop_cb(void *arg) { ca_loop_stop(arg); }

static void ur_exit_cb(pid_t pid, int rc, void *arg)
{
    int i = (int)(intptr_t)arg;
    rcs[i] = rc;
    atomic_fetch_add(&calls[i], 1);
    if (atomic_fetch_add(&done, 1) + 1 == N) ca_loop_stop(ur_loop);
}

/* Stops the loop (from its own, healthy thread) if the exits have not all come in time. */
static void *watchdog(void *arg)
{
    double left = 20.0 * t_slow();
    while (!atomic_load(&finished) && left > 0) {
        struct timespec ts = {0, 10 * 1000 * 1000};
        nanosleep(&ts, NULL);
        left -= 0.01;
    }
    if (!atomic_load(&finished)) {
        atomic_store(&timed_out, true);
        atomic_store(&armed, false);
        ca_loop_call_soon_threadsafe(ur_loop, stop_cb, ur_loop);
    }
    return NULL;
}

static int ur_lines;
static void count_lines(int level, const char *msg, void *arg) { ur_lines++; }

TEST(uring_exits_delivered_without_memory) /* timeout: 60 */
{
#ifdef T_SANITIZED
    SKIP("the sanitizers own malloc: no interposition");
#endif
    ca_child_watcher *w;
    int r = ca_uring_child_watcher_new(&w);
    if (r == -ENOSYS) SKIP("no io_uring WAITID here");
    CHECK_OK(r);
    ca_set_log_handler(count_lines, NULL);
    CHECK_OK(ca_selector_loop_new(&ur_loop));
    CHECK_OK(ca_set_event_loop(ur_loop));
    /* The children wait for EOF on a pipe, so that they all exit at once, while armed. */
    int p[2];
    CHECK(pipe2(p, O_CLOEXEC) == 0);
    posix_spawn_file_actions_t fa;
    CHECK(posix_spawn_file_actions_init(&fa) == 0);
    CHECK(posix_spawn_file_actions_adddup2(&fa, p[0], 0) == 0);
    pid_t pids[N];
    for (int i = 0; i < N; i++) {
        char arg[40];
        snprintf(arg, sizeof arg, "read x; exit %d", i);
        char *argv[] = {"sh", "-c", arg, NULL};
        CHECK(posix_spawn(&pids[i], "/bin/sh", &fa, NULL, argv, environ) == 0);
        CHECK_OK(ca_child_watcher_add_child_handler(w, pids[i], ur_exit_cb, (void *)(intptr_t)i));
    }
    posix_spawn_file_actions_destroy(&fa);
    close(p[0]);
    t_run_for(ur_loop, 0.05); /* the ring's reader is on, the loop's arrays are grown */
    CHECK_EQ(atomic_load(&done), 0);

    pthread_t t;
    CHECK(pthread_create(&t, NULL, watchdog, NULL) == 0);
    armed_thread = pthread_self();
    atomic_store(&armed, true);
    void *(*volatile m)(size_t) = malloc;
    void *probe = m(32);
    bool interposed = probe == NULL;
    free(probe);
    close(p[1]); /* every child exits now */
    r = ca_loop_run_forever(ur_loop);
    atomic_store(&armed, false);
    atomic_store(&finished, true);
    pthread_join(t, NULL);
    CHECK(interposed); /* the allocations did fail while the exits were read */
    CHECK_OK(r);
    CHECK(!atomic_load(&timed_out));
    t_run_for(ur_loop, 0.1); /* a duplicate would come now */
    for (int i = 0; i < N; i++) {
        CHECK_EQ(atomic_load(&calls[i]), 1);
        CHECK_EQ(rcs[i], i);
        /* Reaped after its callback: no zombie is left. */
        CHECK_EQ(waitpid(pids[i], NULL, WNOHANG), -1);
        CHECK_EQ(errno, ECHILD);
    }
    CHECK_EQ(ur_lines, 0);
    CHECK_OK(ca_child_watcher_close(w));
    ca_child_watcher_unref(w);
    CHECK_OK(ca_set_event_loop(NULL));
    CHECK_OK(ca_loop_close(ur_loop));
    ca_loop_unref(ur_loop);
    ca_set_log_handler(NULL, NULL);
}

/* ----- finding 5: the main thread's implicit attach leaves another thread's loop alone ------ */

static ca_child_watcher *safe_w;
static ca_loop *b_loop;
static atomic_bool b_ready, b_stop, b_closed, b_failed, b_holding, b_release;
static pthread_t b_thread;
static atomic_int b_calls, b_rc, b_on_b;

static void b_exit_cb(pid_t pid, int rc, void *arg)
{
    atomic_store(&b_rc, rc);
    atomic_store(&b_on_b, pthread_equal(pthread_self(), b_thread));
    atomic_fetch_add(&b_calls, 1);
}

static void hold_cb(void *arg)
{
    atomic_store(&b_holding, true);
    while (!atomic_load(&b_release)) sched_yield();
}

/* Thread B: attaches the Safe watcher to its own loop, then runs it in short bursts (so that it
 * keeps starting and stopping, the pattern of the soak's watcher thread) until told to stop;
 * then closes it. */
static void *thread_b(void *arg)
{
    if (ca_selector_loop_new(&b_loop) < 0 || ca_child_watcher_attach_loop(safe_w, b_loop) < 0) {
        atomic_store(&b_failed, true);
        atomic_store(&b_ready, true);
        return NULL;
    }
    atomic_store(&b_ready, true);
    /* First a callback that holds B's loop running until the main thread has asked. */
    if (ca_loop_call_soon(b_loop, hold_cb, NULL, NULL) < 0 ||
        ca_loop_call_soon(b_loop, stop_cb, b_loop, NULL) < 0 || ca_loop_run_forever(b_loop) < 0)
        atomic_store(&b_failed, true);
    while (!atomic_load(&b_stop)) {
        if (ca_loop_call_later(b_loop, 0.001, stop_cb, b_loop, NULL) < 0 ||
            ca_loop_run_forever(b_loop) < 0)
            atomic_store(&b_failed, true);
    }
    if (ca_loop_close(b_loop) < 0) atomic_store(&b_failed, true);
    atomic_store(&b_closed, true);
    return NULL;
}

static bool b_called(void *arg) { return atomic_load(&b_calls) > 0; }

static pid_t spawn_exit7(void)
{
    char *argv[] = {"sh", "-c", "exit 7", NULL};
    pid_t pid = -1;
    CHECK(posix_spawn(&pid, "/bin/sh", NULL, NULL, argv, environ) == 0);
    return pid;
}

TEST(set_event_loop_leaves_other_threads_safe_watcher)
{
    CHECK_OK(ca_safe_child_watcher_new(&safe_w));
    CHECK_OK(ca_set_child_watcher(safe_w)); /* the policy's watcher; not attached yet */
    b_thread = (pthread_t)0;
    CHECK(pthread_create(&b_thread, NULL, thread_b, NULL) == 0);
    while (!atomic_load(&b_ready)) sched_yield();
    CHECK(!atomic_load(&b_failed));

    ca_loop *m1, *m2;
    CHECK_OK(ca_selector_loop_new(&m1));
    CHECK_OK(ca_selector_loop_new(&m2));
    /* While B's loop is surely running (B is in hold_cb): an explicit attach gives -EPERM and
     * set_event_loop sets the loop, answers 0 and leaves the watcher on B's loop. */
    while (!atomic_load(&b_holding)) sched_yield();
    CHECK_ERR(ca_child_watcher_attach_loop(safe_w, m1), -EPERM);
    CHECK_ERR(ca_child_watcher_attach_loop(safe_w, NULL), -EPERM);
    CHECK_OK(ca_set_event_loop(m1));
    ca_loop *cur = NULL;
    CHECK_OK(ca_get_event_loop(&cur));
    CHECK(cur == m1);
    atomic_store(&b_release, true);
    /* The main thread switches its loop again and again while B runs its loop in bursts (the
     * soak's pattern: B's loop is often between two runs): the watcher stays on B's loop,
     * attached there by B, and nothing of B's loop is touched from here. */
    for (int i = 0; i < 300; i++) CHECK_OK(ca_set_event_loop(i % 2 ? m2 : m1));
    CHECK_OK(ca_get_event_loop(&cur));
    CHECK(cur == m2);
    CHECK(ca_child_watcher_is_active(safe_w));

    /* The watcher still delivers on B's loop, in B. */
    pid_t pid = spawn_exit7();
    CHECK_OK(ca_child_watcher_add_child_handler(safe_w, pid, b_exit_cb, NULL));
    double deadline = 10.0 * t_slow();
    while (!b_called(NULL) && deadline > 0) {
        struct timespec ts = {0, 5 * 1000 * 1000};
        nanosleep(&ts, NULL);
        deadline -= 0.005;
    }
    CHECK_EQ(atomic_load(&b_calls), 1);
    CHECK_EQ(atomic_load(&b_rc), 7);
    CHECK(atomic_load(&b_on_b));

    /* B closes its loop and ends: now set_event_loop moves the watcher to the main thread's
     * loop, where the next exit is delivered. */
    atomic_store(&b_stop, true);
    pthread_join(b_thread, NULL);
    CHECK(!atomic_load(&b_failed));
    CHECK(!ca_child_watcher_is_active(safe_w));
    CHECK_OK(ca_set_event_loop(m1));
    CHECK(ca_child_watcher_is_active(safe_w));
    atomic_store(&b_calls, 0);
    b_thread = pthread_self();
    pid = spawn_exit7();
    CHECK_OK(ca_child_watcher_add_child_handler(safe_w, pid, b_exit_cb, NULL));
    CHECK(t_run_until(m1, b_called, NULL, 10.0));
    CHECK_EQ(atomic_load(&b_rc), 7);

    CHECK_OK(ca_set_child_watcher(NULL)); /* closes safe_w */
    CHECK_OK(ca_set_event_loop(NULL));
    CHECK_OK(ca_loop_close(m1));
    CHECK_OK(ca_loop_close(m2));
    ca_loop_unref(m1);
    ca_loop_unref(m2);
    ca_loop_unref(b_loop);
    ca_child_watcher_unref(safe_w);
}
