"""Run the benchmark: every backend on the same fixtures, interleaved, fresh mount per sample.

    .venv/bin/python -m benchmarks.run --quick            # < 3 minutes, small fixtures
    .venv/bin/python -m benchmarks.run                    # the full run of issue 4
    .venv/bin/python -m benchmarks.run --results-md benchmarks/RESULTS.md

Needs root (kernel overlayfs, kernel-format whiteouts in the fixtures, dropping caches).
See benchmarks/README.md for every option.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make ``benchmarks`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import fusecount
from benchmarks import report as rep
from benchmarks.backends import (
    ALL_BACKENDS,
    DEFAULT_BACKENDS,
    FLOOR_BACKENDS,
    Backend,
    MountError,
    MountTracker,
    lazy_unmount,
    make_backend,
    mountpoints,
    rss_bytes,
)
from benchmarks.fixtures import DEFAULT_CACHE, FULL, QUICK, TINY, FixtureCache, describe
from benchmarks.workloads import VARIANTS, FixtureSet, Variant, Workload, catalogue, select

WORKER = Path(__file__).resolve().parent / "worker.py"
OUT_DEFAULT = Path(__file__).resolve().parent / "out"
WORKER_TIMEOUT = 900.0


class Progress:
    """A one-line progress bar on stderr (plain lines every few seconds when not a tty)."""

    def __init__(self, total: int, enabled: bool = True) -> None:
        self.total, self.done, self.t0 = total, 0, time.monotonic()
        self.enabled = enabled
        self.tty = sys.stderr.isatty()
        self._last = 0.0

    def _line(self, label: str) -> str:
        frac = self.done / self.total if self.total else 1.0
        elapsed = time.monotonic() - self.t0
        eta = elapsed / frac - elapsed if frac > 0 else 0.0
        width = 24
        bar = "#" * int(frac * width) + "." * (width - int(frac * width))
        return (
            f"[{bar}] {self.done}/{self.total} {frac:4.0%} {elapsed:4.0f}s eta {eta:4.0f}s  {label}"
        )

    def update(self, label: str, advance: int = 0) -> None:
        """Advance and redraw."""
        self.done += advance
        if not self.enabled:
            return
        line = self._line(label)
        if self.tty:
            cols = shutil.get_terminal_size((100, 20)).columns
            sys.stderr.write("\r" + line[: cols - 1].ljust(cols - 1))
            sys.stderr.flush()
        elif time.monotonic() - self._last > 5 or self.done == self.total:
            self._last = time.monotonic()
            sys.stderr.write(line + "\n")

    def message(self, text: str) -> None:
        """Print a line without breaking the bar."""
        if self.tty and self.enabled:
            sys.stderr.write("\r" + " " * (shutil.get_terminal_size((100, 20)).columns - 1) + "\r")
        sys.stderr.write(text + "\n")
        sys.stderr.flush()

    def close(self) -> None:
        """Finish the line."""
        if self.tty and self.enabled:
            sys.stderr.write("\n")


def log(msg: str) -> None:
    """Log to stderr."""
    sys.stderr.write(msg + "\n")
    sys.stderr.flush()


def drop_caches() -> None:
    """sync, then drop page cache, dentries and inodes."""
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w", encoding="ascii") as fh:
        fh.write("3\n")


def _mounted_below(path: Path) -> list[str]:
    prefix = os.path.realpath(path).rstrip("/") + "/"
    return [m for m in mountpoints() if m.startswith(prefix) or m == prefix.rstrip("/")]


def safe_rmtree(path: Path) -> None:
    """rmtree that refuses to descend into anything still mounted below ``path``."""
    if not path.exists():
        return
    live = _mounted_below(path)
    if live:
        raise RuntimeError(f"refusing to remove {path}: still mounted: {live}")
    shutil.rmtree(path)


def clean_stale_runs(runs: Path) -> None:
    """Unmount and remove leftovers of runs whose harness process is gone."""
    if not runs.is_dir():
        return
    for d in runs.iterdir():
        pid = d.name.split("-", 1)[0]
        if pid.isdigit() and Path(f"/proc/{pid}").exists():
            continue
        for m in sorted(_mounted_below(d), key=len, reverse=True):
            lazy_unmount(m)
        try:
            safe_rmtree(d)
            log(f"removed stale run dir {d}")
        except (RuntimeError, OSError) as exc:
            log(f"warning: {exc}")


class Harness:
    """Owns the run directory, the mounts, the samples; cleans up whatever happens."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.scale = _scale(args)
        self.samples = args.samples or self.scale.samples
        self.cache = Path(args.cache).resolve()
        self.runs = self.cache / "runs"
        self.run_dir = self.runs / f"{os.getpid()}-{int(time.time())}"
        self.tracker = MountTracker()
        self.fixtures = FixtureSet(FixtureCache(self.cache, self.scale, log))
        self.backends: list[Backend] = [make_backend(n, args.unionfs_bin) for n in args.backends]
        self.samples_by: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
        self.errors: dict[tuple[str, str, str], str] = {}
        self.requests: dict[tuple[str, str, str], dict[str, Any]] = {}
        self.count_note = ""
        self.podman: Any = None  # benchmarks.podman.PodmanSuite, made when a podman row runs
        self.counter = 0
        self.interrupted = False
        self.reduced = False

    # -- lifecycle ---------------------------------------------------------------------------
    def setup(self, need_tmpfs: bool) -> None:
        """Create the run dir (and its tmpfs), clear leftovers of dead runs."""
        clean_stale_runs(self.runs)
        (self.run_dir / "mnt").mkdir(parents=True)
        (self.run_dir / "disk").mkdir()
        if need_tmpfs:
            (self.run_dir / "tmpfs").mkdir()
            self.tracker.tmpfs(self.run_dir / "tmpfs", self.args.tmpfs_size)

    def cleanup(self) -> None:
        """Unmount everything, remove the run dir; never raises."""
        if self.podman is not None:
            self.podman.cleanup()
        self.tracker.unmount_all()
        for b in self.backends:
            b.shutdown()
        try:
            safe_rmtree(self.run_dir)
            if self.runs.is_dir() and not any(self.runs.iterdir()):
                self.runs.rmdir()
        except (RuntimeError, OSError) as exc:
            log(f"warning: cleanup: {exc}")

    # -- backends ----------------------------------------------------------------------------
    def probe_backends(self) -> None:
        """Cheap checks, then a trial mount of a tiny tree; failures skip the backend."""
        trial = self.run_dir / "probe"
        for b in self.backends:
            b.probe()
            if b.available:
                try:
                    b.prepare(self.run_dir)
                except (MountError, OSError, subprocess.SubprocessError) as exc:
                    b.available, b.note = False, f"set-up failed: {exc}"
            if not b.available:
                log(f"skipping {b.name}: {b.note}")
                continue
            lower, upper, work = trial / "layers" / "0", trial / "upper", trial / "work"
            for d in (lower, upper, work):
                d.mkdir(parents=True, exist_ok=True)
            (lower / "hello").write_text("hello\n")
            mnt = self.run_dir / "mnt"
            try:
                self.tracker.mount(b, [lower], upper, work, mnt, True)
                if (mnt / "hello").read_text() != "hello\n":
                    raise MountError("trial mount does not show the lower file")
            except (MountError, OSError, subprocess.SubprocessError) as exc:
                b.available = False
                b.note = f"trial mount failed: {exc}"
                log(f"skipping {b.name}: {b.note}")
            finally:
                self.tracker.unmount(mnt)
                safe_rmtree(trial)

    # -- one sample --------------------------------------------------------------------------
    def runs_on(self, w: Workload, b: Backend) -> bool:
        """Floor backends run only the workloads marked ``floor``; podman needs a mount program
        (or the kernel, as podman's native overlay driver)."""
        if b.name in FLOOR_BACKENDS:
            return w.floor
        if w.kind == "podman":
            return b.name in ("kernel", "fuse-overlayfs", "unionfs", "unionfs-server")
        return True

    @contextlib.contextmanager
    def mounted(self, b: Backend, w: Workload, v: Variant) -> Iterator[tuple[Path, float]]:
        """Fresh upper/workdir, mount, yield (mountpoint, mount seconds), unmount, remove."""
        self.counter += 1
        base = self.run_dir / ("tmpfs" if v.tmpfs else "disk") / f"s{self.counter}"
        upper, work, mnt = base / "upper", base / "work", self.run_dir / "mnt"
        upper.mkdir(parents=True)
        work.mkdir()
        lowers = self.fixtures.lowers(w)
        if w.params.get("seed_upper"):
            fx = self.fixtures.get(w.fixture)
            subprocess.run(
                ["cp", "-a", "--", f"{fx.root / fx.info['upper_seed']}/.", str(upper)], check=True
            )
        try:
            if w.kind == "ready":
                known = Path(self.fixtures.get(w.fixture).list_path("lookup"))
                first = known.read_text().split("\n", 1)[0]
                seconds = self.tracker.mount_ready(b, lowers, upper, work, mnt, v.fsync, first)
            else:
                seconds = self.tracker.mount(b, lowers, upper, work, mnt, v.fsync)
            yield mnt, seconds
        finally:
            self.tracker.unmount(mnt)
            safe_rmtree(base)
            if w.write:
                os.sync()

    def place(self, b: Backend, mnt: Path) -> None:
        """``--cpu same|cross``: pin every thread of the mount's daemon to CPU 0 (same as the
        worker) or CPU 1 (the other one)."""
        pid = b.daemon_pids.get(str(mnt))
        if self.args.cpu == "free" or not b.fuse or not pid:
            return
        cpu = "0" if self.args.cpu == "same" else "1"
        argv = ["taskset", "-a", "-p", "-c", cpu, str(pid)]
        subprocess.run(argv, capture_output=True, check=True)

    def _worker(self, spec: dict[str, Any], wrap: Any = None) -> dict[str, Any]:
        argv = [sys.executable, str(WORKER), json.dumps(spec)]
        if self.args.cpu != "free":
            argv = ["taskset", "-c", "0", *argv]
        proc = subprocess.run(
            wrap(argv) if wrap else argv,
            capture_output=True,
            text=True,
            timeout=WORKER_TIMEOUT,
            check=False,
        )
        if proc.returncode != 0:
            tail = " | ".join(proc.stderr.strip().splitlines()[-2:])
            raise RuntimeError(f"worker exited {proc.returncode}: {tail}")
        return json.loads(proc.stdout.strip().splitlines()[-1])

    def count_requests(self, b: Backend, w: Workload, v: Variant) -> None:
        """One extra, untimed sample under ``perf stat``: FUSE requests per operation."""
        with self.mounted(b, w, v) as (mnt, _):
            self.place(b, mnt)
            if w.cold:
                drop_caches()
            counter = fusecount.RequestCounter(mnt, self.run_dir)
            try:
                spec = {**self.fixtures.spec(w, mnt), **counter.spec()}
                res = self._worker(spec, counter.wrap)
                got = counter.result()
            finally:
                counter.close()
        ops = max(1, int(res["ops"]))
        self.requests[(w.key, v.key, b.name)] = {
            "ops": ops,
            "total": got["total"],
            "per_op": got["total"] / ops,
            "by_op": {k: n / ops for k, n in got["by_op"].items()},
        }

    def sample(self, b: Backend, w: Workload, v: Variant) -> dict[str, Any]:
        """Run one sample; returns ``{"value": .., "ops": .., "extra": ..}``."""
        if w.kind == "podman":
            if self.podman is None:
                from benchmarks.podman import PodmanSuite

                self.podman = PodmanSuite(self.run_dir / "podman", self.scale, log)
            return self.podman.sample(b, w.key)
        with self.mounted(b, w, v) as (mnt, mount_seconds):
            if w.kind in ("mount", "ready"):
                return {"value": mount_seconds, "ops": 1}
            self.place(b, mnt)
            if w.cold:
                drop_caches()
            res = self._worker(self.fixtures.spec(w, mnt))
            if w.kind == "rss":
                pid = b.daemon_pids.get(str(mnt))
                rss = rss_bytes(pid) if pid else None
                return {"value": rss, "ops": res["ops"], "extra": {"walk_s": res["seconds"]}}
            return {"value": res["seconds"], "ops": res["ops"]}

    # -- the run -----------------------------------------------------------------------------
    def plan(self) -> list[tuple[Workload, Variant]]:
        """Selected workloads and their variants."""
        ws = select(catalogue(self.scale), self.args.workloads)
        variants = [v.strip() for v in self.args.variants.split(",") if v.strip()]
        for v in variants:
            if v not in VARIANTS:
                raise SystemExit(f"unknown variant {v!r}; known: {', '.join(VARIANTS)}")
        return [(w, v) for w in ws for v in w.variants(variants)]

    def run(self) -> dict[str, Any]:
        """Generate fixtures, probe backends, run every sample interleaved, build the report."""
        started = time.time()
        plan = self.plan()
        self.setup(need_tmpfs=any(v.tmpfs for _, v in plan))
        for name in dict.fromkeys(w.fixture for w, _ in plan):
            if name == "podman":
                continue
            self.fixtures.get(name)
            if name == "untar":
                self.fixtures.get("tree")
        self.probe_backends()
        live = [b for b in self.backends if b.available]
        counting = [w for w, _ in plan if w.count] and not self.args.no_count
        if counting:
            why = fusecount.unavailable()
            if why:
                self.count_note = f"requests not counted: {why}"
                log(self.count_note)
                counting = False
        total = sum(len([b for b in live if self.runs_on(w, b)]) for w, _ in plan)
        progress = Progress(total * self.samples, not self.args.no_progress)
        deadline = self.args.start + self.args.max_seconds if self.args.max_seconds else None
        t_sampling, done_samples = time.monotonic(), 0
        try:
            for j, (w, v) in enumerate(plan):
                nsamples = self.samples
                if deadline is not None and done_samples:
                    per = (time.monotonic() - t_sampling) / done_samples
                    left = deadline - time.monotonic()
                    fit = int(left / (per * (len(plan) - j) * max(1, len(live))))
                    nsamples = max(1, min(self.samples, fit))
                    if nsamples < self.samples:
                        self.reduced = True
                        nlive = len([b for b in live if self.runs_on(w, b)])
                        progress.total -= (self.samples - nsamples) * nlive
                wlive = [b for b in live if self.runs_on(w, b)]
                for i in range(nsamples):
                    k = i % len(wlive) if wlive else 0
                    for b in wlive[k:] + wlive[:k]:
                        label = f"{w.key} {v.key} {b.name} #{i + 1}"
                        progress.update(label)
                        key = (w.key, v.key, b.name)
                        if key in self.errors:  # a backend that failed once is not retried
                            progress.update(label, 1)
                            continue
                        try:
                            got = self.sample(b, w, v)
                            self.samples_by.setdefault(key, []).append(got)
                        except (
                            MountError,
                            RuntimeError,
                            OSError,
                            subprocess.SubprocessError,
                            ValueError,
                        ) as exc:
                            self.errors[key] = str(exc)
                            progress.message(f"error: {label}: {exc}")
                        done_samples += 1
                        progress.update(label, 1)
                # requests per op hardly depend on the variant: count one (tmpfs if it runs)
                w_variants = [u for ww, u in plan if ww is w]
                counted = next((u for u in w_variants if u.tmpfs), w_variants[0])
                if counting and w.count and v is counted:
                    for b in wlive:
                        key = (w.key, v.key, b.name)
                        if not b.fuse or key in self.errors:
                            continue
                        progress.update(f"{w.key} {v.key} {b.name} counting requests")
                        try:
                            self.count_requests(b, w, v)
                        except (
                            MountError,
                            RuntimeError,
                            OSError,
                            subprocess.SubprocessError,
                            ValueError,
                        ) as exc:
                            progress.message(f"error: counting {w.key} {b.name}: {exc}")
        except KeyboardInterrupt:
            self.interrupted = True
            progress.message("interrupted: writing partial results")
        finally:
            progress.close()
        return self.build(plan, started)

    def build(self, plan: list[tuple[Workload, Variant]], started: float) -> dict[str, Any]:
        """Assemble the report dict."""
        workloads = list({w.key: w for w, _ in plan}.values())
        variants: dict[str, list[str]] = {}
        for w, v in plan:
            variants.setdefault(w.key, []).append(v.key)
        names = [b.name for b in self.backends if b.available]
        rows = rep.build_rows(
            workloads, variants, names, self.samples_by, self.errors, self.requests
        )
        versions = {b.name: b.version for b in self.backends}
        meta = {
            "mode": self.scale.name,
            "samples": self.samples,
            "started": time.strftime("%Y-%m-%d %H:%M:%S %z", time.localtime(started)),
            "duration_s": time.time() - started,
            "interrupted": self.interrupted,
            "samples_reduced_for_time": self.reduced,
            "cpu_placement": self.args.cpu,
            "request_counts": self.count_note
            or ("perf stat, fuse:fuse_request_send" if self.requests else ""),
            "argv": sys.argv[1:],
            "subject": self.args.subject,
            "cache": str(self.cache),
            "machine": rep.machine(self.cache, versions),
            "fixtures": {n: describe(fx) for n, fx in self.fixtures.all().items()},
            "scale": {"name": self.scale.name},
        }
        backends = {
            b.name: {"available": b.available, "note": b.note, "version": b.version}
            for b in self.backends
        }
        return {
            "meta": meta,
            "backends": backends,
            "results": rows,
            "targets": rep.evaluate_targets(rows, self.args.subject),
            "errors": {"/".join(k): e for k, e in self.errors.items()},
        }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command line."""
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.run",
        description="Benchmark unionfs against kernel overlayfs and fuse-overlayfs.",
    )
    p.add_argument("--quick", action="store_true", help="small fixtures, 3 samples (< 3 min)")
    p.add_argument(
        "--tiny", action="store_true", help="tiny fixtures, 1 sample (the smoke test's scale)"
    )
    p.add_argument("--samples", type=int, help="samples per backend (default 5, quick 3)")
    p.add_argument(
        "--backends",
        default=",".join(DEFAULT_BACKENDS),
        help=f"comma list from {', '.join(ALL_BACKENDS)} (default: %(default)s)",
    )
    p.add_argument(
        "--workloads",
        help="comma list of workload keys, globs (lookup_*) or groups "
        "(lookup, read, write, mount, memory); default all",
    )
    p.add_argument(
        "--variants",
        default=",".join(VARIANTS),
        help="write-workload variants (default: %(default)s)",
    )
    p.add_argument("--cache", default=str(DEFAULT_CACHE), help="fixture cache dir (%(default)s)")
    p.add_argument("--out", default=str(OUT_DEFAULT), help="output dir (default benchmarks/out)")
    p.add_argument("--results-md", help="also write this committed results file with plots")
    p.add_argument("--subject", default="unionfs", help="backend judged against the targets")
    p.add_argument("--unionfs-bin", help="unionfs executable (default .venv/bin/unionfs)")
    p.add_argument("--tmpfs-size", default="4g", help="size of the tmpfs for tmpfs uppers")
    p.add_argument(
        "--max-minutes",
        type=float,
        help="time budget: later workloads get fewer samples (at least 1) to fit; "
        "default 2.8 with --quick, none otherwise",
    )
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument(
        "--cpu",
        choices=("free", "same", "cross"),
        default="free",
        help="where the worker and a FUSE daemon run: free (the scheduler decides, default), "
        "same (both pinned to CPU 0), cross (worker on CPU 0, daemon on CPU 1)",
    )
    p.add_argument(
        "--no-count",
        action="store_true",
        help="do not count FUSE requests (one extra perf-stat sample per counted workload)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--list", action="store_true", help="list workloads and exit")
    p.add_argument(
        "--from-json",
        help="re-render the markdown, plots and targets from an earlier results.json (no run)",
    )
    args = p.parse_args(argv)
    args.start = time.monotonic()
    if args.max_minutes is None and args.quick:
        args.max_minutes = 3.4
    # leave a little time for the report and the cleanup
    args.max_seconds = args.max_minutes * 60 - 8 if args.max_minutes else None
    args.backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    for b in args.backends:
        if b not in ALL_BACKENDS:
            p.error(f"unknown backend {b!r}")
    return args


def _scale(args: argparse.Namespace) -> Any:
    return TINY if args.tiny else QUICK if args.quick else FULL


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def write_outputs(report: dict[str, Any], args: argparse.Namespace) -> Path:
    """JSON, markdown and plots into --out; RESULTS.md (and its plots) if asked."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rep.write_json(report, out / "results.json")
    made = {} if args.no_plots else rep.plots(report, out)
    rel = {k: p.name for k, p in made.items()}
    (out / "results.md").write_text(rep.markdown(report, rel, "unionfs benchmark"))
    if args.results_md:
        md = Path(args.results_md)
        md.parent.mkdir(parents=True, exist_ok=True)
        stem = md.stem + "-"
        made = {} if args.no_plots else rep.plots(report, md.parent, stem)
        rel = {k: p.name for k, p in made.items()}
        md.write_text(rep.markdown(report, rel, "unionfs benchmark results"))
    return out


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    args = parse_args(argv)
    scale = _scale(args)
    if args.list:
        for w in select(catalogue(scale), args.workloads):
            kinds = ",".join(VARIANTS) if w.write else "-"
            print(f"{w.key:18} {w.group:7} {kinds:24} {w.title}")
        return 0
    if args.from_json:
        report = json.loads(Path(args.from_json).read_text())
        report["meta"]["subject"] = args.subject
        report["targets"] = rep.evaluate_targets(report["results"], args.subject)
        out = write_outputs(report, args)
        log(f"re-rendered into {out}" + (f" and {args.results_md}" if args.results_md else ""))
        return 0
    if os.geteuid() != 0:
        log("the benchmark needs root (kernel overlayfs, whiteout fixtures, drop_caches)")
        return 2
    # SIGINT may arrive ignored (started in the background): Ctrl-C/kill -INT must still clean up
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _raise_interrupt)
    signal.signal(signal.SIGHUP, _raise_interrupt)
    harness = Harness(args)
    report: dict[str, Any] | None = None
    try:
        report = harness.run()
    except KeyboardInterrupt:
        log("interrupted")
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        harness.cleanup()
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if report is None:
        return 130
    out = write_outputs(report, args)
    log(f"wrote {out / 'results.md'} and {out / 'results.json'}")
    if args.results_md:
        log(f"wrote {args.results_md}")
    sys.stdout.write(
        rep.results_table(
            report["results"], [b for b, i in report["backends"].items() if i["available"]]
        )
        + "\n"
    )
    return 130 if report["meta"]["interrupted"] else 0


if __name__ == "__main__":
    sys.exit(main())
