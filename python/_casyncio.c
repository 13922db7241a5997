/*
 * _casyncio: the C half of the casyncio Python package (python/package/__init__.py is the
 * other half). It holds the C child watchers and the "bridges" that let them deliver onto
 * asyncio loops.
 *
 * A bridge is a custom ca_loop (ca_loop_new_custom) whose ops are calls on one asyncio loop:
 * add_reader/remove_reader, add_signal_handler/remove_signal_handler, call_soon, call_at, time
 * and is_closed go to the asyncio loop's methods of the same name. Exits reaped by a library
 * thread (Threaded, MultiLoop) are posted through the core's thread-safe queue: its fd is
 * watched with loop.add_reader, and the reader runs what was queued on the loop's thread. So a
 * child's callback always runs from an asyncio callback of its delivery loop, with the GIL.
 *
 * The C watcher is given an integer token as the callback's argument, never a pointer: the
 * Python side keeps token -> (watcher, loop, callback, args) and forgets a token when the
 * handler is removed, replaced or closed, so a late or duplicate C callback finds nothing and
 * nothing can be used after it was freed.
 *
 * Threads: the ops and the log handler may be called from library threads, which do not hold
 * the GIL; they take it with PyGILState_Ensure. Every call into the library is made with the
 * GIL released, so that a library thread that needs the GIL (to run an op or to log) while a
 * Python thread waits for the library never deadlocks.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <casyncio.h>

#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <time.h>

static PyObject *g_dispatch;  /* casyncio._dispatch(token, pid, returncode) */
static PyObject *g_log;       /* casyncio._log(level, message) */
static PyObject *g_bridges;   /* dict: asyncio loop -> capsule holding its bridge (ca_loop) */
static atomic_int g_shutdown; /* set at interpreter exit: foreign threads no longer take the GIL */

static const char BRIDGE_CAPSULE[] = "casyncio.bridge";
static const char HANDLE_CAPSULE[] = "casyncio.handle";
static const char CALL_CAPSULE[] = "casyncio.call";

/* ---- the GIL from any thread ---------------------------------------------------------- */

static bool interpreter_finalizing(void)
{
#if PY_VERSION_HEX >= 0x030D0000
    return Py_IsFinalizing() != 0;
#else
    return _Py_IsFinalizing() != 0;
#endif
}

/* Takes the GIL for a call that may come from any thread. Refuses once the interpreter is
 * shutting down: a thread that asks for the GIL then would block forever (or be ended). */
static bool gil_enter(PyGILState_STATE *st)
{
    if (atomic_load(&g_shutdown) || interpreter_finalizing())
        return false;
    *st = PyGILState_Ensure();
    return true;
}

/* Maps the Python exception being raised by a call on an asyncio loop to a negative errno for
 * the library, and clears it (the library reports the error code; the loop's own exception
 * would be noise). A closed loop is -EBADF whatever the loop raised. */
static int loop_error(PyObject *pyloop)
{
    int err = -EINVAL;
    if (PyErr_ExceptionMatches(PyExc_MemoryError))
        err = -ENOMEM;
    else if (PyErr_ExceptionMatches(PyExc_RuntimeError) ||
             PyErr_ExceptionMatches(PyExc_ValueError))
        err = -EPERM; /* e.g. add_signal_handler outside the main thread */
    PyErr_Clear();
    PyObject *closed = PyObject_CallMethod(pyloop, "is_closed", NULL);
    if (closed == NULL)
        PyErr_Clear();
    else {
        if (PyObject_IsTrue(closed) == 1)
            err = -EBADF;
        Py_DECREF(closed);
    }
    PyErr_Clear();
    return err;
}

/* ---- C callables handed to asyncio ------------------------------------------------------ */

/* A core handle as a Python callable: asyncio's call_soon/call_at run it, and it runs the
 * handle (a cancelled handle does nothing). The capsule owns a handle reference. */
static void handle_capsule_free(PyObject *cap)
{
    ca_handle_unref(PyCapsule_GetPointer(cap, HANDLE_CAPSULE));
}

static PyObject *run_handle(PyObject *cap, PyObject *unused)
{
    ca_handle *h = PyCapsule_GetPointer(cap, HANDLE_CAPSULE);
    if (h == NULL)
        return NULL;
    ca_handle_run(h);
    Py_RETURN_NONE;
}

