"""`cocon system reset`: everything of cocon's on this node removed, as `podman system reset` does.

In order: every container (stopped, its processes killed, its record, snapshot, logs and anonymous
volumes gone), every user network's record, then cocon's whole networking (endpoints, networks,
bridges, its nftables table: `NetworkStack.reset`), every volume, every image (and the blobs no
image needs any more). What was removed is counted in the answer. The daemon keeps running on the
empty state; the pre-started runtime it keeps waiting is not a container.
"""

from __future__ import annotations

from cocon._typing import TYPE_CHECKING

if TYPE_CHECKING:
    from typing import Any

    from cocon.engine.engine import Engine


def reset(e: Engine) -> dict[str, Any]:
    """Remove every container, network, volume and image; returns what was removed."""
    from cocon.engine import netattach
    from cocon.engine.networks import PREDEFINED

    containers = []
    for rec in e.instances.list():
        e.supervisor.remove(rec.id, force=True, volumes=True)
        containers.append(rec.id)
    e.networks.drop_stale_endpoints(rec.id for rec in e.instances.list())
    networks = []
    for net in e.networks.list():
        if net.name not in PREDEFINED:
            e.networks.remove(net.id)
            networks.append(net.name)
    netattach.reset(e)
    volumes = e.imageops.volume_prune(all=True).get("VolumesDeleted") or []
    images = []
    for img in e.imageops.image_list(all=True):
        for entry in e.imageops.image_remove(img["Id"], force=True, prune=True):
            if "Deleted" in entry:
                images.append(entry["Deleted"])
    e.imageops.image_prune(all=True)
    return {"ContainersDeleted": containers, "NetworksDeleted": networks, "VolumesDeleted": volumes,
            "ImagesDeleted": images}  # fmt: skip
