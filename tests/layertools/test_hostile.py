"""Hostile layer tarballs: each is refused with a clear error (and nothing is left behind) or
handled in the documented safe way; nothing is ever written outside the destination."""

from __future__ import annotations

import os
import stat
import tarfile
from pathlib import Path

import pytest

from layertools.conftest import TarBuilder, needs_root
from unionfs.errors import UnionfsError
from unionfs.layertools.importer import import_layer


@pytest.fixture
def arena(tmp_path: Path) -> Path:
    """A directory with an ``outside`` tree next to where layers get unpacked."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_bytes(b"secret")
    (tmp_path / "layers").mkdir()
    return tmp_path


def outside_untouched(arena: Path) -> None:
    assert sorted(p.name for p in (arena / "outside").iterdir()) == ["secret"]
    assert (arena / "outside" / "secret").read_bytes() == b"secret"
    assert sorted(p.name for p in arena.iterdir()) == ["l.tar", "layers", "outside"]


def refused(arena: Path, builder: TarBuilder, match: str, **options: bool) -> None:
    """Import must fail with ``match`` in the message and leave no layer and no temp dir."""
    source = builder.write(arena / "l.tar")
    with pytest.raises(UnionfsError, match=match) as info:
        import_layer(str(source), arena / "layers" / "new", **options)
    assert "\n" not in str(info.value)
    assert list((arena / "layers").iterdir()) == []
    outside_untouched(arena)


def imported(arena: Path, builder: TarBuilder, **options: bool) -> Path:
    source = builder.write(arena / "l.tar")
    import_layer(str(source), arena / "layers" / "new", **options)
    outside_untouched(arena)
    return arena / "layers" / "new"


def test_absolute_path(arena: Path) -> None:
    builder = TarBuilder().file("ok", b"").file(str(arena / "outside" / "evil"), b"x")
    refused(arena, builder, "absolute path")


def test_dotdot_component(arena: Path) -> None:
    refused(arena, TarBuilder().file("ok", b"").file("../../outside/evil", b"x"), r"'\.\.'")


def test_dotdot_in_the_middle(arena: Path) -> None:
    refused(arena, TarBuilder().dir("a/").file("a/../../outside/evil", b"x"), r"'\.\.'")


def test_file_written_through_a_symlink(arena: Path) -> None:
    builder = TarBuilder().symlink("link", str(arena / "outside")).file("link/evil", b"x")
    refused(arena, builder, "symlink or not a directory")


def test_file_written_through_a_relative_symlink(arena: Path) -> None:
    builder = TarBuilder().symlink("link", "../../outside").file("link/evil", b"x")
    refused(arena, builder, "symlink or not a directory")


def test_file_replacing_a_symlink_does_not_write_through_it(arena: Path) -> None:
    # Documented safe behaviour: last wins, the symlink is replaced, its target is untouched.
    builder = TarBuilder().symlink("link", str(arena / "outside" / "secret")).file("link", b"new")
    layer = imported(arena, builder)
    assert not (layer / "link").is_symlink()
    assert (layer / "link").read_bytes() == b"new"


def test_directory_replacing_a_symlink_does_not_follow_it(arena: Path) -> None:
    builder = (
        TarBuilder().symlink("d", str(arena / "outside")).dir("d/", mode=0o700).file("d/f", b"")
    )
    layer = imported(arena, builder)
    assert (layer / "d").is_dir() and not (layer / "d").is_symlink()
    assert stat.S_IMODE(os.stat(arena / "outside").st_mode) == 0o755
    assert (layer / "d" / "f").exists()


def test_hard_link_pointing_outside(arena: Path) -> None:
    refused(arena, TarBuilder().hardlink("evil", "../outside/secret"), r"'\.\.'")


def test_hard_link_with_absolute_target(arena: Path) -> None:
    builder = TarBuilder().hardlink("evil", str(arena / "outside" / "secret"))
    refused(arena, builder, "absolute hard link target")


def test_hard_link_through_a_symlink(arena: Path) -> None:
    builder = TarBuilder().symlink("link", str(arena / "outside")).hardlink("evil", "link/secret")
    refused(arena, builder, "not an earlier member")


def test_hard_link_to_a_later_entry(arena: Path) -> None:
    builder = TarBuilder().hardlink("early", "late").file("late", b"")
    refused(arena, builder, "not an earlier member")


def test_hard_link_to_a_missing_entry(arena: Path) -> None:
    refused(arena, TarBuilder().file("a", b"").hardlink("b", "nowhere"), "not an earlier member")


def test_hard_link_to_a_directory(arena: Path) -> None:
    refused(arena, TarBuilder().dir("d/").hardlink("l", "d"), "hard link to a directory")


def test_hard_link_to_itself(arena: Path) -> None:
    refused(arena, TarBuilder().file("a", b"").hardlink("a", "a"), "to itself")


def test_char_device_refused_by_default(arena: Path) -> None:
    refused(arena, TarBuilder().file("ok", b"").device("dev/mem", 1, 1), "device node 1:1")


def test_block_device_refused_by_default(arena: Path) -> None:
    refused(arena, TarBuilder().device("sda", 8, 0, block=True), "--allow-devices")


@needs_root
def test_devices_allowed_with_the_option(arena: Path) -> None:
    layer = imported(arena, TarBuilder().device("null", 1, 3), allow_devices=True)
    st = os.lstat(layer / "null")
    assert stat.S_ISCHR(st.st_mode) and (os.major(st.st_rdev), os.minor(st.st_rdev)) == (1, 3)


@needs_root
def test_whiteout_device_is_always_allowed(arena: Path) -> None:
    layer = imported(arena, TarBuilder().device("gone", 0, 0))
    assert os.lstat(layer / "gone").st_rdev == 0


@pytest.mark.parametrize("name", [".wh.", ".wh..", ".wh...", ".wh..wh.plnk", "d/.wh..wh."])
def test_invalid_whiteout_marker_names(arena: Path, name: str) -> None:
    refused(arena, TarBuilder().file("ok", b"").whiteout(name), "not a valid whiteout marker")


def test_invalid_marker_refused_even_when_keeping_markers(arena: Path) -> None:
    refused(arena, TarBuilder().whiteout(".wh.."), "not a valid", keep_oci_whiteouts=True)


def test_marker_used_as_a_directory(arena: Path) -> None:
    refused(arena, TarBuilder().file(".wh.x/y", b""), "used as a directory")


def test_nul_byte_in_a_pax_path(arena: Path) -> None:
    builder = TarBuilder()
    info = tarfile.TarInfo("placeholder")
    info.pax_headers = {"path": "a\x00../../outside/evil"}
    builder.tar.addfile(info)
    refused(arena, builder, "NUL byte")


@needs_root
def test_internal_xattrs_in_the_tarball_are_dropped(arena: Path) -> None:
    # Documented safe behaviour: a layer cannot forge overlayfs redirects or opaque markers.
    builder = TarBuilder()
    info = tarfile.TarInfo("d")
    info.type = tarfile.DIRTYPE
    info.mode = 0o755
    info.pax_headers = {
        "SCHILY.xattr.trusted.overlay.redirect": "/etc",
        "SCHILY.xattr.trusted.overlay.opaque": "y",
        "SCHILY.xattr.user.kept": "v",
    }
    builder.tar.addfile(info)
    layer = imported(arena, builder)
    assert os.listxattr(layer / "d") == ["user.kept"]


def test_truncated_tarball_leaves_nothing(arena: Path) -> None:
    builder = TarBuilder().file("a", b"a" * 10000).file("b", b"b" * 10000)
    source = builder.write(arena / "l.tar")
    source.write_bytes(source.read_bytes()[:6000])
    with pytest.raises(UnionfsError, match="corrupt|unexpected end|cannot import"):
        import_layer(str(source), arena / "layers" / "new")
    assert list((arena / "layers").iterdir()) == []


def test_existing_empty_destination_survives_a_refusal(arena: Path) -> None:
    dest = arena / "layers" / "new"
    dest.mkdir()
    source = TarBuilder().file("../x", b"").write(arena / "l.tar")
    with pytest.raises(UnionfsError):
        import_layer(str(source), dest)
    assert [p.name for p in (arena / "layers").iterdir()] == ["new"]
    assert list(dest.iterdir()) == []
