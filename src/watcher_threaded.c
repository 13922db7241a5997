/*
 * ThreadedChildWatcher: one waiting thread per child, blocked in waitid(pid). The exit is posted
 * to the delivery loop with call_soon_threadsafe and the callback runs there, as in asyncio 3.11.
 *
 * Two kinds of thread, so that a waiting thread costs almost nothing:
 * - The waiting thread only waits: waitid(P_PID, WEXITED | WNOWAIT), which does not reap, then
 *   it hands its registration to the posting thread (a lock-free list and a futex wake) and
 *   exits. On x86-64 it is a raw kernel thread (raw.h), not a glibc thread: no TLS, no thread
 *   descriptor, a 1 KiB stack carved from a shared 64 KiB chunk, 64 to a chunk. A glibc thread
 *   costs two resident pages at least (its descriptor and static TLS sit at the top of its
 *   stack) plus its malloc'ed DTV. Elsewhere, and under the sanitizers (whose per-thread state a
 *   raw thread would lack), it is a glibc thread on a 32 KiB stack (256 KiB sanitized). It is
 *   named after its pid ("ca-wait-12345") and runs with every signal blocked.
 * - The posting thread ("ca-wait-post"), one per process, a glibc thread on a default stack,
 *   does everything else for every Threaded watcher: the reap under the core's lock, the post
 *   of the exit, the log handler. The calls out of the library (a loop's op, the log handler,
 *   which may be an interpreter's) never run on a small stack. It starts with the first waiting
 *   thread and ends 100 ms after the last registration it had was finished.
 *
 * The waiting thread's registration holds a reference to the watcher's core and to itself, so
 * a watcher closed or freed while children run is safe: close cancels the registrations (their
 * callbacks are never called) and the threads end, quietly, when their child exits. The reap is
 * decided under the lock: a subprocess's registration that was dropped (the watcher closed)
 * leaves its child to the subprocess, which reaps it with its real status; any other child is
 * reaped, even after its handler was removed.
 *
 * fork(): the waiting threads and the posting thread stay in the parent; in a child the
 * parent's watchers answer -ECHILD (watcher.c) and a new watcher starts its threads anew.
 */
#include "internal.h"
#include "raw.h"
#include "watcher_internal.h"

#include <linux/futex.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>

#if defined(__has_feature)
#if __has_feature(address_sanitizer) || __has_feature(thread_sanitizer)
#define CA__SANITIZED 1
#endif
#endif
#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
#define CA__SANITIZED 1
#endif

#if CA__RAW_THREADS && !defined(CA__SANITIZED)
#define RAW_WAIT 1
#define WAIT_CODE CA__RAW_CODE
#else
#define RAW_WAIT 0
#define WAIT_CODE
#endif

#ifdef CA__SANITIZED
#define WAIT_STACK (256 * 1024)
#else
#define WAIT_STACK (32 * 1024)
#endif

#define SLOT_SIZE 1024                     /* a raw waiting thread's stack */
#define CHUNK_SLOTS 64
#define LINGER_NS (100 * 1000 * 1000L)     /* the posting thread's life after its last work */
#define RETRY_MAX_NS (100 * 1000 * 1000L)  /* a post that failed for memory: the longest wait */

/* Raw waiting threads' stacks. A slot is free when its word is 0: set to 1 when taken, cleared
 * by the kernel (CLONE_CHILD_CLEARTID) once its thread has exited and left the stack. */
typedef struct wchunk {
    struct wchunk *next;
    char *mem;
    atomic_int tid[CHUNK_SLOTS];
} wchunk;

/* The hand-off: waiting threads push their registration (through r->tnext) and bump the word;
 * the posting thread takes the whole list. Lock-free, because a raw thread cannot take a lock. */
static _Atomic(ca__wreg *) g_done;
static atomic_uint g_word;
static atomic_int g_sleeping; /* the posting thread is in (or about to enter) its futex wait */

/* The rest, under g.lock (a leaf: nothing else is taken under it). */
static struct {
    pthread_mutex_t lock;
    bool running;         /* the posting thread exists */
    long outstanding;     /* registrations given to a waiting thread and not yet finished */
    wchunk *chunks, *hint; /* the slots, and where the next search starts */
    unsigned hint_i;
    size_t nslots;
} g = {.lock = PTHREAD_MUTEX_INITIALIZER};

/* ----- the waiting threads ----------------------------------------------------------------- */

/* r's child has exited (or is not ours to wait for): hand r to the posting thread. After the
 * push r is the posting thread's; only the static word is touched. */
