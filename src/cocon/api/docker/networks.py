"""Network routes over the engine's stub records (cocon.engine.networks): list, inspect, create,
remove, prune, connect, disconnect. cocon has no bridged networking yet: `bridge`, `host` and
`none` are listed as Docker lists them, user networks are recorded with a warning, and containers
created on (or connected to) a user network are recorded as its endpoints, with their aliases, but
run without a network (as with --network none; container create says so in its Warnings).
Endpoint settings that would need real networking (static addresses, links, MAC addresses, driver
options) are refused with 400."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from aiohttp import web

from cocon.api.docker.common import (
    HTTPError,
    add_route,
    bad_request,
    check_fields,
    ctx_of,
    filter_bool,
    json_body,
    json_response,
    label_matches,
    no_content,
    qbool,
    qfilters,
    string_map,
)
from cocon.engine.errors import NotFound
from cocon.engine.networks import NOT_YET

if TYPE_CHECKING:
    from cocon.engine.engine import Engine
    from cocon.engine.networks import Network

LIST_FILTERS = ("dangling", "driver", "id", "label", "name", "scope", "type")

# EndpointSettings (container create's NetworkingConfig.EndpointsConfig, network connect's
# EndpointConfig): what cocon records, what needs networking (refused unless empty), what is output.
_ENDPOINT_NEEDS_NETWORK = {
    "IPAMConfig": "static addresses need container networking",
    "Links": "cocon has no legacy links",
    "MacAddress": "MAC addresses need container networking",
    "DriverOpts": "endpoint driver options need container networking",
    "GwPriority": "gateway priorities need container networking",
}
_ENDPOINT_OUTPUT = {
    "NetworkID", "EndpointID", "Gateway", "IPAddress", "IPPrefixLen", "IPv6Gateway", "GlobalIPv6Address",
    "GlobalIPv6PrefixLen", "DNSNames",
}  # fmt: skip


def endpoint_aliases(config: Any, network: str) -> list[str]:
    """Validate one EndpointSettings object for `network`: its Aliases (the only setting cocon
    records); settings that need real networking are refused with 400."""
    if config is None:
        return []
    if not isinstance(config, dict):
        raise bad_request(f"the endpoint settings for network {network!r} must be a JSON object")
    for key, value in config.items():
        if key in _ENDPOINT_NEEDS_NETWORK:
            if isinstance(value, dict):
                value = {k: v for k, v in value.items() if v not in (None, "", [], {})}
            if value not in (None, "", [], {}, 0):
                raise bad_request(
                    f"network {network!r}: endpoint setting {key} is not supported: "
                    f"{_ENDPOINT_NEEDS_NETWORK[key]} ({NOT_YET})"
                )
        elif key not in _ENDPOINT_OUTPUT and key != "Aliases":
            raise bad_request(f"network {network!r}: unknown endpoint setting {key!r}")
    aliases = config.get("Aliases") or []
    if not isinstance(aliases, list) or not all(isinstance(a, str) for a in aliases):
        raise bad_request(f"network {network!r}: Aliases must be an array of strings")
    return list(aliases)


def drop_stale(engine: Engine) -> None:
    """Forget the endpoints of containers that are gone (removed by --rm or outside the API)."""
    engine.networks.drop_stale_endpoints(rec.id for rec in engine.instances.list())


def _doc(engine: Engine, net: Network) -> dict[str, Any]:
    return net.to_docker(engine.networks.endpoints(network_id=net.id))


def _list(engine: Engine, filters: dict[str, list[str]]) -> list[dict[str, Any]]:
    drop_stale(engine)
    nets = engine.networks.list()
    docs = [_doc(engine, n) for n in nets]
    if filters.get("driver"):
        docs = [d for d in docs if d["Driver"] in filters["driver"]]
    if filters.get("id"):
        docs = [d for d in docs if any(d["Id"].startswith(v) for v in filters["id"])]
    if filters.get("name"):
        try:
            patterns = [re.compile(p) for p in filters["name"]]
        except re.error as exc:
            raise bad_request(f"invalid name filter: {exc}") from None
        docs = [d for d in docs if any(p.search(d["Name"]) for p in patterns)]
    if filters.get("label"):
        docs = [d for d in docs if label_matches(d["Labels"], filters["label"])]
    if filters.get("scope"):
        docs = [d for d in docs if d["Scope"] in filters["scope"]]
    for kind in filters.get("type", []):
        if kind not in ("builtin", "custom"):
            raise bad_request(f"invalid network type {kind!r}: use builtin or custom")
    if filters.get("type"):
        docs = [
            d
            for d in docs
            if ("builtin" if d["Name"] in ("bridge", "host", "none") else "custom") in filters["type"]
        ]
    dangling = filter_bool(filters, "dangling")
    if dangling is not None:  # a user network no container is attached to (as dockerd)
        docs = [
            d
            for d in docs
            if (d["Name"] not in ("bridge", "host", "none") and not d["Containers"]) == dangling
        ]
    return docs


async def list_networks(request: web.Request) -> web.StreamResponse:
    filters = qfilters(request, LIST_FILTERS)
    return json_response(await ctx_of(request).call(_list, filters))


async def inspect_network(request: web.Request) -> web.StreamResponse:
    ref = request.match_info["id"]
    if request.query.get("scope", "") not in ("", "local"):
        raise bad_request("only the local scope exists here: leave scope out or give scope=local")
    qbool(request, "verbose")  # validated: there is no swarm to be verbose about

    def work(e: Engine) -> dict[str, Any]:
        drop_stale(e)
        return _doc(e, e.networks.get(ref))

    return json_response(await ctx_of(request).call(work))


async def create_network(request: web.Request) -> web.StreamResponse:
    body = check_fields(
        await json_body(request, required=True),
        {
            "Name": str, "Driver": str, "Internal": bool, "Attachable": bool, "EnableIPv6": bool,
            "EnableIPv4": bool, "Options": dict, "Labels": dict, "IPAM": dict, "CheckDuplicate": bool,
            "Scope": str,
        },
        what="network create",
        unsupported={
            "Ingress": "cocon has no swarm ingress networks",
            "ConfigOnly": "configuration-only networks are not supported",
            "ConfigFrom": "configuration-only networks are not supported",
        },
    )  # fmt: skip
    name = body.get("Name")
    if not name:
        raise bad_request("network create: Name is required")
    if body.get("Scope", "local") not in ("", "local"):
        raise bad_request("network create: only the local scope exists here")
    if body.get("EnableIPv4") is False:
        raise bad_request("network create: EnableIPv4=false is not supported")
    ipam = body.get("IPAM") or {}
    if ipam.get("Driver") not in (None, "", "default"):
        raise bad_request(f"IPAM driver {ipam.get('Driver')!r} is not supported: use the default")
    options = string_map(body.get("Options"), "Options")
    labels = string_map(body.get("Labels"), "Labels")

    def create(engine: Engine) -> dict[str, Any]:
        net = engine.networks.create(
            name,
            driver=body.get("Driver") or "bridge",
            internal=bool(body.get("Internal")),
            attachable=bool(body.get("Attachable")),
            ipv6=bool(body.get("EnableIPv6")),
            options=options,
            labels=labels,
            ipam=ipam,
        )
        engine.emit("network", "create", net.id, name=net.name, type=net.driver)
        return {"Id": net.id, "Warning": f"network {net.name} is recorded, but {NOT_YET}"}

    return json_response(await ctx_of(request).call(create), 201)


async def remove_network(request: web.Request) -> web.StreamResponse:
    ref = request.match_info["id"]

    def remove(engine: Engine) -> None:
        drop_stale(engine)
        net = engine.networks.remove(ref)
        engine.emit("network", "destroy", net.id, name=net.name, type=net.driver)

    await ctx_of(request).call(remove)
    return no_content()


async def prune_networks(request: web.Request) -> web.StreamResponse:
    filters = qfilters(request, ("label", "until"))
    if any(filters.values()):
        raise bad_request("the filters of network prune are not supported yet")

    def prune(engine: Engine) -> dict[str, Any]:
        drop_stale(engine)
        removed = engine.networks.prune()
        for net in removed:
            engine.emit("network", "destroy", net.id, name=net.name, type=net.driver)
        return {"NetworksDeleted": [n.name for n in removed] or None}

    return json_response(await ctx_of(request).call(prune))


async def connect_network(request: web.Request) -> web.StreamResponse:
    """Record the container as an endpoint of a user network (with its aliases): no connectivity."""
    ref = request.match_info["id"]
    body = check_fields(
        await json_body(request, required=True),
        {"Container": str, "EndpointConfig": dict},
        what="network connect",
    )
    container = body.get("Container") or ""
    if not container:
        raise bad_request("network connect: Container is required")

    def work(e: Engine) -> None:
        net = e.networks.get(ref)
        aliases = endpoint_aliases(body.get("EndpointConfig"), net.name)
        rec = e.instances.get(container)
        mode = str((rec.config["Create"].get("HostConfig") or {}).get("NetworkMode") or "none")
        if mode == "host":
            raise HTTPError(
                400, "container sharing network namespace with host cannot be connected to a network"
            )
        drop_stale(e)
        e.networks.connect(net.id, rec.id, rec.name, aliases)
        e.emit("network", "connect", net.id, name=net.name, type=net.driver, container=rec.id)

    await ctx_of(request).call(work)
    return no_content(200)


async def disconnect_network(request: web.Request) -> web.StreamResponse:
    ref = request.match_info["id"]
    body = check_fields(
        await json_body(request, required=True), {"Container": str, "Force": bool}, what="network disconnect"
    )
    container = body.get("Container") or ""
    if not container:
        raise bad_request("network disconnect: Container is required")

    def work(e: Engine) -> None:
        try:
            rec = e.instances.get(container)
            cid, cname = rec.id, rec.name
        except NotFound:
            if not body.get("Force"):
                raise
            # Force: drop the record of a container that is gone (by its name or ID)
            net = e.networks.get(ref)
            found = [
                ep for ep in e.networks.endpoints(network_id=net.id)
                if container in (ep.container_name, ep.container_id) or ep.container_id.startswith(container)
            ]  # fmt: skip
            if len(found) != 1:
                raise
            cid, cname = found[0].container_id, found[0].container_name
        net = e.networks.disconnect(ref, cid, cname)
        e.emit("network", "disconnect", net.id, name=net.name, type=net.driver, container=cid)

    await ctx_of(request).call(work)
    return no_content(200)


def register(app: web.Application) -> None:
    add_route(app, "GET", "/networks", list_networks)
    add_route(app, "POST", "/networks/create", create_network)
    add_route(app, "POST", "/networks/prune", prune_networks)
    add_route(app, "GET", "/networks/{id}", inspect_network)
    add_route(app, "DELETE", "/networks/{id}", remove_network)
    add_route(app, "POST", "/networks/{id}/connect", connect_network)
    add_route(app, "POST", "/networks/{id}/disconnect", disconnect_network)
