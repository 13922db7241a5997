/* `casyncio run`: the job runner. One event loop (chosen through the policy API, with the
 * chosen child watcher) drives everything: jobs are subprocesses with piped stdout/stderr and
 * /dev/null as stdin, each in its own session so that a signal reaches the whole job; timeouts
 * are loop timers; SIGINT/SIGTERM/SIGHUP come through loop signal handlers; stdin is read
 * through a loop reader. There is no per-job thread, shell or sleep. */
#include "run.h"

#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <dirent.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

static void after_event(struct runner *r);
static void finish_attempt(struct runner *r, struct job *j);

/* ----- small helpers ------------------------------------------------------------------- */

const char *job_display(struct job *j)
{
    if (!j->display) {
        struct job_vars v = {.input = j->input, .seq = j->seq, .slot = j->slot};
        j->display = cmd_build_display(&j->r->tmpl, &v);
    }
    return j->display ? j->display : j->input;
}

void runner_fail(struct runner *r, const char *what, int err)
{
    bar_clear(r);
    fprintf(stderr, "casyncio: %s: %s\n", what, strerror(-err));
    r->error = true;
    runner_request_stop(r, 0);
}

/* Stops are carried out at the end of the current event (after_event), never in the middle of
 * printing or of finishing a job. sig: the signal that stopped us, 0 for an error or a halt. */
void runner_request_stop(struct runner *r, int sig)
{
    if (sig && !r->stop_signal) r->stop_signal = sig;
    if (!r->pending_stop) r->pending_stop = sig ? sig : -1;
}

static double wall_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (double)ts.tv_sec + ts.tv_nsec / 1e9;
}

static void q_push_front(struct runner *r, struct job *j)
{
    j->next = r->q_head;
    r->q_head = j;
    if (!r->q_tail) r->q_tail = j;
    r->q_len++;
}

static void q_push_back(struct runner *r, struct job *j)
{
    j->next = NULL;
    if (r->q_tail) r->q_tail->next = j;
    else r->q_head = j;
    r->q_tail = j;
    r->q_len++;
}

static struct job *q_pop(struct runner *r)
{
    struct job *j = r->q_head;
    if (!j) return NULL;
    r->q_head = j->next;
    if (!r->q_head) r->q_tail = NULL;
    r->q_len--;
    j->next = NULL;
    return j;
}

static void running_add(struct runner *r, struct job *j)
{
    j->rprev = NULL;
    j->rnext = r->running;
    if (r->running) r->running->rprev = j;
    r->running = j;
    r->nrunning++;
}

static void running_remove(struct runner *r, struct job *j)
{
    if (j->rprev) j->rprev->rnext = j->rnext;
    else r->running = j->rnext;
    if (j->rnext) j->rnext->rprev = j->rprev;
    j->rprev = j->rnext = NULL;
    r->nrunning--;
}

static void cancel_timer(struct job *j)
{
    if (j->timer) {
        ca_handle_cancel(j->timer);
        j->timer = ca_handle_unref(j->timer);
    }
}

/* Signals the job's whole process group (the job started a new session, so its pid is the
 * group id). Once the job's own process is reaped its group may still hold children that keep
 * the pipes open; the group id cannot be reused while they live. */
static void signal_job(struct job *j, int sig)
{
    if (j->state != J_RUNNING || j->pid <= 0) return;
    if (j->exited && !j->pc) return;
    kill(-j->pid, sig);
}

/* ----- input ----------------------------------------------------------------------------- */

static void reader_cb(void *arg);

static void set_reading(struct runner *r, bool on)
{
    if (!r->in_async || on == r->in_reading) return;
    if (on) {
        int e = ca_loop_add_reader(r->loop, r->in.fd, reader_cb, r);
        if (e < 0) {
            runner_fail(r, "watching the input", e);
            return;
        }
    } else {
        ca_loop_remove_reader(r->loop, r->in.fd);
    }
    r->in_reading = on;
}

static void stop_input(struct runner *r)
{
    set_reading(r, false);
    r->in_async = false;
    input_close(&r->in);
}

static void reader_cb(void *arg)
{
    struct runner *r = arg;
    int n = input_fill(&r->in);
    if (n < 0 && n != -EAGAIN) {
        runner_fail(r, "reading the input", n);
        stop_input(r);
    }
    after_event(r);
}

static bool new_job(struct runner *r, char *input)
{
    struct job *j = calloc(1, sizeof *j);
    if (!j) {
        free(input);
        return false;
    }
    j->r = r;
    j->input = input;
    spool_init(&j->out);
    spool_init(&j->err);
    j->seq = r->next_seq;
    if (r->o->keep_order && !ring_put(r, j)) {
        job_free(j);
        return false;
    }
    r->next_seq++;
    if (compat_skip(j->seq)) { /* --resume: the joblog says it is done */
        j->state = J_DONE;
        j->outcome = O_OK;
        output_job_done(r, j);
        return true;
    }
    q_push_back(r, j);
    return true;
}

