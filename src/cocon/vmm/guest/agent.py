"""cocon's guest agent: PID 1 of a microVM, driven by the host over a virtio-serial port.

    python3 -m cocon.vmm.guest.agent [--fd N | --device PATH] [--state-dir DIR] [--grace SECONDS]

A single-threaded selectors loop. It answers CONTROL requests (docs/agent.md), runs containers with
cocon's own runtime (`Runtime(<state-dir>/runtime)`, bundles in `<state-dir>/bundles/<id>/`), relays
their stdio as DATA/EOF frames, reaps every child (SIGCHLD through a wake-up socket) and reports each
process's exit after all of its output. Stdlib and cocon's guest-side packages only.

Channel: by default the virtio-serial port named `org.cocon.agent.0`. There, a read of 0 bytes means
"no host connected" (not the end): output stays buffered, and the port is polled until the host
comes back. With `--fd N` (tests, on the host) the end of the stream ends the agent, after deleting
its containers.
"""

from __future__ import annotations

import base64
import collections
import errno
import fcntl
import json
import os
import selectors
import shutil
import signal
import socket
import struct
import sys
import time
from collections.abc import Callable
from typing import Any

from cocon.vmm.agent_protocol import (
    CONTROL,
    DATA,
    EOF,
    EXIT_OTHER,
    PROTOCOL_VERSION,
    STDERR,
    STDIN,
    STDOUT,
    Decoder,
    Frame,
    ProtocolError,
    encode_control,
    encode_data,
    encode_eof,
    error_reply,
    exit_code_for,
    ok_reply,
)

PORT_NAME = "org.cocon.agent.0"
DEFAULT_STATE_DIR = "/run/cocon"
READY_LINE = f"cocon-agent: ready {PROTOCOL_VERSION}"
READ_CHUNK = 65536
OUTPUT_HIGH_WATER = 4 << 20  # stop reading process output while this much waits for the host
RECONNECT_POLL = 0.2  # seconds between checks of a virtio-serial port with no host
DEFAULT_GRACE = 2.0  # seconds to wait for a process's pipes to close after it exited

# <linux/random.h>
RNDADDENTROPY = 0x40085203
RNDRESEEDCRNG = 0x5207
# <linux/reboot.h>
RB_POWER_OFF = 0x4321FEDC


_BLOCKED_WHILE_SPAWNING = {signal.SIGCHLD, signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT,
                            signal.SIGUSR1, signal.SIGUSR2, signal.SIGWINCH}  # fmt: skip


class RequestError(Exception):
    """A request that cannot be carried out: becomes an error reply."""

    def __init__(self, message: str, exit_code: int = EXIT_OTHER) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def log(message: str) -> None:
    try:
        sys.stderr.write(f"cocon-agent: {message}\n")
        sys.stderr.flush()
    except OSError:
        pass


# --- request arguments ---------------------------------------------------------------------------
def _arg(req: dict[str, Any], name: str, kind: type | tuple[type, ...], default: Any = ...) -> Any:
    if name not in req:
        if default is ...:
            raise RequestError(f"{req.get('op')}: argument {name!r} is missing")
        return default
    value = req[name]
    if isinstance(value, bool) and kind is int:
        raise RequestError(f"{req.get('op')}: argument {name!r} must be an integer, not a boolean")
    if not isinstance(value, kind):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise RequestError(f"{req.get('op')}: argument {name!r} must be {names}, not {type(value).__name__}")
    return value


def _int_arg(req: dict[str, Any], name: str, low: int, high: int, default: Any = ...) -> int:
    value: int = _arg(req, name, int, default)
    if not low <= value <= high:
        raise RequestError(f"{req.get('op')}: argument {name!r} = {value} is out of range {low}..{high}")
    return value


def _container_id(req: dict[str, Any]) -> str:
    from cocon.runtime.errors import RuntimeFailure
    from cocon.runtime.state import validate_id

    cid: str = _arg(req, "container_id", str)
    try:
        validate_id(cid)
    except RuntimeFailure as exc:
        raise RequestError(str(exc)) from None
    return cid


# --- the channel ---------------------------------------------------------------------------------
class Channel:
    """The host connection: a non-blocking fd with a queue of whole frames to write.

    On a virtio-serial port the host may be absent: writes then wait in the queue, a frame cut by a
    disconnect is dropped (a new host connection must start at a frame boundary)."""

    def __init__(self, fd: int, *, is_port: bool) -> None:
        self.fd = fd
        self.is_port = is_port
        self.connected = True
        self.queue: collections.deque[bytes] = collections.deque()
        self.offset = 0  # bytes of queue[0] already written
        self.queued = 0
        os.set_blocking(fd, False)

    def send(self, frame: bytes) -> None:
        if frame:
            self.queue.append(frame)
            self.queued += len(frame)

    def flush(self) -> None:
        """Write what the fd takes now."""
        while self.queue and self.connected:
            head = self.queue[0]
            try:
                n = os.write(self.fd, memoryview(head)[self.offset :])
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno in (errno.EPIPE, errno.ECONNRESET, errno.ENODEV, errno.EIO):
                    self.disconnected()
                    return
                raise
            self.offset += n
            self.queued -= n
            if self.offset == len(head):
                self.queue.popleft()
                self.offset = 0

    def disconnected(self) -> None:
        self.connected = False
        if self.offset:
            self.queued -= len(self.queue[0]) - self.offset
            self.queue.popleft()
            self.offset = 0

    def drain(self, timeout: float) -> None:
        """Block up to `timeout` seconds for the queue to be written (before power-off)."""
        deadline = time.monotonic() + timeout
        with selectors.DefaultSelector() as sel:
            sel.register(self.fd, selectors.EVENT_WRITE)
            while self.queue and self.connected:
                self.flush()
                left = deadline - time.monotonic()
                if left <= 0:
                    return
                if self.queue:
                    sel.select(left)


def find_port(name: str = PORT_NAME) -> str:
    base = "/sys/class/virtio-ports"
    try:
        entries = sorted(os.listdir(base))
    except FileNotFoundError:
        entries = []
    for entry in entries:
        try:
            with open(os.path.join(base, entry, "name")) as f:
                if f.read().strip() == name:
                    return f"/dev/{entry}"
        except OSError:
            continue
    raise SystemExit(
        f"cocon-agent: no virtio-serial port named {name} (looked in {base}); start QEMU with "
        f"-device virtserialport,name={name}"
    )


