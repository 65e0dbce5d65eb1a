"""The state one mount's filesystem shares between its concerns, and its frozen options.

:class:`State` holds the layer stack, the node table, the open handles, the counters and
the options; each concern module (:mod:`~unionfs.fs.lookup`, :mod:`~unionfs.fs.listing`,
:mod:`~unionfs.fs.copy_up` ...) works on it, and only :mod:`unionfs.fs.union` builds it.
"""

from __future__ import annotations

import contextvars
import dataclasses
import errno
import os
from collections.abc import Callable
from typing import TYPE_CHECKING

import trio

from unionfs import fdops, format
from unionfs.fs.events import Events
from unionfs.fs.nodes import UPPER, Node, NodeTable, Origins, err, get_or_raise
from unionfs.fs.override import Overrides
from unionfs.layers import LayerStack
from unionfs.stats import Stats

if TYPE_CHECKING:
    from unionfs.config import MountConfig

__all__ = ["UPPER", "Attr", "Caller", "DirHandle", "FileHandle", "Options", "State", "err"]


# The directories the operation running in this task touched (a trio task runs in a context
# of its own, so concurrent requests keep separate lists).
_touched: contextvars.ContextVar[list[Node] | None] = contextvars.ContextVar(
    "unionfs_touched", default=None
)


class Changing:
    """See :meth:`State.changing`. A class rather than a generator: it wraps every change."""

    __slots__ = ("touched", "token")

    def __enter__(self) -> None:
        self.touched: list[Node] = []
        self.token = _touched.set(self.touched)

    def __exit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        _touched.reset(self.token)
        if exc_type is not None:
            for node in self.touched:
                node.index = None
                node.listings = None


@dataclasses.dataclass(frozen=True)
class Options:
    """What the filesystem needs of the mount configuration, fixed for the mount's life."""

    writable: bool
    read_only: bool
    fsync: bool
    userxattr: bool
    mountpoint: str

    @classmethod
    def of(cls, cfg: MountConfig) -> Options:
        return cls(cfg.writable, cfg.read_only, cfg.fsync, cfg.userxattr, cfg.mountpoint)


@dataclasses.dataclass(frozen=True)
class Caller:
    """Who made a request: the ids the kernel passes with it."""

    uid: int
    gid: int
    pid: int

    def groups(self) -> set[int]:
        """The caller's group and supplementary groups (from /proc; just the gid if gone)."""
        found = {self.gid}
        try:
            with open(f"/proc/{self.pid}/status", "rb") as f:
                for line in f:
                    if line.startswith(b"Groups:"):
                        found.update(int(g) for g in line.split()[1:])
                        break
        except OSError:
            pass
        return found


@dataclasses.dataclass
class Attr:
    """What the adapter reports for an object: its layer stat and the numbers we show."""

    ino: int  # the node id
    st: os.stat_result
    nlink: int
    st_ino: int  # the number stat shows


class FileHandle:
    """An open regular file: the descriptor, the layer it was opened in, and its flags."""

    __slots__ = ("fd", "node", "layer", "flags", "writable", "drop_sgid")

    def __init__(self, fd: int, node: Node, layer: int, flags: int) -> None:
        self.fd = fd
        self.node = node
        self.layer = layer
        self.flags = flags
        self.writable = (flags & os.O_ACCMODE) != os.O_RDONLY
        # Set when the opener's first write must clear the file's set-gid bit (see
        # files.open): a case the kernel's FUSE module leaves to the file system.
        self.drop_sgid = False


class DirHandle:
    """An open directory: a snapshot of its names, so offsets stay stable while it is read.

    The snapshot is taken by the first readdir, not by opendir: when the kernel serves the
    listing from its readdir cache, the directory is opened and closed without being read.
    """

    __slots__ = ("node", "names")

    def __init__(self, node: Node) -> None:
        self.node = node
        self.names: list[bytes] | None = None


