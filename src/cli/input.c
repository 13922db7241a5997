/* The job inputs: the words after :::, or the records (lines; NUL-separated with -0; -d's
 * delimiter) of files or of stdin, turned into one string per job.
 *
 * A job's string is its records separated by CLI_RECORD_SEP (several with -n, -N, -L, -m, -X),
 * each record being its values separated by CLI_VALUE_SEP (one per source, ::: a ::: b, or per
 * column, --colsep); command.c takes it apart. A plain one-source input is the record itself.
 *
 * One source read from a file or stdin is streamed: reading is split into input_fill (one
 * read(2)) and input_take (one job), so the runner can read from a loop reader without ever
 * blocking, and only as fast as it starts jobs. Several sources, and -m/-X (which share the
 * inputs out evenly between the jobs, as GNU parallel does), need every value first: they are
 * read whole when the input is opened. */
#include "input.h"

#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define CHUNK 65536
/* GNU parallel's default longest command line for -m/-X (its --max-line-length-allowed on
 * Linux, less room for the environment): the length of one argument word is capped by the
 * kernel at 128 KiB anyway. */
#define DEFAULT_MAX_LEN 130000

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

/* GNU parallel cannot pass a NUL byte in an argument either: it puts the two characters \0
 * in its place and warns. So do we, with the same warning. */
static char *fix_nul(struct input *in, const char *p, size_t n)
{
    size_t nul = 0;
    for (size_t i = 0; i < n; i++) nul += p[i] == 0;
    char *s = malloc(n + nul + 1);
    if (!s) return NULL;
    size_t k = 0;
    for (size_t i = 0; i < n; i++) {
        if (p[i]) {
            s[k++] = p[i];
        } else {
            s[k++] = '\\';
            s[k++] = '0';
        }
    }
    s[k] = 0;
    if (nul && !in->nul_warned) {
        in->nul_warned = true;
        fputs("casyncio: warning: a NUL character in the input was replaced with \\0: NUL cannot "
              "be passed in an argument (did you mean -0?)\n",
              stderr);
    }
    return s;
}

/* The next raw record of the stream (malloc'd), or NULL (none complete yet, the end, or
 * *oom). */
static char *take_record(struct input *in, bool *oom)
{
    if (in->start >= in->buf.len) return NULL;
    if (in->scan < in->start) in->scan = in->start;
    char *base = in->buf.p + in->start;
    size_t avail = in->buf.len - in->start;
    char *end = NULL;
    if (in->buf.len - in->scan >= in->delim_len)
        end = in->delim_len == 1
                  ? memchr(in->buf.p + in->scan, in->delim[0], in->buf.len - in->scan)
                  : memmem(in->buf.p + in->scan, in->buf.len - in->scan, in->delim, in->delim_len);
    size_t n;
    if (end) {
        n = (size_t)(end - base);
    } else if (in->eof) {
        n = avail; /* the last record has no separator */
    } else {
        /* A separator may straddle the end of what is read: look again from its first byte. */
        in->scan = in->buf.len >= in->delim_len - 1 + in->start ? in->buf.len - (in->delim_len - 1)
                                                                : in->start;
        return NULL;
    }
    char *s = fix_nul(in, base, n);
    if (!s) {
        *oom = true;
        return NULL;
    }
    in->start += end ? n + in->delim_len : n;
    in->scan = in->start;
    return s;
}

