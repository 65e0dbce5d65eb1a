"""The work directory: temporary names, data copies (reflink, copy_file_range, holes kept),
and removing trees there without leaving the upper's mount.

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

from unionfs import format
from unionfs.errors import UnionfsError
from unionfs.fdops import DIR_OPEN_FLAGS, mount_id, open_dir_at

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
    top = _step(dir_fd, name, home)
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
    entered = _step(frame.fd, child, home)
    if not isinstance(entered, _Frame):
        return entered
    stack.append(entered)
    return True


def _step(dir_fd: int, name: bytes, home: tuple[int, int | None]) -> _Frame | bool:
    """Remove ``name`` in ``dir_fd`` if it is not a directory, else enter it.

    Returns the frame of a directory of this mount to empty, True when ``name`` is gone,
    False when it is left in place (another mount, or busy).
    """
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
    return _enter(dir_fd, name, home)


def _enter(dir_fd: int, name: bytes, home: tuple[int, int | None]) -> _Frame | bool:
    """Open directory ``name`` without following a symlink, as a frame to empty.

    The mount check is made again on the opened descriptor, so a mount placed on ``name``
    after it was examined is never entered (False: left in place). A name that is gone, or
    that turned into a symlink or a file meanwhile, is handled here (True: removed).
    """
    try:
        fd = os.open(name, DIR_OPEN_FLAGS, dir_fd=dir_fd)
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


def _lock_holder(fd: int) -> int | None:
    """The pid holding the flock on ``fd``'s inode, as /proc/locks tells it (None when it is
    not listed, or the holder is outside this process's pid namespace)."""
    st = os.fstat(fd)
    key = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    try:
        with open("/proc/locks") as f:
            for line in f:
                # "1: FLOCK  ADVISORY  WRITE 1234 fe:00:2393078 0 EOF"; a waiter has "->".
                fields = line.split()
                if len(fields) > 5 and fields[1] == "FLOCK" and fields[5] == key:
                    pid = int(fields[4])
                    return pid if pid > 0 else None
    except (OSError, ValueError):
        pass
    return None


def new_tmpfile(work_fd: int) -> int:
    """A new, nameless (``O_TMPFILE``) file in ``work/``, open for writing."""
    return os.open(b".", os.O_WRONLY | os.O_TMPFILE | os.O_CLOEXEC, 0o600, dir_fd=work_fd)


def link_tmpfile(fd: int, dir_fd: int, name: bytes) -> None:
    """Give the ``O_TMPFILE`` file ``fd`` the name ``name`` in ``dir_fd`` (through its
    ``/proc/self/fd`` link); fails on anything that holds the name (EEXIST)."""
    os.link(b"/proc/self/fd/%d" % fd, name, dst_dir_fd=dir_fd, follow_symlinks=True)


def tmpfile_links(work_fd: int) -> bool:
    """Whether ``work/`` takes O_TMPFILE files and :func:`link_tmpfile` names them (a probe
    file is linked and removed again)."""
    try:
        fd = new_tmpfile(work_fd)
    except OSError:
        return False
    name = temp_name()
    try:
        link_tmpfile(fd, work_fd, name)
    except OSError:
        return False
    finally:
        os.close(fd)
    os.unlink(name, dir_fd=work_fd)
    return True


class Workdir:
    """The mount's workdir: locked for the mount's life, with ``work/`` open and emptied.

    :meth:`open` returns the warnings the mount should print; nothing is appended to the
    configuration.
    """

    def __init__(self) -> None:
        self.work_fd = -1
        self.lock_fd = -1
        self.upper_dev = 0
        # Owner and group of a file created in work/: a copy with them needs no chown.
        self.euid, self.egid = os.geteuid(), os.getegid()
        # Whiteouts are written as .wh.<name> files: the upper filesystem refuses mknod.
        self.oci_whiteouts = False
        # False when work/ cannot be used (another mount in it or on it): the mount is then
        # read-only, as the kernel's overlay is.
        self.usable = True
        # True when the upper refuses trusted.* xattrs (no CAP_SYS_ADMIN in the initial
        # namespace: an unprivileged user, a user namespace): markers are then written in the
        # user.overlay.* namespace, as the kernel's ``userxattr`` mode does.
        self.trusted_refused = False
        # True when regular files are copied up as O_TMPFILE files linked in through
        # /proc/self/fd, as the kernel's overlay does on an upper that supports it.
        self.tmpfile = False

    def open(self, workdir: str, read_only: bool) -> list[str]:
        """Lock the workdir and open its ``work/``, through the descriptor opened when the
        configuration was validated (``workdir`` is then an ``OpenedDir``): the path is not
        resolved again, so a workdir swapped for a symlink since then is not followed. An
        unvalidated configuration (unit tests) opens the path now, never through a symlink.

        Returns warnings for the user. Raises UnionfsError when the workdir is in use by
        another mount or not writable; a ``work/`` that cannot be emptied leaves
        :attr:`usable` False.
        """
        take = getattr(workdir, "take", None)
        wfd = take() if take is not None else open_dir_at(-1, workdir)
        try:
            fcntl.flock(wfd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _lock_holder(wfd)
            os.close(wfd)
            by = f" (daemon pid {holder})" if holder else ""
            raise UnionfsError(
                f"workdir {workdir!r} is in use by another unionfs mount{by}"
            ) from None
        self.lock_fd = wfd
        if read_only:
            return []
        try:
            os.mkdir(WORK_SUBDIR, 0o700, dir_fd=wfd)
        except FileExistsError:
            pass
        except OSError as exc:
            raise UnionfsError(f"workdir {workdir!r} is not writable: {exc.strerror}") from None
        self.work_fd = open_dir_at(wfd, WORK_SUBDIR)
        work_st = os.fstat(self.work_fd)
        if work_st.st_mode & stat.S_ISGID:  # new files take the directory's group
            self.egid = work_st.st_gid
        self.upper_dev = work_st.st_dev
        kept: list[bytes] = []
        cleaned = clean_workdir(self.work_fd, kept)
        if cleaned:
            log.warning("removed %d leftover(s) of interrupted copy-ups from %s", cleaned, workdir)
        if kept or mount_id(self.work_fd) != mount_id(wfd):
            # Like the kernel: a work/ that cannot be emptied (another filesystem is mounted
            # in it or on it) is left alone, and the mount is read-only.
            os.close(self.work_fd)
            self.work_fd = -1
            self.usable = False
            return [
                f"workdir {workdir!r}: work/ cannot be emptied (another mount is in it or on "
                "it): mounting read-only"
            ]
        warnings = []
        self.tmpfile = tmpfile_links(self.work_fd)
        if not format.trusted_xattrs_supported(self.work_fd):
            self.trusted_refused = True
            warnings.append(
                "the upper filesystem refuses trusted.* xattrs (no CAP_SYS_ADMIN): markers are "
                "written as user.overlay.* (the kernel's userxattr mode)"
            )
        if not format.mknod_whiteouts_supported(self.work_fd):
            self.oci_whiteouts = True
            warnings.append(
                "the upper filesystem refuses mknod: whiteouts are written as .wh.<name> files"
            )
        return warnings

    def remove(self, name: bytes) -> bool:
        """Remove ``name`` (a tree built or moved into ``work/``) with everything below it."""
        return remove_tree_at(self.work_fd, name)

    def close(self) -> None:
        for fd in (self.work_fd, self.lock_fd):
            if fd >= 0:
                os.close(fd)
        self.work_fd = self.lock_fd = -1
