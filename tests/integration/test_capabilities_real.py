"""Capabilities applied to real (forked) processes: the five sets, user switch, and their effect.

Each case runs in a child made with os.fork() (capabilities dropped from the bounding set never
come back), which reports over a pipe as JSON and always ends with os._exit.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
import traceback
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from cocon.oci.runtime_spec import Capabilities
from cocon.runtime import capabilities as caps
from cocon.runtime.errors import CapabilityError

UID = GID = 1000
C = caps.CAPABILITIES


def run_in_child(fn: Callable[[], Any]) -> tuple[int, Any]:
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        code = 0
        try:
            os.close(r)
            payload = json.dumps({"result": fn()})
        except BaseException:
            payload = json.dumps({"error": traceback.format_exc()})
            code = 1
        try:
            os.write(w, payload.encode())
        finally:
            os._exit(code)
    os.close(w)
    chunks = []
    try:
        while chunk := os.read(r, 65536):
            chunks.append(chunk)
    finally:
        os.close(r)
        _, status = os.waitpid(pid, 0)
    data = b"".join(chunks)
    return status, json.loads(data) if data else None


def result_of(fn: Callable[[], Any]) -> Any:
    status, out = run_in_child(fn)
    assert out is not None, f"child died: status {status:#x}"
    assert "error" not in out, out["error"]
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
    return out["result"]


def status_caps(text: str | None = None) -> dict[str, int]:
    if text is None:
        with open("/proc/self/status") as f:
            text = f.read()
    out = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
            out[key] = int(value.strip(), 16)
    return out


def switch_to(uid: int, gid: int) -> Callable[[], None]:
    def switch() -> None:
        os.setgroups([])
        os.setgid(gid)
        os.setuid(uid)

    return switch


def no_switch() -> None:
    pass


def m(*names: str) -> int:
    return caps.mask(C[n] for n in names)


@pytest.fixture
def workdir() -> Iterator[str]:
    d = tempfile.mkdtemp(prefix="cocon-caps-")
    os.chmod(d, 0o755)  # reachable by uid 1000 without CAP_DAC_*
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def test_reduced_set_after_setuid(workdir: str) -> None:
    owned = os.path.join(workdir, "owned")
    secret = os.path.join(workdir, "secret")
    for path, mode in ((owned, 0o644), (secret, 0o600)):
        with open(path, "w") as f:
            f.write("x")
        os.chmod(path, mode)
    bounding = [
        "CAP_CHOWN",
        "CAP_DAC_OVERRIDE",
        "CAP_KILL",
        "CAP_NET_BIND_SERVICE",
        "CAP_SETUID",
        "CAP_SETGID",
    ]
    resolved = caps.resolve(
        Capabilities(
            bounding=bounding,
            effective=["CAP_CHOWN", "CAP_KILL"],
            permitted=["CAP_CHOWN", "CAP_KILL", "CAP_NET_BIND_SERVICE"],
            inheritable=["CAP_KILL", "CAP_NET_BIND_SERVICE"],
            ambient=["CAP_NET_BIND_SERVICE"],
        )
    )

    def child() -> dict[str, Any]:
        caps.apply(resolved, switch_to(UID, GID))
        return {
            "ids": [os.getuid(), os.geteuid(), os.getgid(), os.getgroups()],
            "status": status_caps(),
            "chown": _errno_of(lambda: os.chown(owned, 2000, 2000)),
            "read_secret": _errno_of(lambda: open(secret).close()),  # DAC_OVERRIDE is only in bounding
        }

    r = result_of(child)
    assert r["ids"] == [UID, UID, GID, []]
    st = r["status"]
    assert st["CapBnd"] == m(*bounding)
    assert st["CapEff"] == m("CAP_CHOWN", "CAP_KILL")
    assert st["CapPrm"] == m("CAP_CHOWN", "CAP_KILL", "CAP_NET_BIND_SERVICE")
    assert st["CapInh"] == m("CAP_KILL", "CAP_NET_BIND_SERVICE")
    assert st["CapAmb"] == m("CAP_NET_BIND_SERVICE")
    assert r["chown"] == 0  # uid 1000 gave away a root-owned file: CAP_CHOWN works
    assert os.stat(owned).st_uid == 2000
    assert r["read_secret"] == errno.EACCES


def test_without_chown_capability_chown_fails_even_for_root(workdir: str) -> None:
    path = os.path.join(workdir, "f")
    with open(path, "w") as f:
        f.write("x")
    held = status_caps()["CapBnd"]  # e.g. this host withholds CAP_SYS_RESOURCE
    everything_but_chown = [n for n, v in C.items() if held >> v & 1 and n != "CAP_CHOWN"]
    resolved = caps.resolve(
        Capabilities(
            bounding=everything_but_chown, effective=everything_but_chown, permitted=everything_but_chown
        )
    )

    def child() -> dict[str, Any]:
        caps.apply(resolved, no_switch)
        return {
            "uid": os.getuid(),
            "chown": _errno_of(lambda: os.chown(path, 2000, 2000)),
            "chmod": _errno_of(lambda: os.chmod(path, 0o600)),
            "eff": status_caps()["CapEff"],
        }

    r = result_of(child)
    assert r["uid"] == 0
    assert r["chown"] == errno.EPERM
    assert r["chmod"] == 0
    assert not r["eff"] >> C["CAP_CHOWN"] & 1
    assert os.stat(path).st_uid == 0


def test_bounding_set_is_dropped_for_good() -> None:
    resolved = caps.resolve(
        Capabilities(bounding=["CAP_KILL"], effective=["CAP_KILL"], permitted=["CAP_KILL"])
    )

    def child() -> dict[str, Any]:
        caps.apply(resolved, no_switch)
        try:
            caps.capset(m("CAP_KILL", "CAP_SYS_ADMIN"), m("CAP_KILL", "CAP_SYS_ADMIN"), 0)
            regained = True
        except OSError:
            regained = False
        return {"bnd": status_caps()["CapBnd"], "regained": regained}

    r = result_of(child)
    assert r["bnd"] == m("CAP_KILL")
    assert r["regained"] is False


def test_ambient_capability_survives_exec_as_non_root() -> None:
    resolved = caps.resolve(
        Capabilities(
            bounding=["CAP_NET_BIND_SERVICE", "CAP_CHOWN"],
            effective=["CAP_NET_BIND_SERVICE", "CAP_CHOWN"],
            permitted=["CAP_NET_BIND_SERVICE", "CAP_CHOWN"],
            inheritable=["CAP_NET_BIND_SERVICE"],
            ambient=["CAP_NET_BIND_SERVICE"],
        )
    )
    after = _exec_cat_status(resolved, switch_to(UID, GID))
    assert after["CapAmb"] == m("CAP_NET_BIND_SERVICE")
    assert after["CapEff"] == after["CapPrm"] == m("CAP_NET_BIND_SERVICE")  # CAP_CHOWN is lost on exec
    assert after["CapBnd"] == m("CAP_NET_BIND_SERVICE", "CAP_CHOWN")


def test_non_root_without_ambient_has_nothing_after_exec() -> None:
    resolved = caps.resolve(
        Capabilities(bounding=["CAP_CHOWN"], effective=["CAP_CHOWN"], permitted=["CAP_CHOWN"])
    )
    after = _exec_cat_status(resolved, switch_to(UID, GID))
    assert after["CapEff"] == after["CapPrm"] == after["CapAmb"] == 0


def test_root_keeps_bounding_capabilities_across_exec() -> None:
    docker = list(caps.DOCKER_DEFAULT_CAPABILITIES)
    resolved = caps.resolve(Capabilities(bounding=docker, effective=docker, permitted=docker))
    after = _exec_cat_status(resolved, no_switch)
    assert after["CapEff"] == after["CapPrm"] == after["CapBnd"] == m(*docker)
    assert after["CapInh"] == after["CapAmb"] == 0


def _exec_cat_status(resolved: caps.ResolvedCaps, switch: Callable[[], None]) -> dict[str, int]:
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: apply, then exec cat with stdout on the pipe
        try:
            os.close(r)
            os.dup2(w, 1)
            caps.apply(resolved, switch)
            os.execv("/bin/cat", ["cat", "/proc/self/status"])
        finally:
            os._exit(127)
    os.close(w)
    chunks = []
    try:
        while chunk := os.read(r, 65536):
            chunks.append(chunk)
    finally:
        os.close(r)
        _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, f"status {status:#x}"
    return status_caps(b"".join(chunks).decode())


def test_unchanged_when_the_spec_has_no_capabilities() -> None:
    before = status_caps()

    def child() -> dict[str, int]:
        caps.apply(caps.resolve(None), no_switch)
        return status_caps()

    assert result_of(child) == before


def test_switch_user_runs_even_when_unchanged() -> None:
    def child() -> list[int]:
        caps.apply(caps.resolve(None), switch_to(UID, GID))
        return [os.getuid(), status_caps()["CapEff"]]

    assert result_of(child) == [UID, 0]  # the kernel clears caps on setuid without keepcaps


def test_effective_outside_permitted_is_explained() -> None:
    resolved = caps.resolve(
        Capabilities(
            bounding=["CAP_KILL", "CAP_CHOWN"], effective=["CAP_KILL", "CAP_CHOWN"], permitted=["CAP_KILL"]
        )
    )

    def child() -> str:
        try:
            caps.apply(resolved, no_switch)
        except CapabilityError as exc:
            return str(exc)
        return "applied"

    msg = result_of(child)
    assert msg.startswith("process.capabilities: capset failed")
    assert "effective has CAP_CHOWN which permitted lacks" in msg


def test_capget_matches_proc() -> None:
    eff, prm, inh = caps.capget()
    st = status_caps()
    assert (eff, prm, inh) == (st["CapEff"], st["CapPrm"], st["CapInh"])


def _errno_of(fn: Callable[[], object]) -> int:
    try:
        fn()
    except OSError as exc:
        return exc.errno or -1
    return 0
