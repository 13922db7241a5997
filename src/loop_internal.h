/*
 * The loop core's private structures, shared by loop.c (the core), the backends
 * (loop_epoll.c, loop_poll.c, loop_uring.c) and sock.c. A backend only answers "which fds are
 * ready / which operations completed, waiting at most T"; everything else is the core's.
 */
#ifndef CA_LOOP_INTERNAL_H
#define CA_LOOP_INTERNAL_H

#include "internal.h"

#include <pthread.h>
#include <stddef.h>

enum { CA__READ = 1, CA__WRITE = 2, CA__ERR = 4 };

/* The internal backend table (nginx's ngx_event_actions_t): one const instance per kind. */
typedef struct ca__backend {
    const char *name;
    /* Creates the backend's kernel objects, storing its state in loop->be_data. */
    int (*init)(ca_loop *loop);
    /* Releases them. forked: we are in a child of fork(); only close our fds and free memory. */
    void (*fini)(ca_loop *loop, bool forked);
    /* The interest set of fd changes from old_ev to new_ev (CA__READ|CA__WRITE; 0 = none).
     * Level-triggered. old_ev may equal new_ev: the core then re-registers the fd, whose
     * number may have been reused by a file the kernel does not watch yet. Returns 0 or a
     * negative errno. */
    int (*modify)(ca_loop *loop, int fd, unsigned old_ev, unsigned new_ev);
    /* Waits at most timeout_ns (-1: no limit, 0: do not block) and reports each ready fd with
     * ca__loop_io(loop, fd, CA__READ|CA__WRITE|CA__ERR). Returns 0 or a negative errno
     * (EINTR is not an error: return 0). */
    int (*poll)(ca_loop *loop, int64_t timeout_ns);
    /* True when the only thing poll() could report with no user fd watched is the core's
     * wakeup fd: the core then skips the zero-timeout poll while callbacks are ready (it
     * drains the thread-safe queue and checks the signal mask without a system call). A
     * backend with operations of its own in flight (io_uring) leaves it false. */
    bool may_skip_poll;
} ca__backend;

extern const ca__backend ca__backend_epoll;
extern const ca__backend ca__backend_poll;

struct ca_handle {
    atomic_int refs;         /* core's reference + the user's ones */
    bool cancelled;
    bool escaped;            /* a user (or a custom loop's op) may hold references */
    bool scheduled;          /* in the ready queue or the timer heap of `loop` */
    bool in_heap;            /* a timer still in the heap (cancelled ones leave lazily) */
    bool ran;
    ca_callback_fn fn;
    void *arg;
    ca_callback_fn drop;     /* internal: frees arg when the handle goes without running */
    ca_loop *loop;           /* valid while scheduled; NULL otherwise for escaped handles */
};

/* A ready callback: fn NULL means arg is a ca_handle (one a user may hold, or one with a drop
 * function); plain call_soon and due timers need no handle at all. */
struct ca__entry {
    ca_callback_fn fn;
    void *arg;
};


/* A timer: when nobody can hold its handle (call_at/call_later without `out`), the heap keeps
 * (fn, arg) itself and no handle is ever made; otherwise fn is NULL and arg is the handle. */
struct ca__timer {
    double when;
    uint64_t seq;
    ca_callback_fn fn;
    void *arg;
};

struct ca__fdent {
    ca_callback_fn rfn, wfn;
    void *rarg, *warg;
    unsigned ev;             /* what the backend was told */
    bool internal;           /* the loop's own wakeup fd */
    unsigned char sock;      /* the directions (CA__READ|CA__WRITE) watched for sock.c */
};

struct ca__close_hook {
    void (*fn)(void *arg);
    void *arg;
    struct ca__close_hook *next;
    struct ca__close_hook **pprev; /* NULL once close took it (then it waits in `retired`) */
};

struct ca_loop {
    const ca_loop_ops *ops;
    void *data;                        /* custom loops */
    const char *kind;
    atomic_int refs;
    unsigned fork_gen;
    atomic_bool closed;
    atomic_bool running;
    atomic_bool stopping;
    bool host_closed_op;               /* a custom loop with an is_closed op */
    _Atomic(const void *) owner;       /* token of the thread that runs it */
    _Atomic(const void *) last_owner;  /* token of the thread that ran it last (never cleared) */
    struct ca__close_hook *close_hooks;
    struct ca__close_hook *retired;    /* hooks close already ran: freed with the loop, so a
                                        * late remove of one is a no-op, not a use after free */
    pthread_mutex_t hooks_lock;        /* close hooks may be added by any thread while idle */
    struct ca__sock_state *sock;       /* sock.c's generic sock_* state (freed by a close hook) */

