"""Issue-2 figures: stat of every file in the example tree, and mount time against depth.

    .venv/bin/python -m benchmarks.example_stat [--samples N]

* cold (fresh mount, caches dropped) and warm ``lstat`` of every path of
  ``examples/layers`` mounted by the kernel's overlayfs, fuse-overlayfs and unionfs (the OCI
  ``.wh.`` markers are converted to the kernel format first, so all three see the same
  tree), interleaved, a fresh mount per sample;
* mount time (command start to mount ready) for 1, 100, 500 and 2,000 empty layers; the
  kernel and fuse-overlayfs stop at 500 (the kernel's limit).

Medians are printed as a markdown table with ratios to the kernel. Needs root.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
UNIONFS = str(REPO / ".venv" / "bin" / "unionfs")


def to_kernel_format(src: Path, dst: Path) -> None:
    """Copy a layer, turning ``.wh.<name>`` into char 0/0 and ``.wh..wh..opq`` into xattrs."""
    shutil.copytree(src, dst, symlinks=True)
    for dirpath, _dirnames, filenames in os.walk(dst):
        for name in filenames:
            if name == ".wh..wh..opq":
                os.unlink(os.path.join(dirpath, name))
                os.setxattr(dirpath, "trusted.overlay.opaque", b"y")
            elif name.startswith(".wh."):
                os.unlink(os.path.join(dirpath, name))
                os.mknod(os.path.join(dirpath, name[4:]), 0o020000, os.makedev(0, 0))


def mount(backend: str, lowers: list[Path], mnt: Path) -> None:
    # Lowers relative to their common parent: the kernel's mount data is one page.
    parent = lowers[0].parent
    low = ":".join(p.name for p in lowers)
    if backend == "kernel":
        if len(lowers) == 1:
            (parent / "empty").mkdir(exist_ok=True)
            low += ":empty"
        cmd = ["mount", "-t", "overlay", "overlay", "-o", f"lowerdir={low}", str(mnt)]
    elif backend == "fuse-overlayfs":
        cmd = ["fuse-overlayfs", "-o", f"lowerdir={low}", str(mnt)]
    else:
        cmd = [UNIONFS, "-o", f"lowerdir={low}", str(mnt)]
    subprocess.run(cmd, check=True, capture_output=True, cwd=parent)


def unmount(backend: str, mnt: Path) -> None:
    cmd = ["umount", str(mnt)] if backend == "kernel" else ["fusermount3", "-u", str(mnt)]
    subprocess.run(cmd, check=True, capture_output=True)
    time.sleep(0.05)


def list_paths(mnt: Path) -> list[str]:
    """Every path of the merged tree (listed once; the timed part is only the stat calls)."""
    out = []
    for dirpath, dirnames, filenames in os.walk(mnt):
        out += [os.path.join(dirpath, n) for n in dirnames + filenames]
    return out


def stat_all(paths: list[str]) -> tuple[float, int]:
    t = time.perf_counter()
    for p in paths:
        os.lstat(p)
    return time.perf_counter() - t, len(paths)


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=9)
    args = ap.parse_args()
    backends = ["kernel", "fuse-overlayfs", "unionfs"]
    root = Path(tempfile.mkdtemp(prefix="ubx", dir="/tmp"))
    try:
        (root / "empty").mkdir()
        names = ["patch", "app", "base"]
        lowers = []
        for n in names:
            to_kernel_format(REPO / "examples" / "layers" / n, root / n)
            lowers.append(root / n)
        mnt = root / "m"
        mnt.mkdir()
        cold: dict[str, list[float]] = {b: [] for b in backends}
        warm: dict[str, list[float]] = {b: [] for b in backends}
        counts: dict[str, int] = {}
        for i in range(args.samples):
            order = backends[i % 3 :] + backends[: i % 3]
            for b in order:
                mount(b, lowers, mnt)
                try:
                    paths = list_paths(mnt)
                    unmount(b, mnt)
                    mount(b, lowers, mnt)
                    drop_caches()
                    t, counts[b] = stat_all(paths)
                    cold[b].append(t)
                    warm[b].append(min(stat_all(paths)[0] for _ in range(3)))
                finally:
                    unmount(b, mnt)
        depth_times: dict[tuple[str, int], list[float]] = {}
        deep = root / "deep"
        for i in range(2000):
            (deep / str(i)).mkdir(parents=True)
        for depth in (1, 100, 500, 2000):
            layers = [deep / str(i) for i in range(depth)]
            for b in backends:
                if depth > 500 and b != "unionfs":
                    continue
                samples = []
                for _ in range(max(3, args.samples // 3)):
                    t = time.perf_counter()
                    mount(b, layers, mnt)
                    samples.append(time.perf_counter() - t)
                    unmount(b, mnt)
                depth_times[(b, depth)] = samples
    finally:
        subprocess.run(["umount", "-l", str(root / "m")], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)

    def ms(v: list[float]) -> str:
        return f"{statistics.median(v) * 1000:.2f} ms"

    def ratio(v: list[float], ref: list[float]) -> str:
        return f"{statistics.median(v) / statistics.median(ref):.2f}"

    print(f"stat of every path of examples/layers ({counts['unionfs']} paths), median\n")
    print("| | kernel | fuse-overlayfs | unionfs | unionfs / kernel | unionfs / fuse-overlayfs |")
    print("|---|---|---|---|---|---|")
    for label, data in (("cold", cold), ("warm", warm)):
        k, f, u = data["kernel"], data["fuse-overlayfs"], data["unionfs"]
        print(f"| {label} | {ms(k)} | {ms(f)} | {ms(u)} | {ratio(u, k)} | {ratio(u, f)} |")
    print("\nmount time (command start to mount ready), median\n")
    print("| layers | kernel | fuse-overlayfs | unionfs | unionfs / kernel |")
    print("|---|---|---|---|---|")
    for depth in (1, 100, 500, 2000):
        u = depth_times[("unionfs", depth)]
        k = depth_times.get(("kernel", depth))
        f = depth_times.get(("fuse-overlayfs", depth))
        print(
            f"| {depth} | {ms(k) if k else 'n/a'} | {ms(f) if f else 'n/a'} | {ms(u)} | "
            f"{ratio(u, k) if k else 'n/a'} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
