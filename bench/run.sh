#!/bin/sh
# The benchmark driver (`make bench`; `make bench QUICK=1` for the CI smoke test).
#
# usage: sh bench/run.sh [BUILD_DIR]
# environment:
#   QUICK=1     reduced sizes, one repetition, results under build/bench only (< 2 minutes)
#   REPS=N      repetitions (default 3; QUICK: 1)
#   REPS_SLOW=N repetitions of the slow workloads, reap_scaling and jobs (default: min(REPS, 2))
#   ONLY=REGEX  run only the workloads whose name matches (grep -E), e.g. ONLY='spawn|reap';
#               results then stay under build/bench (docs/ is written by complete runs only)
#   PY_WATCH=PY the interpreter for the Python watcher workloads (bench/py_watchers.py; default
#               python3 from PATH, with its headers); ONLY=python runs only those
#
# Installs the missing peers (tools/deps.sh bench), builds every program into build/bench/,
# runs every workload REPS times interleaving the peers (the order is reversed on every other
# repetition: A B C, C B A, ...), then bench/report.py prints medians, spreads and ratios to
# the best peer and to the floor, writes build/bench/results.txt and results.md, and (in the
# full mode) the plots docs/bench-*.png and the table in docs/benchmarks.md.
# Exits non-zero only when a program fails (crash, non-zero exit, no result line, timeout);
# slow numbers never fail it.  A casyncio feature that is missing prints value=NA.
set -u
B=${1:-build/release}
QUICK=${QUICK:-0}
if [ "$QUICK" != 0 ]; then REPS=${REPS:-1}; else REPS=${REPS:-3}; fi
ONLY=${ONLY:-.}
[ "$REPS" -lt 2 ] && REPS_SLOW=${REPS_SLOW:-$REPS}
REPS_SLOW=${REPS_SLOW:-2}
SLOW="reap_scaling jobs"
OUT=build/bench
PY=/usr/bin/python3   # Debian's python: python3-uvloop is installed for it, not for pyenv's
cd "$(dirname "$0")/.." || exit 1

# ---- peers ------------------------------------------------------------------------------
# /usr/bin first, so that deps.sh's `python3 -c 'import uvloop'` asks Debian's python.
PATH=/usr/bin:$PATH sh tools/deps.sh bench || { echo "bench: missing peers" >&2; exit 1; }
[ -f "$B/libcasyncio.a" ] || { echo "bench: $B/libcasyncio.a missing: run make lib" >&2; exit 1; }

# ---- build ------------------------------------------------------------------------------
mkdir -p "$OUT/logs"
CC=${CC:-cc}
CF="-std=c17 -D_GNU_SOURCE -O2 -g -Wall -Wextra -Werror -pthread"
build() { # out src flags...
    o=$1 s=$2
    shift 2
    if ! $CC $CF -o "$OUT/$o" "bench/$s" "$@" 2> "$OUT/logs/build-$o.log"; then
        cat "$OUT/logs/build-$o.log" >&2
        echo "bench: building $o failed" >&2
        exit 1
    fi
}
build floor floor.c -lm -luring
build peer_uv peer_uv.c $(pkg-config --cflags --libs libuv)
build peer_ev peer_ev.c -lev
build peer_glib peer_glib.c $(pkg-config --cflags --libs glib-2.0)
build peer_sdevent peer_sdevent.c $(pkg-config --cflags --libs libsystemd)
# whole archive + weak declarations: a function not yet in the library reads as NULL (NA)
build bench_casyncio bench_casyncio.c -Iinclude -Wl,--whole-archive "$B/libcasyncio.a" \
    -Wl,--no-whole-archive -luring -lm

