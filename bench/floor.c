/*
 * The hand-written floors: what the workloads cost with nothing but the kernel.
 *
 *   VARIANT spawn (name floor-spawn): posix_spawn + blocking waitpid, no loop at all.
 *   VARIANT pidfd (name floor-pidfd): posix_spawn + pidfd_open + a bare epoll loop.
 *   VARIANT waitany (name floor-waitany, reap_scaling only): posix_spawn + waitpid(-1).
 *   VARIANT uring-waitid, uring-waitall, uring-pollfixed, uring-pollfixed-rings (name
 *   floor-VARIANT, reap_scaling only): posix_spawn + io_uring, see uring_reap_scaling.
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
#include <liburing.h>
#include <poll.h>
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

/* ------------------------------------------------------------------ io_uring reap floors */
/* reap_scaling through io_uring, three ways of learning of an exit (docs/benchmarks.md, "Three
 * WAITID/pidfd designs measured side by side"). One ring, set up as src/watcher_uring.c sets up
 * its own (256 SQEs, 4,096 CQEs, no DEFER_TASKRUN), one io_uring_enter per spawn+reap that
 * submits and waits, then waitpid(pid) of the child the completion names.
 *   uring-waitid    one IORING_OP_WAITID(P_PID, WEXITED | WNOWAIT) per child, the M idle ones
 *                   included: M+1 entries on the process's one wait_chldexit queue
 *   uring-waitall   one IORING_OP_WAITID(P_ALL, WEXITED | WNOWAIT) for the ring, re-armed after
 *                   each reap (queued then, submitted with the next wait, so after the next
 *                   spawn: at M=0 there is no child in between); the pid comes from the
 *                   siginfo_t the request points to
 *   uring-pollfixed each child's pidfd in a sparse fixed-file table of M+16 slots (pidfd_open,
 *                   io_uring_register_files_update, close), IORING_OP_POLL_ADD(POLLIN) with
 *                   IOSQE_FIXED_FILE on its slot; after the reap the slot is emptied (update with
 *                   -1). The table is capped by RLIMIT_NOFILE when it is registered: it dies
 *                   with the kernel's error if that is too low
 *   uring-pollfixed-rings  the same, split over as many rings as it takes when the table is
 *                   refused with EMFILE (each ring at most RLIMIT_NOFILE slots); with more than
 *                   one ring it submits on the child's ring and waits in epoll_wait on the rings'
 *                   fds (two system calls instead of one) */
/* The kernel's enum io_uring_op (liburing 2.3 has neither the opcode nor its prep): as in
 * src/watcher_uring.c. */
#define FL_OP_WAITID 50
_Static_assert(IORING_OP_SENDMSG_ZC == 48, "io_uring opcode numbering");
#define FL_UR_SQ 256u
#define FL_UR_CQ 4096u
#define FL_UR_SPARE 16 /* free slots beyond the M idle children's */
#define FL_UR_ALL ((uint64_t)-1) /* user_data of the P_ALL request */

static int fl_ring_init(struct io_uring *ring)
{
    struct io_uring_params p;
    memset(&p, 0, sizeof p);
    p.flags = IORING_SETUP_CQSIZE | IORING_SETUP_CLAMP;
    p.cq_entries = FL_UR_CQ;
    return io_uring_queue_init_params(FL_UR_SQ, ring, &p);
}

static struct io_uring_sqe *fl_sqe(struct io_uring *ring)
{
    struct io_uring_sqe *sqe = io_uring_get_sqe(ring);
    if (!sqe) {
        io_uring_submit(ring);
        sqe = io_uring_get_sqe(ring);
    }
    if (!sqe)
        b_die("io_uring: no SQE");
    memset(sqe, 0, sizeof *sqe);
    return sqe;
}

