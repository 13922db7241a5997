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
#include <sys/un.h>
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

struct logrec {
    atomic_int n;
    int level;
    char last[256];
};
static void rec_log(int level, const char *msg, void *arg)
{
    struct logrec *r = arg;
    r->level = level;
    snprintf(r->last, sizeof r->last, "%s", msg);
    atomic_fetch_add(&r->n, 1);
}

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
    CHECK_OK(ca_loop_call_at(loop, t0 + 0.005, order_cb, (void *)0, NULL));
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
    struct lvl *lp = &l;
    for (int i = 0; i < 3; i++) {
        int before = l.n;
        double t0 = now_s();
        while (lp->n < before + 3 && now_s() - t0 < 2.0 * t_slow()) t_run_for(loop, 0.002);
        CHECK(l.n >= before + 3); /* writable all along: called again and again */
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

/* ===== Custom loops ======================================================================= */

/* ca_loop_new_custom: NULL ops or NULL run_forever -EINVAL, out untouched. */
TEST(custom_new_checks)
{
    ca_loop *l = SENT_LOOP;
    CHECK_ERR(ca_loop_new_custom(NULL, NULL, &l), -EINVAL);
    ca_loop_ops no_run = {.call_soon = spy_sched};
    CHECK_ERR(ca_loop_new_custom(&no_run, NULL, &l), -EINVAL);
    CHECK(l == SENT_LOOP);
    struct spy s = {0};
    CHECK_OK(ca_loop_new_custom(&spy_ops, &s, &l));
    CHECK(ca_loop_data(l) == &s);
    CHECK(strcmp(ca_loop_kind(l), "custom") == 0);
    ca_loop *e = new_epoll();
    CHECK(ca_loop_data(e) == NULL);
    loop_done(e);
    CHECK(ca_loop_ref(l) == l);
    ca_loop_unref(l);
    CHECK_EQ(s.destroyed, 0);
    loop_done(l);
    CHECK_EQ(s.destroyed, 1); /* destroy once, at the last reference */
}

/* "The public functions do the argument checks, the closed and fork checks ... before calling
 * the op, so ops do not repeat them." */
TEST(custom_checks_before_ops)
{
    struct spy s = {0};
    ca_loop *l = NULL;
    CHECK_OK(ca_loop_new_custom(&spy_ops, &s, &l));
    ca_handle *h = SENT_HANDLE;
    ca_future *f = SENT_FUT;
    char buf[4];
    CHECK_ERR(ca_loop_call_soon(l, NULL, NULL, &h), -EINVAL);
    CHECK_ERR(ca_loop_call_soon_threadsafe(l, NULL, NULL), -EINVAL);
    CHECK_ERR(ca_loop_call_later(l, 1, NULL, NULL, &h), -EINVAL);
    CHECK_ERR(ca_loop_call_at(l, NAN, noop, NULL, &h), -EINVAL);
    CHECK_ERR(ca_loop_add_reader(l, -1, noop, NULL), -EINVAL);
    CHECK_ERR(ca_loop_add_writer(l, -1, noop, NULL), -EINVAL);
    CHECK_ERR(ca_loop_remove_reader(l, -1), -EINVAL);
    CHECK_ERR(ca_loop_remove_writer(l, -1), -EINVAL);
    CHECK_ERR(ca_loop_add_signal_handler(l, 0, noop, NULL), -EINVAL);
    CHECK_ERR(ca_loop_add_signal_handler(l, SIGKILL, noop, NULL), -EINVAL);
    CHECK_ERR(ca_loop_remove_signal_handler(l, 999), -EINVAL);
    CHECK_ERR(ca_loop_sock_recv(l, -1, buf, 4, &f), -EINVAL);
    CHECK_ERR(ca_loop_sock_sendall(l, -1, buf, 4, &f), -EINVAL);
    CHECK_ERR(ca_loop_sock_accept(l, -1, &f), -EINVAL);
    CHECK_ERR(ca_loop_sock_connect(l, 3, NULL, 0, &f), -EINVAL);
    CHECK_EQ(s.calls, 0);
    CHECK(h == SENT_HANDLE && f == SENT_FUT);
    /* Valid calls reach the ops. */
    CHECK_OK(ca_loop_call_soon(l, noop, NULL, NULL));
    CHECK_OK(ca_loop_call_soon_threadsafe(l, noop, NULL));
    CHECK_OK(ca_loop_call_later(l, 1, noop, NULL, NULL));
    CHECK_OK(ca_loop_call_at(l, 1, noop, NULL, NULL));
    CHECK_EQ(s.calls, 4);
    /* Closed: -EBADF (remove_*: 0) without calling the ops. */
    CHECK_OK(ca_loop_close(l));
    CHECK_EQ(s.closes, 1);
    CHECK_OK(ca_loop_close(l));
    CHECK_EQ(s.closes, 1);
    s.calls = 0;
    int p[2];
    CHECK_EQ(pipe2(p, O_CLOEXEC), 0);
    CHECK_ERR(ca_loop_call_soon(l, noop, NULL, &h), -EBADF);
    CHECK_ERR(ca_loop_call_soon_threadsafe(l, noop, NULL), -EBADF);
    CHECK_ERR(ca_loop_call_later(l, 1, noop, NULL, &h), -EBADF);
    CHECK_ERR(ca_loop_add_reader(l, p[0], noop, NULL), -EBADF);
    CHECK_ERR(ca_loop_add_writer(l, p[1], noop, NULL), -EBADF);
    CHECK_ERR(ca_loop_remove_reader(l, p[0]), 0);
    CHECK_ERR(ca_loop_remove_writer(l, p[1]), 0);
    CHECK_ERR(ca_loop_add_signal_handler(l, SIGUSR1, noop, NULL), -EBADF);
    CHECK_ERR(ca_loop_remove_signal_handler(l, SIGUSR1), 0);
    CHECK_ERR(ca_loop_sock_recv(l, p[0], buf, 4, &f), -EBADF);
    CHECK_ERR(ca_loop_run_forever(l), -EBADF);
    CHECK_EQ(s.calls, 0);
    ca_loop_stop(l);
    CHECK(h == SENT_HANDLE && f == SENT_FUT);
    close(p[0]);
    close(p[1]);
    ca_loop_unref(l);
}

/* "A NULL member means 'not provided' (-ENOTSUP; stop and close then do only the core's
 * part), except the sock_* members" */
TEST(custom_null_members_enotsup)
{
    struct spy s = {0};
    ca_loop *l = NULL;
    CHECK_OK(ca_loop_new_custom(&bare_ops, &s, &l));
    ca_handle *h = SENT_HANDLE;
    int p[2];
    CHECK_EQ(pipe2(p, O_CLOEXEC | O_NONBLOCK), 0);
    CHECK_ERR(ca_loop_call_soon(l, noop, NULL, &h), -ENOTSUP);
    CHECK_ERR(ca_loop_call_soon(l, noop, NULL, NULL), -ENOTSUP);
    CHECK_ERR(ca_loop_call_soon_threadsafe(l, noop, NULL), -ENOTSUP);
    CHECK_ERR(ca_loop_call_later(l, 0.1, noop, NULL, &h), -ENOTSUP);
    CHECK_ERR(ca_loop_call_at(l, 0.1, noop, NULL, &h), -ENOTSUP);
    CHECK(h == SENT_HANDLE);
    CHECK_ERR(ca_loop_add_reader(l, p[0], noop, NULL), -ENOTSUP);
    CHECK_ERR(ca_loop_remove_reader(l, p[0]), -ENOTSUP);
    CHECK_ERR(ca_loop_add_writer(l, p[1], noop, NULL), -ENOTSUP);
    CHECK_ERR(ca_loop_remove_writer(l, p[1]), -ENOTSUP);
    CHECK_ERR(ca_loop_add_signal_handler(l, SIGUSR1, noop, NULL), -ENOTSUP);
    CHECK_ERR(ca_loop_remove_signal_handler(l, SIGUSR1), -ENOTSUP);
    /* stop and close: the core's part only. */
    ca_loop_stop(l);
    CHECK(!ca_loop_is_closed(l));
    CHECK_OK(ca_loop_close(l));
    CHECK(ca_loop_is_closed(l));
    CHECK_OK(ca_loop_close(l));
    close(p[0]);
    close(p[1]);
    ca_loop_unref(l);
    CHECK_EQ(s.destroyed, 1);
}

/* call_later "uses" call_at: the op receives loop time + delay. */
static double seen_when;
static int at_rec(ca_loop *self, double when, ca_handle *h)
{
    seen_when = when;
    return 0;
}
static const ca_loop_ops at_ops = {.run_forever = spy_run, .call_at = at_rec};

TEST(custom_call_later_uses_call_at)
{
    ca_loop *l = NULL;
    CHECK_OK(ca_loop_new_custom(&at_ops, NULL, &l));
    double t = ca_loop_time(l);
    CHECK_OK(ca_loop_call_later(l, 5.0, noop, NULL, NULL));
    CHECK(fabs(seen_when - (t + 5.0)) < 0.05);
    seen_when = 0;
    CHECK_OK(ca_loop_call_later(l, -3.0, noop, NULL, NULL));
    CHECK(seen_when <= ca_loop_time(l) + 0.001 && seen_when >= t - 0.001);
    loop_done(l);
}

/* "Scheduling ops receive a handle made by the core (borrowed: an op that keeps it takes
 * ca_handle_ref) and run it with ca_handle_run when due." ca_handle_run "runs the callback
 * unless cancelled". */
static ca_handle *kept[8];
static int nkept;
static int keep_soon(ca_loop *self, ca_handle *h)
{
    kept[nkept++] = ca_handle_ref(h);
    return 0;
}
static const ca_loop_ops keep_ops = {.run_forever = spy_run, .call_soon = keep_soon};

TEST(custom_handle_run)
{
    ca_loop *l = NULL;
    nkept = 0;
    CHECK_OK(ca_loop_new_custom(&keep_ops, NULL, &l));
    int a = 0, b = 0, c = 0;
    ca_handle *hb = NULL;
    CHECK_OK(ca_loop_call_soon(l, count_cb, &a, NULL)); /* caller declines the handle */
    CHECK_OK(ca_loop_call_soon(l, count_cb, &b, &hb));
    CHECK_OK(ca_loop_call_soon(l, count_cb, &c, NULL));
    CHECK_EQ(nkept, 3);
    CHECK(kept[1] == hb);
    ca_handle_cancel(hb);
    for (int i = 0; i < 3; i++) ca_handle_run(kept[i]);
    CHECK_EQ(a, 1);
    CHECK_EQ(b, 0);
    CHECK_EQ(c, 1);
    for (int i = 0; i < 3; i++) ca_handle_unref(kept[i]);
    ca_handle_unref(hb);
    loop_done(l);
}

/* "except the sock_* members, which the core then implements with readers/writers" */
TEST(custom_sock_ops_through_readers)
{
    ca_loop *loop = NULL;
    CHECK_OK(t_custom_loop_new(&loop));
    int sv[2];
    CHECK_EQ(socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0, sv), 0);
    char buf[16] = {0};
    ca_future *r = NULL, *s = NULL;
    CHECK_OK(ca_loop_sock_recv(loop, sv[0], buf, sizeof buf, &r));
    CHECK_OK(ca_loop_sock_sendall(loop, sv[1], "hello", 5, &s));
    CHECK_ERR(ca_loop_run_until_complete(loop, r), 0);
    CHECK_ERR(ca_loop_run_until_complete(loop, s), 0);
    void *res = SENT_PTR;
    CHECK_OK(ca_future_result(r, &res));
    CHECK_EQ((intptr_t)res, 5);
    CHECK(memcmp(buf, "hello", 5) == 0);
    CHECK_OK(ca_future_result(s, &res));
    CHECK_EQ((intptr_t)res, 0);
    ca_future_unref(r);
    ca_future_unref(s);
    close(sv[0]);
    close(sv[1]);
    loop_done(loop);
}

/* enter/exit_running: "for a foreign loop run by foreign code" */
TEST(custom_enter_exit_running)
{
    struct spy s = {0};
    ca_loop *l = NULL;
    CHECK_OK(ca_loop_new_custom(&spy_ops, &s, &l));
    CHECK(!ca_loop_is_running(l));
    CHECK_ERR(ca_loop_exit_running(l), -EINVAL); /* not running here */
    CHECK_OK(ca_loop_enter_running(l));
    CHECK(ca_loop_is_running(l));
    CHECK(ca_get_running_loop() == l);
    CHECK_ERR(ca_loop_enter_running(l), -EBUSY);
    CHECK_ERR(ca_loop_close(l), -EBUSY);
    CHECK_ERR(ca_loop_run_forever(l), -EBUSY);
    ca_loop *other = new_epoll();
    CHECK_ERR(ca_loop_enter_running(other), -EBUSY);
    CHECK_ERR(ca_loop_run_forever(other), -EBUSY);
    CHECK_ERR(ca_loop_exit_running(other), -EINVAL);
    ca_loop *got = NULL;
    CHECK_OK(ca_get_event_loop(&got));
    CHECK(got == l);
    CHECK_OK(ca_loop_exit_running(l));
    CHECK(!ca_loop_is_running(l));
    CHECK(ca_get_running_loop() == NULL);
    CHECK_ERR(ca_loop_exit_running(l), -EINVAL);
    loop_done(other);
    CHECK_OK(ca_loop_close(l));
    CHECK_ERR(ca_loop_enter_running(l), -EBADF);
    ca_loop_unref(l);
}

/* run_until_complete on a custom loop: bookkeeping done by the core around run_forever. */
struct cr {
    int nrun;
    ca_future *f;
    ca_loop *seen_running;
    bool is_running;
};
static int cr_run(ca_loop *self)
{
    struct cr *c = ca_loop_data(self);
    c->nrun++;
    c->seen_running = ca_get_running_loop();
    c->is_running = ca_loop_is_running(self);
    ca_future_set_result(c->f, (void *)7);
    return 0;
}
static const ca_loop_ops cr_ops = {.run_forever = cr_run};

TEST(custom_running_bookkeeping)
{
    struct cr c = {0};
    ca_loop *l = NULL;
    CHECK_OK(ca_loop_new_custom(&cr_ops, &c, &l));
    CHECK_OK(ca_future_new(l, &c.f));
    CHECK_OK(ca_loop_run_forever(l));
    CHECK_EQ(c.nrun, 1);
    CHECK(c.seen_running == l);
    CHECK(c.is_running);
    CHECK(!ca_loop_is_running(l));
    CHECK(ca_get_running_loop() == NULL);
    ca_future_unref(c.f);
    loop_done(l);
}

/* ===== Futures ============================================================================ */

LOOP_TEST(future_lines)
{
    ca_future *f = NULL;
    CHECK_OK(ca_future_new(loop, &f));
    CHECK(!ca_future_done(f));
    CHECK(!ca_future_cancelled(f));
    void *res = SENT_PTR;
    CHECK_ERR(ca_future_result(f, &res), -EAGAIN);
    CHECK(res == SENT_PTR);
    CHECK_ERR(ca_future_set_error(f, 0), -EINVAL);
    CHECK_ERR(ca_future_set_error(f, 5), -EINVAL);
    CHECK(!ca_future_done(f));
    CHECK_OK(ca_future_set_result(f, (void *)(intptr_t)-3));
    CHECK(ca_future_done(f));
    CHECK_ERR(ca_future_set_result(f, NULL), -EINVAL);
    CHECK_ERR(ca_future_set_error(f, -EIO), -EINVAL);
    CHECK(!ca_future_cancel(f));
    CHECK(!ca_future_cancelled(f));
    CHECK_OK(ca_future_result(f, &res));
    CHECK_EQ((intptr_t)res, -3);
    CHECK_OK(ca_future_result(f, NULL));
    ca_future_unref(f);

    CHECK_OK(ca_future_new(loop, &f));
    CHECK_OK(ca_future_set_error(f, -EIO));
    res = SENT_PTR;
    CHECK_ERR(ca_future_result(f, &res), -EIO);
    CHECK(res == SENT_PTR);
    CHECK(ca_future_done(f));
    CHECK(!ca_future_cancel(f));
    CHECK_ERR(ca_future_set_result(f, NULL), -EINVAL);
    ca_future_unref(f);

    CHECK_OK(ca_future_new(loop, &f));
    CHECK(ca_future_cancel(f));
    CHECK(ca_future_done(f));
    CHECK(ca_future_cancelled(f));
    CHECK(!ca_future_cancel(f));
    CHECK_ERR(ca_future_result(f, &res), -ECANCELED);
    CHECK(res == SENT_PTR);
    CHECK_ERR(ca_future_set_result(f, NULL), -EINVAL);
    CHECK_ERR(ca_future_set_error(f, -EIO), -EINVAL);
    ca_future_unref(f);

    /* NULLs */
    CHECK_ERR(ca_future_set_result(NULL, NULL), -EINVAL);
    CHECK_ERR(ca_future_set_error(NULL, -EIO), -EINVAL);
    CHECK(!ca_future_cancel(NULL));
    CHECK(!ca_future_done(NULL));
    CHECK(!ca_future_cancelled(NULL));
    CHECK_ERR(ca_future_result(NULL, &res), -EINVAL);
    CHECK_ERR(ca_future_add_done_callback(NULL, fut_noop, NULL), -EINVAL);
    CHECK_OK(ca_future_new(loop, &f));
    CHECK_ERR(ca_future_add_done_callback(f, NULL, NULL), -EINVAL);
    CHECK(ca_future_loop(f) == loop);
    ca_future_unref(f);
}

/* "Done callbacks run through the loop (call_soon), never inside set_result." */
struct dcb {
    int n;
    ca_future *seen;
    int order[4], k;
};
static void dcb_fn(ca_future *f, void *arg)
{
    struct dcb *d = arg;
    d->n++;
    d->seen = f;
}
static void dcb_order(ca_future *f, void *arg)
{
    struct dcb *d = *(struct dcb **)arg;
    d->order[d->k++] = (int)(((struct dcb **)arg) - (struct dcb **)arg);
}

LOOP_TEST(future_done_callbacks_through_loop)
{
    (void)dcb_order;
    struct dcb d = {0};
    ca_future *f = NULL;
    CHECK_OK(ca_future_new(loop, &f));
    CHECK_OK(ca_future_add_done_callback(f, dcb_fn, &d));
    CHECK_OK(ca_future_add_done_callback(f, dcb_fn, &d));
    CHECK_OK(ca_future_set_result(f, NULL));
    CHECK_EQ(d.n, 0);
    run_once(loop);
    CHECK_EQ(d.n, 2);
    CHECK(d.seen == f);
    /* Already done: "at once, through the loop". */
    CHECK_OK(ca_future_add_done_callback(f, dcb_fn, &d));
    CHECK_EQ(d.n, 2);
    run_once(loop);
    CHECK_EQ(d.n, 3);
    ca_future_unref(f);
    /* Cancel and set_error schedule them too. */
    d.n = 0;
    CHECK_OK(ca_future_new(loop, &f));
    CHECK_OK(ca_future_add_done_callback(f, dcb_fn, &d));
    CHECK(ca_future_cancel(f));
    CHECK_EQ(d.n, 0);
    run_once(loop);
    CHECK_EQ(d.n, 1);
    ca_future_unref(f);
    CHECK_OK(ca_future_new(loop, &f));
    CHECK_OK(ca_future_add_done_callback(f, dcb_fn, &d));
    CHECK_OK(ca_future_set_error(f, -EIO));
    CHECK_EQ(d.n, 1);
    run_once(loop);
    CHECK_EQ(d.n, 2);
    ca_future_unref(f);
}

/* Done callbacks run in the order they were added (asyncio). */
static int dorder[8], ndorder;
static void dorder_fn(ca_future *f, void *arg) { dorder[ndorder++] = (int)(intptr_t)arg; }

LOOP_TEST(future_done_callbacks_fifo)
{
    ca_future *f = NULL;
    ndorder = 0;
    CHECK_OK(ca_future_new(loop, &f));
    for (int i = 0; i < 5; i++) CHECK_OK(ca_future_add_done_callback(f, dorder_fn, (void *)(intptr_t)i));
    CHECK_OK(ca_future_set_result(f, NULL));
    run_once(loop);
    CHECK_EQ(ndorder, 5);
    for (int i = 0; i < 5; i++) CHECK_EQ(dorder[i], i);
    ca_future_unref(f);
}

/* The caller may drop its reference to a pending future with a done callback. */
LOOP_TEST(future_unref_pending_then_complete)
{
    ca_future *f = NULL;
    struct dcb d = {0};
    CHECK_OK(ca_future_new(loop, &f));
    CHECK_OK(ca_future_add_done_callback(f, dcb_fn, &d));
    ca_future *keep = ca_future_ref(f);
    ca_future_unref(f);
    CHECK_OK(ca_future_set_result(keep, NULL));
    ca_future_unref(keep);
    run_once(loop);
    CHECK_EQ(d.n, 1);
}

/* ===== Policy ============================================================================= */

/* "ca_get_event_loop_policy() ... never NULL: creates the default lazily"; borrowed. */
TEST(policy_get_never_null_borrowed)
{
    ca_policy *p = ca_get_event_loop_policy();
    CHECK(p != NULL);
    CHECK(ca_get_event_loop_policy() == p);
    CHECK(ca_policy_data(p) == NULL);
    CHECK(ca_policy_base(p) == NULL);
    /* Borrowed: a ref/unref pair of ours does not free it. */
    ca_policy_unref(ca_policy_ref(p));
    ca_loop *l = NULL;
    CHECK_OK(ca_policy_new_event_loop(p, &l));
    loop_done(l);
}

/* "ca_set_event_loop_policy: NULL restores a default policy"; the setter takes its own
 * reference. */
static int cnt_new;
static int cnt_new_loop(ca_policy *self, ca_loop **out)
{
    cnt_new++;
    return ca_policy_new_event_loop(ca_policy_base(self), out);
}
static const ca_policy_ops cnt_ops = {.new_event_loop = cnt_new_loop};

TEST(policy_set_takes_reference_and_null_restores)
{
    ca_policy *def = NULL, *p = NULL;
    CHECK_OK(ca_default_policy_new(&def));
    CHECK_OK(ca_policy_new(&cnt_ops, NULL, def, &p));
    ca_policy_unref(def); /* the new policy holds base */
    CHECK_OK(ca_set_event_loop_policy(p));
    ca_policy_unref(p); /* the process holds it */
    CHECK(ca_get_event_loop_policy() == p);
    cnt_new = 0;
    ca_loop *l = NULL;
    CHECK_OK(ca_new_event_loop(&l));
    CHECK_EQ(cnt_new, 1);
    CHECK(l != NULL);
    loop_done(l);
    /* The main thread's automatic loop goes through the derived new_event_loop. */
    CHECK_OK(ca_get_event_loop(&l));
    CHECK_EQ(cnt_new, 2);
    CHECK_OK(ca_set_event_loop_policy(NULL));
    ca_policy *d = ca_get_event_loop_policy();
    CHECK(d != NULL);
    CHECK(ca_policy_data(d) == NULL);
    CHECK(ca_policy_base(d) == NULL);
    CHECK_OK(ca_new_event_loop(&l));
    CHECK_EQ(cnt_new, 2);
    CHECK(strcmp(ca_loop_kind(l), "epoll") == 0);
    loop_done(l);
}

/* "In the main thread, get_event_loop with no loop set, when set_event_loop was never called
 * in it, creates and sets one (once); in every other case no loop set gives -ENOENT." */
TEST(policy_main_thread_auto_loop_once)
{
    ca_loop *a = SENT_LOOP, *b = SENT_LOOP;
    CHECK_OK(ca_get_event_loop(&a));
    CHECK(a != SENT_LOOP && a != NULL);
    CHECK(strcmp(ca_loop_kind(a), "epoll") == 0);
    CHECK_OK(ca_get_event_loop(&b));
    CHECK(a == b);
    /* Borrowed: the policy keeps it; close it but it stays set (asyncio). */
    CHECK_OK(ca_loop_close(a));
    CHECK_OK(ca_get_event_loop(&b));
    CHECK(b == a);
    CHECK_OK(ca_set_event_loop(NULL));
    b = SENT_LOOP;
    CHECK_ERR(ca_get_event_loop(&b), -ENOENT);
    CHECK(b == SENT_LOOP);
    CHECK_ERR(ca_get_event_loop(&b), -ENOENT);
}

TEST(policy_main_thread_no_auto_after_set)
{
    ca_loop *l = new_epoll();
    CHECK_OK(ca_set_event_loop(l));
    ca_loop *got = NULL;
    CHECK_OK(ca_get_event_loop(&got));
    CHECK(got == l);
    CHECK_OK(ca_set_event_loop(NULL));
    got = SENT_LOOP;
    CHECK_ERR(ca_get_event_loop(&got), -ENOENT);
    CHECK(got == SENT_LOOP);
    loop_done(l);
}

/* set_event_loop(NULL) first: counts as "set_event_loop was called". */
TEST(policy_main_thread_set_null_first_enoent)
{
    CHECK_OK(ca_set_event_loop(NULL));
    ca_loop *got = SENT_LOOP;
    CHECK_ERR(ca_get_event_loop(&got), -ENOENT);
    CHECK(got == SENT_LOOP);
}

