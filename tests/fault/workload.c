/*
 * The allocation-failure sweep's workload (docs/testing.md, tools/sweep.sh).
 *
 * One fixed run over every unit of the library: each loop kind (epoll, poll, io_uring, the
 * custom loop of tests/custom_loop.c) with callbacks, timers, futures, a thread posting with
 * call_soon_threadsafe, a signal handler and socket operations on a socketpair and on
 * loopback TCP; the runner; then each child watcher kind under its own policy, with a
 * subprocess that has three pipes, one with inherited stdio and communicate(), and a raw
 * fork()ed child registered with add_child_handler; then everything closed.
 *
 * tools/sweep.sh runs it once per N with CA_FAULT_N=N (alloc_wrap.c fails the Nth allocation).
 * Whatever fails, the workload carries on with what it has, and checks:
 *   - an error is one the failure can explain: before the injection, none at all; after it,
 *     -ENOMEM/-EAGAIN (and the knock-on codes listed at OKX calls);
 *   - no exit is lost: every spawn that succeeded reports process_exited (a child that waits
 *     for input that could not be sent is killed after a while; it must still be reported);
 *   - at the end no child (running or zombie), no extra thread, no extra fd, and no block
 *     allocated before the final policy reset still live (the leak check).
 * Exit status: 0 the injected failure happened and every check passed; 2 the run ended
 * without reaching call N (the sweep is over); 1 a check failed (printed on stderr).
 * Crashes, sanitizer reports and hangs are the driver's to see.
 */
#include "alloc_wrap.h"
#include "casyncio.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

/* tests/custom_loop.c, and the one harness function it may call (tests/harness.c is not
 * linked: it has its own main). */
int t_custom_loop_new(ca_loop **out);
void t_fail(const char *file, int line, const char *fmt, ...);
void t_fail(const char *file, int line, const char *fmt, ...)
{
    va_list ap;
    fprintf(stderr, "workload: FAIL in the test custom loop, %s:%d: ", file, line);
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputc('\n', stderr);
    _exit(1);
}

/* Defined by the uring watcher when it is linked in (h-uring's branch); weak so that this
 * program still links without it, and skips that watcher. */
#pragma weak ca_uring_child_watcher_new

static int failures;

static void fail(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "workload: FAIL (call %ld, injected %s): ", aw_calls(),
            aw_injected() ? "yes" : "no");
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputc('\n', stderr);
    failures++;
}

/* Checks r, the result of expr: true if it succeeded. An error must be explained by the
 * injected failure: -ENOMEM or -EAGAIN, or one of the extra codes the caller lists (a
 * knock-on of an earlier failure), and only once the failure was injected. */
static bool ok_(int r, const char *expr, int line, int extra1, int extra2)
{
    if (r >= 0) return true;
    bool explained = aw_injected() &&
                     (r == -ENOMEM || r == -EAGAIN || (extra1 && r == extra1) ||
                      (extra2 && r == extra2));
    if (!explained) fail("line %d: %s gave %d (%s)", line, expr, r, ca_strerror(r));
    return false;
}
#define OK(expr) ok_((expr), #expr, __LINE__, 0, 0)
#define OKX(expr, e1, e2) ok_((expr), #expr, __LINE__, (e1), (e2))

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static void stop_cb(void *arg) { ca_loop_stop(arg); }

/* Runs loop in slices until *flag is set or `secs` pass. Each slice is ended by a timer, so a
 * failed scheduling call (no memory) is simply retried; run_forever's own errors too. */
static bool run_until(ca_loop *loop, volatile int *flag, double secs)
{
    double deadline = now() + secs;
    while (!*flag && now() < deadline) {
        ca_handle *h = NULL;
        if (ca_loop_call_later(loop, 0.02, stop_cb, loop, &h) < 0) continue;
        int r = ca_loop_run_forever(loop);
        if (r < 0 && r != -ENOMEM) fail("run_forever gave %d (%s)", r, ca_strerror(r));
        ca_handle_cancel(h);
        ca_handle_unref(h);
    }
    return *flag != 0;
}

static void log_fn(int level, const char *msg, void *arg)
{
    (void)level, (void)msg, (void)arg; /* the warnings are expected (killed children...) */
}

/* ----- loops -------------------------------------------------------------------------- */

struct lstate {
    ca_loop *loop;
    int soon, later, cancelled, threadsafe, sig, done_cb, readable, writable, wfd;
    volatile int all;
};

static void wake(void);
static void count_cb(void *arg) { ++*(int *)arg; }