static PyMethodDef run_handle_def = {"_casyncio_handle", run_handle, METH_NOARGS, NULL};

static PyObject *handle_callable(ca_handle *h)
{
    PyObject *cap = PyCapsule_New(ca_handle_ref(h), HANDLE_CAPSULE, handle_capsule_free);
    if (cap == NULL) {
        ca_handle_unref(h);
        return NULL;
    }
    PyObject *fn = PyCFunction_NewEx(&run_handle_def, cap, NULL);
    Py_DECREF(cap);
    return fn;
}

/* fn(arg) as a Python callable, for readers and signal handlers. */
typedef struct call {
    ca_callback_fn fn;
    void *arg;
} call;

static void call_capsule_free(PyObject *cap)
{
    PyMem_Free(PyCapsule_GetPointer(cap, CALL_CAPSULE));
}

static PyObject *run_call(PyObject *cap, PyObject *unused)
{
    call *c = PyCapsule_GetPointer(cap, CALL_CAPSULE);
    if (c == NULL)
        return NULL;
    c->fn(c->arg);
    Py_RETURN_NONE;
}

static PyMethodDef run_call_def = {"_casyncio_call", run_call, METH_NOARGS, NULL};

static PyObject *call_callable(ca_callback_fn fn, void *arg)
{
    call *c = PyMem_Malloc(sizeof *c);
    if (c == NULL)
        return PyErr_NoMemory();
    c->fn = fn;
    c->arg = arg;
    PyObject *cap = PyCapsule_New(c, CALL_CAPSULE, call_capsule_free);
    if (cap == NULL) {
        PyMem_Free(c);
        return NULL;
    }
    PyObject *f = PyCFunction_NewEx(&run_call_def, cap, NULL);
    Py_DECREF(cap);
    return f;
}

/* ---- bridges: a custom ca_loop per asyncio loop ----------------------------------------- */

typedef struct bridge {
    PyObject *pyloop; /* strong reference, dropped by destroy */
    /* The asyncio loop was seen closed by a Python thread (for good: a loop never reopens). */
    atomic_bool closed_seen;
} bridge;

static PyObject *bridge_pyloop(ca_loop *self)
{
    return ((bridge *)ca_loop_data(self))->pyloop;
}

static int op_run_forever(ca_loop *self)
{
    return -ENOTSUP; /* asyncio runs the loop; the core never needs to */
}

