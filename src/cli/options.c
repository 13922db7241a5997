/* Command-line parsing for `casyncio run`. Hand-written rather than getopt_long: options stop
 * at the first word that is not one (the COMMAND), and GNU getopt would otherwise permute the
 * COMMAND's own options into ours. */
#include "cli.h"

#include <errno.h>
#include <limits.h>
#include <math.h>
#include <sched.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

void print_run_usage(FILE *f)
{
    fputs("usage: casyncio run [OPTIONS] [--] [COMMAND [ARG...]] [::: INPUT...]\n"
          "  Runs COMMAND once per input line (stdin, -a FILE) or per INPUT after :::.\n"
          "  {} in COMMAND is replaced by the input (appended when absent); without COMMAND\n"
          "  each input is a shell command line.\n"
          "options:\n"
          "  -j, --jobs N          jobs at once (default: CPUs; N% of CPUs; 0: as many as fit)\n"
          "  -a, --arg-file FILE   read inputs from FILE instead of stdin (also :::: FILE)\n"
          "  several ::: / :::: sources: every combination; {1} {2}... are their values\n"
          "  -0, --null            inputs are separated by NUL, not newline\n"
          "      --shell           run COMMAND through sh -c (the input is quoted)\n"
          "      --timeout SECS    SIGTERM a job after SECS, SIGKILL it --grace SECS later\n"
          "      --grace SECS      time between SIGTERM and SIGKILL (default 1)\n"
          "      --retries N       run a failed job up to N more times\n"
          "      --halt WHEN[,fail=N|,success=N|,done=N|,fail=N%]   WHEN: now, soon, never\n"
          "  -k, --keep-order      print outputs in input order\n"
          "      --group           print a job's output whole when it ends (default)\n"
          "      --line-buffer     print output line by line as it comes\n"
          "      --tag             prefix output lines with the input and a tab\n"
          "      --joblog FILE     log every job (GNU parallel's format)\n"
          "      --bar, --no-bar   progress bar on stderr (default: when stderr is a terminal)\n"
          "      --summary, --no-summary   summary on stderr (default: terminal, or interrupted)\n"
          "      --dry-run         print the commands, run nothing\n"
          "other machines (over ssh, one ControlMaster connection per host):\n"
          "  -S, --sshlogin [N/][SSHCMD ]HOST[,...]   run jobs there (':' is this machine);\n"
          "                        N slots (default: -j if given, else the host's CPU count)\n"
          "      --sshloginfile FILE   one sshlogin a line (.. is ~/.parallel/sshloginfile)\n"
          "      --ssh CMD         the ssh command (default ssh)\n"
          "      --transferfile F  send F (may hold {}) to the host first (rsync -R)\n"
          "      --return F        fetch F back after the job; --cleanup removes both there\n"
          "      --trc F           --transferfile {} --return F --cleanup\n"
          "      --loop KIND       epoll (default), poll or uring\n"
          "      --watcher KIND    pidfd, fast, safe, multiloop or threaded (default: see info)\n"
          "  -h, --help            this help\n"
          "exit status: 0 all jobs succeeded; 1-101 failed jobs (capped); 128+N stopped by\n"
          "signal N; 2 bad usage; 255 the runner's own error.\n",
          f);
}

int default_jobs(void)
{
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof set, &set) == 0 && CPU_COUNT(&set) > 0) return CPU_COUNT(&set);
    long n = sysconf(_SC_NPROCESSORS_ONLN);
    return n > 0 ? (int)n : 1;
}

const char *loop_kind_name(enum loop_kind k)
{
    switch (k) {
    case LOOP_EPOLL: return "epoll";
    case LOOP_POLL: return "poll";
    case LOOP_URING: return "uring";
    }
    return "?";
}

const char *watcher_kind_name(enum watcher_kind k)
{
    switch (k) {
    case W_DEFAULT: return "default";
    case W_THREADED: return "threaded";
    case W_MULTILOOP: return "multiloop";
    case W_SAFE: return "safe";
    case W_FAST: return "fast";
    case W_PIDFD: return "pidfd";
    }
    return "?";
}

