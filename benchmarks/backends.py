"""The filesystems under test: how to mount, unmount and find the daemon of each.

Every backend gets the same lower layers (top first), a fresh upper and workdir, and a
mountpoint.  ``fsync=False`` asks for the no-fsync policy: ``-o fsync=0`` for fuse-overlayfs and
unionfs, ``volatile`` for the kernel.  A :class:`MountTracker` remembers every live mount so the
harness can always unmount on the way out.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MOUNT_TIMEOUT = 300.0


class MountError(RuntimeError):
    """A mount or unmount command failed."""


def is_mountpoint(path: str | Path) -> bool:
    """True if ``path`` is listed as a mountpoint in /proc/self/mountinfo."""
    target = os.path.realpath(path)
    return target in mountpoints()


def mountpoints() -> list[str]:
    """All mountpoints of this mount namespace (octal escapes decoded)."""
    out = []
    with open("/proc/self/mountinfo", encoding="utf-8") as fh:
        for line in fh:
            raw = line.split()[4]
            out.append(raw.encode().decode("unicode_escape"))
    return out


def _run(
    argv: list[str],
    cwd: str | None = None,
    timeout: float = MOUNT_TIMEOUT,
    env: dict[str, str] | None = None,
) -> None:
    proc = subprocess.run(
        argv, cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False, env=env
    )
    if proc.returncode != 0:
        msg = (proc.stderr or proc.stdout).strip().splitlines()
        raise MountError(f"{' '.join(argv[:1])} exited {proc.returncode}: {' | '.join(msg[-3:])}")


def _version(argv: list[str]) -> str:
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=20, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unknown ({exc})"
    text = (proc.stdout + proc.stderr).strip().splitlines()
    return text[0].strip() if text else "unknown"


def _wait_mounted(mnt: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not is_mountpoint(mnt):
        if time.monotonic() > deadline:
            raise MountError(f"{mnt} not mounted after the mount command returned")
        time.sleep(0.005)


def find_daemon_pid(mnt: str) -> int | None:
    """PID of the FUSE daemon serving ``mnt``: argv names the mountpoint, /dev/fuse is open."""
    mnt = os.path.realpath(mnt)
    candidates: list[int] = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as fh:
                argv = [a.decode(errors="replace") for a in fh.read().split(b"\0") if a]
        except OSError:
            continue
        if any(os.path.realpath(a) == mnt for a in argv[1:] if a.startswith("/")):
            candidates.append(int(entry))
    for pid in candidates:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                if os.readlink(f"/proc/{pid}/fd/{fd}") == "/dev/fuse":
                    return pid
        except OSError:
            continue
    return candidates[0] if candidates else None


def rss_bytes(pid: int) -> int | None:
    """Resident set size of ``pid`` from /proc/PID/status."""
    try:
        with open(f"/proc/{pid}/status", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


@dataclass
class Backend:
    """Base class: a named filesystem with mount/unmount commands."""

    name: str
    fuse: bool = True
    note: str = ""
    available: bool = True
    version: str = ""
    daemon_pids: dict[str, int] = field(default_factory=dict)
    env: dict[str, str] | None = None  # environment of the mount/unmount commands

    def probe(self) -> None:
        """Fill ``available``/``note``/``version`` (cheap checks only)."""

    def prepare(self, run_dir: Path) -> None:
        """Set up what the backend needs for this run (before the trial mount)."""

    def shutdown(self) -> None:
        """Undo :meth:`prepare`; never raises."""

    def mount_argv(
        self, lowers: list[Path], upper: Path, work: Path, mnt: Path, fsync: bool
    ) -> tuple[list[str], str | None]:
        """The mount command and the directory it runs in (what a container engine runs)."""
        raise NotImplementedError

    def mount(self, lowers: list[Path], upper: Path, work: Path, mnt: Path, fsync: bool) -> None:
        """Run the mount command; for FUSE, return once the mountpoint is listed."""
        argv, cwd = self.mount_argv(lowers, upper, work, mnt, fsync)
        _run(argv, cwd=cwd, env=self.env)
        if self.fuse:
            _wait_mounted(str(mnt))

    def unmount(self, mnt: Path) -> None:
        """Unmount; wait for a FUSE daemon to exit."""
        pid = self.daemon_pids.pop(str(mnt), None) or (
            find_daemon_pid(str(mnt)) if self.fuse else None
        )
        try:
            self._unmount(mnt)
        except MountError:
            lazy_unmount(mnt)
        if pid:
            deadline = time.monotonic() + 10
            while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
                if _is_zombie(pid):
                    break
                time.sleep(0.01)

    def _unmount(self, mnt: Path) -> None:
        _run(["fusermount3", "-u", str(mnt)])


def _is_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True


def lazy_unmount(mnt: Path | str) -> None:
    """Last resort: detach a mount whatever it is."""
    for argv in (["fusermount3", "-uz", str(mnt)], ["umount", "-l", str(mnt)]):
        if not is_mountpoint(mnt):
            return
        subprocess.run(argv, capture_output=True, timeout=60, check=False)


def _lowerdir(lowers: list[Path]) -> tuple[str, str | None]:
    """``lowerdir=`` value; relative to a common parent (returned as cwd) to stay short."""
    parents = {p.parent for p in lowers}
    if len(parents) == 1:
        return ":".join(p.name for p in lowers), str(parents.pop())
    return ":".join(str(p) for p in lowers), None


class KernelBackend(Backend):
    """Linux overlayfs via mount(8); ``volatile`` is its fsync=0."""

    def __init__(self) -> None:
        super().__init__(name="kernel", fuse=False)

    def probe(self) -> None:
        """Needs root and overlay in /proc/filesystems (or loadable)."""
        self.version = f"linux {os.uname().release}"
        if os.geteuid() != 0:
            self.available, self.note = False, "needs root"

    def mount_argv(
        self, lowers: list[Path], upper: Path, work: Path, mnt: Path, fsync: bool
    ) -> tuple[list[str], str | None]:
        """mount -t overlay with lowerdir relative to the layers' parent (page-size limit)."""
        lower, cwd = _lowerdir(lowers)
        opts = f"lowerdir={lower},upperdir={upper},workdir={work}"
        if not fsync:
            opts += ",volatile"
        return ["mount", "-t", "overlay", "overlay", "-o", opts, str(mnt)], cwd

    def _unmount(self, mnt: Path) -> None:
        _run(["umount", str(mnt)])


