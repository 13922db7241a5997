/* The Uring child watcher's own promises (the shared watcher behaviour is tested for every
 * watcher in test_watcher.c, test_process.c and test_contract.c): no fd per child, thousands of
 * children under `ulimit -n 1024`, thousands exiting at once delivered exactly once, the child
 * kept unreaped until its callback ran, a foreign reap reported as 255 with a warning. */
#include "harness.h"

#include <dirent.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <spawn.h>
#include <stdatomic.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <sys/wait.h>

extern char **environ;

/* watcher_uring.c's counters and table size (internal, for tests). */
void ca__uring_watcher_stats(unsigned long *polls, unsigned long *waitids);
void ca__uring_set_table_size(long n);

typedef struct path_count {
    unsigned long polls, waitids;
} path_count;

/* pidfd_open works here (not under valgrind, where the watcher is not available anyway)? */
static bool have_pidfd(void)
{
    int fd = (int)syscall(SYS_pidfd_open, getpid(), 0);
    if (fd < 0) return false;
    close(fd);
    return true;
}

/* The requests started on each path since *since (which is then updated). */
static path_count paths_since(path_count *since)
{
    path_count now, d;
    ca__uring_watcher_stats(&now.polls, &now.waitids);
    d.polls = now.polls - since->polls;
    d.waitids = now.waitids - since->waitids;
    *since = now;
    return d;
}

#define ARGV(...) ((const char *const[]){__VA_ARGS__, NULL})

/* A Uring watcher delivering to loop (made current here); SKIP where the kernel lacks it. */
static ca_child_watcher *uring_or_skip(ca_loop *loop)
{
    ca_child_watcher *w = NULL;
    int r = ca_uring_child_watcher_new(&w);
    if (r == -ENOSYS) SKIP("io_uring WAITID is unavailable (Linux < 6.7, seccomp, valgrind)");
    CHECK_OK(r);
    CHECK_OK(ca_set_event_loop(loop));
    CHECK(ca_child_watcher_is_active(w));
    return w;
}

static void done(ca_child_watcher *w)
{
    CHECK_OK(ca_child_watcher_close(w));
    ca_child_watcher_unref(w);
    CHECK_OK(ca_set_event_loop(NULL));
}

static int count_fds(void)
{
    DIR *d = opendir("/proc/self/fd");
    CHECK(d != NULL);
    int n = 0;
    struct dirent *e;
    while ((e = readdir(d)) != NULL)
        if (e->d_name[0] != '.') n++;
    closedir(d);
    return n - 1; /* the directory's own fd */
}

/* A child that exits 0 once every write end of the pipe whose read end is rfd is closed. */
static pid_t spawn_cat(int rfd)
{
    posix_spawn_file_actions_t fa;
    posix_spawn_file_actions_init(&fa);
    posix_spawn_file_actions_adddup2(&fa, rfd, 0);
    posix_spawn_file_actions_addopen(&fa, 1, "/dev/null", O_WRONLY, 0);
    char *argv[] = {"cat", NULL};
    pid_t pid = -1;
    int e = posix_spawn(&pid, "/bin/cat", &fa, NULL, argv, environ);
    posix_spawn_file_actions_destroy(&fa);
    if (e) t_fail(__FILE__, __LINE__, "posix_spawn: %s", strerror(e));
    return pid;
}

static pid_t spawn_sh(const char *cmd)
{
    char *argv[] = {"sh", "-c", (char *)cmd, NULL};
    pid_t pid = -1;
    int e = posix_spawn(&pid, "/bin/sh", NULL, NULL, argv, environ);
    if (e) t_fail(__FILE__, __LINE__, "posix_spawn: %s", strerror(e));
    return pid;
}

typedef struct rec {
    atomic_int calls, rc;
    pid_t pid;
    bool zombie_at_call; /* the child was still unreaped when the callback ran */
} rec;

static void on_exit_rec(pid_t pid, int rc, void *arg)
{
    rec *r = arg;
    siginfo_t si;
    memset(&si, 0, sizeof si);
    r->zombie_at_call = waitid(P_PID, (id_t)pid, &si, WEXITED | WNOHANG | WNOWAIT) == 0 &&
                        si.si_pid == pid;
    r->pid = pid;
    atomic_store(&r->rc, rc);
    atomic_fetch_add(&r->calls, 1);
}

typedef struct recs {
    rec *r;
    int n;
} recs;

