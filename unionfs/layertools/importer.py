"""``unionfs import``: unpack an OCI image-spec layer tarball into a new lower directory.

The layer is unpacked into a temporary directory beside the destination and renamed into
place only when complete; on any error the temporary directory is removed, so a failed import
leaves nothing behind. Every path is resolved with directory descriptors and ``O_NOFOLLOW``
(:mod:`.tarsafety`); ``tarfile.extractall`` is never used.

Markers are converted to the kernel's format unless ``keep_oci_whiteouts`` is set:

* ``.wh.<name>`` becomes a char 0/0 device ``<name>``; when this same layer also holds
  ``<name>`` (before or after the marker) the entry stays, and a directory becomes opaque,
  because the image spec says a whiteout hides only the layers below;
* ``.wh..wh..opq`` becomes ``overlay.opaque="y"`` on its directory (``trusted.`` as root,
  ``user.`` otherwise, the kernel's ``userxattr`` mode).

Other decisions (see ``docs/layers.md``): a later member with the path of an earlier one
replaces it (last wins, like Docker; two directories merge); device nodes other than 0/0 are
refused unless ``allow_devices``; hard links must name an earlier, non-directory member of the
same layer; internal xattrs in the tarball (``trusted.overlay.*``...) are dropped with a
warning, so a layer cannot forge redirects or opaque markers; owners are applied when running
as root.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import logging
import os
import shutil
import stat
import sys
import tarfile
import tempfile
import zlib
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import IO, Any, cast

from unionfs import whiteout
from unionfs.errors import UnionfsError
from unionfs.layertools.layerscan import LayerPath, is_dir, open_dir, opened_dir
from unionfs.layertools.progress import Progress
from unionfs.layertools.tarsafety import (
    OPAQUE,
    UnsafeMember,
    marker_kind,
    member_path,
    open_parent,
)

log = logging.getLogger(__name__)

_CHUNK = 1 << 20
_GZIP_MAGIC = b"\x1f\x8b"
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_XATTR_PREFIX = "SCHILY.xattr."


@dataclass
class ImportResult:
    """What an import wrote: the blob ``digest``, the tar's ``diff_id`` and counts."""

    digest: str
    diff_id: str
    entries: int = 0
    whiteouts: int = 0
    opaque_dirs: int = 0


class _HashingReader:
    """Reads from ``source``, hashing what passes and reporting it to ``progress``."""

    def __init__(self, source: Any, progress: Progress | None = None) -> None:
        self.source = source
        self.progress = progress
        self.sha256 = hashlib.sha256()

    def read(self, n: int = -1) -> bytes:
        data: bytes = self.source.read(n)
        self.sha256.update(data)
        if self.progress is not None:
            self.progress.advance(len(data))
        return data

    def drain(self) -> None:
        """Read to the end, so the hash covers the whole stream (tar padding included)."""
        while self.read(_CHUNK):
            pass

    def digest(self) -> str:
        return "sha256:" + self.sha256.hexdigest()


def _decompressor(raw: _HashingReader, magic: bytes) -> Any:
    if magic.startswith(_GZIP_MAGIC):
        return gzip.GzipFile(fileobj=cast(Any, raw), mode="rb")
    if magic.startswith(_ZSTD_MAGIC):
        try:
            import zstandard
        except ImportError as exc:
            raise UnionfsError(
                "this layer is zstd-compressed; install the 'zstandard' module to import it"
            ) from exc
        return zstandard.ZstdDecompressor().stream_reader(cast(Any, raw), read_across_frames=True)
    return raw


def _mtime_ns(member: tarfile.TarInfo) -> int:
    exact = member.pax_headers.get("mtime")
    if exact is not None:
        try:
            return int(Decimal(exact) * 1_000_000_000)
        except InvalidOperation:
            pass
    return int(member.mtime) * 1_000_000_000


def _xattrs(member: tarfile.TarInfo) -> list[tuple[bytes, bytes]]:
    found = []
    for key, value in sorted(member.pax_headers.items()):
        if not key.startswith(_XATTR_PREFIX):
            continue
        name = os.fsencode(key[len(_XATTR_PREFIX) :])
        if whiteout.is_internal_xattr(name):
            log.warning("%s: dropping internal xattr %s", member.name, os.fsdecode(name))
            continue
        found.append((name, value.encode("utf-8", "surrogateescape")))
    return found


