/*
 * Socket operations (ca_loop_sock_*) on every loop kind, and what is particular to the
 * io_uring proactor: level-triggered readers, CQ overflow with a tiny ring, the forced
 * unavailable path.
 */
#include "harness.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <pthread.h>
#include <netinet/in.h>
#include <stdint.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <stddef.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/wait.h>

/* ----- helpers ------------------------------------------------------------------------- */

static void pair(int sv[2])
{
    CHECK_OK(socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0, sv));
}

static int tcp_socket(void)
{
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    CHECK(fd >= 0);
    return fd;
}

/* A socket bound to 127.0.0.1 on a free port; listening if backlog > 0. */
static int tcp_bound(struct sockaddr_in *addr, int backlog)
{
    int fd = tcp_socket();
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    CHECK_OK(bind(fd, (struct sockaddr *)&a, sizeof a));
    if (backlog > 0) CHECK_OK(listen(fd, backlog));
    socklen_t len = sizeof *addr;
    CHECK_OK(getsockname(fd, (struct sockaddr *)addr, &len));
    return fd;
}

static bool fut_done(void *arg) { return ca_future_done(arg); }

/* Runs until fut is done and returns its outcome (result in *res). */
static int await(ca_loop *loop, ca_future *fut, intptr_t *res)
{
    if (!t_run_until(loop, fut_done, fut, 20)) t_fail(__FILE__, __LINE__, "future never done");
    void *v = NULL;
    int r = ca_future_result(fut, &v);
    if (res) *res = (intptr_t)v;
    return r;
}

static bool is_proactor(ca_loop *loop) { return strcmp(ca_loop_kind(loop), "io_uring") == 0; }

static size_t scaled(size_t n, size_t div)
{
    return t_slow() > 1.0 ? (n / div ? n / div : 1) : n;
}

static void raise_fd_limit(void)
{
    struct rlimit rl;
    CHECK_OK(getrlimit(RLIMIT_NOFILE, &rl));
    rl.rlim_cur = rl.rlim_max < 4096 ? rl.rlim_max : 4096;
    CHECK_OK(setrlimit(RLIMIT_NOFILE, &rl));
}

/* ----- echo ----------------------------------------------------------------------------- */

/* An echo server on one connected socket, written as done-callback continuations. */
struct echo_srv {
    ca_loop *loop;
    int fd;
    bool eof;
    size_t echoed;
    char buf[65536];
};

static void srv_recv(struct echo_srv *s);

static void srv_sent(ca_future *f, void *arg)
{
    struct echo_srv *s = arg;
    CHECK_OK(ca_future_result(f, NULL));
    ca_future_unref(f);
    srv_recv(s);
}

static void srv_got(ca_future *f, void *arg)
{
    struct echo_srv *s = arg;
    void *v;
    CHECK_OK(ca_future_result(f, &v));
    ca_future_unref(f);
    intptr_t n = (intptr_t)v;
    if (n == 0) {
        s->eof = true;
        return;
    }
    CHECK(n > 0 && (size_t)n <= sizeof s->buf);
    s->echoed += (size_t)n;
    ca_future *g = NULL;
    CHECK_OK(ca_loop_sock_sendall(s->loop, s->fd, s->buf, (size_t)n, &g));
    CHECK_OK(ca_future_add_done_callback(g, srv_sent, s));
}

static void srv_recv(struct echo_srv *s)
{
    ca_future *g = NULL;
    CHECK_OK(ca_loop_sock_recv(s->loop, s->fd, s->buf, sizeof s->buf, &g));
    CHECK_OK(ca_future_add_done_callback(g, srv_got, s));
}

/* The client's side: send everything, then half-close; read back until the echo is whole. */
struct echo_cli {
    ca_loop *loop;
    int fd;
    const char *out;
    char *in;
    size_t size, got;
    bool sent, eof;
};

static void cli_recv(struct echo_cli *c);

static void cli_got(ca_future *f, void *arg)
{
    struct echo_cli *c = arg;
    void *v;
    CHECK_OK(ca_future_result(f, &v));
    ca_future_unref(f);
    intptr_t n = (intptr_t)v;
    if (n == 0) {
        c->eof = true;
        return;
    }
    c->got += (size_t)n;
    CHECK(c->got <= c->size);
    if (c->got < c->size) cli_recv(c);
}

static void cli_recv(struct echo_cli *c)
{
    ca_future *g = NULL;
    CHECK_OK(ca_loop_sock_recv(c->loop, c->fd, c->in + c->got, c->size - c->got, &g));
    CHECK_OK(ca_future_add_done_callback(g, cli_got, c));
}

static void cli_sent(ca_future *f, void *arg)
{
    struct echo_cli *c = arg;
    CHECK_OK(ca_future_result(f, NULL));
    ca_future_unref(f);
    c->sent = true;
    CHECK_OK(shutdown(c->fd, SHUT_WR));
}

static bool echo_finished(void *arg)
{
    struct echo_cli *c = arg;
    return c->sent && c->got == c->size;
}

static void run_echo(ca_loop *loop, int cfd, int sfd, size_t size, double timeout)
{
    struct echo_srv *s = calloc(1, sizeof *s);
    CHECK(s != NULL);
    s->loop = loop;
    s->fd = sfd;
    char *out = malloc(size), *in = malloc(size);
    CHECK(out && in);
    for (size_t i = 0; i < size; i++) out[i] = (char)(i * 7 + (i >> 9));
    struct echo_cli c = {.loop = loop, .fd = cfd, .out = out, .in = in, .size = size};
    srv_recv(s);
    cli_recv(&c);
    ca_future *f = NULL;
    CHECK_OK(ca_loop_sock_sendall(loop, cfd, out, size, &f));
    CHECK_OK(ca_future_add_done_callback(f, cli_sent, &c));
    CHECK(t_run_until(loop, echo_finished, &c, timeout));
    CHECK(memcmp(in, out, size) == 0);
    /* The server sees the half-close after the last byte. */
    CHECK(t_run_until(loop, t_flag_set, &s->eof, 5));
    CHECK_EQ(s->echoed, size);
    free(out);
    free(in);
    free(s);
}

