/*
 * MultiLoopChildWatcher: its own SIGCHLD handler from creation until close, through the
 * process-wide signal fan-out (a slot whose eventfd is ours), and its own reaping thread woken
 * by that eventfd. On each wake it reaps the registered children that have exited, by pid
 * (waitpid(pid, WNOHANG)): it never reaps a child that is not registered, so other code's
 * waitpid() and system() keep working. Exits are posted to each child's own loop (the loop of
 * the thread that added the handler), where the callbacks run: loops in any thread can spawn.
 *
 * asyncio's version ran the polling inside the Python signal handler, in the main thread, and
 * could hang or lose exits under load (bpo-38323). Here the signal handler only writes to the
 * eventfd; the reaping runs in a thread that blocks every signal, and because the eventfd is a
 * counter and every wake reaps until no exited child is left, coalesced SIGCHLDs lose nothing.
 * A pid is also checked when it is added (it may have exited before). The exited children are
 * found by pid (the SIGCHLD hints, the newest registrations) and with waitid(WNOWAIT)
 * (ca__wreap_next), which costs the same number of system calls however many children are
 * registered. The look that only finds what a coalesced SIGCHLD brought no hint for (a walk of
 * every child, in the kernel) waits after a pass whose exits all came with their hints, so
 * that one look serves a stream of exits: CA__WLOOK_DEFER_NS, twice that after each deferred
 * look that found nothing up to CA__WLOOK_DEFER_MAX_NS, and CA__WLOOK_DEFER_NS again once a
 * look finds an exit. Every registered pid is polled only when that cannot tell: waitid fails,
 * or the first exited child is not registered and stays so for CA__WHIDE_NS (a child whose
 * handler is on its way is reaped by its add, which wakes the thread to look behind it); and
 * once a second, which is what learns that other code reaped a watched child (255 and a
 * warning).
 *
 * Other code may replace our SIGCHLD handler (a host that owns the dispositions, a library): the
 * thread also wakes every second, reaps as if SIGCHLD had come, and checks the disposition; if
 * ours is gone and no host routes SIGCHLD to us (ca_sigchld_notify), it warns once and polls
 * every 0.1 s. It also posts again the exits whose post failed for memory (ca__wcore_retry).
 */
#include "internal.h"
#include "watcher_internal.h"

#include <poll.h>
#include <signal.h>
#include <stdlib.h>
#include <sys/eventfd.h>
#include <time.h>
#include <unistd.h>

typedef struct multiloop {
    int efd;
    ca__sigslot *slot;
    pthread_t thread;
    bool thread_started;
    atomic_bool stop;
} multiloop;

static multiloop *ml(ca__wcore *c) { return (multiloop *)c->impl; }

/* waitpid(pid, WNOHANG) for every registration still waiting. Lock held. */
static void poll_all(ca__wcore *c, ca__wlog *q)
{
    atomic_fetch_add_explicit(&ca__wpoll_count, 1, memory_order_relaxed);
    /* Downwards: an exit takes entry i out by moving the last one (already polled) there. */
    for (uint32_t i = c->nwait; i-- > 0;) {
        if (i >= c->nwait) continue;
        int rc = 0;
        int e = ca__wait_nohang(c->wpids[i], &rc);
        if (e == 1) ca__wreg_exited(c, c->wregs[i], rc, false, q);
        else if (e == -ECHILD) ca__wreg_exited(c, c->wregs[i], 255, true, q);
    }
}

/* How often the thread checks that SIGCHLD still reaches it (its handler may have been replaced
 * by other code, or a host routes SIGCHLD with ca_sigchld_notify), and reaps as if it had come:
 * an exit is never lost to a changed disposition, it is found at the latest this late. It is
 * also how often every registration is polled (what learns that other code reaped a watched
 * child: 255 and a warning). */
#define TICK_NS 1000000000LL
/* The same once SIGCHLD is known not to reach us: polling (the exited children only; every
 * registration still once per TICK_NS). */
#define POLL_NS 100000000LL

/* After a SIGCHLD (full: poll every registration). The exited children are found with
 * ca__wreap_next; every registration is polled only when that cannot tell (or full). Returns
 * true when it polled every registration; *relook: when to look again (an exited child that is
 * not ours yet hides the others; -1: no need). taken: SIGCHLD no longer reaches us (logged
 * once). */
