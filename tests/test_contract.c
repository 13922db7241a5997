/*
 * Contract tests: /work/shared/API.md walked statement by statement, written only against the
 * public header (plus one internal name to tell the watcher kind). Each test names the
 * statement it checks; a failing test here is a disagreement between the code and API.md.
 */
#include "harness.h"

#include <fcntl.h>
#include <limits.h>
#include <math.h>
#include <netinet/in.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <spawn.h>
#include <stdatomic.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>

extern char **environ;

/* Internal (in the static library the tests link): the watcher's kind name. */
const char *ca__child_watcher_kind(const ca_child_watcher *w);

#define SENT_LOOP ((ca_loop *)(uintptr_t)0x5a5a)
#define SENT_HANDLE ((ca_handle *)(uintptr_t)0x5a5b)
#define SENT_FUT ((ca_future *)(uintptr_t)0x5a5c)
#define SENT_POL ((ca_policy *)(uintptr_t)0x5a5d)
#define SENT_W ((ca_child_watcher *)(uintptr_t)0x5a5e)
#define SENT_PROC ((ca_process *)(uintptr_t)0x5a5f)
#define SENT_PTR ((void *)(uintptr_t)0x5a60)

/* ----- helpers ------------------------------------------------------------------------ */

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void sleep_s(double s)
{
    struct timespec ts = {(time_t)s, (long)((s - (double)(time_t)s) * 1e9)};
    while (nanosleep(&ts, &ts) < 0 && errno == EINTR) {
    }
}

static void noop(void *arg) {}
static void count_cb(void *arg) { (*(int *)arg)++; }
static void stop_cb(void *arg) { ca_loop_stop(arg); }
static void fut_noop(ca_future *f, void *arg) {}

static ca_loop *new_epoll(void)
{
    ca_loop *l = NULL;
    CHECK_OK(ca_selector_loop_new(&l));
    return l;
}

static void loop_done(ca_loop *l)
{
    CHECK_OK(ca_loop_close(l));
    ca_loop_unref(l);
}

/* Runs one iteration of loop (a stop requested before run_forever runs exactly one). */
static void run_once(ca_loop *loop)
{
    ca_loop_stop(loop);
    CHECK_OK(ca_loop_run_forever(loop));
}

/* ----- a spy custom loop: counts op calls ----------------------------------------------- */

struct spy {
    int calls;     /* any op but run_forever/time/destroy */
    int time_calls;
    int destroyed;
    int stops, closes;
    double t;
};

static int spy_run(ca_loop *self) { return 0; }
#define SPY(self) ((struct spy *)ca_loop_data(self))
static void spy_stop(ca_loop *self) { SPY(self)->stops++; }
static int spy_close(ca_loop *self) { SPY(self)->closes++; return 0; }
static double spy_time(ca_loop *self)
{
    SPY(self)->time_calls++;
    SPY(self)->t += 1.0;
    return SPY(self)->t;
}
static int spy_sched(ca_loop *self, ca_handle *h) { SPY(self)->calls++; return 0; }
static int spy_at(ca_loop *self, double when, ca_handle *h) { SPY(self)->calls++; return 0; }
static int spy_fd(ca_loop *self, int fd, ca_callback_fn fn, void *arg) { SPY(self)->calls++; return 0; }
static int spy_rm(ca_loop *self, int fd) { SPY(self)->calls++; return 0; }
static void spy_destroy(ca_loop *self) { SPY(self)->destroyed++; }
static int spy_recv(ca_loop *self, int fd, void *buf, size_t n, ca_future **out)
{
    SPY(self)->calls++;
    return -ENOSYS;
}
static int spy_send(ca_loop *self, int fd, const void *buf, size_t n, ca_future **out)
{
    SPY(self)->calls++;
    return -ENOSYS;
}
static int spy_accept(ca_loop *self, int fd, ca_future **out)
{
    SPY(self)->calls++;
    return -ENOSYS;
}
static int spy_connect(ca_loop *self, int fd, const struct sockaddr *a, socklen_t l, ca_future **out)
{
    SPY(self)->calls++;
    return -ENOSYS;
}

static const ca_loop_ops spy_ops = {
    .run_forever = spy_run,
    .stop = spy_stop,
    .close = spy_close,
    .time = spy_time,
    .call_soon = spy_sched,
    .call_soon_threadsafe = spy_sched,
    .call_at = spy_at,
    .add_reader = spy_fd,
    .remove_reader = spy_rm,
    .add_writer = spy_fd,
    .remove_writer = spy_rm,
    .add_signal_handler = spy_fd,
    .remove_signal_handler = spy_rm,
    .sock_recv = spy_recv,
    .sock_sendall = spy_send,
    .sock_accept = spy_accept,
    .sock_connect = spy_connect,
    .destroy = spy_destroy,
};

static const ca_loop_ops bare_ops = {.run_forever = spy_run, .destroy = spy_destroy};

/* ===== Conventions ======================================================================== */

/* "const char *ca_strerror(int err) describes any code." */
TEST(conv_strerror_any_code)
{
    int codes[] = {0, -EINVAL, -EBADF, -ECHILD, -ENOENT, -ENOTCONN, -ENOTSUP, -EBUSY, -EAGAIN,
                   -ECANCELED, -ENOMEM, -ENOSYS, -EPERM, -ENOSPC, EINVAL, -99999, 99999, INT_MIN};
    for (size_t i = 0; i < sizeof codes / sizeof codes[0]; i++) {
        const char *s = ca_strerror(codes[i]);
        CHECK(s != NULL);
        CHECK(strlen(s) > 0);
    }
    CHECK(strcmp(ca_strerror(-EINVAL), ca_strerror(-EBADF)) != 0);
}

/* "ref returns its argument and unref accepts NULL and returns NULL, for loop, handle, future,
 * policy, child_watcher, process." */
