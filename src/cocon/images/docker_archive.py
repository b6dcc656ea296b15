"""docker-archive, the format of `docker save` / `docker load`, for `cocon save` and `cocon load`.

A tar holding `manifest.json` (`[{"Config": PATH, "RepoTags": [...] | null, "Layers": [PATH, ...]}]`),
the image configs and the layers as **uncompressed** tars whose sha256 is the config's diff_id.
cocon writes the classic layout: `<config-hex>.json`, and `<id>/layer.tar` (with `<id>/VERSION` and a
minimal `<id>/json`) where `<id>` is the layer's ChainID, plus the legacy `repositories` file.
Compressed layer blobs are decompressed on the way out (through an unnamed temporary file, since a tar
header needs the size first) and checked against their diff_id.

Reading takes whatever paths manifest.json gives (`<hex>/layer.tar` from Docker before 25,
`blobs/sha256/<hex>` from Docker 25+, `<hex>.tar` from podman and skopeo). Each layer must hash to
its diff_id (compressed layers, which some tools write, are stored as they are and their content
is checked); it is stored as an OCI layer, and the image gets an OCI manifest made for it, so its ID
(the config's digest) is the one it had where it was saved. Use through `cocon.images.archive`.
"""

from __future__ import annotations

import json
import posixpath
import tempfile
from typing import Any

from cocon.content import ContentError
from cocon.images.archive import (
    CHUNK,
    HEX64,
    MAX_CONFIG_SIZE,
    MAX_JSON_SIZE,
    ArchiveSource,
    CorruptArchive,
    CountingReader,
    PendingImage,
    Progress,
    Selected,
    Sink,
    chain_ids,
    decompressing,
    dumps,
    ingest_blob,
    normalized_names,
    read_member,
    sniff_compression,
    store_tmp_dir,
)
from cocon.images.reference import Reference
from cocon.images.store import ImageCorrupt, ImageStore
from cocon.oci.digest import Hasher, sha256_of
from cocon.oci.errors import OCIError
from cocon.oci.image_spec import (
    OCI_CONFIG,
    OCI_LAYER,
    OCI_LAYER_GZIP,
    OCI_LAYER_ZSTD,
    OCI_MANIFEST,
    Descriptor,
    Manifest,
    encode_manifest,
    parse_image_config,
)


def _short(digest: str) -> str:
    return digest.partition(":")[2][:12]


# --- writing --------------------------------------------------------------------------------------


def _write_layer(
    store: ImageStore,
    sink: Sink,
    path: str,
    desc: Descriptor,
    diff_id: str,
    what: str,
    progress: Progress | None,
    tmp_dir: str,
) -> None:
    """Write one layer as an uncompressed tar whose sha256 is checked against `diff_id`."""
    try:
        stored = store.content.size(desc.digest)
        blob = store.content.open(desc.digest)
    except ContentError as e:
        raise ImageCorrupt(f"{e}; the image is incomplete: remove it and load or build it again") from None
    if stored != desc.size:
        raise ImageCorrupt(
            f"layer {desc.digest} is {stored} bytes but its descriptor says {desc.size}: the image is corrupt"
        )
    with blob:
        raw = CountingReader(blob, what, desc.size, progress, Hasher())
        reader = decompressing(raw, f"layer {desc.digest}", ImageCorrupt)
        if reader.compression is None:
            sink.add_file(path, reader, desc.size)
            got = raw.hasher.digest() if raw.hasher else None
            if str(got) != diff_id:
                raise ImageCorrupt(
                    f"layer {desc.digest} hashes to {got}, not its diff_id {diff_id}: the image is corrupt; "
                    "nothing was saved"
                )
        else:
            plain = Hasher()
            with tempfile.TemporaryFile(dir=tmp_dir) as tmp:
                while data := reader.read(CHUNK):
                    tmp.write(data)
                    plain.update(data)
                if str(plain.digest()) != diff_id:
                    raise ImageCorrupt(
                        f"layer {desc.digest} unpacks to a tar with sha256 {plain.digest()}, not its diff_id "
                        f"{diff_id}: the image is corrupt; nothing was saved"
                    )
                tmp.seek(0)
                sink.add_file(path, tmp, plain.size)
        raw.finish()
        if raw.hasher is not None and str(raw.hasher.digest()) != desc.digest:
            raise ImageCorrupt(
                f"layer {desc.digest} no longer matches its digest (disk corruption?); nothing was saved"
            )


def write_docker_archive(
    store: ImageStore, selection: list[Selected], sink: Sink, progress: Progress | None
) -> None:
    """Write the selected images as a docker-archive into `sink` (manifest.json last)."""
    tmp_dir = store_tmp_dir(store)
    written: set[str] = set()
    entries: list[dict[str, Any]] = []
    repositories: dict[str, dict[str, str]] = {}
    for sel in selection:
        image = sel.image
        try:
            config = store.content.read(image.id)
        except ContentError as e:
            raise ImageCorrupt(
                f"{e}; the image is incomplete: remove it and load or build it again"
            ) from None
        if str(sha256_of(config)) != image.id:
            raise ImageCorrupt(
                f"the config of image {image.short_id} no longer matches its digest; nothing was saved"
            )
        config_name = f"{image.id.partition(':')[2]}.json"
        if config_name not in written:
            sink.add_bytes(config_name, config)
            written.add(config_name)
        layers: list[str] = []
        parent: str | None = None
        count = len(image.manifest.layers)
        chains = chain_ids(image.diff_ids)
        for n, (desc, diff_id, chain) in enumerate(
            zip(image.manifest.layers, image.diff_ids, chains, strict=True), 1
        ):
            layer_id = chain.partition(":")[2]
            if layer_id not in written:
                sink.add_dir(layer_id)
                sink.add_bytes(f"{layer_id}/VERSION", b"1.0")
                legacy = {"id": layer_id, **({"parent": parent} if parent else {})}
                sink.add_bytes(f"{layer_id}/json", dumps(legacy))
                what = f"layer {n}/{count} {_short(diff_id)}"
                _write_layer(store, sink, f"{layer_id}/layer.tar", desc, diff_id, what, progress, tmp_dir)
                written.add(layer_id)
            layers.append(f"{layer_id}/layer.tar")
            parent = layer_id
        tags = [Reference.parse(n).familiar() for n in sel.names]
        entries.append({"Config": config_name, "RepoTags": tags or None, "Layers": layers})
        for tag in tags:
            repo, _, tag_part = tag.rpartition(":")
            if parent is not None:
                repositories.setdefault(repo, {})[tag_part] = parent
    sink.add_bytes("manifest.json", dumps(entries))
    if repositories:
        sink.add_bytes("repositories", dumps(repositories))


