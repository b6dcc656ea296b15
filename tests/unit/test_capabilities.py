"""Capability name resolution and validation (no capability is changed here)."""

from __future__ import annotations

import pytest

from cocon.oci.runtime_spec import Capabilities
from cocon.runtime import capabilities as caps
from cocon.runtime.errors import CapabilityError


def test_table_is_complete_and_numbered_like_the_kernel() -> None:
    assert sorted(caps.CAPABILITIES.values()) == list(range(41))
    assert caps.CAPABILITIES["CAP_CHOWN"] == 0
    assert caps.CAPABILITIES["CAP_SYS_ADMIN"] == 21
    assert caps.CAPABILITIES["CAP_CHECKPOINT_RESTORE"] == 40
    assert caps.CAPABILITY_NAMES[13] == "CAP_NET_RAW"


def test_docker_default_set() -> None:
    assert len(caps.DOCKER_DEFAULT_CAPABILITIES) == 14
    assert set(caps.DOCKER_DEFAULT_CAPABILITIES) <= set(caps.CAPABILITIES)
    assert "CAP_SYS_ADMIN" not in caps.DOCKER_DEFAULT_CAPABILITIES
    assert caps.DOCKER_DEFAULT_CAPABILITIES[0] == "CAP_CHOWN"
    assert caps.DOCKER_DEFAULT_CAPABILITIES[-1] == "CAP_AUDIT_WRITE"


def test_last_cap_reads_the_kernel() -> None:
    with open("/proc/sys/kernel/cap_last_cap") as f:
        assert caps.last_cap() == int(f.read())


def test_mask() -> None:
    assert caps.mask([]) == 0
    assert caps.mask([0, 5, 40]) == (1 << 0) | (1 << 5) | (1 << 40)


def test_resolve_none_leaves_capabilities_alone() -> None:
    r = caps.resolve(None)
    assert r.unchanged
    assert r.bounding == frozenset()


def test_resolve_sets() -> None:
    r = caps.resolve(
        Capabilities(
            bounding=["CAP_CHOWN", "CAP_KILL", "CAP_NET_BIND_SERVICE"],
            effective=["CAP_KILL"],
            permitted=["CAP_KILL", "CAP_CHOWN"],
            inheritable=["CAP_KILL"],
            ambient=["CAP_KILL"],
        )
    )
    assert not r.unchanged
    assert r.bounding == {0, 5, 10}
    assert r.effective == {5}
    assert r.permitted == {0, 5}
    assert r.inheritable == {5}
    assert r.ambient == {5}
    assert r.ignored == ()
    assert r.names("bounding") == ["CAP_CHOWN", "CAP_KILL", "CAP_NET_BIND_SERVICE"]


def test_missing_sets_are_empty() -> None:
    r = caps.resolve(Capabilities(bounding=["CAP_CHOWN"]))
    assert r.bounding == {0}
    assert r.effective == r.permitted == r.inheritable == r.ambient == frozenset()


def test_duplicates_are_harmless() -> None:
    r = caps.resolve(Capabilities(bounding=["CAP_CHOWN", "CAP_CHOWN"]))
    assert r.bounding == {0}


def test_unknown_name_names_the_field() -> None:
    with pytest.raises(CapabilityError) as ei:
        caps.resolve(Capabilities(bounding=["CAP_CHOWN", "CAP_KILL", "CAP_SETUID", "CAP_FOO"]))
    msg = str(ei.value)
    assert msg.startswith('process.capabilities.bounding[3]: unknown capability "CAP_FOO"')
    assert "capabilities(7)" in msg


@pytest.mark.parametrize("which", ["effective", "inheritable", "permitted", "ambient"])
def test_unknown_name_in_each_set(which: str) -> None:
    with pytest.raises(CapabilityError, match=rf"process\.capabilities\.{which}\[0\]"):
        caps.resolve(Capabilities(**{which: ["NOT_A_CAP"]}))


def test_hint_for_lowercase_and_missing_prefix() -> None:
    with pytest.raises(CapabilityError, match='did you mean "CAP_NET_ADMIN"'):
        caps.resolve(Capabilities(bounding=["net_admin"]))
    with pytest.raises(CapabilityError, match='did you mean "CAP_SYS_ADMIN"'):
        caps.resolve(Capabilities(effective=["SYS_ADMIN"]))
    with pytest.raises(CapabilityError, match="has no ALL"):
        caps.resolve(Capabilities(bounding=["ALL"]))


def test_capability_unknown_to_the_kernel_is_dropped(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(caps, "_last_cap", 37)  # a 5.8-era kernel: no PERFMON, BPF, CHECKPOINT_RESTORE
    r = caps.resolve(Capabilities(bounding=["CAP_CHOWN", "CAP_BPF", "CAP_PERFMON"], effective=["CAP_BPF"]))
    assert r.bounding == {0}
    assert r.effective == frozenset()
    assert any(s.startswith("CAP_BPF") for s in r.ignored)
    assert any(s.startswith("CAP_PERFMON") for s in r.ignored)
    assert len(r.ignored) == 2  # listed once even when named in several sets


def test_ambient_needs_permitted_and_inheritable() -> None:
    r = caps.resolve(
        Capabilities(
            bounding=["CAP_KILL", "CAP_CHOWN"],
            permitted=["CAP_KILL", "CAP_CHOWN"],
            inheritable=["CAP_KILL"],
            ambient=["CAP_KILL", "CAP_CHOWN"],
        )
    )
    assert r.ambient == {5}
    assert any("ambient CAP_CHOWN" in s for s in r.ignored)


def test_import_is_cheap() -> None:
    import subprocess
    import sys

    code = (
        "import sys, cocon.runtime.capabilities; "
        "bad = [m for m in ('msgspec', 'seccomp') if m in sys.modules]; "
        "print(','.join(bad))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
