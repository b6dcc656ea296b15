"""Volume routes: list (with filters), create, inspect, remove, prune — through the engine's
`ImageOps.volume_*` (cocon.storage.volumes: local directories, and qcow2 disks for VMs)."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from aiohttp import web

from cocon.api.docker.common import (
    add_route,
    api_version,
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

if TYPE_CHECKING:
    from cocon.engine.engine import Engine

LIST_FILTERS = ("dangling", "driver", "label", "name")


def _list(engine: Engine, filters: dict[str, list[str]]) -> dict[str, Any]:
    doc = engine.imageops.volume_list()
    volumes = doc["Volumes"]
    dangling = filter_bool(filters, "dangling")
    if dangling is not None:
        volumes = [v for v in volumes if (not engine.instances.volume_users(v["Name"])) == dangling]
    if filters.get("driver"):
        volumes = [v for v in volumes if v["Driver"] in filters["driver"]]
    if filters.get("label"):
        volumes = [v for v in volumes if label_matches(v.get("Labels"), filters["label"])]
    if filters.get("name"):
        try:
            patterns = [re.compile(p) for p in filters["name"]]
        except re.error as exc:
            raise bad_request(f"invalid name filter: {exc}") from None
        volumes = [v for v in volumes if any(p.search(v["Name"]) for p in patterns)]
    doc["Volumes"] = volumes
    return doc


async def list_volumes(request: web.Request) -> web.StreamResponse:
    filters = qfilters(request, LIST_FILTERS)
    return json_response(await ctx_of(request).call(_list, filters))


async def create_volume(request: web.Request) -> web.StreamResponse:
    body = check_fields(
        await json_body(request),
        {"Name": str, "Driver": str, "DriverOpts": dict, "Labels": dict},
        what="volume create",
        unsupported={"ClusterVolumeSpec": "cocon has no cluster volumes (no swarm)"},
    )
    driver = body.get("Driver") or "local"
    if driver != "local":
        raise bad_request(f"volume driver {driver!r} is not supported: cocon has the local driver only")
    opts = string_map(body.get("DriverOpts"), "DriverOpts")
    labels = string_map(body.get("Labels"), "Labels")
    name = body.get("Name") or None
    # DriverOpts {"type": "disk", "size": "10G"}: a disk volume for VMs; other keys are refused (400)
    doc = await ctx_of(request).call(lambda e: e.imageops.volume_create(name, labels, opts or None))
    return json_response(doc, 201)


async def inspect_volume(request: web.Request) -> web.StreamResponse:
    name = request.match_info["name"]
    return json_response(await ctx_of(request).call(lambda e: e.imageops.volume_inspect(name)))


async def remove_volume(request: web.Request) -> web.StreamResponse:
    name = request.match_info["name"]
    force = qbool(request, "force")
    await ctx_of(request).call(lambda e: e.imageops.volume_remove(name, force=force))
    return no_content()


async def prune_volumes(request: web.Request) -> web.StreamResponse:
    filters = qfilters(request, ("all", "label"))
    if filters.get("label"):
        raise bad_request("the label filter of volume prune is not supported yet")
    all_ = filter_bool(filters, "all")
    if all_ is None:
        all_ = api_version(request) < (1, 42)  # before 1.42 prune took named volumes too
    return json_response(await ctx_of(request).call(lambda e: e.imageops.volume_prune(all=all_)))


def register(app: web.Application) -> None:
    add_route(app, "GET", "/volumes", list_volumes)
    add_route(app, "POST", "/volumes/create", create_volume)
    add_route(app, "POST", "/volumes/prune", prune_volumes)
    add_route(app, "GET", "/volumes/{name}", inspect_volume)
    add_route(app, "DELETE", "/volumes/{name}", remove_volume)
