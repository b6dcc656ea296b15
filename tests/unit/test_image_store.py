"""ImageStore against a real content store and SQLite database in a temporary directory."""

from __future__ import annotations

import io

import pytest

from cocon.images.layers import dir_to_layer
from cocon.images.store import ImageCorrupt, ImageError, ImageInUse, ImageNotFound, ImageStore
from cocon.oci.image_spec import OCI_LAYER_GZIP, Descriptor, History, ImageConfig, RootFS, encode_image_config


def make_image(store: ImageStore, tmp_path, text: str, names=()) -> str:
    root = tmp_path / f"rootfs-{text}"
    root.mkdir()
    (root / "file").write_text(text)
    buf = io.BytesIO()
    info = dir_to_layer(str(root), buf)
    digest = store.content.put(buf.getvalue())
    assert str(digest) == info.digest
    config = ImageConfig(
        architecture="amd64",
        os="linux",
        rootfs=RootFS(type="layers", diff_ids=[info.diff_id]),
        history=[History(created_by=f"make {text}"), History(created_by="CMD", empty_layer=True)],
    )
    image = store.commit(
        encode_image_config(config),
        [Descriptor(media_type=OCI_LAYER_GZIP, digest=info.digest, size=info.size)],
        names=names,
    )
    return image.id


@pytest.fixture
def store(tmp_path):
    s = ImageStore(str(tmp_path / "root"))
    yield s
    s.close()


def test_commit_resolve_by_name_id_and_prefix(store, tmp_path):
    image_id = make_image(store, tmp_path, "a", names=["app", "example.com/team/app:1"])
    image = store.resolve("app:latest")
    assert image.id == image_id
    assert image.familiar_names == ["app:latest", "example.com/team/app:1"]
    assert store.resolve(image_id).id == image_id
    assert store.resolve(image.short_id).id == image_id
    assert store.resolve(f"app@{image.manifest_digest}").id == image_id
    assert image.repo_digests[0] == f"app@{image.manifest_digest}"
    with pytest.raises(ImageNotFound, match="cocon build"):
        store.resolve("other")


def test_tag_moves_name_and_leaves_dangling(store, tmp_path):
    first = make_image(store, tmp_path, "a", names=["app"])
    second = make_image(store, tmp_path, "b", names=["app"])
    assert store.resolve("app").id == second
    assert [i.id for i in store.list(dangling=True)] == [first]
    store.tag("app", "app:v2")
    assert store.resolve("app:v2").id == second
    with pytest.raises(ImageError, match="without a digest"):
        store.tag("app", f"app@{'sha256:' + '0' * 64}")


def test_remove_semantics(store, tmp_path):
    image_id = make_image(store, tmp_path, "a", names=["app", "app:v1"])
    assert store.remove("app:v1") == [("Untagged", "app:v1")]
    assert store.resolve("app").id == image_id
    with pytest.raises(ImageInUse, match="used by a container"):
        store.remove("app", in_use=lambda i: i == image_id)
    assert store.remove("app") == [("Untagged", "app:latest"), ("Deleted", image_id)]
    assert store.list() == []
    removed = store.gc()
    assert len(removed) == 3  # manifest, config and layer blobs
    assert store.content.list() == []


def test_remove_by_id_with_several_names_needs_force(store, tmp_path):
    image_id = make_image(store, tmp_path, "a", names=["app", "app:v1"])
    with pytest.raises(ImageInUse, match="several names"):
        store.remove(image_id[:19])
    assert store.remove(image_id, force=True)[-1] == ("Deleted", image_id)


def test_prune_and_history(store, tmp_path):
    make_image(store, tmp_path, "a", names=["app"])
    dangling = make_image(store, tmp_path, "b")
    history = store.history("app")
    assert [h.created_by for h in history] == ["CMD", "make a"]
    assert history[0].size == 0 and history[1].size > 0
    assert store.prune() == [dangling]
    assert len(store.list()) == 1
    assert len(store.prune(all=True)) == 1


def test_missing_layer_is_refused(store, tmp_path):
    image_id = make_image(store, tmp_path, "a", names=["app"])
    image = store.get(image_id)
    store.content.delete(image.manifest.layers[0].digest)
    with pytest.raises(ImageCorrupt, match="not in the content store"):
        store.add_manifest(image.manifest_digest, names=["again"])
