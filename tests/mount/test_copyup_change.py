"""A chmod, utimes or ``O_TRUNC`` open of a lower file is folded into its copy-up.

The result must be what the kernel gives for a copy-up followed by the change.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import Union, write
from tests.oracle.backends import KernelOverlay, copy_tree

pytestmark = pytest.mark.mount

OLD_NS = 1_000_000_000 * 1_000_000_000  # 2001-09-09: far from "now"


def build(layer: Path) -> None:
    for name in ("chmod", "suid", "utime", "atime", "trunc0", "trunc10", "grow", "otrunc"):
        f = write(layer / name, b"0123456789" * 50, mode=0o644)
        os.utime(f, ns=(OLD_NS, OLD_NS))


CHANGES: list[tuple[str, Callable[[Path], None]]] = [
    ("chmod", lambda f: os.chmod(f, 0o600)),
    ("suid", lambda f: os.chmod(f, 0o4755)),
    ("utime", lambda f: os.utime(f, ns=(5, 7))),
    ("atime", lambda f: os.utime(f, ns=(5, OLD_NS))),
    ("trunc0", lambda f: os.truncate(f, 0)),
    ("trunc10", lambda f: os.truncate(f, 10)),
    ("grow", lambda f: os.truncate(f, 70_000)),
    ("otrunc", lambda f: os.close(os.open(f, os.O_WRONLY | os.O_TRUNC))),
]


def summary(f: Path) -> tuple[object, ...]:
    st = os.lstat(f)
    recent = st.st_mtime_ns > OLD_NS  # "now": the exact instant differs between the mounts
    mtime = "now" if recent else st.st_mtime_ns
    return (stat.filemode(st.st_mode), st.st_uid, st.st_size, mtime, f.read_bytes())


@pytest.fixture
def pair(union: Callable[[int], Union], tmp_path: Path) -> Iterator[tuple[Path, Path, Union]]:
    u = union(1)
    build(u.lowers[0])
    kroot = tmp_path / "kernel"
    kroot.mkdir()
    copy_tree(u.lowers[0], kroot / "l0")
    (kroot / "upper").mkdir()
    (kroot / "work").mkdir()
    with (
        u.mount() as ours,
        KernelOverlay().mount(
            [kroot / "l0"], kroot / "upper", kroot / "work", kroot / "mnt"
        ) as theirs,
    ):
        yield Path(ours), theirs, u


def test_changes_folded_into_copy_up_match_the_kernel(pair: tuple[Path, Path, Union]) -> None:
    ours, theirs, u = pair
    for name, change in CHANGES:
        change(ours / name)
        change(theirs / name)
        assert summary(ours / name) == summary(theirs / name), name
        # What is on disk in the upper, as the kernel would read it after a remount.
        assert summary(u.upper / name) == summary(theirs / name), name
    stats = json.loads(os.getxattr(ours, "user.unionfs.stats"))
    assert stats["copy_ups"] == len(CHANGES)
    # Only the O_TRUNC open copied no data. truncate(2) reaches the daemon as a size change
    # without a time (the file system sets mtime itself), so it is copied, then truncated.
    assert stats["copy_up_bytes"] == 7 * 500


def test_chown_is_not_folded(pair: tuple[Path, Path, Union]) -> None:
    ours, theirs, _ = pair
    for root in (ours, theirs):
        os.chmod(root / "suid", 0o6755)  # copy-up, with set-id bits
        os.chown(root / "suid", 65534, 65534)  # clears them
        os.chown(root / "chmod", 65534, -1)  # copy-up and chown in one request
    for name in ("suid", "chmod"):
        assert summary(ours / name) == summary(theirs / name), name
