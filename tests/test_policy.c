/*
 * Tests of event loop policies (policy.c) and the runner (runner.c). Every test runs in its
 * own process, so each starts with no process policy installed.
 */
#include "harness.h"

#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <sys/wait.h>
#include <time.h>

/* Internal (in the static library the tests link): the watcher's kind name. */
const char *ca__child_watcher_kind(const ca_child_watcher *w);

/* ----- helpers ---------------------------------------------------------------------------- */

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void stop_cb(void *arg) { ca_loop_stop(arg); }

/* A custom loop that is never run, whose destruction is counted: to see when a policy
 * drops the last reference to a loop. */
static int idle_run(ca_loop *self) { return 0; }
static void count_destroy(ca_loop *self) { atomic_fetch_add((atomic_int *)ca_loop_data(self), 1); }
static const ca_loop_ops counted_ops = {.run_forever = idle_run, .destroy = count_destroy};

static ca_loop *counted_loop(atomic_int *destroyed)
{
    ca_loop *loop = NULL;
    CHECK_OK(ca_loop_new_custom(&counted_ops, destroyed, &loop));
    return loop;
}

static void *thread_get_result(void *arg)
{
    ca_loop *loop = (ca_loop *)1;
    int r = ca_get_event_loop(&loop);
    *(int *)arg = r;
    CHECK(r < 0 ? loop == (ca_loop *)1 : 1);
    return NULL;
}

/* ca_get_event_loop()'s result in a new thread. */
static int get_in_thread(void)
{
    int r = 1;
    pthread_t t;
    CHECK_EQ(pthread_create(&t, NULL, thread_get_result, &r), 0);
    pthread_join(t, NULL);
    return r;
}

/* ----- per-thread context ------------------------------------------------------------------ */

#define NSEP 16
static pthread_barrier_t sep_barrier;

struct sep_arg {
    ca_loop *loop;
    int in_callback_ok;
};

static void sep_cb(void *arg)
{
    struct sep_arg *a = arg;
    ca_loop *got = NULL;
    a->in_callback_ok = ca_get_event_loop(&got) == 0 && got == a->loop &&
                        ca_get_running_loop() == a->loop;
    ca_loop_stop(a->loop);
}

static void *sep_thread(void *arg)
{
    struct sep_arg *a = arg;
    ca_loop *got = NULL;
    CHECK_OK(ca_selector_loop_new(&a->loop));
    CHECK_ERR(ca_get_event_loop(&got), -ENOENT);
    CHECK_OK(ca_set_event_loop(a->loop));
    /* Everyone has set theirs before anyone reads. */
    pthread_barrier_wait(&sep_barrier);
    for (int i = 0; i < 100; i++) {
        CHECK_OK(ca_get_event_loop(&got));
        CHECK(got == a->loop);
    }
    CHECK_OK(ca_loop_call_soon(a->loop, sep_cb, a, NULL));
    CHECK_OK(ca_loop_run_forever(a->loop));
    CHECK(a->in_callback_ok);
    CHECK_OK(ca_get_event_loop(&got));
    CHECK(got == a->loop);
    pthread_barrier_wait(&sep_barrier);
    CHECK_OK(ca_set_event_loop(NULL));
    CHECK_ERR(ca_get_event_loop(&got), -ENOENT);
    CHECK_OK(ca_loop_close(a->loop));
    ca_loop_unref(a->loop);
    return NULL;
}

TEST(per_thread_separation)
{
    pthread_t t[NSEP];
    struct sep_arg args[NSEP] = {{0}};
    pthread_barrier_init(&sep_barrier, NULL, NSEP);
    for (int i = 0; i < NSEP; i++) CHECK_EQ(pthread_create(&t[i], NULL, sep_thread, &args[i]), 0);
    for (int i = 0; i < NSEP; i++) pthread_join(t[i], NULL);
    pthread_barrier_destroy(&sep_barrier);
    for (int i = 0; i < NSEP; i++)
        for (int j = i + 1; j < NSEP; j++) CHECK(args[i].loop != args[j].loop);
}

/* A policy over the default one that counts new_event_loop calls. */
static int count_new(ca_policy *self, ca_loop **out)
{
    atomic_fetch_add((atomic_int *)ca_policy_data(self), 1);
    return ca_policy_new_event_loop(ca_policy_base(self), out);
}
static const ca_policy_ops count_new_ops = {.new_event_loop = count_new};

static ca_policy *install_counting_policy(atomic_int *counter)
{
    ca_policy *base = NULL, *p = NULL;
    CHECK_OK(ca_default_policy_new(&base));
    CHECK_OK(ca_policy_new(&count_new_ops, counter, base, &p));
    ca_policy_unref(base);
    CHECK_OK(ca_set_event_loop_policy(p));
    ca_policy_unref(p);
    return p;
}

TEST(main_thread_creates_once)
{
    atomic_int made = 0;
    install_counting_policy(&made);
    ca_loop *a = NULL, *b = NULL;
    CHECK_OK(ca_get_event_loop(&a));
    CHECK_EQ(strcmp(ca_loop_kind(a), "epoll"), 0);
    CHECK_OK(ca_get_event_loop(&b));
    CHECK(a == b);
    CHECK_OK(ca_policy_get_event_loop(ca_get_event_loop_policy(), &b));
    CHECK(a == b);
    CHECK_EQ(atomic_load(&made), 1);
    /* The policy owns it: closing it does not make the policy forget it (as asyncio). */
    CHECK_OK(ca_loop_close(a));
    CHECK_OK(ca_get_event_loop(&b));
    CHECK(a == b && ca_loop_is_closed(b));
    /* Once set_event_loop was called, nothing is created again. */
    CHECK_OK(ca_set_event_loop(NULL));
    CHECK_ERR(ca_get_event_loop(&b), -ENOENT);
    CHECK_ERR(ca_get_event_loop(&b), -ENOENT);
    CHECK_EQ(atomic_load(&made), 1);
    CHECK_OK(ca_set_event_loop_policy(NULL));
}

TEST(main_thread_no_create_after_set)
{
    /* set_event_loop(NULL) before any get: the main thread gets no loop (3.11's _set_called). */
    atomic_int made = 0;
    install_counting_policy(&made);
    CHECK_OK(ca_set_event_loop(NULL));
    ca_loop *l = NULL;
    CHECK_ERR(ca_get_event_loop(&l), -ENOENT);
    CHECK(l == NULL);
    CHECK_EQ(atomic_load(&made), 0);
    CHECK_OK(ca_set_event_loop_policy(NULL));
}

TEST(non_main_thread_gets_enoent)
{
    atomic_int made = 0;
    install_counting_policy(&made);
    CHECK_ERR(get_in_thread(), -ENOENT);
    CHECK_EQ(atomic_load(&made), 0);
    /* Also when the main thread has one. */
    ca_loop *main_loop = NULL;
    CHECK_OK(ca_get_event_loop(&main_loop));
    CHECK_ERR(get_in_thread(), -ENOENT);
    CHECK_EQ(atomic_load(&made), 1);
    CHECK_OK(ca_set_event_loop(NULL));
    CHECK_OK(ca_set_event_loop_policy(NULL));
}

