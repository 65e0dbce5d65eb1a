"""Mount backends: the kernel's overlayfs (the oracle), fuse-overlayfs (a stand-in), unionfs.

Every backend is used the same way::

    with backend.mount(lowers, upper, workdir, mnt):
        ...  # mnt is mounted here
    # always unmounted here (lazily if a plain unmount keeps failing)

``lowers`` are top first.  ``upper``/``workdir`` may be None for a read-only mount.

The backend under test is chosen with ``UNIONFS_DIFF_BACKEND`` (``unionfs``, the default;
``fuse-overlayfs``; or ``kernel`` to validate the machinery against the kernel itself).
Each backend carries ``known_gaps``: differences from the kernel that are documented for that
backend (a stand-in may have them, unionfs must not).  Tests narrow what they generate or check
by these gaps, and the write tests xfail for a backend with ``write-semantics``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from tests.oracle.tree import Snapshot

UNIONFS_BIN = os.environ.get(
    "UNIONFS_BIN", str(Path(__file__).resolve().parents[2] / ".venv" / "bin" / "unionfs")
)
MOUNT_TIMEOUT = 30.0

#: Gap names used in ``known_gaps`` (see docs/testing.md for what each one means).
GAPS = (
    "xattr-whiteout",  # does not read xattr whiteouts (overlay.opaque="x" dirs)
    "user-overlay-opaque",  # does not read user.overlay.opaque
    "inode-partition",  # st_ino equalities differ from the kernel
    "dino",  # readdir d_ino differs from st_ino
    "dir-rename",  # renames lower/merged directories instead of EXDEV
    "upper-format",  # writes a different upper-dir format (markers, xattrs)
    "write-semantics",  # per-operation results differ from the kernel
    "devices",  # mounts nodev: device nodes cannot be opened
    "nlink",  # reports nlink 1 for hard-linked lower files
    "symlink-loop",  # readdir fails over a lower symlink looping through a dir above it
    "lower-hardlink-copy-up",  # copy-up keeps, rather than breaks, a lower hard link
    "tmpfile",  # open(O_TMPFILE) is refused (the write generator then draws none)
    "falloc-collapse-insert",  # fallocate COLLAPSE_RANGE/INSERT_RANGE refused (FUSE module)
    "user-overlay-xattrs",  # user.overlay.* cannot be set through a trusted-mode mount
)


class MountError(RuntimeError):
    """A backend could not mount; the message carries the command's stderr."""


def is_mounted(mnt: str | Path) -> bool:
    """True when ``mnt`` is a mountpoint listed in /proc/self/mountinfo."""
    target = os.path.realpath(mnt)
    # Other mounts on the machine may have names that are not UTF-8.
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            fields = line.split()
            if len(fields) > 4 and _unescape(fields[4]) == target:
                return True
    return False


def _unescape(s: str) -> str:
    return (
        s.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace("\\134", "\\")
    )


def _check_name(p: str) -> str:
    if ":" in p or "," in p:
        raise ValueError(f"layer path {p!r} contains ':' or ','; use short plain names")
    return p


def _run(argv: Sequence[str], cwd: str | None = None, timeout: float = MOUNT_TIMEOUT) -> None:
    res = subprocess.run(
        list(argv), cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False
    )
    if res.returncode != 0:
        cmd = " ".join(argv)
        if len(cmd) > 300:
            cmd = cmd[:300] + "..."
        raise MountError(f"{cmd!r} exited {res.returncode}: {res.stderr.strip()}")


def force_unmount(mnt: str | Path, fuse: bool) -> None:
    """Unmount ``mnt``: plain unmount with retries, then lazily.  No error if not mounted."""
    mnt = os.fspath(mnt)
    for attempt in range(20):
        if not is_mounted(mnt):
            return
        argv = ["fusermount3", "-u", mnt] if fuse else ["umount", mnt]
        if subprocess.run(argv, capture_output=True, check=False).returncode == 0:
            return
        time.sleep(0.05 * (attempt + 1))
    argv = ["fusermount3", "-uz", mnt] if fuse else ["umount", "-l", mnt]
    subprocess.run(argv, capture_output=True, check=False)
    if is_mounted(mnt):
        subprocess.run(["umount", "-l", mnt], capture_output=True, check=False)


