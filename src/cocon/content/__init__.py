"""Content-addressed blob store: blobs by digest, atomic commit, garbage collection by reference."""

from cocon.content.errors import (
    BlobCorrupt,
    BlobNotFound,
    ContentError,
    DigestMismatch,
    GCError,
    SizeMismatch,
)
from cocon.content.store import ContentStore, Writer

__all__ = [
    "BlobCorrupt",
    "BlobNotFound",
    "ContentError",
    "ContentStore",
    "DigestMismatch",
    "GCError",
    "SizeMismatch",
    "Writer",
]
