"""Read-view differential tests: generated layer stacks, merged trees compared in full.

* kernel-format stacks: the kernel's overlayfs vs the flatten reference (validates the
  reference) and the backend vs the kernel;
* 500 layers (the kernel's maximum) the same way; 2,000 layers: backend vs flatten only;
* OCI-format and mixed stacks (``.wh.`` forms the kernel does not read): backend vs flatten;
* one layer on a private tmpfs: inode numbers do not collide, one ``st_dev``;
* self-checks that the comparators and the reference really detect differences.

Many stacks share one mount: each stack is a sibling subtree ``sNNN`` of the same layers, and
its seed is ``group_seed + NNN`` (the failure message names the subtree).
"""

from __future__ import annotations

import os
import random
import stat
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.oracle.backends import (
    Backend,
    KernelOverlay,
    copy_tree,
    long_run_examples,
    own_dino_lines,
)
from tests.oracle.layergen import flatten, generate_stack, make_layer_dirs
from tests.oracle.tree import Snapshot, diff, format_report, snapshot


@dataclass(frozen=True)
class Group:
    """Many stacks generated as sibling subtrees of one set of layers."""

    name: str
    layers: int
    stacks: int
    seed: int
    upper: bool = False
    ops: tuple[int, int] = (2, 8)

    def __str__(self) -> str:
        return self.name


KERNEL_GROUPS = [
    Group("2L", 2, 30, 20_000),
    Group("3L", 3, 30, 30_000),
    Group("4L", 4, 25, 40_000),
    Group("6L", 6, 25, 60_000),
    Group("10L", 10, 20, 100_000),
    Group("16L", 16, 15, 160_000, ops=(1, 5)),
    Group("3L+upper", 3, 30, 31_000, upper=True),
    Group("6L+upper", 6, 25, 61_000, upper=True),
]


def _build(scratch: Path, g: Group, fmt: str, gen_options: dict[str, object]) -> list[Path]:
    """Generate group ``g`` under ``scratch/g``; return its layer dirs, top first."""
    dirs = make_layer_dirs(scratch / "g", g.layers, upper=g.upper)
    for i in range(g.stacks):
        generate_stack(
            dirs,
            g.seed + i,
            prefix=f"s{i:03d}",
            fmt=fmt,
            ops_per_layer=g.ops,
            has_upper=g.upper,
            **gen_options,  # type: ignore[arg-type]
        )
    return dirs


def _mount_snapshot(be: Backend, scratch: Path, tag: str, g: Group) -> Snapshot:
    """Copy the generated layers for backend ``be`` (``cp -a``), mount, snapshot, unmount."""
    copy_tree(scratch / "g", scratch / tag)
    lowers = [scratch / tag / str(i) for i in range(g.layers)]
    upper = workdir = None
    if g.upper:
        upper, workdir = scratch / tag / "u", scratch / tag / "w"
        workdir.mkdir()
    with be.mount(lowers, upper, workdir, scratch / f"m{tag}") as mnt:
        return snapshot(mnt)


def _check(lines: list[str], title: str) -> None:
    assert not lines, format_report(title, lines)


@pytest.mark.mount
@pytest.mark.kernel
@pytest.mark.parametrize("group", KERNEL_GROUPS, ids=str)
def test_kernel_format_stacks(
    group: Group,
    scratch: Path,
    kernel: KernelOverlay,
    backend: Backend,
    gen_options: dict[str, object],
    diff_options: dict[str, object],
) -> None:
    """Kernel vs flatten reference, then backend vs kernel, on one group of stacks."""
    dirs = _build(scratch, group, "kernel", gen_options)
    ref = flatten(dirs, forms="kernel")
    ksnap = _mount_snapshot(kernel, scratch, "k", group)
    _check(
        diff(ref, ksnap, labels=("flatten", "kernel"), dino=False), f"reference != kernel ({group})"
    )
    assert len(ksnap.entries) > group.stacks * 2, "generator produced (nearly) empty trees"
    bsnap = _mount_snapshot(backend, scratch, "b", group)
    lines = diff(ksnap, bsnap, labels=("kernel", backend.name), **diff_options)  # type: ignore[arg-type]
    lines += own_dino_lines(backend, bsnap)
    _check(lines, f"kernel != {backend.name} ({group}; seeds {group.seed}+NNN for sNNN)")


