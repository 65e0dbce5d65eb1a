"""Regressions of issue 10: each case runs the same operations, as the same caller (uid, gid,
umask), on a unionfs mount and on a kernel overlay mount of copies of the same layers, and
requires the same results, the same merged view and the same upper.
"""

from __future__ import annotations

import errno
import os
import stat
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import Union, write
from tests.oracle.backends import KernelOverlay, copy_tree
from tests.oracle.tree import diff, diff_upper, snapshot, upper_snapshot

pytestmark = [pytest.mark.mount, pytest.mark.kernel]


def build(layer: Path) -> None:
    d = layer / "d"
    d.mkdir()
    os.chmod(d, 0o777)
    write(d / "f", "hello", mode=0o666)
    write(d / "a", "aaa", mode=0o666)
    write(d / "b", "bbbb", mode=0o666)
    for name, mode in (("s1", 0o4777), ("s2", 0o2777), ("s3", 0o6777), ("s4", 0o2767)):
        write(d / name, "x", mode=mode)
    sticky = layer / "sticky"
    sticky.mkdir()
    os.chmod(sticky, 0o1777)
    os.chown(write(sticky / "mine", "m"), 1000, 1000)
    os.chown(write(sticky / "other", "o"), 2000, 2000)
    ro = layer / "ro"
    ro.mkdir()
    os.chown(write(ro / "f", "f"), 1000, 1000)
    write(layer / ("n" * 255), "long")


