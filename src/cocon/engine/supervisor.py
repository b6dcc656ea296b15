"""Detached containers: each one supervised by its own `conmon`, which outlives the engine.

    Supervisor(engine)
      run(body, name)      create + start detached (`cocon run -d`)
      start(id)            mount the rootfs, write the bundle, spawn conmon → `cocon-runtime create`,
                           then `start`; the record says running, with conmon's pid as supervisor
      stop(id, timeout)    the image's STOPSIGNAL (or the create body's), SIGKILL after `timeout` s
      kill(id, sig) / restart(id, timeout) / wait(id, condition) / remove(id, force, volumes)
      collect(id)          after the process ended: exit code from conmon's exit file, runtime state
                           deleted, rootfs unmounted, bundle removed, record "exited" (or removed, --rm)
      reconcile()          live restore: every record that says running but whose conmon is gone is
                           collected (exit code, finished time); running ones are left alone
      exec(...)            `cocon-runtime exec` in the container (docs/lifecycle.md)

Why conmon: it is a small C program (Debian package `conmon`, podman's supervisor) that holds the
container's stdio, writes its output to a log file (k8s-file format), keeps an attach socket and a
resize FIFO, reaps the container's init (it is a child subreaper) and writes its exit code to a file,
all in ~1 MiB of RSS per container, and none of it depends on the process that started it. A node
supervisor of our own would be one process for every container (less memory), but would need to be
written, and its death would lose every container's stdio at once; conmon makes "the engine (CLI or
daemon) may die at any time" true by construction. conmon drives cocon's own runtime through its
runc-compatible CLI (`cocon-runtime`), exactly as podman does.

Files per container:

| path | what |
|---|---|
| `$COCON_RUN/instances/<id>/`        | bundle: config.json, conmon's pid files, `attach`, `ctl`, `winsz` |
| `$COCON_RUN/exits/<id>`             | conmon's exit file (the exit code as text), until collected |
| `$COCON_ROOT/containers/<id>/container.log` | the output, k8s-file format (see cocon.engine.logs) |
| `$COCON_RUN/locks/<id>`             | flock: collect/remove/start of one container are serialized |

When the container exits, conmon runs its exit command, `python -m cocon.engine.supervisor cleanup
<id>` (a short-lived process, not a resident one), which collects it; if that fails or the node
crashed, the next engine that looks (`reconcile`, `wait`, `ps` through LocalClient) collects it.
"""

from __future__ import annotations

import os
import signal as _signal
import sys
import time

from cocon import _fastjson
from cocon._typing import TYPE_CHECKING
from cocon.engine.errors import Conflict, EngineError, InvalidRequest, NotFound, StartFailed

if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

    from cocon.engine.engine import Engine
    from cocon.engine.instances import InstanceRecord

LOG_NAME = "container.log"
DEFAULT_STOP_TIMEOUT = 10
SYNC_TIMEOUT = 30.0
VM_SYNC_TIMEOUT = 180.0


def find_conmon() -> str:
    import shutil

    path = os.environ.get("COCON_CONMON") or shutil.which("conmon") or "/usr/bin/conmon"
    if not os.access(path, os.X_OK):
        raise EngineError(
            "conmon is not installed: apt-get install conmon (it supervises detached containers)"
        )
    return path


def find_runtime(command: str = "cocon-runtime") -> str:
    """`cocon-runtime` (containers) or `cocon-microvm-runtime` (microVMs), next to python or on $PATH."""
    import shutil

    here = os.path.join(os.path.dirname(sys.executable), command)
    path = here if os.access(here, os.X_OK) else shutil.which(command)
    if not path:
        raise EngineError(f"{command} is not found next to python nor on $PATH: run scripts/setup.sh")
    return path


