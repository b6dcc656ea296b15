"""cocon's firewall: one nftables table (`inet cocon`), rebuilt atomically from a declaration.

Everything cocon does in nftables lives in ONE table of family `inet` (IPv4 and IPv6 together;
NAT in `inet` needs Linux 5.2). `apply(Declaration, table=...)` sends one JSON batch through
libnftables: `add table; delete table; add table, chains, rules` — the kernel commits it as one
transaction, so the firewall is never half-built, and no other table (Docker's, iptables-nft's,
podman's, the admin's) is read, flushed or rewritten. `teardown(table)` deletes only that table.

Chains (base chains at the standard priorities; a drop in any base chain is final, an accept here
does not override another table's drop):

- `forward` (filter): established/related accepted; then per network two regular chains
  (`chain_names`): `in-<bridge>` takes every new connection INTO the network — within the bridge
  accepted (seen here when br_netfilter is loaded), the network's allow rules (from another
  network or a subnet, optionally one protocol and port range), then for internal networks a drop;
  for the others connections from internal networks dropped, published (DNATed) connections
  accepted, everything else dropped (isolation) — and `out-<bridge>` every new connection leaving
  it for anything that is not a cocon network (accepted; dropped for internal networks).
- `input` (filter): packets from a cocon bridge to 127.0.0.0/8 dropped (route_localnet is on for
  the bridges, see below); internal networks reach only DNS (53/udp, 53/tcp) on the host.
- `prerouting` / `output` (nat, dstnat): DNAT of published ports. With no host address given the
  match is `fib daddr type local` (every address of the host, loopback included for `output`).
- `postrouting` (nat, srcnat): masquerade of non-internal subnets leaving their bridge; masquerade
  of 127.0.0.0/8 sources entering a bridge (loopback publishing).

Loopback publishing: a connection to 127.0.0.1:PORT from the host is DNATed in `output` to the
instance; the kernel only routes a 127.0.0.0/8 source out of an interface with
`net.ipv4.conf.<bridge>.route_localnet=1`, and the masquerade makes the instance answer to the
gateway. This is what Docker does with `userland-proxy: false`; it needs no proxy process per
port, handles UDP the same way and keeps the instance's view of the client consistent. The
`input` rule above closes the hole route_localnet would open (CVE-2020-8558: neighbours reaching
the host's 127.0.0.1 services). IPv6 has no route_localnet: [::1] is not published (Docker uses
its userland proxy for that); publishing on the host's IPv6 addresses works.

Sysctls (`enable_forwarding`): net.ipv4.ip_forward=1 always; net.ipv6.conf.all.forwarding=1 only
when a network has an IPv6 subnet (it turns off router advertisements on the host's interfaces
that use accept_ra=1, as Docker's --ipv6 does). br_netfilter is neither loaded nor changed: the
rules are correct with and without it.
"""

from __future__ import annotations

import errno
import ipaddress
import socket

from cocon._typing import TYPE_CHECKING, record
from cocon.network.errors import InvalidNetworkRequest, NetworkError, PortInUse

if TYPE_CHECKING:
    from collections.abc import Sequence
    from typing import Any

    Expr = dict[str, Any]

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

DEFAULT_TABLE = "cocon"
LOOPBACK4 = ipaddress.IPv4Network("127.0.0.0/8")


@record(frozen=True)
class NetworkRules:
    """What the firewall needs of one network."""

    name: str
    bridge: str
    subnets: tuple[IPNetwork, ...]
    gateways: tuple[IPAddress, ...] = ()
    internal: bool = False


@record(frozen=True)
class PortMapping:
    """`-p [HOST_IP:]HOST_PORT:PORT[/PROTO]`; host_ip None means every address of the host."""

    host_port: int
    port: int
    protocol: str = "tcp"
    host_ip: IPAddress | None = None

    def __str__(self) -> str:
        if self.host_ip is None:
            host = ""
        else:
            host = f"[{self.host_ip}]:" if self.host_ip.version == 6 else f"{self.host_ip}:"
        return f"{host}{self.host_port}:{self.port}/{self.protocol}"


