/*
 * An echo server written once against ca_loop_sock_*, run on whichever loop the policy named
 * on the command line makes: the same code is readiness-based on the selector loops and
 * completion-based (io_uring) on the proactor.
 *
 *   echo_server [default|selector|poll|proactor] [-p PORT] [-n CONNS] [-t SECONDS] [-c CLIENTS]
 *
 * It listens on 127.0.0.1:PORT (0, the default, picks a free port and prints it), echoes each
 * connection until the peer closes it, and exits after CONNS connections (0: no limit) or
 * SECONDS seconds (default 10), so that CI can run it. With -c CLIENTS it also runs that many
 * clients on the same loop, each sending a message and checking the echo; it then exits after
 * them, with status 0 only if every echo came back intact. Where io_uring is unusable, the
 * proactor choice falls back to the default policy, as docs/proactor.md advises.
 */
#include "casyncio.h"

#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

static ca_loop *loop;
static int listen_fd = -1;
static long max_conns;          /* 0: serve until the time limit */
static long conns_done;
static int clients_left, clients_failed;
static int exit_status;
static ca_future *accept_pending;

static void fail(const char *what, int err)
{
    fprintf(stderr, "echo_server: %s: %s\n", what, ca_strerror(err));
    exit_status = 1;
    ca_loop_stop(loop);
}

/* ----- the server: accept, then recv/sendall until EOF, per connection ------------------- */

/* Each connection (and client) keeps its pending future: if the loop closes first, the done
 * callback that would have released it never runs, so main releases it. */
struct conn {
    int fd;
    ca_future *pending;
    struct conn *prev, *next; /* the open connections, freed at exit if still open */
    char buf[16384];
};
static struct conn *conns;

static void conn_recv(struct conn *c);

static void conn_end(struct conn *c)
{
    if (c->prev) c->prev->next = c->next;
    else conns = c->next;
    if (c->next) c->next->prev = c->prev;
    close(c->fd);
    free(c);
    if (max_conns > 0 && ++conns_done >= max_conns) ca_loop_stop(loop);
}

static void conn_sent(ca_future *f, void *arg)
{
    struct conn *c = arg;
    int r = ca_future_result(f, NULL);
    c->pending = ca_future_unref(c->pending);
    if (r < 0) conn_end(c); /* the peer went away (-EPIPE, -ECONNRESET) */
    else conn_recv(c);
}

static void conn_got(ca_future *f, void *arg)
{
    struct conn *c = arg;
    void *n = NULL;
    int r = ca_future_result(f, &n);
    c->pending = ca_future_unref(c->pending);
    if (r < 0 || (intptr_t)n == 0) {
        conn_end(c);
        return;
    }
    ca_future *g = NULL;
    r = ca_loop_sock_sendall(loop, c->fd, c->buf, (size_t)(intptr_t)n, &g);
    if (r < 0 || (r = ca_future_add_done_callback(g, conn_sent, c)) < 0) {
        ca_future_unref(g);
        conn_end(c);
        return;
    }
    c->pending = g;
}

static void conn_recv(struct conn *c)
{
    ca_future *f = NULL;
    int r = ca_loop_sock_recv(loop, c->fd, c->buf, sizeof c->buf, &f);
    if (r < 0 || (r = ca_future_add_done_callback(f, conn_got, c)) < 0) {
        ca_future_unref(f);
        conn_end(c);
        return;
    }
    c->pending = f;
}

static void accept_next(void);

static void accepted(ca_future *f, void *arg)
{
    (void)arg;
    void *v = NULL;
    int r = ca_future_result(f, &v);
    accept_pending = ca_future_unref(accept_pending);
    if (r == -ECANCELED) return;
    if (r < 0) {
        fail("accept", r);
        return;
    }
    struct conn *c = malloc(sizeof *c);
    if (!c) {
        close((int)(intptr_t)v);
        fail("accept", -ENOMEM);
        return;
    }
    c->fd = (int)(intptr_t)v;
    c->pending = NULL;
    c->prev = NULL;
    c->next = conns;
    if (conns) conns->prev = c;
    conns = c;
    conn_recv(c);
    accept_next();
}

