"""Creating, running, removing and garbage-collecting containers.

Every change to shared state (records, leases, links, namespaces, the nft table) happens while
holding the run directory's lock, and every step of a creation is recorded first, so that
:func:`teardown` -- used on normal exit, on ``rm``, on failed starts and by ``gc`` -- can undo
whatever exists, in any order of failure, and is idempotent.

Containers are always removed when their command exits (Docker's ``--rm``): the process that
started them (the *supervisor*: ``unionfs run`` itself, or its detached child with ``-d``)
waits for the command and tears everything down.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import logging
import os
import re
import secrets
import signal
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

from unionfs.errors import UnionfsError, UsageError
from unionfs.net import etcfiles, ipam, links, nft, process
from unionfs.net.config import NetConfig
from unionfs.net.confinement import Confinement
from unionfs.net.portspec import ANY_ADDRESS, PortMapping
from unionfs.net.state import Record, RunDir, is_alive, process_start_time

log = logging.getLogger(__name__)

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
HOSTNAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.-]{0,62}$")
STOP_TIMEOUT = 10.0


@dataclass
class RunOptions:
    """The parsed ``unionfs run`` command line."""

    rootfs: Path
    command: list[str]
    name: str | None = None
    network: str = "bridge"
    ports: list[PortMapping] = field(default_factory=list)
    links: list[tuple[str, str]] = field(default_factory=list)  # (name, alias)
    ip: str | None = None
    hostname: str | None = None
    dns: list[str] = field(default_factory=list)
    add_hosts: list[tuple[str, str]] = field(default_factory=list)  # (host, ip)
    env: list[str] = field(default_factory=list)
    detach: bool = False
    confinement: Confinement = field(default_factory=Confinement)


def validate(opts: RunOptions) -> None:
    """Reject combinations Docker rejects; raise :class:`UsageError`."""
    mode = opts.network
    if mode not in ("bridge", "host", "none") and not mode.startswith("container:"):
        raise UsageError(f"invalid --network {mode!r} (bridge, host, none or container:NAME)")
    if mode.startswith("container:"):
        if not mode.partition(":")[2]:
            raise UsageError("--network container: needs a container name")
        for flag, given in (
            ("-p", opts.ports),
            ("--link", opts.links),
            ("--dns", opts.dns),
            ("--hostname", opts.hostname),
            ("--add-host", opts.add_hosts),
            ("--ip", opts.ip),
        ):
            if given:
                raise UsageError(f"conflicting options: {flag} and --network {mode}")
    if mode in ("none", "host"):
        for flag, given in (("--link", opts.links), ("--ip", opts.ip)):
            if given:
                raise UsageError(f"conflicting options: {flag} and --network {mode}")
    if mode == "none" and opts.ports:
        raise UsageError("conflicting options: -p and --network none")
    if opts.name is not None and not NAME_RE.match(opts.name):
        raise UsageError(f"invalid container name {opts.name!r} (want [A-Za-z0-9][A-Za-z0-9_.-]*)")
    if opts.hostname is not None and not HOSTNAME_RE.match(opts.hostname):
        raise UsageError(f"invalid hostname {opts.hostname!r}")
    for ip in opts.dns:
        try:
            ipaddress.ip_address(ip)
        except ValueError:
            raise UsageError(f"invalid --dns address {ip!r}") from None
    if not opts.command:
        raise UsageError("no command given (unionfs run [OPTIONS] ROOTFS -- CMD...)")


def build_env(opts: RunOptions, hostname: str) -> dict[str, str]:
    """The container's environment: Docker's defaults, then ``-e`` (``-e VAR`` copies ours)."""
    env = {"PATH": process.DEFAULT_PATH, "HOSTNAME": hostname, "HOME": "/root"}
    for item in opts.env:
        key, sep, value = item.partition("=")
        if not key:
            raise UsageError(f"invalid -e {item!r} (want VAR=VALUE)")
        if sep:
            env[key] = value
        elif key in os.environ:
            env[key] = os.environ[key]
    return env


def _overlaps(a: PortMapping, b: PortMapping) -> bool:
    if a.proto != b.proto or a.host_port != b.host_port:
        return False
    return a.host_ip == b.host_ip or ANY_ADDRESS in (a.host_ip, b.host_ip)


def reserve_ports(
    mappings: list[PortMapping], records: list[Record]
) -> tuple[list[PortMapping], list[socket.socket]]:
    """Check and hold every host port: bind (not listen) a socket on each.

    A port 0 becomes the port the kernel picked.  The sockets keep other programs from taking
    the ports while the container runs; DNAT happens before socket lookup, so they never see a
    packet.  Raises :class:`UnionfsError` naming the first port that is taken.
    """
    held: list[socket.socket] = []
    resolved: list[PortMapping] = []
    try:
        for m in mappings:
            shown = f"{m.host_ip}:{m.host_port}/{m.proto}"
            for rec in records:
                if any(_overlaps(m, other) for other in rec.port_mappings):
                    raise UnionfsError(f"host port {shown} is already published by {rec.name}")
            if m.host_port and any(_overlaps(m, r) for r in resolved):
                raise UnionfsError(f"host port {shown} is published twice")
            kind = socket.SOCK_STREAM if m.proto == "tcp" else socket.SOCK_DGRAM
            sock = socket.socket(socket.AF_INET, kind)
            held.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((m.host_ip, m.host_port))
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    raise UnionfsError(f"host port {shown} is already in use") from None
                if exc.errno == errno.EADDRNOTAVAIL:
                    raise UnionfsError(f"{m.host_ip} is not an address of this host") from None
                raise UnionfsError(f"cannot bind host port {shown}: {exc.strerror}") from None
            resolved.append(
                PortMapping(m.host_ip, sock.getsockname()[1], m.container_port, m.proto)
            )
    except BaseException:
        for sock in held:
            sock.close()
        raise
    return resolved, held


@dataclass
class Created:
    """A container whose network and files exist but whose command has not started."""

    record: Record
    launch: process.LaunchSpec
    port_sockets: list[socket.socket]


def _hosts_for(
    cfg: NetConfig, rundir: RunDir, opts: RunOptions, hostname: str, ip: str | None
) -> etcfiles.EtcContent:
    mode = opts.network
    if mode == "host":
        hosts, resolv = etcfiles.host_files()
        if opts.dns:
            resolv = etcfiles.resolv_conf(opts.dns, resolv)
        extra = "".join(f"{addr}\t{host}\n" for host, addr in opts.add_hosts)
        return etcfiles.EtcContent(hosts + extra, resolv, hostname + "\n")
    link_lines = []
    for target_name, alias in opts.links:
        target = rundir.load(target_name)
        assert target is not None and target.ip is not None
        link_lines.append((target.ip, alias, target.name))
    extra_hosts = [(h, str(cfg.gateway) if a == "host-gateway" else a) for h, a in opts.add_hosts]
    spec = etcfiles.HostsSpec(hostname=hostname, ip=ip, extra_hosts=extra_hosts, links=link_lines)
    return etcfiles.EtcContent(
        etcfiles.hosts_file(spec), etcfiles.resolv_conf(opts.dns), hostname + "\n"
    )


def create(cfg: NetConfig, opts: RunOptions) -> Created:
    """Make the container's network and /etc files; on any failure undo all of it and raise.

    Every check that can fail on user input (name taken, unknown container, port taken,
    address taken) happens before anything is created.
    """
    validate(opts)
    rootfs = process.check_rootfs(opts.rootfs)
    rundir = RunDir(cfg)
    cid = secrets.token_hex(6)
    name = opts.name or cid
    with rundir.locked():
        records = rundir.records()
        if any(r.name == name for r in records):
            raise UnionfsError(f"container name {name!r} is already in use")
        joined: Record | None = None
        if opts.network.startswith("container:"):
            target_name = opts.network.partition(":")[2]
            joined = rundir.load(target_name)
            if joined is None or not is_alive(joined.pid, joined.pid_start):
                raise UnionfsError(f"no such running container: {target_name}")
        for target_name, _alias in opts.links:
            target = rundir.load(target_name)
            if target is None:
                raise UnionfsError(f"cannot link to {target_name}: no such container")
            if target.network != "bridge" or target.ip is None:
                raise UnionfsError(f"cannot link to {target_name}: not on the bridge network")
        ports: list[PortMapping] = []
        sockets: list[socket.socket] = []
        if opts.network == "host" and opts.ports:
            log.warning("published ports are discarded when using host network mode")
        elif opts.network == "bridge":
            ports, sockets = reserve_ports(opts.ports, records)
        if joined is not None:
            hostname = joined.hostname
        elif opts.network == "host":
            hostname = opts.hostname or socket.gethostname()
        else:
            hostname = opts.hostname or cid
        record = Record(
            name=name,
            id=cid,
            network=opts.network,
            rootfs=str(rootfs),
            command=list(opts.command),
            hostname=hostname,
            ports=[p.to_json() for p in ports],
            links=[f"{n}:{a}" for n, a in opts.links],
            supervisor=os.getpid(),
            supervisor_start=process_start_time(os.getpid()),
            detached=opts.detach,
            created=time.time(),
        )
        try:
            rundir.save(record)
            if opts.network == "bridge":
                record.ip = ipam.allocate(rundir, name, opts.ip)
                record.bridge = cfg.bridge
                record.veth = links.host_veth_name(cid)
            if opts.network in ("bridge", "none"):
                record.netns = str(links.netns_file(cfg.netns_dir, cid))
                record.netns_path = record.netns
            elif joined is not None:
                record.netns_path = joined.netns_path
            rundir.save(record)
            _build_network(cfg, record)
            if joined is not None:
                joined_root = Path(joined.rootfs)
                content = etcfiles.EtcContent(
                    etcfiles.read_rootfs_file(joined_root, "hosts") or "",
                    etcfiles.read_rootfs_file(joined_root, "resolv.conf") or "",
                    hostname + "\n",
                )
            else:
                content = _hosts_for(cfg, rundir, opts, hostname, record.ip)
            etcfiles.write_into_rootfs(rootfs, content)
            for warning in nft.forward_drop_warnings(cfg) if record.ip else []:
                log.warning("%s", warning)
        except BaseException:
            for sock in sockets:
                sock.close()
            teardown(cfg, rundir, record)
            raise
    spec = process.LaunchSpec(
        rootfs=rootfs,
        command=list(opts.command),
        env=build_env(opts, hostname),
        hostname=hostname,
        netns_path=record.netns_path,
        confinement=opts.confinement,
    )
    return Created(record, spec, sockets)


def _build_network(cfg: NetConfig, record: Record) -> None:
    """Create the namespace, bridge, veth and rules the record describes (lock held)."""
    if record.netns is not None:
        links.create_netns(Path(record.netns))
    if record.network != "bridge":
        return
    assert record.ip is not None and record.veth is not None and record.netns is not None
    links.ensure_bridge(cfg.bridge, cfg.gateway, cfg.subnet.prefixlen)
    links.attach_veth(
        bridge=cfg.bridge,
        host_name=record.veth,
        peer_name=links.PEER_VETH_PREFIX + record.id[:10],
        netns_path=Path(record.netns),
        address=record.ip,
        prefixlen=cfg.subnet.prefixlen,
        gateway=str(cfg.gateway),
        mac=ipam.mac_for(record.ip),
    )
    nft.apply(cfg, RunDir(cfg).records())


def _kill_and_wait(pid: int | None, start: int | None, timeout: float = STOP_TIMEOUT) -> None:
    if not is_alive(pid, start):
        return
    assert pid is not None
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + timeout
    while is_alive(pid, start) and time.monotonic() < deadline:
        time.sleep(0.02)


def teardown(cfg: NetConfig, rundir: RunDir, record: Record) -> list[str]:
    """Remove everything ``record`` names; the caller holds the lock.  Idempotent.

    Kills the container's init if it still runs.  Each step runs even if an earlier one
    failed; failures are logged and returned as messages.
    """
    problems: list[str] = []

    def step(what: str, fn, *args) -> None:  # type: ignore[no-untyped-def]
        try:
            fn(*args)
        except Exception as exc:  # noqa: BLE001 - keep going, report at the end
            log.warning("cleanup of %s: %s: %s", record.name, what, exc)
            problems.append(f"{what}: {exc}")

    step("stop", _kill_and_wait, record.pid, record.pid_start)
    if record.veth:
        step("delete veth", links.delete_link, record.veth)
    if record.netns:
        step("remove netns", links.remove_netns, Path(record.netns))
    step("release address", ipam.release, rundir, record.name)
    step("delete record", rundir.delete, record.name)
    step("reconcile", reconcile_shared, cfg, rundir)
    return problems


def reconcile_shared(cfg: NetConfig, rundir: RunDir) -> None:
    """Make the nft table match the records; drop the bridge when no container uses it."""
    records = rundir.records()
    nft.apply(cfg, records)
    if not any(r.network == "bridge" for r in records) and links.delete_link(cfg.bridge):
        log.info("removed bridge %s", cfg.bridge)


def _mark_running(cfg: NetConfig, record: Record, launched: process.Launched) -> None:
    rundir = RunDir(cfg)
    with rundir.locked():
        record.pid = launched.init
        record.pid_start = process_start_time(launched.init)
        record.supervisor = os.getpid()
        record.supervisor_start = process_start_time(os.getpid())
        record.status = "running"
        rundir.save(record)


def _wait_shim(shim: int, init: int) -> int:
    """Wait for the shim, forwarding SIGINT/SIGTERM/SIGHUP to init; a second one kills it."""
    received: list[int] = []

    def forward(signum: int, _frame: object) -> None:
        received.append(signum)
        with contextlib.suppress(ProcessLookupError):
            os.kill(init, signum if len(received) == 1 else signal.SIGKILL)

    old = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        _, status = os.waitpid(shim, 0)
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
    return os.waitstatus_to_exitcode(status)


def run(cfg: NetConfig, opts: RunOptions) -> int:
    """``unionfs run``: the command's exit status in the foreground; 0 once started with -d."""
    created = create(cfg, opts)
    if opts.detach:
        return _run_detached(cfg, created)
    rundir = RunDir(cfg)
    try:
        launched = process.launch(created.launch)
        _mark_running(cfg, created.record, launched)
        code = _wait_shim(launched.shim, launched.init)
        return 128 - code if code < 0 else code
    finally:
        for sock in created.port_sockets:
            sock.close()
        with rundir.locked():
            current = rundir.load(created.record.name) or created.record
            teardown(cfg, rundir, current)


