"""Image commands end to end: the real `cocon` command on private roots (images, tag, rmi, inspect,
history, prune, import, save/load, bootstrap, build)."""

from __future__ import annotations

import json
import os
import sys
import tarfile
from collections.abc import Iterator
from typing import Any

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(__file__)))

from cli_helpers import CoconEnv, cocon_env_fixture


@pytest.fixture
def cocon_env(tmp_path: Any) -> Iterator[CoconEnv]:
    yield from cocon_env_fixture(tmp_path)


def _ids(env: CoconEnv) -> list[str]:
    return env("images", "-q", "--no-trunc").stdout.split()


def test_images_listing_formats(cocon_env: CoconEnv) -> None:
    lines = cocon_env("images").stdout.splitlines()
    assert lines[0].split() == ["REPOSITORY", "TAG", "IMAGE", "ID", "CREATED", "SIZE"]
    repo, tag, short, *_ = lines[1].split()
    assert (repo, tag) == ("busybox", "latest") and len(short) == 12
    full = _ids(cocon_env)
    assert len(full) == 1 and full[0].startswith("sha256:") and full[0][7:19] == short
    assert cocon_env("images", "-q").stdout.split() == [short]
    row = json.loads(cocon_env("images", "--format", "json").stdout)
    assert row["Repository"] == "busybox" and row["Tag"] == "latest" and row["ID"] == short
    assert row["Size"].endswith("MB")
    assert cocon_env("images", "busybox:latest", "-q").stdout.split() == [short]
    assert cocon_env("images", "other", "-q").stdout == ""
    assert cocon_env("images", "--filter", "dangling=true", "-q").stdout == ""


def test_tag_inspect_history_and_rmi(cocon_env: CoconEnv) -> None:
    cocon_env("tag", "busybox", "mine/box:1")
    docs = json.loads(cocon_env("image", "inspect", "mine/box:1").stdout)
    assert len(docs) == 1
    doc = docs[0]
    assert doc["Id"] == _ids(cocon_env)[0]
    assert sorted(doc["RepoTags"]) == ["busybox:latest", "mine/box:1"]
    assert doc["Os"] == "linux" and doc["RootFS"]["Type"] == "layers" and len(doc["RootFS"]["Layers"]) == 1
    assert doc["Config"]["Cmd"] == ["sh"]
    assert doc["Descriptor"]["digest"].startswith("sha256:")
    hist = cocon_env("image", "history", "mine/box:1").stdout.splitlines()
    assert hist[0].split()[:2] == ["IMAGE", "CREATED"] and "bootstrap busybox" in hist[1]
    entry = json.loads(cocon_env("image", "history", "--format", "json", "busybox").stdout)
    assert entry["CreatedBy"].startswith("cocon image bootstrap busybox")
    # several names: rmi by name untags, by ID is refused without -f
    image_id = doc["Id"]
    p = cocon_env("rmi", image_id[7:19], check=False)
    assert p.returncode == 1 and "several names" in p.stderr
    assert cocon_env("rmi", "mine/box:1").stdout == "Untagged: mine/box:1\n"
    p = cocon_env("image", "inspect", "mine/box:1", "busybox", check=False)
    assert p.returncode == 1 and "No such image: mine/box:1" in p.stderr and "cocon build" in p.stderr
    assert len(json.loads(p.stdout)) == 1


def test_rmi_refuses_an_image_a_container_uses(cocon_env: CoconEnv) -> None:
    cocon_env("run", "--name", "user", "busybox", "true")
    p = cocon_env("rmi", "busybox", check=False)
    assert p.returncode == 1 and "used by a container" in p.stderr
    cocon_env("rm", "user")
    out = cocon_env("rmi", "busybox").stdout.splitlines()
    assert out[0] == "Untagged: busybox:latest" and out[1].startswith("Deleted: sha256:")
    assert cocon_env("images", "-q").stdout == ""
    layers = os.path.join(cocon_env.root, "snapshots", "overlayfs", "layers")
    assert os.listdir(layers) == []  # unpacked layers of removed images go too
    blobs = os.path.join(cocon_env.root, "content", "blobs", "sha256")
    assert os.listdir(blobs) == []


def test_prune_dangling_and_all(cocon_env: CoconEnv, tmp_path: object) -> None:
    rootfs = os.path.join(str(tmp_path), "rootfs")
    os.makedirs(os.path.join(rootfs, "etc"))
    with open(os.path.join(rootfs, "etc", "hello"), "w") as f:
        f.write("hi\n")
    cocon_env("image", "import", rootfs)  # no name: dangling
    assert len(_ids(cocon_env)) == 2
    assert cocon_env("images", "--filter", "dangling=true", "-q").stdout.strip()
    p = cocon_env("image", "prune", input="n\n")
    assert "Are you sure" in p.stdout and len(_ids(cocon_env)) == 2
    out = cocon_env("image", "prune", "-f").stdout
    assert "deleted: sha256:" in out and "Total reclaimed space:" in out
    assert len(_ids(cocon_env)) == 1
    cocon_env("run", "--name", "keep", "busybox", "true")
    out = cocon_env("image", "prune", "-af").stdout
    assert out.startswith("Total reclaimed space")  # busybox is used by a container: kept
    cocon_env("rm", "keep")
    cocon_env("image", "prune", "-a", "-f")
    assert _ids(cocon_env) == []