    /* ----- built-in loops only (be != NULL) ----- */
    const ca__backend *be;
    void *be_data;
    /* ready queue: a FIFO ring of (fn, arg), grown by doubling, given back when idle */
    struct ca__entry *rq;
    size_t rq_cap, rq_head, rq_len;
    /* Out of memory: an iteration could not move a due timer or a thread-safe submission onto
     * the ready ring (`starved`); the next polls wait oom_wait_ms (1, doubling to 128) instead
     * of 0, so a loop short of memory does not spin. 0 once an iteration moves everything. */
    bool starved;
    unsigned oom_wait_ms;
    uint64_t sig_retry;                /* signals whose handler could not be queued (memory) */
    /* timer heap: a 4-ary min-heap on (when, seq) with the keys stored inline, so sifting
     * never touches the handles; the four children of a node share one 128-byte block
     * (heap_mem is the allocation, heap points 3 entries into it); cancelled timers are
     * dropped lazily (asyncio's scheme) */
    struct ca__timer *heap;
    void *heap_mem;
    size_t heap_len, heap_cap, heap_cancelled;
    uint64_t seq;
    /* fd table */
    struct ca__fdent *fds;
    int nfds;
    size_t n_watched;                  /* user readers/writers */
    /* thread-safe submissions: an array of (fn, arg) under a spinlock, taken whole by the
     * loop (exact arrival order, no allocation per call); ts_pending lets the loop look
     * without the lock. On cache lines of their own: other threads write them.
     * A custom loop without call_soon_threadsafe uses ts_lock, ts_buf/ts_len/ts_cap,
     * ts_spare, ts_closed and wake_fd (made by ca_loop_threadsafe_fd, -1 until then) for the
     * queue the core keeps for it: see "the host's thread-safe queue" in loop.c. */
    _Alignas(64) atomic_flag ts_lock;  /* see ts_lock() in loop.c */
    struct ca__entry *ts_buf, *ts_spare;
    size_t ts_len, ts_cap, ts_spare_cap;
    bool ts_closed;
    /* Posts that could not get a place in the queues for want of memory (ca__loop_post_node):
     * a FIFO list of the posters' nodes, under ts_lock, moved to the ready ring when the loop
     * drains the queue (ts_pending is set while the list is not empty). */
    struct ca__post *ts_nodes, *ts_nodes_last;
    atomic_bool ts_pending;
    atomic_bool polling;               /* the loop is (about to be) blocked in the backend */
    atomic_bool wake_pending;          /* an eventfd write is in flight */
    int wake_fd;
    /* signals */
    _Alignas(64) ca__sigslot *sigslot;
    ca_handle *sig_handlers[65];       /* per signal, escaped handles owned by the loop */
    atomic_int ts_inflight;            /* threads between the closed check and the wakeup write */
    ca_future *ruc_future;             /* what run_until_complete waits for */
    /* futures freed while the loop ran in this thread, for the next ca_future_new there
     * (future.c; touched only by the thread running the loop) */
    void *fut_cache;
    unsigned fut_cached;
    unsigned fut_bank;                 /* loop references taken for futures, not yet used */
};

/* Called by backends for each ready fd. */
void ca__loop_io(ca_loop *loop, int fd, unsigned revents);
/* The built-in ops tables (they differ only in sock_* members). */
int ca__builtin_loop_new(const ca__backend *be, const ca_loop_ops *ops, const char *kind,
                         ca_loop **out);
extern const ca_loop_ops ca__selector_ops;

