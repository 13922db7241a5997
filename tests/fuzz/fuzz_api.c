/*
 * libFuzzer target for the public API (docs/testing.md, `make fuzz`): the input bytes are
 * decoded into a sequence of public calls on a few loops, handles, futures, policies, child
 * watchers and at most one subprocess, with bad arguments mixed in (NaN times, odd signal
 * numbers, closed objects, bogus pids and fds). Resources are bounded per input (2 loops,
 * 8 handles, 8 futures, 2 watchers, 1 spawn, 64 calls) and everything is released at the end
 * of each input, so that LeakSanitizer can judge every input on its own.
 *
 * What the fuzzer may not do is what the header forbids (a use after the last unref, a loop
 * function from a thread where the loop does not run, a signal that is really raised): the
 * objects live in slots that hold one reference each.
 */
#include "casyncio.h"

#include <errno.h>
#include <math.h>
#include <signal.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

/* The io_uring watcher, where it is built in (weak: some branches do not define it). */
#pragma weak ca_uring_child_watcher_new

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
int LLVMFuzzerInitialize(int *argc, char ***argv);

#define NLOOP 2
#define NHANDLE 8
#define NFUT 8
#define NWATCH 2

static struct {
    const uint8_t *p;
    size_t n;
} in;

static unsigned byte(void)
{
    if (!in.n) return 0;
    in.n--;
    return *in.p++;
}

static ca_loop *loops[NLOOP];
static ca_handle *handles[NHANDLE];
static ca_future *futs[NFUT];
static ca_child_watcher *watchers[NWATCH];
static ca_process *proc;
static int sv[2] = {-1, -1};
static char rbuf[NFUT][64];
static int calls;

static void noop(void *arg) { (void)arg; }
static void stop_loop(void *arg) { ca_loop_stop(arg); }
static void done_cb(ca_future *f, void *arg)
{
    (void)arg;
    void *r;
    (void)ca_future_result(f, &r);
}
static void child_cb(pid_t pid, int rc, void *arg) { (void)pid, (void)rc, (void)arg; }

static ca_loop *pick_loop(void)
{
    unsigned b = byte();
    return b % 8 == 7 ? NULL : loops[b % NLOOP];
}

static double pick_time(void)
{
    unsigned b = byte();
    if (b == 255) return NAN;
    if (b == 254) return INFINITY;
    if (b == 253) return -1e300;
    return ((double)b - 8) * 0.0005;
}

static int pick_fd(void)
{
    switch (byte() % 5) {
    case 0: return sv[0];
    case 1: return sv[1];
    case 2: return -1;
    case 3: return 1000; /* not open */
    default: return 0;
    }
}

static int pick_sig(void)
{
    /* Never a signal whose handler would matter to the fuzzer itself (SIGINT, SIGALRM, SIGSEGV
     * and the like): these are never raised, only registered and removed. */
    static const int sigs[] = {SIGUSR1, SIGUSR2, SIGCHLD, SIGWINCH, 0, -1, 65, SIGKILL, SIGSTOP,
                               1000};
    return sigs[byte() % (sizeof sigs / sizeof sigs[0])];
}

static pid_t pick_pid(void)
{
    switch (byte() % 4) {
    case 0: return proc ? ca_process_pid(proc) : 1;
    case 1: return 1; /* not our child */
    case 2: return 0;
    default: return -5;
    }
}

static void run_slice(ca_loop *loop)
{
    if (!loop || ca_loop_is_closed(loop)) return;
    if (ca_loop_call_soon(loop, stop_loop, loop, NULL) == 0) (void)ca_loop_run_forever(loop);
}

static int new_watcher(unsigned kind, ca_child_watcher **w)
{
    switch (kind % 6) {
    case 0: return ca_threaded_child_watcher_new(w);
    case 1: return ca_multiloop_child_watcher_new(w);
    case 2: return ca_safe_child_watcher_new(w);
    case 3: return ca_fast_child_watcher_new(w);
    case 4: return ca_pidfd_child_watcher_new(w);
    default: return ca_uring_child_watcher_new ? ca_uring_child_watcher_new(w) : -ENOSYS;
    }
}

static ca_future *runner_main(ca_loop *loop, void *arg)
{
    (void)arg;
    ca_future *f = NULL;
    if (ca_future_new(loop, &f) == 0) ca_future_set_result(f, NULL);
    return f;
}

