"""Smoke test of the benchmark harness: smallest mode, kernel backend only, no timing checks.

It runs ``python -m benchmarks.run`` as a subprocess on a few workloads (one per fixture
family it touches, including a tmpfs write variant and a mount-time workload) with its own
fixture cache, then checks that the JSON and markdown are well formed and that nothing is left
mounted.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.mount, pytest.mark.kernel, pytest.mark.slow]


def _overlay_available() -> bool:
    try:
        return "overlay" in Path("/proc/filesystems").read_text()
    except OSError:
        return False


def _mounts_below(path: Path) -> list[str]:
    prefix = str(path) + "/"
    with open("/proc/self/mountinfo", encoding="utf-8") as fh:
        return [line.split()[4] for line in fh if line.split()[4].startswith(prefix)]


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (kernel overlayfs, whiteouts)")
@pytest.mark.skipif(not _overlay_available(), reason="kernel overlayfs not available")
def test_quick_kernel_only(tmp_path: Path) -> None:
    cache, out = tmp_path / "cache", tmp_path / "out"
    results_md = tmp_path / "committed" / "RESULTS.md"
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.run",
        "--quick",
        "--backends",
        "kernel",
        "--samples",
        "1",
        "--workloads",
        "stat_warm,lookup_cold_8,copyup_4k,mount_8,rss_walk",
        "--variants",
        "tmpfs",
        "--cache",
        str(cache),
        "--out",
        str(out),
        "--results-md",
        str(results_md),
        "--no-progress",
        "--subject",
        "kernel",
    ]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]

    report = json.loads((out / "results.json").read_text())
    assert set(report) >= {"meta", "backends", "results", "targets", "errors"}
    assert report["errors"] == {}
    assert report["backends"]["kernel"]["available"] is True
    assert report["meta"]["mode"] == "quick"
    assert report["meta"]["machine"]["CPU"]
    rows = {(r["workload"], r["variant"]): r for r in report["results"]}
    assert set(rows) == {
        ("stat_warm", "-"),
        ("lookup_cold_8", "-"),
        ("copyup_4k", "tmpfs"),
        ("mount_8", "-"),
        ("rss_walk", "-"),
    }
    for key, row in rows.items():
        stats = row["backends"]["kernel"]
        if key[0] == "rss_walk":  # no daemon for the kernel
            assert stats["median"] is None
            continue
        assert len(stats["samples"]) == 1
        assert stats["median"] > 0
        assert stats["min"] <= stats["median"] <= stats["max"]
    assert len(report["targets"]) >= 13
    assert {t["status"] for t in report["targets"]} <= {
        "met",
        "not met",
        "not measured",
        "met (partly measured)",
    }

    for md in (out / "results.md", results_md):
        text = md.read_text()
        assert "## Targets" in text and "## Results" in text and "## Machine" in text
        tables = [line for line in text.splitlines() if line.startswith("|")]
        assert tables
        # every table row of a table has as many cells as its header
        widths: list[int] = []
        for line in text.splitlines() + [""]:
            if line.startswith("|"):
                widths.append(line.count("|"))
            elif widths:
                assert len(set(widths)) == 1, widths
                widths = []
    assert (out / "lookup.png").stat().st_size > 0
    assert (results_md.parent / "RESULTS-lookup.png").exists()

    # the machine is left clean: no mounts, no run directories
    assert _mounts_below(cache) == []
    assert not (cache / "runs").exists()
