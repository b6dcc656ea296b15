"""`NetworkStack`: the facade the engine uses — networks, endpoints, firewall and DNS in one place.

State lives in the caller's SQLite database (the engine passes its own connection or a path), in
three tables next to IPAM's `ipam_allocations`:

    net_networks   name (key), id, bridge, subnets (JSON: [{subnet, gateway, ip_range}]), internal,
                   dns, mtu, is_default, created
    net_endpoints  (owner, network) key; kind ('veth' | 'tap'), host_ifname, ifname, netns, mac,
                   addresses (JSON: ['172.18.0.2/16', …]), name, aliases (JSON), ports (JSON:
                   ['127.0.0.1:8080:80/tcp', …]), created
    net_rules      id (key), target, source (a network name or a CIDR), protocol, port, port_end,
                   origin ('user' | 'label'), description, created: allow rules into networks

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
CREATE TABLE IF NOT EXISTS net_rules (
    id TEXT PRIMARY KEY,
    target TEXT NOT NULL,
    source TEXT NOT NULL,
    protocol TEXT NOT NULL DEFAULT '',
    port INTEGER NOT NULL DEFAULT 0,
    port_end INTEGER NOT NULL DEFAULT 0,
    origin TEXT NOT NULL DEFAULT 'user',
    description TEXT NOT NULL DEFAULT '',
    created REAL NOT NULL,
    UNIQUE (target, source, protocol, port, port_end)
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
class PolicyRule:
    """An allow rule into network `target` (see `NetworkStack.add_rule`). `active` is False while
    its source network does not exist (the rule waits for it)."""

    id: str
    target: str
    source: str
    protocol: str | None
    port: int | None
    port_end: int | None
    origin: str
    description: str
    created: float
    active: bool

    def allow_rule(self) -> firewall.AllowRule:
        return firewall.AllowRule(self.source, self.target, self.protocol, self.port, self.port_end, self.id)

    @property
    def ports(self) -> str:
        return self.allow_rule().ports_text()


def parse_rule_ports(text: str) -> tuple[str | None, int | None, int | None]:
    """`PORT[-END][/tcp|udp]` (tcp by default, as Docker's ports), `tcp`, `udp` (every port), `all`
    or '' (every protocol) → (protocol, port, port_end)."""
    text = text.strip().lower()
    if text in ("", "all", "any"):
        return None, None, None
    if text in ("tcp", "udp"):
        return text, None, None
    spec, _, proto = text.partition("/")
    proto = proto or "tcp"
    first, dash, last = spec.partition("-")
    ok = proto in ("tcp", "udp") and first.isdigit() and (not dash or last.isdigit())
    lo, hi = (int(first), int(last if dash else first)) if ok else (0, 0)
    if not ok or not 0 < lo <= hi < 65536:
        raise InvalidNetworkRequest(
            f"invalid port {text!r} for an allow rule: use PORT[-END][/tcp|udp] (e.g. 80/tcp, 8000-8010, "
            "53/udp), tcp or udp for every port, or leave it out for everything"
        )
    return proto, lo, (hi if hi != lo else None)


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
        self._migrate()
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
                # its own rules go; rules of other networks naming it wait for a network of that name
                self.db.execute("DELETE FROM net_rules WHERE target=?", (net.name,))
            self.ipam.release_network(net.id)
            self.rebuild_firewall()
            self._refresh_dns()
            links.delete_link(net.bridge)

    # --- policies ---------------------------------------------------------------------------
    _RULE_COLS = "id, target, source, protocol, port, port_end, origin, description, created"

    def _migrate(self) -> None:
        """Allow rules of the first schema (`net_policies`, no IDs) become `net_rules` rows."""
        old = self.db.execute(
            "SELECT name FROM sqlite_master WHERE type='table' AND name='net_policies'"
        ).fetchone()
        if old is None:
            return
        with self.db:
            for source, target, protocol, port in self.db.execute(
                "SELECT source, target, protocol, port FROM net_policies"
            ).fetchall():
                self.db.execute(
                    f"INSERT OR IGNORE INTO net_rules ({self._RULE_COLS}) VALUES (?,?,?,?,?,0,'user','',?)",
                    (os.urandom(6).hex(), target, source, protocol, port, time.time()),
                )
            self.db.execute("DROP TABLE net_policies")

    def add_rule(
        self,
        target: str,
        source: str,
        ports: str = "",
        *,
        description: str = "",
        origin: str = "user",
    ) -> PolicyRule:
        """Let `source` — a network's name (its instances) or a subnet in CIDR notation — open
        connections to the instances of network `target`; `ports` limits it (`parse_rule_ports`).
        The same rule twice is a NetworkConflict. A source network that does not exist is refused
        (a label-declared rule, origin 'label', may name one made later: it waits for it)."""
        protocol, port, port_end = parse_rule_ports(ports)
        if origin not in ("user", "label"):
            raise InvalidNetworkRequest(f"origin {origin!r}: user or label")
        if len(description) > 200 or any(c in description for c in "\n\r\0"):
            raise InvalidNetworkRequest("a rule's description is one line of at most 200 characters")
        with self._lock:
            dst = self.get_network(target)
            subnet = firewall.source_subnet(source)
            if subnet is not None:
                source = str(subnet)
            elif "/" in source:
                raise InvalidNetworkRequest(f"source {source!r} is not a subnet: give NETWORK or a CIDR")
            else:
                _valid_name(source)
                try:
                    source = self.get_network(source).name
                except NetworkNotFound:
                    if origin != "label":
                        raise NetworkNotFound(
                            f"network {source} not found: create it first, or give a subnet (CIDR) as --from"
                        ) from None
                if source == dst.name:
                    raise InvalidNetworkRequest(
                        f"instances of {dst.name} always reach each other: a rule from a network to itself "
                        "has no effect"
                    )
            rule_id = os.urandom(6).hex()
            try:
                with self.db:
                    self.db.execute(
                        f"INSERT INTO net_rules ({self._RULE_COLS}) VALUES (?,?,?,?,?,?,?,?,?)",
                        (rule_id, dst.name, source, protocol or "", port or 0, port_end or 0, origin,
                         description, time.time()),
                    )  # fmt: skip
            except sqlite3.IntegrityError:
                same = [r for r in self.rules(dst.name) if (r.source, r.protocol, r.port, r.port_end)
                        == (source, protocol, port, port_end)]  # fmt: skip
                raise NetworkConflict(
                    f"network {dst.name} already has this rule ({same[0].id if same else '?'}): "
                    "list them with `network policy ls`"
                ) from None
            try:
                self.rebuild_firewall()
            except BaseException:
                with self.db:
                    self.db.execute("DELETE FROM net_rules WHERE id=?", (rule_id,))
                raise
            return self.rule(dst.name, rule_id)

    def rules(self, target: str | None = None) -> list[PolicyRule]:
        """The allow rules (into `target`, or all), oldest first."""
        sql = f"SELECT {self._RULE_COLS} FROM net_rules"
        args: list[str] = []
        if target is not None:
            sql += " WHERE target=?"
            args.append(self.get_network(target).name)
        present = {n.name for n in self.networks()}
        out = []
        for rid, tgt, src, proto, port, port_end, origin, desc, created in self.db.execute(
            sql + " ORDER BY created, id", args
        ):
            out.append(
                PolicyRule(
                    str(rid), str(tgt), str(src), str(proto) or None, int(port) or None,
                    int(port_end) or None, str(origin), str(desc), float(created),
                    firewall.source_subnet(str(src)) is not None or str(src) in present,
                )
            )  # fmt: skip
        return out

    def rule(self, target: str, rule_id: str) -> PolicyRule:
        """Network `target`'s rule `rule_id` (a unique prefix will do)."""
        found = [r for r in self.rules(target) if r.id.startswith(rule_id.lower())] if rule_id else []
        if len(found) != 1:
            what = "is ambiguous" if found else "not found"
            raise (InvalidNetworkRequest if found else NetworkNotFound)(
                f"rule {rule_id!r} of network {target} {what}: list them with `network policy ls {target}`"
            )
        return found[0]

    def remove_rule(self, target: str, rule_id: str) -> PolicyRule:
        """Remove a rule: new connections it let through are dropped again, and so are the
        established ones (their conntrack entries are deleted)."""
        with self._lock:
            found = self.rule(target, rule_id)
            with self.db:
                self.db.execute("DELETE FROM net_rules WHERE id=?", (found.id,))
            self.rebuild_firewall()
            subnet = firewall.source_subnet(found.source)
            nets = {n.name: n for n in self.networks()}
            sources = [subnet] if subnet is not None else (
                [s.subnet for s in nets[found.source].subnets] if found.source in nets else []
            )  # fmt: skip
            firewall.forget_connections(sources, [s.subnet for s in nets[found.target].subnets])
            return found

    def allow(self, source: str, target: str, protocol: str | None = None, port: int | None = None) -> None:
        """`add_rule(target, source, …)` with the protocol and port apart (kept for callers and tests)."""
        if protocol not in (None, "tcp", "udp") or (port is not None and protocol is None):
            raise InvalidNetworkRequest("an allow rule's protocol is tcp or udp, and a port needs a protocol")
        ports = "" if protocol is None else (protocol if port is None else f"{port}/{protocol}")
        try:
            self.add_rule(target, source, ports)
        except NetworkConflict:
            pass

    def disallow(
        self, source: str, target: str, protocol: str | None = None, port: int | None = None
    ) -> None:
        with self._lock:
            for r in self.rules(target):
                if (r.source, r.protocol, r.port, r.port_end) == (source, protocol, port, None):
                    self.remove_rule(target, r.id)

    def policies(self) -> list[firewall.AllowRule]:
        """The rules the firewall enforces now (those whose source exists)."""
        return [r.allow_rule() for r in self.rules() if r.active]

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
            for m in mappings:
                if m.host_ip is None or m.host_ip.version == 4:
                    continue
                if m.host_ip.is_loopback:
                    raise InvalidNetworkRequest(
                        f"cannot publish {m} on [::1]: IPv6 has no route_localnet, so the kernel does not "
                        "route loopback traffic into a network (cocon runs no userland proxy); publish on "
                        "127.0.0.1, or on an IPv6 address of the host"
                    )
                if not any(s.subnet.version == 6 for s in net.subnets):
                    raise InvalidNetworkRequest(
                        f"cannot publish {m} on an IPv6 address: network {net.name} has no IPv6 subnet; "
                        "create the network with --ipv6 --subnet (e.g. fd00:1::/64)"
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

    def rename(self, owner: str, name: str | None) -> list[Endpoint]:
        """`owner`'s DNS name on every network is now `name` (its aliases stay)."""
        with self._lock:
            with self.db:
                cur = self.db.execute("UPDATE net_endpoints SET name=? WHERE owner=?", (name, owner))
            if cur.rowcount:
                self._refresh_dns()
            return self.endpoints(owner=owner)

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
