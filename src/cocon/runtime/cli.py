"""`cocon-runtime`: an OCI runtime with runc's command line, for podman, containerd, conmon or users.

Exit codes follow runc: 0 on success, 1 on any error (with a message on stderr, and in --log when
given), and for `run`/`exec` in the foreground the process's own exit status (128+N for signal N).
"""

from __future__ import annotations

import os
import sys

from cocon import __version__
from cocon import _fastjson as json
from cocon._typing import TYPE_CHECKING
from cocon.runtime.errors import RuntimeFailure

if TYPE_CHECKING:
    import argparse
    from typing import Any, NoReturn

SPEC_VERSION = "1.2.0"
DEFAULT_ROOT = "/run/cocon-runtime"


class _Log:
    """Where errors and debug lines go: stderr always, plus --log in text or json."""

    def __init__(self) -> None:
        self.path: str | None = None
        self.format = "text"
        self.debug = False

    def write(self, level: str, msg: str) -> None:
        if self.path is None:
            return
        from cocon.runtime.state import now_rfc3339

        if self.format == "json":
            line = json.dumps({"level": level, "msg": msg, "time": now_rfc3339()})
        else:
            line = f'time="{now_rfc3339()}" level={level} msg={json.dumps(msg)}'
        try:
            with open(self.path, "a") as f:
                f.write(line + "\n")
        except OSError:
            pass


LOG = _Log()


def fail(msg: str) -> NoReturn:
    LOG.write("error", msg)
    print(f"cocon-runtime: error: {msg}", file=sys.stderr)
    sys.exit(1)


# The commands podman and conmon call for every container, parsed without argparse (whose import and
# set-up cost more than the rest of `start`): value flags, boolean flags, positional arguments.
_CREATE_VALUES = {"-b": "bundle", "--bundle": "bundle", "--console-socket": "console_socket",
                  "--pid-file": "pid_file", "--preserve-fds": "preserve_fds"}  # fmt: skip
_CREATE_BOOLS = {"--no-pivot": "no_pivot", "--no-new-keyring": "no_new_keyring"}
_FAST_COMMANDS: dict[str, tuple[dict[str, str], dict[str, str], tuple[str, ...]]] = {
    "create": (_CREATE_VALUES, _CREATE_BOOLS, ("id",)),
    "run": (
        _CREATE_VALUES,
        {**_CREATE_BOOLS, "-d": "detach", "--detach": "detach", "--keep": "keep"},
        ("id",),
    ),
    "start": ({}, {}, ("id",)),
    "state": ({}, {}, ("id",)),
    "pause": ({}, {}, ("id",)),
    "resume": ({}, {}, ("id",)),
    "delete": ({}, {"-f": "force", "--force": "force"}, ("id",)),
    "kill": ({}, {"-a": "all", "--all": "all"}, ("id", "signal")),
}
_GLOBAL_VALUES = {"--root": "root", "--log": "log", "--log-format": "log_format", "--rootless": "rootless",
                  "--criu": "criu", "--await": "await_fifo"}  # fmt: skip
_GLOBAL_BOOLS = {"--debug": "debug", "--systemd-cgroup": "systemd_cgroup"}


class _Args:
    """fast_parse's result: the options as attributes, like argparse.Namespace (`types` is not imported
    for SimpleNamespace either)."""

    def __init__(self, values: dict[str, Any]) -> None:
        self.__dict__.update(values)


def fast_parse(argv: list[str]) -> Any | None:
    """Parse the hot commands' command lines; None means "let argparse do it" (help, errors, the rest)."""
    ns: dict[str, Any] = {
        "root": os.environ.get("COCON_RUNTIME_ROOT", DEFAULT_ROOT), "log": None, "log_format": "text",
        "debug": False, "systemd_cgroup": False, "rootless": "false", "criu": None, "bundle": ".",
        "console_socket": None, "pid_file": None, "preserve_fds": 0, "no_pivot": False,
        "no_new_keyring": False, "detach": False, "keep": False, "force": False, "all": False,
        "signal": "SIGTERM", "await_fifo": None,
    }  # fmt: skip
    values, bools = _GLOBAL_VALUES, _GLOBAL_BOOLS
    positionals: tuple[str, ...] = ()
    args = iter(argv)
    command = None
    found: list[str] = []
    for arg in args:
        name, eq, inline = arg.partition("=") if arg.startswith("--") else (arg, "", "")
        if name in values:
            ns[values[name]] = inline if eq else next(args, None)
            if ns[values[name]] is None:
                return None
        elif name in bools and not eq:
            ns[bools[name]] = True
        elif arg.startswith("-"):
            return None
        elif command is None:
            if arg not in _FAST_COMMANDS:
                return None
            command = arg
            values, bools, positionals = _FAST_COMMANDS[arg]
        else:
            found.append(arg)
    if command is None or not 1 <= len(found) <= len(positionals):
        return None
    ns.update(zip(positionals, found, strict=False), command=command)
    if ns["log_format"] not in ("text", "json") or not str(ns["preserve_fds"]).isdigit():
        return None
    ns["preserve_fds"] = int(ns["preserve_fds"])
    return _Args(ns)


