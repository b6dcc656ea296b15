"""Container logs: conmon's k8s-file format, read with Docker's `logs` semantics.

conmon writes one line per chunk of output:

    2026-11-25T13:40:31.027160566+00:00 stdout F hello
    <RFC 3339 time, nanoseconds, offset> <stdout|stderr> <F: full line | P: partial> <text>

A `P` line is the start of a longer line (or output without a newline yet); the next lines of the
same stream continue it. `read_logs` rebuilds Docker's records: (stream, time, bytes with the
newline), filtered by `since`/`until` (Unix seconds), the last `tail` of them, and `follow`s the file
while the container runs. With `--log-opt max-size=N` conmon starts the file afresh when it would
grow beyond N (the older lines are dropped: conmon keeps one file; `max-file` is accepted and has
no further effect — see docs/lifecycle.md).
"""

from __future__ import annotations

import os
import time

from cocon._typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from typing import BinaryIO

    Entry = tuple[str, float, str, bytes]  # stream, unix time, the RFC 3339 text, the line


def log_files(path: str) -> list[str]:
    """The log file and its rotated predecessors (`path.1` … oldest last), oldest first."""
    files = []
    n = 1
    while os.path.exists(f"{path}.{n}"):
        files.append(f"{path}.{n}")
        n += 1
    files.reverse()
    if os.path.exists(path):
        files.append(path)
    return files


def parse_time(text: str) -> float:
    """RFC 3339 with nanoseconds and a numeric offset or Z, as Unix seconds."""
    import calendar

    date, _, rest = text.partition("T")
    clock = rest
    offset = 0
    if clock.endswith("Z"):
        clock = clock[:-1]
    else:
        for sign in ("+", "-"):
            i = clock.rfind(sign)
            if i > 0:
                hh, _, mm = clock[i + 1 :].partition(":")
                offset = (int(hh) * 3600 + int(mm or 0) * 60) * (1 if sign == "+" else -1)
                clock = clock[:i]
                break
    hms, _, frac = clock.partition(".")
    y, mo, d = (int(x) for x in date.split("-"))
    h, mi, s = (int(x) for x in hms.split(":"))
    secs = calendar.timegm((y, mo, d, h, mi, s, 0, 0, 0)) - offset
    return secs + (int(frac) / 10 ** len(frac) if frac else 0.0)


def docker_time(t: float, text: str = "") -> str:
    """Docker's `logs -t` format: RFC 3339 in UTC with nanoseconds."""
    frac = text.partition(".")[2][:9] if text else ""
    digits = "".join(c for c in frac if c.isdigit()) or f"{int((t % 1) * 1e9):09d}"
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(int(t))) + f".{digits:0<9}Z"


def parse_since(value: str | None, now: float | None = None) -> float | None:
    """Docker's --since/--until: Unix seconds (with fraction), RFC 3339, or a duration ago (10m, 1h30m)."""
    if value is None or value == "":
        return None
    now = time.time() if now is None else now
    try:
        return float(value)
    except ValueError:
        pass
    if "T" in value or (len(value) == 10 and value[4:5] == "-"):
        try:
            return parse_time(value if "T" in value else value + "T00:00:00Z")
        except (ValueError, IndexError):
            pass
    total = 0.0
    num = ""
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
    i = 0
    try:
        while i < len(value):
            c = value[i]
            if c.isdigit() or c == ".":
                num += c
                i += 1
                continue
            unit = "ms" if value[i : i + 2] == "ms" else c
            total += float(num) * units[unit]
            num = ""
            i += len(unit)
        if num:
            raise KeyError(num)
    except (KeyError, ValueError):
        raise ValueError(
            f"invalid time {value!r}: give Unix seconds, an RFC 3339 time, or a duration like 10m or 1h30m"
        ) from None
    return now - total


def _entries(data: bytes, pending: dict[str, tuple[float, str, bytes]]) -> Iterator[Entry]:
    for raw in data.split(b"\n"):
        if not raw:
            continue
        parts = raw.split(b" ", 3)
        if len(parts) < 3:
            continue
        stamp, stream, tag = parts[0].decode(), parts[1].decode(), parts[2]
        text = parts[3] if len(parts) > 3 else b""
        try:
            t = parse_time(stamp)
        except (ValueError, IndexError):
            continue
        if stream in pending:
            t0, s0, prev = pending.pop(stream)
            t, stamp, text = t0, s0, prev + text
        if tag == b"P":
            pending[stream] = (t, stamp, text)
            continue
        yield stream, t, stamp, text + b"\n"


