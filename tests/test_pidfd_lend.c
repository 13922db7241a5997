/* The Pidfd watcher's lent pidfds (src/watcher_pidfd.c, "Lent pidfds"): the registration a
 * reader names stays alive, and the reader is really taken off its loop, even when the loop
 * starts running in another thread between the moment a removal is decided and the moment it
 * is made. */
#include "harness.h"

#include "../src/internal.h"

#include <fcntl.h>
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
    struct ca__wreg *lease;
    pid_t pid;
    int dupfd;     /* the second test's copy of pidfd, as process.c's own_watch makes */
    int reaped;    /* 1: reaped through dupfd; -1: that failed */
    int ticks;
    bool no_runner; /* lent_cb only counts the drop */
    ca_child_watcher *w;
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
    if (s->no_runner) return;
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

/* Spawns /bin/true, lends its pidfd to a Pidfd watcher delivering to loop (not running), then
 * removes the handler: the drop call starts the loop in the runner thread (lent_cb), so the
 * reader's removal, queued in this thread, finds the loop running elsewhere. */
static void lend_and_remove(ca_loop *loop, ca_child_watcher *w, struct lend *s)
{
    char *argv[] = {"/bin/true", NULL};
    *s = (struct lend){.loop = loop, .pidfd = -1, .still_on = -1, .dupfd = -1};
    pthread_mutex_init(&s->mu, NULL);
    pthread_cond_init(&s->cv, NULL);
    CHECK_EQ(posix_spawn(&s->pid, "/bin/true", NULL, NULL, argv, environ), 0);
    s->pidfd = (int)syscall(SYS_pidfd_open, s->pid, 0);
    CHECK(s->pidfd >= 0);
    CHECK_OK(ca__pidfd_watcher_lend_on(w, loop, s->pid, s->pidfd, lent_cb, s, &s->lease));
    CHECK(s->lease != NULL);
    CHECK_EQ(ca_child_watcher_remove_child_handler(w, s->pid), 1);
    CHECK_EQ(s->drops, 1);
    CHECK(s->runner_started);
}

static void lend_end(ca_child_watcher *w, struct lend *s)
{
    CHECK_OK(ca_child_watcher_close(w));
    ca_child_watcher_unref(w);
    pthread_cond_destroy(&s->cv);
    pthread_mutex_destroy(&s->mu);
}

LOOP_TEST(pidfd_lend_remove_while_loop_starts_elsewhere)
{
    ca_child_watcher *w = NULL;
    int r = ca_pidfd_child_watcher_new(&w);
    if (r == -ENOSYS) t_skip("pidfd is unavailable");
    CHECK_OK(r);
    struct lend s;
    lend_and_remove(loop, w, &s);
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
        e = waitid((idtype_t)P_PIDFD, (id_t)s.pidfd, &info, WEXITED);
    } while (e < 0 && errno == EINTR);
    CHECK_EQ(e, 0);
    CHECK_EQ(info.si_pid, s.pid);
    ca__pidfd_watcher_give_back(s.lease, s.pidfd); /* the reader is off: this closes pidfd */
    lend_end(w, &s);
}

/* A few more iterations, then the check: with a reader left on the closed pidfd's number (its
 * file kept open by dupfd, so epoll keeps reporting it), they would call pidfd_ready with the
 * registration that the give-back freed. */
static void tick(void *arg)
{
    struct lend *s = arg;
    if (++s->ticks < 5 && ca_loop_call_soon(s->loop, tick, s, NULL) == 0) return;
    check_and_stop(s);
}

/* The child's exit, through the copy: reap it and give the pidfd back, as process.c's
 * own_exited does (the soak's use-after-free came from this sequence). */
static void dup_ready(void *arg)
{
    struct lend *s = arg;
    siginfo_t info = {0};
    int e;
    do {
        e = waitid((idtype_t)P_PIDFD, (id_t)s->dupfd, &info, WEXITED | WNOHANG);
    } while (e < 0 && errno == EINTR);
    if (e == 0 && info.si_pid == 0) return; /* not yet: level-triggered, it comes again */
    s->reaped = e == 0 && info.si_pid == s->pid ? 1 : -1;
    ca_loop_remove_reader(s->loop, s->dupfd);
    ca__pidfd_watcher_give_back(s->lease, s->pidfd);
    s->lease = NULL;
    if (ca_loop_call_soon(s->loop, tick, s, NULL) < 0) check_and_stop(s);
}

