/*
 * A custom loop for the tests: a complete ca_loop_ops implementation over plain poll(2),
 * written only against the public header, as a user adapting a foreign loop would. It
 * provides everything but signal handlers and the sock_* members (the core then implements
 * sock_* with readers and writers), so the loop suite runs on it as a fourth loop kind.
 */
#include "harness.h"

#include <fcntl.h>
#include <math.h>
#include <poll.h>
#include <pthread.h>
#include <stdatomic.h>
#include <time.h>

struct timer {
    double when;
    unsigned long seq;
    ca_handle *h;
};

struct io {
    int fd;
    ca_callback_fn r, w;
    void *ra, *wa;
};

struct cl {
    ca_handle **ready;
    size_t nready, cap_ready;
    struct timer *timers;
    size_t ntimers, cap_timers;
    unsigned long seq;
    struct io *ios;
    size_t nios, cap_ios;
    pthread_mutex_t mu; /* guards ts and stopping */
    ca_handle **ts;
    size_t nts, cap_ts;
    bool stopping;
    int wake[2];
    _Atomic bool host_closed; /* the host-queue variant: t_custom_loop_host_close */
};

static int push(void **arr, size_t *n, size_t *cap, size_t elem, const void *item)
{
    if (*n == *cap) {
        size_t c = *cap ? *cap * 2 : 16;
        void *a = realloc(*arr, c * elem);
        if (!a) return -ENOMEM;
        *arr = a;
        *cap = c;
    }
    memcpy((char *)*arr + *n * elem, item, elem);
    (*n)++;
    return 0;
}

static struct cl *CL(ca_loop *l) { return ca_loop_data(l); }

static int cl_call_soon(ca_loop *self, ca_handle *h)
{
    struct cl *c = CL(self);
    /* What other threads submitted before comes first (asyncio has one queue). */
    pthread_mutex_lock(&c->mu);
    size_t moved = 0;
    while (moved < c->nts &&
           push((void **)&c->ready, &c->nready, &c->cap_ready, sizeof h, &c->ts[moved]) == 0)
        moved++;
    if (moved) {
        memmove(c->ts, c->ts + moved, (c->nts - moved) * sizeof *c->ts);
        c->nts -= moved;
    }
    pthread_mutex_unlock(&c->mu);
    ca_handle_ref(h);
    int r = push((void **)&c->ready, &c->nready, &c->cap_ready, sizeof h, &h);
    if (r) ca_handle_unref(h);
    return r;
}

static int cl_call_soon_threadsafe(ca_loop *self, ca_handle *h)
{
    struct cl *c = CL(self);
    ca_handle_ref(h);
    pthread_mutex_lock(&c->mu);
    int r = push((void **)&c->ts, &c->nts, &c->cap_ts, sizeof h, &h);
    pthread_mutex_unlock(&c->mu);
    if (r) {
        ca_handle_unref(h);
        return r;
    }
    char b = 1;
    ssize_t w = write(c->wake[1], &b, 1);
    (void)w;
    return 0;
}

static int cl_call_at(ca_loop *self, double when, ca_handle *h)
{
    struct cl *c = CL(self);
    struct timer t = {when, c->seq++, ca_handle_ref(h)};
    int r = push((void **)&c->timers, &c->ntimers, &c->cap_timers, sizeof t, &t);
    if (r) ca_handle_unref(h);
    return r;
}

static struct io *find_io(struct cl *c, int fd)
{
    for (size_t i = 0; i < c->nios; i++)
        if (c->ios[i].fd == fd) return &c->ios[i];
    return NULL;
}

static int set_io(ca_loop *self, int fd, bool read, ca_callback_fn fn, void *arg)
{
    struct cl *c = CL(self);
    struct io *io = find_io(c, fd);
    if (!io) {
        struct io n = {.fd = fd};
        int r = push((void **)&c->ios, &c->nios, &c->cap_ios, sizeof n, &n);
        if (r) return r;
        io = &c->ios[c->nios - 1];
    }
    if (read) {
        io->r = fn;
        io->ra = arg;
    } else {
        io->w = fn;
        io->wa = arg;
    }
    return 0;
}

