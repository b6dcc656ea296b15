"""JSON through CPython's C accelerator (`_json`) directly, without importing `json`.

`import json` costs the runtime's hot path more than all the decoding it does, because
`json.decoder` compiles regular expressions (and imports `re`, `enum`, ...) at import time; the C
scanner and encoder need none of that. Output and errors match the `json` module's (errors are
raised as `ValueError`). Use `json` itself where speed does not matter (indented output).
"""

from __future__ import annotations

import _json

from cocon._typing import TYPE_CHECKING

if TYPE_CHECKING:
    from typing import Any


class _Context:
    """What `_json.make_scanner` reads from a decoder: json.JSONDecoder's defaults."""

    strict = True
    object_hook = None
    object_pairs_hook = None
    parse_float = float
    parse_int = int
    memo: dict[Any, Any] = {}

    @staticmethod
    def parse_constant(name: str) -> float:
        return {"-Infinity": float("-inf"), "Infinity": float("inf"), "NaN": float("nan")}[name]


_scan = _json.make_scanner(_Context())  # type: ignore[arg-type]
_WHITESPACE = " \t\n\r"


def loads(data: bytes | str) -> Any:
    """Decode one JSON document (bytes must be UTF-8)."""
    text = data.decode("utf-8") if isinstance(data, bytes | bytearray) else data
    start = len(text) - len(text.lstrip(_WHITESPACE))
    try:
        value, end = _scan(text, start)
    except StopIteration as exc:
        raise ValueError(f"Expecting value: char {exc.value}") from None
    except (ValueError, SystemError):
        # The C scanner builds its error from json.decoder, which may not be imported yet: let the
        # json module report the error itself (this path is rare, so its import cost is fine).
        import json

        json.loads(text)
        raise
    finally:
        _Context.memo.clear()
    if text[end:].strip(_WHITESPACE):
        raise ValueError(f"Extra data: char {end}")
    return value


def _default(obj: Any) -> Any:
    raise TypeError(f"Object of type {type(obj).__name__} is not JSON serializable")


_encode = _json.make_encoder(
    None, _default, _json.encode_basestring_ascii, None, ": ", ", ", False, False, True
)


def dumps(obj: Any) -> str:
    """Encode compactly on one line (as json.dumps(obj) with its default separators)."""
    return "".join(_encode(obj, 0))
