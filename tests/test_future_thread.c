/*
 * The futures' thread rule (issue 16): a future's state belongs to its loop's thread while the
 * loop runs, so the functions that change it refuse other threads then (-EPERM; cancel answers
 * false), instead of racing with the loop. While the loop does not run, any single thread may
 * use them. Completing a future from another thread goes through ca_loop_call_soon_threadsafe.
 */
#include "harness.h"

#include <pthread.h>

struct other {
    ca_future *fut;
    ca_loop *loop;
    int set_result, set_error, add_cb, fresh;
    bool cancelled;
};

static void never(ca_future *f, void *arg) { t_fail(__FILE__, __LINE__, "callback ran"); }

static void complete_on_loop(void *arg)
{
    struct other *o = arg;
    CHECK_OK(ca_future_set_result(o->fut, (void *)(intptr_t)42));
}

static void *from_other_thread(void *arg)
{
    struct other *o = arg;
    o->set_result = ca_future_set_result(o->fut, NULL);
    o->set_error = ca_future_set_error(o->fut, -EIO);
    o->add_cb = ca_future_add_done_callback(o->fut, never, NULL);
    o->cancelled = ca_future_cancel(o->fut);
    /* A new future is fine from any thread (it only takes a reference to the loop). */
    ca_future *f = NULL;
    o->fresh = ca_future_new(o->loop, &f);
    ca_future_unref(f);
    /* The way to complete it from here. */
    CHECK_OK(ca_loop_call_soon_threadsafe(o->loop, complete_on_loop, o));
    return NULL;
}

static void start_thread(void *arg)
{
    pthread_t *t = ((void **)arg)[0];
    CHECK_EQ(pthread_create(t, NULL, from_other_thread, ((void **)arg)[1]), 0);
}

static bool fut_done(void *f) { return ca_future_done(f); }

LOOP_TEST(future_changes_refused_from_other_threads_while_running)
{
    struct other o = {.loop = loop};
    CHECK_OK(ca_future_new(loop, &o.fut));
    pthread_t t;
    void *args[2] = {&t, &o};
    CHECK_OK(ca_loop_call_soon(loop, start_thread, args, NULL));
    CHECK(t_run_until(loop, fut_done, o.fut, 10));
    pthread_join(t, NULL);
    CHECK_EQ(o.set_result, -EPERM);
    CHECK_EQ(o.set_error, -EPERM);
    CHECK_EQ(o.add_cb, -EPERM);
    CHECK(!o.cancelled);
    CHECK_OK(o.fresh);
    void *res = NULL;
    CHECK_OK(ca_future_result(o.fut, &res));
    CHECK_EQ((intptr_t)res, 42);
    ca_future_unref(o.fut);
}

static void *complete_idle(void *arg)
{
    CHECK_OK(ca_future_set_result(arg, (void *)(intptr_t)7));
    return NULL;
}

/* While the loop does not run, another (single) thread may complete it. */
LOOP_TEST(future_changes_from_another_thread_while_idle)
{
    ca_future *f = NULL;
    CHECK_OK(ca_future_new(loop, &f));
    pthread_t t;
    CHECK_EQ(pthread_create(&t, NULL, complete_idle, f), 0);
    pthread_join(t, NULL);
    CHECK(ca_future_done(f));
    void *res = NULL;
    CHECK_OK(ca_future_result(f, &res));
    CHECK_EQ((intptr_t)res, 7);
    ca_future_unref(f);
}
