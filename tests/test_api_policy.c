/*
 * Contract tests for API.md's "Policy": the process policy, per-thread current loops, derived
 * policies, the child watcher. Each test names the statement it checks; a failure is a
 * disagreement between the code and API.md.
 */
#include "contract_util.h"

/* Internal (in the static library the tests link): the watcher's kind name. */
const char *ca__child_watcher_kind(const ca_child_watcher *w);

/* "ca_get_event_loop_policy() ... never NULL: creates the default lazily"; borrowed. */
TEST(policy_get_never_null_borrowed)
{
    ca_policy *p = ca_get_event_loop_policy();
    CHECK(p != NULL);
    CHECK(ca_get_event_loop_policy() == p);
    CHECK(ca_policy_data(p) == NULL);
    CHECK(ca_policy_base(p) == NULL);
    /* Borrowed: a ref/unref pair of ours does not free it. */
    ca_policy_unref(ca_policy_ref(p));
    ca_loop *l = NULL;
    CHECK_OK(ca_policy_new_event_loop(p, &l));
    loop_done(l);
}

/* "ca_set_event_loop_policy: NULL restores a default policy"; the setter takes its own
 * reference. */
TEST(policy_set_takes_reference_and_null_restores)
{
    ca_policy *def = NULL, *p = NULL;
    CHECK_OK(ca_default_policy_new(&def));
    CHECK_OK(ca_policy_new(&cnt_ops, NULL, def, &p));
    ca_policy_unref(def); /* the new policy holds base */
    CHECK_OK(ca_set_event_loop_policy(p));
    ca_policy_unref(p); /* the process holds it */
    CHECK(ca_get_event_loop_policy() == p);
    cnt_new = 0;
    ca_loop *l = NULL;
    CHECK_OK(ca_new_event_loop(&l));
    CHECK_EQ(cnt_new, 1);
    CHECK(l != NULL);
    loop_done(l);
    /* The main thread's automatic loop goes through the derived new_event_loop. */
    CHECK_OK(ca_get_event_loop(&l));
    CHECK_EQ(cnt_new, 2);
    CHECK_OK(ca_set_event_loop_policy(NULL));
    ca_policy *d = ca_get_event_loop_policy();
    CHECK(d != NULL);
    CHECK(ca_policy_data(d) == NULL);
    CHECK(ca_policy_base(d) == NULL);
    CHECK_OK(ca_new_event_loop(&l));
    CHECK_EQ(cnt_new, 2);
    CHECK(strcmp(ca_loop_kind(l), "epoll") == 0);
    loop_done(l);
}

/* "In the main thread, get_event_loop with no loop set, when set_event_loop was never called
 * in it, creates and sets one (once); in every other case no loop set gives -ENOENT." */
TEST(policy_main_thread_auto_loop_once)
{
    ca_loop *a = SENT_LOOP, *b = SENT_LOOP;
    CHECK_OK(ca_get_event_loop(&a));
    CHECK(a != SENT_LOOP && a != NULL);
    CHECK(strcmp(ca_loop_kind(a), "epoll") == 0);
    CHECK_OK(ca_get_event_loop(&b));
    CHECK(a == b);
    /* Borrowed: the policy keeps it; close it but it stays set (asyncio). */
    CHECK_OK(ca_loop_close(a));
    CHECK_OK(ca_get_event_loop(&b));
    CHECK(b == a);
    CHECK_OK(ca_set_event_loop(NULL));
    b = SENT_LOOP;
    CHECK_ERR(ca_get_event_loop(&b), -ENOENT);
    CHECK(b == SENT_LOOP);
    CHECK_ERR(ca_get_event_loop(&b), -ENOENT);
}

TEST(policy_main_thread_no_auto_after_set)
{
    ca_loop *l = new_epoll();
    CHECK_OK(ca_set_event_loop(l));
    ca_loop *got = NULL;
    CHECK_OK(ca_get_event_loop(&got));
    CHECK(got == l);
    CHECK_OK(ca_set_event_loop(NULL));
    got = SENT_LOOP;
    CHECK_ERR(ca_get_event_loop(&got), -ENOENT);
    CHECK(got == SENT_LOOP);
    loop_done(l);
}

/* set_event_loop(NULL) first: counts as "set_event_loop was called". */
TEST(policy_main_thread_set_null_first_enoent)
{
    CHECK_OK(ca_set_event_loop(NULL));
    ca_loop *got = SENT_LOOP;
    CHECK_ERR(ca_get_event_loop(&got), -ENOENT);
    CHECK(got == SENT_LOOP);
}

