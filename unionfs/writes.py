"""The write path: copy-up, creation, removal with whiteouts, rename, metadata and xattrs.

Every change lands in the upper layer, in the kernel overlayfs format (see
:mod:`unionfs.whiteout`); lowers are never written. Where the kernel makes a change atomic
by building it in ``work/`` and renaming it into place, so does this module:

* copy-up: object built in ``work/`` and renamed in (parents first, with their metadata);
* a new name over a whiteout: built in ``work/``, renamed over the whiteout (a directory is
  exchanged with it and made opaque);
* removing an upper name that also exists below: a whiteout renamed over it
  (``RENAME_WHITEOUT``-style, so no moment shows the lower object);
* removing an upper directory: moved into ``work/`` first, then deleted with its whiteouts.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import logging
import os
import stat
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import trio

from unionfs import copyup, posixacl, whiteout
from unionfs.config import MountConfig
from unionfs.core import UPPER, Attr, UnionCore, _err
from unionfs.dirindex import classify_at, oci_marker_exists
from unionfs.inodes import Node
from unionfs.layers import open_dir_at
from unionfs.sysc import (
    RENAME_EXCHANGE,
    RENAME_NOREPLACE,
    RENAME_WHITEOUT,
    fallocate,
    mount_id,
    renameat2,
)

log = logging.getLogger(__name__)

BIG_COPY = 1 << 20  # copy-ups at least this large run in a worker thread
# The kernel marks an upper directory "impure" once it may hold an entry with an origin (a
# copy-up in it, or such an entry moved in), so its readdir knows to look origins up.
IMPURE_XATTRS = (b"trusted.overlay.impure", b"user.overlay.impure")


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


@contextlib.contextmanager
def _umask(mask: int) -> Iterator[None]:
    """The process umask set to ``mask`` for one creating system call (the daemon's own is
    0, and requests are served one at a time on the trio thread)."""
    os.umask(mask)
    try:
        yield
    finally:
        os.umask(0)


_NO_CHANGE = Change()
_TRUNCATE = Change(size=0)


class UnionFS(UnionCore):
    """The whole filesystem: :class:`UnionCore` plus every operation that writes."""

    def __init__(self, cfg: MountConfig) -> None:
        super().__init__(cfg)
        self.work_fd = -1
        self.upper_dev = 0
        self.oci_whiteouts = False
        self._lock_fd = -1
        self._copying: dict[int, trio.Event] = {}
        # Owner and group of a file created in work/: a copy with them needs no chown.
        self.euid, self.egid = os.geteuid(), os.getegid()
        # Set by the adapter: drops the kernel's cached attributes of an inode.
        self.attr_changed: Callable[[int], Awaitable[None]] | None = None
        self.limiter = trio.CapacityLimiter(4)
        self.impure_xattr = IMPURE_XATTRS[1 if cfg.userxattr else 0]
        self._impure: set[int] = set()  # directory nodes known to carry the mark
        if cfg.upper is not None and cfg.workdir is not None:
            self._open_workdir(cfg.workdir, cfg.read_only)

    # -- set-up -------------------------------------------------------------------------

    def _open_workdir(self, workdir: str, read_only: bool) -> None:
        """Lock the workdir and open its ``work/``, through the descriptor opened when the
        configuration was validated (``workdir`` is then an ``OpenedDir``): the path is not
        resolved again, so a workdir swapped for a symlink since then is not followed. An
        unvalidated configuration (unit tests) opens the path now, never through a symlink.
        """
        import fcntl

        from unionfs.errors import UnionfsError

        take = getattr(workdir, "take", None)
        wfd = take() if take is not None else open_dir_at(-1, workdir)
        try:
            fcntl.flock(wfd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(wfd)
            raise UnionfsError(f"workdir {workdir!r} is in use by another unionfs mount") from None
        self._lock_fd = wfd
        if read_only:
            return
        try:
            os.mkdir(copyup.WORK_SUBDIR, 0o700, dir_fd=wfd)
        except FileExistsError:
            pass
        except OSError as exc:
            raise UnionfsError(f"workdir {workdir!r} is not writable: {exc.strerror}") from None
        self.work_fd = open_dir_at(wfd, copyup.WORK_SUBDIR)
        work_st = os.fstat(self.work_fd)
        if work_st.st_mode & stat.S_ISGID:  # new files take the directory's group
            self.egid = work_st.st_gid
        self.upper_dev = work_st.st_dev
        kept: list[bytes] = []
        cleaned = copyup.clean_workdir(self.work_fd, kept)
        if cleaned:
            log.warning("removed %d leftover(s) of interrupted copy-ups from %s", cleaned, workdir)
        if kept or mount_id(self.work_fd) != mount_id(wfd):
            # Like the kernel: a work/ that cannot be emptied (another filesystem is mounted
            # in it or on it) is left alone, and the mount is read-only.
            os.close(self.work_fd)
            self.work_fd = -1
            self.writable = False
            self.cfg.warnings.append(
                f"workdir {workdir!r}: work/ cannot be emptied (another mount is in it or on "
                "it): mounting read-only"
            )
            return
        if not whiteout.mknod_whiteouts_supported(self.work_fd):
            self.oci_whiteouts = True
            self.cfg.warnings.append(
                "the upper filesystem refuses mknod: whiteouts are written as .wh.<name> files"
            )

    def close(self) -> None:
        super().close()
        for fd in (self.work_fd, self._lock_fd):
            if fd >= 0:
                os.close(fd)
        self.work_fd = self._lock_fd = -1

    def _check_writable(self) -> None:
        if not self.writable:
            raise _err(errno.EROFS)

    @staticmethod
    def _check_name(name: bytes) -> None:
        if whiteout.is_marker_name(name):
            # A .wh. name in the upper would act as a whiteout: refuse to create one.
            raise _err(errno.EINVAL)
        if len(name) > 255:
            raise _err(errno.ENAMETOOLONG)

    # -- copy-up ------------------------------------------------------------------------

    def upper_dir_fd(self, node: Node) -> int:
        """The upper directory of ``node``, copying it (and its parents, top-down) up if
        needed. Iterative: a chain thousands of levels deep is copied up in one call."""
        missing: list[Node] = []
        cur = node
        while cur.layers[0] != UPPER:
            assert cur.parent is not None  # the root always has an upper when writable
            missing.append(cur)
            cur = cur.parent
        fd = self.table.dir_fd(cur, UPPER)
        for child in reversed(missing):
            fd = self._copy_up_dir(child, fd)
        return fd

    def _copy_up_dir(self, node: Node, parent_fd: int) -> int:
        """Copy the directory ``node`` up into its parent's upper directory ``parent_fd``."""
        assert node.parent is not None
        lower_fd = self.table.dir_fd(node, node.layer)
        st = os.fstat(lower_fd)
        tmp = copyup.temp_name()
        os.mkdir(tmp, 0o700, dir_fd=self.work_fd)
        try:
            tmp_fd = open_dir_at(self.work_fd, tmp)
            try:
                self._copy_meta(lower_fd, tmp_fd, st, node.ino)
                upper_st = os.fstat(tmp_fd)
            finally:
                os.close(tmp_fd)
            parent_times = os.fstat(parent_fd)
            renameat2(self.work_fd, tmp, parent_fd, node.name, RENAME_NOREPLACE)
        except BaseException:
            copyup.remove_tree_at(self.work_fd, tmp)
            raise
        self._mark_impure(node.parent, parent_fd)
        self._restore_times(parent_fd, parent_times)
        node.layers = (UPPER,) + node.layers
        node.drop_attr_cache()
        self.moved_up(node, upper_st, origin=True)
        self._index_set(node.parent, node.name, True, node.layers)
        self.stats.copy_ups += 1
        self.stats.event("copy-up", path=node.path().decode(errors="replace"), size=0, type="dir")
        return self.table.dir_fd(node, UPPER)

    def merged_dir_found(
        self, parent: Node, name: bytes, layers: tuple[int, ...], opened: dict[int, int]
    ) -> None:
        """A merged directory whose upper part has no origin (made by mkdir in an upper, or by
        a tool) gets its lower directory's, and its parent is marked impure: the kernel's
        lookup does the same (``ovl_fix_origin``), so the upper stays the kernel's."""
        if not self.writable or self.work_fd < 0:
            return
        upper_fd = opened.get(UPPER)
        if upper_fd is None or whiteout.fd_getxattr(upper_fd, self.origin_xattr) is not None:
            return
        lower = layers[1]
        lower_fd = opened.get(lower)
        own = lower_fd is None
        if lower_fd is None:
            lower_fd = open_dir_at(self.table.dir_fd(parent, lower), name)
        try:
            origin = whiteout.encode_origin(lower_fd)
        finally:
            if own:
                os.close(lower_fd)
        if origin is None:
            return
        copyup.set_origin(upper_fd, self.origin_xattr, origin)
        self._mark_impure(parent, self.table.dir_fd(parent, UPPER))

    def _mark_impure(self, parent: Node, pfd: int) -> None:
        """Mark ``parent``'s upper directory (open as ``pfd``) impure, as the kernel does."""
        if parent.ino in self._impure:
            return
        if whiteout.fd_getxattr(pfd, self.impure_xattr) is None:
            os.setxattr(pfd, self.impure_xattr, b"y")
        self._impure.add(parent.ino)

    def _copy_meta(
        self, src: int, dst: int, st: os.stat_result, ino: int, change: Change = _NO_CHANGE
    ) -> None:
        """Owner, mode, xattrs, origin and times from ``src`` to ``dst`` (both open fds)."""
        if st.st_uid != self.euid or st.st_gid != self.egid:  # else created with them
            os.fchown(dst, st.st_uid, st.st_gid)
        os.fchmod(dst, stat.S_IMODE(st.st_mode if change.mode is None else change.mode))
        copyup.copy_xattrs(src, dst, self.cfg.userxattr)
        if stat.S_ISDIR(st.st_mode) or st.st_nlink == 1:
            # The kernel (index=off) records no origin for a copy-up that breaks a lower hard
            # link: the copy is a new inode from then on.
            copyup.set_origin(dst, self.origin_xattr, whiteout.encode_origin(src))
        os.utime(
            dst,
            ns=(
                st.st_atime_ns if change.atime_ns is None else change.atime_ns,
                st.st_mtime_ns if change.mtime_ns is None else change.mtime_ns,
            ),
        )

    @staticmethod
    def _restore_times(fd: int, st: os.stat_result) -> None:
        # The kernel keeps the upper parent's times across a copy-up: it is not a change.
        try:
            os.utime(fd, ns=(st.st_atime_ns, st.st_mtime_ns))
        except OSError:
            pass

    async def copy_up(self, node: Node, change: Change | None = None) -> bool:
        """Make ``node`` an upper object (no-op if it is one). Parents are copied first.

        Two requests copying the same object wait for one copy. A large file's data is
        copied in a worker thread, so other requests keep being served meanwhile. With a
        ``change``, a regular file is copied with it applied; returns True when that
        happened (else the caller applies the change itself).
        """
        self._check_writable()
        while True:
            if node.layers[0] == UPPER:
                return False
            pending = self._copying.get(node.ino)
            if pending is None:
                break
            await pending.wait()
        if node.is_dir:
            self.upper_dir_fd(node)
            return False
        done = trio.Event()
        self._copying[node.ino] = done
        try:
            applied = await self._copy_up_file(node, change or _NO_CHANGE)
            return applied and change is not None
        finally:
            del self._copying[node.ino]
            done.set()

    async def _copy_up_file(self, node: Node, change: Change) -> bool:
        """Copy a non-directory up; True when it was a regular file, built with ``change``."""
        started = time.monotonic()
        assert node.parent is not None
        parent = node.parent
        parent_fd = self.upper_dir_fd(parent)
        layer = node.layer
        try:
            src, st = self.open_in_layer_stat(node, layer, os.O_RDONLY)
        except OSError as exc:
            if exc.errno != errno.ENXIO:
                raise
            src = -1  # not a regular file
            lower_pfd = self.table.dir_fd(parent, layer)
            st = os.stat(node.name, dir_fd=lower_pfd, follow_symlinks=False)
        regular = src >= 0
        copied = 0
        tmp = copyup.temp_name()
        work_fd = self.work_fd
        try:
            if regular:
                try:
                    dst = os.open(
                        tmp,
                        os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
                        0o600,
                        dir_fd=work_fd,
                    )
                    try:
                        devs = (st.st_dev, self.upper_dev)
                        size = st.st_size
                        if change.size is not None:
                            size = min(size, change.size)
                        if size >= BIG_COPY:
                            await trio.to_thread.run_sync(
                                copyup.copy_data, src, dst, size, devs, limiter=self.limiter
                            )
                        else:
                            copyup.copy_data(src, dst, size, devs)
                        if change.size is not None and change.size != size:
                            os.ftruncate(dst, change.size)
                        copied = size
                        self._copy_meta(src, dst, st, node.ino, change)
                        if self.cfg.fsync:
                            os.fsync(dst)
                        upper_st = os.fstat(dst)
                    finally:
                        os.close(dst)
                finally:
                    os.close(src)
            else:
                if stat.S_ISLNK(st.st_mode):
                    target = os.readlink(node.name, dir_fd=lower_pfd)
                    os.symlink(target, tmp, dir_fd=work_fd)
                else:
                    os.mknod(tmp, st.st_mode, st.st_rdev, dir_fd=work_fd)
                os.chown(tmp, st.st_uid, st.st_gid, dir_fd=work_fd, follow_symlinks=False)
                src_path = whiteout.at_path(lower_pfd, node.name)
                dst_path = whiteout.at_path(work_fd, tmp)
                if not stat.S_ISLNK(st.st_mode):
                    self._chmod_at(work_fd, tmp, stat.S_IMODE(st.st_mode))
                copyup.copy_xattrs(src_path, dst_path, self.cfg.userxattr)
                # user.* xattrs cannot be set on symlinks; no origin for a broken hard link.
                if (not stat.S_ISLNK(st.st_mode) or not self.cfg.userxattr) and st.st_nlink == 1:
                    origin = whiteout.encode_origin(lower_pfd, node.name)
                    copyup.set_origin(dst_path, self.origin_xattr, origin)
                os.utime(
                    tmp,
                    ns=(st.st_atime_ns, st.st_mtime_ns),
                    dir_fd=work_fd,
                    follow_symlinks=False,
                )
                upper_st = os.stat(tmp, dir_fd=work_fd, follow_symlinks=False)
            if node.layers[0] == UPPER or node.parent is not parent:
                raise _err(errno.EAGAIN)  # moved or copied while we worked; caller retries
            parent_times = os.fstat(parent_fd)
            os.rename(tmp, node.name, src_dir_fd=work_fd, dst_dir_fd=parent_fd)
        except BaseException:
            copyup.remove_tree_at(work_fd, tmp)
            raise
        self._mark_impure(parent, parent_fd)
        self._restore_times(parent_fd, parent_times)
        node.layers = (UPPER,)
        node.drop_attr_cache()
        # A copy that breaks a lower hard link gets no origin (see _copy_meta).
        self.moved_up(node, upper_st, origin=st.st_nlink == 1)
        self._index_set(parent, node.name, False, node.layers)
        elapsed = time.monotonic() - started
        self.stats.copy_ups += 1
        self.stats.copy_up_bytes += copied
        self.stats.copy_up_seconds += elapsed
        self.stats.event(
            "copy-up",
            path=node.path().decode(errors="replace"),
            size=copied,
            source_layer=layer,
            seconds=round(elapsed, 6),
        )
        if st.st_nlink > 1 and self.attr_changed is not None:
            # The copy breaks a lower hard link, as in the kernel: this name is a new inode
            # whose number and link count are the copy's, not those the kernel cached.
            await self.attr_changed(node.ino)
        return regular

    @staticmethod
    def _chmod_at(dir_fd: int, name: bytes, mode: int) -> None:
        """chmod without following a symlink (fchmodat has no working NOFOLLOW on Linux)."""
        fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
        try:
            os.chmod(f"/proc/self/fd/{fd}", mode)
        finally:
            os.close(fd)

    # -- index upkeep -------------------------------------------------------------------

    def _index_set(self, parent: Node, name: bytes, is_dir: bool, layers: tuple[int, ...]) -> None:
        if parent.index is not None:
            parent.index.set(name, (is_dir, layers, True))

    def _index_discard(self, parent: Node, name: bytes) -> None:
        if parent.index is not None:
            parent.index.discard(name)

    # -- names below and whiteouts ------------------------------------------------------

    def lower_positive(self, parent: Node, name: bytes) -> bool:
        """Whether ``name`` is visible in ``parent``'s lowers (so removing it needs a whiteout)."""
        for layer in parent.layers:
            if layer == UPPER:
                continue
            found = classify_at(self.table.dir_fd(parent, layer), name)
            if found is not None:
                return found != "whiteout"
        return False

    def _upper_hidden_by(self, pfd: int, name: bytes) -> str | None:
        """What in the upper directory hides ``name``: 'whiteout', 'oci', or None."""
        try:
            os.stat(name, dir_fd=pfd, follow_symlinks=False)
            return "whiteout"
        except FileNotFoundError:
            pass
        return "oci" if oci_marker_exists(pfd, name) else None

    def _make_whiteout(self, pfd: int, name: bytes) -> None:
        whiteout.make_whiteout(pfd, name, oci_fallback=self.oci_whiteouts)
        self.stats.whiteouts_created += 1

    def _owner(self, pfd: int, uid: int, gid: int) -> tuple[int, int, bool]:
        """Owner of a new object in upper dir ``pfd``; the bool says "set-gid directory"."""
        pst = os.fstat(pfd)
        if pst.st_mode & stat.S_ISGID:
            return uid, pst.st_gid, True
        return uid, gid, False

    # -- creating names -----------------------------------------------------------------

    def _prepare_new(self, parent_ino: int, name: bytes) -> Node:
        self._check_writable()
        self._check_name(name)
        parent = self.node(parent_ino)
        if not parent.is_dir:
            raise _err(errno.ENOTDIR)
        if self.index_of(parent).get(name) is not None:
            raise _err(errno.EEXIST)
        return parent

    async def _new_entry(
        self,
        parent_ino: int,
        name: bytes,
        kind: str,
        make: Any,
        uid: int,
        gid: int,
        probe: bool = False,
        linked: Node | None = None,
        mode: int | None = None,
        umask: int = 0,
    ) -> tuple[Node, os.stat_result, int | None]:
        """Create ``name`` with ``make(dir_fd, name) -> fd | None`` in the upper layer.

        ``linked`` is the node ``make`` links to (a new name of it, with its owner).
        ``mode`` is the requested mode (not for links and symlinks) and ``umask`` the
        caller's: the upper filesystem applies it, unless the parent has a default ACL,
        which then decides, as in the kernel's overlay.

        Handles the parent copy-up, owner and set-gid inheritance, and replacing a whiteout
        (the new directory is then opaque). Returns the node (lookup counted), its stat and
        the descriptor ``make`` returned.
        """
        parent = self._prepare_new(parent_ino, name)
        pfd = self.upper_dir_fd(parent)
        # A directory with no lower layers holds no whiteouts (none is ever needed there),
        # so the probe is skipped; a stray one still surfaces as EEXIST and is handled.
        careful = probe or parent.layers != (UPPER,)
        hidden = self._upper_hidden_by(pfd, name) if careful else None
        owner_uid, owner_gid, sgid_dir = self._owner(pfd, uid, gid)
        is_dir = kind == "dir"
        keep_owner = linked is not None  # a new name for an existing inode keeps its owner
        fd: int | None = None
        if hidden == "whiteout":
            tmp = copyup.temp_name()
            default_acl = None
            if mode is not None:
                default_acl = whiteout.fd_getxattr(pfd, posixacl.DEFAULT_XATTR)
            with _umask(0 if default_acl else umask):
                fd = make(self.work_fd, tmp)
            try:
                if default_acl is not None and mode is not None:
                    self._inherit_acl(tmp, mode, default_acl, is_dir)
                if not keep_owner:
                    self._set_owner(self.work_fd, tmp, owner_uid, owner_gid, is_dir and sgid_dir)
                if is_dir:
                    tfd = open_dir_at(self.work_fd, tmp)
                    try:
                        whiteout.mark_opaque(tfd, self.opaque_xattr)
                    finally:
                        os.close(tfd)
                    renameat2(self.work_fd, tmp, pfd, name, RENAME_EXCHANGE)
                    os.unlink(tmp, dir_fd=self.work_fd)
                    self.stats.opaque_dirs_created += 1
                else:
                    os.rename(tmp, name, src_dir_fd=self.work_fd, dst_dir_fd=pfd)
            except BaseException:
                if fd is not None:
                    os.close(fd)
                copyup.remove_tree_at(self.work_fd, tmp)
                raise
        else:
            try:
                with _umask(umask):
                    fd = make(pfd, name)
            except FileExistsError:
                if careful or self._upper_hidden_by(pfd, name) is None:
                    raise
                # A stray whiteout in a directory without lowers: take the careful path.
                return await self._new_entry(
                    parent_ino, name, kind, make, uid, gid, True, linked, mode, umask
                )
            try:
                if not keep_owner:
                    self._set_owner(pfd, name, owner_uid, owner_gid, False)
                if hidden == "oci":
                    if is_dir:
                        tfd = open_dir_at(pfd, name)
                        try:
                            whiteout.mark_opaque(tfd, self.opaque_xattr)
                        finally:
                            os.close(tfd)
                        self.stats.opaque_dirs_created += 1
                    os.unlink(whiteout.OCI_WHITEOUT_PREFIX + name, dir_fd=pfd)
            except BaseException:
                if fd is not None:
                    os.close(fd)
                raise
        self._index_set(parent, name, is_dir, (UPPER,))
        if linked is not None:
            # A new name of an existing inode: the same node (the kernel's link does the
            # same), whatever number a fresh lookup of the name would compute.
            node = linked
            st = os.stat(name, dir_fd=pfd, follow_symlinks=False)
            self._note_alias(node, parent, name)
        else:
            if fd is not None:
                st = os.fstat(fd)
            else:
                st = os.stat(name, dir_fd=pfd, follow_symlinks=False)
            node = self.node_for(parent, name, is_dir, (UPPER,), st)
        if node.is_dir:
            node.index = None
        node = self.table.remember(node)
        return node, st, fd

    def _inherit_acl(self, tmp: bytes, mode: int, default_acl: bytes, is_dir: bool) -> None:
        """Give ``tmp`` in ``work/`` what the upper parent's default ACL gives a new object
        (see :mod:`unionfs.posixacl`)."""
        new_mode, access = posixacl.inherit(default_acl, stat.S_IMODE(mode))
        self._chmod_at(self.work_fd, tmp, new_mode)
        path = whiteout.at_path(self.work_fd, tmp)
        if access is not None:
            os.setxattr(path, posixacl.ACCESS_XATTR, access, follow_symlinks=False)
        if is_dir:
            os.setxattr(path, posixacl.DEFAULT_XATTR, default_acl, follow_symlinks=False)

    @staticmethod
    def _set_owner(dir_fd: int, name: bytes, uid: int, gid: int, keep_sgid: bool) -> None:
        if not keep_sgid and uid == os.geteuid() and gid == os.getegid():
            return  # created by us with exactly that owner: nothing to change
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        if (st.st_uid, st.st_gid) != (uid, gid):
            os.chown(name, uid, gid, dir_fd=dir_fd, follow_symlinks=False)
        if keep_sgid and not st.st_mode & stat.S_ISGID:
            UnionFS._chmod_at(dir_fd, name, stat.S_IMODE(st.st_mode) | stat.S_ISGID)

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
        io_flags = (flags & ~(os.O_APPEND | os.O_TRUNC | os.O_CREAT | os.O_EXCL)) | os.O_CLOEXEC

        def make(dir_fd: int, n: bytes) -> int:
            return os.open(
                n,
                io_flags | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW,
                stat.S_IMODE(mode),
                dir_fd=dir_fd,
            )

        node, st, fd = await self._new_entry(
            parent_ino, name, "file", make, uid, gid, mode=mode, umask=umask
        )
        assert fd is not None
        return self.add_handle(fd, node, UPPER, flags), self._attr(node, st)

    async def mkdir(
        self, parent_ino: int, name: bytes, mode: int, uid: int, gid: int, umask: int = 0
    ) -> Attr:
        def make(dir_fd: int, n: bytes) -> None:
            os.mkdir(n, stat.S_IMODE(mode), dir_fd=dir_fd)

        node, st, _ = await self._new_entry(
            parent_ino, name, "dir", make, uid, gid, mode=mode, umask=umask
        )
        return self._attr(node, st)

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
        if stat.S_ISCHR(mode) and rdev == 0:
            # A char 0/0 device is a whiteout in the upper: like the kernel, never let a
            # user create one through the mount.
            raise _err(errno.EPERM)

        def make(dir_fd: int, n: bytes) -> None:
            os.mknod(n, mode, rdev, dir_fd=dir_fd)

        node, st, _ = await self._new_entry(
            parent_ino, name, "node", make, uid, gid, mode=mode, umask=umask
        )
        return self._attr(node, st)

    async def symlink(
        self, parent_ino: int, name: bytes, target: bytes, uid: int, gid: int
    ) -> Attr:
        def make(dir_fd: int, n: bytes) -> None:
            os.symlink(target, n, dir_fd=dir_fd)

        node, st, _ = await self._new_entry(parent_ino, name, "symlink", make, uid, gid)
        return self._attr(node, st)

    async def link(self, ino: int, new_parent_ino: int, new_name: bytes) -> Attr:
        node = self.node(ino)
        if node.is_dir:
            raise _err(errno.EPERM)
        self._prepare_new(new_parent_ino, new_name)
        await self.copy_up(node)
        assert node.parent is not None
        src_pfd = self.upper_dir_fd(node.parent)
        self._note_alias(node, node.parent, node.name)

        def make(dir_fd: int, n: bytes) -> None:
            os.link(node.name, n, src_dir_fd=src_pfd, dst_dir_fd=dir_fd, follow_symlinks=False)

        st = os.stat(node.name, dir_fd=src_pfd, follow_symlinks=False)
        linked, st, _ = await self._new_entry(
            new_parent_ino, new_name, "link", make, st.st_uid, st.st_gid, linked=node
        )
        new_parent = self.node(new_parent_ino)
        # A link to an object with an origin makes its parent impure (same dir or not).
        self._mark_moved_in(node, node.parent, new_parent, self.upper_dir_fd(new_parent), True)
        return self._attr(linked, st)

    # -- opening and writing ------------------------------------------------------------

    async def open(self, ino: int, flags: int, caller: Caller | None = None) -> int:
        """Open ``ino``; a write access copies it up first (``O_TRUNC``: without its data).

        ``caller`` is who opens, for the set-gid rule of :meth:`write`.
        """
        node = self.node(ino)
        if node.is_dir:
            raise _err(errno.EISDIR)
        wants_write = (flags & os.O_ACCMODE) != os.O_RDONLY or flags & os.O_TRUNC
        if not wants_write:
            return self.open_read(ino, flags)
        self._check_writable()
        truncate = bool(flags & os.O_TRUNC)
        await self.copy_up(node, _TRUNCATE if truncate else None)
        fd = self.open_in_layer(node, UPPER, flags & ~os.O_APPEND)
        if truncate:
            if flags & os.O_ACCMODE == os.O_RDONLY:
                # O_RDONLY|O_TRUNC truncates on Linux (the caller was checked for write
                # permission): through a write descriptor, the handle itself stays read-only.
                wfd = self.open_in_layer(node, UPPER, os.O_WRONLY)
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
                self.file_handles[fh].drop_sgid = True
        return fh

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        handle = self.file_handle(fh)
        if not handle.writable:
            raise _err(errno.EBADF)
        written = os.pwrite(handle.fd, buf, off)
        if handle.drop_sgid:
            # A write by a caller outside the file's group clears set-gid even without group
            # execute (the VFS's file_remove_privs); the kernel's FUSE module only clears
            # set-uid and set-gid with group execute itself, and leaves this case to us.
            handle.drop_sgid = False
            mode = os.fstat(handle.fd).st_mode
            if mode & stat.S_ISGID:
                os.fchmod(handle.fd, stat.S_IMODE(mode) & ~stat.S_ISGID)
                if self.attr_changed is not None:
                    await self.attr_changed(handle.node.ino)
        return written

    def fallocate(self, fh: int, mode: int, offset: int, length: int) -> None:
        """``fallocate(2)`` on an open file, with the mode passed to the upper file system.

        The kernel's FUSE module itself refuses modes other than ``KEEP_SIZE``,
        ``PUNCH_HOLE`` and ``ZERO_RANGE`` (EOPNOTSUPP) before they reach a daemon.
        """
        handle = self.file_handle(fh)
        if not handle.writable:
            raise _err(errno.EBADF)
        fallocate(handle.fd, mode, offset, length)

    async def fsync(self, fh: int, datasync: bool) -> None:
        handle = self.file_handle(fh)
        if not handle.writable or not self.cfg.fsync:
            return
        sync = os.fdatasync if datasync else os.fsync
        await trio.to_thread.run_sync(sync, handle.fd, limiter=self.limiter)

    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        node = self.dir_handle(fh).node
        if self.writable and self.cfg.fsync and node.layers[0] == UPPER:
            fd = self.table.dir_fd(node, UPPER)
            await trio.to_thread.run_sync(os.fsync, fd, limiter=self.limiter)

    # -- metadata -----------------------------------------------------------------------

    async def setattr(
        self,
        ino: int,
        fh: int | None,
        *,
        mode: int | None = None,
        uid: int | None = None,
        gid: int | None = None,
        size: int | None = None,
        atime_ns: int | None = None,
        mtime_ns: int | None = None,
    ) -> Attr:
        node = self.node(ino)
        self._check_writable()
        # Fold the change into the copy-up, except a chown (after which the kernel clears
        # set-id bits the copy would have restored) and a truncate that leaves mtime alone
        # (ftruncate sets it to now; the copy keeps the lower file's).
        if node.layers[0] != UPPER:
            change = None
            if uid is None and gid is None and (size is None or mtime_ns is not None):
                change = Change(mode=mode, atime_ns=atime_ns, mtime_ns=mtime_ns, size=size)
            if await self.copy_up(node, change):
                return self.attr(node)
        own_fd = -1
        if node.parent is None:
            target: bytes | int = self.stack[UPPER].root_fd
            pfd, name = -1, b""
        elif node.pinned >= 0 and not self._named(node):
            # Its name is gone but the kernel still holds it (fchmod, futimens ... on an open
            # file). Only a regular file or a directory is ever reopened: a device or a fifo
            # of a layer is never opened by the daemon.
            if not stat.S_ISREG(os.fstat(node.pinned).st_mode) and not node.is_dir:
                raise _err(errno.ESTALE)
            own_fd = target = os.open(f"/proc/self/fd/{node.pinned}", os.O_RDONLY | os.O_CLOEXEC)
            pfd, name = -1, b""
        else:
            pfd, name = self.upper_dir_fd(node.parent), node.name
            target = name
        try:
            self._set_attrs(node, fh, target, pfd, name, mode, uid, gid, size, atime_ns, mtime_ns)
        finally:
            if own_fd >= 0:
                os.close(own_fd)
        return self.attr(node)

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
        in ``pfd``)."""
        if size is not None:
            handle = self.file_handles.get(fh) if fh is not None else None
            if handle is not None and handle.writable and handle.layer == UPPER:
                os.ftruncate(handle.fd, size)
            else:
                fd = self.open_in_layer(node, UPPER, os.O_WRONLY)
                try:
                    os.ftruncate(fd, size)
                finally:
                    os.close(fd)
        if uid is not None or gid is not None:
            u = -1 if uid is None else uid
            g = -1 if gid is None else gid
            if isinstance(target, int):
                os.fchown(target, u, g)
            else:
                os.chown(name, u, g, dir_fd=pfd, follow_symlinks=False)
        if mode is not None:
            if isinstance(target, int):
                os.fchmod(target, stat.S_IMODE(mode))
            else:
                self._chmod_at(pfd, name, stat.S_IMODE(mode))
        if atime_ns is not None or mtime_ns is not None:
            if atime_ns is None or mtime_ns is None:
                cur = os.fstat(target) if isinstance(target, int) else self.lstat_in(node, UPPER)
                atime_ns = cur.st_atime_ns if atime_ns is None else atime_ns
                mtime_ns = cur.st_mtime_ns if mtime_ns is None else mtime_ns
            if isinstance(target, int):
                os.utime(target, ns=(atime_ns, mtime_ns))
            else:
                os.utime(name, ns=(atime_ns, mtime_ns), dir_fd=pfd, follow_symlinks=False)

    async def setxattr(self, ino: int, name: bytes, value: bytes, flags: int = 0) -> None:
        """Set ``name`` on ``ino`` after a copy-up; a name of the mount's own overlay
        namespace is stored escaped (:func:`whiteout.xattr_layer_name`), as the kernel does.

        ``flags`` (``XATTR_CREATE``/``XATTR_REPLACE``) are applied by the upper filesystem,
        after the copy-up: a refused request still copies up, as in the kernel.
        """
        stored = whiteout.xattr_layer_name(name, self.cfg.userxattr)
        if stored is None:
            raise _err(errno.EPERM)
        name = stored
        node = self.node(ino)
        self._check_writable()
        await self.copy_up(node)
        target = self._xattr_path(node)
        if isinstance(target, int):
            os.setxattr(target, name, value, flags)
        else:
            os.setxattr(target, name, value, flags, follow_symlinks=False)

    async def removexattr(self, ino: int, name: bytes) -> None:
        """Remove ``name`` (escaped like :meth:`setxattr`) from ``ino`` after a copy-up."""
        stored = whiteout.xattr_layer_name(name, self.cfg.userxattr)
        if stored is None:
            raise _err(errno.ENODATA)
        node = self.node(ino)
        self._check_writable()
        if node.layers[0] != UPPER:
            self.getxattr(ino, name)  # ENODATA without a copy-up, as the kernel does
            await self.copy_up(node)
        name = stored
        target = self._xattr_path(node)
        if isinstance(target, int):
            os.removexattr(target, name)
        else:
            os.removexattr(target, name, follow_symlinks=False)

    # -- removing names -----------------------------------------------------------------

    async def _child(self, parent: Node, name: bytes) -> tuple[Node, os.stat_result]:
        found = self.resolve(parent, name)
        if found is None:
            raise _err(errno.ENOENT)
        node = found[0]
        pending = self._copying.get(node.ino)
        if pending is not None:
            await pending.wait()
            found = self.resolve(parent, name)
            if found is None:
                raise _err(errno.ENOENT)
        return found

    async def unlink(self, parent_ino: int, name: bytes) -> None:
        self._check_writable()
        parent = self.node(parent_ino)
        node, st = await self._child(parent, name)
        if node.is_dir:
            raise _err(errno.EISDIR)
        self._remove(parent, name, node, st)

    async def rmdir(self, parent_ino: int, name: bytes) -> None:
        self._check_writable()
        parent = self.node(parent_ino)
        node, st = await self._child(parent, name)
        if not node.is_dir:
            raise _err(errno.ENOTDIR)
        if len(self.index_of(node)) or self._lower_xwhiteouts(node):
            raise _err(errno.ENOTEMPTY)
        self._remove(parent, name, node, st)
        self.table.close_fds(node)

    def _lower_xwhiteouts(self, node: Node) -> bool:
        """Whether a lower layer of ``node`` holds a visible-name xattr whiteout.

        The kernel's emptiness check for rmdir recognises only char 0/0 whiteouts, so a
        directory whose lowers hold xattr whiteouts is "not empty" there even though it
        lists as empty. We follow the kernel (tested in the differential suite).
        """
        seen: set[bytes] = set()
        for layer in node.layers:
            fd = self.table.dir_fd(node, layer)
            xdir = layer != UPPER and whiteout.opaque_value(fd) == whiteout.OPAQUE_XWHITEOUTS
            names = [os.fsencode(n) for n in os.listdir(fd)]
            for bname in names:
                if xdir and bname not in seen:
                    st = os.stat(bname, dir_fd=fd, follow_symlinks=False)
                    if whiteout.is_xattr_whiteout(fd, bname, st):
                        return True
            seen.update(names)
        return False

    def _remove(self, parent: Node, name: bytes, node: Node, st: os.stat_result) -> None:
        """Remove ``name`` from the merged view, leaving a whiteout where a lower has it."""
        self.pin(node)
        if node.layers[0] != UPPER:
            pfd = self.upper_dir_fd(parent)
            self._make_whiteout(pfd, name)
            self.stats.event("whiteout", path=node.path().decode(errors="replace"))
        else:
            pfd = self.table.dir_fd(parent, UPPER)
            needs_whiteout = parent.layers != (UPPER,) and self.lower_positive(parent, name)
            if needs_whiteout and self.oci_whiteouts:
                # A .wh.<name> file cannot replace the name in one rename. Made first, it
                # hides only the lower objects while the upper one still shows; then the
                # upper one goes. No moment shows a lower object.
                self._make_whiteout(pfd, name)
                if node.is_dir:
                    tmp = copyup.temp_name()
                    os.rename(name, tmp, src_dir_fd=pfd, dst_dir_fd=self.work_fd)
                    copyup.remove_tree_at(self.work_fd, tmp)
                else:
                    os.unlink(name, dir_fd=pfd)
            elif node.is_dir:
                # Move the upper directory (maybe holding whiteouts) out of the view first.
                tmp = copyup.temp_name()
                if needs_whiteout:
                    self._make_whiteout(self.work_fd, tmp)
                    renameat2(self.work_fd, tmp, pfd, name, RENAME_EXCHANGE)
                else:
                    os.rename(name, tmp, src_dir_fd=pfd, dst_dir_fd=self.work_fd)
                copyup.remove_tree_at(self.work_fd, tmp)
            elif needs_whiteout:
                tmp = copyup.temp_name()
                self._make_whiteout(self.work_fd, tmp)
                os.rename(tmp, name, src_dir_fd=self.work_fd, dst_dir_fd=pfd)
            else:
                os.unlink(name, dir_fd=pfd)
            if needs_whiteout:
                self.stats.event("whiteout", path=node.path().decode(errors="replace"))
            if node.is_dir or st.st_nlink <= 1:
                node.removed = True
        self._index_discard(parent, name)
        self.drop_alias(node, parent, name, (st.st_dev, st.st_ino))

    # -- rename -------------------------------------------------------------------------

    def _movable(self, node: Node) -> bool:
        """Pure-upper objects can be renamed; lower or merged directories cannot (EXDEV)."""
        return not node.is_dir or node.layers == (UPPER,)

    async def rename(
        self, old_parent_ino: int, old_name: bytes, new_parent_ino: int, new_name: bytes, flags: int
    ) -> None:
        self._check_writable()
        self._check_name(new_name)
        if flags & ~(RENAME_NOREPLACE | RENAME_EXCHANGE):
            raise _err(errno.EINVAL)
        old_parent = self.node(old_parent_ino)
        new_parent = self.node(new_parent_ino)
        src, _ = await self._child(old_parent, old_name)
        dst_found = self.resolve(new_parent, new_name)
        dst = dst_found[0] if dst_found else None
        dst_links = dst_found[1].st_nlink if dst_found else 0
        if dst is not None and dst is src:
            return  # two names of one object: rename(2) does nothing
        if flags & RENAME_EXCHANGE:
            if dst is None:
                raise _err(errno.ENOENT)
            await self._exchange(old_parent, old_name, src, new_parent, new_name, dst)
            return
        if dst is not None:
            if flags & RENAME_NOREPLACE:
                raise _err(errno.EEXIST)
            if src.is_dir and not dst.is_dir:
                raise _err(errno.ENOTDIR)
            if dst.is_dir and not src.is_dir:
                raise _err(errno.EISDIR)
        # The kernel refuses to move a lower or merged directory before it looks inside the
        # destination: EXDEV wins over ENOTEMPTY.
        if not self._movable(src):
            raise _err(errno.EXDEV)
        if (
            dst is not None
            and dst.is_dir
            and (len(self.index_of(dst)) or self._lower_xwhiteouts(dst))
        ):
            if src.is_dir and dst.layers == (UPPER,) and new_parent.layers != (UPPER,):
                # The kernel checks a pure-upper destination only in rename(2) itself, after
                # it has marked the moved directory opaque; the mark stays. So here too.
                self._make_opaque(src)
            raise _err(errno.ENOTEMPTY)
        # An empty merged or lower destination directory is simply replaced: the moved
        # directory is made opaque below, so nothing of the old one shows through.
        await self.copy_up(src)
        if dst is not None:
            self.pin(dst)
        old_pfd = self.upper_dir_fd(old_parent)
        new_pfd = self.upper_dir_fd(new_parent)
        old_positive = old_parent.layers != (UPPER,) and self.lower_positive(old_parent, old_name)
        new_hidden = self._upper_hidden_by(new_pfd, new_name) if dst is None else None
        if dst is not None and dst.layers[0] != UPPER:
            new_hidden = None  # the destination lives only below: nothing in the upper yet
        if src.is_dir and new_parent.layers != (UPPER,):
            # Like the kernel: a directory moved into a merged parent is made opaque, so no
            # lower directory of the new name can ever merge into it.
            self._make_opaque(src)
        # A .wh.<name> marker at the destination goes once the object is in place there.
        drop_marker = new_hidden == "oci"
        if drop_marker:
            new_hidden = None
        if old_positive:
            if new_hidden == "whiteout":
                renameat2(old_pfd, old_name, new_pfd, new_name, RENAME_EXCHANGE)
            else:
                self._rename_whiteout(old_pfd, old_name, new_pfd, new_name, dst)
            self.stats.whiteouts_created += 1
        elif new_hidden == "whiteout" and src.is_dir:
            renameat2(old_pfd, old_name, new_pfd, new_name, RENAME_EXCHANGE)
            os.unlink(old_name, dir_fd=old_pfd)
        else:
            self._replace(old_pfd, old_name, new_pfd, new_name, dst)
        if drop_marker:
            os.unlink(whiteout.OCI_WHITEOUT_PREFIX + new_name, dir_fd=new_pfd)
        self._mark_moved_in(src, old_parent, new_parent, new_pfd)
        if dst is not None:
            # Only an object whose last name went away can have its number reused.
            dst.removed = dst.layers[0] == UPPER and (dst.is_dir or dst_links <= 1)
            if dst.is_dir:
                self.table.close_fds(dst)
        self._index_discard(old_parent, old_name)
        self._index_set(new_parent, new_name, src.is_dir, (UPPER,))
        if dst is not None and dst_found is not None:
            dst_st = dst_found[1]
            self.drop_alias(dst, new_parent, new_name, (dst_st.st_dev, dst_st.st_ino))
        self.move_alias(src, old_parent, old_name, new_parent, new_name)

    def _mark_moved_in(
        self, moved: Node, source: Node, into: Node, pfd: int, linked: bool = False
    ) -> None:
        """After ``moved`` went (or was ``linked``) from ``source`` into ``into`` (upper dir
        ``pfd``): an object with a valid origin makes its new parent impure, as in the
        kernel (``ovl_type_origin``: an origin the lookup accepted, not any xattr)."""
        if (linked or source is not into) and self.has_origin(moved):
            self._mark_impure(into, pfd)

    def _make_opaque(self, node: Node) -> None:
        """Mark ``node``'s upper directory opaque, unless it already is."""
        fd = self.table.dir_fd(node, UPPER)
        if whiteout.opaque_value(fd) != whiteout.OPAQUE_YES:
            whiteout.mark_opaque(fd, self.opaque_xattr)

    def _replace(
        self, old_pfd: int, old_name: bytes, new_pfd: int, new_name: bytes, dst: Node | None
    ) -> None:
        """Plain rename, first clearing an upper destination directory of its whiteouts."""
        if dst is not None and dst.is_dir and dst.layers[0] == UPPER:
            tmp = copyup.temp_name()
            os.rename(new_name, tmp, src_dir_fd=new_pfd, dst_dir_fd=self.work_fd)
            try:
                os.rename(old_name, new_name, src_dir_fd=old_pfd, dst_dir_fd=new_pfd)
            except BaseException:
                os.rename(tmp, new_name, src_dir_fd=self.work_fd, dst_dir_fd=new_pfd)
                raise
            copyup.remove_tree_at(self.work_fd, tmp)
            return
        os.rename(old_name, new_name, src_dir_fd=old_pfd, dst_dir_fd=new_pfd)

    def _rename_whiteout(
        self, old_pfd: int, old_name: bytes, new_pfd: int, new_name: bytes, dst: Node | None
    ) -> None:
        """Rename and leave a whiteout at the old name in one step where the fs allows.

        The caller counts the whiteout.
        """
        if self.oci_whiteouts:
            # .wh.<name> first: it hides only the lower objects while the upper one still
            # shows, so no moment shows a lower object at the old name.
            whiteout.make_whiteout(old_pfd, old_name, oci_fallback=True)
            self._replace(old_pfd, old_name, new_pfd, new_name, dst)
            return
        if dst is not None and dst.is_dir and dst.layers[0] == UPPER:
            self._replace(old_pfd, old_name, new_pfd, new_name, dst)
            whiteout.make_whiteout(old_pfd, old_name)
            return
        try:
            renameat2(old_pfd, old_name, new_pfd, new_name, RENAME_WHITEOUT)
            return
        except OSError as exc:
            if exc.errno not in (errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP):
                raise
        os.rename(old_name, new_name, src_dir_fd=old_pfd, dst_dir_fd=new_pfd)
        whiteout.make_whiteout(old_pfd, old_name)

    async def _exchange(
        self,
        old_parent: Node,
        old_name: bytes,
        src: Node,
        new_parent: Node,
        new_name: bytes,
        dst: Node,
    ) -> None:
        if not self._movable(src) or not self._movable(dst):
            raise _err(errno.EXDEV)
        await self.copy_up(src)
        await self.copy_up(dst)
        old_pfd = self.upper_dir_fd(old_parent)
        new_pfd = self.upper_dir_fd(new_parent)
        for node, into in ((src, new_parent), (dst, old_parent)):
            if node.is_dir and into.layers != (UPPER,):
                self._make_opaque(node)
        renameat2(old_pfd, old_name, new_pfd, new_name, RENAME_EXCHANGE)
        self._mark_moved_in(src, old_parent, new_parent, new_pfd)
        self._mark_moved_in(dst, new_parent, old_parent, old_pfd)
        self._index_set(old_parent, old_name, dst.is_dir, (UPPER,))
        self._index_set(new_parent, new_name, src.is_dir, (UPPER,))
        self.move_alias(src, old_parent, old_name, new_parent, new_name)
        self.move_alias(dst, new_parent, new_name, old_parent, old_name)

    # -- inspection ---------------------------------------------------------------------

    def inspect(self, ino: int, child: bytes | None = None) -> dict[str, Any]:
        """Where an object comes from: serving layer, copy-up origin, shadowed copies below,
        and whiteouts or opaque directories hiding lower entries at its path.

        With ``child``, describes the name ``child`` inside directory ``ino`` -- which also
        works for names that are whited out and for symlinks and devices (which cannot carry
        the ``user.*`` xattr this answer travels in).
        """
        node = self.node(ino)
        if child is None:
            if node.parent is None:
                return self._describe_root(node)
            parent, name = node.parent, node.name
        else:
            parent, name = node, child
        layers = self.stack.layers
        found = self.resolve(parent, name)
        base = parent.path().rstrip(b"/") + b"/" + name
        info: dict[str, Any] = {
            "path": base.decode(errors="replace"),
            "exists": found is not None,
            "layer": None,
            "type": None,
            "copied_up": False,
            "origin_layer": None,
            "merged_layers": [],
            "shadows": [],
            "hidden_by": [],
            "opaque": False,
        }
        top = -1
        if found is not None:
            obj, st = found
            top = obj.layer
            info["inode"] = obj.ino
            info["type"] = _type_name(st.st_mode)
            info["layer"] = _layer_info(layers[top])
            if obj.is_dir:
                info["merged_layers"] = [_layer_info(layers[i]) for i in obj.layers]
        for layer in parent.layers:
            if layer == top or (found is not None and found[0].is_dir and layer in found[0].layers):
                continue
            fd = self.table.dir_fd(parent, layer)
            hider = self._hider_at(fd, name)
            if hider is not None:
                info["hidden_by"].append({**_layer_info(layers[layer]), "marker": hider})
                if layer > top or found is None:
                    break
                continue
            try:
                os.stat(name, dir_fd=fd, follow_symlinks=False)
            except FileNotFoundError:
                continue
            if layer > top:
                info["shadows"].append(_layer_info(layers[layer]))
        if found is not None and top == UPPER and self.stack.has_upper:
            pfd = self.table.dir_fd(parent, UPPER)
            if self.read_origin(pfd, name) is not None:
                info["copied_up"] = True
                if info["shadows"]:
                    info["origin_layer"] = info["shadows"][0]
            if found[0].is_dir:
                info["opaque"] = self._is_opaque_dir(self.table.dir_fd(found[0], UPPER))
        elif found is not None and found[0].is_dir:
            info["opaque"] = self._is_opaque_dir(self.table.dir_fd(found[0], top))
        return info

    def _hider_at(self, fd: int, name: bytes) -> str | None:
        kind = classify_at(fd, name, detail=True)
        return kind if kind is not None and kind.startswith("whiteout") else None

    def _describe_root(self, node: Node) -> dict[str, Any]:
        layers = self.stack.layers
        return {
            "path": "/",
            "exists": True,
            "inode": node.ino,
            "type": "directory",
            "layer": _layer_info(layers[node.layer]),
            "merged_layers": [_layer_info(layers[i]) for i in node.layers],
            "copied_up": False,
            "origin_layer": None,
            "shadows": [],
            "hidden_by": [],
            "opaque": False,
        }

    def layer_table(self) -> list[dict[str, Any]]:
        return [
            {"index": layer.index, "dir": layer.path, "upper": layer.is_upper}
            for layer in self.stack.layers
        ]

    def attr_of(self, node: Node, st: os.stat_result) -> Attr:
        return self._attr(node, st)


def _layer_info(layer: Any) -> dict[str, Any]:
    return {"index": layer.index, "dir": layer.path, "upper": layer.is_upper}


def _type_name(mode: int) -> str:
    for test, name in (
        (stat.S_ISDIR, "directory"),
        (stat.S_ISREG, "file"),
        (stat.S_ISLNK, "symlink"),
        (stat.S_ISFIFO, "fifo"),
        (stat.S_ISSOCK, "socket"),
        (stat.S_ISCHR, "char device"),
        (stat.S_ISBLK, "block device"),
    ):
        if test(mode):
            return name
    return "unknown"
