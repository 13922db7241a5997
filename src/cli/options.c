/* Command-line parsing for `casyncio run`. Hand-written rather than getopt_long: options stop
 * at the first word that is not one (the COMMAND), and GNU getopt would otherwise permute the
 * COMMAND's own options into ours. */
#include "cli.h"
#include "../kinds.h"

#include <errno.h>
#include <limits.h>
#include <math.h>
#include <sched.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static int add_source(struct run_options *o, char **args, int nargs, const char *file);

void print_run_usage(FILE *f)
{
    fputs("usage: casyncio run [OPTIONS] [--] [COMMAND [ARG...]] [::: INPUT...]\n"
          "  Runs COMMAND once per input line (stdin, -a FILE) or per INPUT after :::.\n"
          "  {} in COMMAND is replaced by the input (appended when absent); without COMMAND\n"
          "  each input is a shell command line.\n"
          "options:\n"
          "  -j, --jobs N          jobs at once (default: CPUs; +N/-N: CPUs plus/minus N; N%;\n"
          "                        0: as many as fit)\n"
          "  -a, --arg-file FILE   read inputs from FILE instead of stdin (also :::: FILE)\n"
          "  several ::: / :::: sources: every combination; {1} {2}... are their values;\n"
          "  :::+ / ::::+ link a source to the one before (side by side); --link: all of them\n"
          "  -0, --null            inputs are separated by NUL, not newline\n"
          "  -d, --delimiter D     inputs are separated by D (\\n \\t \\0 understood)\n"
          "  -E STR                the input ends at STR; -r: blank inputs run nothing\n"
          "      --colsep RE       split inputs into columns {1} {2}... (string or regexp)\n"
          "      --header :        the first input names the columns: {name}\n"
          "  replacement strings: {} {.} {/} {//} {/.} {#} {%}, {n} {n.} {n/} {n//} {n/.} {-n};\n"
          "  -I STR renames {} (--er, --bnr, --dnr, --bner, --seqreplace, --slotreplace the rest)\n"
          "  -n N / -N N / -L N    N inputs per job ({} all of them / repeated per input)\n"
          "  -m / -X               as many inputs per job as fit (-s N: chars per command line)\n"
          "      --shell           run COMMAND through sh -c (the input is quoted)\n"
          "      --timeout SECS    SIGTERM a job after SECS (N%: of the median runtime),\n"
          "                        SIGKILL it --grace SECS later\n"
          "      --grace SECS      time between SIGTERM and SIGKILL (default 1)\n"
          "      --retries N       run a failed job at most N times in all\n"
          "      --delay SECS      at least SECS between job starts\n"
          "      --memfree SIZE    start jobs only while that much memory is available\n"
          "      --load N          start jobs only while the load average is under N\n"
          "      --resume, --resume-failed   skip what --joblog says ran (or succeeded)\n"
          "      --halt WHEN[,fail=N|,success=N|,done=N|,fail=N%]   WHEN: now, soon, never\n"
          "  -k, --keep-order      print outputs in input order\n"
          "      --group           print a job's output whole when it ends (default)\n"
          "      --line-buffer     print output line by line as it comes\n"
          "      --tag             prefix output lines with the input and a tab\n"
          "      --tagstring STR   prefix output lines with STR (replacement strings) and a tab\n"
          "  -u, --ungroup         jobs write straight to our stdout/stderr\n"
          "  -v / -t               print each command on stdout before its output / on stderr\n"
          "      --results DIR     also save each job's output in DIR/1/INPUT/{stdout,stderr,seq}\n"
          "      --joblog FILE     log every job (GNU parallel's format)\n"
          "      --bar, --no-bar   progress bar on stderr (default: when stderr is a terminal);\n"
          "                        --eta, --progress: the bar\n"
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
          "      --watcher KIND    pidfd, uring, fast, safe, multiloop or threaded (default: see\n"
          "                        info)\n"
          "  -h, --help            this help\n"
          "GNU parallel's syntax is taken (see man casyncio); its other options are refused by\n"
          "name. Unlike parallel, COMMAND runs without a shell unless --shell.\n"
          "exit status (GNU parallel's): 0 all jobs succeeded; 1-101 failed jobs (capped);\n"
          "128+N stopped by signal N; 255 bad usage or the runner's own error; after --halt:\n"
          "fail=1 the failed job's status, success=N 0, N% the percentage that failed.\n"
          "a job is over when its process exits (a background process holding its output is not\n"
          "waited for past 0.5 s); output held for printing spills to $TMPDIR past 1 MiB.\n",
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
    return (size_t)k < ca__loop_kind_count ? ca__loop_kinds[k].cli_name : "?";
}

const char *watcher_kind_name(enum watcher_kind k)
{
    if (k == W_DEFAULT) return "default";
    size_t i = (size_t)k - 1;
    return i < ca__watcher_kind_count ? ca__watcher_kinds[i].name : "?";
}

int usage_error(const char *fmt, const char *what)
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
    if (n > 1 && (s[0] == '+' || s[0] == '-')) {
        /* GNU parallel's -j +N / -j -N: N more or fewer than the CPUs, at least one. */
        if (!parse_count(s + 1, &v)) return false;
        long k = (long)default_jobs() + (s[0] == '+' ? v : -(long)v);
        *out = k < 1 ? 1 : k > 1024 ? 1024 : (int)k;
        return true;
    }
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
    const ca__loop_kind *lk = ca__loop_kind_find(s);
    if (!lk) return false;
    *k = (enum loop_kind)(lk - ca__loop_kinds);
    return true;
}

