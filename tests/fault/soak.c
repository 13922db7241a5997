/*
 * The multi-thread soak (docs/testing.md, tools/soak.sh): policies and child watchers are
 * replaced from other threads while threads spawn and add and remove child handlers. This is
 * what found issue 16's use-after-frees (a watcher or a delivery loop used through a borrowed
 * pointer while another thread replaced its owner); it is meant for ASan and TSan builds.
 *
 * Threads, for SOAK_SECONDS (default 60):
 * (SOAK_SPAWNERS, SOAK_ADDERS and SOAK_WATCHERS narrow it down, to tell one bug from another;
 * SOAK_LOG_MATCH=text prints the library's log lines that contain text.)
 *   spawners (2)   each with its own loop (epoll, poll, io_uring), set as its current loop:
 *                  ca_loop_subprocess_exec of /bin/true or `sh -c 'exit 7'` (sometimes with a
 *                  stdout pipe, sometimes from a callback on the running loop), then the wait
 *                  future. Every spawn that succeeds must complete with its status (255 is
 *                  accepted only once a Fast watcher was installed, since Fast reaps every
 *                  child, or when a watcher or policy was replaced during the spawn or while
 *                  the child ran: a closed Threaded watcher's thread may reap it, as
 *                  docs/subprocess.md says); errors must be -ENOTCONN (the watcher of the
 *                  moment is not active, e.g. Safe/Fast just replaced), -EAGAIN, or -EBADF
 *                  when the watcher thread closed a replaced Safe/Fast watcher meanwhile.
 *   watcher thread makes a watcher of a random kind (Threaded, MultiLoop, Safe, Fast, Pidfd,
 *                  and the io_uring one when it is linked in), attaches Safe/Fast to its own
 *                  loop (which it runs between replacements), installs it with
 *                  ca_set_child_watcher and publishes it (with a reference) to the adders.
 *   policy thread  ca_set_event_loop_policy with new default/poll policies or NULL.
 *   adders (2)     each with its own running loop: from a callback, fork a child that exits
 *                  at once and add it to the published watcher; then remove it at once, or
 *                  wait for the callback. A handler still registered (remove answers 1) long
 *                  after its child exited is a lost exit. The child is reaped through a pidfd
 *                  when nobody else will (never by pid: no recycled pid is ever hit).
 *   main thread    the same as an adder but with no loop running, so the watcher picks the
 *                  main thread's current loop (the policy's) as the delivery loop: issue 16
 *                  item 2's pattern.
 * At the end: no child (running or zombie) left, every thread joined, everything closed;
 * leaks are the sanitizer's to report. The last line is "soak: clean" or "soak: FAILED";
 * tools/soak.sh turns the run into CI's summary line.
 */
#include "casyncio.h"

#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#pragma weak ca_uring_child_watcher_new

#define NMAX 8
static int nspawn = 2, nadd = 2; /* SOAK_SPAWNERS, SOAK_ADDERS (0..8): to narrow a hunt */

static atomic_bool stopping;      /* spawners and adders: finish up */
static atomic_bool workers_done;  /* watcher thread: the workers are done, stop replacing */
static atomic_bool fast_seen;     /* a Fast watcher was installed at some point */
static atomic_int failures;
static double slow = 1.0;

/* Explicit closes of a replaced Safe/Fast watcher (see watcher_thread), counted before each. */
static atomic_long n_xclose;
static atomic_long n_spawn, n_spawn_err, n_exit, n_rc255, n_add, n_add_err, n_removed,
    n_delivered, n_wrepl, n_prepl, n_logs;

