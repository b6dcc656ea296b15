"""`cocon daemon`: run the node daemon in the foreground (cocon.api.daemon; docs/daemon.md)."""

from __future__ import annotations

import argparse
from typing import Any

from cocon.api.client import Client


def register(sub: Any) -> None:
    from cocon.api.daemon import add_arguments

    p = sub.add_parser(
        "daemon",
        help="serve the API on a Unix socket (and TCP with TLS client certificates or a token)",
        description="Serve cocon's Docker-compatible and native API in the foreground (for service "
        "managers; logs go to stderr). Stops cleanly on SIGTERM or SIGINT.",
    )
    add_arguments(p)
    p.set_defaults(func=cmd_daemon)


def cmd_daemon(client: Client, args: argparse.Namespace) -> int:
    from cocon.api.daemon import config_from_args, run

    return run(config_from_args(args))
