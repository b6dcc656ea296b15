"""OCI digests and ChainIDs (image-spec `config.md`, "Layer ChainID")."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence

from cocon.snapshots.errors import SnapshotError

_DIGEST = re.compile(r"(sha256:[0-9a-f]{64}|sha512:[0-9a-f]{128})")


def validate_digest(value: str, what: str = "digest") -> str:
    """Return `value` if it is a canonical sha256/sha512 digest (`algo:lowercase-hex`), else raise."""
    if not isinstance(value, str) or not _DIGEST.fullmatch(value):
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
            chain.append("sha256:" + hashlib.sha256(f"{chain[-1]} {diff_id}".encode()).hexdigest())
    return chain
