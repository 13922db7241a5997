#!/usr/bin/python3
"""Turns build/bench/raw.txt into the tables, the target checks and the plots.

usage: report.py OUT_DIR PLOT_DIR [DOC.md]
  reads  OUT_DIR/raw.txt (lines "rep=R name=... bench=... param=... value=... unit=..."),
         OUT_DIR/machine.txt, OUT_DIR/failures.txt
  writes OUT_DIR/results.txt, OUT_DIR/results.md, PLOT_DIR/bench-*.png (gnuplot), and, when
         DOC.md is given, replaces what lies between its RESULTS markers with results.md.
Ratios are "times better than the reference": above 1.00 means faster (for rates) or
cheaper (for costs: us, KB, ns, instructions) than the reference.
"""
import os
import re
import statistics
import subprocess
import sys

ORDER = ["spawn_reap", "reap_scaling", "reap_scaling_cpu", "fd_cost", "mem", "mem_virt", "burst", "chain", "timers", "pingpong",
         "pingpong_sock", "stream", "threadsafe", "policy", "policy_instr", "jobs"]
TITLE = {
    "spawn_reap": "spawn+reap of /bin/true (param: children in flight)",
    "reap_scaling": "one spawn+reap with M idle watched children (param: M)",
    "reap_scaling_cpu": "the same, the parent's CPU time (user + system, all threads) per spawn+reap",
    "fd_cost": "one posix_spawn+waitpid with F extra close-on-exec fds open (param: F)",
    "mem_virt": "virtual memory per watched child (thread stacks count whole here)",
    "mem": "resident memory per watched child (param: children)",
    "burst": "call_soon, all scheduled up front",
    "chain": "chained call_soon (each callback schedules the next; param: idle fds registered)",
    "timers": "timers with delays 0-100 ms",
    "pingpong": "socketpair ping-pong, readiness callbacks (param: connections)",
    "pingpong_sock": "socketpair ping-pong through sock_recv/sock_sendall or streams (param: connections)",
    "stream": "socketpair streaming, 64 KiB sends (param: connections)",
    "threadsafe": "call_soon_threadsafe from another thread",
    "policy": "get the current loop with one set (ca_get_event_loop and peers)",
    "policy_instr": "the same, instructions per call (callgrind)",
    "jobs": "job runner: /bin/true jobs (param: -j)",
}
FLOOR = {"spawn_reap": "floor-spawn", "reap_scaling": "floor-pidfd", "reap_scaling_cpu": "floor-pidfd",
         "policy": "floor-tls",
         "policy_instr": "floor-tls", "jobs": "xargs"}
for _b in ("burst", "chain", "timers", "pingpong", "pingpong_sock", "stream", "threadsafe"):
    FLOOR[_b] = "floor-epoll"
C_PEERS = ("libuv", "libev", "glib", "sd-event")
LOOP_BENCH = ("burst", "chain", "timers", "pingpong", "pingpong_sock", "threadsafe")
LOOP_CASES = (("burst", "0"), ("chain", "0"), ("chain", "1"), ("timers", "0"), ("pingpong", "1"),
              ("pingpong_sock", "1"), ("threadsafe", "0"))


def higher_better(unit):
    return unit.endswith("/s")


def is_peer(name):
    return not name.startswith("casyncio") and not name.startswith("floor")


def fmt(v, unit):
    if v is None:
        return "NA"
    if unit.endswith("/s"):
        for div, suf in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
            if abs(v) >= div:
                return "%.3g%s" % (v / div, suf)
        return "%.3g" % v
    return "%.0f" % v if abs(v) >= 100 else "%.3g" % v


def load(out):
    data = {}  # (bench, param) -> name -> {"unit": u, "values": [...], "na": n}
    with open(os.path.join(out, "raw.txt")) as f:
        for line in f:
            kv = dict(re.findall(r"(\w+)=(\S+)", line))
            if "bench" not in kv:
                continue
            d = data.setdefault((kv["bench"], kv["param"]), {}).setdefault(
                kv["name"], {"unit": kv["unit"], "values": [], "na": 0})
            if kv["value"] == "NA":
                d["na"] += 1
            else:
                d["values"].append(float(kv["value"]))
    return data


