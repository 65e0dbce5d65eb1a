"""Real mounts: the merged view and the upper after reads and writes, against the kernel."""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import Union, write
from tests.mount.semantics_common import (
    _no_stray_mounts,
    kernel_mount,
    recreate_ops,
    sample_layers,
    snapshot,
    twin,
    write_ops,
)

__all__ = ["_no_stray_mounts"]  # an autouse fixture, used by name

pytestmark = pytest.mark.mount


def test_read_view_matches_kernel(union: Callable[[int], Union]) -> None:
    a, b = twin(union, sample_layers)
    with a.mount(upper=False) as m, kernel_mount(b.lowers, b.mnt, None, None) as k:
        assert snapshot(m) == snapshot(k)
        assert (Path(m) / "etc/motd").read_text() == "app motd"
        assert not (Path(m) / "etc/gone").exists()
        assert sorted(os.listdir(Path(m) / "opt/app")) == ["c"]
        with pytest.raises(OSError) as exc:
            (Path(m) / "new").write_text("x")
        assert exc.value.errno == errno.EROFS


def test_write_ops_match_kernel_view_and_upper(union: Callable[[int], Union]) -> None:
    a, b = twin(union, sample_layers)
    with a.mount() as m:
        write_ops(Path(m))
        mine = snapshot(m)
    with kernel_mount(b.lowers, b.mnt, b.upper, b.work) as k:
        write_ops(Path(k))
        theirs = snapshot(k)
    assert mine == theirs
    assert snapshot(a.upper, upper=True) == snapshot(b.upper, upper=True)
    # Interop both ways: each upper mounts under the other implementation with the same view.
    with kernel_mount(a.lowers, a.mnt, a.upper, a.work) as k:
        assert snapshot(k) == mine
    with b.mount() as m:
        assert snapshot(m) == theirs
    assert os.listdir(a.work / "work") == []


def test_lowers_never_written(union: Callable[[int], Union]) -> None:
    u = union(2)
    sample_layers(u)
    # Our own walk reads the lower directories once; relatime then keeps their atime still.
    paths = list(u.lowers[1].rglob("*"))
    before = {p: os.lstat(p) for p in paths}
    with u.mount() as m:
        write_ops(Path(m))
        for p in Path(m).rglob("*"):
            if p.is_file() and not p.is_symlink() and not stat.S_ISFIFO(p.lstat().st_mode):
                p.read_bytes()
    after = {p: os.lstat(p) for p in u.lowers[1].rglob("*")}
    assert before.keys() == after.keys()
    for p, st in before.items():
        st2 = after[p]
        assert (st.st_mtime_ns, st.st_atime_ns, st.st_size) == (
            st2.st_mtime_ns,
            st2.st_atime_ns,
            st2.st_size,
        ), p


def test_delete_and_recreate_regressions(union: Callable[[int], Union]) -> None:
    def build(u: Union) -> None:
        write(u.lowers[1] / "d/a", "a")
        write(u.lowers[0] / "d/b", "b")
        write(u.lowers[1] / "n/e/f", "f")
        write(u.lowers[0] / "n/e/h", "h")
        write(u.lowers[1] / "x", "x")

    a, b = twin(union, build)
    with a.mount() as m:
        recreate_ops(Path(m))
        mine = snapshot(m)
    assert sorted(mine) == sorted(["d", "n", "n/e", "x", "y"]), (
        "entries of deleted lower directories reappeared"
    )
    with kernel_mount(b.lowers, b.mnt, b.upper, b.work) as k:
        recreate_ops(Path(k))
        assert snapshot(k) == mine
    assert snapshot(a.upper, upper=True) == snapshot(b.upper, upper=True)
    with a.mount() as m:
        assert snapshot(m) == mine  # and after a remount


def test_failed_rename_into_a_merged_dir_marks_the_source_opaque(
    union: Callable[[int], Union],
) -> None:
    # Found by the long differential run: the kernel marks an upper directory moved into a
    # merged parent opaque before rename(2) finds a pure-upper destination not empty, and
    # leaves the mark when the rename fails.
    def build(u: Union) -> None:
        write(u.lowers[0] / "m/lower", "l")  # m: merged once the upper holds it too
        write(u.upper / "m/up/x", "x")
        write(u.upper / "m/full/y", "y")
        write(u.upper / "p/src/z", "z")  # a pure-upper directory in a pure-upper parent

    a, b = twin(union, build)

    def ops(root: Path) -> None:
        for src in ("m/up", "p/src"):
            with pytest.raises(OSError) as exc:
                os.rename(root / src, root / "m/full")
            assert exc.value.errno == errno.ENOTEMPTY

    with a.mount() as m:
        ops(Path(m))
        mine = snapshot(m)
    with kernel_mount(b.lowers, b.mnt, b.upper, b.work) as k:
        ops(Path(k))
        assert snapshot(k) == mine
    assert snapshot(a.upper, upper=True) == snapshot(b.upper, upper=True)
    assert os.getxattr(a.upper / "m/up", "trusted.overlay.opaque") == b"y"
