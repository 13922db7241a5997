/* `casyncio info`: what works on this machine, found by trying it: each loop kind runs an
 * iteration, each child watcher reaps a real /bin/true. Also the policy and watcher factories
 * the runner uses. */
#include "cli.h"
#include "../kinds.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/utsname.h>

int make_policy(enum loop_kind k, ca_policy **out)
{
    if ((size_t)k >= ca__loop_kind_count) return -EINVAL;
    return ca__loop_kinds[k].make_policy(out);
}

int make_watcher(enum watcher_kind k, ca_child_watcher **out)
{
    size_t i = (size_t)k - 1;
    if (k == W_DEFAULT || i >= ca__watcher_kind_count) return -EINVAL;
    return ca__watcher_kinds[i].make(out);
}

/* The Pidfd watcher when the kernel has pidfd_open (Linux 5.3+): no signal handler, no thread,
 * no waitpid(-1), one fd per running job, O(1) per exit. Otherwise Fast: waitpid(-1) from the
 * loop on SIGCHLD, O(1) per exit; it reaps every child of the process, which is fine here
 * because every child of the runner is a job. */
enum watcher_kind pick_default_watcher(void)
{
    ca_child_watcher *w = NULL;
    if (ca_pidfd_child_watcher_new(&w) == 0) {
        ca_child_watcher_close(w);
        ca_child_watcher_unref(w);
        return W_PIDFD;
    }
    return W_FAST;
}

static void stop_cb(void *arg) { ca_loop_stop(arg); }

static int probe_loop(enum loop_kind k)
{
    ca_loop *loop = NULL;
    if ((size_t)k >= ca__loop_kind_count) return -EINVAL;
    int e = ca__loop_kinds[k].make(&loop);
    if (e < 0) return e;
    e = ca_loop_call_soon(loop, stop_cb, loop, NULL);
    if (e == 0) e = ca_loop_run_forever(loop);
    ca_loop_close(loop);
    ca_loop_unref(loop);
    return e;
}

/* Installs a policy of loop kind lk with watcher wk, spawns /bin/true and waits (at most two
 * seconds) for its exit: 0 if it was seen, else why not. Leaves no policy behind. */
static int probe_watcher(enum loop_kind lk, enum watcher_kind wk)
{
    ca_policy *policy = NULL;
    ca_child_watcher *w = NULL;
    ca_loop *loop = NULL;
    ca_process *proc = NULL;
    ca_future *fut = NULL;
    ca_handle *timer = NULL;
    int e = make_policy(lk, &policy);
    if (e == 0) e = ca_set_event_loop_policy(policy);
    if (e == 0) e = make_watcher(wk, &w);
    if (e == 0) e = ca_set_child_watcher(w);
    if (e == 0) e = ca_new_event_loop(&loop);
    if (e == 0) e = ca_set_event_loop(loop);
    if (e == 0 && !ca_child_watcher_is_active(w)) e = ca_child_watcher_attach_loop(w, loop);
    if (e == 0) {
        static const char *const argv[] = {"/bin/true", NULL};
        ca_subprocess_options o = {.argv = argv, .stdin_mode = CA_DEVNULL,
                                   .stdout_mode = CA_DEVNULL, .stderr_mode = CA_DEVNULL};
        e = ca_loop_subprocess_exec(loop, &o, NULL, NULL, &proc);
    }
    if (e == 0) e = ca_process_wait(proc, &fut);
    if (e == 0) e = ca_loop_call_later(loop, 2.0, stop_cb, loop, &timer);
    if (e == 0) {
        e = ca_loop_run_until_complete(loop, fut);
        if (e == -EAGAIN) e = -ETIMEDOUT;
    }
    if (timer) ca_handle_cancel(timer);
    ca_handle_unref(timer);
    ca_future_unref(fut);
    ca_process_unref(proc);
    if (loop) ca_set_event_loop(NULL);
    if (w) {
        ca_set_child_watcher(NULL);
        ca_child_watcher_close(w);
        ca_child_watcher_unref(w);
    }
    if (loop) ca_loop_close(loop);
    ca_loop_unref(loop);
    if (policy) ca_set_event_loop_policy(NULL);
    ca_policy_unref(policy);
    return e;
}

int info_main(int argc, char **argv)
{
    if (argc > 0) {
        fprintf(stderr, "usage: casyncio info\n");
        return CLI_EXIT_USAGE;
    }
    struct utsname u;
    printf("casyncio %s (library %s)\n", CA_VERSION_STRING, ca_version());
    if (uname(&u) == 0) printf("kernel:   %s %s %s\n", u.sysname, u.release, u.machine);
    printf("cpus:     %d\n", default_jobs());
    /* The probes' own warnings would only repeat what the table says. */
    ca_set_log_handler(NULL, NULL);
    printf("loops (--loop):\n");
    for (size_t i = 0; i < ca__loop_kind_count; i++) {
        enum loop_kind lk = (enum loop_kind)i;
        int e = probe_loop(lk);
        printf("  %-10s %s%s\n", loop_kind_name(lk), e == 0 ? "works" : "unavailable: ",
               e == 0 ? "" : ca_strerror(e));
    }
    printf("child watchers (--watcher; each reaped a /bin/true on an epoll loop):\n");
    for (size_t i = 0; i < ca__watcher_kind_count; i++) {
        enum watcher_kind wk = (enum watcher_kind)(i + 1);
        int e = probe_watcher(LOOP_EPOLL, wk);
        printf("  %-10s %s%s\n", watcher_kind_name(wk), e == 0 ? "works" : "unavailable: ",
               e == 0 ? "" : ca_strerror(e));
    }
    printf("defaults: -j %d, --loop epoll, --watcher %s, --group; --bar and --summary when "
           "stderr is a terminal\n",
           default_jobs(), watcher_kind_name(pick_default_watcher()));
    return 0;
}
