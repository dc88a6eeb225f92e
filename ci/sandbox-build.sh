#!/usr/bin/env bash
# A rehearsal of the Nix build sandbox: builds the images' binaries (fjord-server
# without librdkafka, fjord-healthcheck, fjord-consumer, fjord), and on request fjord-deploy, in a bubblewrap
# sandbox that has the properties of a Nix build which break builds elsewhere:
#   - crates from `cargo vendor`, read-only, with CARGO_HOME pointing at them as crane does;
#     `--offline --locked`, and no network at all (own network namespace);
#   - no /usr/bin, so no /usr/bin/env: only /bin/sh, and a PATH holding just what Nix's
#     stdenv and the flake's nativeBuildInputs give (compiler and binutils, make, cmake,
#     perl, pkg-config, bash, coreutils, findutils, diffutils, sed, grep, awk, tar, gzip,
#     bzip2, xz, patch) and the Rust toolchain;
#   - C headers of libc and the compilers only, and pkg-config finding nothing, so a crate
#     that needs a system library the flake does not provide fails here too: in particular
#     no curl/curl.h, no OpenSSL and no zlib headers, which the sandbox checks before it
#     builds (librdkafka and what it uses are built from vendored sources);
#   - a clean environment (only what Nix and crane set), HOME=/homeless-shelter unwritable,
#     uid 1000 as nixbld, the source tree read-only; only /build (TMPDIR, CARGO_HOME and the
#     target dir) is writable.
# It is a rehearsal, not Nix: CONTRIBUTING.md ("The Nix sandbox rehearsal") lists what it cannot
# catch.
#
# With FJORD_SANDBOX_FRESH=1 it rehearses a fresh machine instead: `cargo build --bin fjord`
# (what `cargo run --bin fjord -- dev` builds, debug) into an empty target dir, with the same libc and
# compiler headers and the same tools minus pkg-config: Rust and what
# ci/install-build-deps.sh installs, nothing else. It prints how long the build took (wall
# and CPU time) and removes that target dir afterwards.
#
#   ci/sandbox-build.sh [SOURCE_DIR]   build SOURCE_DIR (default: this checkout)
#
# Environment (defaults):
#   FJORD_CI_STATE=/tmp/fjord-ci   the vendored crates, the target dir and the curated
#                                  headers are kept in $FJORD_CI_STATE/sandbox, so that
#                                  reruns are incremental
#   FJORD_SANDBOX_JOBS=$(nproc)    cargo jobs (NIX_BUILD_CORES)
#   FJORD_SANDBOX_PROFILE=dev      the cargo profile: ci/test.sh builds `dev`, which runs every
#                                  build script, C compile and link the images' build does, in
#                                  a fraction of release's CPU time; `release` rehearses the
#                                  images' exact build (the Nix job of ci.yml builds it for real)
#   FJORD_SANDBOX_DEPLOY=0         1 also builds fjord-deploy (not in the images; the
#                                  Nix job of ci.yml builds it for real; ~14 min more cold)
#   FJORD_SANDBOX_FRESH=0          1: the fresh-machine rehearsal (see above)
#   FJORD_SANDBOX_LIBS=            Debian -dev packages whose headers and pkg-config files
#                                  stand for the flake's buildInputs (today none; see
#                                  nix/packages.nix), installed when missing: e.g.
#                                  libcurl4-openssl-dev for a tree whose flake provided curl
#                                  (librdkafka 2.12 before the `curl-static` feature), which
#                                  also turns the check for absent headers off
set -euo pipefail

log() { printf '[sandbox-build] %s\n' "$*" >&2; }
die() {
    log "$*"
    exit 1
}

src=$(cd "${1:-$(dirname "$0")/..}" && pwd)
[[ -f $src/Cargo.lock ]] || die "$src has no Cargo.lock"
state=${FJORD_CI_STATE:-/tmp/fjord-ci}/sandbox
fresh=${FJORD_SANDBOX_FRESH:-0}
profile=${FJORD_SANDBOX_PROFILE:-dev}
case $profile in
dev) profile_dir=debug ;;
release) profile_dir=release ;;
*) die "FJORD_SANDBOX_PROFILE is $profile: dev or release" ;;
esac
jobs=${FJORD_SANDBOX_JOBS:-$(nproc)}
mkdir -p "$state"

sudo=()
((EUID == 0)) || sudo=(sudo)
if ! command -v bwrap >/dev/null 2>&1; then
    log "installing bubblewrap with apt…"
    { "${sudo[@]}" apt-get update -qq &&
        DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq --no-install-recommends bubblewrap; } \
        >"$state/apt.log" 2>&1 || { tail -n 20 "$state/apt.log" >&2; exit 1; }
