"""casyncio's child watchers for asyncio.

Drop-in replacements for asyncio's five Unix child watchers, backed by the C library casyncio:

    ThreadedChildWatcher, MultiLoopChildWatcher, SafeChildWatcher, FastChildWatcher,
    PidfdChildWatcher

On Python 3.8 to 3.13 they subclass asyncio.AbstractChildWatcher, so that
asyncio.set_child_watcher() takes them. On 3.14+, where asyncio removed its watchers, they
derive from object and work on their own (add_child_handler on any asyncio loop). See
docs/python.md.
"""
import asyncio
import atexit
import itertools
import logging
import os
import sys
import threading
import time
import warnings

from . import _casyncio

__all__ = (
    "ThreadedChildWatcher",
    "MultiLoopChildWatcher",
    "SafeChildWatcher",
    "FastChildWatcher",
    "PidfdChildWatcher",
    "sigchld_notify",
)

LIBRARY_VERSION = _casyncio.LIBRARY_VERSION
sigchld_notify = _casyncio.sigchld_notify

_logger = logging.getLogger("asyncio")

# Registrations: token -> (watcher, delivery loop, callback, args). The C watcher is given the
# token, never a Python object: a token that was removed, replaced or closed finds nothing here
# when (and if) the C side reports it, so a late report does nothing.
_regs = {}
_tokens = itertools.count(1)
# Bumped in a child made by fork(): a watcher whose generation is older rebuilds its C watcher
# (the parent's answers -ECHILD there) before its next use.
_fork_gen = 0


def _dispatch(token, pid, returncode):
    """Called by the C side, on the delivery loop's thread, once per exit."""
    entry = _regs.pop(token, None)
    if entry is None:
        return
    watcher, loop, callback, args = entry
    if watcher._pids.get(pid) == token:
        del watcher._pids[pid]
    try:
        callback(pid, returncode, *args)
    except (SystemExit, KeyboardInterrupt):
        raise
    except BaseException as exc:
        if loop is None:
            raise
        loop.call_exception_handler({
            "message": f"Exception in child watcher callback for pid {pid}",
            "exception": exc,
        })


# A record made at import, on a Python thread: the model for records logged from the library's
# own threads (below). It has every attribute this Python's LogRecord has.
_record_model = logging.LogRecord("asyncio", logging.WARNING, __file__, 0, "%s", ("",), None)


def _log(level, message):
    """Called by the C side with a warning of the library, from any thread."""
    if threading.get_ident() in getattr(threading, "_active", (threading.get_ident(),)):
        _logger.log(level, "%s", message)
        return
    # A thread of the library (the Threaded or MultiLoop watcher's): logging's own LogRecord
    # would call threading.current_thread(), which registers a _DummyThread for this thread
    # for good (a "dangling thread" to CPython's tests). Such a record is built from the model
    # instead, with this thread's id and the name "casyncio", and handled as logging would.
    if not _logger.isEnabledFor(level):
        return
    now = time.time()
    record = logging.LogRecord.__new__(logging.LogRecord)
    record.__dict__.update(_record_model.__dict__)
    record.__dict__.update(
        levelno=level, levelname=logging.getLevelName(level), msg="%s", args=(message,),
        created=now, msecs=int((now - int(now)) * 1000) + 0.0,
        relativeCreated=_record_model.relativeCreated + (now - _record_model.created) * 1000,
        thread=threading.get_ident(), threadName="casyncio",
    )
    _logger.handle(record)


def _after_fork_in_child():
    global _fork_gen
    _fork_gen += 1
    _regs.clear()
    _casyncio._after_fork_child()


_casyncio._setup(_dispatch, _log)
os.register_at_fork(after_in_child=_after_fork_in_child)


# At interpreter exit the library's threads stop calling into Python (a thread asking for the
# GIL during finalization would hang). atexit runs handlers last-registered first, so the
# program's own handlers, registered after this import, still have working watchers.
atexit.register(_casyncio._shutdown)


# asyncio's running loop or None (no exception to raise and catch when there is none).
_get_running_loop = asyncio.events._get_running_loop


def _current_loop():
    """The thread's current loop, asyncio.get_event_loop()'s answer outside a running loop
    (through the policy before 3.14, where asyncio.get_event_loop() itself warns on 3.10 and
    3.11)."""
    if sys.version_info >= (3, 14):
        return asyncio.get_event_loop()
    return asyncio.get_event_loop_policy().get_event_loop()


_HAS_WATCHERS = sys.version_info < (3, 14) and hasattr(asyncio, "AbstractChildWatcher")
_WARN_KINDS = ("SafeChildWatcher", "FastChildWatcher", "MultiLoopChildWatcher")

