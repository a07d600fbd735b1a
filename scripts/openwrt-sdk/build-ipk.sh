#!/usr/bin/env bash
# build-ipk.sh - build gwsync's OpenWrt package (.ipk) with OpenWrt 24.10.3's
# own build system (rules.mk, include/*.mk, scripts/feeds, scripts/rstrip.sh,
# scripts/ipkg-build, the packages feed's lang/rust/rust-package.mk), arranged
# as an SDK for ramips/mt7621 (mipsel_24kc, musl), on Debian 12, from the
# source tarballs in src/ and the Debian and crates.io registries only.
#
#   build-ipk.sh /path/to/gwsync
#
# The checkout holds the package in one of two layouts:
#   (a) openwrt/Makefile, openwrt/files/...            feed = a folder with the
#       symlink gwsync -> <checkout>/openwrt
#   (b) openwrt/gwsync/Makefile, openwrt/gwsync/files/  feed = <checkout>/openwrt
#
# Env: WORK          work tree (SDK, sources, logs), reused; default /tmp/owsdk
#      SRC_TARBALLS  folder with the pinned OpenWrt source tarballs (they cannot
#                    be downloaded here); default
#                    $GWSYNC_SHARED_DIR/openwrt-sdk/src, GWSYNC_SHARED_DIR
#                    defaulting to ../shared beside the checkout
#      SDK_MAKE_VARS extra VAR=value words for the package's make calls
#                    (compile, download, check), e.g. "GWSYNC_SRC_DIR=/path"
#      XRUST_PREFIX  where scripts/cross/cross-setup.sh installs; default /opt/xrust
#      XRUST         its Rust toolchain; default $XRUST_PREFIX/rust-1.85
#      JOBS          make -j; default: nproc
# Copied from the shared environment's openwrt-sdk/ so that CI needs only
# the project and the source tarballs. What is real and what is stood in
# for: openwrt/gwsync/README.md, "The SDK build in CI".
set -euo pipefail

SRC=${1:?usage: build-ipk.sh /path/to/gwsync}
SRC=$(cd "$SRC" && pwd)
HERE=$(cd "$(dirname "$0")" && pwd)
WORK=${WORK:-/tmp/owsdk}
REPO=$(cd "$HERE/../.." && pwd)
SRC_TARBALLS=${SRC_TARBALLS:-${GWSYNC_SHARED_DIR:-$REPO/../shared}/openwrt-sdk/src}
XRUST_PREFIX=${XRUST_PREFIX:-/opt/xrust}; export XRUST_PREFIX
XRUST=${XRUST:-$XRUST_PREFIX/rust-1.85}
JOBS=${JOBS:-$(nproc)}
PKG=gwsync

# Source trees, each a `git archive` of one commit (the tarball records it).
OPENWRT_COMMIT=dbd975a3b674c917d2f3b6663864084421944909     # "OpenWrt v24.10.3: adjust config defaults"
PACKAGES_COMMIT=44cff71992c291ae11b7b37606c70db62dc0674e    # packages feed pinned by v24.10.3's feeds.conf.default
ELFKICKERS_COMMIT=e7fba942df51e756897224cff5aa853de8fafd90  # ELFkickers 3.2 release (tools/sstrip: PKG_VERSION 3.2)
OPENWRT_TAR=$SRC_TARBALLS/openwrt-24.10.3-${OPENWRT_COMMIT:0:12}.tar.xz
PACKAGES_TAR=$SRC_TARBALLS/packages-lang-${PACKAGES_COMMIT:0:12}.tar.xz
ELFKICKERS_TAR=$SRC_TARBALLS/ELFkickers-3.2-${ELFKICKERS_COMMIT:0:12}.tar.gz

