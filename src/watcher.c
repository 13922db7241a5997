/*
 * Child watchers: the public dispatch functions, custom watchers, and the core that the six
 * built-in watchers share (registrations, delivery to loops, helpers, and the seam: the public
 * ops of every built-in, add, remove, take back). See watcher_internal.h for the core's design
 * and locking.
 */
#include "internal.h"
#include "kinds.h"
#include "watcher_internal.h"

#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>

/* ----- shared helpers --------------------------------------------------------------------- */

int ca__returncode_from_status(int status)
{
    if (WIFEXITED(status)) return WEXITSTATUS(status);
    if (WIFSIGNALED(status)) return -WTERMSIG(status);
    /* Not reachable with WEXITED waits; asyncio raises here, we answer "unknown". */
    return 255;
}

int ca__wait_nohang(pid_t pid, int *rc)
{
    int status = 0;
    pid_t r;
    do {
        r = waitpid(pid, &status, WNOHANG);
    } while (r < 0 && errno == EINTR);
    if (r < 0) return -errno;
    if (r == 0) return 0;
    *rc = ca__returncode_from_status(status);
    return 1;
}

int ca__watcher_delivery_loop(ca_loop *given, ca_loop **out)
{
    ca_loop *loop = given;
    if (loop) {
        /* The caller holds a reference to the loop it gave us for the whole call. */
        ca_loop_ref(loop);
        if (ca_loop_is_closed(loop)) {
            ca_loop_unref(loop);
            return -EBADF;
        }
        *out = loop;
        return 0;
    }
    /* The running loop, else the current one, with its reference taken in the same step as
     * the lookup: another thread replacing the policy cannot free it in between (issue 16). */
    int r = ca__get_event_loop_ref(&loop);
    if (r < 0) return r == -ENOMEM ? r : -ENOENT;
    if (ca_loop_is_closed(loop)) {
        ca_loop_unref(loop);
        return -ENOENT;
    }
    *out = loop;
    return 0;
}

/* The keep-lock and its counters. Like every lock of the library it survives fork(): held
 * across it by the forking thread (prepare/parent/child), so that a child never inherits it
 * locked by a thread that does not exist there (issue 16, item 3). */
static pthread_mutex_t keep_lock = PTHREAD_MUTEX_INITIALIZER;
static int keep_count;
static bool keep_changed;
static struct sigaction keep_saved;
static pthread_once_t keep_once = PTHREAD_ONCE_INIT;

static void keep_prepare(void) { pthread_mutex_lock(&keep_lock); }
static void keep_parent(void) { pthread_mutex_unlock(&keep_lock); }
static void keep_setup(void) { pthread_atfork(keep_prepare, keep_parent, keep_parent); }

void ca__sigchld_keep_acquire(void)
{
    bool warn = false;
    pthread_once(&keep_once, keep_setup);
    pthread_mutex_lock(&keep_lock);
    if (keep_count++ == 0) {
        struct sigaction cur;
        if (sigaction(SIGCHLD, NULL, &cur) == 0 && !(cur.sa_flags & SA_SIGINFO) &&
            (cur.sa_handler == SIG_IGN ||
             (cur.sa_handler == SIG_DFL && (cur.sa_flags & SA_NOCLDWAIT)))) {
            struct sigaction dfl;
            memset(&dfl, 0, sizeof dfl);
            dfl.sa_handler = SIG_DFL;
            sigemptyset(&dfl.sa_mask);
            if (sigaction(SIGCHLD, &dfl, NULL) == 0) {
                keep_saved = cur;
                keep_changed = true;
                warn = true;
            }
        }
    }
    pthread_mutex_unlock(&keep_lock);
    if (warn)
        ca__log(CA_LOG_WARNING,
                "SIGCHLD was ignored (SIG_IGN or SA_NOCLDWAIT): the kernel would reap children "
                "and their exit status would be lost; SIGCHLD is set to SIG_DFL while a child "
                "watcher is active");
}

void ca__sigchld_keep_release(void)
{
    pthread_once(&keep_once, keep_setup);
    pthread_mutex_lock(&keep_lock);
    if (keep_count > 0 && --keep_count == 0 && keep_changed) {
        keep_changed = false;
        /* Put the old disposition back only if nobody changed ours meanwhile. */
        struct sigaction cur;
        if (sigaction(SIGCHLD, NULL, &cur) == 0 && !(cur.sa_flags & SA_SIGINFO) &&
            cur.sa_handler == SIG_DFL && !(cur.sa_flags & SA_NOCLDWAIT))
            sigaction(SIGCHLD, &keep_saved, NULL);
    }
    pthread_mutex_unlock(&keep_lock);
}

atomic_ulong ca__wpoll_count;

unsigned long ca__watcher_full_polls(void) { return atomic_load(&ca__wpoll_count); }

atomic_ulong ca__wlook_count;

unsigned long ca__watcher_looks(void) { return atomic_load(&ca__wlook_count); }

static long long mono_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

/* A waiting registration: the candidates and the walk only ever reap those. */
static ca__wreg *waiting_reg(ca__wcore *c, pid_t pid)
{
    ca__wreg *r = ca__wtable_get(c, pid);
    return r && r->registered && r->in_wait ? r : NULL;
}

/* Reaps waiting registration r by pid: 1 with r in *out (*echild: other code reaped it, *rc is
 * 255), 0 while its child runs, -1 on an unexpected error (the caller polls every child). */
static int reap_reg(ca__wreg *r, ca__wreg **out, int *rc, bool *echild)
{
    int e = ca__wait_nohang(r->pid, rc);
    if (e == 0) return 0;
    if (e < 0 && e != -ECHILD) return -1;
    *echild = e == -ECHILD;
    if (*echild) *rc = 255;
    *out = r;
    return 1;
}

static bool has_pid(const pid_t *pids, int n, pid_t pid)
{
    for (int i = 0; i < n; i++)
        if (pids[i] == pid) return true;
    return false;
}

_Static_assert(CA__WCAND_RECENT <= CA__WCAND_HINTS && CA__WCAND_ALL <= CA__WCAND_HINTS,
               "the candidates share one array");