LOOP_TEST(echo_one_byte_over_tcp)
{
    struct sockaddr_in addr;
    int lfd = tcp_bound(&addr, 16);
    int cfd = tcp_socket();
    ca_future *fc = NULL, *fa = NULL;
    CHECK_OK(ca_loop_sock_accept(loop, lfd, &fa));
    CHECK_OK(ca_loop_sock_connect(loop, cfd, (struct sockaddr *)&addr, sizeof addr, &fc));
    intptr_t sfd = -1;
    CHECK_OK(await(loop, fa, &sfd));
    CHECK_OK(await(loop, fc, NULL));
    CHECK(sfd >= 0);
    /* The accepted socket is ours, non-blocking and close-on-exec. */
    CHECK(fcntl((int)sfd, F_GETFL) & O_NONBLOCK);
    CHECK(fcntl((int)sfd, F_GETFD) & FD_CLOEXEC);
    run_echo(loop, cfd, (int)sfd, 1, 10);
    ca_future_unref(fa);
    ca_future_unref(fc);
    close((int)sfd);
    close(cfd);
    close(lfd);
}

LOOP_TEST(echo_16_mib) /* timeout: 60 */
{
    int sv[2];
    pair(sv);
    run_echo(loop, sv[0], sv[1], scaled((size_t)16 << 20, 16), 40);
    close(sv[0]);
    close(sv[1]);
}

/* ----- accept, connect --------------------------------------------------------------------- */

struct acceptor {
    ca_loop *loop;
    int lfd;
    int target, accepted, connected, failed;
};

static void accept_next(struct acceptor *a);

static void on_accepted(ca_future *f, void *arg)
{
    struct acceptor *a = arg;
    void *v;
    int r = ca_future_result(f, &v);
    ca_future_unref(f);
    if (r < 0) {
        a->failed++;
        return;
    }
    int fd = (int)(intptr_t)v;
    CHECK(fd >= 0);
    close(fd);
    if (++a->accepted < a->target) accept_next(a);
}

static void accept_next(struct acceptor *a)
{
    ca_future *f = NULL;
    CHECK_OK(ca_loop_sock_accept(a->loop, a->lfd, &f));
    CHECK_OK(ca_future_add_done_callback(f, on_accepted, a));
}

static struct acceptor *g_acc;

static void on_connected(ca_future *f, void *arg)
{
    int fd = (int)(intptr_t)arg;
    if (ca_future_result(f, NULL) == 0) g_acc->connected++;
    else g_acc->failed++;
    ca_future_unref(f);
    close(fd);
}

static bool all_accepted(void *arg)
{
    struct acceptor *a = arg;
    return a->failed || (a->accepted == a->target && a->connected == a->target);
}

LOOP_TEST(accept_1000_connections) /* timeout: 60 */
{
    raise_fd_limit();
    struct sockaddr_in addr;
    struct acceptor a = {.loop = loop, .target = (int)scaled(1000, 10)};
    a.lfd = tcp_bound(&addr, 4096);
    g_acc = &a;
    accept_next(&a);
    for (int i = 0; i < a.target; i++) {
        int fd = tcp_socket();
        ca_future *f = NULL;
        CHECK_OK(ca_loop_sock_connect(loop, fd, (struct sockaddr *)&addr, sizeof addr, &f));
        CHECK_OK(ca_future_add_done_callback(f, on_connected, (void *)(intptr_t)fd));
    }
    CHECK(t_run_until(loop, all_accepted, &a, 40));
    CHECK_EQ(a.failed, 0);
    CHECK_EQ(a.accepted, a.target);
    CHECK_EQ(a.connected, a.target);
    close(a.lfd);
}

LOOP_TEST(connect_refused)
{
    /* Bound but not listening: the port is ours, and nobody accepts on it. */
    struct sockaddr_in addr;
    int bound = tcp_bound(&addr, 0);
    int fd = tcp_socket();
    ca_future *f = NULL;
    CHECK_OK(ca_loop_sock_connect(loop, fd, (struct sockaddr *)&addr, sizeof addr, &f));
    CHECK_ERR(await(loop, f, NULL), -ECONNREFUSED);
    ca_future_unref(f);
    close(fd);
    close(bound);
}

LOOP_TEST(connect_unix_and_exchange)
{
    int lfd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    CHECK(lfd >= 0);
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    /* An abstract address: nothing to clean up in the file system. */
    snprintf(addr.sun_path + 1, sizeof addr.sun_path - 1, "casyncio-test-%d", (int)getpid());
    socklen_t len = (socklen_t)(sizeof addr.sun_family + 1 + strlen(addr.sun_path + 1));
    CHECK_OK(bind(lfd, (struct sockaddr *)&addr, len));
    CHECK_OK(listen(lfd, 8));
    int cfd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    ca_future *fa = NULL, *fc = NULL, *fs = NULL, *fr = NULL;
    CHECK_OK(ca_loop_sock_accept(loop, lfd, &fa));
    CHECK_OK(ca_loop_sock_connect(loop, cfd, (struct sockaddr *)&addr, len, &fc));
    intptr_t sfd;
    CHECK_OK(await(loop, fa, &sfd));
    CHECK_OK(await(loop, fc, NULL));
    char buf[8] = {0};
    CHECK_OK(ca_loop_sock_recv(loop, (int)sfd, buf, sizeof buf, &fr));
    CHECK_OK(ca_loop_sock_sendall(loop, cfd, "ping", 4, &fs));
    intptr_t n;
    CHECK_OK(await(loop, fr, &n));
    CHECK_OK(await(loop, fs, NULL));
    CHECK_EQ(n, 4);
    CHECK(memcmp(buf, "ping", 4) == 0);
    ca_future_unref(fa);
    ca_future_unref(fc);
    ca_future_unref(fs);
    ca_future_unref(fr);
    close((int)sfd);
    close(cfd);
    close(lfd);
}

