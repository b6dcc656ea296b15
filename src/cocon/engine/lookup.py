"""Image lookups for `cocon run`'s hot path, without importing the image store.

`cocon.images.store` (dataclasses, `re`, the typed image documents, the content store) costs tens of
milliseconds to import, more than the rest of a container's start. For the common case — a plain
name like `busybox` or `team/app:1`, or an image ID — this module answers from the image store's
own database (`images.db`, read with `_sqlite3`) and the image's config blob, read straight from the
content store's `blobs/` tree. Anything it is not sure about (digests, odd references, errors)
returns None, and the caller asks the real `ImageStore`, which gives the authoritative answer and the
error message. Nothing here writes.
"""

from __future__ import annotations

import _sqlite3
import os

from cocon import _fastjson
from cocon._typing import TYPE_CHECKING, record

if TYPE_CHECKING:
    from typing import Any

_LOWER_ALNUM = frozenset("abcdefghijklmnopqrstuvwxyz0123456789")
_NAME_CHARS = _LOWER_ALNUM | frozenset("._-/")
_TAG_CHARS = _LOWER_ALNUM | frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZ_.-")
_HEX = frozenset("0123456789abcdef")


@record(frozen=True)
class ImageInfo:
    """What running an image needs: its ID, its config's `config` object (Docker's JSON names), the
    ChainIDs of its layers (lowest first) and the raw config blob."""

    id: str
    config: dict[str, Any]
    chain_ids: tuple[str, ...]
    config_blob: bytes


def _component_ok(part: str) -> bool:
    """A path component: lowercase alnum runs joined by `.`, `_`, `__` or dashes."""
    if not part or part[0] not in _LOWER_ALNUM or part[-1] not in _LOWER_ALNUM:
        return False
    if any(c not in _NAME_CHARS or c == "/" for c in part):
        return False
    # separators: one '.', one or two '_', or any number of '-'; never mixed or doubled dots
    i = 0
    while i < len(part):
        if part[i] in _LOWER_ALNUM:
            i += 1
            continue
        j = i
        while j < len(part) and part[j] not in _LOWER_ALNUM:
            j += 1
        sep = part[i:j]
        if not (sep in (".", "_", "__") or set(sep) == {"-"}):
            return False
        i = j
    return True


def fast_normalize(text: str) -> str | None:
    """`busybox` → `docker.io/library/busybox:latest` for the plain forms (lowercase name, optional
    domain without port, optional tag, no digest); None when the image store must decide."""
    if not text or "@" in text or len(text) > 255:
        return None
    name, tag = text, "latest"
    slash = text.rfind("/")
    colon = text.rfind(":")
    if colon > slash:
        name, tag = text[:colon], text[colon + 1 :]
        if not tag or len(tag) > 128 or tag[0] in ".-" or any(c not in _TAG_CHARS for c in tag):
            return None
    if ":" in name:  # a registry port: leave it to the full parser
        return None
    parts = name.split("/")
    first = parts[0]
    domain = "docker.io"
    if len(parts) > 1 and ("." in first or first == "localhost"):
        domain = first
        parts = parts[1:]
        if not all(c in _LOWER_ALNUM or c in ".-" for c in domain) or domain in (
            "docker.io",
            "index.docker.io",
        ):
            return None
    if not parts or not all(_component_ok(p) for p in parts):
        return None
    path = "/".join(parts)
    if domain == "docker.io" and len(parts) == 1:
        path = "library/" + path
    return f"{domain}/{path}:{tag}"


def _open_ro(path: str) -> _sqlite3.Connection | None:
    if not os.path.exists(path):
        return None
    try:
        return _sqlite3.connect(path, timeout=30, isolation_level=None, check_same_thread=False)
    except _sqlite3.Error:
        return None


def resolve_id(root: str, text: str) -> str | None:
    """The image ID `text` names (a plain name, or a full or unique partial ID), or None when unsure."""
    db = _open_ro(os.path.join(root, "images.db"))
    if db is None:
        return None
    try:
        name = fast_normalize(text)
        if name is not None:
            row = db.execute("SELECT image FROM names WHERE name = ?", (name,)).fetchone()
            if row is not None:
                return str(row[0])
        hexpart = text.removeprefix("sha256:")
        if 0 < len(hexpart) <= 64 and all(c in _HEX for c in hexpart):
            prefix = "sha256:" + hexpart
            rows = db.execute(
                "SELECT id FROM images WHERE substr(id, 1, ?) = ? LIMIT 2", (len(prefix), prefix)
            ).fetchall()
            if len(rows) == 1:
                return str(rows[0][0])
        return None
    except _sqlite3.Error:
        return None
    finally:
        db.close()


def sha256_hex(data: bytes) -> str:
    """hashlib.sha256(data).hexdigest() through the C module (hashlib costs ~2 ms to import)."""
    import _sha256  # type: ignore[import-not-found]

    return str(_sha256.sha256(data).hexdigest())


def chain_ids(diff_ids: list[str]) -> tuple[str, ...] | None:
    """ChainIDs (image-spec) of sha256 diff IDs; None if one is not a canonical sha256 digest."""
    out: list[str] = []
    for d in diff_ids:
        if not (isinstance(d, str) and len(d) == 71 and d.startswith("sha256:") and set(d[7:]) <= _HEX):
            return None
        out.append(d if not out else "sha256:" + sha256_hex(f"{out[-1]} {d}".encode()))
    return tuple(out)


def image_info(root: str, image_id: str) -> ImageInfo | None:
    """Read the image's config blob (`root/content/blobs/sha256/<hex>`); None when unsure."""
    if not image_id.startswith("sha256:"):
        return None
    try:
        with open(os.path.join(root, "content", "blobs", "sha256", image_id[7:]), "rb") as f:
            blob = f.read()
        doc = _fastjson.loads(blob)
    except (OSError, ValueError):
        return None
    if not isinstance(doc, dict):
        return None
    rootfs = doc.get("rootfs")
    diff_ids = rootfs.get("diff_ids") if isinstance(rootfs, dict) else None
    if not isinstance(diff_ids, list):
        return None
    chains = chain_ids(diff_ids)
    if chains is None:
        return None
    config = doc.get("config")
    return ImageInfo(
        id=image_id, config=config if isinstance(config, dict) else {}, chain_ids=chains, config_blob=blob
    )