static bool parse_watcher(const char *s, enum watcher_kind *k)
{
    const ca__watcher_kind *wk = ca__watcher_kind_find(s);
    if (!wk) return false;
    *k = (enum watcher_kind)(wk - ca__watcher_kinds + 1);
    return true;
}

/* A duration: seconds, or GNU parallel's 1d2h3m4.5s form. */
static bool parse_duration(const char *s, double *out)
{
    if (!s || !*s) return false;
    double total = 0;
    bool any_unit = false;
    while (*s) {
        errno = 0;
        char *end;
        double v = strtod(s, &end);
        if (end == s || errno || !isfinite(v) || v < 0) return false;
        double mult = 1;
        switch (*end) {
        case 0: break;
        case 's': mult = 1; end++; break;
        case 'm': mult = 60; end++; break;
        case 'h': mult = 3600; end++; break;
        case 'd': mult = 86400; end++; break;
        default: return false;
        }
        if (*end == 0 && !any_unit && mult == 1 && end[-1] != 's') {
            total += v;
            break;
        }
        any_unit = true;
        total += v * mult;
        s = end;
    }
    *out = total;
    return true;
}

/* A size with GNU parallel's suffixes: K M G T P are powers of 1024, k m g t p of 1000. */
static bool parse_size(const char *s, long long *out)
{
    if (!s || !*s) return false;
    errno = 0;
    char *end;
    double v = strtod(s, &end);
    if (end == s || errno || !isfinite(v) || v < 0) return false;
    const char *units = "kmgtp", *U = "KMGTP";
    if (*end) {
        const char *u = strchr(units, *end), *B = strchr(U, *end);
        if ((!u && !B) || end[1]) return false;
        int k = u ? (int)(u - units) + 1 : (int)(B - U) + 1;
        for (int i = 0; i < k; i++) v *= u ? 1000.0 : 1024.0;
    }
    if (v > 9e18) return false;
    *out = (long long)v;
    return true;
}

/* -d and friends: the delimiter with C-style escapes decoded (\n \t \r \0 \\ \xHH). */
static char *decode_escapes(const char *s, size_t *len)
{
    char *d = malloc(strlen(s) + 1);
    if (!d) return NULL;
    size_t n = 0;
    for (const char *p = s; *p; p++) {
        if (*p != '\\' || !p[1]) {
            d[n++] = *p;
            continue;
        }
        p++;
        switch (*p) {
        case 'n': d[n++] = '\n'; break;
        case 't': d[n++] = '\t'; break;
        case 'r': d[n++] = '\r'; break;
        case '0': d[n++] = '\0'; break;
        case 'a': d[n++] = '\a'; break;
        case 'f': d[n++] = '\f'; break;
        case 'v': d[n++] = '\v'; break;
        case '\\': d[n++] = '\\'; break;
        case 'x': {
            char hex[3] = {0};
            int k = 0;
            while (k < 2 && strchr("0123456789abcdefABCDEF", p[1]) && p[1]) hex[k++] = *++p;
            d[n++] = (char)strtol(hex, NULL, 16);
            break;
        }
        default: d[n++] = '\\'; d[n++] = *p; break;
        }
    }
    d[n] = 0;
    *len = n;
    return d;
}

/* ----- the option table ----------------------------------------------------------------- */

/* How an option takes its value: none, always, or only attached (--max-lines=3, -l3). */
enum arg { A_NONE, A_REQ, A_OPT };

enum opt_id {
    O_HELP, O_KEEP, O_NO_KEEP, O_GROUP, O_LINEBUF, O_TAG, O_BAR, O_NO_BAR, O_SUMMARY,
    O_NO_SUMMARY, O_DRY, O_SHELL, O_NULL, O_JOBS, O_ARGFILE, O_TIMEOUT, O_GRACE, O_RETRIES,
    O_HALT, O_JOBLOG, O_LOOP, O_WATCHER,
    /* GNU parallel's, implemented */
    O_MAXARGS, O_MAXREPL, O_MAXLINES, O_MULTI, O_XCTX, O_XARGS, O_MAXCHARS, O_DELIM, O_COLSEP,
    O_HEADER, O_TAGSTRING, O_REPLACE, O_REPLACE_OPT, O_ER, O_BNR, O_DNR, O_BNER, O_SEQR,
    O_SLOTR, O_UNGROUP, O_RESULTS, O_RESUME, O_RESUME_FAILED, O_DELAY, O_MEMFREE, O_LOAD,
    O_ETA, O_LINK, O_NORUN_EMPTY, O_EOF, O_EOF_OPT, O_ARGSEP, O_ARGFILESEP, O_VERBOSE_T,
    O_QUOTE, O_NOOP, O_PROGRESS, O_VERBOSE_V,
    /* refused with a message */
    O_REFUSED, O_SSH,
};

