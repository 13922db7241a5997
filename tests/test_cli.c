/*
 * End-to-end tests of the casyncio command: each test runs the built binary (found next to
 * this test program: build/MODE/tests/test_cli -> build/MODE/casyncio) with posix_spawn and
 * pipes, and checks its output and exit status. Tests that care about jobs outliving the
 * runner make this process a child subreaper, so that an orphaned job would be ours to see.
 */
#include "cli_run.h"
#include "../src/kinds.h"

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
    /* Every --loop and --watcher name, from the library's tables of kinds (src/kinds.h). */
    const char *loops[16], *ws[16];
    size_t nl = 0, nw = 0;
    for (size_t i = 0; i < ca__loop_kind_count && nl < 16; i++)
        loops[nl++] = ca__loop_kinds[i].cli_name;
    for (size_t i = 0; i < ca__watcher_kind_count && nw < 16; i++)
        ws[nw++] = ca__watcher_kinds[i].name;
    CHECK(nl >= 3 && nw >= 6);
    for (size_t i = 0; i < nl; i++) {
        for (size_t k = 0; k < nw; k++) {
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