static bool all_called(void *arg)
{
    recs *rs = arg;
    for (int i = 0; i < rs->n; i++)
        if (atomic_load(&rs->r[i].calls) == 0) return false;
    return true;
}

/* Once all n have exited: each was delivered once, with returncode 0, before its reap; no
 * child is left. */
static void expect_all_exit0(ca_loop *loop, rec *r, int n)
{
    recs rs = {r, n};
    CHECK(t_run_until(loop, all_called, &rs, 20));
    t_run_for(loop, 0.05);
    for (int i = 0; i < n; i++) {
        CHECK_EQ(atomic_load(&r[i].calls), 1);
        CHECK_EQ(atomic_load(&r[i].rc), 0);
        CHECK(r[i].zombie_at_call);
    }
    CHECK(waitpid(-1, NULL, WNOHANG) < 0 && errno == ECHILD);
}

/* n idle children watched; the open fds grow by the ring's one fd at most, never per child;
 * then all exit at once and each is delivered exactly once with its status. */
static void watch_many(ca_loop *loop, int n, double timeout)
{
    ca_child_watcher *w = uring_or_skip(loop);
    int p[2];
    CHECK_EQ(pipe2(p, O_CLOEXEC), 0);
    int fds0 = count_fds();
    rec *r = calloc((size_t)n, sizeof *r);
    CHECK(r != NULL);
    for (int i = 0; i < n; i++) {
        pid_t pid = spawn_cat(p[0]);
        CHECK_OK(ca_child_watcher_add_child_handler(w, pid, on_exit_rec, &r[i]));
    }
    t_run_for(loop, 0.01);
    int grown = count_fds() - fds0;
    if (grown > 1)
        t_fail(__FILE__, __LINE__, "%d more fds for %d watched children (want at most 1)", grown,
               n);
    close(p[0]);
    close(p[1]); /* every cat sees EOF at once */
    recs rs = {r, n};
    bool ok = t_run_until(loop, all_called, &rs, timeout);
    t_run_for(loop, 0.05);
    int missing = 0, twice = 0, bad = 0;
    for (int i = 0; i < n; i++) {
        int c = atomic_load(&r[i].calls);
        missing += c == 0;
        twice += c > 1;
        bad += c == 1 && (atomic_load(&r[i].rc) != 0 || !r[i].zombie_at_call);
    }
    if (!ok || missing || twice || bad)
        t_fail(__FILE__, __LINE__, "%d of %d: %d missing, %d twice, %d wrong (rc, or reaped "
               "before the callback)", n, n, missing, twice, bad);
    /* Every child was reaped after its callback: none is left. */
    CHECK(waitpid(-1, NULL, WNOHANG) < 0 && errno == ECHILD);
    done(w);
    free(r);
}

LOOP_TEST(uring_no_fd_per_child) /* timeout: 60 */
{
    watch_many(loop, t_slow() > 1 ? 100 : 500, 30);
}

/* 2,000 children exiting at the same moment: the ring's CQ has 4,096 entries, so this also
 * runs through many reader calls; CASYNCIO's overflow path is the kernel's (NODROP). */
TEST(uring_2000_exit_at_once) /* timeout: 120 */
{
    ca_loop *loop = NULL;
    CHECK_OK(ca_selector_loop_new(&loop));
    watch_many(loop, 2000, 60);
    ca_loop_close(loop);
    ca_loop_unref(loop);
}

/* The target: with `ulimit -n 1024`, 4,000 idle children watched, and spawning (a
 * subprocess through the policy's Uring watcher, which holds no pidfd) still works. The harness
 * runs each test in a process of its own, so the limit ends with the test. */
