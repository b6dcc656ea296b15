"""cocon.oci.image_spec: real-world-shaped manifests, indexes and configs (Docker schema 2 and OCI, as
docker, buildkit, skopeo and buildah write them), round trips, errors that name the field, and
platform selection."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
from typing import Any

import pytest

from cocon.oci import image_spec as ispec
from cocon.oci.digest import Digest, sha256_of
from cocon.oci.image_spec import (
    ContainerConfig,
    Descriptor,
    Healthcheck,
    History,
    ImageConfig,
    ImageSpecError,
    Index,
    Manifest,
    Platform,
    PlatformNotFound,
    RootFS,
)


def dg(name: str) -> str:
    return "sha256:" + hashlib.sha256(name.encode()).hexdigest()


# `docker manifest inspect --verbose` / a registry serving a docker push: three-space indents,
# descriptors with size before digest.
DOCKER_MANIFEST = f"""{{
   "schemaVersion": 2,
   "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
   "config": {{
      "mediaType": "application/vnd.docker.container.image.v1+json",
      "size": 1470,
      "digest": "{dg("config")}"
   }},
   "layers": [
      {{
         "mediaType": "application/vnd.docker.image.rootfs.diff.tar.gzip",
         "size": 29124181,
         "digest": "{dg("layer0")}"
      }},
      {{
         "mediaType": "application/vnd.docker.image.rootfs.diff.tar.gzip",
         "size": 3458,
         "digest": "{dg("layer1")}"
      }}
   ]
}}""".encode()

# docker save / dockerd's image config: Docker-only keys (container_config, docker_version, ...) and
# nulls; `&&` is escaped by Go as \\u0026.
DOCKER_CONFIG = (
    '{"architecture":"amd64","config":{"Hostname":"","Domainname":"","User":"","AttachStdin":false,'
    '"AttachStdout":false,"AttachStderr":false,"ExposedPorts":{"80/tcp":{}},"Tty":false,"OpenStdin":false,'
    '"StdinOnce":false,"Env":["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",'
    '"NGINX_VERSION=1.25.3"],"Cmd":["nginx","-g","daemon off;"],"Image":"' + dg("parent") + '",'
    '"Volumes":null,"WorkingDir":"","Entrypoint":["/docker-entrypoint.sh"],"OnBuild":null,'
    '"Labels":{"maintainer":"NGINX Docker Maintainers \\u003cdocker-maint@nginx.com\\u003e"},'
    '"StopSignal":"SIGQUIT"},"container":"0f1e2d3c","container_config":{"Hostname":"0f1e2d3c",'
    '"Cmd":["/bin/sh","-c","#(nop) ","CMD [\\"nginx\\" \\"-g\\" \\"daemon off;\\"]"]},'
    '"created":"2023-11-01T05:20:51.129Z","docker_version":"20.10.23","history":['
    '{"created":"2023-10-31T22:20:01Z","created_by":"/bin/sh -c #(nop) ADD file:abc in / "},'
    '{"created":"2023-10-31T22:20:02Z","created_by":"/bin/sh -c #(nop)  CMD [\\"bash\\"]","empty_layer":true},'
    '{"created":"2023-11-01T05:20:50Z","created_by":"/bin/sh -c set -x \\u0026\\u0026 apt-get update"}],'
    '"os":"linux","rootfs":{"type":"layers","diff_ids":["' + dg("diff0") + '","' + dg("diff1") + '"]}}'
).encode()

# skopeo copy docker://... oci:dir / containerd: compact Go output in the spec's field order.
OCI_MANIFEST = (
    '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":'
    '{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"'
    + dg("oci-config")
    + '","size":1081},'
    '"layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"' + dg("oci-l0") + '",'
    '"size":3408729},{"mediaType":"application/vnd.oci.image.layer.v1.tar+zstd","digest":"'
    + dg("oci-l1")
    + '",'
    '"size":12,"annotations":{"io.example.a":"1","io.example.b":"\\u003ctag\\u003e"}}],"annotations":'
    '{"org.opencontainers.image.base.digest":"' + dg("base") + '","org.opencontainers.image.base.name":'
    '"docker.io/library/alpine:3.19"}}'
).encode()

# buildah/podman OCI image config: Healthcheck, ExposedPorts, Labels, history with comments.
OCI_CONFIG = (
    '{"created":"2024-02-10T12:00:00.123456789Z","author":"cocon tests","architecture":"arm64",'
    '"os":"linux","variant":"v8","config":{"User":"1000:1000","ExposedPorts":{"53/udp":{},"8080/tcp":{}},'
    '"Env":["PATH=/usr/bin:/bin","LANG=C.UTF-8"],"Entrypoint":["/app/server"],"Cmd":["--port","8080"],'
    '"Volumes":{"/data":{}},"WorkingDir":"/app","Labels":{"io.buildah.version":"1.28.2",'
    '"org.opencontainers.image.title":"app"},"StopSignal":"SIGTERM","Healthcheck":{"Test":["CMD-SHELL",'
    '"wget -q -O- http://localhost:8080/ \\u0026\\u0026 exit 0"],"Interval":30000000000,"Timeout":3000000000,'
    '"StartPeriod":5000000000,"StartInterval":1000000000,"Retries":3},"OnBuild":["RUN echo child"],'
    '"Shell":["/bin/sh","-c"]},"rootfs":{"type":"layers","diff_ids":["' + dg("d0") + '","' + dg("d1") + '"]},'
    '"history":[{"created":"2024-02-10T11:59:00Z","created_by":"/bin/sh -c #(nop) ADD file:x in /",'
    '"comment":"FROM debian"},{"created":"2024-02-10T11:59:30Z","created_by":"/bin/sh -c #(nop) USER 1000",'
    '"author":"cocon tests","empty_layer":true},{"created_by":"COPY server /app/server"}]}'
).encode()


def _index_entry(
    mt: str, name: str, size: int, platform: dict[str, Any] | None, **extra: Any
) -> dict[str, Any]:
    entry: dict[str, Any] = {"mediaType": mt, "digest": dg(name), "size": size, **extra}
    if platform is not None:
        entry["platform"] = platform
    return entry


# docker buildx build --platform linux/amd64,linux/arm64,linux/arm/v7 --push: an OCI index with an
# attestation manifest per image.
BUILDX_INDEX = json.dumps(
    {
        "schemaVersion": 2,
        "mediaType": ispec.OCI_INDEX,
        "manifests": [
            _index_entry(ispec.OCI_MANIFEST, "amd64", 1052, {"architecture": "amd64", "os": "linux"}),
            _index_entry(ispec.OCI_MANIFEST, "arm64", 1052, {"architecture": "arm64", "os": "linux"}),
            _index_entry(
                ispec.OCI_MANIFEST, "armv7", 1052, {"architecture": "arm", "os": "linux", "variant": "v7"}
            ),
            _index_entry(
                ispec.OCI_MANIFEST,
                "att-amd64",
                566,
                {"architecture": "unknown", "os": "unknown"},
                annotations={
                    "vnd.docker.reference.digest": dg("amd64"),
                    "vnd.docker.reference.type": "attestation-manifest",
                },
            ),
        ],
    }
).encode()

# Docker Hub's manifest list of an official image, Windows entries included.
DOCKER_LIST = json.dumps(
    {
        "manifests": [
            _index_entry(ispec.DOCKER_MANIFEST, "l-amd64", 528, {"architecture": "amd64", "os": "linux"}),
            _index_entry(
                ispec.DOCKER_MANIFEST, "l-armv6", 528, {"architecture": "arm", "os": "linux", "variant": "v6"}
            ),
            _index_entry(
                ispec.DOCKER_MANIFEST,
                "l-arm64",
                528,
                {"architecture": "arm64", "os": "linux", "variant": "v8"},
            ),
            _index_entry(
                ispec.DOCKER_MANIFEST,
                "l-win",
                1125,
                {"architecture": "amd64", "os": "windows", "os.version": "10.0.17763.5206"},
            ),
        ],
        "mediaType": ispec.DOCKER_MANIFEST_LIST,
        "schemaVersion": 2,
    },
    indent=3,
).encode()


# --- documents -------------------------------------------------------------------------------------


def test_docker_manifest() -> None:
    m = ispec.parse_manifest(DOCKER_MANIFEST)
    assert m.schema_version == 2
    assert m.media_type == ispec.DOCKER_MANIFEST
    assert m.config == Descriptor(media_type=ispec.DOCKER_CONFIG, digest=dg("config"), size=1470)
    assert [x.size for x in m.layers] == [29124181, 3458]
    assert m.layers[0].parsed_digest == Digest.parse(dg("layer0"))
    assert ispec.layer_compression(m.layers[0].media_type) == "gzip"
    assert ispec.parse_manifest(ispec.encode_manifest(m)) == m


def test_docker_config() -> None:
    c = ispec.parse_image_config(DOCKER_CONFIG)
    assert (c.architecture, c.os, c.created) == ("amd64", "linux", "2023-11-01T05:20:51.129Z")
    cc = c.config
    assert cc is not None
    assert cc.exposed_ports == {"80/tcp": {}}
    assert cc.env == [
        "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "NGINX_VERSION=1.25.3",
    ]
    assert cc.entrypoint == ["/docker-entrypoint.sh"]
    assert cc.cmd == ["nginx", "-g", "daemon off;"]
    assert cc.volumes is None and cc.on_build is None
    assert cc.working_dir == "" and cc.user == ""
    assert cc.labels == {"maintainer": "NGINX Docker Maintainers <docker-maint@nginx.com>"}
    assert cc.stop_signal == "SIGQUIT"
    assert c.rootfs.diff_ids == [dg("diff0"), dg("diff1")]
    assert c.history is not None and len(c.history) == 3
    assert c.history[1].empty_layer and not c.history[0].empty_layer
    assert c.history[2].created_by == "/bin/sh -c set -x && apt-get update"
    # Docker-only keys are not modelled: re-encoding keeps what cocon knows, and parses the same.
    encoded = ispec.encode_image_config(c)
    assert b"container_config" not in encoded and b"docker_version" not in encoded
    assert b'"empty_layer":true' in encoded and b"\\u0026\\u0026" in encoded
    assert ispec.parse_image_config(encoded) == c
    # the manifest and the config agree on the layer count
    ispec.parse_image_config(DOCKER_CONFIG, manifest=ispec.parse_manifest(DOCKER_MANIFEST))


def test_oci_manifest_round_trips_byte_for_byte() -> None:
    m = ispec.parse_manifest(OCI_MANIFEST)
    assert m.layers[1].annotations == {"io.example.a": "1", "io.example.b": "<tag>"}
    assert ispec.layer_compression(m.layers[1].media_type) == "zstd"
    assert ispec.encode_manifest(m) == OCI_MANIFEST


def test_oci_config_round_trips_byte_for_byte() -> None:
    c = ispec.parse_image_config(OCI_CONFIG)
    assert c.variant == "v8" and c.author == "cocon tests"
    cc = c.config
    assert cc is not None and cc.healthcheck is not None
    assert cc.healthcheck == Healthcheck(
        test=["CMD-SHELL", "wget -q -O- http://localhost:8080/ && exit 0"],
        interval=30_000_000_000,
        timeout=3_000_000_000,
        start_period=5_000_000_000,
        start_interval=1_000_000_000,
        retries=3,
    )
    assert cc.exposed_ports == {"53/udp": {}, "8080/tcp": {}}
    assert cc.volumes == {"/data": {}}
    assert cc.shell == ["/bin/sh", "-c"] and cc.on_build == ["RUN echo child"]
    assert c.history is not None
    assert c.history[0].comment == "FROM debian" and c.history[1].author == "cocon tests"
    assert ispec.encode_image_config(c) == OCI_CONFIG


def test_encode_is_canonical() -> None:
    """Equal objects give equal bytes: map keys sorted, compact, fields in the spec's order."""
    a = Descriptor(media_type=ispec.OCI_LAYER, digest=dg("x"), size=0, annotations={"b": "2", "a": "1"})
    b = Descriptor(media_type=ispec.OCI_LAYER, digest=dg("x"), size=0, annotations={"a": "1", "b": "2"})
    assert ispec.encode_descriptor(a) == ispec.encode_descriptor(b)
    assert ispec.encode_descriptor(a) == (
        b'{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"' + dg("x").encode() + b'",'
        b'"size":0,"annotations":{"a":"1","b":"2"}}'
    )


