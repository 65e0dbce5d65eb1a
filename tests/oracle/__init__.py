"""Differential-testing oracle for unionfs: layer generators, tree snapshots, mount backends.

* :mod:`tests.oracle.layergen` -- deterministic layer-stack generator and the flatten reference.
* :mod:`tests.oracle.tree` -- snapshots of merged trees and upper dirs, and readable diffs.
* :mod:`tests.oracle.backends` -- kernel overlayfs, fuse-overlayfs and unionfs mounters.
* :mod:`tests.oracle.ops` -- the write-operation model applied to two mounts side by side.

See ``docs/testing.md`` for how the pieces fit together.
"""
