#!/usr/bin/env python3
"""`cocon build` against `buildah bud`: the same Containerfile, the same base image, the same machine.

Both builders start from the identical busybox image (same image ID): cocon bootstraps it into its
store, and buildah pulls it from an OCI layout written from cocon's blobs (`buildah pull oci:DIR`), so
nothing comes from a registry. buildah runs with its own `--root`/`--runroot` under a temporary
directory, the overlay storage driver, its default OCI isolation (runc), `--layers` (its layer
cache) and `--network host` (cocon's RUN steps use the host network too, for now).

Two cases, alternating cocon and buildah, several runs each:

- **cold**: every step runs (`--no-cache` for both; the base image is already unpacked for both);
- **cached**: an unchanged rebuild, every step a cache hit.

cocon is timed as a fresh process per build (the interpreter's start-up and imports included, as
buildah's process start is), calling the `Builder` API; the time the build itself took inside that
process is shown too. Printed: medians, min-max, and the ratio cocon/buildah per case (target for
the cached rebuild: <= 0.5).

    .venv/bin/python bench/build_vs_buildah.py [--runs 5] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

CONTAINERFILE = """\
FROM busybox
ENV APP=/app MODE=bench
WORKDIR /app
COPY files/ /app/files/
RUN for i in $(seq 1 500); do echo "line $i" >> /app/generated.txt; done
COPY config.txt /etc/app.conf
RUN sed -i 's/value=1/value=2/' /etc/app.conf && cp /etc/app.conf /app/conf.copy
ENV STAGE=final
RUN ls -lR /app | wc -l > /app/count && rm -rf /home
LABEL org.example.bench=yes
CMD ["sh"]
"""


def make_context(path: str) -> None:
    os.makedirs(os.path.join(path, "files", "sub"))
    for i in range(100):
        with open(os.path.join(path, "files", "sub" if i % 2 else "", f"file{i:03d}.txt"), "w") as f:
            f.write(f"file {i}\n" * 200)
    with open(os.path.join(path, "files", "blob.bin"), "wb") as f:
        f.write(os.urandom(1 << 20))
    with open(os.path.join(path, "config.txt"), "w") as f:
        f.write("name=bench\nvalue=1\n")
    with open(os.path.join(path, "Containerfile"), "w") as f:
        f.write(CONTAINERFILE)


# --- cocon -----------------------------------------------------------------------------------------------


def cocon_child(root: str, context: str, no_cache: bool) -> None:
    """Run in a fresh process: one build through the API; print its result as JSON."""
    from cocon.engine.build import Builder
    from cocon.images.store import ImageStore
    from cocon.snapshots import OverlaySnapshotter

    store = ImageStore(os.path.join(root, "images"))
    builder = Builder(
        store, OverlaySnapshotter(os.path.join(root, "snapshots")), state_dir=os.path.join(root, "build")
    )
    result = builder.build(context, tags=["bench:latest"], no_cache=no_cache)
    print(json.dumps({"seconds": result.seconds, "cached": result.cached_steps, "steps": result.steps,
                      "id": result.image_id}))  # fmt: skip


def cocon_setup(root: str) -> str:
    """Bootstrap busybox into cocon's store; write it as an OCI layout for buildah. Returns the layout."""
    from cocon.images.bootstrap import bootstrap_busybox
    from cocon.images.store import ImageStore

    store = ImageStore(os.path.join(root, "images"))
    image = bootstrap_busybox(store)
    layout = os.path.join(root, "oci-busybox")
    os.makedirs(os.path.join(layout, "blobs", "sha256"))
    for digest in [
        image.manifest_digest,
        image.manifest.config.digest,
        *(d.digest for d in image.manifest.layers),
    ]:
        shutil.copy(store.content.path(digest), os.path.join(layout, "blobs", "sha256", digest.split(":")[1]))
    with open(os.path.join(layout, "oci-layout"), "w") as f:
        json.dump({"imageLayoutVersion": "1.0.0"}, f)
    manifest = {
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "digest": image.manifest_digest,
        "size": os.path.getsize(store.content.path(image.manifest_digest)),
        "annotations": {"org.opencontainers.image.ref.name": "latest"},
    }
    with open(os.path.join(layout, "index.json"), "w") as f:
        json.dump({"schemaVersion": 2, "manifests": [manifest]}, f)
    store.close()
    print(f"busybox image {image.id[:19]} in cocon's store and as an OCI layout")
    return layout


def cocon_build(root: str, context: str, no_cache: bool) -> tuple[float, dict[str, object]]:
    cmd = [sys.executable, os.path.abspath(__file__), "--cocon-child", root, context]
    if no_cache:
        cmd.append("--no-cache")
    started = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    elapsed = time.monotonic() - started
    if proc.returncode != 0:
        raise SystemExit(f"cocon build failed:\n{proc.stdout}\n{proc.stderr}")
    info: dict[str, object] = json.loads(proc.stdout.strip().splitlines()[-1])
    return elapsed, info


# --- buildah ---------------------------------------------------------------------------------------------