def test_build_documents_in_code() -> None:
    config = ImageConfig(
        architecture="amd64",
        os="linux",
        config=ContainerConfig(cmd=["sh"], env=["PATH=/bin"], labels={"é": "ü"}),
        rootfs=RootFS(type="layers", diff_ids=[dg("d")]),
        history=[History(created_by="ADD rootfs.tar /")],
    )
    config_bytes = ispec.encode_image_config(config)
    assert config_bytes == (
        b'{"architecture":"amd64","os":"linux","config":{"Env":["PATH=/bin"],"Cmd":["sh"],'
        b'"Labels":{"\xc3\xa9":"\xc3\xbc"}},"rootfs":{"type":"layers","diff_ids":["'
        + dg("d").encode()
        + b'"]},'
        b'"history":[{"created_by":"ADD rootfs.tar /"}]}'
    )
    layer = ispec.descriptor_for(b"layer bytes", ispec.OCI_LAYER)
    assert layer.digest == str(sha256_of(b"layer bytes")) and layer.size == 11
    manifest = Manifest(
        schema_version=2,
        media_type=ispec.OCI_MANIFEST,
        config=ispec.descriptor_for(config_bytes, ispec.OCI_CONFIG),
        layers=[layer],
    )
    data = ispec.encode_manifest(manifest)
    assert ispec.parse_any_manifest(data) == manifest
    index = Index(
        schema_version=2,
        media_type=ispec.OCI_INDEX,
        manifests=[
            ispec.descriptor_for(
                data, ispec.OCI_MANIFEST, platform=Platform(architecture="amd64", os="linux")
            )
        ],
    )
    assert ispec.parse_any_manifest(ispec.encode_index(index)) == index


