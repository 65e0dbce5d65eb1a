"""``/etc/hosts``, ``/etc/resolv.conf`` and ``/etc/hostname`` of a container.

Docker bind-mounts these from its own directory; here they are written into the rootfs, so
when the rootfs is a unionfs mount they are copied up into the upper layer like any other
write.  Content follows Docker: the standard localhost/IPv6 lines, ``--add-host`` entries, one
``IP<TAB>ALIAS NAME`` line per ``--link``, and the container's own address and hostname last.
``resolv.conf`` is the host's with loopback nameservers removed (they mean nothing in another
namespace; Google's public resolvers stand in if none is left, as Docker does), or the
``--dns`` servers.

The rootfs is untrusted: ``etc`` and each file are opened relative to the rootfs with
O_NOFOLLOW, and a symlink in their place is replaced, so a write never lands outside it.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from unionfs.errors import UnionfsError

log = logging.getLogger(__name__)

HOST_RESOLV_CONF = Path("/etc/resolv.conf")
HOST_HOSTS = Path("/etc/hosts")
FALLBACK_DNS = ("8.8.8.8", "8.8.4.4")

_HOSTS_HEADER = """\
127.0.0.1\tlocalhost
::1\tlocalhost ip6-localhost ip6-loopback
fe00::0\tip6-localnet
ff00::0\tip6-mcastprefix
ff02::1\tip6-allnodes
ff02::2\tip6-allrouters
"""


@dataclass
class EtcContent:
    """The three files' contents for one container."""

    hosts: str
    resolv_conf: str
    hostname: str

    def files(self) -> dict[str, str]:
        return {"hosts": self.hosts, "resolv.conf": self.resolv_conf, "hostname": self.hostname}


@dataclass
class HostsSpec:
    """What goes into a bridge/none container's hosts file."""

    hostname: str
    ip: str | None
    extra_hosts: list[tuple[str, str]] = field(default_factory=list)
    links: list[tuple[str, str, str]] = field(default_factory=list)  # (ip, alias, name)


def hosts_file(spec: HostsSpec) -> str:
    """Docker's layout: header, --add-host lines, link lines, own address last."""
    lines = [_HOSTS_HEADER]
    lines += [f"{ip}\t{host}\n" for host, ip in spec.extra_hosts]
    for ip, alias, name in spec.links:
        names = alias if alias == name else f"{alias} {name}"
        lines.append(f"{ip}\t{names}\n")
    if spec.ip:
        lines.append(f"{spec.ip}\t{spec.hostname}\n")
    return "".join(lines)


def resolv_conf(dns: list[str], host_text: str | None = None) -> str:
    """The container's resolv.conf: ``dns`` servers if given, else the host's filtered."""
    if host_text is None:
        try:
            host_text = HOST_RESOLV_CONF.read_text()
        except OSError:
            host_text = ""
    kept = []
    servers = 0
    for line in host_text.splitlines():
        words = line.split()
        if words and words[0] == "nameserver":
            if dns or len(words) < 2 or words[1].startswith("127.") or words[1] == "::1":
                continue
            servers += 1
        kept.append(line)
    extra = list(dns) if dns else ([] if servers else list(FALLBACK_DNS))
    kept += [f"nameserver {ip}" for ip in extra]
    return "\n".join(kept).strip("\n") + "\n"


def host_files() -> tuple[str, str]:
    """The host's own hosts and resolv.conf text, for --network host."""
    texts = []
    for path in (HOST_HOSTS, HOST_RESOLV_CONF):
        try:
            texts.append(path.read_text())
        except OSError:
            texts.append("")
    return texts[0], texts[1]


def read_rootfs_file(rootfs: Path, name: str) -> str | None:
    """Read ``/etc/NAME`` of a rootfs without following symlinks; None if absent."""
    try:
        etc = os.open(rootfs / "etc", os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError:
        return None
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW, dir_fd=etc)
    except OSError:
        return None
    finally:
        os.close(etc)
    with os.fdopen(fd) as f:
        return f.read()


def write_into_rootfs(rootfs: Path, content: EtcContent) -> None:
    """Write the three files into ``rootfs/etc`` (created if missing), never outside it."""
    try:
        root = os.open(rootfs, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as exc:
        raise UnionfsError(f"cannot open rootfs {rootfs}: {exc.strerror}") from None
    try:
        with contextlib.suppress(FileExistsError):
            os.mkdir("etc", 0o755, dir_fd=root)
        try:
            etc = os.open("etc", os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=root)
        except OSError as exc:
            raise UnionfsError(f"{rootfs}/etc is not a directory: {exc.strerror}") from None
        try:
            for name, text in content.files().items():
                _write_at(etc, name, text, f"{rootfs}/etc/{name}")
        finally:
            os.close(etc)
    finally:
        os.close(root)


def _write_at(dir_fd: int, name: str, text: str, shown: str) -> None:
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(name, flags, 0o644, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno != errno.ELOOP:
            raise UnionfsError(f"cannot write {shown}: {exc.strerror}") from None
        # A symlink (often to /run/...) would lead out of the rootfs: replace it by a file.
        os.unlink(name, dir_fd=dir_fd)
        fd = os.open(name, flags, 0o644, dir_fd=dir_fd)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    log.debug("wrote %s", shown)
