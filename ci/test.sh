#!/usr/bin/env bash
# The whole test suite: starts the real Kafka, Redis, Redis Cluster and Schema Registry
# (installing what is missing; on a fresh machine the registry's Maven build and its
# producers' pip install add about 110 s and 80 s) while formatting and lint checks and the
# build run, then unit and integration tests (the bus's end-to-end, fault and semantics
# tests once on Redis, then again on the cluster), the documentation's walkthroughs run as
# written (ci/test-readme.sh), a bounded fuzzing run of the parsers, the benchmark tool at
# a tiny load, the JavaScript client's tests (unit and in headless Chromium), the images'
# build in a rehearsal of the Nix build sandbox and the deploy tool's build (both beside the
# tests), the deploy tool's tests against moto and a registry, the Nix and workflow checks,
# then stops the services.
#   FJORD_CI_KEEP_SERVICES=1 ci/test.sh   leaves the services running for the next run
#   ci/test.sh [cargo test arguments]     only the Rust tests, e.g. one module of the
#                                         integration tests: ci/test.sh -p fjord-tests pipeline::
#   FJORD_TEST_BUS=cluster ci/test.sh -p fjord-tests pipeline::   those on the Redis Cluster
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==> %s (at %d s)\n' "$*" "$SECONDS"; }

state=${FJORD_CI_STATE:-/tmp/fjord-ci}
mkdir -p "$state"
# A fresh clone compiles everything once: incremental compilation's bookkeeping would only
# slow it (GitHub's runners set CI=true too).
[ "${CI:-}" != true ] || export CARGO_INCREMENTAL=0

services_pid=
builds_pid=
stop() {
  for pid in $services_pid $builds_pid; do
    pkill -P "$pid" 2>/dev/null || true
    kill "$pid" 2>/dev/null || true
  done
  [ "${FJORD_CI_KEEP_SERVICES:-0}" = 1 ] || ci/services.sh down
}
trap stop EXIT

# Waits for a background job, prints the logs it wrote, and fails as it failed.
finish() { # pid log...
  local pid=$1 status=0 log
  shift
  wait "$pid" || status=$?
  for log in "$@"; do [ ! -f "$log" ] || cat "$log"; done
  return "$status"
}

# Starting the services is mostly waiting (Maven, pip, the JVMs coming up): the lints and
# the build go on beside it. The compilers they need come first.
step "services: Kafka, Redis, a Redis Cluster and a Schema Registry (beside the lints and the build)"
ci/install-build-deps.sh
services_log=$state/services-up.log
ci/services.sh up >"$services_log" 2>&1 &
services_pid=$!

step "format and lints"
cargo fmt --all -- --check
cargo clippy --all-targets --locked -- -D warnings

step "each part links only its own: the server no librdkafka or load generator, deploy no web stack"
ci/check-parts.sh

step "the binaries the integration tests start (fjord, fjord-server, fjord-consumer)"
cargo build --locked --bins
if nm --defined-only target/debug/fjord-server | grep -q 'rd_kafka_'; then
  echo "fjord-server links librdkafka" >&2
  exit 1
fi

step "the services are up"
finish "$services_pid" "$services_log"
services_pid=
# shellcheck disable=SC1091
source "$state/env"

# The integration tests mostly wait on Kafka, Redis and the servers they start. Two
# CPU-bound builds go beside them, one after the other, at the lowest priority so that they
# take only what the tests leave idle: the rehearsal of the Nix build sandbox (a target dir
# of its own), then the deploy tool's lints and test build (target/deploy, so that neither
# waits on the other's lock on target/). Both are waited for before the deploy's tests.
sandbox_log=$state/sandbox-build.log
deploy_build_log=$state/deploy-build.log
rm -f "$sandbox_log" "$deploy_build_log"
if [ $# -eq 0 ]; then
  (
    nice -n 19 ci/sandbox-build.sh >"$sandbox_log" 2>&1 || exit
    CARGO_TARGET_DIR=target/deploy nice -n 19 ci/test-deploy.sh --build >"$deploy_build_log" 2>&1
  ) &
  builds_pid=$!
fi

# Six tests at a time rather than one per core: they wait far more than they compute
# (98 integration tests: 408 s with two at a time, 208 s with six, on two cores).
export RUST_TEST_THREADS="${RUST_TEST_THREADS:-6}"

step "unit and integration tests"
cargo test --locked "$@"
[ $# -eq 0 ] || exit 0

# The integration tests are one binary whose modules run side by side; the few that stop or
# restart a shared service are #[ignore]d there and run here, alone.
step "the fault tests that stop Redis or restart Kafka, alone"
# Without `-p`: the same packages as the run above, hence the same features and no rebuild
# (`-p fjord-tests` alone resolves the dependencies' features anew and recompiles the
# server and the tests).
cargo test --locked --test integration -- --ignored faults::

step "the bus's tests again, on the Redis Cluster (3 primaries, 3 replicas)"
bus_tests=(pipeline:: faults:: http_contract:: bus_entries:: bus_semantics::)
FJORD_TEST_BUS=cluster cargo test --locked --test integration -- "${bus_tests[@]}"
FJORD_TEST_BUS=cluster cargo test --locked --test integration -- --ignored faults::

step "the documentation's walkthroughs, run as written (the first command, Running it, Access control)"
ci/test-readme.sh

step "fuzzing the parsers on stable Rust (bounded; failures kept in proptest-regressions/)"
ci/fuzz.sh

step "benchmark tool, tiny load (the real figures: ci/bench.sh, BENCHMARKS.md)"
ci/bench.sh --tiny

step "JavaScript client"
ci/test-client.sh

step "JavaScript client in headless Chromium"
ci/test-browser.sh

step "the images' binaries in a rehearsal of the Nix build sandbox (bubblewrap), and the deploy tool's lints and test build, built beside the tests"
finish "$builds_pid" "$sandbox_log" "$deploy_build_log"
builds_pid=

step "deploy tool, Nix flake, workflows"
CARGO_TARGET_DIR=target/deploy ci/test-deploy.sh
