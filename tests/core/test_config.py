"""Option parsing and layer-set validation, without mounting."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from unionfs import config
from unionfs.errors import UnionfsError, UsageError


def test_split_lowerdir_escapes_colons() -> None:
    assert config.split_lowerdir(r"/a:/b\:c:/d") == ["/a", "/b:c", "/d"]
    assert config.split_lowerdir("/a::/b") == ["/a", "/b"]


def test_unknown_options_are_warned_and_ignored() -> None:
    cfg = config.MountConfig(lowers=[], mountpoint="/m")
    new, warnings = config.apply_options(
        cfg, ["lowerdir=/a:/b", "rw", "x-systemd.automount", "frobnicate=1"]
    )
    assert new.lowers == ["/a", "/b"] and cfg.lowers == []  # a new config; cfg is unchanged
    assert warnings == ["unknown argument ignored: frobnicate=1"]


def test_fsync_and_timeout_options() -> None:
    cfg = config.MountConfig(lowers=[], mountpoint="/m")
    cfg, _ = config.apply_options(cfg, ["fsync=0", "timeout=2.5"])
    assert not cfg.fsync and cfg.timeout == 2.5
    with pytest.raises(UsageError):
        config.apply_options(cfg, ["timeout=abc"])


def test_readahead_option() -> None:
    cfg = config.MountConfig(lowers=[], mountpoint="/m")
    assert cfg.readahead_kb == config.DEFAULT_READAHEAD_KB
    cfg, _ = config.apply_options(cfg, ["readahead=0"])
    assert cfg.readahead_kb == 0
    for bad in ("readahead=-1", "readahead=1M", "readahead"):
        with pytest.raises(UsageError, match="expected a size in KiB"):
            config.apply_options(cfg, [bad])


def test_busy_poll_option() -> None:
    cfg = config.MountConfig(lowers=[], mountpoint="/m")
    assert cfg.busy_poll_us == config.DEFAULT_BUSY_POLL_US > 0
    cfg, _ = config.apply_options(cfg, ["busy_poll=0"])
    assert cfg.busy_poll_us == 0
    cfg, _ = config.apply_options(cfg, [f"busy_poll={config.MAX_BUSY_POLL_US}"])
    assert cfg.busy_poll_us == config.MAX_BUSY_POLL_US
    for bad in (
        "busy_poll=-1",
        "busy_poll=5us",
        "busy_poll",
        f"busy_poll={config.MAX_BUSY_POLL_US + 1}",
    ):
        with pytest.raises(UsageError, match="expected microseconds"):
            config.apply_options(cfg, [bad])


def _cfg(tmp: Path, lowers: list[str], upper: str | None = None, work: str | None = None):
    mnt = tmp / "mnt"
    mnt.mkdir(exist_ok=True)
    return config.MountConfig(lowers=lowers, mountpoint=str(mnt), upper=upper, workdir=work)


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing", "does not exist"),
        ("file", "is not a directory"),
        ("twice", "given twice"),
        ("nested", "is inside"),
        ("upper_in_lower", "is inside"),
        ("work_is_upper", "same directory"),
        ("no_workdir", "must be given together"),
    ],
)
def test_bad_layer_sets(tmp_path: Path, case: str, message: str) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (tmp_path / "f").write_text("x")
    u, w = tmp_path / "u", tmp_path / "w"
    u.mkdir()
    w.mkdir()
    cases = {
        "missing": ([str(tmp_path / "nope")], None, None),
        "file": ([str(tmp_path / "f")], None, None),
        "twice": ([str(a), str(b), str(a)], None, None),
        "nested": ([str(a), str(b)], None, None),
        "upper_in_lower": ([str(a)], str(a / "up"), str(w)),
        "work_is_upper": ([str(a)], str(u), str(u)),
        "no_workdir": ([str(a)], str(u), None),
    }
    lowers, upper, work = cases[case]
    if case == "nested":
        (a / "inner").mkdir()
        lowers = [str(a), str(a / "inner")]
    if case == "upper_in_lower":
        (a / "up").mkdir()
    cfg = _cfg(tmp_path, lowers, upper, work)
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(UnionfsError, match=message):
        config.validate(cfg)
    assert sorted(os.listdir(tmp_path)) == before


def test_mountpoint_checks(tmp_path: Path) -> None:
    a = tmp_path / "a"
    a.mkdir()
    (a / "inside").mkdir()
    cfg = config.MountConfig(lowers=[str(a)], mountpoint=str(tmp_path / "missing"))
    with pytest.raises(UnionfsError, match="does not exist"):
        config.validate(cfg)
    full = tmp_path / "full"
    full.mkdir()
    (full / "x").write_text("x")
    with pytest.raises(UnionfsError, match="not empty"):
        config.validate(config.MountConfig(lowers=[str(a)], mountpoint=str(full)))
    with pytest.raises(UnionfsError, match="inside lowerdir"):
        config.validate(config.MountConfig(lowers=[str(a)], mountpoint=str(a / "inside")))


def _open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def test_overlap_check_scales_to_thousands(tmp_path: Path) -> None:
    """2,000 real layers validate quickly, each opened once; a nested one is still found."""
    import resource
    import time

    from unionfs.daemon import raise_nofile_limit

    raise_nofile_limit()
    assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] > 5000
    lowers = []
    for i in range(2000):
        (tmp_path / "layers" / str(i)).mkdir(parents=True)
        lowers.append(str(tmp_path / "layers" / str(i)))
    (tmp_path / "m").mkdir()
    before = _open_fds()
    t0 = time.monotonic()
    cfg = config.validate(config.MountConfig(lowers=list(lowers), mountpoint=str(tmp_path / "m")))
    elapsed = time.monotonic() - t0
    try:
        assert len(_open_fds() - before) == 2000  # one descriptor per layer root, no more
        assert elapsed < 2.0, f"validating 2,000 layers took {elapsed:.2f}s"
    finally:
        config.close_dirs(cfg.lowers)  # type: ignore[arg-type]
    assert _open_fds() == before
    (tmp_path / "layers" / "17" / "up").mkdir()
    nested = config.MountConfig(
        lowers=lowers + [lowers[17] + "/up"], mountpoint=str(tmp_path / "m")
    )
    with pytest.raises(UnionfsError, match="is inside lowerdir"):
        config.validate(nested)
    assert _open_fds() == before  # a refused layer set leaves no descriptor open


def test_validated_dirs_carry_their_descriptor(tmp_path: Path) -> None:
    """Each directory is opened once at validation; its descriptor is the stat-ed directory."""
    for n in ("a", "u", "w", "m"):
        (tmp_path / n).mkdir()
    os.symlink(tmp_path / "a", tmp_path / "alink")
    cfg = _cfg(tmp_path, [str(tmp_path / "alink")], str(tmp_path / "u"), str(tmp_path / "w"))
    cfg = config.validate(cfg)
    try:
        low = cfg.lowers[0]
        assert isinstance(low, config.OpenedDir) and low == str(tmp_path / "a")
        st = os.stat(tmp_path / "a")
        assert os.fstat(low.fd)[1:3] == (st.st_ino, st.st_dev)
        fd = low.take()
        with pytest.raises(ValueError, match="already taken"):
            low.take()
        os.close(fd)
    finally:
        config.close_dirs([cfg.upper, cfg.workdir])  # type: ignore[list-item]


def test_kernel_mount_flag_options() -> None:
    """dev/suid/exec and their no- forms are honoured, the last one given winning."""
    cfg = config.MountConfig(lowers=[], mountpoint="/m")
    assert (cfg.dev, cfg.suid, cfg.exec, cfg.acl) == (False, True, True, True)
    cfg, warnings = config.apply_options(cfg, ["dev", "nosuid", "noexec", "noacl"])
    assert (cfg.dev, cfg.suid, cfg.exec, cfg.acl) == (True, False, False, False)
    cfg, more = config.apply_options(cfg, ["nodev", "suid", "exec", "nodev"])
    assert (cfg.dev, cfg.suid, cfg.exec) == (False, True, True)
    assert warnings == more == []


def test_fuse_options_follow_the_flags() -> None:
    from unionfs.daemon import fuse_options

    cfg = config.MountConfig(lowers=["/a"], mountpoint="/m")
    opts = fuse_options(cfg)
    assert {"nodev", "suid", "allow_other", "default_permissions"} <= opts
    assert not opts & {"dev", "nosuid", "noexec"}
    cfg, _ = config.apply_options(cfg, ["dev", "nosuid", "noexec", "noallow_other"])
    opts = fuse_options(cfg)
    assert {"dev", "nosuid", "noexec"} <= opts
    assert not opts & {"nodev", "suid", "allow_other"}


# -- fuse-overlayfs's owner options (issue 12) -------------------------------------------


def _opts(*options: str) -> config.MountConfig:
    cfg, warnings = config.apply_options(config.MountConfig(lowers=[], mountpoint="/m"), options)
    assert warnings == []
    return cfg


def test_uidmapping_ranges_as_fuse_overlayfs_reads_them() -> None:
    # STORED:SHOWN:LENGTH triples separated by ':' (fuse-overlayfs's read_mappings).
    cfg = _opts("uidmapping=0:100000:65536:65536:200000:1000", "gidmapping=100000:0:65536")
    assert cfg.uid_ranges == ((0, 100000, 65536), (65536, 200000, 1000))
    assert cfg.gid_ranges == ((100000, 0, 65536),)
    idmap = cfg.idmap
    assert idmap is not None
    assert [idmap.uid_shown(u) for u in (0, 5, 65535, 65536, 66535, 66536)] == [
        100000,
        100005,
        165535,
        200000,
        200999,
        idmap.overflow_uid,
    ]
    assert idmap.uid_stored(200010) == 65546 and idmap.gid_stored(1000) == 101000
    with pytest.raises(OSError) as info:
        idmap.uid_stored(5)
    assert info.value.errno == 22  # EINVAL: an id the mapping does not show


def test_uidmapping_leading_colon_form_of_containers_storage() -> None:
    # containers-storage appends ":C:H:N" per range; empty fields are skipped as strtok does.
    cfg = _opts("uidmapping=:0:1:65536", "gidmapping=:0:1:1:1:100000:65535")
    assert cfg.uid_ranges == ((0, 1, 65536),)
    assert cfg.gid_ranges == ((0, 1, 1), (1, 100000, 65535))


@pytest.mark.parametrize(
    "bad",
    [
        "uidmapping=0:100000",
        "uidmapping=",
        "uidmapping=a:b:c",
        "gidmapping=0:1:2:3",
        "gidmapping=0:-1:5",
        "uidmapping=0:0:0",
        "uidmapping=4294967295:0:2",
        "squash_to_uid=",
        "squash_to_uid=root",
        "squash_to_gid=-1",
    ],
)
def test_malformed_owner_options_are_one_line_usage_errors(bad: str) -> None:
    with pytest.raises(UsageError) as info:
        _opts(bad)
    assert "\n" not in str(info.value) and bad.split("=")[0] in str(info.value)


def test_squash_options_and_no_mapping_by_default() -> None:
    assert _opts().idmap is None  # no mapping: the adapter does no id work
    root = _opts("squash_to_root").idmap
    assert root is not None and (root.uid_shown(1234), root.gid_shown(99)) == (0, 0)
    both = _opts("squash_to_root", "squash_to_uid=7").idmap
    assert both is not None and (both.uid_shown(1), both.gid_shown(1)) == (7, 0)
    gid = _opts("squash_to_gid=8").idmap
    assert gid is not None and (gid.uid_shown(1), gid.gid_shown(1)) == (1, 8)


def test_static_nlink_volatile_noacl_and_empty_options() -> None:
    cfg = _opts("static_nlink", "volatile", "noacl", "", "lowerdir=/a")
    assert cfg.static_nlink and not cfg.fsync and not cfg.acl and cfg.lowers == ["/a"]
    # podman's "lowerdir=..,,upperdir=.." : the splitter drops the empty option.
    from unionfs.cli.args import split_options

    assert split_options("lowerdir=/a,,upperdir=/u,,workdir=/w") == [
        "lowerdir=/a",
        "upperdir=/u",
        "workdir=/w",
    ]


def test_acl_and_capability_ids_are_mapped_both_ways() -> None:
    import struct

    from unionfs.idmap import IdMap

    idmap = IdMap.of(((100000, 0, 65536),), ((100000, 0, 65536),), False, None, None)
    assert idmap is not None
    # user_obj, user 101000, group 100005, mask, other
    entries = [(0x01, 6, 0xFFFFFFFF), (0x02, 4, 101000), (0x08, 5, 100005), (0x10, 7, 0)]
    acl = struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *e) for e in entries)
    shown = idmap.xattr_shown(b"system.posix_acl_access", acl)
    ids = [struct.unpack_from("<HHI", shown, 4 + 8 * i)[2] for i in range(4)]
    assert ids == [0xFFFFFFFF, 1000, 5, 0]
    assert idmap.xattr_stored(b"system.posix_acl_default", shown) == acl
    unmapped = struct.pack("<I", 2) + struct.pack("<HHI", 0x02, 4, 7)
    shown_unmapped = idmap.xattr_shown(b"system.posix_acl_access", unmapped)
    assert struct.unpack_from("<HHI", shown_unmapped, 4)[2] == idmap.overflow_uid
    # security.capability v3: magic, 2 x (permitted, inheritable), rootid
    cap = struct.pack("<IIIIII", 0x03000000, 1 << 10, 0, 0, 0, 100000)
    assert idmap.xattr_shown(b"security.capability", cap)[20:] == struct.pack("<I", 0)
    assert idmap.xattr_stored(b"security.capability", cap[:20] + struct.pack("<I", 0)) == cap
    v2 = cap[:20]
    assert idmap.xattr_shown(b"security.capability", v2) == v2
    with pytest.raises(OSError):
        idmap.xattr_stored(b"security.capability", cap)  # shown rootid 100000: not mapped
    assert idmap.xattr_shown(b"user.x", b"\x02\x00") == b"\x02\x00"
