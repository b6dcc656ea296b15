"""OCI content digests (image-spec `descriptor.md`, "Digests"): `algorithm:encoded`.

cocon accepts the two registered algorithms Python's hashlib provides, `sha256` (64 hex digits) and
`sha512` (128), and only in canonical form: lowercase hex, no whitespace. Everything else is a
`DigestError` whose message says what is wrong with the string.
"""

from __future__ import annotations

from cocon._typing import TYPE_CHECKING
from cocon.oci.errors import OCIError

if TYPE_CHECKING:
    from typing import Any

__all__ = [
    "ALGORITHMS",
    "Digest",
    "DigestError",
    "Hasher",
    "as_digest",
    "digest_of",
    "is_lower_hex",
    "sha256_hex",
    "sha256_of",
]

ALGORITHMS: dict[str, int] = {"sha256": 64, "sha512": 128}  # algorithm -> length of its hex part
_LOWER_HEX = "0123456789abcdef"
_ALGORITHM_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789")
_ALGORITHM_SEPARATORS = frozenset("+._-")
# Below this size sha256_hex hashes with the interpreter's own C module; above it with OpenSSL's
# (faster per byte, but `hashlib` costs ~2 ms to import: more than hashing a small document).
_SMALL = 1 << 16


def is_lower_hex(text: str) -> bool:
    """True when `text` has only the digits 0-9 and a-f (an empty string too)."""
    return not text.strip(_LOWER_HEX)


def _algorithm_ok(algorithm: str) -> bool:
    """The image-spec grammar `[a-z0-9]+([+._-][a-z0-9]+)*`."""
    previous_separator = True  # no separator first
    for c in algorithm:
        if c in _ALGORITHM_CHARS:
            previous_separator = False
        elif c in _ALGORITHM_SEPARATORS and not previous_separator:
            previous_separator = True
        else:
            return False
    return not previous_separator  # nor last (and not empty)


class DigestError(OCIError):
    """A string that is not a valid digest, or a digest of an algorithm cocon does not support."""


def _check(algorithm: str, encoded: str, text: str) -> None:
    if algorithm not in ALGORITHMS:
        if not _algorithm_ok(algorithm):
            raise DigestError(f"{text!r} is not a digest: the algorithm {algorithm!r} is malformed")
        supported = ", ".join(ALGORITHMS)
        raise DigestError(f"{text!r}: unsupported digest algorithm {algorithm!r} (supported: {supported})")
    want = ALGORITHMS[algorithm]
    if not is_lower_hex(encoded):
        bad = next(c for c in encoded if c not in _LOWER_HEX)
        hint = " (hex digits must be lowercase)" if bad in "ABCDEF" else ""
        raise DigestError(f"{text!r} is not a valid {algorithm} digest: {bad!r} is not a hex digit{hint}")
    if len(encoded) != want:
        raise DigestError(
            f"{text!r} is not a valid {algorithm} digest: "
            f"expected {want} hex digits after '{algorithm}:', got {len(encoded)}"
        )


class Digest:
    """A validated digest; immutable, hashable, ordered by its string form."""

    __slots__ = ("_algorithm", "_hex")
    _algorithm: str
    _hex: str

    def __init__(self, algorithm: str, hex: str) -> None:
        _check(algorithm, hex, f"{algorithm}:{hex}")
        object.__setattr__(self, "_algorithm", algorithm)
        object.__setattr__(self, "_hex", hex)

    @classmethod
    def parse(cls, text: str) -> Digest:
        """Parse `sha256:<64 hex>` or `sha512:<128 hex>`; raises DigestError saying what is wrong."""
        if not isinstance(text, str):
            kind = type(text).__name__
            raise DigestError(f"a digest is a string like 'sha256:<64 hex digits>', not a {kind}")
        algorithm, sep, encoded = text.partition(":")
        if not sep or not algorithm or not encoded:
            raise DigestError(
                f"{text!r} is not a digest: expected '<algorithm>:<hex>' ('sha256:<64 hex digits>')"
            )
        _check(algorithm, encoded, text)
        obj = object.__new__(cls)
        object.__setattr__(obj, "_algorithm", algorithm)
        object.__setattr__(obj, "_hex", encoded)
        return obj

    @property
    def algorithm(self) -> str:
        return self._algorithm

    @property
    def hex(self) -> str:
        return self._hex

    @property
    def short(self) -> str:
        """The first 12 hex digits, as Docker shows image IDs."""
        return self._hex[:12]

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("Digest is immutable")

    def __str__(self) -> str:
        return f"{self._algorithm}:{self._hex}"

    def __repr__(self) -> str:
        return f"Digest({str(self)!r})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Digest):
            return NotImplemented
        return self._algorithm == other._algorithm and self._hex == other._hex

    def __hash__(self) -> int:
        return hash((self._algorithm, self._hex))

    def __lt__(self, other: Digest) -> bool:
        if not isinstance(other, Digest):
            return NotImplemented
        return str(self) < str(other)

    def __reduce__(self) -> tuple[Any, ...]:
        return (Digest.parse, (str(self),))


def as_digest(value: Digest | str) -> Digest:
    """`value` itself if it is a Digest, else the parsed string."""
    return value if isinstance(value, Digest) else Digest.parse(value)


class Hasher:
    """Incremental digest of a stream: `update()` with each chunk, then `digest()`."""

    __slots__ = ("_algorithm", "_hash", "_size")

    def __init__(self, algorithm: str = "sha256") -> None:
        if algorithm not in ALGORITHMS:
            supported = ", ".join(ALGORITHMS)
            raise DigestError(f"unsupported digest algorithm {algorithm!r} (cocon supports {supported})")
        import hashlib  # here, not at import: see _SMALL

        self._algorithm = algorithm
        self._hash = hashlib.new(algorithm)
        self._size = 0

    @property
    def algorithm(self) -> str:
        return self._algorithm

    @property
    def size(self) -> int:
        """How many bytes have been hashed so far."""
        return self._size

    def update(self, data: bytes | bytearray | memoryview) -> None:
        self._hash.update(data)
        self._size += data.nbytes if isinstance(data, memoryview) else len(data)

    def digest(self) -> Digest:
        """The digest of everything hashed so far (more updates may follow)."""
        return Digest(self._algorithm, self._hash.hexdigest())


def digest_of(data: bytes | bytearray | memoryview, algorithm: str = "sha256") -> Digest:
    h = Hasher(algorithm)
    h.update(data)
    return h.digest()


def sha256_hex(data: bytes | bytearray | memoryview) -> str:
    """The sha256 of `data` as 64 lowercase hex digits."""
    if memoryview(data).nbytes <= _SMALL:
        try:
            import _sha256  # type: ignore[import-not-found]  # CPython's own C module: no OpenSSL to load
        except ImportError:  # pragma: no cover - an interpreter built without it
            pass
        else:
            return str(_sha256.sha256(data).hexdigest())
    import hashlib

    return hashlib.sha256(data).hexdigest()


def sha256_of(data: bytes | bytearray | memoryview) -> Digest:
    return Digest("sha256", sha256_hex(data))
