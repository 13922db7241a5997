/*
 * Contract tests for API.md's "Child watchers": returncodes exactly once, every watcher kind,
 * threads, logging, custom watchers. Each test names the statement it checks; a failure is a
 * disagreement between the code and API.md.
 */
#include "contract_util.h"

#include <dirent.h>

extern char **environ;

/* A watcher of kind k delivering to loop (current; attached for Safe/Fast); NULL if this kind
 * cannot work here (pidfd without kernel support; Safe/Fast on the signal-less custom loop). */
static ca_child_watcher *wmake(int k, ca_loop *loop)
{
    ca_child_watcher *w = NULL;
    int r = wnew(k, &w);
    if (r == -ENOSYS && (k == W_PIDFD || k == W_URING)) return NULL;
    CHECK_OK(r);
    CHECK_OK(ca_set_event_loop(loop));
    if (k == W_SAFE || k == W_FAST) {
        r = ca_child_watcher_attach_loop(w, loop);
        if (r == -ENOTSUP && strcmp(ca_loop_kind(loop), "custom") == 0) {
            ca_child_watcher_unref(w);
            CHECK_OK(ca_set_event_loop(NULL));
            return NULL;
        }
        CHECK_OK(r);
    }
    CHECK(ca_child_watcher_is_active(w));
    return w;
}

static void wdone(ca_child_watcher *w)
{
    CHECK_OK(ca_child_watcher_close(w));
    ca_child_watcher_unref(w);
    CHECK_OK(ca_set_event_loop(NULL));
}

static pid_t spawn_sh(const char *cmd)
{
    char *argv[] = {"sh", "-c", (char *)cmd, NULL};
    pid_t pid = -1;
    int e = posix_spawn(&pid, "/bin/sh", NULL, NULL, argv, environ);
    if (e) t_fail(__FILE__, __LINE__, "posix_spawn: %s", strerror(e));
    return pid;
}

/* Waits until pid has exited (zombie) or was reaped by somebody else. */
static void wait_exited(pid_t pid)
{
    siginfo_t si;
    memset(&si, 0, sizeof si);
    int r;
    do {
        r = waitid(P_PID, (id_t)pid, &si, WEXITED | WNOWAIT);
    } while (r < 0 && errno == EINTR);
}

/* Reaps pid if it is still ours (after a test that removed its handler). */
static void reap_if_ours(pid_t pid)
{
    int st;
    while (waitpid(pid, &st, 0) < 0 && errno == EINTR) {
    }
}

struct wrec {
    atomic_int n;
    int rc;
    pid_t pid;
    pthread_t thread;
    int tag;
};
static void wrec_cb(pid_t pid, int rc, void *arg)
{
    struct wrec *r = arg;
    r->rc = rc;
    r->pid = pid;
    r->thread = pthread_self();
    atomic_fetch_add(&r->n, 1);
}
static bool wrec_all(void *arg)
{
    struct wrec *r = arg;
    for (int i = 0; r[i].tag >= 0; i++)
        if (atomic_load(&r[i].n) == 0) return false;
    return true;
}

/* "returncode is the exit status, or -signal for a child killed by a signal" ... "called exactly
 * once per registered exit" — every watcher on every loop kind. */
LOOP_TEST(watcher_returncodes_exactly_once)
{
    static const char *cmds[] = {"exit 0", "exit 7", "exit 255", "kill -9 $$", "kill -15 $$"};
    static const int want[] = {0, 7, 255, -9, -15};
    for (int k = 0; k < W_COUNT; k++) {
        ca_child_watcher *w = wmake(k, loop);
        if (!w) continue;
        struct wrec rec[6];
        memset(rec, 0, sizeof rec);
        rec[5].tag = -1;
        pid_t pids[5];
        if (k == W_FAST) CHECK_OK(ca_child_watcher_enter(w));
        for (int i = 0; i < 5; i++) {
            pids[i] = spawn_sh(cmds[i]);
            CHECK_OK(ca_child_watcher_add_child_handler(w, pids[i], wrec_cb, &rec[i]));
        }
        if (k == W_FAST) CHECK_OK(ca_child_watcher_exit(w));
        if (!t_run_until(loop, wrec_all, rec, 5.0))
            t_fail(__FILE__, __LINE__, "%s: not every exit delivered", wname[k]);
        t_run_for(loop, 0.03);
        for (int i = 0; i < 5; i++) {
            if (atomic_load(&rec[i].n) != 1 || rec[i].rc != want[i] || rec[i].pid != pids[i])
                t_fail(__FILE__, __LINE__, "%s: child %d: n=%d rc=%d (want %d)", wname[k], i,
                       atomic_load(&rec[i].n), rec[i].rc, want[i]);
        }
        wdone(w);
    }
}

/* "255 when the status could not be read (ECHILD)" */
TEST(watcher_echild_gives_255)
{
    static struct logrec lr;
    ca_set_log_handler(rec_log, &lr);
    ca_loop *l = new_epoll();
    int kinds[] = {W_THREADED, W_MULTILOOP, W_SAFE, W_PIDFD, W_URING};
    for (int i = 0; i < 5; i++) {
        int k = kinds[i];
        ca_child_watcher *w = wmake(k, l);
        if (!w) continue;
        pid_t pid = spawn_sh("exit 3");
        reap_if_ours(pid); /* status gone: the watcher gets ECHILD */
        struct wrec rec[2];
        memset(rec, 0, sizeof rec);
        rec[1].tag = -1;
        int r = ca_child_watcher_add_child_handler(w, pid, wrec_cb, &rec[0]);
        if (r < 0) t_fail(__FILE__, __LINE__, "%s: add_child_handler: %d", wname[k], r);
        if (!t_run_until(l, wrec_all, rec, 3.0))
            t_fail(__FILE__, __LINE__, "%s: no callback for a pid already reaped", wname[k]);
        t_run_for(l, 0.02);
        if (atomic_load(&rec[0].n) != 1 || rec[0].rc != 255)
            t_fail(__FILE__, __LINE__, "%s: n=%d rc=%d, want 1 call with 255", wname[k],
                   atomic_load(&rec[0].n), rec[0].rc);
        /* asyncio: logger.warning("Unknown child process pid %d, will report returncode 255") */
        if (atomic_load(&lr.n) < 1 || lr.level != CA_LOG_WARNING)
            t_fail(__FILE__, __LINE__, "%s: %d log calls, level %d", wname[k], atomic_load(&lr.n), lr.level);
        atomic_store(&lr.n, 0);
        wdone(w);
    }
    loop_done(l);
}

/* "a callback that was removed is never called, for every watcher (stricter than asyncio's
 * Threaded)"; remove returns 1 removed / 0 nothing. */
