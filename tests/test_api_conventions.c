/*
 * Contract tests for API.md's "Conventions": errors, references, out parameters, the order of bad
 * argument, fork and closed. Each test names the statement it checks; a failure is a disagreement
 * between the code and API.md.
 */
#include "contract_util.h"

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
