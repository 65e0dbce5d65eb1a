"""Nodes: the objects of the merged view, their ids and numbers, and how each is reached.

A :class:`Node` is one object of the merged view. It records where it lives -- the layers in
which a directory is merged, or the one layer serving a non-directory -- and its latest name
(parent node and name), which is how the layer object is reached again: through the parent's
directory descriptor in that layer, one component at a time, never by path strings.

:class:`NodeTable` is the single owner of nodes: lookup counts, node ids, the numbers they
show (``st_ino``), the names of multiply-linked upper files, and the bounded cache of layer
directory descriptors. Invariants (asserted in tests):

* a number names at most one live node; the root is number 1 and is never forgotten;
* lookup counts never go negative; a node leaves the table when its count reaches zero;
* directory descriptors are cached per (node, layer) and bounded by an LRU, so a walk of a
  huge tree does not exhaust ``RLIMIT_NOFILE``.

Two numbers are kept apart: the node id names one kernel inode; ``st_ino`` is what ``stat``
shows (docs/design.md, "Inode numbers and node ids"). :class:`Origins` turns the origin a
copy-up recorded (:mod:`unionfs.format`) into the number the copy shows.
"""

from __future__ import annotations

import collections
import errno
import logging
import os
import stat
from typing import TYPE_CHECKING, TypeVar

from unionfs import fdops, format
from unionfs.fdops import open_dir_at
from unionfs.fs.events import Events
from unionfs.layers import INO_BITS, LayerStack

if TYPE_CHECKING:
    from unionfs.fs.listing import DirIndex

log = logging.getLogger(__name__)

UPPER = 0
ROOT_INO = 1
# Node ids that are not inode numbers come from this range (the high 16 bits below the
# layers' own private range), so they never equal a number a layer object can show.
PRIVATE_ID_BASE = 0xFFFE << 48
_ORIGIN_CACHE_MAX = 1 << 16
# What open_by_handle_at fails with when an origin handle names nothing on a filesystem: the
# object is gone or the handle is another filesystem's (ESTALE), the handle's type means
# nothing there (EINVAL), the filesystem cannot decode handles (EOPNOTSUPP). Any other error
# is not an answer about the origin.
_HANDLE_NAMES_NOTHING = frozenset({errno.ESTALE, errno.EINVAL, errno.EOPNOTSUPP})


def err(code: int) -> OSError:
    """The OSError for ``code``, as every filesystem operation raises it."""
    return OSError(code, os.strerror(code))


T = TypeVar("T")


def get_or_raise(table: dict[int, T], key: int, code: int) -> T:
    """``table[key]``, or the OSError ``code`` (ESTALE for a node, EBADF for a handle)."""
    found = table.get(key)
    if found is None:
        raise err(code)
    return found


class Node:
    """One merged object. ``layers`` is top-down; for a non-directory it has one element."""

    __slots__ = (
        "ino",
        "st_ino",
        "obj",
        "lookups",
        "parent",
        "name",
        "is_dir",
        "layers",
        "index",
        "fds",
        "listings",
        "removed",
        "opened",
        "pinned",
        "immutable",
        "__weakref__",
    )

    def __init__(
        self,
        ino: int,
        parent: Node | None,
        name: bytes,
        is_dir: bool,
        layers: tuple[int, ...],
    ) -> None:
        # ``ino`` is the FUSE node id (one kernel inode); ``st_ino`` the number stat shows.
        # They differ where the kernel's overlayfs has separate inodes with one st_ino (the
        # names of a lower hard link), or where a number had to be replaced while the kernel
        # may hold it. ``obj`` is (st_dev, st_ino) of the layer object the node serves.
        self.ino = ino
        self.st_ino = ino
        self.obj: tuple[int, int] = (0, 0)
        self.lookups = 0
        self.parent = parent
        self.name = name
        self.is_dir = is_dir
        self.layers = layers
        self.index: DirIndex | None = None
        self.fds: dict[int, int] | None = None
        # Listings of this directory's lower layers, read when its chain was checked for an
        # opaque layer; the index build takes them instead of reading those layers again.
        self.listings: dict[int, list[format.ScanEntry]] | None = None
        self.removed = False
        # Open file handles of this object, and an O_PATH descriptor of it taken when its
        # last name went away while handles were open: those handles keep working (fstat,
        # read, write, fchmod ...) on the object itself, as on any POSIX filesystem.
        self.opened = 0
        self.pinned = -1
        # An object served from a lower layer never changes (lowers are read-only): whoever
        # serves the mount may cache what it showed of it until a "stale" event says so.
        self.immutable = False

    @property
    def layer(self) -> int:
        """The topmost layer holding this object: the one whose metadata is shown."""
        return self.layers[0]

    def path(self) -> bytes:
        """The node's latest path inside the mount (for messages and inspection)."""
        parts: list[bytes] = []
        node: Node | None = self
        while node is not None and node.parent is not None:
            parts.append(node.name)
            node = node.parent
        return b"/" + b"/".join(reversed(parts))

    def __repr__(self) -> str:
        return f"<Node {self.ino:#x} {self.path()!r} layers={self.layers}>"


