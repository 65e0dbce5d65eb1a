"""The write-operation model: one random operation applied identically to two mounts.

Operations are drawn from the *kernel's* current view (paths found by a no-follow walk) and
applied through directory file descriptors opened with ``O_NOFOLLOW`` at every component, so a
symlink in a layer (``etc -> /etc``) can never redirect a test write outside the mount.  Each
application returns a comparable :class:`Result`: the errno name, or "ok" plus the post-op
lstat summary of the paths involved (and the times after ``utime``).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import random
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tests.oracle.tree import file_digest, iter_tree, kind_of

RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)

KINDS = (
    "write",
    "truncate",
    "chmod",
    "chown",
    "utime",
    "mkdir",
    "mkfifo",
    "symlink",
    "link",
    "unlink",
    "rmdir",
    "rename",
    "rename_noreplace",
    "rename_exchange",
    "setxattr",
    "removexattr",
    "read",
)
WEIGHTS = (6, 2, 2, 2, 2, 3, 1, 1, 2, 4, 3, 3, 1, 1, 2, 1, 1)
NEW_NAMES = ("n0", "n1", "n2", "a", "b", "c")


@dataclass(frozen=True)
class Op:
    """One operation: ``kind`` and its arguments (paths are relative to the mount root)."""

    kind: str
    path: str
    path2: str = ""
    arg: object = None

    def __str__(self) -> str:
        extra = f" -> {self.path2}" if self.path2 else ""
        arg = "" if self.arg is None else f", {_short(self.arg)}"
        return f"{self.kind}({self.path}{extra}{arg})"


def _short(value: object) -> str:
    """repr with long byte strings abbreviated to their length."""
    if isinstance(value, bytes) and len(value) > 16:
        return f"<{len(value)} bytes>"
    if isinstance(value, tuple):
        return "(" + ", ".join(_short(v) for v in value) + ")"
    return repr(value)


@dataclass(frozen=True)
class Result:
    """What an operation gave: ``"ok"`` or an errno name, and a post-op summary."""

    outcome: str
    detail: tuple[object, ...] = ()


def renameat2(olddirfd: int, old: str, newdirfd: int, new: str, flags: int) -> None:
    """``renameat2(2)`` through ctypes (raises OSError)."""
    res = _libc.renameat2(olddirfd, os.fsencode(old), newdirfd, os.fsencode(new), flags)
    if res != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


@contextmanager
def parent_fd(root: Path, rel: str) -> Iterator[tuple[int, str]]:
    """Open the parent directory of ``rel`` below ``root`` component by component, never
    following a symlink; yield ``(dir fd, final name)``."""
    parts = rel.split("/")
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for comp in parts[:-1]:
            nfd = os.open(comp, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            os.close(fd)
            fd = nfd
        yield fd, parts[-1]
    finally:
        os.close(fd)


def summary(root: Path, rel: str, times: bool = False) -> tuple[object, ...]:
    """lstat summary of ``rel`` (type, mode, owner, size/nlink for non-dirs, content digest)."""
    try:
        with parent_fd(root, rel) as (fd, name):
            st = os.stat(name, dir_fd=fd, follow_symlinks=False)
            kind = kind_of(st.st_mode)
            out: tuple[object, ...] = (kind, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid)
            if kind != "dir":
                out += (st.st_size, st.st_nlink)
            if kind == "reg":
                out += (file_digest(f"/proc/self/fd/{fd}/{name}"),)
            if times:
                out += (st.st_atime_ns, st.st_mtime_ns)
            return out
    except OSError as exc:
        return ("missing", errno.errorcode.get(exc.errno or 0, str(exc.errno)))


def _xattr_path(fd: int, name: str) -> str:
    return f"/proc/self/fd/{fd}/{name}"


def apply(root: Path, op: Op) -> Result:
    """Apply ``op`` below ``root``; never raises for an errno, returns it."""
    try:
        _apply(root, op)
    except OSError as exc:
        return Result(errno.errorcode.get(exc.errno or 0, str(exc.errno)))
    except (NotImplementedError, ValueError):
        # Python refuses chmod of a symlink without following it (fchmodat says ENOTSUP).
        return Result("ENOTSUP")
    paths = [p for p in (op.path, op.path2) if p]
    return Result("ok", tuple(summary(root, p, times=op.kind == "utime") for p in paths))


def _apply(root: Path, op: Op) -> None:
    k = op.kind
    if k in ("rename", "rename_noreplace", "rename_exchange", "link"):
        with parent_fd(root, op.path) as (fa, na), parent_fd(root, op.path2) as (fb, nb):
            if k == "link":
                os.link(na, nb, src_dir_fd=fa, dst_dir_fd=fb, follow_symlinks=False)
            elif k == "rename":
                os.rename(na, nb, src_dir_fd=fa, dst_dir_fd=fb)
            else:
                flag = RENAME_NOREPLACE if k == "rename_noreplace" else RENAME_EXCHANGE
                renameat2(fa, na, fb, nb, flag)
        return
    with parent_fd(root, op.path) as (fd, name):
        if k == "write":
            mode, data, offset = op.arg  # type: ignore[misc]
            flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK
            flags |= {"trunc": os.O_TRUNC, "append": os.O_APPEND, "excl": os.O_EXCL}.get(mode, 0)
            f = os.open(name, flags, 0o640, dir_fd=fd)
            try:
                if mode == "plain":
                    os.lseek(f, offset, os.SEEK_SET)
                if data:
                    os.write(f, data)
            finally:
                os.close(f)
        elif k == "truncate":
            f = os.open(name, os.O_WRONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=fd)
            try:
                os.ftruncate(f, op.arg)  # type: ignore[arg-type]
            finally:
                os.close(f)
        elif k == "read":
            f = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=fd)
            os.close(f)
        elif k == "chmod":
            os.chmod(name, op.arg, dir_fd=fd, follow_symlinks=False)  # type: ignore[arg-type]
        elif k == "chown":
            uid, gid = op.arg  # type: ignore[misc]
            os.chown(name, uid, gid, dir_fd=fd, follow_symlinks=False)
        elif k == "utime":
            os.utime(name, ns=op.arg, dir_fd=fd, follow_symlinks=False)  # type: ignore[arg-type]
        elif k == "mkdir":
            os.mkdir(name, op.arg, dir_fd=fd)  # type: ignore[arg-type]
        elif k == "mkfifo":
            os.mkfifo(name, 0o644, dir_fd=fd)
        elif k == "symlink":
            os.symlink(op.arg, name, dir_fd=fd)  # type: ignore[arg-type]
        elif k == "unlink":
            os.unlink(name, dir_fd=fd)
        elif k == "rmdir":
            os.rmdir(name, dir_fd=fd)
        elif k == "setxattr":
            key, value = op.arg  # type: ignore[misc]
            os.setxattr(_xattr_path(fd, name), key, value, follow_symlinks=False)
        elif k == "removexattr":
            os.removexattr(_xattr_path(fd, name), op.arg, follow_symlinks=False)  # type: ignore[arg-type]
        else:
            raise ValueError(f"unknown op {k}")


def random_op(
    rng: random.Random, root: Path, under: str, exclude: frozenset[str] = frozenset()
) -> Op:
    """Draw one operation on the tree at ``root/under`` as it is now (walked without following).

    Targets are existing names (any type) or new names in existing directories; device nodes
    are never opened (a FUSE mount may be ``nodev``), only changed by metadata operations.
    """
    entries = list(iter_tree(root, under))
    dirs = [under] + [p for p, st in entries if stat.S_ISDIR(st.st_mode)]
    kinds = {p: kind_of(st.st_mode) for p, st in entries}
    allowed = [(k, w) for k, w in zip(KINDS, WEIGHTS) if k not in exclude]
    kind = rng.choices([k for k, _ in allowed], [w for _, w in allowed])[0]

    def existing() -> str:
        return rng.choice([p for p, _ in entries]) if entries else new()

    def new() -> str:
        return f"{rng.choice(dirs)}/{rng.choice(NEW_NAMES)}"

    def any_path() -> str:
        return existing() if rng.random() < 0.7 else new()

    if kind in ("write", "truncate", "read"):
        path = any_path()
        if kinds.get(path) in ("chr", "blk"):
            kind, path = "chmod", path
    if kind == "write":
        mode = rng.choice(("trunc", "append", "plain", "excl"))
        data = rng.randbytes(rng.choice((0, 1, 10, 5000)))
        return Op("write", path, arg=(mode, data, rng.choice((0, 3, 8192))))
    if kind == "truncate":
        return Op("truncate", path, arg=rng.choice((0, 1, 100, 70000)))
    if kind == "read":
        return Op("read", path)
    if kind == "chmod":
        return Op("chmod", any_path(), arg=rng.choice((0o600, 0o755, 0o4755, 0o1777, 0o000)))
    if kind == "chown":
        return Op(
            "chown", any_path(), arg=(rng.choice((0, 1000, 65534, -1)), rng.choice((0, 1000, -1)))
        )
    if kind == "utime":
        t = rng.randint(0, 2**33) * 10**9 + rng.randint(0, 10**9 - 1)
        return Op("utime", any_path(), arg=(t, t + rng.randint(0, 10**12)))
    if kind == "mkdir":
        return Op("mkdir", any_path(), arg=rng.choice((0o755, 0o700)))
    if kind == "mkfifo":
        return Op("mkfifo", any_path())
    if kind == "symlink":
        return Op("symlink", any_path(), arg=rng.choice(("/etc", "../..", "a", "n0")))
    if kind in ("unlink", "rmdir"):
        return Op(kind, existing() if rng.random() < 0.9 else new())
    if kind in ("link", "rename", "rename_noreplace", "rename_exchange"):
        return Op(kind, existing(), any_path())
    if kind == "setxattr":
        return Op("setxattr", any_path(), arg=(rng.choice(("user.a", "user.b")), rng.randbytes(3)))
    return Op("removexattr", any_path(), arg=rng.choice(("user.a", "user.b", "user.k0")))
