"""Checks that keep a hostile layer tarball inside the directory it is unpacked into.

Member names are turned into component tuples (:func:`member_path`) that can only name
something below the layer root: absolute names, ``..`` components, NUL bytes and marker names
used as directories are refused. Parents are then walked one component at a time with
``openat(O_DIRECTORY | O_NOFOLLOW)`` (:func:`open_parent`), so a symlink or a file met on the
way is an error, never something followed.
"""

from __future__ import annotations

import errno
import os

from unionfs import format
from unionfs.errors import UnionfsError
from unionfs.layertools.layerscan import LayerPath, display, open_dir, valid_whiteout_target


class UnsafeMember(UnionfsError):
    """A tar member that would escape the layer or that the layer format cannot hold."""

    def __init__(self, name: str, reason: str) -> None:
        super().__init__(f"refusing layer member {name!r}: {reason}")


OPAQUE = "opaque"
WHITEOUT = "whiteout"


def member_path(name: str, *, what: str = "path") -> LayerPath:
    """The components of the member name ``name``, relative to the layer root.

    ``.`` and empty components are dropped (``./a//b`` is ``a/b``); ``()`` is the root itself.
    Raises :class:`UnsafeMember` for absolute names, ``..`` components, NUL bytes, and OCI
    marker names (``.wh.*``) anywhere but the last component.
    """
    raw = os.fsencode(name)
    if b"\0" in raw:
        raise UnsafeMember(name, f"NUL byte in the {what}")
    if raw.startswith(b"/"):
        raise UnsafeMember(name, f"absolute {what}")
    parts = tuple(raw.split(b"/"))
    # The membership tests run at C speed: a path thousands of levels deep stays cheap.
    if b"" in parts or b"." in parts:
        parts = tuple(part for part in parts if part not in (b"", b"."))
    if b".." in parts:
        raise UnsafeMember(name, f"'..' component in the {what}")
    if format.OCI_WHITEOUT_PREFIX in raw:
        for part in parts[:-1]:
            if format.is_marker_name(part):
                raise UnsafeMember(
                    name, f"whiteout marker {os.fsdecode(part)!r} used as a directory"
                )
    return parts


def marker_kind(path: LayerPath, name: str) -> tuple[str, bytes] | None:
    """``(OPAQUE, b"")`` or ``(WHITEOUT, target)`` for marker members, None for others.

    Raises :class:`UnsafeMember` for names that start with ``.wh.`` but are no valid marker:
    ``.wh.``, ``.wh..``, ``.wh...``, ``.wh..wh.<x>`` (AUFS metadata) and the like.
    """
    if not path or not format.is_marker_name(path[-1]):
        return None
    if path[-1] == format.OCI_OPAQUE_NAME:
        return OPAQUE, b""
    target = valid_whiteout_target(path[-1])
    if target is None:
        raise UnsafeMember(name, "not a valid whiteout marker name")
    return WHITEOUT, target


def open_parent(root_fd: int, path: LayerPath, name: str, *, create: bool, start: int = 0) -> int:
    """A new descriptor for the directory holding ``path`` (``path`` must not be the root).

    ``root_fd`` is the directory ``path[:start]`` (the layer root by default): the walk
    begins there. Missing directories are created with mode 0755 when ``create`` is set,
    else they are an error. A symlink, a file or anything but a directory on the way raises
    :class:`UnsafeMember`; nothing is ever followed.
    """
    fd = os.dup(root_fd)
    try:
        for depth in range(start + 1, len(path)):
            part = path[depth - 1]
            try:
                child = open_dir(part, fd)
            except FileNotFoundError:
                if not create:
                    raise UnsafeMember(name, f"{display(path[:depth])} does not exist") from None
                os.mkdir(part, 0o755, dir_fd=fd)
                child = open_dir(part, fd)
                os.fchmod(child, 0o755)
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                    raise UnsafeMember(
                        name, f"{display(path[:depth])} is a symlink or not a directory"
                    ) from None
                raise
            os.close(fd)
            fd = child
    except BaseException:
        os.close(fd)
        raise
    return fd
