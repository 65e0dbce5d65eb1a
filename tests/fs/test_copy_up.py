"""Copy-up in-process, without FUSE: the copy, its metadata and origin, the parents, the
events it emits, the counters, and the error boundary of a change that fails half-way."""

from __future__ import annotations

import dataclasses
import errno
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from unionfs import format
from unionfs.config import MountConfig
from unionfs.fs import listing
from unionfs.fs.nodes import ROOT_INO, Node
from unionfs.fs.union import AttrChange, Union


@pytest.fixture
def fs(tmp_path: Path) -> Iterator[Union]:
    lower, upper, work = tmp_path / "lower", tmp_path / "upper", tmp_path / "work"
    for d in (lower, upper, work):
        d.mkdir()
    (lower / "a" / "b").mkdir(parents=True)
    (lower / "a" / "b" / "f").write_text("lower data")
    os.chmod(lower / "a" / "b" / "f", 0o640)
    os.setxattr(lower / "a" / "b" / "f", b"user.note", b"kept")
    os.utime(lower / "a" / "b" / "f", ns=(1_000_000_000, 2_000_000_000))
    (lower / "a" / "link").symlink_to("b/f")
    union = Union(
        MountConfig(
            lowers=[str(lower)], mountpoint=str(tmp_path), upper=str(upper), workdir=str(work)
        )
    )
    yield union
    union.close()


def _node(fs: Union, path: bytes) -> Node:
    node = fs.table.root
    for name in path.split(b"/"):
        found = fs.lookup(node.ino, name)
        assert found is not None, name
        node = found[0]
    return node


def test_open_for_write_copies_up_with_metadata_and_origin(fs: Union, tmp_path: Path) -> None:
    upper, lower = tmp_path / "upper", tmp_path / "lower"
    node = _node(fs, b"a/b/f")
    parents = [_node(fs, b"a").ino, _node(fs, b"a/b").ino]
    shown = node.st_ino
    stale: list[int] = []
    fs.events.on_stale(stale.append)
    assert node.immutable

    async def write() -> None:
        fh = await fs.open(node.ino, os.O_WRONLY)
        await fs.write(fh, 0, b"UPPER")
        fs.release(fh)

    trio.run(write)
    copy = upper / "a" / "b" / "f"
    assert copy.read_text() == "UPPER data" and (lower / "a/b/f").read_text() == "lower data"
    st = os.lstat(copy)
    assert stat.S_IMODE(st.st_mode) == 0o640 and os.getxattr(copy, b"user.note") == b"kept"
    # The copy records its origin as the kernel does, and keeps showing the lower number.
    assert os.getxattr(copy, format.ORIGIN_XATTRS[0])[1] == format.OVL_FH_MAGIC
    assert node.layers == (0,) and node.st_ino == shown and not node.immutable
    # What was shown of the lower objects is no longer true: parents first, then the file.
    assert stale == [*parents, node.ino]
    # Parents first, each marked impure where it holds a copied-up entry.
    assert (upper / "a" / "b").is_dir()
    assert os.getxattr(upper / "a" / "b", format.IMPURE_XATTRS[0]) == b"y"
    assert fs.stats.copy_ups == 3 and fs.stats.copy_up_bytes == len("lower data")
    assert [e["event"] for e in fs.stats.events] == ["copy-up"] * 3
    assert os.listdir(tmp_path / "work" / "work") == []  # nothing left half-built


def test_chmod_is_folded_into_the_copy(fs: Union, tmp_path: Path) -> None:
    node = _node(fs, b"a/b/f")
    attr = trio.run(lambda: fs.setattr(node.ino, None, AttrChange(mode=0o600)))
    copy = tmp_path / "upper" / "a" / "b" / "f"
    assert stat.S_IMODE(attr.st.st_mode) == 0o600 == stat.S_IMODE(os.lstat(copy).st_mode)
    # The copy kept the lower times: the chmod is not a second change after the copy-up.
    assert os.lstat(copy).st_mtime_ns == 2_000_000_000
    assert fs.stats.copy_ups == 3


def test_symlink_copy_up_keeps_the_target(fs: Union, tmp_path: Path) -> None:
    node = _node(fs, b"a/link")
    trio.run(lambda: fs.setxattr(node.ino, b"trusted.mark", b"1"))
    copy = tmp_path / "upper" / "a" / "link"
    assert os.readlink(copy) == "b/f" and node.layers == (0,)
    assert os.getxattr(copy, b"trusted.mark", follow_symlinks=False) == b"1"


def test_a_change_failing_half_way_drops_the_listings_it_touched(fs: Union) -> None:
    a = _node(fs, b"a")
    b = _node(fs, b"a/b")
    listing.index_of(fs.s, a)
    listing.index_of(fs.s, b)

    def make(dir_fd: int, name: bytes) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    async def create() -> None:
        with fs.s.changing():
            await fs.dirops.new_entry(b.ino, b"new", False, make, 0, 0)

    with pytest.raises(OSError) as exc:
        trio.run(create)
    assert exc.value.errno == errno.ENOSPC
    # The parents were copied up before the failure: their indexes are rebuilt next time.
    assert b.index is None and a.index is None
    assert sorted(listing.index_of(fs.s, b).names()) == [b"f"]
    assert b.layers == (0, 1)


def test_refused_before_any_change_keeps_the_listings(fs: Union) -> None:
    a = _node(fs, b"a")
    index = listing.index_of(fs.s, a)
    with pytest.raises(OSError) as exc:
        trio.run(lambda: fs.mkdir(a.ino, b"b", 0o755, 0, 0))
    assert exc.value.errno == errno.EEXIST
    assert a.index is index
    with pytest.raises(OSError) as exc:
        trio.run(lambda: fs.mkdir(ROOT_INO, b".wh.x", 0o755, 0, 0))
    assert exc.value.errno == errno.EINVAL


