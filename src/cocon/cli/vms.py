"""`cocon vm`: full virtual machines from any disk or ISO (docs/vm.md).

    cocon vm create NAME --disk FILE [--disk-size SIZE] [--iso FILE] [--firmware bios|uefi]
                         [--cpus N] [--memory SIZE] [--cloud-init FILE [--network-config FILE]]
                         [--network NET] [-v DISKVOLUME:/NAME]
    cocon vm start NAME [--console]      cocon vm stop NAME [-t SECONDS]
    cocon vm console NAME                (detach: Ctrl-])
    cocon vm ls [-a] [--format json]     cocon vm rm NAME [-f] [--delete-disk]
    cocon vm migrate NAME --to unix:///PATH|tcp://ADDR:PORT [--auth-token-file FILE | --tlscacert CA
                     --tlscert CERT --tlskey KEY] [--shared-storage] [--downtime-limit MS]

A VM is an instance (isolation vm): `cocon ps`, `inspect`, `logs` (its serial console) and `rm` see
it too; an image-based one (`cocon run --isolation vm IMAGE`) is listed by `cocon vm ls` as well.
"""

from __future__ import annotations

import argparse
import base64
import os
from typing import Any

from cocon.api.client import APIError, Client
from cocon.cli import output

#: `cocon vm console`'s detach sequence: Ctrl-] (virsh's and telnet's).
CONSOLE_DETACH = b"\x1d"
#: `cocon vm stop`'s default: seconds the guest gets after the ACPI power button before it is cut off.
STOP_TIMEOUT = 60


