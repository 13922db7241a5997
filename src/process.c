/*
 * Subprocesses: asyncio's loop.subprocess_exec() with its SubprocessTransport and pipe
 * transports, in one object (ca_process).
 *
 * The shape follows base_subprocess.py and unix_events.py: the exit is learned through the
 * current policy's child watcher (enter, spawn, add_child_handler, exit), pipes are read and
 * written with the loop's readers and writers (so every loop kind works, custom ones too), and
 * the wait futures complete once the exit is known and every pipe is closed (_try_finish).
 *
 * Spawning is spawn.c's (ca__spawn: clone without fork, the PATH search, the child's setup
 * before exec, the exec error): this file prepares what the child gets on fds 0 to 2 (our pipes,
 * /dev/null, the caller's fds, each kept above 2 until the child copies it down), spawns, and
 * does the rest. The child's pidfd is ours, for signals and the final reap; the Pidfd watcher
 * borrows it.
 *
 * Threads. Everything here runs on the loop's thread, except the watcher's callback, which some
 * watchers call from another thread: it only stores the exit in atomics and posts the rest to
 * the loop. A small state machine (relay) decides who drops the loop's reference to the
 * process when the loop closes while that callback is in flight.
 */
#include "internal.h"
#include "kinds.h"
#include "loop_internal.h"
#include "spawn.h"

#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

/* How much a reader callback reads per call, and per read(2). */
#define READ_CHUNK 32768
#define READS_PER_CALL 4
/* At the exit, how many reads a pipe may take to deliver what the child left in it. */
#define DRAIN_READS 64

/* Who drops the loop's reference when the loop closes (see child_exited and on_loop_close):
 * WAITING: nothing came yet; REPORTED: the exit came, posted to the loop; DROPPED: the watcher
 * dropped the registration without the exit (built-in watchers tell us), the close hook ends
 * the child unless we reaped it on our own first; ABANDONED: the loop closed while the exit or
 * the drop was on its way, which then drops the reference; ENDED: the close hook took the
 * registration back (or came after the drop) and ended the child itself. */
enum { RELAY_WAITING, RELAY_REPORTED, RELAY_DROPPED, RELAY_ABANDONED, RELAY_ENDED };
#define RC_UNKNOWN INT_MIN

struct bytes {
    char *data;
    size_t off, len, cap; /* off: the stdin buffer's written part */
};

/* Kept small: a program may watch thousands of children. What only pipes need (the stdin
 * buffer, the collected output) is allocated with the first pipe. */
struct ca_process {
    atomic_int refs;
    unsigned fork_gen;
    ca_loop *loop;                  /* a reference, for the process's whole life */
    ca_child_watcher *watcher;      /* a reference until the exit is known or the loop closed */
    ca_subprocess_protocol proto;   /* a copy */
    void *arg;
    pid_t pid;
    int pidfd;                      /* ours, for signals and the final reap; -1 without */
    struct ca__wreg *lease;         /* the Pidfd watcher borrows pidfd: see drop_pidfd */
    /* What posting the exit (or the drop) to the loop needs when memory fails, so that it
     * cannot be lost (issue 16, item 4): a custom loop's handle, or a built-in loop's node
     * (ca__loop_schedule_ex). child_exited or child_dropped takes it (once, before its relay
     * exchange); else proc_free frees it. */
    ca_handle *spare;

    /* Written by the watcher's callback, possibly in another thread. */
    atomic_int relay;
    atomic_int exit_rc;             /* RC_UNKNOWN until the exit is known; set once */

    /* The loop's thread only. */
    int fd[3];                      /* our pipe ends; -1 when none or closed */
    int lost_err;                   /* stdin's posted pipe_connection_lost: with this error */
    int rc;
    int ownfd;                      /* dropped by the watcher: a dup of pidfd that we watch */
    bool piped[3];                  /* the option was CA_PIPE */
    bool lost[3];                   /* pipe_connection_lost delivered */
    bool lost_posted : 1;           /* stdin's pipe_connection_lost is scheduled */
    bool writer_on : 1;
    bool stdin_closing : 1;         /* close_stdin(): close once the buffer is written */
    bool collect : 1;               /* communicate() was called */
    bool have_rc : 1;
    bool finished : 1;              /* waiters completed */
    bool closed : 1;                /* the loop closed: no protocol callback any more */
    bool collect_oom : 1;           /* communicate() could not keep all the output */
    bool internal : 1;              /* a built-in watcher: it tells us of a drop */
    ca_future *comm;                /* communicate's future (not a reference: it is a waiter) */
    /* With pipes only (else NULL): [0] stdin data not written yet, [1] and [2] the collected
     * stdout and stderr. */
    struct bytes *buf;
    void *hook;                     /* close hook token */
    ca_future **waiters;
    uint32_t nwaiters, capwaiters;
    char name[];                    /* argv[0], for log lines */
};

/* ----- small helpers -------------------------------------------------------------------------- */

/* The exit as the watcher (or the close hook) learned it: the first one wins (true). */
static bool set_exit(ca_process *p, int rc)
{
    int unknown = RC_UNKNOWN;
    return atomic_compare_exchange_strong(&p->exit_rc, &unknown, rc);
}

static int exit_rc(const ca_process *p) { return atomic_load(&((ca_process *)p)->exit_rc); }

static bool exit_known(const ca_process *p) { return exit_rc(p) != RC_UNKNOWN; }

static void close_fd(int *fd)
{
    if (*fd >= 0) close(*fd);
    *fd = -1;
}

/* We are done with our pidfd (the exit is known, the loop closed, or p is freed). A Pidfd
 * watcher that borrowed it may still have its reader on it, on a delivery loop in another
 * thread, where the reader's removal may only be on its way: give_back closes the fd now if
 * the reader is off it, or leaves the close to the watcher, which closes it right after
 * removing the reader. Either way it is not ours any more. */
static void drop_pidfd(ca_process *p)
{
    if (p->lease) ca__pidfd_watcher_give_back(p->lease, p->pidfd);
    else close_fd(&p->pidfd);
    p->lease = NULL;
    p->pidfd = -1;
}

