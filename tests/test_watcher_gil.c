/*
 * Host loops (issue 13): a custom loop shaped like an asyncio adapter. Every op takes a mutex of
 * the host's own (a stand-in for Python's GIL), and an op called by a thread that already holds
 * it hands it to another thread first (releases it, lets others run, takes it back), as Python
 * does when it switches threads. Other threads hold that mutex while they call into the watcher
 * (add, remove, spawning real children). The loop is run by the host's own thread and is never
 * "running" in C terms, so the watchers call its ops from any thread (add_child_handler_on).
 * SIGCHLD is owned by the host: its handler wakes the host loop and calls ca_sigchld_notify.
 *
 * Before the lock-order rule held, the watcher's core called ops with its mutex held: the op
 * handed the GIL to a thread that then blocked on that mutex while holding the GIL, and both
 * waited for ever (the harness's timeout).
 */
#include "harness.h"

#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <spawn.h>
#include <stdatomic.h>
#include <sys/wait.h>
#include <time.h>

extern char **environ;

/* ----- the GIL --------------------------------------------------------------------------- */

static pthread_mutex_t gil = PTHREAD_MUTEX_INITIALIZER;
static _Thread_local int gil_held; /* this thread holds the GIL (depth) */

static void gil_take(void)
{
    pthread_mutex_lock(&gil);
    gil_held = 1;
}

static void gil_drop(void)
{
    gil_held = 0;
    pthread_mutex_unlock(&gil);
}

/* What every op does first: a thread that holds the GIL hands it over (and takes it back), a
 * library thread takes it. Returns whether the op must drop it when done. */
static bool op_enter(void)
{
    if (gil_held) {
        gil_drop();
        sched_yield();
        gil_take();
        return false;
    }
    gil_take();
    return true;
}

static void op_leave(bool drop)
{
    if (drop) gil_drop();
}

/* ----- the host loop (all of it under the GIL) ------------------------------------------- */

struct hreader {
    int fd;
    ca_callback_fn fn;
    void *arg;
};

struct htimer {
    double when;
    ca_handle *h;
};

struct host {
    ca_handle **ready;
    size_t nready, cap;
    struct htimer *timers;
    size_t ntimers, tcap;
    struct hreader readers[512];
    size_t nreaders;
    ca_callback_fn sig_fn; /* SIGCHLD only, the one signal the watchers ask for */
    void *sig_arg;
    bool stopping;
    bool host_closed; /* closed by the host, behind the core's back (is_closed) */
    int wake[2];
};

static struct host *H(ca_loop *l) { return ca_loop_data(l); }
static atomic_int sigchld_flag;
static int sig_wake_fd = -1;

static void host_wake(struct host *h)
{
    char b = 1;
    ssize_t w = write(h->wake[1], &b, 1);
    (void)w;
}

static int push_ready(struct host *h, ca_handle *hd)
{
    if (h->nready == h->cap) {
        size_t c = h->cap ? h->cap * 2 : 64;
        ca_handle **n = realloc(h->ready, c * sizeof *n);
        if (!n) return -ENOMEM;
        h->ready = n;
        h->cap = c;
    }
    h->ready[h->nready++] = ca_handle_ref(hd);
    return 0;
}

static int h_call_soon(ca_loop *self, ca_handle *hd)
{
    bool d = op_enter();
    int r = push_ready(H(self), hd);
    host_wake(H(self));
    op_leave(d);
    return r;
}

/* Allocation-failure injection: the next fail_posts thread-safe posts fail with -ENOMEM, as
 * a post whose queue cannot grow does. */
static atomic_int fail_posts;
static atomic_int failed_posts;

static int h_call_soon_threadsafe(ca_loop *self, ca_handle *hd)
{
    int n = atomic_load(&fail_posts);
    while (n > 0 && !atomic_compare_exchange_weak(&fail_posts, &n, n - 1)) {
    }
    if (n > 0) {
        atomic_fetch_add(&failed_posts, 1);
        return -ENOMEM;
    }
    return h_call_soon(self, hd);
}