class Backend:
    """Base class: subclasses implement :meth:`_mount` and :meth:`_unmount`."""

    name = "base"
    fuse = False
    known_gaps: frozenset[str] = frozenset()
    max_layers = 100_000

    @contextlib.contextmanager
    def mount(
        self,
        lowers: Sequence[str | Path],
        upper: str | Path | None,
        workdir: str | Path | None,
        mnt: str | Path,
    ) -> Iterator[Path]:
        """Mount, yield the mountpoint, and always unmount afterwards."""
        lowers = [os.fspath(p) for p in lowers]
        up = os.fspath(upper) if upper is not None else None
        wd = os.fspath(workdir) if workdir is not None else None
        mnt = os.fspath(mnt)
        os.makedirs(mnt, exist_ok=True)
        try:
            self._mount(lowers, up, wd, mnt)
            if not is_mounted(mnt):
                raise MountError(f"{self.name}: {mnt} is not a mountpoint after mounting")
            yield Path(mnt)
        finally:
            self._unmount(mnt)

    def _mount(self, lowers: list[str], upper: str | None, workdir: str | None, mnt: str) -> None:
        raise NotImplementedError

    def _unmount(self, mnt: str) -> None:
        force_unmount(mnt, self.fuse)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name}>"


class KernelOverlay(Backend):
    """``mount -t overlay`` with the behaviour-defining options pinned.

    ``redirect_dir=off`` (directory rename gives EXDEV), ``index=off``, ``metacopy=off``,
    ``xino=off`` unless told otherwise.  When all lowers share one parent directory they are
    passed relative to it (the mount process runs there): the mount data is limited to one
    page, and ``0:1:...:499`` fits where 500 absolute paths would not.  The kernel needs at
    least two lowers when there is no upper.
    """

    name = "kernel"
    max_layers = 500

    def __init__(self, **options: str) -> None:
        self.options = {"redirect_dir": "off", "index": "off", "metacopy": "off", "xino": "off"}
        self.options.update(options)

    def _mount(self, lowers: list[str], upper: str | None, workdir: str | None, mnt: str) -> None:
        parents = {os.path.dirname(os.path.abspath(p)) for p in lowers}
        cwd = None
        if len(parents) == 1:
            cwd = parents.pop()
            names = [os.path.basename(os.path.abspath(p)) for p in lowers]
        else:
            names = [os.path.abspath(p) for p in lowers]
        opts = ["lowerdir=" + ":".join(_check_name(n) for n in names)]
        if upper is not None:
            assert workdir is not None, "an upper needs a workdir"
            opts.append("upperdir=" + _check_name(os.path.abspath(upper)))
            opts.append("workdir=" + _check_name(os.path.abspath(workdir)))
        opts += [f"{k}={v}" for k, v in self.options.items()]
        data = ",".join(opts)
        if len(data) >= 4096:
            raise MountError(f"kernel overlay mount data is {len(data)} bytes (limit 4095)")
        _run(["mount", "-t", "overlay", "overlay", "-o", data, os.path.abspath(mnt)], cwd=cwd)


class FuseCommand(Backend):
    """A FUSE backend started by a fuse-overlayfs-compatible command line."""

    fuse = True
    argv0 = "false"

    def _argv(
        self, lowers: list[str], upper: str | None, workdir: str | None, mnt: str
    ) -> list[str]:
        opts = ["lowerdir=" + ":".join(_check_name(os.path.abspath(p)) for p in lowers)]
        if upper is not None:
            assert workdir is not None, "an upper needs a workdir"
            opts.append("upperdir=" + _check_name(os.path.abspath(upper)))
            opts.append("workdir=" + _check_name(os.path.abspath(workdir)))
        return [self.argv0, "-o", ",".join(opts), os.path.abspath(mnt)]

    def _mount(self, lowers: list[str], upper: str | None, workdir: str | None, mnt: str) -> None:
        _run(self._argv(lowers, upper, workdir, mnt))
        deadline = time.monotonic() + MOUNT_TIMEOUT
        while not is_mounted(mnt):
            if time.monotonic() > deadline:
                raise MountError(f"{self.name}: {mnt} not mounted {MOUNT_TIMEOUT}s after start")
            time.sleep(0.01)


class FuseOverlayfs(FuseCommand):
    """fuse-overlayfs (the Debian package), a stand-in backend to validate the machinery."""

    name = "fuse-overlayfs"
    argv0 = "fuse-overlayfs"
    known_gaps = frozenset(
        {
            "xattr-whiteout",
            "inode-partition",
            "dir-rename",
            "upper-format",
            "write-semantics",
            "devices",
            "nlink",
            "symlink-loop",
            "dino",
        }
    )


