/*
 * The hand-written floors: what the workloads cost with nothing but the kernel.
 *
 *   VARIANT spawn (name floor-spawn): posix_spawn + blocking waitpid, no loop at all.
 *   VARIANT pidfd (name floor-pidfd): posix_spawn + pidfd_open + a bare epoll loop.
 *   loop workloads (name floor-epoll): a minimal epoll loop with a ready array, a timer heap,
 *   an fd table and an eventfd for cross-thread calls.  It does the least a loop can do and
 *   still be a loop: FIFO callbacks, timers in time order, level-triggered readiness, and one
 *   epoll_wait per iteration (timeout 0 when callbacks are ready), even with no fd registered,
 *   as any loop with a wakeup fd must.
 */
#include "common.h"

#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/syscall.h>

#ifndef SYS_pidfd_open
#define SYS_pidfd_open 434
#endif
#ifndef P_PIDFD
#define P_PIDFD 3
#endif

static int pidfd_open(pid_t pid) { return (int)syscall(SYS_pidfd_open, pid, 0); }

/* ------------------------------------------------------------------ the minimal loop */
typedef void (*fl_fn)(void *);
typedef struct { fl_fn fn; void *arg; } fl_cb;
typedef struct { double when; uint64_t seq; fl_fn fn; void *arg; } fl_timer;
typedef struct { fl_fn rfn, wfn; void *rarg, *warg; uint32_t ev; } fl_io;

static struct {
    int ep;
    fl_cb *ready, *run;
    size_t rn, rcap, runcap;
    fl_timer *heap;
    size_t hn, hcap;
    uint64_t seq;
    fl_io *io;
    int iocap, nio;
    int stop;
    int efd;
    pthread_mutex_t mu;
    fl_cb *tq;
    size_t tqn, tqcap;
    atomic_int wake_pending;
} L;

static void *xrealloc(void *p, size_t n)
{
    p = realloc(p, n);
    if (!p)
        b_die("out of memory");
    return p;
}

static void fl_init(void)
{
    L.ep = epoll_create1(EPOLL_CLOEXEC);
    if (L.ep < 0)
        b_die("epoll_create1: %s", strerror(errno));
    L.rcap = L.runcap = 1024;
    L.ready = xrealloc(NULL, L.rcap * sizeof(fl_cb));
    L.run = xrealloc(NULL, L.runcap * sizeof(fl_cb));
    L.efd = -1;
    pthread_mutex_init(&L.mu, NULL);
}

static inline void fl_call_soon(fl_fn fn, void *arg)
{
    if (L.rn == L.rcap) {
        L.rcap *= 2;
        L.ready = xrealloc(L.ready, L.rcap * sizeof(fl_cb));
    }
    L.ready[L.rn].fn = fn;
    L.ready[L.rn].arg = arg;
    L.rn++;
}

static inline int t_less(const fl_timer *a, const fl_timer *b)
{
    return a->when < b->when || (a->when == b->when && a->seq < b->seq);
}

static void fl_call_at(double when, fl_fn fn, void *arg)
{
    if (L.hn == L.hcap) {
        L.hcap = L.hcap ? L.hcap * 2 : 1024;
        L.heap = xrealloc(L.heap, L.hcap * sizeof(fl_timer));
    }
    fl_timer t = {when, L.seq++, fn, arg};
    size_t i = L.hn++;
    while (i > 0) {
        size_t p = (i - 1) / 2;
        if (!t_less(&t, &L.heap[p]))
            break;
        L.heap[i] = L.heap[p];
        i = p;
    }
    L.heap[i] = t;
}

static void heap_pop(void)
{
    fl_timer last = L.heap[--L.hn];
    size_t i = 0, n = L.hn;
    for (;;) {
        size_t c = 2 * i + 1;
        if (c >= n)
            break;
        if (c + 1 < n && t_less(&L.heap[c + 1], &L.heap[c]))
            c++;
        if (!t_less(&L.heap[c], &last))
            break;
        L.heap[i] = L.heap[c];
        i = c;
    }
    if (n)
        L.heap[i] = last;
}

static void fl_update(int fd)
{
    fl_io *io = &L.io[fd];
    uint32_t ev = (io->rfn ? EPOLLIN : 0) | (io->wfn ? EPOLLOUT : 0);
    struct epoll_event e = {.events = ev, .data.fd = fd};
    int op = io->ev == 0 ? EPOLL_CTL_ADD : ev == 0 ? EPOLL_CTL_DEL : EPOLL_CTL_MOD;
    if (ev == io->ev)
        return;
    if (epoll_ctl(L.ep, op, fd, &e) != 0)
        b_die("epoll_ctl: %s", strerror(errno));
    if (io->ev == 0)
        L.nio++;
    if (ev == 0)
        L.nio--;
    io->ev = ev;
}

