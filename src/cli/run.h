/* The runner's state, shared by run.c (jobs), output.c (printing) and report.c (progress
 * bar, summary, joblog). One runner per process; everything runs on the loop's thread. */
#ifndef CA_CLI_RUNNER_H
#define CA_CLI_RUNNER_H

#include "cli.h"
#include "input.h"

#include <signal.h>

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
    int pending;             /* events still to come: the exit and the two pipes' EOF */
    bool exited;
    bool timed_out;          /* --timeout fired */
    bool stopped;            /* we signalled it because of an interrupt or --halt now */
    int rc;                  /* asyncio's returncode: exit status, or -signal */
    ca_handle *timer;        /* --timeout, then the SIGKILL after the grace period */
    double t_start;          /* loop time */
    double wall_start;       /* epoch seconds, for the joblog */
    double runtime;
    struct buf out, err;     /* output not printed yet */
    struct job *next;        /* queue */
    struct job *rprev, *rnext; /* running list */
};

#define SLOWEST 5
#define FAILURES 5

struct noted {
    double runtime;
    unsigned long seq;
    int rc;
    enum outcome outcome;
    char *display;
};

struct runner {
    const struct run_options *o;
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

    struct job **ring;       /* -k: jobs by seq from next_print to next_seq */
    size_t ring_cap;
    unsigned long next_print, next_seq;

    unsigned long counts[O_COUNT];
    unsigned long ndone, nretried_ok;
    bool stopping;           /* no new jobs */
    int stop_signal;         /* the signal that stopped us (exit 128+N), 0 */
    int interrupts;          /* SIGINT/SIGTERM/SIGHUP received */
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
bool ring_put(struct runner *r, struct job *j);
void job_free(struct job *j);

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
