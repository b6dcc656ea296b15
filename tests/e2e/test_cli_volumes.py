"""Volumes end to end: `cocon volume …` and `cocon run -v` with the real `cocon` command."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from typing import Any

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(__file__)))

from cli_helpers import CoconEnv, cocon_env_fixture


@pytest.fixture
def cocon_env(tmp_path: Any) -> Iterator[CoconEnv]:
    yield from cocon_env_fixture(tmp_path)


def test_create_list_inspect_remove(cocon_env: CoconEnv) -> None:
    assert cocon_env("volume", "create", "--label", "team=a", "data").stdout == "data\n"
    assert cocon_env("volume", "create", "data").stdout == "data\n"  # exists: the same volume
    anon = cocon_env("volume", "create").stdout.strip()
    assert len(anon) == 64
    lines = cocon_env("volume", "ls").stdout.splitlines()
    assert lines[0].split() == ["DRIVER", "VOLUME", "NAME", "TYPE"]
    assert sorted(line.split()[1] for line in lines[1:]) == sorted(["data", anon])
    assert sorted(cocon_env("volume", "ls", "-q").stdout.split()) == sorted(["data", anon])
    rows = [json.loads(line) for line in cocon_env("volume", "ls", "--format", "json").stdout.splitlines()]
    assert {r["Name"]: r["Labels"] for r in rows}["data"] == "team=a"
    doc = json.loads(cocon_env("volume", "inspect", "data").stdout)[0]
    assert doc["Name"] == "data" and doc["Driver"] == "local" and doc["Labels"] == {"team": "a"}
    assert doc["Mountpoint"] == os.path.join(cocon_env.root, "volumes", "data", "_data")
    assert os.path.isdir(doc["Mountpoint"])
    p = cocon_env("volume", "create", "bad name", check=False)
    assert p.returncode == 1 and "invalid volume name" in p.stderr
    assert cocon_env("volume", "rm", "data", anon).stdout.split() == ["data", anon]
    p = cocon_env("volume", "rm", "data", check=False)
    assert p.returncode == 1 and "no volume named 'data'" in p.stderr
    assert cocon_env("volume", "rm", "-f", "data").returncode == 0
    p = cocon_env("volume", "inspect", "data", check=False)
    assert p.returncode == 1


def test_named_volume_persists_and_is_filled_from_the_image(cocon_env: CoconEnv) -> None:
    # a new volume over /etc gets the image's /etc (passwd, group …), as in Docker
    out = cocon_env(
        "run", "--rm", "-v", "etcvol:/etc", "busybox", "sh", "-c", "ls /etc; echo mine > /etc/added"
    )
    assert "passwd" in out.stdout.split()
    data = os.path.join(cocon_env.root, "volumes", "etcvol", "_data")
    assert sorted(os.listdir(data)) == sorted([*out.stdout.split(), "added"])
    st = os.stat(os.path.join(data, "passwd"))
    assert (st.st_uid, st.st_gid) == (0, 0)
    # the next container sees what the first wrote; the volume is not refilled
    assert cocon_env("run", "--rm", "-v", "etcvol:/etc:ro", "busybox", "cat", "/etc/added").stdout == "mine\n"
    p = cocon_env("run", "--rm", "-v", "etcvol:/etc:ro", "busybox", "touch", "/etc/x", check=False)
    assert p.returncode == 1 and "Read-only file system" in p.stderr
    # nocopy: nothing of the image's /etc is copied into the new volume; what shows is what cocon
    # (as Docker) mounts over it for the network
    listing = cocon_env("run", "--rm", "-v", "empty:/etc:nocopy", "busybox", "ls", "/etc").stdout
    assert listing == "hostname\nhosts\nresolv.conf\n"
    cocon_env("volume", "rm", "etcvol", "empty")


def test_volume_in_use_is_not_removed(cocon_env: CoconEnv) -> None:
    cocon_env("run", "--name", "holder", "-v", "kept:/data", "busybox", "sh", "-c", "echo x > /data/f")
    p = cocon_env("volume", "rm", "kept", check=False)
    assert p.returncode == 1 and "in use" in p.stderr
    out = cocon_env("volume", "prune", "-a", "-f").stdout
    assert "kept" not in out
    assert "kept" in cocon_env("volume", "ls", "-q").stdout.split()
    cocon_env("rm", "holder")
    assert cocon_env("volume", "rm", "kept").stdout == "kept\n"


def test_anonymous_volumes_and_prune(cocon_env: CoconEnv) -> None:
    # -v /path alone: an anonymous volume, removed with --rm …
    cocon_env("run", "--rm", "-v", "/scratch", "busybox", "touch", "/scratch/f")
    assert cocon_env("volume", "ls", "-q").stdout == ""
    # … and kept (dangling) by a container without --rm until rm -v or prune
    cocon_env("run", "--name", "anon", "-v", "/scratch", "busybox", "touch", "/scratch/f")
    name = cocon_env("volume", "ls", "-q").stdout.strip()
    assert len(name) == 64
    cocon_env("rm", "anon")
    assert cocon_env("volume", "ls", "-q").stdout.strip() == name
    cocon_env("volume", "create", "named")
    out = cocon_env("volume", "prune", "-f").stdout
    assert out.startswith("Deleted Volumes:\n" + name) and "Total reclaimed space" in out
    assert cocon_env("volume", "ls", "-q").stdout.split() == ["named"]  # prune keeps named volumes
    cocon_env("volume", "prune", "--all", "--force")
    assert cocon_env("volume", "ls", "-q").stdout == ""
    cocon_env("run", "--name", "anon2", "-v", "/scratch", "busybox", "true")
    cocon_env("rm", "-v", "anon2")
    assert cocon_env("volume", "ls", "-q").stdout == ""


def test_bind_mounts(cocon_env: CoconEnv, tmp_path: object) -> None:
    host = os.path.join(str(tmp_path), "host")
    os.makedirs(host)
    with open(os.path.join(host, "in"), "w") as f:
        f.write("from host\n")
    out = cocon_env(
        "run", "--rm", "-v", f"{host}:/mnt", "busybox", "sh", "-c", "cat /mnt/in; echo back > /mnt/out"
    )
    assert out.stdout == "from host\n"
    assert open(os.path.join(host, "out")).read() == "back\n"
    p = cocon_env("run", "--rm", "-v", f"{host}:/mnt:ro", "busybox", "touch", "/mnt/x", check=False)
    assert p.returncode == 1 and "Read-only file system" in p.stderr
    p = cocon_env("run", "--rm", "-v", f"{host}/missing:/mnt", "busybox", "true", check=False)
    assert p.returncode == 125 and "bind source path does not exist" in p.stderr
    p = cocon_env("run", "--rm", "-v", "relative/dir:/mnt", "busybox", "true", check=False)
    assert p.returncode == 125 and "absolute path" in p.stderr
    p = cocon_env("run", "--rm", "-v", f"{host}:relative", "busybox", "true", check=False)
    assert p.returncode == 125 and "absolute path" in p.stderr
    p = cocon_env("run", "--rm", "-v", f"{host}:/mnt", "-v", "vol:/mnt", "busybox", "true", check=False)
    assert p.returncode == 125 and "duplicate mount point" in p.stderr
    # inspect shows the mounts as Docker does
    cocon_env("run", "--name", "mnt", "-v", f"{host}:/mnt:ro", "-v", "vol:/data", "busybox", "true")
    mounts = {m["Destination"]: m for m in json.loads(cocon_env("inspect", "mnt").stdout)[0]["Mounts"]}
    assert (
        mounts["/mnt"]["Type"] == "bind"
        and mounts["/mnt"]["RW"] is False
        and mounts["/mnt"]["Source"] == host
    )
    assert mounts["/data"]["Type"] == "volume" and mounts["/data"]["Name"] == "vol" and mounts["/data"]["RW"]
    cocon_env("rm", "mnt")
    cocon_env("volume", "rm", "vol")
