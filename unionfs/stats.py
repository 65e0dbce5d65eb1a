"""Live counters of one mount, readable through the mount and by ``unionfs stats``."""

from __future__ import annotations

import collections
import time
from typing import Any


class Stats:
    """Counters kept by the daemon. Plain integers: updating them costs next to nothing."""

    def __init__(self, nlayers: int) -> None:
        self.started = time.time()
        self.lookups_per_layer = [0] * nlayers
        self.negative_lookups = 0
        self.dirs_indexed = 0
        self.copy_ups = 0
        self.copy_up_bytes = 0
        self.copy_up_seconds = 0.0
        self.whiteouts_created = 0
        self.opaque_dirs_created = 0
        self.requests: collections.Counter[str] = collections.Counter()
        self.events: collections.deque[dict[str, Any]] = collections.deque(maxlen=10000)
        self.event_seq = 0

    def count_lookup(self, layer: int) -> None:
        self.lookups_per_layer[layer] += 1

    def event(self, kind: str, **fields: Any) -> None:
        """Record a copy-up or whiteout for ``unionfs stats --follow``."""
        self.event_seq += 1
        self.events.append({"seq": self.event_seq, "time": time.time(), "event": kind, **fields})

    def snapshot(self) -> dict[str, Any]:
        return {
            "uptime_seconds": round(time.time() - self.started, 3),
            "copy_ups": self.copy_ups,
            "copy_up_bytes": self.copy_up_bytes,
            "copy_up_seconds": round(self.copy_up_seconds, 6),
            "whiteouts_created": self.whiteouts_created,
            "opaque_dirs_created": self.opaque_dirs_created,
            "lookups_per_layer": {str(i): n for i, n in enumerate(self.lookups_per_layer) if n},
            "negative_lookups": self.negative_lookups,
            "dirs_indexed": self.dirs_indexed,
            "requests": dict(self.requests),
            "last_event": self.event_seq,
        }