static int h_call_at(ca_loop *self, double when, ca_handle *hd)
{
    bool d = op_enter();
    struct host *h = H(self);
    int r = 0;
    if (h->ntimers == h->tcap) {
        size_t c = h->tcap ? h->tcap * 2 : 16;
        struct htimer *n = realloc(h->timers, c * sizeof *n);
        if (!n) r = -ENOMEM;
        else {
            h->timers = n;
            h->tcap = c;
        }
    }
    if (r == 0) h->timers[h->ntimers++] = (struct htimer){when, ca_handle_ref(hd)};
    host_wake(h);
    op_leave(d);
    return r;
}

static int h_add_reader(ca_loop *self, int fd, ca_callback_fn fn, void *arg)
{
    bool d = op_enter();
    struct host *h = H(self);
    int r = 0;
    size_t i = 0;
    while (i < h->nreaders && h->readers[i].fd != fd) i++;
    if (i == h->nreaders) {
        if (h->nreaders == sizeof h->readers / sizeof h->readers[0]) r = -ENOMEM;
        else h->nreaders++;
    }
    if (r == 0) h->readers[i] = (struct hreader){fd, fn, arg};
    host_wake(h);
    op_leave(d);
    return r;
}

static int h_remove_reader(ca_loop *self, int fd)
{
    bool d = op_enter();
    struct host *h = H(self);
    int found = 0;
    for (size_t i = 0; i < h->nreaders; i++) {
        if (h->readers[i].fd == fd) {
            h->readers[i] = h->readers[--h->nreaders];
            found = 1;
            break;
        }
    }
    op_leave(d);
    return found;
}

static int h_add_signal_handler(ca_loop *self, int sig, ca_callback_fn fn, void *arg)
{
    if (sig != SIGCHLD) return -EINVAL;
    bool d = op_enter();
    H(self)->sig_fn = fn;
    H(self)->sig_arg = arg;
    op_leave(d);
    return 0;
}

static int h_remove_signal_handler(ca_loop *self, int sig)
{
    bool d = op_enter();
    int had = H(self)->sig_fn != NULL;
    H(self)->sig_fn = NULL;
    op_leave(d);
    return had;
}

static void h_stop(ca_loop *self)
{
    bool d = op_enter();
    H(self)->stopping = true;
    host_wake(H(self));
    op_leave(d);
}

static bool h_is_closed(ca_loop *self)
{
    bool d = op_enter();
    bool c = H(self)->host_closed;
    op_leave(d);
    return c;
}

static void drop_all(struct host *h)
{
    for (size_t i = 0; i < h->nready; i++) ca_handle_unref(h->ready[i]);
    h->nready = 0;
    for (size_t i = 0; i < h->ntimers; i++) ca_handle_unref(h->timers[i].h);
    h->ntimers = 0;
    h->nreaders = 0;
    h->sig_fn = NULL;
}

static int h_close(ca_loop *self)
{
    bool d = op_enter();
    drop_all(H(self));
    op_leave(d);
    return 0;
}

static void h_destroy(ca_loop *self)
{
    struct host *h = H(self);
    drop_all(h);
    free(h->ready);
    free(h->timers);
    close(h->wake[0]);
    close(h->wake[1]);
    free(h);
}

/* run_forever is required by the core, but the host runs its loop itself (host_run). */
static int h_run_forever(ca_loop *self) { return -ENOTSUP; }

static const ca_loop_ops host_ops = {
    .run_forever = h_run_forever,
    .stop = h_stop,
    .close = h_close,
    .call_soon = h_call_soon,
    .call_soon_threadsafe = h_call_soon_threadsafe, /* every op takes the GIL: thread-safe */
    .call_at = h_call_at,
    .add_reader = h_add_reader,
    .remove_reader = h_remove_reader,
    .add_signal_handler = h_add_signal_handler,
    .remove_signal_handler = h_remove_signal_handler,
    .destroy = h_destroy,
    .is_closed = h_is_closed,
};

static int host_new(ca_loop **out)
{
    struct host *h = calloc(1, sizeof *h);
    if (!h) return -ENOMEM;
    if (pipe2(h->wake, O_CLOEXEC | O_NONBLOCK) < 0) {
        free(h);
        return -errno;
    }
    int r = ca_loop_new_custom(&host_ops, h, out);
    if (r < 0) {
        close(h->wake[0]);
        close(h->wake[1]);
        free(h);
    }
    return r;
}

