"""Image routes: list, inspect, history, tag, remove, save (`get`), load, import (`create?fromSrc=-`),
prune. Each answers through the engine's `ImageOps` (cocon.engine.imageops), which already speaks
the Docker API's shapes; this module adds Docker's query conventions, filters and streams."""

from __future__ import annotations

import asyncio
import functools
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from aiohttp import web

from cocon.api.docker.common import (
    HTTPError,
    JSONStream,
    add_route,
    api_version,
    bad_request,
    ctx_of,
    engine_status,
    filter_bool,
    json_response,
    label_matches,
    no_content,
    path_match,
    pump,
    qbool,
    qfilters,
    qlist,
    qstr,
    spool_body,
)
from cocon.engine.errors import EngineError, InvalidRequest, NotFound

if TYPE_CHECKING:
    from cocon.engine.engine import Engine
    from cocon.images.store import Image

T = TypeVar("T")

LIST_FILTERS = ("before", "dangling", "label", "reference", "since", "until")


def _name(request: web.Request) -> str:
    return request.match_info["name"]


def _resolve(engine: Engine, ref: str) -> Image:
    return engine.imageops._resolve(ref)


async def _on_image(request: web.Request, name: str, fn: Callable[[Engine], T]) -> T:
    """Run `fn(engine)`; a missing image is dockerd's 404 `No such image: NAME` (clients such as
    docker-py recognise missing images by those words), followed by cocon's hint."""
    try:
        return await ctx_of(request).call(fn)
    except NotFound as exc:
        text = str(exc)
        hint = text.split(" here: ", 1)[1] if " here: " in text else text
        raise HTTPError(404, f"No such image: {name}: {hint}") from None


def _created_of(engine: Engine, ref: str) -> int:
    from cocon.engine.imageops import parse_created

    return parse_created(engine.imageops._resolve(ref).config.created)


def _reference_matches(pattern: str, tag: str) -> bool:
    """Docker's `reference` filter: Go's path.Match on `name:tag`, then on `name` alone."""
    if path_match(pattern, tag):
        return True
    name = tag.rsplit(":", 1)[0] if ":" in tag.rsplit("/", 1)[-1] else tag
    return path_match(pattern, name)


async def list_images(request: web.Request) -> web.StreamResponse:
    from cocon.engine.events import parse_time

    ctx = ctx_of(request)
    filters = qfilters(request, LIST_FILTERS)
    all_ = qbool(request, "all")
    qbool(request, "digests")
    qbool(request, "shared-size")
    dangling = filter_bool(filters, "dangling")
    rows = await ctx.call(lambda e: e.imageops.image_list(all=all_, dangling=dangling))
    for key in ("before", "since"):
        for ref in filters.get(key, []):
            created = await ctx.call(_created_of, ref)
            if key == "before":
                rows = [r for r in rows if r["Created"] < created]
            else:
                rows = [r for r in rows if r["Created"] > created]
    for value in filters.get("until", []):
        try:
            until = parse_time(value, "until") // 1_000_000_000
        except InvalidRequest as exc:
            raise bad_request(str(exc)) from None
        rows = [r for r in rows if r["Created"] <= until]
    if filters.get("label"):
        rows = [r for r in rows if label_matches(r.get("Labels"), filters["label"])]
    if filters.get("reference"):
        kept = []
        for r in rows:
            tags = [t for t in r["RepoTags"] if any(_reference_matches(p, t) for p in filters["reference"])]
            if tags:
                r["RepoTags"] = tags
                repos = {t.rsplit(":", 1)[0] for t in tags}
                r["RepoDigests"] = [d for d in r["RepoDigests"] if d.partition("@")[0] in repos]
                kept.append(r)
        rows = kept
    if api_version(request) < (1, 44):
        for r in rows:
            r["VirtualSize"] = r["Size"]
    return json_response(rows)


async def inspect_image(request: web.Request) -> web.StreamResponse:
    name = _name(request)
    doc = await _on_image(request, name, lambda e: e.imageops.image_inspect(name))
    if api_version(request) < (1, 44):
        doc["VirtualSize"] = doc["Size"]
        doc.setdefault("Container", "")
        doc.setdefault("ContainerConfig", {})
    return json_response(doc)


