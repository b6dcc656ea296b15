"""cocon.images.archive on small synthetic images and archives: save/load round trips in the three
formats, what the archives contain, hostile and broken archives, and import_rootfs.

Every test uses its own image stores under tmp_path (real SQLite, real content store)."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import zstandard

from cocon.images import archive
from cocon.images.archive import ArchiveError, CorruptArchive, UnsafeArchive, import_rootfs, load, save
from cocon.images.errors import ImageError, UnsafeLayer
from cocon.images.layers import apply_layer, dir_to_layer
from cocon.images.store import ImageCorrupt, ImageStore
from cocon.oci.image_spec import (
    OCI_CONFIG,
    OCI_INDEX,
    OCI_LAYER,
    OCI_LAYER_GZIP,
    OCI_MANIFEST,
    Descriptor,
    History,
    ImageConfig,
    Index,
    Manifest,
    Platform,
    RootFS,
    encode_image_config,
    encode_index,
    encode_manifest,
    host_platform,
)

FORMATS = ["oci-archive", "oci-dir", "docker-archive"]


# --- helpers --------------------------------------------------------------------------------------


@pytest.fixture
def store(tmp_path: Path) -> Iterator[ImageStore]:
    s = ImageStore(str(tmp_path / "store"))
    yield s
    s.close()


@pytest.fixture
def other(tmp_path: Path) -> Iterator[ImageStore]:
    """A second, empty store to load into."""
    s = ImageStore(str(tmp_path / "other"))
    yield s
    s.close()


def make_image(store: ImageStore, tmp_path: Path, tag: str, files: list[dict[str, str]], names=()) -> str:
    """An image with one layer per dict of files (gzip layers), with a CMD and a label."""
    descs, diff_ids = [], []
    for n, layer_files in enumerate(files):
        root = tmp_path / f"src-{tag}-{n}"
        root.mkdir()
        for name, text in layer_files.items():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            (root / name).write_text(text)
        buf = io.BytesIO()
        info = dir_to_layer(str(root), buf, mtime=1_700_000_000)
        store.content.put(buf.getvalue())
        descs.append(Descriptor(media_type=info.media_type, digest=info.digest, size=info.size))
        diff_ids.append(info.diff_id)
    platform = host_platform()
    config = ImageConfig(
        created="2024-01-02T03:04:05Z",
        architecture=platform.architecture,
        os=platform.os,
        variant=platform.variant,
        config=None,
        rootfs=RootFS(type="layers", diff_ids=diff_ids),
        history=[History(created_by=f"layer {n}") for n in range(len(files))],
    )
    data = encode_image_config(config)
    # A field cocon does not model must survive the round trip byte for byte (the ID depends on it).
    data = data[:-1] + b',"container_config":{"Hostname":"x"}}'
    return store.commit(data, descs, names=names).id


def unpacked(store: ImageStore, image_id: str, dest: Path) -> dict[str, str]:
    """The image's merged rootfs (layers applied in order) as {relative path: text}."""
    image = store.get(image_id)
    for desc, diff_id in zip(image.manifest.layers, image.diff_ids, strict=True):
        with store.content.open(desc.digest) as f:
            apply_layer(f, str(dest), expected_diff_id=diff_id)
    out = {}
    for dirpath, _, filenames in os.walk(dest):
        for name in filenames:
            path = os.path.join(dirpath, name)
            out[os.path.relpath(path, dest)] = Path(path).read_text()
    return out


def dest_for(tmp_path: Path, fmt: str) -> Path:
    return tmp_path / ("layout" if fmt == "oci-dir" else f"image-{fmt}.tar")


def read_archive(path: Path) -> dict[str, bytes]:
    """Regular members of a tar (or files of a directory) by path."""
    out: dict[str, bytes] = {}
    if path.is_dir():
        for p in path.rglob("*"):
            if p.is_file():
                out[str(p.relative_to(path))] = p.read_bytes()
        return out
    with tarfile.open(path) as tar:
        for m in tar:
            if m.isreg():
                f = tar.extractfile(m)
                assert f is not None
                out[m.name] = f.read()
    return out


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def write_tar(path: Path, members: list[tuple[str, bytes | None, dict]]) -> None:
    """A tar from (name, data, extra TarInfo attributes); data None for non-regular members."""
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for name, data, extra in members:
            info = tarfile.TarInfo(name)
            for k, v in extra.items():
                setattr(info, k, v)
            if data is not None:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            else:
                tar.addfile(info)