@record(frozen=True)
class Published:
    """A port mapping of an instance at `address` on the network `network` (a NetworkRules name)."""

    network: str
    address: IPAddress
    mapping: PortMapping


@record(frozen=True)
class AllowRule:
    """Let `source` open connections to instances of network `target`: `source` is a network's name
    (its instances) or a subnet in CIDR notation (routed clients); optionally only `protocol`
    (tcp, udp) and destination ports `port`..`port_end` (the instances' own ports, not host ports).
    `id` names the rule in nftables comments and in `network policy rm`."""

    source: str
    target: str
    protocol: str | None = None
    port: int | None = None
    port_end: int | None = None
    id: str = ""

    def ports_text(self) -> str:
        """`80/tcp`, `8000-8010/udp`, `tcp` (every port), `all` (every protocol)."""
        if self.protocol is None:
            return "all"
        if self.port is None:
            return self.protocol
        end = f"-{self.port_end}" if self.port_end is not None and self.port_end != self.port else ""
        return f"{self.port}{end}/{self.protocol}"


def source_subnet(source: str) -> IPNetwork | None:
    """The subnet an allow rule's source names, or None when it names a network."""
    if "/" not in source:
        return None
    try:
        return ipaddress.ip_network(source, strict=False)
    except ValueError:
        return None


def chain_names(bridge: str) -> tuple[str, str]:
    """(inbound, outbound) chains of the network whose bridge is `bridge`: `in-<bridge>` decides
    every new connection into the network (within it, allow rules, published ports, the rest
    dropped), `out-<bridge>` every connection leaving it for somewhere other than a cocon network."""
    return f"in-{bridge}", f"out-{bridge}"


@record(frozen=True)
class Declaration:
    networks: tuple[NetworkRules, ...] = ()
    published: tuple[Published, ...] = ()
    allow: tuple[AllowRule, ...] = ()


def parse_port_mapping(text: str) -> PortMapping:
    """`[HOST_IP:]HOST_PORT:PORT[/tcp|udp]` (IPv6 host addresses in brackets: `[::1]:8080:80`)."""
    spec, _, proto = text.partition("/")
    proto = proto or "tcp"
    if proto not in ("tcp", "udp"):
        raise InvalidNetworkRequest(f"port mapping {text!r}: protocol must be tcp or udp")
    host_ip: IPAddress | None = None
    if spec.startswith("["):
        end = spec.find("]:")
        if end < 0:
            raise InvalidNetworkRequest(
                f"port mapping {text!r}: write an IPv6 host address as [ADDR]:PORT:PORT"
            )
        host_ip_text, spec = spec[1:end], spec[end + 2 :]
        host_ip = _address(host_ip_text, text)
    parts = spec.split(":")
    if len(parts) == 3:
        host_ip = _address(parts[0], text) if parts[0] else None
        parts = parts[1:]
    if len(parts) != 2:
        raise InvalidNetworkRequest(
            f"port mapping {text!r}: expected [HOST_IP:]HOST_PORT:PORT[/tcp|udp], e.g. 8080:80"
        )
    host_port, port = (_port(p, text) for p in parts)
    if host_ip is not None and host_ip.is_unspecified:
        host_ip = None
    return PortMapping(host_port, port, proto, host_ip)


def _address(value: str, text: str) -> IPAddress:
    try:
        return ipaddress.ip_address(value)
    except ValueError:
        raise InvalidNetworkRequest(f"port mapping {text!r}: {value!r} is not an IP address") from None


def _port(value: str, text: str) -> int:
    if not value.isdigit() or not 0 < int(value) < 65536:
        raise InvalidNetworkRequest(f"port mapping {text!r}: {value!r} is not a port number (1-65535)")
    return int(value)


