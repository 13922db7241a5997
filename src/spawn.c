/*
 * Raw spawning (spawn.h): a child made without fork() that runs a program, for the subprocess
 * transport (process.c), which owns the pipes, the exit and everything after the spawn.
 *
 * No fork() of a large parent: the child is made with clone(CLONE_VM | CLONE_VFORK) on a small
 * stack of its own, like glibc's posix_spawn, plus CLONE_PIDFD so that signals go through a
 * pidfd (a recycled PID is never hit) and the Pidfd watcher borrows it. The child shares our
 * memory until it calls execve, so it may only make raw system calls: no libc function that
 * touches shared state (no malloc, no lock), and nothing a sanitizer intercepts (an
 * intercepted call in a CLONE_VM child corrupts the parent's sanitizer state; TSan even
 * intercepts glibc's clone() itself, which is why x86-64 has its own few lines of assembly,
 * in raw.c). Everything the child needs (the candidate paths of the PATH search, the stdio plan)
 * is prepared by the parent. An exec failure is written into that shared plan; valgrind turns
 * CLONE_VM | CLONE_VFORK into a plain fork, where the write is lost, so the first spawn also
 * sends it through an O_CLOEXEC pipe and checks that the child really ran on our memory (see
 * spawn()).
 */
#include "internal.h"
#include "raw.h"
#include "spawn.h"

#include <fcntl.h>
#include <sched.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#ifndef CLONE_PIDFD
#define CLONE_PIDFD 0x00001000
#endif
#ifndef CLOSE_RANGE_CLOEXEC
#define CLOSE_RANGE_CLOEXEC (1U << 2)
#endif

extern char **environ;

/* ----- the child ------------------------------------------------------------------------------ */

/* What the child does, all prepared by the parent. */
struct spawn_plan {
    char *const *paths;    /* execve candidates (PATH search), NULL-terminated */
    char *const *argv;
    char *const *envp;
    const char *cwd;       /* NULL: inherit */
    int src[3];            /* per stdio fd: as ca__spawn_req's */
    int errfd;             /* write end of the O_CLOEXEC error pipe, or -1 */
    bool setsid;
    /* Written by the child, read by the parent once the clone returned. */
    volatile int started;  /* the child ran on our memory (real CLONE_VM | CLONE_VFORK) */
    volatile int err;      /* its exec (or setup) errno, 0 if it did not fail */
};

/* The kernel's struct sigaction is 4 words on every Linux ABI we build for (handler, flags,
 * restorer, mask; the order differs but all-zero is SIG_DFL with no flags everywhere), and the
 * handler is the first word. The words are set one by one: a loop could become a call to
 * memset, which the sanitizers intercept. */
struct ksigaction {
    unsigned long w[4];
};

