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
    fuse-overlayfs zstd patch acl
    podman buildah runc uidmap slirp4netns
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

# The virtualenv is made from Debian's Python when it is 3.11 or newer: its interpreter and
# standard library are readable by every user, which rootless podman needs (it runs the
# mount program as the user). A Python under root's home (pyenv) is not.
PYTHON=python3
if [ -x /usr/bin/python3 ] && /usr/bin/python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
    PYTHON=/usr/bin/python3
fi
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
PIP_LOG=$(mktemp)
pip_or_die() {
    if ! .venv/bin/pip --disable-pip-version-check "$@" >"$PIP_LOG" 2>&1; then
        grep -v "is ignored: it is neither" "$PIP_LOG" >&2
        rm -f "$PIP_LOG"
        echo "install.sh: pip $1 failed" >&2
        exit 1
    fi
}

# pyfuse3 with the patches in third_party/pyfuse3, applied in the order listed: opendir can
# turn on the kernel's readdir cache, an entry's FUSE node id can differ from its st_ino, and
# fallocate reaches the filesystem, the request loop serves without trio and busy-polls
# briefly before it sleeps, and importing it reads no package metadata (see
# third_party/pyfuse3/README.md). The local version names the patch set; bump it with any
# change to the patches so a cached wheel is not reused.
# The wheel is kept in the cache directory: a fresh clone on the same machine does not
# compile it again.
PYFUSE3_VERSION=3.5.0
PYFUSE3_SHA256=88399a9494b88603230bba300f4ba9ad63fece5ed514ca3633d555a0c6a42b24
PYFUSE3_URL=https://files.pythonhosted.org/packages/b9/a9/ce2c0513e9611ee2ffeeb482a33d23a210326801d48866df30a989562d43/pyfuse3-$PYFUSE3_VERSION.tar.gz
PYFUSE3_LOCAL="$PYFUSE3_VERSION+unionfs.8"
PYFUSE3_PATCHES=(opendir-fileinfo.patch entry-node-id.patch fallocate.patch setxattr-flags.patch dont-mask.patch fast-dispatch.patch idle-spin.patch lazy-version.patch)
WHEEL_CACHE="${XDG_CACHE_HOME:-$HOME/.cache}/unionfs/wheels"
PYTAG=$(.venv/bin/python -c "import sys; print('cp%d%d' % sys.version_info[:2])")
have=$(.venv/bin/python -c "import importlib.metadata as m; print(m.version('pyfuse3'))" 2>/dev/null || true)
if [ "$have" != "$PYFUSE3_LOCAL" ]; then
    mkdir -p "$WHEEL_CACHE"
    wheel=$(ls "$WHEEL_CACHE"/pyfuse3-"$PYFUSE3_LOCAL"-"$PYTAG"-*.whl 2>/dev/null | head -n1 || true)
    if [ -z "$wheel" ]; then
        echo "building pyfuse3 $PYFUSE3_LOCAL"
        src=$(mktemp -d)
        sdist="$src/pyfuse3-$PYFUSE3_VERSION.tar.gz"
        if ! .venv/bin/python - "$sdist" "$PYFUSE3_URL" <<'PY'; then
import sys, urllib.request
out, url = sys.argv[1:]
try:
    data = urllib.request.urlopen(url, timeout=120).read()
except OSError as exc:
    sys.exit(f"install.sh: cannot download {url} ({exc}); asking pip instead")
open(out, "wb").write(data)
PY
            # pip's own index settings (a mirror, a proxy) may reach what urllib could not.
            pip_or_die download -q --no-deps --no-binary :all: -d "$src" "pyfuse3==$PYFUSE3_VERSION"
        fi
        if ! echo "$PYFUSE3_SHA256  $sdist" | sha256sum --check --status; then
            echo "install.sh: $sdist does not have the expected sha256" >&2
            exit 1
        fi
        tar xzf "$sdist" -C "$src"
        for p in "${PYFUSE3_PATCHES[@]}"; do
            if ! patch -s -d "$src/pyfuse3-$PYFUSE3_VERSION" -p1 <"third_party/pyfuse3/$p"; then
                echo "install.sh: third_party/pyfuse3/$p does not apply to pyfuse3 $PYFUSE3_VERSION" >&2
                exit 1
            fi
        done
        SETUPTOOLS_SCM_PRETEND_VERSION="$PYFUSE3_LOCAL" \
            pip_or_die wheel -q --no-deps -w "$WHEEL_CACHE" "$src/pyfuse3-$PYFUSE3_VERSION"
        rm -rf "$src"
        wheel=$(ls "$WHEEL_CACHE"/pyfuse3-"$PYFUSE3_LOCAL"-"$PYTAG"-*.whl | head -n1)
    fi
    pip_or_die install -q --no-deps --force-reinstall "$wheel"
fi
# editable_mode=compat: a plain path in a .pth file. The default import hook costs every
# start of the `unionfs` command about 11 ms (pathlib, urllib.parse).
pip_or_die install -q -e ".[test,bench,zstd]" --config-settings editable_mode=compat
rm -f "$PIP_LOG"
# pip's console script starts Python with the site module and imports `re`; the launcher
# (unionfs/launch.py) starts with -IS and reaches the mount server about 7 ms sooner.
.venv/bin/python -m unionfs.launch --write-launcher .venv/bin/unionfs
.venv/bin/python -c "import sys, pyfuse3, trio; pyfuse3.FileInfo(cache_readdir=True);
pyfuse3.EntryAttributes().node_id; pyfuse3.Operations.fallocate; pyfuse3.set_idle_spin;
assert 'importlib.metadata' not in sys.modules, 'pyfuse3 imports importlib.metadata';
assert pyfuse3.__version__ == '$PYFUSE3_LOCAL', pyfuse3.__version__; import pyroute2"

# Debian's unionfs-fuse ships /usr/bin/unionfs; /usr/local/bin comes first on root's PATH.
ln -sf "$ROOT/.venv/bin/unionfs" /usr/local/bin/unionfs
"$ROOT/.venv/bin/unionfs" install-helper >/dev/null
modprobe fuse 2>/dev/null || true
modprobe overlay 2>/dev/null || true
