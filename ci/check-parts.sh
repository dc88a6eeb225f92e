#!/usr/bin/env bash
# Each part of the workspace links only what it needs (issue 15): the server neither
# librdkafka nor the CLI's load generator, the consumer not the CLI, and the deploy tool
# only the manifest's types, none of the web stack. Reads cargo's dependency graph, so it
# builds nothing; `ci/test.sh` also checks the built fjord-server for librdkafka's symbols.
set -euo pipefail
cd "$(dirname "$0")/.."

status=0
# forbid PACKAGE CRATE...: fails when PACKAGE's normal (non-dev) dependencies hold a CRATE.
forbid() {
  local package=$1
  shift
  local pattern found
  pattern=$(IFS='|' && echo "$*")
  found=$(cargo tree --locked -p "$package" -e normal --prefix none |
    grep -E "^($pattern) v" | sed 's/ (.*//' | sort -u || true)
  if [ -n "$found" ]; then
    echo "$package must not depend on: $(echo "$found" | tr '\n' ' ')" >&2
    status=1
  else
    echo "$package: none of $*"
  fi
}

forbid fjord rdkafka rdkafka-sys fjord-consumer fjord-cli tempfile
forbid fjord-consumer fjord-cli tempfile
forbid fjord-config fjord warp hyper redis rdkafka jsonwebtoken reqwest tokio
forbid fjord-deploy fjord warp rdkafka rdkafka-sys jsonwebtoken redis
exit "$status"
