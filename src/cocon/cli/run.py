"""`cocon run`: create a container from an image, start it attached to this terminal, wait, exit
with its status.

This is the hot path of the whole command line, so it is lean: the flags are parsed by hand from one
table (which also generates `cocon run --help` with argparse, only when asked), nothing imports
`rich`, `argparse`, `json` or `typing` at run time, and the client speaks HTTP to the node daemon
over its Unix socket with a few hundred lines of its own (cocon.api.http_client).

Exit status, as `docker run`: the process's own status; 128+N when it was killed by signal N; 125
when cocon itself fails (bad flags, no such image, …); 126 when the command cannot be executed;
127 when it is not found.

Signals this process gets (SIGINT, SIGTERM, SIGHUP, SIGQUIT, SIGUSR1, SIGUSR2) go to the container's
process (docker's --sig-proxy). With `-t`, this terminal is put in raw mode and relayed to the
container's pty, which follows the window's size (SIGWINCH); with `-i`, stdin stays open.
"""

from __future__ import annotations

import os

from cocon._typing import TYPE_CHECKING

if TYPE_CHECKING:
    from argparse import ArgumentParser
    from collections.abc import Mapping, Sequence
    from typing import Any

    from cocon.api.client import Client

USAGE = "cocon run [OPTIONS] IMAGE [COMMAND] [ARG...]"
# (flags, dest, kind, metavar, help); kind: "bool", "value" (last wins) or "list" (repeatable)
FLAGS: tuple[tuple[tuple[str, ...], str, str, str | None, str], ...] = (
    (
        ("--rm",),
        "rm",
        "bool",
        None,
        "remove the container (root filesystem, anonymous volumes) when it exits",
    ),
    (("-i", "--interactive"), "interactive", "bool", None, "keep stdin open: the process reads this input"),
    (
        ("-d", "--detach"),
        "detach",
        "bool",
        None,
        "run in the background under its own supervisor; print its ID",
    ),
    (("--restart",), "restart", "value", "POLICY", "no, on-failure[:N], always or unless-stopped"),
    (
        ("--stop-signal",),
        "stop_signal",
        "value",
        "SIGNAL",
        "signal `cocon stop` sends first (default SIGTERM)",
    ),
    (("--stop-timeout",), "stop_timeout", "value", "N", "seconds `cocon stop` waits before SIGKILL (10)"),
    (("--log-opt",), "log_opt", "list", "K=V", "log options: max-size=SIZE, max-file=N"),
    (("--health-cmd",), "health_cmd", "value", "CMD", "command that checks the container's health"),
    (("--health-interval",), "health_interval", "value", "DURATION", "time between checks (30s)"),
    (("--health-timeout",), "health_timeout", "value", "DURATION", "a check's time limit (30s)"),
    (("--health-retries",), "health_retries", "value", "N", "failures in a row that make it unhealthy (3)"),
    (("--health-start-period",), "health_start_period", "value", "DURATION", "failures then do not count"),
    (("--no-healthcheck",), "no_healthcheck", "bool", None, "disable the image's HEALTHCHECK"),
    (
        ("-t", "--tty"),
        "tty",
        "bool",
        None,
        "give the process a pseudo-terminal (raw mode, follows the window)",
    ),
    (("--name",), "name", "value", "NAME", "a unique name for the container (default: a random one)"),
    (("-e", "--env"), "env", "list", "K=V", "set an environment variable (K alone: its value here, if set)"),
    (
        ("--env-file",),
        "env_file",
        "list",
        "FILE",
        "read environment variables from FILE (K=V lines, # comments)",
    ),
    (("-w", "--workdir"), "workdir", "value", "DIR", "working directory in the container (made if missing)"),
    (
        ("-u", "--user"),
        "user",
        "value",
        "USER[:GROUP]",
        "user and group to run as: names (from the image) or ids",
    ),
    (
        ("--entrypoint",),
        "entrypoint",
        "value",
        "CMD",
        "replace the image's ENTRYPOINT ('' clears it and CMD)",
    ),
    (
        ("-v", "--volume"),
        "volume",
        "list",
        "SRC:DST[:ro]",
        "mount a named volume (made on first use, filled from the image) or an absolute host path; "
        "DST alone: an anonymous volume",
    ),
    (("--read-only",), "read_only", "bool", None, "mount the container's root filesystem read-only"),
    (
        ("--tmpfs",),
        "tmpfs",
        "list",
        "DST[:OPTS]",
        "mount a tmpfs at DST (OPTS: size=64m, mode=1777, ro, exec, …)",
    ),
    (("-m", "--memory"), "memory", "value", "SIZE", "memory limit, e.g. 512m or 1g (at least 6m)"),
    (("--memory-swap",), "memory_swap", "value", "SIZE", "memory plus swap limit (-1: unlimited swap)"),
    (("--cpus",), "cpus", "value", "N", "CPU limit, e.g. 0.5 or 2"),
    (("--pids-limit",), "pids_limit", "value", "N", "at most N processes (-1: no limit)"),
    (
        ("--cap-add",),
        "cap_add",
        "list",
        "CAP",
        "add a capability to Docker's default set (NET_ADMIN, ALL, …)",
    ),
    (("--cap-drop",), "cap_drop", "list", "CAP", "drop a capability (CHOWN, ALL, …)"),
    (
        ("--security-opt",),
        "security_opt",
        "list",
        "OPT",
        "seccomp=FILE (a Docker-format profile), seccomp=unconfined, no-new-privileges",
    ),
    (
        ("--storage-opt",),
        "storage_opt",
        "list",
        "K=V",
        "size=SIZE: the root disk's size of a VM (--isolation vm; default 8G, the guest grows its "
        "filesystem to it)",
    ),
    (("-h", "--hostname"), "hostname", "value", "NAME", "the container's hostname (default: its short id)"),
    (("-l", "--label"), "label", "list", "K=V", "set a label on the container"),
    (
        ("--isolation",),
        "isolation",
        "value",
        "LEVEL",
        "isolation level: container (alias process, the default), microvm (alias hyperv: the container "
        "in its own VM and kernel, docs/microvm.md) or vm (a full VM booted from the image with its own "
        "init and persistent disk, docs/vm.md)",
    ),
    (
        ("--network", "--net"),
        "network",
        "value",
        "NETWORK",
        "bridge (the default bridge network), a user network's name, none (only lo) or host",
    ),
    (("--network-alias",), "network_alias", "list", "NAME", "another name on the user network"),
    (("--ip",), "ip", "value", "ADDRESS", "the container's IPv4 address on its user network"),
    (("--ip6",), "ip6", "value", "ADDRESS", "the container's IPv6 address on its user network"),
    (
        ("-p", "--publish"),
        "publish",
        "list",
        "[IP:][HOST:]PORT[/PROTO]",
        "publish a container port on the host (no HOST port: a free one)",
    ),
    (("-P", "--publish-all"), "publish_all", "bool", None, "publish every EXPOSEd port on a free host port"),
    (("--expose",), "expose", "list", "PORT[/PROTO]", "expose a port (published with -P)"),
)

