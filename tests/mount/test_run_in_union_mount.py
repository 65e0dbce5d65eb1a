"""The README's end-to-end example: a server in a unionfs mount, its log lands in the upper.

A mount test that uses the network helper: it lives with the mount tests and borrows the
network tests' sandbox (a throwaway network and mount namespace) and busybox root.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.net.conftest import rootfs, sandbox

__all__ = ["rootfs", "sandbox"]  # fixtures, used by name

pytestmark = [pytest.mark.net, pytest.mark.mount]


def test_server_in_union_mount_writes_into_upper(sandbox, rootfs: Path, tmp_path: Path) -> None:
    if not Path("/dev/fuse").exists():
        pytest.skip("no /dev/fuse")
    api = pytest.importorskip("unionfs.api")
    upper, work, mnt = tmp_path / "upper", tmp_path / "work", tmp_path / "mnt"
    for d in (upper, work, mnt):
        d.mkdir()
    with api.mounted([str(rootfs)], str(mnt), str(upper), str(work)):
        server = "httpd -f -v -p 80 -h /www 2>>/tmp/httpd.log"
        sandbox.uf(
            "run",
            "-d",
            "--name",
            "web",
            "-p",
            "127.0.0.1:10080:80",
            str(mnt),
            "--",
            "sh",
            "-c",
            server,
        )
        assert sandbox.wait_http("127.0.0.1", 10080) == "hello from the container\n"
        sandbox.uf("rm", "web")
        assert sandbox.leftovers() == []
        assert (upper / "tmp" / "httpd.log").read_text().strip() != ""
        assert (upper / "etc" / "hosts").read_text().startswith("127.0.0.1\tlocalhost")
        assert (upper / "etc" / "hostname").exists()
    assert not (rootfs / "tmp" / "httpd.log").exists()
    assert not (rootfs / "etc" / "hosts").exists()