BR=$WORK/openwrt                 # full buildroot source (for defconfig and the SDK copy)
SDK=$WORK/sdk                    # the SDK-shaped tree
ARCHDIR=mipsel_24kc
TCNAME=toolchain-${ARCHDIR}_gcc-13.3.0_musl
TC=$SDK/staging_dir/$TCNAME
TGT=$SDK/staging_dir/target-${ARCHDIR}_musl
HOSTDIR=$SDK/staging_dir/host
RTARGET=mipsel-unknown-linux-musl
GT=mipsel-linux-gnu              # Debian cross triple
OT=mipsel-openwrt-linux-musl     # OpenWrt's triple (REAL_GNU_TARGET_NAME)
LOG=$WORK/logs; mkdir -p "$LOG"
T0=$(date +%s)
log() { printf '[build-ipk %4ss] %s\n' "$(( $(date +%s) - T0 ))" "$*" >&2; }
die() { printf '[build-ipk] ERROR: %s\n' "$*" >&2; exit 1; }

# ------------------------------------------------------------------ package layout
if [ -f "$SRC/openwrt/$PKG/Makefile" ] && [ -f "$SRC/openwrt/Makefile" ]; then
  die "both $SRC/openwrt/Makefile and $SRC/openwrt/$PKG/Makefile exist; keep one layout"
elif [ -f "$SRC/openwrt/$PKG/Makefile" ]; then
  LAYOUT=b; PKGDIR=$SRC/openwrt/$PKG; FEED=$SRC/openwrt
elif [ -f "$SRC/openwrt/Makefile" ]; then
  LAYOUT=a; PKGDIR=$SRC/openwrt; FEED=$WORK/$PKG-feed
else
  die "no openwrt/Makefile or openwrt/$PKG/Makefile in $SRC"
fi
read -r -a MVARS <<< "${SDK_MAKE_VARS:-}"
for w in ${MVARS[@]+"${MVARS[@]}"}; do
  case $w in [A-Za-z_]*=*) ;; *) die "SDK_MAKE_VARS takes VAR=value words, got '$w'" ;; esac
done

# ------------------------------------------------------------------ 0. host
need_pkgs="git rsync gawk swig libdeflate-tools patchelf ninja-build bison flex quilt libelf-dev xxd libncurses-dev fakeroot pkgconf m4 file unzip bzip2 zstd xz-utils python3-setuptools shfmt"
miss=""; for p in $need_pkgs; do dpkg-query -W -f='${db:Status-Abbrev}' "$p" 2>/dev/null | grep -q '^ii' || miss="$miss $p"; done
[ -z "$miss" ] || { log "apt-get install$miss"; DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $miss >/dev/null; }

# each tarball must be the `git archive` of the expected commit
check_tarball() { # FILE COMMIT
  local got
  [ -f "$1" ] || die "missing source tarball $1 (SRC_TARBALLS=$SRC_TARBALLS)"
  case $1 in *.xz) got=$( (xz -dc "$1" 2>/dev/null || true) | git get-tar-commit-id 2>/dev/null || true) ;;
             *) got=$( (gzip -dc "$1" 2>/dev/null || true) | git get-tar-commit-id 2>/dev/null || true) ;; esac
  [ "$got" = "$2" ] || die "$1 is not a git archive of commit $2 (it records '${got:-nothing}')"
}
check_tarball "$OPENWRT_TAR" "$OPENWRT_COMMIT"
check_tarball "$PACKAGES_TAR" "$PACKAGES_COMMIT"
check_tarball "$ELFKICKERS_TAR" "$ELFKICKERS_COMMIT"
if [ -f "$SRC_TARBALLS/SHA256SUMS" ]; then
  ( cd "$SRC_TARBALLS" && sha256sum --quiet --strict -c SHA256SUMS ) || die "checksum mismatch in $SRC_TARBALLS (SHA256SUMS)"
fi

if [ ! -x "$XRUST/bin/rustc" ] || [ ! -d "$XRUST/usr/lib/rustlib/src/rust/library" ] && [ ! -d "$(ls -d $XRUST/usr/src/rustc-*/library 2>/dev/null | head -1)" ]; then
  pgrep -f cross-setup.sh >/dev/null && die "cross-setup.sh is already running; retry when it is done"
  log "cross-setup.sh $RTARGET (log: $LOG/cross-setup.log)"
  "$HERE/../cross/cross-setup.sh" "$RTARGET" >"$LOG/cross-setup.log" 2>&1 || { tail -20 "$LOG/cross-setup.log"; die "cross-setup.sh failed"; }