static void fut_done(ca_future *f, void *arg)
{
    (void)f;
    struct lstate *s = arg;
    s->done_cb++;
    s->all = 1;
    ca_loop_stop(s->loop);
}

static void set_result_cb(void *arg) { ca_future_set_result(arg, (void *)(intptr_t)42); }

static void *poster(void *arg)
{
    struct lstate *s = arg;
    OK(ca_loop_call_soon_threadsafe(s->loop, count_cb, &s->threadsafe));
    return NULL;
}

static void reader_cb(void *arg)
{
    struct lstate *s = arg;
    s->readable++;
    ca_loop_remove_reader(s->loop, -1); /* -EINVAL, harmless: exercises the check */
}

/* One call is enough: the pipe stays writable, and a writer left on it would spin the loop. */
static void writer_cb(void *arg)
{
    struct lstate *s = arg;
    if (s->writable++ == 0) ca_loop_remove_writer(s->loop, s->wfd);
}

/* Each event that a run_until waits for also stops the loop, so that the slice ends at once. */
static void wake(void) { ca_loop_stop(ca_get_running_loop()); }

static void flag_fut_done(ca_future *f, void *arg)
{
    (void)f;
    *(volatile int *)arg = 1;
    wake();
}

/* Waits for fut (if any) for at most secs; true if done. */
static bool wait_future(ca_loop *loop, ca_future *fut, double secs)
{
    if (!fut) return false;
    volatile int flag = ca_future_done(fut);
    if (!flag && !OK(ca_future_add_done_callback(fut, flag_fut_done, (void *)&flag))) {
        /* No callback (no memory): poll the future instead. */
        double deadline = now() + secs;
        while (!ca_future_done(fut) && now() < deadline) {
            volatile int never = 0;
            run_until(loop, &never, 0.02);
        }
        return ca_future_done(fut);
    }
    return run_until(loop, &flag, secs);
}

static void sockets(ca_loop *loop)
{
    int sv[2];
    if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0, sv) < 0) {
        fail("socketpair: %s", strerror(errno));
        return;
    }
    char buf[16] = {0};
    ca_future *snd = NULL, *rcv = NULL;
    OK(ca_loop_sock_recv(loop, sv[1], buf, sizeof buf, &rcv));
    OK(ca_loop_sock_sendall(loop, sv[0], "hello", 5, &snd));
    if (snd && !wait_future(loop, snd, 5)) fail("sock_sendall never completed");
    if (rcv && !wait_future(loop, rcv, 5)) fail("sock_recv never completed");
    if (snd && rcv) {
        void *res = NULL;
        if (ca_future_result(rcv, &res) == 0 && (intptr_t)res != 5)
            fail("sock_recv got %ld bytes", (long)(intptr_t)res);
    }
    /* A recv that is cancelled while pending. */
    ca_future *pend = NULL;
    if (OK(ca_loop_sock_recv(loop, sv[1], buf, sizeof buf, &pend))) ca_future_cancel(pend);
    ca_future_unref(pend);
    ca_future_unref(snd);
    ca_future_unref(rcv);

    /* Loopback TCP: connect and accept. */
    int ls = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    int cs = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t alen = sizeof a;
    if (ls >= 0 && cs >= 0 && bind(ls, (struct sockaddr *)&a, sizeof a) == 0 &&
        listen(ls, 4) == 0 && getsockname(ls, (struct sockaddr *)&a, &alen) == 0) {
        ca_future *acc = NULL, *con = NULL;
        OK(ca_loop_sock_accept(loop, ls, &acc));
        OK(ca_loop_sock_connect(loop, cs, (struct sockaddr *)&a, alen, &con));
        if (con && !wait_future(loop, con, 5)) fail("sock_connect never completed");
        if (acc && con && !wait_future(loop, acc, 5)) fail("sock_accept never completed");
        void *res = NULL;
        if (acc && ca_future_done(acc) && ca_future_result(acc, &res) == 0)
            close((int)(intptr_t)res);
        if (acc && !ca_future_done(acc)) ca_future_cancel(acc);
        ca_future_unref(acc);
        ca_future_unref(con);
    } else {
        fail("loopback socket setup: %s", strerror(errno));
    }
    if (ls >= 0) close(ls);
    if (cs >= 0) close(cs);
    close(sv[0]);
    close(sv[1]);
}