/* Core operations that the built-in ops tables point to (the uring table reuses them). */
int ca__core_run_forever(ca_loop *self);
void ca__core_stop(ca_loop *self);
int ca__core_close(ca_loop *self);
int ca__core_call_soon(ca_loop *self, ca_handle *h);
int ca__core_call_soon_threadsafe(ca_loop *self, ca_handle *h);
int ca__core_call_at(ca_loop *self, double when, ca_handle *h);
int ca__core_add_reader(ca_loop *self, int fd, ca_callback_fn fn, void *arg);
int ca__core_remove_reader(ca_loop *self, int fd);
int ca__core_add_writer(ca_loop *self, int fd, ca_callback_fn fn, void *arg);
int ca__core_remove_writer(ca_loop *self, int fd);
int ca__core_add_signal_handler(ca_loop *self, int sig, ca_callback_fn fn, void *arg);
int ca__core_remove_signal_handler(ca_loop *self, int sig);
void ca__core_destroy(ca_loop *self);

/* Common checks of the public functions: -EINVAL, -ECHILD, -EBADF in that order. */
/* loop.c: the loop running in this thread, and the fork generation it started in. */
extern _Thread_local ca_loop *ca__tl_running CA_TLS_IE;
extern _Thread_local unsigned ca__tl_running_gen CA_TLS_IE;

/* loop (not NULL) runs in this thread: so it is open, not a copy in a child of fork(), and
 * this is its own thread. The fast path of the loop-thread functions. */
static inline bool ca__running_here(const ca_loop *loop)
{
    return ca__tl_running == loop && ca__tl_running_gen == ca__fork_gen();
}

/* loop.c: sock.c's readers and writers on built-in loops: set_io/clear_io without the public
 * wrappers' checks, marking the direction as sock.c's for the backend (epoll registers an fd
 * watched only by them one-shot). what: CA__READ or CA__WRITE. */
int ca__loop_sock_watch(ca_loop *loop, int fd, unsigned what, ca_callback_fn fn, void *arg);
void ca__loop_sock_unwatch(ca_loop *loop, int fd, unsigned what);

static inline int ca__loop_check(const ca_loop *loop)
{
    if (!loop) return -EINVAL;
    if (CA_UNLIKELY(loop->fork_gen != ca__fork_gen())) return -ECHILD;
    if (CA_UNLIKELY(atomic_load_explicit(&loop->closed, memory_order_relaxed))) return -EBADF;
    /* A host that closed its loop behind the core's back (never called with a library lock
     * held: every caller of this check holds none). */
    if (CA_UNLIKELY(loop->host_closed_op) && loop->ops->is_closed((ca_loop *)loop)) return -EBADF;
    return 0;
}

double ca__monotonic(void);

/* future.c: runs the done callbacks of a completion / drops them unrun (the loop closed). The
 * loop knows this pair: such an entry needs no handle to carry its drop function. */
void ca__future_run_fired(void *arg);
void ca__future_drop_fired(void *arg);
/* future.c: frees the loop's cache of futures (destroy). */
void ca__future_cache_free(ca_loop *loop);
/* future.c: gives back the loop references banked for futures (the loop stops running). */
void ca__future_bank_flush(ca_loop *loop);
/* future.c: a new future, done already: with result res, or error err when err < 0 (socket
 * operations that completed at once). */
int ca__future_new_done(ca_loop *loop, intptr_t res, int err, ca_future **out);
/* future.c: fn(arg) is called, once, when fut is completed by anything else than
 * ca__future_finish (cancelled by its user): the operation that owns fut withdraws itself.
 * It runs inside the completing call, before the done callbacks are scheduled. NULL fn: none. */
void ca__future_set_owner(ca_future *fut, void (*fn)(void *), void *arg);
/* future.c: the owner completes its pending future (err < 0: error, else result) and gives up
 * one reference to it in the same step (its callbacks' entry takes it over). */
void ca__future_finish(ca_future *fut, int err, void *result);
/* future.c: removes a done callback that has not been scheduled yet (1 removed, 0 not). */
int ca__future_remove_done_callback(ca_future *fut, void (*fn)(ca_future *, void *), void *arg);

/* ----- for the child watchers (loop.c's last block) ------------------------------------------ */
/* A reference to loop unless its last one is already gone (then false: it is being closed).
 * Any thread. */
bool ca__loop_tryref(ca_loop *loop);
/* Whether ca_loop_close ran (or runs): the closed flag only, never the host's is_closed op, so
 * it may be asked with a library lock held. */
bool ca__loop_core_closed(const ca_loop *loop);

#endif
