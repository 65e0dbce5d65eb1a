"""Open handles of unlinked files, checked against the kernel's overlay (the oracle).

The differential suite once saw ``fstat`` of a read-only handle give ESTALE after its name was
unlinked (pair 1, ``s006``; docs/testing.md), where the kernel shows the object with nlink 0.
The cause: a copy-up whose upper file got the inode number of an object removed earlier (the
upper filesystem recycles numbers) kept the node id recorded for that number, so the unlink's
lookup of the copy named a node the kernel did not hold, pinned that one, and left the open
handle's node without its object. It needed many earlier objects on the mount (a recorded
number to recycle), never one sequence alone.

Both tests do the same operations on a unionfs mount and on a kernel overlay mount of a copy of
the same layers and require the same results: the first recycles numbers on purpose, the
second does it from several threads while other threads list the directories (readdirplus)
and drop the kernel's dentries and inodes (FORGETs, lookups again).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import stat
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import Union, write
from tests.oracle.backends import KernelOverlay, copy_tree

pytestmark = [pytest.mark.mount, pytest.mark.kernel]

Result = tuple[object, ...]


@pytest.fixture
def twin(union: Callable[[int], Union], tmp_path: Path) -> Iterator[Callable[..., tuple]]:
    """``start(build)``: the layer ``build`` fills, mounted by unionfs and (a copy) by the
    kernel; returns (our mountpoint, the kernel's, our upper)."""
    if os.geteuid() != 0:
        pytest.skip("needs root (kernel overlay mounts)")
    u = union(1)
    kroot = tmp_path / "kernel"

    with contextlib.ExitStack() as stack:

        def start(build: Callable[[Path], None]) -> tuple[Path, Path, Path]:
            build(u.lowers[0])
            kroot.mkdir()
            copy_tree(u.lowers[0], kroot / "l0")
            (kroot / "upper").mkdir()
            (kroot / "work").mkdir()
            ours = stack.enter_context(u.mount())
            theirs = stack.enter_context(
                KernelOverlay().mount([kroot / "l0"], kroot / "upper", kroot / "work", kroot / "m")
            )
            return Path(ours), Path(theirs), u.upper

        yield start


def errname(exc: OSError) -> str:
    return errno.errorcode.get(exc.errno or 0, str(exc.errno))


def fstat_of(fd: int) -> Result:
    """What ``fstat`` and a read show of an open handle (or the errno)."""
    try:
        st = os.fstat(fd)
        shown: Result = (stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), st.st_size, st.st_nlink)
    except OSError as exc:
        shown = (errname(exc),)
    try:
        data: object = hashlib.sha256(os.pread(fd, 1 << 16, 0)).hexdigest()[:12]
    except OSError as exc:
        data = errname(exc)
    return (*shown, data)


def append(path: Path, data: bytes) -> None:
    with open(path, "ab") as f:
        f.write(data)


def open_unlink_fstat(path: Path) -> tuple[int, Result]:
    """Open ``path`` read-only, unlink it, and show the handle; the handle stays open."""
    fd = os.open(path, os.O_RDONLY)
    os.unlink(path)
    return fd, fstat_of(fd)


def test_copy_up_into_a_recycled_inode_number_keeps_open_handles(twin) -> None:
    """Copies that take the inode numbers of removed copies of lower hard links (whose node
    ids were recorded for those numbers): each copy, opened read-only and unlinked, is still
    shown through its handle, as by the kernel (nlink 0, its size and mode)."""
    count = 30

    def build(layer: Path) -> None:
        for i in range(count):
            write(layer / "d" / f"k{i}", "k" * (i + 1), mode=0o644)
            os.link(layer / "d" / f"k{i}", layer / "d" / f"k{i}.2")
            write(layer / "d" / f"f{i}", "f" * (100 + i), mode=0o600 + i % 8)

    ours, theirs, upper = twin(build)
    results: dict[Path, list[Result]] = {ours: [], theirs: []}
    freed: set[int] = set()
    recycled = 0
    fds: list[int] = []
    try:
        for m in (ours, theirs):
            for i in range(count):
                # The copy of a lower hard link shows its own number under a node id of its
                # name: that id is recorded for the copy's inode number.
                append(m / "d" / f"k{i}", b"+")
                if m == ours:
                    freed.add(os.stat(upper / "d" / f"k{i}").st_ino)
                os.unlink(m / "d" / f"k{i}")
            for i in range(count):
                append(m / "d" / f"f{i}", b"+")
                if m == ours:
                    recycled += os.stat(upper / "d" / f"f{i}").st_ino in freed
                fd, shown = open_unlink_fstat(m / "d" / f"f{i}")
                fds.append(fd)
                results[m].append(shown)
            results[m].extend(fstat_of(fd) for fd in fds[-count:])
    finally:
        for fd in fds:
            os.close(fd)
    if not recycled:
        pytest.skip("the upper filesystem recycled no inode number: nothing to check here")
    assert results[ours] == results[theirs]
    assert all(r[3] == 0 for r in results[theirs][:count])


