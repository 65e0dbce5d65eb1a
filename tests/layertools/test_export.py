"""``unionfs export``: member order and form, metadata, and byte-for-byte determinism."""

from __future__ import annotations

import gzip
import io
import os
import stat
import tarfile
from pathlib import Path

import pytest

from layertools.conftest import needs_root
from unionfs.errors import UnionfsError
from unionfs.layertools.export import export_layer, export_to_path


def build_upper(root: Path) -> Path:
    """An upper holding every kind of entry the exporter handles."""
    root.mkdir()
    (root / "etc").mkdir()
    (root / "etc" / "passwd").write_bytes(b"root:x:0:0\n")
    os.link(root / "etc" / "passwd", root / "etc" / "passwd-")
    (root / "bin").symlink_to("usr/bin")
    os.mkfifo(root / "pipe")
    (root / "-first").write_bytes(b"sorts before .wh.")
    (root / "data").write_bytes(b"x" * 5000)
    os.setxattr(root / "data", "user.comment", b"\xffbinary\x00value")
    os.utime(root / "data", ns=(1, 1_600_000_000_123_456_789))
    os.chmod(root / "data", 0o4751)
    return root


def members(blob: bytes) -> list[tarfile.TarInfo]:
    with tarfile.open(fileobj=io.BytesIO(blob), mode="r:*") as tar:
        return tar.getmembers()


def export_bytes(upper: Path, compression: str = "none") -> tuple[bytes, str]:
    out = io.BytesIO()
    result = export_layer(upper, out, compression=compression)
    return out.getvalue(), result.digest


@needs_root
def test_members_order_and_whiteout_forms(tmp_path: Path) -> None:
    upper = build_upper(tmp_path / "upper")
    os.mknod(upper / "gone", stat.S_IFCHR | 0, os.makedev(0, 0))
    (upper / ".wh.oci-gone").write_bytes(b"")
    (upper / "opq").mkdir()
    os.setxattr(upper / "opq", "trusted.overlay.opaque", b"y")
    os.setxattr(upper / "opq", "trusted.overlay.origin", b"internal")
    (upper / "opq" / "inside").write_bytes(b"")
    blob, _ = export_bytes(upper)
    names = [m.name for m in members(blob)]
    assert names == [
        ".",
        ".wh.gone",
        ".wh.oci-gone",
        "-first",
        "bin",
        "data",
        "etc",
        "etc/passwd",
        "etc/passwd-",
        "opq",
        "opq/.wh..wh..opq",
        "opq/inside",
        "pipe",
    ]
    by_name = {m.name: m for m in members(blob)}
    assert by_name[".wh.gone"].isreg() and by_name[".wh.gone"].size == 0
    assert by_name["opq"].pax_headers.get("SCHILY.xattr.trusted.overlay.opaque") is None
    assert not any("overlay" in key for m in members(blob) for key in m.pax_headers)


def test_metadata_hardlinks_symlinks_fifos_and_xattrs(tmp_path: Path) -> None:
    upper = build_upper(tmp_path / "upper")
    blob, _ = export_bytes(upper)
    by_name = {m.name: m for m in members(blob)}
    data = by_name["data"]
    assert data.mode == 0o4751
    assert data.pax_headers["mtime"] == "1600000000.123456789"
    raw = data.pax_headers["SCHILY.xattr.user.comment"].encode("utf-8", "surrogateescape")
    assert raw == b"\xffbinary\x00value"
    assert data.uname == "" and data.gname == ""
    assert by_name["etc/passwd-"].islnk() and by_name["etc/passwd-"].linkname == "etc/passwd"
    assert by_name["bin"].issym() and by_name["bin"].linkname == "usr/bin"
    assert by_name["pipe"].isfifo()
    assert by_name["etc"].isdir()
    # The raw header of a directory carries the trailing slash Docker uses.
    assert b"etc/\x00" in blob
    assert "atime" not in data.pax_headers and "ctime" not in data.pax_headers


@pytest.mark.parametrize("compression", ["none", "gzip", "zstd"])
def test_same_upper_gives_the_same_digest(tmp_path: Path, compression: str) -> None:
    upper = build_upper(tmp_path / "upper")
    first, digest1 = export_bytes(upper, compression)
    os.utime(upper / "data", ns=(123, os.stat(upper / "data").st_mtime_ns))  # atime only
    (upper / "etc" / "passwd").read_bytes()
    second, digest2 = export_bytes(upper, compression)
    assert first == second and digest1 == digest2
    (upper / "data").write_bytes(b"y" * 5000)
    _, digest3 = export_bytes(upper, compression)
    assert digest3 != digest1


def test_gzip_has_no_name_and_zero_mtime(tmp_path: Path) -> None:
    upper = build_upper(tmp_path / "upper")
    blob, _ = export_bytes(upper, "gzip")
    assert blob[:2] == b"\x1f\x8b"
    flags, mtime = blob[3], int.from_bytes(blob[4:8], "little")
    assert flags & 0x08 == 0 and mtime == 0
    assert gzip.decompress(blob)[:512]


def test_digest_and_diff_id_are_hashes_of_the_blob_and_the_tar(tmp_path: Path) -> None:
    import hashlib

    upper = build_upper(tmp_path / "upper")
    out = tmp_path / "layer.tar.gz"
    result = export_to_path(upper, out, compression="gzip")
    blob = out.read_bytes()
    assert result.digest == "sha256:" + hashlib.sha256(blob).hexdigest()
    assert result.diff_id == "sha256:" + hashlib.sha256(gzip.decompress(blob)).hexdigest()
    assert result.media_type == "application/vnd.oci.image.layer.v1.tar+gzip"
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".partial")] == []


@needs_root
def test_redirect_dir_upper_is_refused(tmp_path: Path) -> None:
    upper = tmp_path / "upper"
    (upper / "moved").mkdir(parents=True)
    os.setxattr(upper / "moved", "trusted.overlay.redirect", b"/orig")
    with pytest.raises(UnionfsError, match="redirect"):
        export_bytes(upper)


def test_failed_export_leaves_no_output(tmp_path: Path) -> None:
    with pytest.raises(UnionfsError):
        export_to_path(tmp_path / "missing", tmp_path / "out.tar", compression="none")
    assert list(tmp_path.iterdir()) == []


def test_kept_oci_whiteout_beside_a_directory_exports_it_opaque(tmp_path: Path) -> None:
    upper = tmp_path / "upper"
    (upper / "d").mkdir(parents=True)
    (upper / ".wh.d").write_bytes(b"")
    (upper / "d" / "f").write_bytes(b"")
    names = [m.name for m in members(export_bytes(upper)[0])]
    assert names == [".", "d", "d/.wh..wh..opq", "d/f"]