struct opt {
    const char *name;    /* "--long" or "-x" */
    enum opt_id id;
    enum arg arg;
    const char *why;     /* for O_REFUSED: why, or NULL */
};

#define WHY_PERL "perl expressions do not exist here"
#define WHY_PIPE "jobs read nothing on stdin here (it is /dev/null); split the input first"
static const struct opt opts[] = {
    {"--help", O_HELP, A_NONE, NULL}, {"-h", O_HELP, A_NONE, NULL},
    {"--keep-order", O_KEEP, A_NONE, NULL}, {"-k", O_KEEP, A_NONE, NULL},
    {"--no-keep-order", O_NO_KEEP, A_NONE, NULL},
    {"--group", O_GROUP, A_NONE, NULL}, {"--line-buffer", O_LINEBUF, A_NONE, NULL},
    {"--lb", O_LINEBUF, A_NONE, NULL}, {"--tag", O_TAG, A_NONE, NULL},
    {"--bar", O_BAR, A_NONE, NULL}, {"--no-bar", O_NO_BAR, A_NONE, NULL},
    {"--summary", O_SUMMARY, A_NONE, NULL}, {"--no-summary", O_NO_SUMMARY, A_NONE, NULL},
    {"--dry-run", O_DRY, A_NONE, NULL}, {"--dryrun", O_DRY, A_NONE, NULL},
    {"--shell", O_SHELL, A_NONE, NULL}, {"-0", O_NULL, A_NONE, NULL},
    {"--null", O_NULL, A_NONE, NULL},
    {"--jobs", O_JOBS, A_REQ, NULL}, {"-j", O_JOBS, A_REQ, NULL}, {"-P", O_JOBS, A_REQ, NULL},
    {"--max-procs", O_JOBS, A_REQ, NULL},
    {"--arg-file", O_ARGFILE, A_REQ, NULL}, {"-a", O_ARGFILE, A_REQ, NULL},
    {"--timeout", O_TIMEOUT, A_REQ, NULL}, {"--grace", O_GRACE, A_REQ, NULL},
    {"--retries", O_RETRIES, A_REQ, NULL}, {"--halt", O_HALT, A_REQ, NULL},
    {"--halt-on-error", O_HALT, A_REQ, NULL}, {"--joblog", O_JOBLOG, A_REQ, NULL},
    {"--jl", O_JOBLOG, A_REQ, NULL}, {"--loop", O_LOOP, A_REQ, NULL},
    {"--watcher", O_WATCHER, A_REQ, NULL},

    {"--max-args", O_MAXARGS, A_REQ, NULL}, {"-n", O_MAXARGS, A_REQ, NULL},
    {"--max-replace-args", O_MAXREPL, A_REQ, NULL}, {"-N", O_MAXREPL, A_REQ, NULL},
    {"-L", O_MAXLINES, A_REQ, NULL}, {"--max-lines", O_MAXLINES, A_OPT, NULL},
    {"-l", O_MAXLINES, A_OPT, NULL}, {"-m", O_MULTI, A_NONE, NULL},
    {"-X", O_XCTX, A_NONE, NULL}, {"--xargs", O_XARGS, A_NONE, NULL},
    {"--max-chars", O_MAXCHARS, A_REQ, NULL}, {"-s", O_MAXCHARS, A_REQ, NULL},
    {"--delimiter", O_DELIM, A_REQ, NULL}, {"-d", O_DELIM, A_REQ, NULL},
    {"--colsep", O_COLSEP, A_REQ, NULL}, {"-C", O_COLSEP, A_REQ, NULL},
    {"--header", O_HEADER, A_REQ, NULL}, {"--tagstring", O_TAGSTRING, A_REQ, NULL},
    {"-I", O_REPLACE, A_REQ, NULL}, {"--replace", O_REPLACE_OPT, A_OPT, NULL},
    {"-i", O_REPLACE_OPT, A_OPT, NULL},
    {"--extensionreplace", O_ER, A_REQ, NULL}, {"--er", O_ER, A_REQ, NULL},
    {"--basenamereplace", O_BNR, A_REQ, NULL}, {"--bnr", O_BNR, A_REQ, NULL},
    {"--dirnamereplace", O_DNR, A_REQ, NULL}, {"--dnr", O_DNR, A_REQ, NULL},
    {"--basenameextensionreplace", O_BNER, A_REQ, NULL}, {"--bner", O_BNER, A_REQ, NULL},
    {"--seqreplace", O_SEQR, A_REQ, NULL}, {"--slotreplace", O_SLOTR, A_REQ, NULL},
    {"--ungroup", O_UNGROUP, A_NONE, NULL}, {"-u", O_UNGROUP, A_NONE, NULL},
    {"--results", O_RESULTS, A_REQ, NULL}, {"--res", O_RESULTS, A_REQ, NULL},
    {"--resume", O_RESUME, A_NONE, NULL}, {"--resume-failed", O_RESUME_FAILED, A_NONE, NULL},
    {"--delay", O_DELAY, A_REQ, NULL}, {"--memfree", O_MEMFREE, A_REQ, NULL},
    {"--load", O_LOAD, A_REQ, NULL}, {"--eta", O_ETA, A_NONE, NULL},
    {"--progress", O_PROGRESS, A_NONE, NULL},
    {"--link", O_LINK, A_NONE, NULL}, {"--xapply", O_LINK, A_NONE, NULL},
    {"--no-run-if-empty", O_NORUN_EMPTY, A_NONE, NULL}, {"-r", O_NORUN_EMPTY, A_NONE, NULL},
    {"-E", O_EOF, A_REQ, NULL}, {"--eof", O_EOF_OPT, A_OPT, NULL},
    {"-e", O_EOF_OPT, A_OPT, NULL},
    {"--arg-sep", O_ARGSEP, A_REQ, NULL}, {"--arg-file-sep", O_ARGFILESEP, A_REQ, NULL},
    {"--verbose", O_VERBOSE_T, A_NONE, NULL}, {"-t", O_VERBOSE_T, A_NONE, NULL},
    {"--quote", O_QUOTE, A_NONE, NULL}, {"-q", O_QUOTE, A_NONE, NULL},
    /* Nothing to do here: no citation notice, no profiles, nothing printed besides output. */
    {"--will-cite", O_NOOP, A_NONE, NULL}, {"--no-notice", O_NOOP, A_NONE, NULL},
    {"--plain", O_NOOP, A_NONE, NULL}, {"--gnu", O_NOOP, A_NONE, NULL},
    {"--silent", O_NOOP, A_NONE, NULL},

    /* ssh options that ssh.c (parse_ssh_option, tried first) does not take. */
    {"--basefile", O_SSH, A_REQ, NULL}, {"--bf", O_SSH, A_REQ, NULL},
    {"--workdir", O_SSH, A_REQ, NULL}, {"--wd", O_SSH, A_REQ, NULL},
    {"--ssh-delay", O_SSH, A_REQ, NULL}, {"--nonall", O_SSH, A_NONE, NULL},
    {"--onall", O_SSH, A_NONE, NULL}, {"--filter-hosts", O_SSH, A_NONE, NULL},
    {"--hostgroups", O_SSH, A_NONE, NULL}, {"--hgrp", O_SSH, A_NONE, NULL},
    {"--rsync-opts", O_SSH, A_REQ, NULL}, {"--env", O_SSH, A_REQ, NULL},
    {"--record-env", O_SSH, A_NONE, NULL},

    /* Every other option of GNU parallel 20221122: refused by name. */
    {"--pipe", O_REFUSED, A_NONE, WHY_PIPE}, {"--spreadstdin", O_REFUSED, A_NONE, WHY_PIPE},
    {"--pipe-part", O_REFUSED, A_NONE, WHY_PIPE}, {"--block", O_REFUSED, A_REQ, WHY_PIPE},
    {"--block-size", O_REFUSED, A_REQ, WHY_PIPE}, {"--block-timeout", O_REFUSED, A_REQ, WHY_PIPE},
    {"--bt", O_REFUSED, A_REQ, WHY_PIPE}, {"--round-robin", O_REFUSED, A_NONE, WHY_PIPE},
    {"--round", O_REFUSED, A_NONE, WHY_PIPE}, {"--recstart", O_REFUSED, A_REQ, WHY_PIPE},
    {"--recend", O_REFUSED, A_REQ, WHY_PIPE}, {"--regexp", O_REFUSED, A_NONE, WHY_PIPE},
    {"--remove-rec-sep", O_REFUSED, A_NONE, WHY_PIPE},
    {"--removerecsep", O_REFUSED, A_NONE, WHY_PIPE}, {"--rrs", O_REFUSED, A_NONE, WHY_PIPE},
    {"--cat", O_REFUSED, A_NONE, WHY_PIPE}, {"--fifo", O_REFUSED, A_NONE, WHY_PIPE},
    {"--shard", O_REFUSED, A_REQ, WHY_PIPE}, {"--bin", O_REFUSED, A_REQ, WHY_PIPE},
    {"--group-by", O_REFUSED, A_REQ, WHY_PIPE}, {"--tee", O_REFUSED, A_NONE, WHY_PIPE},
    {"--rpl", O_REFUSED, A_REQ, WHY_PERL}, {"--parens", O_REFUSED, A_REQ, WHY_PERL},
    {"--plus", O_REFUSED, A_NONE, "its replacement strings are perl expressions"},
    {"--bg", O_REFUSED, A_NONE, NULL}, {"--fg", O_REFUSED, A_NONE, NULL},
    {"--color", O_REFUSED, A_NONE, NULL}, {"--color-failed", O_REFUSED, A_NONE, NULL},
    {"--cf", O_REFUSED, A_NONE, NULL}, {"--compress", O_REFUSED, A_NONE, NULL},
    {"--compress-program", O_REFUSED, A_REQ, NULL},
    {"--decompress-program", O_REFUSED, A_REQ, NULL}, {"--csv", O_REFUSED, A_NONE, NULL},
    {"--ctag", O_REFUSED, A_NONE, NULL}, {"--ctagstring", O_REFUSED, A_REQ, NULL},
    {"--embed", O_REFUSED, A_NONE, NULL}, {"--filter", O_REFUSED, A_REQ, NULL},
    {"--hostgroup", O_REFUSED, A_NONE, NULL},
    {"--limit", O_REFUSED, A_REQ, NULL}, {"--latest-line", O_REFUSED, A_NONE, NULL},
    {"--ll", O_REFUSED, A_NONE, NULL}, {"--memsuspend", O_REFUSED, A_REQ, NULL},
    {"--minversion", O_REFUSED, A_REQ, NULL}, {"--open-tty", O_REFUSED, A_NONE, NULL},
    {"-o", O_REFUSED, A_NONE, NULL}, {"--output-as-files", O_REFUSED, A_NONE, NULL},
    {"--outputasfiles", O_REFUSED, A_NONE, NULL}, {"--files", O_REFUSED, A_NONE, NULL},
    {"--process-slot-var", O_REFUSED, A_REQ, NULL},
    {"--max-line-length-allowed", O_REFUSED, A_NONE, NULL},
    {"--number-of-cpus", O_REFUSED, A_NONE, NULL}, {"--number-of-cores", O_REFUSED, A_NONE, NULL},
    {"--number-of-sockets", O_REFUSED, A_NONE, NULL},
    {"--number-of-threads", O_REFUSED, A_NONE, NULL}, {"--nice", O_REFUSED, A_REQ, NULL},
    {"--interactive", O_REFUSED, A_NONE, NULL}, {"-p", O_REFUSED, A_NONE, NULL},
    {"--_parset", O_REFUSED, A_REQ, NULL}, {"--profile", O_REFUSED, A_REQ, NULL},
    {"-J", O_REFUSED, A_REQ, NULL}, {"--noswap", O_REFUSED, A_NONE, NULL},
    {"--retry-failed", O_REFUSED, A_NONE, NULL}, {"--semaphore", O_REFUSED, A_NONE, NULL},
    {"--semaphore-name", O_REFUSED, A_REQ, NULL}, {"--id", O_REFUSED, A_REQ, NULL},
    {"--semaphore-timeout", O_REFUSED, A_REQ, NULL}, {"--st", O_REFUSED, A_REQ, NULL},
    {"--session", O_REFUSED, A_NONE, NULL}, {"--shebang", O_REFUSED, A_NONE, NULL},
    {"--hashbang", O_REFUSED, A_NONE, NULL}, {"--shebang-wrap", O_REFUSED, A_NONE, NULL},
    {"--shell-completion", O_REFUSED, A_REQ, NULL}, {"--shell-quote", O_REFUSED, A_NONE, NULL},
    {"--show-limits", O_REFUSED, A_NONE, NULL}, {"--shuf", O_REFUSED, A_NONE, NULL},
    {"--skip-first-line", O_REFUSED, A_NONE, NULL}, {"--sql", O_REFUSED, A_REQ, NULL},
    {"--sql-master", O_REFUSED, A_REQ, NULL}, {"--sql-and-worker", O_REFUSED, A_REQ, NULL},
    {"--sql-worker", O_REFUSED, A_REQ, NULL}, {"--sqlmaster", O_REFUSED, A_REQ, NULL},
    {"--sqlworker", O_REFUSED, A_REQ, NULL}, {"--sqlandworker", O_REFUSED, A_REQ, NULL},
    {"--template", O_REFUSED, A_REQ, NULL}, {"--tmpl", O_REFUSED, A_REQ, NULL},
    {"--tty", O_REFUSED, A_NONE, NULL}, {"--term-seq", O_REFUSED, A_REQ, NULL},
    {"--total-jobs", O_REFUSED, A_REQ, NULL}, {"--total", O_REFUSED, A_REQ, NULL},
    {"--tmpdir", O_REFUSED, A_REQ, NULL}, {"--tempdir", O_REFUSED, A_REQ, NULL},
    {"--tmux", O_REFUSED, A_NONE, NULL}, {"--tmuxpane", O_REFUSED, A_NONE, NULL},
    {"--trim", O_REFUSED, A_REQ, NULL}, {"--use-sockets-instead-of-threads", O_REFUSED, A_NONE, NULL},
    {"--use-cores-instead-of-threads", O_REFUSED, A_NONE, NULL},
    {"--use-cpus-instead-of-cores", O_REFUSED, A_NONE, NULL},
    {"--version", O_REFUSED, A_NONE, "use 'casyncio --version'"},
    {"-V", O_REFUSED, A_NONE, "use 'casyncio --version'"},
    {"-v", O_VERBOSE_V, A_NONE, NULL},
    {"--wait", O_REFUSED, A_NONE, NULL}, {"--exit", O_REFUSED, A_NONE, NULL},
    {"-x", O_REFUSED, A_NONE, NULL}, {"--sshdelay", O_REFUSED, A_REQ, NULL},
    {"--fast", O_REFUSED, A_NONE, NULL}, {"--number-of-gpus", O_REFUSED, A_NONE, NULL},
};
#define NOPTS (sizeof opts / sizeof opts[0])

