"""The daemon keeps the xattr answers of lower objects (issue 14): a value, "no such
attribute" and a listing are read from a lower object once. Whatever the mount changes must
show at once: each name is read before and after a change of it, and the answers must be the
kernel's overlay's, over the same lower, with the same operations.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import Union, write
from tests.mount.test_xattr_escape import Twin, attempt, view

pytestmark = [pytest.mark.mount, pytest.mark.kernel]


def _lower(u: Union) -> None:
    lower = u.lowers[0]
    write(lower / "f", "f")
    write(lower / "d" / "kept", "kept")
    write(lower / "h1", "h")
    os.link(lower / "h1", lower / "h2")  # two names of one lower file
    for name in ("f", "d", "h1"):
        os.setxattr(lower / name, "user.a", b"1")


def script(m: Path) -> list[object]:
    out: list[object] = []

    def look() -> None:
        for name in ("f", "d", "h1", "h2", "d/kept"):
            out.append(view(m / name))
            out.append(attempt(lambda name=name: os.getxattr(m / name, "user.missing")))

    look()
    look()  # the same questions again: answered from what was kept
    out.append(attempt(lambda: os.setxattr(m / "f", "user.a", b"2")))
    out.append(attempt(lambda: os.setxattr(m / "d", "user.missing", b"now")))
    out.append(attempt(lambda: os.setxattr(m / "h1", "user.a", b"3")))
    out.append(attempt(lambda: os.removexattr(m / "d/kept", "user.nope")))
    look()
    out.append(attempt(lambda: os.removexattr(m / "f", "user.a")))
    out.append(attempt(lambda: os.setxattr(m / "d", "user.a", b"5")))  # d is an upper dir now
    out.append(attempt(lambda: os.removexattr(m / "d", "user.missing")))
    out.append(attempt(lambda: os.removexattr(m / "h2", "user.a")))
    (m / "d" / "kept").chmod(0o600)  # a copy-up without an xattr change
    os.setxattr(m / "d" / "kept", "user.late", b"L")
    look()
    return out


def test_lower_xattr_answers_follow_every_change(
    union: Callable[[int], Union], tmp_path: Path
) -> None:
    u = union(1)
    _lower(u)
    k = tmp_path / "k"
    for sub in ("upper", "work", "mnt"):
        (k / sub).mkdir(parents=True)
    with Twin(u, k, userxattr=False) as (ours, kernel):
        assert script(ours) == script(kernel)
