"""`cocon build`: run a Containerfile into an image, step by step, with a layer cache.

    builder = Builder(store, snapshotter, state_dir=f"{root}/build")
    result = builder.build("ctx", tags=["app:1"], on_event=print_events(sys.stdout))

The Containerfile is parsed and resolved by `cocon.images.containerfile` (stages, ARG/ENV expansion,
ONBUILD triggers); this module executes it:

- **FROM** takes an image of the store (`store.resolve`), `scratch`, or an earlier stage's result.
- **RUN** runs in a container on an overlay snapshot of the image so far (see `build_run`); **COPY**
  and **ADD** copy into such a snapshot (see `build_copy`). The snapshot's upper directory becomes
  the step's layer (an uncompressed tar in the content store); an empty diff adds no layer
  (`empty_layer` history, as BuildKit). The new layer is moved into the snapshotter as the next
  step's lower layer, so it is never unpacked again.
- Every other instruction changes the image config only (history entry with `empty_layer`);
  WORKDIR also creates its directory (a layer only if it did not exist).
- Each step's result (config + layers) is recorded in the build cache (`build_cache`) under a key
  made of the parent image ID and the expanded instruction (plus the build environment for RUN and
  the sources' content digest for COPY/ADD). A hit reuses the result without running anything.
  Intermediate results are cache entries, not images; only the target stage's result is committed
  to the image store, with the `-t` names.

A failing step raises `StepFailed` (a `BuildError`) naming the file, line, step, instruction and
exit status, after removing its snapshot and container: no image and no tag are made.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import posixpath
import shutil
import stat
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import IO, Any, BinaryIO, TextIO, cast

from cocon.content import ContentError
from cocon.engine.build_cache import (
    BuildCache,
    CacheEntry,
    SourceDigest,
    config_op,
    copy_op,
    run_op,
    step_key,
)
from cocon.engine.build_copy import (
    URL_PREFIXES,
    CopyError,
    CopyOptions,
    Item,
    SourceRoot,
    TargetRoot,
    archive_kind,
    copy_items,
    digest_items,
    expand_sources,
    heredoc_item,
    parse_chmod,
    resolve_chown,
)
from cocon.engine.build_run import DirMeta, RunRequest, drop_copied_up, run_container
from cocon.images.build_errors import BuildError, ContainerfileError
from cocon.images.containerfile import (
    Add,
    Arg,
    BaseImageConfig,
    Cmd,
    Copy,
    Entrypoint,
    Env,
    Expose,
    Healthcheck,
    Instruction,
    Label,
    Maintainer,
    Onbuild,
    ResolvedInstruction,
    ResolvedStage,
    Run,
    Shell,
    StopSignal,
    User,
    Volume,
    Workdir,
    parse,
)
from cocon.images.dockerignore import DockerIgnore
from cocon.images.errors import ImageError
from cocon.images.layers import Compression, apply_layer, create_layer
from cocon.images.store import ImageStore, normalize_name
from cocon.isolation.spec import DEFAULT_PATH, SpecError, resolve_user
from cocon.oci.errors import OCIError
from cocon.oci.image_spec import (
    ContainerConfig,
    Descriptor,
    History,
    ImageConfig,
    RootFS,
    encode_image_config,
    format_platform,
    host_platform,
    parse_image_config,
    parse_platform,
)
from cocon.oci.image_spec import Healthcheck as ImageHealthcheck
from cocon.oci.runtime_spec import Mount
from cocon.runtime.state import process_start_time
from cocon.snapshots import OverlaySnapshotter, SnapshotError, chain_ids

DEFAULT_SHELL = ["/bin/sh", "-c"]
CONTAINERFILES = ("Containerfile", "Dockerfile")
HISTORY_COMMENT = "cocon build"
_OUTPUT_TAIL = 4096


# --- events ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StepStarted:
    step: int  # 1-based, over every stage built
    total: int
    stage: str  # the stage's name, or "stage-N"
    stage_number: int  # 1-based among the stages built
    stages: int
    instruction: str  # as written (continuations joined)
    line: int

    @property
    def text(self) -> str:
        return f"STEP {self.step}/{self.total}: {self.instruction}"


@dataclass(frozen=True)
class StepCached:
    step: int
    image_id: str  # the cached result


@dataclass(frozen=True)
class StepOutput:
    step: int
    stream: str  # "stdout" or "stderr"
    data: bytes


@dataclass(frozen=True)
class StepDone:
    step: int
    image_id: str  # the image after the step
    layer: str | None  # diff_id of the layer the step added (None: config only, or an empty diff)
    size: int  # bytes of that layer blob
    cached: bool
    seconds: float


@dataclass(frozen=True)
class BuildWarning:
    message: str


@dataclass(frozen=True)
class BuildFinished:
    image_id: str
    names: tuple[str, ...]  # familiar names, as given with -t
    seconds: float


BuildEvent = StepStarted | StepCached | StepOutput | StepDone | BuildWarning | BuildFinished
EventCallback = Callable[[BuildEvent], None]


def _short(image_id: str) -> str:
    return image_id.partition(":")[2][:12]


def print_events(stream: TextIO | None = None) -> EventCallback:
    """A plain-text printer for `build(on_event=...)`, buildah's style: one line per step,
    `--> Using cache` for hits, RUN output as it comes, the new image ID last."""
    out = stream if stream is not None else sys.stdout
    binary: IO[bytes] | None = getattr(out, "buffer", None)

    def emit(event: BuildEvent) -> None:
        if isinstance(event, StepStarted):
            prefix = f"[{event.stage_number}/{event.stages}] " if event.stages > 1 else ""
            out.write(f"{prefix}{event.text}\n")
        elif isinstance(event, StepCached):
            out.write(f"--> Using cache {event.image_id.partition(':')[2]}\n")
        elif isinstance(event, StepOutput):
            if binary is not None:
                out.flush()
                binary.write(event.data)
                binary.flush()
            else:
                out.write(event.data.decode(errors="replace"))
        elif isinstance(event, StepDone):
            out.write(f"--> {_short(event.image_id)}\n")
        elif isinstance(event, BuildWarning):
            out.write(f"WARNING: {event.message}\n")
        elif isinstance(event, BuildFinished):
            for name in event.names:
                out.write(f"Successfully tagged {name}\n")
            out.write(f"{event.image_id.partition(':')[2]}\n")
        out.flush()

    return emit


# --- results and errors ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class StageResult:
    index: int
    name: str  # the AS name, or "stage-N"
    image_id: str


@dataclass(frozen=True)
class BuildResult:
    image_id: str
    manifest_digest: str
    names: tuple[str, ...]  # normalized references given to the image
    stages: tuple[StageResult, ...]
    steps: int
    cached_steps: int
    seconds: float
    warnings: tuple[str, ...]


class StepFailed(BuildError):
    """A build step failed (a RUN exited non-zero, a COPY source is missing, ...)."""

    def __init__(
        self,
        message: str,
        *,
        step: int,
        instruction: str,
        exit_code: int | None = None,
        output: bytes = b"",
    ) -> None:
        super().__init__(message)
        self.step = step
        self.instruction = instruction
        self.exit_code = exit_code
        self.output = output  # the last few KiB of a RUN's output


# --- the image being built -------------------------------------------------------------------------------


@dataclass
class _Image:
    config: ImageConfig
    config_bytes: bytes
    layers: list[Descriptor]

    @property
    def id(self) -> str:
        return "sha256:" + hashlib.sha256(self.config_bytes).hexdigest()

    @property
    def diff_ids(self) -> list[str]:
        return list(self.config.rootfs.diff_ids)

    @classmethod
    def make(cls, config: ImageConfig, layers: Sequence[Descriptor]) -> _Image:
        return cls(config=config, config_bytes=encode_image_config(config), layers=list(layers))

    @classmethod
    def from_entry(cls, entry: CacheEntry) -> _Image:
        config = parse_image_config(entry.config, "cached image config")
        return cls(config=config, config_bytes=entry.config, layers=list(entry.layers))


def _now() -> str:
    ns = time.time_ns()
    return (
        time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ns // 1_000_000_000)) + f".{ns % 1_000_000_000:09d}Z"
    )


def _empty_image() -> _Image:
    host = host_platform()
    config = ImageConfig(
        architecture=host.architecture,
        os=host.os,
        variant=host.variant,
        config=ContainerConfig(env=[f"PATH={DEFAULT_PATH}"]),
        rootfs=RootFS(type="layers", diff_ids=[]),
        history=[],
    )
    return _Image.make(config, [])


def _set_env(env: list[str], key: str, value: str) -> list[str]:
    out = list(env)
    for i, item in enumerate(out):
        if item.partition("=")[0] == key:
            out[i] = f"{key}={value}"
            return out
    out.append(f"{key}={value}")
    return out


def _json(words: Sequence[str]) -> str:
    return json.dumps(list(words))


@dataclass
class _StageState:
    image: _Image
    args: dict[str, str]  # ARGs in scope with values (for RUN's history text)
    cmd_set: bool = False


# --- the builder -----------------------------------------------------------------------------------------


class Builder:
    """Builds Containerfiles into images of `store`, with RUN/COPY snapshots from `snapshotter` and
    its runtime state, bundles, scratch space and cache database under `state_dir`."""

    def __init__(
        self,
        store: ImageStore,
        snapshotter: OverlaySnapshotter,
        *,
        state_dir: str,
        compression: Compression = None,
        cgroup_parent: str | None = None,
    ) -> None:
        self.store = store
        self.snapshotter = snapshotter
        self.state_dir = os.path.abspath(state_dir)
        self.compression = compression
        self.cgroup_parent = cgroup_parent
        os.makedirs(self.state_dir, 0o700, exist_ok=True)
        self.runtime_root = os.path.join(self.state_dir, "runtime")
        self.bundle_root = os.path.join(self.state_dir, "bundles")
        self.tmp_root = os.path.join(self.state_dir, "tmp")
        self.steps_root = os.path.join(self.state_dir, "steps")
        for d in (self.runtime_root, self.bundle_root, self.tmp_root, self.steps_root):
            os.makedirs(d, 0o700, exist_ok=True)
        self.cache = BuildCache(self.state_dir)

    def close(self) -> None:
        self.cache.close()

    def recover(self) -> list[str]:
        """Clean up after build steps whose process died (killed with SIGKILL, a crash): their
        container, snapshot, bundle and scratch directory. Steps of live builds are left alone.
        Runs at the start of every build; returns the step ids it cleaned."""
        from cocon.engine.build_run import force_delete
        from cocon.runtime.state import process_start_time

        cleaned: list[str] = []
        for name in sorted(os.listdir(self.steps_root)):
            marker = os.path.join(self.steps_root, name)
            try:
                with open(marker) as f:
                    pid_text, _, start_text = f.read().partition(" ")
                pid, start = int(pid_text), int(start_text)
            except (OSError, ValueError):
                pid, start = 0, 0
            if pid > 0 and process_start_time(pid) == start:
                continue  # that build is still running
            force_delete(self.runtime_root, name)
            try:
                self.snapshotter.remove(name)
            except SnapshotError:
                continue  # still mounted somewhere: try again next time
            for d in (self.bundle_root, self.tmp_root):
                shutil.rmtree(os.path.join(d, name), ignore_errors=True)
            os.unlink(marker)
            cleaned.append(name)
        return cleaned

    def cache_roots(self) -> list[str]:
        """Blobs the build cache needs: `store.gc(extra_roots=builder.cache_roots)`."""
        return self.cache.roots()

    def gc(self) -> list[str]:
        """Content GC that keeps both the images and the build cache's layers."""
        return [str(d) for d in self.store.gc(extra_roots=self.cache.roots)]

    def prune_cache(self, *, unused_for: float | None = None) -> int:
        """Forget cached steps (all, or those unused for `unused_for` seconds); then `gc()` frees them."""
        return self.cache.prune(unused_for=unused_for)

    def build(
        self,
        context_dir: str,
        *,
        dockerfile: str | None = None,
        tags: Sequence[str] = (),
        build_args: Mapping[str, str] | None = None,
        target: str | None = None,
        no_cache: bool = False,
        on_event: EventCallback | None = None,
    ) -> BuildResult:
        """Build the Containerfile (default `<context>/Containerfile`, else `Dockerfile`; a relative
        `dockerfile` is looked up in the current directory, then in the context) and name the result
        `tags`. `no_cache` runs every step (and refreshes the cache with the results)."""
        self.recover()
        run = _Build(self, context_dir, dockerfile, tags, dict(build_args or {}), target, no_cache, on_event)
        return run.execute()


