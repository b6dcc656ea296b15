"""System routes: `/_ping`, `/version`, `/info`, `/system/df`, `/events`."""

from __future__ import annotations

import asyncio
import os
import platform
import socket
import sys
import time
from typing import TYPE_CHECKING, Any

from aiohttp import web

from cocon.api.docker.common import (
    API_VERSION,
    MIN_API_VERSION,
    JSONStream,
    add_route,
    api_version,
    bad_request,
    ctx_of,
    json_response,
    qfilters,
    qlist,
)
from cocon.engine.errors import EngineError, InvalidRequest

if TYPE_CHECKING:
    from cocon.engine.engine import Engine
    from cocon.engine.events import Event

VERSION = "0.1.0"
ISOLATION_LEVELS = ("container", "microvm", "vm")
#: What Docker clients call cocon's isolation levels (`docker run --isolation`).
DOCKER_ISOLATION = {"container": "process", "microvm": "hyperv"}
POLL_SECONDS = 1.0  # how often an event stream looks for events written by other processes


def _arch() -> str:
    machine = platform.machine()
    return {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "i686": "386"}.get(machine, machine)


async def ping(request: web.Request) -> web.StreamResponse:
    headers = {
        "API-Version": API_VERSION,
        "Builder-Version": "1",  # the classic builder protocol (no BuildKit session)
        "Docker-Experimental": "false",
        "OSType": "linux",
        "Cache-Control": "no-cache, no-store, must-revalidate",
        "Pragma": "no-cache",
    }
    if request.method == "HEAD":
        return web.Response(headers=headers, content_type="text/plain")
    return web.Response(text="OK", headers=headers, content_type="text/plain")


def _version_doc() -> dict[str, Any]:
    details = {
        "ApiVersion": API_VERSION,
        "MinAPIVersion": MIN_API_VERSION,
        "Os": "linux",
        "Arch": _arch(),
        "KernelVersion": os.uname().release,
        "GitCommit": "",
        "GoVersion": f"python{platform.python_version()}",
        "BuildTime": "",
        "Experimental": "false",
    }
    return {
        "Platform": {"Name": f"cocon {VERSION}"},
        "Components": [{"Name": "Engine", "Version": VERSION, "Details": details}],
        "Version": VERSION,
        "ApiVersion": API_VERSION,
        "MinAPIVersion": MIN_API_VERSION,
        "GitCommit": "",
        "GoVersion": details["GoVersion"],
        "Os": "linux",
        "Arch": _arch(),
        "KernelVersion": details["KernelVersion"],
        "BuildTime": "",
    }


async def version(request: web.Request) -> web.StreamResponse:
    return json_response(_version_doc())


# --- info ---------------------------------------------------------------------------------------------


def _os_name() -> str:
    try:
        with open("/etc/os-release") as f:
            for line in f:
                if line.startswith("PRETTY_NAME="):
                    return line.partition("=")[2].strip().strip('"')
    except OSError:
        pass
    return "Linux"


def _mem_total() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


def _fs_type(path: str) -> str:
    """The file system that holds `path`, named as Docker names it."""
    from cocon._mountinfo import filesystem_of

    try:
        entry = filesystem_of(path)
    except OSError:
        entry = None
    fstype = entry.fstype if entry else "unknown"
    return {"ext4": "extfs", "ext3": "extfs", "ext2": "extfs"}.get(fstype, fstype)


