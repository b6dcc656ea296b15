"""Helpers for tests of the node daemon: a real `cocon daemon` process on private COCON_ROOT and
COCON_RUN (the root holds busybox:latest), a raw HTTP client over its Unix socket, and clean-up
(the daemon stopped, killed if it must be, mounts under its roots undone, directories removed)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from cli_helpers import COCON, kill_prestarted, new_root_with_busybox, reset_network, unmount_all
from cocon.api.http_client import HTTPClient
from cocon.engine.peer_daemon import UnixHTTPConnection

DOCKER = shutil.which("docker") or "/usr/bin/docker"


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    def lines(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.body.splitlines() if line.strip()]

    @property
    def message(self) -> str:
        return str(self.json()["message"])


@dataclass
class Daemon:
    root: str
    run: str
    proc: subprocess.Popen[bytes]
    log_path: str
    extra: list[str] = field(default_factory=list)

    @property
    def sock(self) -> str:
        return os.path.join(self.run, "cocon.sock")

    @property
    def env(self) -> dict[str, str]:
        return dict(os.environ, COCON_ROOT=self.root, COCON_RUN=self.run, DOCKER_HOST=f"unix://{self.sock}")

    def client(self) -> HTTPClient:
        return HTTPClient(self.sock, timeout=120)

    def request(
        self,
        method: str,
        path: str,
        body: bytes | str | None = None,
        headers: dict[str, str] | None = None,
        timeout: float = 120,
    ) -> Reply:
        conn = UnixHTTPConnection(self.sock, timeout=timeout)
        try:
            data = body.encode() if isinstance(body, str) else body
            conn.request(method, path, body=data, headers=headers or {})
            resp = conn.getresponse()
            return Reply(resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read())
        finally:
            conn.close()

    def log(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def wait_for_socket(path: str, proc: subprocess.Popen[bytes] | None = None, timeout: float = 15) -> None:
    client = HTTPClient(path, timeout=2)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if client.ping():
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the daemon exited with {proc.returncode}")
        time.sleep(0.05)
    raise AssertionError(f"no daemon answered on {path} within {timeout} s")


def new_roots(base: str, busybox: bool = True) -> tuple[str, str]:
    root = os.path.join(base, "root")
    run = tempfile.mkdtemp(prefix="cocon-test-run-", dir="/run")
    if busybox:
        new_root_with_busybox(root)
    else:
        os.makedirs(root, exist_ok=True)
    return root, run


def start_daemon(
    base: str,
    *args: str,
    root: str | None = None,
    run: str | None = None,
    env: dict[str, str] | None = None,
    wait: bool = True,
    prefix: list[str] | None = None,
) -> Daemon:
    if root is None or run is None:
        root, run = new_roots(base)
    log_path = os.path.join(base, f"daemon-{time.monotonic_ns()}.log")
    full_env = dict(os.environ, COCON_ROOT=root, COCON_RUN=run, **(env or {}))
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(  # `prefix`: e.g. nsenter into a network namespace
            [*(prefix or []), COCON, "daemon", *args], env=full_env, stdout=log, stderr=subprocess.STDOUT
        )
    daemon = Daemon(root=root, run=run, proc=proc, log_path=log_path, extra=list(args))
    if wait:
        try:
            wait_for_socket(daemon.sock, proc)
        except BaseException:
            daemon.stop(signal.SIGKILL)
            raise AssertionError(f"the daemon did not start:\n{daemon.log()}") from None
    return daemon


def cleanup(daemon: Daemon, remove_run: bool = True) -> None:
    daemon.stop()
    kill_prestarted(daemon.run)  # what a daemon killed by a test left waiting
    unmount_all(daemon.run)
    unmount_all(daemon.root)
    reset_network(daemon.root, daemon.run)
    if remove_run:
        shutil.rmtree(daemon.run, ignore_errors=True)


def tar_bytes(members: list[tuple[str, bytes | None, dict[str, Any]]]) -> bytes:
    """A tar in memory: (name, data or None for a directory/link, tarinfo attributes)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name, data, attrs in members:
            info = tarfile.TarInfo(name)
            info.mtime = int(time.time())
            info.mode = 0o644
            for key, value in attrs.items():
                setattr(info, key, value)
            if data is not None:
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
            else:
                tf.addfile(info)
    return buf.getvalue()


