"""`cocon system assets` and the microVM part of `cocon info`, through the real command and a real
daemon whose guest assets live in a private `$COCON_ASSETS_ROOT` (removed afterwards): the status
before a build (missing, nothing built by asking), a real build (Debian packages downloaded with apt,
kernel modules, initramfs, the erofs utility image) with its progress over every stage, the status
afterwards (files and sizes, kernel release, the KVM/TCG decision), `cocon info` and Docker's /info
with the accelerator (TCG here: KVM is unusable on these machines) and its reason, the native routes'
answers, bad input, and a build that cannot resolve its packages (apt pointed at empty lists).

The build runs once for the module (~25-60 s). The daemon runs from the shared source tree: if
someone edits the guest sources (which are hashed into the assets' digest) during or after the
build, it is done once more (see `build` and `current`)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(__file__)))

from cli_helpers import COCON
from cocon.vmm.assets import STAGES
from daemon_helpers import Daemon, docker, new_roots, start_daemon, stop_and_clean
from vm_helpers import kill_processes

RFC3339 = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")


class Node:
    """A daemon with its own assets root, and the cocon command pointed at it."""

    def __init__(self, daemon: Daemon, assets: str) -> None:
        self.daemon = daemon
        self.assets = assets

    def __call__(
        self, *args: str, check: bool = True, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        env = dict(self.daemon.env, COCON_HOST=f"unix://{self.daemon.sock}")  # never a second daemon
        p = subprocess.run([COCON, *args], env=env, capture_output=True, text=True, timeout=timeout)
        if check and p.returncode != 0:
            raise AssertionError(f"cocon {' '.join(args)} exited {p.returncode}\n{p.stdout}\n{p.stderr}")
        return p

    def json(self, *args: str) -> Any:
        return json.loads(self(*args, "--format", "json").stdout)


def node_fixture(base: str, env: dict[str, str] | None = None) -> Iterator[Node]:
    assets = tempfile.mkdtemp(prefix="cocon-test-assets-")
    try:
        root, run = new_roots(base, busybox=False)
        d = start_daemon(base, root=root, run=run, env={"COCON_ASSETS_ROOT": assets, **(env or {})})
        try:
            yield Node(d, assets)
        finally:
            code, log = stop_and_clean(d)
            left = kill_processes(assets)
            assert left == [], f"QEMU processes left behind: {left}"
            assert code == 0 and "Traceback" not in log, log
    finally:
        shutil.rmtree(assets, ignore_errors=True)


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    yield from node_fixture(str(tmp_path_factory.mktemp("assets")))


def build(node: Node) -> dict[str, Any]:
    """`cocon system assets --rebuild`: its timing, stderr (the progress) and the status it printed."""
    for attempt in (1, 2, 3):
        started = time.monotonic()
        p = node("system", "assets", "--rebuild", "--format", "json", check=False, timeout=900)
        seconds = time.monotonic() - started
        if attempt < 3 and p.returncode != 0 and "changed during the build" in p.stderr:
            continue  # the shared tree's guest sources were edited meanwhile: build once more
        assert p.returncode == 0, f"{p.stdout}\n{p.stderr}"
        break
    print(f"cocon system assets --rebuild: {seconds:.1f} s")
    return {"seconds": seconds, "stderr": p.stderr, "doc": json.loads(p.stdout)}


@pytest.fixture(scope="module")
def built(node: Node) -> dict[str, Any]:
    """One build for the module (see `current`)."""
    return build(node)


def current(node: Node, built: dict[str, Any]) -> dict[str, Any]:
    """The status now, for the assets `built` made. The daemon hashes the guest sources of the shared
    tree into the digest: when someone edited them since the build, the current assets are another
    digest (missing) and the build is done again (at most twice) so that the test sees ready ones."""
    for _ in range(2):
        doc: dict[str, Any] = node.json("system", "assets")
        if doc["State"] == "missing" and built["doc"]["Digest"] in doc["BuiltDigests"]:
            built.update(build(node))
            continue
        break
    return doc


def test_status_before_a_build_says_missing_and_builds_nothing(node: Node) -> None:
    p = node("system", "assets")
    assert re.search(r"^State:\s+missing$", p.stdout, re.M), p.stdout
    assert "cocon system assets --rebuild" in p.stdout
    assert re.search(r"^Accelerator:\s+not probed yet", p.stdout, re.M)
    doc = node.json("system", "assets")
    assert doc["State"] == "missing" and doc["Kernel"] is None and doc["Accelerator"] is None
    assert doc["Root"] == node.assets and doc["Directory"].startswith(os.path.join(node.assets, "assets"))
    assert any(name.startswith("linux-image-") for name in doc["Packages"])  # what a build would use
    assert doc["BuiltDigests"] == []

    info = node("info").stdout
    assert re.search(r"^MicroVM accelerator:\s+not built \(cocon system assets\)$", info, re.M), info
    assert re.search(r"^MicroVM guest kernel:\s+not built \(cocon system assets\)$", info, re.M), info
    microvm = node.json("info")["Cocon"]["MicroVM"]
    assert microvm["Assets"] == "missing" and microvm["Accelerator"] is None
    assert node.daemon.request("GET", "/cocon/v1/info").json()["MicroVM"]["Message"] == (
        "not built (cocon system assets)"
    )
    # asking built nothing: no asset directory, no download
    base = os.path.join(node.assets, "assets")
    assert not [n for n in os.listdir(base) if len(n) == 64]
    assert not os.path.isdir(os.path.join(base, "debs")) or not os.listdir(os.path.join(base, "debs"))


def test_rebuild_shows_progress_through_every_stage(node: Node, built: dict[str, Any]) -> None:
    lines = [line for line in built["stderr"].splitlines() if line.startswith("[")]
    seen = [re.match(r"^\[(\d)/(\d)\] ", line) for line in lines]
    assert all(seen), built["stderr"]
    numbers = [int(m.group(1)) for m in seen if m]
    assert numbers == list(range(1, len(STAGES) + 1)), built["stderr"]  # every stage, in order
    assert all(m.group(2) == str(len(STAGES)) for m in seen if m)
    assert re.search(r"downloading packages: (\d+)/\1 packages", built["stderr"]), built["stderr"]
    assert lines[-1] == f"[{len(STAGES)}/{len(STAGES)}] commit: 1/1"  # the end reached
    assert built["doc"]["State"] == "ready"


def test_status_after_the_build_is_ready_with_files_and_sizes(node: Node, built: dict[str, Any]) -> None:
    doc = current(node, built)
    assert doc["State"] == "ready" and doc["Message"] is None, doc
    assert doc["Digest"] == built["doc"]["Digest"] and doc["Digest"] in doc["BuiltDigests"]
    assert doc["Directory"] == os.path.join(node.assets, "assets", doc["Digest"])
    for key, name in (("Kernel", "vmlinux"), ("Initrd", "initrd.img"), ("Utility", "guest.erofs")):
        path = os.path.join(doc["Directory"], name)
        assert doc[key] == {"Path": path, "Size": os.path.getsize(path)} and doc[key]["Size"] > 100_000
    assert re.match(r"^\d+\.\d+\.\d+-\d+-amd64$", doc["KernelRelease"]), doc["KernelRelease"]
    assert any(n.startswith("linux-image-") for n in doc["Packages"]) and "busybox-static" in doc["Packages"]
    assert RFC3339.match(doc["Built"])
    acc = doc["Accelerator"]
    assert acc["Accel"] == "tcg" and acc["Reason"] and RFC3339.match(acc["Probed"]), acc  # KVM unusable here

    table = node("system", "assets").stdout
    assert re.search(r"^State:\s+ready$", table, re.M), table
    assert re.search(rf"^Kernel release:\s+{re.escape(doc['KernelRelease'])}$", table, re.M)
    assert re.search(r"^Utility image:\s+\S+/guest\.erofs \(\d+(\.\d+)?MB\)$", table, re.M), table
    assert re.search(r"^Accelerator:\s+tcg: .+ \(probed \d{4}-", table, re.M), table

    # the native route answers the same; a POST without rebuild finds them built (no stage after resolve)
    assert node.daemon.request("GET", "/cocon/v1/system/assets").json()["Digest"] == doc["Digest"]
    r = node.daemon.request("POST", "/cocon/v1/system/assets")
    assert r.status == 200 and r.headers["content-type"] == "application/x-ndjson"
    lines = r.lines()
    assert lines[-1]["aux"]["State"] == "ready"
    if lines[-1]["aux"]["Digest"] == doc["Digest"]:  # (else the guest sources were edited meanwhile)
        assert {line["id"] for line in lines[:-1]} == {"resolve"}
    assert os.listdir(os.path.join(node.assets, "assets", "tmp")) == []  # no build left half-made


def test_info_shows_tcg_with_the_reason_and_the_guest_kernel(node: Node, built: dict[str, Any]) -> None:
    assert current(node, built)["State"] == "ready"
    release = built["doc"]["KernelRelease"]
    info = node("info")
    assert re.search(r"^MicroVM accelerator:\s+tcg: \S.+$", info.stdout, re.M), info.stdout
    assert re.search(r"^MicroVM probed:\s+\d{4}-\d\d-\d\dT", info.stdout, re.M), info.stdout
    assert re.search(rf"^MicroVM guest kernel:\s+{re.escape(release)}$", info.stdout, re.M), info.stdout
    assert re.search(r"^Isolation microvm:\s+available \(Docker: hyperv\)$", info.stdout, re.M), info.stdout
    assert "microVMs run under TCG" in info.stderr  # the daemon's warning

    doc = node.json("info")
    microvm = doc["Cocon"]["MicroVM"]
    assert microvm["Assets"] == "ready" and microvm["Accelerator"] == "tcg" and microvm["AcceleratorReason"]
    assert microvm["KernelRelease"] == release and RFC3339.match(microvm["Probed"])
    assert doc["Isolation"] == "process" and doc["Cocon"]["DockerIsolation"] == ["process", "hyperv", "vm"]
    assert any("TCG" in w for w in doc["Warnings"])
    native = node.daemon.request("GET", "/cocon/v1/info").json()["MicroVM"]
    assert native == microvm
    assert docker(node.daemon, "info").returncode == 0  # Docker's client reads the document


def test_bad_input_is_refused_clearly(node: Node) -> None:
    for args in (("system", "assets", "--format", "xml"), ("info", "--format", "xml")):
        p = node(*args, check=False)
        assert p.returncode == 2 and "invalid choice: 'xml'" in p.stderr and p.stdout == "", p.stderr
    p = node("system", "assets", "--rebuild", "now", check=False)
    assert p.returncode == 2 and "unrecognized arguments: now" in p.stderr
    r = node.daemon.request("POST", "/cocon/v1/system/assets?rebuild=maybe")
    assert r.status == 400 and "rebuild" in r.message and "1/true" in r.message


@pytest.fixture
def no_packages(tmp_path: Any) -> Iterator[Node]:
    """A daemon whose apt sees no package lists (APT_CONFIG pointing at empty ones)."""
    lists = tmp_path / "lists"
    (lists / "partial").mkdir(parents=True)
    conf = tmp_path / "apt.conf"
    conf.write_text(f'Dir::State::Lists "{lists}";\nDir::Cache::pkgcache "";\nDir::Cache::srcpkgcache "";\n')
    yield from node_fixture(str(tmp_path), env={"APT_CONFIG": str(conf)})


def test_a_build_that_cannot_resolve_its_packages_fails_clearly(no_packages: Node) -> None:
    node = no_packages
    doc = node.json("system", "assets")
    assert doc["State"] == "unknown" and "apt-get update" in doc["Message"], doc
    p = node("system", "assets", "--rebuild", check=False)
    assert p.returncode == 1, p.stderr
    error = p.stderr.strip().splitlines()[-1]
    assert error.startswith("cocon: error: cannot build the microVM guest assets under "), error
    assert "apt-get update" in error and "cocon system assets --rebuild" in error, error
    assert "Traceback" not in p.stderr
    assert node("info").returncode == 0  # info still answers (and builds nothing)
    base = os.path.join(node.assets, "assets")
    assert not [n for n in os.listdir(base) if len(n) == 64]
