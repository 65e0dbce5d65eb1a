"""What containers-storage asks of its mount program, tried on unionfs directly.

Podman 4.3 (containers-storage 1.43), running a container with ``--uidmap`` or
``--userns=auto`` on a kernel that can idmap mounts, bind-mounts (idmapped) the storage's
``overlay`` directory at ``overlay/<layer>/mapped/0`` -- inside itself -- and passes the lower
layers through that mount to the mount program. Walking ``..`` up from such a layer meets the
same directory twice.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.containers.podenv import FUSE_OVERLAYFS, UNIONFS

pytestmark = pytest.mark.mount


@pytest.fixture
def storage(tmp_path: Path) -> Iterator[Path]:
    top = tmp_path / "overlay"
    for d in ("layer/diff", "ctr/diff", "ctr/work", "ctr/merged", "ctr/mapped/0"):
        (top / d).mkdir(parents=True)
    (top / "layer" / "diff" / "f").write_text("lower\n")
    subprocess.run(["mount", "--bind", str(top), str(top / "ctr/mapped/0")], check=True)
    try:
        yield top
    finally:
        subprocess.run(["fusermount3", "-u", "-z", str(top / "ctr/merged")], capture_output=True)
        subprocess.run(["umount", "-l", str(top / "ctr/mapped/0")], check=True)


def test_a_lower_seen_through_a_bind_mount_of_its_ancestor_mounts(storage: Path) -> None:
    ctr = storage / "ctr"
    lower = storage / "ctr/mapped/0/layer/diff"
    opts = f"lowerdir={lower},upperdir={ctr / 'diff'},workdir={ctr / 'work'}"
    try:
        done = subprocess.run(
            [UNIONFS, "-o", opts, str(ctr / "merged")], capture_output=True, text=True, timeout=10
        )
    except subprocess.TimeoutExpired:
        pytest.fail("unionfs did not finish mounting within 10 s")
    assert done.returncode == 0, done.stderr
    assert (ctr / "merged" / "f").read_text() == "lower\n"


def _owners(root: Path) -> dict[str, tuple[int, int]]:
    return {n: (os.lstat(root / n).st_uid, os.lstat(root / n).st_gid) for n in NEW}


NEW = ("file", "link", "dir")


def test_a_caller_outside_the_mapping_creates_as_fuse_overlayfs_does(tmp_path: Path) -> None:
    """What podman does before a ``--uidmap 0:1:65536`` container starts: host root (outside
    the shown range 1..65536) creates /etc/mtab and friends in the merged directory."""
    shown, stored = {}, {}
    for program in (FUSE_OVERLAYFS, UNIONFS):
        base = tmp_path / os.path.basename(program)
        for d in ("lower", "upper", "work", "mnt"):
            (base / d).mkdir(parents=True)
        opts = (
            f"lowerdir={base / 'lower'},upperdir={base / 'upper'},workdir={base / 'work'},"
            "uidmapping=:0:1:65536,gidmapping=:0:1:65536"
        )
        subprocess.run([program, "-o", opts, str(base / "mnt")], check=True, timeout=30)
        try:
            mnt = base / "mnt"
            (mnt / "file").touch()
            os.symlink("target", mnt / "link")
            (mnt / "dir").mkdir()
            shown[program] = _owners(mnt)
        finally:
            subprocess.run(["fusermount3", "-u", str(base / "mnt")], check=True)
        stored[program] = _owners(base / "upper")
    assert shown[UNIONFS] == shown[FUSE_OVERLAYFS]
    assert stored[UNIONFS] == stored[FUSE_OVERLAYFS]
