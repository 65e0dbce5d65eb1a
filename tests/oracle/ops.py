"""The write-operation model: one random operation applied identically to two mounts.

Operations are drawn from the *kernel's* current view (paths found by a no-follow walk) and
applied through directory file descriptors opened with ``O_NOFOLLOW`` at every component, so a
symlink in a layer (``etc -> /etc``) can never redirect a test write outside the mount, and
paths longer than PATH_MAX work.  Each application returns a comparable :class:`Result`: the
errno name, or "ok" plus the return value and the post-op lstat summary of the paths involved.

Every operation carries the caller's credentials and umask (:class:`Caller`).  Root operations
run in this process under ``os.umask``; others run in a forked child that calls
``setgroups``/``setgid``/``setuid`` first, for both backends the same way.  ``open`` keeps its
file descriptor as a *handle* (slot ``n`` of :class:`Runner`, passed back from a child with
``SCM_RIGHTS``); ``h*`` operations use a handle later (pread, pwrite, fstat, ftruncate,
fallocate, reopen through ``/proc/self/fd``), also after its name was unlinked or renamed over.
A forked child inherits the handles, so writes through them run with the caller's credentials
(``file_remove_privs`` depends on them).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import hashlib
import os
import pickle
import random
import socket
import stat
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from tests.oracle.tree import file_digest, iter_tree, kind_of

RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
XATTR_CREATE = 1
XATTR_REPLACE = 2
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_COLLAPSE_RANGE = 0x08
FALLOC_FL_ZERO_RANGE = 0x10
FALLOC_FL_INSERT_RANGE = 0x20
#: Every fallocate mode the kernel's overlay passes on to an ext4/xfs upper.
FALLOC_MODES = (
    0,
    FALLOC_FL_KEEP_SIZE,
    FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
    FALLOC_FL_ZERO_RANGE,
    FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE,
    FALLOC_FL_COLLAPSE_RANGE,
    FALLOC_FL_INSERT_RANGE,
)
O_TMPFILE = getattr(os, "O_TMPFILE", 0o20200000)
O_PATH = getattr(os, "O_PATH", 0o10000000)
O_NOATIME = getattr(os, "O_NOATIME", 0o1000000)

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]

KINDS = (
    "write",
    "truncate",
    "chmod",
    "chown",
    "utime",
    "mkdir",
    "mkfifo",
    "mknod",
    "symlink",
    "link",
    "unlink",
    "rmdir",
    "rename",
    "rename_noreplace",
    "rename_exchange",
    "setxattr",
    "removexattr",
    "getxattr",
    "listxattr",
    "read",
    "fallocate",
    "open",
    "deep",
    "hread",
    "hwrite",
    "hstat",
    "htrunc",
    "hfalloc",
    "hreopen",
    "hclose",
)
WEIGHTS = (
    6,
    2,
    2,
    2,
    2,
    3,
    1,
    1,
    1,
    2,
    4,
    3,
    3,
    1,
    1,
    2,
    1,
    1,
    1,
    1,
    2,
    5,
    0.15,
    2,
    3,
    3,
    1,
    2,
    1,
    1,
)
#: Operations that use a handle (slot) instead of a path.
HANDLE_KINDS = frozenset({"hread", "hwrite", "hstat", "htrunc", "hfalloc", "hreopen", "hclose"})
NAME_255 = "L" * 255
NAME_256 = "M" * 256
NEW_NAMES = ("n0", "n1", "n2", "a", "b", "c", NAME_255, NAME_256)
XATTR_NAMES = (
    "user.a",
    "user.b",
    "user.k0",
    "trusted.a",
    "security.t",
    "trusted.overlay.x",
    "trusted.overlay.opaque",
    "trusted.overlay.whiteout",
    "trusted.overlay.origin",
    "trusted.overlay.overlay.y",
    "user.overlay.opaque",
)
# Not drawn: trusted.unionfs.* (unionfs hides its old origin xattr, as issue 10 asks, so it
# cannot be set through the mount either; the kernel would store it as a plain xattr).


@dataclass(frozen=True)
class Caller:
    """Who runs an operation: uid, gid, supplementary groups and umask."""

    uid: int = 0
    gid: int = 0
    groups: tuple[int, ...] = ()
    umask: int = 0o022

    def __str__(self) -> str:
        g = ",".join(map(str, self.groups))
        return f"{self.uid}:{self.gid}[{g}]/{self.umask:03o}"


ROOT = Caller()
#: Non-root identities (their groups match the owners the layer generator uses).
USERS = (
    (1000, 1000, (1000,)),
    (1000, 1000, (1000, 65534)),
    (65534, 65534, ()),
    (1000, 65534, ()),
)
UMASKS = (0o000, 0o002, 0o022, 0o027)


@dataclass(frozen=True)
class Op:
    """One operation: ``kind`` and its arguments (paths are relative to the mount root).

    Handle operations name their handle slot in ``arg[0]``.
    """

    kind: str
    path: str = ""
    path2: str = ""
    arg: object = None
    caller: Caller = ROOT

    def __str__(self) -> str:
        extra = f" -> {_short(self.path2)}" if self.path2 else ""
        arg = "" if self.arg is None else f", {_short(self.arg)}"
        who = "" if self.caller == ROOT else f" as {self.caller}"
        return f"{self.kind}({_short(self.path)}{extra}{arg}){who}"


def _short(value: object) -> str:
    """repr with long byte strings and paths abbreviated."""
    if isinstance(value, bytes) and len(value) > 16:
        return f"<{len(value)} bytes>"
    if isinstance(value, str) and len(value) > 40:
        parts = value.split("/")
        return "/".join(p if len(p) < 20 else f"<{len(p)}{p[0]}>" for p in parts)
    if isinstance(value, tuple):
        return "(" + ", ".join(_short(v) for v in value) + ")"
    if isinstance(value, int) and value > 7:
        return hex(value)
    return repr(value)


@dataclass(frozen=True)
class Result:
    """What an operation gave: ``"ok"`` or an errno name, and a post-op summary."""

    outcome: str
    detail: tuple[object, ...] = ()


def _check(res: int) -> int:
    if res < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    return res


def renameat2(olddirfd: int, old: str, newdirfd: int, new: str, flags: int) -> None:
    """``renameat2(2)`` through ctypes (raises OSError)."""
    _check(_libc.renameat2(olddirfd, os.fsencode(old), newdirfd, os.fsencode(new), flags))


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """``fallocate(2)`` through ctypes with any mode (raises OSError)."""
    _check(_libc.fallocate(fd, mode, offset, length))


def mknodat(dirfd: int, name: str, mode: int, dev: int) -> None:
    """``mknodat(2)`` (any type, also regular files and sockets)."""
    os.mknod(name, mode, dev, dir_fd=dirfd)


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
        return ("missing", _ename(exc))


def fd_summary(fd: int) -> tuple[object, ...]:
    """fstat summary of a handle: type, mode, owner, nlink, and size for non-directories.

    A directory's link count is not comparable (merged directories say 1), only whether it
    is 0 (removed) or not."""
    st = os.fstat(fd)
    kind = kind_of(st.st_mode)
    out: tuple[object, ...] = (kind, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid)
    if kind == "dir":
        return (*out, st.st_nlink > 0)
    return (*out, st.st_size, st.st_nlink)


def _ename(exc: OSError) -> str:
    return errno.errorcode.get(exc.errno or 0, str(exc.errno))


def _xattr_path(fd: int, name: str) -> str:
    return f"/proc/self/fd/{fd}/{name}"


@dataclass
class Runner:
    """Applies operations below one mount root and keeps that side's open handles.

    Both sides of a comparison have one Runner each; handle slots are appended in the same
    order on both (a failed open takes a slot too, holding None), so slot ``n`` names the
    same logical handle on both sides.
    """

    root: Path
    handles: list[int | None] = field(default_factory=list)
    flags: list[int] = field(default_factory=list)

    def open_slots(self) -> list[tuple[int, int]]:
        """``(slot, open flags)`` of the handles that are open."""
        return [(i, self.flags[i]) for i, fd in enumerate(self.handles) if fd is not None]

    def close(self) -> list[tuple[int, str]]:
        """Close every handle (before an unmount); return ``(slot, errno name)`` for each
        close(2) that failed (the kernel's overlay never fails one)."""
        errors = []
        for i, fd in enumerate(self.handles):
            if fd is not None:
                self.handles[i] = None
                try:
                    os.close(fd)
                except OSError as exc:
                    errors.append((i, _ename(exc)))
        return errors

    def apply(self, op: Op) -> Result:
        """Apply ``op`` as its caller; never raises for an errno, returns it."""
        fn = _OPS[op.kind]
        if op.caller == ROOT:
            old = os.umask(op.caller.umask)
            try:
                outcome, value, fd = _run(fn, self, op)
            finally:
                os.umask(old)
        else:
            outcome, value, fd = _in_child(fn, self, op)
        if op.kind == "open":
            self.handles.append(fd)
            self.flags.append(op.arg[0] if isinstance(op.arg, tuple) else 0)  # type: ignore[index]
        elif op.kind == "hclose" and outcome == "ok":
            slot = op.arg[0]  # type: ignore[index]
            fd = self.handles[slot]
            self.handles[slot] = None
            if fd is not None:
                try:
                    os.close(fd)
                except OSError as exc:
                    return Result(_ename(exc), ("close",))
        elif fd is not None:
            os.close(fd)
        if outcome != "ok":
            return Result(outcome)
        paths = [p for p in (op.path, op.path2) if p]
        post = tuple(summary(self.root, p, times=op.kind == "utime") for p in paths)
        if op.kind in HANDLE_KINDS and op.kind != "hclose":
            hfd = self.handles[op.arg[0]]  # type: ignore[index]
            if hfd is not None:
                try:
                    post += (fd_summary(hfd),)
                except OSError as exc:
                    post += (("fstat", _ename(exc)),)
        return Result("ok", (value, *post))


def _run(
    fn: Callable[[Runner, Op], object], runner: Runner, op: Op
) -> tuple[str, object, int | None]:
    """Run ``fn``; return ``(outcome, value, fd to keep or None)``."""
    try:
        value = fn(runner, op)
    except OSError as exc:
        return _ename(exc), None, None
    except (NotImplementedError, ValueError):
        # Python refuses chmod of a symlink without following it (fchmodat says ENOTSUP).
        return "ENOTSUP", None, None
    if isinstance(value, _Fd):
        return "ok", value.value, value.fd
    return "ok", value, None


@dataclass
class _Fd:
    """An operation's result that carries a new file descriptor to keep as a handle."""

    fd: int
    value: object


def _in_child(
    fn: Callable[[Runner, Op], object], runner: Runner, op: Op
) -> tuple[str, object, int | None]:
    """Run ``fn`` in a forked child with the caller's groups, gid, uid and umask.

    The result comes back pickled over a socketpair, a new fd with ``SCM_RIGHTS``.
    """
    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        code = 0
        try:
            parent.close()
            c = op.caller
            os.umask(c.umask)
            os.setgroups(list(c.groups))
            os.setresgid(c.gid, c.gid, c.gid)
            os.setresuid(c.uid, c.uid, c.uid)
            outcome, value, fd = _run(fn, runner, op)
            data = pickle.dumps((outcome, value, fd is not None))
            socket.send_fds(
                child, [len(data).to_bytes(4, "little")], [fd] if fd is not None else []
            )
            child.sendall(data)
        except BaseException:
            code = 1
            try:
                data = pickle.dumps(("CHILD-ERROR", traceback.format_exc(), False))
                child.sendall(len(data).to_bytes(4, "little") + data)
            except BaseException:
                pass
        finally:
            os._exit(code)
    child.close()
    try:
        head, fds, _flags, _addr = socket.recv_fds(parent, 4, 1)
        n = int.from_bytes(head, "little")
        buf = b""
        while len(buf) < n:
            chunk = parent.recv(n - len(buf))
            if not chunk:
                break
            buf += chunk
    finally:
        parent.close()
        os.waitpid(pid, 0)
    outcome, value, has_fd = pickle.loads(buf)
    if outcome == "CHILD-ERROR":
        raise RuntimeError(f"operation {op} crashed in the child:\n{value}")
    return outcome, value, (fds[0] if has_fd and fds else None)


# ---------------------------------------------------------------------------------------------
# The operations.  Each takes (runner, op), raises OSError for an errno, and returns a
# comparable value (or an _Fd to keep as a handle).


def _two(runner: Runner, op: Op) -> object:
    k = op.kind
    with parent_fd(runner.root, op.path) as (fa, na), parent_fd(runner.root, op.path2) as (fb, nb):
        if k == "link":
            os.link(na, nb, src_dir_fd=fa, dst_dir_fd=fb, follow_symlinks=False)
        elif k == "rename":
            os.rename(na, nb, src_dir_fd=fa, dst_dir_fd=fb)
        else:
            flag = RENAME_NOREPLACE if k == "rename_noreplace" else RENAME_EXCHANGE
            renameat2(fa, na, fb, nb, flag)
    return None


def _write(runner: Runner, op: Op) -> object:
    mode, data, offset = op.arg  # type: ignore[misc]
    flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK
    flags |= {"trunc": os.O_TRUNC, "append": os.O_APPEND, "excl": os.O_EXCL}.get(mode, 0)
    with parent_fd(runner.root, op.path) as (fd, name):
        f = os.open(name, flags, 0o640, dir_fd=fd)
        try:
            if mode == "plain":
                os.lseek(f, offset, os.SEEK_SET)
            return os.write(f, data) if data else 0
        finally:
            os.close(f)


def _truncate(runner: Runner, op: Op) -> object:
    with parent_fd(runner.root, op.path) as (fd, name):
        f = os.open(name, os.O_WRONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=fd)
        try:
            os.ftruncate(f, op.arg)  # type: ignore[arg-type]
        finally:
            os.close(f)
    return None


def _fallocate(runner: Runner, op: Op) -> object:
    mode, off, length = op.arg  # type: ignore[misc]
    with parent_fd(runner.root, op.path) as (fd, name):
        f = os.open(name, os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=fd)
        try:
            fallocate(f, mode, off, length)
        finally:
            os.close(f)
    return None


def _read(runner: Runner, op: Op) -> object:
    with parent_fd(runner.root, op.path) as (fd, name):
        f = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=fd)
        try:
            return hashlib.sha256(os.pread(f, 1 << 20, 0)).hexdigest()[:16]
        finally:
            os.close(f)


