/*
 * End-to-end tests of the runtime behaviour of `casyncio run` (issue 15, item 4), through the
 * built binary: a job is over when its own process exits, interrupts always end the run, an
 * ignored SIGHUP stays ignored, an over-long input is one failed job, closed standard fds,
 * low limits, the interrupt summary, Ctrl-Z, the progress bar and a partial line, and output
 * spooled to disk with bounded memory. Each of these failed before its fix.
 */
#include "cli_run.h"

#include <sys/ioctl.h>

static void sleep_s(double s)
{
    struct timespec ts = {(time_t)s, (long)((s - (double)(time_t)s) * 1e9)};
    nanosleep(&ts, NULL);
}

/* Kills the pids listed one a line in path (background processes a job left running). */
static void kill_listed(const char *path)
{
    char *p = read_file(path);
    for (char *s = p; s && *s;) {
        pid_t pid = (pid_t)strtol(s, &s, 10);
        if (pid > 1) kill(pid, SIGKILL);
        while (*s == '\n' || *s == ' ') s++;
    }
    free(p);
    unlink(path);
}

TEST(job_ends_when_its_process_exits) /* timeout: 30 */
{
    CHECK_OK(prctl(PR_SET_CHILD_SUBREAPER, 1));
    char pids[128], script[512];
    tmp_path(pids, sizeof pids, "daemon");
    /* A daemon (its own session) keeps the job's stdout open for 15 s. */
    snprintf(script, sizeof script, "setsid sleep 15 & echo $! >> %s; echo started", pids);
    struct res r;
    RUN(&r, "run", "sh", "-c", script, "sh", ":::", "a");
    CHECK_EQ(r.status, 0);
    CHECK_STR(r.out, "started\n");
    CHECK_HAS(r.err, "job 1: its process exited");
    CHECK_HAS(r.err, "not waiting for it");
    CHECK(r.secs < 5 * t_slow());
    res_free(&r);
    /* Under --timeout, a job whose process exited at once is not "timed out". */
    snprintf(script, sizeof script, "sleep 15 & echo $! >> %s; echo x", pids);
    RUN(&r, "run", "--timeout", "2", "--summary", "sh", "-c", script, "sh", ":::", "a");
    CHECK_EQ(r.status, 0);
    CHECK_STR(r.out, "x\n");
    CHECK_HAS(r.err, "1 succeeded");
    CHECK(strstr(r.err, "timed out") == NULL);
    CHECK(r.secs < 5 * t_slow());
    res_free(&r);
    kill_listed(pids);
    check_no_orphans();
}

TEST(interrupts_end_the_run_despite_a_daemon) /* timeout: 40 */
{
    static const int second[] = {SIGINT, SIGTERM};
    for (int k = 0; k < 2; k++) {
        CHECK_OK(prctl(PR_SET_CHILD_SUBREAPER, 1));
        char pids[128], script[512];
        tmp_path(pids, sizeof pids, "daemon2");
        /* The job ignores SIGINT and SIGTERM, and a daemon holds its pipes. */
        snprintf(script, sizeof script,
                 "trap '' INT TERM; setsid sleep 20 & echo $! >> %s; echo $$ >> %s; sleep 20",
                 pids, pids);
        int in, out, err;
        double t0 = now_s();
        pid_t pid = start_cli((const char *const[]){"run", "sh", "-c", script, "sh", ":::", "a",
                                                    NULL},
                              &in, &out, &err, -1);
        wait_for_lines(pids, 2);
        CHECK_OK(kill(pid, SIGINT));
        wait_for_text(err, "waiting for 1 running job");
        CHECK_OK(kill(pid, second[k]));
        struct res r;
        finish_cli(pid, in, out, err, NULL, &r, t0, 20);
        CHECK_EQ(r.status, 130);
        CHECK(r.secs < 10 * t_slow());
        res_free(&r);
        kill_listed(pids);
        check_no_orphans();
    }
}

