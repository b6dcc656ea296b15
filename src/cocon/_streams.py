"""A readable stream whose first bytes can be looked at (to sniff a format) and are then read again.

Dependency-free, like `_typing` and `_fastjson`: layers, archives and the API's upload handling share it.
"""

from __future__ import annotations

import errno

from cocon._typing import TYPE_CHECKING

if TYPE_CHECKING:
    from typing import Protocol

    class Readable(Protocol):
        def read(self, size: int = -1, /) -> bytes: ...


class Peekable:
    """Wraps a non-seekable stream; `read(n)` returns n bytes unless the stream ends (full reads, as
    readers such as tarfile's stream mode expect)."""

    def __init__(self, raw: Readable) -> None:
        self._raw = raw
        self._head = b""

    def peek(self, n: int) -> bytes:
        while len(self._head) < n:
            data = self._raw.read(n - len(self._head))
            if not data:
                break
            self._head += data
        return self._head[:n]

    def read(self, n: int | None = -1) -> bytes:
        if not self._head:
            return self._raw.read(-1 if n is None else n)
        if n is None or n < 0:
            data, self._head = self._head + self._raw.read(), b""
            return data
        data, self._head = self._head[:n], self._head[n:]
        while len(data) < n:
            more = self._raw.read(n - len(data))
            if not more:
                break
            data += more
        return data

    def seek(self, pos: int, whence: int = 0) -> int:
        raise OSError(errno.ESPIPE, "this stream is not seekable")