/* Keeps low_water jobs queued; switches the input reader on only while more input is wanted
 * and none is buffered, so a huge input is read only as fast as jobs start. */
static void refill(struct runner *r)
{
    bool want_data = false;
    while (r->q_len < r->low_water && !r->stopping) {
        bool oom;
        char *line = input_take(&r->in, &oom);
        if (line) {
            if (!new_job(r, line)) {
                runner_fail(r, "queueing a job", -ENOMEM);
                return;
            }
            continue;
        }
        if (oom) {
            runner_fail(r, "reading the input", -ENOMEM);
            return;
        }
        if (r->in.eof) break;
        if (r->in_async) {
            want_data = true;
            break;
        }
        int n = input_fill(&r->in); /* a regular file: reads do not block */
        if (n < 0) {
            runner_fail(r, "reading the input", n);
            stop_input(r);
            return;
        }
    }
    if (r->in.eof && r->in_async) {
        /* Everything is read; what is buffered is taken without the loop from now on. */
        set_reading(r, false);
        r->in_async = false;
    } else {
        set_reading(r, want_data);
    }
}

/* ----- job lifecycle --------------------------------------------------------------------- */

static void ctx_unlink(struct runner *r, struct proc_ctx *pc)
{
    if (pc->prev) pc->prev->next = pc->next;
    else r->detached = pc->next;
    if (pc->next) pc->next->prev = pc->prev;
    pc->prev = pc->next = NULL;
}

/* One of the process's three events came. For a detached job only the context is left. */
static void ctx_event(struct proc_ctx *pc)
{
    struct job *j = pc->j;
    if (--pc->pending > 0) return;
    if (!j) {
        ctx_unlink(pc->r, pc);
        free(pc);
        return;
    }
    j->pc = NULL;
    free(pc);
    finish_attempt(j->r, j);
}

static void on_data(ca_process *p, int fd, const void *buf, size_t n, void *arg)
{
    struct proc_ctx *pc = arg;
    struct job *j = pc->j;
    struct runner *r = pc->r;
    if (!j) return; /* a detached job's leftover process writes: nobody reads it any more */
    output_data(r, j, fd, buf, n);
    if (r->pending_stop) after_event(r); /* output_data found stdout closed */
    else if (r->bar && !r->bar_drawn) bar_draw(r);
}

static void on_pipe_lost(ca_process *p, int fd, int err, void *arg)
{
    struct proc_ctx *pc = arg;
    struct runner *r = pc->r; /* pc and its job may be freed by ctx_event */
    if (fd != 1 && fd != 2 && !pc->stdin_piped) return;
    ctx_event(pc);
    after_event(r);
}

/* The job's own process is gone but something it started still holds its stdout or stderr:
 * the job is over all the same (as in GNU parallel, which reads output from files). What that
 * process writes from now on is dropped; its pipes are closed when it closes them. */
static void detach_job(struct runner *r, struct job *j)
{
    struct proc_ctx *pc = j->pc;
    if (!pc) return;
    cancel_timer(j);
    char msg[160];
    snprintf(msg, sizeof msg,
             "casyncio: job %lu: its process exited, but a process it left running holds its "
             "output open: not waiting for it\n", j->seq);
    /* Said with the job's own output, where the user looks for it. */
    output_data(r, j, 2, msg, strlen(msg));
    j->detached = true;
    j->pc = NULL;
    pc->j = NULL;
    pc->prev = NULL;
    pc->next = r->detached;
    if (r->detached) r->detached->prev = pc;
    r->detached = pc;
    finish_attempt(r, j);
}

static void pipe_grace_cb(void *arg)
{
    struct job *j = arg;
    struct runner *r = j->r;
    j->timer = ca_handle_unref(j->timer);
    detach_job(r, j);
    after_event(r);
}

static void on_exited(ca_process *p, void *arg)
{
    struct proc_ctx *pc = arg;
    struct job *j = pc->j;
    struct runner *r = pc->r;
    if (!j) {
        ctx_event(pc);
        return;
    }
    int rc = 255;
    ca_process_returncode(p, &rc);
    j->rc = rc;
    j->exited = true;
    /* Its own process is what a job is: a --timeout or kill timer has nothing left to do. */
    cancel_timer(j);
    if (pc->pending > 1) {
        /* A job we are ending may have left children that hold its pipes open: end them too
         * (those that left its process group are waited for PIPE_GRACE seconds at most). */
        if (j->timed_out || j->stopped || r->interrupts > 1) kill(-j->pid, SIGKILL);
        if (r->interrupts > 1 ||
            ca_loop_call_later(r->loop, PIPE_GRACE, pipe_grace_cb, j, &j->timer) < 0) {
            ctx_event(pc);
            detach_job(r, j);
            after_event(r);
            return;
        }
    }
    ctx_event(pc);
    after_event(r);
}

