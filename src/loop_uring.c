/*
 * The io_uring proactor: a backend for the loop core (readers/writers as one-shot polls, the
 * wait with a timeout for timers) and completion-based socket operations (IORING_OP_RECV,
 * SEND, ACCEPT, CONNECT) for ca_loop_sock_*. Everything else (timers, the ready queue, the
 * thread-safe queue, signals) is the core's: its wakeup eventfd reaches us through modify()
 * like any fd, so call_soon_threadsafe, stop and signals work unchanged.
 *
 * io_uring's quirks, and what this file does about them:
 * - Kernel versions. We need IORING_FEAT_NODROP (5.5), IORING_FEAT_FAST_POLL (5.7: socket
 *   operations wait with an internal poll instead of blocking an io-wq thread) and the RECV,
 *   SEND, ACCEPT, CONNECT, POLL_ADD, POLL_REMOVE and ASYNC_CANCEL opcodes (probed). Without
 *   them ca_proactor_loop_new says -ENOSYS. Newer setup flags (COOP_TASKRUN, TASKRUN_FLAG,
 *   SUBMIT_ALL: 5.18/5.19) are asked for and dropped if the kernel refuses them (-EINVAL).
 *   The wait with a timeout uses IORING_FEAT_EXT_ARG (5.11) through liburing, which falls
 *   back to a timeout SQE (user_data LIBURING_UDATA_TIMEOUT, ignored here) on older kernels.
 * - Unusable io_uring. io_uring_setup fails with ENOSYS (not built in), EPERM
 *   (kernel.io_uring_disabled, seccomp), ENOMEM (locked-memory limit on old kernels): we
 *   return that code, and CASYNCIO_NO_IO_URING=1 forces -ENOSYS, for tests and for users who
 *   want the selector fallback. No SQPOLL: it costs a kernel thread spinning per loop.
 * - Ring sizing. 256 SQEs and 4096 CQEs by default (CASYNCIO_URING_ENTRIES=N sets N SQEs and
 *   2N CQEs, for tests). The SQ bounds only what one iteration submits: when it is full we
 *   submit what we have and take more (get_sqe); if the kernel refuses even that (-EBUSY with
 *   an overflowing CQ on kernels before 5.19), the work waits in a backlog that poll() flushes
 *   first. Nothing is dropped.
 * - CQ overflow. More operations may be in flight than the CQ has entries. With
 *   IORING_FEAT_NODROP the kernel keeps the excess completions on its overflow list and sets
 *   IORING_SQ_CQ_OVERFLOW; liburing's io_uring_peek_batch_cqe flushes that list into the ring
 *   (an io_uring_enter with GETEVENTS) when the ring is empty, and reap() keeps peeking until
 *   both are empty, so no completion is lost.
 * - Level-triggered readers and writers. io_uring polls report wake-ups (multishot ones are
 *   edge-triggered), while our API promises level triggering on every loop. So each fd gets a
 *   ONE-SHOT poll; after it completes and the callbacks ran, the fd is queued to be armed
 *   again at the start of the next poll(), in the same io_uring_enter that waits. A poll armed
 *   on an fd that is still ready completes at once, so a reader that does not drain its fd is
 *   called again on the next iteration, as with epoll. Interest changes bump a generation
 *   number carried in the poll's user_data: completions of polls we removed are recognised
 *   as stale and ignored. A removal is submitted at once, because an armed poll holds a
 *   reference to the file: a socket the user closes right after remove_reader must really
 *   close (the peer must see the FIN) without waiting for our next iteration.
 * - Cancellation and buffers. Cancelling an operation (IORING_OP_ASYNC_CANCEL) is itself
 *   asynchronous: until the cancelled request completes, the kernel may still write into its
 *   buffer, and the user may free that buffer as soon as ca_future_cancel returns. So the
 *   kernel is never given the user's memory: recv and sendall first try recv(2)/send(2) at
 *   once (as the selector loops do: no ring trip, no copy); a small recv that has to wait
 *   (at most 2 KiB) is an IORING_OP_RECV into a bounce buffer we own, copied out only while
 *   the future is still pending; a larger one, and the rest of a sendall, is a one-shot
 *   POLL_ADD after which we call recv(2)/send(2) on the user's buffer ourselves, while the
 *   future is pending. (A 64 KiB bounce + memcpy per operation cost half the throughput of a
 *   stream; registered or provided buffers would still need the copy.) A recv returns at
 *   most 64 KiB, as the header says. Closing the loop cancels every operation in flight and
 *   waits for their completions before the bounce buffers are freed.
 * - Fork. The child inherits the ring's mappings and fd, but its requests belong to the
 *   parent. The core answers -ECHILD in the child; fini(forked) only unmaps our copies of the
 *   rings and closes our copy of the fd (io_uring_queue_exit does nothing else, as we never
 *   register the ring fd), never submitting anything.
 * - One io_uring_enter per iteration: SQEs prepared during an iteration (re-armed polls,
 *   started operations, cancels) are submitted by the same io_uring_submit_and_wait_timeout
 *   that waits for completions and for the next timer.
 */
#include "loop_internal.h"