/* ----- recv ------------------------------------------------------------------------------ */

LOOP_TEST(recv_on_peer_that_closes_gives_0)
{
    int sv[2];
    pair(sv);
    char buf[16];
    ca_future *f = NULL;
    CHECK_OK(ca_loop_sock_recv(loop, sv[0], buf, sizeof buf, &f));
    t_run_for(loop, 0.01);
    CHECK(!ca_future_done(f));
    close(sv[1]);
    intptr_t n = -1;
    CHECK_OK(await(loop, f, &n));
    CHECK_EQ(n, 0);
    ca_future_unref(f);
    close(sv[0]);
}

LOOP_TEST(recv_error_fails_the_future)
{
    /* recv on a listening socket: the kernel refuses (ENOTCONN). */
    struct sockaddr_in addr;
    int lfd = tcp_bound(&addr, 4);
    char buf[4];
    ca_future *f = NULL;
    CHECK_OK(ca_loop_sock_recv(loop, lfd, buf, sizeof buf, &f));
    CHECK_ERR(await(loop, f, NULL), -ENOTCONN);
    ca_future_unref(f);
    close(lfd);
}

static bool all_x(const char *b, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (b[i] != 'x') return false;
    return true;
}

LOOP_TEST(cancel_pending_recv_never_writes_buffer)
{
    int sv[2];
    pair(sv);
    char buf[16];
    memset(buf, 'x', sizeof buf);
    ca_future *f = NULL;
    CHECK_OK(ca_loop_sock_recv(loop, sv[0], buf, sizeof buf, &f));
    t_run_for(loop, 0.01); /* the operation is in the kernel (or its reader is armed) */
    CHECK(!ca_future_done(f));
    CHECK(ca_future_cancel(f));
    t_run_for(loop, 0.02); /* the loop withdraws it */
    CHECK_EQ(write(sv[1], "hello", 5), 5);
    t_run_for(loop, 0.02);
    CHECK(all_x(buf, sizeof buf));
    CHECK(ca_future_cancelled(f));
    CHECK_ERR(ca_future_result(f, NULL), -ECANCELED);
    ca_future_unref(f);
    /* The withdrawn receive took nothing: the data is there for the next one. */
    char b2[16];
    CHECK_OK(ca_loop_sock_recv(loop, sv[0], b2, sizeof b2, &f));
    intptr_t n;
    CHECK_OK(await(loop, f, &n));
    CHECK_EQ(n, 5);
    CHECK(memcmp(b2, "hello", 5) == 0);
    ca_future_unref(f);
    close(sv[0]);
    close(sv[1]);
}

LOOP_TEST(cancel_recv_racing_with_data)
{
    /* Data arrives in the same iteration as the cancel: the receive may have taken it
     * (completion-based loops cannot un-receive), but the caller's buffer stays untouched
     * once the future is cancelled, even if the caller frees it at once. */
    int sv[2];
    pair(sv);
    char *buf = malloc(4096);
    CHECK(buf != NULL);
    memset(buf, 'x', 4096);
    ca_future *f = NULL;
    CHECK_OK(ca_loop_sock_recv(loop, sv[0], buf, 4096, &f));
    t_run_for(loop, 0.01);
    CHECK(ca_future_cancel(f));
    CHECK_EQ(write(sv[1], "racing", 6), 6);
    t_run_for(loop, 0.05);
    CHECK(all_x(buf, 4096));
    free(buf);
    ca_future_unref(f);
    close(sv[0]);
    close(sv[1]);
}

static void noop_cb(void *arg) { (void)arg; }

/* On the selector loops a cancel withdraws the receive inside ca_future_cancel: the next
 * receive, made at once, gets the data. A user's reader that replaced the operation's reader
 * is left alone when the operation goes. */
LOOP_TEST(cancel_withdraws_at_once_on_selector_loops)
{
    if (strcmp(ca_loop_kind(loop), "epoll") != 0 && strcmp(ca_loop_kind(loop), "poll") != 0)
        SKIP("the proactor withdraws through the kernel; custom loops keep their readers");
    int sv[2];
    pair(sv);
    char a[8], b[8];
    ca_future *fa = NULL, *fb = NULL;
    CHECK_OK(ca_loop_sock_recv(loop, sv[0], a, sizeof a, &fa));
    CHECK(ca_future_cancel(fa));
    CHECK_OK(ca_loop_sock_recv(loop, sv[0], b, sizeof b, &fb));
    CHECK_EQ(write(sv[1], "now", 3), 3);
    intptr_t n;
    CHECK_OK(await(loop, fb, &n));
    CHECK_EQ(n, 3);
    CHECK(memcmp(b, "now", 3) == 0);
    ca_future_unref(fa);
    ca_future_unref(fb);
    /* a user's reader replaces the pending receive's; cancelling the receive keeps it */
    CHECK_OK(ca_loop_sock_recv(loop, sv[0], a, sizeof a, &fa));
    CHECK_OK(ca_loop_add_reader(loop, sv[0], noop_cb, NULL));
    CHECK(ca_future_cancel(fa));
    CHECK_EQ(ca_loop_remove_reader(loop, sv[0]), 1);
    CHECK_EQ(ca_loop_remove_reader(loop, sv[0]), 0);
    ca_future_unref(fa);
    close(sv[0]);
    close(sv[1]);
}

