#!/bin/sh
# Run by `make install` after the files are in place: makes sure a program linked with
# `$(pkg-config --libs casyncio)` (no rpath) finds libcasyncio.so.0 when it starts.
#   - Installing into the running system (no DESTDIR) as root: runs ldconfig, which makes the
#     library known to the dynamic linker when PREFIX/lib is in its search path (/usr/local/lib
#     and /usr/lib are, on Debian).
#   - Otherwise (another prefix, a DESTDIR staging tree, or not root): prints the exact lines a
#     user needs, since nothing here can change the dynamic linker's configuration.
# usage: post-install.sh DESTDIR PREFIX
set -u
destdir=$1
prefix=$2
libdir=$prefix/lib
if [ -n "$destdir" ]; then
    echo "install: staged into $destdir$prefix; after moving the files to $prefix, run ldconfig there as root"
    exit 0
fi
if [ "$(id -u)" = 0 ] && command -v ldconfig >/dev/null 2>&1; then
    ldconfig
    if ldconfig -p 2>/dev/null | grep -q "libcasyncio.so.0 .*=> $libdir/libcasyncio.so.0\$"; then
        echo "install: ran ldconfig; programs linked with \$(pkg-config --libs casyncio) find libcasyncio.so.0"
        exit 0
    fi
fi
case ":${PKG_CONFIG_PATH:-}:" in
*":$libdir/pkgconfig:"*) ;;
*)
    if ! pkg-config --variable pc_path pkg-config 2>/dev/null | tr ':' '\n' | grep -qx "$libdir/pkgconfig"; then
        echo "install: for pkg-config to find casyncio.pc:"
        echo "    export PKG_CONFIG_PATH=$libdir/pkgconfig\${PKG_CONFIG_PATH:+:\$PKG_CONFIG_PATH}"
    fi
    ;;
esac
echo "install: $libdir is not in the dynamic linker's search path; to run a program linked with"
echo "\$(pkg-config --libs casyncio), either set, when you run it:"
echo "    export LD_LIBRARY_PATH=$libdir\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}"
echo "or link it with: -Wl,-rpath,$libdir"
echo "(or, as root: echo $libdir > /etc/ld.so.conf.d/casyncio.conf && ldconfig)"
