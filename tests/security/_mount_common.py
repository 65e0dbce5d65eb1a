"""Helpers of the mount-hardening tests: a canary tree, a world-traversable test root, the
kernel's overlay with chosen mount flags, and running a command as user ``nobody``.

The canary is a tree outside every layer; each test snapshots it before the attack and
checks that content, mode, owner, times and xattrs are unchanged afterwards.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

from tests.layertools.canary import canary_state

NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]


@contextlib.contextmanager
def world_root() -> Iterator[Path]:
    """A fresh directory user ``nobody`` can traverse (pytest's tmp_path is 0700 root)."""
    root = Path(tempfile.mkdtemp(prefix="unionfs-sec-", dir="/tmp"))
    os.chmod(root, 0o755)
    try:
        yield root
    finally:
        for mnt in mounts_under(root):
            subprocess.run(["umount", "-l", mnt], check=False, capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


def mounts_under(root: Path) -> list[str]:
    out = []
    with open("/proc/self/mounts") as f:
        for line in f:
            mnt = line.split()[1].encode().decode("unicode_escape")
            if mnt == str(root) or mnt.startswith(str(root) + "/"):
                out.append(mnt)
    return sorted(out, key=len, reverse=True)


def make_canary(root: Path) -> Path:
    """A small tree with a file, a setuid-looking file, a directory and an xattr."""
    canary = root / "canary"
    (canary / "work").mkdir(parents=True)
    (canary / "secret").write_text("do not touch\n")
    (canary / "work" / "keep").write_text("keep me\n")
    os.chmod(canary / "secret", 0o600)
    os.setxattr(canary / "secret", "user.canary", b"1")
    os.utime(canary / "secret", ns=(1_000_000_000, 2_000_000_000))
    return canary


def snapshot(root: Path) -> dict[str, tuple[object, ...]]:
    """Everything a test promises not to change under ``root``, by relative path."""
    return canary_state(root)


@contextlib.contextmanager
def kernel_overlay(
    lowers: list[Path],
    mnt: Path,
    upper: Path | None = None,
    work: Path | None = None,
    flags: str = "",
) -> Iterator[str]:
    """``mount -t overlay`` with the extra mount ``flags`` (``nosuid,nodev`` ...)."""
    data = "lowerdir=" + ":".join(str(p) for p in lowers)
    if upper is not None and work is not None:
        data += f",upperdir={upper},workdir={work}"
    if flags:
        data += "," + flags
    subprocess.run(
        ["mount", "-t", "overlay", "overlay", "-o", data, str(mnt)], check=True, capture_output=True
    )
    try:
        yield str(mnt)
    finally:
        subprocess.run(["umount", str(mnt)], check=False, capture_output=True)


def as_nobody(*argv: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*NOBODY, *argv], capture_output=True, text=True, timeout=timeout)


def mount_options(mnt: str) -> set[str]:
    out = subprocess.run(["findmnt", "-no", "OPTIONS", mnt], capture_output=True, text=True)
    return set(out.stdout.strip().split(","))