LOOP_TEST(watcher_removed_callback_never_called)
{
    ca_set_log_handler(quiet_log, NULL);
    for (int k = 0; k < W_COUNT; k++) {
        ca_child_watcher *w = wmake(k, loop);
        if (!w) continue;
        struct wrec rec = {0};
        /* Removed before the exit. */
        pid_t pid = spawn_sh("sleep 0.05");
        CHECK_OK(ca_child_watcher_add_child_handler(w, pid, wrec_cb, &rec));
        CHECK_EQ(ca_child_watcher_remove_child_handler(w, pid), 1);
        CHECK_EQ(ca_child_watcher_remove_child_handler(w, pid), 0);
        wait_exited(pid);
        t_run_for(loop, 0.05);
        if (atomic_load(&rec.n) != 0) t_fail(__FILE__, __LINE__, "%s: removed callback called", wname[k]);
        if (k != W_FAST && k != W_THREADED) reap_if_ours(pid);
        else waitpid(pid, NULL, WNOHANG);
        /* Removed after the exit, before the loop delivered it. */
        pid = spawn_sh("exit 1");
        CHECK_OK(ca_child_watcher_add_child_handler(w, pid, wrec_cb, &rec));
        wait_exited(pid);
        sleep_s(0.05); /* a waiting thread has reaped and posted by now */
        int r = ca_child_watcher_remove_child_handler(w, pid);
        CHECK(r == 0 || r == 1);
        t_run_for(loop, 0.05);
        if (r == 1 && atomic_load(&rec.n) != 0)
            t_fail(__FILE__, __LINE__, "%s: callback removed after the exit was called", wname[k]);
        waitpid(pid, NULL, WNOHANG);
        CHECK_EQ(ca_child_watcher_remove_child_handler(w, 12345678), 0);
        wdone(w);
    }
}

/* "Specifying another callback for the same process replaces the previous handler." */
LOOP_TEST(watcher_add_replaces)
{
    for (int k = 0; k < W_COUNT; k++) {
        ca_child_watcher *w = wmake(k, loop);
        if (!w) continue;
        struct wrec a[2], b[2];
        memset(a, 0, sizeof a);
        memset(b, 0, sizeof b);
        a[1].tag = b[1].tag = -1;
        pid_t pid = spawn_sh("sleep 0.02; exit 4");
        CHECK_OK(ca_child_watcher_add_child_handler(w, pid, wrec_cb, &a[0]));
        CHECK_OK(ca_child_watcher_add_child_handler(w, pid, wrec_cb, &b[0]));
        if (!t_run_until(loop, wrec_all, b, 5.0)) t_fail(__FILE__, __LINE__, "%s: not delivered", wname[k]);
        t_run_for(loop, 0.03);
        if (atomic_load(&a[0].n) != 0 || atomic_load(&b[0].n) != 1 || b[0].rc != 4)
            t_fail(__FILE__, __LINE__, "%s: a=%d b=%d rc=%d", wname[k], atomic_load(&a[0].n),
                   atomic_load(&b[0].n), b[0].rc);
        wdone(w);
    }
}

/* A child that exited before its handler was added is still delivered once (all but Fast
 * outside enter/exit). */
LOOP_TEST(watcher_exit_before_add)
{
    for (int k = 0; k < W_COUNT; k++) {
        if (k == W_FAST) continue;
        ca_child_watcher *w = wmake(k, loop);
        if (!w) continue;
        struct wrec rec[2];
        memset(rec, 0, sizeof rec);
        rec[1].tag = -1;
        pid_t pid = spawn_sh("exit 9");
        wait_exited(pid);
        t_run_for(loop, 0.02);
        CHECK_OK(ca_child_watcher_add_child_handler(w, pid, wrec_cb, &rec[0]));
        if (!t_run_until(loop, wrec_all, rec, 5.0)) t_fail(__FILE__, __LINE__, "%s: not delivered", wname[k]);
        CHECK_EQ(rec[0].rc, 9);
        wdone(w);
    }
}

/* Many children exiting at once (SIGCHLD coalescing): each exactly once. */
LOOP_TEST(watcher_many_at_once)
{
    enum { N = 12 };
    for (int k = 0; k < W_COUNT; k++) {
        ca_child_watcher *w = wmake(k, loop);
        if (!w) continue;
        struct wrec rec[N + 1];
        memset(rec, 0, sizeof rec);
        rec[N].tag = -1;
        if (k == W_FAST) CHECK_OK(ca_child_watcher_enter(w));
        for (int i = 0; i < N; i++) {
            pid_t pid = spawn_sh("exit 5");
            CHECK_OK(ca_child_watcher_add_child_handler(w, pid, wrec_cb, &rec[i]));
        }
        if (k == W_FAST) CHECK_OK(ca_child_watcher_exit(w));
        if (!t_run_until(loop, wrec_all, rec, 10.0)) t_fail(__FILE__, __LINE__, "%s: lost exits", wname[k]);
        t_run_for(loop, 0.02);
        for (int i = 0; i < N; i++) {
            CHECK_EQ(atomic_load(&rec[i].n), 1);
            CHECK_EQ(rec[i].rc, 5);
        }
        wdone(w);
    }
}

/* is_active: "Threaded and Pidfd always; MultiLoop from creation until close; Safe and Fast
 * while attached to a loop that is not closed; otherwise add_child_handler gives -ENOTCONN." */
TEST(watcher_is_active_rules)
{
    for (int k = 0; k < W_COUNT; k++) {
        ca_child_watcher *w = NULL;
        int r = wnew(k, &w);
        if (r == -ENOSYS && (k == W_PIDFD || k == W_URING)) continue;
        CHECK_OK(r);
        bool attach_needed = k == W_SAFE || k == W_FAST;
        if (ca_child_watcher_is_active(w) != !attach_needed)
            t_fail(__FILE__, __LINE__, "%s: is_active after new", wname[k]);
        ca_loop *l = new_epoll();
        if (attach_needed) {
            pid_t dummy = spawn_sh("exit 0");
            CHECK_ERR(ca_child_watcher_add_child_handler(w, dummy, wrec_cb, NULL), -ENOTCONN);
            reap_if_ours(dummy);
        }
        CHECK_OK(ca_child_watcher_attach_loop(w, l));
        if (!ca_child_watcher_is_active(w)) t_fail(__FILE__, __LINE__, "%s: attached", wname[k]);
        CHECK_OK(ca_child_watcher_attach_loop(w, NULL));
        if (ca_child_watcher_is_active(w) != !attach_needed)
            t_fail(__FILE__, __LINE__, "%s: after attach(NULL)", wname[k]);
        CHECK_OK(ca_child_watcher_attach_loop(w, l));
        CHECK_OK(ca_loop_close(l));
        if (ca_child_watcher_is_active(w) != !attach_needed)
            t_fail(__FILE__, __LINE__, "%s: attached to a closed loop", wname[k]);
        if (attach_needed) {
            pid_t dummy = spawn_sh("exit 0");
            CHECK_ERR(ca_child_watcher_add_child_handler(w, dummy, wrec_cb, NULL), -ENOTCONN);
            reap_if_ours(dummy);
        }
        CHECK_OK(ca_child_watcher_close(w));
        if (ca_child_watcher_is_active(w)) t_fail(__FILE__, __LINE__, "%s: closed", wname[k]);
        ca_child_watcher_unref(w);
        ca_loop_unref(l);
    }
}

