"""Container routes: create, start, stop, restart, kill, wait, remove, list, inspect, attach, resize,
logs, top, stats, pause, unpause, rename — through the engine's detached containers
(`Engine.supervisor`, cocon.engine.supervisor: each container under its own conmon).

`docker run` (without -d) sends create, then attach (a hijacked connection, cocon.api.docker.hijack),
then wait, then start. An attach to a container that is not running yet is parked here until the
start: the start's `on_created` hook (conmon holds the created container, its process has not run
yet) connects to conmon's attach socket for each parked attach, so no output is lost.

NetworkMode: "default" (what the docker CLI sends) and "bridge" put the container on the default
bridge network, a user network's name (`--network NAME`, docker-compose's `PROJECT_default`) on that
network, "none" and "host" as Docker. NetworkingConfig.EndpointsConfig (aliases, IPAMConfig
addresses), HostConfig.PortBindings and PublishAllPorts go to the engine (cocon.engine.netattach),
which attaches the container at start; user-network memberships are also recorded as endpoints of
cocon.engine.networks (what `docker network inspect`/`rm` and docker-compose look at).
"""

from __future__ import annotations

import asyncio
import re
import socket
import threading
import time
from typing import TYPE_CHECKING, Any

from aiohttp import web

from cocon.api.docker.common import (
    HTTPError,
    add_route,
    api_version,
    bad_request,
    ctx_of,
    json_body,
    json_response,
    label_matches,
    no_content,
    qbool,
    qfilters,
    qint,
    qstr,
)
from cocon.api.docker.hijack import MULTIPLEXED, RAW, HijackedStream, frame, hijack
from cocon.engine.errors import NotFound

if TYPE_CHECKING:
    from cocon.engine.engine import Engine
    from cocon.engine.networks import Network

PENDING_KEY: web.AppKey[dict[str, list[asyncio.Future[socket.socket]]]] = web.AppKey("cocon_attach")

# --- create -------------------------------------------------------------------------------------------

# Docker's create fields cocon honours (passed on to the engine).
_CONFIG_FIELDS = {
    "Image", "Cmd", "Entrypoint", "Env", "WorkingDir", "User", "Hostname", "Tty", "OpenStdin",
    "StdinOnce", "Labels", "StopSignal", "StopTimeout", "Healthcheck", "Volumes", "HostConfig",
    "ExposedPorts", "NetworkingConfig",
}  # fmt: skip
# Informational fields (what the client will attach to, ports to publish later, …): accepted as sent.
# NetworkingConfig is checked by _check_networks.
_INFO_FIELDS = {
    "AttachStdin",
    "AttachStdout",
    "AttachStderr",
    "Domainname",
}
_BUILTIN_NETWORKS = ("default", "bridge", "none", "host")
_HOST_FIELDS = {
    "AutoRemove", "Binds", "Tmpfs", "ReadonlyRootfs", "Memory", "MemorySwap", "NanoCpus", "PidsLimit",
    "CapAdd", "CapDrop", "SecurityOpt", "NetworkMode", "RestartPolicy", "LogConfig", "Isolation",
    "ConsoleSize", "PortBindings", "PublishAllPorts", "StorageOpt",
}  # fmt: skip
# HostConfig fields the docker CLI always sends, accepted with their neutral values only.
_HOST_NEUTRAL: dict[str, tuple[Any, ...]] = {
    "CgroupnsMode": ("", "private", "host"), "IpcMode": ("", "private", "shareable"),
    "PidMode": ("",), "UTSMode": ("",), "UsernsMode": ("",), "Privileged": (False,),
    "OomKillDisable": (False,), "Init": (None,), "ShmSize": (0,),
    "MemorySwappiness": (-1,), "OomScoreAdj": (0,), "VolumeDriver": ("", "local"),
    "Runtime": ("", "runc", "cocon"), "MaskedPaths": (), "ReadonlyPaths": (),
}  # fmt: skip
_LOG_DRIVERS = ("", "json-file", "k8s-file", "local")


def _zero(value: Any) -> bool:
    return value in (None, "", 0, False, [], {}) or (isinstance(value, list) and not any(value))


def _check_networks(body: dict[str, Any], mode: str) -> dict[str, list[str]]:
    """NetworkingConfig.EndpointsConfig for the NetworkMode `mode` → {user network: aliases} to
    record. Settings that need real networking are refused (cocon.api.docker.networks)."""
    from cocon.api.docker.networks import endpoint_aliases

    config = body.get("NetworkingConfig") or {}
    if not isinstance(config, dict):
        raise bad_request("NetworkingConfig must be a JSON object")
    unknown = set(config) - {"EndpointsConfig"}
    if unknown:
        raise bad_request(f"NetworkingConfig: unknown field(s) {', '.join(sorted(unknown))}")
    endpoints = config.get("EndpointsConfig") or {}
    if not isinstance(endpoints, dict):
        raise bad_request("NetworkingConfig.EndpointsConfig must be an object of network names")
    out: dict[str, list[str]] = {}
    if mode not in _BUILTIN_NETWORKS:
        out[mode] = []
    for name, settings in endpoints.items():
        aliases = endpoint_aliases(settings, name)
        if name in _BUILTIN_NETWORKS:
            if name != mode and not (name in ("default", "bridge") and mode in ("default", "bridge")):
                raise bad_request(
                    f"NetworkingConfig names network {name!r}, but the container's network mode is {mode!r}"
                )
            if aliases:
                raise bad_request("network-scoped aliases are supported only for containers in user networks")
            continue
        if mode in ("none", "host"):
            raise bad_request(
                f"container cannot be connected to network {name!r}: its network mode is {mode!r}"
            )
        if mode in ("default", "bridge"):
            raise bad_request(
                f"NetworkingConfig names network {name!r}: give it as the network mode (--network {name})"
            )
        out[name] = aliases
    return out


