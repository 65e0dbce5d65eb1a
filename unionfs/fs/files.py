"""Open files (the kernel's file.c part): open, read, write, fsync, fallocate, release.

A read-only open of a lower file opens nothing: its handle opens the layer file at the first
read that reaches the daemon (lower files never change in place, so opening late reads the
same data). A write access copies the file up first. A node counts its open handles; when
its last name goes while handles are open, the object stays reachable through an ``O_PATH``
descriptor (``Node.pinned``), which the handles then use.
"""

from __future__ import annotations

import errno
import os
import stat

import trio

from unionfs.fdops import fallocate as _fallocate
from unionfs.fs.copy_up import TRUNCATE, CopyUp
from unionfs.fs.nodes import UPPER, Node
from unionfs.fs.state import Caller, FileHandle, State, err


class Files:
    """Open file handles of one mount."""

    def __init__(self, s: State, copier: CopyUp) -> None:
        self.s = s
        self.copier = copier

    def add_handle(self, fd: int, node: Node, layer: int, flags: int) -> int:
        """Register an open file of ``node`` (``fd`` -1: opened at the first read)."""
        s = self.s
        fh = s.new_fh()
        s.file_handles[fh] = FileHandle(fd, node, layer, flags)
        node.opened += 1
        return fh

    def open_read(self, node: Node, flags: int) -> int:
        """A read-only handle of ``node``: nothing is opened yet for an immutable lower file."""
        if node.immutable and not node.is_dir:
            # A lower file never changes in place, and with FOPEN_KEEP_CACHE a warm file is
            # read from the page cache without a read request: open the layer file only
            # when the first read arrives.
            fd = -1
        else:
            fd = self.s.table.open_file(node, node.layer, flags)[0]
        return self.add_handle(fd, node, node.layer, flags)

    async def open(self, node: Node, flags: int, caller: Caller | None = None) -> int:
        """Open ``node``; a write access copies it up first (``O_TRUNC``: without its data).

        EISDIR for a directory, EROFS for a write access on a read-only mount, ENXIO for a
        device or fifo. ``caller`` is who opens, for the set-gid rule of :meth:`write`.
        """
        s = self.s
        if node.is_dir:
            raise err(errno.EISDIR)
        wants_write = (flags & os.O_ACCMODE) != os.O_RDONLY or flags & os.O_TRUNC
        if not wants_write:
            return self.open_read(node, flags)
        s.check_writable()
        truncate = bool(flags & os.O_TRUNC)
        await self.copier.copy_up(node, TRUNCATE if truncate else None)
        fd = s.table.open_file(node, UPPER, flags & ~os.O_APPEND)[0]
        if truncate:
            if flags & os.O_ACCMODE == os.O_RDONLY:
                # O_RDONLY|O_TRUNC truncates on Linux (the caller was checked for write
                # permission): through a write descriptor, the handle itself stays read-only.
                wfd = s.table.open_file(node, UPPER, os.O_WRONLY)[0]
                try:
                    os.ftruncate(wfd, 0)
                finally:
                    os.close(wfd)
            else:
                os.ftruncate(fd, 0)
        fh = self.add_handle(fd, node, UPPER, flags)
        if caller is not None and caller.uid != 0:
            st = os.fstat(fd)
            if (
                st.st_mode & (stat.S_ISGID | stat.S_IXGRP) == stat.S_ISGID
                and st.st_gid not in caller.groups()
            ):
                s.file_handles[fh].drop_sgid = True
        return fh

    def read(self, fh: int, off: int, size: int) -> bytes:
        """Up to ``size`` bytes at ``off`` (EBADF for an unknown handle)."""
        handle = self.s.file_handle(fh)
        if handle.fd < 0 or (handle.layer != handle.node.layer and not handle.writable):
            # Opened lazily, or another opener copied the file up: read the copy from now
            # on, like the kernel.
            self._reopen(handle)
        return os.pread(handle.fd, size, off)

    def _reopen(self, handle: FileHandle) -> None:
        node = handle.node
        fd = self.s.table.open_file(node, node.layer, handle.flags)[0]
        if handle.fd >= 0:
            os.close(handle.fd)
        handle.fd = fd
        handle.layer = node.layer

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        """Write ``buf`` at ``off``; EBADF for a handle not open for writing. The first
        write by a caller outside the file's group clears its set-gid bit."""
        handle = self.s.file_handle(fh)
        if not handle.writable:
            raise err(errno.EBADF)
        written = os.pwrite(handle.fd, buf, off)
        if handle.drop_sgid:
            # A write by a caller outside the file's group clears set-gid even without group
            # execute (the VFS's file_remove_privs); the kernel's FUSE module only clears
            # set-uid and set-gid with group execute itself, and leaves this case to us.
            handle.drop_sgid = False
            mode = os.fstat(handle.fd).st_mode
            if mode & stat.S_ISGID:
                os.fchmod(handle.fd, stat.S_IMODE(mode) & ~stat.S_ISGID)
                await self.s.events.kernel_stale(handle.node.ino)
        return written

    def fallocate(self, fh: int, mode: int, offset: int, length: int) -> None:
        """``fallocate(2)`` on an open file, with the mode passed to the upper file system.

        EBADF for a handle not open for writing. The kernel's FUSE module itself refuses
        modes other than ``KEEP_SIZE``, ``PUNCH_HOLE`` and ``ZERO_RANGE`` (EOPNOTSUPP)
        before they reach a daemon.
        """
        handle = self.s.file_handle(fh)
        if not handle.writable:
            raise err(errno.EBADF)
        _fallocate(handle.fd, mode, offset, length)

    async def fsync(self, fh: int, datasync: bool) -> None:
        """Sync a written file in a worker thread (in the request on an upper in memory);
        nothing with ``fsync=0``/``volatile``."""
        s = self.s
        handle = s.file_handle(fh)
        if not handle.writable or not s.opts.fsync:
            return
        sync = os.fdatasync if datasync else os.fsync
        if s.fsync_in_request:
            sync(handle.fd)
        else:
            await trio.to_thread.run_sync(sync, handle.fd, limiter=s.limiter)

    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        """Sync an upper directory in a worker thread (nothing for a lower one)."""
        s = self.s
        node = s.dir_handle(fh).node
        if s.opts.writable and s.opts.fsync and node.layers[0] == UPPER:
            fd = s.table.dir_fd(node, UPPER)
            if s.fsync_in_request:
                os.fsync(fd)
            else:
                await trio.to_thread.run_sync(os.fsync, fd, limiter=s.limiter)

    def release(self, fh: int) -> None:
        """Close a handle; an object whose names are all gone is let go with its last one."""
        handle = self.s.file_handles.pop(fh, None)
        if handle is None:
            return
        if handle.fd >= 0:
            os.close(handle.fd)
        node = handle.node
        node.opened -= 1
        if not node.opened and node.lookups <= 0:
            self.s.table.unpin(node)
