/*
 * A pipeline of two processes, `ls -1 /usr/bin | wc -l` without a shell: the first one's stdout
 * is an OS pipe that is the second one's stdin (CA_FD), and the second one's stdout comes to us
 * through the protocol (CA_PIPE). We wait for both.
 *
 * usage: pipeline [PROG1 [ARG...] '|' PROG2 [ARG...]]
 */
#include "casyncio.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

struct pipeline {
    char **left, **right;
    ca_process *proc[2];
    ca_future *all_done;  /* main's future: set when both are finished */
    int pending;
};

/* The protocol of the second process: print what it writes. */
static void on_data(ca_process *proc, int fd, const void *buf, size_t n, void *arg)
{
    fwrite(buf, 1, n, stdout);
}

static const ca_subprocess_protocol printer = {.pipe_data_received = on_data};

static void one_done(ca_future *fut, void *arg)
{
    struct pipeline *pl = arg;
    if (--pl->pending == 0) ca_future_set_result(pl->all_done, NULL);
}

static int start(ca_loop *loop, struct pipeline *pl)
{
    /* The pipe between the two, O_CLOEXEC: only the copies on the children's 0 and 1 stay. */
    int p[2];
    if (pipe2(p, O_CLOEXEC) < 0) return -errno;
    ca_subprocess_options left = {.argv = (const char *const *)pl->left,
                                  .stdout_mode = CA_FD, .stdout_fd = p[1]};
    ca_subprocess_options right = {.argv = (const char *const *)pl->right,
                                   .stdin_mode = CA_FD, .stdin_fd = p[0],
                                   .stdout_mode = CA_PIPE};
    int r = ca_loop_subprocess_exec(loop, &left, NULL, NULL, &pl->proc[0]);
    if (r == 0) r = ca_loop_subprocess_exec(loop, &right, &printer, NULL, &pl->proc[1]);
    /* The children have their copies; ours must go, or the reader would never see EOF. */
    close(p[0]);
    close(p[1]);
    if (r < 0) {
        fprintf(stderr, "pipeline: %s\n", ca_strerror(r));
        return r;
    }
    for (int i = 0; i < 2; i++) {
        ca_future *w = NULL;
        if ((r = ca_process_wait(pl->proc[i], &w)) < 0) return r;
        ca_future_add_done_callback(w, one_done, pl);
        ca_future_unref(w); /* the process keeps it until it completes */
        pl->pending++;
    }
    return 0;
}

static ca_future *run_main(ca_loop *loop, void *arg)
{
    struct pipeline *pl = arg;
    if (ca_future_new(loop, &pl->all_done) < 0) return NULL;
    int r = start(loop, pl);
    if (r < 0) ca_future_set_error(pl->all_done, r); /* closing the loop ends what started */
    return ca_future_ref(pl->all_done); /* ca_run takes this reference */
}

int main(int argc, char **argv)
{
    static char *ls[] = {"ls", "-1", "/usr/bin", NULL}, *wc[] = {"wc", "-l", NULL};
    struct pipeline pl = {.left = ls, .right = wc};
    if (argc > 1) {
        int bar = 1;
        while (bar < argc && strcmp(argv[bar], "|") != 0) bar++;
        if (bar == 1 || bar >= argc - 1) {
            fprintf(stderr, "usage: %s [PROG1 [ARG...] '|' PROG2 [ARG...]]\n", argv[0]);
            return 2;
        }
        argv[bar] = NULL;
        pl.left = argv + 1;
        pl.right = argv + bar + 1;
    }
    int r = ca_run(run_main, &pl, NULL);
    int status = r < 0 ? 1 : 0;
    for (int i = 0; i < 2; i++) {
        int rc = 0;
        if (pl.proc[i] && ca_process_returncode(pl.proc[i], &rc) == 0 && rc != 0) {
            fprintf(stderr, "pipeline: %s exited with %d\n", i ? pl.right[0] : pl.left[0], rc);
            status = 1;
        }
        ca_process_unref(pl.proc[i]);
    }
    ca_future_unref(pl.all_done);
    return status;
}
