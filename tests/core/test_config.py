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
