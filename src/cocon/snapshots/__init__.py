"""Root filesystems from image layers: an overlayfs snapshotter (containerd's model).

Each image layer is unpacked once, in overlay format, into its own directory keyed by its ChainID;
every container (or build step) gets an active snapshot whose writable upper dir sits over those
layers. See docs/snapshots.md.

The names below are imported from their modules on first use, so that `cocon run`, which needs only
`cocon.snapshots.overlay`, does not load the rest.
"""

from __future__ import annotations

import sys

from cocon._typing import TYPE_CHECKING

if TYPE_CHECKING:
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

_HOMES = {
    "OverlaySnapshotter": "overlay",
    "Snapshot": "overlay",
    "SnapshotError": "errors",
    "chain_ids": "chain",
    "is_opaque": "whiteout",
    "is_whiteout": "whiteout",
    "overlay_opaque": "whiteout",
    "overlay_supported": "probe",
    "overlay_unsupported_reason": "probe",
    "overlay_whiteout": "whiteout",
    "validate_digest": "chain",
}


def __getattr__(name: str) -> object:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module = f"{__name__}.{home}"
    __import__(module)  # importlib.import_module, without importing importlib
    value = getattr(sys.modules[module], name)
    globals()[name] = value
    return value
