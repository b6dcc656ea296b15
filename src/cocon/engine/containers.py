"""Container life cycle: create, start, wait, kill, remove, list, inspect (Docker's semantics).

Requests and answers are plain data shaped like the Docker Engine API's JSON (`POST
/containers/create`'s body, `GET /containers/json`, `GET /containers/{id}/json`), so that the API
layer only has to move them over HTTP.

    create(body, name)  record (status "created"), volumes, a prepared snapshot of the image
    start(id, stdio)    mount the snapshot, fill new volumes, the driver creates and starts the process
    wait(id)            the exit code; the driver's state, the mount and the bundle go; with
                        HostConfig.AutoRemove (`--rm`) the snapshot, anonymous volumes and record too
    remove(id)          everything of a stopped container (`force`: kill a running one first)

Until the node daemon exists, the process that starts a container is the one that waits for it (its
*supervisor*, recorded with the instance): the container's init is its child. Another process can
list, inspect, kill and remove it. A record left "running" by a supervisor that died shows as "dead"
once its process is gone; `cocon rm` cleans it up.
"""

from __future__ import annotations

import os
import time

from cocon._typing import TYPE_CHECKING
from cocon._units import human_duration
from cocon.engine.errors import Conflict, EngineError, InvalidRequest, NotFound, StartFailed

if TYPE_CHECKING:
    from typing import Any

    from cocon.engine.engine import Engine
    from cocon.engine.instances import InstanceRecord
    from cocon.isolation.base import Handle, Stdio

MIN_MEMORY = 6 * 1024 * 1024  # Docker's lower limit for --memory
_NAME_FIRST = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789")
_NAME_REST = _NAME_FIRST | frozenset("_.-")
_HOSTNAME_CHARS = _NAME_FIRST | frozenset(".-")
_ADJECTIVES = ("brave", "calm", "eager", "fancy", "gentle", "happy", "jolly", "keen", "lucid", "merry",
               "nimble", "quiet", "rapid", "sharp", "tidy", "vivid", "witty", "zesty", "bold",
               "crisp")  # fmt: skip
_NOUNS = ("babbage", "curie", "dijkstra", "euler", "fermi", "gauss", "hopper", "hypatia", "knuth", "lamport",
          "lovelace", "noether", "pascal", "ritchie", "shannon", "thompson", "torvalds", "turing", "wirth",
          "yalow")  # fmt: skip


def _now() -> float:
    return time.time()


def rfc3339(t: float | None) -> str:
    if not t:
        return "0001-01-01T00:00:00Z"
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int((t % 1) * 1e9):09d}Z"


def validate_name(name: str) -> str:
    """Docker's container names: `[a-zA-Z0-9][a-zA-Z0-9_.-]+`; a leading `/` is dropped."""
    name = name.removeprefix("/")
    if len(name) < 2 or len(name) > 128 or name[0] not in _NAME_FIRST or not _NAME_REST.issuperset(name):
        raise InvalidRequest(
            f"invalid container name {name!r}: use at least two of letters, digits, '_', '.', '-', "
            "starting with a letter or digit"
        )
    return name


def _random_name() -> str:
    r = os.urandom(2)
    return f"{_ADJECTIVES[r[0] % len(_ADJECTIVES)]}_{_NOUNS[r[1] % len(_NOUNS)]}"


def _str_list(value: Any, what: str) -> list[str] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise InvalidRequest(f"{what} must be a list of strings")
    return list(value)