/* The same through an explicit policy object. */
TEST(policy_object_get_event_loop_auto_once)
{
    ca_policy *p = NULL;
    CHECK_OK(ca_poll_policy_new(&p));
    ca_loop *a = NULL, *b = NULL;
    CHECK_OK(ca_policy_get_event_loop(p, &a));
    CHECK(strcmp(ca_loop_kind(a), "poll") == 0);
    CHECK_OK(ca_policy_get_event_loop(p, &b));
    CHECK(a == b);
    ca_loop_ref(a); /* keep it alive: pointer comparisons below */
    CHECK_OK(ca_policy_set_event_loop(p, NULL));
    b = SENT_LOOP;
    CHECK_ERR(ca_policy_get_event_loop(p, &b), -ENOENT);
    CHECK(b == SENT_LOOP);
    /* The process policy is separate. */
    CHECK_OK(ca_get_event_loop(&b));
    CHECK(b != a);
    ca_policy_unref(p);
    CHECK_OK(ca_set_event_loop(NULL));
    loop_done(a);
}

/* Other threads: -ENOENT; they never get the main thread's loop. */
static void *thr_get(void *arg)
{
    ca_loop *l = SENT_LOOP;
    int r = ca_get_event_loop(&l);
    ((int *)arg)[0] = r;
    ((int *)arg)[1] = l == SENT_LOOP;
    return NULL;
}

TEST(policy_other_thread_enoent)
{
    ca_loop *m = NULL;
    CHECK_OK(ca_get_event_loop(&m));
    int res[2] = {1, 0};
    pthread_t t;
    CHECK_EQ(pthread_create(&t, NULL, thr_get, res), 0);
    pthread_join(t, NULL);
    CHECK_ERR(res[0], -ENOENT);
    CHECK(res[1]);
    CHECK_OK(ca_set_event_loop(NULL));
}

/* A thread's own set loop. */
struct thrset {
    ca_loop *loop;
    int r;
    ca_loop *got;
};
static void *thr_set_get(void *arg)
{
    struct thrset *t = arg;
    CHECK_OK(ca_set_event_loop(t->loop));
    t->r = ca_get_event_loop(&t->got);
    CHECK_OK(ca_set_event_loop(NULL));
    return NULL;
}

TEST(policy_thread_context)
{
    struct thrset t = {.loop = new_epoll()};
    pthread_t th;
    CHECK_EQ(pthread_create(&th, NULL, thr_set_get, &t), 0);
    pthread_join(th, NULL);
    CHECK_OK(t.r);
    CHECK(t.got == t.loop);
    ca_loop *m = NULL;
    CHECK_OK(ca_get_event_loop(&m));
    CHECK(m != t.loop);
    loop_done(t.loop);
    CHECK_OK(ca_set_event_loop(NULL));
}

/* "ca_get_event_loop: running loop first, else the policy's" (the policy is not asked). */
static int gel_calls;
static int gel_op(ca_policy *self, ca_loop **out)
{
    gel_calls++;
    return ca_policy_get_event_loop(ca_policy_base(self), out);
}
static const ca_policy_ops gel_ops = {.get_event_loop = gel_op};
static void gel_cb(void *arg)
{
    ca_loop *got = NULL;
    CHECK_OK(ca_get_event_loop(&got));
    *(ca_loop **)arg = got;
}

TEST(policy_get_event_loop_running_first)
{
    ca_policy *def = NULL, *p = NULL;
    CHECK_OK(ca_default_policy_new(&def));
    CHECK_OK(ca_policy_new(&gel_ops, NULL, def, &p));
    ca_policy_unref(def);
    CHECK_OK(ca_set_event_loop_policy(p));
    ca_policy_unref(p);
    ca_loop *cur = new_epoll(), *run = new_epoll();
    CHECK_OK(ca_set_event_loop(cur));
    ca_loop *got = NULL;
    gel_calls = 0;
    CHECK_OK(ca_get_event_loop(&got));
    CHECK(got == cur);
    CHECK_EQ(gel_calls, 1);
    CHECK_OK(ca_loop_call_soon(run, gel_cb, &got, NULL));
    run_once(run);
    CHECK(got == run);
    CHECK_EQ(gel_calls, 1);
    CHECK_OK(ca_set_event_loop(NULL));
    loop_done(cur);
    loop_done(run);
}

/* "Setters take their own reference": ca_set_event_loop. */
TEST(policy_set_event_loop_takes_reference)
{
    ca_loop *l = new_epoll();
    CHECK_OK(ca_set_event_loop(l));
    ca_loop_unref(l); /* the policy holds it */
    ca_loop *got = NULL;
    CHECK_OK(ca_get_event_loop(&got));
    CHECK(got == l);
    int n = 0;
    CHECK_OK(ca_loop_call_soon(got, count_cb, &n, NULL));
    run_once(got);
    CHECK_EQ(n, 1);
    CHECK_OK(ca_loop_close(got));
    CHECK_OK(ca_set_event_loop(NULL)); /* drops the last reference */
}

/* ca_policy_new: NULL ops -EINVAL; delegation; base/data; -ENOTSUP with no base. */
static const ca_policy_ops empty_ops = {0};

TEST(policy_new_and_enotsup)
{
    ca_policy *p = SENT_POL;
    CHECK_ERR(ca_policy_new(NULL, NULL, NULL, &p), -EINVAL);
    CHECK_ERR(ca_policy_new(&empty_ops, NULL, NULL, NULL), -EINVAL);
    CHECK(p == SENT_POL);
    int data = 5;
    CHECK_OK(ca_policy_new(&empty_ops, &data, NULL, &p));
    CHECK(ca_policy_data(p) == &data);
    CHECK(ca_policy_base(p) == NULL);
    ca_loop *l = SENT_LOOP;
    ca_child_watcher *w = SENT_W;
    CHECK_ERR(ca_policy_get_event_loop(p, &l), -ENOTSUP);
    CHECK_ERR(ca_policy_set_event_loop(p, NULL), -ENOTSUP);
    CHECK_ERR(ca_policy_new_event_loop(p, &l), -ENOTSUP);
    CHECK_ERR(ca_policy_get_child_watcher(p, &w), -ENOTSUP);
    CHECK_ERR(ca_policy_set_child_watcher(p, NULL), -ENOTSUP);
    CHECK(l == SENT_LOOP && w == SENT_W);
    /* Module-level functions through it. */
    CHECK_OK(ca_set_event_loop_policy(p));
    CHECK_ERR(ca_get_event_loop(&l), -ENOTSUP);
    CHECK_ERR(ca_set_event_loop(NULL), -ENOTSUP);
    CHECK_ERR(ca_new_event_loop(&l), -ENOTSUP);
    CHECK_ERR(ca_get_child_watcher(&w), -ENOTSUP);
    CHECK_ERR(ca_set_child_watcher(NULL), -ENOTSUP);
    CHECK(l == SENT_LOOP && w == SENT_W);
    CHECK_OK(ca_set_event_loop_policy(NULL));
    ca_policy_unref(p);
    /* NULL policy / out. */
    CHECK_ERR(ca_policy_get_event_loop(NULL, &l), -EINVAL);
    CHECK_ERR(ca_policy_set_event_loop(NULL, NULL), -EINVAL);
    CHECK_ERR(ca_policy_new_event_loop(NULL, &l), -EINVAL);
    CHECK_ERR(ca_policy_get_child_watcher(NULL, &w), -EINVAL);
    CHECK_ERR(ca_policy_set_child_watcher(NULL, NULL), -EINVAL);
    ca_policy *d = NULL;
    CHECK_OK(ca_default_policy_new(&d));
    CHECK_ERR(ca_policy_get_event_loop(d, NULL), -EINVAL);
    CHECK_ERR(ca_policy_new_event_loop(d, NULL), -EINVAL);
    CHECK_ERR(ca_policy_get_child_watcher(d, NULL), -EINVAL);
    ca_policy_unref(d);
    CHECK(ca_policy_data(NULL) == NULL);
    CHECK(ca_policy_base(NULL) == NULL);
}

/* Delegation: NULL ops are "called on base, so the state they keep lives in base". */
TEST(policy_subclass_state_in_base)
{
    ca_policy *base = NULL, *p = NULL;
    CHECK_OK(ca_default_policy_new(&base));
    CHECK_OK(ca_policy_new(&gel_ops, NULL, base, &p));
    CHECK(ca_policy_base(p) == base);
    ca_loop *l = new_epoll();
    CHECK_OK(ca_policy_set_event_loop(p, l));
    ca_loop *got = NULL;
    CHECK_OK(ca_policy_get_event_loop(base, &got));
    CHECK(got == l);
    gel_calls = 0;
    CHECK_OK(ca_policy_get_event_loop(p, &got));
    CHECK(got == l);
    CHECK_EQ(gel_calls, 1);
    ca_child_watcher *w1 = NULL, *w2 = NULL;
    CHECK_OK(ca_policy_get_child_watcher(p, &w1));
    CHECK_OK(ca_policy_get_child_watcher(base, &w2));
    CHECK(w1 == w2);
    ca_policy_unref(base); /* p holds it */
    CHECK_OK(ca_policy_get_event_loop(ca_policy_base(p), &got));
    CHECK(got == l);
    CHECK_OK(ca_policy_set_event_loop(p, NULL));
    ca_policy_unref(p);
    loop_done(l);
}

/* Ops returning 0 with NULL: get_event_loop -> -ENOENT, new_event_loop -> -EINVAL,
 * get_child_watcher -> -ENOENT (header). Out untouched. */
static int null_get(ca_policy *self, ca_loop **out)
{
    *out = NULL;
    return 0;
}
static int null_new(ca_policy *self, ca_loop **out)
{
    *out = NULL;
    return 0;
}
static int null_gw(ca_policy *self, ca_child_watcher **out)
{
    *out = NULL;
    return 0;
}
static const ca_policy_ops nullret_ops = {
    .get_event_loop = null_get, .new_event_loop = null_new, .get_child_watcher = null_gw};

TEST(policy_op_returning_null)
{
    ca_policy *p = NULL;
    CHECK_OK(ca_policy_new(&nullret_ops, NULL, NULL, &p));
    ca_loop *l = SENT_LOOP;
    ca_child_watcher *w = SENT_W;
    CHECK_ERR(ca_policy_get_event_loop(p, &l), -ENOENT);
    CHECK_ERR(ca_policy_new_event_loop(p, &l), -EINVAL);
    CHECK_ERR(ca_policy_get_child_watcher(p, &w), -ENOENT);
    CHECK(l == SENT_LOOP && w == SENT_W);
    CHECK_OK(ca_set_event_loop_policy(p));
    CHECK_ERR(ca_get_event_loop(&l), -ENOENT);
    CHECK_ERR(ca_new_event_loop(&l), -EINVAL);
    CHECK_ERR(ca_get_child_watcher(&w), -ENOENT);
    CHECK(l == SENT_LOOP && w == SENT_W);
    CHECK_ERR(ca_run(NULL, NULL, NULL), -EINVAL);
    CHECK_OK(ca_set_event_loop_policy(NULL));
    ca_policy_unref(p);
}

/* Built-in policies: which loops new_event_loop makes. */
TEST(policy_builtins_make_their_loops)
{
    int (*mk[])(ca_policy **) = {ca_default_policy_new, ca_selector_policy_new, ca_poll_policy_new,
                                 ca_proactor_policy_new};
    const char *kind[] = {"epoll", "epoll", "poll", "io_uring"};
    for (int i = 0; i < 4; i++) {
        ca_policy *p = SENT_POL;
        int r = mk[i](&p);
        if (i == 3 && (r == -ENOSYS || r == -EPERM)) {
            CHECK(p == SENT_POL);
            continue;
        }
        CHECK_OK(r);
        ca_loop *l = NULL;
        CHECK_OK(ca_policy_new_event_loop(p, &l));
        CHECK(strcmp(ca_loop_kind(l), kind[i]) == 0);
        ca_loop *l2 = NULL;
        CHECK_OK(ca_policy_new_event_loop(p, &l2));
        CHECK(l2 != l);
        loop_done(l);
        loop_done(l2);
        ca_policy_unref(p);
    }
}

/* Child watcher: "created lazily by get_child_watcher: ThreadedChildWatcher"; borrowed; one
 * per policy; always active. */
TEST(policy_lazy_threaded_watcher)
{
    ca_child_watcher *w = SENT_W, *w2 = NULL;
    CHECK_OK(ca_get_child_watcher(&w));
    CHECK(w != SENT_W && w != NULL);
    CHECK(strcmp(ca__child_watcher_kind(w), "threaded") == 0);
    CHECK(ca_child_watcher_is_active(w));
    CHECK_OK(ca_get_child_watcher(&w2));
    CHECK(w == w2);
    ca_child_watcher_unref(ca_child_watcher_ref(w));
    CHECK(ca_child_watcher_is_active(w));
}

/* "set_event_loop in the main thread attaches the policy's child watcher (if one exists) to
 * that loop, or detaches it for NULL" — seen through a Safe watcher's is_active. */
TEST(policy_set_event_loop_attaches_watcher)
{
    ca_child_watcher *w = NULL;
    CHECK_OK(ca_safe_child_watcher_new(&w));
    CHECK_OK(ca_set_child_watcher(w));
    CHECK(!ca_child_watcher_is_active(w)); /* "does not attach the new one" */
    ca_loop *l = new_epoll();
    CHECK_OK(ca_set_event_loop(l));
    CHECK(ca_child_watcher_is_active(w));
    CHECK_OK(ca_set_event_loop(NULL));
    CHECK(!ca_child_watcher_is_active(w));
    CHECK_OK(ca_set_event_loop(l));
    CHECK(ca_child_watcher_is_active(w));
    CHECK_OK(ca_set_child_watcher(NULL)); /* closes w */
    CHECK(!ca_child_watcher_is_active(w));
    CHECK_ERR(ca_child_watcher_add_child_handler(w, 1, NULL, NULL), -EINVAL);
    ca_child_watcher_unref(w);
    CHECK_OK(ca_set_event_loop(NULL));
    loop_done(l);
}

/* The setter takes its own reference to the watcher: unref ours, the policy's still works. */
static void wcb_count(pid_t pid, int rc, void *arg) { atomic_fetch_add((atomic_int *)arg, 1); }

TEST(policy_set_child_watcher_takes_reference)
{
    ca_loop *l = new_epoll();
    CHECK_OK(ca_set_event_loop(l));
    ca_child_watcher *w = NULL;
    CHECK_OK(ca_threaded_child_watcher_new(&w));
    CHECK_OK(ca_set_child_watcher(w));
    ca_child_watcher_unref(w);
    ca_child_watcher *got = NULL;
    CHECK_OK(ca_get_child_watcher(&got));
    CHECK(got == w);
    CHECK(ca_child_watcher_is_active(got));
    pid_t pid = fork();
    if (pid == 0) t_child_exit(3);
    atomic_int n = 0;
    CHECK_OK(ca_child_watcher_add_child_handler(got, pid, wcb_count, &n));
    CHECK(t_run_until(l, t_flag_set, &n, 5.0));
    CHECK_OK(ca_set_event_loop(NULL));
    loop_done(l);
}

/* "set_child_watcher closes the previous watcher (as 3.11 does) and does not attach the new
 * one." Also not when it is the same watcher. */
TEST(policy_set_child_watcher_closes_previous)
{
    ca_loop *l = new_epoll();
    CHECK_OK(ca_set_event_loop(l));
    ca_child_watcher *old = NULL;
    CHECK_OK(ca_get_child_watcher(&old));
    ca_child_watcher_ref(old);
    ca_child_watcher *fast = NULL;
    CHECK_OK(ca_fast_child_watcher_new(&fast));
    CHECK_OK(ca_set_child_watcher(fast));
    CHECK_ERR(ca_child_watcher_add_child_handler(old, getpid(), wcb_count, NULL), -EBADF);
    CHECK(!ca_child_watcher_is_active(old));
    ca_child_watcher_unref(old);
    CHECK(!ca_child_watcher_is_active(fast)); /* not attached */
    CHECK_OK(ca_set_child_watcher(fast));     /* the same: not closed */
    CHECK_OK(ca_child_watcher_attach_loop(fast, l));
    CHECK(ca_child_watcher_is_active(fast));
    CHECK_OK(ca_set_child_watcher(NULL));
    CHECK(!ca_child_watcher_is_active(fast)); /* closed */
    CHECK_ERR(ca_child_watcher_attach_loop(fast, l), -EBADF);
    ca_child_watcher_unref(fast);
    CHECK_OK(ca_set_event_loop(NULL));
    loop_done(l);
}

/* get_child_watcher in the main thread attaches the lazily-made watcher to the main loop;
 * the lazily-made watcher after set_child_watcher(NULL) is a new Threaded one. */
TEST(policy_watcher_recreated_after_null)
{
    ca_child_watcher *w1 = NULL, *w2 = NULL;
    CHECK_OK(ca_get_child_watcher(&w1));
    ca_child_watcher_ref(w1);
    CHECK_OK(ca_set_child_watcher(NULL));
    CHECK_OK(ca_get_child_watcher(&w2));
    CHECK(w2 != NULL);
    CHECK(strcmp(ca__child_watcher_kind(w2), "threaded") == 0);
    CHECK(ca_child_watcher_is_active(w2));
    ca_child_watcher_unref(w1);
}

/* "In a child made by fork(), the current and running loops inherited from the parent are
 * never returned." */
static void fork_in_cb(void *arg)
{
    ca_loop *parent = arg;
    pid_t pid = fork();
    if (pid == 0) {
        int bad = 0;
        if (ca_get_running_loop() != NULL) bad |= 1;
        ca_loop *got = NULL;
        int r = ca_get_event_loop(&got);
        if (r == 0 && got == parent) bad |= 2;
        if (ca_loop_is_running(parent)) bad |= 4;
        t_child_exit(bad);
    }
    int st;
    CHECK_EQ(waitpid(pid, &st, 0), pid);
    CHECK(WIFEXITED(st));
    CHECK_EQ(WEXITSTATUS(st), 0);
}

TEST(policy_fork_child_never_sees_parent_loops)
{
    ca_loop *l = new_epoll();
    CHECK_OK(ca_set_event_loop(l));
    pid_t pid = fork();
    if (pid == 0) {
        int bad = 0;
        ca_loop *got = NULL;
        int r = ca_get_event_loop(&got);
        /* Main thread of the child, nothing set there: a new loop (or -ENOENT); never l. */
        if (r == 0 && got == l) bad |= 1;
        if (r == 0 && got && ca_loop_call_soon(got, noop, NULL, NULL) != 0) bad |= 2;
        if (r != 0 && r != -ENOENT) bad |= 4;
        ca_loop *cur = NULL;
        if (ca_policy_get_event_loop(ca_get_event_loop_policy(), &cur) == 0 && cur == l) bad |= 8;
        t_child_exit(bad);
    }
    int st;
    CHECK_EQ(waitpid(pid, &st, 0), pid);
    CHECK(WIFEXITED(st));
    CHECK_EQ(WEXITSTATUS(st), 0);
    CHECK_OK(ca_loop_call_soon(l, fork_in_cb, l, NULL));
    run_once(l);
    CHECK_OK(ca_set_event_loop(NULL));
    loop_done(l);
}

/* "the module-level functions are safe from any thread, also while another thread replaces
 * the policy" (short). */
static atomic_int race_stop;
static void *policy_replacer(void *arg)
{
    for (int i = 0; i < 200 && !atomic_load(&race_stop); i++) {
        ca_policy *p = NULL;
        CHECK_OK(ca_default_policy_new(&p));
        CHECK_OK(ca_set_event_loop_policy(p));
        ca_policy_unref(p);
    }
    return NULL;
}
static void *policy_user(void *arg)
{
    for (int i = 0; i < 400; i++) {
        ca_policy *p = ca_get_event_loop_policy();
        CHECK(p != NULL);
        ca_loop *l = NULL;
        int r = ca_get_event_loop(&l);
        CHECK(r == -ENOENT);
        CHECK_OK(ca_new_event_loop(&l));
        loop_done(l);
    }
    return NULL;
}

TEST(policy_replace_while_used) /* timeout: 60 */
{
    pthread_t a, b, c;
    CHECK_EQ(pthread_create(&a, NULL, policy_replacer, NULL), 0);
    CHECK_EQ(pthread_create(&b, NULL, policy_user, NULL), 0);
    CHECK_EQ(pthread_create(&c, NULL, policy_user, NULL), 0);
    pthread_join(b, NULL);
    pthread_join(c, NULL);
    atomic_store(&race_stop, 1);
    pthread_join(a, NULL);
}

/* ===== Runner ============================================================================= */

struct rstate {
    ca_loop *loop;
    ca_loop *running, *current;
    int outcome; /* 0 result, <0 error, 1 cancel, 2 NULL, 3 other loop's future */
    int called;
    ca_loop *other;
};

static ca_future *rmain(ca_loop *loop, void *arg)
{
    struct rstate *s = arg;
    s->called++;
    s->loop = ca_loop_ref(loop);
    s->running = ca_get_running_loop();
    ca_loop *cur = NULL;
    if (ca_get_event_loop(&cur) == 0) s->current = cur;
    if (s->outcome == 2) return NULL;
    if (s->outcome == 3) {
        ca_future *f = NULL;
        CHECK_OK(ca_future_new(s->other, &f));
        return f;
    }
    ca_future *f = NULL;
    CHECK_OK(ca_future_new(loop, &f));
    if (s->outcome == 0) CHECK_OK(ca_loop_call_later(loop, 0.001, set_res_cb, f, NULL));
    else if (s->outcome == 1) CHECK_OK(ca_loop_call_soon(loop, cancel_cb, f, NULL));
    else CHECK_OK(ca_future_set_error(f, s->outcome));
    return f;
}

TEST(run_outcomes_and_running_loop)
{
    struct rstate s = {.outcome = 0};
    CHECK_ERR(ca_run(rmain, &s, NULL), 0);
    CHECK_EQ(s.called, 1);
    CHECK(s.running == s.loop);
    CHECK(s.current == s.loop);
    CHECK(ca_loop_is_closed(s.loop));
    CHECK(!ca_loop_is_running(s.loop));
    CHECK(ca_get_running_loop() == NULL);
    ca_loop_unref(s.loop);
    struct rstate e = {.outcome = -EPIPE};
    CHECK_ERR(ca_run(rmain, &e, NULL), -EPIPE);
    CHECK(ca_loop_is_closed(e.loop));
    ca_loop_unref(e.loop);
    struct rstate c = {.outcome = 1};
    CHECK_ERR(ca_run(rmain, &c, NULL), -ECANCELED);
    ca_loop_unref(c.loop);
}

/* "NULL counts as an immediate -EINVAL error"; NULL main -EINVAL. */
TEST(run_null_future_and_main)
{
    struct rstate s = {.outcome = 2};
    CHECK_ERR(ca_run(rmain, &s, NULL), -EINVAL);
    CHECK_EQ(s.called, 1);
    CHECK(ca_loop_is_closed(s.loop));
    ca_loop_unref(s.loop);
    CHECK_ERR(ca_run(NULL, NULL, NULL), -EINVAL);
    struct rstate o = {.outcome = 3, .other = new_epoll()};
    CHECK_ERR(ca_run(rmain, &o, NULL), -EINVAL);
    ca_loop_unref(o.loop);
    loop_done(o.other);
}

/* "It refuses (-EBUSY) to run inside a running loop, without calling the factory." */
static int fact_calls;
static int counting_factory(ca_loop **out)
{
    fact_calls++;
    return ca_poll_loop_new(out);
}
static int failing_factory(ca_loop **out)
{
    fact_calls++;
    return -EMFILE;
}
static int null_factory(ca_loop **out)
{
    fact_calls++;
    *out = NULL;
    return 0;
}
static void run_inside_cb(void *arg)
{
    struct rstate s = {.outcome = 0};
    *(int *)arg = ca_run(rmain, &s, counting_factory);
    CHECK_EQ(s.called, 0);
}

TEST(run_inside_running_loop_ebusy)
{
    ca_loop *l = new_epoll();
    int r = 1;
    fact_calls = 0;
    CHECK_OK(ca_loop_call_soon(l, run_inside_cb, &r, NULL));
    run_once(l);
    CHECK_ERR(r, -EBUSY);
    CHECK_EQ(fact_calls, 0);
    loop_done(l);
    /* Also inside a loop entered with enter_running. */
    ca_loop *c = NULL;
    struct spy sp = {0};
    CHECK_OK(ca_loop_new_custom(&spy_ops, &sp, &c));
    CHECK_OK(ca_loop_enter_running(c));
    struct rstate s = {0};
    CHECK_ERR(ca_run(rmain, &s, counting_factory), -EBUSY);
    CHECK_EQ(fact_calls, 0);
    CHECK_OK(ca_loop_exit_running(c));
    loop_done(c);
}

/* The factory is used; its error is returned and main not called; 0 without loop: -EINVAL. */
TEST(run_factory)
{
    struct rstate s = {.outcome = 0};
    fact_calls = 0;
    CHECK_ERR(ca_run(rmain, &s, counting_factory), 0);
    CHECK_EQ(fact_calls, 1);
    CHECK(strcmp(ca_loop_kind(s.loop), "poll") == 0);
    ca_loop_unref(s.loop);
    struct rstate f = {0};
    CHECK_ERR(ca_run(rmain, &f, failing_factory), -EMFILE);
    CHECK_EQ(f.called, 0);
    CHECK_ERR(ca_run(rmain, &f, null_factory), -EINVAL);
    CHECK_EQ(f.called, 0);
}

