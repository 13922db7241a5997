/*
 * The casyncio command: shared declarations of the job runner (`casyncio run`) and of
 * `casyncio info`. The runner is written against the public <casyncio.h>, the way any user of
 * the library would write it, plus the library's tables of loop and watcher kinds (src/kinds.h,
 * self-contained), so that a new loop or watcher kind needs no change here.
 */
#ifndef CA_CLI_H
#define CA_CLI_H

#include "casyncio.h"

#include <stdbool.h>
#include <stddef.h>
#include <stdio.h>

/* GNU parallel's codes: bad usage and the runner's own errors are both 255, so that 1-101
 * always means "this many jobs failed". */
#define CLI_EXIT_USAGE 255
#define CLI_EXIT_ERROR 255
#define CLI_MAX_FAILED_STATUS 101
#define CLI_MAX_SOURCES 32
#define CLI_MAX_SSH 32
/* Separates the values of one input made of several sources (::: a b ::: 1 2) or columns
 * (--colsep). */
#define CLI_VALUE_SEP '\x1f'
/* Separates the records of one job made of several (-n, -N, -L, -m, -X). */
#define CLI_RECORD_SEP '\x1e'

/* ----- growable byte buffer (buf.c) ----------------------------------------------------- */

struct buf {
    char *p;
    size_t len, cap;
};

/* Appends n bytes; false on out of memory (the buffer is then unchanged). */
bool buf_add(struct buf *b, const void *data, size_t n);
bool buf_adds(struct buf *b, const char *s);
bool buf_addc(struct buf *b, char c);
/* Drops the first n bytes. */
void buf_consume(struct buf *b, size_t n);
void buf_free(struct buf *b);
/* Writes all of data to fd, retrying on EINTR and short writes: 0 or -errno. */
int write_all(int fd, const void *data, size_t n);

/* ----- options (options.c) -------------------------------------------------------------- */

enum halt_when { HALT_NEVER, HALT_SOON, HALT_NOW };
enum halt_on { HALT_ON_FAIL, HALT_ON_SUCCESS, HALT_ON_DONE };
/* The library's tables of kinds (src/kinds.h) are the lists: a loop_kind is an index of
 * ca__loop_kinds, a watcher_kind other than W_DEFAULT one plus an index of ca__watcher_kinds
 * (the names below are for the code that picks one; a new kind needs none). */
enum loop_kind { LOOP_EPOLL, LOOP_POLL, LOOP_URING };
enum watcher_kind { W_DEFAULT, W_THREADED, W_MULTILOOP, W_SAFE, W_FAST, W_PIDFD, W_URING };

struct run_options {
    int jobs;                    /* -j: how many jobs run at once */
    double timeout;              /* --timeout: seconds per job, 0 = none */
    double grace;                /* seconds between SIGTERM and SIGKILL */
    int retries;                 /* --retries: extra attempts after a failure */
    enum halt_when halt_when;    /* --halt */
    enum halt_on halt_on;
    int halt_count;              /* halt after this many ... */
    int halt_percent;            /* ... or this percentage (when > 0) */
    bool keep_order;             /* -k */
    bool line_buffer;            /* --line-buffer (else --group) */
    bool tag;                    /* --tag */
    const char *joblog;          /* --joblog FILE */
    int bar;                     /* --bar: 1, --no-bar: 0, default -1 (a terminal) */
    int summary;                 /* --summary: 1, --no-summary: 0, default -1 (a terminal) */
    bool dry_run;
    bool shell;                  /* --shell: run COMMAND through sh -c */
    bool null_sep;               /* -0: inputs are NUL-separated */
    enum loop_kind loop;
    enum watcher_kind watcher;
    char **cmd;                  /* COMMAND [ARG...], not NULL-terminated */
    int ncmd;
    /* The input sources, in order: ::: words, or files (-a FILE, :::: FILE; "-" is stdin).
     * None: stdin. Several: every combination, the last source varying fastest. */
    struct source {
        char **args;             /* NULL for a file */
        int nargs;
        const char *file;
        bool linked;             /* :::+ / ::::+: read side by side with the source before */
    } src[CLI_MAX_SOURCES];
    int nsrc;