static void *set_null_thread(void *arg)
{
    ca_loop *loop = arg, *got = NULL;
    CHECK_OK(ca_set_event_loop(loop));
    CHECK_OK(ca_get_event_loop(&got));
    CHECK(got == loop);
    CHECK_OK(ca_set_event_loop(NULL));
    got = (ca_loop *)1;
    CHECK_ERR(ca_get_event_loop(&got), -ENOENT);
    CHECK(got == (ca_loop *)1);
    return NULL;
}

TEST(set_null_then_get)
{
    atomic_int destroyed = 0;
    ca_loop *loop = counted_loop(&destroyed), *got = NULL;
    CHECK_OK(ca_set_event_loop(loop));
    CHECK_OK(ca_get_event_loop(&got));
    CHECK(got == loop);
    pthread_t t;
    CHECK_EQ(pthread_create(&t, NULL, set_null_thread, loop), 0);
    pthread_join(t, NULL);
    CHECK_OK(ca_get_event_loop(&got)); /* the thread's NULL did not touch ours */
    CHECK(got == loop);
    CHECK_OK(ca_set_event_loop(NULL));
    CHECK_ERR(ca_get_event_loop(&got), -ENOENT);
    /* The policy took its own reference and gave it back. */
    CHECK_EQ(atomic_load(&destroyed), 0);
    ca_loop_unref(loop);
    CHECK_EQ(atomic_load(&destroyed), 1);
}

TEST(set_replaces_and_releases)
{
    atomic_int d1 = 0, d2 = 0;
    ca_loop *l1 = counted_loop(&d1), *l2 = counted_loop(&d2), *got = NULL;
    CHECK_OK(ca_set_event_loop(l1));
    ca_loop_unref(l1); /* the policy holds the only reference now */
    CHECK_OK(ca_get_event_loop(&got));
    CHECK(got == l1);
    CHECK_OK(ca_set_event_loop(l2));
    CHECK_EQ(atomic_load(&d1), 1);
    CHECK_OK(ca_get_event_loop(&got));
    CHECK(got == l2);
    CHECK_OK(ca_set_event_loop(l2)); /* setting the same loop again keeps it */
    CHECK_OK(ca_get_event_loop(&got));
    CHECK(got == l2);
    CHECK_OK(ca_set_event_loop(NULL));
    CHECK_EQ(atomic_load(&d2), 0);
    ca_loop_unref(l2);
    CHECK_EQ(atomic_load(&d2), 1);
}

static void *exit_with_loop_thread(void *arg)
{
    ca_loop *loop = counted_loop(arg);
    CHECK_OK(ca_set_event_loop(loop));
    ca_loop_unref(loop);
    return NULL; /* exits with its loop still set */
}

TEST(thread_exit_releases_loop)
{
    atomic_int destroyed = 0;
    pthread_t t;
    CHECK_EQ(pthread_create(&t, NULL, exit_with_loop_thread, &destroyed), 0);
    pthread_join(t, NULL);
    CHECK_EQ(atomic_load(&destroyed), 1);
}

static void *set_in_policy_thread(void *arg)
{
    void **a = arg;
    CHECK_OK(ca_policy_set_event_loop(a[0], a[1]));
    return NULL;
}

TEST(policy_destroy_releases_loops)
{
    ca_policy *p = NULL;
    CHECK_OK(ca_default_policy_new(&p));
    atomic_int d_main = 0, d_thread = 0;
    ca_loop *lm = counted_loop(&d_main), *lt = counted_loop(&d_thread);
    CHECK_OK(ca_policy_set_event_loop(p, lm));
    void *args[2] = {p, lt};
    pthread_t t;
    CHECK_EQ(pthread_create(&t, NULL, set_in_policy_thread, args), 0);
    pthread_join(t, NULL);
    /* The thread exited: its reference is gone already. */
    ca_loop_unref(lt);
    CHECK_EQ(atomic_load(&d_thread), 1);
    ca_loop_unref(lm);
    CHECK_EQ(atomic_load(&d_main), 0);
    ca_policy_unref(p);
    CHECK_EQ(atomic_load(&d_main), 1);
}

/* ----- the process policy --------------------------------------------------------------- */

static pthread_barrier_t first_barrier;

static void *first_policy_thread(void *arg)
{
    pthread_barrier_wait(&first_barrier);
    *(ca_policy **)arg = ca_get_event_loop_policy();
    return NULL;
}

TEST(default_policy_made_once)
{
    enum { N = 8 };
    pthread_t t[N];
    ca_policy *seen[N] = {0};
    pthread_barrier_init(&first_barrier, NULL, N);
    for (int i = 0; i < N; i++)
        CHECK_EQ(pthread_create(&t[i], NULL, first_policy_thread, &seen[i]), 0);
    for (int i = 0; i < N; i++) pthread_join(t[i], NULL);
    pthread_barrier_destroy(&first_barrier);
    for (int i = 0; i < N; i++) {
        CHECK(seen[i] != NULL);
        CHECK(seen[i] == seen[0]);
    }
    CHECK(ca_get_event_loop_policy() == seen[0]);
    CHECK(ca_policy_base(seen[0]) == NULL);
    CHECK(ca_policy_data(seen[0]) == NULL);
    ca_loop *l = NULL;
    CHECK_OK(ca_new_event_loop(&l));
    CHECK_EQ(strcmp(ca_loop_kind(l), "epoll"), 0);
    ca_loop_unref(l);
}

static void count_policy_destroy(ca_policy *self)
{
    atomic_fetch_add((atomic_int *)ca_policy_data(self), 1);
}
static const ca_policy_ops counted_policy_ops = {.destroy = count_policy_destroy};

TEST(null_restores_default)
{
    ca_policy *def = ca_get_event_loop_policy();
    atomic_int destroyed = 0;
    ca_policy *base = NULL, *mine = NULL;
    CHECK_OK(ca_poll_policy_new(&base));
    CHECK_OK(ca_policy_new(&counted_policy_ops, &destroyed, base, &mine));
    ca_policy_unref(base);
    CHECK_OK(ca_set_event_loop_policy(mine));
    CHECK(ca_get_event_loop_policy() == mine);
    ca_loop *l = NULL;
    CHECK_OK(ca_new_event_loop(&l));
    CHECK_EQ(strcmp(ca_loop_kind(l), "poll"), 0);
    l = ca_loop_unref(l);
    CHECK_OK(ca_set_event_loop_policy(NULL));
    ca_policy *now = ca_get_event_loop_policy();
    CHECK(now != NULL && now != mine);
    (void)def; /* the first default may be replaced by a new one: only its behaviour counts */
    CHECK(ca_policy_base(now) == NULL);
    CHECK_OK(ca_new_event_loop(&l));
    CHECK_EQ(strcmp(ca_loop_kind(l), "epoll"), 0);
    ca_loop_unref(l);
    /* The process gave its reference back; ours is the last. */
    CHECK_EQ(atomic_load(&destroyed), 0);
    ca_policy_unref(mine);
    CHECK_EQ(atomic_load(&destroyed), 1);
    /* Setting a policy twice and replacing it keeps the counts right. */
    CHECK_OK(ca_set_event_loop_policy(now));
    CHECK(ca_get_event_loop_policy() == now);
}

