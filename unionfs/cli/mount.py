"""``unionfs mount``, the fuse-overlayfs argv form, ``unionfs umount``, ``install-helper``.

The fuse-overlayfs form is what ``mount -t fuse.unionfs`` runs through ``mount.fuse3``::

    unionfs [SOURCE] MNT -o lowerdir=L1:L2,upperdir=U,workdir=W [-f] [-d]

Options may come before or after the mountpoint and ``-o`` may repeat; the mountpoint is the
last argument that is not an option (a SOURCE before it, like ``unionfs`` or ``overlay``, is
ignored as fuse-overlayfs does).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import subprocess
import sys
import time

from unionfs import config, fdops
from unionfs.cli.args import ArgumentParser, split_options
from unionfs.errors import UnionfsError, UsageError
from unionfs.paths import alive

HELPER_PATH = "/sbin/mount.fuse.unionfs"


def _parse_compat(args: list[str]) -> tuple[config.MountConfig, list[str]]:
    options: list[str] = []
    positional: list[str] = []
    foreground = debug = False
    it = iter(args)
    for arg in it:
        if arg == "-o":
            value = next(it, None)
            if value is None:
                raise UsageError("-o needs an argument")
            options += split_options(value)
        elif arg.startswith("-o"):
            options += split_options(arg[2:])
        elif arg == "-f":
            foreground = True
        elif arg in ("-d", "--debug"):
            debug = foreground = True
        elif arg in ("-s",):
            continue
        elif arg.startswith("-"):
            raise UsageError(f"unknown flag {arg}")
        else:
            positional.append(arg)
    if not positional:
        raise UsageError("no mountpoint given")
    cfg, warnings = config.apply_options(
        config.MountConfig(lowers=[], mountpoint=positional[-1]), options
    )
    debug = debug or cfg.debug
    cfg = dataclasses.replace(cfg, foreground=foreground or cfg.foreground or debug, debug=debug)
    return cfg, warnings


def _parse_mount(args: list[str]) -> tuple[config.MountConfig, list[str], str | None]:
    parser = ArgumentParser(prog="unionfs mount", add_help=True)
    parser.add_argument("--lower", action="append", default=[], help="lower layer, top first")
    parser.add_argument("--upper", help="writable upper layer")
    parser.add_argument("--workdir", help="work directory on the upper's filesystem")
    parser.add_argument("-o", dest="options", action="append", default=[], help="mount options")
    parser.add_argument("-f", "--foreground", action="store_true")
    parser.add_argument("-d", "--debug", action="store_true", help="log every request")
    parser.add_argument("--log-file", help="where a background daemon writes its log")
    parser.add_argument("mountpoint")
    ns = parser.parse_args(args)
    cfg = config.MountConfig(
        lowers=list(ns.lower), mountpoint=ns.mountpoint, upper=ns.upper, workdir=ns.workdir
    )
    warnings: list[str] = []
    for value in ns.options:
        cfg, more = config.apply_options(cfg, split_options(value))
        warnings += more
    if ns.lower and any(o.startswith("lowerdir=") for v in ns.options for o in v.split(",")):
        raise UsageError("give the lowers either with --lower or with -o lowerdir=, not both")
    cfg = dataclasses.replace(
        cfg,
        lowers=list(ns.lower) if ns.lower else cfg.lowers,
        foreground=ns.foreground or ns.debug,
        debug=ns.debug or cfg.debug,
    )
    return cfg, warnings, ns.log_file


def _setup_logging(cfg: config.MountConfig) -> None:
    level = logging.DEBUG if cfg.debug else logging.INFO
    logging.basicConfig(
        level=level, format="%(asctime)s %(name)s %(levelname)s %(message)s", stream=sys.stderr
    )


def mount(args: list[str]) -> int:
    if args and args[0] == "--compat":
        (cfg, warnings), log_file = _parse_compat(args[1:]), None
    else:
        cfg, warnings, log_file = _parse_mount(args)
    from unionfs import daemon as lifecycle

    # Validation opens every layer root and keeps it open: 2,000 layers need the raised limit.
    lifecycle.raise_nofile_limit()
    cfg = config.validate(cfg)
    config.warn(warnings)

    if cfg.foreground:
        _setup_logging(cfg)
        return lifecycle.serve(cfg, warnings=warnings)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    if log_file is None:
        # A background daemon's warnings and tracebacks go beside its state record.
        record = lifecycle.state_file(cfg.mountpoint)
        log_file = str(record.with_suffix(".log")) if lifecycle.private_dir(record.parent) else None
    return lifecycle.daemonize_and_serve(cfg, log_file, warnings)


def umount(args: list[str]) -> int:
    parser = ArgumentParser(prog="unionfs umount")
    parser.add_argument("-z", "--lazy", action="store_true", help="detach now, clean up later")
    parser.add_argument("mountpoint")
    ns = parser.parse_args(args)
    from unionfs import daemon as lifecycle

    mnt = os.path.realpath(ns.mountpoint)
    state = lifecycle.read_state(mnt)
    device = _fuse_device(mnt)
    cmd = ["fusermount3", "-u"] + (["-z"] if ns.lazy else []) + [mnt]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        msg = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed"
        raise UnionfsError(f"cannot unmount {mnt}: {msg.removeprefix('fusermount3: ')}")
    if state is not None:
        _wait_exit(int(state["pid"]), mnt, device, ns.lazy)
    return 0


def _wait_exit(
    pid: int, mountpoint: str, device: str | None, lazy: bool, timeout: float = 30.0
) -> None:
    """Wait until the daemon serving ``mountpoint`` has written everything and exited.

    A FUSE daemon serves until its mount is gone from every mount namespace: a namespace
    made (``unshare -m``, a container runtime) while the mount existed holds a copy of it,
    and unmounting here does not end the daemon. Such a holder is looked for at once (a scan
    of /proc takes well under a millisecond) and then twice a second; once one is found the
    wait ends with one line naming it rather than running out silently.
    """
    start = next_look = time.monotonic()
    while time.monotonic() < start + timeout:
        if _daemon_gone(pid):
            return
        if device is not None and time.monotonic() >= next_look:
            holders = _holders(device)
            if holders:
                print(f"unionfs: {_held_message(mountpoint, pid, holders)}", file=sys.stderr)
                return
            next_look = time.monotonic() + 0.5
        time.sleep(0.02)
    why = ": files opened through it before the lazy unmount keep it serving" if lazy else ""
    print(
        f"unionfs: {mountpoint} is unmounted, but its daemon (pid {pid}) still runs after"
        f" {timeout:.0f} s{why}",
        file=sys.stderr,
    )


def _daemon_gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            if b"unionfs" not in f.read():
                return True  # the pid now belongs to another program: ours is gone
    except FileNotFoundError:
        return True
    return not alive(pid)


def _fuse_device(mountpoint: str) -> str | None:
    """``major:minor`` of the FUSE mount on top of ``mountpoint`` here, or None."""
    want = os.fsencode(mountpoint)
    found = None
    try:
        for _, device, where, fstype in fdops.mounts():
            if where == want:
                found = device if fstype.startswith("fuse") else None
    except (OSError, ValueError):
        return None
    return found


def _holders(device: str) -> list[tuple[int, str, bool]]:
    """Where the mount ``device`` (``major:minor``) is still attached: (pid, mount point,
    whether it is in this process's namespace) for each copy of it, named by the lowest pid
    that sees it. Every process's mountinfo can be read; a namespace already read (known
    when the process is this user's, or root) is not read again."""
    try:
        here = {m[0] for m in fdops.mounts() if m[1] == device}
    except (OSError, ValueError):
        here = set()
    namespaces: set[int] = set()
    copies: set[str] = set()
    found = []
    for name in sorted((n for n in os.listdir("/proc") if n.isdigit()), key=int):
        try:
            ns = os.stat(f"/proc/{name}/ns/mnt").st_ino
        except OSError:
            ns = None  # another user's process: its mounts can still be read
        if ns in namespaces:
            continue
        try:
            mounts = fdops.mounts(f"/proc/{name}/mountinfo")
        except (OSError, ValueError):
            continue  # gone meanwhile
        if ns is not None:
            namespaces.add(ns)
        for mount_id, dev, where, _ in mounts:
            if dev == device and mount_id not in copies:
                copies.add(mount_id)
                found.append((int(name), os.fsdecode(where), mount_id in here))
                break
    return found


def _held_message(mountpoint: str, pid: int, holders: list[tuple[int, str, bool]]) -> str:
    """One line: the mount is gone here, the daemon serves on, and what still holds it."""
    here = [where for _, where, own in holders if own]
    others = [holder for holder, _, own in holders if not own]
    held = []
    if here:
        held.append(f"at {here[0]}")
    if others:
        named = ", ".join(f"{p}{_comm(p)}" for p in others[:3])
        more = f" and {len(others) - 3} more" if len(others) > 3 else ""
        s = "s" if len(others) > 1 else ""
        held.append(f"in the mount namespace{s} of pid{s} {named}{more}")
    return (
        f"{mountpoint} is unmounted here, but its daemon (pid {pid}) keeps serving it: the"
        f" mount is still attached {' and '.join(held)}; the daemon exits once that is gone"
    )


def _comm(pid: int) -> str:
    """`` (name)`` of process ``pid``, or nothing if it cannot be read."""
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f" ({f.read().strip()})"
    except OSError:
        return ""


def install_helper(args: list[str]) -> int:
    """Install ``/sbin/mount.fuse.unionfs`` so ``mount -t fuse.unionfs`` runs this unionfs."""
    exe = shutil.which("unionfs", path=os.path.dirname(sys.executable)) or sys.argv[0]
    exe = os.path.realpath(exe) if os.path.exists(exe) else exe
    target = args[0] if args else HELPER_PATH
    script = (
        "#!/bin/sh\n"
        "# mount -t fuse.unionfs SOURCE MNT -o OPTS: run this checkout's unionfs.\n"
        f'exec "{exe}" "$@"\n'
    )
    tmp = target + ".tmp"
    with open(tmp, "w") as f:
        f.write(script)
    os.chmod(tmp, 0o755)
    os.replace(tmp, target)
    print(target)
    return 0


def main(argv: list[str]) -> int:
    command, args = argv[0], argv[1:]
    if command == "mount":
        return mount(args)
    if command == "umount":
        return umount(args)
    if command == "install-helper":
        return install_helper(args)
    raise UsageError(f"unknown command {command}")
