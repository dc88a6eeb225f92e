#!/usr/bin/env bash
# The attack run: fjord-server built in the `attack` profile (release, `panic = "abort"`),
# under the attack-shaped integration tests, then the fuzzers. With abort, a panic anywhere in
# the server, a connection's task included (which tokio would otherwise catch and log), ends
# the process, and the tests talking to it fail; the attack tests also fail on any
# "panicked" line in its log. Needs the services of ci/services.sh (it starts and stops
# none).
#   ci/attack.sh [test filters]   e.g. ci/attack.sh attacks::
set -euo pipefail
cd "$(dirname "$0")/.."

tests=(attacks:: limits:: auth:: http_contract:: bus_entries:: key_filter_memory:: replay_memory::)
[ $# -gt 0 ] && tests=("$@")

cargo build --locked --profile attack -p fjord-server --bin fjord-server
# The tests and the other binaries they start (fjord, fjord-consumer) are the ordinary
# debug build; every server they start is the attack build (tests/common: server_binary).
cargo build --locked --bins
FJORD_TEST_SERVER="$PWD/target/attack/fjord-server" cargo test --locked \
  -p fjord-tests --test integration -- "${tests[@]}"
# The fuzzers, optimized in the same profile. The test harness unwinds whatever the profile
# says (cargo ignores `panic` for tests), so a failing case is shrunk and reported.
FJORD_FUZZ_PROFILE=attack ci/fuzz.sh
