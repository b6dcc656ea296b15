"""`cocon build`: build an image from a Containerfile (or Dockerfile) and a context directory."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from cocon.api.client import Client


def register(sub: Any) -> None:
    add_build_args(sub.add_parser("build", help="build an image from a Containerfile"))


def add_build_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("context", metavar="CONTEXT", help="the build context: a directory")
    p.add_argument("-t", "--tag", action="append", default=[], metavar="NAME[:TAG]",
                   help="name the image (repeatable)")  # fmt: skip
    p.add_argument("-f", "--file", metavar="FILE",
                   help="the Containerfile (default: CONTEXT/Containerfile, else Dockerfile)")  # fmt: skip
    p.add_argument("--build-arg", action="append", default=[], metavar="K=V",
                   help="set a build argument (K alone: its value in this shell)")  # fmt: skip
    p.add_argument("--target", metavar="STAGE", help="build up to this stage")
    p.add_argument("--no-cache", action="store_true", help="run every step again (the cache is refreshed)")
    p.add_argument("-q", "--quiet", action="store_true", help="print only the image ID")
    p.set_defaults(func=cmd_build)


def parse_build_args(items: list[str], environ: dict[str, str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not key:
            raise ValueError(f"invalid --build-arg {item!r}: use K=V")
        if eq:
            out[key] = value
        elif key in environ:
            out[key] = environ[key]
    return out


def cmd_build(client: Client, args: argparse.Namespace) -> int:
    import os

    from cocon.cli.output import error

    try:
        build_args = parse_build_args(args.build_arg, dict(os.environ))
    except ValueError as exc:
        error(str(exc))
        return 2

    def show(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    result = client.image_build(
        args.context,
        tags=args.tag,
        dockerfile=args.file,
        build_args=build_args,
        target=args.target,
        no_cache=args.no_cache,
        output=None if args.quiet else show,
    )
    if args.quiet:
        print(result["Id"])
    return 0
