"""Docker's changeset model over overlayfs layer directories.

* :mod:`.changes` -- ``unionfs diff``: the A/C/D change list of an upper against its lowers;
* :mod:`.export` -- ``unionfs export``: an upper as a deterministic OCI image-spec layer tarball;
* :mod:`.importer` -- ``unionfs import``: an OCI layer tarball unpacked into a new lower;
* :mod:`.tarsafety` -- member-name validation and fd-relative path resolution for import;
* :mod:`.layerscan` -- how one directory of a layer reads (entries, whiteouts, opaque);
* :mod:`.progress` -- a stderr progress bar;
* :mod:`.cli` -- the argument parsing for the three commands.

The on-disk whiteout and opaque forms are defined in :mod:`unionfs.format`; the format and
the mapping to OCI tar members are described in ``docs/layers.md``.
"""
