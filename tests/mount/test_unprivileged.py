"""A mount by an unprivileged user (through fusermount3), on a host where root has used unionfs.

Root's state directory (/run/unionfs/mounts) exists and is root's: the user's mount keeps its
record and log in a directory of its own. The upper refuses what only root may write (char 0/0
whiteouts, ``trusted.*`` xattrs): whiteouts become ``.wh.`` files and opaque markers
``user.overlay.opaque``, probed at mount, so deleting a lower directory and making it again
works (issue 12 items 1 and 2).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import write

pytestmark = pytest.mark.mount

USER = 1000
UNIONFS = str(Path(__file__).resolve().parents[2] / ".venv" / "bin" / "unionfs")


def as_user(*argv: str) -> subprocess.CompletedProcess[str]:
    env = {"PATH": "/usr/bin:/bin:/usr/sbin:/sbin", "HOME": "/tmp", "LANG": "C.UTF-8"}
    return subprocess.run(
        ["setpriv", f"--reuid={USER}", f"--regid={USER}", "--clear-groups", *argv],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )


def mount_as_user(base: Path) -> subprocess.CompletedProcess[str]:
    """``unionfs mount`` of ``base``'s lower, upper and workdir on ``base/mnt``, as the user."""
    return as_user(
        UNIONFS,
        "mount",
        "--lower",
        str(base / "lower"),
        "--upper",
        str(base / "upper"),
        "--workdir",
        str(base / "work"),
        str(base / "mnt"),
    )


def sh(cmd: str) -> subprocess.CompletedProcess[str]:
    return as_user("sh", "-c", cmd)


@pytest.fixture
def fuse_for_users() -> Iterator[None]:
    """/dev/fuse as Debian's fuse3 sets it up (mode 0666, through udev); a machine without
    udev may have it 0600, and libfuse then fails before trying fusermount3. Restored."""
    mode = os.stat("/dev/fuse").st_mode & 0o777
    os.chmod("/dev/fuse", 0o666)
    try:
        yield
    finally:
        os.chmod("/dev/fuse", mode)


@pytest.fixture
def base(fuse_for_users: None) -> Iterator[Path]:
    root = Path(tempfile.mkdtemp(prefix="unpriv", dir="/tmp"))
    os.chmod(root, 0o755)
    try:
        for name in ("lower", "upper", "work", "mnt"):
            (root / name).mkdir()
        write(root / "lower" / "d" / "a", "lower a")
        write(root / "lower" / "d" / "sub" / "b", "lower b")
        write(root / "lower" / "keep", "kept\n")
        for dirpath, dirnames, filenames in os.walk(root):
            for n in (dirpath, *(os.path.join(dirpath, f) for f in dirnames + filenames)):
                os.chown(n, USER, USER)
        os.chown(root, 0, 0)
        yield root
    finally:
        subprocess.run(["fusermount3", "-u", "-z", str(root / "mnt")], capture_output=True)
        key = str(root / "mnt").strip("/").replace("/", "_")
        for leftover in Path(f"/tmp/unionfs-{USER}/mounts").glob(f"{key}.*"):
            leftover.unlink()
        shutil.rmtree(root, ignore_errors=True)


def test_a_user_mounts_beside_roots_state_and_recreates_a_deleted_directory(base: Path) -> None:
    os.makedirs("/run/unionfs/mounts", exist_ok=True)  # root has used unionfs here
    before = sorted(os.listdir("/run/unionfs/mounts"))
    mnt = base / "mnt"
    mounted = mount_as_user(base)
    assert mounted.returncode == 0, mounted.stderr
    try:
        done = sh(
            f"cd {mnt} && rm -r d && mkdir d && echo new > d/n && echo more >> keep && cat d/n keep"
        )
        assert done.returncode == 0, done.stderr
        assert done.stdout == "new\nkept\nmore\n"
        # Only the mounting user may use a mount without allow_other.
        assert sh(f"ls {mnt}/d").stdout.split() == ["n"]  # the lower d/a and d/sub are hidden
        assert os.getxattr(base / "upper" / "d", "user.overlay.opaque") == b"y"
        assert "trusted.overlay.opaque" not in os.listxattr(base / "upper" / "d")
        # The user's record is in a directory of the user's own; root's is untouched.
        own = Path(f"/tmp/unionfs-{USER}/mounts")
        assert own.is_dir() and os.stat(own).st_uid == USER
        assert any(n.endswith(".json") for n in os.listdir(own))
        assert sorted(os.listdir("/run/unionfs/mounts")) == before
    finally:
        out = as_user(UNIONFS, "umount", str(mnt))
        assert out.returncode == 0, out.stderr
    # The same view after a remount by the same user.
    again = mount_as_user(base)
    assert again.returncode == 0, again.stderr
    try:
        assert sh(f"ls {mnt}/d; cat {mnt}/keep").stdout == "n\nkept\nmore\n"
    finally:
        assert as_user(UNIONFS, "umount", str(mnt)).returncode == 0


def test_an_upper_written_by_rootless_fuse_overlayfs_mounts_unchanged(base: Path) -> None:
    """fuse-overlayfs, run by a user, marks opaque directories user.fuseoverlayfs.opaque (and a
    .wh..wh..opq file); the same layers mounted by unionfs show the same tree."""
    mnt = base / "mnt"
    layers = f"lowerdir={base / 'lower'},upperdir={base / 'upper'},workdir={base / 'work'}"
    made = as_user("fuse-overlayfs", "-o", layers, str(mnt))
    assert made.returncode == 0, made.stderr
    try:
        done = sh(f"cd {mnt} && rm -r d && mkdir d && echo new > d/n && rm keep && mkdir e")
        assert done.returncode == 0, done.stderr
        want = sh(f"cd {mnt} && find . | sort && cat d/n").stdout
    finally:
        assert as_user("fusermount3", "-u", str(mnt)).returncode == 0
    assert "user.fuseoverlayfs.opaque" in os.listxattr(base / "upper" / "d")
    mounted = mount_as_user(base)
    assert mounted.returncode == 0, mounted.stderr
    try:
        assert sh(f"cd {mnt} && find . | sort && cat d/n").stdout == want
        shown = sh(f"getfattr -d -m - {mnt}/d").stdout
        assert "fuseoverlayfs" not in shown
    finally:
        assert as_user(UNIONFS, "umount", str(mnt)).returncode == 0