def register(sub: Any) -> None:
    group = sub.add_parser("vm", help="full VMs from any disk or ISO (create, start, stop, console, ls, rm)")
    vsub = group.add_subparsers(dest="vm_command", metavar="COMMAND", title="commands")
    vsub.required = True
    p = vsub.add_parser("create", help="create a VM from a disk image (raw or qcow2) and optionally an ISO")
    p.add_argument("name", metavar="NAME")
    p.add_argument("--disk", required=True, metavar="FILE",
                   help="the boot disk, used in place: an existing raw or qcow2 image, or a new one "
                        "made with --disk-size (qcow2, or raw for a .raw/.img name)")  # fmt: skip
    p.add_argument(
        "--disk-size", metavar="SIZE", help="size of a new disk, or grow an existing one (e.g. 20G)"
    )
    p.add_argument("--iso", metavar="FILE", help="an installer or live ISO (a CD-ROM that boots first)")
    p.add_argument("--firmware", choices=("bios", "uefi"), default="bios",
                   help="bios (SeaBIOS, the default) or uefi (OVMF; its variables persist with the "
                        "VM)")  # fmt: skip
    p.add_argument("--cpus", type=float, metavar="N", help="vCPUs (default 1)")
    p.add_argument("-m", "--memory", metavar="SIZE", help="guest memory, e.g. 2G (default 1G)")
    p.add_argument("--cloud-init", metavar="FILE",
                   help="cloud-init user-data (#cloud-config, a script, ...): attached as a NoCloud "
                        "seed")  # fmt: skip
    p.add_argument("--network-config", metavar="FILE",
                   help="cloud-init network-config (netplan v2) for the seed (a static address)")  # fmt: skip
    p.add_argument("--network", "--net", metavar="NET",
                   help="the network (default: cocon's default bridge; the guest gets its address by "
                        "DHCP)")  # fmt: skip
    p.add_argument("--hostname", help="the guest's name for DHCP and cloud-init (default: NAME)")
    p.add_argument("-v", "--volume", action="append", default=[], metavar="VOLUME:/NAME",
                   help="attach a disk volume (volume create --type disk) as a virtio disk")  # fmt: skip
    p.set_defaults(func=cmd_create)
    p = vsub.add_parser("start", help="start VMs (firmware, boot loader and OS on the serial console)")
    p.add_argument("names", nargs="+", metavar="NAME")
    p.add_argument("--console", action="store_true", help="attach to the console of the (one) VM started")
    p.set_defaults(func=cmd_start)
    p = vsub.add_parser("stop", help="shut VMs down: the ACPI power button, then force off after a timeout")
    p.add_argument("names", nargs="+", metavar="NAME")
    p.add_argument("-t", "--time", type=int, default=STOP_TIMEOUT,
                   help=f"seconds before forcing the VM off (default {STOP_TIMEOUT})")  # fmt: skip
    p.set_defaults(func=cmd_stop)
    p = vsub.add_parser("console", help="attach this terminal to a VM's serial console (detach: Ctrl-])")
    p.add_argument("name", metavar="NAME")
    p.set_defaults(func=cmd_console)
    p = vsub.add_parser("attach-disk", help="attach a disk volume (hot-plugged into a running VM)")
    p.add_argument("name", metavar="NAME")
    p.add_argument("volume", metavar="VOLUME", help="a volume made with cocon volume create --type disk")
    p.set_defaults(func=cmd_attach_disk)
    p = vsub.add_parser("detach-disk", help="detach a disk volume (hot-unplugged from a running VM)")
    p.add_argument("name", metavar="NAME")
    p.add_argument("volume", metavar="VOLUME")
    p.set_defaults(func=cmd_detach_disk)
    p = vsub.add_parser(
        "migrate", help="live-migrate a running VM to another cocon daemon (its disk copied along)",
        description="Move a running VM to another cocon daemon with QEMU's live migration: the disk is "
        "mirrored while the guest runs (unless --shared-storage), then its memory; the guest pauses only "
        "for the last pages. It keeps its name and its address on each network (the target needs those "
        "networks, with subnets that hold the addresses, and the image of a VM made from one). On success "
        "the VM is removed here; on failure it runs on here and nothing is left on the target.",
    )  # fmt: skip
    p.add_argument("name", metavar="NAME", help="the running VM (name or ID)")
    p.add_argument("--to", required=True, metavar="URI",
                   help="the target daemon: unix:///PATH/cocon.sock or tcp://ADDR:PORT")  # fmt: skip
    p.add_argument("--auth-token-file", metavar="FILE",
                   help="the bearer token of a TCP target (its daemon's --auth-token-file)")  # fmt: skip
    for flag, what in (("--tlscacert", "the CA that signed a TLS target's certificate"),
                       ("--tlscert", "a client certificate that target's CA signed"),
                       ("--tlskey", "the client certificate's key")):  # fmt: skip
        p.add_argument(flag, metavar="FILE", help=f"{what} (a target started with --tlsverify)")
    p.add_argument("--shared-storage", action="store_true",
                   help="the disk is on storage the target sees at the same path: no copy")  # fmt: skip
    p.add_argument("--downtime-limit", type=int, default=300, metavar="MS",
                   help="the pause QEMU aims for at the switch-over, in ms (default 300)")  # fmt: skip
    p.add_argument("--format", choices=("text", "json"), default="text",
                   help="text (default) or json (the measurements)")  # fmt: skip
    p.set_defaults(func=cmd_migrate)
    p = vsub.add_parser("ls", aliases=["list"], help="list VMs")
    p.add_argument("-a", "--all", action="store_true", help="stopped VMs too")
    p.add_argument("-q", "--quiet", action="store_true", help="print only names")
    p.add_argument("--format", choices=("table", "json"), default="table",
                   help="table (default) or json (one JSON object per line)")  # fmt: skip
    p.set_defaults(func=cmd_ls)
    p = vsub.add_parser(
        "rm", aliases=["remove"], help="remove VMs (their disk file stays unless --delete-disk)"
    )
    p.add_argument("names", nargs="+", metavar="NAME")
    p.add_argument("-f", "--force", action="store_true", help="also a running VM (forced off)")
    p.add_argument("--delete-disk", action="store_true", help="also delete the disk file given at create")
    p.set_defaults(func=cmd_rm)