static const ca_subprocess_protocol job_protocol = {
    .pipe_data_received = on_data,
    .pipe_connection_lost = on_pipe_lost,
    .process_exited = on_exited,
};

static void kill_cb(void *arg)
{
    struct job *j = arg;
    j->timer = ca_handle_unref(j->timer);
    signal_job(j, SIGKILL);
}

/* SIGTERM now, SIGKILL after the grace period if the job is still there. */
static void terminate_job(struct runner *r, struct job *j)
{
    signal_job(j, SIGTERM);
    cancel_timer(j);
    if (ca_loop_call_later(r->loop, r->o->grace, kill_cb, j, &j->timer) < 0) signal_job(j, SIGKILL);
}

static void timeout_cb(void *arg)
{
    struct job *j = arg;
    j->timer = ca_handle_unref(j->timer);
    j->timed_out = true;
    terminate_job(j->r, j);
}

static bool is_failure(enum outcome o)
{
    return o == O_FAILED || o == O_SIGNAL || o == O_TIMEOUT || o == O_NOEXEC;
}

static void check_halt(struct runner *r, int rc)
{
    const struct run_options *o = r->o;
    if (o->halt_when == HALT_NEVER || r->halted) return;
    unsigned long failed = r->counts[O_FAILED] + r->counts[O_SIGNAL] + r->counts[O_TIMEOUT] +
                           r->counts[O_NOEXEC];
    unsigned long n = o->halt_on == HALT_ON_FAIL ? failed
                      : o->halt_on == HALT_ON_SUCCESS ? r->counts[O_OK]
                                                      : r->ndone;
    (void)n;
    if (!compat_halt_hit(failed, r->counts[O_OK], r->ndone, input_total(&r->in, r->next_seq - 1),
                         rc))
        return;
    r->halted = true;
    bar_clear(r);
    fprintf(stderr,
            "casyncio: halting (--halt %s): %lu failed, %lu succeeded, %d still running%s\n",
            o->halt_when == HALT_NOW ? "now" : "soon", failed, r->counts[O_OK], r->nrunning,
            o->halt_when == HALT_NOW && r->nrunning ? ": ending them" : "");
    runner_request_stop(r, 0);
    if (o->halt_when == HALT_NOW) {
        for (struct job *k = r->running; k; k = k->rnext) {
            k->stopped = true;
            terminate_job(r, k);
        }
    }
}

static enum outcome attempt_outcome(struct job *j)
{
    if (j->outcome == O_NOEXEC) return O_NOEXEC;
    if (j->timed_out) return O_TIMEOUT; /* even if it then exited 0: it overran */
    if (j->rc == 0) return O_OK;
    if (j->stopped) return O_STOPPED;
    return j->rc < 0 ? O_SIGNAL : O_FAILED;
}

/* One attempt of j is over (all three events came, or it could not start). */
static void finish_attempt(struct runner *r, struct job *j)
{
    if (j->state == J_RUNNING) {
        j->runtime = ca_loop_time(r->loop) - j->t_start;
        running_remove(r, j);
        r->blocked = false;
    }
    cancel_timer(j);
    if (j->slot) r->free_slots[r->nfree++] = j->slot;
    if (j->host) j->host->nrunning--;
    j->proc = ca_process_unref(j->proc);
    j->outcome = attempt_outcome(j);
    if (r->joblog) joblog_write(r, j);
    if (is_failure(j->outcome) && j->outcome != O_NOEXEC && j->attempts <= r->o->retries &&
        !r->stopping && !r->pending_stop) {
        /* Retry from the front of the queue; the failed attempt's output is dropped (with
         * --line-buffer what was printed stays printed). */
        spool_reset(&j->out);
        spool_reset(&j->err);
        j->state = J_QUEUED;
        j->slot = 0;
        j->host = NULL;
        j->exited = j->timed_out = j->stopped = j->detached = false;
        free(j->display); /* {%} may differ next time */
        j->display = NULL;
        q_push_front(r, j);
        return;
    }
    j->state = J_DONE;
    j->slot = 0;
    j->host = NULL;
    if (j->outcome == O_OK && j->attempts > 1) r->nretried_ok++;
    r->counts[j->outcome]++;
    r->ndone++;
    note_job(r, j);
    if (j->outcome == O_OK) compat_job_succeeded(j->runtime);
    if (r->o->results)
        compat_results(j->seq, j->input, j->out.fd, j->out.flen, &j->out.mem, j->err.fd,
                       j->err.flen, &j->err.mem);
    check_halt(r, j->outcome == O_NOEXEC && j->rc == 0 ? 127 : j->rc);
    output_job_done(r, j);
}

