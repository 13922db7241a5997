/*
 * Child watchers: the structures shared by watcher.c (dispatch, the common core and the seam)
 * and the six built-in watchers (watcher_threaded.c, watcher_multiloop.c, watcher_safe.c,
 * watcher_fast.c, watcher_pidfd.c, watcher_uring.c). Nothing here is public.
 *
 * The common core (ca__wcore) is what every built-in watcher is made of:
 *   - a pid table of registrations (ca__wreg), and a list of the ones still waiting for their
 *     child's exit (for the O(n) pollers);
 *   - bindings (ca__wbind), one per (watcher, delivery loop), each with a close hook on its loop.
 *     Exits are posted to a loop with ca_loop_call_soon_threadsafe; a posted callback that the
 *     loop drops because it was closed first would leak its registration, so the binding's close
 *     hook frees what is still posted there. The binding holds no reference to its loop (that
 *     would keep a loop that its owner only unrefs from ever being closed): the loop pointer is
 *     valid while the core's lock is held and it is not NULL, because the close hook clears it
 *     under that lock before the loop can be freed.
 * Everything in the core is protected by its one mutex, except the reference counts of the core
 * (atomic).
 *
 * Lock order (issue 13). A loop op (a host's ops may take a lock of their own, such as Python's
 * GIL, and hand it to other threads), a user callback and the log handler are never called with
 * the core's lock held: code under the lock decides what to do and queues it on a ca__wlog
 * (log lines, posts of exits, Pidfd's reader removals), and ca__wlog_flush does it after the
 * unlock. A queued operation holds a reference to its registration and, taken with
 * ca__loop_tryref under the lock, to its loop: the binding's loop pointer is only valid under
 * the lock. The flags that say an operation is on its way (posted, rd_releasing) are set under
 * the lock when it is queued, so that a remove, a close or a loop's close hook racing with it
 * sees it and leaves it to its flusher, or takes it over (see each user).
 *
 * Internal registrations (the library's own, made by process.c through ca__child_watcher_add_
 * internal or ca__pidfd_watcher_lend) are told when they are dropped without their callback
 * (the watcher closed, the exit could not be posted, a user's remove or add for the pid): their
 * callback is then called once with CA__RC_DROPPED, or with the returncode if the child had been
 * reaped. Either way it is called exactly once, unless the owner takes the registration back
 * (ca__child_watcher_take_back). Unregistering queues that call on the core (c->dropped) and
 * ca__wcore_unlock makes it after releasing the lock: the owner's code may take this lock again
 * (through a loop's close hooks, or by freeing what holds the watcher).
 */
#ifndef CA_WATCHER_INTERNAL_H
#define CA_WATCHER_INTERNAL_H

#include "internal.h"
#include "loop_internal.h"

#include <pthread.h>
#include <stddef.h>

struct ca_child_watcher {
    const ca_child_watcher_ops *ops;
    void *data;               /* custom watchers: the user's; built-ins: NULL */
    void *impl;               /* built-ins: their ca__wcore */
    const char *kind;
    atomic_int refs;
    unsigned fork_gen;
    atomic_bool closed;
};

/* What a registration knows about its child. */
enum {
    CA__W_WAITING = 0,  /* running, or exited but not reaped by us yet */
    CA__W_EXITED,       /* reaped (rc is set); delivery posted or about to run */
    CA__W_ZOMBIE,       /* Fast: reaped before a handler was added (no callback yet) */
    CA__W_DONE,         /* delivered, dropped, or cancelled */
};

/* ----- work deferred to after the unlock: log lines, then loop ops ------------------------ */
enum { CA__OP_NONE = 0, CA__OP_POST_EXIT, CA__OP_POST_RELEASE, CA__OP_RELEASE };
typedef struct ca__wlog {
    char *buf;                   /* "<level char><message>\0" records (small, then malloc'ed) */
    size_t len, cap;
    struct ca__wreg *ops, *ops_last; /* registrations with an op queued (r->op), in order */
    /* A loop's close hook (bind_hook): Pidfd's reader removals on that closing loop (alive for
     * the hook's duration, so no reference), linked through r->hnext. */
    struct ca__wreg *hook_rel;
    ca_loop *hook_loop;
    struct ca__wcore *core;
    char small[320];             /* the usual one or two lines need no allocation */
} ca__wlog;
typedef struct ca__wcore ca__wcore;
typedef struct ca__wbind ca__wbind;
typedef struct ca__wreg ca__wreg;

