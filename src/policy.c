/*
 * Event loop policies (asyncio's AbstractEventLoopPolicy) and the process-wide policy.
 *
 * A policy is an ops table, the user's data, an optional base policy and a reference count.
 * A NULL op falls through to the base, which is how C "subclasses" a policy; the built-in
 * policies are four ops tables over the same per-thread state, made the same way.
 *
 * Concurrency, in three parts:
 * - The process policy is one atomic pointer. Readers take a reference to it under a hazard
 *   pointer (one slot per thread, published before re-checking the pointer), and a writer
 *   swaps the pointer, then waits until no slot still names the old policy before dropping
 *   the process's reference. So a policy stays alive while any call on it is in progress,
 *   without a lock on the readers' side.
 * - The per-thread state of the built-in policies (which loop is current in which thread) is
 *   a set of entries, each on two lists: its thread's and its policy's. One mutex protects
 *   both lists, so that a thread's exit and a policy's destruction, which can happen at the
 *   same time in two threads, each find and release the entries they share exactly once.
 * - The hot path, ca_get_event_loop() in a thread whose loop is set, reads a thread-local
 *   cache: the loop and the "stamp" of the process policy it was read under. The stamp
 *   changes whenever the process policy is replaced and after fork(); the thread's own
 *   set_event_loop clears its cache. Only built-in get_event_loop ops are cached, since a
 *   custom op must be called every time.
 */
#include "internal.h"
#include "kinds.h"
#include "watcher_internal.h"

#include <pthread.h>
#include <sched.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

/* Thread-locals read on the hot path use the initial-exec model: a plain %fs-relative load,
 * instead of a call to __tls_get_addr in the shared library. */
#if defined(__GNUC__) || defined(__clang__)
#define CA_TLS_FAST __attribute__((tls_model("initial-exec")))
#else
#define CA_TLS_FAST
#endif

struct ca__pstate;

struct ca_policy {
    atomic_long refs;
    const ca_policy_ops *ops;
    void *data;                  /* the custom policy's data (NULL for built-in ones) */
    ca_policy *base;             /* strong reference, or NULL */
    struct ca__pstate *state;    /* built-in policies: their per-thread loops and watcher */
    bool immortal;               /* the first default policy is static: never freed */
};

/* One thread's current loop under one built-in policy (asyncio's _Local). */
struct entry {
    struct ca__pstate *st;
    struct tctx *thr;
    struct entry *tnext, *tprev; /* the thread's entries */
    struct entry *snext, *sprev; /* the policy's entries */
    ca_loop *loop;               /* strong reference, or NULL */
    unsigned gen;                /* fork generation the entry was written in */
    bool set_called;
};

/* A built-in policy's state. Both members are protected by g_lock. */
struct ca__pstate {
    struct entry *head;
    ca_child_watcher *watcher;   /* strong reference, or NULL */
    /* The kind of watcher to make next (a forked child's replacement for the parent's), or
     * NULL for the default (Threaded). Points to a string literal. */
    const char *fresh_kind;
};

/* A hazard slot: names the policy a reader is about to take a reference to. Slots are never
 * freed (a thread that exits gives its slot back for reuse), so a writer may walk the list
 * at any time. */
struct hp_rec {
    _Atomic(ca_policy *) hp;
    atomic_bool used;
    struct hp_rec *next;         /* written once, before the slot is published */
};

/* A thread's context. Other threads touch `head` (under g_lock) when they destroy a policy
 * this thread has an entry in. */
struct tctx {
    struct entry *head;
    struct hp_rec *hp;
    bool keyed;                  /* the exit destructor is registered for this thread */
};

/* ----- process-wide state ----------------------------------------------------------------- */

static _Atomic(ca_policy *) g_policy;
/* Changes when g_policy is replaced and after fork(); 0 is never a valid stamp, so a zeroed
 * cache never matches. */
static _Atomic(uint64_t) g_stamp = 1;
/* Serialises policy replacement (and the first default's creation, with the CAS below). */
static pthread_mutex_t g_set_lock = PTHREAD_MUTEX_INITIALIZER;
/* Protects entry lists and the built-in policies' watchers; never held while calling out. */
static pthread_mutex_t g_lock = PTHREAD_MUTEX_INITIALIZER;
static _Atomic(struct hp_rec *) g_hp_head;
static pthread_key_t g_key;
static bool g_key_ok;

