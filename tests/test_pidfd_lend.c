/* The Pidfd watcher's lent pidfds (src/watcher_pidfd.c, "Lent pidfds"): the registration a
 * reader names stays alive, and the reader is really taken off its loop, even when the loop
 * starts running in another thread between the moment a removal is decided and the moment it
 * is made. */
#include "harness.h"

#include "../src/internal.h"

#include <pthread.h>
#include <spawn.h>
#include <sys/syscall.h>
#include <sys/wait.h>

#ifndef P_PIDFD
#define P_PIDFD 3
#endif

extern char **environ;

struct lend {
    ca_loop *loop;
    int pidfd;
    pthread_t runner;
    bool runner_started;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    bool running;
    int drops;
    int other_calls;
    int still_on; /* what remove_reader said on the loop's thread at the end: 1 = was on */
};

static void mark_running(void *arg)
{
    struct lend *s = arg;
    pthread_mutex_lock(&s->mu);
    s->running = true;
    pthread_cond_signal(&s->cv);
    pthread_mutex_unlock(&s->mu);
}

static void *run_loop(void *arg)
{
    struct lend *s = arg;
    /* Before the loop runs, this thread may schedule on it. */
    if (ca_loop_call_soon(s->loop, mark_running, s, NULL) == 0) ca_loop_run_forever(s->loop);
    else mark_running(s);
    return NULL;
}

/* The lent registration's callback. The drop call comes from remove_child_handler at the
 * watcher's unlock, after the reader's removal was queued in this thread (the loop was not
 * running) and before it is made: the loop starts running in another thread right here, so
 * that thread is the only one that may take the reader off. */
static void lent_cb(pid_t pid, int rc, void *arg)
{
    (void)pid;
    struct lend *s = arg;
    if (rc != CA__RC_DROPPED) {
        s->other_calls++;
        return;
    }
    s->drops++;
    if (pthread_create(&s->runner, NULL, run_loop, s) != 0) return;
    s->runner_started = true;
    pthread_mutex_lock(&s->mu);
    while (!s->running) pthread_cond_wait(&s->cv, &s->mu);
    pthread_mutex_unlock(&s->mu);
}

/* Posted after the removal: on the loop's thread, whatever the watcher posted before is done. */
static void check_and_stop(void *arg)
{
    struct lend *s = arg;
    s->still_on = ca_loop_remove_reader(s->loop, s->pidfd);
    ca_loop_stop(s->loop);
}

LOOP_TEST(pidfd_lend_remove_while_loop_starts_elsewhere)
{
    ca_child_watcher *w = NULL;
    int r = ca_pidfd_child_watcher_new(&w);
    if (r == -ENOSYS) t_skip("pidfd is unavailable");
    CHECK_OK(r);

    char *argv[] = {"/bin/true", NULL};
    pid_t pid;
    CHECK_EQ(posix_spawn(&pid, "/bin/true", NULL, NULL, argv, environ), 0);
    int pidfd = (int)syscall(SYS_pidfd_open, pid, 0);
    CHECK(pidfd >= 0);

    struct lend s = {.loop = loop, .pidfd = pidfd, .still_on = -1};
    pthread_mutex_init(&s.mu, NULL);
    pthread_cond_init(&s.cv, NULL);

    struct ca__wreg *lease = NULL;
    CHECK_OK(ca__pidfd_watcher_lend_on(w, loop, pid, pidfd, lent_cb, &s, &lease));
    CHECK(lease != NULL);

    /* Taken back: the drop call starts the loop in the runner thread (lent_cb). */
    CHECK_EQ(ca_child_watcher_remove_child_handler(w, pid), 1);
    CHECK_EQ(s.drops, 1);
    CHECK(s.runner_started);
    if (s.runner_started) {
        CHECK_OK(ca_loop_call_soon_threadsafe(loop, check_and_stop, &s));
        pthread_join(s.runner, NULL);
    }
    /* The watcher took its reader off on the loop's thread: nothing was left for the check to
     * remove (1 would be a reader left on the loop, naming a registration that the give-back
     * below frees). */
    CHECK_EQ(s.still_on, 0);
    CHECK_EQ(s.other_calls, 0);

    /* The child is ours to reap (a removed child is not reaped by the watcher). */
    siginfo_t info = {0};
    int e;
    do {
        e = waitid((idtype_t)P_PIDFD, (id_t)pidfd, &info, WEXITED);
    } while (e < 0 && errno == EINTR);
    CHECK_EQ(e, 0);
    CHECK_EQ(info.si_pid, pid);
    ca__pidfd_watcher_give_back(lease, pidfd); /* the reader is off: this closes pidfd */

    CHECK_OK(ca_child_watcher_close(w));
    ca_child_watcher_unref(w);
    pthread_cond_destroy(&s.cv);
    pthread_mutex_destroy(&s.mu);
}
