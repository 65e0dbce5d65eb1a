"""Copy-up origin in the kernel's format (issue 10, "The upper must stay in the kernel's format").

unionfs and the kernel's overlayfs (``index=off``, ``xino=off``) mount the *same* lower
directory, each with its own upper, on one filesystem (samefs): a copy-up through either must
store the same ``trusted.overlay.origin`` bytes (a file handle of the lower object), both must
show the lower object's inode number after the copy-up, unionfs again after a remount, and the
kernel must read unionfs's upper the same way and see no unionfs-private xattr.

unionfs numbers an object ``(fsid << 48) | st_ino`` (:meth:`LayerStack.natural_ino`), the
kernel shows the bare ``st_ino``: the low 48 bits are compared.
"""

from __future__ import annotations

import errno
import os
import resource
import shutil
import stat
import struct
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import Union, write
from tests.oracle.backends import KernelOverlay
from unionfs.api import mounted
from unionfs.daemon import read_state
from unionfs.layers import INO_BITS, INO_MASK

pytestmark = [pytest.mark.mount, pytest.mark.kernel]

# name -> what copies it up (through a mount path)
COPY_UP: dict[str, Callable[[Path], None]] = {
    "f": lambda p: os.chmod(p, 0o600),
    "s": lambda p: os.chown(p, 1, 1, follow_symlinks=False),
    "p": lambda p: os.chmod(p, 0o600),
    "d": lambda p: os.chmod(p, 0o700),
    "d/inner": lambda p: os.utime(p, (1, 1)),
    "h1": lambda p: os.chmod(p, 0o600),
}
NAMES = ["f", "s", "p", "d", "d/inner", "h1", "h2"]


def build(lower: Path) -> None:
    write(lower / "f", "file")
    os.symlink("f", lower / "s")
    os.mkfifo(lower / "p")
    write(lower / "d" / "inner", "inner")
    write(lower / "h1", "linked")
    os.link(lower / "h1", lower / "h2")
    write(lower / "plain", "never copied up")


def xattrs(path: Path) -> dict[str, bytes]:
    """Every xattr stored on ``path`` (never followed), in every namespace."""
    return {
        n: os.getxattr(path, n, follow_symlinks=False)
        for n in os.listxattr(path, follow_symlinks=False)
    }


def inos(mnt: Path) -> dict[str, int]:
    return {n: os.lstat(mnt / n).st_ino for n in NAMES}


@pytest.fixture
def pair(union: Callable[[int], Union], tmp_path: Path) -> Iterator[tuple[Union, Path]]:
    """A unionfs stack whose lower the kernel's mount shares (own upper/work under ``k``)."""
    u = union(1)
    build(u.lowers[0])
    k = tmp_path / "k"
    for sub in ("upper", "work", "mnt"):
        (k / sub).mkdir(parents=True)
    yield u, k


def kernel(u: Union, k: Path, upper: Path | None = None):  # type: ignore[no-untyped-def]
    return KernelOverlay().mount([u.lowers[0]], upper or k / "upper", k / "work", k / "mnt")


def test_copy_up_writes_the_kernels_origin_and_keeps_st_ino(pair) -> None:
    u, k = pair
    lower = u.lowers[0]
    lower_ino = {n: os.lstat(lower / n).st_ino for n in NAMES}
    with u.mount() as ours_s, kernel(u, k) as theirs:
        ours = Path(ours_s)
        before_ours, before_k = inos(ours), inos(theirs)
        for name, op in COPY_UP.items():
            op(ours / name)
            op(theirs / name)
        after_ours, after_k = inos(ours), inos(theirs)
    # The kernel shows the lower object's number before and after the copy-up, except for a
    # broken lower hard link, which becomes its own inode.
    for n in NAMES:
        assert before_k[n] == lower_ino[n], n
        assert before_ours[n] & INO_MASK == lower_ino[n], n
    for n in ("f", "s", "p", "d", "d/inner", "h2"):
        assert after_k[n] == lower_ino[n], n
        assert after_ours[n] == before_ours[n], n
    assert after_k["h1"] == os.lstat(k / "upper" / "h1").st_ino
    assert after_ours["h1"] & INO_MASK == os.lstat(u.upper / "h1").st_ino

    # The same bytes in both uppers: same handle of the same lower object, same header.
    for n in COPY_UP:
        mine, theirs_x = xattrs(u.upper / n), xattrs(k / "upper" / n)
        assert mine == theirs_x, n
    assert set(xattrs(u.upper / "f")) == {"trusted.overlay.origin"}
    assert "trusted.overlay.origin" not in xattrs(u.upper / "h1")  # as the kernel: no origin
    raw = xattrs(u.upper / "f")["trusted.overlay.origin"]
    assert raw[:2] == b"\x00\xfb" and raw[2] == len(raw)

    # A remount shows the same numbers (the handle is decoded again).
    with u.mount() as again:
        assert inos(Path(again)) == after_ours