static bool reap_exits(ca__wcore *c, bool full, bool taken, bool defer, long long *relook,
                       bool *deferred, int *looked)
{
    ca__wlog q = {0};
    bool polled = false;
    *relook = -1;
    *deferred = false;
    *looked = 0;
    ca__wcore_lock(c);
    if (taken) ca__sigchld_warn_taken(&q, "MultiLoopChildWatcher");
    if (c->nwait > 0) {
        int e = full ? -1 : 1;
        ca__wreap_pass pass;
        ca__wreap_begin(c, &pass); /* full too: its hints are of no use later */
        pass.defer = defer;
        while (e == 1) {
            ca__wreg *r;
            int rc;
            bool echild;
            if ((e = ca__wreap_next(c, &pass, &r, &rc, &echild, relook)) == 1)
                ca__wreg_exited(c, r, rc, echild, &q);
        }
        *looked = pass.looked;
        if (e == -3) {
            *deferred = true;
            e = 0;
        }
        if (e == -2 && c->nwait == 0) e = 0;
        if (e != -2) *relook = -1;
        if (e == -1) {
            poll_all(c, &q);
            polled = true;
        }
    }
    ca__wcore_unlock(c);
    ca__wlog_flush(&q);
    return polled;
}

static long long now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static void *reaper_main(void *arg)
{
    ca__wcore *c = arg;
    multiloop *m = ml(c);
    pthread_setname_np(pthread_self(), "ca-multiloop");
    long long relook = -1; /* when to look again past a child that is not ours; -1: none */
    long long look_due = -1; /* the deferred look; -1: none */
    long long defer = CA__WLOOK_DEFER_NS; /* how long it waits (CA__WLOOK_DEFER_MAX_NS) */
    long long tick = now_ns() + TICK_NS;
    long long full_due = tick; /* the next poll of every registration */
    bool retrying = false;
    for (;;) {
        long long next = tick < full_due ? tick : full_due;
        if (relook >= 0 && relook < next) next = relook;
        if (look_due >= 0 && look_due < next) next = look_due;
        if (retrying && now_ns() + POLL_NS < next) next = now_ns() + POLL_NS;
        long long left = next - now_ns();
        int timeout = left <= 0 ? 0 : (int)((left + 999999) / 1000000);
        struct pollfd p = {.fd = m->efd, .events = POLLIN};
        int n = poll(&p, 1, timeout);
        if (n < 0 && errno != EINTR) break;
        bool full = false, taken = false;
        if (n > 0) {
            uint64_t v;
            if (read(m->efd, &v, sizeof v) < 0 && errno != EAGAIN && errno != EINTR) break;
            if (atomic_load(&m->stop)) break;
            ca__sigslot_take(m->slot);
        } else if (n < 0) {
            continue;
        }
        long long now = now_ns();
        full = now >= full_due;
        bool look = relook >= 0 && now >= relook;
        bool due = look_due >= 0 && now >= look_due;
        if (now >= tick) {
            /* The slow check: reap as if SIGCHLD had come, whatever its disposition. If our
             * handler is gone and no host routes SIGCHLD to us, say so once and poll. */
            taken = !ca__sigchld_handler_installed() && ca__sigchld_notified() == 0;
            tick = now + (taken ? POLL_NS : TICK_NS);
        } else if (n == 0 && !full && !look && !due && !retrying) {
            continue;
        }
        /* A pass after a deferred look is due looks itself (it does not defer again), so that a
         * stream of hinted exits cannot put the look off for ever. */
        bool deferred;
        int looked;
        if (reap_exits(c, full, taken, !due, &relook, &deferred, &looked) || full)
            full_due = now_ns() + TICK_NS;
        /* A look that found an exit without a hint: SIGCHLDs coalesce now, look soon after
         * the next hinted pass; one that found none: twice as late, up to the maximum. */
        if (looked) defer = CA__WLOOK_DEFER_NS;
        else if (due && defer < CA__WLOOK_DEFER_MAX_NS) defer *= 2;
        if (due) look_due = -1;
        if (deferred && look_due < 0) look_due = now_ns() + defer;
        /* Exits whose post failed for memory are posted again, every POLL_NS until done. */
        retrying = ca__wcore_retry(c);
    }
    return NULL;
}

