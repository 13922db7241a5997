/*
 * Contract tests for API.md's "Event loop" (socket operations): recv, sendall, accept, connect,
 * cancellation, loop close. Each test names the statement it checks; a failure is a disagreement
 * between the code and API.md.
 */
#include "contract_util.h"

static intptr_t fut_int(ca_future *f)
{
    void *res = SENT_PTR;
    CHECK_OK(ca_future_result(f, &res));
    return (intptr_t)res;
}

/* recv: "result: bytes read, 0 at EOF" */
LOOP_TEST(sock_recv_bytes_and_eof)
{
    int sv[2];
    sockpair(sv);
    char buf[64];
    ca_future *f = SENT_FUT;
    CHECK_OK(ca_loop_sock_recv(loop, sv[0], buf, sizeof buf, &f));
    CHECK(f != SENT_FUT);
    CHECK_EQ(write(sv[1], "abc", 3), 3);
    CHECK_ERR(ca_loop_run_until_complete(loop, f), 0);
    CHECK_EQ(fut_int(f), 3);
    CHECK(memcmp(buf, "abc", 3) == 0);
    ca_future_unref(f);
    close(sv[1]);
    CHECK_OK(ca_loop_sock_recv(loop, sv[0], buf, sizeof buf, &f));
    CHECK_ERR(ca_loop_run_until_complete(loop, f), 0);
    CHECK_EQ(fut_int(f), 0);
    ca_future_unref(f);
    close(sv[0]);
}

/* Several recvs on one socket are served in the order they were made. */
LOOP_TEST(sock_recvs_in_order)
{
    int sv[2];
    sockpair(sv);
    char b1[2], b2[2], b3[2];
    ca_future *f1 = NULL, *f2 = NULL, *f3 = NULL;
    CHECK_OK(ca_loop_sock_recv(loop, sv[0], b1, 2, &f1));
    CHECK_OK(ca_loop_sock_recv(loop, sv[0], b2, 2, &f2));
    CHECK_OK(ca_loop_sock_recv(loop, sv[0], b3, 2, &f3));
    CHECK_EQ(write(sv[1], "aa", 2), 2);
    CHECK_ERR(ca_loop_run_until_complete(loop, f1), 0);
    CHECK_EQ(write(sv[1], "bb", 2), 2);
    CHECK_ERR(ca_loop_run_until_complete(loop, f2), 0);
    CHECK_EQ(write(sv[1], "cc", 2), 2);
    CHECK_ERR(ca_loop_run_until_complete(loop, f3), 0);
    CHECK(memcmp(b1, "aa", 2) == 0 && memcmp(b2, "bb", 2) == 0 && memcmp(b3, "cc", 2) == 0);
    ca_future_unref(f1);
    ca_future_unref(f2);
    ca_future_unref(f3);
    close(sv[0]);
    close(sv[1]);
}

/* sendall: "result: 0 when all sent"; a big buffer arrives whole and in order. */
struct drain {
    int fd;
    size_t got;
    unsigned char *dst;
    size_t cap;
};
static void drain_cb(void *arg)
{
    struct drain *d = arg;
    ssize_t k;
    while (d->got < d->cap && (k = read(d->fd, d->dst + d->got, d->cap - d->got)) > 0) d->got += (size_t)k;
}

LOOP_TEST(sock_sendall_big_in_order)
{
    int sv[2];
    sockpair(sv);
    size_t n = 2u << 20;
    unsigned char *src = malloc(n), *dst = malloc(n);
    for (size_t i = 0; i < n; i++) src[i] = (unsigned char)(i * 7 + (i >> 10));
    ca_future *f = NULL;
    CHECK_OK(ca_loop_sock_sendall(loop, sv[0], src, n, &f));
    /* "At most one send per socket is in flight at a time": a second one meanwhile -EBUSY. */
    ca_future *g = SENT_FUT;
    int r2 = ca_loop_sock_sendall(loop, sv[0], "x", 1, &g);
    if (!ca_future_done(f)) {
        CHECK_ERR(r2, -EBUSY);
        CHECK(g == SENT_FUT);
    } else if (r2 == 0) {
        ca_future_unref(g);
    }
    struct drain d = {sv[1], 0, dst, n};
    CHECK_OK(ca_loop_add_reader(loop, sv[1], drain_cb, &d));
    CHECK_ERR(ca_loop_run_until_complete(loop, f), 0);
    CHECK_EQ(fut_int(f), 0);
    double t0 = now_s();
    while (d.got < n && now_s() - t0 < 5) t_run_for(loop, 0.005);
    CHECK_EQ(d.got, n);
    CHECK(memcmp(src, dst, n) == 0);
    CHECK_EQ(ca_loop_remove_reader(loop, sv[1]), 1);
    ca_future_unref(f);
    free(src);
    free(dst);
    close(sv[0]);
    close(sv[1]);
}

