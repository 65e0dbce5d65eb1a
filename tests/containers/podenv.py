"""A private podman and buildah installation for one test run, with a chosen mount program.

Everything podman and buildah keep lives under one temporary directory: storage (graphroot,
runroot), ``storage.conf`` and ``containers.conf`` (given through ``CONTAINERS_STORAGE_CONF``
and ``CONTAINERS_CONF``, so /etc/containers and the user's own storage are never read or
written), lock files, events log, network configuration and, for a rootless engine, the
user's ``$HOME`` and ``$XDG_RUNTIME_DIR``. Storage is chosen by those files only: podman 4.3
given ``--root`` drops the storage.conf driver options, mount_program included, and then
falls back to fuse-overlayfs from $PATH without a word.

Host quirks of Debian 12, set in the private containers.conf and never system-wide: runc (crun
fails on a hybrid cgroup v1 host), cgroupfs, file events, no network, file locks (not the
shared ``/dev/shm/libpod_lock``), and ulimits within this process's hard limits (podman asks
for more than a hard limit allows, and runc then fails with "error setting rlimits").

A rootless engine runs podman as a system user made by :class:`TestUser`, whose subordinate
id range is added to /etc/subuid and /etc/subgid and removed again. The mount program is run
by that user (inside podman's user namespace), so it must be executable by the user: a
virtualenv whose interpreter lives under root's home is not, and :func:`mount_program_for`
then writes a small launcher that runs the project with the system's Python of the same
version.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import grp
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from benchmarks.podman import default_ulimits
from unionfs.paths import alive

# The 3-step build of the tests and of benchmarks/rootless_steps.py: a lower file changed, a
# lower directory removed and made again, a chown and a whiteout.
CONTAINERFILE = """\
FROM localhost/bb
RUN echo step1 >> /etc/motd && mkdir -p /opt/app && echo data > /opt/app/data
RUN rm /etc/group && rm -r /usr/share/doc/pkg && mkdir /usr/share/doc/pkg \\
    && echo rebuilt > /usr/share/doc/pkg/NEW