#include <fcntl.h>
#include <liburing.h>
#include <poll.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define DEFAULT_SQ 256u
#define DEFAULT_CQ 4096u
#define RECV_COPY_MAX 2048u    /* a recv up to this size lands in a bounce buffer; a larger one
                                * waits for readability and reads into the caller's buffer */
#define RECV_MAX (64u * 1024u) /* what one recv returns at most (the header says so) */
#define POOL_CAP 256u          /* operations with a bounce of at most this are kept for reuse */
#define POOL_MAX 256
#define REAP_MAX 4096          /* completions handled per poll(); the rest wait one iteration */
#define CLOSE_WAIT_NS 2000000000LL

/* user_data: the low 3 bits say what completed. Operations are malloc'ed (aligned to 16). */
enum { TAG_IGNORE = 0, TAG_POLL = 1, TAG_OP = 2, TAG_MASK = 7 };

enum uop_kind {
    UOP_RECV,          /* IORING_OP_RECV into the bounce buffer (small receives) */
    UOP_RECV_POLL,     /* POLLIN, then recv(2) into the caller's buffer (large receives) */
    UOP_SEND_POLL,     /* POLLOUT, then send(2) from the caller's buffer (the rest of a sendall) */
    UOP_ACCEPT,
    UOP_CONNECT,
    UOP_CONNECT_POLL,
};

struct uop {
    enum uop_kind kind;
    bool in_kernel;            /* submitted (or in the SQ): a completion will come */
    bool backlogged;           /* waiting in the backlog for an SQE (start or cancel) */
    bool want_cancel;          /* the backlogged work is an ASYNC_CANCEL */
    bool cancel_sent;
    bool withdrawn;            /* the future was completed by others (cancelled) */
    bool in_rq;                /* in its fd's queue of receives/accepts */
    int fd;
    ca_loop *loop;
    ca_future *fut;            /* our reference */
    char *ubuf;
    size_t n, off;             /* send: bytes of ubuf already sent */
    struct uop *prev, *next;   /* every live operation of the loop */
    struct uop *bl_next;       /* backlog */
    struct uop *rq_next;       /* the fd's queue of receives/accepts */
    socklen_t alen;
    struct sockaddr_storage addr;
    size_t cap;
    char bounce[];
};

struct ufd {
    unsigned want;             /* CA__READ|CA__WRITE, as the core asked */
    unsigned armed;            /* the mask of the poll in the kernel; 0: none */
    uint32_t gen;              /* generation of the armed poll */
    bool queued;               /* in the arm list */
    bool dead;                 /* polling failed (fd closed behind our back): stop */
    int next_arm;
    struct uop *wop;           /* the sendall or connect in flight on this socket */
    struct uop *rhead, *rtail; /* receives/accepts: only the head is in the kernel */
};

struct ur {
    struct io_uring ring;
    struct ufd *fds;
    int nfds;
    int arm_head, arm_tail;    /* fds to (re)arm at the next poll(); -1: none */
    struct uop *ops;           /* every live operation */
    struct uop *bl_head, *bl_tail;
    uint64_t *rm;              /* poll removals that found no SQE */
    size_t nrm, caprm;
    size_t in_kernel;          /* operations with a completion to come */
    struct uop *spare;         /* freed small operations kept for reuse (linked by next) */
    int nspare;
    bool closing;
    bool ppoll_wait;           /* block in ppoll on the ring fd, not io_uring_enter (valgrind) */
};

static void on_withdraw(void *arg);

/* ----- SQEs ------------------------------------------------------------------------------ */

/* A free SQE, submitting what is queued to make room if needed; NULL when the kernel will
 * not take more right now (the caller backlogs its work). */
static struct io_uring_sqe *get_sqe(struct ur *u)
{
    struct io_uring_sqe *s = io_uring_get_sqe(&u->ring);
    if (s) return s;
    if (io_uring_submit(&u->ring) < 0) return NULL;
    return io_uring_get_sqe(&u->ring);
}

static inline uint64_t poll_ud(int fd, uint32_t gen)
{
    return ((uint64_t)gen << 32) | ((uint64_t)(unsigned)fd << 3) | TAG_POLL;
}

static int fds_grow(struct ur *u, int fd)
{
    if (fd < u->nfds) return 0;
    if (fd >= (1 << 29)) return -EINVAL; /* does not fit in user_data */
    int n = u->nfds ? u->nfds : 64;
    while (n <= fd) n *= 2;
    struct ufd *t = realloc(u->fds, (size_t)n * sizeof *t);
    if (!t) return -ENOMEM;
    memset(t + u->nfds, 0, (size_t)(n - u->nfds) * sizeof *t);
    u->fds = t;
    u->nfds = n;
    return 0;
}

/* ----- level-triggered polls ------------------------------------------------------------ */

static void arm_queue(struct ur *u, int fd)
{
    struct ufd *f = &u->fds[fd];
    if (f->queued) return;
    f->queued = true;
    f->next_arm = -1;
    if (u->arm_tail >= 0) u->fds[u->arm_tail].next_arm = fd;
    else u->arm_head = fd;
    u->arm_tail = fd;
}

