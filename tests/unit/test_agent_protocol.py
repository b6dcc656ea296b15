"""The agent protocol's frames (encoding, the incremental decoder, validation) and the host client
against a scripted peer on a socketpair (no agent, no containers)."""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from cocon.vmm import agent_protocol as P
from cocon.vmm.agent_client import AgentClient, AgentError, connect_unix
from cocon.vmm.errors import VmmError


# --- frames ---------------------------------------------------------------------------------------
def test_header_layout_is_fixed() -> None:
    assert P.HEADER_SIZE == 10
    frame = P.encode_data(0x01020304, P.STDERR, b"xy")
    assert frame == b"\x00\x00\x00\x02" + b"\x02" + b"\x02" + b"\x01\x02\x03\x04" + b"xy"
    assert P.encode_eof(7, P.STDIN) == b"\x00\x00\x00\x00\x03\x00\x00\x00\x00\x07"
    control = P.encode_control({"id": 1, "op": "hello"})
    assert control[:10] == P.HEADER.pack(len(control) - 10, P.CONTROL, 0, 0)


def test_round_trip_fed_byte_by_byte() -> None:
    stream = (
        P.encode_control({"id": 1, "op": "hello", "version": 1})
        + P.encode_data(3, P.STDOUT, b"out")
        + P.encode_eof(3, P.STDOUT)
        + P.encode_control({"event": "exit", "process_number": 3, "exit_code": 0})
    )
    dec = P.Decoder()
    frames: list[P.Frame] = []
    for i in range(len(stream)):
        frames += dec.feed(stream[i : i + 1])
    assert dec.buffered == 0
    assert [(f.kind, f.process, f.stream) for f in frames] == [(1, 0, 0), (2, 3, 1), (3, 3, 1), (1, 0, 0)]
    assert frames[0].control() == {"id": 1, "op": "hello", "version": 1}
    assert frames[1].payload == b"out"
    assert frames[3].control()["exit_code"] == 0


def test_large_data_is_split_into_frames() -> None:
    data = os.urandom(P.MAX_PAYLOAD * 2 + 5)
    encoded = P.encode_data(1, P.STDOUT, data)
    frames = P.Decoder().feed(encoded)
    assert [len(f.payload) for f in frames] == [P.MAX_PAYLOAD, P.MAX_PAYLOAD, 5]
    assert b"".join(f.payload for f in frames) == data
    assert P.encode_data(1, P.STDOUT, b"") == b""


def test_encoders_validate() -> None:
    with pytest.raises(P.ProtocolError, match="stream 3"):
        P.encode_data(1, 3, b"x")
    with pytest.raises(P.ProtocolError, match="out of range"):
        P.encode_eof(-1, 0)
    with pytest.raises(P.ProtocolError, match="larger than the limit"):
        P.encode_control({"blob": "x" * P.MAX_PAYLOAD})
    with pytest.raises(ValueError):
        P.encode_control({"nan": float("nan")})


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (P.HEADER.pack(1, 9, 0, 0) + b"x", "unknown kind 9"),
        (P.HEADER.pack(1, P.DATA, 5, 1) + b"x", "stream 5"),
        (P.HEADER.pack(1, P.EOF, 0, 1) + b"x", "EOF frame with a payload of 1 bytes"),
        (P.HEADER.pack(2, P.CONTROL, 1, 0) + b"{}", "CONTROL frame with stream 1"),
        (P.HEADER.pack(2, P.CONTROL, 0, 4) + b"{}", "process 4"),
    ],
)
def test_bad_frame_is_skipped_and_decoding_goes_on(raw: bytes, message: str) -> None:
    good = P.encode_data(2, P.STDOUT, b"after")
    dec = P.Decoder()
    with pytest.raises(P.ProtocolError, match=message):
        dec.feed(P.encode_eof(1, P.STDOUT) + raw + good)
    frames = dec.feed(b"")
    assert [f.payload for f in frames] == [b"", b"after"]  # before and after the bad frame
    frames, errors = P.Decoder().feed_collect(raw + good + raw)
    assert [f.payload for f in frames] == [b"after"] and len(errors) == 2


def test_oversized_length_breaks_the_stream_until_reset() -> None:
    dec = P.Decoder()
    with pytest.raises(P.ProtocolError, match=r"more than the limit of 1048576.*reconnect"):
        dec.feed(P.HEADER.pack(P.MAX_PAYLOAD + 1, P.DATA, 1, 1))
    with pytest.raises(P.ProtocolError, match="more than the limit"):
        dec.feed(P.encode_eof(1, 1))
    dec.reset()
    assert dec.feed(P.encode_eof(1, 1)) == [P.Frame(P.EOF, 1, 1, b"")]


