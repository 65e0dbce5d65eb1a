"""The pyfuse3 adapter awaited directly, without a mount: translation and the error boundary."""

from __future__ import annotations

import errno
import os
from pathlib import Path
from types import SimpleNamespace

import pyfuse3
import pytest
import trio

from unionfs.config import MountConfig
from unionfs.fs.nodes import ROOT_INO
from unionfs.fs.union import Union
from unionfs.fuse_ops import Operations

CTX = SimpleNamespace(uid=0, gid=0, pid=os.getpid(), umask=0o022)


@pytest.fixture
def ops(tmp_path: Path):
    lower, upper, work = tmp_path / "lower", tmp_path / "upper", tmp_path / "work"
    for d in (lower, upper, work):
        d.mkdir()
    (lower / "file").write_text("lower data")
    (lower / "dir").mkdir()
    (lower / "dir" / "inner").write_text("inner")
    cfg = MountConfig(
        lowers=[str(lower)], mountpoint=str(tmp_path), upper=str(upper), workdir=str(work)
    )
    fs = Union(cfg)
    yield Operations(fs, timeout=5.0), lower, upper
    fs.close()


def run(coro_fn, *args):
    return trio.run(coro_fn, *args)


def test_lookup_getattr_read(ops) -> None:
    o, lower, _ = ops
    entry = run(o.lookup, ROOT_INO, b"file", CTX)
    assert entry.st_size == len("lower data") and entry.entry_timeout == 5.0
    assert run(o.getattr, entry.st_ino, CTX).st_ino == entry.st_ino
    fi = run(o.open, entry.st_ino, os.O_RDONLY, CTX)
    assert run(o.read, fi.fh, 0, 100) == b"lower data"
    run(o.release, fi.fh)
    negative = run(o.lookup, ROOT_INO, b"missing", CTX)
    assert negative.st_ino == 0 and negative.entry_timeout == 5.0  # cached by the kernel


def test_write_copies_up_and_unlink_leaves_whiteout(ops) -> None:
    o, lower, upper = ops
    entry = run(o.lookup, ROOT_INO, b"file", CTX)
    fi = run(o.open, entry.st_ino, os.O_WRONLY, CTX)
    assert run(o.write, fi.fh, 0, b"UPPER") == 5
    run(o.release, fi.fh)
    assert (upper / "file").read_text() == "UPPER data"
    assert (lower / "file").read_text() == "lower data"
    assert run(o.getattr, entry.st_ino, CTX).st_ino == entry.st_ino  # number kept
    run(o.unlink, ROOT_INO, b"file", CTX)
    st = os.lstat(upper / "file")
    assert os.major(st.st_rdev) == 0 and os.minor(st.st_rdev) == 0
    assert run(o.lookup, ROOT_INO, b"file", CTX).st_ino == 0


def test_create_and_mkdir(ops) -> None:
    o, _, upper = ops
    fi, entry = run(o.create, ROOT_INO, b"new", 0o100640, os.O_RDWR, CTX)
    run(o.write, fi.fh, 0, b"x")
    run(o.release, fi.fh)
    assert entry.st_mode & 0o777 == 0o640 and (upper / "new").read_text() == "x"
    d = run(o.mkdir, ROOT_INO, b"d", 0o40755, CTX)
    assert d.st_mode & 0o40000


def test_errors_become_errnos(ops) -> None:
    o, _, _ = ops
    with pytest.raises(pyfuse3.FUSEError) as exc:
        run(o.getattr, 999999, CTX)
    assert exc.value.errno == errno.ESTALE
    dir_entry = run(o.lookup, ROOT_INO, b"dir", CTX)
    with pytest.raises(pyfuse3.FUSEError) as exc:
        run(o.rmdir, ROOT_INO, b"dir", CTX)
    assert exc.value.errno == errno.ENOTEMPTY
    with pytest.raises(pyfuse3.FUSEError) as exc:
        run(o.rename, ROOT_INO, b"dir", ROOT_INO, b"moved", 0, CTX)
    assert exc.value.errno == errno.EXDEV
    with pytest.raises(pyfuse3.FUSEError) as exc:
        # The other mode's marker (trusted.overlay.* is escaped, as in the kernel).
        run(o.setxattr, dir_entry.st_ino, b"user.overlay.opaque", b"y", CTX)
    assert exc.value.errno == errno.EPERM


def test_unexpected_exception_becomes_eio(ops, caplog) -> None:
    o, _, _ = ops

    def boom(*_args: object) -> None:
        raise RuntimeError("bug")

    o.fs.node = boom  # type: ignore[method-assign]
    with pytest.raises(pyfuse3.FUSEError) as exc:
        run(o.getattr, ROOT_INO, CTX)
    assert exc.value.errno == errno.EIO
    assert "unexpected error in getattr" in caplog.text


def test_forget_never_raises(ops) -> None:
    o, _, _ = ops
    entry = run(o.lookup, ROOT_INO, b"file", CTX)
    run(o.forget, [(entry.st_ino, 1), (123456789, 5), (ROOT_INO, 1)])
    assert entry.st_ino not in o.fs.table.nodes
    assert ROOT_INO in o.fs.table.nodes


def test_virtual_xattrs(ops) -> None:
    o, lower, _ = ops
    entry = run(o.lookup, ROOT_INO, b"file", CTX)
    import json

    info = json.loads(run(o.getxattr, entry.st_ino, b"user.unionfs.inspect", CTX))
    assert info["layer"]["dir"] == str(lower)
    assert b"user.unionfs.inspect" not in run(o.listxattr, entry.st_ino, CTX)
    with pytest.raises(pyfuse3.FUSEError) as exc:
        run(o.setxattr, entry.st_ino, b"user.unionfs.inspect", b"x", CTX)
    assert exc.value.errno == errno.EPERM
