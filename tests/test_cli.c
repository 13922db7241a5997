/*
 * End-to-end tests of the casyncio command: each test runs the built binary (found next to
 * this test program: build/MODE/tests/test_cli -> build/MODE/casyncio) with posix_spawn and
 * pipes, and checks its output and exit status. Tests that care about jobs outliving the
 * runner make this process a child subreaper, so that an orphaned job would be ours to see.
 */
#include "harness.h"

#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>

extern char **environ;

/* ----- running the binary ------------------------------------------------------------------ */

struct res {
    int status;      /* exit status, or 128+signal */
    char *out, *err; /* NUL-terminated */
    size_t nout, nerr;
    double secs;
};

static const char *cli_path(void)
{
    static char path[PATH_MAX];
    if (path[0]) return path;
    ssize_t n = readlink("/proc/self/exe", path, sizeof path - 32);
    CHECK(n > 0);
    path[n] = 0;
    char *slash = strrchr(path, '/'); /* .../build/MODE/tests/test_cli */
    CHECK(slash != NULL);
    *slash = 0;
    slash = strrchr(path, '/');
    CHECK(slash != NULL);
    strcpy(slash, "/casyncio");
    if (access(path, X_OK) != 0) t_fail(__FILE__, __LINE__, "%s is not built", path);
    return path;
}

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec / 1e9;
}

static void append(char **buf, size_t *len, const char *p, size_t n)
{
    char *b = realloc(*buf, *len + n + 1);
    CHECK(b != NULL);
    memcpy(b + *len, p, n);
    *len += n;
    b[*len] = 0;
    *buf = b;
}

/* Starts casyncio with args (NULL-terminated, without argv[0]); stdin is a pipe (when in_fd
 * is NULL it is closed at once) and stdout/stderr are pipes, or stderr_fd if >= 0. */
static pid_t start_cli(const char *const *args, int *in_fd, int *out_fd, int *err_fd,
                       int stderr_fd)
{
    const char *argv[256];
    int n = 0;
    argv[n++] = cli_path();
    for (; args[n - 1]; n++) {
        CHECK(n < 255);
        argv[n] = args[n - 1];
    }
    argv[n] = NULL;
    int pin[2], pout[2], perr[2] = {-1, -1};
    CHECK_OK(pipe2(pin, O_CLOEXEC));
    CHECK_OK(pipe2(pout, O_CLOEXEC));
    if (stderr_fd < 0) CHECK_OK(pipe2(perr, O_CLOEXEC));
    posix_spawn_file_actions_t fa;
    posix_spawn_file_actions_init(&fa);
    posix_spawn_file_actions_adddup2(&fa, pin[0], 0);
    posix_spawn_file_actions_adddup2(&fa, pout[1], 1);
    posix_spawn_file_actions_adddup2(&fa, stderr_fd >= 0 ? stderr_fd : perr[1], 2);
    pid_t pid;
    int e = posix_spawn(&pid, argv[0], &fa, NULL, (char *const *)argv, environ);
    posix_spawn_file_actions_destroy(&fa);
    CHECK_EQ(e, 0);
    close(pin[0]);
    close(pout[1]);
    if (perr[1] >= 0) close(perr[1]);
    if (in_fd) *in_fd = pin[1];
    else close(pin[1]);
    *out_fd = pout[0];
    *err_fd = perr[0];
    return pid;
}

/* Feeds input (may be NULL), collects stdout/stderr until both close, reaps the runner. */
static void finish_cli(pid_t pid, int in_fd, int out_fd, int err_fd, const char *input,
                       struct res *r, double t0, double timeout)
{
    size_t in_len = input ? strlen(input) : 0, in_off = 0;
    if (in_fd >= 0 && in_len == 0) {
        close(in_fd);
        in_fd = -1;
    }
    if (in_fd >= 0) fcntl(in_fd, F_SETFL, O_NONBLOCK);
    r->out = calloc(1, 1);
    r->err = calloc(1, 1);
    r->nout = r->nerr = 0;
    double deadline = t0 + timeout * t_slow();
    while (out_fd >= 0 || err_fd >= 0) {
        struct pollfd p[3] = {{.fd = out_fd, .events = POLLIN},
                              {.fd = err_fd, .events = POLLIN},
                              {.fd = in_fd, .events = POLLOUT}};
        int left = (int)((deadline - now_s()) * 1000);
        if (left <= 0) {
            kill(pid, SIGKILL);
            t_fail(__FILE__, __LINE__, "casyncio did not finish in %.0fs; stderr so far:\n%s",
                   timeout, r->err);
        }
        int k = poll(p, 3, left);
        if (k < 0 && errno == EINTR) continue;
        CHECK(k >= 0);
        char buf[65536];
        for (int i = 0; i < 2; i++) {
            if (!p[i].revents) continue;
            ssize_t m = read(p[i].fd, buf, sizeof buf);
            if (m > 0) {
                if (i == 0) append(&r->out, &r->nout, buf, (size_t)m);
                else append(&r->err, &r->nerr, buf, (size_t)m);
            } else if (m == 0 || errno != EINTR) {
                close(p[i].fd);
                if (i == 0) out_fd = -1;
                else err_fd = -1;
            }
        }
        if (p[2].revents) {
            ssize_t m = write(in_fd, input + in_off, in_len - in_off);
            if (m > 0) in_off += (size_t)m;
            if (m < 0 && errno != EAGAIN && errno != EINTR) in_off = in_len;
            if (in_off == in_len) {
                close(in_fd);
                in_fd = -1;
            }
        }
    }
    if (in_fd >= 0) close(in_fd);
    int st;
    while (waitpid(pid, &st, 0) < 0) CHECK_EQ(errno, EINTR);
    r->status = WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
    r->secs = now_s() - t0;
}