void ca__wreap_begin(ca__wcore *c, ca__wreap_pass *p)
{
    pid_t hints[CA__WCAND_HINTS];
    int nh = ca__sigchld_hints(&c->hint_seq, hints, CA__WCAND_HINTS); /* read in any case */
    p->n = p->i = p->looked = 0;
    p->hinted = p->defer = false;
    if (c->nwait <= CA__WCAND_ALL) {
        /* Few registrations: every one of them by pid, and no look (which could meet a child
         * whose handler is on its way, and then have to look again later). */
        for (uint32_t i = 0; i < c->nwait; i++) p->cand[p->n++] = c->wpids[i];
        p->walk = false;
        return;
    }
    p->walk = true;
    for (int i = 0; i < nh; i++)
        if (waiting_reg(c, hints[i]) && !has_pid(p->cand, p->n, hints[i]))
            p->cand[p->n++] = hints[i];
    /* Hints explain the wake even when none is ours: a child whose handler is on its way (its
     * add reaps it) or another watcher's. Only a coalesced SIGCHLD hides an exit then, and that
     * is what the (deferrable) look is for. */
    p->hinted = nh > 0;
    if (p->n > 0) return;
    /* No hint of ours (SIGCHLD came through a handler that is not the library's, or coalesced
     * with another child's exit, or the child's handler is on its way): the newest
     * registrations are the likeliest to have exited.
     * The waiting array's last entries are the newest ones, give or take those that a removal
     * moved into a hole. */
    for (uint32_t i = c->nwait; i-- > 0 && c->nwait - i <= CA__WCAND_RECENT;)
        p->cand[p->n++] = c->wpids[i];
}

int ca__wreap_next(ca__wcore *c, ca__wreap_pass *p, ca__wreg **out, int *rc, bool *echild,
                   long long *relook_ns)
{
    while (p->i < p->n) {
        ca__wreg *r = waiting_reg(c, p->cand[p->i++]);
        if (!r) continue; /* reaped meanwhile (by an add, or as another candidate) */
        /* Registered and waiting: its child is ours to reap, the kernel finds it by pid. */
        int e = reap_reg(r, out, rc, echild);
        if (e != 0) return e;
    }
    /* Every waiting registration was a candidate: nothing else of ours can have exited. */
    if (!p->walk) return 0;
    if (p->defer && p->hinted) {
        p->walk = false;
        return -3;
    }
    for (;;) {
        siginfo_t si;
        memset(&si, 0, sizeof si);
        atomic_fetch_add_explicit(&ca__wlook_count, 1, memory_order_relaxed);
        if (waitid(P_ALL, 0, &si, WEXITED | WNOHANG | WNOWAIT) < 0) {
            if (errno == EINTR) continue;
            return -1; /* ECHILD: no child at all; the poll reports the registered ones */
        }
        if (si.si_pid == 0) {
            c->hider = 0;
            return 0;
        }
        ca__wreg *r = waiting_reg(c, si.si_pid);
        if (!r) {
            /* Not ours: we cannot look past it. Usually a child whose handler is about to be
             * added (asyncio adds it after the spawn returns: /bin/true may be gone by then),
             * whose add reaps it; so the poll waits CA__WHIDE_NS for that before it runs. */
            long long now = mono_ns();
            if (c->hider != si.si_pid) {
                c->hider = si.si_pid;
                c->hider_since = now;
            }
            if (now - c->hider_since >= CA__WHIDE_NS) return -1;
            *relook_ns = c->hider_since + CA__WHIDE_NS;
            return -2;
        }
        /* It has exited: 0 (still running) cannot be; ECHILD: other code reaped it since. */
        int e = reap_reg(r, out, rc, echild);
        if (e == 1) p->looked++;
        return e == 0 ? -1 : e;
    }
}

/* ----- deferred log lines ------------------------------------------------------------------ */

void ca__wlog_add(ca__wlog *q, int level, const char *fmt, ...)
{
    char msg[256];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    if (n < 0) return;
    size_t len = strlen(msg);
    if (!q->buf) {
        /* The first lines go to the buffer inside q: a warning needs no allocation. */
        q->buf = q->small;
        q->cap = sizeof q->small;
    }
    if (q->len + len + 2 > q->cap) {
        size_t cap = q->cap * 2;
        while (cap < q->len + len + 2) cap *= 2;
        char *nb = q->buf == q->small ? malloc(cap) : realloc(q->buf, cap);
        if (!nb) return; /* out of memory: this line is lost, never the exit */
        if (q->buf == q->small) memcpy(nb, q->small, q->len);
        q->buf = nb;
        q->cap = cap;
    }
    q->buf[q->len++] = (char)(level / 10);
    memcpy(q->buf + q->len, msg, len + 1);
    q->len += len + 1;
}

static void post_exit(ca__wcore *c, ca__wreg *r, ca__wlog *q);
static void post_failed(ca__wcore *c, ca__wreg *r, int err, ca__wlog *q);
static void deliver_cb(void *arg);

void ca__wlog_op(ca__wlog *q, ca__wcore *c, ca__wreg *r, int op, ca_loop *loop, bool ref_loop)
{
    ca__wreg_ref(r); /* the op's own, dropped by the flusher under the lock */
    r->op = (unsigned char)op;
    r->op_loop = loop;
    r->op_loop_ref = false;
    if (loop && ref_loop) {
        /* The loop's last reference is gone: it is being closed, its hook is on the way. */
        if (ca__loop_tryref(loop)) r->op_loop_ref = true;
        else r->op_loop = NULL;
    }
    r->onext = NULL;
    if (q->ops_last) q->ops_last->onext = r;
    else q->ops = r;
    q->ops_last = r;
    q->core = c;
}

/* A queued exit: posted now, the lock not held. The post's reference to r (taken with
 * r->posted) goes to the loop; if the post fails, whoever still finds r->posted set under the
 * lock owns it: a loop's close hook may have taken it first. */
static void flush_post_exit(ca__wcore *c, ca__wreg *r, ca_loop *loop)
{
    int err = -EBADF;
    /* A loop its host closed behind our back gets nothing, as a loop closed by ca_loop_close.
     * From the loop's own running thread (an add that found the child gone already) a plain
     * call_soon: no wakeup of a loop that is awake; from anywhere else its thread-safe queue. */
    if (loop && !ca_loop_is_closed(loop))
        err = ca__loop_schedule_ex(loop, deliver_cb, r, NULL, NULL, true);
    ca__wlog q = {0};
    ca__wcore_lock(c);
    if (err < 0 && r->posted) {
        r->posted = false;
        post_failed(c, r, err, &q);
        ca__wreg_unref(c, r); /* the post's */
    }
    ca__wreg_unref(c, r); /* the op's */
    ca__wcore_unlock(c);
    ca__wlog_flush(&q);
}

