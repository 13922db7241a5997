/*
 * Reliability tests of the core (issue 16): races between spawning and another thread that
 * replaces or closes the policy's watcher or the policy itself, fork while other threads hold
 * the library's locks, a forked child that spawns, and a loop under allocation failure. Each
 * race is a stress run bounded in time (a couple of seconds, scaled under the sanitizers).
 */
#include "harness.h"

#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>

/* Internal (in the static library the tests link). */
int ca__get_event_loop_ref(ca_loop **out);
int ca__get_child_watcher_ref(ca_child_watcher **out);
const char *ca__child_watcher_kind(const ca_child_watcher *w);

#if defined(__SANITIZE_THREAD__)
#define T_TSAN 1
#elif defined(__has_feature)
#if __has_feature(thread_sanitizer)
#define T_TSAN 1
#endif
#endif

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

/* ----- spawning while another thread replaces things ------------------------------------- */

/* What the replacing threads do, until `stop`. */
enum churn { CHURN_WATCHER = 1, CHURN_POLICY = 2, CHURN_CLOSE = 4 };

struct churn_ctx {
    atomic_bool stop;
    atomic_long rounds;
    int (*make)(ca_child_watcher **); /* the watchers to install */
};

/* Replaces the policy's watcher with fresh watchers (ca_set_child_watcher closes the one it
 * replaces), as fast as it can. */
static void *replace_watchers(void *arg)
{
    struct churn_ctx *c = arg;
    while (!atomic_load(&c->stop)) {
        ca_child_watcher *w = NULL;
        CHECK_OK(c->make(&w));
        CHECK_OK(ca_set_child_watcher(w));
        ca_child_watcher_unref(w);
        atomic_fetch_add(&c->rounds, 1);
    }
    return NULL;
}

/* Replaces the process policy with fresh default policies; the old one is destroyed, with the
 * watcher it made, as soon as nobody holds it. */
static void *replace_policies(void *arg)
{
    struct churn_ctx *c = arg;
    while (!atomic_load(&c->stop)) {
        ca_policy *p = NULL;
        CHECK_OK(ca_default_policy_new(&p));
        CHECK_OK(ca_set_event_loop_policy(p));
        ca_policy_unref(p);
        atomic_fetch_add(&c->rounds, 1);
    }
    return NULL;
}

/* Closes the policy's watcher while it is installed (a window in which a spawn finds it closed),
 * then installs a new one. */
static void *close_watchers(void *arg)
{
    struct churn_ctx *c = arg;
    while (!atomic_load(&c->stop)) {
        ca_child_watcher *w = NULL;
        CHECK_OK(c->make(&w));
        CHECK_OK(ca_set_child_watcher(w));
        sched_yield();
        ca_child_watcher_close(w);
        sched_yield();
        ca_child_watcher_unref(w);
        atomic_fetch_add(&c->rounds, 1);
    }
    return NULL;
}

struct spawner {
    ca_loop *loop;
    int in_flight;
    bool allow_ebadf, allow_255;
    double end;
    long spawned, finished, ebadf, wrong_rc, lost_status;
};

static void spawn_batch(void *arg);

static void spawn_done(ca_future *f, void *arg)
{
    struct spawner *s = arg;
    void *res = NULL;
    int r = ca_future_result(f, &res);
    int rc = (int)(intptr_t)res;
    if (r == 0 && rc == 255 && s->allow_255) s->lost_status++;
    else if (r < 0 || rc != 7) s->wrong_rc++;
    s->finished++;
    if (--s->in_flight == 0) {
        if (now_s() < s->end) CHECK_OK(ca_loop_call_soon(s->loop, spawn_batch, s, NULL));
        else ca_loop_stop(s->loop);
    }
}

/* Spawns `sh -c 'exit 7'` eight at a time, from a callback of the running loop (as a program
 * does: the loop is its thread's, so the watchers post to it rather than touch it directly). */
