"""The embedded DNS resolver: instances of a network find each other by name and alias.

One `DnsService` runs an asyncio loop in a background thread and listens, for each user-defined
network, on the network's gateway address, port 53, UDP and TCP. A query for a name that the
network's lookup function knows (instance names and aliases, case-insensitive, with or without a
trailing dot or the service's `domain`) gets A/AAAA answers (or an empty NOERROR answer for other
types: the name exists); any other name is forwarded as is to the upstream resolvers (by default
the host's, from /etc/resolv.conf) and their answer relayed; with no upstreams, or when they all
fail, the answer is NXDOMAIN resp. SERVFAIL. No third-party DNS code: the wire format needed here
(one question, A/AAAA answers) is small and parsed strictly — malformed queries get FORMERR or are
dropped.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import struct
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Any, cast

from cocon.network.errors import NetworkError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Lookup = Callable[[str], Sequence[IPAddress] | None]

TYPE_A = 1
TYPE_AAAA = 28
CLASS_IN = 1
RCODE_OK, RCODE_FORMERR, RCODE_SERVFAIL, RCODE_NXDOMAIN, RCODE_NOTIMP = 0, 1, 2, 3, 4
IP_FREEBIND = 15
IPV6_FREEBIND = 78


def read_resolv_conf(path: str = "/etc/resolv.conf") -> list[tuple[str, int]]:
    """The `nameserver` lines of resolv.conf as (address, 53)."""
    out: list[tuple[str, int]] = []
    try:
        with open(path) as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 2 and parts[0] == "nameserver":
                    try:
                        ipaddress.ip_address(parts[1].split("%")[0])
                    except ValueError:
                        continue
                    out.append((parts[1], 53))
    except OSError:
        pass
    return out


class DnsFormatError(Exception):
    pass


def parse_question(packet: bytes) -> tuple[int, int, str, int, int, int]:
    """(id, flags, name, qtype, qclass, end offset of the question) of a query with one question."""
    if len(packet) < 12:
        raise DnsFormatError("short header")
    ident, flags, qdcount = struct.unpack_from("!HHH", packet, 0)
    if qdcount != 1:
        raise DnsFormatError("not one question")
    labels: list[str] = []
    pos = 12
    while True:
        if pos >= len(packet):
            raise DnsFormatError("truncated name")
        length = packet[pos]
        pos += 1
        if length == 0:
            break
        if length > 63:
            raise DnsFormatError("compressed or bad label in a question")
        label = packet[pos : pos + length]
        if len(label) != length:
            raise DnsFormatError("truncated label")
        labels.append(label.decode("ascii", "replace"))
        pos += length
    if pos + 4 > len(packet):
        raise DnsFormatError("truncated question")
    qtype, qclass = struct.unpack_from("!HH", packet, pos)
    return ident, flags, ".".join(labels), qtype, qclass, pos + 4


def build_query(name: str, qtype: int = TYPE_A, ident: int = 0x1234) -> bytes:
    """A standard recursive query (used by tests and health checks)."""
    qname = b"".join(bytes([len(p)]) + p.encode() for p in name.rstrip(".").split(".") if p) + b"\0"
    return struct.pack("!HHHHHH", ident, 0x0100, 1, 0, 0, 0) + qname + struct.pack("!HH", qtype, CLASS_IN)


def parse_answers(packet: bytes) -> tuple[int, list[IPAddress]]:
    """(rcode, A/AAAA addresses) of a response (used by tests)."""
    _ident, flags, _name, _qt, _qc, pos = parse_question(packet)
    ancount = struct.unpack_from("!H", packet, 6)[0]
    out: list[IPAddress] = []
    for _ in range(ancount):
        if packet[pos] & 0xC0 == 0xC0:
            pos += 2
        else:
            while packet[pos] != 0:
                pos += packet[pos] + 1
            pos += 1
        rtype, _rclass, _ttl, rdlen = struct.unpack_from("!HHIH", packet, pos)
        pos += 10
        data = packet[pos : pos + rdlen]
        pos += rdlen
        if rtype == TYPE_A and rdlen == 4:
            out.append(ipaddress.IPv4Address(data))
        elif rtype == TYPE_AAAA and rdlen == 16:
            out.append(ipaddress.IPv6Address(data))
    return flags & 0xF, out


class Resolver:
    """Answers one network's queries: local names through `lookup`, the rest through `upstreams`."""

    def __init__(
        self,
        lookup: Lookup,
        *,
        upstreams: Sequence[tuple[str, int]] = (),
        domain: str | None = None,
        ttl: int = 5,
        timeout: float = 2.0,
    ) -> None:
        self.lookup = lookup
        self.upstreams = list(upstreams)
        self.domain = domain.strip(".").lower() if domain else None
        self.ttl = ttl
        self.timeout = timeout

    def local(self, query: bytes) -> bytes | None:
        """The answer if the name is local (or the query bad); None: forward it."""
        try:
            ident, flags, name, qtype, qclass, end = parse_question(query)
        except DnsFormatError:
            if len(query) < 12:
                return None
            return self._reply(query[:2], 0, b"", RCODE_FORMERR, [], question_count=0)
        question = query[12:end]
        if flags & 0x8000:  # a response, not a query
            return None
        if (flags >> 11) & 0xF != 0:
            return self._reply(query[:2], flags, question, RCODE_NOTIMP, [])
        key = name.lower().rstrip(".")
        if self.domain and key.endswith("." + self.domain):
            key = key[: -len(self.domain) - 1]
        found = self.lookup(key) if key else None
        if found is None:
            if self.upstreams and qclass == CLASS_IN:
                return None
            return self._reply(query[:2], flags, question, RCODE_NXDOMAIN, [])
        answers: list[bytes] = []
        for address in found:
            if (qtype == TYPE_A and address.version == 4) or (qtype == TYPE_AAAA and address.version == 6):
                rtype = TYPE_A if address.version == 4 else TYPE_AAAA
                answers.append(
                    struct.pack("!HHHIH", 0xC00C, rtype, CLASS_IN, self.ttl, len(address.packed))
                    + address.packed
                )
        _ = ident
        return self._reply(query[:2], flags, question, RCODE_OK, answers, authoritative=True)

    def _reply(
        self,
        ident: bytes,
        flags: int,
        question: bytes,
        rcode: int,
        answers: list[bytes],
        *,
        authoritative: bool = False,
        question_count: int = 1,
    ) -> bytes:
        out_flags = 0x8000 | (flags & 0x7800) | (flags & 0x0100) | rcode
        if authoritative:
            out_flags |= 0x0400
        if self.upstreams:
            out_flags |= 0x0080
        header = ident + struct.pack("!HHHHH", out_flags, question_count, len(answers), 0, 0)
        return header + question + b"".join(answers)

    async def resolve(self, query: bytes) -> bytes | None:
        answer = self.local(query)
        if answer is not None or len(query) < 12:
            return answer
        try:
            parse_question(query)
        except DnsFormatError:
            return None
        for host, port in self.upstreams:
            try:
                return await asyncio.wait_for(_udp_exchange(host, port, query), self.timeout)
            except (TimeoutError, OSError):
                continue
        _id, flags, _n, _t, _c, end = parse_question(query)
        return self._reply(query[:2], flags, query[12:end], RCODE_SERVFAIL, [])


