#!/usr/bin/env bash
# The standard benchmark scenarios of BENCHMARKS.md, against the real Redis (and Kafka end
# to end) that ci/services.sh starts. Not part of the test suite.
#   ci/bench.sh           release build, full load (several minutes); writes
#                         target/bench-results.json and rewrites the table in BENCHMARKS.md
#   ci/bench.sh --tiny    debug build, every scenario at a tiny load (well under a minute);
#                         fails if the tool is broken; writes only target/bench-tiny.json
#   ci/bench.sh --only fanout --only floor    some scenarios
set -euo pipefail
cd "$(dirname "$0")/.."

tiny=0
for arg in "$@"; do
  [ "$arg" = --tiny ] && tiny=1
done

ci/services.sh up >/dev/null
# shellcheck disable=SC1091
source "${FJORD_CI_STATE:-/tmp/fjord-ci}/env"
# Workers and servers each hold up to ~20,000 sockets.
ulimit -n "$(ulimit -Hn)"

if [ "$tiny" = 1 ]; then
  cargo build --locked --bins
  exec target/debug/fjord bench all --out target/bench-tiny.json "$@"
fi
cargo build --locked --release --bins
exec target/release/fjord bench all --out target/bench-results.json --markdown BENCHMARKS.md \
  --command "ci/bench.sh${*:+ $*}" "$@"