void ca__wlog_flush(ca__wlog *q)
{
    size_t i = 0;
    while (i < q->len) {
        int level = q->buf[i++] * 10;
        const char *msg = q->buf + i;
        ca__log(level, "%s", msg);
        i += strlen(msg) + 1;
    }
    if (q->buf != q->small) free(q->buf);
    q->buf = NULL;
    q->len = q->cap = 0;
    ca__wreg *list = q->ops;
    q->ops = q->ops_last = NULL;
    ca__wreg *hooked = q->hook_rel;
    q->hook_rel = NULL;
    if (!list && !hooked) return;
    ca__wcore *c = q->core;
    ca__wcore_ref(c);
    while (list) {
        ca__wreg *r = list;
        /* Read and cleared before the op: once it is done, another thread may queue r again. */
        list = r->onext;
        int op = r->op;
        ca_loop *loop = r->op_loop;
        bool held = r->op_loop_ref;
        r->onext = NULL;
        r->op = CA__OP_NONE;
        r->op_loop = NULL;
        r->op_loop_ref = false;
        if (op == CA__OP_POST_EXIT) {
            flush_post_exit(c, r, loop);
        } else {
            ca__pidfd_op(c, r, op, loop);
            ca__wcore_lock(c);
            ca__wreg_unref(c, r); /* the op's */
            ca__wcore_unlock(c);
        }
        /* The last reference may close the loop here: its hooks take the lock, not held. */
        if (held) ca_loop_unref(loop);
    }
    while (hooked) {
        ca__wreg *r = hooked;
        hooked = r->hnext;
        r->hnext = NULL;
        ca__pidfd_op(c, r, CA__OP_RELEASE, q->hook_loop);
        ca__wcore_lock(c);
        ca__wreg_unref(c, r); /* the hook list's */
        ca__wcore_unlock(c);
    }
    ca__wcore_unref(c);
}

bool ca__wcore_retry(ca__wcore *c)
{
    ca__wlog q = {0};
    ca__wcore_lock(c);
    ca__wreg *list = c->retry;
    c->retry = NULL;
    while (list) {
        ca__wreg *r = list;
        list = r->rnext;
        r->rnext = NULL;
        r->in_retry = false;
        if (r->registered && r->state == CA__W_EXITED && !r->posted) post_exit(c, r, &q);
        ca__wreg_unref(c, r); /* the list's */
    }
    ca__wcore_unlock(c);
    ca__wlog_flush(&q);
    ca__wcore_lock(c);
    bool left = c->retry != NULL;
    ca__wcore_unlock(c);
    return left;
}

void ca__wcore_retry_clear(ca__wcore *c)
{
    while (c->retry) {
        ca__wreg *r = c->retry;
        c->retry = r->rnext;
        r->rnext = NULL;
        r->in_retry = false;
        ca__wreg_unref(c, r);
    }
}

/* ----- core: pid table ------------------------------------------------------------------- */

static size_t home(const ca__wcore *c, pid_t pid)
{
    return ((uint32_t)pid * 2654435761u) & (c->cap - 1);
}

static int table_grow(ca__wcore *c)
{
    size_t ncap = c->cap ? c->cap * 2 : 16;
    ca__wreg **ns = calloc(ncap, sizeof *ns);
    if (!ns) return -ENOMEM;
    ca__wreg **old = c->slots;
    size_t ocap = c->cap;
    c->slots = ns;
    c->cap = ncap;
    for (size_t i = 0; i < ocap; i++) {
        if (!old[i]) continue;
        size_t j = home(c, old[i]->pid);
        while (ns[j]) j = (j + 1) & (ncap - 1);
        ns[j] = old[i];
    }
    free(old);
    return 0;
}

static size_t table_find(const ca__wcore *c, pid_t pid)
{
    if (!c->cap) return SIZE_MAX;
    for (size_t i = home(c, pid);; i = (i + 1) & (c->cap - 1)) {
        if (!c->slots[i]) return SIZE_MAX;
        if (c->slots[i]->pid == pid) return i;
    }
}

ca__wreg *ca__wtable_get(ca__wcore *c, pid_t pid)
{
    size_t i = table_find(c, pid);
    return i == SIZE_MAX ? NULL : c->slots[i];
}

static void table_del(ca__wcore *c, pid_t pid)
{
    size_t i = table_find(c, pid);
    if (i == SIZE_MAX) return;
    size_t mask = c->cap - 1;
    c->slots[i] = NULL;
    c->len--;
    /* Backward-shift deletion keeps every probe sequence unbroken without tombstones. */
    for (size_t j = (i + 1) & mask; c->slots[j]; j = (j + 1) & mask) {
        size_t k = home(c, c->slots[j]->pid);
        bool movable = (i <= j) ? (k <= i || k > j) : (k <= i && k > j);
        if (movable) {
            c->slots[i] = c->slots[j];
            c->slots[j] = NULL;
            i = j;
        }
    }
}

/* ----- core: registrations ------------------------------------------------------------------ */

static void bind_link(ca__wbind *b, ca__wreg *r)
{
    r->bind = b;
    r->bprev = NULL;
    r->bnext = b->regs;
    if (b->regs) b->regs->bprev = r;
    b->regs = r;
    b->refs++;
}

static void bind_unlink(ca__wreg *r)
{
    ca__wbind *b = r->bind;
    if (!b) return;
    if (r->bprev) r->bprev->bnext = r->bnext;
    else b->regs = r->bnext;
    if (r->bnext) r->bnext->bprev = r->bprev;
    r->bind = NULL;
    r->bprev = r->bnext = NULL;
    ca__wbind_unref(b);
}

void ca__wreg_unwait(ca__wcore *c, ca__wreg *r)
{
    if (!r->in_wait) return;
    r->in_wait = false;
    if (!c->track_wait) return;
    uint32_t i = r->widx, last = --c->nwait;
    if (i != last) {
        c->wpids[i] = c->wpids[last];
        c->wregs[i] = c->wregs[last];
        c->wregs[i]->widx = i;
    }
}

/* Room for one more entry in the waiting array. */
static int wait_reserve(ca__wcore *c)
{
    if (c->nwait < c->wcap) return 0;
    if (c->wcap >= UINT32_MAX / 2) return -ENOMEM;
    uint32_t ncap = c->wcap ? c->wcap * 2 : 16;
    pid_t *np = realloc(c->wpids, ncap * sizeof *np);
    if (!np) return -ENOMEM;
    c->wpids = np;
    ca__wreg **nr = realloc(c->wregs, ncap * sizeof *nr);
    if (!nr) return -ENOMEM; /* the bigger pid array stays: harmless */
    c->wregs = nr;
    c->wcap = ncap;
    return 0;
}