struct ca__wreg {
    pid_t pid;
    int rc;
    ca__wcore *core;             /* not a reference */
    int refs;                    /* under the core's lock */
    int pidfd;                   /* Pidfd watcher: -1 when none (or released) */
    uint32_t widx;               /* its index in the core's waiting array (if in_wait) */
    unsigned char state;
    bool registered : 1;         /* in the pid table: its callback may still be called */
    bool posted : 1;             /* a callback posted to bind->loop holds a reference */
    bool in_wait : 1;            /* waiting for its child (in the core's waiting array) */
    bool pidfd_lost : 1;         /* Pidfd: its loop closed, the fd was released */
    bool pidfd_lent : 1;         /* Pidfd: pidfd is a subprocess's, not ours to close */
    bool internal : 1;           /* the owner hears of a drop (see the top of the file) */
    bool owner_reaps : 1;        /* an internal one dropped unreaped or taken back: its child is
                                  * its owner's to reap (Threaded's thread leaves it) */
    bool in_retry : 1;           /* on the core's retry list: its post failed for memory */
    bool rd_adding : 1;          /* Pidfd: add_reader is being called (lock not held) */
    bool rd_on : 1;              /* Pidfd: the reader is on the loop */
    bool rd_releasing : 1;       /* Pidfd: its removal is queued or posted (release_cb) */
    bool rd_release_wanted : 1;  /* Pidfd: release once rd_adding ends */
    bool rd_cancel_wanted : 1;   /* Pidfd: removed (or closed) while rd_adding: the add does it */
    ca_child_fn cb;
    void *arg;
    ca__wreg *drop_next;         /* c->dropped (unregistered: pid, rc, cb, arg are final) */
    ca__wbind *bind;             /* delivery binding, or NULL */
    ca__wreg *bprev, *bnext;     /* binding's list */
    ca__wreg *dnext;             /* a delivery list (ca__wreg_take_into) */
    void *kdata;                 /* the kind's own (Uring: the WAITID request), or NULL */
    ca__wreg *rnext;             /* the core's retry list */
    ca__wreg *tnext;             /* Threaded: its waiting thread's hand-off list, then the
                                  * posting thread's own retry list */
    /* A queued op (CA__OP_*): set under the lock when queued; the flusher reads and clears them
     * unlocked before it performs the op (the flags above keep anyone else from queuing r). */
    unsigned char op;
    bool op_loop_ref;            /* op_loop is a reference (else: a closing loop, hook only) */
    ca_loop *op_loop;
    ca__wreg *onext;
    ca__wreg *hnext;             /* a close hook's list of releases (ca__wlog.hook_rel) */
};

struct ca__wbind {
    ca__wcore *core;             /* a reference */
    ca_loop *loop;               /* not a reference; NULL once the loop closed */
    void *hook;                  /* close hook token, NULL once run or removed */
    int refs;                    /* bound registrations + hook + check_posted + holders */
    ca__wreg *regs;              /* registrations bound here */
    ca__wbind *next;             /* core's list */
    bool check_posted;           /* Safe/Fast: a "poll now" callback is posted */
    bool rescan_posted;          /* Safe: a "look again" timer is pending (ca__wreap_next) */
    bool sig_registered;         /* Safe/Fast: our SIGCHLD handler is on this loop (no ref) */
    bool tick_posted;            /* Safe/Fast: the slow check timer is pending */
};

struct ca__wcore {
    pthread_mutex_t lock;
    atomic_int refs;
    bool closed;
    /* pid table: open addressing, linear probing, backward-shift deletion */
    ca__wreg **slots;
    size_t cap, len;
    /* Registrations still waiting for their child, for the O(n) pollers (MultiLoop, Safe; only
     * when track_wait): a compact array, the pids apart from the registrations so that a poll
     * reads one dense array. Removal moves the last entry into the hole (r->widx). */
    bool track_wait;
    uint32_t nwait, wcap;
    pid_t *wpids;
    ca__wreg **wregs;
    ca__wbind *binds;
    ca__wreg *dropped;           /* internal registrations dropped: called at the unlock */
    /* An internal registration replaced by an add (at most one per locked section: one add):
     * its old callback, called at the unlock with CA__RC_REPLACED or the rc. */
    ca_child_fn replaced_cb;
    void *replaced_arg;
    pid_t replaced_pid;
    int replaced_rc;
    bool keeps_sigchld;          /* holds ca__sigchld_keep_acquire() */
    /* ca__wreap_next: the exited child that is not ours and hid the others at the last look
     * (0: none), and since when (CLOCK_MONOTONIC ns). */
    pid_t hider;
    long long hider_since;
    /* ca__wreap_begin: the next SIGCHLD hint to read (ca__sigchld_hints). */
    uint64_t hint_seq;
    /* Registrations whose post failed for memory (ENOMEM): kept, reaped, and posted again by
     * ca__wcore_retry (each holds a reference while on the list). */
    ca__wreg *retry;
    const struct ca__wkind *kind; /* what this kind does differently (the seam, below) */
    void *impl;                  /* the kind's own state */
};