TEST(conv_ref_unref_all_six_types)
{
    CHECK(ca_loop_unref(NULL) == NULL);
    CHECK(ca_handle_unref(NULL) == NULL);
    CHECK(ca_future_unref(NULL) == NULL);
    CHECK(ca_policy_unref(NULL) == NULL);
    CHECK(ca_child_watcher_unref(NULL) == NULL);
    CHECK(ca_process_unref(NULL) == NULL);
    CHECK(ca_loop_ref(NULL) == NULL);
    CHECK(ca_handle_ref(NULL) == NULL);
    CHECK(ca_future_ref(NULL) == NULL);
    CHECK(ca_policy_ref(NULL) == NULL);
    CHECK(ca_child_watcher_ref(NULL) == NULL);
    CHECK(ca_process_ref(NULL) == NULL);

    ca_loop *l = new_epoll();
    CHECK(ca_loop_ref(l) == l);
    CHECK(ca_loop_unref(l) == NULL);
    ca_handle *h = NULL;
    CHECK_OK(ca_loop_call_soon(l, noop, NULL, &h));
    CHECK(ca_handle_ref(h) == h);
    CHECK(ca_handle_unref(h) == NULL);
    CHECK(ca_handle_unref(h) == NULL);
    ca_future *f = NULL;
    CHECK_OK(ca_future_new(l, &f));
    CHECK(ca_future_ref(f) == f);
    CHECK(ca_future_unref(f) == NULL);
    CHECK(ca_future_unref(f) == NULL);
    ca_policy *p = NULL;
    CHECK_OK(ca_default_policy_new(&p));
    CHECK(ca_policy_ref(p) == p);
    CHECK(ca_policy_unref(p) == NULL);
    CHECK(ca_policy_unref(p) == NULL);
    ca_child_watcher *w = NULL;
    CHECK_OK(ca_threaded_child_watcher_new(&w));
    CHECK(ca_child_watcher_ref(w) == w);
    CHECK(ca_child_watcher_unref(w) == NULL);
    CHECK_OK(ca_child_watcher_close(w));
    CHECK(ca_child_watcher_unref(w) == NULL);
    loop_done(l);
}

/* "A _new hands the caller one reference. An out parameter ... is never written on failure."
 * Constructors with a NULL out give -EINVAL. */
TEST(conv_constructors_null_out_einval)
{
    CHECK_ERR(ca_selector_loop_new(NULL), -EINVAL);
    CHECK_ERR(ca_poll_loop_new(NULL), -EINVAL);
    int r = ca_proactor_loop_new(NULL);
    CHECK(r == -EINVAL);
    CHECK_ERR(ca_loop_new_custom(&bare_ops, NULL, NULL), -EINVAL);
    CHECK_ERR(ca_default_policy_new(NULL), -EINVAL);
    CHECK_ERR(ca_selector_policy_new(NULL), -EINVAL);
    CHECK_ERR(ca_poll_policy_new(NULL), -EINVAL);
    CHECK_ERR(ca_proactor_policy_new(NULL), -EINVAL);
    CHECK_ERR(ca_threaded_child_watcher_new(NULL), -EINVAL);
    CHECK_ERR(ca_multiloop_child_watcher_new(NULL), -EINVAL);
    CHECK_ERR(ca_safe_child_watcher_new(NULL), -EINVAL);
    CHECK_ERR(ca_fast_child_watcher_new(NULL), -EINVAL);
    r = ca_pidfd_child_watcher_new(NULL);
    CHECK(r == -EINVAL);
    CHECK_ERR(ca_get_event_loop(NULL), -EINVAL);
    CHECK_ERR(ca_new_event_loop(NULL), -EINVAL);
    CHECK_ERR(ca_get_child_watcher(NULL), -EINVAL);
    ca_loop *l = new_epoll();
    CHECK_ERR(ca_future_new(l, NULL), -EINVAL);
    loop_done(l);
}

/* Bad arguments give -EINVAL and never crash: NULL loop for every loop function. */
TEST(conv_null_loop_einval_everywhere)
{
    ca_handle *h = SENT_HANDLE;
    ca_future *f = SENT_FUT;
    char buf[4];
    struct sockaddr_in sa = {.sin_family = AF_INET};
    CHECK_ERR(ca_loop_run_forever(NULL), -EINVAL);
    CHECK_ERR(ca_loop_run_until_complete(NULL, NULL), -EINVAL);
    ca_loop_stop(NULL);
    CHECK_ERR(ca_loop_close(NULL), -EINVAL);
    CHECK(!ca_loop_is_running(NULL));
    CHECK(!ca_loop_is_closed(NULL));
    CHECK_ERR(ca_loop_call_soon(NULL, noop, NULL, &h), -EINVAL);
    CHECK_ERR(ca_loop_call_soon_threadsafe(NULL, noop, NULL), -EINVAL);
    CHECK_ERR(ca_loop_call_later(NULL, 1.0, noop, NULL, &h), -EINVAL);
    CHECK_ERR(ca_loop_call_at(NULL, 1.0, noop, NULL, &h), -EINVAL);
    CHECK(h == SENT_HANDLE);
    ca_handle_cancel(NULL);
    CHECK(!ca_handle_cancelled(NULL));
    ca_handle_run(NULL);
    CHECK_ERR(ca_loop_add_reader(NULL, 0, noop, NULL), -EINVAL);
    CHECK_ERR(ca_loop_remove_reader(NULL, 0), -EINVAL);
    CHECK_ERR(ca_loop_add_writer(NULL, 1, noop, NULL), -EINVAL);
    CHECK_ERR(ca_loop_remove_writer(NULL, 1), -EINVAL);
    CHECK_ERR(ca_loop_add_signal_handler(NULL, SIGUSR1, noop, NULL), -EINVAL);
    CHECK_ERR(ca_loop_remove_signal_handler(NULL, SIGUSR1), -EINVAL);
    CHECK_ERR(ca_loop_enter_running(NULL), -EINVAL);
    CHECK_ERR(ca_loop_exit_running(NULL), -EINVAL);
    CHECK(ca_loop_data(NULL) == NULL);
    CHECK_ERR(ca_loop_sock_recv(NULL, 0, buf, 4, &f), -EINVAL);
    CHECK_ERR(ca_loop_sock_sendall(NULL, 0, buf, 4, &f), -EINVAL);
    CHECK_ERR(ca_loop_sock_accept(NULL, 0, &f), -EINVAL);
    CHECK_ERR(ca_loop_sock_connect(NULL, 0, (struct sockaddr *)&sa, sizeof sa, &f), -EINVAL);
    CHECK_ERR(ca_future_new(NULL, &f), -EINVAL);
    CHECK(f == SENT_FUT);
    CHECK(isnan(ca_loop_time(NULL)));
}