static void poll_remove(struct ur *u, uint64_t ud)
{
    struct io_uring_sqe *s = get_sqe(u);
    if (s) {
        io_uring_prep_poll_remove(s, ud);
        io_uring_sqe_set_data64(s, TAG_IGNORE);
        io_uring_submit(&u->ring);
        return;
    }
    if (u->nrm == u->caprm) {
        size_t cap = u->caprm ? u->caprm * 2 : 16;
        uint64_t *p = realloc(u->rm, cap * sizeof *p);
        if (!p) {
            /* The poll then stays armed until it fires or the ring closes; its completion
             * is stale and ignored. Only the file's release is delayed. */
            ca__log(CA_LOG_WARNING, "io_uring: out of memory, a poll removal is delayed");
            return;
        }
        u->rm = p;
        u->caprm = cap;
    }
    u->rm[u->nrm++] = ud;
}

static int ur_modify(ca_loop *loop, int fd, unsigned old_ev, unsigned new_ev)
{
    (void)old_ev;
    struct ur *u = loop->be_data;
    int r = fds_grow(u, fd);
    if (r) return r;
    struct ufd *f = &u->fds[fd];
    f->want = new_ev;
    f->dead = false;
    if (f->armed && f->armed != new_ev) {
        uint64_t ud = poll_ud(fd, f->gen);
        f->armed = 0;
        f->gen++;
        poll_remove(u, ud);
    }
    if (new_ev && !f->armed) arm_queue(u, fd);
    return 0;
}

/* Arms the queued fds; false if the SQ could not take them all (they stay queued). */
static bool arm_flush(struct ur *u)
{
    while (u->arm_head >= 0) {
        int fd = u->arm_head;
        struct ufd *f = &u->fds[fd];
        if (f->want && !f->armed && !f->dead) {
            struct io_uring_sqe *s = get_sqe(u);
            if (!s) return false;
            unsigned mask = ((f->want & CA__READ) ? POLLIN : 0u) |
                            ((f->want & CA__WRITE) ? POLLOUT : 0u);
            f->gen++;
            f->armed = f->want;
            io_uring_prep_poll_add(s, fd, mask);
            io_uring_sqe_set_data64(s, poll_ud(fd, f->gen));
        }
        u->arm_head = f->next_arm;
        if (u->arm_head < 0) u->arm_tail = -1;
        f->queued = false;
    }
    return true;
}

static void poll_done(ca_loop *loop, int fd, uint32_t gen, int res)
{
    struct ur *u = loop->be_data;
    if (fd >= u->nfds || u->fds[fd].gen != gen || !u->fds[fd].armed) return; /* stale */
    struct ufd *f = &u->fds[fd];
    f->armed = 0;
    if (u->closing) return;
    if (res < 0) {
        if (res == -ECANCELED) {
            /* Not by us (ours are stale by now): keep the promise and poll again. */
            if (f->want) arm_queue(u, fd);
            return;
        }
        /* -EBADF: the fd was closed behind our back. Like the poll loop, log and stop
         * polling it (until the core changes its interest again), rather than spin. */
        f->dead = true;
        ca__log(CA_LOG_WARNING, "io_uring: cannot poll fd %d (%s); no longer watching it", fd,
                ca_strerror(res));
        return;
    }
    unsigned rev = 0;
    if ((unsigned)res & ~(unsigned)POLLOUT) rev |= CA__READ;   /* IN, HUP, ERR, PRI */
    if ((unsigned)res & ~(unsigned)POLLIN) rev |= CA__WRITE;   /* OUT, HUP, ERR */
    ca__loop_io(loop, fd, rev);
    /* The callbacks may have changed the interest (and moved the table). */
    if (fd < u->nfds) {
        f = &u->fds[fd];
        if (f->want && !f->armed) arm_queue(u, fd);
    }
}

/* ----- operations: lifetime --------------------------------------------------------------- */

static inline uint64_t op_ud(struct uop *op) { return (uint64_t)(uintptr_t)op | TAG_OP; }

static void backlog_push(struct ur *u, struct uop *op, bool cancel)
{
    op->want_cancel = cancel;
    if (op->backlogged) return;
    op->backlogged = true;
    op->bl_next = NULL;
    if (u->bl_tail) u->bl_tail->bl_next = op;
    else u->bl_head = op;
    u->bl_tail = op;
}

static void backlog_remove(struct ur *u, struct uop *op)
{
    if (!op->backlogged) return;
    struct uop **pp = &u->bl_head, *prev = NULL;
    while (*pp != op) {
        prev = *pp;
        pp = &(*pp)->bl_next;
    }
    *pp = op->bl_next;
    if (u->bl_tail == op) u->bl_tail = prev;
    op->backlogged = false;
}

static void op_submit(struct ur *u, struct uop *op);