# ---- the plan: one line per (workload, param, N, runner); runner[@N] overrides N ---------
PLAN=$OUT/plan.txt
: > "$PLAN"
plan() { # workload param n runner...
    w=$1 p=$2 n=$3
    shift 3
    echo "$w" | grep -Eq "$ONLY" || return 0
    for r in "$@"; do echo "$w $p $n $r" >> "$PLAN"; done
}
WATCHERS="threaded multiloop safe fast pidfd"
CA_W=""; PY_W=""
for w in $WATCHERS; do CA_W="$CA_W ca:$w-epoll"; PY_W="$PY_W py:$w"; done
# casyncio's own watchers that asyncio does not have (no py: peer): IORING_OP_WAITID.
CA_ONLY_WATCHERS="uring"
for w in $CA_ONLY_WATCHERS; do CA_W="$CA_W ca:$w-epoll"; done
LOOPS="ca:epoll ca:poll ca:uring"
C_PEERS="uv ev glib sd"
if [ "$QUICK" != 0 ]; then
    K_LIST="1 16"; SPAWN_N=200; M_LIST="0 100"; SCALE_N=50; MEM_N=100
    SOON_N=100000; TIMER_N=100000; PY_TIMER_N=20000; SD_TIMER_N=20000; PING_N=20000; PY_SOCK_N=10000
    CONN_LIST="1 100"; STREAM_MIB=16; TS_N=20000; POLICY_N=1000000; PY_POLICY_N=100000
    J_LIST="16"; JOBS_N=200; PAR_N=100; CG=0
    CA_SPAWN="$CA_W ca:pidfd-poll ca:pidfd-uring"
else
    K_LIST="1 16 128"; SPAWN_N=2000; M_LIST="0 1000 4000"; SCALE_N=500; MEM_N=1000
    SOON_N=1000000; TIMER_N=1000000; PY_TIMER_N=200000; SD_TIMER_N=100000; PING_N=200000; PY_SOCK_N=50000
    CONN_LIST="1 100 1000"; STREAM_MIB=256; TS_N=200000; POLICY_N=10000000; PY_POLICY_N=1000000
    J_LIST="2 16 128"; JOBS_N=10000; PAR_N=500; CG=1
    CA_SPAWN="$CA_W"
    for l in poll uring; do
        for w in $WATCHERS $CA_ONLY_WATCHERS; do CA_SPAWN="$CA_SPAWN ca:$w-$l"; done
    done
fi
for k in $K_LIST; do
    plan spawn_reap "$k" "$SPAWN_N" floor:spawn floor:pidfd $C_PEERS $PY_W py:uvloop $CA_SPAWN
done
# floor:uring-*: the three io_uring designs of docs/benchmarks.md ("Three WAITID/pidfd designs
# measured side by side"): a WAITID per child, one WAITID(P_ALL), pidfds as fixed files + POLL_ADD
FLOOR_URING="floor:uring-waitid floor:uring-waitall floor:uring-pollfixed"
for m in $M_LIST; do
    plan reap_scaling "$m" "$SCALE_N" floor:spawn floor:pidfd floor:waitany $FLOOR_URING $C_PEERS \
        $PY_W py:uvloop $CA_W
done
for m in $M_LIST; do plan fd_cost "$m" "$SCALE_N" floor:spawn; done
plan mem "$MEM_N" - floor:spawn floor:pidfd $C_PEERS $PY_W py:uvloop $CA_W
plan burst 0 "$SOON_N" floor:epoll $C_PEERS py:asyncio py:uvloop $LOOPS
plan chain 0 "$SOON_N" floor:epoll $C_PEERS py:asyncio py:uvloop $LOOPS
plan chain 1 "$SOON_N" floor:epoll $C_PEERS py:asyncio py:uvloop $LOOPS
plan timers 0 "$TIMER_N" floor:epoll uv ev glib "sd@$SD_TIMER_N" "py:asyncio@$PY_TIMER_N" \
    "py:uvloop@$PY_TIMER_N" $LOOPS
plan pingpong 1 "$PING_N" floor:epoll $C_PEERS py:asyncio py:uvloop $LOOPS
for c in $CONN_LIST; do
    if [ "$c" = 1 ]; then
        plan pingpong_sock 1 "$PING_N" floor:epoll uv "py:asyncio@$PY_SOCK_N" "py:uvloop@$PY_SOCK_N" $LOOPS
    else
        plan pingpong_sock "$c" "$PING_N" floor:epoll uv $LOOPS
    fi
    plan stream "$c" "$STREAM_MIB" floor:epoll uv $LOOPS
done
plan threadsafe 0 "$TS_N" floor:epoll $C_PEERS py:asyncio py:uvloop $LOOPS
plan policy 0 "$POLICY_N" floor:tls uv glib sd "py:asyncio@$PY_POLICY_N" ca:epoll
[ "$CG" = 1 ] && plan policy_instr 0 100000 floor:tls uv glib sd ca:epoll
for j in $J_LIST; do
    plan jobs "$j" "$JOBS_N" job:xargs "job:parallel@$PAR_N" job:casyncio
done

