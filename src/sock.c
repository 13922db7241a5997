/*
 * The socket operations (asyncio's loop.sock_recv / sock_sendall / sock_accept / sock_connect).
 *
 * The public functions check their arguments and the loop's state, then hand the operation to
 * the loop's ops->sock_* member when it has one (the io_uring proactor does: completion-based
 * operations in loop_uring.c). Every other loop, the selectors and custom loops without sock_*
 * members, gets the generic implementation below, which is asyncio's selector_events.py
 * written in C: try the non-blocking call at once, and if it would block, wait with a reader
 * (recv, accept) or a writer (sendall, connect) and try again each time the fd is ready.
 *
 * Per loop, the generic code keeps a small table indexed by fd (loop->sock): a FIFO of the
 * operations waiting for readability and the one operation waiting for writability. Several
 * receives or accepts on one socket are served in order (asyncio would let the second replace
 * the first's reader and strand it); a second sendall (or a sendall during a connect, or the
 * reverse) gives -EBUSY, so data is never reordered. The table is freed by a close hook, which
 * also cancels the futures of the operations still pending.
 *
 * A waiting operation owns its future (ca__future_set_owner): cancelling the future (or any
 * completion that is not the operation's own) withdraws the operation inside that call, so a
 * queued operation's future is always pending. When the operation completes by itself it
 * completes the future with ca__future_finish, which hands the operation's reference to the
 * future's callbacks. Nothing is touched in the user's buffer once the future is done, since
 * the system calls are made only while it is pending.
 *
 * The common path is kept short because a round trip is a handful of system calls: the first
 * attempt is made before anything is allocated (an operation that completes at once needs
 * only its future), finished operations go back to a small free list, and on an open loop in
 * its own thread the fd is not checked with fcntl() up front: the first attempt's EBADF is
 * the same answer, turned into -EINVAL before any future exists. Readers and writers are set
 * through the loop's ops directly, since sock_check() already did what ca_loop_add_reader()
 * would check again (with one more fcntl()).
 */
#include "loop_internal.h"

#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

enum gop_kind { GOP_RECV, GOP_SEND, GOP_ACCEPT, GOP_CONNECT };

struct gop {
    enum gop_kind kind;
    int fd;
    bool queued;                   /* in its fd's read queue or write slot */
    bool connect_again;            /* connect() said EAGAIN (AF_UNIX): call it again when ready */
    struct ca__sock_state *st;
    ca_future *fut;                /* our reference */
    void *buf;
    size_t n, off;
    struct gop *qnext;             /* read queue of the fd */
    struct gop *prev, *next;       /* every live operation of the loop */
    socklen_t alen;
    struct sockaddr_storage addr;
};

struct gfd {
    struct gop *rhead, *rtail;     /* recv/accept, served in order */
    struct gop *wop;               /* sendall or connect */
};

struct ca__sock_state {
    ca_loop *loop;
    struct gfd *fds;
    int nfds;
    struct gop *all;               /* every live operation, for the close hook */
    struct gop *spare;             /* freed operations kept for reuse (linked by next) */
    int nspare;
    void *close_token;
};

/* Enough spare operations for one batch of completions (epoll hands over up to 256 ready fds
 * at a time, and their callbacks start as many new operations), few enough to stay small
 * (about 50 KB). */
enum { SPARE_MAX = 256 };

static void on_readable(void *arg);
static void on_writable(void *arg);
static void on_withdraw(void *arg);

/* ----- per-loop state ----------------------------------------------------------------- */

static void state_close_hook(void *arg)
{
    struct ca__sock_state *st = arg;
    ca_loop *loop = st->loop;
    bool forked = loop->fork_gen != ca__fork_gen();
    /* The loop is closing: its readers and writers are dropped by the core and no callback
     * runs any more, so a done callback still scheduled for one of these operations will never
     * run either. Cancel the futures that are still pending (asyncio's futures would stay
     * pending forever; ours tell their waiters the operation is over) and free everything. */
    while (st->all) {
        struct gop *op = st->all;
        st->all = op->next;
        ca__future_set_owner(op->fut, NULL, NULL);
        if (!forked) ca_future_cancel(op->fut);
        ca_future_unref(op->fut);
        free(op);
    }
    while (st->spare) {
        struct gop *op = st->spare;
        st->spare = op->next;
        free(op);
    }
    free(st->fds);
    loop->sock = NULL;
    free(st);
}