/* The same through an explicit policy object. */
TEST(policy_object_get_event_loop_auto_once)
{
    ca_policy *p = NULL;
    CHECK_OK(ca_poll_policy_new(&p));
    ca_loop *a = NULL, *b = NULL;
    CHECK_OK(ca_policy_get_event_loop(p, &a));
    CHECK(strcmp(ca_loop_kind(a), "poll") == 0);
    CHECK_OK(ca_policy_get_event_loop(p, &b));
    CHECK(a == b);
    ca_loop_ref(a); /* keep it alive: pointer comparisons below */
    CHECK_OK(ca_policy_set_event_loop(p, NULL));
    b = SENT_LOOP;
    CHECK_ERR(ca_policy_get_event_loop(p, &b), -ENOENT);
    CHECK(b == SENT_LOOP);
    /* The process policy is separate. */
    CHECK_OK(ca_get_event_loop(&b));
    CHECK(b != a);
    ca_policy_unref(p);
    CHECK_OK(ca_set_event_loop(NULL));
    loop_done(a);
}

/* Other threads: -ENOENT; they never get the main thread's loop. */
static void *thr_get(void *arg)
{
    ca_loop *l = SENT_LOOP;
    int r = ca_get_event_loop(&l);
    ((int *)arg)[0] = r;
    ((int *)arg)[1] = l == SENT_LOOP;
    return NULL;
}

TEST(policy_other_thread_enoent)
{
    ca_loop *m = NULL;
    CHECK_OK(ca_get_event_loop(&m));
    int res[2] = {1, 0};
    pthread_t t;
    CHECK_EQ(pthread_create(&t, NULL, thr_get, res), 0);
    pthread_join(t, NULL);
    CHECK_ERR(res[0], -ENOENT);
    CHECK(res[1]);
    CHECK_OK(ca_set_event_loop(NULL));
}

/* A thread's own set loop. */
struct thrset {
    ca_loop *loop;
    int r;
    ca_loop *got;
};
static void *thr_set_get(void *arg)
{
    struct thrset *t = arg;
    CHECK_OK(ca_set_event_loop(t->loop));
    t->r = ca_get_event_loop(&t->got);
    CHECK_OK(ca_set_event_loop(NULL));
    return NULL;
}

TEST(policy_thread_context)
{
    struct thrset t = {.loop = new_epoll()};
    pthread_t th;
    CHECK_EQ(pthread_create(&th, NULL, thr_set_get, &t), 0);
    pthread_join(th, NULL);
    CHECK_OK(t.r);
    CHECK(t.got == t.loop);
    ca_loop *m = NULL;
    CHECK_OK(ca_get_event_loop(&m));
    CHECK(m != t.loop);
    loop_done(t.loop);
    CHECK_OK(ca_set_event_loop(NULL));
}

/* "ca_get_event_loop: running loop first, else the policy's" (the policy is not asked). */
static int gel_calls;
static int gel_op(ca_policy *self, ca_loop **out)
{
    gel_calls++;
    return ca_policy_get_event_loop(ca_policy_base(self), out);
}
static const ca_policy_ops gel_ops = {.get_event_loop = gel_op};
static void gel_cb(void *arg)
{
    ca_loop *got = NULL;
    CHECK_OK(ca_get_event_loop(&got));
    *(ca_loop **)arg = got;
}

TEST(policy_get_event_loop_running_first)
{
    ca_policy *def = NULL, *p = NULL;
    CHECK_OK(ca_default_policy_new(&def));
    CHECK_OK(ca_policy_new(&gel_ops, NULL, def, &p));
    ca_policy_unref(def);
    CHECK_OK(ca_set_event_loop_policy(p));
    ca_policy_unref(p);
    ca_loop *cur = new_epoll(), *run = new_epoll();
    CHECK_OK(ca_set_event_loop(cur));
    ca_loop *got = NULL;
    gel_calls = 0;
    CHECK_OK(ca_get_event_loop(&got));
    CHECK(got == cur);
    CHECK_EQ(gel_calls, 1);
    CHECK_OK(ca_loop_call_soon(run, gel_cb, &got, NULL));
    run_once(run);
    CHECK(got == run);
    CHECK_EQ(gel_calls, 1);
    CHECK_OK(ca_set_event_loop(NULL));
    loop_done(cur);
    loop_done(run);
}

/* "Setters take their own reference": ca_set_event_loop. */
TEST(policy_set_event_loop_takes_reference)
{
    ca_loop *l = new_epoll();
    CHECK_OK(ca_set_event_loop(l));
    ca_loop_unref(l); /* the policy holds it */
    ca_loop *got = NULL;
    CHECK_OK(ca_get_event_loop(&got));
    CHECK(got == l);
    int n = 0;
    CHECK_OK(ca_loop_call_soon(got, count_cb, &n, NULL));
    run_once(got);
    CHECK_EQ(n, 1);
    CHECK_OK(ca_loop_close(got));
    CHECK_OK(ca_set_event_loop(NULL)); /* drops the last reference */
}

