/* The subprocess suite. Every LOOP_TEST runs on epoll, poll, io_uring and the custom loop, and
 * most run once with each of the five child watchers (Safe and Fast need a loop with signal
 * handlers, which the custom test loop does not have: they are skipped there). Real programs
 * only: sh, cat, sleep, echo, ls. */
#include "harness.h"
#include "contract_util.h" /* the watcher kinds: W_*, wname, wnew */

#include <dirent.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>

#define ARGV(...) ((const char *const[]){__VA_ARGS__, NULL})

/* ----- watchers ------------------------------------------------------------------------------ */

/* Makes watcher kind k the policy's (Safe and Fast attached to loop). false when it does not
 * apply here: Safe/Fast on a loop without signal handlers, Pidfd without kernel support. */
static bool use_watcher(ca_loop *loop, int k)
{
    ca_child_watcher *w = NULL;
    int r = wnew(k, &w);
    if (r == -ENOSYS) return false;
    CHECK_OK(r);
    if (k == W_SAFE || k == W_FAST) {
        r = ca_child_watcher_attach_loop(w, loop);
        if (r == -ENOTSUP) {
            ca_child_watcher_close(w);
            ca_child_watcher_unref(w);
            return false;
        }
        CHECK_OK(r);
    }
    CHECK_OK(ca_set_child_watcher(w)); /* the policy takes its own reference */
    ca_child_watcher_unref(w);
    return true;
}

/* A new loop whose policy uses watcher kind k; false (nothing left open) when this machine
 * cannot run that watcher. */
static bool loop_with_watcher(int k, ca_loop **out)
{
    ca_loop *l;
    CHECK_OK(t_new_loop(&l));
    if (!use_watcher(l, k)) {
        ca_loop_close(l);
        ca_loop_unref(l);
        return false;
    }
    *out = l;
    return true;
}

/* Closes the policy's watcher (MultiLoop has a thread until then). */
static void drop_watcher(void) { CHECK_OK(ca_set_child_watcher(NULL)); }

/* ----- recording what the protocol sees ------------------------------------------------------ */

#define MAXEV 4096

struct buf {
    char *data;
    size_t len, cap;
};

static void buf_add(struct buf *b, const void *p, size_t n)
{
    if (b->len + n + 1 > b->cap) {
        size_t cap = b->cap ? b->cap : 256;
        while (cap < b->len + n + 1) cap *= 2;
        b->data = realloc(b->data, cap);
        CHECK(b->data != NULL);
        b->cap = cap;
    }
    memcpy(b->data + b->len, p, n);
    b->len += n;
    b->data[b->len] = 0;
}

/* Events: 'd' data on 1, 'e' data on 2 (runs of them are folded), '0' '1' '2' connection lost,
 * 'X' process exited, 'W' the wait future's done callback. */
struct run {
    ca_loop *loop;
    ca_process *proc;
    ca_future *wait;
    char ev[MAXEV];
    int nev;
    struct buf out[3];
    int nlost[3], lost_err[3];
    int nexit;
    int waited;
    bool closed;      /* the loop was closed: nothing may arrive any more */
    int after_close;
};

static void ev(struct run *r, char c)
{
    if (r->closed) r->after_close++;
    if ((c == 'd' || c == 'e') && r->nev > 0 && r->ev[r->nev - 1] == c) return;
    if (r->nev < MAXEV - 1) r->ev[r->nev++] = c;
    r->ev[r->nev] = 0;
}

static void on_data(ca_process *p, int fd, const void *data, size_t n, void *arg)
{
    struct run *r = arg;
    CHECK(fd == 1 || fd == 2);
    CHECK(n > 0);
    if (r->proc) CHECK(p == r->proc);
    buf_add(&r->out[fd], data, n);
    ev(r, fd == 1 ? 'd' : 'e');
}

static void on_lost(ca_process *p, int fd, int err, void *arg)
{
    struct run *r = arg;
    CHECK(fd >= 0 && fd <= 2);
    r->nlost[fd]++;
    r->lost_err[fd] = err;
    ev(r, (char)('0' + fd));
}

static void on_exited(ca_process *p, void *arg)
{
    struct run *r = arg;
    int rc;
    CHECK_OK(ca_process_returncode(p, &rc)); /* known when process_exited runs */
    r->nexit++;
    ev(r, 'X');
}

static const ca_subprocess_protocol proto = {on_data, on_lost, on_exited};

static void on_wait_done(ca_future *f, void *arg)
{
    struct run *r = arg;
    r->waited++;
    ev(r, 'W');
}

static void start_(struct run *r, ca_loop *loop, const ca_subprocess_options *o, bool done_cb)
{
    memset(r, 0, sizeof *r);
    r->loop = loop;
    CHECK_OK(ca_loop_subprocess_exec(loop, o, &proto, r, &r->proc));
    CHECK(ca_process_pid(r->proc) > 0);
    CHECK_OK(ca_process_wait(r->proc, &r->wait));
    if (done_cb) CHECK_OK(ca_future_add_done_callback(r->wait, on_wait_done, r));
}

static void start(struct run *r, ca_loop *loop, const ca_subprocess_options *o)
{
    start_(r, loop, o, true);
}

static bool waited(void *arg) { return ((struct run *)arg)->waited > 0; }

/* Runs until the wait future is done; returns the process's returncode (and checks that the
 * future and ca_process_returncode agree). */
static int finish(struct run *r, double timeout)
{
    if (!t_run_until(r->loop, waited, r, timeout))
        t_fail(__FILE__, __LINE__, "process %d did not finish in %.0fs (events \"%s\")",
               (int)ca_process_pid(r->proc), timeout, r->ev);
    void *res = NULL;
    CHECK_OK(ca_future_result(r->wait, &res));
    int rc = -1000;
    CHECK_OK(ca_process_returncode(r->proc, &rc));
    CHECK_EQ((int)(intptr_t)res, rc);
    return rc;
}

static void run_free(struct run *r)
{
    r->proc = ca_process_unref(r->proc);
    r->wait = ca_future_unref(r->wait);
    for (int i = 0; i < 3; i++) free(r->out[i].data);
    memset(r->out, 0, sizeof r->out);
}

static int pos(const struct run *r, char c)
{
    const char *s = strchr(r->ev, c);
    return s ? (int)(s - r->ev) : -1;
}

static int last_pos(const struct run *r, char c)
{
    const char *s = strrchr(r->ev, c);
    return s ? (int)(s - r->ev) : -1;
}

/* asyncio's guarantees: each piped fd's data comes before its one pipe_connection_lost, one
 * process_exited, and the wait future after all of them. strict: the child's pipes were only
 * its own, so they are closed (and reported) before process_exited too. */
static void check_order(const struct run *r, const bool piped[3], bool strict)
{
    CHECK_EQ(r->nexit, 1);
    CHECK_EQ(r->waited, 1);
    int x = pos(r, 'X'), w = pos(r, 'W');
    CHECK(x >= 0);
    CHECK_EQ(w, r->nev - 1);
    CHECK(x < w);
    for (int fd = 0; fd < 3; fd++) {
        int l = pos(r, (char)('0' + fd));
        if (!piped[fd]) {
            CHECK_EQ(r->nlost[fd], 0);
            if (fd > 0) CHECK_EQ(r->out[fd].len, 0);
            continue;
        }
        CHECK_EQ(r->nlost[fd], 1);
        CHECK(l >= 0 && l < w);
        if (fd > 0) CHECK(last_pos(r, fd == 1 ? 'd' : 'e') < l);
        if (strict) CHECK(l < x);
    }
}

/* Whether we have no child at all, running or zombie; asked without reaping anything (a
 * watcher may be about to reap it). */
static bool childless(void)
{
    siginfo_t si;
    memset(&si, 0, sizeof si);
    return waitid(P_ALL, 0, &si, WEXITED | WNOHANG | WNOWAIT) < 0 && errno == ECHILD;
}

static bool no_children(void)
{
    /* A Threaded watcher's thread may be reaping the last one right now. */
    for (int i = 0; i < 200 * t_slow(); i++) {
        if (childless()) return true;
        struct timespec ts = {0, 10 * 1000 * 1000};
        nanosleep(&ts, NULL);
    }
    return false;
}

static size_t scaled(size_t n, size_t min)
{
    size_t s = (size_t)((double)n / t_slow());
    return s < min ? min : s;
}

/* ----- echo through cat ----------------------------------------------------------------------- */

static void echo_through_cat(ca_loop *loop, size_t n)
{
    char *data = malloc(n);
    CHECK(data != NULL);
    for (size_t i = 0; i < n; i++) data[i] = (char)((i * 2654435761u) >> 13);
    struct run r;
    ca_subprocess_options o = {.argv = ARGV("cat"), .stdin_mode = CA_PIPE, .stdout_mode = CA_PIPE};
    start(&r, loop, &o);
    /* In two parts: the second one queues behind the first. */
    CHECK_OK(ca_process_write(r.proc, data, n / 3));
    CHECK_OK(ca_process_write(r.proc, data + n / 3, n - n / 3));
    CHECK_OK(ca_process_close_stdin(r.proc));
    CHECK_EQ(finish(&r, 60), 0);
    CHECK_EQ(r.out[1].len, n);
    CHECK(memcmp(r.out[1].data, data, n) == 0);
    CHECK_EQ(r.lost_err[0], 0);
    CHECK_EQ(r.lost_err[1], 0);
    check_order(&r, (const bool[3]){true, true, false}, false);
    CHECK(pos(&r, '0') < pos(&r, 'X')); /* stdin was closed by us, long before the exit */
    run_free(&r);
    free(data);
}

LOOP_TEST(echo_cat_10mib) /* timeout: 60 */
{
    echo_through_cat(loop, scaled(10 << 20, 256 << 10));
}

LOOP_TEST(echo_cat_every_watcher) /* timeout: 60 */
{
    for (int k = 0; k < W_COUNT; k++) {
        if (!use_watcher(loop, k)) continue;
        echo_through_cat(loop, scaled(1 << 20, 64 << 10));
        drop_watcher();
    }
}

/* ----- stdio modes ---------------------------------------------------------------------------- */

