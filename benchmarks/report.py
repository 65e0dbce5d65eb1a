"""Statistics, targets, and the three outputs: JSON, markdown (and RESULTS.md), PNG plots."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.workloads import Workload

REFERENCES = ("kernel", "fuse-overlayfs")
MB = 1_000_000


# -- statistics -------------------------------------------------------------------------------


def summarize(values: list[float]) -> dict[str, float | None]:
    """Median, min and max of a sample list (``None`` when empty)."""
    if not values:
        return {"median": None, "min": None, "max": None}
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def build_rows(
    workloads: list[Workload],
    variants: dict[str, list[str]],
    backends: list[str],
    samples: dict[tuple[str, str, str], list[dict[str, Any]]],
    errors: dict[tuple[str, str, str], str],
    requests: dict[tuple[str, str, str], dict[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """One row per (workload, variant): per-backend stats and ratios to the references
    (and the FUSE requests per operation, where they were counted)."""
    requests = requests or {}
    rows = []
    for w in workloads:
        for v in variants[w.key]:
            row: dict[str, Any] = {
                "workload": w.key,
                "title": w.title,
                "group": w.group,
                "kind": w.kind,
                "variant": v,
                "x": w.x,
                "suite": w.suite,
                "backends": {},
            }
            for b in backends:
                got = samples.get((w.key, v, b), [])
                vals = [s["value"] for s in got if s.get("value") is not None]
                stats: dict[str, Any] = {"samples": vals, **summarize(vals)}
                ops = [s.get("ops") for s in got if s.get("ops")]
                if ops and stats["median"] is not None and w.kind == "time":
                    stats["ops"] = ops[0]
                    stats["per_op_us"] = stats["median"] / ops[0] * 1e6
                extra = [s["extra"] for s in got if s.get("extra")]
                if extra:
                    stats["extra"] = extra
                if (w.key, v, b) in errors:
                    stats["error"] = errors[(w.key, v, b)]
                if (w.key, v, b) in requests:
                    stats["requests"] = requests[(w.key, v, b)]
                row["backends"][b] = stats
            for b in backends:
                med = row["backends"][b]["median"]
                ratios = {}
                for ref in REFERENCES:
                    rmed = row["backends"].get(ref, {}).get("median")
                    if ref != b and med is not None and rmed:
                        ratios[ref] = med / rmed
                row["backends"][b]["ratio"] = ratios
            rows.append(row)
    return rows


# -- targets ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Check:
    """One measurable condition: ``ratio`` to fuse-overlayfs, ``growth`` or ``absolute``."""

    kind: str
    workload: str
    variant: str = "-"
    limit: float = 1.0
    other: str = ""  # growth: the workload at the start of the range


@dataclass(frozen=True)
class Target:
    """A row of the issue's targets table."""

    row: str
    target: str
    checks: tuple[Check, ...]


def _lookup_warm_checks() -> tuple[Check, ...]:
    return tuple(Check("ratio", f"lookup_warm_{d}", limit=1.0) for d in (1, 8, 32, 100, 500))