/* ca_policy_new: NULL ops -EINVAL; delegation; base/data; -ENOTSUP with no base. */
static const ca_policy_ops empty_ops = {0};

TEST(policy_new_and_enotsup)
{
    ca_policy *p = SENT_POL;
    CHECK_ERR(ca_policy_new(NULL, NULL, NULL, &p), -EINVAL);
    CHECK_ERR(ca_policy_new(&empty_ops, NULL, NULL, NULL), -EINVAL);
    CHECK(p == SENT_POL);
    int data = 5;
    CHECK_OK(ca_policy_new(&empty_ops, &data, NULL, &p));
    CHECK(ca_policy_data(p) == &data);
    CHECK(ca_policy_base(p) == NULL);
    ca_loop *l = SENT_LOOP;
    ca_child_watcher *w = SENT_W;
    CHECK_ERR(ca_policy_get_event_loop(p, &l), -ENOTSUP);
    CHECK_ERR(ca_policy_set_event_loop(p, NULL), -ENOTSUP);
    CHECK_ERR(ca_policy_new_event_loop(p, &l), -ENOTSUP);
    CHECK_ERR(ca_policy_get_child_watcher(p, &w), -ENOTSUP);
    CHECK_ERR(ca_policy_set_child_watcher(p, NULL), -ENOTSUP);
    CHECK(l == SENT_LOOP && w == SENT_W);
    /* Module-level functions through it. */
    CHECK_OK(ca_set_event_loop_policy(p));
    CHECK_ERR(ca_get_event_loop(&l), -ENOTSUP);
    CHECK_ERR(ca_set_event_loop(NULL), -ENOTSUP);
    CHECK_ERR(ca_new_event_loop(&l), -ENOTSUP);
    CHECK_ERR(ca_get_child_watcher(&w), -ENOTSUP);
    CHECK_ERR(ca_set_child_watcher(NULL), -ENOTSUP);
    CHECK(l == SENT_LOOP && w == SENT_W);
    CHECK_OK(ca_set_event_loop_policy(NULL));
    ca_policy_unref(p);
    /* NULL policy / out. */
    CHECK_ERR(ca_policy_get_event_loop(NULL, &l), -EINVAL);
    CHECK_ERR(ca_policy_set_event_loop(NULL, NULL), -EINVAL);
    CHECK_ERR(ca_policy_new_event_loop(NULL, &l), -EINVAL);
    CHECK_ERR(ca_policy_get_child_watcher(NULL, &w), -EINVAL);
    CHECK_ERR(ca_policy_set_child_watcher(NULL, NULL), -EINVAL);
    ca_policy *d = NULL;
    CHECK_OK(ca_default_policy_new(&d));
    CHECK_ERR(ca_policy_get_event_loop(d, NULL), -EINVAL);
    CHECK_ERR(ca_policy_new_event_loop(d, NULL), -EINVAL);
    CHECK_ERR(ca_policy_get_child_watcher(d, NULL), -EINVAL);
    ca_policy_unref(d);
    CHECK(ca_policy_data(NULL) == NULL);
    CHECK(ca_policy_base(NULL) == NULL);
}

/* Delegation: NULL ops are "called on base, so the state they keep lives in base". */
TEST(policy_subclass_state_in_base)
{
    ca_policy *base = NULL, *p = NULL;
    CHECK_OK(ca_default_policy_new(&base));
    CHECK_OK(ca_policy_new(&gel_ops, NULL, base, &p));
    CHECK(ca_policy_base(p) == base);
    ca_loop *l = new_epoll();
    CHECK_OK(ca_policy_set_event_loop(p, l));
    ca_loop *got = NULL;
    CHECK_OK(ca_policy_get_event_loop(base, &got));
    CHECK(got == l);
    gel_calls = 0;
    CHECK_OK(ca_policy_get_event_loop(p, &got));
    CHECK(got == l);
    CHECK_EQ(gel_calls, 1);
    ca_child_watcher *w1 = NULL, *w2 = NULL;
    CHECK_OK(ca_policy_get_child_watcher(p, &w1));
    CHECK_OK(ca_policy_get_child_watcher(base, &w2));
    CHECK(w1 == w2);
    ca_policy_unref(base); /* p holds it */
    CHECK_OK(ca_policy_get_event_loop(ca_policy_base(p), &got));
    CHECK(got == l);
    CHECK_OK(ca_policy_set_event_loop(p, NULL));
    ca_policy_unref(p);
    loop_done(l);
}

/* Ops returning 0 with NULL: get_event_loop -> -ENOENT, new_event_loop -> -EINVAL,
 * get_child_watcher -> -ENOENT (header). Out untouched. */
