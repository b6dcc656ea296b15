"""Image commands: `cocon images`, `rmi`, `tag`, `save`, `load` and the `cocon image …` group
(ls, inspect, history, prune, import, bootstrap, rm, tag, save, load, build)."""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from cocon.api.client import APIError, Client
from cocon.cli import output

ARCHIVE_FORMATS = ("oci-archive", "oci-dir", "docker-archive")
# What the bootstrap stages mean (cocon.images.bootstrap.STAGES; the CLI does not import that layer)
BOOTSTRAP_STAGES = {
    "rootfs": "making the root filesystem",
    "index": "reading the package index",
    "download": "downloading packages",
    "extract": "extracting packages",
    "install": "installing packages",
    "configure": "configuring packages",
    "clean": "cleaning up",
    "layer": "writing the layer",
    "commit": "recording the image",
}


def _format_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--format", choices=("table", "json"), default="table",
                   help="table (default) or json (one JSON object per line)")  # fmt: skip


def register(sub: Any) -> None:
    p = sub.add_parser("images", help="list images")
    _images_args(p)
    p = sub.add_parser("rmi", help="remove images")
    _rmi_args(p)
    p = sub.add_parser("tag", help="give an image another name")
    _tag_args(p)
    p = sub.add_parser("save", help="write images to an archive (OCI or docker-archive)")
    _save_args(p)
    p = sub.add_parser("load", help="load images from an archive")
    _load_args(p)

    group = sub.add_parser("image", help="manage images (ls, inspect, history, prune, import, bootstrap, …)")
    isub = group.add_subparsers(dest="image_command", metavar="COMMAND", title="commands")
    isub.required = True
    _images_args(isub.add_parser("ls", aliases=["list"], help="list images"))
    p = isub.add_parser("inspect", help="show images' details as JSON")
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.add_argument("--format", choices=("json",), default="json", help="json (the default and only format)")
    p.set_defaults(func=cmd_inspect)
    p = isub.add_parser("history", help="show how an image was made, newest step first")
    p.add_argument("image", metavar="IMAGE")
    p.add_argument("--no-trunc", action="store_true", help="do not shorten the steps")
    p.add_argument("-q", "--quiet", action="store_true", help="print only image IDs")
    _format_arg(p)
    p.set_defaults(func=cmd_history)
    p = isub.add_parser("prune", help="remove dangling images (-a: every image no container uses)")
    p.add_argument("-a", "--all", action="store_true", help="remove every image no container uses")
    p.add_argument("-f", "--force", action="store_true", help="do not ask for confirmation")
    p.set_defaults(func=cmd_prune)
    p = isub.add_parser("import", help="make an image from a root filesystem tar (or directory)")
    p.add_argument("source", metavar="ROOTFS.tar", help="a tar (plain, gzip or zstd) or a directory")
    p.add_argument("name", metavar="NAME[:TAG]", nargs="?", help="name for the image (default: none)")
    p.add_argument("-c", "--change", action="append", default=[], metavar="INSTRUCTION",
                   help="apply a Dockerfile instruction to the config (CMD, ENV, WORKDIR, …)")  # fmt: skip
    p.add_argument("-m", "--message", help="commit message for the image's history")
    p.set_defaults(func=cmd_import)
    p = isub.add_parser(
        "bootstrap", help="make a base image here: busybox, debian[:SUITE] or debian-vm[:SUITE]"
    )
    p.add_argument(
        "what", metavar="busybox|debian[:SUITE]|debian-vm[:SUITE]",
        help="busybox (from busybox-static), debian:bookworm, or debian-vm:bookworm (Debian with a kernel, "
        "systemd, DHCP and a serial console: boots with cocon run --isolation vm, docs/vm.md)",
    )  # fmt: skip
    p.add_argument("--mirror", metavar="URL", help="Debian mirror (default: this machine's apt sources)")
    p.add_argument(
        "--tarball",
        metavar="FILE",
        help="take Debian's packages from a `debootstrap --make-tarball` file instead of a mirror (offline)",
    )
    p.set_defaults(func=cmd_bootstrap)
    _rmi_args(isub.add_parser("rm", aliases=["remove"], help="remove images"))
    _tag_args(isub.add_parser("tag", help="give an image another name"))
    _save_args(isub.add_parser("save", help="write images to an archive"))
    _load_args(isub.add_parser("load", help="load images from an archive"))
    from cocon.cli import build

    build.add_build_args(isub.add_parser("build", help="build an image from a Containerfile"))


def _images_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("repository", nargs="?", metavar="REPOSITORY[:TAG]", help="only images with this name")
    p.add_argument("-a", "--all", action="store_true", help="all images (cocon keeps no intermediate images)")
    p.add_argument("-q", "--quiet", action="store_true", help="print only image IDs")
    p.add_argument("--no-trunc", action="store_true", help="print full image IDs")
    p.add_argument("--digests", action="store_true", help="show manifest digests")
    p.add_argument("--filter", action="append", default=[], metavar="dangling=true|false",
                   help="filter: dangling=true (unnamed images) or dangling=false")  # fmt: skip
    _format_arg(p)
    p.set_defaults(func=cmd_images)


