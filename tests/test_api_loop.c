/*
 * Contract tests for API.md's "Event loop": callback order, timers, time, readers and writers,
 * signals, running state, threads. Each test names the statement it checks; a failure is a
 * disagreement between the code and API.md.
 */
#include "contract_util.h"

static void stop_cb(void *arg) { ca_loop_stop(arg); }

/* "callbacks run FIFO" */
static int order_buf[64], order_n;
static void order_cb(void *arg) { order_buf[order_n++] = (int)(intptr_t)arg; }

LOOP_TEST(loop_call_soon_fifo)
{
    order_n = 0;
    for (int i = 0; i < 20; i++) CHECK_OK(ca_loop_call_soon(loop, order_cb, (void *)(intptr_t)i, NULL));
    run_once(loop);
    CHECK_EQ(order_n, 20);
    for (int i = 0; i < 20; i++) CHECK_EQ(order_buf[i], i);
}

/* "timers by time, then FIFO among equal times" */
LOOP_TEST(loop_timers_by_time_then_fifo)
{
    order_n = 0;
    double t0 = ca_loop_time(loop);
    CHECK_OK(ca_loop_call_at(loop, t0 + 0.03, order_cb, (void *)3, NULL));
    CHECK_OK(ca_loop_call_at(loop, t0 + 0.01, order_cb, (void *)1, NULL));
    for (int i = 10; i < 20; i++)
        CHECK_OK(ca_loop_call_at(loop, t0 + 0.02, order_cb, (void *)(intptr_t)i, NULL));
    CHECK_OK(ca_loop_call_at(loop, t0 + 0.005, order_cb, (void *)0, NULL));
    CHECK_OK(ca_loop_call_at(loop, t0 + 0.02, order_cb, (void *)20, NULL));
    CHECK_OK(ca_loop_call_at(loop, t0 + 0.05, stop_cb, loop, NULL));
    CHECK_OK(ca_loop_run_forever(loop));
    CHECK_EQ(order_n, 14);
    CHECK_EQ(order_buf[0], 0);
    CHECK_EQ(order_buf[1], 1);
    for (int i = 0; i < 11; i++) CHECK_EQ(order_buf[2 + i], 10 + i);
    CHECK_EQ(order_buf[13], 3);
}

/* Equal times in the past (already due) still FIFO; call_later with a negative delay counts
 * as 0. */
LOOP_TEST(loop_timers_equal_due_fifo)
{
    order_n = 0;
    double t = ca_loop_time(loop) - 1.0;
    for (int i = 0; i < 16; i++) CHECK_OK(ca_loop_call_at(loop, t, order_cb, (void *)(intptr_t)i, NULL));
    CHECK_OK(ca_loop_call_later(loop, -5.0, order_cb, (void *)99, NULL));
    t_run_for(loop, 0.01);
    CHECK_EQ(order_n, 17);
    for (int i = 0; i < 16; i++) CHECK_EQ(order_buf[i], i);
    CHECK_EQ(order_buf[16], 99);
}

/* "a callback scheduled from a callback runs on the next iteration" */
struct resched {
    ca_loop *loop;
    int inner;
};
static void inner_cb(void *arg) { ((struct resched *)arg)->inner++; }
static void outer_cb(void *arg)
{
    struct resched *r = arg;
    CHECK_OK(ca_loop_call_soon(r->loop, inner_cb, r, NULL));
}

LOOP_TEST(loop_call_soon_from_callback_next_iteration)
{
    struct resched r = {loop, 0};
    CHECK_OK(ca_loop_call_soon(loop, outer_cb, &r, NULL));
    run_once(loop);
    CHECK_EQ(r.inner, 0);
    run_once(loop);
    CHECK_EQ(r.inner, 1);
}

/* A due timer scheduled (with delay 0) from a callback also waits for the next iteration. */
static void outer_later_cb(void *arg)
{
    struct resched *r = arg;
    CHECK_OK(ca_loop_call_later(r->loop, 0, inner_cb, r, NULL));
}

LOOP_TEST(loop_call_later_zero_from_callback_not_same_iteration)
{
    struct resched r = {loop, 0};
    CHECK_OK(ca_loop_call_soon(loop, outer_later_cb, &r, NULL));
    run_once(loop);
    CHECK_EQ(r.inner, 0);
    CHECK(t_run_until(loop, t_flag_set, &r.inner, 1.0));
}

