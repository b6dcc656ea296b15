"""The content layer's one exception family."""

from __future__ import annotations

from cocon._typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cocon.oci.digest import Digest


class ContentError(Exception):
    """A content-store operation failed; the message says what to do about it."""


class BlobNotFound(ContentError):
    """No blob with that digest is in the store."""

    def __init__(self, digest: Digest, message: str | None = None) -> None:
        self.digest = digest
        super().__init__(message or f"blob {digest} is not in the content store (pull or import it first)")


class DigestMismatch(ContentError):
    """Written data is not what the writer was told to expect; nothing was stored."""

    def __init__(self, message: str, expected: object = None, actual: object = None) -> None:
        self.expected = expected
        self.actual = actual
        super().__init__(message)


class SizeMismatch(DigestMismatch):
    """Written data is longer or shorter than the expected size; nothing was stored."""


class BlobCorrupt(ContentError):
    """A stored blob no longer hashes to its digest (disk corruption, or edited by hand)."""

    def __init__(self, digest: Digest, actual: Digest) -> None:
        self.digest = digest
        self.actual = actual
        super().__init__(
            f"blob {digest} is corrupt: its content now hashes to {actual}; "
            "delete it and pull or import the image again"
        )


class GCError(ContentError):
    """Garbage collection stopped before deleting anything."""
