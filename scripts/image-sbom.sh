#!/usr/bin/env bash
# `make sbom`: a CycloneDX SBOM (cyclonedx-bom) and a licence list (pip-licenses) of what is installed in the
# image's /opt/etlrouter, written to artifacts/ (gitignored): sbom.cdx.json, licenses.md, licenses.json.
# Both tools live in their own pinned venv under ~/.cache/etlrouter/image (never in the image). They read the
# image's environment through `buildah mount`: its venv's interpreter is Debian bookworm's python3.11, the
# same as this machine's, so the host's python3 runs with the image's site-packages. Skipped when the SBOM of
# this image id is already there.
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION=$(sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml | head -1)
IMAGE=${ETLROUTER_IMAGE:-etlrouter:$VERSION}
STORAGE=(--storage-driver "${BUILDAH_STORAGE_DRIVER:-overlay}")
TOOLS=${ETLROUTER_IMAGE_CACHE:-$HOME/.cache/etlrouter/image}/sbom-venv
OUT=artifacts
command -v buildah >/dev/null 2>&1 || { echo "sbom: buildah not installed; skipped" >&2; exit 0; }
id=$(buildah "${STORAGE[@]}" inspect --type image --format '{{.FromImageID}}' "$IMAGE")
if [ -s "$OUT/sbom.cdx.json" ] && [ "$(cat "$OUT/sbom.image-id" 2>/dev/null)" = "$id" ]; then
  echo "sbom: $OUT/sbom.cdx.json is up to date for $IMAGE"
  exit 0
fi
if [ ! -x "$TOOLS/bin/cyclonedx-py" ] || [ ! -x "$TOOLS/bin/pip-licenses" ]; then
  python3 -m venv "$TOOLS"
  "$TOOLS/bin/pip" install --quiet --disable-pip-version-check cyclonedx-bom==7.5.0 pip-licenses==5.5.5
fi
mkdir -p "$OUT"
c=$(buildah "${STORAGE[@]}" from --pull-never "$IMAGE")
trap 'buildah "${STORAGE[@]}" umount "$c" >/dev/null 2>&1; buildah "${STORAGE[@]}" rm "$c" >/dev/null 2>&1 || true' EXIT
root=$(buildah "${STORAGE[@]}" mount "$c")
# The venv's bin/python points at the image's /usr/bin/python: a shim venv beside it (this machine's python3,
# the image's lib/) reads the image's site-packages.
shim=$(mktemp -d); trap 'rm -rf "$shim"; buildah "${STORAGE[@]}" umount "$c" >/dev/null 2>&1; buildah "${STORAGE[@]}" rm "$c" >/dev/null 2>&1 || true' EXIT
mkdir -p "$shim/bin" && ln -s /usr/bin/python3 "$shim/bin/python" && ln -s "$root/opt/etlrouter/lib" "$shim/lib"
cp "$root/opt/etlrouter/pyvenv.cfg" "$shim/pyvenv.cfg"
py="$shim/bin/python"
"$TOOLS/bin/cyclonedx-py" environment --pyproject pyproject.toml --mc-type application --output-reproducible \
  --output-format JSON --output-file "$OUT/sbom.cdx.json" "$py"
site=$("$py" -c 'import site; print(site.getsitepackages()[0])')
"$TOOLS/bin/pip-licenses" --python "$py" --format markdown --with-urls --order license \
  --output-file "$OUT/licenses.md" >/dev/null
"$TOOLS/bin/pip-licenses" --python "$py" --format json --output-file "$OUT/licenses.json" >/dev/null
echo "$id" > "$OUT/sbom.image-id"
components=$(python3 -c 'import json,sys; print(len(json.load(open(sys.argv[1]))["components"]))' "$OUT/sbom.cdx.json")
echo "sbom: $OUT/sbom.cdx.json ($components components from $site of $IMAGE), $OUT/licenses.md"