static void *get_thread_loop(void *arg)
{
    void **a = arg;
    ca_loop *loop = a[0], *got = NULL;
    pthread_barrier_t *b = a[1];
    CHECK_OK(ca_set_event_loop(loop));
    CHECK_OK(ca_get_event_loop(&got));
    CHECK_OK(ca_get_event_loop(&got)); /* cached now */
    CHECK(got == loop);
    pthread_barrier_wait(b); /* main replaces the policy */
    pthread_barrier_wait(b);
    CHECK_ERR(ca_get_event_loop(&got), -ENOENT);
    CHECK_OK(ca_set_event_loop(loop));
    CHECK_OK(ca_get_event_loop(&got));
    CHECK(got == loop);
    CHECK_OK(ca_set_event_loop(NULL));
    return NULL;
}

TEST(replacing_policy_invalidates_thread_cache)
{
    atomic_int destroyed = 0;
    ca_loop *loop = counted_loop(&destroyed);
    pthread_barrier_t b;
    pthread_barrier_init(&b, NULL, 2);
    void *args[2] = {loop, &b};
    pthread_t t;
    CHECK_EQ(pthread_create(&t, NULL, get_thread_loop, args), 0);
    pthread_barrier_wait(&b);
    ca_policy *p = NULL;
    CHECK_OK(ca_default_policy_new(&p));
    CHECK_OK(ca_set_event_loop_policy(p));
    ca_policy_unref(p);
    pthread_barrier_wait(&b);
    pthread_join(t, NULL);
    pthread_barrier_destroy(&b);
    ca_loop_unref(loop);
    CHECK_EQ(atomic_load(&destroyed), 1);
}

/* The thread-local cache of ca_get_event_loop follows every change of the thread's loop,
 * whichever way it is made: module function, dispatch on the process policy, or a direct
 * call on the base that a derived policy falls through to. */
static void *cache_thread(void *arg)
{
    ca_loop **loops = arg, *got = NULL;
    CHECK_OK(ca_set_event_loop(loops[0]));
    for (int i = 0; i < 3; i++) {
        CHECK_OK(ca_get_event_loop(&got));
        CHECK(got == loops[0]);
    }
    CHECK_OK(ca_policy_set_event_loop(ca_get_event_loop_policy(), loops[1]));
    CHECK_OK(ca_get_event_loop(&got));
    CHECK(got == loops[1]);
    ca_policy *base = ca_policy_base(ca_get_event_loop_policy());
    CHECK(base != NULL);
    CHECK_OK(ca_policy_set_event_loop(base, loops[0]));
    CHECK_OK(ca_get_event_loop(&got));
    CHECK(got == loops[0]);
    CHECK_OK(ca_policy_set_event_loop(base, NULL));
    CHECK_ERR(ca_get_event_loop(&got), -ENOENT);
    CHECK_OK(ca_set_event_loop(loops[1]));
    CHECK_OK(ca_get_event_loop(&got));
    CHECK(got == loops[1]);
    CHECK_OK(ca_set_event_loop(NULL));
    CHECK_ERR(ca_get_event_loop(&got), -ENOENT);
    return NULL;
}

TEST(cache_follows_every_change)
{
    static const ca_policy_ops plain = {0}; /* all five from the base */
    ca_policy *base = NULL, *p = NULL;
    CHECK_OK(ca_default_policy_new(&base));
    CHECK_OK(ca_policy_new(&plain, NULL, base, &p));
    ca_policy_unref(base);
    CHECK_OK(ca_set_event_loop_policy(p));
    ca_policy_unref(p);
    atomic_int d0 = 0, d1 = 0;
    ca_loop *loops[2] = {counted_loop(&d0), counted_loop(&d1)};
    pthread_t t;
    CHECK_EQ(pthread_create(&t, NULL, cache_thread, loops), 0);
    pthread_join(t, NULL);
    ca_loop_unref(loops[0]);
    ca_loop_unref(loops[1]);
    CHECK_EQ(atomic_load(&d0) + atomic_load(&d1), 2);
    CHECK_OK(ca_set_event_loop_policy(NULL));
}

/* Replacing the process policy from 8 threads while 4 others use it. The policies' ops read
 * their data, which their destroy poisons and frees: a call on a policy that was already
 * destroyed is a use after free that ASan reports, and the magic check catches otherwise. */
#define RACE_MAGIC 0x5eed1e55u
struct race_data {
    unsigned magic;
};
static atomic_int race_done;

static struct race_data *race_check(ca_policy *self)
{
    struct race_data *d = ca_policy_data(self);
    if (d->magic != RACE_MAGIC) t_fail(__FILE__, __LINE__, "call on a destroyed policy");
    return d;
}
static int race_get(ca_policy *self, ca_loop **out)
{
    race_check(self);
    return ca_policy_get_event_loop(ca_policy_base(self), out);
}
static int race_set(ca_policy *self, ca_loop *loop)
{
    race_check(self);
    return ca_policy_set_event_loop(ca_policy_base(self), loop);
}
static void race_destroy(ca_policy *self)
{
    struct race_data *d = race_check(self);
    d->magic = 0;
    free(d);
}
static const ca_policy_ops race_ops = {
    .get_event_loop = race_get, .set_event_loop = race_set, .destroy = race_destroy};

static void *race_writer(void *arg)
{
    unsigned i = 0;
    /* At least a few rounds each, even where threads barely get scheduled (valgrind). */
    while (!atomic_load(&race_done) || i < 6) {
        ca_policy *p = NULL, *base = NULL;
        switch (i++ % 3) {
        case 0:
            CHECK_OK(ca_default_policy_new(&p));
            break;
        case 1:
            CHECK_OK(ca_poll_policy_new(&p));
            break;
        default: {
            struct race_data *d = malloc(sizeof *d);
            CHECK(d != NULL);
            d->magic = RACE_MAGIC;
            CHECK_OK(ca_default_policy_new(&base));
            CHECK_OK(ca_policy_new(&race_ops, d, base, &p));
            ca_policy_unref(base);
        }
        }
        CHECK_OK(ca_set_event_loop_policy(p));
        ca_policy_unref(p);
        if (i % 64 == 0) CHECK_OK(ca_set_event_loop_policy(NULL));
    }
    *(unsigned *)arg = i;
    return NULL;
}

static void *race_reader(void *arg)
{
    ca_loop *mine = NULL, *got = NULL;
    CHECK_OK(ca_selector_loop_new(&mine));
    unsigned n = 0;
    while (!atomic_load(&race_done) || n < 6) {
        CHECK(ca_get_event_loop_policy() != NULL);
        CHECK_OK(ca_set_event_loop(mine));
        for (int k = 0; k < 8; k++) {
            int r = ca_get_event_loop(&got);
            /* Ours, or none when the policy was replaced in between: never someone else's. */
            if (r == 0) CHECK(got == mine);
            else CHECK_ERR(r, -ENOENT);
        }
        n++;
    }
    CHECK_OK(ca_set_event_loop(NULL));
    CHECK_OK(ca_loop_close(mine));
    ca_loop_unref(mine);
    *(unsigned *)arg = n;
    return NULL;
}

