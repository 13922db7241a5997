/* Futures: the small part of asyncio.Future that C needs. A future belongs to one loop (it
 * holds a reference to it) and its done callbacks always run through that loop. */
#include "loop_internal.h"

#include <stdlib.h>

enum { PENDING, RESULT, ERROR, CANCELLED };

struct done_cb {
    void (*fn)(ca_future *, void *);
    void *arg;
    struct done_cb *next;
};

/* Two callbacks fit in the future itself (the usual count: the user's, and
 * run_until_complete's or a second user's); more are malloc'ed. */
#define INLINE_CBS 2

struct ca_future {
    atomic_int refs;
    int state;
    int err;
    unsigned char slots_used;     /* bit i: slot[i] is in a list */
    void *result;
    ca_loop *loop;
    struct done_cb *cbs, **cbs_tail;
    struct done_cb *fired;        /* the callbacks of the completion, until they run */
    void (*owner_fn)(void *);     /* the operation completing it (ca__future_set_owner) */
    void *owner_arg;
    struct done_cb slot[INLINE_CBS];
    /* What its callbacks' entry needs when memory fails, so that completing it cannot lose them
     * (issue 16, item 4): a custom loop's future has a handle reserved; a built-in loop's
     * posts this node (its ring entry is (fn, arg), which needs a place in the ring). Last:
     * touched only then (and when a custom loop's future is made or freed), so the fields
     * above keep their cache lines. */
    union {
        ca_handle *spare;
        struct ca__post post;
    };
};

static struct done_cb *cb_alloc(ca_future *f)
{
    for (int i = 0; i < INLINE_CBS; i++) {
        if (!(f->slots_used & (1u << i))) {
            f->slots_used |= (unsigned char)(1u << i);
            return &f->slot[i];
        }
    }
    return malloc(sizeof(struct done_cb));
}

static void cb_free(ca_future *f, struct done_cb *c)
{
    if (c >= f->slot && c < f->slot + INLINE_CBS)
        f->slots_used &= (unsigned char)~(1u << (c - f->slot));
    else
        free(c);
}

static void free_list(ca_future *f, struct done_cb *c)
{
    while (c) {
        struct done_cb *next = c->next;
        cb_free(f, c);
        c = next;
    }
}

/* A built-in loop keeps up to FUT_CACHE freed futures for its next ones: a future is
 * made and freed per socket operation, and with many in flight glibc's per-thread cache
 * overflows into its slower paths. Only the thread running the loop touches the cache. */
#define FUT_CACHE 256

void ca__future_cache_free(ca_loop *loop)
{
    while (loop->fut_cache) {
        ca_future *f = loop->fut_cache;
        loop->fut_cache = f->result;
        free(f);
    }
    loop->fut_cached = 0;
}

static inline bool cache_usable(ca_loop *loop)
{
    return ca__running_here(loop) && loop->be;
}

/* A future holds a reference to its loop. Taking and dropping it is an atomic operation on a
 * cache line that other threads may write, twice per future, so the thread running the loop
 * takes them in batches: the loop's fut_bank counts references already added to loop->refs
 * that no future holds yet. The bank is touched only where the cache is (cache_usable), and
 * it is given back when the loop stops running (ca__future_bank_flush), so it never keeps a
 * loop alive that nobody runs. */
enum { BANK_CHUNK = 64, BANK_MAX = 256 };

static inline void loop_ref_own(ca_loop *loop)
{
    if (CA_UNLIKELY(loop->fut_bank == 0)) {
        atomic_fetch_add_explicit(&loop->refs, BANK_CHUNK, memory_order_relaxed);
        loop->fut_bank = BANK_CHUNK;
    }
    loop->fut_bank--;
}

static inline void loop_unref_own(ca_loop *loop)
{
    if (CA_UNLIKELY(loop->fut_bank >= BANK_MAX)) {
        /* The running loop's user holds a reference: this never drops the last one. */
        atomic_fetch_sub_explicit(&loop->refs, BANK_MAX - BANK_CHUNK, memory_order_release);
        loop->fut_bank = BANK_CHUNK;
    }
    loop->fut_bank++;
}

void ca__future_bank_flush(ca_loop *loop)
{
    if (loop->fut_bank) {
        atomic_fetch_sub_explicit(&loop->refs, (int)loop->fut_bank, memory_order_release);
        loop->fut_bank = 0;
    }
}

int ca_future_new(ca_loop *loop, ca_future **out)
{
    if (!loop || !out) return -EINVAL;
    bool own = cache_usable(loop); /* ownership first: then the fields */
    if (!own) {
        int r = ca__loop_check(loop);
        if (r) return r;
    }
    ca_future *f;
    if (own && loop->fut_cache) {
        f = loop->fut_cache;
        loop->fut_cache = f->result; /* the link */
        loop->fut_cached--;
    } else {
        f = malloc(sizeof *f);
        if (!f) return -ENOMEM;
        f->spare = NULL;
        if (!loop->be && !(f->spare = ca__handle_reserve())) {
            free(f);
            return -ENOMEM;
        }
    }
    if (own) loop_ref_own(loop);
    else ca_loop_ref(loop);
    atomic_init(&f->refs, 1);
    f->state = PENDING;
    f->err = 0;
    f->slots_used = 0;
    f->result = NULL;
    f->loop = loop;
    f->cbs = NULL;
    f->cbs_tail = &f->cbs;
    f->fired = NULL;
    f->owner_fn = NULL;
    *out = f;
    return 0;
}

