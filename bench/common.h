/*
 * Shared helpers for the benchmark programs (docs/benchmarks.md describes the suite).
 *
 * Every program takes the same command line:
 *     PROG WORKLOAD PARAM [N] [VARIANT]
 * and prints one line per measurement:
 *     name=PEER bench=WORKLOAD param=PARAM value=NUMBER|NA unit=UNIT
 * N = 0 or "-" means the workload's default size.  A program exits 0 when it measured
 * (or printed value=NA for a feature it does not have), and non-zero only when something
 * broke.  Header-only so that each peer builds from one .c file.
 */
#ifndef BENCH_COMMON_H
#define BENCH_COMMON_H

#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <spawn.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

extern char **environ;

/* The workloads and their default sizes. */
#define B_SPAWN_N 2000     /* spawn_reap: children                        */
#define B_SCALE_N 500      /* reap_scaling: measured spawn+reap           */
#define B_MEM_N 1000       /* mem: concurrent `sleep 5` children          */
#define B_SOON_N 1000000   /* burst, chain: callbacks                     */
#define B_TIMER_N 1000000  /* timers                                      */
#define B_PING_N 200000    /* pingpong, pingpong_sock: round trips        */
#define B_TS_N 200000      /* threadsafe: cross-thread calls              */
#define B_STREAM_MIB 256   /* stream: MiB in all, spread over connections */
#define B_POLICY_N 10000000 /* policy: get-event-loop calls               */
#define B_STREAM_CHUNK 65536

typedef struct bench_args {
    const char *prog_name;  /* "libuv", ... */
    const char *workload;
    const char *param_s;
    long param;
    long n;                 /* 0: default */
    const char *variant;    /* "" when absent */
} bench_args;

static inline double b_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static inline void b_die(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fputs("bench: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
    exit(2);
}

static inline void b_report(const char *name, const bench_args *a, double value, const char *unit)
{
    printf("name=%s bench=%s param=%s value=%.6g unit=%s\n", name, a->workload, a->param_s,
           value, unit);
    fflush(stdout);
}

/* CPU time (user + system) of this process, every thread included, in seconds. On a shared
 * machine it is far less disturbed by other processes than the wall clock: reap_scaling also
 * reports it per spawn+reap (bench=reap_scaling_cpu), the parent's side only (clone, the loop,
 * the watcher, the reap), which is where the watchers differ. */
static inline double b_cpu_s(void)
{
    struct rusage ru;
    if (getrusage(RUSAGE_SELF, &ru) != 0)
        return 0;
    return (double)(ru.ru_utime.tv_sec + ru.ru_stime.tv_sec) +
           (double)(ru.ru_utime.tv_usec + ru.ru_stime.tv_usec) * 1e-6;
}

static inline void b_report_cpu(const char *name, const bench_args *a, double us)
{
    printf("name=%s bench=%s_cpu param=%s value=%.6g unit=us\n", name, a->workload, a->param_s,
           us);
    fflush(stdout);
}

static inline void b_report_na(const char *name, const bench_args *a, const char *unit,
                               const char *why)
{
    printf("name=%s bench=%s param=%s value=NA unit=%s\n", name, a->workload, a->param_s, unit);
    if (why)
        fprintf(stderr, "bench: %s %s %s: NA (%s)\n", name, a->workload, a->param_s, why);
    fflush(stdout);
}

static inline void b_parse(bench_args *a, int argc, char **argv, const char *prog_name)
{
    if (argc < 3) {
        fprintf(stderr, "usage: %s WORKLOAD PARAM [N] [VARIANT]\n", argv[0]);
        exit(2);
    }
    a->prog_name = prog_name;
    a->workload = argv[1];
    a->param_s = argv[2];
    a->param = strtol(argv[2], NULL, 10);
    a->n = (argc > 3 && strcmp(argv[3], "-") != 0) ? strtol(argv[3], NULL, 10) : 0;
    a->variant = argc > 4 ? argv[4] : "";
}

static inline long b_n(const bench_args *a, long dflt) { return a->n > 0 ? a->n : dflt; }

/* Many watched children need many fds (pidfds, pipes): lift the soft limit. */
static inline void b_raise_limits(void)
{
    struct rlimit r;
    if (getrlimit(RLIMIT_NOFILE, &r) == 0 && r.rlim_cur < r.rlim_max) {
        r.rlim_cur = r.rlim_max > 1048576 ? 1048576 : r.rlim_max;
        setrlimit(RLIMIT_NOFILE, &r);
    }
}

/* Resident set size in bytes (from /proc/self/statm).  It also remembers the virtual size
 * at its first and its latest call, for b_report_vsz (the mem workload calls it twice). */
static long b_vsz_first = -1, b_vsz_last;
static inline long b_rss_bytes(void)
{
    FILE *f = fopen("/proc/self/statm", "r");
    long size = 0, res = 0;
    if (!f)
        return -1;
    if (fscanf(f, "%ld %ld", &size, &res) != 2)
        res = -1;
    fclose(f);
    long pg = sysconf(_SC_PAGESIZE);
    if (b_vsz_first < 0)
        b_vsz_first = size * pg;
    b_vsz_last = size * pg;
    return res < 0 ? -1 : res * pg;
}

/* mem_virt: virtual memory per child between the two b_rss_bytes calls (thread stacks are
 * reserved whole: this is what a Threaded watcher's stacks cost in address space) */
static inline void b_report_vsz(const char *name, const bench_args *a, long n)
{
    printf("name=%s bench=mem_virt param=%s value=%.6g unit=KB/child\n", name, a->param_s,
           (double)(b_vsz_last - b_vsz_first) / (double)n / 1024.0);
    fflush(stdout);
}

/* Deterministic pseudo-random numbers (xorshift64*), the same in every program. */
static inline uint64_t b_rand(uint64_t *s)
{
    uint64_t x = *s;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    *s = x;
    return x * 2685821657736338717ULL;
}

/* The timer workload's delay for timer i, in microseconds: 0 .. 100,000. */
static inline long b_timer_delay_us(uint64_t *s) { return (long)(b_rand(s) % 100001); }

static char *const b_true_argv[] = {"/bin/true", NULL};
static char *const b_sleep600_argv[] = {"/bin/sleep", "600", NULL};
static char *const b_sleep5_argv[] = {"/bin/sleep", "5", NULL};

/* posix_spawn with everything inherited; the floor's (and libev/sd-event's) spawn. */
static inline pid_t b_spawn(char *const argv[])
{
    pid_t pid;
    int e = posix_spawn(&pid, argv[0], NULL, NULL, argv, environ);
    if (e != 0)
        b_die("posix_spawn %s: %s", argv[0], strerror(e));
    return pid;
}

/* A socketpair with both ends non-blocking. */
static inline void b_socketpair(int sv[2])
{
    if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0, sv) != 0)
        b_die("socketpair: %s", strerror(errno));
}

static inline int b_is(const bench_args *a, const char *w) { return strcmp(a->workload, w) == 0; }

#endif
