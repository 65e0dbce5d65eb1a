"""Forking a container: new mount, UTS, IPC, PID and cgroup namespaces, then pivot_root.

Two processes are forked.  The *shim* (a child of the caller) unshares the namespaces, joins the
network namespace, and forks the container's *init*, which becomes PID 1 of the new PID
namespace and, in order:

1. prepares the rootfs and pivots into it (``containerfs``), detaching the old root so no host
   mount, in particular no namespace bind mount, stays reachable; mounts /proc, /sys and a
   private /dev with Docker's masked and read-only paths;
2. sets the hostname;
3. with ``--userns private``, unshares a user namespace and waits for the caller (in the host's
   namespaces) to write its uid and gid maps, then becomes uid/gid 0 inside it;
4. sets no_new_privs, installs the seccomp filter and drops capabilities (``confinement``);
5. execs the command.

The shim waits for init and exits with its status (128+N for signal N), so the caller waits for
the shim.  Setup errors travel back over a close-on-exec pipe: EOF without data means exec
succeeded.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import stat
import sys
from dataclasses import dataclass, field
from pathlib import Path

from unionfs.errors import UnionfsError
from unionfs.net import confinement, containerfs
from unionfs.net import syscalls as sc

log = logging.getLogger(__name__)

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
EXIT_SETUP_FAILED = 125
EXIT_NOT_FOUND = 127


class StartError(UnionfsError):
    """The container could not be started; ``exit_code`` follows Docker (125, 126 or 127)."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@dataclass
class LaunchSpec:
    """What to run and where."""

    rootfs: Path
    command: list[str]
    env: dict[str, str]
    hostname: str
    netns_path: str | None
    confinement: confinement.Confinement = field(default_factory=confinement.Confinement)


@dataclass
class Launched:
    """The host PIDs of the shim (our child, to wait for) and of the container's init."""

    shim: int
    init: int


def _write_all(fd: int, data: bytes) -> None:
    while data:
        data = data[os.write(fd, data) :]


def _read_all(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, 4096):
        chunks.append(chunk)
    return b"".join(chunks)


def _enter_user_namespace(sync: socket.socket) -> None:
    """Unshare a user namespace, have the caller write its maps, become root inside it."""
    sc.unshare(sc.CLONE_NEWUSER)
    sync.sendall(b"U")
    if sync.recv(1) != b"M":
        raise OSError(0, "the user namespace's id maps were not written")
    os.setresgid(0, 0, 0)
    os.setgroups([])
    os.setresuid(0, 0, 0)


def _init_child(spec: LaunchSpec, err_w: int, sync: socket.socket) -> None:
    """Runs as PID 1 of the new PID namespace; never returns."""
    code = EXIT_SETUP_FAILED
    try:
        for sig in (signal.SIGPIPE, signal.SIGXFSZ, signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_DFL)
        conf = spec.confinement
        host = containerfs.prepare(spec.rootfs)
        os.chdir(spec.rootfs)
        # pivot_root(".", ".") stacks the old root under the new one; detaching "." then
        # removes it, leaving only the rootfs mounted.
        sc.pivot_root(".", ".")
        sc.umount2(".", sc.MNT_DETACH)
        os.chdir("/")
        containerfs.populate(conf, host)
        sc.sethostname(spec.hostname)
        if conf.userns == "private":
            _enter_user_namespace(sync)
        sync.close()
        confinement.apply(conf)
        code = EXIT_NOT_FOUND
        try:
            os.execvpe(spec.command[0], spec.command, spec.env)
        except PermissionError:
            code = 126
            raise
    except OSError as exc:
        what = exc.strerror or str(exc)
        if code != EXIT_SETUP_FAILED:
            what = f"exec {spec.command[0]!r}: {what}"
        with contextlib.suppress(OSError):
            _write_all(err_w, f"{code} {what}".encode())
    except BaseException as exc:  # noqa: BLE001 - we are a forked child and must _exit
        with contextlib.suppress(OSError):
            _write_all(err_w, f"{EXIT_SETUP_FAILED} {exc}".encode())
    os._exit(code)


def _close_fds_except(keep: set[int]) -> None:
    """Close every descriptor above stderr not in ``keep`` (the caller's sockets, pipes, lock)."""
    for entry in os.listdir("/proc/self/fd"):
        fd = int(entry)
        if fd > 2 and fd not in keep:
            with contextlib.suppress(OSError):
                os.close(fd)