# --- processes -----------------------------------------------------------------------------------
class Proc:
    """A process the host knows by number: a container's init or an exec'd process."""

    def __init__(self, number: int, container_id: str, pid: int, *, is_init: bool, terminal: bool) -> None:
        self.number = number
        self.container_id = container_id
        self.pid = pid
        self.is_init = is_init
        self.terminal = terminal
        self.outputs: dict[int, int] = {}  # fd -> stream
        self.master = -1  # pty master (terminal): output stream 1 and stdin
        self.stdin_fd = -1
        self.stdin_buf = bytearray()
        self.stdin_eof = False  # close once the buffer is written
        self.exit_code: int | None = None
        self.deadline: float | None = None  # when to stop waiting for the pipes after the exit


# --- the agent -----------------------------------------------------------------------------------
class Agent:
    def __init__(self, channel: Channel, state_dir: str, *, pid1: bool, grace: float = DEFAULT_GRACE) -> None:
        from cocon.runtime.container import Runtime

        self.channel = channel
        self.state_dir = state_dir
        self.bundles = os.path.join(state_dir, "bundles")
        self.runtime = Runtime(os.path.join(state_dir, "runtime"))
        self.pid1 = pid1
        self.grace = grace
        self.decoder = Decoder()
        self.sel = selectors.DefaultSelector()
        self.registered: dict[int, int] = {}  # fd -> events in the selector
        self.procs: dict[int, Proc] = {}
        self.by_pid: dict[int, Proc] = {}
        self.by_fd: dict[int, Proc] = {}
        self.containers: set[str] = set()
        self.running = True
        self.power_off = False
        self.next_reconnect_check = 0.0
        self.wake_r, self.wake_w = socket.socketpair()
        self.wake_r.setblocking(False)
        self.wake_w.setblocking(False)
        self.stopping_signal = 0
        self.ops: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
            "hello": self.op_hello,
            "mount": self.op_mount,
            "create": self.op_create,
            "start": self.op_start,
            "exec": self.op_exec,
            "signal": self.op_signal,
            "resize": self.op_resize,
            "stats": self.op_stats,
            "ps": self.op_ps,
            "reseed": self.op_reseed,
            "set_clock": self.op_set_clock,
            "set_hostname": self.op_set_hostname,
            "network": self.op_network,
            "delete": self.op_delete,
            "shutdown": self.op_shutdown,
        }

    # -- set-up ---------------------------------------------------------------------------------
    def install_signals(self) -> None:
        signal.set_wakeup_fd(self.wake_w.fileno(), warn_on_full_buffer=False)
        signal.signal(signal.SIGCHLD, lambda _s, _f: None)  # the wake-up fd does the work
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_stop_signal)
        if not self.pid1:
            from cocon import _linux as L

            L.prctl(L.PR_SET_CHILD_SUBREAPER, 1)  # containers' inits are reparented to us

    def _on_stop_signal(self, sig: int, _frame: object) -> None:
        self.stopping_signal = sig
        self.running = False

    # -- the loop -------------------------------------------------------------------------------
    def run(self) -> int:
        self.install_signals()
        self._watch(self.wake_r.fileno())
        preload()
        print(READY_LINE, flush=True)
        try:
            while self.running:
                self._sync_channel()
                self._sync_processes()
                timeout = self._timeout()
                for key, events in self.sel.select(timeout):
                    self._dispatch(int(key.fd), events)
                    if not self.running:
                        break
                self._expire_deadlines()
                self.channel.flush()
        finally:
            self._teardown()
        return 0

    def _timeout(self) -> float | None:
        deadlines = [p.deadline for p in self.procs.values() if p.deadline is not None]
        if not self.channel.connected:
            deadlines.append(self.next_reconnect_check)
        if not deadlines:
            return None
        return max(0.0, min(deadlines) - time.monotonic())

    def _watch(self, fd: int, events: int = selectors.EVENT_READ) -> None:
        current = self.registered.get(fd, 0)
        if events == current:
            return
        if not events:
            self.sel.unregister(fd)
            del self.registered[fd]
        elif current:
            self.sel.modify(fd, events)
            self.registered[fd] = events
        else:
            self.sel.register(fd, events)
            self.registered[fd] = events

    def _sync_channel(self) -> None:
        ch = self.channel
        if not ch.connected:
            self._watch(ch.fd, 0)
            if time.monotonic() >= self.next_reconnect_check:
                self._check_reconnect()
            return
        self._watch(ch.fd, selectors.EVENT_READ | (selectors.EVENT_WRITE if ch.queue else 0))

    def _check_reconnect(self) -> None:
        """A virtio-serial port with no host polls as hung up; it is back when that clears."""
        import select

        poller = select.poll()
        poller.register(self.channel.fd, select.POLLIN | select.POLLOUT)
        events = dict(poller.poll(0)).get(self.channel.fd, 0)
        if events and not events & select.POLLHUP:
            self.channel.connected = True
            self.decoder.reset()
            log("host connected")
        else:
            self.next_reconnect_check = time.monotonic() + RECONNECT_POLL

    def _sync_processes(self) -> None:
        throttle = self.channel.queued > OUTPUT_HIGH_WATER
        for proc in self.procs.values():
            for fd in proc.outputs:
                events = 0 if throttle else selectors.EVENT_READ
                if fd == proc.stdin_fd and (proc.stdin_buf or proc.stdin_eof):
                    events |= selectors.EVENT_WRITE
                self._watch(fd, events)
            if proc.stdin_fd >= 0 and proc.stdin_fd not in proc.outputs:
                self._watch(proc.stdin_fd, selectors.EVENT_WRITE if proc.stdin_buf or proc.stdin_eof else 0)

    def _dispatch(self, fd: int, events: int) -> None:
        if fd == self.wake_r.fileno():
            self._on_wake()
        elif fd == self.channel.fd:
            if events & selectors.EVENT_WRITE:
                self.channel.flush()
            if events & selectors.EVENT_READ:
                self._read_channel()
        elif fd in self.by_fd:
            proc = self.by_fd[fd]
            if events & selectors.EVENT_WRITE:
                self._write_stdin(proc)
            if events & selectors.EVENT_READ and fd in proc.outputs:
                self._read_output(proc, fd)

    # -- the host's frames ----------------------------------------------------------------------
    def _read_channel(self) -> None:
        try:
            data = os.read(self.channel.fd, READ_CHUNK)
        except BlockingIOError:
            return
        except OSError as exc:
            if exc.errno not in (errno.ECONNRESET, errno.EIO, errno.ENODEV):
                raise
            data = b""
        if not data:
            if self.channel.is_port:
                log("host disconnected; output is kept until it reconnects")
                self.channel.disconnected()
                self._watch(self.channel.fd, 0)
                self.next_reconnect_check = time.monotonic() + RECONNECT_POLL
            else:
                log("channel closed; deleting containers and exiting")
                self.running = False
            return
        frames, errors = self.decoder.feed_collect(data)
        for err in errors:
            self._event("error", error=str(err))
        if self.decoder.broken:
            self.decoder.reset()
        for frame in frames:
            self._on_frame(frame)

    def _on_frame(self, frame: Frame) -> None:
        if frame.kind == CONTROL:
            try:
                req = frame.control()
            except ProtocolError as exc:
                self._reply(error_reply(None, f"{exc}; send one JSON object per CONTROL frame"))
                return
            self._on_request(req)
            return
        proc = self.procs.get(frame.process)
        if frame.stream != STDIN:
            self._event("error", error=f"the host may only send stdin (stream 0), not stream {frame.stream}")
            return
        if proc is None or proc.stdin_fd < 0 or proc.stdin_eof:
            return  # stdin of a process that is gone, or without stdin: dropped
        if frame.kind == DATA:
            proc.stdin_buf += frame.payload
            self._write_stdin(proc)
        elif frame.kind == EOF:
            proc.stdin_eof = True
            self._write_stdin(proc)

    def _on_request(self, req: dict[str, Any]) -> None:
        rid = req.get("id")
        if not isinstance(rid, int) or isinstance(rid, bool):
            message = 'request without an integer "id": send {"id": N, "op": ...}'
            self._reply(error_reply(rid if isinstance(rid, (str, int)) else None, message))
            return
        op = req.get("op")
        handler = self.ops.get(op) if isinstance(op, str) else None
        if handler is None:
            self._reply(error_reply(rid, f"unknown op {op!r}: use one of {', '.join(sorted(self.ops))}"))
            return
        try:
            result = handler(req)
        except RequestError as exc:
            self._reply(error_reply(rid, str(exc), exc.exit_code))
            return
        except Exception as exc:  # a bad request must never end the agent
            from cocon.runtime.errors import RuntimeFailure

            if isinstance(exc, RuntimeFailure):
                message = str(exc)
            else:
                message = f"{op} failed: {type(exc).__name__}: {exc}"
            self._reply(error_reply(rid, message, EXIT_OTHER))
            return
        self._reply(ok_reply(rid, **result))
        if op == "shutdown":
            self.power_off = True
            self.running = False

    def _reply(self, message: dict[str, Any]) -> None:
        self.channel.send(encode_control(message))
        self.channel.flush()

    def _event(self, name: str, **fields: Any) -> None:
        self.channel.send(encode_control({"event": name, **fields}))

    # -- process output, stdin, exits -----------------------------------------------------------
    def _read_output(self, proc: Proc, fd: int) -> None:
        try:
            data = os.read(fd, READ_CHUNK)
        except BlockingIOError:
            return
        except OSError as exc:
            if exc.errno != errno.EIO:  # EIO: a pty whose other side is closed
                raise
            data = b""
        if fd not in proc.outputs:
            return
        stream = proc.outputs[fd]
        if data:
            self.channel.send(encode_data(proc.number, stream, data))
            return
        self._close_output(proc, fd)
        self._maybe_finish(proc)

    def _close_output(self, proc: Proc, fd: int) -> None:
        stream = proc.outputs.pop(fd)
        self.channel.send(encode_eof(proc.number, stream))
        self._forget_fd(fd)
        if fd == proc.master:
            proc.master = -1
            if proc.stdin_fd == fd:
                proc.stdin_fd = -1
                proc.stdin_buf.clear()
        os.close(fd)

    def _forget_fd(self, fd: int) -> None:
        self.by_fd.pop(fd, None)
        if fd in self.registered:
            self._watch(fd, 0)

    def _write_stdin(self, proc: Proc) -> None:
        fd = proc.stdin_fd
        if fd < 0:
            proc.stdin_buf.clear()
            return
        while proc.stdin_buf:
            try:
                n = os.write(fd, proc.stdin_buf)
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno not in (errno.EPIPE, errno.EIO):
                    raise
                proc.stdin_buf.clear()  # the reader is gone
                break
            del proc.stdin_buf[:n]
        if proc.stdin_eof:
            proc.stdin_eof = False
            proc.stdin_fd = -1
            if fd == proc.master:
                try:
                    os.write(fd, b"\x04")  # end of input on a terminal: ^D, as docker does
                except OSError:
                    pass
            else:
                self._forget_fd(fd)
                os.close(fd)

    def _on_wake(self) -> None:
        try:
            while self.wake_r.recv(4096):
                pass
        except BlockingIOError:
            pass
        self._reap()

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            proc = self.by_pid.pop(pid, None)
            if proc is None:
                continue  # an orphan, or a runtime helper: reaped and forgotten
            proc.exit_code = os.waitstatus_to_exitcode(status)
            if proc.exit_code < 0:
                proc.exit_code = 128 - proc.exit_code
            self._after_exit(proc)

    def _after_exit(self, proc: Proc) -> None:
        if proc.outputs:
            proc.deadline = time.monotonic() + self.grace
            self._drain_outputs(proc)
        self._maybe_finish(proc)

    def _drain_outputs(self, proc: Proc) -> None:
        """Read what is left in the process's pipes now (its exit may come before its last bytes)."""
        for fd in list(proc.outputs):
            while fd in proc.outputs:
                try:
                    data = os.read(fd, READ_CHUNK)
                except BlockingIOError:
                    break
                except OSError:
                    data = b""
                if data:
                    self.channel.send(encode_data(proc.number, proc.outputs[fd], data))
                else:
                    self._close_output(proc, fd)

    def _expire_deadlines(self) -> None:
        now = time.monotonic()
        for proc in list(self.procs.values()):
            if proc.deadline is not None and now >= proc.deadline:
                # Something else (a background child) holds the pipes open: stop waiting for them.
                self._drain_outputs(proc)
                for fd in list(proc.outputs):
                    self._close_output(proc, fd)
                self._maybe_finish(proc)

    def _maybe_finish(self, proc: Proc) -> None:
        if proc.exit_code is None or proc.outputs:
            return
        if proc.stdin_fd >= 0 and proc.stdin_fd != proc.master:
            self._forget_fd(proc.stdin_fd)
            os.close(proc.stdin_fd)
        proc.stdin_fd = -1
        self.procs.pop(proc.number, None)
        self._event("exit", process_number=proc.number, exit_code=proc.exit_code)
        self.channel.flush()

    def _register(self, proc: Proc) -> None:
        self.procs[proc.number] = proc
        self.by_pid[proc.pid] = proc
        for fd in proc.outputs:
            os.set_blocking(fd, False)
            self.by_fd[fd] = proc
        if proc.stdin_fd >= 0:
            os.set_blocking(proc.stdin_fd, False)
            self.by_fd[proc.stdin_fd] = proc

    # -- spawning with the runtime --------------------------------------------------------------
    def _spawn(
        self, number: int, container_id: str, terminal: bool, stdin: bool, *, is_init: bool,
        start: Callable[[], tuple[int, int]],
    ) -> Proc:  # fmt: skip
        """Run `start()` (the runtime's create or exec, returning (pid, pty master)) with the new
        process's stdio as our fds 0-2, which it inherits; register the process."""
        parent_fds: list[int] = []  # our ends
        child_fds: list[int] = []  # its ends (closed here after the spawn)
        null = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
        child_fds.append(null)
        stdio = [null, null, null]
        out_r = err_r = in_w = -1
        if not terminal:
            out_r, out_w = os.pipe()
            err_r, err_w = os.pipe()
            parent_fds += [out_r, err_r]
            child_fds += [out_w, err_w]
            stdio[1], stdio[2] = out_w, err_w
            if stdin:
                in_r, in_w = os.pipe()
                parent_fds.append(in_w)
                child_fds.append(in_r)
                stdio[0] = in_r
        saved = [os.dup(i) for i in range(3)]
        # The new process inherits our signal handlers until it resets them right before execve:
        # signals stay blocked (pending) until then, so a signal sent as soon as the host knows the
        # pid is neither lost nor taken by the agent's handlers. The runtime unblocks them.
        old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, _BLOCKED_WHILE_SPAWNING)
        try:
            for i, fd in enumerate(stdio):
                os.dup2(fd, i)
            pid, master = start()
        except BaseException:
            for fd in parent_fds:
                os.close(fd)
            raise
        finally:
            for i, fd in enumerate(saved):
                os.dup2(fd, i)
                os.close(fd)
            for fd in child_fds:
                os.close(fd)
            signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
        proc = Proc(number, container_id, pid, is_init=is_init, terminal=terminal)
        if terminal:
            proc.master = master
            proc.outputs[master] = STDOUT
            proc.stdin_fd = master if stdin else -1
        else:
            if master >= 0:
                os.close(master)
            proc.outputs[out_r] = STDOUT
            proc.outputs[err_r] = STDERR
            proc.stdin_fd = in_w
        self._register(proc)
        return proc

    def _new_number(self, req: dict[str, Any], default: int | None) -> int:
        number = _int_arg(req, "process_number", 0, (1 << 32) - 1, default if default is not None else ...)
        if req["op"] == "exec" and number == 0:
            raise RequestError("exec: process_number must be > 0 (0 is the container's init)")
        if number in self.procs:
            raise RequestError(
                f"{req['op']}: process number {number} is in use; wait for its exit event or pick another"
            )
        return number

    # -- ops ------------------------------------------------------------------------------------
    def op_hello(self, req: dict[str, Any]) -> dict[str, Any]:
        version = _arg(req, "version", int)
        if version != PROTOCOL_VERSION:
            raise RequestError(
                f"hello: the host speaks agent protocol version {version}, this agent speaks "
                f"{PROTOCOL_VERSION}; use a guest image built from the same cocon version as the host"
            )
        return {"version": PROTOCOL_VERSION, "kernel": os.uname().release, "pid": os.getpid()}

    def op_mount(self, req: dict[str, Any]) -> dict[str, Any]:
        from cocon import _linux as L

        source: str = _arg(req, "source", str)
        target: str = _arg(req, "target", str)
        fstype: str = _arg(req, "fstype", str)
        options = _arg(req, "options", (str, list), "")
        if not os.path.isabs(target):
            raise RequestError(f"mount: target {target!r} must be an absolute path")
        opts = options.split(",") if isinstance(options, str) else list(options)
        if not all(isinstance(o, str) for o in opts):
            raise RequestError("mount: options must be a string or a list of strings")
        flags, data = _mount_options([o for o in opts if o])
        os.makedirs(target, exist_ok=True)
        try:
            L.mount(source, target, fstype, flags, ",".join(data) or None)
        except OSError as exc:
            raise RequestError(
                f"mount {source} ({fstype}) on {target} failed: {exc.strerror}; check the source, the "
                "file system type and its options (is the module loaded?)"
            ) from None
        return {}

    def _store_seccomp(self, config: bytes, program_b64: str) -> None:
        """Put the seccomp program the host compiled for this config into the runtime's cache, so the
        guest does not run libseccomp's compiler (slow under emulation). A config the runtime will
        refuse anyway is left to it."""
        from cocon.oci.errors import OCIError
        from cocon.oci.runtime_spec import parse_config
        from cocon.runtime.container import SECCOMP_CACHE
        from cocon.runtime.errors import SeccompError
        from cocon.runtime.seccomp_bpf import store

        try:
            program = base64.b64decode(program_b64, validate=True)
        except ValueError:
            raise RequestError("create: seccomp_program must be base64") from None
        try:
            spec = parse_config(config, "create.config")
        except OCIError:
            return
        if spec.linux is None or spec.linux.seccomp is None:
            return
        try:
            store(spec.linux.seccomp, os.path.join(self.runtime.root, SECCOMP_CACHE), program)
        except SeccompError as exc:
            raise RequestError(f"create: seccomp_program: {exc}") from None

    def op_create(self, req: dict[str, Any]) -> dict[str, Any]:
        cid = _container_id(req)
        config: dict[str, Any] = _arg(req, "config", dict)
        terminal: bool = _arg(req, "terminal", bool, False)
        stdin: bool = _arg(req, "stdin", bool, False)
        number = self._new_number(req, 0)
        process = config.get("process")
        if not isinstance(process, dict):
            raise RequestError("create: config.process must be an object (the container's process)")
        root = config.get("root")
        if (
            not isinstance(root, dict)
            or not isinstance(root.get("path"), str)
            or not root["path"].startswith("/")
        ):
            raise RequestError("create: config.root.path must be an absolute path in the guest")
        if cid in self.containers or os.path.exists(os.path.join(self.runtime.root, cid)):
            raise RequestError(
                f"create: container {cid!r} exists already; delete it first or pick another id"
            )
        config = dict(config, process=dict(process, terminal=terminal))
        bundle = os.path.join(self.bundles, cid)
        os.makedirs(self.bundles, mode=0o700, exist_ok=True)
        try:
            os.mkdir(bundle, 0o700)
        except FileExistsError:
            shutil.rmtree(bundle, ignore_errors=True)
            os.mkdir(bundle, 0o700)
        try:
            with open(os.path.join(bundle, "config.json"), "wb") as f:
                f.write(json.dumps(config).encode())
            program = _arg(req, "seccomp_program", str, None)
            if program is not None:
                self._store_seccomp(json.dumps(config).encode(), program)

            def start() -> tuple[int, int]:
                state, master = self.runtime.create(cid, bundle, foreground=True)
                return state.pid, master

            proc = self._spawn(number, cid, terminal, stdin, is_init=True, start=start)
        except BaseException as exc:
            shutil.rmtree(bundle, ignore_errors=True)
            if isinstance(exc, Exception):
                raise self._spawn_error("create", exc) from None
            raise
        self.containers.add(cid)
        return {"pid": proc.pid}

    @staticmethod
    def _spawn_error(op: str, exc: Exception) -> Exception:
        from cocon.oci.errors import ConfigError
        from cocon.runtime.errors import RuntimeFailure

        if isinstance(exc, (RuntimeFailure, ConfigError)):
            message = str(exc)
            return RequestError(f"{op}: {message}", exit_code_for(message))
        return exc

    def op_start(self, req: dict[str, Any]) -> dict[str, Any]:
        cid = _container_id(req)
        self.runtime.start(cid)
        return {}

    def op_exec(self, req: dict[str, Any]) -> dict[str, Any]:
        from cocon.oci.jsonobj import DecodeError, decode
        from cocon.oci.runtime_spec import Process, validate_process
        from cocon.runtime.cgroups import start_attach_warm_up

        cid = _container_id(req)
        number = self._new_number(req, None)
        process: dict[str, Any] = _arg(req, "process", dict)
        terminal: bool = _arg(req, "terminal", bool, False)
        stdin: bool = _arg(req, "stdin", bool, False)
        try:
            proc_spec = decode(json.dumps(dict(process, terminal=terminal)), Process)
            validate_process(proc_spec, "exec process")
        except DecodeError as exc:
            raise RequestError(f"exec: invalid process object: {exc}") from None
        except Exception as exc:
            raise self._spawn_error("exec", exc) from None
        if not proc_spec.args:
            raise RequestError(
                "exec: process.args must name a program", exit_code_for("executable file not found")
            )

        def start() -> tuple[int, int]:
            warmed = start_attach_warm_up()
            try:
                # Runtime.exec's machinery without its wait: the agent's loop relays and reaps.
                return self.runtime._exec(cid, proc_spec, warmed, detach=False, pid_file=None,
                                          console_socket=None, preserve_fds=0)  # fmt: skip
            finally:
                warmed()

        try:
            proc = self._spawn(number, cid, terminal, stdin, is_init=False, start=start)
        except Exception as exc:
            raise self._spawn_error("exec", exc) from None
        return {"pid": proc.pid}

    def op_signal(self, req: dict[str, Any]) -> dict[str, Any]:
        from cocon.runtime.container import parse_signal

        number = _int_arg(req, "process_number", 0, (1 << 32) - 1)
        value = _arg(req, "signal", (int, str))
        sig = parse_signal(str(value))
        proc = self.procs.get(number)
        if proc is None or proc.exit_code is not None:
            raise RequestError(f"signal: no running process number {number}")
        if proc.is_init:
            self.runtime.kill(proc.container_id, sig)
        else:
            try:
                os.kill(proc.pid, sig)
            except ProcessLookupError:
                raise RequestError(f"signal: process number {number} has exited") from None
        return {}

    def op_resize(self, req: dict[str, Any]) -> dict[str, Any]:
        from cocon.runtime.console import set_size

        number = _int_arg(req, "process_number", 0, (1 << 32) - 1)
        rows = _int_arg(req, "rows", 1, 65535)
        cols = _int_arg(req, "cols", 1, 65535)
        proc = self.procs.get(number)
        if proc is None or proc.master < 0:
            raise RequestError(f"resize: process number {number} has no terminal (or has exited)")
        set_size(proc.master, rows, cols)
        return {}

    def op_stats(self, req: dict[str, Any]) -> dict[str, Any]:
        from cocon.runtime.cgroups import cgroup_from_state
        from cocon.runtime.state import StateDir

        cid = _container_id(req)
        state = StateDir(self.runtime.root, cid).load()
        st = cgroup_from_state(state.cgroup).stats() if state.cgroup else None
        meminfo = _meminfo()
        return {
            "memory_current": st.memory_usage if st else None,
            "memory_max": st.memory_limit if st else None,
            "cpu_usage_usec": st.cpu_usage_ns // 1000 if st and st.cpu_usage_ns is not None else None,
            "pids_current": st.pids_current if st else None,
            "pids_max": st.pids_limit if st else None,
            "mem_total": meminfo.get("MemTotal"),
            "mem_available": meminfo.get("MemAvailable"),
        }

    def op_ps(self, req: dict[str, Any]) -> dict[str, Any]:
        """The container's processes as `ps -ef` shows them (the guest's pids), for `cocon top`."""
        cid = _container_id(req)
        rows = [row for pid in sorted(self.runtime.pids(cid)) if (row := _ps_row(pid)) is not None]
        return {"titles": ["UID", "PID", "PPID", "C", "STIME", "TTY", "TIME", "CMD"], "processes": rows}

    def op_reseed(self, req: dict[str, Any]) -> dict[str, Any]:
        text: str = _arg(req, "entropy", str)
        try:
            entropy = base64.b64decode(text, validate=True)
        except ValueError:
            raise RequestError("reseed: entropy must be base64") from None
        if not 16 <= len(entropy) <= 4096:
            raise RequestError(f"reseed: give 16 to 4096 bytes of entropy, not {len(entropy)}")
        fd = os.open("/dev/urandom", os.O_WRONLY | os.O_CLOEXEC)
        try:
            fcntl.ioctl(fd, RNDADDENTROPY, struct.pack("ii", len(entropy) * 8, len(entropy)) + entropy)
            fcntl.ioctl(fd, RNDRESEEDCRNG)
        except OSError as exc:
            raise RequestError(
                f"reseed: the kernel refused the entropy: {exc.strerror} (needs CAP_SYS_ADMIN)"
            ) from None
        finally:
            os.close(fd)
        return {"bytes": len(entropy)}

    def op_set_clock(self, req: dict[str, Any]) -> dict[str, Any]:
        unix_ns = _int_arg(req, "unix_ns", 1, (1 << 63) - 1)
        try:
            time.clock_settime_ns(time.CLOCK_REALTIME, unix_ns)
        except OSError as exc:
            raise RequestError(f"set_clock: cannot set the clock: {exc.strerror}") from None
        return {}

    def op_set_hostname(self, req: dict[str, Any]) -> dict[str, Any]:
        name: str = _arg(req, "hostname", str)
        if not 0 < len(name.encode()) <= 64 or any(c in name for c in "\0/ \n"):
            raise RequestError(f"set_hostname: {name!r} is not a valid host name (1-64 bytes, no spaces)")
        socket.sethostname(name)
        return {}

    def op_network(self, req: dict[str, Any]) -> dict[str, Any]:
        mac: str = _arg(req, "mac", str)
        mtu = _int_arg(req, "mtu", 68, 65535, 1500)
        addresses: list[Any] = _arg(req, "addresses", list, [])
        routes: list[Any] = _arg(req, "routes", list, [])
        parsed_addrs = [_parse_cidr(a) for a in addresses]
        parsed_routes: list[tuple[int, bytes, int, bytes]] = []
        for r in routes:
            if not isinstance(r, dict) or not isinstance(r.get("gateway"), str):
                raise RequestError('network: each route must be {"destination": ..., "gateway": "<ip>"}')
            dest = r.get("destination", "default")
            family, dst, dst_len = (0, b"", 0) if dest == "default" else _parse_cidr(dest)
            gw_family, gw, _ = _parse_cidr(r["gateway"])
            if family and family != gw_family:
                raise RequestError(f"network: route {r}: destination and gateway are of different families")
            parsed_routes.append((gw_family, dst, dst_len, gw))
        name = _interface_by_mac(mac)
        interface = _arg(req, "interface", str, None)
        if name is None and interface is not None:
            # a VM restored from a template has the template's MAC: the interface takes this one
            if interface not in {n for _, n in socket.if_nameindex()}:
                raise RequestError(f"network: no interface {interface} in the guest")
            _set_mac(interface, mac)
            name = interface
        if name is None:
            raise RequestError(f"network: no interface with MAC {mac}; check the -device virtio-net mac=")
        index = socket.if_nametoindex(name)
        with _Netlink() as nl:
            nl.link_up(socket.if_nametoindex("lo"))
            nl.link_up(index, mtu)
            for family, addr, prefix in parsed_addrs:
                nl.add_address(index, family, addr, prefix)
            for family, dst, dst_len, gw in parsed_routes:
                nl.add_route(index, family, dst, dst_len, gw)
        return {"interface": name}

    def op_delete(self, req: dict[str, Any]) -> dict[str, Any]:
        cid = _container_id(req)
        self._delete(cid)
        return {}

    def _delete(self, cid: str) -> None:
        # Exec'd processes are our children: a dying container init waits for them to be reaped,
        # and the runtime's delete waits for the init, so they go first.
        for proc in list(self.procs.values()):
            if proc.container_id == cid and not proc.is_init and proc.exit_code is None:
                try:
                    os.kill(proc.pid, signal.SIGKILL)
                    _, status = os.waitpid(proc.pid, 0)
                except (ProcessLookupError, ChildProcessError):
                    status = signal.SIGKILL
                self.by_pid.pop(proc.pid, None)
                code = os.waitstatus_to_exitcode(status)
                proc.exit_code = 128 - code if code < 0 else code
                self._after_exit(proc)
        self.runtime.delete(cid, force=True)
        self.containers.discard(cid)
        shutil.rmtree(os.path.join(self.bundles, cid), ignore_errors=True)
        # The runtime may have reaped the init itself (delete kills and waits): its exit is SIGKILL.
        for proc in list(self.procs.values()):
            if proc.container_id != cid or proc.exit_code is not None:
                continue
            try:
                pid, status = os.waitpid(proc.pid, os.WNOHANG)
            except ChildProcessError:
                pid, status = proc.pid, 9  # gone: killed by the delete
            if pid:
                self.by_pid.pop(proc.pid, None)
                code = os.waitstatus_to_exitcode(status)
                proc.exit_code = 128 - code if code < 0 else code
                self._after_exit(proc)

    def op_shutdown(self, req: dict[str, Any]) -> dict[str, Any]:
        return {}

    # -- tear-down ------------------------------------------------------------------------------
    def _teardown(self) -> None:
        for cid in sorted(self.containers):
            try:
                self._delete(cid)
            except Exception as exc:  # best effort on the way out
                log(f"delete {cid}: {exc}")
        if self.channel.connected:
            try:
                self.channel.drain(2.0)
            except OSError:
                pass
        os.sync()
        if self.pid1 and (self.power_off or self.stopping_signal):
            log("powering off")
            _power_off()


