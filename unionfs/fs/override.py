"""Owner and mode kept in an xattr: fuse-overlayfs's ``xattr_permissions`` and the
``override_stat`` xattrs of containers-storage.

A layer may record the owner and mode an object should show in an xattr instead of in its
inode, for a writer that may not chown (a user without root, or containers-storage with
``ignore_chown_errors``/``force_mask``). Three names exist (:data:`unionfs.format.OVERRIDE_STAT`):

* ``security.fuseoverlayfs.override_stat`` -- written with ``xattr_permissions=1`` (root);
* ``user.containers.override_stat`` -- written by containers-storage;
* ``user.fuseoverlayfs.override_stat`` -- written with ``xattr_permissions=2`` (no root).

As in fuse-overlayfs, which name a layer carries is decided once per layer at mount, by
which of them its root directory has (in that order of preference). With the option the
upper uses the option's name (``user.containers.override_stat`` for ``2`` when the upper's
root already carries it), and its root is given one at mount if it has none: a lower root's
value, else the upper root's own owner and mode.

The value is ``UID:GID:MODE`` (decimal ids as stored in the layers, octal mode; fuse-overlayfs
writes the whole ``st_mode``, file type included) or the extended form
``UID:GID:MODE:TYPE`` of containers-storage, where ``TYPE`` is ``file``, ``dir``, ``symlink``,
``pipe``, ``socket``, ``block-MAJOR-MINOR`` or ``char-MAJOR-MINOR``. Only regular files and
directories carry one (``user.*`` xattrs exist on nothing else), so a device made through a
mount with the option is a regular file whose value names the device; it shows as that device.

With the option, a chown or chmod writes the xattr and leaves the upper inode's owner and mode
alone; a copy-up records the owner and mode the lower object showed; a new object records its
creator. The names are hidden through the mount and cannot be set or removed through it.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
import stat

from unionfs import fdops, format
from unionfs.errors import UnionfsError
from unionfs.layers import LayerStack

log = logging.getLogger(__name__)

PRIVILEGED, CONTAINERS, USER = format.OVERRIDE_STAT

_KINDS = {
    b"file": stat.S_IFREG,
    b"dir": stat.S_IFDIR,
    b"symlink": stat.S_IFLNK,
    b"pipe": stat.S_IFIFO,
    b"socket": stat.S_IFSOCK,
    b"block": stat.S_IFBLK,
    b"char": stat.S_IFCHR,
}
_KIND_NAMES = {v: k for k, v in _KINDS.items()}


@dataclasses.dataclass(frozen=True)
class Recorded:
    """One override value: stored ids, permission bits, and a file type when it names one."""

    uid: int
    gid: int
    perm: int  # S_IMODE bits
    kind: int | None = None  # S_IFMT of the extended form; None: the object's own
    rdev: int = 0


def parse(value: bytes) -> Recorded | None:
    """The override in ``value``, or None when it is not one (it is then ignored)."""
    fields = value.rstrip(b"\0").split(b":")
    if len(fields) not in (3, 4):
        return None
    try:
        uid, gid, mode = int(fields[0]), int(fields[1]), int(fields[2], 8)
    except ValueError:
        return None
    if not (0 <= uid <= 0xFFFFFFFF and 0 <= gid <= 0xFFFFFFFF and mode >= 0):
        return None
    if len(fields) == 3:
        return Recorded(uid, gid, stat.S_IMODE(mode))
    kind_name, *dev = fields[3].split(b"-")
    kind = _KINDS.get(kind_name)
    if kind is None:
        return None
    rdev = 0
    if kind in (stat.S_IFBLK, stat.S_IFCHR):
        if len(dev) != 2 or not all(d.isdigit() for d in dev):
            return None
        rdev = os.makedev(int(dev[0]), int(dev[1]))
    elif dev:
        return None
    return Recorded(uid, gid, stat.S_IMODE(mode), kind, rdev)


def encode(uid: int, gid: int, st_mode: int, rdev: int = 0) -> bytes:
    """The value recording ``uid``/``gid``/``st_mode``: fuse-overlayfs's three fields for a
    regular file or a directory, the extended form for any other type (a device kept in a
    regular file)."""
    kind = stat.S_IFMT(st_mode)
    if kind in (stat.S_IFREG, stat.S_IFDIR):
        return b"%d:%d:%o" % (uid, gid, st_mode)
    name = _KIND_NAMES[kind]
    if kind in (stat.S_IFBLK, stat.S_IFCHR):
        name += b"-%d-%d" % (os.major(rdev), os.minor(rdev))
    return b"%d:%d:%04o:%s" % (uid, gid, stat.S_IMODE(st_mode), name)


def real_mode(st_mode: int) -> int:
    """The permission bits of an upper inode whose shown mode is in its override xattr: its
    own, plus what its owner (the daemon) needs to read, write and search it, whatever mode
    is shown; never a set-id bit."""
    extra = 0o700 if stat.S_ISDIR(st_mode) else 0o600
    return (stat.S_IMODE(st_mode) & 0o777) | extra


# Types a regular file may stand for (containers-storage keeps fifos and devices of a layer
# as regular files when it may not make them); a symlink is never one.
_STAND_INS = (stat.S_IFCHR, stat.S_IFBLK, stat.S_IFIFO, stat.S_IFSOCK)


def apply(st: os.stat_result, rec: Recorded) -> os.stat_result:
    """``st`` with the owner, mode (and, for a regular file whose extended value names a
    device, fifo or socket, that type and device) of ``rec``."""
    kind, rdev = stat.S_IFMT(st.st_mode), st.st_rdev
    if rec.kind in _STAND_INS and kind == stat.S_IFREG:
        kind, rdev = rec.kind, rec.rdev
    fields = list(st[:10])
    fields[0] = kind | rec.perm
    fields[4], fields[5] = rec.uid, rec.gid
    extra = {
        "st_atime": st.st_atime,
        "st_mtime": st.st_mtime,
        "st_ctime": st.st_ctime,
        "st_atime_ns": st.st_atime_ns,
        "st_mtime_ns": st.st_mtime_ns,
        "st_ctime_ns": st.st_ctime_ns,
        "st_blksize": st.st_blksize,
        "st_blocks": st.st_blocks,
        "st_rdev": rdev,
    }
    return os.stat_result(fields, extra)


def get_value(target: fdops.Target, name: bytes) -> bytes | None:
    """The raw value of the override xattr ``name`` on ``target``, or None when it has none
    (or the filesystem refuses the namespace)."""
    try:
        return fdops.getxattr(target, name)
    except OSError as exc:
        if exc.errno in (errno.ENODATA, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM):
            return None
        raise


def layer_name(root: fdops.Target) -> bytes | None:
    """The override name a layer carries, decided by its root directory ``root``: the first
    of :data:`unionfs.format.OVERRIDE_STAT` it has, or None. A mount without the option
    reads the layer by this name, and only by it."""
    for name in format.OVERRIDE_STAT:
        if get_value(root, name) is not None:
            return name
    return None


def carries(st_mode: int) -> bool:
    """Whether an object of this type has its override read: regular files and directories
    (``user.*`` xattrs exist on nothing else; a value on anything else is ignored)."""
    return stat.S_ISREG(st_mode) or stat.S_ISDIR(st_mode)


class Overrides:
    """Which override name each layer carries, and the one the upper writes (if any)."""

    def __init__(self, read: tuple[bytes | None, ...], write: bytes | None) -> None:
        self.read = read  # by layer index
        self.write = write  # the upper's name when the mount has xattr_permissions

    @classmethod
    def probe(cls, stack: LayerStack, level: int, writable: bool) -> Overrides | None:
        """The overrides of a mount with ``xattr_permissions=level`` (0: off) over ``stack``;
        None when no layer carries a name and the option is off. Writes the upper root's
        value when the option is on, the mount writable and the root has none; a refused
        write is a one-line error."""
        read = [layer_name(stack[index].root_fd) for index in range(len(stack))]
        write = None
        if level and stack.has_upper and writable:
            upper = stack[0].root_fd
            if level == 1:
                write = PRIVILEGED
            else:
                write = CONTAINERS if read[0] == CONTAINERS else USER
            read[0] = write
            if get_value(upper, write) is None:
                value = None
                for index in range(1, len(stack)):
                    names = (write, CONTAINERS) if level == 2 else (write,)
                    for name in names:
                        value = get_value(stack[index].root_fd, name)
                        if value is not None:
                            break
                    if value is not None:
                        break
                if value is None:
                    st = os.fstat(upper)
                    value = encode(st.st_uid, st.st_gid, st.st_mode)
                try:
                    fdops.setxattr(upper, write, value)
                except OSError as exc:
                    raise UnionfsError(
                        f"xattr_permissions={level}: the upper refuses the xattr "
                        f"{write.decode()}: {exc.strerror}"
                    ) from None
        if write is None and not any(read):
            return None
        return cls(tuple(read), write)

    def recorded(self, layer: int, target: fdops.Target) -> Recorded | None:
        """The override recorded on ``target`` (an object of ``layer``), or None."""
        name = self.read[layer]
        if name is None:
            return None
        value = get_value(target, name)
        return None if value is None else parse(value)

    def shown(self, layer: int, target: fdops.Target, st: os.stat_result) -> os.stat_result:
        """``st`` of the object ``target`` of ``layer`` as the mount shows it."""
        if self.read[layer] is None or not carries(st.st_mode):
            return st
        try:
            rec = self.recorded(layer, target)
        except OSError:
            return st
        return st if rec is None else apply(st, rec)

    def can_record(self, st_mode: int) -> bool:
        """Whether an upper object of this type carries the override (regular files and
        directories: ``user.*`` xattrs exist on nothing else)."""
        return self.write is not None and carries(st_mode)

    def record(self, target: fdops.Target, uid: int, gid: int, st_mode: int, rdev: int = 0) -> None:
        """Write the override of an upper object."""
        assert self.write is not None
        fdops.setxattr(target, self.write, encode(uid, gid, st_mode, rdev))