static int set_nonblock(int fd)
{
    int fl = fcntl(fd, F_GETFL);
    if (fl < 0 || fcntl(fd, F_SETFL, fl | O_NONBLOCK) < 0) return -errno;
    return 0;
}

/* Makes room for n more bytes. */
static int bytes_reserve(struct bytes *b, size_t n)
{
    if (b->cap - b->len >= n) return 0;
    if (b->off > 0 && b->off >= b->len / 2) {
        /* Most of it was written already: slide the rest down instead of growing. */
        memmove(b->data, b->data + b->off, b->len - b->off);
        b->len -= b->off;
        b->off = 0;
        if (b->cap - b->len >= n) return 0;
    }
    if (n > SIZE_MAX / 2 - b->len) return -ENOMEM;
    size_t cap = b->cap ? b->cap : 4096;
    while (cap - b->len < n) cap *= 2;
    char *d = realloc(b->data, cap);
    if (!d) return -ENOMEM;
    b->data = d;
    b->cap = cap;
    return 0;
}

static void bytes_free(struct bytes *b)
{
    free(b->data);
    *b = (struct bytes){0};
}

/* write(2) that never raises SIGPIPE in the process (we cannot ignore it process-wide as Python
 * does): SIGPIPE is blocked in this thread around the call and the one the call raised, if any,
 * is taken out of the pending set before it is unblocked. */
static ssize_t write_nosigpipe(int fd, const void *buf, size_t n)
{
    sigset_t pipe_set, old, before;
    sigemptyset(&pipe_set);
    sigaddset(&pipe_set, SIGPIPE);
    pthread_sigmask(SIG_BLOCK, &pipe_set, &old);
    bool was_blocked = sigismember(&old, SIGPIPE);
    bool was_pending = false;
    if (was_blocked) {
        sigemptyset(&before);
        sigpending(&before);
        was_pending = sigismember(&before, SIGPIPE);
    }
    ssize_t w;
    do {
        w = write(fd, buf, n);
    } while (w < 0 && errno == EINTR);
    int e = w < 0 ? errno : 0;
    if (e == EPIPE && !was_pending) {
        struct timespec zero = {0, 0};
        while (sigtimedwait(&pipe_set, NULL, &zero) < 0 && errno == EINTR) {
        }
    }
    if (!was_blocked) pthread_sigmask(SIG_SETMASK, &old, NULL);
    return w < 0 ? -e : w;
}

/* The common checks of the process functions: -EINVAL, -ECHILD, -EPERM. */
static int proc_check(const ca_process *p)
{
    if (!p) return -EINVAL;
    if (p->fork_gen != ca__fork_gen()) return -ECHILD;
    if (!ca__loop_in_own_thread(p->loop)) return -EPERM;
    return 0;
}


/* ----- delivering to the protocol ------------------------------------------------------------- */

static void try_finish(ca_process *p);

static void unwatch_fd(ca_process *p, int i)
{
    if (p->fd[i] < 0) return;
    ca_loop_remove_reader(p->loop, p->fd[i]);
    if (i == 0 && p->writer_on) ca_loop_remove_writer(p->loop, p->fd[i]);
    if (i == 0) p->writer_on = false;
    close_fd(&p->fd[i]);
}

/* Pipe i is done: close it and tell the protocol (err 0 at EOF, or the error). */
static void pipe_lost(ca_process *p, int i, int err)
{
    unwatch_fd(p, i);
    if (i == 0) bytes_free(&p->buf[0]);
    if (p->closed || p->lost[i]) return;
    p->lost[i] = true;
    if (p->proto.pipe_connection_lost) p->proto.pipe_connection_lost(p, i, err, p->arg);
    try_finish(p);
}

static void deliver_data(ca_process *p, int i, const char *buf, size_t n)
{
    if (p->collect && !p->collect_oom) {
        struct bytes *b = &p->buf[i];
        if (bytes_reserve(b, n) == 0) {
            memcpy(b->data + b->len, buf, n);
            b->len += n;
        } else {
            p->collect_oom = true;
        }
    }
    if (p->proto.pipe_data_received) p->proto.pipe_data_received(p, i, buf, n, p->arg);
}

/* Reads what pipe i (1 or 2) has. drain: until it is empty or at EOF (at the exit, so that
 * the data and the EOF the child left come before process_exited). */
static void read_pipe(ca_process *p, int i, bool drain)
{
    char buf[READ_CHUNK];
    int budget = drain ? DRAIN_READS : READS_PER_CALL;
    while (budget-- > 0 && p->fd[i] >= 0 && !p->closed) {
        ssize_t n = read(p->fd[i], buf, sizeof buf);
        if (n > 0) {
            deliver_data(p, i, buf, (size_t)n);
            if (!drain && (size_t)n < sizeof buf) return;
            continue;
        }
        if (n < 0 && errno == EINTR) {
            budget++;
            continue;
        }
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return;
        pipe_lost(p, i, n == 0 ? 0 : -errno);
        return;
    }
}

/* Whether the child's side of our stdin pipe is closed (the child exited or closed fd 0). */
static bool stdin_peer_gone(int fd)
{
    struct pollfd pf = {.fd = fd, .events = POLLOUT};
    return poll(&pf, 1, 0) > 0 && (pf.revents & (POLLERR | POLLHUP));
}

/* stdin is closed by the child: asyncio reports BrokenPipeError only when data was left. */
static void stdin_gone(ca_process *p)
{
    pipe_lost(p, 0, p->buf[0].len > p->buf[0].off ? -EPIPE : 0);
}

static void on_stdout(void *arg)
{
    ca_process *p = ca_process_ref(arg);
    read_pipe(p, 1, false);
    ca_process_unref(p);
}

static void on_stderr(void *arg)
{
    ca_process *p = ca_process_ref(arg);
    read_pipe(p, 2, false);
    ca_process_unref(p);
}

/* The loop says stdin's write end has an error condition (its reader callback also runs for
 * POLLERR/POLLHUP on every loop kind): the child closed its end. */
static void on_stdin_event(void *arg)
{
    ca_process *p = ca_process_ref(arg);
    if (p->fd[0] >= 0 && stdin_peer_gone(p->fd[0])) stdin_gone(p);
    ca_process_unref(p);
}