/* Always an atomic add: a count of 1 does not mean the caller holds it (another thread may
 * ref a pointer it borrowed from the holder at the same time). */
ca_future *ca_future_ref(ca_future *f)
{
    if (f) atomic_fetch_add_explicit(&f->refs, 1, memory_order_relaxed);
    return f;
}

ca_future *ca_future_unref(ca_future *f)
{
    if (!f) return NULL;
    /* The last reference (the common case) needs no atomic write: with a count of 1, the
     * caller holds the only one, and nobody may use the future after it is dropped. */
    if (atomic_load_explicit(&f->refs, memory_order_acquire) != 1 &&
        atomic_fetch_sub_explicit(&f->refs, 1, memory_order_acq_rel) != 1)
        return NULL;
    free_list(f, f->cbs);
    ca_loop *loop = f->loop;
    if (cache_usable(loop)) {
        if (loop->fut_cached < FUT_CACHE) {
            f->result = loop->fut_cache;
            loop->fut_cache = f;
            loop->fut_cached++;
        } else {
            free(f);
        }
        loop_unref_own(loop);
        return NULL;
    }
    if (!loop->be) ca__handle_unreserve(f->spare);
    free(f);
    ca_loop_unref(loop);
    return NULL;
}

ca_loop *ca_future_loop(const ca_future *f) { return f ? f->loop : NULL; }

/* One ready entry per completion runs its callbacks in the order they were added (asyncio
 * schedules them one call_soon each, one after the other: nothing can run between them).
 * The entry holds a reference to the future, whose `fired` list it runs. A callback added
 * once the future is done uses that entry too when it is free (a socket operation that
 * completed at once), else an entry of its own (a small allocation). */
static void run_list(ca_future *f, struct done_cb *c)
{
    while (c) {
        struct done_cb *next = c->next;
        void (*fn)(ca_future *, void *) = c->fn;
        void *cb_arg = c->arg;
        cb_free(f, c); /* before the call: the callback may add another one */
        fn(f, cb_arg);
        c = next;
    }
    ca_future_unref(f);
}

void ca__future_run_fired(void *arg)
{
    ca_future *f = arg;
    struct done_cb *c = f->fired;
    f->fired = NULL;
    run_list(f, c);
}

/* The loop closed with the callbacks still queued: they never run, their references go. */
void ca__future_drop_fired(void *arg)
{
    ca_future *f = arg;
    struct done_cb *c = f->fired;
    f->fired = NULL;
    free_list(f, c);
    ca_future_unref(f);
}

struct late {
    ca_future *fut;
    struct done_cb *cb;
};

static void run_late(void *arg)
{
    struct late *l = arg;
    ca_future *f = l->fut;
    struct done_cb *c = l->cb;
    free(l);
    run_list(f, c);
}

static void drop_late(void *arg)
{
    struct late *l = arg;
    free_list(l->fut, l->cb);
    ca_future_unref(l->fut);
    free(l);
}

/* Hands callbacks to the loop; if the loop cannot take them (closed), they are dropped, as
 * asyncio's call_soon on a closed loop would refuse them. Memory is not a reason to lose them
 * (issue 16, item 4): a custom loop's future uses its reserved handle when none can be
 * allocated, and late callbacks that get no entry of their own join the waiting entry. */
static int schedule_cbs(ca_future *f, struct done_cb *c, bool late, bool steal)
{
    int r = -ENOMEM;
    if (!steal) ca_future_ref(f);
    if (!late || !f->fired) {
        /* the future's own entry is free: no entry of its callbacks is waiting */
        f->fired = c;
        bool be = f->loop->be != NULL;
        r = ca__loop_schedule_ex(f->loop, ca__future_run_fired, f, ca__future_drop_fired,
                                 be ? NULL : &f->spare, false);
        if (CA_UNLIKELY(r == -ENOMEM) && be) {
            /* No room in the ring: the node waits in the loop's list (the entry is free, so
             * the node is). */
            f->post = (struct ca__post){.fn = ca__future_run_fired, .arg = f};
            r = ca__loop_post_node(f->loop, &f->post);
        }
        if (r) f->fired = NULL;
        else if (CA_UNLIKELY(!be && !f->spare))
            f->spare = ca__handle_reserve(); /* used up: again if memory allows */
    } else {
        struct late *l = malloc(sizeof *l);
        if (l) {
            *l = (struct late){f, c};
            r = ca__loop_schedule(f->loop, run_late, l, drop_late);
            if (r) free(l);
        }
        if (CA_UNLIKELY(r == -ENOMEM)) {
            /* The entry of the earlier callbacks still waits and runs f->fired: these run with
             * them, at its turn rather than after what was scheduled meanwhile, but they run.
             * That entry holds a reference already. */
            struct done_cb **tail = &f->fired;
            while (*tail) tail = &(*tail)->next;
            *tail = c;
            ca_future_unref(f);
            return 0;
        }
    }
    if (r) {
        if (r == -ENOMEM)
            ca__log(CA_LOG_ERROR, "a future's done callbacks cannot be scheduled: %s",
                    ca_strerror(r));
        free_list(f, c);
        ca_future_unref(f);
    }
    return r;
}

