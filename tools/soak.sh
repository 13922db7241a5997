#!/bin/sh
# Runs the multi-thread soak (tests/fault/soak.c, docs/testing.md) for SOAK_SECONDS and prints
# "soak: N passed, N failed, N skipped" (one run: passed when it ended by itself, clean, with
# no sanitizer report). A time limit of SOAK_SECONDS + 120 s catches a hang.
# usage: soak.sh BUILD_DIR MODE       env: SOAK_SECONDS (default 60)
set -u
bdir=$1
mode=${2:-release}
bin=$bdir/fault/soak
secs=${SOAK_SECONDS:-60}
[ -x "$bin" ] || { echo "soak: $bin is not built"; echo "soak: 0 passed, 1 failed, 0 skipped"; exit 1; }
out=$(mktemp)
export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}
export TSAN_OPTIONS=${TSAN_OPTIONS:-halt_on_error=1:exitcode=66:second_deadlock_stack=1}
start=$(date +%s)
SOAK_SECONDS=$secs timeout -k 10 $((secs + 120)) "$bin" >"$out" 2>&1
rc=$?
why=""
if grep -qE 'ERROR: (Address|Leak)Sanitizer|runtime error:|WARNING: ThreadSanitizer' "$out"; then
    why="sanitizer report"
elif [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
    why="hang (still running $((secs + 120)) s after the start)"
elif [ "$rc" -gt 128 ]; then
    why="killed by signal $((rc - 128))"
elif [ "$rc" -ne 0 ] || ! grep -q '^soak: clean$' "$out"; then
    why="a check failed (exit status $rc)"
fi
elapsed=$(($(date +%s) - start))
if [ -n "$why" ]; then
    echo "FAIL soak ($mode, ${secs} s; ended after $elapsed s): $why"
    # The first report in full (that is the one that matters), then a count of the rest.
    head -n 150 "$out" | sed 's/^/    /'
    n=$(wc -l <"$out")
    [ "$n" -gt 150 ] && echo "    ... ($((n - 150)) more lines)"
    rm -f "$out"
    echo "soak: 0 passed, 1 failed, 0 skipped"
    exit 1
fi
grep '^soak: [0-9]' "$out"
rm -f "$out"
echo "soak ($mode): clean for $secs s"
echo "soak: 1 passed, 0 failed, 0 skipped"