def test_the_kernel_reads_our_upper_and_sees_nothing_private(pair) -> None:
    u, k = pair
    with u.mount() as ours_s:
        ours = Path(ours_s)
        for name, op in COPY_UP.items():
            op(ours / name)
        shown = inos(ours)
    upper_names = [p for p in u.upper.rglob("*")]
    assert upper_names
    for p in upper_names:
        assert not [x for x in os.listxattr(p, follow_symlinks=False) if "unionfs" in x], p
    with kernel(u, k, upper=u.upper) as theirs:
        k_inos = inos(theirs)
        for n in NAMES:
            assert os.listxattr(theirs / n, follow_symlinks=False) == [], n
    for n in NAMES:
        assert k_inos[n] == shown[n] & INO_MASK, n


def test_an_upper_with_the_old_unionfs_origin_still_mounts_and_hides_it(pair) -> None:
    u, _ = pair
    lower = u.lowers[0]
    # What unionfs wrote before: the 8-byte number shown before the copy-up.
    old = (1 << INO_BITS) | os.lstat(lower / "f").st_ino
    shutil.copy2(lower / "f", u.upper / "f")
    os.setxattr(u.upper / "f", "trusted.unionfs.origin", struct.pack("<Q", old))
    os.setxattr(u.upper / "f", "user.keep", b"1")
    with u.mount() as ours_s:
        ours = Path(ours_s)
        assert os.lstat(ours / "f").st_ino == old
        assert os.listxattr(ours / "f") == ["user.keep"]
        with pytest.raises(OSError) as exc:
            os.getxattr(ours / "f", "trusted.unionfs.origin")
        assert exc.value.errno == errno.ENODATA
        with pytest.raises(OSError) as exc:
            os.setxattr(ours / "f", "trusted.unionfs.origin", b"x")
        assert exc.value.errno == errno.EPERM
        # A new copy-up writes only the kernel's xattr.
        os.chmod(ours / "plain", 0o600)
    assert set(xattrs(u.upper / "plain")) == {"trusted.overlay.origin"}


def test_userxattr_mode_writes_user_overlay_origin(pair) -> None:
    u, k = pair
    with u.mount("userxattr") as ours_s:
        ours = Path(ours_s)
        before = os.lstat(ours / "f").st_ino
        os.chmod(ours / "f", 0o600)
        os.chmod(ours / "p", 0o600)
        assert os.lstat(ours / "f").st_ino == before
    theirs = k / "mnt"
    opts = f"lowerdir={u.lowers[0]},upperdir={k / 'upper'},workdir={k / 'work'},userxattr"
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o", opts, theirs], check=True)
    try:
        os.chmod(theirs / "f", 0o600)
        os.chmod(theirs / "p", 0o600)
    finally:
        subprocess.run(["umount", theirs], check=True)
    for n in ("f", "p"):
        assert xattrs(u.upper / n) == xattrs(k / "upper" / n), n
    assert set(xattrs(u.upper / "f")) == {"user.overlay.origin"}
    # user.* xattrs exist only on regular files and directories: a fifo gets no origin, from
    # the kernel either.
    assert xattrs(u.upper / "p") == {}
    with u.mount("userxattr") as again:
        assert os.lstat(Path(again) / "f").st_ino == before


def test_a_merged_directory_shows_its_lower_number_a_pure_upper_one_its_own(pair) -> None:
    u, k = pair
    (u.upper / "d").mkdir()  # merged with the lower d, never copied up: no origin
    (u.upper / "new").mkdir()
    (k / "upper" / "d").mkdir()
    (k / "upper" / "new").mkdir()
    with u.mount() as ours_s, kernel(u, k) as theirs:
        ours = Path(ours_s)
        assert os.lstat(theirs / "d").st_ino == os.lstat(u.lowers[0] / "d").st_ino
        assert os.lstat(ours / "d").st_ino & INO_MASK == os.lstat(u.lowers[0] / "d").st_ino
        assert os.lstat(theirs / "new").st_ino == os.lstat(k / "upper" / "new").st_ino
        assert os.lstat(ours / "new").st_ino & INO_MASK == os.lstat(u.upper / "new").st_ino
        assert stat.S_ISDIR(os.lstat(ours / "d").st_mode)


