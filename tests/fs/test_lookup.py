"""Name resolution in-process, without FUSE: every name of random layer stacks resolves to
what the pure overlayfs model (``tests.oracle.layergen.flatten``) shows."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import pytest

from tests.oracle.layergen import flatten, generate_stack, make_layer_dirs
from tests.oracle.tree import kind_of
from unionfs.config import MountConfig
from unionfs.fs import listing, lookup
from unionfs.fs.nodes import ROOT_INO, Node
from unionfs.fs.union import Union


def _walk(fs: Union) -> dict[str, tuple[str, int, int, int]]:
    """Every path of the merged view: kind, mode, size (0 for directories), st_ino shown."""
    out: dict[str, tuple[str, int, int, int]] = {}

    def walk(node: Node, rel: str) -> None:
        for name in sorted(listing.index_of(fs.s, node).names()):
            found = lookup.resolve(fs.s, node, name)
            assert found is not None, f"{rel}{name!r} listed but not resolved"
            child, st = found
            path = rel + os.fsdecode(name)
            size = 0 if stat.S_ISDIR(st.st_mode) else st.st_size
            out[path] = (kind_of(st.st_mode), stat.S_IMODE(st.st_mode), size, child.st_ino)
            if child.is_dir:
                walk(child, path + "/")

    walk(fs.table.root, "")
    return out


@pytest.mark.parametrize("fmt", ["kernel", "oci", "mixed"])
def test_resolution_matches_the_model(tmp_path: Path, fmt: str) -> None:
    dirs = make_layer_dirs(tmp_path, 6)
    for seed in range(6):
        generate_stack(dirs, seed, prefix=f"s{seed}", fmt=fmt, ops_per_layer=(2, 8))
    model = flatten(dirs, forms="all")
    fs = Union(MountConfig(lowers=[str(d) for d in dirs], mountpoint=str(tmp_path)))
    try:
        mine = _walk(fs)
        expected = {}
        for path, entry in model.entries.items():
            size = 0 if entry.kind == "dir" else (entry.size or 0)
            ino = fs.stack.natural_ino(*model.inodes[path])
            expected[path] = (entry.kind, entry.mode, size, ino)
    finally:
        fs.close()
    assert len(expected) > 20
    assert mine == expected


def test_lookup_counts_and_negative_answers(tmp_path: Path) -> None:
    low = tmp_path / "low"
    (low / "d").mkdir(parents=True)
    (low / "d" / "f").write_text("x")
    (low / ".wh.hidden").write_text("")
    fs = Union(MountConfig(lowers=[str(low)], mountpoint=str(tmp_path)))
    try:
        found = fs.lookup(ROOT_INO, b"d")
        assert found is not None
        node, attr = found
        assert node.lookups == 1 and attr is not None and attr.ino == node.ino
        # A lower object never changes: the second lookup is a dict hit with no attributes.
        again = fs.lookup(ROOT_INO, b"d")
        assert again is not None and again[0] is node and again[1] is None
        assert node.lookups == 2
        assert fs.lookup(ROOT_INO, b"missing") is None
        assert fs.lookup(ROOT_INO, b".wh.hidden") is None  # markers are never names
        assert fs.stats.negative_lookups == 2
        assert fs.stats.lookups_per_layer[0] == 2
        with pytest.raises(OSError) as exc:
            fs.lookup(ROOT_INO, b"x" * 256)
        assert exc.value.errno == errno.ENAMETOOLONG
        fs.forget(node.ino, 2)
        assert node.ino not in fs.table.nodes
        with pytest.raises(OSError) as exc:
            fs.node(node.ino)
        assert exc.value.errno == errno.ESTALE
    finally:
        fs.close()


def test_opaque_directory_cuts_the_chain(tmp_path: Path) -> None:
    top, bottom = tmp_path / "top", tmp_path / "bottom"
    for layer in (top, bottom):
        (layer / "d").mkdir(parents=True)
        (layer / "d" / layer.name).write_text(layer.name)
    (top / "d" / ".wh..wh..opq").write_text("")
    fs = Union(MountConfig(lowers=[str(top), str(bottom)], mountpoint=str(tmp_path)))
    try:
        found = fs.lookup(ROOT_INO, b"d")
        assert found is not None
        d = found[0]
        assert d.layers == (0,)
        assert listing.index_of(fs.s, d).names() == [b"top"]
    finally:
        fs.close()
