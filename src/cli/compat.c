/* GNU parallel compatibility: the checks of option combinations, and the runner's
 * parallel-specific pieces kept out of run.c: --resume/--resume-failed (which jobs the joblog
 * says are done), --delay, --memfree and --load (may a job start now?), --timeout N% (the
 * median runtime of the jobs that succeeded), --results DIR (parallel's directory layout) and
 * the exit status after --halt. One runner per process: the state is file-static, used on the
 * loop's thread only. */
#include "cli.h"

#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

static struct {
    const struct run_options *o;
    /* --resume: the sequence numbers the joblog says are done (a bitmap). */
    unsigned char *done;
    unsigned long ndone_cap;
    /* --delay */
    double last_start;
    bool started;
    /* --memfree, --load, --delay: the timer that wakes the scheduler again */
    ca_handle *gate;
    /* --timeout N%: runtimes of the jobs that succeeded */
    double *rt;
    size_t nrt, rt_cap;
    /* --halt: the exit status of the job that made the runner halt */
    int halt_rc;
    bool said_mem, said_load;
} C;

static bool is_shell_operator(const char *w)
{
    static const char *const ops[] = {">", ">>", "<", "|", "||", "&&", ";", "&", "2>", "2>>",
                                      "2>&1", ">&2", "1>&2", "&>", "<<", "|&"};
    for (size_t i = 0; i < sizeof ops / sizeof ops[0]; i++)
        if (strcmp(w, ops[i]) == 0) return true;
    return false;
}

static int together(const char *a, const char *b)
{
    fprintf(stderr, "casyncio run: %s together with %s is not supported\n", a, b);
    return CLI_EXIT_USAGE;
}

int compat_check_options(struct run_options *o)
{
    for (int i = 0; i <= o->ncmd; i++) {
        const char *w = i < o->ncmd ? o->cmd[i] : o->tagstring;
        if (w && strstr(w, "{=") && strstr(strstr(w, "{=") + 2, "=}")) {
            fputs("casyncio run: {= perl expression =} replacement strings (GNU parallel) are "
                  "not supported: there is no perl here; use --shell and shell code\n",
                  stderr);
            return CLI_EXIT_USAGE;
        }
    }
    if (o->tagstring) o->tag = true;
    bool structured = o->nsrc > 1 || o->colsep || o->header;
    if (o->multi != MULTI_NONE && structured)
        return together("-n/-N/-L/-m/-X", "several input sources, --colsep or --header");
    if (o->ungroup && (o->keep_order || o->tag || o->line_buffer || o->results))
        return together("-u", "-k, --tag, --line-buffer or --results");
    if (o->results && o->line_buffer) return together("--results", "--line-buffer");
    if (o->results) {
        size_t n = strlen(o->results);
        bool file = n >= 4 && (!strcmp(o->results + n - 4, ".csv") || !strcmp(o->results + n - 4,
                                                                           ".tsv") ||
                               (n >= 5 && !strcmp(o->results + n - 5, ".json")));
        if (file || strchr(o->results, '{')) {
            fprintf(stderr, "casyncio run: --results %s (GNU parallel's CSV/TSV/JSON file or "
                    "replacement-string form) is not supported: only --results DIR\n",
                    o->results);
            return CLI_EXIT_USAGE;
        }
    }
    if (o->resume && !o->joblog) {
        fprintf(stderr, "casyncio run: %s needs --joblog FILE\n",
                o->resume == 1 ? "--resume" : "--resume-failed");
        return CLI_EXIT_USAGE;
    }
    if (o->timeout_pct > 0 && o->timeout > 0) o->timeout = 0;
    /* What a shell would have done, said before anything runs: these words reach COMMAND as
     * arguments. */
    if (!o->shell)
        for (int i = 1; i < o->ncmd; i++)
            if (is_shell_operator(o->cmd[i])) {
                fprintf(stderr, "casyncio run: warning: '%s' is passed to %s as an argument: "
                        "COMMAND runs without a shell here (GNU parallel gives it to one); add "
                        "--shell for a redirection or a pipe\n", o->cmd[i], o->cmd[0]);
                break;
            }
    return 0;
}

