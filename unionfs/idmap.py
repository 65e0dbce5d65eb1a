"""Owner mapping of a mount: fuse-overlayfs's ``uidmapping=``/``gidmapping=`` and ``squash_*``.

The syntax and meaning are fuse-overlayfs's (``read_mappings`` and ``find_mapping`` in its
``main.c``): a value is a ``:``-separated list of numbers read three at a time as
``STORED:SHOWN:LENGTH`` ranges, so ``0:100000:65536:65536:200000:1000`` is two ranges. Empty
fields are skipped (fuse-overlayfs splits with ``strtok``), which is why the leading-colon form
containers-storage builds (``uidmapping=:0:1:65536``, each range appended as ``:C:H:N``) reads
as one range. The first number of a range is the id *stored in the layers*, the second the id
*the mount shows*: the man page's ``uidmapping=0:1000:1`` shows files owned by 0 on disk as
1000. (containers-storage calls them ``ContainerID:HostID``: its layers hold the container's
ids, and the mount is seen from the host.)

Both ways:

* stored -> shown (stat replies, ACL and capability xattrs read): an id in no range is shown
  as the overflow id (``/proc/sys/kernel/overflowuid``, 65534), as fuse-overlayfs does;
* shown -> stored (chown, ACL and capability xattrs written): an id in no range is refused
  with ``EINVAL``, as the kernel's ``chown`` refuses an id it cannot map, so that nothing is
  silently given to ``nobody`` (fuse-overlayfs writes the overflow id). The owner of a new
  object made by a caller in no range is the overflow id, as in fuse-overlayfs
  (:meth:`IdMap.creator_stored`): podman creates files in a mapped rootfs as host root.

``squash_to_root``, ``squash_to_uid=N`` and ``squash_to_gid=N`` change only what is shown
(every object owned by 0 or N), as in fuse-overlayfs; writes still map shown -> stored, and a
chown that cannot be stored (refused by the upper, or an unmapped id) is dropped without an
error, as fuse-overlayfs's ``do_fchown`` does under squash.
"""

from __future__ import annotations

import dataclasses
import errno
import struct
from collections.abc import Callable

from unionfs.errors import UsageError

OVERFLOW_ID = 65534
_MAX_ID = 0xFFFFFFFF

Range = tuple[int, int, int]  # (stored, shown, length)
_IdFn = Callable[[int], int]


def parse_mapping(option: str, value: str) -> tuple[Range, ...]:
    """The ranges of a ``uidmapping=``/``gidmapping=`` value; :class:`UsageError` (one line)
    if it is not a whole number of ``STORED:SHOWN:LENGTH`` triples of ids."""
    fields = [f for f in value.split(":") if f]
    bad = UsageError(
        f"option {option}={value}: expected STORED:SHOWN:LENGTH[:STORED:SHOWN:LENGTH...]"
    )
    if not fields or len(fields) % 3 or not all(f.isdigit() for f in fields):
        raise bad
    nums = [int(f) for f in fields]
    ranges: list[Range] = []
    for i in range(0, len(nums), 3):
        stored, shown, length = nums[i : i + 3]
        if length == 0 or stored + length - 1 > _MAX_ID or shown + length - 1 > _MAX_ID:
            raise bad
        ranges.append((stored, shown, length))
    return tuple(ranges)


def _overflow(kind: str) -> int:
    try:
        with open(f"/proc/sys/kernel/overflow{kind}", "rb") as f:
            return int(f.read())
    except (OSError, ValueError):
        return OVERFLOW_ID


