#!/bin/sh
# Runs every test program of a build directory; prints "MODE: N passed, N failed, N skipped".
# usage: run-tests.sh BUILD_DIR MODE [valgrind]
# CA_TEST_JOBS=N runs N test programs at a time (default 1); each one's output is printed whole,
# in the programs' order, once it has ended.
set -u
bdir=$1
mode=${2:-}
wrap=${3:-}
jobs=${CA_TEST_JOBS:-1}

# One program (called by itself, below): its output to OUT.out, its exit code to OUT.rc.
# usage: run-tests.sh --one WRAP PROGRAM OUT
if [ "$bdir" = --one ]; then
    wrap=$2 t=$3 out=$4
    if [ "$wrap" = valgrind ]; then
        # valgrind's own messages go to files, not to fd 2: a child spawned by a test is
        # still valgrind's until it execs, and its stderr may be a pipe the test reads.
        # valgrind 3.19 cannot follow io_uring (the kernel writes through a shared ring it
        # does not see), so the io_uring loop kind is skipped here; ASan and TSan cover it.
        vgdir=$(mktemp -d)
        CASYNCIO_NO_IO_URING=1 CA_TEST_SLOW=${CA_TEST_SLOW:-8} valgrind -q --error-exitcode=99 \
            --leak-check=full --errors-for-leak-kinds=definite,indirect \
            --show-leak-kinds=definite,indirect --trace-children=no \
            --log-file="$vgdir/vg.%p" "$t" > "$out.out" 2>&1
        rc=$?
        for f in "$vgdir"/vg.*; do
            [ -f "$f" ] || continue
            grep -qvE 'unhandled syscall|^--[0-9]+-- |^==[0-9]+== *$' "$f" &&
                { echo "--- valgrind: $f"; cat "$f"; } >> "$out.out"
        done
        rm -rf "$vgdir"
    else
        "$t" > "$out.out" 2>&1
        rc=$?
    fi
    echo "$rc" > "$out.rc"
    exit 0
fi

passed=0 failed=0 skipped=0
dir=$(mktemp -d)
i=0
for t in "$bdir"/tests/test_*; do
    [ -x "$t" ] || continue
    i=$((i + 1))
    # Two lines per program, PROGRAM then OUT: a path may hold blanks.
    printf '%s\n%s\n' "$t" "$dir/$(printf %03d $i)"
done > "$dir/list"

report() { # $1 program, $2 its OUT: prints its output, adds its summary line to the totals
    echo "== $(basename "$1") ($mode)"
    cat "$2.out" 2>/dev/null
    rc=$(cat "$2.rc" 2>/dev/null || echo 127)
    line=$(grep -E '^\[[a-z_]+\] [0-9]+ passed, [0-9]+ failed' "$2.out" 2>/dev/null | tail -n 1)
    if [ -z "$line" ]; then
        echo "   $(basename "$1"): no summary (exit $rc): counted as one failure"
        failed=$((failed + 1))
        return
    fi
    p=$(echo "$line" | sed 's/.*] \([0-9]*\) passed.*/\1/')
    f=$(echo "$line" | sed 's/.* \([0-9]*\) failed.*/\1/')
    s=$(echo "$line" | sed 's/.* \([0-9]*\) skipped.*/\1/')
    passed=$((passed + p)) failed=$((failed + f)) skipped=$((skipped + s))
    if [ "$rc" -ne 0 ] && [ "$f" -eq 0 ]; then failed=$((failed + 1)); fi
}

if [ "$jobs" -gt 1 ]; then
    # The results are printed in order afterwards.
    xargs -d '\n' -n 2 -P "$jobs" sh "$0" --one "$wrap" < "$dir/list"
    while IFS= read -r t && IFS= read -r o; do report "$t" "$o"; done < "$dir/list"
else
    # The list on fd 3: the programs keep this script's stdin, as they always had.
    while IFS= read -r t <&3 && IFS= read -r o <&3; do
        sh "$0" --one "$wrap" "$t" "$o"
        report "$t" "$o"
    done 3< "$dir/list"
fi
rm -rf "$dir"
echo "$mode: $passed passed, $failed failed, $skipped skipped"
[ "$failed" -eq 0 ]