/* ----- the seam: what one built-in kind does differently ----------------------------------- */
/* Every built-in watcher is a ca__wcore plus one ca__wkind, defined in its own file; watcher.c
 * does everything they share: the public ops (one table for all of them), the add opening
 * (delivery loop, lock, closed check, binding, lookup, replace or register), remove, take back,
 * and the user vs internal registrations. A new watcher is one file with its ca__wkind and
 * constructor, plus one line in kinds.c. */

/* One add on its way (ca__wcore_add), as the kind's hooks see it. */
typedef struct ca__wadd {
    ca_loop *loop;               /* the delivery loop, a reference (Safe, Fast: the attached one) */
    pid_t pid;
    ca_child_fn cb;
    void *arg;
    bool internal;               /* a registration of the library's own (see the top) */
    int lent;                    /* Pidfd's loan: the subprocess's pidfd to watch with, else -1 */
    ca__wreg **lease;            /* Pidfd's loan: gets the loan (ca__pidfd_watcher_lend_on) */
    ca__wreg *r;                 /* start, finish: the new registration */
    void *kstate;                /* from start to finish: the kind's own (Uring: the ring) */
    int kfd;                     /* from start to finish: the kind's own (Pidfd: the fd) */
} ca__wadd;

enum {
    /* The delivery loop must be the calling thread's own (-EPERM): the kind adds a reader to
     * it from the add (Pidfd, Uring). */
    CA__WKIND_OWN_THREAD = 1u << 0,
    /* New registrations are bound to no loop (Uring: its ring holds the loop). */
    CA__WKIND_UNBOUND = 1u << 1,
    /* An add for a pid that is watched already replaces its callback only: the child stays
     * watched through the loop it was (Pidfd, Uring: their reader or request is there; Safe,
     * Fast: there is one loop). Without it, a child that has not exited moves to the add's
     * delivery loop. */
    CA__WKIND_KEEP_LOOP = 1u << 2,
};
/* start's answer when finish must run after the unlock. */
#define CA__WSTART_FINISH 1

typedef struct ca__wkind {
    const char *name;            /* ca__child_watcher_kind's answer, as in kinds.c's table */
    unsigned flags;              /* CA__WKIND_* */
    /* The opening of an add for kinds that deliver on an attached loop (Safe, Fast; NULL: the
     * shared opening, see ca__wcore_add): on success the lock is held and *bind is the binding
     * new registrations go to; *loop gets a reference to the delivery loop or NULL, in any
     * case (the caller drops it). */
    int (*begin)(ca__wcore *c, ca_loop *given, ca_loop **loop, ca__wbind **bind);
    /* An add for a pid that is registered, after its callback was replaced: the kind's extra
     * (Fast: a child that exited before its handler came is delivered now). Lock held. */
    void (*existing)(ca__wcore *c, ca__wreg *r, ca__wlog *q);
    /* Starts watching the new registration a->r (in the table, bound, internal set; NULL:
     * nothing to start, as for Fast, whose reaping finds every child). Returns 0, or < 0 when
     * the add fails, having taken a->r out of the table quietly itself, or CA__WSTART_FINISH
     * to have finish called after the unlock. Lock held. */
    int (*start)(ca__wcore *c, ca__wadd *a, ca__wlog *q);
    /* The part of an add that calls loop ops (Pidfd, Uring: add a reader). Returns the add's
     * result. Lock NOT held (it takes it for the outcome). */
    int (*finish)(ca__wcore *c, ca__wadd *a, ca__wlog *q);
    /* Cancels registered r for a remove, a take back or a close (Pidfd: also releases its fd;
     * Uring: cancels its request); NULL: ca__wreg_unregister. Lock held. */
    void (*cancel)(ca__wcore *c, ca__wreg *r, ca__wlog *q);
    /* r's binding's loop is closing (r is in any state; the loop runs nothing any more). Lock
     * held. May be NULL. */
    void (*loop_closed)(ca__wcore *c, ca__wreg *r, ca_loop *loop, ca__wlog *q);
    void (*reg_free)(ca__wreg *r); /* r is about to be freed; may be NULL */
    /* The public ops that differ (watcher.c checks the watcher first, as for any watcher).
     * NULL: attach_loop does nothing, is_active answers true, enter and exit do nothing,
     * destroy is ca__wcore_destroy_op. close is required. */
    int (*attach_loop)(ca_child_watcher *w, ca_loop *loop);
    bool (*is_active)(ca_child_watcher *w);
    int (*close)(ca_child_watcher *w);
    int (*enter)(ca_child_watcher *w);
    int (*exit)(ca_child_watcher *w);
    void (*destroy)(ca_child_watcher *w);
} ca__wkind;