# ---- run --------------------------------------------------------------------------------
RAW=$OUT/raw.txt
: > "$RAW"
FAILS=$OUT/failures.txt
: > "$FAILS"
: > "$OUT/timing.txt"
{
    echo "date=$(date -u '+%Y-%m-%d %H:%M UTC')"
    echo "nproc=$(nproc)"
    echo "kernel=$(uname -r)"
    echo "cpu=$(grep -m1 'model name' /proc/cpuinfo | sed 's/.*: //')"
    echo "load_start=$(cut -d' ' -f1-3 /proc/loadavg)"
    echo "quick=$QUICK reps=$REPS (reap_scaling and jobs: $REPS_SLOW)"
    echo "versions=libuv $(pkg-config --modversion libuv), libev $(grep -m1 'define EV_VERSION_MAJOR' /usr/include/ev.h | awk '{print $3}').$(grep -m1 'define EV_VERSION_MINOR' /usr/include/ev.h | awk '{print $3}'), glib $(pkg-config --modversion glib-2.0), libsystemd $(pkg-config --modversion libsystemd), python $($PY -c 'import sys; print(sys.version.split()[0])'), uvloop $($PY -c 'import uvloop; print(uvloop.__version__)')"
} > "$OUT/machine.txt"

# callgrind: instructions per call = (Ir at 2N - Ir at N) / N, so start-up cancels out
callgrind_ir() { # n cmd...
    valgrind --tool=callgrind --callgrind-out-file=/dev/null "$@" 2>&1 >/dev/null |
        sed -n 's/.*Collected : *\([0-9]*\).*/\1/p' | tail -n 1
}

run_instr() { # rep n runner cmd...  (cmd has N as its 4th word from the end for C programs)
    rep=$1 n=$2 r=$3
    shift 3
    bin=$1 extra=${5:-}
    a=$(callgrind_ir "$bin" policy 0 "$n" $extra)
    b=$(callgrind_ir "$bin" policy 0 $((n * 2)) $extra)
    nm=$(timeout 60 "$bin" policy 0 1000 $extra 2>/dev/null | sed -n 's/^name=\([^ ]*\) .*/\1/p')
    if [ -z "$a" ] || [ -z "$b" ] || [ -z "$nm" ]; then
        echo "FAIL rep=$rep policy_instr $r (callgrind)" | tee -a "$FAILS" >&2
        return 1
    fi
    line=$(awk -v a="$a" -v b="$b" -v n="$n" -v nm="$nm" \
        'BEGIN { printf "name=%s bench=policy_instr param=0 value=%.1f unit=instr/call", nm, (b - a) / n }')
    echo "rep=$rep $line" >> "$RAW"
    echo "  $line"
}

run_one() { # rep workload param n runner
    rep=$1 w=$2 p=$3 n=$4 r=$5
    case $r in *@*) n=${r#*@}; r=${r%@*} ;; esac
    tool=${r%%:*} var=${r#*:}
    [ "$var" = "$r" ] && var=""
    wl=$w
    [ "$w" = policy_instr ] && wl=policy
    case $tool in
    floor) set -- "$OUT/floor" "$wl" "$p" "$n" "$var" ;;
    uv) set -- "$OUT/peer_uv" "$wl" "$p" "$n" ;;
    ev) set -- "$OUT/peer_ev" "$wl" "$p" "$n" ;;
    glib) set -- "$OUT/peer_glib" "$wl" "$p" "$n" ;;
    sd) set -- "$OUT/peer_sdevent" "$wl" "$p" "$n" ;;
    py) set -- "$PY" bench/peer_asyncio.py "$wl" "$p" "$n" "$var" ;;
    ca) set -- "$OUT/bench_casyncio" "$wl" "$p" "$n" "$var" ;;
    job) set -- sh bench/jobs.sh "$var" "$p" "$n" "$B" ;;
    *) echo "bench: unknown runner $r" >&2; return 1 ;;
    esac
    log=$OUT/logs/$w-$p-$(echo "$r" | tr ':/' '__').log
    if [ "$w" = policy_instr ]; then
        run_instr "$rep" "$n" "$r" "$@"
        return $?
    fi
    echo "== rep $rep: $*" >> "$log"
    t0=$(date +%s.%N)
    # to a file, not $(...): a child left behind by a crashed peer must not hold our pipe
    timeout 600 "$@" > "$OUT/last.out" 2>> "$log"
    rc=$?
    res=$(cat "$OUT/last.out")
    echo "$w $p $r $(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.2f", b - a }')" >> "$OUT/timing.txt"
    if [ $rc != 0 ] || ! echo "$res" | grep -q '^name='; then
        echo "FAIL rep=$rep $w $p $r (exit $rc; see $log)" | tee -a "$FAILS" >&2
        tail -n 5 "$log" >&2
        return 1
    fi
    echo "$res" | grep '^name=' | sed "s/^/rep=$rep /" >> "$RAW"
    echo "$res" | grep '^name=' | sed 's/^/  /'
}

