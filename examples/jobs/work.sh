#!/bin/sh
# A stand-in for real work, used by examples/jobs.txt: prints a line halfway through SECONDS and
# one at the end (two lines that other jobs' output never splits). With "fail" as the third
# argument it reports an error on stderr and exits 1.
# usage: work.sh NAME SECONDS [fail]
set -u
name=$1
half=$(awk -v s="$2" 'BEGIN { printf "%.3f", s / 2 }')
sleep "$half"
echo "$name: halfway"
sleep "$half"
if [ "${3:-}" = fail ]; then
    echo "$name: error: 2 broken links in chapter 4" >&2
    exit 1
fi
echo "$name: done in $2s"
