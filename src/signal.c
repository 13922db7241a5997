/*
 * The process-wide signal fan-out. One sigaction per signal, installed when the first slot
 * wants that signal and restored when the last one stops wanting it. A slot is an eventfd
 * owned by somebody else (a loop's wakeup fd, MultiLoop's reaping thread) plus two masks:
 * the signals it wants and the signals that arrived since it last looked.
 *
 * The handler is async-signal-safe: it only does atomic loads and fetch_or on lock-free
 * 64-bit atomics and write(2), and it saves errno. It never takes a lock, so slot memory is a
 * fixed static array (never freed) and a slot's fd may be closed by its owner only after
 * ca__sigslot_free() has waited for every handler that might still write to it: the handler
 * counts itself in `in_handler`, and free clears the slot's masks before it waits, so a
 * handler that starts later sees nothing to do (both sides use sequentially consistent
 * atomics).
 *
 * The handler is installed with SA_SIGINFO, and for SIGCHLD it also records the pid of the child
 * whose exit raised the signal (si_pid) in a small broadcast ring of hints, which the O(n)
 * pollers (Safe, MultiLoop) check by pid before they walk the list of children
 * (ca__sigchld_hints). A hint is only a hint: SIGCHLDs coalesce, so an exit may come without one,
 * and a consumer that falls more than CA__HINTS behind loses the oldest.
 */
#include "internal.h"

#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <string.h>
#include <unistd.h>

#define CA__MAX_SLOTS 1024

struct ca__sigslot {
    atomic_int efd;
    _Atomic uint64_t wanted;
    _Atomic uint64_t pending;
    bool used; /* under sig_lock */
};

static struct ca__sigslot slots[CA__MAX_SLOTS];
static atomic_int high_water;  /* slots [0, high_water) may be in use */
static atomic_int in_handler;
static pthread_mutex_t sig_lock = PTHREAD_MUTEX_INITIALIZER;
static int wanters[65];               /* per signal: number of slots that want it */
static struct sigaction saved[65];    /* the disposition before our handler */
static pthread_once_t atfork_once = PTHREAD_ONCE_INIT;

_Static_assert(ATOMIC_LLONG_LOCK_FREE == 2, "the signal handler needs lock-free 64-bit atomics");

static void sig_prepare(void) { pthread_mutex_lock(&sig_lock); }
static void sig_parent(void) { pthread_mutex_unlock(&sig_lock); }
static void sig_child(void)
{
    /* Only the forking thread exists in the child: no handler of another thread can be
     * running, whatever the counter said at the moment of the fork. */
    atomic_store(&in_handler, 0);
    pthread_mutex_unlock(&sig_lock);
}
static void setup_atfork(void) { pthread_atfork(sig_prepare, sig_parent, sig_child); }
static void fanout_handler(int sig);
static void fanout_action(int sig, siginfo_t *si, void *uc);

/* Whether a disposition is the library's handler. */
static bool is_ours(const struct sigaction *sa)
{
    return (sa->sa_flags & SA_SIGINFO) && sa->sa_sigaction == fanout_action;
}

/* The SIGCHLD hints: entry s % CA__HINTS holds hint number s as ((s + 1) mod 2^32) << 32 | pid
 * (the tag tells a reader whether the entry still holds hint s: a zero entry never does). The
 * handler takes a number with fetch_add and then stores the entry: a reader that comes between
 * the two sees the old tag and skips the hint, which only costs a walk. Readers never write, so
 * no consumer takes a hint away from another. */
#define CA__HINTS 64
static _Atomic uint64_t hint_next;
static _Atomic uint64_t hints[CA__HINTS];

static void hint_add(pid_t pid)
{
    uint64_t s = atomic_fetch_add(&hint_next, 1);
    atomic_store(&hints[s % CA__HINTS], (uint64_t)(uint32_t)(s + 1) << 32 | (uint32_t)pid);
}

uint64_t ca__sigchld_hint_seq(void) { return atomic_load(&hint_next); }

int ca__sigchld_hints(uint64_t *seq, pid_t *pids, int max)
{
    uint64_t end = atomic_load(&hint_next);
    uint64_t s = *seq;
    if (end - s > CA__HINTS) s = end - CA__HINTS; /* the older ones are overwritten */
    if (end - s > (uint64_t)max) s = end - (uint64_t)max; /* the newest are the likeliest */
    int n = 0;
    for (; s != end; s++) {
        uint64_t v = atomic_load(&hints[s % CA__HINTS]);
        if ((uint32_t)(v >> 32) == (uint32_t)(s + 1) && (pid_t)(uint32_t)v > 0)
            pids[n++] = (pid_t)(uint32_t)v;
    }
    *seq = end;
    return n;
}

bool ca__signal_valid(int sig)
{
    if (sig < 1 || sig >= NSIG || sig > 64) return false;
    switch (sig) {
    case SIGKILL:
    case SIGSTOP: /* cannot be caught (asyncio refuses them too) */
    case SIGSEGV:
    case SIGBUS:
    case SIGFPE:
    case SIGILL:
        /* Synchronous faults: the handler would only set a flag and return to the faulting
         * instruction, which faults again, forever (issue 16). */
        return false;
    default:
        return true;
    }
}

static atomic_ulong sigchld_notified;

void ca_sigchld_notify(void)
{
    /* What the library's own SIGCHLD handler does: async-signal-safe (atomics and write(2)). */
    atomic_fetch_add(&sigchld_notified, 1);
    fanout_handler(SIGCHLD);
}

unsigned long ca__sigchld_notified(void) { return atomic_load(&sigchld_notified); }