static const struct opt *find_long(const char *name, size_t n, bool *ambiguous)
{
    const struct opt *hit = NULL;
    *ambiguous = false;
    for (size_t i = 0; i < NOPTS; i++) {
        if (opts[i].name[1] != '-') continue;
        if (strlen(opts[i].name) == n && strncmp(opts[i].name, name, n) == 0) return &opts[i];
    }
    /* GNU parallel (Getopt::Long) accepts any unambiguous prefix: --kee is --keep-order. */
    for (size_t i = 0; i < NOPTS; i++) {
        if (opts[i].name[1] != '-' || strncmp(opts[i].name, name, n) != 0) continue;
        if (hit && hit->id != opts[i].id) *ambiguous = true;
        hit = &opts[i];
    }
    return *ambiguous ? NULL : hit;
}

static const struct opt *find_short(char c)
{
    for (size_t i = 0; i < NOPTS; i++)
        if (opts[i].name[1] == c && opts[i].name[2] == 0) return &opts[i];
    return NULL;
}

static int refuse(const struct opt *op)
{
    fprintf(stderr, "casyncio run: %s (GNU parallel option) is not supported%s%s\n", op->name,
            op->why ? ": " : "", op->why ? op->why : "");
    fputs("See 'man casyncio' (GNU PARALLEL) for what is and is not supported.\n", stderr);
    return CLI_EXIT_USAGE;
}

