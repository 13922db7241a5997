/* -S/--sshlogin: running jobs on other machines, GNU parallel's way. ssh (the OpenSSH client)
 * does the work; this file only builds its command lines:
 *  - one ControlMaster connection per host, started before the first job (it also asks the
 *    host for its CPU count when no N/ gives the slots) and stopped at the end, so that each
 *    job is one more session over an open connection rather than a new login;
 *  - a job's command is quoted word by word for the remote shell, which runs exactly the argv
 *    the job would run here (spaces, quotes, $ and ; in inputs reach the command as they are);
 *  - --transferfile/--return/--cleanup make the job a small local sh script: rsync -R the
 *    files there, run the job, rsync -R the results back, rm both there (rsync, as GNU
 *    parallel, must be installed on both ends).
 * The setup and teardown here run before the event loop and after it (plain posix_spawn and
 * waitpid of our own children, while no child watcher exists that could reap them). */
#include "run.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <spawn.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

extern char **environ;

/* How long the ControlMasters may take to log in, all together (seconds). */
#define CONNECT_TIMEOUT 60

/* ----- options -------------------------------------------------------------------------------- */

static int ssh_usage(const char *fmt, const char *what)
{
    fputs("casyncio run: ", stderr);
    fprintf(stderr, fmt, what);
    fputs("\nTry 'casyncio run --help' for more information.\n", stderr);
    return CLI_EXIT_USAGE;
}

/* Matches "--name VALUE", "--name=VALUE" (and for a short name "-S VALUE", "-SVALUE"). */
static bool opt_value(int argc, char **argv, int *i, const char *name, const char **val,
                      bool *missing)
{
    const char *a = argv[*i];
    size_t n = strlen(name);
    if (strncmp(a, name, n) != 0) return false;
    if (a[n] == '=' && name[1] == '-') {
        *val = a + n + 1;
        return true;
    }
    if (a[n] != 0) {
        if (name[1] == '-') return false;
        *val = a + n; /* -Shost */
        return true;
    }
    if (*i + 1 >= argc) {
        *missing = true;
        return true;
    }
    *val = argv[++*i];
    return true;
}

static int push(const char **arr, int *n, const char *v, const char *opt)
{
    if (*n == CLI_MAX_SSH) return ssh_usage("too many %s options", opt);
    arr[(*n)++] = v;
    return 1;
}

int parse_ssh_option(int argc, char **argv, int *i, struct run_options *o)
{
    const char *a = argv[*i], *v = NULL;
    bool missing = false;
    if (!strcmp(a, "--cleanup")) {
        o->cleanup = true;
        return 1;
    }
    if (!strcmp(a, "-M") || !strcmp(a, "--controlmaster")) return 1; /* always on here */
    if (!strcmp(a, "--transfer")) return push(o->transfer, &o->ntransfer, "{}", a);
    if (opt_value(argc, argv, i, "-S", &v, &missing) ||
        opt_value(argc, argv, i, "--sshlogin", &v, &missing)) {
        if (missing) return ssh_usage("%s needs [N/][SSHCMD ]HOST", a);
        return push(o->sshlogin, &o->nsshlogin, v, "-S");
    }
    if (opt_value(argc, argv, i, "--sshloginfile", &v, &missing) ||
        opt_value(argc, argv, i, "--slf", &v, &missing)) {
        if (missing) return ssh_usage("%s needs a FILE", a);
        return push(o->sshloginfile, &o->nsshloginfile, v, "--sshloginfile");
    }
    if (opt_value(argc, argv, i, "--ssh", &v, &missing)) {
        if (missing || !*v) return ssh_usage("%s needs a command", a);
        o->ssh_cmd = v;
        return 1;
    }
    if (opt_value(argc, argv, i, "--transferfile", &v, &missing) ||
        opt_value(argc, argv, i, "--tf", &v, &missing)) {
        if (missing) return ssh_usage("%s needs a FILE", a);
        return push(o->transfer, &o->ntransfer, v, "--transferfile");
    }
    if (opt_value(argc, argv, i, "--return", &v, &missing)) {
        if (missing) return ssh_usage("%s needs a FILE", a);
        return push(o->ret, &o->nret, v, "--return");
    }
    if (opt_value(argc, argv, i, "--trc", &v, &missing)) {
        if (missing) return ssh_usage("%s needs a FILE", a);
        o->cleanup = true;
        int r = push(o->transfer, &o->ntransfer, "{}", "--transferfile");
        return r == 1 ? push(o->ret, &o->nret, v, "--return") : r;
    }
    return 0;
}

