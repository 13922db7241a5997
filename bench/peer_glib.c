/*
 * GLib peer.  call_soon = g_idle_add (burst: one source per call; chain: one idle source that
 * returns TRUE, so runs once per iteration); timers = g_timeout_add (millisecond resolution);
 * ping-pong = g_unix_fd_add; cross-thread = g_idle_add from the other thread (GLib's way);
 * children = g_spawn_async (G_SPAWN_DO_NOT_REAP_CHILD) + g_child_watch_add;
 * policy = g_main_context_get_thread_default() with a context pushed.
 */
#include "common.h"

#include <glib-unix.h>
#include <glib.h>

static const char *NM = "glib";
static GMainLoop *ml;
static long counter, target;

static gboolean burst_cb(gpointer d)
{
    (void)d;
    if (++counter == target)
        g_main_loop_quit(ml);
    return G_SOURCE_REMOVE;
}

static gboolean chain_cb(gpointer d)
{
    (void)d;
    if (++counter == target) {
        g_main_loop_quit(ml);
        return G_SOURCE_REMOVE;
    }
    return G_SOURCE_CONTINUE;
}

typedef struct conn {
    int fd[2];
    guint src[2];
    long rounds, target;
} conn;
static long conns_done, nconns;

static gboolean fd_echo(gint fd, GIOCondition cond, gpointer d)
{
    (void)cond;
    (void)d;
    char b;
    ssize_t r = read(fd, &b, 1);
    if (r == 1) {
        if (write(fd, &b, 1) != 1)
            b_die("write");
    } else if (r < 0 && errno != EAGAIN)
        b_die("read: %s", strerror(errno));
    return G_SOURCE_CONTINUE;
}

static gboolean fd_back(gint fd, GIOCondition cond, gpointer d)
{
    (void)cond;
    conn *c = d;
    char b;
    ssize_t r = read(fd, &b, 1);
    if (r < 0 && errno == EAGAIN)
        return G_SOURCE_CONTINUE;
    if (r != 1)
        b_die("read");
    if (++c->rounds < c->target) {
        if (write(fd, &b, 1) != 1)
            b_die("write");
        return G_SOURCE_CONTINUE;
    }
    g_source_remove(c->src[1]);
    if (++conns_done == nconns)
        g_main_loop_quit(ml);
    return G_SOURCE_REMOVE;
}

static gpointer ts_thread(gpointer d)
{
    (void)d;
    for (long i = 0; i < target; i++)
        g_idle_add_full(G_PRIORITY_DEFAULT, burst_cb, NULL, NULL);
    return NULL;
}

static int loop_workload(const bench_args *a)
{
    if (b_is(a, "burst")) {
        target = b_n(a, B_SOON_N);
        double t0 = b_now();
        for (long i = 0; i < target; i++)
            g_idle_add_full(G_PRIORITY_DEFAULT, burst_cb, NULL, NULL);
        g_main_loop_run(ml);
        b_report(NM, a, (double)target / (b_now() - t0), "calls/s");
    } else if (b_is(a, "chain")) {
        /* param 1: one idle fd registered, so a loop has to poll every iteration */
        int sv[2];
        if (a->param > 0) {
            b_socketpair(sv);
            g_unix_fd_add(sv[0], G_IO_IN, fd_echo, NULL);
        }
        target = b_n(a, B_SOON_N);
        double t0 = b_now();
        g_idle_add_full(G_PRIORITY_DEFAULT, chain_cb, NULL, NULL);
        g_main_loop_run(ml);
        b_report(NM, a, (double)target / (b_now() - t0), "calls/s");
    } else if (b_is(a, "timers")) {
        target = b_n(a, B_TIMER_N);
        uint64_t seed = 42;
        double t0 = b_now();
        for (long i = 0; i < target; i++)
            g_timeout_add_full(G_PRIORITY_DEFAULT, (guint)((b_timer_delay_us(&seed) + 999) / 1000),
                               burst_cb, NULL, NULL);
        g_main_loop_run(ml);
        b_report(NM, a, (double)target / (b_now() - t0), "timers/s");
    } else if (b_is(a, "pingpong")) {
        nconns = a->param > 0 ? a->param : 1;
        long total = b_n(a, B_PING_N);
        conn *cs = calloc((size_t)nconns, sizeof(conn));
        for (long i = 0; i < nconns; i++) {
            conn *c = &cs[i];
            b_socketpair(c->fd);
            c->target = total / nconns + (i < total % nconns);
            c->src[0] = g_unix_fd_add(c->fd[0], G_IO_IN, fd_back, c);
            c->src[1] = g_unix_fd_add(c->fd[1], G_IO_IN, fd_echo, c);
        }
        double t0 = b_now();
        for (long i = 0; i < nconns; i++)
            if (write(cs[i].fd[0], "x", 1) != 1)
                b_die("write");
        g_main_loop_run(ml);
        b_report(NM, a, (double)total / (b_now() - t0), "rt/s");
    } else if (b_is(a, "threadsafe")) {
        target = b_n(a, B_TS_N);
        double t0 = b_now();
        GThread *th = g_thread_new("poster", ts_thread, NULL);
        g_main_loop_run(ml);
        double dt = b_now() - t0;
        g_thread_join(th);
        b_report(NM, a, (double)target / dt, "calls/s");
    } else
        return -1;
    return 0;
}