static int need_count(const char *name, const char *v, int *out, int min)
{
    if (!parse_count(v, out) || *out < min) return usage_error("bad %s value", name);
    return 0;
}

/* Applies one option with its value (NULL when it has none). */
static int apply(const struct opt *op, const char *v, struct run_options *o, bool *help)
{
    const char *name = op->name;
    char msg[160];
    switch (op->id) {
    case O_HELP: *help = true; return 0;
    case O_KEEP: o->keep_order = true; return 0;
    case O_NO_KEEP: o->keep_order = false; return 0;
    case O_GROUP: o->line_buffer = false; o->ungroup = false; return 0;
    case O_LINEBUF: o->line_buffer = true; return 0;
    case O_TAG: o->tag = true; return 0;
    case O_BAR: o->bar = 1; return 0;
    case O_NO_BAR: o->bar = 0; return 0;
    case O_PROGRESS: o->bar = 1; return 0;
    case O_ETA: o->eta = true; o->bar = 1; return 0;
    case O_SUMMARY: o->summary = 1; return 0;
    case O_NO_SUMMARY: o->summary = 0; return 0;
    case O_DRY: o->dry_run = true; return 0;
    case O_SHELL: o->shell = true; return 0;
    case O_NULL: o->null_sep = true; return 0;
    case O_NOOP: return 0;
    case O_QUOTE: return 0; /* COMMAND is never given to a shell unless --shell */
    case O_JOBS:
        if (!parse_jobs(v, &o->jobs)) return usage_error("bad number of jobs: '%s'", v);
        return 0;
    case O_ARGFILE: return add_source(o, NULL, 0, v);
    case O_TIMEOUT: {
        size_t n = strlen(v);
        if (n > 1 && v[n - 1] == '%') {
            char tmp[32];
            if (n >= sizeof tmp) return usage_error("bad --timeout: '%s'", v);
            memcpy(tmp, v, n - 1);
            tmp[n - 1] = 0;
            if (!parse_seconds(tmp, &o->timeout_pct) || o->timeout_pct <= 0)
                return usage_error("bad --timeout: '%s' (N%% of the median runtime, N > 0)", v);
            o->timeout = 0;
            return 0;
        }
        if (!parse_duration(v, &o->timeout) || o->timeout <= 0)
            return usage_error("bad --timeout: '%s' (seconds > 0)", v);
        o->timeout_pct = 0;
        return 0;
    }
    case O_GRACE:
        if (!parse_seconds(v, &o->grace)) return usage_error("bad --grace: '%s'", v);
        return 0;
    case O_RETRIES:
        if (!parse_count(v, &o->retries)) return usage_error("bad --retries: '%s'", v);
        /* GNU parallel counts attempts: --retries 3 runs a job at most 3 times. */
        if (o->retries > 0) o->retries--;
        return 0;
    case O_HALT:
        if (!parse_halt(v, o)) return usage_error("bad --halt: '%s'", v);
        return 0;
    case O_JOBLOG: o->joblog = v; return 0;
    case O_LOOP:
        if (!parse_loop(v, &o->loop)) return usage_error("bad --loop: '%s' (epoll, poll or uring)", v);
        return 0;
    case O_WATCHER:
        if (!parse_watcher(v, &o->watcher))
            return usage_error("bad --watcher: '%s' (threaded, multiloop, safe, fast, pidfd or "
                               "uring)", v);
        return 0;
    case O_MAXARGS:
        o->multi = MULTI_N;
        return need_count(name, v, &o->max_args, 0);
    case O_MAXREPL:
        o->multi = MULTI_NN;
        return need_count(name, v, &o->max_args, 0);
    case O_MAXLINES:
        o->multi = MULTI_NN;
        if (!v) {
            o->max_args = 1;
            return 0;
        }
        return need_count(name, v, &o->max_args, 1);
    case O_MULTI: case O_XARGS: o->multi = MULTI_M; o->max_args = 0; return 0;
    case O_XCTX: o->multi = MULTI_X; o->max_args = 0; return 0;
    case O_MAXCHARS: {
        int n;
        if (!parse_count(v, &n) || n < 1) return usage_error("bad %s value", name);
        o->max_chars = n;
        return 0;
    }
    case O_DELIM: {
        char *d = decode_escapes(v, &o->delim_len);
        if (!d) return usage_error("%s: out of memory", name);
        if (o->delim_len == 0) {
            free(d);
            return usage_error("%s needs a delimiter", name);
        }
        /* Kept for the whole run, as argv is (a static owner, so no leak checker objects). */
        static char *decoded_delim;
        free(decoded_delim);
        decoded_delim = d;
        o->delim = d;
        return 0;
    }
    case O_COLSEP: o->colsep = v; return 0;
    case O_HEADER:
        if (strcmp(v, ":") != 0) {
            snprintf(msg, sizeof msg, "--header '%s' (GNU parallel option) is not supported: "
                     "only --header : (the first record names the columns)", v);
            return usage_error("%s", msg);
        }
        o->header = true;
        return 0;
    case O_TAGSTRING: o->tagstring = v; return 0;
    case O_REPLACE: o->repl[0] = v; return 0;
    case O_REPLACE_OPT: o->repl[0] = v && *v ? v : "{}"; return 0;
    case O_ER: o->repl[1] = v; return 0;
    case O_BNR: o->repl[2] = v; return 0;
    case O_DNR: o->repl[3] = v; return 0;
    case O_BNER: o->repl[4] = v; return 0;
    case O_SEQR: o->repl[5] = v; return 0;
    case O_SLOTR: o->repl[6] = v; return 0;
    case O_UNGROUP: o->ungroup = true; return 0;
    case O_RESULTS: o->results = v; return 0;
    case O_RESUME: o->resume = 1; return 0;
    case O_RESUME_FAILED: o->resume = 2; return 0;
    case O_DELAY:
        if (!parse_duration(v, &o->delay)) return usage_error("bad --delay: '%s'", v);
        return 0;
    case O_MEMFREE:
        if (!parse_size(v, &o->memfree)) return usage_error("bad --memfree: '%s'", v);
        return 0;
    case O_LOAD: {
        size_t n = strlen(v);
        if (n > 1 && v[n - 1] == '%') {
            char tmp[32];
            if (n >= sizeof tmp) return usage_error("bad --load: '%s'", v);
            memcpy(tmp, v, n - 1);
            tmp[n - 1] = 0;
            if (!parse_seconds(tmp, &o->load_max)) return usage_error("bad --load: '%s'", v);
            o->load_max = o->load_max * default_jobs() / 100;
        } else if (!parse_seconds(v, &o->load_max)) {
            return usage_error("bad --load: '%s'", v);
        }
        if (o->load_max <= 0) return usage_error("bad --load: '%s' (> 0)", v);
        return 0;
    }
    case O_LINK: o->link_all = true; return 0;
    case O_NORUN_EMPTY: o->skip_empty = true; return 0;
    case O_EOF: o->eof_str = v; return 0;
    case O_EOF_OPT: o->eof_str = v && *v ? v : "_"; return 0;
    case O_ARGSEP: o->arg_sep = v; return 0;
    case O_ARGFILESEP: o->arg_file_sep = v; return 0;
    case O_VERBOSE_T: o->print_cmd = true; return 0;
    case O_VERBOSE_V: o->verbose = true; return 0;
    case O_SSH:
        fprintf(stderr, "casyncio run: %s (GNU parallel option) is not supported: of the ssh "
                "options there are -S, --sshloginfile, --ssh, --transferfile, --return, "
                "--cleanup, --trc\n", name);
        return CLI_EXIT_USAGE;
    case O_REFUSED: return refuse(op);
    }
    return 0;
}

