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
    for parser in (sub, csub):
        _lifecycle_commands(parser)


def _lifecycle_commands(sub: Any) -> None:
    """start, stop, restart, kill, wait, logs, exec, attach, pause, unpause, rename, top, stats, cp,
    port (docs/lifecycle.md)."""
    p = sub.add_parser("start", help="start stopped containers")
    p.add_argument("containers", nargs="+", metavar="CONTAINER")
    p.add_argument("-a", "--attach", action="store_true", help="attach to its output (and wait for it)")
    p.add_argument("-i", "--interactive", action="store_true", help="attach this input too")
    p.set_defaults(func=cmd_start)
    for name, text in (("stop", "stop running containers (stop signal, then SIGKILL)"),
                       ("restart", "restart containers")):  # fmt: skip
        p = sub.add_parser(name, help=text)
        p.add_argument("containers", nargs="+", metavar="CONTAINER")
        p.add_argument("-t", "--time", "--timeout", dest="time", type=int, default=None,
                       help="seconds to wait before SIGKILL (default: the container's, else 10)")  # fmt: skip
        p.add_argument("-s", "--signal", default=None, help="signal to send first (default: its STOPSIGNAL)")
        p.set_defaults(func=cmd_stop if name == "stop" else cmd_restart)
    p = sub.add_parser("kill", help="send a signal to running containers (default SIGKILL)")
    p.add_argument("containers", nargs="+", metavar="CONTAINER")
    p.add_argument("-s", "--signal", default="KILL", help="signal name or number (default KILL)")
    p.set_defaults(func=cmd_kill)
    p = sub.add_parser("wait", help="wait until containers stop; print their exit codes")
    p.add_argument("containers", nargs="+", metavar="CONTAINER")
    p.add_argument("--condition", choices=("not-running", "next-exit", "removed"), default="not-running")
    p.set_defaults(func=cmd_wait)
    p = sub.add_parser("logs", help="show a container's output")
    p.add_argument("container", metavar="CONTAINER")
    p.add_argument("-f", "--follow", action="store_true", help="keep following the output")
    p.add_argument("--since", help="only after: Unix seconds, RFC 3339 time, or a duration ago (10m)")
    p.add_argument("--until", help="only before (same forms as --since)")
    p.add_argument("-n", "--tail", default="all", help="only the last N lines (default: all)")
    p.add_argument("-t", "--timestamps", action="store_true", help="prefix each line with its time")
    p.set_defaults(func=cmd_logs)
    p = sub.add_parser("exec", help="run a command in a running container")
    p.add_argument("-i", "--interactive", action="store_true", help="keep stdin open")
    p.add_argument("-t", "--tty", action="store_true", help="give the command a pseudo-terminal")
    p.add_argument("-u", "--user", help="UID[:GID] or a user name of the container")
    p.add_argument("-w", "--workdir", help="working directory in the container")
    p.add_argument("-e", "--env", action="append", default=[], help="set an environment variable K=V")
    p.add_argument("-d", "--detach", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("container", metavar="CONTAINER")
    p.add_argument("command", nargs=argparse.REMAINDER, metavar="COMMAND [ARG...]")
    p.set_defaults(func=cmd_exec)
    p = sub.add_parser("attach", help="attach this terminal to a running container")
    p.add_argument("container", metavar="CONTAINER")
    p.add_argument("--no-stdin", action="store_true", help="do not attach this input")
    p.set_defaults(func=cmd_attach)
    for name, text in (("pause", "freeze every process of containers"),
                       ("unpause", "thaw paused containers")):  # fmt: skip
        p = sub.add_parser(name, help=text)
        p.add_argument("containers", nargs="+", metavar="CONTAINER")
        p.set_defaults(func=cmd_pause if name == "pause" else cmd_unpause)
    p = sub.add_parser("rename", help="rename a container")
    p.add_argument("container", metavar="CONTAINER")
    p.add_argument("name", metavar="NEW_NAME")
    p.set_defaults(func=cmd_rename)
    p = sub.add_parser("top", help="show a container's processes")
    p.add_argument("container", metavar="CONTAINER")
    p.add_argument("ps_args", nargs=argparse.REMAINDER, metavar="PS_OPTIONS")
    p.set_defaults(func=cmd_top)
    p = sub.add_parser("stats", help="resource usage of containers (cpu, memory, pids, network, block io)")
    p.add_argument("containers", nargs="*", metavar="CONTAINER")
    p.add_argument("-a", "--all", action="store_true", help="stopped containers too")
    p.add_argument("--no-stream", action="store_true", help="print once (the only mode so far)")
    p.add_argument("--format", choices=("table", "json"), default="table")
    p.set_defaults(func=cmd_stats)
    p = sub.add_parser("cp", help="copy files between a container and this machine")
    p.add_argument("source", metavar="SRC", help="CONTAINER:PATH or a local path")
    p.add_argument("dest", metavar="DEST", help="CONTAINER:PATH or a local path")
    p.set_defaults(func=cmd_cp)
    p = sub.add_parser("port", help="a container's published ports")
    p.add_argument("container", metavar="CONTAINER")
    p.add_argument("private", nargs="?", metavar="PRIVATE_PORT[/PROTO]")
    p.set_defaults(func=cmd_port)


def _ps_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-a", "--all", action="store_true", help="show every container (default: running ones)")
    p.add_argument("-q", "--quiet", action="store_true", help="print only container IDs")
    p.add_argument("--no-trunc", action="store_true", help="do not shorten IDs and commands")
    p.add_argument("--format", choices=("table", "json"), default="table",
                   help="table (default) or json (one JSON object per line)")  # fmt: skip
    p.add_argument("-f", "--filter", action="append", default=[], metavar="KEY=VALUE",
                   help="status=, name=, id=, label=K[=V], ancestor=, exited=N, health=")  # fmt: skip
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


def display_ports(ports: list[dict[str, Any]]) -> str:
    """Docker's PORTS column (docker/cli's DisplayablePorts): `0.0.0.0:8080->80/tcp`, `[::]:8080->80/tcp`,
    runs of equal host and container ports grouped (`0.0.0.0:8000-8002->8000-8002/tcp`), exposed
    ports alone (`80/tcp`)."""

    def join(ip: str, port: str) -> str:
        return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"

    def order(p: dict[str, Any]) -> tuple[int, int, str, str]:
        return (int(p.get("PrivatePort") or 0), int(p.get("PublicPort") or 0), str(p.get("Type") or ""),
                str(p.get("IP") or ""))  # fmt: skip

    groups: dict[tuple[str, str], list[int]] = {}
    result: list[str] = []
    mappings: list[str] = []
    for p in sorted(ports, key=order):
        private, kind, ip = (
            int(p.get("PrivatePort") or 0),
            str(p.get("Type") or "tcp"),
            str(p.get("IP") or ""),
        )
        if ip and int(p.get("PublicPort") or 0) != private:
            mappings.append(f"{join(ip, str(p.get('PublicPort')))}->{private}/{kind}")
            continue
        group = groups.get((ip, kind))
        if group is not None and private == group[1] + 1:
            group[1] = private
            continue
        if group is not None:
            result.append(_port_group(ip, kind, group, join))
        groups[(ip, kind)] = [private, private]
    result += [_port_group(ip, kind, g, join) for (ip, kind), g in groups.items()]
    return ", ".join(result + mappings)


def _port_group(ip: str, kind: str, group: list[int], join: Any) -> str:
    text = str(group[0]) if group[0] == group[1] else f"{group[0]}-{group[1]}"
    return f"{join(ip, text)}->{text}/{kind}" if ip else f"{text}/{kind}"


def cmd_ps(client: Client, args: argparse.Namespace) -> int:
    items = client.container_list(
        all=args.all or any(f.startswith(("status=", "exited=")) for f in args.filter)
    )
    if args.filter:
        items = filter_containers(items, args.filter)

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
                    "Ports": display_ports(c.get("Ports") or []),
                    "RunningFor": output.time_ago(c["Created"]),
                    "State": c["State"],
                    "Status": c["Status"],
                }
                for c in items
            ]
        )
        return 0
    output.table(
        ["CONTAINER ID", "IMAGE", "COMMAND", "CREATED", "STATUS", "PORTS", "NAMES"],
        [
            [
                ident(c),
                c["Image"],
                _command(c, args.no_trunc),
                output.time_ago(c["Created"]),
                c["Status"],
                display_ports(c.get("Ports") or []),
                ",".join(n.lstrip("/") for n in c["Names"]),
            ]
            for c in items
        ],
    )
    return 0