def test_indexes() -> None:
    ix = ispec.parse_index(BUILDX_INDEX)
    assert len(ix.manifests) == 4
    assert ix.manifests[2].platform == Platform(architecture="arm", os="linux", variant="v7")
    dl = ispec.parse_index(DOCKER_LIST)
    assert dl.media_type == ispec.DOCKER_MANIFEST_LIST
    win = dl.manifests[3].platform
    assert win is not None and win.os_version == "10.0.17763.5206"
    assert b'"os.version":"10.0.17763.5206"' in ispec.encode_index(dl)
    assert ispec.parse_index(ispec.encode_index(dl)) == dl


def test_parse_any_manifest_by_media_type_and_shape() -> None:
    assert isinstance(ispec.parse_any_manifest(DOCKER_MANIFEST), Manifest)
    assert isinstance(ispec.parse_any_manifest(DOCKER_LIST), Index)
    # the OCI spec leaves mediaType optional: tell them apart by shape
    bare_index = json.loads(BUILDX_INDEX)
    del bare_index["mediaType"]
    assert isinstance(ispec.parse_any_manifest(json.dumps(bare_index).encode()), Index)
    bare_manifest = json.loads(OCI_MANIFEST)
    del bare_manifest["mediaType"]
    assert isinstance(ispec.parse_any_manifest(json.dumps(bare_manifest).encode()), Manifest)