def oci_members(
    store: ImageStore, image_id: str, name: str | None = "app:1"
) -> list[tuple[str, bytes | None, dict]]:
    """The members of an OCI layout of one stored image, to be changed by a test and tarred."""
    image = store.get(image_id)
    members: list[tuple[str, bytes | None, dict]] = [("oci-layout", b'{"imageLayoutVersion":"1.0.0"}', {})]
    blobs = [
        image.manifest.config.digest,
        *(layer.digest for layer in image.manifest.layers),
        image.manifest_digest,
    ]
    for d in blobs:
        members.append((f"blobs/sha256/{d.split(':')[1]}", store.content.read(d), {}))
    manifest = store.content.read(image.manifest_digest)
    entry = Descriptor(
        media_type=OCI_MANIFEST,
        digest=image.manifest_digest,
        size=len(manifest),
        annotations={"org.opencontainers.image.ref.name": name} if name else None,
    )
    members.append(("index.json", encode_index(Index(schema_version=2, manifests=[entry])), {}))
    return members


def json_manifests(index_bytes: bytes) -> list[Descriptor]:
    from cocon.oci.image_spec import parse_index

    return parse_index(index_bytes).manifests


def assert_nothing_recorded(store: ImageStore) -> None:
    assert store.list() == []
    assert store.roots() == []


# --- round trips ----------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
def test_round_trip_keeps_id_names_config_and_files(store, other, tmp_path, fmt):
    image_id = make_image(
        store,
        tmp_path,
        "app",
        [{"etc/os-release": "ID=test\n", "bin/tool": "v1"}, {"bin/tool": "v2", "data/x": "x"}],
        names=["app:1", "example.com/team/app:latest"],
    )
    dest = dest_for(tmp_path, fmt)
    result = save(store, ["app:1", "example.com/team/app"], dest, format=fmt)
    assert result.format == fmt
    assert result.images == (archive.SavedImage(image_id, ("app:1", "example.com/team/app:latest")),)
    assert result.size > 0
    if fmt != "oci-dir":
        assert result.size == dest.stat().st_size
    loaded = load(other, dest)
    assert [i.id for i in loaded] == [image_id]
    image = loaded[0]
    assert image.names == ("docker.io/library/app:1", "example.com/team/app:latest")
    original = store.get(image_id)
    assert other.content.read(image.id) == store.content.read(image_id)  # config byte for byte
    assert image.diff_ids == original.diff_ids
    assert unpacked(other, image.id, tmp_path / "out") == {
        "etc/os-release": "ID=test\n",
        "bin/tool": "v2",
        "data/x": "x",
    }
    if fmt == "docker-archive":
        assert [d.media_type for d in image.manifest.layers] == [OCI_LAYER, OCI_LAYER]
        assert [d.digest for d in image.manifest.layers] == original.diff_ids
    else:
        assert image.manifest_digest == original.manifest_digest  # the very same manifest
    # Loading again changes nothing.
    assert [i.id for i in load(other, dest)] == [image_id]
    assert len(other.list()) == 1


def test_oci_layout_content(store, tmp_path):
    image_id = make_image(store, tmp_path, "a", [{"f": "1"}], names=["app:1", "localhost:5000/app:2"])
    dest = tmp_path / "layout"
    save(store, ["app:1", "localhost:5000/app:2"], dest, format="oci-dir")
    files = read_archive(dest)
    assert json.loads(files["oci-layout"]) == {"imageLayoutVersion": "1.0.0"}
    index = json.loads(files["index.json"])
    assert index["mediaType"] == OCI_INDEX
    image = store.get(image_id)
    names = []
    for entry in index["manifests"]:
        assert entry["digest"] == image.manifest_digest
        assert entry["mediaType"] == OCI_MANIFEST
        assert entry["platform"]["os"] == "linux"
        names.append(
            (
                entry["annotations"]["io.containerd.image.name"],
                entry["annotations"]["org.opencontainers.image.ref.name"],
            )
        )
    assert names == [("docker.io/library/app:1", "app:1"), ("localhost:5000/app:2", "localhost:5000/app:2")]
    for path, data in files.items():
        if path.startswith("blobs/"):
            assert sha(data) == "sha256:" + path.rsplit("/", 1)[1]  # every blob under its digest
    assert sorted(p for p in files if p.startswith("blobs/")) == sorted(
        f"blobs/sha256/{d.split(':')[1]}"
        for d in [image.manifest_digest, image.id, *(layer.digest for layer in image.manifest.layers)]
    )
    assert os.stat(dest).st_mode & 0o777 == 0o755


