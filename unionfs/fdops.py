"""Every fd-relative, no-follow system call the daemon and the layer tools make.

The discipline (see docs/security-mount.md): a layer object is reached as one name relative
to a directory descriptor of its parent, never by a path string that could be re-resolved.

* directories are opened ``O_DIRECTORY | O_NOFOLLOW`` (:func:`open_dir_at`);
* other objects are pinned with ``O_PATH | O_NOFOLLOW`` (:func:`open_path`), checked, and
  only then reopened for I/O through ``/proc/self/fd/N`` (:func:`reopen`);
* xattrs go through ``/proc/self/fd/N/name`` with ``follow_symlinks=False``
  (:func:`at_path`), as Linux has no ``getxattrat``;
* the calls the Python 3.11 standard library lacks (``renameat2``, ``statx``,
  ``fallocate``, ``name_to_handle_at``, ``open_by_handle_at``) go through :data:`libc`, the
  one ctypes handle of the package (``unionfs.net.syscalls`` binds its calls on it too).

This module knows nothing about overlayfs: what the names and xattrs mean is
:mod:`unionfs.format`'s business.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import os
import re
import struct

# glibc's soname first: ctypes.util.find_library runs `ldconfig -p` in a subprocess, a few
# milliseconds of every command and mount that imports this module.
try:
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
except OSError:  # another C library
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


def check(result: int, what: str | bytes | None = None) -> int:
    """``result`` of a libc call, or the OSError its errno names when it is negative."""
    if result < 0:
        code = ctypes.get_errno()
        if what is None:
            raise OSError(code, os.strerror(code))
        raise OSError(code, os.strerror(code), what)
    return result


# -- opening ---------------------------------------------------------------------------------

DIR_OPEN_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
PATH_FLAGS = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC


def open_dir_at(dir_fd: int, name: bytes | str) -> int:
    """Open the directory ``name`` inside ``dir_fd`` for listing, never following a symlink.

    ``O_NOATIME`` keeps reads of lower directories from updating their atime; it is only
    allowed for the owner or root, so it is dropped when refused.
    """
    try:
        return os.open(name, DIR_OPEN_FLAGS | os.O_NOATIME, dir_fd=dir_fd)
    except PermissionError:
        return os.open(name, DIR_OPEN_FLAGS, dir_fd=dir_fd)


def open_path(dir_fd: int, name: bytes) -> int:
    """An ``O_PATH`` descriptor of ``name`` in ``dir_fd`` (a symlink is pinned, not followed)."""
    return os.open(name, PATH_FLAGS, dir_fd=dir_fd)


def proc_path(fd: int) -> str:
    """The ``/proc/self/fd`` path of ``fd``: reopening it reaches the object itself."""
    return f"/proc/self/fd/{fd}"


def reopen(path_fd: int, flags: int) -> int:
    """Open the object pinned by ``path_fd`` again, for I/O, with ``flags``."""
    return os.open(proc_path(path_fd), flags)


def chmod_at(dir_fd: int, name: bytes, mode: int) -> None:
    """chmod without following a symlink (fchmodat has no working NOFOLLOW on Linux)."""
    fd = open_path(dir_fd, name)
    try:
        os.chmod(proc_path(fd), mode)
    finally:
        os.close(fd)


def fd_target(fd: int) -> bytes:
    """Where the kernel says ``fd`` is (its ``/proc/self/fd`` link), for containment checks."""
    return os.readlink(proc_path(fd).encode())


# -- xattrs ----------------------------------------------------------------------------------


def at_path(dir_fd: int, name: bytes) -> bytes:
    """A path naming ``name`` inside the directory open as ``dir_fd``, for the *xattr calls.

    Linux has no ``getxattrat``. Resolving ``/proc/self/fd/N/name`` with the path-based call
    and ``follow_symlinks=False`` walks into the directory ``dir_fd`` refers to, then takes
    ``name`` there without following it: the same effect, and a symlink in a layer can never
    redirect the call outside the layer. ``name`` is one path component (no ``/``).
    """
    return b"/proc/self/fd/%d/%s" % (dir_fd, name)


def quiet(exc: OSError) -> bool:
    """True for the errors that mean "no such xattr here" rather than a failure."""
    return exc.errno in (
        errno.ENODATA,
        errno.ENOTSUP,
        errno.EOPNOTSUPP,
        errno.ENOENT,
        errno.EPERM,
        errno.EACCES,
    )


def getxattr_at(dir_fd: int, name: bytes, attr: bytes) -> bytes | None:
    """The value of xattr ``attr`` on ``name`` in ``dir_fd`` (never followed), or None."""
    try:
        return os.getxattr(at_path(dir_fd, name), attr, follow_symlinks=False)
    except OSError as exc:
        if quiet(exc):
            return None
        raise


def fd_getxattr(fd: int, attr: bytes) -> bytes | None:
    """The value of xattr ``attr`` on the open (not ``O_PATH``) descriptor ``fd``, or None."""
    try:
        return os.getxattr(fd, attr)
    except OSError as exc:
        if quiet(exc):
            return None
        raise


def fd_listxattr(fd: int) -> list[str] | None:
    """The xattr names of the open descriptor ``fd``; None where xattrs cannot be read."""
    try:
        return os.listxattr(fd)
    except OSError as exc:
        if quiet(exc):
            return None
        raise


# An open descriptor; an at_path() path (bytes: never followed); or the proc_path() of an
# O_PATH descriptor, which the *xattr calls refuse (str: followed, as that magic link leads to
# the object itself and no further, even for a symlink).
Target = bytes | int | str


def listxattr(target: Target) -> list[str]:
    """``listxattr`` on a :data:`Target`."""
    if isinstance(target, int):
        return os.listxattr(target)
    return os.listxattr(target, follow_symlinks=isinstance(target, str))


def getxattr(target: Target, attr: bytes) -> bytes:
    """``getxattr`` on a :data:`Target`."""
    if isinstance(target, int):
        return os.getxattr(target, attr)
    return os.getxattr(target, attr, follow_symlinks=isinstance(target, str))


def setxattr(target: Target, attr: bytes, value: bytes, flags: int = 0) -> None:
    """``setxattr`` on a :data:`Target`."""
    if isinstance(target, int):
        os.setxattr(target, attr, value, flags)
    else:
        os.setxattr(target, attr, value, flags, follow_symlinks=isinstance(target, str))


def removexattr(target: Target, attr: bytes) -> None:
    """``removexattr`` on a :data:`Target`."""
    if isinstance(target, int):
        os.removexattr(target, attr)
    else:
        os.removexattr(target, attr, follow_symlinks=isinstance(target, str))


# -- renameat2 -------------------------------------------------------------------------------

RENAME_NOREPLACE = 1 << 0
RENAME_EXCHANGE = 1 << 1
RENAME_WHITEOUT = 1 << 2

AT_FDCWD = -100

_renameat2 = libc.renameat2
_renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
_renameat2.restype = ctypes.c_int


def renameat2(old_dir_fd: int, old: bytes, new_dir_fd: int, new: bytes, flags: int = 0) -> None:
    """``renameat2(2)``; raises OSError with the errno on failure."""
    check(_renameat2(old_dir_fd, old, new_dir_fd, new, flags))


# -- statx: the mount id ---------------------------------------------------------------------

AT_SYMLINK_NOFOLLOW = 0x100
AT_EMPTY_PATH = 0x1000
STATX_TYPE = 0x1
STATX_MNT_ID = 0x1000

_statx = libc.statx
_statx.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_uint, ctypes.c_void_p]
_statx.restype = ctypes.c_int


def mount_id(dir_fd: int, name: bytes = b"") -> int:
    """The mount id of ``name`` in ``dir_fd`` (of ``dir_fd`` itself when ``name`` is empty).

    ``statx(2)`` with ``STATX_MNT_ID``; a trailing symlink is not followed, but a name that is
    a mount point reports the mount on it, which is how a bind mount on the same filesystem
    (same ``st_dev``) is told apart. Raises OSError with the errno on failure.
    """
    buf = ctypes.create_string_buffer(256)
    flags = AT_SYMLINK_NOFOLLOW | (0 if name else AT_EMPTY_PATH)
    check(_statx(dir_fd, name, flags, STATX_TYPE | STATX_MNT_ID, buf), name)
    # struct statx: stx_mask is the u32 at offset 0, stx_mnt_id the u64 at offset 144.
    mask, mnt = struct.unpack_from("=I", buf, 0)[0], struct.unpack_from("=Q", buf, 144)[0]
    if not mask & STATX_MNT_ID:
        raise OSError(errno.EOPNOTSUPP, "statx does not report a mount id", name)
    return int(mnt)


# -- fallocate -------------------------------------------------------------------------------

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_COLLAPSE_RANGE = 0x08
FALLOC_FL_ZERO_RANGE = 0x10
FALLOC_FL_INSERT_RANGE = 0x20

_fallocate = libc.fallocate
_fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_fallocate.restype = ctypes.c_int


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """``fallocate(2)`` with any mode; raises OSError with the errno on failure."""
    check(_fallocate(fd, mode, offset, length))


# -- file handles ----------------------------------------------------------------------------

MAX_HANDLE_SZ = 128
# FS_IOC_GETFSUUID = _IOR(0x15, 0, struct fsuuid2 {u8 len; u8 uuid[16];}) (Linux 6.5+).
_FS_IOC_GETFSUUID = (2 << 30) | (17 << 16) | (0x15 << 8)
NULL_UUID = bytes(16)


class _FileHandle(ctypes.Structure):
    _fields_ = [
        ("handle_bytes", ctypes.c_uint),
        ("handle_type", ctypes.c_int),
        ("f_handle", ctypes.c_ubyte * MAX_HANDLE_SZ),
    ]


_name_to_handle_at = libc.name_to_handle_at
_name_to_handle_at.argtypes = [
    ctypes.c_int,
    ctypes.c_char_p,
    ctypes.POINTER(_FileHandle),
    ctypes.POINTER(ctypes.c_int),
    ctypes.c_int,
]
_name_to_handle_at.restype = ctypes.c_int
_open_by_handle_at = libc.open_by_handle_at
_open_by_handle_at.argtypes = [ctypes.c_int, ctypes.POINTER(_FileHandle), ctypes.c_int]
_open_by_handle_at.restype = ctypes.c_int


def name_to_handle_at(dir_fd: int, name: bytes = b"") -> tuple[int, bytes] | None:
    """``(handle type, handle bytes)`` of ``name`` in ``dir_fd`` (with ``name`` empty: of the
    object open as ``dir_fd``), never following it; None when the filesystem makes none."""
    handle = _FileHandle()
    handle.handle_bytes = MAX_HANDLE_SZ
    mount = ctypes.c_int()
    flags = AT_EMPTY_PATH if not name else 0
    if _name_to_handle_at(dir_fd, name, ctypes.byref(handle), ctypes.byref(mount), flags) < 0:
        return None
    return handle.handle_type, bytes(handle.f_handle[: handle.handle_bytes])


def open_by_handle_at(mount_fd: int, htype: int, fid: bytes) -> int:
    """Open the object of a file handle on the filesystem of ``mount_fd`` with ``O_PATH``
    (nothing is read through it). Raises OSError: ESTALE for a handle naming nothing, EPERM
    without CAP_DAC_READ_SEARCH."""
    handle = _FileHandle()
    handle.handle_bytes = len(fid)
    handle.handle_type = htype
    ctypes.memmove(handle.f_handle, fid, len(fid))
    return check(_open_by_handle_at(mount_fd, ctypes.byref(handle), os.O_PATH | os.O_CLOEXEC))


_OCTAL_ESCAPE = re.compile(rb"\\([0-7]{3})")


def mounts(mountinfo: str = "/proc/self/mountinfo") -> list[tuple[str, str, bytes, str]]:
    """(mount id, ``major:minor``, mount point, filesystem type) of each mount listed in a
    mountinfo file, in its order (the newest mount on a point last). A mount id names one
    mount in one namespace: each namespace's copy has its own."""
    out = []
    with open(mountinfo, "rb") as f:
        for line in f:
            fields = line.split()
            sep = fields.index(b"-")
            where = _OCTAL_ESCAPE.sub(lambda m: bytes([int(m[1], 8)]), fields[4])
            out.append((fields[0].decode(), fields[2].decode(), where, fields[sep + 1].decode()))
    return out


TMPFS_MAGIC = 0x01021994
RAMFS_MAGIC = 0x858458F6
_fstatfs = libc.fstatfs
_fstatfs.argtypes = [ctypes.c_int, ctypes.c_void_p]
_fstatfs.restype = ctypes.c_int


def fs_magic(fd: int) -> int:
    """The filesystem type (``f_type`` of fstatfs) holding the open descriptor ``fd``."""
    buf = ctypes.create_string_buffer(256)  # struct statfs: f_type is its first field
    check(_fstatfs(fd, buf))
    return ctypes.c_long.from_buffer(buf).value & 0xFFFFFFFF


def fs_uuid(fd: int) -> bytes:
    """The ``s_uuid`` of the filesystem holding the open descriptor ``fd`` (16 bytes).

    A filesystem that has none, or a kernel without FS_IOC_GETFSUUID, gives the null uuid.
    """
    try:
        raw = fcntl.ioctl(fd, _FS_IOC_GETFSUUID, bytes(17))
    except OSError:
        return NULL_UUID
    length = raw[0]
    return bytes(raw[1 : 1 + length]).ljust(16, b"\0")[:16]