/* NULL factory: "policy's new_event_loop". */
TEST(run_null_factory_uses_policy)
{
    ca_policy *def = NULL, *p = NULL;
    CHECK_OK(ca_poll_policy_new(&def));
    CHECK_OK(ca_policy_new(&cnt_ops, NULL, def, &p));
    ca_policy_unref(def);
    CHECK_OK(ca_set_event_loop_policy(p));
    ca_policy_unref(p);
    cnt_new = 0;
    struct rstate s = {.outcome = 0};
    CHECK_ERR(ca_run(rmain, &s, NULL), 0);
    CHECK_EQ(cnt_new, 1);
    CHECK(strcmp(ca_loop_kind(s.loop), "poll") == 0);
    ca_loop_unref(s.loop);
}

/* "restores the previous current loop" */
TEST(run_restores_previous_current_loop)
{
    ca_loop *prev = new_epoll();
    CHECK_OK(ca_set_event_loop(prev));
    struct rstate s = {.outcome = 0};
    CHECK_ERR(ca_run(rmain, &s, NULL), 0);
    ca_loop *got = NULL;
    CHECK_OK(ca_get_event_loop(&got));
    CHECK(got == prev);
    ca_loop_unref(s.loop);
    CHECK_OK(ca_set_event_loop(NULL));
    /* None before: none after (-ENOENT, no automatic loop). */
    struct rstate t = {.outcome = 0};
    CHECK_ERR(ca_run(rmain, &t, NULL), 0);
    got = SENT_LOOP;
    CHECK_ERR(ca_get_event_loop(&got), -ENOENT);
    ca_loop_unref(t.loop);
    loop_done(prev);
}

TEST(run_fresh_process_main_thread_enoent_after)
{
    struct rstate t = {.outcome = 0};
    CHECK_ERR(ca_run(rmain, &t, NULL), 0);
    ca_loop *got = SENT_LOOP;
    CHECK_ERR(ca_get_event_loop(&got), -ENOENT);
    CHECK(got == SENT_LOOP);
    ca_loop_unref(t.loop);
}

/* ca_run in another thread: independent. */
static void *run_thread(void *arg)
{
    struct rstate *s = arg;
    s->outcome = ca_run(rmain, s, NULL);
    return NULL;
}

TEST(run_in_thread)
{
    struct rstate s = {.outcome = 0};
    pthread_t t;
    CHECK_EQ(pthread_create(&t, NULL, run_thread, &s), 0);
    pthread_join(t, NULL);
    CHECK_ERR(s.outcome, 0);
    CHECK(s.running == s.loop);
    CHECK(ca_loop_is_closed(s.loop));
    ca_loop_unref(s.loop);
}

/* ca_run attaches the (Safe) watcher in the main thread. */
struct rw {
    ca_child_watcher *w;
    bool active;
};
static ca_future *rmain_w(ca_loop *loop, void *arg)
{
    struct rw *r = arg;
    r->active = ca_child_watcher_is_active(r->w);
    ca_future *f = NULL;
    CHECK_OK(ca_future_new(loop, &f));
    CHECK_OK(ca_future_set_result(f, NULL));
    return f;
}

TEST(run_attaches_watcher_main_thread)
{
    struct rw r = {0};
    CHECK_OK(ca_safe_child_watcher_new(&r.w));
    CHECK_OK(ca_set_child_watcher(r.w));
    CHECK_ERR(ca_run(rmain_w, &r, NULL), 0);
    CHECK(r.active);
    CHECK(!ca_child_watcher_is_active(r.w));
    ca_child_watcher_unref(r.w);
}

/* ===== Child watchers ===================================================================== */

enum { W_THREADED, W_MULTILOOP, W_SAFE, W_FAST, W_PIDFD, W_URING, W_COUNT };
static const char *const wname[W_COUNT] = {"threaded", "multiloop", "safe", "fast", "pidfd",
                                           "uring"};

static int wnew(int k, ca_child_watcher **out)
{
    switch (k) {
    case W_THREADED: return ca_threaded_child_watcher_new(out);
    case W_MULTILOOP: return ca_multiloop_child_watcher_new(out);
    case W_SAFE: return ca_safe_child_watcher_new(out);
    case W_FAST: return ca_fast_child_watcher_new(out);
    case W_URING: return ca_uring_child_watcher_new(out);
    default: return ca_pidfd_child_watcher_new(out);
    }
}

/* A watcher of kind k delivering to loop (current; attached for Safe/Fast); NULL if this kind
 * cannot work here (pidfd without kernel support; Safe/Fast on the signal-less custom loop). */
static ca_child_watcher *wmake(int k, ca_loop *loop)
{
    ca_child_watcher *w = NULL;
    int r = wnew(k, &w);
    if (r == -ENOSYS && (k == W_PIDFD || k == W_URING)) return NULL;
    CHECK_OK(r);
    CHECK_OK(ca_set_event_loop(loop));
    if (k == W_SAFE || k == W_FAST) {
        r = ca_child_watcher_attach_loop(w, loop);
        if (r == -ENOTSUP && strcmp(ca_loop_kind(loop), "custom") == 0) {
            ca_child_watcher_unref(w);
            CHECK_OK(ca_set_event_loop(NULL));
            return NULL;
        }
        CHECK_OK(r);
    }
    CHECK(ca_child_watcher_is_active(w));
    return w;
}

static void wdone(ca_child_watcher *w)
{
    CHECK_OK(ca_child_watcher_close(w));
    ca_child_watcher_unref(w);
    CHECK_OK(ca_set_event_loop(NULL));
}

static pid_t spawn_sh(const char *cmd)
{
    char *argv[] = {"sh", "-c", (char *)cmd, NULL};
    pid_t pid = -1;
    int e = posix_spawn(&pid, "/bin/sh", NULL, NULL, argv, environ);
    if (e) t_fail(__FILE__, __LINE__, "posix_spawn: %s", strerror(e));
    return pid;
}

/* Waits until pid has exited (zombie) or was reaped by somebody else. */
static void wait_exited(pid_t pid)
{
    siginfo_t si;
    memset(&si, 0, sizeof si);
    int r;
    do {
        r = waitid(P_PID, (id_t)pid, &si, WEXITED | WNOWAIT);
    } while (r < 0 && errno == EINTR);
}

/* Reaps pid if it is still ours (after a test that removed its handler). */
static void reap_if_ours(pid_t pid)
{
    int st;
    while (waitpid(pid, &st, 0) < 0 && errno == EINTR) {
    }
}

struct wrec {
    atomic_int n;
    int rc;
    pid_t pid;
    pthread_t thread;
    int tag;
};
static void wrec_cb(pid_t pid, int rc, void *arg)
{
    struct wrec *r = arg;
    r->rc = rc;
    r->pid = pid;
    r->thread = pthread_self();
    atomic_fetch_add(&r->n, 1);
}
static bool wrec_all(void *arg)
{
    struct wrec *r = arg;
    for (int i = 0; r[i].tag >= 0; i++)
        if (atomic_load(&r[i].n) == 0) return false;
    return true;
}

/* "returncode is the exit status, or -signal for a child killed by a signal" ... "called exactly
 * once per registered exit" — every watcher on every loop kind. */
LOOP_TEST(watcher_returncodes_exactly_once)
{
    static const char *cmds[] = {"exit 0", "exit 7", "exit 255", "kill -9 $$", "kill -15 $$"};
    static const int want[] = {0, 7, 255, -9, -15};
    for (int k = 0; k < W_COUNT; k++) {
        ca_child_watcher *w = wmake(k, loop);
        if (!w) continue;
        struct wrec rec[6];
        memset(rec, 0, sizeof rec);
        rec[5].tag = -1;
        pid_t pids[5];
        if (k == W_FAST) CHECK_OK(ca_child_watcher_enter(w));
        for (int i = 0; i < 5; i++) {
            pids[i] = spawn_sh(cmds[i]);
            CHECK_OK(ca_child_watcher_add_child_handler(w, pids[i], wrec_cb, &rec[i]));
        }
        if (k == W_FAST) CHECK_OK(ca_child_watcher_exit(w));
        if (!t_run_until(loop, wrec_all, rec, 5.0))
            t_fail(__FILE__, __LINE__, "%s: not every exit delivered", wname[k]);
        t_run_for(loop, 0.03);
        for (int i = 0; i < 5; i++) {
            if (atomic_load(&rec[i].n) != 1 || rec[i].rc != want[i] || rec[i].pid != pids[i])
                t_fail(__FILE__, __LINE__, "%s: child %d: n=%d rc=%d (want %d)", wname[k], i,
                       atomic_load(&rec[i].n), rec[i].rc, want[i]);
        }
        wdone(w);
    }
}

/* "255 when the status could not be read (ECHILD)" */
static void quiet_log(int level, const char *msg, void *arg)
{
    if (arg) atomic_fetch_add((atomic_int *)arg, 1);
}

TEST(watcher_echild_gives_255)
{
    static struct logrec lr;
    ca_set_log_handler(rec_log, &lr);
    ca_loop *l = new_epoll();
    int kinds[] = {W_THREADED, W_MULTILOOP, W_SAFE, W_PIDFD, W_URING};
    for (int i = 0; i < 5; i++) {
        int k = kinds[i];
        ca_child_watcher *w = wmake(k, l);
        if (!w) continue;
        pid_t pid = spawn_sh("exit 3");
        reap_if_ours(pid); /* status gone: the watcher gets ECHILD */
        struct wrec rec[2];
        memset(rec, 0, sizeof rec);
        rec[1].tag = -1;
        int r = ca_child_watcher_add_child_handler(w, pid, wrec_cb, &rec[0]);
        if (r < 0) t_fail(__FILE__, __LINE__, "%s: add_child_handler: %d", wname[k], r);
        if (!t_run_until(l, wrec_all, rec, 3.0))
            t_fail(__FILE__, __LINE__, "%s: no callback for a pid already reaped", wname[k]);
        t_run_for(l, 0.02);
        if (atomic_load(&rec[0].n) != 1 || rec[0].rc != 255)
            t_fail(__FILE__, __LINE__, "%s: n=%d rc=%d, want 1 call with 255", wname[k],
                   atomic_load(&rec[0].n), rec[0].rc);
        /* asyncio: logger.warning("Unknown child process pid %d, will report returncode 255") */
        if (atomic_load(&lr.n) < 1 || lr.level != CA_LOG_WARNING)
            t_fail(__FILE__, __LINE__, "%s: %d log calls, level %d", wname[k], atomic_load(&lr.n), lr.level);
        atomic_store(&lr.n, 0);
        wdone(w);
    }
    loop_done(l);
}

/* "a callback that was removed is never called, for every watcher (stricter than asyncio's
 * Threaded)"; remove returns 1 removed / 0 nothing. */
LOOP_TEST(watcher_removed_callback_never_called)
{
    ca_set_log_handler(quiet_log, NULL);
    for (int k = 0; k < W_COUNT; k++) {
        ca_child_watcher *w = wmake(k, loop);
        if (!w) continue;
        struct wrec rec = {0};
        /* Removed before the exit. */
        pid_t pid = spawn_sh("sleep 0.05");
        CHECK_OK(ca_child_watcher_add_child_handler(w, pid, wrec_cb, &rec));
        CHECK_EQ(ca_child_watcher_remove_child_handler(w, pid), 1);
        CHECK_EQ(ca_child_watcher_remove_child_handler(w, pid), 0);
        wait_exited(pid);
        t_run_for(loop, 0.05);
        if (atomic_load(&rec.n) != 0) t_fail(__FILE__, __LINE__, "%s: removed callback called", wname[k]);
        if (k != W_FAST && k != W_THREADED) reap_if_ours(pid);
        else waitpid(pid, NULL, WNOHANG);
        /* Removed after the exit, before the loop delivered it. */
        pid = spawn_sh("exit 1");
        CHECK_OK(ca_child_watcher_add_child_handler(w, pid, wrec_cb, &rec));
        wait_exited(pid);
        sleep_s(0.05); /* a waiting thread has reaped and posted by now */
        int r = ca_child_watcher_remove_child_handler(w, pid);
        CHECK(r == 0 || r == 1);
        t_run_for(loop, 0.05);
        if (r == 1 && atomic_load(&rec.n) != 0)
            t_fail(__FILE__, __LINE__, "%s: callback removed after the exit was called", wname[k]);
        waitpid(pid, NULL, WNOHANG);
        CHECK_EQ(ca_child_watcher_remove_child_handler(w, 12345678), 0);
        wdone(w);
    }
}

/* "Specifying another callback for the same process replaces the previous handler." */
LOOP_TEST(watcher_add_replaces)
{
    for (int k = 0; k < W_COUNT; k++) {
        ca_child_watcher *w = wmake(k, loop);
        if (!w) continue;
        struct wrec a[2], b[2];
        memset(a, 0, sizeof a);
        memset(b, 0, sizeof b);
        a[1].tag = b[1].tag = -1;
        pid_t pid = spawn_sh("sleep 0.02; exit 4");
        CHECK_OK(ca_child_watcher_add_child_handler(w, pid, wrec_cb, &a[0]));
        CHECK_OK(ca_child_watcher_add_child_handler(w, pid, wrec_cb, &b[0]));
        if (!t_run_until(loop, wrec_all, b, 5.0)) t_fail(__FILE__, __LINE__, "%s: not delivered", wname[k]);
        t_run_for(loop, 0.03);
        if (atomic_load(&a[0].n) != 0 || atomic_load(&b[0].n) != 1 || b[0].rc != 4)
            t_fail(__FILE__, __LINE__, "%s: a=%d b=%d rc=%d", wname[k], atomic_load(&a[0].n),
                   atomic_load(&b[0].n), b[0].rc);
        wdone(w);
    }
}

/* A child that exited before its handler was added is still delivered once (all but Fast
 * outside enter/exit). */
LOOP_TEST(watcher_exit_before_add)
{
    for (int k = 0; k < W_COUNT; k++) {
        if (k == W_FAST) continue;
        ca_child_watcher *w = wmake(k, loop);
        if (!w) continue;
        struct wrec rec[2];
        memset(rec, 0, sizeof rec);
        rec[1].tag = -1;
        pid_t pid = spawn_sh("exit 9");
        wait_exited(pid);
        t_run_for(loop, 0.02);
        CHECK_OK(ca_child_watcher_add_child_handler(w, pid, wrec_cb, &rec[0]));
        if (!t_run_until(loop, wrec_all, rec, 5.0)) t_fail(__FILE__, __LINE__, "%s: not delivered", wname[k]);
        CHECK_EQ(rec[0].rc, 9);
        wdone(w);
    }
}

/* Many children exiting at once (SIGCHLD coalescing): each exactly once. */
LOOP_TEST(watcher_many_at_once)
{
    enum { N = 12 };
    for (int k = 0; k < W_COUNT; k++) {
        ca_child_watcher *w = wmake(k, loop);
        if (!w) continue;
        struct wrec rec[N + 1];
        memset(rec, 0, sizeof rec);
        rec[N].tag = -1;
        if (k == W_FAST) CHECK_OK(ca_child_watcher_enter(w));
        for (int i = 0; i < N; i++) {
            pid_t pid = spawn_sh("exit 5");
            CHECK_OK(ca_child_watcher_add_child_handler(w, pid, wrec_cb, &rec[i]));
        }
        if (k == W_FAST) CHECK_OK(ca_child_watcher_exit(w));
        if (!t_run_until(loop, wrec_all, rec, 10.0)) t_fail(__FILE__, __LINE__, "%s: lost exits", wname[k]);
        t_run_for(loop, 0.02);
        for (int i = 0; i < N; i++) {
            CHECK_EQ(atomic_load(&rec[i].n), 1);
            CHECK_EQ(rec[i].rc, 5);
        }
        wdone(w);
    }
}

/* is_active: "Threaded and Pidfd always; MultiLoop from creation until close; Safe and Fast
 * while attached to a loop that is not closed; otherwise add_child_handler gives -ENOTCONN." */
TEST(watcher_is_active_rules)
{
    for (int k = 0; k < W_COUNT; k++) {
        ca_child_watcher *w = NULL;
        int r = wnew(k, &w);
        if (r == -ENOSYS && (k == W_PIDFD || k == W_URING)) continue;
        CHECK_OK(r);
        bool attach_needed = k == W_SAFE || k == W_FAST;
        if (ca_child_watcher_is_active(w) != !attach_needed)
            t_fail(__FILE__, __LINE__, "%s: is_active after new", wname[k]);
        ca_loop *l = new_epoll();
        if (attach_needed) {
            pid_t dummy = spawn_sh("exit 0");
            CHECK_ERR(ca_child_watcher_add_child_handler(w, dummy, wrec_cb, NULL), -ENOTCONN);
            reap_if_ours(dummy);
        }
        CHECK_OK(ca_child_watcher_attach_loop(w, l));
        if (!ca_child_watcher_is_active(w)) t_fail(__FILE__, __LINE__, "%s: attached", wname[k]);
        CHECK_OK(ca_child_watcher_attach_loop(w, NULL));
        if (ca_child_watcher_is_active(w) != !attach_needed)
            t_fail(__FILE__, __LINE__, "%s: after attach(NULL)", wname[k]);
        CHECK_OK(ca_child_watcher_attach_loop(w, l));
        CHECK_OK(ca_loop_close(l));
        if (ca_child_watcher_is_active(w) != !attach_needed)
            t_fail(__FILE__, __LINE__, "%s: attached to a closed loop", wname[k]);
        if (attach_needed) {
            pid_t dummy = spawn_sh("exit 0");
            CHECK_ERR(ca_child_watcher_add_child_handler(w, dummy, wrec_cb, NULL), -ENOTCONN);
            reap_if_ours(dummy);
        }
        CHECK_OK(ca_child_watcher_close(w));
        if (ca_child_watcher_is_active(w)) t_fail(__FILE__, __LINE__, "%s: closed", wname[k]);
        ca_child_watcher_unref(w);
        ca_loop_unref(l);
    }
}

/* "A closed watcher gives -EBADF to everything but close/unref"; bad arguments -EINVAL
 * first. */
TEST(watcher_closed_ebadf_and_bad_args)
{
    ca_loop *l = new_epoll();
    for (int k = 0; k < W_COUNT; k++) {
        ca_child_watcher *w = NULL;
        int r = wnew(k, &w);
        if (r == -ENOSYS && (k == W_PIDFD || k == W_URING)) continue;
        CHECK_OK(r);
        CHECK_ERR(ca_child_watcher_add_child_handler(w, 0, wrec_cb, NULL), -EINVAL);
        CHECK_ERR(ca_child_watcher_add_child_handler(w, -5, wrec_cb, NULL), -EINVAL);
        CHECK_ERR(ca_child_watcher_add_child_handler(w, getpid(), NULL, NULL), -EINVAL);
        CHECK_ERR(ca_child_watcher_remove_child_handler(w, 0), -EINVAL);
        CHECK_ERR(ca_child_watcher_remove_child_handler(w, -1), -EINVAL);
        CHECK_OK(ca_child_watcher_close(w));
        CHECK_OK(ca_child_watcher_close(w));
        CHECK_ERR(ca_child_watcher_add_child_handler(w, getpid(), wrec_cb, NULL), -EBADF);
        CHECK_ERR(ca_child_watcher_remove_child_handler(w, getpid()), -EBADF);
        CHECK_ERR(ca_child_watcher_attach_loop(w, l), -EBADF);
        CHECK_ERR(ca_child_watcher_attach_loop(w, NULL), -EBADF);
        CHECK_ERR(ca_child_watcher_enter(w), -EBADF);
        CHECK_ERR(ca_child_watcher_exit(w), -EBADF);
        CHECK(!ca_child_watcher_is_active(w));
        /* bad argument before closed */
        CHECK_ERR(ca_child_watcher_add_child_handler(w, 0, wrec_cb, NULL), -EINVAL);
        CHECK_ERR(ca_child_watcher_add_child_handler(w, 5, NULL, NULL), -EINVAL);
        CHECK_ERR(ca_child_watcher_remove_child_handler(w, -1), -EINVAL);
        ca_child_watcher_unref(w);
    }
    CHECK_ERR(ca_child_watcher_add_child_handler(NULL, 5, wrec_cb, NULL), -EINVAL);
    CHECK_ERR(ca_child_watcher_remove_child_handler(NULL, 5), -EINVAL);
    CHECK_ERR(ca_child_watcher_attach_loop(NULL, l), -EINVAL);
    CHECK(!ca_child_watcher_is_active(NULL));
    CHECK_ERR(ca_child_watcher_close(NULL), -EINVAL);
    CHECK_ERR(ca_child_watcher_enter(NULL), -EINVAL);
    CHECK_ERR(ca_child_watcher_exit(NULL), -EINVAL);
    CHECK(ca_child_watcher_data(NULL) == NULL);
    loop_done(l);
}

/* Threaded, MultiLoop, Pidfd: "with neither [running nor current loop], add_child_handler gives
 * -ENOENT". In a thread with no loop. */
struct noloop {
    ca_child_watcher *w;
    pid_t pid;
    int r;
};
static void *noloop_thread(void *arg)
{
    struct noloop *n = arg;
    n->r = ca_child_watcher_add_child_handler(n->w, n->pid, wrec_cb, NULL);
    return NULL;
}

TEST(watcher_no_delivery_loop_enoent)
{
    int kinds[] = {W_THREADED, W_MULTILOOP, W_PIDFD, W_URING};
    for (int i = 0; i < 4; i++) {
        ca_child_watcher *w = NULL;
        int r = wnew(kinds[i], &w);
        if (r == -ENOSYS) continue;
        CHECK_OK(r);
        pid_t pid = spawn_sh("sleep 0.05");
        struct noloop n = {w, pid, 1};
        pthread_t t;
        CHECK_EQ(pthread_create(&t, NULL, noloop_thread, &n), 0);
        pthread_join(t, NULL);
        if (n.r != -ENOENT) t_fail(__FILE__, __LINE__, "%s: got %d, want -ENOENT", wname[kinds[i]], n.r);
        CHECK_OK(ca_child_watcher_close(w));
        ca_child_watcher_unref(w);
        reap_if_ours(pid);
    }
}

/* Threaded, MultiLoop, Pidfd "deliver to the loop running in the thread that added the handler,
 * or, when none runs there, to that thread's current loop". A thread runs its own loop and
 * adds the handler from a callback: the exit comes through that loop. */
struct tdeliv {
    ca_child_watcher *w;
    ca_loop *loop;
    struct wrec rec[2];
    int add_r;
    pid_t pid;
    pthread_t self;
    ca_loop *cb_running;
};
static void tdeliv_cb(pid_t pid, int rc, void *arg)
{
    struct tdeliv *d = arg;
    d->cb_running = ca_get_running_loop();
    wrec_cb(pid, rc, &d->rec[0]);
}
static void tdeliv_add(void *arg)
{
    struct tdeliv *d = arg;
    d->add_r = ca_child_watcher_add_child_handler(d->w, d->pid, tdeliv_cb, d);
}
static void *tdeliv_thread(void *arg)
{
    struct tdeliv *d = arg;
    d->self = pthread_self();
    CHECK_OK(ca_loop_call_soon(d->loop, tdeliv_add, d, NULL));
    t_run_until(d->loop, wrec_all, d->rec, 5.0);
    return NULL;
}

TEST(watcher_delivery_to_running_loop_of_adding_thread)
{
    int kinds[] = {W_THREADED, W_MULTILOOP, W_PIDFD, W_URING};
    for (int i = 0; i < 4; i++) {
        struct tdeliv d;
        memset(&d, 0, sizeof d);
        d.rec[1].tag = -1;
        int r = wnew(kinds[i], &d.w);
        if (r == -ENOSYS) continue;
        CHECK_OK(r);
        CHECK_OK(ca_poll_loop_new(&d.loop));
        d.pid = spawn_sh("sleep 0.02; exit 6");
        pthread_t t;
        CHECK_EQ(pthread_create(&t, NULL, tdeliv_thread, &d), 0);
        pthread_join(t, NULL);
        CHECK_OK(d.add_r);
        if (atomic_load(&d.rec[0].n) != 1 || d.rec[0].rc != 6)
            t_fail(__FILE__, __LINE__, "%s: n=%d rc=%d", wname[kinds[i]], atomic_load(&d.rec[0].n), d.rec[0].rc);
        CHECK_OK(ca_child_watcher_close(d.w));
        ca_child_watcher_unref(d.w);
        loop_done(d.loop);
    }
}

/* "Callbacks never run inside a signal handler ... Threaded, MultiLoop and Pidfd deliver to the
 * loop running in the thread that added the handler." API.md also says Threaded "calls them
 * from the child's waiting thread" and MultiLoop "from its own reaping thread"; the two
 * sentences cannot both hold. We follow the delivery sentence, issue 4 ("delivered ... via
 * ca_loop_call_soon_threadsafe") and CPython 3.11, as the header documents: those threads only
 * reap, and every callback runs on a loop's thread, never in a signal handler. */
TEST(watcher_callbacks_run_on_a_loop_thread)
{
    ca_loop *l = new_epoll();
    pthread_t me = pthread_self();
    for (int k = 0; k < W_COUNT; k++) {
        ca_child_watcher *w = wmake(k, l);
        if (!w) continue;
        struct wrec rec[2];
        memset(rec, 0, sizeof rec);
        rec[1].tag = -1;
        pid_t pid = spawn_sh("exit 0");
        CHECK_OK(ca_child_watcher_add_child_handler(w, pid, wrec_cb, &rec[0]));
        CHECK(t_run_until(l, wrec_all, rec, 5.0));
        bool on_loop_thread = pthread_equal(rec[0].thread, me);
        bool want_loop_thread = true;
        if (on_loop_thread != want_loop_thread)
            t_fail(__FILE__, __LINE__, "%s: callback ran %s the loop's thread", wname[k],
                   on_loop_thread ? "on" : "off");
        wdone(w);
    }
    loop_done(l);
}