def _check_links(host: dict[str, Any], mode: str) -> list[str]:
    """HostConfig.Links as "container:alias" entries. On a user network Docker keeps them as
    network-scoped links (name resolution only; docker-compose's `run` sends them): recorded with
    the endpoint. Legacy links on the default bridge do not exist in cocon: refused."""
    links = host.get("Links") or []
    if not isinstance(links, list) or not all(isinstance(x, str) and x for x in links):
        raise bad_request("HostConfig.Links must be an array of 'container:alias' strings")
    if links and mode in _BUILTIN_NETWORKS:
        raise bad_request(
            "HostConfig.Links: cocon has no legacy links; on a user network (--network NAME) links "
            "are recorded as network-scoped aliases"
        )
    out = []
    for link in links:
        target, _, alias = link.partition(":")
        out.append(f"{target.lstrip('/')}:{(alias or target).rsplit('/', 1)[-1]}")
    return out


def _check_create(body: Any, warnings: list[str]) -> dict[str, Any]:
    """Docker's create body → the engine's (which validates the values): unknown fields that would
    change what runs are refused, naming the field."""
    if not isinstance(body, dict):
        raise bad_request("the create request needs a JSON object body (Docker's container config)")
    out: dict[str, Any] = {}
    for key, value in body.items():
        if key in _CONFIG_FIELDS:
            if value is not None:
                out[key] = value
        elif key in _INFO_FIELDS or _zero(value):
            continue
        else:
            raise bad_request(f"container create: {key} is not supported by cocon yet; leave it out")
    host = body.get("HostConfig") or {}
    if not isinstance(host, dict):
        raise bad_request("HostConfig must be a JSON object")
    out["HostConfig"] = _check_host(host, out, warnings)
    return out