def test_artifact_manifest_layers_may_be_anything() -> None:
    """An OCI 1.1 artifact (artifactType, empty config) may carry any layer type, and refer to a subject."""
    empty = base64.b64encode(b"{}").decode()
    doc = {
        "schemaVersion": 2,
        "mediaType": ispec.OCI_MANIFEST,
        "artifactType": "application/vnd.dev.sigstore.bundle.v0.3+json",
        "config": {"mediaType": ispec.OCI_EMPTY, "digest": str(sha256_of(b"{}")), "size": 2, "data": empty},
        "layers": [
            {"mediaType": "application/vnd.dev.sigstore.bundle.v0.3+json", "digest": dg("sig"), "size": 10}
        ],
        "subject": {"mediaType": ispec.OCI_MANIFEST, "digest": dg("amd64"), "size": 1052},
    }
    m = ispec.parse_manifest(json.dumps(doc).encode())
    assert m.subject is not None and m.subject.digest == dg("amd64")


def test_attestation_manifest_needs_non_strict() -> None:
    """buildkit's attestation manifests use an image config type but in-toto layers: readable for
    walkers (strict=False), refused for unpacking."""
    doc = {
        "schemaVersion": 2,
        "mediaType": ispec.OCI_MANIFEST,
        "config": {"mediaType": ispec.OCI_CONFIG, "digest": dg("att-config"), "size": 167},
        "layers": [{"mediaType": "application/vnd.in-toto+json", "digest": dg("sbom"), "size": 1},
                   {"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip+encrypted", "digest": dg("e"), "size": 1}],
    }  # fmt: skip
    data = json.dumps(doc).encode()
    with pytest.raises(
        ImageSpecError, match=r"layers\[0\]\.mediaType: 'application/vnd.in-toto\+json' is not a layer"
    ):
        ispec.parse_manifest(data)
    assert len(ispec.parse_manifest(data, strict=False).layers) == 2
    assert isinstance(ispec.parse_any_manifest(data, strict=False), Manifest)


