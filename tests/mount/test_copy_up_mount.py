"""Real mounts: copy-up seen by earlier readers, done once, off the request loop, atomic."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import Union, write
from tests.mount.semantics_common import _no_stray_mounts
from unionfs.api import mounted

__all__ = ["_no_stray_mounts"]  # an autouse fixture, used by name

pytestmark = pytest.mark.mount


def test_copy_up_is_seen_by_earlier_readers_and_done_once(union: Callable[[int], Union]) -> None:
    u = union(1)
    write(u.lowers[0] / "f", "old content")
    with u.mount() as m:
        mp = Path(m)
        reader = open(mp / "f", "rb")  # noqa: SIM115 - held open across the copy-up
        writers = [open(mp / "f", "r+b") for _ in range(3)]  # noqa: SIM115
        writers[0].write(b"NEW")
        writers[0].flush()
        for w in writers:
            w.close()
        reader.seek(0)
        assert reader.read() == b"NEW content"
        reader.close()
        stats = os.getxattr(m, "user.unionfs.stats")
        assert b'"copy_ups": 1' in stats


def test_lower_files_opened_then_removed_still_read(union: Callable[[int], Union]) -> None:
    # A read-only open of a lower file opens the layer file only at the first read that
    # reaches the daemon: by then the name may be whited out or replaced.
    u = union(1)
    for name in ("gone", "replaced", "shadow"):
        write(u.lowers[0] / name, f"lower {name}")
    with u.mount() as m:
        mp = Path(m)
        held = {name: os.open(mp / name, os.O_RDONLY) for name in ("gone", "replaced", "shadow")}
        try:
            os.unlink(mp / "gone")
            os.rename(mp / "shadow", mp / "replaced")
            assert os.pread(held["gone"], 100, 0) == b"lower gone"
            assert os.pread(held["replaced"], 100, 0) == b"lower replaced"
            assert os.pread(held["shadow"], 100, 0) == b"lower shadow"
            assert (mp / "replaced").read_bytes() == b"lower shadow"
        finally:
            for fd in held.values():
                os.close(fd)


def test_large_copy_up_does_not_block_others(union: Callable[[int], Union]) -> None:
    u = union(1)
    big = u.lowers[0] / "big"
    with open(big, "wb") as f:
        for _ in range(64):
            f.write(os.urandom(1 << 20))
    write(u.lowers[0] / "small", "small")
    with u.mount() as m:
        mp = Path(m)
        served_during: list[float] = []
        done = threading.Event()

        def poke() -> None:
            while not done.is_set():
                os.lstat(mp / "small")
                (mp / "small").read_text()
                served_during.append(time.monotonic())

        t = threading.Thread(target=poke)
        t.start()
        with open(mp / "big", "r+b") as f:
            f.write(b"X")
        done.set()
        t.join()
        assert served_during, "other requests were served while the copy-up ran"
        with open(mp / "big", "rb") as f, open(big, "rb") as g:
            assert f.read(1) == b"X"
            g.seek(1)
            f.seek(1)
            assert hashlib.sha256(f.read()).digest() == hashlib.sha256(g.read()).digest()


def test_kill_during_copy_up_leaves_old_or_new(union: Callable[[int], Union]) -> None:
    u = union(1)
    big = u.lowers[0] / "big"
    with open(big, "wb") as f:
        f.truncate(0)
        for _ in range(256):
            f.write(b"L" * (1 << 20))
    with u.mount("fsync=0"):
        pass
    mp = str(u.mnt)
    from unionfs.api import mount, unmount
    from unionfs.daemon import read_state

    mount([str(u.lowers[0])], mp, str(u.upper), str(u.work))
    state = read_state(mp)
    assert state is not None
    pid = state["pid"]
    proc = subprocess.Popen(
        [sys.executable, "-c", f"open({str(Path(mp) / 'big')!r}, 'r+b').write(b'N')"],
        stderr=subprocess.DEVNULL,
    )
    time.sleep(0.15)
    os.kill(pid, signal.SIGKILL)
    proc.wait(timeout=30)
    unmount(mp, lazy=True)
    with mounted([str(u.lowers[0])], mp, str(u.upper), str(u.work)) as m:
        data = Path(m, "big").read_bytes()
        assert len(data) == 256 << 20
        assert data[1:] == b"L" * ((256 << 20) - 1)
        assert data[:1] in (b"L", b"N")
    assert os.listdir(u.work / "work") == []
