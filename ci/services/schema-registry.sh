#!/usr/bin/env bash
# A real Confluent-compatible Schema Registry for the format tests: Apicurio Registry
# 2.4.2.Final (Confluent's own server is not on Maven Central), built once from Maven Central
# with Quarkus's augmentation step, serving the Confluent API at /apis/ccompat/v7, storage in
# memory; and a venv with confluent-kafka's serializers, the producers the tests use.
#
#   ci/services/schema-registry.sh up      build and install what is missing, start the registry
#                                          if it is not running, wait until it answers, write
#                                          $FJORD_CI_STATE/schema-registry-env (idempotent)
#   ci/services/schema-registry.sh down    stop it, remove the env file (idempotent)
#   ci/services/schema-registry.sh status  exit 0 only if it answers
#   ci/services/schema-registry.sh build   only the registry build (cached)
#   ci/services/schema-registry.sh venv    only the producers' venv (cached); print its python
#
# Environment (defaults):
#   FJORD_CI_STATE=/tmp/fjord-ci               state dir; the registry's build, distribution,
#                                              log and pid live in its schema-registry/
#   FJORD_CI_SCHEMA_REGISTRY_PORT=18081        HTTP port on 127.0.0.1
#   FJORD_CI_TIMEOUT=90                        readiness timeout, seconds
# Maven's jars are cached in ~/.m2 as the Kafka broker's are.
set -euo pipefail

STATE=${FJORD_CI_STATE:-/tmp/fjord-ci}
PORT=${FJORD_CI_SCHEMA_REGISTRY_PORT:-18081}
TIMEOUT=${FJORD_CI_TIMEOUT:-90}
HOST=127.0.0.1

# Apicurio's 2.4.2.Final is the newest whose whole dependency tree Maven Central serves;
# its Quarkus is the <quarkus.version> of io.apicurio:apicurio-registry:2.4.2.Final.
APICURIO_VERSION=2.4.2.Final
QUARKUS_VERSION=2.16.4.Final
SR_HOME="$STATE/schema-registry"
BUILD_DIR="$SR_HOME/build-$APICURIO_VERSION"
APP_DIR="$SR_HOME/app-$APICURIO_VERSION"
RUNNER_JAR="$APP_DIR/fjord-schema-registry-1-runner.jar"
SR_PID="$SR_HOME/registry.pid"
SR_LOG="$SR_HOME/registry.log"
ENV_FILE="$STATE/schema-registry-env"

# Pinned so that a cached venv and a fresh one produce the same bytes.
PIP_PACKAGES=("confluent-kafka[avro,protobuf,json]==2.16.2")
VENV="$STATE/schema-registry-venv"
VENV_STAMP="$VENV/.fjord-packages"

