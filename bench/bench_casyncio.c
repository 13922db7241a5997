/*
 * casyncio's benchmark program: the same workloads and output as the peers.
 *
 * VARIANT: for the loop workloads a loop kind, epoll | poll | uring (default epoll);
 * for the child workloads WATCHER-LOOP, WATCHER one of threaded | multiloop | safe | fast |
 * pidfd | uring (default pidfd-epoll).  The name printed is casyncio-VARIANT.
 *
 * Every library function is declared weak and the library is linked whole, so a feature that
 * has not landed yet (or that returns -ENOSYS/-ENOTSUP) prints value=NA instead of failing.
 */
#include "common.h"

#include <casyncio.h>
#include <pthread.h>

#pragma weak ca_selector_loop_new
#pragma weak ca_poll_loop_new
#pragma weak ca_proactor_loop_new
#pragma weak ca_loop_run_forever
#pragma weak ca_loop_stop
#pragma weak ca_loop_close
#pragma weak ca_loop_unref
#pragma weak ca_loop_call_soon
#pragma weak ca_loop_call_soon_threadsafe
#pragma weak ca_loop_call_later
#pragma weak ca_loop_add_reader
#pragma weak ca_loop_remove_reader
#pragma weak ca_loop_sock_recv
#pragma weak ca_loop_sock_sendall
#pragma weak ca_future_add_done_callback
#pragma weak ca_future_result
#pragma weak ca_future_unref
#pragma weak ca_set_event_loop
#pragma weak ca_get_event_loop
#pragma weak ca_set_child_watcher
#pragma weak ca_threaded_child_watcher_new
#pragma weak ca_multiloop_child_watcher_new
#pragma weak ca_safe_child_watcher_new
#pragma weak ca_fast_child_watcher_new
#pragma weak ca_pidfd_child_watcher_new
#pragma weak ca_uring_child_watcher_new
#pragma weak ca_child_watcher_attach_loop
#pragma weak ca_child_watcher_unref
#pragma weak ca_loop_subprocess_exec
#pragma weak ca_process_unref
#pragma weak ca_process_kill
#pragma weak ca_strerror
#pragma weak ca_set_log_handler

static char name[96];
static ca_loop *loop;
static long counter, target;
static int failed; /* set by callbacks on an unexpected error */

#define HAVE(f) ((f) != NULL)

static const char *err_s(int e)
{
    static char buf[64];
    if (HAVE(ca_strerror))
        return ca_strerror(e);
    snprintf(buf, sizeof buf, "error %d", e);
    return buf;
}

