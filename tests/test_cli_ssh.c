/*
 * End-to-end tests of `casyncio run -S` (issue 15, item 3) against a REAL sshd: each test
 * starts Debian's openssh-server itself, as an unprivileged-style private instance (its own
 * config, host key and authorized key made in a temporary directory, listening on 127.0.0.1
 * and 127.0.0.2 at a free high port, never a system service) and stops it at the end; the
 * sshd is killed with the test's process whatever happens (PR_SET_PDEATHSIG). The client side
 * gets an ssh_config of its own through --ssh "ssh -F FILE". Tests are skipped, with the
 * reason, when openssh-server is not installed or sshd cannot start here
 * (CI installs it: apt-get install openssh-server openssh-client rsync).
 */
#include "cli_run.h"

#include <arpa/inet.h>
#include <dirent.h>
#include <netinet/in.h>
#include <pwd.h>
#include <sched.h>
#include <sys/socket.h>

#define SSHD "/usr/sbin/sshd"

struct sshd {
    pid_t pid;
    int port;
    char dir[128];
    char conf[192];   /* the client's ssh_config */
    char ssh[256];    /* the --ssh value */
};

static void sleep_s(double s)
{
    struct timespec ts = {(time_t)s, (long)((s - (double)(time_t)s) * 1e9)};
    nanosleep(&ts, NULL);
}

static int sh(const char *fmt, const char *a, const char *b)
{
    char cmd[1024];
    snprintf(cmd, sizeof cmd, fmt, a, b);
    int st = system(cmd);
    return WIFEXITED(st) ? WEXITSTATUS(st) : 128;
}

