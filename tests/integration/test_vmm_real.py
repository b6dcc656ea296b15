"""cocon.vmm for real: guest assets from Debian packages, booted by QEMU under TCG, driven over QMP,
and the bounded KVM probe (KVM hangs or aborts on these machines: the probe must answer TCG in time).

The assets are built once per module into a temporary root (the downloaded .debs stay in it);
every QEMU this file starts has that root or the test's tmp_path in its command line, and the
`no_qemu_left` fixture kills and fails on any such QEMU still running after a test."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import threading
import time
from collections.abc import Iterator

import pytest
import zstandard

from cocon.vmm.assets import (
    Assets,
    Recipe,
    _default_source,
    assets_status,
    ensure_assets,
    prune_assets,
    resolve_inputs,
)
from cocon.vmm.errors import AssetError, QemuError
from cocon.vmm.kvm import CACHE_FILE, probe_kvm
from cocon.vmm.qemu import Disk, MachineConfig, Qemu, Share
from vm_helpers import kill_processes, processes_naming

READY = "cocon-guest: ready"


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    path = str(tmp_path_factory.mktemp("vmm-root"))
    yield path
    kill_processes(path)
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def recipe(root: str) -> Recipe:
    """cocon's recipe with a snapshot of the guest sources: the tree may be edited while this runs."""
    source = os.path.join(root, "src", "cocon")
    shutil.copytree(_default_source(), source, ignore=shutil.ignore_patterns("__pycache__"))
    return Recipe(guest_source=source)


@pytest.fixture(scope="module")
def assets(root: str, recipe: Recipe) -> Assets:
    events: list[tuple[str, int, int]] = []
    built = ensure_assets(root, progress=lambda *e: events.append(e), recipe=recipe)
    assert events[0][0] == "resolve" and events[-1] == ("commit", 1, 1)
    assert ("utility", 4, 4) in events
    return built


