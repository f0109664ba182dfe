#!/usr/bin/env bash
# Build kube-apiserver, kube-controller-manager, kube-scheduler and kube-proxy from Debian's
# `kubernetes` source package with Debian's Go, into a cache folder.
#
# usage: build-kube.sh VERSION OUT_BIN_DIR
#
# The vendored github.com/modern-go/reflect2 v1.0.1 crashes under Go >= 1.18
# (it walks runtime map internals that changed); Debian ships 1.0.2, which is
# API-compatible, so its files replace the vendored copy before building.
set -euo pipefail

VERSION="$1"
OUT="$2"
WORK="$(dirname "$OUT")/src"
REFLECT2=/usr/share/gocode/src/github.com/modern-go/reflect2

say() { printf '  %s\n' "$*"; }
die() { printf '[build-kube] ERROR: %s\n' "$*" >&2; exit 1; }

command -v go >/dev/null || die "go not found; install golang-go"
command -v make >/dev/null || die "make not found; install make"
[ -d "$REFLECT2" ] || die "$REFLECT2 missing; install golang-github-modern-go-reflect2-dev"

mkdir -p "$WORK" "$OUT"
cd "$WORK"
SRC="$(ls -d "$WORK"/kubernetes-*/ 2>/dev/null | head -n1 || true)"
if [ -z "$SRC" ] || [ ! -f "$SRC/go.mod" ]; then
  say "downloading Debian's kubernetes source package"
  rm -rf "$WORK"/kubernetes*
  apt-get source -qq kubernetes >/dev/null 2>&1 || apt-get source kubernetes \
    || die "apt-get source kubernetes failed; a deb-src line for bookworm is needed"
  SRC="$(ls -d "$WORK"/kubernetes-*/ | head -n1)"
fi
SRC="${SRC%/}"
say "source tree: $SRC"
head -n1 "$SRC/debian/changelog" | grep -q "$VERSION" \
  || say "note: Debian's changelog does not name $VERSION (building what is there)"

say "replacing vendored modern-go/reflect2 with Debian's 1.0.2"
VEND="$SRC/vendor/github.com/modern-go/reflect2"
rm -rf "$VEND"
mkdir -p "$VEND"
cp -r "$REFLECT2"/. "$VEND"/
find "$VEND" \( -name '*_test.go' -o -name go.mod -o -name go.sum \) -delete
rm -rf "$VEND/test" "$VEND/tests"

# Kubernetes' own make rules generate the OpenAPI code and build in GOPATH mode
# (in module mode Go 1.19 wants go.mod rewritten, which needs the network), as
# Debian's package does. The version comes from a file: the tree has no .git.
printf "KUBE_GIT_VERSION='v%s'\nKUBE_GIT_MAJOR='%s'\nKUBE_GIT_MINOR='%s'\n" \
  "$VERSION" "$(echo "$VERSION" | cut -d. -f1)" "$(echo "$VERSION" | cut -d. -f2)" >"$WORK/version.env"
printf "KUBE_GIT_COMMIT='debian-source'\nKUBE_GIT_TREE_STATE='clean'\n" >>"$WORK/version.env"
export KUBE_GIT_VERSION_FILE="$WORK/version.env"
export GOPATH="$SRC/.go" GOCACHE="$(dirname "$OUT")/gocache" CGO_ENABLED=0 GOFLAGS=
mkdir -p "$GOPATH/src/k8s.io"
[ -L "$GOPATH/src/k8s.io/kubernetes" ] || ln -s ../../.. "$GOPATH/src/k8s.io/kubernetes"
cd "$SRC"
start=$(date +%s)
CMDS=(kube-apiserver kube-controller-manager kube-scheduler kube-proxy)
WHAT=""
for cmd in "${CMDS[@]}"; do [ -x "$OUT/$cmd" ] || WHAT="$WHAT cmd/$cmd"; done
say "building:$WHAT (code generation first; 5-10 minutes on 2 cores; log: $WORK/build.log)"
if ! make WHAT="${WHAT# }" >"$WORK/build.log" 2>&1; then
  tail -n 40 "$WORK/build.log"
  die "build failed; full log in $WORK/build.log"
fi
for cmd in "${CMDS[@]}"; do
  install -m 0755 "_output/bin/$cmd" "$OUT/$cmd"
done
say "built in $(( $(date +%s) - start ))s"
"$OUT/kube-apiserver" --version
