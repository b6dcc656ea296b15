"""IPAM over a real SQLite file: fixed and next-free addresses, release, full subnets, the pool."""

from __future__ import annotations

import ipaddress
import sqlite3
import threading
from pathlib import Path

import pytest

from cocon.network.errors import AddressInUse, InvalidNetworkRequest, NetworkConflict, SubnetFull
from cocon.network.ipam import (
    DEFAULT_SUBNET,
    Ipam,
    check_gateway,
    default_gateway,
    parse_subnet,
    pick_subnet,
)

net4 = ipaddress.IPv4Network
ip = ipaddress.ip_address


@pytest.fixture
def ipam(tmp_path: Path) -> Ipam:
    return Ipam(str(tmp_path / "net.db"))


def test_next_free_skips_network_gateway_and_reuses_released(ipam: Ipam) -> None:
    sub = parse_subnet("10.1.0.0/29")
    gw = default_gateway(sub)
    assert str(gw) == "10.1.0.1"
    got = [ipam.allocate("n1", sub, f"i{k}", gateway=gw) for k in range(3)]
    assert [str(a) for a in got] == ["10.1.0.2", "10.1.0.3", "10.1.0.4"]
    assert ipam.release("n1", ip("10.1.0.3"))
    assert not ipam.release("n1", ip("10.1.0.3"))
    assert str(ipam.allocate("n1", sub, "i9", gateway=gw)) == "10.1.0.3"


def test_full_subnet_is_a_clear_error(ipam: Ipam) -> None:
    sub = parse_subnet("10.1.0.0/30")  # .1 gateway, .2 the only host, .3 broadcast
    gw = default_gateway(sub)
    assert str(ipam.allocate("n", sub, "a", gateway=gw)) == "10.1.0.2"
    with pytest.raises(SubnetFull, match=r"no free address left in 10\.1\.0\.0/30.*larger --subnet"):
        ipam.allocate("n", sub, "b", gateway=gw)
    ipam.release_owner("a")
    assert str(ipam.allocate("n", sub, "b", gateway=gw)) == "10.1.0.2"


def test_fixed_address(ipam: Ipam) -> None:
    sub = parse_subnet("10.2.0.0/24")
    gw = default_gateway(sub)
    assert str(ipam.allocate("n", sub, "a", gateway=gw, requested=ip("10.2.0.50"))) == "10.2.0.50"
    # the same owner asking again is idempotent; another owner is refused
    assert str(ipam.allocate("n", sub, "a", gateway=gw, requested=ip("10.2.0.50"))) == "10.2.0.50"
    with pytest.raises(AddressInUse, match="already in use by a"):
        ipam.allocate("n", sub, "b", gateway=gw, requested=ip("10.2.0.50"))
    for bad in ("10.2.0.1", "10.2.0.0", "10.2.0.255", "10.3.0.5", "fd00::5"):
        with pytest.raises(InvalidNetworkRequest, match="pick another --ip"):
            ipam.allocate("n", sub, "b", gateway=gw, requested=ip(bad))
    # next-free goes around the fixed one
    assert str(ipam.allocate("n", sub, "c", gateway=gw)) == "10.2.0.2"


def test_same_address_in_two_networks_and_release_all_for_owner(ipam: Ipam) -> None:
    sub = parse_subnet("10.4.0.0/24")
    a1 = ipam.allocate("n1", sub, "x", gateway=default_gateway(sub))
    a2 = ipam.allocate("n2", sub, "x", gateway=default_gateway(sub))
    ipam.allocate("n2", sub, "y", gateway=default_gateway(sub))
    assert a1 == a2
    released = ipam.release_owner("x")
    assert {(r.network, str(r.address)) for r in released} == {("n1", "10.4.0.2"), ("n2", "10.4.0.2")}
    assert [a.owner for a in ipam.allocations()] == ["y"]
    assert ipam.release_network("n2") == 1
    assert ipam.allocations() == []