def cmd_rm(client: Client, args: argparse.Namespace) -> int:
    return output.for_each(
        args.containers, lambda ref: client.container_remove(ref, force=args.force, volumes=args.volumes)
    )


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


# --- life cycle --------------------------------------------------------------------------------------
def filter_containers(items: list[dict[str, Any]], filters: list[str]) -> list[dict[str, Any]]:
    """Docker's `ps --filter`: values of one key are alternatives, different keys must all match."""
    by_key: dict[str, list[str]] = {}
    for f in filters:
        key, eq, value = f.partition("=")
        if not eq or key not in ("status", "name", "id", "label", "ancestor", "exited", "health"):
            raise APIError(
                f"invalid filter {f!r}: use status=, name=, id=, label=, ancestor=, exited= or health=", 400
            )
        by_key.setdefault(key, []).append(value)

    def match(c: dict[str, Any], key: str, value: str) -> bool:
        if key == "status":
            return bool(c["State"] == value)
        if key == "name":
            return any(value in n.lstrip("/") for n in c["Names"])
        if key == "id":
            return str(c["Id"]).startswith(value)
        if key == "label":
            k, eq, v = value.partition("=")
            labels = c.get("Labels") or {}
            return k in labels and (not eq or labels[k] == v)
        if key == "ancestor":
            image = str(c["Image"])
            return value in (image, image.removesuffix(":latest")) or str(c.get("ImageID", "")).startswith(
                value if value.startswith("sha256:") else f"sha256:{value}"
            )
        if key == "exited":
            return c["State"] == "exited" and f"Exited ({value})" in str(c["Status"])
        if key == "health":
            status = str(c["Status"])
            return f"({value})" in status or (
                value == "none" and "(health" not in status and "healthy)" not in status
            )
        return False

    return [c for c in items if all(any(match(c, k, v) for v in vs) for k, vs in by_key.items())]


