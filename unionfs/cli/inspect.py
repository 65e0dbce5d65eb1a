"""``unionfs inspect``, ``unionfs layers`` and ``unionfs stats``: copy-on-write made visible.

All three ask the running daemon through read-only virtual xattrs on the mount, so any
program can get the same answers without a socket:

* ``user.unionfs.inspect`` on an object, or ``user.unionfs.inspect:<name>`` on its directory
  (works for deleted names, symlinks and devices too) -- JSON;
* ``user.unionfs.layers`` and ``user.unionfs.stats`` on the mount root -- JSON;
* ``user.unionfs.events`` on the mount root -- the latest copy-up and whiteout events.
"""

from __future__ import annotations

import errno
import json
import os
import stat
import sys
import time
from typing import Any

from unionfs.cli.args import ArgumentParser
from unionfs.errors import UnionfsError, UsageError
from unionfs.fs.introspect import XATTR_EVENTS, XATTR_INSPECT, XATTR_LAYERS, XATTR_STATS
from unionfs.layertools.layerscan import open_dir, walk_tree


def _xattr_json(path: str | bytes, name: bytes) -> Any:
    try:
        raw = os.getxattr(path, name, follow_symlinks=False)
    except OSError as exc:
        if exc.errno in (errno.ENODATA, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM):
            raise UnionfsError(f"{os.fsdecode(path)} is not inside a unionfs mount") from None
        raise UnionfsError(f"{os.fsdecode(path)}: {exc.strerror}") from None
    return json.loads(raw)


def inspect_path(path: str) -> dict[str, Any]:
    """Ask the daemon about ``path`` (which may be deleted, a symlink or a device)."""
    parent, name = os.path.split(os.path.abspath(path))
    if not name:
        return dict(_xattr_json(path, XATTR_INSPECT))
    if not os.path.isdir(parent):
        raise UnionfsError(f"{parent} is not a directory")
    return dict(_xattr_json(parent, XATTR_INSPECT + b":" + os.fsencode(name)))


def _fmt_layer(layer: dict[str, Any] | None) -> str:
    if not layer:
        return "-"
    kind = "upper" if layer["upper"] else "lower"
    return f"layer {layer['index']} ({kind}) {layer['dir']}"


def _print_inspect(path: str, info: dict[str, Any]) -> None:
    print(path)
    if not info["exists"]:
        print("  exists      no")
    else:
        print(f"  type        {info['type']}")
        print(f"  served by   {_fmt_layer(info['layer'])}")
        if info["copied_up"]:
            print(f"  copied up   yes, from {_fmt_layer(info['origin_layer'])}")
        if info.get("merged_layers") and len(info["merged_layers"]) > 1:
            print("  merges      " + ", ".join(str(x["index"]) for x in info["merged_layers"]))
        if info.get("opaque"):
            print("  opaque      yes (hides the same directory in lower layers)")
    for s in info["shadows"]:
        print(f"  shadows     {_fmt_layer(s)}")
    for h in info["hidden_by"]:
        print(f"  hidden by   {h['marker']} in {_fmt_layer(h)}")


def cmd_inspect(args: list[str]) -> int:
    parser = ArgumentParser(prog="unionfs inspect")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("paths", nargs="+")
    ns = parser.parse_args(args)
    results = [(p, inspect_path(p)) for p in ns.paths]
    if ns.json:
        print(json.dumps([r for _, r in results] if len(results) > 1 else results[0][1], indent=2))
    else:
        for i, (p, info) in enumerate(results):
            if i:
                print()
            _print_inspect(p, info)
    return 0


def _layer_usage(path: str) -> tuple[int, int]:
    """Entries and bytes in a layer directory (0, 0 if it cannot be opened).

    Walked through directory descriptors without following symlinks and without recursion,
    so a tree deeper than PATH_MAX or the interpreter's recursion limit is counted in full.
    """
    entries = size = 0
    try:
        root_fd = open_dir(os.fsencode(path))
    except OSError:
        return 0, 0
    try:
        for _fd, _name, st in walk_tree(root_fd):
            entries += 1
            if not stat.S_ISDIR(st.st_mode):
                size += st.st_size
    except OSError:
        pass  # a layer changing under us: report what was counted
    finally:
        os.close(root_fd)
    return entries, size


def _human(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1000
    return f"{n}"


def cmd_layers(args: list[str]) -> int:
    parser = ArgumentParser(prog="unionfs layers")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("mountpoint")
    ns = parser.parse_args(args)
    table = _xattr_json(ns.mountpoint, XATTR_LAYERS)
    rows = []
    for layer in table:
        entries, size = _layer_usage(layer["dir"])
        rows.append({**layer, "entries": entries, "size": size})
    if ns.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'LAYER':<7}{'KIND':<7}{'ENTRIES':>9}{'SIZE':>10}  DIRECTORY")
    for r in rows:
        kind = "upper" if r["upper"] else "lower"
        print(f"{r['index']:<7}{kind:<7}{r['entries']:>9}{_human(r['size']):>10}  {r['dir']}")
    return 0


def _print_event(ev: dict[str, Any]) -> None:
    ts = time.strftime("%H:%M:%S", time.localtime(ev["time"]))
    extra = ""
    if ev["event"] == "copy-up":
        extra = f" size={ev.get('size', 0)}"
        if "source_layer" in ev:
            extra += f" from-layer={ev['source_layer']}"
        if "seconds" in ev:
            extra += f" took={ev['seconds'] * 1000:.2f}ms"
    print(f"{ts} {ev['event']:<9} {ev['path']}{extra}", flush=True)


def cmd_stats(args: list[str]) -> int:
    parser = ArgumentParser(prog="unionfs stats")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--follow", "-f", action="store_true", help="stream copy-ups/whiteouts")
    parser.add_argument("--interval", type=float, default=0.2)
    parser.add_argument("--count", type=int, default=0, help="with --follow: stop after N events")
    parser.add_argument("mountpoint")
    ns = parser.parse_args(args)
    snap = _xattr_json(ns.mountpoint, XATTR_STATS)
    if not ns.follow:
        if ns.json:
            print(json.dumps(snap, indent=2))
        else:
            for key, value in snap.items():
                print(f"{key:<22}{value}")
        return 0
    seen = int(snap["last_event"])
    shown = 0
    try:
        while True:
            events = _xattr_json(ns.mountpoint, XATTR_EVENTS)
            for ev in events:
                if ev["seq"] > seen:
                    seen = ev["seq"]
                    print(json.dumps(ev)) if ns.json else _print_event(ev)
                    shown += 1
                    if ns.count and shown >= ns.count:
                        return 0
            time.sleep(ns.interval)
    except KeyboardInterrupt:
        return 0


def main(argv: list[str]) -> int:
    command, args = argv[0], argv[1:]
    handlers = {"inspect": cmd_inspect, "layers": cmd_layers, "stats": cmd_stats}
    if command not in handlers:
        raise UsageError(f"unknown command {command}")
    try:
        return handlers[command](args)
    except BrokenPipeError:
        sys.stderr.close()
        return 0
