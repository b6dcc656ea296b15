"""`cocon events` on a real engine: containers run through a real daemon (the docker CLI) write their
create/start/die events; `cocon events` reads them back with --since/--until, filters, the default
line format and --format json, both in-process (the CLI's LocalClient, reading the engine's event
log) and through the daemon's `GET /events` (HTTPClient)."""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(__file__)))

from cli_helpers import COCON
from cocon.cli import events as events_cli
from daemon_helpers import Daemon, docker, module_daemon

LINE = re.compile(
    r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{9}(?:Z|[+-]\d\d:\d\d)) (\w+) (\S+) ([0-9a-f]{64}|\S*)(?: \((.*)\))?$"
)


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    yield from module_daemon(str(tmp_path_factory.mktemp("cli-events")))


@pytest.fixture(scope="module")
def ran(daemon: Daemon) -> dict[str, Any]:
    """Two containers run to their end through the daemon, between `since` and `until`."""
    since = time.time()
    time.sleep(0.01)
    one = docker(
        daemon, "run", "--name", "ev-one", "--label", "team=a", "busybox", "sh", "-c", "exit 3", check=False
    )
    assert one.returncode == 3, one.stderr
    two = docker(daemon, "run", "--rm", "--name", "ev-two", "busybox", "true")
    assert two.returncode == 0
    ids = {"ev-one": docker(daemon, "inspect", "-f", "{{.Id}}", "ev-one").stdout.strip()}
    time.sleep(0.01)
    until = time.time()
    return {"since": since, "until": until, "ids": ids}


def cocon_events(daemon: Daemon, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, COCON_ROOT=daemon.root, COCON_RUN=daemon.run)
    return subprocess.run(
        [*[COCON, "events"], *args], env=env, capture_output=True, text=True, timeout=timeout
    )


def _json_lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_history_as_json(daemon: Daemon, ran: dict[str, Any]) -> None:
    out = cocon_events(
        daemon, "--since", f"{ran['since']:.3f}", "--until", f"{ran['until']:.3f}", "--format", "json"
    )
    assert out.returncode == 0, out.stderr
    events = _json_lines(out.stdout)
    one = ran["ids"]["ev-one"]
    mine = [e for e in events if e["Actor"]["ID"] == one]
    assert [e["Action"] for e in mine][:3] == ["create", "start", "die"], mine
    die = mine[2]
    assert die["Type"] == "container" and die["Actor"]["Attributes"]["exitCode"] == "3"
    assert die["Actor"]["Attributes"]["name"] == "ev-one" and die["Actor"]["Attributes"]["team"] == "a"
    assert ran["since"] * 1e9 <= die["timeNano"] <= ran["until"] * 1e9
    names = {e["Actor"]["Attributes"].get("name") for e in events}
    assert "ev-two" in names  # the --rm one: its create, start, die and destroy
    two = [e["Action"] for e in events if e["Actor"]["Attributes"].get("name") == "ev-two"]
    assert two == ["create", "start", "die", "destroy"], two


def test_filters_and_default_format(daemon: Daemon, ran: dict[str, Any]) -> None:
    window = ["--since", f"{ran['since']:.3f}", "--until", f"{ran['until']:.3f}"]
    out = cocon_events(daemon, *window, "--filter", "event=die", "--filter", "container=ev-one")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert len(lines) == 1, lines
    m = LINE.match(lines[0])
    assert m is not None, lines[0]
    assert m.group(2) == "container" and m.group(3) == "die" and m.group(4) == ran["ids"]["ev-one"]
    attrs = dict(item.split("=", 1) for item in (m.group(5) or "").split(", "))
    assert attrs["exitCode"] == "3" and attrs["name"] == "ev-one" and attrs["image"] == "busybox"
    assert list(attrs) == sorted(attrs)  # docker prints the attributes sorted by key
    labelled = _json_lines(cocon_events(daemon, *window, "-f", "label=team=a", "--format", "json").stdout)
    assert labelled and {e["Actor"]["Attributes"]["name"] for e in labelled} == {"ev-one"}
    images = _json_lines(cocon_events(daemon, *window, "-f", "type=image", "--format", "json").stdout)
    assert all(e["Type"] == "image" for e in images)
    starts = _json_lines(
        cocon_events(daemon, *window, "-f", "event=start", "-f", "event=destroy", "--format", "json").stdout
    )
    assert {e["Action"] for e in starts} == {"start", "destroy"}
    # a duration ago works as --since (docker's "10m" form)
    recent = _json_lines(
        cocon_events(
            daemon, "--since", "10m", "--until", "0s", "-f", "container=ev-one", "--format", "json"
        ).stdout
    )
    assert [e["Action"] for e in recent][:3] == ["create", "start", "die"]


def test_until_ends_a_live_stream(daemon: Daemon) -> None:
    env = dict(os.environ, COCON_ROOT=daemon.root, COCON_RUN=daemon.run)
    until = time.time() + 4
    proc = subprocess.Popen(
        [*[COCON, "events"], "--until", f"{until:.3f}", "--format", "json", "-f", "container=ev-live"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        time.sleep(0.8)  # the stream is open: what follows is new
        docker(daemon, "run", "--rm", "--name", "ev-live", "busybox", "true")
        out, err = proc.communicate(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert time.time() >= until - 0.1  # it ran until --until, then ended by itself
    actions = [e["Action"] for e in _json_lines(out)]
    assert actions == ["create", "start", "die", "destroy"], actions


def test_through_the_daemon(daemon: Daemon, ran: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    events_cli.add_arguments(parser)
    args = parser.parse_args(
        [
            "--since",
            f"{ran['since']:.3f}",
            "--until",
            f"{ran['until']:.3f}",
            "--format",
            "json",
            "-f",
            "container=ev-one",
        ]
    )
    client = daemon.client()
    try:
        assert events_cli.cmd_events(client, args) == 0
    finally:
        client.close()
    events = _json_lines(capsys.readouterr().out)
    assert [e["Action"] for e in events][:3] == ["create", "start", "die"]


def test_bad_arguments(daemon: Daemon) -> None:
    out = cocon_events(daemon, "--filter", "nokey", "--until", "0s")
    assert out.returncode == 2 and "KEY=VALUE" in out.stderr
    out = cocon_events(daemon, "--filter", "colour=red", "--until", "0s")
    assert out.returncode == 1 and "invalid filter 'colour'" in out.stderr
    out = cocon_events(daemon, "--since", "yesterday-ish", "--until", "0s")
    assert out.returncode == 2 and "--since" in out.stderr
    out = cocon_events(daemon, "--since", "1m", "--until", "2m")
    assert out.returncode == 2 and "after --until" in out.stderr
    out = cocon_events(daemon, "--format", "{{.Type}}", "--until", "0s")
    assert out.returncode == 2 and "json" in out.stderr