def _open(runner: Runner, op: Op) -> object:
    flags, mode = op.arg  # type: ignore[misc]
    with parent_fd(runner.root, op.path) as (fd, name):
        f = os.open(name, flags, mode, dir_fd=fd)
    try:
        value = fd_summary(f)
    except OSError as exc:
        value = ("fstat", _ename(exc))
    return _Fd(f, value)


def _path_op(runner: Runner, op: Op) -> object:
    k = op.kind
    with parent_fd(runner.root, op.path) as (fd, name):
        if k == "chmod":
            os.chmod(name, op.arg, dir_fd=fd, follow_symlinks=False)  # type: ignore[arg-type]
        elif k == "chown":
            uid, gid = op.arg  # type: ignore[misc]
            os.chown(name, uid, gid, dir_fd=fd, follow_symlinks=False)
        elif k == "utime":
            os.utime(name, ns=op.arg, dir_fd=fd, follow_symlinks=False)  # type: ignore[arg-type]
        elif k == "mkdir":
            os.mkdir(name, op.arg, dir_fd=fd)  # type: ignore[arg-type]
        elif k == "mkfifo":
            os.mkfifo(name, 0o666, dir_fd=fd)
        elif k == "mknod":
            mode, major, minor = op.arg  # type: ignore[misc]
            mknodat(fd, name, mode, os.makedev(major, minor))
        elif k == "symlink":
            os.symlink(op.arg, name, dir_fd=fd)  # type: ignore[arg-type]
        elif k == "unlink":
            os.unlink(name, dir_fd=fd)
        elif k == "rmdir":
            os.rmdir(name, dir_fd=fd)
        elif k == "setxattr":
            key, value, xflags = op.arg  # type: ignore[misc]
            os.setxattr(_xattr_path(fd, name), key, value, xflags, follow_symlinks=False)
        elif k == "removexattr":
            os.removexattr(_xattr_path(fd, name), op.arg, follow_symlinks=False)  # type: ignore[arg-type]
        elif k == "getxattr":
            return os.getxattr(_xattr_path(fd, name), op.arg, follow_symlinks=False)  # type: ignore[arg-type]
        elif k == "listxattr":
            return tuple(sorted(os.listxattr(_xattr_path(fd, name), follow_symlinks=False)))
        else:
            raise AssertionError(f"unknown op {k}")
    return None


