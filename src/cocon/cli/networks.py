"""Network commands: `cocon network create|ls|inspect|rm|connect|disconnect|policy` (docs/network.md)."""

from __future__ import annotations

import argparse
from typing import Any

from cocon.api.client import APIError, Client
from cocon.cli import output


def register(sub: Any) -> None:
    group = sub.add_parser(
        "network", help="manage networks (create, ls, inspect, rm, connect, disconnect, policy)"
    )
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
    p.add_argument("--label", action="append", default=[], metavar="K=V",
                   help="set a label (repeatable); cocon.policy.allow-from=SOURCE[:PORTS],... adds allow "
                        "rules as `network policy add` does (e.g. frontend:80/tcp,10.1.0.0/16)")  # fmt: skip
    p.add_argument("-o", "--opt", action="append", default=[], metavar="K=V",
                   help="driver option: mtu=N (com.docker.network.driver.mtu; default 1500)")  # fmt: skip
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
    _register_policy(nsub)


POLICY_HELP = """\
Instances of different networks cannot reach each other, and nothing outside reaches a network's
instances except through published ports (-p). An allow rule opens one network to new connections
from another network's instances (or from a subnet routed to this host), to every port or only to
some of the instances' own ports. Replies always pass; the opposite direction needs its own rule.
Rules live in the network's firewall chain (see `cocon network inspect NETWORK`, "Firewall"),
survive daemon restarts and go with the network. Labels declare them at create time:
  cocon network create --label cocon.policy.allow-from=frontend:80/tcp,monitoring backend

examples:
  cocon network policy add backend --from frontend --port 5432/tcp
  cocon network policy add backend --from monitoring --port 9100-9110
  cocon network policy ls backend
  cocon network policy rm backend 3f2a9c"""


def _register_policy(nsub: Any) -> None:
    group = nsub.add_parser(
        "policy", help="allow traffic into a network from other networks (add, ls, rm)",
        description=POLICY_HELP, formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    psub = group.add_subparsers(dest="policy_command", metavar="COMMAND", title="commands")
    psub.required = True
    p = psub.add_parser(
        "add", help="add allow rules into NETWORK (prints their IDs)",
        description="Let instances of the --from network (or a subnet) open connections to the instances "
        "of NETWORK, on every port or on the --port ones. One rule per --from and --port.",
    )  # fmt: skip
    p.add_argument("network", metavar="NETWORK", help="the network the traffic goes into")
    p.add_argument("--from", dest="sources", action="append", required=True, metavar="SOURCE",
                   help="a network (name or ID) whose instances may connect, or a subnet in CIDR "
                        "notation (repeatable)")  # fmt: skip
    p.add_argument("-p", "--port", dest="ports", action="append", default=[], metavar="PORT[-END][/PROTO]",
                   help="only this port or range of the instances (tcp unless /udp; 'tcp' or 'udp' alone: "
                        "every port of it; repeatable); default: everything, ping included")  # fmt: skip
    p.add_argument("-d", "--description", default="", metavar="TEXT", help="a note kept with the rule")
    p.set_defaults(func=cmd_policy_add)
    p = psub.add_parser(
        "ls",
        aliases=["list"],
        help="list the allow rules into networks",
        description="The allow rules into NETWORK (every user network when none is given).",
    )
    p.add_argument("networks", nargs="*", metavar="NETWORK")
    p.add_argument("-q", "--quiet", action="store_true", help="print only rule IDs")
    p.add_argument("--format", choices=("table", "json"), default="table",
                   help="table (default) or json (one JSON object per line)")  # fmt: skip
    p.add_argument("--no-trunc", action="store_true", help="do not truncate descriptions")
    p.set_defaults(func=cmd_policy_ls)
    p = psub.add_parser(
        "rm",
        aliases=["remove"],
        help="remove allow rules (their traffic is blocked again)",
        description="Remove rules of NETWORK by ID (or a unique prefix of one).",
    )
    p.add_argument("network", metavar="NETWORK")
    p.add_argument("rules", nargs="+", metavar="RULE")
    p.set_defaults(func=cmd_policy_rm)


def _pairs(items: list[str], what: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items:
        k, sep, v = item.partition("=")
        if not k or not sep:
            raise APIError(f"invalid {what} {item!r}: use K=V", 400)
        out[k] = v
    return out


OPTION_ALIASES = {"mtu": "com.docker.network.driver.mtu"}


def _options(items: list[str]) -> dict[str, str]:
    """-o K=V; the short `mtu` is Docker's com.docker.network.driver.mtu."""
    return {OPTION_ALIASES.get(k, k): v for k, v in _pairs(items, "option").items()}


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
        "Options": _options(args.opt),
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


def cmd_policy_add(client: Client, args: argparse.Namespace) -> int:
    for source in args.sources:
        for ports in args.ports or [""]:
            rule = client.network_policy_add(args.network, source, ports, args.description)
            print(rule["Id"])
    return 0


def cmd_policy_ls(client: Client, args: argparse.Namespace) -> int:
    names = args.networks or [
        n["Name"] for n in client.network_list() if n["Name"] not in ("bridge", "host", "none")
    ]
    rules: list[dict[str, Any]] = []
    failed = False
    for name in names:
        try:
            rules += client.network_policy_list(name)
        except APIError as exc:
            output.error(str(exc))
            failed = True
    if args.quiet:
        for r in rules:
            print(r["Id"])
    elif args.format == "json":
        output.json_lines(rules)
    else:
        output.table(
            ["RULE ID", "NETWORK", "FROM", "PORTS", "ORIGIN", "STATUS", "DESCRIPTION"],
            [
                [r["Id"], r["Network"], r["From"], r["Ports"], r["Origin"],
                 "active" if r["Active"] else f"waiting for network {r['From']}",
                 r["Description"] if args.no_trunc else output.truncate(r["Description"], 40)]
                for r in rules
            ],
        )  # fmt: skip
    return 1 if failed else 0


def cmd_policy_rm(client: Client, args: argparse.Namespace) -> int:
    failed = False
    for rule in args.rules:
        try:
            print(client.network_policy_remove(args.network, rule)["Id"])
        except APIError as exc:
            output.error(str(exc))
            failed = True
    return 1 if failed else 0