async def image_history(request: web.Request) -> web.StreamResponse:
    name = _name(request)
    return json_response(await _on_image(request, name, lambda e: e.imageops.image_history(name)))


async def tag_image(request: web.Request) -> web.StreamResponse:
    name = _name(request)
    repo = qstr(request, "repo") or ""
    tag = qstr(request, "tag") or ""
    if not repo:
        raise bad_request("repo is required: POST /images/{name}/tag?repo=NAME&tag=TAG")
    if "@" in repo or "@" in tag:
        raise bad_request("refusing to create a tag with a digest reference: give NAME[:TAG]")
    target = f"{repo}:{tag}" if tag else repo
    await _on_image(request, name, lambda e: e.imageops.image_tag(name, target))
    return no_content(201)


async def remove_image(request: web.Request) -> web.StreamResponse:
    name = _name(request)
    force = qbool(request, "force")
    noprune = qbool(request, "noprune")
    done = await _on_image(
        request, name, lambda e: e.imageops.image_remove(name, force=force, prune=not noprune)
    )
    return json_response(done)


async def prune_images(request: web.Request) -> web.StreamResponse:
    filters = qfilters(request, ("dangling", "label", "until"))
    for key in ("label", "until"):
        if filters.get(key):
            raise bad_request(
                f"the {key!r} filter of image prune is not supported yet: prune by dangling only"
            )
    dangling = filter_bool(filters, "dangling")
    all_ = dangling is False
    return json_response(await ctx_of(request).call(lambda e: e.imageops.image_prune(all=all_)))


# --- save ---------------------------------------------------------------------------------------------


async def save_stream(
    request: web.Request, names: list[str], fmt: str = "docker-archive"
) -> web.StreamResponse:
    """Stream the images as a tar: the engine writes into a pipe in a worker thread, this coroutine
    copies the pipe to the response (the pipe's buffer is the back-pressure). Every name is resolved
    first, so a missing image is a 404, not a broken stream."""
    ctx = ctx_of(request)
    if not names:
        raise bad_request("name at least one image to save (names=IMAGE)")
    for n in names:
        await _on_image(request, n, functools.partial(_resolve, ref=n))
    loop = asyncio.get_running_loop()
    r, w = os.pipe2(os.O_CLOEXEC)

    def work(engine: Engine) -> dict[str, Any]:
        with open(w, "wb", buffering=1 << 20) as out:
            return engine.imageops.image_save(names, out, format=fmt)

    try:
        fut = asyncio.ensure_future(ctx.call(work))
    except BaseException:
        os.close(w)
        os.close(r)
        raise
    reader = asyncio.StreamReader(limit=1 << 20)
    pipe = open(r, "rb", buffering=0)  # noqa: SIM115 - owned by the transport below
    transport, _ = await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), pipe)
    response = web.StreamResponse(status=200, headers={"Content-Type": "application/x-tar"})
    failed = False
    try:
        while chunk := await reader.read(1 << 20):
            if not response.prepared:
                await response.prepare(request)
            await response.write(chunk)
    except (ConnectionError, RuntimeError):
        failed = True  # the client went away: closing the pipe stops the writer (EPIPE)
    finally:
        transport.close()
    try:
        await fut
    except EngineError as exc:
        if not response.prepared:
            raise
        failed = True
        ctx_log(request, f"saving {names} failed after the answer began: {exc}")
    if failed:
        if request.transport is not None:
            request.transport.abort()  # no chunked end marker: the client sees a truncated answer
        return response
    if not response.prepared:
        await response.prepare(request)
    await response.write_eof()
    return response


def ctx_log(request: web.Request, message: str) -> None:
    import logging

    logging.getLogger("cocon.api").warning("%s %s: %s", request.method, request.path, message)


async def get_image(request: web.Request) -> web.StreamResponse:
    return await save_stream(request, [_name(request)])


async def get_images(request: web.Request) -> web.StreamResponse:
    return await save_stream(request, qlist(request, "names"))


