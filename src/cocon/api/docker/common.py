"""What every route module shares: the request context (engine access off the event loop), Docker's
query and body conventions, errors as Docker's `{"message": …}` bodies, and JSON-lines streams.

Handlers are coroutines on the daemon's event loop. Engine calls block (SQLite, file systems,
builds), so they run in a thread pool through `ctx.call(fn, ...)`, where `fn(engine, ...)` gets the
worker thread's own `Engine`: each thread keeps one, with its own SQLite connections and lock file
descriptors, exactly as separate `cocon` processes share the same state (every store already
serialises with flock(2) and SQLite transactions).
"""

from __future__ import annotations

import asyncio
import functools
import json
import re
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, TypeVar

from aiohttp import web

from cocon.engine.errors import EngineError

if TYPE_CHECKING:
    from cocon.engine.engine import Engine

T = TypeVar("T")

# Requests under /v1.24 ... /v1.40 (clients that pin an old version: docker-compose 1.29 with
# COMPOSE_API_VERSION=1.38, the API version of compose files 3.8) are accepted and answered as 1.41,
# the oldest version whose behaviour cocon implements: `api_version` never reports less than BASE_API.
MIN_API = (1, 24)
BASE_API = (1, 41)
MAX_API = (1, 47)
API_VERSION = f"{MAX_API[0]}.{MAX_API[1]}"
MIN_API_VERSION = f"{MIN_API[0]}.{MIN_API[1]}"

CTX_KEY: web.AppKey[Context] = web.AppKey("cocon_ctx")


class HTTPError(Exception):
    """A request fails with `status` and Docker's body `{"message": message}`."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def bad_request(message: str) -> HTTPError:
    return HTTPError(400, message)


class Context:
    """Per-daemon state the routes use: the engine roots, the worker threads, limits, shutdown."""

    def __init__(
        self,
        root: str,
        run: str,
        *,
        workers: int = 16,
        max_json: int = 2 << 20,
        max_upload: int = 64 << 30,
        engine_factory: Callable[[], Engine] | None = None,
    ) -> None:
        self.root = root
        self.run_dir = run
        self.max_json = max_json
        self.max_upload = max_upload
        self._factory = engine_factory
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="cocon-api")
        self._local = threading.local()
        self._engines: list[Engine] = []
        self._lock = threading.Lock()
        self.shutting_down = asyncio.Event()
        self.started = 0.0

    def engine(self) -> Engine:
        """This thread's engine (made on first use)."""
        engine: Engine | None = getattr(self._local, "engine", None)
        if engine is None:
            if self._factory is not None:
                engine = self._factory()
            else:
                from cocon.engine.engine import Engine

                engine = Engine(self.root, self.run_dir)
            self._local.engine = engine
            with self._lock:
                self._engines.append(engine)
        return engine

    async def call(self, fn: Callable[..., T], *args: Any, **kw: Any) -> T:
        """Run `fn(engine, *args, **kw)` in a worker thread with that thread's engine."""

        def work() -> T:
            return fn(self.engine(), *args, **kw)

        return await asyncio.get_running_loop().run_in_executor(self._pool, work)

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run a blocking function that needs no engine in a worker thread."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, functools.partial(fn, *args))

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        with self._lock:
            engines, self._engines = self._engines, []
        for engine in engines:
            try:
                engine.close()
            except Exception:
                pass


def ctx_of(request: web.Request) -> Context:
    return request.app[CTX_KEY]


def api_version(request: web.Request) -> tuple[int, int]:
    """The API version the client asked for in the path (`/v1.44/...`), else the newest; versions
    older than 1.41 are answered as 1.41 (BASE_API)."""
    text = request.match_info.get("version")
    if not text:
        return MAX_API
    major, _, minor = text.partition(".")
    try:
        version = int(major), int(minor)
    except ValueError:
        raise bad_request(f"invalid API version {text!r} in the path: use /v{API_VERSION}/...") from None
    return max(version, BASE_API)


# --- routes -------------------------------------------------------------------------------------------

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def add_route(app: web.Application, method: str, path: str, handler: Handler) -> None:
    """Register `path` both as is and under Docker's version prefix `/v{version}`."""
    app.router.add_route(method, path, handler)
    app.router.add_route(method, "/v{version:[0-9][0-9.]*}" + path, handler)