def run_as(fn: Callable[[], object], uid: int, gid: int, umask: int) -> str:
    """``repr`` of what ``fn`` returns (or the errno it raises) in a child with that identity."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        os.close(r)
        try:
            os.umask(umask)
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)
            out = repr(fn())
        except OSError as exc:
            out = f"errno {errno.errorcode.get(exc.errno or 0, exc.errno)}"
        except BaseException:
            out = traceback.format_exc()
        os.write(w, out.encode())
        os._exit(0)
    os.close(w)
    chunks = []
    while chunk := os.read(r, 65536):
        chunks.append(chunk)
    os.close(r)
    os.waitpid(pid, 0)
    return b"".join(chunks).decode()


def errname(fn: Callable[[], object]) -> str:
    try:
        fn()
    except OSError as exc:
        return errno.errorcode.get(exc.errno or 0, str(exc.errno))
    return "ok"


@pytest.fixture
def twin(union: Callable[[int], Union], tmp_path: Path) -> Iterator[tuple[Path, Path, Union, Path]]:
    u = union(1)
    build(u.lowers[0])
    # Other callers must reach the mounts: pytest's base directories are 0700.
    for p in (u.root, *u.root.parents):
        if p == Path("/tmp"):
            break
        os.chmod(p, os.stat(p).st_mode | 0o711)
    kroot = tmp_path / "kernel"
    kroot.mkdir(mode=0o755)
    copy_tree(u.lowers[0], kroot / "l0")
    (kroot / "upper").mkdir()
    (kroot / "work").mkdir()
    with (
        u.mount() as ours,
        KernelOverlay().mount([kroot / "l0"], kroot / "upper", kroot / "work", kroot / "mnt") as k,
    ):
        yield Path(ours), k, u, kroot / "upper"


def check(
    twin: tuple[Path, Path, Union, Path],
    fn: Callable[[Path], object],
    uid: int = 0,
    gid: int = 0,
    umask: int = 0o022,
) -> str:
    ours, theirs, u, kupper = twin
    got = run_as(lambda: fn(ours), uid, gid, umask)
    want = run_as(lambda: fn(theirs), uid, gid, umask)
    assert got == want
    assert not diff(snapshot(theirs), snapshot(ours))
    assert not diff_upper(upper_snapshot(kupper), upper_snapshot(u.upper))
    return got


def _creates(m: Path) -> object:
    os.close(os.open(m / "d" / "new", os.O_CREAT | os.O_WRONLY, 0o666))
    os.mkdir(m / "d" / "nd", 0o777)
    os.mkfifo(m / "d" / "fifo", 0o666)
    return oct(os.stat(m / "d" / "new").st_mode), oct(os.stat(m / "d" / "nd").st_mode)


@pytest.mark.parametrize("umask", [0o000, 0o002, 0o022, 0o027])
def test_the_callers_umask_is_applied_once(twin, umask: int) -> None:
    assert "errno" not in check(twin, _creates, uid=1000, gid=1000, umask=umask)


def test_open_rdonly_with_o_trunc_truncates(twin) -> None:
    def fn(m: Path) -> object:
        out = []
        for flags in (os.O_RDONLY | os.O_TRUNC, os.O_RDONLY | os.O_CREAT | os.O_TRUNC):
            write_name = m / "d" / ("a" if flags & os.O_CREAT else "f")
            fd = os.open(write_name, flags, 0o644)
            out.append((os.fstat(fd).st_size, errname(lambda fd=fd: os.write(fd, b"x"))))
            os.close(fd)
        fd = os.open(m / "d" / "nothere", os.O_RDONLY | os.O_CREAT | os.O_TRUNC, 0o640)
        out.append(os.fstat(fd).st_size)
        os.close(fd)
        return out

    assert "errno" not in check(twin, fn)


def test_open_then_unlinked_files_keep_working(twin) -> None:
    def fn(m: Path) -> object:
        rw = os.open(m / "d" / "f", os.O_RDWR)  # a lower file: copied up
        os.write(rw, b"HE")
        ro = os.open(m / "d" / "a", os.O_RDONLY)  # opened lazily
        created = os.open(m / "d" / "c", os.O_CREAT | os.O_RDWR, 0o644)
        os.write(created, b"new")
        for name in ("f", "a", "c"):
            os.unlink(m / "d" / name)
        out = []
        for fd in (rw, ro, created):
            st = os.fstat(fd)
            out.append((os.pread(fd, 10, 0), st.st_nlink, st.st_size))
        os.pwrite(rw, b"more", 5)
        os.ftruncate(created, 1)
        os.fchmod(created, 0o600)
        out.append((os.pread(rw, 20, 0), stat.filemode(os.fstat(created).st_mode)))
        out.append(os.fstat(created).st_size)
        return out

    assert "errno" not in check(twin, fn)


def test_nlink_through_a_descriptor_of_a_name_renamed_over(twin) -> None:
    def fn(m: Path) -> object:
        a = os.open(m / "d" / "a", os.O_RDWR)
        b = os.open(m / "d" / "b", os.O_RDONLY)
        os.rename(m / "d" / "b", m / "d" / "a")
        c = os.open(m / "d" / "c", os.O_CREAT | os.O_RDWR, 0o644)
        os.write(c, b"cc")
        os.rename(m / "d" / "a", m / "d" / "c")
        return [os.fstat(a).st_nlink, os.pread(a, 9, 0), os.fstat(b).st_nlink] + [
            os.fstat(c).st_nlink,
            os.pread(c, 9, 0),
        ]

    assert "errno" not in check(twin, fn)


def test_names_of_255_bytes_work_and_256_are_refused(twin) -> None:
    long = "n" * 255

    def fn(m: Path) -> object:
        d = m / "d"
        return [
            errname(lambda: os.chmod(m / long, 0o600)),
            errname(lambda: os.chown(m / long, 1, 1)),
            errname(lambda: os.truncate(m / long, 1)),
            errname(lambda: os.mkdir(d / ("m" * 255))),
            errname(lambda: os.mkfifo(d / ("p" * 255))),
            errname(lambda: os.symlink("x", d / ("s" * 255))),
            errname(lambda: os.link(m / long, d / ("l" * 255))),
            errname(lambda: os.rename(d / ("s" * 255), d / ("r" * 255))),
            errname(lambda: os.unlink(m / long)),
            errname(lambda: os.rmdir(d / ("m" * 255))),
            errname(lambda: os.mkdir(d / ("m" * 256))),
            errname(lambda: os.close(os.open(d / ("c" * 256), os.O_CREAT | os.O_WRONLY))),
        ]

    got = check(twin, fn)
    assert got.count("'ok'") == 10


def test_mknod_of_a_whiteout_device_is_refused(twin) -> None:
    def fn(m: Path) -> object:
        return errname(lambda: os.mknod(m / "d" / "w", stat.S_IFCHR | 0o600, 0))

    assert check(twin, fn) == "'EPERM'"
    assert not (twin[2].upper / "d" / "w").exists()


def test_writes_by_a_non_owner_clear_set_id_bits(twin) -> None:
    def fn(m: Path) -> object:
        out = []
        for name in ("s1", "s2", "s3", "s4"):
            fd = os.open(m / "d" / name, os.O_WRONLY | os.O_APPEND)
            os.write(fd, b"y")
            os.close(fd)
            out.append(stat.filemode(os.stat(m / "d" / name).st_mode))
        return out

    check(twin, fn, uid=1000, gid=1000)


def test_unprivileged_renames_in_sticky_and_read_only_directories(twin) -> None:
    def fn(m: Path) -> object:
        moves = [
            ("sticky/mine", "sticky/mine2"),
            ("sticky/other", "sticky/x"),
            ("sticky/mine2", "sticky/other"),
            ("ro/f", "ro/g"),
            ("ro/f", "d/f2"),
        ]
        return [errname(lambda a=a, b=b: os.rename(m / a, m / b)) for a, b in moves]

    check(twin, fn, uid=1000, gid=1000)


def test_names_of_a_lower_hard_link_are_separate_inodes(
    union: Callable[[int], Union], tmp_path: Path
) -> None:
    """The kernel without index=on: a copy-up breaks the link, each name is its own inode with
    one st_ino until then; the view is the same after a remount."""
    u = union(1)
    low = u.lowers[0]
    write(low / "d", "link data", mode=0o644)
    os.link(low / "d", low / "e")
    os.link(low / "d", low / "f")
    (low / "sub").mkdir()
    os.link(low / "d", low / "sub" / "g")
    kroot = tmp_path / "kernel"
    kroot.mkdir()
    copy_tree(low, kroot / "l0")
    (kroot / "upper").mkdir()
    (kroot / "work").mkdir()

    def ops(m: Path) -> object:
        out: list[object] = [os.stat(m / "d").st_ino == os.stat(m / "e").st_ino]
        keep = os.open(m / "f", os.O_RDONLY)
        os.chmod(m / "d", 0o600)
        os.rename(m / "e", m / "n2")
        fd = os.open(m / "d", os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o644)
        os.write(fd, b"x" * 199)
        os.close(fd)
        with open(m / "sub" / "g", "ab") as f:
            f.write(b"+g")
        for name in ("d", "n2", "f", "sub/g"):
            st = os.stat(m / name)
            out.append((name, stat.filemode(st.st_mode), st.st_size, st.st_nlink))
        out.append(os.pread(keep, 100, 0))
        os.close(keep)
        return out

    def inode_partition(m: Path) -> list[list[str]]:
        groups: dict[int, list[str]] = {}
        for name in ("d", "n2", "f", "sub/g"):
            groups.setdefault(os.stat(m / name).st_ino, []).append(name)
        return sorted(groups.values())

    with KernelOverlay().mount([kroot / "l0"], kroot / "upper", kroot / "work", kroot / "mnt") as k:
        want = run_as(lambda: ops(k), 0, 0, 0o022)
        want_view = snapshot(k)
        want_partition = inode_partition(k)
    with u.mount() as ours:
        got = run_as(lambda: ops(Path(ours)), 0, 0, 0o022)
        assert got == want
        assert not diff(want_view, snapshot(ours))
        assert inode_partition(Path(ours)) == want_partition
        before = snapshot(ours)
    assert not diff_upper(upper_snapshot(kroot / "upper"), upper_snapshot(u.upper))
    with u.mount() as ours:
        assert not diff(before, snapshot(ours))
        assert inode_partition(Path(ours)) == want_partition


FALLOC_KEEP_SIZE, FALLOC_PUNCH_HOLE, FALLOC_ZERO_RANGE = 0x01, 0x02, 0x10
FALLOC_COLLAPSE_RANGE, FALLOC_INSERT_RANGE = 0x08, 0x20


def _fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    from unionfs.fdops import fallocate

    fallocate(fd, mode, offset, length)


def test_fallocate_modes_pass_to_the_upper_after_a_copy_up(twin) -> None:
    """Every mode the FUSE module forwards behaves as on the kernel's overlay."""

    def fn(m: Path) -> object:
        out = []
        for i, mode in enumerate(
            (0, FALLOC_KEEP_SIZE, FALLOC_PUNCH_HOLE | FALLOC_KEEP_SIZE, FALLOC_ZERO_RANGE)
        ):
            path = m / "d" / ("a", "b", "f", "s1")[i]
            fd = os.open(path, os.O_RDWR)  # a lower file: copied up by the open
            os.pwrite(fd, b"z" * 20000, 0)
            out.append(errname(lambda fd=fd, mode=mode: _fallocate(fd, mode, 4096, 1 << 20)))
            st = os.fstat(fd)
            out.append((st.st_size, st.st_blocks > 0, os.pread(fd, 8, 4096)))
            os.close(fd)
        os.posix_fallocate(os.open(m / "d" / "new", os.O_CREAT | os.O_RDWR, 0o644), 0, 65536)
        out.append(os.stat(m / "d" / "new").st_size)
        return out

    assert errno.errorcode[errno.EOPNOTSUPP] not in check(twin, fn)


