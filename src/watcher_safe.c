/*
 * SafeChildWatcher: SIGCHLD through the attached loop's signal handler (asyncio attaches the
 * main thread's loop), and on each SIGCHLD waitpid(pid, WNOHANG) for every registered pid:
 * O(n) per signal, but it never reaps a child that is not registered, so other code's waitpid()
 * and system() keep working. Callbacks run on the attached loop's thread.
 *
 * This file also holds the attachment logic that Fast shares (ca__wattach_*): a SIGCHLD handler
 * on the attached loop, whose argument is the loop's binding; attach/detach from the loop's own
 * thread (or while it does not run), since signal handlers are the loop's thread's business.
 */
#include "internal.h"
#include "watcher_internal.h"

#include <signal.h>
#include <stdlib.h>

static ca__wattach *att(ca__wcore *c) { return (ca__wattach *)c->impl; }

bool ca__wattach_active(ca__wcore *c)
{
    ca__wattach *a = att(c);
    return !c->closed && a->loop && a->bind && a->bind->loop && !ca_loop_is_closed(a->loop);
}

/* How long a registered child that other code reaped (waitpid says ECHILD) may stay unnoticed
 * by Safe: the poll of every child that finds it runs at the latest this long after the
 * SIGCHLD whose handling skipped it. */
#define RESCAN_DELAY 0.1

enum { REAP_SIGNAL, REAP_CHECK, REAP_RESCAN };

static void rescan_cb(void *arg);

/* SIGCHLD arrived (or a check or a deferred poll was asked for): reap on the attached loop's
 * thread. */
static void reap_now(ca__wbind *b, int why)
{
    ca__wcore *c = b->core;
    ca__wreg *list = NULL;
    ca__wlog q = {0};
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
    if (!c->closed && att(c)->bind == b) {
        bool later = att(c)->reap(c, why != REAP_SIGNAL, &list, &q);
        if (later && !b->rescan_posted && b->loop) {
            b->rescan_posted = true;
            b->refs++;
            if (ca_loop_call_later(b->loop, RESCAN_DELAY, rescan_cb, b, NULL) < 0) {
                /* No timer: poll every child now rather than maybe never. */
                b->rescan_posted = false;
                b->refs--;
                att(c)->reap(c, true, &list, &q);
            }
        }
    }
    ca__wbind_put(b);
    ca__wcore_unlock(c);
    ca__wlog_flush(&q);
    ca__wdeliver_list(c, list);
    ca__wcore_unref(c);
}

static void sigchld_cb(void *arg) { reap_now(arg, REAP_SIGNAL); }
static void check_cb(void *arg) { reap_now(arg, REAP_CHECK); }
static void rescan_cb(void *arg) { reap_now(arg, REAP_RESCAN); }

/* Detaches b (lock held): removes our SIGCHLD handler from its loop, if this thread may. */
static int detach_bind(ca__wbind *b, ca_loop *loop, bool force)
{
    if (b->sig_registered) {
        int err = ca_loop_remove_signal_handler(loop, SIGCHLD);
        if (err < 0 && !force) return err;
        /* When forced (close) and refused (-EPERM: the loop runs in another thread), the
         * handler stays until that loop closes; it finds the watcher closed and does nothing. */
        if (err >= 0) b->sig_registered = false;
    }
    ca__wbind_put(b); /* the attachment's reference */
    return 0;
}

int ca__wattach_attach(ca__wcore *c, ca_loop *loop)
{
    ca__wattach *a = att(c);
    if (loop && ca_loop_is_closed(loop)) return -EBADF;
    if (loop) ca__sigchld_keep_acquire(); /* before our handler replaces a SIG_IGN */
    ca__wcore_lock(c);
    ca_loop *old = a->loop;
    if (loop == old || c->closed) {
        int r = c->closed ? -EBADF : 0; /* closed while this call was on its way in */
        ca__wcore_unlock(c);
        if (loop) ca__sigchld_keep_release();
        return r;
    }
    int err = 0;
    ca__wbind *nb = NULL;
    if (loop) {
        err = ca__wbind_get(c, loop, &nb);
        if (err == 0) {
            nb->refs++; /* the attachment's */
            err = ca_loop_add_signal_handler(loop, SIGCHLD, sigchld_cb, nb);
            if (err < 0) ca__wbind_put(nb);
            else nb->sig_registered = true;
        }
    }
    if (err == 0 && old) {
        err = detach_bind(a->bind, old, false);
        if (err < 0 && nb) {
            ca_loop_remove_signal_handler(loop, SIGCHLD);
            nb->sig_registered = false;
            ca__wbind_put(nb);
        }
    }
    if (err < 0) {
        ca__wcore_unlock(c);
        if (loop) ca__sigchld_keep_release();
        return err;
    }
    a->loop = loop ? ca_loop_ref(loop) : NULL;
    a->bind = nb;
    /* A child may have exited during the switch (asyncio's "prevent a race condition"): check
     * every registered child once, on the new loop. */
    if (nb && !nb->check_posted) {
        nb->check_posted = true;
        nb->refs++;
        if (ca_loop_call_soon_threadsafe(loop, check_cb, nb) < 0) {
            nb->check_posted = false;
            nb->refs--;
        }
    }
    ca__wcore_unlock(c);
    /* After the lock: the last reference may close the old loop, whose hooks take it. */
    if (old) {
        ca_loop_unref(old);
        ca__sigchld_keep_release();
    }
    return 0;
}

