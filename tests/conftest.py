"""Fixtures shared by every test: a busybox rootfs, per-test runtime roots, and their clean-up."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from typing import Any

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from cocon.images.busybox import make_rootfs
from runtime_helpers import (
    TEST_CGROUP_PARENT,
    Bundle,
    RuntimeCLI,
    leftover_cgroup_dirs,
    make_bundle,
)


@pytest.fixture(scope="session")
def busybox_rootfs(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = str(tmp_path_factory.mktemp("busybox") / "rootfs")
    make_rootfs(path)
    return path


@pytest.fixture(scope="session")
def debian_vm_build(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The Debian test guest, made once per session (tests/vm_helpers.build_debian_vm: DebianVm)."""
    from vm_helpers import build_debian_vm

    return build_debian_vm(str(tmp_path_factory.mktemp("debian-vm")))


@pytest.fixture(scope="session")
def debian_vm(debian_vm_build: Any) -> tuple[str, str]:
    """(an archive of the debian-vm:bookworm image to `cocon load`, a bootable qcow2 disk of it: copy
    it before booting)."""
    return debian_vm_build.archive, debian_vm_build.disk


@pytest.fixture
def runtime(tmp_path: os.PathLike[str]) -> Iterator[RuntimeCLI]:
    rt = RuntimeCLI(root=os.path.join(str(tmp_path), "state"))
    yield rt
    rt.cleanup()


@pytest.fixture
def bundle(tmp_path: os.PathLike[str], busybox_rootfs: str, runtime: RuntimeCLI):  # type: ignore[no-untyped-def]
    """Factory: bundle(*args, terminal=False, edit=fn) -> Bundle for a busybox container."""
    made: list[Bundle] = []

    def factory(*args: str, **kw: object) -> Bundle:
        b = make_bundle(str(tmp_path), busybox_rootfs, runtime, *args, **kw)  # type: ignore[arg-type]
        made.append(b)
        return b

    yield factory
    runtime.cleanup()
    for b in made:
        assert leftover_cgroup_dirs(b.cgroups_path) == [], f"cgroup of {b.id} left behind"


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    # The shared parent of test cgroups goes once every test container is gone.
    for d in leftover_cgroup_dirs(TEST_CGROUP_PARENT):
        try:
            os.rmdir(d)
        except OSError:
            pass


def _cocon_network_state() -> tuple[set[str], set[str]]:
    """cocon's bridges and nftables tables on the host (names start with `cocon`)."""
    import json
    import subprocess

    links = json.loads(subprocess.run(["ip", "-j", "link"], capture_output=True, text=True).stdout or "[]")
    rules = json.loads(subprocess.run(["nft", "-j", "list", "tables"], capture_output=True, text=True).stdout
                       or "{}")  # fmt: skip
    names = {link["ifname"] for link in links if link.get("ifname", "").startswith("cocon")}
    tables = {t["table"]["name"] for t in rules.get("nftables", []) if "table" in t}
    return names, {t for t in tables if t.startswith("cocon")}


@pytest.fixture(scope="session", autouse=True)
def no_network_left_behind() -> Iterator[None]:
    """The whole run leaves no bridge or nftables table of cocon's that was not there before (every
    test resets the networks its daemons and engines made)."""
    links, tables = _cocon_network_state()
    yield
    new_links, new_tables = _cocon_network_state()
    assert new_links <= links and new_tables <= tables, (
        f"cocon networking left behind: links {sorted(new_links - links)}, tables {sorted(new_tables - tables)}"
    )
