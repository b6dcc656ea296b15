"""`HTTPClient`: the client interface (cocon.api.client.Client) over HTTP to the node daemon's Unix
socket, and `ensure_daemon()`, which starts that daemon when it is not running.

Images, volumes and system requests are here; container and exec requests are mixed in from
cocon.api.http_containers (hijacked attach/exec connections are relayed by cocon.api.stream_relay).

Why not http.client: it imports `ssl` and `email` (~15 ms here), more than everything else the
CLI's fast path loads. This module speaks just enough HTTP/1.1 over `_socket` (one connection per
request, `Connection: close`; Content-Length, chunked and read-to-close bodies) and decodes JSON with
`cocon._fastjson`; its import costs well under a millisecond (docs/api.md has the measurement).
"""

from __future__ import annotations

import _socket
import os

from cocon import _fastjson
from cocon._typing import TYPE_CHECKING
from cocon.api.client import APIError
from cocon.api.http_containers import ContainerRequests

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator, Sequence
    from typing import Any

    from cocon.api.client import Progress

API_PREFIX = "/v1.47"
DEFAULT_RUN = "/run/cocon"
SOCKET_NAME = "cocon.sock"
CHUNK = 1 << 16

_UNRESERVED = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")


def quote(text: str) -> str:
    """Percent-encode for a query value (what urllib.parse.quote(text, safe='') does)."""
    return "".join(chr(b) if b in _UNRESERVED else f"%{b:02X}" for b in text.encode())


def query_string(params: Sequence[tuple[str, str]]) -> str:
    return "&".join(f"{quote(k)}={quote(v)}" for k, v in params)


def default_socket(run_dir: str | None = None) -> str:
    run = run_dir or os.environ.get("COCON_RUN") or DEFAULT_RUN
    return os.path.join(os.path.abspath(run), SOCKET_NAME)


class Response:
    """A response whose body is read on demand (all at once, in chunks, or as lines)."""

    def __init__(self, sock: Any, status: int, reason: str, headers: dict[str, str], rest: bytes) -> None:
        self.sock = sock
        self.status = status
        self.reason = reason
        self.headers = headers
        self._buf = rest
        self._chunked = headers.get("transfer-encoding", "").lower() == "chunked"
        length = headers.get("content-length")
        self._left = int(length) if length is not None and not self._chunked else -1
        self._chunk_left = 0
        self._done = status in (204, 304) or self._left == 0

    def _recv(self) -> bytes:
        data: bytes = self.sock.recv(CHUNK)
        return data

    def _fill(self, n: int = 1) -> bool:
        while len(self._buf) < n:
            data = self._recv()
            if not data:
                return False
            self._buf += data
        return True

    def _line(self) -> bytes:
        while b"\r\n" not in self._buf:
            data = self._recv()
            if not data:
                raise APIError("the cocon daemon closed the connection in the middle of an answer", 500)
            self._buf += data
        line, _, self._buf = self._buf.partition(b"\r\n")
        return line

    def chunks(self) -> Iterator[bytes]:
        """The body, decoded from the transfer encoding, in pieces as they arrive."""
        while not self._done:
            if self._chunked:
                if self._chunk_left == 0:
                    size_line = self._line().split(b";")[0].strip()
                    try:
                        self._chunk_left = int(size_line, 16)
                    except ValueError:
                        raise APIError("the cocon daemon sent a malformed chunked answer", 500) from None
                    if self._chunk_left == 0:
                        while self._line():  # trailers, up to the empty line
                            pass
                        self._done = True
                        break
                if not self._buf and not self._fill():
                    raise APIError("the cocon daemon closed the connection in the middle of an answer", 500)
                piece = self._buf[: self._chunk_left]
                self._buf = self._buf[len(piece) :]
                self._chunk_left -= len(piece)
                if self._chunk_left == 0:
                    self._fill(2)
                    self._buf = self._buf[2:]  # the CRLF after the chunk
                yield piece
            else:
                if not self._buf:
                    data = self._recv()
                    if not data:
                        if self._left > 0:
                            raise APIError("the cocon daemon's answer ended early", 500)
                        self._done = True
                        break
                    self._buf = data
                piece = self._buf if self._left < 0 else self._buf[: self._left]
                self._buf = self._buf[len(piece) :]
                if self._left >= 0:
                    self._left -= len(piece)
                    if self._left == 0:
                        self._done = True
                yield piece

    def read(self) -> bytes:
        return b"".join(self.chunks())

    def lines(self) -> Iterator[bytes]:
        pending = b""
        for piece in self.chunks():
            pending += piece
            while b"\n" in pending:
                line, _, pending = pending.partition(b"\n")
                if line.strip():
                    yield line
        if pending.strip():
            yield pending

    def messages(self) -> Iterator[dict[str, Any]]:
        """A JSON-lines stream (build output, progress, events)."""
        for line in self.lines():
            try:
                doc = _fastjson.loads(line)
            except ValueError:
                raise APIError(
                    f"the cocon daemon sent a line that is not JSON: {line[:200]!r}", 500
                ) from None
            if isinstance(doc, dict):
                yield doc

    def close(self) -> None:
        self.sock.close()


