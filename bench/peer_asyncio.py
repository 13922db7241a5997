#!/usr/bin/python3
"""CPython asyncio and uvloop peer.

usage: peer_asyncio.py WORKLOAD PARAM [N] [VARIANT]
VARIANT: threaded | multiloop | safe | fast | pidfd (asyncio's five child watchers; loop
workloads ignore it) or uvloop (uvloop's own loop and child handling).
Run it with Debian's /usr/bin/python3: that is where python3-uvloop is installed.
Same output line as the C programs:  name=... bench=... param=... value=... unit=...
"""
import asyncio
import os
import resource
import signal
import socket
import sys
import threading
import time
import warnings

warnings.simplefilter("ignore")

SPAWN_N, SCALE_N, MEM_N = 2000, 500, 1000
SOON_N, TIMER_N, PING_N, TS_N, STREAM_MIB, POLICY_N = 1000000, 1000000, 200000, 200000, 256, 1000000
CHUNK = 65536
MASK = (1 << 64) - 1

WATCHERS = {
    "threaded": "ThreadedChildWatcher",
    "multiloop": "MultiLoopChildWatcher",
    "safe": "SafeChildWatcher",
    "fast": "FastChildWatcher",
    "pidfd": "PidfdChildWatcher",
}


class Lost(Exception):
    """the peer lost a child's exit (asyncio's MultiLoop race): no figure for this run"""


async def waited(p, what, limit=10.0):
    """p.wait(), but a /bin/true that is not reaped within `limit` seconds was lost"""
    try:
        return await asyncio.wait_for(p.wait(), limit)
    except asyncio.TimeoutError:
        raise Lost("%s: pid %d's exit never delivered" % (what, p.pid)) from None


async def reap_all(procs):
    """the clean-up after a measurement: a lost exit here does not spoil the figure"""
    try:
        await asyncio.wait_for(asyncio.gather(*(p.wait() for p in procs)), 60.0)
    except asyncio.TimeoutError:
        print("peer_asyncio: some killed children's exits were never delivered", file=sys.stderr)


SPAWNED = []  # every child's pid, for the watchdog's clean-up
WATCHDOG_S = 60.0


def kill_ours():
    """SIGKILL every child we spawned that is still ours (alive or a zombie): a pid that was
    reaped may be reused by now.  Left alive, they would hold the driver's output pipe."""
    me = os.getpid()
    for pid in SPAWNED:
        try:
            with open("/proc/%d/stat" % pid) as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            if ppid == me:
                os.kill(pid, signal.SIGKILL)
        except (OSError, ValueError, IndexError):
            pass


def watchdog(name, work, param_s, unit):
    """asyncio's MultiLoop watcher can wedge the loop for good (nested SIGCHLD handlers end in
    RecursionError and lost exits): after WATCHDOG_S print NA, kill our children and leave"""
    def fire():
        time.sleep(WATCHDOG_S)
        report(name, work, param_s, None, unit)
        print("peer_asyncio: %s %s %s: NA: no result after %.0f s (the loop is wedged)"
              % (name, work, param_s, WATCHDOG_S), file=sys.stderr, flush=True)
        kill_ours()
        os._exit(0)
    threading.Thread(target=fire, daemon=True).start()


async def spawn(*argv):
    p = await asyncio.create_subprocess_exec(*argv)
    SPAWNED.append(p.pid)
    return p


def now():
    return time.monotonic()


VSZ = []


def rss_bytes():
    """resident bytes; also remembers the virtual size for mem_virt"""
    with open("/proc/self/statm") as f:
        size, res = f.read().split()[:2]
    VSZ.append(int(size) * os.sysconf("SC_PAGESIZE"))
    return int(res) * os.sysconf("SC_PAGESIZE")


def delays(n):
    """The C programs' xorshift64* sequence, so every peer gets the same timer delays."""
    s, out = 42, []
    for _ in range(n):
        s ^= s >> 12
        s ^= (s << 25) & MASK
        s ^= s >> 27
        out.append(((s * 2685821657736338717) & MASK) % 100001)
    return out


def report(name, bench, param, value, unit):
    v = "NA" if value is None else "%.6g" % value
    print("name=%s bench=%s param=%s value=%s unit=%s" % (name, bench, param, v, unit), flush=True)


