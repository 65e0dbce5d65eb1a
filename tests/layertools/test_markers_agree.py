"""The layer tools read a layer directory's markers exactly as the mount does."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from unionfs import format
from unionfs.fdops import DIR_OPEN_FLAGS
from unionfs.layertools.layerscan import scan_dir

# Every kind of .wh. name: valid, marker-of-a-marker (AUFS metadata), and hiding nothing.
MARKERS = [".wh.a", ".wh..wh.plnk", ".wh..wh.aufs", ".wh.", ".wh..", ".wh...", ".wh..x"]


def _mount_view(fd: int) -> tuple[set[bytes], set[bytes], bool]:
    """Whiteouts, entries and opaqueness of a layer directory as the mount reads them."""
    hidden, entries, opaque = set(), set(), False
    for name, _is_dir, is_marker in format.scan_layer_dir(fd):
        if not is_marker:
            entries.add(name)
        elif name == format.OCI_OPAQUE_NAME:
            opaque = True
        else:
            hidden.add(name)
    return hidden, entries, opaque or format.opaque_value(fd) == format.OPAQUE_YES


def test_layertools_and_mount_accept_the_same_whiteout_names(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    layer = tmp_path / "layer"
    layer.mkdir()
    for name in MARKERS:
        (layer / name).write_bytes(b"")
    (layer / "kept").write_text("x")
    os.mknod(layer / "gone", 0o020000, os.makedev(0, 0))
    fd = os.open(layer, DIR_OPEN_FLAGS)
    try:
        hidden, entries, opaque = _mount_view(fd)
        scanned = scan_dir(fd)
    finally:
        os.close(fd)
    # The mount's rule: .wh.<name> hides <name>, even a marker name no layer can show;
    # .wh., .wh.. and .wh... hide nothing.
    assert hidden == {b"a", b".wh.plnk", b".wh.aufs", b".x", b"gone"}
    # The layer tools hide the same visible names, and no name the mount would show.
    assert scanned.whiteouts == {n for n in hidden if not format.is_marker_name(n)}
    assert set(scanned.entries) == entries == {b"kept"}
    assert scanned.opaque == opaque is False
    # Silently, as the mount: .wh. names that hide nothing are no reason for a warning.
    assert not [r for r in caplog.records if r.levelname == "WARNING"]


def test_opaque_marker_agrees(tmp_path: Path) -> None:
    layer = tmp_path / "layer"
    layer.mkdir()
    (layer / format.OCI_OPAQUE_NAME.decode()).write_bytes(b"")
    fd = os.open(layer, DIR_OPEN_FLAGS)
    try:
        assert scan_dir(fd).opaque and _mount_view(fd)[2]
        assert not scan_dir(fd).whiteouts and not scan_dir(fd).entries
    finally:
        os.close(fd)