/* "A closed watcher gives -EBADF to everything but close/unref"; bad arguments -EINVAL
 * first. */
TEST(watcher_closed_ebadf_and_bad_args)
{
    ca_loop *l = new_epoll();
    for (int k = 0; k < W_COUNT; k++) {
        ca_child_watcher *w = NULL;
        int r = wnew(k, &w);
        if (r == -ENOSYS && (k == W_PIDFD || k == W_URING)) continue;
        CHECK_OK(r);
        CHECK_ERR(ca_child_watcher_add_child_handler(w, 0, wrec_cb, NULL), -EINVAL);
        CHECK_ERR(ca_child_watcher_add_child_handler(w, -5, wrec_cb, NULL), -EINVAL);
        CHECK_ERR(ca_child_watcher_add_child_handler(w, getpid(), NULL, NULL), -EINVAL);
        CHECK_ERR(ca_child_watcher_remove_child_handler(w, 0), -EINVAL);
        CHECK_ERR(ca_child_watcher_remove_child_handler(w, -1), -EINVAL);
        CHECK_OK(ca_child_watcher_close(w));
        CHECK_OK(ca_child_watcher_close(w));
        CHECK_ERR(ca_child_watcher_add_child_handler(w, getpid(), wrec_cb, NULL), -EBADF);
        CHECK_ERR(ca_child_watcher_remove_child_handler(w, getpid()), -EBADF);
        CHECK_ERR(ca_child_watcher_attach_loop(w, l), -EBADF);
        CHECK_ERR(ca_child_watcher_attach_loop(w, NULL), -EBADF);
        CHECK_ERR(ca_child_watcher_enter(w), -EBADF);
        CHECK_ERR(ca_child_watcher_exit(w), -EBADF);
        CHECK(!ca_child_watcher_is_active(w));
        /* bad argument before closed */
        CHECK_ERR(ca_child_watcher_add_child_handler(w, 0, wrec_cb, NULL), -EINVAL);
        CHECK_ERR(ca_child_watcher_add_child_handler(w, 5, NULL, NULL), -EINVAL);
        CHECK_ERR(ca_child_watcher_remove_child_handler(w, -1), -EINVAL);
        ca_child_watcher_unref(w);
    }
    CHECK_ERR(ca_child_watcher_add_child_handler(NULL, 5, wrec_cb, NULL), -EINVAL);
    CHECK_ERR(ca_child_watcher_remove_child_handler(NULL, 5), -EINVAL);
    CHECK_ERR(ca_child_watcher_attach_loop(NULL, l), -EINVAL);
    CHECK(!ca_child_watcher_is_active(NULL));
    CHECK_ERR(ca_child_watcher_close(NULL), -EINVAL);
    CHECK_ERR(ca_child_watcher_enter(NULL), -EINVAL);
    CHECK_ERR(ca_child_watcher_exit(NULL), -EINVAL);
    CHECK(ca_child_watcher_data(NULL) == NULL);
    loop_done(l);
}

/* Threaded, MultiLoop, Pidfd: "with neither [running nor current loop], add_child_handler gives
 * -ENOENT". In a thread with no loop. */
struct noloop {
    ca_child_watcher *w;
    pid_t pid;
    int r;
};
static void *noloop_thread(void *arg)
{
    struct noloop *n = arg;
    n->r = ca_child_watcher_add_child_handler(n->w, n->pid, wrec_cb, NULL);
    return NULL;
}

TEST(watcher_no_delivery_loop_enoent)
{
    int kinds[] = {W_THREADED, W_MULTILOOP, W_PIDFD, W_URING};
    for (int i = 0; i < 4; i++) {
        ca_child_watcher *w = NULL;
        int r = wnew(kinds[i], &w);
        if (r == -ENOSYS) continue;
        CHECK_OK(r);
        pid_t pid = spawn_sh("sleep 0.05");
        struct noloop n = {w, pid, 1};
        pthread_t t;
        CHECK_EQ(pthread_create(&t, NULL, noloop_thread, &n), 0);
        pthread_join(t, NULL);
        if (n.r != -ENOENT) t_fail(__FILE__, __LINE__, "%s: got %d, want -ENOENT", wname[kinds[i]], n.r);
        CHECK_OK(ca_child_watcher_close(w));
        ca_child_watcher_unref(w);
        reap_if_ours(pid);
    }
}

/* Threaded, MultiLoop, Pidfd "deliver to the loop running in the thread that added the handler,
 * or, when none runs there, to that thread's current loop". A thread runs its own loop and
 * adds the handler from a callback: the exit comes through that loop. */
struct tdeliv {
    ca_child_watcher *w;
    ca_loop *loop;
    struct wrec rec[2];
    int add_r;
    pid_t pid;
    pthread_t self;
    ca_loop *cb_running;
};
static void tdeliv_cb(pid_t pid, int rc, void *arg)
{
    struct tdeliv *d = arg;
    d->cb_running = ca_get_running_loop();
    wrec_cb(pid, rc, &d->rec[0]);
}
static void tdeliv_add(void *arg)
{
    struct tdeliv *d = arg;
    d->add_r = ca_child_watcher_add_child_handler(d->w, d->pid, tdeliv_cb, d);
}
static void *tdeliv_thread(void *arg)
{
    struct tdeliv *d = arg;
    d->self = pthread_self();
    CHECK_OK(ca_loop_call_soon(d->loop, tdeliv_add, d, NULL));
    t_run_until(d->loop, wrec_all, d->rec, 5.0);
    return NULL;
}

TEST(watcher_delivery_to_running_loop_of_adding_thread)
{
    int kinds[] = {W_THREADED, W_MULTILOOP, W_PIDFD, W_URING};
    for (int i = 0; i < 4; i++) {
        struct tdeliv d;
        memset(&d, 0, sizeof d);
        d.rec[1].tag = -1;
        int r = wnew(kinds[i], &d.w);
        if (r == -ENOSYS) continue;
        CHECK_OK(r);
        CHECK_OK(ca_poll_loop_new(&d.loop));
        d.pid = spawn_sh("sleep 0.02; exit 6");
        pthread_t t;
        CHECK_EQ(pthread_create(&t, NULL, tdeliv_thread, &d), 0);
        pthread_join(t, NULL);
        CHECK_OK(d.add_r);
        if (atomic_load(&d.rec[0].n) != 1 || d.rec[0].rc != 6)
            t_fail(__FILE__, __LINE__, "%s: n=%d rc=%d", wname[kinds[i]], atomic_load(&d.rec[0].n), d.rec[0].rc);
        CHECK_OK(ca_child_watcher_close(d.w));
        ca_child_watcher_unref(d.w);
        loop_done(d.loop);
    }
}