/* ----- logins ------------------------------------------------------------------------------- */

/* Splits s at blanks into a new NULL-ended array of new strings (*n words). */
static char **split_words(const char *s, int *n)
{
    int cap = 8, k = 0;
    char **w = malloc((size_t)cap * sizeof *w);
    if (!w) return NULL;
    for (const char *p = s;;) {
        while (*p == ' ' || *p == '\t') p++;
        if (!*p) break;
        const char *e = p;
        while (*e && *e != ' ' && *e != '\t') e++;
        if (k + 2 > cap) {
            char **nw = realloc(w, (size_t)(cap *= 2) * sizeof *w);
            if (!nw) goto oom;
            w = nw;
        }
        if (!(w[k] = strndup(p, (size_t)(e - p)))) goto oom;
        k++;
        p = e;
    }
    w[k] = NULL;
    *n = k;
    return w;
oom:
    while (k > 0) free(w[--k]);
    free(w);
    return NULL;
}

static void free_words(char **w)
{
    if (!w) return;
    for (char **p = w; *p; p++) free(*p);
    free(w);
}

/* Adds one sshlogin, "[N/][SSHCMD ]HOST", to r->hosts. 0, or -1 after saying why. */
static int add_login(struct runner *r, const char *spec, int default_slots)
{
    while (*spec == ' ' || *spec == '\t') spec++;
    size_t len = strlen(spec);
    while (len && (spec[len - 1] == ' ' || spec[len - 1] == '\t' || spec[len - 1] == '\r')) len--;
    if (len == 0) return 0;
    char *login = strndup(spec, len);
    if (!login) return -1;
    int slots = 0;
    char *rest = login;
    char *slash = strchr(login, '/');
    if (slash && slash > login && strspn(login, "0123456789") == (size_t)(slash - login)) {
        slots = atoi(login);
        rest = slash + 1;
        if (slots < 1) {
            fprintf(stderr, "casyncio: bad sshlogin '%s': 0 slots\n", login);
            free(login);
            return -1;
        }
    }
    struct host *nh = realloc(r->hosts, (size_t)(r->nhosts + 1) * sizeof *nh);
    if (!nh) {
        free(login);
        return -1;
    }
    r->hosts = nh;
    struct host *h = &r->hosts[r->nhosts];
    memset(h, 0, sizeof *h);
    int nw = 0;
    char **words = split_words(rest, &nw);
    if (!words || nw == 0) {
        fprintf(stderr, "casyncio: bad sshlogin '%s'\n", login);
        free_words(words);
        free(login);
        return -1;
    }
    h->name = words[nw - 1];
    words[nw - 1] = NULL;
    if (nw > 1) {
        /* "SSHCMD HOST": this login's own ssh command. */
        h->ssh = words;
        h->nssh = nw - 1;
    } else {
        free(words);
        h->ssh = split_words(r->o->ssh_cmd ? r->o->ssh_cmd : "ssh", &h->nssh);
        if (!h->ssh || h->nssh == 0) {
            fprintf(stderr, "casyncio: bad --ssh '%s'\n", r->o->ssh_cmd ? r->o->ssh_cmd : "");
            free_words(h->ssh);
            free(h->name);
            free(login);
            return -1;
        }
    }
    h->local = strcmp(h->name, ":") == 0;
    h->slots = slots ? slots : h->local ? default_slots : 0;
    h->login = strdup(rest);
    free(login);
    if (!h->login) {
        free_words(h->ssh);
        free(h->name);
        return -1;
    }
    r->nhosts++;
    return 0;
}