/* The add of every built-in: a->loop is filled in here from given (NULL: the implicit rule;
 * see ca__watcher_delivery_loop), the rest by the caller (lent -1 unless a loan). */
int ca__wcore_add(ca_child_watcher *w, ca_loop *given, ca__wadd *a);
/* w is a built-in watcher (a ca__wcore with a kind), and of kind k if k is not NULL. */
bool ca__child_watcher_is_builtin(const ca_child_watcher *w, const ca__wkind *k);
/* If registered r's child has exited, or is not our child any more (reaped by other code),
 * reaps it and posts its exit (ca__wreg_exited): for kinds that may be added after the exit
 * (the SIGCHLD came before). Returns what ca__wait_nohang said. Lock held. */
int ca__wreg_check_exited(ca__wcore *c, ca__wreg *r, ca__wlog *q);

void ca__wlog_add(ca__wlog *q, int level, const char *fmt, ...) CA_PRINTF(3, 4);
/* Queues op for r (lock held): takes a reference to r and, if loop is not NULL, one to loop
 * (ref_loop; a loop whose last reference is gone is treated as closed: op_loop NULL). */
void ca__wlog_op(ca__wlog *q, ca__wcore *c, ca__wreg *r, int op, ca_loop *loop, bool ref_loop);
/* Logs the lines, then performs the queued ops in order (taking the core's lock for their
 * outcome: call it without the lock, while holding a reference to the core, or to something
 * that holds one). */
void ca__wlog_flush(ca__wlog *q);
/* Posts again the exits whose post failed for memory. true when some are still waiting. Lock
 * NOT held. */
bool ca__wcore_retry(ca__wcore *c);
/* Empties the retry list (close: its registrations were unregistered). Lock held. */
void ca__wcore_retry_clear(ca__wcore *c);
/* Pidfd's ops, performed by ca__wlog_flush (watcher_pidfd.c). */
void ca__pidfd_op(ca__wcore *c, ca__wreg *r, int op, ca_loop *loop);

/* ----- the public object ------------------------------------------------------------------ */
/* Makes a built-in watcher of kind k around core c (which it takes over on success). */
int ca__child_watcher_make(const ca__wkind *k, ca__wcore *c, ca_child_watcher **out);
static inline ca__wcore *ca__wcore_of(ca_child_watcher *w) { return (ca__wcore *)w->impl; }
/* In the destroy op: true when we are in a child made by fork() since the watcher was made. */
bool ca__child_watcher_forked(const ca_child_watcher *w);

/* The destroy op of the built-ins that keep nothing but their core: frees it (forked: without
 * touching the parent's threads, loops or dispositions). */
void ca__wcore_destroy_op(ca_child_watcher *w);

/* ----- core -------------------------------------------------------------------------------- */
int ca__wcore_new(ca__wcore **out);
void ca__wcore_ref(ca__wcore *c);
void ca__wcore_unref(ca__wcore *c);
/* Frees everything without locking or touching threads, loops or signal dispositions: for a
 * forked child, where the parent's threads do not exist. */
