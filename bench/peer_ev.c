/*
 * libev peer.  call_soon burst = ev_feed_event on one watcher per call (libev's pending
 * queue); chain = an ev_idle watcher that runs once per iteration; timers = ev_timer;
 * ping-pong = ev_io; cross-thread = a locked queue + ev_async_send; children = posix_spawn +
 * ev_child on the default loop (libev's SIGCHLD handler and waitpid(-1) loop).
 */
#include "common.h"

#include <ev.h>
#include <pthread.h>

static const char *NM = "libev";
static struct ev_loop *loop;
static long counter, target;

static void burst_cb(struct ev_loop *l, ev_idle *w, int revents)
{
    (void)l;
    (void)w;
    (void)revents;
    counter++;
}

static void chain_cb(struct ev_loop *l, ev_idle *w, int revents)
{
    (void)revents;
    if (++counter == target) {
        ev_idle_stop(l, w);
        ev_break(l, EVBREAK_ALL); /* an idle fd may still be registered */
    }
}

static void never_cb(struct ev_loop *l, ev_io *w, int revents)
{
    (void)l;
    (void)w;
    (void)revents;
    b_die("the idle fd became readable");
}

static void timer_cb(struct ev_loop *l, ev_timer *w, int revents)
{
    (void)l;
    (void)w;
    (void)revents;
    counter++;
}

typedef struct conn {
    int fd[2];
    ev_io io[2];
    long rounds, target;
} conn;
static long conns_done, nconns;

static void io_echo(struct ev_loop *l, ev_io *w, int revents)
{
    (void)l;
    (void)revents;
    char b;
    ssize_t r = read(w->fd, &b, 1);
    if (r == 1) {
        if (write(w->fd, &b, 1) != 1)
            b_die("write");
    } else if (r < 0 && errno != EAGAIN)
        b_die("read: %s", strerror(errno));
}

static void io_back(struct ev_loop *l, ev_io *w, int revents)
{
    (void)revents;
    conn *c = w->data;
    char b;
    ssize_t r = read(w->fd, &b, 1);
    if (r < 0 && errno == EAGAIN)
        return;
    if (r != 1)
        b_die("read");
    if (++c->rounds < c->target) {
        if (write(w->fd, &b, 1) != 1)
            b_die("write");
    } else {
        ev_io_stop(l, &c->io[0]);
        ev_io_stop(l, &c->io[1]);
        conns_done++;
    }
}

typedef struct { void (*fn)(void *); void *arg; } tcb;
static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static tcb *tq;
static size_t tqn, tqcap;
static ev_async async;

static void ts_count(void *arg)
{
    (void)arg;
    if (++counter == target)
        ev_async_stop(loop, &async);
}

