"""Real mounts: nothing inside a layer can point the daemon outside the layers."""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import Union, write
from tests.mount.semantics_common import _no_stray_mounts

__all__ = ["_no_stray_mounts"]  # an autouse fixture, used by name

pytestmark = pytest.mark.mount


def test_untrusted_layers_stay_inside(union: Callable[[int], Union], tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    write(outside / "secret", "secret")
    u = union(2)
    write(u.lowers[0] / "d/ok", "ok")
    os.symlink(str(outside), u.lowers[1] / "d")  # a symlink below a dir: hidden, never merged
    os.symlink(str(outside), u.lowers[0] / "esc")
    os.symlink("../../../../../../..", u.lowers[0] / "dots")
    os.mknod(u.lowers[0] / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    with u.mount() as m:
        mp = Path(m)
        assert sorted(os.listdir(mp / "d")) == ["ok"]
        assert os.readlink(mp / "esc") == str(outside)
        # Writing through a symlink that points out is the caller's path walk, not ours:
        # the daemon never sees it. Copy-up of the symlink itself copies the link.
        os.lchown(mp / "esc", 1000, 1000)
        assert os.readlink(u.upper / "esc") == str(outside)
        assert (outside / "secret").read_text() == "secret"
        assert stat.S_ISCHR(os.lstat(mp / "null").st_mode)
        os.chmod(mp / "d", 0o700)
    assert sorted(os.listdir(outside)) == ["secret"]
