#!/usr/bin/env bash
# Static Linux binaries for this machine's CPU (x86_64 or aarch64), linked with musl:
# `fjord` (the CLI, with `fjord dev`), `fjord-consumer`, and `fjord-server` built without
# librdkafka as in the images. It checks that they are static (no program interpreter, no
# shared library), that `fjord dev` from the archive serves its page, and packs them.
#
#   ci/build-static.sh [OUT_DIR]   default: target/dist
#
# Writes OUT_DIR/fjord-VERSION-ARCH-unknown-linux-musl.tar.gz and a .sha256 beside it.
# Environment: FJORD_VERSION (default: `git describe --tags --always`), CARGO_TARGET_DIR.
# Needs Debian/Ubuntu (apt for musl-tools) and rustup; run by ci.yml on every change and by
# release.yml on a tag, on native runners of both architectures.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '[build-static] %s\n' "$*" >&2; }
die() {
    log "error: $*"
    exit 1
}

out=$(mkdir -p "${1:-target/dist}" && cd "${1:-target/dist}" && pwd)
arch=$(uname -m)
case $arch in
x86_64 | aarch64) ;;
*) die "no static build for $arch" ;;
esac
target=$arch-unknown-linux-musl
version=${FJORD_VERSION:-$(git describe --tags --always 2>/dev/null || echo dev)}
name=fjord-$version-$target

ci/install-build-deps.sh
STATE=${FJORD_CI_STATE:-/tmp/fjord-ci}
# shellcheck source=ci/services/common.sh
source ci/services/common.sh
apt_install musl-tools curl file
rustup target add "$target"

# Debian's musl-tools has `musl-gcc` only, which the cc crate finds for x86_64 by itself
# but not for aarch64 (it asks for aarch64-linux-musl-gcc). It has no C++ compiler:
# librdkafka's CMake project wants one for its C++ wrapper, which rdkafka-sys does not link,
# so the host's g++ stands in. musl-gcc sees musl's headers only, which is enough: what
# librdkafka uses (OpenSSL, zlib, zstd, libcurl) is built from vendored sources.
export "CC_${target//-/_}=musl-gcc" "CXX_${target//-/_}=g++"

target_dir=${CARGO_TARGET_DIR:-target}
start=$SECONDS
log "cargo build --release --target $target: fjord, fjord-consumer…"
cargo build --release --locked --target "$target" -p fjord -p fjord-consumer
log "cargo build --release --target $target: fjord-server…"
cargo build --release --locked --target "$target" -p fjord-server
log "built in $((SECONDS - start)) s"

binaries=(fjord fjord-consumer fjord-server)
stage=$target_dir/$target/release/$name
rm -rf "$stage"
mkdir -p "$stage"
for binary in "${binaries[@]}"; do
    file=$target_dir/$target/release/$binary
    if readelf -l "$file" | grep -q 'INTERP'; then die "$binary asks for a program interpreter"; fi
    if readelf -d "$file" | grep -q '(NEEDED)'; then
        die "$binary links shared libraries: $(readelf -d "$file" | grep '(NEEDED)' | tr -s ' ')"
    fi
    cp "$file" "$stage/"
    log "$binary: $(du -h "$file" | cut -f1), $(file -b "$file" | grep -oE '(static-pie|statically|dynamically) linked')"
done
if nm --defined-only "$stage/fjord-server" 2>/dev/null | grep -q 'rd_kafka_'; then
    die "fjord-server links librdkafka"
fi
cp README.md LICENSE "$stage/"

# The archive's `fjord dev` serves its page and becomes ready: librdkafka's mock cluster,
# the bus, the consumer and the server all work in the static binary.
port=$((20000 + RANDOM % 20000))
log "smoke test: fjord dev --port $port…"
dev_log=$(mktemp)
"$stage/fjord" dev --port "$port" >"$dev_log" 2>&1 &
dev_pid=$!
trap 'kill "$dev_pid" 2>/dev/null || true' EXIT
ci/smoke-dev.sh "http://127.0.0.1:$port" "$dev_pid" || { cat "$dev_log" >&2; die "fjord dev from the static build does not work"; }
kill "$dev_pid"
wait "$dev_pid" 2>/dev/null || true
trap - EXIT
rm -f "$dev_log"
log "smoke test passed: $("$stage/fjord" --version)"

tar -C "$(dirname "$stage")" --owner=0 --group=0 --numeric-owner -czf "$out/$name.tar.gz" "$name"
(cd "$out" && sha256sum "$name.tar.gz" >"$name.tar.gz.sha256")
log "$out/$name.tar.gz: $(cut -d' ' -f1 "$out/$name.tar.gz.sha256")"