@dataclasses.dataclass(frozen=True)
class IdMap:
    """The owner mapping of one mount (see the module docstring). Built only when a mapping
    or a squash option is given: without one the adapter does no id work at all."""

    uids: tuple[Range, ...] = ()
    gids: tuple[Range, ...] = ()
    squash_uid: int | None = None  # every object shown as owned by this uid
    squash_gid: int | None = None
    overflow_uid: int = OVERFLOW_ID
    overflow_gid: int = OVERFLOW_ID

    @classmethod
    def of(
        cls,
        uids: tuple[Range, ...],
        gids: tuple[Range, ...],
        squash_root: bool,
        squash_uid: int | None,
        squash_gid: int | None,
    ) -> IdMap | None:
        """The mapping for these options, or None when they ask for none."""
        if squash_root:
            # fuse-overlayfs: squash_to_uid/gid win over squash_to_root for their own kind.
            squash_uid = 0 if squash_uid is None else squash_uid
            squash_gid = 0 if squash_gid is None else squash_gid
        if not uids and not gids and squash_uid is None and squash_gid is None:
            return None
        return cls(uids, gids, squash_uid, squash_gid, _overflow("uid"), _overflow("gid"))

    @property
    def squashes(self) -> bool:
        """Whether the mount shows squashed owners (then a chown never fails)."""
        return self.squash_uid is not None or self.squash_gid is not None

    @staticmethod
    def _to_shown(ranges: tuple[Range, ...], ident: int, overflow: int) -> int:
        if not ranges:
            return ident
        for stored, shown, length in ranges:
            if stored <= ident < stored + length:
                return shown + ident - stored
        return overflow

    @staticmethod
    def _to_stored(ranges: tuple[Range, ...], ident: int) -> int:
        if not ranges:
            return ident
        for stored, shown, length in ranges:
            if shown <= ident < shown + length:
                return stored + ident - shown
        raise OSError(errno.EINVAL, f"id {ident} is not mapped by this mount")

    def uid_shown(self, uid: int) -> int:
        """The uid the mount shows for ``uid`` stored in a layer (squash applied)."""
        if self.squash_uid is not None:
            return self.squash_uid
        return self._to_shown(self.uids, uid, self.overflow_uid)

    def gid_shown(self, gid: int) -> int:
        if self.squash_gid is not None:
            return self.squash_gid
        return self._to_shown(self.gids, gid, self.overflow_gid)

    def uid_stored(self, uid: int) -> int:
        """The uid to store for ``uid`` given through the mount; EINVAL if it has none."""
        return self._to_stored(self.uids, uid)

    def gid_stored(self, gid: int) -> int:
        return self._to_stored(self.gids, gid)

    def creator_stored(self, uid: int, gid: int) -> tuple[int, int]:
        """The stored owner of an object the caller ``uid``/``gid`` creates. A caller in no
        range (host root making /etc/mtab in a container's rootfs before the container
        starts, as podman does) gets the overflow ids stored, as in fuse-overlayfs: refusing
        would stop the container from starting; the runtime chowns such files after."""
        try:
            suid = self._to_stored(self.uids, uid)
        except OSError:
            suid = self.overflow_uid
        try:
            sgid = self._to_stored(self.gids, gid)
        except OSError:
            sgid = self.overflow_gid
        return suid, sgid

    # -- ids inside xattr values ---------------------------------------------------------

    def xattr_shown(self, name: bytes, value: bytes) -> bytes:
        """``value`` of xattr ``name`` as read from a layer, with its ids shown (ACL entries
        of named users and groups, the root id of a v3 file capability); ids in no range
        become the overflow ids. Other xattrs and malformed values are returned unchanged."""
        if name in _ACL_NAMES:
            # Squash does not reach ACL entries: fuse-overlayfs squashes only stat's owner.
            return _map_acl(
                value,
                lambda u: self._to_shown(self.uids, u, self.overflow_uid),
                lambda g: self._to_shown(self.gids, g, self.overflow_gid),
            )
        if name == CAPABILITY:
            return _map_caprootid(value, lambda u: self._to_shown(self.uids, u, self.overflow_uid))
        return value

    def xattr_stored(self, name: bytes, value: bytes) -> bytes:
        """``value`` of xattr ``name`` given through the mount, with its ids as stored;
        EINVAL if one of them is in no range."""
        if name in _ACL_NAMES:
            return _map_acl(value, self.uid_stored, self.gid_stored)
        if name == CAPABILITY:
            return _map_caprootid(value, self.uid_stored)
        return value


# POSIX ACL xattr format (include/uapi/linux/posix_acl_xattr.h): a little-endian u32 version
# (2), then 8-byte entries: u16 tag, u16 perm, u32 id. Only named users and groups carry ids.
ACL_ACCESS = b"system.posix_acl_access"
ACL_DEFAULT = b"system.posix_acl_default"
_ACL_NAMES = frozenset((ACL_ACCESS, ACL_DEFAULT))
_ACL_VERSION = 2
_ACL_USER = 0x02
_ACL_GROUP = 0x08
_ACL_ENTRY = struct.Struct("<HHI")

# File capabilities (include/uapi/linux/capability.h): v3 is the v2 layout plus a u32 root id.
CAPABILITY = b"security.capability"
_VFS_CAP_REVISION_MASK = 0xFF000000
_VFS_CAP_REVISION_3 = 0x03000000
_VFS_CAP_V3_SIZE = 24


def _map_acl(value: bytes, uid: _IdFn, gid: _IdFn) -> bytes:
    if len(value) < 4 or (len(value) - 4) % _ACL_ENTRY.size:
        return value
    if int.from_bytes(value[:4], "little") != _ACL_VERSION:
        return value
    out = bytearray(value)
    for off in range(4, len(value), _ACL_ENTRY.size):
        tag, perm, ident = _ACL_ENTRY.unpack_from(value, off)
        if tag == _ACL_USER:
            _ACL_ENTRY.pack_into(out, off, tag, perm, uid(ident))
        elif tag == _ACL_GROUP:
            _ACL_ENTRY.pack_into(out, off, tag, perm, gid(ident))
    return bytes(out)


def _map_caprootid(value: bytes, uid: _IdFn) -> bytes:
    if len(value) != _VFS_CAP_V3_SIZE:
        return value
    magic = int.from_bytes(value[:4], "little")
    if magic & _VFS_CAP_REVISION_MASK != _VFS_CAP_REVISION_3:
        return value
    rootid = int.from_bytes(value[20:24], "little")
    return value[:20] + uid(rootid).to_bytes(4, "little")