@dataclass
class _Unpacker:
    """Applies members one by one to the layer root open as ``root_fd``, then finishes it."""

    root_fd: int
    keep_oci_whiteouts: bool
    allow_devices: bool
    result: ImportResult
    # Whiteout path -> the marker's (uid, gid, mtime), given to the device so a re-export
    # reproduces the marker exactly.
    whiteouts: dict[LayerPath, tuple[int, int, int]] = field(default_factory=dict)
    opaque: set[LayerPath] = field(default_factory=set)
    dir_meta: dict[LayerPath, tuple[int, int | None]] = field(default_factory=dict)
    as_root: bool = field(default_factory=lambda: os.geteuid() == 0)

    # -- members --------------------------------------------------------------------------

    def add(self, tar: tarfile.TarFile, member: tarfile.TarInfo) -> None:
        """Apply one member; raises :class:`UnionfsError` for anything refused."""
        path = member_path(member.name)
        self.result.entries += 1
        if not path:
            if not member.isdir():
                raise UnsafeMember(member.name, "the layer root must be a directory")
            self._meta(self.root_fd, None, member, path)
            return
        kind = marker_kind(path, member.name)
        if kind is not None and not self.keep_oci_whiteouts:
            os.close(open_parent(self.root_fd, path, member.name, create=True))
            if kind[0] == OPAQUE:
                self.opaque.add(path[:-1])
            else:
                marker = (member.uid, member.gid, _mtime_ns(member))
                self.whiteouts[path[:-1] + (kind[1],)] = marker
            return
        if member.islnk():
            self._link(member, path)
            return
        parent_fd = open_parent(self.root_fd, path, member.name, create=True)
        try:
            self._create(tar, member, path, parent_fd, path[-1])
        finally:
            os.close(parent_fd)

    def _replace(self, parent_fd: int, name: bytes, keep_dir: bool) -> bool:
        """Clear ``name`` for a new member (last wins); True when an existing dir is kept."""
        try:
            st = os.stat(name, dir_fd=parent_fd, follow_symlinks=False)
        except FileNotFoundError:
            return False
        if is_dir(st):
            if keep_dir:
                return True
            shutil.rmtree(os.fsdecode(name), dir_fd=parent_fd)
        else:
            os.unlink(name, dir_fd=parent_fd)
        return False

    def _create(
        self,
        tar: tarfile.TarFile,
        member: tarfile.TarInfo,
        path: LayerPath,
        parent_fd: int,
        name: bytes,
    ) -> None:
        kept_dir = self._replace(parent_fd, name, keep_dir=member.isdir())
        if member.isdir():
            if not kept_dir:
                os.mkdir(name, 0o700, dir_fd=parent_fd)
            with opened_dir(name, parent_fd) as fd:
                self._meta(fd, None, member, path)
        elif member.isreg():
            fd = os.open(
                name,
                os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                0o600,
                dir_fd=parent_fd,
            )
            try:
                data = tar.extractfile(member)
                if data is not None:
                    while chunk := data.read(_CHUNK):
                        os.write(fd, chunk)
                self._meta(fd, None, member, path)
            finally:
                os.close(fd)
        elif member.issym():
            os.symlink(os.fsencode(member.linkname), name, dir_fd=parent_fd)
            self._meta(parent_fd, name, member, path)
        elif member.ischr() or member.isblk():
            whiteout_device = member.ischr() and member.devmajor == 0 and member.devminor == 0
            if not (whiteout_device or self.allow_devices):
                raise UnsafeMember(
                    member.name,
                    f"device node {member.devmajor}:{member.devminor} "
                    "(use --allow-devices to unpack device nodes)",
                )
            kind = stat.S_IFCHR if member.ischr() else stat.S_IFBLK
            device = os.makedev(member.devmajor, member.devminor)
            os.mknod(name, kind | 0o600, device, dir_fd=parent_fd)
            self._meta(parent_fd, name, member, path)
        elif member.isfifo():
            os.mkfifo(name, 0o600, dir_fd=parent_fd)
            self._meta(parent_fd, name, member, path)
        else:
            raise UnsafeMember(member.name, f"unsupported member type {member.type!r}")

    def _link(self, member: tarfile.TarInfo, path: LayerPath) -> None:
        target = member_path(member.linkname, what="hard link target")
        if not target or target == path:
            raise UnsafeMember(member.name, "hard link to itself or to the layer root")
        if marker_kind(target, member.linkname) is not None and not self.keep_oci_whiteouts:
            raise UnsafeMember(member.name, "hard link to a whiteout marker")
        try:
            target_parent = open_parent(self.root_fd, target, member.name, create=False)
        except UnsafeMember:
            raise UnsafeMember(
                member.name, f"hard link target {member.linkname!r} is not an earlier member"
            ) from None
        try:
            try:
                st = os.stat(target[-1], dir_fd=target_parent, follow_symlinks=False)
            except FileNotFoundError:
                raise UnsafeMember(
                    member.name, f"hard link target {member.linkname!r} is not an earlier member"
                ) from None
            if is_dir(st):
                raise UnsafeMember(member.name, "hard link to a directory")
            parent_fd = open_parent(self.root_fd, path, member.name, create=True)
            try:
                self._replace(parent_fd, path[-1], keep_dir=False)
                os.link(
                    target[-1],
                    path[-1],
                    src_dir_fd=target_parent,
                    dst_dir_fd=parent_fd,
                    follow_symlinks=False,
                )
            finally:
                os.close(parent_fd)
        finally:
            os.close(target_parent)

    def _meta(self, fd: int, name: bytes | None, member: tarfile.TarInfo, path: LayerPath) -> None:
        """Owner, mode, xattrs and mtime of a new object: ``fd`` itself, or ``name`` in it.

        Directory modes and mtimes are deferred to :meth:`finish` (children change the mtime,
        and a read-only mode could block them).
        """
        mtime = _mtime_ns(member)
        mode = stat.S_IMODE(member.mode)
        if name is None:
            if self.as_root:
                os.fchown(fd, member.uid, member.gid)
            for attr, value in _xattrs(member):
                self._setxattr(fd, attr, value, member)
            if member.isdir():
                self.dir_meta[path] = (mode, mtime)
            else:
                os.fchmod(fd, mode)
                os.utime(fd, ns=(mtime, mtime))
            return
        if self.as_root:
            os.chown(name, member.uid, member.gid, dir_fd=fd, follow_symlinks=False)
        if not member.issym():
            # The object was just created by us under a private directory: not a symlink.
            os.chmod(name, mode, dir_fd=fd)
        for attr, value in _xattrs(member):
            self._setxattr(whiteout.at_path(fd, name), attr, value, member)
        os.utime(name, ns=(mtime, mtime), dir_fd=fd, follow_symlinks=False)

    @staticmethod
    def _setxattr(target: int | bytes, attr: bytes, value: bytes, member: tarfile.TarInfo) -> None:
        try:
            os.setxattr(target, attr, value, follow_symlinks=isinstance(target, int))
        except OSError as exc:
            log.warning("%s: cannot set xattr %s: %s", member.name, os.fsdecode(attr), exc)

    # -- finishing ------------------------------------------------------------------------

    def _open_existing(self, path: LayerPath) -> int | None:
        """A descriptor for directory ``path`` if it still is one, else None."""
        if not path:
            return os.dup(self.root_fd)
        try:
            parent = open_parent(self.root_fd, path, "", create=False)
        except (UnsafeMember, OSError):
            return None
        try:
            return open_dir(path[-1], parent)
        except OSError:
            return None
        finally:
            os.close(parent)

    def finish(self) -> None:
        """Write the deferred whiteouts, opaque markers, directory modes and mtimes."""
        for path in sorted(self.whiteouts):
            parent = self._open_existing(path[:-1])
            if parent is None:
                continue
            try:
                try:
                    st = os.stat(path[-1], dir_fd=parent, follow_symlinks=False)
                except FileNotFoundError:
                    whiteout.make_whiteout(parent, path[-1])
                    uid, gid, marker_mtime = self.whiteouts[path]
                    if self.as_root:
                        os.chown(path[-1], uid, gid, dir_fd=parent, follow_symlinks=False)
                    times = (marker_mtime, marker_mtime)
                    os.utime(path[-1], ns=times, dir_fd=parent, follow_symlinks=False)
                    self.result.whiteouts += 1
                else:
                    # The same layer holds the name: it stays, and hides the lower one anyway,
                    # but a directory would merge with the lower one unless it is opaque.
                    if is_dir(st):
                        self.opaque.add(path)
            finally:
                os.close(parent)
        attr = whiteout.OPAQUE_XATTRS[0] if self.as_root else whiteout.OPAQUE_XATTRS[1]
        for path in sorted(self.opaque):
            fd = self._open_existing(path)
            if fd is None:
                continue
            try:
                whiteout.mark_opaque(fd, attr)
                self.result.opaque_dirs += 1
            finally:
                os.close(fd)
        self.dir_meta.setdefault((), (0o755, None))
        for path in sorted(self.dir_meta, key=len, reverse=True):
            mode, mtime = self.dir_meta[path]
            fd = self._open_existing(path)
            if fd is None:
                continue
            try:
                os.fchmod(fd, mode)
                if mtime is not None:
                    os.utime(fd, ns=(mtime, mtime))
            finally:
                os.close(fd)