static void fl_io_slot(int fd)
{
    if (fd >= L.iocap) {
        int n = L.iocap ? L.iocap : 64;
        while (n <= fd)
            n *= 2;
        L.io = xrealloc(L.io, (size_t)n * sizeof(fl_io));
        memset(L.io + L.iocap, 0, (size_t)(n - L.iocap) * sizeof(fl_io));
        L.iocap = n;
    }
}

static void fl_add_reader(int fd, fl_fn fn, void *arg)
{
    fl_io_slot(fd);
    L.io[fd].rfn = fn;
    L.io[fd].rarg = arg;
    fl_update(fd);
}
static void fl_remove_reader(int fd)
{
    L.io[fd].rfn = NULL;
    fl_update(fd);
}
static void fl_add_writer(int fd, fl_fn fn, void *arg)
{
    fl_io_slot(fd);
    L.io[fd].wfn = fn;
    L.io[fd].warg = arg;
    fl_update(fd);
}
static void fl_remove_writer(int fd)
{
    L.io[fd].wfn = NULL;
    fl_update(fd);
}

/* Runs until stopped or until there is nothing left to wait for. */
static void fl_run(void)
{
    struct epoll_event evs[256];
    L.stop = 0;
    while (!L.stop) {
        int timeout;
        if (L.rn)
            timeout = 0;
        else if (L.hn) {
            double d = (L.heap[0].when - b_now()) * 1e3;
            timeout = d <= 0 ? 0 : (int)ceil(d);
        } else if (L.nio == 0)
            break;
        else
            timeout = -1;
        {   /* one epoll_wait per iteration, as a real loop (which has fds) does */
            int n = epoll_wait(L.ep, evs, 256, timeout);
            if (n < 0 && errno != EINTR)
                b_die("epoll_wait: %s", strerror(errno));
            for (int i = 0; i < n; i++) {
                fl_io *io = &L.io[evs[i].data.fd];
                if ((evs[i].events & (EPOLLIN | EPOLLHUP | EPOLLERR)) && io->rfn)
                    io->rfn(io->rarg);
                if ((evs[i].events & (EPOLLOUT | EPOLLHUP | EPOLLERR)) && io->wfn)
                    io->wfn(io->warg);
            }
        }
        if (L.hn) {
            double now = b_now();
            while (L.hn && L.heap[0].when <= now) {
                fl_call_soon(L.heap[0].fn, L.heap[0].arg);
                heap_pop();
            }
        }
        /* run what was ready when the iteration began; new ones wait for the next */
        fl_cb *r = L.ready;
        size_t n = L.rn;
        L.ready = L.run;
        L.run = r;
        size_t c = L.rcap;
        L.rcap = L.runcap;
        L.runcap = c;
        L.rn = 0;
        for (size_t i = 0; i < n; i++)
            r[i].fn(r[i].arg);
    }
}

/* cross-thread: a locked queue plus an eventfd written only when no wakeup is pending */
static void fl_wakeup_cb(void *arg)
{
    (void)arg;
    uint64_t v;
    if (read(L.efd, &v, sizeof v) < 0 && errno != EAGAIN)
        b_die("eventfd read: %s", strerror(errno));
    atomic_store(&L.wake_pending, 0);
    pthread_mutex_lock(&L.mu);
    fl_cb *q = L.tq;
    size_t n = L.tqn;
    L.tq = NULL;
    L.tqn = L.tqcap = 0;
    pthread_mutex_unlock(&L.mu);
    for (size_t i = 0; i < n; i++)
        fl_call_soon(q[i].fn, q[i].arg);
    free(q);
}

static void fl_call_soon_threadsafe(fl_fn fn, void *arg)
{
    pthread_mutex_lock(&L.mu);
    if (L.tqn == L.tqcap) {
        L.tqcap = L.tqcap ? L.tqcap * 2 : 1024;
        L.tq = xrealloc(L.tq, L.tqcap * sizeof(fl_cb));
    }
    L.tq[L.tqn].fn = fn;
    L.tq[L.tqn].arg = arg;
    L.tqn++;
    pthread_mutex_unlock(&L.mu);
    if (atomic_exchange(&L.wake_pending, 1) == 0) {
        uint64_t one = 1;
        if (write(L.efd, &one, sizeof one) < 0)
            b_die("eventfd write: %s", strerror(errno));
    }
}

