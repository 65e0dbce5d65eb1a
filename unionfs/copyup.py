"""Copy-up building blocks: data (reflink, copy_file_range, holes kept), metadata, cleanup.

A copy-up is always built under a temporary name in the workdir's ``work/`` directory -- data,
owner, mode, xattrs, origin marker, times -- made durable when the mount syncs, then renamed
into the upper directory in one step. A crash at any point leaves either the lower object
visible or the complete copy; half-built objects only ever exist in ``work/``, which is
emptied at the next mount (:func:`clean_workdir`).
"""

from __future__ import annotations

import errno
import fcntl
import itertools
import logging
import os
import stat
import struct

from unionfs import whiteout

log = logging.getLogger(__name__)

FICLONE = 0x40049409
CHUNK = 1 << 20
WORK_SUBDIR = b"work"

_tmp_counter = itertools.count(1)


def temp_name() -> bytes:
    """A fresh name for an object being built in ``work/`` (unique within this daemon)."""
    return b"#unionfs-%x-%x" % (os.getpid(), next(_tmp_counter))


SMALL_FILE = 64 * 1024
# (source st_dev, destination st_dev) pairs known to refuse a reflink / copy_file_range:
# learnt once per mount instead of failing a syscall on every copy-up.
_no_reflink: set[tuple[int, int]] = set()
_no_copy_range: set[tuple[int, int]] = set()


def copy_data(src_fd: int, dst_fd: int, size: int, devs: tuple[int, int] = (0, 0)) -> None:
    """Copy ``size`` bytes of file data, sharing blocks where the filesystem can.

    Tries a reflink first; otherwise copies each data extent (found with SEEK_DATA and
    SEEK_HOLE) with ``copy_file_range``, falling back to ``sendfile`` across filesystems
    that refuse it. Holes are skipped, so a sparse file stays sparse. Small files are read
    and written in one go: two syscalls beat any of the above. ``devs`` names the source
    and destination filesystems, so that refusals are remembered.
    """
    if size == 0:
        return
    if devs not in _no_reflink:
        try:
            fcntl.ioctl(dst_fd, FICLONE, src_fd)
            return
        except OSError:
            _no_reflink.add(devs)
    if size <= SMALL_FILE:
        data = os.pread(src_fd, size, 0)
        if len(data) == size:
            os.pwrite(dst_fd, data, 0)
            return
    off = 0
    while off < size:
        try:
            start = os.lseek(src_fd, off, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:
                break  # only a hole remains
            raise
        end = min(os.lseek(src_fd, start, os.SEEK_HOLE), size)
        _copy_range(src_fd, dst_fd, start, end, devs)
        off = end
    os.ftruncate(dst_fd, size)


def _copy_range(src_fd: int, dst_fd: int, start: int, end: int, devs: tuple[int, int]) -> None:
    pos = start
    use_cfr = devs not in _no_copy_range
    while pos < end:
        count = min(end - pos, 1 << 30)
        n = 0
        if use_cfr:
            try:
                n = os.copy_file_range(src_fd, dst_fd, count, pos, pos)
            except OSError as exc:
                if exc.errno not in (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                    raise
                _no_copy_range.add(devs)
                use_cfr = False
                continue
        else:
            os.lseek(dst_fd, pos, os.SEEK_SET)
            n = os.sendfile(dst_fd, src_fd, pos, min(count, CHUNK * 8))
        if n == 0:
            break  # the source shrank under us; the final ftruncate fixes the size
        pos += n


def copy_xattrs(src: bytes | int, dst: bytes | int) -> None:
    """Copy every xattr that is not internal to the layer format from ``src`` to ``dst``.

    ``src``/``dst`` are descriptors or ``/proc/self/fd/N/name`` paths (never followed).
    """
    follow = isinstance(src, int)
    try:
        names = os.listxattr(src) if follow else os.listxattr(src, follow_symlinks=False)
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
            return
        raise
    for name in names:
        bname = os.fsencode(name)
        if whiteout.is_internal_xattr(bname):
            continue
        try:
            if follow:
                value = os.getxattr(src, bname)
            else:
                value = os.getxattr(src, bname, follow_symlinks=False)
            if isinstance(dst, int):
                os.setxattr(dst, bname, value)
            else:
                os.setxattr(dst, bname, value, follow_symlinks=False)
        except OSError as exc:
            # security.* labels the upper filesystem refuses are not fatal, as in the kernel.
            if exc.errno in (errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM) and not bname.startswith(
                b"user."
            ):
                log.debug("xattr %r not copied: %s", bname, exc)
                continue
            raise


def set_origin(target: bytes | int, attr: bytes, ino: int) -> None:
    """Record the inode number an object had before its copy-up (see :mod:`whiteout`)."""
    value = struct.pack("<Q", ino)
    try:
        if isinstance(target, int):
            os.setxattr(target, attr, value)
        else:
            os.setxattr(target, attr, value, follow_symlinks=False)
    except OSError as exc:
        if exc.errno not in (errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM):
            raise
        log.debug("origin marker not stored: %s", exc)


def remove_tree_at(dir_fd: int, name: bytes) -> None:
    """Remove ``name`` inside ``dir_fd`` recursively, never following symlinks."""
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(st.st_mode):
        os.unlink(name, dir_fd=dir_fd)
        return
    fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    try:
        for child in os.listdir(fd):
            remove_tree_at(fd, os.fsencode(child))
    finally:
        os.close(fd)
    os.rmdir(name, dir_fd=dir_fd)


def clean_workdir(work_fd: int) -> int:
    """Remove leftovers of interrupted copy-ups from ``work/``; returns how many."""
    count = 0
    for child in os.listdir(work_fd):
        remove_tree_at(work_fd, os.fsencode(child))
        count += 1
    return count
