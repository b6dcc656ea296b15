"""`cocon run`'s network flags (-p, -P, --expose, --ip, --network-alias, --network) into Docker's
create body, and the engine's validation of that body (cocon.engine.netattach: no kernel objects)."""

from __future__ import annotations

import pytest

from cocon.cli.run import UsageError, build_request, parse_args, parse_publish
from cocon.engine.errors import InvalidRequest
from cocon.engine.netattach import endpoint_settings, port_bindings


def test_publish_forms() -> None:
    assert parse_publish("8080:80") == ("80/tcp", "", "8080")
    assert parse_publish("127.0.0.1:8080:80/udp") == ("80/udp", "127.0.0.1", "8080")
    assert parse_publish("80") == ("80/tcp", "", "")
    assert parse_publish("127.0.0.1::80") == ("80/tcp", "127.0.0.1", "")
    assert parse_publish("[::1]:8080:80") == ("80/tcp", "::1", "8080")
    for bad in ("x:80", "8080:80/sctp", "70000:80", "1:2:3:4", ""):
        with pytest.raises(UsageError):
            parse_publish(bad)


def test_network_flags_into_the_create_body() -> None:
    body, _ = build_request(parse_args(["busybox"]), {})
    assert "NetworkMode" not in body["HostConfig"]  # Docker's default: the default bridge
    opts = parse_args(["-p", "8080:80", "-p", "127.0.0.1:53:53/udp", "-P", "--expose", "9000",
                       "--network", "backend", "--ip", "10.1.0.5", "--network-alias", "db", "busybox"])  # fmt: skip
    body, _ = build_request(opts, {})
    host = body["HostConfig"]
    assert host["NetworkMode"] == "backend" and host["PublishAllPorts"] is True
    assert host["PortBindings"] == {
        "80/tcp": [{"HostIp": "", "HostPort": "8080"}],
        "53/udp": [{"HostIp": "127.0.0.1", "HostPort": "53"}],
    }
    assert body["ExposedPorts"] == {"80/tcp": {}, "53/udp": {}, "9000/tcp": {}}
    assert body["NetworkingConfig"] == {
        "EndpointsConfig": {"backend": {"Aliases": ["db"], "IPAMConfig": {"IPv4Address": "10.1.0.5"}}}
    }


def test_engine_port_bindings_and_endpoint_settings() -> None:
    host = {"PortBindings": {"80/tcp": [{"HostIp": "", "HostPort": "8080"}], "53/udp": None},
            "PublishAllPorts": True}  # fmt: skip
    got = port_bindings(host, {"ExposedPorts": {"9000/tcp": {}}}, {"ExposedPorts": {"80/tcp": {}}})
    assert got == [
        {"Port": 80, "Proto": "tcp", "HostIp": "", "HostPort": 8080},
        {"Port": 53, "Proto": "udp", "HostIp": "", "HostPort": 0},
        {"Port": 9000, "Proto": "tcp", "HostIp": "", "HostPort": 0},
    ]
    # a host range for one container port: any free port of it (Docker's), picked at start
    assert port_bindings({"PortBindings": {"80": [{"HostPort": "8000-8010"}]}}, {}, {}) == [
        {"Port": 80, "Proto": "tcp", "HostIp": "", "HostPort": 8000, "HostPortEnd": 8010}
    ]
    for bad in ({"PortBindings": {"80/sctp": []}}, {"PortBindings": {"80": [{"HostPort": "8010-8000"}]}},
                {"PortBindings": {"80": [{"HostIp": "nope"}]}}, {"PortBindings": {"80": [{"HostIp": "::1"}]}}):  # fmt: skip
        with pytest.raises(InvalidRequest):
            port_bindings(bad, {}, {})
    assert endpoint_settings({"Aliases": ["a", "a", "b"]}, "n") == {
        "Aliases": ["a", "b"], "IPv4Address": None, "IPv6Address": None,
    }  # fmt: skip
    with pytest.raises(InvalidRequest, match="user configured subnets"):
        endpoint_settings({"IPAMConfig": {"IPv4Address": "172.17.0.9"}}, "bridge")
    with pytest.raises(InvalidRequest, match="only for containers in user networks"):
        endpoint_settings({"Aliases": ["x"]}, "bridge")