/* Parses one word that starts with '-': a long option (with a unique-prefix match, and
 * "=VALUE"), or a bundle of short ones (-kj4). *i moves past any value taken. */
static int parse_one(int argc, char **argv, int *i, struct run_options *o, bool *help)
{
    const char *a = argv[*i];
    if (a[1] == '-') {
        const char *eq = strchr(a, '=');
        size_t n = eq ? (size_t)(eq - a) : strlen(a);
        bool amb;
        const struct opt *op = find_long(a, n, &amb);
        if (amb) return usage_error("ambiguous option '%s'", a);
        if (!op) return usage_error("unknown option '%s'", a);
        const char *v = NULL;
        if (op->arg == A_NONE && eq) return usage_error("%s takes no value", op->name);
        if (op->arg != A_NONE && eq) v = eq + 1;
        else if (op->arg == A_REQ) {
            if (op->id == O_REFUSED || op->id == O_SSH) return apply(op, NULL, o, help);
            if (*i + 1 >= argc) return usage_error("%s needs a value", op->name);
            v = argv[++*i];
        }
        return apply(op, v, o, help);
    }
    for (const char *p = a + 1; *p; p++) {
        const struct opt *op = find_short(*p);
        if (!op) {
            char name[3] = {'-', *p, 0};
            return usage_error("unknown option '%s'", name);
        }
        if (op->arg == A_NONE) {
            int r = apply(op, NULL, o, help);
            if (r) return r;
            continue;
        }
        const char *v = p[1] ? p + 1 : NULL;
        if (!v && op->arg == A_REQ) {
            if (op->id == O_REFUSED || op->id == O_SSH) return apply(op, NULL, o, help);
            if (*i + 1 >= argc) return usage_error("%s needs a value", op->name);
            v = argv[++*i];
        }
        return apply(op, v, o, help);
    }
    return 0;
}