TEST(replace_policy_race) /* timeout: 120 */
{
    enum { W = 8, R = 4 };
    pthread_t w[W], r[R];
    unsigned wn[W] = {0}, rn[R] = {0};
    for (int i = 0; i < R; i++) CHECK_EQ(pthread_create(&r[i], NULL, race_reader, &rn[i]), 0);
    for (int i = 0; i < W; i++) CHECK_EQ(pthread_create(&w[i], NULL, race_writer, &wn[i]), 0);
    struct timespec ts = {0, 400 * 1000 * 1000};
    nanosleep(&ts, NULL);
    atomic_store(&race_done, 1);
    for (int i = 0; i < W; i++) pthread_join(w[i], NULL);
    for (int i = 0; i < R; i++) pthread_join(r[i], NULL);
    for (int i = 0; i < W; i++) CHECK(wn[i] > 0);
    for (int i = 0; i < R; i++) CHECK(rn[i] > 0);
    CHECK_OK(ca_set_event_loop_policy(NULL));
}

/* ----- custom policies ------------------------------------------------------------------- */

/* One policy per overridden op; each override records its call and then does something
 * recognisable. The data is shared by all. */
struct ov {
    int get, set, newl, getw, setw;
    ca_loop *fixed;
    ca_loop *set_arg;
    ca_child_watcher *watcher_arg;
};
static char fake_watcher; /* the ops only pass watcher pointers around */

static int ov_get(ca_policy *self, ca_loop **out)
{
    struct ov *o = ca_policy_data(self);
    o->get++;
    *out = o->fixed;
    return 0;
}
static int ov_set(ca_policy *self, ca_loop *loop)
{
    struct ov *o = ca_policy_data(self);
    o->set++;
    o->set_arg = loop;
    return 0;
}
static int ov_new(ca_policy *self, ca_loop **out)
{
    ((struct ov *)ca_policy_data(self))->newl++;
    return ca_poll_loop_new(out);
}
static int ov_getw(ca_policy *self, ca_child_watcher **out)
{
    ((struct ov *)ca_policy_data(self))->getw++;
    *out = (ca_child_watcher *)&fake_watcher;
    return 0;
}
static int ov_setw(ca_policy *self, ca_child_watcher *w)
{
    struct ov *o = ca_policy_data(self);
    o->setw++;
    o->watcher_arg = w;
    return 0;
}

static const ca_policy_ops ov_ops[5] = {
    {.get_event_loop = ov_get},       {.set_event_loop = ov_set},
    {.new_event_loop = ov_new},       {.get_child_watcher = ov_getw},
    {.set_child_watcher = ov_setw},
};

static ca_policy *ov_install(int which, struct ov *o, ca_policy **base)
{
    ca_policy *p = NULL;
    CHECK_OK(ca_default_policy_new(base));
    CHECK_OK(ca_policy_new(&ov_ops[which], o, *base, &p));
    CHECK_OK(ca_set_event_loop_policy(p));
    ca_policy_unref(p);
    return p;
}

TEST(custom_policy_get_event_loop)
{
    struct ov o = {0};
    ca_policy *base = NULL;
    CHECK_OK(ca_selector_loop_new(&o.fixed));
    ov_install(0, &o, &base);
    ca_loop *got = NULL, *other = NULL;
    CHECK_OK(ca_get_event_loop(&got));
    CHECK_OK(ca_get_event_loop(&got)); /* a custom op is called every time: no caching */
    CHECK(got == o.fixed);
    CHECK_EQ(o.get, 2);
    /* The other four fall through to the base. */
    CHECK_OK(ca_selector_loop_new(&other));
    CHECK_OK(ca_set_event_loop(other));
    CHECK_OK(ca_policy_get_event_loop(base, &got));
    CHECK(got == other);
    CHECK_OK(ca_get_event_loop(&got));
    CHECK(got == o.fixed);
    CHECK_OK(ca_set_event_loop(NULL));
    ca_loop *fresh = NULL;
    CHECK_OK(ca_new_event_loop(&fresh));
    CHECK_EQ(strcmp(ca_loop_kind(fresh), "epoll"), 0);
    CHECK_EQ(o.get + o.set + o.newl + o.getw + o.setw, 3);
    ca_loop_unref(fresh);
    ca_loop_unref(other);
    ca_policy_unref(base);
    CHECK_OK(ca_set_event_loop_policy(NULL));
    ca_loop_unref(o.fixed);
}

TEST(custom_policy_set_event_loop)
{
    struct ov o = {0};
    ca_policy *base = NULL;
    ov_install(1, &o, &base);
    ca_loop *loop = NULL, *got = NULL;
    CHECK_OK(ca_selector_loop_new(&loop));
    CHECK_OK(ca_set_event_loop(loop));
    CHECK_EQ(o.set, 1);
    CHECK(o.set_arg == loop);
    /* The base never saw it, so its main-thread get makes one and hands it to
     * self.set_event_loop: the override (as Python's virtual call), which does not keep it.
     * So the base still has none, and says so. */
    CHECK_ERR(ca_get_event_loop(&got), -ENOENT);
    CHECK_EQ(o.set, 2);
    CHECK(o.set_arg != NULL && o.set_arg != loop);
    /* The other ops fall through. */
    CHECK_OK(ca_policy_set_event_loop(base, loop));
    CHECK_OK(ca_get_event_loop(&got));
    CHECK(got == loop);
    ca_loop *fresh = NULL;
    CHECK_OK(ca_new_event_loop(&fresh));
    CHECK_EQ(strcmp(ca_loop_kind(fresh), "epoll"), 0);
    ca_loop_unref(fresh);
    CHECK_OK(ca_set_event_loop(NULL));
    CHECK_EQ(o.set, 3);
    CHECK(o.set_arg == NULL);
    CHECK_OK(ca_policy_set_event_loop(base, NULL));
    CHECK_OK(ca_loop_close(loop));
    ca_loop_unref(loop);
    ca_policy_unref(base);
    CHECK_OK(ca_set_event_loop_policy(NULL));
}

TEST(custom_policy_new_event_loop)
{
    struct ov o = {0};
    ca_policy *base = NULL;
    ov_install(2, &o, &base);
    ca_loop *l = NULL, *got = NULL;
    CHECK_OK(ca_new_event_loop(&l));
    CHECK_EQ(o.newl, 1);
    CHECK_EQ(strcmp(ca_loop_kind(l), "poll"), 0);
    ca_loop_unref(l);
    /* The base's main-thread creation goes through the override, as Python's
     * self.new_event_loop() does. */
    CHECK_OK(ca_get_event_loop(&got));
    CHECK_EQ(o.newl, 2);
    CHECK_EQ(strcmp(ca_loop_kind(got), "poll"), 0);
    CHECK_OK(ca_set_event_loop(NULL));
    ca_policy_unref(base);
    CHECK_OK(ca_set_event_loop_policy(NULL));
}

