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
import stat
import sys
import tarfile
import tempfile
import zlib
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import IO, Any, cast

from unionfs import fdops, format
from unionfs.errors import UnionfsError
from unionfs.fs.workdir import remove_tree_at
from unionfs.layertools.layerscan import LayerPath, is_dir, list_names, open_dir, opened_dir
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
        if format.is_internal_xattr(name):
            log.warning("%s: dropping internal xattr %s", member.name, os.fsdecode(name))
            continue
        found.append((name, value.encode("utf-8", "surrogateescape")))
    return found


DEFAULT_MAX_SIZE = 64 << 30
DEFAULT_MAX_APPARENT_SIZE = 1 << 40
DEFAULT_MAX_ENTRIES = 1_000_000
# Free space an import always leaves on the destination's filesystem: the larger of these.
RESERVE_BYTES = 256 << 20
RESERVE_FRACTION = 0.01
_BLOCK = 4096
_ZERO_BLOCK = bytes(_BLOCK)
# Directory descriptors an import keeps open to resume deep walks (see _Unpacker._parent).
_MAX_CHAIN = 1024
# A sparse map with more regions than this is refused before it is used.
_MAX_SPARSE_REGIONS = 1 << 20


@dataclass(frozen=True)
class ImportLimits:
    """What one import may write; going over any of them refuses the whole layer.

    ``max_size``: bytes of file data written to disk (holes excluded); ``max_apparent_size``:
    the sum of the sizes of the regular files (holes included); ``max_entries``: tar members.
    The destination's filesystem also always keeps :data:`RESERVE_BYTES` or
    :data:`RESERVE_FRACTION` of its size free, whichever is larger.
    """

    max_size: int = DEFAULT_MAX_SIZE
    max_apparent_size: int = DEFAULT_MAX_APPARENT_SIZE
    max_entries: int = DEFAULT_MAX_ENTRIES


def format_size(n: int) -> str:
    """``n`` bytes in the unit suffixes :func:`parse_size` reads (``64G``, ``1T``, ``4096``)."""
    for shift, unit in ((40, "T"), (30, "G"), (20, "M"), (10, "K")):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift}{unit}"
    return str(n)


def parse_size(text: str) -> int:
    """Bytes from ``4096``, ``10K``, ``64M``, ``64G`` or ``1T`` (powers of 1024).

    Raises ValueError for anything else.
    """
    units = {"K": 10, "M": 20, "G": 30, "T": 40}
    text = text.strip().upper().removesuffix("B").removesuffix("I")
    shift = units.get(text[-1:], 0)
    number = text[:-1] if shift else text
    if not number.isdigit():
        raise ValueError(f"not a size: {text!r}")
    return int(number) << shift


class _Budget:
    """Counts what an import writes and refuses it past a limit or the free-space reserve."""

    def __init__(self, limits: ImportLimits, fs_fd: int) -> None:
        self.limits = limits
        self.fs_fd = fs_fd
        self.written = 0
        self.apparent = 0
        self.entries = 0
        # Bytes that may still be written before free space is looked at again.
        self._unchecked = 0

    def entry(self, name: str) -> None:
        self.entries += 1
        if self.entries > self.limits.max_entries:
            raise UnsafeMember(
                name, f"the layer has more than {self.limits.max_entries} entries (--max-entries)"
            )

    def file(self, member: tarfile.TarInfo) -> None:
        self.apparent += member.size
        if self.apparent > self.limits.max_apparent_size:
            limit = format_size(self.limits.max_apparent_size)
            raise UnsafeMember(
                member.name,
                f"the layer's files add up to more than {limit} (--max-apparent-size)",
            )

    def data(self, member: tarfile.TarInfo, n: int) -> None:
        """Account for ``n`` bytes about to be written; refuse them when over a limit."""
        self.written += n
        if self.written > self.limits.max_size:
            limit = format_size(self.limits.max_size)
            raise UnsafeMember(
                member.name, f"the layer holds more than {limit} of file data (--max-size)"
            )
        if n <= self._unchecked:
            self._unchecked -= n
            return
        st = os.fstatvfs(self.fs_fd)
        reserve = max(RESERVE_BYTES, int(st.f_blocks * st.f_frsize * RESERVE_FRACTION))
        room = st.f_bavail * st.f_frsize - reserve
        if n > room:
            raise UnionfsError(
                f"not enough free space to import {member.name!r}: "
                f"{format_size(reserve)} must stay free on the destination's filesystem"
            )
        # Look again after a quarter of the room is used: others write to the disk too.
        self._unchecked = (room - n) // 4


