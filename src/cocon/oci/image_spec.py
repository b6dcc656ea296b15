"""Typed OCI image-spec (1.1) documents, and their Docker schema 2 twins: parsing and validation, no side
effects.

Documents: the image manifest and index (Docker: manifest list), the image config, and the descriptors
and platforms inside them. `parse_*` decode bytes into these classes (types are checked while decoding;
a type error names the JSON path), then check what the types cannot express: `schemaVersion` 2, valid
digests, sizes >= 0, known layer media types. Errors are `ImageSpecError`s that say which document,
which field and what is wrong.

JSON names: the manifest, index and descriptors use camelCase; the image config's `config` object uses
Docker's PascalCase (`ExposedPorts`, `WorkingDir`, ...) and `rootfs`/`history` use snake_case
(`diff_ids`, `created_by`, `empty_layer`); platforms use dotted names (`os.version`). Every name that
is not plain camelCase is given explicitly with field metadata.

Parsing ignores fields cocon does not model (Docker's `container_config`, `docker_version`, ...), so
`encode_*` of a parsed document is not always its original bytes: a blob's digest is the digest of the
bytes it was stored as; keep those bytes, never re-encode to recompute a digest. `encode_*` writes
compact JSON the way Go's encoding/json does (fields in the spec's order, map keys sorted, `<>&`
escaped), so a compact OCI document written by containerd, buildkit or skopeo round-trips byte for byte.
"""

from __future__ import annotations

import os as _os

from cocon import _fastjson
from cocon._typing import TYPE_CHECKING
from cocon.oci.digest import Digest, DigestError, digest_of, sha256_of
from cocon.oci.errors import OCIError
from cocon.oci.jsonobj import DecodeError, decode, field, json_object, to_builtins

if TYPE_CHECKING:
    from typing import Any

# --- media types ---------------------------------------------------------------------------------------

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYOUT_HEADER = "application/vnd.oci.layout.header.v1+json"
OCI_EMPTY = "application/vnd.oci.empty.v1+json"  # the empty `{}` config of artifacts
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
# "Non-distributable" (foreign) layers: deprecated by image-spec 1.1, still found in Windows images.
OCI_LAYER_NONDISTRIBUTABLE = "application/vnd.oci.image.layer.nondistributable.v1.tar"
OCI_LAYER_NONDISTRIBUTABLE_GZIP = "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
OCI_LAYER_NONDISTRIBUTABLE_ZSTD = "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd"

DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
DOCKER_LAYER_ZSTD = "application/vnd.docker.image.rootfs.diff.tar.zstd"
DOCKER_FOREIGN_LAYER = "application/vnd.docker.image.rootfs.foreign.diff.tar"
DOCKER_FOREIGN_LAYER_GZIP = "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip"
DOCKER_SCHEMA1_MANIFEST = "application/vnd.docker.distribution.manifest.v1+json"
DOCKER_SCHEMA1_SIGNED_MANIFEST = "application/vnd.docker.distribution.manifest.v1+prettyjws"

MANIFEST_TYPES = frozenset({OCI_MANIFEST, DOCKER_MANIFEST})
INDEX_TYPES = frozenset({OCI_INDEX, DOCKER_MANIFEST_LIST})
CONFIG_TYPES = frozenset({OCI_CONFIG, DOCKER_CONFIG})
_LAYER_COMPRESSION: dict[str, str] = {
    OCI_LAYER: "", OCI_LAYER_GZIP: "gzip", OCI_LAYER_ZSTD: "zstd",
    OCI_LAYER_NONDISTRIBUTABLE: "", OCI_LAYER_NONDISTRIBUTABLE_GZIP: "gzip",
    OCI_LAYER_NONDISTRIBUTABLE_ZSTD: "zstd",
    DOCKER_LAYER: "", DOCKER_LAYER_GZIP: "gzip", DOCKER_LAYER_ZSTD: "zstd",
    DOCKER_FOREIGN_LAYER: "", DOCKER_FOREIGN_LAYER_GZIP: "gzip",
}  # fmt: skip
LAYER_TYPES = frozenset(_LAYER_COMPRESSION)
FOREIGN_LAYER_TYPES = frozenset(
    {
        OCI_LAYER_NONDISTRIBUTABLE, OCI_LAYER_NONDISTRIBUTABLE_GZIP, OCI_LAYER_NONDISTRIBUTABLE_ZSTD,
        DOCKER_FOREIGN_LAYER, DOCKER_FOREIGN_LAYER_GZIP,
    }
)  # fmt: skip
_SCHEMA1_TYPES = frozenset({DOCKER_SCHEMA1_MANIFEST, DOCKER_SCHEMA1_SIGNED_MANIFEST})

