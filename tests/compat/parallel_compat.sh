#!/bin/sh
# The same arguments through GNU parallel and through `casyncio run`: outputs (sorted where
# parallel's order is not fixed) and exit statuses must be the same. Also checks that every
# GNU parallel option we do not support is refused by name, and the intended differences.
# usage: parallel_compat.sh CASYNCIO_BINARY [SECTION]
# SECTION: input, replace, multi, options, exit, files, refused, differences (default: all).
# Prints "parallel_compat: N passed, N failed, N skipped"; exits 1 if any failed.
# GNU parallel 20221122 (Debian's `parallel` package) is the reference; without it every
# comparison is skipped (install it: apt-get install parallel).
set -u
CA=$(cd "$(dirname "$1")" && pwd)/$(basename "$1")
SECTION=${2:-all}
want() { [ "$SECTION" = all ] || [ "$SECTION" = "$1" ]; }
W=$(mktemp -d)
trap 'rm -rf "$W"' EXIT
passed=0 failed=0 skipped=0
HAVE_PAR=1
if ! command -v parallel >/dev/null 2>&1 || ! parallel --version 2>/dev/null | grep -q 'GNU parallel'; then
    HAVE_PAR=0
    echo "parallel_compat: GNU parallel is not installed (apt-get install parallel): comparisons skipped"
fi
# parallel's citation notice and its config live under $HOME.
mkdir -p "$W/home/.parallel" && touch "$W/home/.parallel/will-cite"
export HOME="$W/home"
cd "$W" || exit 1
printf '#!/bin/sh\necho "job $1"\nexit $1\n' > ex && chmod +x ex
# pr shows its arguments one by one: COMMAND words are shell code for parallel, so they must
# hold no shell character for the two to be compared.
printf '#!/bin/sh\nfor a; do printf "<%%s>" "$a"; done; echo\n' > pr && chmod +x pr
printf '#!/bin/sh\nkill -$1 $$\n' > sig && chmod +x sig
printf '#!/bin/sh\nsleep $1\necho slept $1\n' > nap && chmod +x nap
printf 'a\nb\nc\n' > f1
printf '1\n2\n' > f2

ok() { passed=$((passed + 1)); }
bad() {
    failed=$((failed + 1))
    echo "FAIL: $*"
}

# cmp_run NAME SORT INPUT ARGS...: INPUT is printf's format for stdin; SORT 1 sorts outputs,
# 2 compares the exit status only. (parallel runs commands through the calling shell, dash
# here, whose echo interprets backslashes: printf '%s' shows arguments as they are.)
cmp_run() {
    name=$1 sorted=$2 input=$3
    shift 3
    if [ $HAVE_PAR = 0 ]; then
        skipped=$((skipped + 1))
        return
    fi
    printf "$input" | timeout 60 parallel "$@" > p.out 2> p.err
    prc=$?
    printf "$input" | timeout 60 "$CA" run --no-bar --no-summary "$@" > c.out 2> c.err
    crc=$?
    if [ "$sorted" = 2 ]; then
        : > p.out  # only the exit status is compared (parallel prints its usage on stdout)
        : > c.out
    fi
    if [ "$sorted" = 1 ]; then
        sort p.out > p.s && mv p.s p.out
        sort c.out > c.s && mv c.s c.out
    fi
    if [ $prc != $crc ]; then
        bad "$name: exit $crc, GNU parallel $prc (args: $*)"
        sed 's/^/    casyncio stderr: /' c.err | head -5
        return
    fi
    if ! cmp -s p.out c.out; then
        bad "$name: output differs (args: $*)"
        diff p.out c.out | head -10 | sed 's/^/    /'
        return
    fi
    ok
}

# refused OPTION ARGS...: casyncio exits 255 and names OPTION as a GNU parallel option.
refused() {
    opt=$1
    shift
    "$CA" run "$@" > c.out 2> c.err < /dev/null
    rc=$?
    if [ $rc != 255 ] || ! grep -qF -- "$opt" c.err || ! grep -q 'not supported' c.err; then
        bad "refused $opt: exit $rc, stderr: $(head -1 c.err)"
        return
    fi
    ok
}

