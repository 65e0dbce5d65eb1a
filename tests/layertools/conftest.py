"""Fixtures and helpers for the layertools tests: layer trees, kernel overlay mounts, snapshots."""

from __future__ import annotations

import hashlib
import io
import os
import stat
import subprocess
import tarfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

Snapshot = dict[str, tuple[object, ...]]


def _can_mount_overlay() -> bool:
    return os.geteuid() == 0 and "overlay" in Path("/proc/filesystems").read_text()


needs_kernel_overlay = pytest.mark.skipif(
    not _can_mount_overlay(), reason="needs root and the kernel's overlayfs"
)
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (mknod, trusted xattrs)")


@contextmanager
def overlay_mount(
    mountpoint: Path, lowers: list[Path], upper: Path | None = None, work: Path | None = None
) -> Iterator[Path]:
    """Mount the kernel's overlayfs at ``mountpoint`` and always unmount it afterwards."""
    options = "lowerdir=" + ":".join(str(p) for p in lowers)
    if upper is not None:
        assert work is not None
        options += f",upperdir={upper},workdir={work}"
    options += ",redirect_dir=off,metacopy=off,index=off"
    mountpoint.mkdir(exist_ok=True)
    subprocess.run(
        ["mount", "-t", "overlay", "overlay", "-o", options, str(mountpoint)],
        check=True,
        capture_output=True,
    )
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", str(mountpoint)], check=True)


@pytest.fixture
def mount_overlay(tmp_path: Path) -> Callable[..., object]:
    """``mount_overlay(lowers, upper=None)`` -> a context manager yielding the mountpoint."""
    counter = iter(range(1000))

    def make(lowers: list[Path], upper: Path | None = None) -> object:
        n = next(counter)
        work = None
        if upper is not None:
            work = tmp_path / f"work{n}"
            work.mkdir()
        return overlay_mount(tmp_path / f"mnt{n}", lowers, upper, work)

    return make


def snapshot(root: Path) -> Snapshot:
    """Every path under ``root`` with type, mode, owner, size, content, target, user xattrs, mtime.

    Device numbers are recorded for device nodes; FIFOs are never opened.
    """
    result: Snapshot = {}
    for dirpath, dirnames, filenames, dir_fd in os.fwalk(root, follow_symlinks=False):
        rel_dir = os.path.relpath(dirpath, root)
        for name in [".", *dirnames, *filenames]:
            if name == "." and rel_dir != ".":
                continue
            rel = os.path.normpath(os.path.join(rel_dir, name))
            st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
            content: object = None
            if stat.S_ISREG(st.st_mode):
                fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW, dir_fd=dir_fd)
                with os.fdopen(fd, "rb") as f:
                    content = hashlib.sha256(f.read()).hexdigest()
            elif stat.S_ISLNK(st.st_mode):
                content = os.readlink(name, dir_fd=dir_fd)
            elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
                content = (os.major(st.st_rdev), os.minor(st.st_rdev))
            path = f"/proc/self/fd/{dir_fd}/{name}" if name != "." else dir_fd
            follow = name == "."
            xattrs = tuple(
                sorted(
                    (n, os.getxattr(path, n, follow_symlinks=follow))
                    for n in os.listxattr(path, follow_symlinks=follow)
                    if n.startswith("user.")
                )
            )
            size = st.st_size if not stat.S_ISDIR(st.st_mode) else None
            result[rel] = (
                stat.S_IFMT(st.st_mode),
                stat.S_IMODE(st.st_mode),
                st.st_uid,
                st.st_gid,
                size,
                content,
                xattrs,
                st.st_mtime_ns,
            )
    return result


class TarBuilder:
    """Builds a layer tarball by hand with Python's tarfile, following the OCI layer spec."""

    def __init__(self, fmt: int = tarfile.PAX_FORMAT) -> None:
        self.buffer = io.BytesIO()
        self.tar = tarfile.open(fileobj=self.buffer, mode="w", format=fmt)  # noqa: SIM115

    def _info(self, name: str, kind: bytes, mode: int, **fields: object) -> tarfile.TarInfo:
        info = tarfile.TarInfo(name)
        info.type = kind
        info.mode = mode
        info.mtime = 1_600_000_000
        info.uid = info.gid = 0
        for key, value in fields.items():
            setattr(info, key, value)
        return info

    def dir(self, name: str, mode: int = 0o755, **fields: object) -> TarBuilder:
        self.tar.addfile(self._info(name, tarfile.DIRTYPE, mode, **fields))
        return self

    def file(self, name: str, data: bytes = b"", mode: int = 0o644, **fields: object) -> TarBuilder:
        info = self._info(name, tarfile.REGTYPE, mode, **fields)
        info.size = len(data)
        self.tar.addfile(info, io.BytesIO(data))
        return self

    def symlink(self, name: str, target: str) -> TarBuilder:
        self.tar.addfile(self._info(name, tarfile.SYMTYPE, 0o777, linkname=target))
        return self

    def hardlink(self, name: str, target: str) -> TarBuilder:
        self.tar.addfile(self._info(name, tarfile.LNKTYPE, 0o644, linkname=target))
        return self

    def device(self, name: str, major: int, minor: int, block: bool = False) -> TarBuilder:
        kind = tarfile.BLKTYPE if block else tarfile.CHRTYPE
        info = self._info(name, kind, 0o600, devmajor=major, devminor=minor)
        self.tar.addfile(info)
        return self

    def whiteout(self, name: str) -> TarBuilder:
        return self.file(name, b"", mode=0o600)

    def write(self, path: Path) -> Path:
        self.tar.close()
        path.write_bytes(self.buffer.getvalue())
        return path


@pytest.fixture
def tar_builder() -> type[TarBuilder]:
    return TarBuilder