void ca__wcore_free_forked(ca__wcore *c);
static inline void ca__wcore_lock(ca__wcore *c) { pthread_mutex_lock(&c->lock); }
/* Unlocks, then calls the drops queued while the lock was held (internal registrations only). */
void ca__wcore_unlock_dropped(ca__wcore *c);
static inline void ca__wcore_unlock(ca__wcore *c)
{
    if (CA_UNLIKELY(c->dropped != NULL || c->replaced_cb != NULL)) ca__wcore_unlock_dropped(c);
    else pthread_mutex_unlock(&c->lock);
}

ca__wreg *ca__wtable_get(ca__wcore *c, pid_t pid);
/* As ca__wtable_get, but first drops a registration whose delivery can never happen any more
 * (its loop closed with the exit posted, or Pidfd's loop closed): kept until then so that
 * remove answers 1 for it, replaced by a new handler for the pid. For add. Lock held. */
ca__wreg *ca__wtable_get_live(ca__wcore *c, pid_t pid);

/* A new registration (refs 1: the table's), put in the table and the waiting list, bound to b
 * (may be NULL). -ENOMEM. Lock held. */
int ca__wreg_register(ca__wcore *c, pid_t pid, ca_child_fn cb, void *arg, ca__wbind *b,
                      ca__wreg **out);
/* Takes r out of the table and the waiting list: its callback will not be called (an internal
 * registration's drop call is queued). Lock held. */
void ca__wreg_unregister(ca__wcore *c, ca__wreg *r);
/* As ca__wreg_unregister, without a drop call: for a registration whose add fails. Lock held. */
void ca__wreg_unregister_quiet(ca__wcore *c, ca__wreg *r);
/* An add for registered r's pid: its callback becomes cb(arg) (an internal registration that is
 * replaced hears of it as a drop); internal: the new one is. Lock held. */
void ca__wreg_replace(ca__wcore *c, ca__wreg *r, ca_child_fn cb, void *arg, bool internal);
/* Takes r out of the waiting list only. Lock held. */
void ca__wreg_unwait(ca__wcore *c, ca__wreg *r);
/* Moves r to binding b (or NULL). Lock held. */
void ca__wreg_rebind(ca__wcore *c, ca__wreg *r, ca__wbind *b);
void ca__wreg_ref(ca__wreg *r);
void ca__wreg_unref(ca__wcore *c, ca__wreg *r);   /* lock held */
/* Cancels every registration (close). Lock held. */
void ca__wcore_cancel_all(ca__wcore *c);

/* r's child was reaped with returncode rc (echild: waitpid said ECHILD, rc is 255): if r is
 * still registered, post its delivery to r->bind's loop (or, if that loop is closed, log and
 * drop). The callback runs on that loop's thread, unless it was removed in between. Lock held;
 * log lines go to q. */
void ca__wreg_exited(ca__wcore *c, ca__wreg *r, int rc, bool echild, ca__wlog *q);
/* Delivers r's exit now, in this thread: if registered, unregisters it and returns true with
 * the callback in *cb and *arg (call it after unlocking). Lock held. */
bool ca__wreg_take(ca__wcore *c, ca__wreg *r, ca_child_fn *cb, void **arg);

/* Takes registered r (its child reaped with returncode rc) for delivery in this thread: r is
 * unregistered and pushed on *list with a reference. Lock held. */
void ca__wreg_take_into(ca__wcore *c, ca__wreg *r, int rc, ca__wreg **list);
/* Calls the callbacks of a list made by ca__wreg_take_into, in order, then releases it. Lock
 * NOT held. */
void ca__wdeliver_list(ca__wcore *c, ca__wreg *list);

/* The binding for loop (made, with its close hook, if needed). The calling thread must be
 * allowed to use the loop (-EPERM otherwise); -ENOENT closed loop; -ENOMEM. Lock held. */
int ca__wbind_get(ca__wcore *c, ca_loop *loop, ca__wbind **out);
void ca__wbind_unref(ca__wbind *b);   /* lock held */
/* Releases a hold taken with b->refs++, and drops b if only its hook is left and we are on its
 * loop's thread. Lock held. */
void ca__wbind_put(ca__wbind *b);

/* ----- shared helpers ----------------------------------------------------------------------- */
/* The delivery loop of an add, with a reference: loop itself if not NULL (-ENOENT if it is
 * closed, its host's is_closed op included), else the loop running in this thread, else this
 * thread's current loop (-ENOENT none, or it is closed). Lock NOT held (it may call is_closed). */
