#!/usr/bin/env bash
# Installs what building Fjord needs besides Rust, when it is missing: the one list of
# build dependencies (ci/services.sh runs this too).
#
#   ci/install-build-deps.sh     apt on Debian/Ubuntu, Homebrew on macOS; idempotent
#
# What librdkafka's build needs (rdkafka-sys builds it with CMake; OpenSSL, zlib, zstd and
# libcurl are built from vendored sources, so no system library or header is needed):
#   - a C and a C++ compiler and make (librdkafka's CMake project enables C and C++);
#   - cmake: rdkafka-sys's other build path runs librdkafka's `./configure`, whose
#     `#!/usr/bin/env bash` does not exist in the Nix build sandbox; there is no path
#     with the `cc` crate alone;
#   - perl, which runs OpenSSL's Configure.
# Not libcurl's headers: librdkafka 2.12's rdkafka_conf.c includes <curl/curl.h> even with
# WITH_CURL=0 (its CMake config.h defines WITH_OAUTHBEARER_OIDC to 0 and the file tests it
# with #ifdef), so the consumer enables rdkafka's `curl-static` feature, which builds
# libcurl from curl-sys's sources and so provides the header.
set -euo pipefail

log() { printf '[build-deps] %s\n' "$*" >&2; }
die() {
    log "error: $*"
    exit 1
}

case $(uname -s) in
Linux)
    command -v apt-get >/dev/null 2>&1 ||
        die "no apt-get here: install a C and C++ compiler, make, cmake and perl yourself"
    # ci/services/common.sh's apt_install logs to $STATE/apt.log.
    STATE=${FJORD_CI_STATE:-/tmp/fjord-ci}
    # shellcheck source=ci/services/common.sh
    source "$(dirname "${BASH_SOURCE[0]}")/services/common.sh"
    # build-essential: gcc, g++, make and libc's headers; perl is Debian's full perl (OpenSSL's
    # Configure needs more modules than the essential perl-base has).
    packages=(build-essential cmake perl)
    apt_install "${packages[@]}"
    log "present: ${packages[*]}"
    ;;
Darwin)
    # clang, make and perl come with the Command Line Tools.
    xcode-select -p >/dev/null 2>&1 ||
        die "no Command Line Tools: run \`xcode-select --install\`, then this again"
    if ! command -v cmake >/dev/null 2>&1; then
        command -v brew >/dev/null 2>&1 ||
            die "no cmake and no Homebrew: install cmake (https://cmake.org/download/) or Homebrew"
        log "installing cmake with Homebrew…"
        brew install cmake
    fi
    log "present: Command Line Tools ($(xcode-select -p)), cmake ($(command -v cmake))"
    ;;
*)
    die "$(uname -s): install a C and C++ compiler, make, cmake and perl yourself"
    ;;
esac
