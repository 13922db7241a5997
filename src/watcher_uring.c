/*
 * UringChildWatcher: one io_uring request per child on a ring of the watcher's own, whose fd is
 * a reader on the delivery loop, so it works on every loop kind, custom ones included (they only
 * need add_reader). No fd, thread or signal handler per child. The request is one of two kinds:
 *
 * Fixed pidfds (the usual one). The child's pidfd (pidfd_open) is put into a free slot of the
 * ring's sparse fixed-file table and its fd closed at once, so the process's fds do not grow with
 * its children; an IORING_OP_POLL_ADD(POLLIN) with IOSQE_FIXED_FILE on that slot completes when
 * the child exits (or was reaped). Each exit wakes only its own pid's queue: the cost of a
 * spawn+reap stays flat with the number of children watched (docs/benchmarks.md). The table is
 * registered when the ring is made, sparse, with min(RLIMIT_NOFILE's soft limit, UR_TABLE_MAX)
 * slots: the kernel refuses a table larger than that limit (EMFILE), and liburing 2.3's
 * io_uring_register_files_sparse would then raise the process's soft limit and try again, so we
 * make the io_uring_register calls ourselves. The slots are not fds (no margin is kept for
 * them); each pidfd_open needs one free fd for a moment. A slot is freed when its request is
 * over (completed or cancelled), before the callback, but not emptied: the next child's pidfd
 * replaces the old one (see slot_put); a dead ring's table goes with its fd.
 *
 * WAITID (the fallback): IORING_OP_WAITID (Linux 6.7, required: see Availability), an
 * asynchronous waitid(P_PID, pid, WEXITED | WNOWAIT). A child gets one when the table is full,
 * or was refused, or pidfd_open fails (ENOSYS, EMFILE, ESRCH: reaped already), or the pid is not
 * our child (checked with waitid(P_PIDFD, WNOHANG | WNOWAIT) on the pidfd: a POLL_ADD would wait
 * for that process's exit, a WAITID ends at once with -ECHILD, as before). Its cost grows with
 * the number of WAITIDs pending: each is an entry on the process's one child-exit wait queue,
 * which every child's exit walks. Both kinds live on the same ring, are cancelled the same way
 * (ASYNC_CANCEL by user_data, the ur_op) and end the same way, below.
 *
 * The order of an exit. When the child exits, the completion (CQE) arrives and the child is
 * still a zombie (a pidfd does not reap; WAITID is given WNOWAIT). The ring's reader, on the
 * delivery loop's thread, reads its status (waitid(P_PID, WNOHANG | WNOWAIT): the request is
 * given no siginfo_t, see below), calls the callback and only then reaps the child
 * (waitpid(pid, WNOHANG)), as sd-event does: until the callback ran, the pid cannot be reused,
 * so the callback (and asyncio's subprocess code, which stops signalling the pid when it learns
 * the exit) can still name the pid safely. That is why a subprocess watched by this watcher
 * holds no pidfd of its own (process.c asks the kinds table, CA__WK_NO_PIDFD). A POLL_ADD's
 * result only says "exited": the status is read the same way, and a child that somebody else
 * reaped gives -ECHILD there (255 and the warning, as for WAITID's -ECHILD). While the request
 * waits it holds the kernel's reference to the child's struct pid (WAITID's own, or the fixed
 * file's), so a pid number reused after other code reaped the child is never taken for it; only
 * in the moment between the completion and our reading of the status could such a reap and
 * reuse go unnoticed, as with every watcher that reaps by pid.
 *
 * Rings. One ring per (watcher, delivery loop): a ring's completions must be read on its loop's
 * thread, and a program usually has one loop, hence one ring. A ring is made when a loop gets
 * its first child and lives until the loop closes (a close hook) or the watcher is closed; its
 * reader is added by the thread that adds the loop's first child, and taken off on the loop's
 * thread (the reader's end of the ring) or by the loop's close (its hook, in the closing
 * thread, with nothing running on the loop); a reader still being added when the loop closes in
 * another thread is taken off by its adder (ring_kill leaves it to uring_finish).
 *
 * The thread that submitted. The kernel runs a request's completion as task work of the thread
 * that submitted it (which it interrupts like a signal would, so an epoll_wait or a poll wakes
 * up). add_child_handler submits on the calling thread: the delivery loop's, or any thread for
 * a loop that is not running (a host's loop that no C thread runs, such as Python's, is never
 * running in C terms). If that thread exits while the request waits, the kernel does not cancel
 * the request (6.7 to 6.18 at least): the child's exit queues the task work to a kernel worker,
 * whose wait finds no child of its own and ends the request with -ECHILD although nobody
 * reaped the child (other kernels may end it with -ECANCELED that we did not ask for). A
 * POLL_ADD is not cancelled either; the exit's wake-up, run by a kernel worker, ends it with
 * -ECANCELED (6.18: io_poll_check_events in a kthread; checked with a stand-alone program). So a
 * request remembers the thread that queued it (tid), and the reader does not take such an end
 * for the child's: after a -ECHILD from a request queued by another thread than its own, or a
 * -ECANCELED it did not ask for, it asks the child itself (waitid(P_PID, WNOHANG | WNOWAIT)):
 * exited, it is reported with its status; running, its request is submitted again, from the
 * reader's thread; gone, it was reaped by somebody else (255). A -ECHILD from a request that
 * the reader's own thread queued is trusted: that thread is alive. The check goes by pid, so
 * a foreign reap followed by the pid's reuse by another child of ours, in that moment, would go
 * unnoticed; it happens only after the submitter's exit.
 *
 * Sizes. 256 SQEs and 4096 CQEs per ring. More children may exit at once than the CQ holds:
 * the kernel keeps the excess on its overflow list (IORING_FEAT_NODROP, required) and liburing's
 * io_uring_peek_batch_cqe flushes that list when the ring is empty, so no exit is lost; a
 * submission refused with -EBUSY while the CQ overflows stays in the SQ and goes with the next
 * submit (the reader submits after draining the CQ).
 *
 * Kernel interface. Debian 12's liburing (2.3) has neither IORING_OP_WAITID nor
 * io_uring_prep_waitid, so the SQE is filled as the kernel's uapi defines it
 * (include/uapi/linux/io_uring.h, io_uring/waitid.c's io_waitid_prep): opcode 50, fd = the id,
 * len = the idtype, file_index = the options, addr2 = the siginfo_t * (NULL here), and addr,
 * buf_index, addr3 and waitid_flags zero. res is 0, or -ECHILD when the child was already
 * reaped by somebody else (reported as returncode 255 with a warning, as everywhere). We pass
 * no siginfo_t: the kernel would write it whenever the request ends, cancelled ones included
 * and possibly during any later system call of the submitting thread, so each request's 128
 * bytes would have to outlive it; reading the status of the zombie ourselves costs one system
 * call per exit and lets a request's memory go with its ring at any time.
 *
 * Availability: -ENOSYS when io_uring cannot be set up (not built in, kernel.io_uring_disabled,
 * seccomp's EPERM) or the kernel's opcode probe does not list WAITID (before 6.7); probed once
 * per process. CASYNCIO_NO_IO_URING=1 (what the test scripts set under valgrind, which does not
 * follow io_uring) also gives -ENOSYS.
 *
 * Locking: everything is under the core's lock, except the loop operations (add_reader,
 * remove_reader, close hooks), the callbacks and the log lines, which come after the unlock.
 * Submitting to a ring is a system call on our own object, made under the lock so that the SQ
 * has one writer at a time (remove and close may come from any thread).
 *
 * Fork: in a child made by fork() the rings are the parent's (their requests belong to the
 * parent's threads, their fixed-file tables are the parent's rings'). As for every watcher, only
 * close and unref work there; destroy unmaps our copies of the rings and closes our copies of
 * their fds, and submits nothing and updates no table.
 */