/* "ca_loop_time reads the monotonic clock at each call." */
LOOP_TEST(loop_time_reads_clock_each_call)
{
    double a = ca_loop_time(loop);
    sleep_s(0.02);
    double b = ca_loop_time(loop);
    CHECK(b - a >= 0.019);
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    double m = ts.tv_sec + ts.tv_nsec / 1e9;
    double c = ca_loop_time(loop);
    CHECK(fabs(c - m) < 0.01);
    /* Inside a callback too, not a cached iteration time. */
}

static void time_in_cb(void *arg)
{
    double *d = arg;
    ca_loop *l = ca_get_running_loop();
    double a = ca_loop_time(l);
    sleep_s(0.02);
    d[0] = ca_loop_time(l) - a;
}

LOOP_TEST(loop_time_reads_clock_inside_callback)
{
    double d[1] = {0};
    CHECK_OK(ca_loop_call_soon(loop, time_in_cb, d, NULL));
    run_once(loop);
    CHECK(d[0] >= 0.019);
}

TEST(loop_time_custom_op_called_each_call)
{
    struct spy s = {0};
    ca_loop *l = NULL;
    CHECK_OK(ca_loop_new_custom(&spy_ops, &s, &l));
    double a = ca_loop_time(l), b = ca_loop_time(l);
    CHECK(b > a);
    CHECK_EQ(s.time_calls, 2);
    ca_loop *l2 = NULL;
    struct spy s2 = {0};
    CHECK_OK(ca_loop_new_custom(&bare_ops, &s2, &l2));
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    double m = ts.tv_sec + ts.tv_nsec / 1e9;
    CHECK(fabs(ca_loop_time(l2) - m) < 0.01); /* NULL time: CLOCK_MONOTONIC */
    loop_done(l);
    loop_done(l2);
}

/* run_forever -EBUSY if already running; close -EBUSY while running; is_running. */
struct busy {
    ca_loop *loop;
    int run_r, close_r, rucr;
    bool running, closed;
    ca_loop *running_loop;
};
static void busy_cb(void *arg)
{
    struct busy *b = arg;
    b->run_r = ca_loop_run_forever(b->loop);
    b->close_r = ca_loop_close(b->loop);
    ca_future *f = NULL;
    CHECK_OK(ca_future_new(b->loop, &f));
    b->rucr = ca_loop_run_until_complete(b->loop, f);
    ca_future_unref(f);
    b->running = ca_loop_is_running(b->loop);
    b->closed = ca_loop_is_closed(b->loop);
    b->running_loop = ca_get_running_loop();
    ca_loop_stop(b->loop);
}

LOOP_TEST(loop_busy_while_running)
{
    struct busy b = {.loop = loop};
    CHECK(!ca_loop_is_running(loop));
    CHECK(ca_get_running_loop() == NULL);
    CHECK_OK(ca_loop_call_soon(loop, busy_cb, &b, NULL));
    CHECK_OK(ca_loop_run_forever(loop));
    CHECK_ERR(b.run_r, -EBUSY);
    CHECK_ERR(b.close_r, -EBUSY);
    CHECK_ERR(b.rucr, -EBUSY);
    CHECK(b.running);
    CHECK(!b.closed);
    CHECK(b.running_loop == loop);
    CHECK(!ca_loop_is_running(loop));
    CHECK(ca_get_running_loop() == NULL);
}

/* "running a second loop in a thread where one runs -EBUSY" */
struct second {
    ca_loop *other;
    int r1, r2, r3;
};
static void second_cb(void *arg)
{
    struct second *s = arg;
    s->r1 = ca_loop_run_forever(s->other);
    ca_future *f = NULL;
    CHECK_OK(ca_future_new(s->other, &f));
    s->r2 = ca_loop_run_until_complete(s->other, f);
    ca_future_unref(f);
    s->r3 = ca_loop_enter_running(s->other);
    ca_loop_stop(ca_get_running_loop());
}

LOOP_TEST(loop_second_loop_in_thread_ebusy)
{
    struct second s = {.other = new_epoll()};
    CHECK_OK(ca_loop_call_soon(loop, second_cb, &s, NULL));
    CHECK_OK(ca_loop_run_forever(loop));
    CHECK_ERR(s.r1, -EBUSY);
    CHECK_ERR(s.r2, -EBUSY);
    CHECK_ERR(s.r3, -EBUSY);
    CHECK(!ca_loop_is_running(s.other));
    loop_done(s.other);
}