/* The host's SIGCHLD handler: wakes the host loop, and routes the signal to the library. */
static void host_sigchld(int sig)
{
    int e = errno;
    atomic_store(&sigchld_flag, 1);
    if (sig_wake_fd >= 0) {
        char b = 1;
        ssize_t w = write(sig_wake_fd, &b, 1);
        (void)w;
    }
    ca_sigchld_notify();
    errno = e;
}

/* One iteration of the host loop; called with the GIL held, drops it while it waits. */
static void host_iterate(ca_loop *loop, int max_ms)
{
    struct host *h = H(loop);
    /* due timers */
    double now = ca_loop_time(loop);
    for (size_t i = 0; i < h->ntimers;) {
        if (h->timers[i].when <= now) {
            ca_handle *t = h->timers[i].h;
            h->timers[i] = h->timers[--h->ntimers];
            push_ready(h, t);
            ca_handle_unref(t);
        } else {
            i++;
        }
    }
    if (atomic_exchange(&sigchld_flag, 0)) {
        if (h->sig_fn) h->sig_fn(h->sig_arg);
    }
    /* the ready ones, taken as a batch: callbacks may schedule more */
    size_t n = h->nready;
    ca_handle **batch = malloc((n ? n : 1) * sizeof *batch);
    CHECK(batch != NULL);
    if (n) memcpy(batch, h->ready, n * sizeof *batch);
    h->nready = 0;
    for (size_t i = 0; i < n; i++) {
        ca_handle_run(batch[i]);
        ca_handle_unref(batch[i]);
    }
    free(batch);
    /* wait, without the GIL */
    struct pollfd p[1 + 512];
    ca_callback_fn fns[512];
    void *args[512];
    size_t nr = h->nreaders;
    p[0] = (struct pollfd){.fd = h->wake[0], .events = POLLIN};
    for (size_t i = 0; i < nr; i++) {
        p[1 + i] = (struct pollfd){.fd = h->readers[i].fd, .events = POLLIN};
        fns[i] = h->readers[i].fn;
        args[i] = h->readers[i].arg;
    }
    int timeout = h->nready ? 0 : max_ms;
    gil_drop();
    int k = poll(p, 1 + nr, timeout);
    gil_take();
    if (k <= 0) return;
    if (p[0].revents) {
        char buf[256];
        while (read(h->wake[0], buf, sizeof buf) > 0) {
        }
    }
    for (size_t i = 0; i < nr; i++) {
        if (!(p[1 + i].revents & (POLLIN | POLLHUP | POLLERR))) continue;
        /* still the same reader? (another thread may have removed it while we waited) */
        for (size_t j = 0; j < h->nreaders; j++) {
            if (h->readers[j].fd == p[1 + i].fd && h->readers[j].fn == fns[i] &&
                h->readers[j].arg == args[i]) {
                fns[i](args[i]);
                break;
            }
        }
    }
}

/* ----- the stress ------------------------------------------------------------------------- */

#define NPIDS 4096

struct run {
    ca_loop *loop;
    ca_child_watcher *w;
    atomic_bool stop;
    /* under the GIL */
    int delivered[NPIDS];
    int expect_rc[NPIDS];
    int removed[NPIDS];
    pid_t pids[NPIDS];
    atomic_int npids;
    int bad;
};

static struct run *R;

static int slot_of(pid_t pid)
{
    int n = atomic_load(&R->npids);
    for (int i = n - 1; i >= 0; i--)
        if (R->pids[i] == pid) return i;
    return -1;
}

/* Runs on the host loop's thread, with the GIL. */
static void on_exit_cb(pid_t pid, int rc, void *arg)
{
    int i = (int)(intptr_t)arg;
    if (R->pids[i] != pid || R->removed[i] == 1 || R->expect_rc[i] != rc) R->bad++;
    R->delivered[i]++;
}

