"""Concurrency, data integrity and crafted layers on real mounts (no timing assertions)."""

from __future__ import annotations

import errno
import mmap
import os
import random
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import Union, write
from tests.mount.semantics_common import kernel_mount, snapshot
from unionfs.api import mounted

pytestmark = pytest.mark.mount

WORKER = r"""
import os, random, sys
mnt, wid, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
rng = random.Random(seed)
errors = []
mine = {}
for i in range(150):
    op = rng.choice(["append", "create", "rename", "pwrite", "stat", "list"])
    try:
        if op == "append":
            n = rng.randrange(10)
            with open(f"{mnt}/shared/f{n}", "a") as f:
                f.write(f"w{wid}-{i}\n")
        elif op == "create":
            name = f"{mnt}/new/w{wid}-{i}"
            with open(name, "w") as f:
                f.write(name)
            mine[name] = name
        elif op == "rename" and mine:
            old = rng.choice(sorted(mine))
            new = old + "r"
            os.rename(old, new)
            mine[new] = mine.pop(old)
        elif op == "pwrite":
            n = rng.randrange(10)
            fd = os.open(f"{mnt}/block/b{n}", os.O_WRONLY)
            os.pwrite(fd, bytes([65 + wid]) * 16, wid * 16)
            os.close(fd)
        elif op == "stat":
            os.stat(f"{mnt}/shared/f{rng.randrange(10)}")
        else:
            os.listdir(f"{mnt}/new")
    except OSError as e:
        errors.append(f"{op}: {e}")
for path, content in mine.items():
    with open(path) as f:
        if f.read() != content:
            errors.append(f"content of {path}")
print("\n".join(errors))
sys.exit(1 if errors else 0)
"""


def test_concurrent_writers(union: Callable[[int], Union]) -> None:
    u = union(1)
    for n in range(10):
        write(u.lowers[0] / f"shared/f{n}", "lower\n")
        write(u.lowers[0] / f"block/b{n}", "." * 64)
    (u.lowers[0] / "new").mkdir()
    with u.mount() as m:
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", WORKER, m, str(w), str(1000 + w)],
                stdout=subprocess.PIPE,
                text=True,
            )
            for w in range(4)
        ]
        outs = [(p.communicate(timeout=300)[0], p.returncode) for p in procs]
        assert all(rc == 0 for _, rc in outs), outs
        appended = [
            line
            for n in range(10)
            for line in Path(m, f"shared/f{n}").read_text().splitlines()
            if line != "lower"
        ]
        assert len(appended) == len(set(appended))
        for n in range(10):
            assert Path(m, f"shared/f{n}").read_text().startswith("lower\n")
            data = Path(m, f"block/b{n}").read_bytes()
            assert len(data) == 64
            for w in range(4):
                assert data[w * 16 : w * 16 + 16] in (b"." * 16, bytes([65 + w]) * 16)
        view = snapshot(m)
        stats = os.getxattr(m, "user.unionfs.stats")
    assert b'"copy_ups": ' in stats
    # Nothing lost: the upper written concurrently mounts under the kernel with the same view.
    with kernel_mount(u.lowers, u.mnt, u.upper, u.work) as k:
        assert snapshot(k) == view
    assert appended, "the workers appended through the mount"


def test_random_io_matches_reference(union: Callable[[int], Union]) -> None:
    u = union(1)
    rng = random.Random(7)
    base = bytes(rng.getrandbits(8) for _ in range(300_000))
    write(u.lowers[0] / "lowerfile", base)
    refs = {"lowerfile": bytearray(base), "newfile": bytearray()}
    with u.mount() as m:
        Path(m, "newfile").write_bytes(b"")
        fds = {n: os.open(Path(m, n), os.O_RDWR) for n in refs}
        try:
            for _ in range(600):
                name = rng.choice(sorted(refs))
                fd, ref = fds[name], refs[name]
                op = rng.random()
                if op < 0.4:
                    off = rng.randrange(0, len(ref) + 5000)
                    data = bytes(rng.getrandbits(8) for _ in range(rng.randrange(1, 9000)))
                    os.pwrite(fd, data, off)
                    if off > len(ref):
                        ref.extend(b"\0" * (off - len(ref)))
                    ref[off : off + len(data)] = data
                elif op < 0.5:
                    size = rng.randrange(0, len(ref) + 10000)
                    os.ftruncate(fd, size)
                    del ref[size:]
                    ref.extend(b"\0" * (size - len(ref)))
                elif op < 0.6 and len(ref) > 0:
                    with mmap.mmap(fd, len(ref)) as mm:
                        off = rng.randrange(len(ref))
                        chunk = bytes(rng.getrandbits(8) for _ in range(min(100, len(ref) - off)))
                        mm[off : off + len(chunk)] = chunk
                        mm.flush()
                    ref[off : off + len(chunk)] = chunk
                else:
                    off = rng.randrange(0, len(ref) + 1)
                    n = rng.randrange(1, 20000)
                    assert os.pread(fd, n, off) == bytes(ref[off : off + n])
            for name, fd in fds.items():
                assert os.fstat(fd).st_size == len(refs[name])
        finally:
            for fd in fds.values():
                os.close(fd)
        for name, ref in refs.items():
            assert Path(m, name).read_bytes() == bytes(ref)
    with u.mount() as m:
        for name, ref in refs.items():
            assert Path(m, name).read_bytes() == bytes(ref)
    assert (u.lowers[0] / "lowerfile").read_bytes() == base