/* Takes op out of its fd's receive queue; the next one in line goes to the kernel. */
static void rq_unlink(struct ur *u, struct uop *op)
{
    if (!op->in_rq) return;
    op->in_rq = false;
    struct ufd *f = &u->fds[op->fd];
    struct uop **pp = &f->rhead, *prev = NULL;
    while (*pp != op) {
        prev = *pp;
        pp = &(*pp)->rq_next;
    }
    bool was_head = (f->rhead == op);
    *pp = op->rq_next;
    if (f->rtail == op) f->rtail = prev;
    op->rq_next = NULL;
    /* The next one in line goes to the kernel (a cancelled one left the queue when cancelled). */
    struct uop *next = f->rhead;
    if (was_head && next && !u->closing && !ca_future_done(next->fut)) op_submit(u, next);
}

/* Frees (or keeps for reuse) an operation that is in no list. */
static void op_free_unlinked(struct ur *u, struct uop *op)
{
    if (op->cap == POOL_CAP && u->nspare < POOL_MAX) {
        op->next = u->spare;
        u->spare = op;
        u->nspare++;
    } else {
        free(op);
    }
}

static void op_free(struct ur *u, struct uop *op)
{
    backlog_remove(u, op);
    rq_unlink(u, op);
    if (op->prev) op->prev->next = op->next;
    else u->ops = op->next;
    if (op->next) op->next->prev = op->prev;
    if (op->fd < u->nfds && u->fds[op->fd].wop == op) u->fds[op->fd].wop = NULL;
    ca_future_unref(op->fut);
    op_free_unlinked(u, op);
}

/* Prepares the SQE that (re)starts op. */
static void op_prep(struct uop *op, struct io_uring_sqe *s)
{
    switch (op->kind) {
    case UOP_RECV:
        /* Valgrind cannot see the kernel write the buffer through the ring. */
        if (((struct ur *)op->loop->be_data)->ppoll_wait) memset(op->bounce, 0, op->n);
        io_uring_prep_recv(s, op->fd, op->bounce, op->n, 0);
        break;
    case UOP_RECV_POLL:
        io_uring_prep_poll_add(s, op->fd, POLLIN);
        break;
    case UOP_SEND_POLL:
        io_uring_prep_poll_add(s, op->fd, POLLOUT);
        break;
    case UOP_ACCEPT:
        io_uring_prep_accept(s, op->fd, NULL, NULL, SOCK_CLOEXEC | SOCK_NONBLOCK);
        break;
    case UOP_CONNECT:
        io_uring_prep_connect(s, op->fd, (struct sockaddr *)&op->addr, op->alen);
        break;
    case UOP_CONNECT_POLL:
        io_uring_prep_poll_add(s, op->fd, POLLOUT);
        break;
    }
    io_uring_sqe_set_data64(s, op_ud(op));
}

static void op_submit(struct ur *u, struct uop *op)
{
    struct io_uring_sqe *s = get_sqe(u);
    if (!s) {
        backlog_push(u, op, false);
        return;
    }
    op_prep(op, s);
    op->in_kernel = true;
    u->in_kernel++;
}

static void op_cancel(struct ur *u, struct uop *op)
{
    if (op->cancel_sent || !op->in_kernel) return;
    struct io_uring_sqe *s = get_sqe(u);
    if (!s) {
        backlog_push(u, op, true);
        return;
    }
    io_uring_prep_cancel64(s, op_ud(op), 0);
    io_uring_sqe_set_data64(s, TAG_IGNORE);
    op->cancel_sent = true;
}

/* Submits the backlog; false if the SQ could not take it all. */
static bool backlog_flush(struct ur *u)
{
    while (u->nrm) {
        struct io_uring_sqe *s = get_sqe(u);
        if (!s) return false;
        io_uring_prep_poll_remove(s, u->rm[--u->nrm]);
        io_uring_sqe_set_data64(s, TAG_IGNORE);
    }
    while (u->bl_head) {
        struct uop *op = u->bl_head;
        struct io_uring_sqe *s = get_sqe(u);
        if (!s) return false;
        u->bl_head = op->bl_next;
        if (!u->bl_head) u->bl_tail = NULL;
        op->backlogged = false;
        if (op->want_cancel) {
            io_uring_prep_cancel64(s, op_ud(op), 0);
            io_uring_sqe_set_data64(s, TAG_IGNORE);
            op->cancel_sent = true;
        } else {
            op_prep(op, s);
            op->in_kernel = true;
            u->in_kernel++;
        }
    }
    return true;
}

/* The operation is over by itself: complete the future (err < 0: failure), handing the
 * operation's reference to the future's callbacks, and free op. */
static void op_finish(struct ur *u, struct uop *op, intptr_t result, int err)
{
    ca_future *fut = op->fut;
    op->fut = NULL;
    ca__future_finish(fut, err, (void *)result);
    op_free(u, op);
}

/* The future was completed by someone else (cancelled), inside that call (the operation owns
 * its future: ca__future_set_owner): withdraw the operation. It is freed here if the kernel
 * has nothing of it, else when its completion comes. The canceller holds a reference to the
 * future, so op_free's is not the last. */
static void on_withdraw(void *arg)
{
    struct uop *op = arg;
    struct ur *u = op->loop->be_data;
    op->withdrawn = true;
    if (op->in_kernel) {
        op_cancel(u, op);
        return;
    }
    op_free(u, op);
}

