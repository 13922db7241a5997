/* The helpers several contract test files share; see contract_util.h. */
#include "contract_util.h"
#include "../src/kinds.h"

/* ----- time, callbacks, loops ------------------------------------------------------------ */

double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

void sleep_s(double s)
{
    struct timespec ts = {(time_t)s, (long)((s - (double)(time_t)s) * 1e9)};
    while (nanosleep(&ts, &ts) < 0 && errno == EINTR) {
    }
}

void noop(void *arg) {}
void count_cb(void *arg) { (*(int *)arg)++; }

void fut_noop(ca_future *f, void *arg) {}

void rec_log(int level, const char *msg, void *arg)
{
    struct logrec *r = arg;
    r->level = level;
    snprintf(r->last, sizeof r->last, "%s", msg);
    atomic_fetch_add(&r->n, 1);
}

ca_loop *new_epoll(void)
{
    ca_loop *l = NULL;
    CHECK_OK(ca_selector_loop_new(&l));
    return l;
}

void loop_done(ca_loop *l)
{
    CHECK_OK(ca_loop_close(l));
    ca_loop_unref(l);
}

/* Runs one iteration of loop (a stop requested before run_forever runs exactly one). */
void run_once(ca_loop *loop)
{
    ca_loop_stop(loop);
    CHECK_OK(ca_loop_run_forever(loop));
}


/* ----- a spy custom loop: counts op calls ------------------------------------------------ */

int spy_run(ca_loop *self) { return 0; }
#define SPY(self) ((struct spy *)ca_loop_data(self))
static void spy_stop(ca_loop *self) { SPY(self)->stops++; }
static int spy_close(ca_loop *self) { SPY(self)->closes++; return 0; }
static double spy_time(ca_loop *self)
{
    SPY(self)->time_calls++;
    SPY(self)->t += 1.0;
    return SPY(self)->t;
}
int spy_sched(ca_loop *self, ca_handle *h) { SPY(self)->calls++; return 0; }
static int spy_at(ca_loop *self, double when, ca_handle *h) { SPY(self)->calls++; return 0; }
static int spy_fd(ca_loop *self, int fd, ca_callback_fn fn, void *arg) { SPY(self)->calls++; return 0; }
static int spy_rm(ca_loop *self, int fd) { SPY(self)->calls++; return 0; }
static void spy_destroy(ca_loop *self) { SPY(self)->destroyed++; }
static int spy_recv(ca_loop *self, int fd, void *buf, size_t n, ca_future **out)
{
    SPY(self)->calls++;
    return -ENOSYS;
}
static int spy_send(ca_loop *self, int fd, const void *buf, size_t n, ca_future **out)
{
    SPY(self)->calls++;
    return -ENOSYS;
}
static int spy_accept(ca_loop *self, int fd, ca_future **out)
{
    SPY(self)->calls++;
    return -ENOSYS;
}
static int spy_connect(ca_loop *self, int fd, const struct sockaddr *a, socklen_t l, ca_future **out)
{
    SPY(self)->calls++;
    return -ENOSYS;
}

const ca_loop_ops spy_ops = {
    .run_forever = spy_run,
    .stop = spy_stop,
    .close = spy_close,
    .time = spy_time,
    .call_soon = spy_sched,
    .call_soon_threadsafe = spy_sched,
    .call_at = spy_at,
    .add_reader = spy_fd,
    .remove_reader = spy_rm,
    .add_writer = spy_fd,
    .remove_writer = spy_rm,
    .add_signal_handler = spy_fd,
    .remove_signal_handler = spy_rm,
    .sock_recv = spy_recv,
    .sock_sendall = spy_send,
    .sock_accept = spy_accept,
    .sock_connect = spy_connect,
    .destroy = spy_destroy,
};

const ca_loop_ops bare_ops = {.run_forever = spy_run, .destroy = spy_destroy};

/* ----- futures, readers, policy and runner ----------------------------------------------- */

void set_res_cb(void *arg) { CHECK_OK(ca_future_set_result(arg, (void *)(intptr_t)42)); }

void cancel_cb(void *arg) { CHECK(ca_future_cancel(arg)); }