# Annotation buildkit puts on the index entries of its attestation manifests (platform unknown/unknown).
DOCKER_REFERENCE_TYPE = "vnd.docker.reference.type"


class ImageSpecError(OCIError):
    """An image manifest, index or config is malformed or breaks a rule of the image-spec."""


class PlatformNotFound(ImageSpecError):
    """An index has no manifest for the platform asked for; the message lists what it offers."""


def is_known_layer(media_type: str) -> bool:
    """A layer media type cocon can unpack (plain, gzip or zstd tar; OCI, Docker or foreign)."""
    return media_type in _LAYER_COMPRESSION


def is_foreign_layer(media_type: str) -> bool:
    """A non-distributable layer: registries may not store it; its descriptor may carry `urls`."""
    return media_type in FOREIGN_LAYER_TYPES


def layer_compression(media_type: str) -> str:
    """How a layer is compressed: "" (plain tar), "gzip" or "zstd"; ImageSpecError if not a layer type."""
    try:
        return _LAYER_COMPRESSION[media_type]
    except KeyError:
        raise ImageSpecError(
            f"{media_type!r} is not a layer media type cocon can unpack "
            f"(known: {', '.join(sorted(LAYER_TYPES))})"
        ) from None


# --- documents -----------------------------------------------------------------------------------------


@json_object()
class Platform:
    architecture: str
    os: str
    os_version: str | None = field(default=None, metadata={"json": "os.version"})
    os_features: list[str] | None = field(default=None, metadata={"json": "os.features"})
    variant: str | None = None
    features: list[str] | None = None  # reserved by the spec

    def __str__(self) -> str:
        return format_platform(self)


@json_object()
class Descriptor:
    media_type: str
    digest: str
    size: int
    urls: list[str] | None = None
    annotations: dict[str, str] | None = None
    data: str | None = None  # the content itself, base64 (image-spec 1.1 "embedded content")
    platform: Platform | None = None
    artifact_type: str | None = None

    @property
    def parsed_digest(self) -> Digest:
        """`digest` as a Digest (valid in any descriptor that came through parse_* or validation)."""
        return Digest.parse(self.digest)


@json_object()
class Manifest:
    schema_version: int
    media_type: str | None = None
    artifact_type: str | None = None
    config: Descriptor
    layers: list[Descriptor]
    subject: Descriptor | None = None
    annotations: dict[str, str] | None = None


@json_object()
class Index:
    schema_version: int
    media_type: str | None = None
    artifact_type: str | None = None
    manifests: list[Descriptor]
    subject: Descriptor | None = None
    annotations: dict[str, str] | None = None


@json_object()
class Healthcheck:
    test: list[str] | None = field(default=None, metadata={"json": "Test"})
    interval: int | None = field(default=None, metadata={"json": "Interval"})  # nanoseconds
    timeout: int | None = field(default=None, metadata={"json": "Timeout"})
    start_period: int | None = field(default=None, metadata={"json": "StartPeriod"})
    start_interval: int | None = field(default=None, metadata={"json": "StartInterval"})
    retries: int | None = field(default=None, metadata={"json": "Retries"})


@json_object()
class ContainerConfig:
    """The `config` object of an image config: the defaults for containers run from the image."""

    user: str | None = field(default=None, metadata={"json": "User"})
    exposed_ports: dict[str, object] | None = field(default=None, metadata={"json": "ExposedPorts"})
    env: list[str] | None = field(default=None, metadata={"json": "Env"})
    entrypoint: list[str] | None = field(default=None, metadata={"json": "Entrypoint"})
    cmd: list[str] | None = field(default=None, metadata={"json": "Cmd"})
    volumes: dict[str, object] | None = field(default=None, metadata={"json": "Volumes"})
    working_dir: str | None = field(default=None, metadata={"json": "WorkingDir"})
    labels: dict[str, str] | None = field(default=None, metadata={"json": "Labels"})
    stop_signal: str | None = field(default=None, metadata={"json": "StopSignal"})
    args_escaped: bool | None = field(default=None, metadata={"json": "ArgsEscaped"})
    healthcheck: Healthcheck | None = field(default=None, metadata={"json": "Healthcheck"})
    on_build: list[str] | None = field(default=None, metadata={"json": "OnBuild"})
    shell: list[str] | None = field(default=None, metadata={"json": "Shell"})


