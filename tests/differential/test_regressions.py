"""Regression tests for the differences of issue 10, each checked against the kernel.

Every case builds small layers, copies them for each side (``cp -a``), mounts the kernel's
overlayfs and the backend, applies the same operations through :class:`tests.oracle.ops.Runner`
(handles kept open, callers with their own uid/gid/umask) and requires equal results for every
operation, then equal merged trees (every xattr), equal upper directories (every xattr in every
namespace), and the same view after the backend is remounted.  The daemon log must hold no
traceback.  Nothing here is expected to fail for the kernel itself
(``UNIONFS_DIFF_BACKEND=kernel`` runs the machinery against the kernel on both sides).
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.oracle.backends import Backend, KernelOverlay, copy_tree, daemon_tracebacks
from tests.oracle.ops import (
    FALLOC_FL_COLLAPSE_RANGE,
    FALLOC_FL_INSERT_RANGE,
    FALLOC_MODES,
    NAME_255,
    NAME_256,
    O_PATH,
    O_TMPFILE,
    Caller,
    Op,
    Runner,
)
from tests.oracle.tree import diff, diff_upper, snapshot, upper_snapshot

U1000 = Caller(1000, 1000, (1000,))
U1000_022 = Caller(1000, 1000, (1000,), 0o022)
UMASK0 = Caller(umask=0)
UMASK002 = Caller(umask=0o002)


def _file(
    p: Path, data: bytes = b"data", mode: int = 0o644, owner: tuple[int, int] = (0, 0)
) -> None:
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data)
    os.chmod(p, mode)
    os.lchown(p, *owner)


def _dir(p: Path, mode: int = 0o755, owner: tuple[int, int] = (0, 0)) -> None:
    p.mkdir(parents=True, exist_ok=True)
    os.chmod(p, mode)
    os.lchown(p, *owner)


@dataclass
class Stack:
    """One side's layers: ``lowers`` (top first), upper and workdir, mounted at ``mnt``."""

    be: Backend
    lowers: list[Path]
    upper: Path
    work: Path
    mnt: Path

    def mount(self, stack: ExitStack) -> Path:
        return stack.enter_context(self.be.mount(self.lowers, self.upper, self.work, self.mnt))


def _stacks(
    root: Path, kernel: KernelOverlay, backend: Backend, setup: Callable[[list[Path]], None], n: int
) -> tuple[Stack, Stack]:
    """``n`` lowers set up by ``setup`` (given the layer dirs, top first), copied per side."""
    g = root / "g"
    layers = [g / str(i) for i in range(n)]
    for p in layers:
        p.mkdir(parents=True)
    (g / "u").mkdir()
    setup(layers)
    out = []
    for be, tag in ((kernel, "k"), (backend, "b")):
        copy_tree(g, root / tag)
        (root / tag / "w").mkdir()
        out.append(
            Stack(
                be,
                [root / tag / str(i) for i in range(n)],
                root / tag / "u",
                root / tag / "w",
                root / f"m{tag}",
            )
        )
    return out[0], out[1]


