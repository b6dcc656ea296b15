"""VM templates for real: the default guest assets booted under TCG in wait mode (`cocon.wait=1`: the
init waits for the ACPI power button), saved as a template, restored twice at once; both restored
guests really run (QMP status, then a clean power-off on system_powerdown, which only a resumed
guest answers). Damaged templates are refused, removed, and `restore_or_none` says "boot cold".

Two boots in all: one per RAM mode ("ram-file" and "stream"). Every QEMU started here has the
module's root or the test's tmp_path in its command line; `no_qemu_left` kills and fails on any
still running after a test."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator

import pytest

from cocon.vmm.assets import Assets, ensure_assets
from cocon.vmm.errors import QemuError
from cocon.vmm.qemu import MachineConfig, Qemu, Share, virtio_device
from cocon.vmm.template import Template, TemplateError, TemplateKey, TemplateStore, _sha256_file
from vm_helpers import kill_processes, processes_naming

WAITING = "cocon-guest: waiting"
LAYOUT = "rng"


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    path = str(tmp_path_factory.mktemp("tpl"))
    yield path
    kill_processes(path)
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def assets(root: str) -> Assets:
    return ensure_assets(root)


@pytest.fixture(autouse=True)
def no_qemu_left(tmp_path: str) -> Iterator[None]:
    yield
    left = kill_processes(str(tmp_path))
    assert left == [], f"QEMU processes left behind: {left}"


def _tsc_khz() -> int:
    """The host's TSC rate (what TCG's rdtsc counts at), from /proc/cpuinfo."""
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("cpu MHz"):
                return int(float(line.split(":")[1]) * 1000)
    raise AssertionError("no cpu MHz in /proc/cpuinfo")


def _config(assets: Assets, where: str) -> MachineConfig:
    """The VM every test boots or restores. Its devices: a 9p share (tag "rootfs", a directory of
    its own per VM: not mounted by the guest at save time), the agent channel (virtio-serial and a
    socket of its own per VM) and, in `extra_args`, one virtio-rng device (what LAYOUT names).
    tsc_early_khz: under TCG on a busy host the guest kernel's PIT calibration of the TSC often
    fails, and the generic kernel then hangs in early boot (microvm has no HPET or ACPI PM timer to
    fall back on); TCG's rdtsc counts at the host's TSC rate."""
    share = os.path.join(where, "rootfs")
    os.makedirs(share, exist_ok=True)
    return MachineConfig(
        assets.kernel,
        assets.initrd,
        cmdline=f"cocon.wait=1 tsc_early_khz={_tsc_khz()}",
        shares=(Share(share, "rootfs"),),
        agent_socket=os.path.join(where, "agent.sock"),
        extra_args=("-device", virtio_device("microvm", "rng")),
    )


def _memory(pid: int) -> dict[str, int]:
    with open(f"/proc/{pid}/smaps_rollup") as f:
        fields = dict(line.split(":", 1) for line in f if line[:1].isupper() and "kB" in line)
    return {k: int(v.split()[0]) for k, v in fields.items() if k in ("Rss", "Pss", "Private_Dirty")}


@dataclasses.dataclass
class Made:
    template: Template
    results: list[Template]
    errors: list[BaseException]
    seconds: float


def _make(store: TemplateStore, assets: Assets, mode: str, creators: int) -> Made:
    config = _config(assets, os.path.join(store.root, f"made-{mode}"))
    key = TemplateKey.for_config(config, assets_digest=assets.digest, layout=LAYOUT, mode=mode)
    results: list[Template] = []
    errors: list[BaseException] = []

    def create() -> None:
        try:
            results.append(store.create(key, config, ready=WAITING, timeout=60))
        except BaseException as exc:
            errors.append(exc)

    started = time.monotonic()
    threads = [threading.Thread(target=create) for _ in range(creators)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(150)
    seconds = time.monotonic() - started
    assert errors == [], errors
    return Made(results[0], results, errors, seconds)


@pytest.fixture(scope="module")
def store(root: str) -> TemplateStore:
    return TemplateStore(root)


@pytest.fixture(scope="module")
def made(store: TemplateStore, assets: Assets) -> Made:
    """The "ram-file" template, made by two creators at once."""
    return _make(store, assets, "ram-file", creators=2)


def _restore_two_and_power_off(
    store: TemplateStore, template: Template, assets: Assets, tmp_path: str
) -> float:
    """Restore two VMs at once, check both run and power off cleanly; the slower restore's seconds."""
    vms: dict[int, Qemu] = {}
    took: dict[int, float] = {}
    errors: list[BaseException] = []

    def restore(i: int) -> None:
        try:
            started = time.monotonic()
            workdir = os.path.join(tmp_path, f"vm{i}")
            vms[i] = store.restore(template, _config(assets, workdir), workdir, timeout=60)
            took[i] = time.monotonic() - started
        except BaseException as exc:
            errors.append(exc)

    try:
        threads = [threading.Thread(target=restore, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(90)
        assert errors == [], errors
        assert sorted(vms) == [0, 1]
        assert vms[0].pid != vms[1].pid
        for vm in vms.values():
            assert vm.status() == "running"
            assert vm.returncode is None
        time.sleep(0.3)
        for vm in vms.values():
            assert vm.status() == "running", "the restored guest keeps running (it waits for the button)"
            print(f"{template.mode}: restored QEMU pid {vm.pid} memory (kB): {_memory(vm.pid or 0)}")
        for vm in vms.values():
            vm.powerdown()
        for vm in vms.values():
            assert vm.wait(timeout=60) == 0
            console = vm.console()
            # The restored console starts after the marker: the guest resumed, it did not boot.
            assert "Linux version" not in console and WAITING not in console
            assert "cocon-guest: power button pressed" in console
            assert "cocon-guest: powering off" in console
    finally:
        for vm in vms.values():
            vm.close()
    return max(took.values())


# --- the ram-file template -------------------------------------------------------------------------


def test_two_creators_at_once_make_one_template(store: TemplateStore, made: Made, root: str) -> None:
    template = made.template
    assert len(made.results) == 2
    assert made.results[0].directory == made.results[1].directory == template.directory
    assert made.results[0].manifest["created"] == made.results[1].manifest["created"], "made once"
    assert template.directory == os.path.join(root, "templates", template.key.digest)
    assert sorted(os.listdir(template.directory)) == ["console.log", "manifest.json", "ram", "state"]
    assert os.path.getsize(template.ram) == 256 << 20
    assert os.path.getsize(template.state) < 1 << 20, "RAM is not in the stream with x-ignore-shared"
    assert WAITING in open(os.path.join(template.directory, "console.log")).read()
    assert os.listdir(os.path.join(root, "templates", "tmp")) == []
    assert store.find(template.key) == template
    assert [t.directory for t in store.templates()] == [template.directory]


def test_two_vms_restored_at_once_run_and_power_off(
    store: TemplateStore, made: Made, assets: Assets, tmp_path: str
) -> None:
    boot = float(made.template.manifest["boot_seconds"])
    ram_before = _sha256_file(made.template.ram)
    restore = _restore_two_and_power_off(store, made.template, assets, str(tmp_path))
    # The restored guests ran and wrote their memory: copy-on-write, never into the template.
    assert _sha256_file(made.template.ram) == ram_before
    print(
        f"ram-file template: cold boot to {WAITING!r} {boot:.2f} s, save "
        f"{made.template.manifest['save_seconds']:.3f} s; two restores at once to running: {restore:.3f} s"
        f" ({restore / boot:.1%} of the cold boot)"
    )
    assert restore <= 0.25 * boot
    assert store.find(made.template.key) == made.template, "restoring leaves the template as it was"


def test_a_mismatched_key_is_not_found(
    store: TemplateStore, made: Made, assets: Assets, tmp_path: str
) -> None:
    key = made.template.key
    workdir = os.path.join(tmp_path, "vm")
    config = _config(assets, workdir)
    assert TemplateKey.for_config(config, assets_digest=assets.digest, layout=LAYOUT) == key
    for other in (
        dataclasses.replace(key, assets_digest="0" * 64),
        dataclasses.replace(key, layout="rng+net"),
        TemplateKey.for_config(
            dataclasses.replace(config, memory_mib=384), assets_digest=assets.digest, layout=LAYOUT
        ),
        TemplateKey.for_config(
            dataclasses.replace(config, shares=()), assets_digest=assets.digest, layout=LAYOUT
        ),
    ):
        assert other.digest != key.digest
        assert store.find(other) is None
        assert store.restore_or_none(other, config, workdir) is None
    # Restoring the template into a machine it was not made for is refused before QEMU starts.
    with pytest.raises(QemuError, match=r"does not match the template key \(memory_mib: 256 != 384\)"):
        store.restore(made.template, dataclasses.replace(config, memory_mib=384), workdir)
    assert processes_naming(str(tmp_path)) == []
    assert store.find(key) == made.template


def _copy(template: Template, root: str) -> TemplateStore:
    """A store of its own under `root` with a copy of `template` (sparse: the RAM file is mostly holes)."""
    target = os.path.join(root, "templates", os.path.basename(template.directory))
    os.makedirs(os.path.dirname(target))
    subprocess.run(["cp", "-a", "--sparse=always", template.directory, target], check=True)
    return TemplateStore(root)


def test_a_truncated_template_is_refused_and_removed(
    store: TemplateStore, made: Made, assets: Assets, tmp_path: str
) -> None:
    other = _copy(made.template, os.path.join(tmp_path, "root"))
    copy = other.find(made.template.key)
    assert copy is not None
    os.chmod(copy.state, 0o600)
    os.truncate(copy.state, os.path.getsize(copy.state) // 2)
    workdir = os.path.join(tmp_path, "vm")
    config = _config(assets, workdir)
    with pytest.raises(TemplateError, match=r"is damaged \(.*/state has \d+ bytes, not \d+\)") as info:
        other.restore(copy, config, workdir)
    assert "it was removed: boot the VM cold" in str(info.value)
    assert not os.path.exists(copy.directory)
    assert other.find(copy.key) is None
    assert other.restore_or_none(copy.key, config, workdir) is None
    assert store.find(made.template.key) == made.template, "the original is untouched"


def test_a_stream_qemu_cannot_load_is_removed_and_restore_or_none_says_boot_cold(
    made: Made, assets: Assets, tmp_path: str
) -> None:
    # Damage the manifest cannot see (it is made to agree with the truncated file): QEMU itself
    # fails to load the stream and exits; the template goes and the caller is told to boot cold.
    other = _copy(made.template, os.path.join(tmp_path, "root"))
    directory = os.path.join(other.base, made.template.key.digest)
    state = os.path.join(directory, "state")
    os.chmod(state, 0o600)
    os.truncate(state, os.path.getsize(state) // 2)
    manifest_path = os.path.join(directory, "manifest.json")
    os.chmod(manifest_path, 0o600)
    manifest = json.loads(open(manifest_path).read())
    manifest["files"]["state"] = {"size": os.path.getsize(state), "sha256": _sha256_file(state)}
    with open(manifest_path, "w") as f:
        json.dump(manifest, f)
    workdir = os.path.join(tmp_path, "vm")
    config = _config(assets, workdir)
    assert other.restore_or_none(made.template.key, config, workdir) is None
    assert not os.path.exists(directory), "the template QEMU could not load was removed"
    assert processes_naming(str(tmp_path)) == []
    qemu_log = open(os.path.join(workdir, "qemu.log")).read()
    assert "load of migration failed" in qemu_log, qemu_log

    # The same through restore(): a clear error that says what happened and what to do.
    other = _copy(made.template, os.path.join(tmp_path, "root2"))
    copy = other.find(made.template.key)
    assert copy is not None
    os.chmod(copy.state, 0o600)
    os.truncate(copy.state, os.path.getsize(copy.state) // 2)
    with open(os.path.join(copy.directory, "manifest.json"), "w") as f:
        json.dump(manifest, f)
    copy = Template(copy.key, copy.directory, manifest)
    with pytest.raises(
        TemplateError, match="could not be restored; it was removed: boot the VM cold"
    ) as info:
        other.restore(copy, config, workdir, timeout=30)
    assert info.value.returncode == 1
    assert "load of migration failed" in info.value.log_tail
    assert not os.path.exists(copy.directory)
    assert processes_naming(str(tmp_path)) == []


# --- the stream template -----------------------------------------------------------------------------


def test_a_stream_template_restores_too(
    store: TemplateStore, assets: Assets, made: Made, tmp_path: str
) -> None:
    stream = _make(store, assets, "stream", creators=1)
    template = stream.template
    assert template.key.digest != made.template.key.digest
    assert sorted(os.listdir(template.directory)) == ["console.log", "manifest.json", "state"]
    assert os.path.getsize(template.state) > 16 << 20, "the guest RAM is in the stream"
    boot = float(template.manifest["boot_seconds"])
    restore = _restore_two_and_power_off(store, template, assets, str(tmp_path))
    print(
        f"stream template: cold boot {boot:.2f} s, save {template.manifest['save_seconds']:.3f} s, "
        f"state {os.path.getsize(template.state) >> 20} MiB; two restores at once: {restore:.3f} s"
    )
    assert restore <= 0.25 * boot
    store.remove(template)
    assert store.find(template.key) is None
    assert [t.directory for t in store.templates()] == [made.template.directory]