static void accept_next(void)
{
    ca_future *f = NULL;
    int r = ca_loop_sock_accept(loop, listen_fd, &f);
    if (r < 0 || (r = ca_future_add_done_callback(f, accepted, NULL)) < 0) {
        ca_future_unref(f);
        fail("accept", r);
        return;
    }
    accept_pending = f;
}

/* ----- the optional clients ----------------------------------------------------------------- */

struct client {
    int fd;
    ca_future *pending;
    struct client *prev, *next;
    char msg[64], back[64];
    size_t len, got;
};
static struct client *clients;

static void client_end(struct client *cl, bool ok)
{
    if (!ok) clients_failed++;
    if (cl->prev) cl->prev->next = cl->next;
    else clients = cl->next;
    if (cl->next) cl->next->prev = cl->prev;
    close(cl->fd);
    free(cl);
    if (--clients_left == 0) ca_loop_stop(loop);
}

static void client_recv(struct client *cl);

static void client_got(ca_future *f, void *arg)
{
    struct client *cl = arg;
    void *n = NULL;
    int r = ca_future_result(f, &n);
    cl->pending = ca_future_unref(cl->pending);
    if (r < 0 || (intptr_t)n == 0) {
        client_end(cl, false);
        return;
    }
    cl->got += (size_t)(intptr_t)n;
    if (cl->got < cl->len) client_recv(cl);
    else client_end(cl, memcmp(cl->msg, cl->back, cl->len) == 0);
}

static void client_recv(struct client *cl)
{
    ca_future *f = NULL;
    if (ca_loop_sock_recv(loop, cl->fd, cl->back + cl->got, cl->len - cl->got, &f) < 0 ||
        ca_future_add_done_callback(f, client_got, cl) < 0) {
        ca_future_unref(f);
        client_end(cl, false);
        return;
    }
    cl->pending = f;
}

static void client_sent(ca_future *f, void *arg)
{
    struct client *cl = arg;
    int r = ca_future_result(f, NULL);
    cl->pending = ca_future_unref(cl->pending);
    if (r < 0) client_end(cl, false);
    else client_recv(cl);
}

static void client_connected(ca_future *f, void *arg)
{
    struct client *cl = arg;
    int r = ca_future_result(f, NULL);
    cl->pending = ca_future_unref(cl->pending);
    ca_future *g = NULL;
    if (r < 0 || ca_loop_sock_sendall(loop, cl->fd, cl->msg, cl->len, &g) < 0 ||
        ca_future_add_done_callback(g, client_sent, cl) < 0) {
        ca_future_unref(g);
        client_end(cl, false);
        return;
    }
    cl->pending = g;
}

static int start_client(int i, const struct sockaddr_in *addr)
{
    struct client *cl = calloc(1, sizeof *cl);
    if (!cl) return -ENOMEM;
    cl->len = (size_t)snprintf(cl->msg, sizeof cl->msg, "hello from client %d", i);
    cl->fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (cl->fd < 0) {
        free(cl);
        return -errno;
    }
    ca_future *f = NULL;
    int r = ca_loop_sock_connect(loop, cl->fd, (const struct sockaddr *)addr, sizeof *addr, &f);
    if (r == 0) r = ca_future_add_done_callback(f, client_connected, cl);
    if (r < 0) {
        ca_future_unref(f);
        close(cl->fd);
        free(cl);
        return r;
    }
    cl->pending = f;
    cl->next = clients;
    if (clients) clients->prev = cl;
    clients = cl;
    clients_left++;
    return 0;
}

/* ----- main ----------------------------------------------------------------------------------- */