class HTTPClient(ContainerRequests):
    """Requests to the daemon at `socket_path` (default `$COCON_RUN/cocon.sock`)."""

    def __init__(
        self, socket_path: str | None = None, *, timeout: float | None = None, autostart: bool = False
    ) -> None:
        self.socket_path = socket_path or default_socket()
        self.timeout = timeout
        self.autostart = autostart  # start a daemon when none answers (default_client)
        self._init_containers()

    # --- transport ---------------------------------------------------------------------------------
    def request(
        self,
        method: str,
        path: str,
        params: Sequence[tuple[str, str]] = (),
        *,
        body: bytes | None = None,
        upload: str | None = None,
        content_type: str = "application/json",
        progress: Progress | None = None,
        headers: Sequence[tuple[str, str]] = (),
    ) -> Response:
        """Send one request; `upload` streams a file as the body; `headers` replace `Connection: close`
        when they name a Connection (an upgrade). Raises APIError for a status >= 400 (with the
        daemon's message) and when the daemon cannot be reached."""
        target = path + ("?" + query_string(params) if params else "")
        sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
        try:
            if self.timeout is not None:
                sock.settimeout(self.timeout)
            try:
                try:
                    sock.connect(self.socket_path)
                except (FileNotFoundError, ConnectionRefusedError):
                    if not self.autostart:
                        raise
                    ensure_daemon(os.path.dirname(self.socket_path))
                    sock.connect(self.socket_path)
            except OSError as exc:
                raise APIError(
                    f"cannot reach the cocon daemon at unix://{self.socket_path} ({exc.strerror or exc}): "
                    "start it with 'cocon daemon' (or as the cocon.service unit)",
                    500,
                ) from None
            size = len(body) if body is not None else (os.path.getsize(upload) if upload else 0)
            head = f"{method} {target} HTTP/1.1\r\nHost: cocon\r\nUser-Agent: cocon-cli\r\n"
            head += "".join(f"{k}: {v}\r\n" for k, v in headers)
            if not any(k.lower() == "connection" for k, _ in headers):
                head += "Connection: close\r\n"
            if body is not None or upload is not None or method in ("POST", "PUT"):
                head += f"Content-Type: {content_type}\r\nContent-Length: {size}\r\n"
            try:
                sock.sendall((head + "\r\n").encode())
                if body is not None:
                    sock.sendall(body)
                elif upload is not None:
                    self._send_file(sock, upload, size, progress)
                return self._response(sock)
            except OSError as exc:
                detail = exc.strerror or exc
                raise APIError(
                    f"lost the connection to the cocon daemon at unix://{self.socket_path}: {detail}", 500
                ) from None
        except BaseException:
            sock.close()
            raise

    @staticmethod
    def _send_file(sock: Any, path: str, size: int, progress: Progress | None) -> None:
        sent = 0
        with open(path, "rb") as f:
            while data := f.read(1 << 20):
                try:
                    sock.sendall(data)
                except (BrokenPipeError, ConnectionResetError):
                    return  # the daemon answered early (an error): read it
                sent += len(data)
                if progress is not None:
                    progress(f"sending {os.path.basename(path)}", sent, size)

    @staticmethod
    def _response(sock: Any) -> Response:
        buf = b""
        while b"\r\n\r\n" not in buf:
            data = sock.recv(CHUNK)
            if not data:
                raise APIError("the cocon daemon closed the connection without an answer", 500)
            buf += data
            if len(buf) > 1 << 20:
                raise APIError("the cocon daemon's answer has oversized headers", 500)
        head, _, rest = buf.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ", 2)
        try:
            status = int(parts[1])
        except (IndexError, ValueError):
            raise APIError(f"the cocon daemon sent a malformed status line {lines[0]!r}", 500) from None
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        resp = Response(sock, status, parts[2] if len(parts) > 2 else "", headers, rest)
        if status >= 400:
            try:
                raw = resp.read()
            finally:
                resp.close()
            message = raw.decode("utf-8", "replace").strip()
            try:
                doc = _fastjson.loads(raw)
                if isinstance(doc, dict) and isinstance(doc.get("message"), str):
                    message = doc["message"]
            except ValueError:
                pass
            raise APIError(message or f"HTTP {status}", status)
        return resp

    def call(
        self,
        method: str,
        path: str,
        params: Sequence[tuple[str, str]] = (),
        doc: Any = None,
    ) -> Any:
        """A request with an optional JSON body and a JSON answer (None for an empty one)."""
        body = _fastjson.dumps(doc).encode() if doc is not None else None
        resp = self.request(method, path, params, body=body)
        try:
            raw = resp.read()
        finally:
            resp.close()
        return _fastjson.loads(raw) if raw.strip() else None

    def _stream(
        self, resp: Response, progress: Progress | None, on_message: Callable[[dict[str, Any]], None]
    ) -> None:
        try:
            for msg in resp.messages():
                if "error" in msg or "errorDetail" in msg:
                    detail = msg.get("errorDetail") or {}
                    raise APIError(str(detail.get("message") or msg.get("error")), 400)
                detail = msg.get("progressDetail")
                if progress is not None and isinstance(detail, dict) and "current" in detail:
                    progress(str(msg.get("id", "")), int(detail["current"]), int(detail.get("total", 0)))
                    continue
                on_message(msg)
        finally:
            resp.close()

    # --- system ------------------------------------------------------------------------------------
    def ping(self) -> bool:
        try:
            resp = self.request("GET", "/_ping")
        except APIError:
            return False
        try:
            return resp.status == 200 and resp.read() == b"OK"
        finally:
            resp.close()

    def version(self) -> dict[str, Any]:
        result: dict[str, Any] = self.call("GET", API_PREFIX + "/version")
        return result

    def info(self) -> dict[str, Any]:
        result: dict[str, Any] = self.call("GET", API_PREFIX + "/info")
        return result

    def system_reset(self) -> dict[str, Any]:
        result: dict[str, Any] = self.call("POST", "/cocon/v1/system/reset")
        return result

    def system_assets(self) -> dict[str, Any]:
        result: dict[str, Any] = self.call("GET", "/cocon/v1/system/assets")
        return result

    def system_assets_build(
        self, *, rebuild: bool = False, progress: Progress | None = None
    ) -> dict[str, Any]:
        resp = self.request("POST", "/cocon/v1/system/assets", [("rebuild", "1" if rebuild else "0")])
        found: dict[str, Any] = {}
        self._stream(
            resp, progress, lambda m: found.update(m["aux"]) if isinstance(m.get("aux"), dict) else None
        )
        if "State" not in found:
            raise APIError("the cocon daemon ended the build without saying how the assets are", 500)
        return found

    def system_df(self) -> dict[str, Any]:
        result: dict[str, Any] = self.call("GET", API_PREFIX + "/system/df")
        return result

    def events(
        self,
        *,
        since: str | None = None,
        until: str | None = None,
        filters: dict[str, list[str]] | None = None,
    ) -> Iterator[dict[str, Any]]:
        params = [(k, v) for k, v in (("since", since), ("until", until)) if v is not None]
        if filters:
            params.append(("filters", _fastjson.dumps(filters)))
        resp = self.request("GET", API_PREFIX + "/events", params)
        try:
            yield from resp.messages()
        finally:
            resp.close()

    # --- images ------------------------------------------------------------------------------------
    def image_list(self, *, all: bool = False, dangling: bool | None = None) -> list[dict[str, Any]]:
        params = [("all", "1" if all else "0")]
        if dangling is not None:
            params.append(("filters", _fastjson.dumps({"dangling": {str(dangling).lower(): True}})))
        result: list[dict[str, Any]] = self.call("GET", API_PREFIX + "/images/json", params)
        return result

    def image_inspect(self, image: str) -> dict[str, Any]:
        result: dict[str, Any] = self.call("GET", f"{API_PREFIX}/images/{image}/json")
        return result

    def image_history(self, image: str) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self.call("GET", f"{API_PREFIX}/images/{image}/history")
        return result

    def image_tag(self, source: str, target: str) -> None:
        repo, tag = split_tag(target)
        params = [("repo", repo)] + ([("tag", tag)] if tag else [])
        self.call("POST", f"{API_PREFIX}/images/{source}/tag", params)

    def image_remove(self, image: str, *, force: bool = False, noprune: bool = False) -> list[dict[str, str]]:
        params = [("force", "1" if force else "0"), ("noprune", "1" if noprune else "0")]
        result: list[dict[str, str]] = self.call("DELETE", f"{API_PREFIX}/images/{image}", params)
        return result

    def image_prune(self, *, all: bool = False) -> dict[str, Any]:
        params = [("filters", _fastjson.dumps({"dangling": {"false": True}}))] if all else []
        result: dict[str, Any] = self.call("POST", API_PREFIX + "/images/prune", params)
        return result

    def image_import(
        self,
        source: str,
        name: str | None = None,
        *,
        changes: Sequence[str] = (),
        message: str | None = None,
        progress: Progress | None = None,
    ) -> dict[str, Any]:
        params = [("fromSrc", "-")]
        if name:
            repo, tag = split_tag(name)
            params += [("repo", repo)] + ([("tag", tag)] if tag else [])
        params += [("changes", c) for c in changes]
        if message:
            params.append(("message", message))
        with _as_tar(source) as path:
            resp = self.request(
                "POST", API_PREFIX + "/images/create", params, upload=path,
                content_type="application/x-tar", progress=progress,
            )  # fmt: skip
        found: dict[str, str] = {}
        self._stream(resp, progress, lambda m: found.update(id=str(m["status"])) if "status" in m else None)
        if "id" not in found:
            raise APIError("the cocon daemon did not say which image it imported", 500)
        return {"Id": found["id"], "RepoTags": self.image_inspect(found["id"])["RepoTags"]}

    def image_save(
        self,
        images: Sequence[str],
        dest: str,
        *,
        format: str = "oci-archive",
        progress: Progress | None = None,
    ) -> dict[str, Any]:
        if format not in ("oci-archive", "oci-dir", "docker-archive"):
            raise APIError(f"unknown format {format!r}: use oci-archive, oci-dir or docker-archive", 400)
        wire = "oci-archive" if format == "oci-dir" else format
        params = [("names", n) for n in images] + [("format", wire)]
        resp = self.request("GET", "/cocon/v1/images/save", params)
        dest = os.path.abspath(dest)
        parent = os.path.dirname(dest)
        import tempfile

        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(dest)}.", dir=parent)
        size = 0
        try:
            with os.fdopen(fd, "wb") as out:
                for piece in resp.chunks():
                    out.write(piece)
                    size += len(piece)
                    if progress is not None:
                        progress("receiving", size, 0)
            if format == "oci-dir":
                _unpack_into(tmp, dest)
                os.unlink(tmp)
            else:
                os.chmod(tmp, 0o644)
                os.replace(tmp, dest)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        finally:
            resp.close()
        saved = [self.image_inspect(n) for n in images]
        return {
            "Dest": dest,
            "Format": format,
            "Size": size,
            "Images": [{"Id": d["Id"], "RepoTags": d["RepoTags"]} for d in saved],
        }

    def image_load(self, source: str, *, progress: Progress | None = None) -> list[dict[str, Any]]:
        with _as_tar(source) as path:
            resp = self.request(
                "POST", API_PREFIX + "/images/load", [("quiet", "0")], upload=path,
                content_type="application/x-tar", progress=progress,
            )  # fmt: skip
        refs: list[str] = []

        def loaded(msg: dict[str, Any]) -> None:
            text = str(msg.get("stream", ""))
            for prefix in ("Loaded image: ", "Loaded image ID: "):
                if text.startswith(prefix):
                    refs.append(text[len(prefix) :].strip())

        self._stream(resp, progress, loaded)
        out: list[dict[str, Any]] = []
        for ref in refs:
            doc = self.image_inspect(ref)
            if all(o["Id"] != doc["Id"] for o in out):
                out.append({"Id": doc["Id"], "RepoTags": doc["RepoTags"]})
        return out

    def image_bootstrap(
        self,
        what: str,
        *,
        mirror: str | None = None,
        tarball: str | None = None,
        progress: Progress | None = None,
    ) -> dict[str, Any]:
        params = [("image", what)] + ([("mirror", mirror)] if mirror else [])
        if tarball:  # a path on the daemon's machine, which is this one
            params.append(("tarball", os.path.abspath(tarball)))
        resp = self.request("POST", "/cocon/v1/images/bootstrap", params)
        found: dict[str, Any] = {}
        self._stream(
            resp, progress, lambda m: found.update(m["aux"]) if isinstance(m.get("aux"), dict) else None
        )
        if "Id" not in found:
            raise APIError("the cocon daemon did not say which image it made", 500)
        return found

    def image_build(
        self,
        context: str,
        *,
        tags: Sequence[str] = (),
        dockerfile: str | None = None,
        build_args: dict[str, str] | None = None,
        target: str | None = None,
        no_cache: bool = False,
        output: Callable[[str], None] | None = None,
    ) -> dict[str, Any]:
        if not os.path.isdir(context):
            raise APIError(f"build context {context!r} is not a directory: give the directory to build", 400)
        params = [("t", t) for t in tags]
        extra: tuple[str, str] | None = None
        if dockerfile is not None:
            path = os.path.abspath(dockerfile if os.path.isabs(dockerfile) or os.path.exists(dockerfile)
                                   else os.path.join(context, dockerfile))  # fmt: skip
            rel = os.path.relpath(path, os.path.abspath(context))
            if rel.startswith(".."):
                name = f".dockerfile.{os.urandom(10).hex()}"  # outside the context: sent beside it
                extra = (name, path)
                rel = name
            params.append(("dockerfile", rel))
        if build_args:
            params.append(("buildargs", _fastjson.dumps(build_args)))
        if target:
            params.append(("target", target))
        if no_cache:
            params.append(("nocache", "1"))
        with _as_tar(context, extra=extra) as path:
            resp = self.request(
                "POST", API_PREFIX + "/build", params, upload=path, content_type="application/x-tar"
            )
        found: dict[str, str] = {}

        def on_message(msg: dict[str, Any]) -> None:
            if isinstance(msg.get("stream"), str) and output is not None:
                output(msg["stream"])
            aux = msg.get("aux")
            if isinstance(aux, dict) and isinstance(aux.get("ID"), str):
                found["id"] = aux["ID"]

        self._stream(resp, None, on_message)
        if "id" not in found:
            raise APIError("the build ended without an image", 500)
        return {"Id": found["id"], "RepoTags": [familiar(t) for t in tags], "Warnings": []}

    # --- volumes -----------------------------------------------------------------------------------
    def volume_create(
        self,
        name: str | None = None,
        *,
        labels: dict[str, str] | None = None,
        driver_opts: dict[str, str] | None = None,
    ) -> dict[str, Any]:
        doc: dict[str, Any] = {"Driver": "local", "Labels": labels or {}}
        if driver_opts:
            doc["DriverOpts"] = driver_opts
        if name:
            doc["Name"] = name
        result: dict[str, Any] = self.call("POST", API_PREFIX + "/volumes/create", doc=doc)
        return result

    def volume_list(self) -> dict[str, Any]:
        result: dict[str, Any] = self.call("GET", API_PREFIX + "/volumes")
        return result

    def volume_inspect(self, name: str) -> dict[str, Any]:
        result: dict[str, Any] = self.call("GET", f"{API_PREFIX}/volumes/{name}")
        return result

    def volume_remove(self, name: str, *, force: bool = False) -> None:
        self.call("DELETE", f"{API_PREFIX}/volumes/{name}", [("force", "1" if force else "0")])

    def volume_prune(self, *, all: bool = False) -> dict[str, Any]:
        params = [("filters", _fastjson.dumps({"all": {"true": True}}))] if all else []
        result: dict[str, Any] = self.call("POST", API_PREFIX + "/volumes/prune", params)
        return result

    # --- networks ----------------------------------------------------------------------------------
    def network_create(self, config: dict[str, Any]) -> dict[str, Any]:
        result: dict[str, Any] = self.call("POST", API_PREFIX + "/networks/create", doc=config)
        return result

    def network_list(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self.call("GET", API_PREFIX + "/networks")
        return result

    def network_inspect(self, name: str) -> dict[str, Any]:
        result: dict[str, Any] = self.call("GET", f"{API_PREFIX}/networks/{quote(name)}")
        return result

    def network_remove(self, name: str) -> None:
        self.call("DELETE", f"{API_PREFIX}/networks/{quote(name)}")

    def network_connect(
        self, name: str, container: str, *, aliases: Sequence[str] = (), ip: str | None = None,
        ip6: str | None = None,
    ) -> None:  # fmt: skip
        endpoint: dict[str, Any] = {"Aliases": list(aliases)}
        if ip or ip6:
            endpoint["IPAMConfig"] = {k: v for k, v in (("IPv4Address", ip), ("IPv6Address", ip6)) if v}
        doc = {"Container": container, "EndpointConfig": endpoint}
        self.call("POST", f"{API_PREFIX}/networks/{quote(name)}/connect", doc=doc)

    def network_disconnect(self, name: str, container: str, *, force: bool = False) -> None:
        doc = {"Container": container, "Force": force}
        self.call("POST", f"{API_PREFIX}/networks/{quote(name)}/disconnect", doc=doc)

    def network_policy_list(self, name: str) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self.call("GET", f"/cocon/v1/networks/{quote(name)}/policy")
        return result

    def network_policy_add(
        self, name: str, source: str, ports: str = "", description: str = ""
    ) -> dict[str, Any]:
        doc = {"From": source, "Ports": ports, "Description": description}
        result: dict[str, Any] = self.call("POST", f"/cocon/v1/networks/{quote(name)}/policy", doc=doc)
        return result

    def vm_create(self, spec: dict[str, Any]) -> dict[str, Any]:
        result: dict[str, Any] = self.call("POST", "/cocon/v1/vms", doc=spec)
        return result

    def vm_list(self, *, all: bool = True) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self.call("GET", f"/cocon/v1/vms?all={int(all)}")
        return result

    def vm_remove(self, name: str, *, force: bool = False, delete_disk: bool = False) -> None:
        params = [("force", str(int(force))), ("delete_disk", str(int(delete_disk)))]
        self.call("DELETE", f"/cocon/v1/vms/{quote(name)}", params)

    def vm_disk_attach(self, name: str, volume: str) -> dict[str, Any]:
        result: dict[str, Any] = self.call(
            "POST", f"/cocon/v1/vms/{quote(name)}/disks", doc={"Volume": volume}
        )
        return result

    def vm_disk_detach(self, name: str, volume: str) -> None:
        self.call("DELETE", f"/cocon/v1/vms/{quote(name)}/disks/{quote(volume)}")

    def vm_migrate(self, name: str, spec: dict[str, Any]) -> dict[str, Any]:
        result: dict[str, Any] = self.call("POST", f"/cocon/v1/vms/{quote(name)}/migrate", doc=spec)
        return result

    def vm_snapshots(self, name: str) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self.call("GET", f"/cocon/v1/vms/{quote(name)}/snapshots")
        return result

    def vm_snapshot_create(self, name: str, snapshot: str, *, memory: bool = False) -> dict[str, Any]:
        doc = {"Name": snapshot, "Memory": memory}
        result: dict[str, Any] = self.call("POST", f"/cocon/v1/vms/{quote(name)}/snapshots", doc=doc)
        return result

    def vm_snapshot_restore(self, name: str, snapshot: str) -> dict[str, Any]:
        path = f"/cocon/v1/vms/{quote(name)}/snapshots/{quote(snapshot)}/restore"
        result: dict[str, Any] = self.call("POST", path)
        return result

    def vm_snapshot_remove(self, name: str, snapshot: str) -> None:
        self.call("DELETE", f"/cocon/v1/vms/{quote(name)}/snapshots/{quote(snapshot)}")

    def network_policy_remove(self, name: str, rule: str) -> dict[str, Any]:
        path = f"/cocon/v1/networks/{quote(name)}/policy/{quote(rule)}"
        result: dict[str, Any] = self.call("DELETE", path)
        return result


def familiar(name: str) -> str:
    """A name as Docker shows it: `docker.io/library/busybox` → `busybox:latest`."""
    repo, tag = split_tag(name.partition("@")[0])
    for prefix in ("docker.io/library/", "index.docker.io/library/", "docker.io/"):
        if repo.startswith(prefix):
            repo = repo[len(prefix) :]
            break
    return f"{repo}:{tag or 'latest'}"


def split_tag(ref: str) -> tuple[str, str]:
    """`repo:tag` → (repo, tag); a registry port is not a tag (`localhost:5000/app` → no tag)."""
    slash = ref.rfind("/")
    colon = ref.rfind(":")
    if colon > slash:
        return ref[:colon], ref[colon + 1 :]
    return ref, ""


class _as_tar:
    """A tar of a directory (made in a temporary file), or the file itself; `extra` adds one file
    under another name (a Containerfile from outside the build context)."""

    def __init__(self, source: str, extra: tuple[str, str] | None = None) -> None:
        self.source = source
        self.extra = extra
        self.tmp: str | None = None

    def __enter__(self) -> str:
        if not os.path.isdir(self.source):
            if not os.path.exists(self.source):
                raise APIError(f"{self.source}: no such file or directory", 400)
            return self.source
        import tarfile
        import tempfile

        fd, self.tmp = tempfile.mkstemp(prefix="cocon-upload-", suffix=".tar")
        with os.fdopen(fd, "wb") as f, tarfile.open(fileobj=f, mode="w", format=tarfile.PAX_FORMAT) as tf:
            for name in sorted(os.listdir(self.source)):
                tf.add(os.path.join(self.source, name), arcname=name)
            if self.extra is not None:
                tf.add(self.extra[1], arcname=self.extra[0])
        return self.tmp

    def __exit__(self, *exc: object) -> None:
        if self.tmp is not None:
            os.unlink(self.tmp)


def _unpack_into(archive: str, dest: str) -> None:
    """An OCI archive from the daemon into the directory `dest` (new or empty), safely."""
    import tempfile

    from cocon.api.docker import tarsafe

    if os.path.exists(dest) and (not os.path.isdir(dest) or os.listdir(dest)):
        raise APIError(f"{dest} exists and is not an empty directory: choose another path", 400)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(dest)}.", dir=os.path.dirname(dest))
    try:
        with open(archive, "rb") as f:
            tarsafe.extract(f, tmp, max_bytes=1 << 62)
        os.chmod(tmp, 0o755)
        os.rename(tmp, dest)
    except BaseException:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
        raise


