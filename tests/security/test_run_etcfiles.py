"""Issue 13 item 2: ``unionfs run`` never writes through, blocks on, or over-reads what a
hostile rootfs puts at ``/etc/hosts``, ``/etc/resolv.conf``, ``/etc/hostname`` or ``/etc``.

Each case plants the object in the rootfs, runs a container, and checks that a canary outside
the rootfs (a file behind a loop device, a symlink target, a hard link's other name, a
directory ``etc`` points to) keeps its bytes, mode and times; that ``run`` either refused
with one ``unionfs:`` line or replaced the name by a regular file; that it returned promptly
(it holds the run lock meanwhile); and that ``net gc`` and a later ``run`` still work.
Containers run with ``--network none`` inside the ``sandbox`` namespaces of tests/net.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.net import conftest as net_fixtures
from tests.net.conftest import Sandbox

pytestmark = pytest.mark.net
sandbox = net_fixtures.sandbox


@pytest.fixture
def rootfs(tmp_path: Path) -> Path:
    """tests/net's busybox rootfs plus ``true``."""
    root = net_fixtures.rootfs.__wrapped__(tmp_path)  # type: ignore[attr-defined]
    (root / "bin" / "true").symlink_to("busybox")
    return root


PROMPT = 10.0  # seconds; a blocked open or an endless read would hit the uf() timeout instead


def snapshot(path: Path) -> tuple[bytes, int, int, int]:
    st = os.stat(path, follow_symlinks=False)
    return path.read_bytes(), stat.S_IMODE(st.st_mode), st.st_mtime_ns, st.st_nlink


def run_true(box: Sandbox, root: Path, *extra: str):
    start = time.monotonic()
    proc = box.uf("run", "--network", "none", *extra, str(root), "--", "true", check=False)
    assert time.monotonic() - start < PROMPT
    return proc