# --- reading --------------------------------------------------------------------------------------


def _strings(value: Any, where: str, key: str, *, optional: bool = False) -> list[str]:
    if value is None and optional:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise CorruptArchive(f"{where}: {key} must be a list of strings; the archive is corrupt")
    return value


def _ingest_layer(
    store: ImageStore, src: ArchiveSource, path: str, diff_id: str, what: str, progress: Progress | None
) -> Descriptor:
    """Store one layer of a docker-archive, checked against its diff_id; its OCI descriptor."""
    size = src.size(path)
    if size is None:
        raise CorruptArchive(
            f"{src.where}: manifest.json lists the layer {path}, which is not in the archive; the archive "
            "is incomplete (save the image again)"
        )
    if store.content.exists(diff_id) and store.content.size(diff_id) == size:
        return Descriptor(media_type=OCI_LAYER, digest=diff_id, size=size)
    head, _ = src.open(path)
    compression = sniff_compression(head.read(4))
    if compression is None:
        ingest_blob(store, src, path, diff_id, size, f"{what} (diff_id)", progress)
        return Descriptor(media_type=OCI_LAYER, digest=diff_id, size=size)
    digest = ingest_blob(store, src, path, None, size, what, progress)
    plain = Hasher()
    with store.content.open(digest) as f:
        reader = decompressing(f, f"{src.where}: {path}")
        while data := reader.read(CHUNK):
            plain.update(data)
    if str(plain.digest()) != diff_id:
        raise CorruptArchive(
            f"{src.where}: {what} {path} unpacks to a tar with sha256 {plain.digest()}, not the config's "
            f"diff_id {diff_id}: the archive is corrupt or was tampered with; nothing was loaded"
        )
    media_type = OCI_LAYER_GZIP if compression == "gzip" else OCI_LAYER_ZSTD
    return Descriptor(media_type=media_type, digest=str(digest), size=size)


def read_docker_archive(
    store: ImageStore, src: ArchiveSource, progress: Progress | None
) -> list[PendingImage]:
    """Store the configs and layers of every image manifest.json lists, each checked, and an OCI
    manifest for each; return them to be recorded."""
    data = read_member(src, "manifest.json", MAX_JSON_SIZE, "the manifest")
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise CorruptArchive(f"{src.where}: manifest.json is not valid JSON: {e}") from None
    if not isinstance(doc, list) or not doc:
        raise CorruptArchive(f"{src.where}: manifest.json must be a non-empty list of images")
    pending: list[PendingImage] = []
    for i, entry in enumerate(doc):
        where = f"{src.where}: manifest.json[{i}]"
        if not isinstance(entry, dict) or not isinstance(entry.get("Config"), str):
            raise CorruptArchive(f"{where}: each image needs a Config path; the archive is corrupt")
        config_path: str = entry["Config"]
        names = normalized_names(
            _strings(entry.get("RepoTags"), where, "RepoTags", optional=True), where, "RepoTag"
        )
        layer_paths = _strings(entry.get("Layers"), where, "Layers")
        config = read_member(src, config_path, MAX_CONFIG_SIZE, "image config")
        config_digest = sha256_of(config)
        stem = posixpath.basename(config_path).removesuffix(".json")
        if HEX64.fullmatch(stem) and stem != config_digest.hex:
            raise CorruptArchive(
                f"{where}: the config {config_path} hashes to {config_digest}, not the digest its name says: "
                "the archive is corrupt or was tampered with; nothing was loaded"
            )
        try:
            diff_ids = parse_image_config(config, f"{where}: config {config_path}").rootfs.diff_ids
        except OCIError as e:
            raise CorruptArchive(f"{e}; the archive is corrupt") from None
        if len(diff_ids) != len(layer_paths):
            raise CorruptArchive(
                f"{where}: manifest.json lists {len(layer_paths)} layers but the config has {len(diff_ids)} "
                "diff_ids; the archive is corrupt"
            )
        count = len(layer_paths)
        layers = [
            _ingest_layer(store, src, path, diff_id, f"layer {n}/{count} {_short(diff_id)}", progress)
            for n, (path, diff_id) in enumerate(zip(layer_paths, diff_ids, strict=True), 1)
        ]
        store.content.put(config)
        manifest = Manifest(
            schema_version=2,
            media_type=OCI_MANIFEST,
            config=Descriptor(media_type=OCI_CONFIG, digest=str(config_digest), size=len(config)),
            layers=layers,
        )
        manifest_digest = store.content.put(encode_manifest(manifest))
        pending.append(PendingImage(str(manifest_digest), names))
    return pending
