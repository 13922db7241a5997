/*
 * What the contract tests (tests/test_api_*.c) share: sentinels for "out parameter untouched",
 * small callbacks, a spy custom loop, the table of child watcher kinds, a subprocess protocol
 * that records what it sees, and stderr capture. Helpers that only one file uses stay static
 * there; these are the ones several files need, defined once in contract_util.c.
 */
#ifndef CA_TEST_CONTRACT_UTIL_H
#define CA_TEST_CONTRACT_UTIL_H

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
#include <stdint.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>

/* Values no call returns: a test presets an out parameter with one to see that a failing call
 * left it untouched. */
#define SENT_LOOP ((ca_loop *)(uintptr_t)0x5a5a)
#define SENT_HANDLE ((ca_handle *)(uintptr_t)0x5a5b)
#define SENT_FUT ((ca_future *)(uintptr_t)0x5a5c)
#define SENT_POL ((ca_policy *)(uintptr_t)0x5a5d)
#define SENT_W ((ca_child_watcher *)(uintptr_t)0x5a5e)
#define SENT_PROC ((ca_process *)(uintptr_t)0x5a5f)
#define SENT_PTR ((void *)(uintptr_t)0x5a60)

/* ----- time, callbacks, loops ------------------------------------------------------------ */

double now_s(void);
void sleep_s(double s);

void noop(void *arg);
void count_cb(void *arg); /* (*(int *)arg)++ */
void fut_noop(ca_future *f, void *arg);
void set_res_cb(void *arg); /* sets the future arg's result to 42 */
void cancel_cb(void *arg);  /* cancels the future arg */

/* A log handler that keeps the last line and its level, and counts lines. */
struct logrec {
    atomic_int n;
    int level;
    char last[256];
};
void rec_log(int level, const char *msg, void *arg);
/* A log handler that only counts lines, in the atomic_int arg (if not NULL). */
void quiet_log(int level, const char *msg, void *arg);

ca_loop *new_epoll(void);
void loop_done(ca_loop *l); /* closes and unrefs */
void run_once(ca_loop *loop);

/* A reader or writer callback that counts its calls. */
struct lvl {
    int fd, n;
};
void lvl_cb(void *arg);

/* A done callback that counts its calls and keeps the future it saw. */
struct dcb {
    int n;
    ca_future *seen;
    int order[4], k;
};
void dcb_fn(ca_future *f, void *arg);

void sockpair(int sv[2]); /* a nonblocking, close-on-exec AF_UNIX stream pair */

/* ----- a spy custom loop: counts op calls ------------------------------------------------ */

struct spy {
    int calls;     /* any op but run_forever/time/destroy */
    int time_calls;
    int destroyed;
    int stops, closes;
    double t;
};
int spy_run(ca_loop *self);
int spy_sched(ca_loop *self, ca_handle *h);
extern const ca_loop_ops spy_ops;  /* every op, each counted in the struct spy of the loop */
extern const ca_loop_ops bare_ops; /* run_forever and destroy only */

/* ----- policy and runner ------------------------------------------------------------------ */

/* A derived policy whose new_event_loop counts its calls in cnt_new. */
extern int cnt_new;
extern const ca_policy_ops cnt_ops;

/* A ca_run main that records what it saw and returns a future with the outcome asked for. */
struct rstate {
    ca_loop *loop;
    ca_loop *running, *current;
    int outcome; /* 0 result, <0 error, 1 cancel, 2 NULL, 3 other loop's future */
    int called;
    ca_loop *other;
};
ca_future *rmain(ca_loop *loop, void *arg);

/* ----- child watchers and subprocesses ---------------------------------------------------- */

/* Every watcher kind: wnew(k) makes one of kind k, wname[k] names it. */
enum { W_THREADED, W_MULTILOOP, W_SAFE, W_FAST, W_PIDFD, W_URING, W_COUNT };
extern const char *const wname[W_COUNT];
int wnew(int k, ca_child_watcher **out);

/* A subprocess protocol (pproto) that records its calls in a struct pstat. */
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
extern const ca_subprocess_protocol pproto;

/* Sends stderr into a pipe until capture_stderr_end, which returns what was written there. */
int capture_stderr_begin(int *saved);
size_t capture_stderr_end(int rfd, int saved, char *buf, size_t n);

#endif
