"""Issue 13 item 1: dev/nodev, suid/nosuid and exec/noexec are honoured exactly.

A lower carries a setuid-root ``id``, a 0666 character device with /dev/null's numbers, a
0666 block device naming a real loop device, and an ordinary program. Through unionfs and
through the kernel's overlay mounted with the same flags, user ``nobody`` must get the same
answers: with ``nosuid`` the setuid bit gives no euid 0, with ``nodev`` neither device can
be opened, with ``noexec`` nothing runs. Without flags, unionfs mounts ``nodev`` but
``suid`` (fuse-overlayfs's defaults as root); the kernel's overlay mounts ``dev``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.security._mount_common import (
    as_nobody,
    kernel_overlay,
    make_canary,
    mount_options,
    snapshot,
    world_root,
)
from unionfs.api import mounted

pytestmark = [pytest.mark.mount, pytest.mark.kernel]

ID = shutil.which("id") or "/usr/bin/id"
TRUE = shutil.which("true") or "/usr/bin/true"


@contextlib.contextmanager
def loop_device(backing: Path) -> Iterator[str]:
    backing.write_bytes(b"host disk block\n" + bytes(65536 - 16))
    dev = subprocess.run(
        ["losetup", "-f", "--show", str(backing)], check=True, capture_output=True, text=True
    ).stdout.strip()
    try:
        yield dev
    finally:
        subprocess.run(["losetup", "-d", dev], check=False)


@pytest.fixture
def hostile() -> Iterator[tuple[Path, Path]]:
    """(test root, lower) with a setuid-root id, two 0666 device nodes and a program."""
    with world_root() as root, loop_device(root / "disk.img") as loop:
        lower = root / "lower"
        lower.mkdir()
        shutil.copy(ID, lower / "suid-id")
        os.chown(lower / "suid-id", 0, 0)
        os.chmod(lower / "suid-id", 0o4755)
        shutil.copy(TRUE, lower / "prog")
        os.chmod(lower / "prog", 0o755)
        null = os.stat("/dev/null").st_rdev
        os.mknod(lower / "chardev", stat.S_IFCHR | 0o666, null)
        os.mknod(lower / "blockdev", stat.S_IFBLK | 0o666, os.stat(loop).st_rdev)
        os.chmod(lower / "chardev", 0o666)
        os.chmod(lower / "blockdev", 0o666)
        for d in ("upper", "work", "mnt", "kupper", "kwork", "kmnt"):
            (root / d).mkdir()
        yield root, lower


def behaviour(mnt: str) -> dict[str, object]:
    """What user nobody can do through ``mnt``."""
    euid = as_nobody(f"{mnt}/suid-id", "-u")
    out: dict[str, object] = {"euid": euid.stdout.strip() or euid.stderr.strip()[-40:]}
    for dev in ("chardev", "blockdev"):
        probe = as_nobody("dd", f"if={mnt}/{dev}", "of=/dev/null", "bs=16", "count=1")
        out[dev] = "ok" if probe.returncode == 0 else "denied"
    run = as_nobody(f"{mnt}/prog")
    out["exec"] = "ok" if run.returncode == 0 else "denied"
    return out


@pytest.mark.parametrize(
    "flags, expect",
    [
        (
            "nodev,nosuid,noexec",
            {"euid": "denied", "chardev": "denied", "blockdev": "denied", "exec": "denied"},
        ),
        ("nodev,suid,exec", {"euid": "0", "chardev": "denied", "blockdev": "denied", "exec": "ok"}),
        ("dev,nosuid", {"euid": "65534", "chardev": "ok", "blockdev": "ok", "exec": "ok"}),
    ],
)
def test_flags_match_the_kernel_overlay(
    hostile: tuple[Path, Path], flags: str, expect: dict[str, str]
) -> None:
    root, lower = hostile
    canary = make_canary(root)
    before = snapshot(canary)
    with kernel_overlay([lower], root / "kmnt", root / "kupper", root / "kwork", flags) as km:
        kernel = behaviour(km)
        kopts = mount_options(km)
    with mounted(
        [str(lower)], str(root / "mnt"), str(root / "upper"), str(root / "work"), [flags]
    ) as m:
        ours = behaviour(m)
        opts = mount_options(m)
    # "denied" for the euid means noexec refused to run it at all.
    norm = {
        k: ("denied" if k == "euid" and "denied" in str(v).lower() else v) for k, v in ours.items()
    }
    knorm = {
        k: ("denied" if k == "euid" and "denied" in str(v).lower() else v)
        for k, v in kernel.items()
    }
    assert norm == knorm == expect, (ours, kernel)
    flag_words = {"nodev", "nosuid", "noexec"}
    assert opts & flag_words == kopts & flag_words == {f for f in flags.split(",")} & flag_words
    assert snapshot(canary) == before


def test_defaults_are_nodev_suid_exec(hostile: tuple[Path, Path]) -> None:
    """No flags given: unionfs is nodev but suid and exec; the kernel's overlay is dev."""
    root, lower = hostile
    with kernel_overlay([lower], root / "kmnt", root / "kupper", root / "kwork") as km:
        kopts = mount_options(km)
        kernel = behaviour(km)
    with mounted([str(lower)], str(root / "mnt"), str(root / "upper"), str(root / "work")) as m:
        opts = mount_options(m)
        ours = behaviour(m)
    assert "nodev" in opts and "nosuid" not in opts and "noexec" not in opts, opts
    assert "allow_other" in opts and "default_permissions" in opts
    assert not kopts & {"nodev", "nosuid", "noexec"}, kopts
    assert ours == {"euid": "0", "chardev": "denied", "blockdev": "denied", "exec": "ok"}
    assert kernel == {"euid": "0", "chardev": "ok", "blockdev": "ok", "exec": "ok"}
