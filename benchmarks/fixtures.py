"""Generated benchmark fixtures: layer trees written once into a cache directory and reused.

Every fixture is a directory of lower layers (plus manifests: lists of relative paths that the
workloads walk).  Each one is built in ``NAME.tmp`` and renamed into place with a stamp file that
records its parameters, so an interrupted generation is redone and a finished one is reused as
long as its parameters do not change.

Layer naming: inside a fixture, ``layers/0`` is the top lower layer and higher numbers are lower
down, in the order of a ``lowerdir=`` option.  Whiteouts are kernel-format (character device
0/0) and opaque directories carry ``trusted.overlay.opaque=y``, so all backends read the same
layers; creating them needs root.
"""

from __future__ import annotations

import io
import json
import os
import random
import shutil
import stat
import tarfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

FIXTURE_FORMAT = 1
DEFAULT_CACHE = Path("/var/tmp/unionfs-bench")
_OPAQUE_XATTR = "trusted.overlay.opaque"

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30


@dataclass(frozen=True)
class Scale:
    """Sizes of every fixture and workload; ``FULL`` follows the issue, ``QUICK`` is small."""

    name: str
    tree_files: int
    tree_dirs: int
    tree_layers: int
    stack_depths: tuple[int, ...]
    lookup_files: int
    big_file: int
    randread_count: int
    copyup_sizes: dict[str, tuple[int, int]] = field(default_factory=dict)  # label: (size, n)
    chmod_files: int = 1000
    orc_files: int = 5000
    create_files: int = 10_000
    untar_files: int = 20_000
    unlink_files: int = 5000
    rename_files: int = 1000
    mem_files: int = 100_000
    samples: int = 5
    # container workloads (issue 14)
    rt_ops: int = 20_000  # round trips per sample
    xattr_entries: int = 24_000  # entries of the xattr-walk tree, over its lower layers
    ready_depths: tuple[int, ...] = (1, 10, 100, 500)
    usr_files: int = 8000  # the populated /usr of the package-unpack lower layer
    pkg_files: int = 2000  # files of the unpacked package (60% replace lower files)


FULL = Scale(
    name="full",
    tree_files=20_000,
    tree_dirs=1000,
    tree_layers=8,
    stack_depths=(1, 8, 32, 100, 500),
    lookup_files=1000,
    big_file=1 * GiB,
    randread_count=5000,
    copyup_sizes={
        "4k": (4 * KiB, 1000),
        "1m": (1 * MiB, 64),
        "64m": (64 * MiB, 2),
        "512m": (512 * MiB, 1),
    },
)

QUICK = Scale(
    name="quick",
    tree_files=2000,
    tree_dirs=100,
    tree_layers=8,
    stack_depths=(1, 8, 32, 100, 500),
    lookup_files=200,
    big_file=64 * MiB,
    randread_count=1000,
    copyup_sizes={"4k": (4 * KiB, 200), "1m": (1 * MiB, 16), "64m": (64 * MiB, 1)},
    chmod_files=200,
    orc_files=1000,
    create_files=1000,
    untar_files=2000,
    unlink_files=500,
    rename_files=200,
    mem_files=10_000,
    samples=3,
    rt_ops=3000,
    xattr_entries=4000,
    ready_depths=(1, 10, 100),
    usr_files=1500,
    pkg_files=400,
)

# The smoke test's scale (``--tiny``): correctness of the harness only, seconds per workload.
TINY = Scale(
    name="tiny",
    tree_files=200,
    tree_dirs=50,
    tree_layers=4,
    stack_depths=(1, 8),
    lookup_files=20,
    big_file=1 * MiB,
    randread_count=50,
    copyup_sizes={"4k": (4 * KiB, 10)},
    chmod_files=10,
    orc_files=50,
    create_files=50,
    untar_files=50,
    unlink_files=20,
    rename_files=20,
    mem_files=200,
    samples=1,
    rt_ops=200,
    xattr_entries=300,
    ready_depths=(1, 10),
    usr_files=100,
    pkg_files=40,
)
SCALES = {s.name: s for s in (FULL, QUICK, TINY)}


@dataclass
class Fixture:
    """A generated fixture: its lower layers (top first) and its manifests."""

    name: str
    root: Path
    layers: list[Path]
    lists: dict[str, Path]
    info: dict[str, Any]

    def list_path(self, key: str) -> str:
        """Absolute path of one manifest."""
        return str(self.lists[key])


def _write_list(path: Path, items: list[str]) -> None:
    path.write_text("".join(i + "\n" for i in items), encoding="utf-8")


