"""Fixtures for the network helper's tests.

Every ``net`` test runs inside a throwaway network and mount namespace: the ``sandbox`` fixture
unshares both for the pytest process itself, makes every mount private, puts a tmpfs on /run
(so ``/run/netns`` and the run directory vanish with it) and brings ``lo`` up.  Afterwards it
returns to the original namespaces, and the throwaway ones die with their last user.  Tests
talk only to loopback and to addresses inside namespaces they create.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from unionfs.net import syscalls as sc

BUSYBOX = Path("/bin/busybox")
APPLETS = ("sh", "cat", "echo", "hostname", "httpd", "ip", "ls", "nc", "sleep", "timeout", "wget")
RUN_DIR = Path("/run/unionfs-test")
GATEWAY = "10.203.0.1"


def _ns_inode(kind: str) -> int:
    return os.stat(f"/proc/self/ns/{kind}").st_ino


@dataclass
class Sandbox:
    """Helpers bound to one throwaway namespace pair."""

    run_dir: Path

    def uf(self, *args: str, check: bool = True, stdin: str | None = None, timeout: float = 30):
        """Run ``unionfs ARGS`` and return the CompletedProcess (text mode)."""
        proc = subprocess.run(
            [sys.executable, "-m", "unionfs", *args],
            input=stdin,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check and proc.returncode != 0:
            raise AssertionError(f"unionfs {' '.join(args)} -> {proc.returncode}: {proc.stderr}")
        return proc

    def records(self) -> list[dict]:
        return json.loads(self.uf("ps", "--json").stdout)

    def record(self, name: str) -> dict:
        (rec,) = [r for r in self.records() if r["name"] == name]
        return rec

    @staticmethod
    def http_get(host: str, port: int, path: str = "/", timeout: float = 5.0) -> str:
        """GET ``path`` over a plain socket (no proxy settings apply); return the body."""
        with socket.create_connection((host, port), timeout=timeout) as s:
            s.sendall(f"GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n".encode())
            chunks = []
            while chunk := s.recv(65536):
                chunks.append(chunk)
        head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1."), head[:80]
        return body.decode()

    @staticmethod
    def wait_http(host: str, port: int, deadline: float = 10.0) -> str:
        """Retry :func:`http_get` until the server answers (it may still be starting)."""
        end = time.monotonic() + deadline
        while True:
            try:
                return Sandbox.http_get(host, port)
            except OSError:
                if time.monotonic() > end:
                    raise
                time.sleep(0.05)

    @staticmethod
    def connect_fails(host: str, port: int, timeout: float = 1.0) -> bool:
        """True if a TCP connection to host:port is refused, dropped or times out."""
        try:
            with socket.create_connection((host, port), timeout=timeout):
                return False
        except OSError:
            return True

    def leftovers(self) -> list[str]:
        """Everything the helper may have left behind; empty when clean."""
        found = []
        links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
        for line in links.splitlines():
            name = line.split(":")[1].strip().split("@")[0]
            if name.startswith(("ufv", "ufc", "unionfs")):
                found.append(f"link {name}")
        netns_dir = Path("/run/netns")
        if netns_dir.is_dir():
            found += [
                f"netns {p.name}" for p in netns_dir.iterdir() if p.name.startswith("unionfs-")
            ]
        containers = self.run_dir / "containers"
        if containers.is_dir():
            found += [f"record {p.name}" for p in containers.iterdir()]
        leases = self.run_dir / "leases"
        if leases.is_dir():
            found += [f"leases {p.name}" for p in leases.iterdir()]
        rules = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True).stdout
        if "unionfs" in rules:
            found.append(f"nft {rules.strip()}")
        return found


def _enter_sandbox() -> tuple[int, int]:
    saved = (os.open("/proc/self/ns/net", os.O_RDONLY), os.open("/proc/self/ns/mnt", os.O_RDONLY))
    before = (_ns_inode("net"), _ns_inode("mnt"))
    sc.unshare(sc.CLONE_NEWNET | sc.CLONE_NEWNS)
    if (_ns_inode("net"), _ns_inode("mnt")) == before or before[0] == _ns_inode("net"):
        raise RuntimeError("unshare did not give a new network namespace")
    sc.mount(None, "/", None, sc.MS_REC | sc.MS_PRIVATE, None)
    sc.mount("tmpfs", "/run", "tmpfs", 0, "mode=755")
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    return saved


def _leave_sandbox(saved: tuple[int, int]) -> None:
    net_fd, mnt_fd = saved
    sc.setns(mnt_fd, sc.CLONE_NEWNS)
    sc.setns(net_fd, sc.CLONE_NEWNET)
    os.close(net_fd)
    os.close(mnt_fd)


def _kill_recorded(run_dir: Path) -> None:
    """Last resort: SIGKILL, by PID, whatever a test left running."""
    containers = run_dir / "containers"
    if not containers.is_dir():
        return
    from unionfs.net.state import is_alive

    for path in containers.glob("*.json"):
        rec = json.loads(path.read_text())
        for pid, start in (
            (rec.get("pid"), rec.get("pid_start")),
            (rec.get("supervisor"), rec.get("supervisor_start")),
        ):
            if pid != os.getpid() and is_alive(pid, start):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


@pytest.fixture
def sandbox(monkeypatch: pytest.MonkeyPatch) -> Iterator[Sandbox]:
    """A fresh network + mount namespace for this test; see the module docstring."""
    if os.geteuid() != 0:
        pytest.skip("network tests need root")
    for tool in ("ip", "nft"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} not installed")
    saved = _enter_sandbox()
    monkeypatch.setenv("UNIONFS_RUN_DIR", str(RUN_DIR))
    monkeypatch.setenv("UNIONFS_NETNS_DIR", "/run/netns")
    for var in ("UNIONFS_BRIDGE", "UNIONFS_SUBNET", "UNIONFS_NFT_TABLE"):
        monkeypatch.delenv(var, raising=False)
    box = Sandbox(RUN_DIR)
    try:
        yield box
    finally:
        try:
            for rec in box.records() if RUN_DIR.exists() else []:
                box.uf("rm", rec["name"], check=False)
            _kill_recorded(RUN_DIR)
        finally:
            _leave_sandbox(saved)


@pytest.fixture
def rootfs(tmp_path: Path) -> Path:
    """A tiny root filesystem: static busybox, a few applets, /www/index.html."""
    if not BUSYBOX.exists():
        pytest.skip("busybox-static not installed")
    root = tmp_path / "rootfs"
    for d in ("bin", "etc", "dev", "proc", "tmp", "www"):
        (root / d).mkdir(parents=True)
    shutil.copy2(BUSYBOX, root / "bin" / "busybox")
    for applet in APPLETS:
        (root / "bin" / applet).symlink_to("busybox")
    (root / "www" / "index.html").write_text("hello from the container\n")
    return root
