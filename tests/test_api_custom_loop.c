/*
 * Contract tests for API.md's "Event loop" (custom loops, ca_loop_new_custom): the checks made
 * before any op is called, missing ops, which ops are called and what their errors do. Each test
 * names the statement it checks; a failure is a disagreement between the code and API.md.
 */
#include "contract_util.h"

/* ca_loop_new_custom: NULL ops or NULL run_forever -EINVAL, out untouched. */
TEST(custom_new_checks)
{
    ca_loop *l = SENT_LOOP;
    CHECK_ERR(ca_loop_new_custom(NULL, NULL, &l), -EINVAL);
    ca_loop_ops no_run = {.call_soon = spy_sched};
    CHECK_ERR(ca_loop_new_custom(&no_run, NULL, &l), -EINVAL);
    CHECK(l == SENT_LOOP);
    struct spy s = {0};
    CHECK_OK(ca_loop_new_custom(&spy_ops, &s, &l));
    CHECK(ca_loop_data(l) == &s);
    CHECK(strcmp(ca_loop_kind(l), "custom") == 0);
    ca_loop *e = new_epoll();
    CHECK(ca_loop_data(e) == NULL);
    loop_done(e);
    CHECK(ca_loop_ref(l) == l);
    ca_loop_unref(l);
    CHECK_EQ(s.destroyed, 0);
    loop_done(l);
    CHECK_EQ(s.destroyed, 1); /* destroy once, at the last reference */
}

/* "The public functions do the argument checks, the closed and fork checks ... before calling
 * the op, so ops do not repeat them." */
TEST(custom_checks_before_ops)
{
    struct spy s = {0};
    ca_loop *l = NULL;
    CHECK_OK(ca_loop_new_custom(&spy_ops, &s, &l));
    ca_handle *h = SENT_HANDLE;
    ca_future *f = SENT_FUT;
    char buf[4];
    CHECK_ERR(ca_loop_call_soon(l, NULL, NULL, &h), -EINVAL);
    CHECK_ERR(ca_loop_call_soon_threadsafe(l, NULL, NULL), -EINVAL);
    CHECK_ERR(ca_loop_call_later(l, 1, NULL, NULL, &h), -EINVAL);
    CHECK_ERR(ca_loop_call_at(l, NAN, noop, NULL, &h), -EINVAL);
    CHECK_ERR(ca_loop_add_reader(l, -1, noop, NULL), -EINVAL);
    CHECK_ERR(ca_loop_add_writer(l, -1, noop, NULL), -EINVAL);
    CHECK_ERR(ca_loop_remove_reader(l, -1), -EINVAL);
    CHECK_ERR(ca_loop_remove_writer(l, -1), -EINVAL);
    CHECK_ERR(ca_loop_add_signal_handler(l, 0, noop, NULL), -EINVAL);
    CHECK_ERR(ca_loop_add_signal_handler(l, SIGKILL, noop, NULL), -EINVAL);
    CHECK_ERR(ca_loop_remove_signal_handler(l, 999), -EINVAL);
    CHECK_ERR(ca_loop_sock_recv(l, -1, buf, 4, &f), -EINVAL);
    CHECK_ERR(ca_loop_sock_sendall(l, -1, buf, 4, &f), -EINVAL);
    CHECK_ERR(ca_loop_sock_accept(l, -1, &f), -EINVAL);
    CHECK_ERR(ca_loop_sock_connect(l, 3, NULL, 0, &f), -EINVAL);
    CHECK_EQ(s.calls, 0);
    CHECK(h == SENT_HANDLE && f == SENT_FUT);
    /* Valid calls reach the ops. */
    CHECK_OK(ca_loop_call_soon(l, noop, NULL, NULL));
    CHECK_OK(ca_loop_call_soon_threadsafe(l, noop, NULL));
    CHECK_OK(ca_loop_call_later(l, 1, noop, NULL, NULL));
    CHECK_OK(ca_loop_call_at(l, 1, noop, NULL, NULL));
    CHECK_EQ(s.calls, 4);
    /* Closed: -EBADF (remove_*: 0) without calling the ops. */
    CHECK_OK(ca_loop_close(l));
    CHECK_EQ(s.closes, 1);
    CHECK_OK(ca_loop_close(l));
    CHECK_EQ(s.closes, 1);
    s.calls = 0;
    int p[2];
    CHECK_EQ(pipe2(p, O_CLOEXEC), 0);
    CHECK_ERR(ca_loop_call_soon(l, noop, NULL, &h), -EBADF);
    CHECK_ERR(ca_loop_call_soon_threadsafe(l, noop, NULL), -EBADF);
    CHECK_ERR(ca_loop_call_later(l, 1, noop, NULL, &h), -EBADF);
    CHECK_ERR(ca_loop_add_reader(l, p[0], noop, NULL), -EBADF);
    CHECK_ERR(ca_loop_add_writer(l, p[1], noop, NULL), -EBADF);
    CHECK_ERR(ca_loop_remove_reader(l, p[0]), 0);
    CHECK_ERR(ca_loop_remove_writer(l, p[1]), 0);
    CHECK_ERR(ca_loop_add_signal_handler(l, SIGUSR1, noop, NULL), -EBADF);
    CHECK_ERR(ca_loop_remove_signal_handler(l, SIGUSR1), 0);
    CHECK_ERR(ca_loop_sock_recv(l, p[0], buf, 4, &f), -EBADF);
    CHECK_ERR(ca_loop_run_forever(l), -EBADF);
    CHECK_EQ(s.calls, 0);
    ca_loop_stop(l);
    CHECK(h == SENT_HANDLE && f == SENT_FUT);
    close(p[0]);
    close(p[1]);
    ca_loop_unref(l);
}