/* "Callbacks never run inside a signal handler ... Threaded, MultiLoop and Pidfd deliver to the
 * loop running in the thread that added the handler." API.md also says Threaded "calls them
 * from the child's waiting thread" and MultiLoop "from its own reaping thread"; the two
 * sentences cannot both hold. We follow the delivery sentence, issue 4 ("delivered ... via
 * ca_loop_call_soon_threadsafe") and CPython 3.11, as the header documents: those threads only
 * reap, and every callback runs on a loop's thread, never in a signal handler. */
TEST(watcher_callbacks_run_on_a_loop_thread)
{
    ca_loop *l = new_epoll();
    pthread_t me = pthread_self();
    for (int k = 0; k < W_COUNT; k++) {
        ca_child_watcher *w = wmake(k, l);
        if (!w) continue;
        struct wrec rec[2];
        memset(rec, 0, sizeof rec);
        rec[1].tag = -1;
        pid_t pid = spawn_sh("exit 0");
        CHECK_OK(ca_child_watcher_add_child_handler(w, pid, wrec_cb, &rec[0]));
        CHECK(t_run_until(l, wrec_all, rec, 5.0));
        bool on_loop_thread = pthread_equal(rec[0].thread, me);
        bool want_loop_thread = true;
        if (on_loop_thread != want_loop_thread)
            t_fail(__FILE__, __LINE__, "%s: callback ran %s the loop's thread", wname[k],
                   on_loop_thread ? "on" : "off");
        wdone(w);
    }
    loop_done(l);
}

/* Safe and Fast: callbacks from the attached loop's thread (loop in another thread). */
struct attthr {
    ca_loop *loop;
    ca_child_watcher *w;
    struct wrec rec[2];
    pid_t pid;
    int add_r;
};
static void att_add(void *arg)
{
    struct attthr *a = arg;
    a->add_r = ca_child_watcher_add_child_handler(a->w, a->pid, wrec_cb, &a->rec[0]);
}
static void *att_thread(void *arg)
{
    struct attthr *a = arg;
    CHECK_OK(ca_child_watcher_attach_loop(a->w, a->loop));
    CHECK_OK(ca_loop_call_soon(a->loop, att_add, a, NULL));
    t_run_until(a->loop, wrec_all, a->rec, 5.0);
    CHECK_OK(ca_child_watcher_attach_loop(a->w, NULL));
    return NULL;
}

TEST(watcher_safe_fast_attached_loop_thread)
{
    for (int k = W_SAFE; k <= W_FAST; k++) {
        struct attthr a;
        memset(&a, 0, sizeof a);
        a.rec[1].tag = -1;
        CHECK_OK(wnew(k, &a.w));
        a.loop = new_epoll();
        a.pid = spawn_sh("sleep 0.02; exit 2");
        pthread_t t;
        CHECK_EQ(pthread_create(&t, NULL, att_thread, &a), 0);
        pthread_join(t, NULL);
        CHECK_OK(a.add_r);
        CHECK_EQ(atomic_load(&a.rec[0].n), 1);
        CHECK_EQ(a.rec[0].rc, 2);
        CHECK(pthread_equal(a.rec[0].thread, t));
        CHECK_OK(ca_child_watcher_close(a.w));
        ca_child_watcher_unref(a.w);
        loop_done(a.loop);
    }
}

/* ca_child_watcher_attach_loop takes its own reference to the loop. */
TEST(watcher_attach_loop_takes_reference)
{
    for (int k = W_SAFE; k <= W_FAST; k++) {
        ca_child_watcher *w = NULL;
        CHECK_OK(wnew(k, &w));
        ca_loop *l = new_epoll();
        CHECK_OK(ca_child_watcher_attach_loop(w, l));
        ca_loop_unref(l); /* the watcher holds it */
        CHECK(ca_child_watcher_is_active(w));
        struct wrec rec[2];
        memset(rec, 0, sizeof rec);
        rec[1].tag = -1;
        pid_t pid = spawn_sh("exit 1");
        CHECK_OK(ca_child_watcher_add_child_handler(w, pid, wrec_cb, &rec[0]));
        CHECK(t_run_until(l, wrec_all, rec, 5.0));
        CHECK_EQ(rec[0].rc, 1);
        CHECK_OK(ca_child_watcher_close(w));
        ca_child_watcher_unref(w);
    }
}

/* Fast: "keeps exit statuses that arrive before registration while inside enter/exit". */
TEST(watcher_fast_enter_exit_keeps_status)
{
    ca_loop *l = new_epoll();
    ca_child_watcher *w = wmake(W_FAST, l);
    CHECK_OK(ca_child_watcher_enter(w));
    pid_t pid = spawn_sh("exit 12");
    wait_exited(pid);
    t_run_for(l, 0.05); /* SIGCHLD handled: Fast has reaped it */
    struct wrec rec[2];
    memset(rec, 0, sizeof rec);
    rec[1].tag = -1;
    CHECK_OK(ca_child_watcher_add_child_handler(w, pid, wrec_cb, &rec[0]));
    CHECK_OK(ca_child_watcher_exit(w));
    CHECK(t_run_until(l, wrec_all, rec, 3.0));
    CHECK_EQ(rec[0].rc, 12);
    t_run_for(l, 0.02);
    CHECK_EQ(atomic_load(&rec[0].n), 1);
    wdone(w);
    loop_done(l);
}

/* Fast outside enter/exit: "an exit reaped before the registration is logged as an unknown pid
 * and lost", but registration still "works" for a child that exits later. */

TEST(watcher_fast_outside_enter_unknown_pid_logged)
{
    static struct logrec lr;
    ca_set_log_handler(rec_log, &lr);
    ca_loop *l = new_epoll();
    ca_child_watcher *w = wmake(W_FAST, l);
    pid_t pid = spawn_sh("exit 12");
    wait_exited(pid);
    CHECK(t_run_until(l, t_flag_set, &lr.n, 3.0));
    CHECK(strstr(lr.last, "unknown") != NULL || strstr(lr.last, "Unknown") != NULL);
    CHECK_EQ(lr.level, CA_LOG_WARNING); /* asyncio: logger.warning */
    struct wrec rec = {0};
    CHECK_OK(ca_child_watcher_add_child_handler(w, pid, wrec_cb, &rec));
    t_run_for(l, 0.05);
    CHECK_EQ(atomic_load(&rec.n), 0);
    /* A later child, registered outside enter/exit, is still delivered. */
    struct wrec r2[2];
    memset(r2, 0, sizeof r2);
    r2[1].tag = -1;
    pid_t p2 = spawn_sh("sleep 0.05; exit 3");
    CHECK_OK(ca_child_watcher_add_child_handler(w, p2, wrec_cb, &r2[0]));
    CHECK(t_run_until(l, wrec_all, r2, 3.0));
    CHECK_EQ(r2[0].rc, 3);
    wdone(w);
    loop_done(l);
}

/* Fast: statuses kept inside enter/exit for which no handler came are dropped at exit, with a
 * log ("exit statuses dropped"). */
