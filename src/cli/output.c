/* Printing the jobs' output. --group (the default) keeps each job's stdout and stderr in
 * memory and prints them whole when it ends, so outputs never mix; --line-buffer prints whole
 * lines as they come; -k holds finished jobs back until every earlier one is printed (with
 * --line-buffer the oldest unfinished job still prints live). --tag prefixes each line. */
#include "run.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

void output_write(struct runner *r, int fd, const char *p, size_t n)
{
    if (n == 0 || r->output_broken) return;
    bar_clear(r);
    int e = write_all(fd, p, n);
    if (e == -EPIPE) {
        /* The reader went away (| head): stop like a SIGPIPE would, but end the jobs first. */
        r->output_broken = true;
        runner_request_stop(r, SIGPIPE);
    } else if (e < 0) {
        r->output_broken = true;
        runner_fail(r, fd == 1 ? "writing to stdout" : "writing to stderr", e);
    }
}

/* Prints the complete lines of b (all of it when final) and drops them from b. A newline is
 * looked for from `from` on only: what precedes it is known to hold none, so that a long line
 * arriving in many pieces is not scanned again and again. */
static void emit(struct runner *r, struct job *j, int fd, struct buf *b, bool final, size_t from)
{
    size_t end = b->len;
    if (!final) {
        const char *nl = b->len > from ? memrchr(b->p + from, '\n', b->len - from) : NULL;
        end = nl ? (size_t)(nl - b->p) + 1 : 0;
    }
    if (end == 0) return;
    if (!r->o->tag) {
        output_write(r, fd, b->p, end);
    } else {
        struct buf *s = &r->scratch;
        s->len = 0;
        bool ok = true;
        for (size_t i = 0; i < end && ok;) {
            const char *nl = memchr(b->p + i, '\n', end - i);
            size_t k = nl ? (size_t)(nl - (b->p + i)) + 1 : end - i;
            struct job_vars v = {.input = j->input, .seq = j->seq, .slot = j->slot};
            ok = cmd_build_tag(&r->tmpl, &v, s) && buf_addc(s, '\t') && buf_add(s, b->p + i, k);
            i += k;
        }
        if (ok) output_write(r, fd, s->p, s->len);
        else runner_fail(r, "tagging output", -ENOMEM);
        if (s->cap > (1u << 20)) buf_free(s);
    }
    buf_consume(b, end);
}

static bool is_live(struct runner *r, struct job *j)
{
    return r->o->line_buffer && (!r->o->keep_order || j->seq == r->next_print);
}

void output_data(struct runner *r, struct job *j, int fd, const void *p, size_t n)
{
    struct buf *b = fd == 2 ? &j->err : &j->out;
    size_t old_len = b->len;
    if (!buf_add(b, p, n)) {
        runner_fail(r, "buffering a job's output", -ENOMEM);
        return;
    }
    if (is_live(r, j)) emit(r, j, fd == 2 ? 2 : 1, b, false, old_len);
}

void job_free(struct job *j)
{
    if (!j) return;
    buf_free(&j->out);
    buf_free(&j->err);
    free(j->input);
    free(j->display);
    free(j);
}

static void emit_final(struct runner *r, struct job *j)
{
    emit(r, j, 1, &j->out, true, 0);
    emit(r, j, 2, &j->err, true, 0);
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
