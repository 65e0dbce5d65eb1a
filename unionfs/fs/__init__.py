"""The union filesystem over directory descriptors: no pyfuse3, no command-line errors.

:class:`unionfs.fs.union.Union` is the one facade the adapter (:mod:`unionfs.fuse_ops`) sees.
"""
