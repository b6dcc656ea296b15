"""Container administration: prune, changes (`diff`), export, commit and update of resource limits.

    admin = ContainerAdmin(engine)
    admin.prune({"until": [...], "label": [...], "label!": [...]})  -> {"ContainersDeleted", "SpaceReclaimed"}
    admin.changes(ref)                       -> [{"Path", "Kind"}]   (0 modified, 1 added, 2 deleted)
    with admin.exported(ref) as rootfs: ...  # the merged root file system, mounted while needed
    admin.export(ref, out)                   # a tar of it written to `out`
    admin.commit(ref, repo=, tag=, comment=, author=, changes=, config=)  -> image ID
    admin.update(ref, body)                  -> {"Warnings": []}

Changes come from the container's overlay upper directory, read without mounting anything: a
0:0 character device is overlayfs' whiteout (the path was deleted), a directory with the opaque
xattr hides every lower entry below it (those are reported deleted), and any other entry is added
when no lower layer has the path, else modified. Docker's order: sorted by path.

Export and commit of a stopped container mount its root file system for the time they need it,
under the container's lock (`Supervisor.lock`), so a `start` meanwhile waits instead of finding its
root unmounted under it. A running container is read at its mount; commit archives its upper
directory as it is (Docker pauses the container first: `pause=1` freezes it here too).

Update applies Memory, MemorySwap, NanoCpus, CpuShares and PidsLimit to a running container's
cgroup through the runtime's cgroup interface (`cocon.runtime.cgroups`, the cgroup recorded in the
runtime's state) and records them, so the next start uses them; RestartPolicy is recorded for the
monitor. Any other non-zero field is refused (InvalidRequest) naming it.
"""

from __future__ import annotations

import os
import stat
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, BinaryIO, cast

from cocon.engine.errors import Conflict, EngineError, InvalidRequest, NotFound

if TYPE_CHECKING:
    from cocon.engine.engine import Engine
    from cocon.engine.instances import InstanceRecord

#: Changes' kinds (Docker's `ChangeType`).
MODIFIED, ADDED, DELETED = 0, 1, 2

#: Fields of `POST /containers/{id}/update` cocon applies.
UPDATE_FIELDS = ("Memory", "MemorySwap", "NanoCpus", "CpuShares", "PidsLimit", "RestartPolicy")

_OPAQUE_XATTRS = ("trusted.overlay.opaque", "user.overlay.opaque")
_WHITEOUT_PREFIX = ".wh."
_MIN_MEMORY = 6 * 1024 * 1024
_RESTART_NAMES = ("", "no", "always", "unless-stopped", "on-failure")


