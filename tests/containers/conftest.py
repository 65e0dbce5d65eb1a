"""Fixtures of the podman tests: the image tar, the test user, and one private engine per
(mode, mount program), made once per module and torn down with a check that nothing is left."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.containers.podenv import (
    FUSE_OVERLAYFS,
    UNIONFS,
    Engine,
    TestUser,
    busybox_rootfs_tar,
    have_podman,
    mount_program_for,
)

IMAGE = "localhost/bb"


@pytest.fixture(scope="module")
def workdir() -> Iterator[Path]:
    reason = have_podman()
    if reason is not None:
        pytest.skip(reason)
    base = Path(tempfile.mkdtemp(prefix="pm", dir="/tmp"))  # short: see podenv.Engine
    os.chmod(base, 0o755)  # the test user walks through it to its own engine
    yield base
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def image_tar(workdir: Path) -> Path:
    return busybox_rootfs_tar(workdir / "busybox-rootfs.tar")


@pytest.fixture(scope="module")
def test_user(workdir: Path) -> Iterator[TestUser]:
    user = TestUser.create()
    try:
        yield user
    finally:
        user.remove()


@pytest.fixture(scope="module")
def engines(
    workdir: Path, image_tar: Path, test_user: TestUser
) -> Iterator[Callable[[str, str], Engine]]:
    """``engines(mode, program)``: the module's engine for mode ``rootful``/``rootless`` and
    mount program ``unionfs``/``fuse-overlayfs``, with the busybox image imported. At the end
    of the module every engine is reset (before the test user is removed); a process or
    mount that outlived the reset fails."""
    made: dict[tuple[str, str], Engine] = {}

    def get(mode: str, program: str) -> Engine:
        key = (mode, program)
        if key not in made:
            base = workdir / f"{mode[:5]}-{program[0]}"  # rootf-u, rootl-f, ...
            user = test_user if mode == "rootless" else None
            if program == "fuse-overlayfs":
                path = FUSE_OVERLAYFS
            elif user is not None:
                base.mkdir()
                os.chown(base, user.uid, user.gid)
                path = mount_program_for(user.uid, user.gid, base)
            else:
                path = UNIONFS
            engine = Engine(base, path, user)
            if user is None:
                engine.disable_idmapped_lowers()
            made[key] = engine
            engine.import_image(image_tar, IMAGE)
        return made[key]

    yield get
    leftovers = []
    for engine in made.values():
        leftovers += engine.teardown()
    assert not leftovers, "left behind after podman system reset:\n" + "\n".join(leftovers)


def fuse_mounts_under(base: Path) -> list[str]:
    out = []
    with open("/proc/self/mounts") as f:
        for line in f:
            fields = line.split()
            mnt = fields[1].encode().decode("unicode_escape")
            if fields[2].startswith("fuse") and mnt.startswith(str(base) + "/"):
                out.append(mnt)
    return out