@pytest.fixture(autouse=True)
def no_qemu_left(tmp_path: str, request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    markers = [str(tmp_path)]
    left = [pid for m in markers for pid in kill_processes(m)]
    assert left == [], f"QEMU processes left behind: {left}"


def _vm(assets: Assets, workdir: str, **kw: object) -> Qemu:
    return Qemu(MachineConfig(assets.kernel, assets.initrd, **kw), workdir)  # type: ignore[arg-type]


def _initrd_names(path: str) -> set[str]:
    with open(path, "rb") as f:
        data = zstandard.ZstdDecompressor().decompressobj().decompress(f.read())
    names: set[str] = set()
    pos = 0
    while True:
        assert data[pos : pos + 6] == b"070701"
        fields = [int(data[pos + 6 + 8 * i : pos + 14 + 8 * i], 16) for i in range(13)]
        namesize, filesize = fields[11], fields[6]
        name = data[pos + 110 : pos + 110 + namesize - 1].decode()
        pos = (pos + 110 + namesize + 3) & ~3
        pos = (pos + filesize + 3) & ~3
        if name == "TRAILER!!!":
            return names
        names.add(name)


# --- assets -------------------------------------------------------------------------------------------


def test_assets_are_built_once_and_reused(root: str, recipe: Recipe, assets: Assets) -> None:
    assert os.path.dirname(assets.directory) == os.path.join(root, "assets")
    assert os.path.basename(assets.directory) == assets.digest
    assert assets.version.endswith("-amd64") and "cloud" not in assets.version
    assert any(p.startswith("linux-image-") and p.endswith("-amd64") for p in assets.packages)
    assert {"busybox-static", "python3-minimal", "libpython3.11-stdlib", "libc6"} <= set(assets.packages)
    assert assets.utility == os.path.join(assets.directory, "guest.erofs")
    # QEMU boots the uncompressed kernel (PVH entry); the bzImage stays beside it
    assert assets.kernel == os.path.join(assets.directory, "vmlinux")
    with open(assets.kernel, "rb") as f:
        assert f.read(4) == b"\x7fELF"
    assert os.path.isfile(os.path.join(assets.directory, "vmlinuz"))
    with open(assets.utility, "rb") as f:
        f.seek(1024)
        assert f.read(4) == bytes.fromhex("e2e1f5e0"), "an erofs superblock"
    names = _initrd_names(assets.initrd)
    assert {"init", "bin/busybox", "bin/sh", "dev/console", "etc/cocon/modules"} <= names
    mods = f"lib/modules/{assets.version}"
    for module in (
        "virtio_mmio.ko",
        "virtio_pci.ko",
        "virtio_blk.ko",
        "virtio_console.ko",
        "virtio_net.ko",
        "crc32c_generic.ko",
        "erofs.ko",
        "9pnet_virtio.ko",
        "9p.ko",
    ):
        assert any(n.startswith(mods) and n.endswith("/" + module) for n in names), module
    assert f"{mods}/modules.dep" in names
    kernel_inode = os.stat(assets.kernel).st_ino

    events: list[tuple[str, int, int]] = []
    started = time.monotonic()
    again = ensure_assets(root, progress=lambda *e: events.append(e), recipe=recipe)
    assert again == assets
    assert events == [], "nothing is built when the assets are there"
    assert os.stat(again.kernel).st_ino == kernel_inode
    assert time.monotonic() - started < 1.0
    status = assets_status(root, recipe)
    assert (status.state, status.digest) == ("ready", assets.digest)
    assert os.listdir(os.path.join(root, "assets", "tmp")) == []


def test_a_changed_input_changes_the_digest(root: str, recipe: Recipe, assets: Assets, tmp_path: str) -> None:
    init = os.path.join(tmp_path, "init")
    shutil.copyfile(Recipe().init_path(), init)
    with open(init, "a") as f:
        f.write("# changed\n")
    changed = dataclasses.replace(recipe, init_script=init)
    cache = os.path.join(root, "assets")
    assert resolve_inputs(changed, cache_dir=cache).digest != assets.digest
    assert resolve_inputs(dataclasses.replace(recipe, modules=("virtio_blk",))).digest != assets.digest
    # an edited guest source (the agent, the runtime) gives new assets too
    source = os.path.join(tmp_path, "cocon")
    shutil.copytree(recipe.source_path(), source)
    assert resolve_inputs(Recipe(guest_source=source), cache_dir=cache).digest == assets.digest
    with open(os.path.join(source, "vmm", "errors.py"), "a") as f:
        f.write("# edited\n")
    assert resolve_inputs(Recipe(guest_source=source), cache_dir=cache).digest != assets.digest
    assert assets_status(root, changed).state == "missing"

    rebuilt = ensure_assets(root, recipe=changed)
    assert rebuilt.digest == resolve_inputs(changed, cache_dir=cache).digest != assets.digest
    assert rebuilt.version == assets.version
    assert os.path.isdir(assets.directory), "the previous build stays until pruned"
    assert {assets.digest, rebuilt.digest} <= set(assets_status(root, recipe).built)
    assert prune_assets(root, keep=[assets.digest]) == [rebuilt.digest]
    assert not os.path.exists(rebuilt.directory)
    assert assets_status(root, recipe).built == [assets.digest]


def test_an_unknown_package_is_a_clear_error(root: str, recipe: Recipe, assets: Assets) -> None:
    bogus = dataclasses.replace(recipe, kernel_package="linux-image-no-such-flavour")
    with pytest.raises(AssetError, match="cannot look up the Debian package linux-image-no-such-flavour"):
        ensure_assets(root, recipe=bogus)
    status = assets_status(root, bogus)
    assert status.state == "unknown" and "apt-get update" in (status.error or "")
    assert status.assets == assets, "what is built is still reported"


def test_a_corrupted_asset_is_detected_and_rebuilt(root: str, recipe: Recipe, assets: Assets) -> None:
    assert assets.utility is not None
    for path, offset in ((assets.initrd, 100), (assets.utility, 4096 * 3 + 7)):
        with open(path, "r+b") as f:
            f.seek(offset)
            byte = f.read(1)
            f.seek(offset)
            f.write(bytes([byte[0] ^ 0xFF]))
        status = assets_status(root, recipe)
        assert status.state == "corrupt" and "does not match" in (status.error or "")

    events: list[tuple[str, int, int]] = []
    again = ensure_assets(root, progress=lambda *e: events.append(e), recipe=recipe)
    assert again.digest == assets.digest
    assert ("initramfs", 1, 1) in events and ("utility", 4, 4) in events
    with open(again.directory + "/manifest.json") as f:
        manifest = json.load(f)
    for name, built in (("initrd.img", again.initrd), ("guest.erofs", again.utility)):
        assert built is not None
        with open(built, "rb") as f:
            assert hashlib.sha256(f.read()).hexdigest() == manifest["files"][name]
    assert assets_status(root, recipe).state == "ready"


def test_a_missing_utility_image_is_rebuilt(root: str, recipe: Recipe, assets: Assets) -> None:
    assert assets.utility is not None
    os.unlink(assets.utility)
    assert assets_status(root, recipe).state == "corrupt"
    again = ensure_assets(root, recipe=recipe)
    assert again == assets and os.path.isfile(assets.utility)


def test_two_builders_do_not_race(root: str, recipe: Recipe, assets: Assets, tmp_path: str) -> None:
    fresh = os.path.join(tmp_path, "root")
    shutil.copytree(os.path.join(root, "assets", "debs"), os.path.join(fresh, "assets", "debs"))
    events: list[tuple[str, int, int]] = []
    results: list[Assets] = []
    errors: list[BaseException] = []

    def build() -> None:
        try:
            results.append(ensure_assets(fresh, progress=lambda *e: events.append(e), recipe=recipe))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=build) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert errors == []
    assert len(results) == 2 and results[0] == results[1]
    assert results[0].digest == assets.digest, "the same inputs give the same digest in another root"
    assert events.count(("initramfs", 1, 1)) == 1, "one builder built, the other waited and reused"
    assert os.listdir(os.path.join(fresh, "assets", "tmp")) == []


