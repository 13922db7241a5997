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
 * the GIL; they take it with PyGILState_Ensure. A call into the library that may wait for
 * another thread (close and the last unref join MultiLoop's reaping thread; attach may wait
 * for a reap in progress) is made with the GIL released: that thread may need the GIL, to run
 * an op or to log. The calls made for every child (add, remove, is_active) keep the GIL: the
 * library waits in them only for its own locks, which it never holds while it calls an op or
 * the log handler (its rule, in casyncio.h), so no thread that holds one of them waits for the
 * GIL; and each op they call (is_closed, add_reader...) then costs no GIL hand-over.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>

#include <casyncio.h>

#include <errno.h>
#include <limits.h>
#include <math.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <time.h>

static PyObject *g_log;       /* casyncio._log(level, message) */
static PyObject *g_bridges;   /* dict: asyncio loop -> capsule holding its bridge (ca_loop) */
static atomic_int g_shutdown; /* set at interpreter exit: foreign threads no longer take the GIL */

static const char BRIDGE_CAPSULE[] = "casyncio.bridge";

/* Method and attribute names, interned once (module init): a call per child looks them up
 * without making a string each time. */
static PyObject *s_add_reader, *s_remove_reader, *s__add_reader, *s__remove_reader,
    *s_is_closed, *s__closed, *s_call_soon, *s_call_at, *s_time, *s_add_signal_handler,
    *s_remove_signal_handler;

/* asyncio's own functions, for the shortcuts of bridge_new: BaseSelectorEventLoop.add_reader
 * and remove_reader, BaseEventLoop.is_closed (NULL: no shortcut). */
static PyObject *g_sel_add_reader, *g_sel_remove_reader, *g_base_is_closed;

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

/* ---- the exception being raised, taken and given back ---------------------------------- */

/* Takes the exception being raised: the exception object, with its traceback; NULL if none. */
static PyObject *exc_take(void)
{
#if PY_VERSION_HEX >= 0x030C0000
    return PyErr_GetRaisedException();
#else
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    PyErr_NormalizeException(&type, &value, &tb);
    if (tb != NULL && value != NULL)
        PyException_SetTraceback(value, tb);
    Py_XDECREF(type);
    Py_XDECREF(tb);
    return value;
#endif
}

/* Raises exc (taken by exc_take; stolen) again. */
static void exc_give(PyObject *exc)
{
#if PY_VERSION_HEX >= 0x030C0000
    PyErr_SetRaisedException(exc);
#else
    if (exc == NULL)
        return;
    PyObject *type = (PyObject *)Py_TYPE(exc);
    Py_INCREF(type);
    PyErr_Restore(type, exc, PyException_GetTraceback(exc));
#endif
}

/* ---- calls on Python objects ------------------------------------------------------------ */

/* obj.<name>(*args), nargs <= 3; a new reference, or NULL with an exception set. */
static PyObject *call_method(PyObject *obj, PyObject *name, PyObject *const *args, size_t nargs)
{
#if PY_VERSION_HEX >= 0x03090000
    PyObject *stack[4] = {obj};
    for (size_t i = 0; i < nargs; i++)
        stack[i + 1] = args[i];
    return PyObject_VectorcallMethod(name, stack, nargs + 1, NULL);
#else
    PyObject *m = PyObject_GetAttr(obj, name);
    if (m == NULL)
        return NULL;
    PyObject *r = _PyObject_Vectorcall(m, args, nargs, NULL);
    Py_DECREF(m);
    return r;
#endif
}

static PyObject *call_function(PyObject *fn, PyObject *const *args, size_t nargs)
{
#if PY_VERSION_HEX >= 0x03090000
    return PyObject_Vectorcall(fn, args, nargs, NULL);
#else
    return _PyObject_Vectorcall(fn, args, nargs, NULL);
#endif
}

/* ---- C callables handed to asyncio ------------------------------------------------------ */

/* A callable asyncio runs for the core: a core handle (call_soon, call_at: running a
 * cancelled handle does nothing), or fn(arg) (readers and signal handlers). One object, one
 * allocation: one is made per watched child (its reader). A handle's reference is the
 * object's. */
typedef struct {
    PyObject_HEAD
    ca_handle *h;
    ca_callback_fn fn;
    void *arg;
} CCall;

static PyObject *ccall_call(PyObject *o, PyObject *args, PyObject *kwds)
{
    CCall *c = (CCall *)o;
    if (c->h != NULL)
        ca_handle_run(c->h);
    else
        c->fn(c->arg);
    Py_RETURN_NONE;
}

static void ccall_dealloc(PyObject *o)
{
    CCall *c = (CCall *)o;
    if (c->h != NULL)
        ca_handle_unref(c->h);
    Py_TYPE(o)->tp_free(o);
}

static PyTypeObject CCall_Type = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "casyncio._casyncio.CCall",
    .tp_basicsize = sizeof(CCall),
    .tp_dealloc = ccall_dealloc,
    .tp_call = ccall_call,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "A callback of the C library, for asyncio to run.",
};

