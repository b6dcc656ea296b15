"""Errors of the `vmm` layer. Each message says what is wrong and what to do about it."""

from __future__ import annotations


class VmmError(Exception):
    """Base of every error raised by cocon.vmm."""


class AssetError(VmmError):
    """Guest assets (kernel, initramfs) could not be resolved, downloaded or built."""


class QemuError(VmmError):
    """QEMU could not be started, died, or did not answer over QMP in time.

    `returncode` is QEMU's exit status when it exited (negative: killed by that signal), else None;
    `log_tail` holds the last lines of its log (stderr and serial console), if any."""

    def __init__(self, message: str, *, returncode: int | None = None, log_tail: str = "") -> None:
        super().__init__(message)
        self.returncode = returncode
        self.log_tail = log_tail
