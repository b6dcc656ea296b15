"""The node daemon's HTTP application: Docker Engine API routes (versions 1.41-1.47) and cocon's own.

    app = make_app(Context(root, run), auth_token=None)

Built on aiohttp (a well-kept asyncio HTTP server): streamed answers (`StreamResponse`: build
output, load/import progress, `GET /events`, save as a tar stream) and, for `/attach` and
`/exec/{id}/start`, Docker's *hijacked* connection — after `101 UPGRADED` both sides speak a raw
byte stream on the same socket (`cocon.api.docker.hijack`). ASGI servers cannot hand a plain HTTP
connection over like that; aiohttp can, because a handler reaches the connection's transport.

Every route exists with and without Docker's version prefix (`/v1.47/images/json`); a prefix
outside 1.41-1.47 is answered 400 with dockerd's wording. Errors are Docker's `{"message": …}` with
the status the engine's error carries (400 bad input, 404 no such object, 409 conflict, 500 other);
unknown routes are 404 `page not found`. Over TCP with an auth token, every request needs
`Authorization: Bearer TOKEN` (the Unix socket is protected by its file mode instead).
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time

from aiohttp import web

from cocon.api.docker import (
    build,
    common,
    container_admin,
    containers,
    exec,
    images,
    native,
    networks,
    system,
    vms,
    volumes,
)
from cocon.api.docker.common import (
    API_VERSION,
    CTX_KEY,
    MAX_API,
    MIN_API,
    MIN_API_VERSION,
    Context,
    HTTPError,
    json_response,
)
from cocon.engine.errors import EngineError

log = logging.getLogger("cocon.api")

SERVER_VERSION = "0.1.0"

_REASONS = {
    404: "page not found",
    405: "method not allowed for this route",
    413: "the request body is too large",
}

TOKEN_KEY: web.AppKey[str] = web.AppKey("cocon_token")


def _check_version(request: web.Request) -> None:
    text = request.match_info.get("version")
    if text is None:
        return
    major, dot, minor = text.partition(".")
    if not (major.isdigit() and dot and minor.isdigit()):
        raise HTTPError(400, f"invalid API version {text!r} in the path: use /v{API_VERSION}/…")
    version = (int(major), int(minor))
    if version < MIN_API:
        raise HTTPError(
            400,
            f"client version {text} is too old. Minimum supported API version is {MIN_API_VERSION}, "
            "please upgrade your client to a newer version",
        )
    if version > MAX_API:
        raise HTTPError(
            400, f"client version {text} is too new. Maximum supported API version is {API_VERSION}"
        )


def _check_auth(request: web.Request) -> None:
    token = request.app.get(TOKEN_KEY)
    if not token:
        return
    peer = request.transport.get_extra_info("peername") if request.transport else None
    if not isinstance(peer, tuple):  # the Unix socket: its mode (0600, root) is the protection
        return
    given = request.headers.get("Authorization", "")
    scheme, _, value = given.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(value.strip().encode(), token.encode()):
        raise HTTPError(
            401, "this daemon needs an auth token over TCP: send the header 'Authorization: Bearer TOKEN'"
        )


@web.middleware
async def _middleware(request: web.Request, handler: common.Handler) -> web.StreamResponse:
    started = time.monotonic()
    try:
        _check_auth(request)
        _check_version(request)
        response = await handler(request)
    except HTTPError as exc:
        response = json_response({"message": exc.message}, exc.status)
    except EngineError as exc:
        response = json_response({"message": str(exc)}, common.engine_status(exc))
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        message = _REASONS.get(exc.status) or exc.reason
        if exc.status == 413:
            message = f"the request body is too large: {exc.text or ''}".strip()
        response = json_response({"message": message}, exc.status)
    except (asyncio.CancelledError, ConnectionError):
        raise
    except Exception as exc:
        log.exception("internal error answering %s %s", request.method, request.path)
        response = json_response({"message": f"internal error: {type(exc).__name__}: {exc}"}, 500)
    log.debug(
        "%s %s -> %s (%.1f ms)", request.method, request.path_qs, response.status,
        (time.monotonic() - started) * 1000,
    )  # fmt: skip
    return response


async def _headers(request: web.Request, response: web.StreamResponse) -> None:
    response.headers.setdefault("Api-Version", API_VERSION)
    response.headers.setdefault("Docker-Experimental", "false")
    response.headers.setdefault("Ostype", "linux")
    response.headers.setdefault("Server", f"cocon/{SERVER_VERSION} (linux)")


async def _on_shutdown(app: web.Application) -> None:
    app[CTX_KEY].shutting_down.set()


def make_app(ctx: Context, *, auth_token: str | None = None) -> web.Application:
    """The application for `ctx`'s engine; the caller runs it (cocon.api.daemon) and calls
    `ctx.close()` after it stopped."""
    app = web.Application(middlewares=[_middleware], client_max_size=ctx.max_json)
    app[CTX_KEY] = ctx
    if auth_token:
        app[TOKEN_KEY] = auth_token
    app.on_response_prepare.append(_headers)
    app.on_shutdown.append(_on_shutdown)
    ctx.started = time.time()
    system.register(app)
    images.register(app)
    build.register(app)
    volumes.register(app)
    networks.register(app)
    containers.register(app)
    container_admin.register(app)
    exec.register(app)
    native.register(app)
    vms.register(app)
    return app