fi

# Ubuntu 24.04 (GitHub's runners) forbids unprivileged user namespaces through AppArmor
# unless this switch is off.
restrict=/proc/sys/kernel/apparmor_restrict_unprivileged_userns
if ! bwrap --unshare-all --ro-bind / / true 2>/dev/null; then
    if [[ $(cat "$restrict" 2>/dev/null) == 1 ]]; then
        log "allowing unprivileged user namespaces (kernel.apparmor_restrict_unprivileged_userns=0)…"
        "${sudo[@]}" sysctl -q -w kernel.apparmor_restrict_unprivileged_userns=0
    fi
    bwrap --unshare-all --ro-bind / / true || die "bwrap cannot create its namespaces here"
fi

# Vendoring is the one step with network, as crane's vendoring is a fixed-output
# derivation of its own. Redone only when Cargo.lock changes.
vendor=$state/vendor
lock_hash=$(sha256sum "$src/Cargo.lock" | cut -d' ' -f1)
if [[ $(cat "$vendor/.fjord-lock-hash" 2>/dev/null) != "$lock_hash" ]]; then
    log "vendoring the crates of $src/Cargo.lock…"
    rm -rf "$vendor"
    (cd "$src" && cargo vendor --quiet --locked --versioned-dirs "$vendor" >/dev/null)
    echo "$lock_hash" >"$vendor/.fjord-lock-hash"
fi

# The C headers a Nix stdenv has without any buildInputs: glibc's, the kernel's and the
# compilers' own, plus those of FJORD_SANDBOX_LIBS, whose pkg-config files are the only
# ones pkg-config finds. Host /usr/include also holds headers of OpenSSL, zlib, curl…,
# which would let a -sys crate build here and fail in Nix.
libs=${FJORD_SANDBOX_LIBS-}
# shellcheck disable=SC2086 # a list of package names
if [[ -n $libs ]] && ! dpkg-query -W $libs >/dev/null 2>&1; then
    log "installing $libs with apt…"
    { "${sudo[@]}" apt-get update -qq &&
        DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq --no-install-recommends $libs; } \
        >"$state/apt.log" 2>&1 || { tail -n 20 "$state/apt.log" >&2; exit 1; }
fi
include=$state/include
if [[ $(cat "$include/.fjord-libs" 2>/dev/null) != "libs: $libs" ]]; then
    log "collecting libc and compiler headers${libs:+, and those of $libs}…"
    rm -rf "$include"
    mkdir -p "$include/usr/include" "$include/pkgconfig"
    packages=()
    # shellcheck disable=SC2086 # a list of package names
    for package in libc6-dev linux-libc-dev libcrypt-dev "libstdc++-$(c++ -dumpversion)-dev" $libs; do
        dpkg-query -W "$package" >/dev/null 2>&1 && packages+=("$package")
    done
    dpkg -L "${packages[@]}" | grep '^/usr/include/' | tar -cf - --no-recursion -T - 2>/dev/null |
        tar -xf - -C "$include"
    # shellcheck disable=SC2086
    [[ -z $libs ]] || dpkg -L $libs | grep '/pkgconfig/.*\.pc$' | xargs -r cp -t "$include/pkgconfig"
    echo "libs: $libs" >"$include/.fjord-libs"
fi

# The build's PATH: each tool bound read-only into /tools/bin by its resolved file, so
# nothing else of /usr/bin is reachable. /tools/lib, /tools/libexec and /tools/share lead to
# /usr's, where gcc and cmake look for their own parts, relative to where they run from.
tools=(cc c++ gcc g++ cpp ld ld.bfd as ar ranlib nm strip objcopy objdump readelf
    make cmake perl bash sed grep awk find xargs diff cmp tar gzip bzip2 xz patch)
# A fresh machine has no pkg-config unless something installs it.
((fresh)) || tools+=(pkg-config)
# dpkg lists coreutils under /bin or /usr/bin, depending on the release.
mapfile -t coreutils < <(dpkg -L coreutils | sed -n 's|^/\(usr/\)\{0,1\}bin/||p' | grep -v '[[]' | sort -u)
tools+=("${coreutils[@]}")
binds=()
for tool in "${tools[@]}"; do
    path=$(type -P "$tool") || die "the sandbox needs $tool, which is not installed"
    binds+=(--ro-bind "$(readlink -f "$path")" "/tools/bin/$tool")
done
# Nix's bash package is also its `sh`, on PATH and at /bin/sh.
binds+=(--ro-bind "$(readlink -f "$(type -P bash)")" /tools/bin/sh)
toolchain=$(rustc --print sysroot)

