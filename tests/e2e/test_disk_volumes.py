"""Disk volumes end to end: `cocon volume create --type disk --size …` and the Docker API's DriverOpts
(through the real docker CLI) against a daemon; containers refuse them."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(__file__)))

from cli_helpers import CoconEnv, cocon_env_fixture
from cocon.storage import qemu_img

DOCKER = shutil.which("docker") or "/usr/local/bin/docker"


@pytest.fixture
def cocon_env(tmp_path: Any) -> Iterator[CoconEnv]:
    yield from cocon_env_fixture(tmp_path)


def docker(env: CoconEnv, tmp: Any, *args: str) -> subprocess.CompletedProcess[str]:
    e = dict(os.environ, DOCKER_HOST=f"unix://{env.run}/cocon.sock", DOCKER_CONFIG=str(tmp / "docker-config"))
    return subprocess.run([DOCKER, *args], env=e, capture_output=True, text=True, timeout=60)


def test_disk_volume_through_the_cli(cocon_env: CoconEnv) -> None:
    assert cocon_env("volume", "create", "--type", "disk", "--size", "64M", "vmdata").stdout == "vmdata\n"
    cocon_env("volume", "create", "files")
    rows = [line.split() for line in cocon_env("volume", "ls").stdout.splitlines()]
    assert rows[0] == ["DRIVER", "VOLUME", "NAME", "TYPE"]
    assert sorted(rows[1:]) == [["local", "files", "dir"], ["local", "vmdata", "disk"]]
    js = {
        r["Name"]: r
        for r in map(json.loads, cocon_env("volume", "ls", "--format", "json").stdout.splitlines())
    }
    assert (js["vmdata"]["Type"], js["vmdata"]["Size"]) == ("disk", str(64 << 20))
    assert js["files"]["Type"] == "dir"
    doc = json.loads(cocon_env("volume", "inspect", "vmdata").stdout)[0]
    assert doc["Options"] == {"type": "disk", "size": str(64 << 20)}
    disk = os.path.join(cocon_env.root, "volumes", "vmdata", "disk.qcow2")
    assert doc["Mountpoint"] == disk
    info = qemu_img.info(disk)
    assert (info.format, info.virtual_size, info.backing_file) == ("qcow2", 64 << 20, None)
    assert not os.path.exists(os.path.join(cocon_env.root, "volumes", "vmdata", "_data"))
    assert json.loads(cocon_env("volume", "inspect", "files").stdout)[0]["Options"] == {}
    # creating it again returns it; asking for the other type is an error
    assert cocon_env("volume", "create", "--type", "disk", "--size", "1G", "vmdata").stdout == "vmdata\n"
    assert qemu_img.info(disk).virtual_size == 64 << 20
    p = cocon_env("volume", "create", "--type", "disk", "--size", "1G", "files", check=False)
    assert p.returncode == 1 and "already exists as a dir volume" in p.stderr
    cocon_env("volume", "rm", "vmdata", "files")
    assert not os.path.exists(disk) and cocon_env("volume", "ls", "-q").stdout == ""


def test_disk_volume_errors(cocon_env: CoconEnv) -> None:
    p = cocon_env("volume", "create", "--type", "disk", "nosize", check=False)
    assert p.returncode == 1 and "needs a size: give --size" in p.stderr
    p = cocon_env("volume", "create", "--size", "1G", "dirsize", check=False)
    assert p.returncode == 1 and "--size applies to disk volumes only" in p.stderr
    for bad in ("0", "-1G", "lots", "10X"):
        p = cocon_env("volume", "create", "--type", "disk", f"--size={bad}", "badsize", check=False)
        assert p.returncode == 1 and "invalid size" in p.stderr, p.stderr
    p = cocon_env("volume", "create", "-o", "device=/dev/sda", "opt", check=False)
    assert p.returncode == 1 and "unsupported volume driver option(s) device" in p.stderr
    assert cocon_env("volume", "ls", "-q").stdout == ""  # nothing half-made
    store = os.path.join(cocon_env.root, "volumes")
    assert [n for n in os.listdir(store) if n != ".lock"] == [] if os.path.isdir(store) else True


def test_container_refuses_a_disk_volume(cocon_env: CoconEnv) -> None:
    cocon_env("volume", "create", "--type", "disk", "--size", "16M", "vmonly")
    p = cocon_env("run", "--rm", "-v", "vmonly:/data", "busybox", "true", check=False)
    assert p.returncode == 125
    assert "disk volumes attach to VMs only: use a directory volume" in p.stderr
    assert cocon_env("ps", "-aq").stdout == ""
    cocon_env("volume", "rm", "vmonly")


def test_docker_driver_opts(cocon_env: CoconEnv, tmp_path: Any) -> None:
    cocon_env("volume", "ls")  # starts the daemon
    p = docker(cocon_env, tmp_path, "volume", "create", "-o", "type=disk", "-o", "size=32M", "dk")
    assert p.returncode == 0 and p.stdout == "dk\n", p.stderr
    doc = json.loads(docker(cocon_env, tmp_path, "volume", "inspect", "dk").stdout)[0]
    assert doc["Options"] == {"type": "disk", "size": str(32 << 20)} and doc["Driver"] == "local"
    p = docker(cocon_env, tmp_path, "volume", "create", "-o", "type=nfs", "bad1")
    assert p.returncode != 0 and "unknown volume type 'nfs'" in p.stderr
    p = docker(cocon_env, tmp_path, "volume", "create", "-o", "o=bind", "-o", "type=disk", "bad2")
    assert p.returncode != 0 and "unsupported volume driver option(s) o" in p.stderr
    p = docker(cocon_env, tmp_path, "volume", "create", "-o", "type=disk", "bad3")
    assert p.returncode != 0 and "needs a size" in p.stderr
    assert docker(cocon_env, tmp_path, "volume", "ls", "-q").stdout.split() == ["dk"]
    assert docker(cocon_env, tmp_path, "volume", "rm", "dk").returncode == 0