#include "internal.h"
#include "kinds.h"
#include "watcher_internal.h"

#include <liburing.h>
#include <pthread.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <fcntl.h>
#include <poll.h>
#include <stdatomic.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

/* The kernel's enum io_uring_op: IORING_OP_WAITID follows IORING_OP_READ_MULTISHOT, which
 * follows IORING_OP_SENDMSG_ZC (48). */
#define UR_OP_WAITID 50
_Static_assert(IORING_OP_SENDMSG_ZC == 48, "io_uring opcode numbering");

#define UR_SQ 256u
#define UR_CQ 4096u
#define UR_BATCH 64u
/* The most fixed-file slots a ring asks for (see "Fixed pidfds" at the top of the file). */
#define UR_TABLE_MAX 4096u
#ifndef P_PIDFD
#define P_PIDFD 3
#endif

typedef struct ur_ring ur_ring;

/* One request in flight, a POLL_ADD on the child's pidfd in fixed-file slot `slot`, or a
 * WAITID (slot -1); the kernel writes nothing of ours: see the top of the file. */
typedef struct ur_op {
    ca__wreg *r;                 /* a reference */
    ur_ring *ring;
    struct ur_op *prev, *next;   /* the ring's list */
    int slot;                    /* its fixed-file slot (the pidfd), or -1: a WAITID */
    pid_t tid;                   /* the thread that queued its request (see the top) */
    bool cancelled;              /* an ASYNC_CANCEL was submitted for it */
} ur_op;

struct ur_ring {
    struct io_uring ring;
    ca__wcore *core;             /* a reference, while the ring is on the core's list */
    ca_loop *loop;               /* not a reference: valid while !dead (the hook clears it) */
    void *hook;                  /* close hook token; NULL once it ran or was removed */
    ur_ring *next;               /* the core's list */
    ur_op *ops;
    unsigned *free_slots;        /* the fixed-file table's free slots, a stack (NULL: none) */
    unsigned nfree;
    int refs;                    /* the list's, plus a running reader; under the lock */
    enum { READER_OFF, READER_ADDING, READER_ON } reader;
    bool dead;                   /* torn down (or being): no new requests */
    bool unsubmitted;            /* SQEs wait for a submit the kernel refused (-EBUSY) */
    bool wake_posted;            /* a NOP is on its way to make the reader run (close) */
};