int ca__wreg_register(ca__wcore *c, pid_t pid, ca_child_fn cb, void *arg, ca__wbind *b,
                      ca__wreg **out)
{
    if ((c->len + 1) * 2 > c->cap && table_grow(c) < 0) return -ENOMEM;
    if (c->track_wait && wait_reserve(c) < 0) return -ENOMEM;
    ca__wreg *r = malloc(sizeof *r);
    if (!r) return -ENOMEM;
    *r = (ca__wreg){
        .pid = pid,
        .core = c,
        .state = CA__W_WAITING,
        .refs = 1,
        .registered = true,
        .in_wait = true,
        .cb = cb,
        .arg = arg,
        .pidfd = -1,
    };
    size_t i = home(c, pid);
    while (c->slots[i]) i = (i + 1) & (c->cap - 1);
    c->slots[i] = r;
    c->len++;
    if (c->track_wait) {
        r->widx = c->nwait++;
        c->wpids[r->widx] = pid;
        c->wregs[r->widx] = r;
    }
    if (b) bind_link(b, r);
    *out = r;
    return 0;
}

void ca__wreg_ref(ca__wreg *r) { r->refs++; }

void ca__wreg_unref(ca__wcore *c, ca__wreg *r)
{
    if (--r->refs > 0) return;
    bind_unlink(r);
    if (c->kind && c->kind->reg_free) c->kind->reg_free(r);
    free(r);
}

/* Registered r is being unregistered without its callback: if it is internal, its owner is to
 * hear of it, at ca__wcore_unlock (r is queued with a reference). It happens once per r, and
 * an unregistered r's pid, rc, cb and arg never change again: the queue is read unlocked (its
 * bit-fields are not: a posted delivery may still clear r->posted). */
static void queue_drop(ca__wcore *c, ca__wreg *r)
{
    if (!r->internal) return;
    r->internal = false;
    /* Reaped already (the delivery could not be posted, or is lost with its loop): the owner
     * gets the exit itself. Otherwise rc meant nothing and is read by nobody else any more. */
    if (r->state != CA__W_EXITED) {
        r->rc = CA__RC_DROPPED;
        r->owner_reaps = true;
    }
    ca__wreg_ref(r);
    r->drop_next = c->dropped;
    c->dropped = r;
}

void ca__wcore_unlock_dropped(ca__wcore *c)
{
    /* Whoever holds the lock holds a reference to the core; ours keeps it past the calls. */
    ca__wcore_ref(c);
    while (c->dropped || c->replaced_cb) {
        ca__wreg *list = c->dropped;
        ca_child_fn rcb = c->replaced_cb;
        void *rarg = c->replaced_arg;
        pid_t rpid = c->replaced_pid;
        int rrc = c->replaced_rc;
        c->dropped = NULL;
        c->replaced_cb = NULL;
        pthread_mutex_unlock(&c->lock);
        if (rcb) rcb(rpid, rrc, rarg);
        for (ca__wreg *r = list; r; r = r->drop_next) r->cb(r->pid, r->rc, r->arg);
        pthread_mutex_lock(&c->lock);
        while (list) {
            ca__wreg *next = list->drop_next;
            ca__wreg_unref(c, list);
            list = next;
        }
    }
    pthread_mutex_unlock(&c->lock);
    ca__wcore_unref(c);
}

static void unregister(ca__wcore *c, ca__wreg *r, bool drop)
{
    if (!r->registered) return;
    if (drop) queue_drop(c, r);
    r->internal = false;
    r->registered = false;
    if (r->state == CA__W_WAITING || r->state == CA__W_EXITED) r->state = CA__W_DONE;
    ca__wreg_unwait(c, r);
    table_del(c, r->pid);
    ca__wreg_unref(c, r);
}

void ca__wreg_unregister(ca__wcore *c, ca__wreg *r) { unregister(c, r, true); }

void ca__wreg_unregister_quiet(ca__wcore *c, ca__wreg *r) { unregister(c, r, false); }

void ca__wreg_replace(ca__wcore *c, ca__wreg *r, ca_child_fn cb, void *arg, bool internal)
{
    if (r->internal && (r->cb != cb || r->arg != arg)) {
        /* r stays registered (its cb and arg change): the old ones wait in the core. One add
         * replaces at most one registration per locked section, and the unlock empties it. */
        c->replaced_cb = r->cb;
        c->replaced_arg = r->arg;
        c->replaced_pid = r->pid;
        c->replaced_rc = r->state == CA__W_EXITED ? r->rc : CA__RC_REPLACED;
    }
    r->cb = cb;
    r->arg = arg;
    r->internal = internal;
}

void ca__wreg_rebind(ca__wcore *c, ca__wreg *r, ca__wbind *b)
{
    (void)c;
    /* A posted registration stays where its delivery went: that loop's hook may free it. */
    if (r->bind == b || r->posted) return;
    if (b) b->refs++; /* keeps b while r leaves a binding that may be b's last user */
    bind_unlink(r);
    if (b) {
        bind_link(b, r);
        ca__wbind_unref(b);
    }
}

void ca__wcore_cancel_all(ca__wcore *c)
{
    for (size_t i = 0; i < c->cap;) {
        ca__wreg *r = c->slots[i];
        /* Unregistering shifts later entries back into slot i, so only advance on empty. */
        if (r) ca__wreg_unregister(c, r);
        else i++;
    }
    ca__wcore_retry_clear(c);
}

/* Queues r's delivery, posted by ca__wlog_flush after the unlock (lock held). */
static void post_exit(ca__wcore *c, ca__wreg *r, ca__wlog *q)
{
    if (r->posted) return;
    ca__wbind *b = r->bind;
    if (b && b->loop) {
        r->posted = true;
        ca__wreg_ref(r); /* the post's */
        ca__wlog_op(q, c, r, CA__OP_POST_EXIT, b->loop, true);
        return;
    }
    post_failed(c, r, -EBADF, q);
}

/* r's exit could not be posted (lock held). Out of memory, it is kept (registered, reaped) on
 * the retry list: the exit must not be lost for want of memory (issue 16, item 4); otherwise
 * it is logged and dropped, as asyncio does for a closed loop. */
