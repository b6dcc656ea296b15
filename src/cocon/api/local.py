"""`LocalClient`: the client interface answered by an engine in this process.

Until the node daemon exists, the CLI uses this. It is the in-process twin of the future HTTP client:
same requests, same JSON-shaped answers, same errors (`APIError` with the status the daemon would
answer with). What only works in-process is how streams travel: the container's process gets this
process's own stdin/stdout/stderr (`Attachment(direct=True)`), or hands back its pty's master side.
"""

from __future__ import annotations

import os

from cocon._typing import TYPE_CHECKING
from cocon.api.client import APIError, Attachment, Client
from cocon.engine.errors import EngineError, StartFailed

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence
    from typing import Any

    from cocon.api.client import Progress
    from cocon.engine.engine import Engine


class _Errors:
    """Turns engine errors into APIError (a class, not contextlib: `cocon run` avoids that import)."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        if isinstance(exc, EngineError):
            raise APIError(
                str(exc), exc.status, exc.exit_code if isinstance(exc, StartFailed) else None
            ) from None


_errors = _Errors()


class LocalClient(Client):
    """The engine in this process (`root`, `run`: its state directories; default $COCON_ROOT and
    $COCON_RUN, else /var/lib/cocon and /run/cocon)."""

    def __init__(self, root: str | None = None, run: str | None = None, engine: Engine | None = None) -> None:
        if engine is None:
            from cocon.engine.engine import Engine

            engine = Engine(root, run)
        self.engine = engine
        self._devnull = -1

    # --- containers --------------------------------------------------------------------------------
    def container_create(self, config: dict[str, Any], name: str | None = None) -> dict[str, Any]:
        with _errors:
            return self.engine.containers.create(config, name)

    def container_start(self, container: str, *, stdin: bool = False) -> Attachment:
        from cocon.isolation.base import Stdio

        if stdin:
            stdin_fd = 0
        else:
            if self._devnull < 0:
                self._devnull = os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)
            stdin_fd = self._devnull
        with _errors:
            pty = self.engine.containers.start(container, Stdio(stdin=stdin_fd, stdout=1, stderr=2))
        return Attachment(direct=pty < 0, fd=pty)

    def container_wait(self, container: str) -> dict[str, Any]:
        with _errors:
            return {"StatusCode": self.engine.containers.wait(container), "Error": None}

    def container_kill(self, container: str, signal: int) -> None:
        with _errors:
            self.engine.containers.kill(container, signal)

    def container_resize(self, container: str, height: int, width: int) -> None:
        with _errors:
            self.engine.containers.resize(container, height, width)

    def container_remove(self, container: str, *, force: bool = False, volumes: bool = False) -> str:
        with _errors:
            return self.engine.containers.remove(container, force=force, volumes=volumes)

    def container_list(self, *, all: bool = False) -> list[dict[str, Any]]:
        with _errors:
            return self.engine.containers.list(all=all)

    def container_inspect(self, container: str) -> dict[str, Any]:
        with _errors:
            return self.engine.containers.inspect(container)

    # --- images ------------------------------------------------------------------------------------
    def image_list(self, *, all: bool = False, dangling: bool | None = None) -> list[dict[str, Any]]:
        with _errors:
            return self.engine.imageops.image_list(all=all, dangling=dangling)

    def image_inspect(self, image: str) -> dict[str, Any]:
        with _errors:
            return self.engine.imageops.image_inspect(image)

    def image_history(self, image: str) -> list[dict[str, Any]]:
        with _errors:
            return self.engine.imageops.image_history(image)

    def image_tag(self, source: str, target: str) -> None:
        with _errors:
            self.engine.imageops.image_tag(source, target)

    def image_remove(self, image: str, *, force: bool = False, noprune: bool = False) -> list[dict[str, str]]:
        with _errors:
            return self.engine.imageops.image_remove(image, force=force, prune=not noprune)

    def image_prune(self, *, all: bool = False) -> dict[str, Any]:
        with _errors:
            return self.engine.imageops.image_prune(all=all)

    def image_import(
        self,
        source: str,
        name: str | None = None,
        *,
        changes: Sequence[str] = (),
        message: str | None = None,
        progress: Progress | None = None,
    ) -> dict[str, Any]:
        with _errors:
            return self.engine.imageops.image_import(
                source, name, changes=changes, message=message, progress=progress
            )

    def image_save(
        self,
        images: Sequence[str],
        dest: str,
        *,
        format: str = "oci-archive",
        progress: Progress | None = None,
    ) -> dict[str, Any]:
        with _errors:
            return self.engine.imageops.image_save(images, dest, format=format, progress=progress)

    def image_load(self, source: str, *, progress: Progress | None = None) -> list[dict[str, Any]]:
        with _errors:
            return self.engine.imageops.image_load(source, progress=progress)

    def image_bootstrap(
        self, what: str, *, mirror: str | None = None, progress: Progress | None = None
    ) -> dict[str, Any]:
        with _errors:
            return self.engine.imageops.image_bootstrap(what, mirror=mirror, progress=progress)

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
        with _errors:
            return self.engine.imageops.image_build(
                context,
                tags=tags,
                dockerfile=dockerfile,
                build_args=build_args,
                target=target,
                no_cache=no_cache,
                output=output,
            )

    # --- volumes -----------------------------------------------------------------------------------
    def volume_create(
        self, name: str | None = None, *, labels: dict[str, str] | None = None
    ) -> dict[str, Any]:
        with _errors:
            return self.engine.imageops.volume_create(name, labels)

    def volume_list(self) -> dict[str, Any]:
        with _errors:
            return self.engine.imageops.volume_list()

    def volume_inspect(self, name: str) -> dict[str, Any]:
        with _errors:
            return self.engine.imageops.volume_inspect(name)

    def volume_remove(self, name: str, *, force: bool = False) -> None:
        with _errors:
            self.engine.imageops.volume_remove(name, force=force)

    def volume_prune(self, *, all: bool = False) -> dict[str, Any]:
        with _errors:
            return self.engine.imageops.volume_prune(all=all)

    def close(self) -> None:
        if self._devnull >= 0:
            os.close(self._devnull)
            self._devnull = -1
        self.engine.close()
