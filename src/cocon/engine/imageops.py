"""Image and volume operations of the engine, answered in the shapes of the Docker Engine API's JSON.

| method | Docker route | answer |
|---|---|---|
| `image_list` | `GET /images/json` | `[{Id, RepoTags, RepoDigests, Created, Size, Labels, Containers, …}]` |
| `image_inspect` | `GET /images/{name}/json` | `{Id, RepoTags, Created, Config, Os, Size, RootFS, …}` |
| `image_history` | `GET /images/{name}/history` | `[{Id, Created, CreatedBy, Tags, Size, Comment}]` |
| `image_tag` | `POST /images/{name}/tag` | — |
| `image_remove` | `DELETE /images/{name}` | `[{Untagged: name} …, {Deleted: id}]` |
| `image_prune` | `POST /images/prune` | `{ImagesDeleted, SpaceReclaimed}` |
| `image_import` | `POST /images/create?fromSrc=` | `{Id, RepoTags}` |
| `image_save` / `image_load` | `GET /images/get`, `POST /images/load` | what was written / loaded |
| `image_bootstrap`, `image_build` | (cocon's own), `POST /build` | `{Id, RepoTags}` |
| `volume_*` | `/volumes…` | Docker's volume objects |

Removing images frees their blobs (content GC, with the build cache's blobs kept) and the unpacked
layers no remaining image and no container uses.
"""

from __future__ import annotations

import os

from cocon._typing import TYPE_CHECKING
from cocon.engine.errors import Conflict, EngineError, InvalidRequest, NotFound

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence
    from typing import IO, Any

    from cocon.engine.engine import Engine
    from cocon.images.store import Image


def parse_created(text: str | None) -> int:
    """Unix seconds of an RFC 3339 time (0 when missing or unreadable)."""
    if not text:
        return 0
    from datetime import datetime

    t = text.strip().replace("Z", "+00:00").replace("z", "+00:00")
    if "." in t:  # fromisoformat takes at most 6 fraction digits
        head, _, rest = t.partition(".")
        digits = ""
        while rest and rest[0].isdigit():
            digits, rest = digits + rest[0], rest[1:]
        t = f"{head}.{digits[:6]}{rest}" if digits else head + rest
    try:
        return int(datetime.fromisoformat(t).timestamp())
    except ValueError:
        return 0


