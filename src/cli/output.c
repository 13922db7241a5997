/* Printing the jobs' output. --group (the default) keeps each job's stdout and stderr until it
 * ends and prints them whole, so outputs never mix; --line-buffer prints whole lines as they
 * come; -k holds finished jobs back until every earlier one is printed (with --line-buffer the
 * oldest unfinished job still prints live). --tag prefixes each line. What is held is kept in
 * memory up to SPILL_THRESHOLD bytes per stream, and beyond that in an unlinked temporary file
 * (as GNU parallel spools to $TMPDIR), so a job printing gigabytes costs disk, not memory. */
#include "run.h"

#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define COPY_CHUNK 65536

void output_write(struct runner *r, int fd, const char *p, size_t n)
{
    if (n == 0 || r->output_broken || (fd == 2 && r->err_broken)) return;
    bar_clear(r);
    int e = write_all(fd, p, n);
    if (e == 0) {
        if (fd == 2 || r->tty_shared) r->tty_mid_line = p[n - 1] != '\n';
        return;
    }
    if (fd == 2) {
        /* Our stderr is gone or broken: the jobs' error output is lost, but their results are
         * not, so the run goes on (the exit status still tells of failures). */
        r->err_broken = true;
    } else if (e == -EPIPE) {
        /* The reader went away (| head): stop like a SIGPIPE would, but end the jobs first. */
        r->output_broken = true;
        runner_request_stop(r, SIGPIPE);
    } else {
        r->output_broken = true;
        runner_fail(r, "writing to stdout", e);
    }
}

void spool_init(struct spool *s)
{
    memset(s, 0, sizeof *s);
    s->fd = -1;
}

/* Forgets what the stream held (a retried job starts afresh); keeps its file for reuse. */
void spool_reset(struct spool *s)
{
    s->mem.len = 0;
    s->mid_line = false;
    if (s->fd >= 0 && s->flen > 0 && (ftruncate(s->fd, 0) != 0 || lseek(s->fd, 0, SEEK_SET) != 0)) {
        close(s->fd);
        s->fd = -1;
    }
    s->flen = 0;
}

/* Appends all the stream holds (its file, then memory) to out; false on an error. */
bool spool_flatten(const struct spool *sp, struct buf *out)
{
    char chunk[65536];
    for (off_t off = 0; sp->fd >= 0 && off < sp->flen;) {
        ssize_t m = pread(sp->fd, chunk, sizeof chunk, off);
        if (m < 0 && errno == EINTR) continue;
        if (m <= 0 || !buf_add(out, chunk, (size_t)m)) return false;
        off += m;
    }
    return buf_add(out, sp->mem.p ? sp->mem.p : "", sp->mem.len);
}

void spool_free(struct spool *s)
{
    buf_free(&s->mem);
    if (s->fd >= 0) close(s->fd);
    s->fd = -1;
    s->flen = 0;
}

/* An anonymous file in $TMPDIR (else /tmp): O_TMPFILE where the file system has it, else a
 * name made by mkstemp and unlinked at once. Nothing is left on disk whatever happens. */
static int spill_file(void)
{
    const char *dir = getenv("TMPDIR");
    if (!dir || !*dir) dir = "/tmp";
    int fd = open(dir, O_TMPFILE | O_RDWR | O_CLOEXEC, 0600);
    if (fd >= 0) return fd;
    char path[4096];
    if (snprintf(path, sizeof path, "%s/casyncio-out-XXXXXX", dir) >= (int)sizeof path)
        return -ENAMETOOLONG;
    fd = mkostemp(path, O_CLOEXEC);
    if (fd < 0) return -errno;
    unlink(path);
    return fd;
}

/* Writes p to fd; with --tag, each line that starts here gets the job's input and a tab. */
static void write_tagged(struct runner *r, struct job *j, int fd, struct spool *sp,
                         const char *p, size_t n)
{
    if (n == 0) return;
    if (!r->o->tag) {
        output_write(r, fd, p, n);
        sp->mid_line = p[n - 1] != '\n';
        return;
    }
    struct buf *s = &r->scratch;
    s->len = 0;
    bool ok = true;
    for (size_t i = 0; i < n && ok;) {
        const char *nl = memchr(p + i, '\n', n - i);
        size_t k = nl ? (size_t)(nl - (p + i)) + 1 : n - i;
        if (!sp->mid_line) {
            struct job_vars v = {.input = j->input, .seq = j->seq, .slot = j->slot};
            ok = cmd_build_tag(&r->tmpl, &v, s); /* --tag, --tagstring */
        }
        ok = ok && (sp->mid_line || buf_addc(s, '\t')) && buf_add(s, p + i, k);
        sp->mid_line = !nl;
        i += k;
    }
    if (ok) output_write(r, fd, s->p, s->len);
    else runner_fail(r, "tagging output", -ENOMEM);
    if (s->cap > (1u << 20)) buf_free(s);
}

