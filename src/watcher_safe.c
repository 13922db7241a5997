/*
 * SafeChildWatcher: SIGCHLD through the attached loop's signal handler (asyncio attaches the
 * main thread's loop); on each SIGCHLD the likely exited children (the SIGCHLD hints, the newest
 * registrations) are checked by pid, then the exited children that waitid(WNOWAIT) shows are
 * reaped by pid while they are registered ones (ca__wreap_next): the same number of system calls
 * however many children are registered. Every registered pid is polled with waitpid(pid, WNOHANG) only when that
 * cannot tell (waitid fails, or an exited child that is not registered has hidden the others
 * for CA__WHIDE_NS: until then a timer looks again), after an attach, and at the slow check
 * once a second (what learns that other code reaped a watched child: 255 and a warning). It
 * never reaps a child that is not registered, so other code's waitpid() and system() keep
 * working. Callbacks run on the attached loop's thread.
 *
 * This file also holds the attachment logic that Fast shares (ca__wattach_*): a SIGCHLD handler
 * on the attached loop, whose argument is the loop's binding; attach/detach from the loop's own
 * thread (or while it does not run), since signal handlers are the loop's thread's business.
 * The attached loop also carries a slow check (a timer every TICK_DELAY) that reaps as if
 * SIGCHLD had come, every registered child included, so that other code taking SIGCHLD away
 * loses no exit and a watched child that other code reaped is reported. Loop ops (the signal
 * handler, timers, posts) are called without the core's lock.
 */
#include "internal.h"
#include "watcher_internal.h"

#include <signal.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static ca__wattach *att(ca__wcore *c) { return (ca__wattach *)c->impl; }

bool ca__wattach_active(ca__wcore *c)
{
    ca__wattach *a = att(c);
    /* The core's closed flag only: the host's is_closed op is asked before the lock (see
     * attached_loop). */
    return !c->closed && a->loop && a->bind && a->bind->loop && !ca__loop_core_closed(a->loop);
}

/* The attached loop with a reference (NULL: none), and in *open whether it is open, its host's
 * is_closed op included: asked without the lock. */
static ca_loop *attached_loop(ca__wcore *c, bool *open)
{
    ca__wcore_lock(c);
    ca_loop *loop = att(c)->loop ? ca_loop_ref(att(c)->loop) : NULL; /* the attachment holds one */
    ca__wcore_unlock(c);
    *open = loop && !ca_loop_is_closed(loop);
    return loop;
}

/* The slow check (issue 13, item 5): every TICK_DELAY on the attached loop, the watcher reaps as
 * if SIGCHLD had come, so that no exit is lost when other code took SIGCHLD away from the loop
 * (a foreign sigaction, a remove_signal_handler); it warns once when it sees that. It checks
 * every registered child too (full): a registered child that other code reaped (ECHILD,
 * returncode 255 as asyncio reports it) is found at the latest this late. */
#define TICK_DELAY 1.0

enum { REAP_SIGNAL, REAP_CHECK, REAP_RESCAN, REAP_TICK };

static void rescan_cb(void *arg);
static void tick_cb(void *arg);

/* Arms a timer of b's (lock NOT held, on b's loop's thread, which is alive: we run in one of
 * its callbacks or attach it); *flag was set with a reference to b, given back on failure. */
static bool arm(ca__wbind *b, ca_loop *loop, bool *flag, double delay, ca_callback_fn fn)
{
    if (loop && ca_loop_call_later(loop, delay, fn, b, NULL) == 0) return true;
    ca__wcore *c = b->core;
    ca__wcore_lock(c);
    if (*flag) {
        *flag = false;
        ca__wbind_put(b);
    }
    ca__wcore_unlock(c);
    return false;
}

/* SIGCHLD arrived (or an attach's check, a second look or the slow check is due): reap on the
 * attached loop's thread. REAP_RESCAN (Safe only) looks again past an exited child that was not
 * registered yet (ca__wreap_next's -2); REAP_CHECK and REAP_TICK check every registered child. */
