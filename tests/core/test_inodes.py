"""Inode table invariants and the layer stack's numbering, without FUSE."""

from __future__ import annotations

import os
from pathlib import Path

from unionfs.fs.nodes import ROOT_INO, Node, NodeTable
from unionfs.layers import INO_BITS, SYNTHETIC_FSID, LayerStack


def _stack(tmp_path: Path, n: int = 2) -> LayerStack:
    dirs = []
    for i in range(n):
        d = tmp_path / f"l{i}"
        d.mkdir()
        dirs.append(str(d))
    return LayerStack(dirs, None)


def test_lookup_counts_and_root(tmp_path: Path) -> None:
    table = NodeTable(_stack(tmp_path))
    node = Node(12345, table.root, b"x", False, (0,))
    assert table.remember(node) is node
    assert table.remember(Node(12345, table.root, b"x", False, (0,))) is node  # one live node
    assert node.lookups == 2
    table.forget(12345, 1)
    assert table.nodes[12345] is node
    table.forget(12345, 5)  # more than counted: clamped, never negative
    assert 12345 not in table.nodes and node.lookups == 0
    table.forget(ROOT_INO, 100)
    assert table.nodes[ROOT_INO] is table.root  # the root is never forgotten


def test_numbers_are_stable_and_partitioned(tmp_path: Path) -> None:
    stack = _stack(tmp_path)
    st = os.stat(tmp_path / "l0")
    a = stack.natural_ino(st.st_dev, st.st_ino)
    assert a == LayerStack([str(tmp_path / "l0"), str(tmp_path / "l1")], None).natural_ino(
        st.st_dev, st.st_ino
    )
    assert a >> INO_BITS == 1
    big = stack.natural_ino(st.st_dev, 1 << 50)  # does not fit: private range
    assert big >> INO_BITS == SYNTHETIC_FSID
    assert stack.natural_ino(st.st_dev, 1 << 50) == big


def test_dir_fd_lru_is_bounded(tmp_path: Path) -> None:
    stack = _stack(tmp_path, 1)
    for i in range(50):
        (tmp_path / "l0" / f"d{i}").mkdir()
    table = NodeTable(stack, max_dir_fds=8)
    nodes = [Node(100 + i, table.root, b"d%d" % i, True, (0,)) for i in range(50)]
    for n in nodes:
        table.remember(n)
        table.dir_fd(n, 0)
    assert sum(len(n.fds or {}) for n in nodes) == 8
    assert os.fstat(table.dir_fd(nodes[0], 0))  # evicted ones reopen on demand
    table.close()
