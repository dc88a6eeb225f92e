#!/usr/bin/env bash
# Builds the debug binaries (fjord, fjord-server, fjord-consumer) when one is missing or
# older than the sources, for the scripts that run them as a user would
# (ci/test-browser.sh, ci/test-readme.sh); cargo's own check is slower when nothing changed.
set -euo pipefail
cd "$(dirname "$0")/.."

stale=0
for bin in target/debug/fjord target/debug/fjord-server target/debug/fjord-consumer; do
  if [ ! -x "$bin" ] || [ -n "$(find src Cargo.toml Cargo.lock -newer "$bin" -print -quit)" ]; then
    stale=1
  fi
done
if [ "$stale" = 1 ]; then
  printf '\n==> rust: cargo build --bins\n'
  cargo build --bins --locked
fi
