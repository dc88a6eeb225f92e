#!/usr/bin/env bash
# Runs the documentation's walkthroughs as written, in the order a reader meets them, against
# the real binaries, and checks what they show. A walkthrough is the fenced block after a
# `<!-- ci/test-readme.sh: NAME -->` marker in README.md or a page of docs/ (README.md
# first, then the pages in the order README.md links them), so the documentation and this
# test cannot drift apart:
#   running-it  (docs/operations.md) the Kafka and Redis of ci/services.sh, fjord-consumer
#               and fjord-server, a record produced with kcat and streamed with curl
#   try-it      (docs/access-control.md) `fjord dev --auth`: a token that streams driver-3's
#               records, a 403 and a 401
# Before them it runs the README's first command, `cargo run --bin fjord -- dev`, checks that
# it streams demo records, and leaves it running on its port while the walkthroughs run, as
# a reader who keeps it open would: a walkthrough that needs that port fails. Each
# walkthrough's ports must be free before it starts, and it must have stopped everything it
# started when it ends (its process group is empty). Last, the dev banner: its `curl` line,
# pasted, streams demo records with its token, its `fjord token` line mints one that opens,
# and its temporary key folder goes when it stops.
# The only change to a block is its HTTP ports (8080, 8081 and 8082 each become a free port,
# the same one in every block), so that it runs beside anything on those. Kafka and Redis are
# those of ci/services.sh (their ports are the documentation's); running-it runs
# `ci/services.sh up`, which is idempotent, and never stops them. Builds the binaries when
# they are missing or older than src/. Each block runs in a fresh folder and its own process
# group, killed on the way out, within a time limit.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD

step() { printf '\n==> %s\n' "$*"; }
fail() {
  printf 'test-readme: %s\n' "$*" >&2
  exit 1
}

ci/build-bins.sh

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
port_is_free() {
  python3 -c 'import socket, sys
s = socket.socket()
try:
    s.bind(("127.0.0.1", int(sys.argv[1])))
except OSError:
    sys.exit(1)' "$1"
}
# The documentation's ports, and the free ones that stand for them in this run.
declare -A ports
for p in 8080 8081 8082; do ports[$p]=$(free_port); done

# Pages in the order a reader meets them: README.md, then docs/ as README.md links them.
pages=(README.md)
while IFS= read -r page; do
  pages+=("$page")
done < <(grep -o '](docs/[a-z-]*\.md' README.md | cut -c3- | awk '!seen[$0]++')
for page in docs/*.md; do
  [[ " ${pages[*]} " == *" $page "* ]] || fail "$page is not linked from README.md"
done

# "PAGE NAME" for every marker, in reading order.
walkthroughs=()
while IFS= read -r found; do
  walkthroughs+=("$found")
done < <(for page in "${pages[@]}"; do
  sed -n 's/^<!-- ci\/test-readme\.sh: \([a-z-]*\) -->$/\1/p' "$page" | sed "s|^|$page |"
done)

# The fenced block after the marker NAME in PAGE (or after MARKER, when given).
block() {
  awk -v marker="${3:-<!-- ci/test-readme.sh: $2 -->}" '
    $0 == marker { armed = 1; next }
    armed && /^```/ { if (inside) exit; inside = 1; next }
    inside { print }
  ' "$1"
}

# group_stopped GROUP SECONDS: whether no process of GROUP is left within SECONDS.
group_stopped() {
  local i
  for i in $(seq 1 $(($2 * 10))); do
    kill -0 -- "-$1" 2>/dev/null || return 0
    sleep 0.1
  done
  return 1
}

# run_block PAGE NAME DIR SECONDS: runs the block with the documentation's ports replaced, in
# DIR, in a process group of its own, with the binaries on the PATH; its output (stdout and
# stderr) goes to DIR/out. Fails when one of its ports is taken before it starts, when it
# does not finish within SECONDS, or when it leaves a process running.
run_block() {
  local page=$1 name=$2 dir=$3 seconds=$4 text p
  text=$(block "$page" "$name")
  [ -n "$text" ] || fail "$page has no block after <!-- ci/test-readme.sh: $name -->"
  printf '%s\n' "$text" | sed 's/^/    /'
  for p in "${!ports[@]}"; do
    if [[ $text == *"$p"* ]]; then
      port_is_free "${ports[$p]}" || fail "$name: port ${ports[$p]} ($p in $page) is taken before it starts"
      text=${text//$p/${ports[$p]}}
    fi
  done
  (cd "$dir" && PATH="$repo/target/debug:$PATH" exec setsid timeout -k 5 "$seconds" bash -c "$text" >out 2>&1) &
  local pid=$!
  groups+=("$pid")
  local rc=0
  wait "$pid" || rc=$?
  [ "$rc" -ne 124 ] || fail "$name did not finish within ${seconds}s; its output:
$(tail -n 40 "$dir/out")"
  group_stopped "$pid" 30 || fail "$name left processes running:
$(pgrep -a -g "$pid" || true)"
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

check_running_it() {
  local out=$1/out
  check running-it "$out" 'manifest\.json is valid' "fjord-server listening.*:${ports[8082]}"
  # The record just produced: earlier runs may have left others in the topic.
  local fresh
  fresh=$(grep '^data: ' "$out" | grep -F '"key":"order-1"' | grep -F '"value":{"status":"placed","total_cents":1250}' |
    sed -n 's/.*"timestamp":\([0-9]*\).*/\1/p' | awk -v since="$2" '$1 >= since' | wc -l)
  [ "$fresh" -ge 1 ] || fail "running-it: the record produced with kcat did not arrive; the output:
