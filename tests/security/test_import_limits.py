"""Issue 13 item 10: ``unionfs import`` refuses a layer past its limits, leaving nothing behind.

Entry count (``--max-entries``), file data (``--max-size``), apparent size
(``--max-apparent-size``) and the free space kept on the destination's filesystem: each is
refused with one line and exit status 1, and neither the destination nor a half-built
temporary directory remains. A canary tree outside the layers keeps its content, mode, owner,
times and xattrs.
"""

from __future__ import annotations

import gzip
import io
import os
import subprocess
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.layertools.canary import canary_state, make_canary
from unionfs.layertools.importer import RESERVE_BYTES


@pytest.fixture
def canary(tmp_path: Path) -> Iterator[None]:
    root = make_canary(tmp_path / "outside")
    before = canary_state(root)
    yield
    assert canary_state(root) == before


def layer(path: Path, files: dict[str, bytes], *, compress: bool = False) -> Path:
    """A tarball holding ``files`` (name -> content), gzip-compressed if ``compress``."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    raw = buf.getvalue()
    path.write_bytes(gzip.compress(raw) if compress else raw)
    return path


def unionfs_import(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["unionfs", "import", "--no-progress", *args], capture_output=True, text=True
    )


def assert_refused(out: subprocess.CompletedProcess[str], words: str, dest: Path) -> None:
    assert out.returncode == 1, out
    assert out.stderr.count("\n") == 1 and words in out.stderr, out.stderr
    assert not os.path.lexists(dest)
    assert not [p for p in os.listdir(dest.parent) if p.startswith(f".{dest.name}.import-")]


def test_too_many_entries_are_refused(tmp_path: Path, canary: None) -> None:
    tarball = layer(tmp_path / "many.tar", {f"d/f{i}": b"x" for i in range(50)})
    out = unionfs_import("--max-entries", "20", str(tarball), str(tmp_path / "lower"))
    assert_refused(out, "more than 20 entries", tmp_path / "lower")
    ok = unionfs_import("--max-entries", "51", str(tarball), str(tmp_path / "lower"))
    assert ok.returncode == 0, ok.stderr
    assert len(os.listdir(tmp_path / "lower" / "d")) == 50


def test_too_much_data_is_refused_even_when_it_compresses_well(
    tmp_path: Path, canary: None
) -> None:
    """A gzip bomb of non-zero bytes: 64 MiB that compress to almost nothing."""
    tarball = layer(tmp_path / "bomb.tar.gz", {"a": b"\1" * (64 << 20)}, compress=True)
    assert tarball.stat().st_size < 1 << 20
    out = unionfs_import("--max-size", "16M", str(tarball), str(tmp_path / "lower"))
    assert_refused(out, "more than 16M of file data (--max-size)", tmp_path / "lower")


def test_zeros_are_not_data_for_the_size_limit(tmp_path: Path, canary: None) -> None:
    """Zero blocks become holes, so they do not count against ``--max-size``."""
    tarball = layer(tmp_path / "zeros.tar.gz", {"z": bytes(32 << 20) + b"end"}, compress=True)
    out = unionfs_import("--max-size", "1M", str(tarball), str(tmp_path / "lower"))
    assert out.returncode == 0, out.stderr
    assert os.stat(tmp_path / "lower" / "z").st_blocks * 512 <= 64 << 10
    over = unionfs_import("--max-apparent-size", "16M", str(tarball), str(tmp_path / "l2"))
    assert_refused(over, "(--max-apparent-size)", tmp_path / "l2")


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to mount a small tmpfs")
def test_free_space_reserve_is_kept(tmp_path: Path, canary: None) -> None:
    """On a filesystem smaller than the reserve, no data is written at all."""
    small = tmp_path / "small"
    small.mkdir()
    size = RESERVE_BYTES // 2
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(small)], check=True)
    try:
        tarball = layer(tmp_path / "l.tar", {"a": os.urandom(1 << 20)})
        out = unionfs_import(str(tarball), str(small / "lower"))
        assert_refused(out, "not enough free space", small / "lower")
        assert os.listdir(small) == []
    finally:
        subprocess.run(["umount", str(small)], check=True)