static int null_get(ca_policy *self, ca_loop **out)
{
    *out = NULL;
    return 0;
}
static int null_new(ca_policy *self, ca_loop **out)
{
    *out = NULL;
    return 0;
}
static int null_gw(ca_policy *self, ca_child_watcher **out)
{
    *out = NULL;
    return 0;
}
static const ca_policy_ops nullret_ops = {
    .get_event_loop = null_get, .new_event_loop = null_new, .get_child_watcher = null_gw};

TEST(policy_op_returning_null)
{
    ca_policy *p = NULL;
    CHECK_OK(ca_policy_new(&nullret_ops, NULL, NULL, &p));
    ca_loop *l = SENT_LOOP;
    ca_child_watcher *w = SENT_W;
    CHECK_ERR(ca_policy_get_event_loop(p, &l), -ENOENT);
    CHECK_ERR(ca_policy_new_event_loop(p, &l), -EINVAL);
    CHECK_ERR(ca_policy_get_child_watcher(p, &w), -ENOENT);
    CHECK(l == SENT_LOOP && w == SENT_W);
    CHECK_OK(ca_set_event_loop_policy(p));
    CHECK_ERR(ca_get_event_loop(&l), -ENOENT);
    CHECK_ERR(ca_new_event_loop(&l), -EINVAL);
    CHECK_ERR(ca_get_child_watcher(&w), -ENOENT);
    CHECK(l == SENT_LOOP && w == SENT_W);
    CHECK_ERR(ca_run(NULL, NULL, NULL), -EINVAL);
    CHECK_OK(ca_set_event_loop_policy(NULL));
    ca_policy_unref(p);
}

/* Built-in policies: which loops new_event_loop makes. */
TEST(policy_builtins_make_their_loops)
{
    int (*mk[])(ca_policy **) = {ca_default_policy_new, ca_selector_policy_new, ca_poll_policy_new,
                                 ca_proactor_policy_new};
    const char *kind[] = {"epoll", "epoll", "poll", "io_uring"};
    for (int i = 0; i < 4; i++) {
        ca_policy *p = SENT_POL;
        int r = mk[i](&p);
        if (i == 3 && (r == -ENOSYS || r == -EPERM)) {
            CHECK(p == SENT_POL);
            continue;
        }
        CHECK_OK(r);
        ca_loop *l = NULL;
        CHECK_OK(ca_policy_new_event_loop(p, &l));
        CHECK(strcmp(ca_loop_kind(l), kind[i]) == 0);
        ca_loop *l2 = NULL;
        CHECK_OK(ca_policy_new_event_loop(p, &l2));
        CHECK(l2 != l);
        loop_done(l);
        loop_done(l2);
        ca_policy_unref(p);
    }
}

/* Child watcher: "created lazily by get_child_watcher: ThreadedChildWatcher"; borrowed; one
 * per policy; always active. */
TEST(policy_lazy_threaded_watcher)
{
    ca_child_watcher *w = SENT_W, *w2 = NULL;
    CHECK_OK(ca_get_child_watcher(&w));
    CHECK(w != SENT_W && w != NULL);
    CHECK(strcmp(ca__child_watcher_kind(w), "threaded") == 0);
    CHECK(ca_child_watcher_is_active(w));
    CHECK_OK(ca_get_child_watcher(&w2));
    CHECK(w == w2);
    ca_child_watcher_unref(ca_child_watcher_ref(w));
    CHECK(ca_child_watcher_is_active(w));
}

/* "set_event_loop in the main thread attaches the policy's child watcher (if one exists) to
 * that loop, or detaches it for NULL" — seen through a Safe watcher's is_active. */
TEST(policy_set_event_loop_attaches_watcher)
{
    ca_child_watcher *w = NULL;
    CHECK_OK(ca_safe_child_watcher_new(&w));
    CHECK_OK(ca_set_child_watcher(w));
    CHECK(!ca_child_watcher_is_active(w)); /* "does not attach the new one" */
    ca_loop *l = new_epoll();
    CHECK_OK(ca_set_event_loop(l));
    CHECK(ca_child_watcher_is_active(w));
    CHECK_OK(ca_set_event_loop(NULL));
    CHECK(!ca_child_watcher_is_active(w));
    CHECK_OK(ca_set_event_loop(l));
    CHECK(ca_child_watcher_is_active(w));
    CHECK_OK(ca_set_child_watcher(NULL)); /* closes w */
    CHECK(!ca_child_watcher_is_active(w));
    CHECK_ERR(ca_child_watcher_add_child_handler(w, 1, NULL, NULL), -EINVAL);
    ca_child_watcher_unref(w);
    CHECK_OK(ca_set_event_loop(NULL));
    loop_done(l);
}

/* The setter takes its own reference to the watcher: unref ours, the policy's still works. */
static void wcb_count(pid_t pid, int rc, void *arg) { atomic_fetch_add((atomic_int *)arg, 1); }