@json_object()
class RootFS:
    type: str
    diff_ids: list[str] = field(metadata={"json": "diff_ids"})


@json_object()
class History:
    created: str | None = field(default=None, metadata={"json": "created"})
    created_by: str | None = field(default=None, metadata={"json": "created_by"})
    author: str | None = field(default=None, metadata={"json": "author"})
    comment: str | None = field(default=None, metadata={"json": "comment"})
    empty_layer: bool = field(default=False, metadata={"json": "empty_layer"})


@json_object()
class ImageConfig:
    created: str | None = None  # RFC 3339
    author: str | None = None
    architecture: str
    os: str
    os_version: str | None = field(default=None, metadata={"json": "os.version"})
    os_features: list[str] | None = field(default=None, metadata={"json": "os.features"})
    variant: str | None = None
    config: ContainerConfig | None = None
    rootfs: RootFS = field(metadata={"json": "rootfs"})
    history: list[History] | None = None


# --- parsing and validation ----------------------------------------------------------------------------

_ALNUM = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789")
_MEDIA_TYPE_CHARS = _ALNUM | frozenset("!#$&^_.+-")
_DIGITS = frozenset("0123456789")


def _is_media_type_part(part: str) -> bool:
    """RFC 6838's restricted name: `[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}`."""
    return 0 < len(part) <= 127 and part[0] in _ALNUM and _MEDIA_TYPE_CHARS.issuperset(part)


def is_media_type(value: str) -> bool:
    """`type/subtype`, each an RFC 6838 restricted name (no parameters)."""
    kind, sep, subtype = value.partition("/")
    return bool(sep) and _is_media_type_part(kind) and _is_media_type_part(subtype)


def _port_number(text: str) -> bool:
    return 0 < len(text) <= 5 and _DIGITS.issuperset(text) and 0 < int(text) < 65536


def is_exposed_port(key: str) -> bool:
    """An ExposedPorts key: `PORT[-PORT][/tcp|/udp|/sctp]`, ports 1 to 65535."""
    ports, sep, proto = key.partition("/")
    if sep and proto not in ("tcp", "udp", "sctp"):
        return False
    low, sep, high = ports.partition("-")
    return _port_number(low) and (not sep or _port_number(high))


def _fail(source: str, where: str, problem: str) -> ImageSpecError:
    return ImageSpecError(f"{source}: {where}: {problem}")


def _loads(data: bytes | str, source: str) -> Any:
    try:
        return _fastjson.loads(data)
    except UnicodeDecodeError:
        raise ImageSpecError(f"{source}: not valid JSON: the bytes are not UTF-8 text") from None
    except ValueError as exc:
        raise ImageSpecError(f"{source}: not valid JSON: {exc}") from None


def _decode(data: bytes | str, cls: type[Any], source: str) -> Any:
    try:
        return decode(data, cls)
    except UnicodeDecodeError:
        raise ImageSpecError(f"{source}: not valid JSON: the bytes are not UTF-8 text") from None
    except DecodeError as exc:
        problem = str(exc)
        if not problem.startswith("not valid JSON"):
            problem = f"invalid document: {problem}"
        raise ImageSpecError(f"{source}: {problem}") from None


def _check_media_type(value: str, source: str, where: str) -> None:
    if not is_media_type(value):
        raise _fail(source, where, f"{value!r} is not a media type (type/subtype, e.g. {OCI_MANIFEST!r})")


def _check_schema_version(version: int, source: str) -> None:
    if version == 1:
        raise _fail(source, "schemaVersion", "is 1: Docker schema 1 manifests are not supported")
    if version != 2:
        raise _fail(source, "schemaVersion", f"must be 2, got {version}")


