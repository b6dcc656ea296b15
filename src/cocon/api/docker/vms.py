"""cocon's own VM routes, under /cocon/v1 (docs/vm.md):

| route | what |
|---|---|
| `POST /cocon/v1/vms` | create a VM from a disk or ISO (cocon.engine.vms.create_vm): 201 {Id, Warnings} |
| `GET /cocon/v1/vms` | the VMs (`all=0`: running only): name, state, machine, disk, addresses |
| `POST /cocon/v1/vms/{id}/migrate` | live-migrate to another daemon (cocon.engine.vm_migration) |
| `POST /cocon/v1/vms/incoming`, `…/incoming/{id}/finish`, `DELETE …/incoming/{id}` | the target's side |

Start, stop (ACPI, then force), attach (the serial console), inspect and remove are the container
routes: a VM is an instance. Their part of the native OpenAPI document is `OPENAPI_PATHS`.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from cocon.api.docker.common import ctx_of, json_body, json_response, qbool


async def create_vm(request: web.Request) -> web.StreamResponse:
    from cocon.engine.vms import create_vm as create

    raw = await json_body(request, required=True)
    return json_response(await ctx_of(request).call(create, raw), 201)


async def list_vms(request: web.Request) -> web.StreamResponse:
    from cocon.engine.vms import list_vms as listing

    all_ = qbool(request, "all", True)
    return json_response(await ctx_of(request).call(lambda engine: listing(engine, all=all_)))


async def remove_vm(request: web.Request) -> web.StreamResponse:
    from cocon.api.docker.common import no_content
    from cocon.engine.vms import remove_vm as remove

    ref, force, delete_disk = request.match_info["id"], qbool(request, "force"), qbool(request, "delete_disk")
    await ctx_of(request).call(lambda engine: remove(engine, ref, force=force, delete_disk=delete_disk))
    return no_content()


async def list_snapshots(request: web.Request) -> web.StreamResponse:
    from cocon.engine.vm_snapshots import list_snapshots as listing

    return json_response(await ctx_of(request).call(listing, request.match_info["id"]))


async def create_snapshot(request: web.Request) -> web.StreamResponse:
    from cocon.api.docker.common import check_fields
    from cocon.engine.vm_snapshots import create_snapshot as create

    body = check_fields(
        await json_body(request, required=True), {"Name": str, "Memory": bool}, what="snapshot"
    )
    ref, name, memory = request.match_info["id"], str(body.get("Name") or ""), bool(body.get("Memory"))
    return json_response(
        await ctx_of(request).call(lambda engine: create(engine, ref, name, memory=memory)), 201
    )


async def restore_snapshot(request: web.Request) -> web.StreamResponse:
    from cocon.engine.vm_snapshots import restore_snapshot as restore

    ref, name = request.match_info["id"], request.match_info["name"]
    return json_response(await ctx_of(request).call(restore, ref, name))


async def remove_snapshot(request: web.Request) -> web.StreamResponse:
    from cocon.api.docker.common import no_content
    from cocon.engine.vm_snapshots import remove_snapshot as remove

    await ctx_of(request).call(remove, request.match_info["id"], request.match_info["name"])
    return no_content()


async def attach_disk(request: web.Request) -> web.StreamResponse:
    from cocon.api.docker.common import check_fields
    from cocon.engine.vms import attach_disk as attach

    body = check_fields(await json_body(request, required=True), {"Volume": str}, what="disk")
    ref, volume = request.match_info["id"], str(body.get("Volume") or "")
    return json_response(await ctx_of(request).call(attach, ref, volume), 201)


async def detach_disk(request: web.Request) -> web.StreamResponse:
    from cocon.api.docker.common import no_content
    from cocon.engine.vms import detach_disk as detach

    await ctx_of(request).call(detach, request.match_info["id"], request.match_info["volume"])
    return no_content()


async def migrate_vm(request: web.Request) -> web.StreamResponse:
    from cocon.engine.vm_migration import migrate_vm as migrate

    raw = await json_body(request, required=True)
    return json_response(await ctx_of(request).call(migrate, request.match_info["id"], raw))


async def incoming_vm(request: web.Request) -> web.StreamResponse:
    from cocon.engine.vm_migration import prepare_incoming

    raw = await json_body(request, required=True)
    return json_response(await ctx_of(request).call(prepare_incoming, raw), 201)


async def finish_incoming_vm(request: web.Request) -> web.StreamResponse:
    from cocon.engine.vm_migration import finish_incoming

    return json_response(await ctx_of(request).call(finish_incoming, request.match_info["id"]))


async def abort_incoming_vm(request: web.Request) -> web.StreamResponse:
    from cocon.api.docker.common import no_content
    from cocon.engine.vm_migration import abort_incoming

    await ctx_of(request).call(abort_incoming, request.match_info["id"])
    return no_content()


def register(app: web.Application) -> None:
    app.router.add_post("/cocon/v1/vms/incoming", incoming_vm)
    app.router.add_post("/cocon/v1/vms/incoming/{id}/finish", finish_incoming_vm)
    app.router.add_delete("/cocon/v1/vms/incoming/{id}", abort_incoming_vm)
    app.router.add_post("/cocon/v1/vms/{id}/migrate", migrate_vm)
    app.router.add_post("/cocon/v1/vms", create_vm)
    app.router.add_get("/cocon/v1/vms", list_vms, allow_head=False)
    app.router.add_delete("/cocon/v1/vms/{id}", remove_vm)
    app.router.add_post("/cocon/v1/vms/{id}/disks", attach_disk)
    app.router.add_delete("/cocon/v1/vms/{id}/disks/{volume}", detach_disk)
    app.router.add_get("/cocon/v1/vms/{id}/snapshots", list_snapshots, allow_head=False)
    app.router.add_post("/cocon/v1/vms/{id}/snapshots", create_snapshot)
    app.router.add_delete("/cocon/v1/vms/{id}/snapshots/{name}", remove_snapshot)
    app.router.add_post("/cocon/v1/vms/{id}/snapshots/{name}/restore", restore_snapshot)


def _err(description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
    }


OPENAPI_PATHS: dict[str, Any] = {
    "/cocon/v1/vms": {
        "post": {
            "operationId": "vmCreate",
            "summary": "Create a full VM from a disk image (raw or qcow2) and optionally an ISO",
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": {"$ref": "#/components/schemas/VmCreate"}}},
            },
            "responses": {
                "201": {
                    "description": "created (not started)",
                    "content": {
                        "application/json": {
                            "schema": {
                                "type": "object",
                                "required": ["Id"],
                                "properties": {
                                    "Id": {"type": "string"},
                                    "Warnings": {"type": "array", "items": {"type": "string"}},
                                },
                            }
                        }
                    },
                },
                "400": _err("bad input (disk, ISO, firmware, cloud-init data)"),
                "409": _err("the name is in use"),
            },
        },
        "get": {
            "operationId": "vmList",
            "summary": "The VMs (isolation vm), with their machine and addresses",
            "parameters": [
                {
                    "name": "all",
                    "in": "query",
                    "schema": {"type": "boolean"},
                    "description": "also stopped VMs (default true)",
                }
            ],
            "responses": {
                "200": {
                    "description": "the VMs",
                    "content": {
                        "application/json": {
                            "schema": {"type": "array", "items": {"$ref": "#/components/schemas/VmSummary"}}
                        }
                    },
                },
                "400": _err("a bad query parameter"),
            },
        },
    },
}

OPENAPI_PATHS["/cocon/v1/vms/{id}"] = {
    "delete": {
        "operationId": "vmRemove",
        "summary": "Remove a VM (and with delete_disk=1 the disk file it was created with)",
        "parameters": [
            {"name": "id", "in": "path", "required": True, "schema": {"type": "string"}},
            {
                "name": "force",
                "in": "query",
                "schema": {"type": "boolean"},
                "description": "also a running VM",
            },
            {"name": "delete_disk", "in": "query", "schema": {"type": "boolean"}},
        ],
        "responses": {
            "204": {"description": "removed"},
            "400": _err("a bad query parameter"),
            "404": _err("no such VM"),
            "409": _err("the VM is running (give force=1)"),
        },
    }
}

_ID = {"name": "id", "in": "path", "required": True, "schema": {"type": "string"}}
_NAME = {"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}
_SNAPSHOT = {"application/json": {"schema": {"$ref": "#/components/schemas/VmSnapshot"}}}
OPENAPI_PATHS["/cocon/v1/vms/{id}/snapshots"] = {
    "get": {
        "operationId": "vmSnapshotList",
        "summary": "The VM's snapshots (internal qcow2 snapshots of its root disk)",
        "parameters": [_ID],
        "responses": {
            "200": {
                "description": "oldest first",
                "content": {
                    "application/json": {
                        "schema": {"type": "array", "items": {"$ref": "#/components/schemas/VmSnapshot"}}
                    }
                },
            },
            "400": _err("not a VM, or it has no disk yet"),
            "404": _err("no such VM"),
        },
    },
    "post": {
        "operationId": "vmSnapshotCreate",
        "summary": "Snapshot the VM's disk (Memory: and its running state)",
        "parameters": [_ID],
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {
                    "schema": {
                        "type": "object",
                        "required": ["Name"],
                        "properties": {"Name": {"type": "string"}, "Memory": {"type": "boolean"}},
                    }
                }
            },
        },
        "responses": {
            "201": {"description": "the snapshot", "content": _SNAPSHOT},
            "400": _err("a bad name, a raw disk, Memory for a stopped VM"),
            "404": _err("no such VM"),
            "409": _err("the name is taken"),
        },
    },
}
OPENAPI_PATHS["/cocon/v1/vms/{id}/snapshots/{name}"] = {
    "delete": {
        "operationId": "vmSnapshotRemove",
        "summary": "Remove a snapshot",
        "parameters": [_ID, _NAME],
        "responses": {
            "204": {"description": "removed"},
            "400": _err("not a VM"),
            "404": _err("no such VM or snapshot"),
        },
    },
}
OPENAPI_PATHS["/cocon/v1/vms/{id}/snapshots/{name}/restore"] = {
    "post": {
        "operationId": "vmSnapshotRestore",
        "summary": "Restore a snapshot (a running VM: a memory snapshot, resumed where it was)",
        "parameters": [_ID, _NAME],
        "responses": {
            "200": {
                "description": "restored",
                "content": {"application/json": {"schema": {"type": "object"}}},
            },
            "400": _err("not a VM"),
            "404": _err("no such VM or snapshot"),
            "409": _err("a disk snapshot of a running VM (stop it first)"),
        },
    },
}

OPENAPI_PATHS["/cocon/v1/vms/{id}/disks"] = {
    "post": {
        "operationId": "vmDiskAttach",
        "summary": "Attach a disk volume (hot-plugged when the VM runs)",
        "parameters": [_ID],
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {
                    "schema": {
                        "type": "object",
                        "required": ["Volume"],
                        "properties": {"Volume": {"type": "string"}},
                    }
                }
            },
        },
        "responses": {
            "201": {
                "description": "attached",
                "content": {"application/json": {"schema": {"type": "object"}}},
            },
            "400": _err("not a VM, not a disk volume, no free hot-plug slot"),
            "404": _err("no such VM or volume"),
            "409": _err("attached already"),
        },
    },
}
OPENAPI_PATHS["/cocon/v1/vms/{id}/disks/{volume}"] = {
    "delete": {
        "operationId": "vmDiskDetach",
        "summary": "Detach a disk volume (hot-unplugged when the VM runs)",
        "parameters": [_ID, {"name": "volume", "in": "path", "required": True, "schema": {"type": "string"}}],
        "responses": {
            "204": {"description": "detached"},
            "400": _err("the guest did not let it go"),
            "404": _err("not attached"),
        },
    },
}

OPENAPI_PATHS["/cocon/v1/vms/{id}/migrate"] = {
    "post": {
        "operationId": "vmMigrate",
        "summary": "Live-migrate a running VM to another cocon daemon (docs/vm-migration.md)",
        "parameters": [_ID],
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/VmMigrate"}}},
        },
        "responses": {
            "200": {
                "description": "moved: its Id on the target and what the migration measured",
                "content": {"application/json": {"schema": {"$ref": "#/components/schemas/VmMigrated"}}},
            },
            "400": _err("bad target address, 9p shares or disk volumes attached"),
            "404": _err("no such VM"),
            "409": _err("not running, or the target refused or failed (the VM runs on here)"),
        },
    },
}
OPENAPI_PATHS["/cocon/v1/vms/incoming"] = {
    "post": {
        "operationId": "vmIncoming",
        "summary": "(between daemons) Prepare an instance that waits for a VM migrated here",
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": {"type": "object"}}},
        },
        "responses": {
            "201": {
                "description": "waiting: where to send the disks and the migration stream",
                "content": {"application/json": {"schema": {"type": "object"}}},
            },
            "400": _err("bad request, network or ISO missing here"),
            "404": _err("the image is not here"),
            "409": _err("the name is taken"),
        },
    },
}
OPENAPI_PATHS["/cocon/v1/vms/incoming/{id}"] = {
    "delete": {
        "operationId": "vmIncomingAbort",
        "summary": "(between daemons) Give up an incoming migration: the instance and its disks go",
        "parameters": [_ID],
        "responses": {
            "204": {"description": "removed"},
            "404": _err("no such VM"),
            "409": _err("not waiting for a migration"),
        },
    },
}
OPENAPI_PATHS["/cocon/v1/vms/incoming/{id}/finish"] = {
    "post": {
        "operationId": "vmIncomingFinish",
        "summary": "(between daemons) The source handed over: run the migrated guest here",
        "parameters": [_ID],
        "responses": {
            "200": {
                "description": "running",
                "content": {"application/json": {"schema": {"type": "object"}}},
            },
            "404": _err("no such VM"),
            "409": _err("not waiting for a migration, or the migration did not complete"),
        },
    },
}

OPENAPI_SCHEMAS: dict[str, Any] = {
    "VmMigrate": {
        "type": "object",
        "required": ["To"],
        "properties": {
            "To": {"type": "string", "description": "the target daemon: unix:///PATH or tcp://ADDR:PORT"},
            "Token": {"type": "string", "description": "the target's bearer token (TCP)"},
            "TlsCaCert": {"type": "string", "description": "PEM: the CA of a --tlsverify target"},
            "TlsCert": {"type": "string", "description": "PEM: a client certificate that CA signed"},
            "TlsKey": {"type": "string", "description": "PEM: its key"},
            "SharedStorage": {"type": "boolean", "description": "the disk is at the same path there"},
            "DowntimeLimitMs": {"type": "integer", "minimum": 1, "maximum": 2000000},
        },
    },
    "VmMigrated": {
        "type": "object",
        "properties": {
            "Id": {"type": "string"}, "Name": {"type": "string"}, "To": {"type": "string"},
            "DowntimeMs": {"type": "integer", "description": "QEMU's: from the pause to the last byte"},
            "PauseMs": {"type": "integer", "description": "the guest's whole pause, with the hand-over"},
            "RamMs": {"type": "integer"}, "TotalMs": {"type": "integer"},
            "DiskMs": {"type": "integer"}, "RamBytes": {"type": "integer"}, "DiskBytes": {"type": "integer"},
        },
    },
    "VmCreate": {
        "type": "object",
        "required": ["Name", "Disk"],
        "properties": {
            "Name": {"type": "string"},
            "Disk": {"type": "string", "description": "the boot disk's absolute path (made if missing)"},
            "DiskSize": {"type": "string", "description": "e.g. 20G: a new disk's size, or grow one"},
            "Iso": {"type": "string", "description": "an installer or live ISO, booted first"},
            "Firmware": {"type": "string", "enum": ["bios", "uefi"]},
            "Cpus": {"type": "number"},
            "Memory": {"type": "string", "description": "e.g. 2G (default 1G)"},
            "CloudInit": {"type": "string", "format": "byte", "description": "user-data, base64"},
            "NetworkConfig": {"type": "string", "format": "byte", "description": "netplan v2 YAML, base64"},
            "Network": {"type": "string"},
            "Hostname": {"type": "string"},
            "Volumes": {"type": "array", "items": {"type": "string"}, "description": "disk volumes, NAME:/x"},
        },
    },
    "VmSnapshot": {
        "type": "object",
        "properties": {"Name": {"type": "string"}, "Memory": {"type": "boolean"},
                       "VmStateSize": {"type": "integer"}, "Created": {"type": "number"}},
    },
    "VmSummary": {
        "type": "object",
        "properties": {
            "Id": {"type": "string"}, "Name": {"type": "string"}, "State": {"type": "string"},
            "Image": {"type": "string"}, "Disk": {"type": "string"}, "Iso": {"type": "string"},
            "Firmware": {"type": "string"}, "Cpus": {"type": "integer"}, "MemoryMiB": {"type": "integer"},
            "Addresses": {"type": "array", "items": {"type": "string"}},
        },
    },
}  # fmt: skip