/* steal: the caller gives one of its references to the callbacks' entry (or drops it). */
static void complete(ca_future *f, int state, void *result, int err, bool steal)
{
    f->state = state;
    f->result = result;
    f->err = err;
    if (f->owner_fn) {
        /* Completed by someone else than its operation: withdraw the operation first. */
        void (*fn)(void *) = f->owner_fn;
        f->owner_fn = NULL;
        fn(f->owner_arg);
    }
    struct done_cb *c = f->cbs;
    f->cbs = NULL;
    f->cbs_tail = &f->cbs;
    if (c) schedule_cbs(f, c, false, steal);
    else if (steal) ca_future_unref(f);
}

/* A future has no lock: its state and callback list belong to its loop's thread while the loop
 * runs (any single thread while it does not). The functions that change it refuse other threads
 * then, rather than race with the loop: -EPERM (cancel: false). */
static inline bool may_change(const ca_future *f) { return ca__loop_in_own_thread(f->loop); }

int ca_future_set_result(ca_future *f, void *result)
{
    if (!f) return -EINVAL;
    if (CA_UNLIKELY(!may_change(f))) return -EPERM;
    if (f->state != PENDING) return -EINVAL;
    complete(f, RESULT, result, 0, false);
    return 0;
}

int ca_future_set_error(ca_future *f, int err)
{
    if (!f || err >= 0) return -EINVAL;
    if (CA_UNLIKELY(!may_change(f))) return -EPERM;
    if (f->state != PENDING) return -EINVAL;
    complete(f, ERROR, NULL, err, false);
    return 0;
}

bool ca_future_cancel(ca_future *f)
{
    if (!f || CA_UNLIKELY(!may_change(f)) || f->state != PENDING) return false;
    complete(f, CANCELLED, NULL, -ECANCELED, false);
    return true;
}

bool ca_future_done(const ca_future *f) { return f && f->state != PENDING; }
bool ca_future_cancelled(const ca_future *f) { return f && f->state == CANCELLED; }

int ca_future_result(const ca_future *f, void **result)
{
    if (!f) return -EINVAL;
    switch (f->state) {
    case PENDING: return -EAGAIN;
    case CANCELLED: return -ECANCELED;
    case ERROR: return f->err;
    default:
        if (result) *result = f->result;
        return 0;
    }
}

int ca_future_add_done_callback(ca_future *f, void (*fn)(ca_future *, void *), void *arg)
{
    if (!f || !fn) return -EINVAL;
    int r = ca__loop_check(f->loop);
    if (r) return r;
    if (CA_UNLIKELY(!may_change(f))) return -EPERM;
    struct done_cb *c = cb_alloc(f);
    if (!c) return -ENOMEM;
    c->fn = fn;
    c->arg = arg;
    c->next = NULL;
    if (f->state != PENDING) return schedule_cbs(f, c, true, false);
    *f->cbs_tail = c;
    f->cbs_tail = &c->next;
    return 0;
}

int ca__future_remove_done_callback(ca_future *f, void (*fn)(ca_future *, void *), void *arg)
{
    for (struct done_cb **p = &f->cbs; *p; p = &(*p)->next) {
        struct done_cb *c = *p;
        if (c->fn == fn && c->arg == arg) {
            *p = c->next;
            if (f->cbs_tail == &c->next) f->cbs_tail = p;
            cb_free(f, c);
            return 1;
        }
    }
    return 0;
}

int ca__future_new_done(ca_loop *loop, intptr_t res, int err, ca_future **out)
{
    ca_future *f = NULL;
    int r = ca_future_new(loop, &f);
    if (r) return r;
    if (err < 0) complete(f, ERROR, NULL, err, false);
    else complete(f, RESULT, (void *)res, 0, false);
    *out = f;
    return 0;
}

void ca__future_set_owner(ca_future *f, void (*fn)(void *), void *arg)
{
    f->owner_fn = fn;
    f->owner_arg = arg;
}

void ca__future_finish(ca_future *f, int err, void *result)
{
    f->owner_fn = NULL;
    if (err < 0) complete(f, ERROR, NULL, err, true);
    else complete(f, RESULT, result, 0, true);
}