TARGETS: tuple[Target, ...] = (
    Target(
        "warm stat of every file, warm deep lookups",
        "≤ 1.0",
        (Check("ratio", "stat_warm", limit=1.0), *_lookup_warm_checks()),
    ),
    Target("cold stat of every file", "≤ 1.5", (Check("ratio", "stat_cold", limit=1.5),)),
    Target(
        "cold lookup in a 100-layer stack",
        "≤ 0.5",
        (Check("ratio", "lookup_cold_100", limit=0.5),),
    ),
    Target(
        "cold lookup cost from 1 to 500 layers",
        "grows < 2x",
        (Check("growth", "lookup_cold_500", other="lookup_cold_1", limit=2.0),),
    ),
    Target(
        "readdir cold / warm",
        "≤ 1.5 / ≤ 2.0",
        (Check("ratio", "readdir_cold", limit=1.5), Check("ratio", "readdir_warm", limit=2.0)),
    ),
    Target(
        "sequential read cold / warm",
        "≤ 1.1 / ≤ 1.0",
        (Check("ratio", "seqread_cold", limit=1.1), Check("ratio", "seqread_warm", limit=1.0)),
    ),
    Target("open-read-close", "≤ 1.5", (Check("ratio", "orc", limit=1.5),)),
    Target(
        "copy-up 64 MiB and 512 MiB (tmpfs upper, same fsync policy)",
        "≤ 1.0",
        (
            Check("ratio", "copyup_64m", "tmpfs", 1.0),
            Check("ratio", "copyup_512m", "tmpfs", 1.0),
        ),
    ),
    Target(
        "copy-up 4 KiB, chmod-only copy-up (tmpfs)",
        "≤ 1.5",
        (Check("ratio", "copyup_4k", "tmpfs", 1.5), Check("ratio", "chmod_copyup", "tmpfs", 1.5)),
    ),
    Target(
        "create 10,000 files, untar (tmpfs)",
        "≤ 1.5",
        (Check("ratio", "create", "tmpfs", 1.5), Check("ratio", "untar", "tmpfs", 1.5)),
    ),
    Target("unlink 5,000 lower files (tmpfs)", "≤ 1.0", (Check("ratio", "unlink", "tmpfs", 1.0),)),
    Target("mount time with 100 layers", "≤ 0.2", (Check("ratio", "mount_100", limit=0.2),)),
    Target(
        "RSS after walking 100,000 files",
        "≤ 150 MB",
        (Check("absolute", "rss_walk", limit=150 * MB),),
    ),
)

_WRITE_KEYS = (
    "copyup_4k",
    "copyup_1m",
    "copyup_64m",
    "copyup_512m",
    "chmod_copyup",
    "create",
    "untar",
    "unlink",
    "rename",
)

# Issue 14: container workloads, and every write row on tmpfs and on disk.
TARGETS += (
    Target(
        "(issue 14) mount, argv to usable / with 100 layers",
        "≤ 1.5 / ≤ 1.0",
        (
            Check("ratio", "mountready_1", limit=1.5),
            Check("ratio", "mountready_10", limit=1.5),
            Check("ratio", "mountready_100", limit=1.0),
        ),
    ),
    Target(
        "(issue 14) xattr walks (lstat + getxattr + listxattr), cold and warm",
        "≤ 1.0",
        (
            Check("ratio", "xattr_walk_cold", limit=1.0),
            Check("ratio", "xattr_walk_warm", limit=1.0),
        ),
    ),
    Target(
        "(issue 14) package unpack, default fsync and fsync=0",
        "≤ 1.2",
        (
            Check("ratio", "unpack", "disk", 1.2),
            Check("ratio", "unpack", "disk-fsync0", 1.2),
        ),
    ),
    Target(
        "(issue 14) podman build (seed, many steps), diff, commit",
        "≤ 1.2",
        tuple(
            Check("ratio", k, limit=1.2)
            for k in ("podman_build_seed", "podman_build_steps", "podman_diff", "podman_commit")
        ),
    ),
    Target(
        "(issue 14) every write row, tmpfs",
        "≤ 1.5",
        tuple(Check("ratio", k, "tmpfs", 1.5) for k in _WRITE_KEYS),
    ),
    Target(
        "(issue 14) every write row, disk (default fsync and fsync=0)",
        "≤ 1.2",
        tuple(Check("ratio", k, v, 1.2) for k in _WRITE_KEYS for v in ("disk", "disk-fsync0")),
    ),
)


def _find(rows: list[dict[str, Any]], key: str, variant: str) -> dict[str, Any] | None:
    for r in rows:
        if r["workload"] == key and r["variant"] == variant:
            return r
    return None


def evaluate_targets(rows: list[dict[str, Any]], subject: str) -> list[dict[str, Any]]:
    """Mark each target row met / not met / not measured for the ``subject`` backend."""
    out = []
    for t in TARGETS:
        results: list[bool | None] = []
        parts: list[str] = []
        for c in t.checks:
            row = _find(rows, c.workload, c.variant)
            stats = row["backends"].get(subject, {}) if row else {}
            med = stats.get("median")
            label = c.workload + (f"[{c.variant}]" if c.variant != "-" else "")
            if c.kind == "ratio":
                ratio = stats.get("ratio", {}).get("fuse-overlayfs")
                ok = None if ratio is None else ratio <= c.limit
                value = "n/a" if ratio is None else f"{ratio:.2f}"
            elif c.kind == "growth":
                first = _find(rows, c.other, c.variant)
                base = first["backends"].get(subject, {}).get("median") if first else None
                growth = med / base if med is not None and base else None
                ok = None if growth is None else growth < c.limit
                value = "n/a" if growth is None else f"{growth:.2f}x"
            else:
                ok = None if med is None else med <= c.limit
                value = "n/a" if med is None else f"{med / MB:.0f} MB"
            results.append(ok)
            parts.append(f"{label} {value}")
        if all(r is None for r in results):
            status = "not measured"
        elif any(r is False for r in results):
            status = "not met"
        elif any(r is None for r in results):
            status = "met (partly measured)"
        else:
            status = "met"
        value = "–" if all(r is None for r in results) else "; ".join(parts)
        out.append({"row": t.row, "target": t.target, "value": value, "status": status})
    return out


