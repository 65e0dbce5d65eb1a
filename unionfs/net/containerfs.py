"""The container's mount namespace: the rootfs as ``/``, a fresh /proc, /sys and a private /dev.

Run by the container's init, in its own mount namespace, in two halves around pivot_root:

:func:`prepare` (host paths still visible)
    makes every mount private, bind-mounts the rootfs onto itself, makes sure ``proc``, ``sys``
    and ``dev`` exist in it as real directories (created if missing; a symlink or a file there
    is refused, never followed) and clones the host devices of :data:`DEVICES` as detached
    bind mounts (open_tree), which survive the pivot.

:func:`populate` (after pivot_root, so every path resolves inside the rootfs: ``..`` and
absolute symlinks stop at its root)
    * remounts ``/``, and every mount that was inside ROOTFS, ``nodev`` (we have no device
      cgroup: a device node in a layer must not give access to a host device) and, with
      ``--read-only``, read-only;
    * mounts a new procfs (``nosuid,nodev,noexec``) and sysfs (read-only unless privileged);
    * mounts a tmpfs on /dev (``nosuid,noexec,nodev``) and attaches there the clones of the
      host's null, zero, full, random, urandom and tty (a bind keeps the host device mount's
      flags, so they work on a nodev tmpfs), a new devpts instance at ``/dev/pts`` with
      ``/dev/ptmx`` pointing into it, a tmpfs at ``/dev/shm``, and the links ``fd``,
      ``stdin``, ``stdout``, ``stderr``;
    * unless privileged, Docker's read-only paths (:data:`PROC_READ_ONLY`) and masked paths
      (:data:`MASKED`): a file is hidden by binding the new ``/dev/null`` over it, a
      directory by an empty read-only tmpfs.

No host path is looked up after the pivot.  Both halves run as the host's root: a private user
namespace is entered only afterwards (see ``process``), so the container's mount namespace
belongs to the host's user namespace and no capability given to the container lets it mount.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path

from unionfs.net import syscalls as sc
from unionfs.net.confinement import Confinement

DEVICES = ("null", "zero", "full", "random", "urandom", "tty")
MOUNT_POINTS = ("proc", "sys", "dev")
PROC_READ_ONLY = ("bus", "fs", "irq", "sys", "sysrq-trigger")
MASKED = (
    "/proc/asound",
    "/proc/acpi",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/sys/firmware",
    "/sys/devices/virtual/powercap",
)
"""Docker's default masked paths (moby ``oci/defaults.go``)."""

_PROC_FLAGS = sc.MS_NOSUID | sc.MS_NODEV | sc.MS_NOEXEC
_STATVFS_TO_MS = (
    (os.ST_RDONLY, sc.MS_RDONLY),
    (os.ST_NOSUID, sc.MS_NOSUID),
    (os.ST_NODEV, sc.MS_NODEV),
    (os.ST_NOEXEC, sc.MS_NOEXEC),
    (os.ST_NOATIME, sc.MS_NOATIME),
    (os.ST_NODIRATIME, sc.MS_NODIRATIME),
    (os.ST_RELATIME, sc.MS_RELATIME),
)


class SetupError(OSError):
    """The rootfs cannot host a container (one line, shown to the user)."""


@dataclass
class HostObjects:
    """Detached bind mounts (open_tree descriptors, close-on-exec) of host devices by name."""

    devices: dict[str, int] = field(default_factory=dict)


def _mount_flags(path: str) -> int:
    """The MS_* flags a bind remount of ``path`` must keep (a user namespace locks them)."""
    have = os.statvfs(path).f_flag
    return sum(ms for st, ms in _STATVFS_TO_MS if have & st)


def _ensure_mount_point(root_fd: int, name: str, rootfs: Path) -> None:
    try:
        st = os.stat(name, dir_fd=root_fd, follow_symlinks=False)
    except FileNotFoundError:
        os.mkdir(name, 0o755, dir_fd=root_fd)
        return
    if not stat.S_ISDIR(st.st_mode):
        raise SetupError(errno.ENOTDIR, f"{rootfs}/{name} is not a directory (a symlink?)")


