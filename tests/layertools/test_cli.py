"""The three commands through ``unionfs.cli.main``: output, exit codes, option forms."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import pytest

from layertools.conftest import TarBuilder
from unionfs import cli
from unionfs.cli.layertools import split_mount_options
from unionfs.layertools.progress import Progress


def layers(tmp_path: Path) -> tuple[Path, Path]:
    lower, upper = tmp_path / "lower", tmp_path / "upper"
    (lower / "etc").mkdir(parents=True)
    (lower / "etc" / "old").write_bytes(b"")
    (lower / "etc" / "conf").write_bytes(b"1")
    (upper / "etc").mkdir(parents=True)
    (upper / "etc" / "conf").write_bytes(b"2")
    (upper / "etc" / ".wh.old").write_bytes(b"")
    (upper / "new").write_bytes(b"n")
    return lower, upper


def test_diff_prints_docker_style_lines(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    lower, upper = layers(tmp_path)
    assert cli.main(["diff", "--upper", str(upper), "--lower", str(lower)]) == 0
    assert capsys.readouterr().out.splitlines() == ["C /etc", "C /etc/conf", "D /etc/old", "A /new"]


def test_diff_fuse_overlayfs_options_and_json(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    lower, upper = layers(tmp_path)
    options = f"lowerdir={lower},upperdir={upper},workdir={tmp_path / 'w'}"
    assert cli.main(["diff", "-o", options, "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows[-1] == {"path": "/new", "kind": "A"}


def test_split_mount_options_with_escapes() -> None:
    lowers, upper = split_mount_options(r"lowerdir=/a\:b:/c,upperdir=/u\,v,workdir=/w")
    assert [str(p) for p in lowers] == ["/a:b", "/c"]
    assert str(upper) == "/u,v"


def test_export_then_import(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _, upper = layers(tmp_path)
    out = tmp_path / "layer.tar.gz"
    assert cli.main(["export", "--upper", str(upper), "-o", str(out)]) == 0
    digest = capsys.readouterr().out.strip()
    assert digest.startswith("sha256:") and len(digest) == 71
    assert out.read_bytes()[:2] == b"\x1f\x8b"
    assert cli.main(["import", str(out), str(tmp_path / "imported"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["digest"] == digest
    assert (tmp_path / "imported" / "new").read_bytes() == b"n"


def test_export_json_reports_diff_id_and_media_type(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, upper = layers(tmp_path)
    out = tmp_path / "layer.tar"
    args = ["export", str(upper), "-o", str(out), "--compression", "zstd", "--json"]
    assert cli.main(args) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["mediaType"] == "application/vnd.oci.image.layer.v1.tar+zstd"
    assert report["diff_id"] != report["digest"]


def test_import_refusal_is_one_line_exit_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = TarBuilder().file("../escape", b"").write(tmp_path / "bad.tar")
    assert cli.main(["import", str(source), str(tmp_path / "dest")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("unionfs: refusing layer member '../escape'") and err.count("\n") == 1
    assert not (tmp_path / "dest").exists()


def test_usage_errors_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["diff"]) == 2
    assert cli.main(["export", str(tmp_path), "--compression", "lzma"]) == 2
    assert cli.main(["import"]) == 2
    assert "unionfs:" in capsys.readouterr().err


def test_progress_draws_only_when_enabled(monkeypatch: pytest.MonkeyPatch) -> None:
    from unionfs.layertools import progress

    monkeypatch.setattr(progress, "DELAY", 0.0)
    monkeypatch.setattr(progress, "_REDRAW", 0.0)
    shown, hidden = io.StringIO(), io.StringIO()
    with Progress("importing", 100, enabled=True, stream=shown) as bar:
        bar.advance(50)
    with Progress("importing", 100, stream=hidden) as bar:  # StringIO is not a TTY
        bar.advance(50)
    assert "importing [" in shown.getvalue() and "100.0%" not in shown.getvalue()
    assert " 50.0%" in shown.getvalue() and shown.getvalue().endswith("\n")
    assert hidden.getvalue() == ""


def test_forced_progress_on_export_goes_to_stderr(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from unionfs.layertools import progress

    monkeypatch.setattr(progress, "DELAY", 0.0)
    monkeypatch.setattr(progress, "_REDRAW", 0.0)
    _, upper = layers(tmp_path)
    (upper / "big").write_bytes(os.urandom(100_000))
    out = tmp_path / "l.tar"
    assert cli.main(["export", str(upper), "-o", str(out), "--progress"]) == 0
    captured = capsys.readouterr()
    assert "exporting [" in captured.err and captured.out.startswith("sha256:")