static int add_logins(struct runner *r, const char *list, int default_slots)
{
    char *copy = strdup(list);
    if (!copy) return -1;
    int e = 0;
    char *save = NULL;
    for (char *p = strtok_r(copy, ",", &save); p && !e; p = strtok_r(NULL, ",", &save))
        e = add_login(r, p, default_slots);
    free(copy);
    return e;
}

static int read_login_file(struct runner *r, const char *file, int default_slots)
{
    char path[4096];
    if (strcmp(file, "..") == 0) {
        const char *home = getenv("HOME");
        snprintf(path, sizeof path, "%s/.parallel/sshloginfile", home ? home : "");
        file = path;
    }
    FILE *f = strcmp(file, "-") == 0 ? stdin : fopen(file, "re");
    if (!f) {
        fprintf(stderr, "casyncio: --sshloginfile %s: %s\n", file, strerror(errno));
        return -1;
    }
    char *line = NULL;
    size_t cap = 0;
    int e = 0;
    while (!e && getline(&line, &cap, f) >= 0) {
        line[strcspn(line, "\n")] = 0;
        const char *p = line + strspn(line, " \t");
        if (*p == '#' || !*p) continue;
        e = add_logins(r, p, default_slots);
    }
    free(line);
    if (f != stdin) fclose(f);
    return e;
}

/* ----- spawning helpers ----------------------------------------------------------------------- */


/* The ssh command line for host h with extra options and (optionally) a remote command:
 * SSH... -o ControlPath=P [extra...] HOST [cmd]. NULL-ended, in a struct buf of pointers. */
static const char **ssh_argv(const struct host *h, const char *const *extra, const char *cmd)
{
    int n = 0;
    while (extra && extra[n]) n++;
    const char **v = malloc((size_t)(h->nssh + n + 6) * sizeof *v);
    if (!v) return NULL;
    int k = 0;
    for (int i = 0; i < h->nssh; i++) v[k++] = h->ssh[i];
    v[k++] = "-o";
    v[k++] = h->ctl_path;
    for (int i = 0; i < n; i++) v[k++] = extra[i];
    v[k++] = h->name;
    if (cmd) v[k++] = cmd;
    v[k] = NULL;
    return v;
}

static pid_t spawn(const char *const *argv, int out_fd, bool quiet)
{
    posix_spawn_file_actions_t fa;
    posix_spawn_file_actions_init(&fa);
    posix_spawn_file_actions_addopen(&fa, 0, "/dev/null", O_RDONLY, 0);
    if (out_fd >= 0) posix_spawn_file_actions_adddup2(&fa, out_fd, 1);
    else posix_spawn_file_actions_addopen(&fa, 1, "/dev/null", O_WRONLY, 0);
    if (quiet) posix_spawn_file_actions_addopen(&fa, 2, "/dev/null", O_WRONLY, 0);
    pid_t pid;
    int e = posix_spawnp(&pid, argv[0], &fa, NULL, (char *const *)argv, environ);
    posix_spawn_file_actions_destroy(&fa);
    if (e) {
        fprintf(stderr, "casyncio: cannot run %s: %s\n", argv[0], strerror(e));
        return -1;
    }
    return pid;
}

static double mono(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec / 1e9;
}

/* ----- setup and teardown --------------------------------------------------------------------- */

struct probe {
    pid_t pid;
    int fd;
    char out[64];
    size_t len;
};

/* Starts each remote host's ControlMaster (ControlPersist: it stays in the background once
 * the first session ends) with, as that first session, `nproc` when the host's slot count is
 * to be learned. All hosts at once; each that fails is dropped with a warning. */