/* ------------------------------------------------------------------ loop workloads */
static long counter, target;

static void count_cb(void *arg)
{
    (void)arg;
    if (++counter == target)
        L.stop = 1;
}

static void chain_cb(void *arg)
{
    if (++counter < target)
        fl_call_soon(chain_cb, arg);
    else
        L.stop = 1;
}

typedef struct conn {
    int fd[2];
    long rounds, target;
    long sent, recvd, total; /* stream */
    char *buf;
} conn;
static long conns_done, nconns;

static void ping_echo(void *arg) /* side 1: read one byte, send it back */
{
    conn *c = arg;
    char b;
    ssize_t r = read(c->fd[1], &b, 1);
    if (r == 1) {
        if (write(c->fd[1], &b, 1) != 1)
            b_die("write: %s", strerror(errno));
    } else if (r < 0 && errno != EAGAIN)
        b_die("read: %s", strerror(errno));
}

static void ping_back(void *arg) /* side 0: count a round trip, start the next */
{
    conn *c = arg;
    char b;
    ssize_t r = read(c->fd[0], &b, 1);
    if (r < 0 && errno == EAGAIN)
        return;
    if (r != 1)
        b_die("read: %s", strerror(errno));
    if (++c->rounds < c->target) {
        if (write(c->fd[0], &b, 1) != 1)
            b_die("write: %s", strerror(errno));
    } else {
        fl_remove_reader(c->fd[0]);
        fl_remove_reader(c->fd[1]);
        if (++conns_done == nconns)
            L.stop = 1;
    }
}

static void stream_write(void *arg)
{
    conn *c = arg;
    while (c->sent < c->total) {
        long want = c->total - c->sent;
        ssize_t w = write(c->fd[0], c->buf, (size_t)(want < B_STREAM_CHUNK ? want : B_STREAM_CHUNK));
        if (w < 0) {
            if (errno == EAGAIN)
                return;
            b_die("write: %s", strerror(errno));
        }
        c->sent += w;
    }
    fl_remove_writer(c->fd[0]);
}

static void stream_read(void *arg)
{
    conn *c = arg;
    static char rbuf[B_STREAM_CHUNK];
    for (int i = 0; i < 32; i++) { /* drain, as libuv does (up to 32 reads per event) */
        ssize_t r = read(c->fd[1], rbuf, sizeof rbuf);
        if (r < 0) {
            if (errno == EAGAIN)
                return;
            b_die("read: %s", strerror(errno));
        }
        c->recvd += r;
        if (c->recvd >= c->total) {
            fl_remove_reader(c->fd[1]);
            if (++conns_done == nconns)
                L.stop = 1;
            return;
        }
    }
}

static void *ts_thread(void *arg)
{
    (void)arg;
    for (long i = 0; i < target; i++)
        fl_call_soon_threadsafe(count_cb, NULL);
    return NULL;
}