def validate_platform(p: Platform, source: str = "platform", where: str = "platform") -> None:
    if not p.architecture:
        raise _fail(source, f"{where}.architecture", "is required (e.g. 'amd64')")
    if not p.os:
        raise _fail(source, f"{where}.os", "is required (e.g. 'linux')")


def validate_descriptor(d: Descriptor, source: str = "descriptor", where: str = "descriptor") -> None:
    """Check one descriptor: media type syntax, a valid digest, size >= 0, embedded data if any."""
    _check_media_type(d.media_type, source, f"{where}.mediaType")
    try:
        digest = Digest.parse(d.digest)
    except DigestError as exc:
        raise _fail(source, f"{where}.digest", str(exc)) from None
    if d.size < 0:
        raise _fail(source, f"{where}.size", f"must be >= 0, got {d.size}")
    if d.artifact_type is not None:
        _check_media_type(d.artifact_type, source, f"{where}.artifactType")
    for i, url in enumerate(d.urls or ()):
        if not url:
            raise _fail(source, f"{where}.urls[{i}]", "must not be empty")
    if d.platform is not None:
        validate_platform(d.platform, source, f"{where}.platform")
    if d.data is not None:
        import base64
        import binascii

        try:
            content = base64.b64decode(d.data, validate=True)
        except (binascii.Error, ValueError):
            raise _fail(source, f"{where}.data", "is not valid base64") from None
        if len(content) != d.size:
            raise _fail(source, f"{where}.data", f"holds {len(content)} bytes but size says {d.size}")
        if digest_of(content, digest.algorithm) != digest:
            raise _fail(source, f"{where}.data", f"does not match the digest {d.digest}")


def _is_image_manifest(m: Manifest) -> bool:
    return m.artifact_type is None and m.config.media_type in CONFIG_TYPES


def validate_manifest(m: Manifest, source: str = "image manifest", *, strict: bool = True) -> None:
    """Check a manifest beyond its types. `strict`: the layers of an image (not of an artifact) must
    have media types cocon can unpack; gc and other walkers that only follow references pass False."""
    _check_schema_version(m.schema_version, source)
    if m.media_type is not None and m.media_type not in MANIFEST_TYPES:
        if m.media_type in INDEX_TYPES:
            raise _fail(source, "mediaType", f"{m.media_type!r} is an index, not an image manifest")
        raise _fail(source, "mediaType", f"{m.media_type!r} is not an image manifest media type")
    if m.artifact_type is not None:
        _check_media_type(m.artifact_type, source, "artifactType")
    validate_descriptor(m.config, source, "config")
    image = _is_image_manifest(m)
    for i, layer in enumerate(m.layers):
        validate_descriptor(layer, source, f"layers[{i}]")
        if strict and image and layer.media_type not in _LAYER_COMPRESSION:
            raise _fail(
                source,
                f"layers[{i}].mediaType",
                f"{layer.media_type!r} is not a layer type cocon can unpack "
                "(plain, gzip or zstd tar in OCI or Docker form)",
            )
    if m.subject is not None:
        validate_descriptor(m.subject, source, "subject")


def validate_index(ix: Index, source: str = "image index") -> None:
    _check_schema_version(ix.schema_version, source)
    if ix.media_type is not None and ix.media_type not in INDEX_TYPES:
        if ix.media_type in MANIFEST_TYPES:
            raise _fail(source, "mediaType", f"{ix.media_type!r} is an image manifest, not an index")
        raise _fail(source, "mediaType", f"{ix.media_type!r} is not an image index media type")
    if ix.artifact_type is not None:
        _check_media_type(ix.artifact_type, source, "artifactType")
    for i, d in enumerate(ix.manifests):
        validate_descriptor(d, source, f"manifests[{i}]")
    if ix.subject is not None:
        validate_descriptor(ix.subject, source, "subject")


