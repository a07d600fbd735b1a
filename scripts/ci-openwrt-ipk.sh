#!/usr/bin/env bash
# ci-openwrt-ipk.sh: CI job for the OpenWrt package. Builds the .ipk for
# mipsel_24kc with OpenWrt 24.10.3's own build system (scripts/openwrt-sdk/
# build-ipk.sh: rules.mk, package.mk, the packages feed's rust-package.mk,
# ipkg-build) and checks what came out:
#   - control fields, conffiles, the file list with modes, the size limit;
#   - no build paths in the binary;
#   - `gwsync --version` under qemu-mipsel;
#   - a C program built with the SDK's compiler and pkg-config flags against
#     the staged libgwsync.a, run under qemu-mipsel;
#   - the packages feed CI's offline steps (scripts/openwrt-sdk/ci-checks.sh);
#   - first, the build from a feed tree: the package directory alone, as in
#     the packages feed, whose Makefile downloads the source with git (here
#     from this checkout's HEAD commit, through the SDK's download.pl).
# Prints the ipk and binary sizes. Needs root (apt-get) on Debian 12 and the
# pinned OpenWrt source tarballs (see build-ipk.sh: SRC_TARBALLS,
# GWSYNC_SHARED_DIR); without them it fails under CI and skips otherwise.
#
# Env: WORK (default /tmp/gwsync-owsdk), GWSYNC_IPK_MAX_BYTES (default
#      512000: 500 KB of router flash, the goal of issue 14).
# shellcheck disable=SC2015 # pass never fails, so A && pass || fail is if-then-else
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(dirname "$here")
export WORK=${WORK:-/tmp/gwsync-owsdk}
mkdir -p "$WORK"
max_bytes=${GWSYNC_IPK_MAX_BYTES:-512000}
tarballs=${SRC_TARBALLS:-${GWSYNC_SHARED_DIR:-$repo/../shared}/openwrt-sdk/src}
qemu=${QEMU:-${XRUST_PREFIX:-/opt/xrust}/qemu/bin/qemu-mipsel}
failures=0

fail() {
	echo "ci-openwrt-ipk: FAIL: $*" >&2
	failures=$((failures + 1))
}
pass() { echo "ci-openwrt-ipk: ok: $*"; }

if ! ls "$tarballs"/openwrt-24.10.3-*.tar.xz > /dev/null 2>&1; then
	msg="no OpenWrt source tarballs in $tarballs (set SRC_TARBALLS or GWSYNC_SHARED_DIR)"
	if [ -n "${CI-}" ]; then
		echo "ci-openwrt-ipk: FAILED: $msg" >&2
		exit 1
	fi
	echo "ci-openwrt-ipk: SKIPPED: $msg" >&2
	exit 0
fi

# The feed tree: only openwrt/gwsync/, with the release fields pointing at
# this checkout's HEAD, as a release would set them.
if [ -d "$repo/.git" ] || [ -f "$repo/.git" ]; then
	head=$(git -C "$repo" rev-parse HEAD)
	feed=$(mktemp -d)
	mkdir -p "$feed/openwrt"
	cp -a "$repo/openwrt/gwsync" "$feed/openwrt/"
	sed -i "s|^  PKG_SOURCE_URL:=.*|  PKG_SOURCE_URL:=file://$repo|; s|^  PKG_SOURCE_VERSION:=.*|  PKG_SOURCE_VERSION:=$head|" \
		"$feed/openwrt/gwsync/Makefile"
	# A cached source tarball of an earlier commit has the same name.
	rm -f "$WORK"/sdk/dl/gwsync-*.tar.zst
	if bash "$here/openwrt-sdk/build-ipk.sh" "$feed" > "$WORK/feed-tree.log" 2>&1 &&
		grep -q "Checking out files from the git repository" "$WORK/logs/compile.log"; then
		pass "built from a feed tree, source from git at $head"
	else
		tail -30 "$WORK/feed-tree.log" >&2
		fail "build from a feed tree (log: $WORK/feed-tree.log, $WORK/logs/compile.log)"
	fi
	rm -rf "$feed"
else
	echo "ci-openwrt-ipk: not a git checkout: the feed tree build (git source) is skipped" >&2
fi

bash "$here/openwrt-sdk/build-ipk.sh" "$repo"

sdk=$WORK/sdk
ipk=$(ls "$sdk"/bin/packages/mipsel_24kc/gwsync/gwsync_*_mipsel_24kc.ipk)
x=$(mktemp -d)
trap 'rm -rf "$x"' EXIT
mkdir -p "$x/outer" "$x/control" "$x/data"
tar -xzf "$ipk" -C "$x/outer"
tar -xzf "$x/outer/control.tar.gz" -C "$x/control"
tar -xzf "$x/outer/data.tar.gz" -C "$x/data"

version=$(sed -n 's/^version = "\(.*\)"/\1/p' "$repo/Cargo.toml" | head -1)
field() { sed -n "s/^$1: //p" "$x/control/control"; }
[ "$(field Package)" = gwsync ] && pass "Package: gwsync" || fail "Package: $(field Package)"
[ "$(field Version)" = "$version-r1" ] && pass "Version: $version-r1" || fail "Version: $(field Version), Cargo.toml has $version"
[ "$(field Architecture)" = mipsel_24kc ] && pass "Architecture: mipsel_24kc" || fail "Architecture: $(field Architecture)"
[ "$(field Depends)" = libc ] && pass "Depends: libc" || fail "Depends: $(field Depends)"
[ "$(cat "$x/control/conffiles")" = /etc/config/gwsync ] && pass "conffiles: /etc/config/gwsync" ||
	fail "conffiles: $(cat "$x/control/conffiles")"