_BY_NAME = {name: (dest, kind) for names, dest, kind, _, _ in FLAGS for name in names}
_FORWARDED = ("SIGINT", "SIGTERM", "SIGHUP", "SIGQUIT", "SIGUSR1", "SIGUSR2")


class UsageError(Exception):
    """Bad flags: `cocon run` exits 125 with the message."""


class HelpRequested(Exception):
    pass


class RunOptions:
    """The parsed flags (attributes named after FLAGS' dests), the image and the command."""

    def __init__(self) -> None:
        for _names, dest, kind, _, _ in FLAGS:
            setattr(self, dest, False if kind == "bool" else [] if kind == "list" else None)
        self.image = ""
        self.command: list[str] = []

    def __getattr__(self, name: str) -> Any:  # for mypy: the attributes are set from FLAGS
        raise AttributeError(name)


def _set(opts: RunOptions, flag: str, value: str | None) -> None:
    dest, kind = _BY_NAME[flag]
    if kind == "bool":
        if value is None or value in ("true", "1"):
            setattr(opts, dest, True)
        elif value in ("false", "0"):
            setattr(opts, dest, False)
        else:
            raise UsageError(f"invalid value {value!r} for {flag}: use true or false")
    elif kind == "list":
        assert value is not None
        getattr(opts, dest).append(value)
    else:
        setattr(opts, dest, value)


