"""Issue 13 item 3: what ``unionfs run`` starts is confined as Docker confines it by default.

Each test runs one busybox container (``--network none``, inside the ``sandbox`` namespaces of
tests/net) whose script reports what it sees; the assertions are on that report and on a
canary outside the rootfs: a file behind a loop device whose block device the container tries
to create, mount and write.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.net import conftest as net_fixtures
from tests.net.conftest import Sandbox
from unionfs.net import caps

pytestmark = pytest.mark.net
sandbox = net_fixtures.sandbox

APPLETS = ("grep", "mknod", "mount", "touch", "unshare", "stat", "dd", "true", "id", "head")
MINIMAL_DEV = sorted(
    ["fd", "full", "null", "ptmx", "pts", "random", "shm", "stderr", "stdin", "stdout"]
    + ["tty", "urandom", "zero"]
)
DOCKER_MASK = f"{caps.mask(caps.DOCKER_DEFAULT):016x}"
assert DOCKER_MASK == "00000000a80425fb"  # Docker's documented default CapEff


@pytest.fixture
def rootfs(tmp_path: Path) -> Path:
    """tests/net's busybox rootfs plus the applets these probes use."""
    root = net_fixtures.rootfs.__wrapped__(tmp_path)  # type: ignore[attr-defined]
    for applet in APPLETS:
        (root / "bin" / applet).symlink_to("busybox")
    return root


def status(box: Sandbox, root: Path, *flags: str) -> dict[str, str]:
    """The container's /proc/self/status fields (of ``grep``, an exec'ed child)."""
    out = box.uf("run", "--network", "none", *flags, str(root), "--", "cat", "/proc/self/status")
    return dict(line.split(":\t", 1) for line in out.stdout.splitlines() if ":\t" in line)


def host_cap_bounding() -> str:
    return (
        [line for line in Path("/proc/self/status").read_text().splitlines() if "CapBnd" in line][0]
        .split()[1]
        .strip()
    )


@contextlib.contextmanager
def loop_device(backing: Path) -> Iterator[Path]:
    proc = subprocess.run(
        ["losetup", "--find", "--show", str(backing)], capture_output=True, text=True
    )
    if proc.returncode != 0:
        pytest.skip(f"no loop device: {proc.stderr.strip()}")
    dev = Path(proc.stdout.strip())
    try:
        yield dev
    finally:
        subprocess.run(["losetup", "-d", str(dev)], check=False)


