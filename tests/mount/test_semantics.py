"""Real mounts: the read and write paths on hand-made layer sets, checked against the kernel."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import Union, whiteout, write
from unionfs.api import mounted

pytestmark = pytest.mark.mount


def snapshot(root: str | Path, upper: bool = False) -> dict[str, tuple]:
    """Names, types, modes, owners, sizes, content digests, link targets, user xattrs.

    With ``upper=True`` whiteouts and opaque markers are recorded too.
    """
    root = str(root)
    out: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in sorted(dirnames + filenames):
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            rel = os.path.relpath(p, root)
            extra: object = None
            if stat.S_ISREG(st.st_mode):
                with open(p, "rb") as f:
                    extra = hashlib.sha256(f.read()).hexdigest()[:16]
            elif stat.S_ISLNK(st.st_mode):
                extra = os.readlink(p)
            elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
                extra = (os.major(st.st_rdev), os.minor(st.st_rdev))
            xattrs: list[tuple[str, bytes]] = []
            if not stat.S_ISLNK(st.st_mode):
                for a in sorted(os.listxattr(p, follow_symlinks=False)):
                    if a.startswith("user.") and not a.startswith(
                        ("user.overlay.", "user.unionfs")
                    ):
                        xattrs.append((a, os.getxattr(p, a, follow_symlinks=False)))
                    if upper and a == "trusted.overlay.opaque":
                        xattrs.append((a, os.getxattr(p, a, follow_symlinks=False)))
            size = None if stat.S_ISDIR(st.st_mode) else st.st_size
            out[rel] = (
                stat.S_IFMT(st.st_mode),
                stat.S_IMODE(st.st_mode),
                st.st_uid,
                st.st_gid,
                size,
                extra,
                tuple(xattrs),
            )
    return out


@contextlib.contextmanager
def kernel_mount(lowers: list[Path], mnt: Path, upper: Path | None, work: Path | None):
    opts = "lowerdir=" + ":".join(map(str, lowers))
    if upper is not None:
        opts += f",upperdir={upper},workdir={work}"
    opts += ",redirect_dir=off,index=off,metacopy=off"
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o", opts, str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def twin(union: Callable[[int], Union], build: Callable[[Union], None], n: int = 2):
    a, b = union(n), union(n)
    build(a)
    build(b)
    return a, b


def sample_layers(u: Union) -> None:
    l0, l1 = u.lowers
    write(l1 / "etc/motd", "base motd")
    write(l1 / "etc/passwd", "root:x:0:0")
    write(l1 / "etc/gone", "to be whited out")
    write(l1 / "bin/tool", "#!/bin/sh\n", 0o755)
    write(l1 / "opt/app/a", "a")
    write(l1 / "opt/app/b", "b")
    write(l1 / "var/lib/x", "x" * 5000)
    write(l0 / "etc/motd", "app motd")
    whiteout(l0 / "etc/gone")
    (l0 / "opt/app").mkdir(parents=True)
    os.setxattr(l0 / "opt/app", "trusted.overlay.opaque", b"y")
    write(l0 / "opt/app/c", "c")
    os.symlink("/etc", l0 / "hostetc")
    os.symlink("../../..", l0 / "up")
    os.mkfifo(l0 / "fifo")
    os.link(l1 / "opt/app/a", l1 / "hardlink-a")
    os.setxattr(l1 / "etc/passwd", "user.note", b"from base")
    os.chown(l1 / "var/lib/x", 1000, 1000)


def test_read_view_matches_kernel(union: Callable[[int], Union]) -> None:
    a, b = twin(union, sample_layers)
    with a.mount(upper=False) as m, kernel_mount(b.lowers, b.mnt, None, None) as k:
        assert snapshot(m) == snapshot(k)
        assert (Path(m) / "etc/motd").read_text() == "app motd"
        assert not (Path(m) / "etc/gone").exists()
        assert sorted(os.listdir(Path(m) / "opt/app")) == ["c"]
        with pytest.raises(OSError) as exc:
            (Path(m) / "new").write_text("x")
        assert exc.value.errno == errno.EROFS


def write_ops(m: Path) -> None:
    with open(m / "etc/motd", "a") as f:
        f.write(" + appended")
    os.chmod(m / "bin/tool", 0o700)
    os.chown(m / "etc/passwd", 1000, 1000)
    os.utime(m / "var/lib/x", ns=(1_000_000_123, 2_000_000_456))
    os.unlink(m / "etc/passwd")
    os.mkdir(m / "etc/passwd")  # over a whiteout: opaque
    write(m / "etc/passwd/inside", "new")
    shutil.rmtree(m / "opt/app")
    os.mkdir(m / "opt/app")
    write(m / "opt/app/fresh", "fresh")
    os.rename(m / "var/lib/x", m / "var/lib/y")
    os.mkdir(m / "newdir")
    write(m / "newdir/f", "f")
    os.rename(m / "newdir", m / "moved")
    os.symlink("target", m / "link")
    os.link(m / "etc/motd", m / "motd-link")
    os.setxattr(m / "bin/tool", "user.k", b"v")
    os.truncate(m / "etc/motd", 3)
    os.mkfifo(m / "fifo2")
    with pytest.raises(OSError) as exc:
        os.rename(m / "opt", m / "opt2")
    assert exc.value.errno == errno.EXDEV
    with pytest.raises(OSError) as exc:
        os.rmdir(m / "etc")
    assert exc.value.errno == errno.ENOTEMPTY


def test_write_ops_match_kernel_view_and_upper(union: Callable[[int], Union]) -> None:
    a, b = twin(union, sample_layers)
    with a.mount() as m:
        write_ops(Path(m))
        mine = snapshot(m)
    with kernel_mount(b.lowers, b.mnt, b.upper, b.work) as k:
        write_ops(Path(k))
        theirs = snapshot(k)
    assert mine == theirs
    assert snapshot(a.upper, upper=True) == snapshot(b.upper, upper=True)
    # Interop both ways: each upper mounts under the other implementation with the same view.
    with kernel_mount(a.lowers, a.mnt, a.upper, a.work) as k:
        assert snapshot(k) == mine
    with b.mount() as m:
        assert snapshot(m) == theirs
    assert os.listdir(a.work / "work") == []


def test_lowers_never_written(union: Callable[[int], Union]) -> None:
    u = union(2)
    sample_layers(u)
    # Our own walk reads the lower directories once; relatime then keeps their atime still.
    paths = list(u.lowers[1].rglob("*"))
    before = {p: os.lstat(p) for p in paths}
    with u.mount() as m:
        write_ops(Path(m))
        for p in Path(m).rglob("*"):
            if p.is_file() and not p.is_symlink() and not stat.S_ISFIFO(p.lstat().st_mode):
                p.read_bytes()
    after = {p: os.lstat(p) for p in u.lowers[1].rglob("*")}
    assert before.keys() == after.keys()
    for p, st in before.items():
        st2 = after[p]
        assert (st.st_mtime_ns, st.st_atime_ns, st.st_size) == (
            st2.st_mtime_ns,
            st2.st_atime_ns,
            st2.st_size,
        ), p


def test_inode_numbers(union: Callable[[int], Union], tmp_path: Path) -> None:
    u = union(2)
    tmpfs = tmp_path / "tmpfs"
    tmpfs.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(tmpfs)], check=True)
    try:
        u.lowers[0] = tmpfs
        write(tmpfs / "t1", "on tmpfs")
        write(u.lowers[1] / "d1", "on disk")
        write(u.lowers[1] / "h1", "h")
        os.link(u.lowers[1] / "h1", u.lowers[1] / "h2")
        for i in range(50):
            write(tmpfs / f"many/t{i}", "x")
            write(u.lowers[1] / f"many/d{i}", "y")
        with u.mount() as m:
            mp = Path(m)
            inos = {p: os.lstat(p).st_ino for p in mp.rglob("*")}
            by_dino = {e.path: e.inode() for e in os.scandir(mp / "many")}
            assert all(by_dino[p] == os.lstat(p).st_ino for p in by_dino)
            assert inos[mp / "h1"] == inos[mp / "h2"]
            numbers = [v for k, v in inos.items() if k.name != "h2"]
            assert len(set(numbers)) == len(numbers)
            ino_before = os.lstat(mp / "d1").st_ino
            with open(mp / "d1", "a") as f:  # copy-up keeps the number
                f.write("!")
            assert os.lstat(mp / "d1").st_ino == ino_before
            assert len({os.lstat(p).st_dev for p in mp.rglob("*")}) == 1
        with u.mount() as m:
            again = {Path(m) / p.relative_to(mp): None for p in inos}
            for p in again:
                assert os.lstat(p).st_ino == inos[mp / p.relative_to(m)]
    finally:
        subprocess.run(["umount", "-l", str(tmpfs)], check=True)


def test_readdir_offsets_are_stable(union: Callable[[int], Union]) -> None:
    u = union(3)
    for i in range(300):
        write(u.lowers[i % 3] / "big" / f"f{i:03d}", str(i))
    code = (
        "import os,sys,ctypes\n"
        "libc=ctypes.CDLL(None)\n"
        "libc.opendir.restype=ctypes.c_void_p\n"
        "libc.readdir.restype=ctypes.c_void_p\n"
        "libc.readdir.argtypes=[ctypes.c_void_p]\n"
        "libc.telldir.argtypes=[ctypes.c_void_p]\n"
        "libc.telldir.restype=ctypes.c_long\n"
        "libc.seekdir.argtypes=[ctypes.c_void_p,ctypes.c_long]\n"
        "libc.closedir.argtypes=[ctypes.c_void_p]\n"
        "d=libc.opendir(sys.argv[1].encode())\n"
        "names=[]\n"
        "def nxt():\n"
        "    p=libc.readdir(d)\n"
        "    return None if not p else ctypes.string_at(p+19).decode()\n"
        "for _ in range(100): names.append(nxt())\n"
        "pos=libc.telldir(d)\n"
        "for _ in range(50): nxt()\n"
        "libc.seekdir(d,pos)\n"
        "while (n:=nxt()) is not None: names.append(n)\n"
        "print('\\n'.join(names))\n"
    )
    with u.mount() as m:
        out = subprocess.run(
            [sys.executable, "-c", code, str(Path(m) / "big")],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
    names = [n for n in out if n not in (".", "..")]
    assert sorted(names) == sorted(f"f{i:03d}" for i in range(300))


def test_untrusted_layers_stay_inside(union: Callable[[int], Union], tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    write(outside / "secret", "secret")
    u = union(2)
    write(u.lowers[0] / "d/ok", "ok")
    os.symlink(str(outside), u.lowers[1] / "d")  # a symlink below a dir: hidden, never merged
    os.symlink(str(outside), u.lowers[0] / "esc")
    os.symlink("../../../../../../..", u.lowers[0] / "dots")
    os.mknod(u.lowers[0] / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    with u.mount() as m:
        mp = Path(m)
        assert sorted(os.listdir(mp / "d")) == ["ok"]
        assert os.readlink(mp / "esc") == str(outside)
        # Writing through a symlink that points out is the caller's path walk, not ours:
        # the daemon never sees it. Copy-up of the symlink itself copies the link.
        os.lchown(mp / "esc", 1000, 1000)
        assert os.readlink(u.upper / "esc") == str(outside)
        assert (outside / "secret").read_text() == "secret"
        assert stat.S_ISCHR(os.lstat(mp / "null").st_mode)
        os.chmod(mp / "d", 0o700)
    assert sorted(os.listdir(outside)) == ["secret"]


def test_copy_up_is_seen_by_earlier_readers_and_done_once(union: Callable[[int], Union]) -> None:
    u = union(1)
    write(u.lowers[0] / "f", "old content")
    with u.mount() as m:
        mp = Path(m)
        reader = open(mp / "f", "rb")  # noqa: SIM115 - held open across the copy-up
        writers = [open(mp / "f", "r+b") for _ in range(3)]  # noqa: SIM115
        writers[0].write(b"NEW")
        writers[0].flush()
        for w in writers:
            w.close()
        reader.seek(0)
        assert reader.read() == b"NEW content"
        reader.close()
        stats = os.getxattr(m, "user.unionfs.stats")
        assert b'"copy_ups": 1' in stats


def _read_ahead_kb(mnt: str | Path) -> int:
    dev = os.stat(mnt).st_dev
    with open(f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}/read_ahead_kb") as f:
        return int(f.read())


def test_readahead_window(union: Callable[[int], Union]) -> None:
    u = union(1)
    with u.mount() as m:
        assert _read_ahead_kb(m) == 1024
    # A path with a space is escaped in mountinfo, where the daemon finds its device.
    u.mnt = u.root / "mount point"
    u.mnt.mkdir()
    with u.mount("readahead=4096") as m:
        assert _read_ahead_kb(m) == 4096
    with u.mount("readahead=0") as m:
        assert _read_ahead_kb(m) == 128  # the kernel's default, left alone
    assert "cannot set readahead" not in u.log()


def test_lower_files_opened_then_removed_still_read(union: Callable[[int], Union]) -> None:
    # A read-only open of a lower file opens the layer file only at the first read that
    # reaches the daemon: by then the name may be whited out or replaced.
    u = union(1)
    for name in ("gone", "replaced", "shadow"):
        write(u.lowers[0] / name, f"lower {name}")
    with u.mount() as m:
        mp = Path(m)
        held = {name: os.open(mp / name, os.O_RDONLY) for name in ("gone", "replaced", "shadow")}
        try:
            os.unlink(mp / "gone")
            os.rename(mp / "shadow", mp / "replaced")
            assert os.pread(held["gone"], 100, 0) == b"lower gone"
            assert os.pread(held["replaced"], 100, 0) == b"lower replaced"
            assert os.pread(held["shadow"], 100, 0) == b"lower shadow"
            assert (mp / "replaced").read_bytes() == b"lower shadow"
        finally:
            for fd in held.values():
                os.close(fd)


def test_large_copy_up_does_not_block_others(union: Callable[[int], Union]) -> None:
    u = union(1)
    big = u.lowers[0] / "big"
    with open(big, "wb") as f:
        for _ in range(64):
            f.write(os.urandom(1 << 20))
    write(u.lowers[0] / "small", "small")
    with u.mount() as m:
        mp = Path(m)
        served_during: list[float] = []
        done = threading.Event()

        def poke() -> None:
            while not done.is_set():
                os.lstat(mp / "small")
                (mp / "small").read_text()
                served_during.append(time.monotonic())

        t = threading.Thread(target=poke)
        t.start()
        with open(mp / "big", "r+b") as f:
            f.write(b"X")
        done.set()
        t.join()
        assert served_during, "other requests were served while the copy-up ran"
        with open(mp / "big", "rb") as f, open(big, "rb") as g:
            assert f.read(1) == b"X"
            g.seek(1)
            f.seek(1)
            assert hashlib.sha256(f.read()).digest() == hashlib.sha256(g.read()).digest()


def test_kill_during_copy_up_leaves_old_or_new(union: Callable[[int], Union]) -> None:
    u = union(1)
    big = u.lowers[0] / "big"
    with open(big, "wb") as f:
        f.truncate(0)
        for _ in range(256):
            f.write(b"L" * (1 << 20))
    with u.mount("fsync=0"):
        pass
    mp = str(u.mnt)
    from unionfs.api import mount, unmount

    mount([str(u.lowers[0])], mp, str(u.upper), str(u.work))
    pid = __import__("json").loads(
        next(
            Path("/run/unionfs/mounts").glob(mp.strip("/").replace("/", "_") + ".json")
        ).read_text()
    )["pid"]
    proc = subprocess.Popen(
        [sys.executable, "-c", f"open({str(Path(mp) / 'big')!r}, 'r+b').write(b'N')"],
        stderr=subprocess.DEVNULL,
    )
    time.sleep(0.15)
    os.kill(pid, signal.SIGKILL)
    proc.wait(timeout=30)
    unmount(mp, lazy=True)
    with mounted([str(u.lowers[0])], mp, str(u.upper), str(u.work)) as m:
        data = Path(m, "big").read_bytes()
        assert len(data) == 256 << 20
        assert data[1:] == b"L" * ((256 << 20) - 1)
        assert data[:1] in (b"L", b"N")
    assert os.listdir(u.work / "work") == []


def test_sigterm_unmounts_cleanly(union: Callable[[int], Union]) -> None:
    u = union(1)
    write(u.lowers[0] / "f", "x")
    proc = subprocess.Popen(
        [sys.executable, "-m", "unionfs", "mount", "-f", "--lower", str(u.lowers[0]), str(u.mnt)],
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 20
    while not os.path.ismount(u.mnt) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert (u.mnt / "f").read_text() == "x"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=20) == 0
    assert not os.path.ismount(u.mnt)


@pytest.mark.parametrize("nlayers", [500, 2000])
def test_deep_stacks(tmp_path: Path, nlayers: int) -> None:
    root = tmp_path / "L"
    lowers = []
    for i in range(nlayers):
        d = root / str(i)
        d.mkdir(parents=True)
        lowers.append(d)
    write(lowers[-1] / "deep/a/b/bottom", "bottom")
    write(lowers[nlayers // 2] / "deep/a/mid", "mid")
    whiteout(lowers[0] / "gone") if False else None
    write(lowers[-1] / "gone", "x")
    (lowers[nlayers // 3] / ".wh.gone").write_text("")
    mnt = tmp_path / "m"
    mnt.mkdir()
    started = time.monotonic()
    with mounted([str(p) for p in lowers], str(mnt)) as m:
        elapsed = time.monotonic() - started
        assert Path(m, "deep/a/b/bottom").read_text() == "bottom"
        assert sorted(os.listdir(Path(m, "deep/a"))) == ["b", "mid"]
        assert not Path(m, "gone").exists()
    assert elapsed < 60


def test_mount_helper(union: Callable[[int], Union]) -> None:
    if not os.path.exists("/sbin/mount.fuse.unionfs"):
        pytest.skip("mount helper not installed (scripts/install.sh installs it)")
    u = union(1)
    write(u.lowers[0] / "f", "via mount -t")
    opts = f"lowerdir={u.lowers[0]},upperdir={u.upper},workdir={u.work}"
    subprocess.run(["mount", "-t", "fuse.unionfs", "unionfs", str(u.mnt), "-o", opts], check=True)
    try:
        assert (u.mnt / "f").read_text() == "via mount -t"
        (u.mnt / "g").write_text("written")
    finally:
        subprocess.run(["umount", str(u.mnt)], check=True)
    assert (u.upper / "g").read_text() == "written"


@pytest.fixture(autouse=True)
def _no_stray_mounts(tmp_path: Path) -> Iterator[None]:
    yield
    with open("/proc/self/mounts") as f:
        stray = [ln.split()[1] for ln in f if str(tmp_path) in ln]
    for mnt in reversed(stray):
        subprocess.run(["umount", "-l", mnt], check=False)
    assert not stray, f"left mounted: {stray}"


def recreate_ops(m: Path) -> None:
    shutil.rmtree(m / "d")
    os.mkdir(m / "d")  # opaque: nothing of the old d shows again
    assert os.listdir(m / "d") == []
    shutil.rmtree(m / "n")  # n/e existed below with children: both levels recreated empty
    os.makedirs(m / "n/e/g")
    write(m / "n/e/g/new", "new")
    shutil.rmtree(m / "n/e")
    os.mkdir(m / "n/e")
    os.rename(m / "x", m / "y")  # a file moved over nothing, away from a lower name
    write(m / "x", "back")  # recreated over the whiteout the rename left


def test_delete_and_recreate_regressions(union: Callable[[int], Union]) -> None:
    def build(u: Union) -> None:
        write(u.lowers[1] / "d/a", "a")
        write(u.lowers[0] / "d/b", "b")
        write(u.lowers[1] / "n/e/f", "f")
        write(u.lowers[0] / "n/e/h", "h")
        write(u.lowers[1] / "x", "x")

    a, b = twin(union, build)
    with a.mount() as m:
        recreate_ops(Path(m))
        mine = snapshot(m)
    assert sorted(mine) == sorted(["d", "n", "n/e", "x", "y"]), (
        "entries of deleted lower directories reappeared"
    )
    with kernel_mount(b.lowers, b.mnt, b.upper, b.work) as k:
        recreate_ops(Path(k))
        assert snapshot(k) == mine
    assert snapshot(a.upper, upper=True) == snapshot(b.upper, upper=True)
    with a.mount() as m:
        assert snapshot(m) == mine  # and after a remount


def test_failed_rename_into_a_merged_dir_marks_the_source_opaque(
    union: Callable[[int], Union],
) -> None:
    # Found by the long differential run: the kernel marks an upper directory moved into a
    # merged parent opaque before rename(2) finds a pure-upper destination not empty, and
    # leaves the mark when the rename fails.
    def build(u: Union) -> None:
        write(u.lowers[0] / "m/lower", "l")  # m: merged once the upper holds it too
        write(u.upper / "m/up/x", "x")
        write(u.upper / "m/full/y", "y")
        write(u.upper / "p/src/z", "z")  # a pure-upper directory in a pure-upper parent

    a, b = twin(union, build)

    def ops(root: Path) -> None:
        for src in ("m/up", "p/src"):
            with pytest.raises(OSError) as exc:
                os.rename(root / src, root / "m/full")
            assert exc.value.errno == errno.ENOTEMPTY

    with a.mount() as m:
        ops(Path(m))
        mine = snapshot(m)
    with kernel_mount(b.lowers, b.mnt, b.upper, b.work) as k:
        ops(Path(k))
        assert snapshot(k) == mine
    assert snapshot(a.upper, upper=True) == snapshot(b.upper, upper=True)
    assert os.getxattr(a.upper / "m/up", "trusted.overlay.opaque") == b"y"


def test_auto_unmount_after_the_daemon_dies(union: Callable[[int], Union]) -> None:
    from unionfs.api import mount
    from unionfs.daemon import read_state

    u = union(1)
    write(u.lowers[0] / "f", "x")
    mount([str(u.lowers[0])], str(u.mnt), options=["auto_unmount"])
    state = read_state(str(u.mnt))
    assert state is not None and (u.mnt / "f").read_text() == "x"
    os.kill(state["pid"], signal.SIGKILL)
    deadline = time.monotonic() + 20
    while os.path.ismount(u.mnt) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not os.path.ismount(u.mnt)
