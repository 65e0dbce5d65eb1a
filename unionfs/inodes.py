"""Inode table: merged objects, their numbers, lookup counts and directory descriptors.

A :class:`Node` is one object of the merged view. It records where it lives -- the layers in
which a directory is merged, or the one layer serving a non-directory -- and its latest name
(parent node and name), which is how the layer object is reached again: through the parent's
directory descriptor in that layer, one component at a time, never by path strings.

:class:`NodeTable` is the single owner of nodes. Invariants (asserted in tests):

* a number names at most one live node; the root is number 1 and is never forgotten;
* lookup counts never go negative; a node leaves the table when its count reaches zero;
* directory descriptors are cached per (node, layer) and bounded by an LRU, so a walk of a
  huge tree does not exhaust ``RLIMIT_NOFILE``.
"""

from __future__ import annotations

import collections
import logging
import os

from unionfs.dirindex import DirIndex
from unionfs.layers import LayerStack, open_dir_at

log = logging.getLogger(__name__)

ROOT_INO = 1
# Node ids that are not inode numbers come from this range (the high 16 bits below the
# layers' own private range), so they never equal a number a layer object can show.
PRIVATE_ID_BASE = 0xFFFE << 48


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
        "generation",
        "immutable",
        "fuse_entry",
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
        self.listings: dict[int, list[tuple[bytes, bool, bool]]] | None = None
        self.removed = False
        # Open file handles of this object, and an O_PATH descriptor of it taken when its
        # last name went away while handles were open: those handles keep working (fstat,
        # read, write, fchmod ...) on the object itself, as on any POSIX filesystem.
        self.opened = 0
        self.pinned = -1
        self.generation = 0
        # An object served from a lower layer never changes (lowers are read-only): the
        # adapter keeps its ready-made reply in ``fuse_entry`` (a compact C struct, where an
        # os.stat_result would cost three times the memory).
        self.immutable = False
        self.fuse_entry: object = None

    def drop_attr_cache(self) -> None:
        """Forget cached attributes (the object moved to the upper layer or was removed)."""
        self.immutable = False
        self.fuse_entry = None

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
    """Owns every live node and the bounded cache of layer directory descriptors."""

    def __init__(self, stack: LayerStack, max_dir_fds: int = 4096) -> None:
        self.stack = stack
        self.nodes: dict[int, Node] = {}
        self.max_dir_fds = max_dir_fds
        self._fd_lru: collections.OrderedDict[tuple[int, int], Node] = collections.OrderedDict()
        # Node ids handed out for keys that are not inode numbers (see ``private_id``).
        self._private: dict[tuple[object, ...], int] = {}
        self._next_private = PRIVATE_ID_BASE + 1
        root = Node(ROOT_INO, None, b"", True, tuple(range(len(stack))))
        root.lookups = 1
        self.root = root
        self.nodes[ROOT_INO] = root

    # -- numbers and counts -------------------------------------------------------------

    def get(self, ino: int) -> Node:
        node = self.nodes.get(ino)
        if node is None:
            raise KeyError(ino)
        return node

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
        """Drop ``count`` lookups of ``ino``; never raises (forget may not fail)."""
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