static int start_masters(struct runner *r)
{
    struct probe *pr = calloc((size_t)r->nhosts, sizeof *pr);
    if (!pr) return -1;
    static const char *const master_opts[] = {"-o", "ControlMaster=yes", "-o",
                                              "ControlPersist=yes", NULL};
    for (int i = 0; i < r->nhosts; i++) {
        struct host *h = &r->hosts[i];
        pr[i].pid = -1;
        pr[i].fd = -1;
        if (h->local) continue;
        int p[2];
        if (pipe2(p, O_CLOEXEC) != 0) continue;
        const char **argv = ssh_argv(h, master_opts,
                                     h->slots ? "true"
                                              : "nproc 2>/dev/null || getconf "
                                                "_NPROCESSORS_ONLN");
        pr[i].pid = argv ? spawn(argv, p[1], false) : -1;
        free(argv);
        close(p[1]);
        if (pr[i].pid < 0) close(p[0]);
        else pr[i].fd = p[0];
    }
    double deadline = mono() + CONNECT_TIMEOUT;
    for (;;) {
        struct pollfd fds[64];
        int idx[64], n = 0;
        for (int i = 0; i < r->nhosts && n < 64; i++)
            if (pr[i].fd >= 0) {
                fds[n] = (struct pollfd){.fd = pr[i].fd, .events = POLLIN};
                idx[n++] = i;
            }
        if (n == 0) break;
        int left = (int)((deadline - mono()) * 1000);
        if (left <= 0) break;
        int k = poll(fds, (nfds_t)n, left);
        if (k < 0 && errno == EINTR) continue;
        if (k <= 0) break;
        for (int m = 0; m < n; m++) {
            if (!fds[m].revents) continue;
            struct probe *q = &pr[idx[m]];
            char tmp[256];
            ssize_t got = read(q->fd, tmp, sizeof tmp);
            if (got > 0) {
                size_t take = (size_t)got;
                if (take > sizeof q->out - 1 - q->len) take = sizeof q->out - 1 - q->len;
                memcpy(q->out + q->len, tmp, take);
                q->len += take;
            } else if (got == 0 || errno != EINTR) {
                close(q->fd);
                q->fd = -1;
            }
        }
    }
    int kept = 0;
    for (int i = 0; i < r->nhosts; i++) {
        struct host *h = &r->hosts[i];
        bool ok = h->local;
        if (pr[i].fd >= 0) {
            /* Still logging in after CONNECT_TIMEOUT seconds. */
            kill(pr[i].pid, SIGTERM);
            close(pr[i].fd);
        }
        if (pr[i].pid > 0) {
            int st;
            while (waitpid(pr[i].pid, &st, 0) < 0 && errno == EINTR) {}
            ok = WIFEXITED(st) && WEXITSTATUS(st) == 0;
            h->master = true; /* it may run even if the probe failed: always ask it to exit */
            if (ok && !h->slots) {
                pr[i].out[pr[i].len] = 0;
                h->slots = atoi(pr[i].out);
                if (h->slots < 1) h->slots = 1;
            }
            if (!ok)
                fprintf(stderr, "casyncio: ssh to %s failed (%s %d): no jobs there\n", h->login,
                        WIFEXITED(st) ? "exit" : "signal",
                        WIFEXITED(st) ? WEXITSTATUS(st) : WTERMSIG(st));
        }
        if (!ok) h->slots = 0;
        kept += ok;
    }
    free(pr);
    if (!kept) {
        fprintf(stderr, "casyncio: no usable host (-S)\n");
        return -1;
    }
    return 0;
}

static bool have_rsync(void)
{
    const char *path = getenv("PATH");
    char *copy = strdup(path && *path ? path : "/bin:/usr/bin");
    bool found = false;
    char *save = NULL;
    for (char *d = copy ? strtok_r(copy, ":", &save) : NULL; d && !found;
         d = strtok_r(NULL, ":", &save)) {
        char p[4096];
        snprintf(p, sizeof p, "%s/rsync", d);
        found = access(p, X_OK) == 0;
    }
    free(copy);
    return found;
}

