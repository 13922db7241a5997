/*
 * Allocation fault injection for the sweep (tests/fault/workload.c, docs/testing.md).
 *
 * The program is linked with -Wl,--wrap=malloc,--wrap=calloc,... so that every call the
 * library's objects (and the workload's) make to an allocation function lands here, while
 * __real_malloc is whatever `malloc` is in the final link: glibc's in a release build, the
 * ASan runtime's interceptor under ASan. That is why we wrap at link time rather than
 * interposing malloc by symbol: ASan already interposes malloc itself, and a second
 * interposer would either hide ASan's or be hidden by it. Calls made inside glibc (its own
 * strdup, stdio buffers) are not seen, which is what we want: only the library's allocations
 * are counted and failed.
 *
 * Every call counts, in order; the one numbered CA_FAULT_N (1-based; 0 or unset: none) fails
 * as the real function would for lack of memory (NULL and errno ENOMEM, posix_memalign's
 * ENOMEM, pthread_create's EAGAIN, the library's own clone's -EAGAIN). Only that one: the next
 * call succeeds again, so what is tested is the failure path of each single call site, not an
 * exhausted heap.
 *
 * Live blocks are kept in a fixed table (no allocation of our own), each with its call
 * number, so the workload can check that nothing made before a point outlives it unreachable:
 * that is the leak check in release builds, where there is no LeakSanitizer. Reachable means
 * what LeakSanitizer means, done the same conservative way: a block is reachable if a word
 * in the program's writable segments (data, bss; not this file's table) or in a reachable
 * block holds its address. Blocks the library keeps for the process's lifetime on purpose
 * (the policy's per-thread hazard records, on a global list) are reachable, so not leaks.
 */
#include "alloc_wrap.h"

#include <errno.h>
#include <link.h>
#include <malloc.h>
#include <execinfo.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

void *__real_malloc(size_t n);
void *__real_calloc(size_t n, size_t size);
void *__real_realloc(void *p, size_t n);
void *__real_aligned_alloc(size_t align, size_t n);
int __real_posix_memalign(void **out, size_t align, size_t n);
char *__real_strdup(const char *s);
char *__real_strndup(const char *s, size_t n);
void __real_free(void *p);
int __real_pthread_create(pthread_t *t, const pthread_attr_t *attr, void *(*fn)(void *),
                          void *arg);

void *__wrap_malloc(size_t n);
void *__wrap_calloc(size_t n, size_t size);
void *__wrap_realloc(void *p, size_t n);
void *__wrap_aligned_alloc(size_t align, size_t n);
int __wrap_posix_memalign(void **out, size_t align, size_t n);
char *__wrap_strdup(const char *s);
char *__wrap_strndup(const char *s, size_t n);
void __wrap_free(void *p);
int __wrap_pthread_create(pthread_t *t, const pthread_attr_t *attr, void *(*fn)(void *),
                          void *arg);
/* The library's own clone (src/raw.h): a raw waiting thread of the Threaded watcher, or a
 * spawned child. */
long __real_ca__clone_raw(unsigned long flags, void *stack_top, int *ptid, int *ctid,
                          int (*fn)(void *), void *arg);
long __wrap_ca__clone_raw(unsigned long flags, void *stack_top, int *ptid, int *ctid,
                          int (*fn)(void *), void *arg);

static atomic_long calls;
static atomic_long fail_at = -1; /* -1: not read from the environment yet */
static atomic_int injected;

/* Open addressing, linear probing, tombstones; sized far above what the workload keeps live. */
#define SLOTS (1u << 18)
#define TOMB ((void *)1)
static struct slot {
    void *p;
    long when;
} table[SLOTS];
static long live;
static pthread_mutex_t table_lock = PTHREAD_MUTEX_INITIALIZER;

static size_t hash(const void *p)
{
    uintptr_t x = (uintptr_t)p;
    x ^= x >> 17;
    x *= 0xed5ad4bbu;
    x ^= x >> 11;
    return (size_t)x & (SLOTS - 1);
}

