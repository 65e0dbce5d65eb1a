"""Fixtures for the differential tests: the backend under test, the kernel, scratch roots.

``UNIONFS_DIFF_BACKEND`` picks the backend (``unionfs`` by default, ``fuse-overlayfs`` or
``kernel`` to validate the machinery).  ``UNIONFS_DIFF_EXAMPLES`` scales the generated runs
(hypothesis examples and seeded sequences) for the long run.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

# The oracle package lives in tests/oracle; make the repository root importable however
# pytest was started (tests/ itself is not a package).
_ROOT = str(Path(__file__).resolve().parents[2])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from tests.oracle.backends import (  # noqa: E402
    Backend,
    KernelOverlay,
    backend_from_env,
    force_unmount,
    is_mounted,
    probe,
)
from tests.oracle.layergen import NONLOOPING_SYMLINK_TARGETS, SYMLINK_TARGETS  # noqa: E402


def _need_root_and_overlay() -> str | None:
    if os.geteuid() != 0:
        return "differential tests need root (kernel overlay mounts, trusted.* xattrs)"
    with open("/proc/filesystems", encoding="utf-8") as f:
        if "overlay" not in f.read():
            return "the kernel has no overlay filesystem"
    return None


@pytest.fixture(scope="session")
def kernel() -> KernelOverlay:
    """The oracle: kernel overlayfs with redirect_dir/index/metacopy/xino pinned off."""
    reason = _need_root_and_overlay()
    if reason:
        pytest.skip(reason)
    return KernelOverlay()


@pytest.fixture(scope="session")
def backend(kernel: KernelOverlay) -> Backend:
    """The backend under test; skipped with the probe's reason when it cannot mount."""
    be = backend_from_env()
    if be.fuse and not os.path.exists("/dev/fuse"):
        pytest.skip("no /dev/fuse")
    reason = probe(be)
    if reason:
        pytest.skip(reason)
    return be


@pytest.fixture(scope="session")
def gen_options(backend: Backend) -> dict[str, object]:
    """Generator options narrowed by the backend's documented gaps (stand-ins only)."""
    exclude: set[str] = set()
    if "xattr-whiteout" in backend.known_gaps:
        exclude.add("wh_xattr")
    if "user-overlay-opaque" in backend.known_gaps:
        exclude.add("opq_user")
    targets = (
        NONLOOPING_SYMLINK_TARGETS if "symlink-loop" in backend.known_gaps else SYMLINK_TARGETS
    )
    return {"exclude": frozenset(exclude), "symlink_targets": targets}


@pytest.fixture(scope="session")
def diff_options(backend: Backend) -> dict[str, object]:
    """Comparator options narrowed by the backend's documented gaps (stand-ins only)."""
    ignore = {"nlink"} if "nlink" in backend.known_gaps else set()
    return {
        "inodes": "inode-partition" not in backend.known_gaps,
        # d_ino is never compared with the kernel's (which is inconsistent for merged subdirs
        # of a pre-populated upper); FUSE backends get a strict d_ino == st_ino check instead.
        "dino": False,
        "ignore": frozenset(ignore),
    }


@pytest.fixture
def scratch() -> Iterator[Path]:
    """A short temporary root under /tmp (short paths keep the kernel's mount data small).

    On teardown, anything still mounted below it is unmounted (lazily if needed) before the
    tree is removed.
    """
    root = Path(tempfile.mkdtemp(prefix="ud", dir="/tmp"))
    try:
        yield root
    finally:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
            mounts = [line.split()[4] for line in f]
        for m in sorted((m for m in mounts if m.startswith(f"{root}/")), reverse=True):
            force_unmount(m, fuse=True)
            if is_mounted(m):
                force_unmount(m, fuse=False)
        shutil.rmtree(root, ignore_errors=True)