def test_fallocate_collapse_and_insert_are_refused_by_the_fuse_module(twin) -> None:
    """A documented difference: the kernel's FUSE module answers EOPNOTSUPP for these modes
    itself (fuse_file_fallocate), so no FUSE file system can offer them; the kernel's overlay
    passes them to the upper. The file is left as it was."""
    ours, theirs, _, _ = twin
    results = {}
    for root in (ours, theirs):
        fd = os.open(root / "d" / "a", os.O_RDWR)
        os.pwrite(fd, os.urandom(4096 * 4), 0)
        before = os.pread(fd, 1 << 20, 0)
        results[root] = [
            errname(lambda fd=fd, mode=mode: _fallocate(fd, mode, 4096, 4096))
            for mode in (FALLOC_COLLAPSE_RANGE, FALLOC_INSERT_RANGE)
        ]
        if root == ours:
            assert os.pread(fd, 1 << 20, 0) == before
        os.close(fd)
    assert results[ours] == [errno.errorcode[errno.EOPNOTSUPP]] * 2
    assert results[theirs] == ["ok", "ok"]


def test_trusted_xattrs_are_listed_to_root_only(twin) -> None:
    ours, theirs, _, _ = twin
    for root in (ours, theirs):
        os.setxattr(root / "d" / "f", "trusted.mine", b"1")
        os.setxattr(root / "d" / "f", "user.mine", b"2")

    def fn(m: Path) -> object:
        return sorted(os.listxattr(m / "d" / "f"))

    assert check(twin, fn, uid=1000, gid=1000) == "['user.mine']"
    assert "trusted.mine" in check(twin, fn)