static _Thread_local struct tctx tl_ctx;
static _Thread_local struct {
    uint64_t stamp;
    ca_loop *loop;
} tl_hot CA_TLS_FAST;
/* The policy on which the outermost policy call of this thread was made, so that a built-in
 * op reached through a base ("super") calls the derived policy's overrides, as Python's
 * self.new_event_loop() does. */
static _Thread_local ca_policy *tl_outer;
static _Thread_local struct {
    unsigned gen;
    bool known, is_main;
} tl_main;

static void pstate_release(struct ca__pstate *st);

/* ----- small helpers ---------------------------------------------------------------------- */

/* Python's "current_thread() is main_thread()", fork-correct: in a child made by fork(), the
 * thread that forked is the main thread. */
static bool is_main_thread(void)
{
    unsigned gen = ca__fork_gen();
    if (!tl_main.known || tl_main.gen != gen) {
        tl_main.is_main = gettid() == getpid();
        tl_main.gen = gen;
        tl_main.known = true;
    }
    return tl_main.is_main;
}

static void hot_clear(void)
{
    tl_hot.loop = NULL;
    tl_hot.stamp = 0;
}

static void thread_register(void)
{
    if (!tl_ctx.keyed && g_key_ok && pthread_setspecific(g_key, &tl_ctx) == 0)
        tl_ctx.keyed = true;
}

/* Entries: call with g_lock held. */
static struct entry *entry_find(struct ca__pstate *st)
{
    for (struct entry *e = tl_ctx.head; e; e = e->tnext)
        if (e->st == st) return e;
    return NULL;
}

static void entry_unlink_thread(struct entry *e)
{
    if (e->tprev) e->tprev->tnext = e->tnext;
    else e->thr->head = e->tnext;
    if (e->tnext) e->tnext->tprev = e->tprev;
}

static void entry_unlink_state(struct entry *e)
{
    if (e->sprev) e->sprev->snext = e->snext;
    else e->st->head = e->snext;
    if (e->snext) e->snext->sprev = e->sprev;
}

/* Releases a list of entries chained through tnext, outside g_lock: unref may close a loop,
 * and closing runs other units' hooks. */
static void entries_free(struct entry *dead)
{
    while (dead) {
        struct entry *next = dead->tnext;
        ca_loop_unref(dead->loop);
        free(dead);
        dead = next;
    }
}

/* This thread's entry for st as it stands in this process: an entry written before a fork
 * is treated as never set (Python 3.12 resets the policy's thread-local state in the child),
 * and its loop, the parent's, is handed back in *stale for the caller to unref outside the
 * lock (which only frees memory: the core knows the loop is the parent's). g_lock held. */
static struct entry *entry_current(struct ca__pstate *st, ca_loop **stale)
{
    struct entry *e = entry_find(st);
    if (e && e->gen != ca__fork_gen()) {
        *stale = e->loop;
        e->loop = NULL;
        e->set_called = false;
        e->gen = ca__fork_gen();
    }
    return e;
}

/* ----- thread exit and fork --------------------------------------------------------------- */

static void thread_exit(void *arg)
{
    struct tctx *c = arg;
    struct entry *dead = NULL;
    pthread_mutex_lock(&g_lock);
    while (c->head) {
        struct entry *e = c->head;
        c->head = e->tnext;
        entry_unlink_state(e);
        e->tnext = dead;
        dead = e;
    }
    pthread_mutex_unlock(&g_lock);
    entries_free(dead);
    if (c->hp) {
        atomic_store(&c->hp->hp, NULL);
        atomic_store_explicit(&c->hp->used, false, memory_order_release);
        c->hp = NULL;
    }
    hot_clear();
    c->keyed = false;
}

static void fork_prepare(void)
{
    pthread_mutex_lock(&g_set_lock);
    pthread_mutex_lock(&g_lock);
}

static void fork_parent(void)
{
    pthread_mutex_unlock(&g_lock);
    pthread_mutex_unlock(&g_set_lock);
}

/* In the child only this thread exists: the hazard slots of the others are free (a reader
 * caught between publishing and clearing its slot would otherwise block every later policy
 * replacement), and every cached loop is the parent's. */
static void fork_child(void)
{
    pthread_mutex_unlock(&g_lock);
    pthread_mutex_unlock(&g_set_lock);
    for (struct hp_rec *r = atomic_load(&g_hp_head); r; r = r->next) {
        atomic_store(&r->hp, NULL);
        if (r != tl_ctx.hp) atomic_store(&r->used, false);
    }
    atomic_fetch_add(&g_stamp, 1);
    hot_clear();
}