def _run_detached(cfg: NetConfig, created: Created) -> int:
    """Fork a supervisor in its own session that starts, waits for and removes the container."""
    rundir = RunDir(cfg)
    log_path = rundir.log_path(created.record.name)
    ready_r, ready_w = os.pipe2(os.O_CLOEXEC)
    supervisor = os.fork()
    if supervisor == 0:
        os.close(ready_r)
        _supervise(cfg, created, log_path, ready_w)
    os.close(ready_w)
    with os.fdopen(ready_r, "rb") as f:
        message = f.readline().decode(errors="replace").strip()
    for sock in created.port_sockets:
        sock.close()
    if message.startswith("ok"):
        print(created.record.name, flush=True)
        return 0
    os.waitpid(supervisor, 0)
    code, _, text = message.partition(" ")
    raise process.StartError(
        text or "container supervisor failed", int(code) if code.isdigit() else 125
    )


def _supervise(cfg: NetConfig, created: Created, log_path: Path, ready_w: int) -> None:
    """Body of the detached supervisor; never returns."""
    rundir = RunDir(cfg)
    status = 0
    try:
        os.setsid()
        null = os.open(os.devnull, os.O_RDONLY)
        out = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        os.dup2(null, 0)
        os.dup2(out, 1)
        os.dup2(out, 2)
        os.close(null)
        os.close(out)
        try:
            launched = process.launch(created.launch)
            _mark_running(cfg, created.record, launched)
        except process.StartError as exc:
            os.write(ready_w, f"{exc.exit_code} {exc}\n".encode())
            raise
        except BaseException as exc:
            os.write(ready_w, f"125 {exc}\n".encode())
            raise
        os.write(ready_w, b"ok\n")
        os.close(ready_w)
        for s in (signal.SIGINT, signal.SIGHUP):
            signal.signal(s, signal.SIG_IGN)
        _wait_shim(launched.shim, launched.init)
    except BaseException as exc:  # noqa: BLE001 - forked child: log and clean up
        log.error("supervisor of %s: %s", created.record.name, exc)
        status = 1
    finally:
        try:
            with rundir.locked():
                current = rundir.load(created.record.name) or created.record
                teardown(cfg, rundir, current)
        finally:
            os._exit(status)


