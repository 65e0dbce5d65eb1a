"""Bad input: one line on stderr, a non-zero exit, and nothing created or changed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.mount


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "unionfs", *args], capture_output=True, text=True, timeout=60
    )


def tree(root: Path) -> list[tuple[str, int, int]]:
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            p = os.path.join(dirpath, n)
            st = os.lstat(p)
            out.append((os.path.relpath(p, root), st.st_mode, st.st_mtime_ns))
    return sorted(out)


@pytest.fixture
def dirs(tmp_path: Path) -> Path:
    for n in ("l1", "l2", "u", "w", "m"):
        (tmp_path / n).mkdir()
    (tmp_path / "l1" / "file").write_text("x")
    (tmp_path / "notdir").write_text("x")
    return tmp_path


def _opts(d: Path, lowers: str = "l1:l2", upper: str = "u", work: str = "w") -> str:
    low = ":".join(str(d / x) for x in lowers.split(":"))
    return f"lowerdir={low},upperdir={d / upper},workdir={d / work}"


@pytest.mark.parametrize(
    "make_args, expect",
    [
        (lambda d: ["-o", _opts(d, "l1:missing"), str(d / "m")], "does not exist"),
        (lambda d: ["-o", _opts(d, "l1:notdir"), str(d / "m")], "not a directory"),
        (lambda d: ["-o", _opts(d, "l1:l1"), str(d / "m")], "given twice"),
        (lambda d: ["-o", _opts(d, upper="l1/sub"), str(d / "m")], "inside"),
        (lambda d: ["-o", _opts(d, work="u"), str(d / "m")], "same directory"),
        (lambda d: ["-o", _opts(d), str(d / "nomnt")], "does not exist"),
        (lambda d: ["-o", _opts(d), str(d / "l1")], "not empty"),
        (lambda d: ["-o", _opts(d), str(d / "l2")], "inside lowerdir"),
        (lambda d: ["-o", "upperdir=" + str(d / "u"), str(d / "m")], "no lower layer"),
        (lambda d: ["mount", "--bogus", str(d / "m")], "unrecognized arguments"),
        (lambda d: ["-o", _opts(d) + ",busy_poll=fast", str(d / "m")], "busy_poll=fast"),
    ],
)
def test_bad_input_is_one_line(dirs: Path, make_args, expect: str) -> None:
    (dirs / "l1" / "sub").mkdir(exist_ok=True)
    before = tree(dirs)
    proc = run(*make_args(dirs))
    assert proc.returncode in (1, 2), proc
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("unionfs: "), proc.stderr
    assert expect in lines[0]
    assert tree(dirs) == before
    assert not os.path.ismount(dirs / "m")


def test_busy_mountpoint_and_workdir_in_use(dirs: Path) -> None:
    (dirs / "m2").mkdir()
    assert run("-o", _opts(dirs), str(dirs / "m")).returncode == 0
    try:
        busy = run("-o", _opts(dirs, upper="l2"), str(dirs / "m"))
        assert busy.returncode == 1 and "busy" in busy.stderr
        again = run("-o", _opts(dirs), str(dirs / "m2"))
        assert again.returncode == 1 and "in use" in again.stderr, again.stderr
        assert not os.path.ismount(dirs / "m2")
    finally:
        assert run("umount", str(dirs / "m")).returncode == 0


def test_workdir_on_other_filesystem(dirs: Path) -> None:
    tmpfs = dirs / "tmpfs"
    tmpfs.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(tmpfs)], check=True)
    try:
        (tmpfs / "w").mkdir()
        proc = run("-o", _opts(dirs, work="tmpfs/w"), str(dirs / "m"))
        assert proc.returncode == 1 and "same filesystem" in proc.stderr
    finally:
        subprocess.run(["umount", str(tmpfs)], check=True)


def test_unwritable_upper(dirs: Path) -> None:
    ro = dirs / "ro"
    ro.mkdir()
    (ro / "u").mkdir()
    (ro / "w").mkdir()
    subprocess.run(["mount", "--bind", str(ro), str(ro)], check=True)
    subprocess.run(["mount", "-o", "remount,bind,ro", str(ro)], check=True)
    try:
        proc = run("-o", _opts(dirs, upper="ro/u", work="ro/w"), str(dirs / "m"))
        assert proc.returncode == 1 and "not writable" in proc.stderr, proc.stderr
        assert os.listdir(ro / "w") == []
    finally:
        subprocess.run(["umount", str(ro)], check=True)


def test_unknown_option_warns_and_mounts(dirs: Path) -> None:
    proc = run("-o", _opts(dirs) + ",frobnicate", str(dirs / "m"))
    try:
        assert proc.returncode == 0
        assert "unknown argument ignored: frobnicate" in proc.stderr
        assert (dirs / "m" / "file").read_text() == "x"
    finally:
        run("umount", str(dirs / "m"))


def test_missing_dev_fuse(dirs: Path) -> None:
    # A private mount namespace whose /dev is an empty tmpfs: no /dev/fuse there.
    proc = subprocess.run(
        [
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            'mount -t tmpfs none /dev && exec "$0" -m unionfs -o "$1" "$2"',
            sys.executable,
            _opts(dirs),
            str(dirs / "m"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 1, proc
    assert proc.stderr.strip() == "unionfs: /dev/fuse does not exist (is the fuse module loaded?)"
    assert os.listdir(dirs / "w") == []


def test_descriptor_limit_too_low_for_the_layers(dirs: Path) -> None:
    """A hard RLIMIT_NOFILE that cannot hold the layers plus the directory cache: one line,
    nothing mounted (the daemon would otherwise fail later with EMFILE)."""
    import resource

    lowers = []
    for i in range(200):
        (dirs / "many" / str(i)).mkdir(parents=True)
        lowers.append(str(dirs / "many" / str(i)))
    before = tree(dirs)

    def low_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (400, 400))

    proc = subprocess.run(
        [sys.executable, "-m", "unionfs", "-o", "lowerdir=" + ":".join(lowers), str(dirs / "m")],
        capture_output=True,
        text=True,
        timeout=60,
        preexec_fn=low_limit,
    )
    assert proc.returncode == 1, proc
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "descriptor limit (400) is too low for 200 layers" in lines[0]
    assert not os.path.ismount(dirs / "m")
    assert tree(dirs) == before
