"""The OCI image layout (image-spec `image-layout.md`) for `cocon save` and `cocon load`.

A layout is a directory (or a tar of one) holding `oci-layout` (`{"imageLayoutVersion":"1.0.0"}`),
`index.json` (an image index whose entries name the images) and `blobs/<alg>/<hex>`. cocon writes one
index entry per (image, name), annotated with the full name (`io.containerd.image.name`, as
containerd and Docker 25+ write it) and the familiar one (`org.opencontainers.image.ref.name`, which
`skopeo copy oci:DIR:NAME` and `umoci --image DIR:NAME` match), and the image's platform. Blobs are
copied as stored (manifest and config byte for byte, so digests and image IDs do not change).

Reading follows each entry of index.json to an image manifest (through nested indexes, taking the
host's platform), then stores the manifest, config and layers, each checked against its descriptor.
Entries that are not images (artifacts, signatures) are skipped. Use through `cocon.images.archive`.
"""

from __future__ import annotations

import json
import logging

from cocon.images.archive import (
    ANNOTATION_IMAGE_NAME,
    ANNOTATION_REF_NAME,
    MAX_CONFIG_SIZE,
    MAX_JSON_SIZE,
    ArchiveError,
    ArchiveSource,
    CorruptArchive,
    PendingImage,
    Progress,
    Selected,
    Sink,
    blob_path,
    copy_blob,
    dumps,
    ingest_blob,
    read_blob,
    read_member,
)
from cocon.images.reference import Reference, ReferenceError
from cocon.images.store import ImageCorrupt, ImageStore
from cocon.oci.digest import sha256_of
from cocon.oci.errors import OCIError
from cocon.oci.image_spec import (
    CONFIG_TYPES,
    INDEX_TYPES,
    MANIFEST_TYPES,
    OCI_INDEX,
    OCI_MANIFEST,
    Descriptor,
    Index,
    Manifest,
    Platform,
    PlatformNotFound,
    encode_index,
    parse_image_config,
    parse_index,
    parse_manifest,
    select_platform,
)

log = logging.getLogger(__name__)

LAYOUT_VERSION = "1.0.0"
MAX_INDEX_DEPTH = 4  # index.json -> index -> ... -> manifest


def _short(digest: str) -> str:
    return digest.partition(":")[2][:12]


# --- writing --------------------------------------------------------------------------------------


def write_oci_layout(
    store: ImageStore, selection: list[Selected], sink: Sink, progress: Progress | None
) -> None:
    """Write the selected images as an OCI image layout into `sink` (blobs first, index.json last)."""
    sink.add_dir("blobs")
    dirs = {"blobs"}
    written: set[str] = set()
    entries: list[Descriptor] = []

    def blob_dir(digest: str) -> str:
        path = blob_path(digest)
        parent = path.rpartition("/")[0]
        if parent not in dirs:
            sink.add_dir(parent)
            dirs.add(parent)
        return path

    for sel in selection:
        image = sel.image
        manifest = image.manifest
        count = len(manifest.layers)
        for n, layer in enumerate(manifest.layers, 1):
            if layer.digest not in written:
                path = blob_dir(layer.digest)
                what = f"layer {n}/{count} {_short(layer.digest)}"
                copy_blob(store, sink, path, layer.digest, layer.size, what, progress)
                written.add(layer.digest)
        if manifest.config.digest not in written:
            path = blob_dir(manifest.config.digest)
            what = f"config {_short(manifest.config.digest)}"
            copy_blob(store, sink, path, manifest.config.digest, manifest.config.size, what, progress)
            written.add(manifest.config.digest)
        data = store.content.read(image.manifest_digest)
        if str(sha256_of(data)) != image.manifest_digest:
            raise ImageCorrupt(
                f"the stored manifest {image.manifest_digest} of image {image.short_id} no longer matches "
                "its digest; nothing was saved: remove the image and load or build it again"
            )
        if image.manifest_digest not in written:
            sink.add_bytes(blob_dir(image.manifest_digest), data)
            written.add(image.manifest_digest)
        config = image.config
        platform = Platform(
            architecture=config.architecture,
            os=config.os,
            os_version=config.os_version,
            variant=config.variant,
        )
        base = Descriptor(
            media_type=manifest.media_type or OCI_MANIFEST,
            digest=image.manifest_digest,
            size=len(data),
            platform=platform,
        )
        if not sel.names:
            entries.append(base)
        for name in sel.names:
            annotations = {ANNOTATION_IMAGE_NAME: name, ANNOTATION_REF_NAME: Reference.parse(name).familiar()}
            entries.append(
                Descriptor(
                    media_type=base.media_type,
                    digest=base.digest,
                    size=base.size,
                    annotations=annotations,
                    platform=platform,
                )
            )
    sink.add_bytes("oci-layout", dumps({"imageLayoutVersion": LAYOUT_VERSION}))
    sink.add_bytes(
        "index.json", encode_index(Index(schema_version=2, media_type=OCI_INDEX, manifests=entries))
    )


# --- reading --------------------------------------------------------------------------------------