def make_loop(variant):
    if variant == "uvloop":
        import uvloop
        loop = uvloop.new_event_loop()
        asyncio.set_event_loop(loop)
        return loop, "uvloop"
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    return loop, "asyncio"


def setup_watcher(loop, variant):
    if variant == "uvloop":
        return "uvloop"
    cls = getattr(asyncio, WATCHERS[variant])
    w = cls()
    asyncio.get_event_loop_policy().set_child_watcher(w)
    w.attach_loop(loop)
    return "asyncio-" + variant


# ------------------------------------------------------------------ children
async def spawn_reap(n, k):
    started = 0

    async def worker():
        nonlocal started
        while started < n:
            started += 1
            p = await spawn("/bin/true")
            await waited(p, "spawn_reap")

    t0 = now()
    await asyncio.gather(*(worker() for _ in range(min(k, n))))
    return n / (now() - t0)


async def warm_up():
    """one spawn+reap first, so lazy imports and allocations are neither timed nor counted"""
    p = await spawn("/bin/true")
    await waited(p, "warm-up")


async def reap_scaling(m, n):
    await warm_up()
    idle = [await spawn("/bin/sleep", "600") for _ in range(m)]
    dt = 0.0
    for _ in range(n):
        t0 = now()
        p = await spawn("/bin/true")
        await waited(p, "reap_scaling")
        dt += now() - t0
    for p in idle:
        p.kill()
    await reap_all(idle)
    return dt / n * 1e6


async def mem(m):
    await warm_up()
    before = rss_bytes()
    procs = [await spawn("/bin/sleep", "5") for _ in range(m)]
    after = rss_bytes()
    for p in procs:
        p.kill()
    await reap_all(procs)
    return (after - before) / m / 1024.0


# ------------------------------------------------------------------ loop workloads
def burst(loop, n):
    count = 0

    def cb():
        nonlocal count
        count += 1
        if count == n:
            loop.stop()

    t0 = now()
    for _ in range(n):
        loop.call_soon(cb)
    loop.run_forever()
    return n / (now() - t0)


def chain(loop, n, idle_fds):
    count = 0
    keep = pairs(idle_fds)  # param 1: one idle fd registered, so the loop polls every iteration
    for a, _ in keep:
        loop.add_reader(a, lambda: None)

    def cb():
        nonlocal count
        count += 1
        if count < n:
            loop.call_soon(cb)
        else:
            loop.stop()

    t0 = now()
    loop.call_soon(cb)
    loop.run_forever()
    return n / (now() - t0)


def timers(loop, n):
    ds = [d / 1e6 for d in delays(n)]
    count = 0

    def cb():
        nonlocal count
        count += 1
        if count == n:
            loop.stop()

    t0 = now()
    for d in ds:
        loop.call_later(d, cb)
    loop.run_forever()
    return n / (now() - t0)


def pairs(c):
    out = []
    for _ in range(c):
        a, b = socket.socketpair()
        a.setblocking(False)
        b.setblocking(False)
        out.append((a, b))
    return out


def pingpong(loop, c, total):
    conns = pairs(c)
    done = 0

    for i, (a, b) in enumerate(conns):
        target = total // c + (1 if i < total % c else 0)
        state = [0]

        def echo(b=b):
            try:
                d = b.recv(1)
            except BlockingIOError:
                return
            b.send(d)

        def back(a=a, b=b, state=state, target=target):
            nonlocal done
            try:
                d = a.recv(1)
            except BlockingIOError:
                return
            state[0] += 1
            if state[0] < target:
                a.send(d)
            else:
                loop.remove_reader(a)
                loop.remove_reader(b)
                done += 1
                if done == c:
                    loop.stop()

        loop.add_reader(b, echo)
        loop.add_reader(a, back)
    t0 = now()
    for a, _ in conns:
        a.send(b"x")
    loop.run_forever()
    return total / (now() - t0)


async def pingpong_sock(loop, c, total):
    conns = pairs(c)

    async def echo(b, target):
        for _ in range(target):
            d = await loop.sock_recv(b, 1)
            await loop.sock_sendall(b, d)

    async def back(a, target):
        for _ in range(target):
            await loop.sock_sendall(a, b"x")
            await loop.sock_recv(a, 1)

    tasks = []
    for i, (a, b) in enumerate(conns):
        target = total // c + (1 if i < total % c else 0)
        tasks.append(echo(b, target))
        tasks.append(back(a, target))
    t0 = now()
    await asyncio.gather(*tasks)
    return total / (now() - t0)