static void one_loop(int kind)
{
    static const char *const names[] = {"epoll", "poll", "io_uring", "custom"};
    ca_loop *loop = NULL;
    int r = kind == 0   ? ca_selector_loop_new(&loop)
            : kind == 1 ? ca_poll_loop_new(&loop)
            : kind == 2 ? ca_proactor_loop_new(&loop)
                        : t_custom_loop_new(&loop);
    if (kind == 2 && (r == -ENOSYS || r == -EPERM)) return; /* no io_uring here */
    if (!OK(r)) return;
    (void)names;
    struct lstate s = {.loop = loop};

    ca_handle *h = NULL, *c = NULL;
    OK(ca_loop_call_soon(loop, count_cb, &s.soon, NULL));
    if (OK(ca_loop_call_later(loop, 0.001, count_cb, &s.later, &h))) ca_handle_unref(h);
    if (OK(ca_loop_call_at(loop, ca_loop_time(loop) + 10, count_cb, &s.cancelled, &c))) {
        ca_handle_cancel(c);
        ca_handle_unref(c);
    }
    pthread_t t;
    bool thread = OK(-pthread_create(&t, NULL, poster, &s));

    /* The custom loop has no signal handlers (-ENOTSUP). */
    int sig_ok = kind != 3 && OK(ca_loop_add_signal_handler(loop, SIGUSR1, count_cb, &s.sig));
    if (sig_ok) raise(SIGUSR1);

    int pfd[2];
    if (pipe2(pfd, O_CLOEXEC | O_NONBLOCK) == 0) {
        if (write(pfd[1], "x", 1) != 1) fail("pipe write");
        s.wfd = pfd[1];
        OK(ca_loop_add_reader(loop, pfd[0], reader_cb, &s));
        OK(ca_loop_add_writer(loop, pfd[1], writer_cb, &s));
    } else {
        pfd[0] = pfd[1] = -1;
        fail("pipe2: %s", strerror(errno));
    }

    ca_future *fut = NULL;
    if (OK(ca_future_new(loop, &fut))) {
        if (OK(ca_future_add_done_callback(fut, fut_done, &s))) {
            if (OK(ca_loop_call_later(loop, 0.01, set_result_cb, fut, NULL)))
                run_until(loop, &s.all, 5);
            else
                ca_future_set_result(fut, NULL);
            if (!s.all) run_until(loop, &s.all, 1);
            if (!s.all) fail("%s: the future's callback never ran", names[kind]);
        }
        void *res = NULL;
        if (ca_future_done(fut)) ca_future_result(fut, &res);
    }
    if (thread) pthread_join(t, NULL);
    volatile int spin = 0;
    run_until(loop, &spin, 0.02);
    if (pfd[0] >= 0) {
        ca_loop_remove_reader(loop, pfd[0]);
        ca_loop_remove_writer(loop, pfd[1]);
        close(pfd[0]);
        close(pfd[1]);
    }
    if (sig_ok) ca_loop_remove_signal_handler(loop, SIGUSR1);

    sockets(loop);

    OK(ca_loop_close(loop));
    ca_future_unref(fut);
    ca_loop_unref(loop);
}

static ca_future *runner_main(ca_loop *loop, void *arg)
{
    (void)arg;
    ca_future *f = NULL;
    if (ca_future_new(loop, &f) < 0) return NULL; /* ca_run answers -EINVAL: explained */
    ca_future_set_result(f, NULL);
    return f;
}

/* ----- child watchers ------------------------------------------------------------------- */

struct pstate {
    volatile int exited;
    int lost[3];
    size_t bytes;
};

static void p_data(ca_process *p, int fd, const void *b, size_t n, void *arg)
{
    (void)p, (void)fd, (void)b;
    ((struct pstate *)arg)->bytes += n;
}
static void p_lost(ca_process *p, int fd, int err, void *arg)
{
    (void)p, (void)err;
    ((struct pstate *)arg)->lost[fd]++;
}
static void p_exited(ca_process *p, void *arg)
{
    (void)p;
    ((struct pstate *)arg)->exited = 1;
    wake();
}

struct raw {
    ca_child_watcher *w;
    const char *name;
    volatile int started, done;
    bool registered;
    int rc;
    pid_t pid;
};
static void raw_cb(pid_t pid, int rc, void *arg)
{
    struct raw *r = arg;
    if (pid != r->pid) fail("raw child: callback for pid %d, not %d", (int)pid, (int)r->pid);
    r->rc = rc;
    r->done = 1;
    wake();
}

static void raw_start(void *arg)
{
    struct raw *rw = arg;
    rw->started = 1;
    wake();
    if (!OK(ca_child_watcher_enter(rw->w))) return;
    pid_t pid = fork();
    if (pid == 0) _exit(5);
    if (pid < 0) {
        fail("fork: %s", strerror(errno));
    } else {
        rw->pid = pid;
        rw->registered = OK(ca_child_watcher_add_child_handler(rw->w, pid, raw_cb, rw));
        if (!rw->registered) waitpid(pid, NULL, 0); /* not watched: ours to reap */
    }
    OK(ca_child_watcher_exit(rw->w));
}

