"""`cocon daemon` as a service: its socket's permissions, one daemon per COCON_RUN, stale sockets,
TCP only with TLS client certificates or a token (plain TCP refused), clean shutdown on SIGTERM (a
running request finishes first), sd_notify, and `ensure_daemon()` starting it detached."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import ssl
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(__file__)))

from cli_helpers import COCON, kill_prestarted, reset_network, stop_daemon, unmount_all
from cocon.api.client import APIError
from cocon.api.http_client import HTTPClient, ensure_daemon
from daemon_helpers import DOCKER, cleanup, make_certs, new_roots, start_daemon, wait_for_socket


@pytest.fixture
def roots(tmp_path: Any) -> Iterator[tuple[str, str]]:
    root, run = new_roots(str(tmp_path))
    try:
        yield root, run
    finally:
        stop_daemon(run)  # one that ensure_daemon started
        kill_prestarted(run)
        unmount_all(run)
        reset_network(root, run)
        import shutil

        shutil.rmtree(run, ignore_errors=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_daemon(root: str, run: str, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """A daemon that is expected to refuse to start."""
    env = dict(os.environ, COCON_ROOT=root, COCON_RUN=run)
    return subprocess.run([COCON, "daemon", *args], env=env, capture_output=True, text=True, timeout=timeout)


def test_socket_permissions_pid_file_and_clean_stop(tmp_path: Any) -> None:
    d = start_daemon(str(tmp_path))
    try:
        st = os.lstat(d.sock)
        assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == 0
        assert stat.S_IMODE(os.stat(d.run).st_mode) == 0o700
        with open(os.path.join(d.run, "cocon.pid")) as f:
            assert int(f.read()) == d.proc.pid
        assert d.client().ping()
        started = time.monotonic()
        assert d.stop(signal.SIGTERM) == 0
        assert time.monotonic() - started < 5
        assert not os.path.exists(d.sock) and not os.path.exists(os.path.join(d.run, "cocon.pid"))
        assert "stopped" in d.log() and "Traceback" not in d.log()
    finally:
        cleanup(d)


def test_one_daemon_per_run_dir_and_stale_sockets(tmp_path: Any, roots: tuple[str, str]) -> None:
    root, run = roots
    sock_path = os.path.join(run, "cocon.sock")
    # a socket file nobody listens on (a daemon killed with SIGKILL leaves one): replaced
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(sock_path)
    stale.close()
    d = start_daemon(str(tmp_path), root=root, run=run)
    try:
        assert "removing the stale socket" in d.log()
        second = run_daemon(root, run)
        assert second.returncode == 1
        assert f"another cocon daemon (pid {d.proc.pid}) is running" in second.stderr
        assert d.client().ping()  # untouched by the attempt
        # SIGKILL leaves the socket file; the next daemon takes over
        d.stop(signal.SIGKILL)
        assert os.path.exists(sock_path)
        d2 = start_daemon(str(tmp_path), root=root, run=run)
        try:
            assert d2.client().ping()
        finally:
            cleanup(d2, remove_run=False)
    finally:
        cleanup(d, remove_run=False)
    # something else answers on the path: never taken over
    other = os.path.join(run, "other.sock")
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(other)
    listener.listen(1)
    try:
        refused = run_daemon(root, run, "-H", f"unix://{other}")
        assert refused.returncode == 1 and f"another process answers on {other}" in refused.stderr
    finally:
        listener.close()
    with open(os.path.join(run, "file.sock"), "w") as f:
        f.write("not a socket")
    refused = run_daemon(root, run, "-H", f"unix://{run}/file.sock")
    assert refused.returncode == 1 and "exists and is not a socket" in refused.stderr
    assert not os.path.exists(os.path.join(run, "cocon.pid"))


def test_plain_tcp_and_bad_options_are_refused(roots: tuple[str, str]) -> None:
    root, run = roots
    port = free_port()
    r = run_daemon(root, run, "-H", f"tcp://127.0.0.1:{port}")
    assert r.returncode == 1
    assert f"refusing to listen on tcp://127.0.0.1:{port} without authentication" in r.stderr
    assert "--tlsverify" in r.stderr and "--auth-token-file" in r.stderr
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0  # nothing listens
    r = run_daemon(root, run, "-H", f"tcp://127.0.0.1:{port}", "--tlsverify")
    assert r.returncode == 1 and "--tlsverify needs --tlscacert, --tlscert, --tlskey" in r.stderr
    r = run_daemon(root, run, "-H", "tcp://127.0.0.1")
    assert r.returncode == 1 and "tcp://ADDR:PORT" in r.stderr
    r = run_daemon(root, run, "-H", "http://x")
    assert r.returncode == 1
    r = run_daemon(root, run, "--auth-token-file", "/nonexistent")
    assert r.returncode == 1 and "/nonexistent" in r.stderr
    assert not os.path.exists(os.path.join(run, "cocon.sock"))
    # a root that cannot be used fails the start, not the first request
    bad_root = os.path.join(run, "a-file")
    with open(bad_root, "w") as f:
        f.write("x")
    r = run_daemon(bad_root, run)
    assert r.returncode == 1 and "cannot use the state in" in r.stderr


def test_tls_with_client_certificates(tmp_path: Any) -> None:
    certs = str(tmp_path / "certs")
    os.mkdir(certs)
    make_certs(certs)
    port = free_port()
    c = lambda name: os.path.join(certs, name)  # noqa: E731
    d = start_daemon(
        str(tmp_path), "-H", f"tcp://127.0.0.1:{port}", "-H", "unix://" + str(tmp_path / "d.sock"),
        "--tlsverify", "--tlscacert", c("ca.pem"), "--tlscert", c("server.pem"), "--tlskey", c("server.key"),
        wait=False,
    )  # fmt: skip
    try:
        wait_for_socket(str(tmp_path / "d.sock"), d.proc)

        def get(cert: str | None) -> tuple[int, bytes]:
            ctx = ssl.create_default_context(cafile=c("ca.pem"))
            if cert:
                ctx.load_cert_chain(c(f"{cert}.pem"), c(f"{cert}.key"))
            conn = http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=10)
            try:
                conn.request("GET", "/v1.47/version")
                resp = conn.getresponse()
                return resp.status, resp.read()
            finally:
                conn.close()

        status, body = get("client")
        assert status == 200 and json.loads(body)["ApiVersion"] == "1.47"
        for cert in (None, "rogue"):
            with pytest.raises((ssl.SSLError, ConnectionError, http.client.RemoteDisconnected)):
                get(cert)
        # the docker CLI with the same client certificate
        env = dict(os.environ)
        env.pop("DOCKER_HOST", None)
        proc = subprocess.run(
            [DOCKER, "--tlsverify", "--tlscacert", c("ca.pem"), "--tlscert", c("client.pem"), "--tlskey",
             c("client.key"), "-H", f"tcp://127.0.0.1:{port}", "version", "--format", "{{.Server.APIVersion}}"],
            env=env, capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        assert proc.returncode == 0 and proc.stdout.strip() == "1.47", proc.stderr
        # plain HTTP to the TLS port gets nothing useful
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        with pytest.raises((ConnectionError, http.client.HTTPException)):
            conn.request("GET", "/_ping")
            assert conn.getresponse().status != 200
        conn.close()
        assert "TLS, client certificates" in d.log()
    finally:
        cleanup(d)


def test_token_auth_on_tcp(tmp_path: Any) -> None:
    token = os.urandom(24).hex()
    token_file = tmp_path / "token"
    token_file.write_text(token + "\n")
    os.chmod(token_file, 0o644)
    root, run = new_roots(str(tmp_path))
    port = free_port()
    try:
        r = run_daemon(root, run, "-H", f"tcp://127.0.0.1:{port}", "--auth-token-file", str(token_file))
        assert r.returncode == 1 and "chmod 600" in r.stderr
    except BaseException:
        unmount_all(run)
        raise
    os.chmod(token_file, 0o600)
    d = start_daemon(
        str(tmp_path), "-H", f"tcp://127.0.0.1:{port}", "-H", f"unix://{run}/cocon.sock",
        "--auth-token-file", str(token_file), root=root, run=run,
    )  # fmt: skip
    try:

        def get(headers: dict[str, str]) -> tuple[int, Any]:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            try:
                conn.request("GET", "/v1.47/images/json", headers=headers)
                resp = conn.getresponse()
                return resp.status, json.loads(resp.read())
            finally:
                conn.close()

        status, doc = get({})
        assert status == 401 and "Authorization: Bearer" in doc["message"]
        assert get({"Authorization": "Bearer wrong"})[0] == 401
        assert get({"Authorization": f"Basic {token}"})[0] == 401
        status, doc = get({"Authorization": f"Bearer {token}"})
        assert status == 200 and any("busybox:latest" in i["RepoTags"] for i in doc)
        assert d.client().ping()  # the Unix socket needs no token
        # the docker CLI sends the token through its config's HttpHeaders
        config = tmp_path / "docker-config"
        config.mkdir()
        (config / "config.json").write_text(json.dumps({"HttpHeaders": {"Authorization": f"Bearer {token}"}}))
        env = dict(os.environ, DOCKER_CONFIG=str(config), DOCKER_HOST=f"tcp://127.0.0.1:{port}")
        proc = subprocess.run([DOCKER, "images", "--format", "{{.Repository}}"], env=env, capture_output=True,
                              text=True, timeout=30)  # fmt: skip
        assert proc.returncode == 0 and "busybox" in proc.stdout.split(), proc.stderr
    finally:
        cleanup(d)


def test_sigterm_lets_a_running_build_finish(tmp_path: Any) -> None:
    d = start_daemon(str(tmp_path))
    try:
        context = tmp_path / "ctx"
        context.mkdir()
        (context / "Dockerfile").write_text("FROM busybox\nRUN sleep 1 && echo slept\n")
        result: dict[str, Any] = {}
        output: list[str] = []
        running = threading.Event()

        def on_output(text: str) -> None:
            output.append(text)
            if "RUN sleep" in text:
                running.set()

        def build() -> None:
            try:
                result["build"] = d.client().image_build(
                    str(context), tags=["slow:1"], no_cache=True, output=on_output
                )
            except BaseException as exc:
                result["error"] = exc

        worker = threading.Thread(target=build)
        worker.start()
        assert running.wait(20), output
        time.sleep(0.2)
        d.proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        assert d.proc.poll() is None, (output, d.log())  # still finishing the build
        assert not d.client().ping()  # but no longer accepting requests
        worker.join(30)
        assert "error" not in result, (result, d.log())
        assert result["build"]["RepoTags"] == [] or "slept" in "".join(output)
        assert "slept" in "".join(output) and result["build"]["Id"].startswith("sha256:")
        assert d.proc.wait(30) == 0
        assert not os.path.exists(d.sock)
        # an events stream does not hold the shutdown up
        d2 = start_daemon(str(tmp_path), root=d.root, run=d.run)
        try:
            sock = socket.socket(socket.AF_UNIX)
            sock.connect(d2.sock)
            sock.sendall(b"GET /events HTTP/1.1\r\nHost: x\r\n\r\n")
            time.sleep(0.2)
            started = time.monotonic()
            assert d2.stop() == 0 and time.monotonic() - started < 5
            sock.close()
        finally:
            cleanup(d2, remove_run=False)
    finally:
        cleanup(d)


def test_sd_notify(tmp_path: Any) -> None:
    notify_path = str(tmp_path / "notify.sock")
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(notify_path)
    receiver.settimeout(15)
    d = start_daemon(str(tmp_path), env={"NOTIFY_SOCKET": notify_path}, wait=False)
    try:
        ready = receiver.recv(4096).decode()
        assert "READY=1" in ready and f"MAINPID={d.proc.pid}" in ready
        assert d.client().ping()
        d.stop()
        assert receiver.recv(4096).decode() == "STOPPING=1"
    finally:
        receiver.close()
        cleanup(d)


def test_ensure_daemon(roots: tuple[str, str]) -> None:
    root, run = roots
    path = os.path.join(run, "cocon.sock")
    pid = 0
    try:
        started = time.monotonic()
        assert ensure_daemon(run, root=root, timeout=15) == path
        elapsed = time.monotonic() - started
        with open(os.path.join(run, "cocon.pid")) as f:
            pid = int(f.read())
        client = HTTPClient(path)
        assert client.ping() and client.info()["DockerRootDir"] == root
        # detached: a session of its own (the double fork's), not a child of this process
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
        ppid, sid = int(fields[1]), int(fields[3])
        assert ppid != os.getpid() and sid != os.getsid(0) and sid != pid
        assert "listening on" in open(os.path.join(run, "daemon.log")).read()
        # already running: returned at once, same daemon
        started = time.monotonic()
        assert ensure_daemon(run, root=root) == path
        assert time.monotonic() - started < 0.5
        with open(os.path.join(run, "cocon.pid")) as f:
            assert int(f.read()) == pid
        assert elapsed < 15
    finally:
        if pid:
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + 20
            while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
                time.sleep(0.05)
    assert not os.path.exists(path)
    # a daemon that cannot start: the error says why, with the log
    bad_root = os.path.join(run, "not-a-dir")
    with open(bad_root, "w") as f:
        f.write("x")
    with pytest.raises(APIError) as err:
        ensure_daemon(run, root=bad_root, timeout=15)
    assert "exited at start-up" in str(err.value) and "cannot use the state in" in str(err.value)
    assert "daemon.log" in str(err.value)
