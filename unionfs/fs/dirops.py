"""Directory operations (the kernel's dir.c part): create, mkdir, mknod, symlink, link,
unlink, rmdir and rename, with whiteouts and opaque directories.

Every change lands in the upper layer, in the kernel overlayfs format (:mod:`unionfs.format`);
lowers are never written. Where the kernel makes a change atomic by building it in ``work/``
and renaming it into place, so does this module:

* a new name over a whiteout: built in ``work/``, renamed over the whiteout (a directory is
  exchanged with it and made opaque);
* removing an upper name that also exists below: a whiteout renamed over it
  (``RENAME_WHITEOUT``-style, so no moment shows the lower object);
* removing an upper directory: moved into ``work/`` first, then deleted with its whiteouts.

Where the upper refuses ``mknod``, whiteouts are ``.wh.<name>`` files, which cannot replace
a name in one rename: such a marker is made next to the upper object first (it hides only the
lower objects), then the upper object goes, so no moment shows a lower object.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Callable, Iterator

from unionfs import fdops, format, posixacl
from unionfs.fdops import (
    RENAME_EXCHANGE,
    RENAME_NOREPLACE,
    RENAME_WHITEOUT,
    chmod_at,
    open_dir_at,
    renameat2,
)
from unionfs.fs import lookup
from unionfs.fs.copy_up import CopyUp
from unionfs.fs.listing import index_discard, index_of, index_set, is_empty
from unionfs.fs.nodes import UPPER, Node
from unionfs.fs.state import State, err
from unionfs.fs.workdir import temp_name

# make(dir_fd, name) creates the new object there; returns its descriptor if it opened one.
Make = Callable[[int, bytes], int | None]


@contextlib.contextmanager
def _umask(mask: int) -> Iterator[None]:
    """The process umask set to ``mask`` for one creating system call, then put back (the
    daemon's own is 0; requests are served one at a time on the trio thread). Put back, not
    reset to 0: a process that drives the filesystem in-process keeps its own umask."""
    previous = os.umask(mask)
    try:
        yield
    finally:
        os.umask(previous)


class DirOps:
    """The operations that add or remove names, over the upper layer."""

    def __init__(self, s: State, copier: CopyUp) -> None:
        self.s = s
        self.copier = copier
        self.wd = copier.wd
        # The daemon's own ids never change: asked once, not on every create.
        self._own_ids = (os.geteuid(), os.getegid())

    # -- helpers ------------------------------------------------------------------------

    @staticmethod
    def check_name(name: bytes) -> None:
        """EINVAL for a ``.wh.`` name (it would act as a whiteout in the upper);
        ENAMETOOLONG beyond 255 bytes."""
        if format.is_marker_name(name):
            raise err(errno.EINVAL)
        if len(name) > 255:
            raise err(errno.ENAMETOOLONG)

    async def existing(self, parent: Node, name: bytes) -> tuple[Node, os.stat_result]:
        """The object at ``name`` (ENOENT if none), once any copy-up of it has finished."""
        found = lookup.child(self.s, parent, name)
        if await self.copier.wait(found[0]):
            found = lookup.child(self.s, parent, name)
        return found

    def make_whiteout(self, pfd: int, name: bytes) -> None:
        """Whiteout ``name`` in the upper directory ``pfd`` (counted)."""
        format.make_whiteout(pfd, name, oci_fallback=self.wd.oci_whiteouts)
        self.s.stats.whiteouts_created += 1

    def make_opaque(self, node: Node) -> None:
        """Mark ``node``'s upper directory opaque, unless it already is."""
        fd = self.s.table.dir_fd(node, UPPER)
        if format.opaque_value(fd) != format.OPAQUE_YES:
            format.mark_opaque(fd, self.s.names.opaque)

    @staticmethod
    def _owner(pfd: int, uid: int, gid: int) -> tuple[int, int, bool]:
        """Owner of a new object in upper dir ``pfd``; the bool says "set-gid directory"."""
        pst = os.fstat(pfd)
        if pst.st_mode & stat.S_ISGID:
            return uid, pst.st_gid, True
        return uid, gid, False

    def _set_owner(self, dir_fd: int, name: bytes, uid: int, gid: int, keep_sgid: bool) -> None:
        if not keep_sgid and (uid, gid) == self._own_ids:
            return  # created by us with exactly that owner: nothing to change
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        if (st.st_uid, st.st_gid) != (uid, gid):
            os.chown(name, uid, gid, dir_fd=dir_fd, follow_symlinks=False)
        if keep_sgid and not st.st_mode & stat.S_ISGID:
            chmod_at(dir_fd, name, stat.S_IMODE(st.st_mode) | stat.S_ISGID)

    # -- creating names -----------------------------------------------------------------

    def prepare_new(self, parent_ino: int, name: bytes) -> Node:
        """The parent for a new ``name``: EROFS, EINVAL/ENAMETOOLONG (the name), ENOTDIR,
        EEXIST (the name is in the merged view)."""
        self.s.check_writable()
        self.check_name(name)
        parent = self.s.node(parent_ino)
        if not parent.is_dir:
            raise err(errno.ENOTDIR)
        if index_of(self.s, parent).get(name) is not None:
            raise err(errno.EEXIST)
        return parent

    async def new_entry(
        self,
        parent_ino: int,
        name: bytes,
        is_dir: bool,
        make: Make,
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
        s, wd = self.s, self.wd
        parent = self.prepare_new(parent_ino, name)
        pfd = self.copier.upper_dir_fd(parent)
        s.touch(parent)
        # A directory with no lower layers holds no whiteouts (none is ever needed there),
        # so the probe is skipped; a stray one still surfaces as EEXIST and is handled.
        careful = probe or parent.layers != (UPPER,)
        hidden = format.upper_hider(pfd, name) if careful else None
        owner_uid, owner_gid, sgid_dir = self._owner(pfd, uid, gid)
        keep_owner = linked is not None  # a new name for an existing inode keeps its owner
        fd: int | None = None
        if hidden is format.Found.CHARDEV_WHITEOUT:
            tmp = temp_name()
            default_acl = None
            if mode is not None:
                default_acl = fdops.fd_getxattr(pfd, posixacl.DEFAULT_XATTR)
            with _umask(0 if default_acl else umask):
                fd = make(wd.work_fd, tmp)
            try:
                if default_acl is not None and mode is not None:
                    self._inherit_acl(tmp, mode, default_acl, is_dir)
                if not keep_owner:
                    self._set_owner(wd.work_fd, tmp, owner_uid, owner_gid, is_dir and sgid_dir)
                if is_dir:
                    tfd = open_dir_at(wd.work_fd, tmp)
                    try:
                        format.mark_opaque(tfd, s.names.opaque)
                    finally:
                        os.close(tfd)
                    renameat2(wd.work_fd, tmp, pfd, name, RENAME_EXCHANGE)
                    os.unlink(tmp, dir_fd=wd.work_fd)
                    s.stats.opaque_dirs_created += 1
                else:
                    os.rename(tmp, name, src_dir_fd=wd.work_fd, dst_dir_fd=pfd)
            except BaseException:
                if fd is not None:
                    os.close(fd)
                wd.remove(tmp)
                raise
        else:
            try:
                with _umask(umask):
                    fd = make(pfd, name)
            except FileExistsError:
                if careful or format.upper_hider(pfd, name) is None:
                    raise
                # A stray whiteout in a directory without lowers: take the careful path.
                return await self.new_entry(
                    parent_ino, name, is_dir, make, uid, gid, True, linked, mode, umask
                )
            try:
                if not keep_owner:
                    self._set_owner(pfd, name, owner_uid, owner_gid, False)
                if hidden is format.Found.OCI_WHITEOUT:
                    if is_dir:
                        tfd = open_dir_at(pfd, name)
                        try:
                            format.mark_opaque(tfd, s.names.opaque)
                        finally:
                            os.close(tfd)
                        s.stats.opaque_dirs_created += 1
                    os.unlink(format.OCI_WHITEOUT_PREFIX + name, dir_fd=pfd)
            except BaseException:
                if fd is not None:
                    os.close(fd)
                raise
        index_set(parent, name, is_dir, (UPPER,))
        if linked is not None:
            # A new name of an existing inode: the same node (the kernel's link does the
            # same), whatever number a fresh lookup of the name would compute.
            node = linked
            st = os.stat(name, dir_fd=pfd, follow_symlinks=False)
            s.table.note_alias(node, parent, name)
        else:
            if fd is not None:
                st = os.fstat(fd)
            else:
                st = os.stat(name, dir_fd=pfd, follow_symlinks=False)
            node = s.table.node_for(parent, name, is_dir, (UPPER,), st)
        if node.is_dir:
            node.index = None
        node = s.table.remember(node)
        return node, st, fd

    def _inherit_acl(self, tmp: bytes, mode: int, default_acl: bytes, is_dir: bool) -> None:
        """Give ``tmp`` in ``work/`` what the upper parent's default ACL gives a new object
        (see :mod:`unionfs.posixacl`)."""
        work_fd = self.wd.work_fd
        new_mode, access = posixacl.inherit(default_acl, stat.S_IMODE(mode))
        chmod_at(work_fd, tmp, new_mode)
        path = fdops.at_path(work_fd, tmp)
        if access is not None:
            os.setxattr(path, posixacl.ACCESS_XATTR, access, follow_symlinks=False)
        if is_dir:
            os.setxattr(path, posixacl.DEFAULT_XATTR, default_acl, follow_symlinks=False)

    async def link(self, node: Node, new_parent_ino: int, new_name: bytes) -> os.stat_result:
        """A new name for ``node`` (copied up first); EPERM for a directory."""
        if node.is_dir:
            raise err(errno.EPERM)
        self.prepare_new(new_parent_ino, new_name)
        await self.copier.copy_up(node)
        assert node.parent is not None
        src_pfd = self.copier.upper_dir_fd(node.parent)
        self.s.table.note_alias(node, node.parent, node.name)

        def make(dir_fd: int, n: bytes) -> None:
            os.link(node.name, n, src_dir_fd=src_pfd, dst_dir_fd=dir_fd, follow_symlinks=False)

        st = os.stat(node.name, dir_fd=src_pfd, follow_symlinks=False)
        _, st, _ = await self.new_entry(
            new_parent_ino, new_name, False, make, st.st_uid, st.st_gid, linked=node
        )
        new_parent = self.s.node(new_parent_ino)
        # A link to an object with an origin makes its parent impure (same dir or not).
        new_pfd = self.copier.upper_dir_fd(new_parent)
        self.mark_moved_in(node, node.parent, new_parent, new_pfd, True)
        return st

    # -- removing names -----------------------------------------------------------------

    async def unlink(self, parent_ino: int, name: bytes) -> None:
        """Remove a non-directory: EROFS, ENOENT, EISDIR; a whiteout where a lower has it."""
        self.s.check_writable()
        parent = self.s.node(parent_ino)
        node, st = await self.existing(parent, name)
        if node.is_dir:
            raise err(errno.EISDIR)
        self.remove(parent, name, node, st)

    async def rmdir(self, parent_ino: int, name: bytes) -> None:
        """Remove an empty directory: EROFS, ENOENT, ENOTDIR, ENOTEMPTY (the kernel's rule,
        :func:`~unionfs.fs.listing.is_empty`)."""
        s = self.s
        s.check_writable()
        parent = s.node(parent_ino)
        node, st = await self.existing(parent, name)
        if not node.is_dir:
            raise err(errno.ENOTDIR)
        if not is_empty(s, node):
            raise err(errno.ENOTEMPTY)
        self.remove(parent, name, node, st)
        s.table.close_fds(node)

    def remove(self, parent: Node, name: bytes, node: Node, st: os.stat_result) -> None:
        """Remove ``name`` from the merged view, leaving a whiteout where a lower has it."""
        s, wd = self.s, self.wd
        s.touch(parent)
        s.table.pin(node)
        if node.layers[0] != UPPER:
            pfd = self.copier.upper_dir_fd(parent)
            self.make_whiteout(pfd, name)
            s.stats.event("whiteout", path=node.path().decode(errors="replace"))
        else:
            pfd = s.table.dir_fd(parent, UPPER)
            needs_whiteout = parent.layers != (UPPER,) and lookup.lower_positive(s, parent, name)
            if needs_whiteout and wd.oci_whiteouts:
                # A .wh.<name> file cannot replace the name in one rename. Made first, it
                # hides only the lower objects while the upper one still shows; then the
                # upper one goes. No moment shows a lower object.
                self.make_whiteout(pfd, name)
                if node.is_dir:
                    tmp = temp_name()
                    os.rename(name, tmp, src_dir_fd=pfd, dst_dir_fd=wd.work_fd)
                    wd.remove(tmp)
                else:
                    os.unlink(name, dir_fd=pfd)
            elif node.is_dir:
                # Move the upper directory (maybe holding whiteouts) out of the view first.
                tmp = temp_name()
                if needs_whiteout:
                    self.make_whiteout(wd.work_fd, tmp)
                    renameat2(wd.work_fd, tmp, pfd, name, RENAME_EXCHANGE)
                else:
                    os.rename(name, tmp, src_dir_fd=pfd, dst_dir_fd=wd.work_fd)
                wd.remove(tmp)
            elif needs_whiteout:
                tmp = temp_name()
                self.make_whiteout(wd.work_fd, tmp)
                os.rename(tmp, name, src_dir_fd=wd.work_fd, dst_dir_fd=pfd)
            else:
                os.unlink(name, dir_fd=pfd)
            if needs_whiteout:
                s.stats.event("whiteout", path=node.path().decode(errors="replace"))
            s.origins.forget(st)
            if node.is_dir or st.st_nlink <= 1:
                node.removed = True
        index_discard(parent, name)
        s.table.drop_alias(node, parent, name, (st.st_dev, st.st_ino))

    # -- rename -------------------------------------------------------------------------

    @staticmethod
    def _movable(node: Node) -> bool:
        """Pure-upper objects can be renamed; lower or merged directories cannot (EXDEV)."""
        return not node.is_dir or node.layers == (UPPER,)

    async def rename(
        self, old_parent_ino: int, old_name: bytes, new_parent_ino: int, new_name: bytes, flags: int
    ) -> None:
        """rename(2) with ``RENAME_NOREPLACE``/``RENAME_EXCHANGE`` (other flags: EINVAL).

        EROFS, ENOENT, EEXIST, ENOTDIR, EISDIR, ENOTEMPTY as rename(2); EXDEV for a lower or
        merged directory (checked before the destination's emptiness, as the kernel does).
        The source is copied up first; a whiteout is left where a lower has the old name.
        """
        s = self.s
        s.check_writable()
        self.check_name(new_name)
        if flags & ~(RENAME_NOREPLACE | RENAME_EXCHANGE):
            raise err(errno.EINVAL)
        old_parent = s.node(old_parent_ino)
        new_parent = s.node(new_parent_ino)
        src, _ = await self.existing(old_parent, old_name)
        dst_found = lookup.resolve(s, new_parent, new_name)
        dst = dst_found[0] if dst_found else None
        dst_links = dst_found[1].st_nlink if dst_found else 0
        if dst is not None and dst is src:
            return  # two names of one object: rename(2) does nothing
        if flags & RENAME_EXCHANGE:
            if dst is None:
                raise err(errno.ENOENT)
            await self._exchange(old_parent, old_name, src, new_parent, new_name, dst)
            return
        if dst is not None:
            if flags & RENAME_NOREPLACE:
                raise err(errno.EEXIST)
            if src.is_dir and not dst.is_dir:
                raise err(errno.ENOTDIR)
            if dst.is_dir and not src.is_dir:
                raise err(errno.EISDIR)
        # The kernel refuses to move a lower or merged directory before it looks inside the
        # destination: EXDEV wins over ENOTEMPTY.
        if not self._movable(src):
            raise err(errno.EXDEV)
        if dst is not None and dst.is_dir and not is_empty(s, dst):
            if src.is_dir and dst.layers == (UPPER,) and new_parent.layers != (UPPER,):
                # The kernel checks a pure-upper destination only in rename(2) itself, after
                # it has marked the moved directory opaque; the mark stays. So here too.
                self.make_opaque(src)
            raise err(errno.ENOTEMPTY)
        # An empty merged or lower destination directory is simply replaced: the moved
        # directory is made opaque below, so nothing of the old one shows through.
        await self.copier.copy_up(src)
        s.touch(old_parent, new_parent)
        if dst is not None:
            s.table.pin(dst)
        old_pfd = self.copier.upper_dir_fd(old_parent)
        new_pfd = self.copier.upper_dir_fd(new_parent)
        old_positive = old_parent.layers != (UPPER,) and lookup.lower_positive(
            s, old_parent, old_name
        )
        new_hidden = format.upper_hider(new_pfd, new_name) if dst is None else None
        if dst is not None and dst.layers[0] != UPPER:
            new_hidden = None  # the destination lives only below: nothing in the upper yet
        if src.is_dir and new_parent.layers != (UPPER,):
            # Like the kernel: a directory moved into a merged parent is made opaque, so no
            # lower directory of the new name can ever merge into it.
            self.make_opaque(src)
        # A .wh.<name> marker at the destination goes once the object is in place there.
        drop_marker = new_hidden is format.Found.OCI_WHITEOUT
        if drop_marker:
            new_hidden = None
        if old_positive:
            if new_hidden is format.Found.CHARDEV_WHITEOUT:
                renameat2(old_pfd, old_name, new_pfd, new_name, RENAME_EXCHANGE)
            else:
                self._rename_whiteout(old_pfd, old_name, new_pfd, new_name, dst)
            s.stats.whiteouts_created += 1
        elif new_hidden is format.Found.CHARDEV_WHITEOUT and src.is_dir:
            renameat2(old_pfd, old_name, new_pfd, new_name, RENAME_EXCHANGE)
            os.unlink(old_name, dir_fd=old_pfd)
        else:
            self._replace(old_pfd, old_name, new_pfd, new_name, dst)
        if drop_marker:
            os.unlink(format.OCI_WHITEOUT_PREFIX + new_name, dir_fd=new_pfd)
        self.mark_moved_in(src, old_parent, new_parent, new_pfd)
        if dst is not None:
            # Only an object whose last name went away can have its number reused.
            dst.removed = dst.layers[0] == UPPER and (dst.is_dir or dst_links <= 1)
            if dst.is_dir:
                s.table.close_fds(dst)
        index_discard(old_parent, old_name)
        index_set(new_parent, new_name, src.is_dir, (UPPER,))
        if dst is not None and dst_found is not None:
            dst_st = dst_found[1]
            if dst.layers[0] == UPPER:
                s.origins.forget(dst_st)
            s.table.drop_alias(dst, new_parent, new_name, (dst_st.st_dev, dst_st.st_ino))
        s.table.move_alias(src, old_parent, old_name, new_parent, new_name)

    def mark_moved_in(
        self, moved: Node, source: Node, into: Node, pfd: int, linked: bool = False
    ) -> None:
        """After ``moved`` went (or was ``linked``) from ``source`` into ``into`` (upper dir
        ``pfd``): an object with a valid origin makes its new parent impure, as in the
        kernel (``ovl_type_origin``: an origin the lookup accepted, not any xattr)."""
        if (linked or source is not into) and self.s.table.has_origin(moved):
            self.copier.mark_impure(into, pfd)

    def _replace(
        self, old_pfd: int, old_name: bytes, new_pfd: int, new_name: bytes, dst: Node | None
    ) -> None:
        """Plain rename, first clearing an upper destination directory of its whiteouts."""
        wd = self.wd
        if dst is not None and dst.is_dir and dst.layers[0] == UPPER:
            tmp = temp_name()
            os.rename(new_name, tmp, src_dir_fd=new_pfd, dst_dir_fd=wd.work_fd)
            try:
                os.rename(old_name, new_name, src_dir_fd=old_pfd, dst_dir_fd=new_pfd)
            except BaseException:
                os.rename(tmp, new_name, src_dir_fd=wd.work_fd, dst_dir_fd=new_pfd)
                raise
            wd.remove(tmp)
            return
        os.rename(old_name, new_name, src_dir_fd=old_pfd, dst_dir_fd=new_pfd)

    def _rename_whiteout(
        self, old_pfd: int, old_name: bytes, new_pfd: int, new_name: bytes, dst: Node | None
    ) -> None:
        """Rename and leave a whiteout at the old name in one step where the fs allows.

        The caller counts the whiteout.
        """
        if self.wd.oci_whiteouts:
            # .wh.<name> first: it hides only the lower objects while the upper one still
            # shows, so no moment shows a lower object at the old name.
            format.make_whiteout(old_pfd, old_name, oci_fallback=True)
            self._replace(old_pfd, old_name, new_pfd, new_name, dst)
            return
        if dst is not None and dst.is_dir and dst.layers[0] == UPPER:
            self._replace(old_pfd, old_name, new_pfd, new_name, dst)
            format.make_whiteout(old_pfd, old_name)
            return
        try:
            renameat2(old_pfd, old_name, new_pfd, new_name, RENAME_WHITEOUT)
            return
        except OSError as exc:
            if exc.errno not in (errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP):
                raise
        os.rename(old_name, new_name, src_dir_fd=old_pfd, dst_dir_fd=new_pfd)
        format.make_whiteout(old_pfd, old_name)

    async def _exchange(
        self,
        old_parent: Node,
        old_name: bytes,
        src: Node,
        new_parent: Node,
        new_name: bytes,
        dst: Node,
    ) -> None:
        s = self.s
        if not self._movable(src) or not self._movable(dst):
            raise err(errno.EXDEV)
        await self.copier.copy_up(src)
        await self.copier.copy_up(dst)
        s.touch(old_parent, new_parent)
        old_pfd = self.copier.upper_dir_fd(old_parent)
        new_pfd = self.copier.upper_dir_fd(new_parent)
        for node, into in ((src, new_parent), (dst, old_parent)):
            if node.is_dir and into.layers != (UPPER,):
                self.make_opaque(node)
        renameat2(old_pfd, old_name, new_pfd, new_name, RENAME_EXCHANGE)
        self.mark_moved_in(src, old_parent, new_parent, new_pfd)
        self.mark_moved_in(dst, new_parent, old_parent, old_pfd)
        index_set(old_parent, old_name, dst.is_dir, (UPPER,))
        index_set(new_parent, new_name, src.is_dir, (UPPER,))
        s.table.move_alias(src, old_parent, old_name, new_parent, new_name)
        s.table.move_alias(dst, new_parent, new_name, old_parent, old_name)