static pid_t spawn(int code)
{
    char arg[32];
    snprintf(arg, sizeof arg, "exit %d", code);
    char *argv[] = {"sh", "-c", arg, NULL};
    pid_t pid;
    if (posix_spawn(&pid, "/bin/sh", NULL, NULL, argv, environ) != 0) return -1;
    return pid;
}

static void *worker(void *arg)
{
    unsigned seed = (unsigned)(uintptr_t)arg;
    sigset_t all;
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, NULL); /* SIGCHLD goes to the host's loop thread */
    gil_take();
    while (!atomic_load(&R->stop)) {
        int i = atomic_load(&R->npids);
        if (i >= NPIDS - 1) break;
        int code = (int)(rand_r(&seed) % 8);
        /* asyncio's `with watcher:` around the spawn: Fast keeps an early exit for the add. */
        CHECK_OK(ca_child_watcher_enter(R->w));
        pid_t pid = spawn(code);
        if (pid < 0) {
            ca_child_watcher_exit(R->w);
            break;
        }
        R->pids[i] = pid;
        R->expect_rc[i] = code;
        atomic_store(&R->npids, i + 1);
        int r = ca_child_watcher_add_child_handler_on(R->w, R->loop, pid, on_exit_cb,
                                                      (void *)(intptr_t)i);
        CHECK_OK(ca_child_watcher_exit(R->w));
        if (r < 0) {
            R->bad++;
            break;
        }
        if (rand_r(&seed) % 4 == 0) {
            /* A removal racing with the exit: 1 means the callback will never come. */
            r = ca_child_watcher_remove_child_handler(R->w, pid);
            if (r == 1) {
                R->removed[i] = 1;
                gil_drop();
                /* The remover reaps (Threaded and Fast may have already: ECHILD). */
                while (waitpid(pid, NULL, 0) < 0 && errno == EINTR) {
                }
                gil_take();
            }
        }
        /* Python switches threads every few milliseconds. */
        if (rand_r(&seed) % 2) {
            gil_drop();
            sched_yield();
            gil_take();
        }
    }
    gil_drop();
    return NULL;
}

static bool all_settled(void)
{
    int n = atomic_load(&R->npids);
    for (int i = 0; i < n; i++)
        if (!R->removed[i] && R->delivered[i] == 0) return false;
    return true;
}

static void quiet_log(int level, const char *msg, void *arg) {}

static void run_kind(int (*make)(ca_child_watcher **), bool attach, double seconds)
{
    R = calloc(1, sizeof *R);
    CHECK(R != NULL);
    ca_set_log_handler(quiet_log, NULL); /* Fast logs the removed children it reaps */
    CHECK_OK(host_new(&R->loop));
    CHECK_OK(make(&R->w));
    gil_take();
    if (attach) CHECK_OK(ca_child_watcher_attach_loop(R->w, R->loop));
    gil_drop();
    /* The host owns SIGCHLD from now on (after the watcher: MultiLoop installed its own). */
    sig_wake_fd = H(R->loop)->wake[1];
    struct sigaction sa, old;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = host_sigchld;
    sa.sa_flags = SA_RESTART | SA_NOCLDSTOP;
    sigemptyset(&sa.sa_mask);
    CHECK(sigaction(SIGCHLD, &sa, &old) == 0);

    enum { NW = 4 };
    pthread_t t[NW];
    for (int i = 0; i < NW; i++)
        CHECK(pthread_create(&t[i], NULL, worker, (void *)(uintptr_t)(i * 7919 + 1)) == 0);
    struct timespec t0;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    gil_take();
    for (;;) {
        host_iterate(R->loop, 5);
        struct timespec t1;
        clock_gettime(CLOCK_MONOTONIC, &t1);
        double dt = (t1.tv_sec - t0.tv_sec) + (t1.tv_nsec - t0.tv_nsec) / 1e9;
        if (dt > seconds) break;
    }
    atomic_store(&R->stop, true);
    /* The workers may be waiting for the GIL: keep the loop turning while they finish. */
    gil_drop();
    for (int i = 0; i < NW; i++) {
        gil_take();
        host_iterate(R->loop, 1);
        gil_drop();
        pthread_join(t[i], NULL);
    }
    gil_take();
    struct timespec t2;
    clock_gettime(CLOCK_MONOTONIC, &t2);
    while (!all_settled()) {
        host_iterate(R->loop, 10);
        struct timespec t3;
        clock_gettime(CLOCK_MONOTONIC, &t3);
        if ((t3.tv_sec - t2.tv_sec) > 10 * t_slow()) break;
    }
    int n = atomic_load(&R->npids);
    int lost = 0, dup = 0;
    for (int i = 0; i < n; i++) {
        if (!R->removed[i] && R->delivered[i] == 0) lost++;
        if (R->delivered[i] > 1) dup++;
    }
    gil_drop();
    CHECK(n > 20);
    CHECK_EQ(lost, 0);
    CHECK_EQ(dup, 0);
    CHECK_EQ(R->bad, 0);
    (void)slot_of;

    gil_take();
    CHECK_OK(ca_child_watcher_close(R->w));
    gil_drop();
    sigaction(SIGCHLD, &old, NULL);
    sig_wake_fd = -1;
    ca_child_watcher_unref(R->w);
    gil_take();
    CHECK_OK(ca_loop_close(R->loop));
    gil_drop();
    ca_loop_unref(R->loop);
    /* Children removed and reaped by Threaded's threads or Fast: nothing left to reap. */
    while (waitpid(-1, NULL, WNOHANG) > 0) {
    }
    ca_set_log_handler(NULL, NULL);
    free(R);
}

