"""The engine: the one place that composes the layers below it.

    Engine(root=$COCON_ROOT or /var/lib/cocon, run=$COCON_RUN or /run/cocon)

| under `root`            | what                                 | owner |
|-------------------------|--------------------------------------|-------|
| `images.db`, `content/` | images, their names and blobs        | `images.store.ImageStore` |
| `snapshots/overlayfs/`  | unpacked layers, container rootfs    | `snapshots.OverlaySnapshotter` |
| `volumes/`              | named volumes                        | `storage.volumes.VolumeStore` |
| `instances.db`          | instance (container) records         | `engine.instances.InstanceStore` |

| under `run` (tmpfs, gone after a reboot) | what |
|---|---|
| `runtime/`       | the container runtime's state (`cocon.runtime`) |
| `instances/<id>/`| an instance's bundle (its runtime config) while it runs |
| `spec-cache/`    | runtime config templates (see `cocon.isolation.container`) |
| `seccomp/`       | seccomp profiles given by content (`--security-opt seccomp=FILE`), by digest |

Every store is opened on first use, and the heavy ones (image store, snapshotter) are imported on
first use: `cocon run` of an image whose layers are unpacked never loads them (see
`cocon.engine.lookup` and `cocon.engine.rootfs`).
"""

from __future__ import annotations

import os

from cocon._typing import TYPE_CHECKING
from cocon.engine.errors import EngineError, InvalidRequest, NotFound

if TYPE_CHECKING:
    from cocon.engine.containers import Containers
    from cocon.engine.imageops import ImageOps
    from cocon.engine.instances import InstanceStore
    from cocon.engine.lookup import ImageInfo
    from cocon.images.store import Image, ImageStore
    from cocon.isolation.base import Driver
    from cocon.snapshots import OverlaySnapshotter
    from cocon.storage.volumes import VolumeStore

DEFAULT_ROOT = "/var/lib/cocon"
DEFAULT_RUN = "/run/cocon"


class Engine:
    """One node's engine over the state in `root` and `run` (see the module docstring)."""

    def __init__(self, root: str | None = None, run: str | None = None) -> None:
        self.root = os.path.abspath(root or os.environ.get("COCON_ROOT") or DEFAULT_ROOT)
        self.run_dir = os.path.abspath(run or os.environ.get("COCON_RUN") or DEFAULT_RUN)
        self._images: ImageStore | None = None
        self._snapshotter: OverlaySnapshotter | None = None
        self._snap_root: str | None = None
        self._volumes: VolumeStore | None = None
        self._instances: InstanceStore | None = None
        self._drivers: dict[str, Driver] = {}
        self._containers: Containers | None = None
        self._imageops: ImageOps | None = None

    # --- stores ----------------------------------------------------------------------------------
    @property
    def images(self) -> ImageStore:
        if self._images is None:
            from cocon.images.store import ImageStore

            os.makedirs(self.root, 0o700, exist_ok=True)
            self._images = ImageStore(self.root)
        return self._images

    @property
    def snapshotter(self) -> OverlaySnapshotter:
        if self._snapshotter is None:
            from cocon.snapshots import OverlaySnapshotter, SnapshotError

            try:
                self._snapshotter = OverlaySnapshotter(os.path.join(self.root, "snapshots", "overlayfs"))
            except SnapshotError as exc:
                raise EngineError(str(exc)) from None
        return self._snapshotter

    @property
    def snapshot_root(self) -> str:
        """The snapshotter's root, resolved (made on first use)."""
        if self._snap_root is None:
            path = os.path.join(self.root, "snapshots", "overlayfs")
            if not os.path.isdir(os.path.join(path, "tmp")):
                path = self.snapshotter.root
            self._snap_root = os.path.realpath(path)
        return self._snap_root

    @property
    def volumes(self) -> VolumeStore:
        if self._volumes is None:
            from cocon.storage.volumes import VolumeStore

            self._volumes = VolumeStore(os.path.join(self.root, "volumes"))
        return self._volumes

    @property
    def instances(self) -> InstanceStore:
        if self._instances is None:
            from cocon.engine.instances import InstanceStore

            self._instances = InstanceStore(self.root)
        return self._instances

    def driver(self, isolation: str) -> Driver:
        if isolation not in self._drivers:
            if isolation != "container":
                raise InvalidRequest(
                    f"isolation {isolation!r} is not available yet: use --isolation container (alias process)"
                )
            from cocon.isolation.container import ContainerDriver

            self._drivers[isolation] = ContainerDriver(
                os.path.join(self.run_dir, "runtime"), os.path.join(self.run_dir, "spec-cache")
            )
        return self._drivers[isolation]

    # --- the parts of the API ----------------------------------------------------------------------
    @property
    def containers(self) -> Containers:
        if self._containers is None:
            from cocon.engine.containers import Containers

            self._containers = Containers(self)
        return self._containers

    @property
    def imageops(self) -> ImageOps:
        if self._imageops is None:
            from cocon.engine.imageops import ImageOps

            self._imageops = ImageOps(self)
        return self._imageops

    # --- images for running ------------------------------------------------------------------------
    def image_for_run(self, ref: str) -> ImageInfo:
        """What running `ref` needs, with every layer unpacked into the snapshotter. Answers from the
        image database directly when it can (cocon.engine.lookup), else from the image store."""
        from cocon.engine import lookup
        from cocon.engine.rootfs import layers_present

        image_id = lookup.resolve_id(self.root, ref)
        info = lookup.image_info(self.root, image_id) if image_id else None
        if info is None:
            image = self._resolve_image(ref)
            info = lookup.image_info(self.root, image.id) or self._image_info_slow(image)
        if not layers_present(self.snapshot_root, info.chain_ids):
            self.unpack(self._resolve_image(info.id))
        return info

    def _resolve_image(self, ref: str) -> Image:
        from cocon.images.errors import ImageError
        from cocon.images.store import ImageNotFound

        try:
            return self.images.resolve(ref)
        except ImageNotFound as exc:
            raise NotFound(str(exc)) from None
        except ImageError as exc:
            raise EngineError(str(exc)) from None

    def _image_info_slow(self, image: Image) -> ImageInfo:
        from cocon.engine.lookup import ImageInfo
        from cocon.snapshots import chain_ids

        raw = self.images.content.read(image.id)
        config = _fastjson_loads(raw).get("config")
        return ImageInfo(
            id=image.id,
            config=config if isinstance(config, dict) else {},
            chain_ids=tuple(chain_ids(image.diff_ids)),
            config_blob=raw,
        )

    def unpack(self, image: Image) -> list[str]:
        """Unpack every layer of `image` into the snapshotter (layers already there are skipped)."""
        from cocon.images.errors import ImageError
        from cocon.snapshots import SnapshotError
        from cocon.snapshots.unpack import unpack_image

        try:
            return unpack_image(self.snapshotter, self.images.content, image)
        except (ImageError, SnapshotError) as exc:
            raise EngineError(f"cannot unpack image {image.short_id}: {exc}") from None

    def close(self) -> None:
        if self._images is not None:
            self._images.close()
        if self._instances is not None:
            self._instances.close()


def _fastjson_loads(data: bytes) -> dict[str, object]:
    from cocon import _fastjson

    doc = _fastjson.loads(data)
    return doc if isinstance(doc, dict) else {}
