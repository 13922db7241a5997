#!/bin/sh
# The job-runner workloads (issues 8 and 15).
# usage: jobs.sh TOOL J N [BUILD_DIR]     TOOL: xargs | parallel | casyncio
#        N jobs of /bin/true, J at a time; prints the suite's output line:
#        name=TOOL bench=jobs param=J value=JOBS_PER_S unit=jobs/s
#   jobs.sh rss TOOL [BYTES] [BUILD_DIR]   TOOL: casyncio | parallel
#        one job printing BYTES (default 1 GB) to a runner whose stdout is /dev/null: the
#        runner's peak RSS (GNU time's %M), name=TOOL bench=job_output_rss value=KB unit=KB
#   jobs.sh ssh TOOL N J [BUILD_DIR]       TOOL: casyncio | parallel | parallel-M
#        N jobs of true on one ssh host, J at a time, against a private sshd this script
#        starts on 127.0.0.1 (a free port, keys in a temporary directory; stopped on exit).
#        casyncio always keeps one ControlMaster per host; parallel-M is parallel -M.
#   jobs.sh targets [REPS] [BUILD_DIR]
#        issue 15's targets side by side, interleaved (A B C, then C B A...), REPS times
#        (default 3): 3,000 true at -j16 (casyncio, xargs -P 16 -n 1, parallel), 1 GB output
#        peak RSS, 200 jobs on one ssh host at -j 8 (casyncio, parallel -S, parallel -S -M).
#        ONLY="jobs rss ssh" picks some of them.
set -u
now() { date +%s.%N; }

sshd_dir=
sshd_pid=
stop_sshd() {
    [ -n "$sshd_pid" ] && kill "$sshd_pid" 2>/dev/null && wait "$sshd_pid" 2>/dev/null
    [ -n "$sshd_dir" ] && rm -rf "$sshd_dir"
    sshd_pid= sshd_dir=
}
# Starts a private sshd on 127.0.0.1 and sets $ssh_cmd to the client command for it.
start_sshd() {
    [ -x /usr/sbin/sshd ] || { echo "jobs.sh: no /usr/sbin/sshd (apt-get install openssh-server)" >&2; return 1; }
    sshd_dir=$(mktemp -d /tmp/casyncio-bench-sshd.XXXXXX)
    [ "$(id -u)" = 0 ] && mkdir -p /run/sshd
    ssh-keygen -q -t ed25519 -N '' -f "$sshd_dir/host_key" &&
        ssh-keygen -q -t ed25519 -N '' -f "$sshd_dir/user_key" &&
        cp "$sshd_dir/user_key.pub" "$sshd_dir/authorized_keys" || return 1
    for attempt in 1 2 3 4 5; do
        port=$(( 20000 + $(od -An -N2 -tu2 /dev/urandom) % 40000 ))
        cat > "$sshd_dir/sshd_config" <<CONF
Port $port
ListenAddress 127.0.0.1
HostKey $sshd_dir/host_key
AuthorizedKeysFile $sshd_dir/authorized_keys
PidFile $sshd_dir/sshd.pid
StrictModes no
UsePAM no
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
MaxStartups 200
MaxSessions 200
# SHLVL=1 makes the login bash count as nested, so that it does not source ~/.bashrc for a
# non-interactive ssh session (Debian's bash does, for a top-level shell started by sshd).
# The account this was measured with runs `pyenv init` there, 0.3 s a session for every
# runner alike; SSH_RC=1 keeps it.
$( [ "${SSH_RC:-0}" = 1 ] || echo "SetEnv SHLVL=1" )
CONF
        cat > "$sshd_dir/ssh_config" <<CONF
Host *
  Port $port
  IdentityFile $sshd_dir/user_key
  IdentitiesOnly yes
  UserKnownHostsFile /dev/null
  StrictHostKeyChecking no
  LogLevel ERROR
  BatchMode yes
CONF
        /usr/sbin/sshd -D -e -f "$sshd_dir/sshd_config" 2>"$sshd_dir/log" &
        sshd_pid=$!
        ssh_cmd="ssh -F $sshd_dir/ssh_config"
        i=0
        while [ $i -lt 50 ]; do
            $ssh_cmd 127.0.0.1 true 2>/dev/null && return 0
            kill -0 "$sshd_pid" 2>/dev/null || break
            sleep 0.1; i=$((i + 1))
        done
        kill "$sshd_pid" 2>/dev/null; wait "$sshd_pid" 2>/dev/null; sshd_pid=
    done
    echo "jobs.sh: sshd does not start: $(cat "$sshd_dir/log")" >&2
    return 1
}