TEST(hostloop_gil_threaded) /* timeout: 60 */
{
    run_kind(ca_threaded_child_watcher_new, false, 2.0);
}

TEST(hostloop_gil_multiloop) /* timeout: 60 */
{
    run_kind(ca_multiloop_child_watcher_new, false, 2.0);
}

TEST(hostloop_gil_pidfd) /* timeout: 60 */
{
    ca_child_watcher *w;
    int r = ca_pidfd_child_watcher_new(&w);
    if (r == -ENOSYS) SKIP("no pidfd_open here");
    CHECK_OK(r);
    ca_child_watcher_unref(w);
    run_kind(ca_pidfd_child_watcher_new, false, 2.0);
}

TEST(hostloop_gil_uring) /* timeout: 60 */
{
    ca_child_watcher *w;
    int r = ca_uring_child_watcher_new(&w);
    if (r == -ENOSYS) SKIP("no IORING_OP_WAITID here");
    CHECK_OK(r);
    ca_child_watcher_unref(w);
    run_kind(ca_uring_child_watcher_new, false, 2.0);
}

TEST(hostloop_gil_safe) /* timeout: 60 */
{
    run_kind(ca_safe_child_watcher_new, true, 2.0);
}

TEST(hostloop_gil_fast) /* timeout: 60 */
{
    run_kind(ca_fast_child_watcher_new, true, 2.0);
}

/* ----- an exit whose post fails for memory is kept and posted again ------------------------ */

static atomic_int ok_calls;
static int ok_rc[8];

static void rec_cb(pid_t pid, int rc, void *arg)
{
    ok_rc[(intptr_t)arg] = rc;
    atomic_fetch_add(&ok_calls, 1);
}

static void post_enomem(int (*make)(ca_child_watcher **))
{
    ca_loop *loop;
    ca_child_watcher *w;
    CHECK_OK(host_new(&loop));
    CHECK_OK(make(&w));
    atomic_store(&ok_calls, 0);
    atomic_store(&failed_posts, 0);
    atomic_store(&fail_posts, 12); /* every first try fails, and some retries */
    for (int i = 0; i < 8; i++) {
        pid_t pid = spawn(i);
        CHECK(pid > 0);
        CHECK_OK(ca_child_watcher_add_child_handler_on(w, loop, pid, rec_cb, (void *)(intptr_t)i));
    }
    gil_take();
    for (int k = 0; k < 2000 && atomic_load(&ok_calls) < 8; k++) host_iterate(loop, 10);
    gil_drop();
    CHECK_EQ(atomic_load(&ok_calls), 8);
    CHECK(atomic_load(&failed_posts) >= 8);
    for (int i = 0; i < 8; i++) CHECK_EQ(ok_rc[i], i);
    gil_take();
    for (int k = 0; k < 20; k++) host_iterate(loop, 1); /* a duplicate would come now */
    gil_drop();
    CHECK_EQ(atomic_load(&ok_calls), 8);
    CHECK_OK(ca_child_watcher_close(w));
    ca_child_watcher_unref(w);
    CHECK_OK(ca_loop_close(loop));
    ca_loop_unref(loop);
}

