"""Changes through a descriptor whose name went away, checked against the kernel's overlay.

A descriptor opened before its name was unlinked (or its directory removed) can still be
given to fchmod, fchown, futimens, ftruncate, the f*xattr calls, or reopened through
``/proc/self/fd``. On the kernel's overlay a change to a lower object copies it up to its
old name: a regular file's copy is linked in from an ``O_TMPFILE``, which fails on the
whiteout (EEXIST), so a deleted name never comes back; a fifo, a device or a symlink is
renamed in from the workdir over the whiteout, so it does come back. unionfs once copied the
regular file over the whiteout too (the name came back, or a new file of that name was
replaced), refused every change to an unlinked upper fifo or device (ESTALE), and sent the
xattr calls of an unlinked upper object to whatever held its name now.

Each case runs the same operations, in a child process with the caller's umask and uid, on a
unionfs mount and on a kernel overlay mount of a copy of the same layer, and compares what
each call returned (or its errno), the descriptor's fstat, the merged listing of the directory
and the upper layer (whiteouts included). The kernel's answers are also spelled out, so a
change in the kernel shows here. Two cases differ on purpose (README "Semantics"): the kernel
replaces a new object holding the name with the copy of the deleted one; unionfs never does.
"""

from __future__ import annotations

import ctypes
import errno
import os
import pickle
import stat
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import Union, write
from tests.mount.test_oci_fallback import no_mknod  # noqa: F401 (a fixture)
from tests.oracle.backends import KernelOverlay, copy_tree

pytestmark = [pytest.mark.mount, pytest.mark.kernel]

USER = 4242  # a caller that is not root and owns nothing it is not given
FILE_TIMES = (1_000_000_000, 2_000_000_000)  # atime, mtime of every lower object
SET_TIMES = (5_000_000_000, 6_000_000_000)  # what futimens/utimensat set
NB = os.O_RDONLY | os.O_NONBLOCK  # opens a fifo without a writer
PATH = os.O_PATH | os.O_NOFOLLOW  # the only way to hold a symlink

_libc = ctypes.CDLL(None, use_errno=True)
AT_EMPTY_PATH = 0x1000


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


def _check(rc: int) -> None:
    if rc < 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


def fchownat_empty(fd: int, uid: int, gid: int) -> None:
    """chown of the object ``fd`` holds, an ``O_PATH`` descriptor too (no follow)."""
    _check(_libc.fchownat(fd, b"", uid, gid, AT_EMPTY_PATH))