RUN chown 1000:1000 /opt/app/data && rm /home/user/.profile && touch /opt/app/done
"""

ROOT = Path(__file__).resolve().parents[2]
UNIONFS = str(ROOT / ".venv" / "bin" / "unionfs")
FUSE_OVERLAYFS = shutil.which("fuse-overlayfs") or "/usr/bin/fuse-overlayfs"
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
SUBID_FILES = ("/etc/subuid", "/etc/subgid")


def have_podman() -> str | None:
    """Why the container tests cannot run here, or None."""
    for tool in ("podman", "buildah", "runc"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    return None


# -- the image ---------------------------------------------------------------------------


def busybox_rootfs_tar(dest: Path) -> Path:
    """A tar of a tiny root filesystem: /bin/busybox with a link per applet, /etc/passwd and
    /etc/group, a lower file to modify (/etc/motd), a lower directory to delete and make again
    (/usr/share/doc/pkg), a directory owned by 1000 (/home/user) and /tmp."""
    busybox = shutil.which("busybox") or "/bin/busybox"
    applets = subprocess.run([busybox, "--list"], capture_output=True, text=True, check=True)
    files = {
        "etc/passwd": "root:x:0:0:root:/root:/bin/sh\nuser:x:1000:1000::/home/user:/bin/sh\n",
        "etc/group": "root:x:0:\nuser:x:1000:\n",
        "etc/motd": "lower motd\n",
        "usr/share/doc/pkg/README": "lower readme\n",
        "usr/share/doc/pkg/sub/NOTES": "lower notes\n",
        "home/user/.profile": "# user's profile\n",
    }
    with tarfile.open(dest, "w") as tar:

        def add(name: str, kind: bytes, mode: int, uid: int = 0, **kw: object) -> tarfile.TarInfo:
            ti = tarfile.TarInfo(name)
            ti.type, ti.mode, ti.uid, ti.gid, ti.mtime = kind, mode, uid, uid, 1_700_000_000
            for k, v in kw.items():
                setattr(ti, k, v)
            return ti

        dirs = {"bin", "etc", "tmp", "root", "home", "home/user"}
        for name in files:
            parts = name.split("/")[:-1]
            dirs.update("/".join(parts[: i + 1]) for i in range(len(parts)))
        for d in sorted(dirs):
            owner = 1000 if d == "home/user" else 0
            tar.addfile(add(d, tarfile.DIRTYPE, 0o1777 if d == "tmp" else 0o755, owner))
        with open(busybox, "rb") as f:
            ti = add("bin/busybox", tarfile.REGTYPE, 0o755, size=os.fstat(f.fileno()).st_size)
            tar.addfile(ti, f)
        for applet in applets.stdout.split():
            if applet != "busybox":
                tar.addfile(add(f"bin/{applet}", tarfile.SYMTYPE, 0o777, linkname="busybox"))
        for name, text in files.items():
            data = text.encode()
            owner = 1000 if name.startswith("home/user/") else 0
            ti = add(name, tarfile.REGTYPE, 0o644, owner, size=len(data))
            tar.addfile(ti, _Bytes(data))
    return dest


class _Bytes:
    def __init__(self, data: bytes) -> None:
        self.data = data

    def read(self, n: int = -1) -> bytes:
        out, self.data = (self.data, b"") if n < 0 else (self.data[:n], self.data[n:])
        return out


# -- users and subordinate ids -----------------------------------------------------------


@contextlib.contextmanager
def _locked(path: str) -> Iterator[None]:
    # shadow's tools lock /etc/subuid through /etc/subuid.lock; flock the file itself too,
    # so that two of our own fixtures never interleave.
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _subid_ends() -> int:
    end = 0
    for path in SUBID_FILES:
        with open(path) as f:
            for line in f:
                parts = line.strip().split(":")
                if len(parts) == 3 and parts[1].isdigit() and parts[2].isdigit():
                    end = max(end, int(parts[1]) + int(parts[2]))
    return end


def add_subid_line(line: str) -> None:
    """Append ``line`` (NAME:START:COUNT) to /etc/subuid and /etc/subgid."""
    for path in SUBID_FILES:
        with _locked(path), open(path, "a") as f:
            f.write(line + "\n")


def remove_subid_line(line: str) -> None:
    """Remove exactly the line ``line`` from /etc/subuid and /etc/subgid (once each)."""
    for path in SUBID_FILES:
        with _locked(path):
            with open(path) as f:
                lines = f.read().splitlines(keepends=True)
            kept, dropped = [], False
            for existing in lines:
                if not dropped and existing.rstrip("\n") == line:
                    dropped = True
                    continue
                kept.append(existing)
            if dropped:
                with open(path, "w") as f:
                    f.writelines(kept)


def free_subid_start() -> int:
    """A start id above every range in /etc/subuid and /etc/subgid, aligned to 65536."""
    end = max(_subid_ends(), 200_000)
    return (end + 65535) // 65536 * 65536


@dataclasses.dataclass
class TestUser:
    """A system user made for the tests (no home, no login) with a subordinate id range."""

    __test__ = False  # not a pytest class

    name: str
    uid: int
    gid: int
    subid_line: str

    @classmethod
    def create(cls, prefix: str = "ufsctr", count: int = 65536) -> TestUser:
        name = f"{prefix}{os.getpid() % 100000}"
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "--user-group", "--home-dir",
             "/nonexistent", "--shell", "/usr/sbin/nologin", name],
            check=True, capture_output=True, text=True,
        )  # fmt: skip
        pw = pwd.getpwnam(name)
        line = f"{name}:{free_subid_start()}:{count}"
        user = cls(name, pw.pw_uid, pw.pw_gid, line)
        try:
            add_subid_line(line)
        except BaseException:
            user.remove()
            raise
        return user

    def remove(self) -> None:
        remove_subid_line(self.subid_line)
        subprocess.run(["userdel", self.name], capture_output=True, check=True)
        with contextlib.suppress(KeyError):
            grp.getgrnam(self.name)
            subprocess.run(["groupdel", self.name], capture_output=True, check=False)


@contextlib.contextmanager
def containers_subids(count: int = 262144) -> Iterator[str]:
    """A ``containers`` range in /etc/subuid and /etc/subgid for ``--userns=auto`` (podman
    allocates automatic namespaces from the ranges of the user named ``containers``), removed
    afterwards. Uses an existing range, untouched, if there is one."""
    for path in SUBID_FILES:
        with open(path) as f:
            if any(line.startswith("containers:") for line in f):
                yield ""
                return
    line = f"containers:{free_subid_start()}:{count}"
    add_subid_line(line)
    try:
        yield line
    finally:
        remove_subid_line(line)


# -- the mount program -------------------------------------------------------------------


def _runs_as(uid: int, gid: int, program: str) -> bool:
    done = subprocess.run(
        ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups",
         "/bin/sh", "-c", f'exec "{program}" --help'],
        capture_output=True, env={"PATH": PATH}, timeout=60, check=False,
    )  # fmt: skip
    return done.returncode == 0


def mount_program_for(uid: int, gid: int, workdir: Path) -> str:
    """The unionfs command as user ``uid`` can run it: the virtualenv's own entry point, or
    else a launcher in ``workdir`` that runs the project with /usr/bin/python3 and the
    virtualenv's site-packages (the same minor version is required: pyfuse3 is compiled)."""
    if _runs_as(uid, gid, UNIONFS):
        return UNIONFS
    site = ROOT / ".venv" / "lib" / f"python{sys.version_info[0]}.{sys.version_info[1]}"
    launcher = workdir / "unionfs"
    launcher.write_text(
        "#!/usr/bin/python3 -I\n"
        "import site, sys\n"
        f"site.addsitedir({str(site / 'site-packages')!r})\n"
        "from unionfs.launch import main\n"
        "sys.exit(main())\n"
    )
    launcher.chmod(0o755)
    if not _runs_as(uid, gid, str(launcher)):
        raise RuntimeError(
            f"{UNIONFS} cannot be run by uid {uid} (its interpreter is not reachable) and "
            "/usr/bin/python3 cannot load the project"
        )
    return str(launcher)


