"""``unionfs export``: an upper layer as an OCI image-spec layer tarball, byte-reproducible.

Mapping from the overlayfs upper to tar members (see ``docs/layers.md``):

* the root directory is the member ``./``, then every entry depth-first; inside a directory
  the opaque marker ``.wh..wh..opq`` comes first, then the whiteouts ``.wh.<name>`` (the image
  spec asks for whiteouts before their sibling entries), then the entries, each sorted by name
  bytes, a directory's contents right after the directory;
* whiteouts in any form (char 0/0, ``.wh.<name>``, xattr whiteout) become empty regular
  ``.wh.<name>`` members with mode 0600 and the owner and mtime of the marker;
* hard links inside the upper become tar hard-link members pointing at the first path met;
* an upper written with ``xattr_permissions`` (or by containers-storage without the right to
  chown) keeps owners and modes in an override xattr (:mod:`unionfs.fs.override`): members
  carry the owner, group, mode and type the mount showed, read by the one name the upper's
  root carries, as a mount without the option reads it; the override xattrs are never
  exported;
* headers are PAX with numeric owners, empty user and group names, no atime or ctime, the
  mtime with nanoseconds (a PAX ``mtime`` record when it is not a whole second), and the
  xattrs as ``SCHILY.xattr.<name>`` records in name order. Internal xattrs
  (:func:`unionfs.format.is_internal_xattr`) and ``security.selinux`` (a host label) are
  left out;
* gzip output has no file name and mtime 0; zstd output is one frame at a fixed level.

The same upper therefore always gives the same bytes and the same digest; reading the upper
never changes it (files are opened with ``O_NOATIME`` where allowed).
"""

from __future__ import annotations

import errno
import gzip
import hashlib
import logging
import os
import stat
import tarfile
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, BinaryIO, cast

from unionfs import fdops, format
from unionfs.errors import UnionfsError
from unionfs.layertools.layerscan import (
    LayerOverrides,
    LayerPath,
    display,
    is_dir,
    open_dir,
    opened_dir,
    scan_dir,
    walk_tree,
)
from unionfs.layertools.progress import Progress

log = logging.getLogger(__name__)

COMPRESSIONS = ("none", "gzip", "zstd")
MEDIA_TYPES = {
    "none": "application/vnd.oci.image.layer.v1.tar",
    "gzip": "application/vnd.oci.image.layer.v1.tar+gzip",
    "zstd": "application/vnd.oci.image.layer.v1.tar+zstd",
}
GZIP_LEVEL = 6
ZSTD_LEVEL = 3

# Excluded besides the internal namespaces: an SELinux label belongs to the host it was set on.
_HOST_XATTRS = (b"security.selinux",)
# Owner and mode kept in an xattr (all three names, whichever the layer is read by), and the
# rest of fuse-overlayfs's security namespace: a mount never shows them; the owner and mode
# they record go into the header instead.
_OVERRIDE_XATTRS = format.OVERRIDE_STAT
_FUSE_OVERLAYFS_SECURITY = b"security.fuseoverlayfs."
# Upper entries the OCI format cannot express: their meaning lives partly in a lower layer.
_UNEXPORTABLE_XATTRS = (
    b"trusted.overlay.redirect",
    b"user.overlay.redirect",
    b"trusted.overlay.metacopy",
    b"user.overlay.metacopy",
)
_WHITEOUT_MODE = 0o600


@dataclass(frozen=True)
class ExportResult:
    """What an export wrote: ``digest`` of the (compressed) blob, ``diff_id`` of the tar."""

    digest: str
    diff_id: str
    size: int
    compression: str

    @property
    def media_type(self) -> str:
        """The OCI media type of the blob."""
        return MEDIA_TYPES[self.compression]


class _HashingWriter:
    """A write-only stream that hashes and counts what passes through to ``target``."""

    def __init__(self, target: Any) -> None:
        self.target = target
        self.sha256 = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.sha256.update(data)
        self.size += len(data)
        self.target.write(data)
        return len(data)

    def flush(self) -> None:
        self.target.flush()

    def digest(self) -> str:
        return "sha256:" + self.sha256.hexdigest()