TEST(uring_4000_children_under_ulimit_1024) /* timeout: 180 */
{
    struct rlimit rl;
    CHECK_EQ(getrlimit(RLIMIT_NOFILE, &rl), 0);
    rl.rlim_cur = rl.rlim_max < 1024 ? rl.rlim_max : 1024;
    CHECK_EQ(setrlimit(RLIMIT_NOFILE, &rl), 0);
    enum { N = 4000 };
    ca_loop *loop = NULL;
    CHECK_OK(ca_selector_loop_new(&loop));
    ca_child_watcher *w = uring_or_skip(loop);
    CHECK_OK(ca_set_child_watcher(w)); /* the policy's: subprocesses use it */
    int p[2];
    CHECK_EQ(pipe2(p, O_CLOEXEC), 0);
    rec *r = calloc(N, sizeof *r);
    CHECK(r != NULL);
    int fds0 = count_fds();
    path_count pc = {0};
    paths_since(&pc);
    for (int i = 0; i < N; i++) {
        pid_t pid = spawn_cat(p[0]);
        CHECK_OK(ca_child_watcher_add_child_handler(w, pid, on_exit_rec, &r[i]));
    }
    CHECK(count_fds() - fds0 <= 1);
    /* Both paths: the fixed-file table holds at most RLIMIT_NOFILE (1,024) pidfds, the rest
     * are WAITIDs (unless pidfd_open is missing: then all are). */
    path_count d = paths_since(&pc);
    CHECK_EQ(d.polls + d.waitids, (unsigned long)N);
    CHECK(d.polls <= 1024);
    CHECK(d.waitids >= N - 1024);
    if (have_pidfd()) CHECK(d.polls >= 1000);
    /* A subprocess with a pipe, while the 4,000 are watched. */
    ca_process *proc = NULL;
    ca_subprocess_options o = {.argv = ARGV("sh", "-c", "echo hi; exit 3"),
                               .stdout_mode = CA_PIPE};
    CHECK_OK(ca_loop_subprocess_exec(loop, &o, NULL, NULL, &proc));
    ca_future *f = NULL;
    CHECK_OK(ca_process_wait(proc, &f));
    CHECK_OK(ca_loop_run_until_complete(loop, f));
    void *res;
    CHECK_OK(ca_future_result(f, &res));
    CHECK_EQ((int)(intptr_t)res, 3);
    ca_future_unref(f);
    ca_process_unref(proc);
    close(p[0]);
    close(p[1]);
    recs rs = {r, N};
    CHECK(t_run_until(loop, all_called, &rs, 120));
    t_run_for(loop, 0.05);
    for (int i = 0; i < N; i++) CHECK_EQ(atomic_load(&r[i].calls), 1);
    CHECK(waitpid(-1, NULL, WNOHANG) < 0 && errno == ECHILD);
    CHECK_OK(ca_set_child_watcher(NULL)); /* closes it */
    ca_child_watcher_unref(w);
    CHECK_OK(ca_set_event_loop(NULL));
    ca_loop_close(loop);
    ca_loop_unref(loop);
    free(r);
}

/* ----- foreign reaps, removes ------------------------------------------------------------- */

static pthread_mutex_t log_mu = PTHREAD_MUTEX_INITIALIZER;
static char log_buf[4096];

static void log_capture(int level, const char *msg, void *arg)
{
    pthread_mutex_lock(&log_mu);
    size_t len = strlen(log_buf);
    snprintf(log_buf + len, sizeof log_buf - len, "%s\n", msg);
    pthread_mutex_unlock(&log_mu);
}

/* Somebody else reaps the watched child after it exited, before the loop ran (so before the
 * completion could be read): the callback still comes exactly once, with 255 and the "Unknown
 * child process" warning; on the pidfd path (the POLL_ADD fires on the exit all the same, the
 * status is gone) and on the WAITID one (a ring without a table). */
static void foreign_reaps(ca_loop *loop, long table)
{
    ca__uring_set_table_size(table);
    ca_child_watcher *w = uring_or_skip(loop);
    ca_set_log_handler(log_capture, NULL);
    path_count pc = {0};
    paths_since(&pc);
    for (int i = 0; i < 10; i++) {
        log_buf[0] = 0;
        rec r = {0};
        pid_t pid = spawn_sh("exit 6");
        CHECK_OK(ca_child_watcher_add_child_handler(w, pid, on_exit_rec, &r));
        int st;
        CHECK_EQ(waitpid(pid, &st, 0), pid); /* the foreign reap */
        CHECK(WIFEXITED(st) && WEXITSTATUS(st) == 6);
        CHECK(t_run_until(loop, t_flag_set, &r.calls, 5));
        t_run_for(loop, 0.01);
        CHECK_EQ(atomic_load(&r.calls), 1);
        CHECK_EQ(atomic_load(&r.rc), 255);
        CHECK(strstr(log_buf, "Unknown child process") != NULL);
    }
    path_count d = paths_since(&pc);
    CHECK_EQ(d.polls, table == 0 || !have_pidfd() ? 0ul : 10ul);
    ca_set_log_handler(NULL, NULL);
    done(w);
    ca__uring_set_table_size(-1);
}

LOOP_TEST(uring_foreign_reap_after_exit)
{
    foreign_reaps(loop, -1); /* the pidfd path */
    foreign_reaps(loop, 0);  /* WAITID */
}

