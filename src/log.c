/* Logging, error strings and the version: the library's only words to the outside world. */
#include "internal.h"

#include <limits.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

static void default_log(int level, const char *msg, void *arg)
{
    (void)arg;
    const char *name = level >= CA_LOG_ERROR ? "error" : level >= CA_LOG_WARNING ? "warning"
                       : level >= CA_LOG_INFO ? "info" : "debug";
    char line[1200];
    int n = snprintf(line, sizeof line, "casyncio: %s: %s\n", name, msg);
    if (n < 0) return;
    if ((size_t)n >= sizeof line) n = (int)sizeof line - 1;
    /* One write, so lines from several threads do not interleave. */
    ssize_t w = write(STDERR_FILENO, line, (size_t)n);
    (void)w;
}

/* The handler and its argument change together, so a reader takes the lock; logging is rare. */
static pthread_mutex_t log_lock = PTHREAD_MUTEX_INITIALIZER;
static ca_log_fn log_fn = default_log;
static void *log_arg;

/* fork() in one thread while another holds log_lock would leave it locked forever in the
 * child, whose first log line would then hang: the forking thread takes it around the fork. */
static void log_fork_prepare(void) { pthread_mutex_lock(&log_lock); }
static void log_fork_release(void) { pthread_mutex_unlock(&log_lock); }

__attribute__((constructor)) static void log_init(void)
{
    pthread_atfork(log_fork_prepare, log_fork_release, log_fork_release);
}

void ca_set_log_handler(ca_log_fn fn, void *arg)
{
    pthread_mutex_lock(&log_lock);
    log_fn = fn;
    log_arg = arg;
    pthread_mutex_unlock(&log_lock);
}

