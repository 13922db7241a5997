/*
 * PidfdChildWatcher: pidfd_open(pid) and a reader on the delivery loop; when the pidfd becomes
 * readable the child has exited, and waitid(P_PIDFD, WNOHANG) reaps it on the loop's thread,
 * where the callback is then called. No signals, no threads, O(1) per exit, one fd per child.
 *
 * Kernel notes: pidfd_open needs Linux 5.3 and waitid(P_PIDFD) 5.4 (we test for the first once
 * and answer -ENOSYS without it). A pidfd is always close-on-exec. pidfd_open works on a zombie
 * (the process exists until it is reaped), so a child that exited before its handler was added
 * is seen at once; ESRCH means somebody else reaped it already, which we report as returncode
 * 255, as the other watchers do for ECHILD. EMFILE/ENFILE (one fd per child) and EPERM (seccomp
 * filters that forbid pidfd_open) are returned to the caller: the child is then not watched.
 *
 * Threads: the reader must be added on the delivery loop's thread (or while that loop is not
 * running), so add_child_handler gives -EPERM from any other thread. remove_child_handler and
 * close work from any thread: the registration is cancelled at once (the callback is never
 * called) and the fd is released on the loop's thread. A removed child is not reaped: whoever
 * removed it reaps it (asyncio's subprocess transport does so when its loop closes).
 *
 * Lent pidfds. A subprocess (process.c) already holds a pidfd from its spawn; it lends it to us
 * rather than giving us a copy, which would cost a second fd per child (and every open fd makes
 * every later spawn dearer: clone copies the fd table). Both sides use the one fd until each is
 * done with it, and it is closed exactly once, after both:
 *   - we are done when the reader is removed (pidfd_release): at the exit, on remove or close
 *     (on the delivery loop's thread, possibly later through release_cb), or when the delivery
 *     loop closes. We never close a lent fd ourselves while the loan runs;
 *   - the subprocess is done when its exit is known, its loop closes, or it is freed. It then
 *     gives the fd back (ca__pidfd_watcher_give_back): under our lock, if the reader is already
 *     off, the subprocess closes it; if not (its removal is posted to a delivery loop in another
 *     thread, or that loop never ran since), the fd becomes ours and pidfd_release closes it
 *     right after removing the reader.
 * The lock orders the two, so the fd is never closed with the reader on it: the number cannot
 * be taken by another file while our reader (or a posted remove_reader) still names it. The
 * loan holds a reference to the registration (and through its binding, to the core), so that
 * give_back finds it after it left the pid table. In a forked child neither side closes a lent
 * fd: the subprocess leaves its fds alone there, as the parent's, and so do we.
 */
#include "internal.h"
#include "watcher_internal.h"

#include <pthread.h>
#include <signal.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#ifndef P_PIDFD
#define P_PIDFD 3
#endif

static int sys_pidfd_open(pid_t pid)
{
#ifdef SYS_pidfd_open
    return (int)syscall(SYS_pidfd_open, pid, 0);
#else
    errno = ENOSYS;
    return -1;
#endif
}

/* Stops watching r's pidfd and closes it, unless it is lent and still in use by its owner (see
 * the top of the file). Lock held; on loop's thread (or while the loop does not run, or is
 * closing). */
static void pidfd_release(ca__wcore *c, ca__wreg *r, ca_loop *loop)
{
    if (r->pidfd < 0) return;
    if (loop) ca_loop_remove_reader(loop, r->pidfd);
    if (!r->pidfd_lent) close(r->pidfd);
    r->pidfd = -1;
    r->pidfd_lent = false;
    ca__wreg_unref(c, r); /* the reader's reference */
}

static void pidfd_ready(void *arg)
{
    ca__wreg *r = arg;
    ca__wcore *c = r->core;
    ca__wlog q = {0};
    ca_child_fn cb = NULL;
    void *cbarg = NULL;
    pid_t pid = r->pid;
    int rc = 0;
    bool call = false;
    ca__wcore_ref(c);
    ca__wcore_lock(c);
    ca__wbind *b = r->bind;
    b->refs++;
    ca__wreg_ref(r);
    if (r->pidfd >= 0 && r->registered) {
        siginfo_t info = {0};
        int e;
        do {
            e = waitid((idtype_t)P_PIDFD, (id_t)r->pidfd, &info, WEXITED | WNOHANG);
        } while (e < 0 && errno == EINTR);
        bool echild = e < 0;
        if (echild || info.si_pid != 0) {
            if (echild) rc = 255;
            else if (info.si_code == CLD_EXITED) rc = info.si_status;
            else rc = -info.si_status;
            if (echild)
                ca__wlog_add(&q, CA_LOG_WARNING,
                             "child process pid %d exit status already read: "
                             "will report returncode 255",
                             (int)pid);
            pidfd_release(c, r, b->loop);
            call = ca__wreg_take(c, r, &cb, &cbarg);
        }
    } else {
        /* Removed from another thread; its release is on the way, do it now. */
        pidfd_release(c, r, b->loop);
    }
    ca__wreg_unref(c, r);
    ca__wbind_put(b);
    ca__wcore_unlock(c);
    ca__wlog_flush(&q);
    ca__wcore_unref(c);
    if (call) cb(pid, rc, cbarg);
}

