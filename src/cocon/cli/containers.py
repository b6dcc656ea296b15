"""Container commands: `cocon ps`, `cocon rm`, `cocon inspect`, and the `cocon container …` group."""

from __future__ import annotations

import argparse
import time
from typing import Any

from cocon.api.client import APIError, Client
from cocon.cli import output


def register(sub: Any) -> None:
    _ps_args(sub.add_parser("ps", help="list containers (-a: stopped ones too)"))
    _rm_args(sub.add_parser("rm", help="remove containers"))
    _inspect_args(sub.add_parser("inspect", help="show containers' (or images') details as JSON"))
    group = sub.add_parser("container", help="manage containers (ls, rm, inspect)")
    csub = group.add_subparsers(dest="container_command", metavar="COMMAND", title="commands")
    csub.required = True
    _ps_args(csub.add_parser("ls", aliases=["list", "ps"], help="list containers"))
    _rm_args(csub.add_parser("rm", aliases=["remove"], help="remove containers"))
    _inspect_args(csub.add_parser("inspect", help="show containers' details as JSON"), containers_only=True)


def _ps_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-a", "--all", action="store_true", help="show every container (default: running ones)")
    p.add_argument("-q", "--quiet", action="store_true", help="print only container IDs")
    p.add_argument("--no-trunc", action="store_true", help="do not shorten IDs and commands")
    p.add_argument("--format", choices=("table", "json"), default="table",
                   help="table (default) or json (one JSON object per line)")  # fmt: skip
    p.set_defaults(func=cmd_ps)


def _rm_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("containers", nargs="+", metavar="CONTAINER", help="name or ID (or a unique ID prefix)")
    p.add_argument("-f", "--force", action="store_true", help="kill a running container first")
    p.add_argument("-v", "--volumes", action="store_true", help="also remove its anonymous volumes")
    p.set_defaults(func=cmd_rm)


def _inspect_args(p: argparse.ArgumentParser, *, containers_only: bool = False) -> None:
    p.add_argument("names", nargs="+", metavar="NAME", help="container (or image) name or ID")
    if not containers_only:
        p.add_argument("--type", choices=("container", "image"), help="only look for this kind of object")
    p.add_argument("--format", choices=("json",), default="json", help="json (the default and only format)")
    p.set_defaults(func=cmd_inspect, type="container" if containers_only else None)


def _command(c: dict[str, Any], no_trunc: bool) -> str:
    text = f'"{c["Command"]}"' if no_trunc else f'"{output.truncate(c["Command"], 20)}"'
    return text


def cmd_ps(client: Client, args: argparse.Namespace) -> int:
    items = client.container_list(all=args.all)

    def ident(c: dict[str, Any]) -> str:
        return str(c["Id"]) if args.no_trunc else str(c["Id"])[:12]

    if args.quiet:
        for c in items:
            print(ident(c))
        return 0
    if args.format == "json":
        output.json_lines(
            [
                {
                    "Command": _command(c, args.no_trunc),
                    "CreatedAt": time.strftime("%Y-%m-%d %H:%M:%S +0000 UTC", time.gmtime(c["Created"])),
                    "ID": ident(c),
                    "Image": c["Image"],
                    "Isolation": c.get("Isolation", "container"),
                    "Labels": ",".join(f"{k}={v}" for k, v in sorted((c.get("Labels") or {}).items())),
                    "LocalVolumes": str(sum(1 for m in c.get("Mounts", []) if m["Type"] == "volume")),
                    "Mounts": ",".join(m.get("Name") or m["Source"] for m in c.get("Mounts", [])),
                    "Names": ",".join(n.lstrip("/") for n in c["Names"]),
                    "RunningFor": output.time_ago(c["Created"]),
                    "State": c["State"],
                    "Status": c["Status"],
                }
                for c in items
            ]
        )
        return 0
    output.table(
        ["CONTAINER ID", "IMAGE", "COMMAND", "CREATED", "STATUS", "NAMES"],
        [
            [
                ident(c),
                c["Image"],
                _command(c, args.no_trunc),
                output.time_ago(c["Created"]),
                c["Status"],
                ",".join(n.lstrip("/") for n in c["Names"]),
            ]
            for c in items
        ],
    )
    return 0


def cmd_rm(client: Client, args: argparse.Namespace) -> int:
    failed = False
    for ref in args.containers:
        try:
            client.container_remove(ref, force=args.force, volumes=args.volumes)
            print(ref)
        except APIError as exc:
            output.error(str(exc))
            failed = True
    return 1 if failed else 0


def cmd_inspect(client: Client, args: argparse.Namespace) -> int:
    docs: list[dict[str, Any]] = []
    failed = False
    for name in args.names:
        try:
            if args.type == "image":
                docs.append(client.image_inspect(name))
                continue
            try:
                docs.append(client.container_inspect(name))
            except APIError as exc:
                if exc.status != 404 or args.type == "container":
                    raise
                docs.append(client.image_inspect(name))
        except APIError as exc:
            output.error(f"no such object: {name}" if exc.status == 404 and args.type is None else str(exc))
            failed = True
    output.json_doc(docs)
    return 1 if failed else 0