def test_layer_media_types() -> None:
    for mt in (ispec.OCI_LAYER, ispec.DOCKER_LAYER, ispec.OCI_LAYER_NONDISTRIBUTABLE):
        assert ispec.layer_compression(mt) == ""
    assert ispec.is_foreign_layer(ispec.DOCKER_FOREIGN_LAYER_GZIP)
    assert ispec.layer_compression(ispec.DOCKER_FOREIGN_LAYER_GZIP) == "gzip"
    assert not ispec.is_foreign_layer(ispec.OCI_LAYER_GZIP)
    assert ispec.is_known_layer(ispec.DOCKER_LAYER_ZSTD)
    with pytest.raises(ImageSpecError, match="'text/plain' is not a layer media type cocon can unpack"):
        ispec.layer_compression("text/plain")


def test_foreign_layer_with_urls() -> None:
    doc = json.loads(DOCKER_MANIFEST)
    doc["layers"][0] = {
        "mediaType": ispec.DOCKER_FOREIGN_LAYER_GZIP,
        "size": 1718332879,
        "digest": dg("win-base"),
        "urls": ["https://mcr.microsoft.com/v2/windows/servercore/blobs/" + dg("win-base")],
    }
    m = ispec.parse_manifest(json.dumps(doc).encode())
    assert m.layers[0].urls is not None


# --- errors ------------------------------------------------------------------------------------------


