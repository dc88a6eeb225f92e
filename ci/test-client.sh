#!/usr/bin/env bash
# The JavaScript client (client/, @fjord/client): installs its locked dev dependencies
# (npm ci, from the ~/.npm cache when it has them; its `prepare` builds dist/), runs the
# build, the type check and the vitest suite (with `require` and `import` of the built package
# and its size budget), checks that src/cli/dev/fjord-client.js (the bundle that `fjord dev`
# embeds) matches the fresh build, and installs the package from its folder and from a git
# repository into throwaway apps. Needs Node 20+, npm and git; exits non-zero on failure. The
# browser tests are ci/test-browser.sh.
set -euo pipefail
cd "$(dirname "$0")/../client"

step() { printf '\n==> %s\n' "$*"; }

command -v node >/dev/null || { echo "test-client: node is not installed" >&2; exit 1; }
major=$(node -p 'process.versions.node.split(".")[0]')
if [ "$major" -lt 20 ]; then
  echo "test-client: Node 20 or later is needed, found $(node --version)" >&2
  exit 1
fi

step "client: npm ci"
npm ci --prefer-offline --no-audit --no-fund

step "client: build, type check and tests"
npm test

step "client: the bundle fjord dev embeds is fresh"
npm run --silent check:demo

step "client: installs from a folder and from git build it (prepare)"
npm run --silent check:install
