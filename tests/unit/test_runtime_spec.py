"""config.json parsing and validation: each rule gives an error naming the field."""

from __future__ import annotations

import json

import pytest

from cocon.oci.errors import ConfigError
from cocon.oci.runtime_spec import encode_config, parse_config
from cocon.runtime.defaults import default_spec


def config(**overrides: object) -> bytes:
    doc = json.loads(encode_config(default_spec(args=["true"], terminal=False)))
    for dotted, value in overrides.items():
        *path, last = dotted.split("__")
        target = doc
        for key in path:
            target = target.setdefault(key, {})
        target[last] = value
    return json.dumps(doc).encode()


def test_default_spec_round_trips() -> None:
    spec = parse_config(config())
    assert spec.process is not None and spec.process.args == ["true"]
    assert spec.linux is not None and spec.linux.seccomp is not None
    assert parse_config(encode_config(spec)) == spec


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"ociVersion": "2.0.0"}, "ociVersion"),
        ({"process__cwd": "relative"}, "process.cwd"),
        ({"process__env": ["NOEQUALS"]}, "process.env[0]"),
        ({"process__rlimits": [{"type": "RLIMIT_BOGUS", "soft": 1, "hard": 1}]}, "process.rlimits[0].type"),
        ({"process__rlimits": [{"type": "RLIMIT_NOFILE", "soft": 9, "hard": 1}]}, "process.rlimits[0]"),
        ({"process__oomScoreAdj": 5000}, "process.oomScoreAdj"),
        ({"mounts": [{"destination": "rel", "type": "tmpfs"}]}, "mounts[0].destination"),
        (
            {"linux__namespaces": [{"type": "pid"}, {"type": "pid"}, {"type": "mount"}]},
            "linux.namespaces[1].type",
        ),
        ({"linux__namespaces": [{"type": "pid"}]}, "linux.namespaces"),
        ({"linux__namespaces": [{"type": "mount"}, {"type": "bogus"}]}, "linux.namespaces[1].type"),
        ({"linux__rootfsPropagation": "sideways"}, "linux.rootfsPropagation"),
        ({"linux__sysctl": {"kernel.panic": "1"}}, "linux.sysctl.kernel.panic"),
        ({"linux__devices": [{"type": "x", "path": "/dev/x"}]}, "linux.devices[0].type"),
        ({"linux__seccomp": {"defaultAction": "SCMP_ACT_NOPE"}}, "linux.seccomp.defaultAction"),
        ({"linux__resources": {"pids": {"limit": 0}}}, "linux.resources.pids.limit"),
        ({"linux__uidMappings": [{"containerID": 0, "hostID": 1, "size": 1}]}, "linux.uidMappings"),
        ({"hooks": {"prestart": [{"path": "relative"}]}}, "hooks.prestart[0].path"),
        ({"process__user": {"uid": "root"}}, "$.process.user.uid"),
    ],
)
def test_invalid_configs_name_the_field(overrides: dict[str, object], field: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(config(**overrides))
    assert field in str(info.value)


def test_not_json() -> None:
    with pytest.raises(ConfigError, match="not valid JSON"):
        parse_config(b"{")