class NodeTable:
    """Owns every live node, their ids and aliases, and the cache of directory descriptors."""

    def __init__(
        self, stack: LayerStack, max_dir_fds: int = 4096, events: Events | None = None
    ) -> None:
        self.stack = stack
        self.events = events if events is not None else Events()
        self.nodes: dict[int, Node] = {}
        self.max_dir_fds = max_dir_fds
        self._fd_lru: collections.OrderedDict[tuple[int, int], Node] = collections.OrderedDict()
        # Node ids handed out for keys that are not inode numbers (see ``private_id``).
        self._private: dict[tuple[object, ...], int] = {}
        self._next_private = PRIVATE_ID_BASE + 1
        # Names of live multiply-linked upper files: a node reaches its object through one of
        # them, and must move to another when that one is unlinked or renamed away.
        self.aliases: dict[int, list[tuple[Node, bytes]]] = {}
        root = Node(ROOT_INO, None, b"", True, tuple(range(len(stack))))
        root.lookups = 1
        self.root = root
        self.nodes[ROOT_INO] = root

    # -- numbers and counts -------------------------------------------------------------

    def node(self, ino: int) -> Node:
        """The live node ``ino``; ESTALE when the kernel asks for one it was told to forget."""
        return get_or_raise(self.nodes, ino, errno.ESTALE)

    def private_id(self, key: tuple[object, ...], fresh: bool = False) -> int:
        """A node id from the private range, the same each time for the same ``key``.

        ``fresh`` gives the key a new id (its old one names a node the kernel may still hold).
        """
        ino = self._private.get(key)
        if ino is None or fresh:
            ino = self._next_private
            self._next_private += 1
            self._private[key] = ino
        return ino

    def bind_id(self, key: tuple[object, ...], ino: int) -> None:
        """Make ``ino`` the node id of ``key`` from now on (a node that moved to it)."""
        self._private[key] = ino

    def known_id(self, key: tuple[object, ...]) -> int | None:
        """The private node id given to ``key``, if any."""
        return self._private.get(key)

    def remember(self, node: Node) -> Node:
        """Count one lookup of ``node``; insert it if it is not live yet. Returns the live node."""
        live = self.nodes.get(node.ino)
        if live is None:
            self.nodes[node.ino] = node
            live = node
        live.lookups += 1
        return live

    def forget(self, ino: int, count: int) -> None:
        """Drop ``count`` lookups of ``ino``; never raises (forget may not fail).

        A node whose count reaches zero leaves the table; a directory's index goes with it
        (and with it the children it knew), so the daemon's memory follows the kernel's
        inode cache. It is rebuilt from the layers if the directory is looked up again.
        """
        node = self.nodes.get(ino)
        if node is None or ino == ROOT_INO:
            return
        node.lookups -= count
        if node.lookups <= 0:
            if node.lookups < 0:
                log.warning("lookup count of %r went negative", node)
            node.lookups = 0
            del self.nodes[ino]
            self.close_fds(node)
            if not node.opened:
                self.unpin(node)
            self.aliases.pop(ino, None)
            if node.is_dir:
                node.index = None
                node.listings = None
            self.events.stale(ino)

    def attrs_changed(self, node: Node) -> None:
        """What was shown of ``node`` is no longer true (it moved up or was replaced)."""
        if node.immutable:
            node.immutable = False
            self.events.stale(node.ino)

    # -- which node an object is --------------------------------------------------------

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
            ino = self.private_id(("name", obj, parent.ino, name))
        else:
            ino = self.known_id(("obj", obj)) or shown
        node = self.nodes.get(ino)
        if node is not None and (node.removed or node.is_dir != is_dir or node.obj != obj):
            ino = self.private_id(("obj", obj), fresh=True)
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
            self.note_alias(node, parent, name)
        return node

    def has_origin(self, node: Node) -> bool:
        """Whether ``node`` is a non-directory shown with a lower origin's number (an origin
        written by a copy-up, or one its lookup decoded and accepted)."""
        return not node.is_dir and node.st_ino != self.stack.natural_ino(*node.obj)

    def named(self, node: Node) -> bool:
        """Whether ``node``'s current name still holds its own object."""
        try:
            st = self.lstat_in(node, node.layer)
        except FileNotFoundError:
            return False
        return (st.st_dev, st.st_ino) == node.obj

    def moved_up(self, node: Node, st: os.stat_result, origin: bool) -> None:
        """``node`` now lives in the upper as the object ``st`` (a copy-up).

        Without an origin the number shown becomes the copy's own, as in the kernel; the
        node keeps its id while the kernel holds it, and a later lookup of the copy finds it.
        The copy may have the inode number of an object removed earlier whose node id is
        still recorded for that number: the record is replaced too, else a lookup of the
        copy (an unlink's) would name another node than the one the kernel holds, and that
        one would not be pinned (ESTALE for an open handle once the name is gone).
        """
        self.attrs_changed(node)
        obj = (st.st_dev, st.st_ino)
        node.obj = obj
        if not origin:
            node.st_ino = self.stack.natural_ino(*obj)
        key = ("obj", obj)
        if node.ino != node.st_ino or self.known_id(key) not in (None, node.ino):
            self.bind_id(key, node.ino)

    def note_alias(self, node: Node, parent: Node, name: bytes) -> None:
        """``name`` in ``parent`` is one more name of the multiply-linked ``node``."""
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
                    st = os.stat(n, dir_fd=self.dir_fd(p, node.layer), follow_symlinks=False)
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

    # -- reaching a node's layer object --------------------------------------------------

    def parent_fd(self, node: Node, layer: int) -> int:
        """Descriptor of ``node``'s parent directory in ``layer`` (node must not be root)."""
        assert node.parent is not None
        return self.dir_fd(node.parent, layer)

    def lstat_in(self, node: Node, layer: int) -> os.stat_result:
        """The stat of ``node``'s object in ``layer``, never following it."""
        if node.parent is None:
            return os.stat(self.stack[layer].root_fd)
        return os.stat(node.name, dir_fd=self.parent_fd(node, layer), follow_symlinks=False)

    def xattr_target(self, node: Node) -> fdops.Target:
        """Where ``node``'s xattrs are read and written: a root descriptor or a path."""
        if node.parent is None:
            return self.stack[node.layer].root_fd
        return fdops.at_path(self.parent_fd(node, node.layer), node.name)

    def open_file(self, node: Node, layer: int, flags: int) -> tuple[int, os.stat_result]:
        """Open ``node``'s regular file in ``layer`` with ``flags``, refusing anything else;
        returns the descriptor and the stat of the file that was opened.

        The object is pinned with ``O_PATH | O_NOFOLLOW`` and checked to be a regular file
        before it is opened for I/O through ``/proc/self/fd``: a device, fifo or symlink in a
        layer is never opened (EISDIR, ENXIO).
        """
        if node.parent is None:
            raise err(errno.EISDIR)
        if node.pinned >= 0 and layer == node.layer:
            path_fd = os.dup(node.pinned)  # its names are gone: the object itself
        else:
            path_fd = fdops.open_path(self.parent_fd(node, layer), node.name)
        try:
            st = os.fstat(path_fd)
            if stat.S_ISDIR(st.st_mode):
                raise err(errno.EISDIR)
            if not stat.S_ISREG(st.st_mode):
                raise err(errno.ENXIO)
            # Only flags that mean something for I/O on the layer file pass through: the
            # caller's O_NOFOLLOW would refuse the /proc magic link, O_DIRECT would impose
            # alignment the kernel already handled, O_APPEND would override FUSE's offsets.
            io_flags = (flags & (os.O_ACCMODE | os.O_SYNC | os.O_DSYNC)) | os.O_CLOEXEC
            if layer != UPPER or not self.stack.has_upper:
                io_flags |= os.O_NOATIME
            try:
                return fdops.reopen(path_fd, io_flags), st
            except PermissionError:
                return fdops.reopen(path_fd, io_flags & ~os.O_NOATIME), st
        finally:
            os.close(path_fd)

    def pin(self, node: Node) -> None:
        """Keep ``node``'s object reachable before a name of it goes, while the kernel holds
        the node (a lookup count, or an open file; an ``O_PATH`` descriptor of a client makes
        no open request). Its attributes then come from the object itself, never from
        whatever takes the name next (a whiteout, another file: a kernel inode whose type
        changed is an EIO)."""
        if (node.lookups > 0 or node.opened) and node.pinned < 0 and node.parent is not None:
            node.pinned = fdops.open_path(self.parent_fd(node, node.layer), node.name)

    # -- layer directory descriptors -----------------------------------------------------

    def dir_fd(self, node: Node, layer: int) -> int:
        """A descriptor of ``node``'s directory in ``layer`` (opened on demand, cached).

        Raises OSError if the directory is not there, e.g. it was removed in the upper.
        """
        # Up to the nearest directory whose descriptor is at hand (the root's always is),
        # then down, opening one level at a time: no recursion, whatever the depth.
        missing: list[Node] = []
        cur = node
        while True:
            if cur.parent is None:
                fd = self.stack[layer].root_fd
                break
            cached = cur.fds.get(layer) if cur.fds is not None else None
            if cached is not None:
                self._fd_lru.move_to_end((id(cur), layer))
                fd = cached
                break
            missing.append(cur)
            cur = cur.parent
        for child in reversed(missing):
            fd = open_dir_at(fd, child.name)
            self.adopt(child, layer, fd)  # the newest entry: never the one evicted next
        return fd

    def adopt(self, node: Node, layer: int, fd: int) -> None:
        """Take ownership of ``fd``, an open directory of ``node`` in ``layer``."""
        if node.fds is None:
            node.fds = {}
        old = node.fds.get(layer)
        if old is not None:
            self._fd_lru.pop((id(node), layer), None)
            os.close(old)
        node.fds[layer] = fd
        self._fd_lru[(id(node), layer)] = node
        while len(self._fd_lru) > self.max_dir_fds:
            (_, old_layer), evicted = self._fd_lru.popitem(last=False)
            if evicted.fds is not None:
                old_fd = evicted.fds.pop(old_layer, None)
                if old_fd is not None:
                    os.close(old_fd)

    def drop_dir_fd(self, node: Node, layer: int) -> None:
        """Forget the cached descriptor of ``node`` in ``layer`` (the directory went away)."""
        if node.fds is None:
            return
        fd = node.fds.pop(layer, None)
        if fd is not None:
            self._fd_lru.pop((id(node), layer), None)
            os.close(fd)

    def unpin(self, node: Node) -> None:
        """Close the descriptor that kept ``node``'s removed object reachable, if any."""
        if node.pinned >= 0:
            os.close(node.pinned)
            node.pinned = -1

    def close_fds(self, node: Node) -> None:
        if node.fds:
            for layer, fd in node.fds.items():
                self._fd_lru.pop((id(node), layer), None)
                os.close(fd)
        node.fds = None

    def close(self) -> None:
        for node in list(self.nodes.values()):
            self.close_fds(node)
            self.unpin(node)
        for _, node in list(self._fd_lru.items()):
            self.close_fds(node)
        self._fd_lru.clear()