/* Writes the stdin buffer as far as the pipe takes it. */
static void flush_stdin(ca_process *p)
{
    while (p->fd[0] >= 0 && p->buf[0].len > p->buf[0].off) {
        ssize_t n = write_nosigpipe(p->fd[0], p->buf[0].data + p->buf[0].off, p->buf[0].len - p->buf[0].off);
        if (n > 0) {
            p->buf[0].off += (size_t)n;
            continue;
        }
        if (n == -EAGAIN || n == -EWOULDBLOCK) return; /* the writer is on */
        pipe_lost(p, 0, n == 0 ? -EPIPE : (int)n);
        return;
    }
    if (p->fd[0] < 0) return;
    p->buf[0].off = p->buf[0].len = 0;
    if (p->writer_on) {
        ca_loop_remove_writer(p->loop, p->fd[0]);
        p->writer_on = false;
    }
    if (p->stdin_closing) pipe_lost(p, 0, 0);
}

static void on_stdin_writable(void *arg)
{
    ca_process *p = ca_process_ref(arg);
    flush_stdin(p);
    ca_process_unref(p);
}

/* A pipe_connection_lost for stdin that an API call (not a loop callback) caused: asyncio
 * delivers those through call_soon too, so the caller is never re-entered. */
static void stdin_lost_posted(void *arg)
{
    ca_process *p = ca_process_ref(arg);
    p->lost_posted = false;
    if (!p->closed && !p->lost[0]) {
        p->lost[0] = true;
        if (p->proto.pipe_connection_lost)
            p->proto.pipe_connection_lost(p, 0, p->lost_err, p->arg);
        try_finish(p);
    }
    ca_process_unref(p);
}

static void post_stdin_lost(ca_process *p, int err)
{
    unwatch_fd(p, 0);
    bytes_free(&p->buf[0]);
    if (p->lost[0] || p->lost_posted) return;
    p->lost_err = err;
    p->lost_posted = true;
    if (ca_loop_call_soon(p->loop, stdin_lost_posted, p, NULL) < 0) {
        /* Out of memory: deliver now rather than never. */
        p->lost_posted = false;
        p->lost[0] = true;
        if (p->proto.pipe_connection_lost) p->proto.pipe_connection_lost(p, 0, err, p->arg);
        try_finish(p);
    }
}

/* ----- the exit ------------------------------------------------------------------------------- */

static void release_watcher(ca_process *p)
{
    p->watcher = ca_child_watcher_unref(p->watcher);
}

/* Completes the waiters once the exit is known and every pipe is closed (_try_finish and
 * _call_connection_lost), then drops the loop's reference to the process. */
static void try_finish(ca_process *p)
{
    if (p->finished || p->closed || !p->have_rc) return;
    for (int i = 0; i < 3; i++)
        if (p->piped[i] && !p->lost[i]) return;
    p->finished = true;
    if (p->hook) ca__loop_remove_close_hook(p->loop, p->hook);
    p->hook = NULL;
    for (uint32_t k = 0; k < p->nwaiters; k++) {
        ca_future *f = p->waiters[k];
        if (!ca_future_done(f)) {
            if (f == p->comm && p->collect_oom) ca_future_set_error(f, -ENOMEM);
            else ca_future_set_result(f, (void *)(intptr_t)p->rc);
        }
        ca_future_unref(f);
    }
    free(p->waiters);
    p->waiters = NULL;
    p->nwaiters = p->capwaiters = 0;
    ca_process_unref(p); /* the loop's; the caller holds its own */
}

/* On the loop's thread: the watcher reported the exit. The pipes are read first so that what
 * the child left (and the EOF that came with its exit) reaches the protocol before
 * process_exited, as a reader would have delivered it a moment later anyway. */
static void exit_on_loop(void *arg)
{
    ca_process *p = ca_process_ref(arg);
    if (!p->closed && !p->have_rc) {
        int rc = exit_rc(p);
        release_watcher(p);
        for (int i = 1; i <= 2; i++)
            if (p->fd[i] >= 0) read_pipe(p, i, true);
        if (p->fd[0] >= 0 && stdin_peer_gone(p->fd[0])) stdin_gone(p);
        p->rc = rc;
        p->have_rc = true;
        drop_pidfd(p);
        if (!p->closed && p->proto.process_exited) p->proto.process_exited(p, p->arg);
        try_finish(p);
    }
    ca_process_unref(p);
}

static void end_child(ca_process *p, bool reap);
static void child_dropped(ca_process *p, bool watch);

/* The reserved handle, taken out of p while p is surely alive (before the relay exchange):
 * child_exited and child_dropped run once between them, so nobody else touches it then. */
static ca_handle *take_spare(ca_process *p)
{
    ca_handle *h = p->spare;
    p->spare = NULL;
    return h;
}

/* Posts fn(p) to loop: call_soon when the loop runs in this thread, else call_soon_threadsafe
 * (the loop closing or closed refuses it: its close hook finishes the process then). Out of
 * memory, the post falls back on the reservation; spare is consumed either way. p is not
 * touched here. Without a reservation (it could not be made again) and without memory, the
 * exit is said lost, and the loop's close ends the child. */
static void post_to_loop(ca_loop *loop, ca_callback_fn fn, ca_process *p, pid_t pid,
                         ca_handle *spare)
{
    int r = ca__loop_schedule_ex(loop, fn, p, NULL, &spare, true);
    ca__handle_unreserve(spare);
    if (r == -ENOMEM)
        ca__log(CA_LOG_ERROR, "child process %d: its exit cannot be posted to its loop: %s",
                (int)pid, ca_strerror(r));
}

/* The watcher's callback: any thread, possibly while the loop closes in its own thread. Until
 * the relay leaves RELAY_WAITING the loop's reference keeps p alive; after our successful
 * exchange the close hook may free p at any moment, so p is not touched after it. */