def test_ipv6_and_ranges(ipam: Ipam) -> None:
    sub6 = parse_subnet("fd00:1:2::/64")
    gw6 = default_gateway(sub6)
    assert str(gw6) == "fd00:1:2::1"
    assert str(ipam.allocate("n", sub6, "a", gateway=gw6)) == "fd00:1:2::2"
    assert str(ipam.allocate("n", sub6, "b", gateway=gw6, requested=ip("fd00:1:2::beef"))) == "fd00:1:2::beef"
    sub = parse_subnet("10.5.0.0/16")
    rng = parse_subnet("10.5.7.0/30")
    got = [str(ipam.allocate("r", sub, o, gateway=default_gateway(sub), ip_range=rng)) for o in "pqrs"]
    assert got == ["10.5.7.0", "10.5.7.1", "10.5.7.2", "10.5.7.3"]  # inside a /16 these are hosts
    with pytest.raises(SubnetFull):
        ipam.allocate("r", sub, "t", gateway=default_gateway(sub), ip_range=rng)
    with pytest.raises(InvalidNetworkRequest, match="not inside subnet"):
        ipam.allocate("r", sub, "t", ip_range=parse_subnet("10.6.0.0/24"))


def test_persisted_across_connections_and_shared_connection(tmp_path: Path) -> None:
    path = str(tmp_path / "engine.db")
    Ipam(path).allocate("n", parse_subnet("10.7.0.0/24"), "a", gateway=ip("10.7.0.1"))
    conn = sqlite3.connect(path, isolation_level=None)  # as the engine's own connection
    again = Ipam(conn)
    assert [str(a.address) for a in again.allocations("n")] == ["10.7.0.2"]
    assert str(again.allocate("n", parse_subnet("10.7.0.0/24"), "b", gateway=ip("10.7.0.1"))) == "10.7.0.3"
    cols = [r[1] for r in conn.execute("PRAGMA table_info(ipam_allocations)")]
    assert cols == ["network", "address", "family", "owner", "created"]


def test_concurrent_allocations_never_hand_out_an_address_twice(tmp_path: Path) -> None:
    path = str(tmp_path / "net.db")
    Ipam(path)
    sub = parse_subnet("10.8.0.0/24")
    results: list[str] = []
    lock = threading.Lock()

    def worker(n: int) -> None:
        mine = Ipam(path)  # its own connection, as another process would have
        for k in range(10):
            a = mine.allocate("n", sub, f"w{n}-{k}", gateway=ip("10.8.0.1"))
            with lock:
                results.append(str(a))

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 40
    assert len(set(results)) == 40


def test_subnet_and_gateway_validation() -> None:
    with pytest.raises(InvalidNetworkRequest, match="host bits set"):
        parse_subnet("10.0.0.1/24")
    with pytest.raises(InvalidNetworkRequest, match="too small"):
        parse_subnet("10.0.0.0/31")
    with pytest.raises(InvalidNetworkRequest, match="invalid subnet"):
        parse_subnet("nonsense")
    check_gateway(parse_subnet("10.0.0.0/24"), ip("10.0.0.254"))
    with pytest.raises(InvalidNetworkRequest, match="not a host address"):
        check_gateway(parse_subnet("10.0.0.0/24"), ip("10.0.1.1"))
    with pytest.raises(InvalidNetworkRequest, match="not a host address"):
        check_gateway(parse_subnet("10.0.0.0/24"), ip("10.0.0.255"))


def test_pick_subnet_avoids_routes_and_other_networks() -> None:
    assert pick_subnet([], default=True, routes=[]) == DEFAULT_SUBNET
    with pytest.raises(NetworkConflict, match=r"default subnet 172\.17\.0\.0/16 overlaps"):
        pick_subnet([], default=True, routes=[net4("172.17.5.0/24")])
    assert pick_subnet([], routes=[]) == net4("172.18.0.0/16")
    taken = [net4("172.18.0.0/16")]
    routes = [net4("172.16.0.0/12").subnets(new_prefix=13).__next__(), net4("172.24.0.0/16")]  # 172.16-23
    assert pick_subnet(taken, routes=routes) == net4("172.25.0.0/16")
    everything = [net4("172.16.0.0/12"), net4("10.89.0.0/17")]
    assert pick_subnet([], routes=everything) == net4("10.89.128.0/24")
    with pytest.raises(NetworkConflict, match="give the network a --subnet"):
        pick_subnet([], routes=[net4("172.16.0.0/12"), net4("10.89.0.0/16")])


def test_pick_subnet_reads_the_host_routes() -> None:
    from cocon.network.ipam import host_routes

    routes = host_routes()
    assert all(r.prefixlen > 0 for r in routes)
    picked = pick_subnet([])
    assert not any(picked.overlaps(r) for r in routes if r.version == 4)  # type: ignore[arg-type]
