/*
 * The epoll(7) backend: level-triggered, one epoll_pwait2 per iteration (nanosecond
 * timeouts, so timers do not wake up early or spin on a rounded-down millisecond; kernels
 * before 5.11 fall back to epoll_wait with the timeout rounded up).
 *
 * Quirks handled here:
 * - epoll registers open file descriptions, not fd numbers. An fd closed behind our back
 *   disappears from the interest set (when no dup of it survives), and its number may come
 *   back as a different file: MOD then fails with ENOENT and we ADD; ADD failing with EEXIST
 *   falls back to MOD. DEL errors are ignored (the registration is gone already).
 * - Regular files cannot be polled: epoll_ctl says EPERM, which add_reader returns.
 * - Fork: the child shares the parent's epoll instance. The core never calls epoll_ctl in a
 *   child; fini(forked) only closes the child's copy of the fd.
 * - EPOLLHUP/EPOLLERR are reported to both the reader and the writer (as Python's selectors
 *   do), so a reader sees EOF and a writer sees its error.
 * - The socket operations' readers and writers (sock.c) come and go with every operation
 *   that has to wait: an ADD when it starts, a DEL when it completes, two epoll_ctl calls per
 *   wait. The loop core marks the directions that are sock.c's (ca__fdent.sock), and an fd
 *   watched only by them is registered EPOLLONESHOT. Once such a registration has fired it is
 *   disabled in the kernel: removing the interest then needs no DEL (the registration is
 *   "parked": it can never report anything again, even if the user closes the fd while a dup
 *   keeps the file open, or the number is reused), and the next operation's interest is one
 *   MOD, which says ENOENT if the number now names another file (then we ADD). The loop
 *   core's view is unchanged: the reader is gone (remove_reader says 0), only the kernel keeps
 *   a disabled entry until the file is closed. A oneshot registration that fired and is still
 *   wanted after its callbacks ran (a spurious wake-up, or the other direction still waiting)
 *   is re-armed at once, so the level-triggered promise holds.
 */
#include "loop_internal.h"

#include <stdlib.h>
#include <sys/epoll.h>
#include <unistd.h>

#define MAX_EVENTS 256

struct epfd {
    unsigned want;             /* what the core asked for (CA__READ|CA__WRITE) */
    bool oneshot;              /* the kernel's registration is EPOLLONESHOT */
    bool fired;                /* ... and it fired: disabled until a MOD */
    bool parked;               /* no interest, but a fired (disabled) registration is left */
    uint32_t gen;              /* of the registration, in its event data next to the fd */
};

struct ep {
    int epfd;
    bool no_pwait2;
    struct epfd *st;
    int nst;
    struct epoll_event events[MAX_EVENTS];
};

static struct epfd *st_get(struct ep *ep, int fd)
{
    if (fd >= ep->nst) {
        struct epfd *t = ca__fdtab_grow(ep->st, &ep->nst, fd, sizeof *t);
        if (!t) return NULL;
        ep->st = t;
    }
    return &ep->st[fd];
}

static int ep_init(ca_loop *loop)
{
    struct ep *ep = calloc(1, sizeof *ep);
    if (!ep) return -ENOMEM;
    ep->epfd = epoll_create1(EPOLL_CLOEXEC);
    if (ep->epfd < 0) {
        int e = -errno;
        free(ep);
        return e;
    }
    loop->be_data = ep;
    return 0;
}

static void ep_fini(ca_loop *loop, bool forked)
{
    (void)forked;
    struct ep *ep = loop->be_data;
    close(ep->epfd);
    free(ep->st);
    free(ep);
    loop->be_data = NULL;
}