def context_tar(files: dict[str, str]) -> bytes:
    return tar_bytes([(name, text.encode(), {}) for name, text in files.items()])


# --- a daemon for a test module, and everything it ran removed ----------------------------------------


def conmons_of(run: str) -> list[int]:
    """The conmon processes supervising containers of the daemon whose run directory is `run` (not
    the daemon's pre-started one, which waits with `--await` for a container to be asked for)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        conmon = argv and argv[0].endswith(b"conmon") and any(run.encode() in a for a in argv)
        if conmon and not _awaiting(argv):
            pids.append(int(entry))
    return pids


def _awaiting(argv: list[bytes]) -> bool:
    """Whether this conmon is a pre-started one whose container was not asked for yet: launched with
    the runtime argument `--await`, and no container pid written in its bundle."""
    if b"--await" not in argv or b"-b" not in argv:
        return False
    bundle = argv[argv.index(b"-b") + 1].decode()
    return not os.path.exists(os.path.join(bundle, "pidfile"))


def remove_all(d: Daemon) -> None:
    """Every container of the daemon removed (through it while it runs), then any conmon left killed."""
    if d.proc.poll() is None:
        c = d.client()
        try:
            for item in c.container_list(all=True):
                c.container_remove(item["Id"], force=True, volumes=True)
        except Exception:
            pass
    for pid in conmons_of(d.run):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def stop_and_clean(d: Daemon) -> tuple[int, str]:
    """Every container removed, the daemon stopped (its exit code and log returned), its state cleaned."""
    remove_all(d)
    code = d.stop()
    log = d.log()
    remove_all(d)
    cleanup(d)
    return code, log


def module_daemon(base: str) -> Iterator[Daemon]:
    """For a module-scoped fixture (`yield from`): a daemon on private roots under `base`; afterwards
    every container removed and the daemon stopped cleanly (exit 0, no traceback in its log)."""
    d = start_daemon(base)
    try:
        yield d
    finally:
        code, log = stop_and_clean(d)
        assert code == 0 and "Traceback" not in log, log


def docker(
    d: Daemon, *args: str, check: bool = True, input: bytes | None = None, **kw: Any
) -> subprocess.CompletedProcess[str]:
    """The docker CLI against the daemon (its own config directory), text output."""
    env = dict(d.env, DOCKER_CONFIG=os.path.join(d.run, "docker-config"))
    proc = subprocess.run([DOCKER, *args], env=env, capture_output=True, input=input, timeout=60, **kw)
    out = subprocess.CompletedProcess(proc.args, proc.returncode, proc.stdout.decode(errors="replace"),
                                      proc.stderr.decode(errors="replace"))  # fmt: skip
    if check and proc.returncode != 0:
        raise AssertionError(f"docker {' '.join(args)} exited {proc.returncode}\n{out.stdout}\n{out.stderr}")
    return out


@contextlib.contextmanager
def docker_py_client(d: Daemon, then: Callable[[Any], None] | None = None) -> Iterator[Any]:
    """A docker-py client of the daemon; afterwards (also when the test failed) every container is
    removed, then `then(client)` cleans up what else the test made (images, networks)."""
    import docker

    c = docker.DockerClient(base_url=f"unix://{d.sock}", version="auto", timeout=60)
    try:
        yield c
    finally:
        try:
            for ct in c.containers.list(all=True):
                ct.remove(force=True)
            if then is not None:
                then(c)
        finally:
            c.close()


# --- TLS files for daemons that listen on TCP -----------------------------------------------------------


def openssl(*args: str, cwd: str) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def make_certs(d: str) -> None:
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    openssl(
        "req",
        "-x509",
        *ec,
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "1",
        "-subj",
        "/CN=cocon test CA",
        cwd=d,
    )
    for name, ext in (
        ("server", "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n"),
        ("client", "extendedKeyUsage=clientAuth\n"),
    ):
        with open(os.path.join(d, f"{name}.ext"), "w") as f:
            f.write(ext)
        openssl("req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}", cwd=d)
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                "-out", f"{name}.pem", "-days", "1", "-extfile", f"{name}.ext", cwd=d)  # fmt: skip
    # a client certificate from another CA must be refused too
    openssl(
        "req",
        "-x509",
        *ec,
        "-keyout",
        "rogue.key",
        "-out",
        "rogue.pem",
        "-days",
        "1",
        "-subj",
        "/CN=rogue",
        cwd=d,
    )