def _shim(spec: LaunchSpec, err_w: int, pid_w: int, sync: socket.socket) -> None:
    """The caller's child: enters namespaces, forks init, waits; never returns."""
    try:
        _close_fds_except({err_w, pid_w, sync.fileno()})
        flags = sc.CLONE_NEWNS | sc.CLONE_NEWUTS | sc.CLONE_NEWIPC | sc.CLONE_NEWPID
        sc.unshare(flags | sc.CLONE_NEWCGROUP)
        if spec.netns_path is not None:
            fd = os.open(spec.netns_path, os.O_RDONLY | os.O_CLOEXEC)
            sc.setns(fd, sc.CLONE_NEWNET)
            os.close(fd)
        init = os.fork()
        if init == 0:
            os.close(pid_w)
            _init_child(spec, err_w, sync)
        sync.close()
        os.close(err_w)
        _write_all(pid_w, str(init).encode())
        os.close(pid_w)
        # The caller forwards signals to init; the shim only relays init's exit status.
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT):
            signal.signal(sig, signal.SIG_IGN)
        _, status = os.waitpid(init, 0)
        code = os.waitstatus_to_exitcode(status)
        os._exit(128 - code if code < 0 else code)
    except BaseException as exc:  # noqa: BLE001 - forked child
        with contextlib.suppress(OSError):
            _write_all(err_w, f"{EXIT_SETUP_FAILED} {exc}".encode())
        os._exit(EXIT_SETUP_FAILED)


def launch(spec: LaunchSpec) -> Launched:
    """Start the container; return once its command has been exec'ed.

    Raises :class:`StartError` (after reaping the shim) if setup or exec failed.
    """
    err_r, err_w = os.pipe2(os.O_CLOEXEC)
    pid_r, pid_w = os.pipe2(os.O_CLOEXEC)
    # The caller's end and the container's end of the user-namespace handshake.
    sync_here, sync_there = socket.socketpair()
    sys.stdout.flush()
    sys.stderr.flush()
    shim = os.fork()
    if shim == 0:
        os.close(err_r)
        os.close(pid_r)
        sync_here.close()
        _shim(spec, err_w, pid_w, sync_there)
    os.close(err_w)
    os.close(pid_w)
    sync_there.close()
    try:
        raw_pid = _read_all(pid_r)
        if raw_pid and spec.confinement.userns == "private":
            _write_id_maps(int(raw_pid), spec.confinement, sync_here)
        sync_here.close()
        error = _read_all(err_r).decode(errors="replace")
    finally:
        sync_here.close()
        os.close(pid_r)
        os.close(err_r)
    if error or not raw_pid:
        os.waitpid(shim, 0)
        code_text, _, message = error.partition(" ")
        code = int(code_text) if code_text.isdigit() else EXIT_SETUP_FAILED
        raise StartError(message or "container setup failed", code)
    init = int(raw_pid)
    log.debug("container init pid %d (shim %d)", init, shim)
    return Launched(shim=shim, init=init)


def _write_id_maps(init: int, conf: confinement.Confinement, sync: socket.socket) -> None:
    """Answer init's handshake: write its uid and gid maps once it has unshared.

    If init fails before asking, the socket reads EOF and nothing is written; if writing
    fails, closing the socket unblocks init, which then reports the failure.
    """
    if sync.recv(1) != b"U":
        return
    mapping = conf.id_mapping
    assert mapping is not None
    try:
        for name, text in (("uid_map", mapping.uid_map()), ("gid_map", mapping.gid_map())):
            fd = os.open(f"/proc/{init}/{name}", os.O_WRONLY | os.O_CLOEXEC)
            try:
                os.write(fd, text.encode())
            finally:
                os.close(fd)
    except OSError as exc:
        log.warning("cannot map ids of container init %d: %s", init, exc)
        return
    sync.sendall(b"M")


def check_rootfs(rootfs: Path) -> Path:
    """Resolve ``rootfs``; raise :class:`UnionfsError` unless it is a directory."""
    try:
        st = os.stat(rootfs)
    except OSError as exc:
        raise UnionfsError(f"rootfs {rootfs}: {exc.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise UnionfsError(f"rootfs {rootfs} is not a directory")
    return rootfs.resolve()
