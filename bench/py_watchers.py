#!/usr/bin/env python3
"""casyncio's Python watchers against asyncio's own, same interpreter, same run, interleaved.

usage: PYTHONPATH=DIR python3 bench/py_watchers.py [--quick] [--reps N] [--md FILE]
       (DIR holds the casyncio package: make python PYTHON=... PYTHON_DEST=DIR)

Workloads (each measurement runs in a fresh process of this interpreter, the runners of one
workload alternating A B .. B A from one repetition to the next; medians are reported):
  spawn_wait K=16   asyncio.create_subprocess_exec('/bin/true') + wait(), 16 in flight:
                    children/s, for each of the five kinds, casyncio's and asyncio's
                    (asyncio's Pidfd needs 3.9+).
  mem               resident KB per watched child: 1,000 `sleep` children registered with
                    add_child_handler (the Python process only), Threaded, Pidfd, Safe, MultiLoop.
  reap M=0, 1000    microseconds per spawn+wait of /bin/true, one at a time, while M idle
                    `sleep` children are also registered: Safe and MultiLoop. The growth is
                    t(M=1000) / t(M=0); also the CPU time of the Python process (all its
                    threads) per spawn+wait, and its growth (reap_cpu: less noisy).
Output: one "name=... bench=... param=... value=... unit=..." line per measurement, then a
summary with the ratios (ours / asyncio's; for memory asyncio's / ours). The machine is
shared: expect noise of 10-20% between runs.
"""
import argparse
import asyncio
import os
import resource
import statistics
import subprocess
import sys
import time
import warnings

warnings.simplefilter("ignore")

KINDS = ["threaded", "multiloop", "safe", "fast", "pidfd"]
CLASS = {"threaded": "ThreadedChildWatcher", "multiloop": "MultiLoopChildWatcher",
         "safe": "SafeChildWatcher", "fast": "FastChildWatcher", "pidfd": "PidfdChildWatcher"}
LIMIT = 30.0


class Lost(Exception):
    pass


def make_watcher(impl, kind):
    if impl == "casyncio":
        import casyncio
        return getattr(casyncio, CLASS[kind])()
    return getattr(asyncio, CLASS[kind])()


def setup(impl, kind):
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    w = make_watcher(impl, kind)
    w.attach_loop(loop)
    asyncio.set_child_watcher(w)
    return loop, w


def teardown(loop, w):
    asyncio.set_child_watcher(None)
    asyncio.set_event_loop(None)
    w.close()
    loop.close()


async def spawn_wait(n, k):
    todo = [n]

    async def worker():
        while todo[0] > 0:
            todo[0] -= 1
            p = await asyncio.create_subprocess_exec("/bin/true")
            try:
                await asyncio.wait_for(p.wait(), LIMIT)
            except asyncio.TimeoutError:
                raise Lost()
    t = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(k)))
    return n / (time.perf_counter() - t)


def kill(pid):
    try:
        os.kill(pid, 9)
    except ProcessLookupError:
        pass


def rss_kb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1024


async def mem(w, m):
    loop = asyncio.get_running_loop()
    pids = []
    env = dict(os.environ)
    # One child first, so that lazy allocations (a thread stack cache, the bridge) are not
    # counted per child.
    p0 = os.posix_spawn("/bin/sleep", ["sleep", "60"], env)
    w.add_child_handler(p0, lambda *a: None)
    await asyncio.sleep(0.2)
    base = rss_kb()
    done = loop.create_future()
    left = [m]

    def cb(pid, rc):
        left[0] -= 1
        if left[0] == 0:
            done.set_result(None)
    for _ in range(m):
        pid = os.posix_spawn("/bin/sleep", ["sleep", "60"], env)
        pids.append(pid)
        w.add_child_handler(pid, cb)
    await asyncio.sleep(1.0)
    per = (rss_kb() - base) / m
    for pid in pids + [p0]:
        kill(pid)
    try:
        await asyncio.wait_for(done, LIMIT)
    except asyncio.TimeoutError:
        raise Lost()
    return per


