"""``unionfs run | ps | rm | port | network | net``: argument parsing, nothing else.

``main(argv)`` receives argv starting with the subcommand name and returns the exit status;
bad input raises :class:`UsageError` (exit 2), failures :class:`UnionfsError` (exit 1).
``run`` returns the command's own exit status (125-127 if it could not be started).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from unionfs.cli.args import ArgumentParser
from unionfs.errors import UnionfsError, UsageError
from unionfs.net import lifecycle, links, nft
from unionfs.net.config import NetConfig
from unionfs.net.confinement import Confinement
from unionfs.net.portspec import PortMapping, parse_port_spec
from unionfs.net.state import RunDir, is_alive

log = logging.getLogger(__name__)


def _setup_logging(verbose: bool) -> None:
    root = logging.getLogger()
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("unionfs: %(levelname)s: %(message)s"))
        root.addHandler(handler)
    logging.getLogger("unionfs").setLevel(logging.DEBUG if verbose else logging.WARNING)


def _split_link(value: str) -> tuple[str, str]:
    name, _, alias = value.partition(":")
    if not name or not lifecycle.NAME_RE.match(name):
        raise UsageError(f"invalid --link {value!r} (want NAME[:ALIAS])")
    return name, alias or name


def _split_add_host(value: str) -> tuple[str, str]:
    host, sep, ip = value.partition(":")
    if not sep or not host or not ip:
        raise UsageError(f"invalid --add-host {value!r} (want HOST:IP)")
    if ip != "host-gateway":
        import ipaddress

        try:
            ipaddress.ip_address(ip)
        except ValueError:
            raise UsageError(f"invalid address in --add-host {value!r}") from None
    return host, ip


def _run(argv: list[str], cfg: NetConfig) -> int:
    if "--" in argv:
        split = argv.index("--")
        head, command = argv[:split], argv[split + 1 :]
    else:
        head, command = argv, []
    p = ArgumentParser(prog="unionfs run", add_help=True)
    p.add_argument("--name")
    p.add_argument("--network", "--net", default="bridge")
    p.add_argument("-p", "--publish", action="append", default=[], metavar="SPEC")
    p.add_argument("--link", action="append", default=[])
    p.add_argument("--ip")
    p.add_argument("--hostname")
    p.add_argument("--dns", action="append", default=[])
    p.add_argument("--add-host", action="append", default=[])
    p.add_argument("-e", "--env", action="append", default=[])
    p.add_argument("-d", "--detach", action="store_true")
    p.add_argument("-v", "--verbose", action="store_true")
    p.add_argument("--privileged", action="store_true")
    p.add_argument("--cap-add", action="append", default=[], metavar="CAP")
    p.add_argument("--cap-drop", action="append", default=[], metavar="CAP")
    p.add_argument("--security-opt", action="append", default=[], metavar="OPT")
    p.add_argument("--read-only", action="store_true")
    p.add_argument("--userns", default="host", choices=("host", "private"))
    p.add_argument("rootfs")
    p.add_argument("command", nargs=argparse.REMAINDER)
    args = p.parse_args(head)
    _setup_logging(args.verbose)
    ports: list[PortMapping] = []
    for spec in args.publish:
        ports += parse_port_spec(spec)
    opts = lifecycle.RunOptions(
        rootfs=Path(args.rootfs),
        command=list(args.command) + command,
        name=args.name,
        network=args.network,
        ports=ports,
        links=[_split_link(v) for v in args.link],
        ip=args.ip,
        hostname=args.hostname,
        dns=list(args.dns),
        add_hosts=[_split_add_host(v) for v in args.add_host],
        env=list(args.env),
        detach=args.detach,
        confinement=Confinement.parse(
            privileged=args.privileged,
            cap_add=args.cap_add,
            cap_drop=args.cap_drop,
            security_opts=args.security_opt,
            read_only=args.read_only,
            userns=args.userns,
        ),
    )
    return lifecycle.run(cfg, opts)


def _ps(argv: list[str], cfg: NetConfig) -> int:
    p = ArgumentParser(prog="unionfs ps")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    records = RunDir(cfg).records()
    if args.json:
        print(json.dumps([r.__dict__ for r in records], indent=1))
        return 0
    rows = [("NAME", "ID", "NETWORK", "IP", "PORTS", "STATUS", "COMMAND")]
    for r in records:
        status = r.status if is_alive(r.pid, r.pid_start) or r.status == "creating" else "dead"
        ports = ", ".join(
            f"{m.host_ip}:{m.host_port}->{m.container_port}/{m.proto}" for m in r.port_mappings
        )
        rows.append(
            (r.name, r.id, r.network, r.ip or "-", ports or "-", status, " ".join(r.command))
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)) + "  " + row[-1])
    return 0


def _rm(argv: list[str], cfg: NetConfig) -> int:
    p = ArgumentParser(prog="unionfs rm")
    p.add_argument("-f", "--force", action="store_true", help="accepted for Docker parity")
    p.add_argument("names", nargs="+")
    args = p.parse_args(argv)
    _setup_logging(False)
    failed = []
    for name in args.names:
        try:
            lifecycle.remove(cfg, name)
            print(name)
        except UnionfsError as exc:
            failed.append(str(exc))
    if failed:
        raise UnionfsError("; ".join(failed))
    return 0


def _port(argv: list[str], cfg: NetConfig) -> int:
    p = ArgumentParser(prog="unionfs port")
    p.add_argument("name")
    p.add_argument("port", nargs="?", help="CTR[/proto]")
    args = p.parse_args(argv)
    record = RunDir(cfg).load(args.name)
    if record is None:
        raise UnionfsError(f"no such container: {args.name}")
    mappings = record.port_mappings
    if args.port:
        num, _, proto = args.port.partition("/")
        if not num.isdigit():
            raise UsageError(f"invalid port {args.port!r}")
        mappings = [
            m for m in mappings if m.container_port == int(num) and m.proto == (proto or "tcp")
        ]
        if not mappings:
            raise UnionfsError(f"no public port {args.port} published for {args.name}")
    for m in mappings:
        print(m.describe())
    return 0


def _network(argv: list[str], cfg: NetConfig) -> int:
    p = ArgumentParser(prog="unionfs network")
    sub = p.add_subparsers(dest="action", required=True)
    sub.add_parser("ls")
    inspect = sub.add_parser("inspect")
    inspect.add_argument("names", nargs="*", default=["bridge"])
    args = p.parse_args(argv)
    records = RunDir(cfg).records()
    if args.action == "ls":
        rows = [
            ("NAME", "DRIVER", "INTERFACE", "SUBNET", "CONTAINERS"),
            ("bridge", "bridge", cfg.bridge, str(cfg.subnet)),
            ("host", "host", "-", "-"),
            ("none", "null", "-", "-"),
        ]
        for i, row in enumerate(rows[1:], 1):
            count = sum(1 for r in records if r.network == row[0])
            rows[i] = (*row, str(count))
        for row in rows:
            print("  ".join(c.ljust(12) for c in row).rstrip())
        return 0
    out = []
    for name in args.names:
        if name not in ("bridge", "host", "none"):
            raise UnionfsError(f"no such network: {name}")
        entry: dict[str, object] = {"Name": name, "Driver": {"none": "null"}.get(name, name)}
        members = [r for r in records if r.network == name]
        if name == "bridge":
            entry.update(
                Interface=cfg.bridge,
                Subnet=str(cfg.subnet),
                Gateway=str(cfg.gateway),
                InterfaceExists=cfg.bridge in links.link_names(cfg.bridge),
                NftTable=f"ip {cfg.nft_table}",
            )
        entry["Containers"] = {
            r.name: {"Id": r.id, "IPv4Address": r.ip, "HostVeth": r.veth, "NetNS": r.netns}
            for r in members
        }
        out.append(entry)
    print(json.dumps(out, indent=2))
    return 0


def _net(argv: list[str], cfg: NetConfig) -> int:
    p = ArgumentParser(prog="unionfs net")
    sub = p.add_subparsers(dest="action", required=True)
    sub.add_parser("gc")
    p.parse_args(argv)
    _setup_logging(False)
    for line in lifecycle.gc(cfg):
        print(line)
    for warning in nft.forward_drop_warnings(cfg):
        print(f"warning: {warning}", file=sys.stderr)
    return 0


_COMMANDS = {
    "run": _run,
    "ps": _ps,
    "rm": _rm,
    "port": _port,
    "network": _network,
    "net": _net,
}


def main(argv: list[str]) -> int:
    """Dispatch ``argv`` (starting with the subcommand) and return the exit status."""
    if not argv or argv[0] not in _COMMANDS:
        raise UsageError(f"unknown network command {argv[:1]}")
    cfg = NetConfig.from_env()
    return _COMMANDS[argv[0]](argv[1:], cfg)
