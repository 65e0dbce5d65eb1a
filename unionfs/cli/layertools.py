"""Argument parsing for ``unionfs diff``, ``unionfs export`` and ``unionfs import``.

``main(argv)`` receives the arguments starting with the subcommand name and returns the exit
status; bad input raises :class:`UnionfsError` (1) or :class:`UsageError` (2).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from unionfs.cli.args import ArgumentParser, split_lowerdir, split_options, unescape
from unionfs.errors import UnionfsError, UsageError
from unionfs.layertools.changes import compute_changes
from unionfs.layertools.export import (
    COMPRESSIONS,
    ExportResult,
    compression_for,
    export_layer,
    export_to_path,
    upper_size,
)
from unionfs.layertools.importer import (
    DEFAULT_MAX_APPARENT_SIZE,
    DEFAULT_MAX_ENTRIES,
    DEFAULT_MAX_SIZE,
    ImportLimits,
    format_size,
    import_layer,
    parse_size,
)
from unionfs.layertools.layerscan import display
from unionfs.layertools.progress import Progress


def split_mount_options(options: str) -> tuple[list[Path], Path | None]:
    """The lowers (top first) and upper named by ``lowerdir=A:B,upperdir=U`` options.

    ``\\,`` and ``\\:`` escape commas and colons inside a directory name, as for
    fuse-overlayfs. Other options (``workdir=``...) are accepted and ignored.
    """
    lowers: list[Path] = []
    upper: Path | None = None
    for option in split_options(options):
        key, _, value = option.partition("=")
        if key == "lowerdir":
            lowers.extend(Path(part) for part in split_lowerdir(value))
        elif key == "upperdir":
            upper = Path(unescape(value))
    return lowers, upper


def _progress_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "--progress",
        dest="progress",
        action="store_const",
        const=True,
        default=None,
        help="always draw a progress bar on stderr (default: only when stderr is a TTY)",
    )
    group.add_argument("--no-progress", dest="progress", action="store_const", const=False)


def _diff(argv: list[str]) -> int:
    parser = ArgumentParser(prog="unionfs diff", description="List the changes an upper makes.")
    parser.add_argument("--upper", type=Path, help="the upper layer directory")
    parser.add_argument(
        "--lower", type=Path, action="append", default=[], help="a lower layer (top first)"
    )
    parser.add_argument(
        "-o", dest="options", action="append", default=[], help="lowerdir=L1:L2,upperdir=U"
    )
    parser.add_argument("--json", action="store_true", help="print a JSON list")
    args = parser.parse_args(argv)
    lowers: list[Path] = list(args.lower)
    upper: Path | None = args.upper
    for options in args.options:
        more_lowers, option_upper = split_mount_options(options)
        lowers.extend(more_lowers)
        upper = option_upper or upper
    if upper is None:
        raise UsageError("unionfs diff: an upper layer is needed (--upper U or -o upperdir=U)")
    changes = compute_changes(upper, lowers)
    if args.json:
        rows = [{"path": display(c.path), "kind": c.kind} for c in changes]
        print(json.dumps(rows, indent=2))
    else:
        out = sys.stdout.buffer
        for change in changes:
            out.write(change.kind.encode() + b" /" + b"/".join(change.path) + b"\n")
        out.flush()
    return 0


def _result_json(result: ExportResult, output: str | None) -> str:
    return json.dumps(
        {
            "digest": result.digest,
            "diff_id": result.diff_id,
            "size": result.size,
            "mediaType": result.media_type,
            "output": output,
        },
        indent=2,
    )


def _export(argv: list[str]) -> int:
    parser = ArgumentParser(
        prog="unionfs export", description="Write an upper as an OCI layer tarball."
    )
    parser.add_argument("--upper", type=Path, help="the upper layer directory")
    parser.add_argument("upper_pos", nargs="?", type=Path, metavar="UPPER")
    parser.add_argument("-o", "--output", help="the tarball to write (default: stdout)")
    parser.add_argument(
        "--compression", choices=COMPRESSIONS, help="default: from the output name, else none"
    )
    parser.add_argument("--json", action="store_true", help="print digest, diff_id, size, type")
    _progress_flags(parser)
    args = parser.parse_args(argv)
    upper: Path | None = args.upper or args.upper_pos
    if upper is None:
        raise UsageError("unionfs export: an upper layer is needed (--upper U)")
    if not upper.is_dir():
        raise UnionfsError(f"{upper}: not a directory")
    compression = args.compression or (compression_for(args.output) if args.output else "none")
    progress = Progress(
        "exporting", upper_size(upper) if args.progress is not False else 0, enabled=args.progress
    )
    with progress:
        if args.output and args.output != "-":
            result = export_to_path(
                upper, Path(args.output), compression=compression, progress=progress
            )
            report = sys.stdout
        else:
            if sys.stdout.isatty():
                raise UsageError("unionfs export: refusing to write a tarball to a terminal (-o)")
            result = export_layer(
                upper, sys.stdout.buffer, compression=compression, progress=progress
            )
            sys.stdout.buffer.flush()
            report = sys.stderr
    print(_result_json(result, args.output) if args.json else result.digest, file=report)
    return 0


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _import(argv: list[str]) -> int:
    parser = ArgumentParser(prog="unionfs import", description="Unpack an OCI layer into a lower.")
    parser.add_argument("layer", help="the layer tarball (plain, gzip or zstd; - for stdin)")
    parser.add_argument("dir", type=Path, help="the new lower directory (absent or empty)")
    parser.add_argument(
        "--keep-oci-whiteouts",
        action="store_true",
        help="keep .wh. markers as files instead of converting them to the kernel format",
    )
    parser.add_argument(
        "--allow-devices", action="store_true", help="unpack char and block device nodes"
    )
    parser.add_argument(
        "--max-size",
        type=_size,
        default=DEFAULT_MAX_SIZE,
        metavar="SIZE",
        help="most file data written to disk, holes excluded "
        f"(default {format_size(DEFAULT_MAX_SIZE)}; K, M, G, T suffixes)",
    )
    parser.add_argument(
        "--max-apparent-size",
        type=_size,
        default=DEFAULT_MAX_APPARENT_SIZE,
        metavar="SIZE",
        help="most bytes the files may add up to, holes included "
        f"(default {format_size(DEFAULT_MAX_APPARENT_SIZE)})",
    )
    parser.add_argument(
        "--max-entries",
        type=int,
        default=DEFAULT_MAX_ENTRIES,
        metavar="N",
        help=f"most tar members (default {DEFAULT_MAX_ENTRIES})",
    )
    parser.add_argument("--json", action="store_true", help="print digest, diff_id and counts")
    _progress_flags(parser)
    args = parser.parse_args(argv)
    limits = ImportLimits(args.max_size, args.max_apparent_size, args.max_entries)
    result = import_layer(
        args.layer,
        args.dir,
        keep_oci_whiteouts=args.keep_oci_whiteouts,
        allow_devices=args.allow_devices,
        progress_enabled=args.progress,
        limits=limits,
    )
    if args.json:
        print(json.dumps({**vars(result), "dir": os.fspath(args.dir)}, indent=2))
    else:
        print(result.digest)
    return 0


_COMMANDS = {"diff": _diff, "export": _export, "import": _import}


def main(argv: list[str]) -> int:
    """Run ``diff``, ``export`` or ``import``; ``argv[0]`` is the subcommand name."""
    if not argv or argv[0] not in _COMMANDS:
        raise UsageError("expected one of: diff, export, import")
    return _COMMANDS[argv[0]](argv[1:])