async def stream(loop, c, mib):
    conns = pairs(c)
    per = mib * 1048576 // c
    chunk = bytes(CHUNK)

    async def writer(a):
        sent = 0
        while sent < per:
            n = min(CHUNK, per - sent)
            await loop.sock_sendall(a, chunk[:n] if n < CHUNK else chunk)
            sent += n

    async def reader(b):
        got = 0
        while got < per:
            d = await loop.sock_recv(b, CHUNK)
            got += len(d)

    t0 = now()
    await asyncio.gather(*(f for a, b in conns for f in (writer(a), reader(b))))
    return per * c / (now() - t0) / 1e6


def threadsafe(loop, n):
    count = 0

    def cb():
        nonlocal count
        count += 1
        if count == n:
            loop.stop()

    def poster():
        for _ in range(n):
            loop.call_soon_threadsafe(cb)

    t0 = now()
    th = threading.Thread(target=poster)
    th.start()
    loop.run_forever()
    dt = now() - t0
    th.join()
    return n / dt


def policy(loop, n):
    get = asyncio.get_event_loop
    rng = range(n)
    t0 = now()
    for _ in rng:
        pass
    base = now() - t0
    t0 = now()
    for _ in rng:
        get()
    dt = now() - t0
    return max(dt - base, 0.0) / n * 1e9


def main():
    if len(sys.argv) < 3:
        print(__doc__, file=sys.stderr)
        return 2
    work, param_s = sys.argv[1], sys.argv[2]
    param = int(param_s)
    n = int(sys.argv[3]) if len(sys.argv) > 3 and sys.argv[3] not in ("-", "0") else 0
    variant = sys.argv[4] if len(sys.argv) > 4 else "pidfd"
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 1048576), hard))
    loop, name = make_loop(variant)
    run = loop.run_until_complete
    if work in ("spawn_reap", "reap_scaling", "mem"):
        name = setup_watcher(loop, variant)
        unit = {"spawn_reap": "children/s", "reap_scaling": "us", "mem": "KB/child"}[work]
        watchdog(name, work, param_s, unit)
        try:
            if work == "spawn_reap":
                v = run(spawn_reap(n or SPAWN_N, max(param, 1)))
            elif work == "reap_scaling":
                v = run(reap_scaling(param, n or SCALE_N))
            else:
                v = run(mem(param or MEM_N))
        except Lost as e:
            # the peer's own failure mode, not the suite's: no figure, and say why
            report(name, work, param_s, None, unit)
            print("peer_asyncio: %s %s %s: NA: %s" % (name, work, param_s, e), file=sys.stderr)
            sys.stdout.flush()
            kill_ours()
            os._exit(0)
        report(name, work, param_s, v, unit)
        if work == "mem" and len(VSZ) >= 2:
            report(name, "mem_virt", param_s, (VSZ[-1] - VSZ[0]) / (param or MEM_N) / 1024.0, unit)
    elif work == "burst":
        report(name, work, param_s, burst(loop, n or SOON_N), "calls/s")
    elif work == "chain":
        report(name, work, param_s, chain(loop, n or SOON_N, param), "calls/s")
    elif work == "timers":
        report(name, work, param_s, timers(loop, n or TIMER_N), "timers/s")
    elif work == "pingpong":
        report(name, work, param_s, pingpong(loop, max(param, 1), n or PING_N), "rt/s")
    elif work == "pingpong_sock":
        report(name, work, param_s, run(pingpong_sock(loop, max(param, 1), n or PING_N)), "rt/s")
    elif work == "stream":
        report(name, work, param_s, run(stream(loop, max(param, 1), n or STREAM_MIB)), "MB/s")
    elif work == "threadsafe":
        report(name, work, param_s, threadsafe(loop, n or TS_N), "calls/s")
    elif work == "policy":
        report(name, work, param_s, policy(loop, n or POLICY_N), "ns/call")
    else:
        print("peer_asyncio: unknown workload " + work, file=sys.stderr)
        return 2
    loop.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
