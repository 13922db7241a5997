/*
 * Code that runs without libc's thread state (raw.c): raw system calls and clone(2).
 *
 * Two users: a spawned child that shares our memory until it execs (spawn.c), and the Threaded
 * watcher's waiting threads, which are kernel threads of ours but not glibc threads (no TLS,
 * no errno, a 1 KiB stack: watcher_threaded.c). Code that runs there may make raw system
 * calls and use C11 atomics, nothing else of libc that touches shared or per-thread state: no
 * errno, no malloc, no lock, nothing a sanitizer intercepts. Nothing here is public.
 */
#ifndef CA_RAW_H
#define CA_RAW_H

#include <errno.h>
#include <sched.h>
#include <unistd.h>

/* A function that runs in such a context: no sanitizer instrumentation (it would use the
 * sanitizers' per-thread state, which is another thread's or none), no stack protector (its
 * canary is read through the thread pointer, which a raw thread inherits from the thread that
 * made it and which may be gone). */
#if defined(__has_attribute)
#if __has_attribute(disable_sanitizer_instrumentation)
/* clang: no_sanitize("thread") still calls __tsan_func_entry/exit, which would push onto the
 * parent's shadow stack. */
#define CA__RAW_NOSAN disable_sanitizer_instrumentation,
#endif
#if __has_attribute(no_stack_protector)
#define CA__RAW_NOSSP no_stack_protector,
#define CA__RAW_HAS_NOSSP 1
#endif
#endif
#ifndef CA__RAW_NOSAN
#define CA__RAW_NOSAN
#endif
#ifndef CA__RAW_NOSSP
#define CA__RAW_NOSSP
#endif
#if defined(__clang__) || (defined(__GNUC__) && __GNUC__ >= 8)
#define CA__RAW_CODE                                                                          \
    __attribute__((noinline, CA__RAW_NOSAN CA__RAW_NOSSP no_sanitize("address", "thread",   \
                                                                      "undefined")))
#else
#define CA__RAW_CODE __attribute__((noinline))
#endif

#if defined(__x86_64__)
/* A raw system call that returns -errno, touching no libc state (not even errno). */
#define CA__RAW_SYSCALL5(n, a, b, c, d, e)                                                    \
    __extension__({                                                                           \
        long ret_;                                                                            \
        register long r10_ __asm__("r10") = (long)(d);                                        \
        register long r8_ __asm__("r8") = (long)(e);                                          \
        __asm__ volatile("syscall"                                                            \
                         : "=a"(ret_)                                                         \
                         : "a"((long)(n)), "D"((long)(a)), "S"((long)(b)), "d"((long)(c)),    \
                           "r"(r10_), "r"(r8_)                                                \
                         : "rcx", "r11", "memory");                                           \
        ret_;                                                                                 \
    })
/* Raw threads (the Threaded watcher's waiting threads) are made here, when the compiler can
 * keep the stack protector out of their code; elsewhere they are glibc threads. */
#ifdef CA__RAW_HAS_NOSSP
#define CA__RAW_THREADS 1
#else
#define CA__RAW_THREADS 0
#endif
#else
/* Elsewhere glibc's syscall(): correct, but it sets errno, so no raw threads there. */
#define CA__RAW_SYSCALL5(n, a, b, c, d, e)                                                    \
    __extension__({                                                                           \
        long ret_ = syscall((n), (a), (b), (c), (d), (e));                                    \
        ret_ < 0 ? -(long)errno : ret_;                                                       \
    })
#define CA__RAW_THREADS 0
#endif
#define CA__RAW_SYSCALL(n, a, b, c, d) CA__RAW_SYSCALL5(n, a, b, c, d, 0)

/* clone(2) with the new task running fn(arg) on stack_top and then exiting with fn's result:
 * the one thread (SYS_exit) if flags has CLONE_THREAD, else the whole new process
 * (SYS_exit_group). ptid and ctid are clone's parent_tid and child_tid (CLONE_PIDFD's pidfd,
 * CLONE_CHILD_CLEARTID's word), or NULL. Returns the new task's id or -errno, in the caller.
 * Not glibc's clone(): ThreadSanitizer intercepts that one and runs its fork bookkeeping in the
 * child, which with CLONE_VM is the parent's own state. */
long ca__clone_raw(unsigned long flags, void *stack_top, int *ptid, int *ctid, int (*fn)(void *),
                   void *arg);

#endif