$(tail -n 60 "$out")"
  echo "running-it: the record produced with kcat came through fjord-consumer, Redis and fjord-server"
}

check_try_it() {
  local out=$1/out data others
  # Its own fjord dev answered, with access control on: not one left on the port.
  check try-it "$out" 'Fjord dev is running, with access control on'
  # Records (and a table's rows) carry a key; a snapshot's start and end do not.
  data=$(grep '^data: ' "$out" | grep -c '"key":' || true)
  [ "$data" -ge 1 ] || fail "try-it: the token streamed no records; the output:
$(tail -n 60 "$out")"
  others=$(grep '^data: ' "$out" | grep '"key":' | grep -vc '"key":"driver-3"' || true)
  [ "$others" -eq 0 ] || fail "try-it: $others records of keys other than driver-3 came through"
  check try-it "$out" '^HTTP/1\.1 403' '"code":"forbidden"' '^HTTP/1\.1 401' '"code":"token_missing"'
  echo "try-it: $data records of driver-3, then 403 forbidden and 401 token_missing"
}

step "README: the first command, cargo run --bin fjord -- dev, left running"
first=$(sed -n 's/^\(cargo run --bin fjord -- dev\) *#.*/\1/p' README.md | head -n 1)
[ -n "$first" ] || fail "README.md shows no line 'cargo run --bin fjord -- dev'"
mkdir -p "$work/first"
(cd "$work/first" && exec setsid bash -c "cd '$repo' && exec $first --port ${ports[8080]}" >banner 2>log) &
groups+=("$!")
for _ in $(seq 1 1200); do
  grep -q 'Fjord dev is running' "$work/first/banner" 2>/dev/null && break
  kill -0 "${groups[-1]}" 2>/dev/null || fail "the first command exited: $(tail -n 20 "$work/first/log")"
  sleep 0.1
done
grep -q 'Fjord dev is running' "$work/first/banner" || fail "the first command printed no banner within 120 s:
$(tail -n 20 "$work/first/log")"
curl -sN --max-time 4 "http://127.0.0.1:${ports[8080]}/v1/streams/orders" >"$work/first/stream" || true
records=$(grep -c '^event: orders' "$work/first/stream" || true)
[ "$records" -ge 1 ] || fail "the first command's fjord dev streamed no orders: $(head -c 600 "$work/first/stream")"
echo "first command: $records orders in 4 s; it stays on its port while the walkthroughs run"