bool ca__sigchld_handler_installed(void)
{
    struct sigaction cur;
    if (sigaction(SIGCHLD, NULL, &cur) < 0) return true; /* cannot tell: assume it is */
    return is_ours(&cur);
}

/* The handler as installed: SIGCHLD's hint, then the fan-out. si_code tells an exit (a child's
 * si_pid) from a kill(2) or sigqueue(3) by a process (the sender's pid: no hint). */
static void fanout_action(int sig, siginfo_t *si, void *uc)
{
    (void)uc;
    if (sig == SIGCHLD && si &&
        (si->si_code == CLD_EXITED || si->si_code == CLD_KILLED || si->si_code == CLD_DUMPED) &&
        si->si_pid > 0)
        hint_add(si->si_pid);
    fanout_handler(sig);
}

static void fanout_handler(int sig)
{
    int saved_errno = errno;
    atomic_fetch_add(&in_handler, 1);
    uint64_t bit = UINT64_C(1) << (sig - 1);
    int n = atomic_load(&high_water);
    for (int i = 0; i < n; i++) {
        struct ca__sigslot *s = &slots[i];
        if (!(atomic_load(&s->wanted) & bit)) continue;
        atomic_fetch_or(&s->pending, bit);
        int fd = atomic_load(&s->efd);
        if (fd >= 0) {
            uint64_t one = 1;
            ssize_t w = write(fd, &one, sizeof one);
            (void)w; /* EAGAIN: the counter is saturated, the reader wakes anyway */
        }
    }
    atomic_fetch_sub(&in_handler, 1);
    errno = saved_errno;
}

int ca__sigslot_new(int efd, ca__sigslot **out)
{
    if (efd < 0 || !out) return -EINVAL;
    pthread_once(&atfork_once, setup_atfork);
    pthread_mutex_lock(&sig_lock);
    int hw = atomic_load(&high_water);
    for (int i = 0; i < CA__MAX_SLOTS; i++) {
        struct ca__sigslot *s = &slots[i];
        if (s->used) continue;
        s->used = true;
        atomic_store(&s->wanted, 0);
        atomic_store(&s->pending, 0);
        atomic_store(&s->efd, efd);
        if (i >= hw) atomic_store(&high_water, i + 1);
        pthread_mutex_unlock(&sig_lock);
        *out = s;
        return 0;
    }
    pthread_mutex_unlock(&sig_lock);
    return -ENOSPC;
}

int ca__sigslot_watch(ca__sigslot *s, int sig)
{
    if (!s || !ca__signal_valid(sig)) return -EINVAL;
    uint64_t bit = UINT64_C(1) << (sig - 1);
    pthread_mutex_lock(&sig_lock);
    if (atomic_load(&s->wanted) & bit) {
        pthread_mutex_unlock(&sig_lock);
        return 0;
    }
    if (wanters[sig] == 0) {
        struct sigaction sa;
        memset(&sa, 0, sizeof sa);
        sa.sa_sigaction = fanout_action;
        sigfillset(&sa.sa_mask);
        sa.sa_flags = SA_SIGINFO | SA_RESTART | (sig == SIGCHLD ? SA_NOCLDSTOP : 0);
        if (sigaction(sig, &sa, &saved[sig]) < 0) {
            int e = errno;
            pthread_mutex_unlock(&sig_lock);
            return e == EINVAL ? -EINVAL : -e;
        }
    }
    wanters[sig]++;
    atomic_fetch_or(&s->wanted, bit);
    pthread_mutex_unlock(&sig_lock);
    return 0;
}

/* Under sig_lock. */
static void unwatch_locked(struct ca__sigslot *s, int sig)
{
    uint64_t bit = UINT64_C(1) << (sig - 1);
    if (!(atomic_load(&s->wanted) & bit)) return;
    atomic_fetch_and(&s->wanted, ~bit);
    if (--wanters[sig] == 0) {
        /* Put the old disposition back only over our own handler: one that other code
         * installed after ours (a host's, a library's) is theirs and stays (issue 16, item 8). */
        struct sigaction cur;
        if (sigaction(sig, NULL, &cur) == 0 && is_ours(&cur))
            sigaction(sig, &saved[sig], NULL);
    }
}

void ca__sigslot_unwatch(ca__sigslot *s, int sig)
{
    if (!s || !ca__signal_valid(sig)) return;
    pthread_mutex_lock(&sig_lock);
    unwatch_locked(s, sig);
    pthread_mutex_unlock(&sig_lock);
}

uint64_t ca__sigslot_take(ca__sigslot *s)
{
    return s ? atomic_exchange(&s->pending, 0) : 0;
}

void ca__sigslot_repend(ca__sigslot *s, int sig)
{
    if (!s || !ca__signal_valid(sig)) return;
    atomic_fetch_or(&s->pending, UINT64_C(1) << (sig - 1));
    uint64_t one = 1;
    ssize_t w = write(atomic_load(&s->efd), &one, sizeof one);
    (void)w;
}

bool ca__sigslot_pending(ca__sigslot *s)
{
    return atomic_load_explicit(&s->pending, memory_order_relaxed) != 0;
}

void ca__sigslot_free(ca__sigslot *s, bool forked)
{
    (void)forked; /* dispositions are per process: restoring ours in a child is right too */
    if (!s) return;
    pthread_mutex_lock(&sig_lock);
    for (int sig = 1; sig <= 64; sig++)
        if (ca__signal_valid(sig)) unwatch_locked(s, sig);
    atomic_store(&s->efd, -1);
    /* Wait for any handler that might have read the old fd before we cleared it. */
    while (atomic_load(&in_handler) > 0) sched_yield();
    atomic_store(&s->pending, 0);
    s->used = false;
    pthread_mutex_unlock(&sig_lock);
}