static void child_exited(pid_t pid, int returncode, void *arg)
{
    ca_process *p = arg;
    if (returncode == CA__RC_DROPPED || returncode == CA__RC_REPLACED) {
        child_dropped(p, returncode == CA__RC_DROPPED);
        return;
    }
    set_exit(p, returncode); /* no more signals to this pid from now on */
    ca_loop *loop = ca_loop_ref(p->loop);
    ca_handle *spare = take_spare(p);
    int expected = RELAY_WAITING;
    if (!atomic_compare_exchange_strong(&p->relay, &expected, RELAY_REPORTED)) {
        /* The loop closed while this callback was on its way: the reference is ours. */
        ca__handle_unreserve(spare);
        ca_loop_unref(loop);
        ca_process_unref(p);
        return;
    }
    /* Skip one iteration, as asyncio's _child_watcher_callback: never re-enter the watcher. If
     * the loop is closing or closed, its close hook finishes the process instead. */
    post_to_loop(loop, exit_on_loop, p, pid, spare);
    ca_loop_unref(loop);
}

/* Our dup of the pidfd is readable: the child exited (it may have been reaped by a closed
 * Threaded watcher's thread meanwhile: then returncode 255, as asyncio says). */
static void own_exited(void *arg)
{
    ca_process *p = ca_process_ref(arg);
    if (p->ownfd >= 0 && !p->closed && !p->have_rc) {
        int rc = ca__reap_child(p->pid, p->ownfd); /* exited: does not block */
        ca_loop_remove_reader(p->loop, p->ownfd);
        close_fd(&p->ownfd);
        set_exit(p, rc);
        exit_on_loop(p);
    }
    ca_process_unref(p);
}

/* A pidfd for p's child opened by pid, for a process that holds none (the Uring watcher's):
 * nobody but a foreign reaper could have reaped the child (the watcher that let go of it never
 * did), so the pid is still the child's unless it was reaped by somebody else, such as a Fast
 * watcher (its waitpid(-1) reaps every child). -1 with errno ESRCH: reaped, the pid free or
 * taken by a process that is not our child (waitid on the pidfd answers ECHILD); only a pid
 * reused by another child of ours in between would go unnoticed, as with every watcher that
 * reaps by pid. Always close-on-exec. */
static int open_pidfd_late(pid_t pid)
{
    int fd = (int)syscall(SYS_pidfd_open, pid, 0);
    if (fd < 0) return -1;
    siginfo_t si;
    memset(&si, 0, sizeof si);
    if (waitid(P_PIDFD, (id_t)fd, &si, WEXITED | WNOHANG | WNOWAIT) < 0 && errno == ECHILD) {
        close(fd);
        errno = ESRCH;
        return -1;
    }
    return fd;
}

/* On the loop's thread, after a drop while the loop runs: learn the exit on our own, through a
 * copy of our pidfd (a Pidfd watcher's reader may still be on ours, on this loop, with its
 * removal on its way). The relay is RELAY_DROPPED: the loop's reference keeps p until the exit
 * or the close hook, and this runs before the latter or never. Without a pidfd the exit stays
 * unknown until the loop closes, whose hook ends the child; a child that somebody else reaped
 * is reported now, with returncode 255 and a warning, as the watchers report a foreign reap. */
static void own_watch(void *arg)
{
    ca_process *p = arg;
    if (p->closed || p->have_rc || p->ownfd >= 0) return;
    /* Without a pidfd of its own (a Uring watcher's process), one now (open_pidfd_late). */
    bool gone = false;
    if (p->pidfd >= 0) {
        p->ownfd = fcntl(p->pidfd, F_DUPFD_CLOEXEC, 3);
    } else {
        p->ownfd = open_pidfd_late(p->pid);
        gone = p->ownfd < 0 && errno == ESRCH;
    }
    if (p->ownfd >= 0 && ca_loop_add_reader(p->loop, p->ownfd, own_exited, p) == 0) return;
    close_fd(&p->ownfd);
    if (gone) {
        ca__log(CA_LOG_WARNING,
                "child process %d (%s): reaped by somebody else after its watcher dropped it: "
                "will report returncode 255",
                (int)p->pid, p->name);
        if (set_exit(p, 255)) exit_on_loop(p);
        return;
    }
    ca__log(CA_LOG_WARNING,
            "child process %d (%s): its watcher dropped it and it cannot be watched here: "
            "its exit will be known when the loop closes",
            (int)p->pid, p->name);
}

/* A built-in watcher dropped our registration without the exit (it was closed, the exit could
 * not be posted, or somebody removed or replaced the handler): any thread, never with the
 * watcher's lock held, exactly once and never after child_exited. watch: nobody watches the
 * child any more, we may reap it on our own; not when a user's handler took it over (reaping
 * it would rob them of its status: the loop's close ends it, as it always did). */
static void child_dropped(ca_process *p, bool watch)
{
    ca_loop *loop = ca_loop_ref(p->loop);
    ca_handle *spare = take_spare(p);
    pid_t pid = p->pid; /* p is not touched after the exchange */
    int expected = RELAY_WAITING;
    if (atomic_compare_exchange_strong(&p->relay, &expected, RELAY_DROPPED)) {
        /* The loop runs (or has not closed yet): finish on our own there if we can. p is not
         * touched after the exchange (the close hook may free it), as in child_exited. */
        if (watch) post_to_loop(loop, own_watch, p, pid, spare);
        else ca__handle_unreserve(spare);
    } else if (expected == RELAY_ABANDONED) {
        /* The loop closed meanwhile and left the child to us (it kept the pidfd for this):
         * nobody else will reap it. The reference is ours. */
        end_child(p, true);
        ca_process_unref(p);
        ca__handle_unreserve(spare);
    } else {
        ca__handle_unreserve(spare);
    }
    ca_loop_unref(loop);
}

static atomic_bool no_pidfd_send_signal; /* valgrind (3.19) and kernels before 5.1 */

/* 0, or -errno (-ESRCH: the child is gone, reaped by somebody). */
static int raw_signal(ca_process *p, int sig)
{
    if (p->pidfd >= 0 && !atomic_load_explicit(&no_pidfd_send_signal, memory_order_relaxed)) {
        if (syscall(SYS_pidfd_send_signal, p->pidfd, sig, NULL, 0) == 0) return 0;
        if (errno != ENOSYS) return -errno;
        atomic_store_explicit(&no_pidfd_send_signal, true, memory_order_relaxed);
    }
    return kill(p->pid, sig) == 0 ? 0 : -errno;
}

