"""Real mounts: the daemon's lifecycle (readahead, signals, deep stacks, mount helper,
auto_unmount)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import Union, whiteout, write
from tests.mount.semantics_common import _no_stray_mounts
from unionfs.api import mounted

__all__ = ["_no_stray_mounts"]  # an autouse fixture, used by name

pytestmark = pytest.mark.mount


def _read_ahead_kb(mnt: str | Path) -> int:
    dev = os.stat(mnt).st_dev
    with open(f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}/read_ahead_kb") as f:
        return int(f.read())


def test_readahead_window(union: Callable[[int], Union]) -> None:
    u = union(1)
    with u.mount() as m:
        assert _read_ahead_kb(m) == 1024
    # A path with a space is escaped in mountinfo, where the daemon finds its device.
    u.mnt = u.root / "mount point"
    u.mnt.mkdir()
    with u.mount("readahead=4096") as m:
        assert _read_ahead_kb(m) == 4096
    with u.mount("readahead=0") as m:
        assert _read_ahead_kb(m) == 128  # the kernel's default, left alone
    assert "cannot set readahead" not in u.log()


def test_sigterm_unmounts_cleanly(union: Callable[[int], Union]) -> None:
    u = union(1)
    write(u.lowers[0] / "f", "x")
    proc = subprocess.Popen(
        [sys.executable, "-m", "unionfs", "mount", "-f", "--lower", str(u.lowers[0]), str(u.mnt)],
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 20
    while not os.path.ismount(u.mnt) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert (u.mnt / "f").read_text() == "x"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=20) == 0
    assert not os.path.ismount(u.mnt)


@pytest.mark.parametrize("nlayers", [500, 2000])
def test_deep_stacks(tmp_path: Path, nlayers: int) -> None:
    root = tmp_path / "L"
    lowers = []
    for i in range(nlayers):
        d = root / str(i)
        d.mkdir(parents=True)
        lowers.append(d)
    write(lowers[-1] / "deep/a/b/bottom", "bottom")
    write(lowers[nlayers // 2] / "deep/a/mid", "mid")
    whiteout(lowers[0] / "gone") if False else None
    write(lowers[-1] / "gone", "x")
    (lowers[nlayers // 3] / ".wh.gone").write_text("")
    mnt = tmp_path / "m"
    mnt.mkdir()
    started = time.monotonic()
    with mounted([str(p) for p in lowers], str(mnt)) as m:
        elapsed = time.monotonic() - started
        assert Path(m, "deep/a/b/bottom").read_text() == "bottom"
        assert sorted(os.listdir(Path(m, "deep/a"))) == ["b", "mid"]
        assert not Path(m, "gone").exists()
    assert elapsed < 60


def test_mount_helper(union: Callable[[int], Union]) -> None:
    if not os.path.exists("/sbin/mount.fuse.unionfs"):
        pytest.skip("mount helper not installed (scripts/install.sh installs it)")
    u = union(1)
    write(u.lowers[0] / "f", "via mount -t")
    opts = f"lowerdir={u.lowers[0]},upperdir={u.upper},workdir={u.work}"
    subprocess.run(["mount", "-t", "fuse.unionfs", "unionfs", str(u.mnt), "-o", opts], check=True)
    try:
        assert (u.mnt / "f").read_text() == "via mount -t"
        (u.mnt / "g").write_text("written")
    finally:
        subprocess.run(["umount", str(u.mnt)], check=True)
    assert (u.upper / "g").read_text() == "written"


def test_auto_unmount_after_the_daemon_dies(union: Callable[[int], Union]) -> None:
    from unionfs.api import mount
    from unionfs.daemon import read_state

    u = union(1)
    write(u.lowers[0] / "f", "x")
    mount([str(u.lowers[0])], str(u.mnt), options=["auto_unmount"])
    state = read_state(str(u.mnt))
    assert state is not None and (u.mnt / "f").read_text() == "x"
    os.kill(state["pid"], signal.SIGKILL)
    deadline = time.monotonic() + 20
    while os.path.ismount(u.mnt) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not os.path.ismount(u.mnt)
