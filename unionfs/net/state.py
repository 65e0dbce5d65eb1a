"""The run directory: one lock, container records and IPAM leases.

Layout under ``UNIONFS_RUN_DIR``::

    lock                    flock(2)-ed exclusively around every change below
    containers/NAME.json    one record per container (see :class:`Record`)
    containers/NAME.log     stdout/stderr of a detached container
    leases/BRIDGE.json      {"subnet": ..., "leases": {"10.203.0.2": "NAME"}}

Records are written atomically (temporary file + rename), so a crash leaves either the old or the
new record, never half of one.  ``unionfs net gc`` reconciles records with what exists.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from unionfs.net.config import NetConfig
from unionfs.net.portspec import PortMapping

log = logging.getLogger(__name__)


@dataclass
class Record:
    """Everything the helper made for one container, enough to remove it after a crash.

    ``network`` is ``bridge``, ``host``, ``none`` or ``container:NAME``.  ``netns`` is the
    bind-mounted namespace file this container owns (None for host and container: modes);
    ``netns_path`` the namespace it runs in (owned or joined).  ``pid``/``pid_start`` identify the
    container's init, ``supervisor``/``supervisor_start`` the process that cleans up after it;
    the start times (from /proc/PID/stat) guard against signalling a recycled PID.
    """

    name: str
    id: str
    network: str
    rootfs: str
    command: list[str]
    hostname: str
    bridge: str | None = None
    ip: str | None = None
    veth: str | None = None
    netns: str | None = None
    netns_path: str | None = None
    ports: list[dict[str, object]] = field(default_factory=list)
    links: list[str] = field(default_factory=list)
    status: str = "creating"
    pid: int | None = None
    pid_start: int | None = None
    supervisor: int | None = None
    supervisor_start: int | None = None
    detached: bool = False
    created: float = 0.0

    @property
    def port_mappings(self) -> list[PortMapping]:
        return [PortMapping.from_json(p) for p in self.ports]


def process_start_time(pid: int) -> int | None:
    """The start time of ``pid`` in clock ticks, or None if no such process (or a zombie)."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw[raw.rindex(")") + 2 :].split()
    if fields[0] in ("Z", "X"):
        return None
    return int(fields[19])


def is_alive(pid: int | None, start: int | None) -> bool:
    """True if ``pid`` is a live process that started at ``start``."""
    return pid is not None and start is not None and process_start_time(pid) == start


class RunDir:
    """Access to the run directory; mutate only while holding :meth:`locked`."""

    def __init__(self, config: NetConfig) -> None:
        self.config = config
        self.root = config.run_dir
        self.containers = self.root / "containers"
        self.leases_dir = self.root / "leases"

    def ensure(self) -> None:
        """Create the directories (mode 0700)."""
        for d in (self.root, self.containers, self.leases_dir):
            d.mkdir(mode=0o700, parents=True, exist_ok=True)

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the run directory's exclusive lock for the duration of the block."""
        self.ensure()
        fd = os.open(self.root / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def record_path(self, name: str) -> Path:
        return self.containers / f"{name}.json"

    def log_path(self, name: str) -> Path:
        return self.containers / f"{name}.log"

    def load(self, name: str) -> Record | None:
        """The record of container ``name``, or None."""
        try:
            data = json.loads(self.record_path(name).read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            log.warning("ignoring unreadable record %s: %s", name, exc)
            return None
        return Record(**data)

    def records(self) -> list[Record]:
        """All records, sorted by creation time."""
        if not self.containers.is_dir():
            return []
        found = []
        for path in self.containers.glob("*.json"):
            rec = self.load(path.stem)
            if rec is not None:
                found.append(rec)
        return sorted(found, key=lambda r: r.created)

    def save(self, record: Record) -> None:
        """Write ``record`` atomically."""
        self.ensure()
        path = self.record_path(record.name)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(record), indent=1))
        os.replace(tmp, path)

    def delete(self, name: str) -> None:
        """Remove the record of ``name`` and its log, if any."""
        for path in (self.record_path(name), self.log_path(name)):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    def leases_path(self) -> Path:
        return self.leases_dir / f"{self.config.bridge}.json"

    def read_leases(self) -> dict[str, str]:
        """Address -> container name for the configured bridge."""
        try:
            data = json.loads(self.leases_path().read_text())
        except FileNotFoundError:
            return {}
        leases = data.get("leases", {})
        return {str(k): str(v) for k, v in leases.items()}

    def write_leases(self, leases: dict[str, str]) -> None:
        """Replace the leases atomically; an empty table removes the file."""
        path = self.leases_path()
        if not leases:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            return
        self.ensure()
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"subnet": str(self.config.subnet), "leases": leases}, indent=1))
        os.replace(tmp, path)