static int send_sig(ca_process *p, int sig)
{
    int r = raw_signal(p, sig);
    return r == -ESRCH ? 0 : r;
}

/* ----- closing the loop ----------------------------------------------------------------------- */

/* Whether the child still runs (not a zombie, not reaped), asked through its pidfd, or by pid
 * when it has none (the Uring watcher's processes; kernels or tools without pidfd_open): the
 * pid is ours until it is reaped, and a reaped one (ECHILD, by the watcher) does not run. */
static bool still_running(const ca_process *p)
{
    siginfo_t si;
    memset(&si, 0, sizeof si);
    int r = p->pidfd >= 0
                ? waitid(P_PIDFD, (id_t)p->pidfd, &si, WEXITED | WNOHANG | WNOWAIT)
                : waitid(P_PID, (id_t)p->pid, &si, WEXITED | WNOHANG | WNOWAIT);
    if (r < 0) {
        if (p->pidfd >= 0) return errno == EINVAL || errno == ENOSYS; /* no P_PIDFD: assume so */
        return errno != ECHILD;
    }
    return si.si_pid == 0;
}

static void log_killed(const ca_process *p)
{
    ca__log(CA_LOG_WARNING, "loop closed with child process %d (%s) still running: killed it",
            (int)p->pid, p->name);
}

/* Kills the child if it still runs; reap: and reaps it (blocking: SIGKILL cannot be ignored).
 * A child that the watcher reaped already (-ESRCH) had its exit on the way to this loop, lost
 * with it: returncode 255, "unknown", as asyncio says. A zombie keeps its own status. Called
 * twice for one child (the close hook kills it, a drop reaps it), it logs once: the kill
 * claims the exit. */
static void end_child(ca_process *p, bool reap)
{
    if (!reap) {
        if (still_running(p) && raw_signal(p, SIGKILL) == 0 && set_exit(p, -SIGKILL))
            log_killed(p);
        return;
    }
    /* A child that exited already is not killed: if a Threaded watcher's thread wins the reap
     * below, its status is lost (255), but it was not killed by us and is not logged so. */
    int kr = still_running(p) ? raw_signal(p, SIGKILL) : -ESRCH;
    int rc = ca__reap_child(p->pid, p->pidfd);
    /* A Threaded watcher's thread may win the reap of the child we killed. */
    if (rc == 255 && kr == 0) rc = -SIGKILL;
    if (set_exit(p, rc) && rc == -SIGKILL) log_killed(p);
}

/* The loop is closing (its thread, nothing runs on it any more): end the process as asyncio's
 * transport close() does. Pipes are closed, a running child is killed and reaped; the waiters
 * are cancelled and no protocol callback runs from now on. */
static void on_loop_close(void *arg)
{
    /* Ours for the call: once the relay says ABANDONED, the exit or the drop may come in
     * another thread and drop the loop's reference, perhaps the last one. */
    ca_process *p = ca_process_ref(arg);
    p->hook = NULL;
    p->closed = true;
    for (int i = 0; i < 3; i++) unwatch_fd(p, i);
    if (p->ownfd >= 0) {
        ca_loop_remove_reader(p->loop, p->ownfd);
        close_fd(&p->ownfd);
    }
    if (p->buf) bytes_free(&p->buf[0]);
    bool drop = true, keep_pidfd = false;
    if (!p->have_rc) {
        /* Only our own registration: with a built-in watcher, 1 means that neither the exit
         * nor a drop will come, 0 that one of them is on its way or came. */
        int r = p->watcher ? ca__child_watcher_take_back(p->watcher, p->pid, child_exited, p)
                           : -EBADF;
        int expected = RELAY_WAITING;
        if (r == 1) {
            /* The callback will never be called: the child is ours to end and reap. */
            atomic_store(&p->relay, RELAY_ENDED);
            end_child(p, true);
        } else {
            /* The callback is on its way (r == 0), or may never come (r < 0: a closed custom
             * watcher). A custom watcher that cannot take a registration back leaves its
             * child running: end it where that is safe (through the pidfd), and reap it only
             * if no watcher will. Before the exchange: after it, a drop may end the child in
             * another thread. */
            if (r < 0 || p->pidfd >= 0) end_child(p, r < 0);
            if (atomic_compare_exchange_strong(&p->relay, &expected, RELAY_ABANDONED)) {
                /* Whatever comes drops the loop's reference: the exit, or with a built-in
                 * watcher a drop, which then ends and reaps the child through the pidfd that
                 * we keep for it until p is freed. A custom watcher cannot tell us of a drop
                 * (its registration is a public one): if it dropped ours without calling it,
                 * p and its loop are never freed. */
                drop = false;
                keep_pidfd = p->internal;
            } else if (expected == RELAY_DROPPED) {
                /* Dropped by the watcher before: nothing else comes, the child is ours. */
                atomic_store(&p->relay, RELAY_ENDED);
                end_child(p, true);
            }
        }
        /* Otherwise it was reported, but the loop closed before it ran the rest: known. */
        if (exit_known(p)) {
            p->rc = exit_rc(p);
            p->have_rc = true;
        }
    }
    release_watcher(p);
    if (!keep_pidfd) drop_pidfd(p);
    for (uint32_t k = 0; k < p->nwaiters; k++) {
        ca_future_cancel(p->waiters[k]);
        ca_future_unref(p->waiters[k]);
    }
    free(p->waiters);
    p->waiters = NULL;
    p->nwaiters = p->capwaiters = 0;
    if (drop) ca_process_unref(p);
    ca_process_unref(p);
}

/* ----- creating a process --------------------------------------------------------------------- */

static bool mode_ok(ca_stdio_mode m, int i, int fd)
{
    switch (m) {
    case CA_INHERIT:
    case CA_PIPE:
    case CA_DEVNULL:
        return true;
    case CA_STDOUT:
        return i == 2;
    case CA_FD:
        return fd >= 0;
    }
    return false;
}

/* The fds the parent opened for the child (closed after the spawn). */
struct stdio_setup {
    int tmp[6];
    int ntmp;
    int devnull;
};

/* Keeps a child-side fd above 2, so that dup3 onto 0..2 in the child never clobbers another
 * source (fds 0..2 may be free in a daemon, and pipe2 would hand them out). */
