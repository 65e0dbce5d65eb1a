"""The default seccomp filter of ``unionfs run``: a deny list in classic BPF.

Docker's default profile is an allow list of about 350 system calls; this is the converse,
smaller to audit: every system call is allowed except those Docker's profile refuses to a
container without the matching capability.  Denied calls fail with EPERM, as in Docker.

* The architecture field is checked first: only native x86_64 calls are examined.  A 32-bit
  (``int 0x80``, AUDIT_ARCH_I386) or x32 (number | 0x40000000) call kills the process, since
  its numbers mean other calls and a deny list for one table is no filter for the other.
* Always denied: the kernel keyring (``keyctl``, ``add_key``, ``request_key``, not
  namespaced), ``io_uring_*`` (its operations bypass this filter), swap, obsolete calls.
* Denied unless the container holds the capability that makes them useful (as Docker's profile
  does): mount and the new mount API, ``unshare``, ``setns``, ``pivot_root``, ``clone`` with a
  namespace flag (checked in the flags argument; ``clone3`` passes its flags in memory a filter
  cannot read, so it fails with ENOSYS and the C library falls back to ``clone``), ``bpf``,
  ``perf_event_open``, modules, ``reboot``/``kexec``, clock setting, ``acct``, ``iopl``/``ioperm``,
  ``syslog``, ``open_by_handle_at``/``name_to_handle_at``, ``kcmp``, ``userfaultfd``,
  ``lookup_dcookie``, ``quotactl``, ``fanotify_init``.
* ``ioctl`` TIOCSTI and TIOCLINUX are refused: the command shares the caller's terminal, and
  TIOCSTI would let it type commands into the shell that started it.
* ``mknod``/``mknodat``: Docker lets CAP_MKNOD through and relies on the device cgroup to make
  a created node useless; we have no device cgroup, so a block device node is always refused,
  and a character device only for the numbers Docker's device cgroup allows (null, zero, full,
  random, urandom, tty, console, ptmx, pts/N, net/tun).  Regular files, FIFOs and sockets pass.
"""

from __future__ import annotations

import errno
import os
import struct
from dataclasses import dataclass

from unionfs.errors import UnionfsError

AUDIT_ARCH_X86_64 = 0xC000003E
X32_SYSCALL_BIT = 0x40000000

# Classic BPF opcodes (linux/filter.h) and seccomp return values (linux/seccomp.h).
_LD_W_ABS = 0x20
_ALU_AND_K = 0x54
_JMP_JA = 0x05
_JMP_JEQ_K = 0x15
_JMP_JGE_K = 0x35
_JMP_JSET_K = 0x45
_RET_K = 0x06
RET_KILL_PROCESS = 0x80000000
RET_ERRNO = 0x00050000
RET_ALLOW = 0x7FFF0000

# Offsets in struct seccomp_data: nr, arch, instruction pointer, then six 64-bit arguments;
# the low 32 bits of argument i are at 16 + 8*i on a little-endian machine.
_OFF_NR = 0
_OFF_ARCH = 4


def _arg_low(i: int) -> int:
    return 16 + 8 * i


X86_64 = {
    "ioctl": 16,
    "clone": 56,
    "syslog": 103,
    "mknod": 133,
    "uselib": 134,
    "ustat": 136,
    "sysfs": 139,
    "vhangup": 153,
    "pivot_root": 155,
    "_sysctl": 156,
    "acct": 163,
    "settimeofday": 164,
    "mount": 165,
    "umount2": 166,
    "swapon": 167,
    "swapoff": 168,
    "reboot": 169,
    "iopl": 172,
    "ioperm": 173,
    "create_module": 174,
    "init_module": 175,
    "delete_module": 176,
    "get_kernel_syms": 177,
    "query_module": 178,
    "quotactl": 179,
    "nfsservctl": 180,
    "lookup_dcookie": 212,
    "clock_settime": 227,
    "kexec_load": 246,
    "add_key": 248,
    "request_key": 249,
    "keyctl": 250,
    "mknodat": 259,
    "unshare": 272,
    "perf_event_open": 298,
    "fanotify_init": 300,
    "name_to_handle_at": 303,
    "open_by_handle_at": 304,
    "setns": 308,
    "kcmp": 312,
    "finit_module": 313,
    "kexec_file_load": 320,
    "bpf": 321,
    "userfaultfd": 323,
    "io_uring_setup": 425,
    "io_uring_enter": 426,
    "io_uring_register": 427,
    "open_tree": 428,
    "move_mount": 429,
    "fsopen": 430,
    "fsconfig": 431,
    "fsmount": 432,
    "fspick": 433,
    "clone3": 435,
    "mount_setattr": 442,
    "quotactl_fd": 443,
    "open_tree_attr": 467,
}
"""System call numbers on x86_64 (asm/unistd_64.h) of every call the filter looks at."""

