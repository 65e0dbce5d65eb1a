"""Attributes and xattrs (the kernel's inode.c part): setattr, get/set/list/remove xattr.

A change to a lower object copies it up first; a chmod, utimes or truncate is folded into
that copy-up (:class:`~unionfs.fs.copy_up.Change`). Names of the mount's own overlay
namespace are escaped on the way down and unescaped on the way up, as the kernel does
(:func:`unionfs.format.xattr_layer_name`).
"""

from __future__ import annotations

import dataclasses
import errno
import os
import stat
from typing import TypeVar

from unionfs import fdops, format
from unionfs.fs.copy_up import Change, CopyUp
from unionfs.fs.nodes import UPPER, Node
from unionfs.fs.state import State, err

# Entries kept of each cache of lower xattr answers (values, and listings).
LOWER_XATTR_CACHE = 1 << 16

K = TypeVar("K")
V = TypeVar("V")


def _remember(cache: dict[K, V], key: K, value: V) -> None:
    if len(cache) >= LOWER_XATTR_CACHE:
        cache.clear()  # a bound, not an LRU: refilled from the layers at little cost
    cache[key] = value


@dataclasses.dataclass(frozen=True)
class AttrChange:
    """What one setattr changes; None: left as it is."""

    mode: int | None = None
    uid: int | None = None
    gid: int | None = None
    size: int | None = None
    atime_ns: int | None = None
    mtime_ns: int | None = None


