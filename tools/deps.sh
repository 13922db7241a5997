#!/bin/sh
# Checks the Debian packages casyncio needs; installs what is missing when run as root,
# otherwise names them and fails.  usage: deps.sh build|test|ci|bench
#   build, test: what `make` and `make test` need (the tests need nothing more than the build);
#   ci:          also valgrind and clang, which only CI uses (.ci/run: the memcheck pass and the
#                clang -Werror build);
#   bench:       the benchmark peers (libuv, libev, GLib, sd-event, uvloop...).
set -u
what=${1:-build}
missing=""
need_header() { [ -f "/usr/include/$1" ] || missing="$missing $2"; }
need_cmd() { command -v "$1" >/dev/null 2>&1 || missing="$missing $2"; }
need_header liburing.h liburing-dev
need_cmd cc gcc
need_cmd make make
need_cmd pkg-config pkg-config
if [ "$what" = ci ]; then
    need_cmd valgrind valgrind
    need_cmd clang clang
fi
if [ "$what" = bench ]; then
    need_header uv.h libuv1-dev
    need_header ev.h libev-dev
    need_header glib-2.0/glib.h libglib2.0-dev
    need_header systemd/sd-event.h libsystemd-dev
    need_cmd parallel parallel
    need_cmd gnuplot gnuplot-nox
    /usr/bin/python3 -c 'import uvloop' >/dev/null 2>&1 || missing="$missing python3-uvloop"
fi
[ -z "$missing" ] && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "deps: installing$missing" >&2
    (apt-get install -y --no-install-recommends $missing >/dev/null 2>&1 ||
        { apt-get update >/dev/null 2>&1 && apt-get install -y --no-install-recommends $missing >/dev/null 2>&1; }) ||
        { echo "deps: apt-get install$missing failed" >&2; exit 1; }
    exit 0
fi
echo "deps: missing Debian packages:$missing" >&2
echo "deps: run as root: apt-get install$missing" >&2
exit 1
