"""ctypes wrappers for the namespace and mount system calls Python 3.11 lacks.

Each wrapper raises :class:`OSError` with the C library's errno on failure. They bind their
calls on :data:`unionfs.fdops.libc`, the package's one ctypes handle of the C library.
"""

from __future__ import annotations

import ctypes
import os

from unionfs.fdops import libc as _libc

CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWCGROUP = 0x02000000

MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_REMOUNT = 0x20
MS_NOATIME = 0x400
MS_NODIRATIME = 0x800
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 0x40000
MS_RELATIME = 0x200000
MNT_DETACH = 0x2

_libc.mount.argtypes = [
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_ulong,
    ctypes.c_void_p,
]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_libc.unshare.argtypes = [ctypes.c_int]
_libc.setns.argtypes = [ctypes.c_int, ctypes.c_int]
_libc.sethostname.argtypes = [ctypes.c_char_p, ctypes.c_size_t]
_libc.syscall.restype = ctypes.c_long
_libc.prctl.argtypes = [
    ctypes.c_int,
    ctypes.c_ulong,
    ctypes.c_ulong,
    ctypes.c_ulong,
    ctypes.c_ulong,
]
_libc.capset.argtypes = [ctypes.c_void_p, ctypes.c_void_p]

PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
PR_SET_SECCOMP = 22
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4
SECCOMP_MODE_FILTER = 2
_LINUX_CAPABILITY_VERSION_3 = 0x20080522

_SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41}.get(os.uname().machine, 155)
# The new mount API has one number on every architecture (asm-generic and x86_64 agree).
_SYS_OPEN_TREE = 428
_SYS_MOVE_MOUNT = 429
OPEN_TREE_CLONE = 1
MOVE_MOUNT_F_EMPTY_PATH = 0x4


def _check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _b(value: str | None) -> bytes | None:
    return None if value is None else os.fsencode(value)


def unshare(flags: int) -> None:
    """Move the calling thread into new namespaces of the kinds in ``flags``."""
    _check(_libc.unshare(flags), "unshare")


def setns(fd: int, nstype: int) -> None:
    """Join the namespace the open file descriptor ``fd`` refers to."""
    _check(_libc.setns(fd, nstype), "setns")


def mount(
    source: str | None, target: str, fstype: str | None, flags: int, data: str | None
) -> None:
    """mount(2); ``data`` is the filesystem's option string or None."""
    opts = None if data is None else ctypes.c_char_p(data.encode())
    _check(_libc.mount(_b(source), _b(target), _b(fstype), flags, opts), f"mount {target}")


def umount2(target: str, flags: int) -> None:
    """umount2(2)."""
    _check(_libc.umount2(_b(target), flags), f"umount {target}")


def pivot_root(new_root: str, put_old: str) -> None:
    """pivot_root(2), which has no C library wrapper."""
    _check(
        _libc.syscall(_SYS_PIVOT_ROOT, _b(new_root), _b(put_old)),
        "pivot_root",
    )


def open_tree_clone(path: str) -> int:
    """open_tree(2) with OPEN_TREE_CLONE: a detached bind mount of ``path``, as a descriptor.

    The mount lives in no namespace until :func:`move_mount_to` attaches it, so it survives
    pivot_root and the detaching of the old root, unlike a plain descriptor's mount.
    """
    fd = _libc.syscall(
        _SYS_OPEN_TREE, -100, _b(path), ctypes.c_uint(OPEN_TREE_CLONE | os.O_CLOEXEC)
    )
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"open_tree {path}: {os.strerror(err)}")
    return int(fd)


def move_mount_to(mount_fd: int, target: str) -> None:
    """move_mount(2): attach the detached mount ``mount_fd`` at ``target``."""
    _check(
        _libc.syscall(
            _SYS_MOVE_MOUNT,
            mount_fd,
            b"",
            -100,
            _b(target),
            ctypes.c_uint(MOVE_MOUNT_F_EMPTY_PATH),
        ),
        f"move_mount {target}",
    )


def sethostname(name: str) -> None:
    """Set the hostname of the calling process's UTS namespace."""
    raw = name.encode()
    _check(_libc.sethostname(raw, len(raw)), "sethostname")


def prctl(option: int, arg2: int = 0, arg3: int = 0, arg4: int = 0, arg5: int = 0) -> None:
    """prctl(2) for the options that return 0 on success."""
    _check(_libc.prctl(option, arg2, arg3, arg4, arg5), f"prctl {option}")


def install_seccomp_filter(program: bytes) -> None:
    """Install the classic-BPF ``program`` (8-byte ``struct sock_filter`` entries).

    Needs no_new_privs or CAP_SYS_ADMIN; the filter is inherited across fork and execve.
    """

    class SockFprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

    buf = ctypes.create_string_buffer(program, len(program))
    prog = SockFprog(len(program) // 8, ctypes.cast(buf, ctypes.c_void_p))
    _check(
        _libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.addressof(prog), 0, 0),
        "install seccomp filter",
    )


def capset(effective: int, permitted: int, inheritable: int) -> None:
    """Set the calling thread's capability sets (64-bit masks, capability version 3)."""
    header = (ctypes.c_uint32 * 2)(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (ctypes.c_uint32 * 6)()
    for i, mask in enumerate((effective, permitted, inheritable)):
        data[i] = mask & 0xFFFFFFFF
        data[3 + i] = mask >> 32
    _check(_libc.capset(header, data), "capset")
