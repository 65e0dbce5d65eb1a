"""The layer stack: one descriptor per layer root, and the inode-number space they share.

Layer 0 is the upper when the mount has one; the lowers follow top to bottom. Every layer
root is a descriptor opened once, when the layer set was validated
(:class:`unionfs.config.OpenedDir`): the daemon never resolves a layer's path again, so a
parent directory renamed away and replaced by a symlink after the mount changes nothing.
2,000 layers cost 2,000 descriptors, which the raised ``RLIMIT_NOFILE`` leaves room for.

Inode numbers follow the kernel's ``xino`` idea: the high 16 bits name the filesystem a layer
object lives on (numbered in layer order, so the same layer list gives the same numbers after
a remount), the low 48 bits are the object's own inode number. Objects whose number does not
fit get a number from a private range, stable for the life of the mount.
"""

from __future__ import annotations

import os

from unionfs.fdops import open_dir_at

INO_BITS = 48
INO_MASK = (1 << INO_BITS) - 1
SYNTHETIC_FSID = 0xFFFF  # numbers handed out when a real one cannot be used


class Layer:
    """One layer directory: its path (for messages only), position and root descriptor."""

    __slots__ = ("index", "path", "is_upper", "fsid", "root_fd")

    def __init__(self, index: int, path: str, is_upper: bool, fsid: int, root_fd: int) -> None:
        self.index = index
        self.path = path
        self.is_upper = is_upper
        self.fsid = fsid
        self.root_fd = root_fd

    def close(self) -> None:
        if self.root_fd >= 0:
            os.close(self.root_fd)
            self.root_fd = -1

    def __repr__(self) -> str:
        kind = "upper" if self.is_upper else "lower"
        return f"<Layer {self.index} {kind} {self.path}>"


def _take_root(path: str) -> tuple[int, int]:
    """The root descriptor of a layer and its device: the one opened at validation when
    ``path`` carries it (an :class:`~unionfs.config.OpenedDir`), else opened now, without
    following a symlink in the last component (a configuration that was never validated,
    as unit tests build)."""
    take = getattr(path, "take", None)
    fd = take() if take is not None else open_dir_at(-1, path)
    return fd, os.fstat(fd).st_dev


class LayerStack:
    """The ordered layers of one mount and the inode-number mapping over them.

    Takes ownership of the root descriptors carried by validated paths; :meth:`close`
    closes them.
    """

    def __init__(self, lowers: list[str], upper: str | None) -> None:
        paths: list[tuple[str, bool]] = []
        if upper is not None:
            paths.append((upper, True))
        paths.extend((p, False) for p in lowers)
        fsids: dict[int, int] = {}
        self.layers: list[Layer] = []
        try:
            for i, (path, is_upper) in enumerate(paths):
                fd, dev = _take_root(path)
                fsid = fsids.setdefault(dev, len(fsids) + 1)
                self.layers.append(Layer(i, str(path), is_upper, fsid, fd))
        except BaseException:
            self.close()
            raise
        self.fsid_of_dev = fsids
        self.has_upper = upper is not None
        self._synthetic: dict[tuple[int, int], int] = {}
        self._next_synthetic = 1

    def __len__(self) -> int:
        return len(self.layers)

    def __getitem__(self, index: int) -> Layer:
        return self.layers[index]

    def natural_ino(self, st_dev: int, st_ino: int) -> int:
        """The inode number unionfs shows for the layer object (``st_dev``, ``st_ino``)."""
        fsid = self.fsid_of_dev.get(st_dev)
        if fsid is not None and st_ino <= INO_MASK and fsid < SYNTHETIC_FSID:
            return (fsid << INO_BITS) | st_ino
        return self.synthetic_ino(st_dev, st_ino)

    def synthetic_ino(self, st_dev: int, st_ino: int) -> int:
        """A number from the private range, the same each time for the same object key: for
        an object whose own number does not fit in 48 bits, or whose filesystem has no
        number of its own left."""
        key = (st_dev, st_ino)
        ino = self._synthetic.get(key)
        if ino is None:
            ino = (SYNTHETIC_FSID << INO_BITS) | self._next_synthetic
            self._next_synthetic += 1
            self._synthetic[key] = ino
        return ino

    def close(self) -> None:
        for layer in self.layers:
            layer.close()
