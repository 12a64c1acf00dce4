#!/usr/bin/env bash
# `make image`: builds etlrouter:VERSION from the Dockerfile with buildah (no daemon), only when its inputs
# changed: the hash of the Dockerfile, the runtime lock and what the wheel is built from is kept in the image
# label `io.etlrouter.inputs`, and an image with the same hash is reused. On a machine without a registry
# the base python:3.11-slim is a local stand-in (scripts/image-base.sh). Prints the size and `etlrouter
# --help` from the image. Also tags etlrouter:test (what tests/image uses). Needs root (or rootless buildah).
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION=$(sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml | head -1)
IMAGE=${ETLROUTER_IMAGE:-etlrouter:$VERSION}
STORAGE=(--storage-driver "${BUILDAH_STORAGE_DRIVER:-overlay}")
if ! command -v buildah >/dev/null 2>&1; then
  echo "image: buildah not installed (scripts/system-deps.sh installs it as root); image not built" >&2
  exit 0
fi
inputs=$( { sha256sum Dockerfile .dockerignore requirements/runtime.lock pyproject.toml README.md LICENSE;
            find src -type f ! -name '*.pyc' ! -path '*/__pycache__/*' -print0 | sort -z | xargs -0 sha256sum; } \
          | sha256sum | cut -c1-16)
have=$(buildah "${STORAGE[@]}" inspect --type image --format '{{index .ImageAnnotations "io.etlrouter.inputs"}}{{index .Docker.Config.Labels "io.etlrouter.inputs"}}' "$IMAGE" 2>/dev/null || true)
if [ "$have" = "$inputs$inputs" ] || [ "$have" = "$inputs" ]; then
  echo "image: $IMAGE is up to date (inputs $inputs)"
else
  bash scripts/image-base.sh
  start=$(date +%s)
  echo "image: building $IMAGE (inputs $inputs)"
  buildah "${STORAGE[@]}" bud --isolation chroot --pull=never --layers --quiet \
    --build-arg "VERSION=$VERSION" --label "io.etlrouter.inputs=$inputs" -t "$IMAGE" . >/dev/null
  echo "image: built $IMAGE in $(( $(date +%s) - start )) s"
fi
buildah "${STORAGE[@]}" tag "$IMAGE" etlrouter:test
size=$(buildah "${STORAGE[@]}" images --format '{{.Name}}:{{.Tag}} {{.Size}}' | awk -v want="localhost/$IMAGE" '$1 == want {print $2" "$3; exit}')
echo "image: $IMAGE size $size"
c=$(buildah "${STORAGE[@]}" from --pull-never "$IMAGE")
trap 'buildah "${STORAGE[@]}" rm "$c" >/dev/null 2>&1 || true' EXIT
echo "image: etlrouter --help from the image (uid $(buildah "${STORAGE[@]}" run --isolation chroot "$c" -- id -u)):"
buildah "${STORAGE[@]}" run --isolation chroot "$c" -- etlrouter --help