__attribute__((constructor)) static void policy_init(void)
{
    ca__fork_init();
    g_key_ok = pthread_key_create(&g_key, thread_exit) == 0;
    pthread_atfork(fork_prepare, fork_parent, fork_child);
}

/* ----- policy objects and dispatch -------------------------------------------------------- */

static int policy_make(const ca_policy_ops *ops, void *data, ca_policy *base,
                       struct ca__pstate *state, ca_policy **out)
{
    ca_policy *p = calloc(1, sizeof *p);
    if (!p) return -ENOMEM;
    atomic_init(&p->refs, 1);
    p->ops = ops;
    p->data = data;
    p->base = base ? ca_policy_ref(base) : NULL;
    p->state = state;
    *out = p;
    return 0;
}

int ca_policy_new(const ca_policy_ops *ops, void *data, ca_policy *base, ca_policy **out)
{
    if (!ops || !out) return -EINVAL;
    return policy_make(ops, data, base, NULL, out);
}

void *ca_policy_data(ca_policy *policy) { return policy ? policy->data : NULL; }

ca_policy *ca_policy_base(ca_policy *policy) { return policy ? policy->base : NULL; }

ca_policy *ca_policy_ref(ca_policy *policy)
{
    if (policy) atomic_fetch_add_explicit(&policy->refs, 1, memory_order_relaxed);
    return policy;
}

ca_policy *ca_policy_unref(ca_policy *policy)
{
    /* acq_rel rather than release plus an acquire fence: ThreadSanitizer does not model
     * fences, and the destroy below must see every other holder's writes. */
    if (!policy || atomic_fetch_sub_explicit(&policy->refs, 1, memory_order_acq_rel) != 1)
        return NULL;
    if (policy->ops->destroy) policy->ops->destroy(policy);
    ca_policy_unref(policy->base);
    if (!policy->immortal) free(policy);
    return NULL;
}

/* The first policy in p's chain whose op `member` is not NULL: the one a call resolves to. */
#define RESOLVE(p, member)                                                                    \
    __extension__({                                                                           \
        ca_policy *q_ = (p);                                                                  \
        while (q_ && !q_->ops->member) q_ = q_->base;                                         \
        q_;                                                                                   \
    })

static bool in_chain(const ca_policy *outer, const ca_policy *p)
{
    for (; outer; outer = outer->base)
        if (outer == p) return true;
    return false;
}

/* Marks p as the derived policy for the duration of an op, unless the call is a "super" call
 * made while a policy derived from p is already the outer one. Returns what to restore. */
static ca_policy *outer_enter(ca_policy *p)
{
    ca_policy *saved = tl_outer;
    if (!saved || !in_chain(saved, p)) tl_outer = p;
    return saved;
}

static ca_policy *outer_of(ca_policy *self) { return tl_outer ? tl_outer : self; }

int ca_policy_get_event_loop(ca_policy *policy, ca_loop **out)
{
    if (!policy || !out) return -EINVAL;
    ca_policy *q = RESOLVE(policy, get_event_loop);
    if (!q) return -ENOTSUP;
    ca_policy *saved = outer_enter(policy);
    ca_loop *loop = NULL;
    int r = q->ops->get_event_loop(q, &loop);
    tl_outer = saved;
    if (r < 0) return r;
    if (!loop) return -ENOENT; /* "should never return None": treated as no loop */
    *out = loop;
    return 0;
}

int ca_policy_set_event_loop(ca_policy *policy, ca_loop *loop)
{
    if (!policy) return -EINVAL;
    ca_policy *q = RESOLVE(policy, set_event_loop);
    if (!q) return -ENOTSUP;
    ca_policy *saved = outer_enter(policy);
    int r = q->ops->set_event_loop(q, loop);
    tl_outer = saved;
    return r < 0 ? r : 0;
}

int ca_policy_new_event_loop(ca_policy *policy, ca_loop **out)
{
    if (!policy || !out) return -EINVAL;
    ca_policy *q = RESOLVE(policy, new_event_loop);
    if (!q) return -ENOTSUP;
    ca_policy *saved = outer_enter(policy);
    ca_loop *loop = NULL;
    int r = q->ops->new_event_loop(q, &loop);
    tl_outer = saved;
    if (r < 0) return r;
    if (!loop) return -EINVAL; /* a broken op: "should never return None" */
    *out = loop;
    return 0;
}