class Attrs:
    """setattr and the xattr calls of one mount."""

    def __init__(self, s: State, copier: CopyUp) -> None:
        self.s = s
        self.copier = copier
        # Answers read from lower objects, which never change under a mount: by (st_dev,
        # st_ino, stored name) the value or the errno (ENODATA mostly), by (st_dev, st_ino)
        # the listing. containers-storage asks security.capability of every file for a diff
        # or a commit; the kernel caches no xattrs for FUSE, so each one reaches the daemon.
        self._lower_values: dict[tuple[int, int, bytes], bytes | int] = {}
        self._lower_lists: dict[tuple[int, int], list[str]] = {}

    def _lower_obj(self, node: Node) -> tuple[int, int] | None:
        """The lower object whose xattrs ``node`` shows, or None when that may change (an
        upper object, or a lower file with more names, one of which may be copied up)."""
        s = self.s
        if node.layer == UPPER and s.stack.has_upper:
            return None
        if not node.is_dir and not node.immutable:
            return None
        return node.obj

    def _unnamed(self, node: Node) -> bool:
        """Whether ``node``'s name no longer holds its object while the kernel still holds
        the node: its changes and xattrs then go to the object itself, never to whatever
        holds the name now (a whiteout, a new object)."""
        return node.pinned >= 0 and node.parent is not None and not self.s.table.named(node)

    def _xattr_target(self, node: Node) -> fdops.Target:
        """Where ``node``'s xattrs are: :meth:`NodeTable.xattr_target`, or for an object
        whose name went away the ``/proc/self/fd`` path of its pinned descriptor."""
        if self._unnamed(node):
            return fdops.proc_path(node.pinned)
        return self.s.table.xattr_target(node)

    async def setattr(self, node: Node, fh: int | None, change: AttrChange) -> None:
        """Apply ``change``; copies up first (EROFS when read-only).

        The change is folded into the copy-up, except a chown (after which the kernel clears
        set-id bits the copy would have restored) and a truncate that leaves mtime alone
        (ftruncate sets it to now; the copy keeps the lower file's).
        """
        mode, uid, gid, size = change.mode, change.uid, change.gid, change.size
        atime_ns, mtime_ns = change.atime_ns, change.mtime_ns
        s = self.s
        s.check_writable()
        recording = s.overrides is not None and s.overrides.write is not None
        if node.layers[0] != UPPER:
            folded = None
            # With xattr_permissions a chmod goes to the override xattr, never into the copy.
            foldable = uid is None and gid is None and not (recording and mode is not None)
            if foldable and (size is None or mtime_ns is not None):
                folded = Change(mode=mode, atime_ns=atime_ns, mtime_ns=mtime_ns, size=size)
            if await self.copier.copy_up(node, folded):
                return
        own_fd = -1
        if node.parent is None:
            target: bytes | int = s.stack[UPPER].root_fd
            pfd, name = -1, b""
        elif self._unnamed(node):
            # Its name is gone but the kernel still holds it (fchmod, futimens ... on an open
            # file, fchownat of an O_PATH one). Only a regular file or a directory is ever
            # reopened (the override xattr needs a real descriptor): a device, a fifo or a
            # symlink of a layer is never opened by the daemon, and is changed through its
            # O_PATH descriptor (see _set_attrs).
            if stat.S_ISREG(os.fstat(node.pinned).st_mode) or node.is_dir:
                own_fd = target = fdops.reopen(node.pinned, os.O_RDONLY | os.O_CLOEXEC)
            else:
                target = node.pinned
            pfd, name = -1, b""
        else:
            pfd, name = self.copier.upper_dir_fd(node.parent), node.name
            target = name
        try:
            self._set_attrs(node, fh, target, pfd, name, mode, uid, gid, size, atime_ns, mtime_ns)
        finally:
            if own_fd >= 0:
                os.close(own_fd)

    def _set_attrs(
        self,
        node: Node,
        fh: int | None,
        target: bytes | int,
        pfd: int,
        name: bytes,
        mode: int | None,
        uid: int | None,
        gid: int | None,
        size: int | None,
        atime_ns: int | None,
        mtime_ns: int | None,
    ) -> None:
        """The changes of :meth:`setattr` on the upper object ``target`` (an fd or ``name``
        in ``pfd``). A descriptor is changed through its ``/proc/self/fd`` path, which an
        ``O_PATH`` one allows too (and, for a symlink, reaches the symlink itself)."""
        s = self.s
        if size is not None:
            handle = s.file_handles.get(fh) if fh is not None else None
            if handle is not None and handle.writable and handle.layer == UPPER:
                os.ftruncate(handle.fd, size)
            else:
                fd = s.table.open_file(node, UPPER, os.O_WRONLY)[0]
                try:
                    os.ftruncate(fd, size)
                finally:
                    os.close(fd)
        if (uid is not None or gid is not None or mode is not None) and self._record(
            node, target, pfd, name, mode, uid, gid
        ):
            uid = gid = mode = None
        if uid is not None or gid is not None:
            u = -1 if uid is None else uid
            g = -1 if gid is None else gid
            try:
                if isinstance(target, int):
                    os.chown(fdops.proc_path(target), u, g)
                else:
                    os.chown(name, u, g, dir_fd=pfd, follow_symlinks=False)
            except PermissionError:
                # xattr_permissions: an object that cannot carry the override keeps our
                # owner when it may not be given, as in fuse-overlayfs.
                if s.overrides is None or s.overrides.write is None:
                    raise
        if mode is not None:
            if isinstance(target, int):
                os.chmod(fdops.proc_path(target), stat.S_IMODE(mode))
            else:
                fdops.chmod_at(pfd, name, stat.S_IMODE(mode))
        if atime_ns is not None or mtime_ns is not None:
            if atime_ns is None or mtime_ns is None:
                cur = os.fstat(target) if isinstance(target, int) else s.table.lstat_in(node, UPPER)
                atime_ns = cur.st_atime_ns if atime_ns is None else atime_ns
                mtime_ns = cur.st_mtime_ns if mtime_ns is None else mtime_ns
            if isinstance(target, int):
                os.utime(fdops.proc_path(target), ns=(atime_ns, mtime_ns))
            else:
                os.utime(name, ns=(atime_ns, mtime_ns), dir_fd=pfd, follow_symlinks=False)

    def _record(
        self,
        node: Node,
        target: bytes | int,
        pfd: int,
        name: bytes,
        mode: int | None,
        uid: int | None,
        gid: int | None,
    ) -> bool:
        """With ``xattr_permissions``, write a chown/chmod of the upper object ``target`` to
        its override xattr (the parts not changed are those shown now); False when the mount
        records nothing or the object cannot carry it (then the inode is changed)."""
        ov = self.s.overrides
        if ov is None or ov.write is None:
            return False
        xtarget: fdops.Target
        if isinstance(target, int):
            st, xtarget = os.fstat(target), target
        elif pfd < 0:
            st, xtarget = os.fstat(self.s.stack[UPPER].root_fd), self.s.stack[UPPER].root_fd
        else:
            st = os.stat(name, dir_fd=pfd, follow_symlinks=False)
            xtarget = fdops.at_path(pfd, name)
        if not ov.can_record(st.st_mode):
            return False
        shown = ov.shown(UPPER, xtarget, st)
        new_mode = shown.st_mode
        if mode is not None:
            new_mode = stat.S_IFMT(shown.st_mode) | stat.S_IMODE(mode)
        ov.record(
            xtarget,
            shown.st_uid if uid is None else uid,
            shown.st_gid if gid is None else gid,
            new_mode,
            shown.st_rdev,
        )
        return True

    def getxattr(self, node: Node, name: bytes) -> bytes:
        """The value of ``name`` on ``node``; a name of the mount's own overlay namespace is
        read escaped, reserved names are not there (ENODATA)."""
        stored = format.xattr_layer_name(name, self.s.opts.userxattr)
        if stored is None:
            raise err(errno.ENODATA)
        obj = self._lower_obj(node)
        if obj is None:
            return fdops.getxattr(self._xattr_target(node), stored)
        key = (obj[0], obj[1], stored)
        known = self._lower_values.get(key)
        if known is None:
            try:
                known = fdops.getxattr(self._xattr_target(node), stored)
            except OSError as exc:
                if exc.errno not in (errno.ENODATA, errno.EOPNOTSUPP):
                    raise  # not an answer about the object (its path failed, say)
                known = exc.errno
            _remember(self._lower_values, key, known)
        if isinstance(known, int):
            raise err(known)
        return known

    def listxattr(self, node: Node) -> list[bytes]:
        """The xattr names ``node`` shows through the mount (private ones hidden)."""
        userxattr = self.s.opts.userxattr
        obj = self._lower_obj(node)
        names = self._lower_lists.get(obj) if obj is not None else None
        if names is None:
            names = fdops.listxattr(self._xattr_target(node))
            if obj is not None:
                _remember(self._lower_lists, obj, names)
        out = []
        for n in names:
            shown = format.xattr_mount_name(os.fsencode(n), userxattr)
            if shown is not None:
                out.append(shown)
        return out

    async def setxattr(self, node: Node, name: bytes, value: bytes, flags: int = 0) -> None:
        """Set ``name`` on ``node`` after a copy-up; a name of the mount's own overlay
        namespace is stored escaped, as the kernel does (EPERM for a reserved name).

        ``flags`` (``XATTR_CREATE``/``XATTR_REPLACE``) are applied by the upper filesystem,
        after the copy-up: a refused request still copies up, as in the kernel.
        """
        s = self.s
        stored = format.xattr_layer_name(name, s.opts.userxattr)
        if stored is None:
            raise err(errno.EPERM)
        s.check_writable()
        await self.copier.copy_up(node)
        fdops.setxattr(self._xattr_target(node), stored, value, flags)

    async def removexattr(self, node: Node, name: bytes) -> None:
        """Remove ``name`` (escaped like :meth:`setxattr`) from ``node`` after a copy-up;
        ENODATA without a copy-up when the name is not there, as the kernel does."""
        s = self.s
        stored = format.xattr_layer_name(name, s.opts.userxattr)
        if stored is None:
            raise err(errno.ENODATA)
        s.check_writable()
        if node.layers[0] != UPPER:
            self.getxattr(node, name)
            await self.copier.copy_up(node)
        fdops.removexattr(self._xattr_target(node), stored)

    def statfs(self) -> os.statvfs_result:
        """The statfs of the top layer (the upper when there is one)."""
        return os.statvfs(self.s.stack[0].root_fd)