void ca__log(int level, const char *fmt, ...)
{
    pthread_mutex_lock(&log_lock);
    ca_log_fn fn = log_fn;
    void *arg = log_arg;
    pthread_mutex_unlock(&log_lock);
    if (!fn) return;
    char msg[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    fn(level, msg, arg);
}

const char *ca_version(void) { return CA_VERSION_STRING; }

/* strerror() is not thread-safe and its texts are not ours to choose, so the library keeps its
 * own table. These are the codes' general meanings: a code the library returns with a meaning of
 * its own that is not the errno's (ECHILD, ENOTCONN) says so; a code whose meaning depends on the
 * call (ENOENT, EBUSY, EAGAIN, EPERM...) gets its plain text here and a fitting one from
 * ca_strerror_for. */
const char *ca_strerror(int err)
{
    if (err == INT_MIN) return "Unknown error";
    if (err < 0) err = -err;
    switch (err) {
    case 0: return "Success";
    case EINVAL: return "Invalid argument";
    case ECHILD: return "Object belongs to the parent process (used after fork())";
    case EBADF: return "Closed object or bad file descriptor";
    case ENOENT: return "No such file or directory";
    case ENOTCONN: return "Not connected (a child watcher: not active)";
    case ENOTSUP: return "Operation not supported";
    case EBUSY: return "Device or resource busy";
    case EPERM: return "Operation not permitted";
    case ENOMEM: return "Out of memory";
    case EAGAIN: return "Resource temporarily unavailable";
    case ECANCELED: return "Operation cancelled";
    case ENOSYS: return "Function not implemented (by this kernel)";
    case ENOSPC: return "No space left";
    case EMFILE: return "Too many open files";
    case ENFILE: return "Too many open files in system";
    case EACCES: return "Permission denied";
    case ENOTDIR: return "Not a directory";
    case ESRCH: return "No such process";
    case EINTR: return "Interrupted system call";
    case EPIPE: return "Broken pipe";
    case ECONNREFUSED: return "Connection refused";
    case ECONNRESET: return "Connection reset by peer";
    case ETIMEDOUT: return "Connection timed out";
    case EEXIST: return "File exists";
    case EIO: return "Input/output error";
    case E2BIG: return "Argument list too long";
    case ENOEXEC: return "Exec format error";
    case ELOOP: return "Too many levels of symbolic links";
    case ENAMETOOLONG: return "File name too long";
    case EISDIR: return "Is a directory";
    case ETXTBSY: return "Text file busy";
    case EXDEV: return "Invalid cross-device link";
    case EADDRINUSE: return "Address already in use";
    case EADDRNOTAVAIL: return "Cannot assign requested address";
    case ENOTSOCK: return "Socket operation on non-socket";
    case EINPROGRESS: return "Operation now in progress";
    case EALREADY: return "Operation already in progress";
    case EISCONN: return "Transport endpoint is already connected";
    case ENETUNREACH: return "Network is unreachable";
    case EHOSTUNREACH: return "No route to host";
    case EOVERFLOW: return "Value too large for defined data type";
    case ERANGE: return "Numerical result out of range";
    case EDEADLK: return "Resource deadlock avoided";
    case EFAULT: return "Bad address";
    case ENODEV: return "No such device";
    case ENXIO: return "No such device or address";
    case EROFS: return "Read-only file system";
    case ETIME: return "Timer expired";
    default: return "Unknown error";
    }
}

/* The messages of ca_strerror_for: the first rule whose function matches (an exact name, or a
 * prefix when it ends with '_' or '*') and whose code is err. Specific rules come first. */
struct err_rule {
    const char *fn;
    int err;
    const char *text;
};

static const struct err_rule rules[] = {
    /* policies */
    {"ca_get_event_loop", ENOENT, "no current event loop in this thread"},
    {"ca_policy_get_event_loop", ENOENT, "the policy has no current event loop here"},
    {"ca_policy_get_child_watcher", ENOENT, "the policy has no child watcher"},
    {"ca_policy_*", ENOTSUP, "no policy in the chain provides this operation"},
    {"ca_get_*", ENOTSUP, "the process policy does not provide this operation"},
    {"ca_set_*", ENOTSUP, "the process policy does not provide this operation"},
    {"ca_new_event_loop", ENOTSUP, "the process policy does not provide this operation"},
    {"ca_set_event_loop", ECHILD, "the policy's child watcher belongs to the parent process"},
    {"ca_proactor_*", ENOSYS, "io_uring is not available here"},
    {"ca_proactor_*", EPERM, "io_uring is forbidden here (seccomp or kernel.io_uring_disabled)"},
    {"ca_run", EBUSY, "an event loop is already running in this thread"},
    {"ca_run", EAGAIN, "the loop was stopped before the main future was done"},
    {"ca_run", EINVAL, "invalid argument, or main gave no future of its loop"},
    /* subprocesses */
    {"ca_loop_subprocess_exec", ENOENT,
     "program not found (or the working directory does not exist)"},
    {"ca_loop_subprocess_exec", EACCES,
     "permission denied: the program (or a directory on the way) is not executable"},
    {"ca_loop_subprocess_exec", ENOTDIR, "a directory on the way is not a directory"},
    {"ca_loop_subprocess_exec", ENOTCONN,
     "the policy's child watcher is not active (not attached to a loop)"},
    {"ca_loop_subprocess_exec", EAGAIN, "no process or thread could be created (limits)"},
    {"ca_loop_subprocess_exec", EBADF,
     "the event loop or the child watcher is closed, or a given fd is not open"},
    {"ca_loop_subprocess_exec", ECHILD, "the loop or the watcher belongs to the parent process"},
    {"ca_process_communicate", EBUSY, "communicate was already called for this process"},
    {"ca_process_returncode", EAGAIN, "the process has not exited yet"},
    {"ca_process_write", EPIPE, "the child's stdin is closed"},
    {"ca_process_*", EBADF, "the process's loop is closed"},
    {"ca_process_*", EPERM, "called from another thread while the process's loop runs there"},
    {"ca_process_*", ECHILD, "the process belongs to the parent process (used after fork())"},
    {"ca_process_*", ESRCH, "the child process is gone"},
    /* child watchers */
    {"ca_child_watcher_add_child_handler*", ENOENT,
     "no running or current event loop in this thread to deliver the exit to"},
    {"ca_child_watcher_add_child_handler*", ENOTCONN,
     "the child watcher is not active (not attached to a loop)"},
    {"ca_child_watcher_add_child_handler*", EAGAIN, "no thread could be created for the child"},
    {"ca_child_watcher_add_child_handler*", EPERM, "the delivery loop runs in another thread"},
    {"ca_child_watcher_attach_loop", EPERM, "a loop concerned runs in another thread"},
    {"ca_child_watcher_attach_loop", ENOTSUP, "the loop has no signal handlers"},
    {"ca_child_watcher_*", EBADF, "the child watcher is closed"},
    {"ca_child_watcher_*", ECHILD, "the child watcher belongs to the parent process"},
    {"ca_pidfd_child_watcher_new", ENOSYS, "pidfd_open is not available (Linux 5.3 or later)"},
    {"ca_multiloop_child_watcher_new", EAGAIN, "its reaping thread could not be created"},
    {"ca_multiloop_child_watcher_new", ENOSPC, "too many signal slots in the process"},
    /* futures */
    {"ca_future_result", EAGAIN, "the future is not done yet"},
    {"ca_future_result", ECANCELED, "the future was cancelled"},
    {"ca_future_set_*", EINVAL, "invalid argument, or the future is already done"},
    {"ca_future_*", EBADF, "the future's event loop is closed"},
    {"ca_future_*", ECHILD, "the future's loop belongs to the parent process"},
    /* loops */
    {"ca_loop_run_until_complete", EAGAIN, "the loop was stopped before the future was done"},
    {"ca_loop_run_until_complete", ECANCELED, "the future was cancelled"},
    {"ca_loop_run_*", EBUSY, "this loop is already running, or another loop runs in this thread"},
    {"ca_loop_enter_running", EBUSY,
     "this loop is already running, or another loop runs in this thread"},
    {"ca_loop_exit_running", EINVAL, "this loop is not the one running in this thread"},
    {"ca_loop_close", EBUSY, "the event loop is running"},
    {"ca_loop_add_signal_handler", ENOSPC, "too many loops watch signals at once"},
    {"ca_loop_add_signal_handler", EINVAL, "invalid argument, or a signal that cannot be handled"},
    {"ca_loop_sock_*", EBUSY, "a send or connect is already in progress on this socket"},
    {"ca_loop_threadsafe_fd", EINVAL,
     "invalid argument: not a custom loop without call_soon_threadsafe"},
    {"ca_loop_run_threadsafe", EINVAL,
     "invalid argument: not a custom loop without call_soon_threadsafe"},
    {"ca_loop_*", ENOTSUP, "this custom loop does not provide the operation"},
    {"ca_loop_*", EBADF, "the event loop is closed"},
    {"ca_loop_*", EPERM, "called from another thread while the loop runs there"},
    {"ca_loop_*", ECHILD, "the event loop belongs to the parent process (used after fork())"},
    {"ca_handle_*", EPERM, "called from another thread while the loop runs there"},
};

static bool rule_matches(const char *pattern, const char *fn)
{
    size_t n = strlen(pattern);
    if (pattern[n - 1] == '*') return strncmp(pattern, fn, n - 1) == 0;
    return strcmp(pattern, fn) == 0;
}

const char *ca_strerror_for(const char *function, int err)
{
    if (err == INT_MIN || !function) return ca_strerror(err);
    int code = err < 0 ? -err : err;
    /* "loop_subprocess_exec" and "ca_loop_subprocess_exec" alike: the prefix is optional. */
    char name[96];
    if (strncmp(function, "ca_", 3) != 0) {
        int n = snprintf(name, sizeof name, "ca_%s", function);
        if (n < 0 || (size_t)n >= sizeof name) return ca_strerror(err);
        function = name;
    }
    for (size_t i = 0; i < sizeof rules / sizeof rules[0]; i++)
        if (rules[i].err == code && rule_matches(rules[i].fn, function)) return rules[i].text;
    return ca_strerror(err);
}