static bool retry_err(int res)
{
    return res == -EAGAIN || res == -EWOULDBLOCK || res == -EINTR;
}

/* send(2) from buf + *off until all n bytes are sent (0), the socket is full (-EAGAIN) or
 * it fails (a negative errno). */
static int send_some(int fd, const char *buf, size_t n, size_t *off)
{
    while (*off < n) {
        ssize_t k = send(fd, buf + *off, n - *off, MSG_DONTWAIT | MSG_NOSIGNAL);
        if (k < 0) {
            if (errno == EINTR) continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK) return -EAGAIN;
            return -errno;
        }
        *off += (size_t)k;
    }
    return 0;
}

static void op_done(ca_loop *loop, struct uop *op, int res)
{
    struct ur *u = loop->be_data;
    op->in_kernel = false;
    u->in_kernel--;
    if (u->closing || ca_future_done(op->fut)) {
        /* Withdrawn: nothing reaches the user. An accepted connection nobody waits for is
         * closed, as the kernel would have kept it in the backlog otherwise. */
        if (op->kind == UOP_ACCEPT && res >= 0) close(res);
        if (!u->closing && op->withdrawn) op_free(u, op);
        return;
    }
    switch (op->kind) {
    case UOP_RECV:
        if (retry_err(res)) break;
        if (res > 0) memcpy(op->ubuf, op->bounce, (size_t)res);
        op_finish(u, op, res, res < 0 ? res : 0);
        return;
    case UOP_RECV_POLL: {
        /* Readable (or an error or hang-up to read): the future is pending, so the
         * caller's buffer is still theirs to give; recv(2) says what it is. */
        if (res < 0 && !retry_err(res)) {
            op_finish(u, op, 0, res);
            return;
        }
        ssize_t k = recv(op->fd, op->ubuf, op->n, MSG_DONTWAIT);
        if (k >= 0) {
            op_finish(u, op, k, 0);
            return;
        }
        if (!retry_err(-errno)) {
            op_finish(u, op, 0, -errno);
            return;
        }
        break;
    }
    case UOP_SEND_POLL: {
        if (res < 0 && !retry_err(res)) {
            op_finish(u, op, 0, res);
            return;
        }
        int err = send_some(op->fd, op->ubuf, op->n, &op->off);
        if (err != -EAGAIN) {
            op_finish(u, op, 0, err);
            return;
        }
        break;
    }
    case UOP_ACCEPT:
        if (retry_err(res)) break;
        op_finish(u, op, res, res < 0 ? res : 0);
        return;
    case UOP_CONNECT:
        /* Kernels that hand back EINPROGRESS (or EALREADY) from a non-blocking connect:
         * wait for writability and read SO_ERROR then, as the selector path does. */
        if (res == -EINPROGRESS || res == -EALREADY || res == -EINTR) {
            op->kind = UOP_CONNECT_POLL;
            break;
        }
        if (res == -EAGAIN) break; /* a full AF_UNIX backlog: try again */
        op_finish(u, op, 0, res);
        return;
    case UOP_CONNECT_POLL: {
        if (res < 0 && res != -EINTR) {
            op_finish(u, op, 0, res);
            return;
        }
        int soerr = 0;
        socklen_t len = sizeof soerr;
        if (getsockopt(op->fd, SOL_SOCKET, SO_ERROR, &soerr, &len) < 0) soerr = errno;
        if (soerr == EINPROGRESS || soerr == EALREADY) break;
        op_finish(u, op, 0, -soerr);
        return;
    }
    }
    op_submit(u, op); /* the next round of a partial send, or a retry */
}

/* ----- reaping ----------------------------------------------------------------------------- */

static void dispatch(ca_loop *loop, uint64_t ud, int res)
{
    if (ud == LIBURING_UDATA_TIMEOUT) return;
    switch (ud & TAG_MASK) {
    case TAG_POLL:
        poll_done(loop, (int)((ud >> 3) & ((1u << 29) - 1)), (uint32_t)(ud >> 32), res);
        break;
    case TAG_OP:
        op_done(loop, (struct uop *)(uintptr_t)(ud & ~(uint64_t)TAG_MASK), res);
        break;
    default:
        break;
    }
}

/* Handles the completions that are there (flushing the kernel's overflow list too). The
 * CQEs are copied out before any callback runs: callbacks may submit, and submitting may
 * need the CQ to move. */
static void reap(ca_loop *loop)
{
    struct ur *u = loop->be_data;
    struct io_uring_cqe *cqes[64];
    struct {
        uint64_t ud;
        int res;
    } batch[64];
    for (int total = 0; total < REAP_MAX;) {
        unsigned n = io_uring_peek_batch_cqe(&u->ring, cqes, 64);
        if (!n) break;
        for (unsigned i = 0; i < n; i++) {
            batch[i].ud = cqes[i]->user_data;
            batch[i].res = cqes[i]->res;
        }
        io_uring_cq_advance(&u->ring, n);
        for (unsigned i = 0; i < n; i++) dispatch(loop, batch[i].ud, batch[i].res);
        total += (int)n;
    }
}

