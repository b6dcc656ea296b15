"""The node daemon: `cocon daemon` serves the API (cocon.api.server) on a Unix socket, and on TCP
only with authentication.

    cocon daemon [-H unix:///run/cocon/cocon.sock] [-H tcp://ADDR:PORT --tlsverify --tlscacert CA
                 --tlscert CERT --tlskey KEY | --auth-token-file FILE] [--debug]

- Default listener: `unix://$COCON_RUN/cocon.sock`, mode 0600 (root only), its directory 0700.
- One daemon per `$COCON_RUN`: the daemon holds an flock on `$COCON_RUN/cocon.pid` for its whole
  life; a second one is refused with the first one's pid. A socket file left by a daemon that died
  (nothing accepts on it) is removed; a socket something still answers on is never taken over.
- TCP needs client certificates (`--tlsverify` with CA, certificate and key: the TLS handshake
  refuses clients without a certificate signed by that CA) or a bearer token (`--auth-token-file`,
  a file of mode 0600 or stricter; clients send `Authorization: Bearer TOKEN`), or both. Plain TCP
  without either is refused at start-up.
- Foreground, logs to stderr, for service managers; `READY=1` / `STOPPING=1` to `$NOTIFY_SOCKET`
  when set (systemd `Type=notify`, see contrib/cocon.service).
- SIGTERM / SIGINT: stop accepting, let running requests finish (at most `--shutdown-timeout`
  seconds; event streams end at once), remove the socket and the pid file, exit 0.

`python -m cocon.api.daemon` takes the same arguments (what `ensure_daemon` starts).

The CLI builds its parser from `add_arguments` for every command, so this module imports little at
the top (no logging, socket or dataclasses): what serving needs is imported when it starts.
"""

from __future__ import annotations

import os
import sys

from cocon._daemon_address import DaemonAddress, parse_daemon_address
from cocon._typing import TYPE_CHECKING, record

if TYPE_CHECKING:
    import argparse
    import logging
    import socket
    import ssl
    from collections.abc import Sequence
    from typing import Any


def _log() -> logging.Logger:
    import logging

    return logging.getLogger("cocon.daemon")


DEFAULT_ROOT = "/var/lib/cocon"
DEFAULT_RUN = "/run/cocon"
SOCKET_NAME = "cocon.sock"
PID_NAME = "cocon.pid"


class DaemonError(Exception):
    """The daemon cannot start as configured; the message says what to change."""


def default_socket(run_dir: str) -> str:
    return os.path.join(run_dir, SOCKET_NAME)


#: A listener of `-H`: its kind ("unix" or "tcp"), path, host and port.
Listener = DaemonAddress


def parse_host(text: str) -> Listener:
    """`unix:///path`, `tcp://ADDR:PORT` (IPv6 as `tcp://[::1]:2376`)."""
    try:
        return parse_daemon_address(text)
    except ValueError as exc:
        raise DaemonError(f"-H {text}: {exc}") from None


@record
class Config:
    root: str
    run: str
    hosts: tuple[str, ...] = ()
    tls_verify: bool = False
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    auth_token_file: str | None = None
    shutdown_timeout: float = 15.0
    debug: bool = False
    max_upload: int = 64 << 30
    workers: int = 16

    def listeners(self) -> list[Listener]:
        hosts = self.hosts or [f"unix://{default_socket(self.run)}"]
        return [parse_host(h) for h in hosts]


def read_token(path: str) -> str:
    import stat

    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError as exc:
        raise DaemonError(f"--auth-token-file {path}: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise DaemonError(f"--auth-token-file {path} is not a regular file")
        if st.st_mode & 0o077:
            raise DaemonError(
                f"--auth-token-file {path} is readable by others (mode {st.st_mode & 0o777:o}): chmod 600 it"
            )
        data = os.read(fd, 4097)
    finally:
        os.close(fd)
    token = data.decode("utf-8", "replace").strip()
    if len(data) > 4096 or not token or any(c.isspace() for c in token):
        raise DaemonError(f"--auth-token-file {path}: put one token (no spaces, at most 4 KiB) in it")
    if len(token) < 16:
        raise DaemonError(f"--auth-token-file {path}: the token is too short; use at least 16 characters")
    return token


def tls_context(cfg: Config) -> ssl.SSLContext:
    import ssl

    missing = [flag for flag, value in (("--tlscacert", cfg.tls_ca), ("--tlscert", cfg.tls_cert),
                                        ("--tlskey", cfg.tls_key)) if not value]  # fmt: skip
    if missing:
        raise DaemonError(f"--tlsverify needs {', '.join(missing)} (the CA that signs client certificates, "
                          "and this daemon's certificate and key)")  # fmt: skip
    try:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=cfg.tls_ca)
        context.load_cert_chain(str(cfg.tls_cert), str(cfg.tls_key))
    except (OSError, ssl.SSLError) as exc:
        raise DaemonError(f"cannot load the TLS files: {exc}") from None
    context.verify_mode = ssl.CERT_REQUIRED
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


