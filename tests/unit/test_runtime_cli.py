"""The fast command-line path must read argv exactly as the argparse parser does."""

from __future__ import annotations

import pytest

from cocon.runtime.cli import build_parser, fast_parse

SAME = [
    ["create", "--bundle", "/b", "--pid-file", "/p", "c1"],
    ["--root", "/r", "--log", "/l", "--log-format=json", "create", "-b", "/b", "--console-socket=/s", "c1"],
    ["--systemd-cgroup", "run", "-d", "--keep", "--preserve-fds", "2", "--no-new-keyring", "c1"],
    ["start", "c1"],
    ["state", "c1"],
    ["delete", "--force", "c1"],
    ["kill", "c1", "KILL"],
    ["kill", "--all", "c1"],
    ["pause", "c1"],
    ["--debug", "resume", "c1"],
]


@pytest.mark.parametrize("argv", SAME)
def test_fast_parse_matches_argparse(argv: list[str]) -> None:
    fast = fast_parse(argv)
    assert fast is not None
    full = vars(build_parser().parse_args(argv))
    for key, value in full.items():
        assert getattr(fast, key) == value, key


@pytest.mark.parametrize(
    "argv",
    [["--help"], ["create", "--help"], ["create"], ["exec", "c1", "ls"], ["start", "a", "b"], ["bogus", "x"],
     ["create", "--unknown", "c1"], ["create", "--preserve-fds", "x", "c1"], ["--root"]],
)  # fmt: skip
def test_fast_parse_leaves_the_rest_to_argparse(argv: list[str]) -> None:
    assert fast_parse(argv) is None