# -- formatting -------------------------------------------------------------------------------


def fmt_value(value: float | None, kind: str) -> str:
    """Seconds with a fitting unit, or bytes as MB for RSS."""
    if value is None:
        return "–"
    if kind == "rss":
        return f"{value / MB:.1f} MB"
    if value >= 10:
        return f"{value:.1f} s"
    if value >= 1:
        return f"{value:.2f} s"
    if value >= 1e-3:
        return f"{value * 1e3:.1f} ms"
    return f"{value * 1e6:.0f} µs"


def _cell(stats: dict[str, Any], kind: str) -> str:
    if stats.get("median") is None:
        if stats.get("error"):
            return "error"
        return "n/a" if kind == "rss" else "–"
    cell = fmt_value(stats["median"], kind)
    if len(stats.get("samples", [])) > 1:
        cell += f" ({fmt_value(stats['min'], kind)}–{fmt_value(stats['max'], kind)})"
    return cell


FLOOR = ("bare",)


def results_table(rows: list[dict[str, Any]], backends: list[str]) -> str:
    """The main markdown table: medians (min–max) per backend and ratios."""
    backends = [b for b in backends if b not in FLOOR]
    ratio_cols = [(b, "kernel") for b in backends if b != "kernel" and "kernel" in backends]
    ratio_cols += [
        (b, "fuse-overlayfs")
        for b in backends
        if b not in REFERENCES and "fuse-overlayfs" in backends
    ]
    head = ["workload", "variant", "ops", *backends, *[f"{b} / {r}" for b, r in ratio_cols]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        ops = [st["ops"] for st in r["backends"].values() if st.get("ops")]
        cells = [r["title"], r["variant"], str(ops[0]) if ops else ""]
        cells += [_cell(r["backends"][b], r["kind"]) for b in backends]
        for b, ref in ratio_cols:
            ratio = r["backends"][b].get("ratio", {}).get(ref)
            cells.append("–" if ratio is None else f"{ratio:.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _us(value: float | None) -> str:
    if value is None:
        return "–"
    return f"{value:.1f}" if value < 100 else f"{value:.0f}"


def _req_cell(stats: dict[str, Any]) -> str:
    req = stats.get("requests")
    if not req:
        return "–"
    parts = sorted(req["by_op"].items(), key=lambda kv: -kv[1])
    top = ", ".join(f"{k} {v:.2g}" for k, v in parts[:6] if v >= 0.01)
    return f"{req['per_op']:.2f}" + (f" ({top})" if top else "")


def roundtrip_table(rows: list[dict[str, Any]], backends: list[str]) -> str:
    """Round trips: one row per backend (the bare floor first), µs per op, ratio to
    fuse-overlayfs and FUSE requests per op for each round-trip workload."""
    rts = [r for r in rows if r["group"] == "roundtrip"]
    if not rts:
        return ""
    order = [b for b in FLOOR if b in backends] + [b for b in backends if b not in FLOOR]
    head = ["backend"]
    for r in rts:
        head += [f"{r['workload']} µs/op", "/ f-o", "requests/op"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for b in order:
        cells = [b + (" (floor)" if b in FLOOR else "")]
        for r in rts:
            st = r["backends"].get(b, {})
            ratio = st.get("ratio", {}).get("fuse-overlayfs")
            cells += [
                "error" if st.get("error") else _us(st.get("per_op_us")),
                "–" if ratio is None else f"{ratio:.2f}",
                _req_cell(st),
            ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def requests_table(rows: list[dict[str, Any]], backends: list[str]) -> str:
    """FUSE requests per operation of every counted workload (round trips have their own
    table), per FUSE backend."""
    counted = [
        r
        for r in rows
        if r["group"] != "roundtrip" and any(st.get("requests") for st in r["backends"].values())
    ]
    if not counted:
        return ""
    fuse = [b for b in backends if any(r["backends"].get(b, {}).get("requests") for r in counted)]
    head = ["workload", "variant", *[f"{b} requests/op (top opcodes)" for b in fuse]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in counted:
        cells = [r["title"], r["variant"]] + [_req_cell(r["backends"].get(b, {})) for b in fuse]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def targets_table(targets: list[dict[str, Any]], subject: str) -> str:
    """The issue's targets with this run's values and met / not met."""
    lines = [
        f"| workload | target (ratio to fuse-overlayfs) | {subject} | status |",
        "|---|---|---|---|",
    ]
    for t in targets:
        lines.append(f"| {t['row']} | {t['target']} | {t['value']} | {t['status']} |")
    return "\n".join(lines)


def backends_table(info: dict[str, dict[str, Any]]) -> str:
    """Which backends ran, their versions, and why any were skipped."""
    lines = ["| backend | version | status |", "|---|---|---|"]
    shown = dict(info)
    for name in ("kernel", "fuse-overlayfs", "unionfs"):
        shown.setdefault(name, {"available": False, "note": "not requested (--backends)"})
    for name, b in shown.items():
        status = "measured" if b["available"] else "skipped"
        if b.get("note"):
            status += f": {b['note']}"
        lines.append(f"| {name} | {b.get('version') or '–'} | {status} |")
    return "\n".join(lines)


def markdown(report: dict[str, Any], plots: dict[str, str], title: str) -> str:
    """The whole markdown report."""
    meta = report["meta"]
    backends = [b for b, i in report["backends"].items() if i["available"]]
    out = [f"# {title}", ""]
    out.append(
        f"Mode **{meta['mode']}**, {meta['samples']} sample(s) per backend, backends interleaved, "
        f"fresh mount per sample; started {meta['started']}, took {meta['duration_s']:.0f} s. "
        "Cells: median (min–max) of the timed run. Ratios: median / median of the reference "
        "(lower is better)."
    )
    if meta.get("cpu_placement", "free") != "free":
        out += [
            "",
            f"_CPU placement `{meta['cpu_placement']}`: worker on CPU 0, FUSE daemons on CPU "
            f"{0 if meta['cpu_placement'] == 'same' else 1}._",
        ]
    if meta.get("samples_reduced_for_time"):
        out += ["", "_Some workloads got fewer samples to fit the time budget._"]
    if meta.get("interrupted"):
        out += ["", "**Interrupted: partial results.**"]
    out += ["", "## Machine", ""]
    for k, v in meta["machine"].items():
        out.append(f"- {k}: {v}")
    out += ["", "## Backends", "", backends_table(report["backends"])]
    out += ["", f"## Targets ({meta['subject']} vs fuse-overlayfs)", ""]
    out.append(targets_table(report["targets"], meta["subject"]))
    if meta["mode"] != "full":
        out += ["", "_Quick mode: smaller fixtures, so the targets are indicative only._"]
    out += ["", "## Results", ""]
    out.append(results_table(report["results"], backends))
    rt = roundtrip_table(report["results"], backends)
    if rt:
        out += ["", "## Round trips", ""]
        out.append(
            "Cost of one operation as a program sees it (median µs per op), its ratio to "
            "fuse-overlayfs, and the FUSE requests each op sent, counted in one extra untimed "
            "sample with the kernel's `fuse:fuse_request_send` tracepoint (`perf stat`, "
            "filtered on the mount's connection). `bare` is the floor: the same system calls "
            "on a plain directory of the upper's filesystem (no union). `rt_getattr` uses "
            "`statx(AT_STATX_FORCE_SYNC)`, which always reaches a FUSE daemon; `rt_fstat` "
            "may be answered from the kernel's attribute cache."
        )
        out += ["", rt]
    req = requests_table(report["results"], backends)
    if req:
        out += ["", "## FUSE requests per operation", "", req]
    out += ["", "## Workloads", ""]
    out.append(
        "Variants of write workloads: `disk` = upper on the fixture filesystem with the default "
        "fsync policy; `disk-fsync0` = the same with `-o fsync=0` (kernel: `volatile`); "
        "`tmpfs` = upper and workdir on a private tmpfs. Cold = caches dropped after a fresh "
        "mount; warm = one untimed pass first."
    )
    out += ["", "## Fixtures", ""]
    for name, fx in meta.get("fixtures", {}).items():
        desc = ", ".join(
            f"{k}={len(v) if isinstance(v, list) else v}"
            for k, v in fx.items()
            if k not in ("root", "params")
        )
        out.append(f"- {name}: {desc}")
    out += [
        "",
        "Disk-upper variants depend on the disk and on everything else doing I/O on the "
        "machine; the tmpfs variant isolates the filesystem's own cost.",
    ]
    if plots:
        out += ["", "## Plots", ""]
        for label, path in plots.items():
            out.append(f"![{label}]({path})")
    return "\n".join(out) + "\n"


# -- plots ------------------------------------------------------------------------------------


def _series(rows: list[dict[str, Any]], prefix: str, variant: str, backend: str) -> list[Any]:
    pts = []
    for r in rows:
        if r["workload"].startswith(prefix) and r["variant"] == variant and r["x"] is not None:
            st = r["backends"].get(backend, {})
            if st.get("median") is not None:
                per = st["median"] / st["ops"] if st.get("ops") else st["median"]
                pts.append((r["x"], per))
    return sorted(pts)


def plots(report: dict[str, Any], outdir: Path, stem: str = "") -> dict[str, Path]:
    """Lookup cost and mount time vs layer count; copy-up time vs file size. PNG via Agg."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["results"]
    backends = [b for b, i in report["backends"].items() if i["available"]]
    made: dict[str, Path] = {}

    def save(fig: Any, name: str, label: str) -> None:
        path = outdir / f"{stem}{name}.png"
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        made[label] = path

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    drew = False
    for ax, which in zip(axes, ("cold", "warm")):
        for b in backends:
            pts = _series(rows, f"lookup_{which}_", "-", b)
            if pts:
                drew = True
                ax.plot([p[0] for p in pts], [p[1] * 1e6 for p in pts], marker="o", label=b)
        ax.set(xscale="log", xlabel="layers", ylabel="µs per lookup")
        ax.set_yscale("log" if which == "cold" else "linear")
        if which == "warm":
            ax.set_ylim(bottom=0)
        ax.set_title(f"{which} deep lookup")
        ax.grid(True, which="both", alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    if drew:
        save(fig, "lookup", "lookup cost vs layer count")
    else:
        plt.close(fig)

    variants = [
        v
        for v in ("disk", "disk-fsync0", "tmpfs")
        if any(r["variant"] == v and r["workload"].startswith("copyup_") for r in rows)
    ]
    if variants:
        fig, axes = plt.subplots(1, len(variants), figsize=(5 * len(variants), 4), squeeze=False)
        for ax, v in zip(axes[0], variants):
            for b in backends:
                pts = _series(rows, "copyup_", v, b)
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=b)
            ax.set(xscale="log", yscale="log", xlabel="file size (bytes)", ylabel="s per file")
            ax.set_title(f"copy-up, {v}")
            ax.grid(True, which="both", alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend()
        save(fig, "copyup", "copy-up time vs file size")

    fig, ax = plt.subplots(figsize=(5, 4))
    drew = False
    for b in backends:
        pts = _series(rows, "mount_", "-", b)
        if pts:
            drew = True
            ax.plot([p[0] for p in pts], [p[1] * 1e3 for p in pts], marker="o", label=b)
    if drew:
        ax.set(xscale="log", xlabel="layers", ylabel="ms", title="mount time")
        ax.grid(True, which="both", alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
        save(fig, "mount", "mount time vs layer count")
    else:
        plt.close(fig)

    fig, ax = plt.subplots(figsize=(5, 4))
    drew = False
    for b in backends:
        pts = _series(rows, "mountready_", "-", b)
        if pts:
            drew = True
            ax.plot([p[0] for p in pts], [p[1] * 1e3 for p in pts], marker="o", label=b)
    if drew:
        ax.set(xscale="log", yscale="log", xlabel="layers", ylabel="ms")
        ax.set_title("mount, argv to usable")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
        save(fig, "ready", "mount time (argv to usable) vs layer count")
    else:
        plt.close(fig)

    groups = [
        ("roundtrip", "µs per op", "round trips"),
        ("xattr", "s", "xattr walks"),
        ("unpack", "s", "package unpack"),
    ]
    present = [g for g in groups if any(r["group"] == g[0] for r in rows)]
    if present:
        fig, axes = plt.subplots(1, len(present), figsize=(5 * len(present), 4), squeeze=False)
        for ax, (group, unit, title) in zip(axes[0], present):
            grows = [r for r in rows if r["group"] == group]
            labels = [
                r["workload"] + (f"\n{r['variant']}" if r["variant"] != "-" else "") for r in grows
            ]
            shown = [
                b for b in backends if any(r["backends"].get(b, {}).get("median") for r in grows)
            ]
            width = 0.8 / max(1, len(shown))
            for k, b in enumerate(shown):
                vals = []
                for r in grows:
                    st = r["backends"].get(b, {})
                    if group == "roundtrip":
                        vals.append(st.get("per_op_us") or 0)
                    else:
                        vals.append(st.get("median") or 0)
                xs = [i + k * width for i in range(len(grows))]
                ax.bar(xs, vals, width, label=b)
            ax.set_xticks([i + width * (len(shown) - 1) / 2 for i in range(len(grows))])
            ax.set_xticklabels(labels, rotation=30, ha="right", fontsize=7)
            ax.set(ylabel=unit, title=title)
            ax.grid(True, axis="y", alpha=0.3)
            ax.legend(fontsize=7)
        save(fig, "container", "container workloads (round trips, xattr walks, unpack)")
    return made


# -- machine description ----------------------------------------------------------------------


def _cmd(argv: list[str]) -> str:
    try:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=20, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    lines = (p.stdout + p.stderr).strip().splitlines()
    return lines[0] if lines else "unknown"


def fs_of(path: Path) -> str:
    """Filesystem type and source of the mount holding ``path``."""
    best, desc = "", "unknown"
    target = os.path.realpath(path)
    with open("/proc/self/mountinfo", encoding="utf-8") as fh:
        for line in fh:
            left, right = line.split(" - ", 1)
            mp = left.split()[4]
            if (target == mp or target.startswith(mp.rstrip("/") + "/")) and len(mp) > len(best):
                fstype, source = right.split()[:2]
                best, desc = mp, f"{fstype} ({source} on {mp})"
    return desc


def machine(cache: Path, backend_versions: dict[str, str]) -> dict[str, str]:
    """CPU, memory, kernel, fixture filesystem, tool versions."""
    cpu = "unknown"
    with open("/proc/cpuinfo", encoding="utf-8") as fh:
        for line in fh:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = "unknown"
    with open("/proc/meminfo", encoding="utf-8") as fh:
        for line in fh:
            if line.startswith("MemTotal:"):
                mem = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
    try:
        from importlib.metadata import version

        pyfuse3 = version("pyfuse3")
    except ImportError:
        pyfuse3 = "not installed"
    except Exception as exc:  # noqa: BLE001 - any metadata failure just means "unknown"
        pyfuse3 = f"unknown ({type(exc).__name__})"
    params = Path("/sys/module/overlay/parameters")
    ovl = []
    if params.is_dir():
        for p in sorted(params.iterdir()):
            try:
                ovl.append(f"{p.name}={p.read_text().strip()}")
            except OSError:
                continue
    info = {
        "CPU": f"{cpu}, {os.cpu_count()} cores",
        "memory": mem,
        "kernel": f"{platform.system()} {os.uname().release}",
        "fixture filesystem": fs_of(cache),
        "python": platform.python_version(),
        "pyfuse3": pyfuse3,
        "fuse-overlayfs": (backend_versions.get("fuse-overlayfs") or "not installed").replace(
            "fuse-overlayfs: ", ""
        ),
        "fusermount3": _cmd(["fusermount3", "--version"]),
        "unionfs": backend_versions.get("unionfs") or "unknown",
        "overlay module defaults": " ".join(ovl) or "unknown",
    }
    return info


def write_json(report: dict[str, Any], path: Path) -> None:
    """Write the JSON report."""
    path.write_text(json.dumps(report, indent=1, default=str) + "\n", encoding="utf-8")
