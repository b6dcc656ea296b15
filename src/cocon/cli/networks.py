"""Network commands: `cocon network create|ls|inspect|rm|connect|disconnect` (docs/network.md)."""

from __future__ import annotations

import argparse
from typing import Any

from cocon.api.client import APIError, Client
from cocon.cli import output


def register(sub: Any) -> None:
    group = sub.add_parser("network", help="manage networks (create, ls, inspect, rm, connect, disconnect)")
    nsub = group.add_subparsers(dest="network_command", metavar="COMMAND", title="commands")
    nsub.required = True
    p = nsub.add_parser("create", help="create a bridge network")
    p.add_argument("name", metavar="NAME")
    p.add_argument("--subnet", action="append", default=[], metavar="CIDR",
                   help="the subnet (one IPv4, one IPv6 with --ipv6); default: a free one")  # fmt: skip
    p.add_argument("--gateway", action="append", default=[], metavar="ADDRESS",
                   help="the gateway of a subnet (default: its first address)")  # fmt: skip
    p.add_argument("--ip-range", metavar="CIDR", help="hand out addresses from this part of the subnet")
    p.add_argument("--internal", action="store_true", help="no traffic in or out of the network")
    p.add_argument("--ipv6", action="store_true", help="IPv6 too (give an IPv6 --subnet)")
    p.add_argument("--label", action="append", default=[], metavar="K=V", help="set a label (repeatable)")
    p.add_argument("-o", "--opt", action="append", default=[], metavar="K=V",
                   help="driver option (com.docker.network.driver.mtu)")  # fmt: skip
    p.add_argument("-d", "--driver", default="bridge", help="bridge (the only driver)")
    p.set_defaults(func=cmd_create)
    p = nsub.add_parser("ls", aliases=["list"], help="list networks")
    p.add_argument("-q", "--quiet", action="store_true", help="print only IDs")
    p.add_argument("--format", choices=("table", "json"), default="table",
                   help="table (default) or json (one JSON object per line)")  # fmt: skip
    p.set_defaults(func=cmd_ls)
    p = nsub.add_parser("inspect", help="show networks' details as JSON")
    p.add_argument("names", nargs="+", metavar="NETWORK")
    p.set_defaults(func=cmd_inspect)
    p = nsub.add_parser("rm", aliases=["remove"], help="remove networks (refused while containers use one)")
    p.add_argument("names", nargs="+", metavar="NETWORK")
    p.set_defaults(func=cmd_rm)
    p = nsub.add_parser("connect", help="connect a container to a network (a running one at once)")
    p.add_argument("network", metavar="NETWORK")
    p.add_argument("container", metavar="CONTAINER")
    p.add_argument("--ip", help="its IPv4 address on the network")
    p.add_argument("--ip6", help="its IPv6 address on the network")
    p.add_argument("--alias", action="append", default=[], help="another name on the network (repeatable)")
    p.set_defaults(func=cmd_connect)
    p = nsub.add_parser("disconnect", help="disconnect a container from a network")
    p.add_argument("network", metavar="NETWORK")
    p.add_argument("container", metavar="CONTAINER")
    p.add_argument("-f", "--force", action="store_true", help="also for a container that is gone")
    p.set_defaults(func=cmd_disconnect)


def _pairs(items: list[str], what: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items:
        k, sep, v = item.partition("=")
        if not k or not sep:
            raise APIError(f"invalid {what} {item!r}: use K=V", 400)
        out[k] = v
    return out


def cmd_create(client: Client, args: argparse.Namespace) -> int:
    v4 = [s for s in args.subnet if ":" not in s]
    v6 = [s for s in args.subnet if ":" in s]
    if len(v4) > 1 or len(v6) > 1:
        output.error("give at most one IPv4 and one IPv6 --subnet")
        return 2
    gateways = {(":" in g): g for g in args.gateway}
    configs = []
    for subnet in v4 + v6:
        cfg = {"Subnet": subnet}
        gw = gateways.pop(":" in subnet, None)
        if gw:
            cfg["Gateway"] = gw
        if args.ip_range and (":" in args.ip_range) == (":" in subnet):
            cfg["IPRange"] = args.ip_range
        configs.append(cfg)
    if gateways or (args.ip_range and not any("IPRange" in c for c in configs)):
        output.error("--gateway and --ip-range need a --subnet of their IP version")
        return 2
    doc = {
        "Name": args.name,
        "Driver": args.driver,
        "Internal": args.internal,
        "EnableIPv6": args.ipv6,
        "Labels": _pairs(args.label, "label"),
        "Options": _pairs(args.opt, "option"),
        "IPAM": {"Driver": "default", "Config": configs},
    }
    print(client.network_create(doc)["Id"])
    return 0


def _subnets(net: dict[str, Any]) -> str:
    return ",".join(c.get("Subnet", "") for c in (net.get("IPAM") or {}).get("Config") or [])


def cmd_ls(client: Client, args: argparse.Namespace) -> int:
    nets = client.network_list()
    if args.quiet:
        for n in nets:
            print(n["Id"][:12])
        return 0
    if args.format == "json":
        output.json_lines(
            [
                {
                    "ID": n["Id"][:12], "Name": n["Name"], "Driver": n["Driver"], "Scope": n["Scope"],
                    "IPv6": str(n.get("EnableIPv6", False)).lower(),
                    "Internal": str(n.get("Internal", False)).lower(), "Subnet": _subnets(n),
                    "Labels": ",".join(f"{k}={v}" for k, v in sorted((n.get("Labels") or {}).items())),
                    "CreatedAt": n.get("Created", ""),
                }
                for n in nets
            ]
        )  # fmt: skip
        return 0
    output.table(
        ["NETWORK ID", "NAME", "DRIVER", "SCOPE", "SUBNET"],
        [[n["Id"][:12], n["Name"], n["Driver"], n["Scope"], _subnets(n)] for n in nets],
    )
    return 0


def cmd_inspect(client: Client, args: argparse.Namespace) -> int:
    return output.inspect_each(args.names, client.network_inspect)


def cmd_rm(client: Client, args: argparse.Namespace) -> int:
    return output.for_each(args.names, client.network_remove)


def cmd_connect(client: Client, args: argparse.Namespace) -> int:
    client.network_connect(args.network, args.container, aliases=args.alias, ip=args.ip, ip6=args.ip6)
    return 0


def cmd_disconnect(client: Client, args: argparse.Namespace) -> int:
    client.network_disconnect(args.network, args.container, force=args.force)
    return 0