def test_without_cap_dac_read_search_a_copy_shows_its_own_number(pair) -> None:
    """Decoding a handle needs CAP_DAC_READ_SEARCH: a daemon without it falls back to the
    upper object's own number (the kernel, unable to follow an origin, does the same)."""
    u, _ = pair
    with u.mount() as ours_s:
        os.chmod(Path(ours_s) / "f", 0o600)
    assert "trusted.overlay.origin" in xattrs(u.upper / "f")
    opts = f"lowerdir={u.lowers[0]},upperdir={u.upper},workdir={u.work}"
    cmd = [sys.executable, "-m", "unionfs", "mount", "--log-file", str(u.root / "daemon.log")]
    subprocess.run(
        ["setpriv", "--bounding-set=-dac_read_search", "--", *cmd, "-o", opts, str(u.mnt)],
        check=True,
    )
    try:
        assert os.lstat(u.mnt / "f").st_ino & INO_MASK == os.lstat(u.upper / "f").st_ino
        assert (u.mnt / "f").read_text() == "file"
        assert os.lstat(u.mnt / "d").st_ino & INO_MASK == os.lstat(u.lowers[0] / "d").st_ino
    finally:
        subprocess.run(["fusermount3", "-u", str(u.mnt)], check=True)


def test_a_lower_on_another_filesystem_carries_its_uuid(
    union: Callable[[int], Union], tmp_path: Path
) -> None:
    """A tmpfs lower under an ext4 upper: the handle holds the tmpfs's s_uuid (read with
    FS_IOC_GETFSUUID), byte-identical to the kernel's; both keep the lower's number."""
    u = union(1)
    tmpfs = tmp_path / "tmpfs"
    tmpfs.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", tmpfs], check=True)
    try:
        lower = tmpfs / "l"
        write(lower / "f", "on tmpfs")
        write(lower / "d" / "g", "in a directory")
        k = tmp_path / "k"
        for sub in ("upper", "work", "mnt"):
            (k / sub).mkdir(parents=True)
        # Union.mount uses u.lowers: point it at the tmpfs lower.
        u.lowers = [lower]
        with (
            u.mount() as ours_s,
            KernelOverlay().mount([lower], k / "upper", k / "work", k / "mnt") as theirs,
        ):
            ours = Path(ours_s)
            before = os.lstat(ours / "f").st_ino
            for m in (ours, theirs):
                os.chmod(m / "f", 0o600)
                os.chmod(m / "d" / "g", 0o600)
            assert os.lstat(ours / "f").st_ino == before
            assert os.lstat(theirs / "f").st_ino == os.lstat(lower / "f").st_ino
        assert before & INO_MASK == os.lstat(lower / "f").st_ino
        for n in ("f", "d", "d/g"):
            assert xattrs(u.upper / n) == xattrs(k / "upper" / n), n
        raw = xattrs(u.upper / "f")["trusted.overlay.origin"]
        assert raw[5:21] != bytes(16)  # tmpfs has a (random) uuid
        with u.mount() as again:
            assert os.lstat(Path(again) / "f").st_ino == before
    finally:
        subprocess.run(["umount", "-l", tmpfs], check=True)