def _edit(data: bytes, fn: Any) -> bytes:
    doc = json.loads(data)
    fn(doc)
    return json.dumps(doc).encode()


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda d: d.update(schemaVersion=3), "image manifest: schemaVersion: must be 2, got 3"),
        (lambda d: d.update(schemaVersion=1), "schemaVersion: is 1: Docker schema 1 manifests are not supported"),
        (lambda d: d.update(schemaVersion="2"), "Expected `int`, got `str` - at `$.schemaVersion`"),
        (lambda d: d.pop("layers"), "Object missing required field `layers` - at `$`"),
        (lambda d: d["layers"][1].update(size=-1), "layers[1].size: must be >= 0, got -1"),
        (lambda d: d["layers"][0].update(size="12"), "Expected `int`, got `str` - at `$.layers[0].size`"),
        (lambda d: d["layers"][1].update(digest="sha256:1234"), "layers[1].digest: 'sha256:1234' is not a valid"),
        (lambda d: d["config"].update(digest="md5:00"), "config.digest: 'md5:00': unsupported digest algorithm"),
        (lambda d: d["config"].pop("mediaType"), "missing required field `mediaType` - at `$.config`"),
        (lambda d: d["config"].update(mediaType="json"), "config.mediaType: 'json' is not a media type"),
        (lambda d: d["layers"][0].update(mediaType="application/x-tar"), "layers[0].mediaType: 'application/x-tar' is not a layer type"),
        (lambda d: d.update(mediaType=ispec.OCI_INDEX), "mediaType: 'application/vnd.oci.image.index.v1+json' is an index, not an image manifest"),
        (lambda d: d["layers"][0].update(urls=[""]), "layers[0].urls[0]: must not be empty"),
    ],
)  # fmt: skip
def test_manifest_errors_name_the_field(edit: Any, message: str) -> None:
    with pytest.raises(ImageSpecError) as info:
        ispec.parse_manifest(_edit(DOCKER_MANIFEST, edit))
    assert message in str(info.value)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda d: d["manifests"][1]["platform"].update(architecture=64), "at `$.manifests[1].platform.architecture`"),
        (lambda d: d["manifests"][2]["platform"].update(os=""), "manifests[2].platform.os: is required"),
        (lambda d: d["manifests"][0].update(digest="sha256:" + "0" * 63 + "Z"), "manifests[0].digest: "),
        (lambda d: d.update(mediaType=ispec.DOCKER_MANIFEST), "is an image manifest, not an index"),
        (lambda d: d.update(manifests={}), "Expected `array`, got `object` - at `$.manifests`"),
    ],
)  # fmt: skip
def test_index_errors_name_the_field(edit: Any, message: str) -> None:
    with pytest.raises(ImageSpecError) as info:
        ispec.parse_index(_edit(BUILDX_INDEX, edit))
    assert message in str(info.value)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda d: d.pop("rootfs"), "missing required field `rootfs` - at `$`"),
        (lambda d: d["rootfs"].update(type="layer"), "rootfs.type: must be 'layers', got 'layer'"),
        (lambda d: d["rootfs"]["diff_ids"].append("sha256:short"), "rootfs.diff_ids[2]: 'sha256:short'"),
        (lambda d: d.update(architecture=""), "architecture: is required"),
        (lambda d: d["config"].update(ExposedPorts={"eighty/tcp": {}}), "config.ExposedPorts.eighty/tcp: is not a port"),
        (lambda d: d["config"].update(ExposedPorts={"70000/tcp": {}}), "config.ExposedPorts.70000/tcp: is not a port"),
        (lambda d: d["config"].update(Env=["=x"]), "config.Env[0]: '=x' is not of the form KEY=VALUE"),
        (lambda d: d["config"].update(Cmd="nginx"), "Expected `array`, got `str` - at `$.config.Cmd`"),
        (lambda d: d["history"][0].update(empty_layer="yes"), "at `$.history[0].empty_layer`"),
        (lambda d: d["config"].update(Healthcheck={"Retries": -1}), "config.Healthcheck.Retries: must be >= 0"),
        (lambda d: d["config"].update(Healthcheck={"StartPeriod": -5}), "config.Healthcheck.StartPeriod: must be >= 0"),
    ],
)  # fmt: skip
def test_config_errors_name_the_field(edit: Any, message: str) -> None:
    with pytest.raises(ImageSpecError) as info:
        ispec.parse_image_config(_edit(DOCKER_CONFIG, edit), "blobs/sha256/abc")
    assert str(info.value).startswith("blobs/sha256/abc: ")
    assert message in str(info.value)


def test_layer_count_must_match_diff_ids() -> None:
    m = ispec.parse_manifest(DOCKER_MANIFEST)
    c = ispec.parse_image_config(_edit(DOCKER_CONFIG, lambda d: d["rootfs"]["diff_ids"].pop()))
    with pytest.raises(
        ImageSpecError,
        match=re.escape("the manifest lists 2 layer(s) but the config's rootfs.diff_ids has 1"),
    ):
        ispec.check_layers_match(m, c)
    with pytest.raises(ImageSpecError, match=r"^cfg: the manifest lists 2"):
        ispec.parse_image_config(
            _edit(DOCKER_CONFIG, lambda d: d["rootfs"]["diff_ids"].pop()), "cfg", manifest=m
        )


