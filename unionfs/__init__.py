"""unionfs: a userspace union filesystem in the on-disk format of Linux overlayfs."""

__version__ = "0.1.0"