/* Bad arguments on a live loop: NULL fn, negative fd, unknown signal, NULL future. */
LOOP_TEST(conv_bad_args_einval_live_loop)
{
    ca_handle *h = SENT_HANDLE;
    CHECK_ERR(ca_loop_call_soon(loop, NULL, NULL, &h), -EINVAL);
    CHECK_ERR(ca_loop_call_soon_threadsafe(loop, NULL, NULL), -EINVAL);
    CHECK_ERR(ca_loop_call_later(loop, 0.1, NULL, NULL, &h), -EINVAL);
    CHECK_ERR(ca_loop_call_at(loop, 0.1, NULL, NULL, &h), -EINVAL);
    CHECK(h == SENT_HANDLE);
    CHECK_ERR(ca_loop_add_reader(loop, -1, noop, NULL), -EINVAL);
    CHECK_ERR(ca_loop_add_writer(loop, -1, noop, NULL), -EINVAL);
    CHECK_ERR(ca_loop_remove_reader(loop, -1), -EINVAL);
    CHECK_ERR(ca_loop_remove_writer(loop, -1), -EINVAL);
    int p[2];
    CHECK_EQ(pipe2(p, O_CLOEXEC | O_NONBLOCK), 0);
    CHECK_ERR(ca_loop_add_reader(loop, p[0], NULL, NULL), -EINVAL);
    CHECK_ERR(ca_loop_add_writer(loop, p[1], NULL, NULL), -EINVAL);
    close(p[0]);
    close(p[1]);
    /* Signals: only the custom loop of the tests lacks add_signal_handler (-ENOTSUP after the
     * argument checks). */
    int bad[] = {0, -1, 65, 1000, SIGKILL, SIGSTOP};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        CHECK_ERR(ca_loop_add_signal_handler(loop, bad[i], noop, NULL), -EINVAL);
        CHECK_ERR(ca_loop_remove_signal_handler(loop, bad[i]), -EINVAL);
    }
    CHECK_ERR(ca_loop_add_signal_handler(loop, SIGUSR1, NULL, NULL), -EINVAL);
    CHECK_ERR(ca_loop_run_until_complete(loop, NULL), -EINVAL);
    CHECK_ERR(ca_loop_call_later(loop, NAN, noop, NULL, &h), -EINVAL);
    CHECK_ERR(ca_loop_call_at(loop, NAN, noop, NULL, &h), -EINVAL);
    CHECK(h == SENT_HANDLE);
}

/* "A closed loop gives -EBADF, except remove_reader/remove_writer/remove_signal_handler, which
 * return 0 there." */
LOOP_TEST(conv_closed_loop_ebadf)
{
    int p[2];
    CHECK_EQ(pipe2(p, O_CLOEXEC | O_NONBLOCK), 0);
    CHECK_OK(ca_loop_add_reader(loop, p[0], noop, NULL));
    ca_future *pending = NULL;
    CHECK_OK(ca_future_new(loop, &pending));
    CHECK_OK(ca_loop_close(loop));
    CHECK(ca_loop_is_closed(loop));
    CHECK_OK(ca_loop_close(loop)); /* idempotent */
    ca_handle *h = SENT_HANDLE;
    ca_future *f = SENT_FUT;
    CHECK_ERR(ca_loop_run_forever(loop), -EBADF);
    CHECK_ERR(ca_loop_run_until_complete(loop, pending), -EBADF);
    CHECK_ERR(ca_loop_call_soon(loop, noop, NULL, &h), -EBADF);
    CHECK_ERR(ca_loop_call_soon(loop, noop, NULL, NULL), -EBADF);
    CHECK_ERR(ca_loop_call_soon_threadsafe(loop, noop, NULL), -EBADF);
    CHECK_ERR(ca_loop_call_later(loop, 0.0, noop, NULL, &h), -EBADF);
    CHECK_ERR(ca_loop_call_at(loop, 0.0, noop, NULL, &h), -EBADF);
    CHECK(h == SENT_HANDLE);
    CHECK_ERR(ca_loop_add_reader(loop, p[0], noop, NULL), -EBADF);
    CHECK_ERR(ca_loop_add_writer(loop, p[1], noop, NULL), -EBADF);
    CHECK_ERR(ca_loop_remove_reader(loop, p[0]), 0);
    CHECK_ERR(ca_loop_remove_writer(loop, p[1]), 0);
    CHECK_ERR(ca_loop_add_signal_handler(loop, SIGUSR1, noop, NULL), -EBADF);
    CHECK_ERR(ca_loop_remove_signal_handler(loop, SIGUSR1), 0);
    CHECK_ERR(ca_future_new(loop, &f), -EBADF);
    CHECK(f == SENT_FUT);
    CHECK_ERR(ca_loop_enter_running(loop), -EBADF);
    char buf[4];
    int sv[2];
    CHECK_EQ(socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0, sv), 0);
    CHECK_ERR(ca_loop_sock_recv(loop, sv[0], buf, sizeof buf, &f), -EBADF);
    CHECK_ERR(ca_loop_sock_sendall(loop, sv[0], buf, sizeof buf, &f), -EBADF);
    CHECK_ERR(ca_loop_sock_accept(loop, sv[0], &f), -EBADF);
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons(9)};
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    CHECK_ERR(ca_loop_sock_connect(loop, sv[0], (struct sockaddr *)&sa, sizeof sa, &f), -EBADF);
    CHECK(f == SENT_FUT);
    const char *argv[] = {"/bin/true", NULL};
    ca_subprocess_options o = {.argv = argv};
    ca_process *pr = SENT_PROC;
    CHECK_ERR(ca_loop_subprocess_exec(loop, &o, NULL, NULL, &pr), -EBADF);
    CHECK(pr == SENT_PROC);
    CHECK_ERR(ca_future_add_done_callback(pending, fut_noop, NULL), -EBADF);
    ca_future_unref(pending);
    close(sv[0]);
    close(sv[1]);
    close(p[0]);
    close(p[1]);
}

