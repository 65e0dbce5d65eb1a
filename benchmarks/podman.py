"""The podman workloads of issue 14: builds, diff, commit and ``run --rm`` in private storage.

Runs only when asked for (``--workloads podman``) and podman is installed.  Each backend gets
its own storage (``--root``/``--runroot``, its own ``storage.conf``, ``containers.conf`` and
``registries.conf`` through the ``CONTAINERS_*`` variables: runtime runc, cgroupfs, no network,
no events, libpod's state in the same private directory) with the overlay driver and
``mount_program`` set to fuse-overlayfs or unionfs; ``kernel`` is podman's native overlay
(no mount program), as a reference.  Nothing is pulled: the base image is ``podman import`` of
a generated root filesystem (busybox-static, and the host's dpkg, dpkg-deb, dpkg-split and
GNU tar with their libraries), and the packages are .deb files built here with
``dpkg-deb --build``, so no network and no registry is touched.

Workloads (the harness interleaves the backends, one timed command per sample):

* ``podman_build_seed``: like the seed Dockerfile (FROM debian, apt-get install emacs-nox,
  apt-get install apache2): ``COPY`` the .debs, ``RUN dpkg -i`` a big package, then ``RUN
  dpkg -i`` a second one together with an upgrade of the first (files renamed over files of
  the previous layer), ``--no-cache``;
* ``podman_build_steps``: a Dockerfile of many ``RUN`` steps (64, quick: 8), ``--no-cache``;
* ``podman_diff`` / ``podman_commit``: of a container that ran ``dpkg -i`` of both packages;
* ``podman_run``: ``podman run --rm BASE true``.

Images built or committed by a sample are removed after it, untimed.
"""

from __future__ import annotations

import os
import random
import resource
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.backends import Backend, lazy_unmount, mountpoints
from benchmarks.fixtures import Scale

PODMAN = shutil.which("podman") or "/usr/bin/podman"
BASE = "localhost/bench-base:latest"
HOST_TOOLS = ("/usr/bin/dpkg", "/usr/bin/dpkg-deb", "/usr/bin/dpkg-split", "/usr/bin/tar")
BUSYBOX = "/bin/busybox"
TIMEOUT = 1800.0


def unavailable() -> str | None:
    """Why the podman workloads cannot run here, or None."""
    if os.geteuid() != 0:
        return "needs root"
    for tool in (PODMAN, BUSYBOX, "/usr/bin/dpkg-deb", "/usr/bin/runc", *HOST_TOOLS):
        if not os.access(tool, os.X_OK):
            return f"{tool} not installed"
    return None


def sizes(scale: Scale) -> dict[str, int]:
    """Package and Dockerfile sizes: the seed's two packages, the many-step build."""
    if scale.name == "full":
        return {"pkg_a": 3000, "pkg_b": 1500, "steps": 64}
    if scale.name == "tiny":
        return {"pkg_a": 20, "pkg_b": 10, "steps": 2}
    return {"pkg_a": 300, "pkg_b": 200, "steps": 8}


def default_ulimits() -> list[str]:
    """nofile/nproc within this process's hard limits (runc fails above them)."""
    out = []
    for name, res in (("nofile", resource.RLIMIT_NOFILE), ("nproc", resource.RLIMIT_NPROC)):
        _soft, hard = resource.getrlimit(res)
        top = 4096 if hard == resource.RLIM_INFINITY else min(hard, 4096)
        out.append(f'"{name}={top}:{top}"')
    return out


def _libs(binaries: list[str]) -> list[str]:
    out = subprocess.run(["ldd", *binaries], capture_output=True, text=True, check=True).stdout
    libs = {line.split("=>")[1].split()[0] for line in out.splitlines() if "=> /" in line}
    return sorted(libs)