# --- starting the daemon -----------------------------------------------------------------------------


def default_client() -> HTTPClient:
    """The CLI's client: `$COCON_HOST` (`unix://PATH`) when set, else the daemon of `$COCON_RUN`,
    started on the first request when none answers there (nothing to configure)."""
    host = os.environ.get("COCON_HOST")
    if host:
        if not host.startswith("unix://"):
            raise APIError(
                f"COCON_HOST={host}: the cocon command speaks to a daemon on a Unix socket only "
                "(unix:///PATH); use a Docker client with TLS for a daemon on TCP",
                400,
            )
        return HTTPClient(host[len("unix://") :])
    return HTTPClient(default_socket(), autostart=True)


def ensure_daemon(run_dir: str | None = None, *, root: str | None = None, timeout: float = 5.0) -> str:
    """Make sure a daemon answers on `<run_dir>/cocon.sock`; start one if not, and wait (at most
    `timeout` seconds) until it answers `/_ping`. Returns the socket path.

    The daemon is started detached: a double fork with setsid, so it belongs to no terminal or
    session of the caller and is reparented when the caller exits; stdin is /dev/null and its
    output goes to `<run_dir>/daemon.log`. APIError says what went wrong (with the log's last lines)
    if it exits or does not answer in time."""
    import sys
    import time

    run = os.path.abspath(run_dir or os.environ.get("COCON_RUN") or DEFAULT_RUN)
    path = os.path.join(run, SOCKET_NAME)
    client = HTTPClient(path, timeout=2.0)
    if client.ping():
        return path
    os.makedirs(run, 0o700, exist_ok=True)
    if _wait_for_other_daemon(run, client, 30.0):  # one starting up answered meanwhile
        return path
    log_path = os.path.join(run, "daemon.log")
    env = dict(os.environ, COCON_RUN=run)
    if root is not None:
        env["COCON_ROOT"] = os.path.abspath(root)
    src = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = os.pathsep.join([src, *[p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]])
    argv = [sys.executable, "-m", "cocon.api.daemon"]
    pid = _spawn_detached(argv, env, log_path)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if client.ping():
            return path
        if not _alive(pid):
            if client.ping():  # another daemon won a race for the socket
                return path
            raise APIError(f"the cocon daemon exited at start-up: {_tail(log_path)} (log: {log_path})", 500)
        time.sleep(0.05)
    raise APIError(
        f"the cocon daemon (pid {pid}) did not answer on {path} within {timeout:g} s: see {log_path}"
        f" ({_tail(log_path)})",
        500,
    )