LOOP_TEST(stdout_stderr_apart_and_merged)
{
    struct run r;
    ca_subprocess_options o = {.argv = ARGV("sh", "-c", "echo out; echo err >&2; echo out2"),
                               .stdout_mode = CA_PIPE, .stderr_mode = CA_PIPE};
    start(&r, loop, &o);
    CHECK_EQ(finish(&r, 10), 0);
    CHECK(strcmp(r.out[1].data, "out\nout2\n") == 0);
    CHECK(strcmp(r.out[2].data, "err\n") == 0);
    check_order(&r, (const bool[3]){false, true, true}, true);
    run_free(&r);

    o.stderr_mode = CA_STDOUT;
    start(&r, loop, &o);
    CHECK_EQ(finish(&r, 10), 0);
    CHECK(strcmp(r.out[1].data, "out\nerr\nout2\n") == 0);
    CHECK_EQ(r.out[2].len, 0);
    check_order(&r, (const bool[3]){false, true, false}, true);
    run_free(&r);
}

LOOP_TEST(devnull)
{
    struct run r;
    /* stdin from /dev/null: cat sees EOF at once. */
    ca_subprocess_options o = {.argv = ARGV("cat"), .stdin_mode = CA_DEVNULL,
                               .stdout_mode = CA_PIPE};
    start(&r, loop, &o);
    CHECK_EQ(finish(&r, 10), 0);
    CHECK_EQ(r.out[1].len, 0);
    run_free(&r);

    o = (ca_subprocess_options){
        .argv = ARGV("sh", "-c", "a=$(readlink /proc/$$/fd/0 /proc/$$/fd/1); echo \"$a\" >&2; "
                                  "echo lost"),
        .stdin_mode = CA_DEVNULL, .stdout_mode = CA_DEVNULL, .stderr_mode = CA_PIPE};
    start(&r, loop, &o);
    CHECK_EQ(finish(&r, 10), 0);
    CHECK(strcmp(r.out[2].data, "/dev/null\n/dev/null\n") == 0);
    CHECK_EQ(r.out[1].len, 0);
    run_free(&r);
}

static void fd_identity(int fd, char *out, size_t n)
{
    char path[64];
    snprintf(path, sizeof path, "/proc/self/fd/%d", fd);
    ssize_t k = readlink(path, out, n - 1);
    CHECK(k > 0);
    out[k] = 0;
}

LOOP_TEST(inherit)
{
    /* The child's stdout is ours: point ours at a pipe for the duration. */
    int p[2];
    CHECK_OK(pipe2(p, O_CLOEXEC));
    fflush(stdout);
    int saved = fcntl(1, F_DUPFD_CLOEXEC, 3);
    CHECK(saved >= 0);
    CHECK(dup2(p[1], 1) == 1);
    char want[256];
    fd_identity(p[1], want, sizeof want);

    ca_subprocess_options o = {0}; /* zero-initialised: all three inherited */
    o.argv = ARGV("sh", "-c", "echo inherited; readlink /proc/self/fd/1");
    struct run r;
    start(&r, loop, &o);
    CHECK_EQ(finish(&r, 10), 0);
    check_order(&r, (const bool[3]){false, false, false}, true);
    run_free(&r);

    CHECK(dup2(saved, 1) == 1);
    close(saved);
    close(p[1]);
    char got[512] = {0};
    ssize_t n = read(p[0], got, sizeof got - 1);
    close(p[0]);
    CHECK(n > 0);
    char expect[300];
    snprintf(expect, sizeof expect, "inherited\n%s\n", want);
    CHECK(strcmp(got, expect) == 0);
}

/* A temporary file without O_CLOEXEC (on purpose: it must still not leak into the child). */
static int temp_file(void)
{
    int fd = open("/tmp", O_TMPFILE | O_RDWR, 0600);
    if (fd < 0) {
        char name[] = "/tmp/ca-test-XXXXXX";
        fd = mkstemp(name);
        CHECK(fd >= 0);
        unlink(name);
    }
    return fd;
}

static size_t read_file(int fd, char *out, size_t n)
{
    ssize_t k = pread(fd, out, n - 1, 0);
    CHECK(k >= 0);
    out[k] = 0;
    return (size_t)k;
}

LOOP_TEST(given_fd)
{
    int fd = temp_file();
    /* Also one at a high number, to check that only the dup on 1 reaches the child. */
    int high = fcntl(fd, F_DUPFD, 60);
    CHECK(high >= 60);
    ca_subprocess_options o = {.argv = ARGV("sh", "-c", "echo given; echo more >&2"),
                               .stdout_mode = CA_FD, .stdout_fd = high,
                               .stderr_mode = CA_STDOUT};
    struct run r;
    start(&r, loop, &o);
    CHECK_EQ(finish(&r, 10), 0);
    run_free(&r);
    char got[64];
    read_file(fd, got, sizeof got);
    CHECK(strcmp(got, "given\nmore\n") == 0);
    /* The caller's fd is still the caller's, open. */
    CHECK(fcntl(high, F_GETFD) >= 0);
    close(high);
    close(fd);
}

/* The child lists /proc/self/fd: 0, 1, 2 and the one fd of its own listing, nothing else,
 * although we have fds without O_CLOEXEC open. */
static void check_listing(const char *s)
{
    int n = 0, seen[3] = {0};
    const char *p = s;
    while (*p) {
        int fd = atoi(p);
        if (fd < 3) seen[fd] = 1;
        else CHECK_EQ(fd, 3); /* ls's directory */
        n++;
        p = strchr(p, '\n');
        if (!p) break;
        p++;
    }
    CHECK(seen[0] && seen[1] && seen[2]);
    CHECK(n <= 4);
}

LOOP_TEST(child_sees_only_std_fds)
{
    int leak = open("/dev/null", O_RDONLY); /* no O_CLOEXEC */
    CHECK(leak >= 0);
    int leak2 = fcntl(leak, F_DUPFD, 100);
    CHECK(leak2 >= 100);
    struct run r;
    ca_subprocess_options o = {.argv = ARGV("ls", "-1", "/proc/self/fd"), .stdin_mode = CA_PIPE,
                               .stdout_mode = CA_PIPE, .stderr_mode = CA_PIPE};
    start(&r, loop, &o);
    CHECK_OK(ca_process_close_stdin(r.proc));
    CHECK_EQ(finish(&r, 10), 0);
    check_listing(r.out[1].data);
    run_free(&r);

    /* The same through a given fd (a file without O_CLOEXEC). */
    int fd = temp_file();
    o = (ca_subprocess_options){.argv = ARGV("ls", "-1", "/proc/self/fd"),
                                .stdout_mode = CA_FD, .stdout_fd = fd};
    start(&r, loop, &o);
    CHECK_EQ(finish(&r, 10), 0);
    run_free(&r);
    char got[256];
    read_file(fd, got, sizeof got);
    check_listing(got);
    close(fd);
    close(leak);
    close(leak2);
}

/* ----- cwd, envp, PATH, sessions -------------------------------------------------------------- */

LOOP_TEST(cwd_and_envp)
{
    char dir[] = "/tmp/ca-proc-XXXXXX";
    CHECK(mkdtemp(dir) != NULL);
    char real[PATH_MAX];
    CHECK(realpath(dir, real) != NULL);
    struct run r;
    ca_subprocess_options o = {.argv = ARGV("sh", "-c", "pwd; echo \"$FOO\"; echo \"[$HOME]\""),
                               .envp = ARGV("FOO=bar baz", "PATH=/usr/bin:/bin"),
                               .cwd = dir, .stdout_mode = CA_PIPE};
    start(&r, loop, &o);
    CHECK_EQ(finish(&r, 10), 0);
    char expect[PATH_MAX + 64];
    snprintf(expect, sizeof expect, "%s\nbar baz\n[]\n", real);
    CHECK(strcmp(r.out[1].data, expect) == 0);
    run_free(&r);
    rmdir(dir);
}

LOOP_TEST(path_lookup)
{
    ca_process *p = (ca_process *)0x1;
    /* envp's PATH is the one searched. */
    ca_subprocess_options o = {.argv = ARGV("sh", "-c", "exit 0"),
                               .envp = ARGV("PATH=/nonexistent-dir")};
    CHECK_ERR(ca_loop_subprocess_exec(loop, &o, NULL, NULL, &p), -ENOENT);
    CHECK(p == (ca_process *)0x1);
    /* ... in order, empty entries and missing directories skipped. */
    o.envp = ARGV("PATH=/nonexistent-dir::/usr/bin:/bin");
    struct run r;
    start(&r, loop, &o);
    CHECK_EQ(finish(&r, 10), 0);
    run_free(&r);
    /* envp without PATH: ours. */
    o.envp = ARGV("A=1");
    start(&r, loop, &o);
    CHECK_EQ(finish(&r, 10), 0);
    run_free(&r);
    /* A match that is not executable gives EACCES, as execvp. */
    char dir[] = "/tmp/ca-proc-XXXXXX";
    CHECK(mkdtemp(dir) != NULL);
    char file[64], env[80];
    snprintf(file, sizeof file, "%s/ca-not-exec", dir);
    int fd = open(file, O_WRONLY | O_CREAT | O_CLOEXEC, 0644);
    CHECK(fd >= 0);
    CHECK(write(fd, "#!/bin/sh\n", 10) == 10);
    close(fd);
    snprintf(env, sizeof env, "PATH=%s", dir);
    o = (ca_subprocess_options){.argv = ARGV("ca-not-exec"), .envp = ARGV(env)};
    CHECK_ERR(ca_loop_subprocess_exec(loop, &o, NULL, NULL, &p), -EACCES);
    unlink(file);
    rmdir(dir);
    CHECK(no_children());
}

/* The session id of a process, from /proc/PID/stat (field 6). */
static pid_t sid_of(const char *stat)
{
    const char *p = strrchr(stat, ')');
    CHECK(p != NULL);
    int state_pid_pgrp_sid[4];
    char st;
    CHECK(sscanf(p + 1, " %c %d %d %d", &st, &state_pid_pgrp_sid[1], &state_pid_pgrp_sid[2],
                 &state_pid_pgrp_sid[3]) == 4);
    return state_pid_pgrp_sid[3];
}