TEST(policy_set_child_watcher_takes_reference)
{
    ca_loop *l = new_epoll();
    CHECK_OK(ca_set_event_loop(l));
    ca_child_watcher *w = NULL;
    CHECK_OK(ca_threaded_child_watcher_new(&w));
    CHECK_OK(ca_set_child_watcher(w));
    ca_child_watcher_unref(w);
    ca_child_watcher *got = NULL;
    CHECK_OK(ca_get_child_watcher(&got));
    CHECK(got == w);
    CHECK(ca_child_watcher_is_active(got));
    pid_t pid = fork();
    if (pid == 0) t_child_exit(3);
    atomic_int n = 0;
    CHECK_OK(ca_child_watcher_add_child_handler(got, pid, wcb_count, &n));
    CHECK(t_run_until(l, t_flag_set, &n, 5.0));
    CHECK_OK(ca_set_event_loop(NULL));
    loop_done(l);
}

/* "set_child_watcher closes the previous watcher (as 3.11 does) and does not attach the new
 * one." Also not when it is the same watcher. */
TEST(policy_set_child_watcher_closes_previous)
{
    ca_loop *l = new_epoll();
    CHECK_OK(ca_set_event_loop(l));
    ca_child_watcher *old = NULL;
    CHECK_OK(ca_get_child_watcher(&old));
    ca_child_watcher_ref(old);
    ca_child_watcher *fast = NULL;
    CHECK_OK(ca_fast_child_watcher_new(&fast));
    CHECK_OK(ca_set_child_watcher(fast));
    CHECK_ERR(ca_child_watcher_add_child_handler(old, getpid(), wcb_count, NULL), -EBADF);
    CHECK(!ca_child_watcher_is_active(old));
    ca_child_watcher_unref(old);
    CHECK(!ca_child_watcher_is_active(fast)); /* not attached */
    CHECK_OK(ca_set_child_watcher(fast));     /* the same: not closed */
    CHECK_OK(ca_child_watcher_attach_loop(fast, l));
    CHECK(ca_child_watcher_is_active(fast));
    CHECK_OK(ca_set_child_watcher(NULL));
    CHECK(!ca_child_watcher_is_active(fast)); /* closed */
    CHECK_ERR(ca_child_watcher_attach_loop(fast, l), -EBADF);
    ca_child_watcher_unref(fast);
    CHECK_OK(ca_set_event_loop(NULL));
    loop_done(l);
}

/* get_child_watcher in the main thread attaches the lazily-made watcher to the main loop;
 * the lazily-made watcher after set_child_watcher(NULL) is a new Threaded one. */
TEST(policy_watcher_recreated_after_null)
{
    ca_child_watcher *w1 = NULL, *w2 = NULL;
    CHECK_OK(ca_get_child_watcher(&w1));
    ca_child_watcher_ref(w1);
    CHECK_OK(ca_set_child_watcher(NULL));
    CHECK_OK(ca_get_child_watcher(&w2));
    CHECK(w2 != NULL);
    CHECK(strcmp(ca__child_watcher_kind(w2), "threaded") == 0);
    CHECK(ca_child_watcher_is_active(w2));
    ca_child_watcher_unref(w1);
}

/* "In a child made by fork(), the current and running loops inherited from the parent are
 * never returned." */
static void fork_in_cb(void *arg)
{
    ca_loop *parent = arg;
    pid_t pid = fork();
    if (pid == 0) {
        int bad = 0;
        if (ca_get_running_loop() != NULL) bad |= 1;
        ca_loop *got = NULL;
        int r = ca_get_event_loop(&got);
        if (r == 0 && got == parent) bad |= 2;
        if (ca_loop_is_running(parent)) bad |= 4;
        t_child_exit(bad);
    }
    int st;
    CHECK_EQ(waitpid(pid, &st, 0), pid);
    CHECK(WIFEXITED(st));
    CHECK_EQ(WEXITSTATUS(st), 0);
}

TEST(policy_fork_child_never_sees_parent_loops)
{
    ca_loop *l = new_epoll();
    CHECK_OK(ca_set_event_loop(l));
    pid_t pid = fork();
    if (pid == 0) {
        int bad = 0;
        ca_loop *got = NULL;
        int r = ca_get_event_loop(&got);
        /* Main thread of the child, nothing set there: a new loop (or -ENOENT); never l. */
        if (r == 0 && got == l) bad |= 1;
        if (r == 0 && got && ca_loop_call_soon(got, noop, NULL, NULL) != 0) bad |= 2;
        if (r != 0 && r != -ENOENT) bad |= 4;
        ca_loop *cur = NULL;
        if (ca_policy_get_event_loop(ca_get_event_loop_policy(), &cur) == 0 && cur == l) bad |= 8;
        t_child_exit(bad);
    }
    int st;
    CHECK_EQ(waitpid(pid, &st, 0), pid);
    CHECK(WIFEXITED(st));
    CHECK_EQ(WEXITSTATUS(st), 0);
    CHECK_OK(ca_loop_call_soon(l, fork_in_cb, l, NULL));
    run_once(l);
    CHECK_OK(ca_set_event_loop(NULL));
    loop_done(l);
}