static int make_watcher(int kind, ca_child_watcher **w)
{
    switch (kind) {
    case 0: return ca_threaded_child_watcher_new(w);
    case 1: return ca_multiloop_child_watcher_new(w);
    case 2: return ca_safe_child_watcher_new(w);
    case 3: return ca_fast_child_watcher_new(w);
    case 4: return ca_pidfd_child_watcher_new(w);
    default:
        if (!ca_uring_child_watcher_new) return -ENOSYS;
        return ca_uring_child_watcher_new(w);
    }
}

/* The process made by spawn must report its exit; a child stuck on a stdin we could not
 * close (no memory) is killed after a while, and must be reported then. */
static void await_exit(ca_loop *loop, ca_process *p, struct pstate *st, const char *what)
{
    if (!run_until(loop, &st->exited, 3)) {
        ca_process_kill(p);
        if (!run_until(loop, &st->exited, 10)) fail("%s: exit of pid %d lost", what,
                                                    (int)ca_process_pid(p));
    }
}

static void one_watcher(int kind, int loop_kind)
{
    static const char *const names[] = {"threaded", "multiloop", "safe", "fast", "pidfd", "uring"};
    ca_policy *pol = NULL;
    if (!OK(ca_default_policy_new(&pol))) return;
    OK(ca_set_event_loop_policy(pol));
    ca_policy_unref(pol);

    ca_child_watcher *w = NULL;
    int r = make_watcher(kind, &w);
    if (kind == 5 && (r == -ENOSYS || r == -ENOTSUP)) return; /* not built or no io_uring */
    if (kind == 4 && r == -ENOSYS) return;                     /* no pidfd */
    if (!OK(r)) return;

    ca_loop *loop = NULL;
    r = loop_kind == 0 ? ca_selector_loop_new(&loop)
        : loop_kind == 1 ? ca_poll_loop_new(&loop)
        : loop_kind == 2 ? ca_proactor_loop_new(&loop)
                         : t_custom_loop_new(&loop);
    if (r == -ENOSYS || r == -EPERM) r = ca_selector_loop_new(&loop);
    if (!OK(r)) {
        ca_child_watcher_close(w);
        ca_child_watcher_unref(w);
        return;
    }
    /* set_child_watcher does not attach; set_event_loop in the main thread does. A failed
     * attach (no memory for Safe's signal handler) leaves the watcher inactive: the spawns
     * then give -ENOTCONN, which is the documented answer. */
    bool have_w = OK(ca_set_child_watcher(w));
    OK(ca_set_event_loop(loop));

    /* 1. Three pipes, input written and stdin closed, output read. */
    const char *const argv1[] = {"/bin/sh", "-c", "cat; echo err >&2; exit 3", NULL};
    ca_subprocess_options o1 = {.argv = argv1, .stdin_mode = CA_PIPE, .stdout_mode = CA_PIPE,
                                .stderr_mode = CA_PIPE};
    ca_subprocess_protocol proto = {p_data, p_lost, p_exited};
    struct pstate s1 = {0};
    ca_process *p1 = NULL;
    if (OKX(ca_loop_subprocess_exec(loop, &o1, &proto, &s1, &p1), -ENOTCONN, 0)) {
        OK(ca_process_write(p1, "input\n", 6));
        OK(ca_process_close_stdin(p1));
        await_exit(loop, p1, &s1, names[kind]);
        int rc = 0;
        if (s1.exited && OK(ca_process_returncode(p1, &rc)) && rc != 3 && rc != -SIGKILL)
            fail("%s: returncode %d, want 3", names[kind], rc);
        ca_future *wf = NULL;
        if (OKX(ca_process_wait(p1, &wf), 0, 0) && !wait_future(loop, wf, 5))
            fail("%s: wait future pending after the exit", names[kind]);
        ca_future_unref(wf);
    }

    /* 2. Inherited stdio and communicate(). */
    const char *const argv2[] = {"/bin/true", NULL};
    ca_subprocess_options o2 = {.argv = argv2, .stdin_mode = CA_DEVNULL, .stdout_mode = CA_PIPE};
    struct pstate s2 = {0};
    ca_process *p2 = NULL;
    if (OKX(ca_loop_subprocess_exec(loop, &o2, &proto, &s2, &p2), -ENOTCONN, 0)) {
        ca_future *cf = NULL;
        if (OK(ca_process_communicate(p2, NULL, 0, &cf))) wait_future(loop, cf, 5);
        await_exit(loop, p2, &s2, names[kind]);
        ca_future_unref(cf);
    }

    /* 3. A raw child registered with add_child_handler, from a callback on the running loop,
     * so that the delivery loop is this one whatever became of set_event_loop above. */
    ca_child_watcher *cur = NULL;
    if (OKX(ca_get_child_watcher(&cur), 0, 0) && ca_child_watcher_is_active(cur)) {
        struct raw rw = {.w = cur, .name = names[kind]};
        if (OK(ca_loop_call_soon(loop, raw_start, &rw, NULL))) {
            if (!run_until(loop, &rw.started, 5)) fail("%s: call_soon never ran", names[kind]);
            if (rw.registered && !run_until(loop, &rw.done, 10)) {
                fail("%s: raw child %d never reported", names[kind], (int)rw.pid);
                if (ca_child_watcher_remove_child_handler(cur, rw.pid) == 1)
                    waitpid(rw.pid, NULL, 0);
            } else if (rw.registered && rw.rc != 5) {
                fail("%s: raw child returncode %d, want 5", names[kind], rw.rc);
            }
        }
    }

    ca_process_unref(p1);
    ca_process_unref(p2);
    OK(ca_set_event_loop(NULL));
    OK(ca_loop_close(loop));
    ca_loop_unref(loop);
    if (have_w) OK(ca_set_child_watcher(NULL)); /* closes w */
    ca_child_watcher_close(w);
    ca_child_watcher_unref(w);
}

