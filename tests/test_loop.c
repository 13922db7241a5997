/* The event loop suite: every LOOP_TEST runs on epoll, poll, io_uring and the custom loop. */
#include "harness.h"

#include <fcntl.h>
#include <math.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <sys/socket.h>
#include <sys/wait.h>

static bool is_custom(void) { return strcmp(t_loop_kind, "custom") == 0; }

/* ----- a small recorder of callback order ----- */
struct rec {
    int order[64];
    int n;
    ca_loop *loop;
};
struct tag {
    struct rec *rec;
    int id;
};
static void record(void *arg)
{
    struct tag *t = arg;
    if (t->rec->n < 64) t->rec->order[t->rec->n++] = t->id;
}
static void stop_cb(void *arg) { ca_loop_stop(arg); }

LOOP_TEST(call_soon_fifo)
{
    struct rec rec = {.n = 0};
    struct tag tags[10];
    for (int i = 0; i < 10; i++) {
        tags[i] = (struct tag){&rec, i};
        CHECK_OK(ca_loop_call_soon(loop, record, &tags[i], NULL));
    }
    CHECK_OK(ca_loop_call_soon(loop, stop_cb, loop, NULL));
    CHECK_OK(ca_loop_run_forever(loop));
    CHECK_EQ(rec.n, 10);
    for (int i = 0; i < 10; i++) CHECK_EQ(rec.order[i], i);
}

struct nested {
    ca_loop *loop;
    int iteration_of_inner;
    int iterations;
    int inner_ran;
};
static void inner(void *arg)
{
    struct nested *n = arg;
    n->inner_ran = 1;
}
static void outer(void *arg)
{
    struct nested *n = arg;
    CHECK_OK(ca_loop_call_soon(n->loop, inner, n, NULL));
    /* stop now: asyncio runs the current iteration to its end, and the inner callback
     * belongs to the next one */
    ca_loop_stop(n->loop);
}
LOOP_TEST(callback_from_callback_runs_next_iteration)
{
    struct nested n = {.loop = loop};
    CHECK_OK(ca_loop_call_soon(loop, outer, &n, NULL));
    CHECK_OK(ca_loop_run_forever(loop));
    CHECK_EQ(n.inner_ran, 0);
    CHECK_OK(ca_loop_call_soon(loop, stop_cb, loop, NULL));
    CHECK_OK(ca_loop_run_forever(loop));
    CHECK_EQ(n.inner_ran, 1);
}

LOOP_TEST(timers_by_time_then_fifo)
{
    struct rec rec = {.n = 0};
    struct tag t[6];
    for (int i = 0; i < 6; i++) t[i] = (struct tag){&rec, i};
    double now = ca_loop_time(loop);
    double u = 0.010 * t_slow(); /* the gaps must dwarf the time between these calls */
    CHECK_OK(ca_loop_call_at(loop, now + 3 * u, record, &t[0], NULL));
    CHECK_OK(ca_loop_call_later(loop, u, record, &t[1], NULL));
    CHECK_OK(ca_loop_call_at(loop, now + 2 * u, record, &t[2], NULL));
    CHECK_OK(ca_loop_call_at(loop, now + 2 * u, record, &t[3], NULL));
    CHECK_OK(ca_loop_call_at(loop, now + 2 * u, record, &t[4], NULL));
    CHECK_OK(ca_loop_call_later(loop, -5, record, &t[5], NULL)); /* negative: as soon as possible */
    CHECK_OK(ca_loop_call_later(loop, 5 * u, stop_cb, loop, NULL));
    CHECK_OK(ca_loop_run_forever(loop));
    CHECK_EQ(rec.n, 6);
    int want[6] = {5, 1, 2, 3, 4, 0};
    for (int i = 0; i < 6; i++) CHECK_EQ(rec.order[i], want[i]);
    CHECK(ca_loop_time(loop) >= now + 5 * u);
}

LOOP_TEST(timer_does_not_fire_early)
{
    double start = ca_loop_time(loop);
    CHECK_OK(ca_loop_call_later(loop, 0.05, stop_cb, loop, NULL));
    CHECK_OK(ca_loop_run_forever(loop));
    double fired_at = ca_loop_time(loop);
    CHECK(fired_at - start >= 0.05);
    CHECK(fired_at - start < 0.05 + 1.0 * t_slow());
}

LOOP_TEST(cancel_before_and_after)
{
    struct rec rec = {.n = 0};
    struct tag a = {&rec, 1}, b = {&rec, 2}, c = {&rec, 3};
    ca_handle *ha = NULL, *hb = NULL, *hc = NULL;
    CHECK_OK(ca_loop_call_soon(loop, record, &a, &ha));
    CHECK_OK(ca_loop_call_later(loop, 0.001, record, &b, &hb));
    CHECK_OK(ca_loop_call_soon(loop, record, &c, &hc));
    CHECK(ha && hb && hc);
    CHECK(!ca_handle_cancelled(ha));
    ca_handle_cancel(ha);
    ca_handle_cancel(hb);
    ca_handle_cancel(hb); /* idempotent */
    CHECK(ca_handle_cancelled(ha));
    CHECK(ca_handle_cancelled(hb));
    t_run_for(loop, 0.02);
    CHECK_EQ(rec.n, 1);
    CHECK_EQ(rec.order[0], 3);
    ca_handle_cancel(hc); /* after it ran: harmless */
    CHECK(ca_handle_cancelled(hc));
    CHECK(!ca_handle_cancelled(NULL));
    ca_handle_cancel(NULL);
    ca_handle_unref(ha);
    ca_handle_unref(hb);
    CHECK(ca_handle_unref(hc) == NULL);
    CHECK(ca_handle_unref(NULL) == NULL);
}

LOOP_TEST(handle_outlives_loop)
{
    ca_loop *l2 = NULL;
    CHECK_OK(t_new_loop(&l2));
    ca_handle *h = NULL;
    CHECK_OK(ca_loop_call_later(l2, 10, stop_cb, l2, &h));
    CHECK_OK(ca_loop_close(l2));
    ca_loop_unref(l2);
    ca_handle_cancel(h); /* the loop is gone: still safe */
    CHECK(ca_handle_cancelled(h));
    ca_handle_unref(h);
}

LOOP_TEST(time_is_monotonic)
{
    double prev = ca_loop_time(loop);
    CHECK(!isnan(prev));
    for (int i = 0; i < 10000; i++) {
        double t = ca_loop_time(loop);
        CHECK(t >= prev);
        prev = t;
    }
    CHECK(isnan(ca_loop_time(NULL)));
}

static void set_result_cb(void *arg) { ca_future_set_result(arg, (void *)(intptr_t)42); }
static void set_error_cb(void *arg) { ca_future_set_error(arg, -ETIMEDOUT); }
static void cancel_cb(void *arg) { ca_future_cancel(arg); }

