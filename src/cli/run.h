/* The runner's state, shared by run.c (jobs), output.c (printing) and report.c (progress
 * bar, summary, joblog). One runner per process; everything runs on the loop's thread. */
#ifndef CA_CLI_RUNNER_H
#define CA_CLI_RUNNER_H

#include "cli.h"
#include "input.h"

#include <signal.h>
#include <sys/types.h>

/* A job's output above this many bytes (per stream) goes to an unlinked temporary file, so
 * that the runner's memory stays bounded whatever the jobs print. */
#define SPILL_THRESHOLD (1u << 20)
/* How long a job whose own process exited is still waited for, when a process it left behind
 * holds its output pipes open (seconds). */
#define PIPE_GRACE 0.5

enum job_state { J_QUEUED, J_RUNNING, J_DONE };

/* How a job ended, for the summary and the exit status. */
enum outcome {
    O_OK,        /* exit 0 */
    O_FAILED,    /* exit status != 0 */
    O_SIGNAL,    /* killed by a signal we did not send */
    O_TIMEOUT,   /* killed by --timeout */
    O_NOEXEC,    /* the command could not be started (not found: 127, not executable: 126) */
    O_STOPPED,   /* ended by us: interrupted, or --halt now */
    O_SKIPPED,   /* never started: interrupted or halted before its turn */
    O_COUNT
};

/* One stream of a job's output not printed yet: in memory, or once it grew past
 * SPILL_THRESHOLD, in a temporary file (fd >= 0, flen bytes) followed by mem. */
struct spool {
    struct buf mem;
    int fd;                  /* -1: none (0 is never a spool fd: fds 0-2 are kept open) */
    off_t flen;
    bool mid_line;           /* --tag: what was printed of it ended inside a line */
};

/* The argument of a job's process callbacks. It lives until the process is finished (all
 * three events came), which may be after the job itself: a job whose own process exited is
 * not held up by a background process that keeps its pipes open (the job is then "detached",
 * j == NULL, and the context waits on the runner's list for the last events). */
struct proc_ctx {
    struct job *j;
    struct runner *r;
    int pending;             /* events still to come: the exit and the pipes' EOF */
    bool stdin_piped;        /* stdin is a pipe too (remote jobs) */
    struct proc_ctx *prev, *next; /* the runner's detached list */
};

struct host;

struct job {
    struct runner *r;
    unsigned long seq;       /* input order, from 1 */
    char *input;
    char *display;           /* the command as text, made when first needed */
    enum job_state state;
    enum outcome outcome;
    int attempts;
    ca_process *proc;
    pid_t pid;               /* also the process group id: jobs start a new session */
    int slot;                /* {%}: 1..-j */
    struct proc_ctx *pc;     /* while running */
    struct host *host;       /* -S: where it runs (NULL: here) */
    bool exited;
    bool detached;           /* finished without waiting for its pipes' end of file */
    bool timed_out;          /* --timeout fired */
    bool stopped;            /* we signalled it because of an interrupt or --halt now */
    int rc;                  /* asyncio's returncode: exit status, or -signal */
    ca_handle *timer;        /* --timeout, then the SIGKILL after the grace period */
    double t_start;          /* loop time */
    double wall_start;       /* epoch seconds, for the joblog */
    double runtime;
    struct spool out, err;   /* output not printed yet */
    struct job *next;        /* queue */
    struct job *rprev, *rnext; /* running list */
};

#define SLOWEST 5
#define NSIGS 6
#define FAILURES 5

struct noted {
    double runtime;
    unsigned long seq;
    int rc;
    enum outcome outcome;
    char *display;
};

/* -S/--sshlogin: a machine jobs run on (":" is this one), with its share of the slots. */
struct host {
    char *login;             /* as given, without "N/" */
    char *name;              /* the host argument of ssh (user@host), or ":" */
    char **ssh;              /* the ssh command's words (--ssh or the login's own), NULL-ended */
    int nssh;
    char *ctl_path;          /* the ControlMaster socket */
    bool local;
    bool master;             /* a ControlMaster was started */
    int slots, nrunning;
};

