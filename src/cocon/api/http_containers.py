"""Container requests of `HTTPClient` (cocon.api.http_client): the Docker Engine API's container and
exec routes as the client interface's methods.

Attaching follows the docker CLI: `POST /containers/{id}/attach` upgraded to a raw connection
(`Connection: Upgrade`, `Upgrade: tcp`) *before* the start, so no output is lost; the wait request
(`condition=next-exit`, or `removed` for an auto-removed container) is sent before the start too,
so the exit code of a `--rm` container is known even though its record is gone when it ends.
Without a TTY the connection carries Docker's multiplexed frames (cocon.api.stream_relay).

`cp` is the archive routes: a tar of the path in the container (`GET …/archive`) unpacked here with
Docker's destination rules, and a tar made here (`PUT …/archive`) unpacked there; the destination's
kind comes from `HEAD …/archive` (`X-Docker-Container-Path-Stat`).
"""

from __future__ import annotations

import os

from cocon import _fastjson
from cocon._typing import TYPE_CHECKING
from cocon.api.client import APIError, Attachment, Client

if TYPE_CHECKING:
    from collections.abc import Iterator, Sequence
    from typing import Any

    from cocon.api.client import Progress
    from cocon.api.http_client import Response

PREFIX = "/v1.47"
UPGRADE = (("Connection", "Upgrade"), ("Upgrade", "tcp"))


def exit_code_for(message: str) -> int:
    """`docker run`'s status for a start error: 127 not found, 126 not executable, else 125."""
    low = message.lower()
    if "executable file not found" in low or "no such file or directory" in low:
        return 127
    if "permission denied" in low or "is a directory" in low:
        return 126
    return 125


def _path(cid: str, action: str = "") -> str:
    from cocon.api.http_client import quote

    return f"{PREFIX}/containers/{quote(cid)}" + (f"/{action}" if action else "")


def _flag(value: bool) -> str:
    return "1" if value else "0"


class Hijacked:
    """An upgraded connection: the socket and the bytes that arrived behind the 101's headers."""

    def __init__(self, resp: Response) -> None:
        self.resp = resp
        self.initial = resp._buf
        resp._buf = b""

    def fileno(self) -> int:
        fd: int = self.resp.sock.fileno()
        return fd

    def close(self) -> None:
        self.resp.close()


class _Started:
    """What container_start left for container_wait: the attach connection and the pending wait."""

    def __init__(self, attach: Hijacked, wait: Response) -> None:
        self.attach = attach
        self.wait = wait


