#!/bin/sh
# Checks `make install` the way a user meets it: builds README's example program with README's
# pkg-config line, WITHOUT -rpath, and runs it.
#
# usage: sh tools/check-install.sh            # into a temporary prefix (any user)
#        sh tools/check-install.sh --system   # into /usr/local, as root; uninstalls afterwards
#
# Temporary prefix: `make install` must print the LD_LIBRARY_PATH line; the program must fail
# to start without it (that is why it is printed) and run with exactly that line.
# --system: the program must start with no environment at all (make install ran ldconfig).
# Prints "check-install: ok" and exits 0, or names what failed and exits 1.
set -u
cd "$(dirname "$0")/.."
mode=${1:-prefix}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
fail() { echo "check-install: FAIL: $*"; [ -f "$tmp/install.log" ] && tail -n 20 "$tmp/install.log"; exit 1; }

# README's example: the first ```c block after "## Use the library".
awk '/^## Use the library/ {s = 1} s && /^```c$/ {c = 1; next} c && /^```$/ {exit} c' README.md \
    > "$tmp/hello.c"
[ -s "$tmp/hello.c" ] || fail "no C example found in README.md"

case "$mode" in
--system)
    [ "$(id -u)" = 0 ] || fail "--system needs root"
    prefix=/usr/local
    make install PREFIX=$prefix > "$tmp/install.log" 2>&1 || fail "make install"
    # README's line, as written there.
    (cd "$tmp" && cc hello.c -o hello $(pkg-config --cflags --libs casyncio)) >> "$tmp/install.log" 2>&1 ||
        fail "README's cc line"
    out=$(env -i "$tmp/hello" 2>&1) || { make uninstall PREFIX=$prefix > /dev/null 2>&1; ldconfig; fail "the program does not start: $out"; }
    make uninstall PREFIX=$prefix > /dev/null 2>&1
    ldconfig
    ;;
prefix)
    prefix=$tmp/prefix
    make install PREFIX="$prefix" > "$tmp/install.log" 2>&1 || fail "make install"
    line=$(grep -E '^ +export LD_LIBRARY_PATH=' "$tmp/install.log" | head -n 1)
    [ -n "$line" ] || fail "make install printed no LD_LIBRARY_PATH line"
    pcline=$(grep -E '^ +export PKG_CONFIG_PATH=' "$tmp/install.log" | head -n 1)
    [ -n "$pcline" ] || fail "make install printed no PKG_CONFIG_PATH line"
    # The user's shell: the printed export lines, then README's cc line.
    sh -c "$pcline; cd '$tmp' && cc hello.c -o hello \$(pkg-config --cflags --libs casyncio)" \
        >> "$tmp/install.log" 2>&1 || fail "README's cc line with the printed PKG_CONFIG_PATH"
    if readelf -d "$tmp/hello" 2>/dev/null | grep -qE 'RPATH|RUNPATH'; then
        fail "the program was linked with an rpath"
    fi
    if env -u LD_LIBRARY_PATH "$tmp/hello" > /dev/null 2>&1; then
        # Only possible if another libcasyncio.so.0 is installed in the system.
        ldd "$tmp/hello" | grep -q "$prefix" || echo "check-install: note: a system libcasyncio.so.0 was found first"
    fi
    out=$(sh -c "$line; exec '$tmp/hello'" 2>&1) || fail "the program does not start with the printed line: $out"
    ;;
*)
    echo "usage: sh tools/check-install.sh [--system]" >&2
    exit 2
    ;;
esac
[ "$out" = hello ] || fail "the program printed \"$out\", not \"hello\""
echo "check-install: ok ($mode)"