static void post_failed(ca__wcore *c, ca__wreg *r, int err, ca__wlog *q)
{
    if (err == -ENOMEM && r->registered) {
        if (!r->in_retry) {
            r->in_retry = true;
            ca__wreg_ref(r); /* the list's */
            r->rnext = c->retry;
            c->retry = r;
        }
        return;
    }
    if (!r->registered) return;
    if (err == -EBADF)
        ca__wlog_add(q, CA_LOG_WARNING,
                     "Loop that handles pid %d is closed: its exit (returncode %d) is dropped",
                     (int)r->pid, r->rc);
    else
        ca__wlog_add(q, CA_LOG_ERROR,
                     "Cannot deliver the exit of pid %d (returncode %d) to its loop: %s",
                     (int)r->pid, r->rc, ca_strerror(err));
    ca__wreg_unregister(c, r);
}

void ca__wreg_exited(ca__wcore *c, ca__wreg *r, int rc, bool echild, ca__wlog *q)
{
    if (!r->registered || r->state != CA__W_WAITING) return;
    ca__wreg_unwait(c, r);
    r->state = CA__W_EXITED;
    r->rc = rc;
    /* The warning comes before the callback, as in asyncio: ca__wlog_flush logs the lines
     * before it posts. */
    if (echild)
        ca__wlog_add(q, CA_LOG_WARNING,
                     "Unknown child process pid %d, will report returncode 255", (int)r->pid);
    post_exit(c, r, q);
}

ca__wreg *ca__wtable_get_live(ca__wcore *c, pid_t pid)
{
    ca__wreg *r = ca__wtable_get(c, pid);
    if (r && r->registered && ((r->state == CA__W_EXITED && !r->posted && !r->in_retry) ||
                               (r->state == CA__W_WAITING && r->pidfd_lost))) {
        ca__wreg_unregister(c, r);
        r = NULL;
    }
    return r;
}

bool ca__wreg_take(ca__wcore *c, ca__wreg *r, ca_child_fn *cb, void **arg)
{
    if (!r->registered || r->state == CA__W_ZOMBIE || r->state == CA__W_DONE) return false;
    *cb = r->cb;
    *arg = r->arg;
    unregister(c, r, false); /* the callback comes: no drop call */
    return true;
}

void ca__wreg_take_into(ca__wcore *c, ca__wreg *r, int rc, ca__wreg **list)
{
    r->rc = rc;
    ca__wreg_ref(r);
    unregister(c, r, false);
    r->dnext = *list;
    *list = r;
}

void ca__wdeliver_list(ca__wcore *c, ca__wreg *list)
{
    if (!list) return;
    ca__wreg *fifo = NULL;
    while (list) {
        ca__wreg *next = list->dnext;
        list->dnext = fifo;
        fifo = list;
        list = next;
    }
    /* cb and arg cannot change any more: a new handler for the pid is a new registration. */
    for (ca__wreg *r = fifo; r; r = r->dnext) r->cb(r->pid, r->rc, r->arg);
    ca__wcore_lock(c);
    while (fifo) {
        ca__wreg *next = fifo->dnext;
        ca__wreg_unref(c, fifo);
        fifo = next;
    }
    ca__wcore_unlock(c);
}

/* Runs on the delivery loop's thread. The registration may have been removed (or the watcher
 * closed) since the exit was posted: then the callback is not called. */
static void deliver_cb(void *arg)
{
    ca__wreg *r = arg;
    ca__wcore *c = r->core;
    ca_child_fn cb = NULL;
    void *cbarg = NULL;
    pid_t pid = r->pid;
    ca__wcore_ref(c);
    ca__wcore_lock(c);
    ca__wbind *b = r->bind; /* a posted registration never changes binding */
    int rc = r->rc;
    r->posted = false;
    bool call = r->registered && r->state == CA__W_EXITED && ca__wreg_take(c, r, &cb, &cbarg);
    b->refs++;
    ca__wreg_unref(c, r);
    ca__wbind_put(b);
    ca__wcore_unlock(c);
    ca__wcore_unref(c);
    if (call) cb(pid, rc, cbarg);
}

/* ----- core: bindings ------------------------------------------------------------------------- */

void ca__wbind_unref(ca__wbind *b)
{
    if (--b->refs > 0) return;
    ca__wcore *c = b->core;
    for (ca__wbind **p = &c->binds; *p; p = &(*p)->next) {
        if (*p == b) {
            *p = b->next;
            break;
        }
    }
    free(b);
    /* Never the last reference: whoever holds the lock holds one too. */
    atomic_fetch_sub_explicit(&c->refs, 1, memory_order_acq_rel);
}

void ca__wbind_put(ca__wbind *b)
{
    /* A binding with nothing left but its hook is dropped while we are on its loop's thread
     * (the only thread that may remove a close hook); the next child brings it back. */
    if (b->refs == 2 && b->hook && b->loop && !b->check_posted && !b->rescan_posted &&
        !b->tick_posted && !b->sig_registered && ca__loop_in_own_thread(b->loop)) {
        ca__loop_remove_close_hook(b->loop, b->hook);
        b->hook = NULL;
        b->refs--;
    }
    ca__wbind_unref(b);
}

/* The loop is closing (in the closing thread; it runs nothing any more): what was posted to it
 * will never run, so it is released here. */
static void bind_hook(void *arg)
{
    ca__wbind *b = arg;
    ca__wcore *c = b->core;
    ca__wlog q = {0};
    ca__wcore_ref(c);
    ca__wcore_lock(c);
    ca_loop *loop = b->loop;
    b->hook = NULL;
    b->loop = NULL;
    b->refs++;
    q.hook_loop = loop;
    for (ca__wreg *r = b->regs; r;) {
        ca__wreg_ref(r);
        /* First the kind's hook: it may need to see what was posted (Pidfd's releases). */
        if (c->kind->loop_closed) c->kind->loop_closed(c, r, loop, &q);
        if (r->posted) {
            /* The exit will never be delivered. It stays registered, so that whoever owns the
             * child (the subprocess code, in its own close hook) learns from remove returning
             * 1 that the callback will never come; a new handler for the pid replaces it. */
            r->posted = false;
            if (r->registered && r->state == CA__W_EXITED)
                ca__wlog_add(&q, CA_LOG_DEBUG,
                             "Loop that handles pid %d was closed before its exit "
                             "(returncode %d) was delivered",
                             (int)r->pid, r->rc);
            ca__wreg_unref(c, r);
        }
        /* An internal registration whose exit can no longer come through this loop is
         * dropped now rather than kept for a remove: its owner hears of it (with the
         * returncode if the child was reaped) and may still finish on a loop of its own. */
        if (r->internal && r->registered &&
            ((r->state == CA__W_EXITED && !r->in_retry) ||
             (r->state == CA__W_WAITING && r->pidfd_lost)))
            ca__wreg_unregister(c, r);
        ca__wreg *next = r->bnext;
        ca__wreg_unref(c, r);
        r = next;
    }
    if (b->check_posted) {
        b->check_posted = false;
        b->refs--;
    }
    if (b->rescan_posted) { /* the timer is dropped with the loop's other handles */
        b->rescan_posted = false;
        b->refs--;
    }
    if (b->tick_posted) {
        b->tick_posted = false;
        b->refs--;
    }
    b->sig_registered = false; /* the loop removes its signal handlers when it closes */
    b->refs--; /* the hook's */
    ca__wbind_unref(b);
    ca__wcore_unlock(c);
    ca__wlog_flush(&q);
    ca__wcore_unref(c);
}

