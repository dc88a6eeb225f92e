#!/usr/bin/env bash
# Waits until a `fjord dev` answers ready at URL and checks that it serves its page: the
# smoke test of a built binary or image (ci/build-static.sh, the dev image and the Mac
# build in ci.yml).
#
#   ci/smoke-dev.sh URL [PID]   PID: give up as soon as that process is gone
#
# Environment: FJORD_SMOKE_TIMEOUT=60 (seconds)
set -euo pipefail

url=${1:?usage: ci/smoke-dev.sh URL [PID]}
pid=${2:-}
deadline=$((SECONDS + ${FJORD_SMOKE_TIMEOUT:-60}))
until curl -fsS -o /dev/null "$url/readyz" 2>/dev/null; do
    if [[ -n $pid ]] && ! kill -0 "$pid" 2>/dev/null; then
        echo "[smoke-dev] fjord dev (pid $pid) exited before $url/readyz answered" >&2
        exit 1
    fi
    if ((SECONDS >= deadline)); then
        echo "[smoke-dev] $url/readyz not ready after ${FJORD_SMOKE_TIMEOUT:-60} s" >&2
        exit 1
    fi
    sleep 0.5
done
curl -fsS "$url/" | grep -qi '<html' || { echo "[smoke-dev] $url/ serves no page" >&2; exit 1; }
echo "[smoke-dev] $url is ready and serves the demo page" >&2
