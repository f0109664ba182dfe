#!/usr/bin/env bash
# One idempotent setup for a fresh Debian bookworm machine (run as root).
#
# Installs the apt packages, the Kubernetes 1.20.2 control-plane servers (built
# once from Debian's source package and cached), the project venv with bcc made
# importable, kernel headers for bcc, and mounts bpffs. Every step checks first
# and does nothing when its result is already there, so a second run is quick.
#
# Environment:
#   CLUSTERMESH_CACHE   cache root (default ~/.cache/clustermesh)
#   KUBEBUILDER_ASSETS  a folder holding kube-apiserver etc. to use instead of building
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="${CLUSTERMESH_CACHE:-$HOME/.cache/clustermesh}"
KUBE_VERSION="1.20.2"
KUBE_BIN="$CACHE/kube-$KUBE_VERSION/bin"
VENV="$ROOT/.venv"
STEP=0
STEPS=7

step() { STEP=$((STEP + 1)); printf '\n[setup %d/%d] %s\n' "$STEP" "$STEPS" "$*"; }
info() { printf '  %s\n' "$*"; }
die() { printf '\n[setup] ERROR: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "run as root: the setup installs apt packages and mounts bpffs"
mkdir -p "$CACHE"

APT_PACKAGES=(
  etcd-server python3-bpfcc linux-headers-amd64 golang-go rsync jq iproute2 curl
  golang-github-modern-go-reflect2-dev dpkg-dev ca-certificates iptables util-linux
  procps psmisc kmod make gcc libc6-dev linux-libc-dev python3-venv etcd-client
  nginx-light conntrack busybox
)

# ---------------------------------------------------------------------------
step "apt packages and the bookworm deb-src line"
SRC_FILE=/etc/apt/sources.list.d/clustermesh-deb-src.sources
if [ ! -f "$SRC_FILE" ]; then
  cat >"$SRC_FILE" <<'EOF'
Types: deb-src
URIs: http://deb.debian.org/debian
Suites: bookworm
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
  rm -f "$CACHE/apt-updated"
  info "added $SRC_FILE"
fi
missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ] || [ ! -f "$CACHE/apt-updated" ]; then
  info "apt-get update"
  apt-get update -qq || info "apt-get update reported errors (unreachable extra repositories are fine)"
  touch "$CACHE/apt-updated"
fi
if [ ${#missing[@]} -gt 0 ]; then
  info "installing: ${missing[*]}"
  # No init system here: keep package scripts from trying to start etcd.
  printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  rm -f /usr/sbin/policy-rc.d
else
  info "all ${#APT_PACKAGES[@]} packages present"
fi

# ---------------------------------------------------------------------------
step "Kubernetes $KUBE_VERSION (kube-apiserver, kube-controller-manager, kube-scheduler, kube-proxy)"
have_kube_on_path() {
  local d="$1"
  [ -x "$d/kube-apiserver" ] && [ -x "$d/kube-controller-manager" ] && [ -x "$d/kube-scheduler" ] \
    && [ -x "$d/kube-proxy" ]
}
if [ -n "${KUBEBUILDER_ASSETS:-}" ] && have_kube_on_path "$KUBEBUILDER_ASSETS"; then
  info "using \$KUBEBUILDER_ASSETS=$KUBEBUILDER_ASSETS"
elif command -v kube-apiserver >/dev/null && command -v kube-controller-manager >/dev/null \
  && command -v kube-scheduler >/dev/null && command -v kube-proxy >/dev/null; then
  info "using binaries on PATH: $(command -v kube-apiserver)"
elif have_kube_on_path "$KUBE_BIN"; then
  info "cached in $KUBE_BIN"
else
  bash "$ROOT/scripts/build-kube.sh" "$KUBE_VERSION" "$KUBE_BIN"
fi

# ---------------------------------------------------------------------------
step "kernel headers for bcc"
KREL="$(uname -r)"
HDR="$(ls -d /usr/src/linux-headers-*-amd64 2>/dev/null | sort -V | tail -n1 || true)"
HDR_COMMON="$(ls -d /usr/src/linux-headers-*-common 2>/dev/null | sort -V | tail -n1 || true)"
if [ -e "/lib/modules/$KREL/build/include" ]; then
  info "/lib/modules/$KREL/build present"
elif [ -n "$HDR" ]; then
  mkdir -p "/lib/modules/$KREL"
  ln -sfn "$HDR" "/lib/modules/$KREL/build"
  ln -sfn "${HDR_COMMON:-$HDR}" "/lib/modules/$KREL/source"
  info "linked $HDR as /lib/modules/$KREL/build"
else
  die "no kernel headers under /usr/src; install linux-headers-amd64"
fi

# ---------------------------------------------------------------------------
step "bpffs and cgroup v2"
if ! mountpoint -q /sys/fs/bpf; then
  mkdir -p /sys/fs/bpf
  mount -t bpf bpf /sys/fs/bpf
  info "mounted bpffs on /sys/fs/bpf"
else
  info "bpffs already mounted"
fi
CGROUP2="$(awk '$3=="cgroup2"{print $2; exit}' /proc/mounts)"
[ -n "$CGROUP2" ] || die "no cgroup v2 mount found; mount one with: mount -t cgroup2 none /sys/fs/cgroup/unified"
info "cgroup v2 at $CGROUP2"

# ---------------------------------------------------------------------------
step "python venv at $VENV"
PY="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
  info "created"
fi
STAMP="$VENV/.installed-$(sha256sum "$ROOT/pyproject.toml" | cut -c1-16)"
if [ ! -f "$STAMP" ]; then
  export PIP_CACHE_DIR="$CACHE/pip"
  info "pip install -e .[dev] (log: $CACHE/pip-install.log)"
  if ! { "$VENV/bin/python" -m pip install -q --upgrade pip \
      && "$VENV/bin/python" -m pip install -e "$ROOT[dev]"; } >"$CACHE/pip-install.log" 2>&1; then
    tail -n 30 "$CACHE/pip-install.log"
    die "pip install failed; full log in $CACHE/pip-install.log"
  fi
  rm -f "$VENV"/.installed-*
  touch "$STAMP"
  info "installed clustermesh (editable) and its dependencies"
else
  info "dependencies unchanged"
fi

# ---------------------------------------------------------------------------
step "bcc importable from the venv"
BCC_SRC=/usr/lib/python3/dist-packages/bcc
[ -d "$BCC_SRC" ] || die "python3-bpfcc did not install $BCC_SRC"
mkdir -p "$CACHE/pylinks"
ln -sfn "$BCC_SRC" "$CACHE/pylinks/bcc"
SITE="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
echo "$CACHE/pylinks" >"$SITE/clustermesh-bcc.pth"
"$VENV/bin/python" -c 'import bcc' || die "bcc does not import from the venv"
info "bcc imports"

# ---------------------------------------------------------------------------
step "check"
"$VENV/bin/clustermesh" version
for b in etcd etcdctl kubectl; do command -v "$b" >/dev/null || die "$b missing after setup"; done
info "etcd: $(etcd --version | head -n1)"
printf '\n[setup] done\n'
