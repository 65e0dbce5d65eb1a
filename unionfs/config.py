"""Mount configuration: the fuse-overlayfs option syntax, and validation of a layer set.

Everything here runs before anything is mounted or written: a bad layer set is reported as one
:class:`~unionfs.errors.UnionfsError` line and nothing on disk changes.

Unknown ``-o`` options are warned about and ignored, as fuse-overlayfs does, because
``mount -t fuse.unionfs`` and tools written for fuse-overlayfs pass generic mount options
(``rw``, ``nodev``, ``relatime``, ``x-systemd.*`` ...) that a FUSE daemon does not act on.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import stat
import sys

from unionfs.errors import UnionfsError, UsageError

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 86400.0
DEFAULT_READAHEAD_KB = 1024

# Generic mount options a helper may hand us; accepted silently, they need no action here.
_PASSIVE_OPTIONS = {
    "rw",
    "dev",
    "nodev",
    "suid",
    "nosuid",
    "exec",
    "noexec",
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
    "noacl",
    "threaded",
    "fast_ino",
    "static_nlink",
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


@dataclasses.dataclass
class MountConfig:
    """A validated description of one union mount."""

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
    read_only: bool = False
    auto_unmount: bool = False
    allow_other: bool = True
    userxattr: bool = False
    nonempty: bool = False
    warnings: list[str] = dataclasses.field(default_factory=list)

    @property
    def writable(self) -> bool:
        return self.upper is not None and not self.read_only


def _split(value: str, sep: str, unescape: bool) -> list[str]:
    """Split on ``sep``; a backslash escapes the next character (dropped if ``unescape``)."""
    parts: list[str] = []
    current: list[str] = []
    chars = iter(value)
    for ch in chars:
        if ch == "\\":
            nxt = next(chars, "")
            current.append(nxt if unescape else ch + nxt)
        elif ch == sep:
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    parts.append("".join(current))
    return [p for p in parts if p]


def _unescape(value: str) -> str:
    r"""Drop the backslash of each escape (``\,`` kept by :func:`split_options`)."""
    return "".join(_split(value, "\0", unescape=True))


def split_lowerdir(value: str) -> list[str]:
    r"""Split a ``lowerdir=`` value on ``:``; ``\:`` is a literal colon (and ``\\`` a backslash).

    Empty parts are dropped: the kernel and fuse-overlayfs read ``::`` as a data-only separator.
    """
    return _split(value, ":", unescape=True)


def split_options(value: str) -> list[str]:
    r"""Split a ``-o`` string on commas, keeping ``\,`` (and every escape) for the option."""
    return _split(value, ",", unescape=False)


def _bool_option(name: str, value: str | None) -> bool:
    if value is None:
        return True
    if value.lower() in ("1", "on", "yes", "true", "y"):
        return True
    if value.lower() in ("0", "off", "no", "false", "n"):
        return False
    raise UsageError(f"option {name}={value}: expected 0 or 1")


def apply_options(cfg: MountConfig, options: list[str]) -> None:
    """Apply ``-o`` options (already split) to ``cfg``; unknown ones become warnings."""
    for opt in options:
        name, eq, value = opt.partition("=")
        val = value if eq else None
        if name == "lowerdir":
            cfg.lowers = split_lowerdir(value)
        elif name == "upperdir":
            cfg.upper = _unescape(value)
        elif name == "workdir":
            cfg.workdir = _unescape(value)
        elif name == "timeout":
            try:
                cfg.timeout = float(value)
            except ValueError:
                raise UsageError(f"option timeout={value}: expected a number of seconds") from None
            if cfg.timeout < 0:
                raise UsageError("option timeout must not be negative")
        elif name == "readahead":
            if not value.isdigit():
                raise UsageError(f"option readahead={value}: expected a size in KiB")
            cfg.readahead_kb = int(value)
        elif name == "fsync":
            cfg.fsync = _bool_option(name, val)
        elif name == "volatile":
            cfg.fsync = False
        elif name == "ro":
            cfg.read_only = True
        elif name == "auto_unmount":
            cfg.auto_unmount = True
        elif name == "debug":
            cfg.debug = True
        elif name == "userxattr":
            cfg.userxattr = True
        elif name == "nonempty":
            cfg.nonempty = True
        elif name == "noallow_other":
            cfg.allow_other = False
        elif name in _PASSIVE_OPTIONS or name.startswith("x-"):
            continue
        else:
            cfg.warnings.append(f"unknown argument ignored: {opt}")


def _realdir(path: str, what: str) -> str:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise UnionfsError(f"{what} {path!r} does not exist") from None
    except OSError as exc:
        raise UnionfsError(f"{what} {path!r}: {exc.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise UnionfsError(f"{what} {path!r} is not a directory")
    return os.path.realpath(path)


def _parts(path: str) -> tuple[str, ...]:
    return tuple(p for p in path.split("/") if p)


def _check_overlaps(named: list[tuple[str, str]]) -> None:
    """Reject a layer set where one directory is the same as, or nested in, another.

    Sorting by path components puts every directory directly before its first descendant,
    so checking neighbours finds every nesting in O(n log n) -- 2,000 layers stay instant.
    """
    items = sorted((_parts(path), what, path) for what, path in named)
    for (pa, wa, a), (pb, wb, b) in zip(items, items[1:]):
        if pa == pb:
            if wa == wb == "lowerdir":
                raise UnionfsError(f"lowerdir {a!r} is given twice")
            raise UnionfsError(f"{wa} and {wb} are the same directory {a!r}")
        if pb[: len(pa)] == pa:
            raise UnionfsError(f"{wb} {b!r} is inside {wa} {a!r}; layers must not overlap")


def validate(cfg: MountConfig) -> MountConfig:
    """Check the layer set and mountpoint; return ``cfg`` with canonical absolute paths.

    Raises :class:`UnionfsError` with a one-line message for every kind of bad input the
    README lists; nothing is created or changed on failure.
    """
    if not cfg.lowers:
        raise UsageError("no lower layer given (use --lower DIR or -o lowerdir=DIR[:DIR...])")
    if (cfg.upper is None) != (cfg.workdir is None):
        raise UsageError("upperdir and workdir must be given together")
    if not os.path.exists("/dev/fuse"):
        raise UnionfsError("/dev/fuse does not exist (is the fuse module loaded?)")
    lowers = [_realdir(p, "lowerdir") for p in cfg.lowers]
    named = [("lowerdir", p) for p in lowers]
    upper = workdir = None
    if cfg.upper is not None and cfg.workdir is not None:
        upper = _realdir(cfg.upper, "upperdir")
        workdir = _realdir(cfg.workdir, "workdir")
        named += [("upperdir", upper), ("workdir", workdir)]
    _check_overlaps(named)
    if upper is not None and workdir is not None:
        if os.stat(upper).st_dev != os.stat(workdir).st_dev:
            raise UnionfsError(
                f"workdir {workdir!r} is not on the same filesystem as upperdir {upper!r}"
            )
        if not cfg.read_only:
            for what, path in (("upperdir", upper), ("workdir", workdir)):
                if not os.access(path, os.W_OK):
                    raise UnionfsError(f"{what} {path!r} is not writable")
    try:
        mst = os.stat(cfg.mountpoint)
    except FileNotFoundError:
        raise UnionfsError(f"mountpoint {cfg.mountpoint!r} does not exist") from None
    except OSError as exc:
        raise UnionfsError(f"mountpoint {cfg.mountpoint!r}: {exc.strerror}") from None
    if not stat.S_ISDIR(mst.st_mode):
        raise UnionfsError(f"mountpoint {cfg.mountpoint!r} is not a directory")
    mnt = os.path.realpath(cfg.mountpoint)
    if os.path.ismount(mnt):
        raise UnionfsError(f"mountpoint {mnt!r} is busy: something is already mounted there")
    if not cfg.nonempty and os.listdir(mnt):
        raise UnionfsError(f"mountpoint {mnt!r} is not empty (use -o nonempty to mount anyway)")
    mparts = _parts(mnt)
    for what, path in named:
        pp = _parts(path)
        if mparts[: len(pp)] == pp:
            raise UnionfsError(f"mountpoint {mnt!r} is inside {what} {path!r}")
    cfg.lowers, cfg.upper, cfg.workdir, cfg.mountpoint = lowers, upper, workdir, mnt
    return cfg


def warn(cfg: MountConfig) -> None:
    """Print the collected option warnings, one line each, to stderr."""
    for w in cfg.warnings:
        print(f"unionfs: {w}", file=sys.stderr)