def pkey(p):
    try:
        return (0, int(p))
    except ValueError:
        return (1, p)


class Stats:
    def __init__(self, data):
        self.data = data
        self.med = {}
        for key, names in data.items():
            for name, d in names.items():
                self.med[key + (name,)] = statistics.median(d["values"]) if d["values"] else None

    def get(self, bench, param, name):
        return self.med.get((bench, str(param), name))

    def unit(self, bench, param):
        for d in self.data.get((bench, str(param)), {}).values():
            return d["unit"]
        return ""

    def best_peer(self, bench, param, names=None):
        unit = self.unit(bench, param)
        cands = [(n, v) for (b, p, n), v in self.med.items()
                 if b == bench and p == str(param) and v is not None and is_peer(n)
                 and (names is None or n in names)]
        if not cands:
            return None, None
        return (max if higher_better(unit) else min)(cands, key=lambda nv: nv[1])

    def ratio(self, bench, param, v, ref):
        """times better than ref (>1: better)"""
        if v is None or ref is None or v == 0 or ref == 0:
            return None
        return v / ref if higher_better(self.unit(bench, param)) else ref / v


def r2(x):
    return "NA" if x is None else "%.2f" % x


def tables(st):
    txt, md = [], []
    keys = sorted(st.data, key=lambda k: (ORDER.index(k[0]) if k[0] in ORDER else 99, pkey(k[1])))
    for bench, param in keys:
        names = st.data[(bench, param)]
        unit = st.unit(bench, param)
        bp, bv = st.best_peer(bench, param)
        fl = FLOOR.get(bench)
        fv = st.get(bench, param, fl) if fl else None
        head = "%s, param=%s (%s); best peer: %s; floor: %s" % (
            bench, param, unit, bp or "-", fl if fv is not None else "-")
        txt.append("")
        txt.append("== " + head)
        txt.append("   %s" % TITLE.get(bench, ""))
        txt.append("   %-28s %12s %8s %5s %9s %9s" % ("name", "median", "spread", "runs", "x best", "x floor"))
        md.append("")
        md.append("**%s** — %s, param=%s, unit %s (best peer: %s; floor: %s)" % (
            bench, TITLE.get(bench, ""), param, unit, bp or "-", fl if fv is not None else "-"))
        md.append("")
        md.append("| name | median | spread | runs | x best peer | x floor |")
        md.append("|---|---:|---:|---:|---:|---:|")
        rows = sorted(names.items(), key=lambda nd: (
            0 if nd[0].startswith("casyncio") else 1 if nd[0].startswith("floor") else 2, nd[0]))
        for name, d in rows:
            vals = d["values"]
            med = statistics.median(vals) if vals else None
            spread = (max(vals) - min(vals)) / med * 100 if vals and med else None
            sp = "-" if spread is None else "%.0f%%" % spread
            xb = r2(st.ratio(bench, param, med, bv)) if bv is not None else "-"
            xf = r2(st.ratio(bench, param, med, fv)) if fv is not None else "-"
            runs = "%d" % len(vals) + ("+%dNA" % d["na"] if d["na"] else "")
            txt.append("   %-28s %12s %8s %5s %9s %9s" % (name, fmt(med, unit), sp, runs, xb, xf))
            md.append("| %s | %s | %s | %s | %s | %s |" % (name, fmt(med, unit), sp, runs, xb, xf))
    return txt, md


def growth_table(st):
    ms = sorted({p for (b, p) in st.data if b == "reap_scaling"}, key=pkey)
    if len(ms) < 2:
        return [], []
    lo, hi = ms[0], ms[-1]
    names = sorted(st.data.get(("reap_scaling", lo), {}))
    txt = ["", "== reap_scaling growth: cost at M=%s / cost at M=%s" % (hi, lo)]
    md = ["", "**reap cost growth** from M=%s to M=%s (1.00 = flat; the O(n) watchers grow)" % (lo, hi),
          "", "| name | " + " | ".join("M=%s (us)" % m for m in ms) + " | growth |",
          "|---|" + "---:|" * (len(ms) + 1)]
    for n in names:
        vs = [st.get("reap_scaling", m, n) for m in ms]
        g = vs[-1] / vs[0] if vs[0] and vs[-1] else None
        txt.append("   %-28s %s  x%s" % (n, " ".join("%9s" % fmt(v, "us") for v in vs), r2(g)))
        md.append("| %s | %s | %s |" % (n, " | ".join(fmt(v, "us") for v in vs), r2(g)))
    return txt, md


