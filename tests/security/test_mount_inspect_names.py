"""Issue 13 item 7: ``user.unionfs.inspect:NAME`` takes one entry name, nothing else.

``NAME`` with a ``/``, ``.``, ``..``, an empty name or one over 255 bytes is refused with
EINVAL, so the answer never tells whether some path outside the directory (outside the
mount, on the host) exists.
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest

from tests.conftest import Union, write
from tests.security._mount_common import make_canary, snapshot

pytestmark = pytest.mark.mount

INSPECT = "user.unionfs.inspect:"


def _ask(path: str, child: bytes) -> int | dict[str, object]:
    try:
        return dict(json.loads(os.getxattr(path, os.fsencode(INSPECT) + child)))
    except OSError as exc:
        return exc.errno or 0


def test_inspect_names_outside_the_directory_are_refused(union, tmp_path: Path) -> None:
    u: Union = union(1)
    write(u.lowers[0] / "d" / "f", "x")
    canary = make_canary(tmp_path)
    before = snapshot(canary)
    rel = os.path.relpath(canary, u.mnt / "d").encode()
    with u.mount() as m:
        d = f"{m}/d"
        good = _ask(d, b"f")
        assert isinstance(good, dict) and good["exists"] and good["path"] == "/d/f"
        missing = _ask(d, b"nope")
        assert isinstance(missing, dict) and not missing["exists"]
        bad = [
            rel + b"/secret",  # exists on the host
            rel + b"/absent",  # does not
            b"../../etc/shadow",
            b"../../etc/no-such-file",
            b"f/",
            b"/f",
            b".",
            b"..",
            b"",
        ]
        for child in bad:
            assert _ask(d, child) == errno.EINVAL, child
        # The kernel itself refuses xattr names over 255 bytes (ERANGE); the longest name
        # that reaches the daemon is still answered.
        assert _ask(d, b"x" * 256) == errno.ERANGE
        longest = _ask(d, b"x" * (255 - len(INSPECT)))
        assert isinstance(longest, dict) and not longest["exists"]
        assert isinstance(_ask(m, b"d"), dict)
    assert snapshot(canary) == before
