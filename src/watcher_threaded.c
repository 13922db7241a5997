/*
 * ThreadedChildWatcher: one detached waiting thread per child, blocked in waitpid(pid). The
 * thread only reaps; the exit is posted to the delivery loop with call_soon_threadsafe and the
 * callback runs there, as in asyncio 3.11.
 *
 * Making a thread cheap: a 32 KiB stack (the thread runs waitpid and a few small functions; the
 * pages it never touches cost no memory), every signal blocked so that no signal handler ever
 * runs on that small stack, a name after the pid for debuggers ("ca-wait-12345"). Under the
 * sanitizers the stack is larger: their instrumentation needs it.
 *
 * The thread holds a reference to the watcher's core and to its registration, so a watcher
 * closed or freed while children run is safe: close cancels the registrations (their callbacks
 * are never called) and the threads end, quietly, when their child exits. The thread waits
 * with waitid(WNOWAIT) and reaps only then, under the lock: a subprocess's registration that
 * was dropped (the watcher closed) leaves its child to the subprocess, which reaps it with its
 * real status; any other child is reaped, even after its handler was removed.
 */
#include "internal.h"
#include "watcher_internal.h"

#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>

#if defined(__has_feature)
#if __has_feature(address_sanitizer) || __has_feature(thread_sanitizer)
#define CA__SANITIZED 1
#endif
#endif
#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
#define CA__SANITIZED 1
#endif

#ifdef CA__SANITIZED
#define WAIT_STACK (256 * 1024)
#else
#define WAIT_STACK (32 * 1024)
#endif

static void *wait_main(void *arg)
{
    ca__wreg *r = arg;
    ca__wcore *c = r->core;
    pid_t pid = r->pid;
    char name[16];
    snprintf(name, sizeof name, "ca-wait-%d", (int)pid);
    pthread_setname_np(pthread_self(), name);

    /* Waits for the exit without reaping: the reap is decided under the lock, below. */
    siginfo_t si;
    int wr;
    do {
        memset(&si, 0, sizeof si);
        wr = waitid(P_PID, (id_t)pid, &si, WEXITED | WNOWAIT);
    } while (wr < 0 && errno == EINTR);

    ca__wlog q = {0};
    ca__wcore_lock(c);
    /* An internal registration (a subprocess's) dropped meanwhile, by a close of the watcher
     * say, is not ours to reap any more: its owner watches the child on its own now (through
     * its pidfd) and reaps it with its real status, which a reap here would turn into 255.
     * Any other child is reaped, removed or not, as asyncio's thread does: no zombie. Under
     * the lock, so that a drop cannot come between the check and the reap; the child has
     * exited, so waitpid does not block. */
    if (!r->owner_reaps) {
        int status = 0;
        pid_t got;
        do {
            got = waitpid(pid, &status, WNOHANG);
        } while (got < 0 && errno == EINTR);
        bool echild = got <= 0;
        int rc = echild ? 255 : ca__returncode_from_status(status);
        ca__wreg_exited(c, r, rc, echild, &q); /* no-op (and silent) if it was removed */
    }
    ca__wcore_unlock(c);
    ca__wlog_flush(&q); /* the post, made without the lock */
    /* The post failed for memory: the status is ours alone now, so this thread stays until
     * the exit is posted, removed, or its loop closes (issue 16, item 4). */
    for (long ns = 1000000;; ns = ns < 100000000 ? ns * 2 : ns) {
        ca__wcore_lock(c);
        bool waiting = r->in_retry;
        ca__wcore_unlock(c);
        if (!waiting) break;
        struct timespec ts = {0, ns};
        nanosleep(&ts, NULL);
        ca__wcore_retry(c);
    }
    ca__wcore_lock(c);
    ca__wreg_unref(c, r);
    ca__wcore_unlock(c);
    ca__wcore_unref(c);
    return NULL;
}

/* The kind's start: one waiting thread for the new registration. */
static int threaded_start(ca__wcore *c, ca__wadd *a, ca__wlog *q)
{
    (void)q;
    ca__wreg *r = a->r;
    ca__wreg_ref(r); /* the thread's */
    ca__wcore_ref(c);

    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    pthread_attr_setstacksize(&attr, WAIT_STACK);
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old); /* the thread inherits "everything blocked" */
    pthread_t t;
    int e = pthread_create(&t, &attr, wait_main, r);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    pthread_attr_destroy(&attr);
    if (e != 0) {
        /* Nobody waits for this child: the caller learns it now, not never. */
        ca__wreg_unregister_quiet(c, r);
        ca__wreg_unref(c, r);
        /* Never the last reference: the watcher's caller holds one. */
        atomic_fetch_sub_explicit(&c->refs, 1, memory_order_acq_rel);
        return -e;
    }
    return 0;
}

static int threaded_close(ca_child_watcher *w)
{
    ca__wcore *c = ca__wcore_of(w);
    ca__wcore_lock(c);
    c->closed = true;
    ca__wcore_cancel_all(c);
    bool keep = c->keeps_sigchld;
    c->keeps_sigchld = false;
    ca__wcore_unlock(c);
    if (keep) ca__sigchld_keep_release();
    return 0;
}

static const ca__wkind threaded_kind = {
    .name = "threaded",
    .start = threaded_start,
    .close = threaded_close,
    /* attach_loop: nothing to attach, any thread's loop gets its children */
};

int ca_threaded_child_watcher_new(ca_child_watcher **out)
{
    if (!out) return -EINVAL;
    ca__wcore *c;
    int err = ca__wcore_new(&c);
    if (err < 0) return err;
    err = ca__child_watcher_make(&threaded_kind, c, out);
    if (err < 0) {
        ca__wcore_unref(c);
        return err;
    }
    c->keeps_sigchld = true;
    ca__sigchld_keep_acquire();
    return 0;
}
