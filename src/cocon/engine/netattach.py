"""Containers on cocon's virtual networks (cocon.network): what the engine does at create, start and
stop of a container whose network mode is the default bridge or a user network (docs/network.md).

* create (`plan`): the network mode ("none", "host", "bridge" — Docker's "default" — or a user
  network's name), the endpoints wanted (`NetworkingConfig.EndpointsConfig`: aliases, fixed
  addresses) and the published ports (`HostConfig.PortBindings`, `PublishAllPorts` with the
  image's and the request's `ExposedPorts`) are checked and kept in the record's config
  (`Network`, `Endpoints`, `PortBindings`).
* start (`up`): a persistent network namespace at `$COCON_RUN/netns/<id>`, attached to each
  network (a veth on its bridge, an address from IPAM, DNS names, DNAT rules for the ports; a
  port already taken fails the start before the container runs), and `/etc/resolv.conf`,
  `/etc/hosts`, `/etc/hostname` written under `$COCON_ROOT/containers/<id>/` and bind-mounted.
  The runtime joins the namespace by its path (a runtime-spec namespace entry with `path`).
* stop (`down`): detached from every network (addresses released, rules and names gone), the
  namespace deleted. The daemon keeps the default network, as Docker keeps docker0 (making it
  costs a start ~60 ms); an engine without a daemon removes it once its last container went (its
  bridge and, with the last network, cocon's nftables table); a
  `NetworkStack.reset()` removes it for good.

"none" and "host" never import cocon.network (`cocon run --network none` stays lean). One
`NetworkStack` per state root and process is shared by the engines of all threads; only the
daemon (`enable_dns`) serves the embedded DNS. Its state is in `$COCON_ROOT/networks.db`, next to
the Docker records of cocon.engine.networks (IDs, labels, options), whose user networks it mirrors.
"""

from __future__ import annotations

import functools
import os
import threading

from cocon._typing import TYPE_CHECKING
from cocon.engine.errors import Conflict, EngineError, InvalidRequest, NotFound

if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any, TypeVar

    from cocon.engine.engine import Engine
    from cocon.engine.instances import InstanceRecord
    from cocon.network.stack import Endpoint, Network, NetworkStack

    T = TypeVar("T")

BUILTIN = ("none", "host", "bridge")
DEFAULT_RUN = "/run/cocon"

_STACKS: dict[str, NetworkStack] = {}
_RENAME_TOKENS: dict[str, int] = {}  # root -> events subscription of its stack (_follow_renames)
_STACKS_LOCK = threading.Lock()
_SERVE_DNS = False

HOSTS_HEAD = (
    "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\nfe00::0\tip6-localnet\n"
    "ff00::0\tip6-mcastprefix\nff02::1\tip6-allnodes\nff02::2\tip6-allrouters\n"
)


# --- the stack -------------------------------------------------------------------------------------
def names_for(run_dir: str) -> tuple[str, str]:
    """(nftables table, default bridge) for a run directory: Docker-like `cocon`/`cocon0` for the
    default one, names derived from the path for others (tests, several daemons side by side)."""
    if os.path.abspath(run_dir) == DEFAULT_RUN:
        return "cocon", "cocon0"
    import hashlib

    tag = hashlib.sha256(os.path.abspath(run_dir).encode()).hexdigest()[:8]
    return f"cocon_{tag}", f"cocon{tag}"


def _site() -> None:
    """pyroute2 and nftables are Debian's (system site-packages): a process started with `-S` (a
    container's exit command, cocon.engine.supervisor) adds the site directories first."""
    import sys

    if sys.flags.no_site and "site" not in sys.modules:
        import site

        site.main()


def enable_dns() -> None:
    """This process serves the embedded DNS of user networks (the daemon calls it first thing)."""
    global _SERVE_DNS
    _SERVE_DNS = True


def stack(engine: Engine) -> NetworkStack:
    """The process's NetworkStack for `engine`'s state (made on first use)."""
    key = engine.root
    found = _STACKS.get(key)
    if found is not None:
        return found
    with _STACKS_LOCK:
        found = _STACKS.get(key)
        if found is None:
            _site()
            from cocon.network.stack import NetworkStack

            table, bridge = names_for(engine.run_dir)
            cls = NetworkStack if _SERVE_DNS else _quiet_class()
            found = _call(
                lambda: cls(
                    os.path.join(engine.root, "networks.db"),
                    os.path.join(engine.run_dir, "network"),
                    table=table,
                    default_bridge=bridge,
                )
            )
            _STACKS[key] = found
            _follow_renames(engine, found)
        return found