fi
command -v $GT-gcc >/dev/null || die "$GT-gcc missing (cross-setup.sh installs it)"
RUSTSRC=$(ls -d "$XRUST"/usr/src/rustc-*/library | head -1)
MUSLSRC=$(ls "$XRUST_PREFIX"/cache/musl-src/musl_*.orig.tar.gz 2>/dev/null | head -1)
[ -n "$MUSLSRC" ] || die "no Debian musl source under $XRUST_PREFIX/cache/musl-src (cross-setup.sh $RTARGET downloads it; XRUST_CLEAN_CACHE=1 deletes it)"

# ------------------------------------------------------------------ 1. buildroot + .config
if [ "$(cat "$BR/.stamp-defconfig" 2>/dev/null)" != "$OPENWRT_COMMIT" ]; then
  log "OpenWrt $OPENWRT_COMMIT -> $BR; make defconfig (ramips/mt7621, CONFIG_SDK=y)"
  rm -rf "$BR"; mkdir -p "$BR"
  tar -xJf "$OPENWRT_TAR" -C "$BR" --strip-components=1
  cat > "$BR/.config" <<'EOF'
CONFIG_TARGET_ramips=y
CONFIG_TARGET_ramips_mt7621=y
CONFIG_TARGET_ramips_mt7621_DEVICE_xiaomi_mi-router-4a-gigabit=y
CONFIG_SDK=y
EOF
  ( cd "$BR" && make defconfig ) >"$LOG/br-defconfig.log" 2>&1 || { tail -30 "$LOG/br-defconfig.log"; die "buildroot defconfig failed"; }
  echo "$OPENWRT_COMMIT" > "$BR/.stamp-defconfig"
fi

# ------------------------------------------------------------------ 2. SDK layout (target/sdk/Makefile)
if [ ! -f "$SDK/.stamp-layout" ]; then
  log "assembling the SDK tree as target/sdk/Makefile does -> $SDK"
  rm -rf "$SDK"
  mkdir -p "$SDK/dl" "$SDK/package" "$TGT/include" "$TGT/usr/include"
  cp -L -r "$BR/include" "$BR/scripts" "$SDK/"
  mkdir -p "$SDK/target/linux"
  cp -r "$BR/target/linux/generic" "$BR/target/linux/ramips" "$SDK/target/linux/"
  rm -rf "$SDK"/target/linux/*/files* "$SDK"/target/linux/*/patches*
  ( cd "$BR/target/sdk" && ./convert-config.pl "$BR/.config" ) > "$SDK/Config-build.in" 2>"$LOG/convert-config.log"
  cp -fpRL "$BR/LICENSES" "$BR/COPYING" "$BR/rules.mk" "$BR/target/sdk/files/Config.in" "$BR/target/sdk/files/Makefile" \
        "$BR/target/sdk/files/include/prepare.mk" "$BR/target/sdk/files/README.md" "$SDK/"
  mkdir -p "$SDK/package/kernel"
  cp -r "$BR/package/Makefile" "$BR/package/libs/toolchain" "$SDK/package/"
  cp -r "$BR/package/kernel/linux" "$SDK/package/kernel/"
  # feeds.conf.default: the SDK's own (base feed + the release's pins); the
  # build uses feeds.conf below instead (local src-link feeds, no network).
  { echo "src-git-full base https://git.openwrt.org/openwrt/openwrt.git;v24.10.3"; cat "$BR/feeds.conf.default"; } > "$SDK/feeds.conf.default"
  rev=$(cat "$BR/version"); sde=$(cat "$BR/version.date")
  sed -i "s,^# REVISION:=.*,REVISION:=$rev,g; s,^# SOURCE_DATE_EPOCH:=.*,SOURCE_DATE_EPOCH:=$sde,g" "$SDK/include/version.mk"
  make -C "$SDK/scripts/config" clean >/dev/null 2>&1 || true
  touch "$SDK/.stamp-layout"
fi

