"""The merged directory index over real layer directories, without FUSE."""

from __future__ import annotations

import os
from pathlib import Path

from unionfs.fdops import DIR_OPEN_FLAGS
from unionfs.format import scan_layer_dir
from unionfs.fs.listing import build_index


def _index(*dirs: Path):
    fds = [os.open(d, DIR_OPEN_FLAGS) for d in dirs]
    try:
        return build_index(list(enumerate(fds)))
    finally:
        for fd in fds:
            os.close(fd)


def test_merge_rules(tmp_path: Path) -> None:
    top, mid, bot = (tmp_path / n for n in ("top", "mid", "bot"))
    for d in (top, mid, bot):
        d.mkdir()
    (bot / "file").write_text("bottom")
    (mid / "file").write_text("middle")  # hides bottom
    (bot / "gone").write_text("x")
    os.mknod(mid / "gone", 0o020000, os.makedev(0, 0))  # char 0/0 whiteout
    (bot / "oci").write_text("x")
    (top / ".wh.oci").write_text("")  # OCI whiteout
    (top / "d").mkdir()
    (mid / "d").mkdir()
    (bot / "d").mkdir()
    (bot / "shadowed").mkdir()
    (mid / "shadowed").write_text("file over dir")
    (top / ".wh.").write_text("")  # invalid marker: hidden, hides nothing
    idx = _index(top, mid, bot)
    assert idx.get(b"file") == (False, (1,), True)
    assert idx.get(b"gone") is None
    assert idx.get(b"oci") is None
    assert idx.get(b"d") == (True, (0, 1, 2), False)
    assert idx.get(b"shadowed") == (False, (1,), True)
    assert sorted(idx.names()) == [b"d", b"file", b"shadowed"]


def test_whiteout_ends_directory_chain(tmp_path: Path) -> None:
    a, b, c = (tmp_path / n for n in "abc")
    for d in (a, b, c):
        d.mkdir()
    (a / "d").mkdir()
    os.mknod(b / "d", 0o020000, os.makedev(0, 0))
    (c / "d").mkdir()
    assert _index(a, b, c).get(b"d") == (True, (0,), False)


def test_hard_linked_whiteouts_and_xattr_whiteouts(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    os.mknod(a / "w1", 0o020000, os.makedev(0, 0))
    os.link(a / "w1", a / "w2")
    (b / "w1").write_text("x")
    (b / "w2").write_text("x")
    (a / "xw").write_text("")
    os.setxattr(a / "xw", "trusted.overlay.whiteout", b"y")
    (b / "xw").write_text("lower")
    # Without the "x" opaque marker on the directory, the xattr whiteout is a plain file.
    assert _index(a, b).get(b"xw") == (False, (0,), True)
    os.setxattr(a, "trusted.overlay.opaque", b"x")
    idx = _index(a, b)
    assert idx.get(b"xw") is None
    assert idx.get(b"w1") is None and idx.get(b"w2") is None


def test_listing_a_directory_leaves_no_descriptor_behind(tmp_path: Path) -> None:
    # os.scandir(fd) reads through a duplicate of its own: an extra dup here leaked one
    # descriptor per directory indexed, until the daemon ran out.
    for i in range(3):
        (tmp_path / f"f{i}").write_text("x")
    fd = os.open(tmp_path, DIR_OPEN_FLAGS)
    try:
        before = len(os.listdir("/proc/self/fd"))
        for _ in range(50):
            assert sorted(n for n, _, _ in scan_layer_dir(fd)) == [b"f0", b"f1", b"f2"]
        assert len(os.listdir("/proc/self/fd")) == before
    finally:
        os.close(fd)
