"""cocon.content: the blob store on a real filesystem under tmp_path (one process)."""

from __future__ import annotations

import gc as pygc
import hashlib
import io
import json
import os
import stat
import time
from pathlib import Path

import pytest

from cocon.content import (
    BlobCorrupt,
    BlobNotFound,
    ContentError,
    ContentStore,
    DigestMismatch,
    GCError,
    SizeMismatch,
)
from cocon.oci import image_spec as ispec
from cocon.oci.digest import Digest, digest_of, sha256_of
from cocon.oci.image_spec import Descriptor, Index, Manifest, Platform


@pytest.fixture
def store(tmp_path: Path) -> ContentStore:
    return ContentStore(str(tmp_path / "content"))


def ingest_files(store: ContentStore) -> list[str]:
    return os.listdir(os.path.join(store.root, "ingest"))


def blob_files(store: ContentStore) -> list[str]:
    found = []
    for alg in os.listdir(os.path.join(store.root, "blobs")):
        found += [f"{alg}:{n}" for n in os.listdir(os.path.join(store.root, "blobs", alg))]
    return sorted(found)


def test_layout_and_put_read(store: ContentStore) -> None:
    d = store.put(b"hello")
    assert d == sha256_of(b"hello")
    path = os.path.join(store.root, "blobs", "sha256", d.hex)
    assert store.path(d) == path and store.path(str(d)) == path
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o444
    assert store.read(d) == b"hello"
    with store.open(str(d)) as f:
        assert f.read() == b"hello"
    assert store.exists(d) and store.size(d) == 5
    assert store.list() == [d]
    assert ingest_files(store) == []
    store.verify(d)


def test_put_dedupes(store: ContentStore) -> None:
    d = store.put(b"same")
    before = os.stat(store.path(d))
    assert store.put(b"same") == d
    assert store.put(b"same", expected=d) == d
    with store.writer() as w:
        w.write(b"same")
        assert w.commit() == d
    after = os.stat(store.path(d))
    assert (before.st_ino, before.st_mtime_ns) == (after.st_ino, after.st_mtime_ns)  # not rewritten
    assert store.list() == [d] and ingest_files(store) == []


def test_empty_blob(store: ContentStore) -> None:
    d = store.put(b"")
    assert str(d) == "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    assert store.read(d) == b"" and store.size(d) == 0


def test_put_with_wrong_expected_stores_nothing(store: ContentStore) -> None:
    wrong = sha256_of(b"something else")
    with pytest.raises(DigestMismatch) as info:
        store.put(b"data", expected=wrong)
    assert f"hashes to {sha256_of(b'data')}, not the expected {wrong}" in str(info.value)
    assert info.value.expected == wrong and info.value.actual == sha256_of(b"data")
    assert store.list() == [] and ingest_files(store) == []


def test_writer_with_wrong_expected_digest_leaves_nothing(store: ContentStore) -> None:
    wrong = sha256_of(b"other")
    w = store.writer(expected=wrong)
    w.write(b"chunk one, ")
    w.write(b"chunk two")
    assert len(ingest_files(store)) == 1  # data goes to ingest/ while written
    with pytest.raises(DigestMismatch, match="nothing was stored"):
        w.commit()
    assert w.closed
    assert store.list() == [] and blob_files(store) == [] and ingest_files(store) == []
    assert not store.exists(sha256_of(b"chunk one, chunk two"))
    with pytest.raises(ContentError, match="closed"):
        w.write(b"more")
    with pytest.raises(ContentError, match="closed without committing"):
        w.commit()


def test_writer_size_checks(store: ContentStore) -> None:
    with store.writer(expected_size=4) as w:
        w.write(b"ab")
        with pytest.raises(SizeMismatch, match="is 6 bytes but 4 were expected"):
            w.write(b"cdef")  # refused at once, not at commit
    assert ingest_files(store) == []
    with store.writer(expected_size=4) as w:
        w.write(b"ab")
        with pytest.raises(SizeMismatch, match="is 2 bytes but 4 were expected"):
            w.commit()
    with pytest.raises(DigestMismatch):  # a SizeMismatch is a DigestMismatch
        store.put_stream(io.BytesIO(b"abc"), size=2)
    assert store.list() == [] and ingest_files(store) == []


