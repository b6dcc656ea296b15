"""`cocon system reset` through the real command and daemon: containers (a running one too), a user
network with a published port, a volume and a built image are made, and afterwards nothing of
cocon's is left — no container, network, volume or image, no bridge or nftables table of this
daemon, no network namespace — while the daemon keeps answering."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(__file__)))

from cli_helpers import CoconEnv, cocon_env_fixture
from cocon.engine.netattach import names_for


def host_links() -> set[str]:
    out = subprocess.run(["ip", "-j", "link"], capture_output=True, text=True, check=True).stdout
    return {link["ifname"] for link in json.loads(out)}


def host_tables() -> set[str]:
    out = subprocess.run(["nft", "-j", "list", "tables"], capture_output=True, text=True, check=True).stdout
    return {t["table"]["name"] for t in json.loads(out).get("nftables", []) if "table" in t}


@pytest.fixture
def cocon_env(tmp_path: Any) -> Iterator[CoconEnv]:
    yield from cocon_env_fixture(tmp_path)


def test_system_reset_removes_everything(cocon_env: CoconEnv) -> None:
    env = cocon_env
    table, bridge = names_for(env.run)
    env("network", "create", "--subnet", "10.231.7.0/24", "reset-net")
    env("run", "-d", "--name", "busy", "--network", "reset-net", "-p", "127.0.0.1::8080", "-v", "keep:/data",
        "busybox", "sleep", "600")  # fmt: skip
    env("run", "--name", "done", "busybox", "true")  # on the default bridge, stopped
    env("tag", "busybox", "mine/box:1")
    assert bridge in host_links() and table in host_tables()

    p = env("system", "reset", check=False, input="")  # no terminal, no -f: refused, nothing removed
    assert p.returncode == 2 and "-f" in p.stderr
    assert "busy" in env("ps").stdout

    out = json.loads(env("system", "reset", "-f", "--format", "json").stdout)
    assert len(out["ContainersDeleted"]) == 2 and out["NetworksDeleted"] == ["reset-net"]
    assert out["VolumesDeleted"] == ["keep"] and out["ImagesDeleted"]

    assert env("ps", "-aq").stdout == ""
    assert env("images", "-q").stdout == ""
    assert env("volume", "ls", "-q").stdout == ""
    assert "reset-net" not in env("network", "ls").stdout
    assert not any(n.startswith("cn-") or n == bridge for n in host_links() - {"cni-podman0"}), host_links()
    assert table not in host_tables()
    netns = os.path.join(env.run, "netns")
    assert not os.path.isdir(netns) or os.listdir(netns) == []
    assert env("ps", "-a").returncode == 0  # the daemon still answers, on an empty state
