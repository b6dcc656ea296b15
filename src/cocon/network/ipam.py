"""IP address management over one SQLite table: subnets, gateways, fixed and next-free addresses.

The table lives in whatever database the caller passes (the engine passes its own), so an address
and the instance record that holds it are in the same file:

    CREATE TABLE ipam_allocations (
        network TEXT NOT NULL,     -- the network's id (any stable key the caller chooses)
        address TEXT NOT NULL,     -- canonical text form (ipaddress's str()): '172.18.0.2', 'fd00::2'
        family INTEGER NOT NULL,   -- 4 or 6
        owner TEXT NOT NULL,       -- who holds it: an instance id
        created REAL NOT NULL,     -- time.time() when handed out
        PRIMARY KEY (network, address)
    );
    CREATE INDEX ipam_allocations_owner ON ipam_allocations(owner);

The primary key is what guarantees that no address is handed out twice, also between processes:
`allocate` picks the lowest free address it sees and inserts it; if another writer took it in
between, the insert fails and it picks again. Gateways, network and (IPv4) broadcast addresses are
never handed out; they are not rows, the caller passes the gateway.

Default subnets come from a pool like Docker's and podman's: 172.17.0.0/16 for the default network,
then 172.18.0.0/16 … 172.31.0.0/16, then 10.89.0.0/24 … 10.89.255.0/24, skipping any that overlaps a
route of the host (read with pyroute2) or a subnet another network already uses.
"""

from __future__ import annotations

import _sqlite3 as sqlite3  # the C module: `sqlite3` itself adds imports to `cocon run`
import ipaddress
import time

from cocon._typing import TYPE_CHECKING, record
from cocon.network.errors import AddressInUse, InvalidNetworkRequest, NetworkConflict, SubnetFull

if TYPE_CHECKING:
    from collections.abc import Iterable, Iterator

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

SCHEMA = """
CREATE TABLE IF NOT EXISTS ipam_allocations (
    network TEXT NOT NULL,
    address TEXT NOT NULL,
    family INTEGER NOT NULL,
    owner TEXT NOT NULL,
    created REAL NOT NULL,
    PRIMARY KEY (network, address)
);
CREATE INDEX IF NOT EXISTS ipam_allocations_owner ON ipam_allocations(owner);
"""

DEFAULT_SUBNET = ipaddress.IPv4Network("172.17.0.0/16")


def _pool() -> Iterator[ipaddress.IPv4Network]:
    for second in range(18, 32):
        yield ipaddress.IPv4Network(f"172.{second}.0.0/16")
    for third in range(256):
        yield ipaddress.IPv4Network(f"10.89.{third}.0/24")


@record(frozen=True)
class Allocation:
    network: str
    address: IPAddress
    owner: str