class ContainerRequests(Client):
    """HTTPClient's base: every container method of cocon.api.client.Client, over its transport."""

    if TYPE_CHECKING:  # HTTPClient's transport

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
        ) -> Response: ...

        def call(
            self, method: str, path: str, params: Sequence[tuple[str, str]] = (), doc: Any = None
        ) -> Any: ...

    # container → (Tty, AutoRemove) of the containers this client created (saves an inspect)
    _created: dict[str, tuple[bool, bool]]
    _started: dict[str, _Started]

    def _init_containers(self) -> None:
        self._created = {}
        self._started = {}

    # --- plumbing ----------------------------------------------------------------------------------
    def _hijack(self, path: str, params: Sequence[tuple[str, str]], body: Any = None) -> Hijacked:
        resp = self.request(
            "POST", path, params, body=_fastjson.dumps(body).encode() if body is not None else None,
            headers=UPGRADE,
        )  # fmt: skip
        if resp.status not in (101, 200):
            resp.close()
            raise APIError(f"the cocon daemon did not upgrade the connection (HTTP {resp.status})", 500)
        return Hijacked(resp)

    def _kind(self, cid: str) -> tuple[bool, bool]:
        """(Tty, AutoRemove) of a container."""
        known = self._created.get(cid)
        if known is None:
            doc = self.container_inspect(cid)
            host = doc.get("HostConfig") or {}
            known = (bool((doc.get("Config") or {}).get("Tty")), bool(host.get("AutoRemove")))
        return known

    def _relay(self, hijacked: Hijacked, *, tty: bool, stdin: bool, resize_path: str | None,
               detach: bool = False, detach_keys: bytes | None = None) -> bool:  # fmt: skip
        from cocon.api import stream_relay

        def resize(rows: int, cols: int) -> None:
            if resize_path is not None:
                try:
                    self.call("POST", resize_path, [("h", str(rows)), ("w", str(cols))])
                except APIError:
                    pass

        return stream_relay.relay(
            hijacked.fileno(), stdin=stdin, resize=resize if tty else None, multiplexed=not tty,
            is_socket=True, detach_keys=(detach_keys or stream_relay.DETACH_KEYS) if tty and detach else None,
            initial=hijacked.initial,
        )  # fmt: skip

    # --- create, start, wait -----------------------------------------------------------------------
    def container_create(self, config: dict[str, Any], name: str | None = None) -> dict[str, Any]:
        params = [("name", name)] if name else []
        result: dict[str, Any] = self.call("POST", f"{PREFIX}/containers/create", params, config)
        host = config.get("HostConfig") or {}
        self._created[result["Id"]] = (bool(config.get("Tty")), bool(host.get("AutoRemove")))
        return result

    def container_start(self, container: str, *, stdin: bool = False) -> Attachment:
        tty, auto_remove = self._kind(container)
        params = [("stream", "1"), ("stdout", "1"), ("stderr", "1"), ("stdin", _flag(stdin))]
        attach = self._hijack(_path(container, "attach"), params)
        try:
            condition = "removed" if auto_remove else "next-exit"
            wait = self.request("POST", _path(container, "wait"), [("condition", condition)])
            try:
                self._start(container)
            except BaseException:
                wait.close()
                raise
        except BaseException:
            attach.close()
            raise
        self._started[container] = _Started(attach, wait)
        return Attachment(direct=False, fd=attach.fileno(), multiplexed=not tty, is_socket=True,
                          initial=attach.initial)  # fmt: skip

    def _start(self, container: str) -> None:
        try:
            self.call("POST", _path(container, "start"))
        except APIError as exc:
            if exc.status >= 500 or exc.status == 400:
                exc.exit_code = exit_code_for(str(exc))
            raise

    def container_wait(self, container: str) -> dict[str, Any]:
        started = self._started.pop(container, None)
        if started is None:
            return self.container_wait_until(container, "next-exit")
        started.attach.close()
        try:
            raw = started.wait.read()
        finally:
            started.wait.close()
        doc: dict[str, Any] = _fastjson.loads(raw)
        error = doc.get("Error")
        if isinstance(error, dict) and error.get("Message"):
            raise APIError(str(error["Message"]), 500)
        return doc

    def container_wait_until(self, container: str, condition: str = "not-running") -> dict[str, Any]:
        result: dict[str, Any] = self.call("POST", _path(container, "wait"), [("condition", condition)])
        return result

    def container_start_attach(self, container: str, *, stdin: bool = False) -> int:
        tty, _ = self._kind(container)
        self.container_start(container, stdin=stdin)
        started = self._started[container]
        ended = self._relay(started.attach, tty=tty, stdin=stdin, resize_path=_path(container, "resize"),
                            detach=True)  # fmt: skip
        if not ended:
            self._started.pop(container)
            started.attach.close()
            started.wait.close()
            os.write(2, b"\nread escape sequence\n")
            return -1
        return int(self.container_wait(container)["StatusCode"])

    def container_attach(
        self, container: str, *, stdin: bool = True, detach_keys: bytes | None = None
    ) -> int:
        tty, _ = self._kind(container)
        params = [("stream", "1"), ("stdout", "1"), ("stderr", "1"), ("stdin", _flag(stdin))]
        attach = self._hijack(_path(container, "attach"), params)
        try:
            ended = self._relay(attach, tty=tty, stdin=stdin, resize_path=_path(container, "resize"),
                                detach=True, detach_keys=detach_keys)  # fmt: skip
        finally:
            attach.close()
        if not ended:
            os.write(2, b"\nread escape sequence\n")
            return -1
        return int(self.container_wait_until(container, "not-running")["StatusCode"])

    def container_run_detached(self, config: dict[str, Any], name: str | None = None) -> dict[str, Any]:
        created = self.container_create(config, name)
        self.container_start_detached(created["Id"])
        return created

    def container_start_detached(self, container: str) -> None:
        self._start(container)

    # --- signals and state -------------------------------------------------------------------------
    def container_kill(self, container: str, signal: int) -> None:
        self.call("POST", _path(container, "kill"), [("signal", str(signal))])

    def container_resize(self, container: str, height: int, width: int) -> None:
        self.call("POST", _path(container, "resize"), [("h", str(height)), ("w", str(width))])

    def container_stop(self, container: str, *, timeout: int | None = None) -> None:
        params = [("t", str(timeout))] if timeout is not None else []
        self.call("POST", _path(container, "stop"), params)

    def container_restart(self, container: str, *, timeout: int | None = None) -> None:
        params = [("t", str(timeout))] if timeout is not None else []
        self.call("POST", _path(container, "restart"), params)

    def container_pause(self, container: str) -> None:
        self.call("POST", _path(container, "pause"))

    def container_unpause(self, container: str) -> None:
        self.call("POST", _path(container, "unpause"))

    def container_rename(self, container: str, name: str) -> None:
        self.call("POST", _path(container, "rename"), [("name", name)])

    def container_remove(self, container: str, *, force: bool = False, volumes: bool = False) -> str:
        self.call("DELETE", _path(container), [("force", _flag(force)), ("v", _flag(volumes))])
        return container

    # --- reading -----------------------------------------------------------------------------------
    def container_list(self, *, all: bool = False) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self.call("GET", f"{PREFIX}/containers/json", [("all", _flag(all))])
        return result

    def container_inspect(self, container: str) -> dict[str, Any]:
        result: dict[str, Any] = self.call("GET", _path(container, "json"))
        return result

    def container_top(self, container: str, ps_args: str | None = None) -> dict[str, Any]:
        params = [("ps_args", ps_args)] if ps_args else []
        result: dict[str, Any] = self.call("GET", _path(container, "top"), params)
        return result

    def container_stats(self, container: str) -> dict[str, Any]:
        result: dict[str, Any] = self.call("GET", _path(container, "stats"), [("stream", "0")])
        return result

    def container_port(self, container: str) -> dict[str, Any]:
        doc = self.container_inspect(container)
        return dict((doc.get("NetworkSettings") or {}).get("Ports") or {})

    def container_logs(
        self,
        container: str,
        *,
        stdout: bool = True,
        stderr: bool = True,
        since: str | None = None,
        until: str | None = None,
        tail: int | None = None,
        timestamps: bool = False,
        follow: bool = False,
    ) -> Iterator[tuple[str, bytes]]:
        tty, _ = self._kind(container)
        params = [("stdout", _flag(stdout)), ("stderr", _flag(stderr)), ("timestamps", _flag(timestamps)),
                  ("follow", _flag(follow)), ("tail", "all" if tail is None else str(tail))]  # fmt: skip
        params += [(k, v) for k, v in (("since", since), ("until", until)) if v]
        resp = self.request("GET", _path(container, "logs"), params)
        return _log_lines(resp, tty)

    # --- exec --------------------------------------------------------------------------------------
    def container_exec(
        self,
        container: str,
        cmd: Sequence[str],
        *,
        tty: bool = False,
        stdin: bool = False,
        user: str | None = None,
        workdir: str | None = None,
        env: Sequence[str] = (),
    ) -> int:
        body: dict[str, Any] = {"Cmd": list(cmd), "Tty": tty, "AttachStdin": stdin, "AttachStdout": True,
                                "AttachStderr": True, "Env": list(env)}  # fmt: skip
        if user:
            body["User"] = user
        if workdir:
            body["WorkingDir"] = workdir
        created = self.call("POST", _path(container, "exec"), (), body)
        exec_id = str(created["Id"])
        from cocon.api.http_client import quote

        hijacked = self._hijack(f"{PREFIX}/exec/{quote(exec_id)}/start", (), {"Detach": False, "Tty": tty})
        try:
            self._relay(hijacked, tty=tty, stdin=stdin, resize_path=f"{PREFIX}/exec/{quote(exec_id)}/resize")
        finally:
            hijacked.close()
        doc = self.call("GET", f"{PREFIX}/exec/{quote(exec_id)}/json")
        code = doc.get("ExitCode")
        return int(code) if code is not None else 126

    # --- cp ----------------------------------------------------------------------------------------
    def container_copy_from(self, container: str, path: str, dest: str) -> None:
        import shutil
        import tempfile

        from cocon.api.docker import tarsafe

        resp = self.request("GET", _path(container, "archive"), [("path", path)])
        tmp_dir = tempfile.mkdtemp(prefix=".cocon-cp-", dir=_existing_parent(dest))
        try:
            spool = os.path.join(tmp_dir, "archive.tar")
            with open(spool, "wb") as f:
                for piece in resp.chunks():
                    f.write(piece)
            resp.close()
            unpacked = os.path.join(tmp_dir, "content")
            os.mkdir(unpacked)
            with open(spool, "rb") as f:
                tarsafe.extract(f, unpacked, max_bytes=1 << 62)
            names = os.listdir(unpacked)
            if len(names) != 1:
                raise APIError(f"the archive of {path} has {len(names)} top-level entries, expected one", 500)
            src = os.path.join(unpacked, names[0])
            contents_only = path.endswith("/.")
            if os.path.isdir(dest) and not os.path.islink(dest):
                if contents_only:
                    for name in os.listdir(src):
                        _move_over(os.path.join(src, name), os.path.join(dest, name))
                else:
                    _move_over(src, os.path.join(dest, names[0]))
            else:
                if dest.endswith("/"):
                    raise APIError(f"the destination directory {dest} does not exist: create it first", 404)
                if not os.path.isdir(os.path.dirname(os.path.abspath(dest))):
                    raise APIError(f"the parent directory of {dest} does not exist: create it first", 404)
                _move_over(src, dest)
        finally:
            resp.close()
            shutil.rmtree(tmp_dir, ignore_errors=True)

    def container_copy_to(self, container: str, source: str, path: str) -> None:
        import tarfile
        import tempfile

        if not os.path.lexists(source):
            raise APIError(f"{source}: no such file or directory on this machine", 404)
        target_dir, name = self._copy_target(container, path, source)
        fd, spool = tempfile.mkstemp(prefix="cocon-cp-", suffix=".tar")
        try:
            with os.fdopen(fd, "wb") as f, tarfile.open(fileobj=f, mode="w", format=tarfile.PAX_FORMAT) as tf:
                if source.endswith("/.") and os.path.isdir(source):
                    for entry in sorted(os.listdir(source)):
                        tf.add(os.path.join(source, entry), arcname=entry)
                else:
                    tf.add(source, arcname=name)
            resp = self.request("PUT", _path(container, "archive"), [("path", target_dir)], upload=spool,
                                content_type="application/x-tar")  # fmt: skip
            resp.close()
        finally:
            os.unlink(spool)

    def _copy_target(self, container: str, path: str, source: str) -> tuple[str, str]:
        """Docker's rule: into `path` when it is a directory in the container, else *as* `path`
        (the archive goes to its parent under the new name)."""
        base = os.path.basename(os.path.normpath(source))
        try:
            resp = self.request("HEAD", _path(container, "archive"), [("path", path)])
            raw = resp.headers.get("x-docker-container-path-stat", "")
            resp.close()
        except APIError as exc:
            if exc.status != 404:
                raise
            raw = ""
        if raw:
            import base64

            stat_doc = _fastjson.loads(base64.b64decode(raw))
            if int(stat_doc.get("mode", 0)) & (1 << 31):  # Go's os.ModeDir
                return path, base
        if path.endswith("/"):
            raise APIError(f"the destination directory {path} does not exist in the container", 404)
        parent = os.path.dirname(path.rstrip("/")) or "/"
        return parent, os.path.basename(path.rstrip("/"))