def remove(cfg: NetConfig, name: str) -> None:
    """``unionfs rm NAME``: kill the container, wait for its supervisor, make sure all is gone."""
    rundir = RunDir(cfg)
    with rundir.locked():
        record = rundir.load(name)
    if record is None:
        raise UnionfsError(f"no such container: {name}")
    _kill_and_wait(record.pid, record.pid_start)
    # The supervisor tears down under the lock; wait for it rather than race it.
    deadline = time.monotonic() + STOP_TIMEOUT
    while is_alive(record.supervisor, record.supervisor_start) and time.monotonic() < deadline:
        time.sleep(0.02)
    with rundir.locked():
        current = rundir.load(name)
        if current is not None:
            if is_alive(current.supervisor, current.supervisor_start) and current.pid is None:
                raise UnionfsError(f"container {name} is still being created")
            teardown(cfg, rundir, current)


def gc(cfg: NetConfig) -> list[str]:
    """``unionfs net gc``: remove what crashed supervisors left behind; return what was done.

    A record is stale when its supervisor is gone.  Namespaces, veths and leases that no
    record names are removed too, then the nft table and bridge are reconciled.
    """
    rundir = RunDir(cfg)
    done: list[str] = []
    with rundir.locked():
        for record in rundir.records():
            if not is_alive(record.supervisor, record.supervisor_start):
                teardown(cfg, rundir, record)
                done.append(f"removed stale container {record.name}")
        records = rundir.records()
        owned_netns = {r.netns for r in records if r.netns}
        if cfg.netns_dir.is_dir():
            for path in cfg.netns_dir.glob(links.NETNS_PREFIX + "*"):
                if str(path) not in owned_netns and links.remove_netns(path):
                    done.append(f"removed namespace {path}")
        owned_veths = {r.veth for r in records if r.veth}
        for veth in links.link_names(links.HOST_VETH_PREFIX):
            if veth not in owned_veths and links.delete_link(veth):
                done.append(f"removed veth {veth}")
        names = {r.name for r in records}
        leases = rundir.read_leases()
        kept = {ip: owner for ip, owner in leases.items() if owner in names}
        for ip, owner in leases.items():
            if ip not in kept:
                done.append(f"released lease {ip} of {owner}")
        rundir.write_leases(kept)
        had_table = nft.table_exists(cfg)
        reconcile_shared(cfg, rundir)
        if had_table and not nft.table_exists(cfg):
            done.append(f"removed nft table ip {cfg.nft_table}")
    return done