static int free_port(void)
{
    int s = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    CHECK(s >= 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    CHECK_OK(bind(s, (struct sockaddr *)&a, sizeof a));
    socklen_t len = sizeof a;
    CHECK_OK(getsockname(s, (struct sockaddr *)&a, &len));
    close(s);
    return ntohs(a.sin_port);
}

static bool port_open(const char *ip, int port)
{
    int s = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (s < 0) return false;
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    inet_pton(AF_INET, ip, &a.sin_addr);
    bool ok = connect(s, (struct sockaddr *)&a, sizeof a) == 0;
    close(s);
    return ok;
}

static void write_text(const char *path, const char *text)
{
    FILE *f = fopen(path, "we");
    CHECK(f != NULL);
    fputs(text, f);
    CHECK(fclose(f) == 0);
}

/* Starts the private sshd, or skips the test saying why. SHLVL=1 in the sessions' environment
 * keeps a login bash from sourcing ~/.bashrc for each (Debian's bash does so when started by
 * sshd): an account's heavy .bashrc (pyenv, conda) would otherwise cost each job a second. */
static void sshd_start(struct sshd *d)
{
    if (access(SSHD, X_OK) != 0 || system("command -v ssh ssh-keygen >/dev/null 2>&1") != 0)
        SKIP("openssh-server/openssh-client not installed "
             "(apt-get install -y openssh-server openssh-client rsync)");
    snprintf(d->dir, sizeof d->dir, "/tmp/ca_test_sshd_%d_XXXXXX", (int)getpid());
    CHECK(mkdtemp(d->dir) != NULL);
    /* Privilege separation wants this directory when sshd runs as root. */
    if (geteuid() == 0) mkdir("/run/sshd", 0755);
    if (sh("ssh-keygen -q -t ed25519 -N '' -f %s/host_key && ssh-keygen -q -t ed25519 -N '' "
           "-f %s/user_key",
           d->dir, d->dir) != 0 ||
        sh("cp %s/user_key.pub %s/authorized_keys", d->dir, d->dir) != 0)
        t_fail(__FILE__, __LINE__, "ssh-keygen failed");
    snprintf(d->conf, sizeof d->conf, "%s/ssh_config", d->dir);
    snprintf(d->ssh, sizeof d->ssh, "ssh -F %s", d->conf);
    char text[2048], path[256], log[256];
    snprintf(log, sizeof log, "%s/sshd.log", d->dir);
    for (int attempt = 0; attempt < 5; attempt++) {
        d->port = free_port();
        snprintf(text, sizeof text,
                 "Port %d\nListenAddress 127.0.0.1\nListenAddress 127.0.0.2\n"
                 "HostKey %s/host_key\nAuthorizedKeysFile %s/authorized_keys\n"
                 "PidFile %s/sshd.pid\nStrictModes no\nUsePAM no\nPasswordAuthentication no\n"
                 "KbdInteractiveAuthentication no\nPermitRootLogin prohibit-password\n"
                 "MaxStartups 100\nMaxSessions 100\nLogLevel INFO\nSetEnv SHLVL=1\n",
                 d->port, d->dir, d->dir, d->dir);
        snprintf(path, sizeof path, "%s/sshd_config", d->dir);
        write_text(path, text);
        snprintf(text, sizeof text,
                 "Host *\n  Port %d\n  IdentityFile %s/user_key\n  IdentitiesOnly yes\n"
                 "  UserKnownHostsFile /dev/null\n  StrictHostKeyChecking no\n"
                 "  LogLevel ERROR\n  BatchMode yes\n",
                 d->port, d->dir);
        write_text(d->conf, text);
        d->pid = fork();
        CHECK(d->pid >= 0);
        if (d->pid == 0) {
            /* Dies with the test, even when a CHECK ends it early. */
            prctl(PR_SET_PDEATHSIG, SIGKILL);
            int fd = open(log, O_WRONLY | O_CREAT | O_TRUNC, 0600);
            if (fd >= 0) dup2(fd, 2);
            execl(SSHD, SSHD, "-D", "-e", "-f", path, (char *)NULL);
            _exit(127);
        }
        double end = now_s() + 5 * t_slow();
        while (now_s() < end) {
            int st;
            if (waitpid(d->pid, &st, WNOHANG) == d->pid) {
                d->pid = -1;
                break;
            }
            if (port_open("127.0.0.1", d->port) && port_open("127.0.0.2", d->port)) return;
            sleep_s(0.02);
        }
        if (d->pid > 0) {
            kill(d->pid, SIGKILL);
            waitpid(d->pid, NULL, 0);
        }
    }
    static char why[600];
    char *l = read_file(log);
    snprintf(why, sizeof why, "sshd does not start here: %.500s", l ? l : "(no log)");
    free(l);
    SKIP(why);
}

static char *sshd_log(struct sshd *d)
{
    char log[256];
    snprintf(log, sizeof log, "%s/sshd.log", d->dir);
    char *l = read_file(log);
    CHECK(l != NULL);
    return l;
}

static int count_of(const char *hay, const char *needle)
{
    int n = 0;
    for (const char *p = strstr(hay, needle); p; p = strstr(p + 1, needle)) n++;
    return n;
}

static void sshd_stop(struct sshd *d)
{
    kill(d->pid, SIGTERM);
    waitpid(d->pid, NULL, 0);
    /* Sessions still closing were sshd's children: they are reparented to us (a subreaper). */
    check_no_orphans();
    sh("rm -rf %s%s", d->dir, "");
}

/* The runner's temporary files (ControlMaster sockets) go to our directory, to be checked. */
static void use_tmpdir(struct sshd *d)
{
    setenv("TMPDIR", d->dir, 1);
}

static bool tmpdir_has_ssh_dirs(struct sshd *d)
{
    DIR *dir = opendir(d->dir);
    CHECK(dir != NULL);
    bool found = false;
    struct dirent *e;
    while ((e = readdir(dir)) != NULL)
        if (strncmp(e->d_name, "casyncio-ssh-", 13) == 0) found = true;
    closedir(dir);
    return found;
}

TEST(ssh_jobs_spread_over_two_hosts_and_the_joblog_names_them) /* timeout: 120 */
{
    CHECK_OK(prctl(PR_SET_CHILD_SUBREAPER, 1));
    struct sshd d;
    sshd_start(&d);
    use_tmpdir(&d);
    char log[256];
    snprintf(log, sizeof log, "%s/joblog", d.dir);
    /* Each job prints its input and the address it was served on (sshd's side). */
    struct res r;
    run_in_for(&r, NULL,
               (const char *const[]){"run", "--ssh", d.ssh, "-S", "2/127.0.0.1,2/127.0.0.2",
                                     "--joblog", log, "-k", "sh", "-c",
                                     "set -- $SSH_CONNECTION; echo $0 $3", ":::", "1", "2",
                                     "3", "4", "5", "6", "7", "8", NULL},
               90);
    CHECK_EQ(r.status, 0);
    CHECK_EQ(count_lines(r.out), 8);
    int on1 = count_of(r.out, " 127.0.0.1\n"), on2 = count_of(r.out, " 127.0.0.2\n");
    CHECK_EQ(on1 + on2, 8);
    CHECK(on1 >= 1 && on2 >= 1);
    /* The joblog's Host column says where each job ran. */
    char *l = read_file(log);
    CHECK(l != NULL);
    int rows = 0;
    for (char *line = strchr(l, '\n'); line && line[1]; line = strchr(line + 1, '\n')) {
        unsigned long seq = strtoul(line + 1, NULL, 10);
        char host[32] = "";
        sscanf(strchr(line + 1, '\t') + 1, "%31[^\t]", host);
        char want[64];
        snprintf(want, sizeof want, "%lu %s\n", seq, host);
        CHECK_HAS(r.out, want);
        rows++;
    }
    CHECK_EQ(rows, 8);
    free(l);
    /* One login per host: every job went over its host's ControlMaster. */
    char *s = sshd_log(&d);
    CHECK_EQ(count_of(s, "Accepted publickey"), 2);
    free(s);
    CHECK(!tmpdir_has_ssh_dirs(&d)); /* the masters were stopped, their directory removed */
    res_free(&r);
    sshd_stop(&d);
}

TEST(ssh_quotes_inputs_for_the_remote_shell) /* timeout: 120 */
{
    CHECK_OK(prctl(PR_SET_CHILD_SUBREAPER, 1));
    struct sshd d;
    sshd_start(&d);
    struct res r;
    run_in_for(&r, NULL,
               (const char *const[]){"run", "--ssh", d.ssh, "-S", "127.0.0.1", "-k", "printf",
                                     "[%s]\\n", ":::", "a b", "it's", "$HOME", "x;y",
                                     "\"q\"", "back\\slash", "*", "`id`", "", NULL},
               90);
    CHECK_EQ(r.status, 0);
    CHECK_HAS(r.out, "[a b]\n[it's]\n[$HOME]\n[x;y]\n[\"q\"]\n[back\\slash]\n[*]\n[`id`]\n");
    res_free(&r);
    /* Without COMMAND each input is a shell line, run by the remote shell as it is. */
    run_in_for(&r, "echo remote-$((1+2)) \"two  spaces\"\n",
               (const char *const[]){"run", "--ssh", d.ssh, "-S", "127.0.0.1", NULL}, 90);
    CHECK_EQ(r.status, 0);
    CHECK_STR(r.out, "remote-3 two  spaces\n");
    res_free(&r);
    /* A remote failure is the job's failure, with its exit status. */
    run_in_for(&r, NULL,
               (const char *const[]){"run", "--ssh", d.ssh, "-S", "127.0.0.1", "sh", "-c",
                                     "exit $0", ":::", "0", "3", NULL},
               90);
    CHECK_EQ(r.status, 1);
    res_free(&r);
    sshd_stop(&d);
}

static int cpus(void)
{
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof set, &set) == 0) return CPU_COUNT(&set);
    return (int)sysconf(_SC_NPROCESSORS_ONLN);
}