etc=$state/etc
mkdir -p "$etc"
printf '%s\n' 'root:x:0:0:Nix build user:/build:/noshell' 'nixbld:x:1000:100:Nix build user:/build:/noshell' \
    'nobody:x:65534:65534:Nobody:/:/noshell' >"$etc/passwd"
printf '%s\n' 'root:x:0:' 'nixbld:!:100:' 'nogroup:x:65534:' >"$etc/group"
printf '%s\n' '127.0.0.1 localhost' '::1 localhost' >"$etc/hosts"

# The fresh-machine rehearsal starts from an empty target dir, its own.
target=$state/target
if ((fresh)); then
    target=$state/fresh-target
    rm -rf "$target"
fi
mkdir -p "$target"
cat >"$state/cargo-config.toml" <<'EOF'
[source.crates-io]
replace-with = "vendored-sources"

[source.vendored-sources]
directory = "/nix/store/fjord-vendor-cargo-deps"

[net]
offline = true
EOF

# /build is a tmpfs, so only its two bound parts outlive the run: the target dir, kept
# like crane's cargoArtifacts, and (read-only) the source. CARGO_HOME is fresh each time.
sandbox=(bwrap --unshare-all --uid 1000 --gid 100 --hostname localhost --die-with-parent
    --tmpfs /build
    --ro-bind /usr/lib /usr/lib --symlink usr/lib /lib
    --ro-bind /usr/share /usr/share --ro-bind /usr/libexec /usr/libexec
    --ro-bind "$include/usr/include" /usr/include
    --ro-bind "$include/pkgconfig" /nix/store/fjord-build-inputs/lib/pkgconfig
    --ro-bind "$(readlink -f /bin/bash)" /bin/sh)
[[ -d /usr/lib64 ]] && sandbox+=(--ro-bind /usr/lib64 /usr/lib64 --symlink usr/lib64 /lib64)
sandbox+=("${binds[@]}"
    --symlink /usr/lib /tools/lib --symlink /usr/libexec /tools/libexec --symlink /usr/share /tools/share
    --ro-bind "$toolchain" /rust
    --ro-bind "$vendor" /nix/store/fjord-vendor-cargo-deps
    --ro-bind "$src" /build/source
    --ro-bind "$state/cargo-config.toml" /build/.cargo-home/config.toml
    --bind "$target" /build/target
    --ro-bind "$etc/passwd" /etc/passwd --ro-bind "$etc/group" /etc/group --ro-bind "$etc/hosts" /etc/hosts
    --proc /proc --dev /dev --tmpfs /dev/shm
    --chmod 0755 /build --chdir /build/source
    --remount-ro /)

# What Nix's builder, the compiler and binutils wrappers' setup hooks and crane's hooks
# export, nothing from the caller.
environment=(
    PATH=/tools/bin:/rust/bin
    HOME=/homeless-shelter
    NIX_BUILD_TOP=/build TMPDIR=/build TEMPDIR=/build TMP=/build TEMP=/build
    NIX_BUILD_CORES="$jobs" NIX_STORE=/nix/store TERM=xterm-256color
    SOURCE_DATE_EPOCH=315532800
    CC=gcc CXX=g++ AR=ar AS=as LD=ld NM=nm OBJCOPY=objcopy OBJDUMP=objdump RANLIB=ranlib
    READELF=readelf STRIP=strip
    CARGO_HOME=/build/.cargo-home CARGO_BUILD_JOBS="$jobs" CARGO_BUILD_INCREMENTAL=false
    CARGO_TARGET_DIR=/build/target CARGO_TERM_PROGRESS_WHEN=never
    PKG_CONFIG_LIBDIR=/nix/store/fjord-build-inputs/lib/pkgconfig
)

in_sandbox() {
    "${sandbox[@]}" -- /tools/bin/env -i "${environment[@]}" "$@"
}

log "sandbox checks: no network, no /usr/bin/env, HOME and the source read-only"
in_sandbox /bin/sh -c '
    set -u
    fail() { echo "sandbox property violated: $*" >&2; exit 1; }
    [ ! -e /usr/bin/env ] || fail "/usr/bin/env exists"
    [ ! -e /usr/bin ] || fail "/usr/bin exists"
    ! mkdir -p "$HOME" 2>/dev/null || fail "HOME is writable"
    ! touch /build/source/.probe 2>/dev/null || fail "the source is writable"
    ! touch /nix/store/fjord-vendor-cargo-deps/.probe 2>/dev/null || fail "the vendored crates are writable"
    ! (exec 3<>/dev/tcp/127.0.0.1/16379) 2>/dev/null || fail "loopback of the host is reachable"
    [ "$(id -u)" = 1000 ] || fail "not uid 1000"
