"""Mounting as root inside a user namespace (FUSE mounts there are allowed since Linux 4.18).

Two namespaces, both made by the test: ``unshare --user --map-root-user --mount`` (only the
caller's id is mapped, to root) and one with a subordinate range, laid out as rootless podman
lays its namespace out -- namespace root is the caller, ids 1..65535 are host ids
100001..165535 (the maps are written by the test as newuidmap would write them). The daemon
runs as the namespace's root, without fusermount3: it mounts /dev/fuse itself, in the mount
namespace it owns.

In a user namespace ``trusted.*`` xattrs are refused, so opaque directories and origins are
written in ``user.overlay.*``; the upper then mounts under the kernel's overlayfs with
``userxattr`` (allowed in a user namespace) to the same view.
"""

from __future__ import annotations

import os
import stat
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import write
from tests.mount.test_unprivileged import UNIONFS

pytestmark = pytest.mark.mount

# Namespace id k (1 <= k < 65536) is host id SUBID + k; namespace root is host root.
SUBID = 100000
SUBID_MAP = f"0 0 1\n1 {SUBID + 1} 65535\n"


def userns(script: str, ranges: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``sh -ec script`` as root of a new user namespace (with its own mount namespace).

    Without ``ranges`` the namespace maps the caller to root (``--map-root-user``); with them,
    ``ranges`` is written to its uid_map and gid_map before the script starts."""
    env = {"PATH": "/usr/bin:/bin:/usr/sbin:/sbin", "LANG": "C.UTF-8", "U": UNIONFS}
    # The suite's private state directory (tests/conftest.py): namespace root is host root,
    # so it may write there. Left to the default, the daemon's records and logs went to the
    # host's /tmp/unionfs-0, where nothing removed them.
    env["UNIONFS_STATE_DIR"] = os.environ["UNIONFS_STATE_DIR"]
    if ranges is None:
        argv = ["unshare", "--user", "--map-root-user", "--mount", "sh", "-ec", script]
        return subprocess.run(argv, capture_output=True, text=True, env=env, timeout=60)
    proc = subprocess.Popen(
        ["unshare", "--user", "--mount", "sh", "-c", 'read go && exec sh -ec "$1"', "sh", script],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        own = os.readlink("/proc/self/ns/user")
        deadline = time.monotonic() + 10
        while os.readlink(f"/proc/{proc.pid}/ns/user") == own:
            assert time.monotonic() < deadline, "unshare did not make a user namespace"
            time.sleep(0.005)
        for name in ("uid_map", "gid_map"):
            with open(f"/proc/{proc.pid}/{name}", "w") as f:
                f.write(ranges)
        out, err = proc.communicate("go\n", timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def layers(base: Path) -> dict[str, Path]:
    d = {n: base / n for n in ("lower", "upper", "work", "mnt", "kwork")}
    for p in d.values():
        p.mkdir(parents=True)
    return d


def mount_cmd(d: dict[str, Path], *opts: str) -> str:
    """Mount the layers of ``d``; the mount is undone when the script ends however it ends
    (the daemon would otherwise live on in the namespace, holding it)."""
    o = ",".join((f"lowerdir={d['lower']},upperdir={d['upper']},workdir={d['work']}", *opts))
    undo = f'cd /; "$U" umount {d["mnt"]} 2>/dev/null || true'
    return f"trap '{undo}' EXIT; \"$U\" -o {o} {d['mnt']}"


VIEW = "find . | sort; cat keep dd/n; stat -c '%n %u:%g %a %F' keep dd dd/n"


def test_whiteouts_opaque_dirs_and_copy_up_match_the_kernels_userxattr_overlay(
    tmp_path: Path,
) -> None:
    d = layers(tmp_path)
    write(d["lower"] / "keep", "kept\n", mode=0o600)  # owned by root: the namespace's root
    write(d["lower"] / "gone", "g")
    write(d["lower"] / "dd" / "a", "a")
    write(d["lower"] / "dd" / "sub" / "b", "b")
    kernel = f"lowerdir={d['lower']},upperdir={d['upper']},workdir={d['kwork']},userxattr"
    out = userns(
        f"""
        {mount_cmd(d)}
        cd {d["mnt"]}
        echo more >> keep; rm gone; rm -r dd; mkdir dd; echo n > dd/n
        {{ {VIEW}; }} > {tmp_path}/unionfs.view
        cd /; "$U" umount {d["mnt"]}
        mount -t overlay overlay -o {kernel} {d["mnt"]}
        cd {d["mnt"]}; {{ {VIEW}; }} > {tmp_path}/kernel.view
        cd /; umount {d["mnt"]}
        """
    )
    assert out.returncode == 0, out.stderr
    view = (tmp_path / "unionfs.view").read_text()
    assert view == (tmp_path / "kernel.view").read_text()
    assert "./gone" not in view and "./dd/a" not in view and "kept\nmore\nn\n" in view
    assert "keep 0:0 600 regular file" in view
    up = d["upper"]
    assert os.getxattr(up / "dd", "user.overlay.opaque") == b"y"
    assert not [n for n in os.listxattr(up / "dd") if n.startswith("trusted.")]
    assert "user.overlay.origin" in os.listxattr(up / "keep")
    gone = os.lstat(up / "gone")  # a whiteout device needs no privilege since Linux 5.8
    assert stat.S_ISCHR(gone.st_mode) and gone.st_rdev == 0
    st = os.lstat(up / "keep")
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (0, 0, 0o600)


def test_owners_are_mapped_both_ways_in_a_namespace_with_a_subordinate_range(
    tmp_path: Path,
) -> None:
    d = layers(tmp_path)
    for n in ("upper", "work", "mnt", "kwork"):
        os.chown(d[n], 0, 0)
    write(d["lower"] / "f", "f")
    os.chown(d["lower"] / "f", SUBID + 6, SUBID + 7)  # namespace ids 6:7
    write(d["lower"] / "g", "g")
    os.chown(d["lower"] / "g", SUBID + 1, SUBID + 1)  # namespace 1: shown as 0
    opts = ("uidmapping=1:0:100", "gidmapping=1:0:100")  # stored 1..100 shown as 0..99
    out = userns(
        f"""
        {mount_cmd(d, *opts)}
        cd {d["mnt"]}
        stat -c '%n %u:%g' f g
        chown 7:8 f
        touch new; mkdir newdir
        stat -c '%n %u:%g' f new newdir
        if chown 150 g 2>/dev/null; then echo "unmapped chown accepted"; fi
        cd /; "$U" umount {d["mnt"]}
        """,
        SUBID_MAP,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[:5] == ["f 5:6", "g 0:0", "f 7:8", "new 0:0", "newdir 0:0"]
    assert "unmapped chown accepted" not in out.stdout
    # On the host: shown 7:8 is stored 8:9, namespace ids 8:9 are host SUBID+8:SUBID+9.
    st = os.lstat(d["upper"] / "f")
    assert (st.st_uid, st.st_gid) == (SUBID + 8, SUBID + 9)
    for n in ("new", "newdir"):
        st = os.lstat(d["upper"] / n)
        assert (st.st_uid, st.st_gid) == (SUBID + 1, SUBID + 1)
    assert not (d["upper"] / "g").exists()  # the refused chown copied nothing up


def one_line_failure(out: subprocess.CompletedProcess[str]) -> str:
    assert out.returncode != 0
    assert "Traceback" not in out.stderr
    lines = [x for x in out.stderr.splitlines() if x.strip()]
    assert len(lines) == 1, out.stderr
    return lines[0]


def test_what_a_user_namespace_forbids_is_a_one_line_error(tmp_path: Path) -> None:
    d = layers(tmp_path)
    write(d["lower"] / "f", "f")
    dev = one_line_failure(userns(mount_cmd(d, "dev")))
    assert "dev" in dev and "user namespace" in dev
    xattr = one_line_failure(userns(mount_cmd(d, "xattr_permissions=1")))
    assert "security.fuseoverlayfs.override_stat" in xattr and "not permitted" in xattr
    # mknod of a device through the mount: refused by the kernel before the daemon is asked.
    out = userns(
        f"""
        {mount_cmd(d)}
        if mknod {d["mnt"]}/null c 1 3 2>/dev/null; then echo made; fi
        "$U" umount {d["mnt"]}
        """
    )
    assert out.returncode == 0, out.stderr
    assert "made" not in out.stdout
    # A lower the namespace cannot read: owned by a host id it does not map.
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    os.chown(private, 5, 5)
    for n in ("upper", "work"):
        os.chown(d[n], 0, 0)
    out = userns(f'"$U" -o lowerdir={private}:{d["lower"]} {d["mnt"]}', SUBID_MAP)
    line = one_line_failure(out)
    assert str(private) in line and "Permission denied" in line
    assert not os.path.ismount(d["mnt"])


def test_xattr_permissions_records_mapped_owners_in_a_user_namespace(tmp_path: Path) -> None:
    d = layers(tmp_path)
    write(d["lower"] / "f", "f", mode=0o644)
    os.chown(d["lower"] / "f", SUBID + 6, SUBID + 7)
    opts = ("uidmapping=1:0:100", "gidmapping=1:0:100", "xattr_permissions=2")
    out = userns(
        f"""
        {mount_cmd(d, *opts)}
        cd {d["mnt"]}
        chown 7:8 f; chmod 600 f; mkdir nd
        stat -c '%n %u:%g %a' f nd
        cd /; "$U" umount {d["mnt"]}
        """,
        SUBID_MAP,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[:2] == ["f 7:8 600", "nd 0:0 755"]
    # Recorded as stored (namespace ids 8:9, 1:1); the inodes keep the namespace root's owner.
    assert os.getxattr(d["upper"] / "f", "user.fuseoverlayfs.override_stat") == b"8:9:100600"
    assert os.getxattr(d["upper"] / "nd", "user.fuseoverlayfs.override_stat") == b"1:1:40755"
    assert os.lstat(d["upper"] / "f").st_uid == 0
    assert os.getxattr(d["upper"], "user.fuseoverlayfs.override_stat").startswith(b"0:0:")


def test_where_the_daemon_may_not_chown_xattr_permissions_records_the_owner(
    tmp_path: Path,
) -> None:
    """Only namespace root is mapped, and the layers store root as 5 (``uidmapping=5:0:1``,
    the owners recorded by containers-storage's ``ignore_chown_errors``): the owner of what
    root makes cannot be given to an inode (5 has no id here), nor can the upper's root be
    made root's. With the option the owners are recorded in the xattr and all works."""
    d = layers(tmp_path)
    os.setxattr(d["lower"], "user.containers.override_stat", b"5:5:0755")
    write(d["lower"] / "f", "f")
    os.setxattr(d["lower"] / "f", "user.containers.override_stat", b"5:5:0644")
    opts = ("uidmapping=5:0:1", "gidmapping=5:0:1")
    # Without it the upper's root shows its stored owner, 0, which the mapping does not show
    # (the overflow id): the kernel lets nobody write a directory of an unmapped owner.
    refused = userns(
        f"""
        {mount_cmd(d, *opts)}
        stat -c '%u' {d["mnt"]}
        touch {d["mnt"]}/x 2>&1 || true
        """
    )
    assert refused.returncode == 0, refused.stderr
    assert refused.stdout.split("\n")[0] == "65534" and "Permission denied" in refused.stdout
    out = userns(
        f"""
        {mount_cmd(d, *opts, "xattr_permissions=2")}
        cd {d["mnt"]}
        touch new; chmod 600 f; mkdir nd
        stat -c '%n %u:%g %a' . new f nd
        """
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[:4] == [". 0:0 755", "new 0:0 644", "f 0:0 600", "nd 0:0 755"]
    for n in ("new", "f", "nd"):
        value = os.getxattr(d["upper"] / n, "user.fuseoverlayfs.override_stat")
        assert value.startswith(b"5:5:"), (n, value)
        assert os.lstat(d["upper"] / n).st_uid == 0  # the inode stays the daemon's
