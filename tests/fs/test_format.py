"""The on-disk format in-process, without FUSE: every marker kind is read as written, names
are escaped both ways, and an origin handle decodes back to its object."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from unionfs import fdops, format


@pytest.fixture
def layer(tmp_path: Path) -> tuple[Path, int]:
    d = tmp_path / "layer"
    d.mkdir()
    fd = fdops.open_dir_at(-1, str(d))
    yield d, fd
    os.close(fd)


def test_every_marker_kind_is_classified(layer: tuple[Path, int]) -> None:
    d, fd = layer
    (d / "dir").mkdir()
    (d / "file").write_text("x")
    format.make_whiteout(fd, b"chr")
    format.make_whiteout(fd, b"oci", oci_fallback=True)
    assert format.classify_at(fd, b"dir") is format.Found.DIR
    assert format.classify_at(fd, b"file") is format.Found.OTHER
    assert format.classify_at(fd, b"chr") is format.Found.CHARDEV_WHITEOUT
    assert format.classify_at(fd, b"oci") is format.Found.OCI_WHITEOUT
    assert format.classify_at(fd, b"nothing") is None
    assert format.classify_at(fd, b"x" * 252) is None  # no marker can have that name
    # An empty file with the whiteout xattr counts only in a directory marked "x".
    (d / "xwh").write_bytes(b"")
    os.setxattr(d / "xwh", format.WHITEOUT_XATTRS[0], b"")
    assert format.classify_at(fd, b"xwh") is format.Found.OTHER
    os.setxattr(fd, format.OPAQUE_XATTRS[0], format.OPAQUE_XWHITEOUTS)
    assert format.classify_at(fd, b"xwh") is format.Found.XATTR_WHITEOUT
    assert {f.value for f in format.Found if f.is_whiteout} == {
        "whiteout (char 0/0)",
        "whiteout (xattr)",
        "whiteout (.wh.)",
    }


def test_scan_reports_markers_as_the_names_they_hide(layer: tuple[Path, int]) -> None:
    d, fd = layer
    (d / "sub").mkdir()
    (d / "plain").write_text("x")
    format.make_whiteout(fd, b"gone")
    format.make_whiteout(fd, b"also", oci_fallback=True)
    (d / ".wh.").write_text("")  # hides nothing
    (d / ".wh..wh..opq").write_text("")
    got = sorted(format.scan_layer_dir(fd))
    assert got == [
        (b".wh..wh..opq", False, True),
        (b"also", False, True),
        (b"gone", False, True),
        (b"plain", False, False),
        (b"sub", True, False),
    ]
    assert format.is_opaque_dir(fd)
    assert format.check_opaque(fd)[0]


def test_opaque_and_upper_hiders(layer: tuple[Path, int]) -> None:
    d, fd = layer
    assert not format.is_opaque_dir(fd)
    format.mark_opaque(fd)
    assert format.opaque_value(fd) == format.OPAQUE_YES and format.is_opaque_dir(fd)
    assert format.check_opaque(fd) == (True, None)  # the xattr answers without a listing
    format.make_whiteout(fd, b"w")
    format.make_whiteout(fd, b"o", oci_fallback=True)
    assert format.upper_hider(fd, b"w") is format.Found.CHARDEV_WHITEOUT
    assert format.upper_hider(fd, b"o") is format.Found.OCI_WHITEOUT
    assert format.upper_hider(fd, b"free") is None


@pytest.mark.parametrize("userxattr", [False, True])
def test_xattr_names_are_escaped_both_ways(userxattr: bool) -> None:
    own = b"user.overlay." if userxattr else b"trusted.overlay."
    stored = format.xattr_layer_name(own + b"foo", userxattr)
    assert stored == own + b"overlay.foo"
    assert format.xattr_mount_name(stored, userxattr) == own + b"foo"
    assert format.xattr_mount_name(own + b"origin", userxattr) is None  # private
    other = b"trusted.overlay." if userxattr else b"user.overlay."
    for reserved in (other + b"opaque", other + b"whiteout", b"user.unionfs.x"):
        assert format.xattr_layer_name(reserved, userxattr) is None  # refused by the mount
        assert format.xattr_mount_name(reserved, userxattr) is None  # never shown
    assert format.xattr_layer_name(b"user.plain", userxattr) == b"user.plain"
    with pytest.raises(OSError) as exc:
        format.xattr_layer_name(own + b"x" * 250, userxattr)
    assert exc.value.errno == errno.EOPNOTSUPP


def test_origin_round_trip(layer: tuple[Path, int]) -> None:
    d, fd = layer
    (d / "f").write_text("x")
    raw = format.encode_origin(fd, b"f")
    if raw is None:
        pytest.skip("this filesystem makes no file handles")
    decoded = format.decode_origin(raw)
    assert decoded is not None
    uuid, htype, fid = decoded
    assert uuid == fdops.fs_uuid(fd)
    opened = fdops.open_by_handle_at(fd, htype, fid)
    try:
        assert os.fstat(opened).st_ino == os.stat(d / "f").st_ino
    finally:
        os.close(opened)
    assert format.decode_origin(raw[:-1]) is None  # wrong length
    assert format.decode_origin(b"\x00\xfa" + raw[2:]) is None  # wrong magic
    # What a copy-up writes is what resolution reads back.
    (d / "copy").write_text("x")
    names = format.XattrNames.for_mode(False)
    format.set_origin(fdops.at_path(fd, b"copy"), names.origin, raw)
    recorded = format.read_origin_xattr(fd, b"copy", names)
    assert recorded == format.OriginXattr(handle=raw)
    assert format.read_origin_xattr(fd, b"f", names) is None


def test_impure_mark_is_written_once(layer: tuple[Path, int]) -> None:
    _, fd = layer
    attr = format.IMPURE_XATTRS[0]
    format.mark_impure(fd, attr)
    assert os.getxattr(fd, attr) == b"y"
    format.mark_impure(fd, attr)  # already marked: no second write
    assert os.getxattr(fd, attr) == b"y"
