/*
 * The test harness: every test runs in its own forked process with a time limit, and after
 * its body returns the harness checks that it left no child process, no zombie, no extra fd
 * and no extra thread behind. LOOP_TEST bodies run once per loop kind (the library's table of
 * loop kinds, src/kinds.h: epoll, poll, io_uring; then the tests' custom loop), WATCHER_TEST
 * bodies once per (loop kind, watcher kind) pair. Tests are registered by
 * tools/gen-test-list.sh, which scans for TEST(, LOOP_TEST( and WATCHER_TEST( at the start of
 * a line.
 *
 * We do not use Criterion (once suggested for this project): its worker arena cannot be set up under
 * ThreadSanitizer ("Could not initialize inheritable arena"), and it reports tests as passing
 * when the sanitizer or valgrind finds a leak in them. This harness fails both.
 */
#ifndef CA_TEST_HARNESS_H
#define CA_TEST_HARNESS_H

#include "casyncio.h"

#include <errno.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define TEST(name) void test_##name(void)
#define LOOP_TEST(name) void looptest_##name(ca_loop *loop)
/* Runs once per (loop kind, watcher kind) pair, both from the library's tables of kinds
 * (src/kinds.h): w is a watcher of that kind, active and delivering to loop, which is this
 * thread's current loop (Safe and Fast: attached to it). The harness closes and releases w
 * after the body. Pairs that cannot work here (a kind the kernel lacks; Safe/Fast on the
 * signal-less custom loop) are skipped. */
#define WATCHER_TEST(name) void watchertest_##name(ca_loop *loop, ca_child_watcher *w)

/* The loop kind the current LOOP_TEST runs on: "epoll", "poll", "io_uring" or "custom". */
extern const char *t_loop_kind;
/* The watcher kind the current WATCHER_TEST runs with ("threaded", ..., "uring"); "none". */
extern const char *t_watcher_kind;
/* Makes another loop of the current kind (for tests that need two loops of it). */
int t_new_loop(ca_loop **out);
/* The custom loop of tests/custom_loop.c (a ca_loop_ops implementation over plain poll(2)). */
int t_custom_loop_new(ca_loop **out);
/* Its variant without call_soon_threadsafe, which uses the core's queue (ca_loop_threadsafe_fd,
 * ca_loop_run_threadsafe), with an is_closed op answering t_custom_loop_host_close. */
int t_custom_loop_new_hostq(ca_loop **out);
void t_custom_loop_host_close(ca_loop *loop);
/* Built with AddressSanitizer or ThreadSanitizer (T_SANITIZED), ThreadSanitizer (T_TSAN). */
#if defined(__has_feature)
#if __has_feature(address_sanitizer) || __has_feature(thread_sanitizer)
#define T_SANITIZED 1
#endif
#if __has_feature(thread_sanitizer)
#define T_TSAN 1
#endif
#endif
#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
#define T_SANITIZED 1
#endif
#if defined(__SANITIZE_THREAD__)
#define T_TSAN 1
#endif

/* The threads of this process now (/proc/self/task), -1 if unknown. */
int t_count_threads(void);
/* A factor for time limits: > 1 under valgrind and the sanitizers (CA_TEST_SLOW). */
double t_slow(void);

void t_fail(const char *file, int line, const char *fmt, ...);
void t_skip(const char *why);

#define CHECK(cond)                                                                           \
    do {                                                                                      \
        if (!(cond)) t_fail(__FILE__, __LINE__, "CHECK(%s) failed", #cond);                   \
    } while (0)

#define CHECK_EQ(a, b)                                                                        \
    do {                                                                                      \
        long long t_a_ = (long long)(a), t_b_ = (long long)(b);                               \
        if (t_a_ != t_b_)                                                                     \
            t_fail(__FILE__, __LINE__, "CHECK_EQ(%s, %s): %lld != %lld", #a, #b, t_a_, t_b_); \
    } while (0)

#define CHECK_NE(a, b)                                                                        \
    do {                                                                                      \
        long long t_a_ = (long long)(a), t_b_ = (long long)(b);                               \
        if (t_a_ == t_b_)                                                                     \
            t_fail(__FILE__, __LINE__, "CHECK_NE(%s, %s): both %lld", #a, #b, t_a_);          \
    } while (0)

/* expr must return 0 (or a non-negative count); prints the error's text otherwise. */
#define CHECK_OK(expr)                                                                        \
    do {                                                                                      \
        int t_r_ = (expr);                                                                    \
        if (t_r_ < 0)                                                                         \
            t_fail(__FILE__, __LINE__, "%s failed: %d (%s)", #expr, t_r_, ca_strerror(t_r_)); \
    } while (0)

/* expr must return exactly the (negative) error err. */
#define CHECK_ERR(expr, err)                                                                  \
    do {                                                                                      \
        int t_r_ = (expr), t_e_ = (err);                                                      \
        if (t_r_ != t_e_)                                                                     \
            t_fail(__FILE__, __LINE__, "%s: got %d (%s), want %d (%s)", #expr, t_r_,          \
                   ca_strerror(t_r_), t_e_, ca_strerror(t_e_));                               \
    } while (0)

#define SKIP(why) t_skip(why)

/* The watcher kind's needs, from the table: attach (Safe, Fast: through the attached loop's
 * SIGCHLD handler), no_pidfd (Uring: keeps the child unreaped until its callback ran),
 * reaps_all (Fast: reaps every child of the process, watched or not). */
bool t_watcher_needs_attach(const char *kind);
bool t_watcher_keeps_zombie(const char *kind);
bool t_watcher_reaps_all(const char *kind);

/* Runs loop until pred(arg) is true, checking between short slices, for at most `timeout`
 * seconds (scaled by t_slow()). Returns pred's final value. */
bool t_run_until(ca_loop *loop, bool (*pred)(void *), void *arg, double timeout);
/* Runs loop for about `seconds`. */
void t_run_for(ca_loop *loop, double seconds);
/* Predicate helper: *(int *)arg != 0. */
bool t_flag_set(void *arg);

/* For a stress loop that has done `done` rounds since `started` (t_now()): true while it should
 * go on, that is while done < max, and done < min or fewer than `seconds` of wall time (not
 * scaled) went by. Under valgrind a fork or a thread switch costs a hundred times more and the
 * races are the sanitizers' to find: there such a loop does what fits in its time. */
bool t_stress_go_on(int done, int min, int max, double started, double seconds);
/* CLOCK_MONOTONIC, in seconds. */
double t_now(void);

/* Ends a child that a test made with fork() with `code`, by exec'ing sh: under valgrind a
 * forked child that calls _exit() is leak-checked and exits 99 for the memory its parent
 * still held, so forked children in tests must leave through here. */
void t_child_exit(int code);

/* Turns off the harness's leftover checks for the current test (fds, threads, children),
 * for tests whose subject makes them meaningless; say why in the test. */
void t_no_leftover_checks(void);

#endif