LOOP_TEST(start_new_session)
{
    for (int new_session = 0; new_session < 2; new_session++) {
        struct run r;
        ca_subprocess_options o = {.argv = ARGV("cat", "/proc/self/stat"),
                                   .stdout_mode = CA_PIPE, .start_new_session = new_session};
        start(&r, loop, &o);
        pid_t pid = ca_process_pid(r.proc);
        CHECK_EQ(finish(&r, 10), 0);
        pid_t sid = sid_of(r.out[1].data);
        if (new_session) {
            CHECK_NE(sid, getsid(0));
            CHECK_EQ(sid, pid); /* a session leader */
        } else {
            CHECK_EQ(sid, getsid(0));
        }
        run_free(&r);
    }
}

/* ----- exec errors ---------------------------------------------------------------------------- */

static void exec_fails(ca_loop *loop, const ca_subprocess_options *o, int err)
{
    ca_process *p = (ca_process *)0x1;
    CHECK_ERR(ca_loop_subprocess_exec(loop, o, &proto, NULL, &p), err);
    CHECK(p == (ca_process *)0x1); /* out is never written on failure */
    CHECK(childless());              /* no child, no zombie */
}

LOOP_TEST(exec_errors)
{
    char dir[] = "/tmp/ca-proc-XXXXXX";
    CHECK(mkdtemp(dir) != NULL);
    char file[64];
    snprintf(file, sizeof file, "%s/plain", dir);
    int fd = open(file, O_WRONLY | O_CREAT | O_CLOEXEC, 0644);
    CHECK(fd >= 0);
    close(fd);
    for (int k = 0; k < W_COUNT; k += W_FAST - W_THREADED) { /* the default, and Fast */
        if (!use_watcher(loop, k)) continue;
        ca_subprocess_options o = {.argv = ARGV("/nonexistent/prog"), .stdout_mode = CA_PIPE};
        exec_fails(loop, &o, -ENOENT);
        o.argv = ARGV("ca-no-such-program-anywhere");
        exec_fails(loop, &o, -ENOENT);
        o.argv = ARGV("");
        exec_fails(loop, &o, -ENOENT);
        o.argv = ARGV(file);
        exec_fails(loop, &o, -EACCES);
        o.argv = ARGV(dir);
        exec_fails(loop, &o, -EACCES);
        o.argv = ARGV("true");
        o.cwd = "/nonexistent-dir";
        exec_fails(loop, &o, -ENOENT);
        o.cwd = file;
        exec_fails(loop, &o, -ENOTDIR);
        /* And the loop still works: a good one after the bad ones. */
        o.cwd = NULL;
        struct run r;
        start(&r, loop, &o);
        CHECK_EQ(finish(&r, 10), 0);
        run_free(&r);
        drop_watcher();
    }
    unlink(file);
    rmdir(dir);
}

/* ----- signals and callback order ------------------------------------------------------------- */

static bool both_greeted(void *arg)
{
    struct run *r = arg;
    return r->out[1].len >= 6 && r->out[2].len >= 4;
}

LOOP_TEST(kill_terminate_send_signal) /* timeout: 60 */
{
    for (int k = 0; k < W_COUNT; k++) {
        if (!use_watcher(loop, k)) continue;
        for (int action = 0; action < 3; action++) {
            struct run r;
            ca_subprocess_options o = {
                .argv = ARGV("sh", "-c", "echo hello; echo err >&2; exec sleep 100"),
                .stdout_mode = CA_PIPE, .stderr_mode = CA_PIPE};
            start(&r, loop, &o);
            CHECK(t_run_until(loop, both_greeted, &r, 10));
            int rc;
            CHECK_ERR(ca_process_returncode(r.proc, &rc), -EAGAIN);
            CHECK_ERR(ca_process_send_signal(r.proc, 0), -EINVAL);
            CHECK_ERR(ca_process_send_signal(r.proc, -1), -EINVAL);
            CHECK_ERR(ca_process_send_signal(r.proc, 65), -EINVAL);
            CHECK_ERR(ca_process_send_signal(NULL, SIGTERM), -EINVAL);
            CHECK_EQ(r.nexit, 0);
            int want;
            if (action == 0) {
                CHECK_OK(ca_process_kill(r.proc));
                want = -SIGKILL;
            } else if (action == 1) {
                CHECK_OK(ca_process_terminate(r.proc));
                want = -SIGTERM;
            } else {
                CHECK_OK(ca_process_send_signal(r.proc, SIGINT));
                want = -SIGINT;
            }
            int got = finish(&r, 10);
            if (got != want)
                t_fail(__FILE__, __LINE__, "watcher %s action %d: returncode %d, want %d",
                       wname[k], action, got, want);
            CHECK(strcmp(r.out[1].data, "hello\n") == 0);
            CHECK(strcmp(r.out[2].data, "err\n") == 0);
            /* data..., connection lost per pipe, process_exited, then the wait future. */
            check_order(&r, (const bool[3]){false, true, true}, true);
            /* After the exit: signals do nothing. */
            CHECK_OK(ca_process_kill(r.proc));
            CHECK_OK(ca_process_send_signal(r.proc, SIGTERM));
            CHECK_OK(ca_process_returncode(r.proc, &rc));
            CHECK_EQ(rc, want);
            run_free(&r);
        }
        drop_watcher();
    }
}

/* ----- wait ----------------------------------------------------------------------------------- */

static bool exited(void *arg) { return ((struct run *)arg)->nexit > 0; }

LOOP_TEST(wait_before_and_after_exit) /* timeout: 60 */
{
    for (int k = 0; k < W_COUNT; k++) {
        if (!use_watcher(loop, k)) continue;
        struct run r;
        /* No pipes: finished as soon as the exit is known. */
        ca_subprocess_options o = {.argv = ARGV("sh", "-c", "exit 7")};
        start(&r, loop, &o);
        CHECK(!ca_future_done(r.wait));
        CHECK(t_run_until(loop, exited, &r, 10));
        CHECK_EQ(finish(&r, 10), 7);
        /* After: a new future each call, done at once; its callbacks still go through the loop. */
        ca_future *f = NULL, *g = NULL;
        CHECK_OK(ca_process_wait(r.proc, &f));
        CHECK_OK(ca_process_wait(r.proc, &g));
        CHECK(f != g);
        CHECK(ca_future_done(f));
        void *res;
        CHECK_OK(ca_future_result(f, &res));
        CHECK_EQ((int)(intptr_t)res, 7);
        CHECK_OK(ca_loop_run_until_complete(loop, g));
        ca_future_unref(f);
        ca_future_unref(g);
        run_free(&r);

        /* run_until_complete on the wait future, the way a program would write it. */
        ca_process *p;
        ca_subprocess_options o2 = {.argv = ARGV("sleep", "0.05")};
        CHECK_OK(ca_loop_subprocess_exec(loop, &o2, NULL, NULL, &p));
        CHECK_OK(ca_process_wait(p, &f));
        CHECK_OK(ca_loop_run_until_complete(loop, f));
        CHECK_OK(ca_future_result(f, &res));
        CHECK_EQ((int)(intptr_t)res, 0);
        ca_future_unref(f);
        ca_process_unref(p);
        drop_watcher();
    }
}

/* A pipe that a grandchild keeps open keeps the wait pending after the exit, as in asyncio. */
LOOP_TEST(grandchild_keeps_pipe_open)
{
    struct run r;
    char cmd[64];
    snprintf(cmd, sizeof cmd, "sleep %.1f & echo parent-done", 0.3 * t_slow());
    ca_subprocess_options o = {.argv = ARGV("sh", "-c", cmd), .stdout_mode = CA_PIPE};
    start(&r, loop, &o);
    CHECK(t_run_until(loop, exited, &r, 10));
    CHECK(!ca_future_done(r.wait));
    CHECK_EQ(r.nlost[1], 0);
    CHECK_EQ(finish(&r, 10), 0);
    CHECK(pos(&r, 'X') < pos(&r, '1'));
    check_order(&r, (const bool[3]){false, true, false}, false);
    run_free(&r);
}

/* Spawning from a callback while the loop runs (the usual case in a program). */
struct spawn_cb {
    ca_loop *loop;
    struct run r;
};
static void spawn_now(void *arg)
{
    struct spawn_cb *s = arg;
    ca_subprocess_options o = {.argv = ARGV("echo", "from-callback"), .stdout_mode = CA_PIPE};
    start(&s->r, s->loop, &o);
}

LOOP_TEST(spawn_from_running_loop)
{
    for (int k = 0; k < W_COUNT; k++) {
        if (!use_watcher(loop, k)) continue;
        struct spawn_cb s = {.loop = loop};
        CHECK_OK(ca_loop_call_soon(loop, spawn_now, &s, NULL));
        t_run_for(loop, 0.001);
        CHECK(s.r.proc != NULL);
        CHECK_EQ(finish(&s.r, 10), 0);
        CHECK(strcmp(s.r.out[1].data, "from-callback\n") == 0);
        run_free(&s.r);
        drop_watcher();
    }
}

/* ----- stdin ---------------------------------------------------------------------------------- */

static bool said_closed(void *arg)
{
    struct run *r = arg;
    return r->out[1].len > 0 && r->nlost[0] > 0;
}

