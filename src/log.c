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

/* strerror() is not thread-safe and its texts are not ours to choose for the named codes, so
 * the library keeps its own table. */
const char *ca_strerror(int err)
{
    if (err == INT_MIN) return "Unknown error";
    if (err < 0) err = -err;
    switch (err) {
    case 0: return "Success";
    case EINVAL: return "Invalid argument";
    case ECHILD: return "Object belongs to the parent process (used after fork)";
    case EBADF: return "Closed object or bad file descriptor";
    case ENOENT: return "No such file or directory, or no current event loop";
    case ENOTCONN: return "Child watcher is not active";
    case ENOTSUP: return "Operation not supported";
    case EBUSY: return "Busy: the loop is running, or another loop runs in this thread";
    case EPERM: return "Operation not permitted (or called from the wrong thread)";
    case ENOMEM: return "Out of memory";
    case EAGAIN: return "Resource temporarily unavailable, or not done yet";
    case ECANCELED: return "Operation cancelled";
    case ENOSYS: return "Function not implemented by this kernel";
    case ENOSPC: return "No space left (too many loops watch signals)";
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