int ssh_setup(struct runner *r)
{
    const struct run_options *o = r->o;
    /* Slots where no N/ says: -j when given (per host, as in GNU parallel), else the host's
     * CPU count (asked over ssh; this machine's for ':'). */
    int given = o->jobs != default_jobs() ? o->jobs : 0;
    for (int i = 0; i < o->nsshlogin; i++)
        if (add_logins(r, o->sshlogin[i], given ? given : default_jobs()) < 0) return -1;
    for (int i = 0; i < o->nsshloginfile; i++)
        if (read_login_file(r, o->sshloginfile[i], given ? given : default_jobs()) < 0)
            return -1;
    if (r->nhosts == 0) {
        fprintf(stderr, "casyncio: -S/--sshloginfile named no host\n");
        return -1;
    }
    if ((o->ntransfer || o->nret) && !have_rsync()) {
        fprintf(stderr, "casyncio: --transferfile/--return need rsync (here and on the hosts)\n");
        return -1;
    }
    const char *tmp = getenv("TMPDIR");
    char path[200];
    snprintf(path, sizeof path, "%s/casyncio-ssh-XXXXXX", tmp && *tmp ? tmp : "/tmp");
    if (!mkdtemp(path)) {
        fprintf(stderr, "casyncio: making a directory for ssh's sockets: %s\n",
                strerror(errno));
        return -1;
    }
    if (!(r->ctl_dir = strdup(path))) return -1;
    bool remote = false;
    for (int i = 0; i < r->nhosts; i++) {
        struct host *h = &r->hosts[i];
        if (given && !h->slots && !h->local) h->slots = given;
        if (h->local) continue;
        remote = true;
        /* A short name of our own: a socket path must fit in 108 bytes. */
        char cp[256];
        snprintf(cp, sizeof cp, "ControlPath=%s/%d", r->ctl_dir, i);
        if (!(h->ctl_path = strdup(cp))) return -1;
    }
    if (remote && start_masters(r) < 0) return -1;
    r->jobs = 0;
    for (int i = 0; i < r->nhosts; i++) r->jobs += r->hosts[i].slots;
    return 0;
}

void ssh_teardown(struct runner *r)
{
    static const char *const exit_opts[] = {"-O", "exit", NULL};
    pid_t pids[256];
    int n = 0;
    for (int i = 0; i < r->nhosts; i++) {
        struct host *h = &r->hosts[i];
        if (h->master && n < 256) {
            const char **argv = ssh_argv(h, exit_opts, NULL);
            pid_t p = argv ? spawn(argv, -1, true) : -1;
            free(argv);
            if (p > 0) pids[n++] = p;
        }
    }
    for (int i = 0; i < n; i++) {
        int st;
        while (waitpid(pids[i], &st, 0) < 0 && errno == EINTR) {}
    }
    for (int i = 0; i < r->nhosts; i++) {
        struct host *h = &r->hosts[i];
        if (h->ctl_path) unlink(strchr(h->ctl_path, '=') + 1); /* if the master left it */
        free(h->ctl_path);
        free(h->login);
        free(h->name);
        free_words(h->ssh);
    }
    free(r->hosts);
    r->hosts = NULL;
    r->nhosts = 0;
    if (r->ctl_dir) rmdir(r->ctl_dir);
    free(r->ctl_dir);
    r->ctl_dir = NULL;
}

struct host *ssh_pick_host(struct runner *r)
{
    struct host *best = NULL;
    for (int i = 0; i < r->nhosts; i++) {
        struct host *h = &r->hosts[i];
        if (h->slots == 0 || h->nrunning >= h->slots) continue;
        /* The lowest share of its slots in use; ties go to the first listed. */
        if (!best || (long)h->nrunning * best->slots < (long)best->nrunning * h->slots) best = h;
    }
    if (!best) {
        /* Every slot busy (a retry racing a finish): the least loaded then. */
        for (int i = 0; i < r->nhosts; i++)
            if (r->hosts[i].slots && (!best || r->hosts[i].nrunning < best->nrunning))
                best = &r->hosts[i];
    }
    return best;
}

