"""Write-path differential tests: the same operations on the backend and on the kernel.

Layers are generated (kernel format, optionally with a pre-existing upper), copied with
``cp -a`` for each side, and mounted read-write by the kernel (``redirect_dir=off,index=off,
metacopy=off,xino=off``) and by the backend.  Many sequences share one mount pair: sequence
``i`` works only inside subtree ``sNNN`` and its first operations are drawn from that subtree.

Every sequence draws a umask (000, 002, 022, 027) and a share of operations that run as root;
the others run as uid/gid 1000 or 65534 in a forked child (:mod:`tests.oracle.ops`).  Open
handles stay open across the operations of a sequence.

Per operation the outcome (errno name, or "ok" plus return value and lstat/fstat summaries)
must match.  After each phase of sequences, per subtree:

* ``merged``: the merged trees (every visible xattr, all namespaces);
* ``upper``: the upper directories as stored, every xattr in every namespace
  (``trusted.overlay.origin``/``impure`` by presence, see ``UNIONFS_DIFF_ORIGIN``);
* ``kernel-view``: the kernel's read-only mount of each side's layers *with its upper as the
  top lower* (the kernel reading our upper vs the kernel reading its own);
* ``remount``: the backend remounted on the same layers shows what the kernel showed.

Then, for rotating pairs, the upper of each side becomes that side's top lower, a new empty
upper is added, and the sequences go on (twice): lowers that hold whiteouts, opaque dirs and
copied-up files the backend and the kernel wrote themselves.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.oracle.backends import (
    Backend,
    KernelOverlay,
    copy_tree,
    daemon_tracebacks,
    long_run_examples,
    own_dino_lines,
)
from tests.oracle.layergen import generate_stack, make_layer_dirs
from tests.oracle.ops import DEFAULT_CTX, XATTR_NAMES, Op, Runner, SeqContext, apply, random_op
from tests.oracle.tree import diff, diff_upper, format_report, snapshot, upper_snapshot


@dataclass
class Side:
    """One side of a pair: its backend, layer dirs (top lower first), upper, work, mount."""

    be: Backend
    base: Path
    lowers: list[Path]
    upper: Path
    work: Path
    mnt: Path
    generation: int = 0

    def mount(self, stack: ExitStack) -> Path:
        """Mount read-write on the current layers (unmounted when ``stack`` closes)."""
        return stack.enter_context(self.be.mount(self.lowers, self.upper, self.work, self.mnt))

    def rotate(self) -> None:
        """Make the upper the top lower; start with a new empty upper and workdir."""
        self.generation += 1
        rotated = self.base / f"r{self.generation}"
        self.upper.rename(rotated)
        shutil.rmtree(self.work)
        self.lowers = [rotated, *self.lowers]
        self.upper.mkdir()
        self.work.mkdir()


@dataclass
class Pair:
    """A kernel side and a backend side mounted on identical copies of one layer set."""

    k: Side
    b: Side
    subtrees: list[str] = field(default_factory=list)

    @property
    def kmnt(self) -> Path:
        return self.k.mnt

    @property
    def bmnt(self) -> Path:
        return self.b.mnt

    @property
    def kupper(self) -> Path:
        return self.k.upper

    @property
    def bupper(self) -> Path:
        return self.b.upper


def build_pair(
    root: Path,
    kernel: KernelOverlay,
    backend: Backend,
    n_layers: int,
    seeds: list[int],
    *,
    upper: bool,
    gen_options: dict[str, object],
    names: list[str] | None = None,
) -> Pair:
    """Generate one subtree per seed below ``root/g`` and copy the layers for each side.

    Subtree names default to ``sNNN`` with NNN the seed modulo 1,000,000 (the sequence index
    within its pair)."""
    dirs = make_layer_dirs(root / "g", n_layers, upper=True)
    subs = []
    for i, seed in enumerate(seeds):
        sub = names[i] if names else f"s{seed % 1_000_000:03d}"
        gen_dirs = dirs if upper else dirs[1:]
        generate_stack(gen_dirs, seed, prefix=sub, has_upper=upper, **gen_options)  # type: ignore[arg-type]
        subs.append(sub)
    sides = []
    for be, tag in ((kernel, "k"), (backend, "b")):
        copy_tree(root / "g", root / tag)
        (root / tag / "w").mkdir()
        sides.append(
            Side(
                be,
                root / tag,
                [root / tag / str(i) for i in range(n_layers)],
                root / tag / "u",
                root / tag / "w",
                root / f"m{tag}",
            )
        )
    return Pair(sides[0], sides[1], subs)


@contextmanager
def mount_pair(
    kernel: KernelOverlay,
    backend: Backend,
    n_layers: int,
    seeds: list[int],
    *,
    upper: bool,
    gen_options: dict[str, object],
    names: list[str] | None = None,
) -> Iterator[Pair]:
    """Generate one subtree per seed, copy the layers twice, mount both sides; always clean."""
    root = Path(tempfile.mkdtemp(prefix="ud", dir="/tmp"))
    try:
        pair = build_pair(
            root,
            kernel,
            backend,
            n_layers,
            seeds,
            upper=upper,
            gen_options=gen_options,
            names=names,
        )
        with ExitStack() as stack:
            pair.k.mount(stack)
            pair.b.mount(stack)
            yield pair
    finally:
        shutil.rmtree(root, ignore_errors=True)


@dataclass
class SeqOutcome:
    """The result of one sequence: difference lines and the category of the first one."""

    lines: list[str]
    category: str = ""
    log: list[str] = field(default_factory=list)


def run_ops(
    pair: Pair,
    sub: str,
    op_seeds: list[int],
    backend: Backend,
    exclude: frozenset[str],
    ctx: SeqContext,
    runners: tuple[Runner, Runner] | None = None,
) -> SeqOutcome:
    """Apply one operation per seed to both mounts inside ``sub`` (handles stay open in the
    runners until the caller closes them); the first differing result ends the sequence."""
    rk, rb = runners or (Runner(pair.kmnt), Runner(pair.bmnt))
    log: list[str] = [f"context: umask {ctx.umask:03o}, root share {ctx.root_share}"]
    for n, s in enumerate(op_seeds):
        op = random_op(random.Random(s), pair.kmnt, sub, exclude, ctx=ctx, handles=rk.open_slots())
        a, b = rk.apply(op), rb.apply(op)
        log.append(f"#{n} {op}: {a.outcome}")
        if a != b:
            return SeqOutcome(
                [
                    *log,
                    f"operation result differs at #{n} {op}:",
                    f"    kernel: {a}",
                    f"    {backend.name}: {b}",
                ],
                f"op:{op.kind}",
            )
    return SeqOutcome([], log=log)


def compare_views(
    pair: Pair, sub: str, backend: Backend, diff_options: dict[str, object]
) -> SeqOutcome:
    """Compare the merged subtrees and the upper subtrees of both live mounts."""
    bsnap = snapshot(pair.bmnt, under=sub, all_xattrs=True)
    lines = diff(
        snapshot(pair.kmnt, under=sub, all_xattrs=True),
        bsnap,
        labels=("kernel", backend.name),
        **diff_options,  # type: ignore[arg-type]
    )
    lines += own_dino_lines(backend, bsnap)
    if lines:
        return SeqOutcome(lines, "merged")
    if "upper-format" not in backend.known_gaps:
        lines = diff_upper(
            upper_snapshot(pair.kupper, under=sub),
            upper_snapshot(pair.bupper, under=sub),
            labels=("kernel", backend.name),
        )
        if lines:
            return SeqOutcome(lines, "upper")
    return SeqOutcome([])


def run_sequence(
    pair: Pair,
    sub: str,
    op_seeds: list[int],
    backend: Backend,
    diff_options: dict[str, object],
    exclude: frozenset[str],
    ctx: SeqContext = DEFAULT_CTX,
) -> list[str]:
    """One whole sequence on live mounts: operations, then merged and upper comparisons."""
    out = run_with_handles(pair, sub, op_seeds, backend, diff_options, exclude, ctx)
    return [f"[{out.category}]", *out.lines] if out.lines else []


def run_with_handles(
    pair: Pair,
    sub: str,
    op_seeds: list[int],
    backend: Backend,
    diff_options: dict[str, object],
    exclude: frozenset[str],
    ctx: SeqContext,
) -> SeqOutcome:
    """Operations, views compared with the handles still open (an unlinked-but-open file
    shows nowhere), the handles closed on both sides (close errors compared), views again."""
    runners = (Runner(pair.kmnt), Runner(pair.bmnt))
    log: list[str] = []
    try:
        out = run_ops(pair, sub, op_seeds, backend, exclude, ctx, runners)
        log = out.log
        if not out.lines:
            out = compare_views(pair, sub, backend, diff_options)
    finally:
        closed = [r.close() for r in runners]
    if out.lines:
        if out.category.startswith("op:"):
            return out
        return SeqOutcome([*log, *out.lines], out.category)
    if closed[0] != closed[1]:
        return SeqOutcome(
            [*log, f"close(2) of the open handles: kernel {closed[0]}, {backend.name} {closed[1]}"],
            "close",
        )
    out = compare_views(pair, sub, backend, diff_options)
    return SeqOutcome([*log, *out.lines], out.category) if out.lines else out


def _op_exclude(backend: Backend) -> frozenset[str]:
    """Operation kinds left out for a stand-in with documented gaps."""
    out: set[str] = set()
    if "dir-rename" in backend.known_gaps:
        out |= {"rename", "rename_noreplace", "rename_exchange"}
    for gap in ("tmpfile", "falloc-collapse-insert"):
        if gap in backend.known_gaps:
            out.add(gap)
    if "user-overlay-xattrs" in backend.known_gaps:
        out |= {n for n in XATTR_NAMES if n.startswith("user.overlay.")}
    # UNIONFS_DIFF_SKIP=kind,feature,xattr.name,...: leave things out of a run by hand (to
    # look past a difference already known); CI never sets it.
    out |= {x for x in os.environ.get("UNIONFS_DIFF_SKIP", "").split(",") if x}
    return frozenset(out)


def _ro_view(side: Side, kernel: KernelOverlay, tag: str, subs: list[str]) -> dict[str, object]:
    """The kernel's read-only view of ``side``'s layers with its upper as the top lower."""
    mnt = side.base.parent / f"ro{tag}"
    with kernel.mount([side.upper, *side.lowers], None, None, mnt) as m:
        return {s: snapshot(m, under=s, all_xattrs=True) for s in subs}


@dataclass
class Stats:
    """How many sequences ran and how many differed, by category (for the long run's
    report: ``UNIONFS_DIFF_REPORT=file.json`` appends one JSON line per test)."""

    sequences: int = 0
    differing: Counter[str] = field(default_factory=Counter)

    def dump(self, name: str, failures: list[str]) -> None:
        """Append the counts to ``$UNIONFS_DIFF_REPORT`` and every failure text to
        ``$UNIONFS_DIFF_REPORT.txt`` (the test itself shows only the first three)."""
        path = os.environ.get("UNIONFS_DIFF_REPORT")
        if path:
            with open(path, "a", encoding="utf-8") as f:
                rec = {"test": name, "sequences": self.sequences, "differing": self.differing}
                f.write(json.dumps(rec) + "\n")
            with open(path + ".txt", "a", encoding="utf-8") as f:
                for text in failures:
                    f.write(f"== {name}\n{text}\n")


def run_phases(
    kernel: KernelOverlay,
    backend: Backend,
    pair_index: int,
    n_layers: int,
    upper: bool,
    rotations: int,
    per_pair: int,
    ops: int,
    gen_options: dict[str, object],
    diff_options: dict[str, object],
    only: list[int] | None = None,
) -> tuple[list[str], Stats]:
    """Run ``per_pair`` sequences of ``ops`` operations in ``rotations + 1`` phases on one
    pair; between phases compare the kernel's view of both uppers and a backend remount, then
    rotate the uppers into the lower stacks.

    ``only`` replays just the sequences with those indices (the subtrees are independent:
    sequence ``i`` is generated from seed ``base + i`` alone, so a replay is faithful)."""
    base = 1_000_000 * (pair_index + 1)
    seeds = [base + i for i in (only if only is not None else range(per_pair))]
    exclude = _op_exclude(backend)
    stats = Stats(sequences=per_pair)
    failures: list[str] = []
    dead: set[str] = set()
    ctxs = {}
    root = Path(tempfile.mkdtemp(prefix="ud", dir="/tmp"))

    def fail(sub: str, seed: int, phase: int, category: str, lines: list[str]) -> None:
        dead.add(sub)
        stats.differing[category] += 1
        failures.append(
            format_report(f"sequence {sub} (seed {seed}, phase {phase}) [{category}]:", lines)
        )

    try:
        pair = build_pair(
            root, kernel, backend, n_layers, seeds, upper=upper, gen_options=gen_options
        )
        for phase in range(rotations + 1):
            ksnaps = {}
            with ExitStack() as stack:
                pair.k.mount(stack)
                pair.b.mount(stack)
                for sub, seed in zip(pair.subtrees, seeds, strict=True):
                    if sub in dead:
                        continue
                    rng = random.Random(seed * 7 + phase)
                    ctx = ctxs.setdefault(sub, SeqContext.draw(random.Random(seed)))
                    op_seeds = [rng.getrandbits(32) for _ in range(ops)]
                    out = run_with_handles(pair, sub, op_seeds, backend, diff_options, exclude, ctx)
                    if out.lines:
                        fail(sub, seed, phase, out.category, out.lines)
                    else:
                        ksnaps[sub] = snapshot(pair.kmnt, under=sub, all_xattrs=True)
            tb = daemon_tracebacks(pair.bmnt) if backend.fuse else ""
            if tb:
                stats.differing["traceback"] += 1
                failures.append(f"phase {phase}: the daemon logged tracebacks:\n{tb[:6000]}")
                Path(pair.bmnt.as_posix() + ".log").unlink()
            live = [s for s in pair.subtrees if s not in dead]
            if "upper-format" not in backend.known_gaps:
                kview = _ro_view(pair.k, kernel, "k", live)
                bview = _ro_view(pair.b, kernel, "b", live)
                for sub, seed in zip(pair.subtrees, seeds, strict=True):
                    if sub in live:
                        lines = diff(
                            kview[sub],
                            bview[sub],
                            labels=("kernel", "kernel-on-ours"),  # type: ignore[arg-type]
                            **diff_options,
                        )  # type: ignore[arg-type]
                        if lines:
                            fail(sub, seed, phase, "kernel-view", lines)
            with ExitStack() as stack:
                pair.b.mount(stack)
                for sub, seed in zip(pair.subtrees, seeds, strict=True):
                    if sub in dead:
                        continue
                    lines = diff(
                        ksnaps[sub],
                        snapshot(pair.bmnt, under=sub, all_xattrs=True),
                        labels=("kernel", f"{backend.name} remounted"),
                        **diff_options,  # type: ignore[arg-type]
                    )
                    if lines:
                        fail(sub, seed, phase, "remount", lines)
            if phase < rotations:
                pair.k.rotate()
                pair.b.rotate()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return failures, stats


PAIRS = [(i, 3 + i % 3, i % 2 == 1, 2 if i % 3 == 0 else 0) for i in range(10)]
SEQUENCES_PER_PAIR = 30
OPS_PER_SEQUENCE = 25


@pytest.mark.mount
@pytest.mark.kernel
@pytest.mark.parametrize("pair_index,n_layers,upper,rotations", PAIRS, ids=lambda v: str(v))
def test_seeded_sequences(
    pair_index: int,
    n_layers: int,
    upper: bool,
    rotations: int,
    kernel: KernelOverlay,
    backend: Backend,
    gen_options: dict[str, object],
    diff_options: dict[str, object],
) -> None:
    """30 seeded sequences of 25 operations per mount pair (300 in CI over 10 pairs); pairs
    0, 3, 6, 9 run three phases with the upper rotated into the lowers in between."""
    per_pair = max(SEQUENCES_PER_PAIR, long_run_examples(0) // len(PAIRS))
    ops = OPS_PER_SEQUENCE if not rotations else OPS_PER_SEQUENCE // 2
    failures, stats = run_phases(
        kernel,
        backend,
        pair_index,
        n_layers,
        upper,
        rotations,
        per_pair,
        ops,
        gen_options,
        diff_options,
    )
    stats.dump(f"pair{pair_index}", failures)
    cats = ", ".join(f"{k}: {v}" for k, v in sorted(stats.differing.items()))
    _report(backend, failures, f"{len(failures)} of {per_pair} sequences differ ({cats})")


def _report(backend: Backend, failures: list[str], title: str) -> None:
    """Fail with the first differences, or xfail for a stand-in with documented write gaps."""
    if not failures:
        return
    text = title + "\n" + "\n".join(failures[:3])
    if "write-semantics" in backend.known_gaps:
        pytest.xfail(f"{backend.name}: documented write-path gaps (docs/testing.md): {text[:2000]}")
    pytest.fail(text)


class Arena:
    """Fresh subtrees with *identical* initial content, so hypothesis replays are faithful.

    Subtrees of base ``b`` are all generated from seed ``b``; when a pair's subtrees are used
    up, a new pair is mounted.
    """

    COPIES = 16

    def __init__(self, kernel: KernelOverlay, backend: Backend, gen_options: dict[str, object]):
        self.kernel, self.backend, self.gen_options = kernel, backend, gen_options
        self.stack = ExitStack()
        self.free: dict[int, list[tuple[Pair, str]]] = {}

    def take(self, base: int) -> tuple[Pair, str]:
        """A never-used subtree whose initial content comes from seed ``base``."""
        if not self.free.get(base):
            upper = base % 2 == 1
            pair = self.stack.enter_context(
                mount_pair(
                    self.kernel,
                    self.backend,
                    3,
                    [7_000 + base] * self.COPIES,
                    upper=upper,
                    gen_options=self.gen_options,
                    names=[f"s{i:03d}" for i in range(self.COPIES)],
                )
            )
            self.free[base] = [(pair, s) for s in pair.subtrees]
        return self.free[base].pop()

    def close(self) -> None:
        """Unmount every pair."""
        self.stack.close()


@pytest.fixture
def arena(
    kernel: KernelOverlay, backend: Backend, gen_options: dict[str, object]
) -> Iterator[Arena]:
    """An :class:`Arena` that unmounts everything at the end of the test."""
    a = Arena(kernel, backend, gen_options)
    try:
        yield a
    finally:
        a.close()


@pytest.mark.mount
@pytest.mark.kernel
@settings(
    max_examples=long_run_examples(60),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    base=st.integers(0, 5),
    umask=st.sampled_from((0o000, 0o002, 0o022, 0o027)),
    root_share=st.sampled_from((1.0, 0.5, 0.0)),
    op_seeds=st.lists(st.integers(0, 2**32 - 1), min_size=1, max_size=40),
)
def test_hypothesis_sequences(
    base: int,
    umask: int,
    root_share: float,
    op_seeds: list[int],
    arena: Arena,
    backend: Backend,
    diff_options: dict[str, object],
) -> None:
    """Hypothesis-driven sequences (shrinks to the shortest failing list of operations)."""
    pair, sub = arena.take(base)
    ctx = SeqContext(umask, root_share)
    lines = run_sequence(pair, sub, op_seeds, backend, diff_options, _op_exclude(backend), ctx)
    if lines and "write-semantics" in backend.known_gaps:
        pytest.xfail(f"{backend.name}: documented write-path gaps (docs/testing.md)")
    assert not lines, format_report(f"base {base}, subtree {sub}:", lines)


# ---------------------------------------------------------------------------------------------
# Self-checks and pinned kernel behaviour


@pytest.mark.mount
@pytest.mark.kernel
def test_kernel_pins_dir_rename_exdev(kernel: KernelOverlay, backend: Backend) -> None:
    """With redirect_dir=off the kernel refuses to rename a lower directory (EXDEV)."""
    root = Path(tempfile.mkdtemp(prefix="ud", dir="/tmp"))
    try:
        dirs = make_layer_dirs(root, 2, upper=True)
        (dirs[2] / "d").mkdir()
        (root / "w").mkdir()
        with kernel.mount(dirs[1:], dirs[0], root / "w", root / "m") as m:
            assert apply(m, Op("rename", "d", "e")).outcome == "EXDEV"
            assert apply(m, Op("mkdir", "p", arg=0o755)).outcome == "ok"
            assert apply(m, Op("rename", "p", "q")).outcome == "ok"
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.mount
@pytest.mark.kernel
def test_sequence_runner_detects_divergence(
    kernel: KernelOverlay, diff_options: dict[str, object]
) -> None:
    """Two kernel mounts whose layers differ by one byte must be reported as different."""
    with mount_pair(
        kernel, KernelOverlay(), 3, [42], upper=False, gen_options={}, names=["s000"]
    ) as p:
        # Change the backend side behind the mount's back, in its upper (visible at once).
        (p.bupper / "s000").mkdir(exist_ok=True)
        (p.bupper / "s000" / "injected").write_bytes(b"x")
        lines = run_sequence(p, "s000", [1, 2, 3], KernelOverlay(), diff_options, frozenset())
        assert any("injected" in line for line in lines), lines


@pytest.mark.mount
@pytest.mark.kernel
def test_upper_comparison_sees_every_xattr_namespace(
    kernel: KernelOverlay, diff_options: dict[str, object]
) -> None:
    """An extra ``trusted.*`` xattr in one upper is reported, and so is a missing
    ``trusted.overlay.origin`` (compared by presence)."""
    with mount_pair(
        kernel, KernelOverlay(), 3, [43], upper=False, gen_options={}, names=["s000"]
    ) as p:
        for up in (p.kupper, p.bupper):
            (up / "s000").mkdir(exist_ok=True)
            (up / "s000" / "f").write_bytes(b"x")
        os.setxattr(p.bupper / "s000" / "f", "trusted.unionfs.origin", b"1")
        os.setxattr(p.kupper / "s000" / "f", "trusted.overlay.origin", b"2")
        lines = diff_upper(upper_snapshot(p.kupper), upper_snapshot(p.bupper))
        text = "\n".join(lines)
        assert "trusted.unionfs.origin" in text and "trusted.overlay.origin" in text, lines
