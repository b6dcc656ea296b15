"""The long-running part of container life cycles: restart policies and health checks.

    monitor = Monitor(engine)       # the daemon runs one
    monitor.restore()               # at daemon start: live restore + `always` containers started again
    thread = monitor.start_thread() # or: monitor.run_forever() in a thread / executor of your own
    monitor.stop()                  # run_forever returns within one interval

Each `tick()`:
1. collects detached containers whose process ended (`Supervisor.reconcile`: exit code, clean-up);
2. restarts exited containers whose policy says so, once their back-off has passed;
3. rotates logs beyond `max-size` when `max-file` > 1 (`Supervisor.rotate_log`);
4. runs due health checks (`cocon-runtime exec` of the check command, with its timeout) and records
   the health state (starting → healthy / unhealthy after `retries` failures in a row).

Restart policies (Docker's): `no`; `on-failure[:N]` (a non-zero exit, at most N restarts);
`always`; `unless-stopped`. A container stopped by the user (`stop`, `kill`, `rm -f`) is not
restarted; after a daemon restart (`restore`) `always` ones are started again and `unless-stopped`
ones are not. Back-off as Docker: 100 ms before the first restart, doubled each time, at most 1
minute; reset when the container ran at least 10 s.

Without a daemon (the CLI in-process), conmon's exit command applies the restart policy itself
(`apply_restart_policy`), sleeping the back-off in that short-lived process; when a monitor runs
(`$COCON_RUN/monitor.pid` names a live process), the exit command leaves it to the monitor.
"""

from __future__ import annotations

import os
import threading
import time

from cocon._typing import TYPE_CHECKING
from cocon.engine.errors import EngineError, NotFound

if TYPE_CHECKING:
    from typing import Any

    from cocon.engine.engine import Engine
    from cocon.engine.instances import InstanceRecord
    from cocon.engine.supervisor import Supervisor

BACKOFF_START = 0.1
BACKOFF_MAX = 60.0
BACKOFF_RESET_AFTER = 10.0
HEALTH_LOG_KEEP = 5
NS = 1_000_000_000


def restart_policy(rec: InstanceRecord) -> tuple[str, int]:
    host = rec.config["Create"].get("HostConfig") or {}
    policy = host.get("RestartPolicy") or {}
    name = str(policy.get("Name") or "no")
    count = policy.get("MaximumRetryCount") or 0
    return name, int(count) if isinstance(count, int) else 0


def parse_restart_policy(text: str) -> dict[str, Any]:
    """`--restart no|on-failure[:N]|always|unless-stopped` as Docker's RestartPolicy."""
    from cocon.engine.errors import InvalidRequest

    name, _, count = text.partition(":")
    if name not in ("no", "on-failure", "always", "unless-stopped", ""):
        raise InvalidRequest(
            f"invalid restart policy {text!r}: use no, on-failure[:N], always or unless-stopped"
        )
    if count and (name != "on-failure" or not count.isdigit()):
        raise InvalidRequest(
            f"invalid restart policy {text!r}: only on-failure takes a count, e.g. on-failure:3"
        )
    return {"Name": name or "no", "MaximumRetryCount": int(count) if count else 0}


def wants_restart(rec: InstanceRecord, *, daemon_start: bool = False) -> bool:
    name, max_count = restart_policy(rec)
    if rec.status != "exited" or name == "no" or rec.config.get("AutoRemove"):
        return False
    if rec.config.get("StoppedByUser"):
        return daemon_start and name == "always"
    if name == "on-failure":
        return (rec.exit_code or 0) != 0 and (max_count == 0 or rec.config.get("RestartCount", 0) < max_count)
    return True


def backoff(rec: InstanceRecord) -> float:
    """Seconds to wait before the next restart (see the module docstring)."""
    ran = (rec.finished or 0) - (rec.started or 0)
    streak = 0 if ran >= BACKOFF_RESET_AFTER else int(rec.config.get("BackoffStreak", 0))
    return float(min(BACKOFF_START * (2**streak), BACKOFF_MAX))