struct runner {
    const struct run_options *o;
    int jobs;                /* -j in effect (the sum of the hosts' slots with -S; lowered when
                                the fd limit is too low) */
    struct cmd_template tmpl;
    ca_loop *loop;
    ca_policy *policy;
    ca_child_watcher *watcher;
    enum watcher_kind watcher_kind;

    int devnull;             /* every job's stdin, opened once rather than per job */
    struct input in;
    bool in_async;           /* stdin/file read through a loop reader */
    bool in_reading;         /* the reader is installed */
    size_t low_water;        /* keep this many jobs queued ahead */

    struct job *q_head, *q_tail;
    size_t q_len;
    struct job *running;
    int nrunning;
    int *free_slots;
    int nfree;
    bool blocked;            /* out of fds/processes: start more once a job ends */
    bool said_blocked;       /* the warning about it was printed */
    struct proc_ctx *detached; /* processes of finished jobs whose pipes are still open */
    unsigned long unread;    /* inputs never read, counted when stopping */
    bool unread_unknown;     /* ... and the rest of a pipe or terminal, not counted */
    bool err_broken;         /* stderr cannot be written: jobs' stderr is dropped */
    bool tty_shared;         /* stdout is the terminal the bar is drawn on */
    bool tty_mid_line;       /* ... and what was written to it last ended inside a line */

    struct host *hosts;      /* -S */
    int nhosts;
    char *ctl_dir;           /* the ControlMaster sockets' directory */

    struct job **ring;       /* -k: jobs by seq from next_print to next_seq */
    size_t ring_cap;
    unsigned long next_print, next_seq;

    unsigned long counts[O_COUNT];
    unsigned long ndone, nretried_ok;
    bool stopping;           /* no new jobs */
    int stop_signal;         /* the signal that stopped us (exit 128+N), 0 */
    int interrupts;          /* SIGINT/SIGTERM/SIGHUP received */
    bool sig_handled[NSIGS]; /* which of run.c's signals got a handler */
    int pending_stop;        /* a stop requested where it could not run at once */
    bool halted;
    bool error;              /* the runner's own error: exit 255 */
    bool output_broken;      /* stdout/stderr gave EPIPE */
    bool finished;
    bool in_after;

    FILE *joblog;
    struct buf scratch;

    bool bar;
    bool bar_drawn;
    ca_handle *bar_timer;
    double t0;

    struct noted slowest[SLOWEST];
    int nslowest;
    struct noted failures[FAILURES];
    int nfailures;
};

/* run.c */
const char *job_display(struct job *j);
void runner_fail(struct runner *r, const char *what, int err);
void runner_request_stop(struct runner *r, int sig);

/* output.c: printing jobs' output in the chosen mode and order. */
void output_data(struct runner *r, struct job *j, int fd, const void *p, size_t n);
void output_job_done(struct runner *r, struct job *j);  /* j is J_DONE; may free it */
void output_write(struct runner *r, int fd, const char *p, size_t n);
void spool_init(struct spool *s);
void spool_reset(struct spool *s);
void spool_free(struct spool *s);
bool spool_flatten(const struct spool *sp, struct buf *out);
bool ring_put(struct runner *r, struct job *j);
void job_free(struct job *j);

/* ssh.c: -S/--sshlogin. */
/* Parses the logins, starts one ControlMaster per host and learns the hosts' CPU counts (when
 * no N/ says how many slots a host has). Before the loop and the child watcher exist. 0, or
 * -1 after printing why. */
int ssh_setup(struct runner *r);
/* Stops the ControlMasters and removes their directory. After the watcher is closed. */
void ssh_teardown(struct runner *r);
/* The host with the most free room (the lowest share of its slots in use). */
struct host *ssh_pick_host(struct runner *r);
/* The argv that runs argv on j's host (malloc'd, NULL-ended, one block: free() it). */
char **ssh_wrap_argv(struct runner *r, struct job *j, char **argv);

/* report.c */
void bar_start(struct runner *r);
void bar_draw(struct runner *r);
void bar_clear(struct runner *r);
void bar_finish(struct runner *r);
void note_job(struct runner *r, struct job *j);
void print_summary(struct runner *r, double elapsed);
int joblog_open(struct runner *r);
void joblog_write(struct runner *r, struct job *j);
void report_free(struct runner *r);

#endif
