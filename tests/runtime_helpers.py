"""Helpers for tests that drive the real `cocon-runtime` binary on real busybox bundles."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from cocon.oci.runtime_spec import Spec, encode_config
from cocon.runtime.defaults import default_spec

BIN_DIR = os.path.dirname(sys.executable)
COCON_RUNTIME = os.path.join(BIN_DIR, "cocon-runtime")
TEST_CGROUP_PARENT = "/cocon-test"


def unique_id(prefix: str = "t") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


@dataclass
class RuntimeCLI:
    """Runs cocon-runtime with its own --root and remembers every container id it was given."""

    root: str
    ids: list[str] = field(default_factory=list)

    def __call__(
        self, *args: str, check: bool = True, timeout: float = 60, input: str | None = None, **kw: Any
    ) -> subprocess.CompletedProcess[str]:
        # Files, not pipes: a detached container keeps the stdio it inherited, and reading a pipe to
        # its end would wait for the container to exit.
        with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
            proc = subprocess.run(
                [COCON_RUNTIME, "--root", self.root, *args],
                stdout=out,
                stderr=err,
                text=True,
                timeout=timeout,
                input=input,
                **kw,
            )
            out.seek(0)
            err.seek(0)
            proc.stdout, proc.stderr = out.read(), err.read()
        if check and proc.returncode != 0:
            raise AssertionError(
                f"cocon-runtime {' '.join(args)} exited {proc.returncode}\n"
                f"stdout: {proc.stdout}\nstderr: {proc.stderr}"
            )
        return proc

    def state(self, cid: str) -> dict[str, Any]:
        result: dict[str, Any] = json.loads(self("state", cid).stdout)
        return result

    def cleanup(self) -> None:
        for cid in self.ids:
            subprocess.run([COCON_RUNTIME, "--root", self.root, "delete", "--force", cid],
                           capture_output=True, timeout=60, check=False)  # fmt: skip


@dataclass
class Bundle:
    path: str
    id: str
    spec: Spec

    def write(self) -> None:
        with open(os.path.join(self.path, "config.json"), "wb") as f:
            f.write(encode_config(self.spec))

    @property
    def cgroups_path(self) -> str:
        assert self.spec.linux is not None and self.spec.linux.cgroups_path is not None
        return self.spec.linux.cgroups_path


BundleFactory = Callable[..., Bundle]


def make_bundle(
    base_dir: str,
    rootfs: str,
    rt: RuntimeCLI,
    *args: str,
    terminal: bool = False,
    edit: Callable[[Spec], None] | None = None,
) -> Bundle:
    cid = unique_id()
    path = os.path.join(base_dir, cid)
    os.makedirs(path)
    spec = default_spec(args=list(args) or ["true"], terminal=terminal)
    assert spec.root is not None and spec.linux is not None
    spec.root.path = rootfs
    spec.linux.cgroups_path = f"{TEST_CGROUP_PARENT}/{cid}"
    if edit is not None:
        edit(spec)
    bundle = Bundle(path, cid, spec)
    bundle.write()
    rt.ids.append(cid)
    return bundle


def leftover_cgroup_dirs(cgroups_path: str) -> list[str]:
    """Every directory of this cgroup path that still exists in any mounted hierarchy."""
    rel = cgroups_path.lstrip("/")
    found = glob.glob(f"/sys/fs/cgroup/*/{rel}") + glob.glob(f"/sys/fs/cgroup/{rel}")
    return [p for p in found if os.path.isdir(p)]


def host_mounts_mentioning(text: str) -> list[str]:
    with open("/proc/self/mountinfo") as f:
        return [line for line in f if text in line]
