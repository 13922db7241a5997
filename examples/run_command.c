/*
 * Runs a command and prints what it wrote, the way asyncio does it:
 *
 *     proc = await asyncio.create_subprocess_exec(*argv, stdout=PIPE, stderr=PIPE)
 *     out, err = await proc.communicate()
 *
 * usage: run_command [PROGRAM [ARG...]]      (default: uname -a)
 *
 * ca_run makes the loop, runs main's future to its end and closes the loop; the process object
 * (and the output communicate collected) stays valid until we drop it.
 */
#include "casyncio.h"

#include <stdio.h>

struct job {
    char **argv;
    ca_process *proc;
};

static ca_future *run_main(ca_loop *loop, void *arg)
{
    struct job *job = arg;
    ca_subprocess_options opts = {
        .argv = (const char *const *)job->argv,
        .stdout_mode = CA_PIPE,
        .stderr_mode = CA_PIPE,
    };
    int r = ca_loop_subprocess_exec(loop, &opts, NULL, NULL, &job->proc);
    if (r < 0) {
        fprintf(stderr, "run_command: %s: %s\n", job->argv[0], ca_strerror(r));
        return NULL; /* ca_run then returns -EINVAL */
    }
    ca_future *done = NULL;
    r = ca_process_communicate(job->proc, NULL, 0, &done);
    if (r < 0) fprintf(stderr, "run_command: communicate: %s\n", ca_strerror(r));
    return done;
}

static void print(const char *what, ca_process *proc, int fd)
{
    const void *buf;
    size_t len;
    if (ca_process_output(proc, fd, &buf, &len) < 0 || len == 0) return;
    printf("--- %s (%zu bytes)\n", what, len);
    fwrite(buf, 1, len, stdout);
    if (((const char *)buf)[len - 1] != '\n') putchar('\n');
}

int main(int argc, char **argv)
{
    static char *uname_a[] = {"uname", "-a", NULL};
    struct job job = {argc > 1 ? argv + 1 : uname_a, NULL};
    int r = ca_run(run_main, &job, NULL);
    if (!job.proc) return 127;
    int rc = -1;
    ca_process_returncode(job.proc, &rc);
    print("stdout", job.proc, 1);
    print("stderr", job.proc, 2);
    printf("--- %s exited with %d%s\n", job.argv[0], rc, rc < 0 ? " (killed by a signal)" : "");
    ca_process_unref(job.proc);
    if (r < 0) {
        fprintf(stderr, "run_command: %s\n", ca_strerror(r));
        return 1;
    }
    return rc == 0 ? 0 : 1;
}