def validate_image_config(c: ImageConfig, source: str = "image config") -> None:
    if not c.architecture:
        raise _fail(source, "architecture", "is required (e.g. 'amd64')")
    if not c.os:
        raise _fail(source, "os", "is required (e.g. 'linux')")
    if c.rootfs.type != "layers":
        raise _fail(source, "rootfs.type", f"must be 'layers', got {c.rootfs.type!r}")
    for i, diff_id in enumerate(c.rootfs.diff_ids):
        try:
            Digest.parse(diff_id)
        except DigestError as exc:
            raise _fail(source, f"rootfs.diff_ids[{i}]", str(exc)) from None
    cc = c.config
    if cc is None:
        return
    for port in cc.exposed_ports or {}:
        if not is_exposed_port(port):
            raise _fail(source, f"config.ExposedPorts.{port}", "is not a port like '80/tcp' or '53/udp'")
    for i, e in enumerate(cc.env or ()):
        if not e or e.startswith("="):
            raise _fail(source, f"config.Env[{i}]", f"{e!r} is not of the form KEY=VALUE")
    hc = cc.healthcheck
    if hc is not None:
        for name in ("interval", "timeout", "start_period", "start_interval", "retries"):
            value = getattr(hc, name)
            if value is not None and value < 0:
                json_name = "".join(part.title() for part in name.split("_"))
                raise _fail(source, f"config.Healthcheck.{json_name}", f"must be >= 0, got {value}")


def check_layers_match(manifest: Manifest, config: ImageConfig, source: str = "image") -> None:
    """An image's config must list one diff_id per layer of its manifest."""
    layers, diff_ids = len(manifest.layers), len(config.rootfs.diff_ids)
    if layers != diff_ids:
        raise ImageSpecError(
            f"{source}: the manifest lists {layers} layer(s) but the config's rootfs.diff_ids has "
            f"{diff_ids}: the image is inconsistent (rebuild or re-export it)"
        )


def parse_descriptor(data: bytes | str, source: str = "descriptor") -> Descriptor:
    d: Descriptor = _decode(data, Descriptor, source)
    validate_descriptor(d, source)
    return d


def parse_manifest(data: bytes | str, source: str = "image manifest", *, strict: bool = True) -> Manifest:
    """Decode and validate an image manifest (OCI or Docker schema 2)."""
    m: Manifest = _decode(data, Manifest, source)
    validate_manifest(m, source, strict=strict)
    return m


def parse_index(data: bytes | str, source: str = "image index") -> Index:
    """Decode and validate an image index (OCI) or manifest list (Docker)."""
    ix: Index = _decode(data, Index, source)
    validate_index(ix, source)
    return ix


def parse_image_config(
    data: bytes | str, source: str = "image config", *, manifest: Manifest | None = None
) -> ImageConfig:
    """Decode and validate an image config; with `manifest`, also check one diff_id per layer."""
    c: ImageConfig = _decode(data, ImageConfig, source)
    validate_image_config(c, source)
    if manifest is not None:
        check_layers_match(manifest, c, source)
    return c


def manifest_kind(doc: Any) -> str | None:
    """What a decoded JSON value is: "manifest", "index" or None (neither), by `mediaType`, else by
    shape. Raises for manifests cocon cannot read (Docker schema 1, unknown manifest media types)."""
    if not isinstance(doc, dict):
        return None
    media_type = doc.get("mediaType")
    if media_type in MANIFEST_TYPES:
        return "manifest"
    if media_type in INDEX_TYPES:
        return "index"
    if media_type in _SCHEMA1_TYPES or doc.get("schemaVersion") == 1 or "fsLayers" in doc:
        raise ImageSpecError("Docker schema 1 manifests are not supported (re-push or re-save the image)")
    if isinstance(media_type, str) and (".manifest." in media_type or ".index." in media_type):
        raise ImageSpecError(f"mediaType {media_type!r} is not a manifest type cocon knows")
    if "manifests" in doc:
        return "index"
    if "layers" in doc or ("config" in doc and "schemaVersion" in doc):
        return "manifest"
    return None


def parse_any_manifest(
    data: bytes | str, source: str = "manifest", *, strict: bool = True
) -> Manifest | Index:
    """Decode a manifest or an index, told apart by `mediaType`, or by shape when it has none."""
    doc = _loads(data, source)
    try:
        kind = manifest_kind(doc)
    except ImageSpecError as exc:
        raise ImageSpecError(f"{source}: {exc}") from None
    if kind == "index":
        return parse_index(data, source)
    if kind == "manifest":
        return parse_manifest(data, source, strict=strict)
    if not isinstance(doc, dict):
        raise ImageSpecError(f"{source}: not a manifest: the document is not a JSON object")
    media_type = doc.get("mediaType")
    if isinstance(media_type, str):
        raise _fail(source, "mediaType", f"{media_type!r} is neither an image manifest nor an index")
    raise ImageSpecError(f"{source}: not a manifest: it has neither `manifests` (an index) nor `layers`")


