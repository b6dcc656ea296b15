"""cocon.network for real: bridges, veths and taps, nftables, the embedded DNS, in namespaces made
by the tests. Every test checks that the host's links and nftables ruleset are as before.

Traffic stays on this machine: between test namespaces over test bridges, to 127.0.0.1 and to
the host's own address (which the kernel delivers locally).
"""

from __future__ import annotations

import ipaddress
import json
import os
import random
import secrets
import socket
import sqlite3
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from cocon import _linux
from cocon.network import (
    InvalidNetworkRequest,
    NetworkConflict,
    NetworkSpec,
    NetworkStack,
    PortInUse,
    SubnetFull,
    create_netns,
    delete_netns,
    dns,
    firewall,
    links,
)
from cocon.network.ipam import host_routes

# --- the host-state check ---------------------------------------------------------------------
# Objects that other test runs on this machine may add or change meanwhile (cocon runs in parallel,
# podman's CNI) are left out of the comparison unless they carry this run's tag.
OTHER_RUNS_LINKS = ("vc", "vp", "tc", "cn-", "veth", "cocon", "cni-podman")
OTHER_RUNS_TABLES = ("cocon",)


def _links() -> dict[str, dict[str, Any]]:
    out = json.loads(
        subprocess.run(["ip", "-j", "-d", "link"], capture_output=True, text=True, check=True).stdout
    )
    return {
        link["ifname"]: {
            "ifindex": link["ifindex"],
            "type": link.get("link_type"),
            "kind": link.get("linkinfo", {}).get("info_kind"),
            "mtu": link.get("mtu"),
            "master": link.get("master"),
        }
        for link in out
    }


def _ruleset() -> list[str]:
    out = json.loads(
        subprocess.run(["nft", "-j", "list", "ruleset"], capture_output=True, text=True, check=True).stdout
    )
    items = []
    for obj in out["nftables"]:
        if "metainfo" in obj:
            continue
        body = next(iter(obj.values()))
        body.pop("handle", None)
        for e in body.get("expr", []):
            if "counter" in e:
                e["counter"] = None
        items.append(json.dumps(obj, sort_keys=True))
    return sorted(items)


def _foreign(item: str, tag: str, prefixes: tuple[str, ...]) -> bool:
    return tag not in item and any(p in item for p in prefixes)


@pytest.fixture
def tag() -> str:
    return secrets.token_hex(3)


@pytest.fixture
def host_unchanged(tag: str) -> Iterator[list[Callable[[], None]]]:
    """Snapshot `ip -j link` and `nft -j list ruleset`; after the test run the clean-ups it
    registered (also on failure), then assert that both are as before."""
    links_before, rules_before = _links(), _ruleset()
    cleanups: list[Callable[[], None]] = []
    yield cleanups
    errors = []
    for fn in reversed(cleanups):
        try:
            fn()
        except Exception as exc:
            errors.append(exc)
    links_after, rules_after = _links(), _ruleset()
    gone = {n: v for n, v in links_before.items() if links_after.get(n) != v}
    new = {n: v for n, v in links_after.items() if n not in links_before}
    mine = [n for n in list(gone) + list(new) if tag in n]
    assert not mine, f"links of this test left behind or changed: {mine}"
    assert not {n for n in gone if not n.startswith(OTHER_RUNS_LINKS)}, f"host links changed: {gone}"
    assert not {n for n in new if not n.startswith(OTHER_RUNS_LINKS)}, f"links left behind: {new}"
    diff = set(rules_before) ^ set(rules_after)
    assert not [d for d in diff if tag in d], f"nftables objects of this test left: {diff}"
    assert not [d for d in diff if not _foreign(d, tag, OTHER_RUNS_TABLES)], f"ruleset changed: {diff}"
    assert not errors, errors


@pytest.fixture
def stack(tmp_path: Path, tag: str, host_unchanged: list[Callable[[], None]]) -> NetworkStack:
    s = NetworkStack(
        str(tmp_path / "engine.db"),
        str(tmp_path / "run"),
        table=f"cocon_t{tag}",
        default_bridge=f"cocon{tag}",
        upstreams=(),
    )
    host_unchanged.append(s.reset)
    return s


@pytest.fixture
def netns(tmp_path: Path, host_unchanged: list[Callable[[], None]]) -> Callable[[str], str]:
    def make(name: str) -> str:
        path = str(tmp_path / "netns" / name)
        create_netns(path)
        host_unchanged.append(lambda: delete_netns(path))
        return path

    return make


