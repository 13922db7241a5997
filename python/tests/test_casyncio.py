"""The casyncio package's own tests (stdlib unittest only).

usage: PYTHONPATH=DIR python3.X -m unittest discover -s python/tests -v
Real children (/bin/sh -c 'exit N'), real asyncio loops; every test is bounded in time and
reaps what it spawns.
"""
import asyncio
import contextlib
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import unittest
import warnings

import casyncio

KINDS = [casyncio.ThreadedChildWatcher, casyncio.MultiLoopChildWatcher,
         casyncio.SafeChildWatcher, casyncio.FastChildWatcher, casyncio.PidfdChildWatcher]
IMPLICIT = [casyncio.ThreadedChildWatcher, casyncio.MultiLoopChildWatcher,
            casyncio.PidfdChildWatcher]
HAS_ABC = sys.version_info < (3, 14)
LIMIT = 10.0


def spawn(code="exit 7"):
    return os.posix_spawn("/bin/sh", ["sh", "-c", code], dict(os.environ))


def reap(pid):
    try:
        os.waitpid(pid, 0)
    except ChildProcessError:
        pass


def new_watcher(cls):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return cls()


def _fork_child_main():
    async def main():
        proc = await asyncio.create_subprocess_exec("/bin/sh", "-c", "exit 0")
        return await asyncio.wait_for(proc.wait(), LIMIT)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        sys.exit(asyncio.run(main()))


class Base(unittest.TestCase):
    def setUp(self):
        self.loop = asyncio.new_event_loop()
        self.watchers = []

    def tearDown(self):
        for w in self.watchers:
            w.close()
        self.loop.close()

    def watcher(self, cls, attach=True):
        w = new_watcher(cls)
        self.watchers.append(w)
        if attach:
            w.attach_loop(self.loop)
        return w

    def wait_exit(self, w, pid, *args):
        """Registers pid from a coroutine on self.loop and returns (pid, rc, args, thread)."""
        fut = self.loop.create_future()

        def cb(p, rc, *a):
            fut.set_result((p, rc, a, threading.get_ident()))

        async def main():
            w.add_child_handler(pid, cb, *args)
            return await asyncio.wait_for(fut, LIMIT)
        return self.loop.run_until_complete(main())


class TestImport(unittest.TestCase):
    def test_import_warns_nothing(self):
        r = subprocess.run([sys.executable, "-W", "error", "-c", "import casyncio"],
                           capture_output=True, text=True, timeout=60)
        self.assertEqual((r.returncode, r.stderr), (0, ""))

    def test_types(self):
        for cls in KINDS:
            w = new_watcher(cls)
            try:
                if HAS_ABC:
                    self.assertIsInstance(w, asyncio.AbstractChildWatcher)
                else:
                    self.assertEqual(cls.__mro__[-1], object)
            finally:
                w.close()

    def test_without_asyncio_watchers_as_on_3_14(self):
        # asyncio 3.14 removed its watchers: the classes then derive from object and work on
        # their own. Simulated here on any version by deleting asyncio's watcher API before the
        # import; with warnings as errors, nothing may warn either.
        code = r"""
import asyncio, asyncio.events, asyncio.unix_events, os, sys, warnings
for n in ("AbstractChildWatcher", "ThreadedChildWatcher", "MultiLoopChildWatcher",
          "SafeChildWatcher", "FastChildWatcher", "PidfdChildWatcher",
          "get_child_watcher", "set_child_watcher"):
    for mod in (asyncio, asyncio.events, asyncio.unix_events):
        if hasattr(mod, n):
            delattr(mod, n)
warnings.simplefilter("error")
import casyncio
kinds = [casyncio.ThreadedChildWatcher, casyncio.MultiLoopChildWatcher,
         casyncio.SafeChildWatcher, casyncio.FastChildWatcher, casyncio.PidfdChildWatcher]
assert all(k.__mro__[-2:] == (casyncio._Watcher, object) or k.__mro__[-1] is object
           for k in kinds)
assert not any(hasattr(k, "__abstractmethods__") and k.__abstractmethods__ for k in kinds)

async def main():
    loop = asyncio.get_running_loop()
    for cls in kinds:
        with cls() as w:
            if cls in (casyncio.SafeChildWatcher, casyncio.FastChildWatcher):
                w.attach_loop(loop)
            fut = loop.create_future()
            pid = os.posix_spawn("/bin/sh", ["sh", "-c", "exit 5"], dict(os.environ))
            w.add_child_handler(pid, lambda p, rc: fut.set_result((p, rc)))
            got = await asyncio.wait_for(fut, 10)
            assert got == (pid, 5), (cls.__name__, got)
        w.close()
asyncio.run(main())
print("ok")
"""
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           timeout=120)
        self.assertEqual((r.returncode, r.stdout, r.stderr), (0, "ok\n", ""))

    @unittest.skipUnless((3, 12) <= sys.version_info < (3, 14), "3.12 and 3.13 only")
    def test_deprecation_warnings_as_asyncio(self):
        for cls in KINDS:
            with warnings.catch_warnings(record=True) as got:
                warnings.simplefilter("always")
                w = cls()
            w.close()
            kinds = [x.category for x in got]
            if cls in (casyncio.SafeChildWatcher, casyncio.FastChildWatcher,
                       casyncio.MultiLoopChildWatcher):
                self.assertEqual(kinds, [DeprecationWarning], cls)
            else:
                self.assertEqual(kinds, [], cls)


