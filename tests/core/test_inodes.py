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


def test_dir_fd_reaches_any_depth_after_evictions(tmp_path: Path) -> None:
    """Descriptors of deep ancestors evicted from the cache are reopened without recursion."""
    stack = _stack(tmp_path, 1)
    depth = 3000  # deeper than Python's recursion limit
    fd = os.open(tmp_path / "l0", os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(depth):
            os.mkdir("d", dir_fd=fd)
            nfd = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = nfd
        os.mknod("bottom", dir_fd=fd)
    finally:
        os.close(fd)
    table = NodeTable(stack, max_dir_fds=8)
    chain = [table.root]
    for i in range(depth):
        chain.append(Node(1000 + i, chain[-1], b"d", True, (0,)))
    for _ in range(2):  # the second time, all but the last few were evicted
        bottom = table.dir_fd(chain[-1], 0)
        assert os.stat("bottom", dir_fd=bottom).st_size == 0
        table.dir_fd(chain[1], 0)
    assert len(table._fd_lru) <= 8
    table.close()
    stack.close()
    # pytest's own clean-up of tmp_path recurses: remove the chain without recursion.
    from unionfs.fs.workdir import remove_tree_at

    root = os.open(tmp_path / "l0", os.O_RDONLY | os.O_DIRECTORY)
    try:
        remove_tree_at(root, b"d")
    finally:
        os.close(root)