static PyObject *ccall_new(ca_handle *h, ca_callback_fn fn, void *arg)
{
    CCall *c = PyObject_New(CCall, &CCall_Type);
    if (c == NULL)
        return NULL;
    c->h = h != NULL ? ca_handle_ref(h) : NULL;
    c->fn = fn;
    c->arg = arg;
    return (PyObject *)c;
}

/* ---- bridges: a custom ca_loop per asyncio loop ----------------------------------------- */

typedef struct bridge {
    PyObject *pyloop; /* strong reference, dropped by destroy */
    /* The asyncio loop was seen closed by a Python thread (for good: a loop never reopens). */
    atomic_bool closed_seen;
} bridge;

static bridge *bridge_of(ca_loop *self)
{
    return ca_loop_data(self);
}

/* Whether m, pyloop's attribute, is asyncio's function fn bound to pyloop (not a subclass's or
 * the instance's replacement). */
static bool is_asyncio_method(PyObject *m, PyObject *pyloop, PyObject *fn)
{
    return fn != NULL && PyMethod_Check(m) && PyMethod_GET_FUNCTION(m) == fn &&
           PyMethod_GET_SELF(m) == pyloop;
}

/* pyloop.<name>(*args), nargs <= 2. Shortcuts, for a loop whose method is asyncio's own
 * (looked up at each call: a subclass's or the instance's replacement is always called):
 * BaseSelectorEventLoop's add_reader and remove_reader add to _add_reader and _remove_reader
 * only a check that the fd is no transport's (a pidfd or our queue's eventfd never is: they
 * are open, and ours), and BaseEventLoop's is_closed returns _closed. asyncio's own watchers
 * call _add_reader and _remove_reader too. A new reference, or NULL with an exception set. */
static PyObject *call_loop_method(PyObject *pyloop, PyObject *name, PyObject *const *args,
                                  size_t nargs)
{
    PyObject *m = PyObject_GetAttr(pyloop, name);
    if (m == NULL)
        return NULL;
    PyObject *r;
    if (name == s_add_reader && is_asyncio_method(m, pyloop, g_sel_add_reader))
        r = call_method(pyloop, s__add_reader, args, nargs);
    else if (name == s_remove_reader && is_asyncio_method(m, pyloop, g_sel_remove_reader))
        r = call_method(pyloop, s__remove_reader, args, nargs);
    else if (name == s_is_closed && is_asyncio_method(m, pyloop, g_base_is_closed))
        r = PyObject_GetAttr(pyloop, s__closed);
    else
        r = call_function(m, args, nargs);
    Py_DECREF(m);
    return r;
}

/* The asyncio loop's is_closed(), or -1 with an exception set. GIL held. */
static int loop_is_closed(bridge *b)
{
    PyObject *r = call_loop_method(b->pyloop, s_is_closed, NULL, 0);
    if (r == NULL)
        return -1;
    int closed = PyObject_IsTrue(r);
    Py_DECREF(r);
    if (closed == 1)
        atomic_store(&b->closed_seen, true);
    return closed;
}

/* Maps the Python exception being raised by a call on an asyncio loop to a negative errno for
 * the library, and clears it (the library reports the error code; the loop's own exception
 * would be noise). A closed loop is -EBADF whatever the loop raised. */
