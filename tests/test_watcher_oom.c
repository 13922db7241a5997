/*
 * A watcher's delivery under allocation failure (issue 16, item 4). malloc and realloc are
 * interposed in this test program (local wrappers over glibc's __libc_malloc/__libc_realloc)
 * and fail, while armed, in the Threaded watcher's waiting threads only ("ca-wait-PID"): the
 * child is reaped there, and then the post of its exit to a built-in loop cannot grow the
 * loop's queue. The exit must still come, once, with its status. The sanitizers own malloc, so
 * there the test skips; the release and debug builds (and valgrind) run it.
 */
#include "harness.h"

#include <pthread.h>
#include <spawn.h>
#include <stdatomic.h>
#include <sys/prctl.h>
#include <time.h>

extern char **environ;

static atomic_bool armed;
static atomic_int failures;

#ifndef T_SANITIZED
/* In a waiting thread of the Threaded watcher? prctl reads the name without allocating. */
static bool in_wait_thread(void)
{
    char name[17] = {0};
    if (prctl(PR_GET_NAME, name, 0, 0, 0) != 0) return false;
    return strncmp(name, "ca-wait-", 8) == 0;
}

static bool fail_now(void)
{
    if (!atomic_load_explicit(&armed, memory_order_relaxed) || !in_wait_thread()) return false;
    atomic_fetch_add(&failures, 1);
    return true;
}

void *__libc_malloc(size_t n);
void *__libc_realloc(void *p, size_t n);

void *malloc(size_t n)
{
    if (fail_now()) {
        errno = ENOMEM;
        return NULL;
    }
    return __libc_malloc(n);
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

#define N 16
static atomic_int calls[N];
static int rcs[N];
static atomic_int done;

static void on_exit_cb(pid_t pid, int rc, void *arg)
{
    int i = (int)(intptr_t)arg;
    rcs[i] = rc;
    if (atomic_fetch_add(&calls[i], 1) == 0) atomic_fetch_add(&done, 1);
}

static bool all_done(void *arg) { return atomic_load(&done) == N; }

static void *heal_later(void *arg)
{
    struct timespec ts = {0, 400 * 1000 * 1000};
    nanosleep(&ts, NULL);
    atomic_store(&armed, false);
    return NULL;
}

static int lines;
static void count_lines(int level, const char *msg, void *arg) { lines++; }

TEST(threaded_exit_survives_enomem_post) /* timeout: 60 */
{
#ifdef T_SANITIZED
    SKIP("the sanitizers own malloc: no interposition");
#endif
    ca_set_log_handler(count_lines, NULL);
    ca_loop *loop;
    ca_child_watcher *w;
    CHECK_OK(ca_selector_loop_new(&loop)); /* fresh: its thread-safe queue has no room yet */
    CHECK_OK(ca_threaded_child_watcher_new(&w));
    CHECK_OK(ca_set_event_loop(loop));
    atomic_store(&armed, true);
    for (int i = 0; i < N; i++) {
        char arg[24];
        snprintf(arg, sizeof arg, "exit %d", i);
        char *argv[] = {"sh", "-c", arg, NULL};
        pid_t pid;
        CHECK(posix_spawn(&pid, "/bin/sh", NULL, NULL, argv, environ) == 0);
        CHECK_OK(ca_child_watcher_add_child_handler(w, pid, on_exit_cb, (void *)(intptr_t)i));
    }
    pthread_t t;
    CHECK(pthread_create(&t, NULL, heal_later, NULL) == 0);
    CHECK(t_run_until(loop, all_done, NULL, 20.0));
    pthread_join(t, NULL);
    t_run_for(loop, 0.1); /* a duplicate would come now */
    CHECK(atomic_load(&failures) > 0); /* the posts did fail */
    for (int i = 0; i < N; i++) {
        CHECK_EQ(atomic_load(&calls[i]), 1);
        CHECK_EQ(rcs[i], i);
    }
    CHECK_EQ(lines, 0); /* nothing dropped, nothing to say */
    CHECK_OK(ca_child_watcher_close(w));
    ca_child_watcher_unref(w);
    CHECK_OK(ca_set_event_loop(NULL));
    CHECK_OK(ca_loop_close(loop));
    ca_loop_unref(loop);
    ca_set_log_handler(NULL, NULL);
}
