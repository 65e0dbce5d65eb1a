"""Name resolution (the kernel's namei.c part): which object a name is, and its attributes.

Resolution rule (Linux overlayfs): a name is looked up top-down through the layers in which
its parent is a merged directory; the first layer that has it wins; a whiteout ends the
search; a non-directory hides everything below it; directories merge down to the first
opaque one. All of it is answered from the parent's index (:mod:`unionfs.fs.listing`); the
opaque cut of a child directory's chain is made here, the first time the child is resolved.

Every layer object is reached as ``name`` relative to a directory descriptor of its parent in
that layer, with no-follow semantics, so nothing inside a layer can point the daemon at a
file outside the layer roots.
"""

from __future__ import annotations

import errno
import os
import stat

from unionfs import fdops, format, parallel
from unionfs.fdops import open_dir_at
from unionfs.fs.listing import Listing, index_of
from unionfs.fs.nodes import UPPER, Node
from unionfs.fs.state import Attr, State, err

# A directory chain cut at its first opaque layer, the directories opened to check it and
# the lower listings read on the way (see truncate_at_opaque).
Chain = tuple[tuple[int, ...], dict[int, int], dict[int, Listing]]


def _probe_dir(s: State, layer: int, fd: int) -> tuple[bool, Listing | None]:
    """Whether ``fd`` (a directory in ``layer``) is opaque, with its listing if read.

    Lower listings are kept for the directory's index (lowers never change); the upper
    copy is only probed for the OCI marker, as it can change before the index is built.
    """
    if layer == UPPER and s.stack.has_upper:
        return format.is_opaque_dir(fd), None
    return format.check_opaque(fd)


def truncate_at_opaque(s: State, parent: Node, name: bytes, layers: tuple[int, ...]) -> Chain:
    """Cut a directory chain after its first opaque layer (the last one is never checked).

    Returns the chain, the directories opened to check it and the listings read, by
    layer: the caller hands them to the child's node, so building its index neither
    opens nor reads them again.
    """
    if len(layers) > parallel.MIN_ITEMS:
        return _truncate_at_opaque_parallel(s, parent, name, layers)
    opened: dict[int, int] = {}
    listings: dict[int, Listing] = {}
    try:
        for i, layer in enumerate(layers[:-1]):
            fd = opened[layer] = open_dir_at(s.table.dir_fd(parent, layer), name)
            opaque, listing = _probe_dir(s, layer, fd)
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
    s: State, parent: Node, name: bytes, layers: tuple[int, ...]
) -> Chain:
    """:func:`truncate_at_opaque` for deep chains: every layer's directory is opened and
    checked at once (see :mod:`unionfs.parallel`), and those below the first opaque one are
    closed again."""
    probes = [(layer, s.table.dir_fd(parent, layer)) for layer in layers[:-1]]

    def probe(item: tuple[int, int]) -> tuple[int, bool, Listing | None] | OSError:
        layer, parent_fd = item
        try:
            fd = open_dir_at(parent_fd, name)
        except OSError as exc:
            return exc
        try:
            return (fd, *_probe_dir(s, layer, fd))
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


def resolve(s: State, parent: Node, name: bytes) -> tuple[Node, os.stat_result] | None:
    """Find ``name`` in directory ``parent``; None when it is not in the merged view.

    Returns the node (the live one if the object is already known, with its location
    refreshed) and the stat of its topmost layer object. Does not count a lookup; counts a
    lookup served by the winning layer in the stats. ENAMETOOLONG beyond 255 bytes.
    """
    index = parent.index or index_of(s, parent)
    if format.is_marker_name(name):
        return None
    if len(name) > 255:
        # The kernel's FUSE module lets names up to 1024 bytes through; the overlay's
        # layers refuse them, and so does the kernel's overlay.
        raise err(errno.ENAMETOOLONG)
    entry = index.get(name)
    if entry is None:
        return None
    is_dir, layers, checked = entry
    opened: dict[int, int] | None = None
    listings: dict[int, Listing] | None = None
    if not checked:
        layers, opened, listings = truncate_at_opaque(s, parent, name, layers)
        index.set(name, (is_dir, layers, True))
        found_hook = s.merged_dir_found
        merged_with_upper = len(layers) > 1 and layers[0] == UPPER and s.stack.has_upper
        if is_dir and merged_with_upper and found_hook is not None:
            found_hook(parent, name, layers, opened)
    top = layers[0]
    table = s.table
    pfd = table.dir_fd(parent, top)
    try:
        st = os.stat(name, dir_fd=pfd, follow_symlinks=False)
    except FileNotFoundError:
        for fd in (opened or {}).values():
            os.close(fd)
        index.discard(name)
        return None
    origin = None
    upper = top == UPPER and s.stack.has_upper
    if upper:
        origin = s.origins.read(pfd, name, parent, st, layers)
    node = table.node_for(parent, name, is_dir, layers, st, origin)
    if opened:
        for layer, fd in opened.items():
            table.adopt(node, layer, fd)
    if listings and node.index is None:
        node.listings = listings
    if not upper and (is_dir or st.st_nlink == 1):
        node.immutable = True
        index.known[name] = node
    else:
        # An upper object changes; so may a lower file with more links, one of which can be
        # an upper name of the same inode (layer stores made with `cp -al`).
        table.attrs_changed(node)
    s.stats.lookups_per_layer[top] += 1
    return node, st


