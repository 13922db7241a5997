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

/* Two callbacks fit in the future itself (the usual count: the user's, and the socket
 * operation's cancel watch); more are malloc'ed. */
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
    struct done_cb slot[INLINE_CBS];
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
    return loop->be && ca_get_running_loop() == loop;
}

int ca_future_new(ca_loop *loop, ca_future **out)
{
    if (!loop || !out) return -EINVAL;
    int r = ca__loop_check(loop);
    if (r) return r;
    ca_future *f;
    if (cache_usable(loop) && loop->fut_cache) { /* ownership first: then the fields */
        f = loop->fut_cache;
        loop->fut_cache = f->result; /* the link */
        loop->fut_cached--;
    } else {
        f = malloc(sizeof *f);
        if (!f) return -ENOMEM;
    }
    atomic_init(&f->refs, 1);
    f->state = PENDING;
    f->err = 0;
    f->slots_used = 0;
    f->result = NULL;
    f->loop = ca_loop_ref(loop);
    f->cbs = NULL;
    f->cbs_tail = &f->cbs;
    f->fired = NULL;
    *out = f;
    return 0;
}

ca_future *ca_future_ref(ca_future *f)
{
    if (f) atomic_fetch_add_explicit(&f->refs, 1, memory_order_relaxed);
    return f;
}

ca_future *ca_future_unref(ca_future *f)
{
    if (!f || atomic_fetch_sub_explicit(&f->refs, 1, memory_order_acq_rel) != 1) return NULL;
    free_list(f, f->cbs);
    ca_loop *loop = f->loop;
    if (cache_usable(loop) && loop->fut_cached < FUT_CACHE) {
        f->result = loop->fut_cache;
        loop->fut_cache = f;
        loop->fut_cached++;
    } else {
        free(f);
    }
    ca_loop_unref(loop); /* after: the loop frees its cache when it goes */
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
 * asyncio's call_soon on a closed loop would refuse them. */
static int schedule_cbs(ca_future *f, struct done_cb *c, bool late)
{
    int r = -ENOMEM;
    ca_future_ref(f);
    if (!late || !f->fired) {
        /* the future's own entry is free: no entry of its callbacks is waiting */
        f->fired = c;
        r = ca__loop_schedule(f->loop, ca__future_run_fired, f, ca__future_drop_fired);
        if (r) f->fired = NULL;
    } else {
        struct late *l = malloc(sizeof *l);
        if (l) {
            *l = (struct late){f, c};
            r = ca__loop_schedule(f->loop, run_late, l, drop_late);
            if (r) free(l);
        }
    }
    if (r) {
        free_list(f, c);
        ca_future_unref(f);
    }
    return r;
}

static void complete(ca_future *f, int state, void *result, int err)
{
    f->state = state;
    f->result = result;
    f->err = err;
    struct done_cb *c = f->cbs;
    f->cbs = NULL;
    f->cbs_tail = &f->cbs;
    if (c) schedule_cbs(f, c, false);
}

int ca_future_set_result(ca_future *f, void *result)
{
    if (!f || f->state != PENDING) return -EINVAL;
    complete(f, RESULT, result, 0);
    return 0;
}

int ca_future_set_error(ca_future *f, int err)
{
    if (!f || err >= 0 || f->state != PENDING) return -EINVAL;
    complete(f, ERROR, NULL, err);
    return 0;
}

bool ca_future_cancel(ca_future *f)
{
    if (!f || f->state != PENDING) return false;
    complete(f, CANCELLED, NULL, -ECANCELED);
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
    struct done_cb *c = cb_alloc(f);
    if (!c) return -ENOMEM;
    c->fn = fn;
    c->arg = arg;
    c->next = NULL;
    if (f->state != PENDING) return schedule_cbs(f, c, true);
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