/* Safe and Fast: callbacks from the attached loop's thread (loop in another thread). */
struct attthr {
    ca_loop *loop;
    ca_child_watcher *w;
    struct wrec rec[2];
    pid_t pid;
    int add_r;
};
static void att_add(void *arg)
{
    struct attthr *a = arg;
    a->add_r = ca_child_watcher_add_child_handler(a->w, a->pid, wrec_cb, &a->rec[0]);
}
static void *att_thread(void *arg)
{
    struct attthr *a = arg;
    CHECK_OK(ca_child_watcher_attach_loop(a->w, a->loop));
    CHECK_OK(ca_loop_call_soon(a->loop, att_add, a, NULL));
    t_run_until(a->loop, wrec_all, a->rec, 5.0);
    CHECK_OK(ca_child_watcher_attach_loop(a->w, NULL));
    return NULL;
}

TEST(watcher_safe_fast_attached_loop_thread)
{
    for (int k = W_SAFE; k <= W_FAST; k++) {
        struct attthr a;
        memset(&a, 0, sizeof a);
        a.rec[1].tag = -1;
        CHECK_OK(wnew(k, &a.w));
        a.loop = new_epoll();
        a.pid = spawn_sh("sleep 0.02; exit 2");
        pthread_t t;
        CHECK_EQ(pthread_create(&t, NULL, att_thread, &a), 0);
        pthread_join(t, NULL);
        CHECK_OK(a.add_r);
        CHECK_EQ(atomic_load(&a.rec[0].n), 1);
        CHECK_EQ(a.rec[0].rc, 2);
        CHECK(pthread_equal(a.rec[0].thread, t));
        CHECK_OK(ca_child_watcher_close(a.w));
        ca_child_watcher_unref(a.w);
        loop_done(a.loop);
    }
}

/* ca_child_watcher_attach_loop takes its own reference to the loop. */
TEST(watcher_attach_loop_takes_reference)
{
    for (int k = W_SAFE; k <= W_FAST; k++) {
        ca_child_watcher *w = NULL;
        CHECK_OK(wnew(k, &w));
        ca_loop *l = new_epoll();
        CHECK_OK(ca_child_watcher_attach_loop(w, l));
        ca_loop_unref(l); /* the watcher holds it */
        CHECK(ca_child_watcher_is_active(w));
        struct wrec rec[2];
        memset(rec, 0, sizeof rec);
        rec[1].tag = -1;
        pid_t pid = spawn_sh("exit 1");
        CHECK_OK(ca_child_watcher_add_child_handler(w, pid, wrec_cb, &rec[0]));
        CHECK(t_run_until(l, wrec_all, rec, 5.0));
        CHECK_EQ(rec[0].rc, 1);
        CHECK_OK(ca_child_watcher_close(w));
        ca_child_watcher_unref(w);
    }
}

/* Fast: "keeps exit statuses that arrive before registration while inside enter/exit". */
TEST(watcher_fast_enter_exit_keeps_status)
{
    ca_loop *l = new_epoll();
    ca_child_watcher *w = wmake(W_FAST, l);
    CHECK_OK(ca_child_watcher_enter(w));
    pid_t pid = spawn_sh("exit 12");
    wait_exited(pid);
    t_run_for(l, 0.05); /* SIGCHLD handled: Fast has reaped it */
    struct wrec rec[2];
    memset(rec, 0, sizeof rec);
    rec[1].tag = -1;
    CHECK_OK(ca_child_watcher_add_child_handler(w, pid, wrec_cb, &rec[0]));
    CHECK_OK(ca_child_watcher_exit(w));
    CHECK(t_run_until(l, wrec_all, rec, 3.0));
    CHECK_EQ(rec[0].rc, 12);
    t_run_for(l, 0.02);
    CHECK_EQ(atomic_load(&rec[0].n), 1);
    wdone(w);
    loop_done(l);
}

/* Fast outside enter/exit: "an exit reaped before the registration is logged as an unknown pid
 * and lost", but registration still "works" for a child that exits later. */

TEST(watcher_fast_outside_enter_unknown_pid_logged)
{
    static struct logrec lr;
    ca_set_log_handler(rec_log, &lr);
    ca_loop *l = new_epoll();
    ca_child_watcher *w = wmake(W_FAST, l);
    pid_t pid = spawn_sh("exit 12");
    wait_exited(pid);
    CHECK(t_run_until(l, t_flag_set, &lr.n, 3.0));
    CHECK(strstr(lr.last, "unknown") != NULL || strstr(lr.last, "Unknown") != NULL);
    CHECK_EQ(lr.level, CA_LOG_WARNING); /* asyncio: logger.warning */
    struct wrec rec = {0};
    CHECK_OK(ca_child_watcher_add_child_handler(w, pid, wrec_cb, &rec));
    t_run_for(l, 0.05);
    CHECK_EQ(atomic_load(&rec.n), 0);
    /* A later child, registered outside enter/exit, is still delivered. */
    struct wrec r2[2];
    memset(r2, 0, sizeof r2);
    r2[1].tag = -1;
    pid_t p2 = spawn_sh("sleep 0.05; exit 3");
    CHECK_OK(ca_child_watcher_add_child_handler(w, p2, wrec_cb, &r2[0]));
    CHECK(t_run_until(l, wrec_all, r2, 3.0));
    CHECK_EQ(r2[0].rc, 3);
    wdone(w);
    loop_done(l);
}

/* Fast: statuses kept inside enter/exit for which no handler came are dropped at exit, with a
 * log ("exit statuses dropped"). */
TEST(watcher_fast_dropped_statuses_logged)
{
    static struct logrec lr;
    ca_set_log_handler(rec_log, &lr);
    ca_loop *l = new_epoll();
    ca_child_watcher *w = wmake(W_FAST, l);
    CHECK_OK(ca_child_watcher_enter(w));
    pid_t pid = spawn_sh("exit 4");
    wait_exited(pid);
    t_run_for(l, 0.05);
    CHECK_EQ(atomic_load(&lr.n), 0);
    CHECK_OK(ca_child_watcher_exit(w));
    t_run_for(l, 0.01);
    CHECK(atomic_load(&lr.n) >= 1);
    CHECK_EQ(lr.level, CA_LOG_WARNING);
    wdone(w);
    loop_done(l);
}

/* Log: "a child's loop closed before its exit was delivered". */
TEST(watcher_log_loop_closed_before_delivery)
{
    int kinds[] = {W_THREADED, W_MULTILOOP, W_PIDFD, W_URING};
    for (int i = 0; i < 4; i++) {
        static struct logrec lr;
        memset(&lr, 0, sizeof lr);
        ca_set_log_handler(rec_log, &lr);
        ca_loop *l = new_epoll();
        ca_child_watcher *w = wmake(kinds[i], l);
        if (!w) {
            loop_done(l);
            continue;
        }
        struct wrec rec = {0};
        pid_t pid = spawn_sh("sleep 0.05");
        CHECK_OK(ca_child_watcher_add_child_handler(w, pid, wrec_cb, &rec));
        CHECK_OK(ca_set_event_loop(NULL));
        CHECK_OK(ca_loop_close(l));
        wait_exited(pid);
        for (int j = 0; j < 100 && atomic_load(&lr.n) == 0; j++) sleep_s(0.01);
        if (atomic_load(&lr.n) < 1)
            t_fail(__FILE__, __LINE__, "%s: no log line for an exit whose loop closed", wname[kinds[i]]);
        /* asyncio's Threaded and MultiLoop: logger.warning("Loop %r that handles pid %r is
         * closed"); its Pidfd logs nothing (here: anything goes). */
        if (kinds[i] != W_PIDFD && kinds[i] != W_URING && lr.level != CA_LOG_WARNING)
            t_fail(__FILE__, __LINE__, "%s: level %d, want CA_LOG_WARNING: %s", wname[kinds[i]],
                   lr.level, lr.last);
        CHECK_EQ(atomic_load(&rec.n), 0);
        CHECK_OK(ca_child_watcher_close(w));
        ca_child_watcher_unref(w);
        ca_loop_unref(l);
        waitpid(pid, NULL, WNOHANG); /* pidfd: the removed child is ours to reap */
    }
}

/* "the default handler writes one line to stderr, and NULL silences it" */
static int capture_stderr_begin(int *saved)
{
    int p[2];
    CHECK_EQ(pipe2(p, O_CLOEXEC | O_NONBLOCK), 0);
    fflush(stderr);
    *saved = dup(2);
    dup2(p[1], 2);
    close(p[1]);
    return p[0];
}
static size_t capture_stderr_end(int rfd, int saved, char *buf, size_t n)
{
    fflush(stderr);
    dup2(saved, 2);
    close(saved);
    ssize_t k = read(rfd, buf, n - 1);
    close(rfd);
    if (k < 0) k = 0;
    buf[k] = 0;
    return (size_t)k;
}

static void fast_unknown_pid(void)
{
    ca_loop *l = new_epoll();
    ca_child_watcher *w = wmake(W_FAST, l);
    pid_t pid = spawn_sh("exit 12");
    wait_exited(pid);
    t_run_for(l, 0.1);
    wdone(w);
    loop_done(l);
}

TEST(log_default_handler_one_line_stderr)
{
    int saved;
    int rfd = capture_stderr_begin(&saved);
    fast_unknown_pid();
    char buf[4096];
    size_t n = capture_stderr_end(rfd, saved, buf, sizeof buf);
    int lines = 0;
    for (size_t i = 0; i < n; i++) lines += buf[i] == '\n';
    if (lines != 1) t_fail(__FILE__, __LINE__, "default handler wrote %d lines: [%s]", lines, buf);
    CHECK(n > 1 && buf[n - 1] == '\n');
}

TEST(log_null_handler_silences)
{
    ca_set_log_handler(NULL, NULL);
    int saved;
    int rfd = capture_stderr_begin(&saved);
    fast_unknown_pid();
    char buf[4096];
    size_t n = capture_stderr_end(rfd, saved, buf, sizeof buf);
    if (n != 0) t_fail(__FILE__, __LINE__, "NULL handler still wrote: [%s]", buf);
}

/* MultiLoop: "usable from any thread" — handlers added from two threads with their own loops. */
static void *ml_thread(void *arg)
{
    struct tdeliv *d = arg;
    CHECK_OK(ca_set_event_loop(d->loop));
    d->add_r = ca_child_watcher_add_child_handler(d->w, d->pid, tdeliv_cb, d);
    if (d->add_r == 0) t_run_until(d->loop, wrec_all, d->rec, 5.0);
    CHECK_OK(ca_set_event_loop(NULL));
    return NULL;
}

TEST(watcher_multiloop_any_thread_current_loop)
{
    ca_child_watcher *w = NULL;
    CHECK_OK(ca_multiloop_child_watcher_new(&w));
    struct tdeliv d[2];
    memset(d, 0, sizeof d);
    pthread_t t[2];
    for (int i = 0; i < 2; i++) {
        d[i].w = w;
        d[i].rec[1].tag = -1;
        d[i].loop = new_epoll();
        d[i].pid = spawn_sh(i ? "exit 1" : "exit 2");
        CHECK_EQ(pthread_create(&t[i], NULL, ml_thread, &d[i]), 0);
    }
    for (int i = 0; i < 2; i++) {
        pthread_join(t[i], NULL);
        CHECK_OK(d[i].add_r);
        CHECK_EQ(atomic_load(&d[i].rec[0].n), 1);
        CHECK_EQ(d[i].rec[0].rc, i ? 1 : 2);
        CHECK(d[i].cb_running == d[i].loop);
        loop_done(d[i].loop);
    }
    CHECK_OK(ca_child_watcher_close(w));
    ca_child_watcher_unref(w);
}

/* Custom watchers: "the public functions check arguments and the closed state before calling
 * an op". */
struct cw {
    int calls, closes, destroyed;
    bool active;
};
#define CW(self) ((struct cw *)ca_child_watcher_data(self))
static int cw_add(ca_child_watcher *self, pid_t pid, ca_child_fn cb, void *arg)
{
    CW(self)->calls++;
    return 0;
}
static int cw_rm(ca_child_watcher *self, pid_t pid)
{
    CW(self)->calls++;
    return 1;
}
static int cw_attach(ca_child_watcher *self, ca_loop *loop)
{
    CW(self)->calls++;
    return 0;
}
static bool cw_active(ca_child_watcher *self) { return CW(self)->active; }
static int cw_close(ca_child_watcher *self)
{
    CW(self)->closes++;
    return 0;
}
static int cw_enter(ca_child_watcher *self)
{
    CW(self)->calls++;
    return 0;
}
static void cw_destroy(ca_child_watcher *self) { CW(self)->destroyed++; }
static const ca_child_watcher_ops cw_ops = {
    .add_child_handler = cw_add,
    .remove_child_handler = cw_rm,
    .attach_loop = cw_attach,
    .is_active = cw_active,
    .close = cw_close,
    .enter = cw_enter,
    .exit = cw_enter,
    .destroy = cw_destroy,
};

TEST(watcher_custom_checks_before_ops)
{
    ca_child_watcher *w = SENT_W;
    CHECK_ERR(ca_child_watcher_new_custom(NULL, NULL, &w), -EINVAL);
    CHECK(w == SENT_W);
    CHECK_ERR(ca_child_watcher_new_custom(&cw_ops, NULL, NULL), -EINVAL);
    struct cw c = {.active = true};
    CHECK_OK(ca_child_watcher_new_custom(&cw_ops, &c, &w));
    CHECK(ca_child_watcher_data(w) == &c);
    CHECK_ERR(ca_child_watcher_add_child_handler(w, 0, wrec_cb, NULL), -EINVAL);
    CHECK_ERR(ca_child_watcher_add_child_handler(w, 1, NULL, NULL), -EINVAL);
    CHECK_ERR(ca_child_watcher_remove_child_handler(w, -2), -EINVAL);
    CHECK_EQ(c.calls, 0);
    CHECK_OK(ca_child_watcher_add_child_handler(w, 1, wrec_cb, NULL));
    CHECK_EQ(ca_child_watcher_remove_child_handler(w, 1), 1);
    CHECK_OK(ca_child_watcher_attach_loop(w, NULL));
    CHECK_OK(ca_child_watcher_enter(w));
    CHECK_OK(ca_child_watcher_exit(w));
    CHECK_EQ(c.calls, 5);
    CHECK(ca_child_watcher_is_active(w));
    CHECK_OK(ca_child_watcher_close(w));
    CHECK_EQ(c.closes, 1);
    CHECK_OK(ca_child_watcher_close(w));
    CHECK_EQ(c.closes, 1);
    c.calls = 0;
    CHECK_ERR(ca_child_watcher_add_child_handler(w, 1, wrec_cb, NULL), -EBADF);
    CHECK_ERR(ca_child_watcher_remove_child_handler(w, 1), -EBADF);
    CHECK_ERR(ca_child_watcher_attach_loop(w, NULL), -EBADF);
    CHECK_ERR(ca_child_watcher_enter(w), -EBADF);
    CHECK_ERR(ca_child_watcher_exit(w), -EBADF);
    CHECK(!ca_child_watcher_is_active(w));
    CHECK_EQ(c.calls, 0);
    ca_child_watcher_unref(w);
    CHECK_EQ(c.destroyed, 1);
}

/* A custom watcher as the policy's: set_child_watcher takes a reference, closes it when
 * replaced. */
TEST(watcher_custom_in_policy)
{
    struct cw c = {.active = true};
    ca_child_watcher *w = NULL;
    CHECK_OK(ca_child_watcher_new_custom(&cw_ops, &c, &w));
    CHECK_OK(ca_set_child_watcher(w));
    ca_child_watcher_unref(w);
    CHECK_EQ(c.destroyed, 0);
    ca_child_watcher *got = NULL;
    CHECK_OK(ca_get_child_watcher(&got));
    CHECK(got == w);
    CHECK_OK(ca_set_child_watcher(NULL));
    CHECK_EQ(c.closes, 1);
    CHECK_EQ(c.destroyed, 1);
}

/* ===== Subprocesses ======================================================================= */

struct pstat {
    ca_loop *loop;
    char out[4096], err[4096];
    size_t nout, nerr;
    int lost[3];
    int lost_err[3];
    int exited;
    int wrong_loop;
    int after_close;
    bool closing;
};
static void p_data(ca_process *p, int fd, const void *buf, size_t n, void *arg)
{
    struct pstat *s = arg;
    if (s->closing) s->after_close++;
    if (ca_get_running_loop() != s->loop) s->wrong_loop++;
    if (fd == 1 && s->nout + n < sizeof s->out) {
        memcpy(s->out + s->nout, buf, n);
        s->nout += n;
    } else if (fd == 2 && s->nerr + n < sizeof s->err) {
        memcpy(s->err + s->nerr, buf, n);
        s->nerr += n;
    } else if (fd != 1 && fd != 2) {
        s->wrong_loop += 100;
    }
}
static void p_lost(ca_process *p, int fd, int err, void *arg)
{
    struct pstat *s = arg;
    if (s->closing) s->after_close++;
    if (ca_get_running_loop() != s->loop) s->wrong_loop++;
    if (fd >= 0 && fd <= 2) {
        s->lost[fd]++;
        s->lost_err[fd] = err;
    }
}
static void p_exited(ca_process *p, void *arg)
{
    struct pstat *s = arg;
    if (s->closing) s->after_close++;
    if (ca_get_running_loop() != s->loop) s->wrong_loop++;
    s->exited++;
}
static const ca_subprocess_protocol pproto = {p_data, p_lost, p_exited};

/* Runs until proc's wait future is done; returns the returncode. */
static int pwait(ca_loop *loop, ca_process *p)
{
    ca_future *f = NULL;
    CHECK_OK(ca_process_wait(p, &f));
    int r = ca_loop_run_until_complete(loop, f);
    CHECK_ERR(r, 0);
    void *res = NULL;
    CHECK_OK(ca_future_result(f, &res));
    ca_future_unref(f);
    int rc = -1000;
    CHECK_OK(ca_process_returncode(p, &rc));
    CHECK_EQ((int)(intptr_t)res, rc);
    return rc;
}

/* Basic: pipes, protocol callbacks on loop, returncode, wait result (every loop kind). */
LOOP_TEST(proc_pipes_protocol_and_wait)
{
    const char *argv[] = {"sh", "-c", "read x; echo out:$x; echo err >&2; exit 3", NULL};
    ca_subprocess_options o = {.argv = argv, .stdin_mode = CA_PIPE, .stdout_mode = CA_PIPE,
                               .stderr_mode = CA_PIPE};
    struct pstat s = {.loop = loop};
    ca_process *p = NULL;
    CHECK_OK(ca_loop_subprocess_exec(loop, &o, &pproto, &s, &p));
    CHECK(ca_process_pid(p) > 0);
    int rc = 1234;
    CHECK_ERR(ca_process_returncode(p, &rc), -EAGAIN);
    CHECK_EQ(rc, 1234);
    CHECK_OK(ca_process_write(p, "hi\n", 3));
    CHECK_OK(ca_process_close_stdin(p));
    CHECK_EQ(pwait(loop, p), 3);
    CHECK(s.nout == 7 && memcmp(s.out, "out:hi\n", 7) == 0);
    CHECK(s.nerr == 4 && memcmp(s.err, "err\n", 4) == 0);
    CHECK_EQ(s.lost[0], 1);
    CHECK_EQ(s.lost[1], 1);
    CHECK_EQ(s.lost[2], 1);
    CHECK_EQ(s.exited, 1);
    CHECK_EQ(s.wrong_loop, 0);
    /* Already done: a new wait completes "at once, through the loop". */
    ca_future *f = NULL, *g = NULL;
    CHECK_OK(ca_process_wait(p, &f));
    CHECK_OK(ca_process_wait(p, &g));
    run_once(loop);
    CHECK(ca_future_done(f) && ca_future_done(g));
    void *res = NULL;
    CHECK_OK(ca_future_result(f, &res));
    CHECK_EQ((intptr_t)res, 3);
    ca_future_unref(f);
    ca_future_unref(g);
    ca_process_unref(p);
}

/* "zero-initialised options inherit": stdio, environment, cwd. */
TEST(proc_zero_options_inherit)
{
    ca_loop *l = new_epoll();
    setenv("CA_CONTRACT_T", "yes", 1);
    char cwd[512];
    CHECK(getcwd(cwd, sizeof cwd) != NULL);
    char cmd[1024];
    snprintf(cmd, sizeof cmd,
             "test \"$CA_CONTRACT_T\" = yes || exit 11; test \"$(pwd -P)\" = \"$(cd '%s' && pwd -P)\" "
             "|| exit 12; echo inherited",
             cwd);
    const char *argv[] = {"sh", "-c", cmd, NULL};
    ca_subprocess_options o;
    memset(&o, 0, sizeof o);
    o.argv = argv;
    int p[2];
    CHECK_EQ(pipe2(p, O_CLOEXEC), 0);
    fflush(stdout);
    int saved = dup(1);
    dup2(p[1], 1);
    ca_process *pr = NULL;
    int r = ca_loop_subprocess_exec(l, &o, NULL, NULL, &pr);
    dup2(saved, 1);
    close(saved);
    close(p[1]);
    CHECK_OK(r);
    CHECK_EQ(pwait(l, pr), 0);
    char buf[64] = {0};
    CHECK(read(p[0], buf, sizeof buf - 1) > 0);
    CHECK(strcmp(buf, "inherited\n") == 0);
    close(p[0]);
    ca_process_unref(pr);
    loop_done(l);
}

/* "spawning with an inactive watcher fails with -ENOTCONN and leaves no child behind" */
TEST(proc_inactive_watcher_enotconn_no_child)
{
    ca_loop *l = new_epoll();
    ca_child_watcher *w = NULL;
    CHECK_OK(ca_safe_child_watcher_new(&w));
    CHECK_OK(ca_set_child_watcher(w)); /* not attached: inactive */
    CHECK(!ca_child_watcher_is_active(w));
    const char *argv[] = {"/bin/true", NULL};
    ca_subprocess_options o = {.argv = argv, .stdout_mode = CA_PIPE};
    ca_process *p = SENT_PROC;
    CHECK_ERR(ca_loop_subprocess_exec(l, &o, NULL, NULL, &p), -ENOTCONN);
    CHECK(p == SENT_PROC);
    CHECK_EQ(waitpid(-1, NULL, WNOHANG), -1);
    CHECK_EQ(errno, ECHILD);
    ca_child_watcher_unref(w);
    CHECK_OK(ca_set_child_watcher(NULL));
    loop_done(l);
}

/* "works whether or not loop is running": from a callback of the running loop. */
struct inrun {
    ca_process *p;
    int r;
    struct pstat s;
};
static void exec_in_cb(void *arg)
{
    struct inrun *x = arg;
    const char *argv[] = {"sh", "-c", "echo run", NULL};
    ca_subprocess_options o = {.argv = argv, .stdout_mode = CA_PIPE};
    x->r = ca_loop_subprocess_exec(x->s.loop, &o, &pproto, &x->s, &x->p);
}

LOOP_TEST(proc_exec_while_running)
{
    struct inrun x = {.s.loop = loop};
    CHECK_OK(ca_loop_call_soon(loop, exec_in_cb, &x, NULL));
    run_once(loop);
    CHECK_OK(x.r);
    CHECK_EQ(pwait(loop, x.p), 0);
    CHECK(x.s.nout == 4 && memcmp(x.s.out, "run\n", 4) == 0);
    CHECK_EQ(x.s.wrong_loop, 0);
    ca_process_unref(x.p);
}

/* With every watcher as the policy's (epoll loop, set current; Safe/Fast attached). */
TEST(proc_every_watcher)
{
    ca_loop *l = new_epoll();
    for (int k = 0; k < W_COUNT; k++) {
        ca_child_watcher *w = NULL;
        int r = wnew(k, &w);
        if (r == -ENOSYS) continue;
        CHECK_OK(r);
        CHECK_OK(ca_set_child_watcher(w));
        CHECK_OK(ca_set_event_loop(l)); /* attaches it (main thread) */
        CHECK(ca_child_watcher_is_active(w));
        const char *argv[] = {"sh", "-c", "echo x; exit 5", NULL};
        ca_subprocess_options o = {.argv = argv, .stdout_mode = CA_PIPE};
        struct pstat s = {.loop = l};
        ca_process *p = NULL;
        CHECK_OK(ca_loop_subprocess_exec(l, &o, &pproto, &s, &p));
        int rc = pwait(l, p);
        if (rc != 5) t_fail(__FILE__, __LINE__, "%s: rc %d", wname[k], rc);
        CHECK_EQ(s.exited, 1);
        ca_process_unref(p);
        CHECK_OK(ca_set_child_watcher(NULL));
        ca_child_watcher_unref(w);
        CHECK_OK(ca_set_event_loop(NULL));
    }
    loop_done(l);
}

