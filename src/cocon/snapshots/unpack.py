"""Unpack an image's layers into the overlay snapshotter, once per layer (keyed by ChainID)."""

from __future__ import annotations

from collections.abc import Callable

from cocon.content import ContentStore
from cocon.images.layers import apply_layer
from cocon.images.store import Image
from cocon.snapshots.chain import chain_ids
from cocon.snapshots.overlay import OverlaySnapshotter


def unpack_image(
    snapshotter: OverlaySnapshotter,
    content: ContentStore,
    image: Image,
    *,
    progress: Callable[[int, int, str], None] | None = None,
) -> list[str]:
    """Make sure every layer of `image` is unpacked; returns the ChainIDs, lowest layer first (the
    `parents` of a snapshot of the image). Layers unpacked before are not read again. Each layer is
    checked against its diff_id while it is applied (any change to the blob changes what it
    unpacks to); a layer that fails leaves nothing behind. `progress(done, total, chain_id)` is
    called after each layer."""
    chains = chain_ids(image.diff_ids)
    layer_dirs: list[str] = []
    for n, (desc, diff_id, chain) in enumerate(
        zip(image.manifest.layers, image.diff_ids, chains, strict=True)
    ):
        parents = list(reversed(layer_dirs))  # topmost first

        def fill(
            dest: str,
            desc_digest: str = desc.digest,
            media_type: str = desc.media_type,
            diff_id: str = diff_id,
            parents: list[str] = parents,
        ) -> None:
            with content.open(desc_digest) as blob:
                apply_layer(
                    blob,
                    dest,
                    media_type=media_type,
                    expected_diff_id=diff_id,
                    whiteouts="overlay",
                    parents=parents,
                )

        layer_dirs.append(snapshotter.add_layer(chain, fill))
        if progress is not None:
            progress(n + 1, len(chains), chain)
    return chains
