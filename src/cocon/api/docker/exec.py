"""Exec routes: `POST /containers/{id}/exec`, `POST /exec/{id}/start` (hijacked, or Detach),
`GET /exec/{id}/json`, `POST /exec/{id}/resize`.

An exec is a `cocon-runtime exec` process (`Supervisor.exec_args`) that the daemon starts and whose
stdio it holds: pipes without a TTY (stdout and stderr in Docker's multiplexed frames), a pty with
one (raw). Exec instances live in the daemon's memory, as in dockerd: they are gone after a restart.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import struct
import termios
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from aiohttp import web

from cocon.api.docker.common import (
    HTTPError,
    add_route,
    bad_request,
    check_fields,
    ctx_of,
    json_body,
    json_response,
    no_content,
    qint,
)
from cocon.api.docker.hijack import MULTIPLEXED, RAW, HijackedStream, frame, hijack

if TYPE_CHECKING:
    from cocon.engine.engine import Engine


@dataclass
class ExecInstance:
    id: str
    container: str
    name: str
    cmd: list[str]
    tty: bool
    stdin: bool
    stdout: bool
    stderr: bool
    user: str
    workdir: str
    env: list[str]
    running: bool = False
    exit_code: int | None = None
    pid: int = 0
    master: int = -1
    done: asyncio.Event = field(default_factory=asyncio.Event)

    def doc(self) -> dict[str, Any]:
        return {
            "ID": self.id, "Running": self.running, "ExitCode": self.exit_code, "Pid": self.pid,
            "ContainerID": self.container, "OpenStdin": self.stdin, "OpenStdout": self.stdout,
            "OpenStderr": self.stderr, "CanRemove": False, "DetachKeys": "",
            "ProcessConfig": {"tty": self.tty, "entrypoint": self.cmd[0], "arguments": self.cmd[1:],
                              "privileged": False, "user": self.user},
        }  # fmt: skip


_BACKGROUND: set[asyncio.Future[None]] = set()


def _wake(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


EXECS_KEY: web.AppKey[dict[str, ExecInstance]] = web.AppKey("cocon_execs")
_MAX_EXECS = 1000


def _execs(request: web.Request) -> dict[str, ExecInstance]:
    return request.app[EXECS_KEY]


def _get(request: web.Request) -> ExecInstance:
    ident = request.match_info["id"]
    inst = _execs(request).get(ident)
    if inst is None:
        raise HTTPError(404, f"No such exec instance: {ident}")
    return inst


async def create(request: web.Request) -> web.StreamResponse:
    body = check_fields(
        await json_body(request, required=True),
        {"AttachStdin": bool, "AttachStdout": bool, "AttachStderr": bool, "Tty": bool, "Cmd": list,
         "Container": str, "Detach": bool, "Env": list, "User": str, "WorkingDir": str, "DetachKeys": str,
         "ConsoleSize": list},
        what="exec create",
        unsupported={"Privileged": "privileged exec is not supported"},
    )  # fmt: skip
    cmd = body.get("Cmd") or []
    if not cmd or not all(isinstance(c, str) for c in cmd):
        raise bad_request("exec create: Cmd must be a non-empty array of strings")
    env = body.get("Env") or []
    if not all(isinstance(v, str) for v in env):
        raise bad_request("exec create: Env must be an array of K=V strings")
    ref = request.match_info["id"]

    def check(e: Engine) -> tuple[str, str]:
        rec = e.instances.get(ref)
        e.supervisor.exec_args(rec.id, cmd, tty=bool(body.get("Tty")), user=body.get("User"),
                               workdir=body.get("WorkingDir"), env=env)  # fmt: skip  # validates
        return rec.id, rec.name

    cid, name = await ctx_of(request).call(check)
    execs = _execs(request)
    if len(execs) >= _MAX_EXECS:  # forget finished ones, oldest first
        for key in [k for k, v in execs.items() if v.exit_code is not None][: _MAX_EXECS // 2]:
            del execs[key]
    inst = ExecInstance(
        id=os.urandom(32).hex(), container=cid, name=name, cmd=list(cmd), tty=bool(body.get("Tty")),
        stdin=bool(body.get("AttachStdin")), stdout=bool(body.get("AttachStdout")),
        stderr=bool(body.get("AttachStderr")), user=body.get("User") or "",
        workdir=body.get("WorkingDir") or "", env=list(env),
    )  # fmt: skip
    execs[inst.id] = inst
    return json_response({"Id": inst.id}, 201)


async def inspect(request: web.Request) -> web.StreamResponse:
    return json_response(_get(request).doc())


def _set_size(fd: int, rows: int, cols: int) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


async def resize(request: web.Request) -> web.StreamResponse:
    inst = _get(request)
    h, w = qint(request, "h", 0), qint(request, "w", 0)
    if h <= 0 or w <= 0:
        raise bad_request("resize needs h and w, positive numbers of rows and columns")
    if inst.tty and inst.master >= 0:
        try:
            _set_size(inst.master, h, w)
        except OSError:
            pass
    return no_content(200)


async def _spawn(request: web.Request, inst: ExecInstance, console: list[int]) -> asyncio.subprocess.Process:
    ctx = ctx_of(request)
    args = await ctx.call(
        lambda e: e.supervisor.exec_args(inst.container, inst.cmd, tty=inst.tty, user=inst.user or None,
                                         workdir=inst.workdir or None, env=inst.env)
    )  # fmt: skip
    if inst.tty:
        master, slave = os.openpty()
        if len(console) == 2 and console[0] > 0 and console[1] > 0:
            _set_size(master, console[0], console[1])
        os.set_blocking(master, False)
        try:
            proc = await asyncio.create_subprocess_exec(
                *args, stdin=slave, stdout=slave, stderr=slave, start_new_session=True
            )
        except BaseException:
            os.close(master)
            raise
        finally:
            os.close(slave)
        inst.master = master
        return proc
    return await asyncio.create_subprocess_exec(
        *args,
        stdin=asyncio.subprocess.PIPE if inst.stdin else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )


async def start(request: web.Request) -> web.StreamResponse:
    inst = _get(request)
    body = check_fields(
        await json_body(request), {"Detach": bool, "Tty": bool, "ConsoleSize": list}, what="exec start"
    )
    if inst.running or inst.exit_code is not None:
        raise HTTPError(409, f"exec instance {inst.id} has already been started")
    if "Tty" in body:
        inst.tty = bool(body["Tty"])
    inst.running = True
    console = [int(x) for x in (body.get("ConsoleSize") or []) if isinstance(x, int)]
    try:
        proc = await _spawn(request, inst, console)
    except BaseException:
        inst.running, inst.exit_code = False, 126
        raise
    inst.pid = proc.pid
    ctx_of(request)  # keeps the request's context alive while it runs
    if body.get("Detach"):
        _BACKGROUND.add(task := asyncio.ensure_future(_run_detached(inst, proc)))
        task.add_done_callback(_BACKGROUND.discard)
        return json_response({})
    stream = await hijack(request, RAW if inst.tty else MULTIPLEXED)
    try:
        await _relay(stream, inst, proc)
    finally:
        stream.close()
    return stream.response


async def _finish(inst: ExecInstance, proc: asyncio.subprocess.Process) -> None:
    code = await proc.wait()
    inst.exit_code = code if code >= 0 else 128 - code
    inst.running = False
    if inst.master >= 0:
        os.close(inst.master)
        inst.master = -1
    inst.done.set()


async def _run_detached(inst: ExecInstance, proc: asyncio.subprocess.Process) -> None:
    loop = asyncio.get_running_loop()
    if inst.master >= 0:  # keep the pty drained
        fd = inst.master

        def drain() -> None:
            try:
                os.read(fd, 65536)
            except OSError:
                loop.remove_reader(fd)

        loop.add_reader(fd, drain)
        try:
            await proc.wait()
        finally:
            loop.remove_reader(fd)
    else:
        readers = [asyncio.ensure_future(p.read()) for p in (proc.stdout, proc.stderr) if p is not None]
        await asyncio.gather(*readers, return_exceptions=True)
    await _finish(inst, proc)


async def _relay(stream: HijackedStream, inst: ExecInstance, proc: asyncio.subprocess.Process) -> None:
    loop = asyncio.get_running_loop()
    tasks: list[asyncio.Future[Any]] = []

    async def copy_out(reader: asyncio.StreamReader, n: int, wanted: bool) -> None:
        while True:
            data = await reader.read(65536)
            if not data:
                return
            if wanted:
                await stream.write(frame(n, data))

    async def pty_out() -> None:
        fd = inst.master
        while True:
            ready: asyncio.Future[None] = loop.create_future()
            loop.add_reader(fd, _wake, ready)
            try:
                await ready
            finally:
                loop.remove_reader(fd)
            try:
                data = os.read(fd, 65536)
            except BlockingIOError:
                continue
            except OSError:  # EIO: the last process holding the pty's other side ended
                return
            if not data:
                return
            await stream.write(data)

    async def copy_in() -> None:
        while True:
            data = await stream.read()
            if not data:
                if stream.closed:
                    for t in tasks:
                        t.cancel()
                if inst.tty and inst.master >= 0 and inst.stdin and not stream.closed:
                    os.write(inst.master, b"\x04")
                elif proc.stdin is not None:
                    proc.stdin.close()
                return
            if not inst.stdin:
                continue
            if inst.tty:
                view = memoryview(data)
                while view:
                    try:
                        view = view[os.write(inst.master, view) :]
                    except BlockingIOError:
                        await asyncio.sleep(0.01)
            elif proc.stdin is not None:
                proc.stdin.write(data)
                try:
                    await proc.stdin.drain()
                except (ConnectionError, OSError):
                    return

    if inst.tty:
        tasks.append(asyncio.ensure_future(pty_out()))
    else:
        assert proc.stdout is not None and proc.stderr is not None
        tasks.append(asyncio.ensure_future(copy_out(proc.stdout, 1, inst.stdout)))
        tasks.append(asyncio.ensure_future(copy_out(proc.stderr, 2, inst.stderr)))
    in_task = asyncio.ensure_future(copy_in())
    try:
        await asyncio.gather(*tasks, return_exceptions=True)
        if stream.closed and proc.returncode is None:
            proc.kill()
        await _finish(inst, proc)
    finally:
        in_task.cancel()
        stream.close_write()


def register(app: web.Application) -> None:
    app[EXECS_KEY] = {}
    add_route(app, "POST", "/containers/{id}/exec", create)
    add_route(app, "POST", "/exec/{id}/start", start)
    add_route(app, "GET", "/exec/{id}/json", inspect)
    add_route(app, "POST", "/exec/{id}/resize", resize)