/* Valgrind runs one thread at a time and lets another run only while the first is in a
 * system call it knows may block; io_uring_enter is not one of them (valgrind 3.19), so a
 * loop waiting in it would starve the thread that wants to wake it. Under valgrind we submit
 * without waiting and block in ppoll on the ring fd instead (readable when completions are
 * there): one more system call per iteration, and the proactor can still be memchecked. */
static int ppoll_wait(struct ur *u, int64_t timeout_ns)
{
    int r = io_uring_submit_and_get_events(&u->ring);
    if (r < 0 && r != -EINTR && r != -EBUSY && r != -EAGAIN) return r;
    if (io_uring_cq_ready(&u->ring)) return 0;
    struct timespec ts, *tsp = NULL;
    if (timeout_ns > 0) {
        ts.tv_sec = (time_t)(timeout_ns / 1000000000);
        ts.tv_nsec = (long)(timeout_ns % 1000000000);
        tsp = &ts;
    }
    struct pollfd p = {.fd = u->ring.ring_fd, .events = POLLIN};
    if (ppoll(&p, 1, tsp, NULL) < 0 && errno != EINTR) return -errno;
    return io_uring_submit_and_get_events(&u->ring);
}

static bool under_valgrind(void)
{
    const char *p = getenv("LD_PRELOAD");
    return p && strstr(p, "vgpreload") != NULL;
}

static int ur_poll(ca_loop *loop, int64_t timeout_ns)
{
    struct ur *u = loop->be_data;
    /* Arm and start what this iteration queued. If the SQ refuses (an overflowing CQ on an
     * old kernel), make room by reaping, and do not block with work left behind. */
    bool all = backlog_flush(u) && arm_flush(u);
    if (!all) {
        reap(loop);
        all = backlog_flush(u) && arm_flush(u);
        if (!all) timeout_ns = 0;
    }
    int r = 0;
    if (timeout_ns == 0) {
        /* A busy iteration: enter the kernel only when there is something to submit or the
         * kernel has completions it posts only when we enter (IORING_SQ_TASKRUN with
         * COOP_TASKRUN) or holds back (IORING_SQ_CQ_OVERFLOW). Otherwise the CQ is all there
         * is, and a chain of callbacks costs no system call per iteration. */
        unsigned flags = IO_URING_READ_ONCE(*u->ring.sq.kflags);
        if (io_uring_sq_ready(&u->ring) || (flags & (IORING_SQ_TASKRUN | IORING_SQ_CQ_OVERFLOW)))
            r = io_uring_submit_and_get_events(&u->ring);
    } else if (u->ppoll_wait) {
        r = ppoll_wait(u, timeout_ns);
    } else {
        struct __kernel_timespec ts, *tsp = NULL;
        if (timeout_ns > 0) {
            ts.tv_sec = timeout_ns / 1000000000;
            ts.tv_nsec = timeout_ns % 1000000000;
            tsp = &ts;
        }
        struct io_uring_cqe *cqe;
        r = io_uring_submit_and_wait_timeout(&u->ring, &cqe, 1, tsp, NULL);
    }
    if (r == -EBADR) {
        /* The kernel could not keep an overflowing completion (out of memory even for its
         * overflow list): nothing we can recover, but say so instead of stopping the loop. */
        ca__log(CA_LOG_ERROR, "io_uring: the kernel dropped completions (CQ overflow)");
    } else if (r < 0 && r != -ETIME && r != -EINTR && r != -EAGAIN && r != -EBUSY) {
        return r;
    }
    reap(loop);
    return 0;
}

/* ----- init, fini, close --------------------------------------------------------------------- */

static unsigned env_entries(void)
{
    const char *s = getenv("CASYNCIO_URING_ENTRIES");
    if (!s || !*s) return 0;
    long v = strtol(s, NULL, 10);
    return v >= 1 && v <= 32768 ? (unsigned)v : 0;
}

static int ring_setup(struct io_uring *ring, bool plain)
{
    unsigned sq = DEFAULT_SQ, cq = DEFAULT_CQ, e = env_entries();
    if (e) {
        sq = e;
        cq = 2 * e;
    }
    static const unsigned extra[] = {
        IORING_SETUP_SUBMIT_ALL | IORING_SETUP_COOP_TASKRUN | IORING_SETUP_TASKRUN_FLAG,
        IORING_SETUP_SUBMIT_ALL,
        0,
    };
    int r = -EINVAL;
    /* Cooperative task running posts completions only when we enter the kernel: not what
     * the ppoll wait wants. */
    for (size_t i = plain ? 1 : 0; i < sizeof extra / sizeof extra[0]; i++) {
        struct io_uring_params p;
        memset(&p, 0, sizeof p);
        p.flags = IORING_SETUP_CQSIZE | IORING_SETUP_CLAMP | extra[i];
        p.cq_entries = cq;
        r = io_uring_queue_init_params(sq, ring, &p);
        if (r != -EINVAL) break;
    }
    if (r < 0) return r;
    unsigned need = IORING_FEAT_NODROP | IORING_FEAT_FAST_POLL;
    if ((ring->features & need) != need) {
        io_uring_queue_exit(ring);
        return -ENOSYS;
    }
    struct io_uring_probe *probe = io_uring_get_probe_ring(ring);
    static const int ops[] = {IORING_OP_RECV, IORING_OP_SEND, IORING_OP_ACCEPT,
                              IORING_OP_CONNECT, IORING_OP_POLL_ADD, IORING_OP_POLL_REMOVE,
                              IORING_OP_ASYNC_CANCEL};
    bool ok = probe != NULL;
    for (size_t i = 0; ok && i < sizeof ops / sizeof ops[0]; i++)
        ok = io_uring_opcode_supported(probe, ops[i]);
    if (probe) io_uring_free_probe(probe);
    if (!ok) {
        io_uring_queue_exit(ring);
        return -ENOSYS;
    }
    return 0;
}