int ca_policy_get_child_watcher(ca_policy *policy, ca_child_watcher **out)
{
    if (!policy || !out) return -EINVAL;
    ca_policy *q = RESOLVE(policy, get_child_watcher);
    if (!q) return -ENOTSUP;
    ca_policy *saved = outer_enter(policy);
    ca_child_watcher *w = NULL;
    int r = q->ops->get_child_watcher(q, &w);
    tl_outer = saved;
    if (r < 0) return r;
    if (!w) return -ENOENT;
    *out = w;
    return 0;
}

int ca_policy_set_child_watcher(ca_policy *policy, ca_child_watcher *watcher)
{
    if (!policy) return -EINVAL;
    ca_policy *q = RESOLVE(policy, set_child_watcher);
    if (!q) return -ENOTSUP;
    ca_policy *saved = outer_enter(policy);
    int r = q->ops->set_child_watcher(q, watcher);
    tl_outer = saved;
    return r < 0 ? r : 0;
}

/* ----- the built-in policies (BaseDefaultEventLoopPolicy + _UnixDefaultEventLoopPolicy) ---- */

static int builtin_set_event_loop(ca_policy *self, ca_loop *loop);
static ca_child_watcher *watcher_take_stale(struct ca__pstate *st);

/* The built-in get_event_loop. With take_ref, the loop is returned with a reference taken under
 * g_lock (ca__get_event_loop_ref); without, it is borrowed from this thread's entry, which only
 * this thread's set_event_loop or the policy's destruction (prevented by the caller's reference
 * to the policy) can replace. */
static int builtin_get_loop(ca_policy *self, ca_loop **out, bool take_ref)
{
    struct ca__pstate *st = self->state;
    ca_loop *stale = NULL;
    pthread_mutex_lock(&g_lock);
    struct entry *e = entry_current(st, &stale);
    ca_loop *loop = e ? e->loop : NULL;
    if (loop && take_ref) ca_loop_ref(loop);
    bool set_called = e && e->set_called;
    pthread_mutex_unlock(&g_lock);
    if (stale) {
        hot_clear();
        ca_loop_unref(stale);
    }
    if (loop) {
        *out = loop;
        return 0;
    }
    if (set_called || !is_main_thread()) return -ENOENT;
    /* self.set_event_loop(self.new_event_loop()), through the derived policy's overrides. */
    ca_policy *outer = outer_of(self);
    ca_loop *fresh = NULL;
    int r = ca_policy_new_event_loop(outer, &fresh);
    if (r < 0) return r;
    r = ca_policy_set_event_loop(outer, fresh);
    ca_loop_unref(fresh);
    if (r < 0) return r;
    pthread_mutex_lock(&g_lock);
    e = entry_find(st);
    loop = e ? e->loop : NULL;
    if (loop && take_ref) ca_loop_ref(loop);
    pthread_mutex_unlock(&g_lock);
    if (!loop) return -ENOENT;
    *out = loop;
    return 0;
}

static int builtin_get_event_loop(ca_policy *self, ca_loop **out)
{
    return builtin_get_loop(self, out, false);
}