def _deep(scratch: Path, n: int, seed: int, gen_options: dict[str, object]) -> list[Path]:
    dirs = make_layer_dirs(scratch / "g", n)
    generate_stack(dirs, seed, prefix="", ops_per_layer=(0, 2), max_depth=3, **gen_options)  # type: ignore[arg-type]
    return dirs


@pytest.mark.mount
@pytest.mark.kernel
@pytest.mark.slow
def test_500_layers(
    scratch: Path,
    kernel: KernelOverlay,
    backend: Backend,
    gen_options: dict[str, object],
    diff_options: dict[str, object],
) -> None:
    """500 lowers, the kernel's maximum: reference == kernel == backend."""
    g = Group("500L", 500, 1, 500)
    dirs = _deep(scratch, 500, 500, gen_options)
    ref = flatten(dirs, forms="kernel")
    ksnap = _mount_snapshot(kernel, scratch, "k", g)
    _check(
        diff(ref, ksnap, labels=("flatten", "kernel"), dino=False),
        "reference != kernel (500 layers)",
    )
    bsnap = _mount_snapshot(backend, scratch, "b", g)
    lines = diff(ksnap, bsnap, labels=("kernel", backend.name), **diff_options)  # type: ignore[arg-type]
    _check(lines, f"kernel != {backend.name} (500 layers)")


@pytest.mark.mount
@pytest.mark.slow
def test_2000_layers(
    scratch: Path, backend: Backend, gen_options: dict[str, object], diff_options: dict[str, object]
) -> None:
    """2,000 lowers (beyond the kernel): backend vs the flatten reference."""
    if backend.max_layers < 2000:
        pytest.skip(f"{backend.name} supports at most {backend.max_layers} layers")
    g = Group("2000L", 2000, 1, 2000)
    dirs = _deep(scratch, 2000, 2000, gen_options)
    ref = flatten(dirs, forms="kernel")
    bsnap = _mount_snapshot(backend, scratch, "b", g)
    lines = diff(ref, bsnap, labels=("flatten", backend.name), **diff_options)  # type: ignore[arg-type]
    _check(lines, f"flatten != {backend.name} (2000 layers)")


OCI_GROUPS = [
    Group("oci-3L", 3, 25, 3_000),
    Group("oci-8L", 8, 20, 8_000),
    Group("mixed-4L", 4, 25, 4_000),
    Group("mixed-10L", 10, 15, 10_000),
]


@pytest.mark.mount
@pytest.mark.parametrize("group", OCI_GROUPS, ids=str)
def test_oci_stacks(
    group: Group,
    scratch: Path,
    backend: Backend,
    gen_options: dict[str, object],
    diff_options: dict[str, object],
) -> None:
    """OCI ``.wh.`` forms (and every form mixed): backend vs the flatten reference."""
    if isinstance(backend, KernelOverlay):
        pytest.skip("the kernel does not read OCI whiteouts")
    fmt = "oci" if group.name.startswith("oci") else "mixed"
    dirs = _build(scratch, group, fmt, gen_options)
    ref = flatten(dirs, forms="all")
    assert len(ref.entries) > group.stacks * 2
    bsnap = _mount_snapshot(backend, scratch, "b", group)
    lines = diff(ref, bsnap, labels=("flatten", backend.name), **diff_options)  # type: ignore[arg-type]
    _check(lines, f"flatten != {backend.name} ({group}; seeds {group.seed}+NNN for sNNN)")


