#!/bin/sh
# Installs the C library of gwsync: libgwsync.a, gwsync.h and gwsync.pc,
# so that `cc app.c $(pkg-config --cflags --libs gwsync)` works.
#
#   scripts/install.sh [--prefix DIR] [--destdir DIR] [--lib FILE]
#
#   --prefix DIR   where the files go and what gwsync.pc says (default /usr/local):
#                  DIR/lib/libgwsync.a, DIR/include/gwsync.h,
#                  DIR/lib/pkgconfig/gwsync.pc
#   --destdir DIR  stage under DIR (packaging); gwsync.pc still says --prefix
#   --lib FILE     install this libgwsync.a (a cross build, say) instead of
#                  building one with `cargo build --release --lib`
#
# If the prefix is not one pkg-config searches, point it there:
#   PKG_CONFIG_PATH=DIR/lib/pkgconfig pkg-config --cflags --libs gwsync
set -eu

prefix=/usr/local
destdir=
lib=
usage() {
	echo "usage: $0 [--prefix DIR] [--destdir DIR] [--lib FILE]" >&2
	exit 2
}
while [ $# -gt 0 ]; do
	case "$1" in
	--prefix) [ $# -ge 2 ] || usage; prefix=$2; shift 2 ;;
	--prefix=*) prefix=${1#--prefix=}; shift ;;
	--destdir) [ $# -ge 2 ] || usage; destdir=$2; shift 2 ;;
	--destdir=*) destdir=${1#--destdir=}; shift ;;
	--lib) [ $# -ge 2 ] || usage; lib=$2; shift 2 ;;
	--lib=*) lib=${1#--lib=}; shift ;;
	-h | --help) sed -n '2,16s/^# \{0,1\}//p' "$0"; exit 0 ;;
	*) echo "$0: unknown argument: $1" >&2; usage ;;
	esac
done
case "$prefix" in
/*) ;;
*) echo "$0: --prefix must be an absolute path (gwsync.pc records it): $prefix" >&2; exit 2 ;;
esac

repo=$(cd "$(dirname "$0")/.." && pwd)
if [ -z "$lib" ]; then
	(cd "$repo" && ${CARGO:-cargo} build --release --lib)
	lib=${CARGO_TARGET_DIR:-$repo/target}/release/libgwsync.a
fi
[ -f "$lib" ] || { echo "$0: no library at $lib" >&2; exit 1; }

root=$destdir$prefix
install -d "$root/lib/pkgconfig" "$root/include"
install -m 0644 "$lib" "$root/lib/libgwsync.a"
install -m 0644 "$repo/include/gwsync.h" "$root/include/gwsync.h"
sed "s|^prefix=.*|prefix=$prefix|" "$repo/gwsync.pc" >"$root/lib/pkgconfig/gwsync.pc"
chmod 0644 "$root/lib/pkgconfig/gwsync.pc"
echo "installed libgwsync.a, gwsync.h and gwsync.pc under $root"