def test_control_payload_must_be_a_json_object() -> None:
    with pytest.raises(P.ProtocolError, match="not valid JSON"):
        P.decode_control(b"{nope")
    with pytest.raises(P.ProtocolError, match="not valid JSON"):
        P.decode_control(b"\xff")
    with pytest.raises(P.ProtocolError, match="JSON list, not an object"):
        P.decode_control(b"[1]")


def test_replies_and_exit_codes() -> None:
    assert P.ok_reply(3, pid=9) == {"id": 3, "ok": True, "pid": 9}
    assert P.error_reply(4, "bad") == {"id": 4, "ok": False, "error": "bad", "exit_code": 125}
    assert P.exit_code_for("process.args[0]: 'x': executable file not found in $PATH") == 127
    assert (
        P.exit_code_for("process.args[0]: '/etc/passwd' is not an executable file (permission denied)") == 126
    )
    assert P.exit_code_for("process.cwd: '/nope' does not exist in the container") == 125


# --- the client against a scripted peer ------------------------------------------------------------
class Peer:
    """The far end of a socketpair, speaking frames by hand."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.decoder = P.Decoder()
        self.frames: list[P.Frame] = []

    def read_frames(self, count: int, timeout: float = 5.0) -> list[P.Frame]:
        self.sock.settimeout(timeout)
        while len(self.frames) < count:
            data = self.sock.recv(65536)
            assert data, "client closed"
            self.frames += self.decoder.feed(data)
        out, self.frames = self.frames[:count], self.frames[count:]
        return out

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)


@pytest.fixture
def pair() -> Iterator[tuple[AgentClient, Peer]]:
    a, b = socket.socketpair()
    client = AgentClient(a)
    peer = Peer(b)
    try:
        yield client, peer
    finally:
        client.close()
        b.close()


def answer_in_thread(peer: Peer, make: Any) -> threading.Thread:
    def run() -> None:
        (frame,) = peer.read_frames(1)
        for data in make(frame.control()):
            peer.send(data)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def test_request_dispatches_other_frames_first_in_order(pair: tuple[AgentClient, Peer]) -> None:
    client, peer = pair
    seen: list[Any] = []
    client.on_output = lambda n, s, d: seen.append(("out", n, s, d))
    client.on_eof = lambda n, s: seen.append(("eof", n, s))
    client.on_exit = lambda n, c: seen.append(("exit", n, c))
    client.on_event = lambda m: seen.append(("event", m["event"]))

    def script(req: dict[str, Any]) -> list[bytes]:
        assert req["op"] == "hello" and req["version"] == P.PROTOCOL_VERSION
        return [
            P.encode_data(1, P.STDOUT, b"a"),
            P.encode_eof(1, P.STDOUT),
            P.encode_control({"event": "exit", "process_number": 1, "exit_code": 3}),
            P.encode_control({"event": "something"}),
            P.encode_control(P.ok_reply(req["id"], version=1, kernel="k", pid=1)),
        ]

    t = answer_in_thread(peer, script)
    reply = client.hello(timeout=5)
    t.join()
    assert reply["kernel"] == "k"
    assert seen == [("out", 1, 1, b"a"), ("eof", 1, 1), ("exit", 1, 3), ("event", "something")]


def test_error_reply_raises_agent_error(pair: tuple[AgentClient, Peer]) -> None:
    client, peer = pair
    t = answer_in_thread(peer, lambda req: [P.encode_control(P.error_reply(req["id"], "no such thing", 127))])
    with pytest.raises(AgentError, match="no such thing") as info:
        client.request("exec", timeout=5, container_id="c")
    t.join()
    assert info.value.exit_code == 127
    assert isinstance(info.value, VmmError)


def test_timeout_and_late_reply(pair: tuple[AgentClient, Peer]) -> None:
    client, peer = pair
    t0 = time.monotonic()
    with pytest.raises(AgentError, match=r"did not answer within 0\.2 s"):
        client.request("stats", timeout=0.2, container_id="c")
    assert 0.2 <= time.monotonic() - t0 < 2
    (frame,) = peer.read_frames(1)
    events: list[dict[str, Any]] = []
    client.on_event = events.append
    peer.send(P.encode_control(P.ok_reply(frame.control()["id"])))  # too late: reported, not crashing
    deadline = time.monotonic() + 5
    while not events and time.monotonic() < deadline:
        client.on_readable()
        time.sleep(0.01)
    assert events and events[0]["error"] == "reply to no pending request"


def test_closed_channel(pair: tuple[AgentClient, Peer]) -> None:
    client, peer = pair
    closed: list[bool] = []
    client.on_closed = lambda: closed.append(True)
    replies: list[dict[str, Any]] = []
    client.request_async("stats", replies.append, container_id="c")
    peer.sock.close()
    with pytest.raises(AgentError, match="closed before the reply"):
        client.request("hello", timeout=5)
    assert closed == [True]
    assert replies and replies[0]["ok"] is False and replies[0]["exit_code"] == 125
    with pytest.raises(AgentError, match="channel is closed"):
        client.request("hello")
    client.send_stdin(1, b"ignored")  # no error once closed
    assert not client.wants_write()


def test_stdin_is_buffered_without_blocking(pair: tuple[AgentClient, Peer]) -> None:
    client, peer = pair
    data = os.urandom(4 << 20)  # more than the socket buffers hold
    t0 = time.monotonic()
    client.send_stdin(5, data)
    client.close_stdin(5)
    assert time.monotonic() - t0 < 1
    assert client.wants_write()
    received: list[P.Frame] = []
    peer.sock.setblocking(False)
    deadline = time.monotonic() + 10
    while not (received and received[-1].kind == P.EOF):
        assert time.monotonic() < deadline
        client.on_writable()
        try:
            received += peer.decoder.feed(peer.sock.recv(1 << 20))
        except BlockingIOError:
            time.sleep(0.001)
    assert not client.wants_write()
    assert b"".join(f.payload for f in received if f.kind == P.DATA) == data
    assert {(f.process, f.stream) for f in received} == {(5, P.STDIN)}


def test_async_request_reply_via_on_readable(pair: tuple[AgentClient, Peer]) -> None:
    client, peer = pair
    replies: list[dict[str, Any]] = []
    rid = client.request_async("start", replies.append, container_id="c")
    (frame,) = peer.read_frames(1)
    assert frame.control() == {"container_id": "c", "id": rid, "op": "start"}
    peer.send(P.encode_control(P.ok_reply(rid)))
    deadline = time.monotonic() + 5
    while not replies and time.monotonic() < deadline:
        client.on_readable()
        time.sleep(0.005)
    assert replies == [{"id": rid, "ok": True}]


def test_connect_unix_retries_until_listening(tmp_path: os.PathLike[str]) -> None:
    path = os.path.join(str(tmp_path), "agent.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)

    def listen_later() -> None:
        time.sleep(0.3)
        server.bind(path)
        server.listen(1)

    t = threading.Thread(target=listen_later, daemon=True)
    t.start()
    try:
        sock = connect_unix(path, timeout=5)
        sock.close()
    finally:
        t.join()
        server.close()
    with pytest.raises(AgentError, match=r"did not accept a connection within 0\.2 s"):
        connect_unix(os.path.join(str(tmp_path), "missing.sock"), timeout=0.2)


# --- the agent's channel queue ----------------------------------------------------------------------
def test_agent_channel_keeps_whole_frames_across_a_disconnect() -> None:
    from cocon.vmm.guest.agent import Channel

    a, b = socket.socketpair()
    try:
        channel = Channel(a.fileno(), is_port=True)
        big = P.encode_data(1, P.STDOUT, b"x" * P.MAX_PAYLOAD)
        small = P.encode_eof(1, P.STDOUT)
        channel.send(big)
        channel.send(small)
        channel.flush()  # the socket takes part of the big frame only
        assert 0 < channel.offset < len(big)
        channel.disconnected()  # the rest of a cut frame is useless to the next host: dropped
        assert list(channel.queue) == [small] and channel.queued == len(small) and channel.offset == 0
        channel.flush()  # nothing is written while no host is connected
        assert channel.queued == len(small)
        b.setblocking(False)
        while True:  # the old host's bytes
            try:
                b.recv(1 << 20)
            except BlockingIOError:
                break
        channel.connected = True
        channel.flush()
        assert channel.queued == 0
        assert P.Decoder().feed(b.recv(100)) == [P.Frame(P.EOF, 1, P.STDOUT, b"")]
    finally:
        a.close()
        b.close()