# Every file the package installs, with its mode; nothing else.
expected="0600 ./etc/config/gwsync
0644 ./etc/hotplug.d/iface/95-gwsync
0644 ./lib/upgrade/keep.d/gwsync-state
0644 ./usr/share/rpcd/acl.d/gwsync.json
0755 ./etc/init.d/gwsync
0755 ./etc/uci-defaults/50-gwsync
0755 ./usr/sbin/gwsync"
actual=$(cd "$x/data" && find . -type f -printf '%m %p\n' | sed 's/^\([0-7][0-7][0-7]\) /0\1 /' | sort)
if [ "$actual" = "$expected" ]; then
	pass "file list and modes"
else
	fail "file list and modes differ:"
	diff <(echo "$expected") <(echo "$actual") >&2 || true
fi
grep -qx /etc/gwsync.key "$x/data/lib/upgrade/keep.d/gwsync-state" &&
	pass "sysupgrade keeps /etc/gwsync.key" || fail "keep.d does not list /etc/gwsync.key"

bin=$x/data/usr/sbin/gwsync
for path in /build_dir/ "$sdk" "$repo" /root/ /home/; do
	n=$(strings "$bin" | grep -c -F "$path" || true)
	[ "$n" = 0 ] && pass "no $path in the binary" || fail "$n strings with $path in the binary"
done
mipsel-linux-gnu-readelf -S "$bin" | grep -q -E '\.symtab|\.debug_' && fail "binary not stripped" || pass "binary stripped"

# A musl root from the SDK's toolchain, as on the router.
tcs=("$sdk"/staging_dir/toolchain-*)
tc=${tcs[0]}
tgts=("$sdk"/staging_dir/target-*)
tgt=${tgts[0]}
root=$x/root
mkdir -p "$root/lib"
cp -L "$tc/lib/libc.so" "$root/lib/libc.so"
ln -sf libc.so "$root/lib/ld-musl-mipsel-sf.so.1"
cp -L "$tc/lib/libgcc_s.so.1" "$root/lib/"
out=$("$qemu" -L "$root" "$bin" --version 2>&1) || true
[ "$out" = "gwsync $version" ] && pass "--version under qemu-mipsel: $out" || fail "--version under qemu-mipsel: $out"

# A C gateway linked against the staged library with the SDK's own
# pkg-config wrapper, as a package with PKG_BUILD_DEPENDS:=gwsync would.
cat > "$x/gateway.c" << 'EOF'
#include <gwsync.h>
#include <stdio.h>
#include <string.h>

int main(void)
{
	const char *version = gwsync_version();
	gwsync_t *g = gwsync_open("{");
	const char *error = gwsync_last_error();
	printf("version %s, bad config: %s\n", version, error ? error : "(none)");
	return g == NULL && error != NULL && strlen(version) > 0 ? 0 : 1;
}
EOF
flags=$(STAGING_DIR_HOST="$sdk/staging_dir/host" STAGING_DIR_HOSTPKG="$sdk/staging_dir/hostpkg" \
	STAGING_PREFIX="$tgt/usr" PKG_CONFIG_PATH="$tgt/usr/lib/pkgconfig" PKG_CONFIG_LIBDIR="$tgt/usr/lib/pkgconfig" \
	"$sdk/staging_dir/host/bin/pkg-config" --cflags --libs gwsync)
pass "pkg-config --cflags --libs gwsync: $flags"
# shellcheck disable=SC2086 # the flags are words
if "$tc/bin/mipsel-openwrt-linux-musl-gcc" -Os -o "$x/gateway" "$x/gateway.c" $flags; then
	out=$("$qemu" -L "$root" "$x/gateway" 2>&1) && pass "C program against libgwsync.a: $out" ||
		fail "C program under qemu-mipsel: $out"
else
	fail "C program did not link against the staged libgwsync.a"
fi

# The package builds its binary with panic=abort but the library with
# unwind: the C API turns an internal panic into GWSYNC_ERR_PANIC, which
# catch_unwind can only do if the panic unwinds. Guard against the library
# being switched to abort along with the binary.
lib_syms=$(mipsel-linux-gnu-readelf -sW "$tgt/usr/lib/libgwsync.a" 2> /dev/null)
if grep -q '_ZN12panic_unwind' <<< "$lib_syms" && ! grep -q '_ZN11panic_abort' <<< "$lib_syms"; then
	pass "libgwsync.a carries panic_unwind, not panic_abort"
else
	fail "libgwsync.a's panic runtime is not panic_unwind alone (C callers would not get GWSYNC_ERR_PANIC)"
fi

if CI_LOG_DIR=$WORK/logs bash "$here/openwrt-sdk/ci-checks.sh" "$sdk" "$repo" "$ipk"; then
	pass "packages feed CI steps"
else
	fail "packages feed CI steps (see above)"
fi

ipk_bytes=$(stat -c %s "$ipk")
bin_bytes=$(stat -c %s "$bin")
echo "ci-openwrt-ipk: sizes: $(basename "$ipk") $ipk_bytes bytes; /usr/sbin/gwsync $bin_bytes bytes installed; libgwsync.a $(stat -c %s "$tgt/usr/lib/libgwsync.a") bytes staged"
[ "$ipk_bytes" -le "$max_bytes" ] && pass "ipk within $max_bytes bytes" || fail "ipk is $ipk_bytes bytes, over $max_bytes"

if [ "$failures" -gt 0 ]; then
	echo "ci-openwrt-ipk: $failures check(s) FAILED" >&2
	exit 1
fi
echo "ci-openwrt-ipk: all checks passed"