TEST(ignored_sighup_stays_ignored) /* timeout: 30 */
{
    /* As nohup does: SIGHUP ignored, then the runner started. */
    struct sigaction ign = {.sa_handler = SIG_IGN}, old;
    CHECK_OK(sigaction(SIGHUP, &ign, &old));
    int in, out, err;
    double t0 = now_s();
    pid_t pid = start_cli((const char *const[]){"run", "sh", "-c", "sleep 1; echo done-$0", ":::",
                                                "a", NULL},
                          &in, &out, &err, -1);
    CHECK_OK(sigaction(SIGHUP, &old, NULL));
    sleep_s(0.3);
    CHECK_OK(kill(pid, SIGHUP));
    struct res r;
    finish_cli(pid, in, out, err, NULL, &r, t0, 20);
    CHECK_EQ(r.status, 0);
    CHECK_STR(r.out, "done-a\n");
    res_free(&r);
}

TEST(too_long_input_is_a_failed_job)
{
    size_t n = 200000; /* over MAX_ARG_STRLEN (128 KiB) */
    char *input = malloc(n + 16);
    CHECK(input != NULL);
    memset(input, 'b', n);
    strcpy(input + n, "\nsmall\n");
    struct res r;
    RUN_IN(&r, input, "run", "-k", "echo");
    CHECK_EQ(r.status, 1);
    CHECK_STR(r.out, "small\n");
    CHECK_HAS(r.err, "job 1: argument list too long for input 'bbbbbbbbbb");
    CHECK_HAS(r.err, "(200000 bytes)");
    CHECK(r.nerr < 400); /* named, not dumped */
    res_free(&r);
    free(input);
}

TEST(closed_stdout_does_not_write_into_the_joblog)
{
    char log[128];
    tmp_path(log, sizeof log, "joblog");
    int in, out, err;
    double t0 = now_s();
    pid_t pid = start_cli_closing((const char *const[]){"run", "--joblog", log, "sh", "-c",
                                                        "echo OUTPUT-$0", ":::", "a", "b",
                                                        NULL},
                                  &in, &out, &err, -1, 1);
    struct res r;
    finish_cli(pid, in, out, err, NULL, &r, t0, 20);
    CHECK_EQ(r.status, 0);
    char *l = read_file(log);
    CHECK(l != NULL);
    CHECK(strstr(l, "OUTPUT-a") == NULL);
    CHECK(strstr(l, "OUTPUT-b") == NULL);
    CHECK_EQ(count_lines(l), 3);
    free(l);
    res_free(&r);
    unlink(log);
}

TEST(closed_stderr_does_not_abort_the_run)
{
    int in, out, err;
    double t0 = now_s();
    pid_t pid = start_cli_closing((const char *const[]){"run", "-k", "sh", "-c",
                                                        "echo oops >&2; echo out-$0", ":::",
                                                        "a", "b", "c", NULL},
                                  &in, &out, &err, -1, 2);
    struct res r;
    finish_cli(pid, in, out, err, NULL, &r, t0, 20);
    CHECK_EQ(r.status, 0);
    CHECK_STR(r.out, "out-a\nout-b\nout-c\n");
    res_free(&r);
}

TEST(low_fd_limit_lowers_jobs_with_a_warning) /* timeout: 30 */
{
    struct rlimit low;
    CHECK_OK(getrlimit(RLIMIT_NOFILE, &low));
    /* The soft limit alone would be raised: the hard one too (this test's process exits
     * after it, so it need not be restored). */
    low.rlim_cur = low.rlim_max = 64;
    /* valgrind keeps fds of its own at the top of the table and refuses to lower the limit
     * under them (EPERM): nothing to test there. */
    if (setrlimit(RLIMIT_NOFILE, &low) < 0 && errno == EPERM)
        SKIP("RLIMIT_NOFILE cannot be lowered here (valgrind)");
    CHECK_OK(getrlimit(RLIMIT_NOFILE, &low));
    CHECK_EQ(low.rlim_cur, 64);
    const char *args[64] = {"run", "-j", "100", "sleep", ":::"};
    int n = 5;
    while (n < 45) args[n++] = "0.2";
    args[n] = NULL;
    struct res r;
    run_in(&r, NULL, args);
    CHECK_EQ(r.status, 0);
    CHECK_HAS(r.err, "-j 100 lowered to ");
    CHECK_HAS(r.err, "ulimit -n");
    int eff = atoi(strstr(r.err, "lowered to ") + strlen("lowered to "));
    CHECK(eff >= 1 && eff < 20);
    res_free(&r);
}