class FuseOverlayfsBackend(Backend):
    """fuse-overlayfs from the distribution."""

    def __init__(self, binary: str = "/usr/bin/fuse-overlayfs") -> None:
        super().__init__(name="fuse-overlayfs")
        self.binary = binary

    def probe(self) -> None:
        """Present and executable."""
        if not os.access(self.binary, os.X_OK):
            self.available, self.note = False, f"{self.binary} not installed"
            return
        self.version = _version([self.binary, "--version"]).replace("fusermount3 ", "")
        out = subprocess.run(
            [self.binary, "--version"], capture_output=True, text=True, check=False
        )
        for line in (out.stdout + out.stderr).splitlines():
            if line.startswith("fuse-overlayfs"):
                self.version = line.strip()

    def mount_argv(
        self, lowers: list[Path], upper: Path, work: Path, mnt: Path, fsync: bool
    ) -> tuple[list[str], str | None]:
        """``fuse-overlayfs -o lowerdir=..,upperdir=..,workdir=..[,fsync=0] MNT``."""
        lower, cwd = _lowerdir(lowers)
        opts = f"lowerdir={lower},upperdir={upper},workdir={work}"
        if not fsync:
            opts += ",fsync=0"
        return [self.binary, "-o", opts, str(mnt)], cwd


class UnionfsBackend(Backend):
    """This project's filesystem, with the fuse-overlayfs-compatible argv."""

    def __init__(self, binary: str | None = None) -> None:
        super().__init__(name="unionfs")
        self.binary = binary or str(REPO / ".venv" / "bin" / "unionfs")

    def probe(self) -> None:
        """Present; whether it really mounts is checked by a trial mount in the harness."""
        if not os.access(self.binary, os.X_OK):
            self.available, self.note = False, f"{self.binary} not found"
            return
        self.version = _version([self.binary, "--version"])

    def mount_argv(
        self, lowers: list[Path], upper: Path, work: Path, mnt: Path, fsync: bool
    ) -> tuple[list[str], str | None]:
        """Absolute lowerdir paths; ``-o fsync=0`` for the no-fsync policy."""
        opts = f"lowerdir={':'.join(str(p) for p in lowers)},upperdir={upper},workdir={work}"
        if not fsync:
            opts += ",fsync=0"
        return [self.binary, "-o", opts, str(mnt)], None

    def prepare(self, run_dir: Path) -> None:
        """Never a mount server: the socket variable names a path where none listens (a
        server of the user's own would otherwise serve these mounts)."""
        self.env = {**os.environ, "UNIONFS_SERVER_SOCKET": str(run_dir / "no-server.sock")}

    def _unmount(self, mnt: Path) -> None:
        try:
            _run([self.binary, "umount", str(mnt)], env=self.env)
        except (MountError, OSError):
            _run(["fusermount3", "-u", str(mnt)])
        if is_mountpoint(mnt):
            _run(["fusermount3", "-u", str(mnt)])


