"""The daemon's lifecycle: init, signals, daemonize once the mount is ready, serve, unmount.

Apart from :mod:`unionfs.fuse_ops`, this is the one module that imports pyfuse3.

``serve`` is the whole life of a daemon. In the background form the parent forks, the child
mounts, and the parent exits 0 only after the child reported the mount ready through a pipe --
or prints the child's one-line error and exits 1. SIGINT and SIGTERM end the request loop and
unmount cleanly; a daemon killed outright leaves a dead mount that ``unionfs umount`` clears.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import resource
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pyfuse3
import trio

from unionfs import fdops
from unionfs.config import MountConfig
from unionfs.errors import UnionfsError
from unionfs.paths import default_state_dir, private_dir

log = logging.getLogger(__name__)


STATE_DIR = Path(default_state_dir())
# Descriptors of the process that forks the daemon which the daemon must not keep: the mount
# server's child answers its caller on a connection the daemon would otherwise inherit.
NOT_FOR_DAEMON: list[int] = []


def state_file(mountpoint: str) -> Path:
    """Where the daemon serving ``mountpoint`` records its pid and layers."""
    key = mountpoint.strip("/").replace("/", "_") or "_root"
    return STATE_DIR / f"{key}.json"


def read_state(mountpoint: str) -> dict[str, Any] | None:
    try:
        return dict(json.loads(state_file(os.path.realpath(mountpoint)).read_text()))
    except (OSError, ValueError):
        return None


NR_OPEN_PATH = "/proc/sys/fs/nr_open"


def raise_nofile_limit() -> int:
    """Raise ``RLIMIT_NOFILE`` as far as allowed; return the soft limit now in force.

    Every open file through the mount holds a descriptor in the daemon, so the default limit
    (often 1,024 or 20,000) would let one user's open files give every user EMFILE. The soft
    limit goes to the hard limit; root also raises the hard limit to the kernel's maximum
    (``fs.nr_open``), as fuse-overlayfs raises its soft limit.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if os.geteuid() == 0 and hard != resource.RLIM_INFINITY:
        try:
            with open(NR_OPEN_PATH) as f:
                nr_open = int(f.read())
            if hard < nr_open:
                resource.setrlimit(resource.RLIMIT_NOFILE, (nr_open, nr_open))
                return nr_open
        except (OSError, ValueError) as exc:
            # Root without CAP_SYS_RESOURCE (a container, a confined VM) keeps its hard limit.
            log.debug("cannot raise the hard descriptor limit: %s", exc)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return int(hard)


def fuse_options(cfg: MountConfig) -> set[str]:
    """The options handed to libfuse's mount.

    As root, the defaults are fuse-overlayfs's: ``allow_other`` (unless ``noallow_other``),
    ``suid``, and no ``dev``; ``exec`` is the kernel's default. libfuse starts from
    ``nosuid,nodev`` and clears each only when ``suid``/``dev`` is given, so exactly one
    word per flag is passed (pyfuse3 takes a set: the order of the words is lost).
    Without root, fusermount3 always mounts ``nosuid,nodev``; ``noexec`` still applies.
    """
    opts = set(pyfuse3.default_options)
    opts |= {"fsname=unionfs", "subtype=unionfs", "default_permissions"}
    if os.geteuid() == 0:
        if cfg.allow_other:
            opts.add("allow_other")
        opts.add("suid" if cfg.suid else "nosuid")
        opts.add("dev" if cfg.dev else "nodev")
    if not cfg.exec:
        opts.add("noexec")
    if not cfg.writable:
        opts.add("ro")
    if cfg.auto_unmount:
        opts.add("auto_unmount")
    if cfg.debug:
        opts.add("debug")
    return opts