/* "The wait future completes once the exit is known and every pipe is closed" */
LOOP_TEST(proc_wait_needs_pipes_closed)
{
    const char *argv[] = {"sh", "-c", "(sleep 0.3; echo late) & exit 3", NULL};
    ca_subprocess_options o = {.argv = argv, .stdout_mode = CA_PIPE};
    struct pstat s = {.loop = loop};
    ca_process *p = NULL;
    CHECK_OK(ca_loop_subprocess_exec(loop, &o, &pproto, &s, &p));
    ca_future *f = NULL;
    CHECK_OK(ca_process_wait(p, &f));
    double t0 = now_s();
    int rc = -1;
    while (ca_process_returncode(p, &rc) == -EAGAIN && now_s() - t0 < 5) t_run_for(loop, 0.01);
    CHECK_EQ(rc, 3);
    if (now_s() - t0 < 0.2) CHECK(!ca_future_done(f)); /* the pipe is still open */
    CHECK_ERR(ca_loop_run_until_complete(loop, f), 0);
    CHECK(s.nout == 5 && memcmp(s.out, "late\n", 5) == 0);
    CHECK_EQ(s.lost[1], 1);
    ca_future_unref(f);
    ca_process_unref(p);
}

/* "Closing a loop ends the processes it still has ...: pipes closed, a running child killed with
 * SIGKILL and reaped, one log line each; no zombie is left. Their pending wait futures are
 * cancelled and no protocol callback runs after the close." */
LOOP_TEST(proc_loop_close_ends_processes)
{
    static struct logrec lr;
    memset(&lr, 0, sizeof lr);
    ca_set_log_handler(rec_log, &lr);
    const char *argv[] = {"sleep", "30", NULL};
    ca_subprocess_options o = {.argv = argv, .stdin_mode = CA_PIPE, .stdout_mode = CA_PIPE,
                               .stderr_mode = CA_PIPE};
    struct pstat s[2] = {{.loop = loop}, {.loop = loop}};
    ca_process *p[2] = {NULL, NULL};
    ca_future *f[2] = {NULL, NULL};
    for (int i = 0; i < 2; i++) {
        CHECK_OK(ca_loop_subprocess_exec(loop, &o, &pproto, &s[i], &p[i]));
        CHECK_OK(ca_process_wait(p[i], &f[i]));
    }
    t_run_for(loop, 0.05);
    pid_t pid0 = ca_process_pid(p[0]);
    struct dcb d = {0};
    CHECK_OK(ca_future_add_done_callback(f[0], dcb_fn, &d));
    for (int i = 0; i < 2; i++) s[i].closing = true;
    double t0 = now_s();
    CHECK_OK(ca_loop_close(loop));
    if (now_s() - t0 > 5.0 * t_slow())
        t_fail(__FILE__, __LINE__, "close took %.1fs: the children were not killed", now_s() - t0);
    for (int i = 0; i < 2; i++) {
        CHECK(ca_future_cancelled(f[i]));
        CHECK_EQ(s[i].after_close, 0);
    }
    CHECK_EQ(d.n, 0);
    if (atomic_load(&lr.n) != 2)
        t_fail(__FILE__, __LINE__, "%d log lines for 2 killed processes (last: %s)",
               atomic_load(&lr.n), lr.last);
    CHECK_EQ(kill(pid0, 0), -1); /* reaped: gone */
    int rc = 0;
    int r = ca_process_returncode(p[0], &rc);
    if (r == 0) CHECK_EQ(rc, -9);
    for (int i = 0; i < 2; i++) {
        ca_future_unref(f[i]);
        ca_process_unref(p[i]);
    }
}

/* ca_run "closes the loop (which ends its processes)" */
static ca_future *rmain_proc(ca_loop *loop, void *arg)
{
    const char *argv[] = {"sleep", "30", NULL};
    ca_subprocess_options o = {.argv = argv};
    ca_process **p = arg;
    CHECK_OK(ca_loop_subprocess_exec(loop, &o, NULL, NULL, p));
    ca_future *f = NULL;
    CHECK_OK(ca_future_new(loop, &f));
    CHECK_OK(ca_loop_call_later(loop, 0.05, set_res_cb, f, NULL));
    return f;
}

TEST(run_closes_loop_ending_processes)
{
    ca_set_log_handler(NULL, NULL);
    ca_process *p = NULL;
    double t0 = now_s();
    CHECK_ERR(ca_run(rmain_proc, &p, NULL), 0);
    if (now_s() - t0 > 5.0 * t_slow())
        t_fail(__FILE__, __LINE__, "ca_run took %.1fs: the child was not killed at close", now_s() - t0);
    CHECK(p != NULL);
    pid_t pid = ca_process_pid(p);
    CHECK(pid > 0);
    CHECK_EQ(kill(pid, 0), -1);
    ca_process_unref(p);
}

/* "A command that cannot be executed (not found, not executable) is an error returned by
 * ca_loop_subprocess_exec with the child's errno, not a child that exits 127." */
TEST(proc_exec_failure_errno)
{
    ca_loop *l = new_epoll();
    ca_process *p = SENT_PROC;
    const char *a1[] = {"/nonexistent/dir/cmd", NULL};
    ca_subprocess_options o = {.argv = a1, .stdout_mode = CA_PIPE};
    CHECK_ERR(ca_loop_subprocess_exec(l, &o, NULL, NULL, &p), -ENOENT);
    const char *a2[] = {"ca-contract-no-such-command-xyz", NULL};
    o.argv = a2;
    CHECK_ERR(ca_loop_subprocess_exec(l, &o, NULL, NULL, &p), -ENOENT);
    char tmpl[] = "/tmp/ca-contract-XXXXXX";
    int fd = mkstemp(tmpl);
    CHECK(fd >= 0);
    CHECK_EQ(write(fd, "#!/bin/sh\nexit 0\n", 17), 17);
    close(fd);
    chmod(tmpl, 0644);
    const char *a3[] = {tmpl, NULL};
    o.argv = a3;
    CHECK_ERR(ca_loop_subprocess_exec(l, &o, NULL, NULL, &p), -EACCES);
    unlink(tmpl);
    const char *a4[] = {"/tmp", NULL}; /* a directory */
    o.argv = a4;
    int r = ca_loop_subprocess_exec(l, &o, NULL, NULL, &p);
    CHECK(r == -EACCES || r == -EISDIR);
    CHECK(p == SENT_PROC);
    CHECK_EQ(waitpid(-1, NULL, WNOHANG), -1);
    /* A cwd that does not exist: the child's chdir errno. */
    const char *a5[] = {"/bin/true", NULL};
    o.argv = a5;
    o.cwd = "/nonexistent/ca-contract";
    CHECK_ERR(ca_loop_subprocess_exec(l, &o, NULL, NULL, &p), -ENOENT);
    CHECK(p == SENT_PROC);
    loop_done(l);
}

/* "argv[0] is looked up in PATH (envp's PATH when envp is given and has one, else ours)" */
TEST(proc_path_lookup_uses_envp_path)
{
    char dir[] = "/tmp/ca-contract-dXXXXXX";
    CHECK(mkdtemp(dir) != NULL);
    char path[256];
    snprintf(path, sizeof path, "%s/ca-contract-cmd", dir);
    int fd = open(path, O_WRONLY | O_CREAT | O_CLOEXEC, 0755);
    CHECK(fd >= 0);
    CHECK_EQ(write(fd, "#!/bin/sh\nexit 42\n", 18), 18);
    close(fd);
    ca_loop *l = new_epoll();
    char envpath[300];
    snprintf(envpath, sizeof envpath, "PATH=%s", dir);
    const char *envp[] = {"FOO=1", envpath, NULL};
    const char *argv[] = {"ca-contract-cmd", NULL};
    ca_subprocess_options o = {.argv = argv, .envp = envp};
    ca_process *p = NULL;
    int r = ca_loop_subprocess_exec(l, &o, NULL, NULL, &p);
    CHECK_OK(r);
    if (r == 0) {
        CHECK_EQ(pwait(l, p), 42);
        ca_process_unref(p);
    }
    /* Our PATH does not have it. */
    const char *envp2[] = {"FOO=1", NULL};
    o.envp = envp2;
    p = SENT_PROC;
    CHECK_ERR(ca_loop_subprocess_exec(l, &o, NULL, NULL, &p), -ENOENT);
    /* envp without PATH: ours is used. */
    const char *argv2[] = {"sh", "-c", "test \"$FOO\" = 1 && test -z \"$HOME_NOT_SET_X\"", NULL};
    o.argv = argv2;
    CHECK_OK(ca_loop_subprocess_exec(l, &o, NULL, NULL, &p));
    CHECK_EQ(pwait(l, p), 0);
    ca_process_unref(p);
    /* envp's PATH wins over ours even when ours would find argv[0]. */
    const char *envp3[] = {"PATH=/nonexistent-ca", NULL};
    const char *argv3[] = {"true", NULL};
    o.argv = argv3;
    o.envp = envp3;
    p = SENT_PROC;
    CHECK_ERR(ca_loop_subprocess_exec(l, &o, NULL, NULL, &p), -ENOENT);
    unlink(path);
    rmdir(dir);
    loop_done(l);
}

/* "CA_STDOUT (stderr only)"; CA_FD with an fd that is not open -EBADF. */
TEST(proc_stdio_modes)
{
    ca_loop *l = new_epoll();
    const char *argv[] = {"sh", "-c", "echo o; echo e >&2", NULL};
    ca_process *p = SENT_PROC;
    ca_subprocess_options o = {.argv = argv, .stdout_mode = CA_STDOUT};
    CHECK_ERR(ca_loop_subprocess_exec(l, &o, NULL, NULL, &p), -EINVAL);
    o.stdout_mode = CA_PIPE;
    o.stdin_mode = CA_STDOUT;
    CHECK_ERR(ca_loop_subprocess_exec(l, &o, NULL, NULL, &p), -EINVAL);
    o.stdin_mode = CA_FD;
    o.stdin_fd = 1000;
    CHECK_ERR(ca_loop_subprocess_exec(l, &o, NULL, NULL, &p), -EBADF);
    o.stdin_fd = -1;
    CHECK_ERR(ca_loop_subprocess_exec(l, &o, NULL, NULL, &p), -EINVAL);
    o.stdin_mode = (ca_stdio_mode)42;
    CHECK_ERR(ca_loop_subprocess_exec(l, &o, NULL, NULL, &p), -EINVAL);
    CHECK(p == SENT_PROC);
    /* stderr to stdout's pipe. */
    o.stdin_mode = CA_DEVNULL;
    o.stderr_mode = CA_STDOUT;
    struct pstat s = {.loop = l};
    CHECK_OK(ca_loop_subprocess_exec(l, &o, &pproto, &s, &p));
    CHECK_EQ(pwait(l, p), 0);
    CHECK(s.nout == 4 && memcmp(s.out, "o\ne\n", 4) == 0);
    CHECK_EQ(s.nerr, 0);
    ca_process_unref(p);
    /* CA_FD: our pipe as the child's stdout. */
    int pp[2];
    CHECK_EQ(pipe2(pp, O_CLOEXEC), 0);
    ca_subprocess_options o2 = {.argv = argv, .stdout_mode = CA_FD, .stdout_fd = pp[1],
                                .stderr_mode = CA_DEVNULL};
    CHECK_OK(ca_loop_subprocess_exec(l, &o2, NULL, NULL, &p));
    close(pp[1]);
    CHECK_EQ(pwait(l, p), 0);
    char buf[16] = {0};
    CHECK_EQ(read(pp[0], buf, sizeof buf), 2);
    CHECK(memcmp(buf, "o\n", 2) == 0);
    close(pp[0]);
    ca_process_unref(p);
    loop_done(l);
}

/* cwd, envp replace, start_new_session. */
TEST(proc_cwd_env_session)
{
    ca_loop *l = new_epoll();
    const char *argv[] = {"/bin/sh", "-c",
                          "test \"$(pwd)\" = / || exit 1; test \"$ONLY\" = 1 || exit 2; "
                          "test -z \"$PATH_X\" || exit 3; "
                          "s=$(cut -d' ' -f6 /proc/$$/stat); test \"$s\" = $$ || exit 4",
                          NULL};
    const char *envp[] = {"ONLY=1", "PATH=/usr/bin:/bin", NULL};
    ca_subprocess_options o = {.argv = argv, .envp = envp, .cwd = "/", .start_new_session = true};
    ca_process *p = NULL;
    CHECK_OK(ca_loop_subprocess_exec(l, &o, NULL, NULL, &p));
    CHECK_EQ(pwait(l, p), 0);
    ca_process_unref(p);
    loop_done(l);
}

/* Signals: terminate -> -15, kill -> -9, send_signal. Bad arguments. */
LOOP_TEST(proc_signals_and_bad_args)
{
    const char *argv[] = {"sleep", "30", NULL};
    ca_subprocess_options o = {.argv = argv};
    ca_process *p = NULL;
    CHECK_OK(ca_loop_subprocess_exec(loop, &o, NULL, NULL, &p));
    CHECK_ERR(ca_process_send_signal(p, 0), -EINVAL);
    CHECK_ERR(ca_process_send_signal(p, -1), -EINVAL);
    CHECK_ERR(ca_process_send_signal(p, 1000), -EINVAL);
    CHECK_OK(ca_process_terminate(p));
    CHECK_EQ(pwait(loop, p), -15);
    ca_process_unref(p);
    CHECK_OK(ca_loop_subprocess_exec(loop, &o, NULL, NULL, &p));
    CHECK_OK(ca_process_kill(p));
    CHECK_EQ(pwait(loop, p), -9);
    ca_process_unref(p);
    CHECK_OK(ca_loop_subprocess_exec(loop, &o, NULL, NULL, &p));
    CHECK_OK(ca_process_send_signal(p, SIGUSR1));
    CHECK_EQ(pwait(loop, p), -SIGUSR1);
    ca_process_unref(p);

    ca_process *q = SENT_PROC;
    CHECK_ERR(ca_loop_subprocess_exec(loop, NULL, NULL, NULL, &q), -EINVAL);
    CHECK_ERR(ca_loop_subprocess_exec(loop, &o, NULL, NULL, NULL), -EINVAL);
    ca_subprocess_options none = {0};
    CHECK_ERR(ca_loop_subprocess_exec(loop, &none, NULL, NULL, &q), -EINVAL);
    const char *empty[] = {NULL};
    none.argv = empty;
    CHECK_ERR(ca_loop_subprocess_exec(loop, &none, NULL, NULL, &q), -EINVAL);
    CHECK_ERR(ca_loop_subprocess_exec(NULL, &o, NULL, NULL, &q), -EINVAL);
    CHECK(q == SENT_PROC);
    int rc = 77;
    ca_future *f = SENT_FUT;
    CHECK_ERR(ca_process_returncode(NULL, &rc), -EINVAL);
    CHECK_ERR(ca_process_wait(NULL, &f), -EINVAL);
    CHECK_ERR(ca_process_write(NULL, "x", 1), -EINVAL);
    CHECK_ERR(ca_process_close_stdin(NULL), -EINVAL);
    CHECK_ERR(ca_process_send_signal(NULL, SIGTERM), -EINVAL);
    CHECK_ERR(ca_process_terminate(NULL), -EINVAL);
    CHECK_ERR(ca_process_kill(NULL), -EINVAL);
    CHECK(rc == 77 && f == SENT_FUT);
}

/* Forked child: a process made by the parent gives -ECHILD (the parent's loop's object). */
TEST(proc_fork_child_echild)
{
    ca_loop *l = new_epoll();
    const char *argv[] = {"sleep", "30", NULL};
    ca_subprocess_options o = {.argv = argv, .stdin_mode = CA_PIPE};
    ca_process *p = NULL;
    CHECK_OK(ca_loop_subprocess_exec(l, &o, NULL, NULL, &p));
    pid_t pid = fork();
    if (pid == 0) {
        int bad = 0, rc;
        ca_future *f = NULL;
        if (ca_process_kill(p) != -ECHILD) bad |= 1;
        if (ca_process_wait(p, &f) != -ECHILD) bad |= 2;
        if (ca_process_write(p, "x", 1) != -ECHILD) bad |= 4;
        if (ca_process_returncode(p, &rc) != -ECHILD) bad |= 8;
        t_child_exit(bad);
    }
    int st;
    CHECK_EQ(waitpid(pid, &st, 0), pid);
    CHECK(WIFEXITED(st));
    CHECK_EQ(WEXITSTATUS(st), 0);
    CHECK_OK(ca_process_kill(p));
    CHECK_EQ(pwait(l, p), -9);
    ca_process_unref(p);
    loop_done(l);
}

/* Futures and loop close: a future completed while its done callbacks are still queued, whose
 * loop then closes, must not keep the loop (or itself) alive: "A _new hands the caller one
 * reference", refcounts balance. Seen with a custom loop whose destroy is counted (the core's
 * part is the same for built-in loops, where valgrind/ASan see the leak). */
struct kq {
    ca_handle *h[16];
    int n;
    int destroyed;
};
static int kq_soon(ca_loop *self, ca_handle *h)
{
    struct kq *q = ca_loop_data(self);
    q->h[q->n++] = ca_handle_ref(h);
    return 0;
}
static int kq_close(ca_loop *self)
{
    struct kq *q = ca_loop_data(self);
    for (int i = 0; i < q->n; i++) ca_handle_unref(q->h[i]);
    q->n = 0;
    return 0;
}
static void kq_destroy(ca_loop *self) { ((struct kq *)ca_loop_data(self))->destroyed++; }
static const ca_loop_ops kq_ops = {.run_forever = spy_run,
                                   .call_soon = kq_soon,
                                   .call_soon_threadsafe = kq_soon,
                                   .close = kq_close,
                                   .destroy = kq_destroy};

TEST(future_done_callback_queued_when_loop_closes_no_leak)
{
    for (int how = 0; how < 3; how++) {
        struct kq q = {0};
        ca_loop *l = NULL;
        CHECK_OK(ca_loop_new_custom(&kq_ops, &q, &l));
        ca_future *f = NULL;
        struct dcb d = {0};
        CHECK_OK(ca_future_new(l, &f));
        CHECK_OK(ca_future_add_done_callback(f, dcb_fn, &d));
        if (how == 0) CHECK(ca_future_cancel(f));
        else if (how == 1) CHECK_OK(ca_future_set_result(f, NULL));
        else CHECK_OK(ca_future_set_error(f, -EIO));
        CHECK_EQ(q.n, 1); /* the done callback is queued */
        CHECK_OK(ca_loop_close(l));
        CHECK_EQ(d.n, 0);
        ca_future_unref(f);
        ca_loop_unref(l);
        if (q.destroyed != 1)
            t_fail(__FILE__, __LINE__, "case %d: the loop was never freed (a reference leaked)", how);
    }
}

LOOP_TEST(future_done_callback_queued_when_loop_closes_fds)
{
    /* The same through the harness's loop kinds: on the custom loop a leaked loop keeps its
     * wake pipe open (the harness sees the fd). */
    ca_future *f = NULL;
    struct dcb d = {0};
    CHECK_OK(ca_future_new(loop, &f));
    CHECK_OK(ca_future_add_done_callback(f, dcb_fn, &d));
    CHECK(ca_future_cancel(f));
    CHECK_OK(ca_loop_close(loop));
    CHECK_EQ(d.n, 0);
    ca_future_unref(f);
}

/* ===== Socket operations ================================================================== */

static void sockpair(int sv[2])
{
    CHECK_EQ(socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0, sv), 0);
}

static intptr_t fut_int(ca_future *f)
{
    void *res = SENT_PTR;
    CHECK_OK(ca_future_result(f, &res));
    return (intptr_t)res;
}

/* recv: "result: bytes read, 0 at EOF" */
LOOP_TEST(sock_recv_bytes_and_eof)
{
    int sv[2];
    sockpair(sv);
    char buf[64];
    ca_future *f = SENT_FUT;
    CHECK_OK(ca_loop_sock_recv(loop, sv[0], buf, sizeof buf, &f));
    CHECK(f != SENT_FUT);
    CHECK_EQ(write(sv[1], "abc", 3), 3);
    CHECK_ERR(ca_loop_run_until_complete(loop, f), 0);
    CHECK_EQ(fut_int(f), 3);
    CHECK(memcmp(buf, "abc", 3) == 0);
    ca_future_unref(f);
    close(sv[1]);
    CHECK_OK(ca_loop_sock_recv(loop, sv[0], buf, sizeof buf, &f));
    CHECK_ERR(ca_loop_run_until_complete(loop, f), 0);
    CHECK_EQ(fut_int(f), 0);
    ca_future_unref(f);
    close(sv[0]);
}

/* Several recvs on one socket are served in the order they were made. */
LOOP_TEST(sock_recvs_in_order)
{
    int sv[2];
    sockpair(sv);
    char b1[2], b2[2], b3[2];
    ca_future *f1 = NULL, *f2 = NULL, *f3 = NULL;
    CHECK_OK(ca_loop_sock_recv(loop, sv[0], b1, 2, &f1));
    CHECK_OK(ca_loop_sock_recv(loop, sv[0], b2, 2, &f2));
    CHECK_OK(ca_loop_sock_recv(loop, sv[0], b3, 2, &f3));
    CHECK_EQ(write(sv[1], "aa", 2), 2);
    CHECK_ERR(ca_loop_run_until_complete(loop, f1), 0);
    CHECK_EQ(write(sv[1], "bb", 2), 2);
    CHECK_ERR(ca_loop_run_until_complete(loop, f2), 0);
    CHECK_EQ(write(sv[1], "cc", 2), 2);
    CHECK_ERR(ca_loop_run_until_complete(loop, f3), 0);
    CHECK(memcmp(b1, "aa", 2) == 0 && memcmp(b2, "bb", 2) == 0 && memcmp(b3, "cc", 2) == 0);
    ca_future_unref(f1);
    ca_future_unref(f2);
    ca_future_unref(f3);
    close(sv[0]);
    close(sv[1]);
}

/* sendall: "result: 0 when all sent"; a big buffer arrives whole and in order. */
struct drain {
    int fd;
    size_t got;
    unsigned char *dst;
    size_t cap;
};
static void drain_cb(void *arg)
{
    struct drain *d = arg;
    ssize_t k;
    while (d->got < d->cap && (k = read(d->fd, d->dst + d->got, d->cap - d->got)) > 0) d->got += (size_t)k;
}

LOOP_TEST(sock_sendall_big_in_order)
{
    int sv[2];
    sockpair(sv);
    size_t n = 2u << 20;
    unsigned char *src = malloc(n), *dst = malloc(n);
    for (size_t i = 0; i < n; i++) src[i] = (unsigned char)(i * 7 + (i >> 10));
    ca_future *f = NULL;
    CHECK_OK(ca_loop_sock_sendall(loop, sv[0], src, n, &f));
    /* "At most one send per socket is in flight at a time": a second one meanwhile -EBUSY. */
    ca_future *g = SENT_FUT;
    int r2 = ca_loop_sock_sendall(loop, sv[0], "x", 1, &g);
    if (!ca_future_done(f)) {
        CHECK_ERR(r2, -EBUSY);
        CHECK(g == SENT_FUT);
    } else if (r2 == 0) {
        ca_future_unref(g);
    }
    struct drain d = {sv[1], 0, dst, n};
    CHECK_OK(ca_loop_add_reader(loop, sv[1], drain_cb, &d));
    CHECK_ERR(ca_loop_run_until_complete(loop, f), 0);
    CHECK_EQ(fut_int(f), 0);
    double t0 = now_s();
    while (d.got < n && now_s() - t0 < 5) t_run_for(loop, 0.005);
    CHECK_EQ(d.got, n);
    CHECK(memcmp(src, dst, n) == 0);
    CHECK_EQ(ca_loop_remove_reader(loop, sv[1]), 1);
    ca_future_unref(f);
    free(src);
    free(dst);
    close(sv[0]);
    close(sv[1]);
}

/* accept: "result: the new fd"; connect: 0 when connected; refused: the future fails. */
LOOP_TEST(sock_accept_connect)
{
    int ls = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    CHECK(ls >= 0);
    struct sockaddr_in sa = {.sin_family = AF_INET};
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    CHECK_EQ(bind(ls, (struct sockaddr *)&sa, sizeof sa), 0);
    CHECK_EQ(listen(ls, 8), 0);
    socklen_t len = sizeof sa;
    CHECK_EQ(getsockname(ls, (struct sockaddr *)&sa, &len), 0);
    ca_future *af = NULL, *cf = NULL;
    CHECK_OK(ca_loop_sock_accept(loop, ls, &af));
    int c = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    CHECK_OK(ca_loop_sock_connect(loop, c, (struct sockaddr *)&sa, sizeof sa, &cf));
    CHECK_ERR(ca_loop_run_until_complete(loop, cf), 0);
    CHECK_EQ(fut_int(cf), 0);
    CHECK_ERR(ca_loop_run_until_complete(loop, af), 0);
    int nfd = (int)fut_int(af);
    CHECK(nfd >= 0);
    CHECK(fcntl(nfd, F_GETFL) & O_NONBLOCK);
    CHECK(fcntl(nfd, F_GETFD) & FD_CLOEXEC);
    close(nfd);
    ca_future_unref(af);
    ca_future_unref(cf);
    close(c);
    close(ls); /* the port is now closed: refused */
    c = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    CHECK_OK(ca_loop_sock_connect(loop, c, (struct sockaddr *)&sa, sizeof sa, &cf));
    CHECK_ERR(ca_loop_run_until_complete(loop, cf), -ECONNREFUSED);
    ca_future_unref(cf);
    close(c);
}

/* sendall to a closed peer: -EPIPE, and "sends never raise SIGPIPE". */
LOOP_TEST(sock_sendall_epipe_no_sigpipe)
{
    signal(SIGPIPE, SIG_DFL);
    int sv[2];
    sockpair(sv);
    close(sv[1]);
    ca_future *f = NULL;
    CHECK_OK(ca_loop_sock_sendall(loop, sv[0], "hello", 5, &f));
    CHECK_ERR(ca_loop_run_until_complete(loop, f), -EPIPE);
    ca_future_unref(f);
    close(sv[0]);
    signal(SIGPIPE, SIG_IGN);
}