class TestDelivery(Base):
    def test_exit_status_each_kind(self):
        for cls in KINDS:
            with self.subTest(cls.__name__), \
                     contextlib.closing(self.watcher(cls)) as w:
                pid = spawn("exit 7")
                p, rc, args, tid = self.wait_exit(w, pid, "a", 2)
                self.assertEqual((p, rc, args), (pid, 7, ("a", 2)))
                self.assertEqual(tid, threading.get_ident())  # on the loop's thread

    def test_library_threads_post_exits_without_the_gil(self):
        # Threaded's waiting threads and MultiLoop's reaping thread post each exit without
        # taking the GIL (it used to cost a Python thread state and two GIL hand-overs per
        # exit): the asyncio loop's is_closed is asked on Python threads only.
        callers = set()

        class Loop(asyncio.SelectorEventLoop):
            def is_closed(self):
                callers.add(threading.get_ident())
                return super().is_closed()
        self.loop.close()
        self.loop = Loop()
        for cls in (casyncio.ThreadedChildWatcher, casyncio.MultiLoopChildWatcher):
            with self.subTest(cls.__name__), \
                     contextlib.closing(self.watcher(cls)) as w:
                for _ in range(5):
                    pid = spawn("sleep 0.05; exit 3")
                    self.assertEqual(self.wait_exit(w, pid)[1], 3)
        self.assertIn(threading.get_ident(), callers)  # asked, on this thread
        self.assertEqual(callers - {threading.get_ident()}, set())

    def test_killed_child_gives_minus_signal(self):
        for cls in KINDS:
            with self.subTest(cls.__name__), \
                     contextlib.closing(self.watcher(cls)) as w:
                pid = spawn("sleep 30")
                os.kill(pid, signal.SIGKILL)
                self.assertEqual(self.wait_exit(w, pid)[1], -signal.SIGKILL)

    def test_with_asyncio_subprocess(self):
        for cls in KINDS:
            if not HAS_ABC:
                self.skipTest("asyncio 3.14+ has no set_child_watcher")
            with self.subTest(cls.__name__), warnings.catch_warnings(), \
                    contextlib.closing(self.watcher(cls)) as w:
                warnings.simplefilter("ignore", DeprecationWarning)
                asyncio.set_child_watcher(w)
                try:
                    async def main():
                        ps = [await asyncio.create_subprocess_exec(
                            "/bin/sh", "-c", f"exit {i}") for i in range(8)]
                        return [await asyncio.wait_for(p.wait(), LIMIT) for p in ps]
                    self.assertEqual(self.loop.run_until_complete(main()), list(range(8)))
                finally:
                    asyncio.set_child_watcher(None)

    def test_remove_child_handler(self):
        for cls in KINDS:
            with self.subTest(cls.__name__), \
                     contextlib.closing(self.watcher(cls)) as w:
                pid = spawn("sleep 0.2")
                called = []

                async def main():
                    w.add_child_handler(pid, lambda *a: called.append(a))
                    self.assertTrue(w.remove_child_handler(pid))
                    self.assertFalse(w.remove_child_handler(pid))
                    await asyncio.sleep(0.5)
                self.loop.run_until_complete(main())
                reap(pid)
                self.assertEqual(called, [])

    def test_readd_replaces_callback(self):
        for cls in KINDS:
            with self.subTest(cls.__name__), \
                     contextlib.closing(self.watcher(cls)) as w:
                pid = spawn("sleep 0.1; exit 3")
                first = []

                async def main():
                    w.add_child_handler(pid, lambda *a: first.append(a))
                    fut = self.loop.create_future()
                    w.add_child_handler(pid, lambda p, rc: fut.set_result(rc))
                    rc = await asyncio.wait_for(fut, LIMIT)
                    await asyncio.sleep(0.05)
                    return rc
                self.assertEqual(self.loop.run_until_complete(main()), 3)
                self.assertEqual(first, [])

    def test_bad_arguments_raise(self):
        for cls in KINDS:
            with self.subTest(cls.__name__), \
                     contextlib.closing(self.watcher(cls)) as w:
                pid = spawn("sleep 0.1")

                async def main():
                    with self.assertRaises(TypeError):
                        w.add_child_handler(str(pid), lambda *a: None)
                    with self.assertRaises(TypeError):
                        w.add_child_handler(pid, "not callable")
                    with self.assertRaises(OverflowError):
                        w.add_child_handler(2 ** 40, lambda *a: None)
                    with self.assertRaises(OSError):  # EINVAL
                        w.add_child_handler(0, lambda *a: None)
                    with self.assertRaises(OSError):
                        w.add_child_handler(-pid, lambda *a: None)
                    with self.assertRaises(TypeError):
                        w.remove_child_handler(str(pid))
                    self.assertFalse(w.remove_child_handler(pid))
                    # None of it registered anything: the child's exit calls nothing.
                    self.assertEqual(w._callbacks, {})
                self.loop.run_until_complete(main())
                reap(pid)

    def test_readers_go_through_the_loops_own_methods(self):
        # The pidfd's reader goes through _add_reader/_remove_reader when the loop's
        # add_reader/remove_reader are asyncio's own, else through the loop's methods: a
        # subclass's, or ones set on the instance, are called.
        calls = []

        class Loop(asyncio.SelectorEventLoop):
            def add_reader(self, fd, cb, *args):
                calls.append(("add", fd))
                return super().add_reader(fd, cb, *args)

            def remove_reader(self, fd):
                calls.append(("remove", fd))
                return super().remove_reader(fd)
        plain = self.loop
        # Seen from the instance (the shortcuts look the private methods up on the loop).
        plain._add_reader = lambda fd, *a: calls.append(("_add", fd)) or \
            asyncio.SelectorEventLoop._add_reader(plain, fd, *a)
        plain._remove_reader = lambda fd: calls.append(("_remove", fd)) or \
            asyncio.SelectorEventLoop._remove_reader(plain, fd)
        self.loop = Loop()
        try:
            for loop in (plain, self.loop):
                self.loop = loop
                with self.subTest(type(loop).__name__), \
                         contextlib.closing(self.watcher(casyncio.PidfdChildWatcher)) as w:
                    # The first exit makes the loop's bridge (its queue's reader stays).
                    self.assertEqual(self.wait_exit(w, spawn("exit 4"))[1], 4)
                    before = set(loop._selector.get_map())
                    calls.clear()
                    pid = spawn("sleep 0.1; exit 5")
                    fut = loop.create_future()

                    async def main():
                        w.add_child_handler(pid, lambda p, rc: fut.set_result(rc))
                        added = set(loop._selector.get_map()) - before
                        self.assertEqual(len(added), 1)  # the pidfd, watched now
                        return await asyncio.wait_for(fut, LIMIT), added.pop()
                    rc, fd = loop.run_until_complete(main())
                    self.assertEqual(rc, 5)
                    self.assertEqual(set(loop._selector.get_map()), before)  # and off again
                    if loop is plain:  # asyncio's own methods: the shortcuts were taken
                        self.assertEqual(calls, [("_add", fd), ("_remove", fd)])
                    else:
                        self.assertEqual(calls, [("add", fd), ("remove", fd)])
            # A method set on the instance counts too.
            self.loop = plain
            plain.add_reader = lambda fd, cb, *a: calls.append(("inst", fd)) or \
                asyncio.SelectorEventLoop.add_reader(plain, fd, cb, *a)
            calls.clear()
            w = self.watcher(casyncio.PidfdChildWatcher)
            self.assertEqual(self.wait_exit(w, spawn("exit 6"))[1], 6)
            self.assertEqual([c[0] for c in calls], ["inst", "_add", "_remove"])
        finally:
            if self.loop is not plain:
                self.loop.close()
            self.loop = plain
            plain.close()

    def test_callback_exception_goes_to_exception_handler(self):
        for cls in KINDS:
            with self.subTest(cls.__name__), \
                     contextlib.closing(self.watcher(cls)) as w:
                seen = self.loop.create_future()
                self.loop.set_exception_handler(lambda loop, ctx: seen.set_result(ctx))

                def cb(pid, rc):
                    raise ZeroDivisionError

                async def main():
                    w.add_child_handler(spawn("exit 0"), cb)
                    return await asyncio.wait_for(seen, LIMIT)
                ctx = self.loop.run_until_complete(main())
                self.assertIsInstance(ctx["exception"], ZeroDivisionError)
                self.loop.set_exception_handler(None)

    def test_callback_exception_traceback_reaches_the_handler(self):
        # The exception handler gets the exception with its traceback (the callback's frame).
        w = self.watcher(casyncio.PidfdChildWatcher)
        seen = self.loop.create_future()
        self.loop.set_exception_handler(lambda loop, ctx: seen.set_result(ctx))

        def boom(pid, rc):
            raise KeyError("boom")

        async def main():
            pid = spawn("exit 0")
            w.add_child_handler(pid, boom)
            return pid, await asyncio.wait_for(seen, LIMIT)
        pid, ctx = self.loop.run_until_complete(main())
        self.loop.set_exception_handler(None)
        self.assertEqual(ctx["message"], f"Exception in child watcher callback for pid {pid}")
        tb = ctx["exception"].__traceback__
        names = []
        while tb is not None:
            names.append(tb.tb_frame.f_code.co_name)
            tb = tb.tb_next
        self.assertIn("boom", names)

    def test_exited_before_add_is_delivered_on_the_loop(self):
        # A child that exited (and, for Fast, was reaped) before its handler is added: the
        # callback comes from the loop, after add_child_handler returned, not inside it.
        for cls in KINDS:
            with self.subTest(cls.__name__), \
                     contextlib.closing(self.watcher(cls)) as w:
                pid = spawn("exit 9")
                deadline = time.monotonic() + LIMIT
                while time.monotonic() < deadline:  # a zombie now (or reaped by Fast)
                    try:
                        with open(f"/proc/{pid}/stat") as f:
                            if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                                break
                    except FileNotFoundError:
                        break
                    time.sleep(0.005)
                got = []
                fut = self.loop.create_future()

                async def main():
                    w.add_child_handler(pid, lambda p, rc: (got.append(rc), fut.set_result(rc)))
                    self.assertEqual(got, [])
                    return await asyncio.wait_for(fut, LIMIT)
                self.assertEqual(self.loop.run_until_complete(main()), 9)

    def test_watcher_internals_are_guarded(self):
        w = self.watcher(casyncio.PidfdChildWatcher, attach=False)
        with self.assertRaises(TypeError):
            casyncio.PidfdChildWatcher(1)
        with self.assertRaises(TypeError):  # the C base alone has no kind
            casyncio._casyncio.Watcher()
        with self.assertRaises(AttributeError):
            del w._loop
        w._loop = self.loop
        self.assertIs(w._loop, self.loop)
        with self.assertRaises(AttributeError):
            w._closed = True
        self.assertEqual(w._pids, {})

    def test_registration_keeps_the_watcher(self):
        # The only reference to a watcher may be its pending registration: the exit still
        # arrives, and the watcher goes with it.
        import gc
        import weakref
        w = new_watcher(casyncio.PidfdChildWatcher)
        ref = weakref.ref(w)
        fut = self.loop.create_future()

        async def add(w):
            w.add_child_handler(spawn("sleep 0.1; exit 4"), lambda p, rc: fut.set_result(rc))
        self.loop.run_until_complete(add(w))
        del w
        gc.collect()
        self.assertIsNotNone(ref())
        self.assertEqual(self.loop.run_until_complete(asyncio.wait_for(fut, LIMIT)), 4)
        self.loop.run_until_complete(asyncio.sleep(0))
        gc.collect()
        self.assertIsNone(ref())

    def test_loop_in_another_thread(self):
        for cls in IMPLICIT:
            with self.subTest(cls.__name__), \
                     contextlib.closing(self.watcher(cls, attach=False)) as w:
                out = []

                def thread():
                    async def main():
                        fut = asyncio.get_running_loop().create_future()
                        w.add_child_handler(spawn("exit 5"),
                                            lambda p, rc: fut.set_result(
                                                (rc, threading.get_ident())))
                        return await asyncio.wait_for(fut, LIMIT)
                    out.append((asyncio.run(main()), threading.get_ident()))
                t = threading.Thread(target=thread)
                t.start()
                t.join(LIMIT + 5)
                (rc, tid), me = out[0]
                self.assertEqual((rc, tid), (5, me))