WAIT_CODE static void handoff(ca__wreg *r)
{
    ca__wreg *head = atomic_load_explicit(&g_done, memory_order_relaxed);
    do {
        r->tnext = head;
    } while (!atomic_compare_exchange_weak_explicit(&g_done, &head, r, memory_order_seq_cst,
                                                    memory_order_relaxed));
    atomic_fetch_add_explicit(&g_word, 1, memory_order_seq_cst);
    if (atomic_load_explicit(&g_sleeping, memory_order_seq_cst))
        CA__RAW_SYSCALL(SYS_futex, &g_word, FUTEX_WAKE_PRIVATE, 1, 0);
}

/* Waits for the exit without reaping: the reap is decided by the posting thread, under the
 * core's lock. Raw system calls only (see raw.h): this may run as a raw thread. */
WAIT_CODE static int wait_main(void *arg)
{
    ca__wreg *r = arg;
    pid_t pid = r->pid;
    /* "ca-wait-PID", written byte by byte: no libc call. */
    char name[16];
    char digits[12];
    int nd = 0;
    unsigned v = (unsigned)pid;
    do {
        digits[nd++] = (char)('0' + v % 10);
        v /= 10;
    } while (v && nd < 7);
    const char *prefix = "ca-wait-";
    int n = 0;
    while (prefix[n]) {
        name[n] = prefix[n];
        n++;
    }
    while (nd) name[n++] = digits[--nd];
    name[n] = 0;
    CA__RAW_SYSCALL(SYS_prctl, PR_SET_NAME, name, 0, 0);

    siginfo_t si;
    long e;
    do {
        e = CA__RAW_SYSCALL5(SYS_waitid, P_PID, pid, &si, WEXITED | WNOWAIT, 0);
    } while (e == -EINTR);
    handoff(r);
    return 0;
}

/* A glibc waiting thread: where raw threads are not made, or were refused. */
static void *wait_thread(void *arg)
{
    wait_main(arg);
    return NULL;
}

#if RAW_WAIT
/* The kernel (or a sandbox's filter) refused our clone: glibc threads from then on. */
static atomic_bool raw_refused;

/* Takes a free stack slot (g.lock held): *top is its stack's top, *word its CLEARTID word. */
static int slot_take(char **top, atomic_int **word)
{
    wchunk *k = g.hint;
    unsigned i = g.hint_i;
    for (size_t n = 0; k && n < g.nslots; n++) {
        if (atomic_load_explicit(&k->tid[i], memory_order_acquire) == 0) goto found;
        if (++i == CHUNK_SLOTS) {
            i = 0;
            k = k->next ? k->next : g.chunks;
        }
    }
    k = calloc(1, sizeof *k);
    if (!k) return -ENOMEM;
    void *m = mmap(NULL, (size_t)CHUNK_SLOTS * SLOT_SIZE, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_STACK, -1, 0);
    if (m == MAP_FAILED) {
        free(k);
        return -EAGAIN; /* as pthread_create says when it cannot map a stack */
    }
    k->mem = m;
    k->next = g.chunks;
    g.chunks = k;
    g.nslots += CHUNK_SLOTS;
    i = 0;
found:
    atomic_store_explicit(&k->tid[i], 1, memory_order_relaxed);
    *top = k->mem + (size_t)(i + 1) * SLOT_SIZE;
    *word = &k->tid[i];
    if (i + 1 < CHUNK_SLOTS) {
        g.hint = k;
        g.hint_i = i + 1;
    } else {
        g.hint = k->next ? k->next : g.chunks;
        g.hint_i = 0;
    }
    return 0;
}

/* Gives back the chunks no thread runs on (g.lock held): the posting thread, ending. */
static void chunks_trim(void)
{
    wchunk **pp = &g.chunks;
    while (*pp) {
        wchunk *k = *pp;
        bool used = false;
        for (unsigned i = 0; i < CHUNK_SLOTS && !used; i++)
            used = atomic_load_explicit(&k->tid[i], memory_order_acquire) != 0;
        if (used) {
            pp = &k->next;
            continue;
        }
        *pp = k->next;
        munmap(k->mem, (size_t)CHUNK_SLOTS * SLOT_SIZE);
        free(k);
        g.nslots -= CHUNK_SLOTS;
    }
    g.hint = g.chunks;
    g.hint_i = 0;
}
#endif

/* ----- the posting thread ------------------------------------------------------------------ */

/* r's work is over: its references go, and so does its count. */
static void release(ca__wreg *r)
{
    ca__wcore *c = r->core;
    ca__wcore_lock(c);
    ca__wreg_unref(c, r);
    ca__wcore_unlock(c);
    ca__wcore_unref(c);
    pthread_mutex_lock(&g.lock);
    g.outstanding--;
    pthread_mutex_unlock(&g.lock);
}

