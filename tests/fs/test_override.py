"""The override_stat values (unionfs.fs.override): fuse-overlayfs's three fields and the
extended form containers-storage writes, read and written back."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from unionfs.fs.override import Recorded, apply, encode, parse


def test_values_are_read_in_both_forms() -> None:
    assert parse(b"7:8:100640") == Recorded(7, 8, 0o640)  # fuse-overlayfs: whole st_mode
    assert parse(b"0:0:555") == Recorded(0, 0, 0o555)
    assert parse(b"1000:1011:0644:file") == Recorded(1000, 1011, 0o644, stat.S_IFREG)
    assert parse(b"5:6:4755:dir") == Recorded(5, 6, 0o4755, stat.S_IFDIR)
    assert parse(b"0:0:0600:char-10-11") == Recorded(0, 0, 0o600, stat.S_IFCHR, os.makedev(10, 11))
    assert parse(b"0:0:0660:block-8-0") == Recorded(0, 0, 0o660, stat.S_IFBLK, os.makedev(8, 0))
    for bad in (b"", b"1:2", b"a:b:c", b"1:2:9", b"1:2:0644:disk", b"1:2:0644:char-1", b"-1:0:0"):
        assert parse(bad) is None, bad


def test_values_written_round_trip() -> None:
    for st_mode, rdev, want in (
        (stat.S_IFREG | 0o604, 0, b"7:8:100604"),
        (stat.S_IFDIR | 0o2775, 0, b"7:8:42775"),
        (stat.S_IFCHR | 0o620, os.makedev(4, 1), b"7:8:0620:char-4-1"),
        (stat.S_IFBLK | 0o600, os.makedev(8, 16), b"7:8:0600:block-8-16"),
    ):
        value = encode(7, 8, st_mode, rdev)
        assert value == want
        rec = parse(value)
        assert rec is not None and (rec.uid, rec.gid, rec.perm) == (7, 8, stat.S_IMODE(st_mode))


def test_a_regular_file_stands_for_the_device_it_names(tmp_path: Path) -> None:
    f = tmp_path / "f"
    f.write_bytes(b"")
    st = os.lstat(f)
    dev = apply(st, Recorded(3, 4, 0o620, stat.S_IFCHR, os.makedev(4, 1)))
    assert stat.S_ISCHR(dev.st_mode) and dev.st_rdev == os.makedev(4, 1)
    assert (dev.st_uid, dev.st_gid, stat.S_IMODE(dev.st_mode)) == (3, 4, 0o620)
    assert (dev.st_ino, dev.st_size, dev.st_mtime_ns) == (st.st_ino, st.st_size, st.st_mtime_ns)
    # A directory never becomes a device, nor a file a symlink: the type is the object's.
    d = os.lstat(tmp_path)
    assert stat.S_ISDIR(apply(d, Recorded(0, 0, 0o700, stat.S_IFCHR, 5)).st_mode)
    assert stat.S_ISREG(apply(st, Recorded(0, 0, 0o777, stat.S_IFLNK)).st_mode)
