"""The embedded resolver: local names and aliases, NXDOMAIN, malformed queries, forwarding to a
stub upstream — all on 127.0.0.1."""

from __future__ import annotations

import ipaddress
import socket
import struct
from collections.abc import Iterator

import pytest

from cocon.network import dns

ip = ipaddress.ip_address
RECORDS = {"web": [ip("10.9.0.2"), ip("fd00:9::2")], "db": [ip("10.9.0.3")]}


def lookup(name: str) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address] | None:
    return RECORDS.get(name)  # type: ignore[return-value]


def test_local_answers() -> None:
    r = dns.Resolver(lookup, domain="cocon")
    for name in ("web", "WEB.", "web.cocon"):
        answer = r.local(dns.build_query(name, dns.TYPE_A, 0x4242))
        assert answer is not None and answer[:2] == b"\x42\x42"
        assert dns.parse_answers(answer) == (dns.RCODE_OK, [ip("10.9.0.2")])
    answer = r.local(dns.build_query("web", dns.TYPE_AAAA))
    assert answer is not None and dns.parse_answers(answer) == (0, [ip("fd00:9::2")])
    answer = r.local(dns.build_query("db", dns.TYPE_AAAA))  # the name exists: NOERROR, no data
    assert answer is not None and dns.parse_answers(answer) == (0, [])
    answer = r.local(dns.build_query("nothere", dns.TYPE_A))
    assert answer is not None and dns.parse_answers(answer) == (dns.RCODE_NXDOMAIN, [])
    formerr = r.local(b"\x00\x01" + struct.pack("!HHHHH", 0x0100, 2, 0, 0, 0))
    assert formerr is not None and formerr[3] & 0xF == dns.RCODE_FORMERR
    assert r.local(b"\x01") is None  # not even a header: dropped


def test_unknown_names_are_forwarded_only_when_upstreams_exist() -> None:
    r = dns.Resolver(lookup, upstreams=[("127.0.0.1", 9)])
    assert r.local(dns.build_query("example.org")) is None
    assert r.local(dns.build_query("web")) is not None


def _udp_query(port: int, name: str, qtype: int = dns.TYPE_A) -> tuple[int, list[object]]:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(3)
        s.sendto(dns.build_query(name, qtype), ("127.0.0.1", port))
        rcode, addrs = dns.parse_answers(s.recv(4096))
        return rcode, list(addrs)


def _tcp_query(port: int, name: str) -> tuple[int, list[object]]:
    with socket.create_connection(("127.0.0.1", port), timeout=3) as s:
        q = dns.build_query(name)
        s.sendall(struct.pack("!H", len(q)) + q)
        size = struct.unpack("!H", s.recv(2))[0]
        data = b""
        while len(data) < size:
            data += s.recv(size - len(data))
        rcode, addrs = dns.parse_answers(data)
        return rcode, list(addrs)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def service() -> Iterator[dns.DnsService]:
    svc = dns.DnsService()
    yield svc
    svc.close()


def test_service_udp_tcp_and_forwarding_to_a_local_stub(service: dns.DnsService) -> None:
    # a stub "upstream" on loopback that answers everything with 192.0.2.77 (nothing leaves the host)
    stub_port = _free_port()
    stub = dns.Resolver(lambda name: [ip("192.0.2.77")])
    service.listen("stub", "127.0.0.1", stub_port, stub)
    port = _free_port()
    service.listen("net", "127.0.0.1", port, dns.Resolver(lookup, upstreams=[("127.0.0.1", stub_port)]))
    assert _udp_query(port, "web") == (0, [ip("10.9.0.2")])
    assert _tcp_query(port, "db") == (0, [ip("10.9.0.3")])
    assert _udp_query(port, "elsewhere.example") == (0, [ip("192.0.2.77")])
    assert _tcp_query(port, "elsewhere.example") == (0, [ip("192.0.2.77")])
    # upstream gone: SERVFAIL, quickly
    service.unlisten("stub")
    dead = dns.Resolver(lookup, upstreams=[("127.0.0.1", stub_port)], timeout=0.3)
    service.listen("net", "127.0.0.1", port, dead)
    assert _udp_query(port, "elsewhere.example")[0] == dns.RCODE_SERVFAIL
    assert sorted(service.keys()) == ["net"]


def test_listen_conflict_is_a_clear_error(service: dns.DnsService) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        from cocon.network.errors import NetworkError

        with pytest.raises(NetworkError, match=f"cannot listen for DNS on 127.0.0.1 port {port}"):
            service.listen("x", "127.0.0.1", port, dns.Resolver(lookup))
    assert service.keys() == []


def test_read_resolv_conf(tmp_path: object) -> None:
    import pathlib

    p = pathlib.Path(str(tmp_path)) / "resolv.conf"
    p.write_text("# c\nnameserver 192.0.2.53\nnameserver fe80::1%eth0\nnameserver bogus\nsearch x\n")
    assert dns.read_resolv_conf(str(p)) == [("192.0.2.53", 53), ("fe80::1%eth0", 53)]
    assert dns.read_resolv_conf(str(p) + ".missing") == []