LOOP_TEST(two_receives_on_one_socket_served_in_order)
{
    int sv[2];
    pair(sv);
    char a[3], b[3];
    ca_future *fa = NULL, *fb = NULL;
    CHECK_OK(ca_loop_sock_recv(loop, sv[0], a, sizeof a, &fa));
    CHECK_OK(ca_loop_sock_recv(loop, sv[0], b, sizeof b, &fb));
    t_run_for(loop, 0.01);
    CHECK_EQ(write(sv[1], "abc", 3), 3);
    intptr_t n;
    CHECK_OK(await(loop, fa, &n));
    CHECK_EQ(n, 3);
    CHECK(memcmp(a, "abc", 3) == 0);
    CHECK(!ca_future_done(fb));
    CHECK_EQ(write(sv[1], "def", 3), 3);
    CHECK_OK(await(loop, fb, &n));
    CHECK_EQ(n, 3);
    CHECK(memcmp(b, "def", 3) == 0);
    ca_future_unref(fa);
    ca_future_unref(fb);
    close(sv[0]);
    close(sv[1]);
}

/* ----- many in flight ------------------------------------------------------------------------ */

#define NSOCK 64

LOOP_TEST(sixty_four_sockets_in_flight)
{
    int sv[NSOCK][2];
    char in[NSOCK][1000], out[NSOCK][1000];
    ca_future *fr[NSOCK], *fs[NSOCK];
    for (int i = 0; i < NSOCK; i++) {
        pair(sv[i]);
        memset(out[i], 'A' + i % 26, sizeof out[i]);
        out[i][0] = (char)i;
        CHECK_OK(ca_loop_sock_recv(loop, sv[i][0], in[i], sizeof in[i], &fr[i]));
    }
    t_run_for(loop, 0.01);
    for (int i = 0; i < NSOCK; i++) CHECK(!ca_future_done(fr[i]));
    for (int i = 0; i < NSOCK; i++)
        CHECK_OK(ca_loop_sock_sendall(loop, sv[i][1], out[i], sizeof out[i], &fs[i]));
    for (int i = 0; i < NSOCK; i++) {
        intptr_t n;
        CHECK_OK(await(loop, fr[i], &n));
        CHECK_OK(await(loop, fs[i], NULL));
        CHECK_EQ(n, sizeof in[i]);
        CHECK(memcmp(in[i], out[i], sizeof in[i]) == 0);
        ca_future_unref(fr[i]);
        ca_future_unref(fs[i]);
        close(sv[i][0]);
        close(sv[i][1]);
    }
}

/* ----- sendall ------------------------------------------------------------------------------- */

struct drain {
    int fd;
    size_t total;
};

static void drain_reader(void *arg)
{
    struct drain *d = arg;
    char buf[65536];
    ssize_t k;
    while ((k = read(d->fd, buf, sizeof buf)) > 0) d->total += (size_t)k;
}

LOOP_TEST(second_sendall_is_ebusy)
{
    int sv[2];
    pair(sv);
    size_t size = (size_t)4 << 20; /* far more than the socket buffers hold */
    char *big = calloc(1, size);
    CHECK(big != NULL);
    ca_future *f1 = NULL, *f2 = NULL;
    CHECK_OK(ca_loop_sock_sendall(loop, sv[0], big, size, &f1));
    CHECK_ERR(ca_loop_sock_sendall(loop, sv[0], "x", 1, &f2), -EBUSY);
    t_run_for(loop, 0.01);
    CHECK(!ca_future_done(f1));
    CHECK_ERR(ca_loop_sock_sendall(loop, sv[0], "x", 1, &f2), -EBUSY);
    CHECK(f2 == NULL);
    /* Receives on the same socket are not affected. */
    char c;
    CHECK_OK(ca_loop_sock_recv(loop, sv[0], &c, 1, &f2));
    struct drain d = {.fd = sv[1]};
    CHECK_OK(ca_loop_add_reader(loop, sv[1], drain_reader, &d));
    CHECK_OK(await(loop, f1, NULL));
    ca_future_unref(f1);
    /* Once the first is done, the next one is welcome. */
    CHECK_OK(ca_loop_sock_sendall(loop, sv[0], "y", 1, &f1));
    CHECK_OK(await(loop, f1, NULL));
    CHECK(t_run_until(loop, fut_done, f1, 5));
    while (d.total < size + 1) t_run_for(loop, 0.005);
    CHECK_EQ(d.total, size + 1);
    ca_future_unref(f1);
    CHECK(ca_future_cancel(f2));
    ca_future_unref(f2);
    CHECK_EQ(ca_loop_remove_reader(loop, sv[1]), 1);
    t_run_for(loop, 0.01);
    free(big);
    close(sv[0]);
    close(sv[1]);
}

LOOP_TEST(sendall_to_closed_peer_fails)
{
    int sv[2];
    pair(sv);
    close(sv[1]);
    ca_future *f = NULL;
    CHECK_OK(ca_loop_sock_sendall(loop, sv[0], "abc", 3, &f));
    CHECK_ERR(await(loop, f, NULL), -EPIPE);
    ca_future_unref(f);
    close(sv[0]);
}

LOOP_TEST(sendall_of_nothing_succeeds)
{
    int sv[2];
    pair(sv);
    ca_future *f = NULL;
    CHECK_OK(ca_loop_sock_sendall(loop, sv[0], NULL, 0, &f));
    CHECK_OK(await(loop, f, NULL));
    ca_future_unref(f);
    close(sv[0]);
    close(sv[1]);
}

/* ----- close, fork, errors ------------------------------------------------------------------- */

LOOP_TEST(close_with_operations_in_flight)
{
    int sv[2], sw[2];
    pair(sv);
    pair(sw);
    struct sockaddr_in addr;
    int lfd = tcp_bound(&addr, 4);
    size_t size = (size_t)4 << 20;
    char *big = calloc(1, size), buf[64];
    ca_future *fr = NULL, *fs = NULL, *fa = NULL;
    CHECK_OK(ca_loop_sock_recv(loop, sv[0], buf, sizeof buf, &fr));
    CHECK_OK(ca_loop_sock_sendall(loop, sw[0], big, size, &fs));
    CHECK_OK(ca_loop_sock_accept(loop, lfd, &fa));
    t_run_for(loop, 0.01);
    CHECK(!ca_future_done(fr) && !ca_future_done(fs) && !ca_future_done(fa));
    CHECK_OK(ca_loop_close(loop));
    CHECK(ca_future_cancelled(fr));
    CHECK(ca_future_cancelled(fs));
    CHECK(ca_future_cancelled(fa));
    ca_future_unref(fr);
    ca_future_unref(fs);
    ca_future_unref(fa);
    free(big);
    close(sv[0]);
    close(sv[1]);
    close(sw[0]);
    close(sw[1]);
    close(lfd);
}