def cmd_start(client: Client, args: argparse.Namespace) -> int:
    if args.attach or args.interactive:
        if len(args.containers) != 1:
            output.error("you cannot start and attach multiple containers at once")
            return 1
        ref = args.containers[0]
        code = client.container_start_attach(ref, stdin=args.interactive)
        if code >= 0:
            return code
        return 0
    return output.for_each(args.containers, client.container_start_detached)


def cmd_stop(client: Client, args: argparse.Namespace) -> int:
    return output.for_each(args.containers, lambda ref: client.container_stop(ref, timeout=args.time))


def cmd_restart(client: Client, args: argparse.Namespace) -> int:
    return output.for_each(args.containers, lambda ref: client.container_restart(ref, timeout=args.time))


def cmd_kill(client: Client, args: argparse.Namespace) -> int:
    from cocon.engine.supervisor import parse_signal

    try:
        sig = parse_signal(args.signal)
    except Exception as exc:
        output.error(str(exc))
        return 1
    return output.for_each(args.containers, lambda ref: client.container_kill(ref, sig))


def cmd_wait(client: Client, args: argparse.Namespace) -> int:
    failed = False
    for ref in args.containers:
        try:
            print(client.container_wait_until(ref, args.condition)["StatusCode"], flush=True)
        except APIError as exc:
            output.error(str(exc))
            failed = True
    return 1 if failed else 0


def cmd_logs(client: Client, args: argparse.Namespace) -> int:
    import os
    import sys

    tail = None
    if args.tail not in ("all", ""):
        try:
            tail = int(args.tail)
        except ValueError:
            output.error(f"invalid --tail {args.tail!r}: give a number of lines or all")
            return 1
    sys.stdout.flush()
    for stream, line in client.container_logs(
        args.container, since=args.since, until=args.until, tail=tail if tail is None or tail >= 0 else None,
        timestamps=args.timestamps, follow=args.follow,
    ):  # fmt: skip
        fd = 2 if stream == "stderr" else 1
        view = memoryview(line)
        while view:
            view = view[os.write(fd, view) :]
    return 0


