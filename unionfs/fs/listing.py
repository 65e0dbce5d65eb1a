"""Listing (the kernel's readdir.c part): the merged index of a directory, the emptiness
rule, and the entries ``readdir`` returns.

The merged index says which layers hold which names; it is built once per directory.

Reading a merged directory lists each of its layer directories once, top-down, and records for
every visible name the layers that contribute to it:

* a non-directory hides everything below it: its entry has exactly one layer;
* a directory continues into lower layers that also hold a directory of that name, until a
  whiteout or a non-directory of that name in some layer ends the chain (an *opaque* marker on
  one of those directories also ends it; that is checked when the child itself is looked up,
  because it needs an xattr read per directory);
* whiteouts in a layer hide the name in the layers below it, never in their own layer.

The index answers lookups without probing every layer (one dict access instead of one
``fstatat`` per layer) and serves as the snapshot for ``readdir``. The filesystem keeps it in
step with every change it makes to the upper layer; lower layers never change.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable, Iterator
from typing import Any

from unionfs import format
from unionfs.fs.nodes import UPPER, Node
from unionfs.fs.state import Attr, DirHandle, State, err
from unionfs.parallel import map_layers

# An entry: (is_dir, layers top-down, checked). ``checked`` is False for a directory whose
# chain has not yet been truncated at its first opaque layer (see module docstring).
Entry = tuple[bool, tuple[int, ...], bool]


class DirIndex:
    """The visible names of one merged directory, in listing order (upper first)."""

    __slots__ = ("entries", "known")

    def __init__(self, entries: dict[bytes, Entry]) -> None:
        self.entries = entries
        # name -> node of a lower object already resolved here: a lookup shortcut that
        # outlives the kernel forgetting the node (lower objects never change).
        self.known: dict[bytes, Any] = {}

    def get(self, name: bytes) -> Entry | None:
        return self.entries.get(name)

    def set(self, name: bytes, entry: Entry) -> None:
        self.entries[name] = entry
        self.known.pop(name, None)

    def discard(self, name: bytes) -> None:
        self.entries.pop(name, None)
        self.known.pop(name, None)

    def names(self) -> list[bytes]:
        return list(self.entries)

    def __len__(self) -> int:
        return len(self.entries)


Listing = list[format.ScanEntry]


def _listing(fd: int) -> Listing:
    return list(format.scan_layer_dir(fd))


def build_index(
    layer_fds: list[tuple[int, int]], listings: dict[int, Listing] | None = None
) -> DirIndex:
    """Merge the listings of one directory's layers (``(layer, fd)`` pairs, top-down).

    The caller passes the directory's layers already truncated at its first opaque one, and
    any layer listings it already has.
    """
    entries: dict[bytes, Entry] = {}
    closed: set[bytes] = set()  # names whose chain can take no more layers
    hidden: set[bytes] = set()  # names whited out above the layer being read
    known = listings or {}
    missing = [fd for layer, fd in layer_fds if layer not in known]
    read = iter(map_layers(_listing, missing))
    for layer, _ in layer_fds:
        listing = known[layer] if layer in known else next(read)
        layer_whiteouts: list[bytes] = []
        for name, is_dir, is_marker in listing:
            if is_marker:
                if name != format.OCI_OPAQUE_NAME:
                    layer_whiteouts.append(name)
                continue
            current = entries.get(name)
            if current is None:
                if name in hidden:
                    continue
                entries[name] = (is_dir, (layer,), not is_dir)
                if not is_dir:
                    closed.add(name)
                continue
            if name in closed:
                continue
            if is_dir and current[0]:
                entries[name] = (True, current[1] + (layer,), False)
            else:
                # A non-directory below a directory is hidden, and ends the merge.
                closed.add(name)
        for name in layer_whiteouts:
            hidden.add(name)
            if name in entries:
                closed.add(name)
    return DirIndex(entries)


# -- the index of a directory node ---------------------------------------------------------


def index_of(s: State, node: Node) -> DirIndex:
    """The merged index of directory ``node``, built on first use (ENOTDIR for a file)."""
    index = node.index
    if index is None:
        if not node.is_dir:
            raise err(errno.ENOTDIR)
        layer_fds = [(layer, s.table.dir_fd(node, layer)) for layer in node.layers]
        index = build_index(layer_fds, node.listings)
        node.index = index
        node.listings = None
        s.stats.dirs_indexed += 1
    return index


def index_set(parent: Node, name: bytes, is_dir: bool, layers: tuple[int, ...]) -> None:
    """``name`` in ``parent`` is now the object in ``layers`` (kept in step by every change)."""
    if parent.index is not None:
        parent.index.set(name, (is_dir, layers, True))


def index_discard(parent: Node, name: bytes) -> None:
    """``name`` is no longer in ``parent``'s merged view."""
    if parent.index is not None:
        parent.index.discard(name)