def _follow_renames(engine: Engine, st: NetworkStack) -> None:
    """A renamed container answers to its new name on its networks' DNS (and no longer to the old
    one): the rename event of this process renames its endpoints. (A rename in another process is
    caught up by `restore`.)"""
    from cocon.engine.events import Event, subscribe

    root = engine.root

    def on_event(event: Event) -> None:
        if event.type != "container" or event.action != "rename":
            return
        from cocon.engine.instances import InstanceStore

        store = InstanceStore(root)
        try:
            name = store.get(event.actor).name
        finally:
            store.close()
        st.rename(event.actor, name)

    _RENAME_TOKENS[root] = subscribe(engine.events.path, on_event)


def _unfollow(root: str) -> None:
    from cocon.engine.events import unsubscribe

    token = _RENAME_TOKENS.pop(root, None)
    if token is not None:
        unsubscribe(token)


def _quiet_class() -> type[NetworkStack]:
    from cocon.network.stack import NetworkStack

    class QuietStack(NetworkStack):
        """A stack that does not serve DNS: processes other than the daemon (LocalClient, the exit
        command of a container when no daemon runs) leave the names to the daemon."""

        def _refresh_dns(self) -> None:
            pass

    return QuietStack


def reset(engine: Engine) -> None:
    """Everything of cocon's networking for this engine's state: endpoints, networks (the default
    one too), bridges, the nftables table and the namespaces directory (`cocon system reset`)."""
    import shutil

    with _STACKS_LOCK:
        st = _STACKS.pop(engine.root, None)
        _unfollow(engine.root)
    if st is None and os.path.exists(os.path.join(engine.root, "networks.db")):
        st = stack(engine)
        with _STACKS_LOCK:
            _STACKS.pop(engine.root, None)
            _unfollow(engine.root)
    if st is not None:
        _call(st.reset)
    shutil.rmtree(os.path.join(engine.run_dir, "netns"), ignore_errors=True)


def close_all() -> None:
    """Stop the DNS listeners (daemon shutdown); links and rules stay for the containers."""
    with _STACKS_LOCK:
        for root, st in _STACKS.items():
            st.close()
            _unfollow(root)
        _STACKS.clear()


def _call(fn: Callable[[], T]) -> T:
    """Run fn(), turning cocon.network's errors into the engine's (same HTTP statuses)."""
    from cocon.network.errors import NetworkError

    try:
        return fn()
    except NetworkError as exc:
        status = int(getattr(exc, "status", 500))
        cls = {400: InvalidRequest, 404: NotFound, 409: Conflict}.get(status, EngineError)
        raise cls(str(exc)) from None


def restore(engine: Engine) -> None:
    """At daemon start, after the live restore: bridges, firewall and DNS from the database;
    endpoints of containers that no longer run (their namespace is gone) are detached. Nothing
    (not even an import) when no network was ever made in the stack."""
    if not _has_networks(engine):
        return
    st = stack(engine)
    _call(st.restore)
    running = {r.id for r in engine.instances.list() if r.status == "running"}
    stale = [
        (ep.owner, ep.network)
        for ep in _call(st.endpoints)
        if ep.owner not in running or not os.path.exists(netns_path(engine, ep.owner))
    ]
    for owner, net in stale:
        _call(functools.partial(st.detach, owner, net))
    names = {r.id: r.name for r in engine.instances.list()}
    for ep in _call(st.endpoints):  # renamed while no daemon listened
        if ep.owner in names and ep.name is not None and ep.name != names[ep.owner]:
            _call(functools.partial(st.rename, ep.owner, names[ep.owner]))
    _drop_idle_default(engine)


def _has_networks(engine: Engine) -> bool:
    import _sqlite3

    path = os.path.join(engine.root, "networks.db")
    if not os.path.exists(path):
        return False
    db = _sqlite3.connect(path, timeout=30)
    try:
        return bool(db.execute("SELECT 1 FROM net_networks LIMIT 1").fetchone())
    except _sqlite3.OperationalError:
        return False  # no such table yet
    finally:
        db.close()


def ensure_network(engine: Engine, name: str) -> Network:
    """The stack's network `name`: the default bridge (made on first use), or a user network of
    cocon.engine.networks (made in the stack from its record if it is missing there)."""
    from cocon.network.stack import NetworkSpec

    st = stack(engine)
    if name == "bridge":
        record = engine.networks.get("bridge")
        try:
            return _call(lambda: st.get_network("bridge"))
        except NotFound:
            pass
        if os.path.abspath(engine.run_dir) == DEFAULT_RUN:
            try:
                return _call(lambda: st.ensure_network(NetworkSpec("bridge", id=record.id, default=True)))
            except Conflict:
                pass  # 172.17.0.0/16 is taken on this host (Docker's docker0): one from the pool
        from cocon.network.ipam import host_routes, pick_subnet

        others = [s.subnet for n in st.networks() for s in n.subnets]
        subnet = str(_call(lambda: pick_subnet(others, routes=host_routes())))
        spec = NetworkSpec("bridge", subnets=(subnet,), id=record.id, default=True)
        return _call(lambda: st.ensure_network(spec))
    try:
        return _call(lambda: st.get_network(name))
    except NotFound:
        pass
    record = engine.networks.get(name)
    spec = spec_from_record(record.name, record.id, record.internal, record.ipam, record.options)
    return _call(lambda: st.ensure_network(spec))