def cmd_exec(client: Client, args: argparse.Namespace) -> int:
    cmd = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not cmd:
        output.error("exec needs a command: cocon exec [OPTIONS] CONTAINER COMMAND [ARG...]")
        return 2
    if args.detach:
        output.error("exec -d is not supported yet: run the command in the background inside (sh -c 'cmd &')")
        return 2
    return client.container_exec(args.container, cmd, tty=args.tty, stdin=args.interactive, user=args.user,
                                 workdir=args.workdir, env=args.env)  # fmt: skip


def cmd_attach(client: Client, args: argparse.Namespace) -> int:
    code = client.container_attach(args.container, stdin=not args.no_stdin)
    return code if code >= 0 else 0


def cmd_pause(client: Client, args: argparse.Namespace) -> int:
    return output.for_each(args.containers, client.container_pause)


def cmd_unpause(client: Client, args: argparse.Namespace) -> int:
    return output.for_each(args.containers, client.container_unpause)


def cmd_rename(client: Client, args: argparse.Namespace) -> int:
    client.container_rename(args.container, args.name)
    return 0


def cmd_top(client: Client, args: argparse.Namespace) -> int:
    top = client.container_top(args.container, " ".join(args.ps_args) or None)
    output.table(top["Titles"], top["Processes"])
    return 0


def cmd_stats(client: Client, args: argparse.Namespace) -> int:
    refs = args.containers or [c["Id"] for c in client.container_list(all=args.all)]
    rows = []
    docs = []
    for ref in refs:
        s = client.container_stats(ref)
        docs.append(s)
        rows.append([s["id"][:12], s["name"].lstrip("/"), f"{s['CPUPerc']:.2f}%",
                     f"{output.human_size(s['MemUsage'])} / {output.human_size(s['MemLimit'])}",
                     f"{s['MemPerc']:.2f}%",
                     f"{output.human_size(s['NetInput'])} / {output.human_size(s['NetOutput'])}",
                     f"{output.human_size(s['BlockInput'])} / {output.human_size(s['BlockOutput'])}",
                     str(s["pids_stats"].get("current", 0))])  # fmt: skip
    if args.format == "json":
        output.json_lines(
            [
                {
                    "ID": r[0],
                    "Name": r[1],
                    "CPUPerc": r[2],
                    "MemUsage": r[3],
                    "MemPerc": r[4],
                    "NetIO": r[5],
                    "BlockIO": r[6],
                    "PIDs": r[7],
                }
                for r in rows
            ]
        )
        return 0
    titles = ["CONTAINER ID", "NAME", "CPU %", "MEM USAGE / LIMIT", "MEM %", "NET I/O", "BLOCK I/O", "PIDS"]
    output.table(titles, rows)
    return 0


def _split_cp(arg: str) -> tuple[str | None, str]:
    if arg.startswith(("/", ".")) or ":" not in arg:
        return None, arg
    container, _, path = arg.partition(":")
    return container, path


def cmd_cp(client: Client, args: argparse.Namespace) -> int:
    src_c, src = _split_cp(args.source)
    dst_c, dst = _split_cp(args.dest)
    if (src_c is None) == (dst_c is None):
        output.error(
            "cp copies between a container and this machine: one of SRC and DEST must be CONTAINER:PATH"
        )
        return 2
    if src_c is not None:
        client.container_copy_from(src_c, src, dst)
    else:
        assert dst_c is not None
        client.container_copy_to(dst_c, src, dst)
    return 0


def cmd_port(client: Client, args: argparse.Namespace) -> int:
    ports = client.container_port(args.container)
    for private, bindings in sorted(ports.items()):
        if args.private and private not in (args.private, f"{args.private}/tcp"):
            continue
        for b in bindings or []:
            print(f"{private} -> {b.get('HostIp', '0.0.0.0')}:{b.get('HostPort', '')}")
    return 0
