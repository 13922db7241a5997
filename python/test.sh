#!/bin/sh
# The Python tests (`make test-python`, `make test-python-all`, and `make test`).
#
# usage: sh python/test.sh BUILD_DIR CC PYTHON|all
# For each interpreter (PYTHON, or with "all" every CPython 3.8+ under $(pyenv root)/versions):
# builds the package into build/python (make python), runs the package's own tests
# (python/tests) and CPython's own subprocess watcher tests against our five classes
# (python/run_cpython_tests.py, with and without --as-asyncio). An interpreter without its test
# package (Debian's python3 without libpython3.X-testsuite) borrows the test package of pyenv's
# CPython of the same X.Y when there is one (said so in the output), else those tests count as
# one skip.
# Last line: "python: N passed, N failed, N skipped" (a build failure counts as one failure).
set -u
B=$1 CC=$2 WHICH=$3
DEST=build/python
P=0 F=0 S=0
root=$(pyenv root 2>/dev/null || echo "$HOME/.pyenv")

add() { # $1: output file; adds its "<name>: N passed, N failed, N skipped" line
    line=$(grep -E '^[a-z-]+: [0-9]+ passed, [0-9]+ failed, [0-9]+ skipped$' "$1" | tail -n 1)
    if [ -z "$line" ]; then F=$((F + 1)); return; fi
    set -- $(echo "$line" |
        sed -E 's/^[a-z-]+: ([0-9]+) passed, ([0-9]+) failed, ([0-9]+) skipped$/\1 \2 \3/')
    P=$((P + $1)) F=$((F + $2)) S=$((S + $3))
}

# unittest's summary as our summary line
unit_summary() { # $1: unittest output file
    ran=$(sed -nE 's/^Ran ([0-9]+) tests? in .*/\1/p' "$1" | tail -n 1)
    ran=${ran:-0}
    fl=$(sed -nE 's/.*failures=([0-9]+).*/\1/p' "$1" | tail -n 1)
    er=$(sed -nE 's/.*errors=([0-9]+).*/\1/p' "$1" | tail -n 1)
    sk=$(sed -nE 's/.*skipped=([0-9]+).*/\1/p' "$1" | tail -n 1)
    fl=${fl:-0} er=${er:-0} sk=${sk:-0}
    failed=$((fl + er))
    [ "$ran" = 0 ] && failed=$((failed + 1))
    # (a failing subTest counts as a failure of its own: the passed count stays >= 0)
    passed=$((ran - failed - sk < 0 ? 0 : ran - failed - sk))
    echo "module-tests: $passed passed, $failed failed, $sk skipped"
}

if [ "$WHICH" = all ]; then
    pys=$(ls -d "$root"/versions/3.* 2>/dev/null | while read -r d; do
        v=$(basename "$d")
        case $v in 3.[0-7].*|3.[0-7]) continue ;; esac
        [ -x "$d/bin/python3" ] && echo "$d/bin/python3"
    done)
    [ -n "$pys" ] || pys=python3
else
    pys=$WHICH
fi

out=$(mktemp)
for py in $pys; do
    ver=$("$py" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null) || {
        echo "python: $py does not run"; F=$((F + 1)); continue; }
    echo "=== python $py ($ver)"
    if ! sh python/build.sh "$py" "$DEST" "$B" "$CC" > "$out" 2>&1; then
        cat "$out"; echo "python: build failed for $py"; F=$((F + 1)); continue
    fi
    PYTHONPATH=$DEST timeout 600 "$py" -m unittest discover -s python/tests > "$out" 2>&1
    unit_summary "$out" >> "$out"
    grep -E '^(FAIL|ERROR):|^module-tests:' "$out"
    add "$out"
    testpy=$py
    if ! "$py" -c 'import test.test_asyncio.test_subprocess' >/dev/null 2>&1; then
        testpy=
        for d in "$root"/versions/$ver.*; do
            [ -x "$d/bin/python3" ] && testpy=$d/bin/python3
        done
        if [ -n "$testpy" ]; then
            echo "python: $py has no test package: CPython's tests run on $testpy instead"
            sh python/build.sh "$testpy" "$DEST" "$B" "$CC" > "$out" 2>&1 || {
                cat "$out"; F=$((F + 1)); continue; }
        fi
    fi
    if [ -z "$testpy" ]; then
        echo "python: no CPython test package for $ver: its watcher tests are skipped"
        S=$((S + 1))
        continue
    fi
    # Both ways of running CPython's tests with our classes: the mixin with ours, and the
    # module's own classes with asyncio's replaced by ours.
    for mode in "" --as-asyncio; do
        PYTHONPATH=$DEST timeout 1800 "$testpy" python/run_cpython_tests.py $mode > "$out" 2>&1
        grep -E '^(FAIL|ERROR):|^cpython-tests:|Timeout|Fatal' "$out"
        add "$out"
    done
done
rm -f "$out"
echo "python: $P passed, $F failed, $S skipped"
[ "$F" = 0 ]