CA__RAW_CODE static int child_main(void *arg)
{
    struct spawn_plan *pl = arg;
    long r;
    pl->started = 1;

    /* Signal handlers: ours or the application's must never run here (the child shares their
     * memory until it execs), so every caught signal goes back to SIG_DFL; so do SIGPIPE and
     * SIGXFSZ even when ignored, as Python's restore_signals does. Other ignored signals stay
     * ignored across exec, as POSIX says. All signals are blocked (the parent blocked them
     * before clone) until just before execve. */
    for (int sig = 1; sig <= CA__MAX_SIGNAL; sig++) {
        if (sig == SIGKILL || sig == SIGSTOP) continue;
        struct ksigaction old;
        old.w[0] = 0;
        if (CA__RAW_SYSCALL(SYS_rt_sigaction, sig, 0, &old, 8) < 0) continue;
        unsigned long h = old.w[0];
        if (h == (unsigned long)SIG_DFL) continue;
        if (h == (unsigned long)SIG_IGN && sig != SIGPIPE && sig != SIGXFSZ) continue;
        struct ksigaction dfl;
        dfl.w[0] = dfl.w[1] = dfl.w[2] = dfl.w[3] = 0;
        CA__RAW_SYSCALL(SYS_rt_sigaction, sig, &dfl, 0, 8);
    }
    if (pl->setsid && (r = CA__RAW_SYSCALL(SYS_setsid, 0, 0, 0, 0)) < 0) goto fail;
    /* stdio: every source the parent prepared is >= 3, so the order cannot clobber one. */
    for (int i = 0; i < 3; i++) {
        int src = pl->src[i];
        if (src == CA__SPAWN_INHERIT) continue;
        if (src == CA__SPAWN_STDOUT) src = 1;
        if ((r = CA__RAW_SYSCALL(SYS_dup3, src, i, 0, 0)) < 0) goto fail;
    }
    if (pl->cwd && (r = CA__RAW_SYSCALL(SYS_chdir, pl->cwd, 0, 0, 0)) < 0) goto fail;
    /* Only 0, 1 and 2 reach the program, as Python's close_fds: everything above is marked
     * close-on-exec (the error pipe already is, and must stay open until execve). Older
     * kernels without close_range rely on our fds being O_CLOEXEC anyway. */
    CA__RAW_SYSCALL(SYS_close_range, 3, ~0U, CLOSE_RANGE_CLOEXEC, 0);
    unsigned long empty = 0;
    CA__RAW_SYSCALL(SYS_rt_sigprocmask, SIG_SETMASK, &empty, 0, 8);
    /* The PATH search, as execvp: go on after ENOENT-like errors, remember EACCES. */
    r = -ENOENT;
    bool eacces = false;
    for (char *const *p = pl->paths; *p; p++) {
        r = CA__RAW_SYSCALL(SYS_execve, *p, pl->argv, pl->envp, 0);
        if (r == -EACCES) {
            eacces = true;
            continue;
        }
        if (r == -ENOENT || r == -ENOTDIR || r == -ENODEV || r == -ETIMEDOUT || r == -ESTALE)
            continue;
        break;
    }
    if (eacces && (r == -ENOENT || r == -ENOTDIR || r == -ENODEV || r == -ETIMEDOUT ||
                   r == -ESTALE))
        r = -EACCES;
fail:;
    int err = (int)-r;
    pl->err = err;
    if (pl->errfd >= 0) CA__RAW_SYSCALL(SYS_write, pl->errfd, &err, sizeof err, 0);
    return 127;
}


/* ----- the parent ----------------------------------------------------------------------------- */

/* The execve candidates for argv0, as execvp would try them: argv0 itself when it has a slash
 * (in *out = one, the caller's two slots: nothing to free), else each PATH directory (envp's
 * PATH when envp has one, else ours; glibc's default when there is none): one allocation;
 * *out is NULL-terminated either way. */
static int exec_candidates(const char *argv0, const char *const *envp, char *one[2], char ***out)
{
    if (!*argv0 || strchr(argv0, '/')) { /* "" is not found, as execvp says */
        one[0] = (char *)argv0;
        one[1] = NULL;
        *out = one;
        return 0;
    }
    const char *path = NULL;
    if (envp) {
        for (const char *const *e = envp; *e; e++) {
            if (strncmp(*e, "PATH=", 5) == 0) {
                path = *e + 5;
                break;
            }
        }
    }
    if (!path) path = getenv("PATH");
    if (!path) path = "/bin:/usr/bin";
    size_t ndirs = 1, flen = strlen(argv0), plen = strlen(path);
    for (const char *c = path; *c; c++) ndirs += *c == ':';
    size_t vec = (ndirs + 1) * sizeof(char *);
    size_t total = vec + plen + ndirs * (flen + 2);
    char **v = malloc(total);
    if (!v) return -ENOMEM;
    char *s = (char *)v + vec;
    size_t k = 0;
    for (const char *d = path;; d++) {
        const char *end = strchr(d, ':');
        size_t dl = end ? (size_t)(end - d) : strlen(d);
        v[k++] = s;
        if (dl > 0) {
            /* An empty entry is the current directory: argv0 as it is. */
            memcpy(s, d, dl);
            s += dl;
            *s++ = '/';
        }
        memcpy(s, argv0, flen + 1);
        s += flen + 1;
        if (!end) break;
        d = end;
    }
    v[k] = NULL;
    *out = v;
    return 0;
}

static atomic_bool no_clone_pidfd; /* the kernel (or valgrind, or seccomp) refused CLONE_PIDFD */

/* Here after a failed exec; the transport's after a SIGKILL, or once an exit is known. */
int ca__reap_child(pid_t pid, int pidfd)
{
    if (pidfd >= 0) {
        siginfo_t si;
        memset(&si, 0, sizeof si);
        int r;
        do {
            r = waitid(P_PIDFD, (id_t)pidfd, &si, WEXITED);
        } while (r < 0 && errno == EINTR);
        if (r == 0) return si.si_code == CLD_EXITED ? si.si_status : -si.si_status;
        if (errno != EINVAL && errno != ENOSYS) return 255;
        /* A kernel without P_PIDFD: by pid. */
    }
    int st;
    pid_t w;
    do {
        w = waitpid(pid, &st, 0);
    } while (w < 0 && errno == EINTR);
    return w == pid ? ca__returncode_from_status(st) : 255;
}