static void spawn_batch(void *arg)
{
    struct spawner *s = arg;
    static const char *const argv[] = {"/bin/sh", "-c", "exit 7", NULL};
    const ca_subprocess_options o = {.argv = argv};
    for (int i = 0; i < 8; i++) {
        ca_process *p = NULL;
        int r = ca_loop_subprocess_exec(s->loop, &o, NULL, NULL, &p);
        if (s->allow_ebadf && r == -EBADF) {
            s->ebadf++;
            continue;
        }
        CHECK_OK(r);
        if (r < 0) continue;
        ca_future *f = NULL;
        CHECK_OK(ca_process_wait(p, &f));
        CHECK_OK(ca_future_add_done_callback(f, spawn_done, s));
        s->in_flight++;
        s->spawned++;
        ca_future_unref(f);
        ca_process_unref(p);
    }
    if (s->in_flight == 0) ca_loop_call_soon(s->loop, spawn_batch, s, NULL);
}

static bool spawner_stopped(void *arg)
{
    struct spawner *s = arg;
    return s->in_flight == 0 && now_s() >= s->end;
}

/* Runs batches for about `seconds`. Every spawn must succeed and report 7; with allow_ebadf a
 * spawn may instead fail with -EBADF (the policy's watcher stayed closed through every lookup),
 * and then nothing may be left behind. */
static void spawn_for(struct spawner *s, double seconds)
{
    s->end = now_s() + seconds;
    CHECK_OK(ca_loop_call_soon(s->loop, spawn_batch, s, NULL));
    if (!t_run_until(s->loop, spawner_stopped, s, seconds + 30))
        t_fail(__FILE__, __LINE__, "%d children not reported", s->in_flight);
    CHECK_EQ(s->finished, s->spawned);
    CHECK_EQ(s->wrong_rc, 0);
}

static int pidfd_or_skip(ca_child_watcher **out)
{
    return ca_pidfd_child_watcher_new(out);
}

static void spawn_under_churn(unsigned what, bool allow_ebadf, int (*make)(ca_child_watcher **))
{
    /* A new default policy makes Threaded watchers, which the watcher churn then closes. */
    /* A closed Threaded watcher's thread leaves a subprocess's child to it (the subprocess
     * reaps it through its pidfd, with its real status): 255 only where there is no pidfd. */
    bool threaded = make == ca_threaded_child_watcher_new ||
                    (what & (CHURN_POLICY | CHURN_WATCHER)) == (CHURN_POLICY | CHURN_WATCHER);
    int probe_fd = (int)syscall(SYS_pidfd_open, getpid(), 0);
    if (probe_fd >= 0) close(probe_fd);
    struct spawner s = {.allow_255 = threaded && probe_fd < 0, .allow_ebadf = allow_ebadf};
    if (make == pidfd_or_skip) {
        ca_child_watcher *probe = NULL;
        int r = ca_pidfd_child_watcher_new(&probe);
        if (r == -ENOSYS) SKIP("no pidfd_open");
        CHECK_OK(r);
        ca_child_watcher_close(probe);
        ca_child_watcher_unref(probe);
    }
    CHECK_OK(ca_selector_loop_new(&s.loop));
    struct churn_ctx c = {.make = make};
    if (make && !(what & CHURN_POLICY)) {
        /* Installed before the first spawn, which would otherwise make the default (Threaded)
         * watcher, and a closed Threaded watcher's threads still reap (see above). */
        ca_child_watcher *w = NULL;
        CHECK_OK(make(&w));
        CHECK_OK(ca_set_child_watcher(w));
        ca_child_watcher_unref(w);
    }
    pthread_t th[3];
    int n = 0;
    if (what & CHURN_WATCHER) CHECK_EQ(pthread_create(&th[n++], NULL, replace_watchers, &c), 0);
    if (what & CHURN_POLICY) CHECK_EQ(pthread_create(&th[n++], NULL, replace_policies, &c), 0);
    if (what & CHURN_CLOSE) CHECK_EQ(pthread_create(&th[n++], NULL, close_watchers, &c), 0);
    spawn_for(&s, 2.0);
    atomic_store(&c.stop, true);
    for (int i = 0; i < n; i++) pthread_join(th[i], NULL);
    CHECK(s.spawned > 0);
    CHECK(atomic_load(&c.rounds) > 0);
    /* Leave no watcher behind: the last one is closed with the policy. */
    CHECK_OK(ca_set_child_watcher(NULL));
    CHECK_OK(ca_set_event_loop_policy(NULL));
    CHECK_OK(ca_loop_close(s.loop));
    ca_loop_unref(s.loop);
}