static int loop_error(bridge *b)
{
    int err = -EINVAL;
    if (PyErr_ExceptionMatches(PyExc_MemoryError))
        err = -ENOMEM;
    else if (PyErr_ExceptionMatches(PyExc_RuntimeError) ||
             PyErr_ExceptionMatches(PyExc_ValueError))
        err = -EPERM; /* e.g. add_signal_handler outside the main thread */
    PyErr_Clear();
    if (loop_is_closed(b) == 1)
        err = -EBADF;
    PyErr_Clear();
    return err;
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
        PyObject *r = call_loop_method(bridge_of(self)->pyloop, s_time, NULL, 0);
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

/* The leading argument of an add_call: none, an int (fd, signal), or a time. */
typedef enum { ARG_NONE, ARG_INT, ARG_TIME } arg_kind;

/* pyloop.<name>([first,] fn), fn a CCall made here (of h, or of fn(arg)); 0 or a negative
 * errno. Takes the GIL. */
static int add_call(ca_loop *self, PyObject *name, arg_kind kind, int n, double when,
                    ca_handle *h, ca_callback_fn fn, void *arg)
{
    bridge *b = bridge_of(self);
    PyGILState_STATE st;
    if (!gil_enter(&st))
        return -EBADF;
    int err = 0;
    PyObject *first = kind == ARG_INT    ? PyLong_FromLong(n)
                      : kind == ARG_TIME ? PyFloat_FromDouble(when)
                                         : NULL;
    PyObject *f = ccall_new(h, fn, arg);
    if (f == NULL || (kind != ARG_NONE && first == NULL)) {
        err = loop_error(b);
    } else {
        PyObject *args[2] = {first, f};
        PyObject *r = first != NULL ? call_loop_method(b->pyloop, name, args, 2)
                                    : call_loop_method(b->pyloop, name, args + 1, 1);
        if (r == NULL)
            err = loop_error(b);
        Py_XDECREF(r);
    }
    Py_XDECREF(f);
    Py_XDECREF(first);
    PyGILState_Release(st);
    return err;
}

static int op_call_soon(ca_loop *self, ca_handle *h)
{
    return add_call(self, s_call_soon, ARG_NONE, 0, 0, h, NULL, NULL);
}

static int op_call_at(ca_loop *self, double when, ca_handle *h)
{
    return add_call(self, s_call_at, ARG_TIME, 0, when, h, NULL, NULL);
}

static int op_add_reader(ca_loop *self, int fd, ca_callback_fn fn, void *arg)
{
    return add_call(self, s_add_reader, ARG_INT, fd, 0, NULL, fn, arg);
}

/* remove_reader and remove_signal_handler: 1 if asyncio removed one, 0 if not (or on error:
 * a closed or dying loop has nothing left to remove). */
static int remove_call(ca_loop *self, PyObject *name, int n)
{
    PyGILState_STATE st;
    if (!gil_enter(&st))
        return 0;
    int ret = 0;
    PyObject *arg = PyLong_FromLong(n);
    PyObject *r = arg == NULL ? NULL : call_loop_method(bridge_of(self)->pyloop, name, &arg, 1);
    Py_XDECREF(arg);
    if (r != NULL) {
        ret = PyObject_IsTrue(r) == 1;
        Py_DECREF(r);
    }
    PyErr_Clear();
    PyGILState_Release(st);
    return ret;
}

static int op_remove_reader(ca_loop *self, int fd)
{
    return remove_call(self, s_remove_reader, fd);
}

static int op_add_signal_handler(ca_loop *self, int sig, ca_callback_fn fn, void *arg)
{
    return add_call(self, s_add_signal_handler, ARG_INT, sig, 0, NULL, fn, arg);
}

static int op_remove_signal_handler(ca_loop *self, int sig)
{
    return remove_call(self, s_remove_signal_handler, sig);
}

static bool op_is_closed(ca_loop *self)
{
    bridge *b = bridge_of(self);
    if (atomic_load(&b->closed_seen))
        return true;
    if (atomic_load(&g_shutdown) || interpreter_finalizing())
        return true; /* the interpreter is going away: so is every asyncio loop */
    /* Asked by a thread of the library's own (Threaded's waiting thread, MultiLoop's reaper),
     * which posts an exit: taking the GIL there would make and drop a Python thread state on
     * every exit and hand the GIL over twice (measured: about 80 us of CPU per child with
     * MultiLoop). The answer a Python thread saw last serves. Asking at the moment of the post
     * is racy anyway (the loop may be closed right after it), and an exit posted to a loop
     * closed since is dropped with its bridge (the core's close hooks). */
    if (PyGILState_GetThisThreadState() == NULL)
        return false;
    PyGILState_STATE st;
    if (!gil_enter(&st))
        return true;
    bool closed = loop_is_closed(b) == 1;
    PyErr_Clear();
    PyGILState_Release(st);
    return closed;
}

static void op_destroy(ca_loop *self)
{
    bridge *b = bridge_of(self);
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
        PyObject *r = call_loop_method(pyloop, s_is_closed, NULL, 0);
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

/* The watcher classes' C base, _casyncio.Watcher: casyncio's five classes derive from it (and
 * from asyncio.AbstractChildWatcher where asyncio has it). The calls made for every child
 * (add_child_handler, remove_child_handler, is_active, with) are its C methods, and an exit
 * is dispatched here too: no Python frame of ours per child.
 *
 * Registrations. The C watcher is given an integer token as the callback's argument, never a
 * pointer: g_regs maps token -> (watcher, loop, callback, args), and a watcher's pids map
 * pid -> token. A token that was removed, replaced or closed finds nothing in g_regs when (and
 * if) the C side reports it, so a late report does nothing and nothing is used after it was
 * freed. Everything here runs with the GIL, which guards both maps.
 *
 * fork(). _after_fork_child bumps g_fork_gen: a watcher made before it rebuilds its C watcher
 * (the parent's answers -ECHILD there) before its next use, and forgets the parent's children
 * and attached loop. */

/* An int argument of a fast call (pid); -1 with an exception set if it is none. */
static int int_arg(PyObject *o, int *out)
{
    long v = PyLong_AsLong(o);
    if (v == -1 && PyErr_Occurred())
        return -1;
    if (v < INT_MIN || v > INT_MAX) {
        PyErr_SetString(PyExc_OverflowError, "pid out of range");
        return -1;
    }
    *out = (int)v;
    return 0;
}

enum { KIND_THREADED, KIND_MULTILOOP, KIND_SAFE, KIND_FAST, KIND_PIDFD, KIND_COUNT };

typedef struct {
    PyObject_HEAD
    ca_child_watcher *w;
    int kind;
    bool implicit;    /* delivers to the caller's loop (Threaded, MultiLoop, Pidfd) */
    char closed;      /* _closed */
    unsigned gen;     /* g_fork_gen when w was made */
    PyObject *loop;   /* _loop: the attached asyncio loop, or None */
    PyObject *pids;   /* _pids: pid -> token */
} Watcher;

static PyObject *g_regs;          /* token -> (watcher, loop, callback, args) */
static unsigned long long g_token; /* the last token given */
static unsigned g_fork_gen;
static PyObject *g_get_running_loop; /* asyncio.events._get_running_loop */
static PyObject *g_current_loop;     /* casyncio._current_loop, given by _setup */
static PyObject *g_abstract_loop;    /* asyncio.AbstractEventLoop */

static int make_c_watcher(int kind, ca_child_watcher **out)
{
    int err;
    Py_BEGIN_ALLOW_THREADS
    switch (kind) {
    case KIND_THREADED: err = ca_threaded_child_watcher_new(out); break;
    case KIND_MULTILOOP: err = ca_multiloop_child_watcher_new(out); break;
    case KIND_SAFE: err = ca_safe_child_watcher_new(out); break;
    case KIND_FAST: err = ca_fast_child_watcher_new(out); break;
    default: err = ca_pidfd_child_watcher_new(out); break;
    }
    Py_END_ALLOW_THREADS
    return err < 0 ? set_error(err) : 0;
}

/* Drops a C watcher with the GIL released: the last reference joins MultiLoop's thread. */
static void drop_c_watcher(ca_child_watcher *w)
{
    if (w == NULL)
        return;
    Py_BEGIN_ALLOW_THREADS
    ca_child_watcher_unref(w);
    Py_END_ALLOW_THREADS
}

/* In a child of fork(): a new C watcher of the same kind; the parent's children and attached
 * loop are not ours. -1 with an exception set if it cannot be made (then tried again next
 * time). */
static int check_fork(Watcher *self)
{
    if (self->gen == g_fork_gen)
        return 0;
    PyDict_Clear(self->pids);
    Py_INCREF(Py_None);
    Py_SETREF(self->loop, Py_None);
    if (!self->closed) {
        ca_child_watcher *w;
        if (make_c_watcher(self->kind, &w) < 0)
            return -1;
        ca_child_watcher *old = self->w;
        self->w = w;
        drop_c_watcher(old);
    }
    self->gen = g_fork_gen;
    return 0;
}

/* An exception raised by a child's callback goes to loop.call_exception_handler (asyncio's
 * way); with no loop, or if that fails too, it is reported as unraisable. The exception is
 * set; cleared on return. */
static void report_callback_error(PyObject *loop, PyObject *callback, int pid)
{
    if (loop == Py_None || PyErr_ExceptionMatches(PyExc_SystemExit) ||
        PyErr_ExceptionMatches(PyExc_KeyboardInterrupt)) {
        PyErr_WriteUnraisable(callback);
        return;
    }
    PyObject *exc = exc_take();
    PyObject *ctx = Py_BuildValue("{s:N,s:O}", "message",
                                  PyUnicode_FromFormat(
                                      "Exception in child watcher callback for pid %d", pid),
                                  "exception", exc != NULL ? exc : Py_None);
    Py_XDECREF(exc);
    PyObject *r = ctx == NULL ? NULL : PyObject_CallMethod(loop, "call_exception_handler", "O",
                                                           ctx);
    Py_XDECREF(ctx);
    if (r == NULL)
        PyErr_WriteUnraisable(loop);
    Py_XDECREF(r);
}

/* The exit of a child: calls its callback(pid, returncode, *args) if its token is still
 * registered, on the delivery loop's thread (from an asyncio callback: the GIL is normally
 * held already). */
static void deliver(pid_t pid, int returncode, void *arg)
{
    PyGILState_STATE st;
    if (!gil_enter(&st))
        return;
    PyObject *tok = PyLong_FromUnsignedLongLong((unsigned long long)(uintptr_t)arg);
    PyObject *entry = tok == NULL ? NULL : PyDict_GetItemWithError(g_regs, tok);
    if (entry == NULL) {
        if (PyErr_Occurred())
            PyErr_WriteUnraisable(NULL);
        Py_XDECREF(tok);
        PyGILState_Release(st);
        return;
    }
    Py_INCREF(entry);
    if (PyDict_DelItem(g_regs, tok) < 0)
        PyErr_Clear();
    Watcher *w = (Watcher *)PyTuple_GET_ITEM(entry, 0);
    PyObject *loop = PyTuple_GET_ITEM(entry, 1);
    PyObject *callback = PyTuple_GET_ITEM(entry, 2);
    PyObject *args = PyTuple_GET_ITEM(entry, 3);
    PyObject *pidobj = PyLong_FromLong(pid);
    if (pidobj != NULL && w->pids != NULL) {
        PyObject *cur = PyDict_GetItemWithError(w->pids, pidobj);
        if (cur != NULL && PyObject_RichCompareBool(cur, tok, Py_EQ) == 1 &&
            PyDict_DelItem(w->pids, pidobj) < 0)
            PyErr_Clear();
        PyErr_Clear();
    }
    Py_ssize_t n = PyTuple_GET_SIZE(args);
    PyObject *small[8];
    PyObject **stack = n + 2 <= 8 ? small : PyMem_Malloc((size_t)(n + 2) * sizeof *stack);
    PyObject *rc = PyLong_FromLong(returncode);
    PyObject *r = NULL;
    if (stack == NULL)
        PyErr_NoMemory();
    else if (pidobj != NULL && rc != NULL) {
        stack[0] = pidobj;
        stack[1] = rc;
        for (Py_ssize_t i = 0; i < n; i++)
            stack[i + 2] = PyTuple_GET_ITEM(args, i);
        r = call_function(callback, stack, (size_t)n + 2);
    }
    if (stack != small)
        PyMem_Free(stack);
    if (r == NULL)
        report_callback_error(loop, callback, (int)pid);
    Py_XDECREF(r);
    Py_XDECREF(rc);
    Py_XDECREF(pidobj);
    Py_DECREF(entry);
    Py_DECREF(tok);
    PyGILState_Release(st);
}

static PyObject *watcher_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    if (PyTuple_GET_SIZE(args) != 0 || (kwds != NULL && PyDict_GET_SIZE(kwds) != 0))
        return PyErr_Format(PyExc_TypeError, "%s() takes no arguments", type->tp_name);
    PyObject *k = PyObject_GetAttrString((PyObject *)type, "_kind");
    long kind = k == NULL || !PyLong_Check(k) ? -1 : PyLong_AsLong(k);
    Py_XDECREF(k);
    PyErr_Clear();
    if (kind < 0 || kind >= KIND_COUNT)
        return PyErr_Format(PyExc_TypeError, "%s has no watcher kind", type->tp_name);
    Watcher *self = (Watcher *)type->tp_alloc(type, 0);
    if (self == NULL)
        return NULL;
    self->kind = (int)kind;
    self->implicit = kind != KIND_SAFE && kind != KIND_FAST;
    self->gen = g_fork_gen;
    Py_INCREF(Py_None);
    self->loop = Py_None;
    if ((self->pids = PyDict_New()) == NULL || make_c_watcher(self->kind, &self->w) < 0) {
        Py_DECREF(self);
        return NULL;
    }
    return (PyObject *)self;
}

static int watcher_traverse(Watcher *self, visitproc visit, void *arg)
{
    Py_VISIT(self->loop);
    Py_VISIT(self->pids);
    return 0;
}

static int watcher_clear(Watcher *self)
{
    Py_CLEAR(self->loop);
    Py_CLEAR(self->pids);
    return 0;
}

static void watcher_dealloc(Watcher *self)
{
    PyObject_GC_UnTrack(self);
    watcher_clear(self);
    ca_child_watcher *w = self->w;
    self->w = NULL;
    drop_c_watcher(w);
    /* A subclass's instance: subtype_dealloc drops the reference to its heap type. */
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* The delivery loop of an implicit add: the running loop, else the attached one, else the
 * thread's current loop (asyncio.get_event_loop()'s answer: casyncio._current_loop). running
 * is this thread's running loop or None (borrowed). */
static PyObject *implicit_loop(Watcher *self, PyObject *running)
{
    if (running != Py_None) {
        Py_INCREF(running);
        return running;
    }
    if (self->loop != Py_None) {
        Py_INCREF(self->loop);
        return self->loop;
    }
    return call_function(g_current_loop, NULL, 0);
}

/* add_child_handler(pid, callback, *args): callback(pid, returncode, *args) once, when child
 * pid exits; re-adding a pid replaces its callback. */
static PyObject *watcher_add(Watcher *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs < 2)
        return PyErr_Format(PyExc_TypeError,
                            "add_child_handler() takes at least 2 arguments (%zd given)", nargs);
    if (check_fork(self) < 0)
        return NULL;
    if (self->closed)
        return PyErr_Format(PyExc_RuntimeError, "%R is closed", self);
    PyObject *callback = args[1];
    if (!PyCallable_Check(callback))
        return PyErr_Format(PyExc_TypeError, "callback must be callable");
    int pid;
    if (int_arg(args[0], &pid) < 0)
        return NULL;
    PyObject *running = call_function(g_get_running_loop, NULL, 0);
    if (running == NULL)
        return NULL;
    PyObject *loop, *cloop;
    if (self->implicit) {
        if ((loop = implicit_loop(self, running)) == NULL) {
            Py_DECREF(running);
            return NULL;
        }
        cloop = loop;
    } else {
        loop = self->loop; /* Safe and Fast: the attached loop */
        Py_INCREF(loop);
        cloop = Py_None;
    }
    PyObject *cargs = PyTuple_New(nargs - 2);
    /* Our token, in a local: the Python code called below (a new bridge asks loops whether
     * they are closed) may let another thread add meanwhile. */
    unsigned long long token = ++g_token;
    PyObject *tok = PyLong_FromUnsignedLongLong(token);
    PyObject *pidobj = PyLong_FromLong(pid);
    PyObject *entry = NULL, *old = NULL;
    bool registered = false;
    int err = -1;
    if (cargs == NULL || tok == NULL || pidobj == NULL)
        goto out;
    for (Py_ssize_t i = 2; i < nargs; i++) {
        Py_INCREF(args[i]);
        PyTuple_SET_ITEM(cargs, i - 2, args[i]);
    }
    if ((entry = PyTuple_Pack(4, (PyObject *)self, loop, callback, cargs)) == NULL)
        goto out;
    old = PyDict_GetItemWithError(self->pids, pidobj);
    Py_XINCREF(old);
    if ((old == NULL && PyErr_Occurred()) || PyDict_SetItem(g_regs, tok, entry) < 0)
        goto out;
    registered = true;
    if (PyDict_SetItem(self->pids, pidobj, tok) < 0)
        goto out;
    if (old != NULL && PyDict_DelItem(g_regs, old) < 0)
        PyErr_Clear(); /* already delivered */
    ca_loop *bloop = NULL;
    if (cloop != Py_None && (bloop = bridge_for(cloop)) == NULL)
        goto out;
    /* The delivery loop runs in this thread (the common case: a coroutine spawns a child): its
     * bridge is marked running here for the call, so that an exit the add finds at once is
     * posted with the loop's call_soon, not through the bridge's thread-safe queue (a wakeup
     * of the loop and a read of its eventfd). */
    ca_loop *here = NULL;
    if (loop == running && loop != Py_None) {
        here = bloop != NULL ? bloop : bridge_for(loop);
        if (here == NULL)
            goto out;
        if (ca_loop_enter_running(here) < 0)
            here = NULL; /* another loop is marked running in this thread: the queue serves */
    }
    /* With the GIL held (see the top of the file): the bridge's ops this calls (is_closed,
     * add_reader) then cost no GIL hand-over each. */
    int e = ca_child_watcher_add_child_handler_on(self->w, bloop, (pid_t)pid, deliver,
                                                  (void *)(uintptr_t)token);
    if (here != NULL)
        ca_loop_exit_running(here);
    if (e < 0) {
        set_error(e);
        goto out;
    }
    err = 0;
out:
    if (err < 0 && registered) {
        PyObject *exc = exc_take();
        if (PyDict_GetItemWithError(g_regs, tok) != NULL && PyDict_DelItem(g_regs, tok) < 0)
            PyErr_Clear();
        if (PyDict_GetItemWithError(self->pids, pidobj) == tok &&
            PyDict_DelItem(self->pids, pidobj) < 0)
            PyErr_Clear();
        PyErr_Clear();
        exc_give(exc);
    }
    Py_XDECREF(old);
    Py_XDECREF(entry);
    Py_XDECREF(pidobj);
    Py_XDECREF(tok);
    Py_XDECREF(cargs);
    Py_DECREF(loop);
    Py_DECREF(running);
    if (err < 0)
        return NULL;
    Py_RETURN_NONE;
}