LOOP_TEST(closed_loop_ebadf)
{
    int sv[2];
    pair(sv);
    struct sockaddr_in addr = {.sin_family = AF_INET};
    char buf[4];
    ca_future *f = NULL;
    CHECK_OK(ca_loop_close(loop));
    CHECK_ERR(ca_loop_sock_recv(loop, sv[0], buf, 4, &f), -EBADF);
    CHECK_ERR(ca_loop_sock_sendall(loop, sv[0], buf, 4, &f), -EBADF);
    CHECK_ERR(ca_loop_sock_accept(loop, sv[0], &f), -EBADF);
    CHECK_ERR(ca_loop_sock_connect(loop, sv[0], (struct sockaddr *)&addr, sizeof addr, &f),
              -EBADF);
    /* A bad argument comes first. */
    CHECK_ERR(ca_loop_sock_recv(loop, sv[0], buf, 4, NULL), -EINVAL);
    CHECK(f == NULL);
    close(sv[0]);
    close(sv[1]);
}

LOOP_TEST(bad_arguments_einval)
{
    int sv[2];
    pair(sv);
    struct sockaddr_in addr = {.sin_family = AF_INET};
    char buf[4];
    ca_future *f = NULL;
    CHECK_ERR(ca_loop_sock_recv(NULL, sv[0], buf, 4, &f), -EINVAL);
    CHECK_ERR(ca_loop_sock_recv(loop, -1, buf, 4, &f), -EINVAL);
    CHECK_ERR(ca_loop_sock_recv(loop, sv[0], NULL, 4, &f), -EINVAL);
    CHECK_ERR(ca_loop_sock_recv(loop, sv[0], buf, 4, NULL), -EINVAL);
    CHECK_ERR(ca_loop_sock_sendall(NULL, sv[0], buf, 4, &f), -EINVAL);
    CHECK_ERR(ca_loop_sock_sendall(loop, -1, buf, 4, &f), -EINVAL);
    CHECK_ERR(ca_loop_sock_sendall(loop, sv[0], NULL, 4, &f), -EINVAL);
    CHECK_ERR(ca_loop_sock_sendall(loop, sv[0], buf, 4, NULL), -EINVAL);
    CHECK_ERR(ca_loop_sock_accept(NULL, sv[0], &f), -EINVAL);
    CHECK_ERR(ca_loop_sock_accept(loop, -1, &f), -EINVAL);
    CHECK_ERR(ca_loop_sock_accept(loop, sv[0], NULL), -EINVAL);
    CHECK_ERR(ca_loop_sock_connect(NULL, sv[0], (struct sockaddr *)&addr, sizeof addr, &f),
              -EINVAL);
    CHECK_ERR(ca_loop_sock_connect(loop, -1, (struct sockaddr *)&addr, sizeof addr, &f),
              -EINVAL);
    CHECK_ERR(ca_loop_sock_connect(loop, sv[0], NULL, sizeof addr, &f), -EINVAL);
    CHECK_ERR(ca_loop_sock_connect(loop, sv[0], (struct sockaddr *)&addr, 0, &f), -EINVAL);
    CHECK_ERR(ca_loop_sock_connect(loop, sv[0], (struct sockaddr *)&addr, sizeof addr, NULL),
              -EINVAL);
    /* An fd that is not open is a bad argument too. */
    int gone = dup(sv[0]);
    close(gone);
    CHECK_ERR(ca_loop_sock_recv(loop, gone, buf, 4, &f), -EINVAL);
    CHECK(f == NULL);
    close(sv[0]);
    close(sv[1]);
}

/* On an open loop the fd is not checked up front: the first attempt's EBADF must still give
 * -EINVAL, before any future exists, for every operation, and a huge fd number must not make
 * the per-fd table grow (which would say -ENOMEM). */
LOOP_TEST(not_open_fd_einval_for_every_operation)
{
    int sv[2];
    pair(sv);
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    char buf[4] = "abc";
    ca_future *f = NULL;
    int gone = dup(sv[0]);
    close(gone);
    CHECK_ERR(ca_loop_sock_sendall(loop, gone, buf, 4, &f), -EINVAL);
    CHECK_ERR(ca_loop_sock_sendall(loop, gone, buf, 0, &f), -EINVAL);
    CHECK_ERR(ca_loop_sock_accept(loop, gone, &f), -EINVAL);
    CHECK_ERR(ca_loop_sock_connect(loop, gone, (struct sockaddr *)&addr, sizeof addr, &f),
              -EINVAL);
    CHECK_ERR(ca_loop_sock_recv(loop, gone, buf, 0, &f), -EINVAL);
    CHECK_ERR(ca_loop_sock_recv(loop, INT32_MAX - 1, buf, 4, &f), -EINVAL);
    CHECK_ERR(ca_loop_sock_sendall(loop, INT32_MAX - 1, buf, 4, &f), -EINVAL);
    CHECK(f == NULL);
    /* The socket itself still works afterwards. */
    CHECK_OK(ca_loop_sock_recv(loop, sv[0], buf, sizeof buf, &f));
    CHECK_EQ(write(sv[1], "q", 1), 1);
    CHECK_OK(await(loop, f, NULL));
    CHECK_EQ(buf[0], 'q');
    ca_future_unref(f);
    close(sv[0]);
    close(sv[1]);
}