class UnionfsServerBackend(UnionfsBackend):
    """unionfs with its mount server (``unionfs server``): a private server for the run.

    The same command line as ``unionfs``; the command hands the mount to a resident,
    pre-imported server listening on a socket of this run, which forks the mount's daemon.
    """

    def __init__(self, binary: str | None = None) -> None:
        super().__init__(binary)
        self.name = "unionfs-server"
        self.started = False

    def probe(self) -> None:
        """Present, and has a ``server`` command."""
        super().probe()
        if self.available:
            proc = subprocess.run(
                [self.binary, "server", "--help"], capture_output=True, timeout=60, check=False
            )
            if proc.returncode != 0:
                self.available, self.note = False, "no 'unionfs server' command"

    def prepare(self, run_dir: Path) -> None:
        """Start a server on a socket in a private directory of the run."""
        sock_dir = run_dir / "unionfs-server"
        sock_dir.mkdir(mode=0o700)
        self.env = {**os.environ, "UNIONFS_SERVER_SOCKET": str(sock_dir / "server.sock")}
        _run([self.binary, "server", "start", "--idle-exit", "7200"], env=self.env)
        self.started = True
        _run([self.binary, "server", "status"], env=self.env)

    def shutdown(self) -> None:
        """Stop the run's server (its mounts' daemons are separate processes)."""
        if self.started:
            self.started = False
            try:
                _run([self.binary, "server", "stop"], env=self.env, timeout=60)
            except (MountError, OSError, subprocess.SubprocessError):
                pass


class UnionfsFuseBackend(Backend):
    """unionfs-fuse (Debian package ``unionfs-fuse``), optional, by full path.

    It has its own whiteout format, so it sees the kernel-format whiteouts of the tree fixture
    as plain device nodes: its view of that tree differs; timings are indicative only.
    """

    def __init__(self, binary: str = "/usr/bin/unionfs") -> None:
        super().__init__(name="unionfs-fuse")
        self.binary = binary

    def probe(self) -> None:
        """Present and really unionfs-fuse (the name clashes with ours)."""
        if not os.access(self.binary, os.X_OK):
            self.available, self.note = False, f"{self.binary} not installed"
            return
        self.version = _version([self.binary, "--version"])
        if "unionfs" not in self.version.lower() or str(REPO) in os.path.realpath(self.binary):
            self.available, self.note = False, f"{self.binary} is not unionfs-fuse"
            return
        self.note = "own whiteout format: ignores kernel whiteouts/opaque dirs; no fsync option"

    def mount_argv(
        self, lowers: list[Path], upper: Path, work: Path, mnt: Path, fsync: bool
    ) -> tuple[list[str], str | None]:
        """``unionfs -o cow U=RW:L1=RO:... MNT`` (workdir unused)."""
        branches = ":".join([f"{upper}=RW"] + [f"{p}=RO" for p in lowers])
        return [self.binary, "-o", "cow", branches, str(mnt)], None


class BareBackend(Backend):
    """No union at all: the floor a bare syscall loop reaches on the upper's filesystem.

    The lower layers are copied (bottom first, untimed) into the upper, which is then
    bind-mounted on the mountpoint, so the workload sees the same names and runs its system
    calls straight on the upper's filesystem.  Only for workloads marked ``floor`` (small
    fixtures without whiteouts); it has no mount time of its own.
    """

    def __init__(self) -> None:
        super().__init__(name="bare", fuse=False)

    def probe(self) -> None:
        """Needs root for the bind mount."""
        self.version = "bind mount of the upper directory"
        if os.geteuid() != 0:
            self.available, self.note = False, "needs root"

    def mount(self, lowers: list[Path], upper: Path, work: Path, mnt: Path, fsync: bool) -> None:
        """Copy the layers into the upper, bottom first, then bind-mount it."""
        for layer in reversed(lowers):
            _run(["cp", "-a", "--", f"{layer}/.", str(upper)])
        _run(["mount", "--bind", str(upper), str(mnt)])

    def _unmount(self, mnt: Path) -> None:
        _run(["umount", str(mnt)])