LOOP_TEST(run_until_complete_outcomes)
{
    ca_future *f = NULL;
    CHECK_OK(ca_future_new(loop, &f));
    CHECK(ca_future_loop(f) == loop);
    void *res = NULL;
    CHECK_ERR(ca_future_result(f, &res), -EAGAIN);
    CHECK_OK(ca_loop_call_later(loop, 0.005, set_result_cb, f, NULL));
    CHECK_OK(ca_loop_run_until_complete(loop, f));
    CHECK(ca_future_done(f));
    CHECK_OK(ca_future_result(f, &res));
    CHECK_EQ((intptr_t)res, 42);
    CHECK_ERR(ca_future_set_result(f, NULL), -EINVAL);
    CHECK_ERR(ca_future_set_error(f, -EIO), -EINVAL);
    CHECK(!ca_future_cancel(f));
    ca_future_unref(f);

    CHECK_OK(ca_future_new(loop, &f));
    CHECK_OK(ca_loop_call_soon(loop, set_error_cb, f, NULL));
    CHECK_ERR(ca_loop_run_until_complete(loop, f), -ETIMEDOUT);
    CHECK_ERR(ca_future_result(f, NULL), -ETIMEDOUT);
    ca_future_unref(f);

    CHECK_OK(ca_future_new(loop, &f));
    CHECK_OK(ca_loop_call_soon(loop, cancel_cb, f, NULL));
    CHECK_ERR(ca_loop_run_until_complete(loop, f), -ECANCELED);
    CHECK(ca_future_cancelled(f));
    CHECK_ERR(ca_future_result(f, NULL), -ECANCELED);
    ca_future_unref(f);

    /* An already-done future: one iteration. */
    CHECK_OK(ca_future_new(loop, &f));
    CHECK_OK(ca_future_set_result(f, NULL));
    CHECK_OK(ca_loop_run_until_complete(loop, f));
    ca_future_unref(f);

    /* Stopped before the future is done. */
    CHECK_OK(ca_future_new(loop, &f));
    CHECK_OK(ca_loop_call_soon(loop, stop_cb, loop, NULL));
    CHECK_ERR(ca_loop_run_until_complete(loop, f), -EAGAIN);
    CHECK(!ca_future_done(f));
    /* ...and the stale stop request does not stop the next run early */
    CHECK_OK(ca_loop_call_later(loop, 0.01, set_result_cb, f, NULL));
    CHECK_OK(ca_loop_run_until_complete(loop, f));
    ca_future_unref(f);

    /* A future of another loop. */
    ca_loop *l2 = NULL;
    CHECK_OK(t_new_loop(&l2));
    CHECK_OK(ca_future_new(l2, &f));
    CHECK_ERR(ca_loop_run_until_complete(loop, f), -EINVAL);
    ca_future_unref(f);
    CHECK_OK(ca_loop_close(l2));
    ca_loop_unref(l2);
    CHECK_ERR(ca_loop_run_until_complete(loop, NULL), -EINVAL);
}

struct donecb {
    int calls;
    int in_set;
    ca_future *seen;
    void *arg_seen;
};
static void done_fn(ca_future *f, void *arg)
{
    struct donecb *d = arg;
    d->calls++;
    d->seen = f;
}
LOOP_TEST(future_done_callbacks_run_through_loop)
{
    ca_future *f = NULL;
    struct donecb d = {0};
    CHECK_OK(ca_future_new(loop, &f));
    CHECK_OK(ca_future_add_done_callback(f, done_fn, &d));
    CHECK_OK(ca_future_add_done_callback(f, done_fn, &d));
    CHECK_OK(ca_future_set_result(f, NULL));
    CHECK_EQ(d.calls, 0); /* never inside set_result */
    t_run_for(loop, 0.01);
    CHECK_EQ(d.calls, 2);
    CHECK(d.seen == f);
    /* added after done: scheduled at once */
    CHECK_OK(ca_future_add_done_callback(f, done_fn, &d));
    CHECK_EQ(d.calls, 2);
    t_run_for(loop, 0.01);
    CHECK_EQ(d.calls, 3);
    CHECK_ERR(ca_future_add_done_callback(f, NULL, &d), -EINVAL);
    CHECK_ERR(ca_future_add_done_callback(NULL, done_fn, &d), -EINVAL);
    CHECK_ERR(ca_future_set_error(f, 5), -EINVAL);
    ca_future_unref(f);
    CHECK_ERR(ca_future_new(NULL, &f), -EINVAL);
    CHECK_ERR(ca_future_new(loop, NULL), -EINVAL);
    CHECK_ERR(ca_future_result(NULL, NULL), -EINVAL);
    CHECK(!ca_future_done(NULL));
    CHECK(!ca_future_cancel(NULL));
    CHECK(ca_future_unref(NULL) == NULL);
}

LOOP_TEST(future_pending_when_loop_closes)
{
    ca_loop *l2 = NULL;
    CHECK_OK(t_new_loop(&l2));
    ca_future *f = NULL;
    struct donecb d = {0};
    CHECK_OK(ca_future_new(l2, &f));
    CHECK_OK(ca_future_add_done_callback(f, done_fn, &d));
    CHECK_OK(ca_loop_close(l2));
    ca_loop_unref(l2); /* the future still holds the loop */
    CHECK(ca_future_cancel(f));
    CHECK_EQ(d.calls, 0);
    CHECK_ERR(ca_future_add_done_callback(f, done_fn, &d), -EBADF);
    ca_future_unref(f);
}

struct running_check {
    ca_loop *loop;
    int busy_rc, close_rc, ok;
    ca_loop *running_seen;
    bool is_running;
};
static void check_running(void *arg)
{
    struct running_check *c = arg;
    c->busy_rc = ca_loop_run_forever(c->loop);
    c->close_rc = ca_loop_close(c->loop);
    c->running_seen = ca_get_running_loop();
    c->is_running = ca_loop_is_running(c->loop);
    ca_loop_stop(c->loop);
}
LOOP_TEST(running_state_and_busy)
{
    struct running_check c = {.loop = loop};
    CHECK(ca_get_running_loop() == NULL);
    CHECK(!ca_loop_is_running(loop));
    CHECK_OK(ca_loop_call_soon(loop, check_running, &c, NULL));
    CHECK_OK(ca_loop_run_forever(loop));
    CHECK_ERR(c.busy_rc, -EBUSY);
    CHECK_ERR(c.close_rc, -EBUSY);
    CHECK(c.running_seen == loop);
    CHECK(c.is_running);
    CHECK(!ca_loop_is_running(loop));
    CHECK(ca_get_running_loop() == NULL);
    CHECK(!ca_loop_is_closed(loop));
}

struct two {
    ca_loop *a, *b;
    int rc;
};
static void run_other(void *arg)
{
    struct two *t = arg;
    t->rc = ca_loop_run_forever(t->b);
    ca_loop_stop(t->a);
}
LOOP_TEST(second_loop_in_same_thread_busy)
{
    struct two t = {.a = loop};
    CHECK_OK(t_new_loop(&t.b));
    CHECK_OK(ca_loop_call_soon(loop, run_other, &t, NULL));
    CHECK_OK(ca_loop_run_forever(loop));
    CHECK_ERR(t.rc, -EBUSY);
    CHECK_OK(ca_loop_close(t.b));
    ca_loop_unref(t.b);
}

LOOP_TEST(stop_before_run_runs_one_iteration)
{
    struct rec rec = {.n = 0};
    struct tag a = {&rec, 1};
    ca_loop_stop(loop);
    CHECK_OK(ca_loop_call_soon(loop, record, &a, NULL));
    CHECK_OK(ca_loop_run_forever(loop)); /* returns after one iteration */
    CHECK_EQ(rec.n, 1);
}

static void noop(void *arg) { (void)arg; }

LOOP_TEST(closed_loop_gives_ebadf)
{
    ca_loop *l = NULL;
    CHECK_OK(t_new_loop(&l));
    int p[2];
    CHECK_OK(pipe2(p, O_CLOEXEC));
    CHECK_OK(ca_loop_close(l));
    CHECK_OK(ca_loop_close(l)); /* idempotent */
    CHECK(ca_loop_is_closed(l));
    ca_handle *h = (ca_handle *)0x1;
    CHECK_ERR(ca_loop_run_forever(l), -EBADF);
    CHECK_ERR(ca_loop_call_soon(l, noop, NULL, &h), -EBADF);
    CHECK(h == (ca_handle *)0x1); /* out untouched on failure */
    CHECK_ERR(ca_loop_call_later(l, 1, noop, NULL, NULL), -EBADF);
    CHECK_ERR(ca_loop_call_at(l, 1, noop, NULL, NULL), -EBADF);
    CHECK_ERR(ca_loop_call_soon_threadsafe(l, noop, NULL), -EBADF);
    CHECK_ERR(ca_loop_add_reader(l, p[0], noop, NULL), -EBADF);
    CHECK_ERR(ca_loop_add_writer(l, p[1], noop, NULL), -EBADF);
    CHECK_EQ(ca_loop_remove_reader(l, p[0]), 0);
    CHECK_EQ(ca_loop_remove_writer(l, p[1]), 0);
    CHECK_ERR(ca_loop_add_signal_handler(l, SIGUSR1, noop, NULL), -EBADF);
    CHECK_EQ(ca_loop_remove_signal_handler(l, SIGUSR1), 0);
    ca_future *f = (ca_future *)0x1;
    CHECK_ERR(ca_future_new(l, &f), -EBADF);
    CHECK(f == (ca_future *)0x1);
    CHECK_ERR(ca_loop_run_until_complete(l, NULL), -EINVAL); /* bad argument first */
    CHECK_ERR(ca_loop_enter_running(l), -EBADF);
    char buf[4];
    CHECK_ERR(ca_loop_sock_recv(l, p[0], buf, sizeof buf, &f), -EBADF);
    ca_loop_stop(l); /* ignored */
    close(p[0]);
    close(p[1]);
    ca_loop_unref(l);
}

