"""Issue 13 item 11: a container cannot send from an address that is not its lease, nor take
over another container's IP and MAC.

Bridge containers run inside the ``sandbox`` namespaces of tests/net; the attacker gets
``--cap-add NET_ADMIN`` so it can change its own addresses (raw sockets, which the default
NET_RAW allows, would put the same frames on the wire).  UDP is sent with busybox ``tftp``
(a read request names the attempt); the source address is chosen by a route's ``src``.
"""

from __future__ import annotations

import json
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from tests.net import conftest as net_fixtures
from tests.net.conftest import GATEWAY, Sandbox
from unionfs.net.ipam import mac_for

pytestmark = pytest.mark.net
sandbox = net_fixtures.sandbox

APPLETS = ("tftp", "arping", "true")
PORT = 6969


def make_rootfs(tmp_path: Path, name: str, page: str) -> Path:
    root = net_fixtures.rootfs.__wrapped__(tmp_path / name)  # type: ignore[attr-defined]
    for applet in APPLETS:
        (root / "bin" / applet).symlink_to("busybox")
    (root / "www" / "index.html").write_text(page)
    return root


def antispoof_comments() -> list[str]:
    out = subprocess.run(
        ["nft", "-j", "list", "table", "bridge", "unionfs"], capture_output=True, text=True
    )
    if out.returncode != 0:
        return []
    items = json.loads(out.stdout)["nftables"]
    return [i["rule"].get("comment", "") for i in items if "rule" in i]


class UdpCollector:
    """Receive datagrams on PORT in the sandbox; answer each with a TFTP error so the
    sender does not wait for its timeout."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("0.0.0.0", PORT))
        self.sock.settimeout(0.2)
        self.got: list[tuple[bytes, str]] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while not self.stop.is_set():
            try:
                data, (src, port) = self.sock.recvfrom(2048)
            except TimeoutError:
                continue
            self.got.append((data, src))
            try:
                self.sock.sendto(b"\x00\x05\x00\x01no\x00", (src, port))
            except OSError:
                pass  # e.g. no route back to a spoofed 192.0.2.99

    def close(self) -> list[tuple[bytes, str]]:
        self.stop.set()
        self.thread.join()
        self.sock.close()
        return self.got


def test_udp_from_foreign_or_peer_address_is_dropped(sandbox: Sandbox, tmp_path: Path) -> None:
    victim_root = make_rootfs(tmp_path, "v", "victim\n")
    sandbox.uf("run", "-d", "--name", "victim", str(victim_root), "--", "sleep", "60")
    victim = sandbox.record("victim")["ip"]
    collector = UdpCollector()
    attacker_root = make_rootfs(tmp_path, "a", "attacker\n")
    script = f"""
        own=$(ip -o -4 addr show dev eth0 | sed 's/.*inet \\([0-9.]*\\).*/\\1/')
        ip addr add 192.0.2.99/32 dev eth0
        ip addr add {victim}/32 dev eth0
        for src in 192.0.2.99 {victim} $own; do
            ip route replace {GATEWAY}/32 dev eth0 src $src
            timeout 1 tftp -g -r from-$src -l /tmp/x {GATEWAY} {PORT}
        done
        echo own=$own
    """
    proc = sandbox.uf(
        "run", "--cap-add", "NET_ADMIN", str(attacker_root), "--", "sh", "-c", script, check=False
    )
    got = collector.close()
    own = proc.stdout.strip().rpartition("own=")[2]
    assert own.startswith("10.203.0."), (proc.stdout, proc.stderr)
    # The legitimate datagram arrives (so the spoofed ones were really sent the same way) ...
    assert f"from-{own}".encode() in b"".join(d for d, _ in got), got
    # ... and nothing arrives from any other source address.
    assert {src for _, src in got} == {own}, got
    sandbox.uf("rm", "victim")
    assert antispoof_comments() == []
    assert sandbox.leftovers() == []


def test_container_cannot_take_over_another_ip_and_mac(sandbox: Sandbox, tmp_path: Path) -> None:
    victim_root = make_rootfs(tmp_path, "v", "victim\n")
    sandbox.uf(
        "run", "-d", "--name", "victim", str(victim_root), "--", "httpd", "-f", "-p", "80",
        "-h", "/www",
    )  # fmt: skip
    victim = sandbox.record("victim")["ip"]
    assert sandbox.wait_http(victim, 80) == "victim\n"
    attacker_root = make_rootfs(tmp_path, "a", "attacker\n")
    vmac = mac_for(victim)
    script = f"""
        ip link set eth0 down
        ip link set eth0 address {vmac}
        ip link set eth0 up
        ip addr add {victim}/24 dev eth0
        arping -U -c 2 -w 1 -I eth0 -s {victim} {victim}
        echo ready
        exec httpd -f -p 80 -h /www
    """
    sandbox.uf(
        "run", "-d", "--name", "attacker", "--cap-add", "NET_ADMIN", str(attacker_root), "--",
        "sh", "-c", script,
    )  # fmt: skip
    log = sandbox.run_dir / "containers" / "attacker.log"
    deadline = time.monotonic() + 10
    while "ready" not in (log.read_text() if log.exists() else ""):
        assert time.monotonic() < deadline, "attacker never got ready"
        time.sleep(0.05)
    for _ in range(3):
        assert sandbox.http_get(victim, 80) == "victim\n"
        time.sleep(0.2)
    assert sorted(set(antispoof_comments())) == ["attacker", "victim"]
    sandbox.uf("rm", "attacker")
    assert set(antispoof_comments()) == {"victim"}
    assert sandbox.http_get(victim, 80) == "victim\n"
    sandbox.uf("rm", "victim")
    sandbox.uf("net", "gc")
    assert antispoof_comments() == []
    assert sandbox.leftovers() == []
