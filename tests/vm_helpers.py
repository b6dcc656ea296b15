"""Helpers for tests that start QEMU (directly or through microVMs): find the processes of a test by a
marker in their command line (its temporary directory, a run directory, an instance id), and kill
them, so that no test leaves a VM behind."""

from __future__ import annotations

import os
import signal


def processes_naming(marker: str, program: bytes = b"qemu-system") -> list[int]:
    """Live processes whose program name contains `program` and whose command line mentions `marker`."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if argv and program in argv[0] and any(marker.encode() in a for a in argv):
            pids.append(int(entry))
    return pids


def kill_processes(marker: str, program: bytes = b"qemu-system") -> list[int]:
    """SIGKILL what `processes_naming` finds; the pids that were still there."""
    pids = processes_naming(marker, program)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return pids
