"""The pyfuse3 adapter: translates requests to :class:`unionfs.fs.union.Union` calls and back.

Translation only: apart from the daemon's start-up, this is the one module that imports
pyfuse3, and it holds no filesystem logic. Each handler is a few lines: translate, call the
filesystem, translate back. One decorator is the error boundary: ``OSError`` becomes
``FUSEError(errno)``, anything else becomes ``EIO`` plus a logged traceback -- an exception
escaping a handler would end the mount. (The filesystem's own boundary, which drops the
listings a half-done change touched, is :meth:`unionfs.fs.state.State.changing`.)

Replies for objects served from a lower layer never change: they are built once and kept in
:attr:`Operations.replies` by node id until the filesystem says the node is stale (it moved
up, or the kernel forgot it), so a repeated lookup or a warm readdir entry is a dict hit.
"""

from __future__ import annotations

import dataclasses
import errno
import functools
import logging
import stat
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, Concatenate, ParamSpec, TypeVar

import pyfuse3
import trio

from unionfs.fs.union import Attr, AttrChange, Caller, Node, Union
from unionfs.idmap import IdMap

log = logging.getLogger(__name__)

# A node id apart from st_ino needs pyfuse3 3.5.0+unionfs.2 (third_party/pyfuse3).
HAVE_NODE_ID = hasattr(pyfuse3.EntryAttributes(), "node_id")

T = TypeVar("T")
P = ParamSpec("P")
Ops = TypeVar("Ops", bound="Operations")