/* "When several apply, the order is: bad argument, then fork, then closed." Closed + bad. */
LOOP_TEST(conv_precedence_bad_arg_before_closed)
{
    CHECK_OK(ca_loop_close(loop));
    ca_handle *h = SENT_HANDLE;
    CHECK_ERR(ca_loop_call_soon(loop, NULL, NULL, &h), -EINVAL);
    CHECK_ERR(ca_loop_call_soon_threadsafe(loop, NULL, NULL), -EINVAL);
    CHECK_ERR(ca_loop_call_later(loop, 1.0, NULL, NULL, &h), -EINVAL);
    CHECK_ERR(ca_loop_call_at(loop, NAN, noop, NULL, &h), -EINVAL);
    CHECK_ERR(ca_loop_add_reader(loop, -1, noop, NULL), -EINVAL);
    CHECK_ERR(ca_loop_add_writer(loop, -1, noop, NULL), -EINVAL);
    CHECK_ERR(ca_loop_remove_reader(loop, -1), -EINVAL);
    CHECK_ERR(ca_loop_remove_writer(loop, -1), -EINVAL);
    CHECK_ERR(ca_loop_add_signal_handler(loop, 0, noop, NULL), -EINVAL);
    CHECK_ERR(ca_loop_add_signal_handler(loop, SIGKILL, noop, NULL), -EINVAL);
    CHECK_ERR(ca_loop_remove_signal_handler(loop, 0), -EINVAL);
    CHECK_ERR(ca_loop_remove_signal_handler(loop, 1000), -EINVAL);
    CHECK_ERR(ca_loop_run_until_complete(loop, NULL), -EINVAL);
    CHECK_ERR(ca_future_new(loop, NULL), -EINVAL);
    char buf[4];
    ca_future *f = SENT_FUT;
    CHECK_ERR(ca_loop_sock_recv(loop, -1, buf, 4, &f), -EINVAL);
    CHECK_ERR(ca_loop_sock_recv(loop, 0, buf, 4, NULL), -EINVAL);
    CHECK_ERR(ca_loop_sock_sendall(loop, -1, buf, 4, &f), -EINVAL);
    CHECK_ERR(ca_loop_sock_accept(loop, -1, &f), -EINVAL);
    CHECK_ERR(ca_loop_sock_connect(loop, 0, NULL, 0, &f), -EINVAL);
    CHECK(f == SENT_FUT);
    CHECK(h == SENT_HANDLE);
    ca_process *pr = SENT_PROC;
    CHECK_ERR(ca_loop_subprocess_exec(loop, NULL, NULL, NULL, &pr), -EINVAL);
    CHECK(pr == SENT_PROC);
}

/* "In a child made by fork(), every call on a loop made by the parent returns -ECHILD, except
 * close and unref"; "bad argument, then fork, then closed". */
static int fork_child_checks(ca_loop *loop, bool closed)
{
    int bad = 0, k = 0;
    ca_handle *h = SENT_HANDLE;
    ca_future *f = SENT_FUT;
    char buf[4];
    int p[2];
    if (pipe2(p, O_CLOEXEC) < 0) return 100;
#define FC(expr, want) do { k++; if ((expr) != (want)) bad = k; } while (0)
    FC(ca_loop_call_soon(loop, noop, NULL, &h), -ECHILD);
    FC(ca_loop_call_soon_threadsafe(loop, noop, NULL), -ECHILD);
    FC(ca_loop_call_later(loop, 1, noop, NULL, &h), -ECHILD);
    FC(ca_loop_call_at(loop, 1, noop, NULL, &h), -ECHILD);
    FC(ca_loop_run_forever(loop), -ECHILD);
    FC(ca_loop_add_reader(loop, p[0], noop, NULL), -ECHILD);
    FC(ca_loop_remove_reader(loop, p[0]), -ECHILD);
    FC(ca_loop_add_writer(loop, p[1], noop, NULL), -ECHILD);
    FC(ca_loop_remove_writer(loop, p[1]), -ECHILD); /* 9 */
    FC(ca_loop_add_signal_handler(loop, SIGUSR1, noop, NULL), -ECHILD);
    FC(ca_loop_remove_signal_handler(loop, SIGUSR1), -ECHILD);
    FC(ca_future_new(loop, &f), -ECHILD);
    FC(ca_loop_enter_running(loop), -ECHILD);
    FC(ca_loop_sock_recv(loop, p[0], buf, 4, &f), -ECHILD);
    FC(ca_loop_sock_sendall(loop, p[1], buf, 4, &f), -ECHILD); /* 15 */
    FC(ca_loop_sock_accept(loop, p[0], &f), -ECHILD);
    /* bad argument first */
    FC(ca_loop_call_soon(loop, NULL, NULL, &h), -EINVAL);
    FC(ca_loop_add_reader(loop, -1, noop, NULL), -EINVAL);
    FC(ca_loop_remove_reader(loop, -1), -EINVAL);
    FC(ca_loop_add_signal_handler(loop, 0, noop, NULL), -EINVAL); /* 20 */
    FC(ca_loop_remove_signal_handler(loop, 0), -EINVAL);
    FC(h == SENT_HANDLE && f == SENT_FUT, true);
    FC(ca_loop_is_running(loop), false);
    FC(ca_get_running_loop() == NULL, true);
    const char *argv[] = {"/bin/true", NULL};
    ca_subprocess_options o = {.argv = argv};
    ca_process *pr = SENT_PROC;
    FC(ca_loop_subprocess_exec(loop, &o, NULL, NULL, &pr), -ECHILD); /* 25 */
    FC(pr == SENT_PROC, true);
    FC(ca_loop_close(loop), 0);
#undef FC
    (void)closed;
    close(p[0]);
    close(p[1]);
    return bad;
}

LOOP_TEST(conv_fork_child_echild)
{
    pid_t pid = fork();
    CHECK(pid >= 0);
    if (pid == 0) {
        int bad = fork_child_checks(loop, false);
        t_child_exit(bad);
    }
    int st;
    CHECK_EQ(waitpid(pid, &st, 0), pid);
    CHECK(WIFEXITED(st));
    CHECK_EQ(WEXITSTATUS(st), 0);
    /* The parent's loop still works. */
    int n = 0;
    CHECK_OK(ca_loop_call_soon(loop, count_cb, &n, NULL));
    run_once(loop);
    CHECK_EQ(n, 1);
}

