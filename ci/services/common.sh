# shellcheck shell=bash
# Helpers shared by ci/services.sh and ci/deploy-services.sh: processes started in the
# background with pid files, readiness polling, and apt installs of what is missing.
# The sourcing script defines log, die, STATE, HOST and TIMEOUT first.

port_open() { # port -> 0 if something accepts TCP connections on $HOST:port
    (exec 3<>"/dev/tcp/$HOST/$1") 2>/dev/null
}

# pidfile, pattern -> prints the pid if the file names a live process whose command line
# contains pattern (guards against pid reuse); returns 1 otherwise.
live_pid() {
    local file=$1 pattern=$2 pid
    [[ -s $file ]] || return 1
    pid=$(tr -dc '0-9' <"$file")
    [[ -n $pid ]] || return 1
    kill -0 "$pid" 2>/dev/null || return 1
    tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -qF -- "$pattern" || return 1
    printf '%s\n' "$pid"
}

# pid, tenths of a second -> 0 once the process is gone, 1 if it is still there.
wait_gone() {
    local pid=$1 tenths=$2 i
    for ((i = 0; i < tenths; i++)); do
        kill -0 "$pid" 2>/dev/null || return 0
        sleep 0.1
    done
    ! kill -0 "$pid" 2>/dev/null
}

# name, pidfile, pattern: SIGTERM, wait up to 30 s, then SIGKILL.
stop_pid() {
    local name=$1 file=$2 pattern=$3 pid
    if ! pid=$(live_pid "$file" "$pattern"); then
        rm -f "$file"
        log "$name not running"
        return 0
    fi
    log "stopping $name (pid $pid)…"
    kill -TERM "$pid" 2>/dev/null || true
    if ! wait_gone "$pid" 300; then
        log "$name did not stop within 30 s; sending SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
        wait_gone "$pid" 50 || true
    fi
    rm -f "$file"
    log "$name stopped"
}

# name, logfile, check-function: poll check until it succeeds or TIMEOUT passes.
wait_ready() {
    local name=$1 logfile=$2 check=$3 deadline
    deadline=$((SECONDS + TIMEOUT))
    until "$check"; do
        if ((SECONDS >= deadline)); then
            log "$name not ready after ${TIMEOUT}s; last lines of $logfile:"
            tail -n 60 "$logfile" >&2 2>/dev/null || true
            exit 1
        fi
        sleep 0.5
    done
}

# packages... -> installs those that are missing, with one apt-get update first.
apt_install() {
    local missing=() p
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
    done
    ((${#missing[@]} == 0)) && return 0
    log "installing ${missing[*]} with apt…"
    local sudo=()
    ((EUID == 0)) || sudo=(sudo)
    mkdir -p "$STATE"
    # RUNLEVEL=1: where there is no policy-rc.d, keep a package's own service from starting.
    if ! { "${sudo[@]}" apt-get update -qq &&
        RUNLEVEL=1 DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq \
            --no-install-recommends "${missing[@]}"; } >"$STATE/apt.log" 2>&1; then
        tail -n 40 "$STATE/apt.log" >&2
        die "apt-get install failed (see $STATE/apt.log)"
    fi
}

usage() { # prints the calling script's header comment, its manual, and exits 2
    sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2
    exit 2
}
