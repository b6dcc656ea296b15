"""Pure parts of cocon-runtime: mount option parsing, signal names, container ids, process status."""

from __future__ import annotations

import os

import pytest

from cocon import _linux as L
from cocon.runtime.container import parse_signal
from cocon.runtime.errors import RuntimeFailure
from cocon.runtime.rootfs import MountOptions
from cocon.runtime.state import process_start_time, validate_id


def test_mount_options_split_flags_propagation_and_data() -> None:
    opts = MountOptions(["nosuid", "ro", "rw", "noexec", "rbind", "rslave", "mode=755", "size=64k"])
    assert opts.flags == L.MS_NOSUID | L.MS_NOEXEC | L.MS_BIND | L.MS_REC
    assert opts.propagation == [L.MS_SLAVE | L.MS_REC]
    assert opts.data == "mode=755,size=64k"
    assert opts.is_bind


def test_unsupported_mount_option_is_an_error() -> None:
    with pytest.raises(RuntimeFailure, match="idmap"):
        MountOptions(["idmap"])


@pytest.mark.parametrize("value, expected", [("KILL", 9), ("SIGTERM", 15), ("9", 9), ("hup", 1)])
def test_parse_signal(value: str, expected: int) -> None:
    assert parse_signal(value) == expected


@pytest.mark.parametrize("value", ["SIGNOPE", "0", "999", ""])
def test_parse_signal_rejects(value: str) -> None:
    with pytest.raises(RuntimeFailure, match="unknown signal"):
        parse_signal(value)


@pytest.mark.parametrize("cid", ["../x", "a/b", "", ".hidden", "x" * 200])
def test_invalid_ids(cid: str) -> None:
    with pytest.raises(RuntimeFailure, match="invalid container id"):
        validate_id(cid)


def test_process_start_time_tells_live_from_gone() -> None:
    assert process_start_time(os.getpid()) is not None
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    assert process_start_time(pid) is None
