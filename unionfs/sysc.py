"""System calls the Python 3.11 standard library lacks, through ctypes."""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import struct

RENAME_NOREPLACE = 1 << 0
RENAME_EXCHANGE = 1 << 1
RENAME_WHITEOUT = 1 << 2

AT_FDCWD = -100

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_renameat2 = _libc.renameat2
_renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
_renameat2.restype = ctypes.c_int


def renameat2(old_dir_fd: int, old: bytes, new_dir_fd: int, new: bytes, flags: int = 0) -> None:
    """``renameat2(2)``; raises OSError with the errno on failure."""
    if _renameat2(old_dir_fd, old, new_dir_fd, new, flags) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


AT_SYMLINK_NOFOLLOW = 0x100
AT_EMPTY_PATH = 0x1000
STATX_TYPE = 0x1
STATX_MNT_ID = 0x1000

_statx = _libc.statx
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
    if _statx(dir_fd, name, flags, STATX_TYPE | STATX_MNT_ID, buf) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), name)
    # struct statx: stx_mask is the u32 at offset 0, stx_mnt_id the u64 at offset 144.
    mask, mnt = struct.unpack_from("=I", buf, 0)[0], struct.unpack_from("=Q", buf, 144)[0]
    if not mask & STATX_MNT_ID:
        raise OSError(errno.EOPNOTSUPP, "statx does not report a mount id", name)
    return int(mnt)


FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_COLLAPSE_RANGE = 0x08
FALLOC_FL_ZERO_RANGE = 0x10
FALLOC_FL_INSERT_RANGE = 0x20

_fallocate = _libc.fallocate
_fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_fallocate.restype = ctypes.c_int


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """``fallocate(2)`` with any mode; raises OSError with the errno on failure."""
    if _fallocate(fd, mode, offset, length) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))