def _copy_seen_from_work(
    fs: Union, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> tuple[list[list[str]], Node]:
    """Copy ``a/b/f`` up through an open for writing; returns what ``work/`` held while the
    file's copy (not its parents') had its metadata set, and the file's node."""
    seen: list[list[str]] = []
    copy_meta = fs.copier.copy_meta

    def watching(src: int, dst: int, *args: object, **kwargs: object) -> None:
        if stat.S_ISREG(os.fstat(dst).st_mode):
            seen.append(os.listdir(tmp_path / "work" / "work"))
        copy_meta(src, dst, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(fs.copier, "copy_meta", watching)
    node = _node(fs, b"a/b/f")

    async def write() -> None:
        fh = await fs.open(node.ino, os.O_WRONLY)
        fs.release(fh)

    trio.run(write)
    return seen, node


def test_a_file_is_built_as_an_o_tmpfile_file_and_linked_in(
    fs: Union, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # As the kernel's copy-up on an upper that supports O_TMPFILE: the copy has no name
    # until it is complete, so work/ never holds it (and a crash leaves nothing there).
    assert fs.workdir.tmpfile
    seen, node = _copy_seen_from_work(fs, tmp_path, monkeypatch)
    assert seen == [[]]
    copy = tmp_path / "upper" / "a" / "b" / "f"
    assert copy.read_text() == "lower data" and os.lstat(copy).st_nlink == 1
    assert stat.S_IMODE(os.lstat(copy).st_mode) == 0o640
    assert node.layers == (0,)
    assert os.listdir(tmp_path / "work" / "work") == []


def test_without_o_tmpfile_the_copy_is_built_under_a_name_in_work(
    fs: Union, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fs.workdir.tmpfile = False
    seen, _ = _copy_seen_from_work(fs, tmp_path, monkeypatch)
    assert len(seen) == 1 and len(seen[0]) == 1 and seen[0][0].startswith("#unionfs-")
    assert (tmp_path / "upper" / "a" / "b" / "f").read_text() == "lower data"
    assert os.listdir(tmp_path / "work" / "work") == []


def test_a_refused_link_falls_back_to_names_and_loses_nothing(
    fs: Union, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # fs.protected_hardlinks can refuse to link a copy whose owner is not the daemon's.
    real_link = os.link
    refused: list[object] = []

    def link(src: object, *args: object, **kwargs: object) -> None:
        if isinstance(src, bytes) and src.startswith(b"/proc/self/fd/"):
            refused.append(src)
            raise PermissionError(errno.EPERM, "Operation not permitted")
        real_link(src, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "link", link)
    seen, node = _copy_seen_from_work(fs, tmp_path, monkeypatch)
    assert len(refused) == 1 and not fs.workdir.tmpfile
    assert seen[0] == [] and len(seen[1]) == 1  # the retry was built under a name
    assert (tmp_path / "upper" / "a" / "b" / "f").read_text() == "lower data"
    assert node.layers == (0,) and fs.stats.copy_ups == 3  # the file counted once
    assert os.listdir(tmp_path / "work" / "work") == []
    assert "cannot link O_TMPFILE" in caplog.text


def _synced_during_copy_up(fs: Union, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The kinds ("dir", "file") of what was fsynced while ``a/b/f`` was copied up."""
    synced: list[str] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append("dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    node = _node(fs, b"a/b/f")
    trio.run(lambda: fs.setattr(node.ino, None, AttrChange(mode=0o600)))
    return synced


def test_the_file_is_synced_and_its_parents_are_not_as_by_the_kernel(
    fs: Union, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Measured on the kernel's overlay (6.18, ext4 upper): 300 copy-ups of directories cost
    # the same with and without ``volatile``, regular files far more without it.
    assert _synced_during_copy_up(fs, monkeypatch) == ["file"]


@pytest.mark.parametrize(
    ("content", "fsync", "synced"),
    [("x", False, []), ("", True, [])],
    ids=["volatile mount", "empty file"],
)
def test_no_sync_for_a_volatile_mount_or_a_copy_without_data(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    content: str,
    fsync: bool,
    synced: list[str],
) -> None:
    # Measured on the kernel's overlay: chmod of 300 empty lower files costs the same with
    # and without ``volatile``; of 300 4 KiB files, about 0.2 ms more per file without it.
    lower, upper, work = tmp_path / "lower", tmp_path / "upper", tmp_path / "work"
    (lower / "a" / "b").mkdir(parents=True)
    (lower / "a" / "b" / "f").write_text(content)
    upper.mkdir()
    work.mkdir()
    cfg = MountConfig(
        lowers=[str(lower)], mountpoint=str(tmp_path), upper=str(upper), workdir=str(work)
    )
    union = Union(dataclasses.replace(cfg, fsync=fsync))
    try:
        assert _synced_during_copy_up(union, monkeypatch) == synced
        assert (upper / "a" / "b" / "f").read_text() == content
    finally:
        union.close()


def test_an_o_trunc_open_copies_no_data_and_syncs_nothing(
    fs: Union, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced: list[int] = []
    monkeypatch.setattr(os, "fsync", synced.append)
    node = _node(fs, b"a/b/f")

    async def truncate() -> None:
        fh = await fs.open(node.ino, os.O_WRONLY | os.O_TRUNC)
        fs.release(fh)

    trio.run(truncate)
    assert synced == [] and (tmp_path / "upper" / "a" / "b" / "f").read_bytes() == b""
