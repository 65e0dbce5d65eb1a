#!/bin/bash
# Install everything unionfs needs on a Debian machine, as root:
# Debian packages, a virtualenv at the repo root (.venv) with the project installed,
# the `unionfs` command on root's PATH and the `mount -t fuse.unionfs` helper.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)

APT_PACKAGES=(
    python3 python3-venv python3-dev gcc pkg-config
    fuse3 libfuse3-dev attr
    iproute2 nftables util-linux busybox-static
    fuse-overlayfs zstd
)
missing=()
for p in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "installing Debian packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq "${missing[@]}" >/dev/null
fi

if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
PIP_LOG=$(mktemp)
if ! .venv/bin/pip install -q --disable-pip-version-check -e ".[test,bench,zstd]" >"$PIP_LOG" 2>&1; then
    grep -v "is ignored: it is neither" "$PIP_LOG" >&2
    rm -f "$PIP_LOG"
    echo "install.sh: pip install failed" >&2
    exit 1
fi
rm -f "$PIP_LOG"
.venv/bin/python -c "import pyfuse3, trio, xattr, pyroute2"

# Debian's unionfs-fuse ships /usr/bin/unionfs; /usr/local/bin comes first on root's PATH.
ln -sf "$ROOT/.venv/bin/unionfs" /usr/local/bin/unionfs
"$ROOT/.venv/bin/unionfs" install-helper >/dev/null
modprobe fuse 2>/dev/null || true
modprobe overlay 2>/dev/null || true
