"""Copy-up (the kernel's copy_up.c part): making a lower object an upper one.

Parents first (:meth:`CopyUp.upper_dir_fd`: each directory built in ``work/`` with owner,
mode, xattrs, origin and times, then renamed into place with ``RENAME_NOREPLACE``), then the
object itself: a regular file is built as an ``O_TMPFILE`` file in ``work/`` and linked in
over nothing, as the kernel's copy-up does when the upper allows it (else, and for other
objects, built under a temporary name in ``work/`` and renamed into place). A regular file
that took data is synced once its data and metadata are in, before it is linked (unless
``fsync=0``); an empty copy and a directory are not, as by the kernel. A crash at any point
leaves either the lower object visible or the complete copy (see :mod:`unionfs.fs.workdir`);
an unlinked ``O_TMPFILE`` file leaves nothing behind at all. The upper parent's times are
restored afterwards, as the kernel does: a copy-up is not a change.

The request that triggers a file's copy-up is folded into it (:class:`Change`). Copies of
:data:`BIG_COPY` bytes or more run in a worker thread; a second writer waits for the first
copy instead of starting another. A copy-up never calls the adapter: where the kernel's
cached attributes become wrong, it emits an event (:mod:`unionfs.fs.events`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import logging
import os
import stat
import time

import trio

from unionfs import fdops, format
from unionfs.fdops import RENAME_NOREPLACE, open_dir_at, renameat2
from unionfs.fs import lookup, override
from unionfs.fs import workdir as work
from unionfs.fs.listing import index_set
from unionfs.fs.nodes import UPPER, Node
from unionfs.fs.state import State, err
from unionfs.fs.workdir import Workdir

BIG_COPY = 1 << 20  # copy-ups at least this large run in a worker thread

log = logging.getLogger(__name__)


class _LinkRefused(Exception):
    """The kernel refused to link a copy built as an O_TMPFILE file."""


@dataclasses.dataclass(frozen=True)
class Change:
    """What the request that triggers a file's copy-up will change right after it.

    The copy is built with these values in place of the lower file's, so a chmod, utimes
    or truncate of a lower file costs one copy, not a copy and then a change (and an
    ``O_TRUNC`` open copies no data at all). The result is the same as the kernel's copy-up
    followed by the change.
    """

    mode: int | None = None
    atime_ns: int | None = None
    mtime_ns: int | None = None
    size: int | None = None


NO_CHANGE = Change()
TRUNCATE = Change(size=0)


def restore_times(fd: int, st: os.stat_result) -> None:
    """Put back the times ``st`` of the upper directory ``fd``: the kernel keeps an upper
    parent's times across a copy-up or a marker change, which are not changes to it."""
    try:
        os.utime(fd, ns=(st.st_atime_ns, st.st_mtime_ns))
    except OSError:
        pass


