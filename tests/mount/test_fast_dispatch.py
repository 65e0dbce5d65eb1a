"""The fast request loop of the patched pyfuse3 (third_party/pyfuse3/fast-dispatch.patch).

Handlers that finish without suspending are run outside trio's scheduler. What must still
hold, on a real mount of a tiny pyfuse3 filesystem run in a subprocess:

- a handler that suspends does not stop other requests from being served meanwhile;
- what ``init()`` set in motion runs before the next request is answered;
- a signal reaches trio while the only worker waits for requests in ``poll()``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import terminate

pytestmark = pytest.mark.mount

# Root holds "wait" and "go". A read of "wait" suspends until a read of "go" sets an event
# (only possible if another request is served while the first is suspended). A task started
# at init sets `after_init`; the root's st_size shows whether it had run (1) or not (0).
FS = r"""
import errno, signal, stat, sys
import pyfuse3, trio

mnt = sys.argv[1]
go = trio.Event()
inited = trio.Event()
state = {"after_init": 0}
FILES = {b"wait": 2, b"go": 3}

def attrs(ino):
    e = pyfuse3.EntryAttributes()
    e.st_ino = ino
    if ino == pyfuse3.ROOT_INODE:
        e.st_mode, e.st_size = stat.S_IFDIR | 0o755, state["after_init"]
    else:
        e.st_mode, e.st_size = stat.S_IFREG | 0o644, 2
    e.attr_timeout = e.entry_timeout = 0
    return e

class FS(pyfuse3.Operations):
    def init(self):
        inited.set()

    async def lookup(self, parent, name, ctx):
        if parent != pyfuse3.ROOT_INODE or name not in FILES:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return attrs(FILES[name])

    async def getattr(self, inode, ctx):
        return attrs(inode)

    async def open(self, inode, flags, ctx):
        return pyfuse3.FileInfo(fh=inode, direct_io=True)

    async def read(self, fh, off, size):
        if fh == 2:
            with trio.fail_after(20):
                await go.wait()
            return b"w\n"[off:off + size]
        go.set()
        return b"g\n"[off:off + size]

    async def release(self, fh):
        pass

async def after_init():
    await inited.wait()
    state["after_init"] = 1

async def main():
    async with trio.open_nursery() as nursery:
        async def on_signal():
            with trio.open_signal_receiver(signal.SIGTERM) as sigs:
                async for _ in sigs:
                    print("signal", flush=True)
                    pyfuse3.terminate()
                    return
        nursery.start_soon(on_signal)
        nursery.start_soon(after_init)
        await pyfuse3.main()
        nursery.cancel_scope.cancel()

pyfuse3.init(FS(), mnt, ["fsname=fastdispatch"])
try:
    print("ready", flush=True)
    trio.run(main)
finally:
    pyfuse3.close(unmount=True)
"""


def _mounted(mnt: Path) -> bool:
    return any(
        line.split()[1] == str(mnt) for line in Path("/proc/mounts").read_text().splitlines()
    )


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], Path]]:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    script = tmp_path / "fs.py"
    script.write_text(FS)
    proc = subprocess.Popen(
        [sys.executable, str(script), str(mnt)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        deadline = time.monotonic() + 10
        while not _mounted(mnt):
            assert time.monotonic() < deadline, "the test filesystem did not mount"
            time.sleep(0.02)
        yield proc, mnt
    finally:
        if proc.poll() is None:
            terminate(proc, 10)
        if _mounted(mnt):
            subprocess.run(["fusermount3", "-uz", str(mnt)], check=False)


def test_init_task_runs_before_the_next_request(
    daemon: tuple[subprocess.Popen[str], Path],
) -> None:
    _, mnt = daemon
    assert os.stat(mnt).st_size == 1


def test_a_suspended_handler_does_not_stop_other_requests(
    daemon: tuple[subprocess.Popen[str], Path],
) -> None:
    _, mnt = daemon
    got: list[bytes] = []
    waiter = threading.Thread(target=lambda: got.append((mnt / "wait").read_bytes()))
    waiter.start()
    time.sleep(0.3)  # the read of "wait" is suspended in the daemon by now
    assert (mnt / "go").read_bytes() == b"g\n"
    waiter.join(timeout=20)
    assert got == [b"w\n"]


def test_a_signal_reaches_trio_while_the_loop_waits_in_poll(
    daemon: tuple[subprocess.Popen[str], Path],
) -> None:
    proc, mnt = daemon
    os.stat(mnt)
    time.sleep(0.5)  # idle: the only worker waits in poll()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=10) == 0
    assert proc.stdout is not None and proc.stdout.readline().strip() == "signal"
    assert not _mounted(mnt)
