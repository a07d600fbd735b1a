#!/usr/bin/env bash
# cross-sizes.sh [TARGET...]: build the release binary and libgwsync.a for each
# router target with scripts/cross and print their
# sizes. Default: all eight targets cross-setup.sh supports.
#
# Sizes are measured with the profile OpenWrt forces on feed packages
# (rust-values.mk: opt-level z, fat LTO, one codegen unit, overflow checks,
# panic=unwind), since that is what ships; GWSYNC_SIZES_PROFILE=cargo keeps
# Cargo.toml's [profile.release] instead.
#
# musl binaries here are linked statically (cross-test.sh does that so qemu
# needs no sysroot); the OpenWrt package links musl dynamically, so its binary
# is smaller by the part of libc it pulls in (roughly 50-100 KiB).
#
# Env: GWSYNC_CROSS_DIR (default: scripts/cross), CARGO_TARGET_DIR,
#      XRUST_PREFIX / XRUST_VERSION (passed to the cross scripts).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(dirname "$here")
cross=${GWSYNC_CROSS_DIR:-$here/cross}
[ -x "$cross/cross-test.sh" ] || {
	echo "cross-sizes: no $cross/cross-test.sh (set GWSYNC_CROSS_DIR)" >&2
	exit 1
}

if [ $# -gt 0 ]; then
	targets=("$@")
else
	targets=(mipsel-unknown-linux-musl mips-unknown-linux-musl
		armv7-unknown-linux-musleabihf aarch64-unknown-linux-musl
		mipsel-unknown-linux-gnu mips-unknown-linux-gnu
		armv7-unknown-linux-gnueabihf aarch64-unknown-linux-gnu)
fi

if [ "${GWSYNC_SIZES_PROFILE:-openwrt}" = openwrt ]; then
	export CARGO_PROFILE_RELEASE_OPT_LEVEL=z CARGO_PROFILE_RELEASE_LTO=true \
		CARGO_PROFILE_RELEASE_CODEGEN_UNITS=1 CARGO_PROFILE_RELEASE_PANIC=unwind \
		CARGO_PROFILE_RELEASE_OVERFLOW_CHECKS=true CARGO_PROFILE_RELEASE_DEBUG=false \
		CARGO_PROFILE_RELEASE_DEBUG_ASSERTIONS=false
fi

# binutils prefix of the Debian cross toolchain cross-setup.sh installs.
gnu_triple() {
	case "$1" in
	mipsel-*) echo mipsel-linux-gnu ;;
	mips-*) echo mips-linux-gnu ;;
	armv7-*) echo arm-linux-gnueabihf ;;
	aarch64-*) echo aarch64-linux-gnu ;;
	*) return 1 ;;
	esac
}

target_dir=${CARGO_TARGET_DIR:-$repo/target}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
rows=()
failed=()
cd "$repo"
for t in "${targets[@]}"; do
	gt=$(gnu_triple "$t") || {
		echo "cross-sizes: unknown target $t" >&2
		exit 2
	}
	echo "cross-sizes: building $t" >&2
	if ! XRUST_CMD=build "$cross/cross-test.sh" "$t" --release --locked >&2; then
		failed+=("$t")
		rows+=("$(printf '%-32s %14s %14s' "$t" "build failed" "-")")
		continue
	fi
	out="$target_dir/$t/release"
	# Strip a copy, as OpenWrt's packaging step does, whatever the profile says.
	"$gt-strip" -o "$work/gwsync" "$out/gwsync"
	bin=$(stat -c %s "$work/gwsync")
	# The archive holds the whole of std; a C program links only what it uses.
	lib=$(stat -c %s "$out/libgwsync.a")
	rows+=("$(printf '%-32s %14s %14s' "$t" "$bin" "$lib")")
done

echo
echo "profile: ${GWSYNC_SIZES_PROFILE:-openwrt}; $("${XRUST_PREFIX:-/opt/xrust}/rust-${XRUST_VERSION:-1.85}/bin/rustc" -V 2> /dev/null || echo rustc ?)"
printf '%-32s %14s %14s\n' target "gwsync bytes" "libgwsync.a"
printf '%-32s %14s %14s\n' "" "(stripped)" "bytes"
printf '%s\n' "${rows[@]}"
if [ ${#failed[@]} -gt 0 ]; then
	echo "cross-sizes: build failed for: ${failed[*]}" >&2
	exit 1
fi
