"""The host<->guest agent protocol: frames on one byte stream (a virtio-serial port in a VM).

Runs in the guest as well as on the host: stdlib only. See docs/agent.md.

A frame is a 10-byte header followed by its payload:

    offset  size  field
    0       4     payload length, big-endian unsigned (at most MAX_PAYLOAD)
    4       1     kind: 1 CONTROL, 2 DATA, 3 EOF
    5       1     stream: 0 stdin, 1 stdout, 2 stderr (0 for CONTROL)
    6       4     process number, big-endian unsigned (0 for CONTROL)

CONTROL carries one JSON object (a request, a reply or an event); DATA carries bytes of one stream of
one process; EOF (empty payload) says that stream ended (host -> guest: close the process's stdin).
"""

from __future__ import annotations

import json
import struct
from typing import Any, NamedTuple

PROTOCOL_VERSION = 1

HEADER = struct.Struct(">IBBI")
HEADER_SIZE = HEADER.size  # 10
MAX_PAYLOAD = 1 << 20  # 1 MiB

CONTROL = 1
DATA = 2
EOF = 3
KINDS = {CONTROL: "CONTROL", DATA: "DATA", EOF: "EOF"}

STDIN = 0
STDOUT = 1
STDERR = 2
STREAMS = {STDIN: "stdin", STDOUT: "stdout", STDERR: "stderr"}
MAX_PROCESS_NUMBER = (1 << 32) - 1

# Exit codes of failed create/exec requests (Docker's mapping).
EXIT_OTHER = 125
EXIT_NOT_EXECUTABLE = 126
EXIT_NOT_FOUND = 127


class ProtocolError(Exception):
    """A malformed frame or control message; the message says what is wrong."""


class Frame(NamedTuple):
    kind: int
    process: int
    stream: int
    payload: bytes

    def control(self) -> dict[str, Any]:
        """The JSON object of a CONTROL frame (ProtocolError if it is not one)."""
        return decode_control(self.payload)


# --- encoding ------------------------------------------------------------------------------------
def _header(kind: int, process: int, stream: int, length: int) -> bytes:
    return HEADER.pack(length, kind, stream, process)


def encode_control(message: dict[str, Any]) -> bytes:
    """One CONTROL frame holding `message` as compact JSON."""
    payload = json.dumps(message, separators=(",", ":"), allow_nan=False).encode()
    if len(payload) > MAX_PAYLOAD:
        raise ProtocolError(
            f"control message of {len(payload)} bytes is larger than the limit of {MAX_PAYLOAD} bytes; "
            "send less in one request"
        )
    return _header(CONTROL, 0, 0, len(payload)) + payload


def encode_data(process: int, stream: int, data: bytes | bytearray | memoryview) -> bytes:
    """DATA frames for `data` (split into frames of at most MAX_PAYLOAD bytes; none for empty data)."""
    _check_target(process, stream)
    view = memoryview(data)
    parts: list[bytes] = []
    for start in range(0, len(view), MAX_PAYLOAD):
        chunk = view[start : start + MAX_PAYLOAD]
        parts.append(_header(DATA, process, stream, len(chunk)))
        parts.append(bytes(chunk))
    return b"".join(parts)


def encode_eof(process: int, stream: int) -> bytes:
    _check_target(process, stream)
    return _header(EOF, process, stream, 0)


def _check_target(process: int, stream: int) -> None:
    if not 0 <= process <= MAX_PROCESS_NUMBER:
        raise ProtocolError(f"process number {process} is out of range 0..{MAX_PROCESS_NUMBER}")
    if stream not in STREAMS:
        raise ProtocolError(f"stream {stream} is not one of 0 (stdin), 1 (stdout), 2 (stderr)")


def decode_control(payload: bytes) -> dict[str, Any]:
    try:
        message = json.loads(payload)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ProtocolError(f"control frame is not valid JSON: {exc}") from None
    if not isinstance(message, dict):
        raise ProtocolError(f"control frame holds a JSON {type(message).__name__}, not an object")
    return message