def process_start(pid: int) -> int | None:
    """Field 22 of /proc/<pid>/stat (start time), None when there is no such process (or only its
    zombie: a conmon that ended and whose parent has not reaped it yet)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    try:
        fields = data[data.rindex(b")") + 2 :].split()
        return None if fields[0] in (b"Z", b"X") else int(fields[19])
    except (ValueError, IndexError):
        return None


def parse_signal(value: str | int | None, default: int = _signal.SIGTERM) -> int:
    """A signal by number or name (`9`, `KILL`, `SIGKILL`)."""
    if value is None or value == "":
        return default
    if isinstance(value, int):
        sig = value
    elif value.isdigit():
        sig = int(value)
    else:
        name = value.upper()
        name = name if name.startswith("SIG") else f"SIG{name}"
        try:
            sig = int(getattr(_signal.Signals, name))
        except AttributeError:
            raise InvalidRequest(
                f"invalid signal {value!r}: give a number or a name like SIGTERM or KILL"
            ) from None
    if not 0 < sig < 65:
        raise InvalidRequest(f"invalid signal {value!r}: signals go from 1 to 64")
    return sig


class _Lock:
    """An exclusive flock on `$COCON_RUN/locks/<id>` (a class, not contextlib, to keep imports light)."""

    def __init__(self, run_dir: str, instance_id: str) -> None:
        self.path = os.path.join(run_dir, "locks", instance_id)
        self.fd = -1

    def __enter__(self) -> _Lock:
        import fcntl

        os.makedirs(os.path.dirname(self.path), 0o700, exist_ok=True)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc: object) -> None:
        os.close(self.fd)
        self.fd = -1


class Supervisor:
    """Detached containers of one engine (see the module docstring)."""

    def __init__(self, engine: Engine) -> None:
        self.e = engine

    # --- paths -----------------------------------------------------------------------------------
    def bundle(self, instance_id: str) -> str:
        return os.path.join(self.e.run_dir, "instances", instance_id)

    def exit_file(self, instance_id: str) -> str:
        return os.path.join(self.e.run_dir, "exits", instance_id)

    def log_dir(self, instance_id: str) -> str:
        return os.path.join(self.e.root, "containers", instance_id)

    def log_path(self, instance_id: str) -> str:
        return os.path.join(self.log_dir(instance_id), LOG_NAME)

    def attach_socket(self, instance_id: str) -> str:
        return os.path.join(self.bundle(instance_id), "attach")

    def lock(self, instance_id: str) -> _Lock:
        return _Lock(self.e.run_dir, instance_id)

    # --- state -----------------------------------------------------------------------------------
    def _get(self, ref: str) -> InstanceRecord:
        rec = self.e.instances.get(ref)
        self._forget(rec.id)
        return rec

    def _forget(self, instance_id: str) -> None:
        """Containers keeps the records it created in memory (for `cocon run`'s speed); a detached
        container's record changes in other processes, so it must be read from the database."""
        records = getattr(self.e.containers, "_records", None)
        if isinstance(records, dict):
            records.pop(instance_id, None)

    def supervised(self, rec: InstanceRecord) -> bool:
        return rec.config.get("Supervisor") == "conmon"

    def supervisor_alive(self, rec: InstanceRecord) -> bool:
        return bool(rec.supervisor) and process_start(rec.supervisor) == rec.supervisor_start

    def status(self, rec: InstanceRecord) -> str:
        """The status of a record, looking at reality for the ones that say running."""
        if rec.status != "running":
            return rec.status
        if self.supervised(rec):
            if self.supervisor_alive(rec) and not os.path.exists(self.exit_file(rec.id)):
                state = self.e.driver(rec.isolation).state(rec.id)
                return "paused" if state == "paused" else "running"
            return "exiting"
        return self.e.containers.status(rec)

    def reconcile(self) -> list[str]:
        """Live restore: collect every detached container whose process ended while nobody watched.
        Returns the ids collected."""
        done = []
        for rec in self.e.instances.list():
            if rec.status == "running" and self.supervised(rec) and self.status(rec) == "exiting":
                try:
                    self.collect(rec.id)
                    done.append(rec.id)
                except (EngineError, NotFound):
                    pass
        return done

    # --- listing with what only the supervisor knows -------------------------------------------------
    def ps(self, *, all: bool = False) -> list[dict[str, Any]]:
        """`GET /containers/json` (cocon.engine.containers.Containers.list) after a reconcile, with
        detached containers' paused state, health (in Status, as Docker) and restart count."""
        from cocon.engine.health import status_suffix

        self.reconcile()
        items = self.e.containers.list(all=True)
        out = []
        for item in items:
            try:
                rec = self.e.instances.get(item["Id"])
            except NotFound:
                continue
            if self.supervised(rec):
                state = self.status(rec)
                state = "running" if state == "exiting" else state
                item["State"] = state
                if state == "paused":
                    item["Status"] = str(item["Status"]) + " (Paused)"
                elif state == "running":
                    item["Status"] = str(item["Status"]) + status_suffix(rec)
            if all or item["State"] in ("running", "paused"):
                out.append(item)
        return out

    def inspect(self, ref: str) -> dict[str, Any]:
        """`GET /containers/{id}/json` with the detached container's state: Paused, Health,
        RestartCount, and where its log is."""
        from cocon.engine.health import inspect_state

        rec = self._get(ref)
        if self.supervised(rec) and self.status(rec) == "exiting":
            self.collect(rec.id)
            rec = self._get(rec.id)
        doc = self.e.containers.inspect(rec.id)
        state = doc["State"]
        if self.supervised(rec):
            status = self.status(rec)
            if status == "paused":
                state["Status"], state["Paused"], state["Running"] = "paused", True, True
        health = inspect_state(rec)
        if health is not None:
            state["Health"] = health
        doc["RestartCount"] = int(rec.config.get("RestartCount", 0))
        doc["LogPath"] = self.log_path(rec.id) if os.path.exists(self.log_path(rec.id)) else ""
        return doc

    # --- create and start --------------------------------------------------------------------------
    def run(self, body: dict[str, Any], name: str | None = None) -> dict[str, Any]:
        """`cocon run -d`: create, then start detached; {"Id", "Warnings"}. A start that fails
        leaves the record (exit code 125/126/127 and the error) unless --rm."""
        created = self.create(body, name)
        self.start(created["Id"])
        return created

    def create(self, body: dict[str, Any], name: str | None = None) -> dict[str, Any]:
        """`cocon create` for containers that will start detached: no cgroup warm-up (it is for an
        in-process runtime create; a detached start forks conmon, whose runtime warms up itself)."""
        from cocon.engine import prestart

        pool = prestart.pool_for(self.e.run_dir)
        cid = pool.take() if pool is not None and fits_prestarted(body) else None
        try:
            created = self.e.containers.create(body, name, warm_up=False, cid=cid)
        except BaseException:
            if pool is not None and cid is not None:
                pool.release(cid)
            raise
        self._forget(created["Id"])
        return created

    def start(self, ref: str, on_created: Callable[[InstanceRecord], None] | None = None) -> None:
        """Start a created or stopped container under a new conmon. `on_created(rec)` runs once conmon
        holds the created container, before its process runs (to attach to its attach socket)."""
        rec = self._get(ref)
        with self.lock(rec.id):
            rec = self._get(rec.id)
            status = self.status(rec)
            if status in ("running", "paused"):
                raise Conflict(f"container {rec.name} is already running")
            if status in ("exiting", "dead"):
                self._collect_locked(rec, remove_auto=False)
                rec = self._get(rec.id)
            self._start_locked(rec, on_created)

    def start_for_policy(
        self,
        ref: str,
        wants: Callable[[InstanceRecord], bool],
        bump: Callable[[InstanceRecord], dict[str, Any]],
    ) -> bool:
        """A start by the container's restart policy: under the container's lock, and only if the
        record read there still `wants` it (a user's stop marks it under the same lock, so it cannot
        fall between the check and the start); `bump(rec)` gives the config to record first (the
        restart count). True when it was started."""
        rec = self._get(ref)
        with self.lock(rec.id):
            rec = self._get(rec.id)
            if self.status(rec) != "exited" or not wants(rec):
                return False
            self.e.instances.update(rec.id, config=bump(rec))
            self._start_locked(self._get(rec.id), None)
        return True

    def _start_locked(self, rec: InstanceRecord, on_created: Callable[[InstanceRecord], None] | None) -> None:
        from cocon.engine import containers as C
        from cocon.engine import netattach
        from cocon.isolation.base import Handle, InstanceConfig, IsolationError
        from cocon.isolation.container import exit_code_for, make_workdir

        ct = self.e.containers
        cfg = rec.config
        body = cfg["Create"]
        first_start = rec.started is None
        bundle = self.bundle(rec.id)
        driver = self.e.driver(rec.isolation)
        driver.settle()  # a warm-up of an in-process create (LocalClient) must be gone before we fork
        _remove(self.exit_file(rec.id))
        disk_vm = rec.isolation == "vm" and not rec.image  # `cocon vm create`: a disk, no image
        rootfs = "" if disk_vm else ct._mount(rec)
        try:
            machine = None
            if rec.isolation == "vm":
                from cocon.engine import vm_machines

                machine = vm_machines.prepare(self.e, rec, None if disk_vm else rootfs)
            if first_start and not disk_vm:
                ct._populate_volumes(rec, rootfs)
            network, net_mounts = netattach.up(self.e, rec)  # networking: netns joined by path, /etc files
            limits = cfg["Limits"]
            process = {
                k: body[k]
                for k in ("Cmd", "Entrypoint", "Env", "WorkingDir", "User")
                if body.get(k) is not None
            }
            icfg = InstanceConfig(
                id=rec.id, state_dir=bundle, rootfs=rootfs, image_id=rec.image,
                image_config=b"{}" if disk_vm else ct._config_blob(rec.image), process=process,
                hostname=cfg["Hostname"],
                terminal=bool(body.get("Tty")), read_only=limits["ReadonlyRootfs"],
                mounts=C._oci_mounts(cfg["Mounts"]) + net_mounts, cap_add=limits["CapAdd"],
                cap_drop=limits["CapDrop"], seccomp=cfg["Seccomp"], memory=limits["Memory"],
                memory_swap=limits["MemorySwap"], cpus=limits["Cpus"], pids_limit=limits["PidsLimit"],
                network=network, cgroups_path=None, machine=machine,
            )  # fmt: skip
            config_for = getattr(driver, "config_for", None)
            if config_for is None:
                raise StartFailed(
                    f"isolation {rec.isolation} cannot run detached yet: use --isolation container"
                )
            try:
                doc = config_for(icfg)
                size = (body.get("HostConfig") or {}).get("ConsoleSize")
                if body.get("Tty") and isinstance(size, list) and _console_size_ok(size):
                    doc["process"]["consoleSize"] = {"height": size[0], "width": size[1]}  # from the start
                if rootfs:
                    make_workdir(rootfs, doc["process"].get("cwd") or "/")
            except IsolationError as exc:
                raise StartFailed(str(exc), exc.exit_code) from None
            os.makedirs(bundle, 0o700, exist_ok=True)
            with open(os.path.join(bundle, "config.json"), "w") as f:
                f.write(_fastjson.dumps(doc))
            os.makedirs(self.log_dir(rec.id), 0o700, exist_ok=True)
            pid, conmon_pid = self._conmon_for(rec, bundle)
            if on_created is not None:
                on_created(rec)
            started = time.time()
            try:
                driver.start(Handle(id=rec.id, pid=pid, pty=-1))
            except IsolationError as exc:
                msg = str(exc)
                raise StartFailed(msg, exit_code_for(msg)) from None
        except BaseException as exc:
            C._network_down(self.e, rec)  # networking
            self._start_failed(rec, str(exc), exc.exit_code if isinstance(exc, StartFailed) else 125)
            if isinstance(exc, (OSError, ValueError, KeyError)):
                raise StartFailed(f"cannot start container {rec.name}: {exc}") from None
            raise
        cfg["Supervisor"] = "conmon"
        cfg.pop("StoppedByUser", None)
        self.e.instances.update(
            rec.id, status="running", pid=pid, started=started, finished=None, exit_code=None, error="",
            supervisor=conmon_pid, supervisor_start=process_start(conmon_pid) or 0, config=cfg,
        )  # fmt: skip
        self._event(rec, "start")

    def _conmon_for(self, rec: InstanceRecord, bundle: str) -> tuple[int, int]:
        """The pre-started conmon and runtime reserved for this container, told to go, or a new
        conmon; (the container's pid, conmon's pid)."""
        from cocon.engine import prestart

        pool = prestart.pool_for(self.e.run_dir)
        entry = pool.claimed(rec.id) if pool is not None else None
        if pool is not None and entry is not None:
            try:
                if entry.go():
                    return conmon_started(entry.launch, bundle)
                entry.launch.close()  # its runtime is gone (killed): start cold in the same bundle
            finally:
                pool.started()
        body = rec.config["Create"]
        return self._spawn_conmon(
            rec, bundle, terminal=bool(body.get("Tty")), stdin=bool(body.get("OpenStdin"))
        )

    def _spawn_conmon(
        self, rec: InstanceRecord, bundle: str, *, terminal: bool, stdin: bool
    ) -> tuple[int, int]:
        """conmon → `cocon-runtime create`; returns (the container's pid, conmon's pid)."""
        max_size, max_file = log_limits(rec)
        argv = self.conmon_argv(
            rec.id, rec.name, bundle, terminal=terminal, stdin=stdin, isolation=rec.isolation,
            stdin_once=bool(rec.config["Create"].get("StdinOnce")),
            log_size_max=max_size if max_size and max_file <= 1 else 0,
        )  # fmt: skip
        # a microVM's create boots a VM (seconds under TCG), a container's takes milliseconds
        timeout = SYNC_TIMEOUT if rec.isolation == "container" else VM_SYNC_TIMEOUT
        return conmon_started(launch_conmon(argv, bundle, self._conmon_env()), bundle, timeout)

    def conmon_argv(
        self, cid: str, name: str, bundle: str, *, terminal: bool = False, stdin: bool = False,
        stdin_once: bool = False, log_size_max: int = 0, await_fifo: str | None = None,
        isolation: str = "container",
    ) -> list[str]:  # fmt: skip
        """conmon's command line for container `cid` (`await_fifo`: a pre-started runtime, see
        cocon.engine.prestart)."""
        conmon_pidfile = os.path.join(bundle, "conmon.pid")
        pidfile = os.path.join(bundle, "pidfile")
        exits = os.path.dirname(self.exit_file(cid))
        os.makedirs(exits, 0o700, exist_ok=True)
        runtime, runtime_args = self._runtime_for(isolation)
        if await_fifo is not None:
            runtime_args += ["--await", await_fifo]
        args = [find_conmon(), "--api-version", "1", "-c", cid, "-u", cid, "-n", name, "-r", runtime]
        for arg in runtime_args:
            args += ["--runtime-arg", arg]
        args += [
            "-b", bundle, "-p", pidfile, "-P", conmon_pidfile, "--exit-dir", exits,
            "--socket-dir-path", bundle, "--full-attach", "-l", f"k8s-file:{self.log_path(cid)}",
            "--log-level", "error",
        ]  # fmt: skip
        if os.environ.get("COCON_CONMON_EXIT_COMMAND", "1") != "0":  # 0: for tests of reconcile
            # A live monitor (the daemon's) collects the container itself: the exit command is then
            # one `sh` that checks $COCON_RUN/monitor.pid, not a Python process per exit.
            script = ('read pid start < "$0" 2>/dev/null && kill -0 "$pid" 2>/dev/null && exit 0; '
                      'exec "$1" -S -m cocon.engine.supervisor cleanup "$2"')  # fmt: skip
            args += ["--exit-command", "/bin/sh"]
            for arg in ("-c", script, os.path.join(self.e.run_dir, "monitor.pid"), sys.executable, cid):
                args += ["--exit-command-arg", arg]
        if log_size_max:  # with max-file > 1 the monitor rotates (Supervisor.rotate_log)
            args += ["--log-size-max", str(log_size_max)]
        if terminal:
            args.append("-t")
        if stdin:  # StdinOnce (docker run -i): the container's stdin ends with the attached client's
            args += ["-i"] if stdin_once else ["-i", "--leave-stdin-open"]
        return args

    def _runtime_for(self, isolation: str) -> tuple[str, list[str]]:
        """The runc-compatible runtime conmon and exec run for an isolation level, and its global
        arguments: `cocon-runtime` for containers, the driver's own command (microVMs) otherwise."""
        driver = self.e.driver(isolation)
        command = getattr(driver, "runtime_command", None)
        if command is None:
            return find_runtime(), ["--root", os.path.join(self.e.run_dir, "runtime")]
        return find_runtime(command), list(driver.runtime_args())  # type: ignore[attr-defined]

    def _conmon_env(self) -> dict[str, str]:
        import cocon

        return {
            "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
            "PYTHONPATH": os.path.dirname(os.path.dirname(os.path.abspath(cocon.__file__))),
            "COCON_ROOT": self.e.root,
            "COCON_RUN": self.e.run_dir,
            "PYTHONDONTWRITEBYTECODE": "1",
            # microVM shims: where the guest assets are (a cache several roots may share), and
            # whether they start from pre-booted templates
            **{k: v for k, v in os.environ.items() if k in ("COCON_ASSETS_ROOT", "COCON_MICROVM_TEMPLATES")},
        }

    def _start_failed(self, rec: InstanceRecord, message: str, code: int) -> None:
        driver = self.e.driver(rec.isolation)
        try:
            driver.delete(rec.id, force=True)
        except Exception:
            pass
        # conmon ends by itself once the process is gone (its exit command waits for our lock)
        try:
            self.e.containers._unmount(rec)
        except Exception:
            pass
        _remove_tree(self.bundle(rec.id))
        _remove(self.exit_file(rec.id))
        if rec.config.get("AutoRemove"):
            try:
                self.e.containers._remove_all(rec, volumes=True)
                _remove_tree(self.log_dir(rec.id))
                _remove(os.path.join(self.e.run_dir, "locks", rec.id))
            except Exception:
                pass
            return
        try:
            self.e.instances.update(rec.id, status="exited" if rec.started else rec.status, exit_code=code,
                                    error=_clean_runtime_message(message), finished=time.time())  # fmt: skip
        except EngineError:
            pass

    # --- collect -----------------------------------------------------------------------------------
    def collect(self, ref: str, *, remove_auto: bool = True) -> int | None:
        """Record the end of a detached container whose process ended: its exit code, and clean up
        (runtime state, mount, bundle; with --rm everything). Idempotent; returns the exit code, or
        None when it is still running."""
        try:
            rec = self._get(ref)
        except NotFound:
            return None
        with self.lock(rec.id):
            try:
                rec = self._get(rec.id)
            except NotFound:
                _remove(os.path.join(self.e.run_dir, "locks", rec.id))
                return None
            if rec.status != "running" or not self.supervised(rec):
                return rec.exit_code
            if self.status(rec) in ("running", "paused"):
                return None
            return self._collect_locked(rec, remove_auto=remove_auto)

    def _collect_locked(self, rec: InstanceRecord, *, remove_auto: bool) -> int:
        if rec.status != "running":
            return rec.exit_code if rec.exit_code is not None else 0
        if self.supervisor_alive(rec) and not os.path.exists(self.exit_file(rec.id)):
            _wait_gone(rec.supervisor, 5, start=rec.supervisor_start)  # conmon is going (no exit file)
        code, finished = self._exit_status(rec)
        finished = max(finished, rec.started or 0.0)
        errors: list[str] = []
        exit_reason = getattr(self.e.driver(rec.isolation), "exit_reason", None)
        if exit_reason is not None and (reason := exit_reason(rec.id)):
            errors.append(reason)  # a microVM whose QEMU died: State.Error says so
        try:
            self.e.driver(rec.isolation).delete(rec.id, force=True)
        except Exception as exc:
            errors.append(str(exc))
        try:
            self.e.containers._unmount(rec)
        except Exception as exc:
            errors.append(str(exc))
        from cocon.engine.containers import _network_down

        _network_down(self.e, rec, errors)  # networking: off its networks, netns deleted
        _remove_tree(self.bundle(rec.id))
        _remove(self.exit_file(rec.id))
        self._event(rec, "die", {"exitCode": str(code)})
        if rec.config.get("AutoRemove") and remove_auto:
            try:
                self.e.containers._remove_all(rec, volumes=True)
                _remove_tree(self.log_dir(rec.id))
                _remove(os.path.join(self.e.run_dir, "locks", rec.id))  # gone with the record
                self._event(rec, "destroy")
                return code
            except EngineError as exc:
                errors.append(str(exc))
        cfg = rec.config
        if code is not None:
            cfg["RestartCount"] = cfg.get("RestartCount", 0)
        self.e.instances.update(rec.id, status="exited", exit_code=code, finished=finished, pid=0,
                                error="; ".join(errors), config=cfg)  # fmt: skip
        return code

    def _exit_status(self, rec: InstanceRecord) -> tuple[int, float]:
        """conmon's exit file: the code (128+N for signal N, as conmon writes it); its mtime is when
        the process ended. Without one (conmon killed, node crashed) 255, now."""
        path = self.exit_file(rec.id)
        try:
            with open(path) as f:
                text = f.read().strip()
            finished = os.stat(path).st_mtime
            return int(text or "255"), finished
        except (OSError, ValueError):
            return 255, time.time()

    # --- stop, kill, restart, wait --------------------------------------------------------------------
    def stop_signal(self, rec: InstanceRecord) -> int:
        body = rec.config["Create"]
        value = body.get("StopSignal")
        if not value:
            info_cfg = self._image_config(rec.image)
            value = info_cfg.get("StopSignal")
        try:
            return parse_signal(value)
        except InvalidRequest:
            return _signal.SIGTERM

    def _image_config(self, image_id: str) -> dict[str, Any]:
        try:
            raw = self.e.containers._config_blob(image_id)
            doc = _fastjson.loads(raw)
        except Exception:
            return {}
        cfg = doc.get("config") if isinstance(doc, dict) else None
        return cfg if isinstance(cfg, dict) else {}

    def kill(self, ref: str, sig: int = _signal.SIGKILL) -> None:
        from cocon.isolation.base import IsolationError

        rec = self._get(ref)
        if self.status(rec) not in ("running", "paused"):
            raise Conflict(f"container {rec.name} is not running: start it first (cocon start)")
        try:
            self.e.driver(rec.isolation).signal(rec.id, sig)
        except IsolationError as exc:
            raise EngineError(str(exc)) from None
        self._event(rec, "kill", {"signal": str(sig)})

    def stop(self, ref: str, timeout: int | None = None) -> str:
        """Docker's stop: the stop signal, then SIGKILL after `timeout` seconds (the create body's
        StopTimeout, else 10); a stopped container is left as it is. Returns the id."""
        rec = self._get(ref)
        with self.lock(rec.id):  # serialized with a restart by the policy (start_for_policy)
            rec = self._get(rec.id)
            self._mark_stopped(rec)
        if self.status(rec) not in ("running", "paused"):
            self.collect(rec.id)
            return rec.id
        if timeout is None:
            timeout = rec.config["Create"].get("StopTimeout")
            timeout = DEFAULT_STOP_TIMEOUT if not isinstance(timeout, int) else timeout
        driver = self.e.driver(rec.isolation)
        if self.status(rec) == "paused":
            self._resume_quietly(rec)
        if timeout != 0:
            try:
                driver.signal(rec.id, self.stop_signal(rec))
            except Exception:
                pass
            if timeout < 0 or self._wait_exit(rec, float(timeout)):
                self.collect(rec.id)
                self._event(rec, "stop")
                return rec.id
        try:
            driver.signal(rec.id, _signal.SIGKILL)
        except Exception:
            pass
        self._wait_exit(rec, 30.0)
        self.collect(rec.id)
        self._event(rec, "stop")
        return rec.id

    def _mark_stopped(self, rec: InstanceRecord) -> None:
        """Remember that the user stopped it (restart policies other than `always` leave it alone)."""
        cfg = rec.config
        cfg["StoppedByUser"] = True
        self.e.instances.update(rec.id, config=cfg)

    def _resume_quietly(self, rec: InstanceRecord) -> None:
        try:
            self.e.driver(rec.isolation).runtime.resume(rec.id)  # type: ignore[attr-defined]
        except Exception:
            pass

    def _wait_exit(self, rec: InstanceRecord, timeout: float) -> bool:
        """Wait until the container's process ended (the exit file, or conmon gone)."""
        deadline = time.monotonic() + timeout
        while True:
            if os.path.exists(self.exit_file(rec.id)) or not self.supervisor_alive(rec):
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.02)

    def restart(self, ref: str, timeout: int | None = None) -> None:
        rec = self._get(ref)
        self.stop(rec.id, timeout)
        self.start(rec.id)
        self._event(rec, "restart")

    def wait(self, ref: str, condition: str = "not-running", timeout: float | None = None) -> int:
        """Docker's wait: until the container is not running (`next-exit`: until it exits after now;
        `removed`: until its record is gone); the exit code."""
        if condition not in ("not-running", "next-exit", "removed"):
            raise InvalidRequest(
                f"invalid wait condition {condition!r}: use not-running, next-exit or removed"
            )
        rec = self._get(ref)
        first_finished = rec.finished
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            try:
                cur = self._get(rec.id)
            except NotFound:
                return rec.exit_code if rec.exit_code is not None else 0
            status = self.status(cur)
            if status == "exiting" and self.supervised(cur):
                if not self.supervisor_alive(cur) or os.path.exists(self.exit_file(cur.id)):
                    code = self.collect(cur.id)
                    if condition != "removed":
                        return code if code is not None else 0
                    rec = cur
                    if code is not None:
                        rec.exit_code = code  # returned once the record is gone (--rm)
                    continue
            elif (condition == "not-running" and status not in ("running", "paused", "exiting")) or (
                condition == "next-exit" and status == "exited" and cur.finished != first_finished
            ):
                return cur.exit_code if cur.exit_code is not None else 0
            elif status == "dead" and condition != "removed":
                return cur.exit_code if cur.exit_code is not None else 255
            rec = cur
            now = time.monotonic()
            if deadline is not None and now > deadline:
                raise Conflict(f"container {rec.name} is still running after {timeout} s")
            self._await_exit(cur, 0.5 if deadline is None else min(0.5, deadline - now))

    def _await_exit(self, rec: InstanceRecord, seconds: float) -> None:
        """Sleep until the container's process ends (its pidfd), then until conmon wrote the exit
        file; at most `seconds`. A wait is then as quick as the exit (a poll would add its period)."""
        fd = -1
        gone = False
        if rec.status == "running" and rec.pid:
            try:
                fd = os.pidfd_open(rec.pid)
            except ProcessLookupError:
                gone = True
            except OSError:
                fd = -1
        if fd < 0 and not gone:  # not started yet (a wait sent before the start, as docker's) or paused
            time.sleep(min(seconds, 0.005 if rec.status == "created" else 0.05))
            return
        ready: list[int] = []
        if fd >= 0:
            import select

            try:
                ready, _, _ = select.select([fd], [], [], max(0.0, seconds))
            finally:
                os.close(fd)
        if gone or ready:  # conmon reaps the process, then writes the exit file
            end = time.monotonic() + min(seconds, 0.2)
            while not os.path.exists(self.exit_file(rec.id)) and time.monotonic() < end:
                time.sleep(0.002)

    def remove(self, ref: str, *, force: bool = False, volumes: bool = False) -> str:
        """`rm [-f] [-v]` of any container: detached ones here, the others by Containers.remove."""
        rec = self._get(ref)
        if not self.supervised(rec):
            from cocon.engine import prestart

            pool = prestart.pool_for(self.e.run_dir)
            if pool is not None:  # created with a pre-started runtime, never started: cancel it while
                pool.release(rec.id)  # its FIFO is still there (in the bundle, which remove deletes)
            removed = self.e.containers.remove(rec.id, force=force, volumes=volumes)
            _remove_tree(self.log_dir(rec.id))  # from a detached start that failed
            _remove(os.path.join(self.e.run_dir, "locks", rec.id))
            return removed
        status = self.status(rec)
        if status in ("running", "paused"):
            if not force:
                raise Conflict(
                    f"cannot remove container {rec.name}: it is running; stop it first or use `cocon rm -f`"
                )
            self._mark_stopped(rec)
            if status == "paused":
                self._resume_quietly(rec)
            try:
                self.e.driver(rec.isolation).signal(rec.id, _signal.SIGKILL)
            except Exception:
                pass
            self._wait_exit(rec, 30.0)
        if self.supervised(rec):
            self.collect(rec.id, remove_auto=False)
        with self.lock(rec.id):
            try:
                rec = self._get(rec.id)
            except NotFound:
                return rec.id
            if self.status(rec) in ("running", "paused"):
                raise Conflict(f"container {rec.name} was started again meanwhile: stop it, then remove it")
            self.e.containers._remove_all(rec, volumes=volumes)
            _remove_tree(self.log_dir(rec.id))
        _remove(os.path.join(self.e.run_dir, "locks", rec.id))
        self._event(rec, "destroy")
        return rec.id

    # --- exec --------------------------------------------------------------------------------------
    def exec_args(
        self,
        ref: str,
        cmd: list[str],
        *,
        tty: bool = False,
        user: str | None = None,
        workdir: str | None = None,
        env: list[str] | tuple[str, ...] = (),
    ) -> list[str]:
        """The `cocon-runtime exec` command line that runs `cmd` in the running container (Docker's
        exec: `-u` names from the container's /etc/passwd, `-w` absolute, `-e K=V`)."""
        rec = self._get(ref)
        status = self.status(rec)
        if status == "paused":
            raise Conflict(f"container {rec.name} is paused: unpause it first")
        if status != "running":
            raise Conflict(f"container {rec.name} is not running: start it first (cocon start)")
        if not cmd:
            raise InvalidRequest("exec needs a command")
        runtime, runtime_args = self._runtime_for(rec.isolation)
        args = [runtime, *runtime_args, "exec"]
        if tty:
            args.append("-t")
        if workdir:
            if not workdir.startswith("/"):
                raise InvalidRequest(f"the working directory {workdir!r} must be an absolute path")
            args += ["--cwd", workdir]
        for item in env:
            if "=" not in item or item.startswith("="):
                raise InvalidRequest(f"invalid environment variable {item!r}: use K=V")
            args += ["-e", item]
        if user:
            from cocon.isolation.spec import SpecError, resolve_user

            try:
                with open(os.path.join(self.bundle(rec.id), "config.json"), "rb") as f:
                    rootfs = _fastjson.loads(f.read())["root"]["path"]
                uid, gid, extra, _home = resolve_user(rootfs, user)
            except (OSError, ValueError, KeyError) as exc:
                raise EngineError(f"cannot read the container's configuration: {exc}") from None
            except SpecError as exc:
                raise InvalidRequest(str(exc)) from None
            args += ["-u", f"{uid}:{gid}"]
            for g in extra:
                args += ["-g", str(g)]
        return [*args, rec.id, *cmd]

    # --- top, stats, cp, port --------------------------------------------------------------------------
    def top(self, ref: str, ps_args: str | None = None) -> dict[str, Any]:
        from cocon.engine.stats import top

        rec = self._get(ref)
        if self.status(rec) not in ("running", "paused"):
            raise Conflict(f"container {rec.name} is not running")
        driver = self.e.driver(rec.isolation)
        guest_top = getattr(driver, "top", None)
        if guest_top is not None:  # a microVM: its processes are the guest's
            if ps_args not in (None, "", "-ef"):
                raise InvalidRequest(f"top of microVM {rec.name} shows `ps -ef` only: leave out {ps_args!r}")
            result: dict[str, Any] = guest_top(rec.id)
            return result
        runtime = getattr(driver, "runtime", None)
        try:
            pids = runtime.pids(rec.id) if runtime is not None else [rec.pid]
        except Exception:
            pids = [rec.pid]
        return top(pids, ps_args)

    def stats(self, ref: str) -> dict[str, Any]:
        from cocon.engine.stats import stats

        rec = self._get(ref)
        running = self.status(rec) in ("running", "paused")
        driver = self.e.driver(rec.isolation)
        if running and hasattr(driver, "stats"):  # a microVM: its cgroup is in the guest
            from cocon.engine.stats import guest_stats

            return guest_stats(lambda: driver.stats(rec.id), rec.pid, rec.id, rec.name)
        return stats(rec.pid if running else 0, rec.id, rec.name)

    def copy(self, ref: str, *, src: str | None = None, dest: str | None = None, path: str) -> None:
        """`cp`: container `path` → host `dest`, or host `src` → container `path`. A stopped container's
        root filesystem is mounted for the copy."""
        from cocon.engine import copy

        rec = self._get(ref)
        with self.lock(rec.id):
            rec = self._get(rec.id)
            running = self.status(rec) in ("running", "paused")
            if running:
                try:
                    with open(os.path.join(self.bundle(rec.id), "config.json"), "rb") as f:
                        rootfs = str(_fastjson.loads(f.read())["root"]["path"])
                except (OSError, ValueError, KeyError):
                    raise Conflict(
                        f"container {rec.name} is running in the foreground: copy once it stopped"
                    ) from None
            else:
                rootfs = self.e.containers._mount(rec)
            try:
                if dest is not None:
                    copy.copy_from(rootfs, path, dest)
                elif src is not None:
                    copy.copy_to(rootfs, src, path)
            finally:
                if not running:
                    self.e.containers._unmount(rec)

    def ports(self, ref: str) -> dict[str, Any]:
        """Published ports: none until bridged networking (`NetworkSettings.Ports`)."""
        rec = self._get(ref)
        ports = (rec.config.get("NetworkSettings") or {}).get("Ports") or {}
        return dict(ports)

    # --- pause, rename ------------------------------------------------------------------------------
    def pause(self, ref: str) -> None:
        rec = self._get(ref)
        if self.status(rec) != "running":
            raise Conflict(f"container {rec.name} is not running: only a running container can be paused")
        self._runtime_call(rec, "pause")
        self._event(rec, "pause")

    def unpause(self, ref: str) -> None:
        rec = self._get(ref)
        if self.status(rec) != "paused":
            raise Conflict(f"container {rec.name} is not paused")
        self._runtime_call(rec, "resume")
        self._event(rec, "unpause")

    def _runtime_call(self, rec: InstanceRecord, what: str) -> None:
        from cocon.isolation.base import IsolationError
        from cocon.runtime.errors import RuntimeFailure

        driver = self.e.driver(rec.isolation)
        runtime = getattr(driver, "runtime", driver)  # a container's runtime, or the driver (microVMs)
        if not hasattr(runtime, what):
            raise EngineError(f"isolation {rec.isolation} cannot {what} containers")
        try:
            getattr(runtime, what)(rec.id)
        except (RuntimeFailure, IsolationError) as exc:
            raise EngineError(f"cannot {what} container {rec.name}: {exc}") from None

    def rename(self, ref: str, new_name: str) -> None:
        from cocon.engine.containers import validate_name

        rec = self._get(ref)
        name = validate_name(new_name)
        other = self.e.instances.find_by_name(name)
        if other is not None and other != rec.id:
            raise Conflict(f"the name {name!r} is already used by container {other[:12]}: pick another name")
        try:
            self.e.instances.update(rec.id, name=name)
        except Exception:
            raise Conflict(f"the name {name!r} is already in use: pick another name") from None
        self._event(rec, "rename", {"oldName": "/" + rec.name})

    # --- logs --------------------------------------------------------------------------------------
    def rotate_log(self, rec: InstanceRecord) -> bool:
        """Docker's json-file rotation for a running container with `max-size` and `max-file` > 1:
        container.log → .1 → .2 … (the oldest beyond max-file dropped), then conmon is told to reopen
        its log (message 2 on its `ctl` FIFO). True when it rotated."""
        max_size, max_file = log_limits(rec)
        path = self.log_path(rec.id)
        if not max_size or max_file <= 1:
            return False
        try:
            if os.stat(path).st_size < max_size:
                return False
        except OSError:
            return False
        for n in range(max_file - 1, 0, -1):
            older = f"{path}.{n}"
            if os.path.exists(older):
                if n + 1 >= max_file:
                    _remove(older)
                else:
                    os.replace(older, f"{path}.{n + 1}")
        os.replace(path, f"{path}.1")
        ctl = os.path.join(self.bundle(rec.id), "ctl")
        try:
            fd = os.open(ctl, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            try:
                os.write(fd, b"2 0 0\n")
            finally:
                os.close(fd)
        except OSError:
            pass
        return True

    def log_files(self, ref: str) -> tuple[InstanceRecord, list[str]]:
        from cocon.engine.logs import log_files

        rec = self._get(ref)
        return rec, log_files(self.log_path(rec.id))

    def running(self, instance_id: str) -> bool:
        try:
            rec = self._get(instance_id)
        except NotFound:
            return False
        return self.status(rec) in ("running", "paused")

    # --- events --------------------------------------------------------------------------------------
    def _event(self, rec: InstanceRecord, action: str, extra: dict[str, str] | None = None) -> None:
        """A container event through the engine's event log (`Engine.emit`, best effort)."""
        emit = getattr(self.e, "emit", None)
        if emit is None:
            return
        attrs = {"name": rec.name, "image": rec.image_ref, **(extra or {})}
        for k, v in (rec.config["Create"].get("Labels") or {}).items():
            attrs.setdefault(str(k), str(v))
        try:
            emit("container", action, rec.id, **attrs)
        except Exception:
            pass


def _console_size_ok(size: object) -> bool:
    """Docker's HostConfig.ConsoleSize: [height, width], both > 0."""
    return (
        isinstance(size, list) and len(size) == 2 and all(isinstance(n, int) and 0 < n < 65536 for n in size)
    )


def fits_prestarted(body: dict[str, Any]) -> bool:
    """A create request a pre-started runtime can serve: the pool's conmon has no TTY, no stdin and
    no log size limit, and runs a container (not a VM)."""
    if not isinstance(body, dict) or body.get("Tty") or body.get("OpenStdin"):
        return False
    host = body.get("HostConfig")
    if host is None:
        return True
    if not isinstance(host, dict) or host.get("Isolation") not in (
        None,
        "",
        "default",
        "container",
        "process",
    ):
        return False
    log_config = host.get("LogConfig") or {}
    return not (isinstance(log_config, dict) and (log_config.get("Config") or {}).get("max-size"))


def log_limits(rec: InstanceRecord) -> tuple[int, int]:
    """(max-size in bytes, 0: none; max-file) of `--log-opt`."""
    log_opts = (rec.config["Create"].get("HostConfig") or {}).get("LogConfig") or {}
    cfg = log_opts.get("Config") or {}
    max_size = _size(cfg.get("max-size"))
    try:
        max_file = int(cfg.get("max-file") or 1)
    except ValueError:
        raise InvalidRequest(f"invalid max-file {cfg.get('max-file')!r}: give a number") from None
    return max_size, max(1, max_file)


def _size(value: object) -> int:
    if value in (None, ""):
        return 0
    if isinstance(value, int):
        return value
    text = str(value).strip().lower()
    units = {"k": 1024, "m": 1024**2, "g": 1024**3}
    try:
        if text[-1:] in units:
            return int(float(text[:-1]) * units[text[-1]])
        return int(text.rstrip("b"))
    except ValueError:
        raise InvalidRequest(f"invalid size {value!r}: give a number with k, m or g") from None


class ConmonLaunch:
    """A conmon whose first process has exited: the long-lived one runs `cocon-runtime create` and
    reports the container's pid (or an error) on the sync pipe `sync_fd`."""

    def __init__(self, sync_fd: int) -> None:
        self.sync_fd = sync_fd

    def close(self) -> None:
        if self.sync_fd >= 0:
            os.close(self.sync_fd)
            self.sync_fd = -1


def launch_conmon(argv: list[str], bundle: str, env: dict[str, str]) -> ConmonLaunch:
    """Start conmon (`argv`) in `bundle`; returns once its first process exited (it forks the
    long-lived one and leaves)."""
    import subprocess

    os.makedirs(bundle, 0o700, exist_ok=True)
    r, w = os.pipe()
    try:
        env = dict(env, _OCI_SYNCPIPE=str(w))
        null = os.open("/dev/null", os.O_RDWR)
        try:
            proc = subprocess.Popen(
                argv, stdin=null, stdout=null, stderr=subprocess.PIPE, pass_fds=(w,), env=env,
                start_new_session=True, cwd=bundle,
            )  # fmt: skip
        finally:
            os.close(null)
        os.close(w)
        w = -1
        _, err = proc.communicate(timeout=SYNC_TIMEOUT)
        if proc.returncode != 0:
            raise StartFailed(f"conmon failed ({proc.returncode}): {err.decode(errors='replace').strip()}")
    except BaseException:
        os.close(r)
        raise
    finally:
        if w >= 0:
            os.close(w)
    return ConmonLaunch(r)


def conmon_started(launch: ConmonLaunch, bundle: str, timeout: float = SYNC_TIMEOUT) -> tuple[int, int]:
    """Read conmon's report of `cocon-runtime create`: (the container's pid, conmon's pid);
    StartFailed with the runtime's message otherwise."""
    import select

    data = b""
    try:
        deadline = time.monotonic() + timeout
        while b"\n" not in data and time.monotonic() < deadline:
            ready, _, _ = select.select([launch.sync_fd], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                break
            chunk = os.read(launch.sync_fd, 65536)
            if not chunk:
                break
            data += chunk
    finally:
        launch.close()
    try:
        msg = _fastjson.loads(data.split(b"\n", 1)[0]) if data.strip() else {}
    except ValueError:
        msg = {}
    pid = msg.get("data") if isinstance(msg, dict) else None
    if not isinstance(pid, int) or pid <= 0:
        text = str(msg.get("message") or "") if isinstance(msg, dict) else ""
        text = text or _runtime_error(bundle) or "conmon did not report the container's pid"
        from cocon.isolation.container import exit_code_for

        raise StartFailed(_clean_runtime_message(text), exit_code_for(text))
    conmon_pidfile = os.path.join(bundle, "conmon.pid")
    conmon_pid = _read_int(conmon_pidfile)
    if conmon_pid <= 0:
        raise StartFailed(f"conmon did not write its pid file {conmon_pidfile}")
    return pid, conmon_pid


def _read_int(path: str) -> int:
    try:
        with open(path) as f:
            return int(f.read().strip() or "0")
    except (OSError, ValueError):
        return 0


def _runtime_error(bundle: str) -> str:
    return ""


def _clean_runtime_message(text: str) -> str:
    text = text.strip()
    for prefix in ("cocon-runtime: error: ",):
        i = text.rfind(prefix)
        if i >= 0:
            text = text[i + len(prefix) :]
    return text.strip() or "the container could not be started"


def _wait_gone(pid: int, timeout: float, start: int | None = None) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        st = process_start(pid)
        if st is None or (start is not None and st != start):
            return True
        time.sleep(0.01)
    return False


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def _remove_tree(path: str) -> None:
    from cocon.storage.fsutil import remove_tree

    try:
        remove_tree(path)
    except OSError:
        pass


def _cleanup_main(argv: list[str]) -> int:
    """conmon's exit command: `python -S -m cocon.engine.supervisor cleanup <id>`."""
    if len(argv) != 2 or argv[0] != "cleanup":
        print("usage: python -m cocon.engine.supervisor cleanup ID", file=sys.stderr)
        return 2
    from cocon.engine.engine import Engine

    engine = Engine()
    try:
        sup = Supervisor(engine)
        sup.collect(argv[1])
        monitor = getattr(engine, "monitor", None)
        if monitor is None:
            from cocon.engine.monitor import apply_restart_policy

            apply_restart_policy(sup, argv[1])
    except Exception as exc:  # nobody reads our output: leave it to the next reconcile
        print(f"cocon cleanup {argv[1]}: {exc}", file=sys.stderr)
        return 1
    finally:
        engine.close()
    return 0


if __name__ == "__main__":
    sys.exit(_cleanup_main(sys.argv[1:]))