static double op_time(ca_loop *self)
{
    PyGILState_STATE st;
    double t = NAN;
    if (gil_enter(&st)) {
        PyObject *r = PyObject_CallMethod(bridge_pyloop(self), "time", NULL);
        if (r != NULL) {
            t = PyFloat_AsDouble(r);
            Py_DECREF(r);
        }
        if (PyErr_Occurred()) {
            PyErr_Clear();
            t = NAN;
        }
        PyGILState_Release(st);
    }
    if (isnan(t)) { /* asyncio's time() is time.monotonic() */
        struct timespec ts;
        clock_gettime(CLOCK_MONOTONIC, &ts);
        t = (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
    }
    return t;
}

/* Calls pyloop.<method>(*args) and gives 0, or a negative errno. Steals args (NULL: the
 * error that made it NULL). */
static int call_loop(ca_loop *self, const char *method, PyObject *args)
{
    PyObject *pyloop = bridge_pyloop(self);
    if (args == NULL)
        return loop_error(pyloop);
    PyObject *m = PyObject_GetAttrString(pyloop, method);
    PyObject *r = m == NULL ? NULL : PyObject_Call(m, args, NULL);
    Py_XDECREF(m);
    Py_DECREF(args);
    if (r == NULL)
        return loop_error(pyloop);
    Py_DECREF(r);
    return 0;
}

/* (x..., fnobj) as an argument tuple; steals fnobj. */
static PyObject *args_with(PyObject *fnobj, const char *fmt, ...)
{
    if (fnobj == NULL)
        return NULL;
    va_list ap;
    va_start(ap, fmt);
    PyObject *head = Py_VaBuildValue(fmt, ap);
    va_end(ap);
    PyObject *args = NULL;
    if (head != NULL) {
        Py_ssize_t n = PyTuple_GET_SIZE(head);
        args = PyTuple_New(n + 1);
        for (Py_ssize_t i = 0; args != NULL && i < n; i++) {
            Py_INCREF(PyTuple_GET_ITEM(head, i));
            PyTuple_SET_ITEM(args, i, PyTuple_GET_ITEM(head, i));
        }
        if (args != NULL) {
            Py_INCREF(fnobj);
            PyTuple_SET_ITEM(args, n, fnobj);
        }
        Py_DECREF(head);
    }
    Py_DECREF(fnobj);
    return args;
}

static int op_call_soon(ca_loop *self, ca_handle *h)
{
    PyGILState_STATE st;
    if (!gil_enter(&st))
        return -EBADF;
    int err = call_loop(self, "call_soon", args_with(handle_callable(h), "()"));
    PyGILState_Release(st);
    return err;
}

static int op_call_at(ca_loop *self, double when, ca_handle *h)
{
    PyGILState_STATE st;
    if (!gil_enter(&st))
        return -EBADF;
    int err = call_loop(self, "call_at", args_with(handle_callable(h), "(d)", when));
    PyGILState_Release(st);
    return err;
}

static int op_add_reader(ca_loop *self, int fd, ca_callback_fn fn, void *arg)
{
    PyGILState_STATE st;
    if (!gil_enter(&st))
        return -EBADF;
    int err = call_loop(self, "add_reader", args_with(call_callable(fn, arg), "(i)", fd));
    PyGILState_Release(st);
    return err;
}

/* remove_reader and remove_signal_handler: 1 if asyncio removed one, 0 if not (or on error:
 * a closed or dying loop has nothing left to remove). */
static int remove_call(ca_loop *self, const char *method, int n)
{
    PyGILState_STATE st;
    if (!gil_enter(&st))
        return 0;
    PyObject *r = PyObject_CallMethod(bridge_pyloop(self), method, "i", n);
    int ret = 0;
    if (r == NULL)
        PyErr_Clear();
    else {
        ret = PyObject_IsTrue(r) == 1;
        Py_DECREF(r);
    }
    PyErr_Clear();
    PyGILState_Release(st);
    return ret;
}

static int op_remove_reader(ca_loop *self, int fd)
{
    return remove_call(self, "remove_reader", fd);
}

static int op_add_signal_handler(ca_loop *self, int sig, ca_callback_fn fn, void *arg)
{
    PyGILState_STATE st;
    if (!gil_enter(&st))
        return -EBADF;
    int err = call_loop(self, "add_signal_handler",
                        args_with(call_callable(fn, arg), "(i)", sig));
    PyGILState_Release(st);
    return err;
}

static int op_remove_signal_handler(ca_loop *self, int sig)
{
    return remove_call(self, "remove_signal_handler", sig);
}

static bool op_is_closed(ca_loop *self)
{
    bridge *b = ca_loop_data(self);
    if (atomic_load(&g_shutdown) || interpreter_finalizing())
        return true; /* the interpreter is going away: so is every asyncio loop */
    /* Asked by a thread of the library's own (Threaded's waiting thread, MultiLoop's reaper),
     * which posts an exit: taking the GIL there would make and drop a Python thread state on
     * every exit and hand the GIL over twice (measured: about 80 us of CPU per child with
     * MultiLoop). The answer a Python thread saw last serves. Asking at the moment of the post
     * is racy anyway (the loop may be closed right after it), and an exit posted to a loop
     * closed since is dropped with its bridge (the core's close hooks). */
    if (PyGILState_GetThisThreadState() == NULL)
        return atomic_load(&b->closed_seen);
    PyGILState_STATE st;
    if (!gil_enter(&st))
        return true;
    PyObject *r = PyObject_CallMethod(b->pyloop, "is_closed", NULL);
    bool closed = false;
    if (r == NULL)
        PyErr_Clear();
    else {
        closed = PyObject_IsTrue(r) == 1;
        Py_DECREF(r);
    }
    PyErr_Clear();
    PyGILState_Release(st);
    if (closed)
        atomic_store(&b->closed_seen, true);
    return closed;
}

static void op_destroy(ca_loop *self)
{
    bridge *b = ca_loop_data(self);
    PyGILState_STATE st;
    /* At interpreter exit the asyncio loop is not ours to release any more: leak it. */
    if (gil_enter(&st)) {
        Py_DECREF(b->pyloop);
        PyGILState_Release(st);
    }
    PyMem_RawFree(b);
}

/* call_soon_threadsafe is NULL: the core's own thread-safe queue is used, whose fd the bridge
 * watches (see bridge_new). */
static const ca_loop_ops bridge_ops = {
    .run_forever = op_run_forever,
    .time = op_time,
    .call_soon = op_call_soon,
    .call_at = op_call_at,
    .add_reader = op_add_reader,
    .remove_reader = op_remove_reader,
    .add_signal_handler = op_add_signal_handler,
    .remove_signal_handler = op_remove_signal_handler,
    .is_closed = op_is_closed,
    .destroy = op_destroy,
};

static void bridge_capsule_free(PyObject *cap)
{
    ca_loop *loop = PyCapsule_GetPointer(cap, BRIDGE_CAPSULE);
    ca_loop_close(loop);
    ca_loop_unref(loop);
}

static PyObject *bridge_capsule(ca_loop *loop)
{
    PyObject *cap = PyCapsule_New(ca_loop_ref(loop), BRIDGE_CAPSULE, NULL);
    if (cap == NULL)
        ca_loop_unref(loop);
    return cap;
}

static void bridge_ref_free(PyObject *cap)
{
    ca_loop_unref(PyCapsule_GetPointer(cap, BRIDGE_CAPSULE));
}

/* The reader of the core's thread-safe queue: runs what library threads posted (the exits
 * Threaded and MultiLoop reaped), on the asyncio loop's thread. */
static PyObject *drain(PyObject *cap, PyObject *unused)
{
    ca_loop *loop = PyCapsule_GetPointer(cap, BRIDGE_CAPSULE);
    if (loop == NULL)
        return NULL;
    ca_loop_run_threadsafe(loop);
    Py_RETURN_NONE;
}

static PyMethodDef drain_def = {"_casyncio_drain", drain, METH_NOARGS, NULL};

static int set_error(int err);

/* Drops the bridges of closed asyncio loops. */
static int prune_bridges(void)
{
    PyObject *items = PyDict_Items(g_bridges);
    if (items == NULL)
        return -1;
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(items); i++) {
        PyObject *pyloop = PyTuple_GET_ITEM(PyList_GET_ITEM(items, i), 0);
        PyObject *r = PyObject_CallMethod(pyloop, "is_closed", NULL);
        if (r == NULL) {
            PyErr_Clear();
            continue;
        }
        int closed = PyObject_IsTrue(r);
        Py_DECREF(r);
        if (closed == 1 && PyDict_DelItem(g_bridges, pyloop) < 0)
            PyErr_Clear();
    }
    Py_DECREF(items);
    return 0;
}