static int usage_error(const char *fmt, const char *what)
{
    fputs("casyncio run: ", stderr);
    fprintf(stderr, fmt, what);
    fputs("\nusage: casyncio run [OPTIONS] [--] [COMMAND [ARG...]] [::: INPUT...]\n"
          "Try 'casyncio run --help' for more information.\n",
          stderr);
    return CLI_EXIT_USAGE;
}

/* A whole non-negative decimal number below INT_MAX. */
static bool parse_count(const char *s, int *out)
{
    if (!s || !*s) return false;
    errno = 0;
    char *end;
    long v = strtol(s, &end, 10);
    if (errno || *end || v < 0 || v > INT_MAX / 2 || s[0] == '-' || s[0] == '+') return false;
    *out = (int)v;
    return true;
}

static bool parse_seconds(const char *s, double *out)
{
    if (!s || !*s) return false;
    errno = 0;
    char *end;
    double v = strtod(s, &end);
    if (errno || *end || !isfinite(v) || v < 0) return false;
    *out = v;
    return true;
}

static bool parse_jobs(const char *s, int *out)
{
    size_t n = s ? strlen(s) : 0;
    if (n > 1 && s[n - 1] == '%') {
        char tmp[32];
        int pct;
        if (n >= sizeof tmp) return false;
        memcpy(tmp, s, n - 1);
        tmp[n - 1] = 0;
        if (!parse_count(tmp, &pct)) return false;
        long v = (long)default_jobs() * pct / 100;
        *out = v < 1 ? 1 : (int)v;
        return true;
    }
    int v;
    if (!parse_count(s, &v)) return false;
    /* 0 means "as many as possible": bounded by the fds each job needs (three pipes/pidfds
     * at most), which run_main raises the soft limit for. */
    *out = v == 0 ? 1024 : v;
    return true;
}

/* --halt: now|soon|never, optionally ",fail=N", ",fail=N%", ",success=N", ",done=N"; GNU
 * parallel's short forms 0 (never), 1 (soon,fail=1) and 2 (now,fail=1) are accepted too. */
static bool parse_halt(const char *s, struct run_options *o)
{
    o->halt_on = HALT_ON_FAIL;
    o->halt_count = 1;
    o->halt_percent = 0;
    if (strcmp(s, "0") == 0 || strcmp(s, "never") == 0) {
        o->halt_when = HALT_NEVER;
        return true;
    }
    if (strcmp(s, "1") == 0) {
        o->halt_when = HALT_SOON;
        return true;
    }
    if (strcmp(s, "2") == 0) {
        o->halt_when = HALT_NOW;
        return true;
    }
    const char *comma = strchr(s, ',');
    size_t wl = comma ? (size_t)(comma - s) : strlen(s);
    if (wl == 3 && strncmp(s, "now", 3) == 0) o->halt_when = HALT_NOW;
    else if (wl == 4 && strncmp(s, "soon", 4) == 0) o->halt_when = HALT_SOON;
    else return false;
    if (!comma) return true;
    const char *cond = comma + 1, *num;
    if (strncmp(cond, "fail=", 5) == 0) {
        o->halt_on = HALT_ON_FAIL;
        num = cond + 5;
    } else if (strncmp(cond, "success=", 8) == 0) {
        o->halt_on = HALT_ON_SUCCESS;
        num = cond + 8;
    } else if (strncmp(cond, "done=", 5) == 0) {
        o->halt_on = HALT_ON_DONE;
        num = cond + 5;
    } else {
        return false;
    }
    size_t nl = strlen(num);
    if (nl > 1 && num[nl - 1] == '%') {
        char tmp[16];
        int pct;
        if (nl >= sizeof tmp) return false;
        memcpy(tmp, num, nl - 1);
        tmp[nl - 1] = 0;
        if (!parse_count(tmp, &pct) || pct < 1 || pct > 100) return false;
        o->halt_percent = pct;
        return true;
    }
    return parse_count(num, &o->halt_count) && o->halt_count >= 1;
}

static bool parse_loop(const char *s, enum loop_kind *k)
{
    if (strcmp(s, "epoll") == 0 || strcmp(s, "selector") == 0) *k = LOOP_EPOLL;
    else if (strcmp(s, "poll") == 0) *k = LOOP_POLL;
    else if (strcmp(s, "uring") == 0 || strcmp(s, "io_uring") == 0 || strcmp(s, "proactor") == 0)
        *k = LOOP_URING;
    else return false;
    return true;
}

