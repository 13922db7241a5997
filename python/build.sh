#!/bin/sh
# Builds the casyncio Python package for one interpreter (`make python` runs it).
#
# usage: sh python/build.sh PYTHON DEST BUILD_DIR CC
#   PYTHON     the interpreter to build for (python3, /abs/path/python3.X)
#   DEST       where the package goes: DEST/casyncio/__init__.py and
#              DEST/casyncio/_casyncio$(EXT_SUFFIX)
#   BUILD_DIR  the library's build directory, holding libcasyncio.a (-fPIC objects)
#   CC         the C compiler
# Everything about the interpreter comes from its sysconfig (the include directory and
# EXT_SUFFIX): no pip, no setuptools. Objects go to build/python/<tag>/, <tag> being EXT_SUFFIX
# without its dots and a checksum of the interpreter's path (cpython-311-x86_64-linux-gnu-123),
# so builds for several interpreters in one tree do not collide. Exits non-zero on failure.
set -eu
PY=$1 DEST=$2 B=$3 CC=${4:-cc}

info=$("$PY" -c 'import sys, sysconfig
print(sysconfig.get_paths()["include"])
print(sysconfig.get_config_var("EXT_SUFFIX") or ".so")
print(sys.executable)') || {
    echo "python: cannot run $PY" >&2
    exit 1
}
inc=$(echo "$info" | sed -n 1p)
suffix=$(echo "$info" | sed -n 2p)
# Two interpreters of one version (Debian's and pyenv's 3.11) share EXT_SUFFIX: the checksum
# of the interpreter's path keeps their objects apart too.
exe_sum=$(echo "$info" | sed -n 3p | cksum | cut -d' ' -f1)
tag=$(echo "$suffix" | sed -e 's/^\.//' -e 's/\.so$//' -e 's/[^A-Za-z0-9_-]/_/g')-$exe_sum
[ -f "$inc/Python.h" ] || { echo "python: no Python.h in $inc (for $PY)" >&2; exit 1; }
[ -f "$B/libcasyncio.a" ] || { echo "python: $B/libcasyncio.a missing" >&2; exit 1; }

obj=build/python/$tag
mkdir -p "$obj" "$DEST/casyncio"
# The module is compiled as the library is: C17, every warning an error (clean with gcc and
# clang against the headers of CPython 3.8 to 3.13).
$CC -std=c17 -D_GNU_SOURCE -O2 -g -Wall -Wextra -Werror -Wshadow -Wstrict-prototypes \
    -Wno-unused-parameter -fPIC -pthread -Iinclude -I"$inc" \
    -c python/_casyncio.c -o "$obj/_casyncio.o"
# libcasyncio.a is linked in (its objects are -fPIC and hidden): no LD_LIBRARY_PATH needed.
$CC -shared -pthread -o "$obj/_casyncio$suffix" "$obj/_casyncio.o" "$B/libcasyncio.a" \
    -luring -lm
# Copy then rename, so that an interpreter importing from DEST never sees half a file.
cp python/package/__init__.py "$DEST/casyncio/.__init__.py.tmp"
mv "$DEST/casyncio/.__init__.py.tmp" "$DEST/casyncio/__init__.py"
cp "$obj/_casyncio$suffix" "$DEST/casyncio/._casyncio.tmp"
mv "$DEST/casyncio/._casyncio.tmp" "$DEST/casyncio/_casyncio$suffix"
echo "python: built $DEST/casyncio for $tag"