TEST(watcher_fast_dropped_statuses_logged)
{
    static struct logrec lr;
    ca_set_log_handler(rec_log, &lr);
    ca_loop *l = new_epoll();
    ca_child_watcher *w = wmake(W_FAST, l);
    CHECK_OK(ca_child_watcher_enter(w));
    pid_t pid = spawn_sh("exit 4");
    wait_exited(pid);
    t_run_for(l, 0.05);
    CHECK_EQ(atomic_load(&lr.n), 0);
    CHECK_OK(ca_child_watcher_exit(w));
    t_run_for(l, 0.01);
    CHECK(atomic_load(&lr.n) >= 1);
    CHECK_EQ(lr.level, CA_LOG_WARNING);
    wdone(w);
    loop_done(l);
}

/* Log: "a child's loop closed before its exit was delivered". */
TEST(watcher_log_loop_closed_before_delivery)
{
    int kinds[] = {W_THREADED, W_MULTILOOP, W_PIDFD, W_URING};
    for (int i = 0; i < 4; i++) {
        static struct logrec lr;
        memset(&lr, 0, sizeof lr);
        ca_set_log_handler(rec_log, &lr);
        ca_loop *l = new_epoll();
        ca_child_watcher *w = wmake(kinds[i], l);
        if (!w) {
            loop_done(l);
            continue;
        }
        struct wrec rec = {0};
        pid_t pid = spawn_sh("sleep 0.05");
        CHECK_OK(ca_child_watcher_add_child_handler(w, pid, wrec_cb, &rec));
        CHECK_OK(ca_set_event_loop(NULL));
        CHECK_OK(ca_loop_close(l));
        wait_exited(pid);
        for (int j = 0; j < 100 && atomic_load(&lr.n) == 0; j++) sleep_s(0.01);
        if (atomic_load(&lr.n) < 1)
            t_fail(__FILE__, __LINE__, "%s: no log line for an exit whose loop closed", wname[kinds[i]]);
        /* asyncio's Threaded and MultiLoop: logger.warning("Loop %r that handles pid %r is
         * closed"); its Pidfd logs nothing (here: anything goes). */
        if (kinds[i] != W_PIDFD && kinds[i] != W_URING && lr.level != CA_LOG_WARNING)
            t_fail(__FILE__, __LINE__, "%s: level %d, want CA_LOG_WARNING: %s", wname[kinds[i]],
                   lr.level, lr.last);
        CHECK_EQ(atomic_load(&rec.n), 0);
        CHECK_OK(ca_child_watcher_close(w));
        ca_child_watcher_unref(w);
        ca_loop_unref(l);
        waitpid(pid, NULL, WNOHANG); /* pidfd: the removed child is ours to reap */
    }
}

/* "the default handler writes one line to stderr, and NULL silences it" */
static void fast_unknown_pid(void)
{
    ca_loop *l = new_epoll();
    ca_child_watcher *w = wmake(W_FAST, l);
    pid_t pid = spawn_sh("exit 12");
    wait_exited(pid);
    t_run_for(l, 0.1);
    wdone(w);
    loop_done(l);
}

TEST(log_default_handler_one_line_stderr)
{
    int saved;
    int rfd = capture_stderr_begin(&saved);
    fast_unknown_pid();
    char buf[4096];
    size_t n = capture_stderr_end(rfd, saved, buf, sizeof buf);
    int lines = 0;
    for (size_t i = 0; i < n; i++) lines += buf[i] == '\n';
    if (lines != 1) t_fail(__FILE__, __LINE__, "default handler wrote %d lines: [%s]", lines, buf);
    CHECK(n > 1 && buf[n - 1] == '\n');
}

TEST(log_null_handler_silences)
{
    ca_set_log_handler(NULL, NULL);
    int saved;
    int rfd = capture_stderr_begin(&saved);
    fast_unknown_pid();
    char buf[4096];
    size_t n = capture_stderr_end(rfd, saved, buf, sizeof buf);
    if (n != 0) t_fail(__FILE__, __LINE__, "NULL handler still wrote: [%s]", buf);
}

/* MultiLoop: "usable from any thread" — handlers added from two threads with their own loops. */
static void *ml_thread(void *arg)
{
    struct tdeliv *d = arg;
    CHECK_OK(ca_set_event_loop(d->loop));
    d->add_r = ca_child_watcher_add_child_handler(d->w, d->pid, tdeliv_cb, d);
    if (d->add_r == 0) t_run_until(d->loop, wrec_all, d->rec, 5.0);
    CHECK_OK(ca_set_event_loop(NULL));
    return NULL;
}

TEST(watcher_multiloop_any_thread_current_loop)
{
    ca_child_watcher *w = NULL;
    CHECK_OK(ca_multiloop_child_watcher_new(&w));
    struct tdeliv d[2];
    memset(d, 0, sizeof d);
    pthread_t t[2];
    for (int i = 0; i < 2; i++) {
        d[i].w = w;
        d[i].rec[1].tag = -1;
        d[i].loop = new_epoll();
        d[i].pid = spawn_sh(i ? "exit 1" : "exit 2");
        CHECK_EQ(pthread_create(&t[i], NULL, ml_thread, &d[i]), 0);
    }
    for (int i = 0; i < 2; i++) {
        pthread_join(t[i], NULL);
        CHECK_OK(d[i].add_r);
        CHECK_EQ(atomic_load(&d[i].rec[0].n), 1);
        CHECK_EQ(d[i].rec[0].rc, i ? 1 : 2);
        CHECK(d[i].cb_running == d[i].loop);
        loop_done(d[i].loop);
    }
    CHECK_OK(ca_child_watcher_close(w));
    ca_child_watcher_unref(w);
}

/* Custom watchers: "the public functions check arguments and the closed state before calling
 * an op". */
struct cw {
    int calls, closes, destroyed;
    bool active;
};
#define CW(self) ((struct cw *)ca_child_watcher_data(self))
static int cw_add(ca_child_watcher *self, pid_t pid, ca_child_fn cb, void *arg)
{
    CW(self)->calls++;
    return 0;
}
static int cw_rm(ca_child_watcher *self, pid_t pid)
{
    CW(self)->calls++;
    return 1;
}
static int cw_attach(ca_child_watcher *self, ca_loop *loop)
{
    CW(self)->calls++;
    return 0;
}
static bool cw_active(ca_child_watcher *self) { return CW(self)->active; }
static int cw_close(ca_child_watcher *self)
{
    CW(self)->closes++;
    return 0;
}
static int cw_enter(ca_child_watcher *self)
{
    CW(self)->calls++;
    return 0;
}
static void cw_destroy(ca_child_watcher *self) { CW(self)->destroyed++; }
static const ca_child_watcher_ops cw_ops = {
    .add_child_handler = cw_add,
    .remove_child_handler = cw_rm,
    .attach_loop = cw_attach,
    .is_active = cw_active,
    .close = cw_close,
    .enter = cw_enter,
    .exit = cw_enter,
    .destroy = cw_destroy,
};