# --- load and import ----------------------------------------------------------------------------------


def loaded_lines(results: list[dict[str, Any]]) -> list[str]:
    lines = []
    for image in results:
        if image["RepoTags"]:
            lines += [f"Loaded image: {t}\n" for t in image["RepoTags"]]
        else:
            lines.append(f"Loaded image ID: {image['Id']}\n")
    return lines


async def _stream_work(
    request: web.Request,
    path: str,
    work: Callable[[Engine, Callable[[str, int, int], None]], Any],
    *,
    status: str,
    quiet: bool,
    done: Callable[[Any], list[dict[str, Any]]],
) -> web.StreamResponse:
    ctx = ctx_of(request)
    stream = JSONStream(request)
    try:
        try:
            result = await pump(ctx, stream, work, status=status, quiet=quiet)
        except EngineError as exc:
            message = str(exc).replace(path, "the uploaded archive")
            if not stream.started:
                raise HTTPError(engine_status(exc), message) from None
            await stream.error(message)
            return await stream.finish()
        for msg in done(result):
            await stream.send(msg)
        return await stream.finish()
    finally:
        os.unlink(path)


async def load_images(request: web.Request) -> web.StreamResponse:
    quiet = qbool(request, "quiet")
    if request.query.get("platform"):
        raise bad_request("load takes the archive's image for this machine's platform; omit platform")
    path = await spool_body(request, "image archive")
    return await _stream_work(
        request,
        path,
        lambda e, progress: e.imageops.image_load(path, progress=progress),
        status="Loading layer",
        quiet=quiet,
        done=lambda result: [{"stream": line} for line in loaded_lines(result)],
    )


async def create_image(request: web.Request) -> web.StreamResponse:
    """`POST /images/create`: only the import form (`fromSrc=-`, the tar in the body)."""
    if request.query.get("fromImage"):
        raise HTTPError(
            501,
            "pulling images from a registry is not supported yet: load an archive (docker load), build "
            "(docker build) or bootstrap a base image (POST /cocon/v1/images/bootstrap)",
        )
    src = qstr(request, "fromSrc")
    if src is None:
        raise bad_request("give fromSrc=- with a root filesystem tar as the body (docker import)")
    if src != "-":
        raise bad_request("importing from a URL is not supported: send the tar in the body with fromSrc=-")
    platform = qstr(request, "platform") or ""
    if (
        platform
        and platform not in ("linux", "linux/amd64", "linux/x86_64")
        and not platform.startswith("linux/" + _host_arch())
    ):
        raise bad_request(f"platform {platform!r}: cocon imports for this machine's platform only")
    repo = qstr(request, "repo") or ""
    tag = qstr(request, "tag") or ""
    if tag and not repo:
        raise bad_request("tag needs repo")
    name = (f"{repo}:{tag}" if tag else repo) or None
    changes = qlist(request, "changes")
    message = qstr(request, "message") or None
    path = await spool_body(request, "root filesystem tar")
    return await _stream_work(
        request,
        path,
        lambda e, progress: e.imageops.image_import(
            path, name, changes=changes, message=message, progress=progress
        ),
        status="Importing",
        quiet=False,
        done=lambda result: [{"status": result["Id"]}],
    )


def _host_arch() -> str:
    import platform

    return {"x86_64": "amd64", "aarch64": "arm64"}.get(platform.machine(), platform.machine())


def register(app: web.Application) -> None:
    add_route(app, "GET", "/images/json", list_images)
    add_route(app, "POST", "/images/load", load_images)
    add_route(app, "POST", "/images/create", create_image)
    add_route(app, "POST", "/images/prune", prune_images)
    add_route(app, "GET", "/images/get", get_images)
    add_route(app, "GET", "/images/{name:.+}/json", inspect_image)
    add_route(app, "GET", "/images/{name:.+}/history", image_history)
    add_route(app, "GET", "/images/{name:.+}/get", get_image)
    add_route(app, "POST", "/images/{name:.+}/tag", tag_image)
    add_route(app, "DELETE", "/images/{name:.+}", remove_image)
