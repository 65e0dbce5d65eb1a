"""The ``unionfs`` command's entry point: hands a mount to the user's mount server when one
is running (:mod:`unionfs.server`), else runs the command itself (:func:`unionfs.cli.main`).

Only the C socket module is imported on the way to the server: the
caller pays for starting Python and nothing more. A mount in the foreground or with debug
output stays in the caller's process, as does every other command. ``UNIONFS_SERVER=off``
never asks a server. A server is trusted only if its socket is in a directory of this user's
that nobody else can write, and its process runs as this user.
"""

from __future__ import annotations

import _socket
import os
import stat
import sys

REQUEST_MAGIC = b"unionfs1"
REQUEST_FDS = 4  # the working directory, stdin, stdout, stderr
# Arguments after which the command must run in the caller's process.
_LOCAL_FLAGS = {"-f", "--foreground", "-d", "--debug", "-h", "--help"}


def _for_server(args: list[str]) -> bool:
    """Whether ``args`` mount in the background (``mount ...`` or the fuse-overlayfs form)."""
    from unionfs.cli import _module_for

    if not args or args[0].startswith("--"):
        return False
    if args[0] != "mount" and _module_for(args[0]) is not None:
        return False
    for i, arg in enumerate(args):
        if arg in _LOCAL_FLAGS:
            return False
        if arg == "-o" and i + 1 < len(args):
            opts = args[i + 1].split(",")
            if "debug" in opts or "foreground" in opts:
                return False
        elif arg.startswith("-o") and ("debug" in arg[2:].split(",")):
            return False
    return True


def connect(path: str) -> _socket.socket | None:
    """A connection to this user's server at ``path``, or None (no server, or one that is
    not trustworthy)."""
    uid = os.geteuid()
    try:
        st = os.lstat(os.path.dirname(path))
    except OSError:
        return None
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != uid or st.st_mode & 0o022:
        return None
    conn = _socket.socket(_socket.AF_UNIX, _socket.SOCK_SEQPACKET | _socket.SOCK_CLOEXEC)
    try:
        conn.connect(path)
        creds = conn.getsockopt(_socket.SOL_SOCKET, _socket.SO_PEERCRED, 12)
    except OSError:
        conn.close()
        return None
    if int.from_bytes(creds[4:8], sys.byteorder) != uid:
        conn.close()
        return None
    return conn


def encode_request(args: list[str], env: dict[str, str], umask: int) -> bytes:
    """The request: ``unionfs1``, the umask in octal, the argument count, the arguments and
    the environment as ``NAME=VALUE``, each ended by a NUL byte."""
    fields = [REQUEST_MAGIC, b"%o" % umask, b"%d" % len(args)]
    fields += [os.fsencode(a) for a in args]
    fields += [os.fsencode(k) + b"=" + os.fsencode(v) for k, v in env.items()]
    return b"\0".join(fields) + b"\0"


def decode_request(data: bytes) -> tuple[list[str], dict[str, str], int]:
    """The arguments, environment and umask of a request (ValueError if malformed)."""
    fields = data.split(b"\0")
    if len(fields) < 4 or fields[0] != REQUEST_MAGIC or fields[-1] != b"":
        raise ValueError("malformed request")
    umask, argc = int(fields[1], 8), int(fields[2])
    if not 0 <= umask <= 0o777 or not 0 <= argc <= len(fields) - 4:
        raise ValueError("malformed request")
    args = [os.fsdecode(a) for a in fields[3 : 3 + argc]]
    env = {}
    for item in fields[3 + argc : -1]:
        name, eq, value = item.partition(b"=")
        if not eq:
            raise ValueError("malformed request")
        env[os.fsdecode(name)] = os.fsdecode(value)
    return args, env, umask


def _ask_server(args: list[str]) -> int | None:
    """The exit status of the command run by the server, or None: run it here."""
    from unionfs.paths import server_socket

    conn = connect(server_socket())
    if conn is None:
        return None
    try:
        umask = os.umask(0o022)
        os.umask(umask)
        cwd = os.open(".", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            # The descriptors as C ints, packed by hand: the array module would import
            # collections (about 2 ms of the command).
            rights = b"".join(fd.to_bytes(4, sys.byteorder) for fd in (cwd, 0, 1, 2))
            conn.sendmsg(
                [encode_request(args, dict(os.environ), umask)],
                [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, rights)],
            )
        finally:
            os.close(cwd)
        answer = conn.recv(4096)
    except OSError:
        answer = b""
    finally:
        conn.close()
    kind, _, value = answer.partition(b" ")
    if kind == b"exit" and value.lstrip(b"-").isdigit():
        return int(value)
    if kind == b"local":
        return None
    sys.stderr.write("unionfs: the mount server ended before answering\n")
    return 1


def _site() -> None:
    """Add the site directories if Python started without them (the launcher's ``-IS``):
    the command runs here, and needs the virtualenv's packages (pyfuse3, trio)."""
    if sys.flags.no_site and "site" not in sys.modules:
        import site

        site.main()


def _run_here(args: list[str]) -> int:
    """Run the command in this process (:func:`unionfs.cli.main`)."""
    _site()
    from unionfs.cli import main as run_here

    return run_here(args)


def main() -> int:
    args = sys.argv[1:]
    if not _for_server(args):
        return _run_here(args)
    code = None
    if os.environ.get("UNIONFS_SERVER", "auto") != "off":
        code = _ask_server(args)
    if code is None:
        code = _run_here(args)
    # A background mount: its daemon is a process of its own by now, and this one has
    # nothing left to clean up. Skip the interpreter's teardown: about 25 ms for the ~300
    # modules a mount made here imports, about 2 ms after the server's answer.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


# The ``unionfs`` command as install.sh writes it over pip's console script. Python starts
# isolated and without the site module (-IS: about 3 ms less), and nothing but this package
# is imported before the server is asked; pip's script imports ``re`` (about 5 ms). The
# package's directory is written in; the site directories are added only when the command
# runs in this process (:func:`_site`).
LAUNCHER = """#!{python} -IS
# unionfs: written by `python -m unionfs.launch --write-launcher` (scripts/install.sh).
import sys
sys.path.insert(0, {root!r})
from unionfs.launch import main
sys.exit(main())
"""


def write_launcher(path: str) -> None:
    """Write the launcher to ``path`` (replaced atomically, mode 0755), for this Python and
    this copy of the package."""
    import unionfs

    root = os.path.dirname(os.path.dirname(os.path.abspath(unionfs.__file__)))
    text = LAUNCHER.format(python=sys.executable, root=root)
    tmp = f"{path}.tmp{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o755)
    try:
        os.write(fd, text.encode())
        os.fchmod(fd, 0o755)
    finally:
        os.close(fd)
    os.replace(tmp, path)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--write-launcher"] and len(sys.argv) == 3:
        write_launcher(sys.argv[2])
        sys.exit(0)
    sys.exit(main())