static int builtin_set_event_loop(ca_policy *self, ca_loop *loop)
{
    struct ca__pstate *st = self->state;
    ca_loop *stale = NULL;
    pthread_mutex_lock(&g_lock);
    struct entry *e = entry_current(st, &stale);
    if (!e) {
        e = calloc(1, sizeof *e);
        if (!e) {
            pthread_mutex_unlock(&g_lock);
            ca_loop_unref(stale);
            return -ENOMEM;
        }
        e->st = st;
        e->thr = &tl_ctx;
        e->tnext = tl_ctx.head;
        if (e->tnext) e->tnext->tprev = e;
        tl_ctx.head = e;
        e->snext = st->head;
        if (e->snext) e->snext->sprev = e;
        st->head = e;
    }
    ca_loop *old = e->loop;
    e->loop = loop ? ca_loop_ref(loop) : NULL;
    e->set_called = true;
    e->gen = ca__fork_gen();
    bool main_thread = is_main_thread();
    ca_child_watcher *gone = watcher_take_stale(st);
    ca_child_watcher *w = main_thread && st->watcher ? ca_child_watcher_ref(st->watcher) : NULL;
    pthread_mutex_unlock(&g_lock);
    ca_child_watcher_unref(gone);
    thread_register();
    hot_clear();
    /* Attach before dropping the old loop: its last reference closes it, and a watcher
     * should move to the new loop rather than see its loop closed under it. */
    int r = 0;
    if (w) {
        r = ca__child_watcher_attach_implicit(w, loop);
        if (r == -EPERM) {
            /* A loop concerned is another thread's (running there, or Safe/Fast attached to it
             * by that thread): the watcher stays where it is, and the loop is set all the same
             * (see ca_set_event_loop in the header). */
            r = 0;
        } else if (r == -EBADF) {
            /* Closed by another thread's set_child_watcher, which installed its successor
             * first: nothing of ours to attach (the successor is attached by its installer). */
            pthread_mutex_lock(&g_lock);
            if (st->watcher != w) r = 0;
            pthread_mutex_unlock(&g_lock);
        }
        ca_child_watcher_unref(w);
    }
    ca_loop_unref(old);
    ca_loop_unref(stale);
    return r;
}

/* A watcher made before a fork() belongs to the parent (its threads, its signal handler and
 * its loop are not ours): in a child, the policy treats it as gone. It takes it out of the
 * state under g_lock (the caller drops the reference outside the lock, which frees only this
 * process's copy of the memory: watchers never close themselves in a forked child) and
 * remembers its kind, so that the next get_child_watcher makes a fresh watcher of that kind. */
static ca_child_watcher *watcher_take_stale(struct ca__pstate *st)
{
    ca_child_watcher *w = st->watcher;
    if (!w || !ca__child_watcher_forked(w)) return NULL;
    st->fresh_kind = ca__child_watcher_kind(w);
    st->watcher = NULL;
    return w;
}

/* A new watcher of the kind named by ca__child_watcher_kind (the parent's, in a forked child);
 * the Threaded one for NULL, a custom kind, or a kind that cannot be made here. */
static int watcher_make(const char *kind, ca_child_watcher **out)
{
    const ca__watcher_kind *k = kind ? ca__watcher_kind_find(kind) : NULL;
    if (k && k->make(out) == 0) return 0;
    return ca_threaded_child_watcher_new(out);
}

/* The built-in get_child_watcher. The watcher is process-wide and any thread may replace it:
 * with take_ref its reference is taken under g_lock, the lock set_child_watcher replaces it
 * under (ca__get_child_watcher_ref); without, it is borrowed, as the public op returns it. */
static int builtin_get_watcher(ca_policy *self, ca_child_watcher **out, bool take_ref)
{
    struct ca__pstate *st = self->state;
    pthread_mutex_lock(&g_lock);
    ca_child_watcher *stale = watcher_take_stale(st);
    ca_child_watcher *w = st->watcher;
    if (w && take_ref) ca_child_watcher_ref(w);
    const char *kind = st->fresh_kind;
    pthread_mutex_unlock(&g_lock);
    ca_child_watcher_unref(stale);
    if (w) {
        *out = w;
        return 0;
    }
    /* Made outside the lock (it may take the watcher unit's locks); the first to install one
     * wins, as under Python's events._lock. */
    ca_child_watcher *fresh = NULL;
    int r = watcher_make(kind, &fresh);
    if (r < 0) return r;
    ca_loop *current = NULL, *stale_loop = NULL;
    bool installed = false;
    bool main_thread = is_main_thread();
    pthread_mutex_lock(&g_lock);
    stale = watcher_take_stale(st);
    if (!st->watcher) {
        st->watcher = fresh;
        st->fresh_kind = NULL;
        installed = true;
        struct entry *e = main_thread ? entry_current(st, &stale_loop) : NULL;
        if (e && e->loop) current = ca_loop_ref(e->loop);
    }
    w = st->watcher;
    if (take_ref) ca_child_watcher_ref(w);
    pthread_mutex_unlock(&g_lock);
    ca_child_watcher_unref(stale);
    if (stale_loop) hot_clear();
    ca_loop_unref(stale_loop);
    if (!installed) {
        ca_child_watcher_close(fresh);
        ca_child_watcher_unref(fresh);
    } else if (current) {
        /* As Python 3.7-3.10's _init_watcher did in the main thread: the loop-bound kinds
         * (MultiLoop, Safe, Fast, Pidfd) need it, and a forked child may have made one. */
        ca__child_watcher_attach_implicit(fresh, current);
    }
    ca_loop_unref(current);
    *out = w;
    return 0;
}