/* "A NULL member means 'not provided' (-ENOTSUP; stop and close then do only the core's
 * part), except the sock_* members" */
TEST(custom_null_members_enotsup)
{
    struct spy s = {0};
    ca_loop *l = NULL;
    CHECK_OK(ca_loop_new_custom(&bare_ops, &s, &l));
    ca_handle *h = SENT_HANDLE;
    int p[2];
    CHECK_EQ(pipe2(p, O_CLOEXEC | O_NONBLOCK), 0);
    CHECK_ERR(ca_loop_call_soon(l, noop, NULL, &h), -ENOTSUP);
    CHECK_ERR(ca_loop_call_soon(l, noop, NULL, NULL), -ENOTSUP);
    CHECK_ERR(ca_loop_call_soon_threadsafe(l, noop, NULL), -ENOTSUP);
    CHECK_ERR(ca_loop_call_later(l, 0.1, noop, NULL, &h), -ENOTSUP);
    CHECK_ERR(ca_loop_call_at(l, 0.1, noop, NULL, &h), -ENOTSUP);
    CHECK(h == SENT_HANDLE);
    CHECK_ERR(ca_loop_add_reader(l, p[0], noop, NULL), -ENOTSUP);
    CHECK_ERR(ca_loop_remove_reader(l, p[0]), -ENOTSUP);
    CHECK_ERR(ca_loop_add_writer(l, p[1], noop, NULL), -ENOTSUP);
    CHECK_ERR(ca_loop_remove_writer(l, p[1]), -ENOTSUP);
    CHECK_ERR(ca_loop_add_signal_handler(l, SIGUSR1, noop, NULL), -ENOTSUP);
    CHECK_ERR(ca_loop_remove_signal_handler(l, SIGUSR1), -ENOTSUP);
    /* stop and close: the core's part only. */
    ca_loop_stop(l);
    CHECK(!ca_loop_is_closed(l));
    CHECK_OK(ca_loop_close(l));
    CHECK(ca_loop_is_closed(l));
    CHECK_OK(ca_loop_close(l));
    close(p[0]);
    close(p[1]);
    ca_loop_unref(l);
    CHECK_EQ(s.destroyed, 1);
}

/* call_later "uses" call_at: the op receives loop time + delay. */
static double seen_when;
static int at_rec(ca_loop *self, double when, ca_handle *h)
{
    seen_when = when;
    return 0;
}
static const ca_loop_ops at_ops = {.run_forever = spy_run, .call_at = at_rec};

TEST(custom_call_later_uses_call_at)
{
    ca_loop *l = NULL;
    CHECK_OK(ca_loop_new_custom(&at_ops, NULL, &l));
    double t = ca_loop_time(l);
    CHECK_OK(ca_loop_call_later(l, 5.0, noop, NULL, NULL));
    CHECK(fabs(seen_when - (t + 5.0)) < 0.05);
    seen_when = 0;
    CHECK_OK(ca_loop_call_later(l, -3.0, noop, NULL, NULL));
    CHECK(seen_when <= ca_loop_time(l) + 0.001 && seen_when >= t - 0.001);
    loop_done(l);
}

/* "Scheduling ops receive a handle made by the core (borrowed: an op that keeps it takes
 * ca_handle_ref) and run it with ca_handle_run when due." ca_handle_run "runs the callback
 * unless cancelled". */
