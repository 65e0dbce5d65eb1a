"""The patched pyfuse3 (third_party/pyfuse3): a FUSE node id apart from st_ino, and fallocate.

A tiny pyfuse3 filesystem runs in a subprocess on a real mount. Every name it serves has its
own node id (the number the kernel sends back in later requests) while several names share
one st_ino, as unionfs needs for the names of a multiply-linked lower file. Every request it
gets is written to a JSON-lines log, so the tests see which node ids the kernel used.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyfuse3
import pytest

pytestmark = pytest.mark.mount

SHARED_INO = 100
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02

# The filesystem. Root lists a and b; c and d answer lookups only, so their kernel inodes come
# from lookup replies while a's and b's come from the readdirplus entries. All four share
# st_ino SHARED_INO and differ in node id and size. New names (create, link, symlink, mkdir,
# mknod) get the next free node id and st_ino 1000 + node id, except that a link keeps the
# st_ino of its target. getattr answers by node id, so a kernel that sent st_ino instead
# would get ENOENT. fallocate with offset 13 fails with ENOSPC, to test the error path.
FS = r"""
import errno, json, os, stat, sys
import pyfuse3, trio

mnt, log_path, shared_ino = sys.argv[1], sys.argv[2], int(sys.argv[3])
log = open(log_path, "a", buffering=1)

def note(op, **kw):
    log.write(json.dumps({"op": op, **kw}) + "\n")

class Node:
    def __init__(self, node_id, st_ino, mode, size, target=b""):
        self.node_id, self.st_ino, self.mode, self.size = node_id, st_ino, mode, size
        self.target = target

nodes = {pyfuse3.ROOT_INODE: Node(pyfuse3.ROOT_INODE, 1, stat.S_IFDIR | 0o755, 0)}
names = {}  # (parent node id, name) -> node id
listed = [b"a", b"b"]
for nid, name in zip((2, 3, 4, 5), (b"a", b"b", b"c", b"d")):
    nodes[nid] = Node(nid, shared_ino, stat.S_IFREG | 0o644, 1111 * (nid - 1))
    names[(pyfuse3.ROOT_INODE, name)] = nid
next_id = [10]

def attrs(nid):
    n = nodes[nid]
    e = pyfuse3.EntryAttributes()
    e.st_ino = n.st_ino
    e.node_id = n.node_id
    e.st_mode, e.st_size, e.st_nlink = n.mode, n.size, 2
    e.attr_timeout = 0  # every stat asks the daemon, by node id
    e.entry_timeout = 300
    return e

class FS(pyfuse3.Operations):
    async def lookup(self, parent, name, ctx):
        note("lookup", parent=parent, name=name.decode())
        nid = names.get((parent, name))
        if nid is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return attrs(nid)

    async def getattr(self, inode, ctx):
        note("getattr", inode=inode)
        if inode not in nodes:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return attrs(inode)

    async def setattr(self, inode, attr, fields, fh, ctx):
        return await self.getattr(inode, ctx)

    async def opendir(self, inode, ctx):
        return inode

    async def readdir(self, fh, start, token):
        for i in range(start, len(listed)):
            nid = names[(fh, listed[i])]
            if not pyfuse3.readdir_reply(token, listed[i], attrs(nid), i + 1):
                break

    async def open(self, inode, flags, ctx):
        return pyfuse3.FileInfo(fh=500 + inode)

    async def fallocate(self, fh, mode, offset, length):
        note("fallocate", fh=fh, mode=mode, offset=offset, length=length)
        if offset == 13:
            raise pyfuse3.FUSEError(errno.ENOSPC)

    def _new(self, parent, name, mode, st_ino=None, target=b""):
        nid = next_id[0]
        next_id[0] += 1
        nodes[nid] = Node(nid, 1000 + nid if st_ino is None else st_ino, mode, 0, target)
        names[(parent, name)] = nid
        return nid

    async def create(self, parent, name, mode, flags, ctx):
        nid = self._new(parent, name, mode)
        note("create", name=name.decode(), node_id=nid, umask=ctx.umask)
        return pyfuse3.FileInfo(fh=500 + nid), attrs(nid)

    async def link(self, inode, new_parent, new_name, ctx):
        nid = self._new(new_parent, new_name, nodes[inode].mode, st_ino=nodes[inode].st_ino)
        note("link", name=new_name.decode(), node_id=nid)
        return attrs(nid)

    async def symlink(self, parent, name, target, ctx):
        nid = self._new(parent, name, stat.S_IFLNK | 0o777, target=target)
        note("symlink", name=name.decode(), node_id=nid)
        return attrs(nid)

    async def readlink(self, inode, ctx):
        return nodes[inode].target

    async def mkdir(self, parent, name, mode, ctx):
        nid = self._new(parent, name, stat.S_IFDIR | mode)
        note("mkdir", name=name.decode(), node_id=nid)
        return attrs(nid)

    async def mknod(self, parent, name, mode, rdev, ctx):
        nid = self._new(parent, name, mode)
        note("mknod", name=name.decode(), node_id=nid)
        return attrs(nid)

    async def release(self, fh):
        pass

    async def releasedir(self, fh):
        pass

    async def flush(self, fh):
        pass

pyfuse3.init(FS(), mnt, ["fsname=pyfuse3patch"])
try:
    trio.run(pyfuse3.main)
finally:
    pyfuse3.close(unmount=False)