/* r's child has exited: reap it (unless it is its owner's to reap) and post the exit. True
 * when the post failed for memory: r is then kept and retried (issue 16, item 4). */
static bool finish(ca__wreg *r)
{
    ca__wcore *c = r->core;
    pid_t pid = r->pid;
    ca__wlog q = {0};
    ca__wcore_lock(c);
    /* An internal registration (a subprocess's) dropped meanwhile, by a close of the watcher
     * say, is not ours to reap any more: its owner watches the child on its own now (through
     * its pidfd) and reaps it with its real status, which a reap here would turn into 255.
     * Any other child is reaped, removed or not, as asyncio's thread does: no zombie. Under
     * the lock, so that a drop cannot come between the check and the reap; the child has
     * exited, so waitpid does not block. */
    if (!r->owner_reaps) {
        int status = 0;
        pid_t got;
        do {
            got = waitpid(pid, &status, WNOHANG);
        } while (got < 0 && errno == EINTR);
        bool echild = got <= 0;
        int rc = echild ? 255 : ca__returncode_from_status(status);
        ca__wreg_exited(c, r, rc, echild, &q); /* no-op (and silent) if it was removed */
    }
    ca__wcore_unlock(c);
    ca__wlog_flush(&q); /* the post, made without the lock */
    ca__wcore_lock(c);
    bool retry = r->in_retry;
    ca__wcore_unlock(c);
    if (!retry) release(r);
    return retry;
}

/* Posts again what failed for memory; returns those that still wait. */
static ca__wreg *retry_all(ca__wreg *list)
{
    ca__wreg *keep = NULL;
    while (list) {
        ca__wreg *r = list;
        list = r->tnext;
        ca__wcore *c = r->core;
        ca__wcore_retry(c);
        ca__wcore_lock(c);
        bool still = r->in_retry;
        ca__wcore_unlock(c);
        if (still) {
            r->tnext = keep;
            keep = r;
        } else {
            r->tnext = NULL;
            release(r);
        }
    }
    return keep;
}

/* Sleeps until a hand-off (the word moves from seen) or for ns (0: no limit). */
static void post_sleep(unsigned seen, long ns)
{
    atomic_store_explicit(&g_sleeping, 1, memory_order_seq_cst);
    if (atomic_load_explicit(&g_word, memory_order_seq_cst) == seen) {
        struct timespec ts = {ns / 1000000000L, ns % 1000000000L};
        syscall(SYS_futex, &g_word, FUTEX_WAIT_PRIVATE, seen, ns ? &ts : NULL);
    }
    atomic_store_explicit(&g_sleeping, 0, memory_order_seq_cst);
}

static void *post_main(void *arg)
{
    (void)arg;
    pthread_setname_np(pthread_self(), "ca-wait-post");
    ca__wreg *retry = NULL;
    long delay = 0;
    for (;;) {
        unsigned seen = atomic_load_explicit(&g_word, memory_order_seq_cst);
        ca__wreg *list = atomic_exchange_explicit(&g_done, NULL, memory_order_acquire);
        if (list) {
            ca__wreg *fifo = NULL; /* the oldest exit first */
            while (list) {
                ca__wreg *next = list->tnext;
                list->tnext = fifo;
                fifo = list;
                list = next;
            }
            while (fifo) {
                ca__wreg *r = fifo;
                fifo = r->tnext;
                r->tnext = NULL;
                if (finish(r)) {
                    r->tnext = retry;
                    retry = r;
                    if (!delay) delay = 1000000;
                }
            }
            continue;
        }
        if (retry) {
            post_sleep(seen, delay);
            retry = retry_all(retry);
            delay = !retry ? 0 : delay < RETRY_MAX_NS ? delay * 2 : delay;
            continue;
        }
        pthread_mutex_lock(&g.lock);
        bool idle = g.outstanding == 0;
        pthread_mutex_unlock(&g.lock);
        post_sleep(seen, idle ? LINGER_NS : 0);
        if (!idle) continue;
        pthread_mutex_lock(&g.lock);
        if (g.outstanding == 0 && !atomic_load_explicit(&g_done, memory_order_acquire)) {
            g.running = false;
#if RAW_WAIT
            chunks_trim();
#endif
            pthread_mutex_unlock(&g.lock);
            return NULL;
        }
        pthread_mutex_unlock(&g.lock);
    }
}

/* ----- fork: every lock survives it; no thread of ours is in the child ---------------------- */

