"""A host user races the daemon: a layer directory is swapped with a symlink to a canary tree
outside the layers (``RENAME_EXCHANGE``, in a bounded loop) while copy-ups, writes and lookups
run through the mount. Whatever the requests return, the canary keeps its content, mode,
owner, times and xattrs, and nothing is created in it.
"""

from __future__ import annotations

import errno
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import Union, write
from tests.layertools.canary import canary_state, make_canary
from unionfs.fdops import RENAME_EXCHANGE, renameat2

pytestmark = pytest.mark.mount

SWAP_SECONDS = 2.0


def swapper(parent: Path, a: str, b: str, stop: threading.Event) -> int:
    """Exchange ``a`` and ``b`` in ``parent`` until ``stop`` or the time is up."""
    fd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY)
    swaps = 0
    deadline = time.monotonic() + SWAP_SECONDS
    try:
        while not stop.is_set() and time.monotonic() < deadline:
            renameat2(fd, a.encode(), fd, b.encode(), RENAME_EXCHANGE)
            swaps += 1
    finally:
        # An even number of exchanges leaves the layer as it was.
        if swaps % 2:
            renameat2(fd, a.encode(), fd, b.encode(), RENAME_EXCHANGE)
        os.close(fd)
    return swaps


def hammer(mnt: Path, stop: threading.Event) -> dict[str, int]:
    """Copy-ups, writes, creates and lookups below ``mnt/d`` until ``stop``; errnos counted.

    The requests themselves never follow a symlink (``d`` is opened ``O_NOFOLLOW`` and the
    rest is relative to it): a layer may legitimately hold a symlink ``d`` that a following
    client would walk through, on the kernel's overlay as well. What is tested is the daemon.
    """
    seen: dict[str, int] = {}
    i = 0
    nofollow = os.O_NOFOLLOW | os.O_CLOEXEC
    while not stop.is_set():
        i += 1
        try:
            d = os.open(mnt / "d", os.O_RDONLY | os.O_DIRECTORY | nofollow)
        except OSError as exc:
            key = errno.errorcode.get(exc.errno or 0, str(exc.errno))
            seen[key] = seen.get(key, 0) + 1
            continue
        new = f"new{i}"

        def write_f(d: int = d) -> None:
            fd = os.open("f", os.O_WRONLY | os.O_TRUNC | nofollow, dir_fd=d)
            os.write(fd, b"through the mount")
            os.close(fd)

        try:
            for op in (
                lambda d=d: os.stat("f", dir_fd=d, follow_symlinks=False),
                lambda d=d, i=i: os.chmod(f"/proc/self/fd/{d}/f", 0o600 + (i % 2) * 0o44),
                lambda d=d, i=i: os.setxattr(f"/proc/self/fd/{d}/g", "user.x", b"%d" % i),
                write_f,
                lambda d=d, n=new: os.close(
                    os.open(n, os.O_CREAT | os.O_WRONLY | nofollow, dir_fd=d)
                ),
                lambda d=d: os.listdir(d),
                lambda d=d, n=new: os.unlink(n, dir_fd=d),
            ):
                try:
                    op()
                    key = "ok"
                except OSError as exc:
                    key = errno.errorcode.get(exc.errno or 0, str(exc.errno))
                seen[key] = seen.get(key, 0) + 1
        finally:
            os.close(d)
    return seen


def race(u: Union, layer: Path, canary: Path) -> dict[str, int]:
    """Mount, then swap ``layer/d`` with a symlink to ``canary/dir`` while hammering the mount."""
    os.symlink(canary / "dir", layer / "evil")
    before = canary_state(canary)
    stop = threading.Event()
    result: dict[str, int] = {}
    with u.mount() as m:
        mnt = Path(m)
        os.listdir(mnt / "d")  # the directory is known to the daemon before the race
        worker = threading.Thread(target=lambda: result.update(hammer(mnt, stop)))
        worker.start()
        try:
            swaps = swapper(layer, "d", "evil", stop)
        finally:
            stop.set()
            worker.join()
        assert swaps > 100
    assert canary_state(canary) == before
    return result


@pytest.mark.parametrize("where", ["lower", "upper"])
def test_swapping_a_layer_directory_for_a_symlink_never_reaches_outside(
    union: Callable[[int], Union], tmp_path: Path, where: str
) -> None:
    u = union(1)
    canary = make_canary(tmp_path)
    layer = u.lowers[0] if where == "lower" else u.upper
    write(layer / "d" / "f", "layer f", mode=0o644)
    write(layer / "d" / "g", "layer g", mode=0o644)
    seen = race(u, layer, canary)
    assert seen.get("ok", 0) > 0
    if where == "lower":
        # The daemon reads a lower directory once: the swap changes nothing it serves.
        assert set(seen) == {"ok"}, seen
    # A changed upper is outside overlayfs's contract ("undefined, but no crash"): requests
    # may fail (ENOTDIR; EIO where the kernel sees a known inode change type), the daemon
    # logs no exception (checked by the fixture) and the canary above stays as it was.
