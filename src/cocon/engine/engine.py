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
| `seccomp/`       | seccomp profiles given by content (`--security-opt seccomp=FILE`), by digest |

Every store is imported and opened on first use. `cocon run` uses the image store and the
snapshotter themselves: their modules import only what they use (no `re`, `dataclasses`, `typing`,
`hashlib`, `shutil`… at import time), so loading them costs `cocon run` about a millisecond.
"""

from __future__ import annotations

import os

from cocon._typing import TYPE_CHECKING, record
from cocon.engine.errors import EngineError, InvalidRequest, NotFound

if TYPE_CHECKING:
    from typing import Any

    from cocon.engine.containers import Containers
    from cocon.engine.events import Event, EventLog
    from cocon.engine.imageops import ImageOps
    from cocon.engine.instances import InstanceStore
    from cocon.engine.networks import NetworkStore
    from cocon.engine.supervisor import Supervisor
    from cocon.images.store import Image, ImageStore
    from cocon.isolation.base import Driver
    from cocon.snapshots import OverlaySnapshotter
    from cocon.storage.volumes import VolumeStore

DEFAULT_ROOT = "/var/lib/cocon"
DEFAULT_RUN = "/run/cocon"


@record(frozen=True)
class ImageInfo:
    """What running an image needs: its ID, its config's `config` object (Docker's JSON names, fields
    left out when unset) and the ChainIDs of its layers, lowest first (the snapshot's parents)."""

    id: str
    config: dict[str, Any]
    chain_ids: tuple[str, ...]


class Engine:
    """One node's engine over the state in `root` and `run` (see the module docstring)."""

    def __init__(self, root: str | None = None, run: str | None = None) -> None:
        self.root = os.path.abspath(root or os.environ.get("COCON_ROOT") or DEFAULT_ROOT)
        self.run_dir = os.path.abspath(run or os.environ.get("COCON_RUN") or DEFAULT_RUN)
        self._images: ImageStore | None = None
        self._snapshotter: OverlaySnapshotter | None = None
        self._volumes: VolumeStore | None = None
        self._instances: InstanceStore | None = None
        self._drivers: dict[str, Driver] = {}
        self._containers: Containers | None = None
        self._imageops: ImageOps | None = None
        self._events: EventLog | None = None
        self._networks: NetworkStore | None = None
        self._supervisor: Supervisor | None = None

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
            from cocon.snapshots.errors import SnapshotError
            from cocon.snapshots.overlay import OverlaySnapshotter

            try:
                self._snapshotter = OverlaySnapshotter(os.path.join(self.root, "snapshots", "overlayfs"))
            except SnapshotError as exc:
                raise EngineError(str(exc)) from None
        return self._snapshotter

    @property
    def snapshot_root(self) -> str:
        """The snapshotter's root, resolved (made on first use)."""
        return self.snapshotter.root

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

    @property
    def events(self) -> EventLog:
        if self._events is None:
            from cocon.engine.events import EventLog

            self._events = EventLog(self.root)
        return self._events

    def emit(self, type: str, action: str, actor: str, /, **attributes: str) -> Event | None:
        """Record an event (cocon.engine.events). Best effort: an operation that succeeded does not
        fail because its event could not be written; the reason goes to stderr."""
        try:
            return self.events.emit(type, action, actor, attributes)
        except EngineError as exc:
            import sys

            sys.stderr.write(f"cocon: warning: {exc}\n")
            return None

    @property
    def networks(self) -> NetworkStore:
        if self._networks is None:
            from cocon.engine.networks import NetworkStore

            self._networks = NetworkStore(self.root)
        return self._networks

    def driver(self, isolation: str) -> Driver:
        if isolation not in self._drivers:
            if isolation == "microvm":
                from cocon.isolation.microvm import MicrovmDriver

                self._drivers[isolation] = MicrovmDriver(os.path.join(self.run_dir, "vm"))
                return self._drivers[isolation]
            if isolation == "vm":
                from cocon.isolation.vm import VmDriver

                self._drivers[isolation] = VmDriver(os.path.join(self.run_dir, "vms"))
                return self._drivers[isolation]
            if isolation != "container":
                raise InvalidRequest(
                    f"isolation {isolation!r} is not available: use container (alias process), microvm "
                    "(alias hyperv) or vm"
                )
            from cocon.isolation.container import ContainerDriver

            self._drivers[isolation] = ContainerDriver(os.path.join(self.run_dir, "runtime"))
        return self._drivers[isolation]

    # --- the parts of the API ----------------------------------------------------------------------
    @property
    def containers(self) -> Containers:
        if self._containers is None:
            from cocon.engine.containers import Containers

            self._containers = Containers(self)
        return self._containers

    @property
    def supervisor(self) -> Supervisor:
        """Detached containers under conmon (cocon.engine.supervisor; docs/lifecycle.md)."""
        if self._supervisor is None:
            from cocon.engine.supervisor import Supervisor

            self._supervisor = Supervisor(self)
        return self._supervisor

    @property
    def imageops(self) -> ImageOps:
        if self._imageops is None:
            from cocon.engine.imageops import ImageOps

            self._imageops = ImageOps(self)
        return self._imageops

    # --- images for running ------------------------------------------------------------------------
    def image_for_run(self, ref: str) -> ImageInfo:
        """What running `ref` needs (the image store resolves it), with every layer unpacked into the
        snapshotter."""
        from cocon.oci.jsonobj import to_builtins
        from cocon.snapshots.chain import chain_ids
        from cocon.snapshots.errors import SnapshotError

        image = self._resolve_image(ref)
        try:
            chains = chain_ids(image.diff_ids)
        except SnapshotError as exc:
            raise EngineError(
                f"image {image.short_id}: {exc}; remove it and import or build it again"
            ) from None
        snapshotter = self.snapshotter
        if not all(snapshotter.has_layer(c) for c in chains):
            self.unpack(image)
        container_config = image.config.config
        config = to_builtins(container_config) if container_config is not None else {}
        return ImageInfo(id=image.id, config=config, chain_ids=tuple(chains))

    def _resolve_image(self, ref: str) -> Image:
        from cocon.images.errors import ImageError
        from cocon.images.store import ImageNotFound

        try:
            return self.images.resolve(ref)
        except ImageNotFound as exc:
            raise NotFound(str(exc)) from None
        except ImageError as exc:
            raise EngineError(str(exc)) from None

    def unpack(self, image: Image) -> list[str]:
        """Unpack every layer of `image` into the snapshotter (layers already there are skipped)."""
        from cocon.images.errors import ImageError
        from cocon.snapshots.errors import SnapshotError
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
        if self._events is not None:
            self._events.close()
        if self._networks is not None:
            self._networks.close()
