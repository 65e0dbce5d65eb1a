"""Count the FUSE requests a workload sends, per opcode, on any FUSE filesystem.

The kernel's ``fuse:fuse_request_send`` tracepoint fires once per request sent to a daemon,
with the connection (the mount's device number) and the opcode.  ``perf stat -a`` counts it
with one filter per opcode, restricted to the mount's connection, so the figure is the same
for fuse-overlayfs and unionfs and needs nothing from either daemon.  The counters start
disabled (``-D -1``); the worker enables them through perf's control fifo just around its
timed loop (see ``worker.py``), so set-up and warm-up passes are not counted.  FORGET
requests do not go through this tracepoint and are not counted.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

PERF = shutil.which("perf") or "/usr/bin/perf"

OPCODES = {
    1: "LOOKUP",
    3: "GETATTR",
    4: "SETATTR",
    8: "MKNOD",
    9: "MKDIR",
    10: "UNLINK",
    12: "RENAME",
    13: "LINK",
    14: "OPEN",
    15: "READ",
    16: "WRITE",
    18: "RELEASE",
    20: "FSYNC",
    22: "GETXATTR",
    23: "LISTXATTR",
    25: "FLUSH",
    27: "OPENDIR",
    28: "READDIR",
    29: "RELEASEDIR",
    34: "ACCESS",
    35: "CREATE",
    44: "READDIRPLUS",
    45: "RENAME2",
    52: "STATX",
}


def unavailable() -> str | None:
    """Why requests cannot be counted here, or None."""
    if os.geteuid() != 0:
        return "needs root (perf -a)"
    if not os.access(PERF, os.X_OK):
        return "perf not installed"
    probe = subprocess.run(
        [PERF, "stat", "-x,", "-e", "fuse:fuse_request_send", "--", "true"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if probe.returncode != 0:
        return "no fuse:fuse_request_send tracepoint: " + probe.stderr.strip()[-200:]
    return None


def connection_id(mnt: str | Path) -> int:
    """The FUSE connection number of a mount (its kernel dev_t, as in /sys/fs/fuse/connections)."""
    dev = os.stat(mnt).st_dev
    return (os.major(dev) << 20) | os.minor(dev)


class RequestCounter:
    """``perf stat`` wrapped around one worker run; :meth:`result` gives counts per opcode."""

    def __init__(self, mnt: str | Path, tmp: str | Path | None = None) -> None:
        self.conn = connection_id(mnt)
        self.dir = Path(tempfile.mkdtemp(prefix="unionfs-bench-perf-", dir=tmp))
        self.ctl, self.ack, self.out = self.dir / "ctl", self.dir / "ack", self.dir / "out"
        os.mkfifo(self.ctl)
        os.mkfifo(self.ack)

    def wrap(self, argv: list[str]) -> list[str]:
        """``perf stat ... -- argv``: a total, then one counter per opcode."""
        cmd = [PERF, "stat", "-a", "-x,", "-o", str(self.out), "-D", "-1"]
        cmd += ["--control", f"fifo:{self.ctl},{self.ack}"]
        cmd += ["-e", "fuse:fuse_request_send", "--filter", f"connection == {self.conn}"]
        for code in OPCODES:
            cmd += ["-e", "fuse:fuse_request_send"]
            cmd += ["--filter", f"connection == {self.conn} && opcode == {code}"]
        return cmd + ["--", *argv]

    def spec(self) -> dict[str, str]:
        """What the worker needs to switch the counters on and off."""
        return {"perf_ctl": str(self.ctl), "perf_ack": str(self.ack)}

    def result(self) -> dict[str, Any]:
        """``{"total": n, "by_op": {NAME: n, ...}}`` (opcodes never seen are left out)."""
        counts = []
        for line in self.out.read_text().splitlines():
            fields = line.split(",")
            if len(fields) > 2 and fields[2].startswith("fuse:"):
                counts.append(int(fields[0]) if fields[0].isdigit() else 0)
        if len(counts) != len(OPCODES) + 1:
            raise RuntimeError(f"perf printed {len(counts)} counters, expected {len(OPCODES) + 1}")
        by_op = {name: n for name, n in zip(OPCODES.values(), counts[1:]) if n}
        other = counts[0] - sum(by_op.values())
        if other:
            by_op["other"] = other
        return {"total": counts[0], "by_op": by_op}

    def close(self) -> None:
        """Remove the fifos and the output."""
        shutil.rmtree(self.dir, ignore_errors=True)
