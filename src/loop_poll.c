/*
 * The poll(2) backend: the portable selector. A pollfd array plus an fd -> index map; removal
 * swaps the last entry in. ppoll gives nanosecond timeouts.
 *
 * Quirks handled here:
 * - An fd closed behind our back makes poll report POLLNVAL at once, every time: a busy loop.
 *   We report it to the callbacks once (as an error), and if they keep it registered we stop
 *   polling it (a negative fd in the array is ignored by poll) and log a warning. Adding or
 *   removing a callback for that fd polls it again.
 * - Callbacks may add or remove fds while we dispatch, so the ready set is copied out of the
 *   array before any callback runs.
 */
#include "loop_internal.h"

#include <poll.h>
#include <stdlib.h>
#include <string.h>

struct ready {
    int fd;
    short revents;
};

struct pl {
    struct pollfd *pfds;
    int n, cap;
    int *idx;       /* fd -> index + 1 (0: not present) */
    int idx_cap;
    struct ready *ready;
    int ready_cap;
};

static int pl_init(ca_loop *loop)
{
    struct pl *p = calloc(1, sizeof *p);
    if (!p) return -ENOMEM;
    loop->be_data = p;
    return 0;
}

static void pl_fini(ca_loop *loop, bool forked)
{
    (void)forked;
    struct pl *p = loop->be_data;
    free(p->pfds);
    free(p->idx);
    free(p->ready);
    free(p);
    loop->be_data = NULL;
}

static int grow(void **arr, int *cap, int need, size_t elem)
{
    if (need <= *cap) return 0;
    int n = *cap ? *cap : 64;
    while (n < need) n *= 2;
    void *a = realloc(*arr, (size_t)n * elem);
    if (!a) return -ENOMEM;
    memset((char *)a + (size_t)*cap * elem, 0, (size_t)(n - *cap) * elem);
    *arr = a;
    *cap = n;
    return 0;
}

static int pl_modify(ca_loop *loop, int fd, unsigned old_ev, unsigned new_ev)
{
    (void)old_ev;
    struct pl *p = loop->be_data;
    int r = grow((void **)&p->idx, &p->idx_cap, fd + 1, sizeof *p->idx);
    if (r) return r;
    int i = p->idx[fd] - 1;
    if (!new_ev) {
        if (i < 0) return 0;
        p->pfds[i] = p->pfds[--p->n];
        if (i < p->n) {
            int moved = p->pfds[i].fd < 0 ? ~p->pfds[i].fd : p->pfds[i].fd;
            p->idx[moved] = i + 1;
        }
        p->idx[fd] = 0;
        return 0;
    }
    short events = (short)(((new_ev & CA__READ) ? POLLIN : 0) | ((new_ev & CA__WRITE) ? POLLOUT : 0));
    if (i < 0) {
        if ((r = grow((void **)&p->pfds, &p->cap, p->n + 1, sizeof *p->pfds)) != 0) return r;
        i = p->n++;
        p->idx[fd] = i + 1;
    }
    p->pfds[i].fd = fd; /* also re-enables an fd we stopped polling after POLLNVAL */
    p->pfds[i].events = events;
    p->pfds[i].revents = 0;
    return 0;
}

static int pl_poll(ca_loop *loop, int64_t timeout_ns)
{
    struct pl *p = loop->be_data;
    int n;
    if (timeout_ns <= 0) {
        /* poll(2) for the common no-wait and wait-forever cases: no timespec to copy in. */
        n = poll(p->pfds, (nfds_t)p->n, timeout_ns < 0 ? -1 : 0);
    } else {
        struct timespec ts = {.tv_sec = timeout_ns / 1000000000,
                              .tv_nsec = timeout_ns % 1000000000};
        n = ppoll(p->pfds, (nfds_t)p->n, &ts, NULL);
    }
    if (n < 0) return errno == EINTR ? 0 : -errno;
    if (n == 0) return 0;
    int r = grow((void **)&p->ready, &p->ready_cap, n, sizeof *p->ready);
    if (r) return r;
    int k = 0;
    for (int i = 0; i < p->n && k < n; i++)
        if (p->pfds[i].revents && p->pfds[i].fd >= 0)
            p->ready[k++] = (struct ready){p->pfds[i].fd, p->pfds[i].revents};
    for (int j = 0; j < k; j++) {
        int fd = p->ready[j].fd;
        short e = p->ready[j].revents;
        unsigned rev = 0;
        if (e & ~POLLOUT) rev |= CA__READ;
        if (e & ~POLLIN) rev |= CA__WRITE;
        ca__loop_io(loop, fd, rev);
        if (e & POLLNVAL) {
            int i = fd < p->idx_cap ? p->idx[fd] - 1 : -1;
            if (i >= 0 && p->pfds[i].fd == fd) {
                p->pfds[i].fd = ~fd;
                ca__log(CA_LOG_WARNING,
                        "poll loop: fd %d was closed while a callback was registered for it; "
                        "it is no longer polled", fd);
            }
        }
    }
    return 0;
}

const ca__backend ca__backend_poll = {
    .name = "poll",
    .init = pl_init,
    .fini = pl_fini,
    .modify = pl_modify,
    .poll = pl_poll,
    .may_skip_poll = true,
};