/* accept: "result: the new fd"; connect: 0 when connected; refused: the future fails. */
LOOP_TEST(sock_accept_connect)
{
    int ls = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    CHECK(ls >= 0);
    struct sockaddr_in sa = {.sin_family = AF_INET};
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    CHECK_EQ(bind(ls, (struct sockaddr *)&sa, sizeof sa), 0);
    CHECK_EQ(listen(ls, 8), 0);
    socklen_t len = sizeof sa;
    CHECK_EQ(getsockname(ls, (struct sockaddr *)&sa, &len), 0);
    ca_future *af = NULL, *cf = NULL;
    CHECK_OK(ca_loop_sock_accept(loop, ls, &af));
    int c = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    CHECK_OK(ca_loop_sock_connect(loop, c, (struct sockaddr *)&sa, sizeof sa, &cf));
    CHECK_ERR(ca_loop_run_until_complete(loop, cf), 0);
    CHECK_EQ(fut_int(cf), 0);
    CHECK_ERR(ca_loop_run_until_complete(loop, af), 0);
    int nfd = (int)fut_int(af);
    CHECK(nfd >= 0);
    CHECK(fcntl(nfd, F_GETFL) & O_NONBLOCK);
    CHECK(fcntl(nfd, F_GETFD) & FD_CLOEXEC);
    close(nfd);
    ca_future_unref(af);
    ca_future_unref(cf);
    close(c);
    close(ls); /* the port is now closed: refused */
    c = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    CHECK_OK(ca_loop_sock_connect(loop, c, (struct sockaddr *)&sa, sizeof sa, &cf));
    CHECK_ERR(ca_loop_run_until_complete(loop, cf), -ECONNREFUSED);
    ca_future_unref(cf);
    close(c);
}

/* sendall to a closed peer: -EPIPE, and "sends never raise SIGPIPE". */
LOOP_TEST(sock_sendall_epipe_no_sigpipe)
{
    signal(SIGPIPE, SIG_DFL);
    int sv[2];
    sockpair(sv);
    close(sv[1]);
    ca_future *f = NULL;
    CHECK_OK(ca_loop_sock_sendall(loop, sv[0], "hello", 5, &f));
    CHECK_ERR(ca_loop_run_until_complete(loop, f), -EPIPE);
    ca_future_unref(f);
    close(sv[0]);
    signal(SIGPIPE, SIG_IGN);
}

/* "cancelling the future cancels the operation" (a cancelled recv never writes the buffer). */
LOOP_TEST(sock_cancel_recv)
{
    int sv[2];
    sockpair(sv);
    char b1[8] = "-------", b2[8] = {0};
    ca_future *f1 = NULL, *f2 = NULL;
    CHECK_OK(ca_loop_sock_recv(loop, sv[0], b1, 7, &f1));
    t_run_for(loop, 0.01);
    CHECK(ca_future_cancel(f1));
    t_run_for(loop, 0.01);
    CHECK_EQ(write(sv[1], "data", 4), 4);
    CHECK_OK(ca_loop_sock_recv(loop, sv[0], b2, 7, &f2));
    CHECK_ERR(ca_loop_run_until_complete(loop, f2), 0);
    CHECK_EQ(fut_int(f2), 4);
    CHECK(memcmp(b2, "data", 4) == 0);
    CHECK(memcmp(b1, "-------", 7) == 0);
    CHECK_ERR(ca_loop_run_until_complete(loop, f1), -ECANCELED);
    ca_future_unref(f1);
    ca_future_unref(f2);
    close(sv[0]);
    close(sv[1]);
}

/* A cancelled pending sendall frees the slot (at once on the selector loops, once the kernel
 * confirmed the cancel on the proactor). */
