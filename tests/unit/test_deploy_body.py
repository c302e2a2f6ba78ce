"""The body `rotator deploy` posts (cli.deploy_body), from arguments as the real parser
reads them: the canary part only with --canary, only the keys given, and what the admin
API's check (canary.from_request) makes of it. No daemon, no processes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from rotator.canary import from_request
from rotator.cli import USAGE, CommandError, build_parser, deploy_body
from rotator.config import CanarySpec


def body(*args: str) -> dict[str, Any]:
    return deploy_body(build_parser().parse_args(["deploy", "web", *args]))


def test_a_plain_deploy_has_no_canary(tmp_path: Path) -> None:
    assert body() == {}
    (tmp_path / "a.env").write_text("A=file\nB=file\n")
    assert body("--command", "run v2", "--env-file", str(tmp_path / "a.env"), "--env", "A=1") == {
        "command": "run v2",
        "env": {"A": "1", "B": "file"},
    }


@pytest.mark.parametrize(
    ("args", "canary"),
    [
        (["--canary", "10"], {"weight": 10}),
        (["--canary", "10%"], {"weight": 10}),
        (["--canary", " 5 % "], {"weight": 5}),
        (["--canary", "1"], {"weight": 1}),
        (["--canary", "99%"], {"weight": 99}),
        (["--canary", "25", "--for", "2m"], {"weight": 25, "duration": 120.0}),
        (["--canary", "25", "--for", "1m30s"], {"weight": 25, "duration": 90.0}),
        (["--canary", "25", "--for", "45"], {"weight": 25, "duration": 45.0}),
        (["--canary", "25", "--for", "500ms"], {"weight": 25, "duration": 0.5}),
        (["--canary", "25", "--min-requests", "0"], {"weight": 25, "min_requests": 0}),
        (
            ["--min-requests", "100", "--for", "5m", "--canary", "50"],
            {"weight": 50, "duration": 300.0, "min_requests": 100},
        ),
    ],
)
def test_the_canary_part_holds_only_what_was_given(args: list[str], canary: dict[str, Any]) -> None:
    assert body(*args) == {"canary": canary}


def test_a_canary_deploy_keeps_its_new_definition() -> None:
    assert body("--canary", "10", "--command", "run v2", "--cwd", "/") == {
        "command": "run v2",
        "cwd": "/",
        "canary": {"weight": 10},
    }


def test_the_admin_check_reads_the_body_as_the_cli_meant_it() -> None:
    rule = CanarySpec(duration=60.0, min_requests=20)
    sent = body("--canary", "10%", "--for", "2m", "--min-requests", "0")["canary"]
    assert from_request(sent, rule) == (10, CanarySpec(duration=120.0, min_requests=0))
    assert from_request(body("--canary", "30")["canary"], rule) == (30, rule)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--for", "30s"], "--for goes with --canary PERCENT"),
        (["--min-requests", "0"], "--min-requests goes with --canary PERCENT"),
        (["--for", "30s", "--min-requests", "5"], "--for goes with --canary PERCENT"),
    ],
)
def test_canary_options_without_a_canary_are_a_usage_error(args: list[str], message: str) -> None:
    with pytest.raises(CommandError) as caught:
        body(*args)
    assert (str(caught.value), caught.value.code) == (message, USAGE)