def parse_args(argv: Sequence[str]) -> RunOptions:
    """Docker's flag syntax: `--flag value`, `--flag=value`, `-e K=V`, `-eK=V`, clusters like `-it`;
    flags end at the image (or `--`), everything after it is the command."""
    opts = RunOptions()
    i = 0
    n = len(argv)
    while i < n:
        arg = argv[i]
        if arg == "--":
            i += 1
            break
        if not arg.startswith("-") or arg == "-":
            break
        if arg == "--help":
            raise HelpRequested
        if arg.startswith("--"):
            flag, eq, value = arg.partition("=")
            if flag not in _BY_NAME:
                raise UsageError(f"unknown flag: {flag}")
            if _BY_NAME[flag][1] == "bool":
                _set(opts, flag, value if eq else None)
            else:
                if not eq:
                    i += 1
                    if i >= n:
                        raise UsageError(f"flag needs an argument: {flag}")
                    value = argv[i]
                _set(opts, flag, value)
        else:
            j = 1
            while j < len(arg):
                flag = "-" + arg[j]
                if flag not in _BY_NAME:
                    raise UsageError(f"unknown shorthand flag: {arg[j]!r} in {arg}")
                if _BY_NAME[flag][1] == "bool":
                    _set(opts, flag, None)
                    j += 1
                    continue
                rest = arg[j + 1 :].removeprefix("=")
                if not rest:
                    i += 1
                    if i >= n:
                        raise UsageError(f"flag needs an argument: {flag}")
                    rest = argv[i]
                _set(opts, flag, rest)
                break
        i += 1
    if i >= n:
        raise UsageError(f"requires at least 1 argument: {USAGE}")
    opts.image = argv[i]
    opts.command = list(argv[i + 1 :])
    return opts


def register(subparsers: Any) -> None:
    """`cocon run` in the top-level help (parsing is done by parse_args)."""
    subparsers.add_parser("run", help="run a command in a new container", add_help=False)
    subparsers.add_parser("create", help="create a new container (the flags of run)", add_help=False)


def help_parser() -> ArgumentParser:
    import argparse

    p = argparse.ArgumentParser(
        prog="cocon run",
        usage=USAGE,
        add_help=False,
        description="Run a command in a new container from IMAGE, attached to this terminal; exit with "
        "its status (125: cocon failed, 126: the command cannot be executed, 127: not found).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--help", action="help", help="show this help and exit")
    for names, dest, kind, metavar, text in FLAGS:
        if kind == "bool":
            p.add_argument(*names, dest=dest, action="store_true", help=text)
        else:
            p.add_argument(
                *names, dest=dest, metavar=metavar, action="append" if kind == "list" else "store", help=text
            )
    p.add_argument("image", metavar="IMAGE", help="image name or ID (see `cocon images`)")
    p.add_argument(
        "command", metavar="COMMAND", nargs="*", help="command and arguments (default: the image's)"
    )
    return p


# --- from flags to a create request ----------------------------------------------------------------


