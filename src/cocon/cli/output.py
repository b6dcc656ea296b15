"""What the CLI prints: tables (rich, laid out like docker's), JSON, sizes and ages, and errors.

Errors are one line on stderr: `cocon: error: <what is wrong and what to do>`.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence
from typing import Any

from cocon._units import human_duration


def error(message: str) -> None:
    text = " ".join(str(message).split("\n"))
    sys.stderr.write(f"cocon: error: {text}\n")
    sys.stderr.flush()


def warning(message: str) -> None:
    sys.stderr.write(f"WARNING: {message}\n")


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    """Columns separated by three spaces, a bold header on a terminal, nothing truncated."""
    from rich.console import Console
    from rich.table import Table

    tty = sys.stdout.isatty()
    console = Console(width=100_000 if not tty else None, highlight=False, soft_wrap=not tty)
    t = Table(
        box=None, pad_edge=False, padding=(0, 3, 0, 0), header_style="bold" if tty else "", show_edge=False
    )
    for h in headers:
        t.add_column(h, no_wrap=True, overflow="ignore" if not tty else "ellipsis")
    for row in rows:
        t.add_row(*[_escape(c) for c in row])
    with console.capture() as cap:
        console.print(t)
    for line in cap.get().splitlines():
        sys.stdout.write(line.rstrip() + "\n")


def _escape(text: str) -> str:
    from rich.markup import escape

    return escape(str(text))


def json_lines(items: Sequence[Any]) -> None:
    """One JSON object per line (docker's `--format json` for listings)."""
    for item in items:
        sys.stdout.write(json.dumps(item, separators=(",", ":")) + "\n")


def json_doc(doc: Any) -> None:
    """An indented JSON document (docker's inspect output)."""
    sys.stdout.write(json.dumps(doc, indent=4) + "\n")


def human_size(n: float) -> str:
    """Docker's HumanSize: decimal units, 3 significant digits (`1.23MB`, `4.1kB`, `0B`)."""
    units = ["B", "kB", "MB", "GB", "TB", "PB"]
    i = 0
    value = float(n)
    while value >= 1000 and i < len(units) - 1:
        value /= 1000
        i += 1
    text = f"{value:.3g}"
    if "e" in text:
        text = f"{value:.0f}"
    return f"{text}{units[i]}"


def time_ago(unix: float) -> str:
    if not unix:
        return "N/A"
    return human_duration(time.time() - unix) + " ago"


def short_id(image_id: str) -> str:
    return image_id.partition(":")[2][:12] if ":" in image_id else image_id[:12]


def truncate(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def for_each(names: Sequence[str], action: Any) -> int:
    """`action(name)` for each name, printing it when done (docker's rm/stop/… output); a failure is
    one error line and the others still run. 1 when any failed."""
    from cocon.api.client import APIError

    failed = False
    for name in names:
        try:
            action(name)
            print(name)
        except APIError as exc:
            error(str(exc))
            failed = True
    return 1 if failed else 0


def inspect_each(names: Sequence[str], get: Any) -> int:
    """`get(name)` for each name, the documents printed as one JSON list (docker's inspect); a
    failure is one error line. 1 when any failed."""
    from cocon.api.client import APIError

    docs = []
    failed = False
    for name in names:
        try:
            docs.append(get(name))
        except APIError as exc:
            error(str(exc))
            failed = True
    json_doc(docs)
    return 1 if failed else 0
