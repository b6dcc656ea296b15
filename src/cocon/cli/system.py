"""`cocon system reset`: remove everything cocon made on this node (containers, networks with their
bridges and firewall table, volumes, images), as `podman system reset` does. Asks first on a
terminal; `-f` does not ask (and is required without a terminal)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from cocon.api.client import Client


def register(sub: Any) -> None:
    group = sub.add_parser("system", help="manage cocon's state on this node (reset)")
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