class TestState(Base):
    def test_close_is_idempotent_and_detach_after_close_does_nothing(self):
        for cls in KINDS:
            with self.subTest(cls.__name__), \
                     contextlib.closing(self.watcher(cls)) as w:
                self.assertTrue(w.is_active())
                w.close()
                w.close()
                w.attach_loop(None)
                self.assertFalse(w.is_active())
                with self.assertRaises(RuntimeError):
                    w.add_child_handler(1, lambda *a: None)

    def test_no_callback_after_close(self):
        for cls in KINDS:
            with self.subTest(cls.__name__), \
                     contextlib.closing(self.watcher(cls)) as w:
                pid = spawn("sleep 0.2")
                called = []

                async def main():
                    w.add_child_handler(pid, lambda *a: called.append(a))
                    w.close()
                    await asyncio.sleep(0.5)
                self.loop.run_until_complete(main())
                reap(pid)
                self.assertEqual(called, [])

    def test_safe_and_fast_active_while_attached_to_an_open_loop(self):
        for cls in (casyncio.SafeChildWatcher, casyncio.FastChildWatcher):
            with self.subTest(cls.__name__):
                loop = asyncio.new_event_loop()
                w = self.watcher(cls, attach=False)
                self.assertFalse(w.is_active())
                w.attach_loop(loop)
                self.assertTrue(w.is_active())
                loop.close()
                self.assertFalse(w.is_active())
                w.attach_loop(None)

    def test_context_manager_returns_watcher(self):
        for cls in KINDS:
            with contextlib.closing(self.watcher(cls)) as w:
                with w as got:
                    self.assertIs(got, w)