def test_setxattr_create_and_replace_flags_after_a_copy_up(twin) -> None:
    def fn(m: Path) -> object:
        f = m / "d" / "f"
        out = [
            errname(lambda: os.setxattr(f, "user.a", b"1", os.XATTR_REPLACE)),  # copies up
            errname(lambda: os.setxattr(f, "user.a", b"1", os.XATTR_CREATE)),
            errname(lambda: os.setxattr(f, "user.a", b"2", os.XATTR_CREATE)),
            errname(lambda: os.setxattr(f, "user.a", b"3", os.XATTR_REPLACE)),
        ]
        return out, os.getxattr(f, "user.a")

    assert check(twin, fn) == "(['ENODATA', 'ok', 'EEXIST', 'ok'], b'3')"


def test_lookup_of_a_merged_dir_records_its_origin_as_the_kernel(
    union: Callable[[int], Union], tmp_path: Path
) -> None:
    """An upper directory that merges with a lower one but has no origin (made by a tool, or
    by an earlier mount) gets one at lookup, and its parent is marked impure."""
    u = union(1)
    for layer in (u.lowers[0], u.upper):
        (layer / "d" / "sub").mkdir(parents=True)
    write(u.lowers[0] / "d" / "sub" / "f", "lower")
    kroot = tmp_path / "kernel"
    kroot.mkdir()
    copy_tree(u.lowers[0], kroot / "l0")
    copy_tree(u.upper, kroot / "upper")
    (kroot / "work").mkdir()
    with (
        u.mount() as ours,
        KernelOverlay().mount([kroot / "l0"], kroot / "upper", kroot / "work", kroot / "mnt") as k,
    ):
        for m in (Path(ours), k):
            os.listdir(m / "d" / "sub")
        assert not diff(snapshot(k), snapshot(ours))
    assert not diff_upper(upper_snapshot(kroot / "upper"), upper_snapshot(u.upper))
    assert os.getxattr(u.upper / "d", "trusted.overlay.origin")


