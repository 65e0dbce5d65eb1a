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

from unionfs import config
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
    cmd = ["fusermount3", "-u"] + (["-z"] if ns.lazy else []) + [mnt]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        msg = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed"
        raise UnionfsError(f"cannot unmount {mnt}: {msg.removeprefix('fusermount3: ')}")
    if state is not None:
        _wait_exit(int(state["pid"]), mnt)
    return 0


def _wait_exit(pid: int, mountpoint: str, timeout: float = 30.0) -> None:
    """Wait until the daemon serving ``mountpoint`` has written everything and exited."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if b"unionfs" not in f.read():
                    return  # the pid now belongs to another program: ours is gone
        except FileNotFoundError:
            return
        if not alive(pid):
            return
        time.sleep(0.02)


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
