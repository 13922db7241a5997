/* The runner's input: ::: words, or records of files or stdin, made into one string per job
 * (see input.c for its layout). */
#ifndef CA_CLI_INPUT_H
#define CA_CLI_INPUT_H

#include "cli.h"

#include <regex.h>

struct input {
    int fd;              /* the one source read as a stream (stdin or -a FILE), else -1 */
    bool own_fd;         /* we opened it (-a FILE) and close it */
    bool eof;            /* nothing more will be read from fd */
    const char *delim;   /* the record separator: "\n", "\0" with -0, or -d's */
    size_t delim_len;
    struct buf buf;      /* bytes read and not yet taken: [start, len) */
    size_t start, scan;  /* scan: where the search for the next separator resumes */
    /* In-memory sources (::: words, or files read whole because there are several sources
     * or -m/-X needs the total), combined like an odometer; linked ones move together. */
    int nsrc;
    char **vals[CLI_MAX_SOURCES];
    int nval[CLI_MAX_SOURCES], idx[CLI_MAX_SOURCES];
    bool owned[CLI_MAX_SOURCES]; /* ours to free */
    int group[CLI_MAX_SOURCES];  /* the first source of its linked group */
    bool wrap;                   /* --link: shorter sources of a group wrap around */
    int glen[CLI_MAX_SOURCES];   /* per group leader: how many tuples the group gives */
    bool product_done;
    const char *failed;  /* the file that could not be read */

    /* GNU parallel's input syntax. */
    const struct run_options *o;
    bool structured;     /* values carry CLI_VALUE_SEP / CLI_RECORD_SEP */
    bool colsep_literal;
    size_t colsep_len;
    char *colsep;        /* decoded --colsep when literal */
    regex_t colsep_re;
    bool colsep_re_ok;
    bool want_header;    /* --header : still to be read from the stream */
    char **names;        /* --header: column names, names[i] is column i+1 */
    int nnames;
    bool nul_warned, ctl_warned;
    bool ended;          /* -E's end-of-input record was seen */
    int per_job;         /* records per job (1 without -n/-N/-L/-m/-X) */
    bool pack;           /* -m/-X: as many as fit in max_chars */
    long max_len;
    struct buf grp;      /* the records of the job being put together */
    int grp_n;
    char *held;          /* -m/-X: the record that did not fit, first of the next job */
};

/* 0, or -errno when an input file cannot be opened (or, with several sources, read); in->failed
 * names it. Also refuses (-EINVAL, said on stderr) a --colsep that is not a valid regexp. */
int input_open(struct input *in, const struct run_options *o);
/* One read(2): the byte count, 0 at end of input (eof is then set), or -errno. */
int input_fill(struct input *in);
/* The next job's input (malloc'd), or NULL when none is complete yet (or at the end; *oom
 * says whether it was a lack of memory). */
char *input_take(struct input *in, bool *oom);
/* True once every record has been taken. */
bool input_done(const struct input *in);
/* How many jobs there are in all, when known (created: how many were taken), else -1. */
long input_total(const struct input *in, unsigned long created);
void input_close(struct input *in);
/* --header: the column number (from 1) named name (n bytes), or 0. */
int input_column(const struct input *in, const char *name, size_t n);

#endif
