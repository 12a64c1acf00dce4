#!/usr/bin/env bash
# Build a real upstream kube-apiserver (and kube-controller-manager) from Debian bookworm's own
# `kubernetes` source package, once, and cache the binaries. The operator's tests run them
# (tests/k8s/apiserver.py). docs/operator.md ("Tests against a real kube-apiserver") says why; the
# comments below say why each step is here.
#
#   scripts/k8s-apiserver.sh            # build if missing, print the bin directory
#
# Output: $ETLROUTER_K8S_CACHE/v1.20.2/bin/{kube-apiserver,kube-controller-manager}
# (default ~/.cache/etlrouter/k8s). 7-15 minutes on 2 cores the first time (7 measured idle, about 15 when the
# machine is busy); instant after.
set -euo pipefail

CACHE="${ETLROUTER_K8S_CACHE:-$HOME/.cache/etlrouter/k8s}"
VERSION=v1.20.2
BIN="$CACHE/$VERSION/bin"
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
can_install() { command -v apt-get >/dev/null 2>&1 && { [ -z "$SUDO" ] || sudo -n true 2>/dev/null; }; }

need_pkgs=()
for pkg in golang-1.19-go etcd-server rsync make openssl; do
    dpkg -s "$pkg" >/dev/null 2>&1 || need_pkgs+=("$pkg")
done
if [ -x "$BIN/kube-apiserver" ] && [ -x "$BIN/kube-controller-manager" ]; then
    # Binaries cached: only etcd and openssl are needed to run them.
    need_pkgs=()
    for pkg in etcd-server openssl; do dpkg -s "$pkg" >/dev/null 2>&1 || need_pkgs+=("$pkg"); done
fi
if [ ${#need_pkgs[@]} -gt 0 ] && ! can_install; then
    # Like scripts/system-deps.sh: without root (or sudo) and apt the operator tests skip locally,
    # naming this script; with CI set they fail.
    echo "note: ${need_pkgs[*]} not installed and cannot be installed here (needs root and apt-get);" \
         "the Kubernetes tests will be skipped (they fail when CI is set)" >&2
    exit 0
fi
if [ ${#need_pkgs[@]} -gt 0 ]; then
    echo "k8s-apiserver: installing ${need_pkgs[*]}" >&2
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need_pkgs[@]}" >&2
fi
if [ -x "$BIN/kube-apiserver" ] && [ -x "$BIN/kube-controller-manager" ]; then
    echo "$BIN"
    exit 0
fi

WORK="$(mktemp -d "${TMPDIR:-/tmp}/etlrouter-k8s-build.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
echo "k8s-apiserver: building $VERSION in $WORK (7-15 minutes on 2 cores)" >&2

# A private apt configuration with deb-src lines, so /etc/apt is left alone.
mkdir -p "$WORK/apt/lists/partial" "$WORK/apt/cache/archives/partial" "$WORK/apt/etc"
cat >"$WORK/apt/etc/sources.list" <<SRC
deb http://deb.debian.org/debian bookworm main
deb-src http://deb.debian.org/debian bookworm main
deb http://deb.debian.org/debian-security bookworm-security main
deb-src http://deb.debian.org/debian-security bookworm-security main
SRC
cat >"$WORK/apt/apt.conf" <<CONF
Dir::Etc::SourceList "$WORK/apt/etc/sources.list";
Dir::Etc::SourceParts "/nonexistent";
Dir::State::Lists "$WORK/apt/lists";
Dir::Cache "$WORK/apt/cache";
APT::Sandbox::User "root";
CONF
export APT_CONFIG="$WORK/apt/apt.conf"
apt-get update -qq >&2
cd "$WORK"
apt-get source --download-only -qq kubernetes/bookworm >&2
apt-get download -qq golang-github-modern-go-reflect2-dev >&2
unset APT_CONFIG

mkdir src
tar -xf kubernetes_*.orig.tar.* -C src --strip-components=1
# reflect2 1.0.1 (vendored) crashes with Go >= 1.18; Debian's 1.0.2 does not.
dpkg-deb -x golang-github-modern-go-reflect2-dev_*.deb reflect2
rm -rf src/vendor/github.com/modern-go/reflect2
cp -r reflect2/usr/share/gocode/src/github.com/modern-go/reflect2 src/vendor/github.com/modern-go/reflect2
rm -f src/vendor/github.com/modern-go/reflect2/go.mod

cat >version.env <<VER
KUBE_GIT_VERSION='$VERSION'
KUBE_GIT_MAJOR='1'
KUBE_GIT_MINOR='20'
KUBE_GIT_TREE_STATE='clean'
KUBE_GIT_COMMIT='0000000000000000000000000000000000000000'
VER
(
    cd src
    PATH=/usr/lib/go-1.19/bin:$PATH GOPROXY=off CGO_ENABLED=0 GOFLAGS=-mod=vendor \
        KUBE_GIT_VERSION_FILE="$WORK/version.env" \
        make WHAT="cmd/kube-apiserver cmd/kube-controller-manager" GOLDFLAGS="-s -w" >&2
)
mkdir -p "$BIN.tmp"
cp src/_output/bin/kube-apiserver src/_output/bin/kube-controller-manager "$BIN.tmp/"
rm -rf "$BIN" && mv "$BIN.tmp" "$BIN"
echo "$BIN"
