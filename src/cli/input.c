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

static int open_stream(struct input *in, const char *file)
{
    if (file && strcmp(file, "-") != 0) {
        in->fd = open(file, O_RDONLY | O_CLOEXEC);
        if (in->fd < 0) {
            in->failed = file;
            return -errno;
        }
        in->own_fd = true;
    } else {
        in->fd = STDIN_FILENO;
    }
    return 0;
}

/* Reads every record of file into a new array (*out, *n). */
static int read_all(const char *file, char sep, char ***out, int *n)
{
    struct input f;
    memset(&f, 0, sizeof f);
    f.sep = sep;
    int e = open_stream(&f, file);
    char **v = NULL;
    int k = 0, cap = 0;
    while (e == 0) {
        bool oom;
        char *rec = input_take(&f, &oom);
        if (rec) {
            if (k == cap) {
                cap = cap ? cap * 2 : 16;
                char **nv = realloc(v, (size_t)cap * sizeof *v);
                if (!nv) {
                    free(rec);
                    e = -ENOMEM;
                    break;
                }
                v = nv;
            }
            v[k++] = rec;
            continue;
        }
        if (oom) e = -ENOMEM;
        else if (f.eof) break;
        else if ((e = input_fill(&f)) > 0) e = 0;
    }
    input_close(&f);
    if (e < 0) {
        while (k > 0) free(v[--k]);
        free(v);
        return e;
    }
    *out = v;
    *n = k;
    return 0;
}

int input_open(struct input *in, const struct run_options *o)
{
    memset(in, 0, sizeof *in);
    in->fd = -1;
    in->sep = o->null_sep ? '\0' : '\n';
    if (o->nsrc == 0) return open_stream(in, NULL);
    if (o->nsrc == 1 && !o->src[0].args) return open_stream(in, o->src[0].file);
    if (o->nsrc == 1) {
        in->args = o->src[0].args;
        in->nargs = o->src[0].nargs;
        in->eof = true;
        return 0;
    }
    in->eof = true;
    in->nsrc = o->nsrc;
    for (int i = 0; i < o->nsrc; i++) {
        if (o->src[i].args) {
            in->vals[i] = o->src[i].args;
            in->nval[i] = o->src[i].nargs;
            continue;
        }
        int e = read_all(o->src[i].file, in->sep, &in->vals[i], &in->nval[i]);
        if (e < 0) {
            in->failed = o->src[i].file;
            return e;
        }
        in->owned[i] = true;
    }
    for (int i = 0; i < in->nsrc; i++)
        if (in->nval[i] == 0) in->product_done = true;
    return 0;
}

/* The next combination of several sources: its values joined by CLI_VALUE_SEP. */
static char *take_product(struct input *in, bool *oom)
{
    if (in->product_done) return NULL;
    struct buf b = {0};
    bool ok = true;
    for (int i = 0; i < in->nsrc && ok; i++)
        ok = (i == 0 || buf_addc(&b, CLI_VALUE_SEP)) && buf_adds(&b, in->vals[i][in->idx[i]]);
    if (!ok || !buf_addc(&b, 0)) {
        buf_free(&b);
        *oom = true;
        return NULL;
    }
    int i = in->nsrc - 1;
    while (i >= 0 && ++in->idx[i] == in->nval[i]) in->idx[i--] = 0;
    if (i < 0) in->product_done = true;
    return b.p;
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
    if (in->nsrc) return take_product(in, oom);
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
    if (in->nsrc) return in->product_done;
    if (in->args) return in->next >= in->nargs;
    return in->eof && in->start >= in->buf.len;
}

long input_total(const struct input *in, unsigned long created)
{
    if (in->nsrc) {
        long n = 1;
        for (int i = 0; i < in->nsrc; i++) n *= in->nval[i];
        return n;
    }
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
    for (int i = 0; i < in->nsrc; i++) {
        if (!in->owned[i]) continue;
        for (int k = 0; k < in->nval[i]; k++) free(in->vals[i][k]);
        free(in->vals[i]);
        in->owned[i] = false;
    }
    in->product_done = true;
}