/* On the loop's thread, after the watcher's posted release (if any): watch a copy, as
 * process.c's own_watch does after a drop. */
static void watch_dup(void *arg)
{
    struct lend *s = arg;
    s->dupfd = fcntl(s->pidfd, F_DUPFD_CLOEXEC, 3);
    if (s->dupfd < 0 || ca_loop_add_reader(s->loop, s->dupfd, dup_ready, s) < 0) {
        s->reaped = -1;
        ca_loop_stop(s->loop);
    }
}

LOOP_TEST(pidfd_lend_give_back_after_drop_elsewhere)
{
    ca_child_watcher *w = NULL;
    int r = ca_pidfd_child_watcher_new(&w);
    if (r == -ENOSYS) t_skip("pidfd is unavailable");
    CHECK_OK(r);
    struct lend s;
    lend_and_remove(loop, w, &s);
    if (s.runner_started) {
        CHECK_OK(ca_loop_call_soon_threadsafe(loop, watch_dup, &s));
        pthread_join(s.runner, NULL);
    }
    CHECK_EQ(s.reaped, 1);
    CHECK_EQ(s.still_on, 0);
    CHECK_EQ(s.other_calls, 0);
    if (s.lease) { /* not given back above (a failed check): reap and give it back here */
        waitpid(s.pid, NULL, 0);
        ca__pidfd_watcher_give_back(s.lease, s.pidfd);
    }
    if (s.dupfd >= 0) close(s.dupfd);
    lend_end(w, &s);
}

static void *remove_elsewhere(void *arg)
{
    struct lend *s = arg;
    s->reaped = ca_child_watcher_remove_child_handler(s->w, s->pid);
    return NULL;
}

/* A remove from a thread that neither runs the loop nor added the reader (the soak's watcher
 * thread replacing watchers) leaves the loop alone, as the loop may start running in its own
 * thread at any moment: the reader comes off when the loop runs next, in its thread. */
LOOP_TEST(pidfd_lend_remove_from_another_thread_while_not_running)
{
    ca_child_watcher *w = NULL;
    int r = ca_pidfd_child_watcher_new(&w);
    if (r == -ENOSYS) t_skip("pidfd is unavailable");
    CHECK_OK(r);
    char *argv[] = {"/bin/true", NULL};
    struct lend s = {.loop = loop, .pidfd = -1, .still_on = -1, .dupfd = -1, .no_runner = true};
    CHECK_EQ(posix_spawn(&s.pid, "/bin/true", NULL, NULL, argv, environ), 0);
    s.pidfd = (int)syscall(SYS_pidfd_open, s.pid, 0);
    CHECK(s.pidfd >= 0);
    struct ca__wreg *lease = NULL;
    CHECK_OK(ca__pidfd_watcher_lend_on(w, loop, s.pid, s.pidfd, lent_cb, &s, &lease));
    CHECK(lease != NULL);
    s.w = w;
    pthread_t t;
    CHECK_EQ(pthread_create(&t, NULL, remove_elsewhere, &s), 0);
    pthread_join(t, NULL);
    CHECK_EQ(s.reaped, 1);
    CHECK_EQ(s.drops, 1);
    /* Whatever the remove posted runs first; then the check, on this (the loop's) thread. */
    CHECK_OK(ca_loop_call_soon_threadsafe(loop, check_and_stop, &s));
    CHECK_OK(ca_loop_run_forever(loop));
    CHECK_EQ(s.still_on, 0);
    CHECK_EQ(s.other_calls, 0);
    siginfo_t info = {0};
    int e;
    do {
        e = waitid((idtype_t)P_PIDFD, (id_t)s.pidfd, &info, WEXITED);
    } while (e < 0 && errno == EINTR);
    CHECK_EQ(e, 0);
    ca__pidfd_watcher_give_back(lease, s.pidfd); /* the reader is off: this closes pidfd */
    CHECK_OK(ca_child_watcher_close(w));
    ca_child_watcher_unref(w);
}