static int ur_init(ca_loop *loop)
{
    const char *no = getenv("CASYNCIO_NO_IO_URING");
    if (no && *no && strcmp(no, "0") != 0) return -ENOSYS;
    struct ur *u = calloc(1, sizeof *u);
    if (!u) return -ENOMEM;
    u->ppoll_wait = under_valgrind();
    int r = ring_setup(&u->ring, u->ppoll_wait);
    if (r < 0) {
        free(u);
        return r;
    }
    u->arm_head = u->arm_tail = -1;
    loop->be_data = u;
    return 0;
}

static void ur_fini(ca_loop *loop, bool forked)
{
    struct ur *u = loop->be_data;
    /* Normally the operations are gone already (ur_close); in a forked child, or if close
     * could not wait for them all, only our memory is released here. */
    while (u->ops) {
        struct uop *op = u->ops;
        u->ops = op->next;
        if (op->in_kernel && !forked) {
            /* The kernel may still write into it: better leaked than corrupted. */
            continue;
        }
        ca_future_unref(op->fut);
        free(op);
    }
    while (u->spare) {
        struct uop *op = u->spare;
        u->spare = op->next;
        free(op);
    }
    io_uring_queue_exit(&u->ring);
    free(u->fds);
    free(u->rm);
    free(u);
    loop->be_data = NULL;
}

/* Closing with operations in flight: cancel them all, wait until the kernel has completed
 * every one (so it no longer touches their buffers), then cancel their futures. */
static void drain_ops(ca_loop *loop)
{
    struct ur *u = loop->be_data;
    u->closing = true;
    for (struct uop *op = u->ops; op; op = op->next) {
        backlog_remove(u, op);
        op_cancel(u, op);
    }
    int64_t deadline_left = CLOSE_WAIT_NS;
    while (u->in_kernel > 0 && deadline_left > 0) {
        backlog_flush(u);
        struct __kernel_timespec ts = {.tv_sec = 0, .tv_nsec = 100000000};
        struct io_uring_cqe *cqe;
        io_uring_submit_and_wait_timeout(&u->ring, &cqe, 1, &ts, NULL);
        reap(loop);
        deadline_left -= 100000000;
    }
    if (u->in_kernel > 0)
        ca__log(CA_LOG_WARNING, "io_uring: %zu operation(s) did not finish at close; their "
                "memory is leaked rather than freed under the kernel", u->in_kernel);
    struct uop *op = u->ops;
    while (op) {
        struct uop *next = op->next;
        if (!op->in_kernel) {
            /* Still pending (a withdrawn one is freed when the kernel is done with it). */
            ca__future_set_owner(op->fut, NULL, NULL);
            ca_future_cancel(op->fut);
            op_free(u, op);
        }
        op = next;
    }
}

static int ur_close(ca_loop *self)
{
    if (self->be_data) drain_ops(self);
    return ca__core_close(self);
}

/* ----- socket operations ---------------------------------------------------------------------- */

/* A zeroed operation with room for a bounce of cap bytes (small ones come from the pool). */
static struct uop *op_alloc(struct ur *u, size_t cap)
{
    struct uop *op;
    if (cap <= POOL_CAP) {
        cap = POOL_CAP;
        op = u->spare;
        if (op) {
            u->spare = op->next;
            u->nspare--;
        } else if (!(op = malloc(sizeof *op + cap))) {
            return NULL;
        }
    } else if (!(op = malloc(sizeof *op + cap))) {
        return NULL;
    }
    memset(op, 0, offsetof(struct uop, addr));
    op->cap = cap;
    return op;
}

