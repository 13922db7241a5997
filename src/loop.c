/*
 * The loop core, written once for every built-in loop (asyncio's BaseEventLoop): the public
 * loop functions with their argument, fork, closed and thread checks; handles; the ready
 * queue; the timer heap; the fd table; the thread-safe queue and its eventfd wakeup; signal
 * dispatch; run/stop/close; running-loop tracking. Backends (loop_epoll.c, loop_poll.c,
 * loop_uring.c) only wait for fds and report them with ca__loop_io().
 *
 * Custom loops (ca_loop_new_custom) go through the same public functions, which then call
 * their ops; the built-in loops are ops tables whose members are the ca__core_* functions.
 */
#include "loop_internal.h"

#include <fcntl.h>
#include <math.h>
#include <pthread.h>
#include <sched.h>
#include <limits.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <time.h>
#include <unistd.h>

/* ----- fork generation, thread identity, the running loop ----------------------------- */

atomic_uint ca__fork_generation;
static pthread_once_t fork_once = PTHREAD_ONCE_INIT;

static void on_fork_child(void)
{
    atomic_fetch_add_explicit(&ca__fork_generation, 1, memory_order_relaxed);
}
static void fork_setup(void) { pthread_atfork(NULL, NULL, on_fork_child); }
void ca__fork_init(void) { pthread_once(&fork_once, fork_setup); }

/* The address of a thread-local byte identifies the calling thread without a system call. */
static _Thread_local char tl_token CA_TLS_IE;
_Thread_local ca_loop *ca__tl_running CA_TLS_IE;
_Thread_local unsigned ca__tl_running_gen CA_TLS_IE;
#define tl_running ca__tl_running
#define tl_running_gen ca__tl_running_gen

ca_loop *ca_get_running_loop(void)
{
    ca_loop *l = tl_running;
    return l && tl_running_gen == ca__fork_gen() ? l : NULL;
}

bool ca__loop_in_own_thread(const ca_loop *loop)
{
    if (!atomic_load_explicit(&loop->running, memory_order_relaxed)) return true;
    return atomic_load_explicit(&loop->owner, memory_order_relaxed) == (const void *)&tl_token;
}

bool ca__loop_home_thread(const ca_loop *loop)
{
    const void *me = (const void *)&tl_token;
    if (atomic_load_explicit(&loop->running, memory_order_acquire))
        return atomic_load_explicit(&loop->owner, memory_order_relaxed) == me;
    const void *last = atomic_load_explicit(&loop->last_owner, memory_order_relaxed);
    return last == NULL || last == me;
}

static int enter_running(ca_loop *loop)
{
    if (ca_get_running_loop()) return -EBUSY;
    bool expected = false;
    if (!atomic_compare_exchange_strong(&loop->running, &expected, true)) return -EBUSY;
    atomic_store(&loop->owner, (const void *)&tl_token);
    atomic_store(&loop->last_owner, (const void *)&tl_token);
    tl_running = loop;
    tl_running_gen = ca__fork_gen();
    return 0;
}

static void exit_running(ca_loop *loop)
{
    ca__future_bank_flush(loop);
    tl_running = NULL;
    atomic_store(&loop->owner, NULL);
    atomic_store(&loop->running, false);
}