static int loop_workload(const bench_args *a)
{
    const char *nm = "floor-epoll";
    fl_init();
    if (b_is(a, "burst")) {
        target = b_n(a, B_SOON_N);
        double t0 = b_now();
        for (long i = 0; i < target; i++)
            fl_call_soon(count_cb, NULL);
        fl_run();
        b_report(nm, a, (double)target / (b_now() - t0), "calls/s");
    } else if (b_is(a, "chain")) {
        /* param 1: one idle fd registered (the floor polls every iteration either way) */
        int sv[2];
        if (a->param > 0) {
            b_socketpair(sv);
            fl_add_reader(sv[0], count_cb, NULL);
        }
        target = b_n(a, B_SOON_N);
        double t0 = b_now();
        fl_call_soon(chain_cb, NULL);
        fl_run();
        b_report(nm, a, (double)target / (b_now() - t0), "calls/s");
    } else if (b_is(a, "timers")) {
        target = b_n(a, B_TIMER_N);
        uint64_t seed = 42;
        double t0 = b_now();
        for (long i = 0; i < target; i++)
            fl_call_at(b_now() + (double)b_timer_delay_us(&seed) * 1e-6, count_cb, NULL);
        fl_run();
        b_report(nm, a, (double)target / (b_now() - t0), "timers/s");
    } else if (b_is(a, "pingpong") || b_is(a, "pingpong_sock")) {
        nconns = a->param > 0 ? a->param : 1;
        long total = b_n(a, B_PING_N);
        conn *cs = calloc((size_t)nconns, sizeof(conn));
        for (long i = 0; i < nconns; i++) {
            b_socketpair(cs[i].fd);
            cs[i].target = total / nconns + (i < total % nconns);
            fl_add_reader(cs[i].fd[1], ping_echo, &cs[i]);
            fl_add_reader(cs[i].fd[0], ping_back, &cs[i]);
        }
        double t0 = b_now();
        for (long i = 0; i < nconns; i++)
            if (write(cs[i].fd[0], "x", 1) != 1)
                b_die("write: %s", strerror(errno));
        fl_run();
        b_report(nm, a, (double)total / (b_now() - t0), "rt/s");
    } else if (b_is(a, "stream")) {
        nconns = a->param > 0 ? a->param : 1;
        long total = b_n(a, B_STREAM_MIB) * 1048576L;
        conn *cs = calloc((size_t)nconns, sizeof(conn));
        char *buf = calloc(1, B_STREAM_CHUNK);
        for (long i = 0; i < nconns; i++) {
            b_socketpair(cs[i].fd);
            cs[i].total = total / nconns;
            cs[i].buf = buf;
        }
        double t0 = b_now();
        for (long i = 0; i < nconns; i++) {
            fl_add_writer(cs[i].fd[0], stream_write, &cs[i]);
            fl_add_reader(cs[i].fd[1], stream_read, &cs[i]);
        }
        fl_run();
        b_report(nm, a, (double)(total / nconns * nconns) / (b_now() - t0) / 1e6, "MB/s");
    } else if (b_is(a, "threadsafe")) {
        target = b_n(a, B_TS_N);
        L.efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
        fl_add_reader(L.efd, fl_wakeup_cb, NULL);
        pthread_t th;
        double t0 = b_now();
        pthread_create(&th, NULL, ts_thread, NULL);
        fl_run();
        double dt = b_now() - t0;
        pthread_join(th, NULL);
        b_report(nm, a, (double)target / dt, "calls/s");
    } else
        return -1;
    return 0;
}

/* ------------------------------------------------------------------ policy floor */
static __thread void *tls_loop;
__attribute__((noinline)) static int floor_get_loop(void **out)
{
    void *l = tls_loop;
    if (!l)
        return -ENOENT;
    *out = l;
    return 0;
}

/* ------------------------------------------------------------------ child workloads */
static void wait_one(pid_t pid)
{
    int st;
    while (waitpid(pid, &st, 0) < 0)
        if (errno != EINTR)
            b_die("waitpid: %s", strerror(errno));
}

/* reap one exited child through epoll; returns its pid */
static pid_t pidfd_reap_one(int ep)
{
    struct epoll_event e;
    int n;
    while ((n = epoll_wait(ep, &e, 1, -1)) < 0)
        if (errno != EINTR)
            b_die("epoll_wait: %s", strerror(errno));
    int fd = e.data.fd;
    siginfo_t si = {0};
    if (waitid((idtype_t)P_PIDFD, (id_t)fd, &si, WEXITED) != 0)
        b_die("waitid(pidfd %d, events %#x): %s", fd, e.events, strerror(errno));
    /* remove it before closing: on this kernel a closed pidfd can stay in the set */
    epoll_ctl(ep, EPOLL_CTL_DEL, fd, NULL);
    close(fd);
    return si.si_pid;
}

static int pidfd_watch(int ep, pid_t pid)
{
    int fd = pidfd_open(pid);
    if (fd < 0)
        b_die("pidfd_open: %s", strerror(errno));
    struct epoll_event e = {.events = EPOLLIN, .data.fd = fd};
    if (epoll_ctl(ep, EPOLL_CTL_ADD, fd, &e) != 0)
        b_die("epoll_ctl: %s", strerror(errno));
    return fd;
}