def test_writer_commit_is_idempotent_and_close_after_commit_is_harmless(store: ContentStore) -> None:
    data = b"x" * 100
    with store.writer(expected=sha256_of(data), expected_size=100) as w:
        for i in range(0, 100, 7):
            w.write(data[i : i + 7])
        assert w.size == 100
        d = w.commit()
        assert w.commit() == d == w.digest
    w.close()
    assert store.read(d) == data


def test_writer_abandoned_in_block_or_by_error(store: ContentStore) -> None:
    with store.writer() as w:
        w.write(b"never committed")
    with pytest.raises(RuntimeError):
        with store.writer() as w:
            w.write(b"partial")
            raise RuntimeError("producer failed")
    assert store.list() == [] and ingest_files(store) == []


def test_writer_dropped_without_close_cleans_up(store: ContentStore) -> None:
    w = store.writer()
    w.write(b"dropped")
    assert len(ingest_files(store)) == 1
    del w
    pygc.collect()
    assert ingest_files(store) == [] and store.list() == []


def test_clean_ingest_keeps_live_writers_and_young_files(store: ContentStore) -> None:
    live = store.writer()
    live.write(b"in progress")
    leftover = os.path.join(store.root, "ingest", "0123456789abcdef")
    with open(leftover, "wb") as f:
        f.write(b"from a dead process")
    assert store.clean_ingest() == []  # both are young
    assert store.clean_ingest(older_than=0) == [leftover]  # the live one is locked by its writer
    assert os.listdir(os.path.join(store.root, "ingest")) == [os.path.basename(live.ingest_path)]
    d = live.commit()
    assert store.read(d) == b"in progress"