/* run_until_complete "returns the future's error, 0 if it has a result" */
static void set_err_cb(void *arg) { CHECK_OK(ca_future_set_error(arg, -ETIMEDOUT)); }

LOOP_TEST(loop_run_until_complete_outcomes)
{
    ca_future *f = NULL;
    void *res = NULL;
    CHECK_OK(ca_future_new(loop, &f));
    CHECK_OK(ca_loop_call_later(loop, 0.005, set_res_cb, f, NULL));
    CHECK_ERR(ca_loop_run_until_complete(loop, f), 0);
    CHECK_OK(ca_future_result(f, &res));
    CHECK_EQ((intptr_t)res, 42);
    /* Already done: returns at once with the same outcome. */
    CHECK_ERR(ca_loop_run_until_complete(loop, f), 0);
    ca_future_unref(f);
    CHECK_OK(ca_future_new(loop, &f));
    CHECK_OK(ca_loop_call_soon(loop, set_err_cb, f, NULL));
    CHECK_ERR(ca_loop_run_until_complete(loop, f), -ETIMEDOUT);
    ca_future_unref(f);
    CHECK_OK(ca_future_new(loop, &f));
    CHECK_OK(ca_loop_call_soon(loop, cancel_cb, f, NULL));
    CHECK_ERR(ca_loop_run_until_complete(loop, f), -ECANCELED);
    ca_future_unref(f);
    /* A future of another loop: -EINVAL. */
    ca_loop *other = new_epoll();
    CHECK_OK(ca_future_new(other, &f));
    CHECK_ERR(ca_loop_run_until_complete(loop, f), -EINVAL);
    ca_future_unref(f);
    loop_done(other);
}

/* ca_handle_cancel "idempotent; safe after it ran"; ca_handle_cancelled. */
LOOP_TEST(loop_handle_cancel)
{
    int n = 0, m = 0;
    ca_handle *h = NULL, *h2 = NULL, *h3 = NULL;
    CHECK_OK(ca_loop_call_soon(loop, count_cb, &n, &h));
    CHECK(!ca_handle_cancelled(h));
    ca_handle_cancel(h);
    CHECK(ca_handle_cancelled(h));
    ca_handle_cancel(h);
    CHECK(ca_handle_cancelled(h));
    CHECK_OK(ca_loop_call_later(loop, 0.001, count_cb, &n, &h2));
    ca_handle_cancel(h2);
    CHECK_OK(ca_loop_call_soon(loop, count_cb, &m, &h3));
    t_run_for(loop, 0.02);
    CHECK_EQ(n, 0);
    CHECK_EQ(m, 1);
    ca_handle_cancel(h3); /* after it ran */
    ca_handle_cancel(h3);
    ca_handle_unref(h);
    ca_handle_unref(h2);
    CHECK_OK(ca_loop_close(loop));
    ca_handle_cancel(h3); /* after the loop closed */
    ca_handle_unref(h3);
}

/* "Readers and writers are level-triggered on every loop kind" */
LOOP_TEST(loop_reader_level_triggered)
{
    int p[2];
    CHECK_EQ(pipe2(p, O_CLOEXEC | O_NONBLOCK), 0);
    struct lvl l = {p[0], 0};
    CHECK_OK(ca_loop_add_reader(loop, p[0], lvl_cb, &l));
    CHECK_EQ(write(p[1], "x", 1), 1);
    for (int i = 0; i < 5; i++) {
        int before = l.n;
        t_run_for(loop, 0.005);
        CHECK(l.n > before); /* still readable: called again on each slice */
    }
    CHECK_EQ(ca_loop_remove_reader(loop, p[0]), 1);
    CHECK_EQ(ca_loop_remove_reader(loop, p[0]), 0);
    int before = l.n;
    t_run_for(loop, 0.01);
    CHECK_EQ(l.n, before);
    close(p[0]);
    close(p[1]);
}