/* remove_child_handler(pid) -> True if a handler was removed (its callback is never called). */
static PyObject *watcher_remove(Watcher *self, PyObject *arg)
{
    int pid;
    if (int_arg(arg, &pid) < 0 || check_fork(self) < 0)
        return NULL;
    PyObject *pidobj = PyLong_FromLong(pid);
    if (pidobj == NULL)
        return NULL;
    PyObject *tok = PyDict_GetItemWithError(self->pids, pidobj);
    bool removed = false;
    if (tok != NULL) {
        Py_INCREF(tok);
        if (PyDict_DelItem(self->pids, pidobj) < 0)
            PyErr_Clear();
        PyObject *entry = PyDict_GetItemWithError(g_regs, tok);
        if (entry != NULL) {
            removed = true;
            if (PyDict_DelItem(g_regs, tok) < 0)
                PyErr_Clear();
        }
        Py_DECREF(tok);
    }
    Py_DECREF(pidobj);
    if (PyErr_Occurred())
        return NULL;
    if (!self->closed) {
        int r = ca_child_watcher_remove_child_handler(self->w, (pid_t)pid); /* GIL held */
        if (r < 0)
            return set_error(r), NULL;
    }
    return PyBool_FromLong(removed);
}

/* Threaded, MultiLoop and Pidfd: active until closed; Safe and Fast: attached to a loop that
 * is not closed (the C watcher's answer). */
