#!/usr/bin/env bash
# End-to-end tests of the JavaScript client in headless Chromium (client/e2e): a page on
# another origin streams from the real fjord-server and fjord-consumer through the Kafka and
# Redis of `ci/services.sh up` (run that first), across a server kill, a drain, expiring and
# refused tokens, an origin the server does not allow (cors) and no server (network), a stale
# saved id, and `online`/visibility waking a grown backoff; a plain EventSource with its token
# in a cookie streams cross-origin; and the demo page of `fjord dev` (client/e2e/demo.test.mjs):
# full of history at once, orders and drivers with labels that do not overlap, Drop connection
# resuming with no record missed, the key filter, the open connections, the phone layout, no
# 404 (favicon), and `fjord dev --auth` with the banner's token; the map opening on the
# snapshot of the table endpoint `drivers`; and `table()` (client/e2e/tables.test.mjs) keeping
# its rows equal to a real table endpoint's through upserts, tombstones and a server restart.
# Installs Debian chromium when missing, builds the Rust binaries when they are missing or
# older than src/, runs `npm ci` in client/ (its prepare builds). Exits non-zero on failure.
#   FJORD_E2E_SCREENSHOTS=DIR  keep a screenshot of the demo page
#   FJORD_E2E_KEEP=1           keep the temporary dirs (logs, manifest, keys)
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==> %s\n' "$*"; }

if ! command -v chromium >/dev/null; then
  step "browser: apt-get install chromium"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core >/dev/null
fi
chromium --version

env_file="${FJORD_CI_STATE:-/tmp/fjord-ci}/env"
if [ ! -f "$env_file" ]; then
  echo "test-browser: $env_file is missing: run ci/services.sh up first" >&2
  exit 1
fi
# shellcheck disable=SC1090
source "$env_file"

ci/build-bins.sh

cd client
step "client: npm ci (its prepare builds dist/)"
npm ci --prefer-offline --no-audit --no-fund

step "client: browser tests"
npm run test:browser