LOOP_TEST(forked_child_gets_echild)
{
    int sv[2];
    pair(sv);
    fflush(NULL);
    pid_t pid = fork();
    CHECK(pid >= 0);
    if (pid == 0) {
        char buf[4];
        ca_future *f = NULL;
        int ok = ca_loop_sock_recv(loop, sv[0], buf, 4, &f) == -ECHILD &&
                 ca_loop_sock_sendall(loop, sv[0], buf, 4, &f) == -ECHILD &&
                 ca_loop_sock_accept(loop, sv[0], &f) == -ECHILD && f == NULL &&
                 ca_loop_close(loop) == 0;
        _exit(ok ? 0 : 1);
    }
    int st;
    CHECK_EQ(waitpid(pid, &st, 0), pid);
    CHECK(WIFEXITED(st) && WEXITSTATUS(st) == 0);
    /* The parent's loop still works. */
    ca_future *f = NULL;
    char c;
    CHECK_OK(ca_loop_sock_recv(loop, sv[0], &c, 1, &f));
    CHECK_EQ(write(sv[1], "z", 1), 1);
    CHECK_OK(await(loop, f, NULL));
    CHECK_EQ(c, 'z');
    ca_future_unref(f);
    close(sv[0]);
    close(sv[1]);
}

struct other_thread {
    ca_loop *loop;
    int fd;
    int rc;
};

static void *recv_from_other_thread(void *arg)
{
    struct other_thread *o = arg;
    char buf[4];
    ca_future *f = NULL;
    o->rc = ca_loop_sock_recv(o->loop, o->fd, buf, sizeof buf, &f);
    return NULL;
}

static void start_other_thread(void *arg)
{
    struct other_thread *o = arg;
    pthread_t t;
    CHECK_EQ(pthread_create(&t, NULL, recv_from_other_thread, o), 0);
    CHECK_EQ(pthread_join(t, NULL), 0);
    ca_loop_stop(o->loop);
}

LOOP_TEST(wrong_thread_eperm)
{
    int sv[2];
    pair(sv);
    struct other_thread o = {.loop = loop, .fd = sv[0], .rc = 1};
    CHECK_OK(ca_loop_call_soon(loop, start_other_thread, &o, NULL));
    CHECK_OK(ca_loop_run_forever(loop));
    CHECK_ERR(o.rc, -EPERM);
    close(sv[0]);
    close(sv[1]);
}

/* ----- readers on the proactor ---------------------------------------------------------------- */

struct sipper {
    ca_loop *loop;
    int fd;
    int calls;
};

static void sip(void *arg)
{
    struct sipper *s = arg;
    char c;
    CHECK_EQ(read(s->fd, &c, 1), 1);
    if (++s->calls == 10) ca_loop_remove_reader(s->loop, s->fd);
}

LOOP_TEST(reader_that_does_not_drain_is_called_again)
{
    int sv[2];
    pair(sv);
    CHECK_EQ(write(sv[1], "0123456789", 10), 10);
    struct sipper s = {.loop = loop, .fd = sv[0]};
    CHECK_OK(ca_loop_add_reader(loop, sv[0], sip, &s));
    t_run_for(loop, 0.1);
    CHECK_EQ(s.calls, 10);
    /* Drained and removed: no more calls, even with new data. */
    CHECK_EQ(write(sv[1], "x", 1), 1);
    t_run_for(loop, 0.02);
    CHECK_EQ(s.calls, 10);
    close(sv[0]);
    close(sv[1]);
}

/* ----- what an operation leaves behind ----------------------------------------------------- */

/* CPU time of this thread: a loop woken again and again by a registration nobody wants
 * spins, which an idle run shows. */
static double thread_cpu(void)
{
    struct rusage ru;
    CHECK_OK(getrusage(RUSAGE_THREAD, &ru));
    return (double)ru.ru_utime.tv_sec + (double)ru.ru_stime.tv_sec +
           ((double)ru.ru_utime.tv_usec + (double)ru.ru_stime.tv_usec) * 1e-6;
}

static void check_idle(ca_loop *loop)
{
    double t0 = thread_cpu();
    t_run_for(loop, 0.2);
    CHECK(thread_cpu() - t0 < 0.1);
}

/* Receives 1 byte on fd after it had to wait, so the loop watched fd for it. */
static void recv_after_wait(ca_loop *loop, int fd, int peer)
{
    char c = 0;
    ca_future *f = NULL;
    CHECK_OK(ca_loop_sock_recv(loop, fd, &c, 1, &f));
    t_run_for(loop, 0.01);
    CHECK(!ca_future_done(f));
    CHECK_EQ(write(peer, "w", 1), 1);
    intptr_t n;
    CHECK_OK(await(loop, f, &n));
    CHECK_EQ(n, 1);
    CHECK_EQ(c, 'w');
    ca_future_unref(f);
}

LOOP_TEST(finished_recv_then_fd_closed_with_a_dup_and_number_reused)
{
    /* After an operation that waited, nothing of its watching is left: the user never
     * added a reader, and closing the fd while a dup keeps the socket open (data arriving
     * for it) or reusing its number for another socket neither wakes the loop nor hides the
     * new socket from the next operation. */
    int sv[2];
    pair(sv);
    int fd = sv[0];
    recv_after_wait(loop, fd, sv[1]);
    CHECK_EQ(ca_loop_remove_reader(loop, fd), 0);
    int keep = fcntl(fd, F_DUPFD_CLOEXEC, 0);
    CHECK(keep >= 0);
    CHECK_OK(close(fd));
    CHECK_EQ(write(sv[1], "old", 3), 3); /* the closed number's socket is readable for good */
    check_idle(loop);
    /* Its number now names another socket. */
    int nv[2];
    pair(nv);
    if (nv[0] != fd) {
        CHECK_EQ(dup3(nv[0], fd, O_CLOEXEC), fd);
        CHECK_OK(close(nv[0]));
    }
    recv_after_wait(loop, fd, nv[1]);
    char buf[8];
    CHECK_EQ(recv(keep, buf, sizeof buf, MSG_DONTWAIT), 3); /* the old socket's data is intact */
    CHECK(memcmp(buf, "old", 3) == 0);
    CHECK_EQ(write(sv[1], "more", 4), 4);
    CHECK_EQ(write(nv[1], "new", 3), 3); /* readable, with no operation waiting */
    check_idle(loop);
    CHECK_EQ(recv(fd, buf, sizeof buf, MSG_DONTWAIT), 3);
    CHECK(memcmp(buf, "new", 3) == 0);
    close(fd);
    close(keep);
    close(sv[1]);
    close(nv[1]);
}