def _int(value: Any, what: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRequest(f"{what} must be an integer")
    return value


def effective_args(image_config: dict[str, Any], body: dict[str, Any]) -> list[str]:
    """Docker's merge of Entrypoint and Cmd (for display; the spec is built by cocon.isolation.spec)."""
    entrypoint = body.get("Entrypoint")
    if entrypoint is None:
        entrypoint = image_config.get("Entrypoint") or []
    cmd = body.get("Cmd")
    if not cmd:
        cmd = [] if body.get("Entrypoint") is not None else (image_config.get("Cmd") or [])
    return [*entrypoint, *cmd]


def _tmpfs_options(dest: str, text: str) -> list[str]:
    """Docker's --tmpfs: nosuid,nodev,noexec unless the options say otherwise."""
    opts = {"suid": "nosuid", "dev": "nodev", "exec": "noexec"}
    flags = {"nosuid": True, "nodev": True, "noexec": True}
    extra: list[str] = []
    for opt in [o.strip() for o in text.split(",") if o.strip()]:
        if opt in opts:
            flags[opts[opt]] = False
        elif opt in flags:
            flags[opt] = True
        elif opt in ("ro", "rw") or opt.split("=", 1)[0] in (
            "size",
            "mode",
            "uid",
            "gid",
            "nr_inodes",
            "nr_blocks",
        ):
            extra.append(opt)
        else:
            raise InvalidRequest(
                f"--tmpfs {dest}:{text}: unknown option {opt!r} (use ro, rw, size=, mode=, uid=, gid=, exec, "
                "suid, dev)"
            )
    return [f for f, on in flags.items() if on] + extra


def _process_start(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    try:
        return int(data[data.rindex(b")") + 2 :].split()[19])
    except (ValueError, IndexError):
        return None


class Containers:
    """The container operations of one engine."""

    def __init__(self, engine: Engine) -> None:
        self.e = engine
        self._handles: dict[str, Handle] = {}
        self._records: dict[str, InstanceRecord] = {}

    # --- lookups -----------------------------------------------------------------------------------
    def _get(self, ref: str) -> InstanceRecord:
        rec = self._records.get(ref)
        return rec if rec is not None else self.e.instances.get(ref)

    def _state_dir(self, instance_id: str) -> str:
        return os.path.join(self.e.run_dir, "instances", instance_id)

    def status(self, rec: InstanceRecord) -> str:
        """The record's status, corrected for supervisors that died: "dead" when the record says
        running but neither its process nor its supervisor is alive."""
        if rec.status != "running" or rec.id in self._handles:
            return rec.status
        if rec.config.get("Supervisor") == "conmon":  # detached (cocon.engine.supervisor)
            status = self.e.supervisor.status(rec)
            return "running" if status == "exiting" else status  # "exiting": about to be collected
        if self.e.driver(rec.isolation).state(rec.id) in ("running", "paused", "created"):
            return "running"
        if rec.supervisor and _process_start(rec.supervisor) == rec.supervisor_start:
            return "running"  # exiting: its supervisor is about to record it
        return "dead"

    # --- create ------------------------------------------------------------------------------------
    def create(
        self, body: dict[str, Any], name: str | None = None, *, warm_up: bool = True, cid: str | None = None
    ) -> dict[str, Any]:
        """`POST /containers/create`: returns {"Id", "Warnings"}. `warm_up`: start the driver's cgroup
        warm-up for an in-process start right after (a start under a supervisor forks it instead);
        `cid`: the ID to use (one a pre-started runtime waits for, cocon.engine.prestart)."""
        from cocon.isolation.base import IsolationError, normalize_isolation

        if not isinstance(body, dict):
            raise InvalidRequest("the create request must be a JSON object")
        image_ref = body.get("Image")
        if not isinstance(image_ref, str) or not image_ref:
            raise InvalidRequest("no image given: cocon run [OPTIONS] IMAGE [COMMAND] [ARG...]")
        host = body.get("HostConfig") or {}
        if not isinstance(host, dict):
            raise InvalidRequest("HostConfig must be a JSON object")
        try:
            isolation = normalize_isolation(host.get("Isolation") or "container")
        except IsolationError as exc:
            raise InvalidRequest(str(exc)) from None
        driver = self.e.driver(isolation)  # refuses levels that do not exist yet
        if warm_up:
            driver.warm_up()  # overlaps slow kernel work with what follows; the driver's create uses it
        try:
            return self._create(body, name, image_ref, host, isolation, cid)
        except BaseException:
            driver.settle()
            raise

    def _create(
        self, body: dict[str, Any], name: str | None, image_ref: str, host: dict[str, Any], isolation: str,
        cid: str | None = None,
    ) -> dict[str, Any]:  # fmt: skip
        from cocon.engine.instances import InstanceRecord

        warnings: list[str] = []
        for key in ("Cmd", "Entrypoint", "Env"):
            _str_list(body.get(key), key)
        for key in ("WorkingDir", "User", "Hostname"):
            if body.get(key) is not None and not isinstance(body.get(key), str):
                raise InvalidRequest(f"{key} must be a string")
        workdir = body.get("WorkingDir")
        if workdir and not workdir.startswith("/"):
            raise InvalidRequest(
                f"the working directory {workdir!r} is invalid: it needs to be an absolute path"
            )
        name = validate_name(name) if name else None
        limits = self._limits(host)
        seccomp = self._seccomp(host, warnings)
        if image_ref:
            info = self.e.image_for_run(image_ref)
        else:  # a VM made from a disk (engine/vms.py): no image, no root filesystem, no command
            from cocon.engine.engine import ImageInfo

            info = ImageInfo(id="", chain_ids=(), config={"Cmd": ["firmware"]})
        from cocon.engine.netattach import plan

        net = plan(self.e, body, host, info.config)  # the network mode, endpoints and published ports
        args = effective_args(info.config, body)
        if not args:
            raise InvalidRequest(
                "no command specified: the image has no CMD or ENTRYPOINT; give one after the image"
            )
        cid = cid or os.urandom(32).hex()
        hostname = str(body.get("Hostname") or cid[:12])
        if len(hostname) > 63 or not _HOSTNAME_CHARS.issuperset(hostname) or hostname[0] in ".-":
            raise InvalidRequest(
                f"invalid hostname {hostname!r}: use letters, digits, '.' and '-' (at most 63)"
            )
        mounts = self._plan_mounts(host, info.config)
        vm_settings = _vm_storage(host, isolation)
        config: dict[str, Any] = {
            "Create": body,
            "Hostname": hostname,
            "ChainIDs": list(info.chain_ids),
            "Mounts": mounts,
            "Seccomp": seccomp,
            "Limits": limits,
            **net,
            "Path": args[0],
            "Args": args[1:],
            "AutoRemove": bool(host.get("AutoRemove")),
        }
        if vm_settings:
            config["VM"] = vm_settings
        created_volumes: list[str] = []
        rec: InstanceRecord | None = None
        try:
            for m in mounts:
                if m["Type"] != "volume":
                    continue
                vol, new = self._create_volume(m["Name"] or None)
                if vol.type == "disk" and isolation != "vm":
                    raise InvalidRequest(
                        f"volume {vol.name} is a disk volume, and disk volumes attach to VMs only: use a "
                        "directory volume with a container (or run it with --isolation vm)"
                    )
                m["Name"], m["Source"] = vol.name, vol.mountpoint
                if vol.type == "disk":
                    m["Disk"] = True  # a virtio disk of the VM (engine/vm_machines.py), not a mount
                if new and m["Anonymous"]:
                    created_volumes.append(vol.name)
            for attempt in range(100):
                rec = InstanceRecord(
                    id=cid, name=name or _random_name() + (f"_{attempt}" if attempt > 9 else ""),
                    image=info.id, image_ref=image_ref, isolation=isolation, status="created",
                    exit_code=None, error="", pid=0, supervisor=0, supervisor_start=0, created=_now(),
                    started=None, finished=None, snapshot=cid, config=config,
                )  # fmt: skip
                try:
                    self.e.instances.insert(
                        rec, [(m["Name"], m["Anonymous"]) for m in mounts if m["Type"] == "volume"]
                    )
                    break
                except Conflict:
                    if name or attempt == 99:
                        raise
            assert rec is not None
            if image_ref:
                self._prepare_snapshot(rec)
        except BaseException:
            if rec is not None and self._records.get(cid) is None:
                try:
                    self.e.instances.delete(cid)
                except EngineError:
                    pass
            for v in created_volumes:
                try:
                    self.e.volumes.remove(v, force=True)
                except Exception:
                    pass
            raise
        self._records[cid] = rec
        return {"Id": cid, "Warnings": warnings}

    def _create_volume(self, name: str | None) -> tuple[Any, bool]:
        from cocon.storage.volumes import VolumeError

        try:
            return self.e.volumes.create(name)
        except VolumeError as exc:
            raise InvalidRequest(str(exc)) from None

    def _prepare_snapshot(self, rec: InstanceRecord) -> None:
        from cocon.snapshots.errors import SnapshotError

        try:
            self.e.snapshotter.prepare(rec.snapshot, rec.config["ChainIDs"])
        except SnapshotError as exc:
            raise EngineError(str(exc)) from None

    def _limits(self, host: dict[str, Any]) -> dict[str, Any]:
        memory = _int(host.get("Memory"), "Memory") or None
        if memory is not None and memory < MIN_MEMORY:
            raise InvalidRequest("minimum memory limit allowed is 6MB: give --memory 6m or more")
        swap = _int(host.get("MemorySwap"), "MemorySwap") or None
        if swap is not None and memory is not None and 0 < swap < memory:
            raise InvalidRequest("minimum memoryswap limit should be larger than memory limit")
        nano = _int(host.get("NanoCpus"), "NanoCpus") or None
        cpus = None
        if nano is not None:
            count = os.cpu_count() or 1
            if nano < 0 or nano > count * 1_000_000_000:
                raise InvalidRequest(
                    f"range of CPUs is from 0.01 to {count}.00, as there are only {count} CPUs available"
                )
            cpus = nano / 1e9
        pids = _int(host.get("PidsLimit"), "PidsLimit")
        for key in ("CapAdd", "CapDrop"):
            caps = _str_list(host.get(key), key) or []
            if caps:
                from cocon.runtime.capabilities import CAPABILITIES

                for c in caps:
                    n = c.upper()
                    n = n if n.startswith("CAP_") or n == "ALL" else f"CAP_{n}"
                    if n != "ALL" and n not in CAPABILITIES:
                        raise InvalidRequest(
                            f"unknown capability {c!r}: use a name like NET_ADMIN or CAP_NET_ADMIN, or ALL"
                        )
        return {
            "Memory": memory,
            "MemorySwap": swap,
            "Cpus": cpus,
            "PidsLimit": pids if pids and pids > 0 else None,
            "CapAdd": list(host.get("CapAdd") or []),
            "CapDrop": list(host.get("CapDrop") or []),
            "ReadonlyRootfs": bool(host.get("ReadonlyRootfs")),
        }

    def _seccomp(self, host: dict[str, Any], warnings: list[str]) -> str:
        """ "default", "unconfined", or the path of the profile (stored by digest under run/seccomp)."""
        profile = "default"
        for opt in _str_list(host.get("SecurityOpt"), "SecurityOpt") or []:
            key, sep, value = opt.partition("=")
            if not sep:
                key, sep, value = opt.partition(":")
            if key == "seccomp":
                if value == "unconfined":
                    profile = "unconfined"
                elif value.lstrip().startswith("{"):
                    profile = self._store_profile(value.encode())
                else:
                    raise InvalidRequest(
                        "--security-opt seccomp= takes `unconfined` or a profile's JSON (the CLI reads "
                        "the file you name)"
                    )
            elif key == "no-new-privileges":
                if value in ("false", "0"):
                    warnings.append("no-new-privileges cannot be turned off: cocon always sets it")
            else:
                raise InvalidRequest(
                    f"unsupported --security-opt {opt!r}: cocon knows seccomp=unconfined|FILE and "
                    "no-new-privileges"
                )
        return profile

    def _store_profile(self, data: bytes) -> str:
        from cocon.oci.digest import sha256_hex

        d = os.path.join(self.e.run_dir, "seccomp")
        path = os.path.join(d, sha256_hex(data) + ".json")
        if not os.path.exists(path):
            try:
                os.makedirs(d, 0o700, exist_ok=True)
                tmp = f"{path}.{os.getpid()}.tmp"
                with open(tmp, "wb") as f:
                    f.write(data)
                os.rename(tmp, path)
            except OSError as exc:
                raise EngineError(f"cannot store the seccomp profile in {d}: {exc.strerror}") from None
        return path

    def _plan_mounts(self, host: dict[str, Any], image_config: dict[str, Any]) -> list[dict[str, Any]]:
        """Binds (`-v`), tmpfs and the image's VOLUMEs as Docker's inspect `Mounts` entries (plus
        `Anonymous` and `Copy`); volumes are created by the caller."""
        mounts: list[dict[str, Any]] = []
        seen: set[str] = set()

        def dest_of(text: str, spec: str) -> str:
            if not text.startswith("/"):
                raise InvalidRequest(
                    f"invalid mount {spec!r}: the destination {text!r} must be an absolute path"
                )
            dest = os.path.normpath(text)
            if dest == "/":
                raise InvalidRequest(f"invalid mount {spec!r}: the destination cannot be '/'")
            if dest in seen:
                raise InvalidRequest(f"duplicate mount point: {dest}")
            seen.add(dest)
            return dest

        for spec in _str_list(host.get("Binds"), "Binds") or []:
            parts = spec.split(":")
            if len(parts) == 1:
                src, dst, opts = "", parts[0], ""
            elif len(parts) in (2, 3):
                src, dst, opts = parts[0], parts[1], parts[2] if len(parts) == 3 else ""
            else:
                raise InvalidRequest(f"invalid volume specification {spec!r}: use SRC:DST[:ro]")
            options = {o for o in opts.split(",") if o}
            unknown = options - {"ro", "rw", "nocopy", "z", "Z", "rprivate", "private"}
            if unknown or {"ro", "rw"} <= options:
                raise InvalidRequest(f"invalid mode {opts!r} in {spec!r}: use ro, rw or nocopy")
            dest = dest_of(dst, spec)
            rw = "ro" not in options
            if not src:
                mounts.append(
                    _mount("volume", "", "", dest, rw, anonymous=True, copy="nocopy" not in options)
                )
            elif src.startswith("/"):
                if not os.path.exists(src):
                    raise InvalidRequest(
                        f"bind source path does not exist: {src} (create it first, or name a volume instead)"
                    )
                mounts.append(_mount("bind", "", os.path.normpath(src), dest, rw))
            elif _is_volume_name(src):
                mounts.append(_mount("volume", src, "", dest, rw, copy="nocopy" not in options))
            else:
                raise InvalidRequest(
                    f"{src!r} is not a volume name (two or more of [a-zA-Z0-9_.-], starting with a letter "
                    "or digit); to mount a host directory, give its absolute path"
                )
        tmpfs = host.get("Tmpfs") or {}
        if not isinstance(tmpfs, dict):
            raise InvalidRequest("Tmpfs must map destinations to option strings")
        for dst, opts in tmpfs.items():
            dest = dest_of(str(dst), f"--tmpfs {dst}")
            m = _mount("tmpfs", "", "tmpfs", dest, "ro" not in str(opts).split(","))
            m["Options"] = _tmpfs_options(dest, str(opts or ""))
            mounts.append(m)
        for dst in sorted(image_config.get("Volumes") or {}):
            vol_dest = os.path.normpath(dst) if str(dst).startswith("/") else None
            if vol_dest is None or vol_dest == "/" or vol_dest in seen:
                continue
            seen.add(vol_dest)
            mounts.append(_mount("volume", "", "", vol_dest, True, anonymous=True, copy=True))
        return mounts

    # --- start -------------------------------------------------------------------------------------
    def start(self, ref: str, stdio: Stdio) -> int:
        """Start a created (or exited) container with `stdio` as its standard streams; returns the
        pty master when it has a terminal, else -1. The caller must `wait` for it."""
        from cocon.isolation.base import InstanceConfig, IsolationError

        rec = self._get(ref)
        if self.status(rec) == "running":
            raise Conflict(f"container {rec.name} is already running")
        cfg = rec.config
        body = cfg["Create"]
        first_start = rec.status == "created" and rec.started is None
        rootfs = self._mount(rec)
        driver = self.e.driver(rec.isolation)
        handle: Handle | None = None
        try:
            if first_start:
                self._populate_volumes(rec, rootfs)
            from cocon.engine import netattach

            network, net_mounts = netattach.up(self.e, rec)  # a netns on its networks, resolv.conf…
            limits = cfg["Limits"]
            process = {
                k: body[k]
                for k in ("Cmd", "Entrypoint", "Env", "WorkingDir", "User")
                if body.get(k) is not None
            }
            icfg = InstanceConfig(
                id=rec.id, state_dir=self._state_dir(rec.id), rootfs=rootfs, image_id=rec.image,
                image_config=self._config_blob(rec.image), process=process, hostname=cfg["Hostname"],
                terminal=bool(body.get("Tty")),
                read_only=limits["ReadonlyRootfs"], mounts=_oci_mounts(cfg["Mounts"]) + net_mounts,
                cap_add=limits["CapAdd"],
                cap_drop=limits["CapDrop"], seccomp=cfg["Seccomp"], memory=limits["Memory"],
                memory_swap=limits["MemorySwap"], cpus=limits["Cpus"], pids_limit=limits["PidsLimit"],
                network=network, cgroups_path=None,
            )  # fmt: skip
            handle = driver.create(icfg, stdio)
            driver.start(handle)
        except (IsolationError, EngineError) as exc:
            code = exc.exit_code if isinstance(exc, IsolationError) else 125
            self._start_failed(rec, handle, str(exc), code)
            raise StartFailed(str(exc), code) from None
        except BaseException:
            self._start_failed(rec, handle, "interrupted", 125)
            raise
        self._handles[rec.id] = handle
        started = _now()
        me = os.getpid()
        self.e.instances.update(
            rec.id, status="running", pid=handle.pid, started=started, finished=None, exit_code=None,
            error="",
            supervisor=me, supervisor_start=_process_start(me) or 0,
        )  # fmt: skip
        rec.status, rec.pid, rec.started = "running", handle.pid, started
        return handle.pty

    def _config_blob(self, image_id: str) -> bytes:
        try:
            return self.e.images.content.read(image_id)
        except Exception as exc:
            raise StartFailed(
                f"the config of image {image_id} cannot be read ({exc}): pull or build it again"
            ) from None

    def _mount(self, rec: InstanceRecord) -> str:
        from cocon.snapshots.errors import SnapshotError

        try:
            # a container removed when it exits needs no sync of its upper dir at unmount (volatile)
            return self.e.snapshotter.mount(rec.snapshot, volatile=bool(rec.config.get("AutoRemove")))
        except SnapshotError as exc:
            raise StartFailed(str(exc)) from None

    def _unmount(self, rec: InstanceRecord) -> None:
        self.e.snapshotter.unmount(rec.snapshot)

    def _populate_volumes(self, rec: InstanceRecord, rootfs: str) -> None:
        from cocon.storage.volumes import VolumeError

        for m in rec.config["Mounts"]:
            if m["Type"] == "volume" and m.get("Copy"):
                try:
                    self.e.volumes.populate(m["Name"], rootfs, m["Destination"])
                except VolumeError as exc:
                    raise EngineError(str(exc)) from None

    def _start_failed(self, rec: InstanceRecord, handle: Handle | None, message: str, code: int) -> None:
        driver = self.e.driver(rec.isolation)
        driver.settle()
        try:
            driver.delete(rec.id, force=True)
        except Exception:
            pass
        if handle is not None and handle.pty >= 0:
            os.close(handle.pty)
        _network_down(self.e, rec)
        try:
            self._unmount(rec)
        except Exception:
            pass
        _remove_dir(self._state_dir(rec.id))
        if rec.config.get("AutoRemove"):
            try:
                self._remove_all(rec, volumes=True)
            except Exception:
                pass
            return
        try:
            self.e.instances.update(rec.id, exit_code=code, error=message, finished=_now())
        except EngineError:
            pass

    # --- wait and finish ---------------------------------------------------------------------------
    def wait(self, ref: str) -> int:
        """Wait until the container stops; its exit code (128+N when killed by signal N)."""
        rec = self._get(ref)
        handle = self._handles.get(rec.id)
        if handle is None:
            return self._wait_elsewhere(rec)
        driver = self.e.driver(rec.isolation)
        code = driver.wait(handle)
        self._finish(rec, handle, code)
        return code

    def _wait_elsewhere(self, rec: InstanceRecord) -> int:
        while True:
            try:
                current = self.e.instances.get(rec.id)
            except NotFound:
                return rec.exit_code if rec.exit_code is not None else 0
            status = self.status(current)
            if status != "running":
                return (
                    current.exit_code if current.exit_code is not None else (255 if status == "dead" else 0)
                )
            time.sleep(0.05)

    def _finish(self, rec: InstanceRecord, handle: Handle, code: int) -> None:
        self._handles.pop(rec.id, None)
        if handle.pty >= 0:
            try:
                os.close(handle.pty)
            except OSError:
                pass
        driver = self.e.driver(rec.isolation)
        errors: list[str] = []
        try:
            driver.delete(rec.id, force=True)
        except Exception as exc:
            errors.append(str(exc))
        _network_down(self.e, rec, errors)
        if rec.config.get("AutoRemove"):
            try:
                self._remove_all(rec, volumes=True)
                return
            except EngineError as exc:
                errors.append(str(exc))
        else:
            try:
                self._unmount(rec)
            except Exception as exc:
                errors.append(str(exc))
            _remove_dir(self._state_dir(rec.id))
        try:
            self.e.instances.update(
                rec.id, status="exited", exit_code=code, finished=_now(), pid=0, error="; ".join(errors)
            )
            rec.status, rec.exit_code = "exited", code
        except EngineError:
            pass

    # --- signals and terminals ---------------------------------------------------------------------
    def kill(self, ref: str, sig: int) -> None:
        rec = self._get(ref)
        if self.status(rec) != "running":
            raise Conflict(f"container {rec.name} is not running")
        from cocon.isolation.base import IsolationError

        try:
            self.e.driver(rec.isolation).signal(rec.id, sig)
        except IsolationError as exc:
            raise EngineError(str(exc)) from None

    def resize(self, ref: str, rows: int, cols: int) -> None:
        rec = self._get(ref)
        handle = self._handles.get(rec.id)
        if handle is not None:
            self.e.driver(rec.isolation).resize(handle, rows, cols)

    # --- remove ------------------------------------------------------------------------------------
    def remove(self, ref: str, *, force: bool = False, volumes: bool = False) -> str:
        """`DELETE /containers/{id}`; returns the removed container's id."""
        import signal

        rec = self._get(ref)
        if self.status(rec) == "running":
            if not force:
                raise Conflict(
                    f"cannot remove container {rec.name}: it is running; stop it first or use `cocon rm -f`"
                )
            driver = self.e.driver(rec.isolation)
            handle = self._handles.get(rec.id)
            try:
                driver.signal(rec.id, signal.SIGKILL)
            except Exception:
                pass
            if handle is not None:
                self._finish(rec, handle, driver.wait(handle))
            else:
                deadline = time.monotonic() + 10
                while time.monotonic() < deadline:
                    try:
                        current = self.e.instances.get(rec.id)
                    except NotFound:
                        return rec.id  # its supervisor removed it (--rm)
                    if self.status(current) != "running":
                        break
                    time.sleep(0.05)
        try:
            rec = self.e.instances.get(rec.id)
        except NotFound:
            return rec.id
        self._remove_all(rec, volumes=volumes)
        return rec.id

    def _remove_all(self, rec: InstanceRecord, *, volumes: bool) -> None:
        from cocon.storage.volumes import VolumeError

        driver = self.e.driver(rec.isolation)
        try:
            driver.delete(rec.id, force=True)
        except Exception as exc:
            raise EngineError(f"cannot remove container {rec.name}: {exc}") from None
        try:
            if rec.image:  # a VM made from a disk has no snapshot
                self.e.snapshotter.remove(rec.snapshot)
            if rec.isolation == "vm":
                from cocon.engine import vm_machines

                vm_machines.remove_instance(self.e, rec)  # its disk: a VM is a pet until removed
        except Exception as exc:
            raise EngineError(f"cannot remove container {rec.name}: {exc}") from None
        _network_down(self.e, rec)
        _remove_dir(self._state_dir(rec.id))
        anonymous = [v for v, anon in self.e.instances.volumes_of(rec.id) if anon] if volumes else []
        self.e.instances.delete(rec.id)
        self._records.pop(rec.id, None)
        for v in anonymous:
            if self.e.instances.volume_users(v):
                continue
            try:
                self.e.volumes.remove(v, force=True)
            except VolumeError:
                pass

    # --- listing -----------------------------------------------------------------------------------
    def list(self, *, all: bool = False) -> list[dict[str, Any]]:
        """`GET /containers/json`: running containers (`all`: every one), newest first."""
        out = []
        now = _now()
        for rec in self.e.instances.list():
            status = self.status(rec)
            if not all and status != "running":
                continue
            out.append(
                {
                    "Id": rec.id,
                    "Names": [f"/{rec.name}"],
                    "Image": rec.image_ref,
                    "ImageID": rec.image,
                    "Command": " ".join([rec.config.get("Path", ""), *rec.config.get("Args", [])]),
                    "Created": int(rec.created),
                    "State": status,
                    "Status": _status_text(rec, status, now),
                    "Labels": rec.config["Create"].get("Labels") or {},
                    "Mounts": [_docker_mount(m) for m in rec.config.get("Mounts", [])],
                    "Isolation": rec.isolation,
                }
            )
        return out

    def inspect(self, ref: str) -> dict[str, Any]:
        """`GET /containers/{id}/json`."""
        rec = self._get(ref)
        status = self.status(rec)
        body = rec.config["Create"]
        snap = os.path.join(self.e.snapshot_root, "active", rec.snapshot)
        return {
            "Id": rec.id,
            "Created": rfc3339(rec.created),
            "Path": rec.config.get("Path", ""),
            "Args": rec.config.get("Args", []),
            "State": {
                "Status": status,
                "Running": status == "running",
                "Paused": False,
                "Restarting": False,
                "OOMKilled": False,
                "Dead": status == "dead",
                "Pid": rec.pid if status == "running" else 0,
                "ExitCode": rec.exit_code if rec.exit_code is not None else 0,
                "Error": rec.error,
                "StartedAt": rfc3339(rec.started),
                "FinishedAt": rfc3339(rec.finished),
            },
            "Image": rec.image,
            "Name": f"/{rec.name}",
            "Driver": "overlay",
            "Isolation": rec.isolation,
            "HostConfig": body.get("HostConfig") or {},
            "Config": {
                "Hostname": rec.config.get("Hostname"),
                "User": body.get("User") or "",
                "Env": body.get("Env"),
                "Cmd": body.get("Cmd"),
                "Entrypoint": body.get("Entrypoint"),
                "WorkingDir": body.get("WorkingDir") or "",
                "Image": rec.image_ref,
                "Tty": bool(body.get("Tty")),
                "OpenStdin": bool(body.get("OpenStdin")),
                "Labels": body.get("Labels") or {},
            },
            "Mounts": [_docker_mount(m) for m in rec.config.get("Mounts", [])],
            "GraphDriver": {
                "Name": "overlay",
                "Data": {
                    "MergedDir": f"{snap}/merged",
                    "UpperDir": f"{snap}/upper",
                    "WorkDir": f"{snap}/work",
                },
            },
        }

    # --- for other objects ---------------------------------------------------------------------------
    def image_in_use(self, image_id: str) -> bool:
        return self.e.instances.uses_image(image_id)

    def volume_in_use(self, name: str) -> bool:
        return bool(self.e.instances.volume_users(name))


def _is_volume_name(text: str) -> bool:
    from cocon.storage.volumes import is_volume_name

    return is_volume_name(text)


def _mount(kind: str, name: str, source: str, dest: str, rw: bool, *, anonymous: bool = False,
           copy: bool = False) -> dict[str, Any]:  # fmt: skip
    return {"Type": kind, "Name": name, "Source": source, "Destination": dest, "RW": rw,
            "Anonymous": anonymous, "Copy": copy}  # fmt: skip


def _docker_mount(m: dict[str, Any]) -> dict[str, Any]:
    out = {
        "Type": m["Type"],
        "Source": m["Source"],
        "Destination": m["Destination"],
        "Mode": "" if m["Type"] == "tmpfs" else ("rw" if m["RW"] else "ro"),
        "RW": m["RW"],
        "Propagation": "rprivate" if m["Type"] == "bind" else "",
    }
    if m["Type"] == "volume":
        out["Name"] = m["Name"]
        out["Driver"] = "local"
    return out


def _oci_mounts(mounts: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Runtime-spec mounts, parents before children (Docker sorts by path depth)."""
    out = []
    for m in sorted(mounts, key=lambda m: m["Destination"].count("/")):
        if m.get("Disk"):
            continue  # a disk volume: the VM gets it as a disk
        if m["Type"] == "tmpfs":
            out.append({"destination": m["Destination"], "type": "tmpfs", "source": "tmpfs",
                        "options": list(m.get("Options") or [])})  # fmt: skip
        else:
            out.append({"destination": m["Destination"], "type": "bind", "source": m["Source"],
                        "options": ["rbind", "rprivate", "rw" if m["RW"] else "ro"]})  # fmt: skip
    return out


def _status_text(rec: InstanceRecord, status: str, now: float) -> str:
    if status in ("running", "paused"):  # Docker: "Up 5 minutes (Paused)"
        return "Up " + human_duration(now - (rec.started or now))
    if status == "exited":
        return f"Exited ({rec.exit_code if rec.exit_code is not None else 0}) " + (
            human_duration(now - (rec.finished or now)) + " ago"
        )
    if status == "dead":
        return "Dead"
    return "Created"


def _network_down(engine: Engine, rec: InstanceRecord, errors: list[str] | None = None) -> None:
    """Off its networks, its namespace deleted (cocon.engine.netattach; nothing for none/host)."""
    from cocon.engine import netattach

    try:
        netattach.down(engine, rec)
    except Exception as exc:
        if errors is not None:
            errors.append(str(exc))


def _remove_dir(path: str) -> None:
    from cocon.storage.fsutil import remove_tree

    try:
        remove_tree(path)
    except OSError:
        pass


def _vm_storage(host: dict[str, Any], isolation: str) -> dict[str, Any]:
    """Docker's HostConfig.StorageOpt: `size` is the root disk's size of a VM (its record's
    VM.DiskSize); containers (overlayfs) have no size limit here."""
    opts = host.get("StorageOpt")
    if not opts:
        return {}
    if not isinstance(opts, dict) or not all(isinstance(v, str) for v in opts.values()):
        raise InvalidRequest('StorageOpt must be an object of strings, e.g. {"size": "20G"}')
    unknown = sorted(set(opts) - {"size"})
    if unknown:
        raise InvalidRequest(f"unknown storage option {unknown[0]!r}: cocon takes size (a VM's disk size)")
    if isolation != "vm":
        raise InvalidRequest(
            "--storage-opt size applies to VMs (--isolation vm): a container's overlay filesystem has no "
            "size limit here"
        )
    from cocon.storage import qemu_img
    from cocon.storage.volumes import VolumeError

    try:
        size = qemu_img.parse_size(opts["size"])
    except (VolumeError, ValueError) as exc:
        raise InvalidRequest(f"--storage-opt size={opts['size']}: {exc}") from None
    from cocon.storage.vm_disks import MIN_SIZE

    if size < MIN_SIZE:
        raise InvalidRequest(
            f"--storage-opt size={opts['size']} is too small for a root disk: give "
            f"{qemu_img.format_size(MIN_SIZE)} or more"
        )
    return {"DiskSize": size}
