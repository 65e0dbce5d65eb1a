"""The network helper: run a process in a root filesystem with Docker-style networking.

Modules, one job each:

* :mod:`config`   -- where state lives and which bridge/subnet/table to use (environment overrides)
* :mod:`syscalls` -- ctypes wrappers for unshare, setns, mount, umount2, pivot_root, sethostname
* :mod:`portspec` -- parsing ``-p [IP:][HOST:]CTR[/proto]`` into :class:`PortMapping` values
* :mod:`state`    -- the run directory: one lock, container records, IPAM leases
* :mod:`ipam`     -- address allocation inside the bridge subnet
* :mod:`links`    -- bridge, veth pairs and network namespaces through pyroute2
* :mod:`nft`      -- the helper's own nftables table, rebuilt and replaced in one transaction
* :mod:`etcfiles` -- the container's hosts, resolv.conf and hostname, written into the rootfs
* :mod:`process`  -- forking the container: new mount, UTS, IPC and PID namespaces, pivot_root
* :mod:`lifecycle` -- create, start, remove and garbage-collect containers
* :mod:`cli`      -- argument parsing for ``run, ps, rm, port, network, net``

The user documentation is ``docs/network.md``.
"""