class _Exchange(asyncio.DatagramProtocol):
    def __init__(self, query: bytes, done: asyncio.Future[bytes]) -> None:
        self.query = query
        self.done = done

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        cast("asyncio.DatagramTransport", transport).sendto(self.query)

    def datagram_received(self, data: bytes, addr: Any) -> None:
        if not self.done.done() and data[:2] == self.query[:2]:
            self.done.set_result(data)

    def error_received(self, exc: Exception) -> None:
        if not self.done.done():
            self.done.set_exception(exc)


async def _udp_exchange(host: str, port: int, query: bytes) -> bytes:
    loop = asyncio.get_running_loop()
    done: asyncio.Future[bytes] = loop.create_future()
    transport, _ = await loop.create_datagram_endpoint(
        lambda: _Exchange(query, done), remote_addr=(host, port)
    )
    try:
        return await done
    finally:
        transport.close()


class _UdpServer(asyncio.DatagramProtocol):
    def __init__(self, resolver: Resolver) -> None:
        self.resolver = resolver
        self.transport: asyncio.DatagramTransport | None = None
        self.pending: set[asyncio.Task[None]] = set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast("asyncio.DatagramTransport", transport)

    def datagram_received(self, data: bytes, addr: Any) -> None:
        task = asyncio.ensure_future(self._answer(data, addr))
        self.pending.add(task)
        task.add_done_callback(self.pending.discard)

    async def _answer(self, data: bytes, addr: Any) -> None:
        answer = await self.resolver.resolve(data)
        if answer is not None and self.transport is not None:
            self.transport.sendto(answer, addr)


