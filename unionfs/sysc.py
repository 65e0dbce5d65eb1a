"""System calls the Python 3.11 standard library lacks, through ctypes."""

from __future__ import annotations

import ctypes
import ctypes.util
import os

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