def _fill(path: Path, size: int, chunk: bytes) -> None:
    """Write ``size`` bytes of non-zero data (no holes) to ``path``."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        left = size
        while left > 0:
            left -= os.write(fd, chunk[: min(left, len(chunk))])
    finally:
        os.close(fd)


def _whiteout(path: Path) -> None:
    os.mknod(path, 0o600 | stat.S_IFCHR, os.makedev(0, 0))


class FixtureCache:
    """Builds fixtures of one :class:`Scale` under ``cache/<scale>`` or reuses them."""

    def __init__(self, cache: Path, scale: Scale, log: Any = None) -> None:
        self.base = cache / scale.name
        self.scale = scale
        self.log = log or (lambda msg: None)

    # -- generic build/reuse ---------------------------------------------------------------
    def _get(self, name: str, params: dict[str, Any], build: Any) -> Fixture:
        final = self.base / name
        stamp = final / "fixture.json"
        want = {"format": FIXTURE_FORMAT, "params": params}
        if stamp.exists():
            meta = json.loads(stamp.read_text())
            if meta.get("format") == FIXTURE_FORMAT and meta.get("params") == params:
                return self._load(name, final, meta)
            shutil.rmtree(final)
        tmp = self.base / (name + ".tmp")
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        self.log(f"generating fixture {self.scale.name}/{name} ...")
        info = build(tmp)
        meta = {**want, **info}
        (tmp / "fixture.json").write_text(json.dumps(meta, indent=1))
        os.sync()
        tmp.rename(final)
        return self._load(name, final, meta)

    @staticmethod
    def _load(name: str, root: Path, meta: dict[str, Any]) -> Fixture:
        layers = [root / "layers" / str(n) for n in meta["layers"]]
        lists = {k: root / v for k, v in meta.get("lists", {}).items()}
        return Fixture(name=name, root=root, layers=layers, lists=lists, info=meta)

    # -- the fixtures --------------------------------------------------------------------------
    def tree(self) -> Fixture:
        """About ``tree_files`` files in ``tree_dirs`` dirs over ``tree_layers`` layers."""
        s = self.scale
        params = {
            "files": s.tree_files,
            "dirs": s.tree_dirs,
            "layers": s.tree_layers,
            "orc": s.orc_files,
            "unlink": s.unlink_files,
            "rename": s.rename_files,
            "seed": 1,
        }
        return self._get("tree", params, lambda tmp: _build_tree(tmp, params))

    def stacks(self) -> Fixture:
        """Filler layers ``0..max-2`` and a bottom layer ``b``; files only in the bottom."""
        s = self.scale
        params = {"depth": max(*s.stack_depths, *s.ready_depths), "files": s.lookup_files}
        return self._get("stacks", params, lambda tmp: _build_stacks(tmp, params))

    def stack_layers(self, fx: Fixture, depth: int) -> list[Path]:
        """Lower layers of a stack of ``depth`` layers built from :meth:`stacks`."""
        return fx.layers[: depth - 1] + [fx.layers[-1]]

    def big(self) -> Fixture:
        """One big file for sequential and random reads."""
        params = {"size": self.scale.big_file}
        return self._get("big", params, lambda tmp: _build_big(tmp, params))

    def copyup(self) -> Fixture:
        """Files of each copy-up size, in one lower layer."""
        params = {"sizes": {k: list(v) for k, v in self.scale.copyup_sizes.items()}}
        return self._get("copyup", params, lambda tmp: _build_copyup(tmp, params))

    def mem(self) -> Fixture:
        """A flat-ish tree of ``mem_files`` empty files for the daemon memory workload."""
        params = {"files": self.scale.mem_files, "per_dir": 100}
        return self._get("mem", params, lambda tmp: _build_mem(tmp, params))

    def rt(self) -> Fixture:
        """Two small layers for the round trips (no whiteouts: ``bare`` copies them)."""
        params = {"files": 100}
        return self._get("rt", params, lambda tmp: _build_rt(tmp, params))

    def xtree(self) -> Fixture:
        """An image-like tree of ``xattr_entries`` entries in 3 layers, and an upper seed."""
        params = {"entries": self.scale.xattr_entries, "seed": 11, "copied_up_every": 20}
        return self._get("xtree", params, lambda tmp: _build_xtree(tmp, params))

    def usr(self) -> Fixture:
        """A lower layer with a populated /usr, and the manifest of a package to unpack on it."""
        params = {"files": self.scale.usr_files, "pkg": self.scale.pkg_files, "seed": 13}
        return self._get("usr", params, lambda tmp: _build_usr(tmp, params))

    def untar(self) -> Fixture:
        """A tarball of ``untar_files`` small files (no layers of its own)."""
        params = {"files": self.scale.untar_files, "per_dir": 100, "size": 1024}
        return self._get("untar", params, lambda tmp: _build_untar(tmp, params))


# -- builders ---------------------------------------------------------------------------------


def _build_tree(tmp: Path, p: dict[str, Any]) -> dict[str, Any]:
    """Random layered tree with whiteouts and opaque dirs; computes the merged view."""
    rng = random.Random(p["seed"])
    nlayers: int = p["layers"]
    all_layers = list(range(nlayers))
    # Directories: tops with 24 children each (about p["dirs"] in all), each dir present in a
    # random subset of its parent's layers.
    ntop = max(2, p["dirs"] // 25)
    present: dict[str, list[int]] = {"": all_layers}
    opaque: dict[str, int] = {}
    order: list[str] = []
    for t in range(ntop):
        top = f"d{t:03d}"
        present[top] = sorted(rng.sample(all_layers, rng.randint(2, nlayers)))
        order.append(top)
        for c in range(24):
            child = f"{top}/s{c:02d}"
            parent_layers = present[top]
            present[child] = sorted(rng.sample(parent_layers, rng.randint(1, len(parent_layers))))
            order.append(child)
    for d in order:
        if len(present[d]) > 1 and rng.random() < 0.06:
            opaque[d] = rng.choice(present[d][:-1])
    for d in order:
        for layer in present[d]:
            (tmp / "layers" / str(layer) / d).mkdir(parents=True, exist_ok=True)
    for layer in all_layers:
        (tmp / "layers" / str(layer)).mkdir(parents=True, exist_ok=True)
    for d, layer in opaque.items():
        os.setxattr(tmp / "layers" / str(layer) / d, _OPAQUE_XATTR, b"y")

    # Files: each in 1-3 of its directory's layers; some whited out from a higher layer.
    payload = bytes(rng.randrange(1, 256) for _ in range(4096))
    entries: dict[str, dict[int, str]] = {}  # path -> {layer: "f" | "w"}
    for i in range(p["files"]):
        d = rng.choice(order)
        path = f"{d}/f{i:06d}"
        layers = sorted(rng.sample(present[d], rng.randint(1, min(3, len(present[d])))))
        entries[path] = {layer: "f" for layer in layers}
        above = [layer for layer in present[d] if layer < layers[0]]
        if above and rng.random() < 0.05:
            entries[path][rng.choice(above)] = "w"
    whiteouts = 0
    for path, where in entries.items():
        for layer, kind in where.items():
            target = tmp / "layers" / str(layer) / path
            if kind == "w":
                _whiteout(target)
                whiteouts += 1
            else:
                size = rng.randrange(0, 4096)
                target.write_bytes(payload[:size])

    # The merged view, as overlayfs defines it.
    def contributing(d: str) -> list[int]:
        parent = d.rsplit("/", 1)[0] if "/" in d else ""
        out: list[int] = []
        for layer in contributing(parent) if d else all_layers:
            if layer in present[d]:
                out.append(layer)
                if opaque.get(d) == layer:
                    break
        return out

    contrib = {d: contributing(d) for d in order}
    vis_dirs = [d for d in order if contrib[d]]
    vis_files: list[str] = []
    for path, where in entries.items():
        d = path.rsplit("/", 1)[0]
        for layer in contrib[d]:
            if layer in where:
                if where[layer] == "f":
                    vis_files.append(path)
                break
    vis_files.sort()
    shuffled = list(vis_files)
    rng.shuffle(shuffled)
    _write_list(tmp / "dirs.txt", ["."] + vis_dirs)
    _write_list(tmp / "files.txt", vis_files)
    _write_list(tmp / "all.txt", vis_dirs + vis_files)
    _write_list(tmp / "orc.txt", shuffled[: p["orc"]])
    _write_list(tmp / "unlink.txt", shuffled[: p["unlink"]])
    _write_list(tmp / "rename.txt", shuffled[-p["rename"] :])
    return {
        "layers": all_layers,
        "lists": {
            "dirs": "dirs.txt",
            "files": "files.txt",
            "all": "all.txt",
            "orc": "orc.txt",
            "unlink": "unlink.txt",
            "rename": "rename.txt",
        },
        "visible_files": len(vis_files),
        "visible_dirs": len(vis_dirs) + 1,
        "whiteouts": whiteouts,
        "opaque_dirs": len(opaque),
    }


_DEEP = "a/b/c/d"


def _build_stacks(tmp: Path, p: dict[str, Any]) -> dict[str, Any]:
    """Filler layers hold the deep directory (so every layer is probed) but not the files."""
    fillers = [str(i) for i in range(p["depth"] - 1)]
    for name in fillers:
        (tmp / "layers" / name / _DEEP).mkdir(parents=True)
        (tmp / "layers" / name / "a" / f"filler{name}").write_bytes(b"")
    bottom = tmp / "layers" / "b" / _DEEP
    bottom.mkdir(parents=True)
    names = [f"{_DEEP}/f{i:05d}" for i in range(p["files"])]
    for n in names:
        (tmp / "layers" / "b" / n).write_bytes(b"z" * 100)
    _write_list(tmp / "lookup.txt", names)
    return {"layers": fillers + ["b"], "lists": {"lookup": "lookup.txt"}}


def _build_big(tmp: Path, p: dict[str, Any]) -> dict[str, Any]:
    (tmp / "layers" / "0").mkdir(parents=True)
    _fill(tmp / "layers" / "0" / "big.bin", p["size"], random.Random(2).randbytes(MiB))
    return {"layers": [0], "file": "big.bin"}


def _build_copyup(tmp: Path, p: dict[str, Any]) -> dict[str, Any]:
    root = tmp / "layers" / "0"
    chunk = random.Random(3).randbytes(MiB)
    lists = {}
    for label, (size, count) in p["sizes"].items():
        (root / label).mkdir(parents=True)
        names = [f"{label}/f{i:05d}" for i in range(count)]
        for n in names:
            _fill(root / n, size, chunk)
        _write_list(tmp / f"copyup-{label}.txt", names)
        lists[label] = f"copyup-{label}.txt"
    return {"layers": [0], "lists": lists}


def _build_mem(tmp: Path, p: dict[str, Any]) -> dict[str, Any]:
    root = tmp / "layers" / "0"
    per = p["per_dir"]
    for i in range(p["files"]):
        d = root / f"m{i // per:05d}"
        if i % per == 0:
            d.mkdir(parents=True)
        os.close(os.open(d / f"f{i:06d}", os.O_CREAT | os.O_WRONLY, 0o644))
    return {"layers": [0], "files": p["files"]}


def _build_untar(tmp: Path, p: dict[str, Any]) -> dict[str, Any]:
    data = random.Random(5).randbytes(p["size"])
    with tarfile.open(tmp / "files.tar", "w") as tar:
        for i in range(0, p["files"], p["per_dir"]):
            info = tarfile.TarInfo(f"t{i // p['per_dir']:04d}")
            info.type, info.mode = tarfile.DIRTYPE, 0o755
            tar.addfile(info)
        for i in range(p["files"]):
            info = tarfile.TarInfo(f"t{i // p['per_dir']:04d}/f{i:06d}")
            info.size, info.mode = len(data), 0o644
            tar.addfile(info, io.BytesIO(data))
    return {"layers": [], "tarball": "files.tar", "files": p["files"]}


def _build_rt(tmp: Path, p: dict[str, Any]) -> dict[str, Any]:
    """``rt/file`` to stat, ``rt/lower/`` with files (negative lookups miss in both layers)."""
    for layer in ("0", "1"):
        d = tmp / "layers" / layer / "rt" / "lower"
        d.mkdir(parents=True)
        for i in range(p["files"] // 2):
            (d / f"l{layer}-{i:04d}").write_bytes(b"r" * 100)
    (tmp / "layers" / "1" / "rt" / "file").write_bytes(b"f" * 4096)
    return {"layers": ["0", "1"], "file": "rt/file", "dir": "rt/lower"}


# A file capability as setcap writes it (VFS_CAP_REVISION_2, effective, cap_net_raw).
_CAP_XATTR = "security.capability"
_CAP_VALUE = (0x02000001).to_bytes(4, "little") + (1 << 13).to_bytes(4, "little") + bytes(12)


def _build_xtree(tmp: Path, p: dict[str, Any]) -> dict[str, Any]:
    """Image-like layers: a big base, two smaller layers over it; an upper with copy-ups.

    About 6% of the entries are directories, 3% symlinks, a few files carry a
    ``security.capability`` (as ``ping`` does) or a ``user.`` xattr; the upper layers replace
    and white out some base files.  ``upper/`` is an upper directory in which every
    ``copied_up_every``-th visible file was copied up (data and xattrs kept, mode changed),
    as a container that changed files leaves it; each sample starts from a copy of it.
    """
    rng = random.Random(p["seed"])
    total = p["entries"]
    ndirs = max(4, total // 16)
    layers = [tmp / "layers" / str(i) for i in range(3)]  # 0 = top
    for layer in layers:
        layer.mkdir(parents=True)
    dirs = ["usr"]
    base = layers[2]
    (base / "usr").mkdir()
    for i in range(ndirs - 1):
        parent = rng.choice(dirs)
        d = f"{parent}/d{i:05d}"
        (base / d).mkdir()
        dirs.append(d)
    payload = rng.randbytes(8192)
    files: list[str] = []
    nfiles = total - ndirs
    for i in range(nfiles):
        d = rng.choice(dirs)
        name = f"{d}/f{i:06d}"
        if i % 33 == 0 and files:
            os.symlink(f"/{rng.choice(files)}", base / name)
        else:
            (base / name).write_bytes(payload[: rng.randrange(0, 8192)])
            if i % 401 == 0:
                os.setxattr(base / name, _CAP_XATTR, _CAP_VALUE)
            elif i % 97 == 0:
                os.setxattr(base / name, "user.bench", b"1")
        files.append(name)
    # upper layers: replace some base files, add some, white out some
    whiteouts = 0
    for li in (1, 0):
        layer = layers[li]
        for name in rng.sample(files, max(1, nfiles // 20)):
            if os.path.islink(base / name):
                continue
            (layer / name).parent.mkdir(parents=True, exist_ok=True)
            if rng.random() < 0.1:
                if not (layer / name).exists():
                    _whiteout(layer / name)
                    whiteouts += 1
            else:
                (layer / name).write_bytes(payload[: rng.randrange(0, 4096)])
    # the upper seed: copy-ups of every n-th visible regular file
    upper = tmp / "upper"
    upper.mkdir()
    copied = 0
    for name in files[:: p["copied_up_every"]]:
        src = next((layer / name for layer in layers if os.path.lexists(layer / name)), None)
        if src is None or not stat.S_ISREG(os.lstat(src).st_mode):
            continue
        parts = name.split("/")
        for k in range(1, len(parts)):
            d = "/".join(parts[:k])
            if not (upper / d).exists():
                (upper / d).mkdir()
                shutil.copystat(base / d, upper / d)
        shutil.copy2(src, upper / name)
        os.chmod(upper / name, 0o600)
        copied += 1
    return {
        "layers": [0, 1, 2],
        "upper_seed": "upper",
        "entries": total,
        "dirs": ndirs,
        "whiteouts": whiteouts,
        "copied_up": copied,
    }


def _build_usr(tmp: Path, p: dict[str, Any]) -> dict[str, Any]:
    """A Debian-like /usr in one layer; a package of ``pkg`` files, 60% of them upgrades."""
    rng = random.Random(p["seed"])
    root = tmp / "layers" / "0"
    top = ["usr/bin", "usr/lib/x86_64-linux-gnu", "usr/share/doc", "usr/share/man/man1"]
    dirs = list(top)
    for d in top:
        (root / d).mkdir(parents=True)
    for i in range(max(4, p["files"] // 25)):
        d = f"{rng.choice(top[1:])}/pkg{i:04d}"
        (root / d).mkdir()
        dirs.append(d)
    payload = rng.randbytes(16384)
    files = []
    for i in range(p["files"]):
        name = f"{rng.choice(dirs)}/u{i:05d}"
        (root / name).write_bytes(payload[: rng.randrange(0, 16384)])
        files.append(name)
    npkg = p["pkg"]
    upgrades = rng.sample(files, int(npkg * 0.6))
    new_dirs = [f"usr/share/newpkg/d{i:02d}" for i in range(max(1, npkg // 100))]
    new = [f"{rng.choice(new_dirs + dirs)}/n{i:05d}" for i in range(npkg - len(upgrades))]
    manifest = {
        "new_dirs": ["usr/share/newpkg"] + new_dirs,
        "files": [[n, rng.randrange(0, 16384), True] for n in upgrades]
        + [[n, rng.randrange(0, 16384), False] for n in new],
    }
    rng.shuffle(manifest["files"])
    (tmp / "package.json").write_text(json.dumps(manifest))
    return {"layers": [0], "manifest": "package.json", "usr_files": len(files), "pkg_files": npkg}


def describe(fx: Fixture) -> dict[str, Any]:
    """A JSON-friendly summary of a fixture for the report."""
    info = {k: v for k, v in fx.info.items() if k not in ("lists", "format", "layers", "params")}
    return {"root": str(fx.root), "layers": len(fx.layers), **fx.info.get("params", {}), **info}


def scale_dict(scale: Scale) -> dict[str, Any]:
    """The scale as a JSON-friendly dict."""
    return asdict(scale)