async def reap(w, m, n):
    loop = asyncio.get_running_loop()
    env = dict(os.environ)
    idle = []
    for _ in range(m):
        pid = os.posix_spawn("/bin/sleep", ["sleep", "600"], env)
        idle.append(pid)
        w.add_child_handler(pid, lambda *a: None)
    await spawn_wait(10, 1)  # warm up
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    t = time.perf_counter()
    await spawn_wait(n, 1)
    us = (time.perf_counter() - t) / n * 1e6
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    # CPU time of this process (every thread: MultiLoop's reaper too) per spawn+wait.
    cpu = (r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime) / n * 1e6
    print(f"name={IMPL_KIND[0]} bench=reap_cpu param={m} value={cpu:.1f} unit=us", flush=True)
    for pid in idle:
        w.remove_child_handler(pid)
    for pid in idle:
        kill(pid)
    for pid in idle:
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:
            pass
    return us


IMPL_KIND = [""]


def one(work, param, n, impl, kind):
    """One measurement in this process; prints its line."""
    IMPL_KIND[0] = f"{impl}:{kind}"
    loop, w = setup(impl, kind)
    try:
        if work == "spawn_wait":
            loop.run_until_complete(spawn_wait(10, 1))
            r0 = resource.getrusage(resource.RUSAGE_SELF)
            value, unit = loop.run_until_complete(spawn_wait(n, param)), "children/s"
            r1 = resource.getrusage(resource.RUSAGE_SELF)
            # CPU time of this process (every thread) per child: less noisy than the rate on
            # a shared machine.
            cpu = (r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime) / n * 1e6
            print(f"name={impl}:{kind} bench=spawn_cpu param={param} value={cpu:.1f} "
                  f"unit=us/child", flush=True)
        elif work == "mem":
            value, unit = loop.run_until_complete(mem(w, param)), "KB/child"
        else:
            value, unit = loop.run_until_complete(reap(w, param, n)), "us"
        print(f"name={impl}:{kind} bench={work} param={param} value={value:.2f} unit={unit}",
              flush=True)
    except Lost:
        print(f"name={impl}:{kind} bench={work} param={param} value=NA unit=lost", flush=True)
    finally:
        teardown(loop, w)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--md", help="write the summary as markdown there")
    ap.add_argument("--one", nargs=5, metavar=("WORK", "PARAM", "N", "IMPL", "KIND"))
    a = ap.parse_args()
    if a.one:
        w, p, n, impl, kind = a.one
        one(w, int(p), int(n), impl, kind)
        return 0

    spawn_n, mem_m, reap_n, big_m = (200, 100, 100, 200) if a.quick else (2000, 1000, 500, 1000)
    reps = 1 if a.quick else a.reps
    has_pidfd = sys.version_info >= (3, 9)
    plan = []
    for kind in KINDS:
        impls = ["casyncio", "asyncio"] if kind != "pidfd" or has_pidfd else ["casyncio"]
        plan.append((("spawn_wait", 16, spawn_n, kind), impls))
    for kind in ("threaded", "pidfd", "safe", "multiloop"):
        impls = ["casyncio", "asyncio"] if kind != "pidfd" or has_pidfd else ["casyncio"]
        plan.append((("mem", mem_m, 0, kind), impls))
    for kind in ("safe", "multiloop"):
        for m in (0, big_m):
            plan.append((("reap", m, reap_n, kind), ["casyncio", "asyncio"]))

    results = {}
    for rep in range(reps):
        for (work, p, n, kind), impls in plan:
            for impl in (impls if rep % 2 == 0 else impls[::-1]):
                cmd = [sys.executable, __file__, "--one", work, str(p), str(n), impl, kind]
                try:
                    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
                    out = r.stdout
                    if r.returncode != 0:
                        print(f"py_watchers: {' '.join(cmd[2:])}: exit {r.returncode}:\n"
                              f"{r.stderr[-2000:]}", file=sys.stderr, flush=True)
                except subprocess.TimeoutExpired:
                    print(f"py_watchers: {' '.join(cmd[2:])}: timeout", file=sys.stderr)
                    out = ""
                lines = [x for x in out.splitlines() if x.startswith("name=")]
                if not any(f" bench={work} " in x for x in lines):
                    lines.append(f"name={impl}:{kind} bench={work} param={p} value=NA "
                                 f"unit=failed")
                for line in lines:
                    print(f"rep={rep + 1} {line}", flush=True)
                    wk = line.split("bench=")[1].split()[0]
                    v = line.split("value=")[1].split()[0]
                    if v != "NA":
                        results.setdefault((wk, p, kind, impl), []).append(float(v))

    def med(work, p, kind, impl):
        v = results.get((work, p, kind, impl))
        return statistics.median(v) if v else None

    rows = []
    ver = sys.version.split()[0]
    rows.append(f"Python {ver}, {reps} repetition(s), medians; load at the end "
                f"{open('/proc/loadavg').read().split()[0]} on {os.cpu_count()} CPUs (shared "
                f"machine: 10-20% noise).")
    rows.append("")
    rows.append("| workload | kind | casyncio | asyncio | ratio | CPU per child, ours / asyncio |")
    rows.append("|---|---|---|---|---|---|")

    def fmt(x, unit):
        return "NA" if x is None else f"{x:.1f} {unit}"
    for kind in KINDS:
        c, s = med("spawn_wait", 16, kind, "casyncio"), med("spawn_wait", 16, kind, "asyncio")
        ratio = f"{c / s:.2f}x" if c and s else "NA"
        cc, cs = med("spawn_cpu", 16, kind, "casyncio"), med("spawn_cpu", 16, kind, "asyncio")
        cpu = f"{fmt(cc, 'us')} / {fmt(cs, 'us')}"
        rows.append(f"| spawn+wait, 16 in flight | {kind} | {fmt(c, 'children/s')} | "
                    f"{fmt(s, 'children/s')} | {ratio} (ours/asyncio, target >= 1.0) | {cpu} |")
    for kind in ("threaded", "pidfd", "safe", "multiloop"):
        c, s = med("mem", mem_m, kind, "casyncio"), med("mem", mem_m, kind, "asyncio")
        ratio = f"{c / s:.2f}x" if c is not None and s else "NA"
        rows.append(f"| memory per watched child ({mem_m} sleep) | {kind} | {fmt(c, 'KB')} | "
                    f"{fmt(s, 'KB')} | {ratio} (ours/asyncio"
                    f"{', target <= 0.5' if kind == 'threaded' else ''}) | |")
    for kind in ("safe", "multiloop"):
        c0, c1 = med("reap", 0, kind, "casyncio"), med("reap", big_m, kind, "casyncio")
        s0, s1 = med("reap", 0, kind, "asyncio"), med("reap", big_m, kind, "asyncio")
        g = lambda a, b: f"x{b / a:.2f}" if a and b else "NA"  # noqa: E731
        k0, k1 = med("reap_cpu", 0, kind, "casyncio"), med("reap_cpu", big_m, kind, "casyncio")
        a0, a1 = med("reap_cpu", 0, kind, "asyncio"), med("reap_cpu", big_m, kind, "asyncio")
        rows.append(f"| reap cost M=0 -> M={big_m} idle | {kind} | {fmt(c0, 'us')} -> "
                    f"{fmt(c1, 'us')} ({g(c0, c1)}) | {fmt(s0, 'us')} -> {fmt(s1, 'us')} "
                    f"({g(s0, s1)}) | growth (target <= x1.2) | CPU {fmt(k0, 'us')} -> "
                    f"{fmt(k1, 'us')} ({g(k0, k1)}) / {fmt(a0, 'us')} -> {fmt(a1, 'us')} "
                    f"({g(a0, a1)}) |")
    print("\n".join(rows))
    if a.md:
        with open(a.md, "w") as f:
            f.write("\n".join(rows) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
