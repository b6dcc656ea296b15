"""Network routes: list, inspect, create, remove, prune, connect, disconnect.

Docker's records (IDs, labels, options, the IPAM request; `bridge`, `host`, `none` predefined) are
cocon.engine.networks'; the networks themselves (bridge, addresses, firewall, DNS) are the engine's
NetworkStack (cocon.engine.netattach), which a user network is made in at create. Inspect shows the
stack's IPAM config and the running containers' addresses. Connect/disconnect attach and detach a
running container at once, and change what a created or stopped one gets at its next start.
Endpoint settings cocon has no use for (links, MAC addresses, driver options) are refused with 400.

cocon's own routes for network policy (allow rules into a network) live here too, under
`/cocon/v1/networks/{id}/policy[/{rule}]`, with their part of the native OpenAPI document
(`OPENAPI_PATHS`, merged by cocon.api.docker.native); a network's `cocon.policy.allow-from` label
declares rules at create, and inspect shows them in a `Firewall` object (docs/network.md)."""

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
from cocon.engine.errors import Conflict, NotFound

if TYPE_CHECKING:
    from cocon.engine.engine import Engine
    from cocon.engine.networks import Network

_OPTIONS = {
    "com.docker.network.driver.mtu",
    "com.docker.network.bridge.enable_icc",
    "com.docker.network.bridge.enable_ip_masquerade",
}  # accepted with Docker's defaults only
LIST_FILTERS = ("dangling", "driver", "id", "label", "name", "scope", "type")

# EndpointSettings (container create's NetworkingConfig.EndpointsConfig, network connect's
# EndpointConfig): what cocon records, what needs networking (refused unless empty), what is output.
_ENDPOINT_NEEDS_NETWORK = {
    "Links": "cocon has no legacy links",
    "MacAddress": "cocon derives MAC addresses from the IP address",
    "DriverOpts": "the bridge driver has no endpoint options in cocon",
    "GwPriority": "gateway priorities are not supported",
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
                    f"{_ENDPOINT_NEEDS_NETWORK[key]}; leave it out"
                )
        elif key not in _ENDPOINT_OUTPUT and key not in ("Aliases", "IPAMConfig"):
            raise bad_request(f"network {network!r}: unknown endpoint setting {key!r}")
    aliases = config.get("Aliases") or []
    if not isinstance(aliases, list) or not all(isinstance(a, str) for a in aliases):
        raise bad_request(f"network {network!r}: Aliases must be an array of strings")
    return list(aliases)


def drop_stale(engine: Engine) -> None:
    """Forget the endpoints of containers that are gone (removed by --rm or outside the API)."""
    engine.networks.drop_stale_endpoints(rec.id for rec in engine.instances.list())


def _doc(engine: Engine, net: Network) -> dict[str, Any]:
    """Docker's document: the record, with the stack's IPAM config and the containers' addresses."""
    from cocon.engine import netattach

    doc = net.to_docker(engine.networks.endpoints(network_id=net.id))
    if net.name in ("host", "none"):
        return doc
    live = _stack_network(engine, net.name)
    if live is None:
        return doc
    doc["IPAM"]["Config"] = [
        {k: v for k, v in (("Subnet", str(s.subnet)), ("Gateway", str(s.gateway)),
                           ("IPRange", "" if s.ip_range is None else str(s.ip_range))) if v}
        for s in live.subnets
    ]  # fmt: skip
    names = {r.id: r.name for r in engine.instances.list()}
    for ep in netattach.stack(engine).endpoints(network=net.name):
        if ep.kind != "veth":
            continue
        entry = doc["Containers"].setdefault(ep.owner, {"Name": names.get(ep.owner, ep.name or "")})
        entry["EndpointID"] = netattach._endpoint_id(ep.owner, net.name)
        entry["MacAddress"] = ep.mac
        entry["IPv4Address"] = next((str(a) for a in ep.addresses if a.version == 4), "")
        entry["IPv6Address"] = next((str(a) for a in ep.addresses if a.version == 6), "")
    doc["Firewall"] = netattach.firewall_doc(engine, net.name)
    if net.name == "bridge":
        doc["Options"] = {"com.docker.network.bridge.default_bridge": "true",
                          "com.docker.network.bridge.name": live.bridge}  # fmt: skip
    return doc


