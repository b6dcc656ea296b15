"""cocon.vmm.template without QEMU: keys, finding, damaged templates refused before QEMU starts,
pruning. The real save and restore are in tests/integration/test_vmm_template.py."""

from __future__ import annotations

import dataclasses
import json
import os

import pytest

from cocon.vmm.errors import QemuError
from cocon.vmm.qemu import Disk, MachineConfig, Share
from cocon.vmm.template import (
    FORMAT_VERSION,
    Template,
    TemplateError,
    TemplateKey,
    TemplateStore,
    _ram_args,
    _sha256_file,
)

DIGEST = "a" * 64


@pytest.fixture
def config(tmp_path: str) -> MachineConfig:
    kernel = os.path.join(tmp_path, "vmlinuz")
    initrd = os.path.join(tmp_path, "initrd.img")
    for path in (kernel, initrd):
        with open(path, "wb") as f:
            f.write(b"x")
    return MachineConfig(kernel, initrd, cmdline="cocon.wait=1")


def _key(config: MachineConfig, **kw: str) -> TemplateKey:
    return TemplateKey.for_config(config, assets_digest=DIGEST, layout="rng", **kw)


def _fake(store: TemplateStore, key: TemplateKey, state: bytes = b"state" * 100) -> Template:
    """A template directory as create() leaves it, without booting anything."""
    directory = os.path.join(store.base, key.digest)
    os.makedirs(directory)
    with open(os.path.join(directory, "state"), "wb") as f:
        f.write(state)
    files: dict[str, object] = {"state": {"size": len(state), "sha256": _sha256_file(f.name)}}
    if key.mode == "ram-file":
        ram = os.path.join(directory, "ram")
        with open(ram, "wb") as f:
            f.truncate(key.memory_mib << 20)
        st = os.stat(ram)
        files["ram"] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "allocated": 0}
    with open(os.path.join(directory, "manifest.json"), "w") as out:
        json.dump({"format": FORMAT_VERSION, "key": key.to_json(), "files": files}, out)
    found = store.find(key)
    assert found is not None
    return found


def test_every_part_of_the_key_changes_its_digest(config: MachineConfig, tmp_path: str) -> None:
    key = _key(config)
    assert key == _key(config), "the same machine gives the same key"
    assert key.cpu == "max" and key.host_cpu == "" and key.mode == "ram-file"
    assert key.qemu.count(":") == 2, "path, size and mtime of the QEMU binary"
    share_dir = str(tmp_path)
    others = [
        dataclasses.replace(key, assets_digest="b" * 64),
        _key(dataclasses.replace(config, memory_mib=512)),
        _key(dataclasses.replace(config, cpus=2)),
        _key(dataclasses.replace(config, machine="q35")),
        _key(dataclasses.replace(config, cmdline="cocon.agent=1")),
        _key(dataclasses.replace(config, cpu="qemu64")),
        TemplateKey.for_config(config, assets_digest=DIGEST, layout="rng+net"),
        _key(config, mode="stream"),
        _key(dataclasses.replace(config, shares=(Share(share_dir, "rootfs"),))),
        _key(dataclasses.replace(config, disks=(Disk(config.kernel),))),
        _key(dataclasses.replace(config, agent_socket=os.path.join(tmp_path, "agent.sock"))),
    ]
    digests = {key.digest} | {other.digest for other in others}
    assert len(digests) == len(others) + 1
    # Per-VM paths are not part of the key: another share directory or socket, the same template.
    elsewhere = os.path.join(tmp_path, "other")
    os.mkdir(elsewhere)
    a = _key(
        dataclasses.replace(config, shares=(Share(share_dir, "rootfs"),), agent_socket=f"{share_dir}/a.sock")
    )
    b = _key(
        dataclasses.replace(config, shares=(Share(elsewhere, "rootfs"),), agent_socket=f"{elsewhere}/b.sock")
    )
    assert a == b
    assert a.devices == "9p:rootfs:rw,agent"


def test_a_bad_mode_is_refused(config: MachineConfig) -> None:
    with pytest.raises(QemuError, match="unknown template mode 'mmap': use one of ram-file, stream"):
        _key(config, mode="mmap")


def test_the_ram_backend_arguments(config: MachineConfig) -> None:
    key = _key(config)
    assert _ram_args(key, "/t/ram", share=True) == (
        "-object",
        "memory-backend-file,id=cocon-ram,size=256M,mem-path=/t/ram,share=on",
        "-machine",
        "memory-backend=cocon-ram",
    )
    assert "share=off" in _ram_args(key, "/t/ram", share=False)[1]
    assert _ram_args(dataclasses.replace(key, mode="stream"), "/t/ram", share=True) == ()


def test_find_list_and_unreadable_templates(config: MachineConfig, tmp_path: str) -> None:
    store = TemplateStore(str(tmp_path))
    key = _key(config)
    assert store.find(key) is None and store.templates() == []
    template = _fake(store, key)
    assert store.find(key) == template and store.templates() == [template]
    assert store.find(_key(config, mode="stream")) is None
    with open(os.path.join(template.directory, "manifest.json"), "w") as f:
        f.write("{not json")
    assert store.find(key) is None
    assert not os.path.exists(template.directory), "an unreadable template is removed"


def test_create_refuses_a_config_the_key_does_not_describe(config: MachineConfig, tmp_path: str) -> None:
    store = TemplateStore(str(tmp_path))
    key = _key(config)
    with pytest.raises(QemuError, match=r"does not match the template key \(memory_mib: 256 != 512\)"):
        store.create(key, dataclasses.replace(config, memory_mib=512), ready="x")
    assert store.templates() == []


@pytest.mark.parametrize("damage", ["truncate-state", "flip-state", "missing-ram", "changed-ram"])
def test_a_damaged_template_is_removed_before_qemu_starts(
    config: MachineConfig, tmp_path: str, damage: str
) -> None:
    store = TemplateStore(os.path.join(tmp_path, "root"))
    key = _key(config)
    template = _fake(store, key)
    if damage == "truncate-state":
        os.truncate(template.state, 10)
    elif damage == "flip-state":
        with open(template.state, "r+b") as f:
            f.write(b"X")
    elif damage == "missing-ram":
        os.unlink(template.ram)
    else:
        with open(template.ram, "r+b") as f:
            f.write(b"X")
    workdir = os.path.join(tmp_path, "vm")
    with pytest.raises(TemplateError, match=r"is damaged .*it was removed: boot the VM cold"):
        store.restore(template, config, workdir)
    assert not os.path.exists(template.directory)
    assert not os.path.exists(workdir), "no QEMU was started"
    assert store.restore_or_none(key, config, workdir) is None


def test_prune_keeps_only_the_given_keys(config: MachineConfig, tmp_path: str) -> None:
    store = TemplateStore(str(tmp_path))
    keep = _fake(store, _key(config))
    old = _fake(store, _key(config, mode="stream"))
    assert store.prune(keep=[keep.key]) == [old.key.digest]
    assert store.templates() == [keep]
    assert os.listdir(os.path.join(store.base, "tmp")) == []