LOOP_TEST(bad_arguments_einval)
{
    ca_handle *h = NULL;
    int p[2];
    CHECK_OK(pipe2(p, O_CLOEXEC));
    CHECK_ERR(ca_loop_call_soon(NULL, noop, NULL, &h), -EINVAL);
    CHECK_ERR(ca_loop_call_soon(loop, NULL, NULL, &h), -EINVAL);
    CHECK_ERR(ca_loop_call_later(loop, NAN, noop, NULL, &h), -EINVAL);
    CHECK_ERR(ca_loop_call_at(loop, NAN, noop, NULL, &h), -EINVAL);
    CHECK_ERR(ca_loop_call_later(NULL, 1, noop, NULL, &h), -EINVAL);
    CHECK_ERR(ca_loop_call_soon_threadsafe(NULL, noop, NULL), -EINVAL);
    CHECK_ERR(ca_loop_call_soon_threadsafe(loop, NULL, NULL), -EINVAL);
    CHECK(h == NULL);
    CHECK_ERR(ca_loop_add_reader(loop, -1, noop, NULL), -EINVAL);
    CHECK_ERR(ca_loop_add_reader(loop, p[0], NULL, NULL), -EINVAL);
    CHECK_ERR(ca_loop_add_writer(loop, -3, noop, NULL), -EINVAL);
    CHECK_ERR(ca_loop_add_reader(NULL, p[0], noop, NULL), -EINVAL);
    CHECK_ERR(ca_loop_remove_reader(loop, -1), -EINVAL);
    CHECK_ERR(ca_loop_remove_writer(NULL, p[0]), -EINVAL);
    /* an fd that is not open */
    int dead = p[0];
    close(p[0]);
    CHECK_ERR(ca_loop_add_reader(loop, dead, noop, NULL), -EINVAL);
    CHECK_ERR(ca_loop_add_signal_handler(loop, 0, noop, NULL), -EINVAL);
    CHECK_ERR(ca_loop_add_signal_handler(loop, 65, noop, NULL), -EINVAL);
    CHECK_ERR(ca_loop_add_signal_handler(loop, -2, noop, NULL), -EINVAL);
    CHECK_ERR(ca_loop_add_signal_handler(loop, SIGKILL, noop, NULL), -EINVAL);
    CHECK_ERR(ca_loop_add_signal_handler(loop, SIGSTOP, noop, NULL), -EINVAL);
    CHECK_ERR(ca_loop_add_signal_handler(loop, SIGUSR1, NULL, NULL), -EINVAL);
    CHECK_ERR(ca_loop_remove_signal_handler(loop, 0), -EINVAL);
    CHECK_ERR(ca_loop_run_forever(NULL), -EINVAL);
    CHECK_ERR(ca_loop_close(NULL), -EINVAL);
    CHECK_ERR(ca_loop_enter_running(NULL), -EINVAL);
    CHECK_ERR(ca_loop_exit_running(NULL), -EINVAL);
    CHECK_ERR(ca_loop_exit_running(loop), -EINVAL); /* not running here */
    CHECK(!ca_loop_is_running(NULL));
    CHECK(!ca_loop_is_closed(NULL));
    CHECK(ca_loop_ref(NULL) == NULL);
    CHECK(ca_loop_unref(NULL) == NULL);
    CHECK(ca_loop_kind(NULL) == NULL);
    CHECK(strcmp(ca_loop_kind(loop), t_loop_kind) == 0);
    ca_loop_stop(NULL);
    close(p[1]);
}

TEST(constructors_reject_null_out)
{
    CHECK_ERR(ca_selector_loop_new(NULL), -EINVAL);
    CHECK_ERR(ca_poll_loop_new(NULL), -EINVAL);
    CHECK_ERR(ca_loop_new_custom(NULL, NULL, NULL), -EINVAL);
    ca_loop_ops empty = {0};
    ca_loop *l = (ca_loop *)0x1;
    CHECK_ERR(ca_loop_new_custom(&empty, NULL, &l), -EINVAL); /* run_forever is required */
    CHECK(l == (ca_loop *)0x1);
    CHECK(ca_loop_data(NULL) == NULL);
}

/* A custom loop that provides only run_forever: everything else is -ENOTSUP. */
static int only_run(ca_loop *self)
{
    (void)self;
    return 0;
}
TEST(custom_loop_missing_ops_enotsup)
{
    static const ca_loop_ops ops = {.run_forever = only_run};
    ca_loop *l = NULL;
    int token = 7;
    CHECK_OK(ca_loop_new_custom(&ops, &token, &l));
    CHECK(ca_loop_data(l) == &token);
    CHECK(strcmp(ca_loop_kind(l), "custom") == 0);
    int p[2];
    CHECK_OK(pipe2(p, O_CLOEXEC));
    CHECK_ERR(ca_loop_call_soon(l, noop, NULL, NULL), -ENOTSUP);
    CHECK_ERR(ca_loop_call_later(l, 1, noop, NULL, NULL), -ENOTSUP);
    CHECK_ERR(ca_loop_call_soon_threadsafe(l, noop, NULL), -ENOTSUP);
    CHECK_ERR(ca_loop_add_reader(l, p[0], noop, NULL), -ENOTSUP);
    CHECK_ERR(ca_loop_remove_reader(l, p[0]), -ENOTSUP);
    CHECK_ERR(ca_loop_add_signal_handler(l, SIGUSR1, noop, NULL), -ENOTSUP);
    CHECK_OK(ca_loop_run_forever(l));
    CHECK(ca_loop_time(l) > 0); /* NULL time: CLOCK_MONOTONIC */
    CHECK_OK(ca_loop_close(l));
    ca_loop_unref(l);
    close(p[0]);
    close(p[1]);
}

TEST(enter_and_exit_running)
{
    static const ca_loop_ops ops = {.run_forever = only_run};
    ca_loop *l = NULL, *l2 = NULL;
    CHECK_OK(ca_loop_new_custom(&ops, NULL, &l));
    CHECK_OK(ca_loop_new_custom(&ops, NULL, &l2));
    CHECK_OK(ca_loop_enter_running(l));
    CHECK(ca_get_running_loop() == l);
    CHECK(ca_loop_is_running(l));
    CHECK_ERR(ca_loop_enter_running(l), -EBUSY);
    CHECK_ERR(ca_loop_enter_running(l2), -EBUSY);
    CHECK_ERR(ca_loop_run_forever(l2), -EBUSY);
    CHECK_ERR(ca_loop_close(l), -EBUSY);
    CHECK_ERR(ca_loop_exit_running(l2), -EINVAL);
    CHECK_OK(ca_loop_exit_running(l));
    CHECK(ca_get_running_loop() == NULL);
    CHECK(!ca_loop_is_running(l));
    ca_loop_unref(l);
    ca_loop_unref(l2);
}

/* ----- readers and writers ----- */

struct pipe_io {
    ca_loop *loop;
    int rfd, wfd;
    int reads, writes;
    char got[64];
    int ngot;
    bool remove_self;
    int removed_rc;
};
static void on_read(void *arg)
{
    struct pipe_io *p = arg;
    p->reads++;
    char c;
    if (read(p->rfd, &c, 1) == 1 && p->ngot < 64) p->got[p->ngot++] = c;
    if (p->remove_self) p->removed_rc = ca_loop_remove_reader(p->loop, p->rfd);
}
static void on_read_other(void *arg)
{
    struct pipe_io *p = arg;
    p->reads += 100;
    char c;
    if (read(p->rfd, &c, 1) == 1 && p->ngot < 64) p->got[p->ngot++] = c;
}
static void on_write(void *arg)
{
    struct pipe_io *p = arg;
    p->writes++;
    ssize_t w = write(p->wfd, "x", 1);
    (void)w;
    if (p->writes >= 3) ca_loop_remove_writer(p->loop, p->wfd);
}
static bool got_n(void *arg)
{
    struct pipe_io *p = arg;
    return p->ngot >= 3;
}