LOOP_TEST(stdin_closed_by_child)
{
    /* The child closes its stdin without reading what we queued: EPIPE through the protocol,
     * the rest dropped. */
    struct run r;
    ca_subprocess_options o = {.argv = ARGV("sh", "-c", "sleep 0.1; exec 0<&-; echo closed; "
                                                        "sleep 0.2"),
                               .stdin_mode = CA_PIPE, .stdout_mode = CA_PIPE};
    start(&r, loop, &o);
    size_t n = 1 << 20;
    char *data = calloc(1, n);
    CHECK_OK(ca_process_write(r.proc, data, n));
    free(data); /* the process copied what it kept */
    CHECK(t_run_until(loop, said_closed, &r, 10));
    CHECK_EQ(r.nlost[0], 1);
    CHECK_ERR(r.lost_err[0], -EPIPE);
    CHECK_ERR(ca_process_write(r.proc, "x", 1), -EPIPE);
    CHECK_OK(ca_process_close_stdin(r.proc)); /* harmless */
    CHECK_EQ(finish(&r, 10), 0);
    check_order(&r, (const bool[3]){true, true, false}, false);
    run_free(&r);

    /* Writing after the child closed it (and we noticed): -EPIPE at once. */
    o.argv = ARGV("sh", "-c", "exec 0<&-; echo closed; sleep 0.2");
    start(&r, loop, &o);
    CHECK(t_run_until(loop, said_closed, &r, 10));
    CHECK_EQ(r.nlost[0], 1);
    CHECK_EQ(r.lost_err[0], 0);
    CHECK_ERR(ca_process_write(r.proc, "x", 1), -EPIPE);
    CHECK_EQ(finish(&r, 10), 0);
    run_free(&r);

    /* Nothing buffered: the close is noticed by itself, before the exit, without error. */
    o.argv = ARGV("sh", "-c", "exec 0<&-; sleep 0.2");
    o.stdout_mode = CA_INHERIT;
    start(&r, loop, &o);
    CHECK_EQ(finish(&r, 10), 0);
    CHECK_EQ(r.lost_err[0], 0);
    check_order(&r, (const bool[3]){true, false, false}, true);
    run_free(&r);
}

/* ----- many at once --------------------------------------------------------------------------- */

struct many {
    struct run *runs;
    size_t n;
};

static bool all_waited(void *arg)
{
    struct many *m = arg;
    for (size_t i = 0; i < m->n; i++)
        if (!m->runs[i].waited) return false;
    return true;
}

static void many_at_once(ca_loop *loop, size_t n)
{
    struct many m = {calloc(n, sizeof(struct run)), n};
    CHECK(m.runs != NULL);
    /* cat keeps running until its stdin closes: all n are alive together. */
    for (size_t i = 0; i < n; i++) {
        ca_subprocess_options o = {.argv = ARGV("cat"), .stdin_mode = CA_PIPE,
                                   .stdout_mode = CA_PIPE};
        start(&m.runs[i], loop, &o);
        char line[32];
        int len = snprintf(line, sizeof line, "%zu\n", i);
        CHECK_OK(ca_process_write(m.runs[i].proc, line, (size_t)len));
    }
    for (size_t i = 0; i < n; i++) CHECK_OK(ca_process_close_stdin(m.runs[i].proc));
    if (!t_run_until(loop, all_waited, &m, 60)) t_fail(__FILE__, __LINE__, "not all collected");
    for (size_t i = 0; i < n; i++) {
        struct run *r = &m.runs[i];
        char line[32];
        snprintf(line, sizeof line, "%zu\n", i);
        CHECK(r->out[1].data && strcmp(r->out[1].data, line) == 0);
        void *res;
        CHECK_OK(ca_future_result(r->wait, &res));
        CHECK_EQ((int)(intptr_t)res, 0);
        check_order(r, (const bool[3]){true, true, false}, false);
        run_free(r);
    }
    free(m.runs);
}

static void raise_fd_limit(size_t need)
{
    struct rlimit rl;
    CHECK_OK(getrlimit(RLIMIT_NOFILE, &rl));
    if (rl.rlim_cur < need) {
        rl.rlim_cur = rl.rlim_max < need ? rl.rlim_max : need;
        CHECK_OK(setrlimit(RLIMIT_NOFILE, &rl));
    }
    if (rl.rlim_cur < need) SKIP("the fd limit cannot be raised far enough");
}

LOOP_TEST(thousand_concurrent) /* timeout: 120 */
{
    size_t n = scaled(1000, 50);
    raise_fd_limit(n * 5 + 256);
    many_at_once(loop, n);
}

LOOP_TEST(concurrent_every_watcher) /* timeout: 120 */
{
    size_t n = scaled(200, 20);
    raise_fd_limit(n * 5 + 256);
    for (int k = 0; k < W_COUNT; k++) {
        if (!use_watcher(loop, k)) continue;
        many_at_once(loop, n);
        drop_watcher();
    }
}

/* ----- inactive watcher ----------------------------------------------------------------------- */

LOOP_TEST(inactive_watcher_refused)
{
    ca_child_watcher *w;
    for (int fast = 0; fast < 2; fast++) {
        CHECK_OK(fast ? ca_fast_child_watcher_new(&w) : ca_safe_child_watcher_new(&w));
        CHECK_OK(ca_set_child_watcher(w)); /* not attached to a loop: inactive */
        ca_child_watcher_unref(w);
        ca_subprocess_options o = {.argv = ARGV("sh", "-c", "touch /tmp/ca-must-not-run-$$"),
                                   .stdin_mode = CA_PIPE, .stdout_mode = CA_PIPE,
                                   .stderr_mode = CA_PIPE};
        exec_fails(loop, &o, -ENOTCONN);
        drop_watcher();
    }
}

/* ----- closing the loop ----------------------------------------------------------------------- */

static int logged;
static void count_log(int level, const char *msg, void *arg)
{
    if (level >= CA_LOG_WARNING && strstr(msg, "killed")) logged++;
}

LOOP_TEST(loop_close_ends_processes) /* timeout: 60 */
{
    ca_set_log_handler(count_log, NULL);
    for (int k = 0; k < W_COUNT; k++) {
        ca_loop *l;
        if (!loop_with_watcher(k, &l)) continue;
        struct run r, idle;
        ca_subprocess_options o = {.argv = ARGV("sleep", "100"), .stdin_mode = CA_PIPE,
                                   .stdout_mode = CA_PIPE, .stderr_mode = CA_PIPE};
        start(&r, l, &o);
        CHECK_OK(ca_process_write(r.proc, "pending", 7));
        t_run_for(l, 0.05);
        /* And one that was never given a chance to run. */
        start(&idle, l, &o);
        int before = logged;
        CHECK_OK(ca_loop_close(l));
        r.closed = idle.closed = true;
        CHECK_EQ(logged - before, 2);
        CHECK(ca_future_cancelled(r.wait));
        CHECK(ca_future_cancelled(idle.wait));
        int rc;
        CHECK_OK(ca_process_returncode(r.proc, &rc));
        CHECK_EQ(rc, -SIGKILL);
        CHECK_OK(ca_process_returncode(idle.proc, &rc));
        CHECK_EQ(rc, -SIGKILL);
        CHECK(no_children());
        /* The objects stay valid; nothing more happens on them. */
        ca_future *f = (ca_future *)0x1;
        CHECK_ERR(ca_process_wait(r.proc, &f), -EBADF);
        CHECK(f == (ca_future *)0x1);
        CHECK_ERR(ca_process_write(r.proc, "x", 1), -EBADF);
        CHECK_OK(ca_process_kill(r.proc));
        CHECK_EQ(r.after_close, 0);
        CHECK_EQ(idle.after_close, 0);
        CHECK_EQ(r.nexit, 0);
        CHECK_EQ(r.waited, 0); /* the done callback of a cancelled future does not run either */
        drop_watcher();
        run_free(&r);
        run_free(&idle);
        ca_loop_unref(l);
    }
    ca_set_log_handler(NULL, NULL);
}

/* A child that exited but whose exit was not delivered yet when the loop closes: no kill, no
 * log line, no zombie. */
LOOP_TEST(loop_close_after_exit) /* timeout: 60 */
{
    /* Every watcher kind: with Uring the process holds no pidfd, and the child is a zombie
     * until its exit is delivered; without a pidfd (valgrind, old kernels) the same holds by
     * pid. A zombie or a child the watcher reaped is not "still running": no kill, no log. */
    for (int k = 0; k < W_COUNT; k++) {
        ca_loop *l;
        if (!loop_with_watcher(k, &l)) continue;
        struct run r;
        ca_subprocess_options o = {.argv = ARGV("true"), .stdout_mode = CA_PIPE};
        start(&r, l, &o);
        /* Until it exited (a zombie, or reaped by the watcher's thread). */
        for (int i = 0; i < 1000 * t_slow(); i++) {
            siginfo_t si;
            memset(&si, 0, sizeof si);
            if (waitid(P_PID, (id_t)ca_process_pid(r.proc), &si,
                       WEXITED | WNOHANG | WNOWAIT) < 0 ||
                si.si_pid != 0)
                break;
            struct timespec ts = {0, 5 * 1000 * 1000};
            nanosleep(&ts, NULL);
        }
        logged = 0;
        ca_set_log_handler(count_log, NULL);
        CHECK_OK(ca_loop_close(l));
        ca_set_log_handler(NULL, NULL);
        r.closed = true;
        if (logged != 0) t_fail(__FILE__, __LINE__, "watcher %d: a finished child was killed", k);
        CHECK(ca_future_cancelled(r.wait));
        int rc;
        CHECK_OK(ca_process_returncode(r.proc, &rc));
        CHECK(rc == 0 || rc == 255); /* 255: reaped, but the exit was lost with the loop */
        drop_watcher();
        CHECK(no_children());
        CHECK_EQ(r.after_close, 0);
        run_free(&r);
        ca_loop_unref(l);
    }
}

/* ----- communicate ---------------------------------------------------------------------------- */

