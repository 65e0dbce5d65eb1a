"""Rootless podman and buildah, step by step, with fuse-overlayfs and with unionfs as the
overlay driver's mount_program: OK or FAIL and seconds per step, as a markdown table.

    sudo .venv/bin/python -m benchmarks.rootless_steps

Needs root to make the test user (a system user with a subordinate id range, removed at the
end) and to open /dev/fuse to users for the run (its mode is restored). Each mount program
gets its own private storage (tests/containers/podenv.py), so nothing of the host's podman
is read or written. The image is a busybox root filesystem made by ``podman import``.

A step is one podman or buildah command (a ``run`` step is ``podman run`` of the
container, from start to exit) and is OK when it exits 0 and, for the steps that check something,
shows what the tests expect. Times are wall-clock seconds of a single run on this machine.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.containers.podenv import (  # noqa: E402
    CONTAINERFILE,
    FUSE_OVERLAYFS,
    Engine,
    Result,
    TestUser,
    busybox_rootfs_tar,
    fuse_for_users,
    have_podman,
    mount_program_for,
)

IMAGE = "localhost/bb"
BUILT = (
    "cat /etc/motd; ls -A /usr/share/doc/pkg; ls -A /home/user; "
    "test -e /etc/group || echo no-group; "
    "stat -c '%n %u:%g' /opt/app/data"
)
BUILT_OUT = "lower motd\nstep1\nNEW\nno-group\n/opt/app/data 1000:1000\n"

Step = tuple[str, Callable[[Engine], Result]]


def check_built(engine: Engine, tool: str) -> Result:
    return expect(engine.sh(f"localhost/built-{tool}", BUILT), BUILT_OUT)


def expect(result: Result, want: str) -> Result:
    """``result``, failed unless its output is ``want``."""
    if result.ok and result.stdout != want:
        result.returncode = 1
        result.stderr = f"output {result.stdout!r}, expected {want!r}"
    return result


def build(engine: Engine, tool: str) -> Result:
    context = engine.base / f"context-{tool}"
    context.mkdir(exist_ok=True)
    (context / "Containerfile").write_text(CONTAINERFILE)
    if engine.user is not None:
        for p in (context, context / "Containerfile"):
            os.chown(p, engine.user.uid, engine.user.gid)
    argv = ["--network", "none", "-q", "-f", str(context / "Containerfile")]
    argv += ["-t", f"localhost/built-{tool}", str(context)]
    return engine.buildah("bud", *argv) if tool == "buildah" else engine.podman("build", *argv)


STEPS: list[Step] = [
    ("import busybox rootfs", lambda e: e.podman("import", "-q", str(e.base / "bb.tar"), IMAGE)),
    ("run (no change)", lambda e: expect(e.sh(IMAGE, "cat /etc/motd"), "lower motd\n")),
    (
        "copy-up: append to a lower file",
        lambda e: expect(e.sh(IMAGE, "echo x >> /etc/motd && cat /etc/motd"), "lower motd\nx\n"),
    ),
    (
        "whiteout: rm a lower file",
        lambda e: expect(e.sh(IMAGE, "rm /etc/group; test -e /etc/group || echo gone"), "gone\n"),
    ),
    (
        "rm -r + mkdir of a lower dir",
        lambda e: expect(
            e.sh(
                IMAGE,
                "rm -r /usr/share/doc/pkg && mkdir /usr/share/doc/pkg && "
                "ls -A /usr/share/doc/pkg | wc -l",
            ),  # fmt: skip
            "0\n",
        ),
    ),
    (
        "chown 1000 of a file",
        lambda e: expect(
            e.sh(IMAGE, "touch /tmp/f && chown 1000 /tmp/f && stat -c %u:%g /tmp/f"), "1000:0\n"
        ),
    ),
    (
        "run all of the above (kept)",
        lambda e: e.sh(
            IMAGE,
            "echo changed >> /etc/motd; rm /etc/group; rm -r /usr/share/doc/pkg && "
            "mkdir /usr/share/doc/pkg && echo new > /usr/share/doc/pkg/NEW; "
            "touch /tmp/f && chown 1000 /tmp/f",
            name="changes",
        ),
    ),
    ("podman diff", lambda e: check_diff(e.podman("diff", "changes"))),
    ("podman commit", lambda e: e.podman("commit", "-q", "changes", "localhost/changes")),
    (
        "owners and contents in the committed image",
        lambda e: expect(
            e.sh(
                "localhost/changes",
                "cat /etc/motd; ls -A /usr/share/doc/pkg; test -e /etc/group || echo no-group; "
                "stat -c '%n %u:%g' /tmp/f /home/user/.profile",
            ),
            "lower motd\nchanged\nNEW\nno-group\n/tmp/f 1000:0\n/home/user/.profile 1000:1000\n",
        ),
    ),
    ("buildah bud (3 RUN steps)", lambda e: build(e, "buildah")),
    (
        "check the buildah image",
        lambda e: expect(e.sh("localhost/built-buildah", BUILT), BUILT_OUT),
    ),
    ("podman build (3 RUN steps)", lambda e: build(e, "podman")),
    ("check the podman image", lambda e: check_built(e, "podman")),
    ("podman rm + rmi", lambda e: rm_all(e)),
]


def check_diff(result: Result) -> Result:
    want = {"C /etc/motd", "D /etc/group", "A /tmp/f"}
    got = set(result.stdout.splitlines())
    if result.ok and not want <= got:
        result.returncode = 1
        result.stderr = f"diff lacks {sorted(want - got)}"
    return result


def rm_all(engine: Engine) -> Result:
    start = time.monotonic()
    rm = engine.rm("changes")
    rmi = engine.podman("rmi", "-af")
    out = rmi if rm.ok else rm
    out.seconds = time.monotonic() - start
    return out


def run_steps(engine: Engine) -> list[Result]:
    results = []
    for _name, step in STEPS:
        start = time.monotonic()
        try:
            result = step(engine)
        except Exception as exc:  # a step that raises is a FAIL, the others still run
            result = Result([], -1, "", f"{type(exc).__name__}: {exc}", 0.0)
        result.seconds = time.monotonic() - start
        results.append(result)
    return results


def cell(result: Result) -> str:
    return f"{'OK' if result.ok else 'FAIL'} {result.seconds:.2f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keep", action="store_true", help="keep the storage directories")
    parser.add_argument("-v", "--verbose", action="store_true", help="print why a step failed")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        parser.error("run as root (it creates and removes a test user)")
    reason = have_podman()
    if reason is not None:
        parser.error(reason)
    base = Path(tempfile.mkdtemp(prefix="rs", dir="/tmp"))  # short: see podenv.Engine.MAX_BASE
    os.chmod(base, 0o755)
    user = TestUser.create("ufsbench")
    table: dict[str, list[Result]] = {}
    leftovers: list[str] = []
    try:
        tar = busybox_rootfs_tar(base / "bb.tar")
        with fuse_for_users():
            for label in ("fuse-overlayfs", "unionfs"):
                ebase = base / label
                ebase.mkdir()
                os.chown(ebase, user.uid, user.gid)
                program = (
                    FUSE_OVERLAYFS if label == "fuse-overlayfs"
                    else mount_program_for(user.uid, user.gid, ebase)
                )  # fmt: skip
                engine = Engine(ebase, program, user)
                (ebase / "bb.tar").write_bytes(tar.read_bytes())
                os.chown(ebase / "bb.tar", user.uid, user.gid)
                try:
                    table[label] = run_steps(engine)
                finally:
                    leftovers += engine.teardown()
    finally:
        user.remove()
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)
    print("| step | fuse-overlayfs | unionfs |")
    print("|---|---|---|")
    for i, (name, _) in enumerate(STEPS):
        print(f"| {name} | {cell(table['fuse-overlayfs'][i])} | {cell(table['unionfs'][i])} |")
    totals = {k: sum(r.seconds for r in v) for k, v in table.items()}
    print(f"| total | {totals['fuse-overlayfs']:.2f} | {totals['unionfs']:.2f} |")
    if args.verbose:
        for label, results in table.items():
            for (name, _), r in zip(STEPS, results):
                if not r.ok:
                    print(f"{label}: {name}: {r.stderr.strip()[-500:]}", file=sys.stderr)
    if leftovers:
        print("left behind after podman system reset:", *leftovers, sep="\n  ", file=sys.stderr)
    return 0 if not leftovers else 1


if __name__ == "__main__":
    sys.exit(main())