def _stack_network(engine: Engine, name: str) -> Any:
    """The stack's network `name`, or None (none made yet: the default one before its first use)."""
    import os

    from cocon.engine import netattach

    if not os.path.exists(os.path.join(engine.root, "networks.db")) or not netattach._has_networks(engine):
        return None
    try:
        return netattach._call(lambda: netattach.stack(engine).get_network(name))
    except NotFound:
        return None


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

    return json_response(await ctx_of(request).call(network_inspect, ref))


def network_inspect(e: Engine, ref: str) -> dict[str, Any]:
    drop_stale(e)
    return _doc(e, e.networks.get(ref))


def network_create(engine: Engine, raw: Any) -> dict[str, Any]:
    """`POST /networks/create` (Docker's body) → {"Id", "Warning"}."""
    body = check_fields(
        raw,
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
    unknown = sorted(set(options) - _OPTIONS)
    if unknown:
        raise bad_request(
            f"network create: option(s) {', '.join(unknown)} are not supported: cocon knows "
            f"{', '.join(sorted(_OPTIONS))}"
        )
    for key in ("com.docker.network.bridge.enable_icc", "com.docker.network.bridge.enable_ip_masquerade"):
        if options.get(key, "true") != "true":
            raise bad_request(f"network create: option {key}={options[key]} is not supported (only true)")
    mtu = options.get("com.docker.network.driver.mtu", "1500")
    if not mtu.isdigit() or not 68 <= int(mtu) <= 65535:
        raise bad_request(f"network create: invalid MTU {mtu!r}: give 68-65535")
    if ipam.get("Options"):
        raise bad_request("network create: IPAM options are not supported; leave them out")
    configs = ipam.get("Config") or []
    if not isinstance(configs, list):
        raise bad_request("network create: IPAM.Config must be an array")
    has_v6 = any(isinstance(c, dict) and ":" in str(c.get("Subnet") or "") for c in configs)
    if body.get("EnableIPv6") and not has_v6:
        raise bad_request(
            "network create: EnableIPv6 needs an IPv6 subnet (e.g. --ipv6 --subnet fd00:1::/64)"
        )
    if has_v6 and not body.get("EnableIPv6"):
        raise bad_request("network create: an IPv6 subnet needs EnableIPv6 (--ipv6)")

    from cocon.engine import netattach

    driver = body.get("Driver") or "bridge"
    if driver != "bridge":
        raise bad_request(f"network driver {driver!r} is not supported: cocon makes bridge networks")
    netattach.spec_from_record(name, "", bool(body.get("Internal")), ipam, options)  # validated first
    declared = netattach.label_rules(labels)  # cocon.policy.allow-from: checked before anything is made
    net = engine.networks.create(
        name,
        driver=driver,
        internal=bool(body.get("Internal")),
        attachable=bool(body.get("Attachable")),
        ipv6=bool(body.get("EnableIPv6")),
        options=options,
        labels=labels,
        ipam=ipam,
    )
    try:
        netattach.ensure_network(engine, net.name)
        for source, ports in declared:
            netattach.policy_add(engine, net.name, source, ports, f"label {netattach.POLICY_LABEL}", "label")
    except BaseException:
        netattach.remove_network(engine, net.name)
        engine.networks.remove(net.id)
        raise
    engine.emit("network", "create", net.id, name=net.name, type=net.driver)
    return {"Id": net.id, "Warning": ""}


async def create_network(request: web.Request) -> web.StreamResponse:
    raw = await json_body(request, required=True)
    return json_response(await ctx_of(request).call(network_create, raw), 201)


async def remove_network(request: web.Request) -> web.StreamResponse:
    ref = request.match_info["id"]

    await ctx_of(request).call(network_remove, ref)
    return no_content()


def network_remove(engine: Engine, ref: str) -> None:
    drop_stale(engine)
    net = _remove(engine, ref)
    engine.emit("network", "destroy", net.id, name=net.name, type=net.driver)


async def prune_networks(request: web.Request) -> web.StreamResponse:
    filters = qfilters(request, ("label", "until"))
    if any(filters.values()):
        raise bad_request("the filters of network prune are not supported yet")

    def prune(engine: Engine) -> dict[str, Any]:
        drop_stale(engine)
        removed = []
        for net in engine.networks.list():
            if net.predefined or engine.networks.endpoints(network_id=net.id):
                continue
            try:
                removed.append(_remove(engine, net.id))
            except Conflict:
                continue  # a container is attached to it
        for net in removed:
            engine.emit("network", "destroy", net.id, name=net.name, type=net.driver)
        return {"NetworksDeleted": [n.name for n in removed] or None}

    return json_response(await ctx_of(request).call(prune))


def _remove(engine: Engine, ref: str) -> Network:
    """The network out of the stack (409 while attached), then its record (403 predefined, in use)."""
    from cocon.engine import netattach

    net = engine.networks.get(ref)
    if net.predefined or engine.networks.endpoints(network_id=net.id):
        engine.networks.remove(net.id)  # raises dockerd's 403
    netattach.remove_network(engine, net.name)
    return engine.networks.remove(net.id)


def network_connect(e: Engine, ref: str, raw: Any) -> None:
    """Connect a container to a user network: at once when it runs, else at its next start."""
    body = check_fields(
        raw,
        {"Container": str, "EndpointConfig": dict},
        what="network connect",
    )
    container = body.get("Container") or ""
    if not container:
        raise bad_request("network connect: Container is required")

    from cocon.engine import netattach

    net = e.networks.get(ref)
    aliases = endpoint_aliases(body.get("EndpointConfig"), net.name)
    ipam = (body.get("EndpointConfig") or {}).get("IPAMConfig") or {}
    if not isinstance(ipam, dict):
        raise bad_request("network connect: IPAMConfig must be an object")
    rec = e.instances.get(container)
    mode = str(rec.config.get("Network") or "none")
    if mode == "host":
        raise HTTPError(400, "container sharing network namespace with host cannot be connected to a network")
    drop_stale(e)
    e.networks.connect(net.id, rec.id, rec.name, aliases)
    try:
        netattach.connect(e, rec, net.name, aliases, ipam.get("IPv4Address"), ipam.get("IPv6Address"))
    except BaseException:
        e.networks.disconnect(net.id, rec.id, rec.name)
        raise
    e.emit("network", "connect", net.id, name=net.name, type=net.driver, container=rec.id)


async def connect_network(request: web.Request) -> web.StreamResponse:
    raw = await json_body(request, required=True)
    await ctx_of(request).call(network_connect, request.match_info["id"], raw)
    return no_content(200)


def network_disconnect(e: Engine, ref: str, raw: Any) -> None:
    body = check_fields(raw, {"Container": str, "Force": bool}, what="network disconnect")
    container = body.get("Container") or ""
    if not container:
        raise bad_request("network disconnect: Container is required")

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
    from cocon.engine import netattach

    net = e.networks.disconnect(ref, cid, cname)
    try:
        netattach.disconnect(e, e.instances.get(cid), net.name)
    except NotFound:
        pass  # the container is gone, or was connected before cocon had networking
    e.emit("network", "disconnect", net.id, name=net.name, type=net.driver, container=cid)


async def disconnect_network(request: web.Request) -> web.StreamResponse:
    raw = await json_body(request, required=True)
    await ctx_of(request).call(network_disconnect, request.match_info["id"], raw)
    return no_content(200)


# --- cocon's own: network policy (allow rules), under /cocon/v1 -----------------------------------------


async def list_policy(request: web.Request) -> web.StreamResponse:
    from cocon.engine import netattach

    return json_response(await ctx_of(request).call(netattach.policy_list, request.match_info["id"]))


def policy_add(engine: Engine, ref: str, raw: Any) -> dict[str, Any]:
    """`POST /cocon/v1/networks/{id}/policy` {From, Ports, Description} → the rule."""
    from cocon.engine import netattach

    body = check_fields(raw, {"From": str, "Ports": str, "Description": str}, what="network policy")
    source = body.get("From") or ""
    if not source:
        raise bad_request("network policy: From is required (a network's name or ID, or a subnet as CIDR)")
    rule = netattach.policy_add(engine, ref, source, body.get("Ports") or "", body.get("Description") or "")
    net = engine.networks.get(ref)
    engine.emit("network", "policy-add", net.id, name=net.name, type=net.driver, rule=rule["Id"])
    return rule


async def add_policy(request: web.Request) -> web.StreamResponse:
    raw = await json_body(request, required=True)
    return json_response(await ctx_of(request).call(policy_add, request.match_info["id"], raw), 201)


def policy_remove(engine: Engine, ref: str, rule_id: str) -> dict[str, Any]:
    from cocon.engine import netattach

    rule = netattach.policy_remove(engine, ref, rule_id)
    net = engine.networks.get(ref)
    engine.emit("network", "policy-rm", net.id, name=net.name, type=net.driver, rule=rule["Id"])
    return rule


async def remove_policy(request: web.Request) -> web.StreamResponse:
    m = request.match_info
    return json_response(await ctx_of(request).call(policy_remove, m["id"], m["rule"]))


_RULE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["Id", "Network", "From", "Ports", "Origin", "Active"],
    "properties": {
        "Id": {"type": "string", "description": "12 hex digits (a unique prefix names it too)"},
        "Network": {"type": "string", "description": "the network the rule lets traffic into"},
        "From": {"type": "string", "description": "a network's name, or a subnet (CIDR)"},
        "Ports": {"type": "string", "description": "PORT[-END]/PROTO, tcp, udp or all"},
        "Protocol": {"type": "string", "enum": ["tcp", "udp", "all"]},
        "Port": {"type": "integer"},
        "PortEnd": {"type": "integer"},
        "Origin": {"type": "string", "enum": ["user", "label"]},
        "Description": {"type": "string"},
        "Active": {"type": "boolean", "description": "false while the From network does not exist"},
        "Created": {"type": "string"},
    },
}


