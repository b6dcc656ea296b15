"""Requests from this daemon to another cocon daemon (the target of `cocon vm migrate`).

    unix:///run/cocon/cocon.sock        a daemon on this machine (its root-only socket)
    tcp://ADDR:PORT                     a daemon listening on TCP: with its --auth-token-file (the token
                                        travels as `Authorization: Bearer`), or with --tlsverify (a
                                        client certificate its CA signed; its certificate is checked
                                        against the CA given here, for the address given)

http.client is enough for a handful of JSON requests; the daemon's own CLI client (cocon.api.http_client)
speaks only to a local socket.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import ssl
from dataclasses import dataclass
from typing import Any

from cocon._daemon_address import DaemonAddress, parse_daemon_address
from cocon.engine.errors import InvalidRequest


class PeerError(Exception):
    """The other daemon could not be reached, or refused (its message is kept)."""

    def __init__(self, message: str, status: int = 0) -> None:
        super().__init__(message)
        self.status = status


def parse_peer(uri: str) -> DaemonAddress:
    """`unix:///PATH` or `tcp://ADDR:PORT` (IPv6 as `tcp://[::1]:2376`); InvalidRequest otherwise."""
    try:
        return parse_daemon_address(uri)
    except ValueError as exc:
        raise InvalidRequest(f"--to {uri}: {exc}") from None


class UnixHTTPConnection(http.client.HTTPConnection):
    """http.client over a daemon's Unix socket."""

    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("cocon", timeout=timeout)
        self.path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self.path)
        self.sock = sock


@dataclass(frozen=True)
class PeerTls:
    """PEM texts: the CA that signed the target daemon's certificate, our client certificate and key."""

    ca: str
    cert: str
    key: str

    def context(self) -> ssl.SSLContext:
        import tempfile

        try:
            context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cadata=self.ca)
            # load_cert_chain reads files only: a private directory for the moment it takes
            with tempfile.TemporaryDirectory(prefix="cocon-tls-") as tmp:
                cert, key = os.path.join(tmp, "cert.pem"), os.path.join(tmp, "key.pem")
                for path, text in ((cert, self.cert), (key, self.key)):
                    with open(path, "w", opener=lambda p, f: os.open(p, f, 0o600)) as out:
                        out.write(text)
                context.load_cert_chain(cert, key)
        except (ssl.SSLError, ValueError, OSError) as exc:
            raise InvalidRequest(
                f"the TLS files for the target are not a usable CA, certificate and key: {exc}"
            ) from None
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        return context


class PeerDaemon:
    """JSON requests to the daemon at `address`."""

    def __init__(
        self, address: DaemonAddress, *, token: str | None = None, tls: PeerTls | None = None
    ) -> None:
        self.address = address
        self.token = token
        self.tls = tls
        self._context = tls.context() if tls is not None else None

    def call(self, method: str, path: str, doc: Any = None, *, timeout: float = 300.0) -> Any:
        if self.address.kind == "unix":
            conn: http.client.HTTPConnection = UnixHTTPConnection(self.address.path, timeout)
        elif self._context is not None:
            conn = http.client.HTTPSConnection(
                self.address.host, self.address.port, timeout=timeout, context=self._context
            )
        else:
            conn = http.client.HTTPConnection(self.address.host, self.address.port, timeout=timeout)
        headers = {"Content-Type": "application/json", "User-Agent": "cocon-migrate"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        body = json.dumps(doc).encode() if doc is not None else None
        try:
            conn.request(method, path, body=body, headers=headers)
            response = conn.getresponse()
            data = response.read()
        except (OSError, http.client.HTTPException) as exc:
            raise PeerError(f"cannot reach the cocon daemon at {self.address}: {exc}") from None
        finally:
            conn.close()
        try:
            answer = json.loads(data) if data else None
        except ValueError:
            answer = None
        if response.status >= 400:
            message = answer.get("message") if isinstance(answer, dict) else None
            if response.status == 401:
                message = (
                    "it refused the credentials: give its token with --auth-token-file, or its CA and a "
                )
                message += "client certificate with --tlscacert/--tlscert/--tlskey"
            raise PeerError(
                f"the cocon daemon at {self.address} refused: {message or response.reason}", response.status
            )
        return answer
