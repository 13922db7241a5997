#!/bin/sh
# Runs each libFuzzer target of FUZZ_DIR (made by `make fuzz-bins`) for FUZZ_SECONDS (default
# 60), starting from the seeds in tests/fuzz/corpus_NAME; the corpus grows in
# FUZZ_DIR/corpus_NAME. A crash, sanitizer report, leak, timeout (FUZZ_TIMEOUT s per input,
# default 25) or out-of-memory fails the target; the reproducer is left in FUZZ_DIR.
# Reproduce with: FUZZ_DIR/fuzz_NAME FILE.   Closing line: "fuzz: N passed, N failed, N skipped"
# usage: fuzz.sh FUZZ_DIR
set -u
dir=${1:-build/fuzz}
secs=${FUZZ_SECONDS:-60}
passed=0 failed=0 skipped=0
for name in api cli; do
    bin=$dir/fuzz_$name
    if [ ! -x "$bin" ]; then
        echo "fuzz: $bin is not built: skipped"
        skipped=$((skipped + 1))
        continue
    fi
    mkdir -p "$dir/corpus_$name"
    log=$dir/fuzz_$name.log
    start=$(date +%s)
    # -close_fd_mask is not used: the reports go to stderr. One process: the workers of
    # -fork/-jobs would multiply the CPU the CI has (2 cores).
    ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1} \
        timeout -k 10 $((secs + 120)) "$bin" -max_total_time="$secs" -timeout="${FUZZ_TIMEOUT:-25}" \
        -rss_limit_mb=2048 -print_final_stats=1 -artifact_prefix="$dir/fuzz_$name-" \
        "$dir/corpus_$name" "tests/fuzz/corpus_$name" >"$log" 2>&1
    rc=$?
    runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1)
    if [ "$rc" -eq 0 ]; then
        passed=$((passed + 1))
        echo "fuzz_$name: ${runs:-?} inputs in $(($(date +%s) - start)) s, clean (corpus: $(ls "$dir/corpus_$name" | wc -l) files)"
    else
        failed=$((failed + 1))
        echo "FAIL fuzz_$name (exit $rc after $(($(date +%s) - start)) s): the report:"
        grep -vE '^(#[0-9]+|INFO:|\s+NEW_FUNC)' "$log" | grep -v '^ *"' | head -n 80 | sed 's/^/    /'
        ls "$dir"/fuzz_"$name"-* 2>/dev/null | sed 's/^/    reproducer: /'
    fi
done
echo "fuzz: $passed passed, $failed failed, $skipped skipped"
[ "$failed" -eq 0 ]
