"""Deterministic layer-stack generator and the pure-Python flatten reference.

Layers are given top first (index 0 is the topmost layer, like ``lowerdir=`` order; when the
stack has an upper it is simply layer 0).  Generation runs bottom-up and keeps an in-memory
model of the merged view so that whiteouts, opaque dirs and overrides hit names that really
exist below.

Formats (``fmt``):

* ``"kernel"`` -- only forms the kernel's overlayfs reads: char 0/0 whiteouts (also hard-linked,
  nlink > 1), ``trusted.overlay.opaque="y"``, and xattr whiteouts (a zero-size file with
  ``trusted.overlay.whiteout`` in a dir marked ``trusted.overlay.opaque="x"``), plus decoys
  (a whiteout xattr in a dir *not* marked ``x``, which the kernel shows as a plain file).
  Whiteouts are placed only in directories that merge with a directory below: the kernel lists
  whiteouts of non-merged (pure or opaque) directories in readdir while lookup says ENOENT, a
  quirk the differential tests do not exercise (see docs/testing.md).
* ``"oci"`` -- only the OCI image-spec forms: ``.wh.<name>`` files and ``.wh..wh..opq``.
* ``"mixed"`` -- every form unionfs reads, anywhere (also ``user.overlay.opaque``).

:func:`flatten` computes the merged view of layers on disk by the overlayfs/OCI rules and
returns a :class:`tests.oracle.tree.Snapshot` comparable with a snapshot of a mount.
"""

from __future__ import annotations

import os
import random
import stat
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tests.oracle.tree import Snapshot, entry_of

KERNEL_FORMS = frozenset({"wh_chr", "wh_chr_link", "wh_xattr", "opq_trusted", "decoy_xattr"})
OCI_FORMS = frozenset({"wh_oci", "opq_oci"})
MIXED_FORMS = KERNEL_FORMS | OCI_FORMS | frozenset({"opq_user"})
FORMS = {"kernel": KERNEL_FORMS, "oci": OCI_FORMS, "mixed": MIXED_FORMS}

OWNERS = (0, 1000, 65534)
FILE_MODES = (
    0o644,
    0o644,
    0o600,
    0o755,
    0o444,
    0o4755,
    0o2750,
    0o000,
    0o640,
    0o4777,
    0o2777,
    0o6777,
    0o666,
)
DIR_MODES = (0o755, 0o755, 0o700, 0o1777, 0o2775, 0o555, 0o1777, 0o3777, 0o777, 0o2777)
NAMES = ("a", "b", "c", "d", "e", "f", "g", "h", "sub", "x y", "ü")
SYMLINK_TARGETS = (
    "/etc",
    # Absolute, and missing on any host: a sequence that follows a symlink (an open without
    # O_NOFOLLOW) must never be able to write to a real host file such as /etc/passwd.
    "/nonexistent-unionfs-test/passwd",
    "../../..",
    "..",
    "/",
    "a",
    "b/c",
    "nonexistent",
    "../a",
    "/proc/self/root",
    "x" * 200,
)
#: Targets that cannot form a loop through a same-named directory above (``b -> b/c``).
NONLOOPING_SYMLINK_TARGETS = tuple(t for t in SYMLINK_TARGETS if t not in ("a", "b/c", "../a"))
SIZES = (0, 1, 7, 100, 4095, 4096, 4097, 65537)


@dataclass
class GenStats:
    """Counts of what a generation produced, for sanity checks and reporting."""

    counts: dict[str, int] = field(default_factory=dict)

    def add(self, what: str) -> None:
        """Count one occurrence of ``what``."""
        self.counts[what] = self.counts.get(what, 0) + 1