static void reap_now(ca__wbind *b, int why)
{
    ca__wcore *c = b->core;
    ca__wreg *list = NULL;
    ca__wlog q = {0};
    bool want_rescan = false, want_tick = false, full_now = false;
    double rescan_delay = 0;
    ca_loop *loop = NULL; /* b's loop: we run in one of its callbacks, it is alive */
    ca__wcore_ref(c);
    ca__wcore_lock(c);
    b->refs++;
    if (why == REAP_CHECK && b->check_posted) {
        b->check_posted = false;
        b->refs--;
    }
    if (why == REAP_RESCAN && b->rescan_posted) {
        b->rescan_posted = false;
        b->refs--;
    }
    if (why == REAP_TICK && b->tick_posted) {
        b->tick_posted = false;
        b->refs--;
    }
    if (!c->closed && att(c)->bind == b && b->loop) {
        loop = b->loop;
        /* A built-in loop gets SIGCHLD through the library's handler: if it is gone and no
         * host routes SIGCHLD to us, say so (once); the ticks keep the exits coming. */
        if (why == REAP_TICK && strcmp(ca_loop_kind(b->loop), "custom") != 0 &&
            !ca__sigchld_handler_installed() && ca__sigchld_notified() == 0)
            ca__sigchld_warn_taken(&q, "SafeChildWatcher/FastChildWatcher");
        long long relook = -1;
        att(c)->reap(c, why == REAP_CHECK || why == REAP_TICK, &list, &q, &relook);
        if (relook >= 0 && !b->rescan_posted) {
            struct timespec ts;
            clock_gettime(CLOCK_MONOTONIC, &ts);
            long long left = relook - ((long long)ts.tv_sec * 1000000000LL + ts.tv_nsec);
            rescan_delay = left > 0 ? (double)left / 1e9 : 0;
            b->rescan_posted = true;
            b->refs++;
            want_rescan = true;
        }
        if (!b->tick_posted) {
            b->tick_posted = true;
            b->refs++;
            want_tick = true;
        }
    }
    ca__wbind_put(b);
    ca__wcore_unlock(c);
    ca__wlog_flush(&q);
    /* No timer: poll every child now rather than maybe never. */
    if (want_rescan && !arm(b, loop, &b->rescan_posted, rescan_delay, rescan_cb)) full_now = true;
    if (want_tick) arm(b, loop, &b->tick_posted, TICK_DELAY, tick_cb);
    if (full_now) {
        ca__wlog q2 = {0};
        ca__wcore_lock(c);
        long long relook;
        if (!c->closed && att(c)->bind == b) att(c)->reap(c, true, &list, &q2, &relook);
        ca__wcore_unlock(c);
        ca__wlog_flush(&q2);
    }
    ca__wdeliver_list(c, list);
    /* Exits found by an add whose post failed for memory: posted again from here. */
    ca__wcore_retry(c);
    ca__wcore_unref(c);
}

static void sigchld_cb(void *arg) { reap_now(arg, REAP_SIGNAL); }
static void check_cb(void *arg) { reap_now(arg, REAP_CHECK); }
static void rescan_cb(void *arg) { reap_now(arg, REAP_RESCAN); }
static void tick_cb(void *arg) { reap_now(arg, REAP_TICK); }

/* A number for the calling thread, unique in the process's life (a thread's address or a
 * thread-local's can be a later thread's too): who attached the watcher (ca__wattach.attacher). */
static uint64_t self_thread_id(void)
{
    static atomic_uint_least64_t next_id;
    static _Thread_local uint64_t id;
    if (!id) id = atomic_fetch_add_explicit(&next_id, 1, memory_order_relaxed) + 1;
    return id;
}

/* Attaching calls loop ops (add and remove the SIGCHLD handler, post the first check, arm the
 * slow check), so it runs in three steps: decide under the lock, call the ops without it, commit
 * under it. An attach racing with another attach of the same watcher gets -EBUSY; a close
 * racing with it detaches what was attached and the attach undoes its own work.
 *
 * -EPERM comes before anything is touched (no handler added to the new loop, none removed from
 * the old one) when either loop runs in another thread right now. implicit (the default
 * policy's set_event_loop in the main thread, which the caller did not ask for) also refuses
 * when the watcher is attached, to a loop that is not closed, by another thread: that loop
 * belongs to that thread, which may start running it at any moment, so a removal of its
 * SIGCHLD handler from here would race with its run; the watcher stays where it is. */
