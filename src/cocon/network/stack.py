"""`NetworkStack`: the facade the engine uses — networks, endpoints, firewall and DNS in one place.

State lives in the caller's SQLite database (the engine passes its own connection or a path), in
three tables next to IPAM's `ipam_allocations`:

    net_networks   name (key), id, bridge, subnets (JSON: [{subnet, gateway, ip_range}]), internal,
                   dns, mtu, is_default, created
    net_endpoints  (owner, network) key; kind ('veth' | 'tap'), host_ifname, ifname, netns, mac,
                   addresses (JSON: ['172.18.0.2/16', …]), name, aliases (JSON), ports (JSON:
                   ['127.0.0.1:8080:80/tcp', …]), created
    net_policies   (source, target, protocol, port) key: allow rules between networks

Everything else — bridges, veths, taps, the nftables table, the DNS listeners — is derived from
these rows and can be rebuilt from them (`restore()` at daemon start). Mutations take a file lock
in `run_dir` so that two processes sharing the database do not interleave.
"""

from __future__ import annotations

import _sqlite3 as sqlite3  # the C module: `sqlite3` itself adds imports to `cocon run`
import fcntl
import ipaddress
import os
import time

from cocon import _fastjson as json
from cocon._typing import TYPE_CHECKING, record
from cocon.network import firewall, links
from cocon.network.errors import (
    InvalidNetworkRequest,
    NetworkConflict,
    NetworkNotFound,
    PortInUse,
)
from cocon.network.firewall import PortMapping, parse_port_mapping
from cocon.network.ipam import (
    IPAddress,
    Ipam,
    IPNetwork,
    check_gateway,
    connect,
    default_gateway,
    host_routes,
    parse_address,
    parse_subnet,
    pick_subnet,
)

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Sequence
    from types import TracebackType

    from cocon.network.dns import DnsService

IPInterface = ipaddress.IPv4Interface | ipaddress.IPv6Interface

SCHEMA = """
CREATE TABLE IF NOT EXISTS net_networks (
    name TEXT PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    bridge TEXT NOT NULL UNIQUE,
    subnets TEXT NOT NULL,
    internal INTEGER NOT NULL DEFAULT 0,
    dns INTEGER NOT NULL DEFAULT 1,
    mtu INTEGER NOT NULL DEFAULT 1500,
    is_default INTEGER NOT NULL DEFAULT 0,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS net_endpoints (
    owner TEXT NOT NULL,
    network TEXT NOT NULL,
    kind TEXT NOT NULL,
    host_ifname TEXT NOT NULL UNIQUE,
    ifname TEXT NOT NULL,
    netns TEXT,
    mac TEXT NOT NULL,
    addresses TEXT NOT NULL,
    name TEXT,
    aliases TEXT NOT NULL DEFAULT '[]',
    ports TEXT NOT NULL DEFAULT '[]',
    created REAL NOT NULL,
    PRIMARY KEY (owner, network)
);
CREATE TABLE IF NOT EXISTS net_policies (
    source TEXT NOT NULL,
    target TEXT NOT NULL,
    protocol TEXT NOT NULL DEFAULT '',
    port INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (source, target, protocol, port)
);
"""

DEFAULT_NETWORK = "bridge"


@record(frozen=True)
class NetworkSpec:
    """What `ensure_network` makes. IPv4 always (a subnet from the pool unless one is given), IPv6
    when an IPv6 subnet is given. `gateways` pair with `subnets` by IP version."""

    name: str
    subnets: tuple[str, ...] = ()
    gateways: tuple[str, ...] = ()
    ip_range: str | None = None
    internal: bool = False
    id: str | None = None
    mtu: int = links.DEFAULT_MTU
    dns: bool | None = None  # default: on for user-defined networks, off for the default one
    default: bool = False


@record(frozen=True)
class Subnet:
    subnet: IPNetwork
    gateway: IPAddress
    ip_range: IPNetwork | None = None

    def to_json(self) -> dict[str, str | None]:
        rng = None if self.ip_range is None else str(self.ip_range)
        return {"subnet": str(self.subnet), "gateway": str(self.gateway), "ip_range": rng}


