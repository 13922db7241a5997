/*
 * casyncio: Python asyncio's event-loop policy system and Unix child watchers, for C on Linux.
 *
 * One public header. Everything in it is documented below: what each function does, who owns
 * what, which thread may call it, and every error code it returns.
 *
 * Conventions (apply to every function unless its comment says otherwise)
 * -----------------------------------------------------------------------
 * - Errors: a function returning int returns 0 (or a documented non-negative value) on success
 *   and a negative errno value on failure. ca_strerror() describes any code.
 *     -EINVAL    a bad argument: NULL where not allowed, a negative fd or an fd that is not
 *                open, pid <= 0, an unknown or uncatchable signal, a NaN time.
 *     -ECHILD    the object was made by the parent of this process (we are in a child made by
 *                fork()); only close and unref work there, and they free memory without
 *                touching the parent's kernel objects.
 *     -EBADF     the loop (or watcher) is closed ("Event loop is closed"; a custom loop also
 *                when its is_closed op says so), except for remove_reader/remove_writer/
 *                remove_signal_handler, which return 0 there.
 *     -ENOENT    no current event loop in this thread.
 *     -ENOTCONN  the child watcher is not active.
 *     -ENOTSUP   a custom loop does not provide the operation, or a policy op is NULL with no
 *                base policy to fall through to.
 *     -EBUSY     the loop is running (run_forever, close), or another loop runs in this thread.
 *     -EPERM     a loop function that is for the loop's own thread was called from another
 *                thread while the loop runs there.
 *     -ENOMEM    out of memory.
 *   ca_strerror_for(function, err) gives a message that fits the call that returned err.
 *   When several apply, the order is: bad argument, then fork, then closed.
 * - Ownership: objects are reference counted. ca_X_ref() returns its argument; ca_X_unref()
 *   accepts NULL and returns NULL, so `p = ca_loop_unref(p);` is the idiom. A _new function
 *   hands the caller one reference. An out parameter is last and is never written on failure.
 *   Every `ca_handle **out` may be NULL. Setters take their own reference; getters documented
 *   as "borrowed" do not give one.
 * - Times are double seconds on the loop's monotonic clock.
 * - Threads: everything under "Policy", "Child watchers", ca_loop_call_soon_threadsafe(),
 *   ca_loop_stop(), ca_set_log_handler() and the ref/unref functions is safe from any thread.
 *   Other loop, handle, future and process functions are for the loop's own thread (the thread
 *   running it), or for any single thread while the loop is not running; most of them check it
 *   and give -EPERM (see Futures for theirs).
 * - If a function that takes a callback returns an error, the callback is never called.
 */
#ifndef CASYNCIO_H
#define CASYNCIO_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>
#include <sys/socket.h>