class _Gen:
    """One stack generation: the model of the merged view plus materialization helpers."""

    hardlinks = True

    def __init__(
        self,
        layers: Sequence[Path],
        rng: random.Random,
        prefix: str,
        forms: frozenset[str],
        kernel_rules: bool,
        max_depth: int,
        upper_forms: frozenset[str] | None,
        has_upper: bool,
    ) -> None:
        self.layers = [Path(p) for p in layers]
        self.rng = rng
        self.prefix = prefix.strip("/")
        self.forms = forms
        self.kernel_rules = kernel_rules
        self.max_depth = max_depth
        self.upper_forms = upper_forms
        self.has_upper = has_upper
        self.symlink_targets = SYMLINK_TARGETS
        self.view: dict[str, str] = {}  # relpath -> "d" or a non-dir kind
        self.layer: dict[str, str] = {}  # entries of the layer being built
        self.below: dict[str, str] = {}  # the view of the layers below the current one
        self.root = Path()
        self.lidx = 0
        self.stats = GenStats()
        self.whiteouts: list[str] = []  # whiteouts of the current layer (for hard links)
        self.lower_files: list[Path] = []  # regular files of the layers built so far

    # -- model helpers -----------------------------------------------------------------------

    def _drop(self, path: str, keep_self: bool = False) -> None:
        pre = path + "/"
        for p in [p for p in self.view if p.startswith(pre)]:
            del self.view[p]
        if not keep_self:
            self.view.pop(path, None)

    def _depth(self, path: str) -> int:
        return path.count("/") + 1 if path else 0

    def _visible_dirs(self) -> list[str]:
        base = self.prefix
        dirs = [base] + sorted(
            p for p, k in self.view.items() if k == "d" and self._depth(p) < self.max_depth
        )
        return dirs

    def _join(self, parent: str, name: str) -> str:
        return f"{parent}/{name}" if parent else name

    def _meta(
        self, path: Path, *, is_dir: bool, symlink: bool = False, xattrs: bool = True
    ) -> None:
        rng = self.rng
        if not symlink:
            os.chmod(path, rng.choice(DIR_MODES if is_dir else FILE_MODES))
        if rng.random() < 0.4:
            os.lchown(path, rng.choice(OWNERS), rng.choice(OWNERS))
        if xattrs and not symlink and rng.random() < 0.25:
            for i in range(rng.randint(1, 2)):
                os.setxattr(path, f"user.k{i}", rng.randbytes(rng.randint(0, 12)))
            self.stats.add("xattr")

    def _ensure_parent(self, path: str) -> bool:
        """Create the parent chain of ``path`` in the current layer; False if impossible."""
        parts = path.split("/")[:-1]
        cur = ""
        for part in parts:
            cur = self._join(cur, part)
            k = self.layer.get(cur)
            if k is not None:
                if not k.startswith("d"):
                    return False
                continue
            os.mkdir(self.root / cur)
            if cur != self.prefix and self.rng.random() < 0.3:
                self._meta(self.root / cur, is_dir=True)
            self.layer[cur] = "d"
            if self.view.get(cur) != "d":
                self._drop(cur)
                self.view[cur] = "d"
        return True

    def _target(self, prefer_existing: float = 0.6) -> str | None:
        """Pick a path for a new entry: often an existing visible name, else a fresh one."""
        rng = self.rng
        existing = [p for p in self.view if p.startswith(self.prefix + "/") or not self.prefix]
        if existing and rng.random() < prefer_existing:
            path = rng.choice(sorted(existing))
        else:
            parent = rng.choice(self._visible_dirs())
            path = self._join(parent, rng.choice(NAMES))
        if path in self.layer or self._depth(path) > self.max_depth + 1:
            return None
        if any(self.layer.get(a, "d")[0] != "d" for a in _ancestors(path)):
            return None
        return path

    # -- operations ----------------------------------------------------------------------

    def op_file(self) -> None:
        path = self._target()
        if path is None or not self._ensure_parent(path):
            return
        p = self.root / path
        data = self.rng.randbytes(self.rng.choice(SIZES))
        p.write_bytes(data)
        self._meta(p, is_dir=False)
        self._set(path, "f")
        self.stats.add("file")
        upper = self.lidx == 0 and self.has_upper
        if data and not upper and self.rng.random() < 0.2 and "decoy_xattr" in self.forms:
            # A whiteout xattr on a non-empty file is no whiteout: a plain file.  (Zero-size
            # decoys are ambiguous in the kernel: lookup honours the xattr in any layer that
            # has an "x" dir, readdir only inside "x" dirs.)  Never in a pre-populated upper:
            # a truncation through the mount would make it a zero-size decoy there, which the
            # kernel shows until a remount and hides after it.
            os.setxattr(p, "trusted.overlay.whiteout", b"y")
            self.stats.add("decoy_xattr")
        else:
            self.lower_files.append(p)  # (a decoy linked into another layer is no decoy)

    def _set(self, path: str, kind: str) -> None:
        self._drop(path)
        self.layer[path] = kind
        self.view[path] = "d" if kind.startswith("d") else kind

    def op_hardlink(self) -> None:
        a, b = self._target(0.3), self._target(0.3)
        if a is None or b is None or a == b or b.startswith(a + "/") or a.startswith(b + "/"):
            return
        if not self._ensure_parent(a) or not self._ensure_parent(b) or b in self.layer:
            return
        pa = self.root / a
        pa.write_bytes(self.rng.randbytes(self.rng.choice(SIZES)))
        self._meta(pa, is_dir=False)
        self._set(a, "f")
        os.link(pa, self.root / b)
        self._set(b, "f")
        self.stats.add("hardlink")

    def op_crosslink(self) -> None:
        """A hard link to a regular file of a layer below, under another (or the same) name
        in this layer: one inode shown under names from different layers of the stack."""
        dev = os.stat(self.root).st_dev  # (a layer may be on another filesystem: tmpfs)
        below = [
            f
            for f in self.lower_files
            if not f.is_relative_to(self.root) and os.stat(f).st_dev == dev
        ]
        path = self._target(0.3)
        if not below or path is None or not self._ensure_parent(path) or path in self.layer:
            return
        os.link(self.rng.choice(below), self.root / path)
        self._set(path, "f")
        self.stats.add("crosslink")

    def op_dir(self) -> None:
        path = self._target(0.5)
        if path is None or path == self.prefix or not self._ensure_parent(path):
            return
        p = self.root / path
        os.mkdir(p)
        self._meta(p, is_dir=True)
        opq = [f for f in ("opq_trusted", "opq_user", "opq_oci") if f in self.forms]
        if opq and self.rng.random() < 0.35:
            form = self.rng.choice(opq)
            if form == "opq_trusted":
                os.setxattr(p, "trusted.overlay.opaque", b"y")
            elif form == "opq_user":
                os.setxattr(p, "user.overlay.opaque", b"y")
            else:
                (p / ".wh..wh..opq").touch()
            self._set(path, "dO")
            self.stats.add(form)
        else:
            was_dir = self.view.get(path) == "d"
            self._drop(path, keep_self=was_dir)
            self.layer[path] = "d"
            self.view[path] = "d"
            self.stats.add("dir")
        for _ in range(self.rng.randint(0, 2)):
            self.op_file()

    def op_symlink(self) -> None:
        path = self._target()
        if path is None or not self._ensure_parent(path):
            return
        p = self.root / path
        os.symlink(self.rng.choice(self.symlink_targets), p)
        self._meta(p, is_dir=False, symlink=True)
        self._set(path, "l")
        self.stats.add("symlink")

    def op_special(self) -> None:
        path = self._target()
        if path is None or not self._ensure_parent(path):
            return
        p = self.root / path
        if self.rng.random() < 0.7:
            os.mkfifo(p)
            kind = "p"
        else:
            os.mknod(p, stat.S_IFCHR | 0o666, os.makedev(1, 3))
            kind = "c"
        self._meta(p, is_dir=False, xattrs=False)
        self._set(path, kind)
        self.stats.add("fifo" if kind == "p" else "chardev")

    def op_whiteout(self) -> None:
        rng = self.rng
        forms = [f for f in ("wh_chr", "wh_chr_link", "wh_xattr", "wh_oci") if f in self.forms]
        if self.lidx == 0 and self.has_upper and self.upper_forms is not None:
            forms = [f for f in forms if f in self.upper_forms]
        if not forms:
            return
        path = self._target(0.85)
        if path is None or path == self.prefix:
            return
        parent = path.rsplit("/", 1)[0] if "/" in path else ""
        if self.kernel_rules:
            # Only inside a directory that merges with one below and is not opaque here: the
            # kernel lists whiteouts of non-merged directories (see the module docstring).
            if parent == self.prefix:
                if len(self.layers) < 2:
                    return
            elif self.below.get(parent) != "d" or self.view.get(parent) != "d":
                return
            if any(self.layer.get(a) == "dO" for a in _ancestors(path)):
                return
        form = rng.choice(forms)
        if form == "wh_xattr" and self.layer.get(parent) == "dO":
            return
        if form == "wh_xattr" and self.kernel_rules and self.below.get(parent) != "d":
            # The kernel never reads overlay.opaque in the lowest layer, so readdir would
            # list xattr whiteouts there.
            return
        if not self._ensure_parent(path):
            return
        p = self.root / path
        if form == "wh_chr_link" and self.whiteouts:
            os.link(self.root / rng.choice(self.whiteouts), p)
        elif form in ("wh_chr", "wh_chr_link"):
            os.mknod(p, stat.S_IFCHR | 0, os.makedev(0, 0))
            self.whiteouts.append(path)
        elif form == "wh_xattr":
            os.setxattr(self.root / parent, "trusted.overlay.opaque", b"x")
            self.layer[parent] = "dX"
            p.touch()
            os.setxattr(p, "trusted.overlay.whiteout", b"y")
        else:
            name = path.rsplit("/", 1)[-1]
            (p.parent / f".wh.{name}").touch()
        self._drop(path)
        self.layer[path] = "wh"
        self.stats.add(form)

    def op_redir_meta(self) -> None:
        """Re-declare a visible directory in this layer with new metadata (merged dir)."""
        dirs = [d for d in self._visible_dirs() if d != self.prefix and d not in self.layer]
        if not dirs:
            return
        path = self.rng.choice(dirs)
        if not self._ensure_parent(path) or path in self.layer:
            return
        os.mkdir(self.root / path)
        self._meta(self.root / path, is_dir=True)
        self.layer[path] = "d"
        self.stats.add("dir_meta")

    def build_layer(self, idx: int, n_ops: int) -> None:
        self.lidx = idx
        self.root = self.layers[idx]
        self.layer = {}
        self.below = dict(self.view)
        self.whiteouts = []
        self._ensure_parent(self._join(self.prefix, "_") if self.prefix else "_")
        ops = (
            (self.op_file, 5),
            (self.op_dir, 3),
            (self.op_symlink, 2),
            (self.op_special, 1),
            (self.op_hardlink, 1 if self.hardlinks else 0),
            (self.op_crosslink, 1 if self.hardlinks else 0),
            (self.op_whiteout, 4),
            (self.op_redir_meta, 1),
        )
        funcs = [f for f, _ in ops]
        weights = [w for _, w in ops]
        for _ in range(n_ops):
            self.rng.choices(funcs, weights)[0]()