TEST(custom_policy_child_watcher_ops)
{
    struct ov o = {0};
    ca_policy *base = NULL;
    ov_install(3, &o, &base);
    ca_child_watcher *w = NULL;
    CHECK_OK(ca_get_child_watcher(&w));
    CHECK(w == (ca_child_watcher *)&fake_watcher);
    CHECK_EQ(o.getw, 1);
    ca_policy_unref(base);
    CHECK_OK(ca_set_event_loop_policy(NULL));

    ov_install(4, &o, &base);
    CHECK_OK(ca_set_child_watcher((ca_child_watcher *)&fake_watcher));
    CHECK_EQ(o.setw, 1);
    CHECK(o.watcher_arg == (ca_child_watcher *)&fake_watcher);
    CHECK_OK(ca_set_child_watcher(NULL));
    CHECK_EQ(o.setw, 2);
    CHECK(o.watcher_arg == NULL);
    /* The loop ops fall through. */
    ca_loop *l = NULL;
    CHECK_OK(ca_new_event_loop(&l));
    CHECK_EQ(strcmp(ca_loop_kind(l), "epoll"), 0);
    ca_loop_unref(l);
    ca_policy_unref(base);
    CHECK_OK(ca_set_event_loop_policy(NULL));
}

TEST(policy_without_base_is_enotsup)
{
    static const ca_policy_ops none = {0};
    ca_policy *p = NULL;
    CHECK_OK(ca_policy_new(&none, NULL, NULL, &p));
    ca_loop *l = (ca_loop *)1;
    ca_child_watcher *w = (ca_child_watcher *)1;
    CHECK_ERR(ca_policy_get_event_loop(p, &l), -ENOTSUP);
    CHECK_ERR(ca_policy_set_event_loop(p, NULL), -ENOTSUP);
    CHECK_ERR(ca_policy_new_event_loop(p, &l), -ENOTSUP);
    CHECK_ERR(ca_policy_get_child_watcher(p, &w), -ENOTSUP);
    CHECK_ERR(ca_policy_set_child_watcher(p, NULL), -ENOTSUP);
    CHECK(l == (ca_loop *)1 && w == (ca_child_watcher *)1);
    CHECK_OK(ca_set_event_loop_policy(p));
    CHECK_ERR(ca_get_event_loop(&l), -ENOTSUP);
    CHECK_ERR(ca_set_event_loop(NULL), -ENOTSUP);
    CHECK_ERR(ca_new_event_loop(&l), -ENOTSUP);
    CHECK_ERR(ca_get_child_watcher(&w), -ENOTSUP);
    CHECK_ERR(ca_set_child_watcher(NULL), -ENOTSUP);
    ca_policy_unref(p);
    CHECK_OK(ca_set_event_loop_policy(NULL));
}

/* asyncio's documented MyEventLoopPolicy, twice derived: each get_event_loop calls "super" and logs. */
static char super_log[16];

static int super_get(ca_policy *self, ca_loop **out)
{
    const char *tag = ca_policy_data(self);
    strncat(super_log, tag, sizeof super_log - strlen(super_log) - 1);
    return ca_policy_get_event_loop(ca_policy_base(self), out);
}
static const ca_policy_ops super_ops = {.get_event_loop = super_get};

TEST(super_calls)
{
    ca_policy *base = NULL, *mid = NULL, *top = NULL;
    CHECK_OK(ca_default_policy_new(&base));
    CHECK_OK(ca_policy_new(&super_ops, "m", base, &mid));
    CHECK_OK(ca_policy_new(&super_ops, "t", mid, &top));
    CHECK(ca_policy_base(top) == mid && ca_policy_base(mid) == base);
    CHECK(ca_policy_base(base) == NULL);
    CHECK(strcmp(ca_policy_data(top), "t") == 0);
    /* The policies hold their bases. */
    ca_policy_unref(base);
    ca_policy_unref(mid);
    CHECK_OK(ca_set_event_loop_policy(top));
    ca_policy_unref(top);
    ca_loop *got = NULL, *again = NULL;
    CHECK_OK(ca_get_event_loop(&got));
    CHECK_EQ(strcmp(super_log, "tm"), 0);
    CHECK_OK(ca_policy_get_event_loop(ca_policy_base(ca_policy_base(top)), &again));
    CHECK(got == again);
    CHECK_OK(ca_get_event_loop(&again));
    CHECK_EQ(strcmp(super_log, "tmtm"), 0);
    CHECK(got == again);
    /* set_event_loop falls through two levels to the state in the base. */
    CHECK_OK(ca_set_event_loop(NULL));
    CHECK_ERR(ca_get_event_loop(&got), -ENOENT);
    CHECK_OK(ca_set_event_loop_policy(NULL));
}

/* ----- running loop and loop kinds -------------------------------------------------------- */

struct wins {
    ca_loop *loop;
    int ok, calls;
};

static int wins_get(ca_policy *self, ca_loop **out)
{
    ((struct wins *)ca_policy_data(self))->calls++;
    return ca_policy_get_event_loop(ca_policy_base(self), out);
}
static const ca_policy_ops wins_ops = {.get_event_loop = wins_get};

static void wins_cb(void *arg)
{
    struct wins *w = arg;
    ca_loop *got = NULL;
    w->ok = ca_get_event_loop(&got) == 0 && got == w->loop && ca_get_running_loop() == w->loop;
    ca_loop_stop(w->loop);
}

LOOP_TEST(running_loop_wins)
{
    struct wins w = {.loop = loop};
    ca_policy *base = NULL, *p = NULL;
    CHECK_OK(ca_default_policy_new(&base));
    CHECK_OK(ca_policy_new(&wins_ops, &w, base, &p));
    ca_policy_unref(base);
    CHECK_OK(ca_set_event_loop_policy(p));
    ca_policy_unref(p);
    ca_loop *other = NULL, *got = NULL;
    CHECK_OK(ca_selector_loop_new(&other));
    CHECK_OK(ca_set_event_loop(other));
    CHECK_OK(ca_loop_call_soon(loop, wins_cb, &w, NULL));
    CHECK_OK(ca_loop_run_forever(loop));
    CHECK(w.ok);
    CHECK_EQ(w.calls, 0); /* the policy is not asked while a loop runs */
    CHECK(ca_get_running_loop() == NULL);
    CHECK_OK(ca_get_event_loop(&got));
    CHECK(got == other);
    CHECK_EQ(w.calls, 1);
    CHECK_OK(ca_set_event_loop(NULL));
    CHECK_OK(ca_loop_close(other));
    ca_loop_unref(other);
    CHECK_OK(ca_set_event_loop_policy(NULL));
}

