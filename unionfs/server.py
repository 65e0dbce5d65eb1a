"""The mount server: one resident process per user, with everything a mount needs already
imported, that forks for each ``unionfs`` mount command it is sent.

Starting Python and importing pyfuse3, trio and the filesystem takes a few hundred
milliseconds on a loaded machine; container tools mount twice per build step. With a server
running, the ``unionfs`` command (:mod:`unionfs.launch`) starts nothing heavy: it passes its
argv, environment, umask, working directory and standard streams over a Unix socket and
waits for the exit status. The server forks; the child runs the ordinary command line
(:func:`unionfs.cli.main`) in the caller's place, so every check, message and exit code is
the same as without a server, and the mount's daemon is still one process per mount, forked
from that child and detached from the server (a crash takes down one mount, never the server
or another mount).

Only the server's own user is served, and only a caller in the server's own user and mount
namespaces (a mount made elsewhere would land in the wrong namespace); any other caller is
told to run the command itself. The socket lives in the user's private state directory
(:func:`unionfs.paths.server_socket`) with mode 0600.
"""

from __future__ import annotations

import array
import os
import select
import signal
import socket
import struct
import sys
import time
from pathlib import Path

from unionfs.errors import UnionfsError
from unionfs.launch import REQUEST_FDS, decode_request, encode_request
from unionfs.paths import alive, private_dir, server_socket

# A request: one SOCK_SEQPACKET message (:func:`unionfs.launch.encode_request`), with the
# caller's working directory, stdin, stdout and stderr as SCM_RIGHTS descriptors, in order.
MAX_REQUEST = 1 << 20
# How long ``unionfs server stop`` waits for the server to finish the requests in progress.
STOP_WAIT = 60.0
# Modules a mount needs, imported once by the server instead of by every mount.
PRELOAD = (
    "pyfuse3",
    "trio",
    "unionfs.cli",
    "unionfs.cli.mount",
    "unionfs.config",
    "unionfs.daemon",
    "unionfs.fuse_ops",
    "unionfs.fs.union",
)


def reply(conn: socket.socket, kind: str, value: object) -> None:
    """Send ``KIND VALUE``: ``exit CODE``, ``local WHY`` (run the command yourself),
    ``error WHY``, ``stopping PID``."""
    try:
        conn.send(f"{kind} {value}".encode())
    except OSError:
        pass  # the caller went away: nothing to tell


def _same_namespaces(pid: int) -> bool:
    """Whether process ``pid`` shares this process's user and mount namespaces."""
    try:
        return all(
            os.readlink(f"/proc/{pid}/ns/{ns}") == os.readlink(f"/proc/self/ns/{ns}")
            for ns in ("user", "mnt")
        )
    except OSError:
        return False


def _receive(conn: socket.socket) -> tuple[list[str], dict[str, str], int, list[int]]:
    """The arguments, environment, umask and descriptors of one request."""
    fds = array.array("i")
    data, ancdata, flags, _ = conn.recvmsg(MAX_REQUEST, socket.CMSG_LEN(REQUEST_FDS * fds.itemsize))
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
    received = list(fds)
    try:
        if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC) or len(received) != REQUEST_FDS:
            raise ValueError("malformed request")
        args, env, umask = decode_request(data)
    except ValueError:
        for fd in received:
            os.close(fd)
        raise
    return args, env, umask, received


class Server:
    """The accept loop: forks a child per request and reports each child's exit status."""

    def __init__(self, path: Path, idle_exit: float | None = None) -> None:
        self.path = path
        self.idle_exit = idle_exit
        self.children: dict[int, socket.socket] = {}
        self.stopping = False
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        self.wake_r, self.wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    def bind(self) -> None:
        if not private_dir(self.path.parent):
            raise UnionfsError(f"{self.path.parent} is not a private directory of this user")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        try:
            probe.connect(os.fspath(self.path))
        except (FileNotFoundError, ConnectionRefusedError):
            pass  # no server answers there: a stale socket is replaced
        else:
            raise UnionfsError(f"a unionfs server already listens on {self.path}")
        finally:
            probe.close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        old = os.umask(0o177)
        try:
            self.listener.bind(os.fspath(self.path))
        finally:
            os.umask(old)
        self.listener.listen(64)

    def run(self) -> None:
        for module in PRELOAD:
            __import__(module)
        signal.set_wakeup_fd(self.wake_w)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, self._stop)
        last = time.monotonic()
        try:
            while not self.stopping or self.children:
                timeout = None
                if self.idle_exit is not None and not self.children:
                    timeout = max(0.0, last + self.idle_exit - time.monotonic())
                watch = [self.wake_r] + ([] if self.stopping else [self.listener])
                ready, _, _ = select.select(watch, [], [], timeout)
                if not ready and timeout is not None:
                    break  # idle for idle_exit seconds
                if self.wake_r in ready:
                    while True:
                        try:
                            if not os.read(self.wake_r, 512):
                                break
                        except BlockingIOError:
                            break
                    self._reap()
                if self.listener in ready and not self.stopping:
                    self._accept()
                    last = time.monotonic()
        finally:
            self.listener.close()
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass

    def _stop(self, *_: object) -> None:
        self.stopping = True

    def _accept(self) -> None:
        try:
            conn, _ = self.listener.accept()
        except OSError:
            return
        conn.set_inheritable(False)
        creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        pid, uid, _gid = struct.unpack("3i", creds)
        if uid != os.geteuid():
            conn.close()  # another user: not even an answer
            return
        try:
            args, env, umask, fds = _receive(conn)
        except (OSError, ValueError) as exc:
            reply(conn, "error", f"bad request: {exc}")
            conn.close()
            return
        if args == ["server", "stop"]:
            self.stopping = True
            for fd in fds:
                os.close(fd)
            reply(conn, "stopping", os.getpid())
            conn.close()
            return
        if not _same_namespaces(pid):
            for fd in fds:
                os.close(fd)
            reply(conn, "local", "the caller is in another user or mount namespace")
            conn.close()
            return
        sys.stdout.flush()
        sys.stderr.flush()
        child = os.fork()
        if child == 0:
            code = 1
            try:
                self.listener.close()
                code = _run_request(args, env, umask, fds, (self.wake_r, self.wake_w), conn)
            finally:
                # The caller has its answer from _run_request; the server's own, sent when
                # it reaps this process (a few ms later: exiting a process this size takes
                # that long), only counts if the command died without answering.
                os._exit(code)
        for fd in fds:
            os.close(fd)
        self.children[child] = conn

    def _reap(self) -> None:
        while self.children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            conn = self.children.pop(pid, None)
            if conn is not None:
                reply(conn, "exit", os.waitstatus_to_exitcode(status))
                conn.close()