ALWAYS_DENIED = (
    "keyctl",
    "add_key",
    "request_key",
    "io_uring_setup",
    "io_uring_enter",
    "io_uring_register",
    "swapon",
    "swapoff",
    "create_module",
    "get_kernel_syms",
    "query_module",
    "nfsservctl",
    "_sysctl",
    "uselib",
    "ustat",
    "sysfs",
)

DENIED_WITHOUT = {
    "SYS_ADMIN": (
        "mount",
        "umount2",
        "open_tree",
        "open_tree_attr",
        "move_mount",
        "fsopen",
        "fsconfig",
        "fsmount",
        "fspick",
        "mount_setattr",
        "unshare",
        "setns",
        "pivot_root",
        "quotactl",
        "quotactl_fd",
        "lookup_dcookie",
        "fanotify_init",
        "name_to_handle_at",
        "bpf",
        "perf_event_open",
    ),
    "BPF": ("bpf",),
    "PERFMON": ("perf_event_open",),
    "SYS_MODULE": ("init_module", "finit_module", "delete_module"),
    "SYS_BOOT": ("reboot", "kexec_load", "kexec_file_load"),
    "SYS_TIME": ("settimeofday", "clock_settime"),
    "SYS_PACCT": ("acct",),
    "SYS_RAWIO": ("iopl", "ioperm"),
    "SYSLOG": ("syslog",),
    "DAC_READ_SEARCH": ("open_by_handle_at", "name_to_handle_at"),
    "SYS_PTRACE": ("kcmp", "userfaultfd"),
    "SYS_TTY_CONFIG": ("vhangup",),
}
"""Calls allowed only when one of the capabilities naming them is kept (as in Docker)."""

NAMESPACE_CLONE_FLAGS = 0x7E020000
"""CLONE_NEWNS|NEWCGROUP|NEWUTS|NEWIPC|NEWUSER|NEWPID|NEWNET: refused in clone's flags."""

TIOCSTI, TIOCLINUX = 0x5412, 0x541C
S_IFMT, S_IFBLK, S_IFCHR = 0o170000, 0o060000, 0o020000
ALLOWED_CHAR_DEVICES = ((1, 3), (1, 5), (1, 7), (1, 8), (1, 9), (5, 0), (5, 1), (5, 2), (10, 200))
PTS_MAJOR = 136


def _encode_dev(major: int, minor: int) -> int:
    """The kernel's ``new_encode_dev``: how the 32-bit ``dev`` argument of mknod is read."""
    return (minor & 0xFF) | (major << 8) | ((minor & ~0xFF) << 12)


@dataclass(frozen=True)
class _Insn:
    code: int
    k: int = 0
    jt: str | int = 0
    jf: str | int = 0
    label: str | None = None


def _assemble(program: list[_Insn]) -> bytes:
    """Resolve label jumps (forward only, as BPF requires) and pack ``struct sock_filter``."""
    where = {insn.label: i for i, insn in enumerate(program) if insn.label}
    out = bytearray()
    for i, insn in enumerate(program):

        def offset(target: str | int, i: int = i) -> int:
            if isinstance(target, int):
                return target
            delta = where[target] - i - 1
            assert delta >= 0, f"backward jump to {target}"
            return delta

        k = insn.k
        jt, jf = offset(insn.jt), offset(insn.jf)
        if insn.code == _JMP_JA:
            k, jt, jf = jt, 0, 0
        assert jt < 256 and jf < 256, "jump too far for classic BPF"
        out += struct.pack("<HBBI", insn.code, jt, jf, k)
    return bytes(out)


def supported() -> bool:
    """True if the default filter exists for this machine's architecture."""
    return os.uname().machine == "x86_64"