class State:
    """The stack, the node table, the handles, the counters and the options of one mount."""

    def __init__(self, cfg: MountConfig) -> None:
        self.opts = Options.of(cfg)
        self.stack = LayerStack(cfg.lowers, cfg.upper)
        self.events = Events()
        # Room for two directories' descriptors in every layer, so building one index
        # never evicts a descriptor it is about to read.
        self.table = NodeTable(self.stack, max(4096, 2 * len(self.stack) + 64), self.events)
        self.stats = Stats(len(self.stack))
        self.names = format.XattrNames.for_mode(cfg.userxattr)
        self.origins = Origins(self.table, self.names)
        self.file_handles: dict[int, FileHandle] = {}
        self.dir_handles: dict[int, DirHandle] = {}
        self._next_fh = 1
        # Worker threads for slow work (big copy-ups, fsync).
        self.limiter = trio.CapacityLimiter(4)
        # An upper in memory (tmpfs, ramfs) has nothing to write back: its fsync returns at
        # once, and is made in the request itself rather than handed to a worker thread (the
        # hand-over cost a package unpack on tmpfs about a fifth of its time).
        self.fsync_in_request = self.stack.has_upper and fdops.fs_magic(
            self.stack[UPPER].root_fd
        ) in (fdops.TMPFS_MAGIC, fdops.RAMFS_MAGIC)
        # Called the first time a directory merged from the upper and a lower is resolved
        # (parent, name, chain, the layer directories opened to check it): the copy-up side
        # records its origin there, as the kernel's lookup does. None on a read-only mount.
        self.merged_dir_found: (
            Callable[[Node, bytes, tuple[int, ...], dict[int, int]], None] | None
        ) = None
        # Called at the first read of a directory handle (the directory, the names it lists):
        # the copy-up side drops a stale impure mark there, as the kernel's readdir does.
        # None on a read-only mount.
        self.dir_listed: Callable[[Node, list[bytes]], None] | None = None
        # Owner and mode kept in xattrs (xattr_permissions, containers-storage's layers):
        # None when no layer carries them and the option is off (set by fs.union).
        self.overrides: Overrides | None = None

    def use_userxattr(self) -> None:
        """Write markers in the ``user.overlay.*`` namespace (the kernel's ``userxattr``
        mode): the upper refuses ``trusted.*``. Called once, before any request."""
        self.opts = dataclasses.replace(self.opts, userxattr=True)
        self.names = format.XattrNames.for_mode(True)
        self.origins = Origins(self.table, self.names)

    @property
    def has_upper(self) -> bool:
        return self.stack.has_upper

    def node(self, ino: int) -> Node:
        """The live node ``ino`` (ESTALE if the kernel was told to forget it)."""
        return self.table.node(ino)

    def check_writable(self) -> None:
        if not self.opts.writable:
            raise err(errno.EROFS)

    @staticmethod
    def touch(*dirs: Node) -> None:
        """The running operation is about to change these directories in the upper."""
        touched = _touched.get()
        if touched is not None:
            touched.extend(dirs)

    @staticmethod
    def changing() -> Changing:
        """The error boundary of one changing operation (a context manager): if it fails
        half-way, the in-memory listings (indexes) of the directories it touched are
        dropped, so no stale index survives; they are rebuilt from the layers at their next
        use."""
        return Changing()

    def new_fh(self) -> int:
        fh = self._next_fh
        self._next_fh += 1
        return fh

    def file_handle(self, fh: int) -> FileHandle:
        return get_or_raise(self.file_handles, fh, errno.EBADF)

    def dir_handle(self, fh: int) -> DirHandle:
        return get_or_raise(self.dir_handles, fh, errno.EBADF)

    def close(self) -> None:
        for fh in list(self.file_handles.values()):
            if fh.fd >= 0:
                os.close(fh.fd)
        self.file_handles.clear()
        self.table.close()
        self.stack.close()