static void make_pair(int kind, int fds[2])
{
    if (kind == 0) CHECK_OK(pipe2(fds, O_CLOEXEC | O_NONBLOCK));
    else CHECK_OK(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0, fds));
}

LOOP_TEST(readers_writers_pipes_and_socketpairs)
{
    for (int kind = 0; kind < 2; kind++) {
        int fds[2];
        make_pair(kind, fds);
        struct pipe_io p = {.loop = loop, .rfd = fds[0], .wfd = fds[1]};
        CHECK_OK(ca_loop_add_writer(loop, fds[1], on_write, &p));
        CHECK_OK(ca_loop_add_reader(loop, fds[0], on_read, &p));
        CHECK(t_run_until(loop, got_n, &p, 5));
        CHECK_EQ(p.writes, 3);
        CHECK_EQ(ca_loop_remove_writer(loop, fds[1]), 0); /* removed by its callback */
        CHECK_EQ(ca_loop_remove_reader(loop, fds[0]), 1);
        CHECK_EQ(ca_loop_remove_reader(loop, fds[0]), 0);
        CHECK_EQ(memcmp(p.got, "xxx", 3), 0);
        close(fds[0]);
        close(fds[1]);
    }
}

LOOP_TEST(reader_level_triggered_and_replaced)
{
    int fds[2];
    make_pair(0, fds);
    struct pipe_io p = {.loop = loop, .rfd = fds[0], .wfd = fds[1]};
    CHECK_EQ(write(fds[1], "abcdefghij", 10), 10);
    CHECK_OK(ca_loop_add_reader(loop, fds[0], on_read, &p));
    /* one byte per call: level-triggered means it is called until the pipe is empty */
    for (int i = 0; i < 200 && p.ngot < 10; i++) t_run_for(loop, 0.001);
    CHECK_EQ(p.ngot, 10);
    CHECK_EQ(memcmp(p.got, "abcdefghij", 10), 0);
    /* replace the callback */
    CHECK_OK(ca_loop_add_reader(loop, fds[0], on_read_other, &p));
    int before = p.reads;
    CHECK_EQ(write(fds[1], "k", 1), 1);
    for (int i = 0; i < 200 && p.ngot < 11; i++) t_run_for(loop, 0.001);
    CHECK_EQ(p.ngot, 11);
    CHECK_EQ(p.reads - before, 100);
    CHECK_EQ(ca_loop_remove_reader(loop, fds[0]), 1);
    close(fds[0]);
    close(fds[1]);
}

LOOP_TEST(reader_removes_itself)
{
    int fds[2];
    make_pair(1, fds);
    struct pipe_io p = {.loop = loop, .rfd = fds[0], .wfd = fds[1], .remove_self = true};
    CHECK_EQ(write(fds[1], "abc", 3), 3);
    CHECK_OK(ca_loop_add_reader(loop, fds[0], on_read, &p));
    t_run_for(loop, 0.02);
    CHECK_EQ(p.reads, 1);
    CHECK_EQ(p.removed_rc, 1);
    CHECK_EQ(ca_loop_remove_reader(loop, fds[0]), 0);
    close(fds[0]);
    close(fds[1]);
}

LOOP_TEST(reader_and_writer_on_same_fd)
{
    int fds[2];
    make_pair(1, fds);
    struct pipe_io p = {.loop = loop, .rfd = fds[0], .wfd = fds[0]};
    CHECK_EQ(write(fds[1], "abc", 3), 3);
    CHECK_OK(ca_loop_add_reader(loop, fds[0], on_read, &p));
    CHECK_OK(ca_loop_add_writer(loop, fds[0], on_write, &p));
    t_run_for(loop, 0.05);
    CHECK_EQ(p.ngot, 3);
    CHECK_EQ(p.writes, 3);
    CHECK_EQ(ca_loop_remove_writer(loop, fds[0]), 0);
    CHECK_EQ(ca_loop_remove_reader(loop, fds[0]), 1);
    char buf[8];
    CHECK_EQ(read(fds[1], buf, sizeof buf), 3); /* what the writer sent */
    close(fds[0]);
    close(fds[1]);
}

static void hup_read(void *arg)
{
    struct pipe_io *p = arg;
    p->reads++;
    char c;
    ssize_t n = read(p->rfd, &c, 1);
    if (n <= 0) ca_loop_remove_reader(p->loop, p->rfd); /* EOF or error: stop */
}
LOOP_TEST(reader_sees_eof)
{
    int fds[2];
    make_pair(0, fds);
    struct pipe_io p = {.loop = loop, .rfd = fds[0]};
    CHECK_OK(ca_loop_add_reader(loop, fds[0], hup_read, &p));
    close(fds[1]);
    t_run_for(loop, 0.02);
    CHECK_EQ(p.reads, 1);
    CHECK_EQ(ca_loop_remove_reader(loop, fds[0]), 0);
    close(fds[0]);
}

LOOP_TEST(fd_closed_behind_the_loops_back)
{
    int fds[2];
    make_pair(1, fds);
    struct pipe_io p = {.loop = loop, .rfd = fds[0]};
    CHECK_OK(ca_loop_add_reader(loop, fds[0], hup_read, &p));
    ca_set_log_handler(NULL, NULL);
    close(fds[0]); /* behind the loop's back */
    CHECK_EQ(write(fds[1], "x", 1), -1); /* peer gone: EPIPE (SIGPIPE ignored by the harness) */
    t_run_for(loop, 0.02);
    /* the loop survives and the fd number can be registered again */
    int fds2[2];
    make_pair(1, fds2);
    struct pipe_io q = {.loop = loop, .rfd = fds2[0]};
    CHECK_EQ(write(fds2[1], "y", 1), 1);
    CHECK_OK(ca_loop_add_reader(loop, fds2[0], on_read, &q));
    t_run_for(loop, 0.02);
    CHECK_EQ(q.ngot, 1);
    ca_loop_remove_reader(loop, fds2[0]);
    ca_loop_remove_reader(loop, fds[0]);
    close(fds[1]);
    close(fds2[0]);
    close(fds2[1]);
}

LOOP_TEST(many_fds)
{
    enum { N = 200 };
    int fds[N][2];
    struct pipe_io p[N];
    for (int i = 0; i < N; i++) {
        make_pair(i % 2, fds[i]);
        p[i] = (struct pipe_io){.loop = loop, .rfd = fds[i][0], .wfd = fds[i][1]};
        CHECK_OK(ca_loop_add_reader(loop, fds[i][0], on_read, &p[i]));
    }
    for (int i = 0; i < N; i += 3) CHECK_EQ(write(fds[i][1], "z", 1), 1);
    t_run_for(loop, 0.05);
    for (int i = 0; i < N; i++) {
        CHECK_EQ(p[i].ngot, i % 3 == 0 ? 1 : 0);
        CHECK_EQ(ca_loop_remove_reader(loop, fds[i][0]), 1);
        close(fds[i][0]);
        close(fds[i][1]);
    }
}

/* ----- threads ----- */

struct ts_state {
    ca_loop *loop;
    atomic_int posted;
    int count;
    int total;
    int per_thread;
    int last_seen[8];
    int order_ok;
};
struct ts_item {
    struct ts_state *s;
    int thread;
    int seq;
};
static void ts_cb(void *arg)
{
    struct ts_state *s = arg;
    s->count++;
    if (s->count == s->total) ca_loop_stop(s->loop);
}
struct ts_thread {
    struct ts_state *s;
    int idx;
};
static void *ts_producer(void *arg)
{
    struct ts_thread *t = arg;
    for (int i = 0; i < t->s->per_thread; i++) {
        int r;
        while ((r = ca_loop_call_soon_threadsafe(t->s->loop, ts_cb, t->s)) == -ENOMEM) {
        }
        if (r) {
            fprintf(stderr, "call_soon_threadsafe: %d\n", r);
            _exit(1);
        }
    }
    return NULL;
}
LOOP_TEST(call_soon_threadsafe_many_threads) /* timeout: 120 */
{
    struct ts_state s = {.loop = loop};
    s.per_thread = t_slow() > 1 ? 5000 : 100000;
    s.total = 8 * s.per_thread;
    pthread_t th[8];
    struct ts_thread tt[8];
    for (int i = 0; i < 8; i++) {
        tt[i] = (struct ts_thread){&s, i};
        CHECK_EQ(pthread_create(&th[i], NULL, ts_producer, &tt[i]), 0);
    }
    CHECK_OK(ca_loop_run_forever(loop));
    for (int i = 0; i < 8; i++) pthread_join(th[i], NULL);
    t_run_for(loop, 0.01);
    CHECK_EQ(s.count, s.total);
}

