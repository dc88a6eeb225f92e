#!/usr/bin/env bash
# The standard benchmark scenarios of BENCHMARKS.md, against the real Redis (and Kafka end
# to end) that ci/services.sh starts. Not part of the test suite.
#   ci/bench.sh           release build, full load (several minutes); writes
#                         target/bench-results.json and rewrites the table in BENCHMARKS.md
#   ci/bench.sh --tiny    debug build, every scenario at a tiny load (well under a minute);
#                         fails if the tool is broken; writes only target/bench-tiny.json
#   ci/bench.sh --only fanout --only floor    some scenarios
#   ci/bench.sh --plots   release build, the server and its floor swept over load and
#                         connections (about 5 minutes): writes docs/bench/*.svg and
#                         sweep.json and rewrites BENCHMARKS.md's headline table
# Without any service: `cargo run --release --bin fjord -- bench quick` (a few seconds).
set -euo pipefail
cd "$(dirname "$0")/.."

tiny=0
plots=0
for arg in "$@"; do
  [ "$arg" = --tiny ] && tiny=1
  [ "$arg" = --plots ] && plots=1
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
if [ "$plots" = 1 ]; then
  exec target/release/fjord bench plots
fi
exec target/release/fjord bench all --out target/bench-results.json --markdown BENCHMARKS.md \
  --command "ci/bench.sh${*:+ $*}" "$@"