static PyObject *watcher_is_active(Watcher *self, PyObject *unused)
{
    if (check_fork(self) < 0)
        return NULL;
    bool active = !self->closed && (self->implicit || ca_child_watcher_is_active(self->w));
    return PyBool_FromLong(active);
}

/* A call that may wait for a library thread (see the top of the file): the GIL is released. */
static PyObject *blocking_call(Watcher *self, int (*fn)(ca_child_watcher *))
{
    int err;
    Py_BEGIN_ALLOW_THREADS
    err = fn(self->w);
    Py_END_ALLOW_THREADS
    if (err < 0)
        return set_error(err), NULL;
    Py_RETURN_NONE;
}

/* with w: returns w. Only Fast's C watcher does something between enter and exit (keeps early
 * exit statuses), as only asyncio's Fast does. */
static PyObject *watcher_enter(Watcher *self, PyObject *unused)
{
    if (self->kind == KIND_FAST) {
        if (check_fork(self) < 0)
            return NULL;
        if (!self->closed) {
            PyObject *r = blocking_call(self, ca_child_watcher_enter);
            if (r == NULL)
                return NULL;
            Py_DECREF(r);
        }
    }
    Py_INCREF(self);
    return (PyObject *)self;
}

static PyObject *watcher_exit(Watcher *self, PyObject *args)
{
    if (self->kind == KIND_FAST && !self->closed && self->gen == g_fork_gen)
        return blocking_call(self, ca_child_watcher_exit);
    Py_RETURN_NONE;
}