WORKERS = 4
ROUNDS = 25
KINDS = ("lower", "copied", "linked", "recycler", "new")


def _stress_layer(layer: Path) -> None:
    for w in range(WORKERS):
        d = layer / f"w{w}"
        for r in range(ROUNDS):
            write(d / f"lower{r}", f"lower {w} {r}" * (r + 1), mode=0o644)
            write(d / f"copied{r}", f"copied {w} {r}" * (r + 2), mode=0o640)
            write(d / f"linked{r}", f"linked {w} {r}", mode=0o604)
            os.link(d / f"linked{r}", d / f"linked{r}.2")
            write(d / f"recycler{r}", "r", mode=0o644)
            os.link(d / f"recycler{r}", d / f"recycler{r}.2")


def _worker(m: Path, w: int, fds: list[int]) -> list[Result]:
    """One worker's files, round by round; every handle stays open until the end."""
    d = m / f"w{w}"
    out: list[Result] = []
    for r in range(ROUNDS):
        for kind in KINDS:
            p = d / f"{kind}{r}"
            try:
                if kind == "recycler":
                    append(p, b"+")  # a recorded node id for the copy's number...
                    os.unlink(p)  # ...which is free again
                    out.append((kind, r, "ok"))
                    continue
                if kind == "copied":
                    append(p, b"+")
                elif kind == "new":
                    write(p, f"new {w} {r}")
                fd, shown = open_unlink_fstat(p)
                fds.append(fd)
                extra: object = None
                if kind == "linked":
                    st = os.lstat(d / f"linked{r}.2")
                    extra = (st.st_size, st.st_nlink)
                out.append((kind, r, shown, extra))
            except OSError as exc:
                out.append((kind, r, str(p.relative_to(m)), errname(exc)))
    out.extend(("again", i, fstat_of(fd)) for i, fd in enumerate(fds))
    return out


def _run(m: Path, seconds_cap: float = 20.0) -> dict[int, list[Result]]:
    """The workers on mount ``m``, with a lister (``ls -l``: readdirplus) and, as root,
    ``drop_caches`` (the kernel forgets unused inodes and looks names up again)."""
    results: dict[int, list[Result]] = {}
    fds: dict[int, list[int]] = {w: [] for w in range(WORKERS)}
    done = threading.Event()

    def work(w: int) -> None:
        results[w] = _worker(m, w, fds[w])

    def lister() -> None:
        while not done.is_set():
            for w in range(WORKERS):
                subprocess.run(["ls", "-l", str(m / f"w{w}")], capture_output=True, check=False)

    def dropper() -> None:
        deadline = time.monotonic() + seconds_cap
        while not done.wait(0.3) and time.monotonic() < deadline:
            with open("/proc/sys/vm/drop_caches", "w") as f:
                f.write("2\n")

    helpers = [threading.Thread(target=lister)]
    if os.access("/proc/sys/vm/drop_caches", os.W_OK):
        helpers.append(threading.Thread(target=dropper))
    workers = [threading.Thread(target=work, args=(w,)) for w in range(WORKERS)]
    for t in helpers + workers:
        t.start()
    try:
        for t in workers:
            t.join(seconds_cap)
    finally:
        done.set()
        for t in helpers:
            t.join()
        for fd in (fd for w in fds.values() for fd in w):
            os.close(fd)
    return results


def test_open_unlinked_handles_under_concurrent_listing_and_forgets(twin) -> None:
    """Threads open lower, copied-up, hard-linked and new files read-only, unlink them and
    fstat and read the handles (again at the end), while copies of lower hard links recycle
    inode numbers, ``ls -l`` lists the directories and the kernel drops its dentries: every
    result is the kernel's."""
    ours, theirs, _ = twin(_stress_layer)
    got = _run(ours)
    want = _run(theirs)
    assert sorted(got) == list(range(WORKERS))
    for w in range(WORKERS):
        diffs = [(a, b) for a, b in zip(want[w], got[w], strict=True) if a != b]
        assert not diffs, f"worker {w}: kernel vs unionfs: {diffs[:5]}"
