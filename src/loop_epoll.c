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
 */
#include "loop_internal.h"

#include <stdlib.h>
#include <sys/epoll.h>
#include <unistd.h>

#define MAX_EVENTS 256

struct ep {
    int epfd;
    bool no_pwait2;
    struct epoll_event events[MAX_EVENTS];
};

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
    free(ep);
    loop->be_data = NULL;
}

static int ep_modify(ca_loop *loop, int fd, unsigned old_ev, unsigned new_ev)
{
    struct ep *ep = loop->be_data;
    if (!new_ev) {
        epoll_ctl(ep->epfd, EPOLL_CTL_DEL, fd, NULL);
        return 0;
    }
    struct epoll_event ev = {
        .events = ((new_ev & CA__READ) ? EPOLLIN : 0u) | ((new_ev & CA__WRITE) ? EPOLLOUT : 0u),
        .data.fd = fd,
    };
    int op = old_ev ? EPOLL_CTL_MOD : EPOLL_CTL_ADD;
    if (epoll_ctl(ep->epfd, op, fd, &ev) == 0) return 0;
    if (op == EPOLL_CTL_MOD && errno == ENOENT) op = EPOLL_CTL_ADD;
    else if (op == EPOLL_CTL_ADD && errno == EEXIST) op = EPOLL_CTL_MOD;
    else return -errno;
    return epoll_ctl(ep->epfd, op, fd, &ev) == 0 ? 0 : -errno;
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
        unsigned rev = 0;
        if (e & ~(uint32_t)EPOLLOUT) rev |= CA__READ;
        if (e & ~(uint32_t)EPOLLIN) rev |= CA__WRITE;
        ca__loop_io(loop, ep->events[i].data.fd, rev);
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