static void check_policy_kind(int (*make)(ca_policy **), const char *kind)
{
    ca_policy *p = NULL;
    int r = make(&p);
    if (r == -ENOSYS || r == -EPERM) return; /* no io_uring here */
    CHECK_OK(r);
    ca_loop *l = NULL;
    CHECK_OK(ca_policy_new_event_loop(p, &l));
    CHECK_EQ(strcmp(ca_loop_kind(l), kind), 0);
    CHECK_OK(ca_loop_close(l));
    ca_loop_unref(l);
    /* Through the module functions, and through the main thread's automatic loop. */
    CHECK_OK(ca_set_event_loop_policy(p));
    ca_policy_unref(p);
    CHECK_OK(ca_new_event_loop(&l));
    CHECK_EQ(strcmp(ca_loop_kind(l), kind), 0);
    ca_loop_unref(l);
    CHECK_OK(ca_get_event_loop(&l));
    CHECK_EQ(strcmp(ca_loop_kind(l), kind), 0);
    CHECK_OK(ca_set_event_loop(NULL));
    CHECK_OK(ca_set_event_loop_policy(NULL));
}

TEST(builtin_policy_loop_kinds)
{
    check_policy_kind(ca_default_policy_new, "epoll");
    check_policy_kind(ca_selector_policy_new, "epoll");
    check_policy_kind(ca_poll_policy_new, "poll");
    check_policy_kind(ca_proactor_policy_new, "io_uring");
    ca_loop *probe = NULL;
    int r = ca_proactor_loop_new(&probe);
    ca_policy *p = NULL;
    if (r < 0) {
        CHECK_ERR(ca_proactor_policy_new(&p), r);
        CHECK(p == NULL);
    } else {
        ca_loop_unref(probe);
    }
}

/* ----- child watchers ---------------------------------------------------------------------- */

/* A custom watcher that records what the policy does to it. */
struct wrec {
    int attaches, closes;
    ca_loop *attached;
};
static int wrec_attach(ca_child_watcher *self, ca_loop *loop)
{
    struct wrec *r = ca_child_watcher_data(self);
    r->attaches++;
    r->attached = loop;
    return 0;
}
static int wrec_close(ca_child_watcher *self)
{
    ((struct wrec *)ca_child_watcher_data(self))->closes++;
    return 0;
}
static int wrec_add(ca_child_watcher *self, pid_t pid, ca_child_fn cb, void *arg)
{
    return -ENOTSUP;
}
static int wrec_remove(ca_child_watcher *self, pid_t pid) { return 0; }
static bool wrec_active(ca_child_watcher *self) { return true; }
static const ca_child_watcher_ops wrec_ops = {
    .add_child_handler = wrec_add,
    .remove_child_handler = wrec_remove,
    .attach_loop = wrec_attach,
    .is_active = wrec_active,
    .close = wrec_close,
};

static void *set_loop_thread(void *arg)
{
    CHECK_OK(ca_set_event_loop(arg));
    CHECK_OK(ca_set_event_loop(NULL));
    return NULL;
}

TEST(watcher_attached_on_main_thread_set)
{
    struct wrec rec = {0};
    ca_child_watcher *w = NULL;
    CHECK_OK(ca_child_watcher_new_custom(&wrec_ops, &rec, &w));
    CHECK_OK(ca_set_child_watcher(w));
    CHECK_EQ(rec.attaches, 0); /* set_child_watcher does not attach */
    ca_child_watcher *got = NULL;
    CHECK_OK(ca_get_child_watcher(&got));
    CHECK(got == w);
    ca_loop *loop = NULL;
    CHECK_OK(ca_selector_loop_new(&loop));
    CHECK_OK(ca_set_event_loop(loop));
    CHECK_EQ(rec.attaches, 1);
    CHECK(rec.attached == loop);
    /* Other threads' set_event_loop leave the watcher alone. */
    pthread_t t;
    CHECK_EQ(pthread_create(&t, NULL, set_loop_thread, loop), 0);
    pthread_join(t, NULL);
    CHECK_EQ(rec.attaches, 1);
    CHECK_OK(ca_set_event_loop(NULL));
    CHECK_EQ(rec.attaches, 2);
    CHECK(rec.attached == NULL);
    /* Replacing the watcher closes the previous one (3.11). */
    CHECK_EQ(rec.closes, 0);
    CHECK_OK(ca_set_child_watcher(NULL));
    CHECK_EQ(rec.closes, 1);
    ca_child_watcher_unref(w);
    CHECK_OK(ca_loop_close(loop));
    ca_loop_unref(loop);
}

TEST(safe_watcher_active_after_set_event_loop)
{
    ca_child_watcher *w = NULL;
    int r = ca_safe_child_watcher_new(&w);
    CHECK_OK(r);
    CHECK_OK(ca_set_child_watcher(w));
    CHECK(!ca_child_watcher_is_active(w));
    ca_loop *loop = NULL;
    CHECK_OK(ca_selector_loop_new(&loop));
    CHECK_OK(ca_set_event_loop(loop));
    CHECK(ca_child_watcher_is_active(w));
    CHECK_OK(ca_set_event_loop(NULL));
    CHECK(!ca_child_watcher_is_active(w));
    CHECK_OK(ca_set_child_watcher(NULL));
    ca_child_watcher_unref(w);
    CHECK_OK(ca_loop_close(loop));
    ca_loop_unref(loop);
}

static void ignore_exit(pid_t pid, int returncode, void *arg) {}

static void *get_watcher_thread(void *arg)
{
    CHECK_OK(ca_get_child_watcher(arg));
    return NULL;
}

TEST(default_child_watcher_is_lazy_threaded)
{
    ca_child_watcher *a = NULL, *b = NULL;
    CHECK_OK(ca_get_child_watcher(&a));
    CHECK(a != NULL);
    CHECK_EQ(strcmp(ca__child_watcher_kind(a), "threaded"), 0);
    CHECK(ca_child_watcher_is_active(a)); /* Threaded: always active */
    pthread_t t;
    CHECK_EQ(pthread_create(&t, NULL, get_watcher_thread, &b), 0);
    pthread_join(t, NULL);
    CHECK(a == b); /* one per policy, not per thread */
    /* set_child_watcher closes it: a closed watcher refuses handlers. */
    ca_child_watcher_ref(a);
    CHECK_OK(ca_set_child_watcher(NULL));
    CHECK_ERR(ca_child_watcher_add_child_handler(a, getpid(), ignore_exit, NULL), -EBADF);
    ca_child_watcher_unref(a);
    /* A new policy has its own. */
    CHECK_OK(ca_set_event_loop_policy(NULL));
    CHECK_OK(ca_get_child_watcher(&b));
    CHECK(b != NULL);
    CHECK_OK(ca_set_event_loop_policy(NULL));
}

/* ----- fork -------------------------------------------------------------------------------- */

/* In the child, which is single-threaded and where the forking thread is the main thread:
 * the parent's loop is never returned; a fresh one is made as in a new main thread. */