LOOP_TEST(sock_cancel_sendall_then_send_again)
{
    int sv[2];
    sockpair(sv);
    size_t n = 4u << 20;
    char *big = calloc(1, n);
    ca_future *f = NULL, *g = NULL;
    CHECK_OK(ca_loop_sock_sendall(loop, sv[0], big, n, &f));
    t_run_for(loop, 0.01);
    CHECK(!ca_future_done(f));
    CHECK(ca_future_cancel(f));
    if (strcmp(ca_loop_kind(loop), "io_uring") != 0) {
        /* The selector loops withdraw it inside the cancel: the slot is free at once. */
        CHECK_OK(ca_loop_sock_sendall(loop, sv[0], "z", 1, &g));
        CHECK(ca_future_cancel(g));
        ca_future_unref(g);
        g = NULL;
    }
    t_run_for(loop, 0.01);
    CHECK_OK(ca_loop_sock_sendall(loop, sv[0], "z", 1, &g));
    ca_future_cancel(g);
    t_run_for(loop, 0.01);
    ca_future_unref(f);
    ca_future_unref(g);
    free(big);
    close(sv[0]);
    close(sv[1]);
}

/* Closing the loop cancels the pending operations' futures; their done callbacks do not run. */
LOOP_TEST(sock_loop_close_cancels)
{
    int sv[2];
    sockpair(sv);
    char buf[8];
    ca_future *f = NULL;
    struct dcb d = {0};
    CHECK_OK(ca_loop_sock_recv(loop, sv[0], buf, sizeof buf, &f));
    CHECK_OK(ca_future_add_done_callback(f, dcb_fn, &d));
    t_run_for(loop, 0.01);
    CHECK_OK(ca_loop_close(loop));
    CHECK(ca_future_cancelled(f));
    CHECK_EQ(d.n, 0);
    ca_future_unref(f);
    close(sv[0]);
    close(sv[1]);
}

/* Bad arguments. */
LOOP_TEST(sock_bad_args)
{
    int sv[2];
    sockpair(sv);
    char buf[4];
    ca_future *f = SENT_FUT;
    CHECK_ERR(ca_loop_sock_recv(loop, -1, buf, 4, &f), -EINVAL);
    CHECK_ERR(ca_loop_sock_recv(loop, sv[0], NULL, 4, &f), -EINVAL);
    CHECK_ERR(ca_loop_sock_recv(loop, sv[0], buf, 4, NULL), -EINVAL);
    CHECK_ERR(ca_loop_sock_sendall(loop, sv[0], NULL, 4, &f), -EINVAL);
    CHECK_ERR(ca_loop_sock_sendall(loop, -3, buf, 4, &f), -EINVAL);
    CHECK_ERR(ca_loop_sock_accept(loop, -1, &f), -EINVAL);
    CHECK_ERR(ca_loop_sock_accept(loop, sv[0], NULL), -EINVAL);
    CHECK_ERR(ca_loop_sock_connect(loop, sv[0], NULL, 16, &f), -EINVAL);
    struct sockaddr_in sa = {.sin_family = AF_INET};
    CHECK_ERR(ca_loop_sock_connect(loop, sv[0], (struct sockaddr *)&sa, 0, &f), -EINVAL);
    CHECK_ERR(ca_loop_sock_connect(loop, sv[0], (struct sockaddr *)&sa, sizeof(struct sockaddr_storage) + 1, &f), -EINVAL);
    CHECK_ERR(ca_loop_sock_recv(loop, 1000, buf, 4, &f), -EINVAL); /* not open */
    CHECK(f == SENT_FUT);
    close(sv[0]);
    close(sv[1]);
}

/* "a cancelled recv never writes the buffer afterwards (the caller may free it at once)":
 * data that arrives right after the cancel, before any loop iteration, must not land in it. */
LOOP_TEST(sock_cancelled_recv_buffer_untouched)
{
    int sv[2];
    sockpair(sv);
    char *b1 = malloc(64);
    memset(b1, '-', 64);
    ca_future *f1 = NULL, *f2 = NULL;
    CHECK_OK(ca_loop_sock_recv(loop, sv[0], b1, 64, &f1));
    t_run_for(loop, 0.01); /* armed */
    CHECK(ca_future_cancel(f1));
    CHECK_EQ(write(sv[1], "data", 4), 4);
    t_run_for(loop, 0.02);
    for (int i = 0; i < 64; i++)
        if (b1[i] != '-') t_fail(__FILE__, __LINE__, "the cancelled recv wrote its buffer");
    free(b1);
    char b2[8] = {0};
    CHECK_OK(ca_loop_sock_recv(loop, sv[0], b2, sizeof b2, &f2));
    CHECK_EQ(write(sv[1], "more", 4), 4);
    CHECK_ERR(ca_loop_run_until_complete(loop, f2), 0);
    CHECK(fut_int(f2) > 0);
    ca_future_unref(f1);
    ca_future_unref(f2);
    close(sv[0]);
    close(sv[1]);
}