def _ancestors(path: str) -> list[str]:
    parts = path.split("/")
    return ["/".join(parts[:i]) for i in range(1, len(parts))]


def generate_stack(
    layers: Sequence[str | Path],
    seed: int | random.Random,
    *,
    prefix: str = "",
    fmt: str = "kernel",
    ops_per_layer: tuple[int, int] = (2, 8),
    max_depth: int = 3,
    exclude: frozenset[str] = frozenset(),
    has_upper: bool = False,
    upper_forms: frozenset[str] | None = frozenset({"wh_chr", "wh_chr_link", "opq_trusted"}),
    symlink_targets: Sequence[str] = SYMLINK_TARGETS,
    lower_hardlinks: bool = True,
) -> GenStats:
    """Populate existing layer directories (top first) with one generated stack.

    The same ``seed`` and arguments always give the same trees.  ``prefix`` puts the stack in
    a subdirectory (present as a plain directory in every layer), so that many stacks can share
    one mount as sibling subtrees.  ``exclude`` removes forms (see :data:`FORMS`) from the
    format.  With ``has_upper``, layer 0 is an upper and only ``upper_forms`` are used for its
    whiteouts (the kernel writes char 0/0 whiteouts there, never xattr whiteouts).
    """
    rng = seed if isinstance(seed, random.Random) else random.Random(seed)
    forms = FORMS[fmt] - exclude
    gen = _Gen(
        [Path(p) for p in layers],
        rng,
        prefix,
        forms,
        kernel_rules=(fmt == "kernel"),
        max_depth=max_depth + (prefix.count("/") + 1 if prefix else 0),
        upper_forms=upper_forms,
        has_upper=has_upper,
    )
    gen.symlink_targets = tuple(symlink_targets)
    gen.hardlinks = lower_hardlinks
    for idx in reversed(range(len(layers))):
        gen.build_layer(idx, rng.randint(*ops_per_layer))
    return gen.stats


