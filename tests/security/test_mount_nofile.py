"""Issue 13 item 13: the daemon's descriptor limit is raised, and its caches stay below it.

The daemon raises its soft ``RLIMIT_NOFILE`` to the hard limit, and as root with
CAP_SYS_RESOURCE the hard limit to ``fs.nr_open``. A child holding many files open through
the mount (lower files read-only, upper files read-write) must get every one of them, while
another process can still open files and list directories; after the child closes them, the
daemon's descriptors go back down.

The target is 100,000 open files; where the hard limit cannot be raised (root without
CAP_SYS_RESOURCE, as on the test VM: hard limit 20,000) it is what the limit leaves after the
directory-descriptor cache and a margin.
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests.conftest import Union
from unionfs.daemon import read_state

pytestmark = pytest.mark.mount

HOLDER = textwrap.dedent(
    """
    import os, resource, sys
    paths = sys.argv[1:]
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = len(paths) + 100
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(want, hard), max(want, hard)))
    except ValueError:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    fds = []
    for p in paths:
        lower = "/lower/" in p
        fd = os.open(p, os.O_RDONLY if lower else os.O_RDWR)
        if lower:
            os.read(fd, 1)  # a lower file is opened in the daemon at its first read
        fds.append(fd)
    print(len(fds), flush=True)
    sys.stdin.readline()
    for fd in fds:
        os.close(fd)
    print("closed", flush=True)
    """
)


def _limits(pid: int) -> tuple[int, int]:
    with open(f"/proc/{pid}/limits") as f:
        for line in f:
            if line.startswith("Max open files"):
                soft, hard = line.split()[3:5]
                return int(soft), int(hard)
    raise AssertionError("no open-files limit")


def _has_cap_sys_resource() -> bool:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("CapEff:"):
                return bool(int(line.split()[1], 16) & (1 << 24))
    return False


def _nfds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_many_open_files_through_the_mount(union) -> None:
    u: Union = union(1)
    with open("/proc/sys/fs/nr_open") as f:
        nr_open = int(f.read())
    n_max = 100_000
    lower_dir, upper_dir = u.lowers[0] / "lower", u.upper / "upper"
    lower_dir.mkdir()
    upper_dir.mkdir()
    (lower_dir / "fresh").write_bytes(b"fresh")
    with u.mount() as m:
        state = read_state(m)
        assert state is not None
        pid = int(state["pid"])
        soft, hard = _limits(pid)
        assert soft == hard >= resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        if _has_cap_sys_resource():
            assert hard == nr_open
        # Room left for open files: the limit minus the directory cache (4,096 at most here)
        # and a margin for the daemon's own descriptors.
        n = min(n_max, soft - 4096 - 600)
        half = n // 2
        for i in range(half):  # made directly in the layers: faster than through the mount
            (lower_dir / f"{i}").write_bytes(b"x")
        for i in range(n - half):
            (upper_dir / f"{i}").write_bytes(b"y")
        paths = [f"{m}/lower/{i}" for i in range(half)]
        paths += [f"{m}/upper/{i}" for i in range(n - half)]
        base = _nfds(pid)
        holder = subprocess.Popen(
            [sys.executable, "-c", HOLDER, *paths],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            assert holder.stdout is not None and holder.stdin is not None
            opened = holder.stdout.readline().strip()
            assert opened == str(n), holder.stderr.read() if holder.stderr else ""
            assert _nfds(pid) >= base + n
            # Everyone else is still served while those are held.
            assert Path(m, "lower", "fresh").read_bytes() == b"fresh"  # a new descriptor
            Path(m, "another").write_text("still works\n")
            assert len(os.listdir(Path(m, "upper"))) == n - half
            assert len(os.listdir(Path(m, "lower"))) == half + 1
            holder.stdin.write("\n")
            holder.stdin.flush()
            assert holder.stdout.readline().strip() == "closed"
        finally:
            holder.kill()
            holder.wait()
        # Releases reach the daemon asynchronously after close(2).
        deadline = time.monotonic() + 20
        while _nfds(pid) >= base + 100 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _nfds(pid) < base + 100