def open_log_files(files: list[str]) -> list[tuple[str, BinaryIO]]:
    """Open the log files now, for `read_logs`: what they hold stays readable even when the
    container (and its log directory) is removed right after (docker-py's `run(remove=True)` reads
    the log stream only after removing the container)."""
    out: list[tuple[str, BinaryIO]] = []
    for path in files:
        try:
            out.append((path, open(path, "rb")))  # noqa: SIM115 - read_logs closes them
        except OSError:
            continue
    return out


def read_logs(
    files: list[str] | list[tuple[str, BinaryIO]],
    *,
    stdout: bool = True,
    stderr: bool = True,
    since: float | None = None,
    until: float | None = None,
    tail: int | None = None,
    follow: bool = False,
    running: Callable[[], bool] | None = None,
    poll: float = 0.1,
) -> Iterator[Entry]:
    """The log records, oldest first (see the module docstring). With `follow`, new records as they
    are written until `running()` says the container stopped (and the file has no more)."""
    pending: dict[str, tuple[float, str, bytes]] = {}

    def keep(e: Entry) -> bool:
        if (e[0] == "stdout" and not stdout) or (e[0] == "stderr" and not stderr):
            return False
        if since is not None and e[1] < since:
            return False
        return not (until is not None and e[1] > until)

    # paths are opened now; open_log_files' pairs were opened by the caller (before it answered)
    pairs = [f for f in files if isinstance(f, tuple)] or open_log_files(
        [f for f in files if isinstance(f, str)]
    )
    live = pairs[-1][1] if pairs else None
    try:
        yield from _read(pairs, live, keep, pending, tail, follow, running, poll)
    finally:
        for _path, f in pairs:
            f.close()


def _read(
    pairs: list[tuple[str, BinaryIO]],
    live: BinaryIO | None,
    keep: Callable[[Entry], bool],
    pending: dict[str, tuple[float, str, bytes]],
    tail: int | None,
    follow: bool,
    running: Callable[[], bool] | None,
    poll: float,
) -> Iterator[Entry]:
    entries: list[Entry] = []
    offset = 0
    for _path, f in pairs:
        data = f.read()
        if f is live:
            offset = f.tell()
        # only complete lines now; a partial one at the end of the live file comes when following
        if f is live and not data.endswith(b"\n") and b"\n" in data:
            cut = data.rindex(b"\n") + 1
            offset -= len(data) - cut
            data = data[:cut]
        elif f is live and not data.endswith(b"\n"):
            offset -= len(data)
            data = b""
        entries.extend(e for e in _entries(data, pending) if keep(e))
    if not follow:
        entries.extend(e for e in _flush(pending) if keep(e))
    if tail is not None and tail >= 0:
        entries = entries[-tail:] if tail else []
    yield from entries
    if not follow or live is None:
        return
    path = pairs[-1][0]
    current = live  # the file read: the one opened, or the path's new file once conmon started afresh
    buf = b""
    try:
        while True:
            alive = running() if running is not None else False
            current.seek(offset)
            got = current.read()
            offset += len(got)
            if not got:
                try:
                    st = os.stat(path)
                except OSError:
                    st = None  # removed: what was written is in the file we hold
                if st is not None and st.st_ino != os.fstat(current.fileno()).st_ino:  # started afresh
                    try:
                        fresh = open(path, "rb")  # noqa: SIM115 - closed below
                    except OSError:
                        fresh = None
                    if fresh is not None:
                        if current is not live:
                            current.close()
                        current, offset = fresh, 0
                        continue
                elif st is not None and st.st_size < offset:  # truncated in place (max-size)
                    offset = 0
                    continue
            if got:
                buf += got
                if b"\n" in buf:
                    cut = buf.rindex(b"\n") + 1
                    chunk, buf = buf[:cut], buf[cut:]
                    for e in _entries(chunk, pending):
                        if keep(e):
                            yield e
                continue
            if not alive:
                for e in _flush(pending):
                    if keep(e):
                        yield e
                return
            time.sleep(poll)
    finally:
        if current is not live:
            current.close()


def _flush(pending: dict[str, tuple[float, str, bytes]]) -> list[Entry]:
    """Output that never got its newline (the process ended), as it is."""
    out = [(stream, t, stamp, text) for stream, (t, stamp, text) in pending.items()]
    pending.clear()
    return sorted(out, key=lambda e: e[1])