/* attach_loop(loop): an asyncio loop or None. Safe and Fast watch SIGCHLD through it (the C
 * watcher's attach_loop); the others only remember it (their delivery loop outside a running
 * loop), as asyncio's do nothing. On a closed watcher it does nothing (CPython's tests close,
 * then detach). */
static PyObject *watcher_attach(Watcher *self, PyObject *pyloop)
{
    if (check_fork(self) < 0)
        return NULL;
    if (self->closed)
        Py_RETURN_NONE;
    if (pyloop != Py_None) {
        int ok = PyObject_IsInstance(pyloop, g_abstract_loop);
        if (ok < 0)
            return NULL;
        if (!ok)
            return PyErr_Format(PyExc_TypeError,
                                "an asyncio event loop or None is required, not %R", pyloop);
    }
    if (!self->implicit) {
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
    }
    Py_INCREF(pyloop);
    Py_SETREF(self->loop, pyloop);
    Py_RETURN_NONE;
}

/* close(): idempotent; forgets the registrations (no callback runs after it returns) and
 * closes the C watcher; children are not killed. */
static PyObject *watcher_close(Watcher *self, PyObject *unused)
{
    if (check_fork(self) < 0)
        return NULL;
    if (self->closed)
        Py_RETURN_NONE;
    self->closed = 1;
    PyObject *tok;
    Py_ssize_t pos = 0;
    while (PyDict_Next(self->pids, &pos, NULL, &tok))
        if (PyDict_DelItem(g_regs, tok) < 0)
            PyErr_Clear();
    PyDict_Clear(self->pids);
    Py_INCREF(Py_None);
    Py_SETREF(self->loop, Py_None);
    return blocking_call(self, ca_child_watcher_close);
}

