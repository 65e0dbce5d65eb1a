"""Every on-disk whiteout and opaque form, read and written in one place.

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

import ctypes
import errno
import fcntl
import os
import stat
import sys

OCI_WHITEOUT_PREFIX = b".wh."
OCI_OPAQUE_NAME = b".wh..wh..opq"

OPAQUE_XATTRS = (b"trusted.overlay.opaque", b"user.overlay.opaque")
WHITEOUT_XATTRS = (b"trusted.overlay.whiteout", b"user.overlay.whiteout")
ORIGIN_XATTRS = (b"trusted.overlay.origin", b"user.overlay.origin")
# Written by unionfs before it used the kernel's format: read as a fallback, never written.
OLD_ORIGIN_XATTRS = (b"trusted.unionfs.origin", b"user.unionfs.origin")

# Value of overlay.opaque: "y" hides lower dirs; "x" only announces xattr whiteouts inside.
OPAQUE_YES = b"y"
OPAQUE_XWHITEOUTS = b"x"

_INTERNAL_PREFIXES = (
    b"trusted.overlay.",
    b"user.overlay.",
    b"trusted.unionfs.",
    b"user.unionfs.",
)


# The overlay namespaces of the two modes (index: userxattr), and what an escaped name starts
# with. The kernel's first version tested the trusted form without its final dot; the kernel
# here (6.18) hides trusted.overlay.overlay and trusted.overlay.overlayX as private names, so
# both forms are tested with the dot.
_OWN_PREFIXES = (b"trusted.overlay.", b"user.overlay.")
_ESCAPE = b"overlay."
_ESCAPED_TEST = (b"trusted.overlay.overlay.", b"user.overlay.overlay.")
_UNIONFS_PREFIXES = (b"trusted.unionfs.", b"user.unionfs.")
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
    if name in _MARKERS or name.startswith(_UNIONFS_PREFIXES):
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
    if name in _MARKERS or name.startswith(_UNIONFS_PREFIXES):
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


def at_path(dir_fd: int, name: bytes) -> bytes:
    """A path naming ``name`` inside the directory open as ``dir_fd``, for the *xattr calls.

    Linux has no ``getxattrat``. Resolving ``/proc/self/fd/N/name`` with the path-based call
    and ``follow_symlinks=False`` walks into the directory ``dir_fd`` refers to, then takes
    ``name`` there without following it: the same effect, and a symlink in a layer can never
    redirect the call outside the layer. ``name`` is one path component (no ``/``).
    """
    return b"/proc/self/fd/%d/%s" % (dir_fd, name)


def _quiet(exc: OSError) -> bool:
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
        if _quiet(exc):
            return None
        raise


def fd_getxattr(fd: int, attr: bytes) -> bytes | None:
    """The value of xattr ``attr`` on the open (not ``O_PATH``) descriptor ``fd``, or None."""
    try:
        return os.getxattr(fd, attr)
    except OSError as exc:
        if _quiet(exc):
            return None
        raise


_OPAQUE_XATTR_NAMES = tuple(os.fsdecode(a) for a in OPAQUE_XATTRS)


def opaque_value(dir_fd: int) -> bytes | None:
    """The ``overlay.opaque`` value of the directory open as ``dir_fd`` (trusted first).

    Most directories have no such xattr: one listxattr says so, where a getxattr of each
    name would fail twice (and a failed call costs Python an exception).
    """
    try:
        names = os.listxattr(dir_fd)
    except OSError as exc:
        if _quiet(exc):
            return None
        raise
    for attr, name in zip(OPAQUE_XATTRS, _OPAQUE_XATTR_NAMES, strict=True):
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
NULL_UUID = bytes(16)

MAX_HANDLE_SZ = 128
_AT_EMPTY_PATH = 0x1000
# FS_IOC_GETFSUUID = _IOR(0x15, 0, struct fsuuid2 {u8 len; u8 uuid[16];}) (Linux 6.5+).
_FS_IOC_GETFSUUID = (2 << 30) | (17 << 16) | (0x15 << 8)


class _FileHandle(ctypes.Structure):
    _fields_ = [
        ("handle_bytes", ctypes.c_uint),
        ("handle_type", ctypes.c_int),
        ("f_handle", ctypes.c_ubyte * MAX_HANDLE_SZ),
    ]


_libc = ctypes.CDLL(None, use_errno=True)
_name_to_handle_at = _libc.name_to_handle_at
_name_to_handle_at.argtypes = [
    ctypes.c_int,
    ctypes.c_char_p,
    ctypes.POINTER(_FileHandle),
    ctypes.POINTER(ctypes.c_int),
    ctypes.c_int,
]
_name_to_handle_at.restype = ctypes.c_int
_open_by_handle_at = _libc.open_by_handle_at
_open_by_handle_at.argtypes = [ctypes.c_int, ctypes.POINTER(_FileHandle), ctypes.c_int]
_open_by_handle_at.restype = ctypes.c_int


def fs_uuid(fd: int) -> bytes:
    """The ``s_uuid`` of the filesystem holding the open descriptor ``fd`` (16 bytes).

    This is the uuid the kernel writes into origin handles. A filesystem that has none, or a
    kernel without FS_IOC_GETFSUUID, gives the null uuid (what the kernel writes for it too).
    """
    try:
        raw = fcntl.ioctl(fd, _FS_IOC_GETFSUUID, bytes(17))
    except OSError:
        return NULL_UUID
    length = raw[0]
    return bytes(raw[1 : 1 + length]).ljust(16, b"\0")[:16]


def encode_origin(dir_fd: int, name: bytes = b"", uuid: bytes | None = None) -> bytes | None:
    """The ``overlay.origin`` value the kernel writes for the lower object ``name`` in
    ``dir_fd`` (with ``name`` empty: the object open as ``dir_fd``), never following it.

    ``dir_fd`` must not be an ``O_PATH`` descriptor (the uuid is read with an ioctl).
    ``uuid`` is the lower filesystem's (:func:`fs_uuid`), looked up when not given. None when
    the filesystem cannot make file handles: the kernel then writes no origin either.
    """
    handle = _FileHandle()
    handle.handle_bytes = MAX_HANDLE_SZ
    mount_id = ctypes.c_int()
    flags = _AT_EMPTY_PATH if not name else 0
    if _name_to_handle_at(dir_fd, name, ctypes.byref(handle), ctypes.byref(mount_id), flags) < 0:
        return None
    if uuid is None:
        # A layer object is never a mount point: it shares its parent's filesystem.
        uuid = fs_uuid(dir_fd)
    fid = bytes(handle.f_handle[: handle.handle_bytes])
    length = _OVL_FB_HEADER + len(fid)
    if length > 255 or handle.handle_type > 255 or handle.handle_type < 0:
        return None
    return (
        bytes((OVL_FH_VERSION, OVL_FH_MAGIC, length, _OVL_FH_FLAG_CPU_ENDIAN, handle.handle_type))
        + uuid
        + fid
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
    if not fid or len(fid) % 4 or len(fid) > MAX_HANDLE_SZ:
        return None
    return raw[5:_OVL_FB_HEADER], htype, fid


def open_origin(mount_fd: int, htype: int, fid: bytes) -> int:
    """Open the object of a decoded handle on the filesystem of ``mount_fd`` with ``O_PATH``
    (nothing is read through it). Raises OSError: ESTALE for a handle naming nothing, EPERM
    without CAP_DAC_READ_SEARCH."""
    handle = _FileHandle()
    handle.handle_bytes = len(fid)
    handle.handle_type = htype
    ctypes.memmove(handle.f_handle, fid, len(fid))
    fd = _open_by_handle_at(mount_fd, ctypes.byref(handle), os.O_PATH | os.O_CLOEXEC)
    if fd < 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))
    return fd
