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
from listings and lookups, and the internal xattr namespaces below are filtered from
``listxattr``/``getxattr`` and refused by ``setxattr``.

unionfs keeps one private xattr, ``trusted.unionfs.origin`` (``user.unionfs.origin`` in
userxattr mode): the 8-byte inode number a copied-up object had before its copy-up, so that
``st_ino`` does not change when an object moves to the upper layer. The kernel ignores it.
"""

from __future__ import annotations

import errno
import os
import stat

OCI_WHITEOUT_PREFIX = b".wh."
OCI_OPAQUE_NAME = b".wh..wh..opq"

OPAQUE_XATTRS = (b"trusted.overlay.opaque", b"user.overlay.opaque")
WHITEOUT_XATTRS = (b"trusted.overlay.whiteout", b"user.overlay.whiteout")
ORIGIN_XATTRS = (b"trusted.unionfs.origin", b"user.unionfs.origin")

# Value of overlay.opaque: "y" hides lower dirs; "x" only announces xattr whiteouts inside.
OPAQUE_YES = b"y"
OPAQUE_XWHITEOUTS = b"x"

_INTERNAL_PREFIXES = (
    b"trusted.overlay.",
    b"user.overlay.",
    b"trusted.unionfs.",
    b"user.unionfs.",
)


def is_internal_xattr(name: bytes) -> bool:
    """True for xattrs that belong to the layer format and never show through the mount."""
    return name.startswith(_INTERNAL_PREFIXES)


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
