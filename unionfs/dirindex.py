"""Merged directory index: which layers hold which names, built once per directory.

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

import os
import stat
from collections.abc import Iterator
from typing import Any

from unionfs import whiteout
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


Listing = list[tuple[bytes, bool, bool]]


def scan_layer_dir(
    fd: int, opaque: bytes | None | bool = False
) -> Iterator[tuple[bytes, bool, bool]]:
    """Yield ``(name, is_dir, is_whiteout_or_marker)`` for the directory open as ``fd``.

    Whiteouts in every form are reported as ``(hidden_name, False, True)``; an OCI opaque
    marker is reported as ``(OCI_OPAQUE_NAME, False, True)``; other ``.wh.`` names are
    dropped. ``opaque`` is the directory's ``overlay.opaque`` value if the caller has read
    it already. ``os.scandir`` reads ``fd`` through a duplicate of its own (which shares the
    offset: hence the rewind) and leaves ``fd`` open.
    """
    if opaque is False:
        opaque = whiteout.opaque_value(fd)
    xwhiteouts = opaque == whiteout.OPAQUE_XWHITEOUTS
    os.lseek(fd, 0, os.SEEK_SET)
    with os.scandir(fd) as it:
        for entry in it:
            name = os.fsencode(entry.name)
            if name.startswith(whiteout.OCI_WHITEOUT_PREFIX):
                if name == whiteout.OCI_OPAQUE_NAME:
                    yield name, False, True
                    continue
                target = whiteout.oci_target(name)
                if target is not None:
                    yield target, False, True
                continue
            if entry.is_dir(follow_symlinks=False):
                yield name, True, False
                continue
            if entry.is_file(follow_symlinks=False):
                if xwhiteouts:
                    st = entry.stat(follow_symlinks=False)
                    if whiteout.is_xattr_whiteout(fd, name, st):
                        yield name, False, True
                        continue
                yield name, False, False
                continue
            if not entry.is_symlink():
                st = entry.stat(follow_symlinks=False)
                if stat.S_ISCHR(st.st_mode) and whiteout.is_chardev_whiteout(st):
                    yield name, False, True
                    continue
            yield name, False, False


def classify_at(dir_fd: int, name: bytes, detail: bool = False) -> str | None:
    """What one layer directory holds at ``name``: None, "dir", "other", or a whiteout.

    Whiteouts in every form count (char 0/0, ``.wh.<name>``, and the xattr form in a
    directory marked ``overlay.opaque="x"``). With ``detail`` the whiteout kind is named, e.g.
    ``"whiteout (char 0/0)"``; otherwise it is just ``"whiteout"``.
    """
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        st = None
    if st is not None:
        if stat.S_ISDIR(st.st_mode):
            return "dir"
        if whiteout.is_chardev_whiteout(st):
            return "whiteout (char 0/0)" if detail else "whiteout"
        if (
            stat.S_ISREG(st.st_mode)
            and st.st_size == 0
            and whiteout.opaque_value(dir_fd) == whiteout.OPAQUE_XWHITEOUTS
            and whiteout.is_xattr_whiteout(dir_fd, name, st)
        ):
            return "whiteout (xattr)" if detail else "whiteout"
        return "other"
    if not oci_marker_exists(dir_fd, name):
        return None
    return "whiteout (.wh.)" if detail else "whiteout"


def oci_marker_exists(dir_fd: int, name: bytes) -> bool:
    """Whether the layer directory ``dir_fd`` holds a ``.wh.<name>`` marker.

    A name of more than 251 bytes can have no marker (it would exceed NAME_MAX): such a
    name must still work everywhere, so the probe answers "no" instead of ENAMETOOLONG.
    """
    marker = whiteout.OCI_WHITEOUT_PREFIX + name
    if len(marker) > 255:
        return False
    try:
        os.stat(marker, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return True


def _listing(fd: int) -> Listing:
    return list(scan_layer_dir(fd))


def check_opaque(fd: int) -> tuple[bool, Listing | None]:
    """Whether the layer directory open as ``fd`` is opaque, and its listing if read.

    The ``overlay.opaque`` xattr answers without reading the directory. Otherwise the
    directory is listed to look for an OCI ``.wh..wh..opq`` marker: that costs no more than
    probing the marker's name (after the caches are dropped, a negative lookup reads the
    directory too), and the listing serves the directory's index.
    """
    value = whiteout.opaque_value(fd)
    if value == whiteout.OPAQUE_YES:
        return True, None
    listing = list(scan_layer_dir(fd, value))
    opaque = any(marker and name == whiteout.OCI_OPAQUE_NAME for name, _, marker in listing)
    return opaque, listing


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
                if name != whiteout.OCI_OPAQUE_NAME:
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
