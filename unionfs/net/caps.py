"""Linux capabilities of a container: names, Docker's default set, and dropping the rest.

A container's capability set is computed as Docker computes it from ``--cap-add`` and
``--cap-drop`` (:func:`resolve`) and applied by the container's init just before it execs the
command (:func:`drop_to`): every capability outside the set leaves the bounding set, the
ambient set is cleared, and effective, permitted and inheritable become the set.  The command
runs as root, so execve gives it exactly ``bounding | inheritable``, which is the set.
"""

from __future__ import annotations

from pathlib import Path

from unionfs.errors import UsageError
from unionfs.net import syscalls as sc

NAMES = (
    "CHOWN",
    "DAC_OVERRIDE",
    "DAC_READ_SEARCH",
    "FOWNER",
    "FSETID",
    "KILL",
    "SETGID",
    "SETUID",
    "SETPCAP",
    "LINUX_IMMUTABLE",
    "NET_BIND_SERVICE",
    "NET_BROADCAST",
    "NET_ADMIN",
    "NET_RAW",
    "IPC_LOCK",
    "IPC_OWNER",
    "SYS_MODULE",
    "SYS_RAWIO",
    "SYS_CHROOT",
    "SYS_PTRACE",
    "SYS_PACCT",
    "SYS_ADMIN",
    "SYS_BOOT",
    "SYS_NICE",
    "SYS_RESOURCE",
    "SYS_TIME",
    "SYS_TTY_CONFIG",
    "MKNOD",
    "LEASE",
    "AUDIT_WRITE",
    "AUDIT_CONTROL",
    "SETFCAP",
    "MAC_OVERRIDE",
    "MAC_ADMIN",
    "SYSLOG",
    "WAKE_ALARM",
    "BLOCK_SUSPEND",
    "AUDIT_READ",
    "PERFMON",
    "BPF",
    "CHECKPOINT_RESTORE",
)
"""Capability names by number (``CAP_`` prefix dropped), as in linux/capability.h."""

NUMBER = {name: number for number, name in enumerate(NAMES)}

DOCKER_DEFAULT = frozenset(
    {
        "CHOWN",
        "DAC_OVERRIDE",
        "FSETID",
        "FOWNER",
        "MKNOD",
        "NET_RAW",
        "SETGID",
        "SETUID",
        "SETFCAP",
        "SETPCAP",
        "NET_BIND_SERVICE",
        "SYS_CHROOT",
        "KILL",
        "AUDIT_WRITE",
    }
)
"""Docker's default capabilities (moby ``oci/caps/defaults.go``); mask ``0xa80425fb``."""


def last_cap() -> int:
    """The highest capability number the running kernel knows."""
    try:
        return int(Path("/proc/sys/kernel/cap_last_cap").read_text())
    except (OSError, ValueError):
        return len(NAMES) - 1


def all_names() -> frozenset[str]:
    """Every capability both we and the running kernel know."""
    return frozenset(NAMES[: last_cap() + 1])


def _normalise(value: str, flag: str) -> str:
    name = value.strip().upper()
    name = name.removeprefix("CAP_")
    if name != "ALL" and name not in NUMBER:
        raise UsageError(f"invalid {flag} {value!r}: unknown capability")
    return name


def resolve(add: list[str], drop: list[str]) -> frozenset[str]:
    """The capability set for ``--cap-add`` and ``--cap-drop`` values, as Docker computes it.

    ``--cap-add ALL`` starts from every capability (then drops apply); ``--cap-drop ALL``
    starts from none (then adds apply); otherwise Docker's default plus adds minus drops.
    Raises :class:`UsageError` for an unknown name.
    """
    adds = {_normalise(v, "--cap-add") for v in add}
    drops = {_normalise(v, "--cap-drop") for v in drop}
    known = all_names()
    if "ALL" in adds:
        return frozenset(known - drops)
    if "ALL" in drops:
        return frozenset(adds & known)
    return frozenset(((DOCKER_DEFAULT | adds) - drops) & known)


def mask(names: frozenset[str]) -> int:
    """The 64-bit capability mask of ``names``."""
    value = 0
    for name in names:
        value |= 1 << NUMBER[name]
    return value


def permitted_now() -> int:
    """The calling thread's permitted set (``CapPrm`` of /proc/self/status)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("CapPrm:"):
            return int(line.split()[1], 16)
    return 0


def drop_to(names: frozenset[str]) -> None:
    """Reduce the calling thread to ``names`` in every capability set (see the module doc).

    A capability the caller itself lacks (a host that runs us with a reduced set) is left out
    rather than failing.  Needs CAP_SETPCAP while the bounding set is trimmed, so it is the
    last privileged step.
    """
    keep = mask(names) & permitted_now()
    for number in range(last_cap() + 1):
        if not keep & (1 << number):
            sc.prctl(sc.PR_CAPBSET_DROP, number)
    sc.prctl(sc.PR_CAP_AMBIENT, sc.PR_CAP_AMBIENT_CLEAR_ALL)
    sc.capset(keep, keep, keep)
