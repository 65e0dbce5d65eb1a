"""The resident mount server (unionfs/server.py) and the thin ``unionfs`` command
(unionfs/launch.py), on real mounts.

With a server listening, a background mount is made by a process forked from the server, in
the caller's place: the same view, the same one-line errors and exit codes, relative paths
resolved in the caller's directory. Callers the server must not serve (another user, another
mount namespace, a socket in a directory others can write) run the command themselves.
"""

from __future__ import annotations

import array
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import terminate, write
from unionfs import launch

pytestmark = pytest.mark.mount

UNIONFS = str(Path(sys.executable).with_name("unionfs"))


def _mounted(mnt: Path) -> bool:
    mounts = Path("/proc/self/mounts").read_text().splitlines()
    return any(line.split()[1] == str(mnt) for line in mounts)


def _daemon_of(mnt: Path) -> int:
    """The pid of the process serving ``mnt`` (its FUSE connection's owner)."""
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        if line.split()[4] == str(mnt):
            minor = line.split()[2].split(":")[1]
            break
    else:
        raise AssertionError(f"{mnt} is not mounted")
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            for fd in (proc / "fd").iterdir():
                if os.readlink(fd) == "/dev/fuse" and _conn_of(proc, fd.name) == minor:
                    return int(proc.name)
        except OSError:
            continue
    raise AssertionError(f"no daemon serves {mnt}")


def _forked_from_server(pid: int) -> bool:
    """Whether the daemon ``pid`` was forked from a server rather than started by the
    ``unionfs`` command itself: its command line is the request's, ``unionfs ARGS...``
    written over the server's own, where a command's starts with the interpreter."""
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    assert b"server" not in argv  # never mistaken for the server (``pkill -f``)
    return argv[0] == b"unionfs"


def _conn_of(proc: Path, fd: str) -> str | None:
    for line in (proc / "fdinfo" / fd).read_text().splitlines():
        if line.startswith("fuse_connection:"):
            return line.split()[-1]
    return None


@pytest.fixture
def server(tmp_path: Path) -> Iterator[dict[str, str]]:
    """A server in the foreground of its own process, with its own socket and state
    directory; yields the environment that reaches it."""
    state = tmp_path / "state"
    env = dict(
        os.environ,
        UNIONFS_STATE_DIR=str(state / "mounts"),
        UNIONFS_SERVER_SOCKET=str(state / "server.sock"),
    )
    env.pop("UNIONFS_SERVER", None)
    proc = subprocess.Popen([UNIONFS, "server", "start", "-f"], env=env)
    try:
        deadline = time.monotonic() + 20
        while not (state / "server.sock").exists():
            assert proc.poll() is None, "the server exited"
            assert time.monotonic() < deadline, "the server did not listen"
            time.sleep(0.02)
        env["SERVER_PID"] = str(proc.pid)
        yield env
    finally:
        terminate(proc, 20)
        for mnt in tmp_path.rglob("mnt*"):
            if _mounted(mnt):
                subprocess.run(["fusermount3", "-u", "-z", str(mnt)], check=False)


def _tree(tmp_path: Path) -> Path:
    root = tmp_path / "t"
    write(root / "lower" / "a", "lower a")
    write(root / "lower" / "d" / "b", "lower b")
    for sub in ("upper", "work", "mnt"):
        (root / sub).mkdir()
    return root