class ContainerAdmin:
    """The administration operations of one engine's containers (see the module docstring)."""

    def __init__(self, engine: Engine) -> None:
        self.e = engine

    def _get(self, ref: str) -> InstanceRecord:
        return self.e.supervisor._get(ref)

    # --- prune -------------------------------------------------------------------------------------
    def prune(self, filters: Mapping[str, Sequence[str]] | None = None) -> dict[str, Any]:
        """`POST /containers/prune`: remove every container that is not running (created, exited,
        dead) and matches the filters: `until` (created before: Unix seconds, RFC 3339 or a duration
        ago such as 10m), `label` / `label!` (`key` or `key=value`, present / absent)."""
        from cocon.engine.logs import parse_since

        filters = dict(filters or {})
        unknown = set(filters) - {"until", "label", "label!"}
        if unknown:
            raise InvalidRequest(f"invalid filter {sorted(unknown)[0]!r}: use until, label or label!")
        until: float | None = None
        for value in filters.get("until", []):
            try:
                t = parse_since(value)
            except ValueError as exc:
                raise InvalidRequest(f"filter until: {exc}") from None
            until = t if until is None or (t is not None and t < until) else until
        sup = self.e.supervisor
        sup.reconcile()
        deleted: list[str] = []
        reclaimed = 0
        for rec in self.e.instances.list():
            if sup.status(rec) in ("running", "paused", "exiting"):
                continue
            labels = rec.config["Create"].get("Labels") or {}
            if until is not None and rec.created >= until:
                continue
            if not all(_label_matches(labels, spec) for spec in filters.get("label", [])):
                continue
            if any(_label_matches(labels, spec) for spec in filters.get("label!", [])):
                continue
            try:
                size = self.e.snapshotter.usage(rec.snapshot)
            except Exception:
                size = 0
            try:
                sup.remove(rec.id)
            except (Conflict, NotFound):
                continue  # started or removed meanwhile
            deleted.append(rec.id)
            reclaimed += size
        self.e.emit("container", "prune", "", reclaimed=str(reclaimed))
        return {"ContainersDeleted": deleted or None, "SpaceReclaimed": reclaimed}

    # --- changes -----------------------------------------------------------------------------------
    def changes(self, ref: str) -> list[dict[str, Any]]:
        """`GET /containers/{id}/changes` (see the module docstring)."""
        from cocon.snapshots.errors import SnapshotError

        rec = self._get(ref)
        snap = self.e.snapshotter
        try:
            description = snap.snapshot(rec.snapshot)
        except SnapshotError as exc:
            raise EngineError(f"container {rec.name}: {exc}") from None
        lowers = [snap.layer_dir(p) for p in reversed(description.parents)]  # top layer first
        upper = description.upper
        out: list[dict[str, Any]] = []
        self._walk_changes(upper, "/", lowers, out)
        out.sort(key=lambda c: str(c["Path"]))
        return out

    def _walk_changes(self, upper: str, path: str, lowers: list[str], out: list[dict[str, Any]]) -> None:
        directory = os.path.join(upper, path.lstrip("/"))
        try:
            entries = sorted(os.scandir(directory), key=lambda d: d.name)
        except OSError as exc:
            raise EngineError(f"cannot read the container's changes at {directory}: {exc}") from None
        for entry in entries:
            child = path.rstrip("/") + "/" + entry.name
            info = entry.stat(follow_symlinks=False)
            if stat.S_ISCHR(info.st_mode) and info.st_rdev == 0:
                if _in_lowers(lowers, child):
                    out.append({"Path": child, "Kind": DELETED})
                continue
            exists = _in_lowers(lowers, child)
            out.append({"Path": child, "Kind": MODIFIED if exists else ADDED})
            if stat.S_ISDIR(info.st_mode):
                if exists and _opaque(entry.path):
                    present = set(os.listdir(entry.path))
                    for name in sorted(_lower_names(lowers, child) - present):
                        out.append({"Path": child.rstrip("/") + "/" + name, "Kind": DELETED})
                self._walk_changes(upper, child, lowers, out)

    # --- export ------------------------------------------------------------------------------------
    @contextmanager
    def rootfs(self, ref: str) -> Iterator[tuple[InstanceRecord, str]]:
        """The container's merged root file system: where it is mounted when running, else mounted
        for the block (under the container's lock) and unmounted after."""
        from cocon import _fastjson

        sup = self.e.supervisor
        rec = self._get(ref)
        with sup.lock(rec.id):
            rec = self._get(rec.id)
            if sup.status(rec) in ("running", "paused", "exiting"):
                try:
                    with open(os.path.join(sup.bundle(rec.id), "config.json"), "rb") as f:
                        path = str(_fastjson.loads(f.read())["root"]["path"])
                except (OSError, ValueError, KeyError):
                    raise Conflict(
                        f"container {rec.name} is running in the foreground: try again once it stopped"
                    ) from None
                yield rec, path
                return
            path = self.e.containers._mount(rec)
            try:
                yield rec, path
            finally:
                self.e.containers._unmount(rec)

    def export(self, ref: str, out: BinaryIO) -> None:
        """`GET /containers/{id}/export`: the whole root file system as an uncompressed tar on `out`."""
        from cocon.images.errors import ImageError
        from cocon.images.layers import dir_to_layer

        with self.rootfs(ref) as (rec, path):
            try:
                dir_to_layer(path, out, None)
            except ImageError as exc:
                raise EngineError(f"cannot export container {rec.name}: {exc}") from None
        self.e.supervisor._event(rec, "export")

    # --- commit ------------------------------------------------------------------------------------
    def commit(
        self,
        ref: str,
        *,
        repo: str | None = None,
        tag: str | None = None,
        comment: str | None = None,
        author: str | None = None,
        changes: Sequence[str] = (),
        config: Mapping[str, Any] | None = None,
        pause: bool = True,
    ) -> str:
        """`POST /commit`: a new image = the container's image + its upper directory as one more layer,
        with the container's configuration (then `config`'s fields, then `changes`); returns the
        image ID. `repo[:tag]` names it (else it is dangling)."""
        from cocon.images.errors import ImageError
        from cocon.images.layers import create_layer
        from cocon.images.store import normalize_name
        from cocon.oci.image_spec import Descriptor

        names: list[str] = []
        if repo:
            name = f"{repo}:{tag}" if tag else repo
            try:
                names = [normalize_name(name)]
            except ImageError as exc:
                raise InvalidRequest(f"invalid image name {name!r}: {exc}") from None
        elif tag:
            raise InvalidRequest("a tag needs a repository: give repo=NAME&tag=TAG")
        sup = self.e.supervisor
        rec = self._get(ref)
        store = self.e.images
        try:
            base = store.resolve(rec.image)
        except ImageError as exc:
            raise Conflict(f"container {rec.name}: its image {rec.image[:19]} is gone ({exc})") from None
        new_config = self._container_config(rec, base, config, changes)
        paused = False
        runtime = getattr(self.e.driver(rec.isolation), "runtime", None)
        with sup.lock(rec.id):
            rec = self._get(rec.id)
            if pause and runtime is not None and sup.status(rec) == "running":
                try:
                    runtime.pause(rec.id)
                    paused = True
                except Exception:
                    paused = False
            try:
                upper = self.e.snapshotter.upper_dir(rec.snapshot)
                with store.content.lease():
                    layer: tuple[Descriptor, str] | None = None
                    if os.listdir(upper):
                        with store.content.writer() as w:
                            info = create_layer(upper, cast(BinaryIO, w), compression="gzip")
                            digest = w.commit()
                        layer = (
                            Descriptor(media_type=info.media_type, digest=str(digest), size=info.size),
                            info.diff_id,
                        )
                    image = self._commit_image(base, layer, new_config, rec, comment, author, names)
            except (ImageError, OSError) as exc:
                raise EngineError(f"cannot commit container {rec.name}: {exc}") from None
            finally:
                if paused and runtime is not None:
                    try:
                        runtime.resume(rec.id)
                    except Exception:
                        pass
        sup._event(rec, "commit", {"comment": comment or ""})
        self.e.emit("image", "tag" if names else "commit", image, **({"name": names[0]} if names else {}))
        return image

    def _container_config(
        self, rec: InstanceRecord, base: Any, overrides: Mapping[str, Any] | None, changes: Sequence[str]
    ) -> dict[str, Any]:
        """The image config's `config` object for the new image: the base image's, with what the
        container was created with (Docker's merge), then `overrides`, then `changes`."""
        from cocon.images.archive import config_from_changes
        from cocon.images.errors import ImageError
        from cocon.oci.jsonobj import to_builtins

        cfg: dict[str, Any] = dict(to_builtins(base.config.config) or {}) if base.config.config else {}
        body = rec.config["Create"]
        for layer in (body, dict(overrides or {})):
            _merge_config(cfg, layer)
        if changes:
            try:
                extra = config_from_changes(list(changes))
            except ImageError as exc:
                raise InvalidRequest(str(exc).replace("--change", "changes")) from None
            if extra is not None:
                _merge_config(cfg, dict(to_builtins(extra)))
        return cfg

    def _commit_image(
        self,
        base: Any,
        layer: tuple[Any, str] | None,
        container_config: dict[str, Any],
        rec: InstanceRecord,
        comment: str | None,
        author: str | None,
        names: list[str],
    ) -> str:
        import json

        from cocon.oci.image_spec import encode_image_config, parse_image_config
        from cocon.oci.jsonobj import to_builtins

        store = self.e.images
        doc: dict[str, Any] = dict(to_builtins(base.config))
        now = time.time_ns()
        created = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now // 10**9)) + f".{now % 10**9:09d}Z"
        doc["created"] = created
        if author:
            doc["author"] = author
        doc["config"] = container_config
        rootfs = dict(doc.get("rootfs") or {"type": "layers", "diff_ids": []})
        diff_ids = list(rootfs.get("diff_ids") or [])
        if layer is not None:
            diff_ids.append(layer[1])
        rootfs["diff_ids"] = diff_ids
        doc["rootfs"] = rootfs
        step: dict[str, Any] = {"created": created, "created_by": " ".join(
            [str(rec.config.get("Path", "")), *map(str, rec.config.get("Args", []))]
        ).strip()}  # fmt: skip
        if comment:
            step["comment"] = comment
        if author:
            step["author"] = author
        if layer is None:
            step["empty_layer"] = True
        doc["history"] = [*(doc.get("history") or []), step]
        config = parse_image_config(json.dumps(doc).encode(), "the committed image's config")
        layers = list(base.manifest.layers) + ([layer[0]] if layer is not None else [])
        image = store.commit(encode_image_config(config), layers, names=names)
        return str(image.id)

    # --- update ------------------------------------------------------------------------------------
    def update(self, ref: str, body: Mapping[str, Any] | None) -> dict[str, Any]:
        """`POST /containers/{id}/update` (see the module docstring)."""
        body = dict(body or {})
        for key, value in body.items():
            if key not in UPDATE_FIELDS and not _zero(value):
                raise InvalidRequest(
                    f"container update: {key} is not supported by cocon; it can update "
                    f"{', '.join(UPDATE_FIELDS)}"
                )
        want = {k: body[k] for k in UPDATE_FIELDS if k in body and not _zero(body[k])}
        for key in ("Memory", "MemorySwap", "NanoCpus", "CpuShares", "PidsLimit"):
            if key in want and (not isinstance(want[key], int) or isinstance(want[key], bool)):
                raise InvalidRequest(f"container update: {key} must be an integer")
        sup = self.e.supervisor
        rec = self._get(ref)
        with sup.lock(rec.id):
            rec = self._get(rec.id)
            cfg = rec.config
            host = dict(cfg["Create"].get("HostConfig") or {})
            limits = dict(cfg["Limits"])
            memory = want.get("Memory", limits.get("Memory"))
            swap = want.get("MemorySwap", limits.get("MemorySwap"))
            if "Memory" in want and want["Memory"] < _MIN_MEMORY:
                raise InvalidRequest("minimum memory limit allowed is 6MB: give 6m or more")
            if "MemorySwap" in want and swap not in (-1, None):
                if memory is None:
                    raise InvalidRequest("you should always set the memory limit when setting the swap limit")
                if swap < memory:
                    raise InvalidRequest("minimum memoryswap limit should be larger than memory limit")
            if "Memory" in want and "MemorySwap" not in want and swap not in (-1, None) and swap < memory:
                raise InvalidRequest(
                    f"memory limit {memory} would be above the memory+swap limit {swap}: give MemorySwap too"
                )
            cpus = limits.get("Cpus")
            if "NanoCpus" in want:
                count = os.cpu_count() or 1
                nano = want["NanoCpus"]
                if nano < 0 or nano > count * 1_000_000_000:
                    raise InvalidRequest(
                        f"range of CPUs is from 0.01 to {count}.00, as there are only {count} CPUs available"
                    )
                cpus = nano / 1e9
            if "CpuShares" in want and not 2 <= want["CpuShares"] <= 262144:
                raise InvalidRequest("CpuShares must be between 2 and 262144")
            if "PidsLimit" in want and want["PidsLimit"] < -1:
                raise InvalidRequest("PidsLimit must be a positive number, or -1 for no limit")
            policy = want.get("RestartPolicy")
            if policy is not None:
                policy = _check_restart_policy(policy)
                if cfg.get("AutoRemove") and policy["Name"] not in ("", "no"):
                    raise Conflict(
                        "restart policy cannot be updated because AutoRemove is enabled for the container"
                    )
            running = sup.status(rec) in ("running", "paused")
            if running:
                self._apply_cgroup(rec, want, memory, swap, cpus)
            # record: the next start uses these (Limits), and inspect shows them (HostConfig)
            if "Memory" in want:
                limits["Memory"] = memory
                host["Memory"] = memory
                if swap is None:
                    host.pop("MemorySwap", None)
            if "MemorySwap" in want:
                limits["MemorySwap"] = swap
                host["MemorySwap"] = swap
            if "NanoCpus" in want:
                limits["Cpus"] = cpus
                host["NanoCpus"] = want["NanoCpus"]
            if "CpuShares" in want:
                limits["CpuShares"] = want["CpuShares"]
                host["CpuShares"] = want["CpuShares"]
            if "PidsLimit" in want:
                pids = want["PidsLimit"]
                limits["PidsLimit"] = pids if pids > 0 else None
                host["PidsLimit"] = pids
            if policy is not None:
                host["RestartPolicy"] = policy
            cfg["Limits"] = limits
            cfg["Create"]["HostConfig"] = host
            self.e.instances.update(rec.id, config=cfg)
        sup._event(rec, "update")
        return {"Warnings": []}

    def _apply_cgroup(
        self,
        rec: InstanceRecord,
        want: Mapping[str, Any],
        memory: int | None,
        swap: int | None,
        cpus: float | None,
    ) -> None:
        from cocon.oci.runtime_spec import CPU, Memory, Pids, Resources
        from cocon.runtime.cgroups import cgroup_from_state
        from cocon.runtime.errors import RuntimeFailure
        from cocon.runtime.state import StateDir

        runtime = getattr(self.e.driver(rec.isolation), "runtime", None)
        if runtime is None:
            raise EngineError(f"isolation {rec.isolation} cannot update a running container's resources")
        resources = Resources()
        if "Memory" in want or "MemorySwap" in want:
            if swap is None and memory is not None:
                swap = 2 * memory  # Docker's default: as much swap as memory
            resources.memory = Memory(limit=memory, swap=swap)
        if "NanoCpus" in want or "CpuShares" in want:
            cpu = CPU()
            if "NanoCpus" in want and cpus is not None:
                cpu.quota, cpu.period = round(cpus * 100_000), 100_000
            if "CpuShares" in want:
                cpu.shares = int(want["CpuShares"])
            resources.cpu = cpu
        if "PidsLimit" in want:
            resources.pids = Pids(limit=int(want["PidsLimit"]))
        sd = StateDir(runtime.root, rec.id)
        try:
            lock = sd.lock()
        except RuntimeFailure:
            raise Conflict(f"container {rec.name} is not running") from None
        try:
            state = sd.load()
            if not state.cgroup:
                raise EngineError(f"container {rec.name} has no cgroup to update")
            cgroup_from_state(state.cgroup).apply(resources)
        except RuntimeFailure as exc:
            raise InvalidRequest(f"cannot update container {rec.name}: {exc}") from None
        except OSError as exc:
            raise EngineError(f"cannot update container {rec.name}: {exc}") from None
        finally:
            os.close(lock)