def spec_from_record(
    name: str, nid: str, internal: bool, ipam: dict[str, Any], options: dict[str, str] | None = None
) -> Any:
    """A NetworkSpec from Docker's IPAM object (`Config`: [{Subnet, Gateway, IPRange}]) and
    options (`com.docker.network.driver.mtu`)."""
    from cocon.network.stack import NetworkSpec

    subnets: list[str] = []
    gateways: list[str] = []
    ip_range = None
    for item in ipam.get("Config") or []:
        if not isinstance(item, dict):
            raise InvalidRequest("IPAM.Config entries must be objects with Subnet, Gateway, IPRange")
        unknown = set(item) - {"Subnet", "Gateway", "IPRange", "AuxiliaryAddresses"}
        if unknown or item.get("AuxiliaryAddresses"):
            raise InvalidRequest(
                f"IPAM.Config: {', '.join(sorted(unknown)) or 'AuxiliaryAddresses'} is not supported: "
                "give Subnet, Gateway and IPRange"
            )
        if item.get("Subnet"):
            subnets.append(str(item["Subnet"]))
        elif item.get("Gateway") or item.get("IPRange"):
            raise InvalidRequest("IPAM.Config: a Gateway or IPRange needs its Subnet")
        if item.get("Gateway"):
            gateways.append(str(item["Gateway"]))
        if item.get("IPRange"):
            if ip_range is not None:
                raise InvalidRequest("IPAM.Config: give at most one IPRange")
            ip_range = str(item["IPRange"])
    mtu = str((options or {}).get("com.docker.network.driver.mtu") or "1500")
    return NetworkSpec(
        name, subnets=tuple(subnets), gateways=tuple(gateways), ip_range=ip_range, internal=internal,
        id=nid or None, mtu=int(mtu) if mtu.isdigit() else 1500,
    )  # fmt: skip


def remove_network(engine: Engine, name: str) -> None:
    """Remove a user network from the stack (refused while containers are attached)."""
    st = stack(engine)
    try:
        _call(lambda: st.get_network(name))
    except NotFound:
        return
    _call(lambda: st.remove_network(name))


def _drop_idle_default(engine: Engine) -> None:
    """Remove the default network when no container is on it (see the module docstring) — not in
    the daemon, which keeps it as Docker keeps docker0: making it again costs ~60 ms of the next
    start (bridge, addresses, the nftables table)."""
    from cocon.network.errors import NetworkError

    if _SERVE_DNS:
        return
    st = stack(engine)
    try:
        with st._lock:
            if not st.endpoints(network="bridge") and any(n.name == "bridge" for n in st.networks()):
                st.remove_network("bridge")
    except NetworkError:
        pass


# --- create ----------------------------------------------------------------------------------------
def plan(
    engine: Engine, body: dict[str, Any], host: dict[str, Any], image_config: dict[str, Any]
) -> dict[str, Any]:
    """The network part of a container's config from its create request (validated)."""
    mode = str(host.get("NetworkMode") or "default")
    if mode == "default":
        mode = "bridge"
    if mode.startswith("container:"):
        raise InvalidRequest(
            f"network mode {mode!r} is not supported yet: use the default bridge, a user network, "
            "--network none or --network host"
        )
    if mode not in BUILTIN:
        mode = engine.networks.get(mode).name  # 404 for a network that does not exist
    endpoints: dict[str, dict[str, Any]] = {}
    if mode not in ("none", "host"):
        endpoints[mode] = {"Aliases": [], "IPv4Address": None, "IPv6Address": None}
    config = body.get("NetworkingConfig") or {}
    if not isinstance(config, dict):
        raise InvalidRequest("NetworkingConfig must be a JSON object")
    for name, settings in (config.get("EndpointsConfig") or {}).items():
        if name in ("default", "bridge") and mode == "bridge":
            name = "bridge"
        elif name not in BUILTIN:
            name = engine.networks.get(name).name
        if name in ("none", "host") or mode in ("none", "host"):
            if name == mode:
                continue
            raise InvalidRequest(
                f"container cannot be connected to network {name!r}: its network mode is {mode!r}"
            )
        endpoints.setdefault(name, {"Aliases": [], "IPv4Address": None, "IPv6Address": None})
        endpoints[name].update(endpoint_settings(settings, name))
        check_fixed(engine, name, endpoints[name]["IPv4Address"], endpoints[name]["IPv6Address"])
    ports = port_bindings(host, body, image_config)
    if ports and mode in ("none", "host"):
        ports = []  # Docker ignores -p with --network none/host
    return {"Network": mode, "Endpoints": endpoints, "PortBindings": ports}