TEST(ssh_slots_local_host_and_unreachable_hosts) /* timeout: 120 */
{
    CHECK_OK(prctl(PR_SET_CHILD_SUBREAPER, 1));
    struct sshd d;
    sshd_start(&d);
    char log[256], bad[512], want[64];
    snprintf(log, sizeof log, "%s/joblog", d.dir);
    /* No N/ and no -j: the host's CPU count, asked over ssh (the same machine here). */
    struct res r;
    run_in_for(&r, NULL,
               (const char *const[]){"run", "--summary", "--ssh", d.ssh, "-S", "127.0.0.1",
                                     "true", ":::", "1", NULL},
               90);
    CHECK_EQ(r.status, 0);
    snprintf(want, sizeof want, "(-j %d,", cpus());
    CHECK_HAS(r.err, want);
    res_free(&r);
    /* ':' is this machine; a login's own ssh command; a host that cannot be reached is
     * dropped with a warning and the jobs run on the others. */
    snprintf(bad, sizeof bad, "ssh -F %s -p 1 127.0.0.3", d.conf);
    run_in_for(&r, NULL,
               (const char *const[]){"run", "--ssh", d.ssh, "-S", "1/:", "-S", "1/127.0.0.1",
                                     "-S", bad, "--joblog", log, "--summary", "true", ":::",
                                     "1", "2", "3", "4", "5", "6", NULL},
               90);
    CHECK_EQ(r.status, 0);
    CHECK_HAS(r.err, "ssh to ssh -F");
    CHECK_HAS(r.err, "127.0.0.3 failed");
    CHECK_HAS(r.err, "(-j 2,");
    char *l = read_file(log);
    CHECK(l != NULL);
    CHECK_HAS(l, "\t:\t");
    CHECK_HAS(l, "\t127.0.0.1\t");
    CHECK(strstr(l, "127.0.0.3") == NULL);
    free(l);
    res_free(&r);
    /* --sshloginfile: one login a line, comments and blank lines skipped. */
    char slf[256];
    snprintf(slf, sizeof slf, "%s/logins", d.dir);
    write_text(slf, "# the two addresses of the test's sshd\n1/127.0.0.1\n\n  1/127.0.0.2  \n");
    run_in_for(&r, NULL,
               (const char *const[]){"run", "--ssh", d.ssh, "--sshloginfile", slf, "--joblog",
                                     log, "--summary", "true", ":::", "1", "2", "3", "4", NULL},
               90);
    CHECK_EQ(r.status, 0);
    CHECK_HAS(r.err, "(-j 2,");
    l = read_file(log);
    CHECK(l != NULL);
    CHECK_HAS(l, "\t127.0.0.1\t");
    CHECK_HAS(l, "\t127.0.0.2\t");
    free(l);
    res_free(&r);
    sshd_stop(&d);
}

