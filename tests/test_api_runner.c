/*
 * Contract tests for API.md's "Policy" (ca_run): outcomes, factories, the current loop before and
 * after, threads. Each test names the statement it checks; a failure is a disagreement between the
 * code and API.md.
 */
#include "contract_util.h"

TEST(run_outcomes_and_running_loop)
{
    struct rstate s = {.outcome = 0};
    CHECK_ERR(ca_run(rmain, &s, NULL), 0);
    CHECK_EQ(s.called, 1);
    CHECK(s.running == s.loop);
    CHECK(s.current == s.loop);
    CHECK(ca_loop_is_closed(s.loop));
    CHECK(!ca_loop_is_running(s.loop));
    CHECK(ca_get_running_loop() == NULL);
    ca_loop_unref(s.loop);
    struct rstate e = {.outcome = -EPIPE};
    CHECK_ERR(ca_run(rmain, &e, NULL), -EPIPE);
    CHECK(ca_loop_is_closed(e.loop));
    ca_loop_unref(e.loop);
    struct rstate c = {.outcome = 1};
    CHECK_ERR(ca_run(rmain, &c, NULL), -ECANCELED);
    ca_loop_unref(c.loop);
}

/* "NULL counts as an immediate -EINVAL error"; NULL main -EINVAL. */
TEST(run_null_future_and_main)
{
    struct rstate s = {.outcome = 2};
    CHECK_ERR(ca_run(rmain, &s, NULL), -EINVAL);
    CHECK_EQ(s.called, 1);
    CHECK(ca_loop_is_closed(s.loop));
    ca_loop_unref(s.loop);
    CHECK_ERR(ca_run(NULL, NULL, NULL), -EINVAL);
    struct rstate o = {.outcome = 3, .other = new_epoll()};
    CHECK_ERR(ca_run(rmain, &o, NULL), -EINVAL);
    ca_loop_unref(o.loop);
    loop_done(o.other);
}

/* "It refuses (-EBUSY) to run inside a running loop, without calling the factory." */
static int fact_calls;
static int counting_factory(ca_loop **out)
{
    fact_calls++;
    return ca_poll_loop_new(out);
}
static int failing_factory(ca_loop **out)
{
    fact_calls++;
    return -EMFILE;
}
static int null_factory(ca_loop **out)
{
    fact_calls++;
    *out = NULL;
    return 0;
}
static void run_inside_cb(void *arg)
{
    struct rstate s = {.outcome = 0};
    *(int *)arg = ca_run(rmain, &s, counting_factory);
    CHECK_EQ(s.called, 0);
}

TEST(run_inside_running_loop_ebusy)
{
    ca_loop *l = new_epoll();
    int r = 1;
    fact_calls = 0;
    CHECK_OK(ca_loop_call_soon(l, run_inside_cb, &r, NULL));
    run_once(l);
    CHECK_ERR(r, -EBUSY);
    CHECK_EQ(fact_calls, 0);
    loop_done(l);
    /* Also inside a loop entered with enter_running. */
    ca_loop *c = NULL;
    struct spy sp = {0};
    CHECK_OK(ca_loop_new_custom(&spy_ops, &sp, &c));
    CHECK_OK(ca_loop_enter_running(c));
    struct rstate s = {0};
    CHECK_ERR(ca_run(rmain, &s, counting_factory), -EBUSY);
    CHECK_EQ(fact_calls, 0);
    CHECK_OK(ca_loop_exit_running(c));
    loop_done(c);
}

/* The factory is used; its error is returned and main not called; 0 without loop: -EINVAL. */
TEST(run_factory)
{
    struct rstate s = {.outcome = 0};
    fact_calls = 0;
    CHECK_ERR(ca_run(rmain, &s, counting_factory), 0);
    CHECK_EQ(fact_calls, 1);
    CHECK(strcmp(ca_loop_kind(s.loop), "poll") == 0);
    ca_loop_unref(s.loop);
    struct rstate f = {0};
    CHECK_ERR(ca_run(rmain, &f, failing_factory), -EMFILE);
    CHECK_EQ(f.called, 0);
    CHECK_ERR(ca_run(rmain, &f, null_factory), -EINVAL);
    CHECK_EQ(f.called, 0);
}

