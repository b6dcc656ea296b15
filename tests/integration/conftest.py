"""Fixtures for integration tests: a real debian:bookworm image, bootstrapped once per session.

The packages come from the tarball that `make test`'s set-up downloads once
(scripts/debian-tarball.sh), so the tests bootstrap offline, with debootstrap in an empty network
namespace; it still takes 10-20 s, so every test file shares this one image (and its store).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from cocon.images.bootstrap import bootstrap
from cocon.images.store import Image, ImageStore

DEBIAN_TARBALL = os.path.join(
    os.path.dirname(__file__), "..", "..", ".cache", "debootstrap-bookworm-minbase.tgz"
)


@dataclass
class BootstrappedImage:
    """An image made by cocon.images.bootstrap, with the store it lives in."""

    store: ImageStore
    image: Image
    seconds: float
    events: list[tuple[str, int, int]] = field(default_factory=list)


@pytest.fixture(scope="session")
def debian_image(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BootstrappedImage]:
    """debian:bookworm (minbase) in a store of its own under a session temporary directory.
    Treat it as read-only: other tests share it."""
    root = str(tmp_path_factory.mktemp("debian-bootstrap") / "images")
    store = ImageStore(root)
    events: list[tuple[str, int, int]] = []
    started = time.monotonic()
    assert os.path.isfile(DEBIAN_TARBALL), f"{DEBIAN_TARBALL} is missing: run `make setup` (or make test)"
    image = bootstrap(
        store, "debian:bookworm", tarball=DEBIAN_TARBALL, progress=lambda *event: events.append(event)
    )
    made = BootstrappedImage(store, image, time.monotonic() - started, events)
    yield made
    store.close()
    assert os.listdir(os.path.join(root, "tmp")) == [], "bootstrap left a work directory behind"