# --- network set-up (rtnetlink, no tools needed in the guest) ----------------------------------------
def _parse_cidr(text: Any) -> tuple[int, bytes, int]:
    """ "10.0.0.2/24", "fd00::2/64" or a bare address -> (family, packed address, prefix length)."""
    if not isinstance(text, str):
        raise RequestError(f"network: address {text!r} must be a string like 10.0.0.2/24")
    addr, _, prefix = text.partition("/")
    for family, bits in ((socket.AF_INET, 32), (socket.AF_INET6, 128)):
        try:
            packed = socket.inet_pton(family, addr)
        except OSError:
            continue
        if prefix and not (prefix.isdigit() and 0 <= int(prefix) <= bits):
            break
        return family, packed, int(prefix) if prefix else bits
    raise RequestError(f"network: {text!r} is not an IP address with an optional /prefix")


def _ps_row(pid: int) -> list[str] | None:
    """One `ps -ef` line of a guest process (None when it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
        uid = os.stat(f"/proc/{pid}").st_uid
    except (OSError, IndexError):
        return None
    ticks = os.sysconf("SC_CLK_TCK")
    cpu = (int(fields[11]) + int(fields[12])) // ticks
    with open("/proc/uptime") as f:
        uptime = float(f.read().split()[0])
    started = time.time() - uptime + int(fields[19]) / ticks
    cmd = " ".join(argv) or f"[{fields[0]}]"
    return [str(uid), str(pid), fields[1], "0", time.strftime("%H:%M", time.localtime(started)), "?",
            f"{cpu // 3600:02d}:{cpu // 60 % 60:02d}:{cpu % 60:02d}", cmd]  # fmt: skip


def _set_mac(name: str, mac: str) -> None:
    """Give interface `name` (down) the hardware address `mac` (SIOCSIFHWADDR)."""
    siocsifhwaddr = 0x8924
    try:
        raw = bytes(int(part, 16) for part in mac.split(":"))
    except ValueError:
        raise RequestError(f"network: {mac!r} is not a MAC address (use xx:xx:xx:xx:xx:xx)") from None
    if len(raw) != 6:
        raise RequestError(f"network: {mac!r} is not a MAC address (use xx:xx:xx:xx:xx:xx)")
    ifreq = struct.pack("16sH6s8x", name.encode(), 1, raw)  # ARPHRD_ETHER
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        try:
            fcntl.ioctl(sock.fileno(), siocsifhwaddr, ifreq)
        except OSError as exc:
            raise RequestError(f"network: cannot set the MAC of {name}: {exc.strerror}") from None


def _interface_by_mac(mac: str) -> str | None:
    """The interface (of our network namespace) with this hardware address."""
    siocgifhwaddr = 0x8927
    wanted = mac.lower()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        for _, name in socket.if_nameindex():
            try:
                ifreq = fcntl.ioctl(sock.fileno(), siocgifhwaddr, struct.pack("16s16x", name.encode()))
            except OSError:
                continue
            if ":".join(f"{b:02x}" for b in ifreq[18:24]) == wanted:
                return name
    return None


class _Netlink:
    """Just enough rtnetlink: links up (with an MTU), addresses, routes; each request acknowledged."""

    NLMSG_ERROR = 2
    RTM_NEWLINK, RTM_NEWADDR, RTM_NEWROUTE = 16, 20, 24
    F_REQUEST, F_ACK, F_REPLACE, F_CREATE = 0x1, 0x4, 0x100, 0x400
    IFF_UP = 0x1
    IFLA_MTU = 4
    IFA_ADDRESS, IFA_LOCAL, IFA_FLAGS = 1, 2, 8
    IFA_F_NODAD = 0x02
    RTA_OIF, RTA_GATEWAY = 4, 5

    def __init__(self) -> None:
        self.sock = socket.socket(
            socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, 0
        )  # NETLINK_ROUTE
        self.seq = 0

    def __enter__(self) -> _Netlink:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.sock.close()

    @staticmethod
    def _attr(kind: int, data: bytes) -> bytes:
        raw = struct.pack("=HH", 4 + len(data), kind) + data
        return raw + b"\0" * (-len(raw) % 4)

    def _request(self, msg_type: int, flags: int, body: bytes, what: str) -> None:
        self.seq += 1
        msg = struct.pack(
            "=IHHII", 16 + len(body), msg_type, self.F_REQUEST | self.F_ACK | flags, self.seq, 0
        )
        self.sock.send(msg + body)
        while True:
            data = self.sock.recv(65536)
            offset = 0
            while offset + 16 <= len(data):
                length, kind, _, seq, _ = struct.unpack_from("=IHHII", data, offset)
                if kind == self.NLMSG_ERROR and seq == self.seq:
                    (error,) = struct.unpack_from("=i", data, offset + 16)
                    if error:
                        raise RequestError(f"network: {what}: {os.strerror(-error)}")
                    return
                offset += max(length, 16) + (-length % 4)

    def link_up(self, index: int, mtu: int | None = None) -> None:
        body = struct.pack("=BxHiII", socket.AF_UNSPEC, 0, index, self.IFF_UP, self.IFF_UP)
        if mtu is not None:
            body += self._attr(self.IFLA_MTU, struct.pack("=I", mtu))
        self._request(self.RTM_NEWLINK, 0, body, f"cannot bring interface {index} up")

    def add_address(self, index: int, family: int, addr: bytes, prefix: int) -> None:
        body = struct.pack("=BBBBI", family, prefix, 0, 0, index)
        body += self._attr(self.IFA_LOCAL, addr) + self._attr(self.IFA_ADDRESS, addr)
        if family == socket.AF_INET6:
            body += self._attr(self.IFA_FLAGS, struct.pack("=I", self.IFA_F_NODAD))
        text = f"{socket.inet_ntop(family, addr)}/{prefix}"
        self._request(self.RTM_NEWADDR, self.F_CREATE | self.F_REPLACE, body, f"cannot add address {text}")

    def add_route(self, index: int, family: int, dst: bytes, dst_len: int, gateway: bytes) -> None:
        # rtmsg: family, dst_len, src_len, tos, table main, protocol boot, scope universe, unicast, flags
        body = struct.pack("=BBBBBBBBI", family, dst_len, 0, 0, 254, 3, 0, 1, 0)
        if dst_len:
            body += self._attr(1, dst)  # RTA_DST
        body += self._attr(self.RTA_GATEWAY, gateway) + self._attr(self.RTA_OIF, struct.pack("=i", index))
        text = f"route via {socket.inet_ntop(family, gateway)}"
        self._request(self.RTM_NEWROUTE, self.F_CREATE | self.F_REPLACE, body, f"cannot add {text}")


def _mount_options(options: list[str]) -> tuple[int, list[str]]:
    from cocon import _linux as L

    known = {"ro": L.MS_RDONLY, "nosuid": L.MS_NOSUID, "nodev": L.MS_NODEV, "noexec": L.MS_NOEXEC,
             "noatime": L.MS_NOATIME, "nodiratime": L.MS_NODIRATIME, "relatime": L.MS_RELATIME,
             "strictatime": L.MS_STRICTATIME, "sync": L.MS_SYNCHRONOUS, "bind": L.MS_BIND,
             "rbind": L.MS_BIND | L.MS_REC}  # fmt: skip
    flags = 0
    data: list[str] = []
    for o in options:
        if o in known:
            flags |= known[o]
        elif o != "rw":
            data.append(o)
    return flags, data


def _meminfo() -> dict[str, int]:
    out: dict[str, int] = {}
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                key, _, rest = line.partition(":")
                parts = rest.split()
                if parts and parts[0].isdigit():
                    out[key] = int(parts[0]) * (1024 if parts[1:] == ["kB"] else 1)
    except OSError:
        pass
    return out


def _power_off() -> None:
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.reboot(RB_POWER_OFF)
    log(f"reboot(RB_POWER_OFF) failed: {os.strerror(ctypes.get_errno())}")


# --- PID 1 set-up --------------------------------------------------------------------------------
def _mounted() -> set[str]:
    try:
        with open("/proc/self/mountinfo") as f:
            return {line.split()[4] for line in f}
    except OSError:
        return set()


def preload() -> None:
    """Import what `create` and `exec` need before saying ready: a VM restored from a template (saved
    right after the ready line) then has them in memory instead of importing them under emulation."""
    import importlib

    from cocon.runtime.cli import _CREATE_MODULES

    for name in (*_CREATE_MODULES, "cocon.oci.jsonobj", "cocon.runtime.console", "cocon.runtime.errors"):
        importlib.import_module(name)
    try:
        import seccomp  # noqa: F401  # libseccomp's bindings (compiling a profile not in the BPF cache)
    except ImportError:
        pass


def prepare_pid1() -> None:
    """What a guest's PID 1 needs before containers: /proc, /sys, /dev (+ pts, shm, mqueue), /run,
    and cgroup2 with the cpu, memory and pids controllers enabled for children."""
    from cocon import _linux as L

    wanted = [
        ("proc", "/proc", "proc", L.MS_NOSUID | L.MS_NODEV | L.MS_NOEXEC, None),
        ("sysfs", "/sys", "sysfs", L.MS_NOSUID | L.MS_NODEV | L.MS_NOEXEC, None),
        ("devtmpfs", "/dev", "devtmpfs", L.MS_NOSUID, "mode=0755"),
        ("devpts", "/dev/pts", "devpts", L.MS_NOSUID | L.MS_NOEXEC, "gid=5,mode=0620,ptmxmode=0666"),
        ("shm", "/dev/shm", "tmpfs", L.MS_NOSUID | L.MS_NODEV, "mode=1777"),
        ("mqueue", "/dev/mqueue", "mqueue", L.MS_NOSUID | L.MS_NODEV | L.MS_NOEXEC, None),
        ("tmpfs", "/run", "tmpfs", L.MS_NOSUID | L.MS_NODEV, "mode=0755"),
        ("cgroup2", "/sys/fs/cgroup", "cgroup2", L.MS_NOSUID | L.MS_NODEV | L.MS_NOEXEC, None),
    ]
    for source, target, fstype, flags, data in wanted:
        if target in _mounted():
            continue
        try:
            os.makedirs(target, exist_ok=True)
            L.mount(source, target, fstype, flags, data)
        except OSError as exc:
            log(f"cannot mount {fstype} on {target}: {exc.strerror}")
    try:  # no O_CREAT: where /sys/fs/cgroup is not cgroup2, there is nothing to enable
        fd = os.open("/sys/fs/cgroup/cgroup.subtree_control", os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.write(fd, b"+cpu +memory +pids")
        finally:
            os.close(fd)
    except OSError as exc:
        log(f"cannot enable the cpu, memory and pids cgroup controllers: {exc.strerror}")


# --- entry ---------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="cocon-agent", description="cocon's guest agent")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--fd", type=int, help="an already connected socket (tests); its end ends the agent")
    where.add_argument("--device", help=f"the channel device (default: the virtio port named {PORT_NAME})")
    parser.add_argument("--state-dir", default=DEFAULT_STATE_DIR,
                        help="runtime state and bundles (default %(default)s)")  # fmt: skip
    parser.add_argument("--grace", type=float, default=DEFAULT_GRACE,
                        help="seconds to wait for a process's pipes after it exited")  # fmt: skip
    parser.add_argument("--no-prepare", action="store_true",
                        help="as PID 1, mount nothing (tests in a pid namespace on a host)")  # fmt: skip
    args = parser.parse_args(argv)
    pid1 = os.getpid() == 1
    if pid1 and not args.no_prepare:
        prepare_pid1()
    if args.fd is not None:
        channel = Channel(args.fd, is_port=False)
    else:
        path = args.device or find_port()
        channel = Channel(os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY), is_port=True)
    os.makedirs(args.state_dir, mode=0o700, exist_ok=True)
    agent = Agent(channel, args.state_dir, pid1=pid1, grace=args.grace)
    try:
        return agent.run()
    except BaseException as exc:
        if pid1:
            # PID 1 must not exit (the kernel panics): report and power off.
            log(f"fatal: {type(exc).__name__}: {exc}")
            _power_off()
        raise


if __name__ == "__main__":
    sys.exit(main())