typedef struct ur_state {
    ur_ring *rings;
} ur_state;

static ur_state *state_of(ca__wcore *c) { return c->impl; }

/* Process-wide, for tests: requests started on each path, and the table size asked for. */
static atomic_ulong ur_polls, ur_waitids;
static atomic_long ur_table_override = -1;

void ca__uring_watcher_stats(unsigned long *polls, unsigned long *waitids)
{
    if (polls) *polls = atomic_load(&ur_polls);
    if (waitids) *waitids = atomic_load(&ur_waitids);
}

void ca__uring_set_table_size(long n) { atomic_store(&ur_table_override, n < 0 ? -1 : n); }

/* ----- submitting --------------------------------------------------------------------------- */

/* An SQE, submitting what is queued to make room if the SQ is full; NULL if even that fails
 * (the kernel refuses submissions while its CQ overflows, on kernels before 5.19). Lock held. */
static struct io_uring_sqe *get_sqe(ur_ring *g)
{
    struct io_uring_sqe *sqe = io_uring_get_sqe(&g->ring);
    if (!sqe) {
        io_uring_submit(&g->ring);
        sqe = io_uring_get_sqe(&g->ring);
    }
    if (sqe) memset(sqe, 0, sizeof *sqe);
    return sqe;
}

/* Submits the queued SQEs. -EBUSY/-EAGAIN (an overflowing CQ, or no memory for a moment) keep
 * them queued for the reader's next submit, which comes after it drained the CQ. Lock held. */
static int submit(ur_ring *g)
{
    int r;
    do {
        r = io_uring_submit(&g->ring);
    } while (r == -EINTR);
    if (r == -EBUSY || r == -EAGAIN) {
        g->unsubmitted = true;
        return 0;
    }
    if (r >= 0) g->unsubmitted = false;
    return r < 0 ? r : 0;
}

/* Queues op's WAITID (see the top of the file for the fields); *out (may be NULL) receives the
 * SQE. -EAGAIN: the SQ is full and the kernel refuses to take it. Lock held. */
static int prep_waitid(ur_ring *g, ur_op *op, struct io_uring_sqe **out)
{
    struct io_uring_sqe *sqe = get_sqe(g);
    if (!sqe) return -EAGAIN;
    sqe->opcode = UR_OP_WAITID;
    sqe->fd = (int)op->r->pid;           /* id */
    sqe->len = (unsigned)P_PID;          /* idtype */
    sqe->file_index = WEXITED | WNOWAIT; /* options */
    sqe->addr2 = 0;                      /* infop: none */
    io_uring_sqe_set_data(sqe, op);
    op->tid = gettid();
    if (out) *out = sqe;
    return 0;
}

/* Queues op's POLL_ADD (POLLIN, one-shot) on its fixed-file slot; as prep_waitid. Lock held. */
static int prep_poll(ur_ring *g, ur_op *op, struct io_uring_sqe **out)
{
    struct io_uring_sqe *sqe = get_sqe(g);
    if (!sqe) return -EAGAIN;
    io_uring_prep_poll_add(sqe, op->slot, POLLIN);
    sqe->flags |= IOSQE_FIXED_FILE;
    io_uring_sqe_set_data(sqe, op);
    op->tid = gettid();
    if (out) *out = sqe;
    return 0;
}

static int prep_op(ur_ring *g, ur_op *op, struct io_uring_sqe **out)
{
    return op->slot >= 0 ? prep_poll(g, op, out) : prep_waitid(g, op, out);
}

/* io_uring_register(2) without liburing, whose io_uring_register_files_sparse raises the
 * process's soft RLIMIT_NOFILE when the kernel says EMFILE: -errno or the result. */
static int ur_register(ur_ring *g, unsigned opcode, void *arg, unsigned nr)
{
    long r = syscall(__NR_io_uring_register, g->ring.ring_fd, opcode, arg, nr);
    return r < 0 ? -errno : (int)r;
}

/* Puts fd into fixed-file slot `slot` of g's table, in place of the file it held. Lock held. */
static int slot_set(ur_ring *g, unsigned slot, int fd)
{
    struct io_uring_files_update up;
    memset(&up, 0, sizeof up);
    up.offset = slot;
    up.fds = (uint64_t)(uintptr_t)&fd;
    int r;
    do {
        r = ur_register(g, IORING_REGISTER_FILES_UPDATE, &up, 1);
    } while (r == -EINTR);
    return r == 1 ? 0 : r < 0 ? r : -EIO;
}

/* The ring's sparse fixed-file table, registered when the ring is made: min(RLIMIT_NOFILE's
 * soft limit, UR_TABLE_MAX) slots (the kernel refuses more than that limit with EMFILE). None
 * (every child gets a WAITID) when that fails. Lock held. */
