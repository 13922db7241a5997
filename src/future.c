/* Futures: the small part of asyncio.Future that C needs. A future belongs to one loop (it
 * holds a reference to it) and its done callbacks always run through that loop. */
#include "loop_internal.h"

#include <stdlib.h>

enum { PENDING, RESULT, ERROR, CANCELLED };

struct done_cb {
    void (*fn)(ca_future *, void *);
    void *arg;
    ca_future *fut; /* a reference, from scheduling until the callback ran */
    struct done_cb *next;
};

struct ca_future {
    atomic_int refs;
    int state;
    int err;
    void *result;
    ca_loop *loop;
    struct done_cb *cbs, **cbs_tail;
};

int ca_future_new(ca_loop *loop, ca_future **out)
{
    if (!loop || !out) return -EINVAL;
    int r = ca__loop_check(loop);
    if (r) return r;
    ca_future *f = calloc(1, sizeof *f);
    if (!f) return -ENOMEM;
    atomic_init(&f->refs, 1);
    f->loop = ca_loop_ref(loop);
    f->cbs_tail = &f->cbs;
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
    while (f->cbs) {
        struct done_cb *c = f->cbs;
        f->cbs = c->next;
        free(c);
    }
    ca_loop_unref(f->loop);
    free(f);
    return NULL;
}

ca_loop *ca_future_loop(const ca_future *f) { return f ? f->loop : NULL; }

static void run_done_cb(void *arg)
{
    struct done_cb *c = arg;
    c->fn(c->fut, c->arg);
    ca_future_unref(c->fut);
    free(c);
}

/* Hands one callback to the loop; if the loop cannot take it (closed), it is dropped, as
 * asyncio's call_soon on a closed loop would refuse it. */
/* The loop closed with the callback still queued: it never runs, its references go. */
static void drop_done_cb(void *arg)
{
    struct done_cb *c = arg;
    ca_future_unref(c->fut);
    free(c);
}

static int schedule_cb(ca_future *f, struct done_cb *c)
{
    c->fut = ca_future_ref(f);
    int r = ca__loop_schedule(f->loop, run_done_cb, c, drop_done_cb);
    if (r) {
        ca_future_unref(f);
        free(c);
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
    /* A callback may drop the last user reference: keep the future alive meanwhile. */
    ca_future_ref(f);
    while (c) {
        struct done_cb *next = c->next;
        schedule_cb(f, c);
        c = next;
    }
    ca_future_unref(f);
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
    if (f->loop->fork_gen != ca__fork_gen()) return -ECHILD;
    if (ca_loop_is_closed(f->loop)) return -EBADF;
    struct done_cb *c = malloc(sizeof *c);
    if (!c) return -ENOMEM;
    c->fn = fn;
    c->arg = arg;
    c->fut = NULL;
    c->next = NULL;
    if (f->state != PENDING) return schedule_cb(f, c);
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
            free(c);
            return 1;
        }
    }
    return 0;
}