static PyMethodDef watcher_methods[] = {
    {"add_child_handler", (PyCFunction)(void (*)(void))watcher_add, METH_FASTCALL,
     "add_child_handler(pid, callback, *args): callback(pid, returncode, *args) is called once, "
     "when child pid exits."},
    {"remove_child_handler", (PyCFunction)(void (*)(void))watcher_remove, METH_O,
     "remove_child_handler(pid) -> bool: True if a handler was removed (it is never called)."},
    {"is_active", (PyCFunction)(void (*)(void))watcher_is_active, METH_NOARGS,
     "Whether the watcher can report exits now."},
    {"__enter__", (PyCFunction)(void (*)(void))watcher_enter, METH_NOARGS, NULL},
    {"__exit__", (PyCFunction)(void (*)(void))watcher_exit, METH_VARARGS, NULL},
    {"attach_loop", (PyCFunction)(void (*)(void))watcher_attach, METH_O,
     "attach_loop(loop): Safe and Fast watch SIGCHLD through loop; the others remember it."},
    {"close", (PyCFunction)(void (*)(void))watcher_close, METH_NOARGS,
     "Idempotent; no callback runs after it returns; children are not killed."},
    {NULL, NULL, 0, NULL},
};

static PyObject *watcher_get_loop(Watcher *self, void *unused)
{
    Py_INCREF(self->loop);
    return self->loop;
}

static int watcher_set_loop(Watcher *self, PyObject *value, void *unused)
{
    if (value == NULL) {
        PyErr_SetString(PyExc_AttributeError, "_loop cannot be deleted");
        return -1;
    }
    Py_INCREF(value);
    Py_SETREF(self->loop, value);
    return 0;
}