run_jobs() { # TOOL J N BUILD_DIR
    tool=$1 j=$2 n=$3 b=$4
    list=$(mktemp)
    seq "$n" > "$list"
    case $tool in
    xargs) cmd="xargs -P $j -n 1 /bin/true" ;;
    parallel) cmd="parallel --will-cite -j $j /bin/true" ;;
    casyncio)
        if [ ! -x "$b/casyncio" ]; then
            echo "name=casyncio bench=jobs param=$j value=NA unit=jobs/s"
            echo "jobs.sh: $b/casyncio not built" >&2
            rm -f "$list"; return 0
        fi
        cmd="$b/casyncio run -j $j /bin/true" ;;
    *) echo "jobs.sh: unknown tool $tool" >&2; rm -f "$list"; exit 2 ;;
    esac
    t0=$(now)
    $cmd < "$list" > /dev/null || { echo "jobs.sh: $tool failed" >&2; rm -f "$list"; exit 1; }
    t1=$(now)
    rm -f "$list"
    awk -v n="$n" -v t0="$t0" -v t1="$t1" -v tool="$tool" -v j="$j" \
        'BEGIN { printf "name=%s bench=jobs param=%s value=%.6g unit=jobs/s secs=%.3f\n", tool, j, n / (t1 - t0), t1 - t0 }'
}

run_rss() { # TOOL BYTES BUILD_DIR
    tool=$1 bytes=$2 b=$3
    case $tool in
    casyncio) cmd="$b/casyncio run" ;;
    parallel) cmd="parallel --will-cite" ;;
    *) echo "jobs.sh: unknown tool $tool" >&2; exit 2 ;;
    esac
    out=$(mktemp)
    /usr/bin/time -f %M -o "$out" $cmd sh -c "head -c $bytes /dev/zero" ::: a > /dev/null ||
        { echo "jobs.sh: $tool failed" >&2; rm -f "$out"; exit 1; }
    echo "name=$tool bench=job_output_rss param=$bytes value=$(tail -1 "$out") unit=KB"
    rm -f "$out"
}

run_ssh() { # TOOL N J BUILD_DIR (sshd started)
    tool=$1 n=$2 j=$3 b=$4
    case $tool in
    casyncio) cmd="$b/casyncio run -j $j" ;;
    parallel) cmd="parallel --will-cite -j $j" ;;
    parallel-M) cmd="parallel --will-cite -M -j $j" ;;
    *) echo "jobs.sh: unknown tool $tool" >&2; exit 2 ;;
    esac
    list=$(mktemp)
    seq "$n" > "$list"
    t0=$(now)
    $cmd --ssh "$ssh_cmd" -S 127.0.0.1 true < "$list" > /dev/null ||
        { echo "jobs.sh: $tool over ssh failed" >&2; rm -f "$list"; exit 1; }
    t1=$(now)
    rm -f "$list"
    awk -v n="$n" -v t0="$t0" -v t1="$t1" -v tool="$tool" -v j="$j" \
        'BEGIN { printf "name=%s bench=ssh_jobs param=%s value=%.6g unit=jobs/s secs=%.3f\n", tool, j, n / (t1 - t0), t1 - t0 }'
}

case ${1:-} in
rss) run_rss "$2" "${3:-1000000000}" "${4:-build/release}" ;;
ssh)
    trap stop_sshd EXIT INT TERM
    start_sshd || exit 1
    run_ssh "$2" "$3" "$4" "${5:-build/release}" ;;
targets)
    reps=${2:-3} b=${3:-build/release}
    trap stop_sshd EXIT INT TERM
    have_sshd=1
    start_sshd || have_sshd=0
    r=1
    only=${ONLY:-jobs rss ssh}
    while [ $r -le "$reps" ]; do
        if [ $((r % 2)) = 1 ]; then order="casyncio xargs parallel"; sorder="casyncio parallel parallel-M"
        else order="parallel xargs casyncio"; sorder="parallel-M parallel casyncio"; fi
        case " $only " in *" jobs "*) for t in $order; do run_jobs "$t" 16 3000 "$b"; done ;; esac
        case " $only " in *" rss "*) run_rss casyncio 1000000000 "$b" ;; esac
        case " $only " in *" ssh "*)
            [ $have_sshd = 1 ] && for t in $sorder; do run_ssh "$t" 200 8 "$b"; done ;; esac
        r=$((r + 1))
    done ;;
*) run_jobs "$1" "$2" "$3" "${4:-build/release}" ;;
esac