_used_subnets: set[str] = set()


def free_subnet() -> str:
    """A /24 under 10.200.0.0/13 that no route of the host covers (other runs may be live)."""
    routes = [r for r in host_routes() if r.version == 4]
    while True:
        cand = ipaddress.IPv4Network(f"10.{random.randint(200, 207)}.{random.randint(0, 255)}.0/24")
        if str(cand) not in _used_subnets and not any(cand.overlaps(r) for r in routes):  # type: ignore[arg-type]
            _used_subnets.add(str(cand))
            return str(cand)


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("0.0.0.0", 0))
        return int(s.getsockname()[1])


def host_address() -> str:
    """The host's own IPv4 address on the interface of its default route (traffic to it is local)."""
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        for route in ipr.get_routes(family=socket.AF_INET, table=254):
            if route["dst_len"] == 0 and route.get_attr("RTA_OIF"):
                for a in ipr.get_addr(family=socket.AF_INET, index=route.get_attr("RTA_OIF")):
                    return str(a.get_attr("IFA_ADDRESS"))
    pytest.fail("this host has no IPv4 address on a default route")


# --- sockets inside a namespace ---------------------------------------------------------------
def ns_socket(path: str, family: int, kind: int, proto: int = 0) -> socket.socket:
    """A socket created inside the namespace at `path` (it stays there, whichever thread uses it)."""
    out: list[Any] = []

    def work() -> None:
        try:
            fd = os.open(path, os.O_RDONLY)
            _linux.setns(fd, _linux.CLONE_NEWNET)
            os.close(fd)
            out.append(socket.socket(family, kind, proto))
        except BaseException as exc:
            out.append(exc)

    t = threading.Thread(target=work)
    t.start()
    t.join()
    if isinstance(out[0], BaseException):
        raise out[0]
    return out[0]  # type: ignore[no-any-return]


def _fam(addr: str) -> int:
    return socket.AF_INET6 if ":" in addr else socket.AF_INET


def ping(path: str, dst: str, timeout: float = 1.0) -> bool:
    """One ICMP echo from the namespace at `path` to `dst`; True if answered."""
    v6 = ":" in dst
    s = ns_socket(path, _fam(dst), socket.SOCK_RAW, socket.IPPROTO_ICMPV6 if v6 else socket.IPPROTO_ICMP)
    ident = random.randint(1, 0xFFFF)
    header = struct.pack("!BBHHH", 128 if v6 else 8, 0, 0, ident, 1)
    payload = b"cocon-ping"
    if not v6:
        data = header + payload
        total = sum(struct.unpack(f"!{len(data) // 2}H", data))
        total = (total >> 16) + (total & 0xFFFF)
        total += total >> 16
        header = struct.pack("!BBHHH", 8, 0, ~total & 0xFFFF, ident, 1)
    with s:
        s.settimeout(timeout)
        s.sendto(header + payload, (dst, 0))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                pkt = s.recv(2048)
            except TimeoutError:
                return False
            icmp = pkt if v6 else pkt[(pkt[0] & 0xF) * 4 :]
            kind, _code, _sum, got_id = struct.unpack_from("!BBHH", icmp)
            if kind == (129 if v6 else 0) and got_id == ident:
                return True
    return False


class Server:
    """A TCP (echo with a greeting) or UDP echo server in a namespace (None: the host)."""

    def __init__(
        self, path: str | None, kind: int, port: int, greeting: bytes, family: int = socket.AF_INET6
    ) -> None:
        self.sock = ns_socket(path, family, kind) if path else socket.socket(family, kind)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            self.sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        self.sock.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", port))
        self.greeting = greeting
        self.kind = kind
        if kind == socket.SOCK_STREAM:
            self.sock.listen()
        self.sock.settimeout(0.2)
        self.stop = False
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.stop:
            try:
                if self.kind == socket.SOCK_STREAM:
                    conn, _ = self.sock.accept()
                    with conn:
                        conn.settimeout(2)
                        conn.sendall(self.greeting + conn.recv(100))
                else:
                    data, peer = self.sock.recvfrom(100)
                    self.sock.sendto(self.greeting + data, peer)
            except OSError:
                continue

    def close(self) -> None:
        self.stop = True
        self.thread.join()
        self.sock.close()


@pytest.fixture
def server(host_unchanged: list[Callable[[], None]]) -> Callable[..., Server]:
    def make(
        path: str | None, port: int, greeting: bytes, kind: int = socket.SOCK_STREAM, **kw: Any
    ) -> Server:
        srv = Server(path, kind, port, greeting, **kw)
        host_unchanged.insert(0, srv.close)  # closed after the test, before the network goes
        return srv

    return make