int ca__wbind_get(ca__wcore *c, ca_loop *loop, ca__wbind **out)
{
    for (ca__wbind *b = c->binds; b; b = b->next) {
        if (b->loop == loop) {
            *out = b;
            return 0;
        }
    }
    /* The closed flag only: the host's is_closed op is asked before the lock was taken. */
    if (ca__loop_core_closed(loop)) return -ENOENT;
    if (!ca__loop_in_own_thread(loop)) return -EPERM;
    ca__wbind *b = calloc(1, sizeof *b);
    if (!b) return -ENOMEM;
    b->core = c;
    b->loop = loop;
    b->refs = 1;
    b->hook = ca__loop_add_close_hook(loop, bind_hook, b);
    if (!b->hook) {
        free(b);
        return ca__loop_core_closed(loop) ? -ENOENT : -ENOMEM;
    }
    ca__wcore_ref(c);
    b->next = c->binds;
    c->binds = b;
    *out = b;
    return 0;
}

/* ----- core: lifetime ---------------------------------------------------------------------- */

void ca__wcore_destroy_op(ca_child_watcher *w)
{
    ca__wcore *c = ca__wcore_of(w);
    if (ca__child_watcher_forked(w)) ca__wcore_free_forked(c);
    else ca__wcore_unref(c);
}

int ca__wcore_new(ca__wcore **out)
{
    ca__wcore *c = calloc(1, sizeof *c);
    if (!c) return -ENOMEM;
    if (pthread_mutex_init(&c->lock, NULL) != 0) {
        free(c);
        return -ENOMEM;
    }
    atomic_init(&c->refs, 1);
    c->hint_seq = ca__sigchld_hint_seq(); /* the exits of the past are not ours */
    *out = c;
    return 0;
}

void ca__wcore_ref(ca__wcore *c) { atomic_fetch_add_explicit(&c->refs, 1, memory_order_relaxed); }

void ca__wcore_unref(ca__wcore *c)
{
    if (atomic_fetch_sub_explicit(&c->refs, 1, memory_order_acq_rel) != 1) return;
    /* Nothing refers to the core any more: no registration is left (bindings hold references
     * and registrations keep their bindings), so only the table's memory remains. */
    free(c->slots);
    free(c->wpids);
    free(c->wregs);
    free(c->impl);
    pthread_mutex_destroy(&c->lock);
    free(c);
}

void ca__wcore_free_forked(ca__wcore *c)
{
    /* The parent's threads do not exist here and the lock may have been held by one of them
     * at fork time: free every object directly. Registrations are reachable from the table,
     * bindings, or (held by a waiting thread only) from a binding's list. */
    for (size_t i = 0; i < c->cap; i++) {
        ca__wreg *r = c->slots[i];
        if (!r || r->bind) continue; /* bound ones are freed with their binding */
        if (c->kind && c->kind->reg_free) c->kind->reg_free(r);
        free(r);
    }
    while (c->binds) {
        ca__wbind *b = c->binds;
        c->binds = b->next;
        for (ca__wreg *r = b->regs; r;) {
            ca__wreg *next = r->bnext;
            if (c->kind && c->kind->reg_free) c->kind->reg_free(r);
            free(r);
            r = next;
        }
        free(b);
    }
    free(c->slots);
    free(c->wpids);
    free(c->wregs);
    free(c->impl);
    free(c);
}

/* ----- the public object ------------------------------------------------------------------- */

static const char *const custom_kind = "custom";

/* ----- the seam: the public ops of every built-in, through its kind ------------------------- */

static const ca_child_watcher_ops builtin_ops;

bool ca__child_watcher_is_builtin(const ca_child_watcher *w, const ca__wkind *k)
{
    return w && w->ops == &builtin_ops && (!k || ca__wcore_of((ca_child_watcher *)w)->kind == k);
}

int ca__wreg_check_exited(ca__wcore *c, ca__wreg *r, ca__wlog *q)
{
    int rc = 0;
    int e = ca__wait_nohang(r->pid, &rc);
    if (e == 1) ca__wreg_exited(c, r, rc, false, q);
    else if (e == -ECHILD) ca__wreg_exited(c, r, 255, true, q);
    return e;
}

/* The part of an add made under the lock: replace, or register and start. */
static int add_locked(ca__wcore *c, ca__wadd *a, ca__wbind *bind, ca__wlog *q)
{
    const ca__wkind *k = c->kind;
    ca__wreg *r = ca__wtable_get_live(c, a->pid);
    if (r) {
        /* Already watched: a new callback (an internal one replaced hears of it as a drop). */
        ca__wreg_replace(c, r, a->cb, a->arg, a->internal);
        if (k->existing) k->existing(c, r, q);
        /* And a child that has not exited yet moves to the add's loop. A loop that cannot be
         * bound (closed meanwhile) leaves it where it was: the callback is replaced anyway. */
        ca__wbind *b;
        if (!(k->flags & CA__WKIND_KEEP_LOOP) && r->state == CA__W_WAITING &&
            ca__wbind_get(c, a->loop, &b) == 0)
            ca__wreg_rebind(c, r, b);
        return 0;
    }
    int err = 0;
    if (!bind && !(k->flags & CA__WKIND_UNBOUND)) err = ca__wbind_get(c, a->loop, &bind);
    if (err == 0) err = ca__wreg_register(c, a->pid, a->cb, a->arg, bind, &r);
    if (err < 0) return err;
    r->internal = a->internal;
    a->r = r;
    return k->start ? k->start(c, a, q) : 0;
}