LOOP_TEST(communicate)
{
    ca_process *p;
    ca_subprocess_options o = {.argv = ARGV("cat"), .stdin_mode = CA_PIPE, .stdout_mode = CA_PIPE};
    CHECK_OK(ca_loop_subprocess_exec(loop, &o, NULL, NULL, &p));
    char input[] = "hello world";
    ca_future *f, *g;
    CHECK_OK(ca_process_communicate(p, input, strlen(input), &f));
    memset(input, 'X', sizeof input - 1); /* copied: the caller need not keep it */
    CHECK_ERR(ca_process_communicate(p, NULL, 0, &g), -EBUSY);
    CHECK_OK(ca_loop_run_until_complete(loop, f));
    void *res;
    CHECK_OK(ca_future_result(f, &res));
    CHECK_EQ((int)(intptr_t)res, 0);
    const void *out;
    size_t len;
    CHECK_OK(ca_process_output(p, 1, &out, &len));
    CHECK_EQ(len, 11);
    CHECK(memcmp(out, "hello world", 11) == 0);
    CHECK_OK(ca_process_output(p, 2, &out, &len)); /* not a pipe: empty */
    CHECK_EQ(len, 0);
    CHECK_ERR(ca_process_output(p, 0, &out, &len), -EINVAL);
    CHECK_ERR(ca_process_output(p, 3, &out, &len), -EINVAL);
    ca_future_unref(f);
    ca_process_unref(p);

    /* Big input, both outputs, an exit status; the protocol still sees everything. */
    size_t n = scaled(2 << 20, 128 << 10);
    char *data = malloc(n);
    for (size_t i = 0; i < n; i++) data[i] = (char)(i * 7);
    struct run r;
    o = (ca_subprocess_options){.argv = ARGV("sh", "-c", "cat; echo err >&2; exit 3"),
                                .stdin_mode = CA_PIPE, .stdout_mode = CA_PIPE,
                                .stderr_mode = CA_PIPE};
    start(&r, loop, &o);
    CHECK_OK(ca_process_communicate(r.proc, data, n, &f));
    CHECK_OK(ca_loop_run_until_complete(loop, f));
    CHECK_OK(ca_future_result(f, &res));
    CHECK_EQ((int)(intptr_t)res, 3);
    CHECK_OK(ca_process_output(r.proc, 1, &out, &len));
    CHECK_EQ(len, n);
    CHECK(memcmp(out, data, n) == 0);
    CHECK_EQ(r.out[1].len, n);
    CHECK_OK(ca_process_output(r.proc, 2, &out, &len));
    CHECK_EQ(len, 4);
    CHECK(memcmp(out, "err\n", 4) == 0);
    CHECK_EQ(finish(&r, 10), 3);
    ca_future_unref(f);
    run_free(&r);
    free(data);

    /* Input without a stdin pipe is ignored, as asyncio does. */
    o = (ca_subprocess_options){.argv = ARGV("echo", "no-stdin"), .stdout_mode = CA_PIPE};
    CHECK_OK(ca_loop_subprocess_exec(loop, &o, NULL, NULL, &p));
    CHECK_OK(ca_process_communicate(p, "ignored", 7, &f));
    CHECK_OK(ca_loop_run_until_complete(loop, f));
    CHECK_OK(ca_process_output(p, 1, &out, &len));
    CHECK_EQ(len, 9);
    CHECK(memcmp(out, "no-stdin\n", 9) == 0);
    ca_future_unref(f);
    ca_process_unref(p);
}

/* ----- bad input ------------------------------------------------------------------------------ */

LOOP_TEST(bad_input)
{
    ca_process *p = (ca_process *)0x1;
    ca_subprocess_options o = {.argv = ARGV("true")};
    CHECK_ERR(ca_loop_subprocess_exec(NULL, &o, NULL, NULL, &p), -EINVAL);
    CHECK_ERR(ca_loop_subprocess_exec(loop, NULL, NULL, NULL, &p), -EINVAL);
    CHECK_ERR(ca_loop_subprocess_exec(loop, &o, NULL, NULL, NULL), -EINVAL);
    o.argv = NULL;
    CHECK_ERR(ca_loop_subprocess_exec(loop, &o, NULL, NULL, &p), -EINVAL);
    o.argv = (const char *const[]){NULL};
    CHECK_ERR(ca_loop_subprocess_exec(loop, &o, NULL, NULL, &p), -EINVAL);
    o.argv = ARGV("true");
    o.stdin_mode = CA_STDOUT;
    CHECK_ERR(ca_loop_subprocess_exec(loop, &o, NULL, NULL, &p), -EINVAL);
    o.stdin_mode = CA_INHERIT;
    o.stdout_mode = CA_STDOUT;
    CHECK_ERR(ca_loop_subprocess_exec(loop, &o, NULL, NULL, &p), -EINVAL);
    o.stdout_mode = (ca_stdio_mode)42;
    CHECK_ERR(ca_loop_subprocess_exec(loop, &o, NULL, NULL, &p), -EINVAL);
    o.stdout_mode = CA_FD;
    o.stdout_fd = -1;
    CHECK_ERR(ca_loop_subprocess_exec(loop, &o, NULL, NULL, &p), -EINVAL);
    int fd = open("/dev/null", O_RDONLY | O_CLOEXEC);
    close(fd);
    o.stdout_fd = fd; /* not open */
    CHECK_ERR(ca_loop_subprocess_exec(loop, &o, NULL, NULL, &p), -EBADF);
    CHECK(p == (ca_process *)0x1);
    CHECK(no_children());

    /* The process functions. */
    ca_future *f;
    const void *b;
    size_t n;
    int rc;
    CHECK_ERR(ca_process_wait(NULL, &f), -EINVAL);
    CHECK_ERR(ca_process_write(NULL, "x", 1), -EINVAL);
    CHECK_ERR(ca_process_close_stdin(NULL), -EINVAL);
    CHECK_ERR(ca_process_kill(NULL), -EINVAL);
    CHECK_ERR(ca_process_terminate(NULL), -EINVAL);
    CHECK_ERR(ca_process_returncode(NULL, &rc), -EINVAL);
    CHECK_ERR(ca_process_communicate(NULL, NULL, 0, &f), -EINVAL);
    CHECK_ERR(ca_process_output(NULL, 1, &b, &n), -EINVAL);
    CHECK_EQ(ca_process_pid(NULL), -EINVAL);
    CHECK(ca_process_ref(NULL) == NULL);
    CHECK(ca_process_unref(NULL) == NULL);

    o = (ca_subprocess_options){.argv = ARGV("true")};
    CHECK_OK(ca_loop_subprocess_exec(loop, &o, NULL, NULL, &p));
    CHECK_ERR(ca_process_wait(p, NULL), -EINVAL);
    CHECK_ERR(ca_process_returncode(p, NULL), -EINVAL);
    CHECK_ERR(ca_process_write(p, NULL, 1), -EINVAL);
    CHECK_ERR(ca_process_write(p, "x", 1), -EINVAL);  /* stdin is not a pipe */
    CHECK_ERR(ca_process_close_stdin(p), -EINVAL);
    CHECK_ERR(ca_process_communicate(p, NULL, 1, &f), -EINVAL);
    CHECK_ERR(ca_process_communicate(p, NULL, 0, NULL), -EINVAL);
    CHECK_ERR(ca_process_output(p, 1, NULL, &n), -EINVAL);
    CHECK_OK(ca_process_wait(p, &f));
    CHECK_OK(ca_loop_run_until_complete(loop, f));
    ca_future_unref(f);
    ca_process_unref(p);

    /* A closed loop. */
    ca_loop *l;
    CHECK_OK(t_new_loop(&l));
    CHECK_OK(ca_loop_close(l));
    CHECK_ERR(ca_loop_subprocess_exec(l, &o, NULL, NULL, &p), -EBADF);
    ca_loop_unref(l);
}

/* In a child made by fork(), the parent's loop answers -ECHILD. */
LOOP_TEST(forked_child_gets_echild)
{
    ca_subprocess_options o = {.argv = ARGV("true")};
    pid_t pid = fork();
    CHECK(pid >= 0);
    if (pid == 0) {
        ca_process *p;
        _exit(ca_loop_subprocess_exec(loop, &o, NULL, NULL, &p) == -ECHILD ? 0 : 1);
    }
    int st;
    CHECK_EQ(waitpid(pid, &st, 0), pid);
    CHECK(WIFEXITED(st) && WEXITSTATUS(st) == 0);
}

/* The caller may drop its reference at once: the loop keeps the process until it is finished,
 * and the protocol still hears everything. */
static bool exited_and_lost(void *arg)
{
    struct run *r = arg;
    return r->nexit == 1 && r->nlost[1] == 1;
}

LOOP_TEST(caller_drops_reference_early)
{
    struct run r;
    memset(&r, 0, sizeof r);
    ca_process *p;
    ca_subprocess_options o = {.argv = ARGV("sh", "-c", "sleep 0.05; echo late"),
                               .stdout_mode = CA_PIPE};
    CHECK_OK(ca_loop_subprocess_exec(loop, &o, &proto, &r, &p));
    ca_process_unref(p);
    CHECK(t_run_until(loop, exited_and_lost, &r, 10));
    CHECK(strcmp(r.out[1].data, "late\n") == 0);
    free(r.out[1].data);
}

/* ----- custom watchers ------------------------------------------------------------------------ */

/* A custom watcher shaped like asyncio 3.11's ThreadedChildWatcher really is: a thread per
 * child that calls the callback itself, from that thread, and that cannot take a registration
 * back (remove answers 0). */
struct raw_wait {
    pid_t pid;
    ca_child_fn cb;
    void *arg;
};

static void *raw_wait_main(void *a)
{
    struct raw_wait *t = a;
    int st = 0;
    pid_t w;
    do {
        w = waitpid(t->pid, &st, 0);
    } while (w < 0 && errno == EINTR);
    int rc = w != t->pid ? 255 : WIFEXITED(st) ? WEXITSTATUS(st) : -WTERMSIG(st);
    t->cb(t->pid, rc, t->arg);
    free(t);
    return NULL;
}

static int raw_add(ca_child_watcher *self, pid_t pid, ca_child_fn cb, void *arg)
{
    struct raw_wait *t = malloc(sizeof *t);
    if (!t) return -ENOMEM;
    *t = (struct raw_wait){pid, cb, arg};
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    pthread_t th;
    int e = pthread_create(&th, &attr, raw_wait_main, t);
    pthread_attr_destroy(&attr);
    if (e) free(t);
    return -e;
}

static int raw_remove(ca_child_watcher *self, pid_t pid) { return 0; }
static bool raw_active(ca_child_watcher *self) { return true; }
static const ca_child_watcher_ops raw_ops = {
    .add_child_handler = raw_add, .remove_child_handler = raw_remove, .is_active = raw_active};

static int failing_add(ca_child_watcher *self, pid_t pid, ca_child_fn cb, void *arg)
{
    return -EMFILE;
}
static const ca_child_watcher_ops failing_ops = {
    .add_child_handler = failing_add, .remove_child_handler = raw_remove, .is_active = raw_active};

static void use_custom_watcher(const ca_child_watcher_ops *ops)
{
    ca_child_watcher *w;
    CHECK_OK(ca_child_watcher_new_custom(ops, NULL, &w));
    CHECK_OK(ca_set_child_watcher(w));
    ca_child_watcher_unref(w);
}