def endpoint_settings(settings: Any, network: str) -> dict[str, Any]:
    """Docker's EndpointSettings → {Aliases, IPv4Address, IPv6Address}."""
    if settings is None:
        return {}
    if not isinstance(settings, dict):
        raise InvalidRequest(f"the endpoint settings for network {network!r} must be a JSON object")
    aliases = settings.get("Aliases") or []
    if not isinstance(aliases, list) or not all(isinstance(a, str) and a and " " not in a for a in aliases):
        raise InvalidRequest(f"network {network!r}: Aliases must be an array of host names")
    if aliases and network == "bridge":
        raise InvalidRequest("network-scoped aliases are supported only for containers in user networks")
    ipam = settings.get("IPAMConfig") or {}
    if not isinstance(ipam, dict):
        raise InvalidRequest(f"network {network!r}: IPAMConfig must be an object")
    out: dict[str, Any] = {"Aliases": list(dict.fromkeys(aliases))}
    for key in ("IPv4Address", "IPv6Address"):
        value = ipam.get(key) or None
        if value is not None and not isinstance(value, str):
            raise InvalidRequest(f"network {network!r}: IPAMConfig.{key} must be a string")
        if value is not None and network == "bridge":
            raise InvalidRequest(
                "user specified IP address is supported only when connecting to networks with user "
                "configured subnets: create a network and use --network NAME --ip ADDRESS"
            )
        out[key] = value
    return out


def check_fixed(engine: Engine, network: str, ip: str | None, ip6: str | None) -> None:
    """A fixed address needs a network with a user-configured subnet that holds it (Docker's rule)."""
    if not ip and not ip6:
        return
    import ipaddress

    record = engine.networks.get(network)
    subnets = []
    for item in record.ipam.get("Config") or []:
        try:
            subnets.append(ipaddress.ip_network(str(item.get("Subnet") or "")))
        except ValueError:
            continue
    for text in (ip, ip6):
        if not text:
            continue
        try:
            addr = ipaddress.ip_address(text)
        except ValueError:
            raise InvalidRequest(f"IPAMConfig: {text!r} is not an IP address") from None
        if not subnets:
            raise InvalidRequest(
                f"IPAMConfig address {text}: user specified IP address is supported only on networks with "
                f"a user configured subnet: create {network} with --subnet"
            )
        if not any(addr in n for n in subnets):
            raise InvalidRequest(
                f"IPAMConfig address {text}: no subnet of network {network} "
                f"({', '.join(map(str, subnets))}) contains it"
            )


def port_bindings(
    host: dict[str, Any], body: dict[str, Any], image_config: dict[str, Any]
) -> list[dict[str, Any]]:
    """HostConfig.PortBindings (+ every exposed port with PublishAllPorts) as
    [{Port, Proto, HostIp, HostPort (0: a free one at start)}]."""
    bindings = host.get("PortBindings") or {}
    if not isinstance(bindings, dict):
        raise InvalidRequest("HostConfig.PortBindings must map 'PORT/PROTO' to lists of bindings")
    out: list[dict[str, Any]] = []
    for key, items in bindings.items():
        port, proto = _port_key(key)
        for item in items or [{}]:
            if not isinstance(item, dict):
                raise InvalidRequest(f"HostConfig.PortBindings[{key!r}]: each binding is an object")
            host_ip = str(item.get("HostIp") or "").strip("[]")
            host_port = str(item.get("HostPort") or "0")
            first, dash, last = host_port.partition("-")
            if not first.isdigit() or (dash and not last.isdigit()) or not 0 <= int(first) < 65536:
                raise InvalidRequest(
                    f"invalid host port {host_port!r} for {key}: give 1-65535 or a range such as 8000-8010"
                )
            end = int(last) if dash else int(first)
            if dash and not 0 < int(first) <= end < 65536:
                raise InvalidRequest(
                    f"invalid host port range {host_port!r} for {key}: from low to high, 1-65535"
                )
            if host_ip:
                import ipaddress

                try:
                    addr = ipaddress.ip_address(host_ip)
                except ValueError:
                    raise InvalidRequest(f"invalid host IP {host_ip!r} for {key}") from None
                if addr.version == 6 and addr.is_loopback:
                    raise InvalidRequest(
                        f"cannot publish {key} on [::1]: IPv6 has no route_localnet, so the kernel does not "
                        "route loopback traffic to a container (cocon runs no userland proxy); publish on "
                        "127.0.0.1, or on an IPv6 address of the host with a network that has IPv6"
                    )
            binding = {"Port": port, "Proto": proto, "HostIp": host_ip, "HostPort": int(first)}
            if end > int(first):
                binding["HostPortEnd"] = end  # any free port of the range, picked at start (Docker's)
            out.append(binding)
    if host.get("PublishAllPorts"):
        exposed = dict(image_config.get("ExposedPorts") or {})
        exposed.update(body.get("ExposedPorts") or {})
        for key in exposed:
            port, proto = _port_key(key)
            if not any(b["Port"] == port and b["Proto"] == proto for b in out):
                out.append({"Port": port, "Proto": proto, "HostIp": "", "HostPort": 0})
    return out


