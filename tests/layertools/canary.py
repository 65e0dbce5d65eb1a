"""A canary tree outside every layer, and a snapshot of everything an attack could change in it.

Security tests make one with :func:`make_canary`, take :func:`canary_state` before the attack
and assert it is equal afterwards: content, type and mode, owner, size, times (mtime and
ctime, so even a chmod back to the same mode shows) and every xattr, ``trusted.`` included.
The walk goes through directory descriptors without following symlinks.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

CanaryState = dict[str, tuple[object, ...]]


def make_canary(root: Path) -> Path:
    """``root/canary``: a file, a directory with a file, with odd modes, owners and xattrs."""
    canary = root / "canary"
    (canary / "dir").mkdir(parents=True)
    files = {canary / "secret": b"do not touch\n", canary / "dir" / "keep": b"keep me\n" * 100}
    for path, data in files.items():
        path.write_bytes(data)
    os.chmod(canary / "secret", 0o640)
    os.chmod(canary / "dir", 0o751)
    for path in [canary / "secret", canary / "dir", canary / "dir" / "keep"]:
        if os.geteuid() == 0:
            os.chown(path, 1234, 5678)
            os.setxattr(path, "trusted.canary", b"t")
        os.setxattr(path, "user.canary", b"u-" + path.name.encode())
    for path in [canary / "secret", canary / "dir" / "keep", canary / "dir"]:
        os.utime(path, ns=(1_000_000_000, 2_000_000_000))
    return canary


def canary_state(root: Path) -> CanaryState:
    """Type, mode, owner, size, mtime, ctime, content and xattrs of every path under ``root``."""
    out: CanaryState = {}
    root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    stack: list[tuple[int, str]] = [(root_fd, ".")]
    out["."] = _state(root_fd, None)
    try:
        while stack:
            fd, rel = stack.pop()
            try:
                for name in sorted(os.listdir(fd)):
                    child = name if rel == "." else f"{rel}/{name}"
                    st = os.stat(name, dir_fd=fd, follow_symlinks=False)
                    if stat.S_ISDIR(st.st_mode):
                        sub = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
                        out[child] = _state(sub, None)
                        stack.append((sub, child))
                    else:
                        out[child] = _state(fd, name)
            finally:
                os.close(fd)
    finally:
        for fd, _rel in stack:
            os.close(fd)
    return out


def _state(fd: int, name: str | None) -> tuple[object, ...]:
    """The state of ``name`` in directory ``fd``, or of ``fd`` itself when ``name`` is None."""
    if name is None:
        st = os.fstat(fd)
        proc = f"/proc/self/fd/{fd}"
    else:
        st = os.stat(name, dir_fd=fd, follow_symlinks=False)
        proc = f"/proc/self/fd/{fd}/{name}"
    data = b""
    if stat.S_ISREG(st.st_mode):
        file_fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW, dir_fd=fd) if name else -1
        try:
            with open(file_fd, "rb", closefd=False) as f:
                data = f.read()
        finally:
            os.close(file_fd)
    xattrs: tuple[tuple[str, bytes], ...] = ()
    if not stat.S_ISLNK(st.st_mode):
        xattrs = tuple(sorted((x, os.getxattr(proc, x)) for x in os.listxattr(proc)))
    return (
        st.st_mode,
        st.st_uid,
        st.st_gid,
        st.st_size,
        st.st_mtime_ns,
        st.st_ctime_ns,
        data,
        xattrs,
    )