' || die "the sandbox is not what it should be"
# What a bare machine lacks: the headers of the libraries librdkafka can use (curl, OpenSSL,
# zlib) and their pkg-config files. With FJORD_SANDBOX_LIBS the caller provides some.
if [[ -z $libs ]]; then
    log "sandbox checks: no curl, OpenSSL or zlib headers, no pkg-config file"
    in_sandbox /bin/sh -c '
        fail() { echo "sandbox property violated: $*" >&2; exit 1; }
        for header in curl/curl.h openssl/ssl.h openssl/opensslv.h zlib.h zstd.h; do
            [ ! -e "/usr/include/$header" ] || fail "/usr/include/$header exists"
        done
        [ -z "$(ls -A "$PKG_CONFIG_LIBDIR")" ] || fail "pkg-config finds $(ls "$PKG_CONFIG_LIBDIR")"
        printf "#include <stdio.h>\n" | gcc -E -x c - >/dev/null || fail "gcc cannot use libc headers"
        ! printf "#include <curl/curl.h>\n" | gcc -E -x c - >/dev/null 2>&1 || fail "gcc finds curl/curl.h"
        ! printf "#include <zlib.h>\n" | gcc -E -x c - >/dev/null 2>&1 || fail "gcc finds zlib.h"
        ! printf "#include <openssl/ssl.h>\n" | gcc -E -x c - >/dev/null 2>&1 || fail "gcc finds openssl/ssl.h"
    ' || die "the sandbox has headers a bare machine lacks"
fi

build() {
    local what=$1
    shift
    local start=$SECONDS
    log "cargo build --profile $profile $* ($what)…"
    in_sandbox cargo build --profile "$profile" --offline --locked "$@" ||
        die "$what does not build in the sandbox (after $((SECONDS - start)) s)"
    log "$what built in $((SECONDS - start)) s"
}

if ((fresh)); then
    start=$SECONDS
    load=$(cut -d' ' -f1-3 /proc/loadavg)
    log "cargo build --bin fjord (debug, empty target dir, $jobs jobs, load average $load)…"
    # CPU time as well as wall time: on a shared machine the wall time says little. Timed
    # inside the sandbox, where cargo waits for every compiler it starts.
    # shellcheck disable=SC2016 # expanded by the sandbox's shell
    in_sandbox /bin/sh -c 'TIMEFORMAT="[sandbox-build] cargo build: %0R s wall, %0U s user and %0S s system CPU"
        time cargo build --offline --locked -p fjord --bin fjord' ||
        die "fjord does not build on a machine with only Rust and ci/install-build-deps.sh's list"
    log "fjord built from nothing in $((SECONDS - start)) s (load average $load before, $(cut -d' ' -f1-3 /proc/loadavg) after)"
    in_sandbox /build/target/debug/fjord --version
    rm -rf "$target"
    exit 0
fi

total=$SECONDS
build "fjord-consumer and fjord (the dev image's), with librdkafka" -p fjord-consumer -p fjord
build "fjord-server, without librdkafka" -p fjord-server
build "fjord-healthcheck" -p fjord-healthcheck
binaries=(fjord-consumer fjord fjord-server fjord-healthcheck)
if [[ ${FJORD_SANDBOX_DEPLOY:-0} == 1 ]]; then
    build "fjord-deploy" -p fjord-deploy
    binaries+=(fjord-deploy)
fi

for binary in "${binaries[@]}"; do
    [[ -x $state/target/$profile_dir/$binary ]] || die "no $binary in $state/target/$profile_dir"
done
if nm --defined-only "$state/target/$profile_dir/fjord-server" | grep -q 'rd_kafka_'; then
    die "fjord-server links librdkafka"
fi
# Linked only against libraries every image has (glibc), not the host's OpenSSL or zlib.
for binary in "${binaries[@]}"; do
    needed=$(readelf -d "$state/target/$profile_dir/$binary" | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p' | tr '\n' ' ')
    for lib in $needed; do
        case $lib in
        libc.so.* | libm.so.* | libgcc_s.so.* | libpthread.so.* | libdl.so.* | librt.so.* | ld-linux*) ;;
        *) die "$binary links $lib, which the image does not have" ;;
        esac
    done
    log "$binary: $(du -h "$state/target/$profile_dir/$binary" | cut -f1), needs: $needed"
done
log "the images' binaries ($profile) build in the sandbox ($((SECONDS - total)) s)"