/* "cancelling the future cancels the operation" (a cancelled recv never writes the buffer). */
LOOP_TEST(sock_cancel_recv)
{
    int sv[2];
    sockpair(sv);
    char b1[8] = "-------", b2[8] = {0};
    ca_future *f1 = NULL, *f2 = NULL;
    CHECK_OK(ca_loop_sock_recv(loop, sv[0], b1, 7, &f1));
    t_run_for(loop, 0.01);
    CHECK(ca_future_cancel(f1));
    t_run_for(loop, 0.01);
    CHECK_EQ(write(sv[1], "data", 4), 4);
    CHECK_OK(ca_loop_sock_recv(loop, sv[0], b2, 7, &f2));
    CHECK_ERR(ca_loop_run_until_complete(loop, f2), 0);
    CHECK_EQ(fut_int(f2), 4);
    CHECK(memcmp(b2, "data", 4) == 0);
    CHECK(memcmp(b1, "-------", 7) == 0);
    CHECK_ERR(ca_loop_run_until_complete(loop, f1), -ECANCELED);
    ca_future_unref(f1);
    ca_future_unref(f2);
    close(sv[0]);
    close(sv[1]);
}

/* A cancelled pending sendall frees the slot (at once on the selector loops, once the kernel
 * confirmed the cancel on the proactor). */
LOOP_TEST(sock_cancel_sendall_then_send_again)
{
    int sv[2];
    sockpair(sv);
    size_t n = 4u << 20;
    char *big = calloc(1, n);
    ca_future *f = NULL, *g = NULL;
    CHECK_OK(ca_loop_sock_sendall(loop, sv[0], big, n, &f));
    t_run_for(loop, 0.01);
    CHECK(!ca_future_done(f));
    CHECK(ca_future_cancel(f));
    if (strcmp(ca_loop_kind(loop), "io_uring") != 0) {
        /* The selector loops withdraw it inside the cancel: the slot is free at once. */
        CHECK_OK(ca_loop_sock_sendall(loop, sv[0], "z", 1, &g));
        CHECK(ca_future_cancel(g));
        ca_future_unref(g);
        g = NULL;
    }
    t_run_for(loop, 0.01);
    CHECK_OK(ca_loop_sock_sendall(loop, sv[0], "z", 1, &g));
    ca_future_cancel(g);
    t_run_for(loop, 0.01);
    ca_future_unref(f);
    ca_future_unref(g);
    free(big);
    close(sv[0]);
    close(sv[1]);
}

/* Closing the loop cancels the pending operations' futures; their done callbacks do not run. */
LOOP_TEST(sock_loop_close_cancels)
{
    int sv[2];
    sockpair(sv);
    char buf[8];
    ca_future *f = NULL;
    struct dcb d = {0};
    CHECK_OK(ca_loop_sock_recv(loop, sv[0], buf, sizeof buf, &f));
    CHECK_OK(ca_future_add_done_callback(f, dcb_fn, &d));
    t_run_for(loop, 0.01);
    CHECK_OK(ca_loop_close(loop));
    CHECK(ca_future_cancelled(f));
    CHECK_EQ(d.n, 0);
    ca_future_unref(f);
    close(sv[0]);
    close(sv[1]);
}

/* Bad arguments. */
LOOP_TEST(sock_bad_args)
{
    int sv[2];
    sockpair(sv);
    char buf[4];
    ca_future *f = SENT_FUT;
    CHECK_ERR(ca_loop_sock_recv(loop, -1, buf, 4, &f), -EINVAL);
    CHECK_ERR(ca_loop_sock_recv(loop, sv[0], NULL, 4, &f), -EINVAL);
    CHECK_ERR(ca_loop_sock_recv(loop, sv[0], buf, 4, NULL), -EINVAL);
    CHECK_ERR(ca_loop_sock_sendall(loop, sv[0], NULL, 4, &f), -EINVAL);
    CHECK_ERR(ca_loop_sock_sendall(loop, -3, buf, 4, &f), -EINVAL);
    CHECK_ERR(ca_loop_sock_accept(loop, -1, &f), -EINVAL);
    CHECK_ERR(ca_loop_sock_accept(loop, sv[0], NULL), -EINVAL);
    CHECK_ERR(ca_loop_sock_connect(loop, sv[0], NULL, 16, &f), -EINVAL);
    struct sockaddr_in sa = {.sin_family = AF_INET};
    CHECK_ERR(ca_loop_sock_connect(loop, sv[0], (struct sockaddr *)&sa, 0, &f), -EINVAL);
    CHECK_ERR(ca_loop_sock_connect(loop, sv[0], (struct sockaddr *)&sa, sizeof(struct sockaddr_storage) + 1, &f), -EINVAL);
    CHECK_ERR(ca_loop_sock_recv(loop, 1000, buf, 4, &f), -EINVAL); /* not open */
    CHECK(f == SENT_FUT);
    close(sv[0]);
    close(sv[1]);
}

/* ===== More statements ==================================================================== */

/* Forked child: "close and unref ... free memory without touching the parent's kernel
 * objects": the parent's reader registration survives the child's close. */
LOOP_TEST(conv_fork_child_close_leaves_parent_intact)
{
    int p[2];
    CHECK_EQ(pipe2(p, O_CLOEXEC | O_NONBLOCK), 0);
    struct lvl l = {p[0], 0};
    CHECK_OK(ca_loop_add_reader(loop, p[0], lvl_cb, &l));
    t_run_for(loop, 0.01);
    CHECK_EQ(l.n, 0);
    ca_loop_ref(loop);
    pid_t pid = fork();
    if (pid == 0) {
        int r = ca_loop_close(loop);
        ca_loop_unref(loop);
        t_child_exit(r == 0 ? 0 : 1);
    }
    ca_loop_unref(loop);
    int st;
    CHECK_EQ(waitpid(pid, &st, 0), pid);
    CHECK(WIFEXITED(st));
    CHECK_EQ(WEXITSTATUS(st), 0);
    CHECK(!ca_loop_is_closed(loop));
    CHECK_EQ(write(p[1], "x", 1), 1);
    CHECK(t_run_until(loop, t_flag_set, &l.n, 2.0));
    int n = 0;
    CHECK_OK(ca_loop_call_soon_threadsafe(loop, count_cb, &n));
    CHECK(t_run_until(loop, t_flag_set, &n, 2.0));
    CHECK_EQ(ca_loop_remove_reader(loop, p[0]), 1);
    close(p[0]);
    close(p[1]);
}

/* set_event_loop attaches the watcher only "in the main thread". */
static void *thr_set_loop(void *arg)
{
    ca_loop *l = arg;
    CHECK_OK(ca_set_event_loop(l));
    CHECK_OK(ca_set_event_loop(NULL));
    CHECK_OK(ca_set_event_loop(l));
    return NULL;
}

TEST(policy_set_event_loop_other_thread_does_not_attach)
{
    ca_child_watcher *w = NULL;
    CHECK_OK(ca_safe_child_watcher_new(&w));
    CHECK_OK(ca_set_child_watcher(w));
    ca_loop *m = new_epoll(), *o = new_epoll();
    CHECK_OK(ca_set_event_loop(m));
    CHECK(ca_child_watcher_is_active(w));
    pthread_t t;
    CHECK_EQ(pthread_create(&t, NULL, thr_set_loop, o), 0);
    pthread_join(t, NULL);
    CHECK(ca_child_watcher_is_active(w)); /* still attached to m */
    CHECK_OK(ca_loop_close(m));
    CHECK(!ca_child_watcher_is_active(w)); /* not to o */
    CHECK_OK(ca_set_child_watcher(NULL));
    ca_child_watcher_unref(w);
    CHECK_OK(ca_set_event_loop(NULL));
    ca_loop_unref(m);
    loop_done(o);
}

/* ca_run: -EAGAIN when the loop was stopped before the future was done (header). */
static ca_future *rmain_stop(ca_loop *loop, void *arg)
{
    ca_future *f = NULL;
    CHECK_OK(ca_future_new(loop, &f));
    ca_loop_stop(loop);
    *(ca_loop **)arg = ca_loop_ref(loop);
    return f;
}

TEST(run_stopped_eagain)
{
    ca_loop *l = NULL;
    CHECK_ERR(ca_run(rmain_stop, &l, NULL), -EAGAIN);
    CHECK(ca_loop_is_closed(l));
    ca_loop_unref(l);
}

/* MultiLoop "registers a SIGCHLD signal handler on instantiation" (until close); Pidfd: "no
 * signals, no threads". */
static int nthreads(void)
{
    int n = 0;
    FILE *f = fopen("/proc/self/status", "r");
    char line[256];
    while (f && fgets(line, sizeof line, f))
        if (sscanf(line, "Threads: %d", &n) == 1) break;
    if (f) fclose(f);
    return n;
}

TEST(watcher_multiloop_sigchld_handler_from_creation)
{
    struct sigaction before, during, after;
    sigaction(SIGCHLD, NULL, &before);
    CHECK(before.sa_handler == SIG_DFL);
    ca_child_watcher *w = NULL;
    CHECK_OK(ca_multiloop_child_watcher_new(&w));
    sigaction(SIGCHLD, NULL, &during);
    CHECK(during.sa_handler != SIG_DFL && during.sa_handler != SIG_IGN);
    CHECK_OK(ca_child_watcher_close(w));
    sigaction(SIGCHLD, NULL, &after);
    CHECK(after.sa_handler == SIG_DFL);
    ca_child_watcher_unref(w);
}

TEST(watcher_pidfd_no_signals_no_threads)
{
    ca_loop *l = new_epoll();
    ca_child_watcher *w = wmake(W_PIDFD, l);
    if (!w) SKIP("no pidfd");
    struct sigaction before, during;
    sigaction(SIGCHLD, NULL, &before);
    int t0 = nthreads();
    struct wrec rec[2];
    memset(rec, 0, sizeof rec);
    rec[1].tag = -1;
    pid_t pid = spawn_sh("sleep 0.05; exit 1");
    CHECK_OK(ca_child_watcher_add_child_handler(w, pid, wrec_cb, &rec[0]));
    CHECK_EQ(nthreads(), t0);
    sigaction(SIGCHLD, NULL, &during);
    CHECK(during.sa_handler == before.sa_handler);
    CHECK(t_run_until(l, wrec_all, rec, 5.0));
    CHECK_EQ(nthreads(), t0);
    wdone(w);
    loop_done(l);
}

/* Threaded, MultiLoop, Safe, Pidfd never reap a child they were not given: other code's
 * waitpid() keeps working. */
TEST(watcher_others_waitpid_undisturbed)
{
    ca_loop *l = new_epoll();
    int kinds[] = {W_THREADED, W_MULTILOOP, W_SAFE, W_PIDFD, W_URING};
    for (int i = 0; i < 5; i++) {
        ca_child_watcher *w = wmake(kinds[i], l);
        if (!w) continue;
        struct wrec rec[2];
        memset(rec, 0, sizeof rec);
        rec[1].tag = -1;
        pid_t mine = spawn_sh("sleep 0.05; exit 1");
        CHECK_OK(ca_child_watcher_add_child_handler(w, mine, wrec_cb, &rec[0]));
        pid_t other = spawn_sh("exit 9");
        wait_exited(other);
        CHECK(t_run_until(l, wrec_all, rec, 5.0));
        t_run_for(l, 0.02);
        int st = 0;
        pid_t r = waitpid(other, &st, WNOHANG);
        if (r != other) t_fail(__FILE__, __LINE__, "%s reaped a child it was not given", wname[kinds[i]]);
        CHECK(WIFEXITED(st) && WEXITSTATUS(st) == 9);
        wdone(w);
    }
    loop_done(l);
}

/* close_stdin "after the buffered data is written"; CA_DEVNULL stdin reads EOF. */
LOOP_TEST(proc_write_big_then_close_stdin)
{
    const char *argv[] = {"wc", "-c", NULL};
    ca_subprocess_options o = {.argv = argv, .stdin_mode = CA_PIPE, .stdout_mode = CA_PIPE};
    struct pstat s = {.loop = loop};
    ca_process *p = NULL;
    CHECK_OK(ca_loop_subprocess_exec(loop, &o, &pproto, &s, &p));
    size_t n = 1u << 20;
    char *buf = malloc(n);
    memset(buf, 'a', n);
    CHECK_OK(ca_process_write(p, buf, n));
    free(buf); /* the process keeps its own copy */
    CHECK_OK(ca_process_write(p, "tail", 4));
    CHECK_OK(ca_process_close_stdin(p));
    CHECK_EQ(pwait(loop, p), 0);
    s.out[s.nout] = 0;
    CHECK_EQ(atol(s.out), (long)n + 4);
    ca_process_unref(p);
    const char *argv2[] = {"sh", "-c", "cat; echo done", NULL};
    ca_subprocess_options o2 = {.argv = argv2, .stdin_mode = CA_DEVNULL, .stdout_mode = CA_PIPE};
    struct pstat s2 = {.loop = loop};
    CHECK_OK(ca_loop_subprocess_exec(loop, &o2, &pproto, &s2, &p));
    CHECK_EQ(pwait(loop, p), 0);
    CHECK(s2.nout == 5 && memcmp(s2.out, "done\n", 5) == 0);
    ca_process_unref(p);
}

/* Subprocesses on a loop in another thread, default policy (Threaded watcher). */
static void *proc_thread(void *arg)
{
    int *rc = arg;
    ca_loop *l = new_epoll();
    CHECK_OK(ca_set_event_loop(l));
    const char *argv[] = {"sh", "-c", "exit 8", NULL};
    ca_subprocess_options o = {.argv = argv};
    ca_process *p = NULL;
    CHECK_OK(ca_loop_subprocess_exec(l, &o, NULL, NULL, &p));
    *rc = pwait(l, p);
    ca_process_unref(p);
    CHECK_OK(ca_set_event_loop(NULL));
    loop_done(l);
    return NULL;
}

TEST(proc_in_other_thread)
{
    int rc = -1;
    pthread_t t;
    CHECK_EQ(pthread_create(&t, NULL, proc_thread, &rc), 0);
    pthread_join(t, NULL);
    CHECK_EQ(rc, 8);
}

/* A process whose loop is never set current (only running) still works: delivery goes to the
 * running loop. */
struct pr_run {
    ca_process *p;
    int rc;
    ca_loop *loop;
};
static void pr_exec_cb(void *arg)
{
    struct pr_run *x = arg;
    const char *argv[] = {"sh", "-c", "exit 6", NULL};
    ca_subprocess_options o = {.argv = argv};
    CHECK_OK(ca_loop_subprocess_exec(x->loop, &o, NULL, NULL, &x->p));
}

static void *proc_thread_running_only(void *arg)
{
    struct pr_run *x = arg;
    x->loop = new_epoll();
    CHECK_OK(ca_loop_call_soon(x->loop, pr_exec_cb, x, NULL));
    run_once(x->loop);
    x->rc = pwait(x->loop, x->p);
    ca_process_unref(x->p);
    loop_done(x->loop);
    return NULL;
}

TEST(proc_thread_running_loop_not_current)
{
    struct pr_run x = {0};
    pthread_t t;
    CHECK_EQ(pthread_create(&t, NULL, proc_thread_running_only, &x), 0);
    pthread_join(t, NULL);
    CHECK_EQ(x.rc, 6);
}

/* set_event_loop in the main thread "returns that call's [attach_loop's] error, the loop being
 * set all the same" (header). A custom loop without signal handlers cannot take a Safe watcher. */
TEST(policy_set_event_loop_attach_error_loop_still_set)
{
    ca_child_watcher *w = NULL;
    CHECK_OK(ca_safe_child_watcher_new(&w));
    CHECK_OK(ca_set_child_watcher(w));
    struct spy s = {0};
    ca_loop *l = NULL;
    CHECK_OK(ca_loop_new_custom(&bare_ops, &s, &l));
    int r = ca_set_event_loop(l);
    CHECK(r < 0);
    ca_loop *got = NULL;
    CHECK_OK(ca_get_event_loop(&got));
    CHECK(got == l);
    CHECK(!ca_child_watcher_is_active(w));
    CHECK_OK(ca_set_child_watcher(NULL));
    ca_child_watcher_unref(w);
    CHECK_OK(ca_set_event_loop(NULL));
    loop_done(l);
}

/* A child forked from a non-main thread: that thread is the child's main thread, and nothing
 * inherited is returned. */
static void *fork_from_thread(void *arg)
{
    ca_loop *parent_loop = arg;
    pid_t pid = fork();
    if (pid == 0) {
        ca_loop *got = NULL;
        int r = ca_get_event_loop(&got);
        int bad = 0;
        if (r != 0) bad |= 1; /* main thread here: an automatic loop */
        if (r == 0 && got == parent_loop) bad |= 2;
        t_child_exit(bad);
    }
    int st = 0;
    waitpid(pid, &st, 0);
    return (void *)(intptr_t)(WIFEXITED(st) ? WEXITSTATUS(st) : 100);
}

TEST(policy_fork_from_thread_child_main_thread)
{
    ca_loop *m = new_epoll();
    CHECK_OK(ca_set_event_loop(m));
    pthread_t t;
    void *res = NULL;
    CHECK_EQ(pthread_create(&t, NULL, fork_from_thread, m), 0);
    pthread_join(t, &res);
    CHECK_EQ((intptr_t)res, 0);
    CHECK_OK(ca_set_event_loop(NULL));
    loop_done(m);
}

/* "A thread's reference to its loop is dropped when the thread exits" (header). */
static void *set_and_exit(void *arg)
{
    CHECK_OK(ca_set_event_loop(arg));
    return NULL;
}

TEST(policy_thread_exit_drops_its_loop)
{
    struct spy s = {0};
    ca_loop *l = NULL;
    CHECK_OK(ca_loop_new_custom(&bare_ops, &s, &l));
    pthread_t t;
    CHECK_EQ(pthread_create(&t, NULL, set_and_exit, l), 0);
    pthread_join(t, NULL);
    CHECK_OK(ca_loop_close(l));
    ca_loop_unref(l);
    for (int i = 0; i < 100 && s.destroyed == 0; i++) sleep_s(0.01);
    CHECK_EQ(s.destroyed, 1);
}

/* run_until_complete: stopped before the future is done -> -EAGAIN, future left pending. */
LOOP_TEST(loop_run_until_complete_stopped_eagain)
{
    ca_future *f = NULL;
    CHECK_OK(ca_future_new(loop, &f));
    CHECK_OK(ca_loop_call_later(loop, 0.005, stop_cb, loop, NULL));
    CHECK_ERR(ca_loop_run_until_complete(loop, f), -EAGAIN);
    CHECK(!ca_future_done(f));
    CHECK_OK(ca_loop_call_later(loop, 0.005, set_res_cb, f, NULL));
    CHECK_ERR(ca_loop_run_until_complete(loop, f), 0);
    ca_future_unref(f);
}

/* Removing the last handler of a signal restores the disposition; with two loops on the signal,
 * removing one keeps the other's. */
TEST(loop_signal_disposition_restore_two_loops)
{
    ca_loop *a = new_epoll(), *b = NULL;
    CHECK_OK(ca_poll_loop_new(&b));
    struct sigaction sa;
    int na = 0, nb = 0;
    CHECK_OK(ca_loop_add_signal_handler(a, SIGUSR1, count_cb, &na));
    CHECK_OK(ca_loop_add_signal_handler(b, SIGUSR1, count_cb, &nb));
    CHECK_EQ(ca_loop_remove_signal_handler(a, SIGUSR1), 1);
    sigaction(SIGUSR1, NULL, &sa);
    CHECK(sa.sa_handler != SIG_DFL);
    kill(getpid(), SIGUSR1);
    CHECK(t_run_until(b, t_flag_set, &nb, 2.0));
    t_run_for(a, 0.01);
    CHECK_EQ(na, 0);
    CHECK_EQ(ca_loop_remove_signal_handler(b, SIGUSR1), 1);
    sigaction(SIGUSR1, NULL, &sa);
    CHECK(sa.sa_handler == SIG_DFL);
    /* Closing a loop removes its handlers and restores too. */
    CHECK_OK(ca_loop_add_signal_handler(a, SIGUSR2, count_cb, &na));
    loop_done(a);
    sigaction(SIGUSR2, NULL, &sa);
    CHECK(sa.sa_handler == SIG_DFL);
    loop_done(b);
}

/* Provided sock_* ops are called (after the checks) and their result returned. */
TEST(custom_sock_ops_called)
{
    struct spy s = {0};
    ca_loop *l = NULL;
    CHECK_OK(ca_loop_new_custom(&spy_ops, &s, &l));
    int sv[2];
    sockpair(sv);
    char buf[4];
    ca_future *f = SENT_FUT;
    CHECK_ERR(ca_loop_sock_recv(l, sv[0], buf, 4, &f), -ENOSYS);
    CHECK_ERR(ca_loop_sock_sendall(l, sv[0], buf, 4, &f), -ENOSYS);
    CHECK_ERR(ca_loop_sock_accept(l, sv[0], &f), -ENOSYS);
    struct sockaddr_in sa = {.sin_family = AF_INET};
    CHECK_ERR(ca_loop_sock_connect(l, sv[0], (struct sockaddr *)&sa, sizeof sa, &f), -ENOSYS);
    CHECK_EQ(s.calls, 4);
    CHECK(f == SENT_FUT);
    close(sv[0]);
    close(sv[1]);
    loop_done(l);
}

/* Custom loop: ca_loop_stop and ca_loop_close call the ops once (core part + op). */
TEST(custom_stop_close_ops_called)
{
    struct spy s = {0};
    ca_loop *l = NULL;
    CHECK_OK(ca_loop_new_custom(&spy_ops, &s, &l));
    ca_loop_stop(l);
    CHECK(s.stops <= 1);
    CHECK_OK(ca_loop_enter_running(l));
    ca_loop_stop(l);
    CHECK(s.stops >= 1);
    CHECK_OK(ca_loop_exit_running(l));
    CHECK_OK(ca_loop_close(l));
    CHECK_EQ(s.closes, 1);
    ca_loop_unref(l);
    CHECK_EQ(s.destroyed, 1);
}

/* set_event_loop_policy(NULL): a new default policy, as asyncio: the main thread's
 * get_event_loop makes a fresh loop there; the old policy's loops are dropped. */
TEST(policy_set_null_fresh_default)
{
    struct spy s = {0};
    ca_loop *l = NULL;
    CHECK_OK(ca_loop_new_custom(&bare_ops, &s, &l));
    CHECK_OK(ca_set_event_loop(l));
    ca_loop_unref(l); /* the policy holds the only reference */
    ca_policy *old = ca_get_event_loop_policy();
    CHECK_OK(ca_set_event_loop_policy(NULL));
    CHECK(s.destroyed == 1);
    ca_policy *now = ca_get_event_loop_policy();
    CHECK(now != NULL);
    (void)old;
    ca_loop *got = NULL;
    CHECK_OK(ca_get_event_loop(&got));
    CHECK(got != NULL && strcmp(ca_loop_kind(got), "epoll") == 0);
    CHECK_OK(ca_set_event_loop(NULL));
}

/* The loop's own SIGCHLD handler and MultiLoop's share the process-wide fan-out: adding and
 * removing a loop's SIGCHLD handler does not break MultiLoop, nor does a Safe watcher's detach. */
TEST(watcher_multiloop_with_loop_sigchld_handler)
{
    ca_loop *l = new_epoll();
    ca_child_watcher *w = wmake(W_MULTILOOP, l);
    int n = 0;
    CHECK_OK(ca_loop_add_signal_handler(l, SIGCHLD, count_cb, &n));
    CHECK_EQ(ca_loop_remove_signal_handler(l, SIGCHLD), 1);
    ca_child_watcher *safe = NULL;
    CHECK_OK(ca_safe_child_watcher_new(&safe));
    CHECK_OK(ca_child_watcher_attach_loop(safe, l));
    CHECK_OK(ca_child_watcher_close(safe));
    ca_child_watcher_unref(safe);
    struct wrec rec[2];
    memset(rec, 0, sizeof rec);
    rec[1].tag = -1;
    pid_t pid = spawn_sh("sleep 0.02; exit 3");
    CHECK_OK(ca_child_watcher_add_child_handler(w, pid, wrec_cb, &rec[0]));
    CHECK(t_run_until(l, wrec_all, rec, 5.0));
    CHECK_EQ(rec[0].rc, 3);
    wdone(w);
    loop_done(l);
}

/* ca_run with a custom-loop factory: subprocesses and watchers use only the public loop API,
 * "so they work on any loop, built-in or custom". */
static ca_future *rmain_custom(ca_loop *loop, void *arg)
{
    const char *argv[] = {"sh", "-c", "echo hi; exit 4", NULL};
    ca_subprocess_options o = {.argv = argv, .stdout_mode = CA_PIPE};
    struct pstat *s = arg;
    s->loop = loop;
    ca_process *p = NULL;
    CHECK_OK(ca_loop_subprocess_exec(loop, &o, &pproto, s, &p));
    ca_future *f = NULL;
    CHECK_OK(ca_process_wait(p, &f));
    ca_process_unref(p);
    return f;
}