def _deep(runner: Runner, op: Op) -> object:
    """mkdir a chain of 255-byte directories below ``op.path`` until the relative path is
    ``op.arg`` bytes long, then create a file at the bottom (paths near and past PATH_MAX)."""
    target_len = op.arg
    assert isinstance(target_len, int)
    with parent_fd(runner.root, op.path + "/x") as (fd, _):
        cur = os.dup(fd)
    rel = op.path
    try:
        while len(rel) + 256 < target_len:
            name = "D" * 255
            try:
                os.mkdir(name, 0o755, dir_fd=cur)
            except FileExistsError:
                pass
            nfd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=cur)
            os.close(cur)
            cur = nfd
            rel += "/" + name
        leaf = "F" * max(1, min(255, target_len - len(rel) - 1))
        f = os.open(leaf, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644, dir_fd=cur)
        os.write(f, b"deep")
        os.close(f)
        return len(rel) + 1 + len(leaf)
    finally:
        os.close(cur)


def _handle(runner: Runner, op: Op) -> object:
    slot, *rest = op.arg  # type: ignore[misc]
    fd = runner.handles[slot]
    if fd is None:
        raise OSError(errno.EBADF, "closed handle")
    k = op.kind
    if k == "hread":
        size, off = rest
        return hashlib.sha256(os.pread(fd, size, off)).hexdigest()[:16]
    if k == "hwrite":
        data, off = rest
        return os.pwrite(fd, data, off)
    if k == "hstat":
        return fd_summary(fd)
    if k == "htrunc":
        os.ftruncate(fd, rest[0])
        return None
    if k == "hfalloc":
        mode, off, length = rest
        fallocate(fd, mode, off, length)
        return None
    if k == "hreopen":
        f = os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_NONBLOCK)
        try:
            st = os.fstat(f)
            if stat.S_ISREG(st.st_mode):
                return hashlib.sha256(os.pread(f, 1 << 20, 0)).hexdigest()[:16]
            return kind_of(st.st_mode)
        finally:
            os.close(f)
    if k == "hclose":
        return None  # the Runner closes it (in this process)
    raise AssertionError(k)


