"""The starter config.json of `cocon-runtime spec`, and the `features` document.

The starter config is at least as strict as runc's and Docker's defaults: runc's three capabilities,
Docker's seccomp profile, no_new_privs, Docker's masked and read-only paths, and a read-only rootfs.
"""

from __future__ import annotations

import os

from cocon._typing import TYPE_CHECKING

if TYPE_CHECKING:
    from typing import Any

from cocon.oci.runtime_spec import (
    OCI_VERSION,
    Capabilities,
    DeviceCgroup,
    IDMapping,
    Linux,
    Mount,
    Namespace,
    Process,
    Resources,
    Rlimit,
    Root,
    Spec,
    User,
    encode_config,
)
from cocon.runtime.errors import RuntimeFailure

SPEC_CAPABILITIES = ["CAP_AUDIT_WRITE", "CAP_KILL", "CAP_NET_BIND_SERVICE"]


def default_spec(*, rootless: bool = False, args: list[str] | None = None, terminal: bool = True) -> Spec:
    from cocon.oci.seccomp_profiles import (
        DEFAULT_MASKED_PATHS,
        DEFAULT_READONLY_PATHS,
        docker_default_seccomp,
    )

    caps = list(SPEC_CAPABILITIES)
    namespaces = [Namespace(type=t) for t in ("pid", "network", "ipc", "uts", "mount", "cgroup")]
    mounts = [
        Mount(destination="/proc", type="proc", source="proc"),
        Mount(destination="/dev", type="tmpfs", source="tmpfs",
              options=["nosuid", "strictatime", "mode=755", "size=65536k"]),
        Mount(destination="/dev/pts", type="devpts", source="devpts",
              options=["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]),
        Mount(destination="/dev/shm", type="tmpfs", source="shm",
              options=["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]),
        Mount(destination="/dev/mqueue", type="mqueue", source="mqueue",
              options=["nosuid", "noexec", "nodev"]),
        Mount(destination="/sys", type="sysfs", source="sysfs", options=["nosuid", "noexec", "nodev", "ro"]),
        Mount(destination="/sys/fs/cgroup", type="cgroup", source="cgroup",
              options=["nosuid", "noexec", "nodev", "relatime", "ro"]),
    ]  # fmt: skip
    linux = Linux(
        namespaces=namespaces,
        resources=Resources(devices=[DeviceCgroup(allow=False, access="rwm")]),
        masked_paths=list(DEFAULT_MASKED_PATHS),
        readonly_paths=list(DEFAULT_READONLY_PATHS),
        seccomp=docker_default_seccomp(caps, os.uname().machine),
    )
    if rootless:
        uid, gid = os.getuid(), os.getgid()
        namespaces.append(Namespace(type="user"))
        linux.uid_mappings = [IDMapping(container_id=0, host_id=uid, size=1)]
        linux.gid_mappings = [IDMapping(container_id=0, host_id=gid, size=1)]
        mounts[-2] = Mount(destination="/sys", type="none", source="/sys",
                           options=["rbind", "nosuid", "noexec", "nodev", "ro"])  # fmt: skip
        mounts[2].options = [o for o in mounts[2].options or [] if o != "gid=5"]
    return Spec(
        oci_version=OCI_VERSION,
        root=Root(path="rootfs", readonly=True),
        process=Process(
            terminal=terminal,
            user=User(uid=0, gid=0),
            args=args or ["sh"],
            env=["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "TERM=xterm"],
            cwd="/",
            capabilities=Capabilities(bounding=caps, effective=caps, permitted=caps),
            rlimits=[Rlimit(type="RLIMIT_NOFILE", soft=1024, hard=1024)],
            no_new_privileges=True,
        ),
        hostname="cocon",
        mounts=mounts,
        linux=linux,
    )


def write_spec(bundle: str, *, rootless: bool = False) -> None:
    path = os.path.join(bundle, "config.json")
    if os.path.exists(path):
        raise RuntimeFailure(f"{path} exists already; remove it first or pick another --bundle")
    if not os.path.isdir(bundle):
        raise RuntimeFailure(f"--bundle {bundle}: no such directory")
    with open(path, "wb") as f:
        f.write(encode_config(default_spec(rootless=rootless)))


def features() -> dict[str, Any]:
    """What this runtime implements, in the runtime-spec's features.md format."""
    from cocon.oci.runtime_spec import NAMESPACE_TYPES, SECCOMP_ACTIONS, SECCOMP_OPS
    from cocon.runtime.capabilities import CAPABILITIES
    from cocon.runtime.rootfs import _FLAGS, PROPAGATION

    return {
        "ociVersionMin": "1.0.0",
        "ociVersionMax": OCI_VERSION,
        "hooks": ["prestart", "createRuntime", "createContainer", "startContainer", "poststart", "poststop"],
        "mountOptions": sorted([*_FLAGS, *PROPAGATION]),
        "linux": {
            "namespaces": list(NAMESPACE_TYPES),
            "capabilities": sorted(CAPABILITIES),
            "cgroup": {"v1": True, "v2": True, "systemd": False, "systemdUser": False, "rdma": False},
            "seccomp": {
                "enabled": True,
                "actions": list(SECCOMP_ACTIONS),
                "operators": list(SECCOMP_OPS),
                "archs": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"],
            },
            "apparmor": {"enabled": False},
            "selinux": {"enabled": False},
            "intelRdt": {"enabled": False},
            "mountExtensions": {"idmap": {"enabled": False}},
        },
        "annotations": {"io.cocon.runtime.version": __import__("cocon").__version__},
    }