static struct ca__sock_state *state_get(ca_loop *loop)
{
    if (loop->sock) return loop->sock;
    struct ca__sock_state *st = calloc(1, sizeof *st);
    if (!st) return NULL;
    st->loop = loop;
    st->close_token = ca__loop_add_close_hook(loop, state_close_hook, st);
    if (!st->close_token) {
        free(st);
        return NULL;
    }
    loop->sock = st;
    return st;
}

static struct gfd *state_fd(struct ca__sock_state *st, int fd)
{
    if (fd >= st->nfds) {
        struct gfd *t = ca__fdtab_grow(st->fds, &st->nfds, fd, sizeof *t);
        if (!t) return NULL;
        st->fds = t;
    }
    return &st->fds[fd];
}

/* ----- operation lifetime ---------------------------------------------------------------- */

/* A live operation holding a reference to fut; the caller fills in what it is. */
static struct gop *op_new(struct ca__sock_state *st, ca_future *fut)
{
    struct gop *op = st->spare;
    if (op) {
        st->spare = op->next;
        st->nspare--;
    } else {
        op = malloc(sizeof *op);
        if (!op) return NULL;
    }
    op->queued = false;
    op->st = st;
    op->fut = ca_future_ref(fut);
    op->qnext = NULL;
    op->prev = NULL;
    op->next = st->all;
    if (st->all) st->all->prev = op;
    st->all = op;
    return op;
}

/* Unlinks and frees op; its reference to the future is gone already (or dropped here). */
static void op_free(struct gop *op, bool unref)
{
    struct ca__sock_state *st = op->st;
    if (op->prev) op->prev->next = op->next;
    else st->all = op->next;
    if (op->next) op->next->prev = op->prev;
    if (unref) ca_future_unref(op->fut);
    if (st->nspare < SPARE_MAX) {
        op->next = st->spare;
        st->spare = op;
        st->nspare++;
    } else {
        free(op);
    }
}

/* Sets our reader or writer of fd, without the public wrappers' checks (and their fcntl()):
 * the caller checked the loop, its thread and the fd already. A built-in loop's core marks it
 * as ours (epoll registers an fd watched only by us one-shot, so that the interest of an
 * operation that completed needs no epoll_ctl DEL: see loop_epoll.c); a custom loop gets its
 * own add_reader / add_writer. */
static int arm(ca_loop *loop, bool writes, int fd, ca_callback_fn fn, void *arg)
{
    if (loop->be) return ca__loop_sock_watch(loop, fd, writes ? CA__WRITE : CA__READ, fn, arg);
    int (*add)(ca_loop *, int, ca_callback_fn, void *) =
        writes ? loop->ops->add_writer : loop->ops->add_reader;
    if (!add) return -ENOTSUP;
    return add(loop, fd, fn, arg);
}

/* Removes our reader or writer of fd. */
static void disarm(ca_loop *loop, bool writes, int fd)
{
    if (loop->be) ca__loop_sock_unwatch(loop, fd, writes ? CA__WRITE : CA__READ);
    else if (writes) ca_loop_remove_writer(loop, fd);
    else ca_loop_remove_reader(loop, fd);
}

/* Takes op out of its fd's queue and points the fd's reader or writer at whoever is next. */
static void op_unqueue(struct gop *op)
{
    if (!op->queued) return;
    op->queued = false;
    ca_loop *loop = op->st->loop;
    struct gfd *f = &op->st->fds[op->fd];
    if (op->kind == GOP_RECV || op->kind == GOP_ACCEPT) {
        struct gop **pp = &f->rhead, *prev = NULL;
        while (*pp != op) {
            prev = *pp;
            pp = &(*pp)->qnext;
        }
        bool was_head = (f->rhead == op);
        *pp = op->qnext;
        if (f->rtail == op) f->rtail = prev;
        op->qnext = NULL;
        if (!was_head) return;
        /* The reader's argument is the head of the queue. Re-pointing it cannot fail for lack
         * of memory (the fd is already registered); if it did anyway, the waiting operations
         * would stall, so fail them rather than leave them hanging. */
        if (f->rhead) {
            if (arm(loop, false, op->fd, on_readable, f->rhead) < 0)
                ca__log(CA_LOG_ERROR, "sock: cannot re-arm the reader of fd %d", op->fd);
        } else {
            disarm(loop, false, op->fd);
        }
    } else {
        f->wop = NULL;
        disarm(loop, true, op->fd);
    }
}