# --- helpers -----------------------------------------------------------------------------------------


def _zero(value: Any) -> bool:
    return value in (None, "", 0, False, [], {}) or (
        isinstance(value, dict) and all(_zero(v) for v in value.values())
    )


def _label_matches(labels: Mapping[str, str], spec: str) -> bool:
    key, sep, value = spec.partition("=")
    if key not in labels:
        return False
    return not sep or labels[key] == value


def _check_restart_policy(policy: Any) -> dict[str, Any]:
    if not isinstance(policy, dict):
        raise InvalidRequest(
            'RestartPolicy must be an object like {"Name": "on-failure", "MaximumRetryCount": 3}'
        )
    name = str(policy.get("Name") or "")
    if name not in _RESTART_NAMES:
        raise InvalidRequest(f"invalid restart policy {name!r}: use no, always, unless-stopped or on-failure")
    count = policy.get("MaximumRetryCount") or 0
    if not isinstance(count, int) or count < 0:
        raise InvalidRequest("RestartPolicy.MaximumRetryCount must be a positive integer")
    if count and name != "on-failure":
        raise InvalidRequest(f"maximum retry count cannot be used with restart policy {name!r}")
    return {"Name": name, "MaximumRetryCount": count}


def _in_lowers(lowers: list[str], path: str) -> bool:
    """Whether `path` exists in the image below (lower layers top first, with their whiteouts and
    opaque directories)."""
    parts = [p for p in path.split("/") if p]
    for lower in lowers:
        current = lower
        hides_below = False  # an opaque directory of this layer on the way hides the layers below
        for i, name in enumerate(parts):
            if os.path.lexists(os.path.join(current, _WHITEOUT_PREFIX + name)):
                return False
            nxt = os.path.join(current, name)
            try:
                info = os.lstat(nxt)
            except OSError:
                break  # not in this layer: the layers below decide, unless an opaque dir hides them
            if stat.S_ISCHR(info.st_mode) and info.st_rdev == 0:
                return False
            if i == len(parts) - 1:
                return True
            if not stat.S_ISDIR(info.st_mode):
                return False  # a file here hides whatever the layers below have deeper
            hides_below = hides_below or _opaque(nxt)
            current = nxt
        if hides_below:
            return False
    return False