static void table_register(ur_ring *g)
{
    long want = atomic_load(&ur_table_override);
    if (want < 0) {
        struct rlimit rl;
        if (getrlimit(RLIMIT_NOFILE, &rl) != 0) return;
        want = rl.rlim_cur == RLIM_INFINITY || rl.rlim_cur > UR_TABLE_MAX ? (long)UR_TABLE_MAX
                                                                           : (long)rl.rlim_cur;
    }
    if (want <= 0 || want > (long)UR_TABLE_MAX) return;
    unsigned *fs = malloc((size_t)want * sizeof *fs);
    if (!fs) return;
    struct io_uring_rsrc_register rr;
    memset(&rr, 0, sizeof rr);
    rr.nr = (unsigned)want;
    rr.flags = IORING_RSRC_REGISTER_SPARSE;
    if (ur_register(g, IORING_REGISTER_FILES2, &rr, sizeof rr) < 0) {
        free(fs);
        return;
    }
    for (unsigned i = 0; i < (unsigned)want; i++) fs[i] = (unsigned)want - 1 - i;
    g->free_slots = fs;
    g->nfree = (unsigned)want;
}

/* Installs pid's pidfd in a free slot of g's table (op->slot); false when it cannot: no table
 * or no free slot, pidfd_open fails (ENOSYS, EMFILE, ESRCH: reaped already), or pid is not our
 * child (which WAITID reports at once, as before). The pidfd is opened and closed with raw
 * system calls (ThreadSanitizer need not know the number), and open only for this moment, so
 * the process's fds do not grow with its children. Lock held. */
static bool slot_take(ur_ring *g, ur_op *op)
{
    if (g->nfree == 0) return false;
    int fd = (int)syscall(SYS_pidfd_open, op->r->pid, 0);
    if (fd < 0) return false;
    siginfo_t si;
    memset(&si, 0, sizeof si);
    int e;
    do {
        e = waitid((idtype_t)P_PIDFD, (id_t)fd, &si, WEXITED | WNOHANG | WNOWAIT);
    } while (e < 0 && errno == EINTR);
    unsigned slot = g->free_slots[g->nfree - 1];
    if (e == 0) e = slot_set(g, slot, fd);
    syscall(SYS_close, fd);
    if (e != 0) return false;
    g->nfree--;
    op->slot = (int)slot;
    return true;
}

/* Puts op's slot back on the free list (its request is over). The slot is not emptied, which
 * would cost a system call per child: the next child's pidfd replaces the old one there (an
 * update of an occupied slot drops the file it held), and a dead ring's table goes with it. A
 * stale pidfd holds only its struct pid, not the pid's number. Lock held. */
static void slot_put(ur_op *op)
{
    ur_ring *g = op->ring;
    if (op->slot < 0) return;
    unsigned slot = (unsigned)op->slot;
    op->slot = -1;
    if (!g->dead && g->free_slots) g->free_slots[g->nfree++] = slot;
}

/* Asks the kernel to end op's request; its completion (-ECANCELED, or the exit if it won the
 * race) still comes and frees op. The cancel's own completion carries user_data 0. Lock held. */
static void cancel_op(ur_op *op)
{
    if (op->cancelled || op->ring->dead) return;
    struct io_uring_sqe *sqe = get_sqe(op->ring);
    if (!sqe) return; /* the exit or the ring's end frees op; r is unregistered already */
    op->cancelled = true;
    sqe->opcode = IORING_OP_ASYNC_CANCEL;
    sqe->fd = -1;
    sqe->addr = (uint64_t)(uintptr_t)op;
    io_uring_sqe_set_data64(sqe, 0);
    submit(op->ring);
}

static void op_unlink(ur_op *op)
{
    ur_ring *g = op->ring;
    if (op->prev) op->prev->next = op->next;
    else g->ops = op->next;
    if (op->next) op->next->prev = op->prev;
    op->prev = op->next = NULL;
}

/* Frees op (its request is over). Lock held. */
static void op_free(ca__wcore *c, ur_op *op)
{
    slot_put(op);
    op_unlink(op);
    if (op->r->kdata == op) op->r->kdata = NULL;
    ca__wreg_unref(c, op->r);
    free(op);
}

/* ----- rings ---------------------------------------------------------------------------------- */

static void ring_ready(void *arg);
static void ring_hook(void *arg);

/* Unmaps ring and closes its fd, as io_uring_queue_exit does (our rings use neither SQE128,
 * registered ring fds nor application memory), but through libc: liburing maps, unmaps and
 * closes with raw system calls, which ThreadSanitizer does not see, so that a later ring mapped
 * at the same address (or an fd given the same number) would look, to it, like memory (or an
 * fd) shared by the threads that used the old and the new one without synchronisation. The
 * intercepted munmap and close make it forget the old ones. */
static void ring_exit(struct io_uring *ring)
{
    struct io_uring_sq *sq = &ring->sq;
    struct io_uring_cq *cq = &ring->cq;
    munmap(sq->sqes, (size_t)*sq->kring_entries * sizeof(struct io_uring_sqe));
    munmap(sq->ring_ptr, sq->ring_sz);
    if (cq->ring_ptr && cq->ring_ptr != sq->ring_ptr) munmap(cq->ring_ptr, cq->ring_sz);
    close(ring->ring_fd);
    ring->ring_fd = -1;
}

