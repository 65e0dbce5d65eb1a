"""A one-line progress bar on stderr for exports and imports that take more than a moment.

The bar is drawn only when enabled (by default: when the stream is a TTY) and only once the
work has run for :data:`DELAY` seconds, so quick commands print nothing extra.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

DELAY = 0.5
_REDRAW = 0.1
_WIDTH = 30


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


class Progress:
    """Counts bytes of work done out of ``total`` (0 when unknown) and draws a bar.

    ``enabled=None`` draws when ``stream`` is a TTY; True forces it, False silences it.
    Use :meth:`advance` as work completes and :meth:`close` at the end (also a context manager).
    """

    def __init__(
        self,
        label: str,
        total: int = 0,
        *,
        enabled: bool | None = None,
        stream: TextIO | None = None,
    ) -> None:
        self.label = label
        self.total = total
        self.done = 0
        self._stream = stream if stream is not None else sys.stderr
        if enabled is None:
            enabled = self._stream.isatty()
        self._enabled = enabled
        self._start = time.monotonic()
        self._last_draw = 0.0
        self._drawn = False

    def advance(self, n: int) -> None:
        """Record ``n`` more bytes done and redraw when due."""
        self.done += n
        if not self._enabled:
            return
        now = time.monotonic()
        if now - self._start < DELAY or now - self._last_draw < _REDRAW:
            return
        self._last_draw = now
        self._draw()

    def _draw(self) -> None:
        if self.total > 0:
            fraction = min(self.done / self.total, 1.0)
            filled = int(fraction * _WIDTH)
            bar = "#" * filled + "-" * (_WIDTH - filled)
            text = f"{self.label} [{bar}] {fraction * 100:5.1f}% {_human(self.done)}"
        else:
            text = f"{self.label} {_human(self.done)}"
        self._stream.write("\r" + text + "\x1b[K")
        self._stream.flush()
        self._drawn = True

    def close(self) -> None:
        """Finish the bar (draw the final state and end the line) if it was ever shown."""
        if self._drawn:
            self._draw()
            self._stream.write("\n")
            self._stream.flush()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