/* ----- --resume, --resume-failed -------------------------------------------------------- */

static void mark_done(unsigned long seq, bool done)
{
    if (seq >= C.ndone_cap) {
        unsigned long cap = C.ndone_cap ? C.ndone_cap : 1024;
        while (cap <= seq) cap *= 2;
        unsigned char *p = realloc(C.done, cap / 8 + 1);
        if (!p) return;
        memset(p + (C.ndone_cap ? C.ndone_cap / 8 + 1 : 0), 0,
               cap / 8 + 1 - (C.ndone_cap ? C.ndone_cap / 8 + 1 : 0));
        C.done = p;
        C.ndone_cap = cap;
    }
    if (done) C.done[seq / 8] |= (unsigned char)(1u << (seq % 8));
    else C.done[seq / 8] &= (unsigned char)~(1u << (seq % 8));
}

/* GNU parallel's --resume skips every job the joblog names; --resume-failed only those that
 * succeeded (exit 0, no signal), so the failed ones run again. Later lines win. */
static int load_joblog(const char *path, int mode)
{
    FILE *f = fopen(path, "re");
    if (!f) return errno == ENOENT ? 0 : -errno;
    char *line = NULL;
    size_t cap = 0;
    ssize_t n;
    while ((n = getline(&line, &cap, f)) > 0) {
        char *end;
        unsigned long seq = strtoul(line, &end, 10);
        if (end == line || *end != '\t') continue; /* the header */
        /* Seq Host Starttime JobRuntime Send Receive Exitval Signal Command */
        char *p = end;
        int field = 1;
        long exitval = 0, sig = 0;
        while (*p && field < 8) {
            if (*p++ == '\t') {
                field++;
                if (field == 7) exitval = strtol(p, NULL, 10);
                if (field == 8) sig = strtol(p, NULL, 10);
            }
        }
        if (field < 8) continue;
        mark_done(seq, mode == 1 || (exitval == 0 && sig == 0));
    }
    free(line);
    fclose(f);
    return 0;
}

bool compat_skip(unsigned long seq)
{
    return C.done && seq < C.ndone_cap && (C.done[seq / 8] & (1u << (seq % 8)));
}

int compat_begin(const struct run_options *o)
{
    memset(&C, 0, sizeof C);
    C.o = o;
    if (o->resume) {
        int e = load_joblog(o->joblog, o->resume);
        if (e < 0) {
            fprintf(stderr, "casyncio: --joblog %s: %s\n", o->joblog, strerror(-e));
            return e;
        }
    }
    if (o->results && mkdir(o->results, 0777) < 0 && errno != EEXIST) {
        int e = -errno;
        fprintf(stderr, "casyncio: --results %s: %s\n", o->results, strerror(errno));
        return e;
    }
    return 0;
}

void compat_end(void)
{
    if (C.gate) {
        ca_handle_cancel(C.gate);
        C.gate = ca_handle_unref(C.gate);
    }
    free(C.done);
    free(C.rt);
    memset(&C, 0, sizeof C);
}

/* ----- --delay, --memfree, --load --------------------------------------------------------- */

static long long mem_available(void)
{
    FILE *f = fopen("/proc/meminfo", "re");
    if (!f) return -1;
    char line[256];
    long long kb = -1;
    while (fgets(line, sizeof line, f))
        if (sscanf(line, "MemAvailable: %lld kB", &kb) == 1) break;
    fclose(f);
    return kb < 0 ? -1 : kb * 1024;
}

static double load_average(void)
{
    FILE *f = fopen("/proc/loadavg", "re");
    if (!f) return -1;
    double l = -1;
    if (fscanf(f, "%lf", &l) != 1) l = -1;
    fclose(f);
    return l;
}

static void gate_cb(void *arg)
{
    void **wake = arg;
    C.gate = ca_handle_unref(C.gate);
    ((void (*)(void *))wake[0])(wake[1]);
}

