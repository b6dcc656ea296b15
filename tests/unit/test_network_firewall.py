"""The nftables declaration: port mappings, and what `build` asks nftables for (checked by nft)."""

from __future__ import annotations

import ipaddress
import secrets
import subprocess

import pytest

from cocon.network import firewall as fw
from cocon.network.errors import InvalidNetworkRequest, PortInUse

ip = ipaddress.ip_address
net = ipaddress.ip_network


def test_parse_port_mapping() -> None:
    assert fw.parse_port_mapping("8080:80") == fw.PortMapping(8080, 80, "tcp", None)
    assert fw.parse_port_mapping("127.0.0.1:53:53/udp") == fw.PortMapping(53, 53, "udp", ip("127.0.0.1"))
    assert fw.parse_port_mapping("0.0.0.0:1:2") == fw.PortMapping(1, 2, "tcp", None)
    assert fw.parse_port_mapping("[::1]:8080:80") == fw.PortMapping(8080, 80, "tcp", ip("::1"))
    assert str(fw.parse_port_mapping("10.0.0.1:8080:80/udp")) == "10.0.0.1:8080:80/udp"
    assert str(fw.parse_port_mapping("[fd00::2]:8080:80")) == "[fd00::2]:8080:80/tcp"  # read back as is
    for bad in ("80", "a:80", "0:80", "70000:80", "8080:80/sctp", "x.y:1:2", "[::1:80:80"):
        with pytest.raises(InvalidNetworkRequest, match="port mapping"):
            fw.parse_port_mapping(bad)


def test_port_in_use_is_found_by_a_bind_test() -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(PortInUse, match=f"port {port}/tcp on 127.0.0.1 is already in use"):
            fw.check_port_free(fw.PortMapping(port, 80, "tcp", ip("127.0.0.1")))
        with pytest.raises(PortInUse):
            fw.check_port_free(fw.PortMapping(port, 80, "tcp", None))  # every address includes 127.0.0.1
        fw.check_port_free(fw.PortMapping(port, 80, "udp", None))  # UDP is another port space
    with pytest.raises(InvalidNetworkRequest, match="not an address of this host"):
        fw.check_port_free(fw.PortMapping(port, 80, "tcp", ip("192.0.2.123")))


def _decl(tag: str) -> fw.Declaration:
    a = fw.NetworkRules(
        "a", f"cn-{tag}a", (net("10.250.1.0/24"), net("fd00:250:1::/64")), (ip("10.250.1.1"),)
    )
    b = fw.NetworkRules("b", f"cn-{tag}b", (net("10.250.2.0/24"),), (ip("10.250.2.1"),), internal=True)
    return fw.Declaration(
        (a, b),
        (
            fw.Published("a", ip("10.250.1.2"), fw.parse_port_mapping("8080:80")),
            fw.Published("a", ip("10.250.1.2"), fw.parse_port_mapping("127.0.0.1:5353:53/udp")),
            fw.Published("b", ip("10.250.2.2"), fw.parse_port_mapping("9999:80")),  # internal: ignored
        ),
        (fw.AllowRule("a", "b", "tcp", 80),),
    )


def test_build_and_apply_own_table_only() -> None:
    tag = secrets.token_hex(3)
    table = f"cocon_u{tag}"
    before = subprocess.run(["nft", "list", "ruleset"], capture_output=True, text=True, check=True).stdout
    try:
        fw.apply(_decl(tag), table)
        text = subprocess.run(
            ["nft", "list", "table", "inet", table], capture_output=True, text=True, check=True
        ).stdout
        inbound_b = text.split(f"chain in-cn-{tag}b {{")[1].split("}")[0]
        assert f'iifname "cn-{tag}a" tcp dport 80 accept comment "allow a -> b"' in inbound_b
        assert 'drop comment "b is internal"' in inbound_b
        assert f'oifname vmap {{ "cn-{tag}a" : jump in-cn-{tag}a, "cn-{tag}b" : jump in-cn-{tag}b }}' in text
        assert f'iifname "cn-{tag}b" drop' in text  # input: the internal network reaches only DNS
        assert "fib daddr type local tcp dport 8080 dnat ip to 10.250.1.2:80" in text
        assert "ip daddr 127.0.0.1 udp dport 5353 dnat ip to 10.250.1.2:53" in text
        assert "9999" not in text
        assert f'ip saddr 10.250.1.0/24 oifname != "cn-{tag}a" masquerade' in text
        assert f'ip6 saddr fd00:250:1::/64 oifname != "cn-{tag}a" masquerade' in text
        assert "10.250.2.0/24 oifname" not in text  # no NAT for the internal network
        # rebuilding replaces the table: no duplicated rules
        fw.apply(_decl(tag), table)
        again = subprocess.run(
            ["nft", "list", "table", "inet", table], capture_output=True, text=True, check=True
        ).stdout
        assert again.count("dport 8080") == text.count("dport 8080") == 2
        assert fw.table_exists(table)
        # no networks: the table goes
        fw.apply(fw.Declaration(), table)
        assert not fw.table_exists(table)
    finally:
        fw.teardown(table)
    after = subprocess.run(["nft", "list", "ruleset"], capture_output=True, text=True, check=True).stdout
    assert table not in after
    assert before == after or table not in before


def test_allow_rule_naming_an_unknown_network_is_refused() -> None:
    decl = fw.Declaration(_decl("x").networks, (), (fw.AllowRule("a", "nope"),))
    with pytest.raises(InvalidNetworkRequest, match="'nope', which does not exist"):
        fw.build(decl, "cocon_never_applied")
