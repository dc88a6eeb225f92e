#!/usr/bin/env bash
# The soak run: the whole pipeline on real Kafka and Redis under random faults, bounded in
# time. Not part of ci/test.sh.
#   ci/soak.sh                       five minutes
#   FJORD_SOAK_SECS=60 ci/soak.sh    one minute
#   FJORD_SOAK_SEED=42 ci/soak.sh    the same faults again
set -euo pipefail
cd "$(dirname "$0")/.."
ci/services.sh up
# shellcheck disable=SC1091
source "${FJORD_CI_STATE:-/tmp/fjord-ci}/env"
# The consumer is another package's binary, which `cargo test` does not build by itself.
cargo build --locked --bins
cargo test --locked -p fjord-tests --test integration -- --ignored --nocapture soak::