static PyGetSetDef watcher_getset[] = {
    {"_loop", (getter)watcher_get_loop, (setter)watcher_set_loop,
     "The attached asyncio loop, or None.", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyMemberDef watcher_members[] = {
    {"_closed", T_BOOL, offsetof(Watcher, closed), READONLY, NULL},
    {"_pids", T_OBJECT_EX, offsetof(Watcher, pids), READONLY, NULL},
    {NULL, 0, 0, 0, NULL},
};

static PyTypeObject Watcher_Type = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "casyncio._casyncio.Watcher",
    .tp_basicsize = sizeof(Watcher),
    .tp_dealloc = (destructor)watcher_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "The C base of casyncio's watcher classes (a subclass names its kind in _kind).",
    .tp_traverse = (traverseproc)watcher_traverse,
    .tp_clear = (inquiry)watcher_clear,
    .tp_methods = watcher_methods,
    .tp_members = watcher_members,
    .tp_getset = watcher_getset,
    .tp_new = watcher_new,
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

/* _setup(log, current_loop): casyncio._log and casyncio._current_loop. */
static PyObject *mod_setup(PyObject *mod, PyObject *args)
{
    PyObject *log, *current;
    if (!PyArg_ParseTuple(args, "OO", &log, &current))
        return NULL;
    Py_INCREF(log);
    Py_XSETREF(g_log, log);
    Py_INCREF(current);
    Py_XSETREF(g_current_loop, current);
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

/* In a child made by fork(): the parent's bridges and registrations are the parent's (the
 * library answers -ECHILD for them); forget them, which frees their memory only. Every
 * watcher rebuilds its C watcher before its next use (check_fork). */
static PyObject *mod_after_fork_child(PyObject *mod, PyObject *unused)
{
    g_fork_gen++;
    PyDict_Clear(g_regs);
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

/* asyncio's function module.cls.name, a new reference; NULL (no exception) if it has none. */
static PyObject *asyncio_function(const char *module, const char *cls, PyObject *name)
{
    PyObject *mod = PyImport_ImportModule(module);
    PyObject *c = mod == NULL ? NULL : PyObject_GetAttrString(mod, cls);
    PyObject *f = c == NULL ? NULL : PyObject_GetAttr(c, name);
    Py_XDECREF(c);
    Py_XDECREF(mod);
    if (f != NULL && !PyFunction_Check(f))
        Py_CLEAR(f);
    PyErr_Clear();
    return f;
}

static int names_init(void)
{
    struct {
        PyObject **p;
        const char *s;
    } names[] = {
        {&s_add_reader, "add_reader"},
        {&s_remove_reader, "remove_reader"},
        {&s__add_reader, "_add_reader"},
        {&s__remove_reader, "_remove_reader"},
        {&s_is_closed, "is_closed"},
        {&s__closed, "_closed"},
        {&s_call_soon, "call_soon"},
        {&s_call_at, "call_at"},
        {&s_time, "time"},
        {&s_add_signal_handler, "add_signal_handler"},
        {&s_remove_signal_handler, "remove_signal_handler"},
    };
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++)
        if (*names[i].p == NULL && (*names[i].p = PyUnicode_InternFromString(names[i].s)) == NULL)
            return -1;
    if (g_base_is_closed == NULL) {
        g_sel_add_reader =
            asyncio_function("asyncio.selector_events", "BaseSelectorEventLoop", s_add_reader);
        g_sel_remove_reader =
            asyncio_function("asyncio.selector_events", "BaseSelectorEventLoop", s_remove_reader);
        g_base_is_closed = asyncio_function("asyncio.base_events", "BaseEventLoop", s_is_closed);
    }
    return 0;
}

static int add_object(PyObject *m, const char *name, PyObject *o)
{
#if PY_VERSION_HEX >= 0x030A0000
    return PyModule_AddObjectRef(m, name, o);
#else
    Py_INCREF(o);
    int added = PyModule_AddObject(m, name, o);
    if (added < 0)
        Py_DECREF(o);
    return added;
#endif
}

PyMODINIT_FUNC PyInit__casyncio(void)
{
    if (PyType_Ready(&Watcher_Type) < 0 || PyType_Ready(&CCall_Type) < 0 || names_init() < 0)
        return NULL;
    if (g_bridges == NULL && (g_bridges = PyDict_New()) == NULL)
        return NULL;
    if (g_regs == NULL && (g_regs = PyDict_New()) == NULL)
        return NULL;
    if (g_get_running_loop == NULL) {
        PyObject *ev = PyImport_ImportModule("asyncio.events");
        g_get_running_loop = ev == NULL ? NULL : PyObject_GetAttrString(ev, "_get_running_loop");
        g_abstract_loop = ev == NULL ? NULL : PyObject_GetAttrString(ev, "AbstractEventLoop");
        Py_XDECREF(ev);
        if (g_get_running_loop == NULL || g_abstract_loop == NULL)
            return NULL;
    }
    PyObject *m = PyModule_Create(&moddef);
    if (m == NULL)
        return NULL;
    /* PyModule_AddObjectRef (3.10+) does not steal; PyModule_AddObject, soft-deprecated since,
     * steals only on success. */
    if (add_object(m, "Watcher", (PyObject *)&Watcher_Type) < 0 ||
        add_object(m, "_regs", g_regs) < 0 ||
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