/* The bridge of an asyncio loop, made on first use (borrowed: the registry keeps it until the
 * asyncio loop is closed). NULL with an exception set on failure. */
static ca_loop *bridge_for(PyObject *pyloop)
{
    PyObject *cap = PyDict_GetItemWithError(g_bridges, pyloop);
    if (cap != NULL)
        return PyCapsule_GetPointer(cap, BRIDGE_CAPSULE);
    if (PyErr_Occurred() || prune_bridges() < 0)
        return NULL;

    bridge *b = PyMem_RawMalloc(sizeof *b);
    if (b == NULL) {
        PyErr_NoMemory();
        return NULL;
    }
    Py_INCREF(pyloop);
    b->pyloop = pyloop;
    atomic_init(&b->closed_seen, false);
    ca_loop *loop;
    int err = ca_loop_new_custom(&bridge_ops, b, &loop);
    if (err < 0) {
        Py_DECREF(pyloop);
        PyMem_RawFree(b);
        set_error(err);
        return NULL;
    }
    /* From here the loop owns b (op_destroy frees it). */
    PyObject *reg = PyCapsule_New(loop, BRIDGE_CAPSULE, bridge_capsule_free);
    if (reg == NULL) {
        ca_loop_unref(loop);
        return NULL;
    }
    int fd = ca_loop_threadsafe_fd(loop);
    if (fd < 0) {
        Py_DECREF(reg);
        set_error(fd);
        return NULL;
    }
    PyObject *dcap = bridge_capsule(loop);
    if (dcap == NULL || PyCapsule_SetDestructor(dcap, bridge_ref_free) < 0) {
        Py_XDECREF(dcap);
        Py_DECREF(reg);
        return NULL;
    }
    PyObject *d = PyCFunction_NewEx(&drain_def, dcap, NULL);
    Py_DECREF(dcap);
    PyObject *r = d == NULL ? NULL : PyObject_CallMethod(pyloop, "add_reader", "iO", fd, d);
    Py_XDECREF(d);
    if (r == NULL) {
        Py_DECREF(reg);
        return NULL;
    }
    Py_DECREF(r);
    if (PyDict_SetItem(g_bridges, pyloop, reg) < 0) {
        PyObject *rr = PyObject_CallMethod(pyloop, "remove_reader", "i", fd);
        Py_XDECREF(rr);
        Py_DECREF(reg);
        return NULL;
    }
    Py_DECREF(reg);
    return loop;
}