def assert_refused(proc, *words: str) -> None:
    assert proc.returncode == 1, (proc.returncode, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("unionfs: "), proc.stderr
    for word in words:
        assert word in lines[0], lines[0]


def assert_still_works(box: Sandbox, tmp_path: Path, run_again: bool = False) -> None:
    """``net gc`` succeeds, nothing is left behind and, if asked, a fresh rootfs runs."""
    box.uf("net", "gc")
    if run_again:
        clean = tmp_path / "clean"
        (clean / "bin").mkdir(parents=True)
        shutil.copy2("/bin/busybox", clean / "bin" / "busybox")
        (clean / "bin" / "true").symlink_to("busybox")
        assert run_true(box, clean).returncode == 0
    assert box.leftovers() == []


@contextlib.contextmanager
def loop_device(backing: Path) -> Iterator[Path]:
    """A loop block device over ``backing``, detached afterwards."""
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


def test_block_device_hosts_is_refused_and_disk_untouched(
    sandbox: Sandbox, rootfs: Path, tmp_path: Path
) -> None:
    disk = tmp_path / "disk.img"
    disk.write_bytes(b"DISK" * 16384)
    before = snapshot(disk)
    with loop_device(disk) as dev:
        rdev = os.stat(dev).st_rdev
        os.mknod(rootfs / "etc" / "hosts", stat.S_IFBLK | 0o644, rdev)
        proc = run_true(sandbox, rootfs)
        with open(dev, "rb") as f:
            assert f.read(16) == b"DISK" * 4
    assert_refused(proc, "etc/hosts", "block device")
    assert snapshot(disk) == before
    assert stat.S_ISBLK(os.lstat(rootfs / "etc" / "hosts").st_mode)
    # Checked before anything is written: the other two names were not created either.
    assert not (rootfs / "etc" / "resolv.conf").exists()
    assert_still_works(sandbox, tmp_path, run_again=True)


def test_fifo_resolv_conf_neither_hangs_nor_holds_the_lock(
    sandbox: Sandbox, rootfs: Path, tmp_path: Path
) -> None:
    os.mkfifo(rootfs / "etc" / "resolv.conf")
    proc = run_true(sandbox, rootfs)
    assert_refused(proc, "etc/resolv.conf", "FIFO")
    assert_still_works(sandbox, tmp_path, run_again=True)


def test_char_device_hostname_is_refused(sandbox: Sandbox, rootfs: Path, tmp_path: Path) -> None:
    os.mknod(rootfs / "etc" / "hostname", stat.S_IFCHR | 0o666, os.makedev(1, 5))
    assert_refused(run_true(sandbox, rootfs), "etc/hostname", "character device")
    assert_still_works(sandbox, tmp_path)


def test_symlink_out_of_rootfs_is_replaced_not_followed(
    sandbox: Sandbox, rootfs: Path, tmp_path: Path
) -> None:
    outside = tmp_path / "outside-hosts"
    outside.write_text("host's own\n")
    before = snapshot(outside)
    (rootfs / "etc" / "hosts").symlink_to(outside)
    (rootfs / "etc" / "resolv.conf").symlink_to("../../../../../../../../" + str(outside))
    assert run_true(sandbox, rootfs).returncode == 0
    assert snapshot(outside) == before
    for name in ("hosts", "resolv.conf"):
        st = os.lstat(rootfs / "etc" / name)
        assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o644
    assert "localhost" in (rootfs / "etc" / "hosts").read_text()
    assert_still_works(sandbox, tmp_path)


def test_hard_link_to_outside_file_is_not_written_through(
    sandbox: Sandbox, rootfs: Path, tmp_path: Path
) -> None:
    outside = tmp_path / "outside-hostname"
    outside.write_text("precious\n" * 1000)
    before = snapshot(outside)
    os.link(outside, rootfs / "etc" / "hostname")
    assert run_true(sandbox, rootfs, "--hostname", "box").returncode == 0
    # Replaced by rename: the outside inode keeps its bytes; only its link count drops back.
    assert snapshot(outside)[:3] == before[:3]
    assert (rootfs / "etc" / "hostname").read_text() == "box\n"
    assert_still_works(sandbox, tmp_path)


def test_etc_symlink_out_of_rootfs_is_refused(
    sandbox: Sandbox, rootfs: Path, tmp_path: Path
) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.rmtree(rootfs / "etc")
    (rootfs / "etc").symlink_to(elsewhere)
    assert_refused(run_true(sandbox, rootfs), "/etc is not a directory")
    assert list(elsewhere.iterdir()) == []
    assert_still_works(sandbox, tmp_path)


def test_container_mode_reads_are_bounded(sandbox: Sandbox, rootfs: Path, tmp_path: Path) -> None:
    sandbox.uf("run", "-d", "--network", "none", "--name", "a", str(rootfs), "--", "sleep", "60")
    other = tmp_path / "other"
    shutil.copytree(rootfs, other, symlinks=True)
    hosts = rootfs / "etc" / "hosts"
    for kind, expected in (
        ("zero", "character device"),
        ("fifo", "FIFO"),
        ("huge", "larger than"),
    ):
        hosts.unlink()
        if kind == "zero":
            os.mknod(hosts, stat.S_IFCHR | 0o666, os.makedev(1, 5))
        elif kind == "fifo":
            os.mkfifo(hosts)
        else:
            with open(hosts, "wb") as f:
                f.truncate(8 << 30)  # sparse: 8 GiB claimed, nothing on disk
        proc = run_true(sandbox, other, "--network", "container:a")
        assert_refused(proc, "etc/hosts", expected)
    hosts.unlink()
    # A's etc swapped for a symlink to a directory outside: not followed either.
    decoy = tmp_path / "decoy"
    decoy.mkdir()
    (decoy / "hosts").write_text("10.9.9.9\tdecoy\n")
    (rootfs / "etc").rename(tmp_path / "real-etc")
    (rootfs / "etc").symlink_to(decoy)
    proc = run_true(sandbox, other, "--network", "container:a")
    assert_refused(proc, "/etc is not a directory")
    (rootfs / "etc").unlink()
    (tmp_path / "real-etc").rename(rootfs / "etc")
    hosts.write_text("10.0.0.1\tfriend\n")
    assert run_true(sandbox, other, "--network", "container:a").returncode == 0
    assert (other / "etc" / "hosts").read_text() == "10.0.0.1\tfriend\n"
    sandbox.uf("rm", "a")
    assert_still_works(sandbox, tmp_path)
