/*
 * Contract tests for API.md's "Subprocesses": pipes and protocol, wait, stdio modes, exec errors,
 * the loop and watcher used. Each test names the statement it checks; a failure is a disagreement
 * between the code and API.md.
 */
#include "contract_util.h"

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
    /* Before the spawn: the child's 0.3 s start when it runs, and under valgrind the rest of
     * the spawn call (the watcher's thread, say) can take longer than that. */
    double t0 = now_s();
    CHECK_OK(ca_loop_subprocess_exec(loop, &o, &pproto, &s, &p));
    ca_future *f = NULL;
    CHECK_OK(ca_process_wait(p, &f));
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

/* "The exit is observed through the current policy's child watcher": a custom watcher set as
 * the policy's gets the registration (inside enter/exit) and its callback completes the
 * process. */
struct cwp {
    pid_t pid;
    ca_child_fn cb;
    void *arg;
    int enters, exits, adds_inside;
    bool active;
    ca_loop *running_at_add; /* ca_get_running_loop() in the add: a custom watcher's rule */
};
#define CWP(self) ((struct cwp *)ca_child_watcher_data(self))
static int cwp_add(ca_child_watcher *self, pid_t pid, ca_child_fn cb, void *arg)
{
    struct cwp *c = CWP(self);
    c->pid = pid;
    c->cb = cb;
    c->arg = arg;
    c->running_at_add = ca_get_running_loop();
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
    /* Nothing runs in this thread: the process's loop is the running one for the add, so that
     * a watcher that delivers to the running loop (as the built-ins do) picks it. */
    CHECK(c.running_at_add == loop);
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
