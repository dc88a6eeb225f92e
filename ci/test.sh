#!/usr/bin/env bash
# The whole test suite: starts the real Kafka, Redis, Redis Cluster and Schema Registry
# (installing what is missing; on a fresh machine the registry's Maven build and its
# producers' pip install add about 110 s and 80 s), runs formatting and lint checks, unit
# and integration tests (the bus's end-to-end, fault and semantics tests once on Redis,
# then again on the cluster), the documentation's walkthroughs run as written (ci/test-readme.sh), a bounded fuzzing run of the
# parsers, the images' build in a rehearsal of the Nix build sandbox (beside the tests), the deploy tool's
# tests against moto and a registry, the Nix and workflow checks, and the JavaScript
# client's tests (unit and in headless Chromium), then stops the services.
#   FJORD_CI_KEEP_SERVICES=1 ci/test.sh   leaves the services running for the next run
#   ci/test.sh [cargo test arguments]     only the Rust tests, e.g. one module of the
#                                         integration tests: ci/test.sh -p fjord-tests pipeline::
#   FJORD_TEST_BUS=cluster ci/test.sh -p fjord-tests pipeline::   those on the Redis Cluster
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==> %s (at %d s)\n' "$*" "$SECONDS"; }

step "services: Kafka, Redis, a Redis Cluster and a Schema Registry"
ci/services.sh up
# shellcheck disable=SC1091
source "${FJORD_CI_STATE:-/tmp/fjord-ci}/env"
sandbox_pid=
stop() {
  [ -z "$sandbox_pid" ] || kill "$sandbox_pid" 2>/dev/null || true
  [ "${FJORD_CI_KEEP_SERVICES:-0}" = 1 ] || ci/services.sh down
}
trap stop EXIT

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

# The integration tests mostly wait on Kafka, Redis and the servers they start (about a
# quarter of two cores): the sandbox rehearsal, CPU-bound in a target dir of its own, builds
# beside them and is waited for at its step.
sandbox_log=${FJORD_CI_STATE:-/tmp/fjord-ci}/sandbox-build.log
if [ $# -eq 0 ]; then
  mkdir -p "$(dirname "$sandbox_log")"
  ci/sandbox-build.sh >"$sandbox_log" 2>&1 &
  sandbox_pid=$!
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

step "the images' binaries in a rehearsal of the Nix build sandbox (bubblewrap), built beside the tests"
sandbox_status=0
wait "$sandbox_pid" || sandbox_status=$?
sandbox_pid=
cat "$sandbox_log"
[ "$sandbox_status" -eq 0 ] || exit "$sandbox_status"

step "benchmark tool, tiny load (the real figures: ci/bench.sh, BENCHMARKS.md)"
ci/bench.sh --tiny

step "deploy tool, Nix flake, workflows"
ci/test-deploy.sh

step "JavaScript client"
ci/test-client.sh

step "JavaScript client in headless Chromium"
ci/test-browser.sh
