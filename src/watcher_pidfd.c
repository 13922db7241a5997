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
 * running), so add_child_handler gives -EPERM from any other thread. Readers are added and
 * removed without our lock (a host's add_reader may hand its own lock to another thread): an
 * add marks the registration rd_adding while it calls add_reader, and a remove or close in
 * between leaves the release to it (rd_release_wanted); a removal is marked rd_releasing while
 * it is queued, posted (release_cb) or under way, and the fd stays r->pidfd until it is done.
 * A reader is taken off directly only by the loop's home thread (ca__loop_home_thread: the
 * thread running it, or while it is not running the thread that ran it last, or any thread for
 * a host loop no C thread runs); others post the removal (release_cb), since a loop run in
 * bursts may start again at any moment. A removal queued while the loop was not running may
 * still find it running in another thread by the time it is made (remove_reader says -EPERM):
 * it is then posted there, as one from another thread is, and the reader keeps its reference
 * until it is really off (else the loop would call pidfd_ready with a registration freed by the
 * give-back). remove_child_handler
 * and close work from any thread: the registration is cancelled at once (the callback is never
 * called) and the fd is released on the loop's thread. A removed child is not reaped: whoever
 * removed it reaps it (asyncio's subprocess transport does so when its loop closes).
 *
 * Lent pidfds. A subprocess (process.c) already holds a pidfd from its spawn; it lends it to us
 * rather than giving us a copy, which would cost a second fd per child (and every open fd makes
 * every later spawn dearer: clone copies the fd table). Both sides use the one fd until each is
 * done with it, and it is closed exactly once, after both:
 *   - we are done when the reader is removed (release_begin, then the removal as a queued op,
 *     release_done after it): at the exit, on remove or close
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

static int sys_pidfd_open(pid_t pid)
{
#ifdef SYS_pidfd_open
    return (int)syscall(SYS_pidfd_open, pid, 0);
#else
    errno = ENOSYS;
    return -1;
#endif
}

/* Ends r's release once its reader is off (or was never put on): closes the fd unless it is
 * lent and still in use by its owner (see the top of the file), drops the reader's reference.
 * Lock held. */
static void release_done(ca__wcore *c, ca__wreg *r)
{
    if (r->pidfd < 0) return;
    if (!r->pidfd_lent) close(r->pidfd);
    r->pidfd = -1;
    r->pidfd_lent = false;
    r->rd_on = false;
    r->rd_releasing = false;
    ca__wreg_unref(c, r); /* the reader's reference */
}

/* Starts releasing r's fd (lock held). No reader on it: done at once. Otherwise the reader's
 * removal is a loop op, made after the unlock: queued on q if this thread may use the loop, or
 * posted to the loop's thread (release_cb). rd_releasing says that one is on its way; an add
 * still calling add_reader is asked to release when it is done. */
static void release_begin(ca__wcore *c, ca__wreg *r, ca__wlog *q)
{
    if (r->pidfd < 0 || r->rd_releasing) return;
    if (r->rd_adding) {
        r->rd_release_wanted = true;
        return;
    }
    ca_loop *loop = r->bind ? r->bind->loop : NULL;
    if (!r->rd_on || !loop) {
        release_done(c, r);
        return;
    }
    r->rd_releasing = true;
    if (ca__loop_home_thread(loop)) {
        ca__wlog_op(q, c, r, CA__OP_RELEASE, loop, true);
    } else {
        r->posted = true;
        ca__wreg_ref(r); /* the post's */
        ca__wlog_op(q, c, r, CA__OP_POST_RELEASE, loop, true);
    }
}

static void release_cb(void *arg);

void ca__pidfd_op(ca__wcore *c, ca__wreg *r, int op, ca_loop *loop)
{
    if (op == CA__OP_POST_RELEASE) {
        int err = loop ? ca_loop_call_soon_threadsafe(loop, release_cb, r) : -EBADF;
        if (err == 0) return;
        ca__wcore_lock(c);
        if (r->posted) {
            /* Not posted, and no close hook took it over (it clears posted): whoever comes
             * next on the loop's thread (the reader firing, the loop's close hook) releases. */
            r->posted = false;
            r->rd_releasing = false;
            ca__wreg_unref(c, r); /* the post's */
        }
        ca__wcore_unlock(c);
        return;
    }
    /* CA__OP_RELEASE: the fd stays r->pidfd until release_done, so a give_back in between
     * hands it to us instead of closing it under the reader. */
    ca__wcore_lock(c);
    int fd = r->pidfd;
    ca__wcore_unlock(c);
    int err = loop && fd >= 0 ? ca_loop_remove_reader(loop, fd) : 0;
    ca__wcore_lock(c);
    if (err == -EPERM && r->pidfd == fd && r->rd_releasing && !r->posted) {
        /* The removal was queued in this thread while the loop was not running, and another
         * thread has started running it since: the reader is still on it, and only that
         * thread may take it off. The reader keeps its reference (pidfd_ready may still be
         * called with r, in that loop's very next iteration) and the release goes there, as
         * a remove from another thread's does; release_done now would free r under the
         * reader once the loan is given back. */
        r->posted = true;
        ca__wreg_ref(r); /* the post's */
        ca__wcore_unlock(c);
        ca__pidfd_op(c, r, CA__OP_POST_RELEASE, loop);
        return;
    }
    release_done(c, r);
    ca__wcore_unlock(c);
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
    if (r->pidfd >= 0 && r->registered && !r->rd_releasing) {
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
            release_begin(c, r, &q);
            call = ca__wreg_take(c, r, &cb, &cbarg);
        }
    } else if (!r->registered) {
        /* Removed from another thread; its release is on the way (or this is it). */
        release_begin(c, r, &q);
    }
    ca__wreg_unref(c, r);
    ca__wbind_put(b);
    ca__wcore_unlock(c);
    ca__wlog_flush(&q);
    ca__wcore_unref(c);
    if (call) cb(pid, rc, cbarg);
}