/* 1: measured; 0: not available here (NA printed) */
#define NEED(cond, unit)                                                                          \
    do {                                                                                          \
        if (!(cond)) {                                                                            \
            b_report_na(name, a, unit, "not in the library yet: " #cond);                       \
            return 0;                                                                             \
        }                                                                                         \
    } while (0)
#define TRY(x, unit)                                                                              \
    do {                                                                                          \
        int r_ = (x);                                                                             \
        if (r_ < 0) {                                                                             \
            char why_[160];                                                                       \
            snprintf(why_, sizeof why_, "%s: %s", #x, err_s(r_));                                \
            b_report_na(name, a, unit, why_);                                                     \
            return 0;                                                                             \
        }                                                                                         \
    } while (0)
#define MUST(x)                                                                                   \
    do {                                                                                          \
        int r_ = (x);                                                                             \
        if (r_ < 0)                                                                               \
            b_die("%s: %s", #x, err_s(r_));                                                     \
    } while (0)

static int make_loop(const char *kind, ca_loop **out)
{
    if (strcmp(kind, "epoll") == 0)
        return HAVE(ca_selector_loop_new) ? ca_selector_loop_new(out) : -ENOSYS;
    if (strcmp(kind, "poll") == 0)
        return HAVE(ca_poll_loop_new) ? ca_poll_loop_new(out) : -ENOSYS;
    if (strcmp(kind, "uring") == 0)
        return HAVE(ca_proactor_loop_new) ? ca_proactor_loop_new(out) : -ENOSYS;
    return -EINVAL;
}

static int make_watcher(const char *kind, ca_child_watcher **out)
{
    int (*f)(ca_child_watcher **) = NULL;
    if (strcmp(kind, "threaded") == 0)
        f = ca_threaded_child_watcher_new;
    else if (strcmp(kind, "multiloop") == 0)
        f = ca_multiloop_child_watcher_new;
    else if (strcmp(kind, "safe") == 0)
        f = ca_safe_child_watcher_new;
    else if (strcmp(kind, "fast") == 0)
        f = ca_fast_child_watcher_new;
    else if (strcmp(kind, "pidfd") == 0)
        f = ca_pidfd_child_watcher_new;
    else if (strcmp(kind, "uring") == 0)
        f = ca_uring_child_watcher_new;
    else
        return -EINVAL;
    return f ? f(out) : -ENOSYS;
}

/* ------------------------------------------------------------------ loop workloads */
static void count_cb(void *arg)
{
    (void)arg;
    if (++counter == target)
        ca_loop_stop(loop);
}

static void chain_cb(void *arg)
{
    if (++counter < target) {
        if (ca_loop_call_soon(loop, chain_cb, arg, NULL) < 0)
            failed = 1, ca_loop_stop(loop);
    } else
        ca_loop_stop(loop);
}

typedef struct conn {
    int fd[2];
    long rounds, target, sent, recvd, total;
    char byte[2];
    char *buf;
} conn;
static long conns_done, nconns;

static void conn_done(void)
{
    if (++conns_done == nconns)
        ca_loop_stop(loop);
}

static void ping_echo(void *arg)
{
    conn *c = arg;
    char b;
    ssize_t r = read(c->fd[1], &b, 1);
    if (r == 1) {
        if (write(c->fd[1], &b, 1) != 1)
            b_die("write");
    } else if (r < 0 && errno != EAGAIN)
        b_die("read: %s", strerror(errno));
}

static void ping_back(void *arg)
{
    conn *c = arg;
    char b;
    ssize_t r = read(c->fd[0], &b, 1);
    if (r < 0 && errno == EAGAIN)
        return;
    if (r != 1)
        b_die("read");
    if (++c->rounds < c->target) {
        if (write(c->fd[0], &b, 1) != 1)
            b_die("write");
    } else {
        ca_loop_remove_reader(loop, c->fd[0]);
        ca_loop_remove_reader(loop, c->fd[1]);
        conn_done();
    }
}

/* socket operations: each step is a future whose done callback issues the next step */
static void sock_fail(const char *what, int r)
{
    fprintf(stderr, "bench: %s: %s\n", what, err_s(r));
    failed = 1;
    ca_loop_stop(loop);
}

static void echo_recvd(ca_future *f, void *arg);
static void echo_sent(ca_future *f, void *arg);
static void back_sent(ca_future *f, void *arg);
static void back_recvd(ca_future *f, void *arg);

static void issue(int send, int side, conn *c, void (*done)(ca_future *, void *))
{
    ca_future *f = NULL;
    int r = send ? ca_loop_sock_sendall(loop, c->fd[side], &c->byte[side], 1, &f)
                 : ca_loop_sock_recv(loop, c->fd[side], &c->byte[side], 1, &f);
    if (r < 0)
        return sock_fail(send ? "sock_sendall" : "sock_recv", r);
    r = ca_future_add_done_callback(f, done, c);
    if (r < 0)
        sock_fail("add_done_callback", r);
    ca_future_unref(f);
}

static int fut_ok(ca_future *f, const char *what)
{
    void *res;
    int r = ca_future_result(f, &res);
    if (r < 0) {
        sock_fail(what, r);
        return 0;
    }
    return 1;
}

static void echo_recvd(ca_future *f, void *arg)
{
    if (fut_ok(f, "sock_recv"))
        issue(1, 1, arg, echo_sent);
}
static void echo_sent(ca_future *f, void *arg)
{
    conn *c = arg;
    if (fut_ok(f, "sock_sendall") && c->rounds < c->target)
        issue(0, 1, c, echo_recvd);
}
static void back_sent(ca_future *f, void *arg)
{
    if (fut_ok(f, "sock_sendall"))
        issue(0, 0, arg, back_recvd);
}
static void back_recvd(ca_future *f, void *arg)
{
    conn *c = arg;
    if (!fut_ok(f, "sock_recv"))
        return;
    if (++c->rounds < c->target)
        issue(1, 0, c, back_sent);
    else
        conn_done();
}

static void stream_sent(ca_future *f, void *arg);
static void stream_send_next(conn *c)
{
    long want = c->total - c->sent;
    size_t n = (size_t)(want < B_STREAM_CHUNK ? want : B_STREAM_CHUNK);
    ca_future *f = NULL;
    int r = ca_loop_sock_sendall(loop, c->fd[0], c->buf, n, &f);
    if (r < 0)
        return sock_fail("sock_sendall", r);
    c->sent += (long)n;
    ca_future_add_done_callback(f, stream_sent, c);
    ca_future_unref(f);
}
static void stream_sent(ca_future *f, void *arg)
{
    conn *c = arg;
    if (fut_ok(f, "sock_sendall") && c->sent < c->total)
        stream_send_next(c);
}

static char *rbufs;
static void stream_recvd(ca_future *f, void *arg);
static void stream_recv_next(conn *c, char *buf)
{
    ca_future *f = NULL;
    int r = ca_loop_sock_recv(loop, c->fd[1], buf, B_STREAM_CHUNK, &f);
    if (r < 0)
        return sock_fail("sock_recv", r);
    ca_future_add_done_callback(f, stream_recvd, c);
    ca_future_unref(f);
}
static conn *conns;
static void stream_recvd(ca_future *f, void *arg)
{
    conn *c = arg;
    void *res = NULL;
    int r = ca_future_result(f, &res);
    if (r < 0)
        return sock_fail("sock_recv", r);
    long got = (long)(intptr_t)res;
    if (got <= 0)
        return sock_fail("sock_recv: early EOF", -EPIPE);
    c->recvd += got;
    if (c->recvd >= c->total)
        conn_done();
    else
        stream_recv_next(c, rbufs + (size_t)(c - conns) * B_STREAM_CHUNK);
}

static void *ts_thread(void *arg)
{
    (void)arg;
    for (long i = 0; i < target; i++) {
        int r = ca_loop_call_soon_threadsafe(loop, count_cb, NULL);
        if (r < 0)
            b_die("call_soon_threadsafe: %s", err_s(r));
    }
    return NULL;
}

static int run_loop(void)
{
    int r = ca_loop_run_forever(loop);
    if (r < 0)
        b_die("run_forever: %s", err_s(r));
    if (failed)
        b_die("a callback failed");
    return 0;
}

static int loop_workload(const bench_args *a, const char *kind)
{
    const char *unit = b_is(a, "pingpong") || b_is(a, "pingpong_sock") ? "rt/s"
                       : b_is(a, "stream")                              ? "MB/s"
                       : b_is(a, "timers")                              ? "timers/s"
                                                                        : "calls/s";
    if (!(b_is(a, "burst") || b_is(a, "chain") || b_is(a, "timers") || b_is(a, "pingpong") ||
          b_is(a, "pingpong_sock") || b_is(a, "stream") || b_is(a, "threadsafe")))
        return -1;
    NEED(HAVE(ca_loop_run_forever) && HAVE(ca_loop_stop), unit);
    TRY(make_loop(kind, &loop), unit);
    if (b_is(a, "burst")) {
        NEED(HAVE(ca_loop_call_soon), unit);
        target = b_n(a, B_SOON_N);
        double t0 = b_now();
        for (long i = 0; i < target; i++)
            MUST(ca_loop_call_soon(loop, count_cb, NULL, NULL));
        run_loop();
        b_report(name, a, (double)target / (b_now() - t0), unit);
    } else if (b_is(a, "chain")) {
        NEED(HAVE(ca_loop_call_soon), unit);
        /* param 1: one idle fd registered, so a loop has to poll every iteration */
        int sv[2];
        if (a->param > 0) {
            NEED(HAVE(ca_loop_add_reader), unit);
            b_socketpair(sv);
            TRY(ca_loop_add_reader(loop, sv[0], count_cb, NULL), unit);
        }
        target = b_n(a, B_SOON_N);
        double t0 = b_now();
        MUST(ca_loop_call_soon(loop, chain_cb, NULL, NULL));
        run_loop();
        b_report(name, a, (double)target / (b_now() - t0), unit);
    } else if (b_is(a, "timers")) {
        NEED(HAVE(ca_loop_call_later), unit);
        target = b_n(a, B_TIMER_N);
        uint64_t seed = 42;
        double t0 = b_now();
        for (long i = 0; i < target; i++)
            MUST(ca_loop_call_later(loop, (double)b_timer_delay_us(&seed) * 1e-6, count_cb, NULL,
                                    NULL));
        run_loop();
        b_report(name, a, (double)target / (b_now() - t0), unit);
    } else if (b_is(a, "pingpong") || b_is(a, "pingpong_sock")) {
        int sock = b_is(a, "pingpong_sock");
        if (sock)
            NEED(HAVE(ca_loop_sock_recv) && HAVE(ca_loop_sock_sendall) &&
                     HAVE(ca_future_add_done_callback),
                 unit);
        else
            NEED(HAVE(ca_loop_add_reader), unit);
        nconns = a->param > 0 ? a->param : 1;
        long total = b_n(a, B_PING_N);
        conns = calloc((size_t)nconns, sizeof(conn));
        for (long i = 0; i < nconns; i++) {
            conn *c = &conns[i];
            b_socketpair(c->fd);
            c->target = total / nconns + (i < total % nconns);
            c->byte[0] = 'x';
            if (!sock) {
                TRY(ca_loop_add_reader(loop, c->fd[1], ping_echo, c), unit);
                TRY(ca_loop_add_reader(loop, c->fd[0], ping_back, c), unit);
            }
        }
        double t0 = b_now();
        for (long i = 0; i < nconns; i++) {
            if (sock) {
                issue(0, 1, &conns[i], echo_recvd);
                issue(1, 0, &conns[i], back_sent);
            } else if (write(conns[i].fd[0], "x", 1) != 1)
                b_die("write");
        }
        run_loop();
        b_report(name, a, (double)total / (b_now() - t0), unit);
    } else if (b_is(a, "stream")) {
        NEED(HAVE(ca_loop_sock_recv) && HAVE(ca_loop_sock_sendall), unit);
        nconns = a->param > 0 ? a->param : 1;
        long total = b_n(a, B_STREAM_MIB) * 1048576L;
        conns = calloc((size_t)nconns, sizeof(conn));
        rbufs = malloc((size_t)nconns * B_STREAM_CHUNK);
        char *chunk = calloc(1, B_STREAM_CHUNK);
        if (!conns || !rbufs || !chunk)
            b_die("oom");
        for (long i = 0; i < nconns; i++) {
            b_socketpair(conns[i].fd);
            conns[i].total = total / nconns;
            conns[i].buf = chunk;
        }
        /* One receive buffer per connection (a future owns its buffer until it completes,
         * where libuv's peer reads every stream into one static buffer): touched here, so
         * the timed run does not pay their first-touch page faults. */
        memset(rbufs, 0, (size_t)nconns * B_STREAM_CHUNK);
        double t0 = b_now();
        for (long i = 0; i < nconns; i++) {
            stream_recv_next(&conns[i], rbufs + (size_t)i * B_STREAM_CHUNK);
            stream_send_next(&conns[i]);
        }
        run_loop();
        b_report(name, a, (double)(total / nconns * nconns) / (b_now() - t0) / 1e6, unit);
    } else if (b_is(a, "threadsafe")) {
        NEED(HAVE(ca_loop_call_soon_threadsafe), unit);
        target = b_n(a, B_TS_N);
        pthread_t th;
        double t0 = b_now();
        pthread_create(&th, NULL, ts_thread, NULL);
        run_loop();
        double dt = b_now() - t0;
        pthread_join(th, NULL);
        b_report(name, a, (double)target / dt, unit);
    }
    if (HAVE(ca_loop_close))
        ca_loop_close(loop);
    if (HAVE(ca_loop_unref))
        loop = ca_loop_unref(loop);
    return 0;
}

/* ------------------------------------------------------------------ children */
static long started, reaped, total_children;
static const char *const true_argv[] = {"/bin/true", NULL};
static const char *const sleep600_argv[] = {"/bin/sleep", "600", NULL};
static const char *const sleep5_argv[] = {"/bin/sleep", "5", NULL};

static void on_exit_true(ca_process *p, void *arg);
static void on_exit_idle(ca_process *p, void *arg);
static const ca_subprocess_protocol true_proto = {.process_exited = on_exit_true};
static const ca_subprocess_protocol idle_proto = {.process_exited = on_exit_idle};

static int spawn(const char *const *argv, const ca_subprocess_protocol *proto, ca_process **out)
{
    ca_subprocess_options o = {0};
    o.argv = argv;
    o.stdin_mode = o.stdout_mode = o.stderr_mode = CA_INHERIT;
    return ca_loop_subprocess_exec(loop, &o, proto, NULL, out);
}

static void on_exit_true(ca_process *p, void *arg)
{
    (void)arg;
    reaped++;
    ca_process_unref(p);
    if (started < total_children) {
        ca_process *q;
        started++;
        int r = spawn(true_argv, &true_proto, &q);
        if (r < 0)
            sock_fail("subprocess_exec", r);
    } else if (reaped >= total_children)
        ca_loop_stop(loop);
}

static long idle_reaped;
static void on_exit_idle(ca_process *p, void *arg)
{
    (void)p;
    (void)arg;
    if (++idle_reaped == target)
        ca_loop_stop(loop);
}

static int child_workload(const bench_args *a, const char *variant)
{
    const char *unit = b_is(a, "spawn_reap") ? "children/s" : b_is(a, "mem") ? "KB/child" : "us";
    if (!(b_is(a, "spawn_reap") || b_is(a, "reap_scaling") || b_is(a, "mem")))
        return -1;
    char wkind[32] = "pidfd";
    const char *lkind = "epoll";
    if (*variant) {
        snprintf(wkind, sizeof wkind, "%s", variant);
        char *dash = strchr(wkind, '-');
        if (dash) {
            *dash = 0;
            lkind = variant + (dash - wkind) + 1;
        }
    }
    NEED(HAVE(ca_loop_run_forever) && HAVE(ca_loop_subprocess_exec) && HAVE(ca_set_child_watcher) &&
             HAVE(ca_set_event_loop) && HAVE(ca_process_unref),
         unit);
    TRY(make_loop(lkind, &loop), unit);
    ca_child_watcher *w;
    TRY(make_watcher(wkind, &w), unit);
    TRY(ca_set_child_watcher(w), unit);
    TRY(ca_set_event_loop(loop), unit);
    if (HAVE(ca_child_watcher_attach_loop))
        TRY(ca_child_watcher_attach_loop(w, loop), unit);

    if (b_is(a, "spawn_reap")) {
        total_children = b_n(a, B_SPAWN_N);
        long k = a->param > 0 ? a->param : 1;
        double t0 = b_now();
        for (long i = 0; i < k && started < total_children; i++) {
            ca_process *p;
            started++;
            TRY(spawn(true_argv, &true_proto, &p), unit);
        }
        run_loop();
        double dt = b_now() - t0;
        if (reaped != total_children)
            b_die("reaped %ld of %ld", reaped, total_children);
        b_report(name, a, (double)total_children / dt, unit);
    } else {
        int mem = b_is(a, "mem");
        long m = mem ? (a->param > 0 ? a->param : B_MEM_N) : a->param;
        long n = b_n(a, B_SCALE_N);
        ca_process **idle = calloc((size_t)m + 1, sizeof(ca_process *));
        {   /* warm-up: one spawn+reap first, so lazy allocations are not counted */
            ca_process *p;
            long r0 = reaped;
            total_children = 0;
            started = 1; /* never respawn from on_exit_true */
            TRY(spawn(true_argv, &true_proto, &p), unit);
            while (reaped == r0)
                run_loop();
        }
        long before = b_rss_bytes();
        for (long i = 0; i < m; i++)
            TRY(spawn(mem ? sleep5_argv : sleep600_argv, &idle_proto, &idle[i]), unit);
        long after = b_rss_bytes();
        double dt = 0, dc = 0;
        if (!mem) {
            ca_process *p;
            total_children = 0;
            started = 1; /* never respawn from on_exit_true */
            for (long i = 1; i <= n; i++) {
                long r0 = reaped;
                double t0 = b_now(), c0 = b_cpu_s();
                TRY(spawn(true_argv, &true_proto, &p), unit);
                while (reaped == r0)
                    run_loop();
                dt += b_now() - t0;
                dc += b_cpu_s() - c0;
            }
        }
        target = m;
        for (long i = 0; i < m; i++) {
            MUST(ca_process_kill(idle[i]));
            ca_process_unref(idle[i]);
        }
        if (m > 0)
            run_loop();
        if (mem) {
            b_report(name, a, (double)(after - before) / (double)m / 1024.0, unit);
            b_report_vsz(name, a, m);
        } else {
            b_report(name, a, dt / (double)n * 1e6, unit);
            b_report_cpu(name, a, dc / (double)n * 1e6);
        }
    }
    ca_set_event_loop(NULL);
    ca_set_child_watcher(NULL);
    if (HAVE(ca_child_watcher_unref))
        ca_child_watcher_unref(w);
    if (HAVE(ca_loop_close))
        ca_loop_close(loop);
    if (HAVE(ca_loop_unref))
        loop = ca_loop_unref(loop);
    return 0;
}

static int policy_workload(const bench_args *a)
{
    NEED(HAVE(ca_get_event_loop) && HAVE(ca_set_event_loop), "ns/call");
    TRY(make_loop("epoll", &loop), "ns/call");
    TRY(ca_set_event_loop(loop), "ns/call");
    long n = b_n(a, B_POLICY_N);
    ca_loop *l = NULL;
    TRY(ca_get_event_loop(&l), "ns/call");
    double t0 = b_now();
    for (long i = 0; i < n; i++) {
        ca_get_event_loop(&l);
        __asm__ volatile("" : : "r"(l) : "memory");
    }
    b_report(name, a, (b_now() - t0) / (double)n * 1e9, "ns/call");
    return 0;
}

int main(int argc, char **argv)
{
    bench_args a;
    b_parse(&a, argc, argv, "casyncio");
    b_raise_limits();
    int child = b_is(&a, "spawn_reap") || b_is(&a, "reap_scaling") || b_is(&a, "mem");
    const char *v = *a.variant ? a.variant : child ? "pidfd-epoll" : "epoll";
    if (child && !strchr(v, '-')) {
        static char buf[64];
        snprintf(buf, sizeof buf, "%s-epoll", v);
        v = buf;
    }
    snprintf(name, sizeof name, "casyncio-%s", b_is(&a, "policy") ? "epoll" : v);
    if (b_is(&a, "policy"))
        return policy_workload(&a);
    if (child_workload(&a, v) == 0 || loop_workload(&a, v) == 0)
        return 0;
    fprintf(stderr, "casyncio: unknown workload %s\n", a.workload);
    return 2;
}