def _sparse_regions(member: tarfile.TarInfo) -> list[tuple[int, int]]:
    """The data regions ``(offset, length)`` of a regular member, in order; the rest is holes.

    A plain member is one region; a GNU or PAX sparse member has its map, which must be
    sorted, non-overlapping and inside the file's size, or the member is refused.
    """
    # tarfile sets ``sparse`` to a list of (offset, length) pairs (typeshed says list[int]).
    sparse = cast("list[tuple[int, int]] | None", member.sparse)
    if sparse is None:
        return [(0, member.size)] if member.size else []
    if len(sparse) > _MAX_SPARSE_REGIONS:
        raise UnsafeMember(member.name, "sparse map with too many regions")
    regions = []
    end = 0
    for offset, length in sparse:
        if length == 0:
            continue  # GNU tar ends the map with (size, 0) and pads old-format maps with (0, 0)
        if offset < end or length < 0 or offset + length > member.size:
            raise UnsafeMember(member.name, "sparse map out of order or beyond the file's size")
        end = offset + length
        regions.append((offset, length))
    return regions


def _data_runs(chunk: bytes) -> list[tuple[int, int]]:
    """The ``(start, end)`` runs of ``chunk`` to write; every all-zero 4 KiB block is left out.

    A block left out becomes a hole: the file is extended to its final size at the end, so
    it reads as zeros, as GNU tar's ``--sparse`` extraction does.
    """
    if chunk.count(0) < _BLOCK:  # no whole block can be zero: one run
        return [(0, len(chunk))]
    runs = []
    start = None  # the beginning of the run of data blocks being gathered
    view = memoryview(chunk)
    for pos in range(0, len(chunk), _BLOCK):
        block = view[pos : pos + _BLOCK]
        zero = block == _ZERO_BLOCK[: len(block)]
        if zero and start is not None:
            runs.append((start, pos))
            start = None
        elif not zero and start is None:
            start = pos
    if start is not None:
        runs.append((start, len(chunk)))
    return runs