def make_rootfs(root: Path) -> None:
    """A minimal root: busybox applets, and dpkg with GNU tar (what ``dpkg -i`` needs)."""
    for d in ("bin", "usr/bin", "sbin", "etc", "tmp", "root", "lib64", "var/lib/dpkg/info"):
        (root / d).mkdir(parents=True, exist_ok=True)
    (root / "var/lib/dpkg/updates").mkdir()
    os.chmod(root / "tmp", 0o1777)
    shutil.copy2(BUSYBOX, root / "bin/busybox")
    applets = subprocess.run([BUSYBOX, "--list"], capture_output=True, text=True, check=True)
    for name in applets.stdout.split():
        if name not in ("busybox", "dpkg", "dpkg-deb", "tar") and "/" not in name:
            os.symlink("busybox", root / "bin" / name)
    for tool in HOST_TOOLS:
        shutil.copy2(tool, root / tool.lstrip("/"))
    for lib in _libs(list(HOST_TOOLS)) + ["/lib64/ld-linux-x86-64.so.2"]:
        real = os.path.realpath(lib)
        dest = root / lib.lstrip("/")
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(real, dest)
    os.symlink("/bin/true", root / "sbin/ldconfig")
    for name in ("status", "available"):
        (root / "var/lib/dpkg" / name).write_bytes(b"")
    (root / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (root / "etc/group").write_text("root:x:0:\n")


def make_deb(work: Path, out: Path, name: str, version: str, files: int, seed: int) -> None:
    """A .deb of ``files`` files (0-16 KiB) under /usr, spread as a real package's are."""
    rng = random.Random(seed)
    pkg = work / f"{name}-{version}"
    (pkg / "DEBIAN").mkdir(parents=True)
    dirs = [f"usr/share/{name}/d{i:03d}" for i in range(max(1, files // 40))]
    dirs += [f"usr/lib/{name}", f"usr/share/doc/{name}"]
    for d in dirs:
        (pkg / d).mkdir(parents=True)
    payload = rng.randbytes(16384)
    for i in range(files):
        (pkg / rng.choice(dirs) / f"f{i:05d}").write_bytes(payload[: rng.randrange(0, 16384)])
    (pkg / "DEBIAN/control").write_text(
        f"Package: {name}\nVersion: {version}\nArchitecture: all\n"
        "Maintainer: bench <bench@localhost>\nDescription: generated benchmark package\n"
    )
    subprocess.run(
        ["dpkg-deb", "-Zgzip", "-z1", "--root-owner-group", "--build", str(pkg), str(out)],
        capture_output=True,
        check=True,
    )
    shutil.rmtree(pkg)


def make_context(ctx: Path, scale: Scale) -> None:
    """Root filesystem tarball, .debs, the two Dockerfiles."""
    n = sizes(scale)
    rootfs = ctx / "rootfs"
    make_rootfs(rootfs)
    subprocess.run(["tar", "-C", str(rootfs), "-cf", str(ctx / "rootfs.tar"), "."], check=True)
    shutil.rmtree(rootfs)
    debs = ctx / "debs"
    debs.mkdir()
    make_deb(ctx, debs / "bench-a_1.0_all.deb", "bench-a", "1.0", n["pkg_a"], 1)
    make_deb(ctx, debs / "bench-a_2.0_all.deb", "bench-a", "2.0", n["pkg_a"], 2)
    make_deb(ctx, debs / "bench-b_1.0_all.deb", "bench-b", "1.0", n["pkg_b"], 3)
    (ctx / "Dockerfile.seed").write_text(
        f"FROM {BASE}\n"
        "COPY debs /tmp/debs\n"
        "RUN dpkg -i /tmp/debs/bench-a_1.0_all.deb\n"
        "RUN dpkg -i /tmp/debs/bench-b_1.0_all.deb /tmp/debs/bench-a_2.0_all.deb\n"
    )
    steps = "".join(f"RUN echo {i} > /var/step{i:03d}\n" for i in range(n["steps"]))
    (ctx / "Dockerfile.steps").write_text(f"FROM {BASE}\n{steps}")
    (ctx / ".containerignore").write_text("rootfs.tar\nDockerfile.*\n")


class Store:
    """One backend's private podman storage and configuration."""

    def __init__(self, base: Path, short: Path, backend: Backend) -> None:
        self.base, self.short = base, short
        self.root, self.tmp = base / "root", base / "tmp"
        self.runroot = short / "runroot"  # podman refuses a runroot longer than 50 characters
        for d in (self.root, self.runroot, self.tmp, base / "libpod", base / "networks"):
            d.mkdir(parents=True, exist_ok=True)
        program = "" if backend.name == "kernel" else getattr(backend, "binary", "")
        self.program = program
        overlay = f'mount_program = "{program}"\n' if program else ""
        (base / "storage.conf").write_text(
            '[storage]\ndriver = "overlay"\n'
            f'graphroot = "{self.root}"\nrunroot = "{self.runroot}"\n'
            f'[storage.options.overlay]\n{overlay}mountopt = "nodev"\n'
        )
        ulimits = ", ".join(default_ulimits())
        (base / "containers.conf").write_text(
            f'[containers]\nnetns = "none"\ndefault_ulimits = [{ulimits}]\n'
            '[engine]\nruntime = "runc"\ncgroup_manager = "cgroupfs"\n'
            f'events_logger = "none"\ntmp_dir = "{base / "libpod"}"\nlock_type = "file"\n'
            f'volume_path = "{base / "volumes"}"\n'
            f'[network]\nnetwork_config_dir = "{base / "networks"}"\n'
        )
        (base / "registries.conf").write_text("unqualified-search-registries = []\n")
        self.env = {
            **(backend.env or os.environ),  # unionfs: which mount server (if any) it uses
            "CONTAINERS_STORAGE_CONF": str(base / "storage.conf"),
            "CONTAINERS_CONF": str(base / "containers.conf"),
            "CONTAINERS_REGISTRIES_CONF": str(base / "registries.conf"),
            "TMPDIR": str(self.tmp),
        }
        # Storage only through storage.conf: podman 4.3 given --root/--runroot drops the
        # driver options of storage.conf, mount_program included, and silently falls back to
        # fuse-overlayfs from $PATH.
        self.argv = [PODMAN]
        self.serial = 0

    def podman(self, *args: str, timeout: float = TIMEOUT, check: bool = True) -> str:
        """Run one podman command in this storage; stdout."""
        proc = subprocess.run(
            [*self.argv, *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check and proc.returncode != 0:
            tail = " | ".join(proc.stderr.strip().splitlines()[-3:])
            raise RuntimeError(f"podman {args[0]} exited {proc.returncode}: {tail}")
        return proc.stdout

    def timed(self, *args: str) -> float:
        """Seconds one podman command takes."""
        t0 = time.perf_counter()
        self.podman(*args)
        return time.perf_counter() - t0

    def cleanup(self) -> None:
        """Remove containers and images, unmount what podman left, delete the storage."""
        for args in (("rm", "-af", "-t", "0"), ("rmi", "-af")):
            try:
                self.podman(*args, timeout=300, check=False)
            except (OSError, subprocess.SubprocessError):
                pass
        prefixes = (str(self.base) + "/", str(self.short) + "/")
        live = [m for m in mountpoints() if m.startswith(prefixes)]
        for m in sorted(live, key=len, reverse=True):
            lazy_unmount(m)
        shutil.rmtree(self.base, ignore_errors=True)
        shutil.rmtree(self.short, ignore_errors=True)
        shutil.rmtree(self.short, ignore_errors=True)


class PodmanSuite:
    """Build context once, one :class:`Store` per backend (prepared on first use)."""

    def __init__(self, base: Path, scale: Scale, log: Callable[[str], None]) -> None:
        why = unavailable()
        if why:
            raise RuntimeError(f"podman workloads skipped: {why}")
        self.base, self.scale, self.log = base, scale, log
        self.ctx = base / "context"
        self.stores: dict[str, Store] = {}
        self.failed: dict[str, str] = {}
        # runroots under a short private directory of /run (podman's limit is 50 characters)
        self.short = Path(tempfile.mkdtemp(prefix="ubench-", dir="/run"))
        log("preparing the podman build context ...")
        self.ctx.mkdir(parents=True)
        make_context(self.ctx, scale)

    def store(self, b: Backend) -> Store:
        """The backend's storage: base image imported, a container with the packages installed."""
        if b.name in self.failed:
            raise RuntimeError(self.failed[b.name])
        if b.name not in self.stores:
            st = Store(self.base / b.name, self.short / b.name, b)
            self.stores[b.name] = st
            self.log(f"podman storage for {b.name}: import base image, install container ...")
            try:
                info = st.podman("info", "--format", "{{json .Store.GraphOptions}}")
                if st.program and st.program not in info:
                    raise RuntimeError(f"podman does not use {st.program}: {info.strip()}")
                st.podman("import", "--change", "CMD=/bin/sh", str(self.ctx / "rootfs.tar"), BASE)
                debs = [f"/debs/{d}" for d in ("bench-a_1.0_all.deb", "bench-b_1.0_all.deb")]
                st.podman(
                    "run", "--name", "bench-installed", "--network", "none",
                    "-v", f"{self.ctx / 'debs'}:/debs:ro", BASE, "dpkg", "-i", *debs,
                )  # fmt: skip
            except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
                self.failed[b.name] = f"storage set-up failed: {exc}"
                raise RuntimeError(self.failed[b.name]) from exc
        return self.stores[b.name]

    def sample(self, b: Backend, key: str) -> dict[str, Any]:
        """One timed podman command for workload ``key``."""
        st = self.store(b)
        st.serial += 1
        common = ("--pull=never", "--network=none", "--no-cache", "--layers")
        if key in ("podman_build_seed", "podman_build_steps"):
            tag = f"localhost/bench-{key[13:]}:{st.serial}"
            dockerfile = str(self.ctx / f"Dockerfile.{key[13:]}")
            seconds = st.timed("build", *common, "-q", "-t", tag, "-f", dockerfile, str(self.ctx))
            st.podman("rmi", tag)
            st.podman("image", "prune", "-f")
        elif key == "podman_diff":
            seconds = st.timed("diff", "bench-installed")
        elif key == "podman_commit":
            tag = f"localhost/bench-commit:{st.serial}"
            seconds = st.timed("commit", "-q", "bench-installed", tag)
            st.podman("rmi", tag)
        elif key == "podman_run":
            seconds = st.timed("run", "--rm", "--network", "none", BASE, "true")
        else:
            raise ValueError(f"unknown podman workload {key}")
        return {"value": seconds, "ops": 1}

    def cleanup(self) -> None:
        """Every store cleaned, the context removed; never raises."""
        for st in self.stores.values():
            try:
                st.cleanup()
            except OSError as exc:
                self.log(f"warning: podman cleanup: {exc}")
        shutil.rmtree(self.base, ignore_errors=True)
        shutil.rmtree(self.short, ignore_errors=True)
