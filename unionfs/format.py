"""The on-disk format: every whiteout, opaque, origin and impure form, read and written here.

This is the only module that knows what a name or an xattr in a layer means. The mount
(:mod:`unionfs.fs`) and the layer tools (:mod:`unionfs.layertools`) read and write layers
through it; the system calls themselves are :mod:`unionfs.fdops`'s.

The format is the one of Linux overlayfs (Documentation/filesystems/overlayfs.rst), so a set
of layers written by unionfs mounts under the kernel's overlayfs with the same view, plus the
OCI image-spec forms found in layers unpacked from image tarballs.

Read in every layer:

* **char-device whiteout** -- a character device with device number 0/0 hides the same name
  in all layers below. Several names may be hard links of one such device (nlink > 1).
* **xattr whiteout** -- a zero-size regular file carrying ``trusted.overlay.whiteout`` (or
  ``user.overlay.whiteout``), honoured only inside a directory whose
  ``overlay.opaque`` xattr is ``"x"`` (that marker says "look for xattr whiteouts here"; it
  does *not* make the directory opaque).
* **OCI whiteout** -- a file named ``.wh.<name>`` hides ``<name>`` below.
* **opaque directory** -- ``trusted.overlay.opaque="y"`` or ``user.overlay.opaque="y"`` on a
  directory, or an entry named ``.wh..wh..opq`` inside it: the directories with the same path
  in lower layers are not merged.

Written in the upper layer:

* whiteouts as char 0/0 devices (mode 0, like the kernel's ``vfs_whiteout``); where mknod is
  refused (some unprivileged or network filesystems) as ``.wh.<name>`` files instead;
* opaque directories as ``trusted.overlay.opaque="y"`` (``user.overlay.opaque`` when mounted
  in the kernel's ``userxattr`` mode).

Markers are never shown through the mount: whiteout entries and ``.wh.*`` names are dropped
from listings and lookups; the private xattrs of the mount's own overlay namespace are hidden
(names given through the mount land escaped, see below), and so are the other namespace's
opaque and whiteout markers and the old ``*.unionfs.*`` names, which ``setxattr`` refuses.

A copy-up records where the object came from exactly as the kernel does:
``trusted.overlay.origin`` (``user.overlay.origin`` in userxattr mode) holds an ``ovl_fb`` file
handle of the lower object (see :func:`encode_origin`), so that the kernel and unionfs both show
the lower object's inode number after the copy-up, and again after a remount. Uppers written by
older unionfs versions carry ``trusted.unionfs.origin`` (8 bytes, the number shown before the
copy-up) instead: it is still read, never written, and never shown.

Names of the mount's own overlay namespace given through the mount are *escaped* like the
kernel (6.7+) does: ``trusted.overlay.foo`` is stored as ``trusted.overlay.overlay.foo`` and
shown back unescaped (:func:`xattr_layer_name`, :func:`xattr_mount_name`).
"""

from __future__ import annotations

import dataclasses
import enum
import errno
import logging
import os
import stat
import struct
import sys
from collections.abc import Iterator

from unionfs import fdops
from unionfs.fdops import fd_getxattr, getxattr_at

log = logging.getLogger(__name__)

OCI_WHITEOUT_PREFIX = b".wh."
OCI_OPAQUE_NAME = b".wh..wh..opq"

OPAQUE_XATTRS = (b"trusted.overlay.opaque", b"user.overlay.opaque")
WHITEOUT_XATTRS = (b"trusted.overlay.whiteout", b"user.overlay.whiteout")
ORIGIN_XATTRS = (b"trusted.overlay.origin", b"user.overlay.origin")
# Written by unionfs before it used the kernel's format: read as a fallback, never written.
OLD_ORIGIN_XATTRS = (b"trusted.unionfs.origin", b"user.unionfs.origin")

# The kernel marks an upper directory "impure" once it may hold an entry with an origin.
IMPURE_XATTRS = (b"trusted.overlay.impure", b"user.overlay.impure")


@dataclasses.dataclass(frozen=True)
class XattrNames:
    """The xattr names one mount writes and reads first, by mode (``userxattr``)."""

    opaque: bytes
    origin: bytes
    old_origin: bytes
    impure: bytes

    @classmethod
    def for_mode(cls, userxattr: bool) -> XattrNames:
        i = 1 if userxattr else 0
        return cls(OPAQUE_XATTRS[i], ORIGIN_XATTRS[i], OLD_ORIGIN_XATTRS[i], IMPURE_XATTRS[i])