LOOP_TEST(loop_writer_level_triggered)
{
    int p[2];
    CHECK_EQ(pipe2(p, O_CLOEXEC | O_NONBLOCK), 0);
    struct lvl l = {p[1], 0};
    CHECK_OK(ca_loop_add_writer(loop, p[1], lvl_cb, &l));
    struct lvl *lp = &l;
    for (int i = 0; i < 3; i++) {
        int before = l.n;
        double t0 = now_s();
        while (lp->n < before + 3 && now_s() - t0 < 2.0 * t_slow()) t_run_for(loop, 0.002);
        CHECK(l.n >= before + 3); /* writable all along: called again and again */
    }
    CHECK_EQ(ca_loop_remove_writer(loop, p[1]), 1);
    CHECK_EQ(ca_loop_remove_writer(loop, p[1]), 0);
    close(p[0]);
    close(p[1]);
}

/* Every iteration while readable: n iterations -> n calls. */
LOOP_TEST(loop_reader_called_every_iteration)
{
    int p[2];
    CHECK_EQ(pipe2(p, O_CLOEXEC | O_NONBLOCK), 0);
    struct lvl l = {p[0], 0};
    CHECK_EQ(write(p[1], "x", 1), 1);
    CHECK_OK(ca_loop_add_reader(loop, p[0], lvl_cb, &l));
    for (int i = 0; i < 6; i++) run_once(loop);
    /* The first iteration may still be registering (proactor); at least 5 of 6. */
    CHECK(l.n >= 5);
    CHECK(l.n <= 6);
    CHECK_EQ(ca_loop_remove_reader(loop, p[0]), 1);
    close(p[0]);
    close(p[1]);
}

/* Level-triggered "on every loop iteration" also while callbacks keep the loop busy: a
 * callback that reschedules itself 40 times makes 40 iterations; the readable fd's reader
 * must be called in (nearly) each of them, as asyncio's _run_once selects every time. */
struct chain {
    ca_loop *loop;
    int left, iters;
};
static void chain_cb(void *arg)
{
    struct chain *c = arg;
    c->iters++;
    if (--c->left > 0) CHECK_OK(ca_loop_call_soon(c->loop, chain_cb, c, NULL));
    else ca_loop_stop(c->loop);
}

LOOP_TEST(loop_reader_called_every_iteration_while_busy)
{
    int p[2];
    CHECK_EQ(pipe2(p, O_CLOEXEC | O_NONBLOCK), 0);
    struct lvl l = {p[0], 0};
    CHECK_EQ(write(p[1], "x", 1), 1);
    CHECK_OK(ca_loop_add_reader(loop, p[0], lvl_cb, &l));
    t_run_for(loop, 0.01); /* registered and seen at least once */
    CHECK(l.n > 0);
    l.n = 0;
    struct chain c = {loop, 40, 0};
    CHECK_OK(ca_loop_call_soon(loop, chain_cb, &c, NULL));
    CHECK_OK(ca_loop_run_forever(loop));
    CHECK_EQ(c.iters, 40);
    CHECK(l.n >= 38);
    CHECK_EQ(ca_loop_remove_reader(loop, p[0]), 1);
    close(p[0]);
    close(p[1]);
}

/* add_reader "replaces" */
LOOP_TEST(loop_add_reader_replaces)
{
    int p[2];
    CHECK_EQ(pipe2(p, O_CLOEXEC | O_NONBLOCK), 0);
    struct lvl a = {p[0], 0}, b = {p[0], 0};
    CHECK_OK(ca_loop_add_reader(loop, p[0], lvl_cb, &a));
    CHECK_OK(ca_loop_add_reader(loop, p[0], lvl_cb, &b));
    CHECK_EQ(write(p[1], "x", 1), 1);
    t_run_for(loop, 0.01);
    CHECK_EQ(a.n, 0);
    CHECK(b.n > 0);
    CHECK_OK(ca_loop_add_writer(loop, p[1], lvl_cb, &a));
    CHECK_OK(ca_loop_add_writer(loop, p[1], lvl_cb, &b));
    a.n = 0;
    t_run_for(loop, 0.01);
    CHECK_EQ(a.n, 0);
    CHECK_EQ(ca_loop_remove_reader(loop, p[0]), 1);
    CHECK_EQ(ca_loop_remove_writer(loop, p[1]), 1);
    close(p[0]);
    close(p[1]);
}

