#!/usr/bin/env bash
# A local stand-in for the Dockerfile's base image `python:3.11-slim`, for machines that cannot pull from a
# registry (CI here): a Debian bookworm minbase root file system with python3/pip/venv made by mmdebstrap,
# the machine's extra CA certificates (a TLS-intercepting egress proxy; pip inside the build needs them),
# pip allowed to install system-wide (EXTERNALLY-MANAGED removed) and `python`/`pip` on the PATH; committed
# under the official name so `buildah bud --pull=never` uses it. The rootfs tar is cached in
# ~/.cache/etlrouter/image; the image is re-imported from it when buildah's storage lost it. Idempotent.
set -euo pipefail
BASE=${ETLROUTER_IMAGE_BASE:-docker.io/library/python:3.11-slim}
CACHE=${ETLROUTER_IMAGE_CACHE:-$HOME/.cache/etlrouter/image}
STORAGE=(--storage-driver "${BUILDAH_STORAGE_DRIVER:-overlay}")
mkdir -p "$CACHE"
# Bumped when what the stand-in holds changes: an older stand-in under the official name is replaced.
STANDIN=localhost/etlrouter-base-standin:2
if buildah "${STORAGE[@]}" inspect --type image "$BASE" >/dev/null 2>&1 \
   && buildah "${STORAGE[@]}" inspect --type image "$STANDIN" >/dev/null 2>&1; then
  exit 0
fi
ROOTFS="$CACHE/base-rootfs-2.tar"
if [ ! -s "$ROOTFS" ]; then
  MIRROR=$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
  MIRROR=${MIRROR:-http://deb.debian.org/debian}
  echo "image-base: mmdebstrap bookworm from $MIRROR (about a minute)" >&2
  # /usr merged by symlinks as debootstrap does (the hook): without it mmdebstrap merges with the usrmerge
  # package, which pulls in the whole of perl (50 MB) that the official image does not have
  mmdebstrap --quiet --format=tar --variant=minbase --hook-dir=/usr/share/mmdebstrap/hooks/merged-usr \
    --include=python3,python3-pip,python3-venv,ca-certificates bookworm "$ROOTFS.tmp" "$MIRROR"
  mv "$ROOTFS.tmp" "$ROOTFS"
fi
c=$(buildah "${STORAGE[@]}" from scratch)
trap 'buildah "${STORAGE[@]}" rm "$c" >/dev/null 2>&1 || true' EXIT
buildah "${STORAGE[@]}" add "$c" "$ROOTFS" /
shopt -s nullglob
crts=(/usr/local/share/ca-certificates/*.crt)
if [ ${#crts[@]} -gt 0 ]; then
  buildah "${STORAGE[@]}" copy "$c" "${crts[@]}" /usr/local/share/ca-certificates/
fi
buildah "${STORAGE[@]}" run --isolation chroot "$c" -- sh -ec '
  update-ca-certificates >/dev/null 2>&1
  rm -f /usr/lib/python3*/EXTERNALLY-MANAGED
  ln -sf python3 /usr/bin/python
  [ -e /usr/bin/pip ] || ln -sf pip3 /usr/bin/pip
  # what the official slim image leaves out too: documentation, manual pages, translations, apt lists
  rm -rf /usr/share/doc/* /usr/share/man/* /usr/share/info/* /usr/share/locale/* /var/lib/apt/lists/* \
         /var/cache/apt/*.bin /var/cache/debconf/*-old /var/log/*.log'
buildah "${STORAGE[@]}" config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
  --env LANG=C.UTF-8 --cmd python3 "$c"
buildah "${STORAGE[@]}" commit --quiet "$c" "$BASE" >/dev/null
buildah "${STORAGE[@]}" tag "$BASE" "$STANDIN"
echo "image-base: committed $BASE (stand-in built from Debian bookworm)" >&2
