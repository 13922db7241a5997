/*
 * Internal interfaces shared by the library's files. Nothing here is public: the names are
 * ca__ (two underscores) and the symbols are hidden from the shared library.
 */
#ifndef CA_INTERNAL_H
#define CA_INTERNAL_H

/* Public declarations get default visibility (the library is built with -fvisibility=hidden),
 * and a definition takes the visibility of its earlier declaration: so every src file includes
 * this header first, and only public names are exported from libcasyncio.so. */
#if defined(__GNUC__) || defined(__clang__)
#pragma GCC visibility push(default)
#endif
#include "casyncio.h"
#if defined(__GNUC__) || defined(__clang__)
#pragma GCC visibility pop
#endif

#include <errno.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <sys/wait.h>

/* waitid's P_PIDFD (Linux 5.4), for C libraries whose headers lack it. */
#ifndef P_PIDFD
#define P_PIDFD 3
#endif

#if defined(__GNUC__) || defined(__clang__)
#define CA_EXPORT __attribute__((visibility("default")))
#define CA_PRINTF(a, b) __attribute__((format(printf, a, b)))
#define CA_LIKELY(x) __builtin_expect(!!(x), 1)
#define CA_UNLIKELY(x) __builtin_expect(!!(x), 0)
#define CA_PREFETCH(p) __builtin_prefetch(p)
#if defined(__x86_64__) || defined(__i386__)
#define CA_CPU_RELAX() __builtin_ia32_pause()
#else
#define CA_CPU_RELAX() ((void)0)
#endif
#else
#define CA_EXPORT
#define CA_PRINTF(a, b)
#define CA_LIKELY(x) (x)
#define CA_UNLIKELY(x) (x)
#define CA_PREFETCH(p) ((void)(p))
#define CA_CPU_RELAX() ((void)0)
#endif

/* ----- tables indexed by fd (loop.c) ------------------------------------------------- */

/* A table of *len entries of elem bytes, grown (doubled, 64 at first, new entries zeroed) so
 * that it holds index fd. Returns the table (tab itself when it is big enough) and updates
 * *len; NULL when out of memory (tab and *len unchanged). Call it only for fd >= *len. */
void *ca__fdtab_grow(void *tab, int *len, int fd, size_t elem);

/* ----- logging (log.c) ------------------------------------------------------------- */
/* Formats a message and hands it to the handler of ca_set_log_handler (never from a signal
 * handler). */
void ca__log(int level, const char *fmt, ...) CA_PRINTF(2, 3);

/* ----- fork detection (loop.c) -------------------------------------------------------- */
/* A counter bumped in the child after every fork(); an object stores the value it was made
 * with and answers -ECHILD when the current value differs. One relaxed load: cheap enough
 * for every call. ca__fork_init() registers the pthread_atfork handler (idempotent). */
/* initial-exec TLS: the library is never dlopen'ed late enough to need the general model,
 * and it spares every access a __tls_get_addr in the shared library. */
#if defined(__GNUC__) || defined(__clang__)
#define CA_TLS_IE __attribute__((tls_model("initial-exec")))
#else
#define CA_TLS_IE
#endif

extern atomic_uint ca__fork_generation;
void ca__fork_init(void);
static inline unsigned ca__fork_gen(void)
{
    return atomic_load_explicit(&ca__fork_generation, memory_order_relaxed);
}

/* ----- loop internals used by other units ------------------------------------------------ */
/* Close hooks: fn(arg) runs once when the loop is closed (before its kernel objects are
 * released, in the closing thread), or never if removed first. Hooks run newest first
 * (process.c relies on it: its hook, added after the watcher's, takes posted exits back before
 * the watcher's hook drops them). process.c uses them to end a loop's processes. Works on every
 * loop kind, custom included. Not run in a child of fork(). Loop's thread. Returns a token for
 * removal, or NULL on ENOMEM. */
void *ca__loop_add_close_hook(ca_loop *loop, void (*fn)(void *arg), void *arg);
void ca__loop_remove_close_hook(ca_loop *loop, void *token);
/* Schedules fn(arg) on loop from any thread (call_soon in the loop's own thread, else
 * call_soon_threadsafe). If the callback never runs (the loop closes first), drop(arg) is
 * called instead, once, so whatever arg owns (references, memory) is released. On error
 * neither is called. */
int ca__loop_schedule(ca_loop *loop, ca_callback_fn fn, void *arg, ca_callback_fn drop);
/* A post that needs no memory: the poster's node, linked into the loop's list (issue 16, item
 * 4: a delivery must not fail for memory). Built-in loops only (-ENOTSUP otherwise); -EBADF
 * once the loop's queue closed (the node is left alone then). Any thread. fn(arg) runs on the
 * loop's thread as if call_soon'ed when the loop next drains its queue; if the loop closes
 * first, the drop function the loop knows for fn (the futures') is called. The node is not
 * touched by its poster until then; with `owned` the loop frees it (free()) once done. */