static bool rc_known(void *arg)
{
    int rc;
    return ca_process_returncode(arg, &rc) == 0;
}

LOOP_TEST(custom_watcher_calls_from_its_thread)
{
    use_custom_watcher(&raw_ops);
    struct run r;
    ca_subprocess_options o = {.argv = ARGV("sh", "-c", "echo hi; exit 4"),
                               .stdout_mode = CA_PIPE};
    start(&r, loop, &o);
    CHECK_EQ(finish(&r, 10), 4);
    CHECK(strcmp(r.out[1].data, "hi\n") == 0);
    check_order(&r, (const bool[3]){false, true, false}, true);
    run_free(&r);

    /* Closing the loop while the child runs: the watcher cannot give the registration back,
     * so the child is killed through its pidfd and the watcher's thread reaps it. */
    ca_loop *l;
    CHECK_OK(t_new_loop(&l));
    o.argv = ARGV("sleep", "100");
    start(&r, l, &o);
    t_run_for(l, 0.02);
    ca_set_log_handler(NULL, NULL);
    CHECK_OK(ca_loop_close(l));
    CHECK(ca_future_cancelled(r.wait));
    CHECK(no_children());
    /* The exit arrives from the watcher's thread after the close. */
    for (int i = 0; i < 200 * t_slow() && !rc_known(r.proc); i++) {
        struct timespec ts = {0, 10 * 1000 * 1000};
        nanosleep(&ts, NULL);
    }
    int rc;
    CHECK_OK(ca_process_returncode(r.proc, &rc));
    CHECK_EQ(rc, -SIGKILL);
    CHECK_EQ(r.nexit, 0);
    run_free(&r);
    ca_loop_unref(l);
    drop_watcher();
}

LOOP_TEST(watcher_registration_fails)
{
    /* The child is spawned, the registration fails: it is killed and reaped, nothing stays. */
    use_custom_watcher(&failing_ops);
    ca_subprocess_options o = {.argv = ARGV("sleep", "100"), .stdin_mode = CA_PIPE,
                               .stdout_mode = CA_PIPE, .stderr_mode = CA_PIPE};
    exec_fails(loop, &o, -EMFILE);
    drop_watcher();
}

/* ----- Pidfd: the process lends its pidfd to the watcher ---------------------------------------- */

/* Our open fds: how many, and how many of them are pidfds (the lowest one in *first). */
static int count_fds(int *npidfd, int *first)
{
    DIR *d = opendir("/proc/self/fd");
    CHECK(d != NULL);
    int self = dirfd(d), n = 0, np = 0, lo = -1;
    struct dirent *e;
    while ((e = readdir(d)) != NULL) {
        if (e->d_name[0] == '.') continue;
        int fd = atoi(e->d_name);
        if (fd == self) continue;
        n++;
        char path[64], link[64];
        snprintf(path, sizeof path, "/proc/self/fd/%d", fd);
        ssize_t k = readlink(path, link, sizeof link - 1);
        if (k <= 0) continue;
        link[k] = 0;
        if (strcmp(link, "anon_inode:[pidfd]") == 0 || strncmp(link, "pidfd:", 6) == 0) {
            np++;
            if (lo < 0 || fd < lo) lo = fd;
        }
    }
    closedir(d);
    if (npidfd) *npidfd = np;
    if (first) *first = lo;
    return n;
}

static int count_pidfds(int *first)
{
    int np;
    count_fds(&np, first);
    return np;
}

/* An fd on /dev/null that nothing of ours may close: checked with canary_alive. */
static int canary(void)
{
    int fd = open("/dev/null", O_RDONLY | O_CLOEXEC);
    CHECK(fd >= 0);
    return fd;
}

static void canary_alive(int fd)
{
    char id[64];
    fd_identity(fd, id, sizeof id);
    CHECK(strcmp(id, "/dev/null") == 0);
    close(fd);
}

static int kill_and_wait(ca_loop *loop, ca_process *p)
{
    CHECK_OK(ca_process_kill(p));
    ca_future *f;
    CHECK_OK(ca_process_wait(p, &f));
    CHECK_OK(ca_loop_run_until_complete(loop, f));
    void *res;
    CHECK_OK(ca_future_result(f, &res));
    ca_future_unref(f);
    return (int)(intptr_t)res;
}

/* A process holds one fd, its pidfd from the spawn, with every watcher: Pidfd borrows it (it
 * used to take a copy, two fds per child). Without CLONE_PIDFD (valgrind) the process has none
 * and Pidfd opens one of its own, so Pidfd means one pidfd per child either way. */
LOOP_TEST(one_fd_per_child_every_watcher) /* timeout: 60 */
{
    enum { N = 16 };
    for (int k = 0; k < W_COUNT; k++) {
        if (!use_watcher(loop, k)) continue;
        /* The first spawn finds out how exec errors travel (with a pipe of its own, then). */
        struct run r;
        start(&r, loop, &(ca_subprocess_options){.argv = ARGV("true")});
        CHECK_EQ(finish(&r, 10), 0);
        run_free(&r);
        int np, fds0 = count_fds(&np, NULL);
        CHECK_EQ(np, 0);
        ca_process *p[N];
        ca_subprocess_options o = {.argv = ARGV("sleep", "100")};
        for (int i = 0; i < N; i++) CHECK_OK(ca_loop_subprocess_exec(loop, &o, NULL, NULL, &p[i]));
        t_run_for(loop, 0.01);
        int fds = count_fds(&np, NULL);
        if (k == W_PIDFD) CHECK_EQ(np, N);
        else if (k == W_URING) CHECK_EQ(np, 0); /* it keeps them unreaped instead */
        else CHECK(np == 0 || np == N);
        if (fds - fds0 != np)
            t_fail(__FILE__, __LINE__, "%s: %d more fds for %d children (%d pidfds)", wname[k],
                   fds - fds0, N, np);
        for (int i = 0; i < N; i++) {
            CHECK_EQ(kill_and_wait(loop, p[i]), -SIGKILL);
            ca_process_unref(p[i]);
        }
        CHECK_EQ(count_fds(&np, NULL), fds0);
        CHECK_EQ(np, 0);
        drop_watcher();
    }
}

/* Spawns `sleep 100` on loop b while loop a runs here: a is then the watcher's delivery loop. */
struct on_b {
    ca_loop *b;
    ca_process *proc;
};

static void spawn_on_b(void *arg)
{
    struct on_b *s = arg;
    ca_subprocess_options o = {.argv = ARGV("sleep", "100")};
    CHECK_OK(ca_loop_subprocess_exec(s->b, &o, NULL, NULL, &s->proc));
}

static bool spawned_on_b(void *arg) { return ((struct on_b *)arg)->proc != NULL; }

static void check_killed(ca_process *p)
{
    int rc;
    CHECK_OK(ca_process_returncode(p, &rc));
    CHECK_EQ(rc, -SIGKILL);
}

/* The ways a lent pidfd can end early in one thread, each followed by a new fd (which would
 * take the pidfd's number if it were closed too early, and be closed by the late second
 * close): the process's loop closes (it is also the delivery loop); the delivery loop, another
 * one, closes first. (Closing the watcher first: see watcher_drops_then_loop_closes.) */
LOOP_TEST(pidfd_lent_fd_closed_once) /* timeout: 60 */
{
    if (!use_watcher(loop, W_PIDFD)) SKIP("pidfd is unavailable");
    ca_set_log_handler(NULL, NULL);
    ca_subprocess_options o = {.argv = ARGV("sleep", "100")};
    int fds0 = count_fds(NULL, NULL);

    /* The process's loop closes while the child runs. */
    ca_loop *b;
    ca_process *p;
    CHECK_OK(t_new_loop(&b));
    CHECK_OK(ca_loop_subprocess_exec(b, &o, NULL, NULL, &p));
    CHECK_EQ(count_pidfds(NULL), 1);
    CHECK_OK(ca_loop_close(b));
    int c1 = canary();
    CHECK_EQ(count_pidfds(NULL), 0);
    check_killed(p);
    ca_process_unref(p);
    ca_loop_unref(b);

    /* The delivery loop (a) is not the process's (b), and closes first. */
    ca_loop *a;
    CHECK_OK(t_new_loop(&a));
    CHECK_OK(t_new_loop(&b));
    struct on_b s = {b, NULL};
    CHECK_OK(ca_loop_call_soon(a, spawn_on_b, &s, NULL));
    CHECK(t_run_until(a, spawned_on_b, &s, 10));
    CHECK_EQ(count_pidfds(NULL), 1);
    CHECK_OK(ca_loop_close(a));
    int c2 = canary();
    CHECK_EQ(count_pidfds(NULL), 1);
    CHECK_OK(ca_process_kill(s.proc)); /* through the pidfd: still the child's */
    CHECK_OK(ca_loop_close(b));
    int c3 = canary();
    CHECK_EQ(count_pidfds(NULL), 0);
    check_killed(s.proc);
    ca_process_unref(s.proc);
    ca_loop_unref(a);
    ca_loop_unref(b);

    canary_alive(c1);
    canary_alive(c2);
    canary_alive(c3);
    CHECK(no_children());
    CHECK_EQ(count_fds(NULL, NULL), fds0);
    drop_watcher();
}

/* The delivery loop runs in this thread, the process's loop is closed in another, while the
 * delivery loop is busy in a callback: the watcher's reader is still on the pidfd and its
 * removal is only posted. The pidfd must stay open until that removal ran: a pipe made then is
 * placed at the lowest free number from the pidfd's on, and gets a reader on the delivery loop
 * before the posted removal runs. Had the process closed the pidfd, the pipe would have its
 * number and the watcher's removal would take the pipe's reader away. */
struct xthread {
    ca_loop *a, *b;
    struct on_b s;
    int pidfd;               /* the process's, as /proc lists it */
    atomic_int stage;        /* 1: a is blocked in xt_block; 2: the other thread is done */
    int rfd, wfd;            /* the other thread's pipe */
    int readable;
};

static void xt_readable(void *arg)
{
    struct xthread *x = arg;
    char c;
    CHECK_EQ(read(x->rfd, &c, 1), 1);
    x->readable++;
    CHECK_OK(ca_loop_remove_reader(x->a, x->rfd));
}