static void step(void)
{
    unsigned op = byte() % 28, s;
    ca_loop *l;
    switch (op) {
    case 0: /* a loop */
        s = byte() % NLOOP;
        if (!loops[s]) {
            unsigned k = byte() % 3;
            (void)(k == 0 ? ca_selector_loop_new(&loops[s])
                   : k == 1 ? ca_poll_loop_new(&loops[s])
                            : ca_proactor_loop_new(&loops[s]));
        }
        break;
    case 1:
        s = byte() % NHANDLE;
        if (!handles[s]) (void)ca_loop_call_soon(pick_loop(), noop, NULL, &handles[s]);
        else (void)ca_loop_call_soon(pick_loop(), noop, NULL, NULL);
        break;
    case 2:
        s = byte() % NHANDLE;
        l = pick_loop();
        (void)ca_loop_call_later(l, pick_time(), noop, NULL, handles[s] ? NULL : &handles[s]);
        break;
    case 3:
        s = byte() % NHANDLE;
        l = pick_loop();
        (void)ca_loop_call_at(l, (l ? ca_loop_time(l) : 0) + pick_time(), noop, NULL,
                              handles[s] ? NULL : &handles[s]);
        break;
    case 4:
        s = byte() % NHANDLE;
        ca_handle_cancel(handles[s]);
        (void)ca_handle_cancelled(handles[s]);
        break;
    case 5:
        s = byte() % NHANDLE;
        handles[s] = ca_handle_unref(handles[s]);
        break;
    case 6: run_slice(pick_loop()); break;
    case 7: ca_loop_stop(pick_loop()); break;
    case 8: (void)ca_loop_close(pick_loop()); break;
    case 9:
        s = byte() % NFUT;
        if (!futs[s]) (void)ca_future_new(pick_loop(), &futs[s]);
        break;
    case 10:
        s = byte() % NFUT;
        switch (byte() % 3) {
        case 0: (void)ca_future_set_result(futs[s], (void *)(uintptr_t)byte()); break;
        case 1: (void)ca_future_set_error(futs[s], -(int)(byte() % 140)); break;
        default: (void)ca_future_cancel(futs[s]); break;
        }
        break;
    case 11:
        s = byte() % NFUT;
        (void)ca_future_add_done_callback(futs[s], byte() & 1 ? done_cb : NULL, NULL);
        break;
    case 12: {
        s = byte() % NFUT;
        void *r;
        (void)ca_future_result(futs[s], byte() & 1 ? &r : NULL);
        (void)ca_future_done(futs[s]);
        (void)ca_future_cancelled(futs[s]);
        (void)ca_future_loop(futs[s]);
        break;
    }
    case 13:
        s = byte() % NFUT;
        if (!futs[s])
            (void)ca_loop_sock_recv(pick_loop(), pick_fd(), rbuf[s], byte() % 65, &futs[s]);
        break;
    case 14:
        s = byte() % NFUT;
        if (!futs[s])
            (void)ca_loop_sock_sendall(pick_loop(), pick_fd(), "fuzzdata", byte() % 9, &futs[s]);
        break;
    case 15:
        l = pick_loop();
        if (byte() & 1) (void)ca_loop_add_reader(l, pick_fd(), noop, NULL);
        else (void)ca_loop_remove_reader(l, pick_fd());
        break;
    case 16:
        l = pick_loop();
        if (byte() & 1) (void)ca_loop_add_writer(l, pick_fd(), noop, NULL);
        else (void)ca_loop_remove_writer(l, pick_fd());
        break;
    case 17:
        l = pick_loop();
        if (byte() & 1) (void)ca_loop_add_signal_handler(l, pick_sig(), noop, NULL);
        else (void)ca_loop_remove_signal_handler(l, pick_sig());
        break;
    case 18: {
        ca_policy *p = NULL;
        unsigned k = byte() % 4;
        int r = k == 0 ? ca_default_policy_new(&p) : k == 1 ? ca_poll_policy_new(&p) : 0;
        if (r == 0) (void)ca_set_event_loop_policy(p);
        ca_policy_unref(p);
        break;
    }
    case 19: {
        ca_loop *cur = NULL;
        if (byte() & 1) (void)ca_get_event_loop(&cur);
        else (void)ca_set_event_loop(pick_loop());
        break;
    }
    case 20: {
        ca_loop *n = NULL;
        if (ca_new_event_loop(&n) == 0) {
            (void)ca_loop_close(n);
            ca_loop_unref(n);
        }
        break;
    }
    case 21:
        s = byte() % NWATCH;
        if (!watchers[s]) (void)new_watcher(byte(), &watchers[s]);
        break;
    case 22:
        s = byte() % NWATCH;
        switch (byte() % 6) {
        case 0: (void)ca_set_child_watcher(watchers[s]); break;
        case 1: (void)ca_child_watcher_attach_loop(watchers[s], pick_loop()); break;
        case 2: (void)ca_child_watcher_close(watchers[s]); break;
        case 3: (void)ca_child_watcher_is_active(watchers[s]); break;
        case 4: (void)ca_child_watcher_enter(watchers[s]); break;
        default: (void)ca_child_watcher_exit(watchers[s]); break;
        }
        break;
    case 23: {
        s = byte() % NWATCH;
        pid_t pid = pick_pid();
        /* A pid that is ours: the spawned child, already watched by the loop's process; the
         * watcher then replaces that registration, which the API allows. */
        if (byte() & 1) (void)ca_child_watcher_add_child_handler(watchers[s], pid, child_cb, NULL);
        else (void)ca_child_watcher_remove_child_handler(watchers[s], pid);
        break;
    }
    case 24: {
        ca_child_watcher *w = NULL;
        (void)ca_get_child_watcher(byte() & 1 ? &w : NULL);
        break;
    }
    case 25:
        if (!proc) {
            static const char *const argv[] = {"/bin/true", NULL};
            ca_subprocess_options o = {.argv = argv};
            o.stdin_mode = (ca_stdio_mode)(byte() % 6);
            o.stdout_mode = (ca_stdio_mode)(byte() % 6);
            o.stderr_mode = (ca_stdio_mode)(byte() % 6);
            o.stdin_fd = o.stdout_fd = o.stderr_fd = pick_fd();
            (void)ca_loop_subprocess_exec(pick_loop(), &o, NULL, NULL, &proc);
        } else {
            s = byte() % NFUT;
            switch (byte() % 6) {
            case 0:
                if (!futs[s]) (void)ca_process_wait(proc, &futs[s]);
                break;
            case 1: (void)ca_process_write(proc, "x", byte() % 2); break;
            case 2: (void)ca_process_close_stdin(proc); break;
            case 3: (void)ca_process_send_signal(proc, (int)(byte() % 70)); break;
            case 4:
                if (!futs[s]) (void)ca_process_communicate(proc, "in", byte() % 3, &futs[s]);
                break;
            default: {
                int rc;
                const void *b;
                size_t n;
                (void)ca_process_returncode(proc, &rc);
                (void)ca_process_output(proc, (int)(byte() % 4), &b, &n);
                break;
            }
            }
        }
        break;
    case 26: (void)ca_strerror(-(int)byte()); break;
    default: (void)ca_run(runner_main, NULL, NULL); break;
    }
}

