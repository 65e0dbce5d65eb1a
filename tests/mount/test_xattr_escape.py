"""``trusted.overlay.*`` xattrs set through the mount (issue 10): escaped as the kernel does.

The kernel (6.7+) stores a name of its own overlay namespace given through the mount as
``trusted.overlay.overlay.*`` (``user.overlay.overlay.*`` with ``userxattr``) and shows it back
unescaped; escaped names already in a lower layer show unescaped too. The same operations run
on unionfs and on the kernel's overlayfs over the same lower; the results, what each mount
shows, and what each upper stores must be the same.
"""

from __future__ import annotations

import errno
import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import Union, write

pytestmark = [pytest.mark.mount, pytest.mark.kernel]


def stored(path: Path) -> dict[str, bytes]:
    """Every xattr on ``path`` in every namespace (read on the layer, never followed)."""
    return {
        n: os.getxattr(path, n, follow_symlinks=False)
        for n in sorted(os.listxattr(path, follow_symlinks=False))
    }


def attempt(fn: Callable[[], object]) -> object:
    try:
        return fn()
    except OSError as exc:
        return errno.errorcode[exc.errno or 0]


def view(path: Path) -> object:
    """What a mount shows of ``path``: sorted listxattr and every value (or the errno)."""
    names = attempt(lambda: sorted(os.listxattr(path, follow_symlinks=False)))
    if not isinstance(names, list):
        return names
    return [(n, attempt(lambda n=n: os.getxattr(path, n, follow_symlinks=False))) for n in names]


class Twin:
    """unionfs and the kernel over one lower, each with its own upper."""

    def __init__(self, u: Union, k: Path, userxattr: bool) -> None:
        self.u, self.k, self.userxattr = u, k, userxattr

    def __enter__(self) -> tuple[Path, Path]:
        opts = ("userxattr",) if self.userxattr else ()
        self._ours = self.u.mount(*opts)
        ours = Path(self._ours.__enter__())
        data = (
            f"lowerdir={self.u.lowers[0]},upperdir={self.k / 'upper'},workdir={self.k / 'work'}"
            ",index=off,xino=off,metacopy=off"
        )
        # userxattr implies redirect_dir=nofollow and refuses an explicit redirect_dir=off.
        data += ",userxattr" if self.userxattr else ",redirect_dir=off"
        try:
            subprocess.run(
                ["mount", "-t", "overlay", "overlay", "-o", data, self.k / "mnt"], check=True
            )
        except BaseException:
            self._ours.__exit__(None, None, None)
            raise
        return ours, self.k / "mnt"

    def __exit__(self, *exc: object) -> None:
        try:
            subprocess.run(["umount", self.k / "mnt"], check=True)
        finally:
            self._ours.__exit__(None, None, None)


@pytest.fixture
def twin(union: Callable[[int], Union], tmp_path: Path) -> Iterator[Callable[[bool], Twin]]:
    u = union(1)
    lower = u.lowers[0]
    write(lower / "f", "f")
    write(lower / "g", "g")
    write(lower / "d" / "kept", "kept")
    write(lower / "low", "low")
    # What the kernel writes for trusted.overlay.low / user.overlay.low set through a mount.
    os.setxattr(lower / "low", "trusted.overlay.overlay.low", b"L")
    os.setxattr(lower / "low", "user.overlay.overlay.low", b"U")
    # Private, not escaped (no dot after the second "overlay"): hidden by the kernel.
    os.setxattr(lower / "low", "trusted.overlay.overlayfoo", b"P")
    os.setxattr(lower / "low", "trusted.overlay.overlay", b"P")
    k = tmp_path / "k"
    for sub in ("upper", "work", "mnt"):
        (k / sub).mkdir(parents=True)
    yield lambda userxattr=False: Twin(u, k, userxattr)