def test_writer_starts_over_when_its_new_file_is_cleaned_before_its_lock(
    store: ContentStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The race of a clean_ingest(older_than=0) in another process: it locks and unlinks the file
    between the writer's open and its flock."""
    import fcntl

    real_flock = fcntl.flock
    calls: list[str] = []

    def flock(fd: int, op: int) -> None:
        if not calls:
            path = os.readlink(f"/proc/self/fd/{fd}")
            calls.append(path)
            os.unlink(path)  # as the cleaner would
        real_flock(fd, op)

    monkeypatch.setattr(fcntl, "flock", flock)
    with store.writer() as w:
        assert w.ingest_path != calls[0]
        w.write(b"survives")
        d = w.commit()
    assert store.read(d) == b"survives" and ingest_files(store) == []


def test_opening_a_store_removes_old_ingest_leftovers(tmp_path: Path) -> None:
    root = str(tmp_path / "content")
    ContentStore(root)
    old = os.path.join(root, "ingest", "old")
    young = os.path.join(root, "ingest", "young")
    for p in (old, young):
        with open(p, "wb") as f:
            f.write(b"partial")
    two_hours_ago = time.time() - 7200
    os.utime(old, (two_hours_ago, two_hours_ago))
    ContentStore(root)
    assert os.listdir(os.path.join(root, "ingest")) == ["young"]


def test_put_file_and_stream(store: ContentStore, tmp_path: Path) -> None:
    src = tmp_path / "layer.tar"
    data = os.urandom(3 * 1024 * 1024 + 17)  # several chunks
    src.write_bytes(data)
    d = store.put_file(str(src))
    assert d == sha256_of(data) and store.read(d) == data
    assert store.put_stream(io.BytesIO(data), expected=d, size=len(data)) == d
    with pytest.raises(DigestMismatch):
        store.put_file(str(src), expected=sha256_of(b"x"))
    with pytest.raises(ContentError, match=f"cannot read {tmp_path}/missing"):
        store.put_file(str(tmp_path / "missing"))
    assert ingest_files(store) == []


def test_sha512_blobs(store: ContentStore) -> None:
    want = digest_of(b"wide", "sha512")
    d = store.put(b"wide", expected=want)
    assert d == want
    assert os.path.isfile(os.path.join(store.root, "blobs", "sha512", want.hex))
    with store.writer(expected=str(want)) as w:
        w.write(b"wide")
        assert w.commit() == want
    store.verify(want)
    assert want in store.list()


def test_missing_blobs(store: ContentStore) -> None:
    d = sha256_of(b"absent")
    assert not store.exists(d)
    for op in (store.read, store.open, store.size, store.path, store.verify, store.delete):
        with pytest.raises(BlobNotFound) as info:
            op(d)
        assert str(info.value) == f"blob {d} is not in the content store (pull or import it first)"
        assert info.value.digest == d
    store.delete(d, missing_ok=True)


def test_delete(store: ContentStore) -> None:
    d = store.put(b"bye")
    store.delete(d)
    assert not store.exists(d) and store.list() == []


def test_list_ignores_strangers(store: ContentStore) -> None:
    d = store.put(b"a")
    Path(store.root, "blobs", "sha256", "not-a-digest").write_bytes(b"")
    Path(store.root, "blobs", "md5").mkdir()
    assert store.list() == [d]


def test_verify_detects_corruption(store: ContentStore) -> None:
    d = store.put(b"precious bytes")
    path = store.path(d)
    os.chmod(path, 0o644)
    with open(path, "r+b") as f:
        f.write(b"P")
    with pytest.raises(BlobCorrupt) as info:
        store.verify(d)
    assert str(info.value) == (
        f"blob {d} is corrupt: its content now hashes to {sha256_of(b'Precious bytes')}; "
        "delete it and pull or import the image again"
    )


def test_commit_replaces_a_truncated_copy(store: ContentStore) -> None:
    data = b"0123456789"
    d = sha256_of(data)
    os.makedirs(os.path.join(store.root, "blobs", "sha256"), exist_ok=True)
    Path(store.root, "blobs", "sha256", d.hex).write_bytes(b"01234")  # e.g. copied in by hand, cut short
    assert store.put(data) == d
    assert store.read(d) == data


def test_invalid_digests_are_oci_errors(store: ContentStore) -> None:
    from cocon.oci.digest import DigestError

    with pytest.raises(DigestError, match="is not a digest"):
        store.exists("latest")


# --- garbage collection ------------------------------------------------------------------------------


class Image:
    """A small image in the store: index -> manifest -> config + layers (descriptors with real digests)."""

    def __init__(self, store: ContentStore, name: str, shared_layer: bytes = b"shared base layer") -> None:
        self.layers = [store.put(shared_layer), store.put(f"{name} app layer".encode())]
        config = {
            "architecture": "amd64",
            "os": "linux",
            "rootfs": {
                "type": "layers",
                "diff_ids": [str(sha256_of(f"{name}{i}".encode())) for i in range(2)],
            },
        }
        config_bytes = json.dumps(config).encode()
        self.config = store.put(config_bytes)
        manifest = Manifest(
            schema_version=2,
            media_type=ispec.OCI_MANIFEST,
            config=Descriptor(media_type=ispec.OCI_CONFIG, digest=str(self.config), size=len(config_bytes)),
            layers=[
                Descriptor(media_type=ispec.OCI_LAYER_GZIP, digest=str(d), size=store.size(d))
                for d in self.layers
            ],
        )
        manifest_bytes = ispec.encode_manifest(manifest)
        self.manifest = store.put(manifest_bytes)
        index = Index(
            schema_version=2,
            media_type=ispec.OCI_INDEX,
            manifests=[
                ispec.descriptor_for(
                    manifest_bytes, ispec.OCI_MANIFEST, platform=Platform(architecture="amd64", os="linux")
                )
            ],
        )
        self.index = store.put(ispec.encode_index(index))

    @property
    def blobs(self) -> set[Digest]:
        return {self.index, self.manifest, self.config, *self.layers}


def test_gc_keeps_what_roots_reach(store: ContentStore) -> None:
    keep = Image(store, "keep")
    drop = Image(store, "drop")  # shares the base layer with `keep`
    loose = store.put(b"a blob nothing refers to")
    shared = keep.layers[0]
    assert drop.layers[0] == shared
    removed = store.gc([keep.index])
    assert set(removed) == (drop.blobs - {shared}) | {loose}
    assert removed == sorted(removed)
    assert set(store.list()) == keep.blobs
    for d in keep.blobs:
        store.verify(d)
    assert store.gc([keep.index]) == []  # nothing more to do


def test_gc_roots_may_be_manifests_or_leaves_and_a_function(store: ContentStore) -> None:
    img = Image(store, "img")
    other = Image(store, "other", shared_layer=b"other base")
    # a manifest root keeps its config and layers, not the index above it
    assert set(store.gc(lambda: [str(img.manifest), other.layers[1]])) == {
        img.index,
        other.index,
        other.manifest,
        other.config,
        other.layers[0],
    }
    assert set(store.list()) == img.blobs - {img.index} | {other.layers[1]}
    assert set(store.gc([])) == img.blobs - {img.index} | {other.layers[1]}
    assert store.list() == []


def test_gc_follows_docker_manifest_lists_and_subjects(store: ContentStore) -> None:
    img = Image(store, "img")
    manifest_bytes = store.read(img.manifest)
    docker_list = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": ispec.DOCKER_MANIFEST_LIST,
            "manifests": [
                {
                    "mediaType": ispec.DOCKER_MANIFEST,
                    "digest": str(img.manifest),
                    "size": len(manifest_bytes),
                    "platform": {"architecture": "amd64", "os": "linux"},
                }
            ],
        },
        indent=3,
    ).encode()
    root = store.put(docker_list)
    # a signature artifact refers to the image as its subject, with an in-toto layer
    sig_layer = store.put(b'{"_type": "https://in-toto.io/Statement/v1"}')
    empty = store.put(b"{}")
    artifact = {
        "schemaVersion": 2,
        "mediaType": ispec.OCI_MANIFEST,
        "artifactType": "application/vnd.dev.cosign.simplesigning.v1+json",
        "config": {"mediaType": ispec.OCI_EMPTY, "digest": str(empty), "size": 2},
        "layers": [{"mediaType": "application/vnd.in-toto+json", "digest": str(sig_layer), "size": 1}],
        "subject": {"mediaType": ispec.OCI_INDEX, "digest": str(img.index), "size": store.size(img.index)},
    }
    artifact_bytes = json.dumps(artifact).encode()
    sig = store.put(artifact_bytes)
    # the list reaches the manifest, its config and layers; not the index or the artifact
    assert store.gc([root]) == sorted([img.index, sig, sig_layer, empty])
    # put them back: the artifact reaches its own blobs and, through its subject, the whole image
    img2 = Image(store, "img")
    for data in (artifact_bytes, b'{"_type": "https://in-toto.io/Statement/v1"}', b"{}"):
        store.put(data)
    assert store.gc([sig]) == [root]
    assert set(store.list()) == img2.blobs | {sig, sig_layer, empty}