def check_port_free(mapping: PortMapping) -> None:
    """Raise PortInUse if a socket on the host holds `mapping`'s host port (a bind test)."""
    host = mapping.host_ip
    family = socket.AF_INET6 if host is not None and host.version == 6 else socket.AF_INET
    kind = socket.SOCK_STREAM if mapping.protocol == "tcp" else socket.SOCK_DGRAM
    address = str(host) if host is not None else ("::" if family == socket.AF_INET6 else "0.0.0.0")
    with socket.socket(family, kind) as sock:
        if kind == socket.SOCK_STREAM:
            # ignore TIME_WAIT leftovers; a listener still makes the bind fail on Linux
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((address, mapping.host_port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise PortInUse(
                    f"port {mapping.host_port}/{mapping.protocol} on {host or 'the host'} is already in use: "
                    "stop what listens there or publish on another host port"
                ) from None
            if exc.errno == errno.EADDRNOTAVAIL:
                raise InvalidNetworkRequest(
                    f"cannot publish on {host}: it is not an address of this host"
                ) from None
            raise


# --- nftables JSON helpers --------------------------------------------------------------------


def _match(left: Any, right: Any, op: str = "==") -> Expr:
    return {"match": {"op": op, "left": left, "right": right}}


def _meta(key: str) -> Expr:
    return {"meta": {"key": key}}


def _payload(protocol: str, fieldname: str) -> Expr:
    return {"payload": {"protocol": protocol, "field": fieldname}}


def _prefix(net: IPNetwork) -> Expr:
    return {"prefix": {"addr": str(net.network_address), "len": net.prefixlen}}


def _fam(version: int) -> str:
    return "ip" if version == 4 else "ip6"


def _iif(name: str | list[str], op: str = "==") -> Expr:
    return _match(_meta("iifname"), {"set": name} if isinstance(name, list) else name, op)


def _oif(name: str | list[str], op: str = "==") -> Expr:
    return _match(_meta("oifname"), {"set": name} if isinstance(name, list) else name, op)


def _ct(key: str, values: str | list[str]) -> Expr:
    return _match({"ct": {"key": key}}, values, "in")


ACCEPT: Expr = {"accept": None}
DROP: Expr = {"drop": None}
MASQUERADE: Expr = {"masquerade": None}


class _Builder:
    def __init__(self, table: str) -> None:
        self.table = table
        self.commands: list[dict[str, Any]] = []

    def chain(self, name: str, kind: str, hook: str, prio: int) -> None:
        self.commands.append(
            {
                "add": {
                    "chain": {
                        "family": "inet",
                        "table": self.table,
                        "name": name,
                        "type": kind,
                        "hook": hook,
                        "prio": prio,
                        "policy": "accept",
                    }
                }
            }
        )

    def chain_regular(self, name: str) -> None:
        self.commands.append({"add": {"chain": {"family": "inet", "table": self.table, "name": name}}})

    def rule(self, chain: str, *expr: Expr, comment: str | None = None) -> None:
        rule: dict[str, Any] = {"family": "inet", "table": self.table, "chain": chain, "expr": list(expr)}
        if comment:
            rule["comment"] = comment[:128]
        self.commands.append({"add": {"rule": rule}})


def _table(table: str) -> dict[str, Any]:
    return {"table": {"family": "inet", "name": table}}


def build(decl: Declaration, table: str = DEFAULT_TABLE) -> list[dict[str, Any]]:
    """The nftables JSON commands that replace `table` with what `decl` declares."""
    names = {n.name: n for n in decl.networks}
    for rule in decl.allow:
        sources = [] if source_subnet(rule.source) is not None else [rule.source]
        for name in [*sources, rule.target]:
            if name not in names:
                raise InvalidNetworkRequest(f"allow rule names network {name!r}, which does not exist")
    b = _Builder(table)
    b.commands += [{"add": _table(table)}, {"delete": _table(table)}, {"add": _table(table)}]
    b.chain("forward", "filter", "forward", 0)
    b.chain("input", "filter", "input", 0)
    b.chain("prerouting", "nat", "prerouting", -100)
    b.chain("output", "nat", "output", -100)
    b.chain("postrouting", "nat", "postrouting", 100)
    bridges = sorted(n.bridge for n in decl.networks)
    if not bridges:
        return b.commands

    # forward: established traffic first, then one chain per network decides the new connections
    # into it (in-<bridge>) and out of it to anything that is not a cocon network (out-<bridge>)
    internal = sorted(n.bridge for n in decl.networks if n.internal)
    b.rule("forward", _iif(bridges), _ct("state", ["established", "related"]), ACCEPT)
    b.rule("forward", _oif(bridges), _ct("state", ["established", "related"]), ACCEPT)
    for net in decl.networks:
        b.chain_regular(chain_names(net.bridge)[0])
        b.chain_regular(chain_names(net.bridge)[1])
    # one lookup per packet whatever the number of networks (verdict maps on the interface names)
    for key, which in (("oifname", 0), ("iifname", 1)):
        pairs = [[n.bridge, {"jump": {"target": chain_names(n.bridge)[which]}}] for n in decl.networks]
        b.rule("forward", {"vmap": {"key": _meta(key), "data": {"set": pairs}}})
    for net in decl.networks:
        inbound, outbound = chain_names(net.bridge)
        # within one bridge (seen here when br_netfilter is loaded)
        b.rule(inbound, _iif(net.bridge), ACCEPT, comment=f"within {net.name}")
        for rule in decl.allow:
            if rule.target != net.name:
                continue
            subnet = source_subnet(rule.source)
            expr: list[Expr] = []
            if subnet is not None:
                expr.append(_match(_payload(_fam(subnet.version), "saddr"), _prefix(subnet)))
            else:
                expr.append(_iif(names[rule.source].bridge))
            if rule.protocol is not None:
                expr.append(_match(_meta("l4proto"), rule.protocol))
                if rule.port is not None:
                    end = rule.port if rule.port_end is None else rule.port_end
                    dport: Any = rule.port if end == rule.port else {"range": [rule.port, end]}
                    expr.append(_match(_payload(rule.protocol, "dport"), dport))
            label = f"policy {rule.id} " if rule.id else ""
            b.rule(inbound, *expr, ACCEPT, comment=f"{label}allow {rule.source} -> {rule.target}")
        if net.internal:
            b.rule(inbound, DROP, comment=f"{net.name} is internal")
            b.rule(outbound, DROP, comment=f"{net.name} is internal")
            continue
        if internal:
            b.rule(inbound, _iif(internal), DROP, comment="internal networks reach nothing outside")
        b.rule(inbound, _ct("status", "dnat"), ACCEPT, comment=f"published in {net.name}")
        b.rule(inbound, DROP, comment=f"{net.name}: no other connections in")
        b.rule(outbound, ACCEPT, comment=f"{net.name} outbound")

    # input
    # replies to loopback-published connections come back to 127.0.0.1 through the bridge
    b.rule("input", _iif(bridges), _ct("state", ["established", "related"]), ACCEPT)
    b.rule("input", _iif(bridges), _match(_payload("ip", "daddr"), _prefix(LOOPBACK4)), DROP)
    for net in decl.networks:
        if not net.internal:
            continue
        for proto in ("udp", "tcp"):
            b.rule("input", _iif(net.bridge), _match(_payload(proto, "dport"), 53), ACCEPT)
        b.rule("input", _iif(net.bridge), DROP, comment=f"{net.name} is internal")

    # DNAT of published ports
    for pub in decl.published:
        owner_net = names.get(pub.network)
        if owner_net is None:
            raise InvalidNetworkRequest(
                f"published port {pub.mapping} names network {pub.network!r}, unknown"
            )
        if owner_net.internal:
            continue  # as Docker: an internal network publishes nothing
        m = pub.mapping
        if m.host_ip is not None and m.host_ip.version != pub.address.version:
            continue
        fam = _fam(pub.address.version)
        if m.host_ip is not None:
            where = _match(_payload(fam, "daddr"), str(m.host_ip))
        else:
            where = _match({"fib": {"result": "type", "flags": ["daddr"]}}, "local")
        target = {"dnat": {"family": fam, "addr": str(pub.address), "port": m.port}}
        for chain in ("prerouting", "output"):
            b.rule(
                chain,
                _match(_meta("nfproto"), "ipv4" if fam == "ip" else "ipv6"),
                where,
                _match(_payload(m.protocol, "dport"), m.host_port),
                target,
                comment=f"{m} -> {pub.address}",
            )

    # postrouting
    b.rule("postrouting", _oif(bridges), _match(_payload("ip", "saddr"), _prefix(LOOPBACK4)), MASQUERADE)
    for net in decl.networks:
        if net.internal:
            continue
        for subnet in net.subnets:
            fam = _fam(subnet.version)
            b.rule(
                "postrouting",
                _match(_payload(fam, "saddr"), _prefix(subnet)),
                _oif(net.bridge, "!="),
                MASQUERADE,
                comment=f"{net.name} outbound NAT",
            )
            # hairpin: an instance reaching a port published by a neighbour through a host address
            b.rule(
                "postrouting",
                _oif(net.bridge),
                _match(_payload(fam, "saddr"), _prefix(subnet)),
                _ct("status", "dnat"),
                MASQUERADE,
            )
    return b.commands


def _nft() -> Any:
    try:
        import nftables
    except ImportError:
        raise NetworkError(
            "the nftables Python bindings are missing: install Debian's python3-nftables (and nftables)"
        ) from None
    nft = nftables.Nftables()
    nft.set_json_output(True)
    return nft


def run(commands: Sequence[dict[str, Any]]) -> Any:
    """Send one JSON batch to nftables (one kernel transaction); return its output."""
    nft = _nft()
    rc, out, err = nft.json_cmd({"nftables": list(commands)})
    if rc != 0:
        raise NetworkError(f"nftables refused cocon's rules: {err.strip() or rc}; check that nftables works")
    return out


def apply(decl: Declaration, table: str = DEFAULT_TABLE) -> None:
    """Replace cocon's table with `decl`, atomically; with no networks the table is removed."""
    if not decl.networks:
        teardown(table)
        return
    run(build(decl, table))


def teardown(table: str = DEFAULT_TABLE) -> None:
    """Delete cocon's table (nothing else); no error if it is not there."""
    run([{"add": _table(table)}, {"delete": _table(table)}])


def table_exists(table: str = DEFAULT_TABLE) -> bool:
    nft = _nft()
    rc, _out, _err = nft.json_cmd({"nftables": [{"list": {"table": {"family": "inet", "name": table}}}]})
    return bool(rc == 0)


def forget_connections(sources: Sequence[IPNetwork], targets: Sequence[IPNetwork]) -> int:
    """Delete the conntrack entries of connections from `sources` to `targets` (after an allow rule
    went: an established connection — or a ping whose ICMP id comes again — would otherwise still
    pass the `established` accept). Returns how many went."""
    if not sources or not targets:
        return 0
    from pyroute2.conntrack import Conntrack  # type: ignore[import-untyped]

    gone = 0
    with Conntrack() as ct:
        matching = []
        for entry in list(ct.dump_entries()):  # the whole dump first: the socket answers one request
            orig = entry.tuple_orig
            try:
                src, dst = ipaddress.ip_address(orig.saddr), ipaddress.ip_address(orig.daddr)
            except (TypeError, ValueError):
                continue
            if any(src in s for s in sources) and any(dst in t for t in targets):
                matching.append(orig)
        for orig in matching:
            try:
                ct.entry("del", tuple_orig=orig)
                gone += 1
            except Exception:  # gone meanwhile
                pass
    return gone


def enable_forwarding(ipv6: bool) -> None:
    from cocon.network.links import write_sysctl

    write_sysctl("net/ipv4/ip_forward", "1")
    if ipv6:
        write_sysctl("net/ipv6/conf/all/forwarding", "1")