class _Build:
    def __init__(
        self,
        builder: Builder,
        context_dir: str,
        dockerfile: str | None,
        tags: Sequence[str],
        build_args: dict[str, str],
        target: str | None,
        no_cache: bool,
        on_event: EventCallback | None,
    ) -> None:
        self.b = builder
        self.store = builder.store
        self.snap = builder.snapshotter
        self.content = builder.store.content
        self.context = os.path.abspath(context_dir)
        self.dockerfile_arg = dockerfile
        self.tags = list(tags)
        self.build_args = build_args
        self.target = target
        self.no_cache = no_cache
        self.on_event = on_event
        self.filename = "Containerfile"
        self.containerfile_path = ""
        self.step = 0
        self.total = 0
        self.cached = 0
        self.warnings: list[str] = []
        self.ignore: DockerIgnore | None = None
        self._context_root: SourceRoot | None = None
        self._base_images: dict[str, _Image] = {}
        self._stage_args: dict[int, dict[str, str]] = {}

    # -- plumbing ----------------------------------------------------------------------------------------

    def emit(self, event: BuildEvent) -> None:
        if self.on_event is not None:
            self.on_event(event)

    def warn(self, message: str) -> None:
        self.warnings.append(message)
        self.emit(BuildWarning(message))

    def where(self, line: int) -> str:
        return f"{self.filename}:{line}"

    def _find_containerfile(self) -> tuple[str, str]:
        if not os.path.isdir(self.context):
            raise BuildError(
                f"build context {self.context!r} is not a directory: give the directory with the "
                "Containerfile and the files it copies"
            )
        arg = self.dockerfile_arg
        if arg is None:
            for name in CONTAINERFILES:
                path = os.path.join(self.context, name)
                if os.path.isfile(path):
                    return path, name
            raise BuildError(
                f"no Containerfile or Dockerfile in {self.context}: write one there or give its path with -f"
            )
        candidates = [arg] if os.path.isabs(arg) else [os.path.abspath(arg), os.path.join(self.context, arg)]
        for path in candidates:
            if os.path.isfile(path):
                return path, arg
        raise BuildError(
            f"cannot find the Containerfile {arg!r} (looked in the current directory and the context)"
        )

    # -- the whole build ---------------------------------------------------------------------------------

    def execute(self) -> BuildResult:
        started = time.monotonic()
        names = [normalize_name(t) for t in self.tags]  # a bad -t fails before any work
        path, self.filename = self._find_containerfile()
        self.containerfile_path = path
        try:
            with open(path, encoding="utf-8", errors="surrogateescape") as f:
                text = f.read()
        except OSError as exc:
            raise BuildError(f"cannot read {path}: {exc.strerror}") from None
        cf = parse(text, self.filename)
        for warning in cf.warnings:
            self.warn(warning)
        stages = cf.resolve(self.build_args, self.target, base_image=lambda ref, plat: self._base_config(ref))
        unused = cf.unused_build_args(self.build_args, self.target)
        if unused:
            self.warn(f"one or more build-args {unused} were not consumed")
        self.ignore = DockerIgnore.load(self.context, path)
        self.total = sum(1 + len(s.instructions) for s in stages)
        results: dict[int, _Image] = {}
        stage_results: list[StageResult] = []
        try:
            for number, stage in enumerate(stages, 1):
                image = self._run_stage(stage, number, len(stages), results)
                results[stage.index] = image
                stage_results.append(StageResult(stage.index, stage.display_name, image.id))
        finally:
            if self._context_root is not None:
                self._context_root.close()
        final = results[stages[-1].index]
        committed = self.store.commit(final.config_bytes, final.layers, names=names)
        seconds = time.monotonic() - started
        self.emit(BuildFinished(committed.id, tuple(_familiar(n) for n in names), seconds))
        return BuildResult(
            image_id=committed.id,
            manifest_digest=committed.manifest_digest,
            names=tuple(names),
            stages=tuple(stage_results),
            steps=self.total,
            cached_steps=self.cached,
            seconds=seconds,
            warnings=tuple(self.warnings),
        )

    def _base_config(self, ref: str) -> BaseImageConfig:
        image = self._base_image(ref, None)
        cc = image.config.config or ContainerConfig()
        return BaseImageConfig(env=list(cc.env or []), onbuild=list(cc.on_build or []))

    def _base_image(self, ref: str, line: int | None) -> _Image:
        if ref not in self._base_images:
            try:
                img = self.store.resolve(ref)
                config_bytes = self.content.read(img.manifest.config.digest)
            except ImageError as exc:
                where = self.where(line) + ": " if line else f"{self.filename}: "
                raise BuildError(f"{where}FROM {ref}: {exc}") from None
            self._base_images[ref] = _Image(config=img.config, config_bytes=config_bytes,
                                            layers=list(img.manifest.layers))  # fmt: skip
        return self._base_images[ref]

    # -- stages ------------------------------------------------------------------------------------------

    def _run_stage(self, stage: ResolvedStage, number: int, count: int, results: dict[int, _Image]) -> _Image:
        from_text = f"FROM {stage.base}" + (f" AS {stage.name}" if stage.name else "")
        if stage.platform:
            from_text = f"FROM --platform={stage.platform} {stage.base}" + (
                f" AS {stage.name}" if stage.name else ""
            )
        self.step += 1
        self.emit(
            StepStarted(self.step, self.total, stage.display_name, number, count, from_text, stage.line)
        )
        t0 = time.monotonic()
        if stage.platform:
            self._check_platform(stage.platform, stage.line)
        if stage.base_stage is not None:
            image = results[stage.base_stage]
        elif stage.base == "scratch":
            image = _empty_image()
        else:
            image = self._base_image(stage.base, stage.line)
            host = host_platform()
            if image.config.architecture != host.architecture:
                self.warn(
                    f"{self.where(stage.line)}: image {stage.base} is for {image.config.os}/"
                    f"{image.config.architecture}, this machine is {format_platform(host)}: its RUN steps "
                    "will probably fail"
                )
        cc = image.config.config
        if cc is not None and cc.on_build:
            # the base's ONBUILD triggers ran (they are among the stage's instructions): they are
            # consumed, the new image does not carry them (Docker)
            config = copy.deepcopy(image.config)
            assert config.config is not None
            config.config.on_build = None
            image = _Image.make(config, image.layers)
        state = _StageState(image=image, args={})
        if stage.base_stage is not None:
            state.args = dict(self._stage_args.get(stage.base_stage, {}))
        self.cached += 1  # FROM runs nothing: it counts as reused
        self.emit(StepDone(self.step, image.id, None, 0, True, time.monotonic() - t0))
        for ri in stage.instructions:
            self._step(stage, ri, state, number, count, results)
        self._stage_args[stage.index] = state.args
        return state.image

    def _check_platform(self, platform: str, line: int) -> None:
        host = host_platform()
        try:
            want = parse_platform(platform)
        except OCIError as exc:
            raise BuildError(f"{self.where(line)}: FROM --platform={platform}: {exc}") from None
        if (want.os, want.architecture) != (host.os, host.architecture):
            raise BuildError(
                f"{self.where(line)}: FROM --platform={platform}: cocon build runs every step on this "
                f"machine ({format_platform(host)}) and cannot emulate others; remove --platform or build "
                f"on a {format_platform(want)} machine"
            )

    # -- one step ----------------------------------------------------------------------------------------

    def _step(
        self,
        stage: ResolvedStage,
        ri: ResolvedInstruction,
        state: _StageState,
        number: int,
        count: int,
        results: dict[int, _Image],
    ) -> None:
        ins = ri.instruction
        self.step += 1
        shown = ins.original.strip() or ins.keyword
        if ri.from_onbuild:
            shown = f"{shown} (ONBUILD trigger of the base)"
        self.emit(StepStarted(self.step, self.total, stage.display_name, number, count, shown, ins.line))
        try:
            if isinstance(ins, Run):
                self._run(stage, ri, ins, state)
            elif isinstance(ins, Copy | Add):
                self._copy(stage, ri, ins, state, results)
            elif isinstance(ins, Workdir):
                self._workdir(ins, state)
            else:
                self._metadata(stage, ri, ins, state)
        except (StepFailed, ContainerfileError):
            raise
        except (ImageError, SnapshotError, SpecError, ContentError, OSError) as exc:
            # CopyError and RunError are ImageErrors; a damaged layer blob is a LayerError
            raise StepFailed(
                f"{self.where(ins.line)}: step {self.step}/{self.total} `{shown}`: {exc}",
                step=self.step,
                instruction=shown,
            ) from None

    def _cached(self, key: str) -> _Image | None:
        if self.no_cache:
            return None
        entry = self.b.cache.get(key)
        if entry is None:
            return None
        if not all(self.content.exists(d.digest) for d in entry.layers):
            self.b.cache.remove(key)  # its blobs were collected: run the step again
            return None
        try:
            return _Image.from_entry(entry)
        except OCIError:
            self.b.cache.remove(key)
            return None

    def _hit(self, key: str, state: _StageState, t0: float) -> bool:
        image = self._cached(key)
        if image is None:
            return False
        state.image = image
        self.cached += 1
        self.emit(StepCached(self.step, image.id))
        self.emit(StepDone(self.step, image.id, None, 0, True, time.monotonic() - t0))
        return True

    def _record(
        self, key: str, state: _StageState, image: _Image, layer: tuple[Descriptor, str] | None, t0: float
    ) -> None:
        self.b.cache.put(key, image.config_bytes, image.layers)
        state.image = image
        self.emit(
            StepDone(
                self.step,
                image.id,
                layer[1] if layer else None,
                layer[0].size if layer else 0,
                False,
                time.monotonic() - t0,
            )
        )

    def _next_image(
        self,
        parent: _Image,
        created_by: str,
        layer: tuple[Descriptor, str] | None,
        change: Callable[[ImageConfig], None] | None = None,
    ) -> _Image:
        config = copy.deepcopy(parent.config)
        if config.config is None:
            config.config = ContainerConfig()
        if change is not None:
            change(config)
        created = _now()
        config.created = created
        history = list(config.history or [])
        history.append(History(created=created, created_by=created_by, comment=HISTORY_COMMENT,
                               empty_layer=layer is None))  # fmt: skip
        config.history = history
        layers = list(parent.layers)
        if layer is not None:
            layers.append(layer[0])
            config.rootfs = RootFS(type="layers", diff_ids=[*config.rootfs.diff_ids, layer[1]])
        return _Image.make(config, layers)

    # -- metadata instructions ---------------------------------------------------------------------------

    def _metadata(
        self, stage: ResolvedStage, ri: ResolvedInstruction, ins: Instruction, state: _StageState
    ) -> None:
        t0 = time.monotonic()
        if isinstance(ins, Arg):
            for key, value in ins.pairs:
                if value is not None:
                    state.args[key] = value
                else:
                    state.args.pop(key, None)
            # ARG changes nothing in the image (BuildKit writes no history for it)
            self.cached += 1
            self.emit(StepDone(self.step, state.image.id, None, 0, True, time.monotonic() - t0))
            return
        shell = self._shell(state)
        if isinstance(ins, Cmd | Entrypoint):
            argv = [*shell, *ins.command] if ins.prepend_shell else list(ins.command)
            extra: dict[str, Any] = {"resolved": argv}
            if isinstance(ins, Entrypoint):
                extra["cmd_set"] = state.cmd_set
            op = config_op(ins, **extra)
        else:
            op = config_op(ins)
        key = step_key(state.image.id, op)
        if isinstance(ins, Cmd):
            state.cmd_set = True
        if self._hit(key, state, t0):
            return
        change, created_by = self._config_change(ins, state, op)
        image = self._next_image(state.image, created_by, None, change)
        self._record(key, state, image, None, t0)

    def _shell(self, state: _StageState) -> list[str]:
        cc = state.image.config.config
        return list(cc.shell) if cc is not None and cc.shell else list(DEFAULT_SHELL)

    def _config_change(
        self, ins: Instruction, state: _StageState, op: dict[str, Any]
    ) -> tuple[Callable[[ImageConfig], None], str]:
        def cc(config: ImageConfig) -> ContainerConfig:
            assert config.config is not None
            return config.config

        if isinstance(ins, Env):

            def change(c: ImageConfig) -> None:
                env = list(cc(c).env or [])
                for k, v in ins.pairs:
                    env = _set_env(env, k, v)
                cc(c).env = env

            return change, "ENV " + " ".join(f"{k}={v}" for k, v in ins.pairs)
        if isinstance(ins, Label):

            def change(c: ImageConfig) -> None:
                labels = dict(cc(c).labels or {})
                labels.update(dict(ins.pairs))
                cc(c).labels = labels

            return change, "LABEL " + " ".join(f"{k}={v}" for k, v in ins.pairs)
        if isinstance(ins, User):

            def change(c: ImageConfig) -> None:
                cc(c).user = ins.user

            return change, f"USER {ins.user}"
        if isinstance(ins, Cmd):
            command: list[str] = op["resolved"]

            def change(c: ImageConfig) -> None:
                cc(c).cmd = command

            return change, f"CMD {_json(command)}"
        if isinstance(ins, Entrypoint):
            entry: list[str] = op["resolved"]
            keep_cmd = bool(op["cmd_set"])

            def change(c: ImageConfig) -> None:
                cc(c).entrypoint = entry
                if not keep_cmd:
                    cc(c).cmd = None  # ENTRYPOINT resets a CMD inherited from the base (Docker)

            return change, f"ENTRYPOINT {_json(entry)}"
        if isinstance(ins, Expose):

            def change(c: ImageConfig) -> None:
                ports = dict(cc(c).exposed_ports or {})
                for p in ins.ports:
                    ports[p] = {}
                cc(c).exposed_ports = ports

            return change, "EXPOSE " + " ".join(ins.ports)
        if isinstance(ins, Volume):

            def change(c: ImageConfig) -> None:
                volumes = dict(cc(c).volumes or {})
                for p in ins.paths:
                    volumes[p] = {}
                cc(c).volumes = volumes

            return change, f"VOLUME {_json(ins.paths)}"
        if isinstance(ins, StopSignal):

            def change(c: ImageConfig) -> None:
                cc(c).stop_signal = ins.signal

            return change, f"STOPSIGNAL {ins.signal}"
        if isinstance(ins, Healthcheck):
            hc = ImageHealthcheck(
                test=list(ins.test),
                interval=ins.interval or None,
                timeout=ins.timeout or None,
                start_period=ins.start_period or None,
                start_interval=ins.start_interval or None,
                retries=ins.retries or None,
            )

            def change(c: ImageConfig) -> None:
                cc(c).healthcheck = hc

            if ins.test == ["NONE"]:
                return change, "HEALTHCHECK NONE"
            return change, f"HEALTHCHECK {_json(ins.test)}"
        if isinstance(ins, Shell):

            def change(c: ImageConfig) -> None:
                cc(c).shell = list(ins.shell)

            return change, f"SHELL {_json(ins.shell)}"
        if isinstance(ins, Onbuild):

            def change(c: ImageConfig) -> None:
                cc(c).on_build = [*(cc(c).on_build or []), ins.expression]

            return change, f"ONBUILD {ins.expression}"
        if isinstance(ins, Maintainer):

            def change(c: ImageConfig) -> None:
                c.author = ins.maintainer

            return change, f"MAINTAINER {ins.maintainer}"
        raise BuildError(f"{self.where(ins.line)}: {ins.keyword}: cocon build does not run this instruction")

    # -- snapshots ---------------------------------------------------------------------------------------

    def _ensure_layers(self, image: _Image) -> list[str]:
        """The image's layers in the snapshotter (unpacked from their blobs if missing): chain ids."""
        chains = chain_ids(image.diff_ids)
        dirs: list[str] = []
        for desc, diff_id, chain in zip(image.layers, image.diff_ids, chains, strict=True):
            parents = list(reversed(dirs))

            def fill(
                dest: str, desc: Descriptor = desc, diff_id: str = diff_id, parents: list[str] = parents
            ) -> None:
                with self.content.open(desc.digest) as blob:
                    apply_layer(blob, dest, media_type=desc.media_type, expected_diff_id=diff_id,
                                whiteouts="overlay", parents=parents)  # fmt: skip

            if not self.snap.has_layer(chain):
                self.snap.add_layer(chain, fill)
            dirs.append(self.snap.layer_dir(chain))
        return chains

    @contextmanager
    def _snapshot(self, image: _Image, *, readonly: bool = False) -> Iterator[tuple[str, str]]:
        """A mounted snapshot of `image`: (key, merged path); removed (unmounted first) afterwards."""
        chains = self._ensure_layers(image)
        key = f"build-{uuid.uuid4().hex[:16]}"
        marker = os.path.join(self.b.steps_root, key)
        with open(marker, "w") as f:  # who owns the step, for Builder.recover() after a crash
            f.write(f"{os.getpid()} {process_start_time(os.getpid()) or 0}")
        try:
            self.snap.prepare(key, chains, readonly=readonly)
            try:
                yield key, self.snap.mount(key)
            finally:
                self.snap.remove(key)
        finally:
            os.unlink(marker)

    def _commit_step(
        self,
        key: str,
        parent: _Image,
        cache_key: str,
        created_by: str,
        state: _StageState,
        t0: float,
        change: Callable[[ImageConfig], None] | None = None,
        copied_up: dict[str, DirMeta] | None = None,
    ) -> None:
        """Unmount the step's snapshot, turn its upper dir into a layer (none for an empty diff),
        record the result in the cache, and hand the layer to the snapshotter for the next step."""
        self.snap.unmount(key)
        upper = self.snap.upper_dir(key)
        if copied_up:
            drop_copied_up(upper, copied_up)
        with self.content.lease():
            layer: tuple[Descriptor, str] | None = None
            if os.listdir(upper):
                with self.content.writer() as w:
                    info = create_layer(upper, cast(BinaryIO, w), compression=self.b.compression)
                    digest = w.commit()
                layer = (
                    Descriptor(media_type=info.media_type, digest=str(digest), size=info.size),
                    info.diff_id,
                )
            image = self._next_image(parent, created_by, layer, change)
            self._record(cache_key, state, image, layer, t0)
        if layer is not None:
            self._adopt_upper(image, upper)

    def _adopt_upper(self, image: _Image, upper: str) -> None:
        """Make the step's upper dir the new layer's directory in the snapshotter (renames only): it
        is already in overlay format, so the next step needs no unpacking (containerd's commit)."""
        chain = chain_ids(image.diff_ids)[-1]
        if self.snap.has_layer(chain):
            return

        def fill(dest: str) -> None:
            for name in os.listdir(upper):
                os.rename(os.path.join(upper, name), os.path.join(dest, name))
            st = os.stat(upper)
            os.chmod(dest, stat.S_IMODE(st.st_mode))
            os.chown(dest, st.st_uid, st.st_gid)

        try:
            self.snap.add_layer(chain, fill)
        except (OSError, SnapshotError):
            pass  # it will be unpacked from the blob when needed

    # -- RUN ---------------------------------------------------------------------------------------------

    def _run(self, stage: ResolvedStage, ri: ResolvedInstruction, ins: Run, state: _StageState) -> None:
        t0 = time.monotonic()
        if ins.unsupported:
            raise StepFailed(
                f"{self.where(ins.line)}: {'; '.join(ins.unsupported)} (remove the flag)",
                step=self.step,
                instruction=ins.original,
            )
        shell = self._shell(state)
        script_file: tuple[str, str] | None = None
        single = ins.single_heredoc if ins.prepend_shell else None
        if single is not None and single.text.startswith("#!"):
            script_file = (single.name, single.text)
            argv = [f"/dev/pipes/{single.name}"]
        elif ins.prepend_shell:
            argv = [*shell, ins.shell_script()]
        else:
            argv = list(ins.command)
        network = "none" if ins.network == "none" else "host"
        build_env = dict(ri.env)
        key = step_key(state.image.id, run_op(ins, argv, build_env, network, script_file))
        if self._hit(key, state, t0):
            return
        args = {k: v for k, v in state.args.items()}
        prefix = f"|{len(args)} " + " ".join(f"{k}={v}" for k, v in args.items()) + " " if args else ""
        created_by = f"RUN {prefix}{' '.join(argv)}"
        env = [f"{k}={v}" for k, v in {**build_env, **stage.proxy_env}.items()]
        if not any(e.startswith("PATH=") for e in env):
            env.insert(0, f"PATH={DEFAULT_PATH}")
        cc = state.image.config.config or ContainerConfig()
        cwd = cc.working_dir or "/"
        parent = state.image
        with self._snapshot(parent) as (snap_key, rootfs):
            if cwd != "/":
                target = TargetRoot(rootfs)
                try:
                    fd, _ = target.mkdir_all(cwd, (0, 0))
                    os.close(fd)
                finally:
                    target.close()
            cid = snap_key
            mounts: list[Mount] = []
            scratch = None
            if script_file is not None:
                scratch = os.path.join(self.b.tmp_root, cid)
                os.makedirs(scratch, 0o700)
                path = os.path.join(scratch, "script")
                with open(path, "w") as f:
                    f.write(script_file[1])
                os.chmod(path, 0o755)
                mounts.append(Mount(destination=argv[0], type="bind", source=path, options=["rbind", "ro"]))
            tail = bytearray()

            def output(stream: str, data: bytes) -> None:
                tail.extend(data)
                del tail[:-_OUTPUT_TAIL]
                self.emit(StepOutput(self.step, stream, data))

            try:
                result = run_container(
                    RunRequest(
                        container_id=cid,
                        rootfs=rootfs,
                        args=argv,
                        env=env,
                        cwd=cwd,
                        user=cc.user or "",
                        network=network,
                        mounts=mounts,
                        cgroups_path=f"{self.b.cgroup_parent.rstrip('/')}/{cid}"
                        if self.b.cgroup_parent
                        else None,
                    ),
                    runtime_root=self.b.runtime_root,
                    bundle_root=self.b.bundle_root,
                    on_output=output,
                )
            finally:
                if scratch is not None:
                    shutil.rmtree(scratch, ignore_errors=True)
            status = result.status
            if status != 0:
                shown = ins.original.strip()
                raise StepFailed(
                    f"{self.where(ins.line)}: step {self.step}/{self.total} `{shown}` failed: the command "
                    f"exited with status {status}",
                    step=self.step,
                    instruction=shown,
                    exit_code=status,
                    output=bytes(tail),
                )
            self._commit_step(snap_key, parent, key, created_by, state, t0, copied_up=result.copied_up)

    # -- WORKDIR -----------------------------------------------------------------------------------------

    def _workdir(self, ins: Workdir, state: _StageState) -> None:
        t0 = time.monotonic()
        cc = state.image.config.config or ContainerConfig()
        path = ins.path if ins.path.startswith("/") else posixpath.join(cc.working_dir or "/", ins.path)
        path = posixpath.normpath(path)
        if path.startswith("//"):
            path = path[1:]
        key = step_key(state.image.id, config_op(ins, resolved=path))
        if self._hit(key, state, t0):
            return

        def change(c: ImageConfig) -> None:
            assert c.config is not None
            c.config.working_dir = path

        parent = state.image
        created_by = f"WORKDIR {path}"
        if path == "/":
            self._record(key, state, self._next_image(parent, created_by, None, change), None, t0)
            return
        with self._snapshot(parent) as (snap_key, rootfs):
            owner = (0, 0)
            if cc.user:
                try:
                    uid, gid, _, _ = resolve_user(rootfs, cc.user)
                except SpecError as exc:
                    raise CopyError(f"USER {cc.user}: {exc}") from None
                owner = (uid, gid)
            target = TargetRoot(rootfs)
            try:
                fd, _ = target.mkdir_all(path, owner)
                os.close(fd)
            finally:
                target.close()
            self._commit_step(snap_key, parent, key, created_by, state, t0, change)

    # -- COPY / ADD --------------------------------------------------------------------------------------

    def _context_source(self) -> SourceRoot:
        if self._context_root is None:
            included = None
            if self.ignore:
                included = frozenset(self.ignore.walk_context(self.context))
            self._context_root = SourceRoot(path=self.context, label="build context", included=included,
                                            cache=self.b.cache)  # fmt: skip
            self._context_root.open()
        return self._context_root

    def _copy(
        self,
        stage: ResolvedStage,
        ri: ResolvedInstruction,
        ins: Copy | Add,
        state: _StageState,
        results: dict[int, _Image],
    ) -> None:
        t0 = time.monotonic()
        kw = ins.keyword.upper()
        if isinstance(ins, Copy) and ins.parents:
            raise CopyError(
                f"{kw} --parents is not supported by cocon build yet: copy each directory with its own {kw}"
            )
        if isinstance(ins, Add) and (ins.checksum is not None or ins.keep_git_dir):
            raise CopyError(
                "ADD --checksum/--keep-git-dir only apply to URLs and git repositories, which cocon "
                "build cannot fetch (no network access): download the file into the context first"
            )
        for src in ins.sources:
            if src.startswith(URL_PREFIXES):
                if isinstance(ins, Add):
                    raise CopyError(
                        f"ADD {src}: cocon build does not download (no network access during builds): "
                        "fetch the file into the build context and ADD or COPY it from there"
                    )
                raise CopyError(f"COPY {src}: COPY does not take URLs; put the file in the build context")
        source_image: _Image | None = None
        source_label = "build context"
        if isinstance(ins, Copy) and ri.source_stage is not None:
            source_image = results[ri.source_stage]
            source_label = f"stage {ins.from_}"
        elif isinstance(ins, Copy) and ri.source_image is not None:
            source_image = self._base_image(ri.source_image, ins.line)
            source_label = f"image {ri.source_image}"
        exclude = DockerIgnore(ins.exclude, source=f"{kw} --exclude") if ins.exclude else None
        with self._source(source_image, source_label) as root:
            items: list[Item] = expand_sources(root, ins.sources, exclude) if ins.sources else []
            items += [heredoc_item(doc.name, doc.content) for doc in ins.heredoc_sources]
            digest = SourceDigest()
            digest_items(items, digest)
            key = step_key(state.image.id, copy_op(ins, digest.hexdigest(), source_image is not None))
            if self._hit(key, state, t0):
                return
            cc = state.image.config.config or ContainerConfig()
            dest = ins.dest
            if not dest.startswith("/"):
                dest = posixpath.join(cc.working_dir or "/", dest)
                if ins.dest.endswith("/") or ins.dest in (".", "./"):
                    dest = dest.rstrip("/") + "/"
            flags = [f"--from={ins.from_}"] if isinstance(ins, Copy) and ins.from_ else []
            flags += [f"--chown={ins.chown}"] if ins.chown else []
            flags += [f"--chmod={ins.chmod}"] if ins.chmod else []
            names = [*ins.sources, *(f"<<{d.name}" for d in ins.heredoc_sources)]
            created_by = f"{kw} {' '.join([*flags, *names, ins.dest])}"
            mode = parse_chmod(ins.chmod) if ins.chmod else None
            parent = state.image
            with self._snapshot(parent) as (snap_key, rootfs):
                chown = resolve_chown(rootfs, ins.chown) if ins.chown else None
                unpack = None
                if isinstance(ins, Add) and ins.unpack is not False:

                    def unpack(item: Item) -> str | None:
                        if item.root is None or item.is_dir or source_image is not None:
                            return None
                        return archive_kind(item.root, item.entries[0].src)

                target = TargetRoot(rootfs)
                try:
                    copy_items(target, items, dest, CopyOptions(chown=chown, mode=mode),
                               unpack=unpack, scratch_dir=self.b.tmp_root)  # fmt: skip
                finally:
                    target.close()
                self._commit_step(snap_key, parent, key, created_by, state, t0)

    @contextmanager
    def _source(self, image: _Image | None, label: str) -> Iterator[SourceRoot]:
        if image is None:
            yield self._context_source()
            return
        with self._snapshot(image, readonly=True) as (_, rootfs):
            root = SourceRoot(path=rootfs, label=label, keep_owner=True)
            root.open()
            try:
                yield root
            finally:
                root.close()


def _familiar(normalized: str) -> str:
    from cocon.images.reference import Reference

    return Reference.parse(normalized).familiar()