def prepare(rootfs: Path) -> HostObjects:
    """The first half (see the module doc); the caller then pivots into ``rootfs``."""
    sc.mount(None, "/", None, sc.MS_REC | sc.MS_PRIVATE, None)
    sc.mount(str(rootfs), str(rootfs), None, sc.MS_BIND | sc.MS_REC, None)
    root_fd = os.open(rootfs, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for name in MOUNT_POINTS:
            _ensure_mount_point(root_fd, name, rootfs)
    finally:
        os.close(root_fd)
    host = HostObjects()
    for name in DEVICES:
        with contextlib.suppress(FileNotFoundError):
            if stat.S_ISCHR(os.stat(f"/dev/{name}", follow_symlinks=False).st_mode):
                host.devices[name] = sc.open_tree_clone(f"/dev/{name}")
    if "null" not in host.devices:
        raise SetupError(errno.ENODEV, "the host has no /dev/null character device")
    return host


def populate(conf: Confinement, host: HostObjects) -> None:
    """The second half (see the module doc); the working directory is the new ``/``."""
    flags = _mount_flags("/")
    if not conf.privileged:
        flags |= sc.MS_NODEV
    if conf.read_only:
        flags |= sc.MS_RDONLY
    sc.mount(None, "/", None, sc.MS_REMOUNT | sc.MS_BIND | flags, None)
    sc.mount("proc", "/proc", "proc", _PROC_FLAGS, None)
    # A remount changes one mount; mounts that were inside ROOTFS came along with the
    # recursive bind and need the same nodev / read-only.
    extra = (0 if conf.privileged else sc.MS_NODEV) | (sc.MS_RDONLY if conf.read_only else 0)
    if extra:
        for target in _submounts():
            with contextlib.suppress(FileNotFoundError):
                flags = _mount_flags(target) | extra
                sc.mount(None, target, None, sc.MS_REMOUNT | sc.MS_BIND | flags, None)
    sc.mount("sysfs", "/sys", "sysfs", (0 if conf.privileged else sc.MS_RDONLY) | _PROC_FLAGS, None)
    _mount_dev(conf, host)
    if not conf.privileged:
        for name in PROC_READ_ONLY:
            _bind_read_only(f"/proc/{name}")
        for path in MASKED:
            _mask(path)


def _unescape(field: str) -> str:
    """Undo mountinfo's octal escapes (``\\040`` for a space, and so on)."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def _submounts() -> list[str]:
    """Mount points below ``/`` other than ``/proc``, parents first (from mountinfo)."""
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            target = _unescape(line.split()[4])
            if target != "/" and target != "/proc" and not target.startswith("/proc/"):
                found.append(target)
    return found


def _bind_read_only(path: str) -> None:
    if not os.path.lexists(path):
        return
    sc.mount(path, path, None, sc.MS_BIND | sc.MS_REC, None)
    flags = _mount_flags(path) | sc.MS_RDONLY | _PROC_FLAGS
    sc.mount(None, path, None, sc.MS_REMOUNT | sc.MS_BIND | flags, None)


def _mask(path: str) -> None:
    try:
        st = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        sc.mount("tmpfs", path, "tmpfs", sc.MS_RDONLY | _PROC_FLAGS, "size=0,mode=555")
    else:
        sc.mount("/dev/null", path, None, sc.MS_BIND, None)


def _mount_dev(conf: Confinement, host: HostObjects) -> None:
    nodev = 0 if conf.privileged else sc.MS_NODEV
    sc.mount("tmpfs", "/dev", "tmpfs", sc.MS_NOSUID | sc.MS_NOEXEC | nodev, "mode=755,size=65536k")
    for name, fd in host.devices.items():
        target = f"/dev/{name}"
        os.close(os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666))
        sc.move_mount_to(fd, target)
        os.close(fd)
    os.mkdir("/dev/pts", 0o755)
    sc.mount(
        "devpts",
        "/dev/pts",
        "devpts",
        sc.MS_NOSUID | sc.MS_NOEXEC,
        "newinstance,ptmxmode=0666,mode=0620",
    )
    os.symlink("pts/ptmx", "/dev/ptmx")
    os.mkdir("/dev/shm", 0o1777)
    sc.mount("shm", "/dev/shm", "tmpfs", _PROC_FLAGS, "mode=1777,size=65536k")
    for name, target in (
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ):
        os.symlink(target, f"/dev/{name}")
