"""Copy-up building blocks: data (reflink, copy_file_range, holes kept), metadata, cleanup.

A copy-up is always built under a temporary name in the workdir's ``work/`` directory -- data,
owner, mode, xattrs, origin, times -- made durable when the mount syncs, then renamed
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
from dataclasses import dataclass

from unionfs import whiteout
from unionfs.sysc import mount_id

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


def copy_xattrs(src: bytes | int, dst: bytes | int, userxattr: bool | None = None) -> None:
    """Copy every xattr that is not internal to the layer format from ``src`` to ``dst``.

    ``src``/``dst`` are descriptors or ``/proc/self/fd/N/name`` paths (never followed). With
    ``userxattr`` (the mount's mode), what the mount shows is copied, as the kernel does
    (escaped names, and the other namespace's overlay names but its markers); without it,
    nothing in either overlay namespace but escaped names.
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
        if userxattr is None:
            if whiteout.is_internal_xattr(bname):
                continue
        elif whiteout.is_private_xattr(bname, userxattr):
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


def set_origin(target: bytes | int, attr: bytes, origin: bytes | None) -> None:
    """Store ``origin`` (a value made by :func:`whiteout.encode_origin`) as ``attr`` on the
    copy being built (a descriptor, or a ``/proc/self/fd/N/name`` path, never followed).

    Nothing is stored for None (the lower filesystem makes no file handles), nor where the
    upper refuses the xattr: the object then shows its upper inode number, as in the kernel.
    """
    if origin is None:
        return
    try:
        if isinstance(target, int):
            os.setxattr(target, attr, origin)
        else:
            os.setxattr(target, attr, origin, follow_symlinks=False)
    except OSError as exc:
        if exc.errno not in (errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM):
            raise
        log.debug("origin not stored: %s", exc)


_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


@dataclass
class _Frame:
    """One directory being emptied by :func:`remove_tree_at`: its fd and unvisited names."""

    fd: int
    name: bytes
    names: list[bytes]
    # Something below was left in place (another mount): this directory stays too.
    kept: bool = False


def _mount_id(dir_fd: int, name: bytes = b"") -> int | None:
    """The mount id of ``name`` in ``dir_fd`` (or of ``dir_fd``); None if statx lacks it."""
    try:
        return mount_id(dir_fd, name)
    except OSError as exc:
        if exc.errno in (errno.ENOSYS, errno.EOPNOTSUPP):
            return None
        raise


def _foreign(st: os.stat_result, mnt: int | None, home: tuple[int, int | None]) -> bool:
    """True when an object with ``st``/``mnt`` lies on another mount than ``home``."""
    return st.st_dev != home[0] or (mnt is not None and home[1] is not None and mnt != home[1])


def remove_tree_at(dir_fd: int, name: bytes) -> bool:
    """Remove ``name`` inside ``dir_fd`` with everything below it; True when it is gone.

    The walk is iterative (a tree of any depth is fine; it holds one descriptor per level),
    never follows a symlink (``lstat``, ``O_NOFOLLOW``), and never enters another mount:
    an entry whose device or mount id differs from ``dir_fd``'s -- a bind mount, even of
    the same filesystem -- is left in place with a warning, and so are its ancestors, which
    cannot be empty. The kernel's overlay leaves such entries alone too (it works on the
    upper filesystem's dentries and never crosses a mount). Returns False when something was
    left; a name that does not exist counts as removed.
    """
    home = (os.fstat(dir_fd).st_dev, _mount_id(dir_fd))
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        mnt = _mount_id(dir_fd, name)
    except FileNotFoundError:
        return True
    if _foreign(st, mnt, home):
        _keep(name, "another filesystem is mounted there")
        return False
    if not stat.S_ISDIR(st.st_mode):
        return _unlink(dir_fd, name, is_dir=False)
    top = _enter(dir_fd, name, home)
    if not isinstance(top, _Frame):
        return top
    stack = [top]
    try:
        while stack:
            frame = stack[-1]
            if frame.names:
                child = frame.names.pop()
                if not _visit(frame, child, home, stack):
                    frame.kept = True
                continue
            stack.pop()
            os.close(frame.fd)
            parent = stack[-1] if stack else None
            if frame.kept or not _unlink(parent.fd if parent else dir_fd, frame.name, is_dir=True):
                if parent is None:
                    return False
                parent.kept = True
        return True
    finally:
        for frame in stack:
            os.close(frame.fd)


def _names(fd: int) -> list[bytes]:
    return [os.fsencode(child) for child in os.listdir(fd)]


def _visit(frame: _Frame, child: bytes, home: tuple[int, int | None], stack: list[_Frame]) -> bool:
    """Remove the non-directory ``child`` of ``frame`` or push it as a new frame.

    Returns False when ``child`` is left in place (another mount, or busy).
    """
    try:
        st = os.stat(child, dir_fd=frame.fd, follow_symlinks=False)
        mnt = _mount_id(frame.fd, child)
    except FileNotFoundError:
        return True
    if _foreign(st, mnt, home):
        _keep(child, "another filesystem is mounted there")
        return False
    if not stat.S_ISDIR(st.st_mode):
        return _unlink(frame.fd, child, is_dir=False)
    entered = _enter(frame.fd, child, home)
    if not isinstance(entered, _Frame):
        return entered
    stack.append(entered)
    return True


def _enter(dir_fd: int, name: bytes, home: tuple[int, int | None]) -> _Frame | bool:
    """Open directory ``name`` without following a symlink, as a frame to empty.

    The mount check is made again on the opened descriptor, so a mount placed on ``name``
    after it was examined is never entered (False: left in place). A name that is gone, or
    that turned into a symlink or a file meanwhile, is handled here (True: removed).
    """
    try:
        fd = os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
    except FileNotFoundError:
        return True
    except OSError as exc:
        if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
            raise
        return _unlink(dir_fd, name, is_dir=False)  # swapped for a symlink or a file
    try:
        if _foreign(os.fstat(fd), _mount_id(fd), home):
            _keep(name, "another filesystem is mounted there")
            os.close(fd)
            return False
        return _Frame(fd, name, _names(fd))
    except BaseException:
        os.close(fd)
        raise


def _unlink(dir_fd: int, name: bytes, *, is_dir: bool) -> bool:
    """Unlink or rmdir ``name``; False (with a warning) when it is a mount point (EBUSY)."""
    try:
        if is_dir:
            os.rmdir(name, dir_fd=dir_fd)
        else:
            os.unlink(name, dir_fd=dir_fd)
    except FileNotFoundError:
        pass
    except OSError as exc:
        if exc.errno != errno.EBUSY:
            raise
        _keep(name, "it is busy (a mount point)")
        return False
    return True


def _keep(name: bytes, reason: str) -> None:
    log.warning("work directory clean-up: left %r in place: %s", os.fsdecode(name), reason)


def clean_workdir(work_fd: int, kept: list[bytes] | None = None) -> int:
    """Remove leftovers of interrupted copy-ups from ``work/``; returns how many.

    Entries that cannot be removed without crossing into another mount stay, logged with a
    warning, and their names are appended to ``kept`` when given; when ``work/`` is itself a
    mount point, all of its entries stay. The kernel's overlay also leaves them, and then
    mounts read-only because it cannot recreate ``work/``.
    """
    parent = (os.stat(b"..", dir_fd=work_fd).st_dev, _mount_id(work_fd, b".."))
    if _foreign(os.fstat(work_fd), _mount_id(work_fd), parent):
        # work/ itself is a mount point: everything in it belongs to that other mount.
        names = _names(work_fd)
        if names:
            _keep(b"work", "another filesystem is mounted on it; nothing in it is removed")
        if kept is not None:
            kept.extend(names)
        return 0
    count = 0
    for child in _names(work_fd):
        if remove_tree_at(work_fd, child):
            count += 1
        elif kept is not None:
            kept.append(child)
    return count