int ca__wattach_attach(ca__wcore *c, ca_loop *loop, bool implicit)
{
    ca__wattach *a = att(c);
    if (loop && ca_loop_is_closed(loop)) return -EBADF;
    if (loop && !ca__loop_in_own_thread(loop)) return -EPERM;
    if (loop) ca__sigchld_keep_acquire(); /* before our handler replaces a SIG_IGN */
    ca__wcore_lock(c);
    ca_loop *old = a->loop;
    if (loop == old || c->closed || a->attaching) {
        /* closed while this call was on its way in; or another attach is under way */
        int r = c->closed ? -EBADF : loop == old ? 0 : -EBUSY;
        ca__wcore_unlock(c);
        if (loop) ca__sigchld_keep_release();
        return r;
    }
    ca__wbind *ob = a->bind;
    /* The old loop is only touched when it still has our handler (ob->loop: not closed). Its
     * running state is an atomic: asking it under the lock calls no loop op. */
    if (ob && ob->sig_registered && ob->loop &&
        (!ca__loop_in_own_thread(ob->loop) || (implicit && a->attacher != self_thread_id()))) {
        ca__wcore_unlock(c);
        if (loop) ca__sigchld_keep_release();
        return -EPERM;
    }
    ca__wbind *nb = NULL;
    if (loop) {
        int err = ca__wbind_get(c, loop, &nb);
        if (err < 0) {
            ca__wcore_unlock(c);
            ca__sigchld_keep_release();
            return err;
        }
        nb->refs++; /* the attachment's */
    }
    bool old_sig = ob && ob->sig_registered && ob->loop;
    a->attaching = true;
    /* Ours, for the ops below: a close in between drops the attachment's reference. */
    if (old) ca_loop_ref(old);
    ca__wcore_unlock(c);

    /* The ops, without the lock. */
    int err = 0;
    if (loop) err = ca_loop_add_signal_handler(loop, SIGCHLD, sigchld_cb, nb);
    if (err == 0 && old_sig) {
        err = ca_loop_remove_signal_handler(old, SIGCHLD);
        if (err < 0 && loop) ca_loop_remove_signal_handler(loop, SIGCHLD);
    }

    ca__wcore_lock(c);
    a->attaching = false;
    bool undo_new = false;
    if (err == 0 && c->closed) {
        /* Closed meanwhile: the close detached the old loop; the new one is undone here. */
        err = -EBADF;
        undo_new = loop != NULL;
    }
    if (err < 0) {
        if (nb) ca__wbind_put(nb);
        ca__wcore_unlock(c);
        if (undo_new) ca_loop_remove_signal_handler(loop, SIGCHLD);
        if (loop) ca__sigchld_keep_release();
        ca_loop_unref(old);
        return err;
    }
    if (ob) {
        if (old_sig) ob->sig_registered = false;
        ca__wbind_put(ob); /* the attachment's */
    }
    a->loop = loop ? ca_loop_ref(loop) : NULL;
    a->bind = nb;
    a->attacher = self_thread_id();
    bool post_check = false, arm_tick = false;
    if (nb) {
        nb->sig_registered = true;
        /* A child may have exited during the switch (asyncio's "prevent a race condition"):
         * check every registered child once, on the new loop. */
        if (!nb->check_posted) {
            nb->check_posted = true;
            nb->refs++;
            post_check = true;
        }
        if (!nb->tick_posted) {
            nb->tick_posted = true;
            nb->refs++;
            arm_tick = true;
        }
    }
    ca__wcore_unlock(c);
    if (post_check && ca_loop_call_soon_threadsafe(loop, check_cb, nb) < 0) {
        ca__wcore_lock(c);
        if (nb->check_posted) {
            nb->check_posted = false;
            ca__wbind_put(nb);
        }
        ca__wcore_unlock(c);
    }
    if (arm_tick) arm(nb, loop, &nb->tick_posted, TICK_DELAY, tick_cb);
    /* After the lock: the last reference may close the old loop, whose hooks take it. */
    if (old) {
        ca_loop_unref(old); /* ours */
        ca_loop_unref(old); /* the attachment's */
        ca__sigchld_keep_release();
    }
    return 0;
}

/* The kind ops Safe and Fast share. */
int ca__wattach_attach_op(ca_child_watcher *w, ca_loop *loop)
{
    return ca__wattach_attach(ca__wcore_of(w), loop, false);
}

bool ca__wattach_is_active_op(ca_child_watcher *w)
{
    ca__wcore *c = ca__wcore_of(w);
    bool open;
    ca_loop *loop = attached_loop(c, &open);
    ca__wcore_lock(c);
    bool on = open && att(c)->loop == loop && ca__wattach_active(c);
    ca__wcore_unlock(c);
    ca_loop_unref(loop);
    return on;
}

int ca__wattach_add_begin(ca__wcore *c, ca_loop *given, ca_loop **attached, ca__wbind **bind)
{
    bool open;
    ca_loop *loop = attached_loop(c, &open);
    *attached = loop;
    if (given && given != loop) return -EINVAL;
    ca__wcore_lock(c);
    int err = c->closed ? -EBADF /* closed while this call was on its way in */
              : !open || att(c)->loop != loop || !ca__wattach_active(c) ? -ENOTCONN
                                                                          : 0;
    if (err < 0) ca__wcore_unlock(c);
    else *bind = att(c)->bind;
    return err;
}

static int wattach_close(ca__wcore *c);
int ca__wattach_close_op(ca_child_watcher *w) { return wattach_close(ca__wcore_of(w)); }