@pytest.mark.mount
def test_layer_on_tmpfs(
    scratch: Path, backend: Backend, kernel: KernelOverlay, diff_options: dict[str, object]
) -> None:
    """One lower on a private tmpfs: one st_dev, no inode collisions, d_ino == st_ino.

    Both filesystems start numbering low, so equal raw inode numbers across the two layers are
    likely; the partition of paths by inode must still be exactly the reference's (which keys
    by the real ``(st_dev, st_ino)``).  The kernel is checked the same way with ``xino=on``.
    """
    n = 3
    dirs = make_layer_dirs(scratch / "b", n)
    tmpfs = dirs[1]
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "udtmp", str(tmpfs)], check=True)
    try:
        for i in range(12):
            generate_stack(
                dirs, 77_000 + i, prefix=f"s{i:03d}", fmt="kernel", exclude=frozenset({"wh_xattr"})
            )
        # Same names in every layer so that raw inode numbers of the two fs likely collide.
        for d in dirs:
            (d / "same").mkdir()
            for j in range(40):
                (d / "same" / f"{d.name}-{j}").write_text(str(j))
        ref = flatten(dirs, forms="kernel")
        raw = {ino for _, ino in ref.inodes.values()}
        assert len(raw) < len(ref.inodes), "the test should contain raw inode collisions"
        results = []
        for be, tag in ((backend, "b"), (KernelOverlay(xino="on"), "k")):
            with be.mount(dirs, None, None, scratch / f"m{tag}") as mnt:
                snap = snapshot(mnt)
            if isinstance(be, KernelOverlay):
                # The kernel keeps per-layer st_dev values for the tmpfs layer (xino cannot
                # take tmpfs's inode numbers) and reports its own numbers for merged dirs:
                # only the (st_dev, st_ino) partition is comparable.
                lines = diff(ref, snap, labels=("flatten", be.name), dino=False)
            else:
                opts = dict(diff_options)
                lines = diff(ref, snap, labels=("flatten", be.name), **opts)  # type: ignore[arg-type]
                lines += own_dino_lines(be, snap)
                if len(snap.devices()) != 1:
                    lines.append(f"{be.name}: {len(snap.devices())} distinct st_dev values")
            results.append((be.name, lines))
        for name, lines in results:
            _check(lines, f"tmpfs layer: {name}")
    finally:
        subprocess.run(["umount", "-l", str(tmpfs)], check=False)


@pytest.mark.mount
@pytest.mark.kernel
@settings(
    max_examples=long_run_examples(8),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(2, 7), upper=st.booleans())
def test_hypothesis_stack(
    seed: int,
    n: int,
    upper: bool,
    kernel: KernelOverlay,
    backend: Backend,
    gen_options: dict[str, object],
    diff_options: dict[str, object],
) -> None:
    """Hypothesis-chosen single stacks (seed, depth, upper): kernel == reference == backend."""
    import shutil
    import tempfile

    scratch = Path(tempfile.mkdtemp(prefix="ud", dir="/tmp"))
    try:
        g = Group("hyp", n, 1, seed, upper=upper)
        dirs = make_layer_dirs(scratch / "g", n, upper=upper)
        generate_stack(dirs, seed, fmt="kernel", has_upper=upper, **gen_options)  # type: ignore[arg-type]
        ref = flatten(dirs, forms="kernel")
        ksnap = _mount_snapshot(kernel, scratch, "k", g)
        _check(diff(ref, ksnap, labels=("flatten", "kernel"), dino=False), "reference != kernel")
        bsnap = _mount_snapshot(backend, scratch, "b", g)
        lines = diff(ksnap, bsnap, labels=("kernel", backend.name), **diff_options)  # type: ignore[arg-type]
        _check(lines, f"kernel != {backend.name}")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# Self-checks: the machinery must be able to fail.


def _sample_tree(root: Path) -> None:
    (root / "d").mkdir()
    (root / "d" / "f").write_bytes(b"hello")
    os.link(root / "d" / "f", root / "d" / "hl")
    (root / "g").write_bytes(b"x" * 100)
    os.symlink("/etc", root / "l")
    os.mkfifo(root / "p")
    os.setxattr(root / "g", "user.a", b"1")


MUTATIONS = {
    "content": lambda r: (r / "g").write_bytes(b"y" * 100),
    "size": lambda r: (r / "g").write_bytes(b"x" * 101),
    "mode": lambda r: os.chmod(r / "g", 0o600),
    "owner": lambda r: os.lchown(r / "g", 1000, 1000),
    "xattr": lambda r: os.setxattr(r / "g", "user.a", b"2"),
    "new-xattr": lambda r: os.setxattr(r / "d", "user.b", b""),
    "symlink": lambda r: (os.unlink(r / "l"), os.symlink("/", r / "l")),
    "type": lambda r: (os.unlink(r / "p"), (r / "p").write_bytes(b"")),
    "missing": lambda r: os.unlink(r / "d" / "hl"),
    "extra": lambda r: (r / "d" / "new").write_bytes(b""),
    "hardlink": lambda r: (
        os.unlink(r / "d" / "hl"),
        (r / "d" / "hl").write_bytes(b"hello"),
        os.link(r / "g", r / "d" / "g2"),
        os.unlink(r / "d" / "g2"),
    ),
}