/* Fork comes before closed: a closed parent loop in the child gives -ECHILD. */
LOOP_TEST(conv_fork_before_closed)
{
    CHECK_OK(ca_loop_close(loop));
    pid_t pid = fork();
    CHECK(pid >= 0);
    if (pid == 0) {
        int bad = 0;
        if (ca_loop_call_soon(loop, noop, NULL, NULL) != -ECHILD) bad |= 1;
        if (ca_loop_remove_reader(loop, 0) != -ECHILD) bad |= 2;
        if (ca_loop_remove_signal_handler(loop, SIGUSR1) != -ECHILD) bad |= 4;
        if (ca_loop_run_forever(loop) != -ECHILD) bad |= 8;
        if (ca_loop_add_reader(loop, -1, noop, NULL) != -EINVAL) bad |= 16;
        t_child_exit(bad);
    }
    int st;
    CHECK_EQ(waitpid(pid, &st, 0), pid);
    CHECK(WIFEXITED(st));
    CHECK_EQ(WEXITSTATUS(st), 0);
}

/* "Every ca_handle **out may be NULL (the caller declines the handle; the loop keeps what it
 * needs alive)." */
LOOP_TEST(conv_handle_out_may_be_null)
{
    int a = 0, b = 0, c = 0;
    CHECK_OK(ca_loop_call_soon(loop, count_cb, &a, NULL));
    CHECK_OK(ca_loop_call_later(loop, 0.001, count_cb, &b, NULL));
    CHECK_OK(ca_loop_call_at(loop, ca_loop_time(loop) + 0.001, count_cb, &c, NULL));
    CHECK(t_run_until(loop, t_flag_set, &c, 2.0));
    CHECK(t_run_until(loop, t_flag_set, &b, 2.0));
    CHECK_EQ(a, 1);
    CHECK_EQ(b, 1);
    CHECK_EQ(c, 1);
}

/* ===== Event loop ========================================================================= */

/* "callbacks run FIFO" */
static int order_buf[64], order_n;
static void order_cb(void *arg) { order_buf[order_n++] = (int)(intptr_t)arg; }

LOOP_TEST(loop_call_soon_fifo)
{
    order_n = 0;
    for (int i = 0; i < 20; i++) CHECK_OK(ca_loop_call_soon(loop, order_cb, (void *)(intptr_t)i, NULL));
    run_once(loop);
    CHECK_EQ(order_n, 20);
    for (int i = 0; i < 20; i++) CHECK_EQ(order_buf[i], i);
}

/* "timers by time, then FIFO among equal times" */
LOOP_TEST(loop_timers_by_time_then_fifo)
{
    order_n = 0;
    double t0 = ca_loop_time(loop);
    CHECK_OK(ca_loop_call_at(loop, t0 + 0.03, order_cb, (void *)3, NULL));
    CHECK_OK(ca_loop_call_at(loop, t0 + 0.01, order_cb, (void *)1, NULL));
    for (int i = 10; i < 20; i++)
        CHECK_OK(ca_loop_call_at(loop, t0 + 0.02, order_cb, (void *)(intptr_t)i, NULL));
    CHECK_OK(ca_loop_call_later(loop, 0.005, order_cb, (void *)0, NULL));
    CHECK_OK(ca_loop_call_at(loop, t0 + 0.02, order_cb, (void *)20, NULL));
    CHECK_OK(ca_loop_call_at(loop, t0 + 0.05, stop_cb, loop, NULL));
    CHECK_OK(ca_loop_run_forever(loop));
    CHECK_EQ(order_n, 14);
    CHECK_EQ(order_buf[0], 0);
    CHECK_EQ(order_buf[1], 1);
    for (int i = 0; i < 11; i++) CHECK_EQ(order_buf[2 + i], 10 + i);
    CHECK_EQ(order_buf[13], 3);
}

/* Equal times in the past (already due) still FIFO; call_later with a negative delay counts
 * as 0. */
LOOP_TEST(loop_timers_equal_due_fifo)
{
    order_n = 0;
    double t = ca_loop_time(loop) - 1.0;
    for (int i = 0; i < 16; i++) CHECK_OK(ca_loop_call_at(loop, t, order_cb, (void *)(intptr_t)i, NULL));
    CHECK_OK(ca_loop_call_later(loop, -5.0, order_cb, (void *)99, NULL));
    t_run_for(loop, 0.01);
    CHECK_EQ(order_n, 17);
    for (int i = 0; i < 16; i++) CHECK_EQ(order_buf[i], i);
    CHECK_EQ(order_buf[16], 99);
}

/* "a callback scheduled from a callback runs on the next iteration" */
struct resched {
    ca_loop *loop;
    int inner;
};
static void inner_cb(void *arg) { ((struct resched *)arg)->inner++; }
static void outer_cb(void *arg)
{
    struct resched *r = arg;
    CHECK_OK(ca_loop_call_soon(r->loop, inner_cb, r, NULL));
}

LOOP_TEST(loop_call_soon_from_callback_next_iteration)
{
    struct resched r = {loop, 0};
    CHECK_OK(ca_loop_call_soon(loop, outer_cb, &r, NULL));
    run_once(loop);
    CHECK_EQ(r.inner, 0);
    run_once(loop);
    CHECK_EQ(r.inner, 1);
}

/* A due timer scheduled (with delay 0) from a callback also waits for the next iteration. */
static void outer_later_cb(void *arg)
{
    struct resched *r = arg;
    CHECK_OK(ca_loop_call_later(r->loop, 0, inner_cb, r, NULL));
}

LOOP_TEST(loop_call_later_zero_from_callback_not_same_iteration)
{
    struct resched r = {loop, 0};
    CHECK_OK(ca_loop_call_soon(loop, outer_later_cb, &r, NULL));
    run_once(loop);
    CHECK_EQ(r.inner, 0);
    CHECK(t_run_until(loop, t_flag_set, &r.inner, 1.0));
}

/* "ca_loop_time reads the monotonic clock at each call." */
LOOP_TEST(loop_time_reads_clock_each_call)
{
    double a = ca_loop_time(loop);
    sleep_s(0.02);
    double b = ca_loop_time(loop);
    CHECK(b - a >= 0.019);
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    double m = ts.tv_sec + ts.tv_nsec / 1e9;
    double c = ca_loop_time(loop);
    CHECK(fabs(c - m) < 0.01);
    /* Inside a callback too, not a cached iteration time. */
}