/* "remove_reader 1 removed, 0 nothing to remove" (also for an fd never added). */
LOOP_TEST(loop_remove_nothing_zero)
{
    int p[2];
    CHECK_EQ(pipe2(p, O_CLOEXEC | O_NONBLOCK), 0);
    CHECK_EQ(ca_loop_remove_reader(loop, p[0]), 0);
    CHECK_EQ(ca_loop_remove_writer(loop, p[1]), 0);
    CHECK_OK(ca_loop_add_reader(loop, p[0], noop, NULL));
    CHECK_EQ(ca_loop_remove_writer(loop, p[0]), 0);
    CHECK_EQ(ca_loop_remove_reader(loop, p[0]), 1);
    close(p[0]);
    close(p[1]);
}

/* Signal handlers: "remove 1 / 0". Delivered on the loop. */
LOOP_TEST(loop_signal_handler_add_remove)
{
    int n = 0;
    int r = ca_loop_add_signal_handler(loop, SIGUSR1, count_cb, &n);
    if (r == -ENOTSUP && strcmp(t_loop_kind, "custom") == 0) SKIP("custom test loop has no signals");
    CHECK_OK(r);
    kill(getpid(), SIGUSR1);
    CHECK(t_run_until(loop, t_flag_set, &n, 2.0));
    CHECK_EQ(ca_loop_remove_signal_handler(loop, SIGUSR1), 1);
    CHECK_EQ(ca_loop_remove_signal_handler(loop, SIGUSR1), 0);
    CHECK_EQ(ca_loop_remove_signal_handler(loop, SIGUSR2), 0);
}

/* "Signal handlers may be added on loops in any thread; several loops may watch the same
 * signal." */
struct sigthr {
    ca_loop *loop;
    int n;
    atomic_int ready;
    int add_r;
};
static void sig_thr_cb(void *arg)
{
    struct sigthr *s = arg;
    s->n++;
    ca_loop_stop(s->loop);
}
static void *sig_thread(void *arg)
{
    struct sigthr *s = arg;
    s->add_r = ca_loop_add_signal_handler(s->loop, SIGUSR2, sig_thr_cb, s);
    atomic_store(&s->ready, 1);
    if (s->add_r == 0) {
        ca_handle *h = NULL;
        ca_loop_call_later(s->loop, 5.0 * t_slow(), stop_cb, s->loop, &h);
        ca_loop_run_forever(s->loop);
        ca_handle_cancel(h);
        ca_handle_unref(h);
        ca_loop_remove_signal_handler(s->loop, SIGUSR2);
    }
    return NULL;
}

TEST(loop_signal_two_threads_same_signal)
{
    struct sigthr a = {.loop = new_epoll()}, b = {0};
    CHECK_OK(ca_poll_loop_new(&b.loop));
    int n_main = 0;
    ca_loop *m = new_epoll();
    CHECK_OK(ca_loop_add_signal_handler(m, SIGUSR2, count_cb, &n_main));
    pthread_t ta, tb;
    CHECK_EQ(pthread_create(&ta, NULL, sig_thread, &a), 0);
    CHECK_EQ(pthread_create(&tb, NULL, sig_thread, &b), 0);
    while (!atomic_load(&a.ready) || !atomic_load(&b.ready)) sleep_s(0.001);
    CHECK_OK(a.add_r);
    CHECK_OK(b.add_r);
    kill(getpid(), SIGUSR2);
    pthread_join(ta, NULL);
    pthread_join(tb, NULL);
    CHECK_EQ(a.n, 1);
    CHECK_EQ(b.n, 1);
    CHECK(t_run_until(m, t_flag_set, &n_main, 2.0));
    loop_done(a.loop);
    loop_done(b.loop);
    loop_done(m);
}

/* ca_get_running_loop: "the loop running in this thread, or NULL" */
static void grl_cb(void *arg) { *(ca_loop **)arg = ca_get_running_loop(); }
static void *grl_thread(void *arg)
{
    *(ca_loop **)arg = ca_get_running_loop();
    return NULL;
}
struct grl2 {
    ca_loop *other_thread;
};
static void grl_other_thread_cb(void *arg)
{
    pthread_t t;
    ca_loop *got = SENT_LOOP;
    CHECK_EQ(pthread_create(&t, NULL, grl_thread, &got), 0);
    pthread_join(t, NULL);
    *(ca_loop **)arg = got;
}

LOOP_TEST(loop_get_running_loop)
{
    ca_loop *got = SENT_LOOP, *other = SENT_LOOP;
    CHECK(ca_get_running_loop() == NULL);
    CHECK_OK(ca_loop_call_soon(loop, grl_cb, &got, NULL));
    CHECK_OK(ca_loop_call_soon(loop, grl_other_thread_cb, &other, NULL));
    run_once(loop);
    CHECK(got == loop);
    CHECK(other == NULL);
    CHECK(ca_get_running_loop() == NULL);
}

