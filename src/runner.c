/*
 * The runner: asyncio.run() with a loop factory (Python 3.12's Runner(loop_factory=...)).
 * It makes a loop, makes it current for this thread through the process policy (so a Safe or
 * Fast child watcher follows it in the main thread, as asyncio.run does), runs `main` as the
 * loop's first callback until the future it returns is done, and puts everything back.
 */
#include "internal.h"

struct run_ctx {
    ca_main_fn main_fn;
    void *arg;
    ca_loop *loop;
    ca_future *outer; /* ours: what run_until_complete waits for */
    ca_future *fut;   /* main's, taken over */
};

static void main_done(ca_future *fut, void *arg)
{
    struct run_ctx *c = arg;
    int r = ca_future_result(fut, NULL);
    if (ca_future_done(c->outer)) return;
    if (r == 0) ca_future_set_result(c->outer, NULL);
    else ca_future_set_error(c->outer, r);
}

static void main_start(void *arg)
{
    struct run_ctx *c = arg;
    c->fut = c->main_fn(c->loop, c->arg);
    /* A future of another loop would never complete here: as bad as no future. */
    int r = -EINVAL;
    if (c->fut && ca_future_loop(c->fut) == c->loop)
        r = ca_future_add_done_callback(c->fut, main_done, c);
    if (r < 0) ca_future_set_error(c->outer, r);
}

int ca_run(ca_main_fn main_fn, void *arg, ca_loop_factory_fn factory)
{
    if (!main_fn) return -EINVAL;
    if (ca_get_running_loop()) return -EBUSY;
    ca_policy *policy = ca__policy_acquire();
    ca_loop *loop = NULL;
    int r = factory ? factory(&loop) : ca_policy_new_event_loop(policy, &loop);
    if (r >= 0 && !loop) r = -EINVAL;
    if (r < 0) {
        ca_policy_unref(policy);
        return r;
    }
    ca_loop *prev = ca__policy_current_loop(policy);
    struct run_ctx c = {.main_fn = main_fn, .arg = arg, .loop = loop};
    r = ca_policy_set_event_loop(policy, loop);
    if (r == 0) r = ca_future_new(loop, &c.outer);
    if (r == 0) r = ca_loop_call_soon(loop, main_start, &c, NULL);
    if (r == 0) r = ca_loop_run_until_complete(loop, c.outer);
    /* Restore before closing, as asyncio's Runner.close() does: a child watcher attached to
     * this loop moves back to the previous one. */
    ca_policy_set_event_loop(policy, prev);
    ca_loop_close(loop);
    ca_future_unref(c.fut);
    ca_future_unref(c.outer);
    ca_loop_unref(loop);
    ca_loop_unref(prev);
    ca_policy_unref(policy);
    return r;
}