int ca__wcore_add(ca_child_watcher *w, ca_loop *given, ca__wadd *a)
{
    ca__wcore *c = ca__wcore_of(w);
    const ca__wkind *k = c->kind;
    ca__wbind *bind = NULL;
    int err;
    a->loop = NULL;
    a->r = NULL;
    if (k->begin) {
        err = k->begin(c, given, &a->loop, &bind); /* the lock is held on success */
    } else {
        err = ca__watcher_delivery_loop(given, &a->loop);
        if (err == 0 && (k->flags & CA__WKIND_OWN_THREAD) && !ca__loop_in_own_thread(a->loop))
            err = -EPERM;
        if (err == 0) {
            ca__wcore_lock(c);
            if (c->closed) { /* closed while this call was on its way in */
                ca__wcore_unlock(c);
                err = -EBADF;
            }
        }
    }
    if (err < 0) {
        if (a->loop) ca_loop_unref(a->loop);
        return err;
    }
    ca__wlog q = {0};
    err = add_locked(c, a, bind, &q);
    ca__wcore_unlock(c);
    if (err == CA__WSTART_FINISH) err = k->finish(c, a, &q);
    ca__wlog_flush(&q);
    ca_loop_unref(a->loop); /* after the unlock: it may be the last reference */
    return err;
}

static int builtin_add(ca_child_watcher *w, pid_t pid, ca_child_fn cb, void *arg)
{
    ca__wadd a = {.pid = pid, .cb = cb, .arg = arg, .lent = -1};
    return ca__wcore_add(w, NULL, &a);
}

/* Cancels registered r for a remove or a take back: its kind's cancel, else unregister. Lock
 * held. */
static void cancel_reg(ca__wcore *c, ca__wreg *r, ca__wlog *q)
{
    ca__wreg_ref(r);
    if (c->kind->cancel) c->kind->cancel(c, r, q);
    else ca__wreg_unregister(c, r);
    ca__wreg_unref(c, r);
}

static int builtin_remove(ca_child_watcher *w, pid_t pid)
{
    ca__wcore *c = ca__wcore_of(w);
    ca__wlog q = {0};
    ca__wcore_lock(c);
    ca__wreg *r = ca__wtable_get(c, pid);
    /* A Fast zombie (reaped before any handler came) has no handler to remove. */
    bool found = r && r->state != CA__W_ZOMBIE;
    if (found) {
        cancel_reg(c, r, &q);
    }
    ca__wcore_unlock(c);
    ca__wlog_flush(&q);
    return found;
}

static int builtin_attach(ca_child_watcher *w, ca_loop *loop)
{
    const ca__wkind *k = ca__wcore_of(w)->kind;
    return k->attach_loop ? k->attach_loop(w, loop) : 0;
}

static bool builtin_is_active(ca_child_watcher *w)
{
    const ca__wkind *k = ca__wcore_of(w)->kind;
    return k->is_active ? k->is_active(w) : true;
}

static int builtin_close(ca_child_watcher *w) { return ca__wcore_of(w)->kind->close(w); }

static int builtin_enter(ca_child_watcher *w)
{
    const ca__wkind *k = ca__wcore_of(w)->kind;
    return k->enter ? k->enter(w) : 0;
}

static int builtin_exit(ca_child_watcher *w)
{
    const ca__wkind *k = ca__wcore_of(w)->kind;
    return k->exit ? k->exit(w) : 0;
}

static void builtin_destroy(ca_child_watcher *w)
{
    const ca__wkind *k = ca__wcore_of(w)->kind;
    if (k->destroy) k->destroy(w);
    else ca__wcore_destroy_op(w);
}

static const ca_child_watcher_ops builtin_ops = {
    .add_child_handler = builtin_add,
    .remove_child_handler = builtin_remove,
    .attach_loop = builtin_attach,
    .is_active = builtin_is_active,
    .close = builtin_close,
    .enter = builtin_enter,
    .exit = builtin_exit,
    .destroy = builtin_destroy,
};

/* ----- the public object ------------------------------------------------------------------- */

static int make(const ca_child_watcher_ops *ops, const char *kind, ca__wcore *c,
                ca_child_watcher **out)
{
    ca_child_watcher *w = calloc(1, sizeof *w);
    if (!w) return -ENOMEM;
    ca__fork_init();
    w->ops = ops;
    w->impl = c;
    w->kind = kind;
    atomic_init(&w->refs, 1);
    atomic_init(&w->closed, false);
    w->fork_gen = ca__fork_gen();
    *out = w;
    return 0;
}

int ca__child_watcher_make(const ca__wkind *k, ca__wcore *c, ca_child_watcher **out)
{
    c->kind = k;
    return make(&builtin_ops, k->name, c, out);
}

bool ca__child_watcher_forked(const ca_child_watcher *w) { return w->fork_gen != ca__fork_gen(); }

const char *ca__child_watcher_kind(const ca_child_watcher *w) { return w ? w->kind : NULL; }

int ca_child_watcher_new_custom(const ca_child_watcher_ops *ops, void *data,
                                ca_child_watcher **out)
{
    if (!ops || !out || !ops->add_child_handler || !ops->remove_child_handler || !ops->is_active)
        return -EINVAL;
    ca_child_watcher *w;
    int r = make(ops, custom_kind, NULL, &w);
    if (r < 0) return r;
    w->data = data;
    *out = w;
    return 0;
}

void *ca_child_watcher_data(ca_child_watcher *w) { return w ? w->data : NULL; }

ca_child_watcher *ca_child_watcher_ref(ca_child_watcher *w)
{
    if (w) atomic_fetch_add_explicit(&w->refs, 1, memory_order_relaxed);
    return w;
}

ca_child_watcher *ca_child_watcher_unref(ca_child_watcher *w)
{
    if (!w || atomic_fetch_sub_explicit(&w->refs, 1, memory_order_acq_rel) != 1) return NULL;
    if (!ca__child_watcher_forked(w) && !atomic_exchange(&w->closed, true) && w->ops->close)
        w->ops->close(w);
    if (w->ops->destroy) w->ops->destroy(w);
    free(w);
    return NULL;
}

static int check(ca_child_watcher *w)
{
    if (!w) return -EINVAL;
    if (CA_UNLIKELY(ca__child_watcher_forked(w))) return -ECHILD;
    if (CA_UNLIKELY(atomic_load_explicit(&w->closed, memory_order_acquire))) return -EBADF;
    return 0;
}