_OPS: dict[str, Callable[[Runner, Op], object]] = {
    "write": _write,
    "truncate": _truncate,
    "read": _read,
    "fallocate": _fallocate,
    "open": _open,
    "deep": _deep,
    "link": _two,
    "rename": _two,
    "rename_noreplace": _two,
    "rename_exchange": _two,
    **{k: _handle for k in HANDLE_KINDS},
}
for _k in KINDS:
    _OPS.setdefault(_k, _path_op)


def apply(root: Path, op: Op) -> Result:
    """Apply one handle-less ``op`` below ``root`` (a one-shot :class:`Runner`)."""
    r = Runner(root)
    try:
        return r.apply(op)
    finally:
        assert not r.close()


# ---------------------------------------------------------------------------------------------
# Drawing operations

_ACCESS = (os.O_RDONLY, os.O_WRONLY, os.O_RDWR)
_OPEN_BITS = (
    os.O_CREAT,
    os.O_EXCL,
    os.O_TRUNC,
    os.O_APPEND,
    os.O_NOFOLLOW,
    os.O_DIRECTORY,
    O_NOATIME,
    os.O_SYNC,
    os.O_DSYNC,
    os.O_CLOEXEC,
)
CREATE_MODES = (0o666, 0o777, 0o640, 0o600, 0o4777, 0o2777, 0o6777, 0o1777, 0o444)
CHMOD_MODES = (0o600, 0o755, 0o4755, 0o1777, 0o000, 0o4777, 0o2777, 0o6777, 0o2755, 0o666)