def fd_cost_lines(st):
    fs = sorted({p for (b, p) in st.data if b == "fd_cost"}, key=pkey)
    if len(fs) < 2:
        return [], []
    v0, v1 = st.get("fd_cost", fs[0], "floor-spawn"), st.get("fd_cost", fs[-1], "floor-spawn")
    if not v0 or not v1:
        return [], []
    per = (v1 - v0) / (int(fs[-1]) - int(fs[0])) * 1000
    line = ("what an open fd costs every spawn: %s us with %s fds, %s us with %s: %.0f ns per fd"
            % (fmt(v0, "us"), fs[0], fmt(v1, "us"), fs[-1], per))
    return ["", "== " + line], ["", "**fd cost**: " + line + " (fork/clone copies the fd table)."]


def check(results, what, ok, detail):
    results.append((what, "NA" if ok is None else ("holds" if ok else "FAILS"), detail))


def targets(st):
    res = []
    # loop workloads: ahead of the best C peer, >= 0.8x floor (0.5x for the burst)
    for b, p in LOOP_CASES:
        v = st.get(b, p, "casyncio-epoll")
        bp, bv = st.best_peer(b, p, C_PEERS)
        fv = st.get(b, p, "floor-epoll")
        need = 0.5 if b == "burst" else 0.8
        xb, xf = st.ratio(b, p, v, bv), st.ratio(b, p, v, fv)
        ok = None if xb is None or xf is None else (xb > 1.0 and xf >= need)
        check(res, "%s %s: casyncio-epoll ahead of the best C peer and >= %.1fx the floor" % (b, p, need), ok,
              "%s vs %s %s (x%s), floor %s (x%s)" % (fmt(v, "/s"), bp, fmt(bv, "/s"), r2(xb),
                                                     fmt(fv, "/s"), r2(xf)))
    # spawn_reap
    ks = sorted({p for (b, p) in st.data if b == "spawn_reap"}, key=pkey)
    for k in ks:
        fv = st.get("spawn_reap", k, "floor-spawn")
        others = [n for n in st.data.get(("spawn_reap", k), {})
                  if n in C_PEERS and n != "libev" or n.startswith("asyncio-")]
        bp, bv = st.best_peer("spawn_reap", k, others)
        for w in ("pidfd", "fast"):
            v = st.get("spawn_reap", k, "casyncio-%s-epoll" % w)
            xf, xb = st.ratio("spawn_reap", k, v, fv), st.ratio("spawn_reap", k, v, bv)
            ok = None if xf is None or xb is None else (xf >= 0.95 and xb > 1.0)
            check(res, "spawn_reap %s in flight: %s >= 0.95x posix_spawn floor, ahead of libuv/GLib/sd-event/asyncio" % (k, w),
                  ok, "%s/s = x%s floor (%s/s); best of those peers %s %s/s (x%s)" % (
                      fmt(v, "/s"), r2(xf), fmt(fv, "/s"), bp, fmt(bv, "/s"), r2(xb)))
    # reap_scaling
    ms = sorted({p for (b, p) in st.data if b == "reap_scaling"}, key=pkey)
    if len(ms) >= 2:
        lo, hi = ms[0], ms[-1]

        def growth(n):
            a, b = st.get("reap_scaling", lo, n), st.get("reap_scaling", hi, n)
            return b / a if a and b else None
        g = growth("casyncio-fast-epoll")
        check(res, "reap_scaling: Fast within 1.2x of its M=%s cost at M=%s" % (lo, hi),
              None if g is None else g <= 1.2, "growth x%s" % r2(g))
        for m in ms:
            v, fv = st.get("reap_scaling", m, "casyncio-pidfd-epoll"), st.get("reap_scaling", m, "floor-pidfd")
            q = v / fv if v and fv else None
            check(res, "reap_scaling M=%s: Pidfd within 1.1x of bare pidfd+epoll" % m,
                  None if q is None else q <= 1.1,
                  "%s us vs %s us (x%s the floor's cost)" % (fmt(v, "us"), fmt(fv, "us"), r2(q)))
        # issue 14's targets for Uring (IORING_OP_WAITID): flat, and cheaper than the pidfd
        # floor once that floor holds thousands of fds.
        g = growth("casyncio-uring-epoll")
        check(res, "reap_scaling: Uring within 1.10x of its M=%s cost at M=%s" % (lo, hi),
              None if g is None else g <= 1.10, "growth x%s" % r2(g))
        v, fv = st.get("reap_scaling", hi, "casyncio-uring-epoll"), st.get("reap_scaling", hi, "floor-pidfd")
        q = v / fv if v and fv else None
        check(res, "reap_scaling M=%s: Uring <= 0.95x the bare pidfd+epoll cost" % hi,
              None if q is None else q <= 0.95,
              "%s us vs %s us (x%s the floor's cost)" % (fmt(v, "us"), fmt(fv, "us"), r2(q)))
        for w in ("safe", "multiloop"):
            g, ga = growth("casyncio-%s-epoll" % w), growth("asyncio-%s" % w)
            check(res, "reap_scaling: %s grows less than asyncio's %s" % (w, w),
                  None if g is None or ga is None else g < ga, "x%s vs asyncio x%s" % (r2(g), r2(ga)))
    # mem
    for (b, p), names in st.data.items():
        if b != "mem":
            continue
        for w in ("threaded", "multiloop", "safe", "fast", "pidfd", "uring"):
            v = st.get("mem", p, "casyncio-%s-epoll" % w)
            lim = 16.0 if w == "threaded" else 0.5
            check(res, "mem: %s under %g KB per child" % (w, lim), None if v is None else v < lim,
                  "%s KB/child (asyncio-%s: %s)" % (fmt(v, "KB"), w, fmt(st.get("mem", p, "asyncio-" + w), "KB")))
    # policy
    v = st.get("policy", 0, "casyncio-epoll")
    check(res, "ca_get_event_loop() with a loop set under 5 ns", None if v is None else v < 5,
          "%s ns (floor-tls %s, glib %s, sd-event %s, asyncio %s)" % (
              fmt(v, "ns"), fmt(st.get("policy", 0, "floor-tls"), "ns"), fmt(st.get("policy", 0, "glib"), "ns"),
              fmt(st.get("policy", 0, "sd-event"), "ns"), fmt(st.get("policy", 0, "asyncio"), "ns")))
    v = st.get("policy_instr", 0, "casyncio-epoll")
    if ("policy_instr", "0") in st.data:
        # the benchmark's own loop around the call is 5 instructions (mov, call, mov, add,
        # cmp, jne: see objdump of policy_workload); the target is for the call itself
        check(res, "ca_get_event_loop() under 30 instructions", None if v is None else v - 5 < 30,
              "%s per iteration, of which 5 are the benchmark loop (floor-tls %s)" % (
                  fmt(v, "i"), fmt(st.get("policy_instr", 0, "floor-tls"), "i")))
    # proactor
    for b in ("pingpong_sock", "stream"):
        cs = sorted({p for (bb, p) in st.data if bb == b}, key=pkey)
        for c in cs:
            u, e, lv = (st.get(b, c, "casyncio-uring"), st.get(b, c, "casyncio-epoll"), st.get(b, c, "libuv"))
            q = u / e if u and e else None
            need = 1.0 if c == "1" else 1.3 if c == "1000" else None
            if need is not None:
                check(res, "%s %s conn: proactor >= %.1fx epoll" % (b, c, need),
                      None if q is None else q >= need, "uring %s, epoll %s (x%s)" % (fmt(u, "/s"), fmt(e, "/s"), r2(q)))
            check(res, "%s %s conn: proactor and epoll both ahead of libuv" % (b, c),
                  None if not (u and e and lv) else (u > lv and e > lv),
                  "uring %s, epoll %s, libuv %s" % (fmt(u, "/s"), fmt(e, "/s"), fmt(lv, "/s")))
    # jobs
    for (b, p) in sorted(st.data, key=lambda k: pkey(k[1])):
        if b != "jobs":
            continue
        v, x, pa = st.get("jobs", p, "casyncio"), st.get("jobs", p, "xargs"), st.get("jobs", p, "parallel")
        check(res, "jobs -j %s: within 1.2x of xargs -P" % p, None if not (v and x) else x / v <= 1.2,
              "casyncio %s/s, xargs %s/s" % (fmt(v, "/s"), fmt(x, "/s")))
        check(res, "jobs -j %s: at least 10x GNU parallel" % p, None if not (v and pa) else v / pa >= 10,
              "casyncio %s/s, parallel %s/s (x%s)" % (fmt(v, "/s"), fmt(pa, "/s"), r2(v / pa if v and pa else None)))
    return res