# Value of overlay.opaque: "y" hides lower dirs; "x" only announces xattr whiteouts inside.
OPAQUE_YES = b"y"
OPAQUE_XWHITEOUTS = b"x"

_INTERNAL_PREFIXES = (
    b"trusted.overlay.",
    b"user.overlay.",
    b"trusted.unionfs.",
    b"user.unionfs.",
    b"user.fuseoverlayfs.",
)


# The overlay namespaces of the two modes (index: userxattr), and what an escaped name starts
# with. The kernel's first version tested the trusted form without its final dot; the kernel
# here (6.18) hides trusted.overlay.overlay and trusted.overlay.overlayX as private names, so
# both forms are tested with the dot.
_OWN_PREFIXES = (b"trusted.overlay.", b"user.overlay.")
_ESCAPE = b"overlay."
_ESCAPED_TEST = (b"trusted.overlay.overlay.", b"user.overlay.overlay.")
# Private namespaces of userspace overlays: unionfs's own (old origin, inspection) and
# fuse-overlayfs's (its rootless opaque marker and origin), hidden and never settable.
FUSE_OVERLAYFS_PREFIX = b"user.fuseoverlayfs."
FUSE_OVERLAYFS_OPAQUE = FUSE_OVERLAYFS_PREFIX + b"opaque"
_UNIONFS_PREFIXES = (b"trusted.unionfs.", b"user.unionfs.", FUSE_OVERLAYFS_PREFIX)
# Owner and mode kept in an xattr (unionfs.fs.override), in the order a layer's root is probed:
# fuse-overlayfs's xattr_permissions=1, containers-storage's, fuse-overlayfs's
# xattr_permissions=2. Hidden and never settable, like fuse-overlayfs's own names.
OVERRIDE_STAT = (
    b"security.fuseoverlayfs.override_stat",
    b"user.containers.override_stat",
    FUSE_OVERLAYFS_PREFIX + b"override_stat",
)
_HIDDEN_PREFIXES = (*_UNIONFS_PREFIXES, b"security.fuseoverlayfs.")
# Markers unionfs reads in every layer whatever the mode (the kernel only reads its own mode's):
# never settable nor shown through the mount in either mode.
_MARKERS = frozenset(OPAQUE_XATTRS + WHITEOUT_XATTRS)
XATTR_NAME_MAX = 255


def is_internal_xattr(name: bytes) -> bool:
    """True for xattrs that belong to the layer format in either mode: never copied up as
    they are, never exported as file content.

    Escaped names (``trusted.overlay.overlay.*``, ``user.overlay.overlay.*``) are a user's
    xattrs and are not internal: the kernel copies them up too.
    """
    if name.startswith(_INTERNAL_PREFIXES):
        return not name.startswith(_ESCAPED_TEST)
    return False


def xattr_layer_name(name: bytes, userxattr: bool) -> bytes | None:
    """The name under which the xattr ``name``, given through the mount, is stored in a layer.

    A name of the mount's own overlay namespace is escaped (``trusted.overlay.foo`` becomes
    ``trusted.overlay.overlay.foo``; ``user.overlay.*`` in userxattr mode), as the kernel does;
    EOPNOTSUPP when the escaped name would exceed XATTR_NAME_MAX (the kernel's answer too).
    None for a name reserved by the layer format in the other mode (the opaque and whiteout
    markers, which unionfs reads in both namespaces, and the old ``*.unionfs.*`` names): the
    caller refuses it. Every other name is stored as it is.
    """
    own = _OWN_PREFIXES[userxattr]
    if name.startswith(own):
        escaped = own + _ESCAPE + name[len(own) :]
        if len(escaped) > XATTR_NAME_MAX:
            raise OSError(errno.EOPNOTSUPP, os.strerror(errno.EOPNOTSUPP))
        return escaped
    if name in _MARKERS or name in OVERRIDE_STAT or name.startswith(_HIDDEN_PREFIXES):
        return None
    return name


def is_private_xattr(name: bytes, userxattr: bool) -> bool:
    """True for a layer xattr that a copy-up leaves behind in this mode: one the mount does
    not show (the kernel's ovl_is_private_xattr, plus the markers unionfs reads in both
    namespaces, which would change the view if they moved up)."""
    return xattr_mount_name(name, userxattr) is None


