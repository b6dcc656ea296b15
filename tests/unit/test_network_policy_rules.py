"""Allow rules (their port syntax, labels, what nftables gets, the old table's migration), `-p`
port ranges as Docker parses them and the PORTS column as docker ps prints it."""

from __future__ import annotations

import ipaddress
import secrets
import sqlite3
import subprocess
from pathlib import Path

import pytest

from cocon.cli.containers import display_ports
from cocon.cli.run import UsageError, parse_publish_ranges
from cocon.engine.errors import InvalidRequest
from cocon.engine.netattach import label_rules
from cocon.network import firewall as fw
from cocon.network.errors import InvalidNetworkRequest
from cocon.network.stack import NetworkStack, parse_rule_ports

net = ipaddress.ip_network
ip = ipaddress.ip_address


def test_rule_ports() -> None:
    assert parse_rule_ports("") == (None, None, None)
    assert parse_rule_ports("all") == (None, None, None)
    assert parse_rule_ports("udp") == ("udp", None, None)
    assert parse_rule_ports("80") == ("tcp", 80, None)
    assert parse_rule_ports("53/UDP") == ("udp", 53, None)
    assert parse_rule_ports("8000-8010/tcp") == ("tcp", 8000, 8010)
    assert parse_rule_ports("80-80") == ("tcp", 80, None)
    for bad in ("0", "65536", "90-80", "80/sctp", "icmp", "80-", "a-b", "-5"):
        with pytest.raises(InvalidNetworkRequest, match="invalid port"):
            parse_rule_ports(bad)
    rule = fw.AllowRule("a", "b", "tcp", 8000, 8010)
    assert rule.ports_text() == "8000-8010/tcp" and fw.AllowRule("a", "b").ports_text() == "all"


def test_policy_label() -> None:
    assert label_rules({}) == []
    value = "frontend:80/tcp, monitoring,10.1.0.0/16:9100-9110,fd00:1::/64,fd00:2::/64:53/udp,ops:udp"
    assert label_rules({"cocon.policy.allow-from": value}) == [
        ("frontend", "80/tcp"), ("monitoring", ""), ("10.1.0.0/16", "9100-9110"), ("fd00:1::/64", ""),
        ("fd00:2::/64", "53/udp"), ("ops", "udp"),
    ]  # fmt: skip
    for bad, words in ((":80", "names no source"), ("web:0", "invalid port"), (" , ", "is empty")):
        with pytest.raises(InvalidRequest, match=words):
            label_rules({"cocon.policy.allow-from": bad})


