/*
 * libuv peer.  call_soon = an idle handle (burst: one started handle per call, each stops
 * itself; chain: one handle that runs once per iteration); timers = uv_timer_t; readiness
 * ping-pong = uv_poll_t; socket ping-pong and streaming = uv_pipe_t streams (uv_read_start +
 * uv_write, one write in flight per connection); cross-thread = a locked queue + uv_async_send;
 * children = uv_spawn (stdio inherited) and its exit callback.
 */
#include "common.h"

#include <pthread.h>
#include <uv.h>

static const char *NM = "libuv";
static uv_loop_t *loop;
static long counter, target;

#define CHECK(x)                                                                                  \
    do {                                                                                          \
        int r_ = (x);                                                                             \
        if (r_ < 0)                                                                               \
            b_die("%s: %s", #x, uv_strerror(r_));                                               \
    } while (0)

/* ------------------------------------------------------------------ loop workloads */
static void burst_cb(uv_idle_t *h)
{
    uv_idle_stop(h);
    counter++;
}

static void chain_cb(uv_idle_t *h)
{
    if (++counter == target) {
        uv_idle_stop(h);
        uv_stop(loop); /* an idle fd may still be registered */
    }
}

static void timer_cb(uv_timer_t *t)
{
    (void)t;
    counter++;
}

typedef struct conn {
    int fd[2];
    uv_poll_t poll[2];
    uv_pipe_t pipe[2];
    uv_write_t wreq[2];
    long rounds, target, sent, total, recvd;
    char byte[2];
} conn;
static long conns_done, nconns;
static char *chunk;
static char rbuf[B_STREAM_CHUNK];

static void poll_echo(uv_poll_t *p, int status, int events)
{
    conn *c = p->data;
    char b;
    (void)status;
    (void)events;
    ssize_t r = read(c->fd[1], &b, 1);
    if (r == 1) {
        if (write(c->fd[1], &b, 1) != 1)
            b_die("write");
    } else if (r < 0 && errno != EAGAIN)
        b_die("read: %s", strerror(errno));
}

static void poll_back(uv_poll_t *p, int status, int events)
{
    conn *c = p->data;
    char b;
    (void)status;
    (void)events;
    ssize_t r = read(c->fd[0], &b, 1);
    if (r < 0 && errno == EAGAIN)
        return;
    if (r != 1)
        b_die("read");
    if (++c->rounds < c->target) {
        if (write(c->fd[0], &b, 1) != 1)
            b_die("write");
    } else {
        uv_poll_stop(&c->poll[0]);
        uv_poll_stop(&c->poll[1]);
        conns_done++;
    }
}

static void alloc_small(uv_handle_t *h, size_t sz, uv_buf_t *buf)
{
    conn *c = h->data;
    (void)sz;
    int side = (uv_pipe_t *)h == &c->pipe[1];
    *buf = uv_buf_init(&c->byte[side], 1);
}

static void alloc_big(uv_handle_t *h, size_t sz, uv_buf_t *buf)
{
    (void)h;
    (void)sz;
    *buf = uv_buf_init(rbuf, sizeof rbuf);
}

static void write_done(uv_write_t *w, int status)
{
    (void)w;
    CHECK(status);
}

static void sock_echo(uv_stream_t *s, ssize_t n, const uv_buf_t *buf)
{
    conn *c = s->data;
    if (n == 0)
        return;
    if (n < 0)
        b_die("read: %s", uv_strerror((int)n));
    uv_buf_t b = uv_buf_init(buf->base, 1);
    CHECK(uv_write(&c->wreq[1], (uv_stream_t *)&c->pipe[1], &b, 1, write_done));
}

static void sock_back(uv_stream_t *s, ssize_t n, const uv_buf_t *buf)
{
    conn *c = s->data;
    if (n == 0)
        return;
    if (n < 0)
        b_die("read: %s", uv_strerror((int)n));
    if (++c->rounds < c->target) {
        uv_buf_t b = uv_buf_init(buf->base, 1);
        CHECK(uv_write(&c->wreq[0], (uv_stream_t *)&c->pipe[0], &b, 1, write_done));
    } else {
        uv_read_stop((uv_stream_t *)&c->pipe[0]);
        uv_read_stop((uv_stream_t *)&c->pipe[1]);
        conns_done++;
    }
}

static void stream_next(conn *c);
static void stream_wrote(uv_write_t *w, int status)
{
    CHECK(status);
    stream_next(w->data);
}
static void stream_next(conn *c)
{
    if (c->sent >= c->total)
        return;
    long want = c->total - c->sent;
    uv_buf_t b = uv_buf_init(chunk, (unsigned)(want < B_STREAM_CHUNK ? want : B_STREAM_CHUNK));
    c->sent += (long)b.len;
    c->wreq[0].data = c;
    CHECK(uv_write(&c->wreq[0], (uv_stream_t *)&c->pipe[0], &b, 1, stream_wrote));
}
static void stream_read(uv_stream_t *s, ssize_t n, const uv_buf_t *buf)
{
    conn *c = s->data;
    (void)buf;
    if (n == 0)
        return;
    if (n < 0)
        b_die("read: %s", uv_strerror((int)n));
    c->recvd += n;
    if (c->recvd >= c->total) {
        uv_read_stop(s);
        conns_done++;
    }
}

static void walk_close(uv_handle_t *h, void *arg)
{
    (void)arg;
    if (!uv_is_closing(h))
        uv_close(h, NULL);
}

/* cross-thread */
typedef struct { void (*fn)(void *); void *arg; } tcb;
static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static tcb *tq;
static size_t tqn, tqcap;
static uv_async_t async;

static void ts_count(void *arg)
{
    (void)arg;
    if (++counter == target)
        uv_close((uv_handle_t *)&async, NULL);
}

static void async_cb(uv_async_t *a)
{
    (void)a;
    pthread_mutex_lock(&mu);
    tcb *q = tq;
    size_t n = tqn;
    tq = NULL;
    tqn = tqcap = 0;
    pthread_mutex_unlock(&mu);
    for (size_t i = 0; i < n; i++)
        q[i].fn(q[i].arg);
    free(q);
}

static void call_soon_threadsafe(void (*fn)(void *), void *arg)
{
    pthread_mutex_lock(&mu);
    if (tqn == tqcap) {
        tqcap = tqcap ? tqcap * 2 : 1024;
        tq = realloc(tq, tqcap * sizeof(tcb));
        if (!tq)
            b_die("oom");
    }
    tq[tqn].fn = fn;
    tq[tqn].arg = arg;
    tqn++;
    pthread_mutex_unlock(&mu);
    CHECK(uv_async_send(&async));
}

static void *ts_thread(void *arg)
{
    (void)arg;
    for (long i = 0; i < target; i++)
        call_soon_threadsafe(ts_count, NULL);
    return NULL;
}

static int loop_workload(const bench_args *a)
{
    if (b_is(a, "burst")) {
        target = b_n(a, B_SOON_N);
        uv_idle_t *hs = malloc((size_t)target * sizeof(uv_idle_t));
        double t0 = b_now();
        for (long i = 0; i < target; i++) {
            uv_idle_init(loop, &hs[i]);
            uv_idle_start(&hs[i], burst_cb);
        }
        uv_run(loop, UV_RUN_DEFAULT);
        double dt = b_now() - t0;
        if (counter != target)
            b_die("burst: %ld of %ld", counter, target);
        b_report(NM, a, (double)target / dt, "calls/s");
    } else if (b_is(a, "chain")) {
        /* param 1: one idle fd registered, so a loop has to poll every iteration */
        int sv[2];
        uv_poll_t idle_fd;
        if (a->param > 0) {
            b_socketpair(sv);
            CHECK(uv_poll_init(loop, &idle_fd, sv[0]));
            CHECK(uv_poll_start(&idle_fd, UV_READABLE, NULL));
        }
        target = b_n(a, B_SOON_N);
        uv_idle_t h;
        double t0 = b_now();
        uv_idle_init(loop, &h);
        uv_idle_start(&h, chain_cb);
        uv_run(loop, UV_RUN_DEFAULT);
        b_report(NM, a, (double)target / (b_now() - t0), "calls/s");
    } else if (b_is(a, "timers")) {
        target = b_n(a, B_TIMER_N);
        uv_timer_t *ts = malloc((size_t)target * sizeof(uv_timer_t));
        uint64_t seed = 42;
        double t0 = b_now();
        for (long i = 0; i < target; i++) {
            uv_timer_init(loop, &ts[i]);
            uv_timer_start(&ts[i], timer_cb, (uint64_t)(b_timer_delay_us(&seed) + 999) / 1000, 0);
        }
        uv_run(loop, UV_RUN_DEFAULT);
        double dt = b_now() - t0;
        if (counter != target)
            b_die("timers: %ld of %ld", counter, target);
        b_report(NM, a, (double)target / dt, "timers/s");
    } else if (b_is(a, "pingpong") || b_is(a, "pingpong_sock")) {
        int sock = b_is(a, "pingpong_sock");
        nconns = a->param > 0 ? a->param : 1;
        long total = b_n(a, B_PING_N);
        conn *cs = calloc((size_t)nconns, sizeof(conn));
        for (long i = 0; i < nconns; i++) {
            conn *c = &cs[i];
            b_socketpair(c->fd);
            c->target = total / nconns + (i < total % nconns);
            for (int s = 0; s < 2; s++) {
                if (sock) {
                    CHECK(uv_pipe_init(loop, &c->pipe[s], 0));
                    CHECK(uv_pipe_open(&c->pipe[s], c->fd[s]));
                    c->pipe[s].data = c;
                    CHECK(uv_read_start((uv_stream_t *)&c->pipe[s], alloc_small,
                                        s ? sock_echo : sock_back));
                } else {
                    CHECK(uv_poll_init(loop, &c->poll[s], c->fd[s]));
                    c->poll[s].data = c;
                    CHECK(uv_poll_start(&c->poll[s], UV_READABLE, s ? poll_echo : poll_back));
                }
            }
        }
        double t0 = b_now();
        for (long i = 0; i < nconns; i++)
            if (write(cs[i].fd[0], "x", 1) != 1)
                b_die("write");
        uv_run(loop, UV_RUN_DEFAULT);
        double dt = b_now() - t0;
        if (conns_done != nconns)
            b_die("pingpong: %ld of %ld connections done", conns_done, nconns);
        b_report(NM, a, (double)total / dt, "rt/s");
    } else if (b_is(a, "stream")) {
        nconns = a->param > 0 ? a->param : 1;
        long total = b_n(a, B_STREAM_MIB) * 1048576L;
        conn *cs = calloc((size_t)nconns, sizeof(conn));
        chunk = calloc(1, B_STREAM_CHUNK);
        for (long i = 0; i < nconns; i++) {
            conn *c = &cs[i];
            b_socketpair(c->fd);
            c->total = total / nconns;
            for (int s = 0; s < 2; s++) {
                CHECK(uv_pipe_init(loop, &c->pipe[s], 0));
                CHECK(uv_pipe_open(&c->pipe[s], c->fd[s]));
                c->pipe[s].data = c;
            }
        }
        double t0 = b_now();
        for (long i = 0; i < nconns; i++) {
            CHECK(uv_read_start((uv_stream_t *)&cs[i].pipe[1], alloc_big, stream_read));
            stream_next(&cs[i]);
        }
        uv_run(loop, UV_RUN_DEFAULT);
        double dt = b_now() - t0;
        if (conns_done != nconns)
            b_die("stream: %ld of %ld connections done", conns_done, nconns);
        b_report(NM, a, (double)(total / nconns * nconns) / dt / 1e6, "MB/s");
    } else if (b_is(a, "threadsafe")) {
        target = b_n(a, B_TS_N);
        CHECK(uv_async_init(loop, &async, async_cb));
        pthread_t th;
        double t0 = b_now();
        pthread_create(&th, NULL, ts_thread, NULL);
        uv_run(loop, UV_RUN_DEFAULT);
        double dt = b_now() - t0;
        pthread_join(th, NULL);
        b_report(NM, a, (double)target / dt, "calls/s");
    } else
        return -1;
    uv_walk(loop, walk_close, NULL);
    uv_run(loop, UV_RUN_DEFAULT);
    return 0;
}

/* ------------------------------------------------------------------ children */
static long started, reaped, total_children;
static int inflight_target;

static void spawn_one(char *const argv[], uv_exit_cb cb, uv_process_t **out);

static void closed_free(uv_handle_t *h) { free(h); }

static void true_exit(uv_process_t *p, int64_t status, int sig)
{
    (void)status;
    (void)sig;
    reaped++;
    uv_close((uv_handle_t *)p, closed_free);
    if (started < total_children) {
        started++;
        spawn_one(b_true_argv, true_exit, NULL);
    }
}

static void idle_exit(uv_process_t *p, int64_t status, int sig)
{
    (void)status;
    (void)sig;
    reaped++;
    uv_close((uv_handle_t *)p, NULL); /* storage is in an array */
}

static uv_stdio_container_t inherit[3] = {
    {.flags = UV_INHERIT_FD, .data.fd = 0},
    {.flags = UV_INHERIT_FD, .data.fd = 1},
    {.flags = UV_INHERIT_FD, .data.fd = 2},
};

static void spawn_into(uv_process_t *p, char *const argv[], uv_exit_cb cb)
{
    uv_process_options_t o = {0};
    o.exit_cb = cb;
    o.file = argv[0];
    o.args = (char **)argv;
    o.stdio = inherit;
    o.stdio_count = 3;
    CHECK(uv_spawn(loop, p, &o));
}

static void spawn_one(char *const argv[], uv_exit_cb cb, uv_process_t **out)
{
    uv_process_t *p = malloc(sizeof *p);
    if (!p)
        b_die("oom");
    spawn_into(p, argv, cb);
    if (out)
        *out = p;
}

static int child_workload(const bench_args *a)
{
    if (b_is(a, "spawn_reap")) {
        total_children = b_n(a, B_SPAWN_N);
        inflight_target = a->param > 0 ? (int)a->param : 1;
        double t0 = b_now();
        for (int i = 0; i < inflight_target && started < total_children; i++) {
            started++;
            spawn_one(b_true_argv, true_exit, NULL);
        }
        uv_run(loop, UV_RUN_DEFAULT);
        double dt = b_now() - t0;
        if (reaped != total_children)
            b_die("reaped %ld of %ld", reaped, total_children);
        b_report(NM, a, (double)total_children / dt, "children/s");
    } else if (b_is(a, "reap_scaling") || b_is(a, "mem")) {
        int mem = b_is(a, "mem");
        long m = mem ? (a->param > 0 ? a->param : B_MEM_N) : a->param;
        long n = b_n(a, B_SCALE_N);
        /* mem: one malloc'd handle per child, as a user would allocate it (counted) */
        uv_process_t *idle = mem ? NULL : calloc((size_t)m + 1, sizeof(uv_process_t));
        uv_process_t **ptrs = mem ? calloc((size_t)m + 1, sizeof(uv_process_t *)) : NULL;
        {   /* warm-up: one spawn+reap first, so lazy allocations are not counted */
            long r0 = reaped;
            started = total_children = 0;
            spawn_one(b_true_argv, true_exit, NULL);
            while (reaped == r0)
                uv_run(loop, UV_RUN_ONCE);
        }
        long before = b_rss_bytes();
        for (long i = 0; i < m; i++) {
            if (mem)
                spawn_one(b_sleep5_argv, idle_exit, &ptrs[i]);
            else
                spawn_into(&idle[i], b_sleep600_argv, idle_exit);
        }
        long after = b_rss_bytes();
        double dt = 0;
        if (!mem) {
            for (long i = 0; i < n; i++) {
                long r0 = reaped;
                double t0 = b_now();
                started = total_children = 0;
                spawn_one(b_true_argv, true_exit, NULL);
                while (reaped == r0)
                    uv_run(loop, UV_RUN_ONCE);
                dt += b_now() - t0;
            }
        }
        long r0 = reaped;
        for (long i = 0; i < m; i++) {
            uv_process_t *p = mem ? ptrs[i] : &idle[i];
            uv_process_kill(p, SIGKILL);
        }
        while (reaped - r0 < m)
            uv_run(loop, UV_RUN_ONCE);
        if (mem) {
            b_report(NM, a, (double)(after - before) / (double)m / 1024.0, "KB/child");
            b_report_vsz(NM, a, m);
        } else
            b_report(NM, a, dt / (double)n * 1e6, "us");
    } else
        return -1;
    uv_walk(loop, walk_close, NULL);
    uv_run(loop, UV_RUN_DEFAULT);
    return 0;
}

int main(int argc, char **argv)
{
    bench_args a;
    b_parse(&a, argc, argv, NM);
    b_raise_limits();
    loop = uv_default_loop();
    if (b_is(&a, "policy")) {
        long n = b_n(&a, B_POLICY_N);
        double t0 = b_now();
        for (long i = 0; i < n; i++) {
            uv_loop_t *l = uv_default_loop();
            __asm__ volatile("" : : "r"(l) : "memory");
        }
        b_report(NM, &a, (b_now() - t0) / (double)n * 1e9, "ns/call");
        return 0;
    }
    if (child_workload(&a) == 0 || loop_workload(&a) == 0)
        return 0;
    fprintf(stderr, "%s: unknown workload %s\n", NM, a.workload);
    return 2;
}