def _rmi_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.add_argument("-f", "--force", action="store_true",
                   help="remove an image with several names by ID, or a name of an image in use")  # fmt: skip
    p.add_argument("--no-prune", action="store_true", help="keep unused blobs and layers")
    p.set_defaults(func=cmd_rmi)


def _tag_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", metavar="SOURCE_IMAGE[:TAG]")
    p.add_argument("target", metavar="TARGET_IMAGE[:TAG]")
    p.set_defaults(func=cmd_tag)


def _save_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.add_argument(
        "-o",
        "--output",
        required=True,
        metavar="FILE",
        help="where to write (a file, or a directory for oci-dir)",
    )
    p.add_argument("--format", choices=ARCHIVE_FORMATS, default="oci-archive",
                   help="oci-archive (default: a tar of an OCI layout), oci-dir, docker-archive")  # fmt: skip
    p.set_defaults(func=cmd_save)


def _load_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "-i",
        "--input",
        required=True,
        metavar="FILE",
        help="an OCI layout (tar or directory) or a docker-archive",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="print nothing but errors")
    p.set_defaults(func=cmd_load)


# --- commands ----------------------------------------------------------------------------------------


def _split_tag(repo_tag: str) -> tuple[str, str]:
    repo, _, tag = repo_tag.rpartition(":")
    if "/" in tag or not repo:
        return repo_tag, "<none>"
    return repo, tag


def cmd_images(client: Client, args: argparse.Namespace) -> int:
    dangling: bool | None = None
    for f in args.filter:
        key, _, value = f.partition("=")
        if key != "dangling" or value not in ("true", "false"):
            output.error(f"unsupported filter {f!r}: use dangling=true or dangling=false")
            return 2
        dangling = value == "true"
    images = client.image_list(all=args.all, dangling=dangling)
    rows: list[dict[str, Any]] = []
    for img in images:
        tags = img["RepoTags"] or ["<none>:<none>"]
        for rt in tags:
            repo, tag = ("<none>", "<none>") if rt == "<none>:<none>" else _split_tag(rt)
            if args.repository and not _matches(args.repository, repo, tag):
                continue
            digest = next(
                (d.partition("@")[2] for d in img["RepoDigests"] if d.startswith(repo + "@")), "<none>"
            )
            rows.append({"img": img, "repo": repo, "tag": tag, "digest": digest})
    if args.quiet:
        seen: set[str] = set()
        for r in rows:
            i = r["img"]["Id"] if args.no_trunc else output.short_id(r["img"]["Id"])
            if i not in seen:
                seen.add(i)
                print(i)
        return 0
    if args.format == "json":
        output.json_lines(
            [
                {
                    "Containers": str(r["img"]["Containers"]),
                    "CreatedAt": time.strftime(
                        "%Y-%m-%d %H:%M:%S +0000 UTC", time.gmtime(r["img"]["Created"])
                    ),
                    "CreatedSince": output.time_ago(r["img"]["Created"]),
                    "Digest": r["digest"],
                    "ID": r["img"]["Id"] if args.no_trunc else output.short_id(r["img"]["Id"]),
                    "Repository": r["repo"],
                    "Size": output.human_size(r["img"]["Size"]),
                    "Tag": r["tag"],
                }
                for r in rows
            ]
        )
        return 0
    headers = ["REPOSITORY", "TAG", *(["DIGEST"] if args.digests else []), "IMAGE ID", "CREATED", "SIZE"]
    output.table(
        headers,
        [
            [
                r["repo"],
                r["tag"],
                *([r["digest"]] if args.digests else []),
                r["img"]["Id"] if args.no_trunc else output.short_id(r["img"]["Id"]),
                output.time_ago(r["img"]["Created"]),
                output.human_size(r["img"]["Size"]),
            ]
            for r in rows
        ],
    )
    return 0


def _matches(pattern: str, repo: str, tag: str) -> bool:
    want_repo, _, want_tag = (
        pattern.rpartition(":") if ":" in pattern.rsplit("/", 1)[-1] else (pattern, "", "")
    )
    short = repo.removeprefix("docker.io/library/").removeprefix("docker.io/")
    return want_repo in (repo, short) and (not want_tag or want_tag == tag)


def cmd_inspect(client: Client, args: argparse.Namespace) -> int:
    docs = []
    failed = False
    for ref in args.images:
        try:
            docs.append(client.image_inspect(ref))
        except APIError as exc:
            output.error(str(exc))
            failed = True
    output.json_doc(docs)
    return 1 if failed else 0