def make_layer_dirs(base: str | Path, n: int, *, upper: bool = False) -> list[Path]:
    """Create ``base/0 .. base/n-1`` (short names: the kernel's mount data is one page) and,
    with ``upper``, ``base/u``; return them top first (upper, then lowers 0..n-1)."""
    base = Path(base)
    dirs = ([base / "u"] if upper else []) + [base / str(i) for i in range(n)]
    for d in dirs:
        d.mkdir(parents=True, exist_ok=True)
    return dirs


# ---------------------------------------------------------------------------------------------
# Flatten reference


def _xget(path: str, name: str) -> bytes | None:
    try:
        return os.getxattr(path, name, follow_symlinks=False)
    except OSError:
        return None


class _LayerDir:
    """One layer's directory at some path, classified by the chosen whiteout rules."""

    def __init__(self, path: str, oci: bool) -> None:
        self.path = path
        self.oci = oci
        op = _xget(path, "trusted.overlay.opaque")
        if op is None and oci:
            op = _xget(path, "user.overlay.opaque")
        with os.scandir(path) as it:
            names = {e.name for e in it}
        self.opaque = op == b"y" or (oci and ".wh..wh..opq" in names)
        self.xwhiteouts = op == b"x"
        self.oci_hidden: set[str] = set()
        self.names: set[str] = set()
        for n in names:
            if oci and n.startswith(".wh."):
                if n != ".wh..wh..opq" and n[4:] not in ("", ".", ".."):
                    self.oci_hidden.add(n[4:])
                continue
            self.names.add(n)

    def classify(self, name: str) -> tuple[str, os.stat_result | None]:
        """``("absent"|"whiteout"|"dir"|"nondir", lstat)`` for ``name`` in this layer dir."""
        if name in self.names:
            p = os.path.join(self.path, name)
            st = os.lstat(p)
            if stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:
                return "whiteout", st
            if (
                self.xwhiteouts
                and stat.S_ISREG(st.st_mode)
                and st.st_size == 0
                and (
                    _xget(p, "trusted.overlay.whiteout") is not None
                    or (self.oci and _xget(p, "user.overlay.whiteout") is not None)
                )
            ):
                return "whiteout", st
            return ("dir" if stat.S_ISDIR(st.st_mode) else "nondir"), st
        if name in self.oci_hidden:
            return "whiteout", None
        return "absent", None


