/* The job inputs: the words after :::, or the lines (NUL-separated records with -0) of a file
 * or of stdin. Reading is split into input_fill (one read(2)) and input_take (one record), so
 * the runner can read from a loop reader without ever blocking, and only as fast as it starts
 * jobs. */
#include "input.h"

#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define CHUNK 65536

int input_open(struct input *in, const struct run_options *o)
{
    memset(in, 0, sizeof *in);
    in->fd = -1;
    in->sep = o->null_sep ? '\0' : '\n';
    if (o->have_args) {
        in->args = o->args;
        in->nargs = o->nargs;
        in->eof = true;
        return 0;
    }
    if (o->arg_file && strcmp(o->arg_file, "-") != 0) {
        in->fd = open(o->arg_file, O_RDONLY | O_CLOEXEC);
        if (in->fd < 0) return -errno;
        in->own_fd = true;
    } else {
        in->fd = STDIN_FILENO;
    }
    return 0;
}

int input_fill(struct input *in)
{
    if (in->eof || in->fd < 0) return 0;
    /* Keep the unread tail at the front, so the buffer holds at most one chunk more than the
     * longest record. */
    if (in->start > 0) {
        buf_consume(&in->buf, in->start);
        in->scan = in->scan > in->start ? in->scan - in->start : 0;
        in->start = 0;
    }
    if (in->buf.cap - in->buf.len < CHUNK) {
        size_t cap = in->buf.cap ? in->buf.cap : CHUNK;
        while (cap - in->buf.len < CHUNK) cap *= 2;
        char *p = realloc(in->buf.p, cap);
        if (!p) return -ENOMEM;
        in->buf.p = p;
        in->buf.cap = cap;
    }
    ssize_t n;
    do {
        n = read(in->fd, in->buf.p + in->buf.len, in->buf.cap - in->buf.len);
    } while (n < 0 && errno == EINTR);
    if (n < 0) {
        if (errno == EAGAIN) return -EAGAIN;
        int e = -errno;
        in->eof = true;
        return e;
    }
    if (n == 0) {
        in->eof = true;
        return 0;
    }
    in->buf.len += (size_t)n;
    return (int)n;
}

static char *dup_range(const char *p, size_t n)
{
    char *s = malloc(n + 1);
    if (!s) return NULL;
    memcpy(s, p, n);
    s[n] = 0;
    return s;
}

char *input_take(struct input *in, bool *oom)
{
    *oom = false;
    if (in->args) {
        if (in->next >= in->nargs) return NULL;
        char *s = strdup(in->args[in->next++]);
        if (!s) {
            in->next--;
            *oom = true;
        }
        return s;
    }
    for (;;) {
        if (in->start >= in->buf.len) return NULL;
        if (in->scan < in->start) in->scan = in->start;
        char *base = in->buf.p + in->start;
        size_t avail = in->buf.len - in->start;
        char *end = memchr(in->buf.p + in->scan, in->sep, in->buf.len - in->scan);
        size_t n;
        if (end) {
            n = (size_t)(end - base);
        } else if (in->eof) {
            n = avail; /* the last record has no separator */
        } else {
            in->scan = in->buf.len;
            return NULL;
        }
        size_t used = end ? n + 1 : n;
        /* Empty records (blank lines) run nothing, as with xargs. */
        if (n == 0) {
            in->start += used;
            continue;
        }
        char *s = dup_range(base, n);
        if (!s) {
            *oom = true;
            return NULL;
        }
        in->start += used;
        in->scan = in->start;
        return s;
    }
}

bool input_done(const struct input *in)
{
    if (in->args) return in->next >= in->nargs;
    return in->eof && in->start >= in->buf.len;
}

long input_total(const struct input *in, unsigned long created)
{
    if (in->args) return in->nargs;
    return input_done(in) ? (long)created : -1;
}

void input_close(struct input *in)
{
    if (in->own_fd && in->fd >= 0) close(in->fd);
    in->fd = -1;
    in->eof = true;
    buf_free(&in->buf);
    in->start = in->scan = 0;
}