static int child_side(struct stdio_setup *s, int fd, bool owned, int *out)
{
    if (fd < 3) {
        int nfd = fcntl(fd, F_DUPFD_CLOEXEC, 3);
        int e = errno;
        if (owned) close(fd);
        if (nfd < 0) return -e;
        fd = nfd;
        owned = true;
    }
    if (owned) s->tmp[s->ntmp++] = fd;
    *out = fd;
    return 0;
}

static int setup_stdio(ca_process *p, const ca_subprocess_options *o, struct ca__spawn_req *req,
                       struct stdio_setup *s)
{
    const ca_stdio_mode modes[3] = {o->stdin_mode, o->stdout_mode, o->stderr_mode};
    const int fds[3] = {o->stdin_fd, o->stdout_fd, o->stderr_fd};
    for (int i = 0; i < 3; i++) {
        req->src[i] = CA__SPAWN_INHERIT;
        int r = 0;
        switch (modes[i]) {
        case CA_INHERIT:
            break;
        case CA_STDOUT:
            req->src[i] = CA__SPAWN_STDOUT;
            break;
        case CA_PIPE: {
            if (!p->buf && !(p->buf = calloc(3, sizeof *p->buf))) return -ENOMEM;
            int pp[2];
            if (pipe2(pp, O_CLOEXEC) < 0) return -errno;
            int ours = i == 0 ? pp[1] : pp[0], theirs = i == 0 ? pp[0] : pp[1];
            p->fd[i] = ours;
            p->piped[i] = true;
            if ((r = set_nonblock(ours)) < 0) {
                close(theirs);
                return r;
            }
            r = child_side(s, theirs, true, &req->src[i]);
            break;
        }
        case CA_DEVNULL:
            if (s->devnull < 0) {
                int fd = open("/dev/null", O_RDWR | O_CLOEXEC);
                if (fd < 0) return -errno;
                if ((r = child_side(s, fd, true, &s->devnull)) < 0) return r;
            }
            req->src[i] = s->devnull;
            break;
        case CA_FD:
            r = child_side(s, fds[i], false, &req->src[i]);
            break;
        }
        if (r < 0) return r;
    }
    return 0;
}

static int add_waiter(ca_process *p, ca_future *f)
{
    if (p->nwaiters == p->capwaiters) {
        if (p->capwaiters >= UINT32_MAX / 2) return -ENOMEM;
        uint32_t cap = p->capwaiters ? p->capwaiters * 2 : 2;
        ca_future **v = realloc(p->waiters, cap * sizeof *v);
        if (!v) return -ENOMEM;
        p->waiters = v;
        p->capwaiters = cap;
    }
    p->waiters[p->nwaiters++] = ca_future_ref(f);
    return 0;
}

static void proc_free(ca_process *p)
{
    /* In a forked child the fds are the parent's copies, left alone; so is a loan (its
     * watcher's lock may have been held by one of the parent's threads at the fork). */
    if (p->fork_gen == ca__fork_gen()) {
        for (int i = 0; i < 3; i++) close_fd(&p->fd[i]);
        close_fd(&p->ownfd); /* its reader went with the loop's close or the exit */
        drop_pidfd(p);
    }
    for (uint32_t k = 0; k < p->nwaiters; k++) ca_future_unref(p->waiters[k]);
    free(p->waiters);
    if (p->buf) {
        for (int i = 0; i < 3; i++) bytes_free(&p->buf[i]);
        free(p->buf);
    }
    ca_child_watcher_unref(p->watcher);
    ca__handle_unreserve(p->spare);
    ca_loop_unref(p->loop);
    free(p);
}

/* Registers the exit callback with the watcher, delivered on the loop running in this thread
 * if there is one, else on the process's loop. That is asyncio's choice: its
 * _make_subprocess_transport adds the handler from the running loop, and Threaded/Pidfd deliver
 * there (the loop then relays to the transport's loop); a C program may also spawn with nothing
 * running, and then the process's loop is the natural one. The loop is given explicitly
 * (ca__child_watcher_add_internal_on), so the watcher never looks it up in the policy. Safe and
 * Fast deliver on their attached loop whatever is given. A Pidfd watcher borrows the process's
 * pidfd instead of opening its own (any other kind answers -ENOTSUP to the loan). */
static int watch_child(ca_process *p, ca_child_watcher *w)
{
    ca_loop *dl = ca_get_running_loop(); /* running here: alive for the call */
    if (!dl) dl = p->loop;
    int r = -ENOTSUP;
    if (p->pidfd >= 0)
        r = ca__pidfd_watcher_lend_on(w, dl, p->pid, p->pidfd, child_exited, p, &p->lease);
    /* A built-in watcher tells us when it drops the registration without the exit. */
    if (r == -ENOTSUP) r = ca__child_watcher_add_internal_on(w, dl, p->pid, child_exited, p);
    p->internal = r != -ENOTSUP;
    if (r == -ENOTSUP) {
        /* A custom watcher picks the delivery loop itself, by the documented rule (the running
         * loop first): when nothing runs here, ours is marked running for the call. */
        bool entered = !ca_get_running_loop() && ca_loop_enter_running(p->loop) == 0;
        r = ca_child_watcher_add_child_handler(w, p->pid, child_exited, p);
        if (entered) ca_loop_exit_running(p->loop);
    }
    return r;
}

static void ignore_exit(pid_t pid, int returncode, void *arg) {}

/* The policy's watcher, referenced (ca__get_child_watcher_ref: another thread may replace the
 * watcher or the policy meanwhile) and entered. A watcher found closed was replaced, or closed,
 * by another thread: a replacement installs the new watcher before it closes the old one, so
 * looking again finds the new one; a few rounds cover replacements in a tight loop. Errors: the
 * lookup's, -EBADF (the policy's watcher stayed closed), -ENOTCONN (not attached to a loop:
 * checked before anything is spawned, as asyncio does). */
