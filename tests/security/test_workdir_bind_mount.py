"""Issue 13 item 5: the clean-up of ``work/`` at mount time never crosses into another mount.

A host user (or a leftover of some tool) has a bind mount of a directory outside every layer
inside ``workdir/work``, and a symlink to it. The kernel's overlay leaves the bind mount's
contents alone -- it cleans up through the upper filesystem's own dentries -- and, unable to
recreate ``work/``, mounts read-only. unionfs leaves the bind mount (and what is below it) in
place with a warning, removes the symlink itself without following it, and empties the rest;
when ``work/`` itself is the mount point, nothing in it is removed. In every case the canary
tree keeps its content, mode, owner, times and xattrs. Like the kernel, the mount is then
read-only, and nothing is written into such a ``work/`` (not even the mknod probe).
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.conftest import Union
from tests.layertools.canary import canary_state, make_canary

pytestmark = [
    pytest.mark.mount,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for bind mounts"),
]


@contextmanager
def bind(source: Path, target: Path) -> Iterator[None]:
    """``mount --bind source target``, always unmounted afterwards."""
    subprocess.run(["mount", "--bind", str(source), str(target)], check=True)
    try:
        yield
    finally:
        subprocess.run(["umount", str(target)], check=True)


def is_mount(path: Path) -> bool:
    """True when ``path`` is a mount point (a bind of the same filesystem included)."""
    return subprocess.run(["mountpoint", "-q", str(path)], check=False).returncode == 0


def leftovers(work: Path, canary: Path) -> None:
    """``work/``: a mount point, a symlink to the canary, and a stale copy-up tree."""
    (work / "bm").mkdir(parents=True)
    (work / "#unionfs-stale" / "sub").mkdir(parents=True)
    (work / "#unionfs-stale" / "sub" / "f").write_text("half-built copy-up\n")
    (work / "link").symlink_to(canary / "dir")


def test_bind_mount_in_work_keeps_its_contents_at_mount(
    union: Callable[[int], Union], tmp_path: Path
) -> None:
    canary = make_canary(tmp_path / "outside")
    before = canary_state(canary)
    u = union(1)
    (u.lowers[0] / "a").write_text("lower\n")
    work = u.work / "work"
    leftovers(work, canary)
    with bind(canary, work / "bm"):
        with u.mount():
            assert is_mount(work / "bm")
            assert sorted(os.listdir(work)) == ["bm"]  # the stale tree and the link are gone
            # As on the kernel's overlay, the mount is read-only: nothing can be built there.
            assert (u.mnt / "a").read_text() == "lower\n"
            assert sorted(os.listdir(canary)) == ["dir", "secret"]
        assert "left 'bm' in place" in u.log()
        assert canary_state(canary) == before
    assert canary_state(canary) == before


def test_kernel_overlay_leaves_the_bind_mount_alone_too(tmp_path: Path) -> None:
    """The oracle: the kernel does not touch the bind mount and mounts read-only."""
    canary = make_canary(tmp_path / "outside")
    before = canary_state(canary)
    for name in ("lower", "upper", "workdir", "mnt"):
        (tmp_path / name).mkdir()
    work = tmp_path / "workdir" / "work"
    leftovers(work, canary)
    with bind(canary, work / "bm"):
        options = f"lowerdir={tmp_path}/lower,upperdir={tmp_path}/upper,workdir={tmp_path}/workdir"
        mnt = tmp_path / "mnt"
        subprocess.run(["mount", "-t", "overlay", "overlay", "-o", options, str(mnt)], check=True)
        try:
            found = subprocess.run(
                ["findmnt", "-no", "OPTIONS", str(mnt)], capture_output=True, text=True
            )
            assert "ro" in found.stdout.strip().split(",")
            assert is_mount(work / "bm")
        finally:
            subprocess.run(["umount", str(mnt)], check=True)
        assert canary_state(canary) == before
    assert not os.path.lexists(work / "link")  # a symlink is removed, never followed
    assert canary_state(canary) == before


def test_mount_is_read_only_like_the_kernel_when_work_cannot_be_emptied(
    union: Callable[[int], Union], tmp_path: Path
) -> None:
    canary = make_canary(tmp_path / "outside")
    before = canary_state(canary)
    u = union(1)
    leftovers(u.work / "work", canary)
    try:
        with bind(canary, u.work / "work" / "bm"), u.mount():
            with pytest.raises(OSError) as exc:
                (u.mnt / "new").write_text("x")
            assert exc.value.errno == 30  # EROFS
    finally:
        assert canary_state(canary) == before


def below_root(state: dict[str, tuple[object, ...]]) -> dict[str, tuple[object, ...]]:
    return {path: st for path, st in state.items() if path != "."}


def test_bind_mount_on_work_itself_keeps_its_contents(
    union: Callable[[int], Union], tmp_path: Path
) -> None:
    """``workdir/work`` is itself the mount point: nothing in it belongs to this mount."""
    canary = make_canary(tmp_path / "outside")
    before = canary_state(canary)
    u = union(1)
    (u.work / "work").mkdir()
    with bind(canary, u.work / "work"):
        with u.mount():
            assert sorted(os.listdir(canary)) == ["dir", "secret"]
        assert "another filesystem is mounted on it" in u.log()
        assert below_root(canary_state(canary)) == below_root(before)


def test_bind_mount_on_work_itself_is_not_written_at_all(
    union: Callable[[int], Union], tmp_path: Path
) -> None:
    canary = make_canary(tmp_path / "outside")
    before = canary_state(canary)
    u = union(1)
    (u.work / "work").mkdir()
    with bind(canary, u.work / "work"):
        with u.mount():
            pass
        assert canary_state(canary) == before