def tcp(path: str | None, dst: str, port: int, timeout: float = 1.0) -> bytes | None:
    """Connect from a namespace (None: the host) and exchange one message; None if unreachable."""
    s = (
        ns_socket(path, _fam(dst), socket.SOCK_STREAM)
        if path
        else socket.socket(_fam(dst), socket.SOCK_STREAM)
    )
    with s:
        s.settimeout(timeout)
        try:
            s.connect((dst, port))
            s.sendall(b"hi")
            return s.recv(100)
        except OSError:
            return None


def udp(path: str | None, dst: str, port: int, timeout: float = 1.0) -> bytes | None:
    s = ns_socket(path, _fam(dst), socket.SOCK_DGRAM) if path else socket.socket(_fam(dst), socket.SOCK_DGRAM)
    with s:
        s.settimeout(timeout)
        try:
            s.sendto(b"hi", (dst, port))
            return s.recv(100)
        except OSError:
            return None


def dns_query(
    path: str, server: str, name: str, qtype: int = dns.TYPE_A, over_tcp: bool = False
) -> tuple[int, list[Any]]:
    query = dns.build_query(name, qtype, random.randint(1, 0xFFFF))
    if over_tcp:
        s = ns_socket(path, _fam(server), socket.SOCK_STREAM)
        with s:
            s.settimeout(3)
            s.connect((server, 53))
            s.sendall(struct.pack("!H", len(query)) + query)
            size = struct.unpack("!H", s.recv(2))[0]
            data = b""
            while len(data) < size:
                data += s.recv(size)
    else:
        s = ns_socket(path, _fam(server), socket.SOCK_DGRAM)
        with s:
            s.settimeout(3)
            s.sendto(query, (server, 53))
            data = s.recv(4096)
    rcode, addrs = dns.parse_answers(data)
    return rcode, list(addrs)


