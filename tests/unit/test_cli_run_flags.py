"""`cocon run`'s flag parsing and request building, and its run loop against a fake client."""

from __future__ import annotations

import json
import os
import signal
from typing import Any

import pytest

from cocon.api.client import APIError, Attachment, Client
from cocon.cli import run as runcli
from cocon.cli.run import (
    FLAGS,
    HelpRequested,
    UsageError,
    build_request,
    parse_args,
    parse_size,
    read_env_file,
)


def test_flag_forms() -> None:
    o = parse_args(["--rm", "-it", "--name=web", "-e", "A=1", "-eB=2", "--env", "C", "-v", "/h:/c:ro",
                    "--volume=data:/d", "-w", "/w", "--user", "1:2", "busybox", "ls", "-la", "--rm"])  # fmt: skip
    assert o.rm and o.interactive and o.tty
    assert o.name == "web" and o.env == ["A=1", "B=2", "C"] and o.volume == ["/h:/c:ro", "data:/d"]
    assert o.workdir == "/w" and o.user == "1:2"
    assert o.image == "busybox" and o.command == [
        "ls",
        "-la",
        "--rm",
    ]  # flags after the image are the command's


def test_double_dash_ends_flags_and_bool_values() -> None:
    o = parse_args(["--rm=false", "--read-only=true", "--", "-weird-image-name"])
    assert not o.rm and o.read_only and o.image == "-weird-image-name"
    o = parse_args(["-tiw/x", "img"])  # a value glued to the last flag of a cluster
    assert o.tty and o.interactive and o.workdir == "/x"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--bogus", "img"], "unknown flag: --bogus"),
        (["-Z", "img"], "unknown shorthand flag"),
        (["--name"], "flag needs an argument: --name"),
        (["-e"], "flag needs an argument: -e"),
        (["--rm"], "requires at least 1 argument"),
        ([], "requires at least 1 argument"),
        (["--rm=maybe", "img"], "invalid value 'maybe' for --rm"),
    ],
)
def test_usage_errors(argv: list[str], message: str) -> None:
    with pytest.raises(UsageError, match=message):
        parse_args(argv)


def test_help() -> None:
    with pytest.raises(HelpRequested):
        parse_args(["--rm", "--help", "img"])
    text = runcli.help_parser().format_help()
    for names, _dest, _kind, _metavar, _help in FLAGS:
        for n in names:
            assert n in text, n


def test_every_flag_parses_and_shows_in_the_request(tmp_path: Any) -> None:
    profile = os.path.join(str(tmp_path), "p.json")
    with open(profile, "w") as f:
        f.write('{"defaultAction": "SCMP_ACT_ALLOW"}')
    o = parse_args([
        "--rm", "-i", "-t", "--name", "n1", "-e", "A=1", "-w", "/w", "-u", "u", "--entrypoint", "",
        "-v", "v:/v", "--read-only", "--tmpfs", "/t:size=1m", "--tmpfs", "/u", "-m", "64m", "--memory-swap", "-1",
        "--cpus", "1.5", "--pids-limit", "10", "--cap-add", "NET_ADMIN", "--cap-drop", "ALL",
        "--security-opt", f"seccomp={profile}", "--security-opt", "no-new-privileges", "-h", "box",
        "-l", "k=v", "--isolation", "process", "--network", "none", "img", "cmd",
    ])  # fmt: skip
    body, name = build_request(o, {})
    host = body.pop("HostConfig")
    assert name == "n1"
    assert body == {
        "Image": "img", "Tty": True, "OpenStdin": True, "StdinOnce": True, "AttachStdin": True,
        "AttachStdout": True, "AttachStderr": True, "Cmd": ["cmd"], "Env": ["A=1"], "WorkingDir": "/w",
        "User": "u", "Entrypoint": [], "Hostname": "box", "Labels": {"k": "v"},
    }  # fmt: skip
    assert host == {
        "AutoRemove": True, "Binds": ["v:/v"], "Tmpfs": {"/t": "size=1m", "/u": ""}, "ReadonlyRootfs": True,
        "Memory": 64 << 20, "MemorySwap": -1, "NanoCpus": 1_500_000_000, "PidsLimit": 10,
        "CapAdd": ["NET_ADMIN"], "CapDrop": ["ALL"],
        "SecurityOpt": ['seccomp={"defaultAction": "SCMP_ACT_ALLOW"}', "no-new-privileges"],
        "Isolation": "process", "NetworkMode": "none",
    }  # fmt: skip


