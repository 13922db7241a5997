"""Runs CPython's own asyncio subprocess watcher tests against casyncio's five watchers.

usage: PYTHONPATH=DIR python3.X python/run_cpython_tests.py [--timeout SECONDS] [KIND...]
  KIND: threaded multiloop safe fast pidfd (default: all five)

Imports this interpreter's test.test_asyncio.test_subprocess and builds, for each of our
classes, a TestCase from its SubprocessWatcherMixin and test_utils.TestCase with Watcher (3.8 to
3.11) and _get_watcher (3.12+) giving our class: every test of SubprocessMixin then runs with
our watcher set as the policy's child watcher, MultiLoop included (CPython skips its own
MultiLoop class: @unittest.skip for bpo-38323 up to 3.11; 3.12+ keeps only a warning test).
With --as-asyncio, asyncio's own watcher classes are replaced by ours (in asyncio and
asyncio.unix_events, before the test module is imported) and the test module's own classes
run: Subprocess*WatcherTests (its skipped MultiLoop class included) and, on 3.12+,
MultiLoopChildWatcherTests (the constructor's DeprecationWarning).
Each test is bounded in time (faulthandler ends the process with a traceback on a hang) and
must leave no child process behind: a test after which a child is still there, or after which
CPython's support.reap_children() had to reap one, fails.
Last line: "cpython-tests: N passed, N failed, N skipped".
"""
import argparse
import faulthandler
import os
import re
import sys
import time
import unittest
import warnings

import casyncio

KINDS = {
    "threaded": casyncio.ThreadedChildWatcher,
    "multiloop": casyncio.MultiLoopChildWatcher,
    "safe": casyncio.SafeChildWatcher,
    "fast": casyncio.FastChildWatcher,
    "pidfd": casyncio.PidfdChildWatcher,
}


def children():
    """The pids of our children still there (zombies included), from /proc."""
    pids = set()
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/children") as f:
                pids.update(int(p) for p in f.read().split())
        except OSError:
            pass
    return pids


def make_case(mixin, base, cls):
    def _get_watcher(self):
        # Our Safe/Fast/MultiLoop warn on 3.12+ as asyncio's do; the tests are not about that.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            return cls()

    name = f"Casyncio{cls.__name__}Tests"
    return type(name, (mixin, base), {
        "Watcher": cls,
        "_get_watcher": _get_watcher,
        "__module__": __name__,
        "__qualname__": name,
    })


class Result(unittest.TextTestResult):
    """Bounds every test in time and fails a test that leaves a child behind."""
    timeout = 120.0

    def startTest(self, test):
        from test import support
        support.environment_altered = False
        faulthandler.dump_traceback_later(self.timeout, exit=True)
        super().startTest(test)

    def stopTest(self, test):
        from test import support
        faulthandler.cancel_dump_traceback_later()
        # A child killed at the end of a test may take a moment to be reaped by the watcher's
        # thread; wait a little before calling it left behind.
        deadline = time.monotonic() + 5.0
        left = children()
        while left and time.monotonic() < deadline:
            time.sleep(0.01)
            left = children()
        problem = None
        if left:
            problem = f"child processes left behind: {sorted(left)}"
            for pid in left:
                try:
                    os.kill(pid, 9)
                    os.waitpid(pid, 0)
                except OSError:
                    pass
        elif support.environment_altered:
            problem = ("the test altered the environment: a child support.reap_children() had to "
                       "reap, or a dangling thread (see the warnings above)")
        if problem is not None:
            try:
                raise AssertionError(problem)
            except AssertionError:
                self.addFailure(test, sys.exc_info())
        super().stopTest(test)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--timeout", type=float, default=120.0, help="per test, seconds")
    ap.add_argument("-k", dest="pattern", action="append", help="only tests matching")
    ap.add_argument("-v", dest="verbosity", action="store_const", const=2, default=1)
    ap.add_argument("--as-asyncio", action="store_true",
                    help="replace asyncio's classes by ours and run the module's own classes")
    ap.add_argument("kinds", nargs="*", default=list(KINDS))
    args = ap.parse_args()
    if args.as_asyncio:
        import asyncio
        from asyncio import unix_events
        for kind in args.kinds:
            cls = KINDS[kind]
            setattr(unix_events, cls.__name__, cls)
            setattr(asyncio, cls.__name__, cls)

    try:
        from test.test_asyncio import test_subprocess
        from test.test_asyncio import utils as test_utils
    except ImportError as exc:
        print(f"cpython-tests: {sys.executable} has no test package ({exc})")
        print("cpython-tests: 0 passed, 0 failed, 1 skipped")
        return 0
    mixin = test_subprocess.SubprocessWatcherMixin

    loader = unittest.TestLoader()
    if args.pattern:
        loader.testNamePatterns = [p if "*" in p else f"*{p}*" for p in args.pattern]
    suite = unittest.TestSuite()
    if args.as_asyncio:
        names = {KINDS[k].__name__.replace("ChildWatcher", "") for k in args.kinds}
        for name in sorted(dir(test_subprocess)):
            m = re.fullmatch(r"Subprocess(\w+)WatcherTests|(MultiLoop)ChildWatcherTests", name)
            if m and (m.group(1) or m.group(2)) in names:
                case = getattr(test_subprocess, name)
                case.__unittest_skip__ = False  # bpo-38323's skip: ours has no such race
                suite.addTests(loader.loadTestsFromTestCase(case))
    else:
        for kind in args.kinds:
            suite.addTests(loader.loadTestsFromTestCase(
                make_case(mixin, test_utils.TestCase, KINDS[kind])))

    Result.timeout = args.timeout
    runner = unittest.TextTestRunner(verbosity=args.verbosity, resultclass=Result,
                                     stream=sys.stdout)
    mode = "asyncio's classes replaced by ours" if args.as_asyncio else "SubprocessWatcherMixin"
    print(f"cpython-tests: {sys.executable} {sys.version.split()[0]}, {mode}, "
          f"test_subprocess from {os.path.dirname(test_subprocess.__file__)}", flush=True)
    try:
        result = runner.run(suite)
    finally:
        # test_subprocess's tearDownModule: the default policy again.
        test_subprocess.tearDownModule()
    skipped = len(result.skipped)
    failed = len(result.failures) + len(result.errors) + len(result.unexpectedSuccesses)
    passed = result.testsRun - skipped - failed
    print(f"cpython-tests: {passed} passed, {failed} failed, {skipped} skipped")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