/* ----- the remote command ----------------------------------------------------------------- */

/* Expands replacement strings ({} {.}...) in a --transferfile/--return name for job j. */
static char *expand(struct runner *r, struct job *j, const char *tmpl)
{
    struct run_options fake = *r->o;
    char *tok = (char *)tmpl;
    fake.cmd = &tok;
    fake.ncmd = 1;
    fake.shell = false;
    struct cmd_template t;
    cmd_template_init(&t, &fake);
    struct job_vars v = {.input = j->input, .seq = j->seq, .slot = j->slot};
    char **argv = cmd_build_argv(&t, &v);
    char *s = argv && argv[0] ? strdup(argv[0]) : NULL;
    free(argv);
    return s;
}

/* What the remote shell runs: a small POSIX sh wrapper, then argv with every word quoted,
 * so that exactly argv runs there. The wrapper ties the job to the connection: the local ssh
 * keeps a pipe as its stdin (never written), which the wrapper moves to fd 3 for a background
 * subshell reading it (an asynchronous list's own stdin would be /dev/null); when ssh goes
 * away (the job was signalled, timed out, or the runner interrupted) the channel closes, the
 * read sees the end of file and the subshell SIGTERMs the session's whole process group,
 * which sshd made for this session alone. Once the job ends the watcher is dismissed (it
 * uses the shell's own `read`, so nothing of it is left holding the channel). The job gets
 * /dev/null as stdin, as local jobs do, and not fd 3. */
#define REMOTE_WRAPPER                                                                       \
    "exec 3<&0 </dev/null; (while read -r _ <&3; do :; done; kill -TERM 0) & exec 3<&-; "    \
    "\"$@\"; r=$?; kill $! 2>/dev/null; exit $r"

static bool quoted_command(struct buf *b, char **argv)
{
    bool ok = buf_adds(b, "exec sh -c ") && shell_quote(b, REMOTE_WRAPPER) && buf_adds(b, " sh");
    for (char **p = argv; *p && ok; p++) ok = buf_addc(b, ' ') && shell_quote(b, *p);
    return ok;
}

/* The ssh words with the ControlPath, as one string for rsync -e (quoted for it and for sh). */
static bool rsync_e(struct buf *b, const struct host *h)
{
    struct buf e = {0};
    bool ok = true;
    for (int i = 0; i < h->nssh && ok; i++) ok = (i == 0 || buf_addc(&e, ' ')) &&
                                                   shell_quote(&e, h->ssh[i]);
    ok = ok && buf_adds(&e, " -o ") && shell_quote(&e, h->ctl_path) && buf_addc(&e, 0);
    ok = ok && buf_adds(b, "-e ") && shell_quote(b, e.p);
    buf_free(&e);
    return ok;
}

/* The local script of a send-run-fetch job: rsync the files there, run, rsync the results
 * back, remove both there; its exit status is the job's (255 when a transfer failed). */
