"""Command line entry point: parses arguments, dispatches, maps errors to exit codes.

Subcommand families live in their own modules, each exposing ``main(argv) -> int`` where
``argv`` starts with the subcommand name:

* mount, umount, install-helper, the fuse-overlayfs form ``-o lowerdir=..`` -> cli.mount
* inspect, layers, stats                                  -> unionfs.cli.inspect
* diff, export, import                                    -> unionfs.cli.layertools
* run, ps, rm, port, network, net                         -> unionfs.net.cli

Every family reads its arguments with :mod:`unionfs.cli.args`.
"""

from __future__ import annotations

import os
import sys

from unionfs.errors import UnionfsError

_FAMILIES = {
    "unionfs.cli.mount": ("mount", "umount", "install-helper"),
    "unionfs.cli.inspect": ("inspect", "layers", "stats"),
    "unionfs.cli.layertools": ("diff", "export", "import"),
    "unionfs.net.cli": ("run", "ps", "rm", "port", "network", "net"),
    "unionfs.server": ("server",),
}

USAGE = """\
usage: unionfs mount [--lower DIR]... [--upper DIR --workdir DIR] [-o OPT] [-f] [-d] MNT
       unionfs -o lowerdir=L1:L2,upperdir=U,workdir=W [-f] [-d] MNT   (fuse-overlayfs form)
       unionfs umount [-z] MNT
       unionfs inspect [--json] PATH... | layers MNT | stats [--follow] MNT
       unionfs diff --upper U [--lower L]... | export --upper U [-o OUT] | import LAYER DIR
       unionfs run [OPTIONS] ROOTFS -- CMD... | ps | rm NAME | port NAME | network ls|inspect
       unionfs net gc
       unionfs install-helper        (installs /sbin/mount.fuse.unionfs)
       unionfs server [start|stop|status] [-f] [--idle-exit S]   (the resident mount server)
"""


def _module_for(command: str) -> str | None:
    for module, commands in _FAMILIES.items():
        if command in commands:
            return module
    return None


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        sys.stdout.write(USAGE)
        return 0 if args else 2
    if args[0] == "--version":
        from unionfs import __version__

        print(f"unionfs {__version__}")
        return 0
    module_name = _module_for(args[0])
    if module_name is None:
        # Anything else is the fuse-overlayfs / mount-helper form: options and a mountpoint.
        module_name = "unionfs.cli.mount"
        args = ["mount", "--compat", *args]
    # importlib here, not at the top: the launcher imports this module for _module_for on
    # its way to the mount server, where every millisecond of the command counts.
    import importlib

    try:
        module = importlib.import_module(module_name)
        return int(module.main(args))
    except UnionfsError as exc:
        print(f"unionfs: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader of our output went away (e.g. `unionfs network inspect | head`).
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