#if defined(__SANITIZE_THREAD__)
#define UR_TSAN 1
#elif defined(__has_feature)
#if __has_feature(thread_sanitizer)
#define UR_TSAN 1
#endif
#endif

/* ThreadSanitizer builds: the other half of ring_exit's care. io_uring_setup, a raw system call,
 * creates the ring's fd unseen, so ThreadSanitizer still takes that number for the file that
 * last had it: our reader's add and removal (epoll_ctl) would look like uses, without
 * synchronisation, of an fd that another thread closed. The ring moves onto a number that an
 * intercepted call (eventfd) created in this thread, with raw dup3 and close (its mappings do
 * not depend on the number). Other builds keep the ring's own fd. Both are close-on-exec. */
static int ring_fd_adopt(struct io_uring *ring)
{
#ifdef UR_TSAN
    int fd = eventfd(0, EFD_CLOEXEC);
    if (fd < 0) return -errno;
    if (syscall(SYS_dup3, ring->ring_fd, fd, O_CLOEXEC) < 0) {
        int e = -errno;
        close(fd);
        return e;
    }
    syscall(SYS_close, ring->ring_fd);
    ring->ring_fd = ring->enter_ring_fd = fd;
#else
    (void)ring;
#endif
    return 0;
}

static void ring_unref(ur_ring *g)
{
    if (--g->refs > 0) return;
    ring_exit(&g->ring);
    free(g->free_slots);
    free(g);
}

/* Takes ring g out of service: no new requests, and the registrations still waiting on it are
 * told as when a loop closes. Its requests end when its fd is closed (ring_unref); their
 * completions are never read, so their ops go now. Lock held; *reader and *hook tell the
 * caller what to remove from the loop after unlocking. */
static void ring_kill(ca__wcore *c, ur_ring *g, ca__wlog *q, bool *reader, void **hook)
{
    *reader = false;
    *hook = NULL;
    if (g->dead) return;
    g->dead = true;
    /* A reader that another thread is adding right now is that thread's to take off again
     * (uring_finish sees the ring dead when add_reader returns): removed here, before the
     * add, it would stay on the loop after the ring's fd is closed. */
    *reader = g->reader == READER_ON;
    if (g->reader == READER_ON) g->reader = READER_OFF;
    *hook = g->hook;
    g->hook = NULL;
    for (ur_op *op = g->ops; op; op = op->next) {
        ca__wreg *r = op->r;
        if (r->registered && r->state == CA__W_WAITING) {
            /* As for Pidfd: it stays registered, so that remove answers 1 (the callback will
             * never come, the remover reaps the child); a new handler for the pid replaces
             * it. An internal registration's owner hears of it now. */
            ca__wlog_add(q, CA_LOG_DEBUG,
                         "Loop that handles pid %d is closed while the child runs: "
                         "its exit will not be reported",
                         (int)r->pid);
            r->pidfd_lost = true;
            if (r->internal) ca__wreg_unregister(c, r);
        }
    }
    while (g->ops) op_free(c, g->ops);
    for (ur_ring **p = &state_of(c)->rings; *p; p = &(*p)->next) {
        if (*p == g) {
            *p = g->next;
            break;
        }
    }
}

/* Kills g: removes the reader (and the hook, unless it is running), then drops the list's
 * reference to the ring (the last one frees it, which ends its requests and closes its fd:
 * after the reader is off). On the loop's thread (ring_ready), or in the loop's close (in_hook:
 * the closing thread, with nothing running on the loop); a reader that another thread is still
 * adding is left to that thread (ring_kill). Lock NOT held; the caller holds a reference to the
 * core. */
static void ring_end(ca__wcore *c, ur_ring *g, bool in_hook)
{
    ca__wlog q = {0};
    bool reader;
    void *hook;
    ca__wcore_lock(c);
    ca_loop *loop = g->loop;
    int fd = g->ring.ring_fd; /* open until our reference goes, below */
    bool was_dead = g->dead;
    ring_kill(c, g, &q, &reader, &hook);
    g->loop = NULL;
    bool list_ref = g->core != NULL;
    g->core = NULL;
    ca__wcore_unlock(c);
    ca__wlog_flush(&q);
    if (was_dead) return;
    if (loop && reader) ca_loop_remove_reader(loop, fd);
    if (loop && hook && !in_hook) ca__loop_remove_close_hook(loop, hook);
    ca__wcore_lock(c);
    if (list_ref) ring_unref(g);
    ca__wcore_unlock(c);
    if (list_ref) ca__wcore_unref(c); /* the list's reference to the core */
}

static void ring_hook(void *arg)
{
    ur_ring *g = arg;
    ca__wcore *c = g->core;
    if (!c) return; /* ended already (its hook removal raced with the close) */
    ca__wcore_ref(c);
    ring_end(c, g, true);
    ca__wcore_unref(c);
}

/* The ring for loop, made if needed (its reader is added by the caller, after unlocking). Lock
 * held; on loop's thread. */