t_start=$(date +%s)
rep=1
while [ "$rep" -le "$REPS" ]; do
    echo "bench: repetition $rep of $REPS"
    # groups of (workload, param) in plan order; runners within a group alternate direction
    for g in $(awk '{print $1 "|" $2}' "$PLAN" | awk '!seen[$0]++'); do
        w=${g%|*} p=${g#*|}
        case " $SLOW " in *" $w "*) [ "$rep" -gt "$REPS_SLOW" ] && continue ;; esac
        runners=$(awk -v w="$w" -v p="$p" '$1 == w && $2 == p {print $3 " " $4}' "$PLAN")
        if [ $((rep % 2)) = 0 ]; then
            runners=$(echo "$runners" | awk '{a[NR] = $0} END {for (i = NR; i > 0; i--) print a[i]}')
        fi
        echo "$runners" | while read -r n r; do
            run_one "$rep" "$w" "$p" "$n" "$r" || true
        done
    done
    rep=$((rep + 1))
done
echo "load_end=$(cut -d' ' -f1-3 /proc/loadavg)" >> "$OUT/machine.txt"
echo "elapsed_s=$(($(date +%s) - t_start))" >> "$OUT/machine.txt"

# ---- python: casyncio's watchers against asyncio's own (bench/py_watchers.py) -------------
# One interpreter for both sides, measured in the same run, interleaved. PY_WATCH picks it
# (default: python3 from PATH, which must have its headers: make python builds the module).
PY_WATCH=${PY_WATCH:-python3}
PYMD=$OUT/python.md
if echo "python" | grep -Eq "$ONLY"; then
    echo "bench: python watchers ($PY_WATCH)"
    if sh python/build.sh "$PY_WATCH" "$OUT/python" "$B" "$CC" > "$OUT/logs/build-python.log" 2>&1
    then
        qa=""
        [ "$QUICK" != 0 ] && qa=--quick
        if ! PYTHONPATH=$OUT/python timeout 3600 "$PY_WATCH" bench/py_watchers.py $qa \
                --reps "$REPS" --md "$PYMD" > "$OUT/logs/python.log" 2>&1; then
            echo "FAIL python watchers (see $OUT/logs/python.log)" | tee -a "$FAILS" >&2
        fi
        grep -E '^\|' "$OUT/logs/python.log"
    else
        cat "$OUT/logs/build-python.log" >&2
        echo "FAIL python module build for $PY_WATCH" | tee -a "$FAILS" >&2
    fi
fi

# ---- report -----------------------------------------------------------------------------
if [ "$QUICK" != 0 ] || [ "$ONLY" != . ]; then   # docs/ only from a complete full run
    $PY bench/report.py "$OUT" "$OUT" || { echo "bench: report failed" >&2; exit 1; }
else
    $PY bench/report.py "$OUT" docs docs/benchmarks.md || { echo "bench: report failed" >&2; exit 1; }
    # The Python section of docs/benchmarks.md, between its own markers.
    if [ -s "$PYMD" ]; then
        $PY - "$PYMD" docs/benchmarks.md <<'PYEOF' || { echo "bench: python report failed" >&2; exit 1; }
import sys
new, doc = open(sys.argv[1]).read(), sys.argv[2]
text = open(doc).read()
a, b = "<!-- BEGIN PYTHON RESULTS -->", "<!-- END PYTHON RESULTS -->"
if a in text and b in text:
    text = text[:text.index(a) + len(a)] + "\n" + new + text[text.index(b):]
    open(doc, "w").write(text)
PYEOF
    fi
fi
if [ -s "$FAILS" ]; then
    echo "bench: $(wc -l < "$FAILS") program run(s) failed:" >&2
    cat "$FAILS" >&2
    exit 1
fi
echo "bench: done in $(($(date +%s) - t_start)) s; results in $OUT/results.txt and $OUT/results.md"