TEST(watcher_custom_checks_before_ops)
{
    ca_child_watcher *w = SENT_W;
    CHECK_ERR(ca_child_watcher_new_custom(NULL, NULL, &w), -EINVAL);
    CHECK(w == SENT_W);
    CHECK_ERR(ca_child_watcher_new_custom(&cw_ops, NULL, NULL), -EINVAL);
    struct cw c = {.active = true};
    CHECK_OK(ca_child_watcher_new_custom(&cw_ops, &c, &w));
    CHECK(ca_child_watcher_data(w) == &c);
    CHECK_ERR(ca_child_watcher_add_child_handler(w, 0, wrec_cb, NULL), -EINVAL);
    CHECK_ERR(ca_child_watcher_add_child_handler(w, 1, NULL, NULL), -EINVAL);
    CHECK_ERR(ca_child_watcher_remove_child_handler(w, -2), -EINVAL);
    CHECK_EQ(c.calls, 0);
    CHECK_OK(ca_child_watcher_add_child_handler(w, 1, wrec_cb, NULL));
    CHECK_EQ(ca_child_watcher_remove_child_handler(w, 1), 1);
    CHECK_OK(ca_child_watcher_attach_loop(w, NULL));
    CHECK_OK(ca_child_watcher_enter(w));
    CHECK_OK(ca_child_watcher_exit(w));
    CHECK_EQ(c.calls, 5);
    CHECK(ca_child_watcher_is_active(w));
    CHECK_OK(ca_child_watcher_close(w));
    CHECK_EQ(c.closes, 1);
    CHECK_OK(ca_child_watcher_close(w));
    CHECK_EQ(c.closes, 1);
    c.calls = 0;
    CHECK_ERR(ca_child_watcher_add_child_handler(w, 1, wrec_cb, NULL), -EBADF);
    CHECK_ERR(ca_child_watcher_remove_child_handler(w, 1), -EBADF);
    CHECK_ERR(ca_child_watcher_attach_loop(w, NULL), -EBADF);
    CHECK_ERR(ca_child_watcher_enter(w), -EBADF);
    CHECK_ERR(ca_child_watcher_exit(w), -EBADF);
    CHECK(!ca_child_watcher_is_active(w));
    CHECK_EQ(c.calls, 0);
    ca_child_watcher_unref(w);
    CHECK_EQ(c.destroyed, 1);
}

/* A custom watcher as the policy's: set_child_watcher takes a reference, closes it when
 * replaced. */
TEST(watcher_custom_in_policy)
{
    struct cw c = {.active = true};
    ca_child_watcher *w = NULL;
    CHECK_OK(ca_child_watcher_new_custom(&cw_ops, &c, &w));
    CHECK_OK(ca_set_child_watcher(w));
    ca_child_watcher_unref(w);
    CHECK_EQ(c.destroyed, 0);
    ca_child_watcher *got = NULL;
    CHECK_OK(ca_get_child_watcher(&got));
    CHECK(got == w);
    CHECK_OK(ca_set_child_watcher(NULL));
    CHECK_EQ(c.closes, 1);
    CHECK_EQ(c.destroyed, 1);
}

/* MultiLoop "registers a SIGCHLD signal handler on instantiation" (until close); Pidfd: "no
 * signals, no threads". */
static int nthreads(void)
{
    int n = 0;
    FILE *f = fopen("/proc/self/status", "r");
    char line[256];
    while (f && fgets(line, sizeof line, f))
        if (sscanf(line, "Threads: %d", &n) == 1) break;
    if (f) fclose(f);
    return n;
}

TEST(watcher_multiloop_sigchld_handler_from_creation)
{
    struct sigaction before, during, after;
    sigaction(SIGCHLD, NULL, &before);
    CHECK(before.sa_handler == SIG_DFL);
    ca_child_watcher *w = NULL;
    CHECK_OK(ca_multiloop_child_watcher_new(&w));
    sigaction(SIGCHLD, NULL, &during);
    CHECK(during.sa_handler != SIG_DFL && during.sa_handler != SIG_IGN);
    CHECK_OK(ca_child_watcher_close(w));
    sigaction(SIGCHLD, NULL, &after);
    CHECK(after.sa_handler == SIG_DFL);
    ca_child_watcher_unref(w);
}

TEST(watcher_pidfd_no_signals_no_threads)
{
    ca_loop *l = new_epoll();
    ca_child_watcher *w = wmake(W_PIDFD, l);
    if (!w) SKIP("no pidfd");
    struct sigaction before, during;
    sigaction(SIGCHLD, NULL, &before);
    int t0 = nthreads();
    struct wrec rec[2];
    memset(rec, 0, sizeof rec);
    rec[1].tag = -1;
    pid_t pid = spawn_sh("sleep 0.05; exit 1");
    CHECK_OK(ca_child_watcher_add_child_handler(w, pid, wrec_cb, &rec[0]));
    CHECK_EQ(nthreads(), t0);
    sigaction(SIGCHLD, NULL, &during);
    CHECK(during.sa_handler == before.sa_handler);
    CHECK(t_run_until(l, wrec_all, rec, 5.0));
    CHECK_EQ(nthreads(), t0);
    wdone(w);
    loop_done(l);
}

/* Threaded, MultiLoop, Safe, Pidfd never reap a child they were not given: other code's
 * waitpid() keeps working. */
TEST(watcher_others_waitpid_undisturbed)
{
    ca_loop *l = new_epoll();
    int kinds[] = {W_THREADED, W_MULTILOOP, W_SAFE, W_PIDFD, W_URING};
    for (int i = 0; i < 5; i++) {
        ca_child_watcher *w = wmake(kinds[i], l);
        if (!w) continue;
        struct wrec rec[2];
        memset(rec, 0, sizeof rec);
        rec[1].tag = -1;
        pid_t mine = spawn_sh("sleep 0.05; exit 1");
        CHECK_OK(ca_child_watcher_add_child_handler(w, mine, wrec_cb, &rec[0]));
        pid_t other = spawn_sh("exit 9");
        wait_exited(other);
        CHECK(t_run_until(l, wrec_all, rec, 5.0));
        t_run_for(l, 0.02);
        int st = 0;
        pid_t r = waitpid(other, &st, WNOHANG);
        if (r != other) t_fail(__FILE__, __LINE__, "%s reaped a child it was not given", wname[kinds[i]]);
        CHECK(WIFEXITED(st) && WEXITSTATUS(st) == 9);
        wdone(w);
    }
    loop_done(l);
}

/* The loop's own SIGCHLD handler and MultiLoop's share the process-wide fan-out: adding and
 * removing a loop's SIGCHLD handler does not break MultiLoop, nor does a Safe watcher's detach. */