int ca__watcher_delivery_loop(ca_loop *loop, ca_loop **out);
/* bpo-32115: a SIGCHLD disposition of SIG_IGN makes the kernel reap children itself, so no
 * watcher could learn their exit status. While at least one watcher is active we keep SIG_DFL
 * there (logging that we did) and put SIG_IGN back when the last one is closed. Counted,
 * process-wide. */
void ca__sigchld_keep_acquire(void);
void ca__sigchld_keep_release(void);
/* SIGCHLD routing (signal.c): whether the library's handler is SIGCHLD's disposition now, and
 * how many times ca_sigchld_notify was called (a host that routes SIGCHLD itself). */
bool ca__sigchld_handler_installed(void);
unsigned long ca__sigchld_notified(void);
/* Logs (once per process, through q) that SIGCHLD was taken away from the library while a watcher
 * needs it, and that exits are now found by polling. Lock held. */
void ca__sigchld_warn_taken(ca__wlog *q, const char *kind);
/* waitpid(pid, WNOHANG) without EINTR: pid's rc in *rc and 1 if it was reaped, 0 if it is still
 * running, -ECHILD if it is not our child (or already reaped). */
int ca__wait_nohang(pid_t pid, int *rc);

/* The O(n) pollers' shortcut (Safe, MultiLoop), one pass per wake: ca__wreap_begin, then
 * ca__wreap_next until it answers <= 0.
 *
 * First the candidates are checked by pid (waitpid(pid, WNOHANG): the kernel finds a pid without
 * walking the list of children): every waiting registration when there are no more than
 * CA__WCAND_ALL, and then that is all (no look: it could meet a child whose handler is on its
 * way, and have to look again later, which costs a timer on the loop); else the waiting
 * registrations among the SIGCHLD hints
 * that arrived since the last pass (ca__sigchld_hints: the library's handler saw their exit),
 * or, when none is ours, the newest CA__WCAND_RECENT waiting registrations (a host's SIGCHLD,
 * such as asyncio's add_signal_handler, carries no pid). Otherwise comes the look: waitid(P_ALL, WEXITED | WNOHANG | WNOWAIT) shows the first
 * exited child without reaping it; if it is a waiting registration, it is reaped by pid. One
 * look that finds nothing ends every pass that looks: SIGCHLDs coalesce, an exit may have come
 * without a hint. The look walks every child of the process in the kernel (the idle ones are
 * the oldest: first), which is what the candidates save: one walk per wake instead of two.
 *
 * ca__wreap_next returns 1 with the exited registration in *r and its returncode in *rc
 * (*echild: somebody else reaped it in between, rc 255; not logged here), 0 when no child of
 * ours has exited, -1 when the caller must poll every registration now: waitid failed (ECHILD:
 * no child at all), or the first exited child is not ours (we cannot look past it without
 * reaping it) and has been there for CA__WHIDE_NS already (c->hider); -2 when that child was
 * first seen less than CA__WHIDE_NS ago: it is most likely a child whose handler is being added
 * (an add reaps it), so the caller looks again at *relook_ns (CLOCK_MONOTONIC) instead of
 * polling now; -3 (only when the caller set pass.defer before the first call) instead of the
 * look of a pass whose candidates were hints: the caller looks within CA__WLOOK_DEFER_NS, with
 * a pass of its own (defer not set). It never reaps a child that is not a waiting registration; but only a poll of
 * every registration learns that other code reaped a watched child that is no candidate: the
 * callers run one at their slow check (once a second). Lock held. */
#define CA__WHIDE_NS 10000000LL
#define CA__WCAND_HINTS 16
#define CA__WCAND_RECENT 8
#define CA__WCAND_ALL 16
/* How long a look may wait after a pass whose exits were all found by their hints (MultiLoop's
 * thread: ca__wreap_pass.defer). That look only finds what a coalesced SIGCHLD brought no hint
 * for; deferring it lets one look serve the exits of that long, instead of one per exit (each
 * a walk of every child of the process, in the kernel, under its task-list lock). */
#define CA__WLOOK_DEFER_NS 2000000LL
/* ... and up to this, doubling from CA__WLOOK_DEFER_NS while the deferred looks find nothing
 * (no SIGCHLD coalesced): back to CA__WLOOK_DEFER_NS once one finds an exit. */