@dataclass
class _Unpacker:
    """Applies members one by one to the layer root open as ``root_fd``, then finishes it."""

    root_fd: int
    keep_oci_whiteouts: bool
    allow_devices: bool
    result: ImportResult
    budget: _Budget
    # Whiteout path -> the marker's (uid, gid, mtime), given to the device so a re-export
    # reproduces the marker exactly.
    whiteouts: dict[LayerPath, tuple[int, int, int]] = field(default_factory=dict)
    opaque: set[LayerPath] = field(default_factory=set)
    dir_meta: dict[LayerPath, tuple[int, int | None]] = field(default_factory=dict)
    as_root: bool = field(default_factory=lambda: os.geteuid() == 0)
    # Descriptors of the directories leading to the previous member's parent, still open:
    # ``_chain[i]`` is ``_chain_path[: _chain_base + i + 1]``. Members come depth first, so
    # the next parent shares most of that path, and a deep tree is not walked from the root
    # for every member. A window of at most _MAX_CHAIN levels (the deepest ones); dropped
    # whenever a directory is removed.
    _chain: list[int] = field(default_factory=list)
    _chain_base: int = 0
    _chain_path: LayerPath = ()

    def close(self) -> None:
        """Close the cached directory descriptors (idempotent)."""
        while self._chain:
            os.close(self._chain.pop())
        self._chain_base = 0
        self._chain_path = ()

    def _parent(self, path: LayerPath, name: str) -> int:
        """A new descriptor for the directory holding ``path``, created as needed.

        Reuses the cached directories this path shares with the previous one and opens the
        rest one level at a time with :func:`open_parent` (``O_NOFOLLOW``, creating).
        """
        parent = path[:-1]
        # The longest shared prefix, by bisection on tuple equality (C-speed comparisons).
        low, high = 0, min(len(self._chain_path), len(parent))
        while low < high:
            mid = (low + high + 1) // 2
            if parent[:mid] == self._chain_path[:mid]:
                low = mid
            else:
                high = mid - 1
        if low - self._chain_base < 1:
            # No cached descriptor is parent[:low] (the window starts below it): start over
            # from the root, whose descriptor stands for the empty prefix.
            self.close()
            low = 0
        while len(self._chain) > low - self._chain_base:
            os.close(self._chain.pop())
        self._chain_path = parent[:low]
        while len(self._chain_path) < len(parent):
            depth = len(self._chain_path)
            start_fd = self._chain[-1] if self._chain else self.root_fd
            # open_parent opens all but the last component: give it a placeholder last one.
            level = parent[: depth + 1] + (b"",)
            self._chain.append(open_parent(start_fd, level, name, create=True, start=depth))
            self._chain_path = parent[: depth + 1]
            if len(self._chain) > _MAX_CHAIN:
                os.close(self._chain.pop(0))
                self._chain_base += 1
        return os.dup(self._chain[-1] if self._chain else self.root_fd)

    # -- members --------------------------------------------------------------------------

    def add(self, tar: tarfile.TarFile, member: tarfile.TarInfo) -> None:
        """Apply one member; raises :class:`UnionfsError` for anything refused."""
        path = member_path(member.name)
        self.budget.entry(member.name)
        self.result.entries += 1
        if member.isreg():
            self.budget.file(member)
        if not path:
            if not member.isdir():
                raise UnsafeMember(member.name, "the layer root must be a directory")
            self._meta(self.root_fd, None, member, path)
            return
        kind = marker_kind(path, member.name)
        if kind is not None and not self.keep_oci_whiteouts:
            os.close(self._parent(path, member.name))
            if kind[0] == OPAQUE:
                self.opaque.add(path[:-1])
            else:
                marker = (member.uid, member.gid, _mtime_ns(member))
                self.whiteouts[path[:-1] + (kind[1],)] = marker
            return
        if member.islnk():
            self._link(member, path)
            return
        parent_fd = self._parent(path, member.name)
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
            self.close()  # a cached directory may be inside the one removed
            if not remove_tree_at(parent_fd, name):
                raise UnionfsError(f"cannot replace directory {os.fsdecode(name)!r}")
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
                self._write_data(tar, member, fd)
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

    def _write_data(self, tar: tarfile.TarFile, member: tarfile.TarInfo, fd: int) -> None:
        """The data of regular ``member`` into ``fd``, holes kept (see :func:`_data_runs`).

        Only the data regions of a sparse member are read (GNU 0.0/0.1/1.0 and old GNU
        sparse, as parsed by :mod:`tarfile`); holes are never materialised, so a member that
        claims a terabyte of holes costs nothing. Every write is counted by the budget first.
        """
        regions = _sparse_regions(member)
        if regions:
            extracted = tar.extractfile(member)
            assert extracted is not None
            # The unbuffered reader maps file offsets to the stream, reading forward only,
            # which is all a streamed tarfile can do.
            data = cast(Any, extracted).raw
            for offset, length in regions:
                data.seek(offset)
                pos, end = offset, offset + length
                while pos < end:
                    chunk = data.read(min(_CHUNK, end - pos))
                    if not chunk:
                        raise tarfile.ReadError("unexpected end of data")
                    runs = _data_runs(chunk)
                    self.budget.data(member, sum(stop - start for start, stop in runs))
                    view = memoryview(chunk)
                    for start, stop in runs:
                        os.pwrite(fd, view[start:stop], pos + start)
                    pos += len(chunk)
        os.ftruncate(fd, member.size)

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
            parent_fd = self._parent(path, member.name)
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
            self._setxattr(fdops.at_path(fd, name), attr, value, member)
        os.utime(name, ns=(mtime, mtime), dir_fd=fd, follow_symlinks=False)

    @staticmethod
    def _setxattr(target: int | bytes, attr: bytes, value: bytes, member: tarfile.TarInfo) -> None:
        try:
            os.setxattr(target, attr, value, follow_symlinks=isinstance(target, int))
        except OSError as exc:
            log.warning("%s: cannot set xattr %s: %s", member.name, os.fsdecode(attr), exc)

    # -- finishing ------------------------------------------------------------------------

    def finish(self) -> None:
        """Write the deferred whiteouts, opaque markers, directory modes and mtimes.

        One iterative walk over the directories of the layer: a directory's whiteouts and
        opaque marker are written when it is entered, its mode and mtime when it is left
        (after its children, whose creation would change the mtime). Paths that are not a
        directory any more (a later member replaced them) are skipped.
        """
        self.close()
        by_parent: dict[LayerPath, list[bytes]] = {}
        for path in sorted(self.whiteouts):
            by_parent.setdefault(path[:-1], []).append(path[-1])
        self.dir_meta.setdefault((), (0o755, None))
        stack: list[tuple[int, LayerPath, list[bytes]]] = []
        try:
            root = os.dup(self.root_fd)
            stack.append((root, (), []))
            stack[-1] = (root, (), self._enter(root, (), by_parent))
            while stack:
                fd, path, subdirs = stack[-1]
                if subdirs:
                    name = subdirs.pop()
                    child = path + (name,)
                    try:
                        child_fd = open_dir(name, fd)
                    except OSError:
                        continue
                    stack.append((child_fd, child, []))  # pushed first: always closed
                    stack[-1] = (child_fd, child, self._enter(child_fd, child, by_parent))
                    continue
                stack.pop()
                try:
                    meta = self.dir_meta.get(path)
                    if meta is not None:
                        os.fchmod(fd, meta[0])
                        if meta[1] is not None:
                            os.utime(fd, ns=(meta[1], meta[1]))
                finally:
                    os.close(fd)
        finally:
            for fd, _path, _subdirs in stack:
                os.close(fd)

    def _enter(
        self, fd: int, path: LayerPath, by_parent: dict[LayerPath, list[bytes]]
    ) -> list[bytes]:
        """Write the whiteouts and opaque marker of directory ``path``; return its subdirs."""
        for name in by_parent.get(path, ()):
            target = path + (name,)
            try:
                st = os.stat(name, dir_fd=fd, follow_symlinks=False)
            except FileNotFoundError:
                format.make_whiteout(fd, name)
                uid, gid, marker_mtime = self.whiteouts[target]
                if self.as_root:
                    os.chown(name, uid, gid, dir_fd=fd, follow_symlinks=False)
                os.utime(name, ns=(marker_mtime, marker_mtime), dir_fd=fd, follow_symlinks=False)
                self.result.whiteouts += 1
            else:
                # The same layer holds the name: it stays, and hides the lower one anyway,
                # but a directory would merge with the lower one unless it is opaque.
                if is_dir(st):
                    self.opaque.add(target)
        if path in self.opaque:
            attr = format.OPAQUE_XATTRS[0] if self.as_root else format.OPAQUE_XATTRS[1]
            format.mark_opaque(fd, attr)
            self.result.opaque_dirs += 1
        subdirs = []
        for name in list_names(fd):
            if is_dir(os.stat(name, dir_fd=fd, follow_symlinks=False)):
                subdirs.append(name)
        return subdirs


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