TEST(interrupt_summary_counts_inputs_never_read) /* timeout: 30 */
{
    CHECK_OK(prctl(PR_SET_CHILD_SUBREAPER, 1));
    char pids[128], script[512];
    tmp_path(pids, sizeof pids, "pids_unread");
    snprintf(script, sizeof script, "echo $$ >> %s; exec sleep 20", pids);
    const char *args[220] = {"run", "-j", "1", "sh", "-c", script, ":::"};
    int n = 7;
    while (n < 207) args[n++] = "x";
    args[n] = NULL;
    int in, out, err;
    double t0 = now_s();
    pid_t pid = start_cli(args, &in, &out, &err, -1);
    wait_for_lines(pids, 1);
    CHECK_OK(kill(pid, SIGINT));
    struct res r;
    finish_cli(pid, in, out, err, NULL, &r, t0, 20);
    CHECK_EQ(r.status, 130);
    CHECK_HAS(r.err, "200 jobs in");
    CHECK_HAS(r.err, "1 stopped");
    CHECK_HAS(r.err, "199 not started");
    res_free(&r);
    unlink(pids);
    check_no_orphans();
}

static char proc_state(pid_t pid)
{
    char path[64], buf[256];
    snprintf(path, sizeof path, "/proc/%d/stat", (int)pid);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return '?';
    ssize_t n = read(fd, buf, sizeof buf - 1);
    close(fd);
    if (n <= 0) return '?';
    buf[n] = 0;
    char *p = strrchr(buf, ')');
    return p && p[1] && p[2] ? p[2] : '?';
}

static off_t file_size(const char *path)
{
    struct stat st;
    return stat(path, &st) == 0 ? st.st_size : -1;
}

TEST(ctrl_z_stops_and_fg_resumes_the_jobs) /* timeout: 40 */
{
    CHECK_OK(prctl(PR_SET_CHILD_SUBREAPER, 1));
    char ticks[128], script[512];
    tmp_path(ticks, sizeof ticks, "ticks");
    snprintf(script, sizeof script, "while :; do echo x >> %s; sleep 0.05; done", ticks);
    int in, out, err;
    double t0 = now_s();
    pid_t pid = start_cli((const char *const[]){"run", "sh", "-c", script, ":::", "a", NULL},
                          &in, &out, &err, -1);
    wait_for_lines(ticks, 2);
    CHECK_OK(kill(pid, SIGTSTP));
    double end = now_s() + 10 * t_slow();
    while (proc_state(pid) != 'T') {
        if (now_s() > end) t_fail(__FILE__, __LINE__, "the runner did not stop");
        sleep_s(0.02);
    }
    sleep_s(0.3); /* a tick in flight may still land */
    off_t size = file_size(ticks);
    sleep_s(0.6);
    CHECK_EQ(file_size(ticks), size); /* the job is stopped too */
    CHECK_OK(kill(pid, SIGCONT));
    end = now_s() + 10 * t_slow();
    while (file_size(ticks) == size) {
        if (now_s() > end) t_fail(__FILE__, __LINE__, "the job did not resume");
        sleep_s(0.02);
    }
    CHECK(proc_state(pid) != 'T');
    CHECK_OK(kill(pid, SIGTERM));
    struct res r;
    finish_cli(pid, in, out, err, NULL, &r, t0, 20);
    CHECK_EQ(r.status, 143);
    res_free(&r);
    unlink(ticks);
    check_no_orphans();
}