def test_environment(tmp_path: Any) -> None:
    path = os.path.join(str(tmp_path), "env")
    with open(path, "w") as f:
        f.write("# a comment\n\n  SPACED=x y \nFROM_HOST\nUNSET_HERE\nEMPTY=\n")
    o = parse_args(["--env-file", path, "-e", "LATER=1", "-e", "HOSTVAR", "-e", "NOTSET", "img"])
    body, _ = build_request(o, {"FROM_HOST": "h", "HOSTVAR": "v"})
    assert body["Env"] == ["SPACED=x y ", "FROM_HOST=h", "EMPTY=", "LATER=1", "HOSTVAR=v"]
    with pytest.raises(UsageError, match="no/such"):
        read_env_file("/no/such/file", {})
    with open(path, "w") as f:
        f.write("BAD KEY=1\n")
    with pytest.raises(UsageError, match="line 1"):
        read_env_file(path, {})
    with pytest.raises(UsageError, match="K=V"):
        build_request(parse_args(["-e", "=x", "img"]), {})


@pytest.mark.parametrize(
    ("text", "value"),
    [("1024", 1024), ("1k", 1024), ("64m", 64 << 20), ("64M", 64 << 20), ("1g", 1 << 30), ("1gb", 1 << 30),
     ("1.5g", 3 << 29), ("100b", 100), ("0", 0)],
)  # fmt: skip
def test_sizes(text: str, value: int) -> None:
    assert parse_size(text, "--memory") == value


@pytest.mark.parametrize("text", ["", "lots", "-1m", "1x", "m"])
def test_bad_sizes(text: str) -> None:
    with pytest.raises(UsageError, match="--memory"):
        parse_size(text, "--memory")


@pytest.mark.parametrize(
    ("argv", "message"),
    [(["--cpus", "abc", "i"], "--cpus"), (["--cpus", "0", "i"], "more than 0"), (["--pids-limit", "x", "i"], "--pids-limit"),
     (["-l", "=v", "i"], "label"), (["--security-opt", "seccomp=/no/file", "i"], "cannot read the profile")],
)  # fmt: skip
def test_bad_values(argv: list[str], message: str) -> None:
    with pytest.raises(UsageError, match=message):
        build_request(parse_args(argv), {})


class FakeClient(Client):
    def __init__(self, *, create_error: APIError | None = None, start_error: APIError | None = None,
                 status: int = 0, on_wait: Any = None) -> None:  # fmt: skip
        self.calls: list[tuple[str, Any]] = []
        self.create_error, self.start_error, self.status, self.on_wait = (
            create_error,
            start_error,
            status,
            on_wait,
        )

    def container_create(self, config: dict[str, Any], name: str | None = None) -> dict[str, Any]:
        self.calls.append(("create", (config, name)))
        if self.create_error:
            raise self.create_error
        return {"Id": "c" * 64, "Warnings": ["careful"]}

    def container_start(self, container: str, *, stdin: bool = False) -> Attachment:
        self.calls.append(("start", (container, stdin)))
        if self.start_error:
            raise self.start_error
        return Attachment(direct=True, fd=-1)

    def container_wait(self, container: str) -> dict[str, Any]:
        if self.on_wait:
            self.on_wait()
        self.calls.append(("wait", container))
        return {"StatusCode": self.status, "Error": None}

    def container_kill(self, container: str, signal: int) -> None:
        self.calls.append(("kill", signal))


def test_run_exit_statuses(capfd: pytest.CaptureFixture[str]) -> None:
    client = FakeClient(status=42)
    assert runcli.main(["--rm", "img", "x"], client) == 42
    assert [c[0] for c in client.calls] == ["create", "start", "wait"]
    assert client.calls[0][1][0]["HostConfig"]["AutoRemove"] is True
    assert "WARNING: careful" in capfd.readouterr().err
    client = FakeClient(create_error=APIError("no image 'img' here", 404))
    assert runcli.main(["img"], client) == 125
    assert capfd.readouterr().err == "cocon: error: no image 'img' here\n"
    client = FakeClient(start_error=APIError("'x': executable file not found in $PATH", 500, exit_code=127))
    assert runcli.main(["img", "x"], client) == 127
    client = FakeClient(start_error=APIError("boom", 500))
    assert runcli.main(["img", "x"], client) == 125
    assert runcli.main(["--nope", "img"], FakeClient()) == 125
    assert "see 'cocon run --help'" in capfd.readouterr().err


def test_signals_go_to_the_container() -> None:
    client = FakeClient(on_wait=lambda: os.kill(os.getpid(), signal.SIGTERM))
    before = signal.getsignal(signal.SIGTERM)
    assert runcli.main(["img"], client) == 0
    assert ("kill", signal.SIGTERM) in client.calls
    assert signal.getsignal(signal.SIGTERM) == before  # restored afterwards


def test_request_is_json_serializable() -> None:
    body, _ = build_request(parse_args(["-v", "/a:/b", "--tmpfs", "/t", "img"]), {})
    assert json.loads(json.dumps(body)) == body
