"""What the filesystem tells whoever serves it, instead of calling up into it.

The filesystem never imports the adapter. Where the adapter must learn something -- the
attributes it may have cached for a node are no longer true, or the kernel's own cache of
them is stale -- the filesystem emits an event here and the adapter subscribes at start-up.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable


class Events:
    """Subscriptions to the two kinds of event, each a list of callbacks given a node id."""

    __slots__ = ("_stale", "_kernel_stale")

    def __init__(self) -> None:
        self._stale: list[Callable[[int], None]] = []
        self._kernel_stale: list[Callable[[int], Awaitable[None]]] = []

    def on_stale(self, fn: Callable[[int], None]) -> None:
        """Call ``fn(node_id)`` when what was shown of the node may no longer be true (it
        moved to the upper, changed, or the kernel forgot it): drop any cached reply."""
        self._stale.append(fn)

    def on_kernel_stale(self, fn: Callable[[int], Awaitable[None]]) -> None:
        """Await ``fn(node_id)`` when the kernel's cached attributes of the node are wrong
        (a copy-up broke a lower hard link, a write cleared set-gid)."""
        self._kernel_stale.append(fn)

    def stale(self, ino: int) -> None:
        for fn in self._stale:
            fn(ino)

    async def kernel_stale(self, ino: int) -> None:
        for fn in self._kernel_stale:
            await fn(ino)
