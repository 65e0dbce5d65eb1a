"""Forged copy-up origins (issue 13 item 9): nothing read from a layer may name a live inode.

An upper is prepared by hand with origin xattrs that unionfs never writes: the root's number in
the old ``trusted.unionfs.origin`` form, garbage, truncated handles, handles with flags the
kernel refuses, handles of a directory on a file, of a file on a directory and on a symlink, of
the layer root, of a file outside the layers (on the lowers' filesystem and on another one), of
another visible lower file and of another upper file. The mount must keep working: no EIO, the
root stays the root, every name reads its own content, every directory lists its own entries;
an origin that does not validate gives the object its own number. Where the kernel's overlayfs
(``index=off``, ``xino=off``) answers for the same upper, unionfs shows the same number.
"""

from __future__ import annotations

import os
import stat
import struct
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import Union, write
from tests.oracle.backends import copy_tree
from unionfs import format
from unionfs.fs.nodes import ROOT_INO
from unionfs.layers import INO_MASK

pytestmark = [pytest.mark.mount, pytest.mark.kernel]

ATTR = "trusted.overlay.origin"


def handle(dir_fd: int, name: bytes) -> bytes:
    value = format.encode_origin(dir_fd, name)
    assert value is not None
    return value


def forge(u: Union, tmp_path: Path) -> dict[str, str]:
    """Fill the upper; returns name -> what ``st_ino`` must be ("own", "lower:<name>", ...)."""
    lower, upper = u.lowers[0], u.upper
    write(lower / "b", "lower b")
    write(lower / "d" / "in", "in d")
    write(lower / "dd" / "in", "in dd")
    outside = write(tmp_path / "outside", "outside the layers")
    expect: dict[str, str] = {}
    lfd = os.open(lower, os.O_RDONLY | os.O_DIRECTORY)
    ofd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        b = handle(lfd, b"b")
        d = handle(lfd, b"d")
        root = handle(lfd, b".")
        out = handle(ofd, b"outside")

        def file(name: str, value: bytes, attr: str = ATTR, want: str = "own") -> None:
            write(upper / name, f"upper {name}")
            os.setxattr(upper / name, attr, value)
            expect[name] = want

        def directory(name: str, value: bytes, attr: str = ATTR, want: str = "own") -> None:
            (upper / name).mkdir()
            write(upper / name / "mine", name)
            os.setxattr(upper / name, attr, value)
            expect[name] = want

        file("old_root", struct.pack("<Q", ROOT_INO), "trusted.unionfs.origin")
        directory("old_root_dir", struct.pack("<Q", ROOT_INO), "trusted.unionfs.origin")
        file("old_garbage", b"\xff" * 8, "trusted.unionfs.origin")
        file("old_short", b"\x01\x00", "trusted.unionfs.origin")
        file("garbage", b"\x00\xfb" + os.urandom(40))
        file("empty", b"")
        file("truncated", b[:-3])
        file("bad_len", b[:2] + bytes([b[2] + 4]) + b[3:])
        file("bad_magic", b[:1] + b"\xfa" + b[2:])
        file("bad_version", b"\x07" + b[1:])
        file("unknown_flag", b[:3] + b"\x80" + b[4:])
        # Only a hint for the kernel's index: decoded anyway, as the kernel does.
        path_upper = b[:3] + bytes([format.OVL_FH_FLAG_PATH_UPPER]) + b[4:]
        file("path_upper", path_upper, want="lower:b")
        file("big_endian", b[:3] + bytes([format.OVL_FH_FLAG_BIG_ENDIAN]) + b[4:])
        file("bad_uuid", b[:5] + b"\x42" * 16 + b[21:])
        file("dir_on_file", d)
        file("root_on_file", root)
        directory("file_on_dir", b)
        directory("root_on_dir", root)
        directory("dd", b)  # merged with the lower dd: shows the lower dd's number
        expect["dd"] = "lower:dd"
        directory("dir_on_dir", d)  # a pure upper directory: its own number, as the kernel
        os.symlink("b", upper / "sym")
        os.setxattr(upper / "sym", ATTR, b, follow_symlinks=False)
        expect["sym"] = "own"
        os.mkfifo(upper / "fifo")
        os.setxattr(upper / "fifo", ATTR, b)
        expect["fifo"] = "own"
        # Valid handles of another file: the number is that file's, as in the kernel; the
        # object stays itself.
        file("b_twin", b, want="lower:b")
        file("outside_same_fs", out, want="outside")
        write(upper / "c", "upper c")
        ufd = os.open(upper, os.O_RDONLY | os.O_DIRECTORY)
        try:
            file("c_twin", handle(ufd, b"c"), want="upper:c")
        finally:
            os.close(ufd)
        expect["c"] = "own"
    finally:
        os.close(lfd)
        os.close(ofd)
    # A file on another filesystem (its own uuid): no lower layer decodes it.
    tmpfs = tmp_path / "tmpfs"
    tmpfs.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", tmpfs], check=True)
    try:
        write(tmpfs / "x", "x")
        tfd = os.open(tmpfs, os.O_RDONLY | os.O_DIRECTORY)
        try:
            file("other_fs", handle(tfd, b"x"))
        finally:
            os.close(tfd)
    finally:
        subprocess.run(["umount", tmpfs], check=True)
    assert outside.exists()
    return expect


