"""The pure parts of the life cycle: k8s-file logs, times, signals, restart decisions and back-off,
`cocon run -d`'s flags, `ps --filter`, and cp's path handling against a directory tree."""

from __future__ import annotations

import os
import signal
from typing import Any

import pytest

from cocon.cli.containers import filter_containers
from cocon.cli.run import UsageError, build_request, parse_args
from cocon.engine import copy
from cocon.engine.errors import InvalidRequest, NotFound
from cocon.engine.instances import InstanceRecord
from cocon.engine.logs import docker_time, log_files, parse_since, parse_time, read_logs
from cocon.engine.monitor import backoff, parse_restart_policy, wants_restart
from cocon.engine.supervisor import parse_signal


def write_log(path: str, lines: list[str]) -> None:
    with open(path, "w") as f:
        f.write("".join(line + "\n" for line in lines))


def test_k8s_file_records(tmp_path: Any) -> None:
    log = str(tmp_path / "container.log")
    write_log(log, [
        "2026-11-25T13:00:00.100000000+00:00 stdout F one",
        "2026-11-25T13:00:01.000000000+00:00 stderr P par",
        "2026-11-25T13:00:01.500000000+00:00 stdout F two",
        "2026-11-25T13:00:02.000000000+00:00 stderr F tial",
        "2026-11-25T14:00:03.000000000+01:00 stdout F three",
        "garbage line",
        "2026-11-25T13:00:04.000000000+00:00 stdout P no newline",
    ])  # fmt: skip
    got = [(s, line) for s, _t, _st, line in read_logs([log])]
    assert got == [("stdout", b"one\n"), ("stdout", b"two\n"), ("stderr", b"partial\n"),
                   ("stdout", b"three\n"), ("stdout", b"no newline")]  # fmt: skip
    assert [line for _s, _t, _st, line in read_logs([log], stdout=False)] == [b"partial\n"]
    assert [line for _s, _t, _st, line in read_logs([log], tail=2)] == [b"three\n", b"no newline"]
    since = parse_time("2026-11-25T13:00:01.600000000Z")
    assert [line for _s, _t, _st, line in read_logs([log], since=since, tail=10)][:1] == [b"three\n"]
    assert list(read_logs([log], tail=0)) == []


def test_rotated_files_oldest_first(tmp_path: Any) -> None:
    log = str(tmp_path / "c.log")
    for name in ("c.log.2", "c.log.1", "c.log"):
        write_log(str(tmp_path / name), [f"2026-11-25T13:00:00.000000000Z stdout F {name}"])
    assert [os.path.basename(p) for p in log_files(log)] == ["c.log.2", "c.log.1", "c.log"]


def test_times() -> None:
    t = parse_time("2026-11-25T13:40:31.027160566+00:00")
    assert abs(t - parse_time("2026-11-25T14:40:31.027160566+01:00")) < 1e-6
    assert docker_time(t, "2026-11-25T13:40:31.027160566+00:00") == "2026-11-25T13:40:31.027160566Z"
    assert parse_since("1700000000.5") == 1700000000.5
    assert parse_since("10m", now=1000.0) == 400.0
    assert parse_since("1h30m", now=10000.0) == 10000.0 - 5400
    assert parse_since("2026-11-25") == parse_time("2026-11-25T00:00:00Z")
    assert parse_since(None) is None
    with pytest.raises(ValueError, match="duration"):
        parse_since("soon")


def test_signals() -> None:
    assert parse_signal("KILL") == signal.SIGKILL
    assert parse_signal("sigusr1") == signal.SIGUSR1
    assert parse_signal("15") == 15
    assert parse_signal(None) == signal.SIGTERM
    for bad in ("NOPE", "0", "99"):
        with pytest.raises(InvalidRequest):
            parse_signal(bad)


def record(status: str, exit_code: int | None, policy: dict[str, Any] | None, **cfg: Any) -> InstanceRecord:
    host = {"RestartPolicy": policy} if policy else {}
    return InstanceRecord(
        id="a" * 64, name="x", image="sha256:" + "b" * 64, image_ref="busybox", isolation="container",
        status=status, exit_code=exit_code, error="", pid=0, supervisor=0, supervisor_start=0, created=0.0,
        started=cfg.pop("started", 100.0), finished=cfg.pop("finished", 101.0), snapshot="",
        config={"Create": {"HostConfig": host}, **cfg},
    )  # fmt: skip


def test_restart_decisions() -> None:
    on_failure = {"Name": "on-failure", "MaximumRetryCount": 2}
    assert wants_restart(record("exited", 1, on_failure))
    assert not wants_restart(record("exited", 0, on_failure))
    assert not wants_restart(record("exited", 1, on_failure, RestartCount=2))
    assert wants_restart(record("exited", 1, {"Name": "on-failure"}, RestartCount=50))
    assert wants_restart(record("exited", 0, {"Name": "always"}))
    assert not wants_restart(record("running", None, {"Name": "always"}))
    assert not wants_restart(record("exited", 0, None))
    stopped = {"StoppedByUser": True}
    assert not wants_restart(record("exited", 0, {"Name": "always"}, **stopped))
    assert wants_restart(record("exited", 0, {"Name": "always"}, **stopped), daemon_start=True)
    assert not wants_restart(record("exited", 0, {"Name": "unless-stopped"}, **stopped), daemon_start=True)
    assert wants_restart(record("exited", 0, {"Name": "unless-stopped"}), daemon_start=True)


