"""posix_acl_create as the kernel computes it, checked against a real filesystem: the upper
filesystem's own inheritance for a file created in a directory with a default ACL."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from unionfs import posixacl

pytestmark = pytest.mark.skipif(shutil.which("setfacl") is None, reason="needs setfacl")


@pytest.mark.parametrize("spec", ["u:nobody:rwx", "u:nobody:r-x,g:daemon:rw-,m::rwx", "o::---"])
@pytest.mark.parametrize("mode", [0o666, 0o640, 0o777, 0o700, 0o000])
def test_inherit_matches_the_filesystem(tmp_path: Path, spec: str, mode: int) -> None:
    d = tmp_path / "d"
    d.mkdir()
    subprocess.run(["setfacl", "-d", "-m", spec, str(d)], check=True)
    old = os.umask(0o077)  # a default ACL makes the filesystem ignore it
    try:
        os.close(os.open(d / "f", os.O_CREAT | os.O_WRONLY, mode))
    finally:
        os.umask(old)
    want_mode = os.stat(d / "f").st_mode & 0o7777
    try:
        want_acl: bytes | None = os.getxattr(d / "f", posixacl.ACCESS_XATTR)
    except OSError:
        want_acl = None
    got_mode, got_acl = posixacl.inherit(os.getxattr(d, posixacl.DEFAULT_XATTR), mode)
    assert got_mode == want_mode
    assert got_acl == want_acl


def test_malformed_acls_are_refused() -> None:
    for raw in (b"", b"\x02\x00\x00\x00\x01", b"\x01\x00\x00\x00"):
        with pytest.raises(ValueError):
            posixacl.parse(raw)
