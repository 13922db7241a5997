/*
 * sd-event (libsystemd) peer.  call_soon = sd_event_add_defer (burst: one one-shot source per
 * call; chain: one source left ON, so it runs once per iteration); timers =
 * sd_event_add_time_relative with 1 us accuracy; ping-pong = sd_event_add_io; cross-thread =
 * a locked queue + an eventfd source (sd-event has no thread-safe call); children =
 * posix_spawn + sd_event_add_child (SIGCHLD blocked, as sd-event requires; it uses pidfds);
 * policy = sd_event_default() + sd_event_unref() (it hands out a reference).
 */
#include "common.h"

#include <pthread.h>
#include <stdatomic.h>
#include <sys/eventfd.h>
#include <systemd/sd-event.h>

static const char *NM = "sd-event";
static sd_event *ev;
static long counter, target;

#define CHECK(x)                                                                                  \
    do {                                                                                          \
        int r_ = (x);                                                                             \
        if (r_ < 0)                                                                               \
            b_die("%s: %s", #x, strerror(-r_));                                                 \
    } while (0)

static int burst_cb(sd_event_source *s, void *d)
{
    (void)s;
    (void)d;
    if (++counter == target)
        sd_event_exit(ev, 0);
    return 0;
}

static int chain_cb(sd_event_source *s, void *d)
{
    (void)d;
    if (++counter == target) {
        sd_event_source_set_enabled(s, SD_EVENT_OFF);
        sd_event_exit(ev, 0);
    }
    return 0;
}

static int timer_cb(sd_event_source *s, uint64_t usec, void *d)
{
    (void)usec;
    return burst_cb(s, d);
}

typedef struct conn {
    int fd[2];
    sd_event_source *src[2];
    long rounds, target;
} conn;
static long conns_done, nconns;

static int io_echo(sd_event_source *s, int fd, uint32_t revents, void *d)
{
    (void)s;
    (void)revents;
    (void)d;
    char b;
    ssize_t r = read(fd, &b, 1);
    if (r == 1) {
        if (write(fd, &b, 1) != 1)
            b_die("write");
    } else if (r < 0 && errno != EAGAIN)
        b_die("read: %s", strerror(errno));
    return 0;
}

static int io_back(sd_event_source *s, int fd, uint32_t revents, void *d)
{
    (void)s;
    (void)revents;
    conn *c = d;
    char b;
    ssize_t r = read(fd, &b, 1);
    if (r < 0 && errno == EAGAIN)
        return 0;
    if (r != 1)
        b_die("read");
    if (++c->rounds < c->target) {
        if (write(fd, &b, 1) != 1)
            b_die("write");
        return 0;
    }
    sd_event_source_set_enabled(c->src[0], SD_EVENT_OFF);
    sd_event_source_set_enabled(c->src[1], SD_EVENT_OFF);
    if (++conns_done == nconns)
        sd_event_exit(ev, 0);
    return 0;
}

typedef struct { void (*fn)(void *); void *arg; } tcb;
static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static tcb *tq;
static size_t tqn, tqcap;
static atomic_int wake_pending;
static int efd;

static void ts_count(void *arg)
{
    (void)arg;
    if (++counter == target)
        sd_event_exit(ev, 0);
}

static int wake_cb(sd_event_source *s, int fd, uint32_t revents, void *d)
{
    (void)s;
    (void)revents;
    (void)d;
    uint64_t v;
    if (read(fd, &v, sizeof v) < 0 && errno != EAGAIN)
        b_die("eventfd read");
    atomic_store(&wake_pending, 0);
    pthread_mutex_lock(&mu);
    tcb *q = tq;
    size_t n = tqn;
    tq = NULL;
    tqn = tqcap = 0;
    pthread_mutex_unlock(&mu);
    for (size_t i = 0; i < n; i++)
        q[i].fn(q[i].arg);
    free(q);
    return 0;
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
        if (atomic_exchange(&wake_pending, 1) == 0) {
            uint64_t one = 1;
            if (write(efd, &one, sizeof one) < 0)
                b_die("eventfd write");
        }
    }
    return NULL;
}

static int loop_workload(const bench_args *a)
{
    if (b_is(a, "burst")) {
        target = b_n(a, B_SOON_N);
        double t0 = b_now();
        for (long i = 0; i < target; i++)
            CHECK(sd_event_add_defer(ev, NULL, burst_cb, NULL));
        CHECK(sd_event_loop(ev));
        b_report(NM, a, (double)target / (b_now() - t0), "calls/s");
    } else if (b_is(a, "chain")) {
        /* param 1: one idle fd registered, so a loop has to poll every iteration */
        int sv[2];
        if (a->param > 0) {
            b_socketpair(sv);
            CHECK(sd_event_add_io(ev, NULL, sv[0], EPOLLIN, io_echo, NULL));
        }
        target = b_n(a, B_SOON_N);
        sd_event_source *s;
        double t0 = b_now();
        CHECK(sd_event_add_defer(ev, &s, chain_cb, NULL));
        CHECK(sd_event_source_set_enabled(s, SD_EVENT_ON));
        CHECK(sd_event_loop(ev));
        b_report(NM, a, (double)target / (b_now() - t0), "calls/s");
    } else if (b_is(a, "timers")) {
        target = b_n(a, B_TIMER_N);
        uint64_t seed = 42;
        double t0 = b_now();
        for (long i = 0; i < target; i++)
            CHECK(sd_event_add_time_relative(ev, NULL, CLOCK_MONOTONIC,
                                             (uint64_t)b_timer_delay_us(&seed), 1, timer_cb, NULL));
        CHECK(sd_event_loop(ev));
        b_report(NM, a, (double)target / (b_now() - t0), "timers/s");
    } else if (b_is(a, "pingpong")) {
        nconns = a->param > 0 ? a->param : 1;
        long total = b_n(a, B_PING_N);
        conn *cs = calloc((size_t)nconns, sizeof(conn));
        for (long i = 0; i < nconns; i++) {
            conn *c = &cs[i];
            b_socketpair(c->fd);
            c->target = total / nconns + (i < total % nconns);
            CHECK(sd_event_add_io(ev, &c->src[0], c->fd[0], EPOLLIN, io_back, c));
            CHECK(sd_event_add_io(ev, &c->src[1], c->fd[1], EPOLLIN, io_echo, c));
        }
        double t0 = b_now();
        for (long i = 0; i < nconns; i++)
            if (write(cs[i].fd[0], "x", 1) != 1)
                b_die("write");
        CHECK(sd_event_loop(ev));
        b_report(NM, a, (double)total / (b_now() - t0), "rt/s");
    } else if (b_is(a, "threadsafe")) {
        target = b_n(a, B_TS_N);
        efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
        CHECK(sd_event_add_io(ev, NULL, efd, EPOLLIN, wake_cb, NULL));
        pthread_t th;
        double t0 = b_now();
        pthread_create(&th, NULL, ts_thread, NULL);
        CHECK(sd_event_loop(ev));
        double dt = b_now() - t0;
        pthread_join(th, NULL);
        b_report(NM, a, (double)target / dt, "calls/s");
    } else
        return -1;
    return 0;
}