/* the SQE layout of io_uring/waitid.c's io_waitid_prep (see src/watcher_uring.c's prep_waitid) */
static void fl_prep_waitid(struct io_uring *ring, idtype_t idtype, pid_t id, siginfo_t *si,
                           uint64_t data)
{
    struct io_uring_sqe *sqe = fl_sqe(ring);
    sqe->opcode = FL_OP_WAITID;
    sqe->fd = (int)id;
    sqe->len = (unsigned)idtype;
    sqe->file_index = WEXITED | WNOWAIT;
    sqe->addr2 = (uint64_t)(uintptr_t)si;
    io_uring_sqe_set_data64(sqe, data);
}

/* submits what is queued and waits for one completion; returns its user_data, *res its res */
static uint64_t fl_ring_wait(struct io_uring *ring, int *res)
{
    struct io_uring_cqe *cqe;
    int r;
    while ((r = io_uring_submit_and_wait(ring, 1)) < 0)
        if (r != -EINTR)
            b_die("io_uring_submit_and_wait: %s", strerror(-r));
    while ((r = io_uring_wait_cqe(ring, &cqe)) != 0) /* there is one: no system call */
        if (r != -EINTR)
            b_die("io_uring_wait_cqe: %s", strerror(-r));
    uint64_t d = io_uring_cqe_get_data64(cqe);
    *res = cqe->res;
    io_uring_cqe_seen(ring, cqe);
    return d;
}

/* the fixed-file rings of uring-pollfixed: global slot g is slot g % per of ring g / per */
typedef struct {
    struct io_uring *rings;
    int nrings, ep;
    unsigned per;
    long *freelist; /* free global slots, a stack */
    long nfree;
    pid_t *slot_pid;
} fl_fixed;

static void fl_fixed_init(fl_fixed *f, long slots, int split)
{
    memset(f, 0, sizeof *f);
    f->ep = -1;
    f->per = (unsigned)slots;
    for (;;) {
        f->nrings = (int)((slots + f->per - 1) / f->per);
        f->rings = xrealloc(NULL, (size_t)f->nrings * sizeof(struct io_uring));
        int i, r = 0;
        for (i = 0; i < f->nrings; i++) {
            if ((r = fl_ring_init(&f->rings[i])) < 0)
                b_die("io_uring_queue_init: %s", strerror(-r));
            /* liburing 2.3 raises the soft RLIMIT_NOFILE to the table's size when the kernel
             * says EMFILE, and tries once more */
            unsigned n = i == f->nrings - 1 ? (unsigned)(slots - (long)f->per * i) : f->per;
            if ((r = io_uring_register_files_sparse(&f->rings[i], n)) < 0)
                break;
        }
        if (i == f->nrings)
            break;
        struct rlimit rl;
        getrlimit(RLIMIT_NOFILE, &rl);
        fprintf(stderr, "bench: io_uring_register_files_sparse(%u slots) on ring %d of %d: %s "
                        "(RLIMIT_NOFILE %ld/%ld)\n", i == f->nrings - 1 ?
                        (unsigned)(slots - (long)f->per * i) : f->per, i + 1, f->nrings,
                strerror(-r), (long)rl.rlim_cur, (long)rl.rlim_max);
        if (!split || r != -EMFILE || f->nrings > 1)
            exit(2);
        for (int j = 0; j <= i; j++)
            io_uring_queue_exit(&f->rings[j]);
        free(f->rings);
        f->per = (unsigned)rl.rlim_cur; /* the kernel's cap on one table */
    }
    if (f->nrings > 1) {
        fprintf(stderr, "bench: %d rings of at most %u fixed-file slots each\n", f->nrings, f->per);
        f->ep = epoll_create1(EPOLL_CLOEXEC);
        for (int i = 0; i < f->nrings; i++) {
            struct epoll_event e = {.events = EPOLLIN, .data.u32 = (uint32_t)i};
            if (epoll_ctl(f->ep, EPOLL_CTL_ADD, f->rings[i].ring_fd, &e) != 0)
                b_die("epoll_ctl: %s", strerror(errno));
        }
    }
    f->freelist = xrealloc(NULL, (size_t)slots * sizeof(long));
    f->slot_pid = calloc((size_t)slots, sizeof(pid_t));
    for (long g = slots - 1; g >= 0; g--)
        f->freelist[f->nfree++] = g;
}