int ca__wattach_watcher_new(const ca__wkind *k,
                            void (*reap)(ca__wcore *c, bool full, ca__wreg **list, ca__wlog *q,
                                         long long *relook),
                            ca_child_watcher **out)
{
    if (!out) return -EINVAL;
    ca__wcore *c;
    int err = ca__wcore_new(&c);
    if (err < 0) return err;
    ca__wattach *a = calloc(1, sizeof *a);
    if (!a) {
        ca__wcore_unref(c);
        return -ENOMEM;
    }
    a->reap = reap;
    c->impl = a;
    err = ca__child_watcher_make(k, c, out);
    if (err < 0) ca__wcore_unref(c);
    return err;
}

static int wattach_close(ca__wcore *c)
{
    ca__wattach *a = att(c);
    ca__wcore_lock(c);
    c->closed = true;
    ca__wcore_cancel_all(c);
    ca_loop *old = a->loop;
    ca__wbind *ob = a->bind;
    bool old_sig = ob && ob->sig_registered && ob->loop;
    /* Removing the handler is for the loop's thread: from another one (-EPERM) it stays until
     * that loop closes; it finds the watcher closed and does nothing. */
    bool remove = old_sig && ca__loop_in_own_thread(old);
    if (ob) {
        if (remove) ob->sig_registered = false;
        ca__wbind_put(ob); /* the attachment's */
    }
    a->loop = NULL;
    a->bind = NULL;
    ca__wcore_unlock(c);
    if (remove) ca_loop_remove_signal_handler(old, SIGCHLD);
    if (old) {
        ca_loop_unref(old);
        ca__sigchld_keep_release();
    }
    return 0;
}

/* ----- Safe ------------------------------------------------------------------------------ */

/* O(n): every registered child that has not exited yet, waitpid(pid, WNOHANG) each. */
static void safe_poll_all(ca__wcore *c, ca__wreg **list, ca__wlog *q)
{
    atomic_fetch_add_explicit(&ca__wpoll_count, 1, memory_order_relaxed);
    /* Downwards: taking entry i moves the last one (already polled) into its place. */
    for (uint32_t i = c->nwait; i-- > 0;) {
        if (i >= c->nwait) continue;
        int rc = 0;
        int e = ca__wait_nohang(c->wpids[i], &rc);
        if (e == 0) continue;
        ca__wreg *r = c->wregs[i];
        if (e == -ECHILD) {
            ca__wlog_add(q, CA_LOG_WARNING,
                         "Unknown child process pid %d, will report returncode 255", (int)r->pid);
            rc = 255;
        } else if (e < 0) {
            continue;
        }
        ca__wreg_take_into(c, r, rc, list);
    }
}

/* The exited children that ca__wreap_next shows, reaped while they are registered ones. Returns
 * its last answer (0, -1 or -2). */
static int safe_reap_exited(ca__wcore *c, ca__wreg **list, ca__wlog *q, long long *relook)
{
    ca__wreap_pass pass;
    ca__wreap_begin(c, &pass);
    for (;;) {
        ca__wreg *r;
        int rc;
        bool echild;
        int e = ca__wreap_next(c, &pass, &r, &rc, &echild, relook);
        if (e <= 0) return e;
        if (echild)
            ca__wlog_add(q, CA_LOG_WARNING,
                         "Unknown child process pid %d, will report returncode 255", (int)r->pid);
        ca__wreg_take_into(c, r, rc, list);
    }
}

/* On SIGCHLD, exits are found with safe_reap_exited. Every registered child is polled when that
 * cannot tell (-1), or full (an attach, the slow check: what finds a registered child that
 * other code reaped). An exited child that is not registered yet (-2) asks for a second look
 * (*relook) rather than a poll. */
static void safe_reap(ca__wcore *c, bool full, ca__wreg **list, ca__wlog *q, long long *relook)
{
    *relook = -1;
    if (c->nwait == 0) return;
    int e = full ? -1 : safe_reap_exited(c, list, q, relook);
    if (e == -2 && c->nwait > 0) return;
    *relook = -1;
    if (e == -1) safe_poll_all(c, list, q);
}

/* The kind's start: the child may have exited already (its SIGCHLD then found nothing to
 * deliver): check now, deliver on the attached loop. */
static int safe_start(ca__wcore *c, ca__wadd *a, ca__wlog *q)
{
    ca__wreg_check_exited(c, a->r, q);
    return 0;
}

static const ca__wkind safe_kind = {
    .name = "safe",
    .flags = CA__WKIND_KEEP_LOOP,
    .begin = ca__wattach_add_begin,
    .start = safe_start,
    .attach_loop = ca__wattach_attach_op,
    .is_active = ca__wattach_is_active_op,
    .close = ca__wattach_close_op,
};

int ca_safe_child_watcher_new(ca_child_watcher **out)
{
    int err = ca__wattach_watcher_new(&safe_kind, safe_reap, out);
    if (err == 0) ca__wcore_of(*out)->track_wait = true;
    return err;
}