/* Removed while the exit's completion may already be in the ring: never called, and the child
 * is left to the remover (still a zombie: Uring reaps only after a callback). */
LOOP_TEST(uring_remove_after_exit_leaves_zombie)
{
    ca_child_watcher *w = uring_or_skip(loop);
    for (int i = 0; i < 20; i++) {
        rec r = {0};
        pid_t pid = spawn_sh("exit 2");
        CHECK_OK(ca_child_watcher_add_child_handler(w, pid, on_exit_rec, &r));
        siginfo_t si;
        memset(&si, 0, sizeof si);
        CHECK_EQ(waitid(P_PID, (id_t)pid, &si, WEXITED | WNOWAIT), 0);
        if (i % 2) t_run_for(loop, 0.001); /* sometimes the completion was read, not called */
        int removed = ca_child_watcher_remove_child_handler(w, pid);
        t_run_for(loop, 0.02);
        if (removed == 1) {
            CHECK_EQ(atomic_load(&r.calls), 0);
            int st;
            CHECK_EQ(waitpid(pid, &st, 0), pid);
            CHECK(WIFEXITED(st) && WEXITSTATUS(st) == 2);
        } else {
            CHECK_EQ(removed, 0); /* delivered already: it was called, and reaped */
            CHECK_EQ(atomic_load(&r.calls), 1);
            CHECK_EQ(atomic_load(&r.rc), 2);
        }
    }
    done(w);
}

/* Removes from another thread race with the exits being delivered on the loop: each child is
 * either delivered once or removed (and then never called). */
typedef struct racer {
    ca_child_watcher *w;
    pid_t *pids;
    int n;
    atomic_int removed;
    atomic_bool go;
} racer;

static void *racer_main(void *arg)
{
    racer *rc = arg;
    while (!atomic_load(&rc->go)) {
    }
    for (int i = 0; i < rc->n; i += 2)
        if (ca_child_watcher_remove_child_handler(rc->w, rc->pids[i]) == 1)
            atomic_fetch_add(&rc->removed, 1);
    return NULL;
}

/* Every child either delivered or removed. */
struct settle {
    rec *r;
    int n;
    atomic_int *removed;
};

static bool settled(void *arg)
{
    struct settle *s = arg;
    int called = 0;
    for (int i = 0; i < s->n; i++) called += atomic_load(&s->r[i].calls) > 0;
    return called + atomic_load(s->removed) >= s->n;
}

LOOP_TEST(uring_remove_from_other_thread_races_exit) /* timeout: 60 */
{
    enum { N = 200 };
    ca_child_watcher *w = uring_or_skip(loop);
    int p[2];
    CHECK_EQ(pipe2(p, O_CLOEXEC), 0);
    static rec r[N];
    static pid_t pids[N];
    memset(r, 0, sizeof r);
    for (int i = 0; i < N; i++) {
        pids[i] = spawn_cat(p[0]);
        CHECK_OK(ca_child_watcher_add_child_handler(w, pids[i], on_exit_rec, &r[i]));
    }
    racer rc = {.w = w, .pids = pids, .n = N};
    pthread_t t;
    CHECK_EQ(pthread_create(&t, NULL, racer_main, &rc), 0);
    close(p[0]);
    close(p[1]);
    atomic_store(&rc.go, true);
    t_run_for(loop, 0.05);
    pthread_join(t, NULL);
    struct settle se = {r, N, &rc.removed};
    CHECK(t_run_until(loop, settled, &se, 20));
    t_run_for(loop, 0.05);
    int called = 0;
    for (int i = 0; i < N; i++) {
        int c = atomic_load(&r[i].calls);
        CHECK(c <= 1);
        called += c;
        if (c == 0) {
            /* Removed: the child is ours to reap (odd ones were never removed: delivered). */
            CHECK(i % 2 == 0);
            int st;
            CHECK_EQ(waitpid(pids[i], &st, 0), pids[i]);
        }
    }
    CHECK_EQ(called + atomic_load(&rc.removed), N);
    done(w);
}

/* ----- the thread that submitted a request exits -------------------------------------------- */

typedef struct adder_job {
    ca_child_watcher *w;
    ca_loop *loop;
    pid_t *pids;
    rec *r;
    int n;
} adder_job;

static void *adder_main(void *arg)
{
    adder_job *j = arg;
    for (int i = 0; i < j->n; i++)
        CHECK_OK(ca_child_watcher_add_child_handler_on(j->w, j->loop, j->pids[i], on_exit_rec,
                                                       &j->r[i]));
    return NULL; /* and the thread exits while its requests wait */
}