def _log_lines(resp: Response, tty: bool) -> Iterator[tuple[str, bytes]]:
    """Log lines as (stream, line) from a raw (TTY) or multiplexed logs answer."""
    from cocon.api.stream_relay import STDERR, Demuxer

    pending: dict[int, bytes] = {1: b"", 2: b""}
    ready: list[tuple[int, bytes]] = []

    def out(stream: int, data: bytes) -> None:
        ready.append((stream, data))

    demux = Demuxer(out)
    try:
        for piece in resp.chunks():
            if tty:
                ready.append((1, piece))
            else:
                demux.feed(piece)
            while ready:
                stream, data = ready.pop(0)
                buf = pending[stream] + data
                *lines, pending[stream] = buf.split(b"\n")
                for line in lines:
                    yield ("stderr" if stream == STDERR else "stdout"), line + b"\n"
        for stream, rest in pending.items():
            if rest:
                yield ("stderr" if stream == STDERR else "stdout"), rest
    finally:
        resp.close()


def _existing_parent(dest: str) -> str:
    parent = dest if os.path.isdir(dest) else os.path.dirname(os.path.abspath(dest))
    if not os.path.isdir(parent):
        raise APIError(f"the parent directory of {dest} does not exist: create it first", 404)
    return parent


def _move_over(src: str, dst: str) -> None:
    """Put `src` at `dst`: a directory merges into an existing one, anything else replaces."""
    import shutil

    if os.path.isdir(src) and not os.path.islink(src) and os.path.isdir(dst) and not os.path.islink(dst):
        for name in os.listdir(src):
            _move_over(os.path.join(src, name), os.path.join(dst, name))
        return
    if os.path.isdir(dst) and not os.path.islink(dst):
        shutil.rmtree(dst)
    elif os.path.lexists(dst):
        os.unlink(dst)
    os.rename(src, dst)
