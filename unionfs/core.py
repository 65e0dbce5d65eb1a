"""The union filesystem core: name resolution, attributes and reading, over directory fds.

This module knows nothing about FUSE. Every method takes and returns plain Python values and
raises :class:`OSError` with an errno; :mod:`unionfs.fuse_ops` translates. The write path
(:mod:`unionfs.writes`) extends :class:`UnionCore`.

Resolution rule (Linux overlayfs): a name is looked up top-down through the layers in which
its parent is a merged directory; the first layer that has it wins; a whiteout ends the
search; a non-directory hides everything below it; directories merge down to the first
opaque one. All of it is answered from the parent's :class:`~unionfs.dirindex.DirIndex`.

Every layer object is reached as ``name`` relative to a directory descriptor of its parent in
that layer, with no-follow semantics, so nothing inside a layer can point the daemon at a
file outside the layer roots.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import struct
from dataclasses import dataclass

from unionfs import parallel, whiteout
from unionfs.config import MountConfig
from unionfs.dirindex import DirIndex, Listing, build_index, check_opaque
from unionfs.inodes import ROOT_INO, Node, NodeTable
from unionfs.layers import INO_BITS, LayerStack, open_dir_at
from unionfs.stats import Stats

log = logging.getLogger(__name__)

UPPER = 0
_ORIGIN_CACHE_MAX = 1 << 16


# A directory chain cut at its first opaque layer, the directories opened to check it and
# the lower listings read on the way (see UnionCore._truncate_at_opaque).
Chain = tuple[tuple[int, ...], dict[int, int], dict[int, Listing]]


def _err(code: int) -> OSError:
    return OSError(code, os.strerror(code))


@dataclass
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
        # UnionFS.open): a case the kernel's FUSE module leaves to the file system.
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


class UnionCore:
    """Read side of the merged view. Owns the layer stack and the inode table."""

    def __init__(self, cfg: MountConfig) -> None:
        self.cfg = cfg
        self.stack = LayerStack(cfg.lowers, cfg.upper)
        # Room for two directories' descriptors in every layer, so building one index
        # never evicts a descriptor it is about to read.
        self.table = NodeTable(self.stack, max(4096, 2 * len(self.stack) + 64))
        self.stats = Stats(len(self.stack))
        self.writable = cfg.writable
        self.origin_xattr = whiteout.ORIGIN_XATTRS[1 if cfg.userxattr else 0]
        self.old_origin_xattr = whiteout.OLD_ORIGIN_XATTRS[1 if cfg.userxattr else 0]
        # Lower filesystems origin handles are decoded on: (st_dev, root fd, layer roots), by
        # uuid; built on first use. False once open_by_handle_at was refused (no privilege).
        self._origin_fs: dict[bytes, list[tuple[int, int, list[bytes]]]] | None = None
        self._origin_decode = True
        # Decoded origins by (st_dev, st_ino, st_ctime_ns) of the upper object: a cold lookup
        # of a copied-up file costs a listxattr, a getxattr and an open_by_handle_at (about
        # 30 us), a repeated one a dict hit. Any change to the object (an xattr included)
        # changes its ctime, and a reused inode number comes with a new ctime.
        self._origin_cache: dict[tuple[int, int, int], int | None] = {}
        self.opaque_xattr = whiteout.OPAQUE_XATTRS[1 if cfg.userxattr else 0]
        self.file_handles: dict[int, FileHandle] = {}
        self.dir_handles: dict[int, DirHandle] = {}
        # Names of live multiply-linked files: a node reaches its object through one of them,
        # and must move to another when that one is unlinked or renamed away.
        self.aliases: dict[int, list[tuple[Node, bytes]]] = {}
        self._next_fh = 1

    def close(self) -> None:
        for fh in list(self.file_handles.values()):
            if fh.fd >= 0:
                os.close(fh.fd)
        self.file_handles.clear()
        self.table.close()
        self.stack.close()

    # -- helpers ------------------------------------------------------------------------

    def node(self, ino: int) -> Node:
        try:
            return self.table.get(ino)
        except KeyError:
            raise _err(errno.ESTALE) from None

    def parent_fd(self, node: Node, layer: int) -> int:
        """Descriptor of ``node``'s parent directory in ``layer`` (node must not be root)."""
        assert node.parent is not None
        return self.table.dir_fd(node.parent, layer)

    def lstat_in(self, node: Node, layer: int) -> os.stat_result:
        if node.parent is None:
            return os.stat(self.stack[layer].root_fd)
        return os.stat(node.name, dir_fd=self.parent_fd(node, layer), follow_symlinks=False)

    def index_of(self, node: Node) -> DirIndex:
        """The merged index of directory ``node``, built on first use."""
        index = node.index
        if index is None:
            if not node.is_dir:
                raise _err(errno.ENOTDIR)
            layer_fds = [(layer, self.table.dir_fd(node, layer)) for layer in node.layers]
            index = build_index(layer_fds, node.listings)
            node.index = index
            node.listings = None
            self.stats.dirs_indexed += 1
        return index

    def _is_opaque_dir(self, fd: int) -> bool:
        if whiteout.opaque_value(fd) == whiteout.OPAQUE_YES:
            return True
        try:
            os.stat(whiteout.OCI_OPAQUE_NAME, dir_fd=fd, follow_symlinks=False)
        except FileNotFoundError:
            return False
        return True

    def _probe_dir(self, layer: int, fd: int) -> tuple[bool, Listing | None]:
        """Whether ``fd`` (a directory in ``layer``) is opaque, with its listing if read.

        Lower listings are kept for the directory's index (lowers never change); the upper
        copy is only probed for the OCI marker, as it can change before the index is built.
        """
        if layer == UPPER and self.stack.has_upper:
            return self._is_opaque_dir(fd), None
        return check_opaque(fd)

    def _truncate_at_opaque(self, parent: Node, name: bytes, layers: tuple[int, ...]) -> Chain:
        """Cut a directory chain after its first opaque layer (the last one is never checked).

        Returns the chain, the directories opened to check it and the listings read, by
        layer: the caller hands them to the child's node, so building its index neither
        opens nor reads them again.
        """
        if len(layers) > parallel.MIN_ITEMS:
            return self._truncate_at_opaque_parallel(parent, name, layers)
        opened: dict[int, int] = {}
        listings: dict[int, Listing] = {}
        try:
            for i, layer in enumerate(layers[:-1]):
                fd = opened[layer] = open_dir_at(self.table.dir_fd(parent, layer), name)
                opaque, listing = self._probe_dir(layer, fd)
                if listing is not None:
                    listings[layer] = listing
                if opaque:
                    return layers[: i + 1], opened, listings
            return layers, opened, listings
        except BaseException:
            for fd in opened.values():
                os.close(fd)
            raise

    def _truncate_at_opaque_parallel(
        self, parent: Node, name: bytes, layers: tuple[int, ...]
    ) -> Chain:
        """:meth:`_truncate_at_opaque` for deep chains: every layer's directory is opened
        and checked at once (see :mod:`unionfs.parallel`), and those below the first opaque
        one are closed again."""
        probes = [(layer, self.table.dir_fd(parent, layer)) for layer in layers[:-1]]

        def probe(item: tuple[int, int]) -> tuple[int, bool, Listing | None] | OSError:
            layer, parent_fd = item
            try:
                fd = open_dir_at(parent_fd, name)
            except OSError as exc:
                return exc
            try:
                return (fd, *self._probe_dir(layer, fd))
            except OSError as exc:
                os.close(fd)
                return exc

        results = parallel.map_layers(probe, probes)
        # The outcome the serial walk would have had: the chain stops at the first opaque
        # layer, and an error in a layer above that one is raised.
        keep = len(layers)
        failure: OSError | None = None
        for i, result in enumerate(results):
            if i >= keep:
                break
            if isinstance(result, OSError):
                failure = result
                break
            if result[1]:
                keep = i + 1
        opened: dict[int, int] = {}
        listings: dict[int, Listing] = {}
        for i, (layer, result) in enumerate(zip(layers, results, strict=False)):
            if isinstance(result, OSError):
                continue
            fd, _, listing = result
            if failure is None and i < keep:
                opened[layer] = fd
                if listing is not None:
                    listings[layer] = listing
            else:
                os.close(fd)
        if failure is not None:
            raise failure
        return layers[:keep], opened, listings

    def read_origin(
        self,
        dir_fd: int,
        name: bytes,
        parent: Node | None = None,
        st: os.stat_result | None = None,
        layers: tuple[int, ...] | None = None,
    ) -> int | None:
        """The inode number the upper object ``name`` in ``dir_fd`` shows instead of its own
        (the number of the object it was copied up from), or None: its own number.

        Follows the kernel with ``index=off``. A non-directory shows the number of the lower
        object its ``overlay.origin`` handle names, if that decodes (which needs
        CAP_DAC_READ_SEARCH) to an object of the same type on a lower layer's filesystem; an
        upper written by older unionfs versions gives the number its ``*.unionfs.origin``
        recorded, if that names a lower layer's filesystem. A directory, given the chain
        ``layers`` it resolved to, shows the number of the topmost lower directory of that
        chain (its origin xattr is not used, as in the kernel); without ``layers`` its origin
        xattr is decoded as for a non-directory (whether it records a copy-up at all).

        ``st`` is the object's stat (taken when not given); ``parent`` its parent node, needed
        with ``layers``. A bad value never raises: it is ignored. The number only says what
        ``st_ino`` shows: :meth:`node_for` decides which node the object is, so a forged origin
        can make two objects show one number (as in the kernel) but never share a node.
        """
        if st is None:
            try:
                st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
            except OSError:
                return None
        ino: int | None = None
        if stat.S_ISDIR(st.st_mode) and layers is not None:
            if len(layers) > 1 and parent is not None:
                try:
                    lst = os.stat(
                        name, dir_fd=self.table.dir_fd(parent, layers[1]), follow_symlinks=False
                    )
                except OSError:
                    return None
                if stat.S_ISDIR(lst.st_mode):
                    ino = self.stack.natural_ino(lst.st_dev, lst.st_ino)
        else:
            key = (st.st_dev, st.st_ino, st.st_ctime_ns)
            if key in self._origin_cache:
                return self._origin_cache[key]
            ino = self._origin_xattr_ino(dir_fd, name, st)
            if len(self._origin_cache) >= _ORIGIN_CACHE_MAX:
                self._origin_cache.clear()
            self._origin_cache[key] = ino
        return ino

    def _origin_xattr_ino(self, dir_fd: int, name: bytes, st: os.stat_result) -> int | None:
        """The number an origin xattr of the upper object ``name`` (stat ``st``) names."""
        try:
            names = os.listxattr(whiteout.at_path(dir_fd, name), follow_symlinks=False)
        except OSError:
            return None
        if os.fsdecode(self.origin_xattr) in names:
            raw = whiteout.getxattr_at(dir_fd, name, self.origin_xattr)
            return None if raw is None else self._decode_origin(raw, st)
        if os.fsdecode(self.old_origin_xattr) in names:
            raw = whiteout.getxattr_at(dir_fd, name, self.old_origin_xattr)
            if raw is None or len(raw) != 8:
                return None
            ino = int(struct.unpack("<Q", raw)[0])
            # Only a number unionfs gives a lower object: its filesystem part names a lower
            # layer's filesystem (never 0, as the root's number 1 has, nor the private range).
            lower_fsids = {layer.fsid for layer in self.stack.layers if not layer.is_upper}
            if ino >> INO_BITS in lower_fsids:
                return ino
        return None

    def _decode_origin(self, raw: bytes, st: os.stat_result) -> int | None:
        """The number of the lower object the ``ovl_fb`` handle ``raw`` names, validated."""
        decoded = whiteout.decode_origin(raw)
        if decoded is None or not self._origin_decode:
            return None
        uuid, htype, fid = decoded
        for dev, mount_fd, roots in self._origin_filesystems().get(uuid, ()):
            try:
                fd = whiteout.open_origin(mount_fd, htype, fid)
            except OSError as exc:
                if exc.errno == errno.EPERM:
                    # Decoding needs CAP_DAC_READ_SEARCH: without it, objects show their own
                    # numbers, as in the kernel when it cannot follow an origin.
                    self._origin_decode = False
                    return None
                continue  # ESTALE (names nothing here), EINVAL (not a valid handle), ...
            try:
                ost = os.fstat(fd)
                if ost.st_dev != dev or stat.S_IFMT(ost.st_mode) != stat.S_IFMT(st.st_mode):
                    return None
                if stat.S_ISDIR(ost.st_mode):
                    # As the kernel's ovl_acceptable: a directory must be a live one inside a
                    # lower layer (a non-directory may be anywhere on its filesystem).
                    path = os.readlink(f"/proc/self/fd/{fd}".encode())
                    if ost.st_nlink == 0 or not any(
                        path == r or path.startswith(r.rstrip(b"/") + b"/") for r in roots
                    ):
                        return None
            finally:
                os.close(fd)
            return self.stack.natural_ino(ost.st_dev, ost.st_ino)
        return None

    def _origin_filesystems(self) -> dict[bytes, list[tuple[int, int, list[bytes]]]]:
        """The lower filesystems an origin handle may be decoded on, by uuid, in layer order.

        As in the kernel, a uuid shared by several lower filesystems is unusable, except for
        the upper's own filesystem (all layers on one filesystem). Unlike the kernel, a null
        uuid is accepted when it is unique: copied-up objects keep their numbers across a
        remount there too (the kernel only follows such origins with index or xino on).
        """
        if self._origin_fs is not None:
            return self._origin_fs
        upper_dev = os.fstat(self.stack[UPPER].root_fd).st_dev if self.stack.has_upper else -1
        by_dev: dict[int, tuple[bytes, int, list[bytes]]] = {}
        for layer in self.stack.layers:
            if layer.is_upper:
                continue
            fd = layer.root_fd
            dev = os.fstat(fd).st_dev
            root = os.readlink(f"/proc/self/fd/{fd}".encode())
            if dev in by_dev:
                by_dev[dev][2].append(root)
            else:
                by_dev[dev] = (whiteout.fs_uuid(fd), fd, [root])
        count: dict[bytes, int] = {}
        for uuid, _, _ in by_dev.values():
            count[uuid] = count.get(uuid, 0) + 1
        table: dict[bytes, list[tuple[int, int, list[bytes]]]] = {}
        for dev, (uuid, fd, roots) in by_dev.items():
            if count[uuid] == 1 or dev == upper_dev:
                table.setdefault(uuid, []).append((dev, fd, roots))
        self._origin_fs = table
        return table

    # -- resolution ---------------------------------------------------------------------

    def resolve(self, parent: Node, name: bytes) -> tuple[Node, os.stat_result] | None:
        """Find ``name`` in directory ``parent``; None when it is not in the merged view.

        Returns the node (the live one if the object is already known, with its location
        refreshed) and the stat of its topmost layer object. Does not count a lookup.
        """
        index = parent.index or self.index_of(parent)
        if whiteout.is_marker_name(name):
            return None
        if len(name) > 255:
            # The kernel's FUSE module lets names up to 1024 bytes through; the overlay's
            # layers refuse them, and so does the kernel's overlay.
            raise _err(errno.ENAMETOOLONG)
        entry = index.get(name)
        if entry is None:
            return None
        is_dir, layers, checked = entry
        opened: dict[int, int] | None = None
        listings: dict[int, Listing] | None = None
        if not checked:
            layers, opened, listings = self._truncate_at_opaque(parent, name, layers)
            index.set(name, (is_dir, layers, True))
            if is_dir and len(layers) > 1 and layers[0] == UPPER and self.stack.has_upper:
                self.merged_dir_found(parent, name, layers, opened)
        top = layers[0]
        pfd = self.table.dir_fd(parent, top)
        try:
            st = os.stat(name, dir_fd=pfd, follow_symlinks=False)
        except FileNotFoundError:
            for fd in (opened or {}).values():
                os.close(fd)
            index.discard(name)
            return None
        origin = None
        if top == UPPER and self.stack.has_upper:
            origin = self.read_origin(pfd, name, parent, st, layers)
        node = self.node_for(parent, name, is_dir, layers, st, origin)
        if opened:
            for layer, fd in opened.items():
                self.table.adopt(node, layer, fd)
        if listings and node.index is None:
            node.listings = listings
        if (top != UPPER or not self.stack.has_upper) and (is_dir or st.st_nlink == 1):
            node.immutable = True
            index.known[name] = node
        else:
            # An upper object changes; so may a lower file with more links, one of which can
            # be an upper name of the same inode (layer stores made with `cp -al`).
            node.drop_attr_cache()
        self.stats.count_lookup(top)
        return node, st

    def merged_dir_found(
        self, parent: Node, name: bytes, layers: tuple[int, ...], opened: dict[int, int]
    ) -> None:
        """Called the first time a directory merged from the upper and a lower is resolved
        in ``parent`` (``opened`` holds the layer directories opened to check it). The write
        side records its origin, as the kernel's lookup does; a read-only mount does nothing.
        """

    def node_for(
        self,
        parent: Node,
        name: bytes,
        is_dir: bool,
        layers: tuple[int, ...],
        st: os.stat_result,
        origin: int | None = None,
    ) -> Node:
        """The node for the object ``st`` found at ``name`` in ``parent`` (not counted).

        The number shown is the origin's, else the object's own. The node id is that number,
        except for a name of a lower hard link (the kernel without ``index=on`` makes every
        name its own inode, one st_ino for all) and for an object whose number already names
        a live node of another object (the layer filesystem reused the number of an object
        removed through the mount, or a copy-up left two objects with one origin).
        """
        obj = (st.st_dev, st.st_ino)
        shown = origin if origin is not None else self.stack.natural_ino(*obj)
        lower = layers[0] != UPPER or not self.stack.has_upper
        if not is_dir and lower and st.st_nlink > 1:
            ino = self.table.private_id(("name", obj, parent.ino, name))
        else:
            ino = self.table.known_id(("obj", obj)) or shown
        node = self.table.nodes.get(ino)
        if node is not None and (node.removed or node.is_dir != is_dir or node.obj != obj):
            ino = self.table.private_id(("obj", obj), fresh=True)
            node = None
        if node is None:
            node = Node(ino, parent, name, is_dir, layers)
        else:
            if node.is_dir and node.layers != layers:
                node.index = None
                node.listings = None
            node.parent, node.name, node.layers = parent, name, layers
        node.st_ino, node.obj = shown, obj
        if not is_dir and not lower and st.st_nlink > 1:
            self._note_alias(node, parent, name)
        return node

    def has_origin(self, node: Node) -> bool:
        """Whether ``node`` is a non-directory shown with a lower origin's number (an origin
        written by a copy-up, or one its lookup decoded and accepted)."""
        return not node.is_dir and node.st_ino != self.stack.natural_ino(*node.obj)

    def moved_up(self, node: Node, st: os.stat_result, origin: bool) -> None:
        """``node`` now lives in the upper as the object ``st`` (a copy-up).

        Without an origin the number shown becomes the copy's own, as in the kernel; the
        node keeps its id while the kernel holds it, and a later lookup of the copy finds it.
        """
        obj = (st.st_dev, st.st_ino)
        node.obj = obj
        if not origin:
            node.st_ino = self.stack.natural_ino(*obj)
        if node.ino != node.st_ino:
            self.table.bind_id(("obj", obj), node.ino)

    def resolve_cached(self, parent: Node, name: bytes) -> Node | None:
        """The node for ``name`` if it is a lower object whose reply the adapter holds.

        A dict hit that skips the ``fstatat`` of :meth:`resolve`; None means "resolve it".
        """
        index = parent.index
        if index is None:
            return None
        node = index.known.get(name)
        if (
            node is None
            or node.fuse_entry is None
            or node.parent is not parent
            or node.name != name
            or node.removed
        ):
            return None
        live = self.table.nodes.get(node.ino)
        if live is not None and live is not node:
            return None
        self.stats.lookups_per_layer[node.layers[0]] += 1
        return node

    def _note_alias(self, node: Node, parent: Node, name: bytes) -> None:
        names = self.aliases.setdefault(node.ino, [])
        if not any(p is parent and n == name for p, n in names):
            names.append((parent, name))

    def drop_alias(
        self, node: Node, parent: Node, name: bytes, key: tuple[int, int] | None = None
    ) -> None:
        """``name`` in ``parent`` no longer names ``node``; re-point the node if it used it.

        ``key`` is the (st_dev, st_ino) of the node's object: another name is only taken if
        it still refers to that object.
        """
        names = self.aliases.get(node.ino)
        if names is None:
            return
        names[:] = [(p, n) for p, n in names if not (p is parent and n == name)]
        if node.parent is parent and node.name == name:
            for p, n in names:
                try:
                    st = os.stat(n, dir_fd=self.table.dir_fd(p, node.layer), follow_symlinks=False)
                except OSError:
                    continue
                if key is None or (st.st_dev, st.st_ino) == key:
                    node.parent, node.name = p, n
                    return

    def move_alias(
        self, node: Node, old_parent: Node, old_name: bytes, new_parent: Node, new_name: bytes
    ) -> None:
        """``node`` moved from one name to another (rename): keep its alias list true."""
        names = self.aliases.get(node.ino)
        if names is not None:
            names[:] = [(p, n) for p, n in names if not (p is old_parent and n == old_name)]
            names.append((new_parent, new_name))
        node.parent, node.name = new_parent, new_name

    def forget(self, ino: int, count: int) -> None:
        node = self.table.nodes.get(ino)
        self.table.forget(ino, count)
        if node is not None and ino not in self.table.nodes:
            self.aliases.pop(ino, None)
            if node.is_dir:
                # The kernel let the directory go: so does its index (and the cached replies
                # of its children), which keeps memory in step with the kernel's own cache.
                # It is rebuilt from the layers if the directory is looked up again.
                node.index = None
                node.listings = None

    def lookup(self, parent_ino: int, name: bytes) -> tuple[Node, Attr | None] | None:
        """Resolve and count one lookup; None for a name that is not there (cacheable).

        The attributes are None when the node's cached reply can be used as it is.
        """
        parent = self.node(parent_ino)
        cached = self.resolve_cached(parent, name)
        if cached is not None:
            return self.table.remember(cached), None
        if name == b".":
            self.table.remember(parent)
            return parent, self.attr(parent)
        if name == b"..":
            target = parent.parent or parent
            self.table.remember(target)
            return target, self.attr(target)
        found = self.resolve(parent, name)
        if found is None:
            self.stats.negative_lookups += 1
            return None
        node, st = found
        node = self.table.remember(node)
        return node, self._attr(node, st)

    # -- attributes ---------------------------------------------------------------------

    def _attr(self, node: Node, st: os.stat_result) -> Attr:
        nlink = st.st_nlink
        if node.is_dir and len(node.layers) > 1:
            # The kernel reports 1 for merged directories rather than counting subdirectories.
            nlink = 1
        return Attr(node.ino, st, nlink, node.st_ino)

    def attr(self, node: Node) -> Attr:
        try:
            st = self.lstat_in(node, node.layer)
        except FileNotFoundError:
            st = None
        if st is None or (node.parent is not None and (st.st_dev, st.st_ino) != node.obj):
            # The name now holds nothing or another object: never report that for this node.
            # A node whose last name went while the kernel held it answers from its object.
            if node.pinned < 0:
                raise _err(errno.ESTALE)
            st = os.fstat(node.pinned)
        return self._attr(node, st)

    def _named(self, node: Node) -> bool:
        """Whether ``node``'s current name still holds its own object."""
        try:
            st = self.lstat_in(node, node.layer)
        except FileNotFoundError:
            return False
        return (st.st_dev, st.st_ino) == node.obj

    def getattr(self, ino: int) -> Attr:
        return self.attr(self.node(ino))

    def readlink(self, ino: int) -> bytes:
        node = self.node(ino)
        if node.parent is None:
            raise _err(errno.EINVAL)
        return os.readlink(node.name, dir_fd=self.parent_fd(node, node.layer))

    # -- directories --------------------------------------------------------------------

    def _new_fh(self) -> int:
        fh = self._next_fh
        self._next_fh += 1
        return fh

    def opendir(self, ino: int) -> int:
        node = self.node(ino)
        if not node.is_dir:
            raise _err(errno.ENOTDIR)
        fh = self._new_fh()
        self.dir_handles[fh] = DirHandle(node)
        return fh

    def dir_names(self, handle: DirHandle) -> list[bytes]:
        """The names ``handle`` lists, fixed at its first read."""
        names = handle.names
        if names is None:
            names = handle.names = self.index_of(handle.node).names()
        return names

    def dir_handle(self, fh: int) -> DirHandle:
        handle = self.dir_handles.get(fh)
        if handle is None:
            raise _err(errno.EBADF)
        return handle

    def releasedir(self, fh: int) -> None:
        self.dir_handles.pop(fh, None)

    # -- files --------------------------------------------------------------------------

    def open_in_layer(self, node: Node, layer: int, flags: int) -> int:
        """Open ``node``'s regular file in ``layer`` with ``flags``, refusing anything else.

        The object is pinned with ``O_PATH | O_NOFOLLOW`` and checked to be a regular file
        before it is opened for I/O through ``/proc/self/fd``: a device, fifo or symlink in a
        layer is never opened.
        """
        return self.open_in_layer_stat(node, layer, flags)[0]

    def open_in_layer_stat(self, node: Node, layer: int, flags: int) -> tuple[int, os.stat_result]:
        """:meth:`open_in_layer`, also returning the stat of the file that was opened."""
        if node.parent is None:
            raise _err(errno.EISDIR)
        if node.pinned >= 0 and layer == node.layer:
            path_fd = os.dup(node.pinned)  # its names are gone: the object itself
        else:
            pfd = self.parent_fd(node, layer)
            path_fd = os.open(node.name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=pfd)
        try:
            st = os.fstat(path_fd)
            if stat.S_ISDIR(st.st_mode):
                raise _err(errno.EISDIR)
            if not stat.S_ISREG(st.st_mode):
                raise _err(errno.ENXIO)
            # Only flags that mean something for I/O on the layer file pass through: the
            # caller's O_NOFOLLOW would refuse the /proc magic link, O_DIRECT would impose
            # alignment the kernel already handled, O_APPEND would override FUSE's offsets.
            io_flags = (flags & (os.O_ACCMODE | os.O_SYNC | os.O_DSYNC)) | os.O_CLOEXEC
            if layer != UPPER or not self.stack.has_upper:
                io_flags |= os.O_NOATIME
            try:
                return os.open(f"/proc/self/fd/{path_fd}", io_flags), st
            except PermissionError:
                return os.open(f"/proc/self/fd/{path_fd}", io_flags & ~os.O_NOATIME), st
        finally:
            os.close(path_fd)

    def open_read(self, ino: int, flags: int) -> int:
        node = self.node(ino)
        if node.immutable and not node.is_dir:
            # A lower file never changes in place, and with FOPEN_KEEP_CACHE a warm file is
            # read from the page cache without a read request: open the layer file only
            # when the first read arrives.
            fd = -1
        else:
            fd = self.open_in_layer(node, node.layer, flags)
        return self.add_handle(fd, node, node.layer, flags)

    def add_handle(self, fd: int, node: Node, layer: int, flags: int) -> int:
        """Register an open file of ``node`` (``fd`` -1: opened at the first read)."""
        fh = self._new_fh()
        self.file_handles[fh] = FileHandle(fd, node, layer, flags)
        node.opened += 1
        return fh

    def pin(self, node: Node) -> None:
        """Keep ``node``'s object reachable before a name of it goes, while the kernel holds
        the node (a lookup count, or an open file; an ``O_PATH`` descriptor of a client makes
        no open request). Its attributes then come from the object itself, never from
        whatever takes the name next (a whiteout, another file: a kernel inode whose type
        changed is an EIO)."""
        if (node.lookups > 0 or node.opened) and node.pinned < 0 and node.parent is not None:
            node.pinned = os.open(
                node.name,
                os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC,
                dir_fd=self.parent_fd(node, node.layer),
            )

    def file_handle(self, fh: int) -> FileHandle:
        handle = self.file_handles.get(fh)
        if handle is None:
            raise _err(errno.EBADF)
        return handle

    def read(self, fh: int, off: int, size: int) -> bytes:
        handle = self.file_handle(fh)
        if handle.fd < 0 or (handle.layer != handle.node.layer and not handle.writable):
            # Opened lazily, or another opener copied the file up: read the copy from now
            # on, like the kernel.
            self._reopen(handle)
        return os.pread(handle.fd, size, off)

    def _reopen(self, handle: FileHandle) -> None:
        fd = self.open_in_layer(handle.node, handle.node.layer, handle.flags)
        if handle.fd >= 0:
            os.close(handle.fd)
        handle.fd = fd
        handle.layer = handle.node.layer

    def release(self, fh: int) -> None:
        handle = self.file_handles.pop(fh, None)
        if handle is None:
            return
        if handle.fd >= 0:
            os.close(handle.fd)
        node = handle.node
        node.opened -= 1
        if not node.opened and node.lookups <= 0:
            self.table.unpin(node)

    # -- xattrs and statfs --------------------------------------------------------------

    def _xattr_path(self, node: Node) -> bytes | int:
        if node.parent is None:
            return self.stack[node.layer].root_fd
        return whiteout.at_path(self.parent_fd(node, node.layer), node.name)

    def getxattr(self, ino: int, name: bytes) -> bytes:
        """The value of ``name`` on ``ino``; a name of the mount's own overlay namespace is
        read escaped (:func:`whiteout.xattr_layer_name`), reserved names are not there."""
        node = self.node(ino)
        stored = whiteout.xattr_layer_name(name, self.cfg.userxattr)
        if stored is None:
            raise _err(errno.ENODATA)
        name = stored
        target = self._xattr_path(node)
        if isinstance(target, int):
            return os.getxattr(target, name)
        return os.getxattr(target, name, follow_symlinks=False)

    def listxattr(self, ino: int) -> list[bytes]:
        node = self.node(ino)
        target = self._xattr_path(node)
        if isinstance(target, int):
            names = os.listxattr(target)
        else:
            names = os.listxattr(target, follow_symlinks=False)
        out = []
        for n in names:
            shown = whiteout.xattr_mount_name(os.fsencode(n), self.cfg.userxattr)
            if shown is not None:
                out.append(shown)
        return out

    def statfs(self) -> os.statvfs_result:
        return os.statvfs(self.stack[0].root_fd)

    def root(self) -> Node:
        return self.table.nodes[ROOT_INO]