static int builtin_get_child_watcher(ca_policy *self, ca_child_watcher **out)
{
    return builtin_get_watcher(self, out, false);
}

static int builtin_set_child_watcher(ca_policy *self, ca_child_watcher *watcher)
{
    struct ca__pstate *st = self->state;
    if (watcher) ca_child_watcher_ref(watcher);
    pthread_mutex_lock(&g_lock);
    ca_child_watcher *old = st->watcher;
    st->watcher = watcher;
    st->fresh_kind = NULL;
    pthread_mutex_unlock(&g_lock);
    /* 3.11 closes the previous watcher; setting the same watcher again does not close it. */
    if (old && old != watcher) ca_child_watcher_close(old);
    ca_child_watcher_unref(old);
    return 0;
}

static void builtin_destroy(ca_policy *self)
{
    pstate_release(self->state);
    if (!self->immortal) free(self->state);
}

static void pstate_release(struct ca__pstate *st)
{
    struct entry *dead = NULL;
    pthread_mutex_lock(&g_lock);
    while (st->head) {
        struct entry *e = st->head;
        st->head = e->snext;
        entry_unlink_thread(e);
        e->tnext = dead;
        dead = e;
    }
    ca_child_watcher *w = st->watcher;
    st->watcher = NULL;
    pthread_mutex_unlock(&g_lock);
    entries_free(dead);
    ca_child_watcher_unref(w);
}

static int selector_new_event_loop(ca_policy *self, ca_loop **out)
{
    return ca_selector_loop_new(out);
}

static int poll_new_event_loop(ca_policy *self, ca_loop **out) { return ca_poll_loop_new(out); }

static int proactor_new_event_loop(ca_policy *self, ca_loop **out)
{
    return ca_proactor_loop_new(out);
}

#define BUILTIN_OPS(factory)                                                                  \
    {                                                                                         \
        .get_event_loop = builtin_get_event_loop,                                             \
        .set_event_loop = builtin_set_event_loop,                                             \
        .new_event_loop = (factory),                                                          \
        .get_child_watcher = builtin_get_child_watcher,                                       \
        .set_child_watcher = builtin_set_child_watcher,                                       \
        .destroy = builtin_destroy,                                                           \
    }

static const ca_policy_ops default_ops = BUILTIN_OPS(selector_new_event_loop);
static const ca_policy_ops selector_ops = BUILTIN_OPS(selector_new_event_loop);
static const ca_policy_ops poll_ops = BUILTIN_OPS(poll_new_event_loop);
static const ca_policy_ops proactor_ops = BUILTIN_OPS(proactor_new_event_loop);

static int builtin_new(const ca_policy_ops *ops, ca_policy **out)
{
    if (!out) return -EINVAL;
    struct ca__pstate *st = calloc(1, sizeof *st);
    if (!st) return -ENOMEM;
    int r = policy_make(ops, NULL, NULL, st, out);
    if (r < 0) free(st);
    return r;
}

int ca_default_policy_new(ca_policy **out) { return builtin_new(&default_ops, out); }
int ca_selector_policy_new(ca_policy **out) { return builtin_new(&selector_ops, out); }
int ca_poll_policy_new(ca_policy **out) { return builtin_new(&poll_ops, out); }

int ca_proactor_policy_new(ca_policy **out)
{
    if (!out) return -EINVAL;
    /* Like WindowsProactorEventLoopPolicy where there is no proactor: refuse at creation,
     * rather than hand out a policy whose every loop fails. */
    ca_loop *probe = NULL;
    int r = ca_proactor_loop_new(&probe);
    if (r < 0) return r;
    ca_loop_close(probe);
    ca_loop_unref(probe);
    return builtin_new(&proactor_ops, out);
}

/* ----- the process policy ------------------------------------------------------------------ */

/* The first default policy is static, so that ca_get_event_loop_policy() can never fail. */
static struct ca__pstate g_first_state;
static ca_policy g_first_default = {
    .refs = 1,
    .ops = &default_ops,
    .state = &g_first_state,
    .immortal = true,
};

/* The process policy (borrowed). g_policy is NULL only until the first call installs the
 * static default; it is never NULL again afterwards. */