#ifdef __cplusplus
extern "C" {
#endif

#define CA_VERSION_MAJOR 0
#define CA_VERSION_MINOR 1
#define CA_VERSION_PATCH 0
#define CA_VERSION_STRING "0.1.0"

/* The library's version, "MAJOR.MINOR.PATCH". Any thread. */
const char *ca_version(void);

typedef struct ca_loop ca_loop;
typedef struct ca_handle ca_handle;
typedef struct ca_future ca_future;
typedef struct ca_policy ca_policy;
typedef struct ca_child_watcher ca_child_watcher;
typedef struct ca_process ca_process;

typedef void (*ca_callback_fn)(void *arg);

/* ---------------------------------------------------------------------------------------------
 * Errors and logging
 * ------------------------------------------------------------------------------------------- */

/* A static, thread-safe description of err (negative or positive errno; 0 is "Success"): the
 * code's general meaning, the same text whatever call returned it ("No such file or directory"
 * for ENOENT, "Device or resource busy" for EBUSY). Where the library gives a code a meaning
 * that is not the errno's, the text says so neutrally (ECHILD: an object of the parent process
 * used after fork(); ENOTCONN: a child watcher not active). Never NULL; unknown codes give
 * "Unknown error". Any thread. */
const char *ca_strerror(int err);
/* The same for a message that fits the call: what err means when `function` returned it, as
 * this header documents it. function is the public function's name, with or without its
 * "ca_" ("ca_loop_subprocess_exec", "loop_subprocess_exec"). For instance:
 *   ca_strerror_for("ca_get_event_loop", -ENOENT)       "no current event loop in this thread"
 *   ca_strerror_for("ca_loop_subprocess_exec", -ENOENT)
 *                     "program not found (or the working directory does not exist)"
 *   ca_strerror_for("ca_process_communicate", -EBUSY)
 *                     "communicate was already called for this process"
 *   ca_strerror_for("ca_loop_call_soon", -EPERM)
 *                     "called from another thread while the loop runs there"
 * A code the function gives with its general meaning, an unknown function name and NULL give
 * ca_strerror(err). Static text (lower case, no final period, to follow "function: "); never
 * NULL. Any thread. */
const char *ca_strerror_for(const char *function, int err);

enum { CA_LOG_DEBUG = 10, CA_LOG_INFO = 20, CA_LOG_WARNING = 30, CA_LOG_ERROR = 40 };

typedef void (*ca_log_fn)(int level, const char *msg, void *arg);

/* Sets the process-wide log handler that receives the library's warnings (the cases where
 * asyncio logs: a child's loop closed before its exit was delivered, an unknown pid reaped by
 * the Fast watcher, exit statuses dropped, a process killed when its loop closed...). The
 * default handler writes one line to stderr; fn == NULL silences the library. msg is valid
 * only during the call. The handler may be called from any thread, never from a signal
 * handler, and must not call ca_set_log_handler itself; a library thread that calls it has a
 * stack of the default size (pthread_create's), as do those that call a loop's ops. Any
 * thread. */
void ca_set_log_handler(ca_log_fn fn, void *arg);

/* ---------------------------------------------------------------------------------------------
 * Event loop (asyncio's AbstractEventLoop)
 * ------------------------------------------------------------------------------------------- */

/* Make a new loop; *out receives one reference. The loop belongs to no thread until it runs.
 *   ca_selector_loop_new: epoll(7), the default.  -EMFILE/-ENFILE/-ENOMEM from the kernel.
 *   ca_poll_loop_new:     poll(2), portable selector.
 *   ca_proactor_loop_new: io_uring (completion based). -ENOSYS where io_uring is missing or
 *                         disabled (or CASYNCIO_NO_IO_URING=1 is set in the environment),
 *                         -EPERM where seccomp or kernel.io_uring_disabled forbids it, -ENOMEM
 *                         when the ring cannot be set up. Fall back to ca_selector_loop_new.
 * Any thread. */
int ca_selector_loop_new(ca_loop **out);
int ca_poll_loop_new(ca_loop **out);
int ca_proactor_loop_new(ca_loop **out);

ca_loop *ca_loop_ref(ca_loop *loop);
/* Drops a reference. The last one closes the loop if it is not closed yet (an unclosed loop
 * should be closed with ca_loop_close first, as asyncio asks) and frees it. Any thread that
 * holds the reference, but the last unref of a running loop is a bug. */
ca_loop *ca_loop_unref(ca_loop *loop);

/* "epoll", "poll", "io_uring" or "custom". NULL gives NULL. */
const char *ca_loop_kind(const ca_loop *loop);

/* Runs until ca_loop_stop(). A stop requested before the call makes it run one iteration.
 * -EINVAL NULL; -ECHILD; -EBADF closed; -EBUSY this loop is already running (in any thread)
 * or another loop runs in this thread. Returns 0 after stopping, or a backend error.
 * Out of memory, a built-in loop keeps running and does not spin: when an iteration cannot
 * move a due timer, a callback submitted from another thread or an arrived signal's handler
 * onto its ready queue (which may need to grow), nothing is dropped, and the following iterations wait for I/O (serving it)
 * for 1 ms, then 2, 4... up to 128 ms before trying again, until one succeeds. (asyncio would
 * raise MemoryError out of run_forever; a C loop that other threads feed is better off
 * waiting for memory than stopping.) */
int ca_loop_run_forever(ca_loop *loop);

/* Runs until fut is done and returns the future's outcome: 0 if it has a result, its error if
 * it failed, -ECANCELED if cancelled. fut must belong to loop (-EINVAL otherwise). If the loop
 * is stopped before fut is done, returns -EAGAIN and leaves fut pending. Errors as
 * ca_loop_run_forever. The loop keeps its own reference to fut while it runs. */
int ca_loop_run_until_complete(ca_loop *loop, ca_future *fut);

/* Asks the loop to stop after the current iteration. Safe from any thread (it wakes the loop).
 * NULL, closed or forked loops are ignored. */
void ca_loop_stop(ca_loop *loop);

/* Closes the loop: pending callbacks and timers are dropped without running, readers,
 * writers and signal handlers are removed (restoring signal dispositions), subprocesses the
 * loop still has are ended (see Subprocesses), and the loop's kernel objects are released.
 * Idempotent (0 when already closed). -EINVAL NULL; -EBUSY while running. In a forked child
 * it frees the memory only and returns 0. */
int ca_loop_close(ca_loop *loop);

bool ca_loop_is_running(const ca_loop *loop);  /* false for NULL; any thread */
bool ca_loop_is_closed(const ca_loop *loop);   /* false for NULL; any thread */

/* The loop's clock: CLOCK_MONOTONIC in seconds (or a custom loop's time op), read at each call.
 * Returns NAN for NULL. */
double ca_loop_time(const ca_loop *loop);

/* Schedules fn(arg) to run once, on a later iteration, in FIFO order. A callback scheduled
 * from a callback runs on the next iteration. *out (if out is not NULL) receives a reference to
 * the handle, for ca_handle_cancel. -EINVAL NULL loop or fn; -ECHILD; -EBADF closed; -EPERM
 * wrong thread; -ENOMEM; -ENOTSUP custom loop without call_soon. Loop's thread. */
int ca_loop_call_soon(ca_loop *loop, ca_callback_fn fn, void *arg, ca_handle **out);

/* As call_soon, from any thread; wakes the loop (without a system call when the loop is
 * awake). One FIFO with call_soon, as in asyncio: a call_soon made after this call returned
 * (in any thread that knows it returned) runs after fn. Returns no handle. A custom loop
 * without the call_soon_threadsafe op uses the core's queue once its host asked for it
 * (ca_loop_threadsafe_fd), and gives -ENOTSUP before. -EINVAL, -ECHILD, -EBADF (closed, also
 * when the close races with this call: then fn is never called), -ENOTSUP, -ENOMEM. Any
 * thread. */
int ca_loop_call_soon_threadsafe(ca_loop *loop, ca_callback_fn fn, void *arg);

/* Schedules fn(arg) at ca_loop_time() + delay (delay < 0 counts as 0), or at the absolute
 * loop time `when`. Timers run by time, then FIFO among equal times. Errors as call_soon, plus
 * -EINVAL for a NaN delay/when. Loop's thread. */
int ca_loop_call_later(ca_loop *loop, double delay, ca_callback_fn fn, void *arg, ca_handle **out);
int ca_loop_call_at(ca_loop *loop, double when, ca_callback_fn fn, void *arg, ca_handle **out);

/* Handles. ca_handle_cancel is idempotent, harmless after the callback ran, and safe after the
 * loop closed; a cancelled callback never runs. ca_handle_cancelled is false for NULL.
 * Loop's thread. */
ca_handle *ca_handle_ref(ca_handle *h);
ca_handle *ca_handle_unref(ca_handle *h);
void ca_handle_cancel(ca_handle *h);
bool ca_handle_cancelled(const ca_handle *h);

/* Readers and writers: fn(arg) is called on every loop iteration while fd is readable
 * (writable): level-triggered on every loop kind. Adding replaces the previous callback for
 * that fd. remove_* returns 1 if a callback was removed, 0 if there was none (also on a
 * closed loop). The fd stays the caller's: close it only after removing its callbacks (an fd
 * closed behind the loop's back does not crash it; the poll loop logs and stops polling it).
 * A callback may remove itself or any other. -EINVAL NULL loop/fn, fd < 0 or not open;
 * -ECHILD; -EBADF closed; -EPERM wrong thread; -ENOMEM; -ENOTSUP custom loop without it;
 * other negative errno from the kernel (e.g. -EPERM for a regular file with epoll).
 * Loop's thread. */
int ca_loop_add_reader(ca_loop *loop, int fd, ca_callback_fn fn, void *arg);
int ca_loop_remove_reader(ca_loop *loop, int fd);
int ca_loop_add_writer(ca_loop *loop, int fd, ca_callback_fn fn, void *arg);
int ca_loop_remove_writer(ca_loop *loop, int fd);

/* Signal handlers: fn(arg) runs on the loop (never inside the signal handler) after sig
 * arrives; several deliveries before the loop wakes may be coalesced into one call. Signals are
 * multiplexed once per process: one sigaction per signal, whose handler only sets a flag and
 * writes to the interested loops' wakeup fds. Loops in any threads may watch the same signal.
 * Adding replaces the loop's previous callback for sig. Removing the last handler of a signal
 * in the process restores the disposition that was in place before the first one was added.
 * A disposition that other code installed over the library's handler since is left in place
 * (the saved one is put back only over the library's own handler). remove returns 1/0 (0 on a
 * closed loop). -EINVAL NULL, sig out of range, SIGKILL or SIGSTOP (they cannot be caught), or a
 * synchronous fault signal: SIGSEGV, SIGBUS, SIGFPE, SIGILL (a handler that only sets a flag
 * would return to the faulting instruction, which faults again, forever); -ECHILD; -EBADF;
 * -EPERM wrong thread; -ENOSPC more than 1024 loops watch signals at once. Loop's thread. */
int ca_loop_add_signal_handler(ca_loop *loop, int sig, ca_callback_fn fn, void *arg);
int ca_loop_remove_signal_handler(ca_loop *loop, int sig);

/* The loop running in the calling thread, or NULL (also in a child made by fork() while the
 * parent's loop was running). Borrowed. Any thread (answers for itself). */
ca_loop *ca_get_running_loop(void);

/* Custom loops: a foreign AbstractEventLoop implementation (an adapter to GLib, libuv, a
 * Python loop...). The public functions check arguments, the closed and fork states and do
 * the running-loop bookkeeping before calling an op, so ops do not repeat them. Scheduling
 * ops receive a handle made by the core (borrowed: an op that keeps it takes ca_handle_ref)
 * and run it with ca_handle_run when due. A NULL member means "not provided" (-ENOTSUP),
 * except stop and close (then only the core's part is done), time (CLOCK_MONOTONIC) and the
 * sock_* members, which the core implements with add_reader/add_writer. destroy is called
 * once, when the last reference goes, to free `data`.
 *
 * Locks and threads. The library never calls an op, a user callback or the log handler while
 * it holds a lock of its own, so an op may take a lock of the host's (Python's GIL) and hand it
 * to other threads that call into the library meanwhile. "Loop-thread rule" below: the loop's
 * own thread while it runs, or any thread while it is not running in C terms (see
 * ca_loop_enter_running). Which threads call each op:
 *   run_forever           the thread in ca_loop_run_forever / ca_loop_run_until_complete.
 *   stop                  any thread (ca_loop_stop).
 *   close                 the thread in ca_loop_close (or in the last ca_loop_unref).
 *   time                  any thread in ca_loop_time; the loop-thread rule for call_later.
 *   call_soon             the loop-thread rule (ca_loop_call_soon; process and future code),
 *                         and, in the thread where the loop is marked running
 *                         (ca_loop_enter_running), an exit a child watcher's add found at once.
 *   call_soon_threadsafe  any thread, at any time: users, and the library's own threads
 *                         (Threaded's posting thread, MultiLoop's reaping thread, a thread
 *                         that removes a Pidfd handler, closes a watcher or attaches Safe/Fast).
 *                         Threaded's one posting thread makes the posts of every Threaded exit
 *                         of the process in turn: an op that blocks delays the others.
 *   call_at               the loop-thread rule (call_at/call_later; Safe/Fast's timers, armed by
 *                         attach_loop's thread or the loop's own callbacks).
 *   add_reader, remove_reader, add_writer, remove_writer
 *                         the loop-thread rule: users, the sock_* code, Pidfd (add from the
 *                         thread of add_child_handler[_on], remove from the loop's callbacks or
 *                         from remove/close's thread), close hooks in the closing thread.
 *   add_signal_handler, remove_signal_handler
 *                         the loop-thread rule: users, Safe/Fast (attach_loop's and close's
 *                         thread).
 *   sock_*                the loop-thread rule.
 *   destroy               the thread that drops the last reference.
 *   is_closed             any thread (every public call that checks for a closed loop).
 * A host loop that is not running in C terms (its host runs it, as an asyncio adapter) can thus
 * get any op from any thread, and its ops must then be thread-safe (the GIL does it for Python).
 * No op is ever called from a signal handler. */
typedef struct ca_loop_ops {
    int (*run_forever)(ca_loop *self); /* required */
    void (*stop)(ca_loop *self);
    int (*close)(ca_loop *self);
    double (*time)(ca_loop *self);
    int (*call_soon)(ca_loop *self, ca_handle *h);
    int (*call_soon_threadsafe)(ca_loop *self, ca_handle *h);
    int (*call_at)(ca_loop *self, double when, ca_handle *h);
    int (*add_reader)(ca_loop *self, int fd, ca_callback_fn fn, void *arg);
    int (*remove_reader)(ca_loop *self, int fd);
    int (*add_writer)(ca_loop *self, int fd, ca_callback_fn fn, void *arg);
    int (*remove_writer)(ca_loop *self, int fd);
    int (*add_signal_handler)(ca_loop *self, int sig, ca_callback_fn fn, void *arg);
    int (*remove_signal_handler)(ca_loop *self, int sig);
    int (*sock_recv)(ca_loop *self, int fd, void *buf, size_t n, ca_future **out);
    int (*sock_sendall)(ca_loop *self, int fd, const void *buf, size_t n, ca_future **out);
    int (*sock_accept)(ca_loop *self, int fd, ca_future **out);
    int (*sock_connect)(ca_loop *self, int fd, const struct sockaddr *addr, socklen_t len,
                        ca_future **out);
    void (*destroy)(ca_loop *self);
    /* Optional (NULL: the loop is closed only by ca_loop_close). Whether the host closed its
     * loop behind the core's back (an asyncio loop closed by Python code, a GMainLoop
     * destroyed...). Once it says true it must keep saying so. The core consults it wherever
     * it checks for a closed loop: ca_loop_is_closed answers true, every function that refuses
     * a closed loop gives -EBADF (the remove_* functions return 0), ca_loop_call_soon_threadsafe
     * refuses (the callback is never called), and the watchers stop treating the loop as a
     * delivery loop (an exit for it is then handled as for a closed loop: logged, "Loop that
     * handles pid N is closed", and dropped; add_child_handler_on gives -EBADF for it; Safe
     * and Fast attached to it are not active). The core still
     * needs ca_loop_close to release its own side (close hooks, such as the subprocesses'
     * cleanup, and the thread-safe queue, whose callbacks are dropped then); the close op is
     * called then too, after is_closed said true. Called from any thread, possibly often (every
     * public call checks it), never with a library lock held and never in a child of fork();
     * it must not call back into the library for this loop. */
    bool (*is_closed)(ca_loop *self);
} ca_loop_ops;

/* Makes a custom loop. ops must outlive the loop; data is the op's own (see destroy).
 * -EINVAL NULL ops/out or NULL run_forever; -ENOMEM. Any thread. */
int ca_loop_new_custom(const ca_loop_ops *ops, void *data, ca_loop **out);
void *ca_loop_data(ca_loop *loop);        /* the custom loop's data; NULL for built-in loops */
void ca_handle_run(ca_handle *h);         /* runs the callback unless cancelled (then no-op) */

/* For a loop that foreign code runs: marks the loop as running in the calling thread (so
 * ca_get_running_loop() and ca_loop_is_running() see it) and back. -EINVAL NULL; -ECHILD;
 * -EBADF closed; -EBUSY already running, or another loop runs in this thread (enter);
 * -EINVAL exit from a thread where this loop is not the running one. */
int ca_loop_enter_running(ca_loop *loop);
int ca_loop_exit_running(ca_loop *loop);

/* The thread-safe queue the core keeps for a custom loop whose call_soon_threadsafe op is NULL,
 * so that an adapter need not write its own locked queue and wakeup fd.
 *
 * ca_loop_threadsafe_fd turns the queue on (the first call; later calls return the same fd)
 * and returns its fd: an eventfd (O_CLOEXEC | O_NONBLOCK) owned by the loop, readable while
 * callbacks are queued. The host watches it for reading (a reader of its own loop, a GSource,
 * a uv_poll_t...). From then on ca_loop_call_soon_threadsafe (and the library's own
 * deliveries from other threads, such as the child watchers') append to the queue under a
 * short lock and write to the fd when the queue was empty. Before the first call, a loop
 * without the op has no thread-safe scheduling: -ENOTSUP, as for any missing op. Any thread.
 * Returns the fd (>= 0), or -EINVAL NULL, a built-in loop, or a custom loop that has the op;
 * -ECHILD; -EBADF closed; -EMFILE/-ENFILE/-ENOMEM (eventfd).
 *
 * ca_loop_run_threadsafe takes everything queued so far (and resets the fd) and runs it on
 * the calling thread, in FIFO order: callbacks queued by one thread run in the order they were
 * queued, and a callback queued while this runs waits for the next call (the fd is readable
 * again). The host calls it when the fd is readable, on the loop's thread (the thread that
 * runs it, or, while it is not running, any single thread); ca_loop_enter_running is not
 * required. A callback may close the loop: what is left of the batch is then dropped.
 * Returns how many callbacks it took (>= 0). -EINVAL NULL, a built-in loop, or a custom loop
 * that has the op; -ECHILD; -EBADF closed; -EPERM another thread while the loop runs there.
 *
 * Closing: ca_loop_close closes the fd after the loop's close op has run (so the op can stop
 * watching it first) and drops the queued callbacks without running them (the library's own
 * ones release what they own), as the built-in loops do; later calls give -EBADF. In a child
 * made by fork() every call gives -ECHILD, and the loop's last unref there frees the queue and
 * closes the child's copy of the fd without running anything and without taking the lock (a
 * parent's thread may have held it at the fork). */
int ca_loop_threadsafe_fd(ca_loop *loop);
int ca_loop_run_threadsafe(ca_loop *loop);

/* Socket operations (asyncio's loop.sock_*). fd must be a non-blocking socket; it must stay
 * open, and the buffer valid, until the future is done (cancel it before closing the fd).
 * *out receives a new future (reference): the result is (void *)(intptr_t) of: bytes read
 * (0 at EOF) for recv; 0 when all was sent for sendall;
 * the new fd (O_CLOEXEC|O_NONBLOCK, the caller's) for accept; 0 when connected for connect.
 * The future fails with the operation's negative errno (-ECONNREFUSED, -EPIPE: sends never
 * raise SIGPIPE...). On the selector loops these are readiness + non-blocking calls; on the
 * proactor, io_uring operations (docs/proactor.md).
 * A recv returns what is there, up to n bytes (on the proactor at most 64 KiB per call), as
 * recv(2). Several recvs (or accepts) on one socket are served in the order they were made.
 * Cancelling the future cancels the operation; a cancelled recv never writes the buffer
 * afterwards (the caller may free it at once), though on the proactor data the kernel had
 * already received for it is lost. At most one sendall or connect per socket is in flight:
 * another one while it is pending gives -EBUSY, so data is never reordered (a cancelled one
 * stops counting when ca_future_cancel returns; on the proactor, once the kernel confirmed the
 * cancel, an iteration or so later). Closing the loop cancels
 * the futures of the operations still pending (their done callbacks no longer run).
 * -EINVAL NULL loop or out, negative or not-open fd, NULL buf with n > 0, NULL addr or a len
 * of 0 or more than sizeof(struct sockaddr_storage); -ECHILD; -EBADF closed; -EPERM wrong
 * thread; -EBUSY; -ENOMEM. Loop's thread. */
int ca_loop_sock_recv(ca_loop *loop, int fd, void *buf, size_t n, ca_future **out);
int ca_loop_sock_sendall(ca_loop *loop, int fd, const void *buf, size_t n, ca_future **out);
int ca_loop_sock_accept(ca_loop *loop, int fd, ca_future **out);
int ca_loop_sock_connect(ca_loop *loop, int fd, const struct sockaddr *addr, socklen_t len,
                         ca_future **out);

/* ---------------------------------------------------------------------------------------------
 * Futures (the small part of asyncio.Future that C needs)
 * ------------------------------------------------------------------------------------------- */

/* Threads. A future has no lock: its state and its callbacks belong to its loop's thread while
 * the loop runs, and to any single thread while it does not (the conventions' rule, enforced):
 * ca_future_set_result, ca_future_set_error and ca_future_add_done_callback give -EPERM, and
 * ca_future_cancel returns false without cancelling, when called from another thread while the
 * loop runs. To complete a future from another thread, schedule the completion on its loop
 * with ca_loop_call_soon_threadsafe. ca_future_new, ref and unref work from any thread
 * (unref: the last reference is dropped in whatever thread drops it). ca_future_done,
 * ca_future_cancelled, ca_future_result and ca_future_loop only read; from another thread
 * while the loop runs their answer may already be stale, so read them on the loop's thread
 * (a done callback, or after run_until_complete). */

/* A new pending future bound to loop; it holds a reference to the loop. -EINVAL; -ECHILD;
 * -EBADF closed; -ENOMEM. Any thread. */
int ca_future_new(ca_loop *loop, ca_future **out);
ca_future *ca_future_ref(ca_future *fut);
ca_future *ca_future_unref(ca_future *fut);
ca_loop *ca_future_loop(const ca_future *fut);   /* borrowed */

/* Completes the future. -EINVAL NULL or already done (set_error also for err >= 0); -EPERM
 * another thread while the loop runs (see Threads above). Done callbacks are scheduled with
 * call_soon, never run inside these calls. */
int ca_future_set_result(ca_future *fut, void *result);
int ca_future_set_error(ca_future *fut, int err);
/* Cancels a pending future (true) or does nothing (false: NULL, already done, or called from
 * another thread while the loop runs). */
bool ca_future_cancel(ca_future *fut);
bool ca_future_done(const ca_future *fut);
bool ca_future_cancelled(const ca_future *fut);
/* 0 and *result (if result is not NULL) for a result; the error for a failed future;
 * -EAGAIN not done; -ECANCELED cancelled; -EINVAL NULL fut. */
int ca_future_result(const ca_future *fut, void **result);
/* fn(fut, arg) runs through the loop once the future is done (at once, through the loop, if
 * it already is). -EINVAL NULL; -EBADF the future's loop is closed; -EPERM another thread while
 * the loop runs; -ENOMEM. */
int ca_future_add_done_callback(ca_future *fut, void (*fn)(ca_future *, void *), void *arg);

/* ---------------------------------------------------------------------------------------------
 * Policy (asyncio's AbstractEventLoopPolicy)
 *
 * A policy decides which loop is current in a "context", makes new loops and owns the child
 * watcher. One policy is the process's (ca_get_event_loop_policy); the module-level functions
 * (ca_get_event_loop, ...) call its ops. The built-in policies' context is the thread; a
 * custom policy may define it otherwise (one loop for the process, a loop per task...).
 *
 * Everything in this section is safe from any thread, also while another thread replaces the
 * process policy: a policy stays alive while a call on it is in progress.
 * ------------------------------------------------------------------------------------------- */

/* A policy's operations. An op stores its result in *out and returns 0, or returns a negative
 * errno and leaves *out alone. A NULL member is taken from the base policy (see ca_policy_new)
 * and called on the base, so the state it keeps lives in the base; with no base to fall to,
 * the call gives -ENOTSUP. When a built-in op reached that way needs another op (the default
 * policy's main-thread get_event_loop calls new_event_loop and set_event_loop), it calls it
 * on the derived policy, as Python's self.new_event_loop() would. Ops may be called from any
 * thread at once: a custom policy protects its own state. The pointers get_event_loop and
 * get_child_watcher return are borrowed; the library calls ops without holding any lock of its
 * own, keeps a reference to the policy across the call, and references the result as soon as
 * the op returns. A custom policy whose loop or watcher one thread may replace while another
 * calls the get op must therefore keep the replaced object alive a little longer than the
 * replacing call (for example until the policy is destroyed).
 *   get_event_loop     the context's loop, borrowed. -ENOENT for none (returning 0 with a
 *                      NULL loop counts as -ENOENT).
 *   set_event_loop     makes loop (NULL: none) the context's loop; keeps its own reference.
 *   new_event_loop     a new loop (a new reference); returning 0 with NULL gives -EINVAL.
 *   get_child_watcher  the policy's child watcher, borrowed (0 with NULL gives -ENOENT).
 *   set_child_watcher  replaces it (NULL: none); keeps its own reference.
 *   destroy            called once, when the last reference goes, to free data. Never taken
 *                      from the base: the base's own destroy runs when the base goes. */
typedef struct ca_policy_ops {
    int (*get_event_loop)(ca_policy *self, ca_loop **out); /* borrowed loop */
    int (*set_event_loop)(ca_policy *self, ca_loop *loop); /* loop may be NULL */
    int (*new_event_loop)(ca_policy *self, ca_loop **out); /* new reference */
    int (*get_child_watcher)(ca_policy *self, ca_child_watcher **out); /* borrowed */
    int (*set_child_watcher)(ca_policy *self, ca_child_watcher *w);
    void (*destroy)(ca_policy *self); /* may be NULL */
} ca_policy_ops;

/* The built-in policies; *out receives one reference. They differ only in the loops that
 * new_event_loop makes:
 *   ca_default_policy_new   DefaultEventLoopPolicy: selector loops (ca_selector_loop_new).
 *   ca_selector_policy_new  the same, named explicitly (WindowsSelectorEventLoopPolicy's role).
 *   ca_poll_policy_new      poll(2) loops (ca_poll_loop_new).
 *   ca_proactor_policy_new  io_uring loops (WindowsProactorEventLoopPolicy's role). It makes
 *                           and closes one loop to find out whether io_uring is usable, and
 *                           returns that error if not (-ENOSYS, -EPERM, -ENOMEM...).
 * -EINVAL NULL out; -ENOMEM.
 *
 * Their semantics are CPython 3.11's BaseDefaultEventLoopPolicy + _UnixDefaultEventLoopPolicy:
 * - The context is the thread. get_event_loop gives the thread's loop. In the main thread (the
 *   process's first thread; in a child made by fork(), the thread that forked), when no loop
 *   is set and set_event_loop was never called there, it makes one with new_event_loop, sets
 *   it with set_event_loop and returns it: once. In every other case no loop gives -ENOENT.
 *   Closing a loop does not unset it (as in asyncio).
 * - set_event_loop(loop) sets the thread's loop (taking a reference, dropping the previous
 *   one); set_event_loop(NULL) clears it, and the main thread then gets -ENOENT too. In the
 *   main thread it also attaches the policy's child watcher, if one exists, to loop
 *   (ca_child_watcher_attach_loop; NULL detaches) and returns that call's error, the loop being
 *   set all the same; except -EPERM, which it does not return. A Safe or Fast watcher stays
 *   where it is (attached to its loop, or to none), the loop being set and 0 returned, when a
 *   loop concerned is another thread's: the new loop, or the attached one, runs in another
 *   thread, or the attached loop (not closed) was attached by another thread (with
 *   ca_child_watcher_attach_loop there): that thread may start running it at any moment, so
 *   the main thread cannot take its SIGCHLD handler away safely. That thread (or a call of
 *   ca_child_watcher_attach_loop made where it is allowed) moves the watcher; it moves
 *   with set_event_loop again once that loop is closed. (asyncio attaches unconditionally: its
 *   Safe/Fast only work with the main thread's loop.) get_child_watcher's attach below follows
 *   the same rule.
 * - A loop set before fork() is never returned in the child: there the thread's context is
 *   as if nothing was ever set (Python 3.12's at-fork reset). The child only drops its
 *   reference, which frees memory without touching the parent's loop.
 * - A thread's reference to its loop is dropped when the thread exits and when the policy is
 *   destroyed. (The last reference to a loop closes it.)
 * - get_child_watcher makes a ThreadedChildWatcher on first use (one per policy, shared by
 *   all threads) and, called in the main thread, attaches it to the main thread's loop if one
 *   is set. The watcher is borrowed: valid until set_child_watcher replaces it or the policy
 *   is destroyed, which another thread may do at any time (take a reference at once where
 *   that can happen). Errors of ca_threaded_child_watcher_new (or of the kind's _new below).
 * - Fork: in a child made by fork(), a watcher made before the fork is the parent's (its
 *   threads, signal handler and loop stay there) and the policy treats it as gone: it drops its
 *   reference (freeing this process's copy of the memory, closing nothing of the parent's) and
 *   the next get_child_watcher makes a new watcher of the same kind (MultiLoop, Safe, Fast,
 *   Pidfd, Threaded; a custom watcher's replacement is a Threaded one; should the kind fail to
 *   be made there, Threaded), attached to the main thread's loop as above. set_event_loop in
 *   the child no longer fails with -ECHILD for it. So a forked child can get its loop, set it
 *   and spawn (ca_loop_subprocess_exec), as asyncio's can. A reference the program itself kept
 *   to the parent's watcher still answers -ECHILD there.
 * - set_child_watcher(w) takes a reference to w, closes the previous watcher (as 3.11 does;
 *   not when it is w itself) and drops it. It does not attach w to any loop: the next
 *   set_event_loop in the main thread does. A destroyed policy drops its watcher unclosed. */
int ca_default_policy_new(ca_policy **out);
int ca_selector_policy_new(ca_policy **out);
int ca_poll_policy_new(ca_policy **out);
int ca_proactor_policy_new(ca_policy **out);

/* Makes a custom policy ("subclassing"): ops as above, data for the ops (ca_policy_data), and
 * base, the policy whose ops fill the NULL members (NULL for none). The new policy holds a
 * reference to base; an override calls "super" with ca_policy_x(ca_policy_base(self), ...).
 * ops must outlive the policy. -EINVAL NULL ops or out; -ENOMEM. */
int ca_policy_new(const ca_policy_ops *ops, void *data, ca_policy *base, ca_policy **out);
/* The custom policy's data (NULL for built-in policies and for NULL). */
void *ca_policy_data(ca_policy *policy);
/* The base given to ca_policy_new, borrowed (NULL for none, for built-in policies and NULL). */
ca_policy *ca_policy_base(ca_policy *policy);
ca_policy *ca_policy_ref(ca_policy *policy);
ca_policy *ca_policy_unref(ca_policy *policy);

/* Call policy's op (or the nearest base's, see ca_policy_ops) and return its result. -EINVAL
 * NULL policy or out; -ENOTSUP no policy in the chain has the op; otherwise what the op
 * returns (the built-in ones: above). *out is never written on failure. */
int ca_policy_get_event_loop(ca_policy *policy, ca_loop **out);
int ca_policy_set_event_loop(ca_policy *policy, ca_loop *loop);
int ca_policy_new_event_loop(ca_policy *policy, ca_loop **out);
int ca_policy_get_child_watcher(ca_policy *policy, ca_child_watcher **out);
int ca_policy_set_child_watcher(ca_policy *policy, ca_child_watcher *watcher);

/* The process policy, borrowed: valid until the process policy is replaced. Never NULL: the
 * first call installs a default policy (made once, race-free, without allocating). */
ca_policy *ca_get_event_loop_policy(void);
/* Makes policy the process policy, taking a reference; NULL installs a new default policy
 * (with nothing set in any thread), as asyncio.set_event_loop_policy(None). The previous
 * policy's reference is dropped once no call that started on it is still in progress.
 * 0, or -ENOMEM (NULL only; the policy is then unchanged). */
int ca_set_event_loop_policy(ca_policy *policy);

/* asyncio.get_event_loop(): the loop running in this thread if there is one (the policy is not
 * asked then), otherwise the process policy's get_event_loop. Borrowed. -EINVAL NULL out;
 * otherwise the op's errors (the default policy: -ENOENT, or new_event_loop's errors when the
 * main thread makes its loop). When the policy's get_event_loop is a built-in one, a thread
 * whose loop is set gets it from a thread-local cache: no lock, a few nanoseconds. */
int ca_get_event_loop(ca_loop **out);
/* The process policy's set_event_loop, new_event_loop, get_child_watcher and
 * set_child_watcher. ca_new_event_loop and ca_get_child_watcher give -EINVAL for NULL out. */
int ca_set_event_loop(ca_loop *loop);
int ca_new_event_loop(ca_loop **out);
int ca_get_child_watcher(ca_child_watcher **out);
int ca_set_child_watcher(ca_child_watcher *watcher);

/* The runner: asyncio.run(main(), loop_factory=factory), the entry point asyncio recommends
 * over touching policies. ca_run:
 *   1. refuses with -EBUSY if a loop runs in this thread (without calling the factory);
 *   2. makes a loop with factory (NULL: the process policy's new_event_loop);
 *   3. makes it this thread's current loop through the process policy's set_event_loop (in the
 *      main thread that attaches the child watcher to it, as asyncio.run does);
 *   4. calls main(loop, arg) as the loop's first callback (so ca_get_running_loop() and
 *      ca_get_event_loop() give that loop inside), takes over the future main returns (a new
 *      reference) and runs the loop until that future is done;
 *   5. sets the previous current loop again (the one the policy had for this thread before,
 *      read without making one; NULL if there was none: then, as after asyncio.run(), the
 *      main thread gets -ENOENT rather than a new automatic loop), closes the loop (which ends
 *      its subprocesses, see Subprocesses) and drops it.
 * Returns the future's outcome: 0 if it has a result, its error if it failed, -ECANCELED if it
 * was cancelled. Other errors: -EINVAL NULL main, main returned NULL or a future of another
 * loop, or the factory returned 0 without a loop; the factory's (or new_event_loop's) error,
 * and then main is not called; set_event_loop's error; -EAGAIN if the loop was stopped (by
 * ca_loop_stop) before the future was done: the future is left pending and the loop closed.
 * Any thread; main and the loop run in the calling thread. */
typedef int (*ca_loop_factory_fn)(ca_loop **out);
typedef ca_future *(*ca_main_fn)(ca_loop *loop, void *arg);
int ca_run(ca_main_fn main, void *arg, ca_loop_factory_fn factory);

/* ---------------------------------------------------------------------------------------------
 * Child watchers (asyncio's AbstractChildWatcher)
 * ------------------------------------------------------------------------------------------- */

/* A child watcher learns when child processes exit and reports each exit once, to a callback.
 * asyncio's subprocess machinery (and ours: see Subprocesses) spawns a child and then calls
 * add_child_handler on the policy's watcher. Six built-in watchers, one interface:
 *
 *   Threaded  (the default, created lazily by ca_get_child_watcher) One waiting thread per
 *             child, blocked in waitid(pid, WNOWAIT), every signal blocked, named "ca-wait-PID".
 *             On x86-64 it is a raw kernel thread, not a glibc thread, on a 1 KiB stack: about
 *             1.1 KiB of resident memory per running child, where a glibc thread takes 8.5 KiB
 *             at least (elsewhere, in sanitizer builds, and where a seccomp filter refuses
 *             that clone, a glibc thread on a 32 KiB stack).
 *             The waiting thread only waits: one posting thread per process ("ca-wait-post",
 *             a glibc thread on a default-size stack, started with the first waiting thread and
 *             ended 0.1 s after the last exit it handled) reaps each exit and posts it, and
 *             calls the log handler, so no call out of the library runs on a small stack. O(1)
 *             per exit, no signal handler, works for loops in any thread; it holds 10,000
 *             children at once. A thread that cannot be made (thread limits) makes
 *             add_child_handler fail with -EAGAIN: the child is then not watched, never lost.
 *   MultiLoop Its own SIGCHLD handler (through the process-wide signal fan-out) from creation
 *             until close, and its own reaping thread, woken by that handler. It reaps by pid
 *             the watched children the handler saw exit (si_pid), every watched one when there
 *             are at most 16, and finds the others with waitid(P_ALL, WEXITED|WNOHANG|WNOWAIT),
 *             which does not reap: O(1) per exit in our code (the kernel's waitid walks the
 *             process's children). That look, which finds the exits whose SIGCHLD coalesced
 *             with another's, is put off after a wake that came with a si_pid (one it watches,
 *             or a child whose add is on its way): by 2 ms, twice as long after each such look
 *             that found nothing, up to 32 ms, and 2 ms again once one finds an exit. So one
 *             look serves a stream of exits, and a coalesced exit is found at most 32 ms late.
 *             It polls every registered pid with
 *             waitpid(pid, WNOHANG) (O(n), asyncio's way) only when that cannot tell (no child
 *             exists, or the first exited child is not one it watches and stays so for 10 ms:
 *             an add for it reaps it and wakes the thread), and once a second, to notice
 *             children other code reaped (reported with 255 up to a second late). Never reaps
 *             a child it does not watch.
 *             Works for loops in any thread. Changes the process's SIGCHLD disposition while
 *             it lives (close restores the previous one, unless other code replaced ours since).
 *             docs/watchers.md has details.
 *   Safe      SIGCHLD through the attached loop's signal handler (ca_loop_add_signal_handler),
 *             then the same search as MultiLoop (waitid(WNOWAIT), then reap by pid; the full
 *             waitpid(pid, WNOHANG) poll when that cannot tell, after attach_loop, and once a
 *             second at the slow check on the attached loop); never reaps other code's children.
 *             Active only while attached to a loop that is not
 *             closed; the attached loop must run for exits to be seen. Needs a loop with signal
 *             handlers (a custom loop without add_signal_handler: attach_loop gives -ENOTSUP).
 *   Fast      As Safe for attachment, but waitpid(-1, WNOHANG) until nothing is left: O(1) per
 *             exit. It reaps EVERY child of the process: other code's waitpid(pid) then fails
 *             with ECHILD and system() returns -1; such an exit is logged ("Caught subprocess
 *             termination from unknown pid") and dropped, except between enter and exit, where
 *             it is kept in case its handler comes next. A registered child that other code
 *             reaped (before or after add_child_handler) is reported with returncode 255, as
 *             the others do: waitpid(-1) cannot see it, so Fast checks each registered pid
 *             with waitid(WNOWAIT) once a second at its slow check (O(n)), and at once when no
 *             child is left at all (ECHILD).
 *   Pidfd     pidfd_open(pid) and a reader on the delivery loop; waitid(P_PIDFD) on the loop's
 *             thread when the child exits. No signals, no threads, O(1) per exit, one fd per
 *             running child (RLIMIT_NOFILE applies). Needs Linux 5.4 (waitid(P_PIDFD));
 *             pidfd_open came in 5.3, and without it ca_pidfd_child_watcher_new gives -ENOSYS.
 *   Uring     (casyncio's own; asyncio has none) one io_uring request per child, on one ring
 *             of the watcher's own per delivery loop (usually one), whose fd is a reader on that
 *             loop: so it works on every loop kind, custom ones included. The request is a
 *             POLL_ADD on the child's pidfd, held in the ring's fixed-file table (not an fd; up
 *             to min(RLIMIT_NOFILE, 4096) children per ring), or beyond that table an
 *             IORING_OP_WAITID, an asynchronous waitid(P_PID, pid, WEXITED | WNOWAIT). No fd, no
 *             thread and no signal handler per child, O(1) work per exit (the WAITIDs beyond
 *             the table sit on the kernel's one child-exit wait queue, which each exit walks),
 *             and no RLIMIT_NOFILE limit on the children watched. The
 *             child stays a zombie until its callback has run and is reaped right after it, so
 *             its pid cannot be reused while the callback (or a subprocess's signal) names it:
 *             a subprocess watched by Uring holds no pidfd. Linux 6.7+.
 *
 * Delivery: the callback cb(pid, returncode, arg) is called exactly once per exit, never inside
 * a signal handler and never with a library lock held (it may call any library function).
 *   - Threaded, MultiLoop, Pidfd and Uring deliver to the "delivery loop": the loop given to
 *     ca_child_watcher_add_child_handler_on, or else (add_child_handler) the loop running in
 *     the calling thread, or else that thread's current loop (ca_get_event_loop). The callback
 *     runs ON that loop's thread: Threaded's and MultiLoop's threads only reap and post the
 *     exit with ca_loop_call_soon_threadsafe (as asyncio 3.11 does); Pidfd reaps on the loop
 *     itself, and Uring there too, right after the callback. If that loop is closed when the
 *     exit arrives (by ca_loop_close, or by its host: ca_loop_ops.is_closed), the exit is
 *     logged and dropped (asyncio's "Loop that handles pid ... is closed" warning).
 *   - Safe and Fast call it on the attached loop's thread.
 *   Threaded's threads and MultiLoop's reaping thread never run a callback: they
 *   reap, and the delivery loop runs the callback (as asyncio 3.11 does). A callback should
 *   still be thread-safe with respect to the code that registered it, as asyncio asks.
 * No exit is lost for want of memory: an exit whose post fails with -ENOMEM (the child already
 * reaped) is kept and posted again (Threaded's posting thread and MultiLoop's thread retry with
 * a growing pause up to 0.1 s; Safe and Fast at their next SIGCHLD or slow check) until it is
 * delivered, removed, or its loop closes; the warning lines need no allocation.
 *
 * Locks: the watchers never call a loop op, a callback or the log handler while they hold a lock
 * of their own (see "Locks and threads" under ca_loop_ops), so a host whose ops take a lock of
 * its own (the GIL) may call any watcher function while holding it. Every lock of the library
 * is made safe across fork() (held by the forking thread around it).
 *
 * SIGCHLD. MultiLoop's thread and Safe/Fast (on their attached loop, every second) check that
 * SIGCHLD still reaches them, and reap as if it had come: an exit is never lost because other
 * code changed SIGCHLD's disposition (a foreign sigaction, a remove_signal_handler) under an
 * active watcher; it is found at the latest about a second late (MultiLoop then polls every
 * 0.1 s). When the library's handler was replaced and no host routes SIGCHLD with
 * ca_sigchld_notify, a warning says so once per process ("SIGCHLD no longer reaches ..."). A
 * host that owns SIGCHLD's disposition (Python's signal module) calls ca_sigchld_notify from
 * its handler. Closing a watcher never puts SIG_DFL (or the saved disposition) over a handler
 * that other code installed after the watcher's.
 * returncode: the exit status (0..255), or -SIG for a child killed by signal SIG, or 255 when
 * the status could not be read because somebody else reaped the child (waitpid gave ECHILD, or
 * pidfd_open gave ESRCH): that case is logged ("Unknown child process pid N, will report
 * returncode 255"), unless the handler was removed by then.
 * A removed callback is never called, even if the child's exit was already reaped and posted;
 * remove returning 1 guarantees it. A handler removed before the exit: MultiLoop, Safe, Pidfd
 * and Uring then leave the child unreaped (its remover reaps it); Threaded's posting thread still
 * reaps it, quietly (except a subprocess's own child after the watcher closed: the subprocess
 * reaps that one, with its status); Fast reaps it and logs it as unknown.
 *
 *
 * bpo-32115: a SIGCHLD disposition of SIG_IGN (or SA_NOCLDWAIT), for instance inherited from
 * the parent process, makes the kernel reap children itself, so no exit status could be read.
 * Every watcher, when it becomes active (Threaded, MultiLoop, Pidfd and Uring at creation, Safe and
 * Fast when attached), detects it, sets SIG_DFL while any watcher is active, logs a warning, and
 * puts the old disposition back when the last one is closed or detached.
 *
 * Threads: every function of this section is safe from any thread. Errors common to all:
 * -EINVAL NULL watcher (or NULL cb, pid <= 0 where a pid is taken); -ECHILD the watcher was made
 * before fork() and this is the child (only close and unref work there: they free memory and
 * touch none of the parent's threads, fds or signal handlers); -EBADF the watcher is closed
 * (everything but close and unref). In that order. */

typedef void (*ca_child_fn)(pid_t pid, int returncode, void *arg);

/* A custom watcher's operations (an AbstractChildWatcher subclass). The public functions check
 * the arguments, the fork state and the closed state before calling an op, so ops do not repeat
 * those checks; close is called at most once (by ca_child_watcher_close or by the last unref),
 * destroy once when the last reference goes (to free `data`). Required: add_child_handler,
 * remove_child_handler, is_active. Optional (NULL: nothing to do, the function returns 0):
 * attach_loop, close, enter, exit, destroy. The callback contract above is the op's to keep. */
typedef struct ca_child_watcher_ops {
    int (*add_child_handler)(ca_child_watcher *self, pid_t pid, ca_child_fn cb, void *arg);
    int (*remove_child_handler)(ca_child_watcher *self, pid_t pid);
    int (*attach_loop)(ca_child_watcher *self, ca_loop *loop);
    bool (*is_active)(ca_child_watcher *self);
    int (*close)(ca_child_watcher *self);
    int (*enter)(ca_child_watcher *self);
    int (*exit)(ca_child_watcher *self);
    void (*destroy)(ca_child_watcher *self);
} ca_child_watcher_ops;

/* Make a built-in watcher; *out receives one reference. -EINVAL NULL out; -ENOMEM.
 *   ca_multiloop_child_watcher_new: also -EMFILE/-ENFILE (its eventfd), -EAGAIN (its thread),
 *     -ENOSPC (too many signal slots in the process).
 *   ca_pidfd_child_watcher_new: -ENOSYS where pidfd_open is missing (Linux < 5.3, or valgrind);
 *     checked once per process.
 *   ca_uring_child_watcher_new: the Uring watcher (see above). -ENOSYS where it cannot work:
 *     io_uring missing or forbidden (not built in, kernel.io_uring_disabled, a seccomp filter's
 *     EPERM), a kernel without IORING_OP_WAITID (before 6.7) or IORING_FEAT_NODROP, or the
 *     environment variable CASYNCIO_NO_IO_URING set to anything but "" or "0" (valgrind does
 *     not follow io_uring); the kernel is probed once per process, the variable read at every
 *     call. Making it opens nothing: each delivery loop's ring (one fd, about 80 KiB of shared
 *     memory for 256 submissions and 4,096 completions) is made with the first child added for
 *     that loop and released when that loop closes or the watcher is closed (on the loop's
 *     thread: right away there, else at its next iteration).
 *     Threads: as Pidfd. add_child_handler must be called on the delivery loop's thread (or
 *     while that loop is not running): -EPERM otherwise; the callback runs on that loop's
 *     thread, from the ring's reader, and the child is reaped (waitpid(pid, WNOHANG)) right
 *     after it returns. remove, close and unref work from any thread (the request is cancelled
 *     with IORING_OP_ASYNC_CANCEL; a removed child is not reaped: its remover reaps it).
 *     add_child_handler's errors besides the common ones: -ENOENT (no delivery loop, as Pidfd),
 *     -EPERM (above), -ENOSYS (the ring could not be made any more: io_uring was forbidden
 *     since), the loop's add_reader errors the first time a loop is used (-ENOTSUP for a
 *     custom loop without add_reader), io_uring_setup's -EMFILE/-ENFILE/-ENOMEM, -EAGAIN
 *     (the ring's submission queue is full and a kernel before 5.19 takes no more while its
 *     completion queue overflows: try again once the loop has run), io_uring_enter's other
 *     errors, -ENOMEM.
 *     A child that somebody else reaps is reported with returncode 255 and the "Unknown child
 *     process" warning, as with the other watchers; the request holds the kernel's reference
 *     to that child, so a recycled pid is never mistaken for it. A delivery loop closed before
 *     the exit: as Pidfd (its exit is not reported, remove answers 1, a debug log line). */
int ca_threaded_child_watcher_new(ca_child_watcher **out);
int ca_multiloop_child_watcher_new(ca_child_watcher **out);
int ca_safe_child_watcher_new(ca_child_watcher **out);
int ca_fast_child_watcher_new(ca_child_watcher **out);
int ca_uring_child_watcher_new(ca_child_watcher **out);
int ca_pidfd_child_watcher_new(ca_child_watcher **out);
/* Makes a custom watcher around ops (which must outlive it) and data. -EINVAL NULL ops/out or a
 * NULL required member; -ENOMEM. */
int ca_child_watcher_new_custom(const ca_child_watcher_ops *ops, void *data,
                                ca_child_watcher **out);
/* The custom watcher's data; NULL for built-in watchers and for NULL. */
void *ca_child_watcher_data(ca_child_watcher *watcher);
ca_child_watcher *ca_child_watcher_ref(ca_child_watcher *watcher);
/* Drops a reference; the last one closes the watcher if needed and frees it. Threads a closed
 * Threaded watcher still has (children still running) keep what they need alive, and end when
 * their child exits. */
ca_child_watcher *ca_child_watcher_unref(ca_child_watcher *watcher);

/* Calls cb(pid, returncode, arg) once when child pid exits (see "Delivery" above). Adding a
 * pid that is already registered replaces its callback and arg (and, for Threaded and
 * MultiLoop, its delivery loop, unless the exit is already on its way). A child that exited
 * before this call is reported too (Fast: with its status if it exited inside enter/exit or has
 * not been reaped yet; else, its status gone to Fast's "unknown pid" log line or to other code,
 * with 255). The callback must be thread-safe with respect to the caller's code, as asyncio
 * says. Errors besides the common ones:
 *   -ENOENT   Threaded, MultiLoop, Pidfd, Uring: no running or current loop in this thread (or it is
 *             closed). The current loop is taken with a reference while the policy that owns
 *             it is held, so a policy replaced by another thread meanwhile is harmless.
 *   -ENOTCONN Safe, Fast: not active (not attached, or the attached loop is closed).
 *   -EAGAIN   Threaded: no thread could be made (other pthread_create errors likewise).
 *   -EPERM    Pidfd, Uring: the delivery loop runs in another thread (the reader must be added
 *             on its thread); Threaded, MultiLoop: the same, the first time a loop is used by this
 *             watcher. Pidfd also passes pidfd_open's EMFILE, ENFILE, ENOMEM and EPERM (seccomp):
 *             the child is then not watched, and the caller still owns its exit.
 *   -ENOMEM.
 * On any error cb is never called. */
int ca_child_watcher_add_child_handler(ca_child_watcher *watcher, pid_t pid, ca_child_fn cb,
                                       void *arg);
/* As ca_child_watcher_add_child_handler, with the delivery loop given explicitly: for host-loop
 * adapters (an asyncio loop), whose loop is not "running" in C terms, and for code that adds
 * from a thread other than the loop's. loop NULL: the implicit rule above. The caller keeps its
 * reference to loop; the watcher takes what it needs.
 *   Threaded, MultiLoop, Pidfd: the exit is delivered on loop, whatever thread calls this and
 *     whatever loop runs there. Pidfd adds its reader (ca_loop_add_reader) on loop from the
 *     calling thread, with no library lock held: for a loop that is not running in C terms
 *     that is any thread, and the host's add_reader must then be thread-safe. As for
 *     add_child_handler, -EPERM when loop runs (in C terms) in another thread and this watcher
 *     has not used it yet (Pidfd: whenever it runs in another thread).
 *   Safe, Fast: loop must be NULL or the attached loop (-EINVAL otherwise, also when nothing is
 *     attached); they always deliver on the attached loop.
 *   Custom watchers: -ENOTSUP for a loop that is not NULL (their op takes no loop).
 * Errors: those of ca_child_watcher_add_child_handler, in its order, and after the watcher's
 * checks: -ECHILD loop was made before fork(); -EBADF loop is closed (by ca_loop_close or by its
 * host: ca_loop_ops.is_closed); -EINVAL (Safe, Fast) and -ENOTSUP (custom) as above. Any
 * thread. */
int ca_child_watcher_add_child_handler_on(ca_child_watcher *watcher, ca_loop *loop, pid_t pid,
                                          ca_child_fn cb, void *arg);
/* Tells the library that SIGCHLD arrived: for a host that owns the signal dispositions (Python's
 * signal module) and has replaced the library's SIGCHLD handler with its own. It does what the
 * library's handler does: it wakes MultiLoop's reaping thread and every built-in loop with a
 * SIGCHLD handler (Safe and Fast attached to a built-in loop check their children there). Safe
 * and Fast attached to a host loop get SIGCHLD through that loop's add_signal_handler op, and
 * need no call. Calling it once (even before any child exits) also tells the watchers that the
 * host routes SIGCHLD: they then do not warn that SIGCHLD was taken away from them (they keep
 * their slow check, which finds any exit within about a second anyway). Extra calls are
 * harmless. Async-signal-safe (atomics and write(2), errno saved); any thread, signal handlers
 * included. */
void ca_sigchld_notify(void);
/* 1 if a handler was removed (its callback will never be called), 0 if there was none (never
 * registered, already delivered, or being delivered right now). A handler whose delivery loop
 * was closed before the exit could be delivered stays registered until removed or replaced, so
 * that remove answers 1 for it: the callback will never come, and the child is the remover's
 * to reap if it is still there. Pidfd closes the child's fd on its loop's thread (at once if
 * called there). */
int ca_child_watcher_remove_child_handler(ca_child_watcher *watcher, pid_t pid);
/* Attaches the watcher to loop (NULL detaches); takes its own reference to the loop. Only Safe
 * and Fast use it: they install a SIGCHLD handler on the loop and remove it from the previous
 * one, then check every registered child once on the new loop (one may have exited during the
 * switch), and arm their slow SIGCHLD check (a timer, every second) on it. Call it from the
 * loop's thread, or while the loop is not running (as the default policy's ca_set_event_loop
 * does in the main thread). The loop ops (add/remove_signal_handler, call_soon_threadsafe,
 * call_at) are called without any library lock held. The others do nothing and return 0.
 * Errors (Safe, Fast): -EPERM a loop concerned (loop, or the attached loop while it is not
 * closed) runs in another thread: checked before anything is touched; -EBADF the new loop is
 * closed; -EBUSY another attach_loop of this watcher is under way in another thread; -ENOTSUP
 * a custom loop without signal handlers; -ENOMEM. On error nothing changed. Calling it for a
 * loop that is not running while another thread may start running it is a race (the
 * default policy's ca_set_event_loop avoids it: see ca_default_policy_new). */
int ca_child_watcher_attach_loop(ca_child_watcher *watcher, ca_loop *loop);
/* Whether add_child_handler can work: Threaded, Pidfd and Uring always; MultiLoop from creation
 * until close; Safe and Fast while attached to a loop that is not closed. false for NULL, a closed
 * watcher, or in a forked child. */
bool ca_child_watcher_is_active(ca_child_watcher *watcher);
/* Closes the watcher: every handler is cancelled (no callback after close returns), MultiLoop's
 * thread is joined and its SIGCHLD handler removed, Safe/Fast are detached, Pidfd's fds are
 * released (on their loops' threads), and the SIGCHLD disposition is restored. Threaded's
 * waiting threads are detached: each ends, quietly, when its child exits (and reaps it).
 * Children are not killed. Idempotent (0). -EINVAL NULL. In a forked child: 0, frees nothing
 * of the parent's. If a Safe/Fast watcher's loop runs in another thread, its SIGCHLD handler
 * stays on that loop (doing nothing) until that loop closes. A SIGCHLD handler that other code
 * installed after the watcher's stays in place (the saved disposition is put back only over
 * the library's own handler). */
int ca_child_watcher_close(ca_child_watcher *watcher);
/* The `with watcher:` protocol (asyncio's __enter__/__exit__), which the subprocess code calls
 * around every spawn. Only Fast uses it: between enter and exit, exit statuses of pids that are
 * not registered yet are kept for their add_child_handler; the last exit logs and drops the ones
 * nobody claimed. Nestable (a counter). Fast's exit without enter gives -EINVAL. The others:
 * 0. */
int ca_child_watcher_enter(ca_child_watcher *watcher);
int ca_child_watcher_exit(ca_child_watcher *watcher);

/* ---------------------------------------------------------------------------------------------
 * Subprocesses
 * ------------------------------------------------------------------------------------------- */

/* Child processes: asyncio's loop.subprocess_exec() with its SubprocessTransport and
 * SubprocessProtocol. A ca_process is the transport; the protocol is a table of three callbacks.
 *
 * Spawning. The child is made with clone(CLONE_VM | CLONE_VFORK | CLONE_PIDFD) on a small stack
 * (what glibc's posix_spawn does, plus a pidfd): no copy of the parent's memory, however large.
 * In the child, before execve: every signal handler reset to SIG_DFL (so are SIGPIPE and
 * SIGXFSZ when ignored, as Python's restore_signals; other ignored signals stay ignored), an
 * empty signal mask, setsid() if asked, the stdio fds set up, the working directory changed,
 * and every fd above 2 marked close-on-exec (Python's close_fds): the program gets fds 0, 1
 * and 2 and nothing else. The library's own fds are all O_CLOEXEC as well.
 *
 * stdio modes (ca_stdio_mode), per stdin_mode / stdout_mode / stderr_mode:
 *   CA_INHERIT  (0) the child shares ours. A zero-initialised ca_subprocess_options inherits
 *               all three.
 *   CA_PIPE     a pipe to us: data from the child's stdout (1) and stderr (2) arrives through
 *               pipe_data_received; its stdin (0) is fed with ca_process_write.
 *   CA_DEVNULL  /dev/null.
 *   CA_STDOUT   stderr only: the child's stderr goes where its stdout goes (merged).
 *   CA_FD       the caller's open fd stdin_fd / stdout_fd / stderr_fd (dup'ed onto 0/1/2 in the
 *               child; the caller keeps its fd, and only the copy on 0/1/2 reaches the program,
 *               even when the fd is not O_CLOEXEC).
 *
 * Protocol callbacks (each member may be NULL), all on the loop's thread, never inside a
 * ca_process_* call:
 *   pipe_data_received(proc, fd, buf, n, arg)  fd 1 or 2; buf is valid during the call only.
 *   pipe_connection_lost(proc, fd, err, arg)   once per CA_PIPE fd: err 0 at EOF (or when stdin
 *       was closed by ca_process_close_stdin or by the child), -EPIPE when the child closed its
 *       stdin while written data was still queued (the rest is dropped), another -errno on a
 *       read or write error.
 *   process_exited(proc, arg)                  once, when the watcher reports the exit;
 *       ca_process_returncode works from then on.
 * Order, as asyncio: for each pipe, all its data before its pipe_connection_lost; the wait
 * futures complete after process_exited and after every pipe_connection_lost. When the exit is
 * reported, whatever the child left in its pipes (and their end of file) is delivered before
 * process_exited, so a child whose pipes were only its own gives: pipe_data_received...,
 * pipe_connection_lost for each pipe, process_exited, then the wait futures. A grandchild that
 * keeps a pipe open keeps the wait futures pending after process_exited until it closes it
 * (asyncio 3.11's behaviour).
 *
 * Ownership and lifetime. ca_loop_subprocess_exec gives the caller one reference. The loop
 * holds another one until the process is finished (exited and every pipe closed) or the loop is
 * closed, so dropping yours early is fine: the callbacks still come. The process holds a
 * reference to its loop until it is freed. The protocol table is copied; arg is the caller's.
 *
 * Closing the loop ends the processes it still has, as asyncio's transport close() does: their
 * pipes are closed, a child that is still running is killed with SIGKILL and reaped (one
 * warning through the log handler for each), their pending wait futures are cancelled, and no
 * protocol callback runs after the close. The ca_process objects stay valid for their holders:
 * returncode then gives -9 for a killed child (255 if the exit was reaped by the watcher but
 * lost with the loop, as asyncio reports an unknown status). No zombie is left.
 *
 * Threads: ca_process_ref, ca_process_unref and ca_process_pid from any thread; the other
 * ca_process_* functions and ca_loop_subprocess_exec from the loop's thread (or any single
 * thread while the loop does not run); -EPERM from another thread while the loop runs.
 * In a child made by fork(), every function but ref/unref/pid gives -ECHILD. */
typedef enum {
    CA_INHERIT = 0,
    CA_PIPE,
    CA_DEVNULL,
    CA_STDOUT, /* stderr only */
    CA_FD
} ca_stdio_mode;

typedef struct ca_subprocess_options {
    const char *const *argv;        /* NULL-terminated, argv[0] the program: looked up in PATH
                                       unless it contains a '/' (envp's PATH when envp is given
                                       and has one, else ours; "/bin:/usr/bin" when neither) */
    const char *const *envp;        /* NULL-terminated; NULL: inherit our environment */
    const char *cwd;                /* NULL: inherit */
    ca_stdio_mode stdin_mode, stdout_mode, stderr_mode;   /* zero: inherit */
    int stdin_fd, stdout_fd, stderr_fd;                   /* used with CA_FD */
    bool start_new_session;         /* setsid() in the child */
} ca_subprocess_options;

typedef struct ca_subprocess_protocol {
    void (*pipe_data_received)(ca_process *proc, int fd, const void *buf, size_t n, void *arg);
    void (*pipe_connection_lost)(ca_process *proc, int fd, int err, void *arg);
    void (*process_exited)(ca_process *proc, void *arg);
} ca_subprocess_protocol;

/* Starts argv as a child process whose events are delivered on loop (running or not: nothing
 * is delivered before the loop runs). *out receives a reference to the process. The options
 * are read during the call only.
 * The exit is learned through the current policy's child watcher (ca_get_child_watcher), as
 * asyncio does: ca_child_watcher_enter, a check that it is active, the spawn, add_child_handler,
 * ca_child_watcher_exit. With the Threaded, MultiLoop and Pidfd watchers the exit goes to the
 * loop running in the calling thread, so call this from loop's thread (if no loop runs here,
 * loop is made the delivery loop for the registration). The Pidfd watcher is handed the pidfd
 * obtained at spawn. A watcher that reports from another thread is fine: the exit is passed on
 * to loop with ca_loop_call_soon_threadsafe.
 * The watcher is looked up with a reference (another thread may replace it, or the policy,
 * meanwhile: the spawn uses the old or the new one, never a freed one). A watcher found closed
 * is looked up again, since a replacement installs the new watcher before it closes the old one;
 * a child whose watcher is closed by another thread after that check, before its registration,
 * is watched through its own pidfd instead, so a replacement never fails a spawn. In a child
 * made by fork() the default policy provides a new watcher (see the policies' fork rule), so a
 * forked child spawns as any process does.
 * Errors (nothing is left behind: no child, no zombie, no fd):
 *   -EINVAL    NULL loop, opts or out; argv NULL or empty; a mode out of range; CA_STDOUT for
 *              stdin or stdout; CA_FD with a negative fd.
 *   -ECHILD    loop was made by the parent of this process (fork()); or a custom policy
 *              handed out a watcher made by the parent.
 *   -EBADF     loop is closed (also a custom loop whose is_closed op says so); a CA_FD fd is
 *              not open; or the policy's child watcher is closed and stayed so (closed by its
 *              owner and not replaced; or, without a pidfd, closed by another thread in the
 *              instant between the check and the registration: then the child was killed and
 *              reaped).
 *   -EPERM     called from another thread while loop runs.
 *   -ENOTCONN  the policy's child watcher is not active (e.g. Safe or Fast not attached to a
 *              loop): refused before anything is spawned.
 *   -ENOENT    the program was not found (or cwd does not exist), or, from the watcher, no
 *              loop to deliver to.
 *   -EACCES    the program (or a directory on the way) is not executable / searchable.
 *   -ENOTDIR   cwd (or a directory on the way) is not a directory.
 *   other negative errno values of the child's execve (-ENOEXEC, -E2BIG, -ETXTBSY...), of
 *   clone (-EAGAIN process limit, -ENOMEM), of pipe2/open (-EMFILE, -ENFILE), of the loop
 *   (-ENOTSUP: a custom loop without readers, for CA_PIPE) and of the watcher's
 *   add_child_handler (-EAGAIN no thread, -EMFILE...): then the child was killed and reaped. */
int ca_loop_subprocess_exec(ca_loop *loop, const ca_subprocess_options *opts,
                            const ca_subprocess_protocol *proto, void *arg, ca_process **out);
ca_process *ca_process_ref(ca_process *proc);    /* NULL gives NULL */
ca_process *ca_process_unref(ca_process *proc);  /* accepts NULL; returns NULL */
/* The child's pid; -EINVAL for NULL. Any thread. */
pid_t ca_process_pid(const ca_process *proc);
/* The returncode once known (process_exited ran, or the loop closed): the exit status, -signal
 * when killed, 255 when it could not be read. -EAGAIN while running; -EINVAL NULL; -ECHILD. */
int ca_process_returncode(const ca_process *proc, int *rc);
/* A new future (a new reference at each call) that completes with the returncode, as
 * (void *)(intptr_t)rc, once the exit is known and every pipe is closed; already done (its
 * callbacks still run through the loop) if that is the case. -EINVAL NULL; -ECHILD; -EPERM;
 * -EBADF the loop is closed (the returncode is still there); -ENOMEM. */
int ca_process_wait(ca_process *proc, ca_future **out);
/* Queues n bytes for the child's stdin (copied: buf may be reused at once) and returns at once:
 * the data is written in order as the pipe drains, never blocking the caller, and never raising
 * SIGPIPE in this process. If the child closed its stdin, the error comes through
 * pipe_connection_lost(proc, 0, -EPIPE) and the queued data is dropped. n == 0 does nothing.
 * -EINVAL NULL proc, NULL buf with n > 0, or stdin is not CA_PIPE; -EPIPE stdin is closed or
 * being closed (close_stdin, the child, an error); -EBADF the loop is closed; -ECHILD; -EPERM;
 * -ENOMEM. */
int ca_process_write(ca_process *proc, const void *buf, size_t n);
/* Closes the child's stdin once the queued data is written (at once if none), after which
 * pipe_connection_lost(proc, 0, 0) comes through the loop. Idempotent: 0 if it is already
 * closed or closing, also after the loop closed. -EINVAL NULL or stdin is not CA_PIPE;
 * -ECHILD; -EPERM. */
int ca_process_close_stdin(ca_process *proc);
/* Sends sig (1..64) to the child: through its pidfd where the kernel gave one, so a recycled
 * pid is never hit (cpython#127049). Once the exit is known (or the watcher reaped the child,
 * or the loop closed), does nothing and returns 0, as subprocess.Popen.send_signal does.
 * terminate is SIGTERM, kill is SIGKILL. -EINVAL NULL or a bad signal (0 included); -ECHILD;
 * -EPERM; other errors of kill(2) (-EPERM). */
int ca_process_send_signal(ca_process *proc, int sig);
int ca_process_terminate(ca_process *proc);
int ca_process_kill(ca_process *proc);
/* asyncio's Process.communicate(): writes len bytes of input (copied) to the child's stdin and
 * closes it (input is ignored when stdin is not CA_PIPE, as asyncio does; the child closing
 * its stdin early is not an error), collects what the child writes to its CA_PIPE stdout and
 * stderr from now on, and returns a new future that completes with the returncode when the
 * process is finished (as ca_process_wait's; it fails with -ENOMEM if the output could not be
 * kept). The protocol still receives everything. Read the output with ca_process_output.
 * Once per process. -EINVAL NULL proc or out, NULL input with len > 0; -EBUSY called before;
 * -EBADF the loop is closed; -ECHILD; -EPERM; -ENOMEM. */
int ca_process_communicate(ca_process *proc, const void *input, size_t len, ca_future **out);
/* What communicate collected from fd 1 (stdout) or 2 (stderr) so far: *buf (never NULL; "" when
 * empty) and *len. The buffer belongs to proc: valid until more output arrives or proc is
 * freed (stable once the communicate future is done). -EINVAL NULL proc/buf/len or fd not 1 or
 * 2; -ECHILD. */
int ca_process_output(const ca_process *proc, int fd, const void **buf, size_t *len);

#ifdef __cplusplus
}
#endif

#endif /* CASYNCIO_H */