# 3.12+ warns when AbstractChildWatcher is subclassed (its __init_subclass__): the class
# statements run with that warning ignored, so that importing casyncio warns about nothing.
with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)

    class _Watcher(asyncio.AbstractChildWatcher if _HAS_WATCHERS else object):
        _kind = None
        _implicit_loop = True  # deliver to the caller's loop (Threaded, MultiLoop, Pidfd)

        def __init__(self):
            name = type(self).__name__
            if (_HAS_WATCHERS and sys.version_info >= (3, 12) and name in _WARN_KINDS
                    and type(self).__module__ == __name__):
                # The warning asyncio's class of the same kind gives.
                warnings.warn(f"{name!r} is deprecated as of Python 3.12 and will be "
                              f"removed in Python 3.14.", DeprecationWarning, stacklevel=2)
            self._c = _casyncio.CWatcher(self._kind)
            self._gen = _fork_gen
            self._loop = None
            self._pids = {}  # pid -> token
            self._closed = False

        def __repr__(self):
            state = "closed" if self._closed else "open"
            return f"<casyncio.{type(self).__name__} {state}>"

        def _check_fork(self):
            if self._gen != _fork_gen:
                # A child of fork(): the parent's C watcher cannot be used here. Make a new one
                # of the same kind; the parent's children and attached loop are not ours.
                self._gen = _fork_gen
                self._pids.clear()
                self._loop = None
                if not self._closed:
                    self._c = _casyncio.CWatcher(self._kind)

        def add_child_handler(self, pid, callback, *args):
            """Calls callback(pid, returncode, *args) once, when child pid exits."""
            if self._gen != _fork_gen:
                self._check_fork()
            if self._closed:
                raise RuntimeError(f"{self!r} is closed")
            if not callable(callback):
                raise TypeError("callback must be callable")
            if self._implicit_loop:
                loop = _get_running_loop()
                if loop is None:
                    loop = self._loop if self._loop is not None else _current_loop()
                cloop = loop
            else:
                loop = self._loop
                cloop = None  # the attached loop
            token = next(_tokens)
            pids = self._pids
            old = pids.get(pid)
            _regs[token] = (self, loop, callback, args)
            pids[pid] = token
            if old is not None:
                _regs.pop(old, None)
            try:
                self._c.add(pid, cloop, token)
            except BaseException:
                _regs.pop(token, None)
                if pids.get(pid) == token:
                    del pids[pid]
                raise

        def remove_child_handler(self, pid):
            """True if a handler was removed (its callback will not be called)."""
            self._check_fork()
            token = self._pids.pop(pid, None)
            entry = _regs.pop(token, None) if token is not None else None
            if not self._closed:
                self._c.remove(pid)
            return entry is not None

        def attach_loop(self, loop):
            self._check_fork()
            if self._closed:
                return
            if loop is not None and not isinstance(loop, asyncio.AbstractEventLoop):
                raise TypeError(f"an asyncio event loop or None is required, not {loop!r}")
            if not self._implicit_loop:
                # Safe and Fast watch SIGCHLD through the loop; the others only remember it
                # (their delivery loop outside a running loop), as asyncio's do nothing.
                self._c.attach(loop)
            self._loop = loop

        def is_active(self):
            if self._gen != _fork_gen:
                self._check_fork()
            # Threaded, MultiLoop and Pidfd: active until closed (Safe and Fast ask the C
            # watcher: attached to a loop that is not closed).
            return not self._closed and (self._implicit_loop or self._c.is_active())

        def close(self):
            """Idempotent; no callback runs after it returns; children are not killed."""
            self._check_fork()
            if self._closed:
                return
            self._closed = True
            for token in self._pids.values():
                _regs.pop(token, None)
            self._pids.clear()
            self._c.close()
            self._loop = None

        # Not part of the contract; only so that code written against asyncio's classes'
        # internals (CPython's own tests clear Fast's _callbacks and join Threaded's _threads)
        # finds something harmless: a snapshot of the registrations, and no Python threads.
        @property
        def _callbacks(self):
            return {pid: _regs[t][2:] for pid, t in list(self._pids.items()) if t in _regs}

        @property
        def _threads(self):
            return {}

        # Only Fast's C watcher does something between enter and exit (keeps early exit
        # statuses): the others' are plain Python, as asyncio's.
        def __enter__(self):
            return self

        def __exit__(self, exc_type, exc_value, traceback):
            pass

    class ThreadedChildWatcher(_Watcher):
        """One waiting thread per child (small stack, C only): waitpid(pid) there, the callback
        on the loop that was running in the thread that called add_child_handler."""
        _kind = _casyncio.THREADED

    class MultiLoopChildWatcher(_Watcher):
        """A SIGCHLD handler and one reaping thread for the process, exits delivered to the
        loop running in the thread that called add_child_handler."""
        _kind = _casyncio.MULTILOOP

    class SafeChildWatcher(_Watcher):
        """SIGCHLD through the attached loop, then waitpid for each registered child."""
        _kind = _casyncio.SAFE
        _implicit_loop = False

    class FastChildWatcher(_Watcher):
        """SIGCHLD through the attached loop, then waitpid(-1): reaps every child."""
        _kind = _casyncio.FAST
        _implicit_loop = False

        def __enter__(self):
            if self._gen != _fork_gen:
                self._check_fork()
            if not self._closed:
                self._c.enter()
            return self

        def __exit__(self, exc_type, exc_value, traceback):
            if not self._closed and self._gen == _fork_gen:
                self._c.exit()

    class PidfdChildWatcher(_Watcher):
        """A pidfd per child, read by the loop running in the thread that called
        add_child_handler. No threads, no signals."""
        _kind = _casyncio.PIDFD