static int child_checks(ca_loop *parents)
{
    ca_loop *got = NULL;
    if (ca_get_event_loop(&got) != 0 || got == parents) return 2;
    if (strcmp(ca_loop_kind(got), "epoll") != 0) return 3;
    ca_loop *again = NULL;
    if (ca_get_event_loop(&again) != 0 || again != got) return 4;
    if (ca_loop_call_soon(got, stop_cb, got, NULL) != 0) return 5;
    if (ca_loop_run_forever(got) != 0) return 6;
    if (ca_set_event_loop(NULL) != 0) return 7;
    if (ca_get_event_loop(&again) != -ENOENT) return 8;
    return 0;
}

static void *fork_thread(void *arg)
{
    ca_loop *loop = NULL, *got = NULL;
    CHECK_OK(ca_selector_loop_new(&loop));
    CHECK_OK(ca_set_event_loop(loop));
    CHECK_OK(ca_get_event_loop(&got)); /* also fills the thread's cache */
    CHECK(got == loop);
    pid_t pid = fork();
    CHECK(pid >= 0);
    if (pid == 0) _exit(child_checks(loop));
    int status = 0;
    CHECK_EQ(waitpid(pid, &status, 0), pid);
    CHECK(WIFEXITED(status));
    CHECK_EQ(WEXITSTATUS(status), 0);
    CHECK_OK(ca_get_event_loop(&got)); /* the parent is untouched */
    CHECK(got == loop);
    CHECK_OK(ca_set_event_loop(NULL));
    CHECK_OK(ca_loop_close(loop));
    ca_loop_unref(loop);
    *(int *)arg = 1;
    return NULL;
}

TEST(fork_in_thread_with_current_loop)
{
    int done = 0;
    pthread_t t;
    CHECK_EQ(pthread_create(&t, NULL, fork_thread, &done), 0);
    pthread_join(t, NULL);
    CHECK(done);
}

TEST(fork_in_main_thread_with_current_loop)
{
    int done = 0;
    fork_thread(&done);
    CHECK(done);
}

static void fork_running_cb(void *arg)
{
    ca_loop *loop = arg;
    pid_t pid = fork();
    CHECK(pid >= 0);
    if (pid == 0) {
        ca_loop *got = NULL;
        int r = ca_get_running_loop() == NULL ? 0 : 9;
        if (r == 0 && ca_get_event_loop(&got) == 0 && got == loop) r = 10;
        _exit(r);
    }
    int status = 0;
    CHECK_EQ(waitpid(pid, &status, 0), pid);
    CHECK(WIFEXITED(status));
    CHECK_EQ(WEXITSTATUS(status), 0);
    ca_loop_stop(loop);
}

TEST(fork_from_running_loop)
{
    ca_loop *loop = NULL;
    CHECK_OK(ca_selector_loop_new(&loop));
    CHECK_OK(ca_set_event_loop(loop));
    CHECK_OK(ca_loop_call_soon(loop, fork_running_cb, loop, NULL));
    CHECK_OK(ca_loop_run_forever(loop));
    CHECK_OK(ca_set_event_loop(NULL));
    CHECK_OK(ca_loop_close(loop));
    ca_loop_unref(loop);
}

/* ----- the runner -------------------------------------------------------------------------- */

struct run_state {
    int outcome;              /* 0: result; < 0: error; 1: cancel; 2: return NULL */
    ca_loop *loop;            /* the loop main ran on (a reference) */
    ca_future *fut;
    bool running_ok, current_ok, policy_ok;
    int nested;
    int factory_calls;
};

static struct run_state *g_rs;

static void complete_cb(void *arg)
{
    struct run_state *s = arg;
    if (s->outcome == 0) CHECK_OK(ca_future_set_result(s->fut, (void *)(intptr_t)42));
    else if (s->outcome == 1) CHECK(ca_future_cancel(s->fut));
    else CHECK_OK(ca_future_set_error(s->fut, s->outcome));
}

static int counting_factory(ca_loop **out)
{
    g_rs->factory_calls++;
    return ca_poll_loop_new(out);
}

static int failing_factory(ca_loop **out)
{
    g_rs->factory_calls++;
    return -EMFILE;
}

static ca_future *never_main(ca_loop *loop, void *arg)
{
    t_fail(__FILE__, __LINE__, "main must not run");
    return NULL;
}

static ca_future *test_main(ca_loop *loop, void *arg)
{
    struct run_state *s = arg;
    s->loop = ca_loop_ref(loop);
    s->running_ok = ca_get_running_loop() == loop;
    ca_loop *got = NULL;
    s->current_ok = ca_get_event_loop(&got) == 0 && got == loop;
    got = NULL;
    s->policy_ok = ca_policy_get_event_loop(ca_get_event_loop_policy(), &got) == 0 && got == loop;
    s->nested = ca_run(never_main, NULL, counting_factory);
    if (s->outcome == 2) return NULL;
    CHECK_OK(ca_future_new(loop, &s->fut));
    CHECK_OK(ca_loop_call_later(loop, 0.01, complete_cb, s, NULL));
    return s->fut;
}

static int run_with(struct run_state *s, ca_loop_factory_fn factory)
{
    g_rs = s;
    int r = ca_run(test_main, s, factory);
    CHECK(s->loop != NULL);
    CHECK(s->running_ok && s->current_ok && s->policy_ok);
    CHECK_ERR(s->nested, -EBUSY);
    CHECK(ca_loop_is_closed(s->loop));
    CHECK(ca_get_running_loop() == NULL);
    return r;
}

static void run_state_done(struct run_state *s) { s->loop = ca_loop_unref(s->loop); }

TEST(run_returns_main_outcome)
{
    /* A loop set before is current again afterwards. */
    ca_loop *before = NULL, *got = NULL;
    CHECK_OK(ca_selector_loop_new(&before));
    CHECK_OK(ca_set_event_loop(before));

    struct run_state s = {.outcome = 0};
    CHECK_OK(run_with(&s, NULL));
    CHECK(s.loop != before);
    CHECK_EQ(strcmp(ca_loop_kind(s.loop), "epoll"), 0);
    CHECK_EQ(s.factory_calls, 0); /* the nested call never reached its factory */
    run_state_done(&s);
    CHECK_OK(ca_get_event_loop(&got));
    CHECK(got == before);

    struct run_state e = {.outcome = -EPIPE};
    CHECK_ERR(run_with(&e, NULL), -EPIPE);
    run_state_done(&e);

    struct run_state c = {.outcome = 1};
    CHECK_ERR(run_with(&c, NULL), -ECANCELED);
    run_state_done(&c);

    struct run_state n = {.outcome = 2};
    CHECK_ERR(run_with(&n, NULL), -EINVAL);
    run_state_done(&n);

    CHECK_OK(ca_get_event_loop(&got));
    CHECK(got == before);
    CHECK_OK(ca_set_event_loop(NULL));
    CHECK_OK(ca_loop_close(before));
    ca_loop_unref(before);
}

