"""``unionfs umount`` of a mount that another mount namespace still holds.

A mount namespace made while the mount existed (``unshare -m``, a container runtime's private
namespace) holds its own copy of the mount, and a FUSE daemon serves until the last copy is
gone. Unmounting here must then unmount here, return at once and say in one line which daemon
serves on and what holds it (not wait 30 s in silence); the workdir stays locked by that
daemon, and a second mount of it is refused naming the daemon's pid. Once the holder ends the
daemon exits and the layers mount again. The holders are real namespaces, ended by pid.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import Union, write
from unionfs.api import mount, unmount
from unionfs.daemon import read_state
from unionfs.errors import UnionfsError

pytestmark = pytest.mark.mount


def umount(mnt: Path, *flags: str) -> tuple[subprocess.CompletedProcess[str], float]:
    """``unionfs umount`` and how long it took."""
    start = time.monotonic()
    res = subprocess.run(
        [sys.executable, "-m", "unionfs", "umount", *flags, str(mnt)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    return res, time.monotonic() - start


def mounted_here(mnt: Path) -> bool:
    with open("/proc/self/mounts") as f:
        return any(line.split()[1] == str(mnt) for line in f)


def running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except OSError:
        return False


def wait_gone(pid: int, seconds: float = 20) -> None:
    deadline = time.monotonic() + seconds
    while running(pid):
        assert time.monotonic() < deadline, f"pid {pid} still runs after {seconds} s"
        time.sleep(0.02)


@pytest.fixture
def holder() -> Iterator[Callable[[], int]]:
    """``hold()``: the pid of a new process in a private mount namespace copied from this one,
    so holding a copy of every mount present now. Each is killed by its pid at the end."""
    procs: list[subprocess.Popen[bytes]] = []
    own = os.readlink("/proc/self/ns/mnt")

    def hold() -> int:
        proc = subprocess.Popen(["unshare", "-m", "--propagation", "private", "sleep", "600"])
        procs.append(proc)
        deadline = time.monotonic() + 10
        # unshare execs sleep once the namespace is made and private.
        while Path(f"/proc/{proc.pid}/comm").read_text().strip() != "sleep":
            assert proc.poll() is None, "unshare failed"
            assert time.monotonic() < deadline, "unshare did not start sleep"
            time.sleep(0.005)
        assert os.readlink(f"/proc/{proc.pid}/ns/mnt") != own
        return proc.pid

    yield hold
    for proc in procs:
        proc.kill()
        proc.wait()


def mount_union(u: Union) -> int:
    """Mount ``u`` in the background; the daemon's pid."""
    mount(
        [str(u.lowers[0])],
        str(u.mnt),
        str(u.upper),
        str(u.work),
        log_file=str(u.root / "daemon.log"),
    )
    state = read_state(str(u.mnt))
    assert state is not None
    return int(state["pid"])


@pytest.fixture
def u(union: Callable[[int], Union]) -> Union:
    u = union(1)
    write(u.lowers[0] / "f", "lower f")
    return u


@pytest.mark.parametrize("flags", [(), ("-z",)], ids=["plain", "lazy"])
def test_umount_says_which_namespace_holds_the_mount_and_the_daemon_serves_on(
    u: Union, holder: Callable[[], int], flags: tuple[str, ...]
) -> None:
    daemon = mount_union(u)
    held_by = holder()
    res, seconds = umount(u.mnt, *flags)
    assert res.returncode == 0, res.stderr
    assert seconds < 5  # it waited the whole 30 s before
    assert not mounted_here(u.mnt)
    assert res.stderr.count("\n") == 1, res.stderr
    assert res.stderr.startswith(f"unionfs: {u.mnt} is unmounted here")
    assert f"daemon (pid {daemon}) keeps serving it" in res.stderr
    # Named among the namespaces holding it (others', made meanwhile, would be named too).
    assert "mount namespace" in res.stderr and f" {held_by} (sleep)" in res.stderr
    # The daemon still serves the holder's copy, writes included.
    enter = ["nsenter", f"--mount=/proc/{held_by}/ns/mnt", "--"]
    seen = subprocess.run([*enter, "cat", str(u.mnt / "f")], capture_output=True, text=True)
    assert seen.stdout == "lower f", seen.stderr
    subprocess.run([*enter, "sh", "-c", f"echo held > {u.mnt}/g"], check=True)
    assert (u.upper / "g").read_text() == "held\n"
    assert running(daemon)
    # Its workdir is still locked: a second mount is refused, naming the daemon.
    with pytest.raises(UnionfsError) as refused:
        mount_union(u)
    assert str(refused.value) == (
        f"workdir {str(u.work)!r} is in use by another unionfs mount (daemon pid {daemon})"
    )
    # Once the holder is gone, so is the daemon, and the layers mount again.
    os.kill(held_by, 9)
    wait_gone(daemon)
    mount_union(u)
    try:
        assert (u.mnt / "g").read_text() == "held\n"
    finally:
        unmount(str(u.mnt))


def test_a_bind_mount_in_this_namespace_is_named_by_its_path(u: Union, tmp_path: Path) -> None:
    daemon = mount_union(u)
    other = tmp_path / "other"
    other.mkdir()
    subprocess.run(["mount", "--bind", str(u.mnt), str(other)], check=True)
    try:
        res, seconds = umount(u.mnt)
        assert res.returncode == 0, res.stderr
        assert seconds < 5
        assert f"the mount is still attached at {other}" in res.stderr
        assert (other / "f").read_text() == "lower f"
    finally:
        subprocess.run(["umount", str(other)], check=True)
    wait_gone(daemon)


def test_with_nothing_holding_the_mount_umount_returns_once_the_daemon_has_exited(
    u: Union,
) -> None:
    daemon = mount_union(u)
    (u.mnt / "g").write_text("written")
    res, _ = umount(u.mnt)
    assert res.returncode == 0 and res.stderr == ""
    assert not running(daemon)
    assert read_state(str(u.mnt)) is None
    assert (u.upper / "g").read_text() == "written"
