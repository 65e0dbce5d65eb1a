"""Real mounts: inode numbers across filesystems, and readdir offsets that stay stable."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import Union, write
from tests.mount.semantics_common import _no_stray_mounts

__all__ = ["_no_stray_mounts"]  # an autouse fixture, used by name

pytestmark = pytest.mark.mount


def test_inode_numbers(union: Callable[[int], Union], tmp_path: Path) -> None:
    u = union(2)
    tmpfs = tmp_path / "tmpfs"
    tmpfs.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(tmpfs)], check=True)
    try:
        u.lowers[0] = tmpfs
        write(tmpfs / "t1", "on tmpfs")
        write(u.lowers[1] / "d1", "on disk")
        write(u.lowers[1] / "h1", "h")
        os.link(u.lowers[1] / "h1", u.lowers[1] / "h2")
        for i in range(50):
            write(tmpfs / f"many/t{i}", "x")
            write(u.lowers[1] / f"many/d{i}", "y")
        with u.mount() as m:
            mp = Path(m)
            inos = {p: os.lstat(p).st_ino for p in mp.rglob("*")}
            by_dino = {e.path: e.inode() for e in os.scandir(mp / "many")}
            assert all(by_dino[p] == os.lstat(p).st_ino for p in by_dino)
            assert inos[mp / "h1"] == inos[mp / "h2"]
            numbers = [v for k, v in inos.items() if k.name != "h2"]
            assert len(set(numbers)) == len(numbers)
            ino_before = os.lstat(mp / "d1").st_ino
            with open(mp / "d1", "a") as f:  # copy-up keeps the number
                f.write("!")
            assert os.lstat(mp / "d1").st_ino == ino_before
            assert len({os.lstat(p).st_dev for p in mp.rglob("*")}) == 1
        with u.mount() as m:
            again = {Path(m) / p.relative_to(mp): None for p in inos}
            for p in again:
                assert os.lstat(p).st_ino == inos[mp / p.relative_to(m)]
    finally:
        subprocess.run(["umount", "-l", str(tmpfs)], check=True)


def test_readdir_offsets_are_stable(union: Callable[[int], Union]) -> None:
    u = union(3)
    for i in range(300):
        write(u.lowers[i % 3] / "big" / f"f{i:03d}", str(i))
    code = (
        "import os,sys,ctypes\n"
        "libc=ctypes.CDLL(None)\n"
        "libc.opendir.restype=ctypes.c_void_p\n"
        "libc.readdir.restype=ctypes.c_void_p\n"
        "libc.readdir.argtypes=[ctypes.c_void_p]\n"
        "libc.telldir.argtypes=[ctypes.c_void_p]\n"
        "libc.telldir.restype=ctypes.c_long\n"
        "libc.seekdir.argtypes=[ctypes.c_void_p,ctypes.c_long]\n"
        "libc.closedir.argtypes=[ctypes.c_void_p]\n"
        "d=libc.opendir(sys.argv[1].encode())\n"
        "names=[]\n"
        "def nxt():\n"
        "    p=libc.readdir(d)\n"
        "    return None if not p else ctypes.string_at(p+19).decode()\n"
        "for _ in range(100): names.append(nxt())\n"
        "pos=libc.telldir(d)\n"
        "for _ in range(50): nxt()\n"
        "libc.seekdir(d,pos)\n"
        "while (n:=nxt()) is not None: names.append(n)\n"
        "print('\\n'.join(names))\n"
    )
    with u.mount() as m:
        out = subprocess.run(
            [sys.executable, "-c", code, str(Path(m) / "big")],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
    names = [n for n in out if n not in (".", "..")]
    assert sorted(names) == sorted(f"f{i:03d}" for i in range(300))