def register_snapshots(sub: Any) -> None:
    group = sub.add_parser(
        "snapshot", help="snapshots of a VM's disk, and with --memory of its running state"
    )
    ssub = group.add_subparsers(dest="snapshot_command", metavar="COMMAND", title="commands")
    ssub.required = True
    p = ssub.add_parser("create", help="snapshot a VM (stopped or running)")
    p.add_argument("vm", metavar="VM")
    p.add_argument("name", metavar="NAME")
    p.add_argument("--memory", action="store_true",
                   help="also the running VM's memory and devices (a restore resumes there)")  # fmt: skip
    p.set_defaults(func=cmd_snapshot_create)
    p = ssub.add_parser("ls", aliases=["list"], help="list a VM's snapshots")
    p.add_argument("vm", metavar="VM")
    p.add_argument("--format", choices=("table", "json"), default="table")
    p.set_defaults(func=cmd_snapshot_ls)
    p = ssub.add_parser("restore", help="restore a snapshot (a running VM: only a --memory one)")
    p.add_argument("vm", metavar="VM")
    p.add_argument("name", metavar="NAME")
    p.set_defaults(func=cmd_snapshot_restore)
    p = ssub.add_parser("rm", aliases=["remove"], help="remove snapshots")
    p.add_argument("vm", metavar="VM")
    p.add_argument("names", nargs="+", metavar="NAME")
    p.set_defaults(func=cmd_snapshot_rm)


def cmd_snapshot_create(client: Client, args: argparse.Namespace) -> int:
    snap = client.vm_snapshot_create(args.vm, args.name, memory=args.memory)
    print(snap["Name"])
    return 0


def cmd_snapshot_ls(client: Client, args: argparse.Namespace) -> int:
    snaps = client.vm_snapshots(args.vm)
    if args.format == "json":
        output.json_lines(snaps)
        return 0
    output.table(
        ["NAME", "MEMORY", "STATE SIZE", "CREATED"],
        [[s["Name"], "yes" if s["Memory"] else "no",
          output.human_size(s["VmStateSize"]) if s["Memory"] else "-", output.time_ago(s["Created"])]
         for s in snaps],
    )  # fmt: skip
    return 0


def cmd_snapshot_restore(client: Client, args: argparse.Namespace) -> int:
    result = client.vm_snapshot_restore(args.vm, args.name)
    if result.get("ResumesAtStart"):
        output.warning(f"{args.vm} resumes from {args.name} when it starts next")
    print(args.name)
    return 0


def cmd_snapshot_rm(client: Client, args: argparse.Namespace) -> int:
    return output.for_each(args.names, lambda name: client.vm_snapshot_remove(args.vm, name))


def _file_b64(path: str | None, what: str) -> str | None:
    if path is None:
        return None
    try:
        with open(path, "rb") as f:
            return base64.b64encode(f.read()).decode()
    except OSError as exc:
        raise APIError(f"cannot read the {what} file {path}: {exc.strerror}", 400) from None


def cmd_create(client: Client, args: argparse.Namespace) -> int:
    spec: dict[str, Any] = {"Name": args.name, "Disk": os.path.abspath(args.disk), "Firmware": args.firmware}
    if args.disk_size:
        spec["DiskSize"] = args.disk_size
    if args.iso:
        spec["Iso"] = os.path.abspath(args.iso)
    if args.cpus:
        spec["Cpus"] = args.cpus
    if args.memory:
        spec["Memory"] = args.memory
    if args.network:
        spec["Network"] = args.network
    if args.hostname:
        spec["Hostname"] = args.hostname
    if args.volume:
        spec["Volumes"] = list(args.volume)
    spec["CloudInit"] = _file_b64(args.cloud_init, "cloud-init")
    spec["NetworkConfig"] = _file_b64(args.network_config, "network-config")
    result = client.vm_create({k: v for k, v in spec.items() if v is not None})
    for warning in result.get("Warnings") or []:
        output.warning(warning)
    print(result["Id"])
    return 0


def cmd_start(client: Client, args: argparse.Namespace) -> int:
    if args.console:
        if len(args.names) != 1:
            output.error("--console attaches to one VM: start the others separately")
            return 1
        client.container_start_detached(args.names[0])
        return _console(client, args.names[0])
    return output.for_each(args.names, client.container_start_detached)