# --- responses ----------------------------------------------------------------------------------------


def dumps(doc: Any) -> str:
    return json.dumps(doc, separators=(",", ":"), ensure_ascii=False)


def json_response(doc: Any, status: int = 200) -> web.Response:
    return web.Response(body=(dumps(doc) + "\n").encode(), status=status, content_type="application/json")


def no_content(status: int = 204) -> web.Response:
    return web.Response(status=status)


class JSONStream:
    """A streamed answer of JSON messages, one per line (Docker's build, load, import, events).

    `send` may be called before `start`: messages wait until the stream is started, so a handler
    can still answer with an error status while nothing has been sent."""

    def __init__(self, request: web.Request, content_type: str = "application/json") -> None:
        self.request = request
        self.response = web.StreamResponse(status=200, headers={"Content-Type": content_type})
        self.started = False
        self.broken = False

    async def start(self) -> None:
        if not self.started:
            self.started = True
            await self.response.prepare(self.request)

    async def send(self, doc: Any) -> None:
        await self.start()
        if self.broken:
            return
        try:
            await self.response.write((dumps(doc) + "\n").encode())
        except (ConnectionError, RuntimeError):
            self.broken = True  # the client went away; the work notices through `broken`

    async def error(self, message: str) -> None:
        await self.send({"errorDetail": {"message": message}, "error": message})

    async def finish(self) -> web.StreamResponse:
        await self.start()
        if not self.broken:
            try:
                await self.response.write_eof()
            except (ConnectionError, RuntimeError):
                self.broken = True
        return self.response