TEST(ssh_transferfile_return_cleanup) /* timeout: 120 */
{
    CHECK_OK(prctl(PR_SET_CHILD_SUBREAPER, 1));
    if (system("command -v rsync >/dev/null 2>&1") != 0) SKIP("rsync not installed");
    struct sshd d;
    sshd_start(&d);
    /* Relative names: rsync -R puts them under the remote home; the local copies live in our
     * directory (the "remote" is this machine, so absolute names would be the same files). */
    char cwd[PATH_MAX], sub[64], path[512], remote[PATH_MAX + 64];
    CHECK(getcwd(cwd, sizeof cwd) != NULL);
    CHECK_OK(chdir(d.dir));
    snprintf(sub, sizeof sub, "ca_test_trc_%d", (int)getpid());
    CHECK_OK(mkdir(sub, 0700));
    snprintf(path, sizeof path, "%s/one.txt", sub);
    write_text(path, "hello\n");
    snprintf(path, sizeof path, "%s/two words.txt", sub);
    write_text(path, "world\n");
    char in1[128], in2[128];
    snprintf(in1, sizeof in1, "%s/one.txt", sub);
    snprintf(in2, sizeof in2, "%s/two words.txt", sub);
    struct res r;
    run_in_for(&r, NULL,
               (const char *const[]){"run", "--ssh", d.ssh, "-S", "127.0.0.1", "--trc",
                                     "{}.out", "sh", "-c", "tr a-z A-Z < \"$0\" > \"$0.out\"",
                                     ":::", in1, in2, NULL},
               90);
    CHECK_EQ(r.status, 0);
    snprintf(path, sizeof path, "%s.out", in1);
    char *got = read_file(path);
    CHECK(got != NULL);
    CHECK_STR(got, "HELLO\n");
    free(got);
    snprintf(path, sizeof path, "%s.out", in2);
    got = read_file(path);
    CHECK(got != NULL);
    CHECK_STR(got, "WORLD\n");
    free(got);
    /* --cleanup removed the sent and the made files there. */
    struct passwd *pw = getpwuid(geteuid());
    CHECK(pw != NULL);
    snprintf(remote, sizeof remote, "%s/%s", pw->pw_dir, in1);
    CHECK(access(remote, F_OK) != 0);
    snprintf(remote, sizeof remote, "%s/%s.out", pw->pw_dir, in2);
    CHECK(access(remote, F_OK) != 0);
    snprintf(remote, sizeof remote, "%s/%s", pw->pw_dir, sub);
    rmdir(remote);
    res_free(&r);
    CHECK_OK(chdir(cwd));
    sshd_stop(&d);
}

