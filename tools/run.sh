#!/bin/sh
# `make run`: shows casyncio run on the example job list (examples/jobs.txt): 32 jobs of varied
# length, run 8 at a time; one fails on purpose and one (nightly-backup, 60 s) is killed by
# --timeout. You see the progress bar (when stderr is a terminal), each job's output printed
# whole when it ends, the summary and the runner's exit status (the number of failed jobs).
# That status is printed, not returned: the failures are part of the demonstration.
# usage: run.sh BUILD_DIR
set -u
bdir=${1:-build/release}
cd "$(dirname "$0")/.." || exit 1
bin=$bdir/casyncio
if [ ! -x "$bin" ]; then
    echo "run.sh: $bin is not built (make cli)" >&2
    exit 1
fi
log=$bdir/jobs.log
bar=--no-bar
[ -t 2 ] && bar=--bar
echo "\$ casyncio run -j 8 --timeout 3 $bar --summary --joblog $log < examples/jobs.txt"
"$bin" run -j 8 --timeout 3 "$bar" --summary --joblog "$log" < examples/jobs.txt
status=$?
echo
echo "casyncio exited with status $status: the number of failed jobs (lint-docs fails on purpose,"
echo "nightly-backup is stopped by --timeout 3). The joblog is $log:"
head -n 4 "$log"
echo "..."
echo
echo "More: $bin run --help, $bin info, docs/cli.md."
exit 0