static void fork_prepare(void) { pthread_mutex_lock(&g.lock); }
static void fork_parent(void) { pthread_mutex_unlock(&g.lock); }
static void fork_child(void)
{
    g.running = false;
    g.outstanding = 0;
    atomic_store_explicit(&g_done, NULL, memory_order_relaxed);
    atomic_store_explicit(&g_sleeping, 0, memory_order_relaxed);
#if RAW_WAIT
    for (wchunk *k = g.chunks; k; k = k->next)
        for (unsigned i = 0; i < CHUNK_SLOTS; i++)
            atomic_store_explicit(&k->tid[i], 0, memory_order_relaxed);
#endif
    pthread_mutex_unlock(&g.lock);
}
static pthread_once_t fork_once = PTHREAD_ONCE_INIT;
static void fork_setup(void) { pthread_atfork(fork_prepare, fork_parent, fork_child); }

/* ----- starting a waiting thread ------------------------------------------------------------ */

/* Starts r's waiting thread (and the posting thread if none runs): 0 or -errno. */
static int start_waiter(ca__wreg *r)
{
    pthread_once(&fork_once, fork_setup);
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old); /* both threads inherit "everything blocked" */
    pthread_mutex_lock(&g.lock);
    int e = 0;
    if (!g.running) {
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        pthread_t t;
        e = -pthread_create(&t, &attr, post_main, NULL);
        pthread_attr_destroy(&attr);
        if (e == 0) g.running = true;
    }
    bool raw = false;
#if RAW_WAIT
    char *top = NULL;
    atomic_int *word = NULL;
    raw = !atomic_load_explicit(&raw_refused, memory_order_relaxed);
    if (e == 0 && raw) e = slot_take(&top, &word);
#endif
    bool counted = e == 0;
    if (counted) g.outstanding++;
    pthread_mutex_unlock(&g.lock);
    if (e == 0 && raw) {
#if RAW_WAIT
        long t = ca__clone_raw(CLONE_VM | CLONE_FS | CLONE_FILES | CLONE_SIGHAND | CLONE_THREAD |
                                   CLONE_SYSVSEM | CLONE_CHILD_CLEARTID,
                               top, NULL, (int *)word, wait_main, r);
        if (t < 0) {
            atomic_store_explicit(word, 0, memory_order_relaxed);
            if (t == -EPERM || t == -ENOSYS || t == -EINVAL) {
                atomic_store_explicit(&raw_refused, true, memory_order_relaxed);
                raw = false; /* a glibc thread, below */
            } else {
                e = t == -ENOMEM ? -EAGAIN : (int)t; /* as pthread_create reports it */
            }
        }
#endif
    }
    if (e == 0 && !raw) {
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        pthread_attr_setstacksize(&attr, WAIT_STACK);
        pthread_t t;
        e = -pthread_create(&t, &attr, wait_thread, r);
        pthread_attr_destroy(&attr);
    }
    if (e < 0 && counted) {
        pthread_mutex_lock(&g.lock);
        g.outstanding--;
        pthread_mutex_unlock(&g.lock);
    }
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    return e;
}

/* The kind's start: one waiting thread for the new registration. */
static int threaded_start(ca__wcore *c, ca__wadd *a, ca__wlog *q)
{
    (void)q;
    ca__wreg *r = a->r;
    ca__wreg_ref(r); /* the thread's */
    ca__wcore_ref(c);
    int e = start_waiter(r);
    if (e < 0) {
        /* Nobody waits for this child: the caller learns it now, not never. */
        ca__wreg_unregister_quiet(c, r);
        ca__wreg_unref(c, r);
        /* Never the last reference: the watcher's caller holds one. */
        atomic_fetch_sub_explicit(&c->refs, 1, memory_order_acq_rel);
        return e;
    }
    return 0;
}

static int threaded_close(ca_child_watcher *w)
{
    ca__wcore *c = ca__wcore_of(w);
    ca__wcore_lock(c);
    c->closed = true;
    ca__wcore_cancel_all(c);
    bool keep = c->keeps_sigchld;
    c->keeps_sigchld = false;
    ca__wcore_unlock(c);
    if (keep) ca__sigchld_keep_release();
    return 0;
}

static const ca__wkind threaded_kind = {
    .name = "threaded",
    .start = threaded_start,
    .close = threaded_close,
    /* attach_loop: nothing to attach, any thread's loop gets its children */
};

int ca_threaded_child_watcher_new(ca_child_watcher **out)
{
    if (!out) return -EINVAL;
    ca__wcore *c;
    int err = ca__wcore_new(&c);
    if (err < 0) return err;
    err = ca__child_watcher_make(&threaded_kind, c, out);
    if (err < 0) {
        ca__wcore_unref(c);
        return err;
    }
    c->keeps_sigchld = true;
    ca__sigchld_keep_acquire();
    return 0;
}
