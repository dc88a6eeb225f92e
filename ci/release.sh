#!/usr/bin/env bash
# Release: run every test, build the images with Nix, deploy them with the deploy tool of
# the same revision. Needs Nix with flakes, and AWS credentials in the environment.
#
#   ci/release.sh manifest.json [fjord-deploy arguments, e.g. --dry-run]
set -euo pipefail
cd "$(dirname "$0")/.."

(($# >= 1)) || { echo "usage: ci/release.sh MANIFEST [fjord-deploy arguments]" >&2; exit 2; }
manifest=$1
shift
[[ -f $manifest ]] || { echo "ci/release.sh: no manifest at $manifest" >&2; exit 2; }

step() { printf '\n==> %s\n' "$*"; }
nix_flakes=(nix --extra-experimental-features 'nix-command flakes')

step "tests"
ci/test.sh
ci/test-deploy.sh

step "nix build .#images"
"${nix_flakes[@]}" build --print-build-logs .#images
ls -l result/

step "nix run .#deploy -- $manifest $*"
"${nix_flakes[@]}" run .#deploy -- "$manifest" "$@"
