"""The image store: which images exist and what they are called.

An image is an image manifest (OCI or Docker schema 2) whose config and layers are blobs in the content
store. The store records each image by its **ID**, the digest of its config (what `docker images` and
`podman images` show), together with the digest of its manifest, and keeps **names** (references such
as `docker.io/library/busybox:latest`) pointing at image IDs. A name points at one image; giving it to
another image moves it, and an image left without names is *dangling* (`<none>:<none>`).

Records live in SQLite (`<root>/images.db`, WAL): every change is one transaction, so a crash leaves
either the old or the new state. Blobs are written before the record that makes them reachable, and
`gc()` (content garbage collection with every stored manifest as a root) runs under the content store's
exclusive lock, so a blob an image needs is never collected.

The store does not know about containers: callers that must not remove an image in use pass an
`in_use` function to `remove` and `prune`.
"""

from __future__ import annotations

import _sqlite3
import builtins
import time

from cocon._typing import TYPE_CHECKING, record
from cocon.content import BlobNotFound, ContentStore
from cocon.images.errors import ImageError
from cocon.images.reference import Reference, ReferenceError
from cocon.oci.digest import Digest, DigestError, sha256_of
from cocon.oci.errors import OCIError
from cocon.oci.image_spec import (
    OCI_CONFIG,
    OCI_MANIFEST,
    Descriptor,
    ImageConfig,
    Manifest,
    check_layers_match,
    encode_manifest,
    parse_image_config,
    parse_manifest,
)

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence
    from types import TracebackType