/* Handlers added by a thread that exits before the children do (a loop that is not running
 * takes adds from any thread; a host's loop, like Python's, always does): the kernel does not
 * cancel a WAITID whose submitter exited, it ends it with -ECHILD from a kernel worker when the
 * child exits. The exits must still come with their status, after the callback, reaped. */
LOOP_TEST(uring_adder_thread_exits_first) /* timeout: 60 */
{
    enum { N = 20 };
    ca_child_watcher *w = uring_or_skip(loop);
    ca_set_log_handler(log_capture, NULL);
    log_buf[0] = 0;
    int p[2];
    CHECK_EQ(pipe2(p, O_CLOEXEC), 0);
    pid_t pids[N];
    rec r[N];
    memset(r, 0, sizeof r);
    for (int i = 0; i < N; i++) pids[i] = spawn_cat(p[0]);
    adder_job j = {.w = w, .loop = loop, .pids = pids, .r = r, .n = N};
    pthread_t t;
    CHECK_EQ(pthread_create(&t, NULL, adder_main, &j), 0);
    CHECK_EQ(pthread_join(t, NULL), 0);
    close(p[0]);
    close(p[1]);
    expect_all_exit0(loop, r, N);
    CHECK(strstr(log_buf, "Unknown child process") == NULL);
    ca_set_log_handler(NULL, NULL);
    done(w);
}

/* ----- a subprocess whose Uring watcher let go of it -------------------------------------- */

static bool future_done(void *arg) { return ca_future_done(arg); }

/* The policy's Uring watcher is closed while a subprocess runs (a replacement closes it): the
 * process, which holds no pidfd, learns the exit on its own. If somebody else (a Fast watcher's
 * waitpid(-1)) reaped the child first, the wait still completes: returncode 255 and a warning,
 * as for any foreign reap, never a wait that hangs until the loop closes. */
TEST(uring_process_dropped_then_reaped_by_somebody_else) /* timeout: 60 */
{
    ca_loop *loop = NULL;
    CHECK_OK(ca_selector_loop_new(&loop));
    ca_child_watcher *w = uring_or_skip(loop);
    CHECK_OK(ca_set_child_watcher(w));
    ca_set_log_handler(log_capture, NULL);
    log_buf[0] = 0;
    ca_process *proc = NULL;
    ca_subprocess_options o = {.argv = ARGV("sh", "-c", "exit 3")};
    CHECK_OK(ca_loop_subprocess_exec(loop, &o, NULL, NULL, &proc));
    pid_t pid = ca_process_pid(proc);
    CHECK_OK(ca_child_watcher_close(w)); /* the drop: the process watches on its own */
    int st;
    CHECK_EQ(waitpid(pid, &st, 0), pid); /* the foreign reap, before the loop runs */
    ca_future *f = NULL;
    CHECK_OK(ca_process_wait(proc, &f));
    CHECK(t_run_until(loop, future_done, f, 10));
    void *res = NULL;
    CHECK_OK(ca_future_result(f, &res));
    CHECK_EQ((int)(intptr_t)res, 255);
    CHECK(strstr(log_buf, "reaped by somebody else") != NULL);
    ca_future_unref(f);
    ca_process_unref(proc);
    ca_set_log_handler(NULL, NULL);
    CHECK_OK(ca_set_child_watcher(NULL));
    ca_child_watcher_unref(w);
    CHECK_OK(ca_set_event_loop(NULL));
    ca_loop_close(loop);
    ca_loop_unref(loop);
}

/* ----- the two paths: fixed pidfds (POLL_ADD) and WAITID ------------------------------------- */


/* n cats watched on w, then all exit: each delivered once, rc 0, before its reap. */
static void cats_deliver(ca_loop *loop, ca_child_watcher *w, int n)
{
    int p[2];
    CHECK_EQ(pipe2(p, O_CLOEXEC), 0);
    rec *r = calloc((size_t)n, sizeof *r);
    CHECK(r != NULL);
    for (int i = 0; i < n; i++)
        CHECK_OK(ca_child_watcher_add_child_handler(w, spawn_cat(p[0]), on_exit_rec, &r[i]));
    close(p[0]);
    close(p[1]);
    expect_all_exit0(loop, r, n);
    free(r);
}