# --- encoding ------------------------------------------------------------------------------------------

_GO_ESCAPES = (
    ("<", "\\u003c"),
    (">", "\\u003e"),
    ("&", "\\u0026"),
    ("\u2028", "\\u2028"),
    ("\u2029", "\\u2029"),
)


def _plain(obj: Any) -> Any:
    """Like jsonobj.to_builtins (defaults left out), with map keys sorted as Go writes them."""
    if isinstance(obj, list):
        return [_plain(v) for v in obj]
    if isinstance(obj, dict):
        return {k: _plain(obj[k]) for k in sorted(obj)}
    fields = getattr(obj, "_json_fields", None)
    if fields is None:
        return obj
    kept = to_builtins(obj)
    return {f.json_name: _plain(getattr(obj, f.attr)) for f in fields if f.json_name in kept}


def canonical_json(obj: Any) -> bytes:
    """Compact JSON as Go's encoding/json writes it: declared field order, sorted map keys, `<>&`
    escaped, other non-ASCII as UTF-8."""
    import json

    text = json.dumps(_plain(obj), separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    for char, escape in _GO_ESCAPES:
        if char in text:
            text = text.replace(char, escape)
    # lone surrogates (from \ud800 escapes in the input) go back out as the same escapes
    return text.encode("utf-8", "backslashreplace")


def encode_descriptor(d: Descriptor) -> bytes:
    validate_descriptor(d)
    return canonical_json(d)


def encode_manifest(m: Manifest) -> bytes:
    validate_manifest(m, strict=False)
    return canonical_json(m)


def encode_index(ix: Index) -> bytes:
    validate_index(ix)
    return canonical_json(ix)


def encode_image_config(c: ImageConfig) -> bytes:
    validate_image_config(c)
    return canonical_json(c)


def descriptor_for(data: bytes, media_type: str, **extra: Any) -> Descriptor:
    """The sha256 descriptor of `data` (extra: urls, annotations, platform, artifact_type)."""
    return Descriptor(media_type=media_type, digest=str(sha256_of(data)), size=len(data), **extra)


# --- platforms -----------------------------------------------------------------------------------------

# os.uname().machine (and common aliases) -> (GOARCH, variant)
_MACHINES: dict[str, tuple[str, str]] = {
    "x86_64": ("amd64", ""), "x86-64": ("amd64", ""), "amd64": ("amd64", ""),
    "aarch64": ("arm64", "v8"), "arm64": ("arm64", "v8"), "armv8b": ("arm64", "v8"),
    "armv8l": ("arm", "v8"), "armv7l": ("arm", "v7"), "armv7": ("arm", "v7"), "armhf": ("arm", "v7"),
    "armv6l": ("arm", "v6"), "armel": ("arm", "v6"), "armv5tel": ("arm", "v5"), "arm": ("arm", "v7"),
    "i386": ("386", ""), "i486": ("386", ""), "i586": ("386", ""), "i686": ("386", ""), "386": ("386", ""),
    "ppc64le": ("ppc64le", ""), "s390x": ("s390x", ""), "riscv64": ("riscv64", ""),
    "loongarch64": ("loong64", ""), "mips64": ("mips64", ""), "mips64el": ("mips64le", ""),
}  # fmt: skip


def normalize_platform(os: str, architecture: str, variant: str | None = None) -> tuple[str, str, str]:
    """(os, GOARCH, variant) in containerd's normal form: `aarch64` -> arm64/v8, `x86_64` -> amd64,
    a bare `arm` -> arm/v7, variant `8` -> `v8`; amd64 without variant is v1."""
    os = os.lower()
    arch, default_variant = _MACHINES.get(architecture.lower(), (architecture.lower(), ""))
    v = (variant or "").lower()
    if v and v[0].isdigit():
        v = "v" + v
    if not v:
        v = default_variant
    if arch == "amd64" and not v:
        v = "v1"
    return os, arch, v


def _variant_number(variant: str) -> int | None:
    digits = variant[1:]
    return int(digits) if variant[:1] == "v" and digits and _DIGITS.issuperset(digits) else None


def _compatible_variants(arch: str, variant: str) -> list[str]:
    """The variants a machine of (arch, variant) runs, best first: an arm/v7 runs v7, v6, v5."""
    n = _variant_number(variant)
    lowest = {"amd64": 1, "arm": 5, "arm64": 8}.get(arch)
    if n is None or lowest is None:
        return [variant]
    return [f"v{i}" for i in range(n, lowest - 1, -1)]


def format_platform(p: Platform) -> str:
    """`os/arch[/variant]`, as `--platform` takes it."""
    parts = [p.os or "?", p.architecture or "?"]
    if p.variant:
        parts.append(p.variant)
    return "/".join(parts)


def parse_platform(text: str) -> Platform:
    """`linux/arm64/v8`, `linux/amd64` or a bare architecture (`arm64`, meaning linux/arm64)."""
    parts = text.strip().split("/")
    if len(parts) == 1 and parts[0]:
        parts = ["linux", parts[0]]
    if not 2 <= len(parts) <= 3 or not all(parts):
        raise ImageSpecError(f"{text!r} is not a platform: expected os/arch[/variant], e.g. 'linux/arm64/v8'")
    os, arch, variant = normalize_platform(parts[0], parts[1], parts[2] if len(parts) == 3 else None)
    if arch == "amd64" and variant == "v1":
        variant = ""
    return Platform(os=os, architecture=arch, variant=variant or None)


def host_platform() -> Platform:
    """The platform of this machine (from os.uname())."""
    uname = _os.uname()
    os, arch, variant = normalize_platform(uname.sysname, uname.machine)
    if arch == "amd64" and variant == "v1":
        variant = ""
    return Platform(os=os, architecture=arch, variant=variant or None)


def _is_attestation(d: Descriptor) -> bool:
    return (d.annotations or {}).get(DOCKER_REFERENCE_TYPE) == "attestation-manifest"


def select_platform(
    index: Index, os: str | None = None, architecture: str | None = None, variant: str | None = None
) -> Descriptor:
    """The manifest of `index` for a platform: the host's by default (any of os/architecture/variant
    given overrides the host's). Rules as containerd's: `aarch64` means arm64/v8, an arm64 entry
    without variant is v8, amd64 without variant is v1, and a machine runs older variants of its
    architecture (arm/v7 runs v6; amd64/v3 runs v2, v1), preferring the newest. Entries without a
    platform are taken only when no entry matches by platform (the caller should then check the
    image config's os/architecture). Raises PlatformNotFound naming what the index offers."""
    host = host_platform()
    if architecture is None:
        architecture = host.architecture
        if variant is None:
            variant = host.variant
    want_os, want_arch, want_variant = normalize_platform(os or host.os, architecture, variant)
    accepted = _compatible_variants(want_arch, want_variant)
    best: tuple[int, Descriptor] | None = None
    unplatformed: Descriptor | None = None
    for d in index.manifests:
        p = d.platform
        if p is None:
            if unplatformed is None:
                unplatformed = d
            continue
        got_os, got_arch, got_variant = normalize_platform(p.os, p.architecture, p.variant)
        if got_os != want_os or got_arch != want_arch or got_variant not in accepted:
            continue
        rank = accepted.index(got_variant)
        if best is None or rank < best[0]:
            best = (rank, d)
    if best is not None:
        return best[1]
    if unplatformed is not None:
        return unplatformed
    shown_variant = "" if (want_arch, want_variant) == ("amd64", "v1") else want_variant
    want = format_platform(Platform(os=want_os, architecture=want_arch, variant=shown_variant or None))
    offers = [format_platform(d.platform) for d in index.manifests if d.platform and not _is_attestation(d)]
    if not offers:
        raise PlatformNotFound(f"the image has no manifest for {want}: its index lists no platforms")
    raise PlatformNotFound(
        f"the image has no manifest for {want}: it offers {', '.join(offers)} (choose one with --platform)"
    )
