#!/usr/bin/env bash
# Real services for Fjord's integration tests: a one-node KRaft Kafka (jars from Maven
# Central via mvn), Redis (Debian redis-server), a Redis Cluster of three primaries and
# three replicas (ci/redis-cluster.sh), and a Schema Registry with the producers of its
# tests (ci/services/schema-registry.sh), on non-default loopback ports.
#
#   ci/services.sh up             install what is missing, start what is not running, wait
#                                 until ready, write $FJORD_CI_STATE/env (idempotent)
#   ci/services.sh down           stop them all (SIGTERM, then SIGKILL), remove the env file;
#                                 idempotent
#   ci/services.sh restart-redis  stop and start Redis, keeping its data (AOF)
#   ci/services.sh restart-kafka  stop and start Kafka, keeping its log dirs
#   ci/services.sh stop-redis|start-redis|stop-kafka|start-kafka|stop-redis-cluster|start-redis-cluster
#                                 stop one service, or start it again keeping its data (the
#                                 cluster's start also brings back a node a test killed)
#   ci/services.sh status         show what runs; exit 0 only if all are ready
#   ci/services.sh kafka-class CLASS [ARGS...]
#                                 run a Kafka tool class (e.g. org.apache.kafka.tools.TopicCommand)
#                                 with the broker's classpath
#
# `up` on a service that is not running starts it from a clean data dir; the restart-*
# commands keep the data. Tests source $FJORD_CI_STATE/env, which also names the ports, so
# that the tests' own calls of this script reach the same services.
#
# Environment (defaults):
#   FJORD_CI_STATE=/tmp/fjord-ci       state dir: data, logs, pid files, env
#   FJORD_CI_KAFKA_PORT=19092          PLAINTEXT listener, no auth
#   FJORD_CI_KAFKA_SASL_PORT=19093     SASL_PLAINTEXT listener, SCRAM-SHA-256 and -512
#   FJORD_CI_KAFKA_CONTROLLER_PORT=19094
#   FJORD_CI_KAFKA_HEAP=768m           broker -Xmx
#   FJORD_CI_REDIS_PORT=16379
#   FJORD_CI_REDIS_CLUSTER_PORT=17000  first node of the cluster; its six nodes take 17000-17005,
#                                      their cluster bus ports 17006-17011
#   FJORD_CI_SCRAM_USER=fjord-test, FJORD_CI_SCRAM_PASSWORD=fjord-test-secret
#   FJORD_CI_TIMEOUT=90                readiness timeout per service, seconds
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
SERVICES_DIR="$SCRIPT_DIR/services"

STATE=${FJORD_CI_STATE:-/tmp/fjord-ci}
KAFKA_PORT=${FJORD_CI_KAFKA_PORT:-19092}
KAFKA_SASL_PORT=${FJORD_CI_KAFKA_SASL_PORT:-19093}
KAFKA_CONTROLLER_PORT=${FJORD_CI_KAFKA_CONTROLLER_PORT:-19094}
KAFKA_HEAP=${FJORD_CI_KAFKA_HEAP:-768m}
REDIS_PORT=${FJORD_CI_REDIS_PORT:-16379}
REDIS_CLUSTER_PORT=${FJORD_CI_REDIS_CLUSTER_PORT:-17000}
SCRAM_USER=${FJORD_CI_SCRAM_USER:-fjord-test}
SCRAM_PASSWORD=${FJORD_CI_SCRAM_PASSWORD:-fjord-test-secret}
TIMEOUT=${FJORD_CI_TIMEOUT:-90}
HOST=127.0.0.1

KAFKA_DIR="$STATE/kafka"
KAFKA_DATA="$KAFKA_DIR/data"
KAFKA_PID="$KAFKA_DIR/kafka.pid"
KAFKA_LOG="$KAFKA_DIR/kafka.log"
KAFKA_PROPS="$KAFKA_DIR/server.properties"
KAFKA_CLIENT_PROPS="$KAFKA_DIR/admin.properties"
KAFKA_CP_FILE="$STATE/kafka.classpath"
KAFKA_POM="$SERVICES_DIR/kafka-pom.xml"

REDIS_DIR="$STATE/redis"
REDIS_PID="$REDIS_DIR/redis.pid"
REDIS_LOG="$REDIS_DIR/redis.log"

REDIS_CLUSTER_DIR="$STATE/redis-cluster"
REDIS_CLUSTER_PRIMARIES=3
REDIS_CLUSTER_REPLICAS=1

# What the tests run; the build's own dependencies are ci/install-build-deps.sh's list.
APT_PACKAGES=(redis-server openssl kcat)