TEST(progress_bar_never_erases_a_partial_line) /* timeout: 30 */
{
    int m = posix_openpt(O_RDWR | O_NOCTTY | O_CLOEXEC);
    if (m < 0) SKIP("no pseudo-terminals here");
    CHECK_OK(grantpt(m));
    CHECK_OK(unlockpt(m));
    const char *name = ptsname(m);
    CHECK(name != NULL);
    int s = open(name, O_RDWR | O_NOCTTY | O_CLOEXEC);
    CHECK(s >= 0);
    /* stdout and stderr on the terminal: the job's output lacks a final newline, and the bar
     * is redrawn after it while the other job runs. */
    const char *argv[] = {cli_path(), "run", "-j", "2", "--bar", "sh", "-c",
                          "if [ $0 = a ]; then printf partial-output; else sleep 0.8; fi",
                          ":::", "a", "b", NULL};
    posix_spawn_file_actions_t fa;
    posix_spawn_file_actions_init(&fa);
    posix_spawn_file_actions_addopen(&fa, 0, "/dev/null", O_RDONLY, 0);
    posix_spawn_file_actions_adddup2(&fa, s, 1);
    posix_spawn_file_actions_adddup2(&fa, s, 2);
    pid_t pid;
    CHECK_EQ(posix_spawn(&pid, argv[0], &fa, NULL, (char *const *)argv, environ), 0);
    posix_spawn_file_actions_destroy(&fa);
    close(s);
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
    int st;
    CHECK(waitpid(pid, &st, 0) == pid);
    close(m);
    CHECK(WIFEXITED(st) && WEXITSTATUS(st) == 0);
    const char *at = strstr(screen, "partial-output");
    CHECK(at != NULL);
    /* What follows it is a new line (the terminal writes \r\n), never a bare \r. */
    at += strlen("partial-output");
    if (strncmp(at, "\r\n", 2) != 0 && at[0] != '\n')
        t_fail(__FILE__, __LINE__, "the bar was drawn over the output:\n%s", screen);
    free(screen);
}

TEST(big_output_is_spooled_with_bounded_memory) /* timeout: 120 */
{
    /* 256 MB from one job, to /dev/null: the runner's peak RSS stays small (it held all of
     * it in memory before). */
    const char *argv[] = {cli_path(), "run", "sh", "-c", "head -c 268435456 /dev/zero", ":::",
                          "a", NULL};
    posix_spawn_file_actions_t fa;
    posix_spawn_file_actions_init(&fa);
    posix_spawn_file_actions_addopen(&fa, 0, "/dev/null", O_RDONLY, 0);
    posix_spawn_file_actions_addopen(&fa, 1, "/dev/null", O_WRONLY, 0);
    pid_t pid;
    CHECK_EQ(posix_spawn(&pid, argv[0], &fa, NULL, (char *const *)argv, environ), 0);
    posix_spawn_file_actions_destroy(&fa);
    int st;
    struct rusage ru;
    CHECK(wait4(pid, &st, 0, &ru) == pid);
    CHECK(WIFEXITED(st) && WEXITSTATUS(st) == 0);
    if (t_slow() == 1.0 && ru.ru_maxrss > 64 * 1024)
        t_fail(__FILE__, __LINE__, "peak RSS %ld KB for 256 MB of output", ru.ru_maxrss);
    /* The spooled output comes back whole and in order, tagged, under -k, with stderr. */
    struct res r;
    RUN(&r, "run", "-k", "--tag", "-j", "2", "sh", "-c",
        "seq 1 400000; echo err-$0 >&2", ":::", "a", "b");
    CHECK_EQ(r.status, 0);
    CHECK_EQ(count_lines(r.out), 800000);
    CHECK(strncmp(r.out, "a\t1\na\t2\n", 8) == 0);
    CHECK_HAS(r.out, "a\t400000\nb\t1\n");
    CHECK(r.nout > 14 && strcmp(r.out + r.nout - 9, "b\t400000\n") == 0);
    CHECK_STR(r.err, "a\terr-a\nb\terr-b\n");
    res_free(&r);
}