DB_NAME = "images.db"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS images (
    id TEXT PRIMARY KEY,          -- sha256 digest of the config blob
    manifest TEXT NOT NULL,       -- digest of the manifest blob
    added REAL NOT NULL           -- when this store first recorded the image (unix time)
);
CREATE TABLE IF NOT EXISTS names (
    name TEXT PRIMARY KEY,        -- a normalized reference: docker.io/library/busybox:latest
    image TEXT NOT NULL REFERENCES images(id)
);
CREATE INDEX IF NOT EXISTS names_by_image ON names(image);
"""

_SET_NAME = (
    "INSERT INTO names(name, image) VALUES (?, ?) ON CONFLICT(name) DO UPDATE SET image = excluded.image"
)


class _Transaction:
    """`with store._transaction() as db:` one immediate transaction, rolled back on any exception."""

    __slots__ = ("_db",)

    def __init__(self, db: _sqlite3.Connection) -> None:
        self._db = db

    def __enter__(self) -> _sqlite3.Connection:
        self._db.execute("BEGIN IMMEDIATE")
        return self._db

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._db.execute("ROLLBACK" if exc_type is not None else "COMMIT")


class ImageNotFound(ImageError):
    """No image matches the reference or ID the user gave."""


class ImageInUse(ImageError):
    """An image cannot be removed: containers use it, or it has several names and was named by ID."""


class ImageCorrupt(ImageError):
    """A stored manifest or config is missing or does not parse: the image must be removed and re-made."""


@record(frozen=True)
class Image:
    """One stored image, with its parsed manifest and config."""

    id: str  # "sha256:<hex>" of the config blob
    manifest_digest: str
    manifest: Manifest
    config: ImageConfig
    names: tuple[str, ...]  # normalized references, sorted
    added: float

    @property
    def short_id(self) -> str:
        return self.id.partition(":")[2][:12]

    @property
    def diff_ids(self) -> list[str]:
        return list(self.config.rootfs.diff_ids)

    @property
    def size(self) -> int:
        """Bytes of the config and the layer blobs as stored (compressed)."""
        return self.manifest.config.size + sum(layer.size for layer in self.manifest.layers)

    @property
    def familiar_names(self) -> list[str]:
        """The names as users type them: `busybox:latest`, `localhost:5000/app:1`."""
        return [Reference.parse(n).familiar() for n in self.names]

    @property
    def repo_tags(self) -> list[str]:
        return [n for n in self.familiar_names if "@" not in n]

    @property
    def repo_digests(self) -> list[str]:
        """`NAME@MANIFEST-DIGEST` for each repository the image is named in (as Docker shows)."""
        repos = sorted({Reference.parse(n).familiar_name() for n in self.names})
        return [f"{r}@{self.manifest_digest}" for r in repos]


@record(frozen=True)
class HistoryEntry:
    """One line of `cocon image history`: a build step, and the layer it made (if any)."""

    created: str | None
    created_by: str
    comment: str
    size: int  # bytes of the step's layer blob, 0 for steps without a layer
    layer: str | None  # the layer's diff_id
    empty_layer: bool


def normalize_name(text: str) -> str:
    """A user-typed reference as stored: `busybox` → `docker.io/library/busybox:latest`."""
    try:
        return str(Reference.parse(text))
    except ReferenceError as exc:
        raise ImageError(str(exc)) from None


def _name_or_none(text: str) -> str | None:
    try:
        ref = Reference.parse(text)
    except ReferenceError:
        return None
    return None if ref.digest else str(ref)


def _is_id_prefix(text: str) -> bool:
    hexpart = text.removeprefix("sha256:")
    return 0 < len(hexpart) <= 64 and all(c in "0123456789abcdef" for c in hexpart)


class ImageStore:
    """Images and their names under `root` (blobs under `root/content`)."""

    def __init__(self, root: str, content: ContentStore | None = None) -> None:
        self.root = root
        self.content = content if content is not None else ContentStore(f"{root}/content")
        self._db_path = f"{root}/{DB_NAME}"
        self._db: _sqlite3.Connection | None = None

    # --- database --------------------------------------------------------------------------------------

    def _conn(self) -> _sqlite3.Connection:
        if self._db is None:
            try:
                db = _sqlite3.connect(
                    self._db_path, timeout=30, isolation_level=None, check_same_thread=False
                )
            except _sqlite3.Error as exc:
                raise ImageError(f"cannot open the image database {self._db_path}: {exc}") from None
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute("PRAGMA foreign_keys=ON")
            db.executescript(_SCHEMA)
            self._db = db
        return self._db

    def _transaction(self) -> _Transaction:
        return _Transaction(self._conn())

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    # --- adding images ---------------------------------------------------------------------------------

    def commit(
        self,
        config: bytes,
        layers: Sequence[Descriptor],
        *,
        names: Sequence[str] = (),
        annotations: dict[str, str] | None = None,
    ) -> Image:
        """Record an image from its config bytes and the descriptors of its layer blobs (already in the
        content store, lowest layer first): writes the config and an OCI manifest, then records the
        image and gives it `names` (moved from other images that had them)."""
        config_digest = self.content.put(config)
        manifest = Manifest(
            schema_version=2,
            media_type=OCI_MANIFEST,
            config=Descriptor(media_type=OCI_CONFIG, digest=str(config_digest), size=len(config)),
            layers=list(layers),
            annotations=annotations or None,
        )
        data = encode_manifest(manifest)
        with self.content.lease():
            digest = self.content.put(data)
            return self.add_manifest(str(digest), names=names)

    def add_manifest(self, manifest_digest: str, *, names: Sequence[str] = ()) -> Image:
        """Record the image whose manifest (and config and layers) are already in the content store,
        after checking that they are all there and consistent; give it `names`."""
        normalized = [normalize_name(n) for n in names]
        manifest, _ = self._load(manifest_digest, check_blobs=True)
        image_id = manifest.config.digest
        with self._transaction() as db:
            db.execute(
                "INSERT INTO images(id, manifest, added) VALUES (?, ?, ?) "
                "ON CONFLICT(id) DO UPDATE SET manifest = excluded.manifest",
                (image_id, manifest_digest, time.time()),
            )
            for name in normalized:
                db.execute(_SET_NAME, (name, image_id))
        return self.get(image_id)

    def _load(self, manifest_digest: str, *, check_blobs: bool = False) -> tuple[Manifest, ImageConfig]:
        try:
            data = self.content.read(manifest_digest)
            manifest = parse_manifest(data, f"manifest {manifest_digest}")
            config = parse_image_config(
                self.content.read(manifest.config.digest), f"config {manifest.config.digest}"
            )
            check_layers_match(manifest, config)
        except BlobNotFound as exc:
            raise ImageCorrupt(
                f"{exc}; the image is incomplete: remove it and import or build it again"
            ) from None
        except (OCIError, DigestError) as exc:
            raise ImageCorrupt(f"{exc}; remove the image and import or build it again") from None
        if check_blobs:
            for layer in manifest.layers:
                if not self.content.exists(layer.digest):
                    raise ImageCorrupt(
                        f"layer {layer.digest} of manifest {manifest_digest} is not in the content store; "
                        "import the whole image (all its layers)"
                    )
        return manifest, config

    # --- reading ---------------------------------------------------------------------------------------

    def _image(self, image_id: str, manifest_digest: str, added: float) -> Image:
        manifest, config = self._load(manifest_digest)
        rows = self._conn().execute("SELECT name FROM names WHERE image = ? ORDER BY name", (image_id,))
        return Image(
            id=image_id,
            manifest_digest=manifest_digest,
            manifest=manifest,
            config=config,
            names=tuple(r[0] for r in rows),
            added=added,
        )

    def get(self, image_id: str) -> Image:
        """The image with exactly this ID ("sha256:<hex>")."""
        row = (
            self._conn()
            .execute("SELECT id, manifest, added FROM images WHERE id = ?", (image_id,))
            .fetchone()
        )
        if row is None:
            raise ImageNotFound(f"no image with ID {image_id}")
        return self._image(*row)

    def resolve(self, text: str) -> Image:
        """The image a user means: a name (`busybox`, `busybox:1`, `name@sha256:…` by manifest digest),
        a full image ID, or a unique prefix of one (as Docker: names first, then IDs)."""
        db = self._conn()
        try:
            ref = Reference.parse(text)
        except ReferenceError:
            ref = None
        if ref is not None:
            if ref.digest is not None:
                row = db.execute(
                    "SELECT id, manifest, added FROM images WHERE manifest = ? OR id = ?",
                    (ref.digest, ref.digest),
                ).fetchone()
                if row is not None:
                    return self._image(*row)
            else:
                row = db.execute("SELECT image FROM names WHERE name = ?", (str(ref),)).fetchone()
                if row is not None:
                    return self.get(row[0])
        if _is_id_prefix(text):
            prefix = text if text.startswith("sha256:") else f"sha256:{text}"
            rows = db.execute(
                "SELECT id, manifest, added FROM images WHERE substr(id, 1, ?) = ?", (len(prefix), prefix)
            ).fetchall()
            if len(rows) == 1:
                return self._image(*rows[0])
            if len(rows) > 1:
                raise ImageNotFound(f"{text!r} matches {len(rows)} images: give more digits of the ID")
        if ref is None and not _is_id_prefix(text):
            raise ImageNotFound(f"{text!r} is neither an image name nor an image ID")
        raise ImageNotFound(
            f"no image {text!r} here: build it (cocon build -t {text} …), load or import it "
            "(cocon load, cocon image import), or make a base image (cocon image bootstrap busybox)"
        )

    def exists(self, text: str) -> bool:
        try:
            self.resolve(text)
        except ImageNotFound:
            return False
        return True

    def list(self, *, dangling: bool | None = None) -> list[Image]:
        """All images, newest first; `dangling=True` only those without names, False only named ones."""
        rows = self._conn().execute("SELECT id, manifest, added FROM images ORDER BY added DESC").fetchall()
        images = [self._image(*row) for row in rows]
        if dangling is not None:
            images = [i for i in images if (not i.names) == dangling]
        return images

    def history(self, text: str) -> builtins.list[HistoryEntry]:
        """The image's build steps, newest first (as `docker history`), each with its layer's size."""
        image = self.resolve(text)
        layers = list(zip(image.manifest.layers, image.diff_ids, strict=True))
        entries: list[HistoryEntry] = []
        steps = image.config.history or []
        if not steps:  # an image without history: one entry per layer
            for desc, diff_id in layers:
                entries.append(HistoryEntry(image.config.created, "", "", desc.size, diff_id, False))
        for step in steps:
            layer: tuple[Descriptor, str] | None = None
            if not step.empty_layer and layers:
                layer = layers.pop(0)
            entries.append(
                HistoryEntry(
                    created=step.created,
                    created_by=step.created_by or "",
                    comment=step.comment or "",
                    size=layer[0].size if layer else 0,
                    layer=layer[1] if layer else None,
                    empty_layer=step.empty_layer,
                )
            )
        entries.reverse()
        return entries

    # --- names -----------------------------------------------------------------------------------------

    def tag(self, source: str, target: str) -> Image:
        """Give the image `source` resolves to the name `target` (moved if another image had it)."""
        image = self.resolve(source)
        ref = Reference.parse(target) if target else None
        if ref is None or ref.digest is not None:
            raise ImageError(f"cannot tag with {target!r}: give NAME[:TAG], without a digest")
        with self._transaction() as db:
            db.execute(_SET_NAME, (str(ref), image.id))
        return self.get(image.id)

    def untag(self, name: str) -> Image:
        """Remove one name; the image stays (dangling if it was its last name)."""
        normalized = normalize_name(name)
        with self._transaction() as db:
            row = db.execute("SELECT image FROM names WHERE name = ?", (normalized,)).fetchone()
            if row is None:
                raise ImageNotFound(f"no image is named {name!r}")
            db.execute("DELETE FROM names WHERE name = ?", (normalized,))
        return self.get(row[0])

    # --- removing --------------------------------------------------------------------------------------

    def remove(
        self, text: str, *, force: bool = False, in_use: Callable[[str], bool] | None = None
    ) -> builtins.list[tuple[str, str]]:
        """Docker's `rmi`: by name, only that name goes unless it was the last one; by ID, the image goes
        with all its names (refused if it has several, unless `force`). An image that `in_use(id)` says is
        used by a container is never deleted, only untagged (and refused if that would leave it nameless,
        unless `force`, as Docker does). Returns [("Untagged", name) …, ("Deleted", id)]."""
        image = self.resolve(text)
        done: list[tuple[str, str]] = []
        used = in_use is not None and in_use(image.id)
        name = _name_or_none(text)
        if name is not None and name in image.names:
            if len(image.names) > 1 or (used and force):
                self.untag(name)
                return [("Untagged", Reference.parse(name).familiar())]
            if used:
                raise ImageInUse(
                    f"image {text} ({image.short_id}) is used by a container: remove the container first "
                    "(or use --force to remove only the name)"
                )
        else:
            if len(image.names) > 1 and not force:
                raise ImageInUse(
                    f"image {image.short_id} has several names ({', '.join(image.familiar_names)}): "
                    "remove them one by one or use --force"
                )
            if used:
                raise ImageInUse(f"image {image.short_id} is used by a container: remove the container first")
        with self._transaction() as db:
            for name in image.names:
                done.append(("Untagged", Reference.parse(name).familiar()))
            db.execute("DELETE FROM names WHERE image = ?", (image.id,))
            db.execute("DELETE FROM images WHERE id = ?", (image.id,))
        done.append(("Deleted", image.id))
        return done

    def prune(self, *, all: bool = False, in_use: Callable[[str], bool] | None = None) -> builtins.list[str]:
        """Delete dangling images (`all`: every image no container uses); returns their IDs. Blobs are
        freed by the next `gc()`."""
        removed: builtins.list[str] = []
        for image in self.list():
            if image.names and not all:
                continue
            if in_use is not None and in_use(image.id):
                continue
            with self._transaction() as db:
                db.execute("DELETE FROM names WHERE image = ?", (image.id,))
                db.execute("DELETE FROM images WHERE id = ?", (image.id,))
            removed.append(image.id)
        return removed

    def roots(self) -> builtins.list[str]:
        """The manifest digests of every stored image: what content GC must keep."""
        return [r[0] for r in self._conn().execute("SELECT manifest FROM images")]

    def gc(self, extra_roots: Callable[[], Sequence[str]] | None = None) -> builtins.list[Digest]:
        """Delete blobs no image reaches (nor `extra_roots()`, e.g. a build cache's blobs)."""

        def all_roots() -> builtins.list[str]:
            return self.roots() + list(extra_roots() if extra_roots else [])

        return self.content.gc(all_roots)


def config_id(config: bytes) -> str:
    """The image ID a config's bytes give."""
    return str(sha256_of(config))