static void track(void *p, long when)
{
    if (!p) return;
    pthread_mutex_lock(&table_lock);
    size_t i = hash(p);
    for (size_t k = 0; k < SLOTS; k++, i = (i + 1) & (SLOTS - 1)) {
        if (table[i].p == NULL || table[i].p == TOMB) {
            table[i].p = p;
            table[i].when = when;
            live++;
            pthread_mutex_unlock(&table_lock);
            return;
        }
    }
    pthread_mutex_unlock(&table_lock);
    fputs("alloc_wrap: table full\n", stderr);
    abort();
}

static void untrack(void *p)
{
    if (!p) return;
    pthread_mutex_lock(&table_lock);
    size_t i = hash(p);
    for (size_t k = 0; k < SLOTS && table[i].p; k++, i = (i + 1) & (SLOTS - 1)) {
        if (table[i].p == p) {
            table[i].p = TOMB;
            live--;
            break;
        }
    }
    /* Not found: a block glibc allocated internally and handed to us; nothing to do. */
    pthread_mutex_unlock(&table_lock);
}

static long trace_at(void)
{
    static atomic_long t = -1;
    long v = atomic_load(&t);
    if (v < 0) {
        const char *s = getenv("CA_FAULT_TRACE");
        v = s ? atol(s) : 0;
        atomic_store(&t, v);
    }
    return v;
}

/* Counts the call; true if it is the one to fail. Sets *when to its number. */
static bool fail_now(long *when)
{
    long f = atomic_load(&fail_at);
    if (f < 0) {
        const char *s = getenv("CA_FAULT_N");
        f = s ? atol(s) : 0;
        atomic_store(&fail_at, f);
    }
    long n = atomic_fetch_add(&calls, 1) + 1;
    *when = n;
    if (n == trace_at() || (f > 0 && n == f)) {
        /* Where the failed call comes from (printed always: the driver shows it only for a
         * failed run), or with CA_FAULT_TRACE=N where call N does, to read a leak report. */
        void *bt[32];
        int k = backtrace(bt, 32);
        fprintf(stderr, "alloc_wrap: call %ld%s from:\n", n, n == f ? " (failed)" : "");
        backtrace_symbols_fd(bt, k, 2);
    }
    if (f > 0 && n == f) {
        atomic_store(&injected, 1);
        return true;
    }
    return false;
}

void *__wrap_malloc(size_t n)
{
    long w;
    if (fail_now(&w)) {
        errno = ENOMEM;
        return NULL;
    }
    void *p = __real_malloc(n);
    track(p, w);
    return p;
}

void *__wrap_calloc(size_t n, size_t size)
{
    long w;
    if (fail_now(&w)) {
        errno = ENOMEM;
        return NULL;
    }
    void *p = __real_calloc(n, size);
    track(p, w);
    return p;
}

void *__wrap_realloc(void *old, size_t n)
{
    long w;
    if (fail_now(&w)) {
        errno = ENOMEM;
        return NULL; /* old stays valid, as with a real failure */
    }
    void *p = __real_realloc(old, n);
    if (p || n == 0) untrack(old);
    track(p, w);
    return p;
}

void *__wrap_aligned_alloc(size_t align, size_t n)
{
    long w;
    if (fail_now(&w)) {
        errno = ENOMEM;
        return NULL;
    }
    void *p = __real_aligned_alloc(align, n);
    track(p, w);
    return p;
}

int __wrap_posix_memalign(void **out, size_t align, size_t n)
{
    long w;
    if (fail_now(&w)) return ENOMEM;
    int e = __real_posix_memalign(out, align, n);
    if (e == 0) track(*out, w);
    return e;
}

char *__wrap_strdup(const char *s)
{
    long w;
    if (fail_now(&w)) {
        errno = ENOMEM;
        return NULL;
    }
    char *p = __real_strdup(s);
    track(p, w);
    return p;
}

char *__wrap_strndup(const char *s, size_t n)
{
    long w;
    if (fail_now(&w)) {
        errno = ENOMEM;
        return NULL;
    }
    char *p = __real_strndup(s, n);
    track(p, w);
    return p;
}

void __wrap_free(void *p)
{
    untrack(p);
    __real_free(p);
}