def test_default_confinement_matches_docker(sandbox: Sandbox, rootfs: Path, tmp_path: Path) -> None:
    disk = tmp_path / "disk.img"
    disk.write_bytes(b"CANARY" * 40000)
    before = disk.read_bytes()
    # A block device node already in the layer: nodev on the rootfs makes it unusable.
    with loop_device(disk) as dev:
        rdev = os.stat(dev).st_rdev
        os.mknod(rootfs / "layerdisk", stat.S_IFBLK | 0o666, rdev)
        major, minor = os.major(rdev), os.minor(rdev)
        script = f"""
            grep -E '^(Cap[A-Za-z]+|NoNewPrivs|Seccomp):' /proc/self/status
            echo 1 > /proc/sys/kernel/domainname; echo "sysctl=$?"
            echo 1 > /proc/sysrq-trigger; echo "sysrq=$?"
            touch /sys/kernel/x 2>&1; echo "sys=$?"
            mknod /tmp/disk b {major} {minor}; echo "mknod=$?"
            mknod /tmp/mem c 1 1; echo "mknodmem=$?"
            mknod /tmp/null c 1 3 && echo "mknodnull=0"
            mkdir /mnt; mount -t ext4 /layerdisk /mnt; echo "mount=$?"
            mount -t tmpfs none /mnt; echo "tmpfs=$?"
            unshare -m true; echo "unshare=$?"
            echo x | dd of=/layerdisk conv=notrunc 2>/dev/null; echo "write=$?"
            echo "kcore=$(cat /proc/kcore 2>/dev/null | head -c 16 | wc -c)"
            echo "keys=$(cat /proc/keys | wc -c)"
            echo "timer_list=$(cat /proc/timer_list | wc -c)"
            echo "acpi=$(ls -A /proc/acpi | wc -l)"
            echo "firmware=$(ls -A /sys/firmware | wc -l)"
            echo "dev=$(ls -A /dev | tr '\\n' ' ')"
            ls /dev/pts/ptmx >/dev/null && echo "ptmx=ok"
            echo hi > /dev/shm/x && echo "shm=ok"
        """
        proc = sandbox.uf("run", "--network", "none", str(rootfs), "--", "sh", "-c", script)
    lines = proc.stdout.splitlines()
    report = dict(line.split(":\t", 1) for line in lines if ":\t" in line)
    for key in ("CapEff", "CapPrm", "CapBnd", "CapInh"):
        assert report.get(key) == DOCKER_MASK, (key, proc.stdout, proc.stderr)
    assert report["CapAmb"] == "0000000000000000"
    assert report["Seccomp"] == "2" and report["NoNewPrivs"] == "1"
    result = dict(line.split("=", 1) for line in lines if "=" in line and ":\t" not in line)
    for key in ("sysctl", "sysrq", "sys", "mknod", "mknodmem", "mount", "tmpfs", "unshare"):
        assert result.get(key, "0") != "0", (key, proc.stdout, proc.stderr)
    assert result["write"] != "0"
    assert "Read-only file system" in proc.stderr  # /proc/sys, /sys
    assert "mknodnull" in result  # Docker's allowed character devices stay creatable
    assert result["kcore"] == "0"
    for masked in ("keys", "timer_list", "acpi"):
        if Path("/proc", masked).exists():
            assert result[masked] == "0", (masked, proc.stdout)
    if Path("/sys/firmware").exists():
        assert result["firmware"] == "0"
    assert sorted(result["dev"].split()) == MINIMAL_DEV
    assert result.get("ptmx") == "ok" and result.get("shm") == "ok"
    assert disk.read_bytes() == before
    assert sandbox.leftovers() == []


def test_privileged_restores_full_capabilities(sandbox: Sandbox, rootfs: Path) -> None:
    report = status(sandbox, rootfs, "--privileged")
    assert report["CapEff"] == host_cap_bounding()
    assert report["Seccomp"] == "0" and report["NoNewPrivs"] == "0"


def test_cap_drop_all_and_cap_add(sandbox: Sandbox, rootfs: Path) -> None:
    report = status(sandbox, rootfs, "--cap-drop", "ALL")
    assert report["CapEff"] == report["CapBnd"] == report["CapPrm"] == "0" * 16
    report = status(sandbox, rootfs, "--cap-add", "net_admin", "--cap-drop", "CAP_MKNOD")
    want = caps.mask((caps.DOCKER_DEFAULT | {"NET_ADMIN"}) - {"MKNOD"})
    assert int(report["CapEff"], 16) == int(report["CapBnd"], 16) == want
    bad = sandbox.uf("run", "--cap-add", "FLY", str(rootfs), "--", "true", check=False)
    assert bad.returncode == 2 and "unknown capability" in bad.stderr


def test_security_opts(sandbox: Sandbox, rootfs: Path) -> None:
    report = status(
        sandbox,
        rootfs,
        "--security-opt",
        "seccomp=unconfined",
        "--security-opt",
        "no-new-privileges=false",
    )
    assert report["Seccomp"] == "0" and report["NoNewPrivs"] == "0"
    assert report["CapEff"] == DOCKER_MASK
    bad = sandbox.uf(
        "run", "--security-opt", "seccomp=/x.json", str(rootfs), "--", "true", check=False
    )
    assert bad.returncode == 2 and "seccomp=unconfined" in bad.stderr


