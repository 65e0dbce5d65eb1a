"""``unionfs export`` and ``unionfs diff`` of an upper whose owners and modes live in override
xattrs (``xattr_permissions=1|2``, containers-storage's ``user.containers.override_stat``).

The oracle is the mount: every tar header must carry the owner, group, mode (set-id and sticky
bits included) and type (a device recorded on a regular file included) that ``lstat`` showed
through the unionfs mount that made the changes, the override xattrs must not travel as PAX
records, and the tarball imported again must show the same through the kernel's overlayfs.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import tarfile
import tempfile
from pathlib import Path

import pytest

from layertools.conftest import needs_kernel_overlay, needs_root, overlay_mount
from tests.conftest import Union, write
from tests.mount.test_unprivileged import UNIONFS, USER, as_user, fuse_for_users  # noqa: F401
from unionfs import cli
from unionfs.layertools.changes import compute_changes
from unionfs.layertools.export import export_to_path

pytestmark = [pytest.mark.mount, needs_root]

PRIV = b"security.fuseoverlayfs.override_stat"
CONTAINERS = b"user.containers.override_stat"
USERX = b"user.fuseoverlayfs.override_stat"
# The name each case's mount writes: "2c" is xattr_permissions=2 over an upper whose root
# containers-storage already marked (podman's upper with mount_program).
NAMES = {"1": PRIV, "2": USERX, "2c": CONTAINERS}

Shown = tuple[int, int, int, int]  # uid, gid, st_mode (type and permission bits), rdev

_TAR_TYPES = {
    tarfile.REGTYPE: stat.S_IFREG,
    tarfile.DIRTYPE: stat.S_IFDIR,
    tarfile.SYMTYPE: stat.S_IFLNK,
    tarfile.CHRTYPE: stat.S_IFCHR,
    tarfile.BLKTYPE: stat.S_IFBLK,
    tarfile.FIFOTYPE: stat.S_IFIFO,
}


def shown(st: os.stat_result) -> Shown:
    rdev = st.st_rdev if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode) else 0
    return (st.st_uid, st.st_gid, st.st_mode, rdev)


def from_header(member: tarfile.TarInfo) -> Shown:
    kind = _TAR_TYPES[member.type]
    rdev = (
        os.makedev(member.devmajor, member.devminor)
        if member.isdev() and not member.isfifo()
        else 0
    )
    return (member.uid, member.gid, kind | member.mode, rdev)


def headers(blob: Path) -> dict[str, tarfile.TarInfo]:
    with tarfile.open(blob) as tar:
        return {m.name.rstrip("/") or ".": m for m in tar.getmembers()}


def view(mnt: Path) -> dict[str, Shown]:
    """What ``lstat`` shows for every path of the mount (the root as ``.``)."""
    out = {".": shown(os.lstat(mnt))}
    for dirpath, dirnames, filenames in os.walk(mnt):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            out[str(path.relative_to(mnt))] = shown(os.lstat(path))
    return out


def override_records(member: tarfile.TarInfo) -> list[str]:
    """PAX records of ``member`` that would carry an override xattr (there must be none)."""
    return [k for k in member.pax_headers if "override_stat" in k or "fuseoverlayfs" in k]


def make_lower(lower: Path) -> None:
    write(lower / "f", "f data", mode=0o640)
    os.chown(lower / "f", 5, 6)
    write(lower / "d" / "g", "g data", mode=0o644)
    os.chmod(lower / "d", 0o755)
    write(lower / "gone", "to delete")


def change_through_mount(m: Path) -> None:
    """chown, chmod (set-id and sticky bits too), mknod and the other kinds of entries."""
    old = os.umask(0)
    try:
        os.chown(m / "f", 7, 8)
        os.chmod(m / "f", 0o4750)
        os.chmod(m / "d", 0o700)  # a copied-up directory: the mode goes to the xattr only
        os.chown(m / "d" / "g", 9, 10)
        os.mkdir(m / "nd", 0o755)
        os.chmod(m / "nd", 0o3775)
        os.chown(m / "nd", 11, 12)
        write(m / "nd" / "tool", "#!/bin/sh\n", mode=0o6755)
        os.chown(m / "nd" / "tool", 0, 13)
        os.chmod(m / "nd" / "tool", 0o6711)  # chown cleared the set-id bits: set them again
        os.mknod(m / "null", stat.S_IFCHR | 0o620, os.makedev(1, 3))
        os.chown(m / "null", 0, 5)
        os.mknod(m / "loop", stat.S_IFBLK | 0o660, os.makedev(7, 0))
        os.mkfifo(m / "pipe", 0o640)
        os.symlink("f", m / "link")
        os.chown(m / "link", 14, 15, follow_symlinks=False)
        os.unlink(m / "gone")
    finally:
        os.umask(old)


def mount_and_change(u: Union, case: str) -> dict[str, Shown]:
    """Make the changes through a mount with ``xattr_permissions`` (see :data:`NAMES`); what
    it showed."""
    make_lower(u.lowers[0])
    if case == "2c":
        os.setxattr(u.upper, CONTAINERS, b"0:0:0755:dir")
    with u.mount(f"xattr_permissions={case[0]}") as mnt:
        change_through_mount(Path(mnt))
        return view(Path(mnt))


@pytest.mark.parametrize("case", sorted(NAMES))
def test_headers_carry_what_the_mount_showed(union, tmp_path: Path, case: str) -> None:  # type: ignore[no-untyped-def]
    u: Union = union(1)
    seen = mount_and_change(u, case)
    # The test means something only if the upper inodes differ from what was shown.
    disk = os.lstat(u.upper / "null")
    assert stat.S_ISREG(disk.st_mode) and os.getxattr(u.upper / "null", NAMES[case])
    assert stat.S_IMODE(os.lstat(u.upper / "f").st_mode) & 0o7000 == 0
    assert (os.lstat(u.upper / "f").st_uid, os.lstat(u.upper / "nd").st_uid) == (0, 0)
    assert seen["f"] == (7, 8, stat.S_IFREG | 0o4750, 0)
    assert seen["null"] == (0, 5, stat.S_IFCHR | 0o620, os.makedev(1, 3))

    blob = tmp_path / "layer.tar"
    export_to_path(u.upper, blob, compression="none")
    members = headers(blob)
    exported = {
        name: from_header(m)
        for name, m in members.items()
        if not name.split("/")[-1].startswith(".wh.")
    }
    assert set(exported) == {".", "f", "d", "d/g", "nd", "nd/tool", "null", "loop", "pipe", "link"}
    assert exported == {name: seen[name] for name in exported}
    assert "gone" not in seen and ".wh.gone" in members
    for member in members.values():
        assert override_records(member) == [], member.name


@needs_kernel_overlay
@pytest.mark.kernel
@pytest.mark.parametrize("case", sorted(NAMES))
def test_import_of_the_export_shows_the_same_through_the_kernel(  # type: ignore[no-untyped-def]
    union, tmp_path: Path, case: str, capsys: pytest.CaptureFixture[str]
) -> None:
    u: Union = union(1)
    seen = mount_and_change(u, case)
    blob = tmp_path / "layer.tar"
    assert cli.main(["export", "--upper", str(u.upper), "-o", str(blob)]) == 0
    imported = tmp_path / "imported"
    assert cli.main(["import", "--allow-devices", str(blob), str(imported)]) == 0
    capsys.readouterr()
    # The imported layer holds real devices and owners: no override xattr is left anywhere.
    for dirpath, dirnames, filenames in os.walk(imported):
        for name in [".", *dirnames, *filenames]:
            path = os.path.join(dirpath, name)
            names = os.listxattr(path, follow_symlinks=False)
            assert not [n for n in names if "override_stat" in n], path
    with overlay_mount(tmp_path / "kmnt", [imported, u.lowers[0]]) as kmnt:
        kernel = view(kmnt)
    assert kernel == seen


@pytest.mark.usefixtures("fuse_for_users")
def test_a_rootless_mount_exports_what_its_user_saw(tmp_path: Path) -> None:
    """``xattr_permissions=2`` mounted by a user (no root anywhere): set-id bits the upper
    inode may not carry are kept in the xattr and reach the header."""
    base = Path(tempfile.mkdtemp(prefix="xperm-export", dir="/tmp"))
    try:
        os.chmod(base, 0o755)
        for name in ("lower", "upper", "work", "mnt"):
            (base / name).mkdir()
        write(base / "lower" / "f", "f data", mode=0o644)
        write(base / "lower" / "d" / "g", "g data", mode=0o644)
        for dirpath, dirnames, filenames in os.walk(base):
            for name in [dirpath, *(os.path.join(dirpath, n) for n in dirnames + filenames)]:
                os.chown(name, USER, USER)
        mnt = str(base / "mnt")
        opts = (
            f"lowerdir={base / 'lower'},upperdir={base / 'upper'},workdir={base / 'work'},"
            "xattr_permissions=2"
        )
        made = as_user(UNIONFS, "-o", opts, mnt)
        assert made.returncode == 0, made.stderr
        try:
            script = (
                f"cd {mnt}; chmod 4755 f; chmod 700 d; mkdir nd; chmod 2750 nd; "
                "umask 077; echo x > nd/new; mkfifo nd/pipe; chmod 1604 nd/pipe"
            )
            done = as_user("sh", "-ec", script)
            assert done.returncode == 0, done.stderr
            paths = [".", "f", "d", "nd", "nd/new", "nd/pipe"]
            out = as_user("stat", "-c", "%u %g %f", *(os.path.join(mnt, p) for p in paths))
            assert out.returncode == 0, out.stderr
        finally:
            assert as_user("fusermount3", "-u", mnt).returncode == 0
        seen = {}
        for p, line in zip(paths, out.stdout.splitlines(), strict=True):
            uid, gid, mode = line.split()
            seen[p] = (int(uid), int(gid), int(mode, 16), 0)
        assert seen["f"] == (USER, USER, stat.S_IFREG | 0o4755, 0)
        assert stat.S_IMODE(os.lstat(base / "upper" / "f").st_mode) & 0o7000 == 0
        blob = tmp_path / "layer.tar"
        export_to_path(base / "upper", blob, compression="none")
        members = headers(blob)
        assert {name: from_header(m) for name, m in members.items()} == seen
        for member in members.values():
            assert override_records(member) == [], member.name
    finally:
        subprocess.run(["fusermount3", "-u", "-z", str(base / "mnt")], capture_output=True)
        shutil.rmtree(base, ignore_errors=True)


def hand_made_upper(upper: Path) -> None:
    """An upper read by ``security.fuseoverlayfs.override_stat`` (its root has it), with good,
    malformed and ignored values."""
    upper.mkdir()
    os.setxattr(upper, PRIV, b"0:0:40755")
    os.setxattr(upper, CONTAINERS, b"9:9:0700:dir")  # not the layer's name: ignored
    write(upper / "good", "x", mode=0o600)
    os.setxattr(upper / "good", PRIV, b"3:4:104711")
    write(upper / "garbage", "x", mode=0o644)
    os.chown(upper / "garbage", 21, 22)
    os.setxattr(upper / "garbage", PRIV, b"three:four:0777")
    write(upper / "halfdev", "", mode=0o600)
    os.setxattr(upper / "halfdev", PRIV, b"1:2:0666:char-1")  # no minor
    write(upper / "other", "x", mode=0o640)
    os.setxattr(upper / "other", CONTAINERS, b"5:5:0777:file")  # not the layer's name
    write(upper / "cdev", "", mode=0o600)
    os.setxattr(upper / "cdev", PRIV, b"0:6:0640:char-10-200")  # the extended form
    os.mkdir(upper / "od", 0o750)
    os.setxattr(upper / "od", b"trusted.overlay.opaque", b"y")
    os.setxattr(upper / "od", PRIV, b"1:1:40777:extra:fields")  # reported once, not twice
    os.symlink("good", upper / "link")
    os.setxattr(upper / "link", PRIV, b"8:8:0777", follow_symlinks=False)  # not on a symlink


def test_malformed_values_fall_back_to_the_disk_as_the_mount_does(  # type: ignore[no-untyped-def]
    union, tmp_path: Path
) -> None:
    u: Union = union(1)
    upper = tmp_path / "upper"
    hand_made_upper(upper)
    # The same layer read by a unionfs mount (as its lower): the oracle.
    u.lowers[0].rmdir()
    os.rename(upper, u.lowers[0])
    with u.mount(upper=False) as mnt:
        seen = view(Path(mnt))
    os.rename(u.lowers[0], upper)
    assert seen["good"] == (3, 4, stat.S_IFREG | 0o4711, 0)
    assert seen["garbage"] == (21, 22, stat.S_IFREG | 0o644, 0)
    assert seen["halfdev"][2] == stat.S_IFREG | 0o600
    assert seen["cdev"] == (0, 6, stat.S_IFCHR | 0o640, os.makedev(10, 200))
    assert seen["."][2] == stat.S_IFDIR | 0o755

    blob = tmp_path / "layer.tar"
    out = subprocess.run(
        [
            UNIONFS,
            "export",
            "--upper",
            str(upper),
            "-o",
            str(blob),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    members = headers(blob)
    assert seen["od"] == (0, 0, stat.S_IFDIR | 0o750, 0)
    assert (members["od/.wh..wh..opq"].uid, members["od/.wh..wh..opq"].gid) == (0, 0)
    del members["od/.wh..wh..opq"]
    assert {name: from_header(m) for name, m in members.items()} == seen
    for member in members.values():
        assert override_records(member) == [], member.name
    # One line per value that was ignored, naming the path and the xattr.
    warnings = [line for line in out.stderr.splitlines() if "malformed" in line]
    assert len(warnings) == 3, out.stderr
    assert any("/od:" in w for w in warnings)
    assert any("/garbage" in w and PRIV.decode() in w for w in warnings)
    assert any("/halfdev" in w for w in warnings)


def test_diff_compares_what_the_mounts_show(union, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    u: Union = union(1)
    low = u.lowers[0]
    # A lower written by containers-storage without the right to chown.
    os.setxattr(low, CONTAINERS, b"0:0:0755:dir")
    os.makedirs(low / "kept")
    os.setxattr(low / "kept", CONTAINERS, b"5:6:0555:dir")
    os.makedirs(low / "moded")
    os.setxattr(low / "moded", CONTAINERS, b"5:6:0755:dir")
    os.makedirs(low / "plain")
    os.chmod(low / "plain", 0o755)
    write(low / "plain" / "x", "x")
    with u.mount("xattr_permissions=1") as mnt:
        m = Path(mnt)
        # Each directory copied up: "kept" back to the mode it had, the others changed.
        os.chmod(m / "kept", 0o700)
        os.chmod(m / "kept", 0o555)
        os.chmod(m / "moded", 0o700)
        os.chmod(m / "plain", 0o700)
        before = view(m)
    assert before["kept"][:3] == (5, 6, stat.S_IFDIR | 0o555)
    # On disk the copied-up "kept" differs from the lower (owner and mode), "plain" does not.
    disk_kept = os.lstat(u.upper / "kept")
    assert (disk_kept.st_uid, stat.S_IMODE(disk_kept.st_mode)) != (5, 0o555)
    assert stat.S_IMODE(os.lstat(u.upper / "plain").st_mode) == 0o755
    assert os.lstat(u.upper / "kept").st_mtime_ns == os.lstat(low / "kept").st_mtime_ns
    changes = [str(c) for c in compute_changes(u.upper, [low])]
    assert changes == ["C /moded", "C /plain"]
    # The exported tarball, imported as a plain layer, gives the same change list.
    blob = tmp_path / "layer.tar"
    export_to_path(u.upper, blob, compression="none")
    imported = tmp_path / "imported"
    assert cli.main(["import", str(blob), str(imported)]) == 0
    plain_low = tmp_path / "plain-lower"
    subprocess.run(["cp", "-a", str(low), str(plain_low)], check=True)
    for path in (plain_low, plain_low / "kept", plain_low / "moded"):
        os.removexattr(path, CONTAINERS)
    os.chown(plain_low / "kept", 5, 6)
    os.chmod(plain_low / "kept", 0o555)
    os.chown(plain_low / "moded", 5, 6)
    assert [str(c) for c in compute_changes(imported, [plain_low])] == changes