/* Prints what the stream's file holds, and empties the file. */
static void emit_file(struct runner *r, struct job *j, int fd, struct spool *sp)
{
    if (sp->fd < 0 || sp->flen == 0) return;
    char *chunk = malloc(COPY_CHUNK);
    if (!chunk) {
        runner_fail(r, "printing a job's output", -ENOMEM);
        return;
    }
    for (off_t off = 0; off < sp->flen && !r->output_broken;) {
        size_t want = sp->flen - off < COPY_CHUNK ? (size_t)(sp->flen - off) : COPY_CHUNK;
        ssize_t m = pread(sp->fd, chunk, want, off);
        if (m < 0 && errno == EINTR) continue;
        if (m <= 0) {
            runner_fail(r, "reading back a job's spooled output", m < 0 ? -errno : -EIO);
            break;
        }
        write_tagged(r, j, fd, sp, chunk, (size_t)m);
        off += m;
    }
    free(chunk);
    if (ftruncate(sp->fd, 0) != 0 || lseek(sp->fd, 0, SEEK_SET) != 0) {
        close(sp->fd);
        sp->fd = -1;
    }
    sp->flen = 0;
}

/* Prints the complete lines of the stream (all of it when final) and drops them. A newline is
 * looked for from `from` on only: what precedes it is known to hold none, so that a long line
 * arriving in many pieces is not scanned again and again. A line longer than SPILL_THRESHOLD
 * is printed in pieces rather than held. */
static void emit(struct runner *r, struct job *j, int fd, struct spool *sp, bool final,
                 size_t from)
{
    emit_file(r, j, fd, sp);
    struct buf *b = &sp->mem;
    size_t end = b->len;
    if (!final && b->len <= SPILL_THRESHOLD) {
        const char *nl = b->len > from ? memrchr(b->p + from, '\n', b->len - from) : NULL;
        end = nl ? (size_t)(nl - b->p) + 1 : 0;
    }
    if (end == 0) return;
    write_tagged(r, j, fd, sp, b->p, end);
    buf_consume(b, end);
    if (b->cap > SPILL_THRESHOLD && b->len < b->cap / 4) {
        /* Give back the memory of a large burst. */
        char *p = b->len ? malloc(b->len) : NULL;
        if (p || !b->len) {
            if (p) memcpy(p, b->p, b->len);
            free(b->p);
            b->p = p;
            b->cap = b->len;
        }
    }
}

static bool is_live(struct runner *r, struct job *j)
{
    return r->o->line_buffer && (!r->o->keep_order || j->seq == r->next_print);
}

/* Moves what the stream holds in memory to its file (made on first use). */
static int spill(struct spool *sp, const void *p, size_t n)
{
    if (sp->fd < 0) {
        int fd = spill_file();
        if (fd < 0) return fd;
        sp->fd = fd;
        sp->flen = 0;
    }
    if (sp->mem.len) {
        int e = write_all(sp->fd, sp->mem.p, sp->mem.len);
        if (e < 0) return e;
        sp->flen += (off_t)sp->mem.len;
        buf_free(&sp->mem);
    }
    if (n) {
        int e = write_all(sp->fd, p, n);
        if (e < 0) return e;
        sp->flen += (off_t)n;
    }
    return 0;
}

void output_data(struct runner *r, struct job *j, int fd, const void *p, size_t n)
{
    struct spool *sp = fd == 2 ? &j->err : &j->out;
    if (!is_live(r, j) && (sp->flen > 0 || sp->mem.len + n > SPILL_THRESHOLD)) {
        int e = spill(sp, p, n);
        if (e < 0) runner_fail(r, "spooling a job's output to $TMPDIR", e);
        return;
    }
    size_t old_len = sp->mem.len;
    if (!buf_add(&sp->mem, p, n)) {
        runner_fail(r, "buffering a job's output", -ENOMEM);
        return;
    }
    if (is_live(r, j)) emit(r, j, fd == 2 ? 2 : 1, sp, false, old_len);
}

void job_free(struct job *j)
{
    if (!j) return;
    spool_free(&j->out);
    spool_free(&j->err);
    free(j->input);
    free(j->display);
    free(j);
}

static void emit_final(struct runner *r, struct job *j)
{
    emit(r, j, 1, &j->out, true, 0);
    emit(r, j, 2, &j->err, true, 0);
    /* The files are not needed any more: give their fds back before the job is freed (-k may
     * keep finished jobs a while). */
    spool_free(&j->out);
    spool_free(&j->err);
}

bool ring_put(struct runner *r, struct job *j)
{
    unsigned long window = j->seq + 1 - r->next_print;
    if (window > r->ring_cap) {
        size_t cap = r->ring_cap ? r->ring_cap : 64;
        while (cap < window) cap *= 2;
        struct job **ring = calloc(cap, sizeof *ring);
        if (!ring) return false;
        for (unsigned long s = r->next_print; s < j->seq; s++)
            ring[s % cap] = r->ring[s % r->ring_cap];
        free(r->ring);
        r->ring = ring;
        r->ring_cap = cap;
    }
    r->ring[j->seq % r->ring_cap] = j;
    return true;
}

void output_job_done(struct runner *r, struct job *j)
{
    if (!r->o->keep_order) {
        emit_final(r, j);
        job_free(j);
        return;
    }
    /* Print every finished job at the head of the input order, then let the new head (if it
     * is running) print what it has so far in --line-buffer mode. */
    struct job *h;
    while (r->next_print < r->next_seq && (h = r->ring[r->next_print % r->ring_cap]) != NULL &&
           h->state == J_DONE) {
        r->ring[r->next_print % r->ring_cap] = NULL;
        r->next_print++;
        emit_final(r, h);
        job_free(h);
    }
    if (r->o->line_buffer && r->next_print < r->next_seq) {
        h = r->ring[r->next_print % r->ring_cap];
        if (h) {
            emit(r, h, 1, &h->out, false, 0);
            emit(r, h, 2, &h->err, false, 0);
        }
    }
}
