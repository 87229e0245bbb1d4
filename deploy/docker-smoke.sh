#!/usr/bin/env bash
# CI proof of the Docker deployment: build the image offline, start the whole
# chain with docker-compose (`up -d demo` brings redis, kv-updater and
# api-server up first, health-gated), check that /keys fills and that /events
# delivers `event: update` (the snapshot and then a live commit), then tear
# everything down, also on failure.
#
#   bash ../shared/docker-offline.sh     # once: engine up, stand-in base images
#   bash deploy/docker-smoke.sh          # exit 0 = the chain works in Docker
#
# Nothing is pulled: the base images must be present (docker-offline.sh makes
# stand-ins), the build runs with --pull=false and, by default, without any
# network: deploy/docker-wheels.sh first gathers the wheels of the project and
# of every dependency into build/docker-wheels/, for the image's Python, the way
# this host's pip reaches its index (its configuration, mirrors, certificates,
# local file:// indexes), and the image installs from there only (PIP_NO_INDEX=1).
#
# Environment:
#   SMOKE_WHEELS=host|online  host (default): offline build from host-gathered
#                             wheels; online: the image's pip uses the index
#   SMOKE_TIMEOUT=240         seconds allowed for the chain to start and deliver
#   SMOKE_KEEP=1              leave the stack and the image up (debugging)
#   COMPOSE="docker-compose"  the compose command (e.g. "docker compose")
#   PYTHON=python3            the host Python whose pip gathers the wheels
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
cd "$ROOT"

export COMPOSE_DOCKER_CLI_BUILD=0 DOCKER_BUILDKIT=0
PYTHON=${PYTHON:-python3}
read -r -a COMPOSE_CMD <<<"${COMPOSE:-docker-compose}"
TIMEOUT=${SMOKE_TIMEOUT:-240}
MODE=${SMOKE_WHEELS:-host}
BASE_IMAGE=${PYTHON_IMAGE:-python:3.12-slim}
REDIS_IMAGE=${REDIS_IMAGE:-redis:7-alpine}
PROJECT="rfcsmoke$$$(date +%s)"
TAG="redis-first-chain:smoke-$PROJECT"
TOKEN="smoke-token-$$"
WHEELS="$ROOT/build/docker-wheels"
START=$(date +%s)
mkdir -p "$ROOT/build"

say() { printf 'docker-smoke: %s\n' "$*" >&2; }
fail() { say "FAIL: $*"; exit 1; }
left() { echo $((START + TIMEOUT - $(date +%s))); }

# compose [timeout SECONDS] ARGS...: docker-compose on this run's project
compose() {
  local limit=()
  if [ "$1" = timeout ]; then limit=(timeout "$2"); shift 2; fi
  "${limit[@]}" env CHAIN_IMAGE="$TAG" REDIS_IMAGE="$REDIS_IMAGE" API_PORT="$API_PORT" \
    API_HOST_IP=127.0.0.1 API_TOKEN="$TOKEN" DEMO_RATE=20 DEMO_KEYS=8 \
    "${COMPOSE_CMD[@]}" -p "$PROJECT" -f "$ROOT/docker-compose.yml" "$@"
}