/* Appends s to b, cut to about max bytes (with "..." and the full length when cut), and with
 * control characters shown as '?', so that a message can name any input. */
static void add_excerpt(struct buf *b, const char *s, size_t max)
{
    size_t n = strlen(s);
    for (size_t i = 0; i < n && i < max; i++) {
        unsigned char c = (unsigned char)s[i];
        buf_addc(b, c < 32 || c == 127 ? '?' : (char)c);
    }
    if (n > max) {
        char tail[64];
        snprintf(tail, sizeof tail, "... (%zu bytes)", n);
        buf_adds(b, tail);
    }
}

static void spawn_failed(struct runner *r, struct job *j, int err, const char *argv0)
{
    char msg[512];
    j->runtime = 0;
    if (err == -E2BIG) {
        /* One input too long for a command line is that job's failure, not the run's: the
         * message names the input (cut short) since the command would be unreadable. */
        j->rc = 126;
        j->outcome = O_NOEXEC;
        struct buf m = {0};
        snprintf(msg, sizeof msg, "casyncio: job %lu: argument list too long for input '",
                 j->seq);
        buf_adds(&m, msg);
        add_excerpt(&m, j->input, 60);
        buf_adds(&m, "'\n");
        if (m.p) output_data(r, j, 2, m.p, m.len);
        buf_free(&m);
        finish_attempt(r, j);
        return;
    }
    if (err == -ENOENT || err == -EACCES || err == -ENOEXEC || err == -EISDIR || err == -ENOTDIR ||
        err == -ELOOP || err == -ENAMETOOLONG || err == -EPERM) {
        j->rc = err == -ENOENT || err == -ENOTDIR ? 127 : 126;
        j->outcome = O_NOEXEC;
        snprintf(msg, sizeof msg, "casyncio: %s: %s%s\n", argv0,
                 err == -ENOENT ? "command not found" : strerror(-err),
                 cmd_shell_hint(&r->tmpl, argv0, err)); /* names --shell where it would help */
        output_data(r, j, 2, msg, strlen(msg));
        finish_attempt(r, j);
        return;
    }
    if ((err == -EAGAIN || err == -EMFILE || err == -ENFILE || err == -ENOMEM) && r->nrunning > 0) {
        /* Out of processes or fds: wait for a running job to end and try again. */
        if (!r->said_blocked) {
            r->said_blocked = true;
            bar_clear(r);
            fprintf(stderr,
                    "casyncio: cannot start more jobs (%s): running %d at once, not -j %d "
                    "(raise ulimit -%c)\n",
                    strerror(-err), r->nrunning, r->jobs, err == -EAGAIN ? 'u' : 'n');
        }
        if (j->slot) r->free_slots[r->nfree++] = j->slot;
        if (j->host) j->host->nrunning--;
        j->host = NULL;
        j->slot = 0;
        j->attempts--;
        q_push_front(r, j);
        r->blocked = true;
        return;
    }
    j->rc = 255;
    j->outcome = O_NOEXEC;
    snprintf(msg, sizeof msg, "casyncio: cannot start %s: %s\n", argv0, ca_strerror(err));
    output_data(r, j, 2, msg, strlen(msg));
    r->error = true;
    runner_request_stop(r, 0);
    finish_attempt(r, j);
}