def test_gc_refuses_to_guess_about_unreadable_manifests(store: ContentStore) -> None:
    img = Image(store, "img")
    schema1 = store.put(
        b'{"schemaVersion": 1, "name": "library/x", "fsLayers": [{"blobSum": "%s"}]}'
        % str(img.layers[0]).encode()
    )
    broken = store.put(
        json.dumps(
            {"schemaVersion": 2, "mediaType": ispec.OCI_MANIFEST, "config": {"digest": "sha256:00"}}
        ).encode()
    )
    for root in (schema1, broken):
        with pytest.raises(GCError) as info:
            store.gc([img.index, root])
        assert str(info.value).startswith(f"gc deleted nothing: blob {root}: ")
        assert len(store.list()) == 7  # nothing deleted
    # an unreferenced unreadable manifest is simply garbage
    assert set(store.gc([img.index])) == {schema1, broken}


def test_gc_treats_non_manifest_json_and_big_blobs_as_leaves(store: ContentStore) -> None:
    config_like = store.put(b'{"architecture": "amd64", "config": {"Cmd": ["sh"]}, "rootfs": {}}')
    not_json = store.put(b"{ this is not json")
    big = store.put(b"{" + b" " * (5 << 20) + b"}")
    assert store.references(config_like) == [] and store.references(not_json) == []
    assert store.references(big) == [] and store.references(sha256_of(b"absent")) == []
    assert store.gc([config_like, not_json, big]) == []


def test_gc_inside_a_lease_of_the_same_thread_is_refused(store: ContentStore) -> None:
    with store.lease():
        d = store.put(b"protected")
        with pytest.raises(ContentError, match="would wait for itself"):
            store.gc([])
    assert store.gc([]) == [d]


def test_reachable(store: ContentStore) -> None:
    img = Image(store, "img")
    assert store.reachable([img.index]) == img.blobs
    assert store.references(img.manifest) == [img.config, *img.layers]
    assert hashlib.sha256(store.read(img.index)).hexdigest() == img.index.hex