def gnuplot(script, cwd):
    try:
        subprocess.run(["gnuplot"], input=script, text=True, cwd=cwd, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        return True
    except (OSError, subprocess.CalledProcessError) as e:
        print("report: gnuplot failed: %s" % getattr(e, "stderr", e), file=sys.stderr)
        return False


def plots(st, out, plotdir):
    made = []
    term = "set terminal pngcairo size 1000,600 font 'sans,10' noenhanced\n"
    colors = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2",
              "#7f7f7f", "#bcbd22", "#17becf", "#000000", "#aec7e8", "#ffbb78", "#98df8a",
              "#ff9896", "#c5b0d5", "#c49c94", "#f7b6d2", "#dbdb8d"]
    dat = os.path.abspath(out)
    pdir = os.path.abspath(plotdir)
    # 1. reap cost against M, one line per peer
    ms = sorted({p for (b, p) in st.data if b == "reap_scaling"}, key=pkey)
    names = sorted({n for (b, p) in st.data if b == "reap_scaling" for n in st.data[(b, p)]})
    if len(ms) >= 2 and names:
        with open(os.path.join(dat, "reap_scaling.dat"), "w") as f:
            f.write("# M " + " ".join(names) + "\n")
            for m in ms:
                f.write(m + " " + " ".join(
                    ("%.2f" % st.get("reap_scaling", m, n)) if st.get("reap_scaling", m, n) else "NaN"
                    for n in names) + "\n")
        lines = ", ".join(
            "'%s/reap_scaling.dat' using 1:%d with linespoints lw %d dt %d lc rgb '%s' title '%s'" % (
                dat, i + 2, 3 if n.startswith("casyncio") else 1, 1 if n.startswith(("casyncio", "floor")) else 2,
                colors[i % len(colors)], n) for i, n in enumerate(names))
        s = term + ("set output '%s/bench-reap-scaling.png'\nset title 'Cost of one spawn+reap with M idle "
                    "watched children (lower is better)'\nset xlabel 'M (idle watched children)'\n"
                    "set ylabel 'microseconds per spawn+reap'\nset key outside right\nset grid\n"
                    "set xtics (%s)\nplot %s\n") % (pdir, ", ".join(ms), lines)
        if gnuplot(s, dat):
            made.append("bench-reap-scaling.png")
    # 2. loop throughput relative to the floor, one cluster per workload
    benches = [bp for bp in LOOP_CASES if bp in st.data]
    lnames = ["casyncio-epoll", "casyncio-poll", "casyncio-uring", "libuv", "libev", "glib", "sd-event",
              "asyncio", "uvloop"]
    if benches:
        with open(os.path.join(dat, "loop.dat"), "w") as f:
            f.write("# bench " + " ".join(lnames) + "\n")
            for b, p in benches:
                fv = st.get(b, p, "floor-epoll")
                row = []
                for n in lnames:
                    v = st.get(b, p, n)
                    row.append("%.4f" % (v / fv) if v and fv else "NaN")
                label = "chain+fd" if (b, p) == ("chain", "1") else b
                f.write(label + " " + " ".join(row) + "\n")
        cols = ", ".join("'%s/loop.dat' using %d:xtic(1) lc rgb '%s' title '%s'" % (
            dat, i + 2, colors[i % len(colors)], n) for i, n in enumerate(lnames))
        s = term + ("set output '%s/bench-loop.png'\nset title 'Loop throughput relative to a bare epoll "
                    "loop (higher is better; 1 = the floor)'\nset style data histograms\n"
                    "set style histogram clustered gap 1\nset style fill solid 0.8 border -1\n"
                    "set logscale y\nset yrange [0.01:*]\nset ylabel 'x floor (log scale)'\n"
                    "set key outside right\nset grid ytics\nplot %s\n") % (pdir, cols)
        if gnuplot(s, dat):
            made.append("bench-loop.png")
    # 3. spawn+reap throughput bars
    ks = sorted({p for (b, p) in st.data if b == "spawn_reap"}, key=pkey)
    if ks:
        snames = sorted({n for k in ks for n in st.data[("spawn_reap", k)]},
                        key=lambda n: (0 if n.startswith("floor") else 1 if n.startswith("casyncio") else 2, n))
        with open(os.path.join(dat, "spawn.dat"), "w") as f:
            f.write("# name " + " ".join("k%s" % k for k in ks) + "\n")
            for n in snames:
                f.write(n + " " + " ".join(
                    ("%.1f" % st.get("spawn_reap", k, n)) if st.get("spawn_reap", k, n) else "NaN"
                    for k in ks) + "\n")
        cols = ", ".join("'%s/spawn.dat' using %d:xtic(1) title '%s in flight'" % (dat, i + 2, k)
                         for i, k in enumerate(ks))
        s = term.replace("1000,600", "1200,600") + (
            "set output '%s/bench-spawn.png'\nset title 'spawn+reap of /bin/true (higher is better)'\n"
            "set style data histograms\nset style histogram clustered gap 1\n"
            "set style fill solid 0.8 border -1\nset ylabel 'children per second'\n"
            "set xtics rotate by -45\nset grid ytics\nset key top right\nset yrange [0:*]\n"
            "plot %s\n") % (pdir, cols)
        if gnuplot(s, dat):
            made.append("bench-spawn.png")
    return made