void lvl_cb(void *arg) { ((struct lvl *)arg)->n++; }

void dcb_fn(ca_future *f, void *arg)
{
    struct dcb *d = arg;
    d->n++;
    d->seen = f;
}

int cnt_new;
static int cnt_new_loop(ca_policy *self, ca_loop **out)
{
    cnt_new++;
    return ca_policy_new_event_loop(ca_policy_base(self), out);
}
const ca_policy_ops cnt_ops = {.new_event_loop = cnt_new_loop};


ca_future *rmain(ca_loop *loop, void *arg)
{
    struct rstate *s = arg;
    s->called++;
    s->loop = ca_loop_ref(loop);
    s->running = ca_get_running_loop();
    ca_loop *cur = NULL;
    if (ca_get_event_loop(&cur) == 0) s->current = cur;
    if (s->outcome == 2) return NULL;
    if (s->outcome == 3) {
        ca_future *f = NULL;
        CHECK_OK(ca_future_new(s->other, &f));
        return f;
    }
    ca_future *f = NULL;
    CHECK_OK(ca_future_new(loop, &f));
    if (s->outcome == 0) CHECK_OK(ca_loop_call_later(loop, 0.001, set_res_cb, f, NULL));
    else if (s->outcome == 1) CHECK_OK(ca_loop_call_soon(loop, cancel_cb, f, NULL));
    else CHECK_OK(ca_future_set_error(f, s->outcome));
    return f;
}

/* ----- child watchers and subprocesses ---------------------------------------------------- */

const char *const wname[W_COUNT] = {"threaded", "multiloop", "safe", "fast", "pidfd",
                                           "uring"};

int wnew(int k, ca_child_watcher **out)
{
    /* The constructor from the library's table of kinds (src/kinds.c), found by name:
     * test_watcher_kinds checks that wname and the table agree. */
    const ca__watcher_kind *wk = k >= 0 && k < W_COUNT ? ca__watcher_kind_find(wname[k]) : NULL;
    return wk ? wk->make(out) : -EINVAL;
}

void quiet_log(int level, const char *msg, void *arg)
{
    if (arg) atomic_fetch_add((atomic_int *)arg, 1);
}

int capture_stderr_begin(int *saved)
{
    int p[2];
    CHECK_EQ(pipe2(p, O_CLOEXEC | O_NONBLOCK), 0);
    fflush(stderr);
    *saved = dup(2);
    dup2(p[1], 2);
    close(p[1]);
    return p[0];
}
size_t capture_stderr_end(int rfd, int saved, char *buf, size_t n)
{
    fflush(stderr);
    dup2(saved, 2);
    close(saved);
    ssize_t k = read(rfd, buf, n - 1);
    close(rfd);
    if (k < 0) k = 0;
    buf[k] = 0;
    return (size_t)k;
}

static void p_data(ca_process *p, int fd, const void *buf, size_t n, void *arg)
{
    struct pstat *s = arg;
    if (s->closing) s->after_close++;
    if (ca_get_running_loop() != s->loop) s->wrong_loop++;
    if (fd == 1 && s->nout + n < sizeof s->out) {
        memcpy(s->out + s->nout, buf, n);
        s->nout += n;
    } else if (fd == 2 && s->nerr + n < sizeof s->err) {
        memcpy(s->err + s->nerr, buf, n);
        s->nerr += n;
    } else if (fd != 1 && fd != 2) {
        s->wrong_loop += 100;
    }
}
static void p_lost(ca_process *p, int fd, int err, void *arg)
{
    struct pstat *s = arg;
    if (s->closing) s->after_close++;
    if (ca_get_running_loop() != s->loop) s->wrong_loop++;
    if (fd >= 0 && fd <= 2) {
        s->lost[fd]++;
        s->lost_err[fd] = err;
    }
}
static void p_exited(ca_process *p, void *arg)
{
    struct pstat *s = arg;
    if (s->closing) s->after_close++;
    if (ca_get_running_loop() != s->loop) s->wrong_loop++;
    s->exited++;
}
const ca_subprocess_protocol pproto = {p_data, p_lost, p_exited};

void sockpair(int sv[2])
{
    CHECK_EQ(socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0, sv), 0);
}
