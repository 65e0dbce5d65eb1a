"""What confines a container started by ``unionfs run``, and the last step that applies it.

Docker's defaults unless the command line says otherwise:

========================  ======================  ==========================================
setting                   default                 changed by
========================  ======================  ==========================================
capabilities              Docker's 14 (``caps``)  ``--cap-add``, ``--cap-drop``
seccomp filter            ``seccomp`` module's    ``--security-opt seccomp=unconfined``
no_new_privs              on                      ``--security-opt no-new-privileges=false``
/proc, /sys masks and ro  on (``containerfs``)    ``--privileged``
rootfs                    read-write, nodev       ``--read-only``
user namespace            the host's              ``--userns private``
========================  ======================  ==========================================

``--privileged`` turns off all of it except the private /dev and the user namespace choice.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from unionfs.errors import UnionfsError, UsageError
from unionfs.net import caps, seccomp
from unionfs.net import syscalls as sc

USERNS_MODES = ("host", "private")
USERNS_SIZE = 65536
"""How many ids a private user namespace maps: container ids 0..65535."""
FALLBACK_ID_BASE = 1_000_000_000
"""The first host id mapped when /etc/subuid (or subgid) has no range for root."""


@dataclass(frozen=True)
class IdMapping:
    """Container ids 0..size-1 are host ids ``uid_base``.. and ``gid_base``.. ."""

    uid_base: int
    gid_base: int
    size: int = USERNS_SIZE

    def uid_map(self) -> str:
        return f"0 {self.uid_base} {self.size}\n"

    def gid_map(self) -> str:
        return f"0 {self.gid_base} {self.size}\n"


def subordinate_base(path: Path, size: int = USERNS_SIZE) -> int:
    """The start of root's first range of at least ``size`` ids in ``path`` (/etc/subuid format).

    Falls back to :data:`FALLBACK_ID_BASE` if the file is missing or has no such range for
    ``root`` (or ``0``).  Raises :class:`UnionfsError` for a malformed line about root.
    """
    try:
        text = path.read_text()
    except FileNotFoundError:
        return FALLBACK_ID_BASE
    except OSError as exc:
        raise UnionfsError(f"cannot read {path}: {exc.strerror}") from None
    for line in text.splitlines():
        owner, _, rest = line.strip().partition(":")
        if owner not in ("root", "0"):
            continue
        start, _, count = rest.partition(":")
        if not (start.isdigit() and count.isdigit()):
            raise UnionfsError(f"{path}: malformed line {line.strip()!r}")
        if int(count) >= size and int(start) > 0:
            return int(start)
    return FALLBACK_ID_BASE


def id_mapping() -> IdMapping:
    """The host ids a ``--userns private`` container's ids 0..65535 map to."""
    return IdMapping(subordinate_base(Path("/etc/subuid")), subordinate_base(Path("/etc/subgid")))


@dataclass(frozen=True)
class Confinement:
    """The confinement of one container, fixed once parsed."""

    privileged: bool = False
    capabilities: frozenset[str] = caps.DOCKER_DEFAULT
    seccomp: bool = True
    no_new_privs: bool = True
    read_only: bool = False
    userns: str = "host"
    id_mapping: IdMapping | None = None

    @classmethod
    def parse(
        cls,
        *,
        privileged: bool = False,
        cap_add: list[str] | None = None,
        cap_drop: list[str] | None = None,
        security_opts: list[str] | None = None,
        read_only: bool = False,
        userns: str = "host",
    ) -> Confinement:
        """Build from command-line values; raise :class:`UsageError` for a bad one."""
        capabilities = caps.resolve(cap_add or [], cap_drop or [])
        use_seccomp = True
        no_new_privs = True
        for opt in security_opts or []:
            key, sep, value = opt.partition("=")
            if not sep:
                key, sep, value = opt.partition(":")
            if key == "seccomp" and value == "unconfined":
                use_seccomp = False
            elif key == "seccomp":
                raise UsageError(
                    f"invalid --security-opt {opt!r}: only seccomp=unconfined is supported "
                    "(the default filter is built in)"
                )
            elif key == "no-new-privileges" and value in ("", "true", "false"):
                no_new_privs = value != "false"
            else:
                raise UsageError(
                    f"invalid --security-opt {opt!r} "
                    "(want seccomp=unconfined or no-new-privileges[=true|false])"
                )
        if userns not in USERNS_MODES:
            raise UsageError(f"invalid --userns {userns!r} (host or private)")
        mapping = id_mapping() if userns == "private" else None
        if privileged:
            return cls(True, caps.all_names(), False, False, read_only, userns, mapping)
        if use_seccomp and not seccomp.supported():
            raise UsageError(
                "no default seccomp filter for this architecture: "
                "add --security-opt seccomp=unconfined"
            )
        return cls(False, capabilities, use_seccomp, no_new_privs, read_only, userns, mapping)


def apply(conf: Confinement) -> None:
    """Set no_new_privs, install the seccomp filter and drop capabilities, in that order.

    The filter is installed while CAP_SYS_ADMIN is still held (so it works without
    no_new_privs) and lets through the prctl and capset calls that follow.  Called by the
    container's init as its last step before execve; a privileged container keeps everything.
    """
    if conf.privileged:
        return
    if conf.no_new_privs:
        sc.prctl(sc.PR_SET_NO_NEW_PRIVS, 1)
    if conf.seccomp:
        sc.install_seccomp_filter(seccomp.build(conf.capabilities))
    caps.drop_to(conf.capabilities)