static bool gone(pid_t pid)
{
    char path[64], buf[256];
    snprintf(path, sizeof path, "/proc/%d/stat", (int)pid);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return true;
    ssize_t n = read(fd, buf, sizeof buf - 1);
    close(fd);
    if (n <= 0) return true;
    buf[n] = 0;
    char *p = strrchr(buf, ')');
    return p && (p[2] == 'Z' || p[2] == 'X');
}

TEST(ssh_timeout_and_interrupt_end_the_remote_job) /* timeout: 120 */
{
    CHECK_OK(prctl(PR_SET_CHILD_SUBREAPER, 1));
    struct sshd d;
    sshd_start(&d);
    char pids[256], script[512];
    snprintf(pids, sizeof pids, "%s/remote_pids", d.dir);
    /* The "remote" is this machine: the job's pid tells whether it still runs. */
    snprintf(script, sizeof script, "echo $$ >> %s; exec sleep 60", pids);
    struct res r;
    run_in_for(&r, NULL,
               (const char *const[]){"run", "--ssh", d.ssh, "-S", "127.0.0.1", "--timeout",
                                     "2", "sh", "-c", script, ":::", "a", NULL},
               90);
    CHECK_EQ(r.status, 1);
    res_free(&r);
    int in, out, err;
    double t0 = now_s();
    pid_t pid = start_cli((const char *const[]){"run", "--ssh", d.ssh, "-S", "127.0.0.1", "sh",
                                                "-c", script, ":::", "b", NULL},
                          &in, &out, &err, -1);
    wait_for_lines(pids, 2);
    CHECK_OK(kill(pid, SIGINT));
    finish_cli(pid, in, out, err, NULL, &r, t0, 60);
    CHECK_EQ(r.status, 130);
    res_free(&r);
    char *p = read_file(pids);
    CHECK(p != NULL);
    for (char *s = p; *s;) {
        pid_t job = (pid_t)strtol(s, &s, 10);
        double end = now_s() + 10 * t_slow();
        while (job > 0 && !gone(job)) {
            if (now_s() > end) {
                kill(job, SIGKILL);
                t_fail(__FILE__, __LINE__, "the remote job %d still runs", (int)job);
            }
            sleep_s(0.05);
        }
        while (*s == '\n') s++;
    }
    free(p);
    sshd_stop(&d);
}