static bool parse_watcher(const char *s, enum watcher_kind *k)
{
    static const enum watcher_kind all[] = {W_THREADED, W_MULTILOOP, W_SAFE, W_FAST, W_PIDFD};
    for (size_t i = 0; i < sizeof all / sizeof all[0]; i++) {
        if (strcmp(s, watcher_kind_name(all[i])) == 0) {
            *k = all[i];
            return true;
        }
    }
    return false;
}

/* Matches a long option that takes a value, as "--name VALUE" or "--name=VALUE". */
static bool long_value(char **argv, int argc, int *i, const char *name, const char **val,
                       bool *missing)
{
    const char *a = argv[*i];
    size_t n = strlen(name);
    if (strncmp(a, name, n) != 0) return false;
    if (a[n] == '=') {
        *val = a + n + 1;
        return true;
    }
    if (a[n] != 0) return false;
    if (*i + 1 >= argc) {
        *missing = true;
        return true;
    }
    *val = argv[++*i];
    return true;
}

/* Matches a short option that takes a value, as "-j VALUE" or "-jVALUE". */
static bool short_value(char **argv, int argc, int *i, char c, const char **val, bool *missing)
{
    const char *a = argv[*i];
    if (a[0] != '-' || a[1] != c) return false;
    if (a[2]) {
        *val = a + 2;
        return true;
    }
    if (*i + 1 >= argc) {
        *missing = true;
        return true;
    }
    *val = argv[++*i];
    return true;
}

static const char *const flag_names[] = {
    "--keep-order", "-k", "--group", "--line-buffer", "--lb", "--tag", "--bar", "--no-bar",
    "--summary", "--no-summary", "--dry-run", "--dryrun", "--shell", "-0", "--null",
};

static void set_flag(struct run_options *o, const char *a)
{
    if (!strcmp(a, "--keep-order") || !strcmp(a, "-k")) o->keep_order = true;
    else if (!strcmp(a, "--group")) o->line_buffer = false;
    else if (!strcmp(a, "--line-buffer") || !strcmp(a, "--lb")) o->line_buffer = true;
    else if (!strcmp(a, "--tag")) o->tag = true;
    else if (!strcmp(a, "--bar")) o->bar = 1;
    else if (!strcmp(a, "--no-bar")) o->bar = 0;
    else if (!strcmp(a, "--summary")) o->summary = 1;
    else if (!strcmp(a, "--no-summary")) o->summary = 0;
    else if (!strcmp(a, "--dry-run") || !strcmp(a, "--dryrun")) o->dry_run = true;
    else if (!strcmp(a, "--shell")) o->shell = true;
    else if (!strcmp(a, "-0") || !strcmp(a, "--null")) o->null_sep = true;
}

static bool is_flag(const char *a)
{
    for (size_t i = 0; i < sizeof flag_names / sizeof flag_names[0]; i++)
        if (strcmp(a, flag_names[i]) == 0) return true;
    return false;
}

static int add_source(struct run_options *o, char **args, int nargs, const char *file)
{
    if (o->nsrc == CLI_MAX_SOURCES) return usage_error("at most %s input sources", "9");
    o->src[o->nsrc++] = (struct source){.args = args, .nargs = nargs, .file = file};
    return 0;
}

static bool is_sep(const char *a) { return strcmp(a, ":::") == 0 || strcmp(a, "::::") == 0; }

/* Splits the words after the options into COMMAND and the input sources: ::: WORDS...,
 * :::: FILES... (each file is a source), repeated. */
static int parse_rest(int argc, char **argv, int i, struct run_options *o)
{
    o->cmd = argv + i;
    while (i < argc && !is_sep(argv[i])) i++;
    o->ncmd = (int)(argv + i - o->cmd);
    while (i < argc) {
        bool files = strcmp(argv[i], "::::") == 0;
        int start = ++i;
        while (i < argc && !is_sep(argv[i])) i++;
        int r = 0;
        if (!files) {
            r = add_source(o, argv + start, i - start, NULL);
        } else {
            if (i == start) return usage_error("%s needs a FILE", "::::");
            for (int k = start; k < i && !r; k++) r = add_source(o, NULL, 0, argv[k]);
        }
        if (r) return r;
    }
    return 0;
}

