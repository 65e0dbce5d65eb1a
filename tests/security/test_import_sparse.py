"""Issue 13 item 10: ``unionfs import`` keeps holes, so a small tarball cannot fill the disk.

Sparse members in every format GNU tar writes (old GNU, PAX 0.0, 0.1 and 1.0) and all-zero
blocks of plain members become holes: the content reads back identical while the blocks on
disk stay few. A member claiming a terabyte imports in a moment with a few blocks, and hostile
sparse maps (out of order, beyond the file's size) are refused with one line, leaving nothing.
A canary tree outside the layers keeps its content, mode, owner, times and xattrs.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tarfile
import time
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path

import pytest

from tests.layertools.canary import canary_state, make_canary

pytestmark = pytest.mark.skipif(shutil.which("tar") is None, reason="needs GNU tar")

HOLE = 64 << 20
TIB = 1 << 40
BLOCK = 4096


@pytest.fixture
def canary(tmp_path: Path) -> Iterator[None]:
    root = make_canary(tmp_path / "outside")
    before = canary_state(root)
    yield
    assert canary_state(root) == before


@pytest.fixture
def sparse_files(tmp_path: Path) -> Path:
    """``src/``: a file with a 64 MiB hole then data, one with data, a hole, data, and a hole.

    Built with holes (``truncate``) so GNU tar's ``--sparse`` detection finds them.
    """
    src = tmp_path / "src"
    src.mkdir()
    with open(src / "tail", "wb") as f:
        f.truncate(HOLE)
        f.seek(HOLE)
        f.write(b"the end\n")
    with open(src / "mixed", "wb") as f:
        f.write(os.urandom(3 * BLOCK))
        f.seek(HOLE // 2)
        f.write(os.urandom(BLOCK))
        f.truncate(HOLE)
    return src


def gnu_tar(src: Path, out: Path, *options: str) -> Path:
    subprocess.run(["tar", "--sparse", *options, "-cf", str(out), "-C", str(src), "."], check=True)
    return out


def unionfs_import(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["unionfs", "import", "--no-progress", *args], capture_output=True, text=True
    )


def same_content(a: Path, b: Path) -> bool:
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            x, y = fa.read(1 << 20), fb.read(1 << 20)
            if x != y:
                return False
            if not x:
                return True


def allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


def nothing_left(parent: Path, dest: Path) -> bool:
    """``dest`` does not exist and no half-built ``.<dest>.import-*`` is beside it."""
    stray = [p for p in os.listdir(parent) if p.startswith(f".{dest.name}.import-")]
    return not os.path.lexists(dest) and not stray


@pytest.mark.parametrize(
    "options",
    [
        ("--format=gnu",),
        ("--format=posix", "--sparse-version=0.0"),
        ("--format=posix", "--sparse-version=0.1"),
        ("--format=posix", "--sparse-version=1.0"),
    ],
    ids=["gnu", "pax-0.0", "pax-0.1", "pax-1.0"],
)
def test_sparse_members_stay_sparse_and_identical(
    tmp_path: Path, sparse_files: Path, canary: None, options: tuple[str, ...]
) -> None:
    tarball = gnu_tar(sparse_files, tmp_path / "layer.tar", *options)
    assert tarball.stat().st_size < 1 << 20  # the point: a small tarball
    with tarfile.open(tarball) as tar:
        assert any(m.sparse for m in tar.getmembers())  # GNU tar did write sparse members
    out = unionfs_import(str(tarball), str(tmp_path / "lower"))
    assert out.returncode == 0, out.stderr
    for name in ("tail", "mixed"):
        imported = tmp_path / "lower" / name
        assert imported.stat().st_size == HOLE + (8 if name == "tail" else 0)
        assert same_content(imported, sparse_files / name)
        assert allocated(imported) <= allocated(sparse_files / name) + 16 * BLOCK


def test_zero_blocks_of_plain_members_become_holes(
    tmp_path: Path, sparse_files: Path, canary: None
) -> None:
    """Without ``--sparse`` the zeros travel in the tarball; they still land as holes."""
    tarball = tmp_path / "plain.tar"
    subprocess.run(["tar", "-cf", str(tarball), "-C", str(sparse_files), "."], check=True)
    assert tarball.stat().st_size > 2 * HOLE
    out = unionfs_import(str(tarball), str(tmp_path / "lower"))
    assert out.returncode == 0, out.stderr
    for name in ("tail", "mixed"):
        imported = tmp_path / "lower" / name
        assert same_content(imported, sparse_files / name)
        assert allocated(imported) <= 16 * BLOCK


def test_a_terabyte_member_imports_quickly_with_a_few_blocks(tmp_path: Path, canary: None) -> None:
    src = tmp_path / "src"
    src.mkdir()
    with open(src / "huge", "wb") as f:
        f.truncate(TIB - 1)
        f.seek(TIB - 1)
        f.write(b"!")
    tarball = gnu_tar(src, tmp_path / "huge.tar", "--format=posix")
    started = time.monotonic()
    out = unionfs_import(str(tarball), str(tmp_path / "lower"))
    assert out.returncode == 0, out.stderr
    assert time.monotonic() - started < 10
    huge = tmp_path / "lower" / "huge"
    assert huge.stat().st_size == TIB
    assert allocated(huge) <= 16 * BLOCK
    with open(huge, "rb") as f:
        assert os.pread(f.fileno(), 2, TIB - 2) == b"\0!"
        assert os.pread(f.fileno(), 4, TIB // 2) == bytes(4)

    refused = unionfs_import("--max-apparent-size", "1G", str(tarball), str(tmp_path / "l2"))
    assert refused.returncode == 1
    assert refused.stderr.count("\n") == 1 and "--max-apparent-size" in refused.stderr
    assert nothing_left(tmp_path, tmp_path / "l2")


def hostile_sparse_tar(path: Path, sparse_map: str, realsize: int, stored: bytes) -> Path:
    """A PAX 0.1 sparse member with the given map, written by hand with :mod:`tarfile`."""
    info = tarfile.TarInfo("evil")
    info.size = len(stored)
    info.pax_headers = {"GNU.sparse.map": sparse_map, "GNU.sparse.size": str(realsize)}
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        tar.addfile(info, BytesIO(stored))
    return path


@pytest.mark.parametrize(
    ("sparse_map", "realsize"),
    [("4096,10,0,10", 8192), ("0,10,1000000,10", 8192)],
    ids=["out-of-order", "beyond-the-size"],
)
def test_hostile_sparse_maps_are_refused(
    tmp_path: Path, canary: None, sparse_map: str, realsize: int
) -> None:
    tarball = hostile_sparse_tar(tmp_path / "evil.tar", sparse_map, realsize, b"x" * 20)
    with tarfile.open(tarball) as tar:
        assert tar.getmembers()[0].sparse  # tarfile reads it as a sparse member
    out = unionfs_import(str(tarball), str(tmp_path / "lower"))
    assert out.returncode == 1
    assert out.stderr.count("\n") == 1 and "sparse map" in out.stderr
    assert nothing_left(tmp_path, tmp_path / "lower")
