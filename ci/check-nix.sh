#!/usr/bin/env bash
# What can be checked of the Nix files without a network (no binary cache, no GitHub):
#   1. every .nix file parses (nix-instantiate --parse, Debian's nix-bin);
#   2. flake.lock pins exactly the revisions and hashes of shared/nix/pins.json, when
#      that file is there (the steering copy of the real upstream locks);
#   3. the stand-in nixpkgs has only the attributes of nix/nixpkgs-attributes.nix, each
#      checked against the real nixpkgs, and throws for the names nixpkgs has renamed;
#   4. the flake's outputs evaluate, strictly, with stand-in inputs, to the expected
#      structure (nix/eval-stub.nix: packages, the deploy apps of every system, Linux and
#      Darwin, with the images of the right Linux, checks, devShells, the build inputs,
#      what the images are made of, and that the dev image runs `fjord dev --host 0.0.0.0`).
# A real `nix build` needs the inputs and the cache: ci/release.sh does that where they
# can be reached.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '[check-nix] %s\n' "$*" >&2; }

if ! command -v nix-instantiate >/dev/null 2>&1; then
    log "installing nix-bin with apt…"
    sudo=()
    ((EUID == 0)) || sudo=(sudo)
    state=${FJORD_CI_STATE:-/tmp/fjord-ci}
    mkdir -p "$state"
    { "${sudo[@]}" apt-get update -qq &&
        DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq --no-install-recommends nix-bin; } \
        >"$state/nix-apt.log" 2>&1 || { tail -n 20 "$state/nix-apt.log" >&2; exit 1; }
fi

mapfile -t files < <(git ls-files --cached --others --exclude-standard -- '*.nix')
for file in "${files[@]}"; do
    nix-instantiate --parse "$file" >/dev/null
done
log "${#files[@]} .nix files parse"

pins=../shared/nix/pins.json
if [[ -f $pins ]]; then
    python3 - "$pins" flake.lock <<'PY'
import json, sys
pins = json.load(open(sys.argv[1]))["nodes"]
lock = json.load(open(sys.argv[2]))
root = lock["nodes"][lock["root"]]["inputs"]
for name, node in root.items():
    locked = lock["nodes"][node]
    if locked["locked"] != pins[name]["locked"] or locked["original"] != pins[name]["original"]:
        sys.exit(f"flake.lock: input {name} differs from {sys.argv[1]}")
print(f"[check-nix] flake.lock pins {', '.join(sorted(root))} as {sys.argv[1]} says", file=sys.stderr)
PY
else
    log "no $pins here: flake.lock not compared"
fi

# The stand-in nixpkgs has only the attributes checked against the real one
# (nix/nixpkgs-attributes.nix): a renamed one throws as nixpkgs' alias does, an unknown one
# is missing.
stub_attribute() {
    nix-instantiate --eval --strict -E "((import ./nix/stub-pkgs.nix).pkgsFor \"x86_64-linux\").$1" 2>&1
}
if refused=$(stub_attribute docker-distribution) ||
    ! grep -q "renamed to/replaced by 'distribution'" <<<"$refused"; then
    log "the stub nixpkgs does not refuse pkgs.docker-distribution as nixpkgs does: $refused"
    exit 1
fi
if refused=$(stub_attribute not-in-nixpkgs) || ! grep -q "attribute 'not-in-nixpkgs' missing" <<<"$refused"; then
    log "the stub nixpkgs has an attribute nix/nixpkgs-attributes.nix does not list: $refused"
    exit 1
fi
log "the stub nixpkgs refuses renamed and unchecked attributes"

summary=$(nix-instantiate --eval --strict --json nix/eval-stub.nix)
[[ $(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["ok"])' "$summary") == True ]] ||
    { log "unexpected flake outputs: $summary"; exit 1; }
log "flake outputs evaluate with stub inputs: $summary"