def test_a_decode_that_fails_for_want_of_descriptors_is_not_remembered(pair) -> None:
    """The daemon cannot open the origin (no descriptor left): the lookup fails with that
    error, as the kernel's does when decoding fails for a reason other than a stale handle,
    and nothing is remembered: once descriptors are free, the file shows its origin's
    number. (Taken as "no origin", the file showed its upper inode's number, and kept it
    after the kernel forgot the entry.)"""
    u, _ = pair
    with u.mount() as m:
        os.chmod(Path(m) / "f", 0o600)
        shown = os.lstat(Path(m) / "f").st_ino
    assert shown & INO_MASK == os.lstat(u.lowers[0] / "f").st_ino
    assert shown & INO_MASK != os.lstat(u.upper / "f").st_ino
    with u.mount() as m:
        # The root's names are read (a negative lookup: a listing would look "f" up too,
        # through readdirplus), so that the only descriptor f's lookup needs is its origin's.
        assert not os.path.lexists(Path(m) / "nothing")
        pid = int(read_state(m)["pid"])  # type: ignore[index]
        soft, hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (len(os.listdir(f"/proc/{pid}/fd")), hard))
        try:
            with pytest.raises(OSError) as failed:
                os.lstat(Path(m) / "f")
            assert failed.value.errno in (errno.EMFILE, errno.ENFILE)
        finally:
            resource.prlimit(pid, resource.RLIMIT_NOFILE, (soft, hard))
        assert os.lstat(Path(m) / "f").st_ino == shown
        # Once the kernel forgets the entry, a new lookup still shows the origin's number.
        Path("/proc/sys/vm/drop_caches").write_text("2")
        assert os.lstat(Path(m) / "f").st_ino == shown


@pytest.fixture
def coarse_fs(tmp_path: Path) -> Iterator[Path]:
    """An ext4 with 128-byte inodes: timestamps in whole seconds, so an inode number freed
    and given to a new file within one second comes back with the same ctime."""
    img, root = tmp_path / "img", tmp_path / "coarse"
    root.mkdir()
    with open(img, "wb") as f:
        f.truncate(64 << 20)
    subprocess.run(
        ["mkfs.ext4", "-q", "-F", "-I", "128", str(img)], check=True, capture_output=True
    )
    subprocess.run(["mount", "-o", "loop", str(img), str(root)], check=True)
    try:
        yield root
    finally:
        subprocess.run(["umount", "-l", str(root)], check=False)


def _reuse_numbers(mnt: Path, upper: Path, rounds: int) -> list[tuple[int, int, int, int]]:
    """Per round: copy up ``f<i>`` (chmod), remove it (unlink, or every other round a new
    file renamed over it), create ``g<i>``, make the kernel forget ``g<i>``, look it up
    again. (number f showed, g's upper inode, number g shows, f's upper inode)."""
    out = []
    for i in range(rounds):
        f, g = mnt / f"f{i}", mnt / f"g{i}"
        os.chmod(f, 0o600)
        f_shown = os.lstat(f).st_ino
        f_upper = os.lstat(upper / f"f{i}").st_ino
        if i % 2:
            (mnt / f"x{i}").touch()
            os.rename(mnt / f"x{i}", f)
        else:
            os.unlink(f)
        g.touch()
        g_upper = os.lstat(upper / f"g{i}").st_ino
        Path("/proc/sys/vm/drop_caches").write_text("2")
        out.append((f_shown, g_upper, os.lstat(g).st_ino, f_upper))
    return out


def test_a_new_file_on_a_reused_inode_shows_its_own_number(union, coarse_fs: Path) -> None:
    """A copied-up file is removed and a new one created in the same second gets its inode
    number, with the same (whole-second) ctime. The new file has no origin: it shows its
    own number, as in the kernel. (With the decoded origin remembered by number and ctime
    alone, it showed the removed file's origin: a lower file's number, so two different
    files could show one number, which tar and rsync take for hard links.)"""
    rounds = 8
    results = {}
    for name in ("unionfs", "kernel"):
        base = coarse_fs / name
        lower, upper, work, mnt = (base / d for d in ("lower", "upper", "work", "mnt"))
        for d in (lower, upper, work, mnt):
            d.mkdir(parents=True)
        for i in range(rounds):
            write(lower / f"f{i}", "lower")
        if name == "unionfs":
            cm = mounted([str(lower)], str(mnt), str(upper), str(work), ())
        else:
            cm = KernelOverlay().mount([lower], upper, work, mnt)
        with cm:
            results[name] = _reuse_numbers(mnt, upper, rounds)
    reused = 0
    for (f_shown, g_upper, g_shown, f_upper), (_, k_g_upper, k_g_shown, _) in zip(
        results["unionfs"], results["kernel"], strict=True
    ):
        assert k_g_shown == k_g_upper  # the kernel: the new file's own number
        assert g_shown & INO_MASK == g_upper, (hex(f_shown), hex(g_shown))
        reused += g_upper == f_upper
    # The case is real only where numbers were reused (ext4 hands the freed one out again).
    assert reused >= 2, "inode numbers were not reused: the test did not test anything"
