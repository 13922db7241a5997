/*
 * The core's support for host loops (issue 13): the thread-safe queue the core keeps for a
 * custom loop without call_soon_threadsafe (ca_loop_threadsafe_fd, ca_loop_run_threadsafe) and
 * the optional is_closed op. The host loop is tests/custom_loop.c's variant that watches the
 * queue's fd with its own reader.
 */
#include "harness.h"

#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <stdatomic.h>
#include <sys/wait.h>

/* Internal (in the static library the tests link). */
int ca__loop_schedule(ca_loop *loop, ca_callback_fn fn, void *arg, ca_callback_fn drop);

static void noop(void *arg) { (void)arg; }

static bool readable(int fd)
{
    struct pollfd p = {.fd = fd, .events = POLLIN};
    return poll(&p, 1, 0) == 1 && (p.revents & POLLIN);
}

/* ----- many producers, FIFO per producer ----------------------------------------------------- */

enum { PRODUCERS = 8, PER_PRODUCER = 3000 };

struct fifo {
    ca_loop *loop;
    long next[PRODUCERS]; /* loop thread only */
    long ran, out_of_order;
};

struct item {
    struct fifo *f;
    int producer;
    long seq;
};

static void item_run(void *arg)
{
    struct item *it = arg;
    struct fifo *f = it->f;
    if (f->next[it->producer] != it->seq) f->out_of_order++;
    f->next[it->producer] = it->seq + 1;
    if (++f->ran == (long)PRODUCERS * PER_PRODUCER) ca_loop_stop(f->loop);
}

struct producer {
    struct fifo *f;
    int id;
    struct item *items;
};

static void *produce(void *arg)
{
    struct producer *p = arg;
    for (long i = 0; i < PER_PRODUCER; i++) {
        p->items[i] = (struct item){p->f, p->id, i};
        int r;
        while ((r = ca_loop_call_soon_threadsafe(p->f->loop, item_run, &p->items[i])) == -ENOMEM)
            sched_yield();
        CHECK_OK(r);
    }
    return NULL;
}

TEST(host_queue_many_producers_fifo) /* timeout: 60 */
{
    struct fifo f = {0};
    CHECK_OK(t_custom_loop_new_hostq(&f.loop));
    struct producer p[PRODUCERS];
    pthread_t t[PRODUCERS];
    for (int i = 0; i < PRODUCERS; i++) {
        p[i] = (struct producer){&f, i, calloc(PER_PRODUCER, sizeof(struct item))};
        CHECK(p[i].items != NULL);
        CHECK_EQ(pthread_create(&t[i], NULL, produce, &p[i]), 0);
    }
    CHECK_OK(ca_loop_run_forever(f.loop));
    for (int i = 0; i < PRODUCERS; i++) pthread_join(t[i], NULL);
    CHECK_EQ(f.ran, (long)PRODUCERS * PER_PRODUCER);
    CHECK_EQ(f.out_of_order, 0);
    for (int i = 0; i < PRODUCERS; i++) free(p[i].items);
    CHECK_OK(ca_loop_close(f.loop));
    ca_loop_unref(f.loop);
}

/* ----- the fd and the run call --------------------------------------------------------------- */

static void count(void *arg) { (*(int *)arg)++; }

TEST(host_queue_fd_and_run)
{
    ca_loop *loop = NULL;
    CHECK_OK(t_custom_loop_new_hostq(&loop));
    int fd = ca_loop_threadsafe_fd(loop);
    CHECK(fd >= 0);
    CHECK_EQ(ca_loop_threadsafe_fd(loop), fd); /* one fd per loop */
    CHECK(fcntl(fd, F_GETFD) & FD_CLOEXEC);
    CHECK(fcntl(fd, F_GETFL) & O_NONBLOCK);
    CHECK(!readable(fd));
    CHECK_EQ(ca_loop_run_threadsafe(loop), 0);
    int n = 0;
    CHECK_OK(ca_loop_call_soon_threadsafe(loop, count, &n));
    CHECK_OK(ca_loop_call_soon_threadsafe(loop, count, &n));
    CHECK(readable(fd));
    CHECK_EQ(n, 0); /* never inside the call */
    CHECK_EQ(ca_loop_run_threadsafe(loop), 2);
    CHECK_EQ(n, 2);
    CHECK(!readable(fd));
    CHECK_EQ(ca_loop_run_threadsafe(loop), 0);
    CHECK_OK(ca_loop_close(loop));
    /* The fd is closed with the loop. */
    CHECK_ERR(ca_loop_threadsafe_fd(loop), -EBADF);
    CHECK_ERR(ca_loop_run_threadsafe(loop), -EBADF);
    CHECK_ERR(ca_loop_call_soon_threadsafe(loop, count, &n), -EBADF);
    ca_loop_unref(loop);
}

