"""Real podman and buildah with unionfs as the overlay driver's ``mount_program`` (issue 12).

Rootful and rootless (a test user with a subordinate id range, /dev/fuse opened inside
podman's user namespace, the mount through fusermount3), in private storage (see
``podenv``). Each scenario runs the same steps with fuse-overlayfs as the mount program where
its result is the reference: what ``podman diff`` lists and the owners in a committed image.
The image is a busybox root filesystem made by ``podman import``; nothing is pulled.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from collections.abc import Callable, Iterator

import pytest

from tests.containers.conftest import IMAGE, fuse_mounts_under
from tests.containers.podenv import CONTAINERFILE, Engine, containers_subids
from tests.mount.test_unprivileged import fuse_for_users  # noqa: F401

pytestmark = pytest.mark.mount

Engines = Callable[[str, str], Engine]

# In a container of the busybox image: copy-up of a lower file, whiteout of another, a lower
# directory deleted and made again (an opaque directory), a chown to 1000 of a new file and
# a write to a lower file owned by 1000.
CHANGES = (
    "set -e; echo changed >> /etc/motd; rm /etc/group; "
    "rm -r /usr/share/doc/pkg && mkdir /usr/share/doc/pkg && echo new > /usr/share/doc/pkg/NEW; "
    "touch /tmp/f && chown 1000 /tmp/f; echo more >> /home/user/.profile; "
    "cat /etc/motd; ls -A /usr/share/doc/pkg; "
    "stat -c '%n %u:%g' /etc/passwd /tmp/f /home/user/.profile"
)
CHANGES_OUT = (
    "lower motd\nchanged\nNEW\n/etc/passwd 0:0\n/tmp/f 1000:0\n/home/user/.profile 1000:1000\n"
)

# What a committed image holds, owners included.
INSPECT = (
    "cat /etc/motd; ls -A /usr/share/doc/pkg; test ! -e /etc/group && echo no-group; "
    "stat -c '%n %u:%g %a' /etc/passwd /tmp/f /home/user /home/user/.profile "
    "/usr/share/doc/pkg /usr/share/doc/pkg/NEW"
)
INSPECT_OUT = (
    "lower motd\nchanged\nNEW\nno-group\n"
    "/etc/passwd 0:0 644\n/tmp/f 1000:0 644\n/home/user 1000:1000 755\n"
    "/home/user/.profile 1000:1000 644\n/usr/share/doc/pkg 0:0 755\n"
    "/usr/share/doc/pkg/NEW 0:0 644\n"
)

BUILT = (
    "cat /etc/motd /opt/app/data /usr/share/doc/pkg/NEW; ls -A /usr/share/doc/pkg; "
    "ls -A /home/user; "
    "test ! -e /etc/group && echo no-group; "
    "stat -c '%n %u:%g' /opt/app/data /opt/app/done /etc/passwd"
)
BUILT_OUT = (
    "lower motd\nstep1\ndata\nrebuilt\nNEW\nno-group\n"
    "/opt/app/data 1000:1000\n/opt/app/done 0:0\n/etc/passwd 0:0\n"
)


@pytest.fixture(params=["rootful", "rootless"])
def mode(request: pytest.FixtureRequest) -> Iterator[str]:
    if request.param == "rootless":
        request.getfixturevalue("fuse_for_users")
    yield request.param


def diff_set(engine: Engine, name: str) -> set[str]:
    return set(engine.podman("diff", name).check().stdout.splitlines())


def run_changes(engine: Engine, name: str, *opts: str) -> tuple[str, set[str], str]:
    """Run CHANGES in a container named ``name``, then diff it, commit it as ``name`` and
    inspect the committed image. Returns (container output, diff, image inspection)."""
    out = engine.sh(IMAGE, CHANGES, *opts, name=name).check().stdout
    diff = diff_set(engine, name)
    engine.podman("commit", "-q", name, f"localhost/{name}").check()
    seen = engine.sh(f"localhost/{name}", INSPECT).check().stdout
    engine.rm(name).check()
    return out, diff, seen


Entry = tuple[str, bytes, int, int, int]  # name, tar type, uid, gid, mode


def top_layer(engine: Engine, image: str) -> set[Entry]:
    """The entries of ``image``'s top layer, from ``podman save`` (docker-archive)."""
    path = engine.base / "saved.tar"
    path.unlink(missing_ok=True)
    engine.podman("save", "-q", "-o", str(path), image).check()
    with tarfile.open(path) as outer:
        manifest = json.load(outer.extractfile("manifest.json"))  # type: ignore[arg-type]
        layer = outer.extractfile(manifest[0]["Layers"][-1])
        assert layer is not None
        with tarfile.open(fileobj=io.BytesIO(layer.read())) as inner:
            return {
                (m.name.rstrip("/"), m.type, m.uid, m.gid, m.mode & 0o7777)
                for m in inner.getmembers()
            }


def assert_nothing_mounted(*engines: Engine) -> None:
    for engine in engines:
        assert fuse_mounts_under(engine.base) == []