def progress_message(status: str, ident: str, done: int, total: int) -> dict[str, Any]:
    """Docker's progress line (`docker load`, `docker pull`): a bar when the total is known."""
    detail: dict[str, Any] = {"current": done}
    msg: dict[str, Any] = {"status": status, "progressDetail": detail, "id": ident}
    if total > 0:
        detail["total"] = total
        width = 50
        filled = min(width, done * width // total)
        bar = "=" * filled + (">" if filled < width else "") + " " * max(0, width - filled - 1)
        msg["progress"] = f"[{bar}] {_human(done)}/{_human(total)}"
    return msg


def _human(n: int) -> str:
    size = float(n)
    for unit in ("B", "kB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.3g}{unit}"
        size /= 1000
    return f"{size:.3g}GB"


# --- queries ------------------------------------------------------------------------------------------

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"", "0", "false", "no", "none", "off"}


def qbool(request: web.Request, name: str, default: bool = False) -> bool:
    """Docker's boolean query values (`1`, `true`, `0`, `false`, …); anything else is refused."""
    if name not in request.query:
        return default
    value = request.query[name].strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise bad_request(f"invalid boolean {name}={request.query[name]!r}: use 1/true or 0/false")


def qint(request: web.Request, name: str, default: int) -> int:
    if name not in request.query or request.query[name] == "":
        return default
    try:
        return int(request.query[name])
    except ValueError:
        raise bad_request(f"invalid integer {name}={request.query[name]!r}") from None


def qstr(request: web.Request, name: str, default: str | None = None) -> str | None:
    value = request.query.get(name)
    return default if value is None else value


def qlist(request: web.Request, name: str) -> list[str]:
    """A repeated query parameter (`t=a&t=b`)."""
    return [v for v in request.query.getall(name, []) if v != ""]


def qjson_map(request: web.Request, name: str) -> dict[str, str]:
    """A JSON object of strings in a query parameter (`buildargs`, `labels`); null values are
    dropped (Docker's build args may be null: 'take it from the environment', which the client
    already did)."""
    text = request.query.get(name, "")
    if not text:
        return {}
    try:
        doc = json.loads(text)
    except ValueError as exc:
        raise bad_request(f"{name} is not valid JSON ({exc}): give a JSON object of strings") from None
    if doc is None:
        return {}
    if not isinstance(doc, dict):
        raise bad_request(f"{name} must be a JSON object of strings, not {type(doc).__name__}")
    out: dict[str, str] = {}
    for key, value in doc.items():
        if value is None:
            continue
        if not isinstance(value, str):
            raise bad_request(f"{name}: the value of {key!r} must be a string")
        out[key] = value
    return out


def qfilters(request: web.Request, allowed: Iterable[str]) -> dict[str, list[str]]:
    """Docker's `filters` parameter: `{"key": {"value": true}}` (what clients send) or the older
    `{"key": ["value"]}`. Keys not in `allowed` are refused, as dockerd does."""
    text = request.query.get("filters", "")
    if not text:
        return {}
    try:
        doc = json.loads(text)
    except ValueError as exc:
        raise bad_request(f"filters is not valid JSON ({exc})") from None
    if doc is None:
        return {}
    if not isinstance(doc, dict):
        raise bad_request('filters must be a JSON object such as {"dangling":{"true":true}}')
    names = set(allowed)
    out: dict[str, list[str]] = {}
    for key, values in doc.items():
        if key not in names:
            raise bad_request(f"invalid filter {key!r}: use one of {', '.join(sorted(names))}")
        if isinstance(values, dict):
            out[key] = [str(v) for v, on in values.items() if on]
        elif isinstance(values, list) and all(isinstance(v, str) for v in values):
            out[key] = list(values)
        else:
            raise bad_request(f"filter {key!r}: give a map of values to true, or a list of strings")
    return out


def filter_bool(filters: Mapping[str, list[str]], key: str) -> bool | None:
    values = filters.get(key)
    if not values:
        return None
    seen = set()
    for v in values:
        low = v.lower()
        if low in ("true", "1"):
            seen.add(True)
        elif low in ("false", "0"):
            seen.add(False)
        else:
            raise bad_request(f"invalid filter '{key}={v}': use true or false")
    if len(seen) > 1:
        raise bad_request(f"filter {key!r} has both true and false")
    return seen.pop()


def label_matches(labels: Mapping[str, str] | None, specs: Iterable[str]) -> bool:
    """Every `key` / `key=value` in specs holds for `labels` (Docker's `label` filter)."""
    labels = labels or {}
    for spec in specs:
        key, sep, value = spec.partition("=")
        if key not in labels or (sep and labels[key] != value):
            return False
    return True


# --- bodies -------------------------------------------------------------------------------------------


async def json_body(request: web.Request, *, required: bool = False) -> Any:
    """The request body as JSON (at most the context's `max_json` bytes). An empty body is None."""
    ctx = ctx_of(request)
    length = request.content_length
    if length is not None and length > ctx.max_json:
        raise HTTPError(413, f"the request body is {length} bytes; JSON bodies may be at most {ctx.max_json}")
    data = await read_capped(request, ctx.max_json, "JSON bodies")
    if not data.strip():
        if required:
            raise bad_request("this request needs a JSON body")
        return None
    ctype = request.headers.get("Content-Type", "application/json").split(";")[0].strip().lower()
    if ctype not in ("application/json", "text/plain", ""):
        raise bad_request(f"unsupported Content-Type {ctype!r}: send application/json")
    try:
        return json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise bad_request(f"invalid JSON in the request body: {exc}") from None


async def read_capped(request: web.Request, limit: int, what: str) -> bytes:
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.content.iter_chunked(1 << 16):
        size += len(chunk)
        if size > limit:
            raise HTTPError(413, f"the request body is larger than {limit} bytes, the limit for {what}")
        chunks.append(chunk)
    return b"".join(chunks)


_TYPE_NAMES = {str: "a string", bool: "a boolean", int: "an integer", dict: "an object", list: "an array"}


def check_fields(
    body: Any,
    fields: Mapping[str, type | tuple[type, ...]],
    *,
    what: str,
    unsupported: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Validate a JSON object: every key must be one of `fields` with a value of that type (or null);
    keys in `unsupported` are refused when they carry a value (their message says why). Unknown keys
    are refused too: a field cocon would silently ignore could change what the caller gets."""
    if body is None:
        return {}
    if not isinstance(body, dict):
        raise bad_request(f"the {what} body must be a JSON object")
    unsupported = unsupported or {}
    out: dict[str, Any] = {}
    for key, value in body.items():
        if key in unsupported:
            if value not in (None, "", {}, [], False, 0):
                raise bad_request(f"{what}: {key} is not supported: {unsupported[key]}")
            continue
        if key not in fields:
            raise bad_request(f"{what}: unknown field {key!r} (known: {', '.join(sorted(fields))})")
        if value is None:
            continue
        spec = fields[key]
        kinds: tuple[type, ...] = spec if isinstance(spec, tuple) else (spec,)
        if not any(isinstance(value, k) and not (k is int and isinstance(value, bool)) for k in kinds):
            names = " or ".join(_TYPE_NAMES.get(k, k.__name__) for k in kinds)
            raise bad_request(f"{what}: {key} must be {names}, not {type(value).__name__}")
        out[key] = value
    return out


def string_map(value: Any, what: str) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise bad_request(f"{what} must be an object of strings")
    return dict(value)


# --- Go's path.Match, for Docker's reference filter --------------------------------------------------


@functools.lru_cache(maxsize=256)
def _glob_regex(pattern: str) -> re.Pattern[str]:
    out = []
    i = 0
    while i < len(pattern):
        c = pattern[i]
        if c == "*":
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif c == "\\" and i + 1 < len(pattern):
            i += 1
            out.append(re.escape(pattern[i]))
        elif c == "[":
            end = pattern.find("]", i + 1)
            if end < 0:
                raise bad_request(f"invalid pattern {pattern!r}: '[' without ']'")
            body = pattern[i + 1 : end]
            if body.startswith("^"):
                body = "^" + body[1:].replace("\\", "\\\\")
            else:
                body = body.replace("\\", "\\\\")
            out.append(f"[{body}]")
            i = end
        else:
            out.append(re.escape(c))
        i += 1
    return re.compile("".join(out) + r"\Z")


def path_match(pattern: str, text: str) -> bool:
    return _glob_regex(pattern).match(text) is not None


def engine_status(exc: EngineError) -> int:
    return int(getattr(exc, "status", 500))


# --- uploads ------------------------------------------------------------------------------------------


def tmp_dir(ctx: Context) -> str:
    """`<root>/tmp/api`: spooled request bodies and unpacked build contexts (the daemon empties it
    when it starts)."""
    import os

    path = os.path.join(ctx.root, "tmp", "api")
    os.makedirs(path, 0o700, exist_ok=True)
    return path


async def spool_body(request: web.Request, what: str) -> str:
    """Copy the request body into a new file under `tmp_dir` (at most the context's `max_upload`
    bytes); returns its path. The caller removes it."""
    import os
    import tempfile

    ctx = ctx_of(request)
    length = request.content_length
    if length is not None and length > ctx.max_upload:
        raise HTTPError(413, f"the {what} is {length} bytes; this daemon takes at most {ctx.max_upload}")
    fd, path = tempfile.mkstemp(prefix="upload-", dir=tmp_dir(ctx))
    try:
        size = 0
        async for chunk in request.content.iter_chunked(1 << 20):
            size += len(chunk)
            if size > ctx.max_upload:
                raise HTTPError(413, f"the {what} is larger than {ctx.max_upload} bytes, this daemon's limit")
            view = memoryview(chunk)
            while view:
                view = view[os.write(fd, view) :]
    except BaseException:
        os.close(fd)
        os.unlink(path)
        raise
    os.close(fd)
    return path


async def pump(
    ctx: Context,
    stream: JSONStream,
    work: Callable[[Engine, Callable[[str, int, int], None]], T],
    *,
    status: str = "Loading",
    quiet: bool = False,
) -> T:
    """Run `work(engine, progress)` in a worker thread and send its progress to `stream` as Docker's
    progress messages (at most ~10 a second per item, and each item's last one). Returns its result
    or raises its error; `stream` is started only by the first message sent."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    last: dict[str, float] = {}

    def progress(what: str, done: int, total: int) -> None:
        if quiet:
            return
        now = time.monotonic()
        if done != total and now - last.get(what, 0.0) < 0.1:
            return
        last[what] = now
        loop.call_soon_threadsafe(queue.put_nowait, progress_message(status, what, done, total))

    fut = asyncio.ensure_future(ctx.call(work, progress))
    while True:
        getter = asyncio.ensure_future(queue.get())
        done, _ = await asyncio.wait({fut, getter}, return_when=asyncio.FIRST_COMPLETED)
        if getter in done:
            await stream.send(getter.result())
            continue
        getter.cancel()
        break
    while not queue.empty():
        await stream.send(queue.get_nowait())
    return fut.result()