def _port_key(key: object) -> tuple[int, str]:
    text = str(key)
    port, _, proto = text.partition("/")
    proto = proto or "tcp"
    if proto not in ("tcp", "udp") or not port.isdigit() or not 0 < int(port) < 65536:
        raise InvalidRequest(f"invalid port {text!r}: use PORT[/tcp|udp] with a port from 1 to 65535")
    return int(port), proto


# --- start and stop ---------------------------------------------------------------------------------
def netns_path(engine: Engine, instance_id: str) -> str:
    return os.path.join(engine.run_dir, "netns", instance_id)


def files_dir(engine: Engine, instance_id: str) -> str:
    """Where resolv.conf, hosts and hostname are kept (the container's directory, as Docker's)."""
    return os.path.join(engine.root, "containers", instance_id)


def up(engine: Engine, rec: InstanceRecord) -> tuple[str, list[dict[str, Any]]]:
    """Before the runtime config is written: (the `network` of InstanceConfig, extra mounts).
    For the bridge and user networks: the namespace made and attached, the files written."""
    cfg = rec.config
    mode = cfg.get("Network") or "none"
    if mode in ("none", "host"):
        return mode, []
    _site()
    from cocon.network.links import create_netns, delete_netns

    path = netns_path(engine, rec.id)
    down(engine, rec)  # leftovers of a start that did not finish
    st = stack(engine)
    if _call(lambda: st.endpoints(owner=rec.id)):
        _call(lambda: st.detach(rec.id))
    _call(lambda: create_netns(path))
    try:
        eps = []
        for name, want in (cfg.get("Endpoints") or {mode: {}}).items():
            eps.append(_attach(engine, st, rec, name, want, _ports(cfg) if name == mode else []))
        mounts = write_files(engine, rec, eps)
    except BaseException:
        try:
            _call(lambda: st.detach(rec.id))
        finally:
            try:
                delete_netns(path)
            except Exception:
                pass
            _drop_idle_default(engine)
        raise
    return path, mounts


def _attach(
    engine: Engine, st: NetworkStack, rec: InstanceRecord, name: str, want: dict[str, Any], ports: list[str]
) -> Endpoint:
    aliases = [*(want.get("Aliases") or []), rec.id[:12]]
    with st._lock:  # the default network is not removed between ensure and attach
        net = ensure_network(engine, name)
        used = {ep.ifname for ep in st.endpoints(owner=rec.id)}
        ifname = next(f"eth{n}" for n in range(len(used) + 1) if f"eth{n}" not in used)
        return _call(
            lambda: st.attach(
                net.name, rec.id, netns_path(engine, rec.id), ip=want.get("IPv4Address"),
                ip6=want.get("IPv6Address"), name=rec.name, aliases=aliases, ports=ports, ifname=ifname,
            )
        )  # fmt: skip


def _ports(cfg: dict[str, Any]) -> list[str]:
    """The port bindings as cocon.network mappings, free host ports picked for HostPort 0."""
    out: list[str] = []
    for b in cfg.get("PortBindings") or []:
        host_ip = b["HostIp"]
        ip = f"[{host_ip}]:" if ":" in host_ip else (f"{host_ip}:" if host_ip else "")
        if b.get("HostPortEnd"):
            host_port = _free_in_range(b, out, ip)
        else:
            host_port = b["HostPort"] or _free_port(b["HostIp"], b["Proto"])
        out.append(f"{ip}{host_port}:{b['Port']}/{b['Proto']}")
    return out


def _free_in_range(b: dict[str, Any], chosen: list[str], ip: str) -> int:
    """The first port of HostPort..HostPortEnd that no socket, no other instance and no earlier
    binding of this container holds (the stack's checks at attach are the last word)."""
    from cocon.network.errors import NetworkError
    from cocon.network.firewall import check_port_free, parse_port_mapping

    lo, hi, proto = int(b["HostPort"]), int(b["HostPortEnd"]), b["Proto"]
    taken = {(m.host_port, m.protocol) for m in (parse_port_mapping(c) for c in chosen)}
    for port in range(lo, hi + 1):
        if (port, proto) in taken:
            continue
        try:
            check_port_free(parse_port_mapping(f"{ip}{port}:{b['Port']}/{proto}"))
        except NetworkError:
            continue
        return port
    raise Conflict(
        f"every host port of {lo}-{hi}/{proto} is in use: stop what listens there or publish on another range"
    )


def _free_port(host_ip: str, proto: str) -> int:
    import socket

    family = socket.AF_INET6 if ":" in host_ip else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM) as s:
        s.bind((host_ip or "0.0.0.0", 0))
        return int(s.getsockname()[1])