static void start_job(struct runner *r, struct job *j)
{
    j->attempts++;
    j->slot = r->nfree > 0 ? r->free_slots[--r->nfree] : 0;
    j->rc = 0;
    j->outcome = O_OK;
    j->wall_start = wall_now();
    j->t_start = ca_loop_time(r->loop);
    if (r->nhosts) {
        j->host = ssh_pick_host(r);
        j->host->nrunning++;
    }
    struct job_vars v = {.input = j->input, .seq = j->seq, .slot = j->slot};
    char **argv = cmd_build_argv(&r->tmpl, &v);
    if (argv && j->host && !j->host->local) {
        char **wrapped = ssh_wrap_argv(r, j, argv);
        free(argv);
        argv = wrapped;
    }
    struct proc_ctx *pc = argv ? calloc(1, sizeof *pc) : NULL;
    if (!pc) {
        free(argv);
        spawn_failed(r, j, -ENOMEM, j->input);
        return;
    }
    pc->j = j;
    pc->r = r;
    /* A remote job's ssh gets a pipe as stdin that stays open while it runs: the remote
     * side ends the job when it closes (see ssh.c). */
    pc->stdin_piped = j->host && !j->host->local;
    pc->pending = (r->o->ungroup ? 1 : 3) + (pc->stdin_piped ? 1 : 0); /* -u: no pipes */
    ca_subprocess_options so = {
        .argv = (const char *const *)argv,
        .stdin_mode = pc->stdin_piped ? CA_PIPE : r->devnull >= 0 ? CA_FD : CA_DEVNULL,
        .stdin_fd = r->devnull,
        .stdout_mode = r->o->ungroup ? CA_INHERIT : CA_PIPE,
        .stderr_mode = r->o->ungroup ? CA_INHERIT : CA_PIPE,
        .start_new_session = true,
    };
    int e = ca_loop_subprocess_exec(r->loop, &so, &job_protocol, pc, &j->proc);
    if (e < 0) {
        free(pc);
        spawn_failed(r, j, e, argv[0]);
        free(argv);
        return;
    }
    free(argv);
    if (r->o->print_cmd) fprintf(stderr, "%s\n", job_display(j)); /* -t */
    if (r->o->verbose) { /* -v: the command heads the job's output */
        const char *d = job_display(j);
        output_data(r, j, 1, d, strlen(d));
        output_data(r, j, 1, "\n", 1);
    }
    compat_job_started(r->loop);
    j->pc = pc;
    j->pid = ca_process_pid(j->proc);
    j->state = J_RUNNING;
    running_add(r, j);
    double timeout = compat_timeout();
    if (timeout > 0 && ca_loop_call_later(r->loop, timeout, timeout_cb, j, &j->timer) < 0)
        runner_fail(r, "arming a timeout", -ENOMEM);
}

/* ----- scheduling and stopping ------------------------------------------------------------ */

/* The inputs that were never read, for the summary: all of them for ::: words and regular
 * files; for a pipe or terminal what is already buffered (the rest is not waited for). */
static void count_unread(struct runner *r)
{
    long total = input_total(&r->in, r->next_seq - 1);
    if (total >= 0 && r->in.fd < 0) {
        r->unread = (unsigned long)total - (r->next_seq - 1);
        return;
    }
    struct stat st;
    bool regular = r->in.fd >= 0 && fstat(r->in.fd, &st) == 0 && S_ISREG(st.st_mode);
    for (;;) {
        bool oom;
        char *line = input_take(&r->in, &oom);
        if (line) {
            free(line);
            r->unread++;
            continue;
        }
        if (oom || r->in.eof) break;
        if (!regular) {
            r->unread_unknown = true;
            break;
        }
        if (input_fill(&r->in) < 0) break;
    }
}

static void begin_stop(struct runner *r)
{
    if (r->stopping) return;
    r->stopping = true;
    if (r->stop_signal && r->stop_signal != SIGPIPE) count_unread(r);
    stop_input(r);
    struct job *j;
    while ((j = q_pop(r)) != NULL) {
        j->state = J_DONE;
        j->outcome = O_SKIPPED;
        r->counts[O_SKIPPED]++;
        output_job_done(r, j);
    }
}

static void first_cb(void *arg);

static void schedule(struct runner *r)
{
    if (!r->stopping) refill(r);
    while (!r->stopping && !r->blocked && !r->pending_stop && r->nrunning < r->jobs) {
        if (!r->q_head || !compat_may_start(r->loop, r->nrunning, first_cb, r)) break;
        struct job *j = q_pop(r);
        start_job(r, j);
        if (r->q_len < r->low_water / 2 && !r->stopping) refill(r);
    }
}

static void after_event(struct runner *r)
{
    if (r->in_after || r->finished) return;
    r->in_after = true;
    for (int round = 0; round < 4; round++) {
        if (r->pending_stop) {
            r->pending_stop = 0;
            begin_stop(r);
            /* Nobody reads our output any more: the running jobs' work is lost, end them. */
            if (r->output_broken) {
                for (struct job *j = r->running; j; j = j->rnext) {
                    if (j->stopped) continue;
                    j->stopped = true;
                    terminate_job(r, j);
                }
            }
        }
        schedule(r);
        if (!r->pending_stop) break;
    }
    bool input_left = !r->stopping && (r->q_head || !input_done(&r->in));
    if (r->nrunning == 0 && !input_left && !r->blocked) {
        r->finished = true;
        ca_loop_stop(r->loop);
    } else if (r->bar && !r->bar_drawn) {
        bar_draw(r); /* printing output cleared it */
    }
    r->in_after = false;
}

static void first_cb(void *arg) { after_event(arg); }

