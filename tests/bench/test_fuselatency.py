"""benchmarks/fuselatency.py: daemon-side time per FUSE request, from the kernel's tracepoints."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from benchmarks import fuselatency
from benchmarks.fusecount import unavailable
from tests.conftest import Union, write

REPO = Path(__file__).resolve().parents[2]

SCRIPT = """\
100.000010: fuse:fuse_request_send: connection 42 req 2 opcode 22 (FUSE_GETXATTR) len 70
100.000030: fuse:fuse_request_end: connection 42 req 2 len 16 error -61
100.000040: fuse:fuse_request_send: connection 43 req 2 opcode 1 (FUSE_LOOKUP) len 50
100.000045: fuse:fuse_request_send: connection 42 req 4 opcode 22 (FUSE_GETXATTR) len 70
100.000050: fuse:fuse_request_end: connection 42 req 4 len 16 error -61
100.000100: fuse:fuse_request_end: connection 43 req 2 len 144 error 0
100.000200: fuse:fuse_request_send: connection 42 req 6 opcode 3 (FUSE_GETATTR) len 56
"""


def test_requests_are_paired_per_connection_and_unique() -> None:
    ops = fuselatency.parse(SCRIPT)
    assert set(ops) == {"GETXATTR", "LOOKUP"}  # the unanswered GETATTR is left out
    assert [round(t) for t in ops["GETXATTR"].micros] == [20, 5]
    assert [round(t) for t in ops["LOOKUP"].micros] == [60]  # req 2 of its own connection
    md = fuselatency.table(ops)
    assert md.splitlines()[2].startswith("| LOOKUP | 1 | 60.0 |")  # largest sum first
    assert md.splitlines()[-1].startswith("| all | 3 |")


@pytest.mark.mount
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (perf -a)")
@pytest.mark.skipif(unavailable() is not None, reason=f"{unavailable()}")
def test_a_command_on_a_mount_is_traced(union: Callable[[int], Union]) -> None:
    u = union(1)
    for i in range(20):
        write(u.lowers[0] / f"f{i}", "x")
    with u.mount():
        listed = [str(u.mnt / f"f{i}") for i in range(20)]
        res = subprocess.run(
            [sys.executable, "-m", "benchmarks.fuselatency", "--", "stat", *listed],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert res.returncode == 0, res.stderr
    table = [line.split("|") for line in res.stdout.splitlines() if line.startswith("| ")]
    rows = {cells[1].strip(): cells for cells in table[1:]}  # after the header
    # each name is looked up once on a fresh mount (then the kernel keeps its entry)
    assert int(rows["LOOKUP"][2]) == 20
    assert float(rows["LOOKUP"][3]) > 0