def test_o_tmpfile_is_a_documented_difference(twin) -> None:
    """The kernel's overlay supports O_TMPFILE; no FUSE file system built on pyfuse3 and
    Debian 12's libfuse 3.14 can (no tmpfile operation), and the kernel answers EOPNOTSUPP."""
    ours, theirs, _, _ = twin
    flags = os.O_TMPFILE | os.O_RDWR
    assert errname(lambda: os.close(os.open(theirs / "d", flags, 0o600))) == "ok"
    assert (
        errname(lambda: os.close(os.open(ours / "d", flags, 0o600)))
        == errno.errorcode[errno.EOPNOTSUPP]
    )


def test_user_overlay_xattrs_are_refused_on_a_trusted_mount(twin) -> None:
    """A documented difference: unionfs reads opaque and whiteout markers of both overlay
    namespaces in every layer (for layers from rootless tools), so it refuses to store
    user.overlay.* through a trusted-mode mount, where the kernel stores it as a plain xattr."""
    ours, theirs, u, _ = twin
    assert errname(lambda: os.setxattr(theirs / "d", "user.overlay.opaque", b"y")) == "ok"
    assert errname(lambda: os.setxattr(ours / "d", "user.overlay.opaque", b"y")) == "EPERM"
    upper_d = u.upper / "d"
    assert not upper_d.exists() or "user.overlay.opaque" not in os.listxattr(upper_d)


def test_listing_drops_a_stale_impure_mark_as_the_kernel(twin) -> None:
    """A pure upper directory is marked impure when a file with an origin moves in; listing
    it keeps the mark while such an entry is there and drops it once none is (the kernel's
    readdir: ``ovl_cache_get_impure``)."""
    ours, theirs, u, kupper = twin

    def impure(upper: Path) -> bool:
        return "trusted.overlay.impure" in os.listxattr(upper / "pure")

    states = []
    for m, upper in ((theirs, kupper), (ours, u.upper)):
        os.mkdir(m / "pure")
        os.rename(m / "d" / "a", m / "pure" / "a")
        os.listdir(m / "pure")
        kept = impure(upper)
        os.unlink(m / "pure" / "a")
        stale = impure(upper)
        os.listdir(m / "pure")
        states.append((kept, stale, impure(upper)))
    assert states[0] == (True, True, False)  # the oracle
    assert states[1] == states[0]
    assert not diff_upper(upper_snapshot(kupper), upper_snapshot(u.upper))