struct ca__post {
    ca_callback_fn fn;
    void *arg;
    struct ca__post *next;
    bool owned;
};
int ca__loop_post_node(ca_loop *loop, struct ca__post *node);
/* As ca__loop_schedule, with a reservation for deliveries that must not fail for memory (issue
 * 16, item 4). spare: NULL, or memory from ca__handle_reserve that is used (and *spare set to
 * NULL: the loop frees it) when a custom loop's handle cannot be allocated or a built-in
 * loop's queue cannot grow (then as an owned ca__post node; drop must be NULL or known to the
 * loop); otherwise it stays the caller's. any_thread: the caller may be another thread than the loop's even while
 * the loop is not running (a watcher's thread): call_soon only when the loop runs in this
 * thread, else call_soon_threadsafe. */
int ca__loop_schedule_ex(ca_loop *loop, ca_callback_fn fn, void *arg, ca_callback_fn drop,
                         ca_handle **spare, bool any_thread);
/* A reservation for ca__loop_schedule_ex's spare (uninitialised memory that serves as a custom
 * loop's handle or as a built-in loop's owned ca__post node), or NULL (ENOMEM); one not used
 * is freed with ca__handle_unreserve (NULL is accepted). Any thread. */
ca_handle *ca__handle_reserve(void);
void ca__handle_unreserve(ca_handle *h);
/* Whether the calling thread may use loop's thread-bound functions now. */
bool ca__loop_in_own_thread(const ca_loop *loop);
/* Stricter than ca__loop_in_own_thread, for changes to the loop's fd table made from outside its
 * callbacks: true when this thread runs the loop, or when the loop is not running and this
 * thread ran it last (or no C thread ever ran it: a host loop, whose ops the host makes
 * thread-safe). A loop that runs in bursts in another thread may start again at any moment:
 * such changes are then posted to it. */
bool ca__loop_home_thread(const ca_loop *loop);

/* ----- signals (signal.c) ------------------------------------------------------------------ */
/* The process-wide fan-out. A "slot" is an eventfd plus a mask of wanted and of pending
 * signals; the one sigaction per signal sets the pending bit in every slot that wants it
 * and writes to the slot's eventfd. Loops take a slot when they add their first signal
 * handler; MultiLoop's reaping thread takes one for SIGCHLD. */
typedef struct ca__sigslot ca__sigslot;
/* Takes a slot that writes to efd (the caller's, kept open while the slot exists). */
int ca__sigslot_new(int efd, ca__sigslot **out);
/* Adds/removes sig from the slot's wanted set; the first wanter of a signal in the process
 * installs the handler (saving the old disposition), the last one restores it. */
int ca__sigslot_watch(ca__sigslot *slot, int sig);
void ca__sigslot_unwatch(ca__sigslot *slot, int sig);
/* Takes and clears the pending mask: bit (sig - 1) for each signal that arrived. */
uint64_t ca__sigslot_take(ca__sigslot *slot);
/* Whether a signal arrived since the last take (a load, no exchange). */
bool ca__sigslot_pending(ca__sigslot *slot);
/* Marks sig pending again and wakes the loop (it could not be delivered: out of memory). */
void ca__sigslot_repend(ca__sigslot *slot, int sig);
/* Unwatches everything and frees the slot; waits until no handler can still be using its
 * fd, so the caller may close the fd afterwards. forked: we are in a child, do not touch
 * dispositions. */
void ca__sigslot_free(ca__sigslot *slot, bool forked);
bool ca__signal_valid(int sig);
/* SIGCHLD hints: the pids of exited children that the library's handler saw (si_pid), numbered
 * in the order of the signals. A consumer keeps the number of the next hint it wants (start
 * with ca__sigchld_hint_seq()); ca__sigchld_hints copies the newest ones since *seq (at most
 * max, only those still in the ring) into pids, sets *seq past them and returns how many.
 * Reading takes nothing away from other consumers. Any thread; no lock. */
uint64_t ca__sigchld_hint_seq(void);
int ca__sigchld_hints(uint64_t *seq, pid_t *pids, int max);

/* ----- child watchers (watcher.c) ---------------------------------------------------------- */
/* asyncio's waitstatus_to_exitcode: exit status, -signal when killed. */
int ca__returncode_from_status(int status);
/* The library's own registrations (process.c) with a built-in watcher: cb(pid, rc, arg) is
 * called exactly once, with the exit as for any handler, or when the watcher drops the
 * registration without delivering it: with the returncode if the child was reaped first, else
 * CA__RC_DROPPED (the watcher was closed, the exit could not be posted to its loop, a user
 * removed the pid: nobody watches the child any more) or CA__RC_REPLACED (a user added a handler
 * for the pid: the child is theirs to watch now). That call may come in any thread, inside a
 * call into the watcher (close, remove), never with a watcher's lock held. A custom watcher cannot tell: -ENOTSUP, use
 * ca_child_watcher_add_child_handler (whose callbacks are never called for a drop). */
