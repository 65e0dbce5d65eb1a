"""``unionfs diff``: the change list of an upper layer against its lowers, like ``docker diff``.

The change list compares two views: the merged view of the lowers alone (the "before") and the
merged view with the upper on top (the "after"). Rules, following Docker's overlay driver:

* an upper entry whose path exists in the lowers' view is ``C`` (changed), else ``A`` (added);
* a whiteout is ``D`` when its name exists in the lowers' view (Docker reports every whiteout;
  a whiteout that hides nothing changes nothing, so it is left out);
* an opaque directory reports ``D`` for each name of the lowers' directory it hides (not for
  their descendants: deleting a directory is one ``D`` line, as in Docker), and itself as ``C``
  when the path exists below, ``A`` when it does not;
* a directory that exists below is ``C`` when its mode, owner or mtime differ from the lower
  one, and always when something below it changed (Docker reports changed parents);
  a directory that was copied up without any change is not reported.

Modes and owners are compared as a mount shows them: a layer that keeps them in an override
xattr (``xattr_permissions``, containers-storage) is read through it, each layer by the name
its own root carries (:class:`unionfs.layertools.layerscan.LayerOverrides`), so a directory
copied up unchanged by a mount with the option is not reported, and one whose chmod or chown
went to the xattr is.

Without lowers the "before" view is unknown: every upper entry is ``A`` and every whiteout
``D``. Output is sorted by path components, so a directory comes right before its contents.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from unionfs import fdops
from unionfs.errors import UnionfsError
from unionfs.layertools.layerscan import (
    LayerDir,
    LayerOverrides,
    LayerPath,
    display,
    is_dir,
    open_dir,
    opened_dir,
    scan_dir,
)

ADDED = "A"
CHANGED = "C"
DELETED = "D"


@dataclass(frozen=True, order=True)
class Change:
    """One line of the change list: ``kind`` is ``A``, ``C`` or ``D``."""

    path: LayerPath
    kind: str

    def __str__(self) -> str:
        return f"{self.kind} {display(self.path)}"


class LowerView:
    """The merged, read-only view of a stack of lower layers (top first), by path.

    Resolution follows the overlayfs rules: the topmost layer holding a name wins, a whiteout
    ends the search, a non-directory ends a merge, an opaque directory stops it. Every step
    is an ``openat`` relative to a directory descriptor, never following symlinks. Stats are
    as a mount shows them (each layer's override xattrs applied).
    """

    def __init__(self, lowers: Sequence[Path]) -> None:
        self._roots: list[int] = []
        self._overrides: list[LayerOverrides] = []
        # Per merged path: (layer index, descriptor) of each layer's directory, top first.
        self._dirs: dict[LayerPath, list[tuple[int, int]]] = {}
        try:
            for lower in lowers:
                self._roots.append(open_dir(os.fsencode(lower)))
                self._overrides.append(LayerOverrides.of_root(self._roots[-1]))
        except OSError as exc:
            self.close()
            raise UnionfsError(f"cannot open lower layer {exc.filename!r}: {exc.strerror}") from exc
        self.known = bool(lowers)

    def close(self) -> None:
        """Close every descriptor this view holds."""
        for dirs in self._dirs.values():
            for _layer, fd in dirs:
                if fd not in self._roots:
                    os.close(fd)
        for fd in self._roots:
            os.close(fd)
        self._dirs.clear()
        self._roots.clear()

    def __enter__(self) -> LowerView:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _layer_dirs(self, path: LayerPath) -> list[tuple[int, int]]:
        """Layer index and descriptor of the layers' directories merged at ``path``, top first.

        Built one level at a time from the deepest ancestor already known (no recursion, so
        any depth works); every level is cached until :meth:`release`.
        """
        if path in self._dirs:
            return self._dirs[path]
        depth = len(path)
        while depth > 0 and path[:depth] not in self._dirs:
            depth -= 1
        if depth == 0 and () not in self._dirs:
            merged: list[tuple[int, int]] = []
            for layer, fd in enumerate(self._roots):
                merged.append((layer, fd))
                if scan_dir(fd).opaque:
                    break
            self._dirs[()] = merged
        for level in range(depth + 1, len(path) + 1):
            self._dirs[path[:level]] = self._merge_child(
                self._dirs[path[: level - 1]], path[level - 1]
            )
        return self._dirs[path]

    @staticmethod
    def _merge_child(parents: list[tuple[int, int]], name: bytes) -> list[tuple[int, int]]:
        """The merged directories ``name`` inside the merged directories ``parents``."""
        merged = []
        for index, parent_fd in parents:
            layer = scan_dir(parent_fd)
            st = layer.entries.get(name)
            if st is None:
                if name in layer.whiteouts:
                    break
                continue
            if not is_dir(st):
                break
            fd = open_dir(name, parent_fd)
            merged.append((index, fd))
            if scan_dir(fd).opaque or name in layer.whiteouts:
                break
        return merged

    def release(self, path: LayerPath) -> None:
        """Close the descriptors cached for ``path`` (not the roots): the walk is past it.

        Keeps the number of open descriptors to the depth of the walk, not the size of the
        tree.
        """
        if not path:
            return
        for _layer, fd in self._dirs.pop(path, []):
            if fd not in self._roots:
                os.close(fd)

    def lookup(self, path: LayerPath) -> os.stat_result | None:
        """The ``lstat`` of ``path`` in the lowers' merged view, or None when it is absent."""
        if not path:
            if not self._roots:
                return None
            return self._overrides[0].shown(self._roots[0], os.fstat(self._roots[0]), ())
        return self.listdir(path[:-1]).get(path[-1])

    def listdir(self, path: LayerPath) -> dict[bytes, os.stat_result]:
        """The merged entries of directory ``path`` (empty when it is not a directory)."""
        merged: dict[bytes, os.stat_result] = {}
        hidden: set[bytes] = set()
        for index, fd in self._layer_dirs(path):
            layer = scan_dir(fd)
            for name, st in layer.entries.items():
                if name not in merged and name not in hidden:
                    target = fdops.at_path(fd, name)
                    merged[name] = self._overrides[index].shown(target, st, path + (name,))
            hidden |= layer.whiteouts
        return merged


def _dir_changed(upper: os.stat_result, lower: os.stat_result) -> bool:
    return (
        stat.S_IMODE(upper.st_mode) != stat.S_IMODE(lower.st_mode)
        or upper.st_uid != lower.st_uid
        or upper.st_gid != lower.st_gid
        or upper.st_mtime_ns != lower.st_mtime_ns
    )


@dataclass
class _Pending:
    """A directory of the upper being walked, with the subdirectories still to visit."""

    fd: int
    path: LayerPath
    # (name, the parent also whites it out, the path exists in the lowers)
    subdirs: list[tuple[bytes, bool, bool]]


def _shown_entries(upper_fd: int, path: LayerPath, overrides: LayerOverrides) -> LayerDir:
    """:func:`scan_dir` of the upper directory ``path``, its stats as a mount shows them."""
    layer = scan_dir(upper_fd)
    if overrides.name is not None:
        for name, st in layer.entries.items():
            layer.entries[name] = overrides.shown(fdops.at_path(upper_fd, name), st, path + (name,))
    return layer


def _record(
    upper_fd: int,
    path: LayerPath,
    lowers: LowerView,
    out: dict[LayerPath, str],
    whited_out: bool,
    overrides: LayerOverrides,
) -> tuple[bool, list[tuple[bytes, bool, bool]]]:
    """Record the changes of the entries of directory ``path`` in ``out``.

    Returns whether the directory is opaque, and its subdirectories to walk. ``whited_out``
    says the parent also holds a whiteout for this directory (OCI markers kept beside a new
    directory of the same name): it hides the lower directory like opaque does. ``overrides``
    are the upper's.
    """
    layer = _shown_entries(upper_fd, path, overrides)
    layer.opaque = layer.opaque or whited_out
    below = lowers.listdir(path) if lowers.known else {}
    for name in layer.whiteouts:
        if name not in layer.entries and (name in below or not lowers.known):
            out[path + (name,)] = DELETED
    if layer.opaque:
        for name in below:
            if name not in layer.entries:
                out[path + (name,)] = DELETED
    subdirs = []
    for name, st in layer.entries.items():
        child = path + (name,)
        lower_st = below.get(name)
        if lower_st is None:
            out[child] = ADDED
        elif not (is_dir(st) and is_dir(lower_st)) or _dir_changed(st, lower_st):
            out[child] = CHANGED
        if is_dir(st):
            subdirs.append((name, name in layer.whiteouts, lower_st is not None))
    return layer.opaque, subdirs


def _walk(upper_fd: int, lowers: LowerView, out: dict[LayerPath, str]) -> None:
    """Record every change of the upper open as ``upper_fd`` in ``out``.

    Iterative (an explicit stack, one descriptor per level), so any depth works.
    """
    overrides = LayerOverrides.of_root(upper_fd)
    stack = [_Pending(upper_fd, (), _record(upper_fd, (), lowers, out, False, overrides)[1])]
    try:
        while stack:
            top = stack[-1]
            if top.subdirs:
                name, whited_out, exists_below = top.subdirs.pop()
                child = top.path + (name,)
                child_fd = open_dir(name, top.fd)
                stack.append(_Pending(child_fd, child, []))  # pushed first: always closed
                opaque, stack[-1].subdirs = _record(
                    child_fd, child, lowers, out, whited_out, overrides
                )
                if opaque and exists_below:
                    out[child] = CHANGED
                continue
            # Every subdirectory of this one is done: it is released, with its lowers.
            stack.pop()
            if top.path:
                os.close(top.fd)
                lowers.release(top.path)
    finally:
        for pending in stack:
            if pending.path:
                os.close(pending.fd)


def compute_changes(upper: Path, lowers: Sequence[Path] = ()) -> list[Change]:
    """The change list of ``upper`` over ``lowers`` (top first), sorted by path components.

    Raises :class:`UnionfsError` when a layer cannot be opened or read.
    """
    out: dict[LayerPath, str] = {}
    try:
        with LowerView(lowers) as view, opened_dir(os.fsencode(upper)) as upper_fd:
            _walk(upper_fd, view, out)
    except UnionfsError:
        raise
    except OSError as exc:
        raise UnionfsError(f"cannot read layer: {exc}") from exc
    for path in list(out):
        # Up to the first ancestor already listed: its own ancestors are (or will be) listed
        # when it is handled, which keeps this linear in the depth, not quadratic.
        for depth in range(len(path) - 1, 0, -1):
            if path[:depth] in out:
                break
            out[path[:depth]] = CHANGED
    # b"\0" cannot occur in a name, so the joined form sorts exactly like the components.
    return [Change(path, kind) for path, kind in sorted(out.items(), key=_sort_key)]


def _sort_key(item: tuple[LayerPath, str]) -> bytes:
    return b"\0".join(item[0])
