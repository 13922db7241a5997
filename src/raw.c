/*
 * clone(2) for code that runs without libc's thread state (raw.h). On x86-64 a few lines of
 * assembly: the new task pops fn, arg and the exit call's number from its new stack, because
 * the kernel gives it a copy of our registers and that stack, nothing else. Elsewhere glibc's
 * clone(), which is correct but intercepted by ThreadSanitizer (see raw.h).
 */
#include "internal.h"
#include "raw.h"

#include <sys/syscall.h>

#if defined(__x86_64__)
/* rdi flags, rsi stack_top, rdx ptid, rcx ctid, r8 fn, r9 arg. SYS_clone's order on x86-64:
 * flags, stack, parent_tid, child_tid, tls. */
__asm__(".text\n"
        ".globl ca__clone_raw\n"
        ".hidden ca__clone_raw\n"
        ".type ca__clone_raw,@function\n"
        ".p2align 4\n"
        "ca__clone_raw:\n"
        "    andq $-16, %rsi\n"
        "    subq $32, %rsi\n"
        "    movq %r9, (%rsi)\n"     /* arg */
        "    movq %r8, 8(%rsi)\n"    /* fn */
        "    movl $231, %eax\n"      /* SYS_exit_group ... */
        "    movl $60, %r11d\n"      /* ... or SYS_exit, for a thread */
        "    testl $0x10000, %edi\n" /* CLONE_THREAD */
        "    cmovnzl %r11d, %eax\n"
        "    movq %rax, 16(%rsi)\n"
        "    movq %rcx, %r10\n"
        "    xorl %r8d, %r8d\n"
        "    movl $56, %eax\n" /* SYS_clone */
        "    syscall\n"
        "    testq %rax, %rax\n"
        "    jz 1f\n"
        "    ret\n"
        "1:  xorl %ebp, %ebp\n"
        "    popq %rdi\n"
        "    popq %rax\n"
        "    callq *%rax\n" /* the stack is 16-byte aligned at the call, as the ABI wants */
        "    movl %eax, %edi\n"
        "    movq (%rsp), %rax\n"
        "    syscall\n"
        "    hlt\n"
        ".size ca__clone_raw, .-ca__clone_raw\n");
#else
long ca__clone_raw(unsigned long flags, void *stack_top, int *ptid, int *ctid, int (*fn)(void *),
                   void *arg)
{
    /* glibc's wrapper ends the new task with SYS_exit: with CLONE_THREAD unset it is the only
     * thread of its process, so that is the process's exit. */
    int pid = clone(fn, stack_top, (int)flags, arg, ptid, NULL, ctid);
    return pid < 0 ? -errno : pid;
}
#endif