def build(capabilities: frozenset[str]) -> bytes:
    """The filter program for a container that keeps ``capabilities`` (see the module doc)."""
    if not supported():
        raise UnionfsError(
            f"no default seccomp filter for {os.uname().machine}: "
            "use --security-opt seccomp=unconfined"
        )
    nr = X86_64
    denied = set(ALWAYS_DENIED)
    allowed: set[str] = set()
    for cap, calls in DENIED_WITHOUT.items():
        (allowed if cap in capabilities else denied).update(calls)
    denied -= allowed
    perm = RET_ERRNO | errno.EPERM
    p: list[_Insn] = [
        _Insn(_LD_W_ABS, _OFF_ARCH),
        _Insn(_JMP_JEQ_K, AUDIT_ARCH_X86_64, jt=1),
        _Insn(_RET_K, RET_KILL_PROCESS),
        _Insn(_LD_W_ABS, _OFF_NR),
        _Insn(_JMP_JGE_K, X32_SYSCALL_BIT, jt="kill"),
    ]
    p += [_Insn(_JMP_JEQ_K, nr[name], jt="deny") for name in sorted(denied)]
    if "SYS_ADMIN" not in capabilities:
        p.append(_Insn(_JMP_JEQ_K, nr["clone"], jt="clone"))
        p.append(_Insn(_JMP_JEQ_K, nr["clone3"], jt="enosys"))
    p.append(_Insn(_JMP_JEQ_K, nr["ioctl"], jt="ioctl"))
    p.append(_Insn(_JMP_JEQ_K, nr["mknod"], jt="mknod"))
    p.append(_Insn(_JMP_JEQ_K, nr["mknodat"], jt="mknodat"))
    p.append(_Insn(_RET_K, RET_ALLOW, label="allow"))
    # Jumps must go forward, so the targets are repeated after each check that needs them.
    p.append(_Insn(_RET_K, perm, label="deny"))
    p.append(_Insn(_RET_K, RET_KILL_PROCESS, label="kill"))
    p.append(_Insn(_RET_K, RET_ERRNO | errno.ENOSYS, label="enosys"))
    p.append(_Insn(_LD_W_ABS, _arg_low(0), label="clone"))
    p.append(_Insn(_JMP_JSET_K, NAMESPACE_CLONE_FLAGS, jt=1))
    p.append(_Insn(_RET_K, RET_ALLOW))
    p.append(_Insn(_RET_K, perm))
    # The request argument is an unsigned int to the kernel: its low 32 bits are all it reads.
    p.append(_Insn(_LD_W_ABS, _arg_low(1), label="ioctl"))
    p.append(_Insn(_JMP_JEQ_K, TIOCSTI, jt=2))
    p.append(_Insn(_JMP_JEQ_K, TIOCLINUX, jt=1))
    p.append(_Insn(_RET_K, RET_ALLOW))
    p.append(_Insn(_RET_K, perm))
    for name, mode_arg in (("mknod", 1), ("mknodat", 2)):
        p += _mknod_check(name, mode_arg, perm)
    return _assemble(p)


def _mknod_check(label: str, mode_arg: int, perm: int) -> list[_Insn]:
    """Refuse a block device, and a character device not in :data:`ALLOWED_CHAR_DEVICES`."""
    ok, no = f"{label}-ok", f"{label}-no"
    code = [
        _Insn(_LD_W_ABS, _arg_low(mode_arg), label=label),
        _Insn(_ALU_AND_K, S_IFMT),
        _Insn(_JMP_JEQ_K, S_IFBLK, jt=no),
        _Insn(_JMP_JEQ_K, S_IFCHR, jf=ok),
        _Insn(_LD_W_ABS, _arg_low(mode_arg + 1)),
    ]
    code += [_Insn(_JMP_JEQ_K, _encode_dev(a, b), jt=ok) for a, b in ALLOWED_CHAR_DEVICES]
    code += [
        _Insn(_ALU_AND_K, 0xFFF00),
        _Insn(_JMP_JEQ_K, PTS_MAJOR << 8, jt=ok),
        _Insn(_RET_K, perm, label=no),
        _Insn(_RET_K, RET_ALLOW, label=ok),
    ]
    return code