def _restart(sup: Supervisor, rec: InstanceRecord) -> bool:
    """Start it again with its restart count raised, if the record read under the container's lock
    still wants it: a user's `stop` that came in between wins (it marks the record under that lock)."""

    def bump(cur: InstanceRecord) -> dict[str, Any]:
        ran = (cur.finished or 0) - (cur.started or 0)
        cfg = cur.config
        cfg["RestartCount"] = int(cfg.get("RestartCount", 0)) + 1
        cfg["BackoffStreak"] = 0 if ran >= BACKOFF_RESET_AFTER else int(cfg.get("BackoffStreak", 0)) + 1
        return cfg

    return sup.start_for_policy(rec.id, wants_restart, bump)


def monitor_running(run_dir: str) -> bool:
    from cocon.engine.supervisor import process_start

    try:
        with open(os.path.join(run_dir, "monitor.pid")) as f:
            pid_text, _, start_text = f.read().partition(" ")
        return process_start(int(pid_text)) == int(start_text)
    except (OSError, ValueError):
        return False


def apply_restart_policy(sup: Supervisor, instance_id: str) -> bool:
    """For conmon's exit command: restart the container now (after its back-off) if its policy says
    so and no monitor runs. True when it was started again."""
    if monitor_running(sup.e.run_dir):
        return False
    try:
        rec = sup.e.instances.get(instance_id)
    except NotFound:
        return False
    if not wants_restart(rec):
        return False
    time.sleep(backoff(rec))
    try:
        rec = sup.e.instances.get(instance_id)  # the user may have acted meanwhile
    except NotFound:
        return False
    if not wants_restart(rec):
        return False
    return _restart(sup, rec)


class Monitor:
    """Restart policies and health checks of one engine's containers (see the module docstring)."""

    def __init__(self, engine: Engine, interval: float = 0.25) -> None:
        from cocon.engine.supervisor import Supervisor

        self.e = engine
        self.sup = Supervisor(engine)
        self.interval = interval
        self._stop = threading.Event()
        self._restart_at: dict[str, float] = {}
        self._thread: threading.Thread | None = None

    def _write_pidfile(self) -> None:
        from cocon.engine.supervisor import process_start

        os.makedirs(self.e.run_dir, 0o700, exist_ok=True)
        with open(os.path.join(self.e.run_dir, "monitor.pid"), "w") as f:
            # with the newline: `read` in conmon's exit command (a shell) fails at EOF without one
            f.write(f"{os.getpid()} {process_start(os.getpid()) or 0}\n")

    def restore(self) -> list[str]:
        """At daemon start: collect what ended while nobody watched, start `always` containers that
        the user had stopped, and `always`/`unless-stopped`/`on-failure` ones that ended."""
        self._write_pidfile()
        self.sup.reconcile()
        started = []
        for rec in self.e.instances.list():
            if rec.status == "exited" and wants_restart(rec, daemon_start=True):
                try:
                    cfg = rec.config
                    cfg.pop("StoppedByUser", None)
                    self.e.instances.update(rec.id, config=cfg)
                    self.sup.start(rec.id)
                    started.append(rec.id)
                except EngineError:
                    pass
        return started

    def tick(self) -> None:
        self.sup.reconcile()
        now = time.monotonic()
        for rec in self.e.instances.list():
            if rec.status == "exited" and wants_restart(rec):
                due = self._restart_at.setdefault(rec.id, now + backoff(rec))
                if now >= due:
                    self._restart_at.pop(rec.id, None)
                    try:
                        _restart(self.sup, rec)
                    except EngineError:
                        pass
            elif rec.status == "running":
                self._restart_at.pop(rec.id, None)
                if self.sup.supervised(rec):
                    self.sup.rotate_log(rec)
                self._health(rec)

    # --- health checks -------------------------------------------------------------------------------
    def _health(self, rec: InstanceRecord) -> None:
        from cocon.engine.health import check_due, run_check

        hc = check_due(self.sup, rec)
        if hc is not None:
            run_check(self.sup, rec, hc)

    # --- running -------------------------------------------------------------------------------------
    def run_forever(self) -> None:
        self._write_pidfile()
        while not self._stop.is_set():
            try:
                self.tick()
            except Exception as exc:  # one bad record must not stop the loop
                import sys

                sys.stderr.write(f"cocon monitor: {exc}\n")
            self._stop.wait(self.interval)
        try:
            os.unlink(os.path.join(self.e.run_dir, "monitor.pid"))
        except OSError:
            pass

    def start_thread(self) -> threading.Thread:
        self._stop.clear()
        self._thread = threading.Thread(target=self.run_forever, name="cocon-monitor", daemon=True)
        self._thread.start()
        return self._thread

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
