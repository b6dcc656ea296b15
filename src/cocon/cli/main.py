"""The `cocon` command: parse, call the client interface, print.

`cocon run` goes straight to `cocon.cli.run` (its own lean flag parser); every other command is an
argparse subcommand defined by its group's module (containers, images, volumes, build).

The CLI only talks to `cocon.api.client.Client`: `HTTPClient`, requests to the node daemon on its
Unix socket (`$COCON_RUN/cocon.sock`, or `$COCON_HOST=unix://PATH`), which the first request starts
when no daemon answers there (cocon.api.http_client.default_client).

Exit codes: 0 success; 1 the operation failed (the error is printed as one line,
`cocon: error: …`); 2 bad usage; `cocon run` exits like `docker run` (the process's status,
125/126/127 for cocon's own failures); 130 interrupted.
"""

from __future__ import annotations

import os
import sys

from cocon._typing import TYPE_CHECKING

if TYPE_CHECKING:
    import argparse
    from collections.abc import Sequence
    from typing import NoReturn

    from cocon.api.client import Client

VERSION = "0.1.0"


def _parser_class() -> type[argparse.ArgumentParser]:
    import argparse

    class Parser(argparse.ArgumentParser):
        """argparse with cocon's one-line errors (exit 2)."""

        def error(self, message: str) -> NoReturn:
            sys.stderr.write(f"cocon: error: {message} (see '{self.prog} --help')\n")
            sys.exit(2)

    return Parser


def build_parser() -> argparse.ArgumentParser:
    from cocon.cli import build, containers, daemon, events, images, networks, run, system, vms, volumes

    parser = _parser_class()(
        prog="cocon",
        description="Run workloads from OCI images at the isolation level they need.",
        epilog="Run 'cocon COMMAND --help' for more about a command. State lives in $COCON_ROOT "
        "(default /var/lib/cocon) and $COCON_RUN (default /run/cocon).",
    )
    parser.add_argument("--version", action="version", version=f"cocon version {VERSION}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    sub.required = True
    run.register(sub)
    containers.register(sub)
    images.register(sub)
    build.register(sub)
    volumes.register(sub)
    networks.register(sub)
    vms.register(sub)
    vms.register_snapshots(sub)
    daemon.register(sub)
    events.register(sub)
    system.register(sub)
    system.register_info(sub)
    return parser


def main(argv: Sequence[str] | None = None, client: Client | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("run", "create"):
        from cocon.cli import run

        try:
            return run.main(argv[1:], client, command=argv[0])
        except KeyboardInterrupt:
            return 130
        except Exception as exc:  # an unexpected failure: one line, not a traceback
            if os.environ.get("COCON_DEBUG"):
                raise
            from cocon.cli.output import error

            error(f"{type(exc).__name__}: {exc}")
            return 125
    if argv == ["version"]:
        print(f"cocon version {VERSION}")
        return 0
    args = build_parser().parse_args(argv)
    from cocon.api.client import APIError
    from cocon.cli.output import error

    if client is None:
        from cocon.api.http_client import default_client

        client = default_client()
    try:
        code: int = args.func(client, args)
        return code
    except APIError as exc:
        error(str(exc))
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0
    except Exception as exc:
        if os.environ.get("COCON_DEBUG"):
            raise
        error(f"{type(exc).__name__}: {exc}")
        return 1
    finally:
        client.close()


def entry() -> NoReturn:
    """The console script: like main, but skips the interpreter's tear-down (milliseconds per call)."""
    code = main()
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        pass
    sys.stderr.flush()
    os._exit(code)