/* Posted by remove/close from another thread: the reader comes off here, on its loop. */
static void release_cb(void *arg)
{
    ca__wreg *r = arg;
    ca__wcore *c = r->core;
    ca__wlog q = {0};
    ca__wcore_ref(c);
    ca__wcore_lock(c);
    ca__wbind *b = r->bind;
    b->refs++;
    r->posted = false;
    if (r->rd_releasing && r->pidfd >= 0 && b->loop) {
        ca__wlog_op(&q, c, r, CA__OP_RELEASE, b->loop, true);
    } else {
        r->rd_releasing = false;
        release_begin(c, r, &q);
    }
    ca__wreg_unref(c, r); /* the post's */
    ca__wbind_put(b);
    ca__wcore_unlock(c);
    ca__wlog_flush(&q);
    ca__wcore_unref(c);
}

/* Cancels r and starts releasing its fd. Lock held. While its add is still calling add_reader
 * (rd_adding), r stays in the table and the add does both when it is done: the add then fails
 * (closed watcher) or returns with the handler removed, and no drop call comes before the add
 * returned. */
static void pidfd_cancel(ca__wcore *c, ca__wreg *r, ca__wlog *q)
{
    if (r->rd_adding) {
        r->rd_cancel_wanted = true;
        r->rd_release_wanted = true;
        return;
    }
    ca__wreg_unregister(c, r);
    release_begin(c, r, q);
}

/* Its loop is closing, in this thread (it runs nothing any more): the fd goes. The registration
 * stays (remove answers 1 for it: the child's owner, such as the subprocess code in its own
 * close hook, then reaps it). A removal posted to this loop will never run: the hook takes it
 * over (bind_hook drops the post's reference after this); one queued in another thread (loop
 * not running there) is left to it. */
static void pidfd_loop_closed(ca__wcore *c, ca__wreg *r, ca_loop *loop, ca__wlog *q)
{
    if (r->registered && r->state == CA__W_WAITING && r->pidfd >= 0) {
        ca__wlog_add(q, CA_LOG_DEBUG,
                     "Loop that handles pid %d is closed while the child runs: "
                     "its exit will not be reported",
                     (int)r->pid);
        r->pidfd_lost = true;
    }
    if (r->pidfd < 0) return;
    if (r->rd_adding) {
        r->rd_release_wanted = true;
    } else if (!r->rd_on) {
        release_done(c, r);
    } else if (!r->rd_releasing || r->posted) {
        r->rd_releasing = true;
        ca__wreg_ref(r); /* the hook list's */
        r->hnext = q->hook_rel;
        q->hook_rel = r;
        q->core = c;
    }
}

static void pidfd_reg_free(ca__wreg *r)
{
    /* Only in a forked child (elsewhere the reader's reference keeps r while it has an fd). */
    if (r->pidfd >= 0 && !r->pidfd_lent) close(r->pidfd);
}

/* The kind's start (lock held): watches the new registration with a pidfd of our own, opened
 * here, or with the subprocess's (a->lent, a loan: the loan's reference to the registration
 * goes to *a->lease). The reader is added by pidfd_finish, after the unlock (a loop op); a
 * remove in between finds rd_adding and leaves the release to it. */
