"""Root filesystems from image layers: an overlayfs snapshotter (containerd's model).

Each image layer is unpacked once, in overlay format, into its own directory keyed by its ChainID;
every container (or build step) gets an active snapshot whose writable upper dir sits over those
layers. See docs/snapshots.md.
"""

from __future__ import annotations

from cocon.snapshots.chain import chain_ids, validate_digest
from cocon.snapshots.errors import SnapshotError
from cocon.snapshots.overlay import OverlaySnapshotter, Snapshot
from cocon.snapshots.probe import overlay_supported, overlay_unsupported_reason
from cocon.snapshots.whiteout import is_opaque, is_whiteout, overlay_opaque, overlay_whiteout

__all__ = [
    "OverlaySnapshotter",
    "Snapshot",
    "SnapshotError",
    "chain_ids",
    "is_opaque",
    "is_whiteout",
    "overlay_opaque",
    "overlay_supported",
    "overlay_unsupported_reason",
    "overlay_whiteout",
    "validate_digest",
]