TEST(host_queue_refused_where_it_does_not_apply)
{
    CHECK_ERR(ca_loop_threadsafe_fd(NULL), -EINVAL);
    CHECK_ERR(ca_loop_run_threadsafe(NULL), -EINVAL);
    ca_loop *builtin = NULL, *with_op = NULL;
    CHECK_OK(ca_selector_loop_new(&builtin));
    CHECK_ERR(ca_loop_threadsafe_fd(builtin), -EINVAL);
    CHECK_ERR(ca_loop_run_threadsafe(builtin), -EINVAL);
    CHECK_OK(t_custom_loop_new(&with_op)); /* has its own call_soon_threadsafe */
    CHECK_ERR(ca_loop_threadsafe_fd(with_op), -EINVAL);
    CHECK_ERR(ca_loop_run_threadsafe(with_op), -EINVAL);
    CHECK_OK(ca_loop_close(builtin));
    CHECK_OK(ca_loop_close(with_op));
    ca_loop_unref(builtin);
    ca_loop_unref(with_op);
}

/* Until the host asks for the fd, a loop without the op has no thread-safe scheduling. */
static int run_nothing(ca_loop *self) { return 0; }

TEST(host_queue_is_opt_in)
{
    static const ca_loop_ops ops = {.run_forever = run_nothing};
    ca_loop *loop = NULL;
    CHECK_OK(ca_loop_new_custom(&ops, NULL, &loop));
    CHECK_ERR(ca_loop_call_soon_threadsafe(loop, noop, NULL), -ENOTSUP);
    int fd = ca_loop_threadsafe_fd(loop);
    CHECK(fd >= 0);
    int n = 0;
    CHECK_OK(ca_loop_call_soon_threadsafe(loop, count, &n));
    CHECK_EQ(ca_loop_run_threadsafe(loop), 1);
    CHECK_EQ(n, 1);
    CHECK_OK(ca_loop_close(loop));
    ca_loop_unref(loop);
}

/* ----- close, thread rule, fork --------------------------------------------------------------- */

struct dropped {
    atomic_int ran, dropped;
};

static void drop_run(void *arg) { atomic_fetch_add(&((struct dropped *)arg)->ran, 1); }
static void drop_drop(void *arg) { atomic_fetch_add(&((struct dropped *)arg)->dropped, 1); }

struct sched_arg {
    ca_loop *loop;
    struct dropped *d;
};

static void *schedule_from_thread(void *arg)
{
    struct sched_arg *a = arg;
    CHECK_OK(ca__loop_schedule(a->loop, drop_run, a->d, drop_drop));
    CHECK_OK(ca_loop_call_soon_threadsafe(a->loop, drop_run, a->d));
    /* The loop runs in the main thread: the run call is for that thread only. */
    CHECK_ERR(ca_loop_run_threadsafe(a->loop), -EPERM);
    return NULL;
}

TEST(host_queue_close_drops_queued)
{
    ca_loop *loop = NULL;
    CHECK_OK(t_custom_loop_new_hostq(&loop));
    struct dropped d = {0};
    struct sched_arg a = {loop, &d};
    CHECK_OK(ca_loop_enter_running(loop)); /* so the other thread is not the loop's */
    pthread_t t;
    CHECK_EQ(pthread_create(&t, NULL, schedule_from_thread, &a), 0);
    pthread_join(t, NULL);
    CHECK_OK(ca_loop_exit_running(loop));
    CHECK_OK(ca_loop_close(loop));
    CHECK_EQ(atomic_load(&d.ran), 0);
    CHECK_EQ(atomic_load(&d.dropped), 1); /* the one with a drop function, once */
    ca_loop_unref(loop);
}

TEST(host_queue_in_forked_child)
{
    ca_loop *loop = NULL;
    CHECK_OK(t_custom_loop_new_hostq(&loop));
    struct dropped d = {0};
    CHECK_OK(ca_loop_call_soon_threadsafe(loop, drop_run, &d));
    pid_t pid = fork();
    CHECK(pid >= 0);
    if (pid == 0) {
        int code = 0;
        if (ca_loop_threadsafe_fd(loop) != -ECHILD) code = 1;
        if (ca_loop_call_soon_threadsafe(loop, drop_run, &d) != -ECHILD) code = 2;
        if (ca_loop_run_threadsafe(loop) != -ECHILD) code = 3;
        ca_loop_unref(loop); /* frees this process's copy, runs nothing */
        if (atomic_load(&d.ran) != 0) code = 4;
        t_child_exit(code);
    }
    int status = 0;
    CHECK_EQ(waitpid(pid, &status, 0), pid);
    CHECK(WIFEXITED(status));
    CHECK_EQ(WEXITSTATUS(status), 0);
    CHECK_EQ(ca_loop_run_threadsafe(loop), 1); /* the parent's queue is untouched */
    CHECK_EQ(atomic_load(&d.ran), 1);
    CHECK_OK(ca_loop_close(loop));
    ca_loop_unref(loop);
}