static void time_in_cb(void *arg)
{
    double *d = arg;
    ca_loop *l = ca_get_running_loop();
    double a = ca_loop_time(l);
    sleep_s(0.02);
    d[0] = ca_loop_time(l) - a;
}

LOOP_TEST(loop_time_reads_clock_inside_callback)
{
    double d[1] = {0};
    CHECK_OK(ca_loop_call_soon(loop, time_in_cb, d, NULL));
    run_once(loop);
    CHECK(d[0] >= 0.019);
}

TEST(loop_time_custom_op_called_each_call)
{
    struct spy s = {0};
    ca_loop *l = NULL;
    CHECK_OK(ca_loop_new_custom(&spy_ops, &s, &l));
    double a = ca_loop_time(l), b = ca_loop_time(l);
    CHECK(b > a);
    CHECK_EQ(s.time_calls, 2);
    ca_loop *l2 = NULL;
    struct spy s2 = {0};
    CHECK_OK(ca_loop_new_custom(&bare_ops, &s2, &l2));
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    double m = ts.tv_sec + ts.tv_nsec / 1e9;
    CHECK(fabs(ca_loop_time(l2) - m) < 0.01); /* NULL time: CLOCK_MONOTONIC */
    loop_done(l);
    loop_done(l2);
}

/* run_forever -EBUSY if already running; close -EBUSY while running; is_running. */
struct busy {
    ca_loop *loop;
    int run_r, close_r, rucr;
    bool running, closed;
    ca_loop *running_loop;
};
static void busy_cb(void *arg)
{
    struct busy *b = arg;
    b->run_r = ca_loop_run_forever(b->loop);
    b->close_r = ca_loop_close(b->loop);
    ca_future *f = NULL;
    CHECK_OK(ca_future_new(b->loop, &f));
    b->rucr = ca_loop_run_until_complete(b->loop, f);
    ca_future_unref(f);
    b->running = ca_loop_is_running(b->loop);
    b->closed = ca_loop_is_closed(b->loop);
    b->running_loop = ca_get_running_loop();
    ca_loop_stop(b->loop);
}

LOOP_TEST(loop_busy_while_running)
{
    struct busy b = {.loop = loop};
    CHECK(!ca_loop_is_running(loop));
    CHECK(ca_get_running_loop() == NULL);
    CHECK_OK(ca_loop_call_soon(loop, busy_cb, &b, NULL));
    CHECK_OK(ca_loop_run_forever(loop));
    CHECK_ERR(b.run_r, -EBUSY);
    CHECK_ERR(b.close_r, -EBUSY);
    CHECK_ERR(b.rucr, -EBUSY);
    CHECK(b.running);
    CHECK(!b.closed);
    CHECK(b.running_loop == loop);
    CHECK(!ca_loop_is_running(loop));
    CHECK(ca_get_running_loop() == NULL);
}

/* "running a second loop in a thread where one runs -EBUSY" */
struct second {
    ca_loop *other;
    int r1, r2, r3;
};
static void second_cb(void *arg)
{
    struct second *s = arg;
    s->r1 = ca_loop_run_forever(s->other);
    ca_future *f = NULL;
    CHECK_OK(ca_future_new(s->other, &f));
    s->r2 = ca_loop_run_until_complete(s->other, f);
    ca_future_unref(f);
    s->r3 = ca_loop_enter_running(s->other);
    ca_loop_stop(ca_get_running_loop());
}

LOOP_TEST(loop_second_loop_in_thread_ebusy)
{
    struct second s = {.other = new_epoll()};
    CHECK_OK(ca_loop_call_soon(loop, second_cb, &s, NULL));
    CHECK_OK(ca_loop_run_forever(loop));
    CHECK_ERR(s.r1, -EBUSY);
    CHECK_ERR(s.r2, -EBUSY);
    CHECK_ERR(s.r3, -EBUSY);
    CHECK(!ca_loop_is_running(s.other));
    loop_done(s.other);
}

/* run_until_complete "returns the future's error, 0 if it has a result" */
static void set_res_cb(void *arg) { CHECK_OK(ca_future_set_result(arg, (void *)(intptr_t)42)); }
static void set_err_cb(void *arg) { CHECK_OK(ca_future_set_error(arg, -ETIMEDOUT)); }
static void cancel_cb(void *arg) { CHECK(ca_future_cancel(arg)); }

LOOP_TEST(loop_run_until_complete_outcomes)
{
    ca_future *f = NULL;
    void *res = NULL;
    CHECK_OK(ca_future_new(loop, &f));
    CHECK_OK(ca_loop_call_later(loop, 0.005, set_res_cb, f, NULL));
    CHECK_ERR(ca_loop_run_until_complete(loop, f), 0);
    CHECK_OK(ca_future_result(f, &res));
    CHECK_EQ((intptr_t)res, 42);
    /* Already done: returns at once with the same outcome. */
    CHECK_ERR(ca_loop_run_until_complete(loop, f), 0);
    ca_future_unref(f);
    CHECK_OK(ca_future_new(loop, &f));
    CHECK_OK(ca_loop_call_soon(loop, set_err_cb, f, NULL));
    CHECK_ERR(ca_loop_run_until_complete(loop, f), -ETIMEDOUT);
    ca_future_unref(f);
    CHECK_OK(ca_future_new(loop, &f));
    CHECK_OK(ca_loop_call_soon(loop, cancel_cb, f, NULL));
    CHECK_ERR(ca_loop_run_until_complete(loop, f), -ECANCELED);
    ca_future_unref(f);
    /* A future of another loop: -EINVAL. */
    ca_loop *other = new_epoll();
    CHECK_OK(ca_future_new(other, &f));
    CHECK_ERR(ca_loop_run_until_complete(loop, f), -EINVAL);
    ca_future_unref(f);
    loop_done(other);
}