# Lower filesystems an origin handle may be decoded on: (st_dev, root fd, layer roots).
_OriginFs = list[tuple[int, int, list[bytes]]]


class Origins:
    """The number an upper object shows because of the origin its copy-up recorded."""

    def __init__(self, table: NodeTable, names: format.XattrNames) -> None:
        self.table = table
        self.stack = table.stack
        self.names = names
        # By uuid; built on first use. _decode is False once open_by_handle_at was refused.
        self._filesystems: dict[bytes, _OriginFs] | None = None
        self._decode = True
        # Decoded origins by (st_dev, st_ino) of the upper object, with the st_ctime_ns they
        # were read at: a cold lookup of a copied-up file costs a listxattr, a getxattr and
        # an open_by_handle_at, a repeated one a dict hit. Any change to the object (an xattr
        # included) changes its ctime. A reused inode number need not: where timestamps are
        # coarse (whole seconds on ext4 with 128-byte inodes), a file created in the second
        # its number was freed has the old ctime. So the daemon forgets an object's entry
        # when it removes one of its names (:meth:`forget`); nothing else removes upper
        # objects while a mount lives.
        self._cache: dict[tuple[int, int], tuple[int, int | None]] = {}

    def read(
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
        with ``layers``. A bad value never raises: it is ignored. A failure that is no answer
        about the origin (``open_by_handle_at`` out of descriptors or memory) raises, and is
        not remembered: a later lookup decodes again. The number only says what
        ``st_ino`` shows: :meth:`NodeTable.node_for` decides which node the object is, so a
        forged origin can make two objects show one number (as in the kernel) but never share
        a node.
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
            key = (st.st_dev, st.st_ino)
            known = self._cache.get(key)
            if known is not None and known[0] == st.st_ctime_ns:
                return known[1]
            ino = self._xattr_ino(dir_fd, name, st)
            if len(self._cache) >= _ORIGIN_CACHE_MAX:
                self._cache.clear()
            self._cache[key] = (st.st_ctime_ns, ino)
        return ino

    def forget(self, st: os.stat_result) -> None:
        """Drop what is known of the upper object ``st`` (one of its names was removed or
        replaced: its number may be given to a new object)."""
        self._cache.pop((st.st_dev, st.st_ino), None)

    def _xattr_ino(self, dir_fd: int, name: bytes, st: os.stat_result) -> int | None:
        """The number an origin xattr of the upper object ``name`` (stat ``st``) names."""
        recorded = format.read_origin_xattr(dir_fd, name, self.names)
        if recorded is None:
            return None
        if recorded.handle is not None:
            return self._decode_handle(recorded.handle, st)
        ino = recorded.old_number
        # Only a number unionfs gives a lower object: its filesystem part names a lower
        # layer's filesystem (never 0, as the root's number 1 has, nor the private range).
        lower_fsids = {layer.fsid for layer in self.stack.layers if not layer.is_upper}
        if ino is not None and ino >> INO_BITS in lower_fsids:
            return ino
        return None

    def _decode_handle(self, raw: bytes, st: os.stat_result) -> int | None:
        """The number of the lower object the ``ovl_fb`` handle ``raw`` names, validated."""
        decoded = format.decode_origin(raw)
        if decoded is None or not self._decode:
            return None
        uuid, htype, fid = decoded
        for dev, mount_fd, roots in self._origin_filesystems().get(uuid, ()):
            try:
                fd = fdops.open_by_handle_at(mount_fd, htype, fid)
            except OSError as exc:
                if exc.errno == errno.EPERM:
                    # Decoding needs CAP_DAC_READ_SEARCH: without it, objects show their own
                    # numbers, as in the kernel when it cannot follow an origin.
                    self._decode = False
                    return None
                if exc.errno in _HANDLE_NAMES_NOTHING:
                    continue
                # Not an answer (out of descriptors or memory, an I/O error): the lookup
                # fails with it, as the kernel's does, and nothing is remembered.
                raise
            try:
                ost = os.fstat(fd)
                if ost.st_dev != dev or stat.S_IFMT(ost.st_mode) != stat.S_IFMT(st.st_mode):
                    return None
                if stat.S_ISDIR(ost.st_mode):
                    # As the kernel's ovl_acceptable: a directory must be a live one inside a
                    # lower layer (a non-directory may be anywhere on its filesystem).
                    path = fdops.fd_target(fd)
                    if ost.st_nlink == 0 or not any(
                        path == r or path.startswith(r.rstrip(b"/") + b"/") for r in roots
                    ):
                        return None
            finally:
                os.close(fd)
            return self.stack.natural_ino(ost.st_dev, ost.st_ino)
        return None

    def _origin_filesystems(self) -> dict[bytes, _OriginFs]:
        """The lower filesystems an origin handle may be decoded on, by uuid, in layer order.

        As in the kernel, a uuid shared by several lower filesystems is unusable, except for
        the upper's own filesystem (all layers on one filesystem). Unlike the kernel, a null
        uuid is accepted when it is unique: copied-up objects keep their numbers across a
        remount there too (the kernel only follows such origins with index or xino on).
        """
        if self._filesystems is not None:
            return self._filesystems
        upper_dev = os.fstat(self.stack[UPPER].root_fd).st_dev if self.stack.has_upper else -1
        by_dev: dict[int, tuple[bytes, int, list[bytes]]] = {}
        for layer in self.stack.layers:
            if layer.is_upper:
                continue
            fd = layer.root_fd
            dev = os.fstat(fd).st_dev
            root = fdops.fd_target(fd)
            if dev in by_dev:
                by_dev[dev][2].append(root)
            else:
                by_dev[dev] = (fdops.fs_uuid(fd), fd, [root])
        count: dict[bytes, int] = {}
        for uuid, _, _ in by_dev.values():
            count[uuid] = count.get(uuid, 0) + 1
        table: dict[bytes, _OriginFs] = {}
        for dev, (uuid, fd, roots) in by_dev.items():
            if count[uuid] == 1 or dev == upper_dev:
                table.setdefault(uuid, []).append((dev, fd, roots))
        self._filesystems = table
        return table