def _check_destination(dest: Path) -> None:
    try:
        st = os.stat(dest, follow_symlinks=False)
    except FileNotFoundError:
        if not dest.parent.is_dir():
            raise UnionfsError(f"{dest.parent}: no such directory") from None
        return
    if not stat.S_ISDIR(st.st_mode):
        raise UnionfsError(f"{dest} exists and is not a directory")
    if os.listdir(dest):
        raise UnionfsError(f"{dest} is not empty")


def _open_source(source: str) -> tuple[IO[bytes], int]:
    if source == "-":
        return sys.stdin.buffer, 0
    try:
        f = open(source, "rb")  # noqa: SIM115 -- closed by the caller
    except OSError as exc:
        raise UnionfsError(f"cannot open {source}: {exc.strerror}") from exc
    st = os.fstat(f.fileno())
    return f, st.st_size if stat.S_ISREG(st.st_mode) else 0


def import_layer(
    source: str,
    dest: Path,
    *,
    keep_oci_whiteouts: bool = False,
    allow_devices: bool = False,
    progress_enabled: bool | None = None,
) -> ImportResult:
    """Unpack the layer tarball ``source`` (a path, or ``-`` for stdin) into ``dest``.

    ``dest`` must not exist or be an empty directory; it appears complete or not at all.
    Plain, gzip and zstd tarballs are recognised by their first bytes. Raises
    :class:`UnionfsError` with a one-line message for a refused member or a corrupt tarball.
    """
    dest = Path(os.path.abspath(dest))
    _check_destination(dest)
    file, total = _open_source(source)
    tmp = tempfile.mkdtemp(prefix=f".{dest.name}.import-", dir=dest.parent)
    current = ""
    try:
        with file, Progress(f"importing {dest.name}", total, enabled=progress_enabled) as bar:
            buffered: Any = file if hasattr(file, "peek") else io.BufferedReader(cast(Any, file))
            magic = buffered.peek(4)[:4]
            raw = _HashingReader(buffered, bar)
            uncompressed = _HashingReader(_decompressor(raw, magic))
            result = ImportResult("", "")
            with opened_dir(os.fsencode(tmp)) as root_fd:
                unpacker = _Unpacker(root_fd, keep_oci_whiteouts, allow_devices, result)
                with tarfile.open(
                    fileobj=cast(Any, uncompressed),
                    mode="r|",
                    encoding="utf-8",
                    errors="surrogateescape",
                ) as tar:
                    for member in tar:
                        current = member.name
                        unpacker.add(tar, member)
                current = ""
                unpacker.finish()
            uncompressed.drain()
            raw.drain()
            result.digest, result.diff_id = raw.digest(), uncompressed.digest()
        os.rename(tmp, dest)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, UnionfsError):
            raise
        where = f" at member {current!r}" if current else ""
        if isinstance(exc, OSError):
            raise UnionfsError(f"cannot import {source}{where}: {exc}") from exc
        if isinstance(exc, (tarfile.TarError, EOFError, zlib.error)) or (
            type(exc).__name__ == "ZstdError"
        ):
            raise UnionfsError(f"corrupt layer tarball {source}{where}: {exc}") from exc
        raise
    return result
