/*
 * Contract tests for API.md's "Event loop" (futures): outcomes and done callbacks, also when their
 * loop closes. Each test names the statement it checks; a failure is a disagreement between the
 * code and API.md.
 */
#include "contract_util.h"

LOOP_TEST(future_lines)
{
    ca_future *f = NULL;
    CHECK_OK(ca_future_new(loop, &f));
    CHECK(!ca_future_done(f));
    CHECK(!ca_future_cancelled(f));
    void *res = SENT_PTR;
    CHECK_ERR(ca_future_result(f, &res), -EAGAIN);
    CHECK(res == SENT_PTR);
    CHECK_ERR(ca_future_set_error(f, 0), -EINVAL);
    CHECK_ERR(ca_future_set_error(f, 5), -EINVAL);
    CHECK(!ca_future_done(f));
    CHECK_OK(ca_future_set_result(f, (void *)(intptr_t)-3));
    CHECK(ca_future_done(f));
    CHECK_ERR(ca_future_set_result(f, NULL), -EINVAL);
    CHECK_ERR(ca_future_set_error(f, -EIO), -EINVAL);
    CHECK(!ca_future_cancel(f));
    CHECK(!ca_future_cancelled(f));
    CHECK_OK(ca_future_result(f, &res));
    CHECK_EQ((intptr_t)res, -3);
    CHECK_OK(ca_future_result(f, NULL));
    ca_future_unref(f);

    CHECK_OK(ca_future_new(loop, &f));
    CHECK_OK(ca_future_set_error(f, -EIO));
    res = SENT_PTR;
    CHECK_ERR(ca_future_result(f, &res), -EIO);
    CHECK(res == SENT_PTR);
    CHECK(ca_future_done(f));
    CHECK(!ca_future_cancel(f));
    CHECK_ERR(ca_future_set_result(f, NULL), -EINVAL);
    ca_future_unref(f);

    CHECK_OK(ca_future_new(loop, &f));
    CHECK(ca_future_cancel(f));
    CHECK(ca_future_done(f));
    CHECK(ca_future_cancelled(f));
    CHECK(!ca_future_cancel(f));
    CHECK_ERR(ca_future_result(f, &res), -ECANCELED);
    CHECK(res == SENT_PTR);
    CHECK_ERR(ca_future_set_result(f, NULL), -EINVAL);
    CHECK_ERR(ca_future_set_error(f, -EIO), -EINVAL);
    ca_future_unref(f);

    /* NULLs */
    CHECK_ERR(ca_future_set_result(NULL, NULL), -EINVAL);
    CHECK_ERR(ca_future_set_error(NULL, -EIO), -EINVAL);
    CHECK(!ca_future_cancel(NULL));
    CHECK(!ca_future_done(NULL));
    CHECK(!ca_future_cancelled(NULL));
    CHECK_ERR(ca_future_result(NULL, &res), -EINVAL);
    CHECK_ERR(ca_future_add_done_callback(NULL, fut_noop, NULL), -EINVAL);
    CHECK_OK(ca_future_new(loop, &f));
    CHECK_ERR(ca_future_add_done_callback(f, NULL, NULL), -EINVAL);
    CHECK(ca_future_loop(f) == loop);
    ca_future_unref(f);
}

/* "Done callbacks run through the loop (call_soon), never inside set_result." */
static void dcb_order(ca_future *f, void *arg)
{
    struct dcb *d = *(struct dcb **)arg;
    d->order[d->k++] = (int)(((struct dcb **)arg) - (struct dcb **)arg);
}

LOOP_TEST(future_done_callbacks_through_loop)
{
    (void)dcb_order;
    struct dcb d = {0};
    ca_future *f = NULL;
    CHECK_OK(ca_future_new(loop, &f));
    CHECK_OK(ca_future_add_done_callback(f, dcb_fn, &d));
    CHECK_OK(ca_future_add_done_callback(f, dcb_fn, &d));
    CHECK_OK(ca_future_set_result(f, NULL));
    CHECK_EQ(d.n, 0);
    run_once(loop);
    CHECK_EQ(d.n, 2);
    CHECK(d.seen == f);
    /* Already done: "at once, through the loop". */
    CHECK_OK(ca_future_add_done_callback(f, dcb_fn, &d));
    CHECK_EQ(d.n, 2);
    run_once(loop);
    CHECK_EQ(d.n, 3);
    ca_future_unref(f);
    /* Cancel and set_error schedule them too. */
    d.n = 0;
    CHECK_OK(ca_future_new(loop, &f));
    CHECK_OK(ca_future_add_done_callback(f, dcb_fn, &d));
    CHECK(ca_future_cancel(f));
    CHECK_EQ(d.n, 0);
    run_once(loop);
    CHECK_EQ(d.n, 1);
    ca_future_unref(f);
    CHECK_OK(ca_future_new(loop, &f));
    CHECK_OK(ca_future_add_done_callback(f, dcb_fn, &d));
    CHECK_OK(ca_future_set_error(f, -EIO));
    CHECK_EQ(d.n, 1);
    run_once(loop);
    CHECK_EQ(d.n, 2);
    ca_future_unref(f);
}