def test_rules_in_the_inbound_chain_of_their_network() -> None:
    tag = secrets.token_hex(3)
    table = f"cocon_p{tag}"
    a = fw.NetworkRules("a", f"cn-{tag}a", (net("10.251.1.0/24"),), (ip("10.251.1.1"),))
    b = fw.NetworkRules("b", f"cn-{tag}b", (net("10.251.2.0/24"), net("fd00:251::/64")), (ip("10.251.2.1"),))
    decl = fw.Declaration(
        (a, b),
        (),
        (
            fw.AllowRule("a", "b", "tcp", 8000, 8010, "aaaaaaaaaaaa"),
            fw.AllowRule("10.9.0.0/16", "b", "udp", None, None, "bbbbbbbbbbbb"),
            fw.AllowRule("fd00:9::/48", "b", None, None, None, "cccccccccccc"),
        ),
    )
    try:
        fw.apply(decl, table)
        text = subprocess.run(
            ["nft", "list", "chain", "inet", table, f"in-cn-{tag}b"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        assert (
            f'iifname "cn-{tag}a" tcp dport 8000-8010 accept comment "policy aaaaaaaaaaaa allow a -> b"'
            in text
        )
        assert 'ip saddr 10.9.0.0/16 meta l4proto udp accept comment "policy bbbbbbbbbbbb' in text
        assert 'ip6 saddr fd00:9::/48 accept comment "policy cccccccccccc' in text
        assert text.index("policy aaaa") < text.index('drop comment "b: no other connections in"')
        assert (
            "policy"
            not in subprocess.run(
                ["nft", "list", "chain", "inet", table, f"in-cn-{tag}a"],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
        )
    finally:
        fw.teardown(table)


def test_rules_of_the_first_schema_are_migrated(tmp_path: Path) -> None:
    db = sqlite3.connect(tmp_path / "n.db")
    db.execute("CREATE TABLE net_policies (source TEXT, target TEXT, protocol TEXT, port INTEGER)")
    db.execute("INSERT INTO net_policies VALUES ('front', 'back', 'tcp', 5432)")
    db.commit()
    db.close()
    stack = NetworkStack(str(tmp_path / "n.db"), str(tmp_path / "run"), table="cocon_never", upstreams=())
    (rule,) = stack.rules()
    assert (rule.source, rule.target, rule.ports, rule.origin, rule.active) == ("front", "back", "5432/tcp",
                                                                               "user", False)  # fmt: skip
    assert len(rule.id) == 12 and stack.policies() == []  # no such networks: nothing enforced
    tables = {r[0] for r in stack.db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert "net_policies" not in tables and "net_rules" in tables
    with pytest.raises(InvalidNetworkRequest, match="invalid port"):
        stack.add_rule("back", "front", "99999")


def test_publish_ranges_as_docker_parses_them() -> None:
    assert parse_publish_ranges("8000-8002:80-82") == [("80/tcp", "", "8000"), ("81/tcp", "", "8001"),
                                                        ("82/tcp", "", "8002")]  # fmt: skip
    assert parse_publish_ranges("127.0.0.1:9000-9001:9000-9001/udp") == [
        ("9000/udp", "127.0.0.1", "9000"), ("9001/udp", "127.0.0.1", "9001"),
    ]  # fmt: skip
    assert parse_publish_ranges("80-81") == [("80/tcp", "", ""), ("81/tcp", "", "")]
    assert parse_publish_ranges("127.0.0.1::80-81") == [
        ("80/tcp", "127.0.0.1", ""),
        ("81/tcp", "127.0.0.1", ""),
    ]
    assert parse_publish_ranges("[fd00::1]:8000-8001:80-81") == [("80/tcp", "fd00::1", "8000"),
                                                                 ("81/tcp", "fd00::1", "8001")]  # fmt: skip
    assert parse_publish_ranges("8000-8010:80") == [("80/tcp", "", "8000-8010")]
    assert parse_publish_ranges("8080:80") == [("80/tcp", "", "8080")]
    with pytest.raises(UsageError, match="host range 8000-8003 has 4 ports and the container range 80-82 3"):
        parse_publish_ranges("8000-8003:80-82")
    for bad in ("82-80", "8000-:80-81", "1-70000:1-70000"):
        with pytest.raises(UsageError, match="invalid -p"):
            parse_publish_ranges(bad)


def test_ports_column_as_docker_ps() -> None:
    def pub(host_ip: str, public: int, private: int, kind: str = "tcp") -> dict[str, object]:
        return {"IP": host_ip, "PublicPort": public, "PrivatePort": private, "Type": kind}

    assert display_ports([]) == ""
    assert display_ports([pub("0.0.0.0", 8080, 80), pub("::", 8080, 80)]) == (
        "0.0.0.0:8080->80/tcp, [::]:8080->80/tcp"
    )
    same = [pub("0.0.0.0", p, p) for p in (8002, 8000, 8001)] + [{"PrivatePort": 53, "Type": "udp"}]
    assert display_ports(same) == "53/udp, 0.0.0.0:8000-8002->8000-8002/tcp"
    assert display_ports([pub("127.0.0.1", 9001, 81, "udp"), pub("127.0.0.1", 9000, 80, "udp")]) == (
        "127.0.0.1:9000->80/udp, 127.0.0.1:9001->81/udp"
    )
