"""Firmware for full VMs (`--firmware bios|uefi`): which files QEMU boots and the arguments that say so.

- `bios`: SeaBIOS, QEMU's default firmware (Debian package `seabios`); no extra QEMU arguments.
- `uefi`: OVMF from Debian's `ovmf` package, the 4 MiB build without secure boot: the code
  (`OVMF_CODE_4M.fd`) as a read-only pflash, and a per-VM copy of the variable store template
  (`OVMF_VARS_4M.fd`) as a writable pflash. The copy is made once in the VM's `vars_dir` and kept: a VM's
  UEFI variables (boot order, boot entries an installer wrote) persist across its starts. Use the q35
  machine type. Secure boot is not supported (it needs the `secboot` build, SMM and enrolled keys).

`resolve_firmware(kind, vars_dir)` checks that the files exist and returns a `FirmwareSpec` whose `args`
go on QEMU's command line. Data directories can be overridden (`ovmf_dir`, `seabios_dir`) for tests.
"""

from __future__ import annotations

import enum
import os
import shutil
import tempfile
from dataclasses import dataclass

from cocon.vmm.errors import VmmError

__all__ = [
    "OVMF_CODE",
    "OVMF_DIR",
    "OVMF_VARS",
    "SEABIOS_BIN",
    "SEABIOS_DIR",
    "VARS_FILE",
    "Firmware",
    "FirmwareError",
    "FirmwareSpec",
    "parse_firmware",
    "resolve_firmware",
]

OVMF_DIR = "/usr/share/OVMF"
OVMF_CODE = "OVMF_CODE_4M.fd"
OVMF_VARS = "OVMF_VARS_4M.fd"
SEABIOS_DIR = "/usr/share/seabios"
SEABIOS_BIN = "bios-256k.bin"
#: The per-VM UEFI variable store, in the VM's vars_dir.
VARS_FILE = "uefi-vars.fd"


class FirmwareError(VmmError):
    """The firmware asked for is unknown, not installed, or its per-VM variable store is unusable."""


class Firmware(enum.StrEnum):
    BIOS = "bios"
    UEFI = "uefi"


def parse_firmware(kind: str | Firmware) -> Firmware:
    """`bios` or `uefi` (any case) -> Firmware; anything else is a FirmwareError listing the choices."""
    if isinstance(kind, Firmware):
        return kind
    try:
        return Firmware(str(kind).strip().lower())
    except ValueError:
        choices = ", ".join(f.value for f in Firmware)
        raise FirmwareError(f"unknown firmware {kind!r}: use one of {choices}") from None


@dataclass(frozen=True)
class FirmwareSpec:
    """What QEMU needs for one VM's firmware.

    `args`: QEMU arguments to add (empty for SeaBIOS, QEMU's default); `code`: the firmware image;
    `vars`: the VM's own UEFI variable store (None for bios); `machine`: the machine type to use."""

    kind: Firmware
    args: tuple[str, ...]
    code: str
    vars: str | None
    machine: str = "q35"

    def qemu_args(self) -> list[str]:
        """`args` as a new list, to extend a QEMU command line with."""
        return list(self.args)


def _qemu_value(path: str) -> str:
    """A path as a QEMU option value: a comma would end the value, so it is doubled."""
    return path.replace(",", ",,")


def _installed(path: str, what: str, package: str) -> None:
    if not os.path.isfile(path):
        raise FirmwareError(
            f"firmware {what} is not installed ({path} is missing): apt-get install {package}"
        )


def resolve_firmware(
    kind: str | Firmware,
    vars_dir: str,
    *,
    ovmf_dir: str = OVMF_DIR,
    seabios_dir: str = SEABIOS_DIR,
) -> FirmwareSpec:
    """Check the firmware `kind` is installed and return its QEMU arguments. For uefi, the VM's variable
    store `vars_dir/uefi-vars.fd` is copied from OVMF's template if it does not exist yet (atomically;
    `vars_dir` is created, mode 0700), and reused as is otherwise."""
    firmware = parse_firmware(kind)
    if firmware is Firmware.BIOS:
        bios = os.path.join(seabios_dir, SEABIOS_BIN)
        _installed(bios, "bios", "seabios")
        return FirmwareSpec(kind=firmware, args=(), code=bios, vars=None)

    code = os.path.join(ovmf_dir, OVMF_CODE)
    template = os.path.join(ovmf_dir, OVMF_VARS)
    _installed(code, "uefi", "ovmf")
    _installed(template, "uefi", "ovmf")
    vars_path = _vm_vars(template, vars_dir)
    args = (
        "-drive",
        f"if=pflash,format=raw,unit=0,readonly=on,file={_qemu_value(code)}",
        "-drive",
        f"if=pflash,format=raw,unit=1,file={_qemu_value(vars_path)}",
    )
    return FirmwareSpec(kind=firmware, args=args, code=code, vars=vars_path)


def _vm_vars(template: str, vars_dir: str) -> str:
    try:
        os.makedirs(vars_dir, mode=0o700, exist_ok=True)
    except OSError as e:
        raise FirmwareError(
            f"cannot create the UEFI variable directory {vars_dir}: {e.strerror or e}"
        ) from None
    path = os.path.join(os.path.abspath(vars_dir), VARS_FILE)
    template_size = os.path.getsize(template)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        pass
    else:
        if not os.path.isfile(path):
            raise FirmwareError(f"the UEFI variable store {path} is not a regular file: remove it")
        if st.st_size != template_size:
            raise FirmwareError(
                f"the UEFI variable store {path} is {st.st_size} bytes, not {template_size} like {template}: "
                "it is damaged or from another OVMF build; remove it to reset the VM's UEFI variables"
            )
        return path
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix="." + VARS_FILE + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as out, open(template, "rb") as src:
            shutil.copyfileobj(src, out)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        if isinstance(e, OSError):
            raise FirmwareError(f"cannot create the UEFI variable store {path}: {e.strerror or e}") from None
        raise
    return path