struct fifo_state {
    ca_loop *loop;
    int next[4];
    int bad;
    int done;
};
struct fifo_item {
    struct fifo_state *s;
    int thread, seq;
};
static void fifo_cb(void *arg)
{
    struct fifo_item *it = arg;
    if (it->s->next[it->thread] != it->seq) it->s->bad++;
    it->s->next[it->thread] = it->seq + 1;
    it->s->done++;
}
static struct fifo_item fifo_items[4][2000];
static void *fifo_producer(void *arg)
{
    struct fifo_item *items = arg;
    for (int i = 0; i < 2000; i++) CHECK_OK(ca_loop_call_soon_threadsafe(items[i].s->loop, fifo_cb, &items[i]));
    return NULL;
}
static bool fifo_done(void *arg) { return ((struct fifo_state *)arg)->done == 8000; }
LOOP_TEST(call_soon_threadsafe_fifo_per_thread)
{
    struct fifo_state s = {.loop = loop};
    pthread_t th[4];
    for (int t = 0; t < 4; t++) {
        for (int i = 0; i < 2000; i++) fifo_items[t][i] = (struct fifo_item){&s, t, i};
        CHECK_EQ(pthread_create(&th[t], NULL, fifo_producer, fifo_items[t]), 0);
    }
    CHECK(t_run_until(loop, fifo_done, &s, 20));
    for (int t = 0; t < 4; t++) pthread_join(th[t], NULL);
    CHECK_EQ(s.bad, 0);
}

struct wrong_thread {
    ca_loop *loop;
    int rc_soon, rc_later, rc_reader, rc_remove, rc_ts, rc_run;
    atomic_int done;
};
static void *wrong_thread_fn(void *arg)
{
    struct wrong_thread *w = arg;
    int p[2];
    if (pipe2(p, O_CLOEXEC) < 0) return NULL;
    w->rc_soon = ca_loop_call_soon(w->loop, noop, NULL, NULL);
    w->rc_later = ca_loop_call_later(w->loop, 1, noop, NULL, NULL);
    w->rc_reader = ca_loop_add_reader(w->loop, p[0], noop, NULL);
    w->rc_remove = ca_loop_remove_reader(w->loop, p[0]);
    w->rc_run = ca_loop_run_forever(w->loop);
    w->rc_ts = ca_loop_call_soon_threadsafe(w->loop, stop_cb, w->loop);
    close(p[0]);
    close(p[1]);
    atomic_store(&w->done, 1);
    return NULL;
}
static void start_wrong_thread(void *arg)
{
    struct wrong_thread *w = arg;
    pthread_t t;
    CHECK_EQ(pthread_create(&t, NULL, wrong_thread_fn, w), 0);
    pthread_detach(t);
}
LOOP_TEST(wrong_thread_eperm)
{
    struct wrong_thread w = {.loop = loop};
    CHECK_OK(ca_loop_call_soon(loop, start_wrong_thread, &w, NULL));
    CHECK_OK(ca_loop_run_forever(loop)); /* stopped by the other thread */
    while (!atomic_load(&w.done)) t_run_for(loop, 0.001);
    CHECK_ERR(w.rc_soon, -EPERM);
    CHECK_ERR(w.rc_later, -EPERM);
    CHECK_ERR(w.rc_reader, -EPERM);
    CHECK_ERR(w.rc_remove, -EPERM);
    CHECK_ERR(w.rc_run, -EBUSY);
    CHECK_OK(w.rc_ts);
}

struct stopper {
    ca_loop *loop;
    double delay;
};
static void *stop_from_thread(void *arg)
{
    struct stopper *s = arg;
    struct timespec ts = {0, (long)(s->delay * 1e9)};
    nanosleep(&ts, NULL);
    ca_loop_stop(s->loop);
    return NULL;
}
LOOP_TEST(stop_from_another_thread_wakes_loop)
{
    struct stopper s = {loop, 0.05};
    pthread_t t;
    CHECK_OK(ca_loop_call_later(loop, 30, noop, NULL, NULL)); /* would block 30 s */
    CHECK_EQ(pthread_create(&t, NULL, stop_from_thread, &s), 0);
    double t0 = ca_loop_time(loop);
    CHECK_OK(ca_loop_run_forever(loop));
    CHECK(ca_loop_time(loop) - t0 < 5);
    pthread_join(t, NULL);
}

/* ----- signals ----- */

struct sig_state {
    ca_loop *loop;
    atomic_int hits;
};
static void on_sig(void *arg)
{
    struct sig_state *s = arg;
    atomic_fetch_add(&s->hits, 1);
}
static bool hit(void *arg) { return atomic_load(&((struct sig_state *)arg)->hits) > 0; }

LOOP_TEST(signal_handler_basic_and_restore)
{
    if (is_custom()) SKIP("the custom test loop has no signal handlers");
    struct sigaction before, after;
    sigaction(SIGUSR1, NULL, &before);
    struct sig_state s = {.loop = loop};
    CHECK_OK(ca_loop_add_signal_handler(loop, SIGUSR1, on_sig, &s));
    kill(getpid(), SIGUSR1);
    CHECK(t_run_until(loop, hit, &s, 5));
    CHECK_EQ(ca_loop_remove_signal_handler(loop, SIGUSR1), 1);
    CHECK_EQ(ca_loop_remove_signal_handler(loop, SIGUSR1), 0);
    sigaction(SIGUSR1, NULL, &after);
    CHECK(after.sa_handler == before.sa_handler);
    /* a handler replaced, then the loop closed with it registered: disposition restored */
    CHECK_OK(ca_loop_add_signal_handler(loop, SIGUSR2, on_sig, &s));
    CHECK_OK(ca_loop_add_signal_handler(loop, SIGUSR2, on_sig, &s));
    CHECK_OK(ca_loop_close(loop));
    sigaction(SIGUSR2, NULL, &after);
    CHECK(after.sa_handler == SIG_DFL);
}

static void user_handler(int sig) { (void)sig; }
LOOP_TEST(signal_previous_user_handler_restored)
{
    if (is_custom()) SKIP("the custom test loop has no signal handlers");
    struct sigaction sa = {.sa_handler = user_handler}, now;
    sigaction(SIGUSR2, &sa, NULL);
    struct sig_state s = {.loop = loop};
    CHECK_OK(ca_loop_add_signal_handler(loop, SIGUSR2, on_sig, &s));
    sigaction(SIGUSR2, NULL, &now);
    CHECK(now.sa_handler != user_handler);
    CHECK_EQ(ca_loop_remove_signal_handler(loop, SIGUSR2), 1);
    sigaction(SIGUSR2, NULL, &now);
    CHECK(now.sa_handler == user_handler);
}

struct sig_thread {
    struct sig_state s;
    atomic_int ready;
    atomic_int stop;
    int rc;
};
static void check_stop(void *arg)
{
    struct sig_thread *t = arg;
    if (atomic_load(&t->stop)) ca_loop_stop(t->s.loop);
    else ca_loop_call_later(t->s.loop, 0.002, check_stop, t, NULL);
}
static void *sig_loop_thread(void *arg)
{
    struct sig_thread *t = arg;
    t->rc = t_new_loop(&t->s.loop);
    if (t->rc == 0) t->rc = ca_loop_add_signal_handler(t->s.loop, SIGUSR1, on_sig, &t->s);
    atomic_store(&t->ready, 1);
    if (t->rc == 0) {
        ca_loop_call_soon(t->s.loop, check_stop, t, NULL);
        ca_loop_run_forever(t->s.loop);
        ca_loop_close(t->s.loop);
    }
    ca_loop_unref(t->s.loop);
    return NULL;
}
LOOP_TEST(same_signal_two_loops_two_threads)
{
    if (is_custom()) SKIP("the custom test loop has no signal handlers");
    struct sig_thread a = {0}, b = {0};
    pthread_t ta, tb;
    CHECK_EQ(pthread_create(&ta, NULL, sig_loop_thread, &a), 0);
    CHECK_EQ(pthread_create(&tb, NULL, sig_loop_thread, &b), 0);
    while (!atomic_load(&a.ready) || !atomic_load(&b.ready)) t_run_for(loop, 0.001);
    CHECK_OK(a.rc);
    CHECK_OK(b.rc);
    kill(getpid(), SIGUSR1);
    for (int i = 0; i < 5000 && (!atomic_load(&a.s.hits) || !atomic_load(&b.s.hits)); i++)
        t_run_for(loop, 0.001);
    CHECK(atomic_load(&a.s.hits) >= 1);
    CHECK(atomic_load(&b.s.hits) >= 1);
    atomic_store(&a.stop, 1);
    atomic_store(&b.stop, 1);
    pthread_join(ta, NULL);
    pthread_join(tb, NULL);
    struct sigaction now;
    sigaction(SIGUSR1, NULL, &now);
    CHECK(now.sa_handler == SIG_DFL);
}