static int enter_watcher(ca_child_watcher **out)
{
    int r = -EBADF;
    for (int round = 0; round < 16 && r == -EBADF; round++) {
        ca_child_watcher *w = NULL;
        if ((r = ca__get_child_watcher_ref(&w)) < 0) return r;
        r = ca_child_watcher_enter(w);
        if (r == 0 && !ca_child_watcher_is_active(w))
            r = ca_child_watcher_exit(w) == -EBADF ? -EBADF : -ENOTCONN;
        if (r == 0) {
            *out = w;
            return 0;
        }
        ca_child_watcher_unref(w);
    }
    return r;
}

static int check_options(const ca_subprocess_options *o)
{
    if (!o->argv || !o->argv[0]) return -EINVAL;
    if (o->stdin_mode == CA_STDOUT || o->stdout_mode == CA_STDOUT) return -EINVAL;
    if (!mode_ok(o->stdin_mode, 0, o->stdin_fd) || !mode_ok(o->stdout_mode, 1, o->stdout_fd) ||
        !mode_ok(o->stderr_mode, 2, o->stderr_fd))
        return -EINVAL;
    return 0;
}

static int check_fds_open(const ca_subprocess_options *o)
{
    const ca_stdio_mode modes[3] = {o->stdin_mode, o->stdout_mode, o->stderr_mode};
    const int fds[3] = {o->stdin_fd, o->stdout_fd, o->stderr_fd};
    for (int i = 0; i < 3; i++)
        if (modes[i] == CA_FD && fcntl(fds[i], F_GETFD) < 0) return -EBADF;
    return 0;
}

static void undo_setup(ca_process *p)
{
    for (int i = 0; i < 3; i++) unwatch_fd(p, i);
    p->writer_on = false;
}

int ca_loop_subprocess_exec(ca_loop *loop, const ca_subprocess_options *o,
                            const ca_subprocess_protocol *proto, void *arg, ca_process **out)
{
    if (!loop || !o || !out) return -EINVAL;
    int r = check_options(o);
    if (r) return r;
    if ((r = ca__loop_check(loop)) != 0) return r;
    if (!ca__loop_in_own_thread(loop)) return -EPERM;
    if ((r = check_fds_open(o)) != 0) return r;

    ca_child_watcher *w = NULL;
    if ((r = enter_watcher(&w)) < 0) return r;
    ca_process *p = NULL;
    struct stdio_setup s = {.ntmp = 0, .devnull = -1};
    size_t namelen = strlen(o->argv[0]);
    p = calloc(1, sizeof *p + namelen + 1);
    if (!p) {
        r = -ENOMEM;
        goto out;
    }
    memcpy(p->name, o->argv[0], namelen + 1);
    if (!(p->spare = ca__handle_reserve())) {
        free(p);
        p = NULL;
        r = -ENOMEM;
        goto out;
    }
    atomic_init(&p->refs, 2); /* the caller's and the loop's (until finished) */
    p->fork_gen = ca__fork_gen();
    p->loop = ca_loop_ref(loop);
    p->watcher = ca_child_watcher_ref(w);
    if (proto) p->proto = *proto;
    p->arg = arg;
    p->pidfd = -1;
    p->ownfd = -1;
    for (int i = 0; i < 3; i++) p->fd[i] = -1;
    atomic_init(&p->relay, RELAY_WAITING);
    atomic_init(&p->exit_rc, RC_UNKNOWN);

    struct ca__spawn_req req = {
        .argv = o->argv,
        .envp = o->envp,
        .cwd = o->cwd,
        .setsid = o->start_new_session,
    };
    if ((r = setup_stdio(p, o, &req, &s)) < 0) goto out;
    /* Readers first: after the spawn, only the watcher's registration may still fail. */
    static const ca_callback_fn readers[3] = {on_stdin_event, on_stdout, on_stderr};
    for (int i = 0; i < 3; i++)
        if (p->fd[i] >= 0 && (r = ca_loop_add_reader(loop, p->fd[i], readers[i], p)) < 0)
            goto out;
    /* A watcher that keeps the child unreaped until its callback ran (Uring) makes the pid as
     * safe to signal as a pidfd would, so the process holds none: no fd per child. */
    req.want_pidfd = !(ca__watcher_kind_flags(w) & CA__WK_NO_PIDFD);
    if ((r = ca__spawn(&req, &p->pid, &p->pidfd)) < 0) {
        /* A Fast watcher keeps the exits it reaps between enter and exit: claim this one, or
         * it would be logged as an unknown pid. */
        if (p->pid > 0 && (ca__watcher_kind_flags(w) & CA__WK_REAPS_ALL))
            ca_child_watcher_add_child_handler(w, p->pid, ignore_exit, NULL);
        goto out;
    }
    /* asyncio's order: the handler right after the spawn, inside enter/exit; then our close
     * hook, which thus runs before the watcher's own hook on this loop (hooks run newest
     * first) and can still take the registration back. */
    r = watch_child(p, w);
    bool self_watch = false, reaped = false;
    if (r == -EBADF && p->pidfd < 0 && !p->lease) {
        /* A process spawned for a Uring watcher holds no pidfd: one now (open_pidfd_late). The
         * closed watcher never registered the child, but another one (Fast) may have reaped it
         * already: then its exit is known, returncode 255, as for any foreign reap. */
        p->pidfd = open_pidfd_late(p->pid);
        reaped = p->pidfd < 0 && errno == ESRCH;
    }
    if (r == -EBADF && (p->pidfd >= 0 || reaped) && !p->lease) {
        /* Another thread closed the watcher after enter_watcher saw it open (ca_set_child_watcher
         * closes the one it replaces). The child runs: learn its exit through our own pidfd,
         * as after a drop, rather than kill it and fail. */
        atomic_store(&p->relay, RELAY_DROPPED);
        self_watch = true;
        r = 0;
    }
    if (r == 0 && !(p->hook = ca__loop_add_close_hook(loop, on_loop_close, p))) {
        /* Out of memory. If the registration cannot be taken back (the exit is already on its
         * way), keep the process, without the loop-close cleanup, rather than free it under
         * the callback. */
        if (ca__child_watcher_take_back(w, p->pid, child_exited, p) == 1) r = -ENOMEM;
        else ca__log(CA_LOG_ERROR, "child process %d: out of memory for the loop's close hook",
                     (int)p->pid);
    }
    if (r < 0) {
        /* Nobody would learn this child's exit: end it now, leave no zombie (unless somebody
         * else reaped it already: its pid is not ours to signal any more). */
        if (!reaped) {
            send_sig(p, SIGKILL);
            ca__reap_child(p->pid, p->pidfd);
        }
        goto out;
    }
    /* A child reaped by somebody else is reported by own_watch on the loop, not from this call
     * (the protocol hears of the exit after the spawn returned). */
    if (self_watch && reaped) post_to_loop(loop, own_watch, p, p->pid, take_spare(p));
    else if (self_watch) own_watch(p);
out:
    for (int i = 0; i < s.ntmp; i++) close(s.tmp[i]);
    ca_child_watcher_exit(w);
    ca_child_watcher_unref(w);
    if (r < 0) {
        if (p) {
            undo_setup(p);
            atomic_store(&p->refs, 1);
            proc_free(p);
        }
        return r;
    }
    *out = p;
    return 0;
}