static ca_policy *policy_current(void)
{
    ca_policy *p = atomic_load(&g_policy);
    if (CA_LIKELY(p != NULL)) return p;
    ca_policy *expected = NULL;
    if (atomic_compare_exchange_strong(&g_policy, &expected, &g_first_default))
        return &g_first_default;
    return expected;
}

/* This thread's hazard slot, taken from the free ones or made on first use; NULL only when
 * out of memory. */
static struct hp_rec *hp_mine(void)
{
    struct hp_rec *r = tl_ctx.hp;
    if (CA_LIKELY(r != NULL)) return r;
    for (r = atomic_load_explicit(&g_hp_head, memory_order_acquire); r; r = r->next) {
        bool expected = false;
        if (!atomic_load_explicit(&r->used, memory_order_relaxed) &&
            atomic_compare_exchange_strong(&r->used, &expected, true))
            break;
    }
    if (!r) {
        r = calloc(1, sizeof *r);
        if (!r) return NULL;
        atomic_init(&r->used, true);
        atomic_init(&r->hp, NULL);
        r->next = atomic_load_explicit(&g_hp_head, memory_order_relaxed);
        while (!atomic_compare_exchange_weak_explicit(&g_hp_head, &r->next, r,
                                                      memory_order_release, memory_order_relaxed)) {
        }
    }
    tl_ctx.hp = r;
    thread_register();
    return r;
}

/* A reference to the process policy, safe against a concurrent replacement: the slot is
 * published (seq_cst) before the pointer is read again, and a writer reads every slot
 * (seq_cst) after swapping the pointer, so either we see the new pointer and retry, or the
 * writer sees our slot and waits before dropping its reference. Never NULL. */
static ca_policy *policy_acquire(void)
{
    struct hp_rec *rec = hp_mine();
    if (CA_UNLIKELY(rec == NULL)) {
        /* Writers swap under g_set_lock, so holding it is as good as a slot. */
        pthread_mutex_lock(&g_set_lock);
        ca_policy *p = ca_policy_ref(policy_current());
        pthread_mutex_unlock(&g_set_lock);
        return p;
    }
    for (;;) {
        ca_policy *p = policy_current();
        atomic_store(&rec->hp, p);
        if (atomic_load(&g_policy) == p) {
            ca_policy_ref(p);
            atomic_store_explicit(&rec->hp, NULL, memory_order_release);
            return p;
        }
    }
}

static void hazard_wait(const ca_policy *old)
{
    for (struct hp_rec *r = atomic_load(&g_hp_head); r; r = r->next)
        while (atomic_load(&r->hp) == old) sched_yield();
}

ca_policy *ca_get_event_loop_policy(void) { return policy_current(); }

int ca_set_event_loop_policy(ca_policy *policy)
{
    ca_policy *mine = NULL;
    if (policy) {
        mine = ca_policy_ref(policy);
    } else {
        int r = ca_default_policy_new(&mine);
        if (r < 0) return r;
    }
    pthread_mutex_lock(&g_set_lock);
    ca_policy *old = atomic_exchange(&g_policy, mine);
    atomic_fetch_add(&g_stamp, 1);
    pthread_mutex_unlock(&g_set_lock);
    if (old) {
        hazard_wait(old);
        ca_policy_unref(old);
    }
    return 0;
}

/* Kept out of line so that the hot path below needs no stack frame beyond one register. */
__attribute__((noinline)) static int get_event_loop_slow(ca_loop **out)
{
    /* The stamp is read before the policy: a cache entry may then name an older stamp than
     * the policy it was read from (a harmless miss), never a newer one. */
    uint64_t stamp = atomic_load(&g_stamp);
    ca_policy *p = policy_acquire();
    ca_loop *loop = NULL;
    int r = ca_policy_get_event_loop(p, &loop);
    if (r == 0) {
        if (RESOLVE(p, get_event_loop)->ops->get_event_loop == builtin_get_event_loop) {
            tl_hot.loop = loop;
            tl_hot.stamp = stamp;
        }
        *out = loop;
    }
    ca_policy_unref(p);
    return r;
}

int ca_get_event_loop(ca_loop **out)
{
    if (CA_UNLIKELY(out == NULL)) return -EINVAL;
    ca_loop *loop = ca_get_running_loop();
    if (loop) {
        *out = loop;
        return 0;
    }
    loop = tl_hot.loop;
    if (CA_LIKELY(loop != NULL) &&
        tl_hot.stamp == atomic_load_explicit(&g_stamp, memory_order_relaxed)) {
        *out = loop;
        return 0;
    }
    return get_event_loop_slow(out);
}