def random_open_flags(rng: random.Random, tmpfile: bool = True) -> int:
    """An open flag combination: access mode x any subset of the modifiers, sometimes
    ``O_PATH`` or (with ``tmpfile``) ``O_TMPFILE``; always ``O_NONBLOCK`` (a fifo never blocks
    the test)."""
    r = rng.random()
    if not tmpfile and 0.08 <= r < 0.13:
        r = 0.5
    if r < 0.08:
        flags = O_PATH | rng.choice((0, os.O_NOFOLLOW, os.O_DIRECTORY, os.O_NOFOLLOW | os.O_CREAT))
    elif r < 0.13:
        flags = (
            O_TMPFILE
            | rng.choice((os.O_WRONLY, os.O_RDWR, os.O_RDONLY))
            | rng.choice((0, os.O_EXCL))
        )
    else:
        flags = rng.choice(_ACCESS)
        for bit in _OPEN_BITS:
            if rng.random() < 0.25:
                flags |= bit
    return flags | os.O_NONBLOCK


def random_caller(rng: random.Random, umask: int, root_share: float) -> Caller:
    """Root with probability ``root_share``, else one of :data:`USERS`, with ``umask``."""
    if rng.random() < root_share:
        return Caller(umask=umask)
    uid, gid, groups = rng.choice(USERS)
    return Caller(uid, gid, groups, umask)