/* ----- fork ----- */

LOOP_TEST(fork_child_gets_echild)
{
    ca_handle *h = NULL;
    CHECK_OK(ca_loop_call_later(loop, 10, noop, NULL, &h));
    pid_t pid = fork();
    CHECK(pid >= 0);
    if (pid == 0) {
        int bad = 0;
        int p[2];
        if (pipe2(p, O_CLOEXEC) < 0) t_child_exit(90);
        if (ca_loop_call_soon(loop, noop, NULL, NULL) != -ECHILD) bad |= 1;
        if (ca_loop_call_soon_threadsafe(loop, noop, NULL) != -ECHILD) bad |= 2;
        if (ca_loop_run_forever(loop) != -ECHILD) bad |= 4;
        if (ca_loop_add_reader(loop, p[0], noop, NULL) != -ECHILD) bad |= 8;
        if (ca_loop_remove_reader(loop, p[0]) != -ECHILD) bad |= 16;
        if (ca_loop_is_running(loop)) bad |= 32;
        if (ca_get_running_loop() != NULL) bad |= 64;
        ca_future *f;
        if (ca_future_new(loop, &f) != -ECHILD) bad |= 128;
        if (ca_loop_close(loop) != 0) bad |= 256;
        t_child_exit(bad);
    }
    int st;
    CHECK_EQ(waitpid(pid, &st, 0), pid);
    CHECK(WIFEXITED(st));
    CHECK_EQ(WEXITSTATUS(st), 0);
    /* the parent's loop is untouched */
    t_run_for(loop, 0.01);
    ca_handle_cancel(h);
    ca_handle_unref(h);
}

struct fork_running {
    ca_loop *loop;
    int status;
};
static void fork_inside(void *arg)
{
    struct fork_running *f = arg;
    pid_t pid = fork();
    if (pid == 0) {
        /* the running loop of the parent is never returned in the child */
        t_child_exit(ca_get_running_loop() == NULL ? 0 : 1);
    }
    waitpid(pid, &f->status, 0);
    ca_loop_stop(f->loop);
}
LOOP_TEST(fork_while_running)
{
    struct fork_running f = {.loop = loop, .status = -1};
    CHECK_OK(ca_loop_call_soon(loop, fork_inside, &f, NULL));
    CHECK_OK(ca_loop_run_forever(loop));
    CHECK(WIFEXITED(f.status));
    CHECK_EQ(WEXITSTATUS(f.status), 0);
}

/* ----- misc ----- */

TEST(strerror_and_version)
{
    CHECK(strcmp(ca_strerror(0), "Success") == 0);
    CHECK(strstr(ca_strerror(-ENOTCONN), "watcher") != NULL);
    CHECK(ca_strerror(-EINVAL) == ca_strerror(EINVAL));
    CHECK(ca_strerror(-99999) != NULL);
    CHECK(strcmp(ca_version(), CA_VERSION_STRING) == 0);
}

static int log_calls;
static void count_log(int level, const char *msg, void *arg)
{
    (void)level;
    (void)msg;
    *(int *)arg += 1;
}
TEST(log_handler_receives_poll_warning)
{
    ca_loop *loop = NULL;
    CHECK_OK(ca_poll_loop_new(&loop));
    ca_set_log_handler(count_log, &log_calls);
    int fds[2];
    make_pair(1, fds);
    struct pipe_io p = {.loop = loop, .rfd = fds[0]};
    CHECK_OK(ca_loop_add_reader(loop, fds[0], on_read, &p));
    close(fds[0]);
    t_run_for(loop, 0.02);
    CHECK_EQ(log_calls, 1); /* POLLNVAL reported once, then the fd is no longer polled */
    ca_set_log_handler(NULL, NULL);
    ca_loop_remove_reader(loop, fds[0]);
    close(fds[1]);
    CHECK_OK(ca_loop_close(loop));
    ca_loop_unref(loop);
}

LOOP_TEST(many_timers_and_cancels)
{
    enum { N = 5000 };
    static ca_handle *hs[N];
    for (int i = 0; i < N; i++) CHECK_OK(ca_loop_call_later(loop, (i % 50) * 0.0002, noop, NULL, &hs[i]));
    for (int i = 0; i < N; i += 2) ca_handle_cancel(hs[i]);
    t_run_for(loop, 0.03);
    for (int i = 0; i < N; i++) {
        CHECK_EQ(ca_handle_cancelled(hs[i]), i % 2 == 0);
        ca_handle_unref(hs[i]);
    }
}

LOOP_TEST(unref_without_close_frees)
{
    ca_loop *l = NULL;
    CHECK_OK(t_new_loop(&l));
    CHECK_OK(ca_loop_call_soon(l, noop, NULL, NULL));
    CHECK_OK(ca_loop_call_later(l, 5, noop, NULL, NULL));
    CHECK(ca_loop_ref(l) == l);
    ca_loop_unref(l);
    CHECK(!ca_loop_is_closed(l));
    CHECK(ca_loop_unref(l) == NULL); /* last reference: closed and freed (valgrind checks) */
}

struct burst {
    ca_loop *loop;
    int n, target;
};
static void burst_cb(void *arg)
{
    struct burst *b = arg;
    if (++b->n == b->target) ca_loop_stop(b->loop);
}
LOOP_TEST(burst_then_idle_reuses_and_trims_ring)
{
    struct burst b = {.loop = loop, .target = 50000};
    for (int round = 0; round < 3; round++) {
        b.n = 0;
        for (int i = 0; i < b.target; i++) CHECK_OK(ca_loop_call_soon(loop, burst_cb, &b, NULL));
        CHECK_OK(ca_loop_run_forever(loop));
        CHECK_EQ(b.n, b.target);
        t_run_for(loop, 0.005); /* blocks: the idle loop gives back its grown ready ring */
    }
}

TEST(signal_slots_exhausted_enospc) /* timeout: 60 */
{
    enum { N = 1030 };
    static ca_loop *loops[N];
    struct sig_state s = {0};
    int made = 0, r = 0;
    for (; made < N; made++) {
        CHECK_OK(ca_selector_loop_new(&loops[made]));
        r = ca_loop_add_signal_handler(loops[made], SIGUSR1, on_sig, &s);
        if (r < 0) {
            made++;
            break;
        }
    }
    CHECK_ERR(r, -ENOSPC);
    CHECK_EQ(made, 1025); /* 1024 loops watch, the next is refused */
    for (int i = 0; i < made; i++) {
        CHECK_OK(ca_loop_close(loops[i]));
        ca_loop_unref(loops[i]);
    }
    /* every slot is free again */
    ca_loop *l = NULL;
    CHECK_OK(ca_selector_loop_new(&l));
    CHECK_OK(ca_loop_add_signal_handler(l, SIGUSR1, on_sig, &s));
    CHECK_OK(ca_loop_close(l));
    ca_loop_unref(l);
    struct sigaction now;
    sigaction(SIGUSR1, NULL, &now);
    CHECK(now.sa_handler == SIG_DFL);
}

/* ----- the ready ring and the timer heap's two kinds of entries ----------------------------- */

struct seq {
    ca_loop *loop;
    int *got;
    int n, cap;
    bool bad;
};
struct seq_item {
    struct seq *s;
    int id;
};
static void seq_cb(void *arg)
{
    struct seq_item *it = arg;
    struct seq *s = it->s;
    if (s->n < s->cap) s->got[s->n] = it->id;
    s->n++;
}

