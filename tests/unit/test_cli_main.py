"""The `cocon` command's parsing and output for everything but `run`, against a fake client."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest

from cocon.api.client import APIError, Client
from cocon.cli import main as climain
from cocon.cli import output

IMAGE_ID = "sha256:" + "ab" * 32
NOW = int(time.time())


class Fake(Client):
    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []

    def _call(self, name: str, *args: Any) -> None:
        self.calls.append((name, args))

    def image_list(self, *, all: bool = False, dangling: bool | None = None) -> list[dict[str, Any]]:
        self._call("image_list", all, dangling)
        return [
            {"Id": IMAGE_ID, "RepoTags": ["busybox:latest", "localhost:5000/team/app:1"],
             "RepoDigests": ["busybox@sha256:" + "cd" * 32], "Created": NOW - 7200, "Size": 1_234_567,
             "Containers": 2},
            {"Id": "sha256:" + "ef" * 32, "RepoTags": [], "RepoDigests": [], "Created": 0, "Size": 999,
             "Containers": 0},
        ]  # fmt: skip

    def image_remove(self, image: str, *, force: bool = False, noprune: bool = False) -> list[dict[str, str]]:
        self._call("image_remove", image, force, noprune)
        if image == "missing":
            raise APIError("no image 'missing' here", 404)
        return [{"Untagged": f"{image}:latest"}, {"Deleted": IMAGE_ID}]

    def image_prune(self, *, all: bool = False) -> dict[str, Any]:
        self._call("image_prune", all)
        return {"ImagesDeleted": [{"Deleted": IMAGE_ID}], "SpaceReclaimed": 2_000_000}

    def image_inspect(self, image: str) -> dict[str, Any]:
        self._call("image_inspect", image)
        if image == "nope":
            raise APIError("no image 'nope' here", 404)
        return {"Id": IMAGE_ID}

    def image_history(self, image: str) -> list[dict[str, Any]]:
        return [
            {
                "Id": IMAGE_ID,
                "Created": NOW,
                "CreatedBy": "RUN   make   all",
                "Tags": None,
                "Size": 1000,
                "Comment": "",
            },
            {"Id": "<missing>", "Created": 0, "CreatedBy": "x" * 80, "Tags": None, "Size": 0, "Comment": "c"},
        ]

    def image_tag(self, source: str, target: str) -> None:
        self._call("image_tag", source, target)

    def container_list(self, *, all: bool = False) -> list[dict[str, Any]]:
        self._call("container_list", all)
        return [{"Id": "1" * 64, "Names": ["/web"], "Image": "busybox", "Command": "sh -c 'a very long command'",
                 "Created": NOW - 5, "State": "exited", "Status": "Exited (0) 3 seconds ago", "Labels": {"a": "b"},
                 "Mounts": [{"Type": "volume", "Name": "data", "Source": "/x"}]}]  # fmt: skip

    def container_remove(self, container: str, *, force: bool = False, volumes: bool = False) -> str:
        self._call("container_remove", container, force, volumes)
        if container == "running":
            raise APIError("cannot remove container running: it is running", 409)
        return container

    def container_inspect(self, container: str) -> dict[str, Any]:
        if container != "web":
            raise APIError(f"no container {container!r}", 404)
        return {"Id": "1" * 64, "Name": "/web"}

    def volume_create(
        self, name: str | None = None, *, labels: dict[str, str] | None = None
    ) -> dict[str, Any]:
        self._call("volume_create", name, labels)
        return {"Name": name or "f" * 64}

    def volume_list(self) -> dict[str, Any]:
        return {"Volumes": [{"Name": "data", "Driver": "local", "Labels": {"x": "1"}, "Mountpoint": "/m",
                             "Scope": "local", "CreatedAt": "2024-01-01T00:00:00Z"}], "Warnings": []}  # fmt: skip

    def volume_remove(self, name: str, *, force: bool = False) -> None:
        self._call("volume_remove", name, force)

    def volume_prune(self, *, all: bool = False) -> dict[str, Any]:
        self._call("volume_prune", all)
        return {"VolumesDeleted": ["old"], "SpaceReclaimed": 4096}

    def image_build(self, context: str, **kw: Any) -> dict[str, Any]:
        self._call("image_build", context, kw)
        if kw.get("output"):
            kw["output"]("STEP 1/1: FROM busybox\n")
        return {"Id": IMAGE_ID, "RepoTags": list(kw.get("tags") or [])}


def cli(
    capsys: pytest.CaptureFixture[str], *argv: str, client: Fake | None = None
) -> tuple[int, str, str, Fake]:
    fake = client or Fake()
    code = climain.main(list(argv), fake)
    out, err = capsys.readouterr()
    return code, out, err, fake


def test_images_table_json_quiet(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _, _ = cli(capsys, "images")
    lines = out.splitlines()
    assert code == 0 and lines[0].split() == ["REPOSITORY", "TAG", "IMAGE", "ID", "CREATED", "SIZE"]
    assert lines[1].split() == ["busybox", "latest", "abababababab", "2", "hours", "ago", "1.23MB"]
    assert lines[2].split()[:3] == ["localhost:5000/team/app", "1", "abababababab"]
    assert lines[3].split()[:3] == ["<none>", "<none>", "efefefefefef"]
    assert all(line == line.rstrip() for line in lines)
    _, out, _, _ = cli(capsys, "images", "-q")
    assert out.split() == ["abababababab", "efefefefefef"]
    _, out, _, _ = cli(capsys, "image", "ls", "--format", "json", "--no-trunc", "busybox")
    row = json.loads(out)
    assert row["ID"] == IMAGE_ID and row["Repository"] == "busybox" and row["Containers"] == "2"
    assert row["Digest"] == "sha256:" + "cd" * 32
    _, _, _, fake = cli(capsys, "images", "--filter", "dangling=true")
    assert fake.calls == [("image_list", (False, True))]
    code, _, err, _ = cli(capsys, "images", "--filter", "label=x")
    assert code == 2 and "dangling" in err
    _, out, _, _ = cli(capsys, "images", "--digests")
    assert "DIGEST" in out.splitlines()[0]


def test_rmi_tag_prune(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err, fake = cli(capsys, "rmi", "-f", "busybox", "missing")
    assert code == 1
    assert out == f"Untagged: busybox:latest\nDeleted: {IMAGE_ID}\n"
    assert err == "cocon: error: no image 'missing' here\n"
    assert fake.calls[0] == ("image_remove", ("busybox", True, False))
    _, _, _, fake = cli(capsys, "image", "rm", "--no-prune", "x")
    assert fake.calls == [("image_remove", ("x", False, True))]
    _, _, _, fake = cli(capsys, "tag", "busybox", "mine:1")
    assert fake.calls == [("image_tag", ("busybox", "mine:1"))]
    code, out, _, fake = cli(capsys, "image", "prune", "-a", "-f")
    assert code == 0 and out == f"Deleted Images:\ndeleted: {IMAGE_ID}\n\nTotal reclaimed space: 2MB\n"
    assert fake.calls == [("image_prune", (True,))]


def test_prune_asks_first(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    import io

    monkeypatch.setattr("sys.stdin", io.StringIO("no\n"))
    code, out, _, fake = cli(capsys, "image", "prune")
    assert code == 0 and "Are you sure you want to continue? [y/N]" in out and fake.calls == []
    monkeypatch.setattr("sys.stdin", io.StringIO("y\n"))
    _, _, _, fake = cli(capsys, "volume", "prune")
    assert fake.calls == [("volume_prune", (False,))]


def test_inspect_history(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err, _ = cli(capsys, "image", "inspect", "busybox", "nope")
    assert code == 1 and json.loads(out) == [{"Id": IMAGE_ID}] and "no image 'nope'" in err
    code, out, _, _ = cli(capsys, "inspect", "web", "busybox")
    assert code == 0 and [d["Id"] for d in json.loads(out)] == ["1" * 64, IMAGE_ID]
    code, out, err, _ = cli(capsys, "inspect", "--type", "container", "busybox")
    assert code == 1 and json.loads(out) == []
    _, out, _, _ = cli(capsys, "image", "history", "busybox")
    lines = out.splitlines()
    assert lines[0].split() == ["IMAGE", "CREATED", "CREATED", "BY", "SIZE", "COMMENT"]
    assert "RUN make all" in lines[1] and "<missing>" in lines[2] and "x" * 44 + "…" in lines[2]
    _, out, _, _ = cli(capsys, "image", "history", "-q", "busybox")
    assert out.split() == ["abababababab", "<missing>"]


def test_ps_and_rm(capsys: pytest.CaptureFixture[str]) -> None:
    _, out, _, fake = cli(capsys, "ps", "-a")
    assert fake.calls == [("container_list", (True,))]
    lines = out.splitlines()
    assert lines[0].split() == ["CONTAINER", "ID", "IMAGE", "COMMAND", "CREATED", "STATUS", "PORTS", "NAMES"]
    assert lines[1].startswith("111111111111   busybox   \"sh -c 'a very long") and lines[1].endswith("web")
    _, out, _, _ = cli(capsys, "container", "ls", "-a", "--format", "json")
    row = json.loads(out)
    assert row["Names"] == "web" and row["LocalVolumes"] == "1" and row["Labels"] == "a=b"
    _, out, _, _ = cli(capsys, "ps", "-q", "--no-trunc")
    assert out.split() == ["1" * 64]
    code, out, err, fake = cli(capsys, "rm", "-fv", "web", "running")
    assert code == 1 and out == "web\n" and "is running" in err
    assert fake.calls[0] == ("container_remove", ("web", True, True))


def test_volumes(capsys: pytest.CaptureFixture[str]) -> None:
    _, out, _, fake = cli(capsys, "volume", "create", "--label", "a=1", "--label", "b=", "data")
    assert out == "data\n" and fake.calls == [("volume_create", ("data", {"a": "1", "b": ""}))]
    _, out, _, _ = cli(capsys, "volume", "ls")
    assert out.splitlines() == ["DRIVER   VOLUME NAME   TYPE", "local    data          dir"]
    _, out, _, _ = cli(capsys, "volume", "ls", "--format", "json")
    assert json.loads(out)["Labels"] == "x=1"
    _, out, _, fake = cli(capsys, "volume", "rm", "-f", "a", "b")
    assert out == "a\nb\n" and fake.calls == [("volume_remove", ("a", True)), ("volume_remove", ("b", True))]
    _, out, _, fake = cli(capsys, "volume", "prune", "-af")
    assert out == "Deleted Volumes:\nold\n\nTotal reclaimed space: 4.1kB\n"


def test_build(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FROM_ENV", "e")
    code, out, _, fake = cli(capsys, "build", "-t", "app:1", "-f", "F", "--build-arg", "A=1", "--build-arg",
                             "FROM_ENV", "--target", "s", "--no-cache", "ctx")  # fmt: skip
    assert code == 0 and out == "STEP 1/1: FROM busybox\n"
    name, (context, kw) = fake.calls[0]
    assert (name, context) == ("image_build", "ctx")
    assert kw["tags"] == ["app:1"] and kw["dockerfile"] == "F" and kw["target"] == "s" and kw["no_cache"]
    assert kw["build_args"] == {"A": "1", "FROM_ENV": "e"}
    code, out, _, _ = cli(capsys, "image", "build", "-q", "ctx")
    assert out == f"{IMAGE_ID}\n"


def test_usage_errors(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        climain.main(["volume", "frobnicate"], Fake())
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("cocon: error: ") and err.count("\n") == 1
    with pytest.raises(SystemExit) as info:
        climain.main(["save", "busybox"], Fake())
    assert info.value.code == 2 and "-o/--output" in capsys.readouterr().err
    assert climain.main(["version"], Fake()) == 0


def test_human_units() -> None:
    assert [output.human_size(n) for n in (0, 999, 1000, 1_234_567, 12_345_678_900)] == [
        "0B", "999B", "1kB", "1.23MB", "12.3GB"]  # fmt: skip
    assert output.human_duration(0.5) == "Less than a second"
    assert output.human_duration(59) == "59 seconds"
    assert output.human_duration(90) == "About a minute"
    assert output.human_duration(7200) == "2 hours"
    assert output.human_duration(3 * 86400) == "3 days"
    assert output.truncate("abcdef", 4) == "abc…"
