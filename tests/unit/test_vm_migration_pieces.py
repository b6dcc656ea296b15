"""The pure parts of live migration: the target address of `cocon vm migrate --to`, the checks of the
requests between daemons, the seed a target takes, and the client that talks to the other daemon (a
real HTTP server on a Unix socket here; the whole migration is tests/e2e/test_vm_migrate.py)."""

from __future__ import annotations

import base64
import http.server
import json
import os
import socketserver
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from cocon._daemon_address import DaemonAddress
from cocon.engine.errors import InvalidRequest
from cocon.engine.peer_daemon import PeerDaemon, PeerError, parse_peer
from cocon.engine.vm_migration import INCOMING_FIELDS, MAX_SEED, MIGRATE_FIELDS, _check_fields, _seed


def test_target_addresses() -> None:
    assert parse_peer("unix:///run/other/cocon.sock") == DaemonAddress("unix", path="/run/other/cocon.sock")
    assert parse_peer("tcp://192.0.2.7:2376") == DaemonAddress("tcp", host="192.0.2.7", port=2376)
    assert parse_peer("tcp://[2001:db8::7]:2376/") == DaemonAddress("tcp", host="2001:db8::7", port=2376)
    assert str(parse_peer("tcp://[2001:db8::7]:2376")) == "tcp://[2001:db8::7]:2376"
    for bad, hint in (("unix://relative.sock", "absolute"), ("tcp://host", "ADDR:PORT"),
                      ("tcp://host:99999", "ADDR:PORT"), ("ssh://host", "unix:///path")):  # fmt: skip
        with pytest.raises(InvalidRequest, match=hint):
            parse_peer(bad)


def test_request_fields_are_checked() -> None:
    assert _check_fields({"To": "tcp://h:1", "SharedStorage": True}, MIGRATE_FIELDS, "migrate")
    with pytest.raises(InvalidRequest, match="unknown field 'Speed'"):
        _check_fields({"To": "x", "Speed": 1}, MIGRATE_FIELDS, "migrate")
    with pytest.raises(InvalidRequest, match="DowntimeLimitMs has the wrong type"):
        _check_fields({"DowntimeLimitMs": True}, MIGRATE_FIELDS, "migrate")  # a bool is no number
    with pytest.raises(InvalidRequest, match="Disks has the wrong type"):
        _check_fields({"Disks": [1]}, INCOMING_FIELDS, "incoming VM")
    with pytest.raises(InvalidRequest, match="JSON object"):
        _check_fields([], INCOMING_FIELDS, "incoming VM")


def _iso_bytes() -> bytes:
    data = bytearray(0x8800)
    data[0x8000:0x8006] = b"\x01CD001"
    return bytes(data)


def test_the_seed_a_target_takes() -> None:
    assert _seed(None) is None
    iso = _iso_bytes()
    assert _seed(base64.b64encode(iso).decode()) == iso
    with pytest.raises(InvalidRequest, match="base64"):
        _seed("not base64!")
    with pytest.raises(InvalidRequest, match="not a cloud-init seed ISO"):
        _seed(base64.b64encode(b"#!/bin/sh\nrm -rf /\n").decode())
    with pytest.raises(InvalidRequest, match="at most 16 MiB"):
        _seed(base64.b64encode(iso + bytes(MAX_SEED)).decode())


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.headers.get("Authorization") != "Bearer s3cret":
            self._reply(401, {"message": "unauthorized"})
        elif self.path == "/conflict":
            self._reply(409, {"message": "a container or VM named x exists on this daemon"})
        else:
            self._reply(201, {"echo": json.loads(body), "path": self.path})

    def _reply(self, status: int, doc: Any) -> None:
        data = json.dumps(doc).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def address_string(self) -> str:
        return "unix"

    def log_message(self, *args: Any) -> None:
        pass


class _UnixServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True