def _check_layout_file(src: ArchiveSource) -> None:
    if src.size("oci-layout") is None:
        return  # required by the spec, but some writers leave it out; index.json is what matters
    data = read_member(src, "oci-layout", 64 << 10, "the layout marker")
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise CorruptArchive(f"{src.where}: oci-layout is not valid JSON: {e}") from None
    version = doc.get("imageLayoutVersion") if isinstance(doc, dict) else None
    if not isinstance(version, str) or not version.startswith("1."):
        raise ArchiveError(
            f"{src.where}: oci-layout says imageLayoutVersion {version!r}; cocon reads layouts of version 1.x"
        )


def _entry_names(entry: Descriptor, where: str) -> list[str]:
    """The name an index.json entry gives its image: the full containerd name if there is one, else
    the OCI ref name read as an image reference (`busybox:1`, `example.com/app:2`)."""
    annotations = entry.annotations or {}
    for key in (ANNOTATION_IMAGE_NAME, ANNOTATION_REF_NAME):
        value = annotations.get(key)
        if not value:
            continue
        try:
            ref = Reference.parse(value)
        except ReferenceError as e:
            log.warning(
                "%s: %s %r is not an image name cocon can use (%s); ignoring it", where, key, value, e
            )
            continue
        if ref.digest is None:
            return [str(ref)]
    return []


def _image_manifest(
    store: ImageStore, src: ArchiveSource, desc: Descriptor, where: str, depth: int
) -> tuple[Descriptor, Manifest] | None:
    """The image manifest an index entry leads to (stored), or None for an entry that is no image."""
    if desc.media_type in INDEX_TYPES:
        if depth >= MAX_INDEX_DEPTH:
            raise CorruptArchive(f"{src.where}: {where}: indexes nested more than {MAX_INDEX_DEPTH} deep")
        data = read_blob(store, src, desc, MAX_JSON_SIZE, "index")
        try:
            index = parse_index(data, f"{src.where}: index {desc.digest}")
            chosen = select_platform(index)
        except PlatformNotFound as e:
            raise ArchiveError(f"{src.where}: {where}: {e}; nothing was loaded") from None
        except OCIError as e:
            raise CorruptArchive(f"{e}; the archive is corrupt") from None
        return _image_manifest(store, src, chosen, f"{where} -> {_short(chosen.digest)}", depth + 1)
    if desc.media_type not in MANIFEST_TYPES:
        log.debug("%s: %s: skipping %s (not an image)", src.where, where, desc.media_type)
        return None
    data = read_blob(store, src, desc, MAX_JSON_SIZE, "manifest")
    try:
        manifest = parse_manifest(data, f"{src.where}: manifest {desc.digest}")
    except OCIError as e:
        raise CorruptArchive(f"{e}; the archive is corrupt or holds an image cocon cannot run") from None
    if manifest.artifact_type is not None or manifest.config.media_type not in CONFIG_TYPES:
        log.debug("%s: %s: skipping an artifact manifest", src.where, where)
        return None
    return desc, manifest


def _store_image(
    store: ImageStore, src: ArchiveSource, manifest: Manifest, digest: str, progress: Progress | None
) -> None:
    """Store the config and layers of a manifest, each checked against its descriptor."""
    config = read_blob(store, src, manifest.config, MAX_CONFIG_SIZE, "config")
    try:
        parse_image_config(config, f"{src.where}: config {manifest.config.digest}", manifest=manifest)
    except OCIError as e:
        raise CorruptArchive(f"{e}; the archive is corrupt") from None
    count = len(manifest.layers)
    for n, layer in enumerate(manifest.layers, 1):
        what = f"layer {n}/{count} {_short(layer.digest)}"
        if layer.data is not None and src.size(blob_path(layer.digest)) is None:
            read_blob(store, src, layer, layer.size, what)  # embedded in the descriptor
            continue
        ingest_blob(store, src, blob_path(layer.digest), layer.digest, layer.size, what, progress)
    log.debug("%s: stored the blobs of manifest %s", src.where, digest)


def read_oci_layout(store: ImageStore, src: ArchiveSource, progress: Progress | None) -> list[PendingImage]:
    """Store the blobs of every image the layout's index.json lists; return them to be recorded."""
    _check_layout_file(src)
    data = read_member(src, "index.json", MAX_JSON_SIZE, "the index")
    try:
        index = parse_index(data, f"{src.where}: index.json")
    except OCIError as e:
        raise CorruptArchive(f"{e}; the layout is corrupt") from None
    pending: list[PendingImage] = []
    for i, entry in enumerate(index.manifests):
        where = f"index.json manifests[{i}]"
        found = _image_manifest(store, src, entry, where, 0)
        if found is None:
            continue
        desc, manifest = found
        _store_image(store, src, manifest, desc.digest, progress)
        pending.append(PendingImage(desc.digest, _entry_names(entry, src.where)))
    if not pending:
        raise CorruptArchive(
            f"{src.where}: index.json lists no image (only {len(index.manifests)} other entries)"
        )
    return pending