static int clear_io(ca_loop *self, int fd, bool read)
{
    struct cl *c = CL(self);
    struct io *io = find_io(c, fd);
    if (!io || !(read ? io->r : io->w)) return 0;
    if (read) io->r = NULL;
    else io->w = NULL;
    if (!io->r && !io->w) *io = c->ios[--c->nios];
    return 1;
}

static int cl_add_reader(ca_loop *s, int fd, ca_callback_fn fn, void *a) { return set_io(s, fd, true, fn, a); }
static int cl_add_writer(ca_loop *s, int fd, ca_callback_fn fn, void *a) { return set_io(s, fd, false, fn, a); }
static int cl_remove_reader(ca_loop *s, int fd) { return clear_io(s, fd, true); }
static int cl_remove_writer(ca_loop *s, int fd) { return clear_io(s, fd, false); }

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static int timer_cmp(const void *a, const void *b)
{
    const struct timer *x = a, *y = b;
    if (x->when != y->when) return x->when < y->when ? -1 : 1;
    return x->seq < y->seq ? -1 : x->seq > y->seq;
}

static void run_once(ca_loop *self)
{
    struct cl *c = CL(self);
    pthread_mutex_lock(&c->mu);
    bool stopping = c->stopping;
    pthread_mutex_unlock(&c->mu);
    int timeout = -1;
    if (c->ntimers) qsort(c->timers, c->ntimers, sizeof *c->timers, timer_cmp);
    if (c->nready || stopping) timeout = 0;
    else if (c->ntimers) {
        double d = c->timers[0].when - now();
        timeout = d <= 0 ? 0 : (int)ceil(d * 1000);
    }
    size_t n = c->nios;
    struct pollfd *p = calloc(n + 1, sizeof *p);
    struct io *snap = calloc(n + 1, sizeof *snap);
    p[0] = (struct pollfd){.fd = c->wake[0], .events = POLLIN};
    for (size_t i = 0; i < n; i++) {
        snap[i] = c->ios[i];
        p[i + 1] = (struct pollfd){.fd = c->ios[i].fd,
                                   .events = (short)((c->ios[i].r ? POLLIN : 0) | (c->ios[i].w ? POLLOUT : 0))};
    }
    int k = poll(p, n + 1, timeout);
    if (k > 0) {
        if (p[0].revents) {
            char buf[256];
            while (read(c->wake[0], buf, sizeof buf) > 0) {
            }
        }
        for (size_t i = 0; i < n; i++) {
            short e = p[i + 1].revents;
            if (!e) continue;
            struct io *cur = find_io(c, snap[i].fd);
            if (cur && cur->r && (e & ~POLLOUT)) cur->r(cur->ra);
            cur = find_io(c, snap[i].fd);
            if (cur && cur->w && (e & ~POLLIN)) cur->w(cur->wa);
        }
    }
    free(p);
    free(snap);
    pthread_mutex_lock(&c->mu);
    for (size_t i = 0; i < c->nts; i++) push((void **)&c->ready, &c->nready, &c->cap_ready, sizeof(ca_handle *), &c->ts[i]);
    c->nts = 0;
    pthread_mutex_unlock(&c->mu);
    double t = now();
    size_t due = 0;
    while (due < c->ntimers && c->timers[due].when <= t) due++;
    for (size_t i = 0; i < due; i++)
        push((void **)&c->ready, &c->nready, &c->cap_ready, sizeof(ca_handle *), &c->timers[i].h);
    if (due) memmove(c->timers, c->timers + due, (c->ntimers - due) * sizeof *c->timers);
    c->ntimers -= due;
    size_t todo = c->nready;
    ca_handle **batch = malloc((todo ? todo : 1) * sizeof *batch);
    if (todo) memcpy(batch, c->ready, todo * sizeof *batch);
    c->nready -= todo;
    for (size_t i = 0; i < todo; i++) {
        ca_handle_run(batch[i]);
        ca_handle_unref(batch[i]);
    }
    free(batch);
}

static int cl_run_forever(ca_loop *self)
{
    struct cl *c = CL(self);
    for (;;) {
        run_once(self);
        pthread_mutex_lock(&c->mu);
        bool s = c->stopping;
        c->stopping = false;
        pthread_mutex_unlock(&c->mu);
        if (s) return 0;
    }
}

static void cl_stop(ca_loop *self)
{
    struct cl *c = CL(self);
    pthread_mutex_lock(&c->mu);
    c->stopping = true;
    pthread_mutex_unlock(&c->mu);
    char b = 1;
    ssize_t w = write(c->wake[1], &b, 1);
    (void)w;
}