/* ---- errors ------------------------------------------------------------------------------ */

/* Raises the Python exception for a library error: RuntimeError for the state errors asyncio
 * reports that way (closed, not active, no loop, wrong thread), MemoryError, else OSError. */
static int set_error(int err)
{
    switch (err) {
    case -ENOMEM:
        PyErr_NoMemory();
        break;
    case -EBADF:
    case -ENOTCONN:
    case -ENOENT:
    case -EPERM:
    case -ECHILD:
    case -ENOTSUP:
        PyErr_Format(PyExc_RuntimeError, "casyncio: %s", ca_strerror(err));
        break;
    default:
        errno = -err;
        PyErr_SetFromErrno(PyExc_OSError);
        break;
    }
    return -1;
}

/* ---- child watchers --------------------------------------------------------------------- */

enum { KIND_THREADED, KIND_MULTILOOP, KIND_SAFE, KIND_FAST, KIND_PIDFD, KIND_COUNT };

typedef struct {
    PyObject_HEAD
    ca_child_watcher *w;
} CWatcher;

/* The exit of a child: runs casyncio._dispatch(token, pid, returncode), on the delivery
 * loop's thread (from an asyncio callback: the GIL is normally held already). */
static void deliver(pid_t pid, int returncode, void *arg)
{
    PyGILState_STATE st;
    if (!gil_enter(&st))
        return;
    PyObject *r = PyObject_CallFunction(g_dispatch, "Kii", (unsigned long long)(uintptr_t)arg,
                                        (int)pid, returncode);
    if (r == NULL)
        PyErr_WriteUnraisable(g_dispatch);
    Py_XDECREF(r);
    PyGILState_Release(st);
}

static PyObject *cwatcher_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    int kind;
    if (!PyArg_ParseTuple(args, "i", &kind))
        return NULL;
    if (kind < 0 || kind >= KIND_COUNT)
        return PyErr_Format(PyExc_ValueError, "unknown watcher kind %d", kind);
    CWatcher *self = (CWatcher *)type->tp_alloc(type, 0);
    if (self == NULL)
        return NULL;
    int err;
    Py_BEGIN_ALLOW_THREADS
    switch (kind) {
    case KIND_THREADED: err = ca_threaded_child_watcher_new(&self->w); break;
    case KIND_MULTILOOP: err = ca_multiloop_child_watcher_new(&self->w); break;
    case KIND_SAFE: err = ca_safe_child_watcher_new(&self->w); break;
    case KIND_FAST: err = ca_fast_child_watcher_new(&self->w); break;
    default: err = ca_pidfd_child_watcher_new(&self->w); break;
    }
    Py_END_ALLOW_THREADS
    if (err < 0) {
        self->w = NULL;
        Py_DECREF(self);
        set_error(err);
        return NULL;
    }
    return (PyObject *)self;
}

