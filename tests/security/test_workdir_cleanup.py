"""Issue 13 items 5 and 12 at the level of :func:`unionfs.fs.workdir.remove_tree_at`.

The walk that empties ``work/`` (and removes failed copy-ups) never follows a symlink, never
enters another mount -- not even a bind mount of the same filesystem, deep inside the tree --
and has no depth limit. The canary tree keeps its content, mode, owner, times and xattrs.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.layertools.canary import canary_state, make_canary
from unionfs.fs import workdir

DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW


def deep_chain(top: Path, depth: int) -> None:
    """``top/d/d/...`` ``depth`` levels, a file at each level, made through descriptors."""
    fd = os.open(top, DIR_FLAGS)
    try:
        for _ in range(depth):
            os.close(os.open("f", os.O_CREAT | os.O_WRONLY, 0o600, dir_fd=fd))
            os.mkdir("d", dir_fd=fd)
            child = os.open("d", DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = child
    finally:
        os.close(fd)


def test_removes_a_tree_far_deeper_than_the_recursion_limit(tmp_path: Path) -> None:
    (tmp_path / "t").mkdir()
    deep_chain(tmp_path / "t", 2500)
    fd = os.open(tmp_path, DIR_FLAGS)
    try:
        assert workdir.remove_tree_at(fd, b"t") is True
    finally:
        os.close(fd)
    assert os.listdir(tmp_path) == []


def test_symlinks_are_removed_never_followed(tmp_path: Path) -> None:
    canary = make_canary(tmp_path / "outside")
    before = canary_state(canary)
    work = tmp_path / "work"
    (work / "a" / "b").mkdir(parents=True)
    (work / "a" / "b" / "to-dir").symlink_to(canary / "dir")
    (work / "a" / "to-file").symlink_to(canary / "secret")
    (work / "top-link").symlink_to(canary)
    fd = os.open(work, DIR_FLAGS)
    try:
        assert workdir.clean_workdir(fd) == 2
    finally:
        os.close(fd)
    assert os.listdir(work) == []
    assert canary_state(canary) == before


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root for bind mounts")
def test_a_bind_mount_deep_inside_is_left_with_its_ancestors(tmp_path: Path) -> None:
    canary = make_canary(tmp_path / "outside")
    before = canary_state(canary)
    work = tmp_path / "work"
    (work / "x" / "y" / "mnt").mkdir(parents=True)
    (work / "x" / "y" / "stale").write_text("gone\n")
    (work / "x" / "sibling" / "z").mkdir(parents=True)
    (work / "other").mkdir()
    subprocess.run(["mount", "--bind", str(canary), str(work / "x/y/mnt")], check=True)
    try:
        kept: list[bytes] = []
        fd = os.open(work, DIR_FLAGS)
        try:
            assert workdir.clean_workdir(fd, kept) == 1  # "other"
        finally:
            os.close(fd)
        assert kept == [b"x"]
        # Only the path to the mount point is left; everything else is gone.
        assert os.listdir(work) == ["x"]
        assert os.listdir(work / "x") == ["y"]
        assert os.listdir(work / "x" / "y") == ["mnt"]
        assert canary_state(canary) == before
    finally:
        subprocess.run(["umount", str(work / "x/y/mnt")], check=True)
    assert canary_state(canary) == before
