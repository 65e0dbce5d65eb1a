"""Parsing of published ports: ``-p [IP:][HOST:]CTR[/tcp|udp]``.

``HOST`` and ``CTR`` may be ranges (``8000-8009``) of the same length; a range expands to one
mapping per port.  An empty ``HOST`` (``-p 80`` or ``-p 127.0.0.1::80``) asks for a free host port,
chosen when the port is reserved (see :func:`unionfs.net.lifecycle.reserve_ports`).  Only IPv4
host addresses are accepted.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from unionfs.errors import UsageError

MAX_RANGE = 1024
ANY_ADDRESS = "0.0.0.0"


@dataclass(frozen=True)
class PortMapping:
    """One published port. ``host_port`` 0 means "pick a free one"."""

    host_ip: str
    host_port: int
    container_port: int
    proto: str

    @property
    def loopback_only(self) -> bool:
        """True when the binding is on 127.0.0.0/8: reachable only from the host itself."""
        return ipaddress.IPv4Address(self.host_ip).is_loopback

    def describe(self) -> str:
        """``80/tcp -> 127.0.0.1:10080``, the format of ``docker port``."""
        return f"{self.container_port}/{self.proto} -> {self.host_ip}:{self.host_port}"

    def to_json(self) -> dict[str, object]:
        return {
            "host_ip": self.host_ip,
            "host_port": self.host_port,
            "container_port": self.container_port,
            "proto": self.proto,
        }

    @classmethod
    def from_json(cls, data: dict[str, object]) -> PortMapping:
        return cls(
            host_ip=str(data["host_ip"]),
            host_port=int(str(data["host_port"])),
            container_port=int(str(data["container_port"])),
            proto=str(data["proto"]),
        )


def _port_range(text: str, spec: str) -> tuple[int, int]:
    first, sep, last = text.partition("-")
    try:
        lo = int(first, 10)
        hi = int(last, 10) if sep else lo
    except ValueError:
        raise UsageError(f"invalid port {text!r} in -p {spec!r}") from None
    if not (1 <= lo <= 65535 and 1 <= hi <= 65535):
        raise UsageError(f"port {text!r} out of range 1-65535 in -p {spec!r}")
    if hi < lo:
        raise UsageError(f"empty port range {text!r} in -p {spec!r}")
    if hi - lo + 1 > MAX_RANGE:
        raise UsageError(f"port range {text!r} longer than {MAX_RANGE} in -p {spec!r}")
    return lo, hi


def parse_port_spec(spec: str) -> list[PortMapping]:
    """Expand one ``-p`` argument into mappings; raise :class:`UsageError` if malformed."""
    body, slash, proto = spec.partition("/")
    proto = proto.lower() if slash else "tcp"
    if proto not in ("tcp", "udp"):
        raise UsageError(f"invalid protocol {proto!r} in -p {spec!r} (tcp or udp)")
    if body.startswith("["):
        raise UsageError(f"IPv6 host addresses are not supported: -p {spec!r}")
    parts = body.split(":")
    if len(parts) == 1:
        host_ip, host, ctr = ANY_ADDRESS, "", parts[0]
    elif len(parts) == 2:
        host_ip, host, ctr = ANY_ADDRESS, parts[0], parts[1]
    elif len(parts) == 3:
        host_ip, host, ctr = parts[0] or ANY_ADDRESS, parts[1], parts[2]
    else:
        raise UsageError(f"invalid port spec -p {spec!r} (want [IP:][HOST:]CTR[/proto])")
    try:
        host_ip = str(ipaddress.IPv4Address(host_ip))
    except ValueError:
        raise UsageError(f"invalid host address {host_ip!r} in -p {spec!r}") from None
    if not ctr:
        raise UsageError(f"missing container port in -p {spec!r}")
    c_lo, c_hi = _port_range(ctr, spec)
    if not host:
        if c_lo != c_hi:
            raise UsageError(f"a container port range needs a host port range: -p {spec!r}")
        return [PortMapping(host_ip, 0, c_lo, proto)]
    h_lo, h_hi = _port_range(host, spec)
    if h_hi - h_lo != c_hi - c_lo:
        raise UsageError(f"host and container port ranges differ in length: -p {spec!r}")
    return [PortMapping(host_ip, h_lo + i, c_lo + i, proto) for i in range(c_hi - c_lo + 1)]