@record(frozen=True)
class Network:
    name: str
    id: str
    bridge: str
    subnets: tuple[Subnet, ...]
    internal: bool
    dns: bool
    mtu: int
    default: bool

    @property
    def gateways(self) -> tuple[IPAddress, ...]:
        return tuple(s.gateway for s in self.subnets)

    def rules(self) -> firewall.NetworkRules:
        return firewall.NetworkRules(
            self.name, self.bridge, tuple(s.subnet for s in self.subnets), self.gateways, self.internal
        )


@record(frozen=True)
class Endpoint:
    """An instance's place on a network. `addresses` are with their prefix; `gateways` one per
    family; `nameservers` what the instance's resolv.conf should list (empty: the host's)."""

    owner: str
    network: str
    kind: str  # 'veth' (containers; ifname inside netns) or 'tap' (VMs; host_ifname is the tap)
    host_ifname: str
    ifname: str
    netns: str | None
    mac: str
    addresses: tuple[IPInterface, ...]
    gateways: tuple[IPAddress, ...]
    nameservers: tuple[str, ...]
    name: str | None
    aliases: tuple[str, ...]
    ports: tuple[PortMapping, ...]

    @property
    def ip(self) -> IPAddress | None:
        return next((a.ip for a in self.addresses if a.version == 4), None)

    @property
    def ip6(self) -> IPAddress | None:
        return next((a.ip for a in self.addresses if a.version == 6), None)


class _Lock:
    """Re-entrant: a thread lock, and at the outermost level a flock on `path` (other processes)."""

    def __init__(self, path: str) -> None:
        import threading

        self.path = path
        self.lock = threading.RLock()
        self.depth = 0
        self.fd = -1

    def __enter__(self) -> None:
        self.lock.acquire()
        if self.depth == 0:
            try:
                self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
                fcntl.flock(self.fd, fcntl.LOCK_EX)
            except BaseException:
                if self.fd >= 0:
                    os.close(self.fd)
                    self.fd = -1
                self.lock.release()
                raise
        self.depth += 1

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.depth -= 1
        if self.depth == 0:
            os.close(self.fd)  # releases the flock
            self.fd = -1
        self.lock.release()


def _valid_name(name: str) -> None:
    ok = name and name[0].isalnum() and all(c.isalnum() or c in "_.-" for c in name) and len(name) <= 128
    if not ok:
        raise InvalidNetworkRequest(
            f"invalid network name {name!r}: use letters, digits, '_', '.', '-' "
            "(starting with a letter or digit)"
        )


