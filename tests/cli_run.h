/* Helpers shared by the end-to-end tests of `casyncio run` in test_cli_runtime.c and
 * test_cli_ssh.c and test_cli.c: run the built binary with posix_spawn and
 * pipes, collect its output and status, and check that no job outlives it. */
#ifndef CA_TEST_CLI_RUN_H
#define CA_TEST_CLI_RUN_H

#include "harness.h"

#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <sys/prctl.h>
#include <sys/resource.h>
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
    long maxrss_kb;  /* the runner's peak resident set */
};

static inline const char *cli_path(void)
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

static inline double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec / 1e9;
}

static inline void append(char **buf, size_t *len, const char *p, size_t n)
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
static inline pid_t start_cli_closing(const char *const *args, int *in_fd, int *out_fd,
                                      int *err_fd, int stderr_fd, int close_fd)
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
    if (close_fd >= 0) posix_spawn_file_actions_addclose(&fa, close_fd);
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

static inline pid_t start_cli(const char *const *args, int *in_fd, int *out_fd, int *err_fd,
                             int stderr_fd)
{
    return start_cli_closing(args, in_fd, out_fd, err_fd, stderr_fd, -1);
}

/* Feeds input (may be NULL), collects stdout/stderr until both close, reaps the runner. */
static inline void finish_cli(pid_t pid, int in_fd, int out_fd, int err_fd, const char *input,
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
    struct rusage ru;
    while (wait4(pid, &st, 0, &ru) < 0) CHECK_EQ(errno, EINTR);
    r->maxrss_kb = ru.ru_maxrss;
    r->status = WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
    r->secs = now_s() - t0;
}

static inline void run_in_for(struct res *r, const char *input, const char *const *args, double timeout)
{
    int in, out, err;
    double t0 = now_s();
    pid_t pid = start_cli(args, &in, &out, &err, -1);
    finish_cli(pid, in, out, err, input, r, t0, timeout);
}

static inline void run_in(struct res *r, const char *input, const char *const *args)
{
    run_in_for(r, input, args, 30);
}

#define RUN(r, ...) run_in((r), NULL, (const char *const[]){__VA_ARGS__, NULL})
#define RUN_IN(r, input, ...) run_in((r), (input), (const char *const[]){__VA_ARGS__, NULL})

static inline void res_free(struct res *r)
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
static inline void tmp_path(char *buf, size_t n, const char *name)
{
    snprintf(buf, n, "/tmp/ca_test_cli_%d_%s", (int)getpid(), name);
}

static inline char *read_file(const char *path)
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

static inline int count_lines(const char *s)
{
    int n = 0;
    for (; *s; s++) n += *s == '\n';
    return n;
}

/* After the runner exited: no job may still run. Orphans were reparented to us (we are a
 * subreaper); ones that died are reaped here, one still alive after a moment fails. */
static inline void check_no_orphans(void)
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

static inline void wait_for_lines(const char *path, int n)
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
static inline void wait_for_text(int fd, const char *text)
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


#endif