def boundary(
    fn: Callable[Concatenate[Ops, P], Coroutine[Any, Any, T]],
) -> Callable[Concatenate[Ops, P], Coroutine[Any, Any, T]]:
    """Turn every failure of a handler into an errno the kernel can return."""
    name = fn.__name__

    @functools.wraps(fn)
    async def handler(self: Ops, *args: P.args, **kwargs: P.kwargs) -> T:
        self.fs.stats.requests[name] += 1
        if self.debug:
            log.debug("%s%r", name, args[:-1] if args and _is_ctx(args[-1]) else args)
        try:
            return await fn(self, *args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except OSError as exc:
            code = exc.errno or errno.EIO
            if self.debug:
                log.debug("%s -> %s", name, errno.errorcode.get(code, code))
            raise pyfuse3.FUSEError(code) from None
        except Exception:
            log.exception("unexpected error in %s%r", name, args)
            raise pyfuse3.FUSEError(errno.EIO) from None

    return handler


_STATVFS_FIELDS = (
    "f_bsize",
    "f_frsize",
    "f_blocks",
    "f_bfree",
    "f_bavail",
    "f_files",
    "f_ffree",
    "f_favail",
    "f_namemax",
)


def _is_ctx(obj: object) -> bool:
    return type(obj).__name__ == "RequestContext"


class Operations(pyfuse3.Operations):
    """pyfuse3 request handlers for one union mount."""

    supports_dot_lookup = True
    enable_writeback_cache = False
    # pyfuse3 3.5.0+unionfs.3 passes XATTR_CREATE/XATTR_REPLACE on to setxattr.
    setxattr_takes_flags = True
    # pyfuse3 3.5.0+unionfs.4: the kernel sends modes unmasked and the daemon applies the
    # caller's umask through the upper filesystem, so that a default ACL replaces it as on the
    # kernel's overlay. (With an older pyfuse3 the kernel masks first; applying it again
    # changes nothing.)
    enable_dont_mask = True
    # FUSE_CAP_POSIX_ACL: the kernel enforces the ACLs it reads through getxattr, as it
    # enforces modes under default_permissions (always on). The mount sets it per instance
    # from the noacl option.
    enable_acl = True

    def __init__(
        self,
        fs: Union,
        timeout: float,
        debug: bool = False,
        idmap: IdMap | None = None,
        static_nlink: bool = False,
    ) -> None:
        super().__init__()
        self.fs = fs
        self.timeout = timeout
        self.debug = debug
        # Owner mapping (uidmapping=, gidmapping=, squash_*): None costs nothing per request.
        # With one, replies go through _mapped_entry (an instance attribute shadowing entry,
        # so the unmapped path keeps its one plain call).
        self.idmap = idmap
        self.static_nlink = static_nlink
        if idmap is not None or static_nlink:
            self.entry = self._mapped_entry  # type: ignore[method-assign]
        # Needs pyfuse3 with FileInfo.cache_readdir for opendir (scripts/install.sh builds it).
        self.cache_dirs = timeout > 0 and hasattr(pyfuse3.FileInfo, "cache_readdir")
        # Ready-made replies of immutable (lower) nodes, by node id: a compact C struct,
        # where an os.stat_result would cost three times the memory.
        self.replies: dict[int, pyfuse3.EntryAttributes] = {}
        fs.events.on_stale(self._drop_reply)
        fs.events.on_kernel_stale(self._invalidate_attrs)
        self.initialized = trio.Event()

    def _drop_reply(self, inode: int) -> None:
        self.replies.pop(inode, None)

    async def _invalidate_attrs(self, inode: int) -> None:
        # A notification writes to /dev/fuse and may wait for the kernel: never on the loop.
        try:
            await trio.to_thread.run_sync(pyfuse3.invalidate_inode, inode, True)
        except OSError as exc:
            log.debug("invalidate_inode(%d): %s", inode, exc)

    def init(self) -> None:
        log.info("serving %s", self.fs.mountpoint)
        # Settings the kernel fixes when it reads the INIT reply (the readahead window) are
        # applied by a task waiting on this, which runs after that reply has been written.
        self.initialized.set()

    # -- translation --------------------------------------------------------------------

    def entry(self, attr: Attr) -> pyfuse3.EntryAttributes:
        st = attr.st
        e = pyfuse3.EntryAttributes()
        if attr.ino == attr.st_ino:
            e.st_ino = attr.ino
        elif HAVE_NODE_ID:
            e.st_ino = attr.st_ino
            e.node_id = attr.ino
        else:
            e.st_ino = attr.ino  # stock pyfuse3: the node id is all stat can show
        e.generation = 0
        e.entry_timeout = self.timeout
        # A file with several links may change through a name the kernel holds as another
        # inode (the names of a lower hard link, one of them in the upper): no attribute cache.
        e.attr_timeout = 0 if st.st_nlink > 1 and not stat.S_ISDIR(st.st_mode) else self.timeout
        e.st_mode, e.st_nlink, e.st_uid, e.st_gid = st.st_mode, attr.nlink, st.st_uid, st.st_gid
        e.st_rdev, e.st_size, e.st_blksize = st.st_rdev, st.st_size, st.st_blksize
        e.st_blocks = st.st_blocks
        e.st_atime_ns, e.st_mtime_ns = st.st_atime_ns, st.st_mtime_ns
        e.st_ctime_ns = st.st_ctime_ns
        return e

    def _mapped_entry(self, attr: Attr) -> pyfuse3.EntryAttributes:
        """:meth:`entry` with the owner shown through the mapping and, with
        ``static_nlink``, one link for a directory (as fuse-overlayfs's rpl_stat)."""
        e = Operations.entry(self, attr)
        idmap = self.idmap
        if idmap is not None:
            e.st_uid = idmap.uid_shown(e.st_uid)
            e.st_gid = idmap.gid_shown(e.st_gid)
        if self.static_nlink and stat.S_ISDIR(e.st_mode):
            e.st_nlink = 1
        return e

    def owner(self, ctx: pyfuse3.RequestContext) -> tuple[int, int]:
        """The stored owner of an object ``ctx``'s caller creates (the overflow ids for a
        caller the mapping does not cover)."""
        idmap = self.idmap
        if idmap is None:
            return ctx.uid, ctx.gid
        return idmap.creator_stored(ctx.uid, ctx.gid)

    def entry_for(self, node: Node, attr: Attr | None) -> pyfuse3.EntryAttributes:
        """The reply for ``node``: built once for objects served from a (read-only) lower."""
        cached = self.replies.get(node.ino)
        if cached is not None:
            return cached
        if attr is None:
            attr = self.fs.attr(node)
        entry = self.entry(attr)
        if node.immutable:
            self.replies[node.ino] = entry
        return entry

    def negative(self) -> pyfuse3.EntryAttributes:
        e = pyfuse3.EntryAttributes()
        e.st_ino = 0
        e.entry_timeout = self.timeout
        return e

    # -- read path ----------------------------------------------------------------------

    @boundary
    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        found = self.fs.lookup(parent_inode, name)
        if found is None:
            return self.negative()
        return self.entry_for(*found)

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        try:
            for inode, nlookup in inode_list:
                self.fs.forget(inode, nlookup)
        except Exception:
            log.exception("forget failed")

    @boundary
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        node = self.fs.node(inode)
        return self.entry_for(node, None)

    @boundary
    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        return self.fs.readlink(inode)

    @boundary
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int | pyfuse3.FileInfo:
        fh = self.fs.opendir(inode)
        if self.cache_dirs:
            # The kernel keeps the listing (FOPEN_CACHE_DIR | FOPEN_KEEP_CACHE) and serves
            # the next opendir/readdir from it; any change made through the mount bumps the
            # directory's version, which drops that cache before its next read.
            return pyfuse3.FileInfo(fh=fh, keep_cache=True, cache_readdir=True)
        return fh

    @boundary
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        reply, entry_for = pyfuse3.readdir_reply, self.entry_for
        for name, node, attr, next_id in self.fs.readdir(fh, start_id):
            if not reply(token, name, entry_for(node, attr), next_id):
                return

    @boundary
    async def releasedir(self, fh: int) -> None:
        self.fs.releasedir(fh)

    @boundary
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        if self.idmap is None:
            caller = Caller(ctx.uid, ctx.gid, ctx.pid)
        else:
            caller = _MappedCaller(ctx.uid, ctx.gid, ctx.pid, self.idmap)
        fh = await self.fs.open(inode, flags, caller)
        return pyfuse3.FileInfo(fh=fh, keep_cache=True)

    @boundary
    async def read(self, fh: int, off: int, size: int) -> bytes:
        return self.fs.read(fh, off, size)

    # No flush handler: close(2) has nothing to report here (writes are not buffered), and
    # leaving it out (ENOSYS once) saves a round trip on every close.

    @boundary
    async def release(self, fh: int) -> None:
        self.fs.release(fh)

    @boundary
    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        value = self.fs.getxattr(inode, name)
        if self.idmap is not None:
            value = self.idmap.xattr_shown(name, value)
        return value

    @boundary
    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        names = self.fs.listxattr(inode)
        if ctx.uid != 0:
            # Layer filesystems list trusted.* only to CAP_SYS_ADMIN, so the kernel's overlay
            # shows them to root alone; the daemon lists as root, so it filters here (uid 0
            # stands for the capability: the request carries no capability set).
            names = [n for n in names if not n.startswith(b"trusted.")]
        return names

    @boundary
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        sv = self.fs.statfs()
        out = pyfuse3.StatvfsData()
        for field in _STATVFS_FIELDS:
            setattr(out, field, getattr(sv, field))
        return out

    # -- write path ---------------------------------------------------------------------

    @boundary
    async def setattr(
        self,
        inode: int,
        attr: pyfuse3.EntryAttributes,
        fields: pyfuse3.SetattrFields,
        fh: int | None,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        uid = attr.st_uid if fields.update_uid else None
        gid = attr.st_gid if fields.update_gid else None
        idmap = self.idmap
        # fuse-overlayfs (do_fchown): when the mount squashes owners a chown never fails; what
        # it could not store is dropped and the rest of the change still applies.
        lenient = idmap is not None and idmap.squashes and (uid is not None or gid is not None)
        if idmap is not None:
            try:
                uid = None if uid is None else idmap.uid_stored(uid)
                gid = None if gid is None else idmap.gid_stored(gid)
            except OSError:
                if not lenient:
                    raise
                uid = gid = None
        change = AttrChange(
            mode=attr.st_mode if fields.update_mode else None,
            uid=uid,
            gid=gid,
            size=attr.st_size if fields.update_size else None,
            atime_ns=attr.st_atime_ns if fields.update_atime else None,
            mtime_ns=attr.st_mtime_ns if fields.update_mtime else None,
        )
        try:
            result = await self.fs.setattr(inode, fh, change)
        except OSError as exc:
            if not lenient or exc.errno not in (errno.EPERM, errno.EINVAL):
                raise
            change = dataclasses.replace(change, uid=None, gid=None)
            result = await self.fs.setattr(inode, fh, change)
        return self.entry(result)

    @boundary
    async def create(
        self, parent_inode: int, name: bytes, mode: int, flags: int, ctx: pyfuse3.RequestContext
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        uid, gid = self.owner(ctx)
        fh, attr = await self.fs.create(parent_inode, name, mode, flags, uid, gid, ctx.umask)
        return pyfuse3.FileInfo(fh=fh, keep_cache=True), self.entry(attr)

    @boundary
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        return await self.fs.write(fh, off, buf)

    @boundary
    async def fallocate(self, fh: int, mode: int, offset: int, length: int) -> None:
        self.fs.fallocate(fh, mode, offset, length)

    @boundary
    async def fsync(self, fh: int, datasync: bool) -> None:
        await self.fs.fsync(fh, datasync)

    @boundary
    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        await self.fs.fsyncdir(fh, datasync)

    @boundary
    async def mkdir(
        self, parent_inode: int, name: bytes, mode: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        uid, gid = self.owner(ctx)
        return self.entry(await self.fs.mkdir(parent_inode, name, mode, uid, gid, ctx.umask))

    @boundary
    async def mknod(
        self, parent_inode: int, name: bytes, mode: int, rdev: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        uid, gid = self.owner(ctx)
        return self.entry(await self.fs.mknod(parent_inode, name, mode, rdev, uid, gid, ctx.umask))

    @boundary
    async def symlink(
        self, parent_inode: int, name: bytes, target: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        uid, gid = self.owner(ctx)
        return self.entry(await self.fs.symlink(parent_inode, name, target, uid, gid))

    @boundary
    async def link(
        self, inode: int, new_parent_inode: int, new_name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        return self.entry(await self.fs.link(inode, new_parent_inode, new_name))

    @boundary
    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        await self.fs.unlink(parent_inode, name)

    @boundary
    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        await self.fs.rmdir(parent_inode, name)

    @boundary
    async def rename(
        self,
        parent_inode_old: int,
        name_old: bytes,
        parent_inode_new: int,
        name_new: bytes,
        flags: int,
        ctx: pyfuse3.RequestContext,
    ) -> None:
        await self.fs.rename(parent_inode_old, name_old, parent_inode_new, name_new, flags)

    @boundary
    async def setxattr(
        self, inode: int, name: bytes, value: bytes, ctx: pyfuse3.RequestContext, flags: int = 0
    ) -> None:
        if self.idmap is not None:
            value = self.idmap.xattr_stored(name, value)
        await self.fs.setxattr(inode, name, value, flags)

    @boundary
    async def removexattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        await self.fs.removexattr(inode, name)


@dataclasses.dataclass(frozen=True)
class _MappedCaller(Caller):
    """A caller of a mapped mount. Its ids stay as the kernel gave them (the filesystem uses
    the uid only to tell root: a privilege, not an owner); its groups, compared with a stored
    group by the set-gid rule, are given as stored (groups the mapping lacks are left out)."""

    idmap: IdMap | None = None

    def groups(self) -> set[int]:
        found = set()
        assert self.idmap is not None
        for gid in super().groups():
            try:
                found.add(self.idmap.gid_stored(gid))
            except OSError:
                pass
        return found
