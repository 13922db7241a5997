/* What the runner tells the user besides the jobs' output: the progress bar (stderr, redrawn
 * in place), the joblog (GNU parallel's format, so existing scripts can read it) and the
 * closing summary (outcomes, failed and slowest jobs). */
#include "run.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <unistd.h>

#define BAR_PERIOD 0.1

static const char *const outcome_names[O_COUNT] = {
    [O_OK] = "succeeded",
    [O_FAILED] = "failed",
    [O_SIGNAL] = "killed by a signal",
    [O_TIMEOUT] = "timed out",
    [O_NOEXEC] = "could not start",
    [O_STOPPED] = "stopped (interrupted or halted)",
    [O_SKIPPED] = "not started",
};

static unsigned long failed_count(const struct runner *r)
{
    return r->counts[O_FAILED] + r->counts[O_SIGNAL] + r->counts[O_TIMEOUT] + r->counts[O_NOEXEC];
}

static void fmt_duration(char *b, size_t n, double s)
{
    if (s < 0 || s > 1e7) {
        snprintf(b, n, "?");
        return;
    }
    long t = (long)(s + 0.5);
    if (t >= 3600) snprintf(b, n, "%ld:%02ld:%02ld", t / 3600, t / 60 % 60, t % 60);
    else snprintf(b, n, "%ld:%02ld", t / 60, t % 60);
}

static int term_width(void)
{
    struct winsize ws;
    if (ioctl(2, TIOCGWINSZ, &ws) == 0 && ws.ws_col >= 20) return ws.ws_col;
    return 80;
}

/* ----- progress bar ------------------------------------------------------------------------ */

void bar_draw(struct runner *r)
{
    if (!r->bar || r->output_broken) return;
    if (r->tty_mid_line) {
        /* The last output ended inside a line: the bar goes below it rather than over it. */
        write_all(2, "\n", 1);
        r->tty_mid_line = false;
    }
    double elapsed = ca_loop_time(r->loop) - r->t0;
    unsigned long done = r->ndone + r->counts[O_SKIPPED];
    long known = input_total(&r->in, r->next_seq - 1);
    bool total_known = known >= 0;
    unsigned long total = total_known ? (unsigned long)known : 0;
    char left[64], right[128], eta[32];
    if (total_known && total > 0) {
        fmt_duration(eta, sizeof eta, done ? elapsed / (double)done * (double)(total - done) : -1);
        snprintf(left, sizeof left, "%3lu%% %lu/%lu done,", done * 100 / total, done, total);
    } else {
        fmt_duration(eta, sizeof eta, -1);
        snprintf(left, sizeof left, "%lu/? done,", done);
    }
    char el[32];
    fmt_duration(el, sizeof el, elapsed);
    snprintf(right, sizeof right, " %d running, %lu failed, %s elapsed, ETA %s", r->nrunning,
             failed_count(r), el, r->finished ? "0:00" : eta);
    /* A bar of steady width; dropped when the line would not fit the terminal. */
    int width = term_width() - 1;
    int bw = width - 66;
    bw = bw < 10 ? 10 : bw > 40 ? 40 : bw;
    int text = (int)strlen(left) + (int)strlen(right);
    if (text + bw + 3 > width) bw = 0;
    char line[512];
    size_t pos = 0;
    line[pos++] = '\r';
    if (bw > 0 && total_known && total > 0) {
        int fill = (int)((double)bw * (double)done / (double)total);
        line[pos++] = '[';
        for (int i = 0; i < bw; i++) line[pos++] = i < fill ? '#' : (i == fill ? '>' : '.');
        line[pos++] = ']';
        line[pos++] = ' ';
    }
    size_t room = (size_t)width + 1 > pos ? (size_t)width + 1 - pos : 1;
    if (room > sizeof line - pos - 8) room = sizeof line - pos - 8;
    int k = snprintf(line + pos, room, "%s%s", left, right);
    pos += k < 0 ? 0 : (size_t)k < room ? (size_t)k : room - 1;
    memcpy(line + pos, "\033[K", 3);
    pos += 3;
    write_all(2, line, pos);
    r->bar_drawn = true;
}

void bar_clear(struct runner *r)
{
    if (!r->bar_drawn) return;
    write_all(2, "\r\033[K", 4);
    r->bar_drawn = false;
}

static void bar_tick(void *arg)
{
    struct runner *r = arg;
    r->bar_timer = ca_handle_unref(r->bar_timer);
    if (r->finished) return;
    bar_draw(r);
    ca_loop_call_later(r->loop, BAR_PERIOD, bar_tick, r, &r->bar_timer);
}

void bar_start(struct runner *r)
{
    r->bar = r->o->bar == 1 || (r->o->bar == -1 && isatty(2));
    if (!r->bar) return;
    bar_draw(r);
    ca_loop_call_later(r->loop, BAR_PERIOD, bar_tick, r, &r->bar_timer);
}

void bar_finish(struct runner *r)
{
    if (!r->bar) return;
    if (r->bar_timer) {
        ca_handle_cancel(r->bar_timer);
        r->bar_timer = ca_handle_unref(r->bar_timer);
    }
    bar_draw(r);
    if (r->bar_drawn) write_all(2, "\n", 1);
    r->bar_drawn = false;
}

/* ----- the jobs worth naming in the summary ------------------------------------------------- */

static void note(struct noted *n, struct job *j)
{
    free(n->display);
    n->runtime = j->runtime;
    n->seq = j->seq;
    n->rc = j->rc;
    n->outcome = j->outcome;
    n->display = strdup(job_display(j));
}