static int pidfd_start(ca__wcore *c, ca__wadd *a, ca__wlog *q)
{
    ca__wreg *r = a->r;
    int pidfd = a->lent;
    if (pidfd < 0) {
        pidfd = sys_pidfd_open(a->pid);
        if (pidfd < 0 && errno != ESRCH) {
            int err = -errno;
            ca__wreg_unregister_quiet(c, r); /* the caller learns it from err */
            return err;
        }
    }
    if (pidfd < 0) {
        /* ESRCH: already reaped by someone else. Reported through the loop, as an exit. */
        ca__wreg_exited(c, r, 255, true, q);
        return 0;
    }
    r->pidfd = pidfd;
    r->pidfd_lent = a->lent >= 0;
    r->rd_adding = true;
    ca__wreg_ref(r); /* the reader's */
    ca__wreg_ref(r); /* ours, across the unlock */
    a->kfd = pidfd;
    return CA__WSTART_FINISH;
}

/* The kind's finish (lock NOT held): adds the reader, then settles what happened meanwhile. */
static int pidfd_finish(ca__wcore *c, ca__wadd *a, ca__wlog *q)
{
    ca__wreg *r = a->r;
    int pidfd = a->kfd;
    int err = ca_loop_add_reader(a->loop, pidfd, pidfd_ready, r);
    ca__wcore_lock(c);
    r->rd_adding = false;
    if (err < 0) {
        r->pidfd = -1;
        r->pidfd_lent = false;
        r->rd_release_wanted = false;
        ca__wreg_unref(c, r); /* the reader's */
        ca__wreg_unregister_quiet(c, r); /* the caller learns it from err */
    } else if (r->rd_cancel_wanted) {
        /* Removed, or the watcher closed, while we added: done now, quietly (no drop call
         * before this add returns), the reader off again before we return (q). Nothing is
         * lent; our own fd is closed by the release, not below. */
        ca__wreg_unregister_quiet(c, r);
        if (c->closed) err = -EBADF;
        r->rd_on = true;
        r->rd_release_wanted = false;
        release_begin(c, r, q);
        pidfd = -1;
    } else {
        r->rd_on = true;
        if (a->lent >= 0) {
            ca__wreg_ref(r); /* the loan's */
            *a->lease = r;
        }
        if (r->rd_release_wanted) { /* its loop closed meanwhile */
            r->rd_release_wanted = false;
            release_begin(c, r, q);
        }
    }
    r->rd_cancel_wanted = false;
    ca__wreg_unref(c, r); /* ours */
    ca__wcore_unlock(c);
    if (err < 0 && pidfd >= 0 && a->lent < 0) close(pidfd);
    return err;
}

static int pidfd_close(ca_child_watcher *w)
{
    ca__wcore *c = ca__wcore_of(w);
    ca__wlog q = {0};
    ca__wcore_lock(c);
    c->closed = true;
    for (size_t i = 0; i < c->cap;) {
        ca__wreg *r = c->slots[i];
        if (!r) {
            i++;
            continue;
        }
        ca__wreg_ref(r);
        bool adding = r->rd_adding;
        pidfd_cancel(c, r, &q); /* takes r out of slot i, unless its add finishes it */
        ca__wreg_unref(c, r);
        if (adding) i++;
    }
    ca__wcore_retry_clear(c); /* adds in flight (still in the table) see closed themselves */
    bool keep = c->keeps_sigchld;
    c->keeps_sigchld = false;
    ca__wcore_unlock(c);
    ca__wlog_flush(&q);
    if (keep) ca__sigchld_keep_release();
    return 0;
}

static const ca__wkind pidfd_kind = {
    .name = "pidfd",
    .flags = CA__WKIND_OWN_THREAD | CA__WKIND_KEEP_LOOP,
    .start = pidfd_start,
    .finish = pidfd_finish,
    .cancel = pidfd_cancel,
    .loop_closed = pidfd_loop_closed,
    .reg_free = pidfd_reg_free,
    .close = pidfd_close,
};

int ca__pidfd_watcher_lend_on(ca_child_watcher *w, ca_loop *loop, pid_t pid, int pidfd,
                              ca_child_fn cb, void *arg, ca__wreg **lease)
{
    if (!ca__child_watcher_is_builtin(w, &pidfd_kind)) return -ENOTSUP;
    if (!cb || pid <= 0 || pidfd < 0 || !lease) return -EINVAL;
    if (ca__child_watcher_forked(w)) return -ECHILD;
    if (atomic_load(&w->closed)) return -EBADF;
    *lease = NULL;
    ca__wadd a = {.pid = pid, .cb = cb, .arg = arg, .internal = true, .lent = pidfd,
                  .lease = lease};
    return ca__wcore_add(w, loop, &a);
}

int ca__pidfd_watcher_lend(ca_child_watcher *w, pid_t pid, int pidfd, ca_child_fn cb, void *arg,
                           ca__wreg **lease)
{
    return ca__pidfd_watcher_lend_on(w, NULL, pid, pidfd, cb, arg, lease);
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
    err = ca__child_watcher_make(&pidfd_kind, c, out);
    if (err < 0) {
        ca__wcore_unref(c);
        return err;
    }
    c->keeps_sigchld = true;
    ca__sigchld_keep_acquire();
    return 0;
}