/* Whether the child really shares our memory until it execs: 0 not known yet, 1 yes, -1 no
 * (valgrind runs CLONE_VM | CLONE_VFORK as a fork). Until it is known to, exec errors also
 * travel through a pipe; once it is, they are read from the plan, four system calls fewer. */
static atomic_int shared_vfork;

/* Spawns the plan; *pid and *pidfd (-1 when the kernel gives none, or when want_pidfd is false)
 * on success, or the exec error of the child (reaped) or of clone: see ca__spawn. */
static int spawn(struct spawn_plan *pl, bool want_pidfd, pid_t *pid_out, int *pidfd_out)
{
    int mode = atomic_load_explicit(&shared_vfork, memory_order_relaxed);
    int ep[2] = {-1, -1};
    if (mode <= 0 && pipe2(ep, O_CLOEXEC) < 0) return -errno;
    pl->errfd = ep[1];
    pl->started = 0;
    pl->err = 0;

    /* The child's stack: a part of ours that the parent does not use while the child runs
     * (CLONE_VFORK suspends this thread until the child execs or exits). */
    _Alignas(16) char stack[16384];
    sigset_t all, old;
    sigfillset(&all);
    /* No signal handler may run in the child before it resets the dispositions. */
    pthread_sigmask(SIG_SETMASK, &all, &old);
    int pidfd = -1;
    unsigned long flags = CLONE_VM | CLONE_VFORK | SIGCHLD;
    long pid = -EINVAL;
    if (want_pidfd && !atomic_load_explicit(&no_clone_pidfd, memory_order_relaxed)) {
        pid = ca__clone_raw(flags | CLONE_PIDFD, stack + sizeof stack, &pidfd, NULL, child_main,
                            pl);
        if (pid == -EINVAL || pid == -ENOSYS || pid == -EPERM) {
            atomic_store_explicit(&no_clone_pidfd, true, memory_order_relaxed);
            pidfd = -1;
        }
    }
    if ((!want_pidfd || atomic_load_explicit(&no_clone_pidfd, memory_order_relaxed)) && pid < 0)
        pid = ca__clone_raw(flags, stack + sizeof stack, NULL, NULL, child_main, pl);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (ep[1] >= 0) close(ep[1]);
    if (pid < 0) {
        if (ep[0] >= 0) close(ep[0]);
        return (int)pid;
    }
    int err = 0;
    if (ep[0] >= 0) {
        ssize_t n;
        do {
            n = read(ep[0], &err, sizeof err);
        } while (n < 0 && errno == EINTR);
        close(ep[0]);
        if (n != (ssize_t)sizeof err) err = 0;
        if (mode == 0) atomic_store(&shared_vfork, pl->started ? 1 : -1);
    } else {
        err = pl->err;
    }
    if (err != 0) {
        /* The exec failed: the child exits 127 at once; do not leave it as a zombie. 255: a
         * Fast watcher reaped it first (from its loop's thread); *pid_out tells the caller. */
        if (ca__reap_child((pid_t)pid, pidfd) == 255) *pid_out = (pid_t)pid;
        if (pidfd >= 0) close(pidfd);
        return err > 0 ? -err : -ENOEXEC;
    }
    *pid_out = (pid_t)pid;
    *pidfd_out = pidfd;
    return 0;
}

int ca__spawn(const struct ca__spawn_req *req, pid_t *pid, int *pidfd)
{
    char **paths = NULL, *one_path[2];
    int r = exec_candidates(req->argv[0], req->envp, one_path, &paths);
    if (r < 0) return r;
    struct spawn_plan pl = {
        .paths = paths,
        .argv = (char *const *)req->argv,
        .envp = (char *const *)(req->envp ? req->envp : (const char *const *)environ),
        .cwd = req->cwd,
        .src = {req->src[0], req->src[1], req->src[2]},
        .setsid = req->setsid,
    };
    r = spawn(&pl, req->want_pidfd, pid, pidfd);
    if (paths != one_path) free(paths);
    return r;
}
