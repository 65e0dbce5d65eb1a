"""POSIX ACL inheritance for objects that unionfs builds in ``work/`` before renaming them in.

An object created directly in an upper directory inherits that directory's default ACL from
the upper filesystem itself. An object built in ``work/`` (a new name over a whiteout) does
not, so unionfs applies the rule itself, as the kernel's overlay does (``posix_acl_create``):
the new object's access ACL is the parent's default ACL masked by the requested mode, its
mode follows that ACL, and a directory also takes the default ACL. The umask plays no part
when a default ACL exists.

The xattr format (``system.posix_acl_access`` / ``_default``): a little-endian u32 version
(2), then entries of u16 tag, u16 permission bits, u32 id.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

ACL_VERSION = 2
USER_OBJ, USER, GROUP_OBJ, GROUP, MASK, OTHER = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20
ACCESS_XATTR = b"system.posix_acl_access"
DEFAULT_XATTR = b"system.posix_acl_default"

_HEADER = struct.Struct("<I")
_ENTRY = struct.Struct("<HHI")


@dataclass
class Entry:
    tag: int
    perm: int
    id: int


def parse(raw: bytes) -> list[Entry]:
    """The entries of an ACL xattr value; ValueError when it is malformed."""
    if len(raw) < _HEADER.size or (len(raw) - _HEADER.size) % _ENTRY.size:
        raise ValueError("malformed POSIX ACL")
    if _HEADER.unpack_from(raw)[0] != ACL_VERSION:
        raise ValueError("unknown POSIX ACL version")
    return [
        Entry(*_ENTRY.unpack_from(raw, off)) for off in range(_HEADER.size, len(raw), _ENTRY.size)
    ]


def encode(entries: list[Entry]) -> bytes:
    return _HEADER.pack(ACL_VERSION) + b"".join(_ENTRY.pack(e.tag, e.perm, e.id) for e in entries)


def inherit(default_acl: bytes, mode: int) -> tuple[int, bytes | None]:
    """The mode and access ACL of a new object with requested ``mode`` under a directory whose
    default ACL is ``default_acl`` (``posix_acl_create``); the ACL is None when the mode alone
    expresses it."""
    entries = parse(default_acl)
    extended = False
    group_obj: Entry | None = None
    mask: Entry | None = None
    for e in entries:
        if e.tag == USER_OBJ:
            e.perm &= (mode >> 6) & 7
            mode &= (e.perm << 6) | ~0o700
        elif e.tag in (USER, GROUP):
            extended = True
        elif e.tag == GROUP_OBJ:
            group_obj = e
        elif e.tag == OTHER:
            e.perm &= mode & 7
            mode &= e.perm | ~0o007
        elif e.tag == MASK:
            mask = e
            extended = True
    masking = mask or group_obj
    if masking is not None:
        masking.perm &= (mode >> 3) & 7
        mode &= (masking.perm << 3) | ~0o070
    return mode, encode(entries) if extended else None
