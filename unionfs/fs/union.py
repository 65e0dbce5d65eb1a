"""The union filesystem as the adapter sees it: one facade over the concern modules.

Every operation takes node ids and handles as the kernel gives them, returns plain Python
values, and raises :class:`OSError` with an errno (ESTALE for a node id the kernel was told
to forget, EBADF for an unknown handle, EROFS for a change on a read-only mount). Each
docstring states the rest of its contract: the errno cases, whether a copy-up happens, and
what is counted in :attr:`stats`. An operation that changes the upper and fails half-way
drops the in-memory listings of the directories it touched (:meth:`State.changing`).

Which module owns what: :mod:`~unionfs.fs.lookup` (names), :mod:`~unionfs.fs.listing`
(directory indexes, readdir), :mod:`~unionfs.fs.copy_up`, :mod:`~unionfs.fs.dirops`,
:mod:`~unionfs.fs.attrs`, :mod:`~unionfs.fs.files`, :mod:`~unionfs.fs.introspect`, over
:mod:`~unionfs.fs.state` and :mod:`~unionfs.fs.nodes`.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import stat
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from unionfs.fs import introspect, listing, lookup
from unionfs.fs.attrs import AttrChange, Attrs
from unionfs.fs.copy_up import Change, CopyUp
from unionfs.fs.dirops import DirOps, Make
from unionfs.fs.events import Events
from unionfs.fs.files import Files
from unionfs.fs.nodes import UPPER, Node, NodeTable
from unionfs.fs.override import Overrides, real_mode
from unionfs.fs.state import Attr, Caller, State, err
from unionfs.fs.workdir import Workdir
from unionfs.layers import LayerStack
from unionfs.stats import Stats

if TYPE_CHECKING:
    from unionfs.config import MountConfig

__all__ = ["Attr", "AttrChange", "Caller", "Change", "Node", "Union"]


class Union:
    """One mount's filesystem. Build it from a (validated) configuration; :meth:`close` it."""

    def __init__(self, cfg: MountConfig) -> None:
        s = self.s = State(cfg)
        self.workdir = Workdir()
        try:
            warnings: list[str] = []
            if cfg.upper is not None and cfg.workdir is not None:
                warnings = self.workdir.open(cfg.workdir, cfg.read_only)
        except BaseException:
            s.close()
            raise
        # Things the user should hear about at mount time (printed by the daemon).
        self.warnings: tuple[str, ...] = tuple(warnings)
        if not self.workdir.usable:
            s.opts = dataclasses.replace(s.opts, writable=False)
        if self.workdir.trusted_refused and not s.opts.userxattr:
            s.use_userxattr()
        try:
            s.overrides = Overrides.probe(s.stack, cfg.xattr_permissions, s.opts.writable)
        except BaseException:
            self.close()
            raise
        self._own_ids = (os.geteuid(), os.getegid())
        self.copier = CopyUp(s, self.workdir)
        s.merged_dir_found = self.copier.fix_origin
        s.dir_listed = self.copier.drop_stale_impure
        self.dirops = DirOps(s, self.copier)
        self.attrs = Attrs(s, self.copier)
        self.files = Files(s, self.copier)
        # What the adapter and the daemon read.
        self.stack: LayerStack = s.stack
        self.table: NodeTable = s.table
        self.stats: Stats = s.stats
        self.events: Events = s.events
        self.mountpoint = s.opts.mountpoint

    def close(self) -> None:
        """Close every descriptor the filesystem holds (handles, directories, layers)."""
        self.s.close()
        self.workdir.close()

    # -- names -------------------------------------------------------------------------------

    def node(self, ino: int) -> Node:
        """The live node ``ino``; ESTALE if it is not live."""
        return self.s.node(ino)

    def lookup(self, parent_ino: int, name: bytes) -> tuple[Node, Attr | None] | None:
        """Resolve ``name`` in directory ``parent_ino`` and count one lookup of the result.

        None when the name is not in the merged view (counted as a negative lookup; the
        answer may be cached). The attributes are None when the node is an unchanged lower
        object (what was shown of it may be reused). ENOTDIR, ENAMETOOLONG; no copy-up.
        Counts a lookup of the serving layer.
        """
        return lookup.lookup(self.s, parent_ino, name)

    def forget(self, ino: int, count: int) -> None:
        """Drop ``count`` lookups of ``ino``; never raises. A node that leaves the table
        emits a "stale" event."""
        self.s.table.forget(ino, count)

    def attr(self, node: Node) -> Attr:
        """The attributes of ``node`` now; ESTALE when its object is gone. No copy-up."""
        return lookup.attr(self.s, node)

    def readlink(self, ino: int) -> bytes:
        """The target of symlink ``ino``; EINVAL for anything else."""
        return lookup.readlink(self.s, self.s.node(ino))

    # -- directories -------------------------------------------------------------------------

    def opendir(self, ino: int) -> int:
        """A directory handle of ``ino``; ENOTDIR. The listing is fixed at its first read."""
        return listing.opendir(self.s, self.s.node(ino))

    def readdir(self, fh: int, start: int) -> Iterator[listing.DirEntry]:
        """The entries of handle ``fh`` from offset ``start``, as ``(name, node, attr,
        next offset)``: attr None means the node is unchanged since it was last shown.

        EBADF. A child's lookup is counted when the consumer asks for the entry after it
        (an entry the reply could not take is not counted). Builds the index on first use
        (counted in ``dirs_indexed``).
        """
        s = self.s
        handle = s.dir_handle(fh)
        return listing.entries(
            s,
            handle,
            start,
            lambda parent, name: lookup.resolve_attr(s, parent, name),
            lambda parent, name: lookup.resolve_cached(s, parent, name),
        )

    def releasedir(self, fh: int) -> None:
        """Close a directory handle (an unknown one is ignored)."""
        self.s.dir_handles.pop(fh, None)

    # -- files -------------------------------------------------------------------------------

    async def open(self, ino: int, flags: int, caller: Caller | None = None) -> int:
        """A file handle of ``ino``. A write access (or ``O_TRUNC``) copies the file up first
        (``O_TRUNC``: without its data); EISDIR, EROFS, ENXIO (device, fifo)."""
        node = self.s.node(ino)
        if flags & os.O_ACCMODE == os.O_RDONLY and not flags & os.O_TRUNC:
            return await self.files.open(node, flags, caller)  # changes nothing
        with self.s.changing():
            return await self.files.open(node, flags, caller)

    def read(self, fh: int, off: int, size: int) -> bytes:
        """Up to ``size`` bytes at ``off``; EBADF. No copy-up."""
        return self.files.read(fh, off, size)

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        """Write through a writable handle (the file was copied up at open); EBADF."""
        return await self.files.write(fh, off, buf)

    def fallocate(self, fh: int, mode: int, offset: int, length: int) -> None:
        """``fallocate(2)`` through a writable handle; EBADF, and the upper's errnos."""
        self.files.fallocate(fh, mode, offset, length)

    async def fsync(self, fh: int, datasync: bool) -> None:
        """Sync a written file unless the mount is ``volatile``; EBADF."""
        await self.files.fsync(fh, datasync)

    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        """Sync an upper directory unless the mount is ``volatile``; EBADF."""
        await self.files.fsyncdir(fh, datasync)

    def release(self, fh: int) -> None:
        """Close a file handle (an unknown one is ignored)."""
        self.files.release(fh)

    # -- creating and removing names ---------------------------------------------------------

    async def create(
        self,
        parent_ino: int,
        name: bytes,
        mode: int,
        flags: int,
        uid: int,
        gid: int,
        umask: int = 0,
    ) -> tuple[int, Attr]:
        """Create and open a regular file owned by ``uid``/``gid`` (the group of a set-gid
        parent), ``mode`` masked by the caller's ``umask`` unless the parent has a default
        ACL. EROFS, EEXIST, ENOTDIR, EINVAL (a ``.wh.`` name), ENAMETOOLONG. Copies the
        parent up; a whiteout at the name is replaced."""
        io_flags = (flags & ~(os.O_APPEND | os.O_TRUNC | os.O_CREAT | os.O_EXCL)) | os.O_CLOEXEC
        recording = self._recording(stat.S_IFREG)
        made_mode = real_mode(stat.S_IFREG | mode) if recording else stat.S_IMODE(mode)

        def make(dir_fd: int, n: bytes) -> int:
            return os.open(
                n, io_flags | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, made_mode, dir_fd=dir_fd
            )

        node, st, fd = await self._new(
            parent_ino, name, False, make, recording, (uid, gid), mode, umask, stat.S_IFREG
        )
        assert fd is not None
        return self.files.add_handle(fd, node, UPPER, flags), lookup.attr_of(node, st, self.s)

    async def _new(
        self,
        parent_ino: int,
        name: bytes,
        is_dir: bool,
        make: Make,
        recording: bool,
        ids: tuple[int, int],
        mode: int,
        umask: int,
        kind: int,
        rdev: int = 0,
    ) -> tuple[Node, os.stat_result, int | None]:
        """Make a new object in the upper through ``make`` (:meth:`DirOps.new_entry`); with
        ``recording``, its owner ``ids``, type ``kind`` and masked mode go to the override
        xattr."""
        uid, gid = ids
        with self.s.changing():
            node, st, fd = await self.dirops.new_entry(
                parent_ino,
                name,
                is_dir,
                make,
                *self._maker(recording, uid, gid),
                mode=mode,
                umask=umask,
            )
            if recording:
                self._record(node, uid, gid, kind | (stat.S_IMODE(mode) & ~umask), rdev)
        return node, st, fd

    def _recording(self, kind: int) -> bool:
        """Whether a new object of type ``kind`` gets its owner and mode in an override
        xattr (``xattr_permissions``) rather than in its inode."""
        ov = self.s.overrides
        return ov is not None and ov.can_record(kind)

    def _maker(self, recording: bool, uid: int, gid: int) -> tuple[int, int]:
        """The owner to give a new inode: ours when the owner goes to the
        override xattr, or when the mount records owners and we may not give one."""
        ov = self.s.overrides
        if recording or (ov is not None and ov.write is not None and self._own_ids[0] != 0):
            return self._own_ids
        return uid, gid

    def _record(self, node: Node, uid: int, gid: int, st_mode: int, rdev: int = 0) -> None:
        """Write the override xattr of the new upper object ``node`` (owner ``uid``, the
        group of a set-gid parent as shown, else ``gid``)."""
        ov = self.s.overrides
        assert ov is not None and node.parent is not None
        parent = lookup.attr(self.s, node.parent).st
        if parent.st_mode & stat.S_ISGID:
            gid = parent.st_gid
            if stat.S_ISDIR(st_mode):
                st_mode |= stat.S_ISGID
        ov.record(self.s.table.xattr_target(node), uid, gid, st_mode, rdev)

    async def mkdir(
        self, parent_ino: int, name: bytes, mode: int, uid: int, gid: int, umask: int = 0
    ) -> Attr:
        """Make a directory (errnos as :meth:`create`); over a whiteout it is made opaque
        (counted in ``opaque_dirs_created``)."""

        recording = self._recording(stat.S_IFDIR)
        made_mode = real_mode(stat.S_IFDIR | mode) if recording else stat.S_IMODE(mode)

        def make(dir_fd: int, n: bytes) -> None:
            os.mkdir(n, made_mode, dir_fd=dir_fd)

        node, st, _ = await self._new(
            parent_ino, name, True, make, recording, (uid, gid), mode, umask, stat.S_IFDIR
        )
        return lookup.attr_of(node, st, self.s)

    async def mknod(
        self,
        parent_ino: int,
        name: bytes,
        mode: int,
        rdev: int,
        uid: int,
        gid: int,
        umask: int = 0,
    ) -> Attr:
        """Make a device, fifo or socket (errnos as :meth:`create`); EPERM for a char 0/0
        device, which would be a whiteout in the upper (the kernel refuses it too)."""
        if stat.S_ISCHR(mode) and rdev == 0:
            raise err(errno.EPERM)
        # With xattr_permissions a device is a regular file whose override names it (the
        # extended form of containers-storage): no privilege is needed to make one.
        device = stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
        recording = device and self._recording(stat.S_IFREG)

        def make(dir_fd: int, n: bytes) -> None:
            if recording:
                flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
                os.close(os.open(n, flags, real_mode(stat.S_IFREG | mode), dir_fd=dir_fd))
            else:
                os.mknod(n, mode, rdev, dir_fd=dir_fd)

        node, st, _ = await self._new(
            parent_ino,
            name,
            False,
            make,
            recording,
            (uid, gid),
            mode,
            umask,
            stat.S_IFMT(mode),
            rdev,
        )
        return lookup.attr_of(node, st, self.s)

    async def symlink(
        self, parent_ino: int, name: bytes, target: bytes, uid: int, gid: int
    ) -> Attr:
        """Make a symlink (errnos as :meth:`create`)."""

        def make(dir_fd: int, n: bytes) -> None:
            os.symlink(target, n, dir_fd=dir_fd)

        with self.s.changing():
            node, st, _ = await self.dirops.new_entry(
                parent_ino, name, False, make, *self._maker(False, uid, gid)
            )
        return lookup.attr_of(node, st, self.s)

    async def link(self, ino: int, new_parent_ino: int, new_name: bytes) -> Attr:
        """A new name for ``ino``, which is copied up first; EPERM for a directory, else
        errnos as :meth:`create`. The new name is the same node (counted once more)."""
        node = self.s.node(ino)
        with self.s.changing():
            st = await self.dirops.link(node, new_parent_ino, new_name)
        return lookup.attr_of(node, st, self.s)

    async def unlink(self, parent_ino: int, name: bytes) -> None:
        """Remove a non-directory; EROFS, ENOENT, EISDIR. A whiteout is left where a lower
        layer has the name (counted in ``whiteouts_created``, and as an event)."""
        with self.s.changing():
            await self.dirops.unlink(parent_ino, name)

    async def rmdir(self, parent_ino: int, name: bytes) -> None:
        """Remove an empty directory; EROFS, ENOENT, ENOTDIR, ENOTEMPTY (the kernel's rule:
        a lower xattr whiteout counts as an entry). Whiteouts as :meth:`unlink`."""
        with self.s.changing():
            await self.dirops.rmdir(parent_ino, name)

    async def rename(
        self, old_parent_ino: int, old_name: bytes, new_parent_ino: int, new_name: bytes, flags: int
    ) -> None:
        """rename(2) with ``RENAME_NOREPLACE``/``RENAME_EXCHANGE``; the source is copied up
        first. EXDEV for a lower or merged directory, before the destination's emptiness is
        checked (as the kernel). A whiteout is left where a lower has the old name."""
        with self.s.changing():
            await self.dirops.rename(old_parent_ino, old_name, new_parent_ino, new_name, flags)

    # -- attributes ---------------------------------------------------------------------------

    async def setattr(self, ino: int, fh: int | None, change: AttrChange) -> Attr:
        """Apply ``change`` and return the new attributes. EROFS. A lower object is copied
        up first, with a chmod, utimes or timed truncate folded into the copy (one copy-up
        counted)."""
        node = self.s.node(ino)
        with self.s.changing():
            await self.attrs.setattr(node, fh, change)
        return lookup.attr(self.s, node)

    def getxattr(self, ino: int, name: bytes) -> bytes:
        """The value of xattr ``name``: a virtual ``user.unionfs.*`` answer
        (:mod:`~unionfs.fs.introspect`; EINVAL for a bad inspect name), else the layer's
        (escaped names read escaped; ENODATA for reserved names). No copy-up."""
        node = self.s.node(ino)
        virtual = introspect.virtual_xattr(self.s, node, name)
        if virtual is not None:
            return virtual
        return self.attrs.getxattr(node, name)

    def listxattr(self, ino: int) -> list[bytes]:
        """The xattr names shown through the mount. No copy-up."""
        return self.attrs.listxattr(self.s.node(ino))

    async def setxattr(self, ino: int, name: bytes, value: bytes, flags: int = 0) -> None:
        """Set an xattr after a copy-up; EPERM for ``user.unionfs.*`` and reserved names,
        EROFS; ``XATTR_CREATE``/``XATTR_REPLACE`` are applied by the upper filesystem."""
        if name.startswith(introspect.PREFIX):
            raise err(errno.EPERM)  # the virtual names are read-only
        node = self.s.node(ino)
        with self.s.changing():
            await self.attrs.setxattr(node, name, value, flags)

    async def removexattr(self, ino: int, name: bytes) -> None:
        """Remove an xattr after a copy-up; ENODATA (without a copy-up) when it is not
        there, EROFS."""
        node = self.s.node(ino)
        with self.s.changing():
            await self.attrs.removexattr(node, name)

    def statfs(self) -> os.statvfs_result:
        """The statfs of the top layer."""
        return self.attrs.statfs()

    # -- introspection -----------------------------------------------------------------------

    def inspect(self, ino: int, child: bytes | None = None) -> dict[str, Any]:
        """Where ``ino`` (or its entry ``child``) comes from; see :mod:`unionfs.fs.introspect`."""
        return introspect.inspect(self.s, self.s.node(ino), child)

    def layer_table(self) -> list[dict[str, Any]]:
        """The mount's layers, top first."""
        return introspect.layer_table(self.s)