double ca__monotonic(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* Checks for the functions that are for the loop's own thread. */
static inline int check_owned(const ca_loop *loop)
{
    int r = ca__loop_check(loop);
    if (r) return r;
    if (CA_UNLIKELY(!ca__loop_in_own_thread(loop))) return -EPERM;
    return 0;
}

/* ----- handles -------------------------------------------------------------------------- */

/* Handles. A plain call_soon or a timer without `out` needs none (the ready ring and the
 * timer heap keep (fn, arg) themselves); a handle exists only for a caller that asked for
 * one, a custom loop's ops, or an internal callback carrying a drop function, so it is
 * simply malloc'ed. */

static inline void handle_init(ca_handle *h, ca_callback_fn fn, void *arg)
{
    atomic_init(&h->refs, 1);
    h->cancelled = false;
    h->escaped = false;
    h->scheduled = false;
    h->in_heap = false;
    h->ran = false;
    h->fn = fn;
    h->arg = arg;
    h->drop = NULL;
    h->loop = NULL;
}

/* A handle is going away: if it never ran, its drop function releases what arg owns. */
static inline void handle_dispose(ca_handle *h)
{
    if (CA_UNLIKELY(h->drop != NULL) && !h->ran) {
        ca_callback_fn drop = h->drop;
        h->drop = NULL;
        drop(h->arg);
    }
}

static ca_handle *handle_alloc(ca_callback_fn fn, void *arg)
{
    ca_handle *h = malloc(sizeof *h);
    if (h) handle_init(h, fn, arg);
    return h;
}

static void handle_free(ca_handle *h)
{
    handle_dispose(h);
    free(h);
}

/* The handle leaves the loop's structures (it ran, was cancelled out of the heap, or the
 * loop dropped it): the loop's reference goes. */
static void handle_release(ca_handle *h)
{
    h->scheduled = false;
    if (!h->escaped) {
        handle_free(h);
        return;
    }
    h->loop = NULL;
    ca_handle_unref(h);
}

ca_handle *ca_handle_ref(ca_handle *h)
{
    if (h) atomic_fetch_add_explicit(&h->refs, 1, memory_order_relaxed);
    return h;
}

ca_handle *ca_handle_unref(ca_handle *h)
{
    if (h && atomic_fetch_sub_explicit(&h->refs, 1, memory_order_acq_rel) == 1) {
        handle_dispose(h);
        free(h);
    }
    return NULL;
}

bool ca_handle_cancelled(const ca_handle *h) { return h && h->cancelled; }

void ca_handle_run(ca_handle *h)
{
    if (h && !h->cancelled) {
        h->ran = true;
        h->fn(h->arg);
    }
}

/* ----- timer heap: 4-ary, keys inline, lazy cancellation ------------------------------------ */

#define HEAP_D 4 /* children per node */
#define HEAP_ALIGN (HEAP_D * sizeof(struct ca__timer))
#define HEAP_SKIP (HEAP_D - 1)

static inline bool tless(const struct ca__timer *a, const struct ca__timer *b)
{
    return a->when < b->when || (a->when == b->when && a->seq < b->seq);
}

static inline ca_handle *timer_handle(const struct ca__timer *t)
{
    return t->fn ? NULL : (ca_handle *)t->arg;
}

static void heap_up(ca_loop *loop, size_t i)
{
    struct ca__timer t = loop->heap[i];
    while (i > 0) {
        size_t p = (i - 1) / HEAP_D;
        if (!tless(&t, &loop->heap[p])) break;
        loop->heap[i] = loop->heap[p];
        i = p;
    }
    loop->heap[i] = t;
}

static void heap_down(ca_loop *loop, size_t i)
{
    struct ca__timer t = loop->heap[i];
    size_t n = loop->heap_len;
    for (;;) {
        size_t c = HEAP_D * i + 1;
        if (c >= n) break;
        size_t best = c, end = c + HEAP_D < n ? c + HEAP_D : n;
        for (size_t k = c + 1; k < end; k++)
            if (tless(&loop->heap[k], &loop->heap[best])) best = k;
        if (!tless(&loop->heap[best], &t)) break;
        loop->heap[i] = loop->heap[best];
        i = best;
    }
    loop->heap[i] = t;
}

/* Entries 1-4, 5-8, ... (the children of one node) each fill one 128-byte block: the heap
 * starts 3 entries (96 bytes) into a 128-byte aligned allocation. */

static int heap_resize(ca_loop *loop, size_t cap)
{
    if (cap > (SIZE_MAX - HEAP_ALIGN) / sizeof(struct ca__timer) - HEAP_SKIP) return -ENOMEM;
    size_t bytes = (cap + HEAP_SKIP) * sizeof(struct ca__timer);
    bytes = (bytes + HEAP_ALIGN - 1) / HEAP_ALIGN * HEAP_ALIGN;
    void *mem = aligned_alloc(HEAP_ALIGN, bytes);
    if (!mem) return -ENOMEM;
    struct ca__timer *heap = (struct ca__timer *)mem + HEAP_SKIP;
    if (loop->heap_len) memcpy(heap, loop->heap, loop->heap_len * sizeof *heap);
    free(loop->heap_mem);
    loop->heap_mem = mem;
    loop->heap = heap;
    loop->heap_cap = cap;
    return 0;
}

static inline int heap_push(ca_loop *loop, double when, ca_callback_fn fn, void *arg)
{
    if (CA_UNLIKELY(loop->heap_len == loop->heap_cap)) {
        int r = heap_resize(loop, loop->heap_cap ? loop->heap_cap * 2 : 64);
        if (r) return r;
    }
    loop->heap[loop->heap_len++] = (struct ca__timer){when, loop->seq++, fn, arg};
    heap_up(loop, loop->heap_len - 1);
    return 0;
}

/* Removes the earliest timer. The hole left at the root goes down to a leaf along the
 * smaller children, then the last entry goes up from there: it nearly always belongs near
 * the bottom, so this saves the comparisons with it on the way down. */
static struct ca__timer heap_pop(ca_loop *loop)
{
    struct ca__timer *heap = loop->heap;
    struct ca__timer top = heap[0];
    size_t n = --loop->heap_len;
    if (n) {
        struct ca__timer last = heap[n];
        size_t i = 0;
        for (;;) {
            size_t c = HEAP_D * i + 1;
            if (c >= n) break;
            /* The grandchildren are one contiguous run: fetch it while choosing. */
            size_t g = HEAP_D * c + 1;
            if (g < n)
                for (size_t b = 0; b < HEAP_D * HEAP_D * sizeof *heap; b += 64)
                    CA_PREFETCH((const char *)(heap + g) + b);
            size_t best = c, end = c + HEAP_D < n ? c + HEAP_D : n;
            for (size_t k = c + 1; k < end; k++)
                if (tless(&heap[k], &heap[best])) best = k;
            heap[i] = heap[best];
            i = best;
        }
        while (i > 0) {
            size_t p = (i - 1) / HEAP_D;
            if (!tless(&last, &heap[p])) break;
            heap[i] = heap[p];
            i = p;
        }
        heap[i] = last;
    }
    ca_handle *h = timer_handle(&top);
    if (h) {
        h->in_heap = false;
        if (h->cancelled) loop->heap_cancelled--;
    }
    return top;
}

/* Drops cancelled timers once they are the majority, so they cannot pile up. */
static void heap_compact(ca_loop *loop)
{
    size_t k = 0;
    for (size_t i = 0; i < loop->heap_len; i++) {
        ca_handle *h = timer_handle(&loop->heap[i]);
        if (h && h->cancelled) {
            h->in_heap = false;
            handle_release(h);
        } else {
            loop->heap[k++] = loop->heap[i];
        }
    }
    loop->heap_len = k;
    loop->heap_cancelled = 0;
    for (size_t i = k / HEAP_D + 1; i-- > 0;)
        if (i < k) heap_down(loop, i);
}

void ca_handle_cancel(ca_handle *h)
{
    if (!h || h->cancelled) return;
    h->cancelled = true;
    /* A cancelled timer stays in the heap until its turn or a compaction, as in asyncio;
     * a handle in the ready queue is skipped when its turn comes. */
    ca_loop *loop = h->loop;
    if (h->in_heap && loop) {
        loop->heap_cancelled++;
        if (loop->heap_cancelled > 64 && loop->heap_cancelled * 2 > loop->heap_len)
            heap_compact(loop);
    }
}

/* ----- ready queue and thread-safe queue ------------------------------------------------------ */

#define RQ_KEEP 4096 /* entries kept when idle */

/* Internal callbacks whose drop function the loop knows: queued as plain (fn, arg) entries,
 * no handle, and dropped by the loop itself if it closes before they run. */
static ca_callback_fn known_drop(ca_callback_fn fn)
{
    return fn == ca__future_run_fired ? ca__future_drop_fired : NULL;
}

static bool rq_grow(ca_loop *loop)
{
    size_t cap = loop->rq_cap ? loop->rq_cap * 2 : 256;
    if (cap > SIZE_MAX / sizeof(struct ca__entry)) return false;
    struct ca__entry *n = malloc(cap * sizeof *n);
    if (!n) return false;
    size_t first = loop->rq_cap - loop->rq_head;
    if (first > loop->rq_len) first = loop->rq_len;
    if (first) memcpy(n, loop->rq + loop->rq_head, first * sizeof *n);
    if (loop->rq_len > first) memcpy(n + first, loop->rq, (loop->rq_len - first) * sizeof *n);
    free(loop->rq);
    loop->rq = n;
    loop->rq_cap = cap;
    loop->rq_head = 0;
    return true;
}

/* Appends to the ready ring; -ENOMEM only when it is full and cannot grow. */
static inline int rq_push(ca_loop *loop, ca_callback_fn fn, void *arg)
{
    if (CA_UNLIKELY(loop->rq_len == loop->rq_cap) && !rq_grow(loop)) return -ENOMEM;
    loop->rq[(loop->rq_head + loop->rq_len++) & (loop->rq_cap - 1)] = (struct ca__entry){fn, arg};
    return 0;
}

static inline int ready_push(ca_loop *loop, ca_handle *h)
{
    int r = rq_push(loop, NULL, h);
    if (CA_UNLIKELY(r)) return r;
    h->scheduled = true;
    h->loop = loop;
    return 0;
}

static inline struct ca__entry rq_pop(ca_loop *loop)
{
    struct ca__entry e = loop->rq[loop->rq_head];
    loop->rq_head = (loop->rq_head + 1) & (loop->rq_cap - 1);
    loop->rq_len--;
    return e;
}


/* The thread-safe queue's lock: a spinlock, held for a few instructions (an append, a swap of
 * two arrays, a realloc now and then, a write(2) to wake a blocked loop). A mutex here makes a
 * producer that meets the draining loop sleep in futex(2); spinning, then yielding, does not. */
static inline void ts_lock(ca_loop *loop)
{
    for (unsigned spins = 0;
         atomic_flag_test_and_set_explicit(&loop->ts_lock, memory_order_acquire); spins++) {
        if (spins < 64) CA_CPU_RELAX();
        else sched_yield();
    }
}

static inline void ts_unlock(ca_loop *loop)
{
    atomic_flag_clear_explicit(&loop->ts_lock, memory_order_release);
}

/* The posts that waited for memory (ca__loop_post_node), after the queue's items, in their
 * order. Those the ring has no room for go back to the front of the list, for the next
 * iteration (which backs off: see run_once). */
static void move_nodes(ca_loop *loop, struct ca__post *nodes)
{
    while (nodes) {
        if (rq_push(loop, nodes->fn, nodes->arg) != 0) {
            loop->starved = true;
            struct ca__post *last = nodes;
            while (last->next) last = last->next;
            ts_lock(loop);
            last->next = loop->ts_nodes;
            if (!loop->ts_nodes) loop->ts_nodes_last = last;
            loop->ts_nodes = nodes;
            atomic_store_explicit(&loop->ts_pending, true, memory_order_relaxed);
            ts_unlock(loop);
            return;
        }
        struct ca__post *next = nodes->next;
        if (nodes->owned) free(nodes);
        nodes = next;
    }
}

/* Moves everything other threads submitted onto the ready queue, in arrival order. When the
 * ring is empty (the usual case for a loop that other threads feed) the submitted array
 * becomes the ring and the old ring the spare: nothing is copied. */
static void ts_drain_pending(ca_loop *loop)
{
    for (;;) {
        ts_lock(loop);
        struct ca__entry *items = loop->ts_buf;
        size_t n = loop->ts_len, cap = loop->ts_cap;
        /* Capacities are 256 << k on both sides, so the array is a valid ring. */
        bool take = loop->rq_len == 0 && n;
        if (take || loop->rq_cap - loop->rq_len >= n) {
            struct ca__post *nodes = loop->ts_nodes;
            loop->ts_nodes = loop->ts_nodes_last = NULL;
            loop->ts_buf = loop->ts_spare;
            loop->ts_cap = loop->ts_spare_cap;
            loop->ts_spare = take ? loop->rq : items;
            loop->ts_spare_cap = take ? loop->rq_cap : cap;
            loop->ts_len = 0;
            atomic_store_explicit(&loop->ts_pending, false, memory_order_relaxed);
            ts_unlock(loop);
            if (take) {
                loop->rq = items;
                loop->rq_cap = cap;
                loop->rq_head = 0;
                loop->rq_len = n;
            } else {
                for (size_t i = 0; i < n; i++) rq_push(loop, items[i].fn, items[i].arg); /* fits */
            }
            if (CA_UNLIKELY(nodes != NULL)) move_nodes(loop, nodes);
            return;
        }
        ts_unlock(loop);
        /* Not enough room: grow the ring outside the lock, then look again. Out of memory,
         * the items wait for the next iteration (which backs off: see run_once). */
        if (!rq_grow(loop)) {
            loop->starved = true;
            return;
        }
    }
}

/* The loop is about to block with nothing ready: a ring grown by a burst goes back, a timer
 * heap mostly emptied shrinks, and a large spare of the thread-safe queue (the last ring it
 * swapped out) goes too. */
static void rq_trim(ca_loop *loop)
{
    if (loop->rq_len == 0 && loop->rq_cap > RQ_KEEP) {
        free(loop->rq);
        loop->rq = NULL;
        loop->rq_cap = loop->rq_head = 0;
    }
    /* a timer heap grown by a burst of timers, now mostly empty, shrinks */
    if (loop->heap_cap > RQ_KEEP && loop->heap_len * 4 < loop->heap_cap) {
        size_t cap = 64;
        while (cap < loop->heap_len * 2) cap *= 2;
        if (loop->heap_len == 0) {
            free(loop->heap_mem);
            loop->heap_mem = NULL;
            loop->heap = NULL;
            loop->heap_cap = 0;
        } else {
            heap_resize(loop, cap); /* out of memory: it keeps the big one */
        }
    }
    if (loop->ts_spare_cap > RQ_KEEP) {
        ts_lock(loop);
        struct ca__entry *spare = loop->ts_spare;
        loop->ts_spare = NULL;
        loop->ts_spare_cap = 0;
        ts_unlock(loop);
        free(spare);
    }
}

static inline void ts_drain(ca_loop *loop)
{
    if (CA_UNLIKELY(atomic_load_explicit(&loop->ts_pending, memory_order_relaxed)))
        ts_drain_pending(loop);
}

static void wake(ca_loop *loop);

/* Appends under the lock; -EBADF once the loop closed (then fn is never called). The wakeup,
 * when one is needed, is written under the lock too: close marks the queue closed under it
 * before it closes wake_fd, so no count of writers in flight is needed here. */
static int ts_push(ca_loop *loop, ca_callback_fn fn, void *arg, ca_callback_fn drop)
{
    ca_handle *h = NULL;
    if (drop && drop != known_drop(fn)) {
        /* (fn, arg, drop) travels as a handle, so the queue's items stay two words. */
        h = handle_alloc(fn, arg);
        if (!h) return -ENOMEM;
        h->escaped = true;
        h->drop = drop;
        fn = NULL;
        arg = h;
    }
    int r = 0;
    ts_lock(loop);
    if (CA_UNLIKELY(loop->ts_closed)) {
        r = -EBADF;
    } else if (CA_UNLIKELY(loop->ts_len == loop->ts_cap)) {
        size_t cap = loop->ts_cap ? loop->ts_cap * 2 : 256;
        struct ca__entry *n = cap <= SIZE_MAX / sizeof *n ? realloc(loop->ts_buf, cap * sizeof *n)
                                                          : NULL;
        if (n) {
            loop->ts_buf = n;
            loop->ts_cap = cap;
        } else {
            r = -ENOMEM;
        }
    }
    if (CA_LIKELY(r == 0)) {
        loop->ts_buf[loop->ts_len++] = (struct ca__entry){fn, arg};
        /* Only the first item of a batch publishes; the loop clears it when it drains. */
        if (!atomic_load_explicit(&loop->ts_pending, memory_order_relaxed))
            atomic_store(&loop->ts_pending, true);
        wake(loop);
    }
    ts_unlock(loop);
    if (CA_UNLIKELY(r) && h) {
        h->drop = NULL; /* refused: the caller keeps arg */
        ca_handle_unref(h);
    }
    return r;
}

/* Wakes a loop blocked in its backend. No system call when it is awake (it drains the queue
 * before it blocks) or when a wakeup is already on its way. The caller holds ts_lock (with
 * the queue still open) or counts itself in ts_inflight, so close cannot close wake_fd under
 * it. */
static void wake(ca_loop *loop)
{
    if (atomic_load(&loop->polling) && !atomic_exchange(&loop->wake_pending, true)) {
        uint64_t one = 1;
        ssize_t w = write(loop->wake_fd, &one, sizeof one);
        (void)w; /* EAGAIN only when the counter is full: the loop is woken anyway */
    }
}

/* Queues the handlers of the signals in mask (bit sig - 1). */
static void sig_dispatch(ca_loop *loop, uint64_t mask)
{
    for (int sig = 1; mask && sig <= 64; sig++) {
        uint64_t bit = UINT64_C(1) << (sig - 1);
        if (!(mask & bit)) continue;
        mask &= ~bit;
        ca_handle *h = loop->sig_handlers[sig];
        if (h && !h->scheduled && !h->cancelled) {
            ca_handle_ref(h); /* the queue's reference; the registration keeps its own */
            if (CA_UNLIKELY(ready_push(loop, h))) {
                /* Out of memory for the ring: the signal stays pending here, and the next
                 * iteration, which backs off (see run_once), tries again. Not through the
                 * signal slot, whose wakeup would make the loop spin. */
                ca_handle_unref(h);
                loop->sig_retry |= bit;
                loop->starved = true;
            }
        }
    }
}

static void on_wakeup(void *arg)
{
    ca_loop *loop = arg;
    uint64_t v;
    ssize_t r = read(loop->wake_fd, &v, sizeof v);
    (void)r;
    atomic_store(&loop->wake_pending, false);
    if (!loop->sigslot) return;
    sig_dispatch(loop, ca__sigslot_take(loop->sigslot));
}

/* ----- the fd table ---------------------------------------------------------------------------- */

void *ca__fdtab_grow(void *tab, int *len, int fd, size_t elem)
{
    if (fd < *len) return tab;
    size_t n = *len ? (size_t)*len : 64;
    while (n <= (size_t)fd) n *= 2;
    if (n > INT_MAX || n > SIZE_MAX / elem) return NULL;
    char *t = realloc(tab, n * elem);
    if (!t) return NULL;
    memset(t + (size_t)*len * elem, 0, (n - (size_t)*len) * elem);
    *len = (int)n;
    return t;
}

static int fd_grow(ca_loop *loop, int fd)
{
    if (fd < loop->nfds) return 0;
    struct ca__fdent *t = ca__fdtab_grow(loop->fds, &loop->nfds, fd, sizeof *t);
    if (!t) return -ENOMEM;
    loop->fds = t;
    return 0;
}

void ca__loop_io(ca_loop *loop, int fd, unsigned revents)
{
    if (fd < 0 || fd >= loop->nfds) return;
    struct ca__fdent *e = &loop->fds[fd];
    if ((revents & (CA__READ | CA__ERR)) && e->rfn) e->rfn(e->rarg);
    /* The callback may have grown (moved) the table or removed the writer. */
    if (fd >= loop->nfds) return;
    e = &loop->fds[fd];
    if ((revents & (CA__WRITE | CA__ERR)) && e->wfn) e->wfn(e->warg);
}

static int set_io(ca_loop *loop, int fd, unsigned what, ca_callback_fn fn, void *arg, bool sock)
{
    int r = fd_grow(loop, fd);
    if (r) return r;
    struct ca__fdent *e = &loop->fds[fd];
    unsigned nev = e->ev | what;
    unsigned char old_sock = e->sock;
    e->sock = (unsigned char)(sock ? e->sock | what : e->sock & ~what);
    /* Told again even when the interest set is unchanged: the fd may have been closed
     * behind our back and its number reused by a file the kernel does not watch yet. */
    r = loop->be->modify(loop, fd, e->ev, nev);
    if (r) {
        e->sock = old_sock;
        return r;
    }
    e->ev = nev;
    if (what == CA__READ) {
        if (!e->rfn) loop->n_watched++;
        e->rfn = fn;
        e->rarg = arg;
    } else {
        if (!e->wfn) loop->n_watched++;
        e->wfn = fn;
        e->warg = arg;
    }
    return 0;
}

static int clear_io(ca_loop *loop, int fd, unsigned what)
{
    if (fd >= loop->nfds) return 0;
    struct ca__fdent *e = &loop->fds[fd];
    if (e->internal) return 0;
    if (what == CA__READ ? !e->rfn : !e->wfn) return 0;
    if (what == CA__READ) {
        e->rfn = NULL;
        e->rarg = NULL;
    } else {
        e->wfn = NULL;
        e->warg = NULL;
    }
    loop->n_watched--;
    e->sock = (unsigned char)(e->sock & ~what);
    unsigned nev = e->ev & ~what;
    /* Errors here mean the fd was closed behind our back: it is gone from the kernel's
     * interest set anyway. */
    loop->be->modify(loop, fd, e->ev, nev);
    e->ev = nev;
    return 1;
}

int ca__core_add_reader(ca_loop *self, int fd, ca_callback_fn fn, void *arg)
{
    if (fd < self->nfds && self->fds[fd].internal) return -EINVAL;
    return set_io(self, fd, CA__READ, fn, arg, false);
}
int ca__core_add_writer(ca_loop *self, int fd, ca_callback_fn fn, void *arg)
{
    if (fd < self->nfds && self->fds[fd].internal) return -EINVAL;
    return set_io(self, fd, CA__WRITE, fn, arg, false);
}
int ca__core_remove_reader(ca_loop *self, int fd) { return clear_io(self, fd, CA__READ); }
int ca__core_remove_writer(ca_loop *self, int fd) { return clear_io(self, fd, CA__WRITE); }

int ca__loop_sock_watch(ca_loop *loop, int fd, unsigned what, ca_callback_fn fn, void *arg)
{
    if (fd < loop->nfds && loop->fds[fd].internal) return -EINVAL;
    return set_io(loop, fd, what, fn, arg, true);
}

/* Only while the watcher is still sock.c's: a user's reader that replaced it stays. */
void ca__loop_sock_unwatch(ca_loop *loop, int fd, unsigned what)
{
    if (fd < loop->nfds && (loop->fds[fd].sock & what)) clear_io(loop, fd, what);
}

/* ----- core scheduling ops ---------------------------------------------------------------------- */

int ca__core_call_soon(ca_loop *self, ca_handle *h)
{
    ts_drain(self);
    return ready_push(self, h);
}

int ca__core_call_at(ca_loop *self, double when, ca_handle *h)
{
    h->loop = self;
    int r = heap_push(self, when, NULL, h);
    if (r) return r;
    h->in_heap = true;
    h->scheduled = true;
    return 0;
}

int ca__core_call_soon_threadsafe(ca_loop *self, ca_handle *h)
{
    /* The core keeps (fn, arg), not the handle: the caller still owns h. */
    return ts_push(self, h->fn, h->arg, NULL);
}

/* ----- signals ---------------------------------------------------------------------------------- */

int ca__core_add_signal_handler(ca_loop *self, int sig, ca_callback_fn fn, void *arg)
{
    if (!self->sigslot) {
        int r = ca__sigslot_new(self->wake_fd, &self->sigslot);
        if (r) return r;
    }
    ca_handle *h = handle_alloc(fn, arg);
    if (!h) return -ENOMEM;
    h->escaped = true;
    int r = ca__sigslot_watch(self->sigslot, sig);
    if (r) {
        free(h);
        return r;
    }
    ca_handle *old = self->sig_handlers[sig];
    self->sig_handlers[sig] = h;
    if (old) {
        ca_handle_cancel(old);
        ca_handle_unref(old);
    }
    return 0;
}

int ca__core_remove_signal_handler(ca_loop *self, int sig)
{
    ca_handle *h = self->sig_handlers[sig];
    if (!h) return 0;
    self->sig_handlers[sig] = NULL;
    ca__sigslot_unwatch(self->sigslot, sig);
    ca_handle_cancel(h);
    ca_handle_unref(h);
    return 1;
}

/* ----- run, stop, close, destroy --------------------------------------------------------------- */

/* Whether this busy iteration may skip its zero-timeout poll: only when no reader or writer
 * is registered (asyncio polls every iteration, and readers are called on every iteration
 * while their fd is ready), the backend has nothing of its own in flight, and no signal is
 * pending. Then a chain of callbacks costs no system call per iteration. */
static inline bool skip_poll(ca_loop *loop)
{
    return loop->be->may_skip_poll && loop->n_watched == 0 &&
           !(loop->sigslot && ca__sigslot_pending(loop->sigslot));
}

/* The wait of an iteration after one that was starved: timeout (ns, -1 for none) raised to
 * the back-off, unless something nearer than it is due anyway. */
static int64_t oom_backoff(ca_loop *loop, int64_t timeout)
{
    int64_t ns = (int64_t)loop->oom_wait_ms * 1000000;
    return timeout > 0 && timeout < ns ? timeout : ns;
}

static int run_once(ca_loop *loop)
{
    loop->starved = false;
    ts_drain(loop);
    bool busy = loop->rq_len || atomic_load_explicit(&loop->stopping, memory_order_relaxed);
    int64_t timeout = -1;
    if (busy) {
        timeout = 0;
    } else if (loop->heap_len) {
        ca_handle *h;
        while (loop->heap_len && (h = timer_handle(&loop->heap[0])) && h->cancelled) {
            heap_pop(loop);
            handle_release(h);
        }
    }
    if (!busy && loop->heap_len) {
        double d = loop->heap[0].when - ca__monotonic();
        timeout = d <= 0 ? 0 : d > 9e9 ? INT64_C(9000000000000000000) : (int64_t)ceil(d * 1e9);
    }
    /* Out of memory at the last iteration, with nothing ready to run: what is due (a timer,
     * a submission) cannot move yet, and retrying at once would spin. Wait, serving I/O. */
    bool backoff = CA_UNLIKELY(loop->oom_wait_ms != 0) && !busy;
    if (backoff) timeout = oom_backoff(loop, timeout);
    if (!busy || !skip_poll(loop)) {
        int r;
        if (timeout != 0) {
            if (!backoff) rq_trim(loop);
            atomic_store(&loop->polling, true);
            if (!backoff && atomic_load(&loop->ts_pending)) timeout = 0;
            r = loop->be->poll(loop, timeout);
            atomic_store(&loop->polling, false);
        } else {
            r = loop->be->poll(loop, 0);
        }
        if (r < 0) return r;
        ts_drain(loop);
    }
    if (CA_UNLIKELY(loop->sig_retry != 0)) {
        uint64_t retry = loop->sig_retry;
        loop->sig_retry = 0;
        sig_dispatch(loop, retry);
    }
    if (loop->heap_len) {
        double end = ca__monotonic() + 1e-9;
        while (loop->heap_len && loop->heap[0].when <= end) {
            /* Out of memory for the ring: what is left stays due for the next iteration. */
            if (CA_UNLIKELY(loop->rq_len == loop->rq_cap) && !rq_grow(loop)) {
                loop->starved = true;
                break;
            }
            struct ca__timer t = heap_pop(loop);
            ca_handle *h = timer_handle(&t);
            if (h && h->cancelled) handle_release(h);
            else rq_push(loop, t.fn, t.arg); /* a handle keeps its scheduled flag */
        }
    }
    if (CA_UNLIKELY(loop->starved)) {
        loop->oom_wait_ms = loop->oom_wait_ms ? loop->oom_wait_ms * 2 : 1;
        if (loop->oom_wait_ms > 128) loop->oom_wait_ms = 128;
    } else {
        loop->oom_wait_ms = 0;
    }
    /* Only what is ready now: a callback scheduled by a callback waits for the next
     * iteration. */
    for (size_t n = loop->rq_len; n > 0 && loop->rq_len; n--) {
        struct ca__entry e = rq_pop(loop);
        if (e.fn) {
            e.fn(e.arg);
            continue;
        }
        ca_handle *h = e.arg;
        if (!h->cancelled) {
            h->ran = true;
            h->fn(h->arg);
        }
        handle_release(h);
    }
    return 0;
}

int ca__core_run_forever(ca_loop *self)
{
    int r = 0;
    for (;;) {
        r = run_once(self);
        if (r < 0) break;
        if (atomic_load_explicit(&self->stopping, memory_order_relaxed)) break;
    }
    atomic_store(&self->stopping, false);
    return r;
}

void ca__core_stop(ca_loop *self)
{
    atomic_store(&self->stopping, true);
    wake(self);
}

/* Drops every handle the loop holds, without running any. */
static void drop_handles(ca_loop *loop, bool forked)
{
    /* In a child of fork() the lock may be held by a thread that does not exist here. */
    if (!forked) ts_lock(loop);
    loop->ts_closed = true;
    struct ca__entry *items = loop->ts_buf;
    size_t n = loop->ts_len;
    loop->ts_buf = NULL;
    loop->ts_cap = 0;
    loop->ts_len = 0;
    struct ca__post *nodes = loop->ts_nodes;
    loop->ts_nodes = loop->ts_nodes_last = NULL;
    atomic_store(&loop->ts_pending, false);
    if (!forked) ts_unlock(loop);
    while (nodes) {
        struct ca__post *next = nodes->next;
        ca_callback_fn d = known_drop(nodes->fn);
        void *arg = nodes->arg;
        if (nodes->owned) free(nodes);
        if (d) d(arg);
        nodes = next;
    }
    for (size_t i = 0; i < n; i++) {
        if (!items[i].fn) {
            ca_handle_unref(items[i].arg); /* calls its drop */
        } else {
            ca_callback_fn d = known_drop(items[i].fn);
            if (d) d(items[i].arg);
        }
    }
    free(items);
    while (loop->rq_len) {
        struct ca__entry e = rq_pop(loop);
        if (!e.fn) {
            handle_release(e.arg);
        } else {
            ca_callback_fn d = known_drop(e.fn);
            if (d) d(e.arg);
        }
    }
    while (loop->heap_len) {
        ca_handle *h = timer_handle(&loop->heap[--loop->heap_len]);
        if (h) {
            h->in_heap = false;
            handle_release(h);
        }
    }
    loop->heap_cancelled = 0;
    for (int sig = 1; sig <= 64; sig++) {
        ca_handle *h = loop->sig_handlers[sig];
        loop->sig_handlers[sig] = NULL;
        if (h) {
            h->cancelled = true;
            ca_handle_unref(h);
        }
    }
}

static void release_kernel_objects(ca_loop *loop, bool forked)
{
    /* No thread may be about to write to wake_fd once it is closed. */
    while (atomic_load(&loop->ts_inflight) > 0) sched_yield();
    if (loop->sigslot) {
        ca__sigslot_free(loop->sigslot, forked);
        loop->sigslot = NULL;
    }
    if (loop->be_data) loop->be->fini(loop, forked);
    if (loop->wake_fd >= 0) close(loop->wake_fd);
    loop->wake_fd = -1;
    free(loop->fds);
    loop->fds = NULL;
    loop->nfds = 0;
    loop->n_watched = 0;
}

int ca__core_close(ca_loop *self)
{
    drop_handles(self, false);
    release_kernel_objects(self, false);
    return 0;
}

void ca__core_destroy(ca_loop *self)
{
    ca__future_cache_free(self);
    free(self->heap_mem);
    self->heap_mem = NULL;
    free(self->rq);
    self->rq = NULL;
    self->rq_cap = self->rq_head = 0;
    free(self->ts_buf);
    free(self->ts_spare);
    self->ts_buf = self->ts_spare = NULL;
    self->heap = NULL;
}

const ca_loop_ops ca__selector_ops = {
    .run_forever = ca__core_run_forever,
    .stop = ca__core_stop,
    .close = ca__core_close,
    .call_soon = ca__core_call_soon,
    .call_soon_threadsafe = ca__core_call_soon_threadsafe,
    .call_at = ca__core_call_at,
    .add_reader = ca__core_add_reader,
    .remove_reader = ca__core_remove_reader,
    .add_writer = ca__core_add_writer,
    .remove_writer = ca__core_remove_writer,
    .add_signal_handler = ca__core_add_signal_handler,
    .remove_signal_handler = ca__core_remove_signal_handler,
    .destroy = ca__core_destroy,
};

/* ----- the host's thread-safe queue (custom loops without call_soon_threadsafe) --------------- */

/* An adapter to a foreign loop would otherwise write its own locked queue and wakeup fd. The
 * host opts in with ca_loop_threadsafe_fd, which makes the eventfd; until then the queue does
 * not exist and ca_loop_call_soon_threadsafe gives -ENOTSUP, as for any missing op. Items are
 * (fn, arg), or (NULL, handle) for an internal callback with a drop function. The eventfd is
 * written when an item goes into an empty queue, and read (reset) when the host takes the
 * queue, both under ts_lock, so a push after a take always signals again. */

static int host_ts_push(ca_loop *loop, ca_callback_fn fn, void *arg, ca_callback_fn drop)
{
    ca_handle *h = NULL;
    if (drop) {
        h = handle_alloc(fn, arg);
        if (!h) return -ENOMEM;
        h->escaped = true;
        h->drop = drop;
        fn = NULL;
        arg = h;
    }
    int r = 0;
    ts_lock(loop);
    if (loop->ts_closed) {
        r = -EBADF;
    } else if (loop->wake_fd < 0) {
        r = -ENOTSUP; /* the host did not ask for the queue */
    } else if (loop->ts_len == loop->ts_cap) {
        size_t cap = loop->ts_cap ? loop->ts_cap * 2 : 64;
        struct ca__entry *n = cap <= SIZE_MAX / sizeof *n ? realloc(loop->ts_buf, cap * sizeof *n)
                                                          : NULL;
        if (n) {
            loop->ts_buf = n;
            loop->ts_cap = cap;
        } else {
            r = -ENOMEM;
        }
    }
    if (r == 0) {
        loop->ts_buf[loop->ts_len++] = (struct ca__entry){fn, arg};
        if (loop->ts_len == 1) {
            uint64_t one = 1;
            ssize_t w = write(loop->wake_fd, &one, sizeof one);
            (void)w; /* EAGAIN only when the counter is full: it is readable anyway */
        }
    }
    ts_unlock(loop);
    if (r && h) {
        h->drop = NULL; /* refused: the caller keeps arg */
        ca_handle_unref(h);
    }
    return r;
}

/* Runs (or, with run false, drops) n items in order. */
static void host_ts_items(struct ca__entry *items, size_t n, ca_loop *loop, bool run)
{
    for (size_t i = 0; i < n; i++) {
        /* A callback may close the loop: what is left is dropped, as a close drops it. */
        if (run && loop && atomic_load(&loop->closed)) run = false;
        if (items[i].fn) {
            if (run) items[i].fn(items[i].arg);
            continue;
        }
        ca_handle *h = items[i].arg;
        if (run && !h->cancelled) {
            h->ran = true;
            h->fn(h->arg);
        }
        ca_handle_unref(h); /* never ran: calls its drop */
    }
}

/* The loop closes (forked: in a child of fork(), where the lock may be held by a thread that
 * does not exist there; only this process's copy of the fd is closed). */
static void host_ts_close(ca_loop *loop, bool forked)
{
    if (!forked) ts_lock(loop);
    loop->ts_closed = true;
    struct ca__entry *items = loop->ts_buf;
    size_t n = loop->ts_len;
    int fd = loop->wake_fd;
    loop->ts_buf = NULL;
    loop->ts_len = loop->ts_cap = 0;
    loop->wake_fd = -1;
    if (!forked) ts_unlock(loop);
    if (fd >= 0) close(fd);
    host_ts_items(items, n, NULL, false);
    free(items);
}

static int host_ts_check(ca_loop *loop)
{
    int r = ca__loop_check(loop);
    if (r) return r;
    if (loop->be || loop->ops->call_soon_threadsafe) return -EINVAL;
    return 0;
}

int ca_loop_threadsafe_fd(ca_loop *loop)
{
    int r = host_ts_check(loop);
    if (r) return r;
    ts_lock(loop);
    int fd = loop->ts_closed ? -EBADF : loop->wake_fd;
    ts_unlock(loop);
    if (fd != -1) return fd;
    int made = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (made < 0) return -errno;
    ts_lock(loop);
    if (loop->ts_closed) fd = -EBADF;
    else if (loop->wake_fd < 0) loop->wake_fd = fd = made;
    else fd = loop->wake_fd; /* another thread made it first */
    ts_unlock(loop);
    if (fd != made) close(made);
    return fd;
}

int ca_loop_run_threadsafe(ca_loop *loop)
{
    int r = host_ts_check(loop);
    if (r) return r;
    if (!ca__loop_in_own_thread(loop)) return -EPERM;
    ts_lock(loop);
    struct ca__entry *items = loop->ts_buf;
    size_t n = loop->ts_len, cap = loop->ts_cap;
    /* The spare array (the previous batch's) takes the producers' side: no allocation per
     * batch in the steady state. */
    loop->ts_buf = loop->ts_spare;
    loop->ts_cap = loop->ts_spare_cap;
    loop->ts_len = 0;
    loop->ts_spare = NULL;
    loop->ts_spare_cap = 0;
    if (loop->wake_fd >= 0) {
        uint64_t v;
        ssize_t got = read(loop->wake_fd, &v, sizeof v);
        (void)got; /* EAGAIN: nothing was signalled */
    }
    ts_unlock(loop);
    host_ts_items(items, n, loop, true);
    /* The batch's array becomes the spare, unless the loop closed meanwhile. */
    ts_lock(loop);
    if (!loop->ts_closed && !loop->ts_spare && items) {
        loop->ts_spare = items;
        loop->ts_spare_cap = cap;
        items = NULL;
    }
    ts_unlock(loop);
    free(items);
    return n > INT_MAX ? INT_MAX : (int)n;
}

/* ----- construction ------------------------------------------------------------------------------ */

static ca_loop *loop_alloc(const ca_loop_ops *ops, const char *kind)
{
    ca__fork_init();
    /* aligned: the thread-safe queue's fields sit on cache lines of their own */
    size_t bytes = (sizeof(ca_loop) + _Alignof(ca_loop) - 1) / _Alignof(ca_loop) * _Alignof(ca_loop);
    ca_loop *loop = aligned_alloc(_Alignof(ca_loop), bytes);
    if (!loop) return NULL;
    memset(loop, 0, sizeof *loop);
    loop->ops = ops;
    loop->kind = kind;
    atomic_init(&loop->refs, 1);
    pthread_mutex_init(&loop->hooks_lock, NULL);
    loop->fork_gen = ca__fork_gen();
    loop->wake_fd = -1;
    return loop;
}

int ca__builtin_loop_new(const ca__backend *be, const ca_loop_ops *ops, const char *kind,
                         ca_loop **out)
{
    if (!out) return -EINVAL;
    ca_loop *loop = loop_alloc(ops, kind);
    if (!loop) return -ENOMEM;
    loop->be = be;
    atomic_flag_clear(&loop->ts_lock);
    int r = be->init(loop);
    if (r) {
        free(loop);
        return r;
    }
    loop->wake_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (loop->wake_fd < 0) {
        r = -errno;
        goto fail;
    }
    if ((r = fd_grow(loop, loop->wake_fd)) != 0) goto fail;
    if ((r = be->modify(loop, loop->wake_fd, 0, CA__READ)) != 0) goto fail;
    struct ca__fdent *e = &loop->fds[loop->wake_fd];
    e->ev = CA__READ;
    e->rfn = on_wakeup;
    e->rarg = loop;
    e->internal = true;
    *out = loop;
    return 0;
fail:
    release_kernel_objects(loop, false);
    free(loop);
    return r;
}

int ca_selector_loop_new(ca_loop **out)
{
    return ca__builtin_loop_new(&ca__backend_epoll, &ca__selector_ops, "epoll", out);
}

int ca_poll_loop_new(ca_loop **out)
{
    return ca__builtin_loop_new(&ca__backend_poll, &ca__selector_ops, "poll", out);
}

int ca_loop_new_custom(const ca_loop_ops *ops, void *data, ca_loop **out)
{
    if (!ops || !ops->run_forever || !out) return -EINVAL;
    ca_loop *loop = loop_alloc(ops, "custom");
    if (!loop) return -ENOMEM;
    loop->data = data;
    loop->host_closed_op = ops->is_closed != NULL;
    atomic_flag_clear(&loop->ts_lock);
    *out = loop;
    return 0;
}

void *ca_loop_data(ca_loop *loop) { return loop && !loop->be ? loop->data : NULL; }

const char *ca_loop_kind(const ca_loop *loop) { return loop ? loop->kind : NULL; }

/* ----- close hooks -------------------------------------------------------------------------------- */

void *ca__loop_add_close_hook(ca_loop *loop, void (*fn)(void *arg), void *arg)
{
    struct ca__close_hook *hk = malloc(sizeof *hk);
    if (!hk) return NULL;
    hk->fn = fn;
    hk->arg = arg;
    pthread_mutex_lock(&loop->hooks_lock);
    hk->next = loop->close_hooks;
    if (hk->next) hk->next->pprev = &hk->next;
    hk->pprev = &loop->close_hooks;
    loop->close_hooks = hk;
    pthread_mutex_unlock(&loop->hooks_lock);
    return hk;
}

/* O(1): a process removes its hook when it ends, usually the oldest one in the list. */
void ca__loop_remove_close_hook(ca_loop *loop, void *token)
{
    struct ca__close_hook *hk = token;
    pthread_mutex_lock(&loop->hooks_lock);
    bool linked = hk->pprev != NULL;
    if (linked) {
        *hk->pprev = hk->next;
        if (hk->next) hk->next->pprev = hk->pprev;
    }
    pthread_mutex_unlock(&loop->hooks_lock);
    if (linked) free(hk);
}

/* Takes the newest hook off the list (under hooks_lock) and keeps it in `retired`. */
static struct ca__close_hook *pop_close_hook(ca_loop *loop)
{
    struct ca__close_hook *hk = loop->close_hooks;
    if (!hk) return NULL;
    loop->close_hooks = hk->next;
    if (hk->next) hk->next->pprev = &loop->close_hooks;
    hk->pprev = NULL;
    hk->next = loop->retired;
    loop->retired = hk;
    return hk;
}

/* In a child of fork(): the hooks are forgotten, not run (see forked_close). */
static void retire_close_hooks(ca_loop *loop)
{
    while (pop_close_hook(loop)) {
    }
}

static void free_close_hooks(ca_loop *loop)
{
    retire_close_hooks(loop);
    while (loop->retired) {
        struct ca__close_hook *hk = loop->retired;
        loop->retired = hk->next;
        free(hk);
    }
}

ca_loop *ca_loop_ref(ca_loop *loop)
{
    if (loop) atomic_fetch_add_explicit(&loop->refs, 1, memory_order_relaxed);
    return loop;
}

/* In a child made by fork(): forget everything, release only our copies of the fds. */
static void forked_close(ca_loop *loop)
{
    if (atomic_exchange(&loop->closed, true)) return;
    retire_close_hooks(loop);
    if (loop->be) {
        drop_handles(loop, true);
        atomic_store(&loop->ts_inflight, 0);
        release_kernel_objects(loop, true);
    } else {
        host_ts_close(loop, true);
    }
}

ca_loop *ca_loop_unref(ca_loop *loop)
{
    if (!loop) return NULL;
    /* In a child of fork() the loop never runs again: the references banked for its futures
     * by the run that forked would keep it alive. Only this thread exists there. */
    if (CA_UNLIKELY(loop->fork_gen != ca__fork_gen()) && loop->fut_bank)
        ca__future_bank_flush(loop);
    if (atomic_fetch_sub_explicit(&loop->refs, 1, memory_order_acq_rel) != 1) return NULL;
    if (loop->fork_gen != ca__fork_gen()) forked_close(loop);
    else if (!atomic_load(&loop->closed)) ca_loop_close(loop);
    if (loop->ops->destroy) loop->ops->destroy(loop);
    if (!loop->be) {
        free(loop->ts_buf);
        free(loop->ts_spare);
    }
    free_close_hooks(loop);
    if (loop->fork_gen == ca__fork_gen()) pthread_mutex_destroy(&loop->hooks_lock);
    free(loop);
    return NULL;
}

int ca_loop_close(ca_loop *loop)
{
    if (!loop) return -EINVAL;
    if (loop->fork_gen != ca__fork_gen()) {
        forked_close(loop);
        return 0;
    }
    if (atomic_load(&loop->running)) return -EBUSY;
    if (atomic_load(&loop->closed)) return 0;
    /* Hooks run while the loop still works: they remove readers, end processes... One at a
     * time, popped under the lock and called without it (a hook may remove other hooks). */
    for (;;) {
        pthread_mutex_lock(&loop->hooks_lock);
        struct ca__close_hook *hk = pop_close_hook(loop);
        pthread_mutex_unlock(&loop->hooks_lock);
        if (!hk) break;
        hk->fn(hk->arg);
    }
    atomic_store(&loop->closed, true);
    int r = loop->ops->close ? loop->ops->close(loop) : 0;
    /* After the close op, which may stop watching the queue's fd before it is closed. */
    if (!loop->be) host_ts_close(loop, false);
    return r;
}

bool ca_loop_is_running(const ca_loop *loop)
{
    return loop && loop->fork_gen == ca__fork_gen() && atomic_load(&loop->running);
}

bool ca_loop_is_closed(const ca_loop *loop)
{
    if (!loop) return false;
    if (atomic_load(&loop->closed)) return true;
    /* The host's op is its process's: not asked in a child of fork(). */
    return loop->host_closed_op && loop->fork_gen == ca__fork_gen() &&
           loop->ops->is_closed((ca_loop *)loop);
}

double ca_loop_time(const ca_loop *loop)
{
    if (!loop) return NAN;
    if (loop->ops->time) return loop->ops->time((ca_loop *)loop);
    return ca__monotonic();
}

int ca_loop_run_forever(ca_loop *loop)
{
    int r = ca__loop_check(loop);
    if (r) return r;
    if ((r = enter_running(loop)) != 0) return r;
    r = loop->ops->run_forever(loop);
    exit_running(loop);
    return r;
}

static void ruc_done(ca_future *fut, void *arg)
{
    ca_loop *loop = arg;
    if (loop->ruc_future == fut) ca_loop_stop(loop);
}

int ca_loop_run_until_complete(ca_loop *loop, ca_future *fut)
{
    if (!loop || !fut || ca_future_loop(fut) != loop) return -EINVAL; /* bad argument first */
    int r = ca__loop_check(loop);
    if (r) return r;
    if (atomic_load(&loop->running) || ca_get_running_loop()) return -EBUSY;
    ca_future_ref(fut);
    r = ca_future_add_done_callback(fut, ruc_done, loop);
    if (r) {
        ca_future_unref(fut);
        return r;
    }
    ca_future *prev = loop->ruc_future;
    loop->ruc_future = fut;
    r = ca_loop_run_forever(loop);
    loop->ruc_future = prev;
    ca__future_remove_done_callback(fut, ruc_done, loop);
    if (r == 0) r = ca_future_done(fut) ? ca_future_result(fut, NULL) : -EAGAIN;
    ca_future_unref(fut);
    return r;
}

void ca_loop_stop(ca_loop *loop)
{
    if (!loop || loop->fork_gen != ca__fork_gen()) return;
    atomic_fetch_add(&loop->ts_inflight, 1);
    if (!atomic_load(&loop->closed) && loop->ops->stop) loop->ops->stop(loop);
    atomic_fetch_sub(&loop->ts_inflight, 1);
}

/* Makes the handle for a scheduling call: from the free list for built-in loops (the loop
 * owns it unless the caller asked for it), malloc'ed and reference-counted for custom ones
 * (their ops may keep it). */
static ca_handle *new_handle(ca_loop *loop, ca_callback_fn fn, void *arg, bool want)
{
    bool escaped = want || !loop->be;
    ca_handle *h = handle_alloc(fn, arg);
    if (h) h->escaped = escaped;
    return h;
}

/* Finishes a scheduling call: hands out the handle or drops the core's reference. */
static int finish_schedule(ca_loop *loop, ca_handle *h, int r, ca_handle **out)
{
    if (loop->be) {
        if (r) {
            handle_release(h);
            return r;
        }
        if (out) *out = ca_handle_ref(h);
        return 0;
    }
    if (r || !out) ca_handle_unref(h);
    else *out = h;
    return r;
}

int ca_loop_call_soon(ca_loop *loop, ca_callback_fn fn, void *arg, ca_handle **out)
{
    if (CA_UNLIKELY(!loop || !fn)) return -EINVAL;
    int r = check_owned(loop);
    if (CA_UNLIKELY(r)) return r;
    if (CA_LIKELY(loop->be && !out && loop->ops->call_soon == ca__core_call_soon)) {
        /* The hot path of every built-in loop: (fn, arg) onto the ready ring, no handle.
         * What other threads submitted before goes first: asyncio has one queue. */
        ts_drain(loop);
        return rq_push(loop, fn, arg);
    }
    if (!loop->ops->call_soon) return -ENOTSUP;
    ca_handle *h = new_handle(loop, fn, arg, out != NULL);
    if (!h) return -ENOMEM;
    return finish_schedule(loop, h, loop->ops->call_soon(loop, h), out);
}

/* call_at once the checks are done (call_later does them itself, once). */
static int schedule_at(ca_loop *loop, double when, ca_callback_fn fn, void *arg, ca_handle **out)
{
    if (CA_LIKELY(loop->be && !out && loop->ops->call_at == ca__core_call_at))
        return heap_push(loop, when, fn, arg); /* nobody can cancel it: no handle yet */
    if (!loop->ops->call_at) return -ENOTSUP;
    ca_handle *h = new_handle(loop, fn, arg, out != NULL);
    if (!h) return -ENOMEM;
    return finish_schedule(loop, h, loop->ops->call_at(loop, when, h), out);
}

int ca_loop_call_at(ca_loop *loop, double when, ca_callback_fn fn, void *arg, ca_handle **out)
{
    if (!loop || !fn || isnan(when)) return -EINVAL;
    int r = check_owned(loop);
    if (r) return r;
    return schedule_at(loop, when, fn, arg, out);
}

int ca_loop_call_later(ca_loop *loop, double delay, ca_callback_fn fn, void *arg,
                       ca_handle **out)
{
    if (!loop || !fn || isnan(delay)) return -EINVAL;
    int r = check_owned(loop);
    if (r) return r;
    return schedule_at(loop, ca_loop_time(loop) + (delay > 0 ? delay : 0), fn, arg, out);
}

int ca_loop_call_soon_threadsafe(ca_loop *loop, ca_callback_fn fn, void *arg)
{
    if (!loop || !fn) return -EINVAL;
    int r = ca__loop_check(loop);
    if (r) return r;
    if (!loop->ops->call_soon_threadsafe)
        return loop->be ? -ENOTSUP : host_ts_push(loop, fn, arg, NULL);
    if (loop->be && loop->ops->call_soon_threadsafe == ca__core_call_soon_threadsafe) {
        /* Built-in loops: no handle at all, just (fn, arg) into the queue. */
        return ts_push(loop, fn, arg, NULL);
    }
    ca_handle *h = handle_alloc(fn, arg);
    if (!h) return -ENOMEM;
    h->escaped = true;
    atomic_fetch_add(&loop->ts_inflight, 1);
    r = loop->ops->call_soon_threadsafe(loop, h);
    atomic_fetch_sub(&loop->ts_inflight, 1);
    ca_handle_unref(h);
    return r;
}

union reservation {
    ca_handle handle;
    struct ca__post node;
};

ca_handle *ca__handle_reserve(void) { return malloc(sizeof(union reservation)); }

/* A built-in loop's post failed for memory: the caller's reservation becomes an owned node. */
static int post_spare(ca_loop *loop, ca_callback_fn fn, void *arg, ca_handle **spare)
{
    struct ca__post *node = (struct ca__post *)(void *)*spare;
    *node = (struct ca__post){.fn = fn, .arg = arg, .owned = true};
    int r = ca__loop_post_node(loop, node);
    if (r == 0) *spare = NULL;
    return r;
}

void ca__handle_unreserve(ca_handle *h) { free(h); }

int ca__loop_post_node(ca_loop *loop, struct ca__post *node)
{
    if (!loop->be) return -ENOTSUP;
    int r = 0;
    node->next = NULL;
    ts_lock(loop);
    if (loop->ts_closed) {
        r = -EBADF;
    } else {
        if (loop->ts_nodes) loop->ts_nodes_last->next = node;
        else loop->ts_nodes = node;
        loop->ts_nodes_last = node;
        atomic_store(&loop->ts_pending, true);
        wake(loop);
    }
    ts_unlock(loop);
    return r;
}

int ca__loop_schedule(ca_loop *loop, ca_callback_fn fn, void *arg, ca_callback_fn drop)
{
    return ca__loop_schedule_ex(loop, fn, arg, drop, NULL, false);
}

int ca__loop_schedule_ex(ca_loop *loop, ca_callback_fn fn, void *arg, ca_callback_fn drop,
                         ca_handle **spare, bool any_thread)
{
    int r;
    /* The common case, from a callback of the loop itself, needs no further check: a loop
     * running in this thread is open, and this is its thread. */
    bool own = loop && ca__running_here(loop);
    if (!own) {
        if ((r = ca__loop_check(loop)) != 0) return r;
        own = !any_thread && ca__loop_in_own_thread(loop);
    }
    if (!fn) return -EINVAL;
    if (loop->be) {
        /* Built-in loops: straight into the core's queues, whatever their ops table. */
        bool plain = !drop || drop == known_drop(fn);
        if (own) ts_drain(loop);
        if (!own || plain) {
            r = own ? rq_push(loop, fn, arg) : ts_push(loop, fn, arg, drop);
            /* Out of memory: the caller's reservation carries it (a node needs no room). */
            if (CA_UNLIKELY(r == -ENOMEM) && plain && spare && *spare)
                r = post_spare(loop, fn, arg, spare);
            return r;
        }
        ca_handle *h = handle_alloc(fn, arg);
        if (!h) return -ENOMEM;
        h->drop = drop;
        r = ready_push(loop, h);
        if (r) { /* refused: the caller keeps arg */
            h->drop = NULL;
            handle_free(h);
        }
        return r;
    }
    /* A host loop that uses the core's queue: from any thread but one where it is marked
     * running, the queue, which is safe from anywhere (the core cannot tell the host's thread
     * from another while the host has not marked its loop running). -ENOTSUP: no queue. */
    if (!loop->ops->call_soon_threadsafe && !ca__running_here(loop)) {
        r = host_ts_push(loop, fn, arg, drop);
        if (r != -ENOTSUP) return r;
    }
    /* Custom loops: a reference-counted handle; whoever drops the last reference without
     * running it calls drop. */
    int (*op)(ca_loop *, ca_handle *) = own ? loop->ops->call_soon : loop->ops->call_soon_threadsafe;
    if (!op) return -ENOTSUP;
    ca_handle *h = handle_alloc(fn, arg);
    bool reserved = false;
    if (CA_UNLIKELY(!h) && spare && *spare) {
        /* The caller's reservation: the loop owns it from now on (its last unref frees it). */
        h = *spare;
        *spare = NULL;
        handle_init(h, fn, arg);
        reserved = true;
    }
    if (!h) return -ENOMEM;
    h->escaped = true;
    h->drop = drop;
    atomic_fetch_add(&loop->ts_inflight, 1);
    r = op(loop, h);
    atomic_fetch_sub(&loop->ts_inflight, 1);
    if (r) h->drop = NULL; /* refused: the caller keeps arg */
    if (CA_UNLIKELY(r && reserved) && atomic_load(&h->refs) == 1) {
        *spare = h; /* refused: the reservation stays the caller's */
        return r;
    }
    ca_handle_unref(h);
    return r;
}

/* fd < 0 or not open: both are bad arguments (issue 2's list). */
static int check_fd(int fd)
{
    if (fd < 0) return -EINVAL;
    if (fcntl(fd, F_GETFD) < 0) return -EINVAL;
    return 0;
}

int ca_loop_add_reader(ca_loop *loop, int fd, ca_callback_fn fn, void *arg)
{
    if (!loop || !fn) return -EINVAL;
    int r = check_fd(fd);
    if (r) return r;
    if ((r = check_owned(loop)) != 0) return r;
    if (!loop->ops->add_reader) return -ENOTSUP;
    return loop->ops->add_reader(loop, fd, fn, arg);
}

int ca_loop_add_writer(ca_loop *loop, int fd, ca_callback_fn fn, void *arg)
{
    if (!loop || !fn) return -EINVAL;
    int r = check_fd(fd);
    if (r) return r;
    if ((r = check_owned(loop)) != 0) return r;
    if (!loop->ops->add_writer) return -ENOTSUP;
    return loop->ops->add_writer(loop, fd, fn, arg);
}

/* The removers answer 0 on a closed loop, as asyncio does. */
static int check_remove(const ca_loop *loop)
{
    if (!loop) return -EINVAL;
    if (loop->fork_gen != ca__fork_gen()) return -ECHILD;
    if (atomic_load(&loop->closed)) return 1;
    if (!ca__loop_in_own_thread(loop)) return -EPERM;
    return 0;
}

int ca_loop_remove_reader(ca_loop *loop, int fd)
{
    if (fd < 0) return -EINVAL;
    int r = check_remove(loop);
    if (r) return r > 0 ? 0 : r;
    if (!loop->ops->remove_reader) return -ENOTSUP;
    return loop->ops->remove_reader(loop, fd);
}

int ca_loop_remove_writer(ca_loop *loop, int fd)
{
    if (fd < 0) return -EINVAL;
    int r = check_remove(loop);
    if (r) return r > 0 ? 0 : r;
    if (!loop->ops->remove_writer) return -ENOTSUP;
    return loop->ops->remove_writer(loop, fd);
}

int ca_loop_add_signal_handler(ca_loop *loop, int sig, ca_callback_fn fn, void *arg)
{
    if (!loop || !fn || !ca__signal_valid(sig)) return -EINVAL;
    int r = check_owned(loop);
    if (r) return r;
    if (!loop->ops->add_signal_handler) return -ENOTSUP;
    return loop->ops->add_signal_handler(loop, sig, fn, arg);
}

int ca_loop_remove_signal_handler(ca_loop *loop, int sig)
{
    if (!ca__signal_valid(sig)) return -EINVAL;
    int r = check_remove(loop);
    if (r) return r > 0 ? 0 : r;
    if (!loop->ops->remove_signal_handler) return -ENOTSUP;
    return loop->ops->remove_signal_handler(loop, sig);
}

int ca_loop_enter_running(ca_loop *loop)
{
    int r = ca__loop_check(loop);
    if (r) return r;
    return enter_running(loop);
}

int ca_loop_exit_running(ca_loop *loop)
{
    if (!loop) return -EINVAL;
    if (loop->fork_gen != ca__fork_gen()) return -ECHILD;
    if (tl_running != loop) return -EINVAL;
    exit_running(loop);
    return 0;
}

/* ----- for the child watchers (h-watch; watcher*.c) ------------------------------------------
 * The watchers call loop ops only after releasing their own locks; between the unlock and the
 * op they need the loop alive without being the ones to hold it, hence a reference that fails
 * once the last one is gone (the loop is then being closed and freed). Under their lock they
 * may only ask whether ca_loop_close ran, never the host's is_closed op. */

bool ca__loop_tryref(ca_loop *loop)
{
    int n = atomic_load_explicit(&loop->refs, memory_order_relaxed);
    do {
        if (n <= 0) return false;
    } while (!atomic_compare_exchange_weak_explicit(&loop->refs, &n, n + 1,
                                                    memory_order_relaxed,
                                                    memory_order_relaxed));
    return true;
}

bool ca__loop_core_closed(const ca_loop *loop) { return atomic_load(&loop->closed); }