static void xt_block(void *arg)
{
    struct xthread *x = arg;
    atomic_store(&x->stage, 1);
    for (int i = 0; atomic_load(&x->stage) != 2; i++) {
        if (i > 10000 * t_slow()) t_fail(__FILE__, __LINE__, "the other thread did not finish");
        struct timespec ts = {0, 1000 * 1000};
        nanosleep(&ts, NULL);
    }
    CHECK_OK(ca_loop_add_reader(x->a, x->rfd, xt_readable, x));
}

static void *xt_main(void *arg)
{
    struct xthread *x = arg;
    while (atomic_load(&x->stage) != 1) {
        struct timespec ts = {0, 1000 * 1000};
        nanosleep(&ts, NULL);
    }
    CHECK_OK(ca_loop_close(x->b));
    int p[2];
    CHECK_OK(pipe2(p, O_CLOEXEC));
    x->rfd = fcntl(p[0], F_DUPFD_CLOEXEC, x->pidfd);
    CHECK(x->rfd >= 0);
    close(p[0]);
    x->wfd = p[1];
    CHECK_EQ(write(x->wfd, "x", 1), 1);
    atomic_store(&x->stage, 2);
    return NULL;
}

static bool xt_done(void *arg) { return ((struct xthread *)arg)->readable > 0; }
static bool no_pidfd(void *arg) { return count_pidfds(NULL) == 0; }

LOOP_TEST(pidfd_lent_fd_outlives_other_thread_reader) /* timeout: 60 */
{
    ca_set_log_handler(NULL, NULL);
    if (!use_watcher(loop, W_PIDFD)) SKIP("pidfd is unavailable");
    struct xthread x = {.a = loop, .rfd = -1, .wfd = -1};
    CHECK_OK(t_new_loop(&x.b));
    x.s.b = x.b;
    CHECK_OK(ca_loop_call_soon(loop, spawn_on_b, &x.s, NULL));
    CHECK(t_run_until(loop, spawned_on_b, &x.s, 10));
    CHECK_EQ(count_pidfds(&x.pidfd), 1);
    pthread_t t;
    CHECK_EQ(pthread_create(&t, NULL, xt_main, &x), 0);
    CHECK_OK(ca_loop_call_soon(loop, xt_block, &x, NULL));
    bool ok = t_run_until(loop, xt_done, &x, 10);
    CHECK_EQ(pthread_join(t, NULL), 0);
    CHECK(ok);
    CHECK_NE(x.rfd, x.pidfd); /* the pidfd was still open */
    CHECK_EQ(x.readable, 1);
    /* The watcher's posted removal ran: it closed the pidfd. */
    CHECK(t_run_until(loop, no_pidfd, NULL, 10));
    check_killed(x.s.proc);
    CHECK(no_children());
    close(x.rfd);
    close(x.wfd);
    ca_process_unref(x.s.proc);
    ca_loop_unref(x.b);
    drop_watcher();
}

/* fork() while a process lends its pidfd: the child may drop what it inherited without
 * touching the parent's, and the parent's process and watcher go on. */
LOOP_TEST(pidfd_lent_fd_and_fork)
{
    if (!use_watcher(loop, W_PIDFD)) SKIP("pidfd is unavailable");
    ca_process *p;
    ca_subprocess_options o = {.argv = ARGV("sleep", "100")};
    CHECK_OK(ca_loop_subprocess_exec(loop, &o, NULL, NULL, &p));
    int pidfd;
    CHECK_EQ(count_pidfds(&pidfd), 1);
    fflush(NULL);
    pid_t pid = fork();
    CHECK(pid >= 0);
    if (pid == 0) {
        int bad = ca_process_kill(p) != -ECHILD;
        ca_process_unref(p);
        bad += ca_set_child_watcher(NULL) != 0;
        bad += ca_loop_close(loop) != 0;
        /* The parent's copies stay as they were: ours to drop at exec or exit. */
        bad += fcntl(pidfd, F_GETFD) < 0;
        t_child_exit(bad);
    }
    int st;
    CHECK_EQ(waitpid(pid, &st, 0), pid);
    CHECK(WIFEXITED(st) && WEXITSTATUS(st) == 0);
    CHECK_EQ(kill_and_wait(loop, p), -SIGKILL);
    CHECK_EQ(count_pidfds(NULL), 0);
    ca_process_unref(p);
    drop_watcher();
}

/* ----- a loop in another thread --------------------------------------------------------------- */

struct thread_job {
    int watcher;
    int rc;
    char out[64];
    bool applies;
};

static void *thread_main(void *arg)
{
    struct thread_job *j = arg;
    ca_loop *l;
    CHECK_OK(t_new_loop(&l));
    j->applies = use_watcher(l, j->watcher);
    if (j->applies) {
        struct run r;
        ca_subprocess_options o = {.argv = ARGV("sh", "-c", "echo from-thread; exit 5"),
                                   .stdout_mode = CA_PIPE};
        start(&r, l, &o);
        j->rc = finish(&r, 10);
        snprintf(j->out, sizeof j->out, "%s", r.out[1].data ? r.out[1].data : "");
        run_free(&r);
    }
    CHECK_OK(ca_loop_close(l));
    ca_loop_unref(l);
    return NULL;
}

/* Each watcher with a loop that runs in another thread (Safe and Fast attached to it). */
TEST(loop_in_another_thread)
{
    for (int k = 0; k < W_COUNT; k++) {
        struct thread_job j = {.watcher = k};
        pthread_t t;
        CHECK_EQ(pthread_create(&t, NULL, thread_main, &j), 0);
        CHECK_EQ(pthread_join(t, NULL), 0);
        if (!j.applies) continue;
        if (j.rc != 5 || strcmp(j.out, "from-thread\n") != 0)
            t_fail(__FILE__, __LINE__, "watcher %s: rc %d, output \"%s\"", wname[k], j.rc, j.out);
        drop_watcher();
    }
}

/* The child starts with an empty signal mask and SIGPIPE back to its default, although the
 * spawning thread blocks SIGUSR1 and the process ignores SIGPIPE (as this test runner does). */
LOOP_TEST(child_signal_state)
{
    sigset_t usr1, old;
    sigemptyset(&usr1);
    sigaddset(&usr1, SIGUSR1);
    CHECK_EQ(pthread_sigmask(SIG_BLOCK, &usr1, &old), 0);
    struct sigaction ign = {.sa_handler = SIG_IGN}, prev;
    CHECK_OK(sigaction(SIGPIPE, &ign, &prev));
    struct run r;
    ca_subprocess_options o = {.argv = ARGV("grep", "-E", "^Sig(Blk|Ign)", "/proc/self/status"),
                               .stdout_mode = CA_PIPE};
    start(&r, loop, &o);
    CHECK_EQ(finish(&r, 10), 0);
    unsigned long long blk = ~0ULL, ignored = ~0ULL;
    const char *b = strstr(r.out[1].data, "SigBlk:"), *i = strstr(r.out[1].data, "SigIgn:");
    CHECK(b && i);
    CHECK(sscanf(b + 7, "%llx", &blk) == 1 && sscanf(i + 7, "%llx", &ignored) == 1);
    CHECK_EQ(blk, 0);
    CHECK_EQ(ignored & (1ULL << (SIGPIPE - 1)), 0);
    run_free(&r);
    CHECK_OK(sigaction(SIGPIPE, &prev, NULL));
    CHECK_EQ(pthread_sigmask(SIG_SETMASK, &old, NULL), 0);
}

/* ----- the watcher drops a process's registration without calling it ------------------------- */

enum { DROP_CLOSE, DROP_REPLACE, DROP_REMOVE, DROP_COUNT };
static const char *const drop_name[DROP_COUNT] = {"close", "replace", "remove"};

/* Makes the policy's watcher drop r's registration: closed, replaced in the policy (which
 * closes it), or the user removes the process's pid from it. */
static void drop_registration(struct run *r, int how)
{
    ca_child_watcher *w;
    CHECK_OK(ca_get_child_watcher(&w));
    switch (how) {
    case DROP_CLOSE: CHECK_OK(ca_child_watcher_close(w)); break;
    case DROP_REPLACE: {
        ca_child_watcher *fresh;
        CHECK_OK(ca_threaded_child_watcher_new(&fresh));
        CHECK_OK(ca_set_child_watcher(fresh)); /* closes w */
        ca_child_watcher_unref(fresh);
        break;
    }
    case DROP_REMOVE:
        CHECK_EQ(ca_child_watcher_remove_child_handler(w, ca_process_pid(r->proc)), 1);
        break;
    }
}

/* Whether pid is still our child, running or a zombie (asked without reaping it). */
static bool is_our_child(pid_t pid)
{
    siginfo_t si;
    memset(&si, 0, sizeof si);
    return waitid(P_PID, (id_t)pid, &si, WEXITED | WNOHANG | WNOWAIT) == 0;
}

/* Whether spawned processes hold a pidfd here (not under valgrind, which refuses CLONE_PIDFD):
 * asked with a Threaded watcher, which opens none of its own. Call it before use_watcher. */
static bool procs_have_pidfd(ca_loop *loop)
{
    CHECK(use_watcher(loop, W_THREADED));
    ca_process *p;
    ca_subprocess_options o = {.argv = ARGV("sleep", "100")};
    CHECK_OK(ca_loop_subprocess_exec(loop, &o, NULL, NULL, &p));
    bool yes = count_pidfds(NULL) > 0;
    CHECK_EQ(kill_and_wait(loop, p), -SIGKILL);
    ca_process_unref(p);
    drop_watcher();
    return yes;
}

/* A watcher that drops a running process's registration (every built-in kind; closed,
 * replaced, or the pid removed by the user), then the loop closes: the child is killed and
 * reaped, the process and the loop are freed (ASan and valgrind check that), nothing is logged
 * twice. It used to wait for a callback that never came: the process leaked with its loop. */
