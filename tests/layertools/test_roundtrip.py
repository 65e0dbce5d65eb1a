"""Round trip through the kernel's overlayfs: export an upper, import it as a new lower above
the old lowers, mount without an upper, and get the same merged view as with the upper."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from layertools.conftest import needs_kernel_overlay, snapshot
from unionfs.layertools.changes import compute_changes
from unionfs.layertools.export import export_to_path
from unionfs.layertools.importer import import_layer


def build_lowers(tmp_path: Path) -> list[Path]:
    """Two lowers, top first, with files, dirs, a symlink, xattrs and a hard-linked pair."""
    top, bottom = tmp_path / "lower-top", tmp_path / "lower-bottom"
    for rel, data in {
        "etc/passwd": b"root:x:0:0\n",
        "etc/shadow": b"root:*:1\n",
        "etc/conf.d/a": b"a",
        "etc/conf.d/b": b"b",
        "srv/www/index.html": b"<html>",
        "srv/www/img/logo": b"png",
        "home/user/.profile": b"export A=1",
        "opt/keep": b"keep",
    }.items():
        path = bottom / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    os.symlink("passwd", bottom / "etc" / "passwd.link")
    os.setxattr(bottom / "opt" / "keep", "user.origin", b"bottom")
    (top / "etc").mkdir(parents=True)
    (top / "etc" / "hostname").write_bytes(b"box\n")
    (top / "usr" / "lib").mkdir(parents=True)
    (top / "usr" / "lib" / "libx.so").write_bytes(b"\x7fELF" + bytes(range(256)) * 40)
    os.link(top / "usr" / "lib" / "libx.so", top / "usr" / "lib" / "libx.so.1")
    return [top, bottom]


def change_through_mount(mnt: Path) -> None:
    """Every kind of change a container makes: writes, deletes, opaque dirs, metadata, links."""
    (mnt / "etc" / "passwd").write_bytes(b"root:x:0:0\nuser:x:1000:1000\n")
    (mnt / "etc" / "shadow").unlink()
    os.chmod(mnt / "etc" / "hostname", 0o600)
    os.chown(mnt / "home" / "user" / ".profile", 1000, 1000)
    for name in ("a", "b"):
        (mnt / "etc" / "conf.d" / name).unlink()
    os.rmdir(mnt / "etc" / "conf.d")
    os.mkdir(mnt / "etc" / "conf.d")  # over a whiteout: opaque
    (mnt / "etc" / "conf.d" / "c").write_bytes(b"c")
    subprocess.run(["rm", "-rf", str(mnt / "srv" / "www")], check=True)
    (mnt / "usr" / "lib" / "libx.so").write_bytes(b"patched")  # breaks the lower hard link
    (mnt / "app" / "data").mkdir(parents=True)
    (mnt / "app" / "data" / "big").write_bytes(os.urandom(300_000))
    os.link(mnt / "app" / "data" / "big", mnt / "app" / "data" / "big.hardlink")
    os.symlink("../etc/passwd", mnt / "app" / "passwd")
    os.mkfifo(mnt / "app" / "fifo")
    os.setxattr(mnt / "opt" / "keep", "user.origin", b"changed")
    os.setxattr(mnt / "app" / "data" / "big", "user.tag", b"\x00\xff")
    os.utime(mnt / "app" / "data", ns=(0, 1_234_567_890_123_456_789))
    (mnt / ".wh.lookalike").exists()  # a lookup only; marker names never appear in the view


@needs_kernel_overlay
@pytest.mark.kernel
@pytest.mark.parametrize("compression", ["none", "gzip", "zstd"])
def test_export_import_round_trip(tmp_path: Path, mount_overlay, compression: str) -> None:  # type: ignore[no-untyped-def]
    lowers = build_lowers(tmp_path)
    upper = tmp_path / "upper"
    upper.mkdir()
    with mount_overlay(lowers, upper) as mnt:
        change_through_mount(mnt)
    with mount_overlay(lowers, upper) as mnt:
        before = snapshot(mnt)
    changes = {str(c) for c in compute_changes(upper, lowers)}
    assert {"D /etc/shadow", "D /srv/www", "D /etc/conf.d/a", "A /app/data/big"} <= changes

    suffix = {"none": ".tar", "gzip": ".tar.gz", "zstd": ".tar.zst"}[compression]
    blob = tmp_path / ("layer" + suffix)
    exported = export_to_path(upper, blob, compression=compression)
    new_lower = tmp_path / "imported"
    imported = import_layer(str(blob), new_lower)
    assert (imported.digest, imported.diff_id) == (exported.digest, exported.diff_id)

    with mount_overlay([new_lower, *lowers]) as mnt:
        after = snapshot(mnt)
        big = os.stat(mnt / "app" / "data" / "big")
        twin = os.stat(mnt / "app" / "data" / "big.hardlink")
    assert after == before
    assert big.st_ino == twin.st_ino

    # The imported layer is an upper-equivalent: re-exporting it gives the same tarball.
    again = export_to_path(new_lower, tmp_path / ("again" + suffix), compression=compression)
    assert again.digest == exported.digest