@pytest.mark.parametrize(
    "data, message",
    [
        (b"", "manifest: not valid JSON"),
        (b"\x1f\x8b\x08\x00", "manifest: not valid JSON: the bytes are not UTF-8 text"),
        (b'{"schemaVersion": 2,', "manifest: not valid JSON"),
        (b"[]", "manifest: not a manifest: the document is not a JSON object"),
        (b'{"architecture": "amd64"}', "manifest: not a manifest: it has neither `manifests`"),
        (b'{"schemaVersion": 1, "name": "x", "fsLayers": []}', "Docker schema 1 manifests are not supported"),
        (json.dumps({"mediaType": ispec.DOCKER_SCHEMA1_SIGNED_MANIFEST}).encode(), "Docker schema 1"),
        (b'{"mediaType": "application/vnd.example.manifest.v9+json"}', "is not a manifest type cocon knows"),
        (b'{"mediaType": "text/plain", "schemaVersion": 2}', "mediaType: 'text/plain' is neither an image manifest nor an index"),
    ],
)  # fmt: skip
def test_parse_any_manifest_errors(data: bytes, message: str) -> None:
    with pytest.raises(ImageSpecError) as info:
        ispec.parse_any_manifest(data)
    assert message in str(info.value)


def test_embedded_data_is_checked() -> None:
    good = Descriptor(media_type=ispec.OCI_EMPTY, digest=str(sha256_of(b"{}")), size=2, data="e30=")
    ispec.validate_descriptor(good)
    with pytest.raises(ImageSpecError, match=re.escape("descriptor.data: does not match the digest")):
        ispec.validate_descriptor(_with(good, data=base64.b64encode(b"[]").decode()))
    with pytest.raises(ImageSpecError, match=re.escape("descriptor.data: holds 3 bytes but size says 2")):
        ispec.validate_descriptor(_with(good, data=base64.b64encode(b"{ }").decode()))
    with pytest.raises(ImageSpecError, match=re.escape("descriptor.data: is not valid base64")):
        ispec.validate_descriptor(_with(good, data="!!"))


def _with(d: Descriptor, **changes: Any) -> Descriptor:
    from cocon.oci.jsonobj import replace

    result: Descriptor = replace(d, **changes)
    return result


def test_encode_refuses_invalid_documents() -> None:
    m = ispec.parse_manifest(OCI_MANIFEST)
    bad = Manifest(schema_version=2, config=_with(m.config, size=-3), layers=m.layers)
    with pytest.raises(ImageSpecError, match=re.escape("config.size: must be >= 0")):
        ispec.encode_manifest(bad)


# --- platforms ---------------------------------------------------------------------------------------


def _uname(machine: str) -> os.uname_result:
    return os.uname_result(("Linux", "host", "6.1.0", "#1 SMP", machine))


@pytest.mark.parametrize(
    "machine, expected",
    [("x86_64", "amd64"), ("aarch64", "arm64"), ("armv7l", "armv7"), ("armv6l", "l-armv6")],
)
def test_select_platform_for_the_host(monkeypatch: pytest.MonkeyPatch, machine: str, expected: str) -> None:
    monkeypatch.setattr(os, "uname", lambda: _uname(machine))
    index = ispec.parse_index(DOCKER_LIST if expected.startswith("l-") else BUILDX_INDEX)
    assert ispec.select_platform(index).digest == dg(expected)


def test_host_platform(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "uname", lambda: _uname("aarch64"))
    assert ispec.host_platform() == Platform(architecture="arm64", os="linux", variant="v8")
    monkeypatch.setattr(os, "uname", lambda: _uname("x86_64"))
    assert ispec.host_platform() == Platform(architecture="amd64", os="linux")
    assert str(ispec.host_platform()) == "linux/amd64"