class _CountingReader:
    """Reads from ``source`` and reports every byte to ``progress``."""

    def __init__(self, source: IO[bytes], progress: Progress | None) -> None:
        self.source = source
        self.progress = progress

    def read(self, n: int = -1) -> bytes:
        data = self.source.read(n)
        if self.progress is not None:
            self.progress.advance(len(data))
        return data


def _zstd_writer(target: _HashingWriter) -> Any:
    try:
        import zstandard
    except ImportError as exc:
        raise UnionfsError(
            "zstd compression needs the 'zstandard' module (pip install zstandard)"
        ) from exc
    return zstandard.ZstdCompressor(level=ZSTD_LEVEL).stream_writer(
        cast(Any, target), closefd=False
    )


def _mtime_record(mtime_ns: int) -> tuple[int, str | None]:
    """The header mtime (whole seconds) and, when needed, the exact PAX ``mtime`` record."""
    seconds, nanos = divmod(mtime_ns, 1_000_000_000)
    if nanos == 0:
        return seconds, None
    sign, magnitude = ("-", -mtime_ns) if mtime_ns < 0 else ("", mtime_ns)
    whole, frac = divmod(magnitude, 1_000_000_000)
    return seconds, f"{sign}{whole}.{frac:09d}".rstrip("0")


def _xattrs(target: bytes | int, where: LayerPath) -> list[tuple[bytes, bytes]]:
    """The exported xattrs of ``target`` (an fd, or a path from ``fdops.at_path``)."""
    follow = isinstance(target, int)
    try:
        names = sorted(os.fsencode(n) for n in os.listxattr(target, follow_symlinks=follow))
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
            return []
        raise
    found = []
    for name in names:
        if name in _UNEXPORTABLE_XATTRS:
            raise UnionfsError(
                f"{display(where)} uses the overlayfs {os.fsdecode(name)} feature, "
                "which an OCI layer cannot express; mount with redirect_dir=off,metacopy=off"
            )
        if (
            format.is_internal_xattr(name)
            or name in _HOST_XATTRS
            or name in _OVERRIDE_XATTRS
            or name.startswith(_FUSE_OVERLAYFS_SECURITY)
        ):
            continue
        try:
            value = os.getxattr(target, name, follow_symlinks=follow)
        except OSError as exc:
            if exc.errno == errno.ENODATA:
                continue
            raise
        found.append((name, value))
    return found


def _header(path: LayerPath, st: os.stat_result, xattrs: list[tuple[bytes, bytes]]) -> Any:
    """A normalised TarInfo for ``path`` with the owner, mode, mtime and xattrs of ``st``."""
    info = tarfile.TarInfo(os.fsdecode(b"/".join(path)) if path else ".")
    info.mode = stat.S_IMODE(st.st_mode)
    info.uid = st.st_uid
    info.gid = st.st_gid
    info.uname = ""
    info.gname = ""
    info.mtime, exact = _mtime_record(st.st_mtime_ns)
    records: dict[str, str] = {}
    if exact is not None:
        records["mtime"] = exact
    for name, value in xattrs:
        records["SCHILY.xattr." + os.fsdecode(name)] = value.decode("utf-8", "surrogateescape")
    info.pax_headers = records
    return info


@dataclass
class _Member:
    """One member to write: its header, and the data source for regular files."""

    info: Any
    parent_fd: int
    name: bytes


@dataclass
class _Frame:
    """A directory of the upper being exported, with its entries still to write."""

    fd: int
    path: LayerPath
    names: list[bytes]
    owned: bool
    entries: dict[bytes, os.stat_result] = field(default_factory=dict)
    whiteouts: set[bytes] = field(default_factory=set)