class ImageOps:
    """Images and volumes of one engine."""

    def __init__(self, engine: Engine) -> None:
        self.e = engine

    # --- helpers -----------------------------------------------------------------------------------
    def _resolve(self, ref: str) -> Image:
        from cocon.images.errors import ImageError
        from cocon.images.store import ImageNotFound

        try:
            return self.e.images.resolve(ref)
        except ImageNotFound as exc:
            raise NotFound(str(exc)) from None
        except ImageError as exc:
            raise EngineError(str(exc)) from None

    def _config_doc(self, image: Image) -> dict[str, Any]:
        import json

        try:
            doc = json.loads(self.e.images.content.read(image.id))
        except Exception as exc:
            raise EngineError(f"the config of image {image.short_id} cannot be read: {exc}") from None
        return doc if isinstance(doc, dict) else {}

    def _containers_using(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for rec in self.e.instances.list():
            counts[rec.image] = counts.get(rec.image, 0) + 1
        return counts

    def _in_use(self, image_id: str) -> bool:
        return self.e.instances.uses_image(image_id)

    def _blob_bytes(self) -> int:
        content = self.e.images.content
        total = 0
        for d in content.list():
            try:
                total += content.size(d)
            except Exception:
                continue
        return total

    def _layers_bytes(self, chain_ids: Sequence[str]) -> int:
        from cocon.storage.fsutil import disk_usage

        snap = self.e.snapshotter
        return sum(disk_usage(snap.layer_dir(c)) for c in chain_ids if snap.has_layer(c))

    def build_cache_roots(self) -> list[str]:
        """Blobs the build cache needs (kept by content GC)."""
        state_dir = os.path.join(self.e.root, "build")
        if not os.path.exists(os.path.join(state_dir, "cache.db")):
            return []
        from cocon.engine.build_cache import BuildCache

        cache = BuildCache(state_dir)
        try:
            return list(cache.roots())
        finally:
            cache.close()

    def gc(self) -> int:
        """Free blobs no image (nor the build cache) reaches and unpacked layers no image or
        container uses; returns the bytes freed."""
        from cocon.snapshots import SnapshotError, chain_ids

        before = self._blob_bytes()
        try:
            self.e.images.gc(self.build_cache_roots)
        except Exception as exc:
            raise EngineError(f"content garbage collection failed: {exc}") from None
        freed = max(0, before - self._blob_bytes())
        keep: set[str] = set()
        for image in self.e.images.list():
            keep.update(chain_ids(image.diff_ids))
        snap = self.e.snapshotter
        unused = [c for c in snap.list_layers() if c not in keep]
        size = self._layers_bytes(unused)
        try:
            removed = snap.gc_layers(keep)
        except SnapshotError as exc:
            raise EngineError(f"layer garbage collection failed: {exc}") from None
        if removed:
            freed += size
        return freed

    # --- images ------------------------------------------------------------------------------------
    def image_list(self, *, all: bool = False, dangling: bool | None = None) -> list[dict[str, Any]]:
        from cocon.images.errors import ImageError

        try:
            images = self.e.images.list(dangling=dangling)
        except ImageError as exc:
            raise EngineError(str(exc)) from None
        users = self._containers_using()
        out = []
        for image in images:
            labels = (image.config.config.labels if image.config.config else None) or {}
            out.append(
                {
                    "Id": image.id,
                    "ParentId": "",
                    "RepoTags": image.repo_tags,
                    "RepoDigests": image.repo_digests,
                    "Created": parse_created(image.config.created),
                    "Size": image.size,
                    "SharedSize": -1,
                    "Labels": dict(labels),
                    "Containers": users.get(image.id, 0),
                }
            )
        return out

    def image_inspect(self, ref: str) -> dict[str, Any]:
        image = self._resolve(ref)
        doc = self._config_doc(image)
        cfg = image.config
        manifest = image.manifest
        out: dict[str, Any] = {
            "Id": image.id,
            "RepoTags": image.repo_tags,
            "RepoDigests": image.repo_digests,
            "Parent": "",
            "Comment": (cfg.history[-1].comment or "") if cfg.history else "",
            "Created": cfg.created or "",
            "DockerVersion": "",
            "Author": cfg.author or "",
            "Config": doc.get("config") or {},
            "Architecture": cfg.architecture,
            "Os": cfg.os,
            "Size": image.size,
            "GraphDriver": {"Name": "overlay", "Data": None},
            "RootFS": {"Type": "layers", "Layers": list(image.diff_ids)},
            "Metadata": {"LastTagTime": "0001-01-01T00:00:00Z"},
            "Descriptor": {
                "mediaType": manifest.media_type or "application/vnd.oci.image.manifest.v1+json",
                "digest": image.manifest_digest,
                "size": self.e.images.content.size(image.manifest_digest),
            },
        }
        if cfg.variant:
            out["Variant"] = cfg.variant
        if cfg.os_version:
            out["OsVersion"] = cfg.os_version
        return out

    def image_history(self, ref: str) -> list[dict[str, Any]]:
        from cocon.images.errors import ImageError

        image = self._resolve(ref)
        try:
            entries = self.e.images.history(image.id)
        except ImageError as exc:
            raise EngineError(str(exc)) from None
        out = []
        for n, h in enumerate(entries):
            out.append(
                {
                    "Id": image.id if n == 0 else "<missing>",
                    "Created": parse_created(h.created),
                    "CreatedBy": h.created_by,
                    "Tags": image.repo_tags if n == 0 and image.repo_tags else None,
                    "Size": h.size,
                    "Comment": h.comment,
                }
            )
        return out

    def image_tag(self, source: str, target: str) -> None:
        from cocon.images.errors import ImageError
        from cocon.images.reference import Reference, ReferenceError
        from cocon.images.store import ImageNotFound

        try:
            image = self.e.images.tag(source, target)
        except ImageNotFound as exc:
            raise NotFound(str(exc)) from None
        except (ImageError, ReferenceError) as exc:
            raise InvalidRequest(str(exc)) from None
        self.e.emit("image", "tag", image.id, name=Reference.parse(target).familiar())

    def image_remove(self, ref: str, *, force: bool = False, prune: bool = True) -> list[dict[str, str]]:
        from cocon.images.errors import ImageError
        from cocon.images.store import ImageInUse, ImageNotFound

        image_id = self._resolve(ref).id
        try:
            done = self.e.images.remove(ref, force=force, in_use=self._in_use)
        except ImageNotFound as exc:
            raise NotFound(str(exc)) from None
        except ImageInUse as exc:
            raise Conflict(str(exc)) from None
        except ImageError as exc:
            raise EngineError(str(exc)) from None
        for kind, value in done:
            if kind == "Untagged":
                self.e.emit("image", "untag", image_id, name=value)
            else:
                self.e.emit("image", "delete", value)
        if prune and any(kind == "Deleted" for kind, _ in done):
            self.gc()
        return [{kind: value} for kind, value in done]

    def image_prune(self, *, all: bool = False) -> dict[str, Any]:
        from cocon.images.errors import ImageError

        try:
            removed = self.e.images.prune(all=all, in_use=self._in_use)
        except ImageError as exc:
            raise EngineError(str(exc)) from None
        freed = self.gc()
        for image_id in removed:
            self.e.emit("image", "delete", image_id)
        self.e.emit("image", "prune", "", reclaimed=str(freed))
        return {"ImagesDeleted": [{"Deleted": i} for i in removed] or None, "SpaceReclaimed": freed}

    def _image_summary(self, image: Image, event: str | None = None) -> dict[str, Any]:
        if event is not None:
            self.e.emit("image", event, image.id, name=(image.repo_tags or [""])[0])
        return {"Id": image.id, "RepoTags": image.repo_tags}

    def image_import(
        self,
        source: str,
        name: str | None = None,
        *,
        changes: Sequence[str] = (),
        message: str | None = None,
        progress: Callable[[str, int, int], None] | None = None,
    ) -> dict[str, Any]:
        from cocon.images.archive import import_rootfs
        from cocon.images.errors import ImageError

        try:
            image = import_rootfs(
                self.e.images, source, name, changes=changes, message=message, progress=progress
            )
        except ImageError as exc:
            raise InvalidRequest(str(exc)) from None
        return self._image_summary(image, "import")

    def image_save(
        self,
        refs: Sequence[str],
        dest: str | IO[bytes],
        *,
        format: str = "oci-archive",
        progress: Callable[[str, int, int], None] | None = None,
    ) -> dict[str, Any]:
        from cocon.images.archive import save
        from cocon.images.errors import ImageError
        from cocon.images.store import ImageNotFound

        try:
            result = save(self.e.images, list(refs), dest, format=format, progress=progress)
        except ImageNotFound as exc:
            raise NotFound(str(exc)) from None
        except ImageError as exc:
            raise InvalidRequest(str(exc)) from None
        for saved in result.images:
            self.e.emit("image", "save", saved.id, name=(list(saved.names) or [""])[0])
        return {
            "Dest": result.dest,
            "Format": result.format,
            "Size": result.size,
            "Images": [{"Id": i.id, "RepoTags": list(i.names)} for i in result.images],
        }

    def image_load(
        self, source: str, *, progress: Callable[[str, int, int], None] | None = None
    ) -> list[dict[str, Any]]:
        from cocon.images.archive import load
        from cocon.images.errors import ImageError

        try:
            images = load(self.e.images, source, progress=progress)
        except ImageError as exc:
            raise InvalidRequest(str(exc)) from None
        return [self._image_summary(i, "load") for i in images]

    def image_bootstrap(
        self,
        what: str,
        *,
        mirror: str | None = None,
        tarball: str | None = None,
        progress: Callable[[str, int, int], None] | None = None,
    ) -> dict[str, Any]:
        from cocon.images.bootstrap import bootstrap
        from cocon.images.errors import ImageError

        kw: dict[str, Any] = {"progress": progress}
        if mirror is not None:
            if not what.startswith("debian"):
                raise InvalidRequest("--mirror only applies to debian images")
            kw["mirror"] = mirror
        if tarball is not None:
            if not what.startswith("debian"):
                raise InvalidRequest("--tarball only applies to debian images")
            kw["tarball"] = tarball
        try:
            if what.partition(":")[0] == "debian-vm":  # Debian with a kernel and systemd, for --isolation vm
                from cocon.vmm.errors import VmmError
                from cocon.vmm.guest_images import bootstrap_debian_vm

                suite = what.partition(":")[2] or "bookworm"
                name = f"debian-vm:{suite}"
                try:
                    image = bootstrap_debian_vm(self.e.images, name, suite=suite, **kw)
                except VmmError as exc:
                    raise InvalidRequest(str(exc)) from None
            else:
                image = bootstrap(self.e.images, what, **kw)
        except ImageError as exc:
            raise InvalidRequest(str(exc)) from None
        return self._image_summary(image, "import")

    def image_build(
        self,
        context: str,
        *,
        tags: Sequence[str] = (),
        dockerfile: str | None = None,
        build_args: dict[str, str] | None = None,
        target: str | None = None,
        no_cache: bool = False,
        output: Callable[[str], None] | None = None,
    ) -> dict[str, Any]:
        """`POST /build`: the build's log goes to `output` as text (Docker's {"stream": …} lines)."""
        from cocon.engine.build import Builder, print_events
        from cocon.images.build_errors import BuildError
        from cocon.images.errors import ImageError

        class _Stream:
            def write(self, text: str) -> int:
                if output is not None:
                    output(text)
                return len(text)

            def flush(self) -> None:
                pass

        if not os.path.isdir(context):
            raise InvalidRequest(f"build context {context!r} is not a directory: give the directory to build")
        builder = Builder(self.e.images, self.e.snapshotter, state_dir=os.path.join(self.e.root, "build"))
        try:
            result = builder.build(
                context,
                dockerfile=dockerfile,
                tags=list(tags),
                build_args=build_args,
                target=target,
                no_cache=no_cache,
                on_event=print_events(_Stream()),  # type: ignore[arg-type]
            )
        except (BuildError, ImageError) as exc:
            raise InvalidRequest(str(exc)) from None
        finally:
            builder.close()
        from cocon.images.reference import Reference

        names = [Reference.parse(n).familiar() for n in result.names]
        self.e.emit("image", "build", result.image_id, name=(names or [""])[0])
        for name in names:
            self.e.emit("image", "tag", result.image_id, name=name)
        return {"Id": result.image_id, "RepoTags": names, "Warnings": list(result.warnings)}

    # --- volumes -----------------------------------------------------------------------------------
    def volume_create(
        self,
        name: str | None = None,
        labels: dict[str, str] | None = None,
        driver_opts: dict[str, str] | None = None,
    ) -> dict[str, Any]:
        """`driver_opts`: {"type": "dir"|"disk", "size": "10G"} (cocon.storage.volumes.parse_driver_opts)."""
        from cocon.storage.volumes import VolumeError, parse_driver_opts

        try:
            kind, size = parse_driver_opts(driver_opts)
            vol, new = self.e.volumes.create(name, labels=labels, type=kind, size=size)
        except VolumeError as exc:
            raise InvalidRequest(str(exc)) from None
        if new:
            self.e.emit("volume", "create", vol.name, driver="local")
        return vol.to_docker()

    def volume_list(self) -> dict[str, Any]:
        return {"Volumes": [v.to_docker() for v in self.e.volumes.list()], "Warnings": []}

    def volume_inspect(self, name: str) -> dict[str, Any]:
        from cocon.storage.volumes import VolumeError, VolumeNotFound

        try:
            vol = self.e.volumes.get(name)
        except VolumeNotFound as exc:
            raise NotFound(str(exc)) from None
        except VolumeError as exc:
            raise InvalidRequest(str(exc)) from None
        doc = vol.to_docker()
        doc["UsageData"] = {"RefCount": len(self.e.instances.volume_users(name)), "Size": -1}
        return doc

    def _volume_in_use(self, name: str) -> bool:
        return bool(self.e.instances.volume_users(name))

    def volume_remove(self, name: str, *, force: bool = False) -> None:
        from cocon.storage.volumes import VolumeError, VolumeInUse, VolumeNotFound

        try:
            existed = self.e.volumes.exists(name)
            self.e.volumes.remove(name, force=force, in_use=self._volume_in_use)
        except VolumeNotFound as exc:
            raise NotFound(str(exc)) from None
        except VolumeInUse as exc:
            raise Conflict(str(exc)) from None
        except VolumeError as exc:
            raise InvalidRequest(str(exc)) from None
        if existed:
            self.e.emit("volume", "destroy", name, driver="local")

    def volume_prune(self, *, all: bool = False) -> dict[str, Any]:
        from cocon.storage.volumes import VolumeError

        try:
            removed = self.e.volumes.prune(all=all, in_use=self._volume_in_use)
        except VolumeError as exc:
            raise EngineError(str(exc)) from None
        for name, _ in removed:
            self.e.emit("volume", "destroy", name, driver="local")
        self.e.emit("volume", "prune", "", reclaimed=str(sum(size for _, size in removed)))
        return {
            "VolumesDeleted": [name for name, _ in removed] or None,
            "SpaceReclaimed": sum(size for _, size in removed),
        }