/* ----- is_closed ------------------------------------------------------------------------------ */

TEST(host_closed_loop)
{
    ca_loop *loop = NULL;
    CHECK_OK(t_custom_loop_new_hostq(&loop));
    struct dropped d = {0};
    CHECK_OK(ca_loop_call_soon_threadsafe(loop, drop_run, &d));
    CHECK(!ca_loop_is_closed(loop));
    t_custom_loop_host_close(loop);
    CHECK(ca_loop_is_closed(loop));
    CHECK_ERR(ca_loop_call_soon(loop, noop, NULL, NULL), -EBADF);
    CHECK_ERR(ca_loop_call_soon_threadsafe(loop, noop, NULL), -EBADF);
    CHECK_ERR(ca_loop_call_later(loop, 1, noop, NULL, NULL), -EBADF);
    CHECK_ERR(ca_loop_run_forever(loop), -EBADF);
    CHECK_ERR(ca_loop_enter_running(loop), -EBADF);
    CHECK_ERR(ca_loop_run_threadsafe(loop), -EBADF);
    ca_future *f = NULL;
    CHECK_ERR(ca_future_new(loop, &f), -EBADF);
    CHECK_EQ(ca_loop_remove_reader(loop, 0), 0);
    /* ca_loop_close still releases the core's side: the queued callback is dropped. */
    CHECK_OK(ca_loop_close(loop));
    CHECK_EQ(atomic_load(&d.ran), 0);
    ca_loop_unref(loop);
}

/* The library's own deliveries (a watcher's thread posting an exit) reach a host loop that is
 * not marked running through the queue, never through its call_soon op from a foreign thread. */
static void *schedule_idle(void *arg)
{
    struct sched_arg *a = arg;
    CHECK_OK(ca__loop_schedule(a->loop, drop_run, a->d, drop_drop));
    return NULL;
}

TEST(host_queue_takes_library_deliveries_from_other_threads)
{
    ca_loop *loop = NULL;
    CHECK_OK(t_custom_loop_new_hostq(&loop));
    struct dropped d = {0};
    struct sched_arg a = {loop, &d};
    pthread_t t;
    CHECK_EQ(pthread_create(&t, NULL, schedule_idle, &a), 0);
    pthread_join(t, NULL);
    CHECK(readable(ca_loop_threadsafe_fd(loop)));
    CHECK_EQ(ca_loop_run_threadsafe(loop), 1);
    CHECK_EQ(atomic_load(&d.ran), 1);
    CHECK_EQ(atomic_load(&d.dropped), 0);
    CHECK_OK(ca_loop_close(loop));
    ca_loop_unref(loop);
}

/* An exit an add finds at once (here: Pidfd, a child reaped already) is posted with the loop's
 * call_soon when the add runs in the thread where the loop is marked running (a host adapter
 * marks it around the calls it makes on the loop's thread): no write to the queue's fd, no
 * wakeup of a loop that is awake. From a thread where it is not marked running, the queue. */
static void rc_cb(pid_t pid, int rc, void *arg) { *(int *)arg = rc; }
static bool rc_set(void *arg) { return *(int *)arg != -1; }

static pid_t reaped_child(void)
{
    pid_t pid = fork();
    if (pid == 0) _exit(3);
    CHECK(pid > 0);
    CHECK_EQ(waitpid(pid, NULL, 0), pid);
    return pid;
}

TEST(host_add_on_the_running_thread_posts_without_the_queue)
{
    ca_child_watcher *w = NULL;
    int err = ca_pidfd_child_watcher_new(&w);
    if (err == -ENOSYS) {
        t_skip("no pidfd_open");
        return;
    }
    CHECK_OK(err);
    ca_loop *loop = NULL;
    CHECK_OK(t_custom_loop_new_hostq(&loop));
    int fd = ca_loop_threadsafe_fd(loop);
    CHECK(fd >= 0);
    for (int marked = 1; marked >= 0; marked--) {
        int rc = -1;
        pid_t pid = reaped_child();
        if (marked) CHECK_OK(ca_loop_enter_running(loop));
        CHECK_OK(ca_child_watcher_add_child_handler_on(w, loop, pid, rc_cb, &rc));
        if (marked) CHECK_OK(ca_loop_exit_running(loop));
        CHECK_EQ(readable(fd), !marked);
        CHECK_EQ(rc, -1); /* posted, not called in the add */
        CHECK(t_run_until(loop, rc_set, &rc, 5));
        CHECK_EQ(rc, 255); /* its status was read by someone else */
    }
    CHECK_OK(ca_child_watcher_close(w));
    ca_child_watcher_unref(w);
    CHECK_OK(ca_loop_close(loop));
    ca_loop_unref(loop);
}