@pytest.mark.parametrize("mutation", sorted(MUTATIONS))
def test_comparator_detects_injected_difference(tmp_path: Path, mutation: str) -> None:
    """Each kind of injected difference is reported by :func:`diff`."""
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    _sample_tree(a)
    copy_tree(a, b)
    assert diff(snapshot(a), snapshot(b)) == [], "identical copies must compare equal"
    MUTATIONS[mutation](b)
    assert diff(snapshot(a), snapshot(b)), f"{mutation} went unnoticed"


def test_inode_partition_detects_broken_and_extra_links(tmp_path: Path) -> None:
    """The inode partition notices a lost hard link and a new shared inode."""
    a = tmp_path / "a"
    a.mkdir()
    _sample_tree(a)
    snap = snapshot(a)
    fake = Snapshot(dict(snap.entries), dict(snap.inodes))
    fake.inodes["d/hl"] = (1, 999_999_999)
    assert any("inode group" in line for line in diff(snap, fake))
    fake = Snapshot(dict(snap.entries), dict(snap.inodes))
    fake.inodes["p"] = fake.inodes["g"]
    assert any("inode group" in line for line in diff(snap, fake))
    fake = Snapshot(dict(snap.entries), dict(snap.inodes), dino_mismatch={"g": (1, 2)})
    assert any("d_ino" in line for line in diff(snap, fake))


def test_flatten_rules_by_hand(tmp_path: Path) -> None:
    """The reference on a hand-written stack with every form (independent of the generator)."""
    top, mid, low = make_layer_dirs(tmp_path, 3)
    for d in (top, mid, low):
        (d / "m").mkdir()
    (low / "m" / "gone").write_text("low")
    (low / "m" / "oci-gone").write_text("low")
    (low / "m" / "xgone").write_text("low")
    (low / "m" / "kept").write_text("low")
    (low / "opq").mkdir()
    (low / "opq" / "hidden").write_text("low")
    (low / "opq2").mkdir()
    (low / "opq2" / "hidden").write_text("low")
    (low / "dir-over-file").write_text("low")
    (low / "file-over-dir").mkdir()
    (low / "file-over-dir" / "x").write_text("low")
    os.mknod(mid / "m" / "gone", stat.S_IFCHR, os.makedev(0, 0))
    os.link(mid / "m" / "gone", mid / "m" / "gone2")
    (mid / "m" / ".wh.oci-gone").touch()
    os.setxattr(mid / "m", "trusted.overlay.opaque", b"x")
    (mid / "m" / "xgone").touch()
    os.setxattr(mid / "m" / "xgone", "trusted.overlay.whiteout", b"")
    (mid / "opq").mkdir()
    os.setxattr(mid / "opq", "trusted.overlay.opaque", b"y")
    (mid / "opq2").mkdir()
    (mid / "opq2" / ".wh..wh..opq").touch()
    (top / "dir-over-file").mkdir()
    (top / "file-over-dir").write_text("top")
    all_forms = set(flatten([top, mid, low], forms="all").entries)
    assert all_forms == {
        "m",
        "m/kept",
        "opq",
        "opq2",
        "dir-over-file",
        "file-over-dir",
    }, all_forms
    kernel_forms = set(flatten([top, mid, low], forms="kernel").entries)
    # The kernel reads neither .wh. names nor .wh..wh..opq.
    assert kernel_forms == all_forms | {
        "m/.wh.oci-gone",
        "m/oci-gone",
        "opq2/.wh..wh..opq",
        "opq2/hidden",
    }, kernel_forms


def test_generator_is_deterministic_and_covers_forms(tmp_path: Path) -> None:
    """Same seed, same trees; across a few seeds every form of each format shows up."""
    a = make_layer_dirs(tmp_path / "a", 4)
    b = make_layer_dirs(tmp_path / "b", 4)
    generate_stack(a, 1234, fmt="mixed")
    generate_stack(b, random.Random(1234), fmt="mixed")
    sa, sb = snapshot(tmp_path / "a"), snapshot(tmp_path / "b")
    assert diff(sa, sb, inodes=False) == []
    for fmt, forms in (
        ("kernel", {"wh_chr", "wh_chr_link", "wh_xattr", "opq_trusted"}),
        ("oci", {"wh_oci", "opq_oci"}),
        ("mixed", {"opq_user", "wh_oci", "wh_chr"}),
    ):
        seen: set[str] = set()
        for s in range(20):
            dirs = make_layer_dirs(tmp_path / f"{fmt}{s}", 4)
            seen |= set(generate_stack(dirs, s, fmt=fmt).counts)
        assert forms <= seen, (fmt, forms - seen)
