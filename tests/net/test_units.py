"""Pure-function tests of the network helper: no namespaces, no root needed."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from unionfs.errors import UnionfsError, UsageError
from unionfs.net import etcfiles, ipam, nft
from unionfs.net.config import NetConfig
from unionfs.net.lifecycle import RunOptions, validate
from unionfs.net.portspec import PortMapping, parse_port_spec
from unionfs.net.state import Record, RunDir


def cfg(tmp_path: Path, subnet: str = "10.203.0.0/29") -> NetConfig:
    return NetConfig.from_env({"UNIONFS_RUN_DIR": str(tmp_path / "run"), "UNIONFS_SUBNET": subnet})


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("80", [PortMapping("0.0.0.0", 0, 80, "tcp")]),
        ("8080:80", [PortMapping("0.0.0.0", 8080, 80, "tcp")]),
        ("127.0.0.1:10080:80", [PortMapping("127.0.0.1", 10080, 80, "tcp")]),
        ("127.0.0.1::53/udp", [PortMapping("127.0.0.1", 0, 53, "udp")]),
        (
            "8000-8001:90-91/UDP",
            [PortMapping("0.0.0.0", 8000, 90, "udp"), PortMapping("0.0.0.0", 8001, 91, "udp")],
        ),
    ],
)
def test_port_spec_parses(spec: str, expected: list[PortMapping]) -> None:
    assert parse_port_spec(spec) == expected


@pytest.mark.parametrize(
    "spec",
    [
        "",
        "x",
        "80/sctp",
        "1:2:3:4",
        "999.0.0.1:80:80",
        "0:80",
        "80:70000",
        "10-5:1-6",
        "8000-8002:80-81",
        "80-81",
        "[::1]:80:80",
        "127.0.0.1:80:",
        "1-2000:1-2000",
    ],
)
def test_port_spec_rejects(spec: str) -> None:
    with pytest.raises(UsageError):
        parse_port_spec(spec)


@given(host=st.integers(1, 65535), ctr=st.integers(1, 65535), proto=st.sampled_from(["tcp", "udp"]))
def test_port_spec_roundtrip(host: int, ctr: int, proto: str) -> None:
    (m,) = parse_port_spec(f"127.0.0.1:{host}:{ctr}/{proto}")
    assert m.describe() == f"{ctr}/{proto} -> 127.0.0.1:{host}"
    assert PortMapping.from_json(m.to_json()) == m


def test_ipam_allocates_lowest_free_and_releases(tmp_path: Path) -> None:
    rundir = RunDir(cfg(tmp_path))
    got = [ipam.allocate(rundir, f"c{i}") for i in range(5)]
    assert got == [f"10.203.0.{i}" for i in range(2, 7)]
    with pytest.raises(UnionfsError, match="no free address"):
        ipam.allocate(rundir, "full")
    ipam.release(rundir, "c1")
    assert ipam.allocate(rundir, "again") == "10.203.0.3"
    with pytest.raises(UnionfsError, match="in use by c0"):
        ipam.allocate(rundir, "x", "10.203.0.2")
    for bad in ("10.203.0.1", "10.203.0.7", "10.9.9.9", "nonsense"):
        with pytest.raises(UsageError):
            ipam.allocate(rundir, "x", bad)
    for name in ("c0", "c2", "c3", "c4", "again"):
        ipam.release(rundir, name)
    assert not rundir.leases_path().exists()


def test_ruleset_has_dnat_guard_and_masquerade(tmp_path: Path) -> None:
    config = cfg(tmp_path, "10.203.0.0/24")
    rec = Record(
        name="web",
        id="abc",
        network="bridge",
        rootfs="/",
        command=["x"],
        hostname="h",
        ip="10.203.0.2",
    )
    rec.ports = [
        PortMapping("127.0.0.1", 10080, 80, "tcp").to_json(),
        PortMapping("0.0.0.0", 8080, 81, "udp").to_json(),
    ]
    cmds = nft.build_ruleset(config, [rec])
    rules = [c["add"]["rule"] for c in cmds if "rule" in c.get("add", {})]
    by_chain: dict[str, list[str]] = {}
    for r in rules:
        by_chain.setdefault(r["chain"], []).append(str(r["expr"]))
    # Loopback binding: DNAT from output only, guarded in prerouting.
    assert not any("10080" in e for e in by_chain["prerouting"])
    assert sum("10080" in e and "dnat" in e for e in by_chain["output"]) == 1
    assert any("10080" in e and "drop" in e for e in by_chain["guard"])
    assert any("8080" in e for e in by_chain["prerouting"])
    assert any("'127.0.0.0', 'len': 8" in e and "drop" in e for e in by_chain["guard"])
    assert sum("masquerade" in e for e in by_chain["postrouting"]) == 3
    # The transaction starts by replacing the table.
    assert list(cmds[0]) == ["add"] and list(cmds[1]) == ["delete"]


def test_ruleset_without_bridge_containers_deletes_table(tmp_path: Path) -> None:
    rec = Record(name="n", id="a", network="none", rootfs="/", command=["x"], hostname="h")
    cmds = nft.build_ruleset(cfg(tmp_path), [rec])
    assert [list(c) for c in cmds] == [["add"], ["delete"], ["add"], ["delete"]]


def test_hosts_file_layout() -> None:
    text = etcfiles.hosts_file(
        etcfiles.HostsSpec(
            hostname="box",
            ip="10.203.0.3",
            extra_hosts=[("db", "10.0.0.9")],
            links=[("10.203.0.2", "w", "web")],
        )
    )
    lines = text.splitlines()
    assert lines[0] == "127.0.0.1\tlocalhost"
    assert lines[-3:] == ["10.0.0.9\tdb", "10.203.0.2\tw web", "10.203.0.3\tbox"]


def test_resolv_conf_drops_loopback_servers() -> None:
    host = "search example\nnameserver 127.0.0.53\nnameserver 192.0.2.53\n"
    assert etcfiles.resolv_conf([], host) == "search example\nnameserver 192.0.2.53\n"
    assert "8.8.8.8" in etcfiles.resolv_conf([], "nameserver 127.0.0.1\n")
    assert etcfiles.resolv_conf(["192.0.2.1"], host) == "search example\nnameserver 192.0.2.1\n"


def test_etc_write_never_follows_symlinks(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.write_text("keep")
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "hosts").symlink_to(outside)
    etcfiles.write_into_rootfs(root, etcfiles.EtcContent("h\n", "r\n", "n\n"))
    assert outside.read_text() == "keep"
    assert (root / "etc" / "hosts").read_text() == "h\n"
    assert not (root / "etc" / "hosts").is_symlink()
    evil = tmp_path / "evil"
    evil.mkdir()
    (evil / "etc").symlink_to(tmp_path / "outside-dir")
    (tmp_path / "outside-dir").mkdir()
    with pytest.raises(UnionfsError):
        etcfiles.write_into_rootfs(evil, etcfiles.EtcContent("h\n", "r\n", "n\n"))
    assert list((tmp_path / "outside-dir").iterdir()) == []


@pytest.mark.parametrize(
    ("network", "extra"),
    [
        ("container:web", {"ports": [PortMapping("0.0.0.0", 1, 1, "tcp")]}),
        ("container:web", {"links": [("a", "a")]}),
        ("container:web", {"dns": ["192.0.2.1"]}),
        ("container:web", {"hostname": "h"}),
        ("container:web", {"add_hosts": [("a", "192.0.2.1")]}),
        ("none", {"ports": [PortMapping("0.0.0.0", 1, 1, "tcp")]}),
        ("host", {"links": [("a", "a")]}),
        ("bogus", {}),
        ("container:", {}),
    ],
)
def test_conflicting_options_rejected(network: str, extra: dict) -> None:
    opts = RunOptions(rootfs=Path("/"), command=["true"], network=network, **extra)
    with pytest.raises(UsageError):
        validate(opts)


def test_config_rejects_bad_overrides() -> None:
    for env in (
        {"UNIONFS_SUBNET": "10.0.0.1/24"},
        {"UNIONFS_BRIDGE": "x" * 16},
        {"UNIONFS_NFT_TABLE": "no spaces"},
        {"UNIONFS_SUBNET": "10.0.0.0/30"},
    ):
        with pytest.raises(UsageError):
            NetConfig.from_env(env)
    c = NetConfig.from_env({})
    assert c.subnet == ipaddress.IPv4Network("10.203.0.0/24")
    assert str(c.gateway) == "10.203.0.1"


def test_capabilities_resolve_as_docker_does() -> None:
    from unionfs.net import caps

    assert caps.resolve([], []) == caps.DOCKER_DEFAULT
    assert caps.mask(caps.DOCKER_DEFAULT) == 0xA80425FB
    assert caps.resolve(["cap_net_admin"], ["MKNOD"]) == (caps.DOCKER_DEFAULT | {"NET_ADMIN"}) - {
        "MKNOD"
    }
    assert caps.resolve(["NET_RAW"], ["ALL"]) == {"NET_RAW"}
    assert caps.resolve(["ALL"], ["SYS_ADMIN"]) == caps.all_names() - {"SYS_ADMIN"}
    with pytest.raises(UsageError, match="unknown capability"):
        caps.resolve(["SYS_MAGIC"], [])


def test_confinement_options() -> None:
    from unionfs.net.confinement import Confinement

    default = Confinement.parse()
    assert (default.seccomp, default.no_new_privs, default.privileged) == (True, True, False)
    loose = Confinement.parse(security_opts=["seccomp=unconfined", "no-new-privileges=false"])
    assert (loose.seccomp, loose.no_new_privs) == (False, False)
    assert Confinement.parse(security_opts=["no-new-privileges"]).no_new_privs
    privileged = Confinement.parse(privileged=True, cap_drop=["ALL"])
    assert privileged.privileged and not privileged.seccomp and not privileged.no_new_privs
    for bad in ("seccomp=/etc/profile.json", "apparmor=x", "label"):
        with pytest.raises(UsageError):
            Confinement.parse(security_opts=[bad])
    with pytest.raises(UsageError):
        Confinement.parse(userns="remap")


def test_subordinate_range_of_root(tmp_path: Path) -> None:
    from unionfs.net.confinement import FALLBACK_ID_BASE, subordinate_base

    f = tmp_path / "subuid"
    assert subordinate_base(f) == FALLBACK_ID_BASE
    f.write_text("alice:100000:65536\nroot:200000:1000\nroot:300000:65536\n")
    assert subordinate_base(f) == 300000
    f.write_text("root:x:y\n")
    with pytest.raises(UnionfsError, match="malformed"):
        subordinate_base(f)


def test_antispoof_rules_per_bridge_port(tmp_path: Path) -> None:
    rec = Record(
        name="c",
        id="abc",
        network="bridge",
        rootfs="/",
        command=["x"],
        hostname="h",
        ip="10.203.0.7",
        veth="ufvabc",
    )
    assert ipam.mac_for("10.203.0.7") == "02:42:0a:cb:00:07"
    cmds = nft.build_ruleset(cfg(tmp_path), [rec])
    rules = [c["add"]["rule"] for c in cmds if "rule" in c.get("add", {})]
    spoof = [r for r in rules if r["family"] == "bridge"]
    assert [r["chain"] for r in spoof] == ["antispoof"] * 4
    text = [str(r["expr"]) for r in spoof]
    assert "'02:42:0a:cb:00:07'" in text[0] and "'!='" in text[0] and "drop" in text[0]
    assert "saddr ip" in text[1] and "10.203.0.7" in text[1] and "accept" in text[1]
    assert "'ip', 'field': 'saddr'" in text[2] and "accept" in text[2]
    assert "ufvabc" in text[3] and "drop" in text[3]
