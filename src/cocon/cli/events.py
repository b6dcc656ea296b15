"""`cocon events`: what happens to containers, images, volumes and networks, as `docker events` shows it.

    cocon events [--since TIME] [--until TIME] [--filter KEY=VALUE]... [--format json]

Without `--since`, events from now on are printed as they happen; with it, the history since then
first. With `--until` the stream ends at that time (a time already past: the history only, then the
command exits); without it, it runs until interrupted. TIME is what docker takes: Unix seconds
(`1700000000.5`), an RFC 3339 time (`2024-01-02T15:04:05Z`, or a date `2024-01-02`), or a
duration before now (`10m`, `1h30m`). Filters are docker's: `type`, `event`, `container`, `image`,
`volume`, `network`, `label` (`key` or `key=value`), `scope`, `daemon`; values of one key are
alternatives, different keys must all match.

The default line is docker's:

    2024-01-02T15:04:05.123456789+00:00 container create 5f1e… (image=busybox, name=web)

`--format json` (or docker's `{{json .}}`) prints each event as one JSON object per line, the
`GET /events` message. The command talks to `Client.events` (HTTPClient: the daemon's
`GET /events`; LocalClient reads the engine's event log).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cocon.api.client import Client


def register(sub: Any) -> None:
    """Add the `events` subcommand to `cocon`'s subparsers (`events.register(sub)` in build_parser)."""
    add_arguments(sub.add_parser("events", help="show events (containers, images, volumes, networks) live"))


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = "Show what happens to containers, images, volumes and networks, as it happens."
    p.add_argument("--since", help="show events since TIME: Unix seconds, RFC 3339, or a duration ago (10m)")
    p.add_argument("--until", help="stop at TIME (same forms as --since); without it: until interrupted")
    p.add_argument(
        "-f", "--filter", dest="filters", action="append", default=[], metavar="KEY=VALUE",
        help="only matching events: type, event, container, image, volume, network, label, scope, daemon",
    )  # fmt: skip
    p.add_argument("--format", default="", help="json (one JSON object per line) or the default lines")
    p.set_defaults(func=cmd_events)


def cmd_events(client: Client, args: argparse.Namespace) -> int:
    try:
        filters = parse_filters(args.filters)
        since = to_timestamp(args.since, "--since")
        until = to_timestamp(args.until, "--until")
        as_json = _json_format(args.format)
    except ValueError as exc:
        from cocon.cli.output import error

        error(str(exc))
        return 2
    if since is not None and until is not None and float(since) > float(until):
        from cocon.cli.output import error

        error(f"--since ({args.since}) is after --until ({args.until}): give a since before the until")
        return 2
    out = sys.stdout
    stream = client.events(since=since, until=until, filters=dict(filters or {}))
    try:
        for event in stream:
            out.write((json.dumps(event, separators=(",", ":")) if as_json else format_line(event)) + "\n")
            out.flush()
    finally:
        close = getattr(stream, "close", None)
        if close is not None:
            close()
    return 0


# --- arguments -----------------------------------------------------------------------------------------


def parse_filters(items: Sequence[str]) -> dict[str, list[str]]:
    """`--filter key=value` (repeatable) as Docker's filters map."""
    out: dict[str, list[str]] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip().lower()
        if not sep or not key or not value:
            raise ValueError(f"invalid filter {item!r}: give KEY=VALUE, e.g. type=container or event=die")
        out.setdefault(key, []).append(value)
    return out


def to_timestamp(value: str | None, what: str, now: float | None = None) -> str | None:
    """Docker's --since/--until forms as the Unix seconds the API takes (`1700000000.500000000`)."""
    if value is None or value == "":
        return None
    from cocon.engine.logs import parse_since

    text = value.strip()
    at = time.time() if now is None else now
    try:
        if text.startswith("-") and not _is_number(text):  # a negative duration: after now (Go's -5s)
            seconds = 2 * at - float(parse_since(text[1:], at) or 0)
        else:
            seconds = float(parse_since(text, at) or 0)
    except ValueError as exc:
        raise ValueError(f"{what}: {exc}") from None
    if seconds < 0:
        raise ValueError(f"{what} {value!r} is before 1970: give a later time")
    whole = int(seconds)
    frac = round((seconds - whole) * 1e9)
    if frac >= 1_000_000_000:
        whole, frac = whole + 1, frac - 1_000_000_000
    return f"{whole}.{frac:09d}"


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def _json_format(text: str) -> bool:
    fmt = (text or "").strip()
    if fmt in ("", "table", "pretty"):
        return False
    if fmt in ("json", "{{json .}}", "{{ json . }}"):
        return True
    raise ValueError(f"unsupported --format {text!r}: use json (one JSON object per line) or leave it out")


# --- output --------------------------------------------------------------------------------------------


def format_line(event: Mapping[str, Any]) -> str:
    """docker's default line: time (RFC 3339 with nanoseconds, local zone), type, action, actor ID,
    then the attributes sorted by key in parentheses."""
    nanos = int(event.get("timeNano") or int(event.get("time") or 0) * 1_000_000_000)
    secs, ns = divmod(nanos, 1_000_000_000)
    local = time.localtime(secs)
    offset = local.tm_gmtoff or 0
    hours, minutes = abs(offset) // 3600, abs(offset) % 3600 // 60
    zone = "Z" if offset == 0 else f"{'+' if offset > 0 else '-'}{hours:02d}:{minutes:02d}"
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", local) + f".{ns:09d}{zone}"
    actor = event.get("Actor") or {}
    kind = event.get("Type") or ""
    action = event.get("Action") or event.get("status") or ""
    ident = actor.get("ID") or event.get("id") or ""
    line = f"{stamp} {kind} {action} {ident}"
    attrs = actor.get("Attributes") or {}
    if attrs:
        line += " (" + ", ".join(f"{k}={attrs[k]}" for k in sorted(attrs)) + ")"
    return line