def xattr_mount_name(name: bytes, userxattr: bool) -> bytes | None:
    """How the xattr ``name`` found on a layer object shows through the mount; None: hidden.

    The inverse of :func:`xattr_layer_name`: an escaped name loses one ``overlay.`` (what the
    kernel's ovl_listxattr does), the private names of the own namespace and the reserved
    names are hidden.
    """
    own = _OWN_PREFIXES[userxattr]
    if name.startswith(own):
        if name.startswith(_ESCAPED_TEST[userxattr]):
            return own + name[len(own) + len(_ESCAPE) :]
        return None
    if name in _MARKERS or name in OVERRIDE_STAT or name.startswith(_HIDDEN_PREFIXES):
        return None
    return name


def is_marker_name(name: bytes) -> bool:
    """True for OCI marker names (``.wh.*``), which never appear in the merged view."""
    return name.startswith(OCI_WHITEOUT_PREFIX)


def oci_target(name: bytes) -> bytes | None:
    """The name an OCI whiteout entry hides, or None when ``name`` is not one.

    ``.wh..wh..opq`` is the opaque marker, not a whiteout, and yields None; so do names that
    would hide nothing valid (empty, ``.`` or ``..``).
    """
    if not name.startswith(OCI_WHITEOUT_PREFIX) or name == OCI_OPAQUE_NAME:
        return None
    target = name[len(OCI_WHITEOUT_PREFIX) :]
    if target in (b"", b".", b".."):
        return None
    return target


def is_chardev_whiteout(st: os.stat_result) -> bool:
    """True when ``st`` describes a kernel-format whiteout (char device 0/0)."""
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


# Read in every layer: the kernel's two namespaces, then fuse-overlayfs's rootless marker
# (an upper written by fuse-overlayfs mounts unchanged).
_READ_OPAQUE_XATTRS = (*OPAQUE_XATTRS, FUSE_OVERLAYFS_OPAQUE)
_OPAQUE_XATTR_NAMES = tuple(os.fsdecode(a) for a in _READ_OPAQUE_XATTRS)


def opaque_value(dir_fd: int) -> bytes | None:
    """The ``overlay.opaque`` value of the directory open as ``dir_fd`` (trusted first).

    Most directories have no such xattr: one listxattr says so, where a getxattr of each
    name would fail twice (and a failed call costs Python an exception).
    """
    try:
        names = os.listxattr(dir_fd)
    except OSError as exc:
        if fdops.quiet(exc):
            return None
        raise
    for attr, name in zip(_READ_OPAQUE_XATTRS, _OPAQUE_XATTR_NAMES, strict=True):
        if name in names:
            value = fd_getxattr(dir_fd, attr)
            if value is not None:
                return value
    return None


def is_xattr_whiteout(dir_fd: int, name: bytes, st: os.stat_result) -> bool:
    """True when ``name`` (a regular file in ``dir_fd``) is an xattr whiteout.

    The caller checks this only in directories whose opaque value is ``"x"``.
    """
    if not stat.S_ISREG(st.st_mode) or st.st_size != 0:
        return False
    return any(getxattr_at(dir_fd, name, attr) is not None for attr in WHITEOUT_XATTRS)


def make_whiteout(dir_fd: int, name: bytes, *, oci_fallback: bool = False) -> None:
    """Create a whiteout for ``name`` in the upper directory ``dir_fd``.

    Writes a char 0/0 device with mode 0 like the kernel, or ``.wh.<name>`` when
    ``oci_fallback`` is set (the mount found mknod refused at start-up).
    """
    if oci_fallback:
        fd = os.open(
            OCI_WHITEOUT_PREFIX + name,
            os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW,
            0o600,
            dir_fd=dir_fd,
        )
        os.close(fd)
        return
    os.mknod(name, stat.S_IFCHR | 0, os.makedev(0, 0), dir_fd=dir_fd)


def mark_opaque(fd: int, attr: bytes = OPAQUE_XATTRS[0]) -> None:
    """Mark the upper directory open as ``fd`` opaque (``overlay.opaque = "y"``)."""
    os.setxattr(fd, attr, OPAQUE_YES)


def trusted_xattrs_supported(dir_fd: int) -> bool:
    """Probe whether ``trusted.overlay.*`` can be written in the directory ``dir_fd``."""
    probe = b".unionfs-xattr-probe-%d" % os.getpid()
    os.mkdir(probe, 0o700, dir_fd=dir_fd)
    try:
        fd = os.open(probe, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=dir_fd)
        try:
            os.setxattr(fd, OPAQUE_XATTRS[0], OPAQUE_YES)
        except OSError:
            return False
        finally:
            os.close(fd)
        return True
    finally:
        os.rmdir(probe, dir_fd=dir_fd)