/* "the module-level functions are safe from any thread, also while another thread replaces
 * the policy" (short). */
static atomic_int race_stop;
static void *policy_replacer(void *arg)
{
    for (int i = 0; i < 200 && !atomic_load(&race_stop); i++) {
        ca_policy *p = NULL;
        CHECK_OK(ca_default_policy_new(&p));
        CHECK_OK(ca_set_event_loop_policy(p));
        ca_policy_unref(p);
    }
    return NULL;
}
static void *policy_user(void *arg)
{
    for (int i = 0; i < 400; i++) {
        ca_policy *p = ca_get_event_loop_policy();
        CHECK(p != NULL);
        ca_loop *l = NULL;
        int r = ca_get_event_loop(&l);
        CHECK(r == -ENOENT);
        CHECK_OK(ca_new_event_loop(&l));
        loop_done(l);
    }
    return NULL;
}

TEST(policy_replace_while_used) /* timeout: 60 */
{
    pthread_t a, b, c;
    CHECK_EQ(pthread_create(&a, NULL, policy_replacer, NULL), 0);
    CHECK_EQ(pthread_create(&b, NULL, policy_user, NULL), 0);
    CHECK_EQ(pthread_create(&c, NULL, policy_user, NULL), 0);
    pthread_join(b, NULL);
    pthread_join(c, NULL);
    atomic_store(&race_stop, 1);
    pthread_join(a, NULL);
}

/* set_event_loop attaches the watcher only "in the main thread". */
static void *thr_set_loop(void *arg)
{
    ca_loop *l = arg;
    CHECK_OK(ca_set_event_loop(l));
    CHECK_OK(ca_set_event_loop(NULL));
    CHECK_OK(ca_set_event_loop(l));
    return NULL;
}

TEST(policy_set_event_loop_other_thread_does_not_attach)
{
    ca_child_watcher *w = NULL;
    CHECK_OK(ca_safe_child_watcher_new(&w));
    CHECK_OK(ca_set_child_watcher(w));
    ca_loop *m = new_epoll(), *o = new_epoll();
    CHECK_OK(ca_set_event_loop(m));
    CHECK(ca_child_watcher_is_active(w));
    pthread_t t;
    CHECK_EQ(pthread_create(&t, NULL, thr_set_loop, o), 0);
    pthread_join(t, NULL);
    CHECK(ca_child_watcher_is_active(w)); /* still attached to m */
    CHECK_OK(ca_loop_close(m));
    CHECK(!ca_child_watcher_is_active(w)); /* not to o */
    CHECK_OK(ca_set_child_watcher(NULL));
    ca_child_watcher_unref(w);
    CHECK_OK(ca_set_event_loop(NULL));
    ca_loop_unref(m);
    loop_done(o);
}

/* set_event_loop in the main thread "returns that call's [attach_loop's] error, the loop being
 * set all the same" (header). A custom loop without signal handlers cannot take a Safe watcher. */
TEST(policy_set_event_loop_attach_error_loop_still_set)
{
    ca_child_watcher *w = NULL;
    CHECK_OK(ca_safe_child_watcher_new(&w));
    CHECK_OK(ca_set_child_watcher(w));
    struct spy s = {0};
    ca_loop *l = NULL;
    CHECK_OK(ca_loop_new_custom(&bare_ops, &s, &l));
    int r = ca_set_event_loop(l);
    CHECK(r < 0);
    ca_loop *got = NULL;
    CHECK_OK(ca_get_event_loop(&got));
    CHECK(got == l);
    CHECK(!ca_child_watcher_is_active(w));
    CHECK_OK(ca_set_child_watcher(NULL));
    ca_child_watcher_unref(w);
    CHECK_OK(ca_set_event_loop(NULL));
    loop_done(l);
}

/* A child forked from a non-main thread: that thread is the child's main thread, and nothing
 * inherited is returned. */
static void *fork_from_thread(void *arg)
{
    ca_loop *parent_loop = arg;
    pid_t pid = fork();
    if (pid == 0) {
        ca_loop *got = NULL;
        int r = ca_get_event_loop(&got);
        int bad = 0;
        if (r != 0) bad |= 1; /* main thread here: an automatic loop */
        if (r == 0 && got == parent_loop) bad |= 2;
        t_child_exit(bad);
    }
    int st = 0;
    waitpid(pid, &st, 0);
    return (void *)(intptr_t)(WIFEXITED(st) ? WEXITSTATUS(st) : 100);
}

