"""How long a FUSE daemon takes to answer each request of a command, per opcode.

The kernel's ``fuse:fuse_request_send`` tracepoint fires when a request is queued for the
daemon and ``fuse:fuse_request_end`` when its answer has come back; both carry the mount's
connection and the request's unique number. ``perf record -a`` captures both while a command
runs, and pairing them gives every request's daemon-side time: waking the daemon, its
handler, its reply, nothing of the caller's own work. Like :mod:`benchmarks.fusecount` it
needs nothing from the daemon, so fuse-overlayfs and unionfs are measured the same way, and
it sees the mounts the command makes itself (``podman diff`` mounts two layers)::

    python -m benchmarks.fuselatency -- podman diff CONTAINER

prints, per opcode over every FUSE connection: requests, median and 90th percentile in µs,
and the sum in ms. The sums, set against the command's wall time, show how much of it was
spent waiting for daemons. Needs root and perf.
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.fusecount import PERF

_EVENT = re.compile(
    r"fuse:fuse_request_(send|end):\s+connection (\d+) req (\d+)(?: opcode \d+ \((\w+)\))?"
)


@dataclass
class OpTimes:
    """The daemon-side times of one opcode's requests, in µs."""

    micros: list[float] = field(default_factory=list)

    def row(self, name: str) -> str:
        v = sorted(self.micros)
        p90 = v[min(len(v) - 1, int(0.9 * len(v)))]
        return (
            f"| {name} | {len(v)} | {statistics.median(v):.1f} | {p90:.1f} | {sum(v) / 1000:.1f} |"
        )


def parse(script: str) -> dict[str, OpTimes]:
    """Pair the send and end events of ``perf script`` output (``-F time,event,trace``);
    times per opcode name (``FUSE_`` dropped). A request without its end is left out."""
    sent: dict[tuple[str, str], tuple[float, str]] = {}
    ops: dict[str, OpTimes] = {}
    for line in script.splitlines():
        m = _EVENT.search(line)
        if not m:
            continue
        ts = float(line.split(":", 1)[0].split()[-1])
        kind, conn, req, name = m.groups()
        if kind == "send":
            sent[(conn, req)] = (ts, (name or "?").removeprefix("FUSE_"))
        elif (conn, req) in sent:
            start, op = sent.pop((conn, req))
            ops.setdefault(op, OpTimes()).micros.append((ts - start) * 1e6)
    return ops


def trace(argv: list[str]) -> tuple[float, int, dict[str, OpTimes]]:
    """Run ``argv`` under the tracepoints: its wall time (s), exit code, and times per op."""
    with tempfile.TemporaryDirectory(prefix="unionfs-bench-lat-") as tmp:
        data = str(Path(tmp) / "perf.data")
        events = ["-e", "fuse:fuse_request_send", "-e", "fuse:fuse_request_end"]
        rec = [PERF, "record", "-q", "-a", *events, "-o", data, "--"]
        t0 = time.perf_counter()
        code = subprocess.run([*rec, *argv], check=False).returncode
        wall = time.perf_counter() - t0
        script = subprocess.run(
            [PERF, "script", "-i", data, "-F", "time,event,trace"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    return wall, code, parse(script)


def table(ops: dict[str, OpTimes]) -> str:
    """A markdown table, the opcodes with the largest sums first."""
    lines = ["| opcode | requests | median µs | p90 µs | sum ms |", "|---|---|---|---|---|"]
    for name, t in sorted(ops.items(), key=lambda kv: -sum(kv[1].micros)):
        lines.append(t.row(name))
    total = sum(sum(t.micros) for t in ops.values()) / 1000
    count = sum(len(t.micros) for t in ops.values())
    lines.append(f"| all | {count} | | | {total:.1f} |")
    return "\n".join(lines)


def main(args: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.fuselatency")
    parser.add_argument("command", nargs="+", help="the command to trace (after --)")
    ns = parser.parse_args(args)
    wall, code, ops = trace(ns.command)
    print(f"{' '.join(ns.command)}: exit {code}, {wall * 1000:.0f} ms wall")
    print(table(ops))
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
