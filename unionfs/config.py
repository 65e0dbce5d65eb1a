"""Mount configuration: the fuse-overlayfs option syntax, and validation of a layer set.

Everything here runs before anything is mounted or written: a bad layer set is reported as one
:class:`~unionfs.errors.UnionfsError` line and nothing on disk changes.

Unknown ``-o`` options are warned about and ignored, as fuse-overlayfs does, because
``mount -t fuse.unionfs`` and tools written for fuse-overlayfs pass generic mount options
(``rw``, ``relatime``, ``x-systemd.*`` ...) that a FUSE daemon does not act on. The kernel mount
flags ``dev``/``nodev``, ``suid``/``nosuid`` and ``exec``/``noexec`` are honoured (the last one
given wins); see :func:`unionfs.daemon.fuse_options` for the defaults.

Validation opens every layer root and the workdir once (:class:`OpenedDir`): the daemon uses
those descriptors and never resolves the paths again, so a directory swapped for a symlink
after validation changes nothing. Sameness and nesting of layers are decided by device and
inode number, so two paths to one directory (a bind-mount alias) are refused as the kernel
refuses them.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import stat
import sys
from collections.abc import Iterable
from typing import Any

from unionfs.cli.args import split_lowerdir, unescape
from unionfs.errors import UnionfsError, UsageError
from unionfs.fdops import mount_id, open_dir_at
from unionfs.idmap import IdMap, Range, parse_mapping
from unionfs.paths import in_user_namespace

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 86400.0
DEFAULT_READAHEAD_KB = 1024
# busy_poll=: 50 µs catches the next request of a program issuing system calls back to back
# (about 20 µs apart here); the cap keeps a typo from pinning a CPU.
DEFAULT_BUSY_POLL_US = 50
MAX_BUSY_POLL_US = 1000

# Generic mount options a helper may hand us; accepted silently, they need no action here.
_PASSIVE_OPTIONS = {
    "rw",
    "atime",
    "noatime",
    "relatime",
    "strictatime",
    "lazytime",
    "nodiratime",
    "diratime",
    "async",
    "sync",
    "defaults",
    "auto",
    "noauto",
    "user",
    "nouser",
    "users",
    "_netdev",
    "nofail",
    "default_permissions",
    "allow_root",
    "allow_other",
    "threaded",
    "fast_ino",
    "writeback",
    "noxattrs",
    "redirect_dir",
    "index",
    "xino",
    "metacopy",
    "fsname",
    "subtype",
    "context",
    "fscontext",
    "defcontext",
    "rootcontext",
    "max_read",
    "blksize",
}


@dataclasses.dataclass(frozen=True)
class MountConfig:
    """A description of one union mount (validated by :func:`validate`), never changed once
    made: :func:`apply_options` and :func:`validate` return new ones."""

    lowers: list[str]  # top to bottom
    mountpoint: str
    upper: str | None = None
    workdir: str | None = None
    foreground: bool = False
    debug: bool = False
    timeout: float = DEFAULT_TIMEOUT
    fsync: bool = True
    # Readahead window of the mount, in KiB: the kernel's FUSE default (128) splits a
    # sequential read into 128 KiB requests, each a round trip to the daemon.
    readahead_kb: int = DEFAULT_READAHEAD_KB
    # How long the request loop keeps polling for the next request before it sleeps, in
    # microseconds, when requests come back to back (0: never). A request that finds the
    # daemon awake needs no wake-up, which on a VM is most of a round trip. See
    # third_party/pyfuse3/README.md, idle-spin.patch.
    busy_poll_us: int = DEFAULT_BUSY_POLL_US
    read_only: bool = False
    auto_unmount: bool = False
    allow_other: bool = True
    userxattr: bool = False
    nonempty: bool = False
    # Kernel mount flags. The defaults are fuse-overlayfs's as root: setuid binaries of an
    # image work, device nodes in a layer do not (a container gets its devices from its
    # runtime's /dev), programs may run. Without root, fusermount3 forces nosuid,nodev.
    dev: bool = False
    suid: bool = True
    exec: bool = True
    # Ask the kernel to enforce POSIX ACLs (FUSE_CAP_POSIX_ACL) -- ``noacl`` turns it off.
    acl: bool = True
    # Owner mapping (fuse-overlayfs's uidmapping=/gidmapping=, STORED:SHOWN:LENGTH ranges) and
    # squashing (squash_to_root, squash_to_uid=, squash_to_gid=): see unionfs.idmap.
    uid_ranges: tuple[Range, ...] = ()
    gid_ranges: tuple[Range, ...] = ()
    squash_to_root: bool = False
    squash_to_uid: int | None = None
    squash_to_gid: int | None = None
    # Directories report one link (fuse-overlayfs's static_nlink: find(1) then does not
    # trust the link count to skip subdirectory scans).
    static_nlink: bool = False
    # Owner and mode of what the mount changes or creates kept in an xattr of the upper object
    # instead of its inode (fuse-overlayfs's xattr_permissions): 0 off,
    # 1 security.fuseoverlayfs.override_stat, 2 user.fuseoverlayfs.override_stat. See
    # unionfs.fs.override.
    xattr_permissions: int = 0

    @property
    def writable(self) -> bool:
        return self.upper is not None and not self.read_only

    @property
    def idmap(self) -> IdMap | None:
        """The owner mapping the options ask for; None when they ask for none."""
        return IdMap.of(
            self.uid_ranges,
            self.gid_ranges,
            self.squash_to_root,
            self.squash_to_uid,
            self.squash_to_gid,
        )


# Options without a value that set one field: name -> (field, value). The kernel mount flags
# come in pairs (dev/nodev ...): the last one given wins.
_FLAG_OPTIONS: dict[str, tuple[str, bool]] = {
    "volatile": ("fsync", False),
    "ro": ("read_only", True),
    "auto_unmount": ("auto_unmount", True),
    "debug": ("debug", True),
    "userxattr": ("userxattr", True),
    "nonempty": ("nonempty", True),
    "noallow_other": ("allow_other", False),
    "noacl": ("acl", False),
    "squash_to_root": ("squash_to_root", True),
    "static_nlink": ("static_nlink", True),
    **{flag: (flag, True) for flag in ("dev", "suid", "exec")},
    **{"no" + flag: (flag, False) for flag in ("dev", "suid", "exec")},
}


def _bool_option(name: str, value: str | None) -> bool:
    if value is None:
        return True
    if value.lower() in ("1", "on", "yes", "true", "y"):
        return True
    if value.lower() in ("0", "off", "no", "false", "n"):
        return False
    raise UsageError(f"option {name}={value}: expected 0 or 1")


def apply_options(cfg: MountConfig, options: list[str]) -> tuple[MountConfig, list[str]]:
    """``cfg`` with the ``-o`` options (already split) applied, and the warnings for the
    unknown ones (returned, for the caller to print: ``cfg`` itself is never changed)."""
    new: dict[str, Any] = {}
    warnings: list[str] = []
    for opt in options:
        if not opt:
            continue  # podman may send empty options between commas
        name, eq, value = opt.partition("=")
        val = value if eq else None
        if name == "lowerdir":
            new["lowers"] = split_lowerdir(value)
        elif name == "upperdir":
            new["upper"] = unescape(value)
        elif name == "workdir":
            new["workdir"] = unescape(value)
        elif name == "timeout":
            try:
                new["timeout"] = float(value)
            except ValueError:
                raise UsageError(f"option timeout={value}: expected a number of seconds") from None
            if new["timeout"] < 0:
                raise UsageError("option timeout must not be negative")
        elif name == "readahead":
            if not value.isdigit():
                raise UsageError(f"option readahead={value}: expected a size in KiB")
            new["readahead_kb"] = int(value)
        elif name == "busy_poll":
            if not value.isdigit() or int(value) > MAX_BUSY_POLL_US:
                raise UsageError(
                    f"option busy_poll={value}: expected microseconds, 0 to {MAX_BUSY_POLL_US}"
                )
            new["busy_poll_us"] = int(value)
        elif name in ("uidmapping", "gidmapping"):
            new["uid_ranges" if name[0] == "u" else "gid_ranges"] = parse_mapping(name, value)
        elif name in ("squash_to_uid", "squash_to_gid"):
            if not value.isdigit() or int(value) > 0xFFFFFFFE:
                raise UsageError(f"option {name}={value}: expected a numeric id")
            new[name] = int(value)
        elif name == "xattr_permissions":
            if value not in ("0", "1", "2"):
                raise UsageError(f"option xattr_permissions={value}: expected 0, 1 or 2")
            new["xattr_permissions"] = int(value)
        elif name == "fsync":
            new["fsync"] = _bool_option(name, val)
        elif name in _FLAG_OPTIONS:
            field, flag = _FLAG_OPTIONS[name]
            new[field] = flag
        elif name in _PASSIVE_OPTIONS or name.startswith("x-"):
            continue
        else:
            warnings.append(f"unknown argument ignored: {opt}")
    return dataclasses.replace(cfg, **new), warnings


class OpenedDir(str):
    """A validated directory: its canonical path plus the descriptor opened at validation.

    A ``str`` (the path, for messages, the state record and ``inspect``) that also carries
    ``fd``, ``dev`` and ``ino``. The daemon reaches the directory only through ``fd``; the
    path is never resolved again. :meth:`take` hands the descriptor to its one owner.
    """

    fd: int
    dev: int
    ino: int

    def __new__(cls, path: str, fd: int, st: os.stat_result) -> OpenedDir:
        self = super().__new__(cls, path)
        self.fd, self.dev, self.ino = fd, st.st_dev, st.st_ino
        return self

    @property
    def key(self) -> tuple[int, int]:
        return (self.dev, self.ino)

    def take(self) -> int:
        """The descriptor, now owned (and closed) by the caller; a second take is an error."""
        fd = self.fd
        if fd < 0:
            raise ValueError(f"the descriptor of {str(self)!r} was already taken")
        self.fd = -1
        return fd

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _stat_dir(path: str, what: str) -> os.stat_result:
    """The stat of the directory ``path`` (followed); a one-line error naming ``what``."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise UnionfsError(f"{what} {path!r} does not exist") from None
    except OSError as exc:
        raise UnionfsError(f"{what} {path!r}: {exc.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise UnionfsError(f"{what} {path!r} is not a directory")
    return st


def open_validated(path: str, what: str) -> OpenedDir:
    """Open the directory ``path`` once, for good; the one-line error names ``what``.

    The path is made canonical (``realpath``) and stat-ed, then its last component is opened
    ``O_NOFOLLOW``; the descriptor must be the directory that was stat-ed (same device and
    inode), so a swap between the two is refused rather than followed.
    """
    st = _stat_dir(path, what)
    real = os.path.realpath(path)
    try:
        fd = open_dir_at(-1, real)
    except OSError as exc:
        raise UnionfsError(f"{what} {path!r}: {exc.strerror}") from None
    fst = os.fstat(fd)
    if (fst.st_dev, fst.st_ino) != (st.st_dev, st.st_ino):
        os.close(fd)
        raise UnionfsError(f"{what} {path!r} changed while it was being checked")
    return OpenedDir(real, fd, fst)


_Key = tuple[int, int]
_Place = tuple[int, int, int]  # (mount id, device, inode)


class _Ancestry:
    """(device, inode) of every directory above a descriptor, walking ``..`` by descriptor.

    The parent of each directory met is remembered, so 2,000 layers in one parent cost one
    walk of that parent's ancestors. ``..`` crosses mount points upwards as a path walk does.
    A directory is remembered by its mount as well: a bind mount of a directory inside
    itself (podman mounts its storage so for ``--uidmap``) shows one (device, inode) at two
    places of one walk, with different parents.
    """

    def __init__(self) -> None:
        self.parent: dict[_Place, _Place | None] = {}

    @staticmethod
    def _place(fd: int) -> _Place:
        st = os.fstat(fd)
        try:
            mnt = mount_id(fd)
        except OSError:
            mnt = 0  # no statx mount id (old kernel): by (device, inode) alone
        return (mnt, st.st_dev, st.st_ino)

    def above(self, fd: int) -> list[_Key]:
        start = place = self._place(fd)
        cur = os.dup(fd)
        try:
            while place not in self.parent:
                up = os.open("..", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=cur)
                os.close(cur)
                cur = up
                pplace = self._place(cur)
                self.parent[place] = None if pplace == place else pplace
                place = pplace
        finally:
            os.close(cur)
        out: list[_Key] = []
        walked = {start}
        nxt = self.parent[start]
        while nxt is not None and nxt not in walked:  # never loops, whatever the mounts
            walked.add(nxt)
            out.append(nxt[1:])
            nxt = self.parent[nxt]
        return out


def _check_overlaps(named: list[tuple[str, OpenedDir]]) -> _Ancestry:
    """Reject a layer set where one directory is the same as, or nested in, another.

    Directories are compared by (device, inode), not by path: a bind-mount alias of a layer
    is that layer. Returns the ancestry cache, for the mountpoint check.
    """
    seen: dict[_Key, tuple[str, OpenedDir]] = {}
    for what, d in named:
        prev = seen.get(d.key)
        if prev is not None:
            pwhat, pd = prev
            if pwhat == what == "lowerdir" and pd == d:
                raise UnionfsError(f"lowerdir {str(d)!r} is given twice")
            if pd == d:
                raise UnionfsError(f"{pwhat} and {what} are the same directory {str(d)!r}")
            raise UnionfsError(f"{pwhat} {str(pd)!r} and {what} {str(d)!r} are the same directory")
        seen[d.key] = (what, d)
    ancestry = _Ancestry()
    for what, d in named:
        for key in ancestry.above(d.fd):
            outer = seen.get(key)
            if outer is not None:
                owhat, od = outer
                raise UnionfsError(
                    f"{what} {str(d)!r} is inside {owhat} {str(od)!r}; layers must not overlap"
                )
    return ancestry


def close_dirs(dirs: Iterable[OpenedDir]) -> None:
    """Close the descriptors of validated directories that nobody took."""
    for d in dirs:
        d.close()


def validate(cfg: MountConfig) -> MountConfig:
    """Check the layer set and mountpoint; return a copy of ``cfg`` with its directories
    opened: ``lowers``, ``upper`` and ``workdir`` become :class:`OpenedDir` values
    (canonical paths carrying the descriptor the daemon will use). Raises
    :class:`UnionfsError` with a one-line message for every kind of bad input the README
    lists; nothing is created or changed on failure, and no descriptor is left open.
    """
    if not cfg.lowers:
        raise UsageError("no lower layer given (use --lower DIR or -o lowerdir=DIR[:DIR...])")
    if (cfg.upper is None) != (cfg.workdir is None):
        raise UsageError("upperdir and workdir must be given together")
    if not os.path.exists("/dev/fuse"):
        raise UnionfsError("/dev/fuse does not exist (is the fuse module loaded?)")
    if cfg.dev and in_user_namespace():
        # The kernel makes every mount of a user namespace nodev, whatever is asked.
        raise UsageError("option dev: device files cannot be used by a mount in a user namespace")
    opened: list[OpenedDir] = []
    try:
        return _validate(cfg, opened)
    except BaseException:
        close_dirs(opened)
        raise


def _validate(cfg: MountConfig, opened: list[OpenedDir]) -> MountConfig:
    named: list[tuple[str, OpenedDir]] = []
    for what, path in (
        *(("lowerdir", p) for p in cfg.lowers),
        *((("upperdir", cfg.upper), ("workdir", cfg.workdir)) if cfg.upper is not None else ()),
    ):
        assert path is not None
        d = open_validated(path, what)
        opened.append(d)
        named.append((what, d))
    nlow = len(cfg.lowers)
    lowers: list[str] = [d for _, d in named[:nlow]]
    upper = workdir = None
    if len(named) > nlow:
        upper, workdir = named[nlow][1], named[nlow + 1][1]
    ancestry = _check_overlaps(named)
    if upper is not None and workdir is not None:
        if upper.dev != workdir.dev:
            raise UnionfsError(
                f"workdir {str(workdir)!r} is not on the same filesystem as upperdir {str(upper)!r}"
            )
        if not cfg.read_only:
            for what, d in (("upperdir", upper), ("workdir", workdir)):
                if not os.access(".", os.W_OK, dir_fd=d.fd):
                    raise UnionfsError(f"{what} {str(d)!r} is not writable")
    _stat_dir(cfg.mountpoint, "mountpoint")
    mnt = os.path.realpath(cfg.mountpoint)
    if os.path.ismount(mnt):
        raise UnionfsError(f"mountpoint {mnt!r} is busy: something is already mounted there")
    if not cfg.nonempty and os.listdir(mnt):
        raise UnionfsError(f"mountpoint {mnt!r} is not empty (use -o nonempty to mount anyway)")
    layer_of = {d.key: (what, d) for what, d in named}
    mfd = os.open(mnt, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        mkey = os.fstat(mfd)
        for key in [(mkey.st_dev, mkey.st_ino), *ancestry.above(mfd)]:
            if key in layer_of:
                what, d = layer_of[key]
                raise UnionfsError(f"mountpoint {mnt!r} is inside {what} {str(d)!r}")
    finally:
        os.close(mfd)
    return dataclasses.replace(cfg, lowers=lowers, upper=upper, workdir=workdir, mountpoint=mnt)


def warn(warnings: Iterable[str]) -> None:
    """Print option warnings, one line each, to stderr."""
    for w in warnings:
        print(f"unionfs: {w}", file=sys.stderr)