static void cwatcher_dealloc(CWatcher *self)
{
    ca_child_watcher *w = self->w;
    self->w = NULL;
    if (w != NULL) {
        Py_BEGIN_ALLOW_THREADS
        ca_child_watcher_unref(w);
        Py_END_ALLOW_THREADS
    }
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* add(pid, loop, token): loop is the asyncio delivery loop, or None for the watcher's own rule
 * (Safe and Fast: the attached loop). */
static PyObject *cwatcher_add(CWatcher *self, PyObject *args)
{
    int pid;
    PyObject *pyloop;
    unsigned long long token;
    if (!PyArg_ParseTuple(args, "iOK", &pid, &pyloop, &token))
        return NULL;
    ca_loop *loop = NULL;
    if (pyloop != Py_None && (loop = bridge_for(pyloop)) == NULL)
        return NULL;
    ca_loop_ref(loop);
    int err;
    Py_BEGIN_ALLOW_THREADS
    err = ca_child_watcher_add_child_handler_on(self->w, loop, (pid_t)pid, deliver,
                                                (void *)(uintptr_t)token);
    ca_loop_unref(loop);
    Py_END_ALLOW_THREADS
    if (err < 0)
        return set_error(err), NULL;
    Py_RETURN_NONE;
}

static PyObject *cwatcher_remove(CWatcher *self, PyObject *args)
{
    int pid, r;
    if (!PyArg_ParseTuple(args, "i", &pid))
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    r = ca_child_watcher_remove_child_handler(self->w, (pid_t)pid);
    Py_END_ALLOW_THREADS
    if (r < 0)
        return set_error(r), NULL;
    return PyBool_FromLong(r);
}

static PyObject *cwatcher_attach(CWatcher *self, PyObject *pyloop)
{
    ca_loop *loop = NULL;
    if (pyloop != Py_None && (loop = bridge_for(pyloop)) == NULL)
        return NULL;
    ca_loop_ref(loop);
    int err;
    Py_BEGIN_ALLOW_THREADS
    err = ca_child_watcher_attach_loop(self->w, loop);
    ca_loop_unref(loop);
    Py_END_ALLOW_THREADS
    if (err < 0)
        return set_error(err), NULL;
    Py_RETURN_NONE;
}

static PyObject *cwatcher_is_active(CWatcher *self, PyObject *unused)
{
    bool active;
    Py_BEGIN_ALLOW_THREADS
    active = ca_child_watcher_is_active(self->w);
    Py_END_ALLOW_THREADS
    return PyBool_FromLong(active);
}

static PyObject *simple_call(CWatcher *self, int (*fn)(ca_child_watcher *))
{
    int err;
    Py_BEGIN_ALLOW_THREADS
    err = fn(self->w);
    Py_END_ALLOW_THREADS
    if (err < 0)
        return set_error(err), NULL;
    Py_RETURN_NONE;
}

static PyObject *cwatcher_close(CWatcher *self, PyObject *unused)
{
    return simple_call(self, ca_child_watcher_close);
}

static PyObject *cwatcher_enter(CWatcher *self, PyObject *unused)
{
    return simple_call(self, ca_child_watcher_enter);
}

static PyObject *cwatcher_exit(CWatcher *self, PyObject *unused)
{
    return simple_call(self, ca_child_watcher_exit);
}

static PyMethodDef cwatcher_methods[] = {
    {"add", (PyCFunction)(void (*)(void))cwatcher_add, METH_VARARGS, NULL},
    {"remove", (PyCFunction)(void (*)(void))cwatcher_remove, METH_VARARGS, NULL},
    {"attach", (PyCFunction)(void (*)(void))cwatcher_attach, METH_O, NULL},
    {"is_active", (PyCFunction)(void (*)(void))cwatcher_is_active, METH_NOARGS, NULL},
    {"close", (PyCFunction)(void (*)(void))cwatcher_close, METH_NOARGS, NULL},
    {"enter", (PyCFunction)(void (*)(void))cwatcher_enter, METH_NOARGS, NULL},
    {"exit", (PyCFunction)(void (*)(void))cwatcher_exit, METH_NOARGS, NULL},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject CWatcher_Type = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "casyncio._casyncio.CWatcher",
    .tp_basicsize = sizeof(CWatcher),
    .tp_dealloc = (destructor)cwatcher_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "A C child watcher (casyncio's Python classes wrap it).",
    .tp_methods = cwatcher_methods,
    .tp_new = cwatcher_new,
};

/* ---- logging -------------------------------------------------------------------------- */

/* The library's warnings, from any thread (never with a library lock held): they go to
 * casyncio._log, which hands them to logging.getLogger("asyncio"). */
static void log_handler(int level, const char *msg, void *arg)
{
    PyGILState_STATE st;
    if (!gil_enter(&st))
        return;
    PyObject *r = PyObject_CallFunction(g_log, "is", level, msg);
    if (r == NULL)
        PyErr_Clear();
    Py_XDECREF(r);
    PyGILState_Release(st);
}

/* ---- module functions ------------------------------------------------------------------- */

static PyObject *mod_setup(PyObject *mod, PyObject *args)
{
    PyObject *dispatch, *log;
    if (!PyArg_ParseTuple(args, "OO", &dispatch, &log))
        return NULL;
    PyObject *old_dispatch = g_dispatch, *old_log = g_log;
    Py_INCREF(dispatch);
    g_dispatch = dispatch;
    Py_INCREF(log);
    g_log = log;
    Py_XDECREF(old_dispatch);
    Py_XDECREF(old_log);
    ca_set_log_handler(log_handler, NULL);
    Py_RETURN_NONE;
}

/* atexit: from now on library threads do not take the GIL (no more logging through Python,
 * no more asyncio calls from them). Exits already reaped are still queued for their loops. */
static PyObject *mod_shutdown(PyObject *mod, PyObject *unused)
{
    atomic_store(&g_shutdown, 1);
    ca_set_log_handler(NULL, NULL);
    Py_RETURN_NONE;
}

/* In a child made by fork(): the parent's bridges are the parent's (the library answers
 * -ECHILD for them); forget them, which frees their memory only. */
static PyObject *mod_after_fork_child(PyObject *mod, PyObject *unused)
{
    PyDict_Clear(g_bridges);
    Py_RETURN_NONE;
}

static PyObject *mod_sigchld_notify(PyObject *mod, PyObject *unused)
{
    ca_sigchld_notify();
    Py_RETURN_NONE;
}

static PyObject *mod_bridge_count(PyObject *mod, PyObject *unused)
{
    return PyLong_FromSsize_t(PyDict_Size(g_bridges));
}

static PyMethodDef mod_methods[] = {
    {"_setup", mod_setup, METH_VARARGS, NULL},
    {"_shutdown", mod_shutdown, METH_NOARGS, NULL},
    {"_after_fork_child", mod_after_fork_child, METH_NOARGS, NULL},
    {"sigchld_notify", mod_sigchld_notify, METH_NOARGS,
     "Tells the watchers that SIGCHLD arrived (for code that owns SIGCHLD's disposition)."},
    {"_bridge_count", mod_bridge_count, METH_NOARGS, NULL},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef moddef = {
    PyModuleDef_HEAD_INIT,
    .m_name = "casyncio._casyncio",
    .m_doc = "casyncio's C child watchers (use the casyncio package).",
    .m_size = -1,
    .m_methods = mod_methods,
};

PyMODINIT_FUNC PyInit__casyncio(void);

PyMODINIT_FUNC PyInit__casyncio(void)
{
    if (PyType_Ready(&CWatcher_Type) < 0)
        return NULL;
    if (g_bridges == NULL && (g_bridges = PyDict_New()) == NULL)
        return NULL;
    PyObject *m = PyModule_Create(&moddef);
    if (m == NULL)
        return NULL;
    /* PyModule_AddObjectRef (3.10+) does not steal; PyModule_AddObject, soft-deprecated since,
     * steals only on success. */
#if PY_VERSION_HEX >= 0x030A0000
    int added = PyModule_AddObjectRef(m, "CWatcher", (PyObject *)&CWatcher_Type);
#else
    Py_INCREF(&CWatcher_Type);
    int added = PyModule_AddObject(m, "CWatcher", (PyObject *)&CWatcher_Type);
    if (added < 0)
        Py_DECREF(&CWatcher_Type);
#endif
    if (added < 0 ||
        PyModule_AddIntConstant(m, "THREADED", KIND_THREADED) < 0 ||
        PyModule_AddIntConstant(m, "MULTILOOP", KIND_MULTILOOP) < 0 ||
        PyModule_AddIntConstant(m, "SAFE", KIND_SAFE) < 0 ||
        PyModule_AddIntConstant(m, "FAST", KIND_FAST) < 0 ||
        PyModule_AddIntConstant(m, "PIDFD", KIND_PIDFD) < 0 ||
        PyModule_AddStringConstant(m, "LIBRARY_VERSION", ca_version()) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