# --- booting under TCG ------------------------------------------------------------------------------


def test_the_guest_boots_under_tcg_and_powers_off(assets: Assets, tmp_path: str) -> None:
    vm = _vm(assets, os.path.join(tmp_path, "vm"))
    with vm:
        started = time.monotonic()
        vm.start()
        console = vm.wait_for_console(READY, timeout=60)
        assert f"{READY} {assets.version}" in console
        assert vm.wait(timeout=30) == 0
        seconds = time.monotonic() - started
    assert "cocon-guest: error" not in vm.console()
    assert vm.pid is not None and not os.path.exists(f"/proc/{vm.pid}")
    print(f"TCG boot to the ready marker and power-off: {seconds:.2f} s")


def test_the_utility_image_runs_python_with_9p_available(assets: Assets, tmp_path: str) -> None:
    # One boot with every new device: the utility disk, a 9p share and the agent channel.
    share = os.path.join(tmp_path, "share")
    os.mkdir(share)
    assert assets.utility is not None
    config = MachineConfig(
        assets.kernel,
        assets.initrd,
        cmdline="cocon.agent=selftest",
        disks=(Disk(assets.utility),),
        shares=(Share(share, "share0"),),
        agent_socket=os.path.join(tmp_path, "agent.sock"),
    )
    with Qemu(config, os.path.join(tmp_path, "vm")) as vm:
        started = time.monotonic()
        vm.start()
        console = vm.wait_for_console("cocon-guest: python ok", timeout=60)
        seconds = time.monotonic() - started
        assert os.path.exists(os.path.join(tmp_path, "agent.sock")), "QEMU listens for the agent"
        assert vm.wait(timeout=30) == 0
        console = vm.console()
    assert "cocon-guest: python ok 3.11." in console
    assert "cocon-guest: 9p available" in console
    assert "cocon-guest: error" not in console and READY not in console
    timing = [line for line in console.splitlines() if "imported in" in line]
    assert timing, "the self test says how long python took"
    print(f"TCG boot to the python self test: {seconds:.2f} s; {timing[0]}")


def test_q35_boots_the_same_assets(assets: Assets, tmp_path: str) -> None:
    with _vm(assets, os.path.join(tmp_path, "vm"), machine="q35") as vm:
        vm.start()
        assert f"{READY} {assets.version}" in vm.wait_for_console(READY, timeout=60)
        assert vm.wait(timeout=30) == 0