# --- decoding ------------------------------------------------------------------------------------
class Decoder:
    """Incremental frame decoder for non-blocking readers: feed it whatever bytes arrived.

    A frame with a bad kind, stream or process number is consumed (its length is trusted) and
    reported as a ProtocolError; decoding goes on after it. A length above MAX_PAYLOAD cannot be
    trusted: the decoder is then `broken` and rejects everything until `reset()`.
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        self._ready: list[Frame] = []
        self.broken: str = ""

    def reset(self) -> None:
        """Forget buffered bytes and a broken state (a new connection)."""
        self._buf.clear()
        self._ready.clear()
        self.broken = ""

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def feed(self, data: bytes | bytearray | memoryview) -> list[Frame]:
        """The complete frames in what arrived so far. Raises ProtocolError at the first bad frame;
        frames decoded before it are kept and returned (with later ones) by the next `feed(b"")`."""
        frames, errors = self.feed_collect(data, stop_at_error=True)
        if errors:
            self._ready = frames
            raise errors[0]
        return frames

    def feed_collect(
        self, data: bytes | bytearray | memoryview, *, stop_at_error: bool = False
    ) -> tuple[list[Frame], list[ProtocolError]]:
        """Like `feed`, but returns every good frame and every error (in arrival order per list)."""
        self._buf += data
        frames, self._ready = self._ready, []
        errors: list[ProtocolError] = []
        if self.broken:
            self._buf.clear()
            return frames, [ProtocolError(self.broken)]
        while len(self._buf) >= HEADER_SIZE:
            length, kind, stream, process = HEADER.unpack_from(self._buf)
            if length > MAX_PAYLOAD:
                self.broken = (
                    f"frame header announces {length} bytes, more than the limit of {MAX_PAYLOAD}: "
                    "the stream is corrupt or not cocon's agent protocol; reconnect"
                )
                self._buf.clear()
                errors.append(ProtocolError(self.broken))
                break
            if len(self._buf) < HEADER_SIZE + length:
                break
            payload = bytes(self._buf[HEADER_SIZE : HEADER_SIZE + length])
            del self._buf[: HEADER_SIZE + length]
            problem = _frame_problem(kind, process, stream, length)
            if problem:
                errors.append(ProtocolError(problem))
                if stop_at_error:
                    break
                continue
            frames.append(Frame(kind, process, stream, payload))
        return frames, errors


def _frame_problem(kind: int, process: int, stream: int, length: int) -> str:
    if kind not in KINDS:
        return f"frame of unknown kind {kind} (known: 1 CONTROL, 2 DATA, 3 EOF); frame skipped"
    if kind == CONTROL:
        if stream or process:
            return f"CONTROL frame with stream {stream} and process {process}: both must be 0; frame skipped"
        return ""
    if stream not in STREAMS:
        return (
            f"{KINDS[kind]} frame for stream {stream}: use 0 (stdin), 1 (stdout) or 2 (stderr); frame skipped"
        )
    if kind == EOF and length:
        return f"EOF frame with a payload of {length} bytes: EOF frames are empty; frame skipped"
    return ""


# --- replies -------------------------------------------------------------------------------------
def ok_reply(request_id: Any, **fields: Any) -> dict[str, Any]:
    return {"id": request_id, "ok": True, **fields}


def error_reply(request_id: Any, error: str, exit_code: int = EXIT_OTHER) -> dict[str, Any]:
    return {"id": request_id, "ok": False, "error": error, "exit_code": exit_code}


def exit_code_for(message: str) -> int:
    """Docker's exit code for a failed create/exec, from the runtime's error message."""
    text = message.lower()
    if "executable file not found" in text:
        return EXIT_NOT_FOUND
    if "args[0]" in text and ("permission denied" in text or "not an executable" in text):
        return EXIT_NOT_EXECUTABLE
    return EXIT_OTHER