/* Done callbacks run in the order they were added (asyncio). */
static int dorder[8], ndorder;
static void dorder_fn(ca_future *f, void *arg) { dorder[ndorder++] = (int)(intptr_t)arg; }

LOOP_TEST(future_done_callbacks_fifo)
{
    ca_future *f = NULL;
    ndorder = 0;
    CHECK_OK(ca_future_new(loop, &f));
    for (int i = 0; i < 5; i++) CHECK_OK(ca_future_add_done_callback(f, dorder_fn, (void *)(intptr_t)i));
    CHECK_OK(ca_future_set_result(f, NULL));
    run_once(loop);
    CHECK_EQ(ndorder, 5);
    for (int i = 0; i < 5; i++) CHECK_EQ(dorder[i], i);
    ca_future_unref(f);
}

/* The caller may drop its reference to a pending future with a done callback. */
LOOP_TEST(future_unref_pending_then_complete)
{
    ca_future *f = NULL;
    struct dcb d = {0};
    CHECK_OK(ca_future_new(loop, &f));
    CHECK_OK(ca_future_add_done_callback(f, dcb_fn, &d));
    ca_future *keep = ca_future_ref(f);
    ca_future_unref(f);
    CHECK_OK(ca_future_set_result(keep, NULL));
    ca_future_unref(keep);
    run_once(loop);
    CHECK_EQ(d.n, 1);
}

/* Futures and loop close: a future completed while its done callbacks are still queued, whose
 * loop then closes, must not keep the loop (or itself) alive: "A _new hands the caller one
 * reference", refcounts balance. Seen with a custom loop whose destroy is counted (the core's
 * part is the same for built-in loops, where valgrind/ASan see the leak). */
struct kq {
    ca_handle *h[16];
    int n;
    int destroyed;
};
static int kq_soon(ca_loop *self, ca_handle *h)
{
    struct kq *q = ca_loop_data(self);
    q->h[q->n++] = ca_handle_ref(h);
    return 0;
}
static int kq_close(ca_loop *self)
{
    struct kq *q = ca_loop_data(self);
    for (int i = 0; i < q->n; i++) ca_handle_unref(q->h[i]);
    q->n = 0;
    return 0;
}
static void kq_destroy(ca_loop *self) { ((struct kq *)ca_loop_data(self))->destroyed++; }
static const ca_loop_ops kq_ops = {.run_forever = spy_run,
                                   .call_soon = kq_soon,
                                   .call_soon_threadsafe = kq_soon,
                                   .close = kq_close,
                                   .destroy = kq_destroy};

TEST(future_done_callback_queued_when_loop_closes_no_leak)
{
    for (int how = 0; how < 3; how++) {
        struct kq q = {0};
        ca_loop *l = NULL;
        CHECK_OK(ca_loop_new_custom(&kq_ops, &q, &l));
        ca_future *f = NULL;
        struct dcb d = {0};
        CHECK_OK(ca_future_new(l, &f));
        CHECK_OK(ca_future_add_done_callback(f, dcb_fn, &d));
        if (how == 0) CHECK(ca_future_cancel(f));
        else if (how == 1) CHECK_OK(ca_future_set_result(f, NULL));
        else CHECK_OK(ca_future_set_error(f, -EIO));
        CHECK_EQ(q.n, 1); /* the done callback is queued */
        CHECK_OK(ca_loop_close(l));
        CHECK_EQ(d.n, 0);
        ca_future_unref(f);
        ca_loop_unref(l);
        if (q.destroyed != 1)
            t_fail(__FILE__, __LINE__, "case %d: the loop was never freed (a reference leaked)", how);
    }
}

LOOP_TEST(future_done_callback_queued_when_loop_closes_fds)
{
    /* The same through the harness's loop kinds: on the custom loop a leaked loop keeps its
     * wake pipe open (the harness sees the fd). */
    ca_future *f = NULL;
    struct dcb d = {0};
    CHECK_OK(ca_future_new(loop, &f));
    CHECK_OK(ca_future_add_done_callback(f, dcb_fn, &d));
    CHECK(ca_future_cancel(f));
    CHECK_OK(ca_loop_close(loop));
    CHECK_EQ(d.n, 0);
    ca_future_unref(f);
}
