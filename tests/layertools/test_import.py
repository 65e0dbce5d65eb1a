"""``unionfs import`` of layers built by hand with tarfile, checked through the kernel overlayfs."""

from __future__ import annotations

import gzip
import os
import stat
import tarfile
from pathlib import Path

import pytest
import zstandard

from layertools.conftest import TarBuilder, needs_kernel_overlay, needs_root
from unionfs.errors import UnionfsError
from unionfs.layertools.importer import import_layer


def base_layer(path: Path) -> Path:
    return (
        TarBuilder()
        .dir("etc/")
        .file("etc/passwd", b"root:x:0:0\n")
        .file("etc/group", b"root:x:0:\n")
        .dir("var/")
        .dir("var/cache/")
        .file("var/cache/a", b"a")
        .file("var/cache/b", b"b")
        .dir("usr/")
        .dir("usr/bin/")
        .file("usr/bin/tool", b"#!/bin/sh\n", mode=0o755)
        .symlink("bin", "usr/bin")
        .file("old", b"old")
        .write(path)
    )


def top_layer(path: Path) -> Path:
    """Deletes etc/group and old, empties var/cache, replaces usr/bin/tool, adds hard links."""
    return (
        TarBuilder()
        .dir("etc/")
        .whiteout("etc/.wh.group")
        .whiteout(".wh.old")
        .dir("var/cache/")
        .whiteout("var/cache/.wh..wh..opq")
        .file("var/cache/c", b"c")
        .file("usr/bin/tool", b"v2", mode=0o700)  # parent dirs only implied
        .file("new", b"new", uid=1000, gid=1000)
        .hardlink("new-link", "new")
        .write(path)
    )


