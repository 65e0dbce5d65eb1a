"""fuse-overlayfs's owner options on a real mount: uidmapping/gidmapping, squash_*, static_nlink.

The ranges read as fuse-overlayfs reads them (``read_mappings``/``find_mapping`` in its main.c):
``STORED:SHOWN:LENGTH``, the first number the id in the layers, the second the id the mount
shows. So ``uidmapping=100000:0:65536`` shows a layer file owned by 100000 as root, and root's
new files are stored as 100000 -- the layout of a container image unpacked for a user namespace
whose root is host uid 100000.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import Union, write
from tests.security._mount_common import world_root
from unionfs.api import mounted

pytestmark = pytest.mark.mount

MAP = ("uidmapping=100000:0:65536", "gidmapping=100000:0:65536")
OVERFLOW = int(Path("/proc/sys/kernel/overflowuid").read_text())


def owned(path: Path, uid: int, gid: int | None = None, data: str = "x") -> Path:
    write(path, data)
    os.chown(path, uid, uid if gid is None else gid)
    return path


def owners(mnt: str, *names: str) -> list[tuple[int, int]]:
    out = []
    for n in names:
        st = os.lstat(os.path.join(mnt, n))
        out.append((st.st_uid, st.st_gid))
    return out


def test_layer_owners_are_shown_mapped(union) -> None:
    u: Union = union(1)
    for name, ident in (("a", 100000), ("b", 101000), ("c", 0), ("d", 5)):
        owned(u.lowers[0] / name, ident)
    os.makedirs(u.lowers[0] / "dir")
    os.chown(u.lowers[0] / "dir", 101000, 100005)
    with u.mount(*MAP) as mnt:
        expect = [(0, 0), (1000, 1000), (OVERFLOW, OVERFLOW), (OVERFLOW, OVERFLOW)]
        assert owners(mnt, "a", "b", "c", "d") == expect
        # readdir(plus) replies go through the same mapping as lookup and getattr
        listed = {e.name: (e.stat().st_uid, e.stat().st_gid) for e in os.scandir(mnt)}
        assert [listed[n] for n in "abcd"] == expect
        assert listed["dir"] == (1000, 5)


def test_root_mount_dir_unmapped_is_overflow(union) -> None:
    u: Union = union(1)
    os.chown(u.upper, 0, 0)
    with u.mount(*MAP) as mnt:
        # The root directory comes from the upper, owned by host root: not in the range.
        assert (os.stat(mnt).st_uid, os.stat(mnt).st_gid) == (OVERFLOW, OVERFLOW)


def test_chown_through_the_mount_stores_the_mapped_ids(union) -> None:
    u: Union = union(1)
    owned(u.lowers[0] / "f", 100000)
    with u.mount(*MAP) as mnt:
        os.chown(os.path.join(mnt, "f"), 1000, 1000)
        assert owners(mnt, "f") == [(1000, 1000)]
        st = os.lstat(u.upper / "f")  # copied up with the new owner, as stored
        assert (st.st_uid, st.st_gid) == (101000, 101000)
        assert (u.lowers[0] / "f").stat().st_uid == 100000
        # An id the mapping does not show is refused, and nothing changes.
        with pytest.raises(OSError) as info:
            os.chown(os.path.join(mnt, "f"), 70000, -1)
        assert info.value.errno == errno.EINVAL
        assert os.lstat(u.upper / "f").st_uid == 101000


def test_new_objects_of_root_are_stored_as_the_mapped_root(union) -> None:
    u: Union = union(1)
    os.chown(u.lowers[0], 100000, 100000)
    with u.mount(*MAP) as mnt:
        m = Path(mnt)
        (m / "file").write_text("x")
        (m / "dir").mkdir()
        (m / "link").symlink_to("file")
        os.mkfifo(m / "fifo")
        for name in ("file", "dir", "link", "fifo"):
            st = os.lstat(u.upper / name)
            assert (st.st_uid, st.st_gid) == (100000, 100000), name
            shown = os.lstat(m / name)
            assert (shown.st_uid, shown.st_gid) == (0, 0), name


def test_two_ranges_and_the_man_page_direction(union) -> None:
    u: Union = union(1)
    for name, ident in (("a", 100005), ("b", 200007), ("c", 150000), ("d", 0)):
        owned(u.lowers[0] / name, ident)
    two = "uidmapping=100000:0:1000:200000:1000:1000"
    with u.mount(two, "gidmapping=0:1000:1") as mnt:
        assert [uid for uid, _ in owners(mnt, "a", "b", "c", "d")] == [5, 1007, OVERFLOW, OVERFLOW]
        # gidmapping=0:1000:1 is the man page's example: stored 0 is shown as 1000.
        assert owners(mnt, "d")[0][1] == 1000
        os.chown(os.path.join(mnt, "a"), 1500, 1000)
        st = os.lstat(u.upper / "a")
        assert (st.st_uid, st.st_gid) == (200500, 0)


def test_leading_colon_form_of_containers_storage(union) -> None:
    u: Union = union(1)
    owned(u.lowers[0] / "a", 101000)
    with u.mount("uidmapping=:100000:0:65536", "gidmapping=:100000:0:65536") as mnt:
        assert owners(mnt, "a") == [(1000, 1000)]


def test_squash_to_root_and_to_uid(union) -> None:
    u: Union = union(1)
    owned(u.lowers[0] / "a", 1234, 4321)
    owned(u.lowers[0] / "b", 0, 0)
    with u.mount("squash_to_root") as mnt:
        assert owners(mnt, "a", "b") == [(0, 0), (0, 0)]
        (Path(mnt) / "new").write_text("x")
        assert owners(mnt, "new") == [(0, 0)]
        assert os.lstat(u.upper / "new").st_uid == 0  # no mapping: stored as the caller
    with u.mount("squash_to_uid=7", "squash_to_gid=8") as mnt:
        assert owners(mnt, "a", "b", "new") == [(7, 8)] * 3
    with u.mount("squash_to_uid=7") as mnt:
        assert owners(mnt, "a", "b") == [(7, 4321), (7, 0)]


def test_chown_under_squash_never_fails(union) -> None:
    # fuse-overlayfs's do_fchown: with squashed owners a chown that cannot be stored is
    # dropped without an error (here an id outside the mapping); the rest of the change holds.
    u: Union = union(1)
    owned(u.lowers[0] / "f", 100000)
    os.chmod(u.lowers[0] / "f", 0o644)
    with u.mount("squash_to_root", *MAP) as mnt:
        os.chown(os.path.join(mnt, "f"), 70000, 70000)
        st = os.lstat(u.upper / "f")
        assert (st.st_uid, st.st_gid) == (100000, 100000)
        os.chown(os.path.join(mnt, "f"), 1000, -1)  # mapped: stored
        assert os.lstat(u.upper / "f").st_uid == 101000
        assert owners(mnt, "f") == [(0, 0)]
    with u.mount(*MAP) as mnt:  # without squash the same chown is refused
        with pytest.raises(OSError) as info:
            os.chown(os.path.join(mnt, "f"), 70000, -1)
        assert info.value.errno == errno.EINVAL


def test_static_nlink_shows_one_link_for_directories(union) -> None:
    u: Union = union(1)
    os.makedirs(u.lowers[0] / "d" / "sub1")
    os.makedirs(u.lowers[0] / "d" / "sub2")
    write(u.lowers[0] / "d" / "f")
    with u.mount() as mnt:
        assert os.stat(os.path.join(mnt, "d")).st_nlink == 4
    with u.mount("static_nlink") as mnt:
        assert os.stat(os.path.join(mnt, "d")).st_nlink == 1
        assert os.stat(os.path.join(mnt, "d", "f")).st_nlink == 1


@pytest.mark.skipif(shutil.which("setfacl") is None, reason="needs the acl package")
def test_acl_named_user_is_mapped_both_ways(union) -> None:
    u: Union = union(1)
    f = owned(u.lowers[0] / "f", 100000)
    os.chmod(f, 0o640)
    subprocess.run(["setfacl", "-m", "u:101000:r,g:100005:r", str(f)], check=True)
    with u.mount(*MAP) as mnt:
        shown = subprocess.run(
            ["getfacl", "-cn", os.path.join(mnt, "f")], check=True, capture_output=True, text=True
        ).stdout
        assert "user:1000:r--" in shown and "group:5:r--" in shown, shown
        subprocess.run(["setfacl", "-m", "u:2000:rw", os.path.join(mnt, "f")], check=True)
        stored = subprocess.run(
            ["getfacl", "-cn", str(u.upper / "f")], check=True, capture_output=True, text=True
        ).stdout
        assert "user:102000:rw-" in stored and "user:101000:r--" in stored, stored
        bad = subprocess.run(
            ["setfacl", "-m", "u:70000:r", os.path.join(mnt, "f")], capture_output=True
        )
        assert bad.returncode != 0  # not mapped: EINVAL, the stored ACL is unchanged
        again = subprocess.run(
            ["getfacl", "-cn", str(u.upper / "f")], check=True, capture_output=True, text=True
        ).stdout
        assert again == stored


def test_capability_v3_rootid_is_shown_mapped(union) -> None:
    u: Union = union(1)
    f = owned(u.lowers[0] / "f", 100000)
    # v3 capability (cap_net_bind_service, effective) for the namespace whose root is 100000.
    v3 = (0x03000001).to_bytes(4, "little") + (1 << 10).to_bytes(4, "little") + bytes(12)
    os.setxattr(f, "security.capability", v3 + (100000).to_bytes(4, "little"))
    with u.mount(*MAP) as mnt:
        # The daemon shows rootid 0; the kernel then gives an init-namespace reader the v2
        # form (its root owns the capability). Unmapped, rootid 100000 would come back as v3.
        value = os.getxattr(os.path.join(mnt, "f"), "security.capability")
        assert len(value) == 20 and value[4:8] == (1 << 10).to_bytes(4, "little"), value
    with u.mount() as mnt:
        value = os.getxattr(os.path.join(mnt, "f"), "security.capability")
        assert value[20:] == (100000).to_bytes(4, "little")


@pytest.mark.parametrize("bad", ["uidmapping=0:100000", "gidmapping=x:1:1", "squash_to_uid=a"])
def test_bad_mapping_is_a_usage_error(union, bad: str) -> None:
    u: Union = union(1)
    opts = f"lowerdir={u.lowers[0]},upperdir={u.upper},workdir={u.work},{bad}"
    proc = subprocess.run(
        [sys.executable, "-m", "unionfs", "-o", opts, str(u.mnt)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2, proc
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and bad.split("=")[0] in lines[0], proc.stderr
    assert not os.path.ismount(u.mnt) and os.listdir(u.upper) == []
    assert stat.S_ISDIR(os.lstat(u.mnt).st_mode)


def test_set_gid_rule_compares_mapped_groups() -> None:
    # A write by a caller outside the file's group clears a set-gid bit that has no group
    # execute (the daemon's rule, files.open); membership is judged with the caller's groups
    # mapped to stored ids, so shown group 1000 is a member of stored group 101000.
    with world_root() as root:
        for name in ("lower", "upper", "work", "mnt"):
            (root / name).mkdir()
        for name in ("member", "outsider"):
            f = owned(root / "lower" / name, 100000, 101000)
            os.chmod(f, 0o2666)
        with mounted(
            [str(root / "lower")], str(root / "mnt"), str(root / "upper"), str(root / "work"), MAP
        ) as mnt:
            for name, groups in (("member", "1000"), ("outsider", "3000")):
                proc = subprocess.run(
                    [
                        "setpriv",
                        "--reuid=2000",
                        "--regid=2000",
                        f"--groups={groups}",
                        "sh",
                        "-c",
                        f"echo y >> {mnt}/{name}",
                    ],
                    capture_output=True,
                    text=True,
                    timeout=30,
                )
                assert proc.returncode == 0, proc.stderr
            assert os.lstat(root / "upper" / "member").st_mode & stat.S_ISGID
            assert not os.lstat(root / "upper" / "outsider").st_mode & stat.S_ISGID