/* The operation is over by itself: complete its future (err < 0: failure), handing the
 * operation's reference to the future's callbacks, and free it. */
static void op_finish(struct gop *op, intptr_t result, int err)
{
    op_unqueue(op);
    ca__future_finish(op->fut, err, (void *)result);
    op_free(op, false);
}

/* The future was completed by someone else (cancelled), inside that call: withdraw the
 * operation. The caller of the cancel holds a reference, so ours is not the last. */
static void on_withdraw(void *arg)
{
    struct gop *op = arg;
    op_unqueue(op);
    op_free(op, true);
}

/* ----- the non-blocking attempts --------------------------------------------------------- */

static inline bool would_block(int e) { return e == EAGAIN || e == EWOULDBLOCK || e == EINTR; }

/* Each returns 1 when the operation is over (*res or *err set), 0 to wait for readiness. They
 * take plain values, so that the first attempt needs no operation. */
static inline int try_recv(int fd, void *buf, size_t n, intptr_t *res, int *err)
{
    ssize_t k = recv(fd, buf, n, MSG_DONTWAIT);
    if (k >= 0) {
        *res = k;
        return 1;
    }
    if (would_block(errno)) return 0;
    *err = -errno;
    return 1;
}

/* *off: how much is sent already. */
static inline int try_send(int fd, const void *buf, size_t n, size_t *off, intptr_t *res,
                           int *err)
{
    while (*off < n) {
        ssize_t k = send(fd, (const char *)buf + *off, n - *off, MSG_DONTWAIT | MSG_NOSIGNAL);
        if (k < 0) {
            if (errno == EINTR) continue;
            if (would_block(errno)) return 0;
            *err = -errno;
            return 1;
        }
        *off += (size_t)k;
    }
    *res = 0;
    return 1;
}

static int try_accept(int fd, intptr_t *res, int *err)
{
    int c = accept4(fd, NULL, NULL, SOCK_CLOEXEC | SOCK_NONBLOCK);
    if (c >= 0) {
        *res = c;
        return 1;
    }
    if (would_block(errno)) return 0;
    *err = -errno;
    return 1;
}

/* connect(). EINPROGRESS (or EINTR, after which the connection goes on in the background)
 * means wait for writability and read SO_ERROR then, as asyncio does. EAGAIN (a full AF_UNIX
 * backlog) means nothing happened yet: *again, call connect() again when writable. */
static int try_connect(int fd, const struct sockaddr *addr, socklen_t alen, bool *again,
                       intptr_t *res, int *err)
{
    if (connect(fd, addr, alen) == 0) {
        *res = 0;
        return 1;
    }
    if (errno == EINPROGRESS || errno == EINTR) return 0;
    if (errno == EAGAIN) {
        *again = true;
        return 0;
    }
    *err = -errno;
    return 1;
}

/* A connect in progress became writable: its outcome is in SO_ERROR. */
static int try_connect_ready(struct gop *op, intptr_t *res, int *err)
{
    if (op->connect_again) {
        op->connect_again = false;
        return try_connect(op->fd, (const struct sockaddr *)&op->addr, op->alen,
                           &op->connect_again, res, err);
    }
    int soerr = 0;
    socklen_t len = sizeof soerr;
    if (getsockopt(op->fd, SOL_SOCKET, SO_ERROR, &soerr, &len) < 0) soerr = errno;
    if (soerr == 0) {
        *res = 0;
        return 1;
    }
    if (soerr == EINPROGRESS || soerr == EALREADY) return 0;
    *err = -soerr;
    return 1;
}

/* ----- readiness callbacks ---------------------------------------------------------------- */

/* The reader's argument is the head of the fd's queue (a cancelled operation left the queue
 * when it was cancelled). One completion per call keeps the loop fair among sockets; the
 * reader is level-triggered, so the next operation is tried on the next iteration. */
