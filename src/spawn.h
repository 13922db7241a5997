/*
 * Raw spawning (spawn.c), apart from the subprocess transport that uses it (process.c): make a
 * child that runs a program with the stdio, environment, working directory and session asked
 * for, and report an exec failure as an error rather than as a child that exits 127. The
 * transport keeps everything else: its pipes, the exit, the watcher, the futures. Nothing here
 * is public.
 */
#ifndef CA_SPAWN_H
#define CA_SPAWN_H

#include <stdbool.h>
#include <sys/types.h>

/* The biggest signal number the kernel knows (SIGRTMAX without glibc's reserved shift): the
 * child resets the dispositions up to it, ca_process_send_signal accepts up to it. */
#define CA__MAX_SIGNAL 64

/* Where the child's fd i (0, 1 or 2) comes from, besides an fd of the parent's. */
enum {
    CA__SPAWN_INHERIT = -1, /* left as it is */
    CA__SPAWN_STDOUT = -2,  /* a copy of the child's fd 1 (for fd 2 only) */
};

struct ca__spawn_req {
    const char *const *argv; /* argv[0]: the program, searched in PATH as execvp does */
    const char *const *envp; /* NULL: ours; its PATH (else ours) is the one searched */
    const char *cwd;         /* NULL: inherit */
    /* Per stdio fd: CA__SPAWN_INHERIT, CA__SPAWN_STDOUT, or an fd >= 3 to copy (all >= 3, so
     * that setting up one cannot clobber the source of another). The child closes every fd
     * above 2 at exec (close_range CLOEXEC); ours are O_CLOEXEC anyway. */
    int src[3];
    bool setsid;
    bool want_pidfd;         /* ask for a pidfd (CLONE_PIDFD) */
};

/* Spawns req: 0 with *pid and *pidfd (an O_CLOEXEC pidfd; -1 when not wanted, or when the
 * kernel gives none), or -errno: clone's error, -ENOMEM, or the exec (or setup) error of the
 * child, which is then reaped already. After an exec error *pid is set only when somebody
 * else reaped that child first (a Fast watcher, from its loop's thread), so that the caller
 * can claim its exit; else *pid and *pidfd are left alone. Blocks the calling thread until the
 * child execs or exits (CLONE_VFORK); runs with all signals blocked in this thread meanwhile. */
int ca__spawn(const struct ca__spawn_req *req, pid_t *pid, int *pidfd);

/* Reaps a child of ours that will not be watched, waiting for its exit: through pidfd when it
 * is >= 0 (by pid on kernels without waitid(P_PIDFD)). Returns its returncode (-signal when
 * killed); 255 when somebody else reaped it. */
int ca__reap_child(pid_t pid, int pidfd);

#endif
