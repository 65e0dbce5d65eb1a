"""Issue 13 item 8: POSIX ACLs in the layers are enforced, as by the kernel's overlay.

unionfs asks for FUSE_CAP_POSIX_ACL whenever ``default_permissions`` is in force (always),
so the kernel reads ``system.posix_acl_access`` through the daemon and enforces it.
``noacl`` turns that off, as in fuse-overlayfs. Default ACLs are inherited by new files
(the upper filesystem applies them when the daemon creates the file), compared with the
kernel's overlay by ``getfacl`` output and file modes.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.security._mount_common import (
    as_nobody,
    kernel_overlay,
    make_canary,
    snapshot,
    world_root,
)
from unionfs.api import mounted

pytestmark = [
    pytest.mark.mount,
    pytest.mark.kernel,
    pytest.mark.skipif(shutil.which("setfacl") is None, reason="needs the acl package"),
]


def setfacl(*args: str) -> None:
    subprocess.run(["setfacl", *args], check=True)


def getfacl(path: str) -> str:
    return subprocess.run(
        ["getfacl", "-cp", path], check=True, capture_output=True, text=True
    ).stdout


@contextlib.contextmanager
def both(options: tuple[str, ...] = ()) -> Iterator[tuple[str, str, Path]]:
    """(kernel overlay, unionfs, canary) over the same lower and equal uppers."""
    with world_root() as root:
        lower, ku, uu = root / "lower", root / "kupper", root / "upper"
        for d in (
            lower / "D",
            lower / "P",
            ku,
            uu,
            root / "kw",
            root / "w",
            root / "km",
            root / "m",
        ):
            d.mkdir(parents=True)
        (lower / "secret").write_text("lower secret\n")
        (lower / "open").write_text("readable\n")
        (lower / "D" / "old").write_text("to be replaced over a whiteout\n")
        (lower / "D" / "olddir").mkdir()
        setfacl("-m", "u:nobody:---", str(lower / "secret"))
        setfacl("-m", "u:nobody:rwx", str(lower / "D"))
        setfacl("-d", "-m", "u:nobody:rwx", str(lower / "D"))
        for up in (ku, uu):
            (up / "usecret").write_text("upper secret\n")
            setfacl("-m", "u:nobody:---", str(up / "usecret"))
        canary = make_canary(root)
        with (
            kernel_overlay([lower], root / "km", ku, root / "kw") as km,
            mounted([str(lower)], str(root / "m"), str(uu), str(root / "w"), options) as m,
        ):
            yield km, m, canary


def readable_by_nobody(path: str) -> bool:
    return as_nobody("cat", path).returncode == 0


def test_access_acls_are_enforced() -> None:
    with both() as (km, m, canary):
        before = snapshot(canary)
        for mnt in (km, m):
            assert readable_by_nobody(f"{mnt}/open"), mnt
            assert not readable_by_nobody(f"{mnt}/secret"), mnt  # ACL on a lower file
            assert not readable_by_nobody(f"{mnt}/usecret"), mnt  # ACL on an upper file
            denied = as_nobody("cat", f"{mnt}/secret")
            assert "Permission denied" in denied.stderr
        assert getfacl(f"{m}/secret") == getfacl(f"{km}/secret")
        assert snapshot(canary) == before


def test_noacl_turns_enforcement_off() -> None:
    with both(("noacl",)) as (km, m, _):
        assert not readable_by_nobody(f"{km}/secret")
        assert readable_by_nobody(f"{m}/secret")  # only the mode bits are checked


def _create(mnt: str, parent: str, umask: int) -> None:
    old = os.umask(umask)
    try:
        Path(mnt, parent, f"f{umask:03o}").write_text("")
        os.mkdir(Path(mnt, parent, f"d{umask:03o}"))
    finally:
        os.umask(old)


def _modes_and_acls(mnt: str, parent: str, umask: int) -> list[tuple[int, str]]:
    out = []
    for name in (f"f{umask:03o}", f"d{umask:03o}"):
        p = f"{mnt}/{parent}/{name}"
        out.append((os.stat(p).st_mode, getfacl(p)))
    return out


@pytest.mark.parametrize("umask", [0o022, 0o000])
def test_creates_without_default_acl_match_the_kernel(umask: int) -> None:
    with both() as (km, m, _):
        for mnt in (km, m):
            _create(mnt, "P", umask)
        assert _modes_and_acls(m, "P", umask) == _modes_and_acls(km, "P", umask)


def test_default_acl_is_inherited_as_by_the_kernel_umask_000() -> None:
    with both() as (km, m, _):
        for mnt in (km, m):
            _create(mnt, "D", 0)
        ours = _modes_and_acls(m, "D", 0)
        assert "user:nobody:rwx" in ours[0][1]
        assert ours == _modes_and_acls(km, "D", 0)


def test_default_acl_is_inherited_as_by_the_kernel_umask_022() -> None:
    """A default ACL replaces the umask (the daemon asks for FUSE_CAP_DONT_MASK and lets the
    upper filesystem apply the caller's umask)."""
    with both() as (km, m, _):
        for mnt in (km, m):
            _create(mnt, "D", 0o022)
        assert _modes_and_acls(m, "D", 0o022) == _modes_and_acls(km, "D", 0o022)


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_default_acl_applies_to_names_created_over_whiteouts(umask: int) -> None:
    """A name over a whiteout is built in work/, away from the parent's default ACL: unionfs
    applies the ACL's inheritance itself, as the kernel's overlay does."""
    with both() as (km, m, _):
        for mnt in (km, m):
            os.unlink(f"{mnt}/D/old")
            os.rmdir(f"{mnt}/D/olddir")
            old = os.umask(umask)
            try:
                Path(mnt, "D", "old").write_text("")
                os.mkdir(Path(mnt, "D", "olddir"), 0o750)
            finally:
                os.umask(old)
        ours = [(os.stat(f"{m}/D/{n}").st_mode, getfacl(f"{m}/D/{n}")) for n in ("old", "olddir")]
        theirs = [
            (os.stat(f"{km}/D/{n}").st_mode, getfacl(f"{km}/D/{n}")) for n in ("old", "olddir")
        ]
        assert "user:nobody:rwx" in ours[0][1]
        assert ours == theirs