def mknod_whiteouts_supported(dir_fd: int) -> bool:
    """Probe whether char 0/0 whiteouts can be created in the directory ``dir_fd``."""
    probe = b".unionfs-whiteout-probe-%d" % os.getpid()
    try:
        os.mknod(probe, stat.S_IFCHR | 0, os.makedev(0, 0), dir_fd=dir_fd)
    except OSError:
        return False
    os.unlink(probe, dir_fd=dir_fd)
    return True


# -- copy-up origin: the kernel's ovl_fb file handle ---------------------------------------
#
# struct ovl_fb (fs/overlayfs/overlayfs.h), stored packed as the xattr's value:
#   u8 version (0); u8 magic (0xfb); u8 len (header + fid); u8 flags; u8 type (the fid type
#   name_to_handle_at reports); uuid_t uuid (16 bytes: the lower filesystem's s_uuid);
#   u32 fid[] (the handle name_to_handle_at returns, in the CPU's byte order).

OVL_FH_VERSION = 0
OVL_FH_MAGIC = 0xFB
OVL_FH_FLAG_BIG_ENDIAN = 1 << 0
OVL_FH_FLAG_ANY_ENDIAN = 1 << 1
OVL_FH_FLAG_PATH_UPPER = 1 << 2
_OVL_FH_FLAG_ALL = OVL_FH_FLAG_BIG_ENDIAN | OVL_FH_FLAG_ANY_ENDIAN | OVL_FH_FLAG_PATH_UPPER
_OVL_FH_FLAG_CPU_ENDIAN = OVL_FH_FLAG_BIG_ENDIAN if sys.byteorder == "big" else 0
_OVL_FB_HEADER = 21


def encode_origin(dir_fd: int, name: bytes = b"", uuid: bytes | None = None) -> bytes | None:
    """The ``overlay.origin`` value the kernel writes for the lower object ``name`` in
    ``dir_fd`` (with ``name`` empty: the object open as ``dir_fd``), never following it.

    ``dir_fd`` must not be an ``O_PATH`` descriptor (the uuid is read with an ioctl).
    ``uuid`` is the lower filesystem's (:func:`fdops.fs_uuid`), looked up when not given. None
    when the filesystem cannot make file handles: the kernel then writes no origin either.
    """
    found = fdops.name_to_handle_at(dir_fd, name)
    if found is None:
        return None
    htype, fid = found
    if uuid is None:
        # A layer object is never a mount point: it shares its parent's filesystem.
        uuid = fdops.fs_uuid(dir_fd)
    length = _OVL_FB_HEADER + len(fid)
    if length > 255 or htype > 255 or htype < 0:
        return None
    return (
        bytes((OVL_FH_VERSION, OVL_FH_MAGIC, length, _OVL_FH_FLAG_CPU_ENDIAN, htype)) + uuid + fid
    )


def decode_origin(raw: bytes) -> tuple[bytes, int, bytes] | None:
    """``(uuid, handle type, handle bytes)`` of an ``overlay.origin`` value; None for any value
    the kernel would not decode either (wrong size, magic, version, flags or byte order).
    ``OVL_FH_FLAG_PATH_UPPER`` is only a hint for the kernel's index: ignored, as it does.
    """
    if len(raw) < _OVL_FB_HEADER or raw[1] != OVL_FH_MAGIC or raw[2] != len(raw):
        return None
    version, flags, htype = raw[0], raw[3], raw[4]
    if version > OVL_FH_VERSION or flags & ~_OVL_FH_FLAG_ALL:
        return None
    if not flags & OVL_FH_FLAG_ANY_ENDIAN and (
        flags & OVL_FH_FLAG_BIG_ENDIAN != _OVL_FH_FLAG_CPU_ENDIAN
    ):
        return None
    fid = raw[_OVL_FB_HEADER:]
    if not fid or len(fid) % 4 or len(fid) > fdops.MAX_HANDLE_SZ:
        return None
    return raw[5:_OVL_FB_HEADER], htype, fid


def set_origin(target: fdops.Target, attr: bytes, origin: bytes | None) -> None:
    """Store ``origin`` (a value made by :func:`encode_origin`) as ``attr`` on the copy being
    built (a descriptor, or an :func:`fdops.at_path` path, never followed).

    Nothing is stored for None (the lower filesystem makes no file handles), nor where the
    upper refuses the xattr: the object then shows its upper inode number, as in the kernel.
    """
    if origin is None:
        return
    try:
        fdops.setxattr(target, attr, origin)
    except OSError as exc:
        if exc.errno not in (errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM):
            raise
        log.debug("origin not stored: %s", exc)


