"""OCI digests and ChainIDs (image-spec `config.md`, "Layer ChainID")."""

from __future__ import annotations

from cocon._typing import TYPE_CHECKING
from cocon.oci.digest import is_lower_hex, sha256_hex
from cocon.snapshots.errors import SnapshotError

if TYPE_CHECKING:
    from collections.abc import Sequence

_HEX_LENGTHS = {"sha256": 64, "sha512": 128}


def is_digest(value: object) -> bool:
    """True for a canonical sha256/sha512 digest: `sha256:` and 64 lowercase hex digits (or `sha512:`
    and 128)."""
    if not isinstance(value, str):
        return False
    algorithm, colon, encoded = value.partition(":")
    return bool(colon) and len(encoded) == _HEX_LENGTHS.get(algorithm) and is_lower_hex(encoded)


def validate_digest(value: str, what: str = "digest") -> str:
    """Return `value` if it is a canonical sha256/sha512 digest (`algo:lowercase-hex`), else raise."""
    if not is_digest(value):
        raise SnapshotError(
            f"invalid {what} {value!r}: expected 'sha256:' and 64 lowercase hex digits (or 'sha512:' and 128)"
        )
    return value


def digest_hex(value: str) -> str:
    """The hex part of a validated digest."""
    return validate_digest(value).split(":", 1)[1]


def chain_ids(diff_ids: Sequence[str]) -> list[str]:
    """ChainIDs of a layer stack given its DiffIDs, lowest layer first.

    ChainID(L0) = DiffID(L0); ChainID(L0..Ln) = sha256(ChainID(L0..Ln-1) + " " + DiffID(Ln)).
    """
    if isinstance(diff_ids, str):
        raise SnapshotError("chain_ids takes a sequence of diff ids, not a single string")
    chain: list[str] = []
    for diff_id in diff_ids:
        validate_digest(diff_id, "diff id")
        if not chain:
            chain.append(diff_id)
        else:
            chain.append("sha256:" + sha256_hex(f"{chain[-1]} {diff_id}".encode()))
    return chain
