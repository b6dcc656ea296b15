"""`cocon system reset`: remove everything cocon made on this node (containers, networks with their
bridges and firewall table, volumes, images), as `podman system reset` does. Asks first on a
terminal; `-f` does not ask (and is required without a terminal).

`cocon system assets [--rebuild]`: the microVM guest assets (kernel, initramfs, utility image) and
the KVM/TCG decision; `--rebuild` builds them with a progress bar over cocon.vmm.assets.STAGES (on
a terminal; otherwise one line per finished stage on stderr).

`cocon info`: the node as the daemon sees it (Docker's /info with cocon's own fields)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from cocon.api.client import APIError, Client


def register(sub: Any) -> None:
    group = sub.add_parser("system", help="manage cocon's state on this node (reset, microVM assets)")
    ssub = group.add_subparsers(dest="system_command", metavar="COMMAND", required=True)
    p = ssub.add_parser(
        "reset",
        help="remove every container, network, volume and image",
        description="Remove every container (running ones are killed), network (bridges and cocon's "
        "nftables table too), volume and image of this node. Asks for confirmation on a terminal.",
    )
    p.add_argument("-f", "--force", action="store_true", help="do not ask for confirmation")
    p.add_argument("--format", choices=("table", "json"), default="table", help="output format")
    p.set_defaults(func=cmd_reset)
    p = ssub.add_parser(
        "assets",
        help="show (or build) the microVM guest assets",
        description="Show the microVM guest assets (kernel, initramfs, utility image: state, digest, "
        "kernel release, files and sizes, package versions) and whether microVMs use KVM or TCG. "
        "--rebuild builds them from Debian packages (downloaded with apt) with a progress bar; a first "
        "microVM start builds missing ones too. They live in $COCON_ASSETS_ROOT/assets, else the "
        "daemon's root.",
    )
    p.add_argument("--rebuild", action="store_true", help="build them again (even if they verify)")
    p.add_argument("--format", choices=("table", "json"), default="table", help="output format")
    p.set_defaults(func=cmd_assets)


def register_info(sub: Any) -> None:
    p = sub.add_parser(
        "info",
        help="show how the node is set up (isolation levels, microVM accelerator, storage, cgroups)",
        description="Show the daemon's view of this node: containers and images, isolation levels, "
        "the microVM accelerator (kvm or tcg, with the probe's reason) and guest kernel, storage, cgroups.",
    )
    p.add_argument("--format", choices=("table", "json"), default="table", help="output format")
    p.set_defaults(func=cmd_info)


def cmd_reset(client: Client, args: argparse.Namespace) -> int:
    from cocon.cli.output import error

    if not args.force:
        if not sys.stdin.isatty():
            error("cocon system reset removes every container, network, volume and image: add -f to confirm")
            return 2
        answer = input("This removes every container, network, volume and image of cocon. Continue? [y/N] ")
        if answer.strip().lower() not in ("y", "yes"):
            return 1
    done = client.system_reset()
    if args.format == "json":
        import json

        print(json.dumps(done))
        return 0
    for key, what in (("ContainersDeleted", "containers"), ("NetworksDeleted", "networks"),
                      ("VolumesDeleted", "volumes"), ("ImagesDeleted", "images")):  # fmt: skip
        print(f"removed {len(done.get(key) or [])} {what}")
    return 0


# --- assets ---------------------------------------------------------------------------------------

STAGE_LABELS = {
    "resolve": "resolving package versions",
    "download": "downloading packages",
    "extract": "unpacking the kernel",
    "modules": "kernel modules",
    "initramfs": "initramfs",
    "utility": "utility image",
    "commit": "commit",
}
#: A download total above this is bytes, not a number of packages.
BYTES_ABOVE = 100_000


def _count(stage: str, done: int, total: int) -> str:
    from cocon.cli.output import human_size

    if stage == "download" and total > BYTES_ABOVE:
        return f"{human_size(done)}/{human_size(total)}"
    unit = " packages" if stage == "download" else ""
    return f"{done}/{total}{unit}" if total else f"{done}{unit}"


class StageProgress:
    """progress(stage, done, total) for an asset build: on a terminal a rich bar per stage of
    `STAGES` ("[2/7] downloading packages ━━━━━ 12/40 packages 0:00:03"); otherwise one line per
    finished stage on stderr ("[2/7] downloading packages: 40/40 packages")."""

    def __init__(self, stages: tuple[str, ...]) -> None:
        self.stages = stages
        self.tty = sys.stderr.isatty()
        self.current: str | None = None
        self.last: tuple[int, int] = (0, 0)
        self.tasks: dict[str, Any] = {}
        self.progress: Any = None
        if self.tty:
            from rich.console import Console
            from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

            self.progress = Progress(
                SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                TextColumn("{task.fields[count]}"), TimeElapsedColumn(), console=Console(stderr=True),
            )  # fmt: skip

    def __enter__(self) -> StageProgress:
        if self.progress is not None:
            self.progress.start()
        return self

    def __exit__(self, kind: object, exc: object, tb: object) -> None:
        if kind is None:
            self._finish()
        if self.progress is not None:
            self.progress.stop()

    def _label(self, stage: str) -> str:
        number = self.stages.index(stage) + 1 if stage in self.stages else 0
        return f"[{number}/{len(self.stages)}] {STAGE_LABELS.get(stage, stage)}"

    def _finish(self) -> None:
        """The current stage is over (a later one began, or the build ended)."""
        stage = self.current
        if stage is None:
            return
        total = self.last[1]
        if self.progress is not None:
            task = self.tasks[stage]
            self.progress.update(task, total=total or 1, completed=total or 1,
                                 count=_count(stage, total, total) if total else "done")  # fmt: skip
        else:
            count = _count(stage, total, total) if total else "done"
            sys.stderr.write(f"{self._label(stage)}: {count}\n")
            sys.stderr.flush()
        self.current = None

    def __call__(self, stage: str, done: int, total: int) -> None:
        if stage != self.current:
            self._finish()
            self.current = stage
            if self.progress is not None and stage not in self.tasks:
                self.tasks[stage] = self.progress.add_task(self._label(stage), total=total or None, count="")
        self.last = (done, total)
        if self.progress is not None:
            self.progress.update(self.tasks[stage], completed=done, total=total or None,
                                 count=_count(stage, done, total))  # fmt: skip


def _size(item: Any) -> str:
    from cocon.cli.output import human_size

    if not isinstance(item, dict):
        return "-"
    size = item.get("Size")
    return f"{item.get('Path')} ({human_size(size) if isinstance(size, int) else 'unreadable'})"


def _line(text: object) -> str:
    """A probe's reason (QEMU's last lines) on one line."""
    return " / ".join(line.strip() for line in str(text).splitlines() if line.strip())


def _rows(rows: list[tuple[str, str]]) -> None:
    width = max(len(k) for k, _ in rows) + 2
    for key, value in rows:
        print(f"{key + ':':<{width}}{value}")


def print_assets(doc: dict[str, Any]) -> None:
    from cocon.vmm.assets import UTILITY_PACKAGES

    packages: dict[str, str] = doc.get("Packages") or {}
    main = [n for n in packages if n.startswith("linux-image-")]
    main += [n for n in ("busybox-static", *UTILITY_PACKAGES) if n in packages]
    listed = ", ".join(f"{n} {packages[n]}" for n in main)
    if len(packages) > len(main):
        listed += f" (+{len(packages) - len(main)} dependencies: --format json lists them)"
    rows = [("State", str(doc.get("State")))]
    if doc.get("Message"):
        rows.append(("Message", str(doc["Message"])))
    rows += [
        ("Directory", str(doc.get("Directory"))),
        ("Digest", str(doc.get("Digest") or "-")),
        ("Kernel release", str(doc.get("KernelRelease") or "-")),
        ("Kernel", _size(doc.get("Kernel"))),
        ("Initrd", _size(doc.get("Initrd"))),
        ("Utility image", _size(doc.get("Utility"))),
        ("Packages", listed or "-"),
        ("Built", str(doc.get("Built") or "-")),
    ]
    acc = doc.get("Accelerator")
    if isinstance(acc, dict) and acc.get("Accel"):
        probed = acc.get("Probed") or "-"
        rows.append(("Accelerator", f"{acc['Accel']}: {_line(acc.get('Reason'))} (probed {probed})"))
    elif isinstance(acc, dict):
        rows.append(("Accelerator", f"unknown: {_line(acc.get('Reason'))}"))
    else:
        rows.append(("Accelerator", "not probed yet (the assets are not built)"))
    _rows(rows)


def cmd_assets(client: Client, args: argparse.Namespace) -> int:
    from cocon.cli.output import error

    if args.rebuild:
        from cocon.vmm.assets import STAGES

        with StageProgress(STAGES) as bar:
            doc = client.system_assets_build(rebuild=True, progress=bar)
    else:
        doc = client.system_assets()
    if args.format == "json":
        import json

        print(json.dumps(doc, indent=4))
    else:
        print_assets(doc)
    if args.rebuild and doc.get("State") != "ready":
        error(f"the assets are {doc.get('State')} after the build: {doc.get('Message') or doc.get('Error')}")
        return 1
    return 0


# --- info -----------------------------------------------------------------------------------------


def print_info(doc: dict[str, Any]) -> None:
    from cocon.cli.output import human_size

    cocon = doc.get("Cocon") or {}
    rows = [
        ("Server version", f"cocon {doc.get('ServerVersion')}"),
        ("Containers", f"{doc.get('Containers')} (running {doc.get('ContainersRunning')}, paused "
                       f"{doc.get('ContainersPaused')}, stopped {doc.get('ContainersStopped')})"),
        ("Images", str(doc.get("Images"))),
        ("Storage driver", f"{doc.get('Driver')} ({cocon.get('StorageDriver', '-')})"),
        ("Cgroups", f"{cocon.get('CgroupMode', '-')} ({doc.get('CgroupDriver')})"),
        ("Kernel version", str(doc.get("KernelVersion"))),
        ("Operating system", str(doc.get("OperatingSystem"))),
        ("CPUs", str(doc.get("NCPU"))),
        ("Total memory", human_size(doc.get("MemTotal") or 0)),
        ("Root", str(cocon.get("Root") or doc.get("DockerRootDir"))),
        ("Run", str(cocon.get("Run", "-"))),
        ("Default isolation", f"container (Docker: {doc.get('Isolation') or 'process'})"),
    ]  # fmt: skip
    docker_names = {"container": "process", "microvm": "hyperv"}
    for level, state in (cocon.get("Isolation") or {}).items():
        alias = f" (Docker: {docker_names[level]})" if level in docker_names else ""
        rows.append((f"Isolation {level}", f"{state}{alias}"))
    vm = cocon.get("MicroVM") or {}
    not_built = "not built (cocon system assets)"
    message = str(vm.get("Message") or "")
    assets = f"{vm.get('Assets', '-')} ({vm.get('AssetsRoot', '-')}/assets)"
    rows.append(("MicroVM assets", assets + (f": {message}" if message and message != not_built else "")))
    if vm.get("Accelerator"):
        rows.append(("MicroVM accelerator", f"{vm['Accelerator']}: {_line(vm.get('AcceleratorReason'))}"))
        rows.append(("MicroVM probed", str(vm.get("Probed") or "-")))
    else:
        rows.append(("MicroVM accelerator", not_built if vm.get("Assets") in ("missing", None) else message))
    rows.append(("MicroVM guest kernel", str(vm.get("KernelRelease") or not_built)))
    _rows(rows)
    for warning in doc.get("Warnings") or []:
        sys.stderr.write(f"{warning}\n")


def cmd_info(client: Client, args: argparse.Namespace) -> int:
    doc = client.info()
    if not isinstance(doc, dict):
        raise APIError("the cocon daemon answered /info with something that is not a JSON object", 500)
    if args.format == "json":
        import json

        print(json.dumps(doc, indent=4))
    else:
        print_info(doc)
    return 0
