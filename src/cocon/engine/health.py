"""HEALTHCHECK: Docker's health checks of running containers, run by the monitor.

The check comes from the create body's `Healthcheck` (`--health-cmd`, `--health-interval`,
`--health-timeout`, `--health-retries`, `--health-start-period`; `--no-healthcheck` = Test ["NONE"])
over the image's `Healthcheck` (field by field, as Docker). Test is ["CMD", args...] or
["CMD-SHELL", "command"] (run by /bin/sh -c). Durations are nanoseconds; defaults 30 s interval,
30 s timeout, 3 retries, no start period.

The state lives in the record's config (`Health`, Docker's inspect `State.Health`): Status
`starting` until the first success (failures during the start period do not count), `healthy`
after a success, `unhealthy` after `Retries` failures in a row; the last 5 results in `Log`.
"""

from __future__ import annotations

import os
import time

from cocon._typing import TYPE_CHECKING

if TYPE_CHECKING:
    from typing import Any

    from cocon.engine.instances import InstanceRecord
    from cocon.engine.supervisor import Supervisor

NS = 1_000_000_000
DEFAULTS = {"Interval": 30 * NS, "Timeout": 30 * NS, "Retries": 3, "StartPeriod": 0}
KEEP = 5
MAX_OUTPUT = 4096


def effective(sup: Supervisor, rec: InstanceRecord) -> dict[str, Any] | None:
    """The health check of a container (None when it has none or it is disabled)."""
    own = rec.config["Create"].get("Healthcheck") or {}
    image = sup._image_config(rec.image).get("Healthcheck") or {}
    hc: dict[str, Any] = {}
    for key in ("Test", "Interval", "Timeout", "Retries", "StartPeriod"):
        value = own.get(key) if own.get(key) else image.get(key)
        hc[key] = value if value else DEFAULTS.get(key)
    test = hc.get("Test") or []
    if not test or test[0] == "NONE" or (own.get("Test") or [None])[0] == "NONE":
        return None
    return hc


def command(hc: dict[str, Any]) -> list[str]:
    test = [str(t) for t in hc["Test"]]
    if test[0] == "CMD-SHELL":
        return ["/bin/sh", "-c", " ".join(test[1:])]
    if test[0] == "CMD":
        return test[1:]
    return test


def check_due(sup: Supervisor, rec: InstanceRecord) -> dict[str, Any] | None:
    hc = effective(sup, rec)
    if hc is None:
        return None
    health = rec.config.get("Health") or {}
    log = health.get("Log") or []
    last = log[-1]["EndUnix"] if log else (rec.started or time.time())
    return hc if time.time() - last >= hc["Interval"] / NS else None


def run_check(sup: Supervisor, rec: InstanceRecord, hc: dict[str, Any]) -> dict[str, Any]:
    """Run one check now; record and return the health state."""
    import subprocess

    from cocon.engine.supervisor import find_runtime

    start = time.time()
    args = [find_runtime(), "--root", os.path.join(sup.e.run_dir, "runtime"), "exec", rec.id, *command(hc)]
    try:
        proc = subprocess.run(args, stdin=subprocess.DEVNULL, capture_output=True,
                              timeout=hc["Timeout"] / NS)  # fmt: skip
        code = proc.returncode
        out = (proc.stdout + proc.stderr)[:MAX_OUTPUT].decode(errors="replace")
    except subprocess.TimeoutExpired:
        code, out = -1, f"Health check exceeded timeout ({hc['Timeout'] / NS:g}s)"
    except OSError as exc:
        code, out = -1, str(exc)
    end = time.time()
    try:
        rec = sup.e.instances.get(rec.id)
    except Exception:
        return {}
    if rec.status != "running":
        return {}
    cfg = rec.config
    health = dict(cfg.get("Health") or {"Status": "starting", "FailingStreak": 0, "Log": []})
    in_start_period = (start - (rec.started or start)) < hc["StartPeriod"] / NS
    if code == 0:
        health["Status"], health["FailingStreak"] = "healthy", 0
    elif not in_start_period:
        health["FailingStreak"] = int(health.get("FailingStreak", 0)) + 1
        if health["FailingStreak"] >= int(hc["Retries"]):
            health["Status"] = "unhealthy"
    entry = {"Start": _rfc3339(start), "End": _rfc3339(end), "ExitCode": code, "Output": out,
             "EndUnix": end}  # fmt: skip
    health["Log"] = [*(health.get("Log") or []), entry][-KEEP:]
    cfg["Health"] = health
    sup.e.instances.update(rec.id, config=cfg)
    return health


def status_suffix(rec: InstanceRecord) -> str:
    """ " (healthy)" etc. for `ps`'s STATUS column."""
    health = rec.config.get("Health")
    if not health:
        return ""
    status = health.get("Status")
    return " (health: starting)" if status == "starting" else f" ({status})"


def inspect_state(rec: InstanceRecord) -> dict[str, Any] | None:
    health = rec.config.get("Health")
    if not health:
        return None
    return {
        "Status": health.get("Status", "starting"),
        "FailingStreak": health.get("FailingStreak", 0),
        "Log": [{k: v for k, v in e.items() if k != "EndUnix"} for e in health.get("Log") or []],
    }


def _rfc3339(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int((t % 1) * 1e9):09d}Z"