    /* ----- GNU parallel compatibility (options.c, input.c, command.c, compat.c) ----- */
    enum multi_mode {
        MULTI_NONE,
        MULTI_N,                 /* -n N: N records per job; {} is all of them */
        MULTI_NN,                /* -N N, -L N: N records per job; {} repeats its word (-X) */
        MULTI_M,                 /* -m, --xargs: as many as fit; {} is all of them */
        MULTI_X,                 /* -X: as many as fit; {} repeats its word */
    } multi;
    int max_args;                /* -n/-N/-L (0 with -m/-X: as many as -s allows) */
    long max_chars;              /* -s: the longest command line for -m/-X */
    const char *delim;           /* -d, decoded (\n \t \0 \\ ...) */
    size_t delim_len;
    const char *colsep;          /* --colsep REGEXP */
    bool header;                 /* --header : (the first record names the columns) */
    bool link_all;               /* --link: every source read side by side */
    bool skip_empty;             /* -r: blank records run nothing */
    const char *eof_str;         /* -E: input ends at this record */
    const char *tagstring;       /* --tagstring STR (replacement strings allowed) */
    const char *repl[7];         /* -I, --er, --bnr, --dnr, --bner, --seqreplace, --slotreplace */
    const char *arg_sep;         /* --arg-sep (default :::) */
    const char *arg_file_sep;    /* --arg-file-sep (default ::::) */
    bool ungroup;                /* -u: jobs write straight to our stdout/stderr */
    bool print_cmd;              /* -t/--verbose: each command on stderr before it runs */
    bool verbose;                /* -v: each command on stdout, before its output */
    const char *results;         /* --results DIR */
    int resume;                  /* 1: --resume, 2: --resume-failed (needs --joblog) */
    double delay;                /* --delay SECS between job starts */
    double timeout_pct;          /* --timeout N%: N% of the median runtime (0: off) */
    long long memfree;           /* --memfree BYTES: start jobs only above this */
    double load_max;             /* --load N: start jobs only below this load average */
    bool eta;                    /* --eta: the ETA on stderr (with the bar) */

    /* ----- other machines (ssh.c): -S and its friends, kept together ----- */
    const char *sshlogin[CLI_MAX_SSH];     /* -S values, each may hold several, comma-separated */
    int nsshlogin;
    const char *sshloginfile[CLI_MAX_SSH]; /* --sshloginfile; ".." is ~/.parallel/sshloginfile */
    int nsshloginfile;
    const char *ssh_cmd;                   /* --ssh CMD (default "ssh") */
    const char *transfer[CLI_MAX_SSH];     /* --transferfile FILE (may hold {}) */
    int ntransfer;
    const char *ret[CLI_MAX_SSH];          /* --return FILE (may hold {}) */
    int nret;
    bool cleanup;                          /* --cleanup */
};

/* The options of ssh.c (-S, --sshloginfile, --ssh, --transferfile, --return, --cleanup, --trc,
 * -M): 1 if argv[*i] is one of them (consumed, with its value), 0 if not, or CLI_EXIT_USAGE
 * after printing a message. */
int parse_ssh_option(int argc, char **argv, int *i, struct run_options *o);

/* Parses argv (after the word "run"). Returns 0, or prints a message and returns
 * CLI_EXIT_USAGE. *help is set for --help (then the caller prints the run usage). */
int parse_run_options(int argc, char **argv, struct run_options *o, bool *help);
/* Prints "casyncio run: <message>" and the usage hint; returns CLI_EXIT_USAGE. */
int usage_error(const char *fmt, const char *what);
void print_run_usage(FILE *f);
int default_jobs(void);
const char *loop_kind_name(enum loop_kind k);
const char *watcher_kind_name(enum watcher_kind k);

/* ----- commands: replacement strings and quoting (command.c) ---------------------------- */

struct input;

