"""The real docker CLI (client only) against `cocon daemon`: DOCKER_HOST=unix://…, the classic builder
(DOCKER_BUILDKIT=0). What a Docker user types, and what they see."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(__file__)))

from daemon_helpers import DOCKER, Daemon, cleanup, start_daemon, tar_bytes


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    assert os.access(DOCKER, os.X_OK), f"the docker CLI is needed at {DOCKER}"
    d = start_daemon(str(tmp_path_factory.mktemp("docker-cli")))
    try:
        yield d
    finally:
        code = d.stop()
        log = d.log()
        cleanup(d)
        assert code == 0 and "Traceback" not in log, log


def docker(
    d: Daemon, *args: str, check: bool = True, input: bytes | None = None, **kw: Any
) -> subprocess.CompletedProcess[str]:
    env = dict(d.env, DOCKER_BUILDKIT="0", DOCKER_CONFIG=os.path.join(d.run, "docker-config"))
    proc = subprocess.run([DOCKER, *args], env=env, capture_output=True, input=input, timeout=120, **kw)
    out = subprocess.CompletedProcess(proc.args, proc.returncode, proc.stdout.decode(errors="replace"),
                                      proc.stderr.decode(errors="replace"))  # fmt: skip
    if check and proc.returncode != 0:
        raise AssertionError(f"docker {' '.join(args)} exited {proc.returncode}\n{out.stdout}\n{out.stderr}")
    return out


def test_version_and_info(daemon: Daemon) -> None:
    out = docker(daemon, "version").stdout
    assert "Server: cocon" in out and "API version:      1.47 (minimum version 1.24)" in out
    assert "1.47 (downgraded from" in out  # the client negotiated down to the daemon's version
    fmt = docker(daemon, "version", "--format", "{{json .Server}}").stdout
    assert json.loads(fmt)["ApiVersion"] == "1.47"
    info = docker(daemon, "info").stdout
    assert "Storage Driver: overlay2" in info and "Cgroup Driver: cgroupfs" in info
    assert f"Docker Root Dir: {daemon.root}" in info and "Default Runtime: cocon-runtime" in info
    info_json = json.loads(docker(daemon, "info", "--format", "{{json .}}").stdout)
    assert info_json["Images"] >= 1 and info_json["OSType"] == "linux"


def test_images_inspect_tag_history_rmi(daemon: Daemon) -> None:
    rows = docker(daemon, "images").stdout.splitlines()
    assert rows[0].split()[:2] == ["REPOSITORY", "TAG"]
    assert any(r.split()[:2] == ["busybox", "latest"] for r in rows[1:])
    doc = json.loads(docker(daemon, "image", "inspect", "busybox").stdout)[0]
    assert doc["RepoTags"] == ["busybox:latest"] and doc["Config"]["Cmd"] == ["sh"]
    short = doc["Id"][7:19]
    docker(daemon, "tag", "busybox", "cli/tagged:1")
    listed = docker(daemon, "images", "--format", "{{.Repository}}:{{.Tag}} {{.ID}}").stdout.split("\n")
    assert f"cli/tagged:1 {short}" in listed and f"busybox:latest {short}" in listed
    assert docker(daemon, "images", "-q", "cli/tagged").stdout.split() == [short]
    hist = docker(daemon, "history", "busybox").stdout.splitlines()
    assert hist[0].split()[:3] == ["IMAGE", "CREATED", "CREATED"] and hist[1].startswith(short)
    out = docker(daemon, "rmi", "cli/tagged:1").stdout
    assert out.strip() == "Untagged: cli/tagged:1"
    failed = docker(daemon, "rmi", "no/such:image", check=False)
    assert failed.returncode == 1
    assert "Error response from daemon: No such image: no/such:image: build it (cocon build" in failed.stderr
    failed = docker(daemon, "image", "inspect", "no/such:image", check=False)
    assert failed.returncode == 1


def test_save_and_load(daemon: Daemon, tmp_path: Any) -> None:
    docker(daemon, "tag", "busybox", "cli/saved:1")
    archive = str(tmp_path / "saved.tar")
    docker(daemon, "save", "-o", archive, "cli/saved:1")
    assert os.path.getsize(archive) > 1_000_000
    docker(daemon, "rmi", "cli/saved:1")
    out = docker(daemon, "load", "-i", archive).stdout
    assert "Loaded image: cli/saved:1" in out
    # through a pipe, as `docker save IMAGE | docker load`
    piped = docker(daemon, "save", "cli/saved:1").stdout.encode("latin-1", "replace")
    raw = subprocess.run(
        [DOCKER, "save", "cli/saved:1"], env=daemon.env, capture_output=True, timeout=60
    ).stdout
    assert len(raw) >= len(piped) > 0
    docker(daemon, "rmi", "cli/saved:1")
    assert "Loaded image: cli/saved:1" in docker(daemon, "load", input=raw).stdout
    docker(daemon, "rmi", "cli/saved:1")
    evil = tmp_path / "evil.tar"
    evil.write_bytes(tar_bytes([("../../../tmp/evil", b"x", {}), ("manifest.json", b"[]", {})]))
    failed = docker(daemon, "load", "-i", str(evil), check=False)
    assert failed.returncode == 1 and ".." in failed.stderr


def test_build_classic(daemon: Daemon, tmp_path: Any) -> None:
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    (ctx / "Containerfile").write_text(
        "FROM busybox\nARG WHO=nobody\nCOPY greeting.txt /srv/greeting.txt\n"
        'RUN echo "built for $WHO" > /srv/who && cat /srv/greeting.txt\nWORKDIR /srv\nCMD ["cat", "who"]\n'
    )
    (ctx / "greeting.txt").write_text("hello from a docker build\n")
    proc = docker(daemon, "build", "-t", "cli/built:1", "-f", str(ctx / "Containerfile"),
                  "--build-arg", "WHO=docker", "--label", "built.by=docker-cli", str(ctx))  # fmt: skip
    assert "hello from a docker build" in proc.stdout and "Successfully tagged cli/built:1" in proc.stdout
    doc = json.loads(docker(daemon, "image", "inspect", "cli/built:1").stdout)[0]
    assert doc["Config"]["WorkingDir"] == "/srv" and doc["Config"]["Cmd"] == ["cat", "who"]
    assert doc["Config"]["Labels"] == {"built.by": "docker-cli"}
    # a Dockerfile outside the context and -q
    outside = tmp_path / "Other.dockerfile"
    outside.write_text("FROM cli/built:1\nRUN test -f /srv/greeting.txt\n")
    quiet = docker(daemon, "build", "-q", "-t", "cli/built:2", "-f", str(outside), str(ctx))
    assert quiet.stdout.strip().startswith("sha256:")
    assert docker(daemon, "images", "-q", "--no-trunc", "cli/built:2").stdout.strip() == quiet.stdout.strip()
    # a failing step: exit status 1 and the step's error
    (ctx / "Containerfile").write_text("FROM busybox\nRUN echo failing && exit 7\n")
    failed = docker(
        daemon, "build", "-t", "cli/broken", "-f", str(ctx / "Containerfile"), str(ctx), check=False
    )
    assert failed.returncode == 1 and "failing" in failed.stdout and "status 7" in failed.stderr
    for tag in ("cli/built:2", "cli/built:1"):
        docker(daemon, "rmi", tag)


def test_import(daemon: Daemon, tmp_path: Any) -> None:
    rootfs = tmp_path / "rootfs.tar"
    rootfs.write_bytes(
        tar_bytes([("etc", None, {"type": b"5", "mode": 0o755}), ("etc/motd", b"imported\n", {})])
    )
    out = docker(daemon, "import", "--change", 'CMD ["cat", "/etc/motd"]', str(rootfs), "cli/imported:1")
    image_id = out.stdout.strip()
    assert image_id.startswith("sha256:")
    doc = json.loads(docker(daemon, "image", "inspect", "cli/imported:1").stdout)[0]
    assert doc["Id"] == image_id and doc["Config"]["Cmd"] == ["cat", "/etc/motd"]
    docker(daemon, "rmi", "cli/imported:1")
    failed = docker(daemon, "pull", "busybox", check=False)
    assert failed.returncode == 1 and "not supported yet" in failed.stderr


def test_volumes_networks_df_events(daemon: Daemon) -> None:
    since = str(time.time())
    assert docker(daemon, "volume", "create", "--label", "team=cli", "clivol").stdout.strip() == "clivol"
    assert "clivol" in docker(daemon, "volume", "ls", "-q").stdout.split()
    assert docker(daemon, "volume", "ls", "-q", "--filter", "label=team=cli").stdout.split() == ["clivol"]
    doc = json.loads(docker(daemon, "volume", "inspect", "clivol").stdout)[0]
    assert doc["Driver"] == "local" and doc["Labels"] == {"team": "cli"} and os.path.isdir(doc["Mountpoint"])
    bad = docker(daemon, "volume", "create", "--opt", "type=tmpfs", "tmpvol", check=False)
    assert bad.returncode == 1 and "driver options are not supported" in bad.stderr
    nets = docker(daemon, "network", "ls", "--format", "{{.Name}} {{.Driver}}").stdout.split("\n")
    assert {"bridge bridge", "host host", "none null"} <= set(nets)
    df = docker(daemon, "system", "df").stdout.splitlines()
    assert (df[0].split()[0] == "TYPE" and df[1].split()[:2] == ["Images", "1"]) or df[1].startswith("Images")
    assert any(line.startswith("Local Volumes") for line in df)
    assert docker(daemon, "volume", "rm", "clivol").stdout.strip() == "clivol"
    missing = docker(daemon, "volume", "inspect", "clivol", check=False)
    assert missing.returncode == 1
    events = docker(daemon, "events", "--since", since, "--until", str(time.time() + 0.5),
                    "--filter", "type=volume", "--format", "{{.Type}} {{.Action}} {{.Actor.ID}}").stdout  # fmt: skip
    assert events.splitlines() == ["volume create clivol", "volume destroy clivol"]