static ca_handle *kept[8];
static int nkept;
static int keep_soon(ca_loop *self, ca_handle *h)
{
    kept[nkept++] = ca_handle_ref(h);
    return 0;
}
static const ca_loop_ops keep_ops = {.run_forever = spy_run, .call_soon = keep_soon};

TEST(custom_handle_run)
{
    ca_loop *l = NULL;
    nkept = 0;
    CHECK_OK(ca_loop_new_custom(&keep_ops, NULL, &l));
    int a = 0, b = 0, c = 0;
    ca_handle *hb = NULL;
    CHECK_OK(ca_loop_call_soon(l, count_cb, &a, NULL)); /* caller declines the handle */
    CHECK_OK(ca_loop_call_soon(l, count_cb, &b, &hb));
    CHECK_OK(ca_loop_call_soon(l, count_cb, &c, NULL));
    CHECK_EQ(nkept, 3);
    CHECK(kept[1] == hb);
    ca_handle_cancel(hb);
    for (int i = 0; i < 3; i++) ca_handle_run(kept[i]);
    CHECK_EQ(a, 1);
    CHECK_EQ(b, 0);
    CHECK_EQ(c, 1);
    for (int i = 0; i < 3; i++) ca_handle_unref(kept[i]);
    ca_handle_unref(hb);
    loop_done(l);
}

/* "except the sock_* members, which the core then implements with readers/writers" */
TEST(custom_sock_ops_through_readers)
{
    ca_loop *loop = NULL;
    CHECK_OK(t_custom_loop_new(&loop));
    int sv[2];
    CHECK_EQ(socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0, sv), 0);
    char buf[16] = {0};
    ca_future *r = NULL, *s = NULL;
    CHECK_OK(ca_loop_sock_recv(loop, sv[0], buf, sizeof buf, &r));
    CHECK_OK(ca_loop_sock_sendall(loop, sv[1], "hello", 5, &s));
    CHECK_ERR(ca_loop_run_until_complete(loop, r), 0);
    CHECK_ERR(ca_loop_run_until_complete(loop, s), 0);
    void *res = SENT_PTR;
    CHECK_OK(ca_future_result(r, &res));
    CHECK_EQ((intptr_t)res, 5);
    CHECK(memcmp(buf, "hello", 5) == 0);
    CHECK_OK(ca_future_result(s, &res));
    CHECK_EQ((intptr_t)res, 0);
    ca_future_unref(r);
    ca_future_unref(s);
    close(sv[0]);
    close(sv[1]);
    loop_done(loop);
}

/* enter/exit_running: "for a foreign loop run by foreign code" */
TEST(custom_enter_exit_running)
{
    struct spy s = {0};
    ca_loop *l = NULL;
    CHECK_OK(ca_loop_new_custom(&spy_ops, &s, &l));
    CHECK(!ca_loop_is_running(l));
    CHECK_ERR(ca_loop_exit_running(l), -EINVAL); /* not running here */
    CHECK_OK(ca_loop_enter_running(l));
    CHECK(ca_loop_is_running(l));
    CHECK(ca_get_running_loop() == l);
    CHECK_ERR(ca_loop_enter_running(l), -EBUSY);
    CHECK_ERR(ca_loop_close(l), -EBUSY);
    CHECK_ERR(ca_loop_run_forever(l), -EBUSY);
    ca_loop *other = new_epoll();
    CHECK_ERR(ca_loop_enter_running(other), -EBUSY);
    CHECK_ERR(ca_loop_run_forever(other), -EBUSY);
    CHECK_ERR(ca_loop_exit_running(other), -EINVAL);
    ca_loop *got = NULL;
    CHECK_OK(ca_get_event_loop(&got));
    CHECK(got == l);
    CHECK_OK(ca_loop_exit_running(l));
    CHECK(!ca_loop_is_running(l));
    CHECK(ca_get_running_loop() == NULL);
    CHECK_ERR(ca_loop_exit_running(l), -EINVAL);
    loop_done(other);
    CHECK_OK(ca_loop_close(l));
    CHECK_ERR(ca_loop_enter_running(l), -EBADF);
    ca_loop_unref(l);
}

/* run_until_complete on a custom loop: bookkeeping done by the core around run_forever. */
struct cr {
    int nrun;
    ca_future *f;
    ca_loop *seen_running;
    bool is_running;
};
static int cr_run(ca_loop *self)
{
    struct cr *c = ca_loop_data(self);
    c->nrun++;
    c->seen_running = ca_get_running_loop();
    c->is_running = ca_loop_is_running(self);
    ca_future_set_result(c->f, (void *)7);
    return 0;
}
static const ca_loop_ops cr_ops = {.run_forever = cr_run};

