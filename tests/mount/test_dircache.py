"""The kernel's readdir cache (FOPEN_CACHE_DIR): used when nothing changed, dropped on change.

Every directory is listed before each change so that its listing sits in the kernel's cache,
and again after it. The listings must match a kernel overlayfs mount of a copy of the same
layers, given the same changes.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pyfuse3
import pytest

from tests.conftest import Union, whiteout, write
from tests.oracle.backends import KernelOverlay, copy_tree

pytestmark = pytest.mark.mount


def requests(mnt: str | Path) -> dict[str, int]:
    stats = json.loads(os.getxattr(mnt, "user.unionfs.stats"))
    return stats["requests"]  # type: ignore[no-any-return]


def build(root: Path) -> None:
    top, bottom = root / "l0", root / "l1"
    write(bottom / "d/a", "a")
    write(bottom / "d/b", "b")
    write(bottom / "d/sub/x", "x")
    write(bottom / "e/gone", "g")
    write(bottom / "opq/old", "old")
    write(top / "d/c", "c")
    (top / "e").mkdir()
    whiteout(top / "e/gone")
    (top / "opq").mkdir()
    os.setxattr(top / "opq", "trusted.overlay.opaque", b"y")
    write(top / "opq/new", "new")
    (top / "empty").mkdir()


def listing(mnt: Path) -> dict[str, list[tuple[str, bool]]]:
    """Every directory's entries (name, is_dir), read with getdents like ls."""
    out: dict[str, list[tuple[str, bool]]] = {}

    def walk(rel: str) -> None:
        with os.scandir(mnt / rel) as it:
            entries = sorted((e.name, e.is_dir(follow_symlinks=False)) for e in it)
        out[rel] = entries
        for name, is_dir in entries:
            if is_dir:
                walk(os.path.join(rel, name))

    walk(".")
    return out


CHANGES: list[tuple[str, Callable[[Path], None]]] = [
    ("create", lambda m: write(m / "d/new", "n")),
    ("mkdir", lambda m: (m / "empty/sub").mkdir()),
    ("mknod fifo", lambda m: os.mkfifo(m / "d/fifo")),
    ("symlink", lambda m: os.symlink("a", m / "d/link")),
    ("link", lambda m: os.link(m / "d/c", m / "e/c-link")),
    ("unlink lower", lambda m: os.unlink(m / "d/a")),
    ("unlink upper", lambda m: os.unlink(m / "d/new")),
    ("rmdir", lambda m: os.rmdir(m / "empty/sub")),
    ("rename in dir", lambda m: os.rename(m / "d/b", m / "d/b2")),
    ("rename across dirs", lambda m: os.rename(m / "d/c", m / "opq/c")),
    ("rename over", lambda m: os.rename(m / "opq/new", m / "opq/old-name")),
    ("recreate deleted", lambda m: write(m / "d/a", "again")),
    ("rmdir lower subtree", lambda m: (os.unlink(m / "d/sub/x"), os.rmdir(m / "d/sub"))),
    ("mkdir over whiteout", lambda m: (m / "d/sub").mkdir()),
    ("copy-up only", lambda m: os.chmod(m / "e", 0o700)),
]


@pytest.fixture
def pair(union: Callable[[int], Union], tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    u = union(2)
    build(u.root)
    kroot = tmp_path / "kernel"
    kroot.mkdir()
    for name in ("l0", "l1"):
        copy_tree(u.root / name, kroot / name)
    (kroot / "upper").mkdir()
    (kroot / "work").mkdir()
    kernel = KernelOverlay()
    with (
        u.mount() as ours,
        kernel.mount(
            [kroot / "l0", kroot / "l1"], kroot / "upper", kroot / "work", kroot / "mnt"
        ) as theirs,
    ):
        yield Path(ours), theirs


def test_the_installed_pyfuse3_can_cache_listings() -> None:
    # scripts/install.sh builds pyfuse3 with third_party/pyfuse3/opendir-fileinfo.patch.
    assert pyfuse3.FileInfo(cache_readdir=True).cache_readdir


def test_an_unchanged_directory_is_listed_from_the_kernel_cache(pair: tuple[Path, Path]) -> None:
    ours, _ = pair
    first = listing(ours)
    before = requests(ours)
    for _ in range(3):
        assert listing(ours) == first
    after = requests(ours)
    assert after.get("readdir", 0) == before.get("readdir", 0)
    # opendir still reaches the daemon: only the listing itself is cached.
    assert after["opendir"] > before["opendir"]


def test_every_change_shows_in_the_next_listing(pair: tuple[Path, Path]) -> None:
    ours, theirs = pair
    assert listing(ours) == listing(theirs)
    for what, change in CHANGES:
        listing(ours)  # fill the cache
        listing(theirs)
        change(ours)
        change(theirs)
        assert listing(ours) == listing(theirs), f"after {what}"


def test_no_cache_with_timeout_zero(union: Callable[[int], Union]) -> None:
    u = union(2)
    build(u.root)
    with u.mount("timeout=0") as m:
        listing(Path(m))
        before = requests(m)
        listing(Path(m))
        assert requests(m)["readdir"] > before["readdir"]
