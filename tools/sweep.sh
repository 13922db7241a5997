#!/bin/sh
# The allocation-failure sweep (docs/testing.md): runs BUILD_DIR/fault/workload once per N with
# CA_FAULT_N=N (the Nth allocation call fails), N = 1, 2, ... until a run ends without reaching
# call N. Each run is a fresh process with a time limit. A run passes when the workload's own
# checks pass (no unexplained error, no lost exit, no child, thread, fd or block left) and
# there was no crash, no sanitizer report and no hang. Closing line:
#   "sweep: N passed, N failed, N skipped"   (one per N)
# usage: sweep.sh BUILD_DIR MODE      env: SWEEP_JOBS (parallel runs, default 3),
#        SWEEP_TIMEOUT (seconds per run, default 60), SWEEP_MAX (last N tried, default 5000),
#        SWEEP_FROM (first N, default 1), SWEEP_VERBOSE=1 (print every run)
set -u
bdir=$1
mode=${2:-release}
bin=$bdir/fault/workload
jobs=${SWEEP_JOBS:-3}
limit=${SWEEP_TIMEOUT:-60}
max=${SWEEP_MAX:-5000}
n=${SWEEP_FROM:-1}
[ -x "$bin" ] || { echo "sweep: $bin is not built"; echo "sweep: 0 passed, 1 failed, 0 skipped"; exit 1; }
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
passed=0 failed=0 last=0 end=0 start=$(date +%s)
export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}

# Turns "prog(+0xADDR)" frames into "function file:line" where addr2line can.
symbolize() {
    while IFS= read -r l; do
        a=$(echo "$l" | sed -n 's/.*(+\(0x[0-9a-f]*\)).*/\1/p')
        if [ -n "$a" ] && command -v addr2line >/dev/null 2>&1; then
            addr2line -f -i -e "$bin" "$a" | paste -s -d' ' -
        else
            echo "$l"
        fi
    done
}

# Runs one N; leaves its exit status in $tmp/rc.N and its output in $tmp/out.N.
one() {
    CA_FAULT_N=$1 timeout -k 5 "$limit" "$bin" >"$tmp/out.$1" 2>&1
    echo $? >"$tmp/rc.$1"
}

while [ "$end" -eq 0 ] && [ "$n" -le "$max" ]; do
    first=$n
    j=0
    while [ "$j" -lt "$jobs" ]; do
        one "$n" &
        n=$((n + 1)) j=$((j + 1))
    done
    wait
    i=$first
    while [ "$i" -lt "$n" ]; do
        rc=$(cat "$tmp/rc.$i")
        why=""
        if grep -qE 'ERROR: (Address|Leak)Sanitizer|runtime error:|WARNING: ThreadSanitizer' "$tmp/out.$i"; then
            why="sanitizer report"
        elif [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
            why="hang (no exit within ${limit} s)"
        elif [ "$rc" -gt 128 ]; then
            why="killed by signal $((rc - 128))"
        elif [ "$rc" -eq 1 ]; then
            why="a check failed"
        elif [ "$rc" -ne 0 ] && [ "$rc" -ne 2 ]; then
            why="exit status $rc"
        fi
        if [ -n "$why" ]; then
            failed=$((failed + 1))
            echo "FAIL N=$i: $why"
            grep -v '^alloc_wrap: call\|^workload(\|^\S*(+0x\|^\S*(\w*+0x' "$tmp/out.$i" | sed 's/^/    /' | head -n 40
            echo "    the failed allocation call:"
            sed -n '/^alloc_wrap: call/,/__libc_start_main\|start_thread/p' "$tmp/out.$i" | symbolize | sed 's/^/      /' | head -n 14
        else
            passed=$((passed + 1))
            [ "${SWEEP_VERBOSE:-0}" = 1 ] && echo "ok N=$i: $(tail -n 1 "$tmp/out.$i")"
            if [ "$rc" -eq 2 ]; then
                end=1
                [ "$last" -eq 0 ] && last=$i
            fi
        fi
        rm -f "$tmp/out.$i" "$tmp/rc.$i"
        i=$((i + 1))
    done
done
if [ "$end" -eq 0 ]; then
    echo "sweep: SWEEP_MAX=$max reached before a run ended without an injected failure"
    failed=$((failed + 1))
fi
echo "sweep ($mode): N = ${SWEEP_FROM:-1}..$((n - 1)); the workload made $((last - 1)) allocation calls in its run without a failure; $(($(date +%s) - start)) s"
echo "sweep: $passed passed, $failed failed, 0 skipped"
[ "$failed" -eq 0 ]