static void quiet(int level, const char *msg, void *arg) { (void)level, (void)msg, (void)arg; }

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc, (void)argv;
    /* "killed it" warnings for every spawn a closed loop ends: not what we look for. */
    ca_set_log_handler(quiet, NULL);
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    in.p = data;
    in.n = size;
    if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0, sv) < 0) return 0;
    for (calls = 0; calls < 64 && in.n; calls++) step();

    /* Release everything: futures first (a pending socket operation must be cancelled before
     * its fd closes), then loops (closing ends the subprocess), then the policy's state. */
    for (int i = 0; i < NFUT; i++) {
        ca_future_cancel(futs[i]);
        futs[i] = ca_future_unref(futs[i]);
    }
    for (int i = 0; i < NHANDLE; i++) {
        ca_handle_cancel(handles[i]);
        handles[i] = ca_handle_unref(handles[i]);
    }
    for (int i = 0; i < NLOOP; i++) {
        if (loops[i]) {
            (void)ca_loop_close(loops[i]);
            loops[i] = ca_loop_unref(loops[i]);
        }
    }
    proc = ca_process_unref(proc);
    (void)ca_set_event_loop(NULL);
    (void)ca_set_child_watcher(NULL);
    for (int i = 0; i < NWATCH; i++) {
        if (watchers[i]) {
            (void)ca_child_watcher_close(watchers[i]);
            watchers[i] = ca_child_watcher_unref(watchers[i]);
        }
    }
    (void)ca_set_event_loop_policy(NULL);
    close(sv[0]);
    close(sv[1]);
    return 0;
}