static int cl_close(ca_loop *self)
{
    struct cl *c = CL(self);
    for (size_t i = 0; i < c->nready; i++) ca_handle_unref(c->ready[i]);
    for (size_t i = 0; i < c->ntimers; i++) ca_handle_unref(c->timers[i].h);
    pthread_mutex_lock(&c->mu);
    for (size_t i = 0; i < c->nts; i++) ca_handle_unref(c->ts[i]);
    c->nts = 0;
    pthread_mutex_unlock(&c->mu);
    c->nready = c->ntimers = c->nios = 0;
    return 0;
}

static void cl_destroy(ca_loop *self)
{
    struct cl *c = CL(self);
    cl_close(self);
    close(c->wake[0]);
    close(c->wake[1]);
    free(c->ready);
    free(c->timers);
    free(c->ios);
    free(c->ts);
    pthread_mutex_destroy(&c->mu);
    free(c);
}

static const ca_loop_ops custom_ops = {
    .run_forever = cl_run_forever,
    .stop = cl_stop,
    .close = cl_close,
    .call_soon = cl_call_soon,
    .call_soon_threadsafe = cl_call_soon_threadsafe,
    .call_at = cl_call_at,
    .add_reader = cl_add_reader,
    .remove_reader = cl_remove_reader,
    .add_writer = cl_add_writer,
    .remove_writer = cl_remove_writer,
    .destroy = cl_destroy,
};

int t_custom_loop_new(ca_loop **out)
{
    struct cl *c = calloc(1, sizeof *c);
    if (!c) return -ENOMEM;
    pthread_mutex_init(&c->mu, NULL);
    if (pipe2(c->wake, O_CLOEXEC | O_NONBLOCK) < 0) {
        free(c);
        return -errno;
    }
    int r = ca_loop_new_custom(&custom_ops, c, out);
    if (r) {
        close(c->wake[0]);
        close(c->wake[1]);
        free(c);
    }
    return r;
}

/* The variant of an adapter that leaves the thread-safe queue to the core: no
 * call_soon_threadsafe op; it watches ca_loop_threadsafe_fd with its own reader and runs
 * ca_loop_run_threadsafe when it is readable. It also has an is_closed op, which answers what
 * t_custom_loop_host_close set (a host that closed its loop behind the core's back). */
static bool cl_is_closed(ca_loop *self) { return atomic_load(&CL(self)->host_closed); }

static void cl_run_queue(void *arg)
{
    int r = ca_loop_run_threadsafe(arg);
    if (r < 0 && r != -EBADF) t_fail(__FILE__, __LINE__, "ca_loop_run_threadsafe: %d", r);
}

static const ca_loop_ops custom_hostq_ops = {
    .run_forever = cl_run_forever,
    .stop = cl_stop,
    .close = cl_close,
    .call_soon = cl_call_soon,
    .call_at = cl_call_at,
    .add_reader = cl_add_reader,
    .remove_reader = cl_remove_reader,
    .add_writer = cl_add_writer,
    .remove_writer = cl_remove_writer,
    .destroy = cl_destroy,
    .is_closed = cl_is_closed,
};

int t_custom_loop_new_hostq(ca_loop **out)
{
    struct cl *c = calloc(1, sizeof *c);
    if (!c) return -ENOMEM;
    pthread_mutex_init(&c->mu, NULL);
    if (pipe2(c->wake, O_CLOEXEC | O_NONBLOCK) < 0) {
        free(c);
        return -errno;
    }
    ca_loop *loop = NULL;
    int r = ca_loop_new_custom(&custom_hostq_ops, c, &loop);
    if (r) {
        close(c->wake[0]);
        close(c->wake[1]);
        free(c);
        return r;
    }
    int fd = ca_loop_threadsafe_fd(loop);
    if (fd < 0 || (r = ca_loop_add_reader(loop, fd, cl_run_queue, loop)) < 0) {
        ca_loop_close(loop);
        ca_loop_unref(loop);
        return fd < 0 ? fd : r;
    }
    *out = loop;
    return 0;
}

void t_custom_loop_host_close(ca_loop *loop) { atomic_store(&CL(loop)->host_closed, true); }
