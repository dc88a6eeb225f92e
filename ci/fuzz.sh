#!/usr/bin/env bash
# Fuzzes every parser that takes outside input, on stable Rust: the `fuzz_*` property tests
# (proptest) in the libraries (`--lib` runs every default member's), run with many more cases
# than the ordinary test run gives them. Each one feeds arbitrary bytes and near-valid shapes
# to a parser (request head, query, Last-Event-ID, tokens, JWKS, bus entries, envelopes, key
# filters; filter expressions and projections in src/filter) and requires a clear error or a
# valid result, never a panic. A failing input is shrunk and written to
# `proptest-regressions/` (src/filter/proptest-regressions/ for the filter crate), which is
# checked in: every later run replays it first.
#   FJORD_FUZZ_CASES    cases per target (default 5000; the ordinary `cargo test` runs 256;
#                       the nightly fuzz workflow runs 100000 in release mode)
#   FJORD_FUZZ_SECONDS  the whole run's time bound (default 600); exceeding it fails the run
#   FJORD_FUZZ_RELEASE=1  build the tests optimized (slower to build, far more cases a second)
#   FJORD_FUZZ_PROFILE=P  build them in cargo profile P instead (ci/attack.sh: `attack`)
set -euo pipefail
cd "$(dirname "$0")/.."

cases="${FJORD_FUZZ_CASES:-5000}"
seconds="${FJORD_FUZZ_SECONDS:-600}"

profile=()
[ "${FJORD_FUZZ_RELEASE:-0}" = 1 ] && profile=(--release)
[ -n "${FJORD_FUZZ_PROFILE:-}" ] && profile=(--profile "$FJORD_FUZZ_PROFILE")

# Built first, so the time bound measures fuzzing, not compiling.
cargo test --locked "${profile[@]}" --lib --no-run
started=$(date +%s)
status=0
# Not --foreground: on expiry timeout signals its whole process group, the test binary too.
PROPTEST_CASES="$cases" timeout --kill-after=10 "$seconds" \
  cargo test --locked "${profile[@]}" --lib -- fuzz_ || status=$?
elapsed=$(( $(date +%s) - started ))
if [ "$status" -eq 124 ] || [ "$status" -eq 137 ]; then
  echo "fuzz: not finished within ${seconds} s (FJORD_FUZZ_CASES=${cases}); lower the cases or raise the bound" >&2
  exit 1
fi
[ "$status" -eq 0 ] || exit "$status"
targets=$(grep -rhoE 'fn fuzz_[a-z0-9_]+' src | sort -u | wc -l)
echo "fuzz: ${targets} targets × ${cases} cases in ${elapsed} s"