def _wait_for_other_daemon(run: str, client: HTTPClient, timeout: float) -> bool:
    """A daemon that holds `$COCON_RUN/cocon.pid`'s lock but does not answer is starting or stopping:
    wait (at most `timeout` s) until it answers (True) or lets go of the lock (False)."""
    import fcntl
    import time

    try:
        fd = os.open(os.path.join(run, "cocon.pid"), os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                fcntl.flock(fd, fcntl.LOCK_UN)
                return False  # nobody holds it
            except BlockingIOError:
                pass
            if client.ping():
                return True
            if time.monotonic() > deadline:
                return False  # the start below reports the daemon that holds it
            time.sleep(0.05)
    finally:
        os.close(fd)


def _spawn_detached(argv: list[str], env: dict[str, str], log_path: str) -> int:
    """fork, setsid, fork again, exec: returns the daemon's pid (read from a pipe)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the intermediate child
        try:
            os.close(r)
            os.setsid()
            grandchild = os.fork()
            if grandchild == 0:
                null = os.open("/dev/null", os.O_RDONLY)
                log = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
                os.dup2(null, 0)
                os.dup2(log, 1)
                os.dup2(log, 2)
                os.write(w, str(os.getpid()).encode())
                os.closerange(3, 1 << 16)
                os.chdir("/")
                os.execve(argv[0], argv, env)
            os._exit(0)
        except BaseException:
            os._exit(127)
    os.close(w)
    os.waitpid(pid, 0)
    data = b""
    while chunk := os.read(r, 64):
        data += chunk
    os.close(r)
    if not data:
        raise APIError("could not start the cocon daemon (fork failed)", 500)
    return int(data)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rpartition(")")[2].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def _tail(path: str) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, 2)
            f.seek(max(0, f.tell() - 2000))
            lines = [line for line in f.read().decode("utf-8", "replace").splitlines() if line.strip()]
    except OSError:
        return "no log"
    return " | ".join(lines[-3:]) or "no output"