def _err(description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
    }


_NETWORK_PARAM = {
    "name": "id", "in": "path", "required": True, "schema": {"type": "string"},
    "description": "a user-defined network's name, ID or unique ID prefix",
}  # fmt: skip

OPENAPI_SCHEMAS: dict[str, Any] = {"PolicyRule": _RULE_SCHEMA}
OPENAPI_PATHS: dict[str, Any] = {
    "/cocon/v1/networks/{id}/policy": {
        "get": {
            "operationId": "networkPolicyList",
            "summary": "The allow rules into a network (its firewall's inbound chain)",
            "parameters": [_NETWORK_PARAM],
            "responses": {
                "200": {
                    "description": "the rules, oldest first",
                    "content": {
                        "application/json": {
                            "schema": {"type": "array", "items": {"$ref": "#/components/schemas/PolicyRule"}}
                        }
                    },
                },
                "400": _err("a network that takes no rules (bridge, host, none)"),
                "404": _err("no such network"),
            },
        },
        "post": {
            "operationId": "networkPolicyAdd",
            "summary": "Let another network (or a subnet) open connections to this network's instances",
            "parameters": [_NETWORK_PARAM],
            "requestBody": {
                "required": True,
                "content": {
                    "application/json": {
                        "schema": {
                            "type": "object",
                            "required": ["From"],
                            "additionalProperties": False,
                            "properties": {
                                "From": {"type": "string", "description": "a network (name or ID) or a CIDR"},
                                "Ports": {
                                    "type": "string",
                                    "description": "PORT[-END][/tcp|udp], tcp, udp; empty: everything",
                                },
                                "Description": {"type": "string"},
                            },
                        }
                    }
                },
            },
            "responses": {
                "201": {
                    "description": "the rule, in force",
                    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/PolicyRule"}}},
                },
                "400": _err("bad source, ports or body"),
                "404": _err("no such network (target or source)"),
                "409": _err("the network has this rule already"),
            },
        },
    },
    "/cocon/v1/networks/{id}/policy/{rule}": {
        "delete": {
            "operationId": "networkPolicyRemove",
            "summary": "Remove an allow rule: its traffic is blocked again",
            "parameters": [
                _NETWORK_PARAM,
                {
                    "name": "rule",
                    "in": "path",
                    "required": True,
                    "schema": {"type": "string"},
                    "description": "the rule's ID or a unique prefix",
                },
            ],
            "responses": {
                "200": {
                    "description": "the rule removed",
                    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/PolicyRule"}}},
                },
                "400": _err("a network that takes no rules, or an ambiguous prefix"),
                "404": _err("no such network or rule"),
            },
        }
    },
}


def register(app: web.Application) -> None:
    app.router.add_get("/cocon/v1/networks/{id}/policy", list_policy, allow_head=False)
    app.router.add_post("/cocon/v1/networks/{id}/policy", add_policy)
    app.router.add_delete("/cocon/v1/networks/{id}/policy/{rule}", remove_policy)
    add_route(app, "GET", "/networks", list_networks)
    add_route(app, "POST", "/networks/create", create_network)
    add_route(app, "POST", "/networks/prune", prune_networks)
    add_route(app, "GET", "/networks/{id}", inspect_network)
    add_route(app, "DELETE", "/networks/{id}", remove_network)
    add_route(app, "POST", "/networks/{id}/connect", connect_network)
    add_route(app, "POST", "/networks/{id}/disconnect", disconnect_network)