TEST(policy_fork_from_thread_child_main_thread)
{
    ca_loop *m = new_epoll();
    CHECK_OK(ca_set_event_loop(m));
    pthread_t t;
    void *res = NULL;
    CHECK_EQ(pthread_create(&t, NULL, fork_from_thread, m), 0);
    pthread_join(t, &res);
    CHECK_EQ((intptr_t)res, 0);
    CHECK_OK(ca_set_event_loop(NULL));
    loop_done(m);
}

/* "A thread's reference to its loop is dropped when the thread exits" (header). */
static void *set_and_exit(void *arg)
{
    CHECK_OK(ca_set_event_loop(arg));
    return NULL;
}

TEST(policy_thread_exit_drops_its_loop)
{
    struct spy s = {0};
    ca_loop *l = NULL;
    CHECK_OK(ca_loop_new_custom(&bare_ops, &s, &l));
    pthread_t t;
    CHECK_EQ(pthread_create(&t, NULL, set_and_exit, l), 0);
    pthread_join(t, NULL);
    CHECK_OK(ca_loop_close(l));
    ca_loop_unref(l);
    for (int i = 0; i < 100 && s.destroyed == 0; i++) sleep_s(0.01);
    CHECK_EQ(s.destroyed, 1);
}

/* set_event_loop_policy(NULL): a new default policy, as asyncio: the main thread's
 * get_event_loop makes a fresh loop there; the old policy's loops are dropped. */
TEST(policy_set_null_fresh_default)
{
    struct spy s = {0};
    ca_loop *l = NULL;
    CHECK_OK(ca_loop_new_custom(&bare_ops, &s, &l));
    CHECK_OK(ca_set_event_loop(l));
    ca_loop_unref(l); /* the policy holds the only reference */
    ca_policy *old = ca_get_event_loop_policy();
    CHECK_OK(ca_set_event_loop_policy(NULL));
    CHECK(s.destroyed == 1);
    ca_policy *now = ca_get_event_loop_policy();
    CHECK(now != NULL);
    (void)old;
    ca_loop *got = NULL;
    CHECK_OK(ca_get_event_loop(&got));
    CHECK(got != NULL && strcmp(ca_loop_kind(got), "epoll") == 0);
    CHECK_OK(ca_set_event_loop(NULL));
}

/* "*out is never written on failure" even when an op writes it and then fails. */
static int bad_get(ca_policy *self, ca_loop **out)
{
    *out = (ca_loop *)(uintptr_t)0x1234;
    return -EIO;
}
static int bad_new(ca_policy *self, ca_loop **out)
{
    *out = (ca_loop *)(uintptr_t)0x1234;
    return -EIO;
}
static int bad_gw(ca_policy *self, ca_child_watcher **out)
{
    *out = (ca_child_watcher *)(uintptr_t)0x1234;
    return -EIO;
}
static const ca_policy_ops bad_ops = {.get_event_loop = bad_get, .new_event_loop = bad_new,
                                      .get_child_watcher = bad_gw};

TEST(policy_out_untouched_when_op_fails)
{
    ca_policy *p = NULL;
    CHECK_OK(ca_policy_new(&bad_ops, NULL, NULL, &p));
    ca_loop *l = SENT_LOOP;
    ca_child_watcher *w = SENT_W;
    CHECK_ERR(ca_policy_get_event_loop(p, &l), -EIO);
    CHECK_ERR(ca_policy_new_event_loop(p, &l), -EIO);
    CHECK_ERR(ca_policy_get_child_watcher(p, &w), -EIO);
    CHECK(l == SENT_LOOP && w == SENT_W);
    CHECK_OK(ca_set_event_loop_policy(p));
    CHECK_ERR(ca_get_event_loop(&l), -EIO);
    CHECK_ERR(ca_new_event_loop(&l), -EIO);
    CHECK_ERR(ca_get_child_watcher(&w), -EIO);
    CHECK(l == SENT_LOOP && w == SENT_W);
    /* ca_run with the policy's failing new_event_loop: its error, main not called. */
    struct rstate s = {0};
    CHECK_ERR(ca_run(rmain, &s, NULL), -EIO);
    CHECK_EQ(s.called, 0);
    CHECK_OK(ca_set_event_loop_policy(NULL));
    ca_policy_unref(p);
}

/* ca_get_event_loop always answers for the current process policy and its current state
 * (whatever caching is done underneath). */
static ca_loop *fixed_loop;
static int fixed_get(ca_policy *self, ca_loop **out)
{
    *out = fixed_loop;
    return 0;
}
static const ca_policy_ops fixed_ops = {.get_event_loop = fixed_get};

