"""Address management for the bridge subnet, persisted in the run directory's lease file.

Callers hold :meth:`unionfs.net.state.RunDir.locked` around :func:`allocate` and :func:`release`,
so two concurrent ``unionfs run`` never get the same address.
"""

from __future__ import annotations

import ipaddress

from unionfs.errors import UnionfsError, UsageError
from unionfs.net.state import RunDir


def allocate(run_dir: RunDir, owner: str, requested: str | None = None) -> str:
    """Lease an address to ``owner``: ``requested`` if given, else the lowest free one.

    The network address, the gateway and the broadcast address are never leased.
    Raises :class:`UsageError` for a requested address outside the subnet or reserved, and
    :class:`UnionfsError` if it is taken or the subnet is full.
    """
    cfg = run_dir.config
    leases = run_dir.read_leases()
    reserved = {cfg.subnet.network_address, cfg.gateway, cfg.subnet.broadcast_address}
    if requested is not None:
        try:
            addr = ipaddress.IPv4Address(requested)
        except ValueError:
            raise UsageError(f"invalid --ip address {requested!r}") from None
        if addr not in cfg.subnet or addr in reserved:
            raise UsageError(f"--ip {addr} is not a usable address of {cfg.subnet}")
        if str(addr) in leases:
            raise UnionfsError(f"address {addr} is already in use by {leases[str(addr)]}")
    else:
        for candidate in cfg.subnet.hosts():
            if candidate not in reserved and str(candidate) not in leases:
                addr = candidate
                break
        else:
            raise UnionfsError(f"no free address left in {cfg.subnet}")
    leases[str(addr)] = owner
    run_dir.write_leases(leases)
    return str(addr)


def release(run_dir: RunDir, owner: str) -> None:
    """Drop every lease held by ``owner``; releasing nothing is not an error."""
    leases = run_dir.read_leases()
    kept = {addr: name for addr, name in leases.items() if name != owner}
    if kept != leases:
        run_dir.write_leases(kept)


def mac_for(ip: str) -> str:
    """The container's MAC address for lease ``ip``: ``02:42`` and the address's four bytes.

    Docker's scheme (locally administered, unicast); deriving it from the lease lets the
    anti-spoofing rules name the MAC without storing it.
    """
    return "02:42:" + ":".join(f"{b:02x}" for b in ipaddress.IPv4Address(ip).packed)
