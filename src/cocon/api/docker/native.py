"""cocon's own routes, beside Docker's, under `/cocon/v1/` (no Docker version prefix):

| route | what |
|---|---|
| `GET /cocon/v1/info` | cocon's view of the node: version, isolation levels, cgroup mode, roots |
| `POST /cocon/v1/images/bootstrap?image=busybox` | make a base image on this machine, with progress |
| `GET /cocon/v1/images/save?names=…&format=…` | save as OCI archive too (Docker's `get`: docker-archive) |
| `POST /cocon/v1/system/reset` | remove every container, network, volume and image (cocon.engine.system) |
| `GET /cocon/v1/system/assets` | microVM guest assets: state, files, packages, KVM/TCG (engine.system) |
| `POST /cocon/v1/system/assets?rebuild=1` | build them (if missing/stale; always with rebuild), progress |
| `GET/POST /cocon/v1/networks/{id}/policy`, `DELETE …/{rule}` | network allow rules (api.docker.networks) |
| `GET /cocon/v1/openapi.json` | the OpenAPI 3 document of these routes (`OPENAPI` below) |

The OpenAPI document is written by hand next to the handlers and checked by schemathesis against
the running daemon (tests/integration/test_api_server.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from aiohttp import web

from cocon.api.docker import networks, vms
from cocon.api.docker.common import (
    API_VERSION,
    MIN_API_VERSION,
    JSONStream,
    bad_request,
    ctx_of,
    json_response,
    pump,
    qbool,
    qlist,
    qstr,
)
from cocon.engine.errors import EngineError

if TYPE_CHECKING:
    from collections.abc import Callable

    from cocon.engine.engine import Engine

SAVE_FORMATS = ("docker-archive", "oci-archive")


def _info(engine: Engine, started: float) -> dict[str, Any]:
    import os
    import time

    from cocon.api.docker.system import VERSION, cgroup_info, isolation_levels
    from cocon.engine.system import microvm_info

    _, mode = cgroup_info()
    return {
        "Version": VERSION,
        "ApiVersion": API_VERSION,
        "MinAPIVersion": MIN_API_VERSION,
        "Isolation": isolation_levels(engine),
        "CgroupMode": mode,
        "Root": engine.root,
        "Run": engine.run_dir,
        "KVM": os.path.exists("/dev/kvm"),
        "MicroVM": microvm_info(),
        "Uptime": round(time.time() - started, 3),
    }


async def info(request: web.Request) -> web.StreamResponse:
    ctx = ctx_of(request)
    return json_response(await ctx.call(_info, ctx.started))


async def system_reset(request: web.Request) -> web.StreamResponse:
    from cocon.engine.system import reset

    return json_response(await ctx_of(request).call(reset))


async def system_assets(request: web.Request) -> web.StreamResponse:
    from cocon.engine.system import assets_info

    return json_response(await ctx_of(request).call(assets_info))


async def system_assets_build(request: web.Request) -> web.StreamResponse:
    """JSON lines: progress per stage of cocon.vmm.assets.STAGES, then {"aux": status} (as GET
    answers) or an error object."""
    from cocon.engine.system import assets_build

    rebuild = qbool(request, "rebuild")
    ctx = ctx_of(request)
    stream = JSONStream(request, "application/x-ndjson")

    def work(engine: Engine, progress: Callable[[str, int, int], None]) -> dict[str, Any]:
        return assets_build(engine, rebuild=rebuild, progress=progress)

    try:
        result = await pump(ctx, stream, work, status="Building")
    except EngineError as exc:
        if not stream.started:
            raise
        await stream.error(str(exc))
        return await stream.finish()
    await stream.send({"aux": result})
    return await stream.finish()


async def bootstrap(request: web.Request) -> web.StreamResponse:
    what = (qstr(request, "image") or "").strip()
    if not what:
        raise bad_request("give image=busybox, image=debian[:SUITE] or image=debian-vm[:SUITE]")
    kind = what.partition(":")[0]
    if kind not in ("busybox", "debian", "debian-vm") or (kind == "busybox" and what != "busybox"):
        raise bad_request(
            f"cannot bootstrap {what!r}: cocon makes busybox (from the host), debian[:SUITE] and "
            "debian-vm[:SUITE] (a bootable Debian for --isolation vm)"
        )
    mirror = qstr(request, "mirror") or None
    tarball = qstr(request, "tarball") or None
    ctx = ctx_of(request)
    stream = JSONStream(request, "application/x-ndjson")

    def work(engine: Engine, progress: Callable[[str, int, int], None]) -> dict[str, Any]:
        return engine.imageops.image_bootstrap(what, mirror=mirror, tarball=tarball, progress=progress)

    try:
        result = await pump(ctx, stream, work, status="Bootstrapping")
    except EngineError as exc:
        if not stream.started:
            raise
        await stream.error(str(exc))
        return await stream.finish()
    await stream.send({"aux": result})
    return await stream.finish()


async def save(request: web.Request) -> web.StreamResponse:
    from cocon.api.docker.images import save_stream

    fmt = request.query.get("format", "oci-archive")
    if fmt not in SAVE_FORMATS:
        raise bad_request(f"format {fmt!r}: use one of {', '.join(SAVE_FORMATS)}")
    return await save_stream(request, qlist(request, "names"), fmt)


async def openapi(request: web.Request) -> web.StreamResponse:
    return json_response(OPENAPI)


def register(app: web.Application) -> None:
    app.router.add_get("/cocon/v1/info", info, allow_head=False)
    app.router.add_post("/cocon/v1/images/bootstrap", bootstrap)
    app.router.add_get("/cocon/v1/images/save", save, allow_head=False)
    app.router.add_post("/cocon/v1/system/reset", system_reset)
    app.router.add_get("/cocon/v1/system/assets", system_assets, allow_head=False)
    app.router.add_post("/cocon/v1/system/assets", system_assets_build)
    app.router.add_get("/cocon/v1/openapi.json", openapi, allow_head=False)


_ERROR = {
    "description": "bad request",
    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
}


def _error(description: str) -> dict[str, Any]:
    return {**_ERROR, "description": description}


_FILE = {
    "type": "object",
    "nullable": True,
    "required": ["Path", "Size"],
    "properties": {"Path": {"type": "string"}, "Size": {"type": "integer", "nullable": True}},
}

#: The guest assets routes (cocon.engine.system.assets_doc).
ASSETS_PATHS: dict[str, Any] = {
    "/cocon/v1/system/assets": {
        "get": {
            "operationId": "systemAssets",
            "summary": "The microVM guest assets: state, files, packages, KVM or TCG (builds nothing)",
            "responses": {
                "200": {
                    "description": "the assets' status",
                    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Assets"}}},
                }
            },
        },
        "post": {
            "operationId": "systemAssetsBuild",
            "summary": "Build the microVM guest assets (when missing, stale or corrupt; always with rebuild)",
            "parameters": [
                {
                    "name": "rebuild",
                    "in": "query",
                    "required": False,
                    "schema": {"type": "boolean", "default": False},
                    "description": "build again even if the current assets verify",
                }
            ],
            "responses": {
                "200": {
                    "description": (
                        "JSON lines: progress messages {status, id (the stage: resolve, download, "
                        "extract, modules, initramfs, utility, commit), progressDetail{current,total}, "
                        "progress}, then {aux: Assets}, or {error, errorDetail{message}} if it failed"
                    ),
                    "content": {"application/x-ndjson": {"schema": {"type": "string"}}},
                },
                "400": _error("rebuild is not a boolean"),
            },
        },
    },
}

ASSETS_SCHEMAS: dict[str, Any] = {
    "Assets": {
        "type": "object",
        "required": ["State", "Root", "Directory", "Packages", "BuiltDigests"],
        "properties": {
            "State": {"type": "string", "enum": ["ready", "missing", "corrupt", "unknown"]},
            "Message": {"type": "string", "nullable": True, "description": "what to do, when not ready"},
            "Error": {"type": "string", "nullable": True},
            "Root": {"type": "string", "description": "$COCON_ASSETS_ROOT or the engine's root"},
            "Directory": {"type": "string"},
            "Digest": {"type": "string", "nullable": True},
            "KernelRelease": {"type": "string", "nullable": True},
            "Kernel": _FILE,
            "Initrd": _FILE,
            "Utility": _FILE,
            "Packages": {"type": "object", "additionalProperties": {"type": "string"}},
            "Built": {"type": "string", "nullable": True},
            "BuiltDigests": {"type": "array", "items": {"type": "string"}},
            "Accelerator": {
                "type": "object",
                "nullable": True,
                "properties": {
                    "Accel": {"type": "string", "enum": ["kvm", "tcg"], "nullable": True},
                    "Reason": {"type": "string"},
                    "Probed": {"type": "string", "nullable": True},
                    "Seconds": {"type": "number", "nullable": True},
                    "Cpu": {"type": "string", "nullable": True},
                    "Cached": {"type": "boolean"},
                },
            },
        },
    },
    "MicroVM": {
        "type": "object",
        "required": ["Assets", "Accelerator"],
        "properties": {
            "Assets": {"type": "string", "enum": ["ready", "missing", "corrupt", "unknown"]},
            "AssetsRoot": {"type": "string", "nullable": True},
            "KernelRelease": {"type": "string", "nullable": True},
            "Accelerator": {"type": "string", "enum": ["kvm", "tcg"], "nullable": True},
            "AcceleratorReason": {"type": "string", "nullable": True},
            "Probed": {"type": "string", "nullable": True},
            "Message": {"type": "string", "nullable": True},
        },
    },
}

OPENAPI: dict[str, Any] = {
    "openapi": "3.0.3",
    "info": {
        "title": "cocon native API",
        "version": "1",
        "description": (
            "cocon's own routes beside its Docker Engine API-compatible ones (versions "
            f"{MIN_API_VERSION}-{API_VERSION}, documented by Docker). "
            'Errors are Docker\'s {"message": ...}.'
        ),
    },
    "paths": {
        "/cocon/v1/system/reset": {
            "post": {
                "operationId": "systemReset",
                "summary": "Remove every container, network, volume and image of this node",
                "responses": {
                    "200": {
                        "description": "what was removed",
                        "content": {
                            "application/json": {
                                "schema": {
                                    "type": "object",
                                    "properties": {
                                        key: {"type": "array", "items": {"type": "string"}}
                                        for key in (
                                            "ContainersDeleted",
                                            "NetworksDeleted",
                                            "VolumesDeleted",
                                            "ImagesDeleted",
                                        )
                                    },
                                }
                            }
                        },
                    }
                },
            }
        },
        "/cocon/v1/info": {
            "get": {
                "operationId": "info",
                "summary": "The node as cocon sees it",
                "responses": {
                    "200": {
                        "description": "node information",
                        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Info"}}},
                    }
                },
            }
        },
        "/cocon/v1/images/bootstrap": {
            "post": {
                "operationId": "imageBootstrap",
                "summary": "Make a base image here (busybox from the host, Debian with debootstrap)",
                "parameters": [
                    {
                        "name": "image",
                        "in": "query",
                        "required": True,
                        "schema": {"type": "string"},
                        "description": "busybox, debian or debian:SUITE",
                    },
                    {
                        "name": "mirror",
                        "in": "query",
                        "required": False,
                        "schema": {"type": "string"},
                        "description": "Debian mirror URL (debian only)",
                    },
                    {
                        "name": "tarball",
                        "in": "query",
                        "required": False,
                        "schema": {"type": "string"},
                        "description": "a debootstrap --make-tarball file on the daemon's host (debian only)",
                    },
                ],
                "responses": {
                    "200": {
                        "description": (
                            "JSON lines: progress messages {status, id, progressDetail{current,total}, "
                            "progress}, then {aux: {Id, RepoTags}}, or {error, errorDetail{message}} "
                            "if it failed after the answer began"
                        ),
                        "content": {"application/x-ndjson": {"schema": {"type": "string"}}},
                    },
                    "400": _error("not an image cocon can bootstrap, or it failed before any progress"),
                },
            }
        },
        "/cocon/v1/images/save": {
            "get": {
                "operationId": "imageSave",
                "summary": "Save images as an OCI archive or a docker-archive (a tar stream)",
                "parameters": [
                    {
                        "name": "names",
                        "in": "query",
                        "required": True,
                        "schema": {"type": "array", "items": {"type": "string"}},
                        "style": "form",
                        "explode": True,
                        "description": "image names or IDs, repeated",
                    },
                    {
                        "name": "format",
                        "in": "query",
                        "required": False,
                        "schema": {"type": "string", "enum": list(SAVE_FORMATS), "default": "oci-archive"},
                    },
                ],
                "responses": {
                    "200": {
                        "description": "the archive",
                        "content": {"application/x-tar": {"schema": {"type": "string", "format": "binary"}}},
                    },
                    "400": _error("bad format or no names"),
                    "404": _error("no such image"),
                },
            }
        },
        **networks.OPENAPI_PATHS,  # network policy (cocon.api.docker.networks)
        **vms.OPENAPI_PATHS,  # full VMs from a disk (cocon.api.docker.vms)
        **ASSETS_PATHS,  # microVM guest assets
        "/cocon/v1/openapi.json": {
            "get": {
                "operationId": "openapi",
                "summary": "This document",
                "responses": {
                    "200": {
                        "description": "OpenAPI 3 document",
                        "content": {"application/json": {"schema": {"type": "object"}}},
                    }
                },
            }
        },
    },
    "components": {
        "schemas": {
            **networks.OPENAPI_SCHEMAS,
            **vms.OPENAPI_SCHEMAS,
            **ASSETS_SCHEMAS,
            "Error": {
                "type": "object",
                "required": ["message"],
                "properties": {"message": {"type": "string"}},
            },
            "Info": {
                "type": "object",
                "required": [
                    "Version",
                    "ApiVersion",
                    "MinAPIVersion",
                    "Isolation",
                    "CgroupMode",
                    "Root",
                    "Run",
                    "KVM",
                ],
                "properties": {
                    "Version": {"type": "string"},
                    "ApiVersion": {"type": "string"},
                    "MinAPIVersion": {"type": "string"},
                    "Isolation": {
                        "type": "object",
                        "description": "each isolation level: 'available' or why it is not",
                        "additionalProperties": {"type": "string"},
                    },
                    "CgroupMode": {"type": "string", "enum": ["v1", "hybrid", "v2"]},
                    "Root": {"type": "string"},
                    "Run": {"type": "string"},
                    "KVM": {"type": "boolean"},
                    "MicroVM": {"$ref": "#/components/schemas/MicroVM"},
                    "Uptime": {"type": "number"},
                },
            },
        }
    },
}