/* Posted by remove/close from another thread. */
static void release_cb(void *arg)
{
    ca__wreg *r = arg;
    ca__wcore *c = r->core;
    ca__wcore_ref(c);
    ca__wcore_lock(c);
    ca__wbind *b = r->bind;
    b->refs++;
    r->posted = false;
    pidfd_release(c, r, b->loop);
    ca__wreg_unref(c, r);
    ca__wbind_put(b);
    ca__wcore_unlock(c);
    ca__wcore_unref(c);
}

/* Cancels r and releases its fd now if this thread may, else on its loop. Lock held. */
static void pidfd_cancel(ca__wcore *c, ca__wreg *r)
{
    ca__wreg_unregister(c, r);
    if (r->pidfd < 0) return;
    ca__wbind *b = r->bind;
    if (!b->loop || ca__loop_in_own_thread(b->loop)) {
        pidfd_release(c, r, b->loop);
    } else if (!r->posted) {
        r->posted = true;
        ca__wreg_ref(r);
        if (ca_loop_call_soon_threadsafe(b->loop, release_cb, r) < 0) {
            /* The loop is closing: its close hook releases the fd. */
            r->posted = false;
            ca__wreg_unref(c, r);
        }
    }
}

/* Its loop is closing: the fd goes. The registration stays (remove answers 1 for it: the
 * child's owner, such as the subprocess code in its own close hook, then reaps it). */
static void pidfd_loop_closed(ca__wcore *c, ca__wreg *r, ca_loop *loop, ca__wlog *q)
{
    if (r->registered && r->state == CA__W_WAITING && r->pidfd >= 0) {
        ca__wlog_add(q, CA_LOG_DEBUG,
                     "Loop that handles pid %d is closed while the child runs: "
                     "its exit will not be reported",
                     (int)r->pid);
        r->pidfd_lost = true;
    }
    pidfd_release(c, r, loop);
}

static void pidfd_reg_free(ca__wreg *r)
{
    /* Only in a forked child (elsewhere the reader's reference keeps r while it has an fd). */
    if (r->pidfd >= 0 && !r->pidfd_lent) close(r->pidfd);
}

/* Watches pid. lent < 0: with a pidfd of our own, opened here. lent >= 0: with that pidfd,
 * borrowed from a subprocess; the loan (a reference to the registration) goes to *lease, which
 * stays NULL if an earlier registration for pid, with its own fd, was kept instead. */
static int pidfd_add(ca_child_watcher *w, pid_t pid, int lent, ca_child_fn cb, void *arg,
                     bool internal, ca__wreg **lease)
{
    ca__wcore *c = ca__wcore_of(w);
    ca_loop *loop;
    int err = ca__watcher_delivery_loop(&loop);
    if (err == 0 && !ca__loop_in_own_thread(loop)) err = -EPERM;
    if (err < 0) return err;
    ca__wlog q = {0};
    ca__wcore_lock(c);
    if (c->closed) { /* closed while this call was on its way in */
        ca__wcore_unlock(c);
        return -EBADF;
    }
    ca__wreg *r = ca__wtable_get_live(c, pid);
    if (r) {
        ca__wreg_replace(c, r, cb, arg, internal);
        ca__wcore_unlock(c);
        return 0;
    }
    ca__wbind *b;
    int pidfd = lent;
    err = ca__wbind_get(c, loop, &b);
    if (err == 0 && pidfd < 0) {
        pidfd = sys_pidfd_open(pid);
        if (pidfd < 0 && errno != ESRCH) err = -errno;
    }
    if (err == 0) err = ca__wreg_register(c, pid, cb, arg, b, &r);
    if (err == 0) r->internal = internal;
    if (err == 0 && pidfd >= 0) {
        r->pidfd = pidfd;
        r->pidfd_lent = lent >= 0;
        ca__wreg_ref(r); /* the reader's */
        err = ca_loop_add_reader(loop, pidfd, pidfd_ready, r);
        if (err < 0) {
            r->pidfd = -1;
            r->pidfd_lent = false;
            ca__wreg_unref(c, r);
            ca__wreg_unregister_quiet(c, r); /* the caller learns it from err */
        } else if (lent >= 0) {
            ca__wreg_ref(r); /* the loan's */
            *lease = r;
        }
    } else if (err == 0) {
        /* ESRCH: already reaped by someone else. Reported through the loop, as an exit. */
        ca__wreg_exited(c, r, 255, true, &q);
    }
    ca__wcore_unlock(c);
    ca__wlog_flush(&q);
    if (err < 0 && pidfd >= 0 && lent < 0) close(pidfd);
    return err;
}

