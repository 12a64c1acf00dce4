#!/usr/bin/env bash
# `make image`: builds etlrouter:VERSION from the Dockerfile with buildah (no daemon), only when its inputs
# changed: the hash of the Dockerfile, the runtime lock and what the wheel is built from is kept in the image
# label `io.etlrouter.inputs`, and an image with the same hash is reused. On a machine without a registry
# the base python:3.11-slim is a local stand-in (scripts/image-base.sh). Prints the size and `etlrouter
# --help` from the image. Tags etlrouter:build-INPUTS, etlrouter:VERSION and etlrouter:test. Needs root.
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION=$(sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml | head -1)
IMAGE=${ETLROUTER_IMAGE:-etlrouter:$VERSION}
STORAGE=(--storage-driver "${BUILDAH_STORAGE_DRIVER:-overlay}")
if ! command -v buildah >/dev/null 2>&1; then
  echo "image: buildah not installed (scripts/system-deps.sh installs it as root); image not built" >&2
  exit 0
fi
inputs=$( { sha256sum Dockerfile .dockerignore requirements/runtime.lock pyproject.toml README.md LICENSE \
              scripts/image-base.sh scripts/image_slim.py;
            find src -type f ! -name '*.pyc' ! -path '*/__pycache__/*' -print0 | sort -z | xargs -0 sha256sum; } \
          | sha256sum | cut -c1-16)
# One build at a time on this machine (worktrees and CI share buildah's storage and the base's cache).
mkdir -p "${ETLROUTER_IMAGE_CACHE:-$HOME/.cache/etlrouter/image}"
exec 9>"${ETLROUTER_IMAGE_CACHE:-$HOME/.cache/etlrouter/image}/build.lock"
flock 9
# Each build is also tagged by its inputs: a tree whose inputs were built before (another worktree, a branch
# switched back to) reuses that image, and tests/image uses exactly the image of its own tree.
BUILT=etlrouter:build-$inputs
if buildah "${STORAGE[@]}" inspect --type image "$BUILT" >/dev/null 2>&1; then
  echo "image: $IMAGE is up to date (inputs $inputs)"
else
  bash scripts/image-base.sh
  start=$(date +%s)
  echo "image: building $IMAGE (inputs $inputs)"
  buildah "${STORAGE[@]}" bud --isolation chroot --pull=never --layers --quiet \
    --build-arg "VERSION=$VERSION" --label "io.etlrouter.inputs=$inputs" -t "$BUILT" . >/dev/null
  echo "image: built $IMAGE in $(( $(date +%s) - start )) s"
fi
buildah "${STORAGE[@]}" tag "$BUILT" "$IMAGE" etlrouter:test
size=$(buildah "${STORAGE[@]}" images --format '{{.Name}}:{{.Tag}} {{.Size}}' | awk -v want="localhost/$BUILT" '$1 == want {print $2" "$3; exit}')
echo "image: $IMAGE size $size"
c=$(buildah "${STORAGE[@]}" from --pull-never "$BUILT")
trap 'buildah "${STORAGE[@]}" rm "$c" >/dev/null 2>&1 || true' EXIT
echo "image: etlrouter --help from the image (uid $(buildah "${STORAGE[@]}" run --isolation chroot "$c" -- id -u)):"
buildah "${STORAGE[@]}" run --isolation chroot "$c" -- etlrouter --help