/* Issue 16.1: the watcher was referenced only after the lookup returned it. Pidfd watchers:
 * a child registered with a watcher that is then closed (replaced) is finished on the process's
 * own pidfd, with its real status. */
TEST(spawn_while_watcher_replaced) /* timeout: 60 */
{
    spawn_under_churn(CHURN_WATCHER, false, pidfd_or_skip);
}

/* The same with Threaded watchers, the ones the issue crashed with. Here a status may be lost
 * (255): a closed Threaded watcher drops its registrations, but the thread of each still reaps
 * its child (watcher_threaded.c, reported to h-watch); the test asserts that no exit is lost
 * and nothing crashes. */
TEST(spawn_while_threaded_watcher_replaced) /* timeout: 60 */
{
    spawn_under_churn(CHURN_WATCHER, false, ca_threaded_child_watcher_new);
}

/* Issue 16.1: the policy (and the watcher it made) destroyed between lookup and reference. */
TEST(spawn_while_policy_replaced) /* timeout: 60 */
{
    spawn_under_churn(CHURN_POLICY, false, NULL);
}

TEST(spawn_while_policy_and_watcher_replaced) /* timeout: 60 */
{
    spawn_under_churn(CHURN_POLICY | CHURN_WATCHER, false, pidfd_or_skip);
}

/* Issue 16.9: a watcher closed while installed. A spawn that finds it closed looks again; it
 * fails with -EBADF only when the policy's watcher stays closed through every look, and a spawn
 * whose registration fails because the watcher closed after the check still reports its exit. */
TEST(spawn_while_watcher_closed) /* timeout: 60 */
{
    spawn_under_churn(CHURN_CLOSE, true, pidfd_or_skip);
}

/* The lookups themselves, hammered from several threads while others replace. */
static void *lookup_refs(void *arg)
{
    struct churn_ctx *c = arg;
    while (!atomic_load(&c->stop)) {
        ca_child_watcher *w = NULL;
        if (ca__get_child_watcher_ref(&w) == 0) {
            CHECK(ca__child_watcher_kind(w) != NULL);
            ca_child_watcher_unref(w);
        }
        ca_loop *loop = NULL;
        int r = ca__get_event_loop_ref(&loop);
        CHECK(r == 0 || r == -ENOENT);
        if (r == 0) ca_loop_unref(loop); /* read after the reference: ASan sees a freed one */
    }
    return NULL;
}

TEST(get_and_ref_while_replaced) /* timeout: 60 */
{
    struct churn_ctx c = {0};
    pthread_t th[4];
    c.make = ca_threaded_child_watcher_new;
    CHECK_EQ(pthread_create(&th[0], NULL, replace_watchers, &c), 0);
    CHECK_EQ(pthread_create(&th[1], NULL, replace_policies, &c), 0);
    CHECK_EQ(pthread_create(&th[2], NULL, lookup_refs, &c), 0);
    CHECK_EQ(pthread_create(&th[3], NULL, lookup_refs, &c), 0);
    /* This (main) thread's lookups make the default policy's main-thread loop too. */
    double end = now_s() + 1.5;
    while (now_s() < end) {
        ca_loop *loop = NULL;
        CHECK_OK(ca__get_event_loop_ref(&loop));
        ca_loop_unref(loop);
    }
    atomic_store(&c.stop, true);
    for (int i = 0; i < 4; i++) pthread_join(th[i], NULL);
    CHECK_OK(ca_set_child_watcher(NULL));
    CHECK_OK(ca_set_event_loop_policy(NULL));
}