/* Starts an operation that has to wait: off is what a sendall sent already. */
static int op_start(ca_loop *loop, enum uop_kind kind, int fd, void *buf, size_t n, size_t off,
                    const struct sockaddr *addr, socklen_t alen, ca_future **out)
{
    struct ur *u = loop->be_data;
    int r = fds_grow(u, fd);
    if (r) return r;
    bool writes = (kind == UOP_SEND_POLL || kind == UOP_CONNECT);
    if (writes && u->fds[fd].wop) return -EBUSY;
    ca_future *fut = NULL;
    r = ca_future_new(loop, &fut);
    if (r) return r;
    struct uop *op = op_alloc(u, kind == UOP_RECV ? n : 0);
    if (!op) {
        ca_future_unref(fut);
        return -ENOMEM;
    }
    op->kind = kind;
    op->fd = fd;
    op->loop = loop;
    op->ubuf = buf;
    op->n = n;
    op->off = off;
    if (addr) {
        memcpy(&op->addr, addr, alen);
        op->alen = alen;
    }
    ca__future_set_owner(fut, on_withdraw, op);
    op->fut = ca_future_ref(fut);
    op->next = u->ops;
    if (u->ops) u->ops->prev = op;
    u->ops = op;
    *out = fut;
    struct ufd *f = &u->fds[fd];
    if (writes) {
        f->wop = op;
    } else {
        /* Several receives (or accepts) on one socket: the kernel would wake them all and
         * let any one of them take the data, so they go to the kernel one at a time, in the
         * order they were asked for, as on the selector loops. */
        op->in_rq = true;
        bool first = (f->rhead == NULL);
        if (first) f->rhead = op;
        else f->rtail->rq_next = op;
        f->rtail = op;
        if (!first) return 0;
    }
    op_submit(u, op);
    return 0;
}

/* recv and sendall try the system call at once, as the selector loops do (asyncio's
 * sock_recv / sock_sendall): what the socket can do now costs one recv(2) or send(2) and no
 * trip through the ring, and no copy. ca_loop_sock_recv / sock_sendall leave the check that
 * the fd is open to us: that first call's EBADF is the answer (-EINVAL, before any future
 * exists). Only what has to wait becomes an operation: a small recv an IORING_OP_RECV into
 * a bounce buffer (a copy of a few bytes is cheaper than one more system call), a large one
 * (and the rest of a sendall) a poll followed by recv(2) (send(2)) on the caller's buffer,
 * made while the future is pending: the kernel never holds the caller's memory, so a cancel
 * needs no copy to be safe. */
static int ur_sock_recv(ca_loop *self, int fd, void *buf, size_t n, ca_future **out)
{
    struct ur *u = self->be_data;
    if (n > RECV_MAX) n = RECV_MAX;
    if (fd < u->nfds && u->fds[fd].rhead) {
        /* Queued behind other receives: it waits its turn (or it would take their data). */
        if (fcntl(fd, F_GETFD) < 0) return -EINVAL;
    } else {
        ssize_t k = recv(fd, buf, n, MSG_DONTWAIT);
        if (k >= 0) return ca__future_new_done(self, k, 0, out);
        int e = errno;
        if (e == EBADF) return -EINVAL;
        if (!retry_err(-e)) return ca__future_new_done(self, 0, -e, out);
    }
    return op_start(self, n <= RECV_COPY_MAX ? UOP_RECV : UOP_RECV_POLL, fd, buf, n, 0, NULL, 0,
                    out);
}

static int ur_sock_sendall(ca_loop *self, int fd, const void *buf, size_t n, ca_future **out)
{
    struct ur *u = self->be_data;
    if (fd < u->nfds && u->fds[fd].wop) return -EBUSY;
    if (n == 0) {
        if (fcntl(fd, F_GETFD) < 0) return -EINVAL;
        return ca__future_new_done(self, 0, 0, out);
    }
    size_t off = 0;
    int err = send_some(fd, buf, n, &off);
    if (err == -EBADF && off == 0) return -EINVAL;
    if (err != -EAGAIN) return ca__future_new_done(self, 0, err, out);
    return op_start(self, UOP_SEND_POLL, fd, (void *)buf, n, off, NULL, 0, out);
}

static int ur_sock_accept(ca_loop *self, int fd, ca_future **out)
{
    return op_start(self, UOP_ACCEPT, fd, NULL, 0, 0, NULL, 0, out);
}

static int ur_sock_connect(ca_loop *self, int fd, const struct sockaddr *addr, socklen_t len,
                           ca_future **out)
{
    return op_start(self, UOP_CONNECT, fd, NULL, 0, 0, addr, len, out);
}

/* ----- tables -------------------------------------------------------------------------------- */

const ca__backend ca__backend_uring = {
    .name = "io_uring",
    .init = ur_init,
    .fini = ur_fini,
    .modify = ur_modify,
    .poll = ur_poll,
};

static const ca_loop_ops uring_ops = {
    .run_forever = ca__core_run_forever,
    .stop = ca__core_stop,
    .close = ur_close,
    .call_soon = ca__core_call_soon,
    .call_soon_threadsafe = ca__core_call_soon_threadsafe,
    .call_at = ca__core_call_at,
    .add_reader = ca__core_add_reader,
    .remove_reader = ca__core_remove_reader,
    .add_writer = ca__core_add_writer,
    .remove_writer = ca__core_remove_writer,
    .add_signal_handler = ca__core_add_signal_handler,
    .remove_signal_handler = ca__core_remove_signal_handler,
    .sock_recv = ur_sock_recv,
    .sock_sendall = ur_sock_sendall,
    .sock_accept = ur_sock_accept,
    .sock_connect = ur_sock_connect,
    .destroy = ca__core_destroy,
};

int ca_proactor_loop_new(ca_loop **out)
{
    if (!out) return -EINVAL;
    return ca__builtin_loop_new(&ca__backend_uring, &uring_ops, "io_uring", out);
}