# ------------------------------------------------------------------ 3. staging_dir/host (tools/ outputs)
# The SDK ships tools/ prebuilt in staging_dir/host. Here: Debian's builds of
# the same programs (symlinks), and sstrip built from ELFkickers 3.2 with
# OpenWrt's tools/sstrip patch. prereq-build.mk adds its own links (gcc, perl,
# python3, ...) and builds mkhash itself on the SDK's first make.
mkdir -p "$HOSTDIR/bin" "$HOSTDIR/lib" "$HOSTDIR/include" "$HOSTDIR/share"
hl() { local n=$1 t; t=$(command -v "${2:-$1}") || die "host tool ${2:-$1} missing"; ln -sfn "$t" "$HOSTDIR/bin/$n"; }
for t in sed fakeroot faked patchelf libdeflate-gzip zstd xz unxz lzma m4 bison flex ninja autoconf autoheader automake aclocal libtool libtoolize quilt cpio bc flock; do
  command -v "$t" >/dev/null 2>&1 && hl "$t"
done
# tools/pkgconf installs OpenWrt's pkg-config wrapper over pkg-config.real
hl pkg-config.real pkgconf; hl pkgconf pkgconf; hl file file
install -m755 "$BR/tools/pkgconf/files/pkg-config" "$HOSTDIR/bin/pkg-config"
if [ ! -x "$HOSTDIR/bin/sstrip" ]; then
  log "building sstrip (ELFkickers 3.2 + tools/sstrip/patches)"
  b=$(mktemp -d); tar -xzf "$ELFKICKERS_TAR" -C "$b" --strip-components=1
  ( cd "$b" && for p in "$BR"/tools/sstrip/patches/*.patch; do patch -p1 -s < "$p"; done && make -C sstrip >/dev/null ) || die "sstrip build failed"
  install -m755 "$b/sstrip/sstrip" "$HOSTDIR/bin/sstrip"; rm -rf "$b"
fi

# ------------------------------------------------------------------ 4. toolchain stand-in
# OpenWrt's toolchain is gcc 13.3.0 + binutils 2.42 + musl 1.2.5 built with
# --with-float=soft. Here: Debian's gcc-12 mipsel-linux-gnu cross compiler,
# retargeted to musl 1.2.3 (Debian's source + OpenWrt's toolchain/musl
# patches that apply, soft-float, OpenWrt's CFLAGS) through a specs file,
# under OpenWrt's names in staging_dir/toolchain-*/bin.
if [ ! -f "$TC/.stamp-toolchain" ]; then
  log "toolchain stand-in -> $TC"
  rm -rf "$TC"; mkdir -p "$TC/bin" "$TC/lib" "$TC/stamp"
  GL=$(dirname "$($GT-gcc -print-libgcc-file-name)")
  b=$WORK/src; mkdir -p "$b"; rm -rf "$b"/musl-*
  tar -xzf "$MUSLSRC" -C "$b"; ms=$(ls -d "$b"/musl-*/ | head -1)
  : > "$LOG/musl-patches.log"
  for p in "$BR"/toolchain/musl/patches/*.patch; do
    if ( cd "$ms" && patch -p1 -s --dry-run < "$p" >/dev/null 2>&1 ); then ( cd "$ms" && patch -p1 -s < "$p" ); else echo "musl patch does not apply to Debian's musl: $(basename "$p")" >> "$LOG/musl-patches.log"; fi
  done
  MCFLAGS="-Os -pipe -mno-branch-likely -mips32r2 -mtune=24kc -fno-caller-saves -fno-plt -msoft-float"
  ( cd "$ms" && CC=$GT-gcc CROSS_COMPILE=$GT- CFLAGS="$MCFLAGS" ./configure --prefix=/ --host=x86_64-pc-linux-gnu \
      --target=$OT --disable-gcc-wrapper --enable-debug --enable-optimize &&
    make -j"$JOBS" LIBCC="$GL/libgcc.a" all && make DESTDIR="$TC/" install ) >"$LOG/musl.log" 2>&1 || { tail -20 "$LOG/musl.log"; die "musl build failed"; }
  cp -r "$BR/toolchain/musl/include" "$TC/" 2>/dev/null || true
  # kernel headers (toolchain/kernel-headers) from Debian's cross package
  for d in linux asm asm-generic mtd rdma sound video xen drm misc scsi; do
    [ -d /usr/$GT/include/$d ] && cp -r /usr/$GT/include/$d "$TC/include/" || true
  done
  # gcc's runtime files under OpenWrt's path (rules.mk LIBGCC_A looks there)
  gd="$TC/lib/gcc/$OT/13.3.0"; mkdir -p "$gd"
  for f in crtbegin.o crtbeginS.o crtbeginT.o crtend.o crtendS.o libgcc.a libgcc_eh.a; do ln -sf "$GL/$f" "$gd/$f"; done
  # libgcc_s.so.1 for musl: Debian's links glibc (libc.so.6, _dl_find_object),
  # so link libgcc_eh.a + libgcc.a into a shared object against musl, with
  # Debian's libgcc_s export list and symbol versions.
  python3 "$HERE/unhide-elf.py" "$GL/libgcc_eh.a" "$GL/libgcc.a" "$WORK/src/libgcc-unhidden" >"$LOG/libgcc_s.log" 2>&1
  $GT-readelf --dyn-syms -W /usr/$GT/lib/libgcc_s.so.1 | awk '$7!="UND" && $8 ~ /@/ {split($8,a,"@+"); v[a[2]]=v[a[2]] "    " a[1] ";\n"} END {for (k in v) printf "%s {\n  global:\n%s};\n", k, v[k]; print "GCC_LOCAL { local: *; };"}' > "$WORK/src/libgcc_s.map"
  cat > "$WORK/src/dlfo_shim.c" <<'EOF'
/* musl has no _dl_find_object (glibc 2.35); libgcc's unwinder falls back to
 * dl_iterate_phdr when this returns -1. */
int _dl_find_object(void *pc, void *out) { (void)pc; (void)out; return -1; }
EOF
  $GT-gcc -msoft-float -fPIC -O2 -c "$WORK/src/dlfo_shim.c" -o "$WORK/src/dlfo_shim.o"
  $GT-gcc -msoft-float -shared -nostdlib -Wl,-soname,libgcc_s.so.1 -Wl,--version-script="$WORK/src/libgcc_s.map" \
    -o "$TC/lib/libgcc_s.so.1" "$WORK/src/dlfo_shim.o" -Wl,--whole-archive "$WORK"/src/libgcc-unhidden/eh/*.o -Wl,--no-whole-archive \
    "$WORK"/src/libgcc-unhidden/gcc/*.o -L"$TC/lib" -lc >>"$LOG/libgcc_s.log" 2>&1 || { tail "$LOG/libgcc_s.log"; die "libgcc_s.so.1 link failed"; }
  ln -sf libgcc_s.so.1 "$TC/lib/libgcc_s.so"
  # specs: musl headers/startfiles/dynamic linker for a glibc-targeting gcc
  cat > "$TC/lib/musl-gcc.specs" <<EOF
%rename cpp_options old_cpp_options

*cpp_options:
-nostdinc -isystem $TC/include -isystem include%s %(old_cpp_options)

*cc1:
%(cc1_cpu) -nostdinc -isystem $TC/include -isystem include%s

*link_libgcc:
-L$TC/lib -L .%s

*libgcc:
libgcc.a%s %:if-exists(libgcc_eh.a%s)

*startfile:
%{!shared: %{static-pie:$TC/lib/rcrt1.o} %{!static-pie:%{pie:$TC/lib/Scrt1.o} %{!pie:$TC/lib/Scrt1.o}}} $TC/lib/crti.o %{static:crtbeginT.o%s;shared|pie|static-pie:crtbeginS.o%s;:crtbeginS.o%s}

*endfile:
%{shared|pie|static-pie:crtendS.o%s;:crtendS.o%s} $TC/lib/crtn.o

*link:
%{!static:%{!static-pie:-dynamic-linker /lib/ld-musl-mipsel-sf.so.1}} -nostdlib %{shared:-shared} %{static:-static} %{static-pie:-static -pie --no-dynamic-linker -z text} %{rdynamic:-export-dynamic}

*esp_link:


*esp_options:


*esp_cpp_options:


EOF
  # compiler driver wrappers under OpenWrt's names
  cat > "$TC/bin/.gcc-wrapper" <<EOF
#!/bin/bash
# Stand-in for OpenWrt's $OT-gcc/g++: Debian's $GT cross gcc 12 with musl
# (soft-float) through musl-gcc.specs. -fhonour-copts is an OpenWrt gcc patch.
args=(); for a in "\$@"; do [ "\$a" = -fhonour-copts ] || args+=("\$a"); done
case "\${0##*-}" in g++|c++) drv=$GT-g++ ;; cpp) drv=$GT-cpp ;; *) drv=$GT-gcc ;; esac
exec "\$drv" -msoft-float -specs=$TC/lib/musl-gcc.specs "\${args[@]}"
EOF
  chmod +x "$TC/bin/.gcc-wrapper"
  for d in gcc cc g++ c++ cpp; do ln -sf .gcc-wrapper "$TC/bin/$OT-$d"; done
  for t in ar as ld ld.bfd nm objcopy objdump ranlib readelf size strings strip addr2line c++filt elfedit gprof; do
    [ -x /usr/bin/$GT-$t ] && ln -sf /usr/bin/$GT-$t "$TC/bin/$OT-$t"
  done
  for t in gcc-ar gcc-nm gcc-ranlib; do ln -sf /usr/bin/$GT-$t "$TC/bin/$OT-$t"; done
  cp "$BR/toolchain/info.mk" "$TC/info.mk"
  sed -i 's,^\(LIBC_TYPE\)=.*,\1=musl,; s,^\(LIBC_URL\)=.*,\1=http://www.musl-libc.org/,; s,^\(LIBC_VERSION\)=.*,\1=1.2.3,; s,^\(LIBC_SO_VERSION\)=.*,\1=1.2.3,' "$TC/info.mk"
  touch "$TC/stamp/.ver_check" "$TC/.stamp-toolchain"
fi

# ------------------------------------------------------------------ 5. feeds (local copies, src-link)
# The packages feed is trimmed to lang/ (rust is all this build installs from
# it). The gwsync feed is the checkout itself: layout (a) through a folder
# with a symlink named after the package (as gwsync's openwrt/README.md
# describes), layout (b) directly.
if [ "$(cat "$WORK/.stamp-feeds" 2>/dev/null)" != "$PACKAGES_COMMIT" ]; then
  log "packages feed $PACKAGES_COMMIT (lang/) -> $WORK/feed-packages"
  rm -rf "$WORK/feed-packages"; mkdir -p "$WORK/feed-packages"
  tar -xJf "$PACKAGES_TAR" -C "$WORK/feed-packages" --strip-components=1
  echo "$PACKAGES_COMMIT" > "$WORK/.stamp-feeds"
fi
if [ $LAYOUT = a ]; then
  mkdir -p "$FEED"; ln -sfn "$SRC/openwrt" "$FEED/$PKG"
else
  rm -rf "$WORK/$PKG-feed"
fi
cat > "$SDK/feeds.conf" <<EOF
src-link packages $WORK/feed-packages
src-link $PKG $FEED
EOF
log "layout ($LAYOUT): package dir $PKGDIR, feed '$PKG' = $FEED"
log "scripts/feeds update -a; install rust; install -p $PKG $PKG"
( cd "$SDK" && ./scripts/feeds update -a && ./scripts/feeds install rust && ./scripts/feeds install -p $PKG $PKG ) >"$LOG/feeds.log" 2>&1 || { tail -30 "$LOG/feeds.log"; die "feeds failed"; }
[ -e "$SDK/package/feeds/$PKG/$PKG/Makefile" ] || die "scripts/feeds did not install $PKG (see $LOG/feeds.log)"

# SDK .config (its first make also runs prereq-build.mk, which builds mkhash)
# The stand-in toolchain has no libstdc++/libatomic for musl; the SDK's
# default config (CONFIG_ALL=y) selects their toolchain packages, which
# package/toolchain then fails to copy. gwsync needs neither.
( cd "$SDK" && { grep -q "^CONFIG_PACKAGE_$PKG=m" .config 2>/dev/null || make defconfig; } &&
  sed -i "/^CONFIG_PACKAGE_$PKG=/d; /CONFIG_PACKAGE_libstdcpp[= ]/d; /CONFIG_PACKAGE_libatomic[= ]/d" .config &&
  printf 'CONFIG_PACKAGE_%s=m\n# CONFIG_PACKAGE_libstdcpp is not set\n# CONFIG_PACKAGE_libatomic is not set\n' $PKG >> .config &&
  make defconfig ) >"$LOG/sdk-defconfig.log" 2>&1 || { tail -30 "$LOG/sdk-defconfig.log"; die "SDK defconfig failed"; }
[ -x "$HOSTDIR/bin/mkhash" ] || die "no $HOSTDIR/bin/mkhash after make defconfig (see $LOG/sdk-defconfig.log)"

# ------------------------------------------------------------------ 6. rust/host stand-in
# rust/host (feed lang/rust, rustc 1.89.0 at the pinned feed commit) is built
# by x.py from rustc-1.89.0-src.tar.xz and stage0 compilers from
# static.rust-lang.org, and at that commit with a prebuilt LLVM from
# ci-artifacts.rust-lang.org (llvm.download-ci-llvm=true); later feed commits
# build LLVM from source (hours on 2 cores, ~5 GB). Instead: Debian's
# rustc-web (cross-setup.sh) under the prefix rust/host installs to
# ($(STAGING_DIR)/host), with the target's std built once from Debian's
# rust-web-src (-Zbuild-std, crt-static off, the SDK's gcc as linker) into
# that sysroot, and rust/host's make stamps pre-set.
RH=$TGT/host
# panic_abort usable beside panic_unwind, as in rust/host's std: the
# package's binary is built with panic=abort, its C library with unwind. The
# stamp records what the std build provides, so a work tree with an older std
# rebuilds it.
STD_CRATES=std,panic_unwind,panic_abort
STD_STAMP="$STD_CRATES; panic_abort with panic=abort"
if [ "$(cat "$RH/.stamp-rust" 2>/dev/null)" != "$STD_STAMP" ]; then
  log "rust/host stand-in: $("$XRUST/bin/rustc" -V) -> $RH; std for $RTARGET"
  rm -rf "$RH/lib/rustlib" "$RH/bin/rustc" "$RH/bin/cargo" "$RH/bin/rustdoc"
  mkdir -p "$RH/bin" "$RH/lib/rustlib/$RTARGET/lib"
  ln -sfn "$XRUST/usr/lib/rustlib/x86_64-unknown-linux-gnu" "$RH/lib/rustlib/x86_64-unknown-linux-gnu"
  ln -sfn "$XRUST/usr/lib/rustlib/src" "$RH/lib/rustlib/src" 2>/dev/null || true
  for b in rustc rustdoc; do
    cat > "$RH/bin/$b" <<EOF
#!/bin/sh
LD_LIBRARY_PATH="$XRUST/usr/lib/x86_64-linux-gnu\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}" exec "$XRUST/usr/bin/$b" --sysroot "$RH" "\$@"
EOF
  done
  cat > "$RH/bin/cargo" <<EOF
#!/bin/sh
RUSTC="$RH/bin/rustc" RUSTDOC="$RH/bin/rustdoc" exec "$XRUST/usr/bin/cargo" "\$@"
EOF
  chmod +x "$RH/bin/rustc" "$RH/bin/rustdoc" "$RH/bin/cargo"
  sb=$WORK/std-build; rm -rf "$sb"; mkdir -p "$sb/src"
  printf '[package]\nname = "stdsysroot"\nversion = "0.0.0"\nedition = "2021"\n[lib]\npath = "src/lib.rs"\n' > "$sb/Cargo.toml"
  echo '' > "$sb/src/lib.rs"
  # The abort runtime must itself be compiled with panic=abort, or rustc
  # refuses it for a panic=abort crate; x.py's rustc shim does the same.
  cat > "$sb/rustc-wrapper" <<'EOF'
#!/bin/sh
case " $* " in *" --crate-name panic_abort "*) exec "$@" -C panic=abort ;; esac
exec "$@"
EOF
  chmod +x "$sb/rustc-wrapper"
  up=$(echo "$RTARGET" | tr 'a-z-' 'A-Z_')
  ( cd "$sb" && env RUSTC_BOOTSTRAP=1 CARGO_HOME="$SDK/dl/cargo" __CARGO_TESTS_ONLY_SRC_ROOT="$RUSTSRC" \
      RUSTC_WRAPPER="$sb/rustc-wrapper" \
      "CARGO_TARGET_${up}_LINKER=$TC/bin/$OT-gcc" \
      RUSTFLAGS="-Ctarget-feature=-crt-static -Cembed-bitcode=yes --remap-path-prefix=$RUSTSRC=/rustc/library --remap-path-prefix=$SDK/dl/cargo=/rustc/cargo" \
      CARGO_PROFILE_RELEASE_OPT_LEVEL=3 CARGO_PROFILE_RELEASE_DEBUG=0 CARGO_PROFILE_RELEASE_CODEGEN_UNITS=1 \
      CARGO_PROFILE_RELEASE_PANIC=unwind CARGO_PROFILE_RELEASE_LTO=false \
      "$XRUST/usr/bin/cargo" build --release -Zbuild-std="$STD_CRATES" --target "$RTARGET" -j"$JOBS" \
      --config "build.rustc='$XRUST/bin/rustc'" ) >"$LOG/std-build.log" 2>&1 || { tail -30 "$LOG/std-build.log"; die "std build failed"; }
  find "$sb/target/$RTARGET/release/deps" -name 'lib*.rlib' ! -name 'libstdsysroot-*' -exec cp {} "$RH/lib/rustlib/$RTARGET/lib/" \;
  echo "$STD_STAMP" > "$RH/.stamp-rust"
fi
# rust/host's own build stamps, named as the real host-build.mk names them
# (make val.*). Computed without SDK_MAKE_VARS, as rust/host would have been
# built in a real SDK: a variable that changes them (USE_SOURCE_DIR does)
# makes make rebuild rust/host here too.
rstamps=$(cd "$SDK" && for v in HOST_STAMP_PREPARED HOST_STAMP_CONFIGURED HOST_STAMP_BUILT HOST_STAMP_INSTALLED; do
  make -s -C package/feeds/packages/rust TOPDIR="$SDK" BUILD_SUBDIR=package/feeds/packages/rust val.$v 2>>"$LOG/rust-stamps.log"; done)
case "$rstamps" in *.prepared[0-9a-f]*_[0-9a-f]*) ;; *) die "could not compute rust/host stamp names: $rstamps (see $LOG/rust-stamps.log)" ;; esac
for s in $rstamps; do mkdir -p "$(dirname "$s")"; touch "$s"; sleep 0.01; done

# ------------------------------------------------------------------ 7. build
log "make package/$PKG/compile V=s ${MVARS[*]+${MVARS[*]}} (log: $LOG/compile.log)"
set +e
( cd "$SDK" && make package/$PKG/compile V=s -j"$JOBS" ${MVARS[@]+"${MVARS[@]}"} ) >"$LOG/compile.log" 2>&1
rc=$?
set -e
[ $rc = 0 ] || { tail -40 "$LOG/compile.log"; die "make package/$PKG/compile failed (rc $rc)"; }
IPK=$(ls -t "$SDK"/bin/packages/*/$PKG/${PKG}_*.ipk | head -1)
log "built $IPK"
"$HERE/inspect-ipk.sh" "$IPK" "$SDK" | tee "$WORK/inspect.txt"
log "feed CI steps (offline subset): $HERE/ci-checks.sh"
set +e
CI_LOG_DIR=$LOG SDK_MAKE_VARS="${SDK_MAKE_VARS:-}" "$HERE/ci-checks.sh" "$SDK" "$SRC" "$IPK" "$PKGDIR" | tee "$WORK/ci-checks.txt"
crc=${PIPESTATUS[0]}
set -e
log "done: $IPK; summary $WORK/inspect.txt, CI steps $WORK/ci-checks.txt (rc $crc), logs $LOG"