def test_import_a_rootfs_tar_and_run_it(cocon_env: CoconEnv, tmp_path: object) -> None:
    export = os.path.join(str(tmp_path), "rootfs.tar")
    busybox = json.loads(cocon_env("image", "inspect", "busybox").stdout)[0]
    assert busybox["Id"]
    # a rootfs tar: busybox's own files plus one of ours
    src = os.path.join(str(tmp_path), "src")
    os.makedirs(src)
    from cocon.images.busybox import make_rootfs

    make_rootfs(src)
    with open(os.path.join(src, "marker"), "w") as f:
        f.write("imported\n")
    with tarfile.open(export, "w") as tar:
        tar.add(src, arcname=".")
    out = cocon_env("image", "import", "-c", 'CMD ["cat", "/marker"]', export, "imported:v1").stdout
    assert out.strip().startswith("sha256:")
    assert cocon_env("run", "--rm", "imported:v1").stdout == "imported\n"
    assert "imported" in cocon_env("images").stdout
    p = cocon_env("image", "import", os.path.join(str(tmp_path), "missing.tar"), "x", check=False)
    assert p.returncode == 1 and p.stderr.startswith("cocon: error: ")


def test_save_and_load_round_trip(cocon_env: CoconEnv, tmp_path: object) -> None:
    image_id = _ids(cocon_env)[0]
    for fmt in ("oci-archive", "docker-archive"):
        archive = os.path.join(str(tmp_path), f"busybox-{fmt}.tar")
        cocon_env("save", "--format", fmt, "-o", archive, "busybox")
        assert tarfile.is_tarfile(archive)
        cocon_env("rmi", "busybox")
        assert _ids(cocon_env) == []
        out = cocon_env("load", "-i", archive).stdout
        assert "Loaded image: busybox:latest" in out
        assert _ids(cocon_env) == [image_id]
    assert cocon_env("run", "--rm", "busybox", "echo", "ok").stdout == "ok\n"
    p = cocon_env("save", "-o", os.path.join(str(tmp_path), "x.tar"), "nosuch", check=False)
    assert p.returncode == 1 and "nosuch" in p.stderr
    p = cocon_env("save", "busybox", check=False)
    assert p.returncode == 2 and "-o/--output" in p.stderr


def test_bootstrap_busybox_from_the_cli(tmp_path: object) -> None:
    import shutil
    import tempfile

    run = tempfile.mkdtemp(prefix="cocon-test-run-", dir="/run")
    env = CoconEnv(root=os.path.join(str(tmp_path), "root"), run=run)
    try:
        out = env("image", "bootstrap", "busybox").stdout
        image_id, name = out.split()
        assert image_id.startswith("sha256:") and name == "busybox:latest"
        assert env("run", "--rm", "busybox", "echo", "bootstrapped").stdout == "bootstrapped\n"
        p = env("image", "bootstrap", "alpine", check=False)
        assert p.returncode == 1 and "busybox" in p.stderr
        p = env("image", "bootstrap", "busybox", "--mirror", "http://127.0.0.1/debian", check=False)
        assert p.returncode == 1 and "--mirror" in p.stderr
        assert env.leftovers() == []
    finally:
        env.force_cleanup()
        shutil.rmtree(run, ignore_errors=True)


def test_build_then_run_the_image(cocon_env: CoconEnv, tmp_path: object) -> None:
    ctx = os.path.join(str(tmp_path), "ctx")
    os.makedirs(ctx)
    with open(os.path.join(ctx, "Containerfile"), "w") as f:
        f.write(
            "FROM busybox\n"
            "ARG WHO=world\n"
            "COPY greeting.txt /greeting.txt\n"
            'RUN echo "hello $WHO" >> /greeting.txt\n'
            "WORKDIR /app\n"
            'CMD ["sh", "-c", "cat /greeting.txt; pwd"]\n'
        )
    with open(os.path.join(ctx, "greeting.txt"), "w") as f:
        f.write("from the context\n")
    out = cocon_env("build", "-t", "greeter:1", "--build-arg", "WHO=cocon", ctx).stdout
    assert "STEP 1/" in out and "Successfully tagged greeter:1" in out
    assert cocon_env("run", "--rm", "greeter:1").stdout == "from the context\nhello cocon\n/app\n"
    again = cocon_env("build", "-q", "-t", "greeter:1", "--build-arg", "WHO=cocon", ctx).stdout.strip()
    assert again == json.loads(cocon_env("image", "inspect", "greeter:1").stdout)[0]["Id"]
    hist = cocon_env("image", "history", "greeter:1").stdout
    assert "RUN" in hist and "COPY" in hist
    with open(os.path.join(ctx, "Containerfile"), "a") as f:
        f.write("RUN exit 3\n")
    p = cocon_env("build", "-t", "broken", ctx, check=False)
    assert p.returncode == 1 and "cocon: error:" in p.stderr
    assert "broken" not in cocon_env("images").stdout


def test_usage_errors_are_one_line_with_exit_2(cocon_env: CoconEnv) -> None:
    p = cocon_env("images", "--bogus", check=False)
    assert p.returncode == 2 and p.stderr.startswith("cocon: error: ") and p.stderr.count("\n") == 1
    p = cocon_env("nosuchcommand", check=False)
    assert p.returncode == 2
    assert cocon_env("--version").stdout.startswith("cocon version ")
    assert "images" in cocon_env("--help").stdout


def test_bootstrap_arguments_are_checked_before_any_work(cocon_env: CoconEnv) -> None:
    p = cocon_env("image", "bootstrap", "busybox", "--tarball", "/x.tgz", check=False)
    assert p.returncode == 1 and "--tarball only applies to debian images" in p.stderr
    p = cocon_env("image", "bootstrap", "debian:bookworm", "--tarball", "/nonexistent.tgz", check=False)
    assert p.returncode == 1 and "/nonexistent.tgz: no such debootstrap tarball" in p.stderr
    p = cocon_env("image", "bootstrap", "alpine", check=False)
    assert p.returncode == 1 and "busybox" in p.stderr and "debian" in p.stderr