#define CA__RC_DROPPED (INT32_MIN + 1)
#define CA__RC_REPLACED (INT32_MIN + 2)
int ca__child_watcher_add_internal(ca_child_watcher *w, pid_t pid, ca_child_fn cb, void *arg);
/* As ca__child_watcher_add_internal, with the delivery loop given (NULL: the implicit rule), as
 * ca_child_watcher_add_child_handler_on: for the subprocess code, whose loop need not be marked
 * running for the watcher to pick it. Safe and Fast ignore loop (their attached loop delivers,
 * as before). */
int ca__child_watcher_add_internal_on(ca_child_watcher *w, ca_loop *loop, pid_t pid,
                                      ca_child_fn cb, void *arg);
/* The default policy's attach in ca_set_event_loop (and when it installs a watcher): as
 * ca_child_watcher_attach_loop, but Safe and Fast also refuse with -EPERM, touching nothing, when
 * another thread made their current attachment and that loop is not closed (the loop is that
 * thread's: it may start running it at any moment). The caller then leaves the watcher where it
 * is. Any thread. */
int ca__child_watcher_attach_implicit(ca_child_watcher *w, ca_loop *loop);
/* Takes back the registration that cb(arg) has for pid, if it is still there: 1, and neither
 * the callback nor a drop call will come; 0 when it is not there (the callback or the drop call
 * is on its way, or came). Also works on a closed watcher (the close may still be cancelling in
 * another thread). Custom watchers: their remove. -EINVAL, -ECHILD (forked). */
int ca__child_watcher_take_back(ca_child_watcher *w, pid_t pid, ca_child_fn cb, void *arg);
/* Lends the Pidfd watcher a subprocess's pidfd (made at spawn with CLONE_PIDFD) to watch pid
 * with, instead of a copy: one fd per child. The caller keeps pidfd (for signals and the final
 * reap) and must give it up, once, through ca__pidfd_watcher_give_back(*lease, pidfd), never
 * with close(): the watcher's reader may still be registered on it, on a delivery loop in
 * another thread, and closing the fd under it would let a new file take its number. *lease is
 * NULL when the watcher did not take the fd (it kept an earlier registration for pid, with an
 * fd of its own): close it as usual then. On an error nothing is borrowed. -ENOTSUP if w is not
 * a Pidfd watcher (the caller then uses ca__child_watcher_add_internal). The registration is an
 * internal one (see ca__child_watcher_add_internal). */
struct ca__wreg;
int ca__pidfd_watcher_lend(ca_child_watcher *w, pid_t pid, int pidfd, ca_child_fn cb, void *arg,
                           struct ca__wreg **lease);
/* As ca__pidfd_watcher_lend, delivering to loop (NULL: the implicit rule). */
int ca__pidfd_watcher_lend_on(ca_child_watcher *w, ca_loop *loop, pid_t pid, int pidfd,
                              ca_child_fn cb, void *arg, struct ca__wreg **lease);
/* Ends a loan: closes pidfd now if the watcher's reader is off it, else leaves the close to the
 * watcher, which does it right after removing the reader. Any thread. */
void ca__pidfd_watcher_give_back(struct ca__wreg *lease, int pidfd);
/* The watcher's kind name: "threaded", "multiloop", "safe", "fast", "pidfd", "custom". */
const char *ca__child_watcher_kind(const ca_child_watcher *w);

/* ----- policy (policy.c) ---------------------------------------------------------------------- */
/* Get-and-ref lookups for the library's own use, where the public getters' borrowed pointers
 * would be a use-after-free: another thread may replace the watcher (ca_set_child_watcher) or
 * the policy (ca_set_event_loop_policy) and drop the last reference between the lookup and the
 * caller's ref. Here the lookup and the reference are one step: the process policy is held
 * (referenced) across its op, and the built-in policies take the reference under the lock their
 * set_* ops replace under. A custom policy's op returns a borrowed pointer, referenced as soon
 * as the op returns (its own replacement is its business: see ca_policy_ops in the header).
 * Any thread; the caller owns the reference (ca_loop_unref / ca_child_watcher_unref).
 *
 * ca__get_event_loop_ref: the loop running in this thread, else the policy's current loop for
 * this thread, as ca_get_event_loop (the default policy makes one in the main thread). Errors
 * of ca_get_event_loop: -ENOENT (no current loop), -ENOTSUP, -ENOMEM, a custom op's error.
 * ca__get_child_watcher_ref: the policy's watcher, as ca_get_child_watcher (made on first use;
 * in a forked child, a new one: see the policies' fork rule). Errors of ca_get_child_watcher. */
int ca__get_event_loop_ref(ca_loop **out);
int ca__get_child_watcher_ref(ca_child_watcher **out);

/* ----- policy (policy.c), for the runner (runner.c) ------------------------------------------ */
/* A reference to the process policy, safe against a concurrent replacement. Never NULL. */
ca_policy *ca__policy_acquire(void);
/* The loop current in this thread under policy, with a reference, or NULL. Unlike
 * ca_policy_get_event_loop, never creates one (the default policy's main-thread rule). */
ca_loop *ca__policy_current_loop(ca_policy *policy);

#endif