def parse_size(text: str, flag: str) -> int:
    """Docker's RAMInBytes: a number with an optional b, k, m, g, t or p (binary multiples)."""
    t = text.strip().lower()
    if t.endswith("b") and len(t) > 1 and not t[-2].isdigit():
        t = t[:-1]
    mult = 1
    units = {"b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "p": 1 << 50}
    if t and t[-1] in units:
        mult = units[t[-1]]
        t = t[:-1]
    try:
        value = float(t)
    except ValueError:
        raise UsageError(
            f"invalid size {text!r} for {flag}: use a number with an optional unit, e.g. 512m or 1g"
        ) from None
    if value < 0:
        raise UsageError(f"invalid size {text!r} for {flag}: it cannot be negative")
    return int(value * mult)


def read_env_file(path: str, environ: Mapping[str, str]) -> list[str]:
    """Docker's --env-file: K=V lines, `K` alone takes this shell's value (skipped if unset), blank
    lines and `#` comments are ignored."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except OSError as exc:
        raise UsageError(f"--env-file {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise UsageError(f"--env-file {path}: not UTF-8 text") from None
    out = []
    for n, raw in enumerate(lines, 1):
        line = raw.lstrip()
        if not line or line.startswith("#"):
            continue
        key, eq, value = line.partition("=")
        if not key or any(c.isspace() for c in key):
            raise UsageError(f"--env-file {path}, line {n}: variable {key!r} has whitespace or is empty")
        if eq:
            out.append(f"{key}={value}")
        elif key in environ:
            out.append(f"{key}={environ[key]}")
    return out


def parse_publish(text: str) -> tuple[str, str, str]:
    """`-p [IP:][HOST_PORT:]PORT[/PROTO]` (IPv6 IP in brackets) → ("PORT/PROTO", host ip, host port)."""
    spec, _, proto = text.partition("/")
    proto = proto or "tcp"
    host_ip = ""
    if spec.startswith("["):
        end = spec.find("]:")
        if end < 0:
            raise UsageError(f"invalid -p {text!r}: write an IPv6 address as [ADDR]:HOST_PORT:PORT")
        host_ip, spec = spec[1:end], spec[end + 2 :]
        parts = spec.split(":")
        if len(parts) == 1:
            parts = ["", *parts]
    else:
        parts = spec.split(":")
        if len(parts) == 3:
            host_ip, parts = parts[0], parts[1:]
    if len(parts) == 1:
        parts = ["", *parts]
    host_port, port = parts if len(parts) == 2 else ("", "")
    ok = proto in ("tcp", "udp") and port.isdigit() and 0 < int(port) < 65536
    if not ok or (host_port and not (host_port.isdigit() and 0 < int(host_port) < 65536)):
        raise UsageError(f"invalid -p {text!r}: use [HOST_IP:][HOST_PORT:]PORT[/tcp|udp], e.g. 8080:80")
    return f"{int(port)}/{proto}", host_ip, host_port


def parse_publish_ranges(text: str) -> list[tuple[str, str, str]]:
    """`-p` with port ranges, as Docker: `8000-8002:80-82` → 80→8000, 81→8001, 82→8002; `80-82` →
    each on a free host port; `8000-8010:80` → the first free host port of the range (HostPort
    "8000-8010", picked at start). Single ports are `parse_publish`'s."""
    if "-" not in text.rpartition("]")[2]:
        return [parse_publish(text)]
    spec, _, proto = text.rpartition("]")[2].partition("/")
    head = text[: len(text) - len(text.rpartition("]")[2])]
    usage = f"invalid -p {text!r}: use [HOST_IP:][HOST_PORT[-END]:]PORT[-END][/tcp|udp], e.g. 8000-8002:80-82"
    parts = spec.split(":")
    port_text = parts[-1]
    host_text = parts[-2] if len(parts) >= 2 else ""
    prefix = head + ":".join(parts[:-2]) + (":" if len(parts) > 2 or head else "")
    if head and len(parts) == 2 and parts[0] == "":
        prefix = head + ":"

    def span(value: str) -> tuple[int, int]:
        first, dash, last = value.partition("-")
        if not first.isdigit() or (dash and not last.isdigit()):
            raise UsageError(usage)
        lo, hi = int(first), int(last if dash else first)
        if not 0 < lo <= hi < 65536:
            raise UsageError(
                f"invalid -p {text!r}: a port range goes from a lower to a higher port (1-65535)"
            )
        return lo, hi

    lo, hi = span(port_text)
    suffix = f"/{proto}" if proto else ""
    if not host_text:
        return [
            parse_publish(f"{prefix}:{p}{suffix}" if prefix else f"{p}{suffix}") for p in range(lo, hi + 1)
        ]
    hlo, hhi = span(host_text)
    if lo == hi and hhi > hlo:  # one container port, any free host port of the range
        key, host_ip, _ = parse_publish(f"{prefix}{hlo}:{lo}{suffix}")
        return [(key, host_ip, f"{hlo}-{hhi}")]
    if hhi - hlo != hi - lo:
        raise UsageError(
            f"invalid -p {text!r}: the host range {host_text} has {hhi - hlo + 1} ports and the container "
            f"range {port_text} {hi - lo + 1}: give ranges of the same length"
        )
    return [parse_publish(f"{prefix}{hlo + n}:{lo + n}{suffix}") for n in range(hi - lo + 1)]


def _network_request(opts: RunOptions, body: dict[str, Any], host: dict[str, Any]) -> None:
    """-p, -P, --expose, --ip, --ip6, --network-alias as Docker's create body has them."""
    bindings: dict[str, list[dict[str, str]]] = {}
    exposed: dict[str, Any] = {}
    for text in opts.publish:
        for key, host_ip, host_port in parse_publish_ranges(text):
            bindings.setdefault(key, []).append({"HostIp": host_ip, "HostPort": host_port})
            exposed[key] = {}
    for text in opts.expose:
        port, _, proto = text.partition("/")
        if not port.isdigit() or (proto or "tcp") not in ("tcp", "udp"):
            raise UsageError(f"invalid --expose {text!r}: use PORT[/tcp|udp]")
        exposed[f"{int(port)}/{proto or 'tcp'}"] = {}
    if bindings:
        host["PortBindings"] = bindings
    if exposed:
        body["ExposedPorts"] = exposed
    if opts.publish_all:
        host["PublishAllPorts"] = True
    if opts.ip or opts.ip6 or opts.network_alias:
        network = opts.network or "bridge"
        endpoint: dict[str, Any] = {}
        if opts.network_alias:
            endpoint["Aliases"] = list(opts.network_alias)
        if opts.ip or opts.ip6:
            endpoint["IPAMConfig"] = {
                k: v for k, v in (("IPv4Address", opts.ip), ("IPv6Address", opts.ip6)) if v
            }
        body["NetworkingConfig"] = {"EndpointsConfig": {network: endpoint}}


def build_request(opts: RunOptions, environ: Mapping[str, str]) -> tuple[dict[str, Any], str | None]:
    """The Docker create body for `opts`, and the container name."""
    env: list[str] = []
    for path in opts.env_file:
        env += read_env_file(path, environ)
    for item in opts.env:
        if "=" in item:
            if item.startswith("="):
                raise UsageError(f"invalid environment variable {item!r}: use K=V")
            env.append(item)
        elif item in environ:
            env.append(f"{item}={environ[item]}")
    body: dict[str, Any] = {
        "Image": opts.image,
        "Tty": opts.tty,
        "OpenStdin": opts.interactive,
        "StdinOnce": opts.interactive,
        "AttachStdin": opts.interactive,
        "AttachStdout": True,
        "AttachStderr": True,
    }
    if opts.command:
        body["Cmd"] = opts.command
    if env:
        body["Env"] = env
    if opts.workdir is not None:
        body["WorkingDir"] = opts.workdir
    if opts.user is not None:
        body["User"] = opts.user
    if opts.entrypoint is not None:
        body["Entrypoint"] = [opts.entrypoint] if opts.entrypoint else []
    if opts.hostname is not None:
        body["Hostname"] = opts.hostname
    if opts.label:
        labels = {}
        for item in opts.label:
            k, _, v = item.partition("=")
            if not k:
                raise UsageError(f"invalid label {item!r}: use K=V")
            labels[k] = v
        body["Labels"] = labels
    host: dict[str, Any] = {"AutoRemove": opts.rm}
    if opts.volume:
        host["Binds"] = list(opts.volume)
    if opts.tmpfs:
        tmpfs = {}
        for item in opts.tmpfs:
            dest, _, options = item.partition(":")
            tmpfs[dest] = options
        host["Tmpfs"] = tmpfs
    if opts.read_only:
        host["ReadonlyRootfs"] = True
    if opts.memory is not None:
        host["Memory"] = parse_size(opts.memory, "--memory")
    if opts.memory_swap is not None:
        host["MemorySwap"] = (
            -1 if opts.memory_swap.strip() == "-1" else parse_size(opts.memory_swap, "--memory-swap")
        )
    if opts.cpus is not None:
        try:
            cpus = float(opts.cpus)
        except ValueError:
            raise UsageError(f"invalid --cpus {opts.cpus!r}: give a number, e.g. 0.5 or 2") from None
        if not cpus > 0:
            raise UsageError(f"invalid --cpus {opts.cpus!r}: it must be more than 0")
        host["NanoCpus"] = round(cpus * 1e9)
    if opts.pids_limit is not None:
        try:
            host["PidsLimit"] = int(opts.pids_limit)
        except ValueError:
            raise UsageError(
                f"invalid --pids-limit {opts.pids_limit!r}: give a whole number (-1: no limit)"
            ) from None
    if opts.cap_add:
        host["CapAdd"] = list(opts.cap_add)
    if opts.cap_drop:
        host["CapDrop"] = list(opts.cap_drop)
    if opts.security_opt:
        host["SecurityOpt"] = [_security_opt(o) for o in opts.security_opt]
    if opts.isolation is not None:
        host["Isolation"] = opts.isolation
    if opts.storage_opt:
        storage: dict[str, str] = {}
        for item in opts.storage_opt:
            key, sep, value = item.partition("=")
            if not sep or not key:
                raise UsageError(f"invalid --storage-opt {item!r}: give KEY=VALUE, e.g. size=20G")
            storage[key] = value
        host["StorageOpt"] = storage
    if opts.network:  # none given: Docker's default, the default bridge network
        host["NetworkMode"] = opts.network
    if opts.publish or opts.publish_all or opts.expose or opts.ip or opts.ip6 or opts.network_alias:
        _network_request(opts, body, host)
    if opts.tty:
        for fd in (0, 1):  # the terminal's size from the first instant (docker's ConsoleSize)
            try:
                cols, rows = os.get_terminal_size(fd)
            except OSError:
                continue
            host["ConsoleSize"] = [rows, cols]
            break
    if opts.detach or opts.restart or opts.stop_signal or opts.stop_timeout or opts.log_opt:
        _lifecycle_request(opts, body, host)
    health = (opts.health_cmd, opts.no_healthcheck, opts.health_interval, opts.health_retries,
              opts.health_timeout, opts.health_start_period)  # fmt: skip
    if any(health):
        _health_request(opts, body)
    body["HostConfig"] = host
    return body, opts.name


def _lifecycle_request(opts: RunOptions, body: dict[str, Any], host: dict[str, Any]) -> None:
    """The flags of detached containers (`-d`, `--restart`, `--stop-*`, `--log-opt`)."""
    if opts.restart:
        name, _, count = opts.restart.partition(":")
        if name not in ("no", "on-failure", "always", "unless-stopped") or (
            count and (name != "on-failure" or not count.isdigit())
        ):
            raise UsageError(
                f"invalid --restart {opts.restart!r}: use no, on-failure[:N], always or unless-stopped"
            )
        if opts.rm and name != "no":
            raise UsageError("conflicting options: --restart and --rm")
        host["RestartPolicy"] = {"Name": name, "MaximumRetryCount": int(count) if count else 0}
    if opts.stop_signal:
        body["StopSignal"] = opts.stop_signal
    if opts.stop_timeout:
        try:
            body["StopTimeout"] = int(opts.stop_timeout)
        except ValueError:
            raise UsageError(f"invalid --stop-timeout {opts.stop_timeout!r}: give whole seconds") from None
    if opts.log_opt:
        cfg = {}
        for item in opts.log_opt:
            k, eq, v = item.partition("=")
            if not eq or k not in ("max-size", "max-file"):
                raise UsageError(f"invalid --log-opt {item!r}: use max-size=SIZE or max-file=N")
            cfg[k] = v
        host["LogConfig"] = {"Type": "k8s-file", "Config": cfg}


def parse_duration(text: str, flag: str) -> int:
    """Go durations (`30s`, `1m30s`, `500ms`) as nanoseconds."""
    units = {"ns": 1, "us": 1_000, "ms": 1_000_000, "s": 1_000_000_000, "m": 60_000_000_000,
             "h": 3_600_000_000_000}  # fmt: skip
    total = 0.0
    i = 0
    num = ""
    try:
        while i < len(text):
            c = text[i]
            if c.isdigit() or c == ".":
                num += c
                i += 1
                continue
            unit = text[i : i + 2] if text[i : i + 2] in units else c
            total += float(num) * units[unit]
            num = ""
            i += len(unit)
        if num or not text:
            raise KeyError(num)
    except (KeyError, ValueError):
        raise UsageError(f"invalid {flag} {text!r}: give a duration like 30s, 1m30s or 500ms") from None
    return int(total)


def _health_request(opts: RunOptions, body: dict[str, Any]) -> None:
    if opts.no_healthcheck:
        if opts.health_cmd:
            raise UsageError("--no-healthcheck conflicts with --health-* options")
        body["Healthcheck"] = {"Test": ["NONE"]}
        return
    hc: dict[str, Any] = {}
    if opts.health_cmd:
        hc["Test"] = ["CMD-SHELL", opts.health_cmd]
    for flag, key, value in (
        ("--health-interval", "Interval", opts.health_interval),
        ("--health-timeout", "Timeout", opts.health_timeout),
        ("--health-start-period", "StartPeriod", opts.health_start_period),
    ):
        if value:
            hc[key] = parse_duration(value, flag)
    if opts.health_retries:
        try:
            hc["Retries"] = int(opts.health_retries)
        except ValueError:
            raise UsageError(f"invalid --health-retries {opts.health_retries!r}: give a number") from None
    body["Healthcheck"] = hc


def _security_opt(opt: str) -> str:
    """As the docker CLI does: seccomp=FILE is sent as the file's content."""
    key, sep, value = opt.partition("=")
    if key == "seccomp" and sep and value != "unconfined":
        try:
            with open(value, encoding="utf-8") as f:
                return f"seccomp={f.read()}"
        except OSError as exc:
            raise UsageError(
                f"--security-opt seccomp={value}: cannot read the profile: {exc.strerror}"
            ) from None
        except UnicodeDecodeError:
            raise UsageError(f"--security-opt seccomp={value}: the profile is not UTF-8 JSON") from None
    return opt


# --- running ---------------------------------------------------------------------------------------


class SignalProxy:
    """Signals to this process go to the container once it runs (queued until then)."""

    def __init__(self, client: Client, container: str) -> None:
        import _signal

        self.client = client
        self.container = container
        self.pending: list[int] = []
        self.armed = False
        self.saved: dict[int, Any] = {}
        for name in _FORWARDED:
            sig = getattr(_signal, name)
            self.saved[sig] = _signal.signal(sig, self._handle)

    def _handle(self, sig: int, _frame: object) -> None:
        if self.armed:
            self._send(sig)
        else:
            self.pending.append(sig)

    def _send(self, sig: int) -> None:
        from cocon.api.client import APIError

        try:
            self.client.container_kill(self.container, sig)
        except APIError:
            pass  # not running (any more)

    def arm(self) -> None:
        self.armed = True
        while self.pending:
            self._send(self.pending.pop(0))

    def restore(self) -> None:
        import _signal

        self.armed = False
        for sig, handler in self.saved.items():
            _signal.signal(sig, handler)


def _error(message: str) -> None:
    os.write(2, f"cocon: error: {' '.join(str(message).splitlines())}\n".encode())


def run(client: Client, opts: RunOptions, environ: Mapping[str, str] | None = None) -> int:
    """Create, start, attach, wait; the exit status (see the module docstring)."""
    from cocon.api.client import APIError

    try:
        body, name = build_request(opts, os.environ if environ is None else environ)
    except UsageError as exc:
        _error(str(exc))
        return 125
    try:
        created = client.container_create(body, name)
    except APIError as exc:
        _error(str(exc))
        return 125
    for w in created.get("Warnings") or ():
        os.write(2, f"WARNING: {w}\n".encode())
    cid = created["Id"]
    if opts.detach:
        return _start_detached(client, cid)
    proxy = SignalProxy(client, cid)
    try:
        try:
            attachment = client.container_start(cid, stdin=opts.interactive)
        except APIError as exc:
            _error(str(exc))
            return exc.exit_code or 125
        proxy.arm()
        if not attachment.direct:
            from cocon.api.stream_relay import relay

            relay(
                attachment.fd,
                stdin=opts.interactive,
                resize=lambda rows, cols: client.container_resize(cid, rows, cols),
                multiplexed=attachment.multiplexed,
                is_socket=attachment.is_socket,
                initial=attachment.initial,
            )
        try:
            status: int = client.container_wait(cid)["StatusCode"]
        except APIError as exc:
            _error(str(exc))
            return 125
        return status
    finally:
        proxy.restore()


def _start_detached(client: Client, cid: str) -> int:
    """`-d`: start under the container's own supervisor and print its ID (docker run -d)."""
    from cocon.api.client import APIError

    try:
        client.container_start_detached(cid)
    except APIError as exc:
        _error(str(exc))
        return exc.exit_code or 125
    os.write(1, f"{cid}\n".encode())
    return 0


def create(client: Client, opts: RunOptions, environ: Mapping[str, str] | None = None) -> int:
    """`cocon create`: the container, not started; prints its ID."""
    from cocon.api.client import APIError

    try:
        body, name = build_request(opts, os.environ if environ is None else environ)
        created = client.container_create(body, name)
    except UsageError as exc:
        _error(str(exc))
        return 125
    except APIError as exc:
        _error(str(exc))
        return 125
    for w in created.get("Warnings") or ():
        os.write(2, f"WARNING: {w}\n".encode())
    os.write(1, f"{created['Id']}\n".encode())
    return 0


def main(argv: Sequence[str], client: Client | None = None, *, command: str = "run") -> int:
    """`cocon run ARGV…` with the default client (the engine in this process)."""
    try:
        opts = parse_args(argv)
    except HelpRequested:
        help_parser().print_help()
        return 0
    except UsageError as exc:
        _error(f"{exc} (see 'cocon run --help')")
        return 125
    if client is None:
        from cocon.api.http_client import default_client

        client = default_client()
    if command == "create":
        return create(client, opts)
    return run(client, opts)