/* call_soon without a handle, with one, cancelled, threadsafe from the loop's own thread:
 * one FIFO. Enough of them that the ring grows (and wraps: the first ones ran before the
 * last ones were queued). */
LOOP_TEST(ready_ring_mixed_entries_fifo)
{
    enum { N = 3000 };
    static int got[2 * N];
    static struct seq_item items[2 * N];
    static ca_handle *hs[2 * N];
    struct seq s = {.loop = loop, .got = got, .cap = 2 * N};
    int expect = 0;
    for (int round = 0; round < 2; round++) {
        for (int i = round * N; i < (round + 1) * N; i++) {
            items[i] = (struct seq_item){&s, i};
            hs[i] = NULL;
            switch (i % 4) {
            case 0: CHECK_OK(ca_loop_call_soon(loop, seq_cb, &items[i], NULL)); break;
            case 1: CHECK_OK(ca_loop_call_soon(loop, seq_cb, &items[i], &hs[i])); break;
            case 2: CHECK_OK(ca_loop_call_soon_threadsafe(loop, seq_cb, &items[i])); break;
            default: CHECK_OK(ca_loop_call_soon(loop, seq_cb, &items[i], &hs[i])); break;
            }
            if (i % 8 == 7) ca_handle_cancel(hs[i]);
        }
        t_run_for(loop, 0.01);
        for (int i = round * N; i < (round + 1) * N; i++) {
            if (i % 8 == 7) continue;
            CHECK_EQ(got[expect], i);
            expect++;
        }
        CHECK_EQ(s.n, expect);
    }
    for (int i = 0; i < 2 * N; i++) ca_handle_unref(hs[i]);
}

/* The same instant for every timer: handle-less ones and ones with a handle keep the order
 * they were scheduled in; a cancelled one is skipped; a timer due in the past, scheduled by
 * a timer callback, runs in the next iteration after what that callback scheduled with
 * call_soon (asyncio: due timers are moved to the ready queue once per iteration). */
struct late {
    ca_loop *loop;
    struct rec *rec;
    struct tag soon, past;
};
static void late_cb(void *arg)
{
    struct late *l = arg;
    record(&l->soon); /* marks that late_cb ran */
    ca_loop_call_soon(l->loop, record, &l->soon, NULL);
    ca_loop_call_at(l->loop, ca_loop_time(l->loop) - 1, record, &l->past, NULL);
}
static bool rec_has_43(void *arg) { return ((struct rec *)arg)->n >= 43; }
LOOP_TEST(timers_same_instant_fifo_across_kinds)
{
    struct rec rec = {.n = 0};
    struct tag t[40];
    ca_handle *h[40] = {0};
    double when = ca_loop_time(loop) + 0.002;
    for (int i = 0; i < 40; i++) {
        t[i] = (struct tag){&rec, i};
        CHECK_OK(ca_loop_call_at(loop, when, record, &t[i], i % 3 == 0 ? &h[i] : NULL));
    }
    ca_handle_cancel(h[9]);
    struct late l = {.loop = loop, .rec = &rec, .soon = {&rec, 100}, .past = {&rec, 200}};
    CHECK_OK(ca_loop_call_at(loop, when, late_cb, &l, NULL));
    CHECK_OK(ca_loop_call_at(loop, when, record, &t[0], NULL)); /* after late_cb, same batch */
    /* Until all 43 ran (not for a fixed time: on a loaded machine the stop timer may come due
     * in the same iteration as the batch, and stop the loop before late_cb's call_soon), then
     * a little longer, for anything that should not run. */
    CHECK(t_run_until(loop, rec_has_43, &rec, 10.0));
    t_run_for(loop, 0.02);
    int k = 0;
    for (int i = 0; i < 40; i++)
        if (i != 9) CHECK_EQ(rec.order[k++], i);
    CHECK_EQ(rec.order[k++], 100); /* late_cb itself */
    CHECK_EQ(rec.order[k++], 0);   /* the rest of its batch */
    CHECK_EQ(rec.order[k++], 100); /* its call_soon */
    CHECK_EQ(rec.order[k++], 200); /* its past-due timer */
    CHECK_EQ(rec.n, k);
    for (int i = 0; i < 40; i++) ca_handle_unref(h[i]);
}

/* Many timers at random instants: they run in time order (the heap's pop is checked against
 * a sort). */
struct tcheck {
    double last;
    int n;
    bool bad;
    ca_loop *loop;
};
struct titem {
    struct tcheck *c;
    double when;
};
static void tcheck_cb(void *arg)
{
    struct titem *it = arg;
    if (it->when < it->c->last) it->c->bad = true;
    it->c->last = it->when;
    it->c->n++;
}
LOOP_TEST(timer_heap_pops_in_time_order)
{
    enum { N = 20000 };
    static struct titem items[N];
    struct tcheck c = {.last = -1, .loop = loop};
    double base = ca_loop_time(loop);
    uint64_t x = 88172645463325252u;
    for (int i = 0; i < N; i++) {
        x ^= x << 13, x ^= x >> 7, x ^= x << 17;
        items[i] = (struct titem){&c, base + (double)(x % 20000) * 1e-6};
        CHECK_OK(ca_loop_call_at(loop, items[i].when, tcheck_cb, &items[i], NULL));
    }
    t_run_for(loop, 0.05 + 0.2 * t_slow());
    CHECK_EQ(c.n, N);
    CHECK(!c.bad);
}

/* Another thread submits while the loop runs: the queue is taken whole when the ring is
 * empty, copied behind when it is not; either way every call runs once, in order. */
struct feeder {
    ca_loop *loop;
    struct seq *s;
    struct seq_item *items;
    int n;
};
static void *feeder_main(void *arg)
{
    struct feeder *f = arg;
    for (int i = 0; i < f->n; i++) {
        int r;
        while ((r = ca_loop_call_soon_threadsafe(f->loop, seq_cb, &f->items[i])) == -ENOMEM)
            sched_yield();
        if (r) f->s->bad = true;
        if (i % 1000 == 0) sched_yield();
    }
    return NULL;
}
static void keep_busy(void *arg)
{
    struct seq *s = arg;
    /* something in the ring most of the time, so both drain paths are taken */
    if (s->n < s->cap) ca_loop_call_soon(s->loop, keep_busy, s, NULL);
    else ca_loop_stop(s->loop);
}
LOOP_TEST(threadsafe_drain_both_paths_in_order)
{
    enum { N = 50000 };
    static int got[N];
    static struct seq_item items[N];
    struct seq s = {.loop = loop, .got = got, .cap = N};
    for (int i = 0; i < N; i++) items[i] = (struct seq_item){&s, i};
    struct feeder f = {loop, &s, items, N};
    pthread_t th;
    CHECK_OK(ca_loop_call_soon(loop, keep_busy, &s, NULL));
    CHECK_EQ(pthread_create(&th, NULL, feeder_main, &f), 0);
    CHECK_OK(ca_loop_run_forever(loop));
    pthread_join(th, NULL);
    t_run_for(loop, 0.01);
    CHECK(!s.bad);
    CHECK_EQ(s.n, N);
    for (int i = 0; i < N; i++) CHECK_EQ(got[i], i);
}

/* Done callbacks: more than fit inline, in the order added, interleaved with call_soon as
 * asyncio's one-call_soon-each would; callbacks added once done (while an earlier batch is
 * still waiting, and from inside a callback) come after; a future dropped by its owner in a
 * callback stays alive for the rest; a closed loop drops queued callbacks without a leak. */