def utimensat_empty(fd: int) -> None:
    """utimes (:data:`SET_TIMES`) of the object ``fd`` holds, an ``O_PATH`` one too."""
    ts = (_Timespec * 2)(*(_Timespec(t // 10**9, t % 10**9) for t in SET_TIMES))
    _check(_libc.utimensat(fd, b"", ts, AT_EMPTY_PATH))


def errname(exc: OSError) -> str:
    return errno.errorcode.get(exc.errno or 0, str(exc.errno))


def call(f: Callable[..., object], *args: object, **kwargs: object) -> object:
    """``f``'s result ("ok" for None), or the name of its errno."""
    try:
        r = f(*args, **kwargs)
    except OSError as exc:
        return errname(exc)
    return "ok" if r is None else r


def shown(st: os.stat_result) -> tuple[object, ...]:
    """What is compared of a stat: type, permissions, owner, size, links, and the mtime when
    it is one of the fixed ones (else the clock, which differs between the two mounts)."""
    mtime: object = st.st_mtime_ns
    if mtime not in (FILE_TIMES[1], SET_TIMES[1]):
        mtime = "now"
    return (
        stat.S_IFMT(st.st_mode),
        oct(stat.S_IMODE(st.st_mode)),
        st.st_uid,
        st.st_gid,
        st.st_size if not stat.S_ISDIR(st.st_mode) else "-",
        st.st_nlink,
        mtime,
    )


def fstat_of(fd: int) -> object:
    try:
        return shown(os.fstat(fd))
    except OSError as exc:
        return errname(exc)


def listing(d: Path) -> object:
    """The merged directory ``d`` as ``ls -l`` shows it (contents of regular files too)."""
    try:
        names = sorted(os.listdir(d))
    except OSError as exc:
        return errname(exc)
    out = []
    for n in names:
        st = os.lstat(d / n)
        data = (d / n).read_bytes() if stat.S_ISREG(st.st_mode) else None
        out.append((n, shown(st), data))
    return out


def upper_tree(upper: Path) -> list[tuple[object, ...]]:
    """Every object of the upper layer: path, type, permissions, owner, device number (a
    whiteout is a char device 0/0)."""
    out = []
    for root, dirs, files in os.walk(upper):
        for n in dirs + files:
            p = os.path.join(root, n)
            st = os.lstat(p)
            out.append(
                (
                    os.path.relpath(p, upper),
                    stat.S_IFMT(st.st_mode),
                    oct(stat.S_IMODE(st.st_mode)),
                    st.st_uid,
                    st.st_gid,
                    st.st_rdev,
                )
            )
    return sorted(out)


Scenario = Callable[[Path], list[object]]


def in_child(mnt: Path, scenario: Scenario, umask: int, uid: int | None) -> list[object]:
    """Run ``scenario`` on ``mnt`` in a forked child with ``umask`` and, when given, the uid
    and gid ``uid`` (no supplementary groups). The child works in the mountpoint by relative
    paths, as another user cannot walk the test's private temporary directories."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 0
        try:
            os.close(r)
            os.chdir(mnt)
            os.umask(umask)
            if uid is not None:
                os.setgroups([])
                os.setresgid(uid, uid, uid)
                os.setresuid(uid, uid, uid)
            try:
                result: object = scenario(Path("."))
            except BaseException as exc:  # reported to the parent, which fails the test
                result = RuntimeError(f"{type(exc).__name__}: {exc}")
            with os.fdopen(w, "wb") as f:
                pickle.dump(result, f)
        except BaseException:
            code = 1
        finally:
            os._exit(code)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        data = f.read()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0 and data, "the scenario's child failed"
    result = pickle.loads(data)
    if isinstance(result, RuntimeError):
        raise result
    return result


Run = Callable[..., tuple[dict[str, object], dict[str, object]]]


@pytest.fixture
def twins(union: Callable[[int], Union], tmp_path: Path) -> Iterator[Run]:
    """``run(build, scenario, umask=0o022, uid=None)``: the layer ``build`` fills, mounted
    by unionfs (with ``dev``, as the kernel's overlay is) and, as a copy, by the kernel; the
    scenario runs on each; returns (ours, the kernel's), each with what the scenario
    returned, the listing of ``d`` and the upper layer."""
    if os.geteuid() != 0:
        pytest.skip("needs root (kernel overlay mounts, another uid)")
    count = 0

    def run(
        build: Callable[[Path], None],
        scenario: Scenario,
        umask: int = 0o022,
        uid: int | None = None,
    ) -> tuple[dict[str, object], dict[str, object]]:
        nonlocal count
        count += 1
        u = union(1)
        build(u.lowers[0])
        kroot = tmp_path / f"kernel{count}"
        kroot.mkdir()
        copy_tree(u.lowers[0], kroot / "l0")
        (kroot / "upper").mkdir()
        (kroot / "work").mkdir()
        results = []
        for mount, upper in (
            (lambda: u.mount("dev"), u.upper),
            (
                lambda: KernelOverlay().mount(
                    [kroot / "l0"], kroot / "upper", kroot / "work", kroot / "m"
                ),
                kroot / "upper",
            ),
        ):
            with mount() as mnt:
                m = Path(mnt)
                ops = in_child(m, scenario, umask, uid)
                results.append({"ops": ops, "d": listing(m / "d"), "upper": upper_tree(upper)})
        return results[0], results[1]

    yield run


def layer(lower: Path, owner: int = 0) -> None:
    """The lower layer every case starts from: ``d`` (writable by all) holding a file ``f``
    with an xattr, a file ``g`` with a second name ``h``, a fifo ``p``, a char device ``c``
    (1,3), a symlink ``s``, and an empty directory ``e``; ``owner`` owns the file ``f``, the
    fifo and the device."""
    d = lower / "d"
    write(d / "f", "hello", mode=0o644)
    os.setxattr(d / "f", b"user.a", b"lower")
    write(d / "g", "hello", mode=0o644)
    os.link(d / "g", d / "h")
    os.mkfifo(d / "p", 0o644)
    os.mknod(d / "c", stat.S_IFCHR | 0o644, os.makedev(1, 3))
    os.symlink("f", d / "s")
    (d / "e").mkdir()
    for p in (d / "f", d / "p", d / "c"):
        os.chown(p, owner, owner)
    for p in (d / "f", d / "g", d / "p", d / "c", d / "e"):
        os.utime(p, ns=FILE_TIMES)
    os.utime(d / "s", ns=FILE_TIMES, follow_symlinks=False)
    os.chmod(d, 0o777)


def held(name: str, flags: int, *ops: Callable[[int, Path], object]) -> Scenario:
    """Open ``d/name`` with ``flags``, unlink it, then run ``ops`` on the descriptor (each
    op's result recorded), then its fstat."""

    def scenario(m: Path) -> list[object]:
        fd = os.open(m / "d" / name, flags)
        try:
            os.unlink(m / "d" / name)
            return [*(op(fd, m) for op in ops), fstat_of(fd)]
        finally:
            os.close(fd)

    return scenario


def fchmod(mode: int) -> Callable[[int, Path], object]:
    return lambda fd, m: call(os.fchmod, fd, mode)


def fchown(uid: int, gid: int) -> Callable[[int, Path], object]:
    return lambda fd, m: call(os.fchown, fd, uid, gid)


def futimens(fd: int, m: Path) -> object:
    return call(os.utime, fd, ns=SET_TIMES)


def says(result: dict[str, object], *expected: object) -> None:
    """The first results of a scenario's calls on one mount (the kernel's, mostly, to pin
    its behaviour; the last entry, the fstat, is compared between the mounts)."""
    ops = result["ops"]
    assert isinstance(ops, list)
    assert ops[: len(expected)] == list(expected)


# -- a lower regular file: its deleted name never comes back -----------------------------------

LOWER_FILE_CASES = {
    "fchmod": ((fchmod(0o600),), "EEXIST"),
    "fchown": ((fchown(1, 2),), "EEXIST"),
    "fchown-nothing": ((fchown(-1, -1),), "EEXIST"),
    "futimens": ((futimens,), "EEXIST"),
    "futimens-now": ((lambda fd, m: call(os.utime, fd),), "EEXIST"),
    "fsetxattr": ((lambda fd, m: call(os.setxattr, fd, b"user.b", b"1"),), "EEXIST"),
    "fsetxattr-replace": (
        (lambda fd, m: call(os.setxattr, fd, b"user.a", b"2", os.XATTR_REPLACE),),
        "EEXIST",
    ),
    "fremovexattr": ((lambda fd, m: call(os.removexattr, fd, b"user.a"),), "EEXIST"),
    "fremovexattr-absent": ((lambda fd, m: call(os.removexattr, fd, b"user.zz"),), "ENODATA"),
    "fgetxattr": ((lambda fd, m: call(os.getxattr, fd, b"user.a"),), b"lower"),
    "ftruncate-readonly": ((lambda fd, m: call(os.ftruncate, fd, 1),), "EINVAL"),
    "write-readonly": ((lambda fd, m: call(os.write, fd, b"x"),), "EBADF"),
    "reopen-rdwr": (
        (lambda fd, m: call(lambda: os.close(os.open(f"/proc/self/fd/{fd}", os.O_RDWR))),),
        "EEXIST",
    ),
    "reopen-rdonly": (
        (lambda fd, m: call(lambda: os.close(os.open(f"/proc/self/fd/{fd}", os.O_RDONLY))),),
        "ok",
    ),
}


@pytest.mark.parametrize("case", sorted(LOWER_FILE_CASES))
def test_lower_file_name_stays_gone(twins: Run, case: str) -> None:
    """Each change through a read-only descriptor of an unlinked lower file: the kernel's
    errno (EEXIST for every one that copies up), and ``d/f`` stays gone (its whiteout stays in
    the upper)."""
    ops, expected = LOWER_FILE_CASES[case]
    ours, theirs = twins(layer, held("f", os.O_RDONLY, *ops))
    says(theirs, expected)
    assert ours == theirs
    assert "f" not in [e[0] for e in ours["d"]]  # type: ignore[union-attr]
    assert ("d/f", stat.S_IFCHR, "0o0", 0, 0, 0) in ours["upper"]  # type: ignore[operator]


def test_lower_file_held_by_o_path(twins: Run) -> None:
    """fchownat(AT_EMPTY_PATH) of an ``O_PATH`` descriptor (no open reaches the daemon):
    EEXIST, as by the kernel."""
    ours, theirs = twins(layer, held("f", PATH, lambda fd, m: call(fchownat_empty, fd, 1, 2)))
    says(theirs, "EEXIST")
    assert ours == theirs


def test_lower_file_never_replaces_a_new_file(twins: Run) -> None:
    """A new ``d/f`` made after the unlink: fchmod of the old descriptor is EEXIST and the
    new file keeps its data and mode (unionfs once renamed the copy over it)."""

    def new_file(fd: int, m: Path) -> object:
        write(m / "d" / "f", "new")
        return call(os.fchmod, fd, 0o600), (m / "d" / "f").read_bytes()

    ours, theirs = twins(layer, held("f", os.O_RDONLY, new_file), umask=0o027)
    says(theirs, ("EEXIST", b"new"))
    assert ours == theirs


def test_lower_hard_link_name(twins: Run) -> None:
    """One name of a lower hard link unlinked: EEXIST; the other name is untouched."""
    ours, theirs = twins(layer, held("g", os.O_RDONLY, fchmod(0o600), fchown(3, 3)))
    says(theirs, "EEXIST", "EEXIST")
    assert ours == theirs
    assert ("h", (stat.S_IFREG, "0o644", 0, 0, 5, 2, FILE_TIMES[1]), b"hello") in ours["d"]  # type: ignore[operator]


def _empty_and_remove_d(remake: bool) -> Callable[[int, Path], object]:
    def op(fd: int, m: Path) -> object:
        for n in os.listdir(m / "d"):
            if n == "e":
                os.rmdir(m / "d" / n)
            else:
                os.unlink(m / "d" / n)
        os.rmdir(m / "d")
        if remake:
            os.mkdir(m / "d")
        return call(os.fchmod, fd, 0o600)

    return op


@pytest.mark.parametrize("remake", [False, True], ids=["gone", "remade"])
@pytest.mark.parametrize("name,flags,kernel", [("f", os.O_RDONLY, "ENOENT"), ("p", NB, "EIO")])
def test_parent_removed(twins: Run, name: str, flags: int, kernel: str, remake: bool) -> None:
    """The object's directory removed too (and made again): the kernel's copy-up finds its
    upper parent gone (ENOENT for a regular file's link, EIO for the rename of a fifo), and
    nothing lands in a new ``d``."""
    ours, theirs = twins(layer, held(name, flags, _empty_and_remove_d(remake)))
    says(theirs, kernel)
    assert ours == theirs
    assert ours["d"] == ([] if remake else "ENOENT")


# -- a lower file opened for writing was copied up at open: every change works -----------------


@pytest.mark.parametrize(
    "case",
    ["ftruncate", "write", "fchmod", "fchown", "futimens", "fsetxattr"],
)
def test_lower_file_opened_for_writing(twins: Run, case: str) -> None:
    """An ``O_RDWR`` open copies a lower file up (the kernel's rule): changes through that
    descriptor after the unlink reach the copy (nlink 0), and nothing shows in ``d``."""
    ops = {
        "ftruncate": lambda fd, m: call(os.ftruncate, fd, 2),
        "write": lambda fd, m: call(os.pwrite, fd, b"XY", 3),
        "fchmod": fchmod(0o600),
        "fchown": fchown(7, 8),
        "futimens": futimens,
        "fsetxattr": lambda fd, m: (
            call(os.setxattr, fd, b"user.b", b"1"),
            call(os.getxattr, fd, b"user.b"),
            call(os.getxattr, fd, b"user.a"),
        ),
    }
    ours, theirs = twins(layer, held("f", os.O_RDWR, ops[case]))
    assert ours == theirs
    assert theirs["ops"][0] in ("ok", 2, ("ok", b"1", b"lower"))  # type: ignore[index]
    assert theirs["ops"][-1][5] == 0  # type: ignore[index]
    assert "f" not in [e[0] for e in ours["d"]]  # type: ignore[union-attr]


# -- an upper object unlinked: its changes reach it, whatever its type -------------------------


def made(kind: str, name: str) -> Callable[[Path], None]:
    """Make ``d/name`` through the mount: a fifo, a char device (1,3), a symlink or a file."""

    def make(m: Path) -> None:
        p = m / "d" / name
        if kind == "fifo":
            os.mkfifo(p, 0o666)
        elif kind == "dev":
            os.mknod(p, stat.S_IFCHR | 0o666, os.makedev(1, 3))
        elif kind == "symlink":
            os.symlink("target", p)
        else:
            write(p, "upper")

    return make


def upper_held(kind: str, flags: int, *ops: Callable[[int, Path], object]) -> Scenario:
    inner = held("n", flags, *ops)

    def scenario(m: Path) -> list[object]:
        made(kind, "n")(m)
        return inner(m)

    return scenario


UPPER_CASES: dict[str, tuple[str, int, Callable[[int, Path], object], object]] = {
    "fifo-fchmod": ("fifo", NB, fchmod(0o640), "ok"),
    "fifo-fchown": ("fifo", NB, fchown(1, 2), "ok"),
    "fifo-futimens": ("fifo", NB, futimens, "ok"),
    "fifo-xattr": (
        "fifo",
        NB,
        lambda fd, m: (
            call(os.setxattr, fd, b"trusted.t", b"1"),
            call(os.getxattr, fd, b"trusted.t"),
            call(os.listxattr, fd),
        ),
        ("ok", b"1", ["trusted.t"]),
    ),
    "dev-fchmod": ("dev", os.O_RDONLY, fchmod(0o600), "ok"),
    "dev-futimens": ("dev", os.O_RDONLY, futimens, "ok"),
    "dev-o_path-fchown": ("dev", PATH, lambda fd, m: call(fchownat_empty, fd, 1, 2), "ok"),
    "symlink-o_path-fchown": (
        "symlink",
        PATH,
        lambda fd, m: call(fchownat_empty, fd, 1, 2),
        "ok",
    ),
    "symlink-o_path-utimes": ("symlink", PATH, lambda fd, m: call(utimensat_empty, fd), "ok"),
    "symlink-o_path-fchmod": ("symlink", PATH, fchmod(0o600), "EBADF"),
}


@pytest.mark.parametrize("umask", [0o022, 0o077], ids=["022", "077"])
@pytest.mark.parametrize("case", sorted(UPPER_CASES))
def test_upper_object_unlinked(twins: Run, case: str, umask: int) -> None:
    """A fifo, a device or a symlink made through the mount, held, unlinked, then changed:
    the change reaches the object (fstat shows it) as on the kernel, where unionfs said ESTALE
    (fchmod of an ``O_PATH`` descriptor is the VFS's EBADF on both)."""
    kind, flags, op, expected = UPPER_CASES[case]
    ours, theirs = twins(layer, upper_held(kind, flags, op), umask=umask)
    says(theirs, expected)
    assert ours == theirs
    assert "ESTALE" not in repr(ours["ops"])


def test_upper_xattrs_stay_with_the_object(twins: Run) -> None:
    """fget/fset/flist/fremovexattr of an unlinked upper file whose name now holds a new file
    act on the unlinked file; the new one keeps its own xattrs (unionfs once read and wrote
    the new file's, or the whiteout's)."""

    def op(fd: int, m: Path) -> object:
        write(m / "d" / "n", "new")
        os.setxattr(m / "d" / "n", b"user.a", b"new")
        return (
            call(os.getxattr, fd, b"user.a"),
            call(os.setxattr, fd, b"user.a", b"set"),
            call(os.getxattr, fd, b"user.a"),
            call(os.removexattr, fd, b"user.a"),
            call(os.listxattr, fd),
            os.getxattr(m / "d" / "n", b"user.a"),
        )

    def scenario(m: Path) -> list[object]:
        made("file", "n")(m)
        os.setxattr(m / "d" / "n", b"user.a", b"old")
        return held("n", os.O_RDONLY, op)(m)

    ours, theirs = twins(layer, scenario)
    says(theirs, (b"old", "ok", b"set", "ok", [], b"new"))
    assert ours == theirs


# -- a lower fifo, device or symlink comes back: the kernel's behaviour, kept ------------------


@pytest.mark.parametrize(
    "name,flags,op",
    [
        ("p", NB, fchmod(0o600)),
        ("c", os.O_RDONLY, fchmod(0o600)),
        ("s", PATH, lambda fd, m: call(fchownat_empty, fd, 1, 2)),
    ],
    ids=["fifo", "dev", "symlink"],
)
@pytest.mark.parametrize("umask", [0o022, 0o077], ids=["022", "077"])
def test_lower_special_file_is_copied_back(
    twins: Run, name: str, flags: int, op: Callable[[int, Path], object], umask: int
) -> None:
    """The kernel renames the copy of a lower fifo, device or symlink over its whiteout: the
    deleted name is back, with the change (and not the caller's umask). Pinned as the
    kernel's behaviour: unionfs does the same."""
    ours, theirs = twins(layer, held(name, flags, op), umask=umask)
    says(theirs, "ok")
    assert ours == theirs
    assert name in [e[0] for e in theirs["d"]]  # type: ignore[union-attr]


def test_lower_fifo_over_a_new_directory(twins: Run) -> None:
    """A new directory holds the fifo's name: EISDIR, as the kernel's rename."""

    def op(fd: int, m: Path) -> object:
        os.mkdir(m / "d" / "p")
        return call(os.fchmod, fd, 0o600)

    ours, theirs = twins(layer, held("p", NB, op))
    says(theirs, "EISDIR")
    assert ours == theirs


DIR_OPS: dict[str, Callable[[int, Path], object]] = {
    "fchmod": fchmod(0o700),
    "fchown": fchown(3, 3),
    "futimens": futimens,
    "fsetxattr": lambda fd, m: (
        call(os.setxattr, fd, b"user.y", b"1"),
        call(os.listxattr, fd),
    ),
    "flistxattr": lambda fd, m: call(os.listxattr, fd),
}


@pytest.mark.parametrize("case", sorted(DIR_OPS))
@pytest.mark.parametrize("where", ["upper", "lower"])
def test_directory_removed(twins: Run, where: str, case: str) -> None:
    """A directory held open and removed: an upper one (made through the mount) takes every
    change on itself; a lower one cannot be copied up onto its whiteout (ENOTDIR: the
    kernel renames a directory over a non-directory) and its whiteout stays."""

    def scenario(m: Path) -> list[object]:
        p = m / "d" / ("e" if where == "lower" else "nd")
        if where == "upper":
            os.mkdir(p)
        fd = os.open(p, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.rmdir(p)
            return [DIR_OPS[case](fd, m), fstat_of(fd)]
        finally:
            os.close(fd)

    def build(lower: Path) -> None:
        layer(lower)
        os.setxattr(lower / "d" / "e", b"user.x", b"1")

    ours, theirs = twins(build, scenario)
    expected = {
        ("upper", "fsetxattr"): ("ok", ["user.y"]),
        ("upper", "flistxattr"): [],
        ("lower", "fsetxattr"): ("ENOTDIR", ["user.x"]),
        ("lower", "flistxattr"): ["user.x"],
    }
    says(theirs, expected.get((where, case), "ok" if where == "upper" else "ENOTDIR"))
    assert ours == theirs


# -- deliberate differences: a new object holding the name is never replaced -------------------


def test_difference_lower_fifo_never_replaces_a_new_file(twins: Run) -> None:
    """The kernel renames the copy of an unlinked lower fifo over a new regular file of its
    name (the file's data is lost); unionfs refuses with EEXIST and keeps the file."""

    def op(fd: int, m: Path) -> object:
        write(m / "d" / "p", "new")
        return call(os.fchmod, fd, 0o600)

    ours, theirs = twins(layer, held("p", NB, op))
    says(theirs, "ok")
    assert ("d/p", stat.S_IFIFO, "0o600", 0, 0, 0) in theirs["upper"]  # type: ignore[operator]
    says(ours, "EEXIST")
    assert ("d/p", stat.S_IFREG, "0o644", 0, 0, 0) in ours["upper"]  # type: ignore[operator]
    assert ("p", (stat.S_IFREG, "0o644", 0, 0, 3, 1, "now"), b"new") in ours["d"]  # type: ignore[operator]


def test_difference_removed_directory_never_replaces_a_new_one(twins: Run) -> None:
    """The kernel renames the copy of a removed lower directory over a new empty directory of
    its name; unionfs refuses with EEXIST and the new directory stays (opaque, empty)."""

    def scenario(m: Path) -> list[object]:
        fd = os.open(m / "d" / "e", os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.rmdir(m / "d" / "e")
            os.mkdir(m / "d" / "e", 0o750)
            return [call(os.fchmod, fd, 0o700), fstat_of(fd)]
        finally:
            os.close(fd)

    ours, theirs = twins(layer, scenario)
    says(theirs, "ok")
    assert ("d/e", stat.S_IFDIR, "0o700", 0, 0, 0) in theirs["upper"]  # type: ignore[operator]
    says(ours, "EEXIST")
    assert ("d/e", stat.S_IFDIR, "0o750", 0, 0, 0) in ours["upper"]  # type: ignore[operator]


# -- another caller: permissions come first, then the same answers ------------------------------


def test_user_owner_of_lower_file(twins: Run) -> None:
    """The owner (not root) of an unlinked lower file: EEXIST for fchmod and futimens, and
    EPERM for a chown to another user (checked before any copy-up)."""
    ours, theirs = twins(
        lambda lower: layer(lower, owner=USER),
        held("f", os.O_RDONLY, fchmod(0o600), futimens, fchown(0, 0)),
        umask=0o077,
        uid=USER,
    )
    says(theirs, "EEXIST", "EEXIST", "EPERM")
    assert ours == theirs


def test_user_not_owner_of_lower_file(twins: Run) -> None:
    """Another user's unlinked lower file: EPERM for fchmod and futimens of given times,
    EACCES for a user xattr (before any copy-up), as by the kernel."""
    ours, theirs = twins(
        layer,
        held(
            "f",
            os.O_RDONLY,
            fchmod(0o600),
            futimens,
            lambda fd, m: call(os.setxattr, fd, b"user.b", b"1"),
        ),
        uid=USER,
    )
    says(theirs, "EPERM", "EPERM", "EACCES")
    assert ours == theirs


def test_user_upper_fifo(twins: Run) -> None:
    """A user's own fifo made through the mount with umask 077, unlinked: fchmod and a chown
    to its own ids work, a chown to root's group is EPERM."""
    ours, theirs = twins(
        layer,
        upper_held("fifo", NB, fchmod(0o604), fchown(USER, USER), fchown(-1, 0)),
        umask=0o077,
        uid=USER,
    )
    says(theirs, "ok", "ok", "EPERM")
    assert ours == theirs


def test_user_lower_fifo_is_copied_back(twins: Run) -> None:
    """A user's own lower fifo, unlinked and fchmod'ed by that user: back, as by the kernel."""
    ours, theirs = twins(
        lambda lower: layer(lower, owner=USER),
        held("p", NB, fchmod(0o600)),
        umask=0o077,
        uid=USER,
    )
    says(theirs, "ok")
    assert ours == theirs
    assert ("d/p", stat.S_IFIFO, "0o600", USER, USER, 0) in ours["upper"]  # type: ignore[operator]


# -- an upper that refuses mknod: .wh.<name> whiteouts, the same answers -----------------------


def plain_layer(lower: Path) -> None:
    """``d`` with the file ``f`` and the fifo ``p`` only: no device, which ``cp -a`` (the
    kernel's copy of the layer) could not make under the shim."""
    write(lower / "d" / "f", "hello", mode=0o644)
    os.mkfifo(lower / "d" / "p", 0o644)
    for p in (lower / "d" / "f", lower / "d" / "p"):
        os.utime(p, ns=FILE_TIMES)


@pytest.mark.usefixtures("no_mknod")
@pytest.mark.parametrize("name,flags,kernel", [("f", os.O_RDONLY, "EEXIST"), ("p", NB, "ok")])
def test_oci_whiteouts(twins: Run, name: str, flags: int, kernel: str) -> None:
    """With ``.wh.<name>`` whiteouts (the daemon cannot mknod a char device), the merged view
    and the answers are the kernel's: the regular file stays gone behind its marker; the fifo
    comes back and its marker goes."""
    ours, theirs = twins(plain_layer, held(name, flags, fchmod(0o600)))
    says(theirs, kernel)
    assert ours["ops"] == theirs["ops"]
    assert ours["d"] == theirs["d"]
    upper = [e[0] for e in ours["upper"]]  # type: ignore[union-attr]
    if name == "f":
        assert upper == ["d", "d/.wh.f"]
    else:
        assert upper == ["d", "d/p"]


# -- xattr_permissions: the owner and mode live in an xattr of the object ----------------------


def test_xattr_permissions_unlinked_file_shows_its_override(union: Callable[[int], Union]) -> None:
    """With ``xattr_permissions=2`` (no kernel twin: fuse-overlayfs's option), fstat of a held
    file shows the owner and mode recorded in its override xattr before and after its name
    goes, and fchmod/fchown through it are recorded on it, not on what holds the name now
    (fstat once fell back to the inode's own mode at the unlink)."""
    if os.geteuid() != 0:
        pytest.skip("needs root (chown to other users)")
    u = union(1)
    (u.lowers[0] / "d").mkdir()
    with u.mount("xattr_permissions=2") as mnt:
        p = Path(mnt) / "d" / "n"
        write(p, "held")
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fchmod(fd, 0o600)
            os.fchown(fd, 5, 6)
            before = shown(os.fstat(fd))
            os.unlink(p)
            write(p, "new")  # another object takes the name
            after = shown(os.fstat(fd))
            os.fchmod(fd, 0o640)
            os.fchown(fd, 7, 8)
            changed = shown(os.fstat(fd))
            new = shown(os.stat(p))
        finally:
            os.close(fd)
    assert before[1:4] == ("0o600", 5, 6)
    assert after[1:5] == before[1:5] and after[5] == 0
    assert changed[1:4] == ("0o640", 7, 8)
    assert new[1:4] == ("0o644", 0, 0)