def flatten(layers: Sequence[str | Path], *, forms: str = "all", under: str = "") -> Snapshot:
    """The merged view of ``layers`` (top first) by the overlayfs/OCI rules, as a Snapshot.

    ``forms="kernel"`` reads only what the kernel reads (char 0/0, xattr whiteouts in ``x``
    dirs, ``trusted.overlay.opaque="y"``); ``forms="all"`` also reads ``.wh.<name>``,
    ``.wh..wh..opq``, ``user.overlay.opaque`` and ``user.overlay.whiteout``.  Top-down: a
    non-directory hides everything below it, directories merge unless opaque, whiteouts hide.
    A merged directory shows the metadata of its topmost directory.  Inode keys are the real
    ``(st_dev, st_ino)`` of the object shown, so hard links within a layer share one.
    """
    oci = forms == "all"
    snap = Snapshot()
    start = [os.path.join(os.fspath(p), under) if under else os.fspath(p) for p in layers]
    top: list[_LayerDir] = []
    for p in start:
        if not os.path.isdir(p) or os.path.islink(p):
            break
        ld = _LayerDir(p, oci)
        top.append(ld)
        if ld.opaque:
            break
    stack = [(under.strip("/"), top)]
    while stack:
        rel, dirs = stack.pop()
        names: set[str] = set()
        for d in dirs:
            names |= d.names
        for name in sorted(names):
            shown: tuple[str, os.stat_result] | None = None
            subdirs: list[_LayerDir] = []
            for d in dirs:
                what, st = d.classify(name)
                if what == "absent":
                    continue
                if what == "whiteout":
                    break
                path = os.path.join(d.path, name)
                assert st is not None
                if what == "dir":
                    if shown is None:
                        shown = (path, st)
                    sub = _LayerDir(path, oci)
                    subdirs.append(sub)
                    if sub.opaque:
                        break
                    continue
                if shown is None:
                    shown = (path, st)
                break
            if shown is None:
                continue
            relpath = f"{rel}/{name}" if rel else name
            path, st = shown
            snap.entries[relpath] = entry_of(path, st)
            snap.inodes[relpath] = (st.st_dev, st.st_ino)
            if subdirs:
                stack.append((relpath, subdirs))
    return snap