def _lower_names(lowers: list[str], path: str) -> set[str]:
    """The names the image below has in directory `path`."""
    names: set[str] = set()
    for lower in reversed(lowers):  # bottom first: upper layers' whiteouts remove names
        d = os.path.join(lower, path.lstrip("/"))
        try:
            entries = os.listdir(d)
        except OSError:
            continue
        if _opaque(d):
            names.clear()
        for name in entries:
            full = os.path.join(d, name)
            try:
                info = os.lstat(full)
            except OSError:
                continue
            if stat.S_ISCHR(info.st_mode) and info.st_rdev == 0:
                names.discard(name)
            elif name.startswith(_WHITEOUT_PREFIX):
                names.discard(name[len(_WHITEOUT_PREFIX) :])
            else:
                names.add(name)
    return names


def _opaque(path: str) -> bool:
    for attr in _OPAQUE_XATTRS:
        try:
            if os.getxattr(path, attr, follow_symlinks=False) == b"y":
                return True
        except OSError:
            continue
    return False


def _merge_config(cfg: dict[str, Any], layer: Mapping[str, Any]) -> None:
    """Docker's container config merge on an image config's `config` (JSON names): scalars and
    commands replace, Env replaces by key, Labels/ExposedPorts/Volumes are added."""
    for key in ("Cmd", "Entrypoint", "WorkingDir", "User", "StopSignal", "Healthcheck", "OnBuild"):
        value = layer.get(key)
        if value not in (None, "", []):
            cfg[key] = value
    env = layer.get("Env")
    if env:
        merged: dict[str, str] = {}
        for item in [*(cfg.get("Env") or []), *env]:
            k, _, v = str(item).partition("=")
            merged[k] = v
        cfg["Env"] = [f"{k}={v}" for k, v in merged.items()]
    for key in ("Labels", "ExposedPorts", "Volumes"):
        value = layer.get(key)
        if isinstance(value, dict) and value:
            cfg[key] = {**(cfg.get(key) or {}), **value}