/* Rounds of n cats watched through a new watcher whose ring asks for a table of `table` slots:
 * each delivered alike (status, callback before the reap), polls of them with a POLL_ADD and
 * the others with a WAITID, the open fds grown by the ring's own at most (the first time). */
static void deliver_with_table(ca_loop *loop, long table, int n, unsigned long polls, int rounds)
{
    ca__uring_set_table_size(table);
    ca_child_watcher *w = uring_or_skip(loop);
    path_count pc = {0};
    paths_since(&pc);
    for (int round = 0; round < rounds; round++) {
        int fds0 = count_fds();
        cats_deliver(loop, w, n);
        path_count d = paths_since(&pc);
        CHECK_EQ(d.polls, polls);
        CHECK_EQ(d.waitids, (unsigned long)n - polls);
        CHECK(count_fds() - fds0 <= 1);
    }
    done(w);
    ca__uring_set_table_size(-1);
}

/* With a table to spare, every child is watched through its pidfd in the ring's fixed-file
 * table (a POLL_ADD), none with a WAITID; and the slots come back: the next rounds of children
 * use them again. */
LOOP_TEST(uring_children_use_fixed_pidfds) /* timeout: 60 */
{
    if (!have_pidfd()) SKIP("no pidfd_open");
    deliver_with_table(loop, 16, 16, 16, 3);
}

/* A full table: the children beyond it get a WAITID each, and all are delivered alike. */
LOOP_TEST(uring_table_full_falls_back_to_waitid) /* timeout: 60 */
{
    if (!have_pidfd()) SKIP("no pidfd_open");
    deliver_with_table(loop, 8, 20, 8, 1);
}

/* No table at all (size 0, as when its registration is refused): every child gets a WAITID. */
LOOP_TEST(uring_no_table_all_waitid)
{
    deliver_with_table(loop, 0, 10, 0, 1);
}

/* Removed (its POLL_ADD cancelled): the slot comes back once the cancel completed. */
LOOP_TEST(uring_remove_frees_fixed_slot) /* timeout: 60 */
{
    if (!have_pidfd()) SKIP("no pidfd_open");
    ca__uring_set_table_size(4);
    ca_child_watcher *w = uring_or_skip(loop);
    path_count pc = {0};
    paths_since(&pc);
    int p[2];
    CHECK_EQ(pipe2(p, O_CLOEXEC), 0);
    pid_t pids[4];
    rec r[4];
    memset(r, 0, sizeof r);
    for (int i = 0; i < 4; i++) {
        pids[i] = spawn_cat(p[0]);
        CHECK_OK(ca_child_watcher_add_child_handler(w, pids[i], on_exit_rec, &r[i]));
    }
    for (int i = 0; i < 4; i++) CHECK_EQ(ca_child_watcher_remove_child_handler(w, pids[i]), 1);
    t_run_for(loop, 0.05); /* the cancels complete */
    path_count d = paths_since(&pc);
    CHECK_EQ(d.polls, 4ul);
    close(p[0]);
    close(p[1]);
    for (int i = 0; i < 4; i++) {
        int st;
        CHECK_EQ(waitpid(pids[i], &st, 0), pids[i]); /* removed: ours to reap */
    }
    t_run_for(loop, 0.02);
    for (int i = 0; i < 4; i++) CHECK_EQ(atomic_load(&r[i].calls), 0);
    cats_deliver(loop, w, 4); /* the same 4 slots */
    d = paths_since(&pc);
    CHECK_EQ(d.polls, 4ul);
    CHECK_EQ(d.waitids, 0ul);
    done(w);
    ca__uring_set_table_size(-1);
}

/* A pid that is not our child (our parent, which outlives the test): not watched through a
 * pidfd (whose POLL_ADD would wait for that process's exit), but with a WAITID, which ends at
 * once: 255, as before. */
LOOP_TEST(uring_not_our_child_reported_at_once)
{
    ca_child_watcher *w = uring_or_skip(loop);
    ca_set_log_handler(log_capture, NULL);
    log_buf[0] = 0;
    path_count pc = {0};
    paths_since(&pc);
    rec r = {0};
    CHECK_OK(ca_child_watcher_add_child_handler(w, getppid(), on_exit_rec, &r));
    CHECK(t_run_until(loop, t_flag_set, &r.calls, 5));
    CHECK_EQ(atomic_load(&r.rc), 255);
    path_count d = paths_since(&pc);
    CHECK_EQ(d.polls, 0ul);
    CHECK_EQ(d.waitids, 1ul);
    ca_set_log_handler(NULL, NULL);
    done(w);
}