@pytest.fixture
def other_daemon(tmp_path: Any) -> Iterator[str]:
    path = str(tmp_path / "other.sock")
    server = _UnixServer(path, _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield path
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
        os.unlink(path)


def test_the_client_for_the_other_daemon(other_daemon: str) -> None:
    peer = PeerDaemon(parse_peer(f"unix://{other_daemon}"), token="s3cret")
    assert peer.call("POST", "/cocon/v1/vms/incoming", {"Name": "vm1"}) == {
        "echo": {"Name": "vm1"}, "path": "/cocon/v1/vms/incoming",
    }  # fmt: skip
    with pytest.raises(PeerError, match="named x exists") as err:
        peer.call("POST", "/conflict", {})
    assert err.value.status == 409
    with pytest.raises(PeerError, match="refused the credentials: give its token with --auth-token-file"):
        PeerDaemon(parse_peer(f"unix://{other_daemon}"), token="wrong").call("POST", "/x", {})
    with pytest.raises(PeerError, match="cannot reach the cocon daemon at unix:///nonexistent"):
        PeerDaemon(parse_peer("unix:///nonexistent/cocon.sock")).call("POST", "/x", {})


def test_the_cli_says_what_moved(capsys: pytest.CaptureFixture[str], tmp_path: Any) -> None:
    import argparse

    from cocon.cli.vms import cmd_migrate

    class Client:
        spec: dict[str, Any] = {}

        def vm_migrate(self, name: str, spec: dict[str, Any]) -> dict[str, Any]:
            Client.spec = spec
            return {"Id": "699969d5395ececa", "Name": name, "To": spec["To"], "DowntimeMs": 32, "PauseMs": 61, "RamMs": 266,
                    "TotalMs": 1714, "DiskMs": 1421, "RamBytes": 84 << 20, "DiskBytes": 8 << 30}  # fmt: skip

    token = tmp_path / "token"
    token.write_text("s3cret\n")
    args = argparse.Namespace(name="web", to="tcp://10.0.0.2:2376", auth_token_file=str(token),
                              shared_storage=False, downtime_limit=300, format="text")  # fmt: skip
    assert cmd_migrate(Client(), args) == 0  # type: ignore[arg-type]
    assert Client.spec == {"To": "tcp://10.0.0.2:2376", "SharedStorage": False, "DowntimeLimitMs": 300,
                           "Token": "s3cret"}  # fmt: skip
    out = capsys.readouterr().out
    assert out.startswith(
        "web moved to tcp://10.0.0.2:2376 (id 699969d5395e): paused 61 ms (QEMU's downtime 32 ms), total 1.7 s"
    )
    assert "disk 8.59GB in 1.4 s" in out and "memory 88.1MB in 0.3 s" in out
    args.auth_token_file = str(tmp_path / "missing")
    assert cmd_migrate(Client(), args) == 2
    assert "cannot read --auth-token-file" in capsys.readouterr().err


def test_the_client_for_a_daemon_with_client_certificates(tmp_path: Any) -> None:
    import socket
    import ssl
    import sys

    sys.path.insert(0, os.path.dirname(os.path.dirname(__file__)))
    from cocon.engine.peer_daemon import PeerTls
    from daemon_helpers import make_certs

    make_certs(str(tmp_path))
    pem = lambda name: (tmp_path / name).read_text()  # noqa: E731
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(tmp_path / "ca.pem"))
    context.load_cert_chain(str(tmp_path / "server.pem"), str(tmp_path / "server.key"))
    context.verify_mode = ssl.CERT_REQUIRED

    class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
        daemon_threads = True

        def get_request(self) -> tuple[socket.socket, Any]:
            sock, addr = super().get_request()
            return context.wrap_socket(sock, server_side=True), addr

    server = Server(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        address = parse_peer(f"tcp://127.0.0.1:{server.server_address[1]}")
        good = PeerTls(pem("ca.pem"), pem("client.pem"), pem("client.key"))
        assert PeerDaemon(address, token="s3cret", tls=good).call("POST", "/p", {"a": 1})["echo"] == {"a": 1}
        rogue = PeerTls(pem("ca.pem"), pem("rogue.pem"), pem("rogue.key"))  # not signed by the server's CA
        with pytest.raises(PeerError, match="cannot reach"):
            PeerDaemon(address, token="s3cret", tls=rogue).call("POST", "/p", {})
        wrong_ca = PeerTls(
            pem("rogue.pem"), pem("client.pem"), pem("client.key")
        )  # the server is not trusted
        with pytest.raises(PeerError, match="CERTIFICATE_VERIFY_FAILED"):
            PeerDaemon(address, token="s3cret", tls=wrong_ca).call("POST", "/p", {})
        with pytest.raises(InvalidRequest, match="not a usable CA, certificate and key"):
            PeerTls(pem("ca.pem"), pem("client.pem"), pem("rogue.key")).context()
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
