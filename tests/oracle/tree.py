"""Snapshots of directory trees and readable comparisons between them.

Two kinds of snapshot:

* :func:`snapshot` walks a *merged* tree (a mountpoint, or any directory) without following
  symlinks and records, per relative path, an :class:`Entry` (type, permission bits, owner,
  size, content digest, symlink target, ``user.*`` xattrs, nlink, rdev).  Inode numbers are
  not compared raw: paths are grouped by ``(st_dev, st_ino)`` and the *partition* is compared.
  ``d_ino`` from readdir is checked against ``st_ino``; names that readdir lists but lstat cannot
  find ("phantoms") are recorded too.
* :func:`upper_snapshot` walks an *upper* directory as stored on disk and records whiteouts
  (char 0/0 and OCI ``.wh.`` names), opaque markers (``trusted.overlay.opaque`` and
  ``user.overlay.opaque`` values) and content, ignoring internal bookkeeping xattrs.

:func:`diff` and :func:`diff_upper` return a list of human-readable difference lines; an empty
list means "equal".
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

#: xattr namespaces that belong to the layer format or to a backend's bookkeeping.
INTERNAL_XATTR_PREFIXES = (
    "trusted.overlay.",
    "user.overlay.",
    "trusted.unionfs.",
    "user.unionfs.",
    "user.fuseoverlayfs.",
    "trusted.fuseoverlayfs.",
)

_KINDS = {
    stat.S_IFREG: "reg",
    stat.S_IFDIR: "dir",
    stat.S_IFLNK: "lnk",
    stat.S_IFIFO: "fifo",
    stat.S_IFCHR: "chr",
    stat.S_IFBLK: "blk",
    stat.S_IFSOCK: "sock",
}


def kind_of(mode: int) -> str:
    """Short name of the file type in ``st_mode`` (``reg``, ``dir``, ``lnk``, ...)."""
    return _KINDS.get(stat.S_IFMT(mode), "?")


@dataclass(frozen=True)
class Entry:
    """What a merged tree shows for one path.

    ``size`` and ``nlink`` are None for directories (merged directories report nlink 1 in the
    kernel, so directory link counts are not comparable in general); ``digest`` is set for
    regular files only, ``target`` for symlinks only, ``rdev`` for devices only.
    """

    kind: str
    mode: int
    uid: int
    gid: int
    size: int | None = None
    digest: str | None = None
    target: bytes | None = None
    xattrs: tuple[tuple[str, bytes], ...] = ()
    nlink: int | None = None
    rdev: tuple[int, int] | None = None

    def describe(self) -> str:
        """One-line description used in diff output."""
        parts = [self.kind, f"mode={self.mode:04o}", f"uid={self.uid}", f"gid={self.gid}"]
        if self.size is not None:
            parts.append(f"size={self.size}")
        if self.digest is not None:
            parts.append(f"sha={self.digest}")
        if self.target is not None:
            parts.append(f"->{self.target!r}")
        if self.nlink is not None:
            parts.append(f"nlink={self.nlink}")
        if self.rdev is not None:
            parts.append(f"rdev={self.rdev[0]}:{self.rdev[1]}")
        if self.xattrs:
            parts.append("xattrs=" + ",".join(f"{k}={v!r}" for k, v in self.xattrs))
        return " ".join(parts)


@dataclass
class Snapshot:
    """A merged tree: entries by relative path plus inode facts.

    ``inodes`` maps each path to its ``(st_dev, st_ino)`` key; :meth:`ino_groups` turns that
    into the partition that is actually compared.  ``dino_mismatch`` holds paths whose readdir
    ``d_ino`` differs from ``st_ino``; ``phantoms`` holds names listed by readdir that lstat
    reports missing.
    """

    entries: dict[str, Entry] = field(default_factory=dict)
    inodes: dict[str, tuple[int, int]] = field(default_factory=dict)
    dino_mismatch: dict[str, tuple[int, int]] = field(default_factory=dict)
    phantoms: set[str] = field(default_factory=set)

    def ino_groups(self, include_dirs: bool = True) -> set[frozenset[str]]:
        """Groups (of size > 1) of paths that share one inode key."""
        groups: dict[tuple[int, int], set[str]] = defaultdict(set)
        for path, key in self.inodes.items():
            if not include_dirs and self.entries[path].kind == "dir":
                continue
            groups[key].add(path)
        return {frozenset(g) for g in groups.values() if len(g) > 1}

    def devices(self) -> set[int]:
        """The distinct ``st_dev`` values seen."""
        return {dev for dev, _ in self.inodes.values()}

    def subtree(self, prefix: str) -> Snapshot:
        """The part of this snapshot under ``prefix`` (paths stay relative to the root)."""
        keep = prefix.rstrip("/") + "/"

        def inside(p: str) -> bool:
            return p.startswith(keep)

        return Snapshot(
            entries={p: e for p, e in self.entries.items() if inside(p)},
            inodes={p: k for p, k in self.inodes.items() if inside(p)},
            dino_mismatch={p: v for p, v in self.dino_mismatch.items() if inside(p)},
            phantoms={p for p in self.phantoms if inside(p)},
        )


def user_xattrs(path: str | bytes, *, everything: bool = False) -> tuple[tuple[str, bytes], ...]:
    """Sorted visible xattrs of ``path`` (never followed).

    By default only ``user.*`` outside the internal namespaces; with ``everything`` every name
    ``listxattr`` returns (``trusted.*``, ``security.*`` too): through a mount, the kernel hides
    its own ``trusted.overlay.*`` and shows escaped ones unescaped, so whatever a backend shows
    beyond that is a difference.
    """
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM):
            return ()
        raise
    out = []
    for name in names:
        if not everything and (
            not name.startswith("user.") or name.startswith(INTERNAL_XATTR_PREFIXES)
        ):
            continue
        try:
            out.append((name, os.getxattr(path, name, follow_symlinks=False)))
        except OSError as exc:
            if exc.errno != errno.ENODATA:
                raise
    return tuple(sorted(out))


def file_digest(path: str | bytes) -> str:
    """sha256 (first 16 hex digits) of a regular file, opened without following symlinks."""
    h = hashlib.sha256()
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    try:
        while chunk := os.read(fd, 1 << 20):
            h.update(chunk)
    finally:
        os.close(fd)
    return h.hexdigest()[:16]


def entry_of(path: str, st: os.stat_result, *, all_xattrs: bool = False) -> Entry:
    """Build the :class:`Entry` for ``path`` whose lstat result is ``st``.

    ``path`` may be a ``/proc/self/fd/N/name`` path (how the fd-relative walks stay below
    PATH_MAX); it is never followed in its last component.
    """
    kind = kind_of(st.st_mode)
    is_dir = kind == "dir"
    return Entry(
        kind=kind,
        mode=stat.S_IMODE(st.st_mode),
        uid=st.st_uid,
        gid=st.st_gid,
        size=None if is_dir else st.st_size,
        digest=file_digest(path) if kind == "reg" else None,
        target=os.fsencode(os.readlink(path)) if kind == "lnk" else None,
        xattrs=user_xattrs(path, everything=all_xattrs) if kind != "lnk" else (),
        nlink=None if is_dir else st.st_nlink,
        rdev=(os.major(st.st_rdev), os.minor(st.st_rdev)) if kind in ("chr", "blk") else None,
    )


def walk_fd(
    root: str | Path, under: str = ""
) -> Iterator[tuple[str, os.stat_result | None, int, str, int]]:
    """Depth-first no-follow walk through directory file descriptors.

    Yields ``(relative path, lstat, parent dir fd, name, readdir d_ino)`` for every entry below
    ``root/under``; the fd is valid only until the next item.  Every syscall is relative to a
    directory fd, so paths longer than PATH_MAX are walked too.  Entries that vanish between
    readdir and lstat are yielded with ``lstat`` None (phantoms).  Directories that cannot be
    opened are not descended into.
    """
    top = os.open(os.fspath(root), os.O_RDONLY | os.O_DIRECTORY)
    fds = [top]
    try:
        start = top
        for comp in [c for c in under.strip("/").split("/") if c]:
            try:
                start = os.open(comp, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=start)
            except FileNotFoundError:
                return  # no such subtree: nothing to walk (as os.walk)
            fds.append(start)
        yield from _walk_dir(start, under.strip("/"))
    finally:
        for fd in fds:
            os.close(fd)


def _walk_dir(dfd: int, rel: str) -> Iterator[tuple[str, os.stat_result | None, int, str, int]]:
    with os.scandir(dfd) as it:
        listing = sorted((e.name, e.inode()) for e in it)
    for name, dino in listing:
        relpath = f"{rel}/{name}" if rel else name
        try:
            st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
        except FileNotFoundError:
            yield relpath, None, dfd, name, dino
            continue
        yield relpath, st, dfd, name, dino
        if stat.S_ISDIR(st.st_mode):
            try:
                sub = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=dfd)
            except OSError:
                continue
            try:
                yield from _walk_dir(sub, relpath)
            finally:
                os.close(sub)


def snapshot(root: str | Path, *, under: str = "", all_xattrs: bool = False) -> Snapshot:
    """Walk the tree at ``root`` (lstat, never following) and snapshot it.

    ``under`` restricts the walk to one subdirectory (relative path); paths in the result are
    always relative to ``root``.  ``all_xattrs`` records every visible xattr, not only
    ``user.*``.  The walk is fd-relative, so paths longer than PATH_MAX are included.
    """
    snap = Snapshot()
    for relpath, st, dfd, name, dino in walk_fd(root, under):
        if st is None:
            snap.phantoms.add(relpath)
            continue
        snap.entries[relpath] = entry_of(f"/proc/self/fd/{dfd}/{name}", st, all_xattrs=all_xattrs)
        snap.inodes[relpath] = (st.st_dev, st.st_ino)
        if dino != st.st_ino:
            snap.dino_mismatch[relpath] = (dino, st.st_ino)
    return snap


def diff(
    expected: Snapshot,
    actual: Snapshot,
    *,
    labels: tuple[str, str] = ("expected", "actual"),
    inodes: bool = True,
    dino: bool = True,
    ignore: frozenset[str] = frozenset(),
    limit: int = 60,
) -> list[str]:
    """Readable differences between two merged-tree snapshots (empty list: equal).

    ``inodes`` compares the partition of paths by inode key; ``dino`` reports paths of
    ``actual`` whose readdir ``d_ino`` differs from ``st_ino`` (when ``expected`` has none
    there).  ``ignore`` names :class:`Entry` fields left out of the comparison (e.g.
    ``{"nlink"}`` for a backend with a documented gap).
    """
    a, b = labels
    out: list[str] = []
    if ignore:
        blank = dict.fromkeys(ignore)
        expected = replace(
            expected, entries={p: replace(e, **blank) for p, e in expected.entries.items()}
        )
        actual = replace(
            actual, entries={p: replace(e, **blank) for p, e in actual.entries.items()}
        )
    for path in sorted(expected.entries.keys() - actual.entries.keys()):
        out.append(f"only in {a}: {path}  [{expected.entries[path].describe()}]")
    for path in sorted(actual.entries.keys() - expected.entries.keys()):
        out.append(f"only in {b}: {path}  [{actual.entries[path].describe()}]")
    for path in sorted(expected.entries.keys() & actual.entries.keys()):
        ea, eb = expected.entries[path], actual.entries[path]
        if ea != eb:
            out.append(f"differs: {path}\n    {a}: {ea.describe()}\n    {b}: {eb.describe()}")
    for path in sorted(expected.phantoms ^ actual.phantoms):
        who = a if path in expected.phantoms else b
        out.append(f"phantom (listed by readdir, lstat ENOENT) only in {who}: {path}")
    if inodes:
        common = expected.entries.keys() & actual.entries.keys()
        ga = {g & common for g in expected.ino_groups()}
        gb = {g & common for g in actual.ino_groups()}
        ga = {g for g in ga if len(g) > 1}
        gb = {g for g in gb if len(g) > 1}
        for g in sorted(ga - gb, key=sorted):
            out.append(f"inode group only in {a}: {sorted(g)}")
        for g in sorted(gb - ga, key=sorted):
            out.append(f"inode group only in {b}: {sorted(g)}")
    if dino:
        for path in sorted(actual.dino_mismatch.keys() - expected.dino_mismatch.keys()):
            d, s = actual.dino_mismatch[path]
            out.append(f"{b}: d_ino {d} != st_ino {s} at {path}")
    if len(out) > limit:
        out = out[:limit] + [f"... and {len(out) - limit} more"]
    return out


# ---------------------------------------------------------------------------------------------
# Upper directories


@dataclass(frozen=True)
class UpperEntry:
    """One entry of an upper directory as stored on disk.

    ``kind`` is ``whiteout`` for a char 0/0 device, ``oci-whiteout`` for ``.wh.<name>``,
    ``oci-opaque`` for ``.wh..wh..opq``; otherwise a file type.  Whiteouts record nothing else
    (their mode, owner and link count are implementation details).  ``opaque`` holds the
    ``trusted.overlay.opaque`` and ``user.overlay.opaque`` values (or None), ``xwhiteout``
    whether an ``overlay.whiteout`` xattr is present.
    """

    kind: str
    entry: Entry | None = None
    opaque: tuple[bytes | None, bytes | None] = (None, None)
    xwhiteout: bool = False

    def describe(self) -> str:
        """One-line description used in diff output."""
        s = self.kind
        if self.entry is not None:
            s += f" [{self.entry.describe()}]"
        if self.opaque != (None, None):
            s += f" opaque(trusted={self.opaque[0]!r}, user={self.opaque[1]!r})"
        if self.xwhiteout:
            s += " overlay.whiteout-xattr"
        return s


def _getx(path: str, name: str) -> bytes | None:
    try:
        return os.getxattr(path, name, follow_symlinks=False)
    except OSError as exc:
        if exc.errno in (errno.ENODATA, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM):
            return None
        raise


#: The kernel's bookkeeping xattrs whose bytes are the kernel's own (a file handle of the lower
#: object, an "impure" flag): compared by presence unless ``UNIONFS_DIFF_ORIGIN=exact``.
BOOKKEEPING_XATTRS = ("trusted.overlay.origin", "trusted.overlay.impure")


def origin_mode() -> str:
    """``presence`` (default) or ``exact``: how :data:`BOOKKEEPING_XATTRS` are compared in
    upper snapshots (the switch ``UNIONFS_DIFF_ORIGIN``)."""
    mode = os.environ.get("UNIONFS_DIFF_ORIGIN", "presence")
    if mode not in ("presence", "exact"):
        raise ValueError(f"UNIONFS_DIFF_ORIGIN={mode!r}: expected presence or exact")
    return mode


def _stored_xattrs(path: str, origin: str) -> tuple[tuple[str, bytes], ...]:
    """Every xattr stored on ``path`` in every namespace, bookkeeping values blanked unless
    ``origin == "exact"``."""
    out = []
    for name, value in user_xattrs(path, everything=True):
        if name in BOOKKEEPING_XATTRS and origin != "exact":
            value = b"<present>"
        out.append((name, value))
    return tuple(out)


def upper_snapshot(
    root: str | Path,
    *,
    under: str = "",
    dir_meta: bool = True,
    xattrs: str = "all",
    origin: str | None = None,
) -> dict[str, UpperEntry]:
    """Snapshot an upper directory (or one subdirectory of it) as stored on disk.

    ``xattrs="all"`` (default) records every xattr in every namespace on every non-whiteout
    entry (``trusted.overlay.origin``/``impure`` by presence, or exactly with
    ``origin="exact"``, default from ``UNIONFS_DIFF_ORIGIN``); ``xattrs="user"`` records only
    user-visible ``user.*`` plus the opaque/whiteout markers (for stand-in backends with their
    own bookkeeping).  Times are ignored.  With ``dir_meta=False`` directory mode/owner are not
    recorded.  The walk is fd-relative (paths longer than PATH_MAX are fine).
    """
    origin = origin or origin_mode()
    out: dict[str, UpperEntry] = {}
    for relpath, st, dfd, name, _dino in walk_fd(root, under):
        if st is None:
            continue
        p = f"/proc/self/fd/{dfd}/{name}"
        if stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:
            out[relpath] = UpperEntry("whiteout")
            continue
        if name == ".wh..wh..opq":
            out[relpath] = UpperEntry("oci-opaque")
            continue
        if name.startswith(".wh."):
            out[relpath] = UpperEntry("oci-whiteout")
            continue
        e = entry_of(p, st)
        if xattrs == "all":
            e = replace(e, xattrs=_stored_xattrs(p, origin))
        if e.kind == "dir" and not dir_meta:
            e = replace(e, mode=0, uid=0, gid=0)
        opaque = (_getx(p, "trusted.overlay.opaque"), _getx(p, "user.overlay.opaque"))
        xwh = any(
            _getx(p, n) is not None for n in ("trusted.overlay.whiteout", "user.overlay.whiteout")
        )
        out[relpath] = UpperEntry(e.kind, e, opaque if e.kind == "dir" else (None, None), xwh)
    return out


def diff_upper(
    expected: dict[str, UpperEntry],
    actual: dict[str, UpperEntry],
    *,
    labels: tuple[str, str] = ("expected", "actual"),
    limit: int = 60,
) -> list[str]:
    """Readable differences between two upper snapshots (empty list: equal)."""
    a, b = labels
    out: list[str] = []
    for path in sorted(expected.keys() | actual.keys()):
        ea, eb = expected.get(path), actual.get(path)
        if ea == eb:
            continue
        if eb is None:
            assert ea is not None
            out.append(f"upper only in {a}: {path}  [{ea.describe()}]")
        elif ea is None:
            out.append(f"upper only in {b}: {path}  [{eb.describe()}]")
        else:
            out.append(f"upper differs: {path}\n    {a}: {ea.describe()}\n    {b}: {eb.describe()}")
    if len(out) > limit:
        out = out[:limit] + [f"... and {len(out) - limit} more"]
    return out


def iter_tree(root: str | Path, under: str = "") -> Iterator[tuple[str, os.stat_result]]:
    """Yield ``(relative path, lstat)`` for every entry below ``root/under``, never following.

    Names that vanish between readdir and lstat are skipped; the walk is fd-relative.
    """
    try:
        for relpath, st, _dfd, _name, _dino in walk_fd(root, under):
            if st is not None:
                yield relpath, st
    except OSError:
        return


def format_report(title: str, lines: Iterable[str]) -> str:
    """Join difference lines under a title, for assertion messages."""
    body = "\n".join(f"  {line}" for line in lines)
    return f"{title}\n{body}"