def _run_in(root: Path, env: dict[str, str], *argv: str | Path) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` in ``root`` with ``env``, its output captured as text."""
    return subprocess.run(argv, cwd=root, env=env, capture_output=True, text=True)


def _mount_tree(root: Path, env: dict[str, str], *command: str | Path) -> Path:
    """Run a mount command in ``root`` (paths relative to it, mountpoint ``mnt``); the
    mountpoint once the command succeeded."""
    res = _run_in(root, env, *command, "-o", "lowerdir=lower,upperdir=upper,workdir=work", "mnt")
    assert res.returncode == 0, res.stderr
    return root / "mnt"


def test_a_mount_through_the_server_is_served_by_a_process_of_its_own(
    server: dict[str, str], tmp_path: Path
) -> None:
    root = _tree(tmp_path)
    # Relative paths: resolved in the caller's directory, which the server is not in.
    mnt = _mount_tree(root, server, UNIONFS)
    try:
        assert (mnt / "a").read_text() == "lower a"
        (mnt / "a").write_text("changed")
        assert (root / "upper" / "a").read_text() == "changed"
        pid = _daemon_of(mnt)
        assert pid != int(server["SERVER_PID"])
        assert _forked_from_server(pid)
        shown = Path(f"/proc/{pid}/cmdline").read_bytes().rstrip(b"\0").split(b"\0")
        assert shown == [b"unionfs", b"-o", b"lowerdir=lower,upperdir=upper,workdir=work", b"mnt"]
        # The record went to the caller's state directory.
        assert list(Path(server["UNIONFS_STATE_DIR"]).glob("*.json"))
    finally:
        res = subprocess.run([UNIONFS, "umount", str(mnt)], env=server, capture_output=True)
        assert res.returncode == 0, res.stderr
    assert not _mounted(mnt)


def test_the_answer_comes_before_the_command_exits_and_the_daemon_keeps_no_connection(
    server: dict[str, str], tmp_path: Path
) -> None:
    """The server's child answers its caller as soon as the command is done, and the mount's
    daemon, forked on the way, does not inherit the caller's connection: once the answer
    is read the connection ends (EOF) while the daemon goes on serving."""
    root = _tree(tmp_path)
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    conn.settimeout(20)
    conn.connect(server["UNIONFS_SERVER_SOCKET"])
    env = dict(server)
    args = ["-o", "lowerdir=lower,upperdir=upper,workdir=work", "mnt"]
    cwd = os.open(root, os.O_PATH | os.O_DIRECTORY)
    devnull = os.open(os.devnull, os.O_RDWR)
    try:
        conn.sendmsg(
            [launch.encode_request(args, env, 0o022)],
            [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [cwd] + [devnull] * 3))],
        )
    finally:
        os.close(cwd)
        os.close(devnull)
    mnt = root / "mnt"
    try:
        assert conn.recv(4096) == b"exit 0"
        extra = conn.recv(4096)  # the server's own answer when it reaps the child, then EOF
        if extra:
            assert extra == b"exit 0"
            assert conn.recv(4096) == b""
        assert (mnt / "a").read_text() == "lower a"  # the daemon is still there
    finally:
        conn.close()
        subprocess.run([UNIONFS, "umount", str(mnt)], env=server, check=True)


def test_errors_and_exit_codes_are_the_commands_own(server: dict[str, str], tmp_path: Path) -> None:
    root = _tree(tmp_path)
    res = _run_in(
        root, server, UNIONFS, "-o", "lowerdir=missing,upperdir=upper,workdir=work", "mnt"
    )
    assert res.returncode == 1
    assert res.stderr == "unionfs: lowerdir 'missing' does not exist\n"
    opts = "lowerdir=lower,upperdir=upper,workdir=work,frobnicate=1"
    res = _run_in(root, server, UNIONFS, "-o", opts, "nowhere")
    assert res.returncode != 0 and res.stderr.count("\n") >= 1
    assert "Traceback" not in res.stderr
    assert not _mounted(root / "mnt")


def test_a_caller_in_another_mount_namespace_mounts_there_itself(
    server: dict[str, str], tmp_path: Path
) -> None:
    root = _tree(tmp_path)
    script = (
        f"{UNIONFS} -o lowerdir=lower,upperdir=upper,workdir=work mnt && "
        "cat mnt/a && echo && grep -c ' '$PWD'/mnt ' /proc/self/mounts && "
        f"{UNIONFS} umount mnt"
    )
    res = subprocess.run(
        ["unshare", "-m", "--propagation", "private", "sh", "-c", script],
        cwd=root,
        env=server,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["lower", "a", "1"]
    assert not _mounted(root / "mnt")  # never in the server's namespace


def test_a_socket_others_can_replace_is_not_used(server: dict[str, str], tmp_path: Path) -> None:
    root = _tree(tmp_path)
    sock_dir = Path(server["UNIONFS_SERVER_SOCKET"]).parent
    sock_dir.chmod(0o777)
    try:
        env = dict(server, UNIONFS_STATE_DIR=str(tmp_path / "own"))
        mnt = _mount_tree(root, env, UNIONFS)
        try:
            assert not _forked_from_server(_daemon_of(mnt))  # made by the command
        finally:
            subprocess.run([UNIONFS, "umount", str(root / "mnt")], env=env, check=True)
    finally:
        sock_dir.chmod(0o700)


def test_another_user_cannot_reach_the_server(server: dict[str, str]) -> None:
    sock = server["UNIONFS_SERVER_SOCKET"]
    probe = (
        "import socket, sys\n"
        "s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)\n"
        "try:\n"
        f"    s.connect({sock!r})\n"
        "except OSError as e:\n"
        "    print(e.errno)\n"
        "else:\n"
        "    s.sendall(b'x')\n"
        "    print('answer', s.recv(100))\n"
    )
    res = subprocess.run(
        ["setpriv", "--reuid=1000", "--regid=1000", "--clear-groups", sys.executable, "-c", probe],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "13"  # EACCES: the socket is its owner's alone


def test_stop(server: dict[str, str]) -> None:
    res = subprocess.run([UNIONFS, "server", "stop"], env=server, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert not Path(server["UNIONFS_SERVER_SOCKET"]).exists()
    res = subprocess.run([UNIONFS, "server", "status"], env=server, capture_output=True, text=True)
    assert res.returncode == 1


def _imported(stderr: str) -> set[str]:
    """Module names in ``python -X importtime`` output."""
    names = set()
    for line in stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            names.add(line.rsplit("|", 1)[1].strip())
    return names


@pytest.fixture
def launcher(tmp_path: Path) -> Path:
    """The launcher as install.sh writes it, for this Python and this checkout."""
    path = tmp_path / "bin" / "unionfs"
    path.parent.mkdir()
    subprocess.run([sys.executable, "-m", "unionfs.launch", "--write-launcher", path], check=True)
    return path


def test_the_launcher_reaches_the_server_with_nothing_heavy_imported(
    server: dict[str, str], tmp_path: Path, launcher: Path
) -> None:
    first = launcher.read_text().splitlines()[0]
    assert first == f"#!{sys.executable} -IS"
    root = _tree(tmp_path)
    # What the kernel runs for the shebang, with the import log on.
    res = _run_in(
        root,
        server,
        sys.executable,
        "-IS",
        "-X",
        "importtime",
        launcher,
        "-o",
        "lowerdir=lower",
        "mnt",
    )
    assert res.returncode == 0, res.stderr
    mnt = root / "mnt"
    try:
        assert (mnt / "a").read_text() == "lower a"
        assert _forked_from_server(_daemon_of(mnt))
        imported = _imported(res.stderr)
        assert "unionfs.launch" in imported
        assert not imported & {"site", "re", "pathlib", "trio", "pyfuse3", "unionfs.daemon"}
    finally:
        subprocess.run([launcher, "umount", str(mnt)], env=server, check=True)


def test_without_a_server_the_launcher_runs_the_command_itself(
    tmp_path: Path, launcher: Path
) -> None:
    root = _tree(tmp_path)
    env = dict(os.environ, UNIONFS_SERVER="off", UNIONFS_STATE_DIR=str(tmp_path / "state"))
    mnt = _mount_tree(root, env, launcher)
    try:
        assert not _forked_from_server(_daemon_of(mnt))
        (mnt / "a").write_text("changed")
        assert (root / "upper" / "a").read_text() == "changed"
    finally:
        subprocess.run([launcher, "umount", str(mnt)], env=env, check=True)
    res = subprocess.run([launcher, "inspect", "--help"], env=env, capture_output=True, text=True)
    assert res.returncode == 0 and "usage" in res.stdout, res.stderr


def test_a_mount_imports_no_test_framework_and_no_package_metadata() -> None:
    """What a daemon imports must not pull in pytest (trio.testing does; about 80 ms of
    every mount's start-up before pyfuse3 3.5.0+unionfs.6) nor importlib.metadata (stock
    pyfuse3 reads its version with it; about 12 ms before 3.5.0+unionfs.8). The version is
    still there when asked for."""
    code = (
        "import sys, unionfs.daemon, unionfs.fuse_ops, unionfs.fs.union, unionfs.cli.mount\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('pytest', '_pytest')"
        " or m == 'importlib.metadata'))\n"
        "import pyfuse3, importlib.metadata\n"
        "print(pyfuse3.__version__ == importlib.metadata.version('pyfuse3') != 'unknown')"
    )
    res = subprocess.run([sys.executable, "-I", "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["[]", "True"]


# The launcher run with an exit hook: it writes MARKER if the interpreter's teardown runs.
_WITH_EXIT_HOOK = """
import atexit, runpy, sys
marker = sys.argv[1]
atexit.register(lambda: open(marker, "w").close())
sys.argv = sys.argv[2:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_a_mount_without_the_server_skips_teardown_but_says_everything(
    tmp_path: Path, launcher: Path
) -> None:
    """Without the server, the launcher ends a background mount's command at once
    (``os._exit``, no teardown of the modules a mount imports) once the daemon is serving:
    its warnings and errors still reach stderr and its exit codes are the command's."""
    root = _tree(tmp_path)
    env = dict(os.environ, UNIONFS_SERVER="off", UNIONFS_STATE_DIR=str(tmp_path / "state"))
    marker = tmp_path / "teardown-ran"

    def launch(*args: str) -> subprocess.CompletedProcess[str]:
        hook = [sys.executable, "-IS", "-c", _WITH_EXIT_HOOK, str(marker), str(launcher)]
        return _run_in(root, env, *hook, *args)

    res = launch("-o", "lowerdir=lower,upperdir=upper,workdir=work,frobnicate", "mnt")
    mnt = root / "mnt"
    try:
        assert res.returncode == 0, res.stderr
        assert res.stderr == "unionfs: unknown argument ignored: frobnicate\n"
        assert (mnt / "a").read_text() == "lower a"
        assert not marker.exists()
    finally:
        subprocess.run([launcher, "umount", str(mnt)], env=env, check=True)
    res = launch("-o", "lowerdir=missing", "mnt")
    expected = subprocess.run(
        [sys.executable, "-m", "unionfs", "-o", "lowerdir=missing", "mnt"],
        cwd=root, env=env, capture_output=True, text=True,
    )  # fmt: skip
    assert (res.returncode, res.stderr) == (expected.returncode, expected.stderr)
    assert res.returncode != 0 and res.stderr.startswith("unionfs: ")
    assert not marker.exists()
    # Any other command still ends the ordinary way.
    assert launch("inspect", "--help").returncode == 0
    assert marker.exists()