int ca_set_event_loop(ca_loop *loop)
{
    ca_policy *p = policy_acquire();
    int r = ca_policy_set_event_loop(p, loop);
    ca_policy_unref(p);
    return r;
}

int ca_new_event_loop(ca_loop **out)
{
    if (!out) return -EINVAL;
    ca_policy *p = policy_acquire();
    int r = ca_policy_new_event_loop(p, out);
    ca_policy_unref(p);
    return r;
}

int ca_get_child_watcher(ca_child_watcher **out)
{
    if (!out) return -EINVAL;
    ca_policy *p = policy_acquire();
    int r = ca_policy_get_child_watcher(p, out);
    ca_policy_unref(p);
    return r;
}

int ca_set_child_watcher(ca_child_watcher *watcher)
{
    ca_policy *p = policy_acquire();
    int r = ca_policy_set_child_watcher(p, watcher);
    ca_policy_unref(p);
    return r;
}

/* ----- for the runner ---------------------------------------------------------------------- */

ca_policy *ca__policy_acquire(void) { return policy_acquire(); }

ca_loop *ca__policy_current_loop(ca_policy *policy)
{
    ca_policy *q = RESOLVE(policy, get_event_loop);
    if (!q) return NULL;
    ca_loop *loop = NULL;
    if (q->ops->get_event_loop != builtin_get_event_loop) {
        if (ca_policy_get_event_loop(policy, &loop) < 0) return NULL;
        return ca_loop_ref(loop);
    }
    /* Read the state directly: the op would create a loop in the main thread. */
    ca_loop *stale = NULL;
    pthread_mutex_lock(&g_lock);
    struct entry *e = entry_current(q->state, &stale);
    if (e && e->loop) loop = ca_loop_ref(e->loop);
    pthread_mutex_unlock(&g_lock);
    if (stale) {
        hot_clear();
        ca_loop_unref(stale);
    }
    return loop;
}

/* ----- get-and-ref, for the library's own lookups ------------------------------------------- */

/* Both hold a reference to the process policy across the op and the reference taken on its
 * result: a policy replaced meanwhile is destroyed (and drops what it owns) only after that.
 * The built-in ops take the result's reference under g_lock, which also serialises their
 * set_* ops. A custom op returns a borrowed pointer: the reference is taken as soon as it
 * returns, and the header asks custom policies to keep what their get_* op returned alive
 * until the op that replaces it returns (no library lock can cover a user op). */

int ca__get_event_loop_ref(ca_loop **out)
{
    if (!out) return -EINVAL;
    ca_loop *loop = ca_get_running_loop();
    if (loop) {
        /* Running in this thread: nobody can close it under us, and its owner's reference
         * outlives the run (ca_loop_unref of a running loop is the caller's bug). */
        *out = ca_loop_ref(loop);
        return 0;
    }
    ca_policy *p = policy_acquire();
    ca_policy *q = RESOLVE(p, get_event_loop);
    int r;
    if (!q) {
        r = -ENOTSUP;
    } else if (q->ops->get_event_loop == builtin_get_event_loop) {
        ca_policy *saved = outer_enter(p);
        r = builtin_get_loop(q, &loop, true);
        tl_outer = saved;
    } else {
        r = ca_policy_get_event_loop(p, &loop);
        if (r == 0) ca_loop_ref(loop);
    }
    ca_policy_unref(p);
    if (r == 0) *out = loop;
    return r;
}

int ca__get_child_watcher_ref(ca_child_watcher **out)
{
    if (!out) return -EINVAL;
    ca_policy *p = policy_acquire();
    ca_policy *q = RESOLVE(p, get_child_watcher);
    ca_child_watcher *w = NULL;
    int r;
    if (!q) {
        r = -ENOTSUP;
    } else if (q->ops->get_child_watcher == builtin_get_child_watcher) {
        ca_policy *saved = outer_enter(p);
        r = builtin_get_watcher(q, &w, true);
        tl_outer = saved;
    } else {
        r = ca_policy_get_child_watcher(p, &w);
        if (r == 0) ca_child_watcher_ref(w);
    }
    ca_policy_unref(p);
    if (r == 0) *out = w;
    return r;
}