# ----- input syntax --------------------------------------------------------------------------
if want input; then
cmp_run link 0 '' -k echo ::: a b c :::+ 1 2
cmp_run link_middle 0 '' -k echo ::: a b :::+ 1 2 3 ::: x y
cmp_run link_files 0 '' -k echo :::: f1 ::::+ f2
cmp_run link_all_wraps 0 '' -k --link echo ::: a b c ::: 1 2
cmp_run product 0 '' -k echo ::: a b ::: 1 2
cmp_run product_file 0 '' -k echo :::: f1 ::: x
cmp_run blank_lines 0 'a\n\nb\n\n' -k echo '[{}]'
cmp_run blank_word 0 '' -k echo '[{}]' ::: a '' b
cmp_run blank_appended 0 '' -k ./pr ::: a '' b
cmp_run no_run_if_empty 0 'a\n\nb\n' -k -r echo '[{}]'
cmp_run nul_without_0 0 'a\0b\nc\n' -k ./pr
cmp_run null_sep 0 'a b\0c\0' -k -0 echo '[{}]'
cmp_run delim 0 'a,b,,c' -k -d , echo '[{}]'
cmp_run delim_multi 0 'a::b::c' -k -d :: echo '[{}]'
cmp_run delim_tab 0 'a\tb' -k -d '\t' echo '[{}]'
cmp_run eof_str 0 'a\nstop\nb\n' -k -E stop echo
cmp_run eof_str_args 0 '' -k -E stop echo ::: a stop b
cmp_run arg_sep 0 '' -k --arg-sep ,, echo ,, a b
cmp_run colsep_tab 0 'a\tb\nc\td\n' -k --colsep '\t' echo {2}{1}
cmp_run colsep_appended 0 'a b\n' -k --colsep ' ' ./pr
cmp_run colsep_regexp 0 'a,b;c\n' -k --colsep '[,;]' echo {3} {1}
cmp_run header_colsep 0 'x\ty\na\tb\nc\td\n' -k --header : --colsep '\t' echo {y}{x} {1}
cmp_run header_sources 0 '' -k --header : echo {f}{g} ::: f a b ::: g 1
cmp_run header_stdin 0 'name\na\nb\n' -k --header : echo {name}

