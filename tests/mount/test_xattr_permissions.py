"""``xattr_permissions=1|2``: owner and mode kept in an xattr of the upper object.

Compared with the real fuse-overlayfs (Debian 12's 1.10) given the same option on copies of the
same layers: the same owners and modes shown, the same xattr values written in the upper.
1.10 has bugs fixed later (1.14: a chmod records owner 0:0 whatever the owner was; the umask
is ignored for new files; mknod fails); those steps are checked against what the later
versions do, not compared.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import Union, write
from tests.mount.test_unprivileged import UNIONFS, USER, as_user, fuse_for_users  # noqa: F401

pytestmark = pytest.mark.mount

PRIV = "security.fuseoverlayfs.override_stat"
USERX = "user.fuseoverlayfs.override_stat"
CONTAINERS = "user.containers.override_stat"


def shown(mnt: Path, *names: str) -> dict[str, tuple[int, int, str]]:
    out = {}
    for n in names:
        st = os.lstat(mnt / n)
        out[n] = (st.st_uid, st.st_gid, oct(st.st_mode))
    return out


def shown_to_user(mnt: Path, *names: str) -> dict[str, tuple[int, int, str]]:
    """:func:`shown`, asked by the user (a mount without allow_other serves its owner only)."""
    out = as_user("stat", "-c", "%u %g %f", *(str(mnt / n) for n in names))
    assert out.returncode == 0, out.stderr
    lines = out.stdout.split("\n")
    found = {}
    for n, line in zip(names, lines, strict=False):
        uid, gid, mode = line.split()
        found[n] = (int(uid), int(gid), oct(int(mode, 16)))
    return found


def recorded(upper: Path, name: str, *paths: str) -> dict[str, bytes | None]:
    out: dict[str, bytes | None] = {}
    for p in paths:
        try:
            out[p] = os.getxattr(upper / p, name, follow_symlinks=False)
        except OSError:
            out[p] = None
    return out


def make_layers(base: Path, owner: int | None = None) -> Path:
    for n in ("lower", "upper", "work", "mnt"):
        (base / n).mkdir(parents=True)
    write(base / "lower" / "f", "f data", mode=0o640)
    write(base / "lower" / "d" / "g", "g data")
    os.chmod(base / "lower" / "d", 0o755)
    if owner is None:
        os.chown(base / "lower" / "f", 5, 6)
    else:
        for dirpath, dirnames, filenames in os.walk(base):
            for n in (dirpath, *(os.path.join(dirpath, x) for x in dirnames + filenames)):
                os.chown(n, owner, owner)
    return base


def layer_opts(base: Path, level: int) -> str:
    return (
        f"lowerdir={base / 'lower'},upperdir={base / 'upper'},workdir={base / 'work'},"
        f"xattr_permissions={level}"
    )


@pytest.fixture
def twins(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """Two copies of the same layers: one for fuse-overlayfs, one for unionfs."""
    pair = (tmp_path / "fo", tmp_path / "un")
    try:
        yield pair
    finally:
        for b in pair:
            subprocess.run(["fusermount3", "-u", "-z", str(b / "mnt")], capture_output=True)


def run_root(base: Path, prog: str, level: int, script: str) -> None:
    opts = layer_opts(base, level)
    mnt = str(base / "mnt")
    argv = ["fuse-overlayfs", "-o", opts, mnt] if prog == "fo" else [UNIONFS, "-o", opts, mnt]
    made = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    assert made.returncode == 0, made.stderr
    try:
        done = subprocess.run(["sh", "-ec", script], cwd=mnt, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
    finally:
        subprocess.run(["fusermount3", "-u", mnt], check=True, timeout=30)


def test_root_chown_and_chmod_are_recorded_as_fuse_overlayfs_records_them(twins) -> None:
    script = "chown 7:8 f; chmod 600 d; mkdir nd; chmod 711 nd; chown 9:9 d/g"
    for base in twins:
        make_layers(base)
        run_root(base, base.name, 1, script)
    fo, un = twins
    names = (".", "f", "d", "nd", "d/g")
    assert recorded(un / "upper", PRIV, *names) == recorded(fo / "upper", PRIV, *names)
    assert recorded(un / "upper", PRIV, "f")["f"] == b"7:8:100640"
    # The inode keeps its owner: the chown went to the xattr only.
    assert (os.lstat(un / "upper" / "f").st_uid, os.lstat(un / "upper" / "f").st_gid) == (0, 0)
    views = []
    for base in twins:
        opts = f"lowerdir={base / 'upper'}:{base / 'lower'}"
        made = subprocess.run([UNIONFS, "-o", opts, str(base / "mnt")], capture_output=True)
        assert made.returncode == 0, made.stderr
        try:
            views.append(shown(base / "mnt", ".", *names[1:]))
        finally:
            subprocess.run(["fusermount3", "-u", str(base / "mnt")], check=True)
    # Both uppers read back (by unionfs, the upper now a lower) to the same owners and modes.
    assert views[0] == views[1]
    assert views[1]["f"] == (7, 8, oct(stat.S_IFREG | 0o640))
    assert views[1]["d"] == (0, 0, oct(stat.S_IFDIR | 0o600))


@pytest.fixture
def user_twins() -> Iterator[tuple[Path, Path]]:
    """Like :func:`twins`, in a directory the user can reach."""
    root = Path(tempfile.mkdtemp(prefix="xperm", dir="/tmp"))
    os.chmod(root, 0o755)
    pair = (root / "fo", root / "un")
    try:
        yield pair
    finally:
        for b in pair:
            subprocess.run(["fusermount3", "-u", "-z", str(b / "mnt")], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.usefixtures("fuse_for_users")
def test_a_user_records_modes_as_fuse_overlayfs_and_keeps_the_owner(user_twins) -> None:
    twins = user_twins
    script = "chmod 604 f; chmod 700 d; mkdir nd; chmod 711 nd"
    results = []
    for base in twins:
        make_layers(base, owner=USER)
        os.chmod(base, 0o755)
        mnt = str(base / "mnt")
        opts = layer_opts(base, 2)
        if base.name == "fo":
            made = as_user("fuse-overlayfs", "-o", opts, mnt)
        else:
            made = as_user(UNIONFS, "-o", opts, mnt)
        assert made.returncode == 0, made.stderr
        try:
            done = as_user("sh", "-ec", f"cd {mnt}; {script}")
            assert done.returncode == 0, done.stderr
            results.append(shown_to_user(base / "mnt", ".", "f", "d", "nd"))
        finally:
            assert as_user("fusermount3", "-u", mnt).returncode == 0
    fo, un = results
    assert {n: v[2] for n, v in un.items()} == {n: v[2] for n, v in fo.items()}
    assert un["."][:2] == fo["."][:2] == (USER, USER)
    # fuse-overlayfs 1.10 records 0:0 on a chmod (fixed in 1.14); the owner stays the user's.
    assert un["f"] == (USER, USER, oct(stat.S_IFREG | 0o604))
    fo_x = recorded(twins[0] / "upper", USERX, ".", "f", "d", "nd")
    un_x = recorded(twins[1] / "upper", USERX, ".", "f", "d", "nd")
    assert un_x["."] == fo_x["."] == b"%d:%d:40755" % (USER, USER)
    for n in ("f", "d", "nd"):
        assert un_x[n] is not None and fo_x[n] is not None
        assert un_x[n].split(b":")[2] == fo_x[n].split(b":")[2]
    # The upper inodes keep modes the daemon can use; what is shown is in the xattr.
    assert stat.S_IMODE(os.lstat(twins[1] / "upper" / "d").st_mode) & 0o700 == 0o700


def test_layers_written_by_containers_storage_show_their_recorded_owners(union) -> None:
    u: Union = union(1)
    low = u.lowers[0]
    os.setxattr(low, CONTAINERS, b"0:0:0755")
    write(low / "f", "data", mode=0o600)
    os.setxattr(low / "f", CONTAINERS, b"5:6:0640")
    write(low / "dev", "", mode=0o600)
    os.setxattr(low / "dev", CONTAINERS, b"0:0:0620:char-4-1")
    write(low / "plain", "p", mode=0o644)
    os.makedirs(low / "d")
    os.setxattr(low / "d", CONTAINERS, b"7:7:0700")
    with u.mount("uidmapping=0:100:10", "gidmapping=0:100:10") as mnt:
        m = Path(mnt)
        assert shown(m, "f")["f"] == (105, 106, oct(stat.S_IFREG | 0o640))
        assert shown(m, "d")["d"] == (107, 107, oct(stat.S_IFDIR | 0o700))
        dev = os.lstat(m / "dev")
        assert stat.S_ISCHR(dev.st_mode) and dev.st_rdev == os.makedev(4, 1)
        assert (dev.st_uid, stat.S_IMODE(dev.st_mode)) == (100, 0o620)
        assert shown(m, "plain")["plain"][:2] == (100, 100)
        listed = {e.name: e.stat(follow_symlinks=False) for e in os.scandir(m)}
        assert (listed["f"].st_uid, listed["f"].st_gid) == (105, 106)
        assert stat.S_ISCHR(listed["dev"].st_mode)
        assert CONTAINERS not in os.listxattr(m / "f")
        with pytest.raises(OSError) as info:
            os.getxattr(m / "f", CONTAINERS)
        assert info.value.errno == errno.ENODATA
        # A copy-up without the option gives the copy the owner and mode that were shown.
        with open(m / "f", "a") as f:
            f.write("more")
        assert shown(m, "f")["f"] == (105, 106, oct(stat.S_IFREG | 0o640))
    st = os.lstat(u.upper / "f")
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (5, 6, 0o640)


def test_with_the_option_a_copy_up_and_a_chown_record_mapped_ids(union) -> None:
    u: Union = union(1)
    low = u.lowers[0]
    os.setxattr(low, CONTAINERS, b"0:0:0755")
    write(low / "f", "data", mode=0o600)
    os.setxattr(low / "f", CONTAINERS, b"5:6:0640")
    opts = ("uidmapping=0:100:10", "gidmapping=0:100:10", "xattr_permissions=2")
    with u.mount(*opts) as mnt:
        m = Path(mnt)
        with open(m / "f", "a") as f:
            f.write("more")
        assert os.getxattr(u.upper / "f", USERX) == b"5:6:100640"
        os.chown(m / "f", 107, 108)
        assert shown(m, "f")["f"] == (107, 108, oct(stat.S_IFREG | 0o640))
        assert os.getxattr(u.upper / "f", USERX) == b"7:8:100640"
        os.chmod(m / "f", 0o4711)
        assert shown(m, "f")["f"] == (107, 108, oct(stat.S_IFREG | 0o4711))
    # The upper root took the lower root's recorded owner and mode.
    assert os.getxattr(u.upper, USERX) == b"0:0:0755"
    assert stat.S_IMODE(os.lstat(u.upper / "f").st_mode) & 0o7000 == 0


def test_a_device_made_with_the_option_is_a_regular_file_that_names_it(union) -> None:
    u: Union = union(1)
    with u.mount("xattr_permissions=1") as mnt:
        m = Path(mnt)
        os.umask(0o022)
        os.mknod(m / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
        st = os.lstat(m / "null")
        assert stat.S_ISCHR(st.st_mode) and st.st_rdev == os.makedev(1, 3)
        assert stat.S_IMODE(st.st_mode) == 0o644
        os.mkfifo(m / "fifo")
        assert stat.S_ISFIFO(os.lstat(m / "fifo").st_mode)
    assert stat.S_ISREG(os.lstat(u.upper / "null").st_mode)
    assert os.getxattr(u.upper / "null", PRIV) == b"0:0:0644:char-1-3"


def test_override_names_are_hidden_and_refused_through_the_mount(union) -> None:
    u: Union = union(1)
    write(u.lowers[0] / "f", "x")
    with u.mount("xattr_permissions=1") as mnt:
        m = Path(mnt)
        os.chown(m / "f", 3, 3)
        assert os.getxattr(u.upper / "f", PRIV) == b"3:3:100644"
        for name in (PRIV, USERX, CONTAINERS):
            assert name not in os.listxattr(m / "f")
            with pytest.raises(OSError) as info:
                os.setxattr(m / "f", name, b"0:0:777")
            assert info.value.errno == errno.EPERM
        assert shown(m, "f")["f"][:2] == (3, 3)


def test_a_bad_xattr_permissions_value_is_a_one_line_error(tmp_path: Path) -> None:
    base = make_layers(tmp_path / "b")
    out = subprocess.run(
        [UNIONFS, "-o", layer_opts(base, 3), str(base / "mnt")], capture_output=True, text=True
    )
    assert out.returncode != 0
    assert out.stderr.strip().count("\n") == 0 and "xattr_permissions=3" in out.stderr
    assert not os.path.ismount(base / "mnt")
    shutil.rmtree(base)