def _check_host(host: dict[str, Any], body: dict[str, Any], warnings: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in host.items():
        if key in _HOST_FIELDS:
            if value is not None:
                out[key] = value
        elif key in ("Mounts", "CpuQuota", "CpuPeriod", "Links"):
            continue  # Links: _check_links
        elif key in _HOST_NEUTRAL:
            allowed = _HOST_NEUTRAL[key]
            if allowed and not _zero(value) and value not in allowed:
                raise bad_request(f"HostConfig.{key}={value!r} is not supported by cocon yet; leave it out")
        elif not _zero(value):
            raise bad_request(f"HostConfig.{key} is not supported by cocon yet; leave it out")
    isolation = str(out.get("Isolation") or "").lower()
    if isolation in ("", "default", "process", "container"):
        out["Isolation"] = "container"
    elif isolation in ("hyperv", "microvm"):
        out["Isolation"] = "microvm"  # Docker's hyperv: the container inside its own lightweight VM
    elif isolation == "vm":
        out["Isolation"] = "vm"  # cocon's own: a full VM booted from the image (docs/vm.md)
    else:
        raise bad_request(
            f"unknown isolation {isolation!r}: use default, process (container), hyperv (microvm) or vm"
        )
    network = str(out.get("NetworkMode") or "default")
    if network.startswith("container:"):
        raise bad_request(
            f"network mode {network!r} is not supported yet: use the default bridge, a user network, "
            "--network none or --network host"
        )
    log = out.get("LogConfig")
    if isinstance(log, dict):
        if str(log.get("Type") or "") not in _LOG_DRIVERS:
            raise bad_request(
                f"log driver {log.get('Type')!r} is not supported: cocon logs to json-file style"
            )
        opts = log.get("Config") or {}
        unknown = set(opts) - {"max-size", "max-file"}
        if unknown:
            raise bad_request(
                f"log options {', '.join(sorted(unknown))} are not supported: use max-size, max-file"
            )
    quota, period = host.get("CpuQuota") or 0, host.get("CpuPeriod") or 0
    if quota:
        if not isinstance(quota, int) or not isinstance(period, int) or quota < 0 or period < 0:
            raise bad_request("CpuQuota and CpuPeriod must be positive integers (microseconds)")
        if out.get("NanoCpus"):
            raise bad_request("give either NanoCpus or CpuQuota/CpuPeriod, not both")
        out["NanoCpus"] = quota * 1_000_000_000 // (period or 100_000)
    for m in host.get("Mounts") or []:
        _mount_to_binds(m, out, body)
    return out


def _mount_to_binds(m: Any, host: dict[str, Any], body: dict[str, Any]) -> None:
    if not isinstance(m, dict):
        raise bad_request("HostConfig.Mounts: each mount must be a JSON object")
    kind, target, source = m.get("Type") or "volume", m.get("Target") or "", m.get("Source") or ""
    if not isinstance(target, str) or not target.startswith("/"):
        raise bad_request(f"HostConfig.Mounts: the target {target!r} must be an absolute path")
    for key in ("VolumeOptions", "BindOptions", "TmpfsOptions"):
        opts = m.get(key) or {}
        if key == "TmpfsOptions" and kind == "tmpfs":
            continue
        if any(not _zero(v) for v in opts.values()):
            raise bad_request(f"HostConfig.Mounts: {key} are not supported yet; leave them out")
    ro = ":ro" if m.get("ReadOnly") else ""
    if kind in ("bind", "volume"):
        if kind == "volume" and not source:
            body.setdefault("Volumes", {})[target] = {}
            if ro:
                raise bad_request("HostConfig.Mounts: a read-only anonymous volume is not supported")
            return
        if kind == "bind" and not source.startswith("/"):
            raise bad_request(f"HostConfig.Mounts: a bind mount's source {source!r} must be an absolute path")
        host.setdefault("Binds", []).append(f"{source}:{target}{ro}")
    elif kind == "tmpfs":
        opts = m.get("TmpfsOptions") or {}
        parts = []
        if opts.get("SizeBytes"):
            parts.append(f"size={int(opts['SizeBytes'])}")
        if opts.get("Mode"):
            parts.append(f"mode={int(opts['Mode']):o}")
        host.setdefault("Tmpfs", {})[target] = ",".join(parts)
    else:
        raise bad_request(
            f"HostConfig.Mounts: mount type {kind!r} is not supported: use bind, volume or tmpfs"
        )


async def create(request: web.Request) -> web.StreamResponse:
    warnings: list[str] = []
    raw = await json_body(request, required=True)
    body = _check_create(raw, warnings)
    host = raw.get("HostConfig") or {}
    mode = str(host.get("NetworkMode") or "default")
    networks = _check_networks(raw, mode)
    links = _check_links(host, mode)
    name = qstr(request, "name") or None
    platform = qstr(request, "platform") or ""
    if platform and platform not in ("linux", "linux/amd64", "linux/x86_64"):
        raise bad_request(f"platform {platform!r} is not supported: cocon runs linux/amd64 images")

    def work(e: Engine) -> dict[str, Any]:
        from cocon.api.docker.networks import drop_stale

        nets: dict[str, Network] = {}  # by ID: a network may be named by name and by ID
        aliases: dict[str, list[str]] = {}
        for n, names in networks.items():
            net = e.networks.get(n)  # 404 for a network that does not exist
            nets[net.id] = net
            known = aliases.setdefault(net.id, [])
            known += [a for a in dict.fromkeys(names) if a not in known]
        mode_id = e.networks.get(mode).id if mode in networks else ""
        for link in links:  # as dockerd: the linked container must exist
            e.instances.get(link.partition(":")[0])
        doc = e.supervisor.create(body, name)
        rec = e.instances.get(doc["Id"])
        try:
            if nets:
                drop_stale(e)
            if mode_id:
                e.networks.set_mode(rec.id, mode)
            for net_id in nets:
                e.networks.connect(
                    net_id, rec.id, rec.name, aliases[net_id], links=links if net_id == mode_id else ()
                )
        except BaseException:
            e.networks.forget_container(rec.id)
            e.supervisor.remove(rec.id, force=True, volumes=True)
            raise
        e.supervisor._event(rec, "create")
        return doc

    doc = await ctx_of(request).call(work)
    doc["Warnings"] = list(doc.get("Warnings") or []) + warnings
    return json_response(doc, 201)


# --- life cycle ---------------------------------------------------------------------------------------


def _pending(request: web.Request) -> dict[str, list[asyncio.Future[socket.socket]]]:
    return request.app[PENDING_KEY]


async def start(request: web.Request) -> web.StreamResponse:
    ref = request.match_info["id"]
    ctx = ctx_of(request)
    await json_body(request)  # old clients send a HostConfig here; it has no meaning since 1.24
    loop = asyncio.get_running_loop()
    rec = await ctx.call(lambda e: e.instances.get(ref))
    if await ctx.call(lambda e: e.supervisor.running(rec.id)):
        return no_content(304)
    waiting = _pending(request).pop(rec.id, [])

    def on_created(created: Any) -> None:
        from cocon.engine import attach

        for fut in waiting:
            try:
                sock = attach.connect(ctx.engine().supervisor.attach_socket(created.id), created.name)
            except Exception as exc:
                loop.call_soon_threadsafe(_set_exc, fut, exc)
                continue
            loop.call_soon_threadsafe(_set_sock, fut, sock)

    try:
        await ctx.call(lambda e: e.supervisor.start(rec.id, on_created=on_created if waiting else None))
    finally:
        for fut in waiting:
            if not fut.done():
                fut.set_exception(ConnectionAbortedError("the container did not start"))
    return no_content()


def _set_sock(fut: asyncio.Future[socket.socket], sock: socket.socket) -> None:
    if fut.done():
        sock.close()
    else:
        fut.set_result(sock)


def _set_exc(fut: asyncio.Future[socket.socket], exc: BaseException) -> None:
    if not fut.done():
        fut.set_exception(exc)


def _timeout(request: web.Request) -> int | None:
    for key in ("t", "timeout"):
        if request.query.get(key, "") != "":
            return qint(request, key, 0)
    return None


async def stop(request: web.Request) -> web.StreamResponse:
    ref = request.match_info["id"]
    timeout = _timeout(request)
    ctx = ctx_of(request)
    rec = await ctx.call(lambda e: e.instances.get(ref))
    if not await ctx.call(lambda e: e.supervisor.running(rec.id)):
        return no_content(304)
    await ctx.call(lambda e: e.supervisor.stop(rec.id, timeout))
    return no_content()


async def restart(request: web.Request) -> web.StreamResponse:
    ref = request.match_info["id"]
    timeout = _timeout(request)
    await ctx_of(request).call(lambda e: e.supervisor.restart(ref, timeout))
    return no_content()


async def kill(request: web.Request) -> web.StreamResponse:
    from cocon.engine.supervisor import parse_signal

    ref = request.match_info["id"]
    try:
        sig = parse_signal(qstr(request, "signal") or "KILL")
    except Exception as exc:
        raise bad_request(f"invalid signal {request.query.get('signal')!r}: {exc}") from None
    await ctx_of(request).call(lambda e: e.supervisor.kill(ref, sig))
    return no_content()


def _last_exit(e: Engine, cid: str) -> int:
    """The exit code of a container that is gone (--rm): its last `die` event."""
    code = 0
    for ev in e.events.read(since_ns=time.time_ns() - 3_600_000_000_000):
        if ev.type == "container" and ev.action == "die" and ev.actor == cid:
            try:
                code = int(ev.attributes.get("exitCode", "0"))
            except ValueError:
                pass
    return code


async def wait(request: web.Request) -> web.StreamResponse:
    ref = request.match_info["id"]
    condition = qstr(request, "condition") or "not-running"
    if condition not in ("not-running", "next-exit", "removed"):
        raise bad_request(f"invalid condition {condition!r}: use not-running, next-exit or removed")
    ctx = ctx_of(request)
    rec = await ctx.call(lambda e: e.instances.get(ref))
    # the headers go out now: the docker CLI waits for them before it starts the container
    response = web.StreamResponse(status=200, headers={"Content-Type": "application/json"})
    await response.prepare(request)

    first_finished = rec.finished

    def work(e: Engine) -> int | None:
        """One second of waiting (a worker thread never blocks the daemon's shutdown for long)."""
        from cocon.engine.errors import Conflict

        try:
            code = e.supervisor.wait(rec.id, condition, timeout=1.0)
        except NotFound:
            return _last_exit(e, rec.id)
        except Conflict:
            if condition == "next-exit":  # it may have ended between two calls
                try:
                    cur = e.instances.get(rec.id)
                except NotFound:
                    return _last_exit(e, rec.id)
                if cur.status == "exited" and cur.finished != first_finished:
                    return cur.exit_code or 0
            return None
        if condition == "removed":
            try:
                e.instances.get(rec.id)
                return None
            except NotFound:
                return _last_exit(e, rec.id)
        return code

    error = None
    code: int | None = None
    try:
        while code is None:
            if ctx.shutting_down.is_set() or request.transport is None or request.transport.is_closing():
                return response
            code = await ctx.call(work)
    except Exception as exc:
        code, error = 255, {"Message": str(exc)}
    try:
        await response.write((json_dumps({"StatusCode": code, "Error": error}) + "\n").encode())
        await response.write_eof()
    except (ConnectionError, RuntimeError):
        pass  # the client stopped waiting
    return response


def json_dumps(doc: Any) -> str:
    from cocon.api.docker.common import dumps

    return dumps(doc)


async def remove(request: web.Request) -> web.StreamResponse:
    ref = request.match_info["id"]
    force, volumes = qbool(request, "force"), qbool(request, "v")
    if qbool(request, "link"):
        raise bad_request("links are not supported (cocon has no legacy links)")

    def work(e: Engine) -> None:
        cid = e.supervisor.remove(ref, force=force, volumes=volumes)
        e.networks.forget_container(cid)

    await ctx_of(request).call(work)
    return no_content()


# --- list and inspect ---------------------------------------------------------------------------------

LIST_FILTERS = ("status", "name", "id", "label", "ancestor", "exited", "health", "isolation")
_STATUSES = ("created", "restarting", "running", "removing", "paused", "exited", "dead")


def _list(
    e: Engine, all_: bool, limit: int, filters: dict[str, list[str]], version: tuple[int, int]
) -> list[dict[str, Any]]:
    items = e.supervisor.ps(all=True)
    if not all_ and not filters.get("status") and limit <= 0:  # as dockerd: a limit implies all
        items = [i for i in items if i["State"] in ("running", "paused")]
    for s in filters.get("status", []):
        if s not in _STATUSES:
            raise bad_request(f"invalid filter 'status={s}': use one of {', '.join(_STATUSES)}")
    if filters.get("status"):
        items = [i for i in items if i["State"] in filters["status"]]
    if filters.get("id"):
        items = [i for i in items if any(i["Id"].startswith(v) for v in filters["id"])]
    if filters.get("name"):
        try:
            pats = [re.compile(p) for p in filters["name"]]
        except re.error as exc:
            raise bad_request(f"invalid name filter: {exc}") from None
        items = [i for i in items if any(p.search(i["Names"][0]) for p in pats)]
    if filters.get("label"):
        items = [i for i in items if label_matches(i.get("Labels"), filters["label"])]
    if filters.get("isolation"):
        items = [i for i in items if i.get("Isolation") in filters["isolation"]]
    if filters.get("ancestor"):
        wanted: set[str] = set()
        for a in filters["ancestor"]:
            try:
                wanted.add(e.images.resolve(a).id)
            except Exception:
                wanted.add(a)
        items = [i for i in items if i["ImageID"] in wanted or i["Image"] in wanted]
    if filters.get("exited"):
        codes = set()
        for v in filters["exited"]:
            try:
                codes.add(int(v))
            except ValueError:
                raise bad_request(f"invalid filter 'exited={v}': give an exit code") from None
        keep = []
        for i in items:
            rec = e.instances.get(i["Id"])
            if i["State"] == "exited" and rec.exit_code in codes:
                keep.append(i)
        items = keep
    if filters.get("health"):
        keep = []
        for i in items:
            status = str(i.get("Status", ""))
            h = "none"
            for word in ("healthy", "unhealthy", "starting"):
                if f"({word})" in status or f"(health: {word})" in status:
                    h = word
            if h in filters["health"]:
                keep.append(i)
        items = keep
    if limit > 0:
        items = items[:limit]
    from cocon.engine import netattach

    live = netattach.live_endpoints(e, [i["Id"] for i in items]) if items else {}
    net_ids = {n.name: n.id for n in e.networks.list()} if items else {}
    out = []
    for i in items:
        try:
            rec = e.instances.get(i["Id"])
        except NotFound:
            continue  # removed meanwhile
        out.append(i)
        eps = live.get(i["Id"], [])
        settings = _network_settings(e, rec, eps, net_ids, version)
        i.setdefault("Ports", netattach.port_list(eps, rec.config if i.get("State") == "running" else None))
        i.setdefault("HostConfig", {"NetworkMode": _mode(rec)})
        i.setdefault("NetworkSettings", {"Networks": settings["Networks"]})
        i.setdefault("SizeRw", None)
    return out


def _mode(rec: Any) -> str:
    mode = str(rec.config.get("Network") or "none")
    given = str((rec.config["Create"].get("HostConfig") or {}).get("NetworkMode") or "")
    return given if mode == "bridge" and given in ("default", "bridge") else mode


def _network_settings(
    e: Engine, rec: Any, eps: list[Any], net_ids: dict[str, str], version: tuple[int, int]
) -> dict[str, Any]:
    """NetworkSettings (cocon.engine.netattach.settings). Before API 1.45 Docker lists the short ID
    among a user network's aliases (docker-compose 1.29 looks for it), since then in DNSNames."""
    from cocon.engine import netattach

    settings = netattach.settings(rec, eps, net_ids)
    short = rec.id[:12]
    for name, doc in settings["Networks"].items():
        if version < (1, 45) and name not in ("bridge", "none", "host"):
            aliases = list(doc.get("Aliases") or [])
            doc["Aliases"] = aliases if short in aliases else [*aliases, short]
        if version < (1, 44):
            doc.pop("DNSNames", None)
    return settings


async def list_containers(request: web.Request) -> web.StreamResponse:
    filters = qfilters(request, LIST_FILTERS)
    all_ = qbool(request, "all")
    limit = qint(request, "limit", -1)
    qbool(request, "size")  # validated; SizeRw is reported as unknown (null)
    return json_response(await ctx_of(request).call(_list, all_, limit, filters, api_version(request)))


def _inspect(e: Engine, ref: str, version: tuple[int, int]) -> dict[str, Any]:
    doc = e.supervisor.inspect(ref)
    rec = e.instances.get(doc["Id"])
    body = rec.config["Create"]
    cfg = doc["Config"]
    cfg.update(
        {
            "AttachStdin": False, "AttachStdout": False, "AttachStderr": False,
            "StdinOnce": bool(body.get("StdinOnce")), "StopSignal": body.get("StopSignal") or "",
            "ExposedPorts": body.get("ExposedPorts") or {}, "Volumes": body.get("Volumes") or None,
            "Healthcheck": body.get("Healthcheck"), "Domainname": "",
        }
    )  # fmt: skip
    if body.get("StopTimeout") is not None:
        cfg["StopTimeout"] = body["StopTimeout"]
    if cfg.get("Env") is None:
        cfg["Env"] = []
    host = doc.setdefault("HostConfig", {})
    host.setdefault("AutoRemove", bool(rec.config.get("AutoRemove")))
    host.setdefault("RestartPolicy", {"Name": "no", "MaximumRetryCount": 0})
    host.setdefault("LogConfig", {"Type": "json-file", "Config": {}})
    host["Isolation"] = rec.isolation
    doc.setdefault("ResolvConfPath", "")
    doc.setdefault("HostnamePath", "")
    doc.setdefault("HostsPath", "")
    doc.setdefault("Platform", "linux")
    doc.setdefault("MountLabel", "")
    doc.setdefault("ProcessLabel", "")
    doc.setdefault("AppArmorProfile", "")
    doc.setdefault("ExecIDs", None)
    from cocon.engine import netattach

    eps = netattach.live_endpoints(e, [rec.id]).get(rec.id, [])
    host["NetworkMode"] = _mode(rec)
    doc["NetworkSettings"] = _network_settings(
        e, rec, eps, {n.name: n.id for n in e.networks.list()}, version
    )
    if eps:
        files = netattach.files_dir(e, rec.id)
        doc["ResolvConfPath"] = f"{files}/resolv.conf"
        doc["HostnamePath"] = f"{files}/hostname"
        doc["HostsPath"] = f"{files}/hosts"
    doc["State"].setdefault("Restarting", False)
    return doc


async def inspect(request: web.Request) -> web.StreamResponse:
    ref = request.match_info["id"]
    return json_response(await ctx_of(request).call(_inspect, ref, api_version(request)))


# --- attach, resize, logs -----------------------------------------------------------------------------


async def _relay(
    stream: HijackedStream,
    sock: socket.socket,
    *,
    tty: bool,
    stdin: bool,
    stdout: bool,
    stderr: bool,
    stdin_once: bool,
) -> None:
    from cocon.engine.attach import STDERR, STDOUT

    loop = asyncio.get_running_loop()
    sock.setblocking(False)

    async def output() -> None:
        while True:
            data = await loop.sock_recv(sock, 1 << 16)
            if not data:
                return
            kind, payload = data[0], data[1:]
            if not payload:
                continue
            if kind == STDOUT and stdout:
                await stream.write(payload if tty else frame(1, payload))
            elif kind == STDERR and stderr:
                await stream.write(payload if tty else frame(2 if not tty else 1, payload))

    out_task = asyncio.ensure_future(output())

    async def input_() -> None:
        while True:
            data = await stream.read()
            if not data:
                if stream.closed:
                    out_task.cancel()  # the client went away
                elif stdin and stdin_once:
                    try:
                        sock.shutdown(socket.SHUT_WR)
                    except OSError:
                        pass
                return
            if stdin:
                try:
                    await loop.sock_sendall(sock, data)
                except OSError:
                    return

    in_task = asyncio.ensure_future(input_())
    try:
        await out_task
    except (asyncio.CancelledError, OSError):
        pass
    finally:
        in_task.cancel()
        sock.close()
        stream.close_write()
        stream.close()


async def attach(request: web.Request) -> web.StreamResponse:
    from cocon.engine import attach as attach_mod

    ref = request.match_info["id"]
    ctx = ctx_of(request)
    replay, live = qbool(request, "logs"), qbool(request, "stream", True)
    stdin, stdout, stderr = qbool(request, "stdin"), qbool(request, "stdout"), qbool(request, "stderr")
    rec = await ctx.call(lambda e: e.instances.get(ref))
    body = rec.config["Create"]
    tty = bool(body.get("Tty"))
    running = await ctx.call(lambda e: e.supervisor.running(rec.id))
    fut: asyncio.Future[socket.socket] | None = None
    sock: socket.socket | None = None
    if live and running:
        sock = await ctx.call(lambda e: attach_mod.connect(e.supervisor.attach_socket(rec.id), rec.name))
    elif live:
        fut = asyncio.get_running_loop().create_future()
        _pending(request).setdefault(rec.id, []).append(fut)
    try:
        # the log is read after the live stream is connected: nothing written in between is lost
        # (a chunk written at that very moment may come twice, in the replay and live)
        old = await ctx.call(_replay, rec.id, stdout, stderr, tty) if replay else []
        stream = await hijack(request, RAW if tty else MULTIPLEXED)
    except BaseException:
        if sock is not None:
            sock.close()
        if fut is not None:
            fut.cancel()
        raise
    if old:
        # docker-py reads the 101 answer through a buffered file and then the raw socket: bytes that
        # arrive together with the headers would be lost in that buffer. dockerd's replay comes
        # later (it reads the log first); give the client that moment too.
        await asyncio.sleep(0.05)
    for chunk in old:
        await stream.write(chunk)
    if not live:
        stream.close_write()
        stream.close()
        return stream.response
    if fut is not None:
        try:
            while not fut.done():  # what the client sends meanwhile stays queued in the stream
                await asyncio.wait({fut}, timeout=0.25)
                if stream.closed:
                    fut.cancel()
                    break
            sock = fut.result()
        except (asyncio.CancelledError, Exception):
            stream.close()
            return stream.response
    assert sock is not None
    await _relay(
        stream, sock, tty=tty, stdin=stdin, stdout=stdout, stderr=stderr,
        stdin_once=bool(body.get("StdinOnce")) or not bool(body.get("OpenStdin")),
    )  # fmt: skip
    return stream.response


def _replay(e: Engine, cid: str, stdout: bool, stderr: bool, tty: bool) -> list[bytes]:
    """attach's logs=1: what the container wrote so far, framed as the attach stream frames it."""
    from cocon.engine import logs as logs_mod

    if not (stdout or stderr):
        return []
    _rec, files = e.supervisor.log_files(cid)
    out = []
    for stream_name, _t, _text, line in logs_mod.read_logs(files, stdout=stdout, stderr=stderr):
        out.append(line if tty else frame(2 if stream_name == "stderr" else 1, line))
    return out


async def resize(request: web.Request) -> web.StreamResponse:
    from cocon.engine import attach as attach_mod

    ref = request.match_info["id"]
    h, w = qint(request, "h", 0), qint(request, "w", 0)
    if h <= 0 or w <= 0:
        raise bad_request("resize needs h and w, positive numbers of rows and columns")

    def work(e: Engine) -> None:
        rec = e.instances.get(ref)
        if not e.supervisor.running(rec.id):
            from cocon.engine.errors import Conflict

            raise Conflict(f"container {rec.name} is not running")
        attach_mod.resize(e.supervisor.bundle(rec.id), h, w)

    await ctx_of(request).call(work)
    return no_content(200)


async def logs(request: web.Request) -> web.StreamResponse:
    from cocon.engine import logs as logs_mod

    ref = request.match_info["id"]
    ctx = ctx_of(request)
    follow, timestamps = qbool(request, "follow"), qbool(request, "timestamps")
    stdout, stderr = qbool(request, "stdout"), qbool(request, "stderr")
    if not (stdout or stderr):
        raise bad_request("you must choose at least one stream: stdout=1 and/or stderr=1")
    tail_text = (qstr(request, "tail") or "all").strip()
    tail: int | None = None
    if tail_text != "all":
        try:
            tail = max(0, int(tail_text))
        except ValueError:
            raise bad_request(f"invalid tail {tail_text!r}: give a number or all") from None
    try:
        since = logs_mod.parse_since(qstr(request, "since") or None)
        until = logs_mod.parse_since(qstr(request, "until") or None)
    except ValueError as exc:
        raise bad_request(str(exc)) from None
    if since == 0:
        since = None
    rec, paths = await ctx.call(lambda e: e.supervisor.log_files(ref))
    # opened before the headers go out: a client may remove the container as soon as it has them
    # (docker-py's run(remove=True) reads this stream only after its remove)
    files = await ctx.run(logs_mod.open_log_files, paths)
    tty = bool(rec.config["Create"].get("Tty"))
    multiplexed = not tty
    ctype = MULTIPLEXED if multiplexed and api_version(request) >= (1, 42) else RAW
    response = web.StreamResponse(status=200, headers={"Content-Type": ctype})
    try:
        await response.prepare(request)
    except BaseException:
        for _path, f in files:
            f.close()
        raise
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[bytes | None] = asyncio.Queue(maxsize=256)
    cancelled = threading.Event()

    def put(item: bytes | None) -> None:
        asyncio.run_coroutine_threadsafe(queue.put(item), loop).result()

    def reader() -> None:
        try:
            from cocon.engine.engine import Engine as _Engine

            engine = _Engine(ctx.root, ctx.run_dir)

            def running() -> bool:
                return not cancelled.is_set() and engine.supervisor.running(rec.id)

            try:
                entries = logs_mod.read_logs(
                    files, stdout=stdout, stderr=stderr, since=since, until=until, tail=tail,
                    follow=follow, running=running,
                )  # fmt: skip
                for stream_name, _t, text, line in entries:
                    if cancelled.is_set():
                        break
                    data = (text.encode() + b" " + line) if timestamps else line
                    n = 2 if stream_name == "stderr" else 1
                    put(frame(n, data) if multiplexed else data)
            finally:
                engine.close()
        except Exception:
            pass
        finally:
            try:
                put(None)
            except Exception:
                pass

    thread = threading.Thread(target=reader, name="cocon-logs", daemon=True)
    thread.start()
    try:
        while True:
            item = await queue.get()
            if item is None:
                break
            await response.write(item)
        await response.write_eof()
    except (ConnectionError, RuntimeError):
        pass  # the client went away (docker-compose logs -f stopped with ^C): the reader stops too
    finally:
        cancelled.set()
        while not queue.empty():
            queue.get_nowait()
    return response


# --- top, stats, pause, rename --------------------------------------------------------------------------


async def top(request: web.Request) -> web.StreamResponse:
    ref = request.match_info["id"]
    ps_args = qstr(request, "ps_args") or None
    return json_response(await ctx_of(request).call(lambda e: e.supervisor.top(ref, ps_args)))


async def stats(request: web.Request) -> web.StreamResponse:
    ref = request.match_info["id"]
    ctx = ctx_of(request)
    if qbool(request, "stream", True) and not qbool(request, "one_shot"):
        response = web.StreamResponse(status=200, headers={"Content-Type": "application/json"})
        await response.prepare(request)
        try:
            while True:
                doc = await ctx.call(lambda e: e.supervisor.stats(ref))
                await response.write((json_dumps(doc) + "\n").encode())
                if not await ctx.call(lambda e: e.supervisor.running(ref)):
                    break
                await asyncio.sleep(1.0)
            await response.write_eof()
        except (ConnectionError, RuntimeError):
            pass
        return response
    return json_response(await ctx.call(lambda e: e.supervisor.stats(ref)))


async def pause(request: web.Request) -> web.StreamResponse:
    ref = request.match_info["id"]
    await ctx_of(request).call(lambda e: e.supervisor.pause(ref))
    return no_content()


async def unpause(request: web.Request) -> web.StreamResponse:
    ref = request.match_info["id"]
    await ctx_of(request).call(lambda e: e.supervisor.unpause(ref))
    return no_content()


async def rename(request: web.Request) -> web.StreamResponse:
    ref = request.match_info["id"]
    name = qstr(request, "name") or ""
    if not name:
        raise HTTPError(400, "rename needs the new name: ?name=NEW")
    await ctx_of(request).call(lambda e: e.supervisor.rename(ref, name))
    return no_content()


# --- archive (docker cp) ----------------------------------------------------------------------------


def _path_stat(path: str, name: str) -> str:
    """Docker's X-Docker-Container-Path-Stat: base64 of {name, size, mode (Go's FileMode), mtime,
    linkTarget}."""
    import base64
    import json
    import os
    import stat as st

    info = os.lstat(path)
    mode = st.S_IMODE(info.st_mode)
    link = ""
    if st.S_ISDIR(info.st_mode):
        mode |= 1 << 31
    elif st.S_ISLNK(info.st_mode):
        mode |= 1 << 27
        link = os.readlink(path)
    mtime = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(info.st_mtime))
    doc = {"name": name, "size": info.st_size, "mode": mode, "mtime": mtime, "linkTarget": link}
    return base64.b64encode(json.dumps(doc).encode()).decode()