TEST(watcher_multiloop_with_loop_sigchld_handler)
{
    ca_loop *l = new_epoll();
    ca_child_watcher *w = wmake(W_MULTILOOP, l);
    int n = 0;
    CHECK_OK(ca_loop_add_signal_handler(l, SIGCHLD, count_cb, &n));
    CHECK_EQ(ca_loop_remove_signal_handler(l, SIGCHLD), 1);
    ca_child_watcher *safe = NULL;
    CHECK_OK(ca_safe_child_watcher_new(&safe));
    CHECK_OK(ca_child_watcher_attach_loop(safe, l));
    CHECK_OK(ca_child_watcher_close(safe));
    ca_child_watcher_unref(safe);
    struct wrec rec[2];
    memset(rec, 0, sizeof rec);
    rec[1].tag = -1;
    pid_t pid = spawn_sh("sleep 0.02; exit 3");
    CHECK_OK(ca_child_watcher_add_child_handler(w, pid, wrec_cb, &rec[0]));
    CHECK(t_run_until(l, wrec_all, rec, 5.0));
    CHECK_EQ(rec[0].rc, 3);
    wdone(w);
    loop_done(l);
}

/* "deliver to the loop running in the thread that added the handler, or, when none runs there,
 * to that thread's current loop": running wins over current. */
struct rvc {
    ca_child_watcher *w;
    ca_loop *run;
    pid_t pid;
    int add_r;
    struct wrec rec[2];
    ca_loop *cb_loop;
};
static void rvc_cb(pid_t pid, int rc, void *arg)
{
    struct rvc *x = arg;
    x->cb_loop = ca_get_running_loop();
    wrec_cb(pid, rc, &x->rec[0]);
}
static void rvc_add(void *arg)
{
    struct rvc *x = arg;
    x->add_r = ca_child_watcher_add_child_handler(x->w, x->pid, rvc_cb, x);
}

TEST(watcher_running_loop_wins_over_current)
{
    int kinds[] = {W_THREADED, W_MULTILOOP, W_PIDFD};
    ca_loop *cur = new_epoll();
    CHECK_OK(ca_set_event_loop(cur));
    for (int i = 0; i < 3; i++) {
        struct rvc x;
        memset(&x, 0, sizeof x);
        x.rec[1].tag = -1;
        int r = wnew(kinds[i], &x.w);
        if (r == -ENOSYS) continue;
        CHECK_OK(r);
        x.run = new_epoll();
        x.pid = spawn_sh("sleep 0.02; exit 2");
        CHECK_OK(ca_loop_call_soon(x.run, rvc_add, &x, NULL));
        run_once(x.run);
        CHECK_OK(x.add_r);
        if (!t_run_until(x.run, wrec_all, x.rec, 5.0))
            t_fail(__FILE__, __LINE__, "%s: not delivered to the running loop", wname[kinds[i]]);
        if (kinds[i] != W_THREADED && kinds[i] != W_MULTILOOP) CHECK(x.cb_loop == x.run);
        CHECK_OK(ca_child_watcher_close(x.w));
        ca_child_watcher_unref(x.w);
        loop_done(x.run);
    }
    CHECK_OK(ca_set_event_loop(NULL));
    loop_done(cur);
}

/* Threads whose name is "ca-wait-" and a pid: the waiting threads. */
static int wait_threads(void)
{
    int n = 0;
    DIR *d = opendir("/proc/self/task");
    struct dirent *e;
    while (d && (e = readdir(d)) != NULL) {
        if (e->d_name[0] == '.') continue;
        char path[300], comm[32] = "";
        snprintf(path, sizeof path, "/proc/self/task/%s/comm", e->d_name);
        FILE *f = fopen(path, "r");
        if (!f) continue;
        if (fgets(comm, sizeof comm, f) && strncmp(comm, "ca-wait-", 8) == 0 &&
            comm[8] >= '0' && comm[8] <= '9')
            n++;
        fclose(f);
    }
    if (d) closedir(d);
    return n;
}

/* Threaded = "one waiting thread per child" (each named after its pid once it runs), and one
 * posting thread per process besides. */
TEST(watcher_threaded_one_thread_per_child)
{
    ca_loop *l = new_epoll();
    ca_child_watcher *w = wmake(W_THREADED, l);
    int t0 = nthreads();
    struct wrec rec[4];
    memset(rec, 0, sizeof rec);
    rec[3].tag = -1;
    for (int i = 0; i < 3; i++) {
        pid_t pid = spawn_sh("sleep 0.5");
        CHECK_OK(ca_child_watcher_add_child_handler(w, pid, wrec_cb, &rec[i]));
    }
    int d = nthreads() - t0;
    /* + the posting thread; ThreadSanitizer may start its own background thread */
    CHECK(d == 4 || d == 5);
    double start = ca_loop_time(l);
    while (wait_threads() < 3 && ca_loop_time(l) - start < 0.4) sleep_s(0.002);
    CHECK_EQ(wait_threads(), 3);
    CHECK(t_run_until(l, wrec_all, rec, 5.0));
    wdone(w);
    loop_done(l);
}

/* Watchers in a forked child (header: -ECHILD, close/unref free memory only); the parent's
 * watcher keeps working. */
TEST(watcher_fork_child_echild)
{
    ca_loop *l = new_epoll();
    for (int k = 0; k < W_COUNT; k++) {
        ca_child_watcher *w = wmake(k, l);
        if (!w) continue;
        pid_t pid = fork();
        if (pid == 0) {
            int bad = 0;
            if (ca_child_watcher_add_child_handler(w, 1, wrec_cb, NULL) != -ECHILD) bad |= 1;
            if (ca_child_watcher_remove_child_handler(w, 1) != -ECHILD) bad |= 2;
            if (ca_child_watcher_is_active(w)) bad |= 4;
            if (ca_child_watcher_add_child_handler(w, 0, wrec_cb, NULL) != -EINVAL) bad |= 8;
            if (ca_child_watcher_close(w) != 0) bad |= 16;
            ca_child_watcher_unref(w);
            t_child_exit(bad);
        }
        int st;
        while (waitpid(pid, &st, 0) < 0 && errno == EINTR) {
        }
        /* Fast may have reaped our test child itself: then its status is lost to us. */
        if (k != W_FAST) {
            CHECK(WIFEXITED(st));
            if (WEXITSTATUS(st) != 0) t_fail(__FILE__, __LINE__, "%s: child bits %d", wname[k], WEXITSTATUS(st));
        }
        struct wrec rec[2];
        memset(rec, 0, sizeof rec);
        rec[1].tag = -1;
        pid_t c = spawn_sh("exit 5");
        CHECK_OK(ca_child_watcher_add_child_handler(w, c, wrec_cb, &rec[0]));
        if (!t_run_until(l, wrec_all, rec, 5.0)) t_fail(__FILE__, __LINE__, "%s: broken by the child", wname[k]);
        CHECK_EQ(rec[0].rc, 5);
        wdone(w);
    }
    loop_done(l);
}

/* bpo-32115 (header): an inherited SIGCHLD SIG_IGN would make the kernel reap children; the
 * watchers set SIG_DFL while active, so return codes are still read. */