class TestLogging(Base):
    def test_fast_logs_unknown_pid_to_asyncio_logger(self):
        w = self.watcher(casyncio.FastChildWatcher)
        with self.assertLogs("asyncio", level=logging.DEBUG) as logs:
            pid = spawn("exit 0")

            async def main():
                # A registered child makes sure a SIGCHLD pass happens after pid's exit.
                fut = self.loop.create_future()
                await asyncio.sleep(0.2)
                w.add_child_handler(spawn("exit 0"), lambda p, rc: fut.set_result(rc))
                await asyncio.wait_for(fut, LIMIT)
            self.loop.run_until_complete(main())
        reap(pid)
        self.assertTrue(any(str(pid) in line for line in logs.output), logs.output)


    def test_reaped_elsewhere_gives_255_and_logs_from_any_thread(self):
        # Threaded and MultiLoop log from their own threads (without the GIL: the handler takes
        # it); Pidfd and Safe on the loop. A log from a library thread registers no
        # threading._DummyThread (CPython's tests count one as a dangling thread).
        def dummies():
            return [t for t in threading.enumerate() if isinstance(t, threading._DummyThread)]
        before = dummies()
        names = set()
        for cls in (casyncio.ThreadedChildWatcher, casyncio.MultiLoopChildWatcher,
                    casyncio.PidfdChildWatcher, casyncio.SafeChildWatcher):
            with self.subTest(cls.__name__), \
                    contextlib.closing(self.watcher(cls)) as w, \
                    self.assertLogs("asyncio", level=logging.WARNING) as logs:
                pid = spawn("exit 0")
                os.waitpid(pid, 0)
                self.assertEqual(self.wait_exit(w, pid)[1], 255)
            self.assertTrue(any(str(pid) in line for line in logs.output), logs.output)
            names.update(r.threadName for r in logs.records)
        self.assertEqual(dummies(), before)
        self.assertIn("casyncio", names)  # the library threads' records have their own name

    def test_a_deep_logging_handler_runs_on_a_full_stack(self):
        # The library's warnings reach logging from a library thread. A handler that nests 300
        # Python calls (a few hundred KB of C stack on 3.8 to 3.10) must not overflow it: it
        # ran on a Threaded waiting thread's 32 KiB stack once, and crashed the interpreter.
        code = """
import asyncio, logging, os, warnings
warnings.simplefilter("ignore")
import casyncio
seen = []
class Deep(logging.Handler):
    def emit(self, record, depth=0):
        if depth < 300:
            return self.emit(record, depth + 1)
        seen.append(self.format(record))
logging.getLogger("asyncio").addHandler(Deep())
logging.getLogger("asyncio").propagate = False
async def main():
    loop = asyncio.get_running_loop()
    for cls in (casyncio.ThreadedChildWatcher, casyncio.MultiLoopChildWatcher):
        w = cls()
        w.attach_loop(loop)
        pid = os.posix_spawn("/bin/sh", ["sh", "-c", "exit 0"], dict(os.environ))
        os.waitpid(pid, 0)
        fut = loop.create_future()
        w.add_child_handler(pid, lambda p, rc: fut.set_result(rc))
        assert await asyncio.wait_for(fut, 10) == 255
        w.close()
asyncio.run(main())
assert len(seen) >= 2 and all("255" in x for x in seen), seen
print("ok")
"""
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           timeout=120)
        self.assertEqual((r.returncode, r.stdout, r.stderr), (0, "ok\n", ""))


