"""Settings of the network helper, read from the environment.

=====================  =====================  ===============================================
variable               default                meaning
=====================  =====================  ===============================================
UNIONFS_RUN_DIR        /run/unionfs           state: lock, container records, leases, logs
UNIONFS_NETNS_DIR      /run/netns             where network namespaces are bind-mounted
UNIONFS_BRIDGE         unionfs0               name of the Linux bridge
UNIONFS_SUBNET         10.203.0.0/24          bridge subnet; the first host address is the gateway
UNIONFS_NFT_TABLE      unionfs                name of the helper's nftables tables (ip, bridge)
=====================  =====================  ===============================================

The default subnet is neither Docker's 172.17.0.0/16 nor Podman's 10.88.0.0/16 so the three
can share a host.
"""

from __future__ import annotations

import ipaddress
import os
import re
from dataclasses import dataclass
from pathlib import Path

from unionfs.errors import UsageError

DEFAULT_RUN_DIR = "/run/unionfs"
DEFAULT_NETNS_DIR = "/run/netns"
DEFAULT_BRIDGE = "unionfs0"
DEFAULT_SUBNET = "10.203.0.0/24"
DEFAULT_NFT_TABLE = "unionfs"

_IFNAME = re.compile(r"^[A-Za-z0-9_.-]{1,15}$")
_TABLE = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,31}$")


@dataclass(frozen=True)
class NetConfig:
    """Where the helper keeps its state and which bridge, subnet and nft table it owns."""

    run_dir: Path
    netns_dir: Path
    bridge: str
    subnet: ipaddress.IPv4Network
    nft_table: str

    @property
    def gateway(self) -> ipaddress.IPv4Address:
        """The bridge's own address: the first host address of the subnet."""
        return self.subnet.network_address + 1

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> NetConfig:
        """Read the settings; raise :class:`UsageError` for a malformed override."""
        env = os.environ if environ is None else environ
        bridge = env.get("UNIONFS_BRIDGE", DEFAULT_BRIDGE)
        if not _IFNAME.match(bridge):
            raise UsageError(f"UNIONFS_BRIDGE={bridge!r} is not a valid interface name")
        table = env.get("UNIONFS_NFT_TABLE", DEFAULT_NFT_TABLE)
        if not _TABLE.match(table):
            raise UsageError(f"UNIONFS_NFT_TABLE={table!r} is not a valid nftables table name")
        raw_subnet = env.get("UNIONFS_SUBNET", DEFAULT_SUBNET)
        try:
            subnet = ipaddress.IPv4Network(raw_subnet, strict=True)
        except ValueError as exc:
            raise UsageError(f"UNIONFS_SUBNET={raw_subnet!r}: {exc}") from None
        if subnet.prefixlen > 29:
            raise UsageError(f"UNIONFS_SUBNET={raw_subnet!r} is too small (at most /29)")
        return cls(
            run_dir=Path(env.get("UNIONFS_RUN_DIR", DEFAULT_RUN_DIR)),
            netns_dir=Path(env.get("UNIONFS_NETNS_DIR", DEFAULT_NETNS_DIR)),
            bridge=bridge,
            subnet=subnet,
            nft_table=table,
        )