TEST(run_custom_loop_factory_subprocess)
{
    struct pstat s = {0};
    CHECK_ERR(ca_run(rmain_custom, &s, t_custom_loop_new), 0);
    CHECK(s.nout == 3 && memcmp(s.out, "hi\n", 3) == 0);
    CHECK_EQ(s.exited, 1);
    CHECK_EQ(s.wrong_loop, 0);
}

/* "deliver to the loop running in the thread that added the handler, or, when none runs there,
 * to that thread's current loop": running wins over current. */
struct rvc {
    ca_child_watcher *w;
    ca_loop *run;
    pid_t pid;
    int add_r;
    struct wrec rec[2];
    ca_loop *cb_loop;
};
static void rvc_cb(pid_t pid, int rc, void *arg)
{
    struct rvc *x = arg;
    x->cb_loop = ca_get_running_loop();
    wrec_cb(pid, rc, &x->rec[0]);
}
static void rvc_add(void *arg)
{
    struct rvc *x = arg;
    x->add_r = ca_child_watcher_add_child_handler(x->w, x->pid, rvc_cb, x);
}

TEST(watcher_running_loop_wins_over_current)
{
    int kinds[] = {W_THREADED, W_MULTILOOP, W_PIDFD, W_URING};
    ca_loop *cur = new_epoll();
    CHECK_OK(ca_set_event_loop(cur));
    for (int i = 0; i < 4; i++) {
        struct rvc x;
        memset(&x, 0, sizeof x);
        x.rec[1].tag = -1;
        int r = wnew(kinds[i], &x.w);
        if (r == -ENOSYS) continue;
        CHECK_OK(r);
        x.run = new_epoll();
        x.pid = spawn_sh("sleep 0.02; exit 2");
        CHECK_OK(ca_loop_call_soon(x.run, rvc_add, &x, NULL));
        run_once(x.run);
        CHECK_OK(x.add_r);
        if (!t_run_until(x.run, wrec_all, x.rec, 5.0))
            t_fail(__FILE__, __LINE__, "%s: not delivered to the running loop", wname[kinds[i]]);
        if (kinds[i] != W_THREADED && kinds[i] != W_MULTILOOP) CHECK(x.cb_loop == x.run);
        CHECK_OK(ca_child_watcher_close(x.w));
        ca_child_watcher_unref(x.w);
        loop_done(x.run);
    }
    CHECK_OK(ca_set_event_loop(NULL));
    loop_done(cur);
}

/* exec on a loop that is neither running nor current (another loop is current): everything is
 * delivered on `loop`. */
TEST(proc_loop_not_current_not_running)
{
    ca_loop *cur = new_epoll(), *l = NULL;
    CHECK_OK(ca_poll_loop_new(&l));
    CHECK_OK(ca_set_event_loop(cur));
    const char *argv[] = {"sh", "-c", "echo a; exit 9", NULL};
    ca_subprocess_options o = {.argv = argv, .stdout_mode = CA_PIPE};
    struct pstat s = {.loop = l};
    ca_process *p = NULL;
    CHECK_OK(ca_loop_subprocess_exec(l, &o, &pproto, &s, &p));
    CHECK_EQ(pwait(l, p), 9);
    CHECK_EQ(s.wrong_loop, 0);
    CHECK_EQ(s.exited, 1);
    ca_process_unref(p);
    CHECK_OK(ca_set_event_loop(NULL));
    loop_done(cur);
    loop_done(l);
}

static void *proc_thread_no_loop(void *arg)
{
    int *rc = arg;
    ca_loop *l = new_epoll();
    const char *argv[] = {"sh", "-c", "exit 12", NULL};
    ca_subprocess_options o = {.argv = argv};
    ca_process *p = NULL;
    int r = ca_loop_subprocess_exec(l, &o, NULL, NULL, &p);
    CHECK_OK(r);
    *rc = pwait(l, p);
    ca_process_unref(p);
    loop_done(l);
    return NULL;
}

TEST(proc_thread_loop_neither_current_nor_running)
{
    int rc = -1;
    pthread_t t;
    CHECK_EQ(pthread_create(&t, NULL, proc_thread_no_loop, &rc), 0);
    pthread_join(t, NULL);
    CHECK_EQ(rc, 12);
}

/* Threaded = "one waiting thread per child". */
TEST(watcher_threaded_one_thread_per_child)
{
    ca_loop *l = new_epoll();
    ca_child_watcher *w = wmake(W_THREADED, l);
    int t0 = nthreads();
    struct wrec rec[4];
    memset(rec, 0, sizeof rec);
    rec[3].tag = -1;
    for (int i = 0; i < 3; i++) {
        pid_t pid = spawn_sh("sleep 0.2");
        CHECK_OK(ca_child_watcher_add_child_handler(w, pid, wrec_cb, &rec[i]));
    }
    int d = nthreads() - t0;
    CHECK(d == 3 || d == 4); /* ThreadSanitizer may start its own background thread */
    CHECK(t_run_until(l, wrec_all, rec, 5.0));
    wdone(w);
    loop_done(l);
}

/* Watchers in a forked child (header: -ECHILD, close/unref free memory only); the parent's
 * watcher keeps working. */
TEST(watcher_fork_child_echild)
{
    ca_loop *l = new_epoll();
    for (int k = 0; k < W_COUNT; k++) {
        ca_child_watcher *w = wmake(k, l);
        if (!w) continue;
        pid_t pid = fork();
        if (pid == 0) {
            int bad = 0;
            if (ca_child_watcher_add_child_handler(w, 1, wrec_cb, NULL) != -ECHILD) bad |= 1;
            if (ca_child_watcher_remove_child_handler(w, 1) != -ECHILD) bad |= 2;
            if (ca_child_watcher_is_active(w)) bad |= 4;
            if (ca_child_watcher_add_child_handler(w, 0, wrec_cb, NULL) != -EINVAL) bad |= 8;
            if (ca_child_watcher_close(w) != 0) bad |= 16;
            ca_child_watcher_unref(w);
            t_child_exit(bad);
        }
        int st;
        while (waitpid(pid, &st, 0) < 0 && errno == EINTR) {
        }
        /* Fast may have reaped our test child itself: then its status is lost to us. */
        if (k != W_FAST) {
            CHECK(WIFEXITED(st));
            if (WEXITSTATUS(st) != 0) t_fail(__FILE__, __LINE__, "%s: child bits %d", wname[k], WEXITSTATUS(st));
        }
        struct wrec rec[2];
        memset(rec, 0, sizeof rec);
        rec[1].tag = -1;
        pid_t c = spawn_sh("exit 5");
        CHECK_OK(ca_child_watcher_add_child_handler(w, c, wrec_cb, &rec[0]));
        if (!t_run_until(l, wrec_all, rec, 5.0)) t_fail(__FILE__, __LINE__, "%s: broken by the child", wname[k]);
        CHECK_EQ(rec[0].rc, 5);
        wdone(w);
    }
    loop_done(l);
}

/* bpo-32115 (header): an inherited SIGCHLD SIG_IGN would make the kernel reap children; the
 * watchers set SIG_DFL while active, so return codes are still read. */
TEST(watcher_sigchld_ignored_still_reads_status)
{
    ca_set_log_handler(quiet_log, NULL);
    signal(SIGCHLD, SIG_IGN);
    ca_loop *l = new_epoll();
    ca_child_watcher *w = wmake(W_THREADED, l);
    struct wrec rec[2];
    memset(rec, 0, sizeof rec);
    rec[1].tag = -1;
    pid_t c = spawn_sh("exit 5");
    CHECK_OK(ca_child_watcher_add_child_handler(w, c, wrec_cb, &rec[0]));
    CHECK(t_run_until(l, wrec_all, rec, 5.0));
    CHECK_EQ(rec[0].rc, 5);
    wdone(w);
    loop_done(l);
    struct sigaction sa;
    sigaction(SIGCHLD, NULL, &sa);
    CHECK(sa.sa_handler == SIG_IGN);
    signal(SIGCHLD, SIG_DFL);
}

/* "one log line each" with the default handler: exactly one stderr line per killed process. */
TEST(proc_loop_close_default_handler_one_line_each)
{
    ca_loop *l = new_epoll();
    const char *argv[] = {"sleep", "30", NULL};
    ca_subprocess_options o = {.argv = argv};
    ca_process *p[2] = {NULL, NULL};
    for (int i = 0; i < 2; i++) CHECK_OK(ca_loop_subprocess_exec(l, &o, NULL, NULL, &p[i]));
    t_run_for(l, 0.02);
    int saved;
    int rfd = capture_stderr_begin(&saved);
    CHECK_OK(ca_loop_close(l));
    char buf[4096];
    size_t n = capture_stderr_end(rfd, saved, buf, sizeof buf);
    int lines = 0;
    for (size_t i = 0; i < n; i++) lines += buf[i] == '\n';
    if (lines != 2) t_fail(__FILE__, __LINE__, "%d stderr lines for 2 killed processes: [%s]", lines, buf);
    for (int i = 0; i < 2; i++) ca_process_unref(p[i]);
    ca_loop_unref(l);
}

/* Bad argument before closed: a future of another loop. */
TEST(conv_precedence_other_loops_future_on_closed_loop)
{
    ca_loop *a = new_epoll(), *b = new_epoll();
    ca_future *f = NULL;
    CHECK_OK(ca_future_new(b, &f));
    CHECK_OK(ca_loop_close(a));
    CHECK_ERR(ca_loop_run_until_complete(a, f), -EINVAL);
    ca_future_unref(f);
    ca_loop_unref(a);
    loop_done(b);
}

/* Bad argument before closed: more of the header's -EINVAL cases (fd not open, NULL buf). */
LOOP_TEST(conv_precedence_more_bad_args_on_closed_loop)
{
    CHECK_OK(ca_loop_close(loop));
    char buf[4];
    ca_future *f = SENT_FUT;
    int sv[2];
    sockpair(sv);
    CHECK_ERR(ca_loop_add_reader(loop, 1000, noop, NULL), -EINVAL);
    CHECK_ERR(ca_loop_add_writer(loop, 1000, noop, NULL), -EINVAL);
    CHECK_ERR(ca_loop_sock_recv(loop, sv[0], NULL, 4, &f), -EINVAL);
    CHECK_ERR(ca_loop_sock_sendall(loop, sv[0], NULL, 4, &f), -EINVAL);
    CHECK_ERR(ca_loop_sock_recv(loop, 1000, buf, 4, &f), -EINVAL);
    CHECK_ERR(ca_loop_sock_accept(loop, 1000, &f), -EINVAL);
    CHECK(f == SENT_FUT);
    const char *argv[] = {"/bin/true", NULL};
    ca_subprocess_options o = {.argv = argv, .stdout_mode = CA_STDOUT};
    ca_process *p = SENT_PROC;
    CHECK_ERR(ca_loop_subprocess_exec(loop, &o, NULL, NULL, &p), -EINVAL);
    CHECK(p == SENT_PROC);
    close(sv[0]);
    close(sv[1]);
}

/* Fork before closed, bad argument before fork: a future of another loop in a forked child. */
TEST(conv_precedence_fork_other_loops_future)
{
    ca_loop *a = new_epoll(), *b = new_epoll();
    ca_future *f = NULL;
    CHECK_OK(ca_future_new(b, &f));
    pid_t pid = fork();
    if (pid == 0) {
        int bad = 0;
        if (ca_loop_run_until_complete(a, f) != -EINVAL) bad |= 1;
        if (ca_loop_run_until_complete(a, NULL) != -EINVAL) bad |= 2;
        t_child_exit(bad);
    }
    int st;
    CHECK_EQ(waitpid(pid, &st, 0), pid);
    CHECK(WIFEXITED(st));
    CHECK_EQ(WEXITSTATUS(st), 0);
    ca_future_unref(f);
    loop_done(a);
    loop_done(b);
}

/* "*out is never written on failure" even when an op writes it and then fails. */
static int bad_get(ca_policy *self, ca_loop **out)
{
    *out = (ca_loop *)(uintptr_t)0x1234;
    return -EIO;
}
static int bad_new(ca_policy *self, ca_loop **out)
{
    *out = (ca_loop *)(uintptr_t)0x1234;
    return -EIO;
}
static int bad_gw(ca_policy *self, ca_child_watcher **out)
{
    *out = (ca_child_watcher *)(uintptr_t)0x1234;
    return -EIO;
}
static const ca_policy_ops bad_ops = {.get_event_loop = bad_get, .new_event_loop = bad_new,
                                      .get_child_watcher = bad_gw};

TEST(policy_out_untouched_when_op_fails)
{
    ca_policy *p = NULL;
    CHECK_OK(ca_policy_new(&bad_ops, NULL, NULL, &p));
    ca_loop *l = SENT_LOOP;
    ca_child_watcher *w = SENT_W;
    CHECK_ERR(ca_policy_get_event_loop(p, &l), -EIO);
    CHECK_ERR(ca_policy_new_event_loop(p, &l), -EIO);
    CHECK_ERR(ca_policy_get_child_watcher(p, &w), -EIO);
    CHECK(l == SENT_LOOP && w == SENT_W);
    CHECK_OK(ca_set_event_loop_policy(p));
    CHECK_ERR(ca_get_event_loop(&l), -EIO);
    CHECK_ERR(ca_new_event_loop(&l), -EIO);
    CHECK_ERR(ca_get_child_watcher(&w), -EIO);
    CHECK(l == SENT_LOOP && w == SENT_W);
    /* ca_run with the policy's failing new_event_loop: its error, main not called. */
    struct rstate s = {0};
    CHECK_ERR(ca_run(rmain, &s, NULL), -EIO);
    CHECK_EQ(s.called, 0);
    CHECK_OK(ca_set_event_loop_policy(NULL));
    ca_policy_unref(p);
}

/* "everything in ... Child watchers ... is safe from any thread": several threads, each with
 * its own loop, share one Threaded and one MultiLoop watcher. */
struct mt {
    ca_child_watcher *w[2];
    int ok;
};
static void *mt_thread(void *arg)
{
    struct mt *m = arg;
    ca_loop *l = NULL;
    CHECK_OK(ca_poll_loop_new(&l));
    CHECK_OK(ca_set_event_loop(l));
    enum { N = 4 };
    struct wrec rec[2 * N + 1];
    memset(rec, 0, sizeof rec);
    rec[2 * N].tag = -1;
    for (int i = 0; i < 2 * N; i++) {
        pid_t pid = spawn_sh(i % 2 ? "exit 3" : "sleep 0.01; exit 3");
        CHECK_OK(ca_child_watcher_add_child_handler(m->w[i % 2], pid, wrec_cb, &rec[i]));
    }
    bool all = t_run_until(l, wrec_all, rec, 10.0);
    t_run_for(l, 0.02);
    int good = all;
    for (int i = 0; i < 2 * N; i++) good &= atomic_load(&rec[i].n) == 1 && rec[i].rc == 3;
    m->ok = good;
    CHECK_OK(ca_set_event_loop(NULL));
    loop_done(l);
    return NULL;
}

TEST(watcher_shared_by_threads) /* timeout: 60 */
{
    ca_child_watcher *a = NULL, *b = NULL;
    CHECK_OK(ca_threaded_child_watcher_new(&a));
    CHECK_OK(ca_multiloop_child_watcher_new(&b));
    struct mt m[3];
    pthread_t t[3];
    for (int i = 0; i < 3; i++) {
        m[i].w[0] = a;
        m[i].w[1] = b;
        m[i].ok = 0;
        CHECK_EQ(pthread_create(&t[i], NULL, mt_thread, &m[i]), 0);
    }
    for (int i = 0; i < 3; i++) {
        pthread_join(t[i], NULL);
        if (!m[i].ok) t_fail(__FILE__, __LINE__, "thread %d: exits lost or duplicated", i);
    }
    CHECK_OK(ca_child_watcher_close(a));
    CHECK_OK(ca_child_watcher_close(b));
    ca_child_watcher_unref(a);
    ca_child_watcher_unref(b);
}

/* ca_get_event_loop always answers for the current process policy and its current state
 * (whatever caching is done underneath). */
static ca_loop *fixed_loop;
static int fixed_get(ca_policy *self, ca_loop **out)
{
    *out = fixed_loop;
    return 0;
}
static const ca_policy_ops fixed_ops = {.get_event_loop = fixed_get};

TEST(policy_get_event_loop_follows_every_change)
{
    ca_loop *a = new_epoll(), *b = new_epoll(), *got = NULL;
    CHECK_OK(ca_set_event_loop(a));
    CHECK_OK(ca_get_event_loop(&got));
    CHECK(got == a);
    /* Set through the policy object rather than the module function. */
    CHECK_OK(ca_policy_set_event_loop(ca_get_event_loop_policy(), b));
    CHECK_OK(ca_get_event_loop(&got));
    CHECK(got == b);
    /* A new process policy whose get_event_loop is custom. */
    ca_policy *def = NULL, *p = NULL;
    CHECK_OK(ca_default_policy_new(&def));
    fixed_loop = a;
    CHECK_OK(ca_policy_new(&fixed_ops, NULL, def, &p));
    CHECK_OK(ca_set_event_loop_policy(p));
    CHECK_OK(ca_get_event_loop(&got));
    CHECK(got == a);
    fixed_loop = b;
    CHECK_OK(ca_get_event_loop(&got));
    CHECK(got == b);
    /* Back to a plain default policy: nothing set in it, main thread: a new automatic loop. */
    ca_policy *d2 = NULL;
    CHECK_OK(ca_default_policy_new(&d2));
    CHECK_OK(ca_policy_set_event_loop(d2, a));
    CHECK_OK(ca_set_event_loop_policy(d2));
    CHECK_OK(ca_get_event_loop(&got));
    CHECK(got == a);
    CHECK_OK(ca_policy_set_event_loop(def, b)); /* another policy: no effect here */
    CHECK_OK(ca_get_event_loop(&got));
    CHECK(got == a);
    CHECK_OK(ca_set_event_loop(NULL));
    got = SENT_LOOP;
    CHECK_ERR(ca_get_event_loop(&got), -ENOENT);
    CHECK_OK(ca_set_event_loop_policy(NULL));
    CHECK_OK(ca_policy_set_event_loop(def, NULL));
    ca_policy_unref(def);
    ca_policy_unref(p);
    ca_policy_unref(d2);
    CHECK_OK(ca_set_event_loop(NULL));
    loop_done(a);
    loop_done(b);
}

/* A loop set in one thread's context is not seen by another thread, even after the other
 * thread looked it up before. */
struct cachethr {
    ca_loop *mine;
    pthread_barrier_t *bar;
    int ok;
};
static void *cache_thread(void *arg)
{
    struct cachethr *c = arg;
    ca_loop *got = SENT_LOOP;
    int r1 = ca_get_event_loop(&got);
    pthread_barrier_wait(c->bar); /* main sets its loop */
    pthread_barrier_wait(c->bar);
    int r2 = ca_get_event_loop(&got);
    CHECK_OK(ca_set_event_loop(c->mine));
    ca_loop *g2 = NULL;
    int r3 = ca_get_event_loop(&g2);
    c->ok = r1 == -ENOENT && r2 == -ENOENT && r3 == 0 && g2 == c->mine;
    CHECK_OK(ca_set_event_loop(NULL));
    return NULL;
}

TEST(policy_thread_contexts_separate)
{
    pthread_barrier_t bar;
    pthread_barrier_init(&bar, NULL, 2);
    struct cachethr c = {.mine = new_epoll(), .bar = &bar};
    ca_loop *m = new_epoll();
    pthread_t t;
    CHECK_EQ(pthread_create(&t, NULL, cache_thread, &c), 0);
    pthread_barrier_wait(&bar);
    CHECK_OK(ca_set_event_loop(m));
    pthread_barrier_wait(&bar);
    pthread_join(t, NULL);
    CHECK(c.ok);
    ca_loop *got = NULL;
    CHECK_OK(ca_get_event_loop(&got));
    CHECK(got == m);
    CHECK_OK(ca_set_event_loop(NULL));
    pthread_barrier_destroy(&bar);
    loop_done(m);
    loop_done(c.mine);
}

/* Writing to the stdin pipe of a child that does not read and exits: no SIGPIPE for us (the
 * caller's disposition may be the default), the pipe is reported lost, wait completes. */
LOOP_TEST(proc_stdin_to_dead_child_no_sigpipe)
{
    signal(SIGPIPE, SIG_DFL);
    const char *argv[] = {"sh", "-c", "exec 0<&-; sleep 0.05; exit 2", NULL};
    ca_subprocess_options o = {.argv = argv, .stdin_mode = CA_PIPE};
    struct pstat s = {.loop = loop};
    ca_process *p = NULL;
    CHECK_OK(ca_loop_subprocess_exec(loop, &o, &pproto, &s, &p));
    size_t n = 1u << 20;
    char *buf = calloc(1, n);
    int r = ca_process_write(p, buf, n);
    CHECK(r == 0 || r == -EPIPE);
    free(buf);
    CHECK_EQ(pwait(loop, p), 2);
    r = ca_process_write(p, "x", 1);
    CHECK(r == -EPIPE || r == 0 || r == -EBADF);
    CHECK_EQ(s.lost[0], 1);
    ca_process_unref(p);
    signal(SIGPIPE, SIG_IGN);
}

/* CA_FD targets that collide: the child's stdout is our fd 2 and its stderr our fd 1. */
TEST(proc_ca_fd_swapped_stdout_stderr)
{
    ca_loop *l = new_epoll();
    int po[2], pe[2];
    CHECK_EQ(pipe2(po, O_CLOEXEC), 0);
    CHECK_EQ(pipe2(pe, O_CLOEXEC), 0);
    fflush(stdout);
    fflush(stderr);
    int s1 = dup(1), s2 = dup(2);
    dup2(po[1], 1); /* our 1 -> pipe "o" */
    dup2(pe[1], 2); /* our 2 -> pipe "e" */
    const char *argv[] = {"sh", "-c", "echo out; echo err >&2", NULL};
    ca_subprocess_options o = {.argv = argv, .stdout_mode = CA_FD, .stdout_fd = 2,
                               .stderr_mode = CA_FD, .stderr_fd = 1};
    ca_process *p = NULL;
    int r = ca_loop_subprocess_exec(l, &o, NULL, NULL, &p);
    dup2(s1, 1);
    dup2(s2, 2);
    close(s1);
    close(s2);
    close(po[1]);
    close(pe[1]);
    CHECK_OK(r);
    CHECK_EQ(pwait(l, p), 0);
    char a[32] = {0}, b[32] = {0};
    CHECK(read(po[0], a, sizeof a - 1) > 0);
    CHECK(read(pe[0], b, sizeof b - 1) > 0);
    if (strcmp(a, "err\n") != 0 || strcmp(b, "out\n") != 0)
        t_fail(__FILE__, __LINE__, "our fd1 got [%s], our fd2 got [%s]", a, b);
    close(po[0]);
    close(pe[0]);
    ca_process_unref(p);
    loop_done(l);
}

/* The child gets only its three stdio fds (and what CA_FD names): none of ours leak into it. */
TEST(proc_child_fds_only_stdio)
{
    ca_loop *l = new_epoll();
    int keep[2];
    CHECK_EQ(pipe(keep), 0); /* not close-on-exec: still must not be inherited? asyncio: close_fds */
    const char *argv[] = {"sh", "-c", "ls /proc/self/fd | wc -l", NULL};
    ca_subprocess_options o = {.argv = argv, .stdout_mode = CA_PIPE};
    struct pstat s = {.loop = l};
    ca_process *p = NULL;
    CHECK_OK(ca_loop_subprocess_exec(l, &o, &pproto, &s, &p));
    CHECK_EQ(pwait(l, p), 0);
    s.out[s.nout] = 0;
    /* 0, 1, 2 and the fd ls uses for the directory: 4 */
    if (atoi(s.out) != 4) t_fail(__FILE__, __LINE__, "the child had %d fds open", atoi(s.out) - 1);
    ca_process_unref(p);
    close(keep[0]);
    close(keep[1]);
    loop_done(l);
}

/* With PATH unset in our environment and no envp, a bare command name is still found on the
 * default path (as execvp and Python do). */
TEST(proc_no_path_default_search)
{
    unsetenv("PATH");
    ca_loop *l = new_epoll();
    const char *argv[] = {"true", NULL};
    ca_subprocess_options o = {.argv = argv};
    ca_process *p = NULL;
    CHECK_OK(ca_loop_subprocess_exec(l, &o, NULL, NULL, &p));
    CHECK_EQ(pwait(l, p), 0);
    ca_process_unref(p);
    loop_done(l);
}

/* ca_proactor_loop_new "-ENOSYS if unusable" (header: also when CASYNCIO_NO_IO_URING=1);
 * the proactor policy returns that error; out untouched. */
TEST(proactor_enosys_when_unusable)
{
    setenv("CASYNCIO_NO_IO_URING", "1", 1);
    ca_loop *l = SENT_LOOP;
    CHECK_ERR(ca_proactor_loop_new(&l), -ENOSYS);
    CHECK(l == SENT_LOOP);
    ca_policy *p = SENT_POL;
    CHECK_ERR(ca_proactor_policy_new(&p), -ENOSYS);
    CHECK(p == SENT_POL);
    unsetenv("CASYNCIO_NO_IO_URING");
}