# -- emptiness -------------------------------------------------------------------------------


def lower_xwhiteouts(s: State, node: Node) -> bool:
    """Whether a lower layer of ``node`` holds a visible-name xattr whiteout.

    The kernel's emptiness check for rmdir recognises only char 0/0 whiteouts, so a
    directory whose lowers hold xattr whiteouts is "not empty" there even though it
    lists as empty. We follow the kernel (tested in the differential suite).
    """
    seen: set[bytes] = set()
    for layer in node.layers:
        fd = s.table.dir_fd(node, layer)
        xdir = layer != UPPER and format.opaque_value(fd) == format.OPAQUE_XWHITEOUTS
        names = [os.fsencode(n) for n in os.listdir(fd)]
        for bname in names:
            if xdir and bname not in seen:
                st = os.stat(bname, dir_fd=fd, follow_symlinks=False)
                if format.is_xattr_whiteout(fd, bname, st):
                    return True
        seen.update(names)
    return False


def is_empty(s: State, node: Node) -> bool:
    """The kernel's emptiness rule for ``rmdir`` and a ``rename`` over a directory: no name
    in the merged view, and no xattr whiteout in a lower layer (:func:`lower_xwhiteouts`)."""
    return not len(index_of(s, node)) and not lower_xwhiteouts(s, node)


# -- readdir -------------------------------------------------------------------------------


def opendir(s: State, node: Node) -> int:
    """A handle for reading directory ``node`` (ENOTDIR for anything else)."""
    if not node.is_dir:
        raise err(errno.ENOTDIR)
    fh = s.new_fh()
    s.dir_handles[fh] = DirHandle(node)
    return fh


def dir_names(s: State, handle: DirHandle) -> list[bytes]:
    """The names ``handle`` lists, fixed at its first read."""
    names = handle.names
    if names is None:
        names = handle.names = index_of(s, handle.node).names()
        if s.dir_listed is not None:
            s.dir_listed(handle.node, names)
    return names


# One readdir entry: name, node, its attributes (None: what was shown of an unchanged node
# may be reused), and the offset of the next entry.
DirEntry = tuple[bytes, Node, Attr | None, int]


def entries(
    s: State,
    handle: DirHandle,
    start: int,
    resolve: Callable[[Node, bytes], tuple[Node, Attr] | None],
    resolve_cached: Callable[[Node, bytes], Node | None],
) -> Iterator[DirEntry]:
    """The entries of ``handle`` from offset ``start``: ``.`` (offset 0), ``..`` (1), then
    the snapshot's names, each resolved (a name gone since the snapshot is skipped).

    A child's lookup is counted only when the consumer asks for the entry after it: an
    entry the reply buffer could not take (the consumer stops) is not counted.
    """
    node = handle.node
    if start == 0:
        yield b".", node, None, 1
        start = 1
    if start == 1:
        yield b"..", node.parent or node, None, 2
        start = 2
    names = dir_names(s, handle)
    remember = s.table.remember
    for i in range(start - 2, len(names)):
        name = names[i]
        child = resolve_cached(node, name)
        attr: Attr | None = None
        if child is None:
            found = resolve(node, name)
            if found is None:
                continue
            child, attr = found
        yield name, child, attr, i + 3
        remember(child)