int __wrap_pthread_create(pthread_t *t, const pthread_attr_t *attr, void *(*fn)(void *),
                          void *arg)
{
    long w;
    if (fail_now(&w)) return EAGAIN;
    return __real_pthread_create(t, attr, fn, arg);
}

long __wrap_ca__clone_raw(unsigned long flags, void *stack_top, int *ptid, int *ctid,
                          int (*fn)(void *), void *arg)
{
    long w;
    if (fail_now(&w)) return -EAGAIN; /* what clone says at a thread or process limit */
    return __real_ca__clone_raw(flags, stack_top, ptid, ctid, fn, arg);
}

long aw_calls(void) { return atomic_load(&calls); }
bool aw_injected(void) { return atomic_load(&injected) != 0; }

static struct slot *find(const void *p)
{
    size_t i = hash(p);
    for (size_t k = 0; k < SLOTS && table[i].p; k++, i = (i + 1) & (SLOTS - 1))
        if (table[i].p == p) return &table[i];
    return NULL;
}

/* Marking: a reachable block's `when` is made negative; the work list is a plain array. */
static void *work[1u << 16];
static size_t nwork;

/* A conservative scan reads redzones and padding between globals, as LeakSanitizer's does. */
__attribute__((no_sanitize_address)) static void scan(const void *from, size_t bytes)
{
    const uintptr_t *w = from;
    for (size_t i = 0; i < bytes / sizeof *w; i++) {
        void *p = (void *)w[i];
        if ((uintptr_t)p < 4096) continue;
        struct slot *s = find(p);
        if (s && s->when > 0) {
            s->when = -s->when;
            if (nwork < sizeof work / sizeof *work) work[nwork++] = p;
        }
    }
}

static int scan_segments(struct dl_phdr_info *info, size_t size, void *arg)
{
    (void)size, (void)arg;
    /* Only the program itself: libc's own heap pointers are not ours to judge. */
    if (info->dlpi_name && info->dlpi_name[0]) return 1;
    for (int i = 0; i < info->dlpi_phnum; i++) {
        const ElfW(Phdr) *ph = &info->dlpi_phdr[i];
        if (ph->p_type != PT_LOAD || !(ph->p_flags & PF_W)) continue;
        uintptr_t lo = info->dlpi_addr + ph->p_vaddr, hi = lo + ph->p_memsz;
        uintptr_t tlo = (uintptr_t)table, thi = tlo + sizeof table;
        uintptr_t wlo = (uintptr_t)work, whi = wlo + sizeof work;
        /* Skip the table and the work list, which hold every pointer. */
        uintptr_t cuts[2][2] = {{tlo, thi}, {wlo, whi}};
        uintptr_t a = lo;
        while (a < hi) {
            uintptr_t b = hi;
            for (int c = 0; c < 2; c++)
                if (cuts[c][0] >= a && cuts[c][0] < b) b = cuts[c][0];
            scan((const void *)a, b - a);
            a = b;
            for (int c = 0; c < 2; c++)
                if (a == cuts[c][0]) a = cuts[c][1];
        }
    }
    return 1;
}

long aw_leaked_before(long before, long *first)
{
    pthread_mutex_lock(&table_lock);
    nwork = 0;
    dl_iterate_phdr(scan_segments, NULL);
    while (nwork) {
        void *p = work[--nwork];
        scan(p, malloc_usable_size(p));
    }
    long n = 0, f = 0;
    for (size_t i = 0; i < SLOTS; i++) {
        if (!table[i].p || table[i].p == TOMB) continue;
        if (table[i].when < 0) {
            table[i].when = -table[i].when;
        } else if (table[i].when < before) {
            if (!n || table[i].when < f) f = table[i].when;
            n++;
        }
    }
    pthread_mutex_unlock(&table_lock);
    if (first) *first = f;
    return n;
}

long aw_live_before(long before, long *first)
{
    long n = 0, f = 0;
    pthread_mutex_lock(&table_lock);
    for (size_t i = 0; i < SLOTS; i++) {
        if (table[i].p && table[i].p != TOMB && table[i].when < before) {
            if (!n || table[i].when < f) f = table[i].when;
            n++;
        }
    }
    pthread_mutex_unlock(&table_lock);
    if (first) *first = f;
    return n;
}