/* A running loop is returned with a reference, and a custom policy's op result too. */
static void check_running_ref(void *arg)
{
    ca_loop *loop = arg, *got = NULL;
    CHECK_OK(ca__get_event_loop_ref(&got));
    CHECK(got == loop);
    ca_loop_unref(got);
    ca_loop_stop(loop);
}

TEST(get_event_loop_ref_running)
{
    ca_loop *loop = NULL;
    CHECK_OK(ca_selector_loop_new(&loop));
    CHECK_OK(ca_loop_call_soon(loop, check_running_ref, loop, NULL));
    CHECK_OK(ca_loop_run_forever(loop));
    CHECK_OK(ca_loop_close(loop));
    ca_loop_unref(loop);
}

/* ----- fork while another thread holds the library's locks ---------------------------------- */

void ca__log(int level, const char *fmt, ...);

static atomic_long logged;

static void count_log(int level, const char *msg, void *arg) { atomic_fetch_add(&logged, 1); }

struct logger {
    atomic_bool stop;
};

/* Logs (and looks up the policy's loop and watcher, which take the policy's locks) without a
 * pause, so that a fork() in another thread often happens while this one holds a lock. */
static void *log_forever(void *arg)
{
    struct logger *l = arg;
    while (!atomic_load(&l->stop)) {
        ca__log(CA_LOG_DEBUG, "busy %d", 1);
        ca_set_log_handler(count_log, NULL);
        ca_child_watcher *w = NULL;
        if (ca__get_child_watcher_ref(&w) == 0) ca_child_watcher_unref(w);
    }
    return NULL;
}

/* Waits for pid for at most `seconds`; false (and the child killed) if it did not exit. */
static bool wait_bounded(pid_t pid, double seconds, int *status)
{
    double end = now_s() + seconds * t_slow();
    for (;;) {
        pid_t r = waitpid(pid, status, WNOHANG);
        if (r == pid) return true;
        if (r < 0 && errno != EINTR) return false;
        if (now_s() > end) {
            kill(pid, SIGKILL);
            waitpid(pid, status, 0);
            return false;
        }
        struct timespec ts = {0, 1000000};
        nanosleep(&ts, NULL);
    }
}

/* Issue 16.3: a child forked while another thread held the log lock (or the policy's) used to
 * hang on its first log line. Each child logs, looks up its watcher, and exits. */
TEST(fork_while_logging) /* timeout: 120 */
{
    ca_set_log_handler(count_log, NULL);
    struct logger l = {0};
    pthread_t t;
    CHECK_EQ(pthread_create(&t, NULL, log_forever, &l), 0);
    int hung = 0;
    /* 300 forks, or as many as fit in 10 s (under valgrind a fork takes about a second). */
    double started = t_now();
    for (int i = 0; hung == 0 && t_stress_go_on(i, 3, 300, started, 10); i++) {
        pid_t pid = fork();
        CHECK(pid >= 0);
        if (pid == 0) {
            ca__log(CA_LOG_WARNING, "child %d", i);
            ca_set_log_handler(NULL, NULL);
            ca__log(CA_LOG_WARNING, "child %d, silent", i);
            t_child_exit(0);
        }
        int status = 0;
        if (!wait_bounded(pid, 5, &status)) hung++;
        else CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0);
    }
    atomic_store(&l.stop, true);
    pthread_join(t, NULL);
    CHECK_EQ(hung, 0);
    CHECK(atomic_load(&logged) > 0);
    ca_set_log_handler(NULL, NULL);
    CHECK_OK(ca_set_child_watcher(NULL));
}