static void on_signal(struct runner *r, int sig)
{
    r->interrupts++;
    bar_clear(r);
    if (r->interrupts == 1) {
        runner_request_stop(r, sig);
        if (r->nrunning)
            fprintf(stderr, "casyncio: %s: waiting for %d running job%s (%s again to kill them)\n",
                    strsignal(sig), r->nrunning, r->nrunning == 1 ? "" : "s",
                    sig == SIGINT ? "interrupt" : "signal");
        for (struct job *j = r->running; j; j = j->rnext) {
            j->stopped = true;
            signal_job(j, sig);
        }
    } else {
        if (r->nrunning)
            fprintf(stderr, "casyncio: killing %d running job%s\n", r->nrunning,
                    r->nrunning == 1 ? "" : "s");
        struct job *next;
        for (struct job *j = r->running; j; j = next) {
            next = j->rnext;
            j->stopped = true;
            signal_job(j, SIGKILL);
            /* Its process is gone; what holds its pipes left its group: stop waiting. */
            if (j->exited) detach_job(r, j);
        }
    }
    after_event(r);
}

/* Ctrl-Z: the jobs are in sessions of their own, out of reach of the terminal's SIGTSTP, so
 * the runner stops them (SIGSTOP: their groups are orphaned, where SIGTSTP would be dropped)
 * and then itself; `fg` (SIGCONT) resumes it, and it resumes them. */
static void sigtstp_cb(void *arg)
{
    struct runner *r = arg;
    bar_clear(r);
    for (struct job *j = r->running; j; j = j->rnext) signal_job(j, SIGSTOP);
    kill(getpid(), SIGSTOP);
}

static void sigcont_cb(void *arg)
{
    struct runner *r = arg;
    for (struct job *j = r->running; j; j = j->rnext) signal_job(j, SIGCONT);
    after_event(r);
}

static void sigint_cb(void *arg) { on_signal(arg, SIGINT); }
static void sigterm_cb(void *arg) { on_signal(arg, SIGTERM); }
static void sighup_cb(void *arg) { on_signal(arg, SIGHUP); }
/* SIGPIPE gets a (no-op) handler rather than SIG_IGN: writes then fail with EPIPE, which
 * output_write handles, and exec() resets a handled signal so jobs still get the default. */
static void sigpipe_cb(void *arg) { (void)arg; }

/* ----- setup ------------------------------------------------------------------------------- */

static const int handled_sigs[NSIGS] = {SIGINT, SIGTERM, SIGHUP, SIGPIPE, SIGTSTP, SIGCONT};

/* Each job holds up to three fds (two pipes and a pidfd) while it runs. */
static void raise_fd_limit(int jobs)
{
    struct rlimit rl;
    rlim_t need = (rlim_t)jobs * 4 + 64;
    if (getrlimit(RLIMIT_NOFILE, &rl) != 0 || rl.rlim_cur >= need) return;
    rl.rlim_cur = rl.rlim_max == RLIM_INFINITY || rl.rlim_max > need ? need : rl.rlim_max;
    setrlimit(RLIMIT_NOFILE, &rl);
}

static int setup_loop_steps(struct runner *r)
{
    int e = make_policy(r->o->loop, &r->policy);
    if (e < 0) {
        fprintf(stderr, "casyncio: --loop %s is not usable here: %s\n", loop_kind_name(r->o->loop),
                ca_strerror(e));
        return -EALREADY; /* said */
    }
    if ((e = ca_set_event_loop_policy(r->policy)) < 0) return e;
    r->watcher_kind = r->o->watcher == W_DEFAULT ? pick_default_watcher() : r->o->watcher;
    e = make_watcher(r->watcher_kind, &r->watcher);
    if (e < 0) {
        fprintf(stderr, "casyncio: --watcher %s is not usable here: %s\n",
                watcher_kind_name(r->watcher_kind), ca_strerror(e));
        return -EALREADY; /* said */
    }
    if ((e = ca_set_child_watcher(r->watcher)) < 0) return e;
    if ((e = ca_new_event_loop(&r->loop)) < 0) return e;
    /* In the main thread, set_event_loop attaches the policy's watcher to the loop. */
    if ((e = ca_set_event_loop(r->loop)) < 0) return e;
    if (!ca_child_watcher_is_active(r->watcher) &&
        (e = ca_child_watcher_attach_loop(r->watcher, r->loop)) < 0)
        return e;
    static const ca_callback_fn fns[NSIGS] = {sigint_cb,  sigterm_cb,  sighup_cb,
                                              sigpipe_cb, sigtstp_cb, sigcont_cb};
    for (size_t i = 0; i < NSIGS; i++) {
        /* SIGHUP ignored when we started (nohup) stays ignored, and the jobs inherit it
         * ignored too, which is what the user asked for; so does an ignored SIGTSTP. SIGINT
         * and SIGTERM are handled whatever: a shell starts background commands with SIGINT
         * ignored, and the runner must still be able to stop its jobs when told to. */
        struct sigaction old;
        if ((handled_sigs[i] == SIGHUP || handled_sigs[i] == SIGTSTP) &&
            sigaction(handled_sigs[i], NULL, &old) == 0 && old.sa_handler == SIG_IGN)
            continue;
        if ((e = ca_loop_add_signal_handler(r->loop, handled_sigs[i], fns[i], r)) < 0) return e;
        r->sig_handled[i] = true;
    }
    return 0;
}