/* installs pid's pidfd in a free slot and queues a POLL_ADD on it; returns the global slot */
static long fl_fixed_watch(fl_fixed *f, pid_t pid)
{
    if (f->nfree == 0)
        b_die("no free fixed-file slot");
    long g = f->freelist[--f->nfree];
    struct io_uring *ring = &f->rings[g / f->per];
    unsigned slot = (unsigned)(g % f->per);
    int fd = pidfd_open(pid);
    if (fd < 0)
        b_die("pidfd_open: %s", strerror(errno));
    int r = io_uring_register_files_update(ring, slot, &fd, 1);
    if (r != 1)
        b_die("io_uring_register_files_update: %s", strerror(r < 0 ? -r : EIO));
    close(fd);
    f->slot_pid[g] = pid;
    struct io_uring_sqe *sqe = fl_sqe(ring);
    io_uring_prep_poll_add(sqe, (int)slot, POLLIN);
    sqe->flags |= IOSQE_FIXED_FILE;
    io_uring_sqe_set_data64(sqe, (uint64_t)g);
    return g;
}

/* waits for one POLL_ADD to complete (submitting what g's ring has queued), reaps its child,
 * empties its slot; returns the pid */
static pid_t fl_fixed_reap_one(fl_fixed *f, long g)
{
    uint64_t d;
    int res;
    if (f->nrings == 1)
        d = fl_ring_wait(&f->rings[0], &res);
    else {
        struct io_uring *ring = &f->rings[g / f->per];
        struct io_uring_cqe *cqe;
        int r;
        if ((r = io_uring_submit(ring)) < 0)
            b_die("io_uring_submit: %s", strerror(-r));
        for (;;) {
            struct epoll_event e;
            int n = epoll_wait(f->ep, &e, 1, -1);
            if (n < 0 && errno != EINTR)
                b_die("epoll_wait: %s", strerror(errno));
            if (n == 1 && io_uring_peek_cqe(&f->rings[e.data.u32], &cqe) == 0) {
                ring = &f->rings[e.data.u32];
                break;
            }
        }
        d = io_uring_cqe_get_data64(cqe);
        res = cqe->res;
        io_uring_cqe_seen(ring, cqe);
    }
    if (res < 0 || !(res & POLLIN))
        b_die("POLL_ADD on a pidfd: res %d", res);
    long s = (long)d;
    pid_t pid = f->slot_pid[s];
    wait_one(pid);
    int minus1 = -1;
    int r = io_uring_register_files_update(&f->rings[s / f->per], (unsigned)(s % f->per),
                                           &minus1, 1);
    if (r != 1)
        b_die("io_uring_register_files_update(-1): %s", strerror(r < 0 ? -r : EIO));
    f->freelist[f->nfree++] = s;
    return pid;
}