static int add_source(struct run_options *o, char **args, int nargs, const char *file)
{
    if (o->nsrc == CLI_MAX_SOURCES) return usage_error("at most %s input sources", "32");
    o->src[o->nsrc++] = (struct source){.args = args, .nargs = nargs, .file = file};
    return 0;
}

/* Which input separator a word is: 1 ":::", 2 "::::", 3 ":::+", 4 "::::+", else 0. */
static int sep_kind(const struct run_options *o, const char *a)
{
    const char *as = o->arg_sep ? o->arg_sep : ":::";
    const char *fs = o->arg_file_sep ? o->arg_file_sep : "::::";
    size_t an = strlen(as), fn = strlen(fs);
    if (strcmp(a, as) == 0) return 1;
    if (strcmp(a, fs) == 0) return 2;
    if (strncmp(a, as, an) == 0 && strcmp(a + an, "+") == 0) return 3;
    if (strncmp(a, fs, fn) == 0 && strcmp(a + fn, "+") == 0) return 4;
    return 0;
}

/* Splits the words after the options into COMMAND and the input sources: ::: WORDS...,
 * :::: FILES... (each file is a source), repeated; the + forms link a source to the one
 * before it (values read side by side rather than combined). */
static int parse_rest(int argc, char **argv, int i, struct run_options *o)
{
    o->cmd = argv + i;
    while (i < argc && !sep_kind(o, argv[i])) i++;
    o->ncmd = (int)(argv + i - o->cmd);
    while (i < argc) {
        int kind = sep_kind(o, argv[i]);
        bool files = kind == 2 || kind == 4, linked = kind >= 3;
        const char *sepw = argv[i];
        int start = ++i;
        while (i < argc && !sep_kind(o, argv[i])) i++;
        if (linked && o->nsrc == 0) return usage_error("%s needs an input source before it", sepw);
        int r = 0;
        if (!files) {
            r = add_source(o, argv + start, i - start, NULL);
            if (!r) o->src[o->nsrc - 1].linked = linked;
        } else {
            if (i == start) return usage_error("%s needs a FILE", sepw);
            for (int k = start; k < i && !r; k++) {
                r = add_source(o, NULL, 0, argv[k]);
                if (!r) o->src[o->nsrc - 1].linked = linked && k == start;
            }
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
        const char *a = argv[i];
        if (strcmp(a, "--") == 0) {
            i++;
            break;
        }
        if (a[0] != '-' || a[1] == 0) break; /* COMMAND, or ":::" */
        /* -S/--sshlogin and the other options of ssh.c. */
        int sr = parse_ssh_option(argc, argv, &i, o);
        if (sr == 1) continue;
        if (sr) return sr;
        int r = parse_one(argc, argv, &i, o, help);
        if (r) return r;
        if (*help) return 0;
    }
    int r = parse_rest(argc, argv, i, o);
    if (r) return r;
    if (o->shell && o->ncmd == 0) o->shell = false; /* inputs are shell lines anyway */
    return compat_check_options(o);
}