log() { printf '[services] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }
# shellcheck source=ci/services/common.sh
source "$SERVICES_DIR/common.sh"

# ---------------------------------------------------------------------------- helpers

# ---------------------------------------------------------------------------- installs

install_packages() {
    "$SCRIPT_DIR/install-build-deps.sh"
    local packages=("${APT_PACKAGES[@]}")
    command -v java >/dev/null 2>&1 || packages+=(openjdk-17-jdk-headless)
    command -v mvn >/dev/null 2>&1 || packages+=(maven)
    apt_install "${packages[@]}"
}

# Resolves the broker classpath with mvn (jars cached in ~/.m2); reuses the cached
# classpath file while it is newer than the pom and every jar in it exists.
kafka_classpath() {
    if [[ -s $KAFKA_CP_FILE && $KAFKA_CP_FILE -nt $KAFKA_POM ]]; then
        local ok=1 jar
        local -a jars
        IFS=: read -r -a jars <"$KAFKA_CP_FILE" || true # no trailing newline: read returns 1
        for jar in "${jars[@]}"; do
            [[ -f $jar ]] || { ok=0; break; }
        done
        ((ok)) && return 0
    fi
    log "resolving Kafka jars with mvn (cached in ~/.m2)…"
    mkdir -p "$STATE"
    local tmp="$KAFKA_CP_FILE.tmp"
    if ! mvn -B -q -f "$KAFKA_POM" dependency:build-classpath -Dmdep.outputFile="$tmp" >"$STATE/mvn.log" 2>&1; then
        tail -n 40 "$STATE/mvn.log" >&2
        die "mvn could not resolve the Kafka classpath (see $STATE/mvn.log)"
    fi
    mv "$tmp" "$KAFKA_CP_FILE"
}

kafka_java() { # run a Kafka tool class with a small, fast-starting JVM
    java -Xmx256m -XX:+UseSerialGC -XX:TieredStopAtLevel=1 \
        -Dlog4j2.configurationFile="$SERVICES_DIR/log4j2-tools.properties" \
        -cp "$(cat "$KAFKA_CP_FILE")" "$@"
}

kafka_version() {
    tr ':' '\n' <"$KAFKA_CP_FILE" | sed -n 's#.*/kafka_2\.13-\(.*\)\.jar$#\1#p' | head -n 1
}

# ---------------------------------------------------------------------------- kafka

write_kafka_config() {
    mkdir -p "$KAFKA_DIR"
    cat >"$KAFKA_PROPS" <<EOF
# Written by ci/services.sh. One node, combined broker + controller.
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@$HOST:$KAFKA_CONTROLLER_PORT
listeners=PLAINTEXT://$HOST:$KAFKA_PORT,SASL_PLAINTEXT://$HOST:$KAFKA_SASL_PORT,CONTROLLER://$HOST:$KAFKA_CONTROLLER_PORT
advertised.listeners=PLAINTEXT://$HOST:$KAFKA_PORT,SASL_PLAINTEXT://$HOST:$KAFKA_SASL_PORT
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,SASL_PLAINTEXT:SASL_PLAINTEXT,CONTROLLER:PLAINTEXT
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
sasl.enabled.mechanisms=SCRAM-SHA-256,SCRAM-SHA-512
listener.name.sasl_plaintext.scram-sha-256.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required;
listener.name.sasl_plaintext.scram-sha-512.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required;
log.dirs=$KAFKA_DATA
num.partitions=1
default.replication.factor=1
min.insync.replicas=1
offsets.topic.replication.factor=1
offsets.topic.num.partitions=1
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
group.initial.rebalance.delay.ms=0
auto.create.topics.enable=false
delete.topic.enable=true
log.retention.hours=24
log.segment.bytes=67108864
EOF
    cat >"$KAFKA_CLIENT_PROPS" <<EOF
request.timeout.ms=3000
default.api.timeout.ms=5000
EOF
}

kafka_format() {
    local cluster_id
    # A Kafka Uuid: 16 random bytes, base64url without padding.
    cluster_id=$(head -c 16 /dev/urandom | base64 | tr '+/' '-_' | tr -d '=')
    log "formatting Kafka storage (cluster id $cluster_id)…"
    kafka_java kafka.tools.StorageTool format \
        --config "$KAFKA_PROPS" --cluster-id "$cluster_id" --ignore-formatted \
        --add-scram "SCRAM-SHA-256=[name=$SCRAM_USER,password=$SCRAM_PASSWORD]" \
        --add-scram "SCRAM-SHA-512=[name=$SCRAM_USER,password=$SCRAM_PASSWORD]" \
        >"$KAFKA_DIR/format.log" 2>&1 || {
        cat "$KAFKA_DIR/format.log" >&2
        die "kafka storage format failed"
    }
}

kafka_launch() {
    local pid
    log "starting Kafka $(kafka_version)…"
    # setsid: own session, so the broker outlives the calling shell and its job control.
    setsid java -Xms256m -Xmx"$KAFKA_HEAP" -XX:+UseG1GC -XX:MaxGCPauseMillis=20 \
        -XX:InitiatingHeapOccupancyPercent=35 -XX:+ExplicitGCInvokesConcurrent \
        -Djava.awt.headless=true \
        -Dlog4j2.configurationFile="$SERVICES_DIR/log4j2-broker.properties" \
        -Dkafka.logs.dir="$KAFKA_DIR" \
        -cp "$(cat "$KAFKA_CP_FILE")" kafka.Kafka "$KAFKA_PROPS" \
        >>"$KAFKA_LOG" 2>&1 </dev/null 9>&- &
    pid=$!
    printf '%s\n' "$pid" >"$KAFKA_PID"
}

kafka_ready() {
    # Only "is it alive" here: right after the launch the child may not have exec'd java yet.
    kill -0 "$(cat "$KAFKA_PID" 2>/dev/null)" 2>/dev/null || {
        log "Kafka exited; last lines of $KAFKA_LOG:"
        tail -n 60 "$KAFKA_LOG" >&2 || true
        exit 1
    }
    port_open "$KAFKA_PORT" && port_open "$KAFKA_SASL_PORT" || return 1
    # A metadata round trip through the admin client.
    timeout 30 java -Xmx128m -XX:+UseSerialGC -XX:TieredStopAtLevel=1 -Xshare:auto \
        -Dlog4j2.configurationFile="$SERVICES_DIR/log4j2-tools.properties" \
        -cp "$(cat "$KAFKA_CP_FILE")" org.apache.kafka.tools.TopicCommand \
        --bootstrap-server "$HOST:$KAFKA_PORT" --command-config "$KAFKA_CLIENT_PROPS" --list \
        >/dev/null 2>&1
}

kafka_start() { # $1 = keep|fresh
    write_kafka_config
    if [[ $1 == fresh ]]; then
        rm -rf "$KAFKA_DATA"
        : >"$KAFKA_LOG"
    fi
    [[ -f $KAFKA_DATA/meta.properties ]] || kafka_format
    kafka_launch
    wait_ready Kafka "$KAFKA_LOG" kafka_ready
    log "kafka up on $HOST:$KAFKA_PORT (sasl $HOST:$KAFKA_SASL_PORT, controller $HOST:$KAFKA_CONTROLLER_PORT, pid $(cat "$KAFKA_PID"))"
}

kafka_up() {
    kafka_classpath
    if live_pid "$KAFKA_PID" kafka.Kafka >/dev/null; then
        wait_ready Kafka "$KAFKA_LOG" kafka_ready
        log "kafka already up on $HOST:$KAFKA_PORT (sasl $HOST:$KAFKA_SASL_PORT)"
        return 0
    fi
    rm -f "$KAFKA_PID"
    local p
    for p in "$KAFKA_PORT" "$KAFKA_SASL_PORT" "$KAFKA_CONTROLLER_PORT"; do
        port_open "$p" && die "port $p is taken by a process this script did not start (state dir $STATE)"
    done
    kafka_start fresh
}

kafka_down() { stop_pid Kafka "$KAFKA_PID" kafka.Kafka; }

kafka_restart() {
    kafka_classpath
    kafka_down
    kafka_start keep
}

# ---------------------------------------------------------------------------- redis

redis_launch() {
    mkdir -p "$REDIS_DIR"
    log "starting redis-server…"
    redis-server --bind "$HOST" --port "$REDIS_PORT" --daemonize yes \
        --dir "$REDIS_DIR" --pidfile "$REDIS_PID" --logfile "$REDIS_LOG" \
        --appendonly yes --appendfsync everysec --save '' \
        --protected-mode no --databases 16 >/dev/null 9>&-
}

redis_ready() {
    [[ $(redis-cli -h "$HOST" -p "$REDIS_PORT" ping 2>/dev/null) == PONG ]]
}

redis_start() { # $1 = keep|fresh
    if [[ $1 == fresh ]]; then
        rm -rf "$REDIS_DIR"
    fi
    redis_launch
    wait_ready Redis "$REDIS_LOG" redis_ready
    log "redis up on $HOST:$REDIS_PORT (pid $(cat "$REDIS_PID"))"
}

redis_up() {
    if live_pid "$REDIS_PID" redis-server >/dev/null; then
        wait_ready Redis "$REDIS_LOG" redis_ready
        log "redis already up on $HOST:$REDIS_PORT"
        return 0
    fi
    rm -f "$REDIS_PID"
    port_open "$REDIS_PORT" && die "port $REDIS_PORT is taken by a process this script did not start (state dir $STATE)"
    redis_start fresh
}

redis_down() { stop_pid Redis "$REDIS_PID" redis-server; }

redis_restart() {
    redis_down
    redis_start keep
}

# ---------------------------------------------------------------------------- redis cluster

redis_cluster() { "$SCRIPT_DIR/redis-cluster.sh" "$1" "$REDIS_CLUSTER_DIR" "${@:2}"; }

redis_cluster_up() {
    redis_cluster up "$REDIS_CLUSTER_PORT" "$REDIS_CLUSTER_PRIMARIES" "$REDIS_CLUSTER_REPLICAS"
}

# ---------------------------------------------------------------------------- env, status

write_env() {
    local tmp="$STATE/env.tmp"
    cat >"$tmp" <<EOF
# Written by ci/services.sh; source it before running the integration tests.
export FJORD_CI_STATE='$STATE'
export FJORD_CI_KAFKA_PORT='$KAFKA_PORT'
export FJORD_CI_KAFKA_SASL_PORT='$KAFKA_SASL_PORT'
export FJORD_CI_KAFKA_CONTROLLER_PORT='$KAFKA_CONTROLLER_PORT'
export FJORD_CI_REDIS_PORT='$REDIS_PORT'
export FJORD_CI_REDIS_CLUSTER_PORT='$REDIS_CLUSTER_PORT'
export FJORD_TEST_KAFKA_BROKERS='$HOST:$KAFKA_PORT'
export FJORD_TEST_KAFKA_SASL_BROKERS='$HOST:$KAFKA_SASL_PORT'
export FJORD_TEST_SCRAM_USER='$SCRAM_USER'
export FJORD_TEST_SCRAM_PASSWORD='$SCRAM_PASSWORD'
export FJORD_TEST_REDIS_URL='redis://$HOST:$REDIS_PORT'
export FJORD_TEST_REDIS_CLUSTER_URLS='$(redis_cluster urls)'
EOF
    mv "$tmp" "$STATE/env"
    log "env written to $STATE/env"
    printf '%s\n' "$STATE/env"
}

status() {
    local rc=0 pid
    if pid=$(live_pid "$KAFKA_PID" kafka.Kafka) && [[ -s $KAFKA_CP_FILE ]] && kafka_ready; then
        echo "kafka: up (pid $pid) on $HOST:$KAFKA_PORT, sasl $HOST:$KAFKA_SASL_PORT, version $(kafka_version)"
    elif [[ -n ${pid:-} ]]; then
        echo "kafka: starting or unhealthy (pid $pid); log $KAFKA_LOG"
        rc=3
    else
        echo "kafka: down"
        rc=3
    fi
    pid=
    if pid=$(live_pid "$REDIS_PID" redis-server) && redis_ready; then
        echo "redis: up (pid $pid) on $HOST:$REDIS_PORT"
    elif [[ -n ${pid:-} ]]; then
        echo "redis: starting or unhealthy (pid $pid); log $REDIS_LOG"
        rc=3
    else
        echo "redis: down"
        rc=3
    fi
    if [[ -s $REDIS_CLUSTER_DIR/shape ]]; then
        redis_cluster status || rc=3
    else
        echo "redis-cluster: down"
        rc=3
    fi
    [[ -f $STATE/env ]] && echo "env: $STATE/env"
    return "$rc"
}

# ---------------------------------------------------------------------------- main

main() {
    (($# >= 1)) || usage
    local cmd=$1
    shift
    mkdir -p "$STATE"
    # One invocation at a time per state dir (parallel test jobs may call `up`).
    exec 9>"$STATE/.lock"
    flock 9
    case $cmd in
    up)
        install_packages
        redis_up
        redis_cluster_up
        kafka_up
        "$SERVICES_DIR/schema-registry.sh" up >/dev/null
        write_env
        ;;
    down)
        "$SERVICES_DIR/schema-registry.sh" down
        kafka_down
        redis_down
        redis_cluster down
        rm -f "$STATE/env"
        ;;
    restart-redis)
        redis_restart
        ;;
    restart-kafka)
        kafka_restart
        ;;
    stop-redis)
        redis_down
        ;;
    start-redis)
        redis_start keep
        ;;
    stop-redis-cluster)
        redis_cluster down
        ;;
    start-redis-cluster)
        redis_cluster start
        ;;
    stop-kafka)
        kafka_down
        ;;
    start-kafka)
        kafka_classpath
        kafka_start keep
        ;;
    status)
        flock -u 9
        status
        ;;
    kafka-class)
        (($# >= 1)) || usage
        flock -u 9
        kafka_classpath
        kafka_java "$@"
        ;;
    -h | --help | help) usage ;;
    *)
        log "unknown command: $cmd"
        usage
        ;;
    esac
}

main "$@"
