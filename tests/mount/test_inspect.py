"""`unionfs inspect`, `layers` and `stats` against real mounts, and their virtual xattrs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import Union, whiteout, write

pytestmark = pytest.mark.mount


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "unionfs", *args], capture_output=True, text=True, timeout=60
    )


def build(u: Union) -> None:
    top, bottom = u.lowers
    write(bottom / "etc/motd", "bottom")
    write(bottom / "etc/gone", "bottom")
    write(bottom / "opt/old", "old")
    write(top / "etc/motd", "top")
    whiteout(top / "etc/gone")
    (top / "opt").mkdir()
    os.setxattr(top / "opt", "trusted.overlay.opaque", b"y")
    write(top / "opt/new", "new")
    os.symlink("motd", top / "etc/link")


def test_inspect_reports_layers_copy_up_and_whiteouts(union: Callable[[int], Union]) -> None:
    u = union(2)
    build(u)
    with u.mount() as m:
        info = json.loads(cli("inspect", "--json", f"{m}/etc/motd").stdout)
        assert info["layer"]["dir"] == str(u.lowers[0]) and not info["copied_up"]
        assert [s["dir"] for s in info["shadows"]] == [str(u.lowers[1])]
        gone = json.loads(cli("inspect", "--json", f"{m}/etc/gone").stdout)
        assert not gone["exists"]
        assert gone["hidden_by"][0]["dir"] == str(u.lowers[0])
        opt = json.loads(cli("inspect", "--json", f"{m}/opt").stdout)
        assert opt["opaque"] and [x["dir"] for x in opt["merged_layers"]] == [str(u.lowers[0])]
        link = json.loads(cli("inspect", "--json", f"{m}/etc/link").stdout)
        assert link["type"] == "symlink"

        Path(m, "etc/motd").write_text("changed")
        info = json.loads(cli("inspect", "--json", f"{m}/etc/motd").stdout)
        assert info["layer"]["upper"] and info["copied_up"]
        assert info["origin_layer"]["dir"] == str(u.lowers[0])
        os.unlink(Path(m, "etc/motd"))
        info = json.loads(cli("inspect", "--json", f"{m}/etc/motd").stdout)
        assert info["hidden_by"][0]["upper"] and info["hidden_by"][0]["marker"].startswith(
            "whiteout"
        )
        # The same answer through the mount itself, for any program.
        raw = os.getxattr(Path(m, "etc"), "user.unionfs.inspect:motd")
        assert json.loads(raw) == info
        human = cli("inspect", f"{m}/etc/gone", f"{m}/opt/new")
        assert human.returncode == 0
        assert "hidden by   whiteout (char 0/0)" in human.stdout
        assert "served by   layer 1 (lower)" in human.stdout
        assert "user.unionfs.inspect" not in os.listxattr(Path(m, "opt/new"))


def test_inspect_outside_a_mount_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    proc = cli("inspect", str(tmp_path / "f"))
    assert proc.returncode == 1
    assert proc.stderr.strip() == f"unionfs: {tmp_path} is not inside a unionfs mount"


def test_layers_and_stats(union: Callable[[int], Union]) -> None:
    u = union(2)
    build(u)
    with u.mount() as m:
        rows = json.loads(cli("layers", "--json", m).stdout)
        assert [r["dir"] for r in rows] == [str(u.upper), *map(str, u.lowers)]
        assert rows[0]["upper"] and rows[2]["entries"] == 5  # etc, motd, gone, opt, old
        table = cli("layers", m).stdout.splitlines()
        assert table[0].split()[:4] == ["LAYER", "KIND", "ENTRIES", "SIZE"]

        before = json.loads(cli("stats", "--json", m).stdout)
        Path(m, "etc/motd").write_text("x")
        os.unlink(Path(m, "opt/new"))
        os.mkdir(Path(m, "opt/new"))  # over the upper whiteout just made: opaque
        after = json.loads(cli("stats", "--json", m).stdout)
        assert after["copy_ups"] == before["copy_ups"] + 3  # /etc, /opt, /etc/motd
        assert after["whiteouts_created"] == before["whiteouts_created"] + 1
        assert after["opaque_dirs_created"] == before["opaque_dirs_created"] + 1
        assert sum(after["lookups_per_layer"].values()) > 0


def test_stats_follow_streams_events(union: Callable[[int], Union]) -> None:
    u = union(2)
    build(u)
    with u.mount() as m:
        proc = subprocess.Popen(
            [sys.executable, "-m", "unionfs", "stats", "--follow", "--json", "--count", "2", m],
            stdout=subprocess.PIPE,
            text=True,
        )
        timer = threading.Timer(
            1.0, lambda: (Path(m, "opt/new").write_text("y"), os.unlink(Path(m, "etc/motd")))
        )
        timer.start()
        out, _ = proc.communicate(timeout=60)
        timer.join()
        events = [json.loads(line) for line in out.splitlines()]
        assert [(e["event"], e["path"]) for e in events] == [
            ("copy-up", "/opt"),
            ("copy-up", "/opt/new"),
        ]