LOOP_TEST(pending_recv_whose_fd_is_closed_with_a_dup_alive)
{
    /* The user closes the fd of a waiting receive while a dup keeps the socket open, then
     * data arrives: the receive ends (an error, or the data where the kernel holds the file
     * itself), and the loop does not spin on the socket afterwards. */
    int sv[2];
    pair(sv);
    char buf[4096];
    ca_future *f = NULL;
    CHECK_OK(ca_loop_sock_recv(loop, sv[0], buf, sizeof buf, &f));
    t_run_for(loop, 0.01);
    int keep = fcntl(sv[0], F_DUPFD_CLOEXEC, 0);
    CHECK(keep >= 0);
    CHECK_OK(close(sv[0]));
    CHECK_EQ(write(sv[1], "data", 4), 4);
    intptr_t n;
    int r = await(loop, f, &n);
    CHECK(r == -EBADF || (r == 0 && n == 4));
    CHECK_EQ(write(sv[1], "more", 4), 4);
    check_idle(loop);
    ca_future_unref(f);
    close(keep);
    close(sv[1]);
}

LOOP_TEST(recv_and_sendall_waiting_on_one_socket)
{
    /* Both directions of one socket wait at once; readiness of one must not lose the
     * other, whichever completes first. */
    int sv[2];
    pair(sv);
    size_t size = (size_t)4 << 20;
    char *big = calloc(1, size);
    CHECK(big != NULL);
    char c = 0;
    ca_future *fr = NULL, *fs = NULL;
    CHECK_OK(ca_loop_sock_recv(loop, sv[0], &c, 1, &fr));
    CHECK_OK(ca_loop_sock_sendall(loop, sv[0], big, size, &fs));
    t_run_for(loop, 0.01);
    CHECK(!ca_future_done(fr));
    CHECK(!ca_future_done(fs));
    /* The receive first, the sendall still waiting. */
    CHECK_EQ(write(sv[1], "r", 1), 1);
    intptr_t n;
    CHECK_OK(await(loop, fr, &n));
    CHECK_EQ(n, 1);
    CHECK(!ca_future_done(fs));
    ca_future_unref(fr);
    /* A new receive waits while the peer drains the sendall. */
    CHECK_OK(ca_loop_sock_recv(loop, sv[0], &c, 1, &fr));
    struct drain d = {.fd = sv[1]};
    CHECK_OK(ca_loop_add_reader(loop, sv[1], drain_reader, &d));
    CHECK_OK(await(loop, fs, NULL));
    while (d.total < size) t_run_for(loop, 0.005);
    CHECK_EQ(d.total, size);
    CHECK(!ca_future_done(fr));
    CHECK_EQ(write(sv[1], "s", 1), 1);
    CHECK_OK(await(loop, fr, &n));
    CHECK_EQ(n, 1);
    CHECK_EQ(c, 's');
    CHECK_EQ(ca_loop_remove_reader(loop, sv[1]), 1);
    CHECK_EQ(ca_loop_remove_reader(loop, sv[0]), 0);
    CHECK_EQ(ca_loop_remove_writer(loop, sv[0]), 0);
    ca_future_unref(fr);
    ca_future_unref(fs);
    free(big);
    close(sv[0]);
    close(sv[1]);
}

LOOP_TEST(reader_added_after_a_finished_recv_is_level_triggered)
{
    int sv[2];
    pair(sv);
    recv_after_wait(loop, sv[0], sv[1]);
    CHECK_EQ(write(sv[1], "0123456789", 10), 10);
    struct sipper s = {.loop = loop, .fd = sv[0]};
    CHECK_OK(ca_loop_add_reader(loop, sv[0], sip, &s));
    t_run_for(loop, 0.1);
    CHECK_EQ(s.calls, 10);
    /* And an operation after the reader went: watched again, completed once. */
    recv_after_wait(loop, sv[0], sv[1]);
    close(sv[0]);
    close(sv[1]);
}

/* ----- io_uring specifics --------------------------------------------------------------------- */

static int new_proactor(ca_loop **out)
{
    int r = ca_proactor_loop_new(out);
    if (r == -ENOSYS || r == -EPERM) SKIP("io_uring is unavailable here");
    CHECK_OK(r);
    return r;
}

#define NOVER 256

TEST(cq_overflow_with_tiny_ring_loses_nothing) /* timeout: 60 */
{
    /* 2 SQEs and 4 CQEs for 256 receives and 256 level-triggered readers that all complete
     * at once: the SQ fills while submitting and the CQ overflows into the kernel's list. */
    setenv("CASYNCIO_URING_ENTRIES", "2", 1);
    unsetenv("CASYNCIO_NO_IO_URING"); /* single-threaded: fine under valgrind too */
    ca_loop *loop = NULL;
    new_proactor(&loop);
    static int sv[NOVER][2], rv[NOVER][2];
    static char in[NOVER][8];
    static struct sipper sips[NOVER];
    ca_future *f[NOVER];
    for (int i = 0; i < NOVER; i++) {
        pair(sv[i]);
        pair(rv[i]);
        CHECK_OK(ca_loop_sock_recv(loop, sv[i][0], in[i], sizeof in[i], &f[i]));
        sips[i] = (struct sipper){.loop = loop, .fd = rv[i][0]};
        CHECK_OK(ca_loop_add_reader(loop, rv[i][0], sip, &sips[i]));
    }
    t_run_for(loop, 0.02);
    for (int i = 0; i < NOVER; i++) {
        char msg[16];
        snprintf(msg, sizeof msg, "%07d", i % 1000);
        CHECK_EQ(write(sv[i][1], msg, 8), 8);
        CHECK_EQ(write(rv[i][1], "0123456789", 10), 10);
    }
    for (int i = 0; i < NOVER; i++) {
        intptr_t n;
        CHECK_OK(await(loop, f[i], &n));
        CHECK_EQ(n, 8);
        CHECK_EQ(atoi(in[i]), i);
        ca_future_unref(f[i]);
    }
    for (int i = 0; i < NOVER; i++) {
        while (sips[i].calls < 10) t_run_for(loop, 0.001);
        CHECK_EQ(sips[i].calls, 10);
    }
    CHECK_OK(ca_loop_close(loop));
    ca_loop_unref(loop);
    for (int i = 0; i < NOVER; i++) {
        close(sv[i][0]);
        close(sv[i][1]);
        close(rv[i][0]);
        close(rv[i][1]);
    }
}