def test_sparse_lower_stays_sparse(union: Callable[[int], Union]) -> None:
    u = union(1)
    with open(u.lowers[0] / "sparse", "wb") as f:
        f.truncate(256 << 20)
        f.seek(100 << 20)
        f.write(b"data in the middle")
    with u.mount() as m:
        with open(Path(m, "sparse"), "r+b") as f:
            f.seek(0)
            f.write(b"X")
        st = os.stat(u.upper / "sparse")
        assert st.st_size == 256 << 20
        assert st.st_blocks * 512 < (8 << 20), "holes were filled in by the copy-up"
        with open(Path(m, "sparse"), "rb") as f:
            f.seek(100 << 20)
            assert f.read(18) == b"data in the middle"


def test_crafted_upper_and_workdir_stay_inside(union: Callable[[int], Union], tmp_path: Path):
    outside = tmp_path / "outside"
    outside.mkdir()
    write(outside / "keep", "keep")
    u = union(1)
    write(u.lowers[0] / "etc/passwd", "root")
    write(u.lowers[0] / "etc/group", "root")
    write(u.lowers[0] / "d/f", "f")
    # A symlink where a copy-up would create the parent: the upper's "d" points outside.
    os.symlink(str(outside), u.upper / "d")
    with u.mount() as m:
        assert os.readlink(Path(m, "d")) == str(outside)  # the upper's symlink hides the lower dir
        Path(m, "etc/group").write_text("changed")  # copy-up creates upper/etc
        # Swap the upper's etc for a symlink behind the daemon's back, then copy up another
        # file: the daemon works through the directory it holds open, never the symlink.
        os.rename(u.upper / "etc", tmp_path / "moved-etc")
        os.symlink(str(outside), u.upper / "etc")
        try:
            Path(m, "etc/passwd").write_text("not through the symlink")
        except OSError as exc:
            assert exc.errno in (errno.ELOOP, errno.ENOTDIR, errno.ENOENT, errno.ESTALE)
        else:
            assert (tmp_path / "moved-etc" / "passwd").read_text() == "not through the symlink"
    assert sorted(os.listdir(outside)) == ["keep"]
    # A workdir whose work/ is a symlink out: the mount is refused, nothing written outside.
    v = union(1)
    os.symlink(str(outside), v.work / "work")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "unionfs",
            "-o",
            f"lowerdir={v.lowers[0]},upperdir={v.upper},workdir={v.work}",
            str(v.mnt),
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 1
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert sorted(os.listdir(outside)) == ["keep"]
    assert not os.path.ismount(v.mnt)


def test_read_only_mount_and_wh_names(union: Callable[[int], Union]) -> None:
    u = union(1)
    write(u.lowers[0] / "f", "x")
    with mounted([str(u.lowers[0])], str(u.mnt)) as m:
        for action in (
            lambda: Path(m, "f").write_text("y"),
            lambda: os.mkdir(Path(m, "d")),
            lambda: os.unlink(Path(m, "f")),
            lambda: os.chmod(Path(m, "f"), 0o600),
        ):
            with pytest.raises(OSError) as exc:
                action()
            assert exc.value.errno == errno.EROFS
    with u.mount() as m:
        with pytest.raises(OSError) as exc:
            Path(m, ".wh.f").write_text("")
        assert exc.value.errno == errno.EINVAL
        assert Path(m, "f").read_text() == "x"