TEST(watcher_sigchld_ignored_still_reads_status)
{
    ca_set_log_handler(quiet_log, NULL);
    signal(SIGCHLD, SIG_IGN);
    ca_loop *l = new_epoll();
    ca_child_watcher *w = wmake(W_THREADED, l);
    struct wrec rec[2];
    memset(rec, 0, sizeof rec);
    rec[1].tag = -1;
    pid_t c = spawn_sh("exit 5");
    CHECK_OK(ca_child_watcher_add_child_handler(w, c, wrec_cb, &rec[0]));
    CHECK(t_run_until(l, wrec_all, rec, 5.0));
    CHECK_EQ(rec[0].rc, 5);
    wdone(w);
    loop_done(l);
    struct sigaction sa;
    sigaction(SIGCHLD, NULL, &sa);
    CHECK(sa.sa_handler == SIG_IGN);
    signal(SIGCHLD, SIG_DFL);
}

/* "everything in ... Child watchers ... is safe from any thread": several threads, each with
 * its own loop, share one Threaded and one MultiLoop watcher. */
struct mt {
    ca_child_watcher *w[2];
    int ok;
};
static void *mt_thread(void *arg)
{
    struct mt *m = arg;
    ca_loop *l = NULL;
    CHECK_OK(ca_poll_loop_new(&l));
    CHECK_OK(ca_set_event_loop(l));
    enum { N = 4 };
    struct wrec rec[2 * N + 1];
    memset(rec, 0, sizeof rec);
    rec[2 * N].tag = -1;
    for (int i = 0; i < 2 * N; i++) {
        pid_t pid = spawn_sh(i % 2 ? "exit 3" : "sleep 0.01; exit 3");
        CHECK_OK(ca_child_watcher_add_child_handler(m->w[i % 2], pid, wrec_cb, &rec[i]));
    }
    bool all = t_run_until(l, wrec_all, rec, 10.0);
    t_run_for(l, 0.02);
    int good = all;
    for (int i = 0; i < 2 * N; i++) good &= atomic_load(&rec[i].n) == 1 && rec[i].rc == 3;
    m->ok = good;
    CHECK_OK(ca_set_event_loop(NULL));
    loop_done(l);
    return NULL;
}

TEST(watcher_shared_by_threads) /* timeout: 60 */
{
    ca_child_watcher *a = NULL, *b = NULL;
    CHECK_OK(ca_threaded_child_watcher_new(&a));
    CHECK_OK(ca_multiloop_child_watcher_new(&b));
    struct mt m[3];
    pthread_t t[3];
    for (int i = 0; i < 3; i++) {
        m[i].w[0] = a;
        m[i].w[1] = b;
        m[i].ok = 0;
        CHECK_EQ(pthread_create(&t[i], NULL, mt_thread, &m[i]), 0);
    }
    for (int i = 0; i < 3; i++) {
        pthread_join(t[i], NULL);
        if (!m[i].ok) t_fail(__FILE__, __LINE__, "thread %d: exits lost or duplicated", i);
    }
    CHECK_OK(ca_child_watcher_close(a));
    CHECK_OK(ca_child_watcher_close(b));
    ca_child_watcher_unref(a);
    ca_child_watcher_unref(b);
}

/* Seed: attach_loop "If the watcher was previously attached to an event loop, then it is first
 * detached before attaching to the new loop": Safe/Fast deliver on the new loop. */
TEST(watcher_safe_fast_reattach)
{
    for (int k = W_SAFE; k <= W_FAST; k++) {
        ca_loop *a = new_epoll(), *b = NULL;
        CHECK_OK(ca_poll_loop_new(&b));
        ca_child_watcher *w = NULL;
        CHECK_OK(wnew(k, &w));
        CHECK_OK(ca_child_watcher_attach_loop(w, a));
        struct wrec rec[2];
        memset(rec, 0, sizeof rec);
        rec[1].tag = -1;
        pid_t pid = spawn_sh("sleep 0.05; exit 6");
        CHECK_OK(ca_child_watcher_add_child_handler(w, pid, wrec_cb, &rec[0]));
        CHECK_OK(ca_child_watcher_attach_loop(w, b));
        wait_exited(pid);
        t_run_for(a, 0.05);
        CHECK_EQ(atomic_load(&rec[0].n), 0); /* not through the old loop */
        if (!t_run_until(b, wrec_all, rec, 5.0)) t_fail(__FILE__, __LINE__, "%s: not delivered on the new loop", wname[k]);
        CHECK_EQ(rec[0].rc, 6);
        CHECK_OK(ca_child_watcher_close(w));
        ca_child_watcher_unref(w);
        loop_done(a);
        loop_done(b);
    }
}

/* Closing a watcher cancels its handlers: no callback after close. */
LOOP_TEST(watcher_close_cancels_handlers)
{
    ca_set_log_handler(quiet_log, NULL);
    for (int k = 0; k < W_COUNT; k++) {
        ca_child_watcher *w = wmake(k, loop);
        if (!w) continue;
        struct wrec rec = {0};
        pid_t pid = spawn_sh("sleep 0.05");
        CHECK_OK(ca_child_watcher_add_child_handler(w, pid, wrec_cb, &rec));
        CHECK_OK(ca_child_watcher_close(w));
        wait_exited(pid);
        t_run_for(loop, 0.05);
        if (atomic_load(&rec.n) != 0) t_fail(__FILE__, __LINE__, "%s: callback after close", wname[k]);
        waitpid(pid, NULL, WNOHANG);
        ca_child_watcher_unref(w);
        CHECK_OK(ca_set_event_loop(NULL));
        sleep_s(0.02);
        waitpid(pid, NULL, WNOHANG);
    }
}

/* Threaded/MultiLoop/Pidfd: a current loop that is closed does not count (header: -ENOENT). */
static void *closed_current_thread(void *arg)
{
    ca_child_watcher *w = arg;
    ca_loop *l = new_epoll();
    CHECK_OK(ca_set_event_loop(l));
    CHECK_OK(ca_loop_close(l));
    intptr_t r = ca_child_watcher_add_child_handler(w, getpid(), wrec_cb, NULL);
    CHECK_OK(ca_set_event_loop(NULL));
    ca_loop_unref(l);
    return (void *)r;
}

TEST(watcher_closed_current_loop_enoent)
{
    int kinds[] = {W_THREADED, W_MULTILOOP, W_PIDFD, W_URING};
    for (int i = 0; i < 4; i++) {
        ca_child_watcher *w = NULL;
        if (wnew(kinds[i], &w) == -ENOSYS) continue;
        pthread_t t;
        void *res = NULL;
        CHECK_EQ(pthread_create(&t, NULL, closed_current_thread, w), 0);
        pthread_join(t, &res);
        if ((intptr_t)res != -ENOENT)
            t_fail(__FILE__, __LINE__, "%s: got %d", wname[kinds[i]], (int)(intptr_t)res);
        CHECK_OK(ca_child_watcher_close(w));
        ca_child_watcher_unref(w);
    }
}