def _fit_fd_cache(fs: Any) -> None:
    """Keep the cache of directory descriptors to a quarter of the descriptor limit.

    The rest is for the layer roots and for the files users open through the mount. The
    cache must still hold two directories' descriptors in every layer; a limit too low for
    that is refused with one line rather than failing later with EMFILE.
    """
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft == resource.RLIM_INFINITY:
        return
    need = 2 * len(fs.stack) + 64
    if soft < 2 * (need + len(fs.stack)):
        raise UnionfsError(
            f"the descriptor limit ({soft}) is too low for {len(fs.stack)} layers:"
            f" raise RLIMIT_NOFILE (ulimit -n) to at least {2 * (need + len(fs.stack))}"
        )
    fs.table.max_dir_fds = max(need, min(fs.table.max_dir_fds, soft // 4))


async def _serve_loop(ops: Any, cfg: MountConfig) -> None:
    async with trio.open_nursery() as nursery:

        async def after_init() -> None:
            await ops.initialized.wait()
            _set_readahead(cfg)

        async def watch_signals() -> None:
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as sigs:
                async for signum in sigs:
                    log.info("signal %d: unmounting", signum)
                    pyfuse3.terminate()
                    return

        nursery.start_soon(watch_signals)
        nursery.start_soon(after_init)
        await pyfuse3.main()
        nursery.cancel_scope.cancel()


def serve(cfg: MountConfig, ready_fd: int = -1, warnings: Sequence[str] = ()) -> int:
    """Mount ``cfg`` and serve requests until unmounted or signalled. Returns an exit code.

    The whole life is one exit stack: what was set up is undone in reverse order however
    the daemon ends (unmount, then the filesystem's descriptors, then the state record),
    and a failure before the mount is ready is reported as one line (through ``ready_fd``
    when the daemon runs in the background). ``warnings`` are the option warnings the
    command printed already; they go to the daemon's log with the filesystem's own.
    """
    from unionfs.fs.union import Union
    from unionfs.fuse_ops import Operations

    raise_nofile_limit()
    record = state_file(cfg.mountpoint)
    with contextlib.ExitStack() as life:
        life.callback(_remove_quietly, record)
        try:
            fs = Union(cfg)
            life.callback(fs.close)
            _fit_fd_cache(fs)
            ops = Operations(
                fs, cfg.timeout, debug=cfg.debug, idmap=cfg.idmap, static_nlink=cfg.static_nlink
            )
            # default_permissions is always on: let the kernel enforce POSIX ACLs too (it
            # reads system.posix_acl_access through getxattr), unless the mount says noacl.
            ops.enable_acl = cfg.acl
            pyfuse3.init(ops, cfg.mountpoint, fuse_options(cfg))
            pyfuse3.set_idle_spin(cfg.busy_poll_us)
        except UnionfsError as exc:
            _report(ready_fd, f"error: {exc}")
            return 1
        except Exception as exc:  # noqa: BLE001 - turned into the one-line error of the command
            log.debug("mount failed", exc_info=True)
            _report(ready_fd, f"error: cannot mount {cfg.mountpoint}: {exc}")
            return 1
        life.callback(pyfuse3.close, unmount=True)
        _write_state(record, cfg)
        for w in (*warnings, *fs.warnings):
            log.warning("%s", w)
        _report(ready_fd, "ok")
        # The kernel has already applied the caller's umask to every mode it sends (FUSE
        # without FUSE_CAP_DONT_MASK); the daemon's own umask must not mask it a second
        # time. Set after the state file is written, which must not become world-writable.
        os.umask(0)
        trio.run(_serve_loop, ops, cfg)
    return 0


def _write_state(record: Path, cfg: MountConfig) -> None:
    """Record the daemon's pid and layers for ``unionfs umount`` (a warning if it cannot)."""
    try:
        if not private_dir(record.parent):
            raise OSError(f"{record.parent} is not a private directory of this user")
        record.write_text(
            json.dumps(
                {
                    "pid": os.getpid(),
                    "mountpoint": cfg.mountpoint,
                    "lowers": cfg.lowers,
                    "upper": cfg.upper,
                    "workdir": cfg.workdir,
                }
            )
        )
    except OSError:
        log.warning("cannot write %s", record)


def _remove_quietly(path: Path) -> None:
    try:
        path.unlink()
    except OSError:
        pass


def _mount_device(mountpoint: str) -> str | None:
    """``major:minor`` of the newest unionfs mount on ``mountpoint``, from mountinfo.

    Read from /proc rather than by stat(2): stat of the mountpoint would be a request to
    this daemon, which is not serving yet.
    """
    want = os.fsencode(mountpoint)
    found = None
    for _, device, where, fstype in fdops.mounts():
        if where == want and fstype == "fuse.unionfs":
            found = device
    return found


def _set_readahead(cfg: MountConfig) -> None:
    """Widen the mount's readahead window, so a sequential read takes fewer requests."""
    if not cfg.readahead_kb:
        return
    if os.geteuid() != 0:
        return  # the bdi's sysfs file is root's: a user's mount keeps the kernel's window
    try:
        dev = _mount_device(cfg.mountpoint)
        if dev is None:
            raise OSError("mount not found in /proc/self/mountinfo")
        with open(f"/sys/class/bdi/{dev}/read_ahead_kb", "w") as f:
            f.write(f"{cfg.readahead_kb}\n")
    except (OSError, ValueError) as exc:
        log.warning("cannot set readahead=%d: %s", cfg.readahead_kb, exc)


def _report(fd: int, message: str) -> None:
    if fd >= 0:
        os.write(fd, message.encode() + b"\n")
        os.close(fd)
    elif message != "ok":
        print(f"unionfs: {message.removeprefix('error: ')}", file=sys.stderr)


def daemonize_and_serve(
    cfg: MountConfig, log_file: str | None, warnings: Sequence[str] = ()
) -> int:
    """Fork; the child mounts and serves; the parent returns once the mount is ready."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_fd)
        for fd in NOT_FOR_DAEMON:
            os.close(fd)
        os.setsid()
        os.chdir("/")
        devnull = os.open(os.devnull, os.O_RDWR)
        os.dup2(devnull, 0)
        out = devnull
        if log_file:
            try:
                out = os.open(
                    log_file,
                    os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC,
                    0o600,
                )
            except OSError:
                # An unopenable log never stops a mount: the daemon then logs nowhere.
                log_file = None
        os.dup2(out, 1)
        os.dup2(out, 2)
        code = 1
        try:
            code = serve(cfg, write_fd, warnings)
        finally:
            _drop_empty_log(log_file)
            os._exit(code)
    os.close(write_fd)
    chunks = []
    while True:
        data = os.read(read_fd, 4096)
        if not data:
            break
        chunks.append(data)
    os.close(read_fd)
    message = b"".join(chunks).decode(errors="replace").strip()
    if message == "ok":
        return 0
    os.waitpid(pid, 0)
    if not message:
        message = "error: the daemon exited before the mount was ready"
    raise UnionfsError(message.removeprefix("error: "))


def _drop_empty_log(log_file: str | None) -> None:
    """Remove the daemon's log when it has nothing to say, so /run does not fill up."""
    if log_file:
        try:
            if os.path.getsize(log_file) == 0:
                os.unlink(log_file)
        except OSError:
            pass
