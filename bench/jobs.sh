#!/bin/sh
# The job-runner workload (issue 8): N jobs of /bin/true, J at a time.
# usage: jobs.sh TOOL J N [BUILD_DIR]     TOOL: xargs | parallel | casyncio
# Prints the suite's output line:  name=TOOL bench=jobs param=J value=JOBS_PER_S unit=jobs/s
set -u
tool=$1 j=$2 n=$3 b=${4:-build/release}
list=$(mktemp)
trap 'rm -f "$list"' EXIT
seq "$n" > "$list"
now() { date +%s.%N; }
case $tool in
xargs) cmd="xargs -P $j -n 1 /bin/true" ;;
parallel) cmd="parallel --will-cite -j $j /bin/true" ;;
casyncio)
    if [ ! -x "$b/casyncio" ]; then
        echo "name=casyncio bench=jobs param=$j value=NA unit=jobs/s"
        echo "jobs.sh: $b/casyncio not built" >&2
        exit 0
    fi
    cmd="$b/casyncio run -j $j /bin/true" ;;
*) echo "jobs.sh: unknown tool $tool" >&2; exit 2 ;;
esac
t0=$(now)
$cmd < "$list" > /dev/null || { echo "jobs.sh: $tool failed" >&2; exit 1; }
t1=$(now)
awk -v n="$n" -v t0="$t0" -v t1="$t1" -v tool="$tool" -v j="$j" \
    'BEGIN { printf "name=%s bench=jobs param=%s value=%.6g unit=jobs/s\n", tool, j, n / (t1 - t0) }'
