"""The request loop busy-polls before it sleeps (``busy_poll=``, pyfuse3 idle-spin.patch).

Observed without timing anything: a daemon that sleeps between requests makes a voluntary
context switch for each one, which ``/proc/PID/status`` counts. The client and the daemon
are pinned to different CPUs, as the scheduler usually places them: a client issuing
requests back to back then finds the default daemon still polling, and one with
``busy_poll=0`` asleep every time.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest

from tests.conftest import Union, write
from unionfs.daemon import read_state

pytestmark = [
    pytest.mark.mount,
    pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs"),
]

REQUESTS = 2000


def _sleeps(pid: int) -> int:
    """Voluntary context switches of the daemon's main thread (its request loop)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("voluntary_ctxt_switches:"):
                return int(line.split()[1])
    raise AssertionError(f"no voluntary_ctxt_switches in /proc/{pid}/status")


@contextmanager
def _pinned_apart(daemon: int) -> Iterator[None]:
    """The daemon's threads on one CPU, this process on another, for the block."""
    mine = os.sched_getaffinity(0)
    first, second = sorted(mine)[:2]
    for tid in os.listdir(f"/proc/{daemon}/task"):
        os.sched_setaffinity(int(tid), {first})
    os.sched_setaffinity(0, {second})
    try:
        yield
    finally:
        os.sched_setaffinity(0, mine)


def _sleeps_per_request(mnt: str) -> float:
    """Back-to-back getxattr requests (ENODATA) on an open file: the daemon's sleeps per
    request, the fewest of a few rounds (another task on the daemon's CPU stops its spin
    for a while, so a busy machine can spoil a round, never improve one)."""
    pid = int(read_state(mnt)["pid"])  # type: ignore[index]
    fd = os.open(os.path.join(mnt, "f"), os.O_RDONLY)
    best = float("inf")
    try:
        with _pinned_apart(pid):
            for _ in range(5):
                before = _sleeps(pid)
                for _ in range(REQUESTS):
                    try:
                        os.getxattr(fd, "user.none")
                    except OSError as exc:
                        assert exc.errno == errno.ENODATA
                best = min(best, (_sleeps(pid) - before) / REQUESTS)
                if best < 0.5:
                    break
    finally:
        os.close(fd)
    return best


def test_a_busy_client_finds_the_daemon_awake(union: Callable[[int], Union]) -> None:
    u = union(1)
    write(u.lowers[0] / "f", "x")
    with u.mount() as m:
        assert _sleeps_per_request(m) < 0.5
    with u.mount("busy_poll=0") as m:
        assert _sleeps_per_request(m) > 0.8
