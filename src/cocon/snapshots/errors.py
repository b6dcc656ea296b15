"""The snapshots layer's one exception family."""

from __future__ import annotations

import os


class SnapshotError(Exception):
    """A snapshot or layer operation failed; the message says what to do about it."""


def errtext(e: OSError) -> str:
    """The plain reason of an OSError ("Device or resource busy"), without the call it came from."""
    return os.strerror(e.errno) if e.errno else str(e)