@dataclass(frozen=True)
class SeqContext:
    """Per-sequence settings: the umask and how often operations run as root."""

    umask: int = 0o022
    root_share: float = 1.0

    @staticmethod
    def draw(rng: random.Random) -> SeqContext:
        """A random umask from :data:`UMASKS` and a root share of 1, 0.6 or 0.3."""
        return SeqContext(rng.choice(UMASKS), rng.choice((1.0, 0.6, 0.3)))


DEFAULT_CTX = SeqContext()


def random_op(
    rng: random.Random,
    root: Path,
    under: str,
    exclude: frozenset[str] = frozenset(),
    *,
    ctx: SeqContext = DEFAULT_CTX,
    handles: list[tuple[int, int]] | None = None,
) -> Op:
    """Draw one operation on the tree at ``root/under`` as it is now (walked without following).

    Targets are existing names (any type) or new names in existing directories; device nodes
    are never opened (a FUSE mount may be ``nodev``), only changed by metadata operations.
    ``handles`` are the open ``(slot, flags)`` of the kernel side; handle operations are drawn
    only when there are some.  ``exclude`` holds operation kinds and features to leave out:
    ``tmpfile`` (``O_TMPFILE`` opens), ``falloc-collapse-insert`` (those fallocate modes) and
    xattr names (see :data:`XATTR_NAMES`).
    """
    xattr_names = [n for n in XATTR_NAMES if n not in exclude] or ["user.a"]
    falloc_modes = FALLOC_MODES
    if "falloc-collapse-insert" in exclude:
        falloc_modes = tuple(
            m for m in FALLOC_MODES if not m & (FALLOC_FL_COLLAPSE_RANGE | FALLOC_FL_INSERT_RANGE)
        )
    entries = list(iter_tree(root, under))
    dirs = [under] + [p for p, st in entries if stat.S_ISDIR(st.st_mode)]
    kinds = {p: kind_of(st.st_mode) for p, st in entries}
    excluded = set(exclude)
    if not handles:
        excluded |= HANDLE_KINDS
    allowed = [(k, w) for k, w in zip(KINDS, WEIGHTS, strict=True) if k not in excluded]
    kind = rng.choices([k for k, _ in allowed], [w for _, w in allowed])[0]
    caller = random_caller(rng, ctx.umask, ctx.root_share)

    def existing() -> str:
        return rng.choice([p for p, _ in entries]) if entries else new()

    def new() -> str:
        return f"{rng.choice(dirs)}/{rng.choice(NEW_NAMES)}"

    def any_path() -> str:
        return existing() if rng.random() < 0.7 else new()

    def o(kind: str, path: str = "", path2: str = "", arg: object = None) -> Op:
        return Op(kind, path, path2, arg, caller)

    def size() -> int:
        return rng.choice((0, 1, 100, 4096, 8192, 70000, 5000))

    if kind in HANDLE_KINDS:
        assert handles
        slot, _flags = rng.choice(handles)
        if kind == "hread":
            return o(kind, arg=(slot, rng.choice((1, 100, 1 << 20)), rng.choice((0, 3, 4096))))
        if kind == "hwrite":
            data = rng.randbytes(rng.choice((1, 10, 5000)))
            return o(kind, arg=(slot, data, rng.choice((0, 3, 4096, 9000))))
        if kind == "htrunc":
            return o(kind, arg=(slot, size()))
        if kind == "hfalloc":
            return o(
                kind,
                arg=(
                    slot,
                    rng.choice(falloc_modes),
                    rng.choice((0, 4096, 100)),
                    rng.choice((4096, 8192, 1)),
                ),
            )
        return o(kind, arg=(slot,))
    if kind in ("write", "truncate", "read", "fallocate"):
        path = any_path()
        if kinds.get(path) in ("chr", "blk"):
            kind = "chmod"
    if kind == "write":
        mode = rng.choice(("trunc", "append", "plain", "excl"))
        data = rng.randbytes(rng.choice((0, 1, 10, 5000)))
        return o("write", path, arg=(mode, data, rng.choice((0, 3, 8192))))
    if kind == "truncate":
        return o("truncate", path, arg=size())
    if kind == "read":
        return o("read", path)
    if kind == "fallocate":
        off = rng.choice((0, 4096, 100, 8192))
        return o(
            "fallocate", path, arg=(rng.choice(falloc_modes), off, rng.choice((4096, 1, 12288)))
        )
    if kind == "open":
        path = any_path()
        flags = random_open_flags(rng, tmpfile="tmpfile" not in exclude)
        if flags & O_TMPFILE == O_TMPFILE:
            path = rng.choice(dirs)
        elif kinds.get(path) in ("chr", "blk") and not flags & O_PATH:
            flags = O_PATH | os.O_NOFOLLOW
        elif kinds.get(path) == "lnk":
            # Never follow a symlink of the layers: its target is resolved on the host, and a
            # write through one once reached this machine's /etc/passwd.
            flags |= os.O_NOFOLLOW
        return o("open", path, arg=(flags, rng.choice(CREATE_MODES)))
    if kind == "deep":
        return o("deep", rng.choice(dirs), arg=rng.randint(3900, 4200))
    if kind == "chmod":
        return o("chmod", any_path(), arg=rng.choice(CHMOD_MODES))
    if kind == "chown":
        return o(
            "chown",
            any_path(),
            arg=(rng.choice((0, 1000, 65534, -1)), rng.choice((0, 1000, 65534, -1))),
        )
    if kind == "utime":
        t = rng.randint(0, 2**33) * 10**9 + rng.randint(0, 10**9 - 1)
        return o("utime", any_path(), arg=(t, t + rng.randint(0, 10**12)))
    if kind == "mkdir":
        return o("mkdir", any_path(), arg=rng.choice((0o755, 0o700, 0o777, 0o1777, 0o2775, 0o3777)))
    if kind == "mkfifo":
        return o("mkfifo", any_path())
    if kind == "mknod":
        t, major, minor = rng.choice(
            (
                (stat.S_IFCHR, 0, 0),
                (stat.S_IFCHR, 0, 0),
                (stat.S_IFCHR, 1, 3),
                (stat.S_IFBLK, 7, 0),
                (stat.S_IFIFO, 0, 0),
                (stat.S_IFSOCK, 0, 0),
                (stat.S_IFREG, 0, 0),
            )
        )
        return o("mknod", any_path(), arg=(t | rng.choice((0o666, 0o600, 0o4755)), major, minor))
    if kind == "symlink":
        return o("symlink", any_path(), arg=rng.choice(("/etc", "../..", "a", "n0", "x" * 255)))
    if kind in ("unlink", "rmdir"):
        return o(kind, existing() if rng.random() < 0.9 else new())
    if kind in ("link", "rename", "rename_noreplace", "rename_exchange"):
        return o(kind, existing(), any_path())
    if kind == "setxattr":
        xflags = rng.choice((0, 0, XATTR_CREATE, XATTR_REPLACE))
        return o("setxattr", any_path(), arg=(rng.choice(xattr_names), rng.randbytes(3), xflags))
    if kind == "listxattr":
        return o("listxattr", any_path())
    return o(kind, any_path(), arg=rng.choice(xattr_names))