def build_parser() -> argparse.ArgumentParser:
    import argparse

    p = argparse.ArgumentParser(
        prog="cocon-runtime",
        description="cocon's OCI runtime: runs containers from OCI bundles, with runc's command line.",
    )
    p.add_argument(
        "--root",
        default=os.environ.get("COCON_RUNTIME_ROOT", "/run/cocon-runtime"),
        help="directory holding container state (default: /run/cocon-runtime)",
    )
    p.add_argument("--log", help="also write errors to this file")
    p.add_argument("--log-format", choices=("text", "json"), default="text", help="format of --log")
    p.add_argument("--debug", action="store_true", help="log debug output")
    p.add_argument(
        "--systemd-cgroup",
        action="store_true",
        help="use systemd to manage cgroups (not supported yet: an error)",
    )
    p.add_argument("--rootless", default="false", help="accepted for runc compatibility; ignored")
    p.add_argument("--criu", help=argparse.SUPPRESS)
    p.add_argument(
        "--await",
        dest="await_fifo",
        metavar="FIFO",
        help="create only: load everything, then wait for the line 'go' on this FIFO before reading the "
        "bundle (a runtime started ahead of its container, as cocon's daemon does); any other line cancels",
    )
    p.add_argument(
        "-v",
        "--version",
        action="version",
        version=f"cocon-runtime version {__version__}\nspec: {SPEC_VERSION}",
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def container_id(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("id", metavar="CONTAINER_ID", help="the container's unique id")

    def create_flags(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("-b", "--bundle", default=".", help="path to the OCI bundle (default: .)")
        sp.add_argument("--console-socket", help="unix socket that receives the pty master of a terminal")
        sp.add_argument("--pid-file", help="write the container's pid to this file")
        sp.add_argument("--no-pivot", action="store_true", help="not supported: cocon always uses pivot_root")
        sp.add_argument("--no-new-keyring", action="store_true", help="keep the caller's session keyring")
        sp.add_argument("--preserve-fds", type=int, default=0, help="pass N extra fds (3..3+N-1)")
        container_id(sp)

    sp = sub.add_parser("create", help="create a container (its process waits for `start`)")
    create_flags(sp)
    sp = sub.add_parser("run", help="create and start a container; wait for it unless --detach")
    sp.add_argument("-d", "--detach", action="store_true", help="return once the container runs")
    sp.add_argument("--keep", action="store_true", help="do not delete the container after it exits")
    create_flags(sp)
    sp = sub.add_parser("start", help="run the user process of a created container")
    container_id(sp)
    sp = sub.add_parser("state", help="print the state of a container as JSON")
    container_id(sp)
    sp = sub.add_parser("kill", help="send a signal (default SIGTERM) to the container's init")
    sp.add_argument("-a", "--all", action="store_true", help="signal every process in the container")
    container_id(sp)
    sp.add_argument("signal", nargs="?", default="SIGTERM", help="name or number (default SIGTERM)")
    sp = sub.add_parser("delete", help="delete a container and everything it holds")
    sp.add_argument("-f", "--force", action="store_true", help="kill it first if it is still running")
    container_id(sp)
    sp = sub.add_parser("pause", help="freeze every process of a container")
    container_id(sp)
    sp = sub.add_parser("resume", help="thaw a paused container")
    container_id(sp)
    sp = sub.add_parser("ps", help="list the processes of a container")
    sp.add_argument("-f", "--format", choices=("table", "json"), default="table")
    container_id(sp)
    sp.add_argument("ps_args", nargs=argparse.REMAINDER, help="options for ps(1) (default -ef)")
    sp = sub.add_parser("list", help="list containers")
    sp.add_argument("-f", "--format", choices=("table", "json"), default="table")
    sp.add_argument("-q", "--quiet", action="store_true", help="print only ids")
    sp = sub.add_parser("exec", help="run a new process inside a running container")
    sp.add_argument("-p", "--process", help="path to a process.json (runtime-spec `process`)")
    sp.add_argument("-t", "--tty", action="store_true", help="allocate a pseudo-terminal")
    sp.add_argument("--cwd", help="working directory in the container")
    sp.add_argument("-e", "--env", action="append", default=[], help="KEY=VALUE to add (repeatable)")
    sp.add_argument("-u", "--user", help="UID[:GID] to run as")
    sp.add_argument("-g", "--additional-gids", action="append", type=int, default=[], help="extra group")
    sp.add_argument("-c", "--cap", action="append", default=[], help="add a capability (repeatable)")
    sp.add_argument("--no-new-privs", action="store_true", help="set no_new_privs")
    sp.add_argument("-d", "--detach", action="store_true", help="do not wait for the process")
    sp.add_argument("--pid-file", help="write the process's pid to this file")
    sp.add_argument("--console-socket", help="unix socket that receives the pty master")
    sp.add_argument("--preserve-fds", type=int, default=0, help="pass N extra fds (3..3+N-1)")
    sp.add_argument("--apparmor", help=argparse.SUPPRESS)
    sp.add_argument("--process-label", help=argparse.SUPPRESS)
    container_id(sp)
    sp.add_argument("args", nargs=argparse.REMAINDER, help="command and arguments (without --process)")
    sp = sub.add_parser("spec", help="write a starter config.json")
    sp.add_argument("-b", "--bundle", default=".", help="directory to write config.json into")
    sp.add_argument("--rootless", action="store_true", help="a config for an unprivileged user namespace")
    sub.add_parser("features", help="print what this runtime supports (runtime-spec features JSON)")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv in (["--version"], ["-v"]):  # asked for by podman and conmon before every container
        print(f"cocon-runtime version {__version__}\nspec: {SPEC_VERSION}")
        return 0
    args = fast_parse(argv) or build_parser().parse_args(argv)
    LOG.path, LOG.format, LOG.debug = args.log, args.log_format, args.debug
    if args.systemd_cgroup:
        fail(
            "--systemd-cgroup is not supported yet: use cgroupfs paths "
            "(e.g. podman --cgroup-manager=cgroupfs)"
        )
    try:
        return dispatch(args)
    except RuntimeFailure as exc:
        fail(str(exc))
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # an unexpected failure still gets one clear line, not a traceback
        if args.debug:
            raise
        from cocon.oci.errors import OCIError

        if isinstance(exc, OCIError):
            fail(str(exc))
        fail(f"{type(exc).__name__}: {exc}")


def print_json(doc: object) -> None:
    """Indented for a person at a terminal, one compact line for programs (podman reads `state`)."""
    if sys.stdout.isatty():
        import json as pretty

        print(pretty.dumps(doc, indent=2))
    else:
        print(json.dumps(doc))


def entry() -> NoReturn:
    """The console script: like main, but skips the interpreter's tear-down (a few ms per call)."""
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def dispatch(args: argparse.Namespace) -> int:
    if args.command not in ("create", "run", "exec"):
        return _dispatch(args)
    _check_preserved_fds(args.preserve_fds)
    # As early as possible, so that the grace period it waits for overlaps with the imports too
    # (and after the check: its file must not take the number of an fd to preserve).
    from cocon.runtime.cgroups import start_attach_warm_up

    if args.await_fifo is not None and args.command == "create":
        await_go(args.await_fifo, args.id)  # (after it, a warm-up has nothing left to do)
    warmed_up = start_attach_warm_up(early=True)
    try:
        return _dispatch(args)
    finally:
        warmed_up()  # when the command failed before using it


# what `create` loads, in its process and in the container's init (found with sys.modules)
_CREATE_MODULES = (
    "cocon.runtime.container", "cocon.runtime.spawn", "cocon.runtime.rootfs", "cocon.runtime.process",
    "cocon.runtime.capabilities", "cocon.runtime.cgroups", "cocon.runtime.hooks", "cocon.runtime.seccomp",
    "cocon.runtime.seccomp_bpf", "cocon.runtime.state", "cocon.runtime.cgroups.v1",
    "cocon.runtime.cgroups.v2", "cocon.runtime.cgroups.devices", "cocon.oci.runtime_spec", "pwd", "resource",
)  # fmt: skip


def await_go(fifo: str, container_id: str) -> None:
    """`--await`: import what create needs and join the container's cgroup2 directory ahead
    (cgroups.prejoin), then block until the daemon says `go` on `fifo` (the bundle is complete
    then). Interpreter start-up, imports and the cgroup move's grace period are thus paid before the
    container is asked for, not while its user waits."""
    import importlib

    from cocon.runtime.cgroups import prejoin

    for name in _CREATE_MODULES:
        importlib.import_module(name)
    try:
        import seccomp  # noqa: F401  # libseccomp's bindings, when a profile is not in the BPF cache
    except ImportError:
        pass
    undo = prejoin(container_id)
    error = "the container was not started: its pre-started runtime was cancelled"
    try:
        word = _read_start_signal(fifo)
    except OSError as exc:
        word = b""
        error = f"cannot read the start signal from {fifo}: {exc.strerror}"
    if word is None:
        word = b""
        error = "the container was not started: the daemon that started its runtime is gone"
    if word != b"go":
        if undo is not None:
            undo()
        raise RuntimeFailure(error)


def _read_start_signal(fifo: str) -> bytes | None:
    """The line the daemon writes to `fifo`; None when the FIFO or the daemon (`$COCON_RUN/cocon.pid`)
    went away without a word (a waiting runtime must not outlive it). Opened read-write: the FIFO
    always has a writer, so a read blocks until a line comes, and the wait can look around each second."""
    import select

    run = os.environ.get("COCON_RUN")
    pidfile = os.path.join(run, "cocon.pid") if run else None
    fd = os.open(fifo, os.O_RDWR | os.O_CLOEXEC)
    try:
        data = b""
        while b"\n" not in data:
            ready, _, _ = select.select([fd], [], [], 1.0)
            if ready:
                data += os.read(fd, 64)
            elif not os.path.exists(fifo) or (pidfile is not None and not _daemon_alive(pidfile)):
                return None
        return data.split(b"\n", 1)[0].strip()
    finally:
        os.close(fd)


def _daemon_alive(pidfile: str) -> bool:
    try:
        with open(pidfile) as f:
            pid = int(f.read().split()[0])
        os.kill(pid, 0)
    except (OSError, ValueError, IndexError):
        return False
    return True


def _dispatch(args: argparse.Namespace) -> int:
    from cocon.runtime.container import Runtime, parse_signal

    cmd = args.command
    if cmd == "spec":
        from cocon.runtime.defaults import write_spec

        write_spec(args.bundle, rootless=args.rootless)
        return 0
    if cmd == "features":
        from cocon.runtime.defaults import features

        print_json(features())
        return 0
    rt = Runtime(args.root)
    if cmd in ("create", "run"):
        if args.no_pivot:
            raise RuntimeFailure("--no-pivot is not supported: cocon-runtime always uses pivot_root")
        if args.preserve_fds < 0:
            raise RuntimeFailure("--preserve-fds must be >= 0")
        if cmd == "create":
            rt.create(
                args.id,
                args.bundle,
                pid_file=args.pid_file,
                console_socket=args.console_socket,
                preserve_fds=args.preserve_fds,
                new_keyring=not args.no_new_keyring,
            )
            return 0
        return rt.run(
            args.id,
            args.bundle,
            detach=args.detach,
            keep=args.keep,
            pid_file=args.pid_file,
            console_socket=args.console_socket,
            preserve_fds=args.preserve_fds,
            new_keyring=not args.no_new_keyring,
        )
    if cmd == "start":
        rt.start(args.id)
    elif cmd == "state":
        print_json(rt.state(args.id))
    elif cmd == "kill":
        rt.kill(args.id, parse_signal(args.signal), all_processes=args.all)
    elif cmd == "delete":
        rt.delete(args.id, force=args.force)
    elif cmd == "pause":
        rt.pause(args.id)
    elif cmd == "resume":
        rt.resume(args.id)
    elif cmd == "ps":
        return _ps(rt, args)
    elif cmd == "list":
        _list(rt, args)
    elif cmd == "exec":
        return _exec(rt, args)
    return 0


def _check_preserved_fds(count: int) -> None:
    """--preserve-fds N hands fds 3..3+N-1 to the container: each must be open, or the runtime's own
    files would take their numbers and leak into the container."""
    for fd in range(3, 3 + count):
        try:
            os.fstat(fd)
        except OSError:
            raise RuntimeFailure(
                f"--preserve-fds {count}: fd {fd} is not open; pass only fds you hold"
            ) from None


def _ps(rt: Any, args: argparse.Namespace) -> int:
    pids = rt.pids(args.id)
    if args.format == "json":
        print(json.dumps(pids))
        return 0
    import subprocess

    ps_args = [a for a in args.ps_args if a != "--"] or ["-ef"]
    out = subprocess.run(["ps", *ps_args], capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeFailure(f"ps {' '.join(ps_args)} failed: {out.stderr.strip()}")
    lines = out.stdout.splitlines()
    if not lines:
        return 0
    header, rows = lines[0], lines[1:]
    cols = header.split()
    if "PID" not in cols:
        raise RuntimeFailure("ps output has no PID column; pass options that print one")
    idx = cols.index("PID")
    wanted = set(pids)
    print(header)
    for row in rows:
        fields = row.split()
        if len(fields) > idx and fields[idx].isdigit() and int(fields[idx]) in wanted:
            print(row)
    return 0


def _list(rt: Any, args: argparse.Namespace) -> None:
    states = rt.list_states()
    if args.quiet:
        for s in states:
            print(s["id"])
    elif args.format == "json":
        print(json.dumps(states))
    else:
        rows = [("ID", "PID", "STATUS", "BUNDLE", "CREATED", "OWNER")]
        rows += [(s["id"], str(s["pid"]), s["status"], s["bundle"], s["created"], s["owner"]) for s in states]
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        for r in rows:
            print("   ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())


def _exec(rt: Any, args: argparse.Namespace) -> int:
    from cocon.oci.errors import ConfigError
    from cocon.oci.jsonobj import DecodeError, decode
    from cocon.oci.runtime_spec import Capabilities, Process, User, validate_process

    if args.process:
        try:
            with open(args.process, "rb") as f:
                proc = decode(f.read(), Process)
        except FileNotFoundError:
            raise RuntimeFailure(f"--process {args.process}: no such file") from None
        except DecodeError as exc:
            raise ConfigError(f"{args.process}: invalid process: {exc}") from None
        validate_process(proc, args.process)
    else:
        cmd = [a for a in args.args if a != "--"] if args.args[:1] == ["--"] else list(args.args)
        if not cmd:
            raise RuntimeFailure(
                "exec needs a command: cocon-runtime exec ID COMMAND [ARG...] (or --process)"
            )
        base = rt.load_spec(args.id).process or Process(args=["sh"], cwd="/")
        env = list(base.env or [])
        for e in args.env:
            if "=" not in e:
                raise RuntimeFailure(f"--env {e!r}: use KEY=VALUE")
            key = e.split("=", 1)[0] + "="
            env = [x for x in env if not x.startswith(key)] + [e]
        user = User(uid=base.user.uid, gid=base.user.gid, additional_gids=base.user.additional_gids)
        if args.user:
            uid, _, gid = args.user.partition(":")
            if not uid.isdigit() or (gid and not gid.isdigit()):
                raise RuntimeFailure(f"--user {args.user!r}: use numeric UID[:GID]")
            user = User(uid=int(uid), gid=int(gid) if gid else 0)
        if args.additional_gids:
            user.additional_gids = args.additional_gids
        caps = base.capabilities or Capabilities()
        if args.cap:
            caps = Capabilities(
                bounding=sorted({*(caps.bounding or []), *args.cap}),
                effective=sorted({*(caps.effective or []), *args.cap}),
                permitted=sorted({*(caps.permitted or []), *args.cap}),
                inheritable=caps.inheritable,
                ambient=caps.ambient,
            )
        proc = Process(
            args=cmd,
            env=env,
            cwd=args.cwd or base.cwd,
            terminal=args.tty,
            user=user,
            capabilities=caps,
            rlimits=base.rlimits,
            no_new_privileges=args.no_new_privs or base.no_new_privileges,
            oom_score_adj=base.oom_score_adj,
        )
    return int(
        rt.exec(
            args.id,
            proc,
            detach=args.detach,
            pid_file=args.pid_file,
            console_socket=args.console_socket,
            preserve_fds=args.preserve_fds,
        )
    )


if __name__ == "__main__":
    sys.exit(main())