TEST(policy_get_event_loop_follows_every_change)
{
    ca_loop *a = new_epoll(), *b = new_epoll(), *got = NULL;
    CHECK_OK(ca_set_event_loop(a));
    CHECK_OK(ca_get_event_loop(&got));
    CHECK(got == a);
    /* Set through the policy object rather than the module function. */
    CHECK_OK(ca_policy_set_event_loop(ca_get_event_loop_policy(), b));
    CHECK_OK(ca_get_event_loop(&got));
    CHECK(got == b);
    /* A new process policy whose get_event_loop is custom. */
    ca_policy *def = NULL, *p = NULL;
    CHECK_OK(ca_default_policy_new(&def));
    fixed_loop = a;
    CHECK_OK(ca_policy_new(&fixed_ops, NULL, def, &p));
    CHECK_OK(ca_set_event_loop_policy(p));
    CHECK_OK(ca_get_event_loop(&got));
    CHECK(got == a);
    fixed_loop = b;
    CHECK_OK(ca_get_event_loop(&got));
    CHECK(got == b);
    /* Back to a plain default policy: nothing set in it, main thread: a new automatic loop. */
    ca_policy *d2 = NULL;
    CHECK_OK(ca_default_policy_new(&d2));
    CHECK_OK(ca_policy_set_event_loop(d2, a));
    CHECK_OK(ca_set_event_loop_policy(d2));
    CHECK_OK(ca_get_event_loop(&got));
    CHECK(got == a);
    CHECK_OK(ca_policy_set_event_loop(def, b)); /* another policy: no effect here */
    CHECK_OK(ca_get_event_loop(&got));
    CHECK(got == a);
    CHECK_OK(ca_set_event_loop(NULL));
    got = SENT_LOOP;
    CHECK_ERR(ca_get_event_loop(&got), -ENOENT);
    CHECK_OK(ca_set_event_loop_policy(NULL));
    CHECK_OK(ca_policy_set_event_loop(def, NULL));
    ca_policy_unref(def);
    ca_policy_unref(p);
    ca_policy_unref(d2);
    CHECK_OK(ca_set_event_loop(NULL));
    loop_done(a);
    loop_done(b);
}

/* A loop set in one thread's context is not seen by another thread, even after the other
 * thread looked it up before. */
struct cachethr {
    ca_loop *mine;
    pthread_barrier_t *bar;
    int ok;
};
static void *cache_thread(void *arg)
{
    struct cachethr *c = arg;
    ca_loop *got = SENT_LOOP;
    int r1 = ca_get_event_loop(&got);
    pthread_barrier_wait(c->bar); /* main sets its loop */
    pthread_barrier_wait(c->bar);
    int r2 = ca_get_event_loop(&got);
    CHECK_OK(ca_set_event_loop(c->mine));
    ca_loop *g2 = NULL;
    int r3 = ca_get_event_loop(&g2);
    c->ok = r1 == -ENOENT && r2 == -ENOENT && r3 == 0 && g2 == c->mine;
    CHECK_OK(ca_set_event_loop(NULL));
    return NULL;
}

TEST(policy_thread_contexts_separate)
{
    pthread_barrier_t bar;
    pthread_barrier_init(&bar, NULL, 2);
    struct cachethr c = {.mine = new_epoll(), .bar = &bar};
    ca_loop *m = new_epoll();
    pthread_t t;
    CHECK_EQ(pthread_create(&t, NULL, cache_thread, &c), 0);
    pthread_barrier_wait(&bar);
    CHECK_OK(ca_set_event_loop(m));
    pthread_barrier_wait(&bar);
    pthread_join(t, NULL);
    CHECK(c.ok);
    ca_loop *got = NULL;
    CHECK_OK(ca_get_event_loop(&got));
    CHECK(got == m);
    CHECK_OK(ca_set_event_loop(NULL));
    pthread_barrier_destroy(&bar);
    loop_done(m);
    loop_done(c.mine);
}

/* "never NULL: creates the default lazily" — once, also when many threads ask first at once. */
static pthread_barrier_t lazy_bar;
static void *lazy_thread(void *arg)
{
    pthread_barrier_wait(&lazy_bar);
    *(ca_policy **)arg = ca_get_event_loop_policy();
    return NULL;
}

TEST(policy_lazy_default_race_free)
{
    enum { N = 8 };
    pthread_t t[N];
    ca_policy *got[N];
    pthread_barrier_init(&lazy_bar, NULL, N);
    for (int i = 0; i < N; i++) CHECK_EQ(pthread_create(&t[i], NULL, lazy_thread, &got[i]), 0);
    for (int i = 0; i < N; i++) pthread_join(t[i], NULL);
    pthread_barrier_destroy(&lazy_bar);
    for (int i = 0; i < N; i++) {
        CHECK(got[i] != NULL);
        CHECK(got[i] == got[0]);
    }
    CHECK(ca_get_event_loop_policy() == got[0]);
}