static void run_in_for(struct res *r, const char *input, const char *const *args, double timeout)
{
    int in, out, err;
    double t0 = now_s();
    pid_t pid = start_cli(args, &in, &out, &err, -1);
    finish_cli(pid, in, out, err, input, r, t0, timeout);
}

static void run_in(struct res *r, const char *input, const char *const *args)
{
    run_in_for(r, input, args, 30);
}

#define RUN(r, ...) run_in((r), NULL, (const char *const[]){__VA_ARGS__, NULL})
#define RUN_IN(r, input, ...) run_in((r), (input), (const char *const[]){__VA_ARGS__, NULL})

static void res_free(struct res *r)
{
    free(r->out);
    free(r->err);
}

#define CHECK_STR(got, want)                                                                   \
    do {                                                                                       \
        const char *t_g_ = (got), *t_w_ = (want);                                              \
        if (strcmp(t_g_, t_w_) != 0)                                                           \
            t_fail(__FILE__, __LINE__, "%s:\n--- got ---\n%s--- want ---\n%s", #got, t_g_, t_w_); \
    } while (0)

#define CHECK_HAS(hay, needle)                                                                 \
    do {                                                                                       \
        const char *t_h_ = (hay), *t_n_ = (needle);                                            \
        if (!strstr(t_h_, t_n_))                                                               \
            t_fail(__FILE__, __LINE__, "%s does not contain \"%s\":\n%s", #hay, t_n_, t_h_);   \
    } while (0)

/* A private directory for files the jobs write; removed by the test (rm -rf via the CLI is not
 * wanted, so plain unlink of the names we made). */
static void tmp_path(char *buf, size_t n, const char *name)
{
    snprintf(buf, n, "/tmp/ca_test_cli_%d_%s", (int)getpid(), name);
}

static char *read_file(const char *path)
{
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return NULL;
    char *s = calloc(1, 1);
    size_t len = 0;
    char buf[4096];
    ssize_t m;
    while ((m = read(fd, buf, sizeof buf)) > 0) append(&s, &len, buf, (size_t)m);
    close(fd);
    return s;
}

static int count_lines(const char *s)
{
    int n = 0;
    for (; *s; s++) n += *s == '\n';
    return n;
}

/* After the runner exited: no job may still run. Orphans were reparented to us (we are a
 * subreaper); ones that died are reaped here, one still alive after a moment fails. */
static void check_no_orphans(void)
{
    double end = now_s() + 1.0 * t_slow();
    for (;;) {
        int st;
        pid_t p = waitpid(-1, &st, WNOHANG);
        if (p > 0) continue;
        if (p < 0) return; /* ECHILD: nothing left */
        if (now_s() > end) {
            kill(0, SIGKILL);
            t_fail(__FILE__, __LINE__, "a job outlived the runner");
        }
        struct timespec ts = {0, 10 * 1000 * 1000};
        nanosleep(&ts, NULL);
    }
}

/* ----- usage ------------------------------------------------------------------------------ */

TEST(help_and_version)
{
    struct res r;
    RUN(&r, "--help");
    CHECK_EQ(r.status, 0);
    CHECK_HAS(r.out, "usage: casyncio run");
    res_free(&r);
    RUN(&r, "run", "--help");
    CHECK_EQ(r.status, 0);
    CHECK_HAS(r.out, "--keep-order");
    res_free(&r);
    RUN(&r, "--version");
    CHECK_EQ(r.status, 0);
    CHECK_HAS(r.out, "casyncio ");
    CHECK_HAS(r.out, ca_version());
    res_free(&r);
}

/* GNU parallel's status for bad usage: 255, so that 1-101 always counts failed jobs. */
TEST(bad_usage_exits_255)
{
    static const char *const cases[][4] = {
        {"run", "--no-such-option", "true", NULL},
        {"run", "-j", "many", NULL},
        {"run", "--timeout", "-1", NULL},
        {"run", "--halt", "sometimes", NULL},
        {"run", "--loop", "select", NULL},
        {"run", "--watcher", "lazy", NULL},
        {"frobnicate", NULL, NULL, NULL},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        struct res r;
        run_in(&r, NULL, cases[i]);
        if (r.status != 255) t_fail(__FILE__, __LINE__, "case %zu: exit %d", i, r.status);
        CHECK_HAS(r.err, "usage");
        CHECK_EQ(r.nout, 0);
        res_free(&r);
    }
    struct res r;
    run_in(&r, NULL, (const char *const[]){NULL});
    CHECK_EQ(r.status, 255);
    CHECK_HAS(r.err, "usage");
    res_free(&r);
}

TEST(info)
{
    struct res r;
    RUN(&r, "info");
    CHECK_EQ(r.status, 0);
    CHECK_HAS(r.out, ca_version());
    CHECK_HAS(r.out, "kernel:");
    CHECK_HAS(r.out, "epoll      works");
    CHECK_HAS(r.out, "poll       works");
    CHECK_HAS(r.out, "threaded   works");
    CHECK_HAS(r.out, "pidfd");
    CHECK_HAS(r.out, "uring");
    CHECK_HAS(r.out, "defaults:");
    res_free(&r);
}

/* ----- building commands ------------------------------------------------------------------ */

TEST(replacement_strings_and_args)
{
    struct res r;
    RUN(&r, "run", "-k", "echo", "x{}y", "{}", ":::", "a", "b c");
    CHECK_EQ(r.status, 0);
    CHECK_STR(r.out, "xay a\nxb cy b c\n");
    res_free(&r);
    /* No {}: the input is appended as the last argument (one argument, spaces and all). */
    RUN(&r, "run", "-k", "printf", "<%s>\\n", ":::", "a", "b c");
    CHECK_STR(r.out, "<a>\n<b c>\n");
    res_free(&r);
    RUN(&r, "run", "echo", "{.} {/} {//} {/.} {#} {%}", ":::", "dir/sub/file.tar.gz");
    CHECK_STR(r.out, "dir/sub/file.tar file.tar.gz dir/sub file.tar 1 1\n");
    res_free(&r);
    /* ::: with nothing after it: no jobs, success. */
    RUN(&r, "run", "echo", ":::");
    CHECK_EQ(r.status, 0);
    CHECK_EQ(r.nout, 0);
    res_free(&r);
}

TEST(several_input_sources)
{
    struct res r;
    /* Every combination, the last source varying fastest; {N} is the Nth value. */
    RUN(&r, "run", "-k", "echo", "{2}{1}", ":::", "a", "b", ":::", "1", "2");
    CHECK_EQ(r.status, 0);
    CHECK_STR(r.out, "1a\n2a\n1b\n2b\n");
    res_free(&r);
    /* Without a replacement string each value is an argument of its own; --tag joins them
     * with spaces, as GNU parallel does. */
    RUN(&r, "run", "-k", "--tag", "printf", "<%s>", ":::", "a b", ":::", "1");
    CHECK_STR(r.out, "a b 1\t<a b><1>");
    res_free(&r);
    char path[128];
    tmp_path(path, sizeof path, "src");
    FILE *f = fopen(path, "we");
    CHECK(f != NULL);
    fputs("x\ny\n", f);
    fclose(f);
    RUN(&r, "run", "-k", "echo", "::::", path, ":::", "1");
    CHECK_STR(r.out, "x 1\ny 1\n");
    res_free(&r);
    unlink(path);
    /* An empty source: no combination, no job. */
    RUN(&r, "run", "echo", ":::", "a", ":::");
    CHECK_EQ(r.status, 0);
    CHECK_EQ(r.nout, 0);
    res_free(&r);
    RUN(&r, "run", "echo", "::::", "/nonexistent/casyncio-test", ":::", "a");
    CHECK_EQ(r.status, 255);
    CHECK_HAS(r.err, "/nonexistent/casyncio-test");
    res_free(&r);
}

TEST(stdin_file_and_shell_inputs)
{
    struct res r;
    RUN_IN(&r, "a\nb\n\nc d\n", "run", "-k", "-j", "2", "echo", "[{}]");
    CHECK_EQ(r.status, 0);
    CHECK_STR(r.out, "[a]\n[b]\n[]\n[c d]\n"); /* a blank line: an empty input, as parallel */
    res_free(&r);
    /* Without COMMAND each input is a shell command line. */
    RUN_IN(&r, "echo one | tr o O\nx=2; echo $x\n", "run", "-k");
    CHECK_STR(r.out, "One\n2\n");
    res_free(&r);
    char path[128];
    tmp_path(path, sizeof path, "args");
    FILE *f = fopen(path, "we");
    CHECK(f != NULL);
    fputs("1\n2\n3", f); /* the last line has no newline */
    fclose(f);
    RUN(&r, "run", "-k", "-a", path, "echo", "n={}");
    CHECK_STR(r.out, "n=1\nn=2\nn=3\n");
    res_free(&r);
    RUN(&r, "run", "-k", "echo", "::::", path);
    CHECK_STR(r.out, "1\n2\n3\n");
    res_free(&r);
    unlink(path);
    /* --shell: COMMAND is a script; the input is quoted for it. */
    RUN(&r, "run", "-k", "--shell", "echo {} | tr a-z A-Z", ":::", "a b", "it's");
    CHECK_EQ(r.status, 0);
    CHECK_STR(r.out, "A B\nIT'S\n");
    res_free(&r);
    /* -0: NUL-separated inputs. */
    int in, out, err;
    double t0 = now_s();
    pid_t pid =
        start_cli((const char *const[]){"run", "-0", "-k", "echo", NULL}, &in, &out, &err, -1);
    CHECK_EQ(write(in, "x y\0z\n", 6), 6);
    finish_cli(pid, in, out, err, NULL, &r, t0, 30);
    CHECK_STR(r.out, "x y\nz\n\n");
    res_free(&r);
}

TEST(dry_run_runs_nothing)
{
    char path[128];
    tmp_path(path, sizeof path, "dry");
    struct res r;
    RUN(&r, "run", "--dry-run", "touch", path, "{}", ":::", "a b", "c");
    CHECK_EQ(r.status, 0);
    char want[512];
    snprintf(want, sizeof want, "touch %s 'a b'\ntouch %s c\n", path, path);
    CHECK_STR(r.out, want);
    CHECK(access(path, F_OK) != 0);
    res_free(&r);
}

/* ----- output ------------------------------------------------------------------------------ */

TEST(keep_order_and_grouping)
{
    struct res r;
    const char *script = "sleep $1; echo start $1; sleep 0.1; echo end $1";
    /* Gaps of 0.35 s between the jobs' ends, so that a busy machine keeps the order. */
    RUN(&r, "run", "-j", "3", "sh", "-c", script, "sh", ":::", "0.75", "0.05", "0.4");
    CHECK_EQ(r.status, 0);
    CHECK_STR(r.out, "start 0.05\nend 0.05\nstart 0.4\nend 0.4\nstart 0.75\nend 0.75\n");
    res_free(&r);
    RUN(&r, "run", "-j", "3", "--keep-order", "sh", "-c", script, "sh", ":::", "0.75", "0.05",
        "0.4");
    CHECK_STR(r.out, "start 0.75\nend 0.75\nstart 0.05\nend 0.05\nstart 0.4\nend 0.4\n");
    res_free(&r);
    /* --line-buffer: lines as they come, so the two jobs' lines interleave. */
    RUN(&r, "run", "-j", "2", "--line-buffer", "sh", "-c",
        "sleep $1; echo a$1; sleep 0.8; echo b$1", "sh", ":::", "0", "0.4");
    CHECK_STR(r.out, "a0\na0.4\nb0\nb0.4\n");
    res_free(&r);
    /* stderr is grouped too, on stderr. */
    RUN(&r, "run", "-k", "sh", "-c", "echo out$1; echo err$1 >&2", "sh", ":::", "1", "2");
    CHECK_STR(r.out, "out1\nout2\n");
    CHECK_STR(r.err, "err1\nerr2\n");
    res_free(&r);
}

TEST(tag)
{
    struct res r;
    RUN(&r, "run", "-k", "--tag", "sh", "-c", "echo hi $1; printf 'two\\nlines\\n'", "sh", ":::",
        "x", "y z");
    CHECK_EQ(r.status, 0);
    CHECK_STR(r.out, "x\thi x\nx\ttwo\nx\tlines\ny z\thi y z\ny z\ttwo\ny z\tlines\n");
    res_free(&r);
}

/* ----- exit status, halting, retries, timeouts ------------------------------------------------ */

TEST(exit_status_counts_failures)
{
    struct res r;
    RUN(&r, "run", "true", ":::", "1", "2");
    CHECK_EQ(r.status, 0);
    res_free(&r);
    RUN(&r, "run", "sh", "-c", "exit $1", "sh", ":::", "0", "1", "2", "3", "0");
    CHECK_EQ(r.status, 3);
    res_free(&r);
    /* More than 101 failures: capped at 101. */
    struct {
        const char *a[200];
    } args = {{"run", "-j", "8", "false", ":::"}};
    static char nums[150][16];
    for (int i = 0; i < 150; i++) {
        snprintf(nums[i], sizeof nums[i], "%d", i);
        args.a[5 + i] = nums[i];
    }
    args.a[155] = NULL;
    run_in(&r, NULL, args.a);
    CHECK_EQ(r.status, 101);
    res_free(&r);
}

TEST(missing_command_is_exit_127)
{
    char log[128];
    tmp_path(log, sizeof log, "joblog127");
    struct res r;
    RUN(&r, "run", "--joblog", log, "casyncio-no-such-command", ":::", "1");
    CHECK_EQ(r.status, 1);
    CHECK_HAS(r.err, "casyncio-no-such-command");
    CHECK_HAS(r.err, "not found");
    char *l = read_file(log);
    CHECK(l != NULL);
    CHECK_HAS(l, "\t127\t0\tcasyncio-no-such-command 1\n");
    free(l);
    unlink(log);
    res_free(&r);
    /* Among other jobs, which still run. */
    RUN(&r, "run", "-k", "{}", ":::", "true", "casyncio-no-such-command", "echo");
    CHECK_EQ(r.status, 1);
    CHECK_STR(r.out, "\n");
    res_free(&r);
}

TEST(halt_now_on_first_failure) /* timeout: 20 */
{
    char log[128];
    tmp_path(log, sizeof log, "halt");
    struct res r;
    RUN(&r, "run", "-j", "2", "--halt", "now,fail=1", "--joblog", log, ":::", "sleep 0.2; exit 4",
        "sleep 30", "echo never", "echo never");
    CHECK_EQ(r.status, 4); /* fail=1: the failed job's status, as GNU parallel */
    CHECK(r.secs < 5);
    CHECK(strstr(r.out, "never") == NULL);
    CHECK_HAS(r.err, "halting");
    char *l = read_file(log);
    CHECK(l != NULL);
    CHECK_EQ(count_lines(l), 3); /* header, the failure, the killed sleep */
    CHECK_HAS(l, "\t4\t0\tsleep 0.2; exit 4\n");
    CHECK_HAS(l, "\t0\t15\tsleep 30\n");
    free(l);
    unlink(log);
    res_free(&r);
    /* soon: the running job finishes, nothing new starts. */
    RUN(&r, "run", "-j", "2", "--halt", "soon,fail=1", ":::", "exit 4", "sleep 0.3; echo ran",
        "echo never");
    CHECK_EQ(r.status, 4);
    CHECK_STR(r.out, "ran\n");
    res_free(&r);
}

TEST(retries)
{
    char cnt[128], script[512];
    tmp_path(cnt, sizeof cnt, "count");
    /* Fails until its third run. */
    snprintf(script, sizeof script,
             "n=$(cat %s 2>/dev/null || echo 0); n=$((n+1)); echo $n > %s; echo try $n; "
             "[ $n -ge 3 ]",
             cnt, cnt);
    struct res r;
    /* GNU parallel's count: --retries 3 runs a job at most 3 times. */
    RUN(&r, "run", "--retries", "3", ":::", script);
    CHECK_EQ(r.status, 0);
    CHECK_STR(r.out, "try 3\n"); /* only the last attempt's output */
    char *c = read_file(cnt);
    CHECK_STR(c, "3\n");
    free(c);
    res_free(&r);
    unlink(cnt);
    RUN(&r, "run", "--retries", "2", ":::", script);
    CHECK_EQ(r.status, 1);
    c = read_file(cnt);
    CHECK_STR(c, "2\n");
    free(c);
    res_free(&r);
    unlink(cnt);
}

TEST(timeout_kills_a_sleep) /* timeout: 20 */
{
    char log[128];
    tmp_path(log, sizeof log, "timeout");
    struct res r;
    RUN(&r, "run", "--timeout", "0.3", "--joblog", log, "sleep", ":::", "100", "0.01");
    CHECK_EQ(r.status, 1);
    CHECK(r.secs < 3 * t_slow());
    char *l = read_file(log);
    CHECK(l != NULL);
    CHECK_HAS(l, "\t0\t15\tsleep 100\n");
    CHECK_HAS(l, "\t0\t0\tsleep 0.01\n");
    free(l);
    unlink(log);
    res_free(&r);
    /* A job that ignores SIGTERM gets SIGKILL after the grace period. */
    RUN(&r, "run", "--timeout", "0.2", "--grace", "0.3", ":::", "trap '' TERM; sleep 100");
    CHECK_EQ(r.status, 1);
    CHECK(r.secs < 3 * t_slow());
    res_free(&r);
}

TEST(joblog_columns)
{
    char log[128];
    tmp_path(log, sizeof log, "joblog");
    struct res r;
    double before = (double)time(NULL);
    RUN(&r, "run", "-k", "--joblog", log, "sh", "-c", "exit $1", "sh", ":::", "0", "3");
    CHECK_EQ(r.status, 1);
    res_free(&r);
    char *l = read_file(log);
    CHECK(l != NULL);
    char *save = NULL, *line = strtok_r(l, "\n", &save);
    CHECK_STR(line, "Seq\tHost\tStarttime\tJobRuntime\tSend\tReceive\tExitval\tSignal\tCommand");
    int rows = 0;
    while ((line = strtok_r(NULL, "\n", &save)) != NULL) {
        char *f[10], *s2 = NULL;
        int n = 0;
        for (char *t = strtok_r(line, "\t", &s2); t && n < 10; t = strtok_r(NULL, "\t", &s2))
            f[n++] = t;
        CHECK_EQ(n, 9);
        unsigned long seq = strtoul(f[0], NULL, 10);
        CHECK(seq == 1 || seq == 2);
        CHECK_STR(f[1], ":");
        double start = atof(f[2]), runtime = atof(f[3]);
        CHECK(start >= before - 1 && start < before + 60);
        CHECK(strchr(f[2], '.') != NULL);
        CHECK(runtime >= 0 && runtime < 10);
        CHECK_STR(f[4], "0");
        CHECK_STR(f[5], "0");
        CHECK_EQ(atoi(f[6]), seq == 1 ? 0 : 3);
        CHECK_STR(f[7], "0");
        CHECK_STR(f[8], seq == 1 ? "sh -c 'exit $1' sh 0" : "sh -c 'exit $1' sh 3");
        rows++;
    }
    CHECK_EQ(rows, 2);
    free(l);
    unlink(log);
}

/* ----- signals ------------------------------------------------------------------------------- */

static void wait_for_lines(const char *path, int n)
{
    double end = now_s() + 10 * t_slow();
    for (;;) {
        char *s = read_file(path);
        int k = s ? count_lines(s) : 0;
        free(s);
        if (k >= n) return;
        if (now_s() > end) t_fail(__FILE__, __LINE__, "%s: %d lines, want %d", path, k, n);
        struct timespec ts = {0, 20 * 1000 * 1000};
        nanosleep(&ts, NULL);
    }
}

/* Reads fd (and drops what it read) until text has appeared in it. */
static void wait_for_text(int fd, const char *text)
{
    char *seen = calloc(1, 1);
    size_t len = 0;
    double end = now_s() + 10 * t_slow();
    while (!strstr(seen, text)) {
        struct pollfd p = {.fd = fd, .events = POLLIN};
        int left = (int)((end - now_s()) * 1000);
        if (left <= 0 || poll(&p, 1, left) <= 0)
            t_fail(__FILE__, __LINE__, "no \"%s\" in:\n%s", text, seen);
        char buf[512];
        ssize_t n = read(fd, buf, sizeof buf);
        if (n <= 0) t_fail(__FILE__, __LINE__, "EOF before \"%s\" in:\n%s", text, seen);
        append(&seen, &len, buf, (size_t)n);
    }
    free(seen);
}

TEST(sigint_is_forwarded_and_nothing_is_left) /* timeout: 30 */
{
    CHECK_OK(prctl(PR_SET_CHILD_SUBREAPER, 1));
    char got[128], pids[128], script[512];
    tmp_path(got, sizeof got, "got");
    tmp_path(pids, sizeof pids, "pids");
    /* The job's shell records the SIGINT; its background sleep ignores SIGINT (as background
     * jobs of a non-interactive shell do) and must be ended by the runner all the same. */
    snprintf(script, sizeof script,
             "trap 'echo got $1 >> %s; exit 3' INT; sleep 10 & echo $! >> %s; wait", got, pids);
    int in, out, err;
    double t0 = now_s();
    pid_t pid = start_cli((const char *const[]){"run", "-j", "3", "sh", "-c", script, "sh", ":::",
                                                "1", "2", "3", "4", "5", NULL},
                          &in, &out, &err, -1);
    wait_for_lines(pids, 3);
    CHECK_OK(kill(pid, SIGINT));
    struct res r;
    finish_cli(pid, in, out, err, NULL, &r, t0, 20);
    CHECK_EQ(r.status, 130);
    CHECK(r.secs < 8 * t_slow());
    CHECK_HAS(r.err, "stopped by Interrupt"); /* the summary, printed after an interrupt */
    CHECK_HAS(r.err, "3 stopped");
    CHECK_HAS(r.err, "2 not started");
    char *g = read_file(got);
    CHECK(g != NULL);
    CHECK_EQ(count_lines(g), 3);
    free(g);
    check_no_orphans();
    char *p = read_file(pids);
    for (char *s = p; s && *s;) {
        pid_t sleeper = (pid_t)strtol(s, &s, 10);
        if (sleeper > 0 && kill(sleeper, 0) == 0)
            t_fail(__FILE__, __LINE__, "sleep %d lives", (int)sleeper);
        while (*s == '\n') s++;
    }
    free(p);
    res_free(&r);
    unlink(got);
    unlink(pids);
}

TEST(second_sigint_kills) /* timeout: 30 */
{
    CHECK_OK(prctl(PR_SET_CHILD_SUBREAPER, 1));
    char pids[128], script[256];
    tmp_path(pids, sizeof pids, "pids2");
    snprintf(script, sizeof script, "trap '' INT TERM; echo $$ >> %s; sleep 20", pids);
    int in, out, err;
    double t0 = now_s();
    pid_t pid = start_cli((const char *const[]){"run", "-j", "2", ":::", script, script, NULL},
                          &in, &out, &err, -1);
    wait_for_lines(pids, 2);
    CHECK_OK(kill(pid, SIGINT));
    /* Two signals before the loop wakes would count as one: wait for the first's message. */
    wait_for_text(err, "waiting for 2 running jobs");
    CHECK_OK(kill(pid, SIGINT));
    struct res r;
    finish_cli(pid, in, out, err, NULL, &r, t0, 20);
    CHECK_EQ(r.status, 130);
    CHECK(r.secs < 8 * t_slow());
    CHECK_HAS(r.err, "killing");
    check_no_orphans();
    res_free(&r);
    unlink(pids);
}

TEST(closed_stdout_ends_the_jobs) /* timeout: 30 */
{
    CHECK_OK(prctl(PR_SET_CHILD_SUBREAPER, 1));
    int in, out, err;
    double t0 = now_s();
    pid_t pid = start_cli((const char *const[]){"run", "--line-buffer", "yes", ":::", "1", "2",
                                                NULL},
                          &in, &out, &err, -1);
    char buf[16];
    CHECK(read(out, buf, sizeof buf) > 0);
    close(out); /* as `| head -1` does */
    struct res r;
    finish_cli(pid, in, -1, err, NULL, &r, t0, 20);
    CHECK_EQ(r.status, 141);
    check_no_orphans();
    res_free(&r);
}

TEST(sigterm_is_forwarded) /* timeout: 30 */
{
    CHECK_OK(prctl(PR_SET_CHILD_SUBREAPER, 1));
    char pids[128], script[256];
    tmp_path(pids, sizeof pids, "pids3");
    snprintf(script, sizeof script, "echo $$ >> %s; exec sleep 20", pids);
    int in, out, err;
    double t0 = now_s();
    pid_t pid = start_cli((const char *const[]){"run", "-j", "2", "--summary", ":::", script,
                                                script, "echo never", NULL},
                          &in, &out, &err, -1);
    wait_for_lines(pids, 2);
    CHECK_OK(kill(pid, SIGTERM));
    struct res r;
    finish_cli(pid, in, out, err, NULL, &r, t0, 20);
    CHECK_EQ(r.status, 143);
    CHECK(r.secs < 8 * t_slow());
    CHECK_EQ(r.nout, 0);
    CHECK_HAS(r.err, "2 stopped");
    CHECK_HAS(r.err, "1 not started");
    check_no_orphans();
    res_free(&r);
    unlink(pids);
}

TEST(input_is_read_as_it_comes)
{
    /* The first job runs (and prints) before the second input line exists. */
    int in, out, err;
    double t0 = now_s();
    pid_t pid = start_cli((const char *const[]){"run", "echo", "got", NULL}, &in, &out, &err, -1);
    CHECK_EQ(write(in, "one\n", 4), 4);
    char buf[64];
    ssize_t n = read(out, buf, sizeof buf - 1);
    CHECK(n > 0);
    buf[n] = 0;
    CHECK_STR(buf, "got one\n");
    CHECK_EQ(write(in, "two\n", 4), 4);
    struct res r;
    finish_cli(pid, in, out, err, NULL, &r, t0, 20);
    CHECK_EQ(r.status, 0);
    CHECK_STR(r.out, "got two\n");
    res_free(&r);
}

/* ----- scale ------------------------------------------------------------------------------- */

/* The runner's open fds and resident memory, as seen by a job (its parent is the runner). */
#define PROBE                                                                              \
    "sleep 0.5; echo fds=$(ls /proc/$PPID/fd | wc -l) "                                     \
    "rss=$(awk '/VmRSS/{print $2}' /proc/$PPID/status)"

static void probe_run(int njobs, int *fds, long *rss_kb, double *secs)
{
    size_t cap = (size_t)njobs * 8 + 256, len = 0;
    char *input = malloc(cap);
    CHECK(input != NULL);
    for (int i = 0; i < njobs; i++) len += (size_t)snprintf(input + len, cap - len, "true\n");
    snprintf(input + len, cap - len, "%s\n", PROBE);
    struct res r;
    /* About 7 s for 10,000 jobs on an idle 2-CPU machine; much more on a busy one. */
    run_in_for(&r, input, (const char *const[]){"run", "-j", "16", NULL}, 110);
    free(input);
    if (r.status != 0) t_fail(__FILE__, __LINE__, "exit %d: %s", r.status, r.err);
    const char *f = strstr(r.out, "fds="), *m = strstr(r.out, "rss=");
    CHECK(f && m);
    *fds = atoi(f + 4);
    *rss_kb = atol(m + 4);
    *secs = r.secs;
    res_free(&r);
}

TEST(ten_thousand_jobs_no_fd_or_memory_growth) /* timeout: 120 */
{
    int n = t_slow() > 1 ? 300 : 10000;
    int fds_small, fds_big;
    long rss_small, rss_big;
    double s_small, s_big;
    probe_run(10, &fds_small, &rss_small, &s_small);
    probe_run(n, &fds_big, &rss_big, &s_big);
    CHECK_EQ(fds_big, fds_small);
    if (rss_big > rss_small + 16 * 1024)
        t_fail(__FILE__, __LINE__, "rss grew from %ld kB to %ld kB", rss_small, rss_big);
    fprintf(stderr, "    %d jobs of true at -j 16 in %.2fs\n", n, s_big - 0.5);
}

/* ----- loops and watchers -------------------------------------------------------------------- */

TEST(every_loop_and_watcher) /* timeout: 90 */
{
    static const char *loops[] = {"epoll", "poll", "uring"};
    static const char *ws[] = {"pidfd", "fast", "safe", "multiloop", "threaded", "uring"};
    for (size_t i = 0; i < 3; i++) {
        for (size_t k = 0; k < sizeof ws / sizeof ws[0]; k++) {
            struct res r;
            RUN(&r, "run", "-k", "-j", "4", "--loop", loops[i], "--watcher", ws[k], "--timeout",
                "5", "echo", ":::", "1", "2", "3", "4", "5", "6");
            if (r.status == 255 && strstr(r.err, "not usable")) {
                fprintf(stderr, "    --loop %s --watcher %s: unavailable here\n", loops[i], ws[k]);
            } else {
                if (r.status != 0 || strcmp(r.out, "1\n2\n3\n4\n5\n6\n") != 0)
                    t_fail(__FILE__, __LINE__,
                           "--loop %s --watcher %s: exit %d, out:\n%s\nerr:\n%s", loops[i],
                           ws[k], r.status, r.out, r.err);
            }
            res_free(&r);
        }
    }
}

/* ----- the progress bar in a pseudo-terminal ------------------------------------------------ */

TEST(progress_bar_in_a_terminal) /* timeout: 30 */
{
    int m = posix_openpt(O_RDWR | O_NOCTTY | O_CLOEXEC);
    if (m < 0) SKIP("no pseudo-terminals here");
    CHECK_OK(grantpt(m));
    CHECK_OK(unlockpt(m));
    const char *name = ptsname(m);
    CHECK(name != NULL);
    int s = open(name, O_RDWR | O_NOCTTY | O_CLOEXEC);
    CHECK(s >= 0);
    int in, out, err;
    double t0 = now_s();
    /* No --bar: it is on by default when stderr is a terminal (and so is the summary). */
    pid_t pid = start_cli((const char *const[]){"run", "-j", "2", "sleep", ":::", "0.3", "0.3",
                                                "0.3", "0.1", NULL},
                          &in, &out, &err, s);
    close(s);
    /* Collect the screen until the runner exits (the pty then reads EIO). */
    char *screen = calloc(1, 1);
    size_t len = 0;
    for (;;) {
        struct pollfd p = {.fd = m, .events = POLLIN};
        int k = poll(&p, 1, (int)(20000 * t_slow()));
        CHECK(k > 0);
        char buf[4096];
        ssize_t n = read(m, buf, sizeof buf);
        if (n <= 0) break;
        append(&screen, &len, buf, (size_t)n);
    }
    struct res r;
    finish_cli(pid, in, out, err, NULL, &r, t0, 20);
    close(m);
    CHECK_EQ(r.status, 0);
    CHECK_HAS(screen, "\r");
    CHECK_HAS(screen, "running");
    CHECK_HAS(screen, "100% 4/4");
    CHECK_HAS(screen, "0/4");
    CHECK_HAS(screen, "ETA");
    CHECK_HAS(screen, "4 jobs in");      /* the summary */
    CHECK_HAS(screen, "4 succeeded");
    free(screen);
    res_free(&r);
}
