/*
 * FastChildWatcher: SIGCHLD through the attached loop, and then waitpid(-1, WNOHANG) until no
 * exited child is left: O(1) per exit however many children are watched, callbacks on the
 * attached loop's thread.
 *
 * The price, as in asyncio: it reaps EVERY child of the process, including children that other
 * code (system(), another library, a Threaded watcher, a plain waitpid(pid)) is waiting for.
 * Their waitpid then fails with ECHILD (system() returns -1), and their exit status ends up
 * here: inside enter/exit (the spawn window) it is kept in case the handler comes next;
 * outside, it is logged ("Caught subprocess termination from unknown pid") and dropped. Use it
 * only when this process's children are all yours.
 *
 * The other way round, a registered child that other code reaped never shows in waitpid(-1):
 * the slow check of the attached loop (once a second, see watcher_safe.c) asks each registered
 * pid with waitid(WNOWAIT) and reports the ones that are gone with 255, as the other watchers
 * do; so does a reap that finds no child left at all (ECHILD). A SIGCHLD costs the same however
 * many children are registered.
 */
#include "internal.h"
#include "watcher_internal.h"

#include <stdio.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>

static ca__wattach *att(ca__wcore *c) { return (ca__wattach *)c->impl; }

/* Registered children that other code reaped (their exit can never come through waitpid(-1)):
 * reported as the other watchers do, returncode 255 and a warning (issue 16, item 7).
 * waitid(WNOWAIT) on the pid says ECHILD once it is not our child any more. O(n). */
static void fast_find_foreign(ca__wcore *c, ca__wreg **list, ca__wlog *q)
{
    atomic_fetch_add_explicit(&ca__wpoll_count, 1, memory_order_relaxed);
    for (size_t i = 0; i < c->cap;) {
        ca__wreg *r = c->slots[i];
        if (!r || !r->registered || r->state != CA__W_WAITING) {
            i++;
            continue;
        }
        siginfo_t si;
        memset(&si, 0, sizeof si);
        int e;
        do {
            e = waitid(P_PID, (id_t)r->pid, &si, WEXITED | WNOHANG | WNOWAIT);
        } while (e < 0 && errno == EINTR);
        if (e == 0 || errno != ECHILD) {
            i++;
            continue;
        }
        ca__wlog_add(q, CA_LOG_WARNING,
                     "Unknown child process pid %d, will report returncode 255", (int)r->pid);
        ca__wreg_take_into(c, r, 255, list); /* shifts the next entry into slot i */
    }
}

static void fast_reap(ca__wcore *c, bool full, ca__wreg **list, ca__wlog *q, long long *relook)
{
    *relook = -1;
    /* Signals coalesce: keep reaping while there is something to reap. */
    for (;;) {
        int status = 0;
        pid_t pid = waitpid(-1, &status, WNOHANG);
        if (pid < 0 && errno == EINTR) continue;
        if (pid < 0) {
            /* ECHILD: no child left at all, so every registered one was reaped elsewhere. */
            if (c->len > 0) fast_find_foreign(c, list, q);
            return;
        }
        if (pid == 0) {
            /* The others still run. Whether other code reaped one of ours takes a look at
             * each: done by the slow check (full, once a second) or after an attach. */
            if (full && c->len > 0) fast_find_foreign(c, list, q);
            return;
        }
        int rc = ca__returncode_from_status(status);
        ca__wreg *r = ca__wtable_get_live(c, pid);
        if (r && r->registered && r->state == CA__W_WAITING) {
            ca__wreg_take_into(c, r, rc, list);
        } else if (r && r->state == CA__W_ZOMBIE) {
            r->rc = rc; /* a stale zombie whose pid was reused */
        } else if (!r && att(c)->forks > 0) {
            /* Inside enter/exit: the handler may come next. */
            ca__wreg *z;
            if (ca__wreg_register(c, pid, NULL, NULL, NULL, &z) == 0) {
                z->state = CA__W_ZOMBIE;
                z->rc = rc;
                att(c)->zombies++;
                ca__wreg_unwait(c, z); /* the waiting list is for running children */
            } else {
                ca__wlog_add(q, CA_LOG_WARNING,
                             "Caught subprocess termination from unknown pid: %d -> %d "
                             "(out of memory to keep it)",
                             (int)pid, rc);
            }
        } else {
            ca__wlog_add(q, CA_LOG_WARNING,
                         "Caught subprocess termination from unknown pid: %d -> %d", (int)pid,
                         rc);
        }
    }
}

/* The kind's extra for an add whose pid is registered: a child that exited before its handler
 * came (a zombie registration, made by the reaping) is delivered now, on the attached loop. */
static void fast_existing(ca__wcore *c, ca__wreg *r, ca__wlog *q)
{
    if (r->state != CA__W_ZOMBIE) return;
    r->state = CA__W_WAITING;
    ca__wreg_rebind(c, r, att(c)->bind);
    ca__wreg_exited(c, r, r->rc, false, q);
}

static int fast_enter(ca_child_watcher *w)
{
    ca__wcore *c = ca__wcore_of(w);
    ca__wcore_lock(c);
    att(c)->forks++;
    ca__wcore_unlock(c);
    return 0;
}

static int fast_exit(ca_child_watcher *w)
{
    ca__wcore *c = ca__wcore_of(w);
    ca__wlog q = {0};
    int err = 0;
    ca__wcore_lock(c);
    if (att(c)->forks == 0) {
        err = -EINVAL; /* exit without enter */
    } else if (--att(c)->forks == 0 && att(c)->zombies > 0) {
        /* Statuses kept for a handler that never came are other code's children. */
        char buf[200];
        size_t len = 0;
        int n = 0;
        buf[0] = 0;
        for (size_t i = 0; i < c->cap;) {
            ca__wreg *r = c->slots[i];
            if (!r || r->state != CA__W_ZOMBIE) {
                i++;
                continue;
            }
            if (len + 24 < sizeof buf) {
                int k = snprintf(buf + len, sizeof buf - len, "%s%d: %d", n ? ", " : "",
                                 (int)r->pid, r->rc);
                if (k > 0) len += (size_t)k;
            }
            n++;
            ca__wreg_unregister(c, r); /* shifts the next entry into slot i */
        }
        att(c)->zombies = 0; /* the ones that got their handler are WAITING, the rest gone */
        if (n)
            ca__wlog_add(&q, CA_LOG_WARNING,
                         "Caught subprocesses termination from unknown pids: {%s%s}", buf,
                         len + 24 >= sizeof buf ? ", ..." : "");
    }
    ca__wcore_unlock(c);
    ca__wlog_flush(&q);
    return err;
}

static const ca__wkind fast_kind = {
    .name = "fast",
    .flags = CA__WKIND_KEEP_LOOP,
    .begin = ca__wattach_add_begin,
    .existing = fast_existing,
    /* start: nothing, the reaping after each SIGCHLD finds every child */
    .attach_loop = ca__wattach_attach_op,
    .is_active = ca__wattach_is_active_op,
    .close = ca__wattach_close_op,
    .enter = fast_enter,
    .exit = fast_exit,
};

int ca_fast_child_watcher_new(ca_child_watcher **out)
{
    return ca__wattach_watcher_new(&fast_kind, fast_reap, out);
}