/* CA_STDOUT for stderr follows whatever stdout is: inherited, /dev/null, or a CA_FD. */
TEST(proc_stderr_to_stdout_any_stdout_mode)
{
    ca_loop *l = new_epoll();
    const char *argv[] = {"sh", "-c", "echo e >&2", NULL};
    int pp[2];
    CHECK_EQ(pipe2(pp, O_CLOEXEC | O_NONBLOCK), 0);
    /* inherited stdout (our fd 1 = the pipe during the spawn) */
    fflush(stdout);
    int s1 = dup(1);
    dup2(pp[1], 1);
    ca_subprocess_options o = {.argv = argv, .stderr_mode = CA_STDOUT};
    ca_process *p = NULL;
    int r = ca_loop_subprocess_exec(l, &o, NULL, NULL, &p);
    dup2(s1, 1);
    close(s1);
    CHECK_OK(r);
    CHECK_EQ(pwait(l, p), 0);
    ca_process_unref(p);
    char buf[16] = {0};
    CHECK_EQ(read(pp[0], buf, sizeof buf), 2);
    /* CA_FD stdout */
    ca_subprocess_options o2 = {.argv = argv, .stdout_mode = CA_FD, .stdout_fd = pp[1],
                                .stderr_mode = CA_STDOUT};
    CHECK_OK(ca_loop_subprocess_exec(l, &o2, NULL, NULL, &p));
    CHECK_EQ(pwait(l, p), 0);
    ca_process_unref(p);
    memset(buf, 0, sizeof buf);
    CHECK_EQ(read(pp[0], buf, sizeof buf), 2);
    CHECK(strcmp(buf, "e\n") == 0);
    /* /dev/null stdout: nothing anywhere */
    ca_subprocess_options o3 = {.argv = argv, .stdout_mode = CA_DEVNULL, .stderr_mode = CA_STDOUT};
    int s2 = dup(2);
    fflush(stderr);
    dup2(pp[1], 2);
    r = ca_loop_subprocess_exec(l, &o3, NULL, NULL, &p);
    dup2(s2, 2);
    close(s2);
    CHECK_OK(r);
    CHECK_EQ(pwait(l, p), 0);
    ca_process_unref(p);
    CHECK_EQ(read(pp[0], buf, sizeof buf), -1);
    close(pp[0]);
    close(pp[1]);
    loop_done(l);
}

/* run_forever "-EBUSY if already running" also from another thread; close -EBUSY while
 * running; is_running seen from any thread. */
struct xthr {
    ca_loop *loop;
    int run_r, close_r;
    bool running;
};
static void *xthr_main(void *arg)
{
    struct xthr *x = arg;
    x->running = ca_loop_is_running(x->loop);
    x->run_r = ca_loop_run_forever(x->loop);
    x->close_r = ca_loop_close(x->loop);
    ca_loop_stop(x->loop);
    return NULL;
}
static void xthr_cb(void *arg)
{
    struct xthr *x = arg;
    pthread_t t;
    CHECK_EQ(pthread_create(&t, NULL, xthr_main, x), 0);
    pthread_join(t, NULL);
}

LOOP_TEST(loop_busy_from_other_thread)
{
    struct xthr x = {.loop = loop};
    ca_handle *h = NULL;
    CHECK_OK(ca_loop_call_later(loop, 5.0, stop_cb, loop, &h));
    CHECK_OK(ca_loop_call_soon(loop, xthr_cb, &x, NULL));
    CHECK_OK(ca_loop_run_forever(loop));
    ca_handle_cancel(h);
    ca_handle_unref(h);
    CHECK(x.running);
    CHECK_ERR(x.run_r, -EBUSY);
    CHECK_ERR(x.close_r, -EBUSY);
    CHECK(!ca_loop_is_closed(loop));
}

/* "The exit is observed through the current policy's child watcher": a custom watcher set as
 * the policy's gets the registration (inside enter/exit) and its callback completes the
 * process. */
struct cwp {
    pid_t pid;
    ca_child_fn cb;
    void *arg;
    int enters, exits, adds_inside;
    bool active;
};
#define CWP(self) ((struct cwp *)ca_child_watcher_data(self))
static int cwp_add(ca_child_watcher *self, pid_t pid, ca_child_fn cb, void *arg)
{
    struct cwp *c = CWP(self);
    c->pid = pid;
    c->cb = cb;
    c->arg = arg;
    if (c->enters > c->exits) c->adds_inside++;
    return 0;
}
static int cwp_rm(ca_child_watcher *self, pid_t pid)
{
    struct cwp *c = CWP(self);
    if (c->cb && c->pid == pid) {
        c->cb = NULL;
        return 1;
    }
    return 0;
}
static bool cwp_active(ca_child_watcher *self) { return CWP(self)->active; }
static int cwp_enter(ca_child_watcher *self)
{
    CWP(self)->enters++;
    return 0;
}
static int cwp_exit(ca_child_watcher *self)
{
    CWP(self)->exits++;
    return 0;
}
static const ca_child_watcher_ops cwp_ops = {.add_child_handler = cwp_add,
                                             .remove_child_handler = cwp_rm,
                                             .is_active = cwp_active,
                                             .enter = cwp_enter,
                                             .exit = cwp_exit};

LOOP_TEST(proc_uses_policy_watcher)
{
    struct cwp c = {.active = true};
    ca_child_watcher *w = NULL;
    CHECK_OK(ca_child_watcher_new_custom(&cwp_ops, &c, &w));
    CHECK_OK(ca_set_child_watcher(w));
    const char *argv[] = {"sh", "-c", "exit 21", NULL};
    ca_subprocess_options o = {.argv = argv};
    ca_process *p = NULL;
    CHECK_OK(ca_loop_subprocess_exec(loop, &o, NULL, NULL, &p));
    CHECK_EQ(c.pid, ca_process_pid(p));
    CHECK(c.cb != NULL);
    CHECK_EQ(c.enters, 1);
    CHECK_EQ(c.exits, 1);
    CHECK_EQ(c.adds_inside, 1);
    int st = 0;
    CHECK_EQ(waitpid(c.pid, &st, 0), c.pid);
    CHECK(WIFEXITED(st) && WEXITSTATUS(st) == 21);
    ca_child_fn cb = c.cb;
    c.cb = NULL;
    cb(c.pid, 21, c.arg); /* the watcher reports the exit */
    CHECK_EQ(pwait(loop, p), 21);
    ca_process_unref(p);
    /* Inactive: -ENOTCONN, no child left. */
    c.active = false;
    p = SENT_PROC;
    CHECK_ERR(ca_loop_subprocess_exec(loop, &o, NULL, NULL, &p), -ENOTCONN);
    CHECK(p == SENT_PROC);
    CHECK_EQ(waitpid(-1, NULL, WNOHANG), -1);
    CHECK_OK(ca_set_child_watcher(NULL));
    ca_child_watcher_unref(w);
}

/* Seed: attach_loop "If the watcher was previously attached to an event loop, then it is first
 * detached before attaching to the new loop": Safe/Fast deliver on the new loop. */
TEST(watcher_safe_fast_reattach)
{
    for (int k = W_SAFE; k <= W_FAST; k++) {
        ca_loop *a = new_epoll(), *b = NULL;
        CHECK_OK(ca_poll_loop_new(&b));
        ca_child_watcher *w = NULL;
        CHECK_OK(wnew(k, &w));
        CHECK_OK(ca_child_watcher_attach_loop(w, a));
        struct wrec rec[2];
        memset(rec, 0, sizeof rec);
        rec[1].tag = -1;
        pid_t pid = spawn_sh("sleep 0.05; exit 6");
        CHECK_OK(ca_child_watcher_add_child_handler(w, pid, wrec_cb, &rec[0]));
        CHECK_OK(ca_child_watcher_attach_loop(w, b));
        wait_exited(pid);
        t_run_for(a, 0.05);
        CHECK_EQ(atomic_load(&rec[0].n), 0); /* not through the old loop */
        if (!t_run_until(b, wrec_all, rec, 5.0)) t_fail(__FILE__, __LINE__, "%s: not delivered on the new loop", wname[k]);
        CHECK_EQ(rec[0].rc, 6);
        CHECK_OK(ca_child_watcher_close(w));
        ca_child_watcher_unref(w);
        loop_done(a);
        loop_done(b);
    }
}

/* Closing a watcher cancels its handlers: no callback after close. */
LOOP_TEST(watcher_close_cancels_handlers)
{
    ca_set_log_handler(quiet_log, NULL);
    for (int k = 0; k < W_COUNT; k++) {
        ca_child_watcher *w = wmake(k, loop);
        if (!w) continue;
        struct wrec rec = {0};
        pid_t pid = spawn_sh("sleep 0.05");
        CHECK_OK(ca_child_watcher_add_child_handler(w, pid, wrec_cb, &rec));
        CHECK_OK(ca_child_watcher_close(w));
        wait_exited(pid);
        t_run_for(loop, 0.05);
        if (atomic_load(&rec.n) != 0) t_fail(__FILE__, __LINE__, "%s: callback after close", wname[k]);
        waitpid(pid, NULL, WNOHANG);
        ca_child_watcher_unref(w);
        CHECK_OK(ca_set_event_loop(NULL));
        sleep_s(0.02);
        waitpid(pid, NULL, WNOHANG);
    }
}

/* Threaded/MultiLoop/Pidfd: a current loop that is closed does not count (header: -ENOENT). */
static void *closed_current_thread(void *arg)
{
    ca_child_watcher *w = arg;
    ca_loop *l = new_epoll();
    CHECK_OK(ca_set_event_loop(l));
    CHECK_OK(ca_loop_close(l));
    intptr_t r = ca_child_watcher_add_child_handler(w, getpid(), wrec_cb, NULL);
    CHECK_OK(ca_set_event_loop(NULL));
    ca_loop_unref(l);
    return (void *)r;
}

TEST(watcher_closed_current_loop_enoent)
{
    int kinds[] = {W_THREADED, W_MULTILOOP, W_PIDFD, W_URING};
    for (int i = 0; i < 4; i++) {
        ca_child_watcher *w = NULL;
        if (wnew(kinds[i], &w) == -ENOSYS) continue;
        pthread_t t;
        void *res = NULL;
        CHECK_EQ(pthread_create(&t, NULL, closed_current_thread, w), 0);
        pthread_join(t, &res);
        if ((intptr_t)res != -ENOENT)
            t_fail(__FILE__, __LINE__, "%s: got %d", wname[kinds[i]], (int)(intptr_t)res);
        CHECK_OK(ca_child_watcher_close(w));
        ca_child_watcher_unref(w);
    }
}

/* ca_run "makes it current for this thread" also with a loop factory (through the policy's
 * set_event_loop), and sets the previous one again afterwards. */
static ca_loop *sel_seen[4];
static int sel_n;
static int sel_op(ca_policy *self, ca_loop *loop)
{
    if (sel_n < 4) sel_seen[sel_n++] = loop;
    return ca_policy_set_event_loop(ca_policy_base(self), loop);
}
static const ca_policy_ops sel_ops = {.set_event_loop = sel_op};
static ca_future *rmain_cur(ca_loop *loop, void *arg)
{
    ca_loop *cur = NULL;
    if (ca_policy_get_event_loop(ca_get_event_loop_policy(), &cur) == 0) *(ca_loop **)arg = cur;
    ca_future *f = NULL;
    CHECK_OK(ca_future_new(loop, &f));
    CHECK_OK(ca_future_set_result(f, loop));
    return f;
}

TEST(run_with_factory_sets_current_loop)
{
    ca_policy *def = NULL, *p = NULL;
    CHECK_OK(ca_default_policy_new(&def));
    CHECK_OK(ca_policy_new(&sel_ops, NULL, def, &p));
    ca_policy_unref(def);
    CHECK_OK(ca_set_event_loop_policy(p));
    ca_policy_unref(p);
    ca_loop *prev = new_epoll();
    CHECK_OK(ca_set_event_loop(prev));
    sel_n = 0;
    ca_loop *cur = NULL;
    CHECK_ERR(ca_run(rmain_cur, &cur, counting_factory), 0);
    CHECK(cur != NULL && cur != prev);
    CHECK(sel_n >= 2);
    CHECK(sel_seen[0] == cur);
    CHECK(sel_seen[sel_n - 1] == prev);
    ca_loop *got = NULL;
    CHECK_OK(ca_get_event_loop(&got));
    CHECK(got == prev);
    CHECK_OK(ca_set_event_loop(NULL));
    loop_done(prev);
    CHECK_OK(ca_set_event_loop_policy(NULL));
}

/* A custom op's error is returned; out untouched; the callback never runs. */
static ca_handle *failed_kept;
static int fail_soon(ca_loop *self, ca_handle *h)
{
    failed_kept = h; /* borrowed, not kept: must not be used after */
    return -EIO;
}
static int fail_at(ca_loop *self, double when, ca_handle *h) { return -EIO; }
static int fail_fd(ca_loop *self, int fd, ca_callback_fn fn, void *arg) { return -EIO; }
static const ca_loop_ops fail_ops = {.run_forever = spy_run,
                                     .call_soon = fail_soon,
                                     .call_soon_threadsafe = fail_soon,
                                     .call_at = fail_at,
                                     .add_reader = fail_fd,
                                     .add_writer = fail_fd,
                                     .add_signal_handler = fail_fd};

TEST(custom_op_error_returned)
{
    ca_loop *l = NULL;
    CHECK_OK(ca_loop_new_custom(&fail_ops, NULL, &l));
    ca_handle *h = SENT_HANDLE;
    int n = 0;
    CHECK_ERR(ca_loop_call_soon(l, count_cb, &n, &h), -EIO);
    CHECK_ERR(ca_loop_call_soon_threadsafe(l, count_cb, &n), -EIO);
    CHECK_ERR(ca_loop_call_later(l, 1, count_cb, &n, &h), -EIO);
    CHECK_ERR(ca_loop_call_at(l, 1, count_cb, &n, &h), -EIO);
    CHECK(h == SENT_HANDLE);
    int p[2];
    CHECK_EQ(pipe2(p, O_CLOEXEC), 0);
    CHECK_ERR(ca_loop_add_reader(l, p[0], count_cb, &n), -EIO);
    CHECK_ERR(ca_loop_add_writer(l, p[1], count_cb, &n), -EIO);
    CHECK_ERR(ca_loop_add_signal_handler(l, SIGUSR1, count_cb, &n), -EIO);
    CHECK_EQ(n, 0);
    close(p[0]);
    close(p[1]);
    loop_done(l);
}

/* "never NULL: creates the default lazily" — once, also when many threads ask first at once. */
static pthread_barrier_t lazy_bar;
static void *lazy_thread(void *arg)
{
    pthread_barrier_wait(&lazy_bar);
    *(ca_policy **)arg = ca_get_event_loop_policy();
    return NULL;
}

TEST(policy_lazy_default_race_free)
{
    enum { N = 8 };
    pthread_t t[N];
    ca_policy *got[N];
    pthread_barrier_init(&lazy_bar, NULL, N);
    for (int i = 0; i < N; i++) CHECK_EQ(pthread_create(&t[i], NULL, lazy_thread, &got[i]), 0);
    for (int i = 0; i < N; i++) pthread_join(t[i], NULL);
    pthread_barrier_destroy(&lazy_bar);
    for (int i = 0; i < N; i++) {
        CHECK(got[i] != NULL);
        CHECK(got[i] == got[0]);
    }
    CHECK(ca_get_event_loop_policy() == got[0]);
}

/* ca_process_write: NULL buffer with n > 0 is a bad argument. */
LOOP_TEST(proc_write_bad_args)
{
    const char *argv[] = {"cat", NULL};
    ca_subprocess_options o = {.argv = argv, .stdin_mode = CA_PIPE, .stdout_mode = CA_DEVNULL};
    ca_process *p = NULL;
    CHECK_OK(ca_loop_subprocess_exec(loop, &o, NULL, NULL, &p));
    CHECK_ERR(ca_process_write(p, NULL, 5), -EINVAL);
    CHECK_OK(ca_process_write(p, NULL, 0));
    CHECK_OK(ca_process_close_stdin(p));
    CHECK_EQ(pwait(loop, p), 0);
    ca_process_unref(p);
}

/* Level-triggered with partial reads: a reader that takes one byte per call is called until
 * the data is gone, then no more. */
struct onebyte {
    int fd, calls, got;
};
static void onebyte_cb(void *arg)
{
    struct onebyte *o = arg;
    char c;
    o->calls++;
    if (read(o->fd, &c, 1) == 1) o->got++;
}
static bool onebyte_done(void *arg) { return ((struct onebyte *)arg)->got >= 10; }

LOOP_TEST(loop_reader_partial_reads)
{
    int p[2];
    CHECK_EQ(pipe2(p, O_CLOEXEC | O_NONBLOCK), 0);
    struct onebyte o = {p[0], 0, 0};
    CHECK_OK(ca_loop_add_reader(loop, p[0], onebyte_cb, &o));
    CHECK_EQ(write(p[1], "0123456789", 10), 10);
    CHECK(t_run_until(loop, onebyte_done, &o, 2.0));
    t_run_for(loop, 0.02);
    int calls = o.calls;
    t_run_for(loop, 0.02);
    CHECK_EQ(o.calls, calls); /* nothing left to read: not called */
    CHECK_EQ(o.got, 10);
    CHECK_EQ(write(p[1], "ab", 2), 2); /* readable again */
    struct onebyte *op = &o;
    double t0 = now_s();
    while (op->got < 12 && now_s() - t0 < 2) t_run_for(loop, 0.005);
    CHECK_EQ(o.got, 12);
    CHECK_EQ(ca_loop_remove_reader(loop, p[0]), 1);
    close(p[0]);
    close(p[1]);
}

/* A writer on a full pipe is not called until there is room again. */
LOOP_TEST(loop_writer_full_pipe)
{
    int p[2];
    CHECK_EQ(pipe2(p, O_CLOEXEC | O_NONBLOCK), 0);
    char buf[4096];
    memset(buf, 'x', sizeof buf);
    while (write(p[1], buf, sizeof buf) > 0) {
    }
    struct lvl l = {p[1], 0};
    CHECK_OK(ca_loop_add_writer(loop, p[1], lvl_cb, &l));
    t_run_for(loop, 0.03);
    CHECK_EQ(l.n, 0);
    while (read(p[0], buf, sizeof buf) > 0) {
    }
    CHECK(t_run_until(loop, t_flag_set, &l.n, 2.0));
    CHECK_EQ(ca_loop_remove_writer(loop, p[1]), 1);
    close(p[0]);
    close(p[1]);
}

/* Loop close with a process whose exit is known but whose pipe is still open (a grandchild
 * holds it): the pending wait future is cancelled, no protocol callback after the close. */
LOOP_TEST(proc_loop_close_exited_child_pipe_open)
{
    ca_set_log_handler(quiet_log, NULL);
    const char *argv[] = {"sh", "-c", "(sleep 0.3; echo late) & exit 0", NULL};
    ca_subprocess_options o = {.argv = argv, .stdout_mode = CA_PIPE};
    struct pstat s = {.loop = loop};
    ca_process *p = NULL;
    CHECK_OK(ca_loop_subprocess_exec(loop, &o, &pproto, &s, &p));
    ca_future *f = NULL;
    CHECK_OK(ca_process_wait(p, &f));
    int rc = -1;
    double t0 = now_s();
    while (ca_process_returncode(p, &rc) == -EAGAIN && now_s() - t0 < 5 * t_slow()) t_run_for(loop, 0.01);
    CHECK_EQ(rc, 0);
    CHECK(!ca_future_done(f));
    s.closing = true;
    CHECK_OK(ca_loop_close(loop));
    CHECK(ca_future_cancelled(f));
    CHECK_EQ(s.after_close, 0);
    CHECK_OK(ca_process_returncode(p, &rc));
    CHECK_EQ(rc, 0);
    ca_future_unref(f);
    ca_process_unref(p);
    sleep_s(0.35); /* let the grandchild (not ours) finish before the leftover checks */
}

/* "a cancelled recv never writes the buffer afterwards (the caller may free it at once)":
 * data that arrives right after the cancel, before any loop iteration, must not land in it. */
LOOP_TEST(sock_cancelled_recv_buffer_untouched)
{
    int sv[2];
    sockpair(sv);
    char *b1 = malloc(64);
    memset(b1, '-', 64);
    ca_future *f1 = NULL, *f2 = NULL;
    CHECK_OK(ca_loop_sock_recv(loop, sv[0], b1, 64, &f1));
    t_run_for(loop, 0.01); /* armed */
    CHECK(ca_future_cancel(f1));
    CHECK_EQ(write(sv[1], "data", 4), 4);
    t_run_for(loop, 0.02);
    for (int i = 0; i < 64; i++)
        if (b1[i] != '-') t_fail(__FILE__, __LINE__, "the cancelled recv wrote its buffer");
    free(b1);
    char b2[8] = {0};
    CHECK_OK(ca_loop_sock_recv(loop, sv[0], b2, sizeof b2, &f2));
    CHECK_EQ(write(sv[1], "more", 4), 4);
    CHECK_ERR(ca_loop_run_until_complete(loop, f2), 0);
    CHECK(fut_int(f2) > 0);
    ca_future_unref(f1);
    ca_future_unref(f2);
    close(sv[0]);
    close(sv[1]);
}

/* Ping-pong through sock_recv/sock_sendall (200 rounds) and a big transfer received with
 * chained sock_recv calls: data arrives whole and in order on every loop kind. */
struct chainrx {
    ca_loop *loop;
    int fd;
    unsigned char *dst;
    size_t got, want;
    ca_future *f;
    int err;
};
static void chainrx_next(struct chainrx *c);
static void chainrx_done(ca_future *f, void *arg)
{
    struct chainrx *c = arg;
    void *res = NULL;
    int r = ca_future_result(f, &res);
    ca_future_unref(c->f);
    c->f = NULL;
    if (r < 0 || (intptr_t)res == 0) {
        c->err = r < 0 ? r : -EPIPE;
        return;
    }
    c->got += (size_t)(intptr_t)res;
    chainrx_next(c);
}
static void chainrx_next(struct chainrx *c)
{
    if (c->got >= c->want) return;
    size_t n = c->want - c->got;
    if (n > 100000) n = 100000;
    CHECK_OK(ca_loop_sock_recv(c->loop, c->fd, c->dst + c->got, n, &c->f));
    CHECK_OK(ca_future_add_done_callback(c->f, chainrx_done, c));
}
static bool chainrx_over(void *arg)
{
    struct chainrx *c = arg;
    return c->got >= c->want || c->err;
}

LOOP_TEST(sock_ping_pong_and_big_transfer)
{
    int sv[2];
    sockpair(sv);
    for (int i = 0; i < 200; i++) {
        char out[8], in[8] = {0};
        snprintf(out, sizeof out, "%07u", (unsigned)i % 10000000u);
        ca_future *s = NULL, *r = NULL;
        CHECK_OK(ca_loop_sock_sendall(loop, sv[i % 2], out, 8, &s));
        CHECK_OK(ca_loop_sock_recv(loop, sv[1 - i % 2], in, 8, &r));
        CHECK_ERR(ca_loop_run_until_complete(loop, r), 0);
        CHECK_ERR(ca_loop_run_until_complete(loop, s), 0);
        CHECK_EQ(fut_int(r), 8);
        CHECK(memcmp(in, out, 8) == 0);
        ca_future_unref(s);
        ca_future_unref(r);
    }
    size_t n = 8u << 20;
    unsigned char *src = malloc(n), *dst = calloc(1, n);
    for (size_t i = 0; i < n; i++) src[i] = (unsigned char)(i ^ (i >> 8) ^ (i >> 16));
    struct chainrx c = {loop, sv[1], dst, 0, n, NULL, 0};
    chainrx_next(&c);
    ca_future *s = NULL;
    CHECK_OK(ca_loop_sock_sendall(loop, sv[0], src, n, &s));
    CHECK(t_run_until(loop, chainrx_over, &c, 20.0));
    CHECK_ERR(ca_loop_run_until_complete(loop, s), 0);
    CHECK_EQ(c.err, 0);
    CHECK_EQ(c.got, n);
    CHECK(memcmp(src, dst, n) == 0);
    ca_future_unref(s);
    free(src);
    free(dst);
    close(sv[0]);
    close(sv[1]);
}

/* Several accepts on one listening socket are served in the order they were made. */
LOOP_TEST(sock_accepts_in_order)
{
    int ls = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    struct sockaddr_un sa;
    memset(&sa, 0, sizeof sa);
    sa.sun_family = AF_UNIX;
    snprintf(sa.sun_path + 1, sizeof sa.sun_path - 1, "ca-contract-%d", (int)getpid());
    socklen_t len = (socklen_t)(sizeof(sa_family_t) + 1 + strlen(sa.sun_path + 1));
    CHECK_EQ(bind(ls, (struct sockaddr *)&sa, len), 0);
    CHECK_EQ(listen(ls, 8), 0);
    ca_future *a[3];
    for (int i = 0; i < 3; i++) CHECK_OK(ca_loop_sock_accept(loop, ls, &a[i]));
    int c[3];
    for (int i = 0; i < 3; i++) {
        c[i] = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
        CHECK_EQ(connect(c[i], (struct sockaddr *)&sa, len), 0);
        char b = (char)('a' + i);
        CHECK_EQ(write(c[i], &b, 1), 1);
        CHECK_ERR(ca_loop_run_until_complete(loop, a[i]), 0);
        int fd = (int)fut_int(a[i]);
        char got = 0;
        CHECK_EQ(read(fd, &got, 1), 1);
        CHECK_EQ(got, 'a' + i);
        close(fd);
        ca_future_unref(a[i]);
    }
    for (int i = 0; i < 3; i++) close(c[i]);
    close(ls);
}
