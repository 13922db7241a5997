/* The runner's input source: ::: words, or records of a file or stdin (see input.c). */
#ifndef CA_CLI_INPUT_H
#define CA_CLI_INPUT_H

#include "cli.h"

struct input {
    int fd;              /* -1 for ::: words */
    bool own_fd;         /* we opened it (-a FILE) and close it */
    bool eof;            /* nothing more will be read */
    char sep;            /* '\n', or '\0' with -0 */
    struct buf buf;      /* bytes read and not yet taken: [start, len) */
    size_t start, scan;  /* scan: where the search for the next separator resumes */
    char **args;         /* the ::: words */
    int nargs, next;
    /* Several sources: all their values in memory, combined like an odometer. */
    int nsrc;
    char **vals[CLI_MAX_SOURCES];
    int nval[CLI_MAX_SOURCES], idx[CLI_MAX_SOURCES];
    bool owned[CLI_MAX_SOURCES]; /* read from a file: ours to free */
    bool product_done;
    const char *failed;  /* the file that could not be read */
};

/* 0, or -errno when an input file cannot be opened (or, with several sources, read); in->failed
 * names it. */
int input_open(struct input *in, const struct run_options *o);
/* One read(2): the byte count, 0 at end of input (eof is then set), or -errno. */
int input_fill(struct input *in);
/* The next record (malloc'd), or NULL when none is complete yet (or at the end; *oom says
 * whether it was a lack of memory). Empty records are skipped. */
char *input_take(struct input *in, bool *oom);
/* True once every record has been taken. */
bool input_done(const struct input *in);
/* How many records there are in all, when known (created: how many were taken), else -1. */
long input_total(const struct input *in, unsigned long created);
void input_close(struct input *in);

#endif