def engine_id(root: str) -> str:
    """A stable ID for this engine (Docker's `ID`), kept in `<root>/engine-id`."""
    path = os.path.join(root, "engine-id")
    try:
        with open(path) as f:
            text = f.read().strip()
            if text:
                return text
    except OSError:
        pass
    import uuid

    text = str(uuid.uuid4())
    os.makedirs(root, 0o700, exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        f.write(text + "\n")
    os.rename(tmp, path)
    return text


def isolation_levels(engine: Engine) -> dict[str, str]:
    """Each isolation level and whether this engine can run it now ('available' or why not)."""
    import shutil

    from cocon.vmm.qemu import QEMU_BINARY

    out: dict[str, str] = {}
    for level in ISOLATION_LEVELS:
        try:
            engine.driver(level)
            out[level] = "available"
        except EngineError as exc:
            out[level] = f"not available: {exc}"
        if level == "microvm" and out[level] == "available" and not shutil.which(QEMU_BINARY):
            out[level] = f"not available: {QEMU_BINARY} is not installed (apt-get install -y qemu-system-x86)"
    return out


def cgroup_info() -> tuple[str, str]:
    """(Docker's CgroupVersion "1"/"2", cocon's mode v1/hybrid/v2)."""
    from cocon.runtime.cgroups import cgroup_mode

    mode = cgroup_mode()
    return ("2" if mode == "v2" else "1"), mode


def info_doc(engine: Engine, started: float) -> dict[str, Any]:
    from cocon.engine.system import microvm_info

    records = engine.instances.list()
    running = sum(1 for r in records if r.status == "running")
    paused = sum(1 for r in records if r.status == "paused")
    images = engine.images.list()
    version, mode = cgroup_info()
    levels = isolation_levels(engine)
    microvm = microvm_info()
    swap = os.path.exists("/proc/swaps")
    warnings: list[str] = []
    if levels.get("microvm") == "available" and microvm["Accelerator"] == "tcg":
        lines = str(microvm["AcceleratorReason"]).splitlines()
        reason = " / ".join(line.strip() for line in lines if line.strip())
        warnings.append(f"WARNING: microVMs run under TCG emulation, not KVM: {reason}")
    return {
        "ID": engine_id(engine.root),
        "Containers": len(records),
        "ContainersRunning": running,
        "ContainersPaused": paused,
        "ContainersStopped": len(records) - running - paused,
        "Images": len(images),
        "Driver": "overlay2",
        "DriverStatus": [
            ["Backing Filesystem", _fs_type(engine.root)],
            ["Supports d_type", "true"],
            ["Using metacopy", "false"],
            ["Native Overlay Diff", "true"],
            ["userxattr", "false"],
        ],
        "Plugins": {
            "Volume": ["local"],
            "Network": ["bridge", "host", "null"],
            "Authorization": None,
            "Log": [],
        },
        "MemoryLimit": True,
        "SwapLimit": swap,
        "KernelMemory": False,
        "KernelMemoryTCP": False,
        "CpuCfsPeriod": True,
        "CpuCfsQuota": True,
        "CPUShares": True,
        "CPUSet": True,
        "PidsLimit": True,
        "OomKillDisable": version == "1",
        "IPv4Forwarding": True,
        "BridgeNfIptables": False,
        "BridgeNfIp6tables": False,
        "Debug": False,
        "NFd": len(os.listdir("/proc/self/fd")),
        "NGoroutines": 0,
        "SystemTime": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "LoggingDriver": "",
        "CgroupDriver": "cgroupfs",
        "CgroupVersion": version,
        "NEventsListener": 0,
        "KernelVersion": os.uname().release,
        "OperatingSystem": _os_name(),
        "OSVersion": "",
        "OSType": "linux",
        "Architecture": platform.machine(),
        "IndexServerAddress": "",
        "RegistryConfig": {
            "AllowNondistributableArtifactsCIDRs": None,
            "AllowNondistributableArtifactsHostnames": None,
            "InsecureRegistryCIDRs": [],
            "IndexConfigs": {},
            "Mirrors": None,
        },
        "NCPU": os.cpu_count() or 1,
        "MemTotal": _mem_total(),
        "GenericResources": None,
        "DockerRootDir": engine.root,
        "HttpProxy": "",
        "HttpsProxy": "",
        "NoProxy": "",
        "Name": socket.gethostname(),
        "Labels": [],
        "ExperimentalBuild": False,
        "ServerVersion": VERSION,
        "Runtimes": {"cocon-runtime": {"path": "cocon-runtime"}},
        "DefaultRuntime": "cocon-runtime",
        "Swarm": {
            "NodeID": "",
            "NodeAddr": "",
            "LocalNodeState": "inactive",
            "ControlAvailable": False,
            "Error": "",
            "RemoteManagers": None,
        },
        "LiveRestoreEnabled": False,
        "Isolation": "process",  # the default; hyperv (cocon's microvm) too: Cocon.DockerIsolation
        "InitBinary": "",
        "ContainerdCommit": {"ID": ""},
        "RuncCommit": {"ID": ""},
        "InitCommit": {"ID": ""},
        "SecurityOptions": ["name=seccomp,profile=builtin", "name=cgroupns"],
        "CDISpecDirs": [],
        "Warnings": warnings,
        # cocon's own fields (Docker clients ignore them)
        "Cocon": {
            "Version": VERSION,
            "Isolation": levels,
            "IsolationAvailable": [k for k, v in levels.items() if v == "available"],
            "DockerIsolation": [DOCKER_ISOLATION.get(k, k) for k, v in levels.items() if v == "available"],
            "MicroVM": microvm,
            "CgroupMode": mode,
            "StorageDriver": "overlayfs snapshotter (layers unpacked once per ChainID)",
            "Root": engine.root,
            "Run": engine.run_dir,
            "KVM": os.path.exists("/dev/kvm"),
            "Python": sys.version.split()[0],
            "Uptime": round(time.time() - started, 3),
        },
    }


async def info(request: web.Request) -> web.StreamResponse:
    ctx = ctx_of(request)
    return json_response(await ctx.call(info_doc, ctx.started))


# --- system df ----------------------------------------------------------------------------------------

DF_TYPES = ("container", "image", "volume", "build-cache")


def df_doc(engine: Engine, types: set[str]) -> dict[str, Any]:
    from cocon.storage.fsutil import disk_usage

    out: dict[str, Any] = {}
    if "image" in types:
        images = engine.imageops.image_list(all=True)
        layer_sizes: dict[str, int] = {}
        for image in engine.images.list():
            for layer in image.manifest.layers:
                layer_sizes[layer.digest] = layer.size
        out["LayersSize"] = sum(layer_sizes.values())
        out["Images"] = images
    if "container" in types:
        try:
            containers = engine.containers.list(all=True)
        except EngineError:
            containers = []
        for c in containers:
            c.setdefault("SizeRw", 0)
            c.setdefault("SizeRootFs", 0)
        out["Containers"] = containers
    if "volume" in types:
        volumes = engine.imageops.volume_list()["Volumes"]
        for v in volumes:
            v["UsageData"] = {
                "Size": disk_usage(v["Mountpoint"]) if os.path.isdir(v["Mountpoint"]) else -1,
                "RefCount": len(engine.instances.volume_users(v["Name"])),
            }
        out["Volumes"] = volumes
    if "build-cache" in types:
        out["BuildCache"] = []
    return out


async def system_df(request: web.Request) -> web.StreamResponse:
    types = set(qlist(request, "type")) or set(DF_TYPES)
    unknown = types - set(DF_TYPES)
    if unknown:
        raise bad_request(f"unknown type {sorted(unknown)[0]!r}: use {', '.join(DF_TYPES)}")
    return json_response(await ctx_of(request).call(df_doc, types))


# --- events -------------------------------------------------------------------------------------------


def _read_after(engine: Engine, after: int, until: int | None) -> list[Event]:
    return engine.events.read(after_id=after, until_ns=until)


async def events(request: web.Request) -> web.StreamResponse:
    """`GET /events?since=&until=&filters=`: the history asked for by `since`, then new events as they
    happen, until `until` (or the client leaves, or the daemon stops)."""
    from cocon.engine import events as ev

    ctx = ctx_of(request)
    filters = qfilters(request, ev.FILTER_KEYS)
    try:
        flt = ev.EventFilter(filters)
        since = ev.parse_time(request.query["since"], "since") if request.query.get("since") else None
        until = ev.parse_time(request.query["until"], "until") if request.query.get("until") else None
    except InvalidRequest as exc:
        raise bad_request(str(exc)) from None
    if since is not None and until is not None and since > until:
        raise bad_request("since must be before until")
    legacy = api_version(request) < (1, 46)
    loop = asyncio.get_running_loop()
    wake = asyncio.Event()

    def on_event(_event: Event) -> None:  # in the emitting thread
        loop.call_soon_threadsafe(wake.set)

    log_path = await ctx.call(lambda e: e.events.path)
    token = ev.subscribe(log_path, on_event)
    stream = JSONStream(request)
    try:
        last = await ctx.call(lambda e: e.events.last_id())
        if since is not None:
            history = await ctx.call(lambda e: e.events.read(since_ns=since, until_ns=until))
            for event in history:
                if flt.matches(event):
                    await stream.send(event.to_docker(legacy))
                last = max(last, event.id)
        await stream.start()
        while not stream.broken and not ctx.shutting_down.is_set():
            now = time.time_ns()
            if until is not None and now > until:
                break
            timeout = POLL_SECONDS if until is None else min(POLL_SECONDS, (until - now) / 1e9 + 0.01)
            waiters = [asyncio.ensure_future(wake.wait()), asyncio.ensure_future(ctx.shutting_down.wait())]
            try:
                await asyncio.wait(waiters, timeout=max(timeout, 0.01), return_when=asyncio.FIRST_COMPLETED)
            finally:
                for w in waiters:
                    w.cancel()
            wake.clear()
            fresh = await ctx.call(_read_after, last, until)
            for event in fresh:
                last = max(last, event.id)
                if flt.matches(event):
                    await stream.send(event.to_docker(legacy))
            if request.transport is None or request.transport.is_closing():
                break
    finally:
        ev.unsubscribe(token)
    return await stream.finish()


def register(app: web.Application) -> None:
    add_route(app, "GET", "/_ping", ping)
    add_route(app, "HEAD", "/_ping", ping)
    add_route(app, "GET", "/version", version)
    add_route(app, "GET", "/info", info)
    add_route(app, "GET", "/system/df", system_df)
    add_route(app, "GET", "/events", events)
