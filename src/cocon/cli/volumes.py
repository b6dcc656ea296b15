"""Volume commands: `cocon volume create|ls|inspect|rm|prune` (directory volumes, and disk volumes for
VMs: `cocon volume create --type disk --size 10G NAME`)."""

from __future__ import annotations

import argparse
from typing import Any

from cocon.api.client import Client
from cocon.cli import output


def register(sub: Any) -> None:
    group = sub.add_parser("volume", help="manage named volumes (create, ls, inspect, rm, prune)")
    vsub = group.add_subparsers(dest="volume_command", metavar="COMMAND", title="commands")
    vsub.required = True
    p = vsub.add_parser("create", help="create a volume (a random name if none is given)")
    p.add_argument("name", nargs="?", metavar="NAME", help="[a-zA-Z0-9][a-zA-Z0-9_.-]+")
    p.add_argument("--label", action="append", default=[], metavar="K=V", help="set a label (repeatable)")
    p.add_argument("--type", choices=("dir", "disk"), default=None,
                   help="dir: a directory (the default); disk: a qcow2 disk that VMs attach")  # fmt: skip
    p.add_argument(
        "--size", metavar="SIZE", help="the size of a disk volume (required with --type disk), e.g. 10G"
    )
    p.add_argument("-o", "--opt", action="append", default=[], metavar="K=V",
                   help="driver option, as docker: type=disk, size=10G (repeatable)")  # fmt: skip
    p.set_defaults(func=cmd_create)
    p = vsub.add_parser("ls", aliases=["list"], help="list volumes")
    p.add_argument("-q", "--quiet", action="store_true", help="print only names")
    p.add_argument("--format", choices=("table", "json"), default="table",
                   help="table (default) or json (one JSON object per line)")  # fmt: skip
    p.set_defaults(func=cmd_ls)
    p = vsub.add_parser("inspect", help="show volumes' details as JSON")
    p.add_argument("names", nargs="+", metavar="NAME")
    p.add_argument("--format", choices=("json",), default="json", help="json (the default and only format)")
    p.set_defaults(func=cmd_inspect)
    p = vsub.add_parser("rm", aliases=["remove"], help="remove volumes (refused while a container uses one)")
    p.add_argument("names", nargs="+", metavar="NAME")
    p.add_argument("-f", "--force", action="store_true", help="no error for volumes that do not exist")
    p.set_defaults(func=cmd_rm)
    p = vsub.add_parser("prune", help="remove unused anonymous volumes (-a: every unused volume)")
    p.add_argument("-a", "--all", action="store_true", help="also named volumes no container uses")
    p.add_argument("-f", "--force", action="store_true", help="do not ask for confirmation")
    p.set_defaults(func=cmd_prune)


def cmd_create(client: Client, args: argparse.Namespace) -> int:
    labels: dict[str, str] = {}
    for item in args.label:
        k, _, v = item.partition("=")
        if not k:
            output.error(f"invalid label {item!r}: use K=V")
            return 2
        labels[k] = v
    opts: dict[str, str] = {}
    for item in args.opt:
        k, sep, v = item.partition("=")
        if not k or not sep:
            output.error(f"invalid driver option {item!r}: use K=V (type=disk, size=10G)")
            return 2
        opts[k] = v
    if args.type:
        opts["type"] = args.type
    if args.size:
        opts["size"] = args.size
    if opts:
        vol = client.volume_create(args.name, labels=labels or None, driver_opts=opts)
    else:
        vol = client.volume_create(args.name, labels=labels or None)
    print(vol["Name"])
    return 0


def cmd_ls(client: Client, args: argparse.Namespace) -> int:
    vols = client.volume_list()["Volumes"]
    if args.quiet:
        for v in vols:
            print(v["Name"])
        return 0
    if args.format == "json":
        output.json_lines(
            [
                {
                    "Driver": v["Driver"],
                    "Labels": ",".join(f"{k}={x}" for k, x in sorted(v["Labels"].items())),
                    "Mountpoint": v["Mountpoint"],
                    "Name": v["Name"],
                    "Scope": v["Scope"],
                    "CreatedAt": v["CreatedAt"],
                    "Type": volume_type(v),
                    "Size": (v.get("Options") or {}).get("size", ""),
                }
                for v in vols
            ]
        )
        return 0
    output.table(["DRIVER", "VOLUME NAME", "TYPE"], [[v["Driver"], v["Name"], volume_type(v)] for v in vols])
    return 0


def volume_type(doc: dict[str, Any]) -> str:
    """dir or disk, from a volume's API document (a disk volume says so in its Options)."""
    return str((doc.get("Options") or {}).get("type") or "dir")


def cmd_inspect(client: Client, args: argparse.Namespace) -> int:
    return output.inspect_each(args.names, client.volume_inspect)


def cmd_rm(client: Client, args: argparse.Namespace) -> int:
    return output.for_each(args.names, lambda name: client.volume_remove(name, force=args.force))


def cmd_prune(client: Client, args: argparse.Namespace) -> int:
    from cocon.cli.images import confirm

    what = (
        "all local volumes not used by at least one container"
        if args.all
        else "all anonymous local volumes not used by at least one container"
    )
    if not args.force and not confirm(
        f"WARNING! This will remove {what}.\nAre you sure you want to continue?"
    ):
        return 0
    result = client.volume_prune(all=args.all)
    deleted = result.get("VolumesDeleted") or []
    if deleted:
        print("Deleted Volumes:")
        for name in deleted:
            print(name)
        print()
    print(f"Total reclaimed space: {output.human_size(result.get('SpaceReclaimed', 0))}")
    return 0
