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

# Registrations: token -> (watcher, delivery loop, callback, args), kept by the C side (see
# python/_casyncio.c): the C watcher is given the token, never a Python object, and the exit of
# a child whose token was removed, replaced or closed finds nothing and does nothing.
_regs = _casyncio._regs


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


def _current_loop():
    """The thread's current loop, asyncio.get_event_loop()'s answer outside a running loop
    (through the policy before 3.14, where asyncio.get_event_loop() itself warns on 3.10 and
    3.11)."""
    if sys.version_info >= (3, 14):
        return asyncio.get_event_loop()
    return asyncio.get_event_loop_policy().get_event_loop()


_casyncio._setup(_log, _current_loop)
# In a child made by fork(), every watcher rebuilds its C watcher (the parent's answers -ECHILD
# there) before its next use, and forgets the parent's children and attached loop.
os.register_at_fork(after_in_child=_casyncio._after_fork_child)


# At interpreter exit the library's threads stop calling into Python (a thread asking for the
# GIL during finalization would hang). atexit runs handlers last-registered first, so the
# program's own handlers, registered after this import, still have working watchers.
atexit.register(_casyncio._shutdown)


_HAS_WATCHERS = sys.version_info < (3, 14) and hasattr(asyncio, "AbstractChildWatcher")
_WARN_KINDS = ("SafeChildWatcher", "FastChildWatcher", "MultiLoopChildWatcher")

# 3.12+ warns when AbstractChildWatcher is subclassed (its __init_subclass__): the class
# statements run with that warning ignored, so that importing casyncio warns about nothing.
with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)

    # The watcher methods are the C base's (_casyncio.Watcher): no Python frame of ours per
    # child. It keeps _loop, _closed and _pids (pid -> token), and makes the C watcher of the
    # subclass's _kind.
    class _Watcher(_casyncio.Watcher,
                   asyncio.AbstractChildWatcher if _HAS_WATCHERS else object):
        _kind = None

        def __init__(self):
            name = type(self).__name__
            if (_HAS_WATCHERS and sys.version_info >= (3, 12) and name in _WARN_KINDS
                    and type(self).__module__ == __name__):
                # The warning asyncio's class of the same kind gives.
                warnings.warn(f"{name!r} is deprecated as of Python 3.12 and will be "
                              f"removed in Python 3.14.", DeprecationWarning, stacklevel=2)

        def __repr__(self):
            state = "closed" if self._closed else "open"
            return f"<casyncio.{type(self).__name__} {state}>"

        add_child_handler = _casyncio.Watcher.add_child_handler
        remove_child_handler = _casyncio.Watcher.remove_child_handler
        is_active = _casyncio.Watcher.is_active
        attach_loop = _casyncio.Watcher.attach_loop
        close = _casyncio.Watcher.close
        __enter__ = _casyncio.Watcher.__enter__
        __exit__ = _casyncio.Watcher.__exit__

        # Not part of the contract; only so that code written against asyncio's classes'
        # internals (CPython's own tests clear Fast's _callbacks and join Threaded's _threads)
        # finds something harmless: a snapshot of the registrations, and no Python threads.
        @property
        def _callbacks(self):
            return {pid: _regs[t][2:] for pid, t in list(self._pids.items()) if t in _regs}

        @property
        def _threads(self):
            return {}

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

    class FastChildWatcher(_Watcher):
        """SIGCHLD through the attached loop, then waitpid(-1): reaps every child."""
        _kind = _casyncio.FAST

    class PidfdChildWatcher(_Watcher):
        """A pidfd per child, read by the loop running in the thread that called
        add_child_handler. No threads, no signals."""
        _kind = _casyncio.PIDFD

