"""``unionfs diff``: expected A/C/D lists for hand-made uppers and for uppers the kernel wrote."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from layertools.conftest import needs_kernel_overlay, needs_root
from unionfs.layertools.changes import compute_changes


def lines(upper: Path, lowers: list[Path]) -> list[str]:
    return [str(change) for change in compute_changes(upper, lowers)]


def make(root: Path, files: dict[str, bytes | None]) -> Path:
    """Create ``root`` with files (bytes) and directories (None, or a trailing slash)."""
    root.mkdir(parents=True, exist_ok=True)
    for rel, data in files.items():
        path = root / rel
        if data is None or rel.endswith("/"):
            path.mkdir(parents=True, exist_ok=True)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
    return root


def chardev_whiteout(path: Path) -> None:
    os.mknod(path, stat.S_IFCHR | 0, os.makedev(0, 0))


def same_dir_meta(dst: Path, src: Path) -> None:
    st = os.stat(src)
    os.chmod(dst, stat.S_IMODE(st.st_mode))
    os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_added_and_changed_files_with_parent_changes(tmp_path: Path) -> None:
    lower = make(tmp_path / "lower", {"etc/passwd": b"root", "usr/bin/ls": b"ls", "usr/": None})
    upper = make(tmp_path / "upper", {"etc/passwd": b"root2", "etc/new": b"x", "opt/a/b": b"y"})
    assert lines(upper, [lower]) == [
        "C /etc",
        "A /etc/new",
        "C /etc/passwd",
        "A /opt",
        "A /opt/a",
        "A /opt/a/b",
    ]


@needs_root
def test_whiteouts_in_every_form_report_deleted(tmp_path: Path) -> None:
    lower = make(tmp_path / "lower", {"a": b"1", "b": b"2", "c": b"3", "d/x": b"4", "keep": b""})
    upper = make(tmp_path / "upper", {})
    chardev_whiteout(upper / "a")
    (upper / ".wh.b").write_bytes(b"")
    os.mkdir(upper / "d")
    same_dir_meta(upper / "d", lower / "d")
    os.setxattr(upper / "d", "trusted.overlay.opaque", b"x")
    (upper / "d" / "x").write_bytes(b"")
    os.setxattr(upper / "d" / "x", "trusted.overlay.whiteout", b"")
    chardev_whiteout(upper / "nothing-below")
    assert lines(upper, [lower]) == ["D /a", "D /b", "C /d", "D /d/x"]


@needs_root
def test_opaque_dir_deletes_hidden_lower_children_only(tmp_path: Path) -> None:
    lower = make(tmp_path / "lower", {"d/x": b"1", "d/sub/deep": b"2", "d/kept": b"3"})
    upper = make(tmp_path / "upper", {"d/kept": b"new", "d/fresh": b"4"})
    os.setxattr(upper / "d", "trusted.overlay.opaque", b"y")
    assert lines(upper, [lower]) == ["C /d", "A /d/fresh", "C /d/kept", "D /d/sub", "D /d/x"]


@needs_root
def test_opaque_dir_with_nothing_below_is_added(tmp_path: Path) -> None:
    lower = make(tmp_path / "lower", {"other": b""})
    upper = make(tmp_path / "upper", {"d/f": b""})
    os.setxattr(upper / "d", "trusted.overlay.opaque", b"y")
    assert lines(upper, [lower]) == ["A /d", "A /d/f"]


def test_oci_opaque_marker_and_whiteouts_in_lowers_shape_the_before_view(tmp_path: Path) -> None:
    # The lower stack itself uses OCI markers: "gone" is deleted by the top lower and "d" made
    # opaque, so the before-view has neither "gone" nor "d/old".
    bottom = make(tmp_path / "bottom", {"gone": b"", "d/old": b"", "d/same": b""})
    top = make(tmp_path / "top", {".wh.gone": b"", "d/.wh..wh..opq": b"", "d/same": b"t"})
    upper = make(tmp_path / "upper", {"gone": b"back", "d/": None})
    os.utime(upper / "d", ns=(0, os.stat(top / "d").st_mtime_ns))
    (upper / "d" / ".wh..wh..opq").write_bytes(b"")
    assert lines(upper, [top, bottom]) == ["C /d", "D /d/same", "A /gone"]


def test_copied_up_directory_without_changes_is_not_reported(tmp_path: Path) -> None:
    lower = make(tmp_path / "lower", {"a/b/c": b"1", "z": b""})
    upper = make(tmp_path / "upper", {"a/b/": None})
    same_dir_meta(upper / "a" / "b", lower / "a" / "b")
    same_dir_meta(upper / "a", lower / "a")
    assert lines(upper, [lower]) == []
    os.chmod(upper / "a", 0o700)
    assert lines(upper, [lower]) == ["C /a"]


def test_file_replacing_directory_and_directory_replacing_file(tmp_path: Path) -> None:
    lower = make(tmp_path / "lower", {"wasdir/x": b"", "wasfile": b""})
    upper = make(tmp_path / "upper", {"wasdir": b"now a file", "wasfile/inner": b""})
    assert lines(upper, [lower]) == ["C /wasdir", "C /wasfile", "A /wasfile/inner"]


def test_without_lowers_everything_is_added(tmp_path: Path) -> None:
    upper = make(tmp_path / "upper", {"a/b": b"", ".wh.c": b""})
    assert lines(upper, []) == ["A /a", "A /a/b", "D /c"]


def test_sort_order_puts_directory_contents_right_after_the_directory(tmp_path: Path) -> None:
    upper = make(tmp_path / "upper", {"a/z": b"", "a-b": b"", "a.c": b""})
    assert lines(upper, []) == ["A /a", "A /a/z", "A /a-b", "A /a.c"]


@needs_kernel_overlay
def test_upper_written_by_the_kernel(tmp_path: Path, mount_overlay) -> None:  # type: ignore[no-untyped-def]
    lower = make(
        tmp_path / "lower",
        {"etc/hosts": b"h", "etc/motd": b"m", "srv/data/a": b"a", "srv/data/b": b"b", "tmp/": None},
    )
    upper = tmp_path / "upper"
    upper.mkdir()
    with mount_overlay([lower], upper) as mnt:
        (mnt / "etc" / "hosts").write_bytes(b"changed")
        os.unlink(mnt / "etc" / "motd")
        (mnt / "srv" / "data" / "a").unlink()
        (mnt / "srv" / "data" / "b").unlink()
        os.rmdir(mnt / "srv" / "data")
        os.mkdir(mnt / "srv" / "data")  # over a whiteout: the kernel makes it opaque
        (mnt / "srv" / "data" / "c").write_bytes(b"c")
        (mnt / "tmp" / "scratch").write_bytes(b"")
    assert lines(upper, [lower]) == [
        "C /etc",
        "C /etc/hosts",
        "D /etc/motd",
        "C /srv",
        "C /srv/data",
        "D /srv/data/a",
        "D /srv/data/b",
        "A /srv/data/c",
        "C /tmp",
        "A /tmp/scratch",
    ]


def test_kept_oci_whiteout_beside_a_new_directory_hides_the_lower_one(tmp_path: Path) -> None:
    lower = make(tmp_path / "lower", {"d/old": b"", "d/same": b""})
    upper = make(tmp_path / "upper", {".wh.d": b"", "d/same": b"new"})
    assert lines(upper, [lower]) == ["C /d", "D /d/old", "C /d/same"]
    # And a stack whose top lower is such a layer hides d/old from the before-view.
    assert lines(make(tmp_path / "empty", {}), [upper, lower]) == []
    top = make(tmp_path / "upper2", {"d/added": b""})
    assert lines(top, [upper, lower]) == ["C /d", "A /d/added"]


@pytest.mark.skipif(shutil.which("fuse-overlayfs") is None, reason="needs fuse-overlayfs")
@needs_root
def test_upper_written_by_fuse_overlayfs(tmp_path: Path) -> None:
    lower = make(tmp_path / "lower", {"d/x": b"x", "y": b"y", "z": b"z"})
    upper, work, mnt = tmp_path / "upper", tmp_path / "work", tmp_path / "mnt"
    for path in (upper, work, mnt):
        path.mkdir()
    options = f"lowerdir={lower},upperdir={upper},workdir={work}"
    subprocess.run(["fuse-overlayfs", "-o", options, str(mnt)], check=True, capture_output=True)
    try:
        shutil.rmtree(mnt / "d")
        (mnt / "d").mkdir()
        (mnt / "d" / "n").write_bytes(b"n")
        (mnt / "y").unlink()
        (mnt / "z").write_bytes(b"z2")
    finally:
        subprocess.run(["fusermount3", "-u", str(mnt)], check=True)
    assert lines(upper, [lower]) == ["C /d", "A /d/n", "D /d/x", "D /y", "C /z"]