log() { printf '[schema-registry] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }
# shellcheck source=ci/services/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

base_url() { printf 'http://%s:%s/apis/ccompat/v7' "$HOST" "$PORT"; }

# ---------------------------------------------------------------------------- build

# The registry's classes come as a dependency jar (apicurio-registry-app); this project makes
# it the application and lets Quarkus build the runnable jar. What needs working around:
# - everit-json-schema is published under its JitPack coordinates only; the same classes are on
#   Maven Central as com.github.erosb:everit-json-schema;
# - config-index(-deployment) 0.1.18.Final is not served; 0.1.10.Final has the same recorder;
# - the app jar has no Jandex index (named in application.properties) and its web.xml is only
#   read from the application root (unpacked there);
# - the parent pom names repositories other than Maven Central: a mirror sends them nowhere.
write_build_project() {
    mkdir -p "$BUILD_DIR/src/main/resources"
    cat >"$BUILD_DIR/settings.xml" <<'EOF'
<settings xmlns="http://maven.apache.org/SETTINGS/1.0.0">
  <mirrors><mirror><id>central-only</id><mirrorOf>*,!central</mirrorOf><url>file:///nonexistent</url></mirror></mirrors>
</settings>
EOF
    cat >"$BUILD_DIR/src/main/resources/application.properties" <<'EOF'
quarkus.index-dependency.registry.group-id=io.apicurio
quarkus.index-dependency.registry.artifact-id=apicurio-registry-app
EOF
    cat >"$BUILD_DIR/pom.xml" <<EOF
<?xml version="1.0" encoding="UTF-8"?>
<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>fjord.ci</groupId>
  <artifactId>fjord-schema-registry</artifactId>
  <version>1</version>
  <properties>
    <maven.compiler.release>17</maven.compiler.release>
    <project.build.sourceEncoding>UTF-8</project.build.sourceEncoding>
  </properties>
  <dependencyManagement>
    <dependencies>
      <dependency>
        <groupId>io.apicurio</groupId><artifactId>apicurio-registry</artifactId>
        <version>$APICURIO_VERSION</version><type>pom</type><scope>import</scope>
      </dependency>
      <dependency>
        <groupId>io.apicurio</groupId><artifactId>apicurio-common-app-components-config-index</artifactId>
        <version>0.1.10.Final</version>
      </dependency>
      <dependency>
        <groupId>io.apicurio</groupId><artifactId>apicurio-common-app-components-config-index-deployment</artifactId>
        <version>0.1.10.Final</version>
      </dependency>
    </dependencies>
  </dependencyManagement>
  <dependencies>
    <dependency>
      <groupId>io.apicurio</groupId><artifactId>apicurio-registry-app</artifactId>
      <version>$APICURIO_VERSION</version>
      <exclusions>
        <exclusion><groupId>com.github.everit-org.json-schema</groupId><artifactId>org.everit.json.schema</artifactId></exclusion>
      </exclusions>
    </dependency>
    <dependency>
      <groupId>com.github.erosb</groupId><artifactId>everit-json-schema</artifactId><version>1.14.2</version>
    </dependency>
  </dependencies>
  <build>
    <plugins>
      <plugin>
        <groupId>org.apache.maven.plugins</groupId><artifactId>maven-dependency-plugin</artifactId>
        <version>3.6.1</version>
        <executions>
          <execution>
            <id>web-xml</id><phase>generate-resources</phase><goals><goal>unpack</goal></goals>
            <configuration>
              <artifactItems>
                <artifactItem>
                  <groupId>io.apicurio</groupId><artifactId>apicurio-registry-app</artifactId>
                  <version>$APICURIO_VERSION</version><includes>META-INF/web.xml</includes>
                  <outputDirectory>\${project.build.outputDirectory}</outputDirectory>
                </artifactItem>
              </artifactItems>
            </configuration>
          </execution>
        </executions>
      </plugin>
      <plugin>
        <groupId>io.quarkus</groupId><artifactId>quarkus-maven-plugin</artifactId>
        <version>$QUARKUS_VERSION</version>
        <executions><execution><goals><goal>build</goal></goals></execution></executions>
      </plugin>
    </plugins>
  </build>
</project>
EOF
}

build() {
    [[ -f $RUNNER_JAR && -d $APP_DIR/lib ]] && return 0
    command -v mvn >/dev/null 2>&1 && command -v java >/dev/null 2>&1 ||
        apt_install maven openjdk-17-jdk-headless
    mkdir -p "$SR_HOME"
    # One build at a time (parallel test jobs may call `up`); it may be done once we hold it.
    exec 8>"$SR_HOME/.build.lock"
    flock 8
    [[ -f $RUNNER_JAR && -d $APP_DIR/lib ]] && return 0
    log "building Apicurio Registry $APICURIO_VERSION with mvn (first time only; jars cached in ~/.m2)…"
    rm -rf "$BUILD_DIR"
    write_build_project
    local t0=$SECONDS
    if ! (cd "$BUILD_DIR" && mvn -B -ntp -s settings.xml package -DskipTests >build.log 2>&1); then
        tail -n 40 "$BUILD_DIR/build.log" >&2
        die "registry build failed (see $BUILD_DIR/build.log)"
    fi
    # The registry's %prod profile asks for a legacy jar: the runner plus target/lib.
    rm -rf "$APP_DIR.tmp" "$APP_DIR"
    mkdir -p "$APP_DIR.tmp"
    cp "$BUILD_DIR/target/fjord-schema-registry-1-runner.jar" "$APP_DIR.tmp/"
    cp -r "$BUILD_DIR/target/lib" "$APP_DIR.tmp/lib"
    mv "$APP_DIR.tmp" "$APP_DIR"
    log "registry built in $((SECONDS - t0)) s"
    exec 8>&-
}

# ---------------------------------------------------------------------------- venv

venv_up() {
    mkdir -p "$STATE"
    exec 7>"$STATE/.schema-registry-venv.lock"
    flock 7
    if ! [[ -x $VENV/bin/python && -f $VENV_STAMP && $(cat "$VENV_STAMP") == "${PIP_PACKAGES[*]}" ]]; then
        [[ -x $VENV/bin/pip ]] || python3 -m venv "$VENV" 2>/dev/null ||
            { apt_install python3 python3-venv && python3 -m venv "$VENV"; }
        log "installing ${PIP_PACKAGES[*]} into $VENV…"
        if ! "$VENV/bin/pip" install -q --disable-pip-version-check "${PIP_PACKAGES[@]}" \
            >"$STATE/schema-registry-pip.log" 2>&1; then
            tail -n 40 "$STATE/schema-registry-pip.log" >&2
            die "pip install failed (see $STATE/schema-registry-pip.log)"
        fi
        printf '%s' "${PIP_PACKAGES[*]}" >"$VENV_STAMP"
    fi
    exec 7>&-
}

# ---------------------------------------------------------------------------- registry

registry_ready() {
    kill -0 "$(cat "$SR_PID" 2>/dev/null)" 2>/dev/null || {
        log "the registry exited; last lines of $SR_LOG:"
        tail -n 40 "$SR_LOG" >&2 || true
        exit 1
    }
    curl -fs -o /dev/null --max-time 2 "$(base_url)/subjects"
}

registry_up() {
    build
    if live_pid "$SR_PID" fjord-schema-registry >/dev/null; then
        wait_ready "schema registry" "$SR_LOG" registry_ready
        log "registry already up at $(base_url)"
        return 0
    fi
    rm -f "$SR_PID"
    port_open "$PORT" && die "port $PORT is taken by a process this script did not start"
    : >"$SR_LOG"
    log "starting the registry…"
    # A small serial-GC heap: the registry holds a handful of test schemas.
    setsid java -Xmx256m -XX:+UseSerialGC -XX:TieredStopAtLevel=1 \
        -Dquarkus.http.host="$HOST" -Dquarkus.http.port="$PORT" -Dquarkus.log.level=WARN \
        -jar "$RUNNER_JAR" >>"$SR_LOG" 2>&1 </dev/null 6>&- 7>&- 8>&- 9>&- &
    printf '%s\n' "$!" >"$SR_PID"
    wait_ready "schema registry" "$SR_LOG" registry_ready
    log "registry up at $(base_url) (pid $(cat "$SR_PID"))"
}

write_env() {
    cat >"$ENV_FILE.tmp" <<EOF
# Written by ci/services/schema-registry.sh; source it before the schema registry tests.
export FJORD_TEST_SCHEMA_REGISTRY_URL='$(base_url)'
export FJORD_TEST_SCHEMA_REGISTRY_PYTHON='$VENV/bin/python'
EOF
    mv "$ENV_FILE.tmp" "$ENV_FILE"
    printf '%s\n' "$ENV_FILE"
}

main() {
    mkdir -p "$STATE"
    case ${1:-} in
    up)
        exec 6>"$STATE/.schema-registry.lock"
        flock 6
        venv_up
        registry_up
        write_env
        ;;
    down)
        stop_pid "schema registry" "$SR_PID" fjord-schema-registry
        rm -f "$ENV_FILE"
        ;;
    status)
        live_pid "$SR_PID" fjord-schema-registry >/dev/null && registry_ready && base_url && echo
        ;;
    build)
        build
        ;;
    venv)
        venv_up
        printf '%s\n' "$VENV/bin/python"
        ;;
    *)
        sed -n '2,20p' "$0" >&2
        exit 2
        ;;
    esac
}

main "$@"
