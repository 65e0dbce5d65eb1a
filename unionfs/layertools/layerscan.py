"""How one directory of a layer reads: its entries, its whiteouts, and whether it is opaque.

Every form listed in :mod:`unionfs.format` is recognised: char 0/0 whiteouts, ``.wh.<name>``
files, xattr whiteouts inside a directory whose ``overlay.opaque`` is ``"x"``, the
``overlay.opaque="y"`` xattr and the ``.wh..wh..opq`` entry. Names are bytes throughout and
every lookup is relative to a directory file descriptor without following symlinks.
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from unionfs import fdops, format
from unionfs.fs import override

log = logging.getLogger(__name__)

DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC

# Path of an entry inside a layer: its components from the layer root; () is the root.
LayerPath = tuple[bytes, ...]


def display(path: LayerPath) -> str:
    """``path`` as the absolute, human-readable form used in messages and change lists."""
    return "/" + os.fsdecode(b"/".join(path))


@dataclass
class LayerDir:
    """The reading of one directory of one layer.

    ``entries`` maps each visible name (not a marker, not a whiteout) to its ``lstat``;
    ``whiteouts`` holds the names this directory hides in the layers below; ``opaque`` says
    whether the same directory in the layers below is hidden as a whole.
    """

    entries: dict[bytes, os.stat_result] = field(default_factory=dict)
    whiteouts: set[bytes] = field(default_factory=set)
    opaque: bool = False


def open_dir(name: bytes, dir_fd: int | None = None) -> int:
    """Open the directory ``name`` (relative to ``dir_fd``) without following a symlink."""
    return os.open(name, DIR_FLAGS, dir_fd=dir_fd)


@contextmanager
def opened_dir(name: bytes, dir_fd: int | None = None) -> Iterator[int]:
    """:func:`open_dir` as a context manager that closes the descriptor."""
    fd = open_dir(name, dir_fd)
    try:
        yield fd
    finally:
        os.close(fd)


def list_names(dir_fd: int) -> list[bytes]:
    """The names in the directory open as ``dir_fd``, as bytes, sorted."""
    return sorted(os.fsencode(name) for name in os.listdir(dir_fd))


def scan_dir(dir_fd: int) -> LayerDir:
    """Read the directory open as ``dir_fd`` as one layer sees it (see :class:`LayerDir`).

    The markers are read exactly as the mount reads them (:func:`unionfs.format.scan_layer_dir`,
    the one reader), silently: a ``.wh.<name>`` hides ``<name>``, and the names that hide
    nothing (``.wh.``, ``.wh..``, ``.wh...``) are neither whiteouts nor entries. A marker
    whose target is itself a marker name (``.wh..wh.plnk``, AUFS metadata) hides, for the
    mount, a name that no layer can show: it is no change and is left out of ``whiteouts``.
    """
    result = LayerDir()
    opaque_value = format.opaque_value(dir_fd)
    result.opaque = opaque_value == format.OPAQUE_YES
    names: list[bytes] = []
    for name, _is_dir, is_marker in format.scan_layer_dir(dir_fd, opaque_value):
        if not is_marker:
            names.append(name)
        elif name == format.OCI_OPAQUE_NAME:
            result.opaque = True
        elif not format.is_marker_name(name):
            result.whiteouts.add(name)
    for name in sorted(names):
        result.entries[name] = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    return result


@dataclass(frozen=True)
class LayerOverrides:
    """The owner and mode one layer records in an override xattr (:mod:`unionfs.fs.override`),
    read as a mount without ``xattr_permissions`` reads them once the layer is a lower.

    ``name`` is the one name the layer is read by (:func:`unionfs.fs.override.layer_name`: the
    first of ``security.fuseoverlayfs``, ``user.containers``, ``user.fuseoverlayfs`` that its
    root carries); values under the other names are ignored, as the mount ignores them.
    """

    name: bytes | None

    @classmethod
    def of_root(cls, root_fd: int) -> LayerOverrides:
        """The overrides of the layer whose root directory is open as ``root_fd``."""
        return cls(override.layer_name(root_fd))

    def shown(
        self, target: fdops.Target, st: os.stat_result, where: LayerPath, *, warn: bool = True
    ) -> os.stat_result:
        """``st`` of the object ``target`` (at ``where``) as a mount shows it: the recorded
        owner, group and mode of a regular file or a directory, and the device, fifo or
        socket a regular file stands for. A value the mount cannot parse is ignored as the
        mount ignores it (the on-disk owner and mode stay), with a one-line warning unless
        ``warn`` is false (the object was already reported)."""
        if self.name is None or not override.carries(st.st_mode):
            return st
        value = override.get_value(target, self.name)
        if value is None:
            return st
        rec = override.parse(value)
        if rec is None:
            if not warn:
                return st
            log.warning(
                "%s: ignoring the malformed %s value %r (a mount shows the on-disk owner and "
                "mode too)",
                display(where),
                os.fsdecode(self.name),
                value,
            )
            return st
        return override.apply(st, rec)


def valid_whiteout_target(name: bytes) -> bytes | None:
    """The name hidden by the OCI whiteout ``name`` in a tarball being imported, or None
    when the importer refuses it.

    Stricter than the mount (:func:`unionfs.format.oci_target`), on purpose: a layer being
    written refuses a target that is itself a marker (``.wh..wh.foo``, AUFS metadata),
    which would hide nothing any layer can show.
    """
    target = format.oci_target(name)
    if target is None or format.is_marker_name(target) or b"/" in target or b"\0" in target:
        return None
    return target


def is_dir(st: os.stat_result) -> bool:
    """True when ``st`` describes a directory."""
    return stat.S_ISDIR(st.st_mode)


def walk_tree(root_fd: int) -> Iterator[tuple[int, bytes, os.stat_result]]:
    """Every entry below the directory ``root_fd`` as ``(parent_fd, name, lstat)``, depth first.

    Iterative, so a tree of any depth is fine (one descriptor is open per level below the
    root); symlinks are never followed and a directory is entered through ``O_NOFOLLOW``.
    ``parent_fd`` is valid until the next item is asked for. A directory that vanishes or
    cannot be opened meanwhile is skipped.
    """
    stack: list[tuple[int, list[bytes]]] = [(root_fd, list_names(root_fd))]
    try:
        while stack:
            fd, names = stack[-1]
            if not names:
                stack.pop()
                if fd != root_fd:
                    os.close(fd)
                continue
            name = names.pop()
            try:
                st = os.stat(name, dir_fd=fd, follow_symlinks=False)
            except FileNotFoundError:
                continue
            yield fd, name, st
            if is_dir(st):
                try:
                    child = open_dir(name, fd)
                except OSError:
                    continue
                stack.append((child, []))  # pushed first: the finally closes it if listing fails
                stack[-1] = (child, list_names(child))
    finally:
        for fd, _names in stack:
            if fd != root_fd:
                os.close(fd)
