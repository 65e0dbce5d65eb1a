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


# -- container workloads (issue 14) ------------------------------------------------------------


def op_rt_fstat(spec: dict[str, Any]) -> Callable[[], int]:
    """``fstat`` of one open file, ``count`` times: what a program sees (the kernel may cache)."""
    count = int(spec["count"])
    fd = os.open(spec["file"], os.O_RDONLY)
    fstat = os.fstat

    def run() -> int:
        for _ in range(count):
            fstat(fd)
        return count

    return run


_AT_EMPTY_PATH, _AT_STATX_FORCE_SYNC, _STATX_BASIC_STATS = 0x1000, 0x2000, 0x7FF


def op_rt_getattr(spec: dict[str, Any]) -> Callable[[], int]:
    """``statx(fd, "", AT_EMPTY_PATH | AT_STATX_FORCE_SYNC)``: one GETATTR round trip each.

    FORCE_SYNC makes a FUSE mount ask the daemon whatever its attribute timeout; on a local
    filesystem it is a plain ``fstat``.
    """
    import ctypes

    count = int(spec["count"])
    libc = ctypes.CDLL(None, use_errno=True)
    statx = libc.statx
    statx.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_uint, ctypes.c_void_p]
    buf = ctypes.create_string_buffer(256)
    fd = os.open(spec["file"], os.O_RDONLY)
    flags, mask = _AT_EMPTY_PATH | _AT_STATX_FORCE_SYNC, _STATX_BASIC_STATS
    if statx(fd, b"", flags, mask, buf) != 0:
        raise OSError(ctypes.get_errno(), "statx")

    def run() -> int:
        for _ in range(count):
            statx(fd, b"", flags, mask, buf)
        return count

    return run


def op_rt_getxattr(spec: dict[str, Any]) -> Callable[[], int]:
    """``fgetxattr(fd, "security.capability")`` of an open file that has none (ENODATA):
    the kernel caches no xattrs for FUSE, so each call is one GETXATTR round trip."""
    import errno

    count = int(spec["count"])
    fd = os.open(spec["file"], os.O_RDONLY)
    getx = os.getxattr

    def run() -> int:
        for _ in range(count):
            try:
                getx(fd, "security.capability")
            except OSError as exc:
                if exc.errno != errno.ENODATA:
                    raise
        return count

    return run


def op_rt_neglookup(spec: dict[str, Any]) -> Callable[[], int]:
    """``lstat`` of ``count`` distinct missing names in a lower dir (never a negative-cache hit)."""
    count = int(spec["count"])
    names = [f"{spec['dir']}/missing-{os.getpid()}-{i}" for i in range(count)]
    lstat = os.lstat

    def run() -> int:
        for n in names:
            try:
                lstat(n)
            except FileNotFoundError:
                pass
            else:
                raise RuntimeError(f"{n} exists")
        return count

    return run


def op_rt_create(spec: dict[str, Any]) -> Callable[[], int]:
    """create (O_EXCL) + write 100 bytes + close, ``count`` files in one new directory."""
    count = int(spec["count"])
    os.mkdir("rt-create")
    names = [f"rt-create/c{i}" for i in range(count)]
    payload = b"c" * 100
    flags = os.O_CREAT | os.O_EXCL | os.O_WRONLY
    o_open, o_write, o_close = os.open, os.write, os.close

    def run() -> int:
        for n in names:
            fd = o_open(n, flags, 0o644)
            o_write(fd, payload)
            o_close(fd)
        return count

    return run