def test_run_copy_up_whiteout_opaque_chown_diff_commit(engines: Engines, mode: str) -> None:
    engine = engines(mode, "unionfs")
    reference = engines(mode, "fuse-overlayfs")
    out, diff, seen = run_changes(engine, "changes")
    assert out == CHANGES_OUT
    assert {"C /etc/motd", "D /etc/group", "A /tmp/f", "C /home/user/.profile"} <= diff
    assert seen == INSPECT_OUT
    # The committed layer: whiteout, opaque marker and owners in the OCI format.
    layer = top_layer(engine, "localhost/changes")
    assert ("etc/.wh.group", tarfile.REGTYPE, 0, 0, 0) in {(*e[:4], 0) for e in layer}
    names = {e[0] for e in layer}
    # The re-created directory hides the lower entries: an opaque marker, or (containers-
    # storage's naive diff, which a mount program gets) a whiteout per lower entry.
    pkg = "usr/share/doc/pkg/"
    assert f"{pkg}.wh..wh..opq" in names or {f"{pkg}.wh.README", f"{pkg}.wh.sub"} <= names, names
    assert ("tmp/f", tarfile.REGTYPE, 1000, 0, 0o644) in layer
    # fuse-overlayfs, given the same steps, lists the same changes and commits the same layer.
    ref_out, ref_diff, ref_seen = run_changes(reference, "changes")
    assert (out, diff, seen) == (ref_out, ref_diff, ref_seen)
    assert layer == top_layer(reference, "localhost/changes")
    assert_nothing_mounted(engine, reference)


@pytest.mark.parametrize("tool", ["buildah", "podman"])
def test_three_step_build_with_a_whiteout(engines: Engines, mode: str, tool: str) -> None:
    engine = engines(mode, "unionfs")
    context = engine.base / f"context-{tool}"
    context.mkdir(exist_ok=True)
    (context / "Containerfile").write_text(CONTAINERFILE)
    if engine.user is not None:
        os.chown(context, engine.user.uid, engine.user.gid)
        os.chown(context / "Containerfile", engine.user.uid, engine.user.gid)
    tag = f"localhost/built-{tool}"
    argv = ["--network", "none", "-f", str(context / "Containerfile"), "-t", tag, str(context)]
    if tool == "buildah":
        engine.buildah("bud", "-q", *argv).check()
    else:
        engine.podman("build", "-q", *argv).check()
    assert engine.sh(tag, BUILT).check().stdout == BUILT_OUT
    # Three RUN steps: three layers above the imported one.
    history = engine.podman("history", "--format", "{{.CreatedBy}}", tag).check().stdout
    assert sum("RUN" in line or "/bin/sh -c" in line for line in history.splitlines()) >= 3
    assert_nothing_mounted(engine)


def test_rootful_uidmap(engines: Engines) -> None:
    engine = engines("rootful", "unionfs")
    opts = ("--uidmap", "0:1:65536", "--gidmap", "0:1:65536")
    out, diff, seen = run_changes(engine, "mapped", *opts)
    ref = run_changes(engines("rootful", "fuse-overlayfs"), "mapped", *opts)
    assert out == CHANGES_OUT  # owners inside the namespace are the image's own
    assert seen == INSPECT_OUT  # and the committed layer stores the container's ids
    assert (out, diff, seen) == ref


def test_rootful_userns_auto(engines: Engines) -> None:
    engine = engines("rootful", "unionfs")
    with containers_subids():
        out, diff, seen = run_changes(engine, "auto", "--userns=auto")
        ref = run_changes(engines("rootful", "fuse-overlayfs"), "auto", "--userns=auto")
    assert out == CHANGES_OUT
    assert seen == INSPECT_OUT
    assert (out, diff, seen) == ref


def _servers_of(uid: int) -> list[int]:
    """Processes of ``uid`` running ``unionfs server start``, and the mount daemons forked
    from it (their command line is the request's, ``unionfs ARGS...``)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if os.stat(f"/proc/{entry}").st_uid != uid:
                continue
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if (b"server" in argv and b"start" in argv) or argv[0] == b"unionfs":
            found.append(int(entry))
    return found


@pytest.mark.usefixtures("fuse_for_users")
def test_rootless_mount_server_in_podmans_namespace(engines: Engines) -> None:
    """``podman unshare unionfs server start`` runs a server in rootless podman's own user
    and mount namespace; the mount program podman starts there hands its mounts to it."""
    engine = engines("rootless", "unionfs")
    assert engine.user is not None
    program = engine.mount_program
    engine.podman("unshare", program, "server", "start").check()
    try:
        status = engine.podman("unshare", program, "server", "status").check().stdout
        assert "listening" in status
        assert len(_servers_of(engine.user.uid)) == 1
        engine.podman("run", "-d", "--name", "served", IMAGE, "sleep", "60").check()
        try:
            # The container's mount is served by a daemon forked from the server.
            assert len(_servers_of(engine.user.uid)) == 2
        finally:
            engine.rm("served").check()
        out, diff, seen = run_changes(engine, "via-server")
        assert out == CHANGES_OUT
        assert seen == INSPECT_OUT
        assert {"C /etc/motd", "D /etc/group", "A /tmp/f"} <= diff
    finally:
        engine.podman("unshare", program, "server", "stop").check()
    assert _servers_of(engine.user.uid) == []
    assert_nothing_mounted(engine)
