"""The helper's nftables tables: ``ip`` and ``bridge`` families, both named ``NetConfig.nft_table``.

Both tables are rebuilt from the container records and replaced in one ``nft -j -f -``
transaction (add table, delete table, add table and its chains and rules, for each), so a
reader never sees half a ruleset.  With no bridge container left, both are deleted; adding
before deleting makes the teardown idempotent.

Table ``bridge``, chain ``antispoof`` (filter, bridge prerouting, -300): every frame entering
the bridge from a container's port (its host-side veth) must carry the container's own MAC
(:func:`unionfs.net.ipam.mac_for` of its lease) as Ethernet source, and be either ARP for
IPv4 whose sender MAC and IP are the lease's, or IPv4 from the lease's address; anything else
from that port -- another source address, a foreign MAC, IPv6, VLAN-tagged frames -- is dropped.
So a container cannot send "from" another container or any other address, nor take over
another's IP or MAC (the bridge never learns a MAC on the wrong port).  Docker has no such
rules.

Table ``ip``:

Chains (priorities are the standard named ones):

* ``guard`` (filter, prerouting, raw -300): drop packets from the bridge addressed to
  127.0.0.0/8 -- with ``route_localnet`` on the bridge a container could otherwise reach the
  host's loopback services -- and, for each loopback-published port, packets not from ``lo``.
* ``prerouting`` (nat, dstnat -100): DNAT of published ports bound to a non-loopback address
  (or to every local address when no address was given).
* ``output`` (nat, -100): the same DNAT for host-sourced traffic, plus loopback bindings, which
  are DNATed only here.
* ``postrouting`` (nat, srcnat 100): masquerade of host-sourced 127.0.0.0/8 traffic leaving
  through the bridge, of DNATed traffic from the subnet back into the bridge (hairpin: without
  it a container reaching its own published port would get the reply from itself, not from the
  address it called; ``iifname`` is not known at postrouting, hence the source match), and of
  outbound traffic from the subnet.
* ``forward`` (filter, 0): accept bridge traffic.  A base chain's accept does not override a
  drop in another table's forward chain; :func:`forward_drop_warnings` finds such chains.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
from typing import Any

from unionfs.errors import UnionfsError
from unionfs.net.config import NetConfig
from unionfs.net.ipam import mac_for
from unionfs.net.portspec import ANY_ADDRESS, PortMapping
from unionfs.net.state import Record

log = logging.getLogger(__name__)

Json = dict[str, Any]


def _match(left: Json, right: Any, op: str = "==") -> Json:
    return {"match": {"op": op, "left": left, "right": right}}


def _meta(key: str) -> Json:
    return {"meta": {"key": key}}


def _payload(protocol: str, field: str) -> Json:
    return {"payload": {"protocol": protocol, "field": field}}


def _prefix(addr: str, length: int) -> Json:
    return {"prefix": {"addr": addr, "len": length}}


def _dnat_rule(m: PortMapping, container_ip: str) -> list[Json]:
    if m.host_ip == ANY_ADDRESS:
        dest = _match({"fib": {"result": "type", "flags": ["daddr"]}}, "local")
    else:
        dest = _match(_payload("ip", "daddr"), m.host_ip)
    return [
        dest,
        _match(_payload(m.proto, "dport"), m.host_port),
        {"dnat": {"addr": container_ip, "port": m.container_port}},
    ]


def build_ruleset(config: NetConfig, records: list[Record]) -> list[Json]:
    """The nft JSON commands that replace the table with rules for ``records``.

    Only records in bridge mode with an address contribute; if there is none, the commands
    just delete the table.
    """
    family, table = "ip", config.nft_table
    tref = {"family": family, "name": table}
    bref = {"family": "bridge", "name": table}
    commands: list[Json] = [
        {"add": {"table": tref}},
        {"delete": {"table": tref}},
        {"add": {"table": bref}},
        {"delete": {"table": bref}},
    ]
    bridged = [r for r in records if r.network == "bridge" and r.ip]
    if not bridged:
        return commands
    commands += _antispoof_commands(table, bridged)
    commands.append({"add": {"table": tref}})
    chains = {
        "guard": ("filter", "prerouting", -300),
        "prerouting": ("nat", "prerouting", -100),
        "output": ("nat", "output", -100),
        "postrouting": ("nat", "postrouting", 100),
        "forward": ("filter", "forward", 0),
    }
    for name, (ctype, hook, prio) in chains.items():
        chain: Json = {"family": family, "table": table, "name": name, "type": ctype, "hook": hook}
        chain.update({"prio": prio, "policy": "accept"})
        commands.append({"add": {"chain": chain}})

    def rule(chain: str, expr: list[Json], comment: str | None = None) -> None:
        body: Json = {"family": family, "table": table, "chain": chain, "expr": expr}
        if comment:
            body["comment"] = comment
        commands.append({"add": {"rule": body}})

    br = config.bridge
    subnet = config.subnet
    loopback = _prefix("127.0.0.0", 8)
    rule(
        "guard",
        [_match(_meta("iifname"), br), _match(_payload("ip", "daddr"), loopback)]
        + [{"drop": None}],
    )
    for rec in bridged:
        assert rec.ip is not None
        for m in rec.port_mappings:
            if m.loopback_only:
                rule(
                    "guard",
                    [
                        _match(_meta("iifname"), "lo", "!="),
                        _match(_payload("ip", "daddr"), m.host_ip),
                        _match(_payload(m.proto, "dport"), m.host_port),
                        {"drop": None},
                    ],
                    rec.name,
                )
            else:
                rule("prerouting", _dnat_rule(m, rec.ip), rec.name)
            rule("output", _dnat_rule(m, rec.ip), rec.name)
    rule(
        "postrouting",
        [_match(_meta("oifname"), br), _match(_payload("ip", "saddr"), loopback)]
        + [{"masquerade": None}],
    )
    rule(
        "postrouting",
        [
            _match(_meta("oifname"), br),
            _match(_payload("ip", "saddr"), _prefix(str(subnet.network_address), subnet.prefixlen)),
            _match({"ct": {"key": "status"}}, "dnat", "in"),
            {"masquerade": None},
        ],
    )
    rule(
        "postrouting",
        [
            _match(_payload("ip", "saddr"), _prefix(str(subnet.network_address), subnet.prefixlen)),
            _match(_meta("oifname"), br, "!="),
            {"masquerade": None},
        ],
    )
    rule("forward", [_match(_meta("iifname"), br), {"accept": None}])
    rule("forward", [_match(_meta("oifname"), br), {"accept": None}])
    return commands


def _antispoof_commands(table: str, bridged: list[Record]) -> list[Json]:
    """The bridge table (see the module doc) for the containers in ``bridged``."""
    chain: Json = {"family": "bridge", "table": table, "name": "antispoof"}
    chain.update({"type": "filter", "hook": "prerouting", "prio": -300, "policy": "accept"})
    commands: list[Json] = [
        {"add": {"table": {"family": "bridge", "name": table}}},
        {"add": {"chain": chain}},
    ]

    def rule(expr: list[Json], comment: str) -> None:
        body = {"family": "bridge", "table": table, "chain": "antispoof", "expr": expr}
        commands.append({"add": {"rule": {**body, "comment": comment}}})

    for rec in bridged:
        if rec.veth is None or rec.ip is None:
            continue
        port = _match(_meta("iifname"), rec.veth)
        mac = mac_for(rec.ip)
        rule([port, _match(_payload("ether", "saddr"), mac, "!="), {"drop": None}], rec.name)
        rule(
            [
                port,
                _match(_payload("arp", "htype"), 1),
                _match(_payload("arp", "ptype"), "ip"),
                _match(_payload("arp", "saddr ether"), mac),
                _match(_payload("arp", "saddr ip"), rec.ip),
                {"accept": None},
            ],
            rec.name,
        )
        rule([port, _match(_payload("ip", "saddr"), rec.ip), {"accept": None}], rec.name)
        rule([port, {"drop": None}], rec.name)
    return commands


def _nft(args: list[str], payload: str | None = None) -> str:
    exe = shutil.which("nft")
    if exe is None:
        raise UnionfsError("nft not found: install the nftables package")
    proc = subprocess.run([exe, *args], input=payload, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        first = (proc.stderr.strip().splitlines() or ["failed"])[0]
        raise UnionfsError(f"nft {' '.join(args)}: {first}")
    return proc.stdout


def apply(config: NetConfig, records: list[Record]) -> None:
    """Replace the helper's table with the rules for ``records`` in one transaction."""
    commands = build_ruleset(config, records)
    log.debug("nft transaction: %d commands", len(commands))
    _nft(["-j", "-f", "-"], json.dumps({"nftables": commands}))


def table_exists(config: NetConfig) -> bool:
    """True if the helper's table is present in the current network namespace."""
    out = _nft(["-j", "list", "tables"])
    for item in json.loads(out).get("nftables", []):
        t = item.get("table")
        if t and t.get("family") == "ip" and t.get("name") == config.nft_table:
            return True
    return False


def forward_drop_warnings(config: NetConfig) -> list[str]:
    """One message per other table's forward base chain whose policy is drop."""
    try:
        out = _nft(["-j", "list", "chains"])
    except UnionfsError:
        return []
    messages = []
    for item in json.loads(out).get("nftables", []):
        c = item.get("chain")
        if not c or c.get("hook") != "forward" or c.get("policy") != "drop":
            continue
        if c.get("family") == "ip" and c.get("table") == config.nft_table:
            continue
        messages.append(
            f"nftables chain {c.get('family')} {c.get('table')} {c.get('name')} has policy drop: "
            f"traffic to and from bridge {config.bridge} is dropped there unless it accepts "
            f'iifname "{config.bridge}" and oifname "{config.bridge}"'
        )
    return messages