/* Policy, watcher, loop and signal handlers, through the public API. Says what failed. */
static int setup_loop(struct runner *r)
{
    int e = setup_loop_steps(r);
    if (e < 0 && e != -EALREADY)
        fprintf(stderr, "casyncio: setting up the event loop: %s\n", ca_strerror(e));
    return e;
}

static void teardown(struct runner *r)
{
    if (r->loop) {
        for (size_t i = 0; i < NSIGS; i++)
            if (r->sig_handled[i]) ca_loop_remove_signal_handler(r->loop, handled_sigs[i]);
        if (r->bar_timer) {
            ca_handle_cancel(r->bar_timer);
            r->bar_timer = ca_handle_unref(r->bar_timer);
        }
        set_reading(r, false);
        ca_set_event_loop(NULL);
    }
    if (r->watcher) {
        ca_set_child_watcher(NULL);
        ca_child_watcher_close(r->watcher);
        r->watcher = ca_child_watcher_unref(r->watcher);
    }
    if (r->loop) {
        ca_loop_close(r->loop);
        r->loop = ca_loop_unref(r->loop);
    }
    if (r->policy) {
        ca_set_event_loop_policy(NULL);
        r->policy = ca_policy_unref(r->policy);
    }
}

static int dry_run(struct runner *r)
{
    for (;;) {
        bool oom;
        char *line = input_take(&r->in, &oom);
        if (!line) {
            if (oom) return -ENOMEM;
            if (r->in.eof) return 0;
            int n = input_fill(&r->in);
            if (n < 0) return n;
            continue;
        }
        struct job_vars v = {.input = line, .seq = r->next_seq++, .slot = 1};
        char *d = cmd_build_display(&r->tmpl, &v);
        free(line);
        if (!d) return -ENOMEM;
        size_t n = strlen(d);
        d[n] = '\n';
        int e = write_all(1, d, n + 1);
        free(d);
        if (e < 0) return e;
    }
}

static int exit_status(struct runner *r)
{
    if (r->error) return CLI_EXIT_ERROR;
    if (r->stop_signal) return 128 + r->stop_signal;
    unsigned long failed = r->counts[O_FAILED] + r->counts[O_SIGNAL] + r->counts[O_TIMEOUT] +
                           r->counts[O_NOEXEC];
    if (r->halted) return compat_halt_status(failed, input_total(&r->in, r->next_seq - 1), r->ndone);
    return failed > CLI_MAX_FAILED_STATUS ? CLI_MAX_FAILED_STATUS : (int)failed;
}

/* A standard fd closed when we started would be reused by the first file we open (the joblog
 * on fd 1 would receive the jobs' output): hold 0, 1 and 2 open on /dev/null instead. */
static void reopen_std_fds(void)
{
    for (int fd = 0; fd <= 2; fd++) {
        if (fcntl(fd, F_GETFD) >= 0 || errno != EBADF) continue;
        int n = open("/dev/null", fd == 0 ? O_RDONLY : O_WRONLY);
        if (n >= 0 && n != fd) {
            dup2(n, fd);
            close(n);
        }
    }
}

/* Whether stdout is the terminal stderr is (where the bar is drawn). */
static bool same_terminal(void)
{
    struct stat a, b;
    return isatty(1) && isatty(2) && fstat(1, &a) == 0 && fstat(2, &b) == 0 &&
           a.st_rdev == b.st_rdev;
}

static int count_open_fds(void)
{
    DIR *d = opendir("/proc/self/fd");
    if (!d) return 16;
    int n = 0;
    while (readdir(d)) n++;
    closedir(d);
    return n - 3; /* ".", ".." and the directory's own fd */
}

/* Each job holds three fds (two pipes and a pidfd) and a process: when the limits allow
 * fewer than -j jobs, run fewer and say so, rather than find out job by job. */
static void check_limits(struct runner *r)
{
    struct rlimit rl;
    int jobs = r->jobs;
    const char *why = NULL;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur != RLIM_INFINITY) {
        long room = ((long)rl.rlim_cur - count_open_fds() - 16) / 3;
        if (room < jobs) {
            jobs = room < 1 ? 1 : (int)room;
            why = "open files (ulimit -n)";
        }
    }
    if (geteuid() != 0 && getrlimit(RLIMIT_NPROC, &rl) == 0 && rl.rlim_cur != RLIM_INFINITY &&
        (rlim_t)jobs + 1 > rl.rlim_cur) {
        jobs = rl.rlim_cur > 1 ? (int)rl.rlim_cur - 1 : 1;
        why = "processes (ulimit -u)";
    }
    if (!why) return;
    fprintf(stderr, "casyncio: -j %d lowered to %d: the limit on %s allows no more\n", r->jobs,
            jobs, why);
    r->jobs = jobs;
}