class _Walker:
    """Produces the members of an upper in the documented order (see the module docstring).

    Every stat goes through ``overrides`` first: a member carries the owner, mode and type
    a mount showed, not the upper inode's (see :class:`LayerOverrides`).
    """

    def __init__(self, overrides: LayerOverrides) -> None:
        self.first_link: dict[tuple[int, int], str] = {}
        self.overrides = overrides

    def members(self, root_fd: int) -> Iterator[_Member]:
        """The members below the upper root open as ``root_fd`` (the root itself excluded).

        Iterative (an explicit stack, one descriptor per level), so any depth works. A
        member's ``parent_fd`` stays open until the next member is asked for.
        """
        stack: list[_Frame] = []
        try:
            stack.append(_Frame(root_fd, (), [], owned=False))
            yield from self._enter(stack[-1], whited_out=False)
            while stack:
                frame = stack[-1]
                if not frame.names:
                    stack.pop()
                    if frame.owned:
                        os.close(frame.fd)
                    continue
                name = frame.names.pop()
                child = frame.path + (name,)
                target = fdops.at_path(frame.fd, name)
                st = self.overrides.shown(target, frame.entries[name], child)
                if stat.S_ISSOCK(st.st_mode):
                    log.warning(
                        "skipping socket %s: a tar layer cannot hold sockets", display(child)
                    )
                    continue
                info = _header(child, st, _xattrs(target, child))
                self._set_type(info, st, frame.fd, name)
                yield _Member(info, frame.fd, name)
                if is_dir(st):
                    stack.append(_Frame(open_dir(name, frame.fd), child, [], owned=True))
                    yield from self._enter(stack[-1], whited_out=name in frame.whiteouts)
        finally:
            for frame in stack:
                if frame.owned:
                    os.close(frame.fd)

    def _enter(self, frame: _Frame, whited_out: bool) -> Iterator[_Member]:
        """Read ``frame``'s directory: yield its opaque and whiteout markers, queue its entries.

        ``whited_out``: the parent also holds a whiteout for this directory, which then hides
        the lower one as if it were opaque.
        """
        layer = scan_dir(frame.fd)
        frame.entries = layer.entries
        frame.whiteouts = layer.whiteouts
        frame.names = sorted(layer.entries, reverse=True)  # popped from the end: name order
        if layer.opaque or whited_out:
            # The directory's own member has already warned about a malformed value.
            dir_st = self.overrides.shown(frame.fd, os.fstat(frame.fd), frame.path, warn=False)
            yield self._marker(frame.path + (format.OCI_OPAQUE_NAME,), dir_st, frame.fd)
        for target in sorted(layer.whiteouts - layer.entries.keys()):
            marker = format.OCI_WHITEOUT_PREFIX + target
            try:
                st = os.stat(target, dir_fd=frame.fd, follow_symlinks=False)
                found = target
            except FileNotFoundError:
                st = os.stat(marker, dir_fd=frame.fd, follow_symlinks=False)
                found = marker
            where = frame.path + (found,)
            st = self.overrides.shown(fdops.at_path(frame.fd, found), st, where)
            yield self._marker(frame.path + (marker,), st, frame.fd)

    def _marker(self, path: LayerPath, st: os.stat_result, dir_fd: int) -> _Member:
        info = _header(path, st, [])
        info.type = tarfile.REGTYPE
        info.mode = _WHITEOUT_MODE
        info.size = 0
        return _Member(info, dir_fd, b"")

    def _set_type(self, info: Any, st: os.stat_result, dir_fd: int, name: bytes) -> None:
        mode = st.st_mode
        if not stat.S_ISDIR(mode) and st.st_nlink > 1:
            key = (st.st_dev, st.st_ino)
            if key in self.first_link:
                info.type = tarfile.LNKTYPE
                info.linkname = self.first_link[key]
                return
            self.first_link[key] = info.name
        if stat.S_ISDIR(mode):
            info.type = tarfile.DIRTYPE
        elif stat.S_ISREG(mode):
            info.type = tarfile.REGTYPE
            info.size = st.st_size
        elif stat.S_ISLNK(mode):
            info.type = tarfile.SYMTYPE
            info.linkname = os.fsdecode(os.readlink(name, dir_fd=dir_fd))
        elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
            info.type = tarfile.CHRTYPE if stat.S_ISCHR(mode) else tarfile.BLKTYPE
            info.devmajor = os.major(st.st_rdev)
            info.devminor = os.minor(st.st_rdev)
        elif stat.S_ISFIFO(mode):
            info.type = tarfile.FIFOTYPE
        else:
            raise UnionfsError(f"cannot export {info.name!r}: unknown file type {mode:o}")