def test_select_platform_variants() -> None:
    dl = ispec.parse_index(DOCKER_LIST)
    # arm64 with and without the explicit v8
    assert ispec.select_platform(dl, "linux", "arm64").digest == dg("l-arm64")
    assert ispec.select_platform(dl, "linux", "aarch64", "8").digest == dg("l-arm64")
    # an arm/v7 machine runs the v6 image when there is no v7 one; prefers v7 when there is
    assert ispec.select_platform(dl, "linux", "arm", "v7").digest == dg("l-armv6")
    bx = ispec.parse_index(BUILDX_INDEX)
    assert ispec.select_platform(bx, "linux", "arm", "v7").digest == dg("armv7")
    # windows entries are matched by os
    assert ispec.select_platform(dl, "windows", "amd64").digest == dg("l-win")
    # an amd64/v3 machine runs plain amd64 images
    assert ispec.select_platform(dl, "linux", "amd64", "v3").digest == dg("l-amd64")


def test_select_platform_error_lists_what_the_index_offers() -> None:
    bx = ispec.parse_index(BUILDX_INDEX)
    with pytest.raises(PlatformNotFound) as info:
        ispec.select_platform(bx, "linux", "s390x")
    assert str(info.value) == (
        "the image has no manifest for linux/s390x: it offers linux/amd64, linux/arm64, linux/arm/v7 "
        "(choose one with --platform)"
    )
    with pytest.raises(PlatformNotFound, match="no manifest for linux/arm/v6: it offers"):
        ispec.select_platform(bx, "linux", "arm", "v6")  # a v6 machine cannot run v7
    empty = Index(schema_version=2, manifests=[])
    with pytest.raises(PlatformNotFound, match="no manifest for linux/amd64: its index lists no platforms"):
        ispec.select_platform(empty, "linux", "amd64")


def test_select_platform_falls_back_on_entries_without_platform() -> None:
    """docker save's OCI index.json lists its manifest without a platform."""
    entry = Descriptor(media_type=ispec.OCI_MANIFEST, digest=dg("saved"), size=400)
    ix = Index(schema_version=2, manifests=[entry])
    assert ispec.select_platform(ix, "linux", "riscv64") is entry
    other = Descriptor(
        media_type=ispec.OCI_MANIFEST,
        digest=dg("x"),
        size=1,
        platform=Platform(architecture="riscv64", os="linux"),
    )
    ix2 = Index(schema_version=2, manifests=[entry, other])
    assert ispec.select_platform(ix2, "linux", "riscv64") is other


def test_parse_and_format_platform() -> None:
    assert ispec.parse_platform("linux/arm64") == Platform(os="linux", architecture="arm64", variant="v8")
    assert ispec.parse_platform("linux/x86_64") == Platform(os="linux", architecture="amd64")
    assert ispec.parse_platform("arm") == Platform(os="linux", architecture="arm", variant="v7")
    assert ispec.format_platform(ispec.parse_platform("linux/arm/v6")) == "linux/arm/v6"
    for bad in ("", "linux/", "a/b/c/d", "/amd64"):
        with pytest.raises(ImageSpecError, match="is not a platform: expected os/arch"):
            ispec.parse_platform(bad)


@pytest.mark.parametrize(
    "value, ok",
    [(ispec.OCI_MANIFEST, True), ("a/b", True), ("text/plain+x!#$&^_.-", True), ("a" * 127 + "/b", True),
     ("a" * 128 + "/b", False), ("a/", False), ("/b", False), ("a/b/c", False), ("-a/b", False),
     ("a/b; charset=utf-8", False), ("é/b", False), ("ab", False)],
)  # fmt: skip
def test_media_type_syntax(value: str, ok: bool) -> None:
    assert ispec.is_media_type(value) is ok


@pytest.mark.parametrize(
    "key, ok",
    [("80", True), ("80/tcp", True), ("53/udp", True), ("9/sctp", True), ("1000-2000/tcp", True),
     ("65535", True), ("00080", True), ("0", False), ("65536", False), ("80/", False), ("80/icmp", False),
     ("80-", False), ("-80", False), ("123456", False), ("\uff18\uff10", False), ("80 /tcp", False), ("", False)],
)  # fmt: skip
def test_exposed_port_syntax(key: str, ok: bool) -> None:
    assert ispec.is_exposed_port(key) is ok