void note_job(struct runner *r, struct job *j)
{
    if (j->outcome == O_SKIPPED) return;
    if (j->outcome != O_OK && j->outcome != O_STOPPED && r->nfailures < FAILURES)
        note(&r->failures[r->nfailures++], j);
    /* The slowest jobs: a small array kept sorted, slowest first. */
    int k;
    if (r->nslowest < SLOWEST) {
        k = r->nslowest++;
    } else if (j->runtime <= r->slowest[SLOWEST - 1].runtime) {
        return;
    } else {
        k = SLOWEST - 1;
        free(r->slowest[k].display);
    }
    while (k > 0 && r->slowest[k - 1].runtime < j->runtime) {
        r->slowest[k] = r->slowest[k - 1];
        k--;
    }
    r->slowest[k].display = NULL; /* moved down (or freed) above */
    note(&r->slowest[k], j);
}

static void describe(char *b, size_t n, const struct noted *x)
{
    switch (x->outcome) {
    case O_TIMEOUT: snprintf(b, n, "timed out"); break;
    case O_NOEXEC: snprintf(b, n, x->rc == 127 ? "not found" : "cannot run"); break;
    case O_SIGNAL:
    case O_STOPPED:
        if (x->rc < 0) {
            snprintf(b, n, "signal %d", -x->rc);
            break;
        }
        /* fall through */
    default: snprintf(b, n, "exit %d", x->rc); break;
    }
}

void print_summary(struct runner *r, double elapsed)
{
    unsigned long total = 0;
    for (int i = 0; i < O_COUNT; i++) total += r->counts[i];
    total += r->unread;
    FILE *f = stderr;
    fprintf(f, "casyncio: %lu job%s in %.2fs (-j %d, %s loop, %s watcher)", total,
            total == 1 ? "" : "s", elapsed, r->jobs, ca_loop_kind(r->loop),
            watcher_kind_name(r->watcher_kind));
    if (r->stop_signal && r->stop_signal != SIGPIPE)
        fprintf(f, ", stopped by %s", strsignal(r->stop_signal));
    else if (r->halted)
        fputs(", halted", f);
    fputc('\n', f);
    for (int i = 0; i < O_COUNT; i++) {
        if (!r->counts[i] && i != O_OK && !(i == O_SKIPPED && (r->unread || r->unread_unknown)))
            continue;
        fprintf(f, "  %6lu %s", r->counts[i] + (i == O_SKIPPED ? r->unread : 0), outcome_names[i]);
        if (i == O_SKIPPED && r->unread_unknown) fputs(" (and the rest of the input, unread)", f);
        if (i == O_OK && r->nretried_ok) fprintf(f, " (%lu after a retry)", r->nretried_ok);
        fputc('\n', f);
    }
    char what[32];
    if (r->nfailures) {
        unsigned long nf = failed_count(r);
        fprintf(f, "  failed%s:\n", nf > (unsigned long)r->nfailures ? " (first ones)" : "");
        for (int i = 0; i < r->nfailures; i++) {
            describe(what, sizeof what, &r->failures[i]);
            fprintf(f, "    #%-5lu %-10s %s\n", r->failures[i].seq, what,
                    r->failures[i].display ? r->failures[i].display : "?");
        }
    }
    if (r->nslowest) {
        fputs("  slowest:\n", f);
        for (int i = 0; i < r->nslowest; i++)
            fprintf(f, "    #%-5lu %9.3fs %s\n", r->slowest[i].seq, r->slowest[i].runtime,
                    r->slowest[i].display ? r->slowest[i].display : "?");
    }
    fflush(f);
}

/* ----- joblog ------------------------------------------------------------------------------ */

int joblog_open(struct runner *r)
{
    /* --resume/--resume-failed: the jobs run now are added to the log that says what ran. */
    r->joblog = fopen(r->o->joblog, r->o->resume ? "ae" : "we");
    if (!r->joblog) {
        int e = -errno;
        fprintf(stderr, "casyncio: --joblog %s: %s\n", r->o->joblog, strerror(-e));
        return e;
    }
    if (ftell(r->joblog) == 0)
        fputs("Seq\tHost\tStarttime\tJobRuntime\tSend\tReceive\tExitval\tSignal\tCommand\n",
              r->joblog);
    fflush(r->joblog);
    return 0;
}

/* One line per attempt, flushed at once so that `tail -f` follows the run. As in GNU
 * parallel, a job killed by a signal has Exitval 0 and the signal number in Signal. */
void joblog_write(struct runner *r, struct job *j)
{
    int exitval = j->rc >= 0 ? j->rc : 0;
    int sig = j->rc < 0 ? -j->rc : 0;
    fprintf(r->joblog, "%lu\t%s\t%.3f\t%10.3f\t0\t0\t%d\t%d\t%s\n", j->seq,
            j->host ? j->host->login : ":", j->wall_start, j->runtime, exitval, sig, job_display(j));
    if (fflush(r->joblog) != 0 && !r->error) runner_fail(r, "writing the joblog", -errno);
}

void report_free(struct runner *r)
{
    for (int i = 0; i < r->nslowest; i++) free(r->slowest[i].display);
    for (int i = 0; i < r->nfailures; i++) free(r->failures[i].display);
    r->nslowest = r->nfailures = 0;
    if (r->joblog) {
        fclose(r->joblog);
        r->joblog = NULL;
    }
}