def test_docker_archive_content(store, tmp_path):
    image_id = make_image(store, tmp_path, "a", [{"f": "1"}, {"g": "2"}], names=["app:1"])
    dest = tmp_path / "d.tar"
    save(store, ["app:1"], dest, format="docker-archive")
    files = read_archive(dest)
    manifest = json.loads(files["manifest.json"])
    image = store.get(image_id)
    assert manifest[0]["RepoTags"] == ["app:1"]
    assert manifest[0]["Config"] == image_id.split(":")[1] + ".json"
    assert files[manifest[0]["Config"]] == store.content.read(image_id)
    # Layers are uncompressed tars whose sha256 is the diff_id.
    assert [sha(files[p]) for p in manifest[0]["Layers"]] == image.diff_ids
    for p in manifest[0]["Layers"]:
        assert p.endswith("/layer.tar")
        assert files[p.replace("layer.tar", "VERSION")] == b"1.0"
    top = manifest[0]["Layers"][-1].split("/")[0]
    assert json.loads(files["repositories"]) == {"app": {"1": top}}


def test_several_images_one_archive_and_unnamed_by_id(store, other, tmp_path):
    a = make_image(store, tmp_path, "a", [{"a": "a"}], names=["a:1"])
    b = make_image(store, tmp_path, "b", [{"b": "b"}], names=["b:1"])
    for fmt in FORMATS:
        dest = dest_for(tmp_path, fmt)
        result = save(store, ["a:1", b[:19], a], dest, format=fmt)
        assert [(s.id, s.names) for s in result.images] == [(a, ("a:1",)), (b, ())]
        target = ImageStore(str(tmp_path / f"into-{fmt}"))
        loaded = load(target, dest)
        assert [(i.id, i.names) for i in loaded] == [(a, ("docker.io/library/a:1",)), (b, ())]
        assert [i.id for i in target.list(dangling=True)] == [b]
        target.close()


def test_save_to_a_stream_and_load_from_a_stream(store, other, tmp_path):
    image_id = make_image(store, tmp_path, "a", [{"f": "1"}], names=["app"])
    for fmt in ("oci-archive", "docker-archive"):
        buf = io.BytesIO()
        result = save(store, ["app"], buf, format=fmt)
        assert result.dest == "-"
        assert result.size == len(buf.getvalue())
        buf.seek(0)
        assert [i.id for i in load(other, buf)] == [image_id]
    with pytest.raises(ArchiveError, match="give a path"):
        save(store, ["app"], io.BytesIO(), format="oci-dir")


@pytest.mark.parametrize("compression", ["gzip", "zstd"])
def test_load_compressed_archives(store, other, tmp_path, compression):
    image_id = make_image(store, tmp_path, "a", [{"f": "1"}], names=["app"])
    for fmt in ("oci-archive", "docker-archive"):
        plain = tmp_path / f"{fmt}.tar"
        save(store, ["app"], plain, format=fmt)
        packed = tmp_path / f"{fmt}.tar.{compression}"
        data = plain.read_bytes()
        packed.write_bytes(gzip.compress(data) if compression == "gzip" else zstandard.compress(data))
        assert [(i.id, i.names) for i in load(other, packed)] == [
            (image_id, ("docker.io/library/app:latest",))
        ]
    assert os.listdir(os.path.join(other.root, "tmp")) == []  # the spooled copies are gone