def _show_command_line(args: list[str]) -> None:
    """Show ``unionfs ARGS...`` as this process's command line (``ps``, ``pgrep -f``).

    A forked child would otherwise keep the server's (``... unionfs server start``), so
    every mount daemon would look like the server, and ``pkill -f 'unionfs server'`` would
    end them all. The new line is written over the original one in this process's memory
    (the kernel reads ``/proc/PID/cmdline`` from there; Python keeps its own copy of its
    arguments), shortened in the middle when it does not fit: the mountpoint comes last.
    """
    import ctypes

    try:
        with open("/proc/self/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        start, end = int(fields[45]), int(fields[46])  # arg_start, arg_end (fields 48, 49)
    except (OSError, IndexError, ValueError):
        return
    room = end - start - 1  # the last byte stays NUL
    if room < 16:
        return
    line = b"\0".join([b"unionfs", *(os.fsencode(a) for a in args)])
    if len(line) > room:
        head = room // 3
        line = line[:head] + b"..." + line[len(line) - (room - head - 3) :]
    ctypes.memmove(start, line.ljust(room + 1, b"\0"), room + 1)


def _run_request(
    args: list[str],
    env: dict[str, str],
    umask: int,
    fds: list[int],
    own: tuple[int, int],
    conn: socket.socket,
) -> int:
    """In the forked child: become the caller (streams, directory, umask, environment), run
    its command line as the ``unionfs`` command would, and answer on ``conn`` with the exit
    code. ``own``: the server's own descriptors, closed here. The mount's daemon, forked
    on the way, does not keep ``conn``."""
    _show_command_line(args)
    signal.set_wakeup_fd(-1)
    for fd in own:
        os.close(fd)
    for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)
    cwd, *streams = fds
    for target, fd in enumerate(streams):
        os.dup2(fd, target)
        os.close(fd)
    os.fchdir(cwd)
    os.close(cwd)
    os.umask(umask)
    os.environ.clear()
    os.environ.update(env)
    sys.argv = ["unionfs", *args]
    from unionfs import cli, daemon

    daemon.STATE_DIR = Path(daemon.default_state_dir())  # from the caller's environment
    daemon.NOT_FOR_DAEMON.append(conn.fileno())
    code = 1
    try:
        code = cli.main(args)
    except SystemExit as exc:  # what the command's own process would exit with
        if isinstance(exc.code, str):
            print(exc.code, file=sys.stderr)
        code = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        reply(conn, "exit", code)
    return code


def stop(path: Path) -> bool:
    """Ask the server listening on ``path`` to stop; False when none answers. It stops
    accepting at once and exits when the requests in progress are answered."""
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    try:
        conn.connect(os.fspath(path))
        devnull = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
        try:
            conn.sendmsg(
                [encode_request(["server", "stop"], {}, 0o022)],
                [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [devnull] * 4))],
            )
        finally:
            os.close(devnull)
        kind, _, value = conn.recv(4096).partition(b" ")
    except OSError:
        return False
    finally:
        conn.close()
    if kind != b"stopping" or not value.isdigit():
        return False
    deadline = time.monotonic() + STOP_WAIT
    while time.monotonic() < deadline and alive(int(value)):
        time.sleep(0.02)
    return True


def main(args: list[str]) -> int:
    """``unionfs server [start] [-f] [--idle-exit S]``, ``unionfs server stop|status``."""
    from unionfs.cli.args import ArgumentParser

    parser = ArgumentParser(prog="unionfs server")
    parser.add_argument("action", nargs="?", default="start", choices=("start", "stop", "status"))
    parser.add_argument("-f", "--foreground", action="store_true", help="do not detach")
    parser.add_argument(
        "--idle-exit", type=float, default=None, metavar="S", help="exit after S idle seconds"
    )
    ns = parser.parse_args(args[1:])
    path = Path(server_socket())
    if ns.action == "stop":
        if not stop(path):
            raise UnionfsError(f"no unionfs server answers on {path}")
        return 0
    if ns.action == "status":
        from unionfs import launch

        listening = launch.connect(os.fspath(path)) is not None
        print(f"{path}: {'listening' if listening else 'no server'}")
        return 0 if listening else 1
    server = Server(path, ns.idle_exit)
    server.bind()
    if not ns.foreground:
        # Detach: the command returns once the socket listens (it already does).
        if os.fork() != 0:
            os._exit(0)
        os.setsid()
        os.chdir("/")
        devnull = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(devnull, fd)
        os.close(devnull)
    server.run()
    return 0