LOOP_TEST(watcher_drops_then_loop_closes) /* timeout: 120 */
{
    ca_set_log_handler(count_log, NULL);
    for (int k = 0; k < W_COUNT; k++) {
        for (int how = 0; how < DROP_COUNT; how++) {
            ca_loop *l;
            if (!loop_with_watcher(k, &l)) break;
            struct run r;
            ca_subprocess_options o = {.argv = ARGV("sleep", "600"), .stdout_mode = CA_PIPE};
            start(&r, l, &o);
            t_run_for(l, 0.02);
            pid_t pid = ca_process_pid(r.proc);
            drop_registration(&r, how);
            t_run_for(l, 0.02);
            int before = logged;
            CHECK_OK(ca_loop_close(l));
            r.closed = true;
            if (logged - before != 1)
                t_fail(__FILE__, __LINE__, "%s, %s: %d \"killed\" lines", wname[k],
                       drop_name[how], logged - before);
            CHECK(!is_our_child(pid));
            int rc;
            CHECK_OK(ca_process_returncode(r.proc, &rc));
            CHECK_EQ(rc, -SIGKILL);
            CHECK(ca_future_cancelled(r.wait));
            CHECK_EQ(r.after_close, 0);
            drop_watcher();
            run_free(&r);
            ca_loop_unref(l);
            CHECK(no_children());
        }
    }
    ca_set_log_handler(NULL, NULL);
}

/* The same drops while the loop keeps running: the process learns its exit on its own, through
 * its pidfd (without one, as under valgrind, it can only be ended when the loop closes). */
LOOP_TEST(watcher_drops_process_finishes) /* timeout: 120 */
{
    bool pidfd = procs_have_pidfd(loop);
    for (int k = 0; k < W_COUNT; k++) {
        for (int how = 0; how < DROP_COUNT; how++) {
            if (!use_watcher(loop, k)) break;
            struct run r;
            ca_subprocess_options o = {.argv = ARGV("sleep", "600"), .stdout_mode = CA_PIPE};
            start(&r, loop, &o);
            t_run_for(loop, 0.02);
            drop_registration(&r, how);
            t_run_for(loop, 0.02);
            CHECK_OK(ca_process_terminate(r.proc)); /* the exit is not known: it signals */
            if (pidfd) {
                if (!t_run_until(loop, waited, &r, 10))
                    t_fail(__FILE__, __LINE__, "%s, %s: the process did not finish", wname[k],
                           drop_name[how]);
                int rc = finish(&r, 1);
                /* 255: another reaped it first: the thread of a Threaded watcher (which
                 * waits on after a close or a remove), or a Fast watcher that still runs. */
                bool other = k == W_THREADED || (k == W_FAST && how == DROP_REMOVE);
                if (rc != -SIGTERM && !(rc == 255 && other))
                    t_fail(__FILE__, __LINE__, "%s, %s: rc %d", wname[k], drop_name[how], rc);
                CHECK_EQ(r.nexit, 1);
                CHECK_EQ(r.nlost[1], 1);
            }
            drop_watcher();
            run_free(&r);
            CHECK_EQ(count_pidfds(NULL), 0);
        }
    }
    CHECK(no_children());
}

/* The user replaces the process's handler with one of their own (bizarre, but asyncio allows
 * it): the user's callback gets the exit, the process's is never called and the process does
 * not reap the child itself (that would rob the user of the status). Its loop's close still
 * ends the process and frees it. */
struct takeover {
    pid_t pid;
    int got;
};

static void user_exit_cb(pid_t pid, int rc, void *arg)
{
    struct takeover *t = arg;
    t->got = rc == -SIGTERM ? 1 : 1000 + rc;
}

static void take_over(void *arg)
{
    struct takeover *t = arg;
    ca_child_watcher *w;
    CHECK_OK(ca_get_child_watcher(&w));
    CHECK_OK(ca_child_watcher_add_child_handler(w, t->pid, user_exit_cb, t));
}

static bool taken_over(void *arg) { return ((struct takeover *)arg)->got != 0; }

LOOP_TEST(user_replaces_process_handler)
{
    for (int k = 0; k < W_COUNT; k++) {
        ca_loop *l;
        if (!loop_with_watcher(k, &l)) continue;
        struct run r;
        ca_subprocess_options o = {.argv = ARGV("sleep", "600")};
        start(&r, l, &o);
        struct takeover t = {.pid = ca_process_pid(r.proc)};
        /* From a callback: the user's handler is delivered to the running loop. */
        CHECK_OK(ca_loop_call_soon(l, take_over, &t, NULL));
        t_run_for(l, 0.02);
        CHECK_OK(ca_process_terminate(r.proc));
        if (!t_run_until(l, taken_over, &t, 10) || t.got != 1)
            t_fail(__FILE__, __LINE__, "%s: the user's callback got %d", wname[k], t.got);
        CHECK_EQ(r.waited, 0);
        CHECK_OK(ca_loop_close(l));
        r.closed = true;
        int rc;
        CHECK_OK(ca_process_returncode(r.proc, &rc));
        CHECK_EQ(rc, 255); /* the status went to the user */
        CHECK(ca_future_cancelled(r.wait));
        drop_watcher();
        run_free(&r);
        ca_loop_unref(l);
    }
    CHECK(no_children());
}

/* The delivery loop (a, running when the process was spawned on b) closes before the child
 * exits: the watcher cannot deliver the exit there and drops the registration, with the
 * returncode when it had reaped the child (Threaded, MultiLoop), or as Pidfd, whose reader went
 * with a, without. The process learns its exit anyway, on b. It used to wait for it forever. */
struct on_a {
    ca_loop *b;
    struct run r;
    bool spawned;
};

static void spawn_from_a(void *arg)
{
    struct on_a *s = arg;
    ca_subprocess_options o = {.argv = ARGV("sh", "-c", "sleep 0.2; exit 7"),
                               .stdout_mode = CA_PIPE};
    start(&s->r, s->b, &o);
    s->spawned = true;
}

static bool spawned_from_a(void *arg) { return ((struct on_a *)arg)->spawned; }

LOOP_TEST(delivery_loop_closed_first) /* timeout: 60 */
{
    static const int kinds[] = {W_THREADED, W_MULTILOOP, W_PIDFD, W_URING};
    bool pidfd = procs_have_pidfd(loop);
    ca_set_log_handler(NULL, NULL); /* "Loop that handles pid ... is closed" */
    for (size_t i = 0; i < sizeof kinds / sizeof kinds[0]; i++) {
        int k = kinds[i];
        if (!use_watcher(loop, k)) continue;
        ca_loop *a, *b;
        CHECK_OK(t_new_loop(&a));
        CHECK_OK(t_new_loop(&b));
        struct on_a s = {.b = b};
        CHECK_OK(ca_loop_call_soon(a, spawn_from_a, &s, NULL));
        CHECK(t_run_until(a, spawned_from_a, &s, 10));
        CHECK_OK(ca_loop_close(a));
        ca_loop_unref(a);
        if (pidfd || k != W_PIDFD) {
            if (!t_run_until(b, waited, &s.r, 10))
                t_fail(__FILE__, __LINE__, "%s: the process did not finish", wname[k]);
            CHECK_EQ(finish(&s.r, 1), 7);
        }
        CHECK_OK(ca_loop_close(b));
        s.r.closed = true;
        run_free(&s.r);
        ca_loop_unref(b);
        drop_watcher();
    }
    CHECK(no_children());
}

/* A Threaded watcher closed in another thread right when its children exit or are killed by
 * their loop's close: every order of exit, drop, take back and close of the loop, in many
 * rounds. Several children per round: the close calls their drops one after another after
 * releasing its lock, which widens the window where a drop is unregistered but not yet called
 * (the loop's close then finds nothing to take back and leaves the reference to the drop). No
 * zombie, no leak, no double free (ASan, TSan). */
struct closer {
    ca_child_watcher *w;
    atomic_int ready, go;
};

static void *closer_main(void *arg)
{
    struct closer *c = arg;
    atomic_store(&c->ready, 1);
    while (!atomic_load(&c->go)) {
    }
    ca_child_watcher_close(c->w);
    return NULL;
}

TEST(threaded_close_races_exit) /* timeout: 180 */
{
    enum { N = 6 };
    ca_set_log_handler(count_log, NULL); /* "killed" lines: quiet */
    int rounds = (int)scaled(300, 30);
    for (int i = 0; i < rounds; i++) {
        ca_loop *l;
        CHECK_OK(ca_new_event_loop(&l));
        CHECK(use_watcher(l, W_THREADED));
        struct closer c = {0};
        CHECK_OK(ca_get_child_watcher(&c.w));
        ca_child_watcher_ref(c.w);
        /* Children that exit at once (their exits race the close) and children that the
         * loop's close kills (its close hook races their drops). */
        struct run r[N];
        pid_t pid[N];
        ca_subprocess_options quick = {.argv = ARGV("true")};
        ca_subprocess_options slow = {.argv = ARGV("sleep", "600")};
        for (int n = 0; n < N; n++) {
            start(&r[n], l, (n + i) % 2 ? &slow : &quick);
            pid[n] = ca_process_pid(r[n].proc);
        }
        pthread_t t;
        CHECK_EQ(pthread_create(&t, NULL, closer_main, &c), 0);
        while (!atomic_load(&c.ready)) {
        }
        atomic_store(&c.go, 1);
        if (i % 4 == 0) {
            /* The drops (or the exits) while the loop runs, then the close. */
            t_run_for(l, 0.001 * (i % 3));
        } else {
            /* The close right at the drops: a sweep of delays. */
            for (volatile int d = (i * 13) % 3000; d > 0; d--) {
            }
        }
        CHECK_OK(ca_loop_close(l));
        CHECK_EQ(pthread_join(t, NULL), 0);
        drop_watcher();
        ca_child_watcher_unref(c.w);
        for (int n = 0; n < N; n++) {
            r[n].closed = true;
            CHECK_EQ(r[n].after_close, 0);
            run_free(&r[n]);
        }
        ca_loop_unref(l);
        /* Reaped by the loop's close, a drop, or the watcher's threads (shortly). */
        for (int n = 0; n < N; n++) {
            for (int j = 0; j < 1000 && is_our_child(pid[n]); j++) {
                struct timespec ts = {0, 1000 * 1000};
                nanosleep(&ts, NULL);
            }
            CHECK(!is_our_child(pid[n]));
        }
    }
    ca_set_log_handler(NULL, NULL);
    CHECK(no_children());
}