/* ca_loop_stop before run makes one iteration; ca_loop_close drops pending callbacks. */
LOOP_TEST(loop_close_drops_pending)
{
    int n = 0;
    CHECK_OK(ca_loop_call_soon(loop, count_cb, &n, NULL));
    CHECK_OK(ca_loop_call_later(loop, 0.0, count_cb, &n, NULL));
    CHECK_OK(ca_loop_close(loop));
    CHECK_EQ(n, 0);
}

/* call_soon_threadsafe from another thread wakes the loop. */
struct tsafe {
    ca_loop *loop;
    int n;
};
static void tsafe_cb(void *arg)
{
    struct tsafe *t = arg;
    t->n++;
    ca_loop_stop(t->loop);
}
static void *tsafe_thread(void *arg)
{
    struct tsafe *t = arg;
    sleep_s(0.05);
    CHECK_OK(ca_loop_call_soon_threadsafe(t->loop, tsafe_cb, t));
    return NULL;
}

LOOP_TEST(loop_call_soon_threadsafe_wakes)
{
    struct tsafe t = {loop, 0};
    ca_handle *h = NULL;
    CHECK_OK(ca_loop_call_later(loop, 10.0, stop_cb, loop, &h));
    pthread_t th;
    double t0 = now_s();
    CHECK_EQ(pthread_create(&th, NULL, tsafe_thread, &t), 0);
    CHECK_OK(ca_loop_run_forever(loop));
    pthread_join(th, NULL);
    CHECK_EQ(t.n, 1);
    CHECK(now_s() - t0 < 5.0);
    ca_handle_cancel(h);
    ca_handle_unref(h);
}

/* run_until_complete: stopped before the future is done -> -EAGAIN, future left pending. */
LOOP_TEST(loop_run_until_complete_stopped_eagain)
{
    ca_future *f = NULL;
    CHECK_OK(ca_future_new(loop, &f));
    CHECK_OK(ca_loop_call_later(loop, 0.005, stop_cb, loop, NULL));
    CHECK_ERR(ca_loop_run_until_complete(loop, f), -EAGAIN);
    CHECK(!ca_future_done(f));
    CHECK_OK(ca_loop_call_later(loop, 0.005, set_res_cb, f, NULL));
    CHECK_ERR(ca_loop_run_until_complete(loop, f), 0);
    ca_future_unref(f);
}

/* Removing the last handler of a signal restores the disposition; with two loops on the signal,
 * removing one keeps the other's. */
TEST(loop_signal_disposition_restore_two_loops)
{
    ca_loop *a = new_epoll(), *b = NULL;
    CHECK_OK(ca_poll_loop_new(&b));
    struct sigaction sa;
    int na = 0, nb = 0;
    CHECK_OK(ca_loop_add_signal_handler(a, SIGUSR1, count_cb, &na));
    CHECK_OK(ca_loop_add_signal_handler(b, SIGUSR1, count_cb, &nb));
    CHECK_EQ(ca_loop_remove_signal_handler(a, SIGUSR1), 1);
    sigaction(SIGUSR1, NULL, &sa);
    CHECK(sa.sa_handler != SIG_DFL);
    kill(getpid(), SIGUSR1);
    CHECK(t_run_until(b, t_flag_set, &nb, 2.0));
    t_run_for(a, 0.01);
    CHECK_EQ(na, 0);
    CHECK_EQ(ca_loop_remove_signal_handler(b, SIGUSR1), 1);
    sigaction(SIGUSR1, NULL, &sa);
    CHECK(sa.sa_handler == SIG_DFL);
    /* Closing a loop removes its handlers and restores too. */
    CHECK_OK(ca_loop_add_signal_handler(a, SIGUSR2, count_cb, &na));
    loop_done(a);
    sigaction(SIGUSR2, NULL, &sa);
    CHECK(sa.sa_handler == SIG_DFL);
    loop_done(b);
}

/* ca_proactor_loop_new "-ENOSYS if unusable" (header: also when CASYNCIO_NO_IO_URING=1);
 * the proactor policy returns that error; out untouched. */
