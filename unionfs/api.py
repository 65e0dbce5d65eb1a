"""A small Python API for scripts and tests: mount a union and always unmount it.

Example::

    from unionfs.api import mounted

    with mounted(["/layers/app", "/layers/base"], "/mnt/root",
                 upper="/layers/rw", workdir="/layers/work") as root:
        print(os.listdir(root))
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator, Sequence
from typing import Any

from unionfs.cli.args import split_lowerdir
from unionfs.errors import UnionfsError

__all__ = ["mount", "unmount", "mounted", "split_lowerdir"]


def _escape(path: str) -> str:
    return path.replace("\\", "\\\\").replace(":", "\\:").replace(",", "\\,")


def mount(
    lowers: Sequence[str],
    mountpoint: str,
    upper: str | None = None,
    workdir: str | None = None,
    options: Sequence[str] = (),
    log_file: str | None = None,
) -> None:
    """Mount in the background; returns when the mount is ready, raises UnionfsError if not."""
    opts = ["lowerdir=" + ":".join(_escape(p) for p in lowers)]
    if upper is not None:
        opts += [f"upperdir={_escape(upper)}", f"workdir={_escape(workdir or '')}"]
    opts += list(options)
    log = ["--log-file", log_file] if log_file else []
    _run("mount", *log, "-o", ",".join(opts), mountpoint)


def unmount(mountpoint: str, lazy: bool = False) -> None:
    """Unmount and wait for the daemon to finish; a lazy unmount also clears a dead mount."""
    _run("umount", *(["-z"] if lazy else []), mountpoint)


def _run(command: str, *args: str) -> None:
    """Run ``unionfs COMMAND ARGS``; its one-line error becomes a UnionfsError."""
    proc = subprocess.run(
        [sys.executable, "-m", "unionfs", command, *args], capture_output=True, text=True
    )
    if proc.returncode != 0:
        raise UnionfsError(proc.stderr.strip().removeprefix("unionfs: ") or f"{command} failed")


@contextlib.contextmanager
def mounted(lowers: Sequence[str], mountpoint: str, *args: Any, **kwargs: Any) -> Iterator[str]:
    """Mount for the duration of the ``with`` block; always unmounts, lazily if it must.

    The arguments are :func:`mount`'s.
    """
    mount(lowers, mountpoint, *args, **kwargs)
    try:
        yield os.path.realpath(mountpoint)
    finally:
        try:
            unmount(mountpoint)
        except UnionfsError:
            unmount(mountpoint, lazy=True)