static bool transfer_script(struct buf *s, struct runner *r, struct job *j, struct host *h,
                            const char *remote_cmd)
{
    const struct run_options *o = r->o;
    char *tf[CLI_MAX_SSH] = {0}, *rf[CLI_MAX_SSH] = {0};
    bool ok = true;
    for (int i = 0; i < o->ntransfer && ok; i++) ok = (tf[i] = expand(r, j, o->transfer[i]));
    for (int i = 0; i < o->nret && ok; i++) ok = (rf[i] = expand(r, j, o->ret[i]));
    struct buf hq = {0}, sq = {0};
    ok = ok && shell_quote(&hq, h->name) && buf_addc(&hq, 0);
    for (int i = 0; i < h->nssh && ok; i++) ok = buf_addc(&sq, ' ') && shell_quote(&sq, h->ssh[i]);
    ok = ok && buf_adds(&sq, " -o ") && shell_quote(&sq, h->ctl_path) && buf_addc(&sq, 0);
    if (ok && o->ntransfer) {
        ok = buf_adds(s, "rsync -R ") && rsync_e(s, h) && buf_adds(s, " --");
        for (int i = 0; i < o->ntransfer && ok; i++)
            ok = buf_addc(s, ' ') && shell_quote(s, tf[i]);
        ok = ok && buf_addc(s, ' ') && buf_adds(s, hq.p) && buf_adds(s, ": || exit 255\n");
    }
    ok = ok && buf_adds(s, sq.p + 1) && buf_addc(s, ' ') && buf_adds(s, hq.p) &&
         buf_addc(s, ' ') && shell_quote(s, remote_cmd) && buf_adds(s, "\nrc=$?\n");
    for (int i = 0; i < o->nret && ok; i++) {
        struct buf src = {0};
        ok = buf_adds(&src, h->name) && buf_addc(&src, ':') && buf_adds(&src, rf[i]) &&
             buf_addc(&src, 0);
        ok = ok && buf_adds(s, "rsync -R ") && rsync_e(s, h) && buf_adds(s, " -- ") &&
             shell_quote(s, src.p) && buf_adds(s, " . || rc=255\n");
        buf_free(&src);
    }
    if (ok && o->cleanup && (o->ntransfer || o->nret)) {
        struct buf rm = {0};
        ok = buf_adds(&rm, "rm -f --");
        for (int i = 0; i < o->ntransfer && ok; i++) ok = buf_addc(&rm, ' ') && shell_quote(&rm, tf[i]);
        for (int i = 0; i < o->nret && ok; i++) ok = buf_addc(&rm, ' ') && shell_quote(&rm, rf[i]);
        ok = ok && buf_addc(&rm, 0);
        ok = ok && buf_adds(s, sq.p + 1) && buf_addc(s, ' ') && buf_adds(s, hq.p) &&
             buf_addc(s, ' ') && shell_quote(s, rm.p) && buf_addc(s, '\n');
        buf_free(&rm);
    }
    ok = ok && buf_adds(s, "exit $rc\n") && buf_addc(s, 0);
    for (int i = 0; i < CLI_MAX_SSH; i++) {
        free(tf[i]);
        free(rf[i]);
    }
    buf_free(&hq);
    buf_free(&sq);
    return ok;
}

/* Packs words into one allocation: the pointer array followed by the strings. */
static char **pack(const char *const *w, int n)
{
    size_t bytes = (size_t)(n + 1) * sizeof(char *);
    for (int i = 0; i < n; i++) bytes += strlen(w[i]) + 1;
    char **v = malloc(bytes);
    if (!v) return NULL;
    char *area = (char *)(v + n + 1);
    for (int i = 0; i < n; i++) {
        size_t l = strlen(w[i]) + 1;
        memcpy(area, w[i], l);
        v[i] = area;
        area += l;
    }
    v[n] = NULL;
    return v;
}

char **ssh_wrap_argv(struct runner *r, struct job *j, char **argv)
{
    struct host *h = j->host;
    struct buf cmd = {0};
    char **out = NULL;
    if (!quoted_command(&cmd, argv) || !buf_addc(&cmd, 0)) goto done;
    if (r->o->ntransfer || r->o->nret) {
        struct buf script = {0};
        if (transfer_script(&script, r, j, h, cmd.p)) {
            const char *w[] = {"/bin/sh", "-c", script.p};
            out = pack(w, 3);
        }
        buf_free(&script);
        goto done;
    }
    const char **v = ssh_argv(h, NULL, cmd.p);
    if (v) {
        int n = 0;
        while (v[n]) n++;
        out = pack(v, n);
        free(v);
    }
done:
    buf_free(&cmd);
    return out;
}