/* ca_handle_cancel "idempotent; safe after it ran"; ca_handle_cancelled. */
LOOP_TEST(loop_handle_cancel)
{
    int n = 0, m = 0;
    ca_handle *h = NULL, *h2 = NULL, *h3 = NULL;
    CHECK_OK(ca_loop_call_soon(loop, count_cb, &n, &h));
    CHECK(!ca_handle_cancelled(h));
    ca_handle_cancel(h);
    CHECK(ca_handle_cancelled(h));
    ca_handle_cancel(h);
    CHECK(ca_handle_cancelled(h));
    CHECK_OK(ca_loop_call_later(loop, 0.001, count_cb, &n, &h2));
    ca_handle_cancel(h2);
    CHECK_OK(ca_loop_call_soon(loop, count_cb, &m, &h3));
    t_run_for(loop, 0.02);
    CHECK_EQ(n, 0);
    CHECK_EQ(m, 1);
    ca_handle_cancel(h3); /* after it ran */
    ca_handle_cancel(h3);
    ca_handle_unref(h);
    ca_handle_unref(h2);
    CHECK_OK(ca_loop_close(loop));
    ca_handle_cancel(h3); /* after the loop closed */
    ca_handle_unref(h3);
}

/* "Readers and writers are level-triggered on every loop kind" */
struct lvl {
    int fd, n;
};
static void lvl_cb(void *arg) { ((struct lvl *)arg)->n++; }

LOOP_TEST(loop_reader_level_triggered)
{
    int p[2];
    CHECK_EQ(pipe2(p, O_CLOEXEC | O_NONBLOCK), 0);
    struct lvl l = {p[0], 0};
    CHECK_OK(ca_loop_add_reader(loop, p[0], lvl_cb, &l));
    CHECK_EQ(write(p[1], "x", 1), 1);
    for (int i = 0; i < 5; i++) {
        int before = l.n;
        t_run_for(loop, 0.005);
        CHECK(l.n > before); /* still readable: called again on each slice */
    }
    CHECK_EQ(ca_loop_remove_reader(loop, p[0]), 1);
    CHECK_EQ(ca_loop_remove_reader(loop, p[0]), 0);
    int before = l.n;
    t_run_for(loop, 0.01);
    CHECK_EQ(l.n, before);
    close(p[0]);
    close(p[1]);
}

LOOP_TEST(loop_writer_level_triggered)
{
    int p[2];
    CHECK_EQ(pipe2(p, O_CLOEXEC | O_NONBLOCK), 0);
    struct lvl l = {p[1], 0};
    CHECK_OK(ca_loop_add_writer(loop, p[1], lvl_cb, &l));
    for (int i = 0; i < 3; i++) {
        int before = l.n;
        run_once(loop);
        t_run_for(loop, 0.002);
        CHECK(l.n >= before + 2);
    }
    CHECK_EQ(ca_loop_remove_writer(loop, p[1]), 1);
    CHECK_EQ(ca_loop_remove_writer(loop, p[1]), 0);
    close(p[0]);
    close(p[1]);
}

/* Every iteration while readable: n iterations -> n calls. */
LOOP_TEST(loop_reader_called_every_iteration)
{
    int p[2];
    CHECK_EQ(pipe2(p, O_CLOEXEC | O_NONBLOCK), 0);
    struct lvl l = {p[0], 0};
    CHECK_EQ(write(p[1], "x", 1), 1);
    CHECK_OK(ca_loop_add_reader(loop, p[0], lvl_cb, &l));
    for (int i = 0; i < 6; i++) run_once(loop);
    /* The first iteration may still be registering (proactor); at least 5 of 6. */
    CHECK(l.n >= 5);
    CHECK(l.n <= 6);
    CHECK_EQ(ca_loop_remove_reader(loop, p[0]), 1);
    close(p[0]);
    close(p[1]);
}

/* Level-triggered "on every loop iteration" also while callbacks keep the loop busy: a
 * callback that reschedules itself 40 times makes 40 iterations; the readable fd's reader
 * must be called in (nearly) each of them, as asyncio's _run_once selects every time. */
struct chain {
    ca_loop *loop;
    int left, iters;
};
static void chain_cb(void *arg)
{
    struct chain *c = arg;
    c->iters++;
    if (--c->left > 0) CHECK_OK(ca_loop_call_soon(c->loop, chain_cb, c, NULL));
    else ca_loop_stop(c->loop);
}

LOOP_TEST(loop_reader_called_every_iteration_while_busy)
{
    int p[2];
    CHECK_EQ(pipe2(p, O_CLOEXEC | O_NONBLOCK), 0);
    struct lvl l = {p[0], 0};
    CHECK_EQ(write(p[1], "x", 1), 1);
    CHECK_OK(ca_loop_add_reader(loop, p[0], lvl_cb, &l));
    t_run_for(loop, 0.01); /* registered and seen at least once */
    CHECK(l.n > 0);
    l.n = 0;
    struct chain c = {loop, 40, 0};
    CHECK_OK(ca_loop_call_soon(loop, chain_cb, &c, NULL));
    CHECK_OK(ca_loop_run_forever(loop));
    CHECK_EQ(c.iters, 40);
    CHECK(l.n >= 38);
    CHECK_EQ(ca_loop_remove_reader(loop, p[0]), 1);
    close(p[0]);
    close(p[1]);
}

/* add_reader "replaces" */
LOOP_TEST(loop_add_reader_replaces)
{
    int p[2];
    CHECK_EQ(pipe2(p, O_CLOEXEC | O_NONBLOCK), 0);
    struct lvl a = {p[0], 0}, b = {p[0], 0};
    CHECK_OK(ca_loop_add_reader(loop, p[0], lvl_cb, &a));
    CHECK_OK(ca_loop_add_reader(loop, p[0], lvl_cb, &b));
    CHECK_EQ(write(p[1], "x", 1), 1);
    t_run_for(loop, 0.01);
    CHECK_EQ(a.n, 0);
    CHECK(b.n > 0);
    CHECK_OK(ca_loop_add_writer(loop, p[1], lvl_cb, &a));
    CHECK_OK(ca_loop_add_writer(loop, p[1], lvl_cb, &b));
    a.n = 0;
    t_run_for(loop, 0.01);
    CHECK_EQ(a.n, 0);
    CHECK_EQ(ca_loop_remove_reader(loop, p[0]), 1);
    CHECK_EQ(ca_loop_remove_writer(loop, p[1]), 1);
    close(p[0]);
    close(p[1]);
}

