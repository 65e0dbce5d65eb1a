"""What the real-mount tests share: layer snapshots, a kernel overlay mount to compare with,
twin layer sets, the sample layers and write sequences, and the no-stray-mount check."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import shutil
import stat
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import Union, whiteout, write


def snapshot(root: str | Path, upper: bool = False) -> dict[str, tuple]:
    """Names, types, modes, owners, sizes, content digests, link targets, user xattrs.

    With ``upper=True`` whiteouts and opaque markers are recorded too.
    """
    root = str(root)
    out: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in sorted(dirnames + filenames):
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            rel = os.path.relpath(p, root)
            extra: object = None
            if stat.S_ISREG(st.st_mode):
                with open(p, "rb") as f:
                    extra = hashlib.sha256(f.read()).hexdigest()[:16]
            elif stat.S_ISLNK(st.st_mode):
                extra = os.readlink(p)
            elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
                extra = (os.major(st.st_rdev), os.minor(st.st_rdev))
            xattrs: list[tuple[str, bytes]] = []
            if not stat.S_ISLNK(st.st_mode):
                for a in sorted(os.listxattr(p, follow_symlinks=False)):
                    if a.startswith("user.") and not a.startswith(
                        ("user.overlay.", "user.unionfs")
                    ):
                        xattrs.append((a, os.getxattr(p, a, follow_symlinks=False)))
                    if upper and a == "trusted.overlay.opaque":
                        xattrs.append((a, os.getxattr(p, a, follow_symlinks=False)))
            size = None if stat.S_ISDIR(st.st_mode) else st.st_size
            out[rel] = (
                stat.S_IFMT(st.st_mode),
                stat.S_IMODE(st.st_mode),
                st.st_uid,
                st.st_gid,
                size,
                extra,
                tuple(xattrs),
            )
    return out


@contextlib.contextmanager
def kernel_mount(lowers: list[Path], mnt: Path, upper: Path | None, work: Path | None):
    opts = "lowerdir=" + ":".join(map(str, lowers))
    if upper is not None:
        opts += f",upperdir={upper},workdir={work}"
    opts += ",redirect_dir=off,index=off,metacopy=off"
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o", opts, str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def twin(union: Callable[[int], Union], build: Callable[[Union], None], n: int = 2):
    a, b = union(n), union(n)
    build(a)
    build(b)
    return a, b


def sample_layers(u: Union) -> None:
    l0, l1 = u.lowers
    write(l1 / "etc/motd", "base motd")
    write(l1 / "etc/passwd", "root:x:0:0")
    write(l1 / "etc/gone", "to be whited out")
    write(l1 / "bin/tool", "#!/bin/sh\n", 0o755)
    write(l1 / "opt/app/a", "a")
    write(l1 / "opt/app/b", "b")
    write(l1 / "var/lib/x", "x" * 5000)
    write(l0 / "etc/motd", "app motd")
    whiteout(l0 / "etc/gone")
    (l0 / "opt/app").mkdir(parents=True)
    os.setxattr(l0 / "opt/app", "trusted.overlay.opaque", b"y")
    write(l0 / "opt/app/c", "c")
    os.symlink("/etc", l0 / "hostetc")
    os.symlink("../../..", l0 / "up")
    os.mkfifo(l0 / "fifo")
    os.link(l1 / "opt/app/a", l1 / "hardlink-a")
    os.setxattr(l1 / "etc/passwd", "user.note", b"from base")
    os.chown(l1 / "var/lib/x", 1000, 1000)


def write_ops(m: Path) -> None:
    with open(m / "etc/motd", "a") as f:
        f.write(" + appended")
    os.chmod(m / "bin/tool", 0o700)
    os.chown(m / "etc/passwd", 1000, 1000)
    os.utime(m / "var/lib/x", ns=(1_000_000_123, 2_000_000_456))
    os.unlink(m / "etc/passwd")
    os.mkdir(m / "etc/passwd")  # over a whiteout: opaque
    write(m / "etc/passwd/inside", "new")
    shutil.rmtree(m / "opt/app")
    os.mkdir(m / "opt/app")
    write(m / "opt/app/fresh", "fresh")
    os.rename(m / "var/lib/x", m / "var/lib/y")
    os.mkdir(m / "newdir")
    write(m / "newdir/f", "f")
    os.rename(m / "newdir", m / "moved")
    os.symlink("target", m / "link")
    os.link(m / "etc/motd", m / "motd-link")
    os.setxattr(m / "bin/tool", "user.k", b"v")
    os.truncate(m / "etc/motd", 3)
    os.mkfifo(m / "fifo2")
    with pytest.raises(OSError) as exc:
        os.rename(m / "opt", m / "opt2")
    assert exc.value.errno == errno.EXDEV
    with pytest.raises(OSError) as exc:
        os.rmdir(m / "etc")
    assert exc.value.errno == errno.ENOTEMPTY


def recreate_ops(m: Path) -> None:
    shutil.rmtree(m / "d")
    os.mkdir(m / "d")  # opaque: nothing of the old d shows again
    assert os.listdir(m / "d") == []
    shutil.rmtree(m / "n")  # n/e existed below with children: both levels recreated empty
    os.makedirs(m / "n/e/g")
    write(m / "n/e/g/new", "new")
    shutil.rmtree(m / "n/e")
    os.mkdir(m / "n/e")
    os.rename(m / "x", m / "y")  # a file moved over nothing, away from a lower name
    write(m / "x", "back")  # recreated over the whiteout the rename left


@pytest.fixture(autouse=True)
def _no_stray_mounts(tmp_path: Path) -> Iterator[None]:
    yield
    with open("/proc/self/mounts") as f:
        stray = [ln.split()[1] for ln in f if str(tmp_path) in ln]
    for mnt in reversed(stray):
        subprocess.run(["umount", "-l", mnt], check=False)
    assert not stray, f"left mounted: {stray}"