def cmd_history(client: Client, args: argparse.Namespace) -> int:
    entries = client.image_history(args.image)
    if args.quiet:
        for e in entries:
            print(e["Id"] if args.no_trunc or e["Id"] == "<missing>" else output.short_id(e["Id"]))
        return 0

    def by(e: dict[str, Any]) -> str:
        text = " ".join(str(e["CreatedBy"]).split())
        return text if args.no_trunc else output.truncate(text, 45)

    if args.format == "json":
        output.json_lines(
            [
                {
                    "Comment": e["Comment"],
                    "CreatedAt": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(e["Created"]))
                    if e["Created"]
                    else "",
                    "CreatedBy": by(e),
                    "CreatedSince": output.time_ago(e["Created"]),
                    "ID": e["Id"] if args.no_trunc or e["Id"] == "<missing>" else output.short_id(e["Id"]),
                    "Size": output.human_size(e["Size"]),
                }
                for e in entries
            ]
        )
        return 0
    output.table(
        ["IMAGE", "CREATED", "CREATED BY", "SIZE", "COMMENT"],
        [
            [
                e["Id"] if args.no_trunc or e["Id"] == "<missing>" else output.short_id(e["Id"]),
                output.time_ago(e["Created"]),
                by(e),
                output.human_size(e["Size"]),
                e["Comment"],
            ]
            for e in entries
        ],
    )
    return 0


def cmd_rmi(client: Client, args: argparse.Namespace) -> int:
    failed = False
    for ref in args.images:
        try:
            for item in client.image_remove(ref, force=args.force, noprune=args.no_prune):
                for kind, value in item.items():
                    print(f"{kind}: {value}")
        except APIError as exc:
            output.error(str(exc))
            failed = True
    return 1 if failed else 0


def cmd_tag(client: Client, args: argparse.Namespace) -> int:
    client.image_tag(args.source, args.target)
    return 0


def confirm(question: str) -> bool:
    sys.stdout.write(f"{question} [y/N] ")
    sys.stdout.flush()
    answer = sys.stdin.readline()
    return answer.strip().lower() in ("y", "yes")


def cmd_prune(client: Client, args: argparse.Namespace) -> int:
    what = (
        "all images without at least one container associated to them" if args.all else "all dangling images"
    )
    if not args.force and not confirm(
        f"WARNING! This will remove {what}.\nAre you sure you want to continue?"
    ):
        return 0
    result = client.image_prune(all=args.all)
    deleted = result.get("ImagesDeleted") or []
    if deleted:
        print("Deleted Images:")
        for item in deleted:
            for kind, value in item.items():
                print(f"{kind.lower()}: {value}")
        print()
    print(f"Total reclaimed space: {output.human_size(result.get('SpaceReclaimed', 0))}")
    return 0


class _ProgressBar:
    """A rich progress bar on stderr for (what, done, total) callbacks."""

    def __init__(self, descriptions: dict[str, str] | None = None, *, bytes_: bool = False) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            MofNCompleteColumn,
            Progress,
            SpinnerColumn,
            TextColumn,
            TimeElapsedColumn,
        )

        self.descriptions = descriptions or {}
        count = DownloadColumn() if bytes_ else MofNCompleteColumn()
        self.progress = Progress(
            SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), count, TimeElapsedColumn(),
            console=Console(stderr=True), transient=False, disable=not sys.stderr.isatty(),
        )  # fmt: skip
        self.tasks: dict[str, Any] = {}

    def __enter__(self) -> _ProgressBar:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def __call__(self, what: str, done: int, total: int) -> None:
        task = self.tasks.get(what)
        desc = self.descriptions.get(what, what)
        if task is None:
            for other in self.tasks.values():  # a new stage finishes the ones before it
                t = self.progress.tasks[other]
                if t.total is not None:
                    self.progress.update(other, completed=t.total)
                else:
                    self.progress.update(other, total=1, completed=1)
            task = self.progress.add_task(desc, total=total or None)
            self.tasks[what] = task
        self.progress.update(task, completed=done, total=total or None)


def cmd_import(client: Client, args: argparse.Namespace) -> int:
    with _ProgressBar(bytes_=True) as bar:
        result = client.image_import(
            args.source, args.name, changes=args.change, message=args.message, progress=bar
        )
    print(result["Id"])
    return 0


def cmd_bootstrap(client: Client, args: argparse.Namespace) -> int:
    with _ProgressBar(BOOTSTRAP_STAGES) as bar:
        result = client.image_bootstrap(args.what, mirror=args.mirror, tarball=args.tarball, progress=bar)
    names = ", ".join(result.get("RepoTags") or [])
    print(f"{result['Id']}" + (f"  {names}" if names else ""))
    return 0


def cmd_save(client: Client, args: argparse.Namespace) -> int:
    with _ProgressBar(bytes_=True) as bar:
        client.image_save(args.images, args.output, format=args.format, progress=bar)
    return 0


def cmd_load(client: Client, args: argparse.Namespace) -> int:
    if args.quiet:
        loaded = client.image_load(args.input)
    else:
        with _ProgressBar(bytes_=True) as bar:
            loaded = client.image_load(args.input, progress=bar)
    if not args.quiet:
        for img in loaded:
            if img["RepoTags"]:
                for t in img["RepoTags"]:
                    print(f"Loaded image: {t}")
            else:
                print(f"Loaded image ID: {img['Id']}")
    return 0
