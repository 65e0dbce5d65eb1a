"""The measuring process: runs one workload against an already mounted tree and times it.

The harness starts this file as a fresh interpreter for every sample (``python worker.py SPEC``)
so that the harness's own memory, threads and imports never sit between the workload and the
filesystem.  Only the standard library is imported, and only plain ``os`` calls are timed: the
same code runs for every backend.  Everything the workload needs (file lists, offsets) is loaded
before the clock starts.

The spec is a JSON object: ``{"op": ..., "root": MOUNTPOINT, "warmup": bool, ...}``.  The result,
printed as one JSON line on stdout, is ``{"seconds": float, "ops": int}``.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

_READ_CHUNK = 1 << 20


def _load_list(path: str, limit: int | None = None) -> list[str]:
    """Read a newline-separated list of relative paths."""
    with open(path, encoding="utf-8") as fh:
        items = [line.rstrip("\n") for line in fh if line.strip()]
    return items if limit is None else items[:limit]


def op_stat(spec: dict[str, Any]) -> Callable[[], int]:
    """``lstat`` every path in the list."""
    paths = _load_list(spec["list"], spec.get("limit"))
    lstat = os.lstat

    def run() -> int:
        for p in paths:
            lstat(p)
        return len(paths)

    return run


def op_listdir(spec: dict[str, Any]) -> Callable[[], int]:
    """List every directory in the list (names only, no stat of the entries)."""
    dirs = _load_list(spec["list"], spec.get("limit"))
    listdir = os.listdir

    def run() -> int:
        n = 0
        for d in dirs:
            n += len(listdir(d))
        return n

    return run


def op_seqread(spec: dict[str, Any]) -> Callable[[], int]:
    """Read one file front to back with 1 MiB reads (ops = reads)."""
    path = spec["file"]
    buf = bytearray(_READ_CHUNK)

    def run() -> int:
        reads = 0
        with open(path, "rb", buffering=0) as fh:
            while fh.readinto(buf):
                reads += 1
        return reads

    return run


def op_randread(spec: dict[str, Any]) -> Callable[[], int]:
    """``pread`` 4 KiB blocks at seeded random 4 KiB-aligned offsets of one file."""
    path = spec["file"]
    count = int(spec["count"])
    rng = random.Random(spec.get("seed", 4))
    blocks = os.stat(path).st_size // 4096
    offsets = [rng.randrange(blocks) * 4096 for _ in range(count)]
    pread = os.pread

    def run() -> int:
        fd = os.open(path, os.O_RDONLY)
        try:
            for off in offsets:
                pread(fd, 4096, off)
        finally:
            os.close(fd)
        return count

    return run


def op_orc(spec: dict[str, Any]) -> Callable[[], int]:
    """open, read (up to 64 KiB), close each file in the list."""
    paths = _load_list(spec["list"], spec.get("limit"))
    o_open, o_read, o_close, flags = os.open, os.read, os.close, os.O_RDONLY

    def run() -> int:
        for p in paths:
            fd = o_open(p, flags)
            o_read(fd, 65536)
            o_close(fd)
        return len(paths)

    return run


def op_copyup(spec: dict[str, Any]) -> Callable[[], int]:
    """Open each lower file for writing and overwrite its first byte: a data copy-up."""
    paths = _load_list(spec["list"], spec.get("limit"))

    def run() -> int:
        for p in paths:
            fd = os.open(p, os.O_WRONLY)
            os.pwrite(fd, b"x", 0)
            os.close(fd)
        return len(paths)

    return run


def op_chmod(spec: dict[str, Any]) -> Callable[[], int]:
    """chmod each lower file: a metadata-only change that needs a copy-up."""
    paths = _load_list(spec["list"], spec.get("limit"))

    def run() -> int:
        for p in paths:
            os.chmod(p, 0o600)
        return len(paths)

    return run


def op_create(spec: dict[str, Any]) -> Callable[[], int]:
    """Create ``count`` new 100-byte files spread over ``dirs`` new directories."""
    count, ndirs = int(spec["count"]), int(spec.get("dirs", 10))
    payload = b"b" * 100
    flags = os.O_CREAT | os.O_EXCL | os.O_WRONLY
    names = [f"bench-create/d{i % ndirs}/f{i}" for i in range(count)]

    def run() -> int:
        os.mkdir("bench-create")
        for i in range(ndirs):
            os.mkdir(f"bench-create/d{i}")
        for name in names:
            fd = os.open(name, flags, 0o644)
            os.write(fd, payload)
            os.close(fd)
        return count

    return run


def op_untar(spec: dict[str, Any]) -> Callable[[], int]:
    """Extract a tarball into a new directory with GNU tar."""
    tarball = spec["tarball"]

    def run() -> int:
        os.mkdir("bench-untar")
        subprocess.run(["tar", "-xf", tarball, "-C", "bench-untar"], check=True)
        return int(spec.get("files", 0))

    return run


def op_unlink(spec: dict[str, Any]) -> Callable[[], int]:
    """Unlink each lower file (each leaves a whiteout in the upper)."""
    paths = _load_list(spec["list"], spec.get("limit"))

    def run() -> int:
        for p in paths:
            os.unlink(p)
        return len(paths)

    return run


def op_rename(spec: dict[str, Any]) -> Callable[[], int]:
    """Rename each lower file within its directory (copy-up, rename, whiteout)."""
    paths = _load_list(spec["list"], spec.get("limit"))

    def run() -> int:
        for p in paths:
            os.rename(p, p + ".renamed")
        return len(paths)

    return run


def op_walk(spec: dict[str, Any]) -> Callable[[], int]:
    """Walk the whole tree below ``dir`` and lstat every entry."""
    top = spec.get("dir", ".")

    def run() -> int:
        n = 0
        stack = [top]
        while stack:
            d = stack.pop()
            with os.scandir(d) as it:
                for entry in it:
                    st = os.lstat(entry.path)
                    n += 1
                    if (st.st_mode & 0o170000) == 0o040000:
                        stack.append(entry.path)
        return n

    return run


OPS: dict[str, Callable[[dict[str, Any]], Callable[[], int]]] = {
    "stat": op_stat,
    "listdir": op_listdir,
    "seqread": op_seqread,
    "randread": op_randread,
    "orc": op_orc,
    "copyup": op_copyup,
    "chmod": op_chmod,
    "create": op_create,
    "untar": op_untar,
    "unlink": op_unlink,
    "rename": op_rename,
    "walk": op_walk,
}


def _prewarm(paths: list[str]) -> None:
    """Read files (outside the mount) so their data sits in the page cache."""
    buf = bytearray(_READ_CHUNK)
    for p in paths:
        with open(p, "rb", buffering=0) as fh:
            while fh.readinto(buf):
                pass


def measure(spec: dict[str, Any]) -> dict[str, Any]:
    """Prepare the workload, optionally run it once untimed, then time one run."""
    _prewarm(spec.get("prewarm", []))
    os.chdir(spec["root"])
    run = OPS[spec["op"]](spec)
    if spec.get("warmup"):
        run()
    t0 = time.perf_counter()
    ops = run()
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "ops": ops}


def main(argv: list[str]) -> int:
    """Entry point: ``worker.py SPEC_JSON``."""
    spec = json.loads(argv[1])
    print(json.dumps(measure(spec)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