static int child_workload(const bench_args *a)
{
    int pidfd = strcmp(a->variant, "pidfd") == 0;
    /* waitany: reap with waitpid(-1), as a SIGCHLD + waitpid(-1) loop (Fast, libev) does;
     * the kernel walks the whole list of children for it */
    int any = strcmp(a->variant, "waitany") == 0;
    const char *nm = pidfd ? "floor-pidfd" : any ? "floor-waitany" : "floor-spawn";
    int ep = epoll_create1(EPOLL_CLOEXEC);
    if (b_is(a, "spawn_reap")) {
        long n = b_n(a, B_SPAWN_N), k = a->param > 0 ? a->param : 1, started = 0, done = 0;
        double t0 = b_now();
        while (started < k && started < n) {
            pid_t p = b_spawn(b_true_argv);
            if (pidfd)
                pidfd_watch(ep, p);
            started++;
        }
        while (done < n) {
            if (pidfd)
                pidfd_reap_one(ep);
            else
                wait_one(-1);
            done++;
            if (started < n) {
                pid_t p = b_spawn(b_true_argv);
                if (pidfd)
                    pidfd_watch(ep, p);
                started++;
            }
        }
        b_report(nm, a, (double)n / (b_now() - t0), "children/s");
    } else if (b_is(a, "reap_scaling")) {
        long m = a->param, n = b_n(a, B_SCALE_N);
        pid_t *idle = calloc((size_t)m + 1, sizeof(pid_t));
        int *idlefd = calloc((size_t)m + 1, sizeof(int));
        for (long i = 0; i < m; i++) {
            idle[i] = b_spawn(b_sleep600_argv);
            if (pidfd)
                idlefd[i] = pidfd_watch(ep, idle[i]);
        }
        double t0 = b_now(), c0 = b_cpu_s();
        for (long i = 0; i < n; i++) {
            pid_t p = b_spawn(b_true_argv);
            if (pidfd) {
                pidfd_watch(ep, p);
                if (pidfd_reap_one(ep) != p)
                    b_die("reaped the wrong child");
            } else if (any) {
                int st;
                pid_t r;
                while ((r = waitpid(-1, &st, 0)) < 0 && errno == EINTR)
                    ;
                if (r != p)
                    b_die("waitpid(-1) reaped %d, not %d", (int)r, (int)p);
            } else
                wait_one(p);
        }
        double dt = b_now() - t0, dc = b_cpu_s() - c0;
        for (long i = 0; i < m; i++)
            kill(idle[i], SIGKILL);
        for (long i = 0; i < m; i++) {
            if (pidfd)
                pidfd_reap_one(ep);
            else
                wait_one(idle[i]);
        }
        b_report(nm, a, dt / (double)n * 1e6, "us");
        b_report_cpu(nm, a, dc / (double)n * 1e6);
    } else if (b_is(a, "fd_cost")) {
        /* what an open fd costs a spawn: F close-on-exec fds (as a pidfd per child would be),
         * then N spawn+reap; fork/clone copies the fd table and exec closes the CLOEXEC ones */
        long f = a->param, n = b_n(a, B_SCALE_N);
        for (long i = 0; i < f; i++)
            if (open("/dev/null", O_RDONLY | O_CLOEXEC) < 0)
                b_die("open: %s", strerror(errno));
        wait_one(b_spawn(b_true_argv)); /* warm-up */
        double t0 = b_now();
        for (long i = 0; i < n; i++)
            wait_one(b_spawn(b_true_argv));
        b_report("floor-spawn", a, (b_now() - t0) / (double)n * 1e6, "us");
    } else if (b_is(a, "mem")) {
        long n = a->param > 0 ? a->param : B_MEM_N;
        pid_t *pids = calloc((size_t)n, sizeof(pid_t));
        /* warm-up: one spawn+reap first, so lazy allocations are not counted */
        if (pidfd) {
            pidfd_watch(ep, b_spawn(b_true_argv));
            pidfd_reap_one(ep);
        } else
            wait_one(b_spawn(b_true_argv));
        long before = b_rss_bytes();
        for (long i = 0; i < n; i++) {
            pids[i] = b_spawn(b_sleep5_argv);
            if (pidfd)
                pidfd_watch(ep, pids[i]);
        }
        long after = b_rss_bytes();
        for (long i = 0; i < n; i++)
            kill(pids[i], SIGKILL);
        for (long i = 0; i < n; i++) {
            if (pidfd)
                pidfd_reap_one(ep);
            else
                wait_one(pids[i]);
        }
        b_report(nm, a, (double)(after - before) / (double)n / 1024.0, "KB/child");
        b_report_vsz(nm, a, n);
    } else
        return -1;
    close(ep);
    return 0;
}

int main(int argc, char **argv)
{
    bench_args a;
    b_parse(&a, argc, argv, "floor");
    b_raise_limits();
    if (b_is(&a, "policy")) {
        long n = b_n(&a, B_POLICY_N);
        static int dummy;
        tls_loop = &dummy;
        void *l = NULL;
        double t0 = b_now();
        for (long i = 0; i < n; i++) {
            if (floor_get_loop(&l) != 0)
                b_die("no loop");
            __asm__ volatile("" : : "r"(l) : "memory");
        }
        b_report("floor-tls", &a, (b_now() - t0) / (double)n * 1e9, "ns/call");
        return 0;
    }
    if (child_workload(&a) == 0 || loop_workload(&a) == 0)
        return 0;
    fprintf(stderr, "floor: unknown workload %s\n", a.workload);
    return 2;
}