def test_read_only_rootfs_including_mounts_inside_it(sandbox: Sandbox, rootfs: Path) -> None:
    sub = rootfs / "tmp" / "sub"
    sub.mkdir()
    # The sandbox's private mount namespace: this tmpfs is gone with it, unmounted anyway.
    subprocess.run(["mount", "-t", "tmpfs", "sub", str(sub)], check=True)
    try:
        script = (
            "touch /tmp/x; echo rc=$?; touch /tmp/sub/x; echo sub=$?; "
            "touch /dev/shm/y && echo shm=ok"
        )
        proc = sandbox.uf(
            "run", "--network", "none", "--read-only", str(rootfs), "--", "sh", "-c", script
        )
        assert not (sub / "x").exists()
    finally:
        subprocess.run(["umount", str(sub)], check=True)
    assert "rc=1" in proc.stdout and "sub=1" in proc.stdout and "shm=ok" in proc.stdout
    assert "Read-only file system" in proc.stderr
    assert not (rootfs / "tmp" / "x").exists()


def test_private_user_namespace(sandbox: Sandbox, rootfs: Path) -> None:
    script = "cat /proc/self/uid_map /proc/self/gid_map; id -u; touch /tmp/x; echo rc=$?"
    proc = sandbox.uf(
        "run", "--network", "none", "--userns", "private", str(rootfs), "--", "sh", "-c", script
    )
    maps = [line.split() for line in proc.stdout.splitlines()[:2]]
    assert maps[0][0] == "0" and maps[0][2] == "65536" and int(maps[0][1]) > 0
    assert maps[1][0] == "0" and int(maps[1][1]) > 0
    assert proc.stdout.splitlines()[2] == "0"
    # Root in the container is an unprivileged host uid: the host-root-owned /tmp is not its.
    assert "rc=1" in proc.stdout and not (rootfs / "tmp" / "x").exists()


def test_seccomp_filter_in_the_kernel(tmp_path: Path) -> None:
    """The default filter installed in a forked child: what it refuses, what it lets by."""
    from unionfs.net import seccomp
    from unionfs.net import syscalls as sc

    if not seccomp.supported():
        pytest.skip("no default filter for this architecture")
    program = seccomp.build(caps.DOCKER_DEFAULT)
    probes = {
        "fifo": lambda: os.mkfifo(tmp_path / "fifo"),
        "null": lambda: os.mknod(tmp_path / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3)),
        "pts": lambda: os.mknod(tmp_path / "pts", stat.S_IFCHR | 0o600, os.makedev(136, 300)),
        "block": lambda: os.mknod(tmp_path / "blk", stat.S_IFBLK | 0o600, os.makedev(7, 0)),
        "mem": lambda: os.mknod(tmp_path / "mem", stat.S_IFCHR | 0o600, os.makedev(1, 1)),
        "mount": lambda: sc.mount("tmpfs", str(tmp_path), "tmpfs", 0, None),
        "unshare": lambda: sc.unshare(sc.CLONE_NEWNS),
        "fork": lambda: os.waitpid(pid, 0) if (pid := os.fork()) else os._exit(0),
        "tiocsti": lambda: _tiocsti(),
    }
    r, w = os.pipe()
    child = os.fork()
    if child == 0:
        try:
            os.close(r)
            sc.prctl(sc.PR_SET_NO_NEW_PRIVS, 1)
            sc.install_seccomp_filter(program)
            results = []
            for name, probe in probes.items():
                try:
                    probe()
                    results.append(f"{name}=ok")
                except OSError as exc:
                    results.append(f"{name}={exc.errno}")
            os.write(w, " ".join(results).encode())
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r) as f:
        got = dict(item.split("=") for item in f.read().split())
    os.waitpid(child, 0)
    eperm = str(errno.EPERM)
    assert got == {
        "fifo": "ok",
        "null": "ok",
        "pts": "ok",
        "block": eperm,
        "mem": eperm,
        "mount": eperm,
        "unshare": eperm,
        "fork": "ok",
        "tiocsti": eperm,
    }


def _tiocsti() -> None:
    import fcntl
    import pty
    import termios

    leader, follower = pty.openpty()
    try:
        fcntl.ioctl(follower, termios.TIOCSTI, b"x")
    finally:
        os.close(leader)
        os.close(follower)