def cmd_stop(client: Client, args: argparse.Namespace) -> int:
    return output.for_each(args.names, lambda ref: client.container_stop(ref, timeout=args.time))


def cmd_console(client: Client, args: argparse.Namespace) -> int:
    return _console(client, args.name)


def _console(client: Client, name: str) -> int:
    import sys

    if os.isatty(2):
        sys.stderr.write(f"Connected to the console of {name} (detach: Ctrl-])\n")
        sys.stderr.flush()
    code = client.container_attach(name, stdin=True, detach_keys=CONSOLE_DETACH)
    return code if code >= 0 else 0


def cmd_attach_disk(client: Client, args: argparse.Namespace) -> int:
    result = client.vm_disk_attach(args.name, args.volume)
    print(
        f"{args.volume}: /dev/disk/by-id/virtio-{result['Serial']}"
        + ("" if result.get("Live") else " (next start)")
    )
    return 0


def cmd_detach_disk(client: Client, args: argparse.Namespace) -> int:
    client.vm_disk_detach(args.name, args.volume)
    print(args.volume)
    return 0


def cmd_migrate(client: Client, args: argparse.Namespace) -> int:
    import sys

    spec: dict[str, Any] = {"To": args.to, "SharedStorage": args.shared_storage,
                            "DowntimeLimitMs": args.downtime_limit}  # fmt: skip
    if args.downtime_limit <= 0:
        output.error("--downtime-limit must be a positive number of milliseconds")
        return 2
    for flag, field, strip in (("auth_token_file", "Token", True), ("tlscacert", "TlsCaCert", False),
                               ("tlscert", "TlsCert", False), ("tlskey", "TlsKey", False)):  # fmt: skip
        path = getattr(args, flag, None)
        if not path:
            continue
        try:
            with open(path) as f:
                spec[field] = f.read().strip() if strip else f.read()
        except OSError as exc:
            output.error(f"cannot read --{flag.replace('_', '-')} {path}: {exc.strerror}")
            return 2
    if sys.stderr.isatty() and args.format == "text":
        from rich.console import Console

        with Console(stderr=True).status(f"migrating {args.name} to {args.to} (disk, then memory)…"):
            result = client.vm_migrate(args.name, spec)
    else:
        result = client.vm_migrate(args.name, spec)
    if args.format == "json":
        output.json_doc(result)
        return 0
    print(
        f"{args.name} moved to {result['To']} (id {result['Id'][:12]}): "
        f"paused {result['PauseMs']} ms (QEMU's downtime {result['DowntimeMs']} ms), "
        f"total {result['TotalMs'] / 1000:.1f} s (disk {output.human_size(result['DiskBytes'])} in "
        f"{result['DiskMs'] / 1000:.1f} s, memory {output.human_size(result['RamBytes'])} in "
        f"{result['RamMs'] / 1000:.1f} s)"
    )
    return 0


def cmd_ls(client: Client, args: argparse.Namespace) -> int:
    vms = client.vm_list(all=args.all)
    if args.quiet:
        for vm in vms:
            print(vm["Name"])
        return 0
    if args.format == "json":
        output.json_lines(vms)
        return 0
    rows = []
    for vm in vms:
        source = vm.get("Disk") or vm.get("Image") or ""
        if vm.get("Iso"):
            source += f" (+ {os.path.basename(vm['Iso'])})"
        rows.append([vm["Name"], vm["State"], str(vm["Cpus"]), f"{vm['MemoryMiB']} MiB", vm["Firmware"],
                     ", ".join(vm.get("Addresses") or []), source])  # fmt: skip
    output.table(["NAME", "STATE", "CPUS", "MEMORY", "FIRMWARE", "ADDRESSES", "DISK / IMAGE"], rows)
    return 0


def cmd_rm(client: Client, args: argparse.Namespace) -> int:
    def remove(ref: str) -> None:
        client.vm_remove(ref, force=args.force, delete_disk=args.delete_disk)

    return output.for_each(args.names, remove)