static int ring_get(ca__wcore *c, ca_loop *loop, ur_ring **out)
{
    for (ur_ring *g = state_of(c)->rings; g; g = g->next) {
        if (g->loop == loop && !g->dead) {
            *out = g;
            return 0;
        }
    }
    ur_ring *g = calloc(1, sizeof *g);
    if (!g) return -ENOMEM;
    struct io_uring_params p;
    memset(&p, 0, sizeof p);
    /* No COOP_TASKRUN or DEFER_TASKRUN: the completion must wake the loop's thread wherever it
     * sleeps (epoll_wait, poll, another ring), not wait for it to enter this ring. */
    p.flags = IORING_SETUP_CQSIZE | IORING_SETUP_CLAMP;
    p.cq_entries = UR_CQ;
    int r = io_uring_queue_init_params(UR_SQ, &g->ring, &p);
    if (r < 0) {
        free(g);
        return r == -EPERM ? -ENOSYS : r;
    }
    if ((r = ring_fd_adopt(&g->ring)) < 0) {
        ring_exit(&g->ring);
        free(g);
        return r;
    }
    g->hook = ca__loop_add_close_hook(loop, ring_hook, g);
    if (!g->hook) {
        ring_exit(&g->ring);
        free(g);
        return -ENOMEM;
    }
    table_register(g);
    g->core = c;
    g->loop = loop;
    g->refs = 1;
    ca__wcore_ref(c);
    g->next = state_of(c)->rings;
    state_of(c)->rings = g;
    *out = g;
    return 0;
}

/* Whether pid, our child, has exited, without reaping it: 1 (its returncode in *rc), 0 still
 * running, -ECHILD reaped by somebody else. */
static int peek_exit(pid_t pid, int *rc)
{
    siginfo_t si;
    memset(&si, 0, sizeof si);
    int e;
    do {
        e = waitid(P_PID, (id_t)pid, &si, WEXITED | WNOHANG | WNOWAIT);
    } while (e < 0 && errno == EINTR);
    if (e < 0) return -ECHILD;
    if (si.si_pid != pid) return 0;
    *rc = si.si_code == CLD_EXITED ? si.si_status : -si.si_status;
    return 1;
}

/* An exit read from the ring, to deliver after unlocking. */
typedef struct ur_exit {
    ca__wreg *r;                 /* a reference */
    int rc;
    bool reap;                   /* a zombie: reap it after the callback */
} ur_exit;

/* The ring's fd is readable: completions are there. On the delivery loop's thread.
 *
 * It works in rounds of at most UR_BATCH completions, with no allocation: a round reads its
 * completions into an array on the stack and consumes them (io_uring_cq_advance), then unlocks
 * and delivers them, callback and reap, before the next round reads more. Delivery thus never
 * depends on memory: an exit that the ring reported is always delivered (a failed allocation
 * here used to drop it and leave the child a zombie). Between rounds the callbacks may close
 * the watcher or kill the ring: each round looks again. */
static void ring_ready(void *arg)
{
    ur_ring *g = arg;
    ca__wcore *c = g->core;
    if (!c) return;
    ca__wcore_ref(c);
    ca__wcore_lock(c);
    g->refs++;
    bool closed;
    for (;;) {
        ca__wlog q = {0};
        ur_exit ex[UR_BATCH];
        size_t nex = 0;
        unsigned n = 0;
        closed = c->closed;
        if (!g->dead) {
            struct io_uring_cqe *cqes[UR_BATCH];
            n = io_uring_peek_batch_cqe(&g->ring, cqes, UR_BATCH);
            for (unsigned i = 0; i < n; i++) {
                ur_op *op = io_uring_cqe_get_data(cqes[i]);
                int res = cqes[i]->res;
                if (!op) continue; /* a cancel's or a wake-up's own completion */
                ca__wreg *r = op->r;
                bool live = r->registered && r->state == CA__W_WAITING;
                if (op->slot >= 0 && res >= 0) res = 0; /* the pidfd says: exited */
                int rc = 255;
                bool reap = false;
                /* Ask the child itself (see "The thread that submitted"): for its status when
                 * the request found it exited; whether it still runs when the request ended
                 * without its exit because the thread that submitted it is gone. */
                if (live && (res == 0 || (res == -ECANCELED && !op->cancelled) ||
                             (res == -ECHILD && op->tid != gettid()))) {
                    int k = peek_exit(r->pid, &rc);
                    if (k > 0) {
                        res = 0;
                        reap = true;
                    } else if (k < 0 || res == 0) {
                        res = -ECHILD; /* reaped by somebody else */
                    } else if (!closed && prep_op(g, op, NULL) == 0) {
                        continue; /* still running: asked again, from this thread */
                    }
                }
                if (live) {
                    if (res == -ECHILD) {
                        ca__wlog_add(&q, CA_LOG_WARNING,
                                     "Unknown child process pid %d, will report returncode 255",
                                     (int)r->pid);
                    } else if (res != 0) {
                        ca__wlog_add(&q, CA_LOG_ERROR,
                                     "io_uring waitid for pid %d failed (%s): "
                                     "will report returncode 255",
                                     (int)r->pid, ca_strerror(res));
                    }
                    /* At most one exit per completion, n <= UR_BATCH: ex has room. */
                    ca_child_fn cb;
                    void *cbarg;
                    ca__wreg_ref(r);
                    ca__wreg_take(c, r, &cb, &cbarg);
                    r->rc = rc;
                    ex[nex++] = (ur_exit){.r = r, .rc = rc, .reap = reap};
                }
                op_free(c, op);
            }
            io_uring_cq_advance(&g->ring, n);
        }
        if (n == 0) break; /* the CQ is empty (its overflow flushed), or the ring is dead */
        ca__wcore_unlock(c);
        ca__wlog_flush(&q);
        /* The callbacks, each followed by its child's reap (see the top of the file). cb and
         * arg cannot change any more: the registration left the table in ca__wreg_take. */
        for (size_t i = 0; i < nex; i++) {
            ca__wreg *r = ex[i].r;
            r->cb(r->pid, ex[i].rc, r->arg);
            int rc;
            if (ex[i].reap) ca__wait_nohang(r->pid, &rc);
        }
        ca__wcore_lock(c);
        for (size_t i = 0; i < nex; i++) ca__wreg_unref(c, ex[i].r);
    }
    if (!g->dead && (g->unsubmitted || io_uring_sq_ready(&g->ring))) submit(g);
    g->wake_posted = false;
    bool end = closed && !g->dead && g->ops == NULL;
    ring_unref(g);
    ca__wcore_unlock(c);
    /* The watcher was closed and this ring has nothing left in flight: it goes now, on its
     * loop's thread (see uring_close). */
    if (end) ring_end(c, g, false);
    ca__wcore_unref(c);
}