def check_config(cfg: Config) -> tuple[list[Listener], ssl.SSLContext | None, str | None]:
    listeners = cfg.listeners()
    tcp = [str(l) for l in listeners if l.kind == "tcp"]  # noqa: E741
    if (cfg.tls_ca or cfg.tls_cert or cfg.tls_key) and not cfg.tls_verify:
        raise DaemonError(
            "TLS files were given without --tlsverify: add --tlsverify (clients must present certificates)"
        )
    token = read_token(cfg.auth_token_file) if cfg.auth_token_file else None
    context = tls_context(cfg) if cfg.tls_verify else None
    if tcp and context is None and token is None:
        raise DaemonError(
            f"refusing to listen on {', '.join(tcp)} without authentication: anyone who can reach it could "
            "run anything as root. Add --tlsverify --tlscacert CA --tlscert CERT --tlskey KEY (client "
            "certificates), or --auth-token-file FILE, or use the Unix socket"
        )
    if not tcp and (context is not None or token is not None):
        raise DaemonError("--tlsverify and --auth-token-file apply to TCP listeners: add -H tcp://ADDR:PORT")
    return listeners, context, token


# --- the pid lock and the socket ---------------------------------------------------------------------


def _read_pid(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip() or "?"
    except OSError:
        return "?"


def take_pid_lock(run_dir: str) -> int:
    """flock `$COCON_RUN/cocon.pid` (held until the process ends) and write our pid into it."""
    import fcntl

    os.makedirs(run_dir, 0o700, exist_ok=True)
    path = os.path.join(run_dir, PID_NAME)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise DaemonError(
            f"another cocon daemon (pid {_read_pid(path)}) is running for {run_dir}: stop it first "
            "(or use another COCON_RUN)"
        ) from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def _answers(path: str) -> bool:
    import socket

    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    s.settimeout(1.0)
    try:
        s.connect(path)
        return True
    except OSError:
        return False
    finally:
        s.close()


def unix_listener(path: str, run_dir: str) -> socket.socket:
    """A listening socket at `path`, mode 0600; a stale socket file there is replaced."""
    import socket
    import stat

    parent = os.path.dirname(path)
    made = not os.path.isdir(parent)
    os.makedirs(parent, 0o700, exist_ok=True)
    if made or os.path.realpath(parent) == os.path.realpath(run_dir):
        os.chmod(parent, 0o700)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        st = None
    if st is not None:
        if not stat.S_ISSOCK(st.st_mode):
            raise DaemonError(f"{path} exists and is not a socket: remove it or choose another -H unix://…")
        if _answers(path):
            raise DaemonError(
                f"another process answers on {path}: stop it first (or use another socket path)"
            )
        _log().info("removing the stale socket %s (nothing listens on it)", path)
        os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    old = os.umask(0o177)
    try:
        sock.bind(path)
    except OSError as exc:
        sock.close()
        raise DaemonError(f"cannot listen on {path}: {exc.strerror}") from None
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    sock.listen(128)
    return sock


def tcp_listener(listener: Listener) -> socket.socket:
    import socket

    try:
        infos = socket.getaddrinfo(listener.host, listener.port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise DaemonError(f"-H {listener}: {exc.strerror}") from None
    family, _, _, _, addr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
    except OSError as exc:
        sock.close()
        raise DaemonError(f"cannot listen on {listener}: {exc.strerror}") from None
    sock.listen(128)
    return sock


# --- systemd notification ----------------------------------------------------------------------------


class Notifier:
    """sd_notify(3) without libsystemd: datagrams to $NOTIFY_SOCKET (taken out of the environment,
    so that nothing the daemon starts inherits it)."""

    def __init__(self) -> None:
        self.address = os.environ.pop("NOTIFY_SOCKET", "")

    def notify(self, state: str) -> bool:
        if not self.address:
            return False
        import socket

        addr = "\0" + self.address[1:] if self.address.startswith("@") else self.address
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
                s.connect(addr)
                s.sendall(state.encode())
        except OSError as exc:
            _log().warning("cannot notify the service manager at %s: %s", self.address, exc)
            return False
        return True


# --- running -----------------------------------------------------------------------------------------


def _check_engine(root: str, run: str) -> None:
    """Open what every request needs, so that a broken root fails the start, not the first request."""
    from cocon.api.docker.system import engine_id
    from cocon.engine.engine import Engine
    from cocon.engine.errors import EngineError

    engine = Engine(root, run)
    try:
        engine.events.last_id()
        engine.networks.list()
        engine_id(engine.root)
    except (EngineError, OSError) as exc:
        raise DaemonError(f"cannot use the state in {root}: {exc}") from None
    finally:
        engine.close()


def _start_prestart(cfg: Config) -> None:
    """Cancel the pre-started runtimes a killed daemon left, then keep one ready
    (cocon.engine.prestart)."""
    from cocon.engine import prestart
    from cocon.engine.engine import Engine

    engine = Engine(cfg.root, cfg.run)
    try:
        left = prestart.cancel_leftovers(engine)
        if left:
            _log().info("cancelled %d pre-started runtime(s) left by an earlier daemon", left)
    finally:
        engine.close()
    prestart.enable(cfg.root, cfg.run)


def _restore_network(cfg: Config) -> None:
    """Bridges, firewall and DNS from the database (cocon.engine.netattach.restore); a failure is
    logged, not fatal (containers without networking still run)."""
    from cocon.engine import netattach
    from cocon.engine.engine import Engine
    from cocon.engine.errors import EngineError

    engine = Engine(cfg.root, cfg.run)
    try:
        netattach.restore(engine)
    except (EngineError, OSError) as exc:
        _log().warning("network restore: %s", exc)
    finally:
        engine.close()


class _MonitorThread:
    """cocon.engine.monitor.Monitor in a thread of its own, with an engine of its own (SQLite
    connections belong to one thread): `restore()` (live-restore reconciliation: collect what ended
    while no daemon ran, restart what the restart policies say) before the API serves, then the
    monitor's loop until `stop()`."""

    def __init__(self, root: str, run: str) -> None:
        import threading

        self.root, self.run = root, run
        self.ready = threading.Event()
        self.error: BaseException | None = None
        self.monitor: Any = None
        self.thread = threading.Thread(target=self._main, name="cocon-monitor", daemon=True)

    def _main(self) -> None:
        from cocon.engine.engine import Engine
        from cocon.engine.monitor import Monitor

        engine = Engine(self.root, self.run)
        try:
            self.monitor = Monitor(engine)
            try:
                self.monitor.restore()
            except Exception as exc:
                _log().warning("live restore: %s", exc)
            self.ready.set()
            self.monitor.run_forever()
        except BaseException as exc:
            self.error = exc
            self.ready.set()
        finally:
            engine.close()

    def start(self) -> None:
        self.thread.start()
        self.ready.wait()
        if self.error is not None:
            raise DaemonError(f"cannot start the container monitor: {self.error}")

    def stop(self) -> None:
        if self.monitor is not None:
            self.monitor._stop.set()
        if self.thread.is_alive():
            self.thread.join(30)


async def serve(cfg: Config) -> None:
    """Run until SIGTERM/SIGINT. Raises DaemonError for a configuration that cannot work."""
    import asyncio
    import shutil
    import signal

    from aiohttp import web

    from cocon.api.docker.common import Context
    from cocon.api.server import make_app

    listeners, ssl_context, token = check_config(cfg)
    pid_fd = take_pid_lock(cfg.run)
    sockets: list[tuple[Listener, socket.socket]] = []
    runner: web.AppRunner | None = None
    ctx: Context | None = None
    monitor: _MonitorThread | None = None
    notifier = Notifier()
    try:
        _check_engine(cfg.root, cfg.run)
        shutil.rmtree(os.path.join(cfg.root, "tmp", "api"), ignore_errors=True)
        for listener in listeners:
            if listener.kind == "unix":
                sockets.append((listener, unix_listener(listener.path, cfg.run)))
            else:
                sockets.append((listener, tcp_listener(listener)))
        ctx = Context(cfg.root, cfg.run, workers=cfg.workers, max_upload=cfg.max_upload)
        from cocon.engine import netattach

        netattach.enable_dns()  # this process serves the user networks' DNS
        monitor = _MonitorThread(cfg.root, cfg.run)  # live restore, then restart policies, health checks
        await asyncio.get_running_loop().run_in_executor(None, monitor.start)
        await asyncio.get_running_loop().run_in_executor(None, _restore_network, cfg)
        await asyncio.get_running_loop().run_in_executor(None, _start_prestart, cfg)
        app = make_app(ctx, auth_token=token)
        runner = web.AppRunner(
            app,
            access_log=logging.getLogger("cocon.access") if cfg.debug else None,
            shutdown_timeout=cfg.shutdown_timeout,
        )
        await runner.setup()
        for listener, sock in sockets:
            context = ssl_context if listener.kind == "tcp" else None
            site = web.SockSite(runner, sock, ssl_context=context, shutdown_timeout=cfg.shutdown_timeout)
            await site.start()
            _log().info("listening on %s%s", listener, " (TLS, client certificates)" if context else "")
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        _log().info("cocon daemon ready (pid %d, root %s, run %s)", os.getpid(), cfg.root, cfg.run)
        notifier.notify(f"READY=1\nSTATUS=serving the API\nMAINPID={os.getpid()}")
        await stop.wait()
        _log().info("stopping: finishing running requests (at most %.0f s)", cfg.shutdown_timeout)
        notifier.notify("STOPPING=1")
    finally:
        if runner is not None:
            await runner.cleanup()
        if monitor is not None:
            monitor.stop()
        from cocon.engine import netattach, prestart

        netattach.close_all()  # DNS listeners; links and rules stay for the running containers

        prestart.disable(cfg.run)  # cancels the pre-started runtimes nobody used
        if ctx is not None:
            ctx.close()
        for listener, sock in sockets:
            sock.close()
            if listener.kind == "unix":
                try:
                    os.unlink(listener.path)
                except FileNotFoundError:
                    pass
        try:
            os.unlink(os.path.join(cfg.run, PID_NAME))
        except FileNotFoundError:
            pass
        os.close(pid_fd)
    _log().info("stopped")


# --- command line ------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-H", "--host", action="append", default=[], metavar="ADDR",
                        help="where to listen: unix:///path (default unix://$COCON_RUN/cocon.sock) or "
                        "tcp://ADDR:PORT (needs --tlsverify or --auth-token-file); repeatable")  # fmt: skip
    parser.add_argument(
        "--tlsverify", action="store_true", help="TLS on TCP, clients must present a certificate"
    )
    parser.add_argument("--tlscacert", metavar="FILE", help="CA that signs the clients' certificates")
    parser.add_argument("--tlscert", metavar="FILE", help="this daemon's TLS certificate")
    parser.add_argument("--tlskey", metavar="FILE", help="this daemon's TLS key")
    parser.add_argument(
        "--auth-token-file",
        metavar="FILE",
        help="TCP clients must send 'Authorization: Bearer TOKEN' (the file holds TOKEN, mode 600)",
    )
    parser.add_argument(
        "--shutdown-timeout",
        type=float,
        default=15.0,
        metavar="SECONDS",
        help="how long running requests may take to finish on SIGTERM (default 15)",
    )
    parser.add_argument("--debug", action="store_true", help="log every request")


def config_from_args(args: argparse.Namespace) -> Config:
    return Config(
        root=os.path.abspath(os.environ.get("COCON_ROOT") or DEFAULT_ROOT),
        run=os.path.abspath(os.environ.get("COCON_RUN") or DEFAULT_RUN),
        hosts=tuple(args.host),
        tls_verify=args.tlsverify,
        tls_ca=args.tlscacert,
        tls_cert=args.tlscert,
        tls_key=args.tlskey,
        auth_token_file=args.auth_token_file,
        shutdown_timeout=args.shutdown_timeout,
        debug=args.debug,
    )


def run(cfg: Config) -> int:
    """Serve in the foreground; the exit status (1 with one error line when it cannot start)."""
    import asyncio
    import errno
    import logging

    logging.basicConfig(
        stream=sys.stderr,
        level=logging.DEBUG if cfg.debug else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not cfg.debug:
        logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    if os.geteuid() != 0:
        sys.stderr.write("cocon: error: the daemon manages containers, mounts and cgroups: run it as root\n")
        return 1
    try:
        asyncio.run(serve(cfg))
    except DaemonError as exc:
        sys.stderr.write(f"cocon: error: {exc}\n")
        return 1
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            sys.stderr.write(f"cocon: error: the address is in use: {exc}\n")
            return 1
        raise
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="cocon daemon", description="Serve cocon's API.")
    add_arguments(parser)
    return run(config_from_args(parser.parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
