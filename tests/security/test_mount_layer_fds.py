"""Issue 13 items 4 and 6: layers are the directories validated, held by descriptor and
compared by device and inode.

* After the mount, a layer's parent directory is renamed away and a symlink to another tree
  put in its place: the daemon keeps serving (and writing into) the original layers.
* The workdir swapped for a symlink right after validation: the mount locks and cleans the
  validated workdir, never the symlink's target.
* A bind-mount alias makes two paths name one directory: refused as the kernel refuses it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.security._mount_common import kernel_overlay, make_canary, snapshot
from unionfs import config
from unionfs.api import mounted, unmount
from unionfs.errors import UnionfsError

pytestmark = pytest.mark.mount


def test_layer_parents_swapped_for_symlinks_after_mount(tmp_path: Path) -> None:
    real = tmp_path / "layers"
    for d in ("l0", "l1", "upper", "work"):
        (real / d).mkdir(parents=True)
    (real / "l0" / "top").write_text("top\n")
    (real / "l1" / "deep").write_text("original\n")
    (real / "l1" / "prog").write_text("lower program\n")
    os.chmod(real / "l1" / "prog", 0o755)
    (tmp_path / "mnt").mkdir()
    # The other tree has the same layout: every layer, upper and work, with its own files.
    evil = make_canary(tmp_path)
    for d in ("l0", "l1", "upper", "work"):
        (evil / d).mkdir(exist_ok=True)
    (evil / "l1" / "deep").write_text("attacker's\n")
    (evil / "l1" / "prog").write_text("attacker's program\n")
    before = snapshot(evil)
    lowers = [str(real / "l0"), str(real / "l1")]
    with mounted(lowers, str(tmp_path / "mnt"), str(real / "upper"), str(real / "work")) as m:
        # Before anything below the top layer was looked up: the old lazy open would now
        # resolve "layers/l1" through the symlink.
        os.rename(real, tmp_path / "moved")
        os.symlink(evil, real)
        assert Path(m, "deep").read_text() == "original\n"
        os.chmod(Path(m, "prog"), 0o4755)  # a copy-up, then a setuid file in the upper
        Path(m, "new").write_text("written through the mount\n")
        os.mkdir(Path(m, "dir"))
        os.unlink(Path(m, "top"))  # a whiteout in the upper
        assert sorted(os.listdir(m)) == ["deep", "dir", "new", "prog"]
        assert os.statvfs(m).f_blocks == os.statvfs(tmp_path / "moved").f_blocks
    moved = tmp_path / "moved"
    assert (moved / "upper" / "new").read_text() == "written through the mount\n"
    assert (moved / "upper" / "prog").stat().st_mode & 0o7777 == 0o4755
    assert (moved / "upper" / "dir").is_dir() and os.path.lexists(moved / "upper" / "top")
    assert snapshot(evil) == before


SWAP_AFTER_VALIDATION = textwrap.dedent(
    """
    import os, sys
    from unionfs import config, daemon
    lower, upper, work, mnt, target = sys.argv[1:6]
    cfg = config.MountConfig(lowers=[lower], mountpoint=mnt, upper=upper, workdir=work)
    cfg = config.validate(cfg)
    # Between validation and use: the workdir becomes a symlink to the target.
    os.rename(work, work + ".real")
    os.symlink(target, work)
    sys.exit(daemon.daemonize_and_serve(cfg, None))
    """
)


def test_workdir_swapped_after_validation(tmp_path: Path) -> None:
    for d in ("lower", "upper", "work", "mnt"):
        (tmp_path / d).mkdir()
    (tmp_path / "lower" / "f").write_text("lower\n")
    (tmp_path / "work" / "work").mkdir()
    (tmp_path / "work" / "work" / "leftover").write_text("an interrupted copy-up\n")
    target = make_canary(tmp_path)  # has work/keep, which a clean-up there would delete
    before = snapshot(target)
    args = [str(tmp_path / d) for d in ("lower", "upper", "work", "mnt")] + [str(target)]
    proc = subprocess.run(
        [sys.executable, "-c", SWAP_AFTER_VALIDATION, *args], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    try:
        mnt = tmp_path / "mnt"
        for i in range(20):  # copy-ups go through work/
            Path(mnt, "f").write_text(f"copy {i}\n")
            Path(mnt, f"n{i}").write_text("x")
            os.rename(Path(mnt, f"n{i}"), Path(mnt, f"m{i}"))
    finally:
        unmount(str(tmp_path / "mnt"))
    real_work = tmp_path / "work.real" / "work"
    assert os.listdir(real_work) == []  # the validated workdir was cleaned and used
    assert (tmp_path / "upper" / "f").read_text() == "copy 19\n"
    assert snapshot(target) == before


@pytest.fixture
def alias(tmp_path: Path):
    """tmp_path/real bind-mounted on tmp_path/alias; always unmounted."""
    real, al = tmp_path / "real", tmp_path / "alias"
    for d in ("l", "l/sub", "w", "w2"):
        (real / d).mkdir(parents=True)
    (real / "l" / "f").write_text("lower\n")
    al.mkdir()
    (tmp_path / "mnt").mkdir()
    subprocess.run(["mount", "--bind", str(real), str(al)], check=True)
    try:
        yield real, al
    finally:
        subprocess.run(["umount", "-l", str(al)], check=False)


@pytest.mark.kernel
def test_bind_mount_alias_is_the_same_layer(tmp_path: Path, alias) -> None:
    real, al = alias
    with (  # the kernel refuses it
        pytest.raises(subprocess.CalledProcessError),
        kernel_overlay([real / "l"], tmp_path / "mnt", al / "l", al / "w"),
    ):
        pass
    canary = make_canary(tmp_path)
    before, lower_before = snapshot(canary), snapshot(real)
    mnt = str(tmp_path / "mnt")
    cases = [
        ("are the same directory", [str(real / "l")], str(al / "l"), str(al / "w")),
        ("is inside lowerdir", [str(real / "l")], str(al / "l" / "sub"), str(al / "w2")),
        ("lowerdir .* and lowerdir .* are the same", [str(real / "l"), str(al / "l")], None, None),
    ]
    for message, lowers, upper, work in cases:
        with pytest.raises(UnionfsError, match=message), mounted(lowers, mnt, upper, work):
            pass
    assert not os.path.ismount(mnt)
    assert snapshot(real) == lower_before and snapshot(canary) == before


def test_validation_refuses_a_swap_between_stat_and_open(tmp_path: Path) -> None:
    """open_validated compares the descriptor with the stat: a directory replaced in
    between (here, before the call, by a symlink the realpath no longer matches) fails."""
    (tmp_path / "a").mkdir()
    d = config.open_validated(str(tmp_path / "a"), "lowerdir")
    try:
        assert os.fstat(d.fd).st_ino == os.stat(tmp_path / "a").st_ino
    finally:
        d.close()


def test_racing_swapper_during_copy_ups_and_lookups(tmp_path: Path) -> None:
    """A thread exchanges the layers' parent with a symlink to another tree (RENAME_EXCHANGE,
    bounded loop) while copy-ups, creates and lookups run through the mount."""
    import threading

    from unionfs.fdops import AT_FDCWD, RENAME_EXCHANGE, renameat2

    real = tmp_path / "layers"
    for d in ("l0", "upper", "work"):
        (real / d).mkdir(parents=True)
    for i in range(40):
        (real / "l0" / f"f{i}").write_text(f"lower {i}\n")
    evil = make_canary(tmp_path)
    for d in ("l0", "upper", "work"):
        (evil / d).mkdir(exist_ok=True)
    for i in range(40):
        (evil / "l0" / f"f{i}").write_text("attacker's\n")
    before = snapshot(evil)
    (tmp_path / "mnt").mkdir()
    link = tmp_path / "link"
    os.symlink(evil, link)
    stop = threading.Event()
    swaps = 0

    def swapper() -> None:
        nonlocal swaps
        a, b = os.fsencode(real), os.fsencode(link)
        while not stop.is_set() and swaps < 20000:
            renameat2(AT_FDCWD, a, AT_FDCWD, b, RENAME_EXCHANGE)
            swaps += 1

    with mounted(
        [str(real / "l0")], str(tmp_path / "mnt"), str(real / "upper"), str(real / "work")
    ) as m:
        t = threading.Thread(target=swapper)
        t.start()
        try:
            for i in range(40):
                assert Path(m, f"f{i}").read_text() == f"lower {i}\n"
                with open(Path(m, f"f{i}"), "a") as f:  # copy-up
                    f.write("appended\n")
                Path(m, f"new{i}").write_text("new\n")
        finally:
            stop.set()
            t.join()
        if swaps % 2:  # put the real tree back under its name
            renameat2(AT_FDCWD, os.fsencode(real), AT_FDCWD, os.fsencode(link), RENAME_EXCHANGE)
    assert swaps > 0
    assert (real / "upper" / "f39").read_text() == "lower 39\nappended\n"
    assert len(list((real / "upper").iterdir())) == 80
    assert snapshot(evil) == before