/* ----- the ops ---------------------------------------------------------------------------- */

/* Cancels r (remove, take_back, close): it leaves the table, and its request is cancelled.
 * The child is not reaped: whoever removed it does that. Lock held. */
static void uring_cancel(ca__wcore *c, ca__wreg *r, ca__wlog *q)
{
    (void)q; /* nothing to do after the unlock: the cancel is an SQE, not a loop op */
    ca__wreg_unregister(c, r);
    ur_op *op = r->kdata;
    if (op) cancel_op(op);
}

/* The kind's start (lock held): one WAITID request for the new registration, on the ring of
 * the delivery loop (the caller's own: CA__WKIND_OWN_THREAD); a ring whose reader is not on
 * the loop yet has it added by uring_finish, after the unlock. */
static int uring_start(ca__wcore *c, ca__wadd *a, ca__wlog *q)
{
    (void)q;
    ca__wreg *r = a->r;
    ur_ring *g = NULL;
    ur_op *op = NULL;
    /* The loop was open at the add's check (made without the lock: a custom loop's is_closed
     * may be user code); only its own thread, this one, closes it. */
    int err = ring_get(c, a->loop, &g);
    if (err == 0 && !(op = calloc(1, sizeof *op))) err = -ENOMEM;
    if (err < 0) {
        ca__wreg_unregister_quiet(c, r); /* the caller learns it from err */
        return err;
    }
    ca__wreg_ref(r); /* the request's */
    op->r = r;
    op->ring = g;
    op->next = g->ops;
    if (g->ops) g->ops->prev = op;
    g->ops = op;
    r->kdata = op;
    op->slot = -1;
    bool poll = slot_take(g, op);
    atomic_fetch_add(poll ? &ur_polls : &ur_waitids, 1);
    struct io_uring_sqe *sqe = NULL;
    err = prep_op(g, op, &sqe);
    if (err == 0 && (err = submit(g)) < 0) {
        /* The kernel did not take it, but it is in the SQ, where the next submit would find
         * it: make it a NOP that names nothing (only io_uring_enter reads SQEs, and that is
         * under our lock). */
        sqe->opcode = IORING_OP_NOP;
        io_uring_sqe_set_data64(sqe, 0);
        g->unsubmitted = true;
    }
    if (err < 0) {
        ca__wreg_unregister_quiet(c, r); /* the caller learns it from err */
        op_free(c, op);
        return err;
    }
    if (g->reader != READER_OFF) return 0;
    g->reader = READER_ADDING;
    g->refs++; /* keeps g while we add its reader */
    a->kstate = g;
    a->kfd = g->ring.ring_fd;
    return CA__WSTART_FINISH;
}

/* The kind's finish (lock NOT held): puts the ring's reader on the delivery loop. */
static int uring_finish(ca__wcore *c, ca__wadd *a, ca__wlog *q)
{
    (void)q;
    ur_ring *g = a->kstate;
    int fd = a->kfd;
    int err = ca_loop_add_reader(a->loop, fd, ring_ready, g);
    ca__wcore_lock(c);
    g->reader = err == 0 && !g->dead ? READER_ON : READER_OFF;
    if (err == 0 && g->dead) {
        /* The ring was ended (its loop closing in another thread) while we added its reader:
         * ring_end left the reader to us. Off again, by the thread that put it on, before our
         * reference (perhaps the last) closes the fd. */
        ca__wcore_unlock(c);
        ca_loop_remove_reader(a->loop, fd);
        ca__wcore_lock(c);
    }
    if (err < 0 && !g->dead) {
        /* Nobody would read this ring: the child is not watched (it is the only one here,
         * as only this thread adds to this loop's ring). */
        ca__wreg *r = ca__wtable_get(c, a->pid);
        if (r && r->kdata && ((ur_op *)r->kdata)->ring == g) {
            ca__wreg_ref(r);
            ca__wreg_unregister_quiet(c, r);
            cancel_op(r->kdata);
            ca__wreg_unref(c, r);
        }
    }
    ring_unref(g);
    ca__wcore_unlock(c);
    return err;
}

