#!/usr/bin/env bash
# ci-cross.sh: CI job for the router CPUs. Installs the cross toolchain with
# scripts/cross/cross-setup.sh (from Debian packages) and runs the whole test suite under qemu-user
# for mipsel-unknown-linux-musl and mips-unknown-linux-musl, the two CPUs
# OpenWrt ships most, one of each byte order (about 4 minutes with setup).
#
# It fails, loudly, when the Debian archive cannot be reached: the toolchain
# comes from there, and a job that skipped the cross tests because it could
# not install them would pass without testing anything.
#
# Env: GWSYNC_CROSS_DIR (default: scripts/cross), CI_CROSS_TARGETS
#      (default: the two MIPS targets), CI_CROSS_CARGO_ARGS (extra cargo test
#      arguments, e.g. --release), XRUST_PREFIX / XRUST_VERSION.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(dirname "$here")
cross=${GWSYNC_CROSS_DIR:-$here/cross}
read -r -a targets <<< "${CI_CROSS_TARGETS:-mipsel-unknown-linux-musl mips-unknown-linux-musl}"
read -r -a cargo_args <<< "${CI_CROSS_CARGO_ARGS-}"

fail() {
	{
		echo
		echo "################################################################"
		echo "ci-cross: FAILED: $*"
		echo "################################################################"
	} >&2
	# GitHub/Gitea-style annotation; other CI systems just print it.
	echo "::error::ci-cross: $*" >&2
	exit 1
}

for s in cross-setup.sh cross-test.sh; do
	[ -x "$cross/$s" ] || fail "$cross/$s not found (set GWSYNC_CROSS_DIR)"
done

sudo=
if [ "$(id -u)" != 0 ]; then
	command -v sudo > /dev/null || fail "needs root or sudo for apt-get"
	sudo=sudo
fi

# cross-setup.sh only warns when apt-get update fails and then carries on with
# whatever package lists it has, so check reachability here first.
echo "ci-cross: checking the Debian archive" >&2
if ! update=$($sudo apt-get update 2>&1) ||
	grep -Eq '^(Err:|E: |W: Failed to fetch|W: Some index files failed)' <<< "$update"; then
	printf '%s\n' "$update" >&2
	fail "the Debian archive cannot be reached (apt-get update failed); the cross toolchain cannot be installed"
fi

"$cross/cross-setup.sh" "${targets[@]}" ||
	fail "cross-setup.sh ${targets[*]} failed (see above)"

cd "$repo"
# Debug info is most of target/ under -Zbuild-std; line tables keep
# backtraces useful.
export CARGO_PROFILE_DEV_DEBUG=${CARGO_PROFILE_DEV_DEBUG:-line-tables-only}
export CI=${CI:-1}
# Emulated debug builds run the simulator ~20x slower; a fifth of the seeds
# still covers every scenario kind on each byte order.
export GWSYNC_SIM_SCALE=${GWSYNC_SIM_SCALE:-20}
log=$(mktemp)
trap 'rm -f "$log"' EXIT
for t in "${targets[@]}"; do
	echo "ci-cross: cargo test for $t under qemu" >&2
	"$cross/cross-test.sh" "$t" --locked "${cargo_args[@]}" 2>&1 | tee "$log" ||
		fail "tests failed for $t"
	# A runner that executed nothing would also exit 0.
	ran=$(grep -c '^test result: ok' "$log" || true)
	[ "$ran" -gt 0 ] || fail "no test binary ran for $t"
	echo "ci-cross: $t: $ran test binaries passed" >&2
done
echo "ci-cross: all passed for ${targets[*]}" >&2