/* NULL factory: "policy's new_event_loop". */
TEST(run_null_factory_uses_policy)
{
    ca_policy *def = NULL, *p = NULL;
    CHECK_OK(ca_poll_policy_new(&def));
    CHECK_OK(ca_policy_new(&cnt_ops, NULL, def, &p));
    ca_policy_unref(def);
    CHECK_OK(ca_set_event_loop_policy(p));
    ca_policy_unref(p);
    cnt_new = 0;
    struct rstate s = {.outcome = 0};
    CHECK_ERR(ca_run(rmain, &s, NULL), 0);
    CHECK_EQ(cnt_new, 1);
    CHECK(strcmp(ca_loop_kind(s.loop), "poll") == 0);
    ca_loop_unref(s.loop);
}

/* "restores the previous current loop" */
TEST(run_restores_previous_current_loop)
{
    ca_loop *prev = new_epoll();
    CHECK_OK(ca_set_event_loop(prev));
    struct rstate s = {.outcome = 0};
    CHECK_ERR(ca_run(rmain, &s, NULL), 0);
    ca_loop *got = NULL;
    CHECK_OK(ca_get_event_loop(&got));
    CHECK(got == prev);
    ca_loop_unref(s.loop);
    CHECK_OK(ca_set_event_loop(NULL));
    /* None before: none after (-ENOENT, no automatic loop). */
    struct rstate t = {.outcome = 0};
    CHECK_ERR(ca_run(rmain, &t, NULL), 0);
    got = SENT_LOOP;
    CHECK_ERR(ca_get_event_loop(&got), -ENOENT);
    ca_loop_unref(t.loop);
    loop_done(prev);
}

TEST(run_fresh_process_main_thread_enoent_after)
{
    struct rstate t = {.outcome = 0};
    CHECK_ERR(ca_run(rmain, &t, NULL), 0);
    ca_loop *got = SENT_LOOP;
    CHECK_ERR(ca_get_event_loop(&got), -ENOENT);
    CHECK(got == SENT_LOOP);
    ca_loop_unref(t.loop);
}

/* ca_run in another thread: independent. */
static void *run_thread(void *arg)
{
    struct rstate *s = arg;
    s->outcome = ca_run(rmain, s, NULL);
    return NULL;
}

TEST(run_in_thread)
{
    struct rstate s = {.outcome = 0};
    pthread_t t;
    CHECK_EQ(pthread_create(&t, NULL, run_thread, &s), 0);
    pthread_join(t, NULL);
    CHECK_ERR(s.outcome, 0);
    CHECK(s.running == s.loop);
    CHECK(ca_loop_is_closed(s.loop));
    ca_loop_unref(s.loop);
}

/* ca_run attaches the (Safe) watcher in the main thread. */
struct rw {
    ca_child_watcher *w;
    bool active;
};
static ca_future *rmain_w(ca_loop *loop, void *arg)
{
    struct rw *r = arg;
    r->active = ca_child_watcher_is_active(r->w);
    ca_future *f = NULL;
    CHECK_OK(ca_future_new(loop, &f));
    CHECK_OK(ca_future_set_result(f, NULL));
    return f;
}

TEST(run_attaches_watcher_main_thread)
{
    struct rw r = {0};
    CHECK_OK(ca_safe_child_watcher_new(&r.w));
    CHECK_OK(ca_set_child_watcher(r.w));
    CHECK_ERR(ca_run(rmain_w, &r, NULL), 0);
    CHECK(r.active);
    CHECK(!ca_child_watcher_is_active(r.w));
    ca_child_watcher_unref(r.w);
}

/* ca_run "closes the loop (which ends its processes)" */
static ca_future *rmain_proc(ca_loop *loop, void *arg)
{
    const char *argv[] = {"sleep", "30", NULL};
    ca_subprocess_options o = {.argv = argv};
    ca_process **p = arg;
    CHECK_OK(ca_loop_subprocess_exec(loop, &o, NULL, NULL, p));
    ca_future *f = NULL;
    CHECK_OK(ca_future_new(loop, &f));
    CHECK_OK(ca_loop_call_later(loop, 0.05, set_res_cb, f, NULL));
    return f;
}