/* ------------------------------------------------------------------ children */
static long started, reaped, total_children;

static GPid spawn_watch(char *const argv[], GChildWatchFunc cb)
{
    GPid pid;
    GError *err = NULL;
    if (!g_spawn_async(NULL, (gchar **)argv, NULL, G_SPAWN_DO_NOT_REAP_CHILD, NULL, NULL, &pid,
                       &err))
        b_die("g_spawn_async: %s", err->message);
    g_child_watch_add(pid, cb, NULL);
    return pid;
}

static void true_exit(GPid pid, gint status, gpointer d)
{
    (void)status;
    (void)d;
    g_spawn_close_pid(pid);
    reaped++;
    if (started < total_children) {
        started++;
        spawn_watch(b_true_argv, true_exit);
    } else if (reaped == total_children)
        g_main_loop_quit(ml);
}

static void idle_exit(GPid pid, gint status, gpointer d)
{
    (void)status;
    (void)d;
    g_spawn_close_pid(pid);
    reaped++;
}

static int child_workload(const bench_args *a)
{
    GMainContext *ctx = g_main_context_default();
    if (b_is(a, "spawn_reap")) {
        total_children = b_n(a, B_SPAWN_N);
        long k = a->param > 0 ? a->param : 1;
        double t0 = b_now();
        for (long i = 0; i < k && started < total_children; i++) {
            started++;
            spawn_watch(b_true_argv, true_exit);
        }
        g_main_loop_run(ml);
        double dt = b_now() - t0;
        b_report(NM, a, (double)total_children / dt, "children/s");
    } else if (b_is(a, "reap_scaling") || b_is(a, "mem")) {
        int mem = b_is(a, "mem");
        long m = mem ? (a->param > 0 ? a->param : B_MEM_N) : a->param;
        long n = b_n(a, B_SCALE_N);
        GPid *idle = calloc((size_t)m + 1, sizeof(GPid));
        {   /* warm-up: one spawn+reap first, so lazy allocations are not counted */
            long r0 = reaped;
            started = 0;
            total_children = -1;
            spawn_watch(b_true_argv, true_exit);
            while (reaped == r0)
                g_main_context_iteration(ctx, TRUE);
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
                started = total_children = 0;
                total_children = -1; /* never quit from true_exit */
                spawn_watch(b_true_argv, true_exit);
                while (reaped == r0)
                    g_main_context_iteration(ctx, TRUE);
                dt += b_now() - t0;
            }
        }
        long r0 = reaped;
        for (long i = 0; i < m; i++)
            kill(idle[i], SIGKILL);
        while (reaped - r0 < m)
            g_main_context_iteration(ctx, TRUE);
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
    ml = g_main_loop_new(NULL, FALSE);
    if (b_is(&a, "policy")) {
        long n = b_n(&a, B_POLICY_N);
        GMainContext *c = g_main_context_new();
        g_main_context_push_thread_default(c);
        double t0 = b_now();
        for (long i = 0; i < n; i++) {
            GMainContext *l = g_main_context_get_thread_default();
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