static int ep_modify(ca_loop *loop, int fd, unsigned old_ev, unsigned new_ev)
{
    struct ep *ep = loop->be_data;
    struct epfd *st = fd < ep->nst ? &ep->st[fd] : NULL;
    /* The state exists for the fds that sock.c watches (one-shot) or watched; without it (no
     * memory) an fd is simply registered level-triggered. */
    unsigned sock = fd < loop->nfds ? loop->fds[fd].sock : 0;
    if (!st && sock && new_ev) st = st_get(ep, fd);
    if (!new_ev) {
        if (st && st->oneshot && st->fired) {
            /* Disabled in the kernel since it fired: nothing to take out. */
            st->want = 0;
            st->parked = true;
            return 0;
        }
        epoll_ctl(ep->epfd, EPOLL_CTL_DEL, fd, NULL);
        if (st) {
            st->want = 0;
            st->oneshot = st->fired = st->parked = false;
        }
        return 0;
    }
    bool oneshot = st && (new_ev & ~sock) == 0;
    /* The generation tells an event of this registration from one that an earlier
     * registration of the fd (deleted and added again by a callback of the same batch)
     * delivered: only the former means that this one is disabled now. */
    uint32_t gen = st ? st->gen + 1 : 0;
    struct epoll_event ev = {
        .events = ((new_ev & CA__READ) ? EPOLLIN : 0u) | ((new_ev & CA__WRITE) ? EPOLLOUT : 0u) |
                  (oneshot ? (uint32_t)EPOLLONESHOT : 0u),
        .data.u64 = ((uint64_t)gen << 32) | (uint32_t)fd,
    };
    int op = old_ev || (st && st->parked) ? EPOLL_CTL_MOD : EPOLL_CTL_ADD;
    if (epoll_ctl(ep->epfd, op, fd, &ev) != 0) {
        if (op == EPOLL_CTL_MOD && errno == ENOENT) op = EPOLL_CTL_ADD;
        else if (op == EPOLL_CTL_ADD && errno == EEXIST) op = EPOLL_CTL_MOD;
        else return -errno;
        if (epoll_ctl(ep->epfd, op, fd, &ev) != 0) return -errno;
    }
    if (st) {
        st->gen = gen;
        st->want = new_ev;
        st->oneshot = oneshot;
        st->fired = st->parked = false;
    }
    return 0;
}

/* After the callbacks of a oneshot fd ran: if it is still wanted and nobody re-registered
 * it, enable it again (level-triggered: still ready means reported again). */
static void rearm(ca_loop *loop, int fd)
{
    struct ep *ep = loop->be_data;
    struct epfd *st = &ep->st[fd];
    if (!st->fired || st->parked || !st->want) return;
    if (ep_modify(loop, fd, st->want, st->want) < 0) {
        /* The fd was closed behind our back: as with a level-triggered registration that
         * the kernel dropped, nothing more will come for it. */
        st->oneshot = st->fired = false;
    }
}

static int ep_poll(ca_loop *loop, int64_t timeout_ns)
{
    struct ep *ep = loop->be_data;
    int n = -1;
    if (timeout_ns <= 0) {
        /* No timespec to copy in: measurably cheaper for the zero-timeout polls of a busy
         * loop. */
        n = epoll_wait(ep->epfd, ep->events, MAX_EVENTS, timeout_ns < 0 ? -1 : 0);
    } else if (!ep->no_pwait2) {
        struct timespec ts = {.tv_sec = timeout_ns / 1000000000, .tv_nsec = timeout_ns % 1000000000};
        n = epoll_pwait2(ep->epfd, ep->events, MAX_EVENTS, timeout_ns < 0 ? NULL : &ts, NULL);
        if (n < 0 && errno == ENOSYS) ep->no_pwait2 = true;
    }
    if (timeout_ns > 0 && ep->no_pwait2) {
        int ms = timeout_ns < 0 ? -1
                 : timeout_ns > INT64_C(2000000000) * 1000000 ? 2000000000
                 : (int)((timeout_ns + 999999) / 1000000);
        n = epoll_wait(ep->epfd, ep->events, MAX_EVENTS, ms);
    }
    if (n < 0) return errno == EINTR ? 0 : -errno;
    for (int i = 0; i < n; i++) {
        uint32_t e = ep->events[i].events;
        uint64_t data = ep->events[i].data.u64;
        int fd = (int)(uint32_t)data;
        unsigned rev = 0;
        if (e & ~(uint32_t)EPOLLOUT) rev |= CA__READ;
        if (e & ~(uint32_t)EPOLLIN) rev |= CA__WRITE;
        bool oneshot = fd < ep->nst && ep->st[fd].oneshot &&
                       ep->st[fd].gen == (uint32_t)(data >> 32);
        if (oneshot) ep->st[fd].fired = true;
        ca__loop_io(loop, fd, rev);
        if (oneshot) rearm(loop, fd);
    }
    return 0;
}

const ca__backend ca__backend_epoll = {
    .name = "epoll",
    .init = ep_init,
    .fini = ep_fini,
    .modify = ep_modify,
    .poll = ep_poll,
    .may_skip_poll = true,
};