def connect(db: sqlite3.Connection | str) -> sqlite3.Connection:
    """The connection to use: `db` itself, or a new one to the file `db` (autocommit, WAL)."""
    if isinstance(db, sqlite3.Connection):
        return db
    try:
        conn = sqlite3.connect(db, timeout=30, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
    except sqlite3.Error as exc:
        raise NetworkConflict(
            f"cannot open the network database {db}: {exc}; check that it is writable"
        ) from None
    return conn


def parse_subnet(text: str) -> IPNetwork:
    """'172.20.0.0/16' or 'fd00:1::/64' as a network; host bits set is an error (as Docker's)."""
    try:
        net = ipaddress.ip_network(text, strict=True)
    except ValueError as exc:
        raise InvalidNetworkRequest(
            f"invalid subnet {text!r}: {exc}; give a network address with a prefix, e.g. 172.20.0.0/16"
        ) from None
    limit = 30 if net.version == 4 else 126
    if net.prefixlen > limit:
        raise InvalidNetworkRequest(f"subnet {text} is too small: use a prefix of /{limit} or shorter")
    return net


def parse_address(text: str, what: str = "address") -> IPAddress:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        raise InvalidNetworkRequest(f"invalid {what} {text!r}: give an IPv4 or IPv6 address") from None


def default_gateway(subnet: IPNetwork) -> IPAddress:
    """The first host address, as Docker and podman pick it."""
    return subnet.network_address + 1


def _reserved(subnet: IPNetwork, gateway: IPAddress | None) -> set[IPAddress]:
    out: set[IPAddress] = {subnet.network_address}
    if subnet.version == 4:
        out.add(subnet.broadcast_address)
    if gateway is not None:
        out.add(gateway)
    return out


def check_gateway(subnet: IPNetwork, gateway: IPAddress) -> None:
    if gateway.version != subnet.version or gateway not in subnet or gateway in _reserved(subnet, None):
        raise InvalidNetworkRequest(
            f"gateway {gateway} is not a host address of subnet {subnet}: pick one inside it"
        )


def host_routes() -> list[IPNetwork]:
    """The destinations of the host's routes (main table, both families), the default routes left out."""
    from pyroute2 import IPRoute

    out: list[IPNetwork] = []
    with IPRoute() as ipr:
        for route in ipr.get_routes(table=254):
            dst = route.get_attr("RTA_DST")
            plen = int(route["dst_len"])
            if dst is None or plen == 0:
                continue
            try:
                out.append(ipaddress.ip_network(f"{dst}/{plen}", strict=False))
            except ValueError:
                continue
    return out


def pick_subnet(
    taken: Iterable[IPNetwork], *, default: bool = False, routes: Iterable[IPNetwork] | None = None
) -> ipaddress.IPv4Network:
    """A free IPv4 subnet: 172.17.0.0/16 for the default network, else the first of the pool that
    overlaps neither `taken` (other networks' subnets) nor the host's routes."""
    busy = [n for n in taken if n.version == 4]
    busy += [n for n in (host_routes() if routes is None else routes) if n.version == 4]
    candidates: Iterable[ipaddress.IPv4Network] = [DEFAULT_SUBNET] if default else _pool()
    for cand in candidates:
        if not any(cand.overlaps(b) for b in busy):
            return cand
    if default:
        raise NetworkConflict(
            f"the default subnet {DEFAULT_SUBNET} overlaps a route or network of this host: "
            "remove the overlap or give the default network another subnet"
        )
    raise NetworkConflict("no free subnet left in cocon's pool: give the network a --subnet")


class Ipam:
    """Allocations over the `ipam_allocations` table of `db` (a connection or a file path)."""

    def __init__(self, db: sqlite3.Connection | str) -> None:
        self.db = connect(db)
        self.db.executescript(SCHEMA)  # idempotent

    def allocate(
        self,
        network: str,
        subnet: IPNetwork,
        owner: str,
        *,
        gateway: IPAddress | None = None,
        ip_range: IPNetwork | None = None,
        requested: IPAddress | None = None,
    ) -> IPAddress:
        """Hand `owner` an address of `subnet`: `requested` if given (it must be free or already
        `owner`'s), else the lowest free one of `ip_range` (default: the whole subnet)."""
        reserved = _reserved(subnet, gateway)
        if requested is not None:
            if requested.version != subnet.version or requested not in subnet or requested in reserved:
                raise InvalidNetworkRequest(
                    f"address {requested} is not a free host address of subnet {subnet} "
                    f"(network, broadcast and gateway {gateway} are reserved): pick another --ip"
                )
            if self._insert(network, requested, owner):
                return requested
            holder = self._holder(network, requested)
            if holder == owner:
                return requested
            raise AddressInUse(
                f"address {requested} of network {network} is already in use by {holder}: "
                "pick another --ip or leave it out to get a free one"
            )
        pool = subnet if ip_range is None else ip_range
        if ip_range is not None and (ip_range.version != subnet.version or not ip_range.subnet_of(subnet)):  # type: ignore[arg-type]
            raise InvalidNetworkRequest(f"ip range {ip_range} is not inside subnet {subnet}: fix --ip-range")
        for _attempt in range(100):
            used = self._used(network) | reserved
            candidate = _lowest_free(pool, used)
            if candidate is None:
                raise SubnetFull(
                    f"no free address left in {pool} of network {network} ({len(used - reserved)} in use): "
                    "remove instances from it or create a network with a larger --subnet"
                )
            if self._insert(network, candidate, owner):
                return candidate
        raise NetworkConflict(f"could not allocate an address in {network}: too much contention, try again")

    def _insert(self, network: str, address: IPAddress, owner: str) -> bool:
        try:
            with self.db:
                self.db.execute(
                    "INSERT INTO ipam_allocations (network, address, family, owner, created) "
                    "VALUES (?,?,?,?,?)",
                    (network, str(address), address.version, owner, time.time()),
                )
        except sqlite3.IntegrityError:
            return False
        return True

    def _holder(self, network: str, address: IPAddress) -> str | None:
        row = self.db.execute(
            "SELECT owner FROM ipam_allocations WHERE network=? AND address=?", (network, str(address))
        ).fetchone()
        return None if row is None else str(row[0])

    def _used(self, network: str) -> set[IPAddress]:
        rows = self.db.execute("SELECT address FROM ipam_allocations WHERE network=?", (network,))
        return {ipaddress.ip_address(r[0]) for r in rows}

    def release(self, network: str, address: IPAddress) -> bool:
        """Give `address` back; False if it was not handed out."""
        with self.db:
            cur = self.db.execute(
                "DELETE FROM ipam_allocations WHERE network=? AND address=?", (network, str(address))
            )
        return cur.rowcount > 0

    def release_owner(self, owner: str) -> list[Allocation]:
        """Give back every address `owner` holds (all networks); returns what was released."""
        held = self.allocations(owner=owner)
        with self.db:
            self.db.execute("DELETE FROM ipam_allocations WHERE owner=?", (owner,))
        return held

    def release_network(self, network: str) -> int:
        with self.db:
            cur = self.db.execute("DELETE FROM ipam_allocations WHERE network=?", (network,))
        return cur.rowcount

    def allocations(self, network: str | None = None, owner: str | None = None) -> list[Allocation]:
        sql = "SELECT network, address, owner FROM ipam_allocations"
        where: list[str] = []
        args: list[str] = []
        if network is not None:
            where.append("network=?")
            args.append(network)
        if owner is not None:
            where.append("owner=?")
            args.append(owner)
        if where:
            sql += " WHERE " + " AND ".join(where)
        rows = self.db.execute(sql + " ORDER BY network, family, address", args).fetchall()
        return [Allocation(str(n), ipaddress.ip_address(a), str(o)) for n, a, o in rows]


def _lowest_free(pool: IPNetwork, used: set[IPAddress]) -> IPAddress | None:
    """The lowest address of `pool` not in `used`: a walk of at most len(used)+1 steps."""
    first = int(pool.network_address)
    last = int(pool.broadcast_address)
    cls = type(pool.network_address)
    value = first
    while value <= last:
        addr = cls(value)
        if addr not in used:
            return addr
        value += 1
    return None