class TestThreads(Base):
    def test_many_threads_many_children(self):
        # Loops in 4 threads add and remove handlers at once: the GIL taken by the bridge's
        # ops and the watchers' locks never deadlock, and every exit arrives on its own loop.
        for cls in IMPLICIT:
            with self.subTest(cls.__name__), \
                    contextlib.closing(self.watcher(cls, attach=False)) as w:
                bad = []

                def thread(i):
                    async def main():
                        loop = asyncio.get_running_loop()
                        me = threading.get_ident()
                        for j in range(10):
                            futs = []
                            for k in range(4):
                                fut = loop.create_future()
                                code = (i * 40 + j * 4 + k) % 200
                                w.add_child_handler(
                                    spawn(f"exit {code}"),
                                    lambda p, rc, f=fut: f.set_result(
                                        (rc, threading.get_ident())))
                                futs.append((code, fut))
                            gone = spawn("sleep 0.05")
                            w.add_child_handler(gone, lambda *a: bad.append(("removed", a)))
                            w.remove_child_handler(gone)
                            for code, fut in futs:
                                rc, tid = await asyncio.wait_for(fut, LIMIT)
                                if (rc, tid) != (code, me):
                                    bad.append((code, rc, tid, me))
                            reap(gone)
                    try:
                        asyncio.run(main())
                    except BaseException as exc:  # reported below
                        bad.append(exc)
                threads = [threading.Thread(target=thread, args=(i,)) for i in range(4)]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join(60)
                self.assertFalse(any(t.is_alive() for t in threads))
                self.assertEqual(bad, [])