static int make_policy(const char *name, ca_policy **out)
{
    if (strcmp(name, "default") == 0) return ca_default_policy_new(out);
    if (strcmp(name, "selector") == 0) return ca_selector_policy_new(out);
    if (strcmp(name, "poll") == 0) return ca_poll_policy_new(out);
    if (strcmp(name, "proactor") == 0) {
        int r = ca_proactor_policy_new(out);
        if (r == -ENOSYS || r == -EPERM) {
            fprintf(stderr, "echo_server: io_uring unusable here (%s); using the default "
                    "policy\n", ca_strerror(r));
            return ca_default_policy_new(out);
        }
        return r;
    }
    return -EINVAL;
}

static void time_up(void *arg)
{
    (void)arg;
    if (clients_left > 0) fail("time limit", -ETIMEDOUT);
    ca_loop_stop(loop);
}

static int usage(void)
{
    fprintf(stderr, "usage: echo_server [default|selector|poll|proactor] [-p PORT] [-n CONNS] "
            "[-t SECONDS] [-c CLIENTS]\n");
    return 2;
}

int main(int argc, char **argv)
{
    const char *policy_name = "default";
    int port = 0, nclients = 0;
    double seconds = 10;
    for (int i = 1; i < argc; i++) {
        if (argv[i][0] != '-') policy_name = argv[i];
        else if (i + 1 >= argc) return usage();
        else if (strcmp(argv[i], "-p") == 0) port = atoi(argv[++i]);
        else if (strcmp(argv[i], "-n") == 0) max_conns = atol(argv[++i]);
        else if (strcmp(argv[i], "-t") == 0) seconds = atof(argv[++i]);
        else if (strcmp(argv[i], "-c") == 0) nclients = atoi(argv[++i]);
        else return usage();
    }
    ca_policy *policy = NULL;
    int r = make_policy(policy_name, &policy);
    if (r < 0) {
        fprintf(stderr, "echo_server: policy %s: %s\n", policy_name, ca_strerror(r));
        return usage();
    }
    ca_set_event_loop_policy(policy);
    policy = ca_policy_unref(policy); /* the process policy holds its own reference */
    if ((r = ca_new_event_loop(&loop)) < 0) {
        fprintf(stderr, "echo_server: new loop: %s\n", ca_strerror(r));
        return 1;
    }
    ca_set_event_loop(loop);

    listen_fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    int one = 1;
    setsockopt(listen_fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port),
                               .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t len = sizeof addr;
    if (listen_fd < 0 || bind(listen_fd, (struct sockaddr *)&addr, sizeof addr) < 0 ||
        listen(listen_fd, 128) < 0 || getsockname(listen_fd, (struct sockaddr *)&addr, &len) < 0) {
        perror("echo_server: listen");
        return 1;
    }
    printf("echo_server: %s loop listening on 127.0.0.1:%d\n", ca_loop_kind(loop),
           ntohs(addr.sin_port));
    fflush(stdout);

    accept_next();
    for (int i = 0; i < nclients; i++)
        if ((r = start_client(i, &addr)) < 0) fail("client", r);
    ca_loop_call_later(loop, seconds, time_up, NULL, NULL);
    if (exit_status == 0) ca_loop_run_forever(loop);

    /* Closing the loop cancels the pending accept and the operations of the connections still
     * open (their done callbacks no longer run), so what they hold is released here. */
    ca_set_event_loop(NULL);
    ca_loop_close(loop);
    loop = ca_loop_unref(loop);
    close(listen_fd);
    while (conns) {
        struct conn *c = conns;
        conns = c->next;
        ca_future_unref(c->pending);
        close(c->fd);
        free(c);
    }
    while (clients) {
        struct client *cl = clients;
        clients = cl->next;
        ca_future_unref(cl->pending);
        close(cl->fd);
        free(cl);
    }
    accept_pending = ca_future_unref(accept_pending);
    if (nclients > 0) {
        printf("echo_server: %d of %d clients got their echo back\n",
               nclients - clients_failed - clients_left, nclients);
        if (clients_failed || clients_left) exit_status = 1;
    }
    ca_set_event_loop_policy(NULL);
    return exit_status;
}