def _bound_socket(host: str, port: int, kind: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, kind)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        # the gateway address may still be tentative or the bridge down: bind anyway
        if family == socket.AF_INET:
            sock.setsockopt(socket.IPPROTO_IP, IP_FREEBIND, 1)
        else:
            sock.setsockopt(socket.IPPROTO_IPV6, IPV6_FREEBIND, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((host, port))
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


class DnsService:
    """DNS listeners (UDP and TCP per address) served by one asyncio loop in a daemon thread.
    Thread-safe: `listen`/`unlisten`/`close` may be called from any thread."""

    def __init__(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="cocon-dns", daemon=True)
        self._thread.start()
        self._listeners: dict[str, tuple[asyncio.DatagramTransport, asyncio.base_events.Server]] = {}

    def _call(self, coro: Any) -> Any:
        fut: Future[Any] = asyncio.run_coroutine_threadsafe(coro, self._loop)
        return fut.result(timeout=10)

    def listen(self, key: str, host: str, port: int, resolver: Resolver) -> None:
        """Serve `resolver` on host:port (UDP+TCP) under `key` (replacing what `key` served)."""
        self.unlisten(key)
        try:
            self._call(self._listen(key, host, port, resolver))
        except OSError as exc:
            raise NetworkError(
                f"cannot listen for DNS on {host} port {port}: {exc}; is another resolver bound there?"
            ) from None

    async def _listen(self, key: str, host: str, port: int, resolver: Resolver) -> None:
        loop = asyncio.get_running_loop()
        udp_sock = _bound_socket(host, port, socket.SOCK_DGRAM)
        try:
            tcp_sock = _bound_socket(host, port, socket.SOCK_STREAM)
        except OSError:
            udp_sock.close()
            raise
        transport, _ = await loop.create_datagram_endpoint(lambda: _UdpServer(resolver), sock=udp_sock)

        async def on_tcp(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                while True:
                    size = struct.unpack("!H", await reader.readexactly(2))[0]
                    answer = await resolver.resolve(await reader.readexactly(size))
                    if answer is None:
                        break
                    writer.write(struct.pack("!H", len(answer)) + answer)
                    await writer.drain()
            except (asyncio.IncompleteReadError, OSError):
                pass
            finally:
                writer.close()

        server = await asyncio.start_server(on_tcp, sock=tcp_sock)
        self._listeners[key] = (transport, server)

    def unlisten(self, key: str) -> None:
        if key in self._listeners:
            self._call(self._unlisten(key))

    async def _unlisten(self, key: str) -> None:
        found = self._listeners.pop(key, None)
        if found is not None:
            transport, server = found
            transport.close()
            server.close()
            await server.wait_closed()

    def keys(self) -> list[str]:
        return list(self._listeners)

    def close(self) -> None:
        if not self._loop.is_running():
            return
        for key in list(self._listeners):
            self.unlisten(key)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()
