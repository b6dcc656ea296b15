"""The bounded KVM probe: can this host boot cocon's guest under KVM, or must it use TCG?

`/dev/kvm` existing is not enough: on some hosts (nested virtualisation) a Linux guest hangs early
in its boot under KVM. So the probe boots the real guest kernel and initramfs under `-accel kvm`
with a hard timeout (`DEFAULT_TIMEOUT`, a few seconds; a working KVM needs well under one): the
answer is "kvm" if the guest's ready marker (`cocon-guest: ready`) reaches the serial console in
time, else "tcg", with the reason. QEMU is killed and reaped when the time is up.

The answer is cached in `<assets directory>/kvm-probe.json` (so per guest kernel), keyed by the host
(node name, host kernel release, the QEMU binary's size and mtime); `probe_kvm` reuses a cached answer
unless `refresh=True`. Callers say "using TCG" once, from `KvmProbe.reason`.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass

from cocon.vmm.assets import Assets
from cocon.vmm.errors import QemuError
from cocon.vmm.qemu import QEMU_BINARY, MachineConfig, Qemu

__all__ = ["CACHE_FILE", "DEFAULT_TIMEOUT", "READY_MARKER", "KvmProbe", "host_key", "probe_kvm"]

DEFAULT_TIMEOUT = 5.0
CACHE_FILE = "kvm-probe.json"
READY_MARKER = "cocon-guest: ready"


@dataclass(frozen=True)
class KvmProbe:
    accel: str  # "kvm" or "tcg"
    reason: str  # why (human-readable)
    seconds: float  # how long the probe took when it ran
    host: str  # the host key the answer is for
    kernel: str  # the guest kernel release it was probed with
    cpu: str  # the -cpu model it was probed with
    cached: bool = False  # True: read from the cache, not probed now


def host_key(binary: str = QEMU_BINARY) -> str:
    """What a cached answer depends on besides the guest kernel: host, host kernel, QEMU binary."""
    uname = os.uname()
    path = shutil.which(binary) or binary
    try:
        st = os.stat(path)
        qemu = f"{path}:{st.st_size}:{st.st_mtime_ns}"
    except OSError:
        qemu = f"{path}:missing"
    return f"{uname.nodename}|{uname.release}|{uname.machine}|{qemu}"


def _read_cache(path: str) -> dict[str, dict[str, object]]:
    try:
        with open(path, "rb") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_cache(path: str, data: dict[str, dict[str, object]]) -> None:
    try:
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".kvm-probe-")
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2, sort_keys=True)
        os.rename(tmp, path)
    except OSError:
        pass  # a read-only assets directory: the probe runs again next time, nothing worse


def _boot(assets: Assets, timeout: float, cpu: str) -> tuple[bool, str]:
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        return False, f"/dev/kvm cannot be opened ({exc.strerror})"
    os.close(fd)
    config = MachineConfig(assets.kernel, assets.initrd, accel="kvm", cpu=cpu, memory_mib=128)
    with tempfile.TemporaryDirectory(prefix="cocon-kvm-probe-") as work:
        vm = Qemu(config, work)
        try:
            vm.start(qmp=False)
            vm.wait_for_console(READY_MARKER, timeout)
            return True, "the guest kernel booted under KVM"
        except QemuError as exc:
            if vm.returncode is not None:
                return False, f"QEMU with KVM failed (status {vm.returncode}): {exc.log_tail[-300:]}"
            return False, f"the guest did not boot under KVM within {timeout:g} s (KVM hangs on this host)"
        finally:
            vm.kill()


def probe_kvm(
    assets: Assets, *, timeout: float = DEFAULT_TIMEOUT, refresh: bool = False, cpu: str = "host"
) -> KvmProbe:
    """KVM or TCG for `assets` on this host: the cached answer, or a bounded boot test (at most about
    `timeout` seconds, QEMU always killed at the end). `cpu` is the -cpu model VMs will use under
    KVM (the answer is cached per model)."""
    cache_path = os.path.join(assets.directory, CACHE_FILE)
    key = host_key()
    cache = _read_cache(cache_path)
    entry = cache.get(key)
    if (
        not refresh
        and isinstance(entry, dict)
        and entry.get("kernel") == assets.version
        and entry.get("cpu") == cpu
    ):
        try:
            return KvmProbe(
                accel=str(entry["accel"]),
                reason=str(entry["reason"]),
                seconds=float(str(entry["seconds"])),
                host=key,
                kernel=assets.version,
                cpu=cpu,
                cached=True,
            )
        except (KeyError, ValueError):
            pass
    started = time.monotonic()
    ok, reason = _boot(assets, timeout, cpu)
    probe = KvmProbe(
        accel="kvm" if ok else "tcg",
        reason=reason,
        seconds=round(time.monotonic() - started, 3),
        host=key,
        kernel=assets.version,
        cpu=cpu,
    )
    record = asdict(probe)
    del record["cached"]
    cache[key] = record  # one answer per host: a later probe with another cpu model replaces it
    _write_cache(cache_path, cache)
    return probe
