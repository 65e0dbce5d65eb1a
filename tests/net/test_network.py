"""End-to-end tests of ``unionfs run``; each runs in its own throwaway namespaces (``sandbox``).

Addresses used: the helper's bridge subnet 10.203.0.0/24, and 192.0.2.0/24 (TEST-NET-1) for a
veth into an "outside" namespace the test creates.  Nothing else is contacted.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.net

GW = "10.203.0.1"


def start_web(box, rootfs: Path, name: str, *publish: str) -> dict:
    args = ["run", "-d", "--name", name]
    for p in publish:
        args += ["-p", p]
    out = box.uf(*args, str(rootfs), "--", "httpd", "-f", "-p", "80", "-h", "/www").stdout
    assert out.strip() == name
    return box.record(name)


def test_none_has_only_lo_and_passes_stdio_and_status(sandbox, rootfs: Path) -> None:
    script = "ip -o link | cut -d: -f2; cat; echo pid=$$; hostname; exit 3"
    proc = sandbox.uf(
        "run",
        "--network",
        "none",
        "--hostname",
        "boxy",
        str(rootfs),
        "--",
        "sh",
        "-c",
        script,
        check=False,
        stdin="from stdin\n",
    )
    assert proc.returncode == 3, proc.stderr
    lines = [x.strip() for x in proc.stdout.splitlines()]
    assert lines == ["lo", "from stdin", "pid=1", "boxy"]
    assert (rootfs / "etc" / "hostname").read_text() == "boxy\n"
    assert sandbox.leftovers() == []


def test_two_containers_reach_each_other(sandbox, rootfs: Path) -> None:
    web = start_web(sandbox, rootfs, "web")
    proc = sandbox.uf("run", str(rootfs), "--", "wget", "-qO-", f"http://{web['ip']}/")
    assert proc.stdout == "hello from the container\n"
    sandbox.uf("rm", "web")
    assert sandbox.leftovers() == []


def test_published_ports_from_host(sandbox, rootfs: Path) -> None:
    start_web(sandbox, rootfs, "web", "127.0.0.1:10080:80", "8080:80")
    assert sandbox.uf("port", "web").stdout.splitlines() == [
        "80/tcp -> 127.0.0.1:10080",
        "80/tcp -> 0.0.0.0:8080",
    ]
    assert sandbox.wait_http("127.0.0.1", 10080) == "hello from the container\n"
    assert sandbox.http_get(GW, 8080) == "hello from the container\n"
    assert sandbox.http_get("127.0.0.1", 8080) == "hello from the container\n"
    # Bound to loopback only: not through the bridge address.
    assert sandbox.connect_fails(GW, 10080)
    # A published port is taken while the container runs.
    clash = sandbox.uf("run", "-p", "127.0.0.1:10080:81", str(rootfs), "--", "true", check=False)
    assert clash.returncode == 1 and "already published by web" in clash.stderr
    sandbox.uf("rm", "web")
    assert sandbox.leftovers() == []
    assert sandbox.connect_fails("127.0.0.1", 10080)


def test_container_reaches_its_own_published_port(sandbox, rootfs: Path) -> None:
    # Not "exec timeout ...": busybox timeout execs the command, which as PID 1 would ignore
    # the SIGTERM meant to end it.
    script = f"httpd -p 80 -h /www && timeout 5 wget -qO- http://{GW}:8082/; exit $?"
    proc = sandbox.uf("run", "-p", "8082:80", str(rootfs), "--", "sh", "-c", script)
    assert proc.stdout == "hello from the container\n"
    assert sandbox.leftovers() == []


@pytest.fixture
def outside(sandbox):
    """A namespace "outside" behind a veth: host 192.0.2.1, outside 192.0.2.2.

    A Python server there answers each connection with the peer address it saw.
    """
    ns = "/run/netns/outside"
    cmds = [
        ["ip", "netns", "add", "outside"],
        ["ip", "link", "add", "tvh", "type", "veth", "peer", "name", "tvo", "netns", "outside"],
        ["ip", "addr", "add", "192.0.2.1/24", "dev", "tvh"],
        ["ip", "link", "set", "tvh", "up"],
        ["ip", "-n", "outside", "addr", "add", "192.0.2.2/24", "dev", "tvo"],
        ["ip", "-n", "outside", "link", "set", "tvo", "up"],
        ["ip", "-n", "outside", "link", "set", "lo", "up"],
    ]
    for cmd in cmds:
        subprocess.run(cmd, check=True)
    server = (
        "import socket\n"
        "s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
        "s.bind(('192.0.2.2', 8000)); s.listen(8); print('ready', flush=True)\n"
        "while True:\n"
        "    c, (ip, _) = s.accept(); c.recv(4096)\n"
        "    c.sendall(b'HTTP/1.0 200 OK\\r\\n\\r\\n' + ip.encode() + b'\\n'); c.close()\n"
    )
    proc = subprocess.Popen(
        ["nsenter", f"--net={ns}", sys.executable, "-c", server], stdout=subprocess.PIPE
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"
        yield ns
    finally:
        proc.kill()
        proc.wait()
        subprocess.run(["ip", "netns", "del", "outside"], check=False)


def test_outbound_traffic_is_masqueraded(sandbox, outside, rootfs: Path) -> None:
    script = "timeout 5 wget -qO- http://192.0.2.2:8000/; exit $?"
    proc = sandbox.uf("run", str(rootfs), "--", "sh", "-c", script)
    assert proc.stdout == "192.0.2.1\n"


def test_loopback_published_port_not_reachable_from_outside(
    sandbox, outside: str, rootfs: Path
) -> None:
    start_web(sandbox, rootfs, "web", "127.0.0.1:10080:80", "8080:80")
    assert sandbox.wait_http("127.0.0.1", 10080) == "hello from the container\n"
    probe = (
        "import socket, sys\n"
        "def get(port):\n"
        "    try:\n"
        "        c = socket.create_connection(('192.0.2.1', port), timeout=1)\n"
        "    except OSError:\n"
        "        return 'fail'\n"
        "    c.sendall(b'GET / HTTP/1.0\\r\\n\\r\\n')\n"
        "    return c.recv(4096).split(b' ')[1].decode()\n"
        "print(get(10080), get(8080))\n"
    )
    out = subprocess.run(
        ["nsenter", f"--net={outside}", sys.executable, "-c", probe],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    # The all-addresses binding is reachable from outside (the test can fail), the
    # loopback one is not.
    assert out == ["fail", "200"]


def test_container_mode_shares_localhost_and_hosts(sandbox, rootfs: Path, tmp_path: Path) -> None:
    start_web(sandbox, rootfs, "web")
    other = tmp_path / "other"
    subprocess.run(["cp", "-a", str(rootfs), str(other)], check=True)
    (other / "etc" / "hosts").unlink()
    script = "timeout 5 wget -qO- http://127.0.0.1/ && cat /etc/hosts && hostname; exit $?"
    proc = sandbox.uf("run", "--network", "container:web", str(other), "--", "sh", "-c", script)
    web = sandbox.record("web")
    hosts = (rootfs / "etc" / "hosts").read_text()
    assert proc.stdout == "hello from the container\n" + hosts + web["hostname"] + "\n"
    assert (other / "etc" / "hosts").read_text() == hosts
    assert web["ip"] in hosts


def test_link_resolves_by_name(sandbox, rootfs: Path) -> None:
    start_web(sandbox, rootfs, "web")
    proc = sandbox.uf(
        "run",
        "--link",
        "web:db",
        "--add-host",
        "gw:host-gateway",
        str(rootfs),
        "--",
        "sh",
        "-c",
        "wget -qO- http://db/ && wget -qO- http://web/ && cat /etc/hosts",
    )
    body, _, hosts = proc.stdout.partition("hello from the container\n" * 2)
    assert body == ""
    assert f"{sandbox.record('web')['ip']}\tdb web" in hosts
    assert f"{GW}\tgw" in hosts


def test_host_mode_has_no_namespace(sandbox, rootfs: Path) -> None:
    proc = sandbox.uf(
        "run",
        "--network",
        "host",
        "-p",
        "80:80",
        str(rootfs),
        "--",
        "sh",
        "-c",
        "ip -o link | cut -d: -f2",
    )
    assert "discarded" in proc.stderr
    assert "lo" in proc.stdout.split()
    assert (rootfs / "etc" / "hosts").read_text() == Path("/etc/hosts").read_text()
    assert sandbox.leftovers() == []


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["-p", "80:8x"], 2, "invalid port"),
        (["-p", "1:2:3:4"], 2, "invalid port spec"),
        (["--network", "container:nope"], 1, "no such running container: nope"),
        (["--link", "nope"], 1, "cannot link to nope"),
        (["--network", "container:web", "-p", "80"], 2, "conflicting options: -p"),
        (["--network", "container:web", "--hostname", "x"], 2, "conflicting options"),
        (["--network", "none", "--link", "a"], 2, "conflicting options"),
        (["--network", "sideways"], 2, "invalid --network"),
        (["--ip", "10.9.9.9"], 2, "not a usable address"),
        (["--name", "bad/name"], 2, "invalid container name"),
    ],
)
def test_bad_input_leaves_nothing(sandbox, rootfs: Path, args, code, message) -> None:
    proc = sandbox.uf("run", *args, str(rootfs), "--", "true", check=False)
    assert proc.returncode == code
    assert message in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert sandbox.leftovers() == []


def test_port_in_use_and_missing_rootfs_and_bad_command(sandbox, rootfs: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 10090))
        taken.listen(1)
        proc = sandbox.uf("run", "-p", "127.0.0.1:10090:80", str(rootfs), "--", "true", check=False)
        assert proc.returncode == 1
        assert proc.stderr.strip() == "unionfs: host port 127.0.0.1:10090/tcp is already in use"
        assert sandbox.leftovers() == []
    proc = sandbox.uf("run", str(rootfs / "missing"), "--", "true", check=False)
    assert proc.returncode == 1 and "No such file or directory" in proc.stderr
    proc = sandbox.uf("run", str(rootfs), "--", "no-such-command", check=False)
    assert proc.returncode == 127 and "no-such-command" in proc.stderr
    assert sandbox.leftovers() == []
    start_web(sandbox, rootfs, "web")
    proc = sandbox.uf("run", "--name", "web", str(rootfs), "--", "true", check=False)
    assert proc.returncode == 1 and "already in use" in proc.stderr
    sandbox.uf("rm", "web")
    proc = sandbox.uf("rm", "web", check=False)
    assert proc.returncode == 1 and "no such container: web" in proc.stderr
    assert sandbox.leftovers() == []


def test_gc_after_crash(sandbox, rootfs: Path) -> None:
    web = start_web(sandbox, rootfs, "web", "127.0.0.1:10080:80")
    start_web(sandbox, rootfs, "keep")
    # Simulate a crash: the supervisor dies without cleaning up, then its container.
    os.kill(web["supervisor"], signal.SIGKILL)
    os.kill(web["pid"], signal.SIGKILL)
    deadline = time.monotonic() + 10
    while Path(f"/proc/{web['pid']}").exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert any("web" in x for x in sandbox.leftovers())
    out = sandbox.uf("net", "gc").stdout
    assert "removed stale container web" in out
    assert [r["name"] for r in sandbox.records()] == ["keep"]
    assert sandbox.connect_fails("127.0.0.1", 10080)
    rules = subprocess.run(["nft", "-j", "list", "ruleset"], capture_output=True, text=True)
    assert "10080" not in json.dumps(json.loads(rules.stdout))
    sandbox.uf("rm", "keep")
    assert sandbox.uf("net", "gc").stdout == ""
    assert sandbox.leftovers() == []
