#!/usr/bin/env bash
# A real Redis Cluster on loopback for Fjord's tests and benchmarks: PRIMARIES × (1 +
# REPLICAS) Debian `redis-server` processes made into one cluster with
# `redis-cli --cluster create`, with a short node timeout so that a failover takes seconds.
#
#   ci/redis-cluster.sh up DIR BASE_PORT PRIMARIES REPLICAS
#         start the nodes on ports BASE_PORT.. (their cluster bus ports follow them), create
#         the cluster, wait until every node says cluster_state:ok with all 16384 slots
#         served. Idempotent: a healthy cluster of that shape in DIR is left alone; anything
#         else there (a node down, another shape) is stopped, wiped and made again.
#   ci/redis-cluster.sh down DIR      stop every node (SIGTERM, then SIGKILL); data stays
#   ci/redis-cluster.sh start DIR     start the nodes that are not running, keeping their data
#                                     (a killed primary rejoins as a replica); wait until healthy
#   ci/redis-cluster.sh status DIR    one line per node; exit 0 only if the cluster is healthy
#   ci/redis-cluster.sh urls DIR      redis://127.0.0.1:PORT of every node, comma-separated
#   ci/redis-cluster.sh primary-of DIR KEY
#                                     the port of the primary that serves KEY's slot
#   ci/redis-cluster.sh kill-primary-of DIR KEY
#                                     SIGKILL that primary; print its port
#   ci/redis-cluster.sh wait-failover DIR KEY
#                                     wait until a running node serves KEY's slot as primary and
#                                     every running node says cluster_state:ok; print its port
#
# DIR `-` is ${FJORD_CI_STATE:-/tmp/fjord-ci}/redis-cluster, the shared cluster that
# ci/services.sh starts. DIR holds `shape` (BASE_PORT PRIMARIES REPLICAS) and one folder per
# node, DIR/PORT: redis.conf, nodes.conf, the AOF, redis.pid and redis.log.
#
# Environment (defaults):
#   FJORD_CI_TIMEOUT=90      how long to wait for a healthy cluster or a failover, seconds
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
STATE=${FJORD_CI_STATE:-/tmp/fjord-ci}
TIMEOUT=${FJORD_CI_TIMEOUT:-90}
HOST=127.0.0.1
SLOTS=16384