/* ------------------------------------------------------------------ children */
static long started, reaped, total_children;
static posix_spawnattr_t attr;

static pid_t spawn_watch(char *const argv[], sd_event_child_handler_t cb)
{
    pid_t pid;
    int e = posix_spawn(&pid, argv[0], NULL, &attr, argv, environ);
    if (e != 0)
        b_die("posix_spawn: %s", strerror(e));
    CHECK(sd_event_add_child(ev, NULL, pid, WEXITED, cb, NULL));
    return pid;
}

static int true_exit(sd_event_source *s, const siginfo_t *si, void *d)
{
    (void)si;
    (void)d;
    (void)s;
    reaped++;
    if (started < total_children) {
        started++;
        spawn_watch(b_true_argv, true_exit);
    } else if (reaped == total_children)
        sd_event_exit(ev, 0);
    return 0;
}

static int idle_exit(sd_event_source *s, const siginfo_t *si, void *d)
{
    (void)s;
    (void)si;
    (void)d;
    reaped++;
    return 0;
}

static int child_workload(const bench_args *a)
{
    if (b_is(a, "spawn_reap")) {
        total_children = b_n(a, B_SPAWN_N);
        long k = a->param > 0 ? a->param : 1;
        double t0 = b_now();
        for (long i = 0; i < k && started < total_children; i++) {
            started++;
            spawn_watch(b_true_argv, true_exit);
        }
        CHECK(sd_event_loop(ev));
        double dt = b_now() - t0;
        if (reaped != total_children)
            b_die("reaped %ld of %ld", reaped, total_children);
        b_report(NM, a, (double)total_children / dt, "children/s");
    } else if (b_is(a, "reap_scaling") || b_is(a, "mem")) {
        int mem = b_is(a, "mem");
        long m = mem ? (a->param > 0 ? a->param : B_MEM_N) : a->param;
        long n = b_n(a, B_SCALE_N);
        pid_t *idle = calloc((size_t)m + 1, sizeof(pid_t));
        {   /* warm-up: one spawn+reap first, so lazy allocations are not counted */
            long r0 = reaped;
            started = 0;
            total_children = -1;
            spawn_watch(b_true_argv, true_exit);
            while (reaped == r0)
                CHECK(sd_event_run(ev, UINT64_MAX));
        }
        long before = b_rss_bytes();
        for (long i = 0; i < m; i++)
            idle[i] = spawn_watch(mem ? b_sleep5_argv : b_sleep600_argv, idle_exit);
        long after = b_rss_bytes();
        double dt = 0;
        if (!mem) {
            for (long i = 0; i < n; i++) {
                long r0 = reaped;
                double t0 = b_now();
                started = 0;
                total_children = -1;
                spawn_watch(b_true_argv, true_exit);
                while (reaped == r0)
                    CHECK(sd_event_run(ev, UINT64_MAX));
                dt += b_now() - t0;
            }
        }
        long r0 = reaped;
        for (long i = 0; i < m; i++)
            kill(idle[i], SIGKILL);
        while (reaped - r0 < m)
            CHECK(sd_event_run(ev, UINT64_MAX));
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
    sigset_t ss, empty;
    sigemptyset(&ss);
    sigemptyset(&empty);
    sigaddset(&ss, SIGCHLD);
    pthread_sigmask(SIG_BLOCK, &ss, NULL);
    posix_spawnattr_init(&attr);
    posix_spawnattr_setsigmask(&attr, &empty);
    posix_spawnattr_setflags(&attr, POSIX_SPAWN_SETSIGMASK);
    CHECK(sd_event_default(&ev));
    if (b_is(&a, "policy")) {
        long n = b_n(&a, B_POLICY_N);
        double t0 = b_now();
        for (long i = 0; i < n; i++) {
            sd_event *e;
            sd_event_default(&e);
            __asm__ volatile("" : : "r"(e) : "memory");
            sd_event_unref(e);
        }
        b_report(NM, &a, (b_now() - t0) / (double)n * 1e9, "ns/call");
        return 0;
    }
    if (child_workload(&a) == 0 || loop_workload(&a) == 0)
        return 0;
    fprintf(stderr, "%s: unknown workload %s\n", NM, a.workload);
    return 2;
}