int ca_child_watcher_add_child_handler(ca_child_watcher *w, pid_t pid, ca_child_fn cb, void *arg)
{
    if (!w || !cb || pid <= 0) return -EINVAL;
    int r = check(w);
    return r < 0 ? r : w->ops->add_child_handler(w, pid, cb, arg);
}

int ca_child_watcher_remove_child_handler(ca_child_watcher *w, pid_t pid)
{
    if (!w || pid <= 0) return -EINVAL;
    int r = check(w);
    return r < 0 ? r : w->ops->remove_child_handler(w, pid);
}

/* The checks of an explicit delivery loop, after the watcher's: -ECHILD, then -EBADF. */
static int check_loop(ca_loop *loop)
{
    if (!loop) return 0;
    if (CA_UNLIKELY(loop->fork_gen != ca__fork_gen())) return -ECHILD;
    if (ca_loop_is_closed(loop)) return -EBADF;
    return 0;
}

int ca_child_watcher_add_child_handler_on(ca_child_watcher *w, ca_loop *loop, pid_t pid,
                                          ca_child_fn cb, void *arg)
{
    if (!w || !cb || pid <= 0) return -EINVAL;
    int r = check(w);
    if (r == 0) r = check_loop(loop);
    if (r < 0) return r;
    if (!loop) return w->ops->add_child_handler(w, pid, cb, arg);
    /* A custom watcher's op has no loop argument to pass it on. */
    if (!ca__child_watcher_is_builtin(w, NULL)) return -ENOTSUP;
    ca__wadd a = {.pid = pid, .cb = cb, .arg = arg, .lent = -1};
    return ca__wcore_add(w, loop, &a);
}

int ca__child_watcher_add_internal_on(ca_child_watcher *w, ca_loop *loop, pid_t pid,
                                      ca_child_fn cb, void *arg)
{
    if (!w || !cb || pid <= 0) return -EINVAL;
    int r = check(w);
    if (r == 0) r = check_loop(loop);
    if (r < 0) return r;
    /* Safe and Fast deliver on their attached loop whatever the subprocess's loop is (the
     * subprocess code copes with that), as they did before the loop could be given. */
    if (loop && (ca__watcher_kind_flags(w) & CA__WK_ATTACH)) loop = NULL;
    /* A custom watcher cannot tell its caller about a drop: the caller falls back to the
     * public add, and to guessing (see process.c's on_loop_close). */
    if (!ca__child_watcher_is_builtin(w, NULL)) return -ENOTSUP;
    ca__wadd a = {.pid = pid, .cb = cb, .arg = arg, .internal = true, .lent = -1};
    return ca__wcore_add(w, loop, &a);
}

int ca__child_watcher_add_internal(ca_child_watcher *w, pid_t pid, ca_child_fn cb, void *arg)
{
    return ca__child_watcher_add_internal_on(w, NULL, pid, cb, arg);
}

int ca__child_watcher_take_back(ca_child_watcher *w, pid_t pid, ca_child_fn cb, void *arg)
{
    if (!w || pid <= 0) return -EINVAL;
    if (!ca__child_watcher_is_builtin(w, NULL)) return ca_child_watcher_remove_child_handler(w, pid);
    if (CA_UNLIKELY(ca__child_watcher_forked(w))) return -ECHILD;
    /* No closed check: a close running in another thread may not have cancelled it yet, and
     * under the lock exactly one of us does (a close then has nothing left to drop). */
    ca__wcore *c = ca__wcore_of(w);
    ca__wlog q = {0};
    ca__wcore_lock(c);
    ca__wreg *r = ca__wtable_get(c, pid);
    /* Only our own: a handler that a user added for the pid since is not ours to remove. */
    bool ours = r && r->registered && r->internal && r->cb == cb && r->arg == arg &&
                r->state != CA__W_ZOMBIE;
    if (ours) {
        r->internal = false; /* taken back: no drop call */
        r->owner_reaps = r->state == CA__W_WAITING;
        cancel_reg(c, r, &q);
    }
    ca__wcore_unlock(c);
    ca__wlog_flush(&q);
    return ours;
}

int ca_child_watcher_attach_loop(ca_child_watcher *w, ca_loop *loop)
{
    int r = check(w);
    if (r < 0) return r;
    return w->ops->attach_loop ? w->ops->attach_loop(w, loop) : 0;
}

int ca__child_watcher_attach_implicit(ca_child_watcher *w, ca_loop *loop)
{
    int r = check(w);
    if (r < 0) return r;
    /* Safe and Fast (their op is the shared one): the stricter rule. A custom watcher's op
     * cannot tell, and gets the call as asyncio makes it. */
    if (ca__child_watcher_is_builtin(w, NULL) &&
        ca__wcore_of(w)->kind->attach_loop == ca__wattach_attach_op)
        return ca__wattach_attach(ca__wcore_of(w), loop, true);
    return w->ops->attach_loop ? w->ops->attach_loop(w, loop) : 0;
}

bool ca_child_watcher_is_active(ca_child_watcher *w)
{
    return check(w) == 0 && w->ops->is_active(w);
}

int ca_child_watcher_close(ca_child_watcher *w)
{
    if (!w) return -EINVAL;
    if (atomic_exchange(&w->closed, true)) return 0;
    /* In a forked child the parent's threads and handlers are not ours: unref frees memory. */
    if (ca__child_watcher_forked(w)) return 0;
    return w->ops->close ? w->ops->close(w) : 0;
}

int ca_child_watcher_enter(ca_child_watcher *w)
{
    int r = check(w);
    if (r < 0) return r;
    return w->ops->enter ? w->ops->enter(w) : 0;
}

int ca_child_watcher_exit(ca_child_watcher *w)
{
    int r = check(w);
    if (r < 0) return r;
    return w->ops->exit ? w->ops->exit(w) : 0;
}

/* ----- SIGCHLD taken away ------------------------------------------------------------------ */

static atomic_bool taken_warned;

void ca__sigchld_warn_taken(ca__wlog *q, const char *kind)
{
    if (atomic_exchange(&taken_warned, true)) return;
    ca__wlog_add(q, CA_LOG_WARNING,
                 "SIGCHLD no longer reaches %s: its handler was replaced by other code (a host "
                 "that owns SIGCHLD should call ca_sigchld_notify from its own); exits are now "
                 "found by polling",
                 kind);
}