TEST(hostloop_post_enomem_threaded) /* timeout: 60 */
{
    post_enomem(ca_threaded_child_watcher_new);
}

TEST(hostloop_post_enomem_multiloop) /* timeout: 60 */
{
    post_enomem(ca_multiloop_child_watcher_new);
}

/* ----- a loop its host closed behind the core's back ---------------------------------------- */

static atomic_int closed_lines;
static void closed_log(int level, const char *msg, void *arg)
{
    if (level == CA_LOG_WARNING && strstr(msg, "is closed")) atomic_fetch_add(&closed_lines, 1);
}

static void never_cb(pid_t pid, int rc, void *arg) { atomic_fetch_add(&ok_calls, 1); }

TEST(hostloop_closed_by_host) /* timeout: 60 */
{
    ca_set_log_handler(closed_log, NULL);
    int (*makers[])(ca_child_watcher **) = {ca_threaded_child_watcher_new,
                                            ca_multiloop_child_watcher_new};
    for (int k = 0; k < 2; k++) {
        ca_loop *loop;
        ca_child_watcher *w;
        CHECK_OK(host_new(&loop));
        CHECK_OK(makers[k](&w));
        atomic_store(&ok_calls, 0);
        atomic_store(&closed_lines, 0);
        int gate[2];
        CHECK(pipe2(gate, O_CLOEXEC) == 0);
        CHECK(fcntl(gate[0], F_SETFD, 0) == 0);
        char fd[16];
        snprintf(fd, sizeof fd, "%d", gate[0]);
        char *argv[] = {"sh", "-c", "read x <&$0; exit 4", fd, NULL};
        pid_t pid;
        CHECK(posix_spawn(&pid, "/bin/sh", NULL, NULL, argv, environ) == 0);
        CHECK_OK(ca_child_watcher_add_child_handler_on(w, loop, pid, never_cb, NULL));
        H(loop)->host_closed = true; /* the host closes its loop; the core is not told */
        CHECK_ERR(ca_child_watcher_add_child_handler_on(w, loop, 1, never_cb, NULL), -EBADF);
        close(gate[1]);
        close(gate[0]);
        /* The exit is reaped, not delivered: logged as for a closed loop, and dropped. */
        for (int i = 0; i < 500 && atomic_load(&closed_lines) == 0; i++) {
            struct timespec ts = {0, 10000000};
            nanosleep(&ts, NULL);
        }
        CHECK_EQ(atomic_load(&closed_lines), 1);
        CHECK_EQ(ca_child_watcher_remove_child_handler(w, pid), 0);
        gil_take();
        host_iterate(loop, 10);
        gil_drop();
        CHECK_EQ(atomic_load(&ok_calls), 0);
        CHECK_OK(ca_child_watcher_close(w));
        ca_child_watcher_unref(w);
        CHECK_OK(ca_loop_close(loop));
        ca_loop_unref(loop);
    }
    /* Safe: attached to a loop its host closed, it is not active. */
    ca_loop *loop;
    ca_child_watcher *w;
    CHECK_OK(host_new(&loop));
    CHECK_OK(ca_safe_child_watcher_new(&w));
    CHECK_OK(ca_child_watcher_attach_loop(w, loop));
    CHECK(ca_child_watcher_is_active(w));
    H(loop)->host_closed = true;
    CHECK(!ca_child_watcher_is_active(w));
    CHECK_ERR(ca_child_watcher_add_child_handler(w, 1, never_cb, NULL), -ENOTCONN);
    CHECK_OK(ca_child_watcher_close(w));
    ca_child_watcher_unref(w);
    CHECK_OK(ca_loop_close(loop));
    ca_loop_unref(loop);
    ca_set_log_handler(NULL, NULL);
}