def test_qmp_status_of_a_waiting_guest_then_powerdown(assets: Assets, tmp_path: str) -> None:
    with _vm(assets, os.path.join(tmp_path, "vm"), cmdline="cocon.wait=1") as vm:
        vm.start()
        vm.wait_for_console("cocon-guest: waiting", timeout=60)
        assert vm.status() == "running"
        time.sleep(0.3)
        assert vm.returncode is None, "the guest waits instead of powering off"
        vm.powerdown()
        assert vm.wait(timeout=30) == 0
        assert "power button pressed" in vm.console()


def test_qmp_quit_ends_a_waiting_guest(assets: Assets, tmp_path: str) -> None:
    with _vm(assets, os.path.join(tmp_path, "vm"), cmdline="cocon.wait=1") as vm:
        vm.start()
        assert vm.status() in ("running", "prelaunch")
        assert vm.quit(timeout=10) == 0
        with pytest.raises(QemuError, match="QMP is not connected"):
            vm.status()


def test_closing_kills_a_guest_that_still_runs(assets: Assets, tmp_path: str) -> None:
    vm = _vm(assets, os.path.join(tmp_path, "vm"), cmdline="cocon.wait=1")
    with pytest.raises(RuntimeError):
        with vm:
            vm.start()
            raise RuntimeError("the caller fails while the guest runs")
    assert vm.returncode is not None
    assert processes_naming(str(tmp_path)) == []


# --- failures -------------------------------------------------------------------------------------


def test_qemu_failing_to_start_gives_a_clear_error(assets: Assets, tmp_path: str) -> None:
    vm = _vm(assets, os.path.join(tmp_path, "vm"), extra_args=("-no-such-option",))
    with pytest.raises(QemuError) as info:
        vm.start(timeout=10)
    assert info.value.returncode == 1
    assert "exited with status 1" in str(info.value)
    assert "-no-such-option" in info.value.log_tail
    assert vm.returncode == 1
    assert processes_naming(str(tmp_path)) == []


def test_a_guest_that_never_shows_the_marker_is_reported_and_killed(assets: Assets, tmp_path: str) -> None:
    with _vm(assets, os.path.join(tmp_path, "vm"), cmdline="cocon.wait=1") as vm:
        vm.start()
        started = time.monotonic()
        with pytest.raises(QemuError, match="did not show 'never printed' within 1 s"):
            vm.wait_for_console("never printed", timeout=1)
        assert time.monotonic() - started < 3
    assert vm.returncode is not None


# --- the KVM probe ----------------------------------------------------------------------------------


def test_the_kvm_probe_answers_in_time_and_is_cached(assets: Assets) -> None:
    started = time.monotonic()
    probe = probe_kvm(assets, timeout=5, refresh=True)
    took = time.monotonic() - started
    assert probe.accel in ("kvm", "tcg") and not probe.cached
    assert took < 5 + 2.5, f"the probe took {took:.1f} s"
    # On these machines KVM is not usable (QEMU aborts with -cpu host, or the guest hangs).
    assert probe.accel == "tcg", probe.reason
    assert probe.reason
    assert os.path.isfile(os.path.join(assets.directory, CACHE_FILE))
    assert processes_naming(assets.directory) == []

    started = time.monotonic()
    again = probe_kvm(assets, timeout=5)
    assert again.cached and again.accel == probe.accel and again.reason == probe.reason
    assert time.monotonic() - started < 0.5


def test_the_kvm_probe_times_out_a_hanging_guest(assets: Assets) -> None:
    # With -cpu qemu64 the guest starts under KVM here and then hangs: the timeout path.
    started = time.monotonic()
    probe = probe_kvm(assets, timeout=2, refresh=True, cpu="qemu64")
    took = time.monotonic() - started
    assert probe.accel == "tcg" and probe.cpu == "qemu64"
    assert "within 2 s" in probe.reason, probe.reason
    assert took < 2 + 2.5, f"the probe took {took:.1f} s"
    assert processes_naming(assets.kernel) == []