static void on_readable(void *arg)
{
    struct gop *op = arg;
    intptr_t res = 0;
    int err = 0;
    int done = op->kind == GOP_RECV ? try_recv(op->fd, op->buf, op->n, &res, &err)
                                    : try_accept(op->fd, &res, &err);
    if (done) op_finish(op, res, err);
}

static void on_writable(void *arg)
{
    struct gop *op = arg;
    intptr_t res = 0;
    int err = 0;
    int done = op->kind == GOP_SEND ? try_send(op->fd, op->buf, op->n, &op->off, &res, &err)
                                    : try_connect_ready(op, &res, &err);
    if (done) op_finish(op, res, err);
}

/* ----- starting an operation -------------------------------------------------------------- */

/* The operation could not be done at once: queue it behind the fd's reader or writer. */
static int start_waiting(ca_loop *loop, struct ca__sock_state *st, enum gop_kind kind, int fd,
                         void *buf, size_t n, size_t off, const struct sockaddr *addr,
                         socklen_t alen, bool again, ca_future **out)
{
    struct gfd *f = state_fd(st, fd);
    if (!f) return -ENOMEM;
    ca_future *fut = NULL;
    int r = ca_future_new(loop, &fut);
    if (r < 0) return r;
    struct gop *op = op_new(st, fut);
    if (!op) {
        ca_future_unref(fut);
        return -ENOMEM;
    }
    op->kind = kind;
    op->fd = fd;
    op->connect_again = again;
    op->buf = buf;
    op->n = n;
    op->off = off;
    op->alen = alen;
    if (addr) memcpy(&op->addr, addr, alen);
    bool writes = (kind == GOP_SEND || kind == GOP_CONNECT);
    if (writes) {
        r = arm(loop, true, fd, on_writable, op);
        if (r < 0) goto fail;
        f = &st->fds[fd];
        f->wop = op;
    } else {
        if (!f->rhead) {
            r = arm(loop, false, fd, on_readable, op);
            if (r < 0) goto fail;
            f = &st->fds[fd];
            f->rhead = op;
        } else {
            f->rtail->qnext = op;
        }
        f->rtail = op;
    }
    op->queued = true;
    ca__future_set_owner(fut, on_withdraw, op);
    *out = fut;
    return 0;
fail:
    /* A connect that was started cannot be taken back; the socket is the caller's to close. */
    op_free(op, true);
    ca_future_unref(fut);
    return r;
}

/* Tries the operation at once; if that settles it, *out is a completed future. Otherwise
 * the operation is queued behind the fd's reader or writer. fd_checked: the caller made sure
 * the fd is open (otherwise an EBADF from the first attempt means it is not: -EINVAL). */
static int generic_start(ca_loop *loop, enum gop_kind kind, int fd, void *buf, size_t n,
                         const struct sockaddr *addr, socklen_t alen, bool fd_checked,
                         ca_future **out)
{
    struct ca__sock_state *st = loop->sock;
    if (CA_UNLIKELY(!st) && !(st = state_get(loop))) return -ENOMEM;
    /* The table only grows for an operation that has to wait: a bad fd number must not make
     * it grow (a huge one would give -ENOMEM instead of -EINVAL). */
    struct gfd *f = fd < st->nfds ? &st->fds[fd] : NULL;
    bool writes = (kind == GOP_SEND || kind == GOP_CONNECT);
    /* Receives and accepts queued behind others must wait their turn, or they would take data
     * (or connections) meant for the earlier ones. */
    bool try_now = true;
    if (f) {
        if (writes && f->wop) return -EBUSY;
        if (!writes && f->rhead) try_now = false;
    }
    /* Without a system call to tell (a queued receive, an empty sendall), ask fcntl(). */
    if (!fd_checked && (!try_now || (kind == GOP_SEND && n == 0))) {
        if (fcntl(fd, F_GETFD) < 0) return -EINVAL;
        fd_checked = true;
    }
    intptr_t res = 0;
    int err = 0;
    size_t off = 0;
    bool again = false;
    if (try_now) {
        int done;
        switch (kind) {
        case GOP_RECV: done = try_recv(fd, buf, n, &res, &err); break;
        case GOP_SEND: done = try_send(fd, buf, n, &off, &res, &err); break;
        case GOP_ACCEPT: done = try_accept(fd, &res, &err); break;
        default: done = try_connect(fd, addr, alen, &again, &res, &err); break;
        }
        if (done) {
            /* Nothing was sent before an EBADF (the first call failed): the fd is not open. */
            if (err == -EBADF && !fd_checked) return -EINVAL;
            return ca__future_new_done(loop, res, err, out);
        }
    }
    return start_waiting(loop, st, kind, fd, buf, n, off, addr, alen, again, out);
}