/* The kind's start: the child may have exited before its handler came (its SIGCHLD then
 * found nothing to deliver), so look now. */
static int multiloop_start(ca__wcore *c, ca__wadd *a, ca__wlog *q)
{
    int e = ca__wreg_check_exited(c, a->r, q);
    if (e != 0 && a->pid == c->hider) {
        /* It hid the exited children behind it from the thread: look again now. Under the
         * lock, so that a close (which sets c->closed first) cannot have closed the eventfd;
         * a non-blocking write, no loop op. */
        c->hider = 0;
        uint64_t one = 1;
        while (write(ml(c)->efd, &one, sizeof one) < 0 && errno == EINTR) {
        }
    }
    return 0;
}

/* Stops the thread and the signal slot. Not under the lock: the thread takes it. */
static void multiloop_stop(ca__wcore *c)
{
    multiloop *m = ml(c);
    if (m->thread_started) {
        atomic_store(&m->stop, true);
        uint64_t one = 1;
        while (write(m->efd, &one, sizeof one) < 0 && errno == EINTR) {
        }
        pthread_join(m->thread, NULL);
        m->thread_started = false;
    }
    if (m->slot) {
        ca__sigslot_free(m->slot, false);
        m->slot = NULL;
    }
    if (m->efd >= 0) {
        close(m->efd);
        m->efd = -1;
    }
}

static int multiloop_close(ca_child_watcher *w)
{
    ca__wcore *c = ca__wcore_of(w);
    ca__wcore_lock(c);
    c->closed = true;
    ca__wcore_cancel_all(c);
    ca__wcore_unlock(c);
    multiloop_stop(c);
    ca__sigchld_keep_release();
    return 0;
}

static void multiloop_destroy(ca_child_watcher *w)
{
    ca__wcore *c = ca__wcore_of(w);
    if (ca__child_watcher_forked(w)) {
        multiloop *m = ml(c);
        if (m->slot) ca__sigslot_free(m->slot, true);
        if (m->efd >= 0) close(m->efd);
        ca__wcore_free_forked(c);
    } else {
        ca__wcore_unref(c);
    }
}

static const ca__wkind multiloop_kind = {
    .name = "multiloop",
    .start = multiloop_start,
    .close = multiloop_close,
    .destroy = multiloop_destroy,
    /* attach_loop: the handler is installed at creation, loops need no attaching */
};

int ca_multiloop_child_watcher_new(ca_child_watcher **out)
{
    if (!out) return -EINVAL;
    ca__wcore *c;
    int err = ca__wcore_new(&c);
    if (err < 0) return err;
    multiloop *m = calloc(1, sizeof *m);
    if (!m) {
        ca__wcore_unref(c);
        return -ENOMEM;
    }
    c->impl = m;
    c->track_wait = true;
    m->efd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (m->efd < 0) {
        err = -errno;
        ca__wcore_unref(c);
        return err;
    }
    ca__sigchld_keep_acquire(); /* before our handler replaces a SIG_IGN: to log it */
    err = ca__sigslot_new(m->efd, &m->slot);
    if (err == 0) err = ca__sigslot_watch(m->slot, SIGCHLD);
    if (err == 0) {
        pthread_attr_t attr;
        pthread_attr_init(&attr); /* a default-size stack: it calls the log handler and ops */
        sigset_t all, old;
        sigfillset(&all);
        pthread_sigmask(SIG_SETMASK, &all, &old);
        int e = pthread_create(&m->thread, &attr, reaper_main, c);
        pthread_sigmask(SIG_SETMASK, &old, NULL);
        pthread_attr_destroy(&attr);
        if (e != 0) err = -e;
        else m->thread_started = true;
    }
    if (err == 0) err = ca__child_watcher_make(&multiloop_kind, c, out);
    if (err < 0) {
        multiloop_stop(c);
        ca__sigchld_keep_release();
        ca__wcore_unref(c);
    }
    return err;
}
