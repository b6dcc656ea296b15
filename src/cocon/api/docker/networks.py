"""Network routes over the engine's stub records (cocon.engine.networks): list, inspect, create,
remove, prune. cocon has no bridged networking yet: `bridge`, `host` and `none` are listed as
Docker lists them, user networks are recorded with a warning, and connecting containers is
refused with 501 until the network layer exists."""

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
    qfilters,
    string_map,
)
from cocon.engine.networks import NOT_YET

if TYPE_CHECKING:
    from cocon.engine.engine import Engine

LIST_FILTERS = ("dangling", "driver", "id", "label", "name", "scope", "type")


def _list(engine: Engine, filters: dict[str, list[str]]) -> list[dict[str, Any]]:
    nets = engine.networks.list()
    docs = [n.to_docker() for n in nets]
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
    if dangling is not None:  # no container is attached to any network yet
        docs = [d for d in docs if (d["Name"] not in ("bridge", "host", "none")) == dangling]
    return docs


async def list_networks(request: web.Request) -> web.StreamResponse:
    filters = qfilters(request, LIST_FILTERS)
    return json_response(await ctx_of(request).call(_list, filters))


async def inspect_network(request: web.Request) -> web.StreamResponse:
    ref = request.match_info["id"]
    return json_response(await ctx_of(request).call(lambda e: e.networks.get(ref).to_docker()))


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
        net = engine.networks.remove(ref)
        engine.emit("network", "destroy", net.id, name=net.name, type=net.driver)

    await ctx_of(request).call(remove)
    return no_content()


async def prune_networks(request: web.Request) -> web.StreamResponse:
    filters = qfilters(request, ("label", "until"))
    if any(filters.values()):
        raise bad_request("the filters of network prune are not supported yet")

    def prune(engine: Engine) -> dict[str, Any]:
        removed = engine.networks.prune()
        for net in removed:
            engine.emit("network", "destroy", net.id, name=net.name, type=net.driver)
        return {"NetworksDeleted": [n.name for n in removed] or None}

    return json_response(await ctx_of(request).call(prune))


async def connect_network(request: web.Request) -> web.StreamResponse:
    raise HTTPError(501, f"connecting containers to networks is not supported yet: {NOT_YET}")


def register(app: web.Application) -> None:
    add_route(app, "GET", "/networks", list_networks)
    add_route(app, "POST", "/networks/create", create_network)
    add_route(app, "POST", "/networks/prune", prune_networks)
    add_route(app, "GET", "/networks/{id}", inspect_network)
    add_route(app, "DELETE", "/networks/{id}", remove_network)
    add_route(app, "POST", "/networks/{id}/connect", connect_network)
    add_route(app, "POST", "/networks/{id}/disconnect", connect_network)