/* "remove_reader 1 removed, 0 nothing to remove" (also for an fd never added). */
LOOP_TEST(loop_remove_nothing_zero)
{
    int p[2];
    CHECK_EQ(pipe2(p, O_CLOEXEC | O_NONBLOCK), 0);
    CHECK_EQ(ca_loop_remove_reader(loop, p[0]), 0);
    CHECK_EQ(ca_loop_remove_writer(loop, p[1]), 0);
    CHECK_OK(ca_loop_add_reader(loop, p[0], noop, NULL));
    CHECK_EQ(ca_loop_remove_writer(loop, p[0]), 0);
    CHECK_EQ(ca_loop_remove_reader(loop, p[0]), 1);
    close(p[0]);
    close(p[1]);
}

/* Signal handlers: "remove 1 / 0". Delivered on the loop. */
LOOP_TEST(loop_signal_handler_add_remove)
{
    int n = 0;
    int r = ca_loop_add_signal_handler(loop, SIGUSR1, count_cb, &n);
    if (r == -ENOTSUP && strcmp(t_loop_kind, "custom") == 0) SKIP("custom test loop has no signals");
    CHECK_OK(r);
    kill(getpid(), SIGUSR1);
    CHECK(t_run_until(loop, t_flag_set, &n, 2.0));
    CHECK_EQ(ca_loop_remove_signal_handler(loop, SIGUSR1), 1);
    CHECK_EQ(ca_loop_remove_signal_handler(loop, SIGUSR1), 0);
    CHECK_EQ(ca_loop_remove_signal_handler(loop, SIGUSR2), 0);
}

/* "Signal handlers may be added on loops in any thread; several loops may watch the same
 * signal." */
struct sigthr {
    ca_loop *loop;
    int n;
    atomic_int ready;
    int add_r;
};
static void sig_thr_cb(void *arg)
{
    struct sigthr *s = arg;
    s->n++;
    ca_loop_stop(s->loop);
}
static void *sig_thread(void *arg)
{
    struct sigthr *s = arg;
    s->add_r = ca_loop_add_signal_handler(s->loop, SIGUSR2, sig_thr_cb, s);
    atomic_store(&s->ready, 1);
    if (s->add_r == 0) {
        ca_handle *h = NULL;
        ca_loop_call_later(s->loop, 5.0 * t_slow(), stop_cb, s->loop, &h);
        ca_loop_run_forever(s->loop);
        ca_handle_cancel(h);
        ca_handle_unref(h);
        ca_loop_remove_signal_handler(s->loop, SIGUSR2);
    }
    return NULL;
}

TEST(loop_signal_two_threads_same_signal)
{
    struct sigthr a = {.loop = new_epoll()}, b = {0};
    CHECK_OK(ca_poll_loop_new(&b.loop));
    int n_main = 0;
    ca_loop *m = new_epoll();
    CHECK_OK(ca_loop_add_signal_handler(m, SIGUSR2, count_cb, &n_main));
    pthread_t ta, tb;
    CHECK_EQ(pthread_create(&ta, NULL, sig_thread, &a), 0);
    CHECK_EQ(pthread_create(&tb, NULL, sig_thread, &b), 0);
    while (!atomic_load(&a.ready) || !atomic_load(&b.ready)) sleep_s(0.001);
    CHECK_OK(a.add_r);
    CHECK_OK(b.add_r);
    kill(getpid(), SIGUSR2);
    pthread_join(ta, NULL);
    pthread_join(tb, NULL);
    CHECK_EQ(a.n, 1);
    CHECK_EQ(b.n, 1);
    CHECK(t_run_until(m, t_flag_set, &n_main, 2.0));
    loop_done(a.loop);
    loop_done(b.loop);
    loop_done(m);
}

/* ca_get_running_loop: "the loop running in this thread, or NULL" */
static void grl_cb(void *arg) { *(ca_loop **)arg = ca_get_running_loop(); }
static void *grl_thread(void *arg)
{
    *(ca_loop **)arg = ca_get_running_loop();
    return NULL;
}
struct grl2 {
    ca_loop *other_thread;
};
static void grl_other_thread_cb(void *arg)
{
    pthread_t t;
    ca_loop *got = SENT_LOOP;
    CHECK_EQ(pthread_create(&t, NULL, grl_thread, &got), 0);
    pthread_join(t, NULL);
    *(ca_loop **)arg = got;
}

LOOP_TEST(loop_get_running_loop)
{
    ca_loop *got = SENT_LOOP, *other = SENT_LOOP;
    CHECK(ca_get_running_loop() == NULL);
    CHECK_OK(ca_loop_call_soon(loop, grl_cb, &got, NULL));
    CHECK_OK(ca_loop_call_soon(loop, grl_other_thread_cb, &other, NULL));
    run_once(loop);
    CHECK(got == loop);
    CHECK(other == NULL);
    CHECK(ca_get_running_loop() == NULL);
}

/* ca_loop_stop before run makes one iteration; ca_loop_close drops pending callbacks. */
LOOP_TEST(loop_close_drops_pending)
{
    int n = 0;
    CHECK_OK(ca_loop_call_soon(loop, count_cb, &n, NULL));
    CHECK_OK(ca_loop_call_later(loop, 0.0, count_cb, &n, NULL));
    CHECK_OK(ca_loop_close(loop));
    CHECK_EQ(n, 0);
}

/* call_soon_threadsafe from another thread wakes the loop. */
struct tsafe {
    ca_loop *loop;
    int n;
};
static void tsafe_cb(void *arg)
{
    struct tsafe *t = arg;
    t->n++;
    ca_loop_stop(t->loop);
}
static void *tsafe_thread(void *arg)
{
    struct tsafe *t = arg;
    sleep_s(0.05);
    CHECK_OK(ca_loop_call_soon_threadsafe(t->loop, tsafe_cb, t));
    return NULL;
}

LOOP_TEST(loop_call_soon_threadsafe_wakes)
{
    struct tsafe t = {loop, 0};
    ca_handle *h = NULL;
    CHECK_OK(ca_loop_call_later(loop, 10.0, stop_cb, loop, &h));
    pthread_t th;
    double t0 = now_s();
    CHECK_EQ(pthread_create(&th, NULL, tsafe_thread, &t), 0);
    CHECK_OK(ca_loop_run_forever(loop));
    pthread_join(th, NULL);
    CHECK_EQ(t.n, 1);
    CHECK(now_s() - t0 < 5.0);
    ca_handle_cancel(h);
    ca_handle_unref(h);
}