def test_progress_reports_every_blob(store, other, tmp_path):
    make_image(store, tmp_path, "a", [{"f": "x" * 5000}, {"g": "y"}], names=["app"])
    calls: list[tuple[str, int, int]] = []
    save(store, ["app"], tmp_path / "a.tar", progress=lambda *a: calls.append(a))
    whats = {c[0] for c in calls}
    assert any(w.startswith("layer 1/2") for w in whats) and any(w.startswith("config") for w in whats)
    for what in whats:
        last = [c for c in calls if c[0] == what][-1]
        assert last[1] == last[2] > 0  # each ends complete
    calls.clear()
    load(other, tmp_path / "a.tar", progress=lambda *a: calls.append(a))
    assert any(c[0].startswith("layer 2/2") and c[1] == c[2] for c in calls)


# --- atomic saves ---------------------------------------------------------------------------------


def corrupt_blob(store: ImageStore, digest: str) -> None:
    path = store.content.path(digest)
    os.chmod(path, 0o644)
    data = bytearray(Path(path).read_bytes())
    data[len(data) // 2] ^= 0xFF
    Path(path).write_bytes(bytes(data))


@pytest.mark.parametrize("fmt", FORMATS)
def test_failed_save_leaves_nothing_and_keeps_the_old_file(store, tmp_path, fmt):
    image_id = make_image(store, tmp_path, "a", [{"f": "1" * 10000}], names=["app"])
    dest = dest_for(tmp_path, fmt)
    if fmt != "oci-dir":
        dest.write_bytes(b"old content")
    corrupt_blob(store, store.get(image_id).manifest.layers[0].digest)
    with pytest.raises(ImageCorrupt, match=r"corrupt"):
        save(store, ["app"], dest, format=fmt)
    if fmt == "oci-dir":
        assert not dest.exists()
    else:
        assert dest.read_bytes() == b"old content"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_save_refuses_bad_requests(store, tmp_path):
    make_image(store, tmp_path, "a", [{"f": "1"}], names=["app"])
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(ArchiveError, match="not empty"):
        save(store, ["app"], tmp_path / "full", format="oci-dir")
    with pytest.raises(ArchiveError, match="is a directory"):
        save(store, ["app"], tmp_path / "full", format="oci-archive")
    with pytest.raises(ArchiveError, match="unknown archive format"):
        save(store, ["app"], tmp_path / "x.tar", format="zip")
    with pytest.raises(ImageError, match="no image 'nope'"):
        save(store, ["nope"], tmp_path / "x.tar")
    with pytest.raises(ArchiveError, match="does not exist"):
        save(store, ["app"], tmp_path / "no" / "x.tar")
    (tmp_path / "empty").mkdir()
    save(store, ["app"], tmp_path / "empty", format="oci-dir")  # an empty directory is replaced
    assert (tmp_path / "empty" / "index.json").is_file()


# --- reading what other tools write ---------------------------------------------------------------


def test_docker_archive_with_symlinked_layers_and_compressed_layer(store, other, tmp_path):
    """Docker before 25 and skopeo link repeated layer.tar files; some tools write gzip layers."""
    image_id = make_image(store, tmp_path, "a", [{"f": "1"}, {"g": "2"}], names=["app"])
    image = store.get(image_id)
    config = store.content.read(image_id)
    plain = store.content.read(image.manifest.layers[0].digest)  # gzip as stored
    second = gzip.decompress(store.content.read(image.manifest.layers[1].digest))
    members = [
        ("aaa.tar", second, {}),
        ("layer1/layer.tar", plain, {}),
        ("layer2/layer.tar", None, {"type": tarfile.SYMTYPE, "linkname": "../aaa.tar"}),
        (f"{image_id[7:]}.json", config, {}),
        ("manifest.json", json.dumps([{"Config": f"{image_id[7:]}.json", "RepoTags": ["app:2"],
                                       "Layers": ["layer1/layer.tar", "layer2/layer.tar"]}]).encode(), {}),
    ]  # fmt: skip
    write_tar(tmp_path / "d.tar", members)
    (loaded,) = load(other, tmp_path / "d.tar")
    assert loaded.id == image_id
    assert [d.media_type for d in loaded.manifest.layers] == [OCI_LAYER_GZIP, OCI_LAYER]
    assert unpacked(other, loaded.id, tmp_path / "out") == {"f": "1", "g": "2"}


def test_multi_platform_index_takes_the_host_platform(store, other, tmp_path):
    image_id = make_image(store, tmp_path, "a", [{"f": "1"}])
    image = store.get(image_id)
    members = oci_members(store, image_id)[:-1]
    host = host_platform()
    foreign = Manifest(
        schema_version=2,
        media_type=OCI_MANIFEST,
        config=Descriptor(media_type=OCI_CONFIG, digest=sha(b"missing config"), size=14),
        layers=[],
    )
    foreign_bytes = encode_manifest(foreign)
    manifest = store.content.read(image.manifest_digest)
    nested = encode_index(
        Index(
            schema_version=2,
            media_type=OCI_INDEX,
            manifests=[
                Descriptor(media_type=OCI_MANIFEST, digest=sha(foreign_bytes), size=len(foreign_bytes),
                           platform=Platform(architecture="s390x", os="linux")),
                Descriptor(media_type=OCI_MANIFEST, digest=image.manifest_digest, size=len(manifest),
                           platform=Platform(architecture=host.architecture, os="linux", variant=host.variant)),
            ],
        )
    )  # fmt: skip
    members.append((f"blobs/sha256/{sha(nested)[7:]}", nested, {}))
    members.append((f"blobs/sha256/{sha(foreign_bytes)[7:]}", foreign_bytes, {}))
    entry = Descriptor(media_type=OCI_INDEX, digest=sha(nested), size=len(nested),
                       annotations={"io.containerd.image.name": "docker.io/library/multi:1"})  # fmt: skip
    members.append(("index.json", encode_index(Index(schema_version=2, manifests=[entry])), {}))
    write_tar(tmp_path / "multi.tar", members)
    (loaded,) = load(other, tmp_path / "multi.tar")
    assert (loaded.id, loaded.names) == (image_id, ("docker.io/library/multi:1",))
    # Only a foreign platform: refused, naming what the index offers.
    only_foreign = encode_index(Index(schema_version=2, manifests=json_manifests(nested)[:1]))
    top = Descriptor(media_type=OCI_INDEX, digest=sha(only_foreign), size=len(only_foreign))
    members[-1] = ("index.json", encode_index(Index(schema_version=2, manifests=[top])), {})
    members.append((f"blobs/sha256/{sha(only_foreign)[7:]}", only_foreign, {}))
    write_tar(tmp_path / "foreign.tar", members)
    third = ImageStore(str(tmp_path / "third"))
    with pytest.raises(ArchiveError, match="linux/s390x"):
        load(third, tmp_path / "foreign.tar")
    assert_nothing_recorded(third)


def test_oci_ref_name_without_containerd_name(store, other, tmp_path):
    image_id = make_image(store, tmp_path, "a", [{"f": "1"}])
    write_tar(tmp_path / "a.tar", oci_members(store, image_id, "example.com/x/app:2"))
    assert load(other, tmp_path / "a.tar")[0].names == ("example.com/x/app:2",)
    write_tar(tmp_path / "b.tar", oci_members(store, image_id, "Not A Name"))
    assert load(other, tmp_path / "b.tar")[0].names == ("example.com/x/app:2",)  # unusable name: ignored


# --- hostile and broken archives ------------------------------------------------------------------


def hostile_case(store: ImageStore, image_id: str, case: str) -> list[tuple[str, bytes | None, dict]]:
    members = oci_members(store, image_id)
    image = store.get(image_id)
    layer_path = f"blobs/sha256/{image.manifest.layers[0].digest[7:]}"
    if case == "dotdot":
        members.insert(0, ("../../evil", b"x", {}))
    elif case == "absolute":
        members.insert(0, ("/etc/evil", b"x", {}))
    elif case == "symlink-absolute":
        members = [m for m in members if m[0] != layer_path]
        members.insert(0, (layer_path, None, {"type": tarfile.SYMTYPE, "linkname": "/etc/passwd"}))
    elif case == "symlink-up":
        members = [m for m in members if m[0] != layer_path]
        members.insert(0, (layer_path, None, {"type": tarfile.SYMTYPE, "linkname": "../../../../etc/passwd"}))
    elif case == "device":
        members.insert(0, ("dev", None, {"type": tarfile.CHRTYPE, "devmajor": 1, "devminor": 3}))
    elif case == "digest":
        members = [
            (n, bytes(d[:-1]) + bytes([d[-1] ^ 1]) if n == layer_path and d else d, e) for n, d, e in members
        ]
    elif case == "size":
        members = [(n, d + b"\0" if n == layer_path and d else d, e) for n, d, e in members]
    elif case == "missing":
        members = [m for m in members if m[0] != layer_path]
    elif case == "huge-json":
        members = [m for m in members if m[0] != "index.json"]
        members.append(("index.json", b'{"schemaVersion":2,"manifests":[]' + b" " * (5 << 20) + b"}", {}))
    elif case == "bad-json":
        members = [m for m in members if m[0] != "index.json"]
        members.append(("index.json", b'{"schemaVersion":2,"manifests":[{"digest":"sha256:zz"}]}', {}))
    return members


@pytest.mark.parametrize(
    ("case", "error", "message"),
    [
        ("dotdot", UnsafeArchive, "climbs out"),
        ("absolute", UnsafeArchive, "absolute path"),
        ("symlink-absolute", UnsafeArchive, "outside the archive"),
        ("symlink-up", UnsafeArchive, "outside the archive"),
        ("device", UnsafeArchive, "device"),
        ("digest", CorruptArchive, "does not match its digest"),
        ("size", CorruptArchive, "bytes in the archive but"),
        ("missing", CorruptArchive, "not in the archive"),
        ("huge-json", CorruptArchive, "more than the limit"),
        ("bad-json", CorruptArchive, "index.json"),
    ],
)
def test_hostile_oci_archives_are_refused_and_nothing_is_recorded(
    store, other, tmp_path, case, error, message
):
    image_id = make_image(store, tmp_path, "a", [{"f": "1" * 3000}])
    path = tmp_path / f"{case}.tar"
    write_tar(path, hostile_case(store, image_id, case))
    with pytest.raises(error, match=message):
        load(other, path)
    assert_nothing_recorded(other)
    other.gc()
    assert other.content.list() == []  # whatever was written before the failure is garbage


def test_huge_pax_header_is_refused(other, tmp_path):
    path = tmp_path / "pax.tar"
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("index.json")
        info.pax_headers = {"comment": "x" * (5 << 20)}
        tar.addfile(info, io.BytesIO(b""))
    with pytest.raises(CorruptArchive, match="extended header"):
        load(other, path)


def test_second_broken_image_means_nothing_is_recorded(store, other, tmp_path):
    a = make_image(store, tmp_path, "a", [{"a": "a"}], names=["a"])
    b = make_image(store, tmp_path, "b", [{"b": "b"}], names=["b"])
    save(store, ["a", "b"], tmp_path / "two.tar", format="docker-archive")
    files = read_archive(tmp_path / "two.tar")
    manifest = json.loads(files["manifest.json"])
    bad_layer = manifest[1]["Layers"][0]
    members = [(n, d, {}) for n, d in files.items() if n != bad_layer]
    members.append((bad_layer, files[bad_layer][:-512] + b"\x01" * 512, {}))  # same size, other content
    write_tar(tmp_path / "bad.tar", members)
    with pytest.raises(CorruptArchive, match=r"does not match its digest"):
        load(other, tmp_path / "bad.tar")
    assert_nothing_recorded(other)
    assert a != b


def test_docker_archive_checks(store, other, tmp_path):
    image_id = make_image(store, tmp_path, "a", [{"f": "1"}], names=["app"])
    save(store, ["app"], tmp_path / "d.tar", format="docker-archive")
    files = read_archive(tmp_path / "d.tar")
    manifest = json.loads(files["manifest.json"])

    def variant(name: str, change) -> Path:
        m = json.loads(files["manifest.json"])
        new = dict(files)
        change(m, new)
        new["manifest.json"] = json.dumps(m).encode()
        write_tar(tmp_path / name, [(n, d, {}) for n, d in new.items()])
        return tmp_path / name

    def other_config(m, f):  # the config file's content does not match the digest its name says
        f[m[0]["Config"]] = f[m[0]["Config"]].replace(b"layer 0", b"layer X")

    def bad_tag(m, f):
        m[0]["RepoTags"] = ["UPPER/Case:1"]

    def missing_layer(m, f):
        m[0]["Layers"] = ["nope/layer.tar"]

    def extra_layer(m, f):
        m[0]["Layers"] = m[0]["Layers"] * 2

    def escaping_layer(m, f):
        m[0]["Layers"] = ["../../etc/passwd"]

    def absolute_config(m, f):
        m[0]["Config"] = "/etc/passwd"

    cases = [
        (other_config, CorruptArchive, "not the digest its name says"),
        (bad_tag, CorruptArchive, "not a valid image name"),
        (missing_layer, CorruptArchive, "not in the archive"),
        (extra_layer, CorruptArchive, "2 layers but the config has 1"),
        (escaping_layer, UnsafeArchive, "climbs out"),
        (absolute_config, UnsafeArchive, "absolute path"),
    ]
    for n, (change, error, message) in enumerate(cases):
        with pytest.raises(error, match=message):
            load(other, variant(f"v{n}.tar", change))
        assert_nothing_recorded(other)
    assert manifest[0]["Config"].startswith(image_id[7:])


def test_layout_directory_with_escaping_symlink(store, other, tmp_path):
    image_id = make_image(store, tmp_path, "a", [{"f": "1"}])
    save(store, [image_id], tmp_path / "layout", format="oci-dir")
    image = store.get(image_id)
    blob = tmp_path / "layout" / "blobs" / "sha256" / image.manifest.layers[0].digest[7:]
    secret = tmp_path / "secret"
    secret.write_bytes(blob.read_bytes())  # even the right bytes are not read through such a link
    blob.unlink()
    blob.symlink_to(secret)
    with pytest.raises(UnsafeArchive, match="outside the directory"):
        load(other, tmp_path / "layout")
    assert_nothing_recorded(other)
    blob.unlink()
    os.mkfifo(blob)
    with pytest.raises(UnsafeArchive, match="not a regular file"):
        load(other, tmp_path / "layout")
    assert_nothing_recorded(other)


def test_not_an_archive(other, tmp_path):
    (tmp_path / "x.tar").write_bytes(b"hello, this is not a tar" * 100)
    with pytest.raises(ArchiveError, match="not a tar archive"):
        load(other, tmp_path / "x.tar")
    write_tar(tmp_path / "y.tar", [("hello.txt", b"hi", {})])
    with pytest.raises(ArchiveError, match="neither an OCI image layout"):
        load(other, tmp_path / "y.tar")
    with pytest.raises(ArchiveError, match="cannot open"):
        load(other, tmp_path / "missing.tar")


# --- import ---------------------------------------------------------------------------------------


def rootfs_tar(
    path: Path, members: list[tuple[str, bytes | None, dict]], compression: str | None = None
) -> Path:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data, extra in members:
            info = tarfile.TarInfo(name)
            for k, v in extra.items():
                setattr(info, k, v)
            if data is not None:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    data = buf.getvalue()
    if compression == "gzip":
        data = gzip.compress(data)
    elif compression == "zstd":
        data = zstandard.compress(data)
    path.write_bytes(data)
    return path


ROOTFS = [
    ("bin", None, {"type": tarfile.DIRTYPE, "mode": 0o755}),
    ("bin/hello", b"#!/bin/sh\necho hi\n", {"mode": 0o755}),
    ("etc", None, {"type": tarfile.DIRTYPE, "mode": 0o755}),
    ("etc/passwd", b"root:x:0:0::/root:/bin/sh\n", {}),
    ("etc/link", None, {"type": tarfile.SYMTYPE, "linkname": "passwd"}),
]


@pytest.mark.parametrize("compression", [None, "gzip", "zstd"])
def test_import_rootfs_tar(store, tmp_path, compression):
    path = rootfs_tar(tmp_path / "rootfs.tar", ROOTFS, compression)
    image = import_rootfs(
        store,
        path,
        "imported:1",
        changes=["ENV A=1 PATH=/bin", 'CMD ["/bin/hello"]', "WORKDIR /srv", "WORKDIR sub", "EXPOSE 80 53/udp",
                 'LABEL "x y"=z', "USER nobody", "ENTRYPOINT exec x"],
        message="from a test",
    )  # fmt: skip
    assert image.names == ("docker.io/library/imported:1",)
    host = host_platform()
    assert (image.config.os, image.config.architecture, image.config.variant) == (
        host.os,
        host.architecture,
        host.variant,
    )
    assert len(image.manifest.layers) == 1 and image.manifest.layers[0].media_type == OCI_LAYER_GZIP
    (history,) = image.config.history or []
    assert (history.created_by, history.comment) == ("imported from rootfs.tar", "from a test")
    cc = image.config.config
    assert cc is not None
    assert cc.env == ["A=1", "PATH=/bin"]
    assert cc.cmd == ["/bin/hello"]
    assert cc.entrypoint == ["/bin/sh", "-c", "exec x"]
    assert cc.working_dir == "/srv/sub"
    assert cc.exposed_ports == {"80/tcp": {}, "53/udp": {}}
    assert cc.labels == {"x y": "z"}
    assert cc.user == "nobody"
    out = tmp_path / "out"
    with store.content.open(image.manifest.layers[0].digest) as f:
        apply_layer(f, str(out), expected_diff_id=image.diff_ids[0])
    assert (out / "bin/hello").read_text() == "#!/bin/sh\necho hi\n"
    assert os.stat(out / "bin/hello").st_mode & 0o777 == 0o755
    assert os.readlink(out / "etc/link") == "passwd"
    assert os.listdir(os.path.join(store.root, "tmp")) == []


def test_import_from_directory_and_stream_without_name(store, tmp_path):
    root = tmp_path / "tree"
    (root / "etc").mkdir(parents=True)
    (root / "etc/hostname").write_text("box\n")
    image = import_rootfs(store, root)
    assert image.names == ()
    assert image.config.config is None
    assert (image.config.history or [])[0].created_by == "imported from tree"
    path = rootfs_tar(tmp_path / "r.tar", ROOTFS)
    with open(path, "rb") as f:
        streamed = import_rootfs(store, f, "s")
    assert streamed.names == ("docker.io/library/s:latest",)


@pytest.mark.parametrize(
    ("members", "message"),
    [
        ([("../evil", b"x", {})], "climbs out"),
        ([("/etc/evil", b"x", {})], "absolute"),
        (
            [("escape", None, {"type": tarfile.SYMTYPE, "linkname": "/etc"}), ("escape/evil", b"x", {})],
            "symlink",
        ),
        ([("hard", None, {"type": tarfile.LNKTYPE, "linkname": "../../etc/passwd"})], "hard link target"),
    ],
)
def test_import_hostile_tar_is_refused(store, tmp_path, members, message):
    path = rootfs_tar(tmp_path / "hostile.tar", ROOTFS + members)
    with pytest.raises(UnsafeLayer, match=message) as info:
        import_rootfs(store, path, "bad")
    assert "nothing was imported" in str(info.value)
    assert_nothing_recorded(store)
    assert os.listdir(os.path.join(store.root, "tmp")) == []
    assert not os.path.exists("/etc/evil")


def test_import_refuses_bad_changes_and_names_before_reading(store, tmp_path):
    path = rootfs_tar(tmp_path / "r.tar", ROOTFS)
    for change, message in [
        ("RUN rm -rf /", "RUN cannot be applied"),
        ("ENV A=1\nCMD x", "one instruction on one line"),
        ("EXPOSE notaport", "--change 'EXPOSE notaport'"),
        ("", "one instruction"),
    ]:
        with pytest.raises(ArchiveError, match=message):
            import_rootfs(store, path, "x", changes=[change])
    with pytest.raises(ImageError):
        import_rootfs(store, path, "Bad Name")
    with pytest.raises(ArchiveError, match="no such file"):
        import_rootfs(store, tmp_path / "missing.tar", "x")
    assert_nothing_recorded(store)


def test_chain_ids_match_the_spec():
    a, b = "sha256:" + "a" * 64, "sha256:" + "b" * 64
    assert archive.chain_ids([a, b]) == [a, "sha256:" + hashlib.sha256(f"{a} {b}".encode()).hexdigest()]


def test_write_errors_become_archive_errors(store, tmp_path):
    make_image(store, tmp_path, "a", [{"f": "1"}], names=["app"])

    class Full(io.RawIOBase):
        def writable(self) -> bool:
            return True

        def write(self, data) -> int:
            raise OSError(28, "No space left on device")

    with pytest.raises(ArchiveError, match="cannot write the output stream: No space left on device"):
        save(store, ["app"], Full())
