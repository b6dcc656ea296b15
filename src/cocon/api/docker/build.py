"""`POST /build`: Docker's classic builder protocol on top of cocon's Containerfile builder.

The body is the build context as a tar (plain or compressed); the query names the tags (`t`,
repeated), the Containerfile (`dockerfile`, relative to the context), `buildargs` and `labels`
(JSON objects), `target`, `nocache`, `q`. The answer streams Docker's messages: `{"stream": text}`
for the build's output, `{"aux": {"ID": image}}` for the result, `{"errorDetail": …, "error": …}`
when the build fails (the status is 200 by then, as with dockerd).

The context is spooled to a file, then unpacked by `tarsafe.extract` (no member may leave the
directory or write through a link) into a private directory under `$COCON_ROOT/tmp/api`. The
Containerfile and its ignore files are read *inside* the context (links resolved in it), copied
beside it, and the builder is given that copy: nothing the client sends can make the daemon read a
host file. `labels` become a `LABEL` instruction appended to the Containerfile, which is what
Docker's classic builder does with them. Everything is removed when the build ends.

Options that would change the result but that cocon cannot honour are refused with 400 (remote
contexts, BuildKit sessions, squash, extra hosts, resource limits, other platforms, cache-from,
outputs); options without effect here are accepted (`rm`, `forcerm`: cocon keeps no intermediate
containers; `pull`: there is no registry to pull from). RUN steps use the host's network (or none
with `RUN --network=none`) until cocon has networks; `networkmode` must be default, host or none
and does not change that.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
from typing import TYPE_CHECKING, Any

from aiohttp import web

from cocon.api.docker.common import (
    JSONStream,
    add_route,
    bad_request,
    ctx_of,
    qbool,
    qint,
    qjson_map,
    qlist,
    qstr,
    spool_body,
    tmp_dir,
)
from cocon.engine.errors import EngineError

if TYPE_CHECKING:
    from cocon.engine.engine import Engine

MAX_CONTAINERFILE = 16 << 20
CONTAINERFILES = ("Containerfile", "Dockerfile")
IGNORE_SUFFIXES = (".containerignore", ".dockerignore")
ROOT_IGNORE_FILES = (".containerignore", ".dockerignore")


class BuildCancelled(Exception):
    """The client went away: the build stops at its next event."""


def _label_line(labels: dict[str, str]) -> str:
    def quote(text: str) -> str:
        if any(c in text for c in "\n\r\0"):
            raise bad_request(f"label {text!r}: line breaks are not allowed in build labels")
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("$", "\\$") + '"'

    return "LABEL " + " ".join(f"{quote(k)}={quote(v)}" for k, v in sorted(labels.items())) + "\n"


def _params(request: web.Request) -> dict[str, Any]:
    """The query, checked: what cocon cannot honour is refused with a reason."""
    q = request.query
    if q.get("remote"):
        raise bad_request(
            "remote build contexts (git URLs, tarball URLs) are not supported: send the context as the body"
        )
    version = q.get("version", "1")
    if version not in ("", "1"):
        raise bad_request(
            "BuildKit (builder version 2) is not supported: use the classic builder (DOCKER_BUILDKIT=0)"
        )
    if q.get("session"):
        raise bad_request("BuildKit sessions are not supported: use the classic builder (DOCKER_BUILDKIT=0)")
    if qbool(request, "squash"):
        raise bad_request("squash is not supported")
    for name in ("extrahosts", "outputs"):
        if q.get(name) not in (None, "", "[]", "null"):
            raise bad_request(f"{name} is not supported by cocon's builder yet")
    if q.get("cachefrom") not in (None, "", "[]", "null"):
        raise bad_request(
            "cachefrom is not supported: cocon's build cache is local (use nocache to bypass it)"
        )
    for name in ("memory", "memswap", "cpushares", "cpuperiod", "cpuquota", "shmsize"):
        value = qint(request, name, 0)
        if value not in (0, -1) and not (name == "shmsize" and value == 64 << 20):
            raise bad_request(f"{name} is not supported: cocon's build steps have no resource limits yet")
    if q.get("cpusetcpus") or q.get("cpusetmems"):
        raise bad_request("cpusetcpus/cpusetmems are not supported: build steps have no resource limits yet")
    if q.get("ulimits") not in (None, "", "[]", "null"):
        raise bad_request("ulimits are not supported for build steps yet")
    if q.get("isolation") not in (None, "", "default", "process", "container"):
        raise bad_request("build steps run with container isolation only")
    network = q.get("networkmode", "")
    if network not in ("", "default", "host", "none", "bridge"):
        raise bad_request(
            f"networkmode {network!r}: cocon build steps use the host's network (or RUN --network=none)"
        )
    platform = q.get("platform", "")
    if platform:
        from cocon.api.docker.images import _host_arch

        if platform not in ("linux", f"linux/{_host_arch()}"):
            raise bad_request(
                f"platform {platform!r}: cocon builds for this machine's platform only (no emulation)"
            )
    qbool(request, "rm", True)
    qbool(request, "forcerm")
    qbool(request, "pull")
    dockerfile = qstr(request, "dockerfile") or None
    if dockerfile is not None and (dockerfile.startswith("/") or ".." in dockerfile.split("/")):
        raise bad_request(f"dockerfile {dockerfile!r} must be a path inside the build context")
    return {
        "tags": qlist(request, "t"),
        "dockerfile": dockerfile,
        "build_args": qjson_map(request, "buildargs"),
        "labels": qjson_map(request, "labels"),
        "target": qstr(request, "target") or None,
        "no_cache": qbool(request, "nocache"),
        "quiet": qbool(request, "q"),
    }


def prepare_context(
    upload: str, work: str, dockerfile: str | None, labels: dict[str, str], max_bytes: int
) -> tuple[str, str, str]:
    """Unpack the context and copy its Containerfile out of it: (context dir, containerfile path,
    the name the user knows it by). Raises UnsafeTar / EngineError-shaped errors as InvalidRequest."""
    import tarfile

    from cocon.api.docker import tarsafe
    from cocon.engine.errors import InvalidRequest

    context = os.path.join(work, "context")
    os.mkdir(context, 0o755)
    try:
        with open(upload, "rb") as f:
            tarsafe.extract(f, context, max_bytes=max_bytes)
    except tarsafe.UnsafeTar as exc:
        raise InvalidRequest(f"the build context is refused: {exc}") from None
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise InvalidRequest(f"the build context is not a readable tar archive: {exc}") from None
    names = [dockerfile] if dockerfile else list(CONTAINERFILES)
    found: tuple[str, bytes] | None = None
    try:
        for name in names:
            text = tarsafe.read_in_root(context, name, MAX_CONTAINERFILE)
            if text is not None:
                found = (name, text)
                break
        if found is None:
            want = dockerfile or "a Containerfile or Dockerfile"
            raise InvalidRequest(
                f"cannot find {want} in the build context: add it, or name it with dockerfile="
            )
        name, text = found
        outdir = os.path.join(work, "containerfile")
        os.mkdir(outdir, 0o700)
        copy = os.path.join(outdir, os.path.basename(name) or "Containerfile")
        if labels:
            text = text + (b"" if text.endswith(b"\n") else b"\n") + _label_line(labels).encode()
        with open(copy, "wb") as out:
            out.write(text)
        for suffix in IGNORE_SUFFIXES:
            ignore = tarsafe.read_in_root(context, name + suffix, MAX_CONTAINERFILE)
            if ignore is not None:
                with open(copy + suffix, "wb") as out:
                    out.write(ignore)
        # the builder reads .dockerignore at the context's root with open(): make sure it is a file
        for ignore_name in ROOT_IGNORE_FILES:
            path = os.path.join(context, ignore_name)
            if os.path.islink(path):
                content = tarsafe.read_in_root(context, ignore_name, MAX_CONTAINERFILE)
                os.unlink(path)
                if content is not None:
                    with open(path, "wb") as out:
                        out.write(content)
    except tarsafe.UnsafeTar as exc:
        raise InvalidRequest(f"the build context is refused: {exc}") from None
    return context, copy, name


async def build(request: web.Request) -> web.StreamResponse:
    ctx = ctx_of(request)
    params = _params(request)
    upload = await spool_body(request, "build context")
    work = tempfile.mkdtemp(prefix="build-", dir=tmp_dir(ctx))
    stream = JSONStream(request)
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[str] = asyncio.Queue()
    state = {"cancelled": False}
    try:
        context, containerfile, shown = await ctx.run(
            prepare_context, upload, work, params["dockerfile"], params["labels"], ctx.max_upload
        )
        os.unlink(upload)
        upload = ""

        def output(text: str) -> None:  # in the build's thread
            if state["cancelled"]:
                raise BuildCancelled("the client went away")
            if not params["quiet"]:
                loop.call_soon_threadsafe(queue.put_nowait, text)

        def work_fn(engine: Engine) -> dict[str, Any]:
            return engine.imageops.image_build(
                context,
                tags=params["tags"],
                dockerfile=containerfile,
                build_args=params["build_args"],
                target=params["target"],
                no_cache=params["no_cache"],
                output=output,
            )

        await stream.start()
        fut = asyncio.ensure_future(ctx.call(work_fn))
        try:
            while True:
                getter = asyncio.ensure_future(queue.get())
                done, _ = await asyncio.wait({fut, getter}, return_when=asyncio.FIRST_COMPLETED)
                if getter in done:
                    await stream.send({"stream": getter.result().replace(containerfile, shown)})
                    if stream.broken:
                        state["cancelled"] = True
                    continue
                getter.cancel()
                break
        except asyncio.CancelledError:  # the daemon stops and its grace period is over
            state["cancelled"] = True
            raise
        while not queue.empty():
            await stream.send({"stream": queue.get_nowait().replace(containerfile, shown)})
        try:
            result = fut.result()
        except EngineError as exc:
            await stream.error(str(exc).replace(containerfile, shown))
            return await stream.finish()
        except BuildCancelled:
            return await stream.finish()
        await stream.send({"aux": {"ID": result["Id"]}})
        if params["quiet"]:
            await stream.send({"stream": result["Id"] + "\n"})
        else:  # Docker's last line, which clients (docker-py) take the image from
            await stream.send({"stream": f"Successfully built {result['Id'].partition(':')[2][:12]}\n"})
        return await stream.finish()
    finally:
        if upload:
            os.unlink(upload)
        await ctx.run(shutil.rmtree, work, True)


def register(app: web.Application) -> None:
    add_route(app, "POST", "/build", build)