class CopyUp:
    """Copies objects up, one at a time per object; owns the workdir and impure marks."""

    def __init__(self, s: State, wd: Workdir) -> None:
        self.s = s
        self.wd = wd
        self._copying: dict[int, trio.Event] = {}
        self._impure: set[int] = set()  # directory nodes known to carry the mark

    async def wait(self, node: Node) -> bool:
        """Wait for a copy-up of ``node`` in progress, if any; True if there was one."""
        pending = self._copying.get(node.ino)
        if pending is None:
            return False
        await pending.wait()
        return True

    def upper_dir_fd(self, node: Node) -> int:
        """The upper directory of ``node``, copying it (and its parents, top-down) up if
        needed. Iterative: a chain thousands of levels deep is copied up in one call."""
        missing: list[Node] = []
        cur = node
        while cur.layers[0] != UPPER:
            assert cur.parent is not None  # the root always has an upper when writable
            missing.append(cur)
            cur = cur.parent
        fd = self.s.table.dir_fd(cur, UPPER)
        for child in reversed(missing):
            fd = self._copy_up_dir(child, fd)
        return fd

    def _copy_up_dir(self, node: Node, parent_fd: int) -> int:
        """Copy the directory ``node`` up into its parent's upper directory ``parent_fd``."""
        s = self.s
        assert node.parent is not None
        s.touch(node.parent)
        work_fd = self.wd.work_fd
        lower_fd = s.table.dir_fd(node, node.layer)
        st = os.fstat(lower_fd)
        tmp = work.temp_name()
        os.mkdir(tmp, 0o700, dir_fd=work_fd)
        try:
            tmp_fd = open_dir_at(work_fd, tmp)
            try:
                self.copy_meta(lower_fd, tmp_fd, st, layer=node.layer)
                upper_st = os.fstat(tmp_fd)
            finally:
                os.close(tmp_fd)
            parent_times = os.fstat(parent_fd)
            renameat2(work_fd, tmp, parent_fd, node.name, RENAME_NOREPLACE)
        except BaseException:
            work.remove_tree_at(work_fd, tmp)
            raise
        self.mark_impure(node.parent, parent_fd)
        restore_times(parent_fd, parent_times)
        node.layers = (UPPER,) + node.layers
        s.table.moved_up(node, upper_st, origin=True)
        index_set(node.parent, node.name, True, node.layers)
        s.stats.copy_ups += 1
        s.stats.event("copy-up", path=node.path().decode(errors="replace"), size=0, type="dir")
        return s.table.dir_fd(node, UPPER)

    def fix_origin(
        self, parent: Node, name: bytes, layers: tuple[int, ...], opened: dict[int, int]
    ) -> None:
        """A merged directory whose upper part has no origin (made by mkdir in an upper, or by
        a tool) gets its lower directory's, and its parent is marked impure: the kernel's
        lookup does the same (``ovl_fix_origin``), so the upper stays the kernel's.

        Installed as :attr:`State.merged_dir_found`; ``opened`` holds the layer directories
        opened when the chain was checked.
        """
        s = self.s
        if not s.opts.writable or self.wd.work_fd < 0:
            return
        upper_fd = opened.get(UPPER)
        if upper_fd is None or fdops.fd_getxattr(upper_fd, s.names.origin) is not None:
            return
        lower = layers[1]
        lower_fd = opened.get(lower)
        own = lower_fd is None
        if lower_fd is None:
            lower_fd = open_dir_at(s.table.dir_fd(parent, lower), name)
        try:
            origin = format.encode_origin(lower_fd)
        finally:
            if own:
                os.close(lower_fd)
        if origin is None:
            return
        format.set_origin(upper_fd, s.names.origin, origin)
        self.mark_impure(parent, s.table.dir_fd(parent, UPPER))

    def mark_impure(self, parent: Node, pfd: int) -> None:
        """Mark ``parent``'s upper directory (open as ``pfd``) impure, as the kernel does."""
        if parent.ino in self._impure:
            return
        format.mark_impure(pfd, self.s.names.impure)
        self._impure.add(parent.ino)

    def drop_stale_impure(self, node: Node, names: list[bytes]) -> None:
        """Drop the impure mark of a pure upper directory none of whose entries has an
        origin, as the kernel's readdir does (``ovl_cache_get_impure``: "a good opportunity
        to get rid of an unneeded impure flag", best effort).

        Installed as :attr:`State.dir_listed`. The kernel takes that path only for a
        directory it lists as a real one (``ovl_dir_is_real``): one with a lower part, or
        with an origin xattr of its own, is listed as merged and keeps its mark. An entry
        keeps the mark when its lookup accepted its origin (``OVL_TYPE_ORIGIN`` in
        ``ovl_cache_update``), which :meth:`NodeTable.has_origin` tells.
        """
        s = self.s
        if not s.opts.writable or self.wd.work_fd < 0 or node.layers != (UPPER,):
            return
        fd = s.table.dir_fd(node, UPPER)
        if fdops.fd_getxattr(fd, s.names.impure) is None:
            self._impure.discard(node.ino)
            return
        if fdops.fd_getxattr(fd, s.names.origin) is not None:
            return
        for name in names:
            found = lookup.resolve(s, node, name)
            if found is not None and s.table.has_origin(found[0]):
                return
        self._impure.discard(node.ino)
        with contextlib.suppress(OSError):
            os.removexattr(fd, s.names.impure)

    def copy_meta(
        self, src: int, dst: int, st: os.stat_result, change: Change = NO_CHANGE, layer: int = -1
    ) -> None:
        """Owner, mode, xattrs, origin and times from ``src`` (an object of ``layer``) to
        ``dst`` (both open fds). The owner and mode are those the mount showed: with
        ``xattr_permissions`` they are recorded in the copy's override xattr
        (:mod:`unionfs.fs.override`) and its inode keeps ours."""
        ov = self.s.overrides
        if ov is not None and layer >= 0:
            shown = ov.shown(layer, src, st)
            if ov.write is not None:
                mode = shown.st_mode if change.mode is None else change.mode
                format.copy_xattrs(src, dst, self.s.opts.userxattr)
                ov.record(
                    dst,
                    shown.st_uid,
                    shown.st_gid,
                    stat.S_IFMT(shown.st_mode) | stat.S_IMODE(mode),
                    shown.st_rdev,
                )
                os.fchmod(dst, override.real_mode(st.st_mode))
                st = shown
            else:
                st = shown
                self._copy_owner_mode(dst, st, change)
                format.copy_xattrs(src, dst, self.s.opts.userxattr)
        else:
            self._copy_owner_mode(dst, st, change)
            format.copy_xattrs(src, dst, self.s.opts.userxattr)
        if stat.S_ISDIR(st.st_mode) or st.st_nlink == 1:
            # The kernel (index=off) records no origin for a copy-up that breaks a lower hard
            # link: the copy is a new inode from then on.
            format.set_origin(dst, self.s.names.origin, format.encode_origin(src))
        os.utime(
            dst,
            ns=(
                st.st_atime_ns if change.atime_ns is None else change.atime_ns,
                st.st_mtime_ns if change.mtime_ns is None else change.mtime_ns,
            ),
        )

    def _copy_owner_mode(self, dst: int, st: os.stat_result, change: Change) -> None:
        if st.st_uid != self.wd.euid or st.st_gid != self.wd.egid:  # else created with them
            os.fchown(dst, st.st_uid, st.st_gid)
        os.fchmod(dst, stat.S_IMODE(st.st_mode if change.mode is None else change.mode))

    async def copy_up(self, node: Node, change: Change | None = None) -> bool:
        """Make ``node`` an upper object (no-op if it is one). Parents are copied first.

        EROFS on a read-only mount. Two requests copying the same object wait for one
        copy. A large file's data is copied in a worker thread, so other requests keep
        being served meanwhile. With a ``change``, a regular file is copied with it applied;
        returns True when that happened (else the caller applies the change itself).
        Counted in the stats (copy-ups, bytes, seconds) and as a "copy-up" event.
        """
        self.s.check_writable()
        while True:
            if node.layers[0] == UPPER:
                return False
            pending = self._copying.get(node.ino)
            if pending is None:
                break
            await pending.wait()
        if node.pinned >= 0:
            self._check_gone_name(node)
        if node.is_dir:
            self.upper_dir_fd(node)
            return False
        done = trio.Event()
        self._copying[node.ino] = done
        try:
            try:
                applied = await self._copy_up_file(node, change or NO_CHANGE)
            except _LinkRefused as exc:
                # The probe at mount linked a file of ours; this copy carries another owner
                # and the kernel refused the link (fs.protected_hardlinks): copies are built
                # under a name in work/ from now on.
                self.wd.tmpfile = False
                log.warning("copy-ups cannot link O_TMPFILE files in (%s): using names", exc)
                applied = await self._copy_up_file(node, change or NO_CHANGE)
            return applied and change is not None
        finally:
            del self._copying[node.ino]
            done.set()

    def _new_copy(self, work_fd: int) -> tuple[int, bytes | None]:
        """A new, empty file in ``work/`` open for writing, and its name (None for an
        O_TMPFILE file, which has none until it is linked in)."""
        if self.wd.tmpfile:
            return work.new_tmpfile(work_fd), None
        tmp = work.temp_name()
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
        return os.open(tmp, flags, 0o600, dir_fd=work_fd), tmp

    def _check_gone_name(self, node: Node) -> None:
        """Whether a lower object whose name went away while the kernel held it may be copied
        up to that name (fchmod, fsetxattr, an ``O_RDWR`` reopen through ``/proc`` ... of a
        descriptor opened before the unlink or rmdir); raises the kernel's errno if not.

        The kernel copies such an object up to its old name all the same. A regular file is
        linked in from an ``O_TMPFILE``, which fails on whatever holds the name (EEXIST: its
        whiteout, or a new object); any other object is renamed in from the workdir, which
        replaces a whiteout (a fifo, a device or a symlink comes back: kept, it is the
        kernel's) and fails on a directory (EISDIR; a directory moved onto a non-directory:
        ENOTDIR). Into a removed parent, the link finds nothing (ENOENT) and the rename
        cannot lock it (EIO). Where the kernel's rename would destroy a live object with a
        deleted one, the copy is refused instead (EEXIST), on purpose: a new non-directory
        at the name of a fifo, device or symlink, a new directory at a directory's name.
        """
        parent = node.parent
        assert parent is not None
        regular = not node.is_dir and stat.S_ISREG(os.fstat(node.pinned).st_mode)
        if parent.removed:
            raise err(errno.ENOENT if regular else errno.EIO)
        found = format.classify_at(self.upper_dir_fd(parent), node.name)
        if found is None:
            return  # nothing holds the name: the copy takes it, as the kernel's would
        if regular:
            raise err(errno.EEXIST)
        if node.is_dir:
            raise err(errno.EEXIST if found is format.Found.DIR else errno.ENOTDIR)
        if found is format.Found.DIR:
            raise err(errno.EISDIR)
        if found not in (format.Found.CHARDEV_WHITEOUT, format.Found.OCI_WHITEOUT):
            raise err(errno.EEXIST)

    async def _copy_up_file(self, node: Node, change: Change) -> bool:
        """Copy a non-directory up; True when it was a regular file, built with ``change``."""
        s = self.s
        started = time.monotonic()
        assert node.parent is not None
        parent = node.parent
        parent_fd = self.upper_dir_fd(parent)
        s.touch(parent)
        layer = node.layer
        try:
            src, st = s.table.open_file(node, layer, os.O_RDONLY)
        except OSError as exc:
            if exc.errno != errno.ENXIO:
                raise
            src = -1  # not a regular file
            lower_pfd = s.table.dir_fd(parent, layer)
            st = os.stat(node.name, dir_fd=lower_pfd, follow_symlinks=False)
        regular = src >= 0
        copied = 0
        # A regular file is built as an O_TMPFILE file and linked in, as the kernel's
        # copy-up does when the upper allows it; else under a temporary name in work/.
        tmp: bytes | None = None
        dst = -1
        work_fd = self.wd.work_fd
        try:
            if regular:
                try:
                    dst, tmp = self._new_copy(work_fd)
                    devs = (st.st_dev, self.wd.upper_dev)
                    size = st.st_size
                    if change.size is not None:
                        size = min(size, change.size)
                    if size >= BIG_COPY:
                        await trio.to_thread.run_sync(
                            work.copy_data, src, dst, size, devs, limiter=s.limiter
                        )
                    else:
                        work.copy_data(src, dst, size, devs)
                    if change.size is not None and change.size != size:
                        os.ftruncate(dst, change.size)
                    copied = size
                    self.copy_meta(src, dst, st, change, layer)
                    if s.opts.fsync and size:
                        # Durable before it is linked in. As the kernel's: a copy that took
                        # no data (an empty file, an O_TRUNC open) is not synced.
                        os.fsync(dst)
                finally:
                    os.close(src)
            else:
                tmp = work.temp_name()
                if stat.S_ISLNK(st.st_mode):
                    target = os.readlink(node.name, dir_fd=lower_pfd)
                    os.symlink(target, tmp, dir_fd=work_fd)
                else:
                    os.mknod(tmp, st.st_mode, st.st_rdev, dir_fd=work_fd)
                try:
                    os.chown(tmp, st.st_uid, st.st_gid, dir_fd=work_fd, follow_symlinks=False)
                except PermissionError:
                    # Only a regular file or a directory carries the override xattr; as
                    # fuse-overlayfs, other copies keep our owner when it may not be given.
                    if s.overrides is None or s.overrides.write is None:
                        raise
                src_path = fdops.at_path(lower_pfd, node.name)
                dst_path = fdops.at_path(work_fd, tmp)
                if not stat.S_ISLNK(st.st_mode):
                    fdops.chmod_at(work_fd, tmp, stat.S_IMODE(st.st_mode))
                format.copy_xattrs(src_path, dst_path, s.opts.userxattr)
                # user.* xattrs cannot be set on symlinks; no origin for a broken hard link.
                if (not stat.S_ISLNK(st.st_mode) or not s.opts.userxattr) and st.st_nlink == 1:
                    origin = format.encode_origin(lower_pfd, node.name)
                    format.set_origin(dst_path, s.names.origin, origin)
                os.utime(
                    tmp,
                    ns=(st.st_atime_ns, st.st_mtime_ns),
                    dir_fd=work_fd,
                    follow_symlinks=False,
                )
                upper_st = os.stat(tmp, dir_fd=work_fd, follow_symlinks=False)
            if node.layers[0] == UPPER or node.parent is not parent:
                raise err(errno.EAGAIN)  # moved or copied while we worked; caller retries
            parent_times = os.fstat(parent_fd)
            if not regular:
                assert tmp is not None
                # Over the whiteout of a name gone while the kernel held it, as the kernel's
                # rename from its workdir (_check_gone_name allowed nothing else there).
                os.rename(tmp, node.name, src_dir_fd=work_fd, dst_dir_fd=parent_fd)
                if node.pinned >= 0 and format.oci_marker_exists(parent_fd, node.name):
                    os.unlink(format.OCI_WHITEOUT_PREFIX + node.name, dir_fd=parent_fd)
            elif tmp is None:
                # Never over anything: whatever holds the name now is not this object (see
                # _check_gone_name); ENOENT in a removed directory.
                try:
                    work.link_tmpfile(dst, parent_fd, node.name)
                except PermissionError as exc:
                    raise _LinkRefused(exc.strerror) from exc
            else:
                # Over nothing, as the link of an O_TMPFILE copy.
                renameat2(work_fd, tmp, parent_fd, node.name, RENAME_NOREPLACE)
            if regular:
                upper_st = os.fstat(dst)
        except BaseException:
            if tmp is not None:
                work.remove_tree_at(work_fd, tmp)
            raise
        finally:
            if dst >= 0:
                os.close(dst)
        self.mark_impure(parent, parent_fd)
        restore_times(parent_fd, parent_times)
        node.layers = (UPPER,)
        # A copy that breaks a lower hard link gets no origin (see copy_meta).
        s.table.moved_up(node, upper_st, origin=st.st_nlink == 1)
        index_set(parent, node.name, False, node.layers)
        elapsed = time.monotonic() - started
        s.stats.copy_ups += 1
        s.stats.copy_up_bytes += copied
        s.stats.copy_up_seconds += elapsed
        s.stats.event(
            "copy-up",
            path=node.path().decode(errors="replace"),
            size=copied,
            source_layer=layer,
            seconds=round(elapsed, 6),
        )
        if st.st_nlink > 1:
            # The copy breaks a lower hard link, as in the kernel: this name is a new inode
            # whose number and link count are the copy's, not those the kernel cached.
            await s.events.kernel_stale(node.ino)
        return regular