def main():
    out, plotdir = sys.argv[1], sys.argv[2]
    doc = sys.argv[3] if len(sys.argv) > 3 else None
    st = Stats(load(out))
    machine = open(os.path.join(out, "machine.txt")).read().strip()
    fails = ""
    if os.path.exists(os.path.join(out, "failures.txt")):
        fails = open(os.path.join(out, "failures.txt")).read().strip()
    txt, md = tables(st)
    gt, gm = growth_table(st)
    ft, fm = fd_cost_lines(st)
    gt, gm = gt + ft, gm + fm
    res = targets(st)
    os.makedirs(plotdir, exist_ok=True)
    made = plots(st, out, plotdir)
    t = ["casyncio benchmarks", machine, "", "Ratios: times better than the reference (>1: faster or cheaper).",
         "", "== targets"]
    for what, verdict, detail in res:
        t.append("   [%-5s] %s: %s" % (verdict, what, detail))
    t += gt + txt
    if fails:
        t += ["", "== failed runs", fails]
    with open(os.path.join(out, "results.txt"), "w") as f:
        f.write("\n".join(t) + "\n")
    m = ["Machine: " + "; ".join(machine.splitlines()), "",
         "Ratios are *times better than the reference*: above 1.00 means faster (rates) or cheaper "
         "(us, KB, ns, instructions) than the best peer or the floor. Spread = (max - min) / median "
         "over the repetitions.", "", "### Targets", "", "| target | verdict | measured |", "|---|---|---|"]
    for what, verdict, detail in res:
        m.append("| %s | %s | %s |" % (what, "**FAILS**" if verdict == "FAILS" else verdict, detail))
    if made:
        m += ["", "### Plots", ""] + ["![%s](%s)" % (p, p) for p in made]
    m += ["", "### Growth"] + gm + ["", "### All measurements"] + md
    if fails:
        m += ["", "### Failed runs", "", "```", fails, "```"]
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write("\n".join(m) + "\n")
    if doc and os.path.exists(doc):
        s = open(doc).read()
        a, b = "<!-- BEGIN RESULTS -->", "<!-- END RESULTS -->"
        if a in s and b in s:
            s = s[:s.index(a) + len(a)] + "\n" + "\n".join(m) + "\n" + s[s.index(b):]
            with open(doc, "w") as f:
                f.write(s)
    print("\n".join(t))
    return 0


if __name__ == "__main__":
    sys.exit(main())