class Buildah:
    def __init__(self, base: str) -> None:
        self.root = os.path.join(base, "root")
        self.runroot = os.path.join(base, "run")
        self.global_args = [
            "buildah",
            "--root",
            self.root,
            "--runroot",
            self.runroot,
            "--storage-driver",
            "overlay",
        ]

    def __call__(self, *args: str, quiet: bool = True) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run([*self.global_args, *args], capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(
                f"buildah {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
            )
        return proc

    def setup(self, layout: str) -> None:
        image_id = self("pull", "-q", f"oci:{layout}:latest").stdout.strip().splitlines()[-1]
        self("tag", image_id, "docker.io/library/busybox:latest")
        print(f"busybox image sha256:{image_id[:12]} in buildah's store (pulled from that layout)")

    def build(self, context: str, no_cache: bool) -> float:
        args = ["bud", "--layers", "--pull=never", "--network", "host", "-q", "-t", "bench:latest"]
        if no_cache:
            args.append("--no-cache")
        started = time.monotonic()
        self(*args, "-f", os.path.join(context, "Containerfile"), context)
        return time.monotonic() - started

    def cleanup(self) -> None:
        for args in (("rm", "--all"), ("rmi", "--all", "--force")):
            subprocess.run([*self.global_args, *args], capture_output=True)
        unmount_below(os.path.dirname(self.root))


def unmount_below(path: str) -> None:
    real = os.path.realpath(path)
    with open("/proc/self/mountinfo") as f:
        points = [line.split()[4] for line in f]
    for mp in sorted((p for p in points if p == real or p.startswith(real + "/")), key=len, reverse=True):
        subprocess.run(["umount", "-l", mp], capture_output=True)


# --- main ------------------------------------------------------------------------------------------------


def summary(values: list[float]) -> str:
    lo, hi = min(values) * 1000, max(values) * 1000
    return f"{statistics.median(values) * 1000:8.1f} ms  (min {lo:7.1f}, max {hi:7.1f})"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    parser.add_argument("--cocon-child", nargs=2, metavar=("ROOT", "CONTEXT"), help=argparse.SUPPRESS)
    parser.add_argument("--no-cache", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.cocon_child:
        cocon_child(*args.cocon_child, no_cache=args.no_cache)
        return
    if os.geteuid() != 0:
        raise SystemExit("run as root: both builders mount overlays and run containers")
    if shutil.which("buildah") is None:
        raise SystemExit("buildah is missing: apt-get install buildah")
    base = tempfile.mkdtemp(prefix="cocon-bench-build-", dir="/var/tmp")
    cocon_root = os.path.join(base, "cocon")
    context = os.path.join(base, "context")
    buildah = Buildah(os.path.join(base, "buildah"))
    try:
        make_context(context)
        layout = cocon_setup(cocon_root)
        buildah.setup(layout)
        print(subprocess.run(["buildah", "--version"], capture_output=True, text=True).stdout.strip())
        steps = CONTAINERFILE.count("\n")
        print(
            f"Containerfile: {steps} steps (FROM, 2 COPY, 3 RUN, metadata); context: 100 small files + 1 MiB"
        )
        # warm-up: both unpack the base image once and fill their caches
        cocon_build(cocon_root, context, no_cache=False)
        buildah.build(context, no_cache=False)
        times: dict[str, list[float]] = {
            k: [] for k in ("cocon cold", "buildah cold", "cocon cached", "buildah cached")
        }
        inner: dict[str, list[float]] = {"cold": [], "cached": []}
        for _ in range(args.runs):
            t, info = cocon_build(cocon_root, context, no_cache=True)
            times["cocon cold"].append(t)
            inner["cold"].append(float(info["seconds"]))  # type: ignore[arg-type]
            times["buildah cold"].append(buildah.build(context, no_cache=True))
            t, info = cocon_build(cocon_root, context, no_cache=False)
            if info["cached"] != info["steps"]:
                raise SystemExit(f"cocon's rebuild was not fully cached: {info}")
            times["cocon cached"].append(t)
            inner["cached"].append(float(info["seconds"]))  # type: ignore[arg-type]
            times["buildah cached"].append(buildah.build(context, no_cache=False))
        print(f"\n{args.runs} runs each, alternating; wall time of the whole command:")
        for name, values in times.items():
            print(f"  {name:15s} {summary(values)}")
        print(f"  (cocon's build inside its process: cold {statistics.median(inner['cold']) * 1000:.1f} ms, "
              f"cached {statistics.median(inner['cached']) * 1000:.1f} ms)")  # fmt: skip
        print("\nratio cocon/buildah (median):")
        for case in ("cold", "cached"):
            ratio = statistics.median(times[f"cocon {case}"]) / statistics.median(times[f"buildah {case}"])
            target = "  (target <= 0.5)" if case == "cached" else ""
            print(f"  {case:7s} {ratio:5.2f}{target}")
    finally:
        buildah.cleanup()
        unmount_below(base)
        if args.keep:
            print(f"kept {base}")
        else:
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