static void fail(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    flockfile(stderr);
    fputs("soak: FAIL: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    funlockfile(stderr);
    va_end(ap);
    atomic_fetch_add(&failures, 1);
}

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static void log_fn(int level, const char *msg, void *arg)
{
    (void)level, (void)arg;
    const char *match = getenv("SOAK_LOG_MATCH");
    if (atomic_fetch_add(&n_logs, 1) < 5 && getenv("SOAK_VERBOSE")) fprintf(stderr, "log: %s\n", msg);
    else if (match && *match && strstr(msg, match)) fprintf(stderr, "log: %s\n", msg);
}

static void stop_cb(void *arg) { ca_loop_stop(arg); }

/* Runs loop in short slices until *flag or `secs` pass. */
static bool run_until(ca_loop *loop, volatile int *flag, double secs)
{
    double deadline = now() + secs;
    while (!*flag && now() < deadline) {
        ca_handle *h = NULL;
        if (ca_loop_call_later(loop, 0.005, stop_cb, loop, &h) < 0) {
            fail("call_later failed");
            return false;
        }
        int r = ca_loop_run_forever(loop);
        if (r < 0) fail("run_forever: %s", ca_strerror(r));
        ca_handle_cancel(h);
        ca_handle_unref(h);
    }
    return *flag != 0;
}

static int new_loop(unsigned kind, ca_loop **out)
{
    int r = kind % 3 == 0 ? ca_selector_loop_new(out)
            : kind % 3 == 1 ? ca_poll_loop_new(out)
                            : ca_proactor_loop_new(out);
    if (r == -ENOSYS || r == -EPERM) r = ca_selector_loop_new(out);
    return r;
}

/* ----- spawners ------------------------------------------------------------------------- */

struct spawn_job {
    ca_loop *loop;
    unsigned seed;
    volatile int attempted;
    int r;
    ca_process *proc;
    ca_subprocess_options opts;
};

static void do_spawn(void *arg)
{
    struct spawn_job *j = arg;
    j->r = ca_loop_subprocess_exec(j->loop, &j->opts, NULL, NULL, &j->proc);
    j->attempted = 1;
}

static void wait_done(ca_future *f, void *arg)
{
    (void)f;
    *(volatile int *)arg = 1;
}

static void *spawner(void *arg)
{
    unsigned id = (unsigned)(uintptr_t)arg, seed = id * 7919u + (unsigned)time(NULL);
    ca_loop *loop = NULL;
    int r = new_loop(id, &loop);
    if (r < 0) {
        fail("spawner %u: loop: %s", id, ca_strerror(r));
        return NULL;
    }
    ca_set_event_loop(loop); /* on the policy of the moment; it may be replaced at once */
    static const char *const true_argv[] = {"/bin/true", NULL};
    static const char *const seven_argv[] = {"/bin/sh", "-c", "exit 7", NULL};
    while (!atomic_load(&stopping)) {
        unsigned x = (unsigned)rand_r(&seed);
        struct spawn_job j = {.loop = loop};
        long xclose = atomic_load(&n_xclose);
        /* Replacements from here on may hand the child to a closed watcher (see below). */
        long gen = atomic_load(&n_wrepl) + atomic_load(&n_prepl);
        bool seven = x & 1;
        j.opts.argv = seven ? seven_argv : true_argv;
        j.opts.stdout_mode = (x & 2) ? CA_PIPE : CA_DEVNULL;
        if (x & 4) {
            do_spawn(&j);
        } else if (ca_loop_call_soon(loop, do_spawn, &j, NULL) == 0) {
            run_until(loop, &j.attempted, 10 * slow);
            if (!j.attempted) {
                fail("spawner %u: call_soon never ran", id);
                continue;
            }
        } else {
            fail("spawner %u: call_soon failed", id);
            continue;
        }
        if (j.r < 0) {
            atomic_fetch_add(&n_spawn_err, 1);
            /* -EBADF is documented for a policy whose watcher was closed by its owner and not
             * replaced: the watcher thread's explicit close of a Safe/Fast watcher still
             * installed in a policy that this spawn started on before it was replaced. Not
             * otherwise (issue 16 item 9). */
            bool xclosed = atomic_load(&n_xclose) != xclose;
            if (j.r != -ENOTCONN && j.r != -EAGAIN && !(j.r == -EBADF && xclosed))
                fail("spawner %u: subprocess_exec: %d (%s)", id, j.r, ca_strerror(j.r));
            usleep(1000);
            continue;
        }
        atomic_fetch_add(&n_spawn, 1);
        ca_future *wf = NULL;
        volatile int done = 0;
        r = ca_process_wait(j.proc, &wf);
        if (r < 0 || (r = ca_future_add_done_callback(wf, wait_done, (void *)&done)) < 0) {
            fail("spawner %u: wait: %s", id, ca_strerror(r));
        } else if (!run_until(loop, &done, 30 * slow)) {
            fail("spawner %u: the exit of pid %d was lost (no wait completion in %.0f s)", id,
                 (int)ca_process_pid(j.proc), 30 * slow);
        } else {
            void *res = NULL;
            r = ca_future_result(wf, &res);
            int rc = (int)(intptr_t)res, want = seven ? 7 : 0;
            atomic_fetch_add(&n_exit, 1);
            if (r < 0) {
                fail("spawner %u: wait future failed: %s", id, ca_strerror(r));
            } else if (rc == 255 && (atomic_load(&fast_seen) ||
                                     atomic_load(&n_wrepl) + atomic_load(&n_prepl) != gen)) {
                /* Documented (docs/subprocess.md, "When the watcher lets go of a process"):
                 * the thread of a Threaded watcher closed (replaced) while the child ran may
                 * reap it first; Fast reaps every child of the process. */
                atomic_fetch_add(&n_rc255, 1);
            } else if (rc != want) {
                fail("spawner %u: pid %d returncode %d, want %d", id,
                     (int)ca_process_pid(j.proc), rc, want);
            }
        }
        ca_future_unref(wf);
        ca_process_unref(j.proc);
    }
    int rr = ca_loop_close(loop);
    if (rr < 0) fail("spawner %u: close: %s", id, ca_strerror(rr));
    ca_loop_unref(loop);
    return NULL;
}

/* ----- the published watcher, and adders -------------------------------------------------- */

enum { W_THREADED, W_MULTILOOP, W_SAFE, W_FAST, W_PIDFD, W_URING, W_KINDS };
static const char *const wnames[W_KINDS] = {"threaded", "multiloop", "safe", "fast", "pidfd",
                                            "uring"};
static pthread_mutex_t pub_lock = PTHREAD_MUTEX_INITIALIZER;
static ca_child_watcher *pub_w;
static int pub_kind;

static ca_child_watcher *get_published(int *kind)
{
    pthread_mutex_lock(&pub_lock);
    ca_child_watcher *w = ca_child_watcher_ref(pub_w);
    *kind = pub_kind;
    pthread_mutex_unlock(&pub_lock);
    return w;
}

/* One registration. The callback may still be running on another thread when remove answers
 * 0 ("being delivered right now"), and nothing tells its caller when it is over; so a record
 * is never freed nor reused soon: each thread takes the next one of its own ring. The fields
 * the callback touches are atomic. */
struct raw {
    ca_child_watcher *w;
    int kind;
    atomic_int pid;
    int pidfd;
    atomic_int calls;
    atomic_int rc;
    int r;
};

#define RING 4096
static struct raw rings[NMAX + 1][RING];

static struct raw *next_raw(int ring, unsigned *i)
{
    struct raw *x = &rings[ring][(*i)++ % RING];
    x->w = NULL;
    x->kind = 0;
    x->pidfd = -1;
    x->r = 0;
    atomic_store(&x->pid, 0);
    atomic_store(&x->calls, 0);
    atomic_store(&x->rc, 0);
    return x;
}

static void raw_cb(pid_t pid, int rc, void *arg)
{
    struct raw *x = arg;
    if (pid != atomic_load(&x->pid))
        fail("handler for pid %d called with pid %d", atomic_load(&x->pid), (int)pid);
    atomic_store(&x->rc, rc);
    if (atomic_fetch_add(&x->calls, 1) != 0) fail("pid %d reported twice", (int)pid);
    atomic_fetch_add(&n_delivered, 1);
}

/* Forks a child that exits at once and registers it. On the thread that will deliver. */
static void raw_add(struct raw *x)
{
    x->pidfd = -1;
    x->r = ca_child_watcher_enter(x->w);
    if (x->r < 0 && x->r != -EBADF) fail("enter: %s", ca_strerror(x->r));
    pid_t pid = fork();
    if (pid == 0) _exit(5);
    atomic_store(&x->pid, pid);
    if (pid < 0) {
        fail("fork: %s", strerror(errno));
        x->r = -errno;
        ca_child_watcher_exit(x->w);
        return;
    }
    /* Before anybody may reap it? Fast's waitpid(-1) may be first: then there is no pidfd and
     * the child is Fast's. */
    x->pidfd = (int)syscall(SYS_pidfd_open, pid, 0);
    x->r = ca_child_watcher_add_child_handler(x->w, pid, raw_cb, x);
    atomic_fetch_add(x->r == 0 ? &n_add : &n_add_err, 1);
    if (x->r < 0 && x->r != -EBADF && x->r != -ENOTCONN && x->r != -EAGAIN && x->r != -ENOENT)
        fail("add_child_handler (%s): %d (%s)", wnames[x->kind], x->r, ca_strerror(x->r));
    ca_child_watcher_exit(x->w);
}

static void raw_add_cb(void *arg) { raw_add(arg); }

/* After the registration: reap the child if it is still there and nobody else will. */
static void raw_finish(struct raw *x, ca_loop *loop, bool remove_now)
{
    pid_t pid = atomic_load(&x->pid);
    if (pid <= 0) return;
    int removed = 0;
    if (x->r == 0) {
        if (remove_now) {
            removed = ca_child_watcher_remove_child_handler(x->w, pid);
            if (removed == 1) atomic_fetch_add(&n_removed, 1);
        } else {
            double deadline = now() + 10 * slow;
            volatile int never = 0;
            while (!atomic_load(&x->calls) && now() < deadline) {
                if (loop) run_until(loop, &never, 0.01);
                else usleep(1000);
            }
            removed = ca_child_watcher_remove_child_handler(x->w, pid);
            /* Still registered 10 s after the child's exit, on a watcher that was not closed
             * (a close cancels every handler, so remove would answer 0). Safe/Fast depend on the
             * watcher thread's loop, which runs all along; a main-thread registration goes to a
             * loop nobody runs, so only the adders' can tell. */
            if (removed == 1 && loop && ca_child_watcher_is_active(x->w))
                fail("pid %d (%s): exit not reported in %.0f s", (int)pid, wnames[x->kind],
                     10 * slow);
        }
    }
    if (x->pidfd >= 0) {
        /* Reaped already (the callback came, or Threaded's or Fast's own wait), or ours to
         * reap: waitid on the pidfd cannot hit anyone else's child. Blocking is fine: the
         * child exits at once. */
        siginfo_t si;
        if (atomic_load(&x->calls) == 0) waitid(P_PIDFD, (id_t)x->pidfd, &si, WEXITED);
        close(x->pidfd);
    }
}

static void *adder(void *arg)
{
    unsigned id = (unsigned)(uintptr_t)arg, seed = id * 104729u + (unsigned)time(NULL);
    ca_loop *loop = NULL;
    int r = new_loop(id, &loop);
    if (r < 0) {
        fail("adder %u: loop: %s", id, ca_strerror(r));
        return NULL;
    }
    unsigned ri = 0;
    while (!atomic_load(&stopping)) {
        struct raw *x = next_raw((int)id, &ri);
        x->w = get_published(&x->kind);
        if (!x->w) {
            usleep(1000);
            continue;
        }
        volatile int never = 0;
        if (ca_loop_call_soon(loop, raw_add_cb, x, NULL) == 0) {
            /* One slice runs the callback. */
            run_until(loop, &never, 0.001);
            raw_finish(x, loop, rand_r(&seed) & 1);
        } else {
            fail("adder %u: call_soon failed", id);
        }
        /* A late callback (posted before the remove) may still be queued: let it run. */
        run_until(loop, &never, 0.002);
        ca_child_watcher_unref(x->w);
    }
    volatile int never = 0;
    run_until(loop, &never, 0.05);
    r = ca_loop_close(loop);
    if (r < 0) fail("adder %u: close: %s", id, ca_strerror(r));
    ca_loop_unref(loop);
    return NULL;
}

/* ----- replacers -------------------------------------------------------------------------- */

static int make_watcher(int kind, ca_child_watcher **w)
{
    switch (kind) {
    case W_THREADED: return ca_threaded_child_watcher_new(w);
    case W_MULTILOOP: return ca_multiloop_child_watcher_new(w);
    case W_SAFE: return ca_safe_child_watcher_new(w);
    case W_FAST: return ca_fast_child_watcher_new(w);
    case W_PIDFD: return ca_pidfd_child_watcher_new(w);
    default: return ca_uring_child_watcher_new ? ca_uring_child_watcher_new(w) : -ENOSYS;
    }
}

static void *watcher_thread(void *arg)
{
    (void)arg;
    unsigned seed = (unsigned)time(NULL) * 31u;
    ca_loop *loop = NULL;
    int r = ca_selector_loop_new(&loop);
    if (r < 0) {
        fail("watcher thread: loop: %s", ca_strerror(r));
        return NULL;
    }
    const char *only = getenv("SOAK_WATCHERS"); /* e.g. "threaded,pidfd" to narrow a hunt */
    while (!atomic_load(&workers_done)) {
        int kind = rand_r(&seed) % W_KINDS;
        if (only && *only && !strstr(only, wnames[kind])) continue;
        ca_child_watcher *w = NULL;
        r = make_watcher(kind, &w);
        if (r == -ENOSYS || r == -ENOTSUP) continue; /* not here (uring, pidfd) */
        if (r < 0) {
            fail("watcher thread: new %s: %s", wnames[kind], ca_strerror(r));
            continue;
        }
        pthread_mutex_lock(&pub_lock);
        ca_child_watcher *old = pub_w;
        int old_kind = pub_kind;
        pub_w = NULL;
        pthread_mutex_unlock(&pub_lock);
        if (kind == W_FAST) atomic_store(&fast_seen, true);
        r = ca_set_child_watcher(w); /* closes the policy's previous watcher */
        if (r < 0) fail("watcher thread: set_child_watcher: %s", ca_strerror(r));
        atomic_fetch_add(&n_wrepl, 1);
        /* set_child_watcher closed `old` only if it was still the policy's: another thread
         * may have replaced the policy meanwhile, which drops its watcher unclosed. A Safe or
         * Fast watcher left attached to our loop would then lose its SIGCHLD handler to the
         * next one (a loop has one handler per signal) and never see an exit again: close it
         * before attaching another. */
        if (old && (old_kind == W_SAFE || old_kind == W_FAST)) {
            atomic_fetch_add(&n_xclose, 1);
            ca_child_watcher_close(old);
        }
        ca_child_watcher_unref(old);
        /* -EBUSY is documented: another attach of this watcher is under way in another
         * thread. Here that is the main thread, whose ca_get_event_loop makes its loop and
         * attaches the policy's watcher to it (asyncio's rule for the main thread). */
        if ((kind == W_SAFE || kind == W_FAST) && (r = ca_child_watcher_attach_loop(w, loop)) < 0 &&
            r != -EBUSY)
            fail("watcher thread: attach %s: %s", wnames[kind], ca_strerror(r));
        pthread_mutex_lock(&pub_lock);
        pub_w = w; /* our reference moves to the slot */
        pub_kind = kind;
        pthread_mutex_unlock(&pub_lock);
        volatile int never = 0;
        run_until(loop, &never, 0.001 * (1 + rand_r(&seed) % 20));
    }
    /* The workers are done: nothing is registered any more. */
    pthread_mutex_lock(&pub_lock);
    ca_child_watcher *old = pub_w;
    pub_w = NULL;
    pthread_mutex_unlock(&pub_lock);
    if (old) ca_child_watcher_close(old);
    ca_child_watcher_unref(old);
    r = ca_loop_close(loop);
    if (r < 0) fail("watcher thread: close: %s", ca_strerror(r));
    ca_loop_unref(loop);
    return NULL;
}

static void *policy_thread(void *arg)
{
    (void)arg;
    unsigned seed = (unsigned)time(NULL) * 17u;
    while (!atomic_load(&stopping)) {
        ca_policy *p = NULL;
        unsigned x = (unsigned)rand_r(&seed) % 3;
        int r = x == 0 ? ca_default_policy_new(&p) : x == 1 ? ca_poll_policy_new(&p) : 0;
        if (r < 0) fail("policy thread: new: %s", ca_strerror(r));
        r = ca_set_event_loop_policy(p); /* NULL: a new default one */
        if (r < 0) fail("policy thread: set: %s", ca_strerror(r));
        ca_policy_unref(p);
        atomic_fetch_add(&n_prepl, 1);
        usleep(1000 * (1 + rand_r(&seed) % 10));
    }
    return NULL;
}

/* The main thread's part: item 2's pattern (no running loop: the delivery loop is the main
 * thread's current loop, which the policy owns and another thread may replace). */
static void main_adds(double until)
{
    unsigned seed = (unsigned)time(NULL) * 13u;
    unsigned ri = 0;
    while (now() < until) {
        struct raw *x = next_raw(NMAX, &ri);
        x->w = get_published(&x->kind);
        if (x->w) {
            raw_add(x);
            /* Nobody runs the delivery loop here (Threaded, MultiLoop, Pidfd): give the exit
             * time to be posted, then remove. Safe and Fast deliver on the watcher thread. */
            usleep(rand_r(&seed) % 2000);
            raw_finish(x, NULL, true);
            ca_child_watcher_unref(x->w);
        }
        usleep(500);
    }
}

int main(void)
{
    const char *s = getenv("SOAK_SECONDS");
    double secs = s ? atof(s) : 60;
    s = getenv("CA_TEST_SLOW");
    if (s && atof(s) > 1) slow = atof(s);
    ca_set_log_handler(log_fn, NULL);
    signal(SIGPIPE, SIG_IGN);

    s = getenv("SOAK_SPAWNERS");
    if (s) nspawn = atoi(s) < 0 ? 0 : atoi(s) > NMAX ? NMAX : atoi(s);
    s = getenv("SOAK_ADDERS");
    if (s) nadd = atoi(s) < 0 ? 0 : atoi(s) > NMAX ? NMAX : atoi(s);
    pthread_t sp[NMAX], ad[NMAX], wt, pt;
    pthread_create(&wt, NULL, watcher_thread, NULL);
    pthread_create(&pt, NULL, policy_thread, NULL);
    for (uintptr_t i = 0; i < (uintptr_t)nspawn; i++) pthread_create(&sp[i], NULL, spawner, (void *)i);
    for (uintptr_t i = 0; i < (uintptr_t)nadd; i++) pthread_create(&ad[i], NULL, adder, (void *)i);
    double start = now();
    main_adds(start + secs);
    atomic_store(&stopping, true);
    for (int i = 0; i < nspawn; i++) pthread_join(sp[i], NULL);
    for (int i = 0; i < nadd; i++) pthread_join(ad[i], NULL);
    pthread_join(pt, NULL);
    atomic_store(&workers_done, true);
    pthread_join(wt, NULL);
    /* Drop what the policy holds (its watcher, the main thread's loop). */
    ca_set_child_watcher(NULL);
    ca_set_event_loop_policy(NULL);

    int final = 0;
    siginfo_t si = {0};
    /* Threaded's detached threads reap their last children just after their exit. */
    double deadline = now() + 5 * slow;
    while (waitid(P_ALL, 0, &si, WEXITED | WNOHANG | WNOWAIT) == 0 && now() < deadline)
        usleep(2000);
    if (waitid(P_ALL, 0, &si, WEXITED | WNOHANG | WNOWAIT) == 0) {
        fail("a child is left (pid %d; 0: still running)", (int)si.si_pid);
        final = 1;
    }
    printf("soak: %.0f s: %ld spawns (%ld refused), %ld exits (%ld with 255 after a replacement or Fast), "
           "%ld handlers added (%ld refused), %ld removed, %ld delivered, %ld watcher and %ld "
           "policy replacements, %ld log messages\n",
           now() - start, atomic_load(&n_spawn), atomic_load(&n_spawn_err), atomic_load(&n_exit),
           atomic_load(&n_rc255), atomic_load(&n_add), atomic_load(&n_add_err),
           atomic_load(&n_removed), atomic_load(&n_delivered), atomic_load(&n_wrepl),
           atomic_load(&n_prepl), atomic_load(&n_logs));
    int f = atomic_load(&failures);
    (void)final;
    printf("soak: %s\n", f ? "FAILED" : "clean");
    return f ? 1 : 0;
}