/* ----- a forked child spawns (issue 16.6) --------------------------------------------------- */

struct one_exit {
    int done, rc;
};

static void one_exit_done(ca_future *f, void *arg)
{
    struct one_exit *e = arg;
    void *res = NULL;
    e->rc = ca_future_result(f, &res) == 0 ? (int)(intptr_t)res : -1000;
    e->done = 1;
}

/* In the forked child: the default policy's first loop, a spawn, its exit. Returns an exit
 * code for the test (0 when everything held). */
static int child_spawns(const char *kind)
{
    ca_loop *loop = NULL, *again = NULL;
    if (ca_get_event_loop(&loop) != 0) return 10;
    if (ca_get_event_loop(&again) != 0 || again != loop) return 11;
    ca_child_watcher *w = NULL;
    if (ca_get_child_watcher(&w) != 0) return 12;
    if (strcmp(ca__child_watcher_kind(w), kind) != 0) return 13;
    if (!ca_child_watcher_is_active(w)) return 14;
    static const char *const argv[] = {"/bin/sh", "-c", "exit 7", NULL};
    const ca_subprocess_options o = {.argv = argv};
    ca_process *p = NULL;
    if (ca_loop_subprocess_exec(loop, &o, NULL, NULL, &p) != 0) return 15;
    ca_future *f = NULL;
    if (ca_process_wait(p, &f) != 0) return 16;
    struct one_exit e = {0};
    if (ca_future_add_done_callback(f, one_exit_done, &e) != 0) return 17;
    if (!t_run_until(loop, t_flag_set, &e.done, 10)) return 18;
    if (e.rc != 7) return 19;
    /* ca_set_event_loop keeps working, and the new loop gets the watcher. */
    ca_loop *other = NULL;
    if (ca_new_event_loop(&other) != 0 || ca_set_event_loop(other) != 0) return 20;
    return 0;
}

static void fork_then_spawn(int (*make)(ca_child_watcher **), const char *kind)
{
    if (!make) {
        pid_t pid = fork();
        CHECK(pid >= 0);
        if (pid == 0) t_child_exit(child_spawns(kind));
        int status = 0;
        CHECK(wait_bounded(pid, 20, &status));
        CHECK(WIFEXITED(status));
        CHECK_EQ(WEXITSTATUS(status), 0);
        return;
    }
    ca_child_watcher *w = NULL;
    int r = make(&w);
    if (r == -ENOSYS) SKIP("watcher kind not available here");
    CHECK_OK(r);
    ca_loop *loop = NULL;
    CHECK_OK(ca_get_event_loop(&loop));
    CHECK_OK(ca_child_watcher_attach_loop(w, loop));
    CHECK_OK(ca_set_child_watcher(w));
    pid_t pid = fork();
    CHECK(pid >= 0);
    if (pid == 0) t_child_exit(child_spawns(kind));
    int status = 0;
    CHECK(wait_bounded(pid, 20, &status));
    CHECK(WIFEXITED(status));
    CHECK_EQ(WEXITSTATUS(status), 0);
    /* The parent's watcher and loop are untouched. */
    ca_child_watcher *now = NULL;
    CHECK_OK(ca_get_child_watcher(&now));
    CHECK(now == w);
    CHECK(ca_child_watcher_is_active(w));
    ca_child_watcher_unref(w);
    CHECK_OK(ca_set_child_watcher(NULL));
    CHECK_OK(ca_set_event_loop(NULL));
}

