#!/usr/bin/env bash
# Gather, into build/docker-wheels/, the wheels of the project and of every
# dependency (at the versions in constraints.txt) for the Python of the image's
# base, so that the image builds with
# no network at all:
#
#   bash deploy/docker-wheels.sh [BASE_IMAGE]          # default python:3.12-slim
#   docker build --pull=false --network none --build-arg PIP_NO_INDEX=1 -t redis-first-chain .
#
# The project's wheel is built by this host's pip. The dependencies are then
# resolved by the base image's own pip (so that environment markers such as
# python_full_version are those of the image's Python), reaching the package
# index exactly as this host's pip does: host network, the host's pip
# configuration files, its PIP_* variables, and every local path they name
# (file:// indexes, find-links folders, CA bundle, constraints) mounted
# read-only at the same place. That covers a pip that goes through a mirror, a
# private CA or a local file:// index, none of which a plain `docker build`
# sees. The base image is never pulled. PYTHON (default python3) is the host
# Python whose pip is used. Log: build/docker-wheels.log.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BASE_IMAGE=${1:-${PYTHON_IMAGE:-python:3.12-slim}}
PYTHON=${PYTHON:-python3}
WHEELS="$ROOT/build/docker-wheels"
LOG="$ROOT/build/docker-wheels.log"

say() { printf 'docker-wheels: %s\n' "$*" >&2; }
fail() { say "FAIL: $*"; exit 1; }

# a Python with pip (a venv made without pip will not do)
for candidate in "$PYTHON" python3 /usr/local/bin/python3 /usr/bin/python3; do
  if "$candidate" -m pip --version >/dev/null 2>&1; then PYTHON=$candidate; break; fi
done
"$PYTHON" -m pip --version >/dev/null 2>&1 || fail "no Python with pip found (set PYTHON)"

docker image inspect "$BASE_IMAGE" >/dev/null 2>&1 \
  || fail "image $BASE_IMAGE is missing (it is never pulled here)"
rm -rf "$WHEELS" && mkdir -p "$WHEELS"
: >"$LOG"

"$PYTHON" -m pip wheel --no-deps --wheel-dir "$WHEELS" "$ROOT" >>"$LOG" 2>&1 \
  || { tail -30 "$LOG" >&2; fail "the host's pip could not build the project's wheel"; }

MOUNTS=() ENVS=() SEEN=" "
mount_ro() { # mount_ro HOST_PATH [CONTAINER_PATH]
  local src=$1 dst=${2:-$1}
  case "$SEEN" in *" $dst "*) return 0 ;; esac
  if [ -e "$src" ]; then MOUNTS+=(-v "$src:$dst:ro"); SEEN+="$dst "; fi
}
for f in /etc/pip.conf /etc/xdg/pip; do mount_ro "$f"; done
mount_ro "${XDG_CONFIG_HOME:-$HOME/.config}/pip" /root/.config/pip
mount_ro "$HOME/.pip" /root/.pip
if [ -n "${PIP_CONFIG_FILE:-}" ]; then mount_ro "$PIP_CONFIG_FILE"; fi
while IFS= read -r name; do ENVS+=(-e "$name"); done < <(env | sed -n 's/^\(PIP_[A-Z0-9_]*\)=.*/\1/p')
# every absolute path the configuration names (a local index's pages link to
# files beside it: for .../simple mount its parent)
while IFS= read -r path; do
  case "$path" in */simple | */simple/) mount_ro "$(dirname "$path")" ;; *) mount_ro "$path" ;; esac
done < <(
  { "$PYTHON" -m pip config list 2>/dev/null || true; env | grep '^PIP_' || true; } \
    | grep -oE "(file://)?/[^' ,\"]+" | sed 's|^file://||' | sort -u)

docker run --rm --pull never --network host "${MOUNTS[@]}" "${ENVS[@]}" \
  -e PIP_DISABLE_PIP_VERSION_CHECK=1 -e PIP_ROOT_USER_ACTION=ignore -v "$WHEELS:/wheels" \
  -v "$ROOT/constraints.txt:/constraints.txt:ro" "$BASE_IMAGE" \
  sh -c "python3 -m pip wheel --constraint /constraints.txt --wheel-dir /wheels \
         /wheels/redis_first_chain-*.whl 'setuptools>=68' wheel \
         && chown -R $(id -u):$(id -g) /wheels" >>"$LOG" 2>&1 \
  || { tail -30 "$LOG" >&2; fail "the image's pip could not gather the wheels"; }
say "$(find "$WHEELS" -name '*.whl' | wc -l) wheels in build/docker-wheels for $BASE_IMAGE (log: build/docker-wheels.log)"