struct cmd_template {
    char **tok;           /* the COMMAND words as given */
    int ntok;
    bool append_input;    /* no replacement string in COMMAND: the input is the last argument */
    bool shell;           /* run as sh -c SCRIPT */
    bool input_is_script; /* no COMMAND: each input is a shell command line */
    bool multi;           /* inputs hold several values (CLI_VALUE_SEP, CLI_RECORD_SEP) */
    bool context;         /* -X, -N, -L: a word with {} is repeated for each value */
    bool no_args;         /* -n 0, -N 0: the inputs are only counted */
    const char *repl[7];  /* {} {.} {/} {//} {/.} {#} {%}, or what -I, --er... made them */
    const char *tagstring;
    bool names;           /* --header: {name} is a column */
    const struct input *in; /* where the column names are (set by the runner) */
};

struct job_vars {
    const char *input;
    unsigned long seq;
    int slot;
};

void cmd_template_init(struct cmd_template *t, const struct run_options *o);
/* Builds the argv to execute (NULL-terminated, in one allocation: free() the array) and the
 * display text of the command (for --dry-run and the joblog; free() it). NULL on ENOMEM. */
char **cmd_build_argv(const struct cmd_template *t, const struct job_vars *v);
char *cmd_build_display(const struct cmd_template *t, const struct job_vars *v);
/* The --tag / --tagstring text of a job, appended to b (no terminator). */
bool cmd_build_tag(const struct cmd_template *t, const struct job_vars *v, struct buf *b);
/* When a command could not be started (err: -errno of the spawn) in a way a shell would have
 * avoided ('echo pre-{}' given as one word, say), a hint that names --shell; else "". */
const char *cmd_shell_hint(const struct cmd_template *t, const char *argv0, int err);
/* Appends s to b, quoted for sh(1) if it needs to be. */
bool shell_quote(struct buf *b, const char *s);

/* ----- GNU parallel compatibility for the runner (compat.c) ------------------------------ */

/* Checks the combinations of options (and says what is refused): 0 or CLI_EXIT_USAGE. */
int compat_check_options(struct run_options *o);
/* At the start of a run (loads --resume's joblog, makes --results DIR): 0 or -errno (said). */
int compat_begin(const struct run_options *o);
void compat_end(void);
/* --resume/--resume-failed: the joblog says job seq is done. */
bool compat_skip(unsigned long seq);
/* --delay, --memfree, --load: whether a job may start now; if not, wake(arg) is called from
 * the loop when it is worth asking again. */
bool compat_may_start(ca_loop *loop, int nrunning, void (*wake)(void *), void *arg);
void compat_job_started(ca_loop *loop);
/* --timeout N%: note a successful job's runtime; the timeout for the next job (0: none). */
void compat_job_succeeded(double runtime);
double compat_timeout(void);
/* --results DIR: writes the job's seq, stdout and stderr files, each from what a spooled
 * stream holds (the first flen bytes of fd when fd >= 0, then the buffer): 0 or -errno
 * (said). */
int compat_results(unsigned long seq, const char *input, int out_fd, long long out_flen,
                   const struct buf *out, int err_fd, long long err_flen, const struct buf *err);
/* --halt: is the condition met (job_rc: the returncode of the job just done)? */
bool compat_halt_hit(unsigned long failed, unsigned long ok, unsigned long done, long total,
                     int job_rc);
/* The exit status after a halt (total: the number of jobs, -1 if not known; done: how many
 * ended). */
int compat_halt_status(unsigned long failed, long total, unsigned long done);

/* ----- the runner (run.c) ------------------------------------------------------------ */

int run_main(const struct run_options *o);

/* ----- info (info.c) -------------------------------------------------------------------- */

int info_main(int argc, char **argv);
/* Which watcher the runner uses when none is asked for, after probing this machine. */
enum watcher_kind pick_default_watcher(void);
/* Makes a watcher of the given kind (not W_DEFAULT): 0 or -errno. */
int make_watcher(enum watcher_kind k, ca_child_watcher **out);
/* Makes and installs the event loop policy of the given kind: 0 or -errno. */
int make_policy(enum loop_kind k, ca_policy **out);

#endif