/* The ops Safe and Fast share. */
int ca__wattach_remove_op(ca_child_watcher *w, pid_t pid)
{
    ca__wcore *c = ca__wcore_of(w);
    ca__wcore_lock(c);
    ca__wreg *r = ca__wtable_get(c, pid);
    bool found = r && r->state != CA__W_ZOMBIE;
    if (found) ca__wreg_unregister(c, r);
    ca__wcore_unlock(c);
    return found;
}

int ca__wattach_attach_op(ca_child_watcher *w, ca_loop *loop)
{
    return ca__wattach_attach(ca__wcore_of(w), loop);
}

bool ca__wattach_is_active_op(ca_child_watcher *w)
{
    ca__wcore *c = ca__wcore_of(w);
    ca__wcore_lock(c);
    bool on = ca__wattach_active(c);
    ca__wcore_unlock(c);
    return on;
}

int ca__wattach_close_op(ca_child_watcher *w) { return ca__wattach_close(ca__wcore_of(w)); }

int ca__wattach_watcher_new(const ca_child_watcher_ops *ops, const char *kind,
                            bool (*reap)(ca__wcore *c, bool full, ca__wreg **list, ca__wlog *q),
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
    err = ca__child_watcher_make(ops, kind, c, out);
    if (err < 0) ca__wcore_unref(c);
    return err;
}

int ca__wattach_close(ca__wcore *c)
{
    ca__wattach *a = att(c);
    ca__wcore_lock(c);
    c->closed = true;
    ca__wcore_cancel_all(c);
    ca_loop *old = a->loop;
    if (old) detach_bind(a->bind, old, true);
    a->loop = NULL;
    a->bind = NULL;
    ca__wcore_unlock(c);
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

/* The exited children that ca__wreap_next shows, reaped while they are registered ones. */
static bool safe_reap_exited(ca__wcore *c, ca__wreg **list, ca__wlog *q)
{
    for (;;) {
        ca__wreg *r;
        int rc;
        bool echild;
        int e = ca__wreap_next(c, &r, &rc, &echild);
        if (e <= 0) return e == 0;
        if (echild)
            ca__wlog_add(q, CA_LOG_WARNING,
                         "Unknown child process pid %d, will report returncode 255", (int)r->pid);
        ca__wreg_take_into(c, r, rc, list);
    }
}

/* On SIGCHLD, exits are found with safe_reap_exited. What only the poll of every child finds
 * is a registered child that other code reaped (ECHILD: returncode 255, as asyncio reports it):
 * that poll runs when safe_reap_exited cannot settle the signal, and otherwise at the latest
 * RESCAN_DELAY after it (we return true: the caller arms a timer), at most once per delay. */
static bool safe_reap(ca__wcore *c, bool full, ca__wreg **list, ca__wlog *q)
{
    if (c->nwait == 0) return false;
    if (!full && safe_reap_exited(c, list, q)) return c->nwait > 0;
    safe_poll_all(c, list, q);
    return false;
}

static int safe_add_impl(ca_child_watcher *w, pid_t pid, ca_child_fn cb, void *arg,
                         bool internal)
{
    ca__wcore *c = ca__wcore_of(w);
    ca__wlog q = {0};
    int err = 0;
    ca__wcore_lock(c);
    ca__wreg *r = ca__wtable_get_live(c, pid);
    if (c->closed) {
        err = -EBADF; /* closed while this call was on its way in */
    } else if (!ca__wattach_active(c)) {
        err = -ENOTCONN;
    } else if (r) {
        ca__wreg_replace(c, r, cb, arg, internal);
    } else {
        err = ca__wreg_register(c, pid, cb, arg, att(c)->bind, &r);
        if (err == 0) {
            r->internal = internal;
            /* It may have exited already: check now, deliver on the attached loop. */
            int rc = 0;
            int e = ca__wait_nohang(pid, &rc);
            if (e == 1) ca__wreg_exited(c, r, rc, false, &q);
            else if (e == -ECHILD) ca__wreg_exited(c, r, 255, true, &q);
        }
    }
    ca__wcore_unlock(c);
    ca__wlog_flush(&q);
    return err;
}

static int safe_add(ca_child_watcher *w, pid_t pid, ca_child_fn cb, void *arg)
{
    return safe_add_impl(w, pid, cb, arg, false);
}

static int safe_add_internal(ca_child_watcher *w, pid_t pid, ca_child_fn cb, void *arg)
{
    return safe_add_impl(w, pid, cb, arg, true);
}

static const ca_child_watcher_ops safe_ops = {
    .add_child_handler = safe_add,
    .remove_child_handler = ca__wattach_remove_op,
    .attach_loop = ca__wattach_attach_op,
    .is_active = ca__wattach_is_active_op,
    .close = ca__wattach_close_op,
    .enter = NULL,
    .exit = NULL,
    .destroy = ca__wcore_destroy_op,
};

int ca_safe_child_watcher_new(ca_child_watcher **out)
{
    int err = ca__wattach_watcher_new(&safe_ops, "safe", safe_reap, out);
    if (err == 0) {
        ca__wcore_of(*out)->track_wait = true;
        (*out)->add_internal = safe_add_internal;
    }
    return err;
}