/* ----- the public process functions ----------------------------------------------------------- */

ca_process *ca_process_ref(ca_process *p)
{
    if (p) atomic_fetch_add_explicit(&p->refs, 1, memory_order_relaxed);
    return p;
}

ca_process *ca_process_unref(ca_process *p)
{
    if (p && atomic_fetch_sub_explicit(&p->refs, 1, memory_order_acq_rel) == 1) proc_free(p);
    return NULL;
}

pid_t ca_process_pid(const ca_process *p) { return p ? p->pid : -EINVAL; }

int ca_process_returncode(const ca_process *p, int *rc)
{
    if (!p || !rc) return -EINVAL;
    if (p->fork_gen != ca__fork_gen()) return -ECHILD;
    if (p->have_rc) {
        *rc = p->rc;
        return 0;
    }
    if (p->closed && exit_known(p)) {
        *rc = exit_rc(p);
        return 0;
    }
    return -EAGAIN;
}

int ca_process_wait(ca_process *p, ca_future **out)
{
    if (!out) return -EINVAL;
    int r = proc_check(p);
    if (r) return r;
    if (p->closed && !p->finished) return -EBADF;
    ca_future *f;
    if ((r = ca_future_new(p->loop, &f)) < 0) return r;
    if (p->finished) {
        ca_future_set_result(f, (void *)(intptr_t)p->rc);
    } else if ((r = add_waiter(p, f)) < 0) {
        ca_future_unref(f);
        return r;
    }
    *out = f;
    return 0;
}

int ca_process_write(ca_process *p, const void *buf, size_t n)
{
    if (!buf && n) return -EINVAL;
    int r = proc_check(p);
    if (r) return r;
    if (!p->piped[0]) return -EINVAL;
    if (p->closed) return -EBADF;
    if (p->fd[0] < 0 || p->stdin_closing) return -EPIPE;
    if (n == 0) return 0;
    if ((r = bytes_reserve(&p->buf[0], n)) < 0) return r;
    size_t done = 0;
    if (p->buf[0].len == p->buf[0].off) {
        /* Nothing queued: try the pipe directly, most writes end here. */
        ssize_t w = write_nosigpipe(p->fd[0], buf, n);
        if (w > 0) {
            done = (size_t)w;
        } else if (w != -EAGAIN && w != -EWOULDBLOCK) {
            /* Reported through the protocol, as asyncio's write() does. */
            post_stdin_lost(p, w == 0 ? -EPIPE : (int)w);
            return 0;
        }
    }
    if (done == n) return 0;
    memcpy(p->buf[0].data + p->buf[0].len, (const char *)buf + done, n - done);
    p->buf[0].len += n - done;
    if (!p->writer_on) {
        if ((r = ca_loop_add_writer(p->loop, p->fd[0], on_stdin_writable, p)) < 0) {
            p->buf[0].len -= n - done;
            return r;
        }
        p->writer_on = true;
    }
    return 0;
}

int ca_process_close_stdin(ca_process *p)
{
    int r = proc_check(p);
    if (r) return r;
    if (!p->piped[0]) return -EINVAL;
    if (p->fd[0] < 0 || p->stdin_closing) return 0;
    if (p->buf[0].len > p->buf[0].off) {
        p->stdin_closing = true; /* the writer closes it once the buffer is written */
        return 0;
    }
    post_stdin_lost(p, 0);
    return 0;
}

int ca_process_send_signal(ca_process *p, int sig)
{
    if (sig < 1 || sig > CA__MAX_SIGNAL) return -EINVAL;
    int r = proc_check(p);
    if (r) return r;
    /* Once the exit is known the pid may belong to somebody else: do nothing, as
     * subprocess.Popen.send_signal does. */
    if (p->have_rc || p->closed || exit_known(p)) return 0;
    return send_sig(p, sig);
}

int ca_process_terminate(ca_process *p) { return ca_process_send_signal(p, SIGTERM); }

int ca_process_kill(ca_process *p) { return ca_process_send_signal(p, SIGKILL); }

int ca_process_communicate(ca_process *p, const void *input, size_t len, ca_future **out)
{
    if (!out || (!input && len)) return -EINVAL;
    int r = proc_check(p);
    if (r) return r;
    if (p->collect) return -EBUSY;
    ca_future *f;
    if ((r = ca_process_wait(p, &f)) < 0) return r;
    if (p->piped[0] && p->fd[0] >= 0 && !p->stdin_closing) {
        /* The child may have closed its stdin without reading: asyncio's communicate ignores
         * that (BrokenPipeError), and so do we; the protocol still hears of it. */
        if (len && (r = ca_process_write(p, input, len)) < 0 && r != -EPIPE) {
            ca_future_unref(f);
            return r;
        }
        ca_process_close_stdin(p);
    }
    p->collect = true;
    p->comm = f;
    *out = f;
    return 0;
}

int ca_process_output(const ca_process *p, int fd, const void **buf, size_t *len)
{
    if (!p || (fd != 1 && fd != 2) || !buf || !len) return -EINVAL;
    if (p->fork_gen != ca__fork_gen()) return -ECHILD;
    const struct bytes *b = p->buf ? &p->buf[fd] : NULL;
    *buf = b && b->data ? b->data : "";
    *len = b ? b->len : 0;
    return 0;
}