def _remove_partial(tmp: str) -> None:
    """Remove the half-built layer ``tmp`` (any depth; never leaving its filesystem)."""
    try:
        with opened_dir(os.fsencode(os.path.dirname(tmp))) as parent_fd:
            if not remove_tree_at(parent_fd, os.fsencode(os.path.basename(tmp))):
                log.warning("could not remove all of %s", tmp)
    except OSError as exc:
        log.warning("could not remove %s: %s", tmp, exc)


def import_layer(
    source: str,
    dest: Path,
    *,
    keep_oci_whiteouts: bool = False,
    allow_devices: bool = False,
    progress_enabled: bool | None = None,
    limits: ImportLimits | None = None,
) -> ImportResult:
    """Unpack the layer tarball ``source`` (a path, or ``-`` for stdin) into ``dest``.

    ``dest`` must not exist or be an empty directory; it appears complete or not at all.
    Plain, gzip and zstd tarballs are recognised by their first bytes. Sparse members stay
    sparse, and so do all-zero blocks of plain members. ``limits`` bound the data, the
    apparent size and the entries (:class:`ImportLimits`). Raises :class:`UnionfsError`
    with a one-line message for a refused member, a limit, or a corrupt tarball; nothing is
    left behind then.
    """
    limits = limits or ImportLimits()
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
                budget = _Budget(limits, root_fd)
                unpacker = _Unpacker(root_fd, keep_oci_whiteouts, allow_devices, result, budget)
                try:
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
                finally:
                    unpacker.close()
            uncompressed.drain()
            raw.drain()
            result.digest, result.diff_id = raw.digest(), uncompressed.digest()
        os.rename(tmp, dest)
    except BaseException as exc:
        _remove_partial(tmp)
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