ALL_BACKENDS = ("kernel", "fuse-overlayfs", "unionfs", "unionfs-server", "unionfs-fuse", "bare")
DEFAULT_BACKENDS = ("kernel", "fuse-overlayfs", "unionfs", "bare")
FLOOR_BACKENDS = ("bare",)  # run only the workloads marked ``floor``


def make_backend(name: str, unionfs_bin: str | None = None) -> Backend:
    """Construct a backend by name."""
    if name == "kernel":
        return KernelBackend()
    if name == "fuse-overlayfs":
        return FuseOverlayfsBackend()
    if name == "unionfs":
        return UnionfsBackend(unionfs_bin)
    if name == "unionfs-server":
        return UnionfsServerBackend(unionfs_bin)
    if name == "unionfs-fuse":
        return UnionfsFuseBackend()
    if name == "bare":
        return BareBackend()
    raise ValueError(f"unknown backend {name!r} (choose from {', '.join(ALL_BACKENDS)})")


class MountTracker:
    """Every mount the harness made, so all of them can be undone on any exit path."""

    def __init__(self) -> None:
        self.live: list[tuple[Backend | None, Path]] = []

    def mount(
        self,
        backend: Backend,
        lowers: list[Path],
        upper: Path,
        work: Path,
        mnt: Path,
        fsync: bool,
    ) -> float:
        """Mount through the backend, remember it, return the seconds the mount command took."""
        self.live.append((backend, mnt))
        t0 = time.perf_counter()
        backend.mount(lowers, upper, work, mnt, fsync)
        seconds = time.perf_counter() - t0
        if backend.fuse:
            pid = find_daemon_pid(str(mnt))
            if pid:
                backend.daemon_pids[str(mnt)] = pid
        return seconds

    def mount_ready(
        self,
        backend: Backend,
        lowers: list[Path],
        upper: Path,
        work: Path,
        mnt: Path,
        fsync: bool,
        known: str,
    ) -> float:
        """Seconds from starting the mount command to the mount being usable.

        Usable: the mountpoint's ``st_dev`` has changed and ``stat`` of ``known`` (a file of
        the bottom layer, relative to the mountpoint) answers.  Polled every 0.2 ms from here,
        without waiting for the command to exit (a daemonizing program's parent may exit
        before or after the mount is ready).
        """
        argv, cwd = backend.mount_argv(lowers, upper, work, mnt, fsync)
        before = os.stat(mnt).st_dev
        target = os.path.join(mnt, known)
        self.live.append((backend, mnt))
        t0 = time.perf_counter()
        with tempfile.TemporaryFile() as errf:
            t0 = time.perf_counter()
            proc = subprocess.Popen(
                argv,
                cwd=cwd,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=errf,
                env=backend.env,
            )
            deadline = time.monotonic() + 60
            while True:
                try:
                    if os.stat(mnt).st_dev != before:
                        os.stat(target)
                        seconds = time.perf_counter() - t0
                        break
                except OSError:
                    pass
                if proc.poll() not in (None, 0) or time.monotonic() > deadline:
                    errf.seek(0)
                    err = errf.read().decode(errors="replace").strip()[-300:]
                    raise MountError(f"{argv[0]} not ready (exit {proc.poll()}): {err}")
                time.sleep(0.0002)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:  # a foreground daemon: it serves until unmounted
                pass
        if backend.fuse:
            pid = find_daemon_pid(str(mnt))
            if pid:
                backend.daemon_pids[str(mnt)] = pid
        return seconds

    def tmpfs(self, mnt: Path, size: str) -> None:
        """Mount a private tmpfs (for uppers on tmpfs)."""
        self.live.append((None, mnt))
        _run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(mnt)])

    def unmount(self, mnt: Path) -> None:
        """Unmount one tracked mount."""
        for i in range(len(self.live) - 1, -1, -1):
            backend, path = self.live[i]
            if path == mnt:
                del self.live[i]
                if not is_mountpoint(mnt):
                    return
                if backend is None:
                    try:
                        _run(["umount", str(mnt)])
                    except MountError:
                        lazy_unmount(mnt)
                else:
                    backend.unmount(mnt)
                return

    def unmount_all(self) -> None:
        """Unmount everything still mounted, newest first; never raises."""
        while self.live:
            _, mnt = self.live[-1]
            try:
                self.unmount(mnt)
            except (MountError, OSError, subprocess.SubprocessError):
                lazy_unmount(mnt)
                if self.live and self.live[-1][1] == mnt:
                    self.live.pop()