fi
# ----- replacement strings ---------------------------------------------------------------------
if want replace; then
cmp_run positional_mods 0 '' -k echo {1.} {1/} {1//} {1/.} {2} ::: a/b.c ::: d/e.f
cmp_run positional_10 0 '' -k echo {10} {1} {11} ::: 1 ::: 2 ::: 3 ::: 4 ::: 5 ::: 6 ::: 7 ::: 8 ::: 9 ::: 10 ::: 11
cmp_run positional_missing 0 '' -k echo '[{3}]' ::: 1 ::: 2
cmp_run positional_negative 0 '' -k echo {-1} {-2} ::: a ::: b
cmp_run modifiers 0 '' -k echo '[{.}]' '[{/}]' '[{//}]' '[{/.}]' ::: .bashrc a/.b a.b/c a /a a/ dir/x.tar.gz ''
cmp_run seq_slot 0 '' -k -j1 echo {#} {%} ::: a b c
cmp_run all_values 0 '' -k ./pr x{}y ::: 1 2 ::: a
cmp_run replace_I 0 '' -k -I @@ echo @@ '{}' ::: a b
cmp_run replace_er 0 '' -k --er @E --bnr @B --dnr @D --bner @N echo @E @B @D @N ::: d/f.x
cmp_run seqreplace 0 '' -k --seqreplace @S echo @S ::: a b
cmp_run tagstring 0 '' -k --tagstring 'T{}-{#}' echo hi ::: a b
cmp_run tag 0 '' -k --tag echo hi ::: a b
cmp_run tag_sources 0 '' -k --tag echo ::: a b ::: 1
cmp_run tag_n2 0 '' -k --tag -n2 echo ::: a b c
cmp_run verbose 0 '' -k -v echo ::: 'a b' c
cmp_run dry_run 0 '' -k --dry-run echo ::: 'a b' "it's" c

fi
# ----- several inputs per job ------------------------------------------------------------------
if want multi; then
cmp_run n2 0 '' -k -n2 echo ::: 1 2 3 4 5
cmp_run n2_words 0 '' -k -n2 ./pr x{}y ::: 1 2 3
cmp_run n2_positional 0 '' -k -n2 ./pr {1}:{2} ::: 1 2 3
cmp_run n2_appended 0 '' -k -n2 ./pr ::: 1 2 '3 4'
cmp_run N2 0 '' -k -N2 echo {1}-{2} ::: 1 2 3 4 5
cmp_run N2_context 0 '' -k -N2 ./pr x{}y ::: 1 2 3
cmp_run n0 0 '' -k -n0 echo hi ::: 1 2 3
cmp_run N0 0 '' -k -N0 echo hi ::: 1 2 3
cmp_run L2 0 '1\n2\n3\n' -k -L2 echo
cmp_run max_lines 0 '1\n2\n3\n' -k --max-lines=2 echo
cmp_run m_j1 0 '' -j1 -k -m echo pre{}post ::: 1 2 3
cmp_run X_j1 0 '' -j1 -k -X ./pr x{}y ::: 1 2 3
cmp_run m_j2 0 '' -j2 -m -k echo ::: 1 2 3 4 5
cmp_run m_j3 0 '' -j3 -m -k echo ::: 1 2 3 4 5 6 7 8 9 10
cmp_run m_stdin 0 '1\n2\n3\n4\n' -j2 -m -k echo
cmp_run s_m_j1 0 '' -j1 -s 20 -m -k echo ::: 1 2 3 4 5 6 7 8 9 10 11 12

fi
# ----- options ------------------------------------------------------------------------------------
if want options; then
cmp_run jobs_plus 0 '' -k -j +1 echo ::: a b c
cmp_run jobs_minus 0 '' -k -j -1 echo ::: a b c
cmp_run jobs_percent 0 '' -k -j 50% echo ::: a b c
cmp_run bundled 0 '' -kj2 echo ::: a b
cmp_run abbreviated 0 '' --kee echo ::: a b
cmp_run ungroup 0 '' -u echo ::: a
cmp_run delay 0 '' -k --delay 0.1 echo ::: a b c
cmp_run eta 0 '' -k --eta echo ::: a b
cmp_run memfree 0 '' -k --memfree 1k echo ::: a b
cmp_run load 0 '' -k --load 100 echo ::: a b
cmp_run quote 0 '' -k -q echo ::: 'a b'
cmp_run timeout_secs 1 '' --timeout 1 ./nap ::: 0.1 3
cmp_run timeout_percent 0 '' -j1 -k --timeout 300% ./nap ::: 0.2 0.2 0.2 0.2 5
cmp_run unsorted 1 '' -j4 ./ex ::: 0 0 0 0

fi
# ----- exit status ----------------------------------------------------------------------------------
if want exit; then
cmp_run exit_failures 1 '' ./ex ::: 0 1 2 3
cmp_run exit_101 1 '' ./ex ::: $(seq 1 105)
cmp_run exit_usage 2 '' --no-such-option echo
cmp_run exit_bad_jobs 2 '' -j many echo ::: 1
cmp_run halt_now_fail 0 '' -j1 --halt now,fail=1 ./ex ::: 0 7 2
cmp_run halt_soon_fail 0 '' -j1 --halt soon,fail=1 ./ex ::: 0 7 2
cmp_run halt_now_success 0 '' -j1 --halt now,success=1 ./ex ::: 3 0 2
cmp_run halt_soon_success 0 '' -j1 --halt soon,success=1 ./ex ::: 3 0 2
cmp_run halt_now_done 0 '' -j1 --halt now,done=1 ./ex ::: 3 0 2
cmp_run halt_now_done_2 0 '' -j1 --halt now,done=2 ./ex ::: 3 0 2
cmp_run halt_now_fail_2 0 '' -j1 --halt now,fail=2 ./ex ::: 0 7 5 4
cmp_run halt_2 0 '' -j1 --halt 2 ./ex ::: 0 7 5 4
cmp_run halt_1 0 '' -j1 --halt 1 ./ex ::: 0 7 5 4
cmp_run halt_percent 0 '' -j1 --halt now,fail=50% ./ex ::: 0 7 5 4 5
cmp_run halt_percent_10 0 '' -j1 --halt now,fail=30% ./ex ::: 0 7 5 4 5 6 7 8 9 9
cmp_run halt_done_percent 0 '' -j1 --halt soon,done=50% ./ex ::: 0 7 5 4 5
cmp_run halt_signal 0 '' -j1 --halt now,fail=1 ./sig ::: 9
cmp_run halt_status_300 0 '' -j1 --halt now,fail=1 ./ex ::: 0 300
cmp_run halt_percent_stdin 0 './ex 0\n./ex 1\n./ex 1\n./ex 0\n./ex 1\n./ex 0\n' -j1 --halt now,fail=50%%

fi
# ----- --retries: GNU parallel counts attempts ------------------------------------------------
if want files; then
if [ $HAVE_PAR = 1 ]; then
    printf '#!/bin/sh\necho x >> "$1"\nexit 1\n' > count && chmod +x count
    parallel --retries 3 ./count ::: p.cnt > /dev/null 2>&1
    "$CA" run --retries 3 ./count ::: c.cnt > /dev/null 2>&1
    if [ "$(wc -l < p.cnt)" = "$(wc -l < c.cnt)" ]; then ok; else
        bad "retries: $(wc -l < c.cnt) attempts, GNU parallel $(wc -l < p.cnt)"
    fi
else
    skipped=$((skipped + 1))
fi

# ----- --results DIR: the same tree, the same files ---------------------------------------
if [ $HAVE_PAR = 1 ]; then
    parallel --results pres echo ::: a 'b c' 'd/e' > /dev/null 2>&1
    parallel --results pres2 echo ::: a ::: 1 2 > /dev/null 2>&1
    "$CA" run --results cres echo ::: a 'b c' 'd/e' > /dev/null 2>&1
    "$CA" run --results cres2 echo ::: a ::: 1 2 > /dev/null 2>&1
    (cd pres && find . -type f | sort | while read -r f; do echo "$f: $(cat "$f")"; done) > p.tree
    (cd cres && find . -type f | sort | while read -r f; do echo "$f: $(cat "$f")"; done) > c.tree
    (cd pres2 && find . -type f | sort | while read -r f; do echo "$f: $(cat "$f")"; done) >> p.tree
    (cd cres2 && find . -type f | sort | while read -r f; do echo "$f: $(cat "$f")"; done) >> c.tree
    if cmp -s p.tree c.tree; then ok; else
        bad "results: trees differ"
        diff p.tree c.tree | head -10 | sed 's/^/    /'
    fi
else
    skipped=$((skipped + 1))
fi

# ----- --resume, --resume-failed: what the second run runs ---------------------------------
if [ $HAVE_PAR = 1 ]; then
    for how in --resume --resume-failed; do
        rm -f p.log c.log
        parallel -k --joblog p.log ./ex ::: 0 1 0 > /dev/null 2>&1
        "$CA" run -k --joblog c.log ./ex ::: 0 1 0 > /dev/null 2>&1
        parallel -k --joblog p.log $how ./ex ::: 0 1 0 2 > p.out 2>/dev/null
        prc=$?
        "$CA" run -k --joblog c.log $how ./ex ::: 0 1 0 2 > c.out 2>/dev/null
        crc=$?
        if [ $prc = $crc ] && cmp -s p.out c.out; then ok; else
            bad "$how: exit $crc (parallel $prc), output: $(tr '\n' ' ' < c.out) (parallel: $(tr '\n' ' ' < p.out))"
        fi
    done
else
    skipped=$((skipped + 2))
fi

fi
# ----- refused by name: every GNU parallel option we do not have ------------------------------
# (-S, --sshloginfile, --ssh, --transferfile, --return, --cleanup and --trc are implemented:
# tests/test_cli_ssh.c runs them against a real sshd.)
if want refused; then
for o in --pipe --pipe-part --block --round-robin --recstart --recend --cat --fifo --shard \
    --bin --group-by --tee --rpl --parens --plus --bg --fg --color --compress --csv --ctag \
    --embed --filter --limit --latest-line --memsuspend --minversion -o --files --nice \
    --interactive -p --profile --noswap --retry-failed --semaphore --shebang --shebang-wrap \
    --show-limits --shuf --skip-first-line --sql-master --template --tty --term-seq \
    --total-jobs --tmpdir --tmux --trim --version --wait --exit -x \
    --basefile \
    --workdir --nonall --onall --env; do
    refused "$o" "$o" x echo ::: a
done
refused '{=' echo '{= $_ .= "x" =}' ::: a
refused '--header' --header '.*' echo ::: a

fi
# ----- intended differences -------------------------------------------------------------------
if want differences; then
# No shell: a command given as one word is not found, and the message names --shell.
"$CA" run --no-bar 'echo pre-{}' ::: a > c.out 2> c.err
rc=$?
if [ $rc = 1 ] && grep -q -- '--shell' c.err; then ok; else bad "no-shell hint: exit $rc, $(cat c.err)"; fi
# A shell operator as an argument: a warning naming --shell before anything runs.
"$CA" run --no-bar echo a '>' out.txt ::: b > c.out 2> c.err
if grep -q -- '--shell' c.err && [ "$(cat c.out)" = "a > out.txt b" ]; then ok; else
    bad "operator warning: $(cat c.err)"
fi
# With --shell, what parallel does with a pipe.
"$CA" run --no-bar -k --shell echo {} '|' tr a-z A-Z ::: ab 'c d' > c.out 2> c.err
if [ "$(cat c.out)" = "$(printf 'AB\nC D')" ]; then ok; else bad "--shell pipe: $(cat c.out)"; fi

fi
echo "parallel_compat: $passed passed, $failed failed, $skipped skipped"
[ $failed = 0 ]