bool compat_may_start(ca_loop *loop, int nrunning, void (*wake)(void *), void *arg)
{
    const struct run_options *o = C.o;
    if (!o || (o->delay <= 0 && !o->memfree && o->load_max <= 0)) return true;
    if (C.gate) return false; /* already waiting */
    double now = ca_loop_time(loop), wait = 0;
    if (o->delay > 0 && C.started && now - C.last_start < o->delay)
        wait = o->delay - (now - C.last_start);
    /* Memory and load are polled once a second while they hold jobs back (and a job's end
     * wakes the scheduler too). */
    if (!wait && o->memfree) {
        long long m = mem_available();
        if (m >= 0 && m < o->memfree) {
            wait = 1.0;
            if (!C.said_mem)
                fprintf(stderr, "casyncio: --memfree: %lld MB available, under the %lld MB asked "
                        "for: jobs wait\n", m >> 20, o->memfree >> 20);
            C.said_mem = true;
        }
    }
    if (!wait && o->load_max > 0) {
        double l = load_average();
        if (l >= 0 && l >= o->load_max && nrunning > 0) {
            wait = 1.0;
            if (!C.said_load)
                fprintf(stderr, "casyncio: --load: the load average is %.2f, not under %g: "
                        "jobs wait (one at least runs)\n", l, o->load_max);
            C.said_load = true;
        }
    }
    if (!wait) return true;
    static void *wake_arg[2];
    wake_arg[0] = (void *)wake;
    wake_arg[1] = arg;
    if (ca_loop_call_later(loop, wait, gate_cb, wake_arg, &C.gate) < 0) return true;
    return false;
}

void compat_job_started(ca_loop *loop)
{
    C.last_start = ca_loop_time(loop);
    C.started = true;
}

/* ----- --timeout N% ----------------------------------------------------------------------- */

void compat_job_succeeded(double runtime)
{
    if (C.o == NULL || C.o->timeout_pct <= 0) return;
    if (C.nrt == C.rt_cap) {
        size_t cap = C.rt_cap ? C.rt_cap * 2 : 64;
        double *p = realloc(C.rt, cap * sizeof *p);
        if (!p) return;
        C.rt = p;
        C.rt_cap = cap;
    }
    C.rt[C.nrt++] = runtime;
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

double compat_timeout(void)
{
    const struct run_options *o = C.o;
    if (!o) return 0;
    if (o->timeout > 0) return o->timeout;
    /* GNU parallel: no timeout until 3 jobs have succeeded; then N% of their median runtime. */
    if (o->timeout_pct <= 0 || C.nrt < 3) return 0;
    qsort(C.rt, C.nrt, sizeof *C.rt, cmp_double);
    double med = C.nrt % 2 ? C.rt[C.nrt / 2] : (C.rt[C.nrt / 2 - 1] + C.rt[C.nrt / 2]) / 2;
    double t = med * o->timeout_pct / 100;
    return t > 0.001 ? t : 0.001;
}

/* ----- --results DIR ---------------------------------------------------------------------- */

/* A value as one path component, as GNU parallel writes it: '\' doubled, '/' as "\_". */
static bool add_component(struct buf *b, const char *v, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        bool ok = v[i] == '/' ? buf_adds(b, "\\_") : v[i] == '\\' ? buf_adds(b, "\\\\")
                                                                 : buf_addc(b, v[i]);
        if (!ok) return false;
    }
    return true;
}

/* Writes dir/name: the first flen bytes of the file fd (output spooled to disk, when fd >= 0)
 * followed by mem. */
static int write_file(const char *dir, const char *name, int fd, long long flen,
                      const char *mem, size_t n)
{
    struct buf path = {0};
    if (!buf_adds(&path, dir) || !buf_addc(&path, '/') || !buf_adds(&path, name) ||
        !buf_addc(&path, 0)) {
        buf_free(&path);
        return -ENOMEM;
    }
    int out = open(path.p, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0666);
    buf_free(&path);
    if (out < 0) return -errno;
    int e = 0;
    if (fd >= 0 && flen > 0) {
        char chunk[65536];
        for (off_t off = 0; off < flen && e == 0;) {
            size_t want = flen - off < (off_t)sizeof chunk ? (size_t)(flen - off) : sizeof chunk;
            ssize_t m = pread(fd, chunk, want, off);
            if (m <= 0) {
                e = m < 0 ? -errno : -EIO;
                break;
            }
            e = write_all(out, chunk, (size_t)m);
            off += m;
        }
    }
    if (e == 0 && n) e = write_all(out, mem, n);
    if (close(out) < 0 && e == 0) e = -errno;
    return e;
}