# --- the tests --------------------------------------------------------------------------------
def test_two_instances_on_one_network_ping_tcp_udp_v4_v6(
    stack: NetworkStack, netns: Callable[[str], str], server: Callable[..., Server], tag: str
) -> None:
    subnet = free_subnet()
    v6 = f"fdcc:{tag[:4]}:{tag[4:]}::/64"
    net = stack.ensure_network(NetworkSpec(f"n1-{tag}", subnets=(subnet, v6)))
    assert net.bridge == "cn-" + net.id[:12] and links.link_exists(net.bridge)
    a_ns, b_ns = netns("a"), netns("b")
    fixed = str(ipaddress.ip_network(subnet).network_address + 77)
    a = stack.attach(net.name, f"a-{tag}", a_ns, name="alpha")
    b = stack.attach(net.name, f"b-{tag}", b_ns, ip=fixed)
    assert str(a.ip) == str(ipaddress.ip_network(subnet).network_address + 2)
    assert str(b.ip) == fixed and b.ip6 is not None
    assert a.gateways == net.gateways and a.nameservers == tuple(str(g) for g in net.gateways)
    # the namespace's view: eth0 with the addresses and the MAC, routes via the gateway
    shown = json.loads(
        subprocess.run(
            ["nsenter", f"--net={b_ns}", "ip", "-j", "addr", "show", "eth0"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    )[0]
    assert shown["address"] == b.mac
    assert {f"{x['local']}/{x['prefixlen']}" for x in shown["addr_info"] if x["scope"] == "global"} == {
        str(x) for x in b.addresses
    }
    route = subprocess.run(
        ["nsenter", f"--net={b_ns}", "ip", "route", "show", "default"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert f"default via {net.gateways[0]} dev eth0" in route

    assert ping(a_ns, str(b.ip)) and ping(b_ns, str(a.ip))
    assert ping(a_ns, str(b.ip6))
    port = free_port()
    server(b_ns, port, b"B:")
    server(b_ns, port, b"Bu:", socket.SOCK_DGRAM)
    assert tcp(a_ns, str(b.ip), port) == b"B:hi"
    assert tcp(a_ns, str(b.ip6), port) == b"B:hi"
    assert udp(a_ns, str(b.ip), port) == b"Bu:hi"
    # a second attach of the same owner is refused; the fixed address is taken
    with pytest.raises(NetworkConflict, match="already connected"):
        stack.attach(net.name, f"b-{tag}", b_ns)
    c_ns = netns("c")
    with pytest.raises(NetworkConflict, match="already in use"):
        stack.attach(net.name, f"c-{tag}", c_ns, ip=fixed)
    assert not links.link_exists("eth0", c_ns)  # nothing half-made
    # detach: the veth goes, the address is free again, the network can go once empty
    with pytest.raises(NetworkConflict, match="in use by 2 instance"):
        stack.remove_network(net.name)
    assert [e.owner for e in stack.detach(f"b-{tag}")] == [f"b-{tag}"]
    assert not links.link_exists("eth0", b_ns) and not links.link_exists(b.host_ifname)
    assert stack.attach(net.name, f"c-{tag}", c_ns, ip=fixed).ip == b.ip


def test_networks_are_isolated_until_an_allow_rule(
    stack: NetworkStack, netns: Callable[[str], str], server: Callable[..., Server], tag: str
) -> None:
    n1 = stack.ensure_network(NetworkSpec(f"iso1-{tag}", subnets=(free_subnet(),)))
    n2 = stack.ensure_network(NetworkSpec(f"iso2-{tag}", subnets=(free_subnet(),)))
    a_ns, c_ns = netns("a"), netns("c")
    stack.attach(n1.name, f"a-{tag}", a_ns)
    c = stack.attach(n2.name, f"c-{tag}", c_ns)
    port = free_port()
    server(c_ns, port, b"C:")
    assert not ping(a_ns, str(c.ip), timeout=0.5)
    assert tcp(a_ns, str(c.ip), port, timeout=0.5) is None
    # the host itself reaches instances (as with Docker)
    assert tcp(None, str(c.ip), port) == b"C:hi"
    stack.allow(n1.name, n2.name, "tcp", port)
    assert tcp(a_ns, str(c.ip), port) == b"C:hi"
    assert not ping(a_ns, str(c.ip), timeout=0.5)  # only that port
    assert tcp(c_ns, str(stack.endpoints(owner=f"a-{tag}")[0].ip), port, timeout=0.5) is None  # one direction
    stack.disallow(n1.name, n2.name, "tcp", port)
    assert tcp(a_ns, str(c.ip), port, timeout=0.5) is None
    with pytest.raises(InvalidNetworkRequest):
        stack.allow(n1.name, n2.name, "icmp")


def test_dns_by_name_and_alias(stack: NetworkStack, netns: Callable[[str], str], tag: str) -> None:
    v6 = f"fdcc:{tag[:4]}:{tag[4:]}::/64"
    net = stack.ensure_network(NetworkSpec(f"dns-{tag}", subnets=(free_subnet(), v6)))
    a_ns, b_ns = netns("a"), netns("b")
    a = stack.attach(net.name, f"a-{tag}", a_ns, name="Web", aliases=["www", "api"])
    b = stack.attach(net.name, f"b-{tag}", b_ns, name="db")
    gw4, gw6 = (str(g) for g in net.gateways)
    assert b.nameservers == (gw4, gw6)
    assert dns_query(b_ns, gw4, "web") == (0, [a.ip])
    assert dns_query(b_ns, gw4, "WWW.") == (0, [a.ip])
    assert dns_query(b_ns, gw4, "api", dns.TYPE_AAAA) == (0, [a.ip6])
    assert dns_query(b_ns, gw6, "web", over_tcp=True) == (0, [a.ip])
    assert dns_query(a_ns, gw4, "db") == (0, [b.ip])
    assert dns_query(a_ns, gw4, "nosuchname")[0] == dns.RCODE_NXDOMAIN  # forwarding disabled
    stack.detach(f"a-{tag}")
    assert dns_query(b_ns, gw4, "web")[0] == dns.RCODE_NXDOMAIN
    # the default network has no embedded DNS (as Docker's bridge)
    dflt = stack.ensure_network(NetworkSpec("bridge", subnets=(free_subnet(),), default=True))
    assert dflt.bridge == f"cocon{tag}" and not dflt.dns
    c = stack.attach("bridge", f"c-{tag}", netns("c"), name="c")
    assert c.nameservers == ()


def test_published_ports_tcp_udp_on_loopback_and_host_address(
    stack: NetworkStack, netns: Callable[[str], str], server: Callable[..., Server], tag: str
) -> None:
    net = stack.ensure_network(NetworkSpec(f"pub-{tag}", subnets=(free_subnet(),)))
    a_ns = netns("a")
    p_loop, p_all, p_udp = free_port(), free_port(), free_port(socket.SOCK_DGRAM)
    stack.attach(
        net.name, f"a-{tag}", a_ns, ports=[f"127.0.0.1:{p_loop}:8080", f"{p_all}:8080", f"{p_udp}:9090/udp"]
    )
    server(a_ns, 8080, b"A:")
    server(a_ns, 9090, b"Au:", socket.SOCK_DGRAM)
    me = host_address()
    assert tcp(None, "127.0.0.1", p_loop) == b"A:hi"
    assert tcp(None, me, p_loop) is None  # published on loopback only
    assert tcp(None, "127.0.0.1", p_all) == b"A:hi"
    assert tcp(None, me, p_all) == b"A:hi"
    assert udp(None, "127.0.0.1", p_udp) == b"Au:hi"
    assert udp(None, me, p_udp) == b"Au:hi"
    # from another network's instance, through the host's address (hairpin over the host)
    other = stack.ensure_network(NetworkSpec(f"pub2-{tag}", subnets=(free_subnet(),)))
    b_ns = netns("b")
    stack.attach(other.name, f"b-{tag}", b_ns)
    assert tcp(b_ns, me, p_all) == b"A:hi"

    # a port taken on the host, or by another instance, is refused before anything is made
    c_ns = netns("c")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        with pytest.raises(PortInUse, match=f"port {taken}/tcp on 127.0.0.1 is already in use"):
            stack.attach(net.name, f"c-{tag}", c_ns, ports=[f"127.0.0.1:{taken}:80"])
    with pytest.raises(PortInUse, match=f"host port {p_all}/tcp is already published"):
        stack.attach(net.name, f"c-{tag}", c_ns, ports=[f"{p_all}:80"])
    assert stack.endpoints(owner=f"c-{tag}") == [] and not links.link_exists("eth0", c_ns)
    assert len(stack.ipam.allocations(net.id)) == 1
    # detaching unpublishes
    stack.detach(f"a-{tag}")
    assert tcp(None, "127.0.0.1", p_all, timeout=0.5) is None


def test_internal_network_reaches_nothing_outside(
    stack: NetworkStack, netns: Callable[[str], str], server: Callable[..., Server], tag: str
) -> None:
    net = stack.ensure_network(NetworkSpec(f"int-{tag}", subnets=(free_subnet(),), internal=True))
    outside = stack.ensure_network(NetworkSpec(f"out-{tag}", subnets=(free_subnet(),)))
    a_ns, b_ns, o_ns = netns("a"), netns("b"), netns("o")
    stack.attach(net.name, f"a-{tag}", a_ns, name="a")
    b = stack.attach(net.name, f"b-{tag}", b_ns, name="b")
    o = stack.attach(outside.name, f"o-{tag}", o_ns)
    port = free_port()
    server(b_ns, port, b"B:")
    server(o_ns, port, b"O:")
    host_port = free_port()
    server(None, host_port, b"H:")
    assert tcp(a_ns, str(b.ip), port) == b"B:hi"  # inside the network: yes
    assert dns_query(a_ns, str(net.gateways[0]), "b") == (0, [b.ip])  # DNS on the gateway: yes
    assert tcp(a_ns, str(net.gateways[0]), host_port, timeout=0.5) is None  # the host: no
    assert tcp(a_ns, str(o.ip), port, timeout=0.5) is None  # another network: no (no route at all)
    assert tcp(o_ns, str(b.ip), port, timeout=0.5) is None  # and not the other way either
    assert tcp(o_ns, str(outside.gateways[0]), host_port) == b"H:hi"  # a normal network reaches the host
    with pytest.raises(InvalidNetworkRequest, match="internal: it cannot publish ports"):
        stack.attach(net.name, f"c-{tag}", netns("c"), ports=["8080:80"])


def test_tap_for_a_vm_joins_the_bridge(stack: NetworkStack, tag: str) -> None:
    net = stack.ensure_network(NetworkSpec(f"vm-{tag}", subnets=(free_subnet(),)))
    ep = stack.attach_tap(net.name, f"vm-{tag}", name="guest")
    info = json.loads(
        subprocess.run(
            ["ip", "-j", "-d", "link", "show", ep.host_ifname], capture_output=True, text=True, check=True
        ).stdout
    )[0]
    assert info["master"] == net.bridge
    assert info["linkinfo"]["info_kind"] == "tun" and info["linkinfo"]["info_data"]["type"] == "tap"
    assert ep.kind == "tap" and ep.ip is not None and ep.mac.startswith("02:42:")
    assert ep.gateways == net.gateways
    stack.detach(f"vm-{tag}")
    assert not links.link_exists(ep.host_ifname) and stack.ipam.allocations(net.id) == []


def test_firewall_rebuilt_from_the_database_after_a_restart(
    tmp_path: Path, stack: NetworkStack, netns: Callable[[str], str], server: Callable[..., Server], tag: str
) -> None:
    net = stack.ensure_network(NetworkSpec(f"rs-{tag}", subnets=(free_subnet(),)))
    a_ns = netns("a")
    port = free_port()
    a = stack.attach(net.name, f"a-{tag}", a_ns, name="a", ports=[f"127.0.0.1:{port}:8080"])
    server(a_ns, 8080, b"A:")
    assert tcp(None, "127.0.0.1", port) == b"A:hi"
    # the daemon goes away: DNS stops, and say the ruleset was flushed (a reboot would)
    stack.close()
    firewall.teardown(stack.table)
    assert tcp(None, "127.0.0.1", port, timeout=0.5) is None
    again = NetworkStack(
        sqlite3.connect(str(tmp_path / "engine.db"), isolation_level=None, check_same_thread=False),
        str(tmp_path / "run"),
        table=stack.table,
        default_bridge=stack.default_bridge,
        upstreams=(),
    )
    try:
        again.restore()
        assert tcp(None, "127.0.0.1", port) == b"A:hi"
        assert dns_query(a_ns, str(net.gateways[0]), "a") == (0, [a.ip])
        again.reset()
        assert not firewall.table_exists(stack.table)
        assert not links.link_exists(net.bridge)
    finally:
        again.close()


def test_network_validation(stack: NetworkStack, tag: str) -> None:
    subnet = free_subnet()
    stack.ensure_network(NetworkSpec(f"v1-{tag}", subnets=(subnet,)))
    with pytest.raises(NetworkConflict, match="overlaps subnet"):
        stack.ensure_network(NetworkSpec(f"v2-{tag}", subnets=(subnet,)))
    with pytest.raises(InvalidNetworkRequest, match="not a host address"):
        stack.ensure_network(NetworkSpec(f"v3-{tag}", subnets=(free_subnet(),), gateways=("192.0.2.1",)))
    with pytest.raises(InvalidNetworkRequest, match="invalid network name"):
        stack.ensure_network(NetworkSpec("-bad"))
    assert [n.name for n in stack.networks()] == [f"v1-{tag}"]
    # the same name again is the same network
    assert stack.ensure_network(NetworkSpec(f"v1-{tag}")).subnets[0].subnet == ipaddress.ip_network(subnet)


def test_full_subnet_and_mtu(stack: NetworkStack, netns: Callable[[str], str], tag: str) -> None:
    tiny = str(ipaddress.ip_network(free_subnet()).subnets(new_prefix=30).__next__())  # one host address
    net = stack.ensure_network(NetworkSpec(f"tiny-{tag}", subnets=(tiny,), mtu=1400))
    a_ns, b_ns = netns("a"), netns("b")
    a = stack.attach(net.name, f"a-{tag}", a_ns)
    assert str(a.ip) == str(ipaddress.ip_network(tiny).network_address + 2)
    with pytest.raises(SubnetFull, match=f"no free address left in {tiny}"):
        stack.attach(net.name, f"b-{tag}", b_ns)
    assert not links.link_exists("eth0", b_ns) and stack.endpoints(owner=f"b-{tag}") == []
    shown = json.loads(
        subprocess.run(
            ["nsenter", f"--net={a_ns}", "ip", "-j", "link", "show", "eth0"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    )[0]
    assert shown["mtu"] == 1400
    stack.detach(f"a-{tag}")
    assert stack.attach(net.name, f"b-{tag}", b_ns).ip == a.ip  # released when the instance went


def test_network_none_is_a_namespace_with_loopback_only(netns: Callable[[str], str]) -> None:
    path = netns("none")
    shown = json.loads(
        subprocess.run(
            ["nsenter", f"--net={path}", "ip", "-j", "addr"], capture_output=True, text=True, check=True
        ).stdout
    )
    assert [(i["ifname"], "UP" in i["flags"]) for i in shown] == [("lo", True)]
    srv = ns_socket(path, socket.AF_INET, socket.SOCK_STREAM)
    with srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen()
        port = srv.getsockname()[1]
        cli = ns_socket(path, socket.AF_INET, socket.SOCK_STREAM)
        with cli:
            cli.connect(("127.0.0.1", port))
        assert tcp(path, "203.0.113.1", 9, timeout=0.3) is None  # no route: fails at once, sends nothing