STACK_UP=0
cleanup() {
  local rc=$?
  set +e
  if [ "$STACK_UP" = 1 ]; then
    if [ "$rc" != 0 ]; then
      say "state of the stack at failure:"
      compose ps >&2
      compose logs --no-color --tail=60 >&2
    fi
    if [ "${SMOKE_KEEP:-0}" = 1 ]; then
      say "SMOKE_KEEP=1: left project $PROJECT (image $TAG, port $API_PORT) running"
    else
      compose down -v --remove-orphans --timeout 10 >/dev/null 2>&1 \
        || say "compose down failed for project $PROJECT"
    fi
  fi
  if [ "${SMOKE_KEEP:-0}" != 1 ]; then
    docker image rm -f "$TAG" >/dev/null 2>&1
    # the build stage's image, left untagged by the classic builder
    comm -13 <(printf '%s\n' "${dangling_before:-}") <(docker images -q --filter dangling=true | sort -u) \
      | xargs -r docker image rm >/dev/null 2>&1
  fi
  if [ "$rc" = 0 ]; then say "PASS in $(( $(date +%s) - START ))s"; else say "exit $rc"; fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---- 0. the engine and the base images (never pulled)
docker info >/dev/null 2>&1 || fail "no Docker engine answers (run: bash ../shared/docker-offline.sh)"
command -v "${COMPOSE_CMD[0]}" >/dev/null || fail "${COMPOSE_CMD[0]} not found"
for img in "$BASE_IMAGE" "$REDIS_IMAGE"; do
  docker image inspect "$img" >/dev/null 2>&1 \
    || fail "image $img is missing and is never pulled here (docker pull it, or: bash ../shared/docker-offline.sh)"
done
API_PORT=$("$PYTHON" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')

# ---- 1. the wheels, gathered for the image's Python as the host's pip reaches its index
BUILD_ARGS=(--build-arg "PYTHON_IMAGE=$BASE_IMAGE")
if [ "$MODE" = host ]; then
  # the host's pip, its configuration and its indexes, for the image's Python
  # (deploy/docker-wheels.sh); then the build needs no network at all
  say "gathering wheels in build/docker-wheels with the host's pip configuration"
  PYTHON="$PYTHON" bash "$HERE/docker-wheels.sh" "$BASE_IMAGE" || fail "could not gather the wheels"
  BUILD_ARGS+=(--build-arg PIP_NO_INDEX=1 --network none)
else
  rm -rf "$WHEELS"
  say "online build: the image's pip uses the package index"
fi

# ---- 2. the image
say "building $TAG"
dangling_before=$(docker images -q --filter dangling=true | sort -u)
docker build --pull=false --force-rm "${BUILD_ARGS[@]}" -t "$TAG" "$ROOT" >"$ROOT/build/docker-smoke-build.log" 2>&1 \
  || { tail -40 "$ROOT/build/docker-smoke-build.log" >&2; fail "docker build failed (build/docker-smoke-build.log)"; }
say "image built: $(docker image inspect --format '{{.Size}}' "$TAG" | awk '{printf "%.0f MB", $1/1e6}')"
docker run --rm --pull never --network none "$TAG" sh -c \
  'id -u; kv-updater --help >/dev/null && api-server --help >/dev/null && demo-publisher --help >/dev/null' \
  >"$ROOT/build/docker-smoke-run.log" 2>&1 || { cat "$ROOT/build/docker-smoke-run.log" >&2; fail "the image's commands do not run"; }
[ "$(head -1 "$ROOT/build/docker-smoke-run.log")" != 0 ] || fail "the image runs as root"

# ---- 3. the chain: `up -d demo` must start everything it depends on
say "starting project $PROJECT (api on 127.0.0.1:$API_PORT)"
STACK_UP=1
budget=$(left); [ "$budget" -gt 60 ] || budget=60
compose timeout "$budget" up -d --no-build demo || fail "compose up demo failed (or took over ${budget}s)"
compose ps

# ---- 4. /keys fills, /events delivers snapshot then live updates
API="http://127.0.0.1:$API_PORT"
"$PYTHON" - "$API" "$TOKEN" "$(left)" <<'PY' || fail "the chain did not deliver"
import json, sys, time, urllib.error, urllib.request

api, token, budget = sys.argv[1], sys.argv[2], float(sys.argv[3])
deadline = time.monotonic() + budget
auth = {"Authorization": f"Bearer {token}"}

def get(path, headers=None, timeout=5.0):
    req = urllib.request.Request(api + path, headers=headers or {})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return resp.status, resp.read()

# /live answers; /keys without the token is refused (API_TOKEN came from the env)
while True:
    try:
        status, _ = get("/live")
        break
    except (OSError, urllib.error.URLError) as exc:
        if time.monotonic() > deadline:
            sys.exit(f"/live never answered: {exc}")
        time.sleep(1)
try:
    status, _ = get("/keys")
    sys.exit(f"/keys without the token answered {status}; API_TOKEN was not applied")
except urllib.error.HTTPError as exc:
    print(f"/keys without token -> {exc.code} (refused, as it should)")

# /keys fills
keys = []
while time.monotonic() < deadline:
    try:
        _, body = get("/keys", auth)
        keys = json.loads(body)["keys"]
    except (OSError, ValueError, KeyError) as exc:
        print(f"/keys not yet: {exc}")
    if len(keys) >= 3:
        break
    time.sleep(1)
else:
    sys.exit(f"/keys did not fill in time: {keys}")
top = max(k["seq"] for k in keys)
print(f"/keys -> {len(keys)} keys, highest seq {top}: {sorted(k['type'] for k in keys)}")
_, body = get("/keys/" + keys[0]["type"], auth)
print(f"/keys/{keys[0]['type']} -> {body[:200].decode()}")

# /events: `event: update` lines, the snapshot first, then a live commit past `top`
req = urllib.request.Request(api + "/events", headers={**auth, "Accept": "text/event-stream"})
snapshot = live = 0
first = None
with urllib.request.urlopen(req, timeout=max(1.0, deadline - time.monotonic())) as stream:
    event = None
    ident = None
    while time.monotonic() < deadline:
        line = stream.readline()
        if not line:
            sys.exit("/events closed the stream")
        text = line.decode().rstrip("\r\n")
        if text.startswith("event:"):
            event = text[6:].strip()
        elif text.startswith("id:"):
            ident = int(text[3:].strip())
        elif text.startswith("data:") and event == "update":
            data = json.loads(text[5:])
            if first is None:
                first = text[:200]
            if ident is not None and ident > top:
                live += 1
                print(f"/events live: event: update, id: {ident}, data: {text[5:200]}")
                if live >= 3:
                    break
            else:
                snapshot += 1
        elif text == "":
            event = ident = None
    else:
        sys.exit(f"/events: {snapshot} snapshot and {live} live updates before the deadline")
print(f"/events -> first {first}")
print(f"/events -> {snapshot} snapshot events, then {live} live events past seq {top}")
PY

# ---- 5. the services report healthy
for svc in kv-updater api-server; do
  cid=$(compose ps -q "$svc")
  state=$(docker inspect --format '{{.State.Health.Status}} user={{.Config.User}} ro={{.HostConfig.ReadonlyRootfs}}' "$cid")
  say "$svc: $state"
  case "$state" in healthy*) ;; *) fail "$svc is not healthy: $state" ;; esac
done
say "the chain works in Docker: redis -> kv-updater -> api-server, fed by demo"