async def _fetch(request: web.Request) -> tuple[str, str, str]:
    """Copy the container's `?path=` into a new temporary directory (cocon.engine.copy: resolved
    inside the container's root); (temp dir, the copy, its name)."""
    import os
    import tempfile

    from cocon.api.docker.common import tmp_dir

    ref = request.match_info["id"]
    path = qstr(request, "path") or ""
    if not path:
        raise bad_request("the archive routes need ?path=PATH in the container")
    ctx = ctx_of(request)
    tmp = tempfile.mkdtemp(prefix="archive-", dir=tmp_dir(ctx))
    name = os.path.basename(path.rstrip("/")) or "/"
    if path.rstrip("/").endswith("/.") or path in (".", "/."):
        name = "."
    dest = os.path.join(tmp, "out")
    try:
        await ctx.call(lambda e: e.supervisor.copy(ref, dest=dest, path=path))
    except BaseException:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return tmp, dest, name if name not in ("/", ".") else "/"


async def archive_head(request: web.Request) -> web.StreamResponse:
    import shutil

    tmp, dest, name = await _fetch(request)
    try:
        header = _path_stat(dest, name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return web.Response(status=200, headers={"X-Docker-Container-Path-Stat": header})


async def archive_get(request: web.Request) -> web.StreamResponse:
    import os
    import shutil
    import tarfile

    ctx = ctx_of(request)
    tmp, dest, name = await _fetch(request)
    try:
        header = _path_stat(dest, name)
        tar_path = os.path.join(tmp, "archive.tar")

        def make() -> None:
            with tarfile.open(tar_path, "w", format=tarfile.PAX_FORMAT) as tf:
                tf.add(dest, arcname=name if name != "/" else ".", recursive=True)

        await ctx.run(make)
        response = web.StreamResponse(
            status=200, headers={"Content-Type": "application/x-tar", "X-Docker-Container-Path-Stat": header}
        )
        response.content_length = os.path.getsize(tar_path)  # no chunked framing to finish
        await response.prepare(request)
        try:
            with open(tar_path, "rb") as f:
                while chunk := await ctx.run(f.read, 1 << 20):
                    await response.write(chunk)
            await response.write_eof()
        except ConnectionResetError:  # the client hung up (it may have read all it wanted): nothing to do
            pass
        return response
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


async def archive_put(request: web.Request) -> web.StreamResponse:
    import os
    import shutil
    import tempfile

    from cocon.api.docker import tarsafe
    from cocon.api.docker.common import spool_body, tmp_dir

    ref = request.match_info["id"]
    path = qstr(request, "path") or ""
    if not path:
        raise bad_request("PUT /containers/{id}/archive needs ?path=DIRECTORY in the container")
    owned = qbool(request, "copyUIDGID")
    ctx = ctx_of(request)
    spooled = await spool_body(request, "archive")
    tmp = tempfile.mkdtemp(prefix="archive-", dir=tmp_dir(ctx))
    try:

        def unpack() -> list[str]:
            with open(spooled, "rb") as f:
                try:
                    tarsafe.extract(f, tmp, max_bytes=ctx.max_upload)
                except Exception as exc:
                    raise HTTPError(400, f"the archive cannot be unpacked: {exc}") from None
            return sorted(os.listdir(tmp))

        names = await ctx.run(unpack)
        if owned:
            await ctx.call(_copy_owned, ref, tmp, names, path)
        for n in names if not owned else ():
            src = os.path.join(tmp, n)
            await ctx.call(lambda e, src=src: e.supervisor.copy(ref, src=src, path=path))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        os.unlink(spooled)
    return no_content(200)


def _container_owner(e: Engine, user: str, image: str, rootfs: str) -> tuple[int, int]:
    """(uid, gid) of the container's user: its User, else its image's, looked up in the container's
    /etc/passwd and /etc/group (Docker's copyUIDGID); no user at all is root."""
    import json

    from cocon.isolation.spec import SpecError, resolve_user

    if not user:
        try:
            user = str((json.loads(e.images.content.read(image)).get("config") or {}).get("User") or "")
        except Exception as exc:
            raise HTTPError(
                500, f"cannot read the container's image config ({exc}): copy without copyUIDGID"
            ) from None
    if not user:
        return 0, 0
    try:
        uid, gid, _extra, _home = resolve_user(rootfs, user)
    except SpecError as exc:
        raise bad_request(f"copyUIDGID: cannot find the container's user {user!r}: {exc}") from None
    return uid, gid


def _chown_tree(dir_fd: int, name: str, uid: int, gid: int) -> None:
    """lchown `name` in `dir_fd` and everything under it, following no symlink."""
    import os
    import stat as st

    os.chown(name, uid, gid, dir_fd=dir_fd, follow_symlinks=False)
    if not st.S_ISDIR(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode):
        return
    fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    try:
        for child in os.listdir(fd):
            _chown_tree(fd, child, uid, gid)
    finally:
        os.close(fd)


def _copy_owned(e: Engine, ref: str, tmp: str, names: list[str], path: str) -> None:
    """PUT /archive with copyUIDGID=1: the unpacked `names` (in `tmp`) copied into the container's
    directory `path` (cocon.engine.copy: resolved inside its root), then owned by the container's
    user (Docker: "the primary uid/gid of the container's user", not the archive's). As
    Supervisor.copy: a stopped container's root file system is mounted for the copy. The user is
    resolved before anything is written."""
    import os

    from cocon import _fastjson
    from cocon import _linux as L
    from cocon.engine import copy as copy_mod
    from cocon.engine.errors import Conflict

    sup = e.supervisor
    rec = e.instances.get(ref)
    with sup.lock(rec.id):
        rec = e.instances.get(rec.id)
        running = sup.status(rec) in ("running", "paused")
        if running:
            try:
                with open(os.path.join(sup.bundle(rec.id), "config.json"), "rb") as f:
                    rootfs = str(_fastjson.loads(f.read())["root"]["path"])
            except (OSError, ValueError, KeyError):
                raise Conflict(
                    f"container {rec.name} is running in the foreground: copy once it stopped"
                ) from None
        else:
            rootfs = e.containers._mount(rec)
        try:
            uid, gid = _container_owner(e, str(rec.config["Create"].get("User") or ""), rec.image, rootfs)
            root_fd = os.open(rootfs, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                dir_fd = L.openat2(
                    root_fd, path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC,
                    L.RESOLVE_IN_ROOT | L.RESOLVE_NO_MAGICLINKS,
                )  # fmt: skip
            except FileNotFoundError:
                raise NotFound(f"no such directory in the container: {path}") from None
            except NotADirectoryError:
                raise bad_request(f"{path} in the container is not a directory") from None
            except OSError as exc:
                raise bad_request(f"cannot open {path} in the container: {exc.strerror}") from None
            finally:
                os.close(root_fd)
            try:
                for n in names:
                    copy_mod.copy_to(rootfs, os.path.join(tmp, n), path)
                    _chown_tree(dir_fd, n, uid, gid)
            finally:
                os.close(dir_fd)
        finally:
            if not running:
                e.containers._unmount(rec)


def register(app: web.Application) -> None:
    app[PENDING_KEY] = {}
    add_route(app, "POST", "/containers/create", create)
    add_route(app, "GET", "/containers/json", list_containers)
    add_route(app, "GET", "/containers/{id}/json", inspect)
    add_route(app, "POST", "/containers/{id}/start", start)
    add_route(app, "POST", "/containers/{id}/stop", stop)
    add_route(app, "POST", "/containers/{id}/restart", restart)
    add_route(app, "POST", "/containers/{id}/kill", kill)
    add_route(app, "POST", "/containers/{id}/wait", wait)
    add_route(app, "DELETE", "/containers/{id}", remove)
    add_route(app, "POST", "/containers/{id}/attach", attach)
    add_route(app, "POST", "/containers/{id}/resize", resize)
    add_route(app, "GET", "/containers/{id}/logs", logs)
    add_route(app, "GET", "/containers/{id}/top", top)
    add_route(app, "GET", "/containers/{id}/stats", stats)
    add_route(app, "POST", "/containers/{id}/pause", pause)
    add_route(app, "POST", "/containers/{id}/unpause", unpause)
    add_route(app, "POST", "/containers/{id}/rename", rename)
    add_route(app, "HEAD", "/containers/{id}/archive", archive_head)
    add_route(app, "GET", "/containers/{id}/archive", archive_get)
    add_route(app, "PUT", "/containers/{id}/archive", archive_put)
