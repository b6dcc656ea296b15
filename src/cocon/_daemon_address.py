"""The address of a cocon daemon's API, as `cocon daemon -H` takes it and `cocon vm migrate --to`
names another daemon: `unix:///PATH` or `tcp://ADDR:PORT` (IPv6 as `tcp://[::1]:2376`).

Light on purpose (no dataclasses, no socket): the CLI's parser is built from cocon.api.daemon, which
uses it."""

from __future__ import annotations

from cocon._typing import record


@record
class DaemonAddress:
    kind: str  # "unix" or "tcp"
    path: str = ""
    host: str = ""
    port: int = 0

    def __str__(self) -> str:
        if self.kind == "unix":
            return f"unix://{self.path}"
        return f"tcp://[{self.host}]:{self.port}" if ":" in self.host else f"tcp://{self.host}:{self.port}"


def parse_daemon_address(text: str) -> DaemonAddress:
    """The address in `text`; ValueError saying what to give instead."""
    if text.startswith("unix://"):
        path = text[len("unix://") :]
        if not path.startswith("/"):
            raise ValueError("give an absolute socket path, e.g. unix:///run/cocon/cocon.sock")
        return DaemonAddress("unix", path=path)
    if text.startswith("tcp://"):
        rest = text[len("tcp://") :].rstrip("/")
        if rest.startswith("["):
            host, _, port_text = rest[1:].partition("]:")
        else:
            host, _, port_text = rest.rpartition(":")
        if not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
            raise ValueError("give tcp://ADDR:PORT, e.g. tcp://127.0.0.1:2376")
        return DaemonAddress("tcp", host=host, port=int(port_text))
    raise ValueError("use unix:///path or tcp://ADDR:PORT")