class NetworkStack:
    """Networks and endpoints over `db` (an sqlite3 connection or a path); `run_dir` holds a lock.

    `table` is the nftables table (family inet) cocon owns; `default_bridge` the default network's
    bridge; `upstreams` the DNS forwarders (None: the host's resolv.conf; () disables forwarding).
    Tests pass unique table/bridge names so that several stacks can live side by side."""

    def __init__(
        self,
        db: sqlite3.Connection | str,
        run_dir: str,
        *,
        table: str = firewall.DEFAULT_TABLE,
        default_bridge: str = "cocon0",
        upstreams: Sequence[tuple[str, int]] | None = None,
        dns_port: int = 53,
    ) -> None:
        self.db = connect(db)
        self.db.executescript(SCHEMA)
        self.ipam = Ipam(self.db)
        self.run_dir = run_dir
        self.table = table
        self.default_bridge = default_bridge
        self.upstreams = None if upstreams is None else list(upstreams)  # None: read when needed
        self.dns_port = dns_port
        self._dns: DnsService | None = None
        self._records: dict[str, dict[str, list[IPAddress]]] = {}
        self._lock = _Lock(os.path.join(run_dir, "network.lock"))
        os.makedirs(run_dir, 0o700, exist_ok=True)

    # --- networks ---------------------------------------------------------------------------
    def _row_to_network(self, row: Sequence[object]) -> Network:
        name, nid, bridge, subnets, internal, dns, mtu, is_default = row
        subs = tuple(
            Subnet(
                ipaddress.ip_network(s["subnet"]),
                ipaddress.ip_address(s["gateway"]),
                None if s.get("ip_range") is None else ipaddress.ip_network(s["ip_range"]),
            )
            for s in json.loads(str(subnets))
        )
        return Network(
            str(name), str(nid), str(bridge), subs, bool(internal), bool(dns), int(str(mtu)), bool(is_default)
        )

    _NET_COLS = "name, id, bridge, subnets, internal, dns, mtu, is_default"

    def networks(self) -> list[Network]:
        rows = self.db.execute(f"SELECT {self._NET_COLS} FROM net_networks ORDER BY created").fetchall()
        return [self._row_to_network(r) for r in rows]

    def get_network(self, name: str) -> Network:
        row = self.db.execute(
            f"SELECT {self._NET_COLS} FROM net_networks WHERE name=? OR id=?", (name, name)
        ).fetchone()
        if row is None:
            raise NetworkNotFound(f"network {name} not found: create it first (or check `network ls`)")
        return self._row_to_network(row)

    def default_network(self) -> Network:
        """The default bridge network, made on first use (172.17.0.0/16 on `default_bridge`)."""
        return self.ensure_network(NetworkSpec(DEFAULT_NETWORK, default=True))

    def ensure_network(self, spec: NetworkSpec) -> Network:
        """The network `spec.name`, created (records, bridge, firewall, DNS) if missing."""
        _valid_name(spec.name)
        with self._lock:
            try:
                net = self.get_network(spec.name)
            except NetworkNotFound:
                net = self._create(spec)
            self._realize(net)
            self.rebuild_firewall()
            self._refresh_dns()
            return net

    def _create(self, spec: NetworkSpec) -> Network:
        others = [s.subnet for n in self.networks() for s in n.subnets]
        subnets = [parse_subnet(s) for s in spec.subnets]
        if len({s.version for s in subnets}) != len(subnets):
            raise InvalidNetworkRequest("give at most one IPv4 and one IPv6 subnet")
        for sub in subnets:
            for other in others:
                if sub.version == other.version and sub.overlaps(other):
                    raise NetworkConflict(
                        f"subnet {sub} overlaps subnet {other} of another network: pick a different --subnet"
                    )
        if not any(s.version == 4 for s in subnets):
            subnets.insert(0, pick_subnet(others, default=spec.default, routes=host_routes()))
        gateways = {g.version: g for g in (parse_address(t, "gateway") for t in spec.gateways)}
        ip_range = None if spec.ip_range is None else parse_subnet(spec.ip_range)
        subs: list[Subnet] = []
        for sub in subnets:
            gw = gateways.pop(sub.version, None) or default_gateway(sub)
            check_gateway(sub, gw)
            rng = ip_range if ip_range is not None and ip_range.version == sub.version else None
            if rng is not None and not rng.subnet_of(sub):  # type: ignore[arg-type]
                raise InvalidNetworkRequest(f"ip range {rng} is not inside subnet {sub}: fix --ip-range")
            subs.append(Subnet(sub, gw, rng))
        if gateways:
            raise InvalidNetworkRequest(
                f"gateway {next(iter(gateways.values()))} has no subnet of its IP version: add a --subnet"
            )
        nid = spec.id or os.urandom(32).hex()
        bridge = self.default_bridge if spec.default else "cn-" + nid[:12]
        dns = (not spec.default) if spec.dns is None else spec.dns
        try:
            with self.db:
                self.db.execute(
                    "INSERT INTO net_networks "
                    "(name, id, bridge, subnets, internal, dns, mtu, is_default, created) "
                    "VALUES (?,?,?,?,?,?,?,?,?)",
                    (
                        spec.name,
                        nid,
                        bridge,
                        json.dumps([s.to_json() for s in subs]),
                        int(spec.internal),
                        int(dns),
                        spec.mtu,
                        int(spec.default),
                        time.time(),
                    ),
                )
        except sqlite3.IntegrityError:
            raise NetworkConflict(f"network id {nid} or bridge {bridge} is already in use") from None
        return self.get_network(spec.name)

    def _realize(self, net: Network) -> None:
        """The kernel side of `net`: bridge, gateway addresses, sysctls."""
        ifaces = [ipaddress.ip_interface(f"{s.gateway}/{s.subnet.prefixlen}") for s in net.subnets]
        try:
            links.ensure_bridge(net.bridge, ifaces, mtu=net.mtu)
        except BaseException:
            if not links.link_exists(net.bridge):
                with self.db:
                    self.db.execute("DELETE FROM net_networks WHERE name=?", (net.name,))
            raise
        firewall.enable_forwarding(any(s.subnet.version == 6 for s in net.subnets))
        if not net.internal:
            links.write_sysctl(f"net/ipv4/conf/{net.bridge}/route_localnet", "1")

    def remove_network(self, name: str) -> None:
        """Remove a network with no endpoints: its bridge, rules, DNS listener and records."""
        with self._lock:
            net = self.get_network(name)
            users = self.endpoints(network=net.name)
            if users:
                raise NetworkConflict(
                    f"network {net.name} is in use by {len(users)} instance(s) "
                    f"({', '.join(e.owner[:12] for e in users)}): remove or disconnect them first"
                )
            with self.db:
                self.db.execute("DELETE FROM net_networks WHERE name=?", (net.name,))
                self.db.execute("DELETE FROM net_policies WHERE source=? OR target=?", (net.name, net.name))
            self.ipam.release_network(net.id)
            self.rebuild_firewall()
            self._refresh_dns()
            links.delete_link(net.bridge)

    # --- policies ---------------------------------------------------------------------------
    def allow(self, source: str, target: str, protocol: str | None = None, port: int | None = None) -> None:
        """Let instances of `source` open connections to instances of `target` (optionally only
        protocol/port)."""
        if protocol not in (None, "tcp", "udp") or (port is not None and protocol is None):
            raise InvalidNetworkRequest("an allow rule's protocol is tcp or udp, and a port needs a protocol")
        with self._lock:
            src, dst = self.get_network(source), self.get_network(target)
            with self.db:
                self.db.execute(
                    "INSERT OR IGNORE INTO net_policies (source, target, protocol, port) VALUES (?,?,?,?)",
                    (src.name, dst.name, protocol or "", port or 0),
                )
            self.rebuild_firewall()

    def disallow(
        self, source: str, target: str, protocol: str | None = None, port: int | None = None
    ) -> None:
        with self._lock:
            with self.db:
                self.db.execute(
                    "DELETE FROM net_policies WHERE source=? AND target=? AND protocol=? AND port=?",
                    (source, target, protocol or "", port or 0),
                )
            self.rebuild_firewall()

    def policies(self) -> list[firewall.AllowRule]:
        rows = self.db.execute("SELECT source, target, protocol, port FROM net_policies").fetchall()
        return [firewall.AllowRule(str(s), str(t), str(p) or None, int(n) or None) for s, t, p, n in rows]

    # --- endpoints --------------------------------------------------------------------------
    _EP_COLS = "owner, network, kind, host_ifname, ifname, netns, mac, addresses, name, aliases, ports"

    def _row_to_endpoint(self, row: Sequence[object], nets: dict[str, Network]) -> Endpoint:
        owner, network, kind, host_ifname, ifname, netns, mac, addresses, name, aliases, ports = row
        net = nets[str(network)]
        addrs = tuple(ipaddress.ip_interface(a) for a in json.loads(str(addresses)))
        families = {a.version for a in addrs}
        gateways = tuple(g for g in net.gateways if g.version in families)
        nameservers = tuple(str(g) for g in gateways) if net.dns else ()
        return Endpoint(
            str(owner),
            str(network),
            str(kind),
            str(host_ifname),
            str(ifname),
            None if netns is None else str(netns),
            str(mac),
            addrs,
            gateways,
            nameservers,
            None if name is None else str(name),
            tuple(json.loads(str(aliases))),
            tuple(parse_port_mapping(p) for p in json.loads(str(ports))),
        )

    def endpoints(self, *, owner: str | None = None, network: str | None = None) -> list[Endpoint]:
        sql = f"SELECT {self._EP_COLS} FROM net_endpoints"
        where, args = [], []
        if owner is not None:
            where.append("owner=?")
            args.append(owner)
        if network is not None:
            where.append("network=?")
            args.append(network)
        if where:
            sql += " WHERE " + " AND ".join(where)
        nets = {n.name: n for n in self.networks()}
        return [self._row_to_endpoint(r, nets) for r in self.db.execute(sql + " ORDER BY created", args)]

    def attach(
        self,
        network: str,
        owner: str,
        netns_path: str,
        *,
        ip: str | None = None,
        ip6: str | None = None,
        name: str | None = None,
        aliases: Iterable[str] = (),
        ports: Iterable[str | PortMapping] = (),
        ifname: str = "eth0",
        mac: str | None = None,
    ) -> Endpoint:
        """Put the namespace at `netns_path` on `network` through a veth pair (containers)."""
        return self._attach("veth", network, owner, netns_path, ip, ip6, name, aliases, ports, ifname, mac)

    def attach_tap(
        self,
        network: str,
        owner: str,
        *,
        ip: str | None = None,
        ip6: str | None = None,
        name: str | None = None,
        aliases: Iterable[str] = (),
        ports: Iterable[str | PortMapping] = (),
        mac: str | None = None,
    ) -> Endpoint:
        """A tap on `network`'s bridge for a microVM or VM (QEMU: `-netdev tap,ifname=<host_ifname>,
        script=no,downscript=no -device virtio-net,mac=<mac>`); the guest configures `addresses`,
        `gateways` and `nameservers` itself (kernel `ip=` or the guest agent)."""
        return self._attach("tap", network, owner, None, ip, ip6, name, aliases, ports, "eth0", mac)

    def _attach(
        self,
        kind: str,
        network: str,
        owner: str,
        netns_path: str | None,
        ip: str | None,
        ip6: str | None,
        name: str | None,
        aliases: Iterable[str],
        ports: Iterable[str | PortMapping],
        ifname: str,
        mac: str | None,
    ) -> Endpoint:
        mappings = tuple(p if isinstance(p, PortMapping) else parse_port_mapping(p) for p in ports)
        alias_list = sorted({a.lower() for a in aliases if a})
        with self._lock:
            net = self.get_network(network)
            if self.endpoints(owner=owner, network=net.name):
                raise NetworkConflict(f"{owner[:12]} is already connected to network {net.name}")
            if mappings and net.internal:
                raise InvalidNetworkRequest(
                    f"network {net.name} is internal: it cannot publish ports; use another network for -p"
                )
            self._check_ports(mappings)
            requested = {4: ip, 6: ip6}
            for version, text in requested.items():
                if text is not None and not any(s.subnet.version == version for s in net.subnets):
                    raise InvalidNetworkRequest(
                        f"network {net.name} has no IPv{version} subnet for address {text}"
                    )
            addrs: list[IPInterface] = []
            host_ifname = links.short_name("vc" if kind == "veth" else "tc", f"{owner}/{net.id}")
            try:
                for sub in net.subnets:
                    text = requested[sub.subnet.version]
                    addr = self.ipam.allocate(
                        net.id,
                        sub.subnet,
                        owner,
                        gateway=sub.gateway,
                        ip_range=sub.ip_range,
                        requested=None if text is None else parse_address(text),
                    )
                    addrs.append(ipaddress.ip_interface(f"{addr}/{sub.subnet.prefixlen}"))
                ip4 = next((a.ip for a in addrs if a.version == 4), None)
                mac = mac or links.mac_for(ip4, f"{owner}/{net.id}")
                if kind == "veth":
                    assert netns_path is not None
                    mac = links.create_veth(
                        net.bridge,
                        host_ifname,
                        netns_path,
                        ifname=ifname,
                        addresses=addrs,
                        gateways=[]
                        if net.internal
                        else [g for g in net.gateways if g.version in {a.version for a in addrs}],
                        mac=mac,
                        mtu=net.mtu,
                    )
                else:
                    links.create_tap(net.bridge, host_ifname, mtu=net.mtu)
                with self.db:
                    self.db.execute(
                        f"INSERT INTO net_endpoints ({self._EP_COLS}, created) "
                        "VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                        (
                            owner,
                            net.name,
                            kind,
                            host_ifname,
                            ifname,
                            netns_path,
                            mac,
                            json.dumps([str(a) for a in addrs]),
                            name,
                            json.dumps(alias_list),
                            json.dumps([str(m) for m in mappings]),
                            time.time(),
                        ),
                    )
                self.rebuild_firewall()
                self._refresh_dns()
            except BaseException:
                for a in addrs:
                    self.ipam.release(net.id, a.ip)
                links.delete_link(host_ifname)
                with self.db:
                    self.db.execute(
                        "DELETE FROM net_endpoints WHERE owner=? AND network=?", (owner, net.name)
                    )
                raise
            return self.endpoints(owner=owner, network=net.name)[0]

    def _check_ports(self, mappings: Sequence[PortMapping]) -> None:
        """A port taken by another instance, twice in `mappings`, or by a host socket: PortInUse."""
        taken = [m for e in self.endpoints() for m in e.ports]
        seen: list[PortMapping] = []
        for m in mappings:
            for other in taken + seen:
                if (
                    other.protocol == m.protocol
                    and other.host_port == m.host_port
                    and (other.host_ip is None or m.host_ip is None or other.host_ip == m.host_ip)
                ):
                    raise PortInUse(
                        f"host port {m.host_port}/{m.protocol} is already published ({other}): "
                        "pick another host port"
                    )
            firewall.check_port_free(m)
            seen.append(m)

    def detach(self, owner: str, network: str | None = None) -> list[Endpoint]:
        """Take `owner` off `network` (None: off every network): links, addresses, rules, names."""
        with self._lock:
            gone = self.endpoints(
                owner=owner, network=None if network is None else self.get_network(network).name
            )
            for ep in gone:
                links.delete_link(ep.host_ifname)
                net = self.get_network(ep.network)
                for a in ep.addresses:
                    self.ipam.release(net.id, a.ip)
                with self.db:
                    self.db.execute(
                        "DELETE FROM net_endpoints WHERE owner=? AND network=?", (owner, ep.network)
                    )
            if gone:
                self.rebuild_firewall()
                self._refresh_dns()
            return gone

    # --- firewall, DNS, life cycle ----------------------------------------------------------
    def declaration(self) -> firewall.Declaration:
        nets = self.networks()
        published = tuple(
            firewall.Published(ep.network, a.ip, m)
            for ep in self.endpoints()
            for m in ep.ports
            for a in ep.addresses
            if m.host_ip is None or m.host_ip.version == a.version
        )
        return firewall.Declaration(tuple(n.rules() for n in nets), published, tuple(self.policies()))

    def rebuild_firewall(self) -> None:
        """Replace cocon's nftables table with what the database describes (atomic)."""
        firewall.apply(self.declaration(), self.table)

    def _refresh_dns(self) -> None:
        records: dict[str, dict[str, list[IPAddress]]] = {}
        for ep in self.endpoints():
            names = records.setdefault(ep.network, {})
            for n in ([ep.name] if ep.name else []) + list(ep.aliases):
                names.setdefault(n.lower(), []).extend(a.ip for a in ep.addresses)
        self._records = records
        wanted: dict[str, tuple[str, Network]] = {}
        for net in self.networks():
            if net.dns:
                for gw in net.gateways:
                    wanted[f"{net.name}/{gw}"] = (str(gw), net)
        if not wanted and self._dns is None:
            return
        from cocon.network.dns import DnsService, Resolver

        if self._dns is None:
            self._dns = DnsService()
        for key in self._dns.keys():  # noqa: SIM118 (a method, not a dict)
            if key not in wanted:
                self._dns.unlisten(key)
        present = set(self._dns.keys())
        for key, (host, net) in wanted.items():
            if key in present:
                continue
            upstreams = () if net.internal else self._upstreams()
            self._dns.listen(
                key, host, self.dns_port, Resolver(self._lookup_for(net.name), upstreams=upstreams)
            )

    def _upstreams(self) -> list[tuple[str, int]]:
        from cocon.network.dns import read_resolv_conf

        mine = {str(g) for n in self.networks() for g in n.gateways}
        upstreams = read_resolv_conf() if self.upstreams is None else self.upstreams
        return [u for u in upstreams if u[0] not in mine]

    def _lookup_for(self, network: str) -> Callable[[str], list[IPAddress] | None]:
        def lookup(name: str) -> list[IPAddress] | None:
            return self._records.get(network, {}).get(name)

        return lookup

    def restore(self) -> None:
        """At daemon start: bridges and sysctls for every network, the firewall and DNS listeners,
        all from the database. Endpoints are kept; the engine detaches those whose instance is gone."""
        with self._lock:
            for net in self.networks():
                self._realize(net)
            self.rebuild_firewall()
            self._refresh_dns()

    def reset(self) -> None:
        """Remove every endpoint, network, link and cocon's nftables table: nothing is left."""
        with self._lock:
            for ep in self.endpoints():
                self.detach(ep.owner, ep.network)
            for net in self.networks():
                self.remove_network(net.name)
            firewall.teardown(self.table)
        self.close()

    def close(self) -> None:
        """Stop the DNS listeners (the daemon's shutdown); links and rules stay."""
        if self._dns is not None:
            self._dns.close()
            self._dns = None