class Unionfs(FuseCommand):
    """The project's filesystem, started by its fuse-overlayfs-compatible argv.

    Mount: ``unionfs -o lowerdir=L1:L2,upperdir=U,workdir=W MNT`` returning once the mount is
    ready (read-only without ``upperdir``).  Unmount: ``unionfs umount MNT``, falling back to
    ``fusermount3 -u`` and finally a lazy unmount.
    """

    name = "unionfs"
    argv0 = UNIONFS_BIN
    # The three decided differences (README "Semantics", docs/testing.md): no O_TMPFILE and
    # no collapse/insert-range fallocate through FUSE, and markers of both overlay xattr
    # namespaces are read, so user.overlay.* is not settable on a trusted-mode mount. Each
    # has its own regression case asserting the documented result.
    known_gaps: frozenset[str] = frozenset(
        {"tmpfile", "falloc-collapse-insert", "user-overlay-xattrs"}
    )

    def _argv(
        self, lowers: list[str], upper: str | None, workdir: str | None, mnt: str
    ) -> list[str]:
        # The daemon logs next to the mountpoint (``MNT.log``): tests read tracebacks there.
        # ``dev``: root's mounts are nodev by default (docs/security.md); the kernel's
        # overlay is dev, and the semantics compared here are the filesystem's.
        argv = super()._argv(lowers, upper, workdir, mnt)
        return [argv[0], "mount", "--log-file", log_path(mnt), argv[1], argv[2] + ",dev", argv[3]]

    def _unmount(self, mnt: str) -> None:
        if is_mounted(mnt):
            subprocess.run(
                [UNIONFS_BIN, "umount", mnt], capture_output=True, timeout=60, check=False
            )
        force_unmount(mnt, fuse=True)


def log_path(mnt: str | Path) -> str:
    """Where the unionfs backend's daemon logs for the mount at ``mnt``."""
    return os.path.abspath(os.fspath(mnt)) + ".log"


def daemon_tracebacks(mnt: str | Path) -> str:
    """The tracebacks (and the lines just before each) in the daemon log of ``mnt``, or ""."""
    try:
        text = Path(log_path(mnt)).read_text(errors="replace")
    except FileNotFoundError:
        return ""
    if "Traceback" not in text:
        return ""
    lines = text.splitlines()
    out: list[str] = []
    for i, line in enumerate(lines):
        if line.startswith("Traceback"):
            j = i + 1
            while j < len(lines) and (lines[j].startswith((" ", "\t")) or j == i + 1):
                j += 1
            out += lines[max(0, i - 2) : j + 1]
    return "\n".join(out)


BACKENDS: dict[str, type[Backend]] = {
    "unionfs": Unionfs,
    "fuse-overlayfs": FuseOverlayfs,
    "kernel": KernelOverlay,
}


def backend_from_env() -> Backend:
    """The backend named by ``UNIONFS_DIFF_BACKEND`` (default ``unionfs``)."""
    name = os.environ.get("UNIONFS_DIFF_BACKEND", "unionfs")
    if name not in BACKENDS:
        raise ValueError(f"UNIONFS_DIFF_BACKEND={name!r}: expected one of {sorted(BACKENDS)}")
    return BACKENDS[name]()


def probe(backend: Backend) -> str | None:
    """Try a tiny two-layer read-only mount; None if it works, else the reason it does not."""
    root = tempfile.mkdtemp(prefix="udp", dir="/tmp")
    try:
        for d in ("0", "1", "m"):
            os.mkdir(os.path.join(root, d))
        Path(root, "0", "f").write_text("top\n")
        Path(root, "1", "f").write_text("bottom\n")
        try:
            with backend.mount([f"{root}/0", f"{root}/1"], None, None, f"{root}/m") as m:
                if (m / "f").read_text() != "top\n":
                    return f"{backend.name}: probe mount shows the wrong content"
        except (MountError, OSError, subprocess.TimeoutExpired) as exc:
            return f"{backend.name} cannot mount yet: {exc}"
        return None
    finally:
        force_unmount(f"{root}/m", backend.fuse)
        shutil.rmtree(root, ignore_errors=True)


def own_dino_lines(be: Backend, snap: Snapshot) -> list[str]:
    """Lines for every path where readdir's d_ino differs from st_ino, for FUSE backends
    without the documented ``dino`` gap (the kernel itself is not held to this: it reports the
    upper's d_ino for merged subdirectories of a pre-populated upper)."""
    if not be.fuse or "dino" in be.known_gaps:
        return []
    return [
        f"{be.name}: d_ino {d} != st_ino {s} at {p}" for p, (d, s) in snap.dino_mismatch.items()
    ]


def long_run_examples(default: int) -> int:
    """``UNIONFS_DIFF_EXAMPLES`` if set (the long run), else ``default``."""
    return int(os.environ.get("UNIONFS_DIFF_EXAMPLES", default))


def copy_tree(src: str | Path, dst: str | Path) -> None:
    """``cp -a`` (keeps xattrs incl. trusted.*, devices, hard links, owners, modes)."""
    subprocess.run(["cp", "-a", os.fspath(src), os.fspath(dst)], check=True)