int parse_run_options(int argc, char **argv, struct run_options *o, bool *help)
{
    memset(o, 0, sizeof *o);
    o->jobs = default_jobs();
    o->grace = 1.0;
    o->bar = -1;
    o->summary = -1;
    o->halt_when = HALT_NEVER;
    o->halt_count = 1;
    o->loop = LOOP_EPOLL;
    o->watcher = W_DEFAULT;
    *help = false;
    int i = 0;
    for (; i < argc; i++) {
        const char *a = argv[i], *v = NULL;
        bool missing = false;
        if (strcmp(a, "--") == 0) {
            i++;
            break;
        }
        if (a[0] != '-' || a[1] == 0) break; /* COMMAND, or ":::" */
        if (strcmp(a, "-h") == 0 || strcmp(a, "--help") == 0) {
            *help = true;
            return 0;
        }
        if (is_flag(a)) {
            set_flag(o, a);
            continue;
        }
        /* -S/--sshlogin and the other options of ssh.c. */
        int sr = parse_ssh_option(argc, argv, &i, o);
        if (sr == 1) continue;
        if (sr) return sr;
        if (short_value(argv, argc, &i, 'j', &v, &missing) ||
            short_value(argv, argc, &i, 'P', &v, &missing) ||
            long_value(argv, argc, &i, "--jobs", &v, &missing)) {
            if (missing) return usage_error("%s needs a value", a);
            if (!parse_jobs(v, &o->jobs)) return usage_error("bad number of jobs: '%s'", v);
        } else if (short_value(argv, argc, &i, 'a', &v, &missing) ||
                   long_value(argv, argc, &i, "--arg-file", &v, &missing)) {
            if (missing) return usage_error("%s needs a FILE", a);
            int r = add_source(o, NULL, 0, v);
            if (r) return r;
        } else if (long_value(argv, argc, &i, "--timeout", &v, &missing)) {
            if (missing) return usage_error("%s needs SECONDS", a);
            if (!parse_seconds(v, &o->timeout) || o->timeout <= 0)
                return usage_error("bad --timeout: '%s' (seconds > 0)", v);
        } else if (long_value(argv, argc, &i, "--grace", &v, &missing)) {
            if (missing) return usage_error("%s needs SECONDS", a);
            if (!parse_seconds(v, &o->grace)) return usage_error("bad --grace: '%s'", v);
        } else if (long_value(argv, argc, &i, "--retries", &v, &missing)) {
            if (missing) return usage_error("%s needs N", a);
            if (!parse_count(v, &o->retries)) return usage_error("bad --retries: '%s'", v);
        } else if (long_value(argv, argc, &i, "--halt", &v, &missing) ||
                   long_value(argv, argc, &i, "--halt-on-error", &v, &missing)) {
            if (missing) return usage_error("%s needs a value", a);
            if (!parse_halt(v, o)) return usage_error("bad --halt: '%s'", v);
        } else if (long_value(argv, argc, &i, "--joblog", &v, &missing)) {
            if (missing) return usage_error("%s needs a FILE", a);
            o->joblog = v;
        } else if (long_value(argv, argc, &i, "--loop", &v, &missing)) {
            if (missing) return usage_error("%s needs epoll, poll or uring", a);
            if (!parse_loop(v, &o->loop))
                return usage_error("bad --loop: '%s' (epoll, poll or uring)", v);
        } else if (long_value(argv, argc, &i, "--watcher", &v, &missing)) {
            if (missing) return usage_error("%s needs a watcher name", a);
            if (!parse_watcher(v, &o->watcher))
                return usage_error("bad --watcher: '%s' (threaded, multiloop, safe, fast or "
                                   "pidfd)", v);
        } else {
            return usage_error("unknown option '%s'", a);
        }
    }
    int r = parse_rest(argc, argv, i, o);
    if (r) return r;
    if (o->shell && o->ncmd == 0) o->shell = false; /* inputs are shell lines anyway */
    return 0;
}