def check_case(
    kernel: KernelOverlay,
    backend: Backend,
    setup: Callable[[list[Path]], None],
    ops: Sequence[Op],
    *,
    n_lowers: int = 2,
) -> None:
    """Apply ``ops`` on both sides; assert equal results, trees, uppers and remounted views."""
    root = Path(tempfile.mkdtemp(prefix="ur", dir="/tmp"))
    try:
        k, b = _stacks(root, kernel, backend, setup, n_lowers)
        problems: list[str] = []
        with ExitStack() as stack:
            km, bm = k.mount(stack), b.mount(stack)
            rk, rb = Runner(km), Runner(bm)
            try:
                for n, op in enumerate(ops):
                    a, c = rk.apply(op), rb.apply(op)
                    if a != c:
                        problems.append(f"#{n} {op}:\n    kernel: {a}\n    {backend.name}: {c}")
                ksnap = snapshot(km, all_xattrs=True)
                problems += diff(
                    ksnap, snapshot(bm, all_xattrs=True), labels=("kernel", backend.name)
                )
            finally:
                ck, cb = rk.close(), rb.close()
            if ck != cb:
                problems.append(f"close(2): kernel {ck}, {backend.name} {cb}")
        problems += diff_upper(
            upper_snapshot(k.upper), upper_snapshot(b.upper), labels=("kernel", backend.name)
        )
        with ExitStack() as stack:
            problems += diff(
                ksnap,
                snapshot(b.mount(stack), all_xattrs=True),
                labels=("kernel", f"{backend.name} remounted"),
            )
        tb = daemon_tracebacks(b.mnt) if backend.fuse else ""
        if tb:
            problems.append(f"daemon traceback:\n{tb}")
        assert not problems, "\n".join(problems)
    finally:
        shutil.rmtree(root, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# The cases: (setup of the lowers, operations)


def _lower_file(layers: list[Path]) -> None:
    _file(layers[1] / "f", b"0123456789" * 100)
    _file(layers[0] / "g", b"upper-lower top")


def _handle_unlinked(access: int) -> list[Op]:
    ops = [Op("open", "f", arg=(access | os.O_NONBLOCK, 0))]
    if access != os.O_RDONLY:
        ops.append(Op("hwrite", arg=(0, b"written", 3)))
    ops += [
        Op("unlink", "f"),
        Op("hread", arg=(0, 100, 0)),
        Op("hstat", arg=(0,)),
        Op("hreopen", arg=(0,)),
    ]
    if access != os.O_RDONLY:
        ops += [
            Op("hwrite", arg=(0, b"after unlink", 10)),
            Op("htrunc", arg=(0, 5000)),
            Op("hfalloc", arg=(0, 0, 0, 8192)),
            Op("hread", arg=(0, 20000, 0)),
            Op("hstat", arg=(0,)),
        ]
    return ops


def _lower_links(layers: list[Path]) -> None:
    _file(layers[1] / "d", b"linked lower data " * 20, 0o640, (1000, 1000))
    os.link(layers[1] / "d", layers[1] / "e")
    os.link(layers[1] / "d", layers[1] / "sub-e")
    _file(layers[1] / "other", b"x", 0o600, (65534, 65534))


def _umask_setup(layers: list[Path]) -> None:
    _dir(layers[1] / "d", 0o777)
    _dir(layers[1] / "sg", 0o2777, (0, 1000))


def _setuid_setup(layers: list[Path]) -> None:
    for mode in (0o4777, 0o2777, 0o6777, 0o2767):
        _file(layers[1] / f"f{mode:o}", b"setuid file", mode, (0, 0))


def _sticky_setup(layers: list[Path]) -> None:
    _dir(layers[1] / "t", 0o1777)
    _file(layers[1] / "t" / "mine", b"m", 0o644, (1000, 1000))
    _file(layers[1] / "t" / "root", b"r", 0o644, (0, 0))
    _dir(layers[1] / "ro", 0o755)
    _file(layers[1] / "ro" / "mine", b"m", 0o644, (1000, 1000))
    _dir(layers[1] / "w", 0o777)
    _file(layers[1] / "w" / "root", b"r", 0o644, (0, 0))


def _names_setup(layers: list[Path]) -> None:
    _dir(layers[1] / "d")
    _file(layers[1] / "d" / NAME_255, b"255")
    _dir(layers[1] / "d" / ("E" * 255))
    _file(layers[1] / "src", b"source")


def _names_ops() -> list[Op]:
    long_ = "d/" + NAME_255
    too_long = "d/" + NAME_256
    ops: list[Op] = []
    for name in (long_, too_long):
        ops += [
            Op("truncate", name, arg=1),
            Op("chmod", name, arg=0o600),
            Op("chown", name, arg=(1000, 1000)),
            Op("utime", name, arg=(10**9, 10**9)),
            Op("setxattr", name, arg=("user.x", b"1", 0)),
            Op("link", name, "d/l" + "k" * 253),
            Op("rename", name, "d/r" + "k" * 254),
            Op("rename", "d/r" + "k" * 254, name),
            Op("unlink", name),
            Op("mkdir", name, arg=0o755),
            Op("rmdir", name),
            Op("mkfifo", name),
            Op("unlink", name),
            Op("mknod", name, arg=(stat.S_IFIFO | 0o644, 0, 0)),
            Op("unlink", name),
            Op("symlink", name, arg="target"),
            Op("unlink", name),
            Op("write", name, arg=("excl", b"new", 0)),
            Op("link", name, "src"),
            Op("link", "src", name),
            Op("rename", "src", name),
            Op("rename", name, "src"),
            Op("rmdir", "d/" + "E" * 255),
        ]
    return ops


FUSE_FALLOC_MODES = tuple(
    m for m in FALLOC_MODES if not m & (FALLOC_FL_COLLAPSE_RANGE | FALLOC_FL_INSERT_RANGE)
)

CASES: dict[str, tuple[Callable[[list[Path]], None], list[Op]]] = {
    "unlinked-handle-rdwr": (_lower_file, _handle_unlinked(os.O_RDWR)),
    "unlinked-handle-rdonly": (_lower_file, _handle_unlinked(os.O_RDONLY)),
    "unlinked-handle-wronly-upper": (
        _lower_file,
        [
            Op("write", "n", arg=("trunc", b"new file", 0)),
            Op("open", "n", arg=(os.O_RDWR, 0)),
            Op("unlink", "n"),
            Op("hwrite", arg=(0, b"more", 0)),
            Op("hstat", arg=(0,)),
            Op("hread", arg=(0, 100, 0)),
        ],
    ),
    "renamed-over-handle-nlink": (
        _lower_file,
        [
            Op("open", "g", arg=(os.O_RDWR, 0)),
            Op("open", "f", arg=(os.O_RDONLY, 0)),
            Op("rename", "f", "g"),
            Op("hstat", arg=(0,)),
            Op("hstat", arg=(1,)),
            Op("hwrite", arg=(0, b"to the old g", 0)),
            Op("hread", arg=(0, 100, 0)),
            Op("hread", arg=(1, 100, 0)),
        ],
    ),
    # fstat of an O_PATH handle (no FUSE open, so nothing pinned) after its name went: the
    # daemon statted the *name*, found the whiteout (char 0/0) or another object there, and
    # the FUSE module turned the changed file type into EIO.
    "opath-handle-after-unlink": (
        _lower_file,
        [
            Op("open", "f", arg=(O_PATH, 0)),
            Op("unlink", "f"),
            Op("hstat", arg=(0,)),
            Op("chown", "g", arg=(1000, 1000)),
            Op("open", "g", arg=(O_PATH | os.O_NOFOLLOW, 0)),
            Op("unlink", "g"),
            Op("hstat", arg=(1,)),
        ],
    ),
    "opath-handle-after-rename-over": (
        _lower_file,
        [
            Op("open", "f", arg=(O_PATH, 0)),
            Op("mkdir", "d", arg=0o755),
            Op("rename", "d", "f2"),
            Op("symlink", "s", arg="target"),
            Op("rename", "s", "f"),
            Op("hstat", arg=(0,)),
            Op("open", "g", arg=(O_PATH, 0)),
            Op("unlink", "g"),
            Op("mkdir", "g", arg=0o700),
            Op("hstat", arg=(1,)),
            Op("hreopen", arg=(1,)),
        ],
    ),
    # A link set made through the mount, then the first name unlinked: the node was located
    # by that name, and the other name gave ESTALE (fifo, symlink, file, copied-up file).
    "link-then-unlink-the-first-name": (
        _lower_file,
        [
            Op("mkfifo", "p"),
            Op("link", "p", "p2"),
            Op("unlink", "p"),
            Op("chown", "p2", arg=(1000, 1000)),
            Op("symlink", "s", arg="target"),
            Op("link", "s", "s2"),
            Op("unlink", "s"),
            Op("utime", "s2", arg=(10**18, 10**18)),
            Op("write", "n", arg=("trunc", b"new", 0)),
            Op("link", "n", "n2"),
            Op("unlink", "n"),
            Op("truncate", "n2", arg=1),
            Op("link", "f", "f2"),
            Op("unlink", "f"),
            Op("chmod", "f2", arg=0o600),
            Op("read", "f2"),
        ],
    ),
    # An O_RDONLY handle on a file copied up by fallocate, then the name unlinked: fstat ESTALE.
    "handle-of-copied-up-file-after-unlink": (
        _lower_file,
        [
            Op("fallocate", "f", arg=(0x10, 0, 12288)),
            Op("open", "f", arg=(os.O_RDONLY | os.O_EXCL | os.O_NONBLOCK, 0)),
            Op("unlink", "f"),
            Op("hread", arg=(0, 100, 0)),
            Op("hstat", arg=(0,)),
        ],
    ),
    "lower-hardlinks-copy-up": (
        _lower_links,
        [
            Op("chmod", "d", arg=0o600),
            Op("rename", "e", "n2"),
            Op("open", "d", arg=(os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o644)),
            Op("hwrite", arg=(0, b"y" * 199, 0)),
            Op("hstat", arg=(0,)),
            Op("hclose", arg=(0,)),
            Op("read", "d"),
            Op("read", "n2"),
            Op("read", "sub-e"),
            Op("link", "sub-e", "l3"),
            Op("write", "sub-e", arg=("append", b"z", 0)),
            Op("read", "l3"),
            Op("rename", "other", "n2"),
            Op("write", "d", arg=("append", b"after rename-over", 0)),
            Op("read", "d"),
            Op("read", "n2"),
        ],
    ),
    "umask": (
        _umask_setup,
        [
            Op("write", "d/f0", arg=("excl", b"", 0), caller=UMASK0),
            Op("open", "d/f1", arg=(os.O_CREAT | os.O_WRONLY, 0o666), caller=UMASK0),
            Op("mkdir", "d/m0", arg=0o777, caller=UMASK0),
            Op("mkdir", "d/m2", arg=0o777, caller=UMASK002),
            Op("mkfifo", "d/p2", caller=UMASK002),
            Op("mknod", "d/n2", arg=(stat.S_IFIFO | 0o666, 0, 0), caller=UMASK002),
            Op("symlink", "d/s2", arg="x", caller=UMASK002),
            Op("open", "d/f27", arg=(os.O_CREAT | os.O_RDWR, 0o777), caller=Caller(umask=0o027)),
            Op("mkdir", "sg/m", arg=0o777, caller=Caller(1000, 1000, (1000,), 0o002)),
            Op("open", "sg/f", arg=(os.O_CREAT | os.O_WRONLY, 0o2777), caller=U1000_022),
            Op("open", "d/t", arg=(O_TMPFILE | os.O_RDWR, 0o666), caller=UMASK0),
        ],
    ),
    "open-rdonly-trunc": (
        _lower_file,
        [
            Op("open", "f", arg=(os.O_RDONLY | os.O_TRUNC, 0)),
            Op("hstat", arg=(0,)),
            Op("open", "g", arg=(os.O_RDONLY | os.O_CREAT | os.O_TRUNC, 0o644)),
            Op("open", "new", arg=(os.O_RDONLY | os.O_CREAT | os.O_TRUNC, 0o644)),
            Op("open", "f", arg=(os.O_RDONLY | os.O_TRUNC, 0), caller=U1000),
        ],
    ),
    "names-255-256": (_names_setup, _names_ops()),
    "setuid-write-by-non-owner": (
        _setuid_setup,
        [
            op
            for slot, mode in enumerate((0o4777, 0o2777, 0o6777, 0o2767))
            for op in (
                Op("open", f"f{mode:o}", arg=(os.O_WRONLY, 0), caller=U1000),
                Op("hwrite", arg=(slot, b"w", 0), caller=U1000),
                Op("hstat", arg=(slot,)),
            )
        ]
        + [Op("truncate", "f4777", arg=0, caller=U1000), Op("chmod", "f2767", arg=0o6777)]
        + [Op("write", "f2767", arg=("append", b"x", 0), caller=U1000)],
    ),
    "sticky-and-readonly-dir-renames": (
        _sticky_setup,
        [
            Op("rename", "t/mine", "t/mine2", caller=U1000),
            Op("rename", "t/root", "t/x", caller=U1000),
            Op("rename", "t/mine2", "t/root", caller=U1000),
            Op("unlink", "t/root", caller=U1000),
            Op("rename", "ro/mine", "ro/m2", caller=U1000),
            Op("rename", "ro/mine", "t/m3", caller=U1000),
            Op("rename", "w/root", "w/r2", caller=U1000),
            Op("rename_exchange", "w/r2", "t/mine2", caller=U1000),
        ],
    ),
    # The modes FUSE forwards; collapse/insert-range are a documented difference, refused
    # by the kernel's FUSE module itself (test_collapse_and_insert_range_are_refused_by_fuse).
    "fallocate-modes": (
        _lower_file,
        [
            op
            for i, mode in enumerate(FUSE_FALLOC_MODES)
            for op in (
                Op("fallocate", "f", arg=(mode, 4096 * (i % 2), 4096)),
                Op("read", "f"),
            )
        ]
        + [Op("open", "g", arg=(os.O_RDWR, 0))]
        + [Op("hfalloc", arg=(0, mode, 0, 4096)) for mode in FUSE_FALLOC_MODES]
        + [Op("fallocate", "g", arg=(0, 0, 8192), caller=U1000)],
    ),
    "mknod-whiteout-refused": (
        _lower_file,
        [
            Op("mknod", "f", arg=(stat.S_IFCHR | 0o644, 0, 0)),
            Op("mknod", "w0", arg=(stat.S_IFCHR | 0o644, 0, 0)),
            Op("unlink", "f"),
            Op("mknod", "f", arg=(stat.S_IFCHR | 0o644, 0, 0)),
            Op("mknod", "n13", arg=(stat.S_IFCHR | 0o644, 1, 3)),
            Op("mknod", "sock", arg=(stat.S_IFSOCK | 0o644, 0, 0)),
            Op("mknod", "reg", arg=(stat.S_IFREG | 0o644, 0, 0)),
        ],
    ),
    "overlay-xattrs-through-the-mount": (
        _lower_file,
        [
            Op("setxattr", "f", arg=("trusted.overlay.foo", b"1", 0)),
            Op("getxattr", "f", arg="trusted.overlay.foo"),
            Op("setxattr", "g", arg=("trusted.overlay.opaque", b"y", 0)),
            Op("setxattr", "g", arg=("trusted.overlay.overlay.bar", b"2", 0)),
            Op("setxattr", "g", arg=("user.plain", b"3", 0)),
            Op("setxattr", "g", arg=("trusted.plain", b"4", 0)),
            Op("setxattr", "g", arg=("security.plain", b"5", 0)),
            Op("listxattr", "g"),
            Op("getxattr", "g", arg="trusted.overlay.opaque"),
            Op("removexattr", "g", arg="trusted.overlay.opaque"),
            Op("listxattr", "g"),
            Op("setxattr", "f", arg=("user.a", b"1", 0), caller=U1000),
            Op("setxattr", "f", arg=("trusted.overlay.foo", b"1", 0), caller=U1000),
            Op("listxattr", "f"),
        ],
    ),
}


@pytest.mark.mount
@pytest.mark.kernel
@pytest.mark.parametrize("case", sorted(CASES))
def test_issue10_case(case: str, kernel: KernelOverlay, backend: Backend) -> None:
    """Each difference of issue 10, as a short sequence, gives exactly the kernel's results."""
    setup, ops = CASES[case]
    check_case(kernel, backend, setup, ops)


# ---------------------------------------------------------------------------------------------
# The EIO after renames on a rotated stack


RING = 7


def _ring(prefix: str, forward: bool, count: int) -> Iterator[Op]:
    """unionmount-testsuite's rename-mass ring: ``foo101 -> foo100, foo102 -> foo101, ...,
    foo100 -> foo106`` (forward) or the other way round, ``count`` renames."""
    gap = RING - 1
    for _ in range(count):
        nxt = (gap + 1) % RING if forward else (gap - 1) % RING
        yield Op("rename", f"a/{prefix}{100 + nxt}", f"a/{prefix}{100 + gap}")
        gap = nxt


def _names() -> list[str]:
    return [f"a/{p}{100 + i}" for p in ("foo", "bar") for i in range(RING + 1)]


def _lstat_all() -> list[Op]:
    # A chmod to the mode a name already has is not a no-op for FUSE (setattr), so a
    # read-only probe: listxattr follows the same lookup and shows the same errors.
    return [Op("listxattr", n) for n in _names()]


PHASES = {
    # rename-mass-5 of unionmount-testsuite: link, ring over the new names, ring over the
    # sources, one phase each (rotated in between), then the chain repeated on the result.
    "link|ring-new|ring-src": (["L", "N", "S", "C"],),
    "link+ring-new|ring-src|chain": (["LN", "S", "C"],),
    "chain|chain|chain": (["C", "C", "CC"],),
    # the same with O_PATH handles on every name held across the chain and fstat'ed after it
    # (a handle follows its object: the kernel never answers EIO).
    "chain|chain|handles+chain": (["C", "HC", "HCCF"],),
    "link|ring-new|handles+ring-src": (["L", "HNF", "HSF"],),
}


def _phase_ops(code: str) -> list[Op]:
    ops: list[Op] = []
    for c in code:
        if c == "L":
            ops += [Op("link", f"a/foo{100 + i}", f"a/bar{100 + i}") for i in range(RING + 1)]
        elif c == "N":
            ops += list(_ring("bar", False, int(RING * 4.5)))
        elif c == "S":
            ops += list(_ring("foo", True, int(RING * 4.5)))
        elif c == "C":
            ops += list(_ring("foo", True, RING)) + [Op("chmod", "a/foo103", arg=0o640)]
        elif c == "H":
            ops += [Op("open", n, arg=(O_PATH | os.O_NOFOLLOW, 0)) for n in _names()]
        elif c == "F":
            ops += [Op("hstat", arg=(slot,)) for slot in range(len(_names()))]
        ops += _lstat_all()
    return ops


def _run_rotating(
    kernel: KernelOverlay, backend: Backend, phases: list[str], *, tmpfs: bool
) -> list[str]:
    """Layers as in unionmount-testsuite (``a/foo100..foo107`` owned 1:1, symlinks to them),
    each phase on a new upper that the next phase has as its top lower; optionally every layer
    on its own tmpfs (the suite's ``--ov`` layout).  Returns the differences."""
    root = Path(tempfile.mkdtemp(prefix="ur", dir="/tmp"))
    tmpfs_mounts: list[Path] = []

    def new_layer(p: Path) -> Path:
        p.mkdir(parents=True)
        if tmpfs:
            subprocess.run(["mount", "-t", "tmpfs", "ur", str(p)], check=True)
            tmpfs_mounts.append(p)
        return p

    problems: list[str] = []
    try:
        sides = []
        for be, tag in ((kernel, "k"), (backend, "b")):
            low = new_layer(root / tag / "L")
            _dir(low / "a")
            for i in range(100, 100 + RING + 1):
                _file(low / "a" / f"foo{i}", b":xxx:yyy:zzz", 0o644, (1, 1))
                os.symlink(f"../a/foo{i}", low / "a" / f"direct_sym{i}")
            sides.append([be, tag, [low]])
        for phase, code in enumerate(phases):
            mounts = []
            with ExitStack() as stack:
                for side in sides:
                    be, tag, lowers = side
                    top = new_layer(root / tag / f"U{phase}")
                    (top / "u").mkdir()
                    (top / "w").mkdir()
                    side.append(top)
                    mnt = root / f"m{tag}"
                    mounts.append(
                        (stack.enter_context(be.mount(lowers, top / "u", top / "w", mnt)), mnt)
                    )
                rk, rb = Runner(mounts[0][0]), Runner(mounts[1][0])
                try:
                    for op in _phase_ops(code):
                        a, c = rk.apply(op), rb.apply(op)
                        if a != c:
                            problems.append(f"phase {phase} {op}: kernel {a}, {backend.name} {c}")
                            break
                finally:
                    closed = (rk.close(), rb.close())  # before the unmount
                if closed[0] != closed[1]:
                    problems.append(f"phase {phase} close(2): {closed}")
                problems += diff(
                    snapshot(mounts[0][0]),
                    snapshot(mounts[1][0]),
                    labels=("kernel", backend.name),
                )
            tb = daemon_tracebacks(mounts[1][1]) if backend.fuse else ""
            if tb:
                problems.append(f"phase {phase}: daemon traceback:\n{tb}")
            if problems:
                break
            for side in sides:
                top = side.pop()
                side[2] = [top / "u", *side[2]]
    finally:
        for p in reversed(tmpfs_mounts):
            subprocess.run(["umount", "-l", str(p)], check=False)
        shutil.rmtree(root, ignore_errors=True)
    return problems


@pytest.mark.mount
@pytest.mark.kernel
@pytest.mark.parametrize("tmpfs", [False, True], ids=["samefs", "tmpfs-per-layer"])
@pytest.mark.parametrize("plan", sorted(PHASES))
def test_rename_chain_on_rotated_stack(
    plan: str, tmpfs: bool, kernel: KernelOverlay, backend: Backend
) -> None:
    """The reported EIO: an upper rotated into the lowers twice (lowers with whiteouts,
    copied-up files and hard links), then the chain ``foo101 -> foo100, ..., foo100 -> foo106``
    repeated; every rename and every later lookup (``foo101`` included) as in the kernel,
    never EIO."""
    (phases,) = PHASES[plan]
    problems = _run_rotating(kernel, backend, phases, tmpfs=tmpfs)
    assert not problems, "\n".join(problems)