def op_xwalk(spec: dict[str, Any]) -> Callable[[], int]:
    """Walk the tree; ``lstat`` every entry, and with ``xattrs`` also ``getxattr``
    ``security.capability`` and ``listxattr`` (no-follow), as containers-storage does."""
    import errno

    xattrs = bool(spec.get("xattrs"))
    lstat, getx, listx = os.lstat, os.getxattr, os.listxattr
    missing = (errno.ENODATA, errno.ENOTSUP)

    def run() -> int:
        n = 0
        stack = ["."]
        while stack:
            d = stack.pop()
            with os.scandir(d) as it:
                names = [e.path for e in it]
            for path in names:
                st = lstat(path)
                n += 1
                if xattrs:
                    try:
                        getx(path, "security.capability", follow_symlinks=False)
                    except OSError as exc:
                        if exc.errno not in missing:
                            raise
                    listx(path, follow_symlinks=False)
                if (st.st_mode & 0o170000) == 0o040000:
                    stack.append(path)
        return n

    return run


def op_unpack(spec: dict[str, Any]) -> Callable[[], int]:
    """Unpack a package as dpkg does (``--unpack`` of a package that replaces files).

    For each file: a hard-link backup ``NAME.dpkg-tmp`` of an existing file, then the new
    content written to ``NAME.dpkg-new`` (O_EXCL), ``fchown``, ``fchmod``, ``futimens``,
    close; then, per file, ``fsync`` of the new file and ``rename`` over the old name; at
    the end the backups are removed.  New directories are made first.  The mount's fsync
    policy decides what the fsyncs cost.
    """
    with open(spec["manifest"], encoding="utf-8") as fh:
        manifest = json.load(fh)
    files = [(str(n), int(size), bool(old)) for n, size, old in manifest["files"]]
    new_dirs = list(manifest["new_dirs"])
    payload = random.Random(7).randbytes(16384)
    flags = os.O_CREAT | os.O_EXCL | os.O_WRONLY
    mtime = 1_700_000_000 * 10**9

    def run() -> int:
        for d in new_dirs:
            os.mkdir(d, 0o755)
        for name, size, old in files:
            if old:
                os.link(name, name + ".dpkg-tmp")
            fd = os.open(name + ".dpkg-new", flags, 0o600)
            os.write(fd, payload[:size])
            os.fchown(fd, 0, 0)
            os.fchmod(fd, 0o644)
            os.utime(fd, ns=(mtime, mtime))
            os.close(fd)
        for name, _size, _old in files:
            fd = os.open(name + ".dpkg-new", os.O_WRONLY)
            os.fsync(fd)
            os.close(fd)
            os.rename(name + ".dpkg-new", name)
        for name, _size, old in files:
            if old:
                os.unlink(name + ".dpkg-tmp")
        return len(files)

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
    "rt_fstat": op_rt_fstat,
    "rt_getattr": op_rt_getattr,
    "rt_getxattr": op_rt_getxattr,
    "rt_neglookup": op_rt_neglookup,
    "rt_create": op_rt_create,
    "xwalk": op_xwalk,
    "unpack": op_unpack,
}


class _PerfControl:
    """Enables a ``perf stat -D -1 --control`` counter around the timed run only."""

    def __init__(self, ctl: str, ack: str) -> None:
        self.ctl = os.open(ctl, os.O_WRONLY)
        self.ack = os.open(ack, os.O_RDONLY)

    def _say(self, word: str) -> None:
        os.write(self.ctl, word.encode() + b"\n")
        got = b""
        while b"\n" not in got:  # perf answers b"ack\\n\\0"
            chunk = os.read(self.ack, 64)
            if not chunk:
                raise RuntimeError("perf closed its ack fifo")
            got += chunk

    def enable(self) -> None:
        """Start counting (returns once perf acknowledged)."""
        self._say("enable")

    def disable(self) -> None:
        """Stop counting."""
        self._say("disable")


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
    perf = _PerfControl(spec["perf_ctl"], spec["perf_ack"]) if spec.get("perf_ctl") else None
    if perf:
        perf.enable()
    t0 = time.perf_counter()
    ops = run()
    seconds = time.perf_counter() - t0
    if perf:
        perf.disable()
    return {"seconds": seconds, "ops": ops}


def main(argv: list[str]) -> int:
    """Entry point: ``worker.py SPEC_JSON``."""
    spec = json.loads(argv[1])
    print(json.dumps(measure(spec)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
