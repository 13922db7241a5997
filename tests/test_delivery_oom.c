/*
 * Deliveries that must not be lost for want of memory (issue 16, item 4): a future's done
 * callbacks once it completes. malloc is interposed in this test program (a local wrapper
 * over glibc's __libc_malloc, as in test_oom.c) so that a test can make every allocation fail
 * around one call. The sanitizers own malloc, so there the tests skip; the release and debug
 * builds run them. (A subprocess's exit posted while memory fails is covered by the
 * allocation-failure sweep, `make sweep`, which fails each allocation of its workload.)
 */
#include "harness.h"

#include <stdatomic.h>

static atomic_bool fail_malloc;

#ifndef T_SANITIZED
void *__libc_malloc(size_t n);

/* Every malloc of the program, the library's included (it is linked statically here). */
void *malloc(size_t n)
{
    if (atomic_load_explicit(&fail_malloc, memory_order_relaxed)) {
        errno = ENOMEM;
        return NULL;
    }
    return __libc_malloc(n);
}
#endif

struct seen {
    ca_loop *loop;
    int order[4];
    int n;
    int stop_at; /* stop the loop when n reaches it */
};

static void record(ca_future *f, void *arg, int id)
{
    (void)f;
    struct seen *s = arg;
    if (s->n < 4) s->order[s->n] = id;
    if (++s->n == s->stop_at) ca_loop_stop(s->loop);
}

static void cb_one(ca_future *f, void *arg) { record(f, arg, 1); }
static void cb_two(ca_future *f, void *arg) { record(f, arg, 2); }

static void nothing(void *arg) { (void)arg; }

static void give_up(void *arg) { ca_loop_stop(arg); }

/* The loop's own queues get their first allocation (a fresh built-in loop has no ready ring
 * yet; the test custom loop grows its arrays on first use), so that what the test measures
 * is the library's delivery, not the queue's first growth. */
static void warm(ca_loop *loop)
{
    CHECK_OK(ca_loop_call_soon(loop, nothing, NULL, NULL));
    ca_loop_stop(loop);
    CHECK_OK(ca_loop_run_forever(loop));
}

/* Completing a future whose callback's entry cannot be allocated: the callback still runs
 * (a custom loop's future has a handle reserved for it; a built-in loop's entry is (fn, arg)
 * in its ring, which needs nothing). */
LOOP_TEST(future_callbacks_survive_enomem_at_completion) /* timeout: 30 */
{
#ifdef T_SANITIZED
    SKIP("malloc is interposed here, which the sanitizers do not allow");
#endif
    warm(loop);
    struct seen s = {.loop = loop, .stop_at = 1};
    ca_future *f = NULL;
    CHECK_OK(ca_future_new(loop, &f));
    CHECK_OK(ca_future_add_done_callback(f, cb_one, &s));
    CHECK_OK(ca_loop_call_later(loop, 5.0, give_up, loop, NULL));
    atomic_store(&fail_malloc, true);
    int r = ca_future_set_result(f, (void *)7);
    atomic_store(&fail_malloc, false);
    CHECK_OK(r);
    CHECK_EQ(ca_future_set_result(f, NULL), -EINVAL); /* done: the contract stands */
    CHECK_OK(ca_loop_run_forever(loop));
    CHECK_EQ(s.n, 1);
    ca_future_unref(f);
}

/* A callback added to a done future whose earlier callbacks still wait for their turn, while
 * no entry of its own can be allocated: it runs after them, not never. */
LOOP_TEST(late_callback_survives_enomem) /* timeout: 30 */
{
#ifdef T_SANITIZED
    SKIP("malloc is interposed here, which the sanitizers do not allow");
#endif
    warm(loop);
    struct seen s = {.loop = loop, .stop_at = 2};
    ca_future *f = NULL;
    CHECK_OK(ca_future_new(loop, &f));
    CHECK_OK(ca_future_add_done_callback(f, cb_one, &s));
    CHECK_OK(ca_future_set_result(f, NULL));
    CHECK_OK(ca_loop_call_later(loop, 5.0, give_up, loop, NULL));
    atomic_store(&fail_malloc, true);
    int r = ca_future_add_done_callback(f, cb_two, &s);
    atomic_store(&fail_malloc, false);
    CHECK_OK(r);
    CHECK_OK(ca_loop_run_forever(loop));
    CHECK_EQ(s.n, 2);
    CHECK_EQ(s.order[0], 1);
    CHECK_EQ(s.order[1], 2);
    ca_future_unref(f);
}

/* The same on a fresh built-in loop, whose ready ring does not exist yet: the entry cannot get
 * a place in the ring, so the future's own node carries it until the loop drains its queue. */
LOOP_TEST(future_callbacks_survive_enomem_on_a_fresh_ring) /* timeout: 30 */
{
#ifdef T_SANITIZED
    SKIP("malloc is interposed here, which the sanitizers do not allow");
#endif
    if (strcmp(t_loop_kind, "custom") == 0) SKIP("the custom loop grows its own queue");
    struct seen s = {.loop = loop, .stop_at = 1};
    ca_future *f = NULL;
    CHECK_OK(ca_future_new(loop, &f));
    CHECK_OK(ca_future_add_done_callback(f, cb_one, &s));
    atomic_store(&fail_malloc, true);
    int r = ca_future_set_result(f, (void *)7);
    atomic_store(&fail_malloc, false);
    CHECK_OK(r);
    CHECK_OK(ca_loop_call_later(loop, 5.0, give_up, loop, NULL));
    CHECK_OK(ca_loop_run_forever(loop));
    CHECK_EQ(s.n, 1);
    ca_future_unref(f);
}

/* A loop closed with such a node waiting drops the callbacks and the future's reference (the
 * harness checks that nothing leaks under valgrind; here: the future is still usable). */
LOOP_TEST(future_node_dropped_at_close) /* timeout: 30 */
{
#ifdef T_SANITIZED
    SKIP("malloc is interposed here, which the sanitizers do not allow");
#endif
    if (strcmp(t_loop_kind, "custom") == 0) SKIP("the custom loop grows its own queue");
    struct seen s = {.loop = loop, .stop_at = 1};
    ca_future *f = NULL;
    CHECK_OK(ca_future_new(loop, &f));
    CHECK_OK(ca_future_add_done_callback(f, cb_one, &s));
    atomic_store(&fail_malloc, true);
    int r = ca_future_set_result(f, (void *)7);
    atomic_store(&fail_malloc, false);
    CHECK_OK(r);
    CHECK_OK(ca_loop_close(loop));
    CHECK_EQ(s.n, 0);
    CHECK(ca_future_done(f));
    ca_future_unref(f);
}
