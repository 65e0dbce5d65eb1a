"""The workload catalogue: what each benchmark does, on which fixture, cold or warm.

A :class:`Workload` is data; the harness turns it into a worker spec (see ``worker.py``) for one
mounted sample.  Write workloads run in several :class:`Variant` s: upper on the fixture's disk
with the default fsync policy, the same with fsync off, and upper on a private tmpfs.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.fixtures import Fixture, FixtureCache, Scale


@dataclass(frozen=True)
class Variant:
    """Where the upper lives and which fsync policy the mount gets."""

    key: str
    title: str
    tmpfs: bool = False
    fsync: bool = True


READ_VARIANT = Variant("-", "upper on disk")
VARIANTS: dict[str, Variant] = {
    "disk": Variant("disk", "upper on disk, default fsync policy"),
    "disk-fsync0": Variant("disk-fsync0", "upper on disk, fsync=0 (kernel: volatile)", fsync=False),
    "tmpfs": Variant("tmpfs", "upper on tmpfs, default fsync policy", tmpfs=True),
}


@dataclass(frozen=True)
class Workload:
    """One benchmark.

    ``kind`` is ``time`` (seconds of the worker's timed run), ``mount`` (seconds of the mount
    command) or ``rss`` (daemon RSS after the run, in bytes).  ``x`` is the plotted quantity
    (layer count or file size) for families of workloads.
    """

    key: str
    title: str
    group: str
    fixture: str
    op: str = ""
    kind: str = "time"
    cold: bool = False
    warmup: bool = False
    write: bool = False
    depth: int = 0
    x: float | None = None
    params: dict[str, Any] = field(default_factory=dict)
    floor: bool = False  # also run on the ``bare`` backend (the bare-syscall floor)
    count: bool = False  # count the FUSE requests of one extra, untimed sample
    suite: str = "core"  # ``container``: the container workloads of issue 14
    explicit: bool = False  # runs only when named (``--workloads podman``), never by default
    only_variants: tuple[str, ...] = ()

    def variants(self, allowed: list[str]) -> list[Variant]:
        """Variants this workload runs in."""
        if not self.write:
            return [READ_VARIANT]
        keys = [k for k in allowed if k in VARIANTS]
        if self.only_variants:
            keys = [k for k in self.only_variants if k in keys] or list(self.only_variants[:1])
        return [VARIANTS[k] for k in keys]


def catalogue(scale: Scale) -> list[Workload]:
    """Every workload at the given scale, in run order."""
    out: list[Workload] = [
        Workload("stat_cold", "cold stat of every file", "lookup", "tree", "stat", cold=True),
        Workload("stat_warm", "warm stat of every file", "lookup", "tree", "stat", warmup=True),
    ]
    for depth in scale.stack_depths:
        out.append(
            Workload(
                f"lookup_cold_{depth}",
                f"cold deep lookups, {depth} layers",
                "lookup",
                "stacks",
                "stat",
                cold=True,
                depth=depth,
                x=depth,
                count=True,
            )
        )
        out.append(
            Workload(
                f"lookup_warm_{depth}",
                f"warm deep lookups, {depth} layers",
                "lookup",
                "stacks",
                "stat",
                warmup=True,
                depth=depth,
                x=depth,
            )
        )
    out += [
        Workload("readdir_cold", "cold readdir of every dir", "read", "tree", "listdir", cold=True),
        Workload(
            "readdir_warm", "warm readdir of every dir", "read", "tree", "listdir", warmup=True
        ),
        Workload("seqread_cold", "cold sequential read", "read", "big", "seqread", cold=True),
        Workload("seqread_warm", "warm sequential read", "read", "big", "seqread", warmup=True),
        Workload(
            "randread",
            "4 KiB random reads (layer in page cache)",
            "read",
            "big",
            "randread",
            params={"count": scale.randread_count},
        ),
        Workload("orc", "open-read-close (warm)", "read", "tree", "orc", warmup=True),
    ]
    # The FUSE requests of the missed write targets are counted: a small copy-up, a chmod-only
    # copy-up and a rename of lower files (each the cost of one copy-up plus its change).
    first_label = next(iter(scale.copyup_sizes))
    for label, (size, count) in scale.copyup_sizes.items():
        out.append(
            Workload(
                f"copyup_{label}",
                f"copy-up of {count} x {label.upper()} (open for write)",
                "write",
                "copyup",
                "copyup",
                write=True,
                x=size,
                params={"set": label},
                count=label == first_label,
            )
        )
    chmod_label = first_label
    out += [
        Workload(
            "chmod_copyup",
            f"chmod-only copy-up of {scale.chmod_files} x {chmod_label.upper()}",
            "write",
            "copyup",
            "chmod",
            write=True,
            params={"set": chmod_label, "limit": scale.chmod_files},
            count=True,
        ),
        Workload(
            "create",
            f"create {scale.create_files} files",
            "write",
            "tree",
            "create",
            write=True,
            params={"count": scale.create_files, "dirs": 10},
        ),
        Workload(
            "untar", f"untar {scale.untar_files} files", "write", "untar", "untar", write=True
        ),
        Workload(
            "unlink",
            f"unlink {scale.unlink_files} lower files",
            "write",
            "tree",
            "unlink",
            write=True,
        ),
        Workload(
            "rename",
            f"rename {scale.rename_files} lower files",
            "write",
            "tree",
            "rename",
            write=True,
            count=True,
        ),
    ]
    for depth in scale.stack_depths:
        out.append(
            Workload(
                f"mount_{depth}",
                f"mount time, {depth} layers",
                "mount",
                "stacks",
                kind="mount",
                depth=depth,
                x=depth,
            )
        )
    out.append(
        Workload(
            "rss_walk",
            f"daemon RSS after walking {scale.mem_files} files",
            "memory",
            "mem",
            "walk",
            kind="rss",
        )
    )
    out += container_catalogue(scale)
    return out


PODMAN_WORKLOADS = (
    ("podman_build_seed", "podman build, seed-like Dockerfile (dpkg -i of local .debs)"),
    ("podman_build_steps", "podman build, many RUN steps"),
    ("podman_diff", "podman diff of a container that installed the .debs"),
    ("podman_commit", "podman commit of that container"),
    ("podman_run", "podman run --rm latency"),
)


def container_catalogue(scale: Scale) -> list[Workload]:
    """The container workloads of issue 14: round trips, xattr walks, mount-ready time,
    package unpack (plain, no podman), and the podman suite (only when asked for)."""
    n = scale.rt_ops
    rt = {"suite": "container", "floor": True, "count": True, "fixture": "rt"}
    out = [
        Workload(
            "rt_fstat",
            "round trip: fstat of an open fd",
            "roundtrip",
            op="rt_fstat",
            params={"count": n},
            **rt,
        ),
        Workload(
            "rt_getattr",
            "round trip: getattr of an open fd (statx FORCE_SYNC)",
            "roundtrip",
            op="rt_getattr",
            params={"count": n},
            **rt,
        ),
        Workload(
            "rt_getxattr",
            "round trip: getxattr security.capability of an open fd (ENODATA)",
            "roundtrip",
            op="rt_getxattr",
            params={"count": n},
            **rt,
        ),
        Workload(
            "rt_neglookup",
            "round trip: negative lookup (new name each)",
            "roundtrip",
            op="rt_neglookup",
            params={"count": n},
            **rt,
        ),
        Workload(
            "rt_create",
            "round trip: create+write+close a 100 B file",
            "roundtrip",
            op="rt_create",
            write=True,
            only_variants=("tmpfs",),
            params={"count": n},
            **rt,
        ),
    ]
    xt = {"suite": "container", "count": True, "fixture": "xtree", "op": "xwalk"}
    entries = f"{scale.xattr_entries // 1000}k" if scale.xattr_entries >= 1000 else "tiny"
    for which in ("cold", "warm"):
        out.append(
            Workload(
                f"xattr_walk_{which}",
                f"{which} walk of {entries} entries: lstat+getxattr+listxattr",
                "xattr",
                cold=which == "cold",
                warmup=which == "warm",
                params={"xattrs": True, "seed_upper": True},
                **xt,
            )
        )
        out.append(
            Workload(
                f"lstat_walk_{which}",
                f"{which} walk of {entries} entries: lstat only",
                "xattr",
                cold=which == "cold",
                warmup=which == "warm",
                params={"xattrs": False, "seed_upper": True},
                **xt,
            )
        )
    for depth in scale.ready_depths:
        out.append(
            Workload(
                f"mountready_{depth}",
                f"mount, argv to usable, {depth} layers",
                "mount",
                "stacks",
                kind="ready",
                depth=depth,
                x=depth,
                suite="container",
            )
        )
    out.append(
        Workload(
            "unpack",
            f"dpkg-style unpack of {scale.pkg_files} files over /usr",
            "unpack",
            "usr",
            "unpack",
            write=True,
            count=True,
            suite="container",
        )
    )
    for key, title in PODMAN_WORKLOADS:
        out.append(
            Workload(
                key, title, "podman", "podman", kind="podman", suite="container", explicit=True
            )
        )
    return out


def select(workloads: list[Workload], patterns: str | None) -> list[Workload]:
    """Filter by comma-separated keys, globs (``lookup_*``) or group names."""
    if not patterns:
        return [w for w in workloads if not w.explicit]
    pats = [p.strip() for p in patterns.split(",") if p.strip()]

    def match(w: Workload, p: str) -> bool:
        if w.explicit and p != w.group and p != w.key and not p.startswith(w.group):
            return False  # the podman suite runs only when named
        return fnmatch.fnmatch(w.key, p) or w.group == p or w.suite == p

    chosen = [w for w in workloads if any(match(w, p) for p in pats)]
    if not chosen:
        keys = ", ".join(w.key for w in workloads)
        raise SystemExit(f"no workload matches {patterns!r}; known: {keys}")
    return chosen


class FixtureSet:
    """Lazily generated fixtures for one run, and the worker spec of each workload."""

    def __init__(self, cache: FixtureCache) -> None:
        self.cache = cache
        self._fx: dict[str, Fixture] = {}

    def get(self, name: str) -> Fixture:
        """The named fixture, generated on first use."""
        if name not in self._fx:
            self._fx[name] = getattr(self.cache, name)()
        return self._fx[name]

    def all(self) -> dict[str, Fixture]:
        """Fixtures used so far."""
        return dict(self._fx)

    def lowers(self, w: Workload) -> list[Path]:
        """Lower layers (top first) for a workload's mount."""
        if w.fixture == "untar":
            return self.get("tree").layers
        if w.fixture == "podman":
            return []
        fx = self.get(w.fixture)
        if w.fixture == "stacks":
            return self.cache.stack_layers(fx, w.depth)
        return fx.layers

    def spec(self, w: Workload, root: Path) -> dict[str, Any]:
        """The worker spec of ``w`` for a mount at ``root``."""
        spec: dict[str, Any] = {"op": w.op, "root": str(root), "warmup": w.warmup}
        fx = self.get(w.fixture)
        if w.fixture == "tree":
            key = {"stat": "all", "listdir": "dirs", "orc": "orc"}.get(w.op, w.op)
            if w.op not in ("create",):
                spec["list"] = fx.list_path(key)
        elif w.fixture == "stacks":
            spec["list"] = fx.list_path("lookup")
        elif w.fixture == "big":
            spec["file"] = fx.info["file"]
            if w.op == "randread":
                spec["prewarm"] = [str(fx.layers[0] / fx.info["file"])]
        elif w.fixture == "copyup":
            label = w.params["set"]
            spec["list"] = fx.list_path(label)
            if w.op == "copyup":
                names = fx.lists[label].read_text().split()
                spec["prewarm"] = [str(fx.layers[0] / n) for n in names]
        elif w.fixture == "untar":
            spec["tarball"] = str(fx.root / fx.info["tarball"])
            spec["files"] = fx.info["files"]
        elif w.fixture == "mem":
            spec["dir"] = "."
        elif w.fixture == "rt":
            spec["file"], spec["dir"] = fx.info["file"], fx.info["dir"]
        elif w.fixture == "usr":
            spec["manifest"] = str(fx.root / fx.info["manifest"])
        spec.update({k: v for k, v in w.params.items() if k not in ("set", "seed_upper")})
        return spec
