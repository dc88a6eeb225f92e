#!/usr/bin/env bash
# The deploy's tests: starts moto and the local registry (installing what is missing),
# runs fjord-deploy's lints and tests against them, checks the Nix files and the GitHub
# workflows (actionlint), then stops the services.
#   FJORD_CI_KEEP_SERVICES=1 ci/test-deploy.sh   leaves moto and the registry running
#   ci/test-deploy.sh --build   only the lints, the tests' build and installing moto and
#                               actionlint, no service started (ci/test.sh runs it beside
#                               the other tests, at low priority)
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==> %s\n' "$*"; }
state=${FJORD_CI_STATE:-/tmp/fjord-ci}
packages=(-p fjord-deploy -p fjord-healthcheck)
lints() {
    cargo fmt "${packages[@]}" -- --check
    cargo clippy "${packages[@]}" --all-targets --locked -- -D warnings
}

if [[ ${1:-} == --build ]]; then
    step "fjord-deploy: format, lints and the tests' build"
    lints
    cargo test "${packages[@]}" --locked --no-run
    ci/deploy-services.sh venv >/dev/null
    exit 0
fi

step "deploy services: moto and a registry"
ci/deploy-services.sh up
# shellcheck disable=SC1091
source "$state/deploy-env"
if [[ ${FJORD_CI_KEEP_SERVICES:-0} != 1 ]]; then
    trap 'ci/deploy-services.sh down' EXIT
fi

step "fjord-deploy: format and lints"
lints

step "fjord-deploy: unit tests and tests against moto and the registry"
cargo test "${packages[@]}" --locked

step "nix: parse, lock, evaluate with stub inputs"
ci/check-nix.sh

step "actionlint"
"$FJORD_CI_VENV_BIN/actionlint" -color .github/workflows/*.yml
echo "actionlint: .github/workflows/*.yml ok"
