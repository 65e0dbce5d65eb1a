"""Introspection: where an object comes from, the layer table, and the counters, answered
through read-only virtual xattrs so that any program can ask (``getfattr``) without a socket.

The protocol, shared with the ``unionfs inspect|layers|stats`` commands:

* ``user.unionfs.inspect`` on any object, or ``user.unionfs.inspect:<name>`` on its
  directory (which also works for deleted names, symlinks and devices) -- JSON;
* ``user.unionfs.layers``, ``user.unionfs.stats`` and ``user.unionfs.events`` -- JSON.

Setting any ``user.unionfs.*`` name through the mount is refused (:data:`PREFIX`). The
commands import this module for the names alone, so it imports the filesystem lazily.
"""

from __future__ import annotations

import errno
import json
import os
import stat
from typing import TYPE_CHECKING, Any

from unionfs import format
from unionfs.fs.nodes import UPPER, Node, err

if TYPE_CHECKING:
    from unionfs.fs.state import State
    from unionfs.layers import Layer

PREFIX = b"user.unionfs."
XATTR_INSPECT = b"user.unionfs.inspect"
XATTR_STATS = b"user.unionfs.stats"
XATTR_EVENTS = b"user.unionfs.events"
XATTR_LAYERS = b"user.unionfs.layers"
EVENTS_SHOWN = 200


def is_entry_name(name: bytes) -> bool:
    """True for a name a directory entry can have: one component, at most 255 bytes."""
    return (
        0 < len(name) <= 255
        and b"/" not in name
        and b"\0" not in name
        and name not in (b".", b"..")
    )


def virtual_xattr(s: State, node: Node, name: bytes) -> bytes | None:
    """The value of the virtual xattr ``name`` on ``node``; None when ``name`` is not one.

    EINVAL for ``user.unionfs.inspect:<name>`` with anything but one entry name: "a/b",
    ".." or "" would describe paths outside the directory, up to any path of the host.
    """
    if not name.startswith(PREFIX):
        return None
    if name == XATTR_INSPECT:
        return json.dumps(inspect(s, node)).encode()
    if name.startswith(XATTR_INSPECT + b":"):
        child = name[len(XATTR_INSPECT) + 1 :]
        if not is_entry_name(child):
            raise err(errno.EINVAL)
        return json.dumps(inspect(s, node, child)).encode()
    if name == XATTR_STATS:
        return json.dumps(s.stats.snapshot()).encode()
    if name == XATTR_EVENTS:
        return json.dumps(list(s.stats.events)[-EVENTS_SHOWN:]).encode()
    if name == XATTR_LAYERS:
        return json.dumps(layer_table(s)).encode()
    return None


def inspect(s: State, node: Node, child: bytes | None = None) -> dict[str, Any]:
    """Where an object comes from: serving layer, copy-up origin, shadowed copies below,
    and whiteouts or opaque directories hiding lower entries at its path.

    With ``child``, describes the name ``child`` inside directory ``node`` -- which also
    works for names that are whited out and for symlinks and devices (which cannot carry
    the ``user.*`` xattr this answer travels in).
    """
    if child is None:
        if node.parent is None:
            return _describe_root(s, node)
        parent, name = node.parent, node.name
    else:
        parent, name = node, child
    # Imported here: the commands read this module's names without the filesystem's.
    from unionfs.fs import lookup

    layers = s.stack.layers
    found = lookup.resolve(s, parent, name)
    base = parent.path().rstrip(b"/") + b"/" + name
    info: dict[str, Any] = {
        "path": base.decode(errors="replace"),
        "exists": found is not None,
        "layer": None,
        "type": None,
        "copied_up": False,
        "origin_layer": None,
        "merged_layers": [],
        "shadows": [],
        "hidden_by": [],
        "opaque": False,
    }
    top = -1
    if found is not None:
        obj, st = found
        top = obj.layer
        info["inode"] = obj.ino
        info["type"] = _type_name(st.st_mode)
        info["layer"] = _layer_info(layers[top])
        if obj.is_dir:
            info["merged_layers"] = [_layer_info(layers[i]) for i in obj.layers]
    for layer in parent.layers:
        if layer == top or (found is not None and found[0].is_dir and layer in found[0].layers):
            continue
        fd = s.table.dir_fd(parent, layer)
        kind = format.classify_at(fd, name)
        if kind is not None and kind.is_whiteout:
            info["hidden_by"].append({**_layer_info(layers[layer]), "marker": kind.value})
            if layer > top or found is None:
                break
            continue
        try:
            os.stat(name, dir_fd=fd, follow_symlinks=False)
        except FileNotFoundError:
            continue
        if layer > top:
            info["shadows"].append(_layer_info(layers[layer]))
    if found is not None and top == UPPER and s.stack.has_upper:
        pfd = s.table.dir_fd(parent, UPPER)
        if s.origins.read(pfd, name) is not None:
            info["copied_up"] = True
            if info["shadows"]:
                info["origin_layer"] = info["shadows"][0]
        if found[0].is_dir:
            info["opaque"] = format.is_opaque_dir(s.table.dir_fd(found[0], UPPER))
    elif found is not None and found[0].is_dir:
        info["opaque"] = format.is_opaque_dir(s.table.dir_fd(found[0], top))
    return info


def _describe_root(s: State, node: Node) -> dict[str, Any]:
    layers = s.stack.layers
    return {
        "path": "/",
        "exists": True,
        "inode": node.ino,
        "type": "directory",
        "layer": _layer_info(layers[node.layer]),
        "merged_layers": [_layer_info(layers[i]) for i in node.layers],
        "copied_up": False,
        "origin_layer": None,
        "shadows": [],
        "hidden_by": [],
        "opaque": False,
    }


def layer_table(s: State) -> list[dict[str, Any]]:
    """The mount's layers, top first: index, directory, and whether it is the upper."""
    return [_layer_info(layer) for layer in s.stack.layers]


def _layer_info(layer: Layer) -> dict[str, Any]:
    return {"index": layer.index, "dir": layer.path, "upper": layer.is_upper}


_TYPES = {
    stat.S_IFDIR: "directory",
    stat.S_IFREG: "file",
    stat.S_IFLNK: "symlink",
    stat.S_IFIFO: "fifo",
    stat.S_IFSOCK: "socket",
    stat.S_IFCHR: "char device",
    stat.S_IFBLK: "block device",
}


def _type_name(mode: int) -> str:
    return _TYPES.get(stat.S_IFMT(mode), "unknown")