/* Ping-pong through sock_recv/sock_sendall (200 rounds) and a big transfer received with
 * chained sock_recv calls: data arrives whole and in order on every loop kind. */
struct chainrx {
    ca_loop *loop;
    int fd;
    unsigned char *dst;
    size_t got, want;
    ca_future *f;
    int err;
};
static void chainrx_next(struct chainrx *c);
static void chainrx_done(ca_future *f, void *arg)
{
    struct chainrx *c = arg;
    void *res = NULL;
    int r = ca_future_result(f, &res);
    ca_future_unref(c->f);
    c->f = NULL;
    if (r < 0 || (intptr_t)res == 0) {
        c->err = r < 0 ? r : -EPIPE;
        return;
    }
    c->got += (size_t)(intptr_t)res;
    chainrx_next(c);
}
static void chainrx_next(struct chainrx *c)
{
    if (c->got >= c->want) return;
    size_t n = c->want - c->got;
    if (n > 100000) n = 100000;
    CHECK_OK(ca_loop_sock_recv(c->loop, c->fd, c->dst + c->got, n, &c->f));
    CHECK_OK(ca_future_add_done_callback(c->f, chainrx_done, c));
}
static bool chainrx_over(void *arg)
{
    struct chainrx *c = arg;
    return c->got >= c->want || c->err;
}

LOOP_TEST(sock_ping_pong_and_big_transfer)
{
    int sv[2];
    sockpair(sv);
    for (int i = 0; i < 200; i++) {
        char out[8], in[8] = {0};
        snprintf(out, sizeof out, "%07u", (unsigned)i % 10000000u);
        ca_future *s = NULL, *r = NULL;
        CHECK_OK(ca_loop_sock_sendall(loop, sv[i % 2], out, 8, &s));
        CHECK_OK(ca_loop_sock_recv(loop, sv[1 - i % 2], in, 8, &r));
        CHECK_ERR(ca_loop_run_until_complete(loop, r), 0);
        CHECK_ERR(ca_loop_run_until_complete(loop, s), 0);
        CHECK_EQ(fut_int(r), 8);
        CHECK(memcmp(in, out, 8) == 0);
        ca_future_unref(s);
        ca_future_unref(r);
    }
    size_t n = 8u << 20;
    unsigned char *src = malloc(n), *dst = calloc(1, n);
    for (size_t i = 0; i < n; i++) src[i] = (unsigned char)(i ^ (i >> 8) ^ (i >> 16));
    struct chainrx c = {loop, sv[1], dst, 0, n, NULL, 0};
    chainrx_next(&c);
    ca_future *s = NULL;
    CHECK_OK(ca_loop_sock_sendall(loop, sv[0], src, n, &s));
    CHECK(t_run_until(loop, chainrx_over, &c, 20.0));
    CHECK_ERR(ca_loop_run_until_complete(loop, s), 0);
    CHECK_EQ(c.err, 0);
    CHECK_EQ(c.got, n);
    CHECK(memcmp(src, dst, n) == 0);
    ca_future_unref(s);
    free(src);
    free(dst);
    close(sv[0]);
    close(sv[1]);
}

/* Several accepts on one listening socket are served in the order they were made. */
LOOP_TEST(sock_accepts_in_order)
{
    int ls = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    struct sockaddr_un sa;
    memset(&sa, 0, sizeof sa);
    sa.sun_family = AF_UNIX;
    snprintf(sa.sun_path + 1, sizeof sa.sun_path - 1, "ca-contract-%d", (int)getpid());
    socklen_t len = (socklen_t)(sizeof(sa_family_t) + 1 + strlen(sa.sun_path + 1));
    CHECK_EQ(bind(ls, (struct sockaddr *)&sa, len), 0);
    CHECK_EQ(listen(ls, 8), 0);
    ca_future *a[3];
    for (int i = 0; i < 3; i++) CHECK_OK(ca_loop_sock_accept(loop, ls, &a[i]));
    int c[3];
    for (int i = 0; i < 3; i++) {
        c[i] = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
        CHECK_EQ(connect(c[i], (struct sockaddr *)&sa, len), 0);
        char b = (char)('a' + i);
        CHECK_EQ(write(c[i], &b, 1), 1);
        CHECK_ERR(ca_loop_run_until_complete(loop, a[i]), 0);
        int fd = (int)fut_int(a[i]);
        char got = 0;
        CHECK_EQ(read(fd, &got, 1), 1);
        CHECK_EQ(got, 'a' + i);
        close(fd);
        ca_future_unref(a[i]);
    }
    for (int i = 0; i < 3; i++) close(c[i]);
    close(ls);
}