def down(engine: Engine, rec: InstanceRecord) -> None:
    """After the container's process ended (or its start failed): off every network, namespace gone.
    Cheap when it has no namespace (network none/host, never started)."""
    path = netns_path(engine, rec.id)
    if not os.path.lexists(path):
        return
    _site()
    from cocon.network.links import delete_netns

    try:
        _call(lambda: stack(engine).detach(rec.id))
    finally:
        _call(lambda: delete_netns(path))
        _drop_idle_default(engine)


def write_files(engine: Engine, rec: InstanceRecord, eps: list[Endpoint]) -> list[dict[str, Any]]:
    """resolv.conf, hosts and hostname for the container (rewritten in place: a live connect
    updates what the container sees); bind mounts for those the user does not mount himself."""
    d = files_dir(engine, rec.id)
    os.makedirs(d, 0o700, exist_ok=True)
    hostname = str(rec.config.get("Hostname") or rec.id[:12])
    nameservers = [ns for ep in eps for ns in ep.nameservers]
    search: list[str] = []
    options: list[str] = []
    host_ns: list[str] = []
    try:
        with open("/etc/resolv.conf") as f:
            for line in f:
                words = line.split()
                if len(words) >= 2 and words[0] == "nameserver":
                    if not (words[1].startswith("127.") or words[1] == "::1"):
                        host_ns.append(words[1])
                elif words and words[0] == "search":
                    search = words[1:]
                elif words and words[0] == "options":
                    options += words[1:]
    except OSError:
        pass
    if not nameservers:
        nameservers = host_ns
        if any(ep.network != "bridge" for ep in eps):  # internal user networks: nothing to forward to
            nameservers = []
    resolv = "".join(f"nameserver {ns}\n" for ns in dict.fromkeys(nameservers))
    if search:
        resolv += "search " + " ".join(search) + "\n"
    if options:
        resolv += "options " + " ".join(options) + "\n"
    hosts = HOSTS_HEAD
    for ep in eps:
        for addr in ep.addresses:
            hosts += f"{addr.ip}\t{hostname}\n"
            break
    files = {"resolv.conf": resolv, "hosts": hosts, "hostname": hostname + "\n"}
    for name, text in files.items():
        fd = os.open(os.path.join(d, name), os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            os.write(fd, text.encode())
        finally:
            os.close(fd)
    taken = {m["Destination"] for m in rec.config.get("Mounts", [])}
    return [
        {"destination": f"/etc/{name}", "type": "bind", "source": os.path.join(d, name),
         "options": ["rbind", "rprivate", "rw"]}
        for name in files
        if f"/etc/{name}" not in taken
    ]  # fmt: skip


# --- connect and disconnect (docker network connect/disconnect) --------------------------------------
def connect(
    engine: Engine, rec: InstanceRecord, network: str, aliases: list[str], ip: str | None, ip6: str | None
) -> None:
    """Add `network` to the container's endpoints; attached at once when it runs."""
    cfg = rec.config
    mode = cfg.get("Network") or "none"
    if mode in ("none", "host"):
        raise InvalidRequest(
            f"container {rec.name} uses --network {mode}: it cannot be connected to a network"
        )
    check_fixed(engine, network, ip, ip6)
    endpoints = cfg.setdefault("Endpoints", {})
    if network in endpoints:
        raise Conflict(f"container {rec.name} is already connected to network {network}")
    endpoints[network] = {"Aliases": list(aliases), "IPv4Address": ip or None, "IPv6Address": ip6 or None}
    path = netns_path(engine, rec.id)
    if os.path.lexists(path):
        st = stack(engine)
        _attach(engine, st, rec, network, endpoints[network], [])
        try:
            write_files(engine, rec, _call(lambda: st.endpoints(owner=rec.id)))
        except OSError:
            pass
    engine.instances.update(rec.id, config=cfg)


def disconnect(engine: Engine, rec: InstanceRecord, network: str) -> None:
    cfg = rec.config
    endpoints = cfg.get("Endpoints") or {}
    if network not in endpoints:
        raise NotFound(f"container {rec.name} is not connected to network {network}")
    del endpoints[network]
    if os.path.lexists(netns_path(engine, rec.id)):
        st = stack(engine)
        _call(lambda: st.detach(rec.id, network))
        try:
            write_files(engine, rec, _call(lambda: st.endpoints(owner=rec.id)))
        except OSError:
            pass
        if network == "bridge":
            _drop_idle_default(engine)
    engine.instances.update(rec.id, config=cfg)


# --- inspect ------------------------------------------------------------------------------------------
def live_endpoints(engine: Engine, ids: list[str] | None = None) -> dict[str, list[Endpoint]]:
    """{container id: its endpoints} from the stack (only when some container has a namespace)."""
    netns_dir = os.path.join(engine.run_dir, "netns")
    try:
        present = set(os.listdir(netns_dir))
    except FileNotFoundError:
        return {}
    if ids is not None:
        present &= set(ids)
    if not present:
        return {}
    out: dict[str, list[Endpoint]] = {}
    for ep in _call(stack(engine).endpoints):
        if ep.owner in present:
            out.setdefault(ep.owner, []).append(ep)
    return out


def settings(rec: InstanceRecord, eps: list[Endpoint], net_ids: dict[str, str]) -> dict[str, Any]:
    """Docker's NetworkSettings (Networks, Ports, the top-level address fields) of a container."""
    cfg = rec.config
    mode = cfg.get("Network") or "none"
    live = {ep.network: ep for ep in eps}
    networks: dict[str, Any] = {}
    wanted = cfg.get("Endpoints") or {}
    if mode in ("none", "host"):
        wanted = {mode: {}}
    for name, want in wanted.items():
        ep = live.get(name)
        doc: dict[str, Any] = {
            "IPAMConfig": None, "Links": None, "Aliases": list(want.get("Aliases") or []) or None,
            "MacAddress": "", "DriverOpts": None, "NetworkID": net_ids.get(name, ""),
            "EndpointID": "", "Gateway": "", "IPAddress": "", "IPPrefixLen": 0, "IPv6Gateway": "",
            "GlobalIPv6Address": "", "GlobalIPv6PrefixLen": 0,
            "DNSNames": None if mode in ("none", "host") or name == "bridge" else
            list(dict.fromkeys([rec.name, rec.id[:12], *(want.get("Aliases") or [])])),
        }  # fmt: skip
        if want.get("IPv4Address") or want.get("IPv6Address"):
            doc["IPAMConfig"] = {k: want[k] for k in ("IPv4Address", "IPv6Address") if want.get(k)}
        if ep is not None:
            doc["MacAddress"] = ep.mac
            doc["EndpointID"] = _endpoint_id(rec.id, name)
            for a in ep.addresses:
                gw = next((str(g) for g in ep.gateways if g.version == a.version), "")
                if a.version == 4:
                    doc["IPAddress"], doc["IPPrefixLen"], doc["Gateway"] = str(a.ip), a.network.prefixlen, gw
                else:
                    doc["GlobalIPv6Address"], doc["GlobalIPv6PrefixLen"] = str(a.ip), a.network.prefixlen
                    doc["IPv6Gateway"] = gw
        networks[name] = doc
    ports: dict[str, Any] = {}
    for b in cfg.get("PortBindings") or []:
        ports.setdefault(f"{b['Port']}/{b['Proto']}", None)
    exposed = dict((cfg.get("Create") or {}).get("ExposedPorts") or {})
    for key in exposed:
        ports.setdefault(key if "/" in key else f"{key}/tcp", None)
    for ep in eps:
        for m in ep.ports:
            key = f"{m.port}/{m.protocol}"
            entries = ports.get(key) or []
            ips = [str(m.host_ip)] if m.host_ip is not None else _any_ips(ep)
            entries += [{"HostIp": ip, "HostPort": str(m.host_port)} for ip in ips]
            ports[key] = entries
    first = networks.get(mode) or {}
    return {
        "Bridge": "", "SandboxID": _endpoint_id(rec.id, "sandbox") if eps else "",
        "SandboxKey": (eps[0].netns or "") if eps else "", "HairpinMode": False,
        "LinkLocalIPv6Address": "", "LinkLocalIPv6PrefixLen": 0, "Ports": ports,
        "SecondaryIPAddresses": None, "SecondaryIPv6Addresses": None,
        "EndpointID": first.get("EndpointID", ""), "Gateway": first.get("Gateway", ""),
        "GlobalIPv6Address": first.get("GlobalIPv6Address", ""),
        "GlobalIPv6PrefixLen": first.get("GlobalIPv6PrefixLen", 0), "IPAddress": first.get("IPAddress", ""),
        "IPPrefixLen": first.get("IPPrefixLen", 0), "IPv6Gateway": first.get("IPv6Gateway", ""),
        "MacAddress": first.get("MacAddress", ""), "Networks": networks,
    }  # fmt: skip


def _any_ips(ep: Endpoint) -> list[str]:
    return ["0.0.0.0", "::"] if ep.ip6 is not None else ["0.0.0.0"]


def _endpoint_id(cid: str, network: str) -> str:
    import hashlib

    return hashlib.sha256(f"{cid}/{network}".encode()).hexdigest()


def port_list(eps: list[Endpoint], config: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """`GET /containers/json`'s Ports of a container: the published ones, and with `config` (the
    record's, for a running container) the exposed ones that are not published ({PrivatePort, Type}),
    as dockerd lists them."""
    out: list[dict[str, Any]] = []
    for ep in eps:
        for m in ep.ports:
            ips = [str(m.host_ip)] if m.host_ip is not None else _any_ips(ep)
            for ip in ips:
                out.append({"IP": ip, "PrivatePort": m.port, "PublicPort": m.host_port, "Type": m.protocol})
    if config is not None and (config.get("Network") or "none") != "host":
        published = {(p["PrivatePort"], p["Type"]) for p in out}
        exposed = dict((config.get("Create") or {}).get("ExposedPorts") or {})
        for key in exposed:
            port, _, proto = str(key).partition("/")
            if port.isdigit() and (int(port), proto or "tcp") not in published:
                out.append({"PrivatePort": int(port), "Type": proto or "tcp"})
    return out


# --- policy (cocon network policy) ----------------------------------------------------------------------
POLICY_LABEL = "cocon.policy.allow-from"
_LABEL_PORTS = r"^(\d+(-\d+)?(/(tcp|udp))?|tcp|udp|all)$"


def label_rules(labels: dict[str, str] | None) -> list[tuple[str, str]]:
    """The allow rules a network's labels declare: `cocon.policy.allow-from=SOURCE[:PORTS],…` with
    SOURCE a network name or a CIDR and PORTS as `network policy add --port` takes them
    (`frontend:80/tcp,monitoring,10.0.0.0/8:9100-9110`) → [(source, ports)]. Checked, not applied."""
    text = (labels or {}).get(POLICY_LABEL)
    if text is None:
        return []
    import re

    _site()
    from cocon.network.stack import parse_rule_ports

    out = []
    for item in text.replace(" ", ",").split(","):
        if not item:
            continue
        source, sep, ports = item.rpartition(":")
        if not sep or not re.match(_LABEL_PORTS, ports):
            source, ports = item, ""
        if not source:
            raise InvalidRequest(f"label {POLICY_LABEL}={text!r}: {item!r} names no source network")
        _call(functools.partial(parse_rule_ports, ports))
        out.append((source, ports))
    if not out:
        raise InvalidRequest(
            f"label {POLICY_LABEL} is empty: give SOURCE[:PORT[-END][/PROTO]],… (e.g. frontend:80/tcp)"
        )
    return out


def _policy_network(engine: Engine, ref: str) -> Network:
    record = engine.networks.get(ref)
    if record.name in ("host", "none"):
        raise InvalidRequest(
            f"network {record.name} has no firewall of cocon's: policies apply to bridge networks"
        )
    if record.name == "bridge":
        raise InvalidRequest(
            "the default bridge network takes no policies (as Docker's, it is kept simple): create a "
            "network (cocon network create NAME) and add the rules to it"
        )
    return ensure_network(engine, record.name)


def rule_doc(rule: Any) -> dict[str, Any]:
    """One rule as the API shows it."""
    import time

    return {
        "Id": rule.id, "Network": rule.target, "From": rule.source, "Ports": rule.ports,
        "Protocol": rule.protocol or "all", "Port": rule.port or 0,
        "PortEnd": rule.port_end or rule.port or 0,
        "Origin": rule.origin, "Description": rule.description, "Active": rule.active,
        "Created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(rule.created)),
    }  # fmt: skip


def policy_list(engine: Engine, network: str) -> list[dict[str, Any]]:
    net = _policy_network(engine, network)
    return [rule_doc(r) for r in _call(lambda: stack(engine).rules(net.name))]


def policy_add(
    engine: Engine, network: str, source: str, ports: str = "", description: str = "", origin: str = "user"
) -> dict[str, Any]:
    """Let `source` (a network, by name or ID, or a CIDR) reach `network`'s instances (on `ports`)."""
    net = _policy_network(engine, network)
    if "/" not in source and origin == "user":
        source = engine.networks.get(source).name  # an ID or a prefix of one is fine too
        if source in ("host", "none"):
            raise InvalidRequest(
                f"--from {source}: give a bridge network or a subnet (the host always reaches instances)"
            )
    st = stack(engine)
    if "/" not in source and origin == "user":
        ensure_network(engine, source)
    rule = _call(lambda: st.add_rule(net.name, source, ports, description=description, origin=origin))
    return rule_doc(rule)


def policy_remove(engine: Engine, network: str, rule_id: str) -> dict[str, Any]:
    net = _policy_network(engine, network)
    return rule_doc(_call(lambda: stack(engine).remove_rule(net.name, rule_id)))


def firewall_doc(engine: Engine, name: str) -> dict[str, Any] | None:
    """The "Firewall" section of `network inspect`: the nftables table and this network's chains,
    its rules. None when the network is not made (yet)."""
    from cocon.network.firewall import chain_names

    st = stack(engine)
    try:
        net = _call(lambda: st.get_network(name))
    except NotFound:
        return None
    inbound, outbound = chain_names(net.bridge)
    return {
        "Table": f"inet {st.table}",
        "Chains": {"Inbound": inbound, "Outbound": outbound},
        "Rules": [rule_doc(r) for r in _call(lambda: st.rules(net.name))],
    }