static int uring_reap_scaling(const bench_args *a, const char *nm)
{
    int waitid1 = strcmp(a->variant, "uring-waitid") == 0;
    int waitall = strcmp(a->variant, "uring-waitall") == 0;
    int split = strcmp(a->variant, "uring-pollfixed-rings") == 0;
    int fixed = split || strcmp(a->variant, "uring-pollfixed") == 0;
    if (!waitid1 && !waitall && !fixed)
        b_die("unknown variant %s", a->variant);
    {   /* io_uring and its WAITID (6.7) here at all? */
        struct io_uring probe_ring;
        if (fl_ring_init(&probe_ring) < 0) {
            b_report_na(nm, a, "us", "no io_uring");
            return 0;
        }
        struct io_uring_probe *pr = io_uring_get_probe_ring(&probe_ring);
        int ok = pr && io_uring_opcode_supported(pr, FL_OP_WAITID);
        if (pr)
            io_uring_free_probe(pr);
        io_uring_queue_exit(&probe_ring);
        if (!ok) {
            b_report_na(nm, a, "us", "no IORING_OP_WAITID");
            return 0;
        }
    }
    long m = a->param, n = b_n(a, B_SCALE_N);
    pid_t *idle = calloc((size_t)m + 1, sizeof(pid_t));
    struct io_uring ring;
    fl_fixed f;
    static siginfo_t si; /* the P_ALL request's: one request at a time */
    int r;
    if (fixed)
        fl_fixed_init(&f, m + FL_UR_SPARE, split);
    else if ((r = fl_ring_init(&ring)) < 0)
        b_die("io_uring_queue_init: %s", strerror(-r));
    for (long i = 0; i < m; i++) {
        idle[i] = b_spawn(b_sleep600_argv);
        if (waitid1)
            fl_prep_waitid(&ring, P_PID, idle[i], NULL, (uint64_t)idle[i]);
        else if (fixed)
            fl_fixed_watch(&f, idle[i]);
    }
    if (fixed) {
        for (int i = 0; i < f.nrings; i++)
            if ((r = io_uring_submit(&f.rings[i])) < 0)
                b_die("io_uring_submit: %s", strerror(-r));
    } else {
        if ((r = io_uring_submit(&ring)) < 0)
            b_die("io_uring_submit: %s", strerror(-r));
        /* submitted with the first wait, after the first spawn: with no child at all (M=0) a
         * WAITID(P_ALL) ends at once with -ECHILD, as waitid does */
        if (waitall)
            fl_prep_waitid(&ring, P_ALL, 0, &si, FL_UR_ALL);
    }
    double t0 = b_now(), c0 = b_cpu_s();
    for (long i = 0; i < n; i++) {
        pid_t p = b_spawn(b_true_argv), got;
        if (fixed)
            got = fl_fixed_reap_one(&f, fl_fixed_watch(&f, p));
        else {
            if (waitid1)
                fl_prep_waitid(&ring, P_PID, p, NULL, (uint64_t)p);
            int res;
            uint64_t d = fl_ring_wait(&ring, &res);
            if (res < 0)
                b_die("WAITID: %s", strerror(-res));
            got = waitall ? (d == FL_UR_ALL ? si.si_pid : -1) : (pid_t)d;
            if (got != p)
                b_die("WAITID reported %d, not %d", (int)got, (int)p);
            wait_one(p);
            if (waitall) /* re-armed now, submitted with the next wait */
                fl_prep_waitid(&ring, P_ALL, 0, &si, FL_UR_ALL);
        }
        if (got != p)
            b_die("reaped %d, not %d", (int)got, (int)p);
    }
    double dt = b_now() - t0, dc = b_cpu_s() - c0;
    /* the idle children are reaped by pid: their requests end as they may */
    for (long i = 0; i < m; i++)
        kill(idle[i], SIGKILL);
    for (long i = 0; i < m; i++)
        wait_one(idle[i]);
    if (fixed)
        for (int i = 0; i < f.nrings; i++)
            io_uring_queue_exit(&f.rings[i]);
    else
        io_uring_queue_exit(&ring);
    b_report(nm, a, dt / (double)n * 1e6, "us");
    b_report_cpu(nm, a, dc / (double)n * 1e6);
    free(idle);
    return 0;
}

static int child_workload(const bench_args *a)
{
    int pidfd = strcmp(a->variant, "pidfd") == 0;
    /* waitany: reap with waitpid(-1), as a SIGCHLD + waitpid(-1) loop (Fast, libev) does;
     * the kernel walks the whole list of children for it */
    int any = strcmp(a->variant, "waitany") == 0;
    const char *nm = pidfd ? "floor-pidfd" : any ? "floor-waitany" : "floor-spawn";
    if (strncmp(a->variant, "uring-", 6) == 0) {
        /* floor-uring-waitid, floor-uring-waitall, floor-uring-pollfixed[-rings] */
        char unm[64];
        snprintf(unm, sizeof unm, "floor-%s", a->variant);
        if (b_is(a, "reap_scaling"))
            return uring_reap_scaling(a, unm);
        b_report_na(unm, a, "-", "only reap_scaling has the io_uring variants");
        return 0;
    }
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