TEST(custom_running_bookkeeping)
{
    struct cr c = {0};
    ca_loop *l = NULL;
    CHECK_OK(ca_loop_new_custom(&cr_ops, &c, &l));
    CHECK_OK(ca_future_new(l, &c.f));
    CHECK_OK(ca_loop_run_forever(l));
    CHECK_EQ(c.nrun, 1);
    CHECK(c.seen_running == l);
    CHECK(c.is_running);
    CHECK(!ca_loop_is_running(l));
    CHECK(ca_get_running_loop() == NULL);
    ca_future_unref(c.f);
    loop_done(l);
}

/* Provided sock_* ops are called (after the checks) and their result returned. */
TEST(custom_sock_ops_called)
{
    struct spy s = {0};
    ca_loop *l = NULL;
    CHECK_OK(ca_loop_new_custom(&spy_ops, &s, &l));
    int sv[2];
    sockpair(sv);
    char buf[4];
    ca_future *f = SENT_FUT;
    CHECK_ERR(ca_loop_sock_recv(l, sv[0], buf, 4, &f), -ENOSYS);
    CHECK_ERR(ca_loop_sock_sendall(l, sv[0], buf, 4, &f), -ENOSYS);
    CHECK_ERR(ca_loop_sock_accept(l, sv[0], &f), -ENOSYS);
    struct sockaddr_in sa = {.sin_family = AF_INET};
    CHECK_ERR(ca_loop_sock_connect(l, sv[0], (struct sockaddr *)&sa, sizeof sa, &f), -ENOSYS);
    CHECK_EQ(s.calls, 4);
    CHECK(f == SENT_FUT);
    close(sv[0]);
    close(sv[1]);
    loop_done(l);
}

/* Custom loop: ca_loop_stop and ca_loop_close call the ops once (core part + op). */
TEST(custom_stop_close_ops_called)
{
    struct spy s = {0};
    ca_loop *l = NULL;
    CHECK_OK(ca_loop_new_custom(&spy_ops, &s, &l));
    ca_loop_stop(l);
    CHECK(s.stops <= 1);
    CHECK_OK(ca_loop_enter_running(l));
    ca_loop_stop(l);
    CHECK(s.stops >= 1);
    CHECK_OK(ca_loop_exit_running(l));
    CHECK_OK(ca_loop_close(l));
    CHECK_EQ(s.closes, 1);
    ca_loop_unref(l);
    CHECK_EQ(s.destroyed, 1);
}

/* A custom op's error is returned; out untouched; the callback never runs. */
static ca_handle *failed_kept;
static int fail_soon(ca_loop *self, ca_handle *h)
{
    failed_kept = h; /* borrowed, not kept: must not be used after */
    return -EIO;
}
static int fail_at(ca_loop *self, double when, ca_handle *h) { return -EIO; }
static int fail_fd(ca_loop *self, int fd, ca_callback_fn fn, void *arg) { return -EIO; }
static const ca_loop_ops fail_ops = {.run_forever = spy_run,
                                     .call_soon = fail_soon,
                                     .call_soon_threadsafe = fail_soon,
                                     .call_at = fail_at,
                                     .add_reader = fail_fd,
                                     .add_writer = fail_fd,
                                     .add_signal_handler = fail_fd};

TEST(custom_op_error_returned)
{
    ca_loop *l = NULL;
    CHECK_OK(ca_loop_new_custom(&fail_ops, NULL, &l));
    ca_handle *h = SENT_HANDLE;
    int n = 0;
    CHECK_ERR(ca_loop_call_soon(l, count_cb, &n, &h), -EIO);
    CHECK_ERR(ca_loop_call_soon_threadsafe(l, count_cb, &n), -EIO);
    CHECK_ERR(ca_loop_call_later(l, 1, count_cb, &n, &h), -EIO);
    CHECK_ERR(ca_loop_call_at(l, 1, count_cb, &n, &h), -EIO);
    CHECK(h == SENT_HANDLE);
    int p[2];
    CHECK_EQ(pipe2(p, O_CLOEXEC), 0);
    CHECK_ERR(ca_loop_add_reader(l, p[0], count_cb, &n), -EIO);
    CHECK_ERR(ca_loop_add_writer(l, p[1], count_cb, &n), -EIO);
    CHECK_ERR(ca_loop_add_signal_handler(l, SIGUSR1, count_cb, &n), -EIO);
    CHECK_EQ(n, 0);
    close(p[0]);
    close(p[1]);
    loop_done(l);
}