def resolve_attr(s: State, parent: Node, name: bytes) -> tuple[Node, Attr] | None:
    """:func:`resolve`, with the attributes to show instead of the layer stat."""
    found = resolve(s, parent, name)
    if found is None:
        return None
    node, st = found
    return node, attr_of(node, st, s)


def resolve_cached(s: State, parent: Node, name: bytes) -> Node | None:
    """The node for ``name`` if it is a known lower object, whose attributes never change.

    A dict hit that skips the ``fstatat`` of :func:`resolve`; None means "resolve it".
    """
    index = parent.index
    if index is None:
        return None
    node = index.known.get(name)
    if (
        node is None
        or not node.immutable
        or node.parent is not parent
        or node.name != name
        or node.removed
    ):
        return None
    live = s.table.nodes.get(node.ino)
    if live is not None and live is not node:
        return None
    s.stats.lookups_per_layer[node.layers[0]] += 1
    return node


def lookup(s: State, parent_ino: int, name: bytes) -> tuple[Node, Attr | None] | None:
    """Resolve and count one lookup; None for a name that is not there (cacheable).

    The attributes are None when the node is unchanged since it was last shown (an
    immutable lower object), so what was shown then may be reused.
    """
    parent = s.node(parent_ino)
    cached = resolve_cached(s, parent, name)
    if cached is not None:
        return s.table.remember(cached), None
    if name == b".":
        s.table.remember(parent)
        return parent, attr(s, parent)
    if name == b"..":
        target = parent.parent or parent
        s.table.remember(target)
        return target, attr(s, target)
    found = resolve(s, parent, name)
    if found is None:
        s.stats.negative_lookups += 1
        return None
    node, st = found
    node = s.table.remember(node)
    return node, attr_of(node, st, s)


def child(s: State, parent: Node, name: bytes) -> tuple[Node, os.stat_result]:
    """:func:`resolve` for an operation on an existing name: ENOENT when it is not there."""
    found = resolve(s, parent, name)
    if found is None:
        raise err(errno.ENOENT)
    return found


def lower_positive(s: State, parent: Node, name: bytes) -> bool:
    """Whether ``name`` is visible in ``parent``'s lowers (so removing it needs a whiteout)."""
    for layer in parent.layers:
        if layer == UPPER:
            continue
        found = format.classify_at(s.table.dir_fd(parent, layer), name)
        if found is not None:
            return not found.is_whiteout
    return False


# -- attributes ------------------------------------------------------------------------------


def attr_of(node: Node, st: os.stat_result, s: State | None = None) -> Attr:
    """The attributes shown for ``node`` whose layer object has the stat ``st``; with the
    mount's state ``s``, an owner and mode kept in an xattr (:mod:`unionfs.fs.override`)
    replace the object's."""
    if s is not None and s.overrides is not None:
        try:
            target = s.table.xattr_target(node)
        except OSError:
            target = None
        if target is not None:
            st = s.overrides.shown(node.layer, target, st)
    nlink = st.st_nlink
    if node.is_dir and len(node.layers) > 1:
        # The kernel reports 1 for merged directories rather than counting subdirectories.
        nlink = 1
    return Attr(node.ino, st, nlink, node.st_ino)


def _pinned_shown(s: State, node: Node) -> os.stat_result:
    """The stat of the object ``node`` pinned when its name went, with the owner and mode
    of its own override xattr (:mod:`unionfs.fs.override`), never of whatever holds the name
    now. Only a regular file or a directory carries one; it is reopened to read it."""
    st = os.fstat(node.pinned)
    ov = s.overrides
    if ov is None or ov.read[node.layer] is None:
        return st
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
        return st
    try:
        fd = fdops.reopen(node.pinned, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return st
    try:
        return ov.shown(node.layer, fd, st)
    finally:
        os.close(fd)


def attr(s: State, node: Node) -> Attr:
    """The attributes of ``node`` now (ESTALE when its object is gone)."""
    try:
        st: os.stat_result | None = s.table.lstat_in(node, node.layer)
    except FileNotFoundError:
        st = None
    if st is None or (node.parent is not None and (st.st_dev, st.st_ino) != node.obj):
        # The name now holds nothing or another object: never report that for this node.
        # A node whose last name went while the kernel held it answers from its object.
        if node.pinned < 0:
            raise err(errno.ESTALE)
        return attr_of(node, _pinned_shown(s, node))
    return attr_of(node, st, s)


def readlink(s: State, node: Node) -> bytes:
    """The target of the symlink ``node`` (EINVAL for the root)."""
    if node.parent is None:
        raise err(errno.EINVAL)
    return os.readlink(node.name, dir_fd=s.table.parent_fd(node, node.layer))