log() { printf '[redis-cluster] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }
# shellcheck source=ci/services/common.sh
source "$SCRIPT_DIR/services/common.sh"

# Set by load_shape (or by `up` from its arguments).
DIR=
BASE_PORT=
PRIMARIES=
REPLICAS=
PORTS=()

# ---------------------------------------------------------------------------- shape

set_shape() { # base primaries replicas
    BASE_PORT=$1 PRIMARIES=$2 REPLICAS=$3
    local nodes=$((PRIMARIES * (1 + REPLICAS))) i
    PORTS=()
    for ((i = 0; i < nodes; i++)); do PORTS+=($((BASE_PORT + i))); done
}

load_shape() {
    [[ -s $DIR/shape ]] || die "no cluster in $DIR (run: ci/redis-cluster.sh up $DIR BASE_PORT PRIMARIES REPLICAS)"
    local -a shape
    read -r -a shape <"$DIR/shape"
    ((${#shape[@]} == 3)) || die "$DIR/shape is not 'BASE_PORT PRIMARIES REPLICAS'"
    set_shape "${shape[@]}"
}

# The cluster bus port of a node: right after the last node's port, so that a block of
# 2 × nodes ports holds the whole cluster (Redis's default, port + 10000, may land in the
# kernel's ephemeral range).
bus_port() { echo $(($1 + ${#PORTS[@]})); }

node_dir() { echo "$DIR/$1"; }
node_pid() { live_pid "$DIR/$1/redis.pid" "redis-server $HOST:$1"; }

# port, command... -> the node's answer; a node that hangs (SIGSTOP) counts as down.
cli() {
    local port=$1
    shift
    timeout 5 redis-cli -h "$HOST" -p "$port" "$@" 2>/dev/null
}

# ---------------------------------------------------------------------------- nodes

node_launch() { # port
    local port=$1 dir
    dir=$(node_dir "$port")
    mkdir -p "$dir"
    # Written on every start, so a changed setting applies to a kept node too.
    cat >"$dir/redis.conf" <<EOF
# Written by ci/redis-cluster.sh.
bind $HOST
port $port
protected-mode no
daemonize yes
dir $dir
pidfile $dir/redis.pid
logfile $dir/redis.log
cluster-enabled yes
cluster-config-file nodes.conf
cluster-port $(bus_port "$port")
# A node alone in its cluster (one primary, no replica) learns no address of its own and
# says "" in CLUSTER SLOTS; announced, it names itself like any other node.
cluster-announce-ip $HOST
# A primary is failed after 1 s, so a failover test waits seconds, not the default 15 s.
cluster-node-timeout 1000
# Any replica may take over, however long it was cut off: tests kill nodes at will.
cluster-replica-validity-factor 0
appendonly yes
appendfsync everysec
save ""
EOF
    # daemonize: redis-server returns once the node forked; fd 9 is the caller's lock.
    redis-server "$dir/redis.conf" >/dev/null 2>&1 </dev/null 9>&- ||
        die "redis-server on port $port did not start; see $dir/redis.log"
}

node_answers() { [[ $(cli "$1" ping) == PONG ]]; }

# port -> 0 if the node says the cluster is ok, every slot served, every node known.
node_ok() {
    local info
    info=$(cli "$1" cluster info | tr -d '\r') || return 1
    grep -qx 'cluster_state:ok' <<<"$info" &&
        grep -qx "cluster_slots_ok:$SLOTS" <<<"$info" &&
        grep -qx "cluster_known_nodes:${#PORTS[@]}" <<<"$info"
}

# port -> 0 if the node's replication is settled: a primary has its replicas online, a
# replica's link to its primary is up (before that, a write may be on the primary alone).
node_synced() {
    local info
    info=$(cli "$1" info replication | tr -d '\r') || return 1
    case $(sed -n 's/^role://p' <<<"$info") in
    master)
        grep -qx "connected_slaves:$REPLICAS" <<<"$info" &&
            ! grep -E '^slave[0-9]+:' <<<"$info" | grep -qv 'state=online'
        ;;
    slave) grep -qx 'master_link_status:up' <<<"$info" ;;
    *) return 1 ;;
    esac
}

healthy() {
    local port
    for port in "${PORTS[@]}"; do
        node_pid "$port" >/dev/null && node_ok "$port" && node_synced "$port" || return 1
    done
}

all_answer() {
    local port
    for port in "${PORTS[@]}"; do node_answers "$port" || return 1; done
}

# pid, tenths of a second -> 0 once the process is gone. Not wait_gone: until its parent
# reaps it, a dead daemon still takes signals, but its command line is empty at once.
wait_dead() {
    local pid=$1 tenths=$2 i
    for ((i = 0; i <= tenths; i++)); do
        [[ -z $(tr -d '\0' <"/proc/$pid/cmdline" 2>/dev/null) ]] && return 0
        ((i == tenths)) || sleep 0.1
    done
    return 1
}

stop_nodes() {
    local file port pid
    local -a pids=()
    # Every node folder, not only those of the current shape: `up` may change the shape.
    for file in "$DIR"/*/redis.pid; do
        port=$(basename "$(dirname "$file")")
        if pid=$(node_pid "$port"); then
            pids+=("$pid")
            # All told at once, so that they write their AOFs in parallel.
            kill -TERM "$pid" 2>/dev/null || true
        fi
        rm -f "$file"
    done
    ((${#pids[@]} > 0)) || { log "no node running ($DIR)"; return 0; }
    log "stopping ${#pids[@]} nodes (pids ${pids[*]})…"
    for pid in "${pids[@]}"; do
        wait_dead "$pid" 300 && continue
        log "redis-server pid $pid did not stop within 30 s; sending SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
        wait_dead "$pid" 50 || die "redis-server pid $pid outlived SIGKILL"
    done
    log "stopped ($DIR)"
}

# ---------------------------------------------------------------------------- create

all_known() {
    local port
    for port in "${PORTS[@]}"; do
        [[ $(cli "$port" cluster info | tr -d '\r' | sed -n 's/^cluster_known_nodes://p') == "${#PORTS[@]}" ]] || return 1
    done
}

# `redis-cli --cluster create` refuses fewer than three primaries; a cluster of one or two
# shards (a benchmark's baseline) is made with the commands it would have sent.
create_by_hand() {
    local per=$((SLOTS / PRIMARIES)) i lo hi primary_id
    for ((i = 0; i < PRIMARIES; i++)); do
        lo=$((i * per))
        hi=$((i == PRIMARIES - 1 ? SLOTS - 1 : lo + per - 1))
        cli "${PORTS[i]}" cluster addslotsrange "$lo" "$hi" >/dev/null
    done
    for ((i = 1; i < ${#PORTS[@]}; i++)); do
        cli "${PORTS[i]}" cluster meet "$HOST" "${PORTS[0]}" "$(bus_port "${PORTS[0]}")" >/dev/null
    done
    wait_ready "the nodes' handshake" "$(node_dir "${PORTS[0]}")/redis.log" all_known
    for ((i = PRIMARIES; i < ${#PORTS[@]}; i++)); do
        primary_id=$(cli "${PORTS[(i - PRIMARIES) % PRIMARIES]}" cluster myid)
        [[ $(cli "${PORTS[i]}" cluster replicate "$primary_id") == OK ]] ||
            die "node ${PORTS[i]} would not replicate ${PORTS[(i - PRIMARIES) % PRIMARIES]}"
    done
}

create() {
    local -a nodes=()
    local port
    for port in "${PORTS[@]}"; do nodes+=("$HOST:$port"); done
    log "creating a cluster of $PRIMARIES primaries with $REPLICAS replicas each on ports ${PORTS[0]}-${PORTS[-1]}…"
    if ((PRIMARIES >= 3)); then
        redis-cli --cluster create "${nodes[@]}" --cluster-replicas "$REPLICAS" --cluster-yes \
            >"$DIR/create.log" 2>&1 </dev/null || {
            tail -n 40 "$DIR/create.log" >&2
            die "redis-cli --cluster create failed (see $DIR/create.log)"
        }
    else
        create_by_hand
        echo "created by hand: $PRIMARIES primaries, $REPLICAS replicas each" >"$DIR/create.log"
    fi
}

fresh() {
    stop_nodes
    local port dir
    for dir in "$DIR"/*/; do
        [[ -d $dir && $(basename "$dir") =~ ^[0-9]+$ ]] && rm -rf "$dir"
    done
    for port in "${PORTS[@]}"; do
        port_open "$port" || port_open "$(bus_port "$port")" || continue
        die "port $port or $(bus_port "$port") is taken by a process this script did not start (cluster dir $DIR)"
    done
    for port in "${PORTS[@]}"; do node_launch "$port"; done
    wait_ready "Redis Cluster nodes" "$(node_dir "${PORTS[0]}")/redis.log" all_answer
    create
    printf '%s %s %s\n' "$BASE_PORT" "$PRIMARIES" "$REPLICAS" >"$DIR/shape"
    wait_ready "Redis Cluster" "$DIR/create.log" healthy
}

# ---------------------------------------------------------------------------- slots

# KEY, port of a running node -> the port of the primary that node says serves KEY's slot.
primary_seen_by() {
    local key=$1 port=$2 slot
    slot=$(cli "$port" cluster keyslot "$key") && [[ $slot =~ ^[0-9]+$ ]] || return 1
    # Lines: id host:port@bus[,hostname] flags primary-id ping pong epoch link slot-ranges...
    cli "$port" cluster nodes | awk -v slot="$slot" '
        $3 ~ /master/ && $3 !~ /fail/ {
            for (i = 9; i <= NF; i++) {
                if ($i ~ /^\[/) continue
                n = split($i, range, "-")
                if (slot >= range[1] && slot <= range[n]) {
                    split($2, address, /[:@,]/)
                    print address[2]
                    exit
                }
            }
        }' | grep .
}

first_running() {
    local port
    for port in "${PORTS[@]}"; do
        node_pid "$port" >/dev/null && node_answers "$port" && { echo "$port"; return 0; }
    done
    return 1
}

primary_of() { # KEY
    local port
    port=$(first_running) || die "no node of $DIR is running"
    primary_seen_by "$1" "$port" || die "no primary serves the slot of '$1' (cluster dir $DIR)"
}

FAILOVER_KEY=
FAILOVER_PRIMARY=
failed_over() {
    local port running=()
    for port in "${PORTS[@]}"; do
        node_pid "$port" >/dev/null && running+=("$port")
    done
    ((${#running[@]} > 0)) || return 1
    for port in "${running[@]}"; do
        [[ $(cli "$port" cluster info | tr -d '\r' | grep -x 'cluster_state:.*') == cluster_state:ok ]] || return 1
    done
    FAILOVER_PRIMARY=$(primary_seen_by "$FAILOVER_KEY" "${running[0]}") || return 1
    node_pid "$FAILOVER_PRIMARY" >/dev/null &&
        [[ $(cli "$FAILOVER_PRIMARY" role | head -n 1) == master ]]
}

# ---------------------------------------------------------------------------- commands

status() {
    local port pid role rc=0
    for port in "${PORTS[@]}"; do
        if pid=$(node_pid "$port"); then
            role=$(cli "$port" role | head -n 1) || role=unreachable
            echo "redis-cluster node $HOST:$port: $role (pid $pid)"
        else
            echo "redis-cluster node $HOST:$port: down"
        fi
    done
    if healthy; then
        echo "redis-cluster: ok, $PRIMARIES primaries with $REPLICAS replicas each, all $SLOTS slots served ($DIR)"
    else
        echo "redis-cluster: not healthy ($DIR)"
        rc=3
    fi
    return "$rc"
}

urls() {
    local -a urls=()
    local port
    for port in "${PORTS[@]}"; do urls+=("redis://$HOST:$port"); done
    (
        IFS=,
        echo "${urls[*]}"
    )
}

main() {
    (($# >= 2)) || usage
    local cmd=$1
    DIR=$2
    [[ $DIR == - ]] && DIR=$STATE/redis-cluster
    shift 2
    mkdir -p "$DIR"
    DIR=$(cd "$DIR" && pwd)
    exec 9>"$DIR/.lock"
    case $cmd in
    up)
        (($# == 3)) || usage
        local n
        for n in "$@"; do [[ $n =~ ^[0-9]+$ ]] || die "not a number: $n"; done
        (($2 >= 1 && $1 >= 1024 && $1 + 2 * $2 * (1 + $3) <= 65536)) ||
            die "want at least one primary and ports within 1024-65535"
        flock 9
        # The caller's redis-cli and redis-server are the tests' too.
        command -v redis-server >/dev/null 2>&1 || apt_install redis-server
        set_shape "$@"
        if [[ -s $DIR/shape && $(cat "$DIR/shape") == "$*" ]] && healthy; then
            log "already up on ports ${PORTS[0]}-${PORTS[-1]} ($DIR)"
            return 0
        fi
        fresh
        log "up: $PRIMARIES primaries, $REPLICAS replicas each, on ports ${PORTS[0]}-${PORTS[-1]} ($DIR)"
        ;;
    down)
        flock 9
        stop_nodes
        ;;
    start)
        flock 9
        load_shape
        local port
        for port in "${PORTS[@]}"; do
            node_pid "$port" >/dev/null || node_launch "$port"
        done
        wait_ready "Redis Cluster" "$(node_dir "${PORTS[0]}")/redis.log" healthy
        log "all ${#PORTS[@]} nodes up and the cluster ok ($DIR)"
        ;;
    status)
        load_shape
        status
        ;;
    urls)
        load_shape
        urls
        ;;
    primary-of | kill-primary-of | wait-failover)
        (($# == 1)) || usage
        load_shape
        FAILOVER_KEY=$1
        case $cmd in
        primary-of) primary_of "$1" ;;
        kill-primary-of)
            local port pid
            port=$(primary_of "$1")
            pid=$(node_pid "$port") || die "the primary on port $port was not started from $DIR"
            kill -KILL "$pid"
            wait_dead "$pid" 50 || die "redis-server pid $pid outlived SIGKILL"
            rm -f "$DIR/$port/redis.pid"
            log "killed the primary of '$1' on port $port (pid $pid)"
            echo "$port"
            ;;
        wait-failover)
            wait_ready "a failover" "$DIR/create.log" failed_over
            echo "$FAILOVER_PRIMARY"
            ;;
        esac
        ;;
    *) usage ;;
    esac
}

main "$@"