class TestSignals(Base):
    """No exit is lost when Python code changes SIGCHLD's disposition."""

    def check_survives(self, cls, change):
        w = self.watcher(cls)
        change()
        try:
            pid = spawn("exit 4")
            self.assertEqual(self.wait_exit(w, pid)[1], 4)
        finally:
            w.close()
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)

    def test_signal_signal_sigchld(self):
        for cls in KINDS:
            with self.subTest(cls.__name__):
                self.check_survives(cls, lambda: signal.signal(signal.SIGCHLD,
                                                               signal.SIG_DFL))

    def test_remove_signal_handler_sigchld(self):
        def change():
            self.loop.add_signal_handler(signal.SIGCHLD, lambda: None)
            self.loop.remove_signal_handler(signal.SIGCHLD)
        for cls in KINDS:
            with self.subTest(cls.__name__):
                self.check_survives(cls, change)

    def test_sigchld_notify_from_a_python_handler(self):
        w = self.watcher(casyncio.MultiLoopChildWatcher)
        signal.signal(signal.SIGCHLD, lambda *a: casyncio.sigchld_notify())
        try:
            pid = spawn("exit 6")
            self.assertEqual(self.wait_exit(w, pid)[1], 6)
        finally:
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)


class TestFork(Base):
    def test_multiprocessing_fork_child_uses_the_policy_watcher(self):
        # 3.12's TestFork.test_fork_asyncio_subprocess, with each of our watchers.
        import multiprocessing
        if not HAS_ABC:
            self.skipTest("asyncio 3.14+ has no set_child_watcher")
        ctx = multiprocessing.get_context("fork")
        for cls in KINDS:
            with self.subTest(cls.__name__), warnings.catch_warnings(), \
                    contextlib.closing(self.watcher(cls, attach=False)) as w:
                warnings.simplefilter("ignore", DeprecationWarning)
                asyncio.set_child_watcher(w)
                try:
                    p = ctx.Process(target=_fork_child_main)
                    p.start()
                    p.join(LIMIT + 20)
                    self.assertEqual(p.exitcode, 0)
                finally:
                    asyncio.set_child_watcher(None)

    def test_watcher_works_in_forked_child(self):
        for cls in KINDS:
            with self.subTest(cls.__name__), \
                     contextlib.closing(self.watcher(cls)) as w:
                pid = os.fork()
                if pid == 0:
                    code = 1
                    try:
                        loop = asyncio.new_event_loop()
                        w.attach_loop(loop)
                        fut = loop.create_future()

                        async def main():
                            w.add_child_handler(spawn("exit 9"),
                                                lambda p, rc: fut.set_result(rc))
                            return await asyncio.wait_for(fut, LIMIT)
                        code = loop.run_until_complete(main())
                    finally:
                        os._exit(code)
                _, status = os.waitpid(pid, 0)
                self.assertEqual(os.waitstatus_to_exitcode(status)
                                 if hasattr(os, "waitstatus_to_exitcode")
                                 else status >> 8, 9)


if __name__ == "__main__":
    unittest.main()