@dataclasses.dataclass(frozen=True)
class OriginXattr:
    """What an upper object's origin xattrs say: the kernel's handle, or an old unionfs
    number (8 bytes, little-endian), or neither."""

    handle: bytes | None = None
    old_number: int | None = None


def read_origin_xattr(dir_fd: int, name: bytes, names: XattrNames) -> OriginXattr | None:
    """The origin recorded on ``name`` in the upper directory ``dir_fd`` (never followed);
    None when it carries none (or its xattrs cannot be read)."""
    try:
        listed = os.listxattr(fdops.at_path(dir_fd, name), follow_symlinks=False)
    except OSError:
        return None
    if os.fsdecode(names.origin) in listed:
        raw = getxattr_at(dir_fd, name, names.origin)
        return None if raw is None else OriginXattr(handle=raw)
    if os.fsdecode(names.old_origin) in listed:
        raw = getxattr_at(dir_fd, name, names.old_origin)
        if raw is None or len(raw) != 8:
            return None
        return OriginXattr(old_number=int(struct.unpack("<Q", raw)[0]))
    return None


# -- copying xattrs up -------------------------------------------------------------------


def copy_xattrs(src: fdops.Target, dst: fdops.Target, userxattr: bool | None = None) -> None:
    """Copy every xattr that is not internal to the layer format from ``src`` to ``dst``.

    ``src``/``dst`` are descriptors or :func:`fdops.at_path` paths (never followed). With
    ``userxattr`` (the mount's mode), what the mount shows is copied, as the kernel does
    (escaped names, and the other namespace's overlay names but its markers); without it,
    nothing in either overlay namespace but escaped names.
    """
    try:
        names = fdops.listxattr(src)
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
            return
        raise
    for name in names:
        bname = os.fsencode(name)
        if userxattr is None:
            if is_internal_xattr(bname):
                continue
        elif is_private_xattr(bname, userxattr):
            continue
        try:
            fdops.setxattr(dst, bname, fdops.getxattr(src, bname))
        except OSError as exc:
            # security.* labels the upper filesystem refuses are not fatal, as in the kernel.
            if exc.errno in (errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM) and not bname.startswith(
                b"user."
            ):
                log.debug("xattr %r not copied: %s", bname, exc)
                continue
            raise


# -- impure directories ------------------------------------------------------------------


def mark_impure(fd: int, attr: bytes) -> None:
    """Mark the upper directory open as ``fd`` impure (``overlay.impure = "y"``), unless it
    is: the kernel marks a directory once it may hold an entry with an origin (a copy-up in
    it, or such an entry moved in), so that its readdir knows to look origins up."""
    if fd_getxattr(fd, attr) is None:
        os.setxattr(fd, attr, b"y")


# -- reading a layer directory -----------------------------------------------------------


class Found(enum.Enum):
    """What one layer directory holds at a name (:func:`classify_at`).

    The values of the whiteout kinds are the words ``unionfs inspect`` shows.
    """

    DIR = "dir"
    OTHER = "other"
    CHARDEV_WHITEOUT = "whiteout (char 0/0)"
    XATTR_WHITEOUT = "whiteout (xattr)"
    OCI_WHITEOUT = "whiteout (.wh.)"

    @property
    def is_whiteout(self) -> bool:
        return self in _WHITEOUTS


_WHITEOUTS = frozenset((Found.CHARDEV_WHITEOUT, Found.XATTR_WHITEOUT, Found.OCI_WHITEOUT))


def classify_at(dir_fd: int, name: bytes) -> Found | None:
    """What the layer directory ``dir_fd`` holds at ``name``; None: nothing.

    Whiteouts in every form count (char 0/0, ``.wh.<name>``, and the xattr form in a
    directory marked ``overlay.opaque="x"``).
    """
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        st = None
    if st is not None:
        if stat.S_ISDIR(st.st_mode):
            return Found.DIR
        if is_chardev_whiteout(st):
            return Found.CHARDEV_WHITEOUT
        if (
            stat.S_ISREG(st.st_mode)
            and st.st_size == 0
            and opaque_value(dir_fd) == OPAQUE_XWHITEOUTS
            and is_xattr_whiteout(dir_fd, name, st)
        ):
            return Found.XATTR_WHITEOUT
        return Found.OTHER
    if not oci_marker_exists(dir_fd, name):
        return None
    return Found.OCI_WHITEOUT