TEST(fork_then_spawn_threaded) { fork_then_spawn(ca_threaded_child_watcher_new, "threaded"); }
TEST(fork_then_spawn_multiloop)
{
#ifdef T_TSAN
    SKIP("ThreadSanitizer cannot start a thread in a child forked from a threaded process");
#endif
    fork_then_spawn(ca_multiloop_child_watcher_new, "multiloop");
}
TEST(fork_then_spawn_safe) { fork_then_spawn(ca_safe_child_watcher_new, "safe"); }
TEST(fork_then_spawn_fast) { fork_then_spawn(ca_fast_child_watcher_new, "fast"); }
TEST(fork_then_spawn_pidfd) { fork_then_spawn(ca_pidfd_child_watcher_new, "pidfd"); }

/* With no watcher ever made in the parent, the child makes the default one. */
TEST(fork_then_spawn_default) { fork_then_spawn(NULL, "threaded"); }

/* ----- custom policies: the policy is held across its op and the reference ------------------ */

/* A policy that owns one loop and one watcher, handed out borrowed, and frees both when the
 * policy is destroyed: a lookup that referenced the result after letting go of the policy
 * would read freed memory when another thread replaces the policy in between. */
struct owning {
    ca_loop *loop;
    ca_child_watcher *w;
};

static int owning_get_loop(ca_policy *self, ca_loop **out)
{
    *out = ((struct owning *)ca_policy_data(self))->loop;
    return 0;
}

static int owning_get_watcher(ca_policy *self, ca_child_watcher **out)
{
    *out = ((struct owning *)ca_policy_data(self))->w;
    return 0;
}

static void owning_destroy(ca_policy *self)
{
    struct owning *o = ca_policy_data(self);
    ca_loop_close(o->loop);
    ca_loop_unref(o->loop);
    ca_child_watcher_close(o->w);
    ca_child_watcher_unref(o->w);
    free(o);
}

static const ca_policy_ops owning_ops = {
    .get_event_loop = owning_get_loop,
    .get_child_watcher = owning_get_watcher,
    .destroy = owning_destroy,
};

static void *replace_owning_policies(void *arg)
{
    struct churn_ctx *c = arg;
    while (!atomic_load(&c->stop)) {
        struct owning *o = calloc(1, sizeof *o);
        CHECK(o != NULL);
        CHECK_OK(ca_selector_loop_new(&o->loop));
        CHECK_OK(ca_threaded_child_watcher_new(&o->w));
        ca_policy *p = NULL;
        CHECK_OK(ca_policy_new(&owning_ops, o, NULL, &p));
        CHECK_OK(ca_set_event_loop_policy(p));
        ca_policy_unref(p);
        atomic_fetch_add(&c->rounds, 1);
    }
    return NULL;
}

static void *lookup_owning(void *arg)
{
    struct churn_ctx *c = arg;
    while (!atomic_load(&c->stop)) {
        ca_loop *loop = NULL;
        if (ca__get_event_loop_ref(&loop) == 0) {
            CHECK(strcmp(ca_loop_kind(loop), "epoll") == 0);
            ca_loop_unref(loop);
        }
        ca_child_watcher *w = NULL;
        if (ca__get_child_watcher_ref(&w) == 0) {
            CHECK(strcmp(ca__child_watcher_kind(w), "threaded") == 0);
            ca_child_watcher_unref(w);
        }
    }
    return NULL;
}

TEST(get_and_ref_with_custom_policies_replaced) /* timeout: 60 */
{
    struct churn_ctx c = {0};
    pthread_t th[3];
    CHECK_EQ(pthread_create(&th[0], NULL, replace_owning_policies, &c), 0);
    CHECK_EQ(pthread_create(&th[1], NULL, lookup_owning, &c), 0);
    CHECK_EQ(pthread_create(&th[2], NULL, lookup_owning, &c), 0);
    struct timespec ts = {1, 500 * 1000 * 1000};
    nanosleep(&ts, NULL);
    atomic_store(&c.stop, true);
    for (int i = 0; i < 3; i++) pthread_join(th[i], NULL);
    CHECK(atomic_load(&c.rounds) > 0);
    CHECK_OK(ca_set_event_loop_policy(NULL));
}
