"""Shared fixtures: layer trees on temporary directories and real mounts that always unmount."""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from unionfs.api import mounted


def _mounted_under(root: Path) -> list[str]:
    out = []
    with open("/proc/self/mounts") as f:
        for line in f:
            mnt = line.split()[1].encode().decode("unicode_escape")
            if mnt.startswith(str(root)):
                out.append(mnt)
    return out


@pytest.fixture
def layers(tmp_path: Path) -> Callable[..., Path]:
    """``layers("l1", "l2")`` makes empty layer dirs under tmp_path and returns tmp_path."""

    def make(*names: str) -> Path:
        for n in names:
            (tmp_path / n).mkdir(parents=True, exist_ok=True)
        return tmp_path

    return make


class Union:
    """Paths of one test mount: lowers (top first), upper, workdir and the mountpoint."""

    def __init__(self, root: Path, nlowers: int) -> None:
        self.root = root
        self.lowers = [root / f"l{i}" for i in range(nlowers)]
        self.upper = root / "upper"
        self.work = root / "work"
        self.mnt = root / "mnt"
        for p in [*self.lowers, self.upper, self.work, self.mnt]:
            p.mkdir(parents=True, exist_ok=True)

    def mount(self, *options: str, upper: bool = True) -> contextlib.AbstractContextManager[str]:
        return mounted(
            [str(p) for p in self.lowers],
            str(self.mnt),
            str(self.upper) if upper else None,
            str(self.work) if upper else None,
            options,
            log_file=str(self.root / "daemon.log"),
        )

    def log(self) -> str:
        try:
            return (self.root / "daemon.log").read_text()
        except FileNotFoundError:
            return ""


@pytest.fixture
def union(tmp_path: Path) -> Iterator[Callable[[int], Union]]:
    """``union(n)``: n empty lowers plus upper/work/mnt; the daemon log is checked at the end."""
    made: list[Union] = []

    def make(nlowers: int = 2) -> Union:
        u = Union(tmp_path / f"u{len(made)}", nlowers)
        made.append(u)
        return u

    yield make
    for u in made:
        for mnt in _mounted_under(u.root):
            subprocess.run(["fusermount3", "-u", "-z", mnt], check=False)
        log = u.log()
        assert "Traceback" not in log, f"daemon logged an exception:\n{log}"


def write(path: Path, data: str | bytes = "", mode: int | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    path.write_bytes(data)
    if mode is not None:
        os.chmod(path, mode)
    return path


def whiteout(path: Path) -> None:
    os.mknod(path, 0o020000, os.makedev(0, 0))