struct fcb {
    struct rec *rec;
    ca_future *fut;
    ca_loop *loop;
    struct tag late;
    int id;
};
static void fcb_record(ca_future *f, void *arg)
{
    struct fcb *c = arg;
    (void)f;
    if (c->rec->n < 64) c->rec->order[c->rec->n++] = c->id;
}
static void fcb_add_more(ca_future *f, void *arg)
{
    struct fcb *c = arg;
    fcb_record(f, arg);
    ca_future_add_done_callback(f, fcb_record, &c[1]);      /* next iteration */
    ca_loop_call_soon(c->loop, record, &c->late, NULL);      /* queued after it */
}
static void fcb_drop_owner(ca_future *f, void *arg)
{
    struct fcb *c = arg;
    fcb_record(f, arg);
    if (c->fut) ca_future_unref(c->fut);
    c->fut = NULL;
}
LOOP_TEST(future_callbacks_order_and_lifetime)
{
    struct rec rec = {.n = 0};
    struct fcb c[8];
    for (int i = 0; i < 8; i++) c[i] = (struct fcb){&rec, NULL, loop, {&rec, 100 + i}, i};
    ca_future *f = NULL;
    CHECK_OK(ca_future_new(loop, &f));
    c[0].fut = f; /* c[0] drops the owner's reference */
    CHECK_OK(ca_future_add_done_callback(f, fcb_drop_owner, &c[0]));
    CHECK_OK(ca_future_add_done_callback(f, fcb_record, &c[1]));
    CHECK_OK(ca_future_add_done_callback(f, fcb_add_more, &c[2])); /* adds c[3] */
    CHECK_OK(ca_future_add_done_callback(f, fcb_record, &c[4]));
    struct tag mid = {&rec, 50};
    CHECK_OK(ca_future_set_result(f, NULL));
    CHECK_OK(ca_loop_call_soon(loop, record, &mid, NULL));
    CHECK_OK(ca_future_add_done_callback(f, fcb_record, &c[5])); /* done: after mid */
    CHECK_OK(ca_future_add_done_callback(f, fcb_record, &c[6])); /* and after c[5] */
    t_run_for(loop, 0.02);
    int want[] = {0, 1, 2, 4, 50, 5, 6, 3, 102};
    CHECK_EQ(rec.n, (int)(sizeof want / sizeof *want));
    for (int i = 0; i < rec.n; i++) CHECK_EQ(rec.order[i], want[i]);

    /* queued when the loop closes: never run, nothing leaks (valgrind) */
    ca_loop *l2 = NULL;
    CHECK_OK(t_new_loop(&l2));
    ca_future *g = NULL;
    CHECK_OK(ca_future_new(l2, &g));
    for (int i = 0; i < 5; i++) CHECK_OK(ca_future_add_done_callback(g, fcb_record, &c[7]));
    CHECK(ca_future_cancel(g));
    CHECK_OK(ca_future_add_done_callback(g, fcb_record, &c[7]));
    CHECK_OK(ca_future_add_done_callback(g, fcb_record, &c[7]));
    CHECK_OK(ca_loop_close(l2));
    ca_loop_unref(l2);
    ca_future_unref(g);
    CHECK_EQ(rec.n, (int)(sizeof want / sizeof *want));
}

/* Futures made and freed in the thread running the loop are recycled by the loop; other
 * threads make and free theirs at the same time (TSan checks they never share the cache);
 * the loop frees what it kept when it goes (valgrind checks). */
struct futchurn {
    ca_loop *loop;
    atomic_bool stop;
    int bad;
};
static void *churn_other(void *arg)
{
    struct futchurn *c = arg;
    while (!atomic_load(&c->stop)) {
        ca_future *f = NULL;
        if (ca_future_new(c->loop, &f) < 0 || ca_future_done(f)) c->bad++;
        if (f) ca_future_unref(f);
    }
    return NULL;
}
static void churn_here(void *arg)
{
    struct futchurn *c = arg;
    ca_future *fs[600];
    for (int round = 0; round < 20; round++) {
        for (int i = 0; i < 600; i++) {
            fs[i] = NULL;
            if (ca_future_new(c->loop, &fs[i]) < 0) c->bad++;
            /* a recycled future starts pending, with no result and no callback */
            void *res = (void *)1;
            if (ca_future_done(fs[i]) || ca_future_result(fs[i], &res) != -EAGAIN) c->bad++;
        }
        for (int i = 0; i < 600; i++) {
            if (i % 3 == 0) ca_future_set_result(fs[i], (void *)(intptr_t)i);
            ca_future_unref(fs[i]);
        }
    }
    ca_loop_stop(c->loop);
}
LOOP_TEST(future_cache_per_running_thread)
{
    struct futchurn c = {.loop = loop};
    atomic_init(&c.stop, false);
    pthread_t th;
    CHECK_EQ(pthread_create(&th, NULL, churn_other, &c), 0);
    CHECK_OK(ca_loop_call_soon(loop, churn_here, &c, NULL));
    CHECK_OK(ca_loop_run_forever(loop));
    atomic_store(&c.stop, true);
    pthread_join(th, NULL);
    CHECK_EQ(c.bad, 0);
}

/* A heap grown by a burst of timers shrinks when the loop blocks with few left; the ones
 * left still run in time order, and new ones after it. */
LOOP_TEST(timer_heap_shrinks_and_keeps_order)
{
    enum { BURST = 10000, LEFT = 100 };
    static struct titem items[BURST + LEFT + 10];
    struct tcheck c = {.last = -1, .loop = loop};
    double base = ca_loop_time(loop);
    for (int i = 0; i < BURST; i++) {
        items[i] = (struct titem){&c, base + (double)(i % 97) * 1e-6};
        CHECK_OK(ca_loop_call_at(loop, items[i].when, tcheck_cb, &items[i], NULL));
    }
    double later = base + 0.05 + 0.2 * t_slow();
    for (int i = 0; i < LEFT; i++) {
        items[BURST + i] = (struct titem){&c, later + (double)((i * 37) % LEFT) * 1e-5};
        CHECK_OK(ca_loop_call_at(loop, items[BURST + i].when, tcheck_cb, &items[BURST + i], NULL));
    }
    t_run_for(loop, 0.02); /* the burst runs; the loop then blocks with LEFT timers */
    CHECK_EQ(c.n, BURST);
    c.last = -1;
    for (int i = 0; i < 10; i++) {
        items[BURST + LEFT + i] = (struct titem){&c, later + 0.01 + i * 1e-5};
        CHECK_OK(ca_loop_call_at(loop, items[BURST + LEFT + i].when, tcheck_cb,
                                 &items[BURST + LEFT + i], NULL));
    }
    t_run_for(loop, later - ca_loop_time(loop) + 0.05);
    CHECK_EQ(c.n, BURST + LEFT + 10);
    CHECK(!c.bad);
}

/* Futures made while the loop runs take their loop references from a per-loop batch, given
 * back when the loop stops: a loop whose user drops it after a run is freed (valgrind and
 * ASan check that), and futures that outlive both the run and the user's reference keep the
 * loop alive until the last of them goes (ASan checks that no freed loop is touched). */
struct bankrun {
    ca_future *keep[300];
    int n;
};
static void bank_make(void *arg)
{
    struct bankrun *b = arg;
    ca_loop *l = ca_get_running_loop();
    /* more than one batch, some freed at once (back to the batch), most kept */
    for (int i = 0; i < 300; i++) {
        ca_future *f = NULL;
        if (ca_future_new(l, &f) < 0) break;
        if (i % 4 == 0) {
            ca_future_unref(f);
        } else {
            b->keep[b->n++] = f;
        }
    }
    ca_loop_stop(l);
}
TEST(future_loop_refs_batched_while_running)
{
    for (int kind = 0; kind < 2; kind++) {
        ca_loop *l = NULL;
        CHECK_OK(kind ? ca_poll_loop_new(&l) : ca_selector_loop_new(&l));
        static struct bankrun b;
        b.n = 0;
        CHECK_OK(ca_loop_call_soon(l, bank_make, &b, NULL));
        CHECK_OK(ca_loop_run_forever(l));
        CHECK_EQ(b.n, 225);
        CHECK_OK(ca_loop_close(l));
        ca_loop_unref(l); /* the futures still hold it */
        for (int i = 0; i < b.n; i++) {
            CHECK(ca_future_loop(b.keep[i]) == l);
            CHECK(ca_loop_is_closed(ca_future_loop(b.keep[i])));
            ca_future_unref(b.keep[i]);
        }
        /* and a loop nobody keeps any more after a run is freed (leak checkers) */
        CHECK_OK(ca_selector_loop_new(&l));
        b.n = 0;
        CHECK_OK(ca_loop_call_soon(l, bank_make, &b, NULL));
        CHECK_OK(ca_loop_run_forever(l));
        for (int i = 0; i < b.n; i++) ca_future_unref(b.keep[i]);
        ca_loop_unref(l);
    }
}