def test_backoff() -> None:
    assert backoff(record("exited", 1, None)) == 0.1
    assert backoff(record("exited", 1, None, BackoffStreak=3)) == 0.8
    assert backoff(record("exited", 1, None, BackoffStreak=30)) == 60.0
    assert backoff(record("exited", 1, None, BackoffStreak=5, started=0.0, finished=20.0)) == 0.1


def test_restart_policy_text() -> None:
    assert parse_restart_policy("on-failure:3") == {"Name": "on-failure", "MaximumRetryCount": 3}
    assert parse_restart_policy("always") == {"Name": "always", "MaximumRetryCount": 0}
    for bad in ("sometimes", "always:3", "on-failure:x"):
        with pytest.raises(InvalidRequest):
            parse_restart_policy(bad)


def test_run_detached_flags() -> None:
    body, name = build_request(parse_args([
        "-d", "--name", "web", "--restart", "on-failure:3", "--stop-signal", "SIGUSR1", "--stop-timeout", "3",
        "--log-opt", "max-size=1m", "--health-cmd", "true", "--health-interval", "1m30s",
        "--health-timeout", "500ms", "--health-retries", "4", "--health-start-period", "2s", "busybox", "top",
    ]), {})  # fmt: skip
    assert name == "web"
    assert body["HostConfig"]["RestartPolicy"] == {"Name": "on-failure", "MaximumRetryCount": 3}
    assert body["StopSignal"] == "SIGUSR1" and body["StopTimeout"] == 3
    assert body["HostConfig"]["LogConfig"] == {"Type": "k8s-file", "Config": {"max-size": "1m"}}
    assert body["Healthcheck"] == {"Test": ["CMD-SHELL", "true"], "Interval": 90 * 10**9,
                                   "Timeout": 500 * 10**6, "StartPeriod": 2 * 10**9, "Retries": 4}  # fmt: skip
    body, _ = build_request(parse_args(["--no-healthcheck", "busybox"]), {})
    assert body["Healthcheck"] == {"Test": ["NONE"]}
    for bad in (["--restart", "sometimes"], ["--rm", "--restart", "always"], ["--health-interval", "x"],
                ["--log-opt", "color=red"], ["--stop-timeout", "soon"]):  # fmt: skip
        with pytest.raises(UsageError):
            build_request(parse_args([*bad, "busybox"]), {})


def test_ps_filters() -> None:
    items = [
        {"Id": "abc1", "Names": ["/web"], "Image": "busybox:latest", "ImageID": "sha256:ff00", "State": "running",
         "Status": "Up 2 seconds (healthy)", "Labels": {"app": "x"}},
        {"Id": "def2", "Names": ["/db"], "Image": "debian", "ImageID": "sha256:ee11", "State": "exited",
         "Status": "Exited (3) 1 second ago", "Labels": {}},
    ]  # fmt: skip

    def names(*filters: str) -> list[str]:
        return [c["Names"][0] for c in filter_containers(items, list(filters))]

    assert names("status=running") == ["/web"]
    assert names("status=running", "status=exited") == ["/web", "/db"]
    assert names("name=d") == ["/db"]
    assert names("id=abc") == ["/web"]
    assert names("label=app") == ["/web"] and names("label=app=y") == []
    assert names("ancestor=busybox") == ["/web"] and names("ancestor=ee11") == ["/db"]
    assert names("exited=3") == ["/db"]
    assert names("health=healthy") == ["/web"]
    assert names("status=exited", "name=web") == []


def test_cp_stays_inside_the_root(tmp_path: Any) -> None:
    root = tmp_path / "rootfs"
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "conf").write_text("inside\n")
    (root / "tmp").mkdir()
    os.symlink("/", root / "tmp" / "up")
    os.symlink("../../../../../../etc/passwd", root / "tmp" / "pw")
    host = tmp_path / "host"
    host.mkdir()
    (host / "new.txt").write_text("from host\n")
    copy.copy_to(str(root), str(host / "new.txt"), "/tmp/up/etc/")
    assert (root / "etc" / "new.txt").read_text() == "from host\n"
    copy.copy_to(str(root), str(host / "new.txt"), "/tmp/renamed")
    assert (root / "tmp" / "renamed").read_text() == "from host\n"
    copy.copy_from(str(root), "/tmp/up/etc/conf", str(host / "out"))
    assert (host / "out").read_text() == "inside\n"
    copy.copy_from(str(root), "/tmp/pw", str(host))  # a symlink is copied as a symlink
    assert os.readlink(host / "pw") == "../../../../../../etc/passwd"
    copy.copy_from(str(root), "/etc/.", str(host / "etc-copy"))
    assert sorted(os.listdir(host / "etc-copy")) == ["conf", "new.txt"]
    with pytest.raises(NotFound):
        copy.copy_from(str(root), "/nope/x", str(host))
