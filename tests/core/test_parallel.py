"""Deep chains read in threads (unionfs.parallel) give exactly the serial result.

The serial read path is checked against the kernel by tests/differential; here every
generated stack is resolved twice in-process, once with every chain read inline and once with
every chain of two or more layers read in threads, and the two merged trees must be equal.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.oracle.layergen import generate_stack, make_layer_dirs
from unionfs import parallel
from unionfs.config import MountConfig
from unionfs.fs import listing, lookup
from unionfs.fs.nodes import Node
from unionfs.fs.union import Union


def merged_tree(core: Union) -> list[tuple[object, ...]]:
    out: list[tuple[object, ...]] = []

    def walk(node: Node, path: bytes) -> None:
        for name in sorted(listing.index_of(core.s, node).names()):
            found = lookup.resolve(core.s, node, name)
            if found is None:
                out.append((path + name, None))
                continue
            child, st = found
            out.append((path + name, child.is_dir, child.layers, child.ino, st.st_mode))
            if child.is_dir:
                walk(child, path + name + b"/")

    walk(core.table.root, b"/")
    return out


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.parametrize(
    ("fmt", "upper"),
    # An upper holds only the kernel's forms.
    [("kernel", False), ("oci", False), ("mixed", False), ("kernel", True)],
    ids=["kernel", "oci", "mixed", "kernel+upper"],
)
def test_threaded_chains_match_serial(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fmt: str, upper: bool
) -> None:
    dirs = make_layer_dirs(tmp_path, 24, upper=upper)
    for seed in range(8):
        generate_stack(
            dirs, seed, prefix=f"s{seed}", fmt=fmt, ops_per_layer=(2, 8), has_upper=upper
        )
    cfg = MountConfig(
        lowers=[str(d) for d in dirs[1:]] if upper else [str(d) for d in dirs],
        mountpoint=str(tmp_path / "mnt"),
        upper=str(dirs[0]) if upper else None,
    )
    trees = []
    before = open_fds()
    for threshold in (10**9, 1):
        monkeypatch.setattr(parallel, "MIN_ITEMS", threshold)
        core = Union(cfg)
        try:
            trees.append(merged_tree(core))
        finally:
            core.close()
        assert open_fds() == before, "descriptors left open"
    serial, threaded = trees
    assert len(serial) > 60
    assert any(len(entry[2]) > 8 for entry in serial if entry[1])  # type: ignore[arg-type]
    assert threaded == serial


def test_an_error_in_a_thread_reaches_the_caller(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(parallel, "MIN_ITEMS", 1)

    def fail_on_7(x: int) -> int:
        if x == 7:
            raise OSError(5, "boom")
        return x

    with pytest.raises(OSError, match="boom"):
        parallel.map_layers(fail_on_7, list(range(40)))
    assert parallel.map_layers(lambda x: x * 2, list(range(40))) == [x * 2 for x in range(40)]
