#!/usr/bin/env bash
# Each part of the workspace links only what it needs (issues 15 and 23): the server neither
# librdkafka nor the CLI's load generator; the consumer neither the CLI nor the web stack
# (warp, JWT, hyper, server or client half: its registry client is ureq), only the bus it
# shares with the server; the bus none of the web stack; and the deploy tool only the
# manifest's types. Reads cargo's dependency graph, so it builds nothing; `ci/test.sh` also
# checks the built fjord-server for librdkafka's symbols.
set -euo pipefail
cd "$(dirname "$0")/.."

status=0
# tree PACKAGE: the crates in PACKAGE's normal (non-dev) dependencies, resolved as when
# PACKAGE is built alone.
tree() {
  cargo tree --locked -p "$1" -e normal --prefix none | sed 's/ (.*//' | sort -u
}

# forbid PACKAGE CRATE...: fails when PACKAGE's normal (non-dev) dependencies hold a CRATE.
forbid() {
  local package=$1
  shift
  local pattern found
  pattern=$(IFS='|' && echo "$*")
  found=$(tree "$package" | grep -E "^($pattern) v" || true)
  if [ -n "$found" ]; then
    echo "$package must not depend on: $(echo "$found" | tr '\n' ' ')" >&2
    status=1
  else
    echo "$package: none of $*"
  fi
}

forbid fjord-server rdkafka rdkafka-sys fjord-consumer fjord tempfile
forbid fjord-bus fjord-server warp hyper jsonwebtoken reqwest rdkafka
forbid fjord-consumer fjord-server fjord warp hyper jsonwebtoken reqwest tempfile
forbid fjord-config fjord-bus fjord-server warp hyper redis rdkafka jsonwebtoken reqwest tokio
forbid fjord-deploy fjord-bus fjord-server warp rdkafka rdkafka-sys jsonwebtoken redis
exit "$status"