TEST(run_with_factory)
{
    struct run_state s = {.outcome = 0};
    CHECK_OK(run_with(&s, counting_factory));
    CHECK_EQ(s.factory_calls, 1);
    CHECK_EQ(strcmp(ca_loop_kind(s.loop), "poll"), 0);
    run_state_done(&s);
    /* No loop was current before: none is after (no automatic one either, as after
     * asyncio.run). */
    ca_loop *got = NULL;
    CHECK_ERR(ca_get_event_loop(&got), -ENOENT);

    struct run_state f = {0};
    g_rs = &f;
    CHECK_ERR(ca_run(never_main, NULL, failing_factory), -EMFILE);
    CHECK_EQ(f.factory_calls, 1);
}

TEST(run_uses_policy_new_event_loop)
{
    atomic_int made = 0;
    install_counting_policy(&made);
    struct run_state s = {.outcome = 0};
    CHECK_OK(run_with(&s, NULL));
    CHECK_EQ(atomic_load(&made), 1);
    run_state_done(&s);
    CHECK_OK(ca_set_event_loop_policy(NULL));
}

/* ca_run makes its loop current through the policy, so in the main thread a Safe watcher
 * follows it there and subprocesses work inside main, as with asyncio.run. */
struct spawn_state {
    ca_process *proc;
};

static ca_future *spawn_main(ca_loop *loop, void *arg)
{
    struct spawn_state *s = arg;
    static const char *const argv[] = {"/bin/sh", "-c", "exit 7", NULL};
    ca_subprocess_options opts = {.argv = argv};
    ca_future *wait = NULL;
    CHECK_OK(ca_loop_subprocess_exec(loop, &opts, NULL, NULL, &s->proc));
    CHECK_OK(ca_process_wait(s->proc, &wait));
    return wait;
}

TEST(run_attaches_safe_watcher)
{
    ca_child_watcher *w = NULL;
    CHECK_OK(ca_safe_child_watcher_new(&w));
    CHECK_OK(ca_set_child_watcher(w));
    struct spawn_state s = {0};
    CHECK_OK(ca_run(spawn_main, &s, NULL));
    int rc = -1;
    CHECK_OK(ca_process_returncode(s.proc, &rc));
    CHECK_EQ(rc, 7);
    CHECK(!ca_child_watcher_is_active(w)); /* detached again: no loop was current before */
    ca_process_unref(s.proc);
    CHECK_OK(ca_set_child_watcher(NULL));
    ca_child_watcher_unref(w);
}

static void *run_thread(void *arg)
{
    struct run_state s = {.outcome = -ETIMEDOUT};
    *(int *)arg = run_with(&s, NULL);
    run_state_done(&s);
    ca_loop *got = NULL;
    CHECK_ERR(ca_get_event_loop(&got), -ENOENT);
    return NULL;
}

TEST(run_in_other_thread)
{
    int r = 0;
    pthread_t t;
    CHECK_EQ(pthread_create(&t, NULL, run_thread, &r), 0);
    pthread_join(t, NULL);
    CHECK_ERR(r, -ETIMEDOUT);
}

static void nested_cb(void *arg)
{
    struct run_state *s = arg;
    s->nested = ca_run(never_main, NULL, failing_factory);
    ca_loop_stop(s->loop);
}

LOOP_TEST(run_refuses_inside_running_loop)
{
    struct run_state s = {.loop = loop};
    g_rs = &s;
    CHECK_OK(ca_loop_call_soon(loop, nested_cb, &s, NULL));
    CHECK_OK(ca_loop_run_forever(loop));
    CHECK_ERR(s.nested, -EBUSY);
    CHECK_EQ(s.factory_calls, 0);
}

/* ----- bad input --------------------------------------------------------------------------- */

TEST(bad_input)
{
    static const ca_policy_ops none = {0};
    ca_policy *p = (ca_policy *)1;
    CHECK_ERR(ca_policy_new(NULL, NULL, NULL, &p), -EINVAL);
    CHECK_ERR(ca_policy_new(&none, NULL, NULL, NULL), -EINVAL);
    CHECK_ERR(ca_default_policy_new(NULL), -EINVAL);
    CHECK_ERR(ca_selector_policy_new(NULL), -EINVAL);
    CHECK_ERR(ca_poll_policy_new(NULL), -EINVAL);
    CHECK_ERR(ca_proactor_policy_new(NULL), -EINVAL);
    CHECK(p == (ca_policy *)1);
    CHECK(ca_policy_data(NULL) == NULL);
    CHECK(ca_policy_base(NULL) == NULL);
    CHECK(ca_policy_ref(NULL) == NULL);
    CHECK(ca_policy_unref(NULL) == NULL);

    ca_loop *l = (ca_loop *)1;
    ca_child_watcher *w = (ca_child_watcher *)1;
    CHECK_ERR(ca_policy_get_event_loop(NULL, &l), -EINVAL);
    CHECK_ERR(ca_policy_set_event_loop(NULL, NULL), -EINVAL);
    CHECK_ERR(ca_policy_new_event_loop(NULL, &l), -EINVAL);
    CHECK_ERR(ca_policy_get_child_watcher(NULL, &w), -EINVAL);
    CHECK_ERR(ca_policy_set_child_watcher(NULL, NULL), -EINVAL);
    ca_policy *def = ca_get_event_loop_policy();
    CHECK_ERR(ca_policy_get_event_loop(def, NULL), -EINVAL);
    CHECK_ERR(ca_policy_new_event_loop(def, NULL), -EINVAL);
    CHECK_ERR(ca_policy_get_child_watcher(def, NULL), -EINVAL);
    CHECK_ERR(ca_get_event_loop(NULL), -EINVAL);
    CHECK_ERR(ca_new_event_loop(NULL), -EINVAL);
    CHECK_ERR(ca_get_child_watcher(NULL), -EINVAL);
    CHECK(l == (ca_loop *)1 && w == (ca_child_watcher *)1);
    CHECK_ERR(ca_run(NULL, NULL, NULL), -EINVAL);
    /* None of this created a loop in the main thread. */
    CHECK_OK(ca_set_event_loop(NULL));
}

/* ----- the examples ------------------------------------------------------------------------ */

static void run_example(const char *name)
{
    char self[PATH_MAX], path[PATH_MAX + 64];
    ssize_t n = readlink("/proc/self/exe", self, sizeof self - 1);
    CHECK(n > 0);
    self[n] = 0;
    char *slash = strrchr(self, '/');
    CHECK(slash != NULL);
    *slash = 0;
    snprintf(path, sizeof path, "%s/../examples/%s", self, name);
    if (access(path, X_OK) != 0) SKIP("examples not built (make examples)");
    pid_t pid = fork();
    CHECK(pid >= 0);
    if (pid == 0) {
        int fd = open("/dev/null", O_WRONLY | O_CLOEXEC);
        if (fd >= 0) dup2(fd, 1);
        execl(path, name, (char *)NULL);
        _exit(127);
    }
    int status = 0;
    CHECK_EQ(waitpid(pid, &status, 0), pid);
    CHECK(WIFEXITED(status));
    CHECK_EQ(WEXITSTATUS(status), 0);
}

TEST(examples_run)
{
    double t0 = now_s();
    run_example("custom_policy");
    run_example("loop_per_thread");
    run_example("shared_loop_policy");
    CHECK(now_s() - t0 < 20 * t_slow());
}