TEST(forced_unavailable_gives_enosys)
{
    setenv("CASYNCIO_NO_IO_URING", "1", 1);
    ca_loop *loop = (ca_loop *)&loop; /* never written on failure */
    CHECK_ERR(ca_proactor_loop_new(&loop), -ENOSYS);
    CHECK(loop == (ca_loop *)&loop);
    /* The proactor policy refuses at creation, as asyncio's does where there is no proactor;
     * the caller falls back to ca_default_policy_new. */
    ca_policy *p = (ca_policy *)&p;
    CHECK_ERR(ca_proactor_policy_new(&p), -ENOSYS);
    CHECK(p == (ca_policy *)&p);
    CHECK_ERR(ca_proactor_loop_new(NULL), -EINVAL);
    /* "0" means no. */
    setenv("CASYNCIO_NO_IO_URING", "0", 1);
    int r = ca_proactor_loop_new(&loop);
    if (r == -ENOSYS || r == -EPERM) SKIP("io_uring is unavailable here");
    CHECK_OK(r);
    CHECK(strcmp(ca_loop_kind(loop), "io_uring") == 0);
    ca_loop_unref(loop);
}

/* Makes io_uring_setup fail with err in this (test) process, as a seccomp profile would. */
static void forbid_io_uring(int err)
{
    struct sock_filter prog[] = {
        BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr)),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, __NR_io_uring_setup, 0, 1),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ERRNO | ((unsigned)err & SECCOMP_RET_DATA)),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
    };
    struct sock_fprog fprog = {.len = sizeof prog / sizeof prog[0], .filter = prog};
    unsetenv("CASYNCIO_NO_IO_URING"); /* the valgrind pass sets it; here the kernel decides */
    CHECK_OK(prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0));
    CHECK_OK(prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &fprog, 0, 0));
}

TEST(seccomp_eperm_is_reported)
{
    forbid_io_uring(EPERM);
    ca_loop *loop = NULL;
    CHECK_ERR(ca_proactor_loop_new(&loop), -EPERM);
    CHECK(loop == NULL);
    ca_policy *p = NULL;
    CHECK_ERR(ca_proactor_policy_new(&p), -EPERM);
    CHECK(p == NULL);
    /* The advice of the header: fall back to the selector loop. */
    CHECK_OK(ca_selector_loop_new(&loop));
    ca_loop_unref(loop);
}

TEST(kernel_without_io_uring_gives_enosys)
{
    forbid_io_uring(ENOSYS);
    ca_loop *loop = NULL;
    CHECK_ERR(ca_proactor_loop_new(&loop), -ENOSYS);
    CHECK(loop == NULL);
}

LOOP_TEST(proactor_runs_sock_ops_through_the_ring)
{
    if (!is_proactor(loop)) SKIP("io_uring only");
    /* A receive that the kernel completes while the loop waits in io_uring_enter. */
    int sv[2];
    pair(sv);
    char buf[4];
    ca_future *f = NULL;
    CHECK_OK(ca_loop_sock_recv(loop, sv[0], buf, sizeof buf, &f));
    t_run_for(loop, 0.01);
    CHECK(!ca_future_done(f));
    CHECK_EQ(write(sv[1], "ring", 4), 4);
    intptr_t n;
    CHECK_OK(await(loop, f, &n));
    CHECK_EQ(n, 4);
    CHECK(memcmp(buf, "ring", 4) == 0);
    ca_future_unref(f);
    close(sv[0]);
    close(sv[1]);
}

/* ----- the example ---------------------------------------------------------------------------- */

static void run_echo_example(const char *policy)
{
    char self[4096], path[4200];
    ssize_t n = readlink("/proc/self/exe", self, sizeof self - 1);
    CHECK(n > 0);
    self[n] = 0;
    char *slash = strrchr(self, '/');
    CHECK(slash != NULL);
    *slash = 0;
    snprintf(path, sizeof path, "%s/../examples/echo_server", self);
    if (access(path, X_OK) != 0) SKIP("examples not built (make examples)");
    fflush(NULL);
    pid_t pid = fork();
    CHECK(pid >= 0);
    if (pid == 0) {
        int fd = open("/dev/null", O_WRONLY | O_CLOEXEC);
        if (fd >= 0) dup2(fd, 1);
        execl(path, "echo_server", policy, "-c", "50", "-t", "20", (char *)NULL);
        _exit(127);
    }
    int st = 0;
    CHECK_EQ(waitpid(pid, &st, 0), pid);
    CHECK(WIFEXITED(st));
    CHECK_EQ(WEXITSTATUS(st), 0);
}

TEST(echo_server_example_on_every_policy) /* timeout: 90 */
{
    /* 50 clients on the server's own loop, each checking its echo: the same code on the
     * readiness loops and on the proactor (which falls back where io_uring is unusable). */
    run_echo_example("default");
    run_echo_example("selector");
    run_echo_example("poll");
    run_echo_example("proactor");
}