def number(u: Union, tmp_path: Path, want: str, name: str) -> int:
    """The bare inode number ``want`` names for the upper object ``name``."""
    kind, _, other = want.partition(":")
    if kind == "own":
        return os.lstat(u.upper / name).st_ino
    if kind == "lower":
        return os.lstat(u.lowers[0] / other).st_ino
    if kind == "upper":
        return os.lstat(u.upper / other).st_ino
    assert kind == "outside"
    return os.lstat(tmp_path / "outside").st_ino


def check_view(m: Path, expect: dict[str, str]) -> dict[str, int]:
    """Everything works and every object is itself; returns the st_ino of each name."""
    assert os.lstat(m).st_ino == ROOT_INO
    assert set(expect) | {"b", "d"} <= set(os.listdir(m))
    inos = {}
    for name in sorted(expect):
        st = os.lstat(m / name)  # never EIO
        inos[name] = st.st_ino
        if stat.S_ISDIR(st.st_mode):
            want = ["in", "mine"] if name == "dd" else ["mine"]
            assert sorted(os.listdir(m / name)) == want, name
        elif stat.S_ISREG(st.st_mode):
            want_text = "upper c" if name == "c" else f"upper {name}"
            assert (m / name).read_text() == want_text, name
        elif stat.S_ISLNK(st.st_mode):
            assert os.readlink(m / name) == "b"
    assert os.lstat(m).st_ino == ROOT_INO
    assert os.listdir(m / "d") == ["in"]
    assert (m / "d" / "in").read_text() == "in d"
    assert (m / "b").read_text() == "lower b"
    return inos


def test_forged_origins_never_break_the_mount(
    union: Callable[[int], Union], tmp_path: Path
) -> None:
    u = union(1)
    expect = forge(u, tmp_path)
    with u.mount() as mnt_s:
        mnt = Path(mnt_s)
        inos = check_view(mnt, expect)
        # Writes go to the object looked up, never to the one its origin names.
        with open(mnt / "b_twin", "a") as f:
            f.write(" more")
        assert (mnt / "b").read_text() == "lower b"
        assert (mnt / "b_twin").read_text() == "upper b_twin more"
        with open(mnt / "b", "a") as f:
            f.write(" written")
        assert (u.upper / "b").read_text() == "lower b written"
        assert (mnt / "b_twin").read_text() == "upper b_twin more"
        os.mkdir(mnt / "dir_on_dir" / "sub")
        assert sorted(os.listdir(mnt / "d")) == ["in"]
        assert sorted(os.listdir(mnt / "dir_on_dir")) == ["mine", "sub"]
        assert os.lstat(mnt).st_ino == ROOT_INO
    for name, want in expect.items():
        assert inos[name] & INO_MASK == number(u, tmp_path, want, name), (name, want)
    assert "Traceback" not in u.log()


def test_the_kernel_agrees_where_it_answers(union: Callable[[int], Union], tmp_path: Path) -> None:
    """The same forged upper under the kernel: every number it shows, unionfs shows too."""
    u = union(1)
    expect = forge(u, tmp_path)
    k = tmp_path / "k"
    (k / "work").mkdir(parents=True)
    (k / "mnt").mkdir()
    copy_tree(u.upper, k / "upper")  # cp -a: trusted.* xattrs kept
    with u.mount() as mnt_s:
        ours = {n: os.lstat(Path(mnt_s) / n).st_ino for n in expect}
    data = (
        f"lowerdir={u.lowers[0]},upperdir={k / 'upper'},workdir={k / 'work'},"
        "index=off,xino=off,redirect_dir=off,metacopy=off"
    )
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o", data, k / "mnt"], check=True)
    theirs: dict[str, int | str] = {}
    try:
        for n in expect:
            try:
                theirs[n] = os.lstat(k / "mnt" / n).st_ino
            except OSError as exc:
                theirs[n] = os.strerror(exc.errno or 0)
    finally:
        subprocess.run(["umount", k / "mnt"], check=True)
    compared = 0
    for n, kino in theirs.items():
        if isinstance(kino, str):
            continue  # the kernel refuses some (ESTALE for a wrong-type origin): we fall back
        if expect[n].startswith("upper:") or n == "c":
            continue  # our copy of the upper has other inode numbers
        compared += 1
        mine = ours[n] & INO_MASK
        if expect[n] == "own":
            assert kino == os.lstat(k / "upper" / n).st_ino, n
            assert mine == os.lstat(u.upper / n).st_ino, n
        else:
            assert mine == kino, (n, expect[n])
    assert compared >= 20