static int mkdirs(char *path)
{
    for (char *p = path + 1; *p; p++) {
        if (*p != '/') continue;
        *p = 0;
        int r = mkdir(path, 0777);
        *p = '/';
        if (r < 0 && errno != EEXIST) return -errno;
    }
    if (mkdir(path, 0777) < 0 && errno != EEXIST) return -errno;
    return 0;
}

int compat_results(unsigned long seq, const char *input, int out_fd, long long out_flen,
                   const struct buf *out, int err_fd, long long err_flen, const struct buf *err)
{
    const struct run_options *o = C.o;
    if (!o || !o->results) return 0;
    /* DIR/1/<value of source 1>/2/<value of source 2>/{seq,stdout,stderr} */
    struct buf d = {0};
    bool ok = buf_adds(&d, o->results);
    int k = 1;
    for (const char *p = input; ok;) {
        size_t n = strcspn(p, "\x1e\x1f");
        char num[16];
        snprintf(num, sizeof num, "/%d/", k++);
        ok = buf_adds(&d, num) && add_component(&d, p, n);
        if (!p[n]) break;
        p += n + 1;
    }
    if (!ok || !buf_addc(&d, 0)) {
        buf_free(&d);
        return -ENOMEM;
    }
    int e = mkdirs(d.p);
    char s[32];
    int sn = snprintf(s, sizeof s, "%lu", seq);
    if (e == 0) e = write_file(d.p, "seq", -1, 0, s, (size_t)sn);
    if (e == 0) e = write_file(d.p, "stdout", out_fd, out_flen, out->p, out->len);
    if (e == 0) e = write_file(d.p, "stderr", err_fd, err_flen, err->p, err->len);
    if (e < 0) fprintf(stderr, "casyncio: --results %s: %s\n", d.p, strerror(-e));
    buf_free(&d);
    return e;
}

/* ----- --halt ------------------------------------------------------------------------------ */

/* Whether the --halt condition is met, given the counts so far and the total number of jobs
 * (-1 when not known yet). GNU parallel computes N% of the total; with an unknown total we use
 * the jobs done so far, once there are 3. */
bool compat_halt_hit(unsigned long failed, unsigned long ok, unsigned long done, long total,
                     int job_rc)
{
    const struct run_options *o = C.o;
    if (!o) return false;
    unsigned long n = o->halt_on == HALT_ON_FAIL ? failed : o->halt_on == HALT_ON_SUCCESS ? ok
                                                                                         : done;
    bool hit;
    if (o->halt_percent) {
        if (total > 0) hit = n * 100 >= (unsigned long)o->halt_percent * (unsigned long)total;
        else hit = done >= 3 && n * 100 >= (unsigned long)o->halt_percent * done;
    } else {
        hit = n >= (unsigned long)o->halt_count;
    }
    if (hit) C.halt_rc = job_rc < 0 ? 128 - job_rc : job_rc & 255;
    return hit;
}

/* GNU parallel's exit status after a halt: success=...: 0; fail=1 and done=1: the status of
 * the job that made it halt; N%: the percentage of jobs that failed; else the failures. */
int compat_halt_status(unsigned long failed, long total, unsigned long done)
{
    const struct run_options *o = C.o;
    if (o->halt_on == HALT_ON_SUCCESS) return 0;
    if (o->halt_percent) {
        /* Of all the jobs; of those done when their number is not known yet. */
        long t = total > 0 ? total : done > 0 ? (long)done : 1;
        return (int)(failed * 100 / (unsigned long)t);
    }
    if (o->halt_count == 1) return C.halt_rc;
    return failed > CLI_MAX_FAILED_STATUS ? CLI_MAX_FAILED_STATUS : (int)failed;
}