int run_main(const struct run_options *o)
{
    reopen_std_fds();
    struct runner r = {.o = o, .next_seq = 1, .next_print = 1, .devnull = -1, .jobs = o->jobs};
    cmd_template_init(&r.tmpl, o);
    r.tmpl.in = &r.in; /* --header's column names */
    int e = input_open(&r.in, o);
    if (e == 0 && !o->dry_run) e = compat_begin(o) < 0 ? -EALREADY : 0;
    if (e < 0) {
        if (e != -EALREADY && e != -EINVAL)
            fprintf(stderr, "casyncio: %s: %s\n", r.in.failed ? r.in.failed : "input",
                    strerror(-e));
        compat_end();
        input_close(&r.in);
        return CLI_EXIT_ERROR;
    }
    if (o->dry_run) {
        e = dry_run(&r);
        input_close(&r.in);
        if (e < 0 && e != -EPIPE) fprintf(stderr, "casyncio: %s\n", strerror(-e));
        return e < 0 ? CLI_EXIT_ERROR : 0;
    }
    int status = CLI_EXIT_ERROR;
    if ((o->nsshlogin || o->nsshloginfile) && ssh_setup(&r) < 0) goto out;
    raise_fd_limit(r.jobs);
    check_limits(&r);
    r.low_water = (size_t)r.jobs * 2 + 64;
    r.free_slots = malloc((size_t)r.jobs * sizeof *r.free_slots);
    if (!r.free_slots) goto out;
    for (int i = 0; i < r.jobs; i++) r.free_slots[i] = r.jobs - i;
    r.nfree = r.jobs;
    r.tty_shared = same_terminal();
    r.devnull = open("/dev/null", O_RDONLY | O_CLOEXEC);
    if (o->joblog && joblog_open(&r) < 0) goto out;
    if (setup_loop(&r) < 0) goto out;
    /* Input from a pipe or terminal is read through the loop; regular files (which epoll
     * refuses, and which never block) are read directly. */
    if (r.in.fd == STDIN_FILENO && isatty(STDIN_FILENO))
        fprintf(stderr, "casyncio: reading inputs from the terminal (end them with Ctrl-D)\n");
    if (r.in.fd >= 0) {
        r.in_async = true;
        if (ca_loop_add_reader(r.loop, r.in.fd, reader_cb, &r) == 0) r.in_reading = true;
        else r.in_async = false;
    }
    r.t0 = ca_loop_time(r.loop);
    bar_start(&r);
    if ((e = ca_loop_call_soon(r.loop, first_cb, &r, NULL)) < 0 ||
        (e = ca_loop_run_forever(r.loop)) < 0) {
        fprintf(stderr, "casyncio: running the event loop: %s\n", ca_strerror(e));
        /* Never leave jobs behind: closing the loop kills what it still has. */
        for (struct job *j = r.running; j; j = j->rnext) signal_job(j, SIGKILL);
        goto out;
    }
    bar_finish(&r);
    /* By default the summary is for people: shown on a terminal, and after an interrupt,
     * which says what became of the jobs. */
    bool interrupted = r.stop_signal && r.stop_signal != SIGPIPE;
    bool summary = o->summary == 1 || (o->summary == -1 && (isatty(2) || interrupted));
    if (summary) print_summary(&r, ca_loop_time(r.loop) - r.t0);
    status = exit_status(&r);
out:
    teardown(&r);
    /* After an error the loop may still have had jobs: they were freed with it. */
    while (r.running) {
        struct job *j = r.running;
        running_remove(&r, j);
        j->proc = ca_process_unref(j->proc);
        cancel_timer(j);
        free(j->pc); /* the loop is closed: no callback will come */
        if (!o->keep_order) job_free(j);
    }
    while (r.detached) {
        struct proc_ctx *pc = r.detached;
        r.detached = pc->next;
        free(pc);
    }
    ssh_teardown(&r);
    struct job *j;
    while ((j = q_pop(&r)) != NULL)
        if (!o->keep_order) job_free(j);
    if (r.ring) {
        for (unsigned long s = r.next_print; s < r.next_seq; s++)
            job_free(r.ring[s % r.ring_cap]);
        free(r.ring);
    }
    input_close(&r.in);
    compat_end();
    if (r.devnull >= 0) close(r.devnull);
    free(r.free_slots);
    buf_free(&r.scratch);
    report_free(&r);
    return status;
}