TEST(proactor_enosys_when_unusable)
{
    setenv("CASYNCIO_NO_IO_URING", "1", 1);
    ca_loop *l = SENT_LOOP;
    CHECK_ERR(ca_proactor_loop_new(&l), -ENOSYS);
    CHECK(l == SENT_LOOP);
    ca_policy *p = SENT_POL;
    CHECK_ERR(ca_proactor_policy_new(&p), -ENOSYS);
    CHECK(p == SENT_POL);
    unsetenv("CASYNCIO_NO_IO_URING");
}

/* run_forever "-EBUSY if already running" also from another thread; close -EBUSY while
 * running; is_running seen from any thread. */
struct xthr {
    ca_loop *loop;
    int run_r, close_r;
    bool running;
};
static void *xthr_main(void *arg)
{
    struct xthr *x = arg;
    x->running = ca_loop_is_running(x->loop);
    x->run_r = ca_loop_run_forever(x->loop);
    x->close_r = ca_loop_close(x->loop);
    ca_loop_stop(x->loop);
    return NULL;
}
static void xthr_cb(void *arg)
{
    struct xthr *x = arg;
    pthread_t t;
    CHECK_EQ(pthread_create(&t, NULL, xthr_main, x), 0);
    pthread_join(t, NULL);
}

LOOP_TEST(loop_busy_from_other_thread)
{
    struct xthr x = {.loop = loop};
    ca_handle *h = NULL;
    CHECK_OK(ca_loop_call_later(loop, 5.0, stop_cb, loop, &h));
    CHECK_OK(ca_loop_call_soon(loop, xthr_cb, &x, NULL));
    CHECK_OK(ca_loop_run_forever(loop));
    ca_handle_cancel(h);
    ca_handle_unref(h);
    CHECK(x.running);
    CHECK_ERR(x.run_r, -EBUSY);
    CHECK_ERR(x.close_r, -EBUSY);
    CHECK(!ca_loop_is_closed(loop));
}

/* Level-triggered with partial reads: a reader that takes one byte per call is called until
 * the data is gone, then no more. */
struct onebyte {
    int fd, calls, got;
};
static void onebyte_cb(void *arg)
{
    struct onebyte *o = arg;
    char c;
    o->calls++;
    if (read(o->fd, &c, 1) == 1) o->got++;
}
static bool onebyte_done(void *arg) { return ((struct onebyte *)arg)->got >= 10; }

LOOP_TEST(loop_reader_partial_reads)
{
    int p[2];
    CHECK_EQ(pipe2(p, O_CLOEXEC | O_NONBLOCK), 0);
    struct onebyte o = {p[0], 0, 0};
    CHECK_OK(ca_loop_add_reader(loop, p[0], onebyte_cb, &o));
    CHECK_EQ(write(p[1], "0123456789", 10), 10);
    CHECK(t_run_until(loop, onebyte_done, &o, 2.0));
    t_run_for(loop, 0.02);
    int calls = o.calls;
    t_run_for(loop, 0.02);
    CHECK_EQ(o.calls, calls); /* nothing left to read: not called */
    CHECK_EQ(o.got, 10);
    CHECK_EQ(write(p[1], "ab", 2), 2); /* readable again */
    struct onebyte *op = &o;
    double t0 = now_s();
    while (op->got < 12 && now_s() - t0 < 2) t_run_for(loop, 0.005);
    CHECK_EQ(o.got, 12);
    CHECK_EQ(ca_loop_remove_reader(loop, p[0]), 1);
    close(p[0]);
    close(p[1]);
}

/* A writer on a full pipe is not called until there is room again. */
LOOP_TEST(loop_writer_full_pipe)
{
    int p[2];
    CHECK_EQ(pipe2(p, O_CLOEXEC | O_NONBLOCK), 0);
    char buf[4096];
    memset(buf, 'x', sizeof buf);
    while (write(p[1], buf, sizeof buf) > 0) {
    }
    struct lvl l = {p[1], 0};
    CHECK_OK(ca_loop_add_writer(loop, p[1], lvl_cb, &l));
    t_run_for(loop, 0.03);
    CHECK_EQ(l.n, 0);
    while (read(p[0], buf, sizeof buf) > 0) {
    }
    CHECK(t_run_until(loop, t_flag_set, &l.n, 2.0));
    CHECK_EQ(ca_loop_remove_writer(loop, p[1]), 1);
    close(p[0]);
    close(p[1]);
}