/* ----- public functions --------------------------------------------------------------------- */

/* Checks shared by the four functions: bad argument, then fork, then closed, then thread.
 * *fd_checked tells whether the fd was found open here. On an open loop in its own thread
 * that hands the operation to the generic code, the check is left to the first attempt
 * (generic_start); every other case (an error to report, a loop with sock_* ops of its own)
 * asks fcntl() first, so that a bad fd still comes before the other errors. */
static int sock_check(ca_loop *loop, int fd, const void *out, bool generic, bool *fd_checked)
{
    if (!loop || fd < 0 || !out) return -EINVAL;
    if (CA_LIKELY(generic && (ca__running_here(loop) ||
                              (ca__loop_check(loop) == 0 && ca__loop_in_own_thread(loop))))) {
        *fd_checked = false;
        return 0;
    }
    if (fcntl(fd, F_GETFD) < 0) return -EINVAL;
    *fd_checked = true;
    int r = ca__loop_check(loop);
    if (r < 0) return r;
    if (!ca__loop_in_own_thread(loop)) return -EPERM;
    return 0;
}

/* The io_uring loop's recv and sendall try the system call first too, and tell a closed fd
 * by its EBADF as generic_start does: no fcntl() for them either. */
extern const ca__backend ca__backend_uring;

static inline bool checks_fd_itself(const ca_loop *loop, bool has_op)
{
    return !has_op || loop->be == &ca__backend_uring;
}

int ca_loop_sock_recv(ca_loop *loop, int fd, void *buf, size_t n, ca_future **out)
{
    if (!buf && n > 0) return -EINVAL;
    bool checked;
    int r = sock_check(loop, fd, out, loop && checks_fd_itself(loop, loop->ops->sock_recv),
                       &checked);
    if (r < 0) return r;
    if (loop->ops->sock_recv) return loop->ops->sock_recv(loop, fd, buf, n, out);
    return generic_start(loop, GOP_RECV, fd, buf, n, NULL, 0, checked, out);
}

int ca_loop_sock_sendall(ca_loop *loop, int fd, const void *buf, size_t n, ca_future **out)
{
    if (!buf && n > 0) return -EINVAL;
    bool checked;
    int r = sock_check(loop, fd, out, loop && checks_fd_itself(loop, loop->ops->sock_sendall),
                       &checked);
    if (r < 0) return r;
    if (loop->ops->sock_sendall) return loop->ops->sock_sendall(loop, fd, buf, n, out);
    return generic_start(loop, GOP_SEND, fd, (void *)buf, n, NULL, 0, checked, out);
}

int ca_loop_sock_accept(ca_loop *loop, int fd, ca_future **out)
{
    bool checked;
    int r = sock_check(loop, fd, out, loop && !loop->ops->sock_accept, &checked);
    if (r < 0) return r;
    if (loop->ops->sock_accept) return loop->ops->sock_accept(loop, fd, out);
    return generic_start(loop, GOP_ACCEPT, fd, NULL, 0, NULL, 0, checked, out);
}

int ca_loop_sock_connect(ca_loop *loop, int fd, const struct sockaddr *addr, socklen_t len,
                         ca_future **out)
{
    if (!addr || len == 0 || len > sizeof(struct sockaddr_storage)) return -EINVAL;
    bool checked;
    int r = sock_check(loop, fd, out, loop && !loop->ops->sock_connect, &checked);
    if (r < 0) return r;
    if (loop->ops->sock_connect) return loop->ops->sock_connect(loop, fd, addr, len, out);
    return generic_start(loop, GOP_CONNECT, fd, NULL, 0, addr, len, checked, out);
}