def upper_hider(dir_fd: int, name: bytes) -> Found | None:
    """What hides ``name`` in the upper directory ``dir_fd``, where the merged view has no
    such name: an entry there (:attr:`Found.CHARDEV_WHITEOUT`, the only kind the mount
    writes), a ``.wh.<name>`` marker (:attr:`Found.OCI_WHITEOUT`), or None."""
    if _exists_at(dir_fd, name):
        return Found.CHARDEV_WHITEOUT
    return Found.OCI_WHITEOUT if oci_marker_exists(dir_fd, name) else None


def oci_marker_exists(dir_fd: int, name: bytes) -> bool:
    """Whether the layer directory ``dir_fd`` holds a ``.wh.<name>`` marker.

    A name of more than 251 bytes can have no marker (it would exceed NAME_MAX): such a
    name must still work everywhere, so the probe answers "no" instead of ENAMETOOLONG.
    """
    marker = OCI_WHITEOUT_PREFIX + name
    return len(marker) <= 255 and _exists_at(dir_fd, marker)


def _exists_at(dir_fd: int, name: bytes) -> bool:
    """Whether ``name`` exists in ``dir_fd`` (never followed)."""
    try:
        os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return True


# One entry of a layer directory as the mount reads it: (name, is_dir, is_marker). A tuple,
# not a dataclass: a deep stack builds millions of them.
ScanEntry = tuple[bytes, bool, bool]


def scan_layer_dir(fd: int, opaque: bytes | None | bool = False) -> Iterator[ScanEntry]:
    """Yield ``(name, is_dir, is_whiteout_or_marker)`` for the directory open as ``fd``.

    This is the one reader of a layer directory's markers. Whiteouts in every form are
    reported as ``(hidden_name, False, True)``; an OCI opaque marker is reported as
    ``(OCI_OPAQUE_NAME, False, True)``; other ``.wh.`` names are dropped (:func:`oci_target`
    says which names a marker hides). ``opaque`` is the directory's ``overlay.opaque`` value
    if the caller has read it already. ``os.scandir`` reads ``fd`` through a duplicate of its
    own (which shares the offset: hence the rewind) and leaves ``fd`` open.
    """
    if opaque is False:
        opaque = opaque_value(fd)
    xwhiteouts = opaque == OPAQUE_XWHITEOUTS
    os.lseek(fd, 0, os.SEEK_SET)
    with os.scandir(fd) as it:
        for entry in it:
            name = os.fsencode(entry.name)
            if name.startswith(OCI_WHITEOUT_PREFIX):
                if name == OCI_OPAQUE_NAME:
                    yield name, False, True
                    continue
                target = oci_target(name)
                if target is not None:
                    yield target, False, True
                continue
            if entry.is_dir(follow_symlinks=False):
                yield name, True, False
                continue
            if entry.is_file(follow_symlinks=False):
                if xwhiteouts:
                    st = entry.stat(follow_symlinks=False)
                    if is_xattr_whiteout(fd, name, st):
                        yield name, False, True
                        continue
                yield name, False, False
                continue
            if not entry.is_symlink():
                st = entry.stat(follow_symlinks=False)
                if stat.S_ISCHR(st.st_mode) and is_chardev_whiteout(st):
                    yield name, False, True
                    continue
            yield name, False, False


def is_opaque_dir(fd: int) -> bool:
    """Whether the layer directory open as ``fd`` is opaque, by xattr or OCI marker."""
    return opaque_value(fd) == OPAQUE_YES or _exists_at(fd, OCI_OPAQUE_NAME)


def check_opaque(fd: int) -> tuple[bool, list[ScanEntry] | None]:
    """Whether the layer directory open as ``fd`` is opaque, and its listing if read.

    The ``overlay.opaque`` xattr answers without reading the directory. Otherwise the
    directory is listed to look for an OCI ``.wh..wh..opq`` marker: that costs no more than
    probing the marker's name (after the caches are dropped, a negative lookup reads the
    directory too), and the listing serves the directory's index.
    """
    value = opaque_value(fd)
    if value == OPAQUE_YES:
        return True, None
    listing = list(scan_layer_dir(fd, value))
    opaque = any(marker and name == OCI_OPAQUE_NAME for name, _, marker in listing)
    return opaque, listing