def merged_files(root: Path) -> dict[str, bytes | str]:
    """Regular files (content) and symlinks (target) of a merged tree, by relative path."""
    found: dict[str, bytes | str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in filenames + dirnames:
            path = Path(dirpath) / name
            rel = str(path.relative_to(root))
            if path.is_symlink():
                found[rel] = os.readlink(path)
            elif path.is_file():
                found[rel] = path.read_bytes()
    return found


@needs_root
def test_markers_become_kernel_whiteouts_and_opaque_xattrs(tmp_path: Path) -> None:
    layer = import_layer(str(top_layer(tmp_path / "top.tar")), tmp_path / "top")
    top = tmp_path / "top"
    st = os.lstat(top / "etc" / "group")
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == 0
    assert stat.S_ISCHR(os.lstat(top / "old").st_mode)
    assert os.getxattr(top / "var" / "cache", "trusted.overlay.opaque") == b"y"
    assert not any(name.startswith(".wh.") for _, d, f in os.walk(top) for name in d + f)
    assert (layer.whiteouts, layer.opaque_dirs) == (2, 1)
    assert os.stat(top / "new").st_ino == os.stat(top / "new-link").st_ino
    assert (os.stat(top / "new").st_uid, os.stat(top / "new").st_gid) == (1000, 1000)
    assert stat.S_IMODE(os.stat(top / "usr" / "bin" / "tool").st_mode) == 0o700
    assert stat.S_IMODE(os.stat(top / "usr").st_mode) == 0o755  # implied parent
    assert os.stat(top / "etc").st_mtime_ns == 1_600_000_000 * 10**9


@needs_kernel_overlay
def test_imported_stack_mounts_to_the_oci_result(tmp_path: Path, mount_overlay) -> None:  # type: ignore[no-untyped-def]
    import_layer(str(base_layer(tmp_path / "base.tar")), tmp_path / "base")
    import_layer(str(top_layer(tmp_path / "top.tar")), tmp_path / "top")
    with mount_overlay([tmp_path / "top", tmp_path / "base"]) as mnt:
        view = merged_files(mnt)
        dirs = sorted(
            str(p.relative_to(mnt)) for p in mnt.rglob("*") if p.is_dir() and not p.is_symlink()
        )
    # What applying the two layers with the OCI rules gives, written out by hand.
    assert view == {
        "etc/passwd": b"root:x:0:0\n",
        "var/cache/c": b"c",
        "usr/bin/tool": b"v2",
        "bin": "usr/bin",
        "new": b"new",
        "new-link": b"new",
    }
    assert dirs == ["etc", "usr", "usr/bin", "var", "var/cache"]


@needs_root
def test_keep_oci_whiteouts_leaves_the_markers(tmp_path: Path) -> None:
    import_layer(str(top_layer(tmp_path / "top.tar")), tmp_path / "top", keep_oci_whiteouts=True)
    top = tmp_path / "top"
    assert (top / "etc" / ".wh.group").is_file()
    assert (top / "var" / "cache" / ".wh..wh..opq").is_file()
    assert not (top / "etc" / "group").exists()
    with pytest.raises(OSError):
        os.getxattr(top / "var" / "cache", "trusted.overlay.opaque")


@needs_root
@pytest.mark.parametrize("compression", ["gzip", "zstd"])
def test_compressed_layers_are_recognised_by_content(tmp_path: Path, compression: str) -> None:
    raw = base_layer(tmp_path / "base.tar").read_bytes()
    packed = gzip.compress(raw) if compression == "gzip" else zstandard.compress(raw)
    source = tmp_path / "layer.bin"
    source.write_bytes(packed)
    result = import_layer(str(source), tmp_path / "out")
    assert (tmp_path / "out" / "etc" / "passwd").read_bytes() == b"root:x:0:0\n"
    import hashlib

    assert result.diff_id == "sha256:" + hashlib.sha256(raw).hexdigest()
    assert result.digest == "sha256:" + hashlib.sha256(packed).hexdigest()


@needs_root
def test_whiteout_and_entry_of_the_same_name_in_one_layer(tmp_path: Path) -> None:
    # The spec: a whiteout hides only lower layers. A directory of the same name in the same
    # layer stays, and must not merge with the lower one: it becomes opaque.
    path = (
        TarBuilder()
        .whiteout(".wh.d")
        .dir("d/")
        .file("d/mine", b"")
        .file("f", b"kept")
        .whiteout(".wh.f")
        .write(tmp_path / "l.tar")
    )
    import_layer(str(path), tmp_path / "out")
    assert os.getxattr(tmp_path / "out" / "d", "trusted.overlay.opaque") == b"y"
    assert (tmp_path / "out" / "f").read_bytes() == b"kept"


def test_duplicate_entries_last_wins(tmp_path: Path) -> None:
    path = (
        TarBuilder()
        .file("x", b"first")
        .file("x", b"second")
        .dir("d/", mode=0o700)
        .file("d/inner", b"")
        .dir("d/", mode=0o750)
        .dir("f/")
        .file("f/child", b"")
        .file("f", b"file replaces dir")
        .file("g", b"dir replaces file")
        .dir("g/")
        .write(tmp_path / "l.tar")
    )
    import_layer(str(path), tmp_path / "out")
    out = tmp_path / "out"
    assert (out / "x").read_bytes() == b"second"
    assert (out / "d" / "inner").exists()
    assert stat.S_IMODE(os.stat(out / "d").st_mode) == 0o750
    assert (out / "f").read_bytes() == b"file replaces dir"
    assert (out / "g").is_dir()


def test_destination_must_be_absent_or_empty(tmp_path: Path) -> None:
    path = TarBuilder().file("a", b"").write(tmp_path / "l.tar")
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "occupied").write_bytes(b"")
    with pytest.raises(UnionfsError, match="not empty"):
        import_layer(str(path), dest)
    (dest / "occupied").unlink()
    import_layer(str(path), dest)
    assert (dest / "a").exists()


def test_gnu_format_tarball(tmp_path: Path) -> None:
    long_name = "deep/" + "n" * 150
    path = TarBuilder(tarfile.GNU_FORMAT).file(long_name, b"gnu").write(tmp_path / "l.tar")
    import_layer(str(path), tmp_path / "out")
    assert (tmp_path / "out" / long_name).read_bytes() == b"gnu"
