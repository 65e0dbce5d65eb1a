"""Bridge, veth pairs and network namespaces, through pyroute2.

Host-side names: the bridge is ``NetConfig.bridge``; a container's host veth end is
``ufv`` + 10 hex digits of its id, and its peer is created as ``ufc`` + the same digits, then
moved into the container's namespace and renamed ``eth0``.  Namespaces are bind-mounted at
``NETNS_DIR/unionfs-<id>`` (by default ``/run/netns``, so ``ip netns`` lists them).

Every function here acts on the calling process's current network namespace unless it takes a
namespace path.  Removal functions ignore things that are already gone.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import logging
import os
from pathlib import Path

from pyroute2 import IPRoute, netns
from pyroute2.netlink.exceptions import NetlinkError

log = logging.getLogger(__name__)

HOST_VETH_PREFIX = "ufv"
PEER_VETH_PREFIX = "ufc"
NETNS_PREFIX = "unionfs-"


def host_veth_name(container_id: str) -> str:
    return HOST_VETH_PREFIX + container_id[:10]


def netns_file(netns_dir: Path, container_id: str) -> Path:
    return netns_dir / (NETNS_PREFIX + container_id)


def write_sysctl(key: str, value: str) -> None:
    """Set ``net.ipv4...``-style ``key`` in the current network namespace, if it differs.

    /proc/sys/net resolves to the namespace of the process that opens it, so this never touches
    another namespace's settings.
    """
    path = Path("/proc/sys") / key.replace(".", "/")
    if path.read_text().strip() != value:
        log.info("sysctl %s=%s", key, value)
        path.write_text(value + "\n")


def _sysctl_key_for(ifname: str, name: str) -> str:
    # Interface names may contain dots; /proc/sys needs them as-is, so build the path directly.
    return f"net/ipv4/conf/{ifname}/{name}"


def ensure_bridge(name: str, gateway: ipaddress.IPv4Address, prefixlen: int) -> None:
    """Create bridge ``name`` holding ``gateway/prefixlen`` and bring it up; idempotent.

    Also enables ``ip_forward`` and the bridge's ``route_localnet`` (needed to DNAT
    host-sourced 127.0.0.1 traffic out of the bridge).
    """
    with IPRoute() as ipr:
        found = ipr.link_lookup(ifname=name)
        if not found:
            log.info("creating bridge %s", name)
            ipr.link("add", ifname=name, kind="bridge")
            found = ipr.link_lookup(ifname=name)
        index = found[0]
        have = {
            (a.get_attr("IFA_ADDRESS"), a["prefixlen"]) for a in ipr.get_addr(index=index, family=2)
        }
        if (str(gateway), prefixlen) not in have:
            ipr.addr("add", index=index, address=str(gateway), prefixlen=prefixlen)
        ipr.link("set", index=index, state="up")
    write_sysctl("net.ipv4.ip_forward", "1")
    path = Path("/proc/sys") / _sysctl_key_for(name, "route_localnet")
    if path.read_text().strip() != "1":
        path.write_text("1\n")


def delete_link(name: str) -> bool:
    """Delete link ``name`` in the current namespace; False if it did not exist."""
    with IPRoute() as ipr:
        found = ipr.link_lookup(ifname=name)
        if not found:
            return False
        try:
            ipr.link("del", index=found[0])
        except NetlinkError as exc:
            if exc.code != errno.ENODEV:
                raise
            return False
    return True


def link_names(prefix: str = "") -> list[str]:
    """Names of links in the current namespace starting with ``prefix``."""
    with IPRoute() as ipr:
        names = [str(link.get_attr("IFLA_IFNAME")) for link in ipr.get_links()]
    return [n for n in names if n.startswith(prefix)]


def bridge_ports(bridge: str) -> list[str]:
    """Names of the links enslaved to ``bridge`` (empty if there is no such bridge)."""
    with IPRoute() as ipr:
        found = ipr.link_lookup(ifname=bridge)
        if not found:
            return []
        return [str(link.get_attr("IFLA_IFNAME")) for link in ipr.get_links(master=found[0])]


def create_netns(path: Path) -> None:
    """Create a network namespace bind-mounted at ``path`` with ``lo`` up."""
    path.parent.mkdir(parents=True, exist_ok=True)
    netns.create(str(path))
    with IPRoute(netns=str(path), flags=0) as ns:
        ns.link("set", index=ns.link_lookup(ifname="lo")[0], state="up")


def remove_netns(path: Path) -> bool:
    """Unmount and unlink the namespace file at ``path``; False if it did not exist."""
    if not path.exists():
        return False
    with contextlib.suppress(OSError):
        netns.remove(str(path))
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    return True


def attach_veth(
    *,
    bridge: str,
    host_name: str,
    peer_name: str,
    netns_path: Path,
    address: str,
    prefixlen: int,
    gateway: str,
    mac: str,
) -> None:
    """Create a veth pair: ``host_name`` on ``bridge`` (hairpin on), the peer as ``eth0``
    with MAC ``mac``, holding ``address/prefixlen`` inside ``netns_path`` with a default route
    via ``gateway``.
    """
    with IPRoute() as ipr:
        bridge_index = ipr.link_lookup(ifname=bridge)[0]
        ipr.link("add", ifname=host_name, kind="veth", peer=peer_name)
        host_index = ipr.link_lookup(ifname=host_name)[0]
        ipr.link("set", index=host_index, master=bridge_index)
        # IFLA_BRPORT_MODE is the hairpin flag: a container may reach itself through the bridge.
        ipr.brport("set", index=host_index, mode=1)
        ipr.link("set", index=host_index, state="up")
        fd = os.open(netns_path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            ipr.link("set", index=ipr.link_lookup(ifname=peer_name)[0], net_ns_fd=fd)
        finally:
            os.close(fd)
    with IPRoute(netns=str(netns_path), flags=0) as ns:
        index = ns.link_lookup(ifname=peer_name)[0]
        ns.link("set", index=index, ifname="eth0", address=mac)
        ns.addr("add", index=index, address=address, prefixlen=prefixlen)
        ns.link("set", index=index, state="up")
        ns.route("add", dst="0.0.0.0/0", gateway=gateway)
