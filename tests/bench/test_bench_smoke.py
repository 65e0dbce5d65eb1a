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


def _unionfs_mounts() -> bool:
    return os.access(REPO / ".venv" / "bin" / "unionfs", os.X_OK) and os.path.exists("/dev/fuse")


def _run_tiny(tmp_path: Path, workloads: str, backends: str, *extra: str) -> dict:
    cache, out = tmp_path / "cache", tmp_path / "out"
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.run",
        "--tiny",
        "--backends",
        backends,
        "--workloads",
        workloads,
        "--cache",
        str(cache),
        "--out",
        str(out),
        "--no-progress",
        *extra,
    ]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert _mounts_below(cache) == []
    assert not (cache / "runs").exists()
    report = json.loads((out / "results.json").read_text())
    assert report["errors"] == {}, report["errors"]
    report["_md"] = (out / "results.md").read_text()
    return report


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (kernel overlayfs, whiteouts)")
@pytest.mark.skipif(not _overlay_available(), reason="kernel overlayfs not available")
@pytest.mark.skipif(not _unionfs_mounts(), reason="unionfs or /dev/fuse missing")
def test_tiny_container_workloads(tmp_path: Path) -> None:
    """Round trips (with the bare floor and request counts), xattr walks, mount-ready time and
    the dpkg-style unpack run on kernel, unionfs and bare, and report what they did."""
    report = _run_tiny(
        tmp_path,
        "rt_getattr,rt_neglookup,rt_create,xattr_walk_warm,lstat_walk_warm,mountready_1,unpack",
        "kernel,unionfs,bare",
        "--variants",
        "tmpfs",  # the disk variants and cold walks wait for sync: slow on a busy machine
    )
    rows = {(r["workload"], r["variant"]): r for r in report["results"]}
    assert set(rows) == {
        ("rt_getattr", "-"),
        ("rt_neglookup", "-"),
        ("rt_create", "tmpfs"),
        ("xattr_walk_warm", "-"),
        ("lstat_walk_warm", "-"),
        ("mountready_1", "-"),
        ("unpack", "tmpfs"),
    }
    for (key, _), row in rows.items():
        bare = row["backends"]["bare"]
        if key.startswith("rt_"):  # the floor runs the round trips only
            assert bare["median"] > 0 and bare["ops"] == 200
        else:
            assert bare["median"] is None and not bare.get("error")
        for b in ("kernel", "unionfs"):
            assert row["backends"][b]["median"] > 0, (key, b)
    # both walks saw the whole merged tree, the same on the kernel and on unionfs
    for key in ("xattr_walk_warm", "lstat_walk_warm"):
        walk = rows[(key, "-")]["backends"]
        assert walk["kernel"]["ops"] == walk["unionfs"]["ops"] > 250
    assert rows[("unpack", "tmpfs")]["backends"]["unionfs"]["ops"] == 40
    counted = report["meta"]["request_counts"]
    if counted.startswith("perf stat"):
        # each forced getattr and each lookup of a new missing name reaches the daemon
        got = rows[("rt_getattr", "-")]["backends"]["unionfs"]["requests"]
        assert got["by_op"].get("GETATTR", 0) >= 1.0
        got = rows[("rt_neglookup", "-")]["backends"]["unionfs"]["requests"]
        assert got["by_op"].get("LOOKUP", 0) >= 1.0
        got = rows[("rt_create", "tmpfs")]["backends"]["unionfs"]["requests"]
        assert got["by_op"].get("CREATE", 0) >= 1.0
        assert "requests" not in rows[("rt_getattr", "-")]["backends"]["kernel"]  # no daemon
    md = report["_md"]
    assert "## Round trips" in md and "bare (floor)" in md


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root")
@pytest.mark.skipif(not _unionfs_mounts(), reason="unionfs or /dev/fuse missing")
@pytest.mark.skipif(
    not os.access("/usr/bin/podman", os.X_OK) or not os.access("/bin/busybox", os.X_OK),
    reason="podman or busybox-static not installed",
)
def test_tiny_podman_workloads(tmp_path: Path) -> None:
    """The podman suite with unionfs as mount_program: every command succeeds, storage is
    private and removed afterwards."""
    before = set(os.listdir("/run"))
    report = _run_tiny(tmp_path, "podman", "unionfs", "--no-plots")
    rows = {r["workload"]: r for r in report["results"]}
    assert set(rows) == {
        "podman_build_seed",
        "podman_build_steps",
        "podman_diff",
        "podman_commit",
        "podman_run",
    }
    for key, row in rows.items():
        assert row["backends"]["unionfs"]["median"] > 0, key
    assert {n for n in os.listdir("/run") if n.startswith("ubench-")} - before == set()