static int pidfd_add_handler(ca_child_watcher *w, pid_t pid, ca_child_fn cb, void *arg)
{
    return pidfd_add(w, pid, -1, cb, arg, false, NULL);
}

static int pidfd_add_internal(ca_child_watcher *w, pid_t pid, ca_child_fn cb, void *arg)
{
    return pidfd_add(w, pid, -1, cb, arg, true, NULL);
}

static int pidfd_remove(ca_child_watcher *w, pid_t pid)
{
    ca__wcore *c = ca__wcore_of(w);
    ca__wcore_lock(c);
    ca__wreg *r = ca__wtable_get(c, pid);
    if (r) {
        ca__wreg_ref(r);
        pidfd_cancel(c, r);
        ca__wreg_unref(c, r);
    }
    ca__wcore_unlock(c);
    return r != NULL;
}

static bool pidfd_is_active(ca_child_watcher *w) { return true; }

static int pidfd_close(ca_child_watcher *w)
{
    ca__wcore *c = ca__wcore_of(w);
    ca__wcore_lock(c);
    c->closed = true;
    for (size_t i = 0; i < c->cap;) {
        ca__wreg *r = c->slots[i];
        if (!r) {
            i++;
            continue;
        }
        ca__wreg_ref(r);
        pidfd_cancel(c, r); /* takes r out of slot i */
        ca__wreg_unref(c, r);
    }
    bool keep = c->keeps_sigchld;
    c->keeps_sigchld = false;
    ca__wcore_unlock(c);
    if (keep) ca__sigchld_keep_release();
    return 0;
}

static const ca_child_watcher_ops pidfd_ops = {
    .add_child_handler = pidfd_add_handler,
    .remove_child_handler = pidfd_remove,
    .attach_loop = NULL,
    .is_active = pidfd_is_active,
    .close = pidfd_close,
    .enter = NULL,
    .exit = NULL,
    .destroy = ca__wcore_destroy_op,
};

int ca__pidfd_watcher_lend(ca_child_watcher *w, pid_t pid, int pidfd, ca_child_fn cb, void *arg,
                           ca__wreg **lease)
{
    if (!w || w->ops != &pidfd_ops) return -ENOTSUP;
    if (!cb || pid <= 0 || pidfd < 0 || !lease) return -EINVAL;
    if (ca__child_watcher_forked(w)) return -ECHILD;
    if (atomic_load(&w->closed)) return -EBADF;
    *lease = NULL;
    return pidfd_add(w, pid, pidfd, cb, arg, true, lease);
}

void ca__pidfd_watcher_give_back(ca__wreg *r, int pidfd)
{
    ca__wcore *c = r->core; /* alive: r holds its binding, which holds the core */
    ca__wcore_ref(c);
    ca__wcore_lock(c);
    /* Still under the reader (its removal is on its way to the delivery loop's thread, or that
     * loop has not run since): the fd is ours now, pidfd_release closes it. */
    bool ours = r->pidfd >= 0 && r->pidfd == pidfd && r->pidfd_lent;
    if (ours) r->pidfd_lent = false;
    ca__wreg_unref(c, r); /* the loan's */
    ca__wcore_unlock(c);
    ca__wcore_unref(c);
    if (!ours && pidfd >= 0) close(pidfd); /* the reader is off it: the subprocess's to close */
}

static atomic_int pidfd_support; /* 0 unknown, 1 yes, -1 no */

int ca_pidfd_child_watcher_new(ca_child_watcher **out)
{
    if (!out) return -EINVAL;
    int s = atomic_load(&pidfd_support);
    if (s == 0) {
        int fd = sys_pidfd_open(getpid());
        if (fd >= 0) {
            close(fd);
            s = 1;
        } else if (errno == ENOSYS) {
            s = -1;
        }
        if (s) atomic_store(&pidfd_support, s);
    }
    if (s < 0) return -ENOSYS;
    ca__wcore *c;
    int err = ca__wcore_new(&c);
    if (err < 0) return err;
    c->reg_loop_closed = pidfd_loop_closed;
    c->reg_free = pidfd_reg_free;
    c->reg_cancel = pidfd_cancel;
    err = ca__child_watcher_make(&pidfd_ops, "pidfd", c, out);
    if (err < 0) {
        ca__wcore_unref(c);
        return err;
    }
    (*out)->add_internal = pidfd_add_internal;
    c->keeps_sigchld = true;
    ca__sigchld_keep_acquire();
    return 0;
}