"""


class Mount:
    """A running test filesystem: its mountpoint and the requests it has logged."""

    def __init__(self, mnt: Path, log: Path) -> None:
        self.mnt = mnt
        self.log_path = log

    def log(self, op: str | None = None) -> list[dict[str, Any]]:
        lines = self.log_path.read_text().splitlines()
        entries = [json.loads(line) for line in lines]
        return [e for e in entries if op is None or e["op"] == op]

    def getattr_inodes(self) -> set[int]:
        """Node ids of getattr requests, except the root's (mount checks stat it)."""
        return {e["inode"] for e in self.log("getattr")} - {pyfuse3.ROOT_INODE}


@pytest.fixture
def fs(tmp_path: Path) -> Iterator[Mount]:
    if not hasattr(pyfuse3.EntryAttributes(), "node_id"):
        pytest.fail("pyfuse3 is not the patched build: run scripts/install.sh")
    mnt, log = tmp_path / "mnt", tmp_path / "requests.log"
    mnt.mkdir()
    log.touch()
    (tmp_path / "fs.py").write_text(FS)
    with open(tmp_path / "daemon.err", "w") as stderr:
        proc = subprocess.Popen(
            [sys.executable, str(tmp_path / "fs.py"), str(mnt), str(log), str(SHARED_INO)],
            stderr=stderr,
        )
    try:
        deadline = time.monotonic() + 20
        while not os.path.ismount(mnt):
            if proc.poll() is not None or time.monotonic() > deadline:
                err = (tmp_path / "daemon.err").read_text()
                pytest.fail(f"test filesystem did not mount: {err}")
            time.sleep(0.05)
        yield Mount(mnt, log)
    finally:
        # Not os.path.ismount: it says False for the mount of a daemon that died (ENOTCONN).
        mounts = Path("/proc/self/mounts").read_text().splitlines()
        if any(line.split()[1] == str(mnt) for line in mounts):
            subprocess.run(["fusermount3", "-u", "-z", str(mnt)], check=False)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    err = (tmp_path / "daemon.err").read_text()
    assert "Traceback" not in err, err


def test_names_from_readdirplus_are_separate_inodes_with_one_st_ino(fs: Mount) -> None:
    with os.scandir(fs.mnt) as it:
        d_ino = {e.name: e.inode() for e in it}
    assert d_ino == {"a": SHARED_INO, "b": SHARED_INO}
    a, b = os.stat(fs.mnt / "a"), os.stat(fs.mnt / "b")
    # The readdirplus entries made the dentries: no lookup, and getattr came by node id.
    assert fs.log("lookup") == []
    assert fs.getattr_inodes() == {2, 3}
    assert (a.st_ino, b.st_ino) == (SHARED_INO, SHARED_INO)
    assert (a.st_size, b.st_size) == (1111, 2222)


def test_names_from_lookup_are_separate_inodes_with_one_st_ino(fs: Mount) -> None:
    c, d = os.stat(fs.mnt / "c"), os.stat(fs.mnt / "d")
    assert [e["name"] for e in fs.log("lookup")] == ["c", "d"]
    assert (c.st_ino, d.st_ino) == (SHARED_INO, SHARED_INO)
    assert (c.st_size, d.st_size) == (3333, 4444)
    # An open file is its own node too: fstat asks by the node id of the name opened.
    with open(fs.mnt / "d", "rb") as f:
        assert os.fstat(f.fileno()).st_size == 4444
    assert fs.getattr_inodes() <= {4, 5}
    assert os.stat(fs.mnt / "c").st_size == 3333


def test_new_entries_use_node_id_and_st_ino(fs: Mount) -> None:
    old_umask = os.umask(0o027)
    try:
        fd = os.open(fs.mnt / "new", os.O_CREAT | os.O_WRONLY, 0o666)
    finally:
        os.umask(old_umask)
    os.close(fd)
    os.link(fs.mnt / "a", fs.mnt / "hard")
    os.symlink("a", fs.mnt / "sym")
    os.mkdir(fs.mnt / "dir")
    os.mknod(fs.mnt / "fifo", 0o600 | 0o010000)
    made = {
        e["name"]: e["node_id"]
        for op in ("create", "link", "symlink", "mkdir", "mknod")
        for e in fs.log(op)
    }
    assert fs.log("create")[0]["umask"] == 0o027
    assert set(made) == {"new", "hard", "sym", "dir", "fifo"}
    for name, nid in made.items():
        st = os.lstat(fs.mnt / name)
        assert st.st_ino == (SHARED_INO if name == "hard" else 1000 + nid), name
        assert nid in fs.getattr_inodes(), name
    assert os.readlink(fs.mnt / "sym") == "a"
    # Every getattr named a node id the daemon handed out, never an st_ino.
    assert fs.getattr_inodes() <= set(made.values()) | {2, 3}


def _fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    if libc.fallocate(fd, mode, offset, length) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def test_fallocate_reaches_the_handler(fs: Mount) -> None:
    fd = os.open(fs.mnt / "a", os.O_RDWR)
    try:
        os.posix_fallocate(fd, 4096, 8192)
        _fallocate(fd, FALLOC_FL_KEEP_SIZE, 100, 200)
        _fallocate(fd, FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE, 1 << 33, 1 << 20)
        with pytest.raises(OSError) as exc:
            _fallocate(fd, 0, 13, 1)
        assert exc.value.errno == errno.ENOSPC
    finally:
        os.close(fd)
    calls = [(e["fh"], e["mode"], e["offset"], e["length"]) for e in fs.log("fallocate")]
    assert calls == [
        (502, 0, 4096, 8192),
        (502, FALLOC_FL_KEEP_SIZE, 100, 200),
        (502, FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE, 1 << 33, 1 << 20),
        (502, 0, 13, 1),
    ]