/* Cancels every registration and asks each ring's reader to end its ring on its loop's thread
 * (a NOP completion makes it run): only that thread may remove the reader. A ring whose loop
 * never runs again goes with the loop's close. */
static int uring_close(ca_child_watcher *w)
{
    ca__wcore *c = ca__wcore_of(w);
    ca__wcore_lock(c);
    c->closed = true;
    for (size_t i = 0; i < c->cap;) {
        ca__wreg *r = c->slots[i];
        if (!r) {
            i++;
            continue;
        }
        ca__wreg_ref(r);
        uring_cancel(c, r, NULL); /* takes r out of slot i */
        ca__wreg_unref(c, r);
    }
    for (ur_ring *g = state_of(c)->rings; g; g = g->next) {
        if (g->dead || g->wake_posted) continue;
        struct io_uring_sqe *sqe = get_sqe(g);
        if (!sqe) continue; /* the cancels' completions wake the reader anyway */
        sqe->opcode = IORING_OP_NOP;
        io_uring_sqe_set_data64(sqe, 0);
        g->wake_posted = true;
        submit(g);
    }
    bool keep = c->keeps_sigchld;
    c->keeps_sigchld = false;
    ca__wcore_unlock(c);
    if (keep) ca__sigchld_keep_release();
    return 0;
}

static void uring_destroy(ca_child_watcher *w)
{
    ca__wcore *c = ca__wcore_of(w);
    if (!ca__child_watcher_forked(w)) {
        ca__wcore_unref(c);
        return;
    }
    /* A child of fork(): the requests are the parent's. Free our memory and our copies of the
     * rings' mappings and fds; the registrations that only a request still held go too. */
    ur_state *s = state_of(c);
    while (s && s->rings) {
        ur_ring *g = s->rings;
        s->rings = g->next;
        while (g->ops) {
            ur_op *op = g->ops;
            g->ops = op->next;
            if (!op->r->registered && !op->r->bind) free(op->r);
            free(op);
        }
        ring_exit(&g->ring);
        free(g->free_slots);
        free(g);
    }
    ca__wcore_free_forked(c);
}

static const ca__wkind uring_kind = {
    .name = "uring",
    .flags = CA__WKIND_OWN_THREAD | CA__WKIND_UNBOUND | CA__WKIND_KEEP_LOOP,
    .start = uring_start,
    .finish = uring_finish,
    .cancel = uring_cancel,
    .close = uring_close,
    .destroy = uring_destroy,
};

/* ----- availability ----------------------------------------------------------------------- */

static pthread_once_t probe_once = PTHREAD_ONCE_INIT;
static int probe_result;

/* One small ring, asked for its opcodes. EPERM (seccomp, kernel.io_uring_disabled) and ENOSYS
 * mean "not here"; so does a kernel without IORING_FEAT_NODROP or without WAITID. */
static void probe(void)
{
    struct io_uring ring;
    struct io_uring_params p;
    memset(&p, 0, sizeof p);
    int r = io_uring_queue_init_params(2, &ring, &p);
    if (r < 0) {
        probe_result = r == -ENOMEM ? -ENOMEM : -ENOSYS;
        return;
    }
    struct io_uring_probe *pr = io_uring_get_probe_ring(&ring);
    bool ok = pr && io_uring_opcode_supported(pr, UR_OP_WAITID) &&
              io_uring_opcode_supported(pr, IORING_OP_ASYNC_CANCEL) &&
              (ring.features & IORING_FEAT_NODROP);
    if (pr) io_uring_free_probe(pr);
    io_uring_queue_exit(&ring);
    probe_result = ok ? 0 : -ENOSYS;
}

int ca__uring_watcher_available(void)
{
    const char *no = getenv("CASYNCIO_NO_IO_URING");
    if (no && *no && strcmp(no, "0") != 0) return -ENOSYS;
    pthread_once(&probe_once, probe);
    return probe_result;
}

int ca_uring_child_watcher_new(ca_child_watcher **out)
{
    if (!out) return -EINVAL;
    int err = ca__uring_watcher_available();
    if (err < 0) return err;
    ca__wcore *c;
    if ((err = ca__wcore_new(&c)) < 0) return err;
    if (!(c->impl = calloc(1, sizeof(ur_state)))) {
        ca__wcore_unref(c);
        return -ENOMEM;
    }
    err = ca__child_watcher_make(&uring_kind, c, out);
    if (err < 0) {
        ca__wcore_unref(c);
        return err;
    }
    c->keeps_sigchld = true;
    ca__sigchld_keep_acquire();
    return 0;
}
