"""Whiteouts on an upper filesystem that refuses mknod: ``.wh.<name>`` files instead.

No filesystem here refuses a char 0/0 mknod and still supports everything else an upper
needs, so the refusal is injected: the daemon runs with an ``LD_PRELOAD`` shim whose
``mknod``/``mknodat`` fail with EPERM for character devices (and only for them). Everything
else is the real daemon on a real mount.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import Union, write

pytestmark = pytest.mark.mount

SHIM = r"""
#define _GNU_SOURCE
#include <errno.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/syscall.h>
#include <unistd.h>
#include <fcntl.h>

int mknodat(int dirfd, const char *path, mode_t mode, dev_t dev) {
    if (S_ISCHR(mode)) { errno = EPERM; return -1; }
    return syscall(SYS_mknodat, dirfd, path, mode, dev);
}
int mknod(const char *path, mode_t mode, dev_t dev) {
    return mknodat(AT_FDCWD, path, mode, dev);
}
"""


@pytest.fixture
def no_mknod(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = tmp_path / "nomknod.c"
    src.write_text(SHIM)
    lib = tmp_path / "nomknod.so"
    subprocess.run(["gcc", "-shared", "-fPIC", "-o", lib, src], check=True)
    monkeypatch.setenv("LD_PRELOAD", str(lib))
    # The shim works: a char 0/0 mknod fails in a process that loads it.
    probe = subprocess.run(
        [sys.executable, "-c", f"import os; os.mknod({str(tmp_path / 'c')!r}, 0o20000)"],
        capture_output=True,
        text=True,
    )
    assert "PermissionError" in probe.stderr


def listing(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def test_whiteouts_fall_back_to_oci_files(union: Callable[[int], Union], no_mknod: None) -> None:
    u = union(1)
    low = u.lowers[0]
    for name in ("d/gone", "d/moved", "d/kept", "d/edited", "top", "sub/a", "again/b"):
        write(low / name, name)
    with u.mount() as m:
        mp = Path(m)
        os.unlink(mp / "d/gone")  # a lower file
        os.rename(mp / "d/moved", mp / "d/there")  # leaves a whiteout at the old name
        os.unlink(mp / "top")
        (mp / "d/edited").write_text("new")  # copied up, then removed: upper name replaced
        os.unlink(mp / "d/edited")
        os.unlink(mp / "sub/a")  # a lower directory, emptied, then removed
        os.rmdir(mp / "sub")
        os.unlink(mp / "again/b")  # removed, then recreated as an (opaque) directory
        os.rmdir(mp / "again")
        (mp / "again").mkdir()
        os.rename(mp / "d/there", mp / "d/gone")  # onto a name hidden by a .wh. file
        view = listing(mp)
        assert view == ["again", "d", "d/gone", "d/kept"]
        assert (mp / "d/gone").read_text() == "d/moved"
        stats = json.loads(os.getxattr(m, "user.unionfs.stats"))
        assert stats["whiteouts_created"] == 8
    assert "refuses mknod: whiteouts are written as .wh.<name> files" in u.log()
    # What is on disk: regular .wh. files, no device anywhere in the upper.
    upper = sorted(str(p.relative_to(u.upper)) for p in u.upper.rglob("*"))
    assert upper == [
        ".wh.sub",
        ".wh.top",
        "again",
        "d",
        "d/.wh.edited",
        "d/.wh.moved",
        "d/gone",
    ]
    assert os.getxattr(u.upper / "again", "trusted.overlay.opaque") == b"y"
    for p in u.upper.rglob("*"):
        assert not stat.S_ISCHR(os.lstat(p).st_mode)
    # A later mount, with mknod allowed again, reads the same view from those files.
    os.environ.pop("LD_PRELOAD")
    with u.mount() as m:
        assert listing(Path(m)) == view