# -- the engine ----------------------------------------------------------------------------


@dataclasses.dataclass
class Result:
    argv: list[str]
    returncode: int
    stdout: str
    stderr: str
    seconds: float

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    def check(self) -> Result:
        if self.returncode != 0:
            raise AssertionError(
                f"{' '.join(self.argv)} exited {self.returncode}\n{self.stderr[-3000:]}"
            )
        return self


class Engine:
    """podman and buildah with private storage under ``base``, run as root or as ``user``."""

    # Rootless podman 4.3 here makes every attached ``podman run`` wait its whole 20-second
    # conmon timeout after the container exits when the engine's directory (and so
    # XDG_RUNTIME_DIR and the runroot) is longer than about 36 characters: 34 is fast, 38 is
    # not, with fuse-overlayfs as with unionfs.
    MAX_BASE = 34

    def __init__(
        self, base: Path, mount_program: str, user: TestUser | None = None, mountopt: str = ""
    ) -> None:
        if user is not None and len(str(base)) > self.MAX_BASE:
            raise ValueError(f"{base}: longer than {self.MAX_BASE} characters (see MAX_BASE)")
        self.base = base
        self.user = user
        self.mount_program = mount_program
        base.mkdir(parents=True, exist_ok=True)
        self.home = base / "home"
        self.xdg = base / "xdg"
        self.graph = base / "graph"
        self.run = (self.xdg / "containers") if user else (base / "run")
        for d in (self.home, self.xdg, self.graph, base / "tmp", base / "net", self.run):
            d.mkdir(parents=True, exist_ok=True)
        self.xdg.chmod(0o700)
        opts = mountopt or "nodev"
        (base / "storage.conf").write_text(
            "[storage]\n"
            'driver = "overlay"\n'
            f'graphroot = "{self.graph}"\n'
            f'runroot = "{self.run}"\n'
            f'rootless_storage_path = "{self.graph}"\n'
            "[storage.options.overlay]\n"
            f'mount_program = "{mount_program}"\n'
            f'mountopt = "{opts}"\n'
        )
        tmp_dir = (self.xdg / "libpod" / "tmp") if user else (base / "tmp")
        (base / "containers.conf").write_text(
            "[containers]\n"
            'netns = "none"\n'
            f"default_ulimits = [{', '.join(default_ulimits())}]\n"
            "[network]\n"
            f'network_config_dir = "{base / "net"}"\n'
            "[engine]\n"
            'runtime = "runc"\n'
            'cgroup_manager = "cgroupfs"\n'
            'events_logger = "file"\n'
            f'events_logfile_path = "{base / "events.log"}"\n'
            f'tmp_dir = "{tmp_dir}"\n'
            'lock_type = "file"\n'
        )
        if user is not None:
            os.chown(base, user.uid, user.gid)
            for dirpath, dirnames, filenames in os.walk(base):
                for n in (dirpath, *(os.path.join(dirpath, x) for x in dirnames + filenames)):
                    os.chown(n, user.uid, user.gid, follow_symlinks=False)
        self.env = {
            "PATH": PATH,
            "HOME": str(self.home),
            "LANG": "C.UTF-8",
            "XDG_RUNTIME_DIR": str(self.xdg),
            "XDG_CONFIG_HOME": str(self.home / ".config"),
            "XDG_DATA_HOME": str(self.home / ".local" / "share"),
            "CONTAINERS_STORAGE_CONF": str(base / "storage.conf"),
            "CONTAINERS_CONF": str(base / "containers.conf"),
            "CONTAINERS_REGISTRIES_CONF": str(base / "registries.conf"),
            # unionfs's records and logs, here rather than in /run/unionfs/mounts (or nowhere:
            # in podman's user namespace the mount program is that namespace's root).
            "UNIONFS_STATE_DIR": str(self.xdg / "unionfs"),
        }
        (base / "registries.conf").write_text("unqualified-search-registries = []\n")
        if user is not None:
            os.chown(base / "registries.conf", user.uid, user.gid)

    @property
    def rootless(self) -> bool:
        return self.user is not None

    def disable_idmapped_lowers(self) -> None:
        """Tell containers-storage that this kernel cannot idmap the lower layers.

        Podman 4.3 (containers-storage 1.43), given ``--uidmap`` or ``--userns=auto``, idmaps
        the lower layers with a bind mount placed inside the storage directory *and* passes
        ``uidmapping=`` to the mount program: the ids are shifted twice (fuse-overlayfs shows
        the image's root files as 1:1 inside such a container). Its feature cache in the
        runroot decides; marking the feature absent leaves the shifting to the mount program,
        as fuse-overlayfs's documentation describes."""
        cache = self.run / "overlay"
        cache.mkdir(parents=True, exist_ok=True)
        (cache / "idmapped-lower-dir-true").unlink(missing_ok=True)
        (cache / "idmapped-lower-dir-false").write_text("")

    def _argv(self, argv: Sequence[str]) -> list[str]:
        if self.user is None:
            return list(argv)
        return [
            "setpriv", f"--reuid={self.user.uid}", f"--regid={self.user.gid}", "--clear-groups",
            *argv,
        ]  # fmt: skip

    def cmd(self, *argv: str, timeout: float = 120, input: str | None = None) -> Result:
        full = self._argv(argv)
        start = time.monotonic()
        try:
            done = subprocess.run(
                full, capture_output=True, text=True, env=self.env, timeout=timeout,
                cwd=self.base, input=input, check=False,
            )  # fmt: skip
        except subprocess.TimeoutExpired as exc:
            out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
            return Result(list(argv), -1, out, f"timed out after {timeout}s", timeout)
        result = Result(list(argv), done.returncode, done.stdout, done.stderr,
                        time.monotonic() - start)  # fmt: skip
        with open(self.base / "commands.log", "a") as log:
            log.write(f"{result.seconds:7.2f}s rc={result.returncode} {' '.join(argv)[:200]}\n")
        return result

    def podman(self, *args: str, timeout: float = 120) -> Result:
        return self.cmd("podman", *args, timeout=timeout)

    def buildah(self, *args: str, timeout: float = 120) -> Result:
        return self.cmd("buildah", *args, timeout=timeout)

    def import_image(self, tar: Path, name: str) -> None:
        own = self.base / tar.name
        shutil.copyfile(tar, own)
        if self.user is not None:
            os.chown(own, self.user.uid, self.user.gid)
        self.podman("import", "-q", str(own), name).check()

    def sh(self, image: str, script: str, *opts: str, name: str | None = None) -> Result:
        """``podman run`` of ``sh -c script`` (kept after exit when named, else removed)."""
        keep = ["--name", name] if name else ["--rm"]
        return self.podman("run", *keep, *opts, image, "sh", "-c", script)

    def rm(self, name: str) -> Result:
        """``podman rm -f``, tried again for a few seconds: right after a container with its
        own user namespace exits, its /dev/shm mount may still be busy ("unlinkat .../shm:
        device or resource busy") while podman's cleanup process finishes."""
        for _ in range(20):
            done = self.podman("rm", "-f", "-t", "0", name)
            if done.ok or "resource busy" not in done.stderr:
                break
            time.sleep(0.25)
        return done

    # -- teardown ---------------------------------------------------------------------------

    def processes(self) -> list[int]:
        """PIDs of processes whose command line names this engine's directory (mount
        programs, conmon, the rootless pause process has its pid file here)."""
        out = []
        needle = str(self.base).encode()
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) == os.getpid():
                continue
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if needle in f.read():
                        out.append(int(entry))
            except OSError:
                continue
        pause = self.xdg / "libpod" / "tmp" / "pause.pid"
        with contextlib.suppress(OSError, ValueError):
            out.append(int(pause.read_text().strip()))
        return sorted(pid for pid in set(out) if alive(pid))

    def mounts(self) -> list[str]:
        """Mount points under this engine's directory, deepest first."""
        found = []
        with open("/proc/self/mounts") as f:
            for line in f:
                mnt = line.split()[1].encode().decode("unicode_escape")
                if mnt == str(self.base) or mnt.startswith(str(self.base) + "/"):
                    found.append(mnt)
        return sorted(set(found), key=len, reverse=True)

    def teardown(self) -> list[str]:
        """Remove every container and image, reset the storage, stop what podman started for
        this engine and unmount what is left. Returns what had to be cleaned up by force
        (processes and mounts that outlived ``podman system reset``): empty when clean."""
        self.podman("rm", "-af", "-t", "0", timeout=60)
        self.podman("rmi", "-af", timeout=60)
        self.podman("system", "reset", "-f", timeout=60)
        leftovers: list[str] = []
        for pid in self.processes():
            leftovers.append(f"process {pid}: {_cmdline(pid)}")
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for mnt in self.mounts():
            leftovers.append(f"mount {mnt}")
            subprocess.run(["umount", "-l", mnt], capture_output=True, check=False)
        return leftovers


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")[:200]
    except OSError:
        return "?"


@contextlib.contextmanager
def fuse_for_users() -> Iterator[None]:
    """/dev/fuse readable and writable by every user for the block (the rootless mount
    program opens it inside podman's user namespace), its mode restored afterwards. The
    pytest fixture of tests/mount/test_unprivileged.py does the same for tests."""
    mode = os.stat("/dev/fuse").st_mode & 0o777
    os.chmod("/dev/fuse", 0o666)
    try:
        yield
    finally:
        os.chmod("/dev/fuse", mode)
