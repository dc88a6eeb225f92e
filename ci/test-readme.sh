#!/usr/bin/env bash
# Runs the README's walkthroughs as written, against the real binaries, and checks what they
# show. Each one is the fenced block after a `<!-- ci/test-readme.sh: NAME -->` marker in
# README.md, so the README and this test cannot drift apart:
#   try-it      `fjord dev --auth`: a token that streams driver-3's records, a 403 and a 401
#   running-it  the Kafka and Redis of ci/services.sh, fjord-consumer and fjord-server, a
#               record produced with kcat and streamed with curl
# and the dev banner: its `curl` line, pasted, streams demo records with its token, its
# `fjord token` line mints one that opens, and its temporary key folder goes when it stops.
# The only change to a block is the HTTP port (8080 becomes a free one), so that it runs
# beside anything on 8080. Kafka and Redis are those of ci/services.sh (their ports are
# the README's); running-it runs `ci/services.sh up`, which is idempotent, and never stops
# them. Builds the binaries when they are missing or older than src/. Each block runs in a
# fresh folder and its own process group, killed on the way out, within a time limit.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD

step() { printf '\n==> %s\n' "$*"; }
fail() {
  printf 'test-readme: %s\n' "$*" >&2
  exit 1
}

ci/build-bins.sh
export PATH="$repo/target/debug:$PATH"

work=$(mktemp -d "${TMPDIR:-/tmp}/fjord-readme-XXXXXX")
groups=()
cleanup() {
  local g
  for g in "${groups[@]}"; do kill -TERM -- "-$g" 2>/dev/null || true; done
  [ -n "${FJORD_README_KEEP:-}" ] || rm -rf "$work"
}
trap cleanup EXIT

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# The fenced block after the marker NAME.
block() {
  awk -v marker="<!-- ci/test-readme.sh: $1 -->" '
    $0 == marker { armed = 1; next }
    armed && /^```/ { if (inside) exit; inside = 1; next }
    inside { print }
  ' README.md
}

# run NAME DIR PORT SECONDS: runs block NAME in DIR with port 8080 replaced by PORT, in a
# process group of its own; its output (stdout and stderr) goes to DIR/out.
run_block() {
  local name=$1 dir=$2 port=$3 seconds=$4 text
  text=$(block "$name")
  [ -n "$text" ] || fail "README.md has no block after <!-- ci/test-readme.sh: $name -->"
  printf '%s\n' "$text" | sed 's/^/    /'
  text=${text//8080/$port}
  (cd "$dir" && exec setsid timeout -k 5 "$seconds" bash -c "$text" >out 2>&1) &
  local pid=$!
  groups+=("$pid")
  local rc=0
  wait "$pid" || rc=$?
  [ "$rc" -ne 124 ] || fail "block $name did not finish within ${seconds}s; its output:
$(tail -n 40 "$dir/out")"
}

check() { # check WHAT FILE PATTERN...: every pattern (grep -E) is found in FILE
  local what=$1 file=$2
  shift 2
  local p
  for p in "$@"; do
    grep -Eq -- "$p" "$file" || fail "$what: no line matches $p; the output:
$(tail -n 60 "$file")"
  done
}

step "README: Access control, try-it (fjord dev --auth)"
mkdir -p "$work/try-it"
run_block try-it "$work/try-it" "$(free_port)" 90
out=$work/try-it/out
data=$(grep -c '^data: ' "$out" || true)
[ "$data" -ge 1 ] || fail "try-it: the token streamed no records; the output:
$(tail -n 60 "$out")"
others=$(grep '^data: ' "$out" | grep -vc '"key":"driver-3"' || true)
[ "$others" -eq 0 ] || fail "try-it: $others records of keys other than driver-3 came through"
check try-it "$out" '^HTTP/1\.1 403' '"code":"forbidden"' '^HTTP/1\.1 401' '"code":"token_missing"'
echo "try-it: $data records of driver-3, then 403 forbidden and 401 token_missing"

step "fjord dev --auth: the banner's curl line streams demo records"
mkdir -p "$work/banner"
port=$(free_port)
(cd "$work/banner" && exec setsid fjord dev --auth --port "$port" >banner 2>log) &
groups+=("$!")
for _ in $(seq 1 300); do
  grep -q '^  Stream ' "$work/banner/banner" 2>/dev/null && break
  sleep 0.1
done
line=$(sed -n 's/^  Stream  *//p' "$work/banner/banner")
[ -n "$line" ] || fail "fjord dev --auth printed no Stream line:
$(cat "$work/banner/banner" "$work/banner/log")"
case $line in
  'curl -N -H "Authorization: Bearer '*) ;;
  *) fail "the banner's Stream line carries no token: $line" ;;
esac
(cd "$work/banner" && timeout 20 bash -c "$line --max-time 4" >stream 2>/dev/null) || true
records=$(grep -c '^event: orders' "$work/banner/stream" || true)
[ "$records" -ge 1 ] || fail "the banner's curl streamed no orders: $(head -c 600 "$work/banner/stream")"
page=$(sed -n 's/^  Demo page  *//p' "$work/banner/banner")
case $page in
  "http://127.0.0.1:$port/#token="*) ;;
  *) fail "the banner's demo page address carries no token: $page" ;;
esac
mint=$(sed -n 's/^  More tokens  *//p' "$work/banner/banner")
token=$(bash -c "$mint") || fail "the banner's fjord token line failed: $mint"
status=$(curl -s -o /dev/null -w '%{http_code}' --max-time 3 -H "Authorization: Bearer $token" \
  "http://127.0.0.1:$port/v1/streams/drivers?key=driver-3" || true)
# A stream that opens runs until --max-time: curl then reports the 200 it got.
[ "$status" = 200 ] || fail "a token from the banner's fjord token line got $status"
key_dir=$(dirname "$(sed -n 's/.*--private-key \([^ ]*\).*/\1/p' <<<"$mint")")
dev_group=${groups[-1]}
kill -TERM -- "-$dev_group"
for _ in $(seq 1 100); do
  kill -0 -- "-$dev_group" 2>/dev/null || break
  sleep 0.1
done
[ ! -e "$key_dir" ] || fail "fjord dev --auth left its temporary key folder $key_dir behind"
echo "banner: its curl streamed $records orders; its fjord token line mints a token that opens drivers; $key_dir is gone once it stopped"

step "README: Running it (ci/services.sh, fjord-consumer, fjord-server, kcat)"
mkdir -p "$work/running-it"
ln -s "$repo/ci" "$work/running-it/ci"
since_ms=$(($(date +%s) * 1000))
run_block running-it "$work/running-it" "$(free_port)" 180
out=$work/running-it/out
check running-it "$out" 'manifest\.json is valid'
# The record just produced: earlier runs may have left others in the topic.
fresh=$(grep '^data: ' "$out" | grep -F '"key":"order-1"' | grep -F '"value":{"status":"placed","total_cents":1250}' |
  sed -n 's/.*"timestamp":\([0-9]*\).*/\1/p' | awk -v since="$since_ms" '$1 >= since' | wc -l)
[ "$fresh" -ge 1 ] || fail "running-it: the record produced with kcat did not arrive; the output:
$(tail -n 60 "$out")"
echo "running-it: the record produced with kcat came through fjord-consumer, Redis and fjord-server"
