"""``/etc/hosts``, ``/etc/resolv.conf`` and ``/etc/hostname`` of a container.

Docker bind-mounts these from its own directory; here they are written into the rootfs, so
when the rootfs is a unionfs mount they are copied up into the upper layer like any other
write.  Content follows Docker: the standard localhost/IPv6 lines, ``--add-host`` entries, one
``IP<TAB>ALIAS NAME`` line per ``--link``, and the container's own address and hostname last.
``resolv.conf`` is the host's with loopback nameservers removed (they mean nothing in another
namespace; Google's public resolvers stand in if none is left, as Docker does), or the
``--dns`` servers.

The rootfs is untrusted (a layer author or a running container controls it), so:

* ``etc`` is opened relative to a descriptor of the rootfs with O_NOFOLLOW|O_DIRECTORY: a
  symlink there is refused, never followed;
* a file is never opened for writing: the new content goes into a fresh temporary file
  (O_CREAT|O_EXCL|O_NOFOLLOW) in ``etc``, which is then renamed over the name.  rename(2)
  replaces a directory entry and never writes into what the name pointed to, so a symlink,
  a device or a FIFO there cannot be written through or block us;
* before anything is written, each name is checked with lstat: a regular file, a symlink or
  nothing is replaced; anything else (device, FIFO, socket, directory) is refused with one
  line, since no image ships one there by accident;
* a read (the host's files, or another container's for ``--network container:NAME``) opens
  with O_NOFOLLOW|O_NONBLOCK, requires a regular file after fstat and reads at most
  :data:`MAX_FILE_SIZE` bytes, so a FIFO cannot hang us while we hold the run lock and
  ``/dev/zero`` cannot make us read forever.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import stat
from dataclasses import dataclass, field
from pathlib import Path

from unionfs.errors import UnionfsError

log = logging.getLogger(__name__)

HOST_RESOLV_CONF = Path("/etc/resolv.conf")
HOST_HOSTS = Path("/etc/hosts")
FALLBACK_DNS = ("8.8.8.8", "8.8.4.4")
MAX_FILE_SIZE = 1 << 20
"""The largest hosts/resolv.conf/hostname we read or write (1 MiB)."""

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
            host_text = read_bounded(None, str(HOST_RESOLV_CONF))
        except (OSError, UnionfsError):
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


def _kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISLNK, "a symlink"),
    ):
        if test(mode):
            return name
    return "not a regular file"


def read_bounded(dir_fd: int | None, name: str, shown: str | None = None) -> str:
    """Read the regular file ``name`` (relative to ``dir_fd``) without following a symlink.

    Opens with O_NOFOLLOW|O_NONBLOCK (a FIFO neither blocks the open nor the read), checks with
    fstat that it is a regular file, and reads at most :data:`MAX_FILE_SIZE` bytes.  Raises
    :class:`UnionfsError` for anything else or anything larger; :class:`OSError` (e.g.
    FileNotFoundError) if it cannot be opened.
    """
    shown = shown or name
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY
    fd = os.open(name, flags, dir_fd=dir_fd)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise UnionfsError(f"{shown} is {_kind(st.st_mode)}, not a regular file: not read")
        chunks = []
        left = MAX_FILE_SIZE + 1
        while left > 0 and (chunk := os.read(fd, min(left, 65536))):
            chunks.append(chunk)
            left -= len(chunk)
    finally:
        os.close(fd)
    data = b"".join(chunks)
    if len(data) > MAX_FILE_SIZE:
        raise UnionfsError(f"{shown} is larger than {MAX_FILE_SIZE} bytes: not read")
    return data.decode(errors="replace")


def host_files() -> tuple[str, str]:
    """The host's own hosts and resolv.conf text, for --network host."""
    texts = []
    for path in (HOST_HOSTS, HOST_RESOLV_CONF):
        try:
            texts.append(read_bounded(None, str(path)))
        except (OSError, UnionfsError) as exc:
            log.warning("ignoring host %s: %s", path, exc)
            texts.append("")
    return texts[0], texts[1]


def _open_etc(rootfs: Path, create: bool) -> int | None:
    """A descriptor of ``rootfs/etc``, never through a symlink; None if absent and not created."""
    try:
        root = os.open(rootfs, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise UnionfsError(f"cannot open rootfs {rootfs}: {exc.strerror}") from None
    try:
        if create:
            with contextlib.suppress(FileExistsError):
                os.mkdir("etc", 0o755, dir_fd=root)
        flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            return os.open("etc", flags, dir_fd=root)
        except FileNotFoundError:
            if create:
                raise UnionfsError(f"{rootfs}/etc vanished while being created") from None
            return None
        except OSError as exc:
            # ELOOP (a symlink) or ENOTDIR: following it could lead out of the rootfs.
            raise UnionfsError(f"{rootfs}/etc is not a directory: {exc.strerror}") from None
    finally:
        os.close(root)


def read_rootfs_file(rootfs: Path, name: str) -> str | None:
    """Read ``/etc/NAME`` of a rootfs safely (see :func:`read_bounded`); None if absent.

    Raises :class:`UnionfsError` if ``etc`` or the file is not what it should be.
    """
    etc = _open_etc(rootfs, create=False)
    if etc is None:
        return None
    try:
        return read_bounded(etc, name, f"{rootfs}/etc/{name}")
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise UnionfsError(f"cannot read {rootfs}/etc/{name}: {exc.strerror}") from None
    finally:
        os.close(etc)


def write_into_rootfs(rootfs: Path, content: EtcContent) -> None:
    """Replace the three files in ``rootfs/etc`` (created if missing), never writing outside it.

    All three names are checked before any is replaced, so a refusal changes nothing.
    """
    files = content.files()
    for name, text in files.items():
        if len(text.encode()) > MAX_FILE_SIZE:
            raise UnionfsError(f"/etc/{name} for the container would exceed {MAX_FILE_SIZE} bytes")
    etc = _open_etc(rootfs, create=True)
    assert etc is not None
    try:
        for name in files:
            try:
                st = os.stat(name, dir_fd=etc, follow_symlinks=False)
            except FileNotFoundError:
                continue
            except OSError as exc:
                raise UnionfsError(f"cannot check {rootfs}/etc/{name}: {exc.strerror}") from None
            if not (stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode)):
                raise UnionfsError(
                    f"{rootfs}/etc/{name} is {_kind(st.st_mode)}, not a regular file: "
                    "refusing to replace it"
                )
        for name, text in files.items():
            _replace_at(etc, name, text.encode(), f"{rootfs}/etc/{name}")
    finally:
        os.close(etc)


def _replace_at(dir_fd: int, name: str, data: bytes, shown: str) -> None:
    """Write ``data`` to a new temporary file in ``dir_fd`` and rename it over ``name``."""
    tmp = f".{name}.unionfs-{secrets.token_hex(4)}"
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(tmp, flags, 0o644, dir_fd=dir_fd)
    except OSError as exc:
        raise UnionfsError(f"cannot write {shown}: {exc.strerror}") from None
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            # The umask may have narrowed 0o644; these files must be world-readable.
            os.fchmod(fd, 0o644)
        finally:
            os.close(fd)
        os.rename(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp, dir_fd=dir_fd)
        raise UnionfsError(f"cannot write {shown}: {exc.strerror}") from None
    log.debug("wrote %s", shown)
