"""Layer paths as containers-storage builds them, mounted by unionfs directly.

Podman 4.3 (containers-storage 1.43), running a container with ``--uidmap`` or
``--userns=auto`` on a kernel that can idmap mounts, bind-mounts (idmapped) the storage's
``overlay`` directory at ``overlay/<layer>/mapped/0`` -- inside itself -- and passes the lower
layers through that mount to the mount program. Walking ``..`` up from such a layer meets the
same directory twice.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.containers.podenv import UNIONFS

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


@pytest.mark.xfail(
    strict=True,
    reason="bugs.md [podman] config.py: the layer-overlap check loops forever on a layer "
    "reached through a bind mount of its own ancestor",
)
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
