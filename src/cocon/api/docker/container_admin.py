"""Container administration routes: prune, changes, export, commit, update
(cocon.engine.container_admin does the work).

    POST /containers/prune?filters=        {"ContainersDeleted": [...] | null, "SpaceReclaimed": bytes}
    GET  /containers/{id}/changes          [{"Path": "/etc/x", "Kind": 0|1|2}]  (modified, added, deleted)
    GET  /containers/{id}/export           the root file system as a tar, streamed
    POST /commit?container=&repo=&tag=&comment=&author=&changes=&pause=   201 {"Id": image ID}
    POST /containers/{id}/update           {"Warnings": []}

Registered by `container_admin.register(app)` in cocon.api.server.make_app.
"""

from __future__ import annotations

import asyncio
import threading
from typing import TYPE_CHECKING, Any

from aiohttp import web

from cocon.api.docker.common import (
    add_route,
    bad_request,
    ctx_of,
    json_body,
    json_response,
    qbool,
    qfilters,
    qlist,
    qstr,
)

if TYPE_CHECKING:
    from cocon.engine.engine import Engine

_CHUNK = 1 << 20


def _admin(e: Engine) -> Any:
    from cocon.engine.container_admin import ContainerAdmin

    return ContainerAdmin(e)


async def prune(request: web.Request) -> web.StreamResponse:
    filters = qfilters(request, ("until", "label", "label!"))
    return json_response(await ctx_of(request).call(lambda e: _admin(e).prune(filters)))


async def changes(request: web.Request) -> web.StreamResponse:
    ref = request.match_info["id"]
    return json_response(await ctx_of(request).call(lambda e: _admin(e).changes(ref)))


class _QueueWriter:
    """A file-like `write` for a worker thread that hands chunks to the event loop (with back
    pressure: at most a few chunks wait); it fails once the client went away."""

    def __init__(self, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue[Any]) -> None:
        self.loop = loop
        self.queue = queue
        self.cancelled = threading.Event()
        self.buf = bytearray()

    def write(self, data: bytes) -> int:
        if self.cancelled.is_set():
            raise BrokenPipeError("the client went away")
        self.buf += data
        if len(self.buf) >= _CHUNK:
            self.flush()
        return len(data)

    def flush(self) -> None:
        if self.buf:
            chunk, self.buf = bytes(self.buf), bytearray()
            self.put(chunk)

    def put(self, item: Any) -> None:
        future = asyncio.run_coroutine_threadsafe(self.queue.put(item), self.loop)
        while True:
            try:
                future.result(timeout=0.5)
                return
            except TimeoutError:
                if self.cancelled.is_set():
                    future.cancel()
                    raise BrokenPipeError("the client went away") from None


_DONE = object()


async def export(request: web.Request) -> web.StreamResponse:
    ref = request.match_info["id"]
    ctx = ctx_of(request)
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[Any] = asyncio.Queue(maxsize=4)
    writer = _QueueWriter(loop, queue)

    def work(e: Engine) -> None:
        try:
            _admin(e).export(ref, writer)
            writer.flush()
            writer.put(_DONE)
        except BaseException as exc:
            if not writer.cancelled.is_set():
                try:
                    writer.put(exc)
                except BrokenPipeError:
                    pass

    task = asyncio.ensure_future(ctx.call(work))
    response: web.StreamResponse | None = None
    try:
        while True:
            item = await queue.get()
            if item is _DONE:
                break
            if isinstance(item, BaseException):
                if response is None:
                    raise item  # nothing sent yet: the middleware answers with the error's status
                break  # the tar is cut short; the client sees a truncated stream
            if response is None:
                response = web.StreamResponse(status=200, headers={"Content-Type": "application/x-tar"})
                await response.prepare(request)
            await response.write(item)
        if response is None:
            response = web.StreamResponse(status=200, headers={"Content-Type": "application/x-tar"})
            await response.prepare(request)
        await response.write_eof()
    except (ConnectionError, asyncio.CancelledError):
        writer.cancelled.set()
        raise
    finally:
        writer.cancelled.set()
        while not queue.empty():
            queue.get_nowait()
        await asyncio.shield(task)  # the container is unmounted before the request ends
    return response


async def commit(request: web.Request) -> web.StreamResponse:
    ref = qstr(request, "container") or ""
    if not ref:
        raise bad_request("commit needs the container: POST /commit?container=ID[&repo=NAME&tag=TAG]")
    repo = qstr(request, "repo") or None
    tag = qstr(request, "tag") or None
    comment = qstr(request, "comment") or None
    author = qstr(request, "author") or None
    pause = qbool(request, "pause", True)
    lines = [line.strip() for item in qlist(request, "changes") for line in item.splitlines()]
    config = await json_body(request)
    if config is not None and not isinstance(config, dict):
        raise bad_request("the commit body must be a JSON object (a container config), or empty")

    def work(e: Engine) -> str:
        image_id: str = _admin(e).commit(
            ref, repo=repo, tag=tag, comment=comment, author=author,
            changes=[line for line in lines if line], config=config, pause=pause,
        )  # fmt: skip
        return image_id

    image_id = await ctx_of(request).call(work)
    return json_response({"Id": image_id}, 201)


async def update(request: web.Request) -> web.StreamResponse:
    ref = request.match_info["id"]
    body = await json_body(request)
    if body is not None and not isinstance(body, dict):
        raise bad_request('the update body must be a JSON object such as {"Memory": 67108864}')
    return json_response(await ctx_of(request).call(lambda e: _admin(e).update(ref, body)))


def register(app: web.Application) -> None:
    add_route(app, "POST", "/containers/prune", prune)
    add_route(app, "GET", "/containers/{id}/changes", changes)
    add_route(app, "GET", "/containers/{id}/export", export)
    add_route(app, "POST", "/commit", commit)
    add_route(app, "POST", "/containers/{id}/update", update)
