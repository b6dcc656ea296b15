"""Runtime-spec hooks: run a hook program with the container state as JSON on its stdin."""

from __future__ import annotations

import sys

from cocon import _fastjson as json
from cocon._typing import TYPE_CHECKING
from cocon.runtime.errors import RuntimeFailure

if TYPE_CHECKING:
    from typing import Any

    from cocon.oci.runtime_spec import Hook


def run_hooks(kind: str, hooks: list[Hook] | None, state: dict[str, Any], *, fatal: bool = True) -> None:
    """Run each hook in order. A failing hook raises when `fatal`, else prints a warning and goes on
    (the spec's rule for poststart and poststop)."""
    payload = json.dumps(state).encode()
    for i, hook in enumerate(hooks or ()):
        try:
            run_hook(hook, payload)
        except RuntimeFailure as exc:
            msg = f"hooks.{kind}[{i}] ({hook.path}): {exc}"
            if fatal:
                raise RuntimeFailure(msg) from None
            print(f"cocon-runtime: warning: {msg}", file=sys.stderr)


def run_hook(hook: Hook, payload: bytes) -> None:
    import subprocess

    args = hook.args or [hook.path]
    env = dict(e.split("=", 1) for e in hook.env or [])
    try:
        proc = subprocess.run(
            args,
            executable=hook.path,
            input=payload,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            timeout=hook.timeout,
            close_fds=True,
        )
    except subprocess.TimeoutExpired:
        raise RuntimeFailure(f"timed out after {hook.timeout}s") from None
    except OSError as exc:
        raise RuntimeFailure(f"cannot run: {exc.strerror}") from None
    if proc.returncode != 0:
        out = proc.stdout.decode(errors="replace").strip()
        how = f"exit status {proc.returncode}" if proc.returncode > 0 else f"signal {-proc.returncode}"
        raise RuntimeFailure(f"failed with {how}" + (f": {out}" if out else ""))