step "README: filters and fields, against the first command's fjord dev"
filters=$(block README.md "filters" "<!-- ci/test-readme.sh, beside the first command: filters -->")
[ -n "$filters" ] || fail "README.md has no block after <!-- ci/test-readme.sh, beside the first command: filters -->"
printf '%s\n' "$filters" | sed 's/^/    /'
(cd "$work/first" && timeout 20 bash -c "${filters//8080/${ports[8080]}}" >filtered 2>&1) || true
python3 - "$work/first/filtered" <<'CHECK' || fail "the README's filter example: $(head -c 600 "$work/first/filtered")"
import json, sys
values = [json.loads(line[6:])["value"] for line in open(sys.argv[1]) if line.startswith("data: ")]
assert values, "no record"
for value in values:
    assert set(value) == {"order_id", "status", "total_cents"}, value
    assert value["status"] == "placed" and value["total_cents"] >= 1000, value
print(f"filters: {len(values)} orders, each placed, worth at least 1000 cents, with three fields")
CHECK

step "README: a table endpoint's snapshot, against the first command's fjord dev"
tables=$(block README.md "tables" "<!-- ci/test-readme.sh, beside the first command: tables -->")
[ -n "$tables" ] || fail "README.md has no block after <!-- ci/test-readme.sh, beside the first command: tables -->"
printf '%s\n' "$tables" | sed 's/^/    /'
(cd "$work/first" && timeout 20 bash -c "${tables//8080/${ports[8080]}}" >table 2>&1) || true
python3 - "$work/first/table" <<'CHECK' || fail "the README's table example: $(head -c 600 "$work/first/table")"
import json, sys
blocks = [b for b in open(sys.argv[1]).read().split("\n\n") if b.strip()]
def field(block, name):
    return next((line[len(name) + 2:] for line in block.splitlines() if line.startswith(name + ": ")), None)
events = [field(b, "event") for b in blocks]
start, end = events.index("fjord.snapshot_start"), events.index("fjord.snapshot_end")
rows = [json.loads(field(b, "data")) for b in blocks[start + 1:end]]
assert rows and all(field(b, "id") is None for b in blocks[start + 1:end]), "rows without ids"
keys = [row["key"] for row in rows]
assert keys == sorted(set(keys)), keys
assert field(blocks[end], "id"), "snapshot_end has an id"
print(f"tables: a snapshot of {len(rows)} drivers, one row each, then live records")
CHECK

names=()
for found in "${walkthroughs[@]}"; do
  page=${found% *}
  name=${found#* }
  [[ " ${names[*]} " != *" $name "* ]] || fail "two walkthroughs are named $name"
  names+=("$name")
  declare -F "check_${name//-/_}" >/dev/null || fail "$page: walkthrough $name has no check in ci/test-readme.sh"
  step "$page: $name"
  mkdir -p "$work/$name"
  ln -s "$repo/ci" "$work/$name/ci"
  since_ms=$(($(date +%s) * 1000))
  run_block "$page" "$name" "$work/$name" 180
  "check_${name//-/_}" "$work/$name" "$since_ms"
done
for name in running-it try-it; do
  [[ " ${names[*]} " == *" $name "* ]] || fail "no page has the walkthrough $name"
done

step "fjord dev --auth: the banner's curl line streams demo records"
mkdir -p "$work/banner"
port=$(free_port)
(cd "$work/banner" && PATH="$repo/target/debug:$PATH" exec setsid fjord dev --auth --port "$port" >banner 2>log) &
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
token=$(PATH="$repo/target/debug:$PATH" bash -c "$mint") || fail "the banner's fjord token line failed: $mint"
status=$(curl -s -o /dev/null -w '%{http_code}' --max-time 3 -H "Authorization: Bearer $token" \
  "http://127.0.0.1:$port/v1/streams/drivers?key=driver-3" || true)
# A stream that opens runs until --max-time: curl then reports the 200 it got.
[ "$status" = 200 ] || fail "a token from the banner's fjord token line got $status"
key_dir=$(dirname "$(sed -n 's/.*--private-key \([^ ]*\).*/\1/p' <<<"$mint")")
dev_group=${groups[-1]}
kill -TERM -- "-$dev_group"
group_stopped "$dev_group" 10 || fail "fjord dev --auth did not stop within 10 s of SIGTERM"
[ ! -e "$key_dir" ] || fail "fjord dev --auth left its temporary key folder $key_dir behind"
echo "banner: its curl streamed $records orders; its fjord token line mints a token that opens drivers; $key_dir is gone once it stopped"