def script(m: Path, ns: str) -> list[object]:
    """The operations of one run, on mount ``m``; ``ns`` is the mount's own namespace."""
    out: list[object] = []
    x = f"{ns}.overlay."
    out.append(view(m / "low"))
    out.append(attempt(lambda: os.getxattr(m / "f", x + "nope")))
    out.append(attempt(lambda: os.removexattr(m / "g", x + "nope")))  # ENODATA, no copy-up
    out.append(attempt(lambda: os.setxattr(m / "f", x + "foo", b"bar")))
    out.append(attempt(lambda: os.getxattr(m / "f", x + "foo")))
    out.append(attempt(lambda: os.setxattr(m / "f", x + "overlay.nested", b"n")))
    out.append(attempt(lambda: os.setxattr(m / "d", x + "opaque", b"y")))
    out.append(attempt(lambda: os.setxattr(m / "f", x + "whiteout", b"y")))
    out.append(sorted(os.listdir(m / "d")))  # the escaped opaque makes nothing opaque
    out.append(attempt(lambda: os.setxattr(m / "f", x + "o" * (250 - len(x)), b"long")))
    out.append(view(m / "f"))
    out.append(view(m / "d"))
    out.append(attempt(lambda: os.removexattr(m / "f", x + "foo")))
    out.append(attempt(lambda: os.removexattr(m / "low", x + "low")))  # copy-up, then remove
    out.append(view(m / "f"))
    out.append(view(m / "low"))
    return out


@pytest.mark.parametrize("userxattr", [False, True], ids=["trusted", "userxattr"])
def test_overlay_xattrs_through_the_mount_match_the_kernel(twin, userxattr: bool) -> None:
    t = twin(userxattr)
    ns = "user" if userxattr else "trusted"
    with t as (ours, theirs):
        got = script(ours, ns)
        want = script(theirs, ns)
    assert got == want
    assert got[3] is None  # the set succeeded (unionfs used to refuse it with EPERM)
    assert ("trusted.overlay.low", b"L") in got[0] or userxattr
    # trusted.overlay.overlayfoo and trusted.overlay.overlay: private in trusted mode, ordinary
    # xattrs (copied up too) in userxattr mode.
    odd = sorted(n for n, _ in got[0] if n.startswith("trusted.overlay.overlay"))
    other_mode = ["trusted.overlay.overlay", "trusted.overlay.overlay.low"]
    assert odd == (other_mode + ["trusted.overlay.overlayfoo"] if userxattr else [])
    for name in ("f", "d", "low"):
        assert stored(t.u.upper / name) == stored(t.k / "upper" / name), name
    f = stored(t.u.upper / "f")
    assert f[f"{ns}.overlay.overlay.overlay.nested"] == b"n"
    assert f[f"{ns}.overlay.overlay.whiteout"] == b"y"
    assert f"{ns}.overlay.overlay.foo" not in f
    assert stored(t.u.upper / "d")[f"{ns}.overlay.overlay.opaque"] == b"y"
    # A remount of unionfs shows the same.
    with t.u.mount(*(("userxattr",) if userxattr else ())) as again:
        assert view(Path(again) / "f") == got[14]
        assert sorted(os.listdir(Path(again) / "d")) == ["kept"]


def test_the_other_modes_markers_stay_reserved(twin) -> None:
    """unionfs reads the opaque and whiteout markers in both namespaces whatever the mode (the
    kernel only its own mode's), so those names are refused through the mount; other names of
    the other namespace are ordinary xattrs, as in the kernel."""
    t = twin(False)
    with t as (ours, theirs):
        for m in (ours, theirs):
            os.setxattr(m / "f", "user.overlay.foo", b"u")
            assert os.getxattr(m / "f", "user.overlay.foo") == b"u"
        with pytest.raises(OSError) as exc:
            os.setxattr(ours / "d", "user.overlay.opaque", b"y")
        assert exc.value.errno == errno.EPERM
        assert sorted(os.listdir(ours / "d")) == ["kept"]
    assert stored(t.u.upper / "f")["user.overlay.foo"] == b"u"
    assert stored(t.u.upper / "f") == stored(t.k / "upper" / "f")