/* Reads every record of file into a new array (*out, *n). */
static int read_all(struct input *cfg, const char *file, char ***out, int *n)
{
    struct input f;
    memset(&f, 0, sizeof f);
    f.delim = cfg->delim;
    f.delim_len = cfg->delim_len;
    f.nul_warned = cfg->nul_warned;
    int e = open_stream(&f, file);
    char **v = NULL;
    int k = 0, cap = 0;
    while (e == 0) {
        bool oom = false;
        char *rec = take_record(&f, &oom);
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
    cfg->nul_warned = f.nul_warned;
    if (e < 0) cfg->failed = f.failed ? f.failed : file;
    if (f.own_fd) close(f.fd);
    buf_free(&f.buf);
    if (e < 0) {
        while (k > 0) free(v[--k]);
        free(v);
        return e;
    }
    *out = v;
    *n = k;
    return 0;
}

/* Appends value v to b, split into columns by --colsep. */
static bool add_columns(struct input *in, struct buf *b, const char *v)
{
    if (in->colsep_literal) {
        for (;;) {
            const char *c = in->colsep_len ? strstr(v, in->colsep) : NULL;
            if (!c) return buf_adds(b, v);
            if (!buf_add(b, v, (size_t)(c - v)) || !buf_addc(b, CLI_VALUE_SEP)) return false;
            v = c + in->colsep_len;
        }
    }
    if (in->colsep_re_ok) {
        regmatch_t m;
        int flags = 0;
        while (*v && regexec(&in->colsep_re, v, 1, &m, flags) == 0 && m.rm_eo > m.rm_so) {
            if (!buf_add(b, v, (size_t)m.rm_so) || !buf_addc(b, CLI_VALUE_SEP)) return false;
            v += m.rm_eo;
            flags = REG_NOTBOL;
        }
    }
    return buf_adds(b, v);
}

/* Appends one value to a record (which the command takes apart at the separators): a value
 * holding a separator byte itself would be cut there, which we say once. */
static bool add_value(struct input *in, struct buf *b, const char *v)
{
    if (in->structured && !in->ctl_warned && strpbrk(v, "\x1e\x1f")) {
        in->ctl_warned = true;
        fputs("casyncio: warning: an input holds byte 0x1e or 0x1f, which separate values here: "
              "it is split there\n",
              stderr);
    }
    return in->colsep_literal || in->colsep_re_ok ? add_columns(in, b, v) : buf_adds(b, v);
}

/* --header: the names of the columns, from one header value (split by --colsep). */
static int add_names(struct input *in, const char *v)
{
    struct buf b = {0};
    if (!add_columns(in, &b, v) || !buf_addc(&b, 0)) {
        buf_free(&b);
        return -ENOMEM;
    }
    for (char *p = b.p;;) {
        char *sep = strchr(p, CLI_VALUE_SEP);
        if (sep) *sep = 0;
        char **nn = realloc(in->names, (size_t)(in->nnames + 1) * sizeof *nn);
        char *name = nn ? strdup(p) : NULL;
        if (nn) in->names = nn;
        if (!name) {
            buf_free(&b);
            return -ENOMEM;
        }
        in->names[in->nnames++] = name;
        if (!sep) break;
        p = sep + 1;
    }
    buf_free(&b);
    return 0;
}

int input_column(const struct input *in, const char *name, size_t n)
{
    for (int i = 0; i < in->nnames; i++)
        if (strlen(in->names[i]) == n && strncmp(in->names[i], name, n) == 0) return i + 1;
    return 0;
}

static int setup_colsep(struct input *in, const char *cs)
{
    /* A plain string (the usual '\t' or ',') is split on directly; anything else is a regular
     * expression: POSIX extended, with perl's \s \d \w and \t spelled as POSIX classes. */
    bool literal = true;
    for (const char *p = cs; *p; p++) {
        if (strchr(".[]()*+?{}|^$", *p)) literal = false;
        if (*p == '\\' && p[1] && !strchr("tn\\", p[1])) literal = false;
        if (*p == '\\' && p[1]) p++;
    }
    struct buf b = {0};
    bool ok = true;
    for (const char *p = cs; *p && ok; p++) {
        if (*p == '\\' && p[1]) {
            p++;
            switch (*p) {
            case 't': ok = buf_addc(&b, '\t'); break;
            case 'n': ok = buf_addc(&b, '\n'); break;
            case 's': ok = buf_adds(&b, "[[:space:]]"); break;
            case 'S': ok = buf_adds(&b, "[^[:space:]]"); break;
            case 'd': ok = buf_adds(&b, "[0-9]"); break;
            case 'w': ok = buf_adds(&b, "[[:alnum:]_]"); break;
            default: ok = buf_addc(&b, '\\') && buf_addc(&b, *p); break;
            }
        } else {
            ok = buf_addc(&b, *p);
        }
    }
    if (!ok || !buf_addc(&b, 0)) {
        buf_free(&b);
        return -ENOMEM;
    }
    if (literal) {
        in->colsep = b.p;
        in->colsep_len = strlen(b.p);
        in->colsep_literal = true;
        return 0;
    }
    int e = regcomp(&in->colsep_re, b.p, REG_EXTENDED);
    buf_free(&b);
    if (e != 0) {
        fprintf(stderr, "casyncio run: --colsep '%s' is not a regular expression we can use "
                "(POSIX extended, plus \\s \\d \\w \\t)\n", cs);
        return -EINVAL;
    }
    in->colsep_re_ok = true;
    return 0;
}

/* The in-memory sources after -E, -r and --header have been applied to them. */
static int prepare_values(struct input *in, int i)
{
    const struct run_options *o = in->o;
    char **v = in->vals[i];
    int n = in->nval[i];
    if (o->eof_str) {
        for (int k = 0; k < n; k++) {
            if (strcmp(v[k], o->eof_str) != 0) continue;
            if (in->owned[i])
                for (int m = k; m < n; m++) free(v[m]);
            n = k;
            break;
        }
    }
    if (o->header && n > 0) {
        int e = add_names(in, v[0]);
        if (e < 0) return e;
        if (in->owned[i]) free(v[0]);
        v++;
        n--;
        if (in->owned[i]) {
            memmove(in->vals[i], v, (size_t)n * sizeof *v);
            v = in->vals[i];
        }
    }
    if (o->skip_empty) {
        /* Drop the empty values; words of argv are not ours to reorder, so copy them. */
        char **nv = malloc((size_t)(n ? n : 1) * sizeof *nv);
        if (!nv) return -ENOMEM;
        int k = 0;
        for (int m = 0; m < n; m++) {
            if (*v[m]) nv[k++] = v[m];
            else if (in->owned[i]) free(v[m]);
        }
        if (in->owned[i]) free(in->vals[i]);
        v = nv;
        n = k;
        in->owned[i] = true;
        /* The words themselves stay argv's: mark them as such by copying. */
        for (int m = 0; m < n; m++) {
            if (o->src[i].args) {
                char *c = strdup(v[m]);
                if (!c) {
                    for (int q = 0; q < m; q++) free(v[q]);
                    free(v);
                    in->vals[i] = NULL;
                    in->nval[i] = 0;
                    return -ENOMEM;
                }
                v[m] = c;
            }
        }
    }
    in->vals[i] = v;
    in->nval[i] = n;
    return 0;
}

static long tuples(const struct input *in);

int input_open(struct input *in, const struct run_options *o)
{
    memset(in, 0, sizeof *in);
    in->o = o;
    in->fd = -1;
    if (o->delim) {
        in->delim = o->delim;
        in->delim_len = o->delim_len;
    } else {
        in->delim = o->null_sep ? "" : "\n"; /* "" is one NUL byte with its terminator */
        in->delim_len = 1;
    }
    int e;
    if (o->colsep && (e = setup_colsep(in, o->colsep)) < 0) return e;
    in->pack = o->multi == MULTI_M || o->multi == MULTI_X;
    in->per_job = o->multi == MULTI_NONE || o->max_args == 0 ? 1 : o->max_args;
    /* -s counts the command line as parallel's shell sees it: words joined by spaces, shorter
     * than max_chars. max_len is what is left for the inputs and their spaces. */
    in->max_len = (o->max_chars ? o->max_chars : DEFAULT_MAX_LEN) - 1;
    for (int i = 0; i < o->ncmd; i++) in->max_len -= (long)strlen(o->cmd[i]) + 1;
    in->structured = o->nsrc > 1 || o->colsep || o->multi != MULTI_NONE;
    if (o->nsrc <= 1 && !in->pack && (o->nsrc == 0 || !o->src[0].args)) {
        in->want_header = o->header;
        return open_stream(in, o->nsrc ? o->src[0].file : NULL);
    }
    /* Everything in memory. */
    in->eof = true;
    int nsrc = o->nsrc ? o->nsrc : 1;
    in->nsrc = nsrc;
    in->wrap = o->link_all;
    for (int i = 0; i < nsrc; i++) {
        const struct source *s = o->nsrc ? &o->src[i] : NULL;
        if (s && s->args) {
            in->vals[i] = s->args;
            in->nval[i] = s->nargs;
        } else {
            e = read_all(in, s ? s->file : NULL, &in->vals[i], &in->nval[i]);
            if (e < 0) return e;
            in->owned[i] = true;
        }
        if ((e = prepare_values(in, i)) < 0) return e;
        in->group[i] = i > 0 && (o->link_all || (s && s->linked)) ? in->group[i - 1] : i;
    }
    /* How many tuples each linked group gives: the shortest member's count with :::+, the
     * longest with --link (the others wrap around), as GNU parallel does. */
    for (int i = 0; i < nsrc; i++) {
        int g = in->group[i];
        if (g == i) in->glen[g] = in->nval[i];
        else if (in->wrap ? in->nval[i] > in->glen[g] : in->nval[i] < in->glen[g])
            in->glen[g] = in->nval[i];
    }
    for (int i = 0; i < nsrc; i++)
        if (in->nval[i] == 0) in->product_done = true;
    if (in->pack && !in->product_done) {
        /* -m/-X: the inputs shared out evenly between the job slots. */
        long total = tuples(in);
        int jobs = o->jobs > 0 ? o->jobs : 1;
        long per = (total + jobs - 1) / jobs;
        in->per_job = per < 1 ? 1 : per > 1000000 ? 1000000 : (int)per;
    }
    return 0;
}

/* How many tuples the in-memory sources give. */
static long tuples(const struct input *in)
{
    long n = 1;
    for (int i = 0; i < in->nsrc; i++)
        if (in->group[i] == i) n *= in->glen[i];
    return n;
}

/* The next tuple of the in-memory sources: its values joined by CLI_VALUE_SEP. */
static char *take_product(struct input *in, bool *oom)
{
    if (in->product_done) return NULL;
    struct buf b = {0};
    bool ok = true;
    for (int i = 0; i < in->nsrc && ok; i++) {
        int k = in->idx[in->group[i]] % in->nval[i];
        ok = (i == 0 || buf_addc(&b, CLI_VALUE_SEP)) && add_value(in, &b, in->vals[i][k]);
    }
    if (!ok || !buf_addc(&b, 0)) {
        buf_free(&b);
        *oom = true;
        return NULL;
    }
    int i = in->nsrc - 1;
    for (; i >= 0; i--) {
        if (in->group[i] != i) continue; /* linked: moves with its group's first source */
        if (++in->idx[i] < in->glen[i]) break;
        in->idx[i] = 0;
    }
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

/* The next record of the stream, with -E, --header, -r and --colsep applied. */
static char *take_stream_row(struct input *in, bool *oom)
{
    for (;;) {
        if (in->ended) return NULL;
        char *rec = take_record(in, oom);
        if (!rec) return NULL;
        if (in->o->eof_str && strcmp(rec, in->o->eof_str) == 0) {
            free(rec);
            /* Nothing after it is read: the runner stops reading the stream. */
            in->ended = true;
            in->eof = true;
            in->start = in->buf.len;
            return NULL;
        }
        if (in->want_header) {
            in->want_header = false;
            int e = add_names(in, rec);
            free(rec);
            if (e < 0) {
                *oom = true;
                return NULL;
            }
            continue;
        }
        /* A blank line is a job with an empty argument, as in GNU parallel (-r skips it). */
        if (!*rec && in->o->skip_empty) {
            free(rec);
            continue;
        }
        if (!in->structured) return rec;
        struct buf b = {0};
        bool ok = add_value(in, &b, rec) && buf_addc(&b, 0);
        free(rec);
        if (!ok) {
            buf_free(&b);
            *oom = true;
            return NULL;
        }
        return b.p;
    }
}

static char *take_row(struct input *in, bool *oom)
{
    return in->nsrc ? take_product(in, oom) : take_stream_row(in, oom);
}

static bool rows_done(const struct input *in)
{
    if (in->nsrc) return in->product_done;
    return in->ended || (in->eof && in->start >= in->buf.len);
}

static char *flush_group(struct input *in, bool *oom)
{
    if (!buf_addc(&in->grp, 0)) {
        *oom = true;
        return NULL;
    }
    char *s = in->grp.p;
    in->grp = (struct buf){0};
    in->grp_n = 0;
    return s;
}

char *input_take(struct input *in, bool *oom)
{
    *oom = false;
    if (in->per_job == 1 && !in->pack) return take_row(in, oom);
    for (;;) {
        char *row = in->held ? in->held : take_row(in, oom);
        in->held = NULL;
        if (!row) {
            if (*oom || in->grp_n == 0 || !rows_done(in)) return NULL;
            return flush_group(in, oom);
        }
        size_t n = strlen(row);
        /* -m/-X: no longer than a command line may be; the record that would not fit starts
         * the next job (so the order of the inputs is kept). */
        if (in->pack && in->grp_n > 0 && (long)(in->grp.len + 1 + n) > in->max_len) {
            in->held = row;
            return flush_group(in, oom);
        }
        bool ok = (in->grp_n == 0 || buf_addc(&in->grp, CLI_RECORD_SEP)) && buf_add(&in->grp, row, n);
        free(row);
        if (!ok) {
            *oom = true;
            return NULL;
        }
        in->grp_n++;
        if (in->grp_n == in->per_job || rows_done(in)) return flush_group(in, oom);
    }
}

bool input_done(const struct input *in) { return rows_done(in) && in->grp_n == 0 && !in->held; }

long input_total(const struct input *in, unsigned long created)
{
    if (in->nsrc && !in->pack) return (tuples(in) + in->per_job - 1) / in->per_job;
    return input_done(in) ? (long)created : -1;
}

void input_close(struct input *in)
{
    if (in->own_fd && in->fd >= 0) close(in->fd);
    in->fd = -1;
    in->own_fd = false;
    in->eof = true;
    buf_free(&in->buf);
    buf_free(&in->grp);
    in->grp_n = 0;
    free(in->held);
    in->held = NULL;
    in->start = in->scan = 0;
    for (int i = 0; i < in->nsrc; i++) {
        if (!in->owned[i]) continue;
        for (int k = 0; k < in->nval[i]; k++) free(in->vals[i][k]);
        free(in->vals[i]);
        in->owned[i] = false;
    }
    in->nsrc = 0;
    in->product_done = true;
    free(in->colsep);
    in->colsep = NULL;
    in->colsep_literal = false;
    if (in->colsep_re_ok) regfree(&in->colsep_re);
    in->colsep_re_ok = false;
    for (int i = 0; i < in->nnames; i++) free(in->names[i]);
    free(in->names);
    in->names = NULL;
    in->nnames = 0;
}