def _open_data(member: _Member) -> int:
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        return os.open(member.name, flags | os.O_NOATIME, dir_fd=member.parent_fd)
    except PermissionError:
        # O_NOATIME needs ownership or CAP_FOWNER; without it, read normally.
        return os.open(member.name, flags, dir_fd=member.parent_fd)


def upper_size(upper: Path) -> int:
    """The bytes of regular-file data under ``upper``, for a progress total."""
    with opened_dir(os.fsencode(upper)) as root_fd:
        return sum(st.st_size for _fd, _name, st in walk_tree(root_fd) if stat.S_ISREG(st.st_mode))


def export_layer(
    upper: Path,
    out: BinaryIO | Any,
    *,
    compression: str = "none",
    progress: Progress | None = None,
) -> ExportResult:
    """Write ``upper`` as an OCI layer tarball to the binary stream ``out``.

    ``compression`` is one of :data:`COMPRESSIONS`. Raises :class:`UnionfsError` when the upper
    cannot be read, holds something the format cannot express, or zstd is unavailable.
    """
    if compression not in COMPRESSIONS:
        raise UnionfsError(f"unknown compression {compression!r} (use none, gzip or zstd)")
    blob = _HashingWriter(out)
    compressor: Any = None
    if compression == "gzip":
        compressor = gzip.GzipFile(
            filename="", mode="wb", fileobj=blob, compresslevel=GZIP_LEVEL, mtime=0
        )
    elif compression == "zstd":
        compressor = _zstd_writer(blob)
    tar_stream = _HashingWriter(compressor if compressor is not None else blob)
    try:
        with (
            opened_dir(os.fsencode(upper)) as root_fd,
            tarfile.open(
                fileobj=cast(Any, tar_stream),
                mode="w|",
                format=tarfile.PAX_FORMAT,
                encoding="utf-8",
                errors="surrogateescape",
            ) as tar,
        ):
            overrides = LayerOverrides.of_root(root_fd)
            root_st = overrides.shown(root_fd, os.fstat(root_fd), ())
            root_info = _header((), root_st, _xattrs(root_fd, ()))
            root_info.type = tarfile.DIRTYPE
            tar.addfile(root_info)
            for member in _Walker(overrides).members(root_fd):
                if member.info.type != tarfile.REGTYPE or member.info.size == 0:
                    tar.addfile(member.info)
                    continue
                fd = _open_data(member)
                with os.fdopen(fd, "rb") as data:
                    tar.addfile(member.info, cast(Any, _CountingReader(data, progress)))
        if compressor is not None:
            compressor.close()
    except UnionfsError:
        raise
    except OSError as exc:
        raise UnionfsError(f"cannot export {upper}: {exc}") from exc
    return ExportResult(blob.digest(), tar_stream.digest(), blob.size, compression)


def compression_for(path: str) -> str:
    """The compression implied by an output file name (``.gz``/``.tgz``, ``.zst``, or none)."""
    if path.endswith((".gz", ".tgz")):
        return "gzip"
    if path.endswith((".zst", ".zstd")):
        return "zstd"
    return "none"


def export_to_path(
    upper: Path, output: Path, *, compression: str, progress: Progress | None = None
) -> ExportResult:
    """:func:`export_layer` into the file ``output``, which appears only when complete."""
    parent = output.parent if str(output.parent) else Path(".")
    fd, tmp_name = tempfile.mkstemp(prefix=f".{output.name}.", suffix=".partial", dir=parent)
    try:
        with os.fdopen(fd, "wb") as tmp:
            result = export_layer(upper, tmp, compression=compression, progress=progress)
        os.chmod(tmp_name, 0o644)
        os.replace(tmp_name, output)
    except BaseException:
        os.unlink(tmp_name)
        raise
    return result