static void async_cb(struct ev_loop *l, ev_async *w, int revents)
{
    (void)l;
    (void)w;
    (void)revents;
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

static void *ts_thread(void *arg)
{
    (void)arg;
    for (long i = 0; i < target; i++) {
        pthread_mutex_lock(&mu);
        if (tqn == tqcap) {
            tqcap = tqcap ? tqcap * 2 : 1024;
            tq = realloc(tq, tqcap * sizeof(tcb));
            if (!tq)
                b_die("oom");
        }
        tq[tqn].fn = ts_count;
        tq[tqn].arg = NULL;
        tqn++;
        pthread_mutex_unlock(&mu);
        ev_async_send(loop, &async);
    }
    return NULL;
}

static int loop_workload(const bench_args *a)
{
    if (b_is(a, "burst")) {
        target = b_n(a, B_SOON_N);
        ev_idle *ws = malloc((size_t)target * sizeof(ev_idle));
        double t0 = b_now();
        for (long i = 0; i < target; i++) {
            ev_idle_init(&ws[i], burst_cb);
            ev_feed_event(loop, &ws[i], EV_CUSTOM);
        }
        ev_run(loop, 0);
        double dt = b_now() - t0;
        if (counter != target)
            b_die("burst: %ld of %ld", counter, target);
        b_report(NM, a, (double)target / dt, "calls/s");
    } else if (b_is(a, "chain")) {
        /* param 1: one idle fd registered, so a loop has to poll every iteration */
        int sv[2];
        ev_io idle_fd;
        if (a->param > 0) {
            b_socketpair(sv);
            ev_io_init(&idle_fd, never_cb, sv[0], EV_READ);
            ev_io_start(loop, &idle_fd);
        }
        target = b_n(a, B_SOON_N);
        ev_idle w;
        double t0 = b_now();
        ev_idle_init(&w, chain_cb);
        ev_idle_start(loop, &w);
        ev_run(loop, 0);
        b_report(NM, a, (double)target / (b_now() - t0), "calls/s");
    } else if (b_is(a, "timers")) {
        target = b_n(a, B_TIMER_N);
        ev_timer *ts = malloc((size_t)target * sizeof(ev_timer));
        uint64_t seed = 42;
        double t0 = b_now();
        ev_now_update(loop);
        for (long i = 0; i < target; i++) {
            ev_timer_init(&ts[i], timer_cb, (double)b_timer_delay_us(&seed) * 1e-6, 0.);
            ev_timer_start(loop, &ts[i]);
        }
        ev_run(loop, 0);
        double dt = b_now() - t0;
        if (counter != target)
            b_die("timers: %ld of %ld", counter, target);
        b_report(NM, a, (double)target / dt, "timers/s");
    } else if (b_is(a, "pingpong")) {
        nconns = a->param > 0 ? a->param : 1;
        long total = b_n(a, B_PING_N);
        conn *cs = calloc((size_t)nconns, sizeof(conn));
        for (long i = 0; i < nconns; i++) {
            conn *c = &cs[i];
            b_socketpair(c->fd);
            c->target = total / nconns + (i < total % nconns);
            ev_io_init(&c->io[0], io_back, c->fd[0], EV_READ);
            ev_io_init(&c->io[1], io_echo, c->fd[1], EV_READ);
            c->io[0].data = c->io[1].data = c;
            ev_io_start(loop, &c->io[0]);
            ev_io_start(loop, &c->io[1]);
        }
        double t0 = b_now();
        for (long i = 0; i < nconns; i++)
            if (write(cs[i].fd[0], "x", 1) != 1)
                b_die("write");
        ev_run(loop, 0);
        double dt = b_now() - t0;
        if (conns_done != nconns)
            b_die("pingpong: %ld of %ld", conns_done, nconns);
        b_report(NM, a, (double)total / dt, "rt/s");
    } else if (b_is(a, "threadsafe")) {
        target = b_n(a, B_TS_N);
        ev_async_init(&async, async_cb);
        ev_async_start(loop, &async);
        pthread_t th;
        double t0 = b_now();
        pthread_create(&th, NULL, ts_thread, NULL);
        ev_run(loop, 0);
        double dt = b_now() - t0;
        pthread_join(th, NULL);
        b_report(NM, a, (double)target / dt, "calls/s");
    } else
        return -1;
    return 0;
}

/* ------------------------------------------------------------------ children */
static long started, reaped, total_children;

static void true_exit(struct ev_loop *l, ev_child *w, int revents);

static void spawn_watch(char *const argv[], void (*cb)(struct ev_loop *, ev_child *, int),
                        ev_child *w)
{
    pid_t pid = b_spawn(argv);
    ev_child_init(w, cb, pid, 0);
    ev_child_start(loop, w);
}

static void true_exit(struct ev_loop *l, ev_child *w, int revents)
{
    (void)revents;
    ev_child_stop(l, w);
    reaped++;
    if (started < total_children) {
        started++;
        spawn_watch(b_true_argv, true_exit, w); /* reuse the watcher */
    } else
        free(w);
}

static void idle_exit(struct ev_loop *l, ev_child *w, int revents)
{
    (void)revents;
    ev_child_stop(l, w);
    reaped++;
}

static ev_child *new_child(void)
{
    ev_child *w = malloc(sizeof *w);
    if (!w)
        b_die("oom");
    return w;
}

static int child_workload(const bench_args *a)
{
    if (b_is(a, "spawn_reap")) {
        total_children = b_n(a, B_SPAWN_N);
        long k = a->param > 0 ? a->param : 1;
        double t0 = b_now();
        for (long i = 0; i < k && started < total_children; i++) {
            started++;
            spawn_watch(b_true_argv, true_exit, new_child());
        }
        ev_run(loop, 0);
        double dt = b_now() - t0;
        if (reaped != total_children)
            b_die("reaped %ld of %ld", reaped, total_children);
        b_report(NM, a, (double)total_children / dt, "children/s");
    } else if (b_is(a, "reap_scaling") || b_is(a, "mem")) {
        int mem = b_is(a, "mem");
        long m = mem ? (a->param > 0 ? a->param : B_MEM_N) : a->param;
        long n = b_n(a, B_SCALE_N);
        ev_child **idle = calloc((size_t)m + 1, sizeof(ev_child *));
        {   /* warm-up: one spawn+reap first, so lazy allocations are not counted */
            long r0 = reaped;
            started = total_children = 0;
            spawn_watch(b_true_argv, true_exit, new_child());
            while (reaped == r0)
                ev_run(loop, EVRUN_ONCE);
        }
        long before = b_rss_bytes();
        for (long i = 0; i < m; i++) {
            idle[i] = new_child();
            spawn_watch(mem ? b_sleep5_argv : b_sleep600_argv, idle_exit, idle[i]);
        }
        long after = b_rss_bytes();
        double dt = 0;
        if (!mem) {
            for (long i = 0; i < n; i++) {
                long r0 = reaped;
                double t0 = b_now();
                started = total_children = 0;
                spawn_watch(b_true_argv, true_exit, new_child());
                while (reaped == r0)
                    ev_run(loop, EVRUN_ONCE);
                dt += b_now() - t0;
            }
        }
        long r0 = reaped;
        for (long i = 0; i < m; i++)
            kill(idle[i]->pid, SIGKILL);
        while (reaped - r0 < m)
            ev_run(loop, EVRUN_ONCE);
        if (mem) {
            b_report(NM, a, (double)(after - before) / (double)m / 1024.0, "KB/child");
            b_report_vsz(NM, a, m);
        } else
            b_report(NM, a, dt / (double)n * 1e6, "us");
    } else
        return -1;
    return 0;
}

int main(int argc, char **argv)
{
    bench_args a;
    b_parse(&a, argc, argv, NM);
    b_raise_limits();
    loop = ev_default_loop(EVFLAG_AUTO);
    if (!loop)
        b_die("ev_default_loop failed");
    if (child_workload(&a) == 0 || loop_workload(&a) == 0)
        return 0;
    fprintf(stderr, "%s: unknown workload %s\n", NM, a.workload);
    return 2;
}