#define CA__WLOOK_DEFER_MAX_NS 32000000LL
typedef struct ca__wreap_pass {
    pid_t cand[CA__WCAND_HINTS];  /* distinct waiting registrations when the pass began */
    int n, i;                     /* how many; the next to check */
    int looked;                   /* exits the look found (their SIGCHLD brought no hint) */
    bool walk;                    /* some waiting registration is no candidate: look */
    bool hinted;                  /* the wake brought hints (the candidates are those of ours) */
    bool defer;                   /* set by the caller: a hinted pass returns -3, not look */
} ca__wreap_pass;
void ca__wreap_begin(ca__wcore *c, ca__wreap_pass *p);
int ca__wreap_next(ca__wcore *c, ca__wreap_pass *p, ca__wreg **r, int *rc, bool *echild,
                   long long *relook_ns);
/* The looks (waitid(P_ALL) walks) that ca__wreap_next made (process-wide): for tests
 * (ca__watcher_looks). */
extern atomic_ulong ca__wlook_count;
unsigned long ca__watcher_looks(void);
/* The polls of every registration made by Safe, MultiLoop and Fast (process-wide): for tests
 * (ca__watcher_full_polls). */
extern atomic_ulong ca__wpoll_count;
unsigned long ca__watcher_full_polls(void);
/* Uring (watcher_uring.c), for tests: the requests started so far (process-wide) on the fixed
 * pidfd path (POLL_ADD) and on the WAITID one; and the size of the fixed-file table that rings
 * made from now on ask for (n < 0: the default, min(RLIMIT_NOFILE, 4096); 0: none). */
void ca__uring_watcher_stats(unsigned long *polls, unsigned long *waitids);
void ca__uring_set_table_size(long n);

/* ----- Safe and Fast: SIGCHLD through the attached loop (watcher_safe.c) ------------------ */
typedef struct ca__wattach {
    ca_loop *loop;               /* a reference; NULL when detached */
    ca__wbind *bind;             /* a reference to the loop's binding */
    /* The kind's reaping after a SIGCHLD, on the attached loop's thread, lock held: exits go
     * to *list (ca__wreg_take_into), log lines to q. full: every registered child must be
     * checked (after an attach, and at the slow check, once a second). *relook (Safe): when
     * to look again (CLOCK_MONOTONIC ns; ca__wreap_next's -2), -1 none: the caller arms a
     * timer for it (REAP_RESCAN, not full). */
    void (*reap)(ca__wcore *c, bool full, ca__wreg **list, ca__wlog *q, long long *relook);
    bool attaching;              /* an attach is calling loop ops (lock not held) */
    uint64_t attacher;           /* the thread that made the attachment (watcher_safe.c) */
    int forks;                   /* Fast: enter/exit depth */
    unsigned zombies;            /* Fast: zombie registrations made (at least as many as exist) */
} ca__wattach;
/* c->impl is a ca__wattach. attach_loop for both; loop NULL detaches. implicit: the default
 * policy's attach (ca__child_watcher_attach_implicit), which also gives -EPERM when another
 * thread made the current attachment to a loop that is not closed. */
int ca__wattach_attach(ca__wcore *c, ca_loop *loop, bool implicit);
/* Attached to a loop that is not closed. Lock held. */
bool ca__wattach_active(ca__wcore *c);
/* The begin of an add for both (ca__wkind.begin; given: the loop asked for, NULL for the
 * attached one): the lock is taken and held on success; *attached gets a reference to the
 * attached loop (or NULL) in any case, for the caller to drop after its unlock; *bind the
 * attached loop's binding. -EINVAL given is not the attached loop; -EBADF closed; -ENOTCONN
 * not active (its host's is_closed included). */
int ca__wattach_add_begin(ca__wcore *c, ca_loop *given, ca_loop **attached, ca__wbind **bind);
/* The kind ops Safe and Fast share: attach_loop, is_active, close (cancels everything,
 * detaches). */
int ca__wattach_attach_op(ca_child_watcher *w, ca_loop *loop);
bool ca__wattach_is_active_op(ca_child_watcher *w);
int ca__wattach_close_op(ca_child_watcher *w);
/* Makes a Safe or Fast watcher of kind k: a core whose impl is a ca__wattach with this reap. */
int ca__wattach_watcher_new(const ca__wkind *k,
                            void (*reap)(ca__wcore *c, bool full, ca__wreg **list, ca__wlog *q,
                                         long long *relook),
                            ca_child_watcher **out);

#endif