TEST(run_closes_loop_ending_processes)
{
    ca_set_log_handler(NULL, NULL);
    ca_process *p = NULL;
    double t0 = now_s();
    CHECK_ERR(ca_run(rmain_proc, &p, NULL), 0);
    if (now_s() - t0 > 5.0 * t_slow())
        t_fail(__FILE__, __LINE__, "ca_run took %.1fs: the child was not killed at close", now_s() - t0);
    CHECK(p != NULL);
    pid_t pid = ca_process_pid(p);
    CHECK(pid > 0);
    CHECK_EQ(kill(pid, 0), -1);
    ca_process_unref(p);
}

/* ca_run: -EAGAIN when the loop was stopped before the future was done (header). */
static ca_future *rmain_stop(ca_loop *loop, void *arg)
{
    ca_future *f = NULL;
    CHECK_OK(ca_future_new(loop, &f));
    ca_loop_stop(loop);
    *(ca_loop **)arg = ca_loop_ref(loop);
    return f;
}

TEST(run_stopped_eagain)
{
    ca_loop *l = NULL;
    CHECK_ERR(ca_run(rmain_stop, &l, NULL), -EAGAIN);
    CHECK(ca_loop_is_closed(l));
    ca_loop_unref(l);
}

/* ca_run with a custom-loop factory: subprocesses and watchers use only the public loop API,
 * "so they work on any loop, built-in or custom". */
static ca_future *rmain_custom(ca_loop *loop, void *arg)
{
    const char *argv[] = {"sh", "-c", "echo hi; exit 4", NULL};
    ca_subprocess_options o = {.argv = argv, .stdout_mode = CA_PIPE};
    struct pstat *s = arg;
    s->loop = loop;
    ca_process *p = NULL;
    CHECK_OK(ca_loop_subprocess_exec(loop, &o, &pproto, s, &p));
    ca_future *f = NULL;
    CHECK_OK(ca_process_wait(p, &f));
    ca_process_unref(p);
    return f;
}

TEST(run_custom_loop_factory_subprocess)
{
    struct pstat s = {0};
    CHECK_ERR(ca_run(rmain_custom, &s, t_custom_loop_new), 0);
    CHECK(s.nout == 3 && memcmp(s.out, "hi\n", 3) == 0);
    CHECK_EQ(s.exited, 1);
    CHECK_EQ(s.wrong_loop, 0);
}

/* ca_run "makes it current for this thread" also with a loop factory (through the policy's
 * set_event_loop), and sets the previous one again afterwards. */
static ca_loop *sel_seen[4];
static int sel_n;
static int sel_op(ca_policy *self, ca_loop *loop)
{
    if (sel_n < 4) sel_seen[sel_n++] = loop;
    return ca_policy_set_event_loop(ca_policy_base(self), loop);
}
static const ca_policy_ops sel_ops = {.set_event_loop = sel_op};
static ca_future *rmain_cur(ca_loop *loop, void *arg)
{
    ca_loop *cur = NULL;
    if (ca_policy_get_event_loop(ca_get_event_loop_policy(), &cur) == 0) *(ca_loop **)arg = cur;
    ca_future *f = NULL;
    CHECK_OK(ca_future_new(loop, &f));
    CHECK_OK(ca_future_set_result(f, loop));
    return f;
}

TEST(run_with_factory_sets_current_loop)
{
    ca_policy *def = NULL, *p = NULL;
    CHECK_OK(ca_default_policy_new(&def));
    CHECK_OK(ca_policy_new(&sel_ops, NULL, def, &p));
    ca_policy_unref(def);
    CHECK_OK(ca_set_event_loop_policy(p));
    ca_policy_unref(p);
    ca_loop *prev = new_epoll();
    CHECK_OK(ca_set_event_loop(prev));
    sel_n = 0;
    ca_loop *cur = NULL;
    CHECK_ERR(ca_run(rmain_cur, &cur, counting_factory), 0);
    CHECK(cur != NULL && cur != prev);
    CHECK(sel_n >= 2);
    CHECK(sel_seen[0] == cur);
    CHECK(sel_seen[sel_n - 1] == prev);
    ca_loop *got = NULL;
    CHECK_OK(ca_get_event_loop(&got));
    CHECK(got == prev);
    CHECK_OK(ca_set_event_loop(NULL));
    loop_done(prev);
    CHECK_OK(ca_set_event_loop_policy(NULL));
}