/* ----- the end -------------------------------------------------------------------------- */

static int count_dir(const char *path)
{
    DIR *d = opendir(path);
    if (!d) return -1;
    int n = 0;
    struct dirent *e;
    while ((e = readdir(d)))
        if (e->d_name[0] != '.') n++;
    closedir(d);
    return n - 1; /* the DIR's own fd, for /proc/self/fd; a harmless -1 for task */
}

int main(void)
{
    ca_set_log_handler(log_fn, NULL);
    int fds0 = count_dir("/proc/self/fd");

    bool verbose = getenv("CA_FAULT_VERBOSE") != NULL;
    if (getenv("CA_FAULT_SELFTEST_LEAK")) {
        /* Checks the checker: this block must be reported (and by LeakSanitizer under ASan). */
        void *volatile lost = malloc(24);
        lost = NULL;
        (void)lost;
    }
    for (int k = 0; k < 4; k++) {
        one_loop(k);
        if (verbose) fprintf(stderr, "after loop %d: %ld calls, %.3f s\n", k, aw_calls(), now());
    }
    OKX(ca_run(runner_main, NULL, NULL), -EINVAL, 0);
    /* Safe and Fast need signal handlers, which the custom loop lacks. */
    static const int watcher_loop[6] = {3, 0, 1, 2, 3, 2};
    for (int k = 0; k < 6; k++) {
        one_watcher(k, watcher_loop[k]);
        if (verbose) fprintf(stderr, "after watcher %d: %ld calls, %.3f s\n", k, aw_calls(), now());
    }

    /* Threaded's waiting threads are detached and end just after their child; give them a
     * moment before counting. */
    double deadline = now() + 5;
    while (count_dir("/proc/self/task") + 1 > 1 && now() < deadline) usleep(2000);
    int threads = count_dir("/proc/self/task") + 1;
    if (threads != 1) fail("%d threads left", threads);

    /* The leak check: replace the process policy (which frees the previous one and whatever it
     * held); every block allocated before that must be gone or still reachable (kept for the
     * process's lifetime). Retried, since it may be the call that fails. */
    long mark = aw_calls() + 1;
    while (ca_set_event_loop_policy(NULL) == -ENOMEM) {
    }
    long first = 0, leaked = aw_leaked_before(mark, &first);
    if (leaked) fail("%ld blocks leaked (the first made by allocation call %ld)", leaked, first);

    siginfo_t si = {0};
    if (waitid(P_ALL, 0, &si, WEXITED | WNOHANG | WNOWAIT) == 0)
        fail("a child is left (pid %d)", (int)si.si_pid);
    int fds = count_dir("/proc/self/fd");
    if (fds != fds0) fail("%d fds at the start, %d at the end", fds0, fds);

    printf("workload: %ld allocation calls, injected %s, %d failures\n", aw_calls(),
           aw_injected() ? "yes" : "no", failures);
    fflush(stdout);
    if (failures) return 1;
    return aw_injected() ? 0 : 2;
}
