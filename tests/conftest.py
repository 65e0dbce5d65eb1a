"""Shared fixtures: layer trees on temporary directories and real mounts that always unmount.

The whole run keeps unionfs's mount records and daemon logs in a private directory of its own
(``UNIONFS_STATE_DIR``), removed at the end: a test whose daemon is killed or dies leaves
nothing in the host's /run/unionfs/mounts, and no mount is handed to a mount server the host
may be running (its socket is found beside the state directory). Tests that run unionfs with
an environment of their own (another user, a user namespace, podman) choose their own; the
default directories of other ids that the run creates (``/tmp/unionfs-UID``) are removed at
the end too.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from unionfs.api import mounted

_STATE_ROOT = "unionfs_state_root"
_USER_STATE_DIRS = "unionfs_user_state_dirs"
# The default state directories of the other ids tests mount as: user 1000 (as_user in
# tests/mount/test_unprivileged.py, whose test checks that the daemon makes its own) and
# root of a user namespace (podman's rootless layout).
_OTHER_IDS = (0, 1000)


def pytest_configure(config: pytest.Config) -> None:
    """Point ``UNIONFS_STATE_DIR`` at a new 0700 directory before any test module is
    imported: :mod:`unionfs.daemon` reads it once, at import."""
    if "unionfs.daemon" in sys.modules:
        raise pytest.UsageError("unionfs.daemon was imported before the suite chose its state dir")
    root = tempfile.mkdtemp(prefix="unionfs-tests-")
    setattr(config, _STATE_ROOT, root)
    os.environ["UNIONFS_STATE_DIR"] = os.path.join(root, "mounts")
    os.environ.pop("UNIONFS_SERVER_SOCKET", None)
    # Those of them the run creates (daemon records and logs of mounts made as another id,
    # with that id's default state directory) are removed at the end.
    new_dirs = [f"/tmp/unionfs-{i}" for i in _OTHER_IDS if not os.path.lexists(f"/tmp/unionfs-{i}")]
    setattr(config, _USER_STATE_DIRS, new_dirs)


def pytest_unconfigure(config: pytest.Config) -> None:
    root = getattr(config, _STATE_ROOT, None)
    if root is not None:
        shutil.rmtree(root, ignore_errors=True)
    for made in getattr(config, _USER_STATE_DIRS, ()):
        shutil.rmtree(made, ignore_errors=True)


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


def terminate(proc: subprocess.Popen[Any], timeout: float) -> None:
    """SIGTERM ``proc`` and wait up to ``timeout`` seconds for it, then SIGKILL it."""
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
