"""max_clients: reading it from the file, and the cap the descriptor limit allows."""

from __future__ import annotations

import resource
from pathlib import Path

import pytest

from rotator.config import ConfigError
from rotator.configfile import parse
from rotator.proxy.clients import accept_backlog, effective_total, total_cap
from rotator.proxy.protocol import Answer
from tests.unit.test_config import HERMES


@pytest.mark.parametrize(
    ("limit", "cap"),
    [
        (1024, 384),  # a quarter kept: (1024 - 256) / 2
        (256, 64),  # macOS' usual soft limit: the floor of 128 kept
        (100, 16),  # too low to run much: still a few clients
        (65536, 24576),
        (1048576, 393216),
        (resource.RLIM_INFINITY, 393216),  # counts as 2**20
    ],
)
def test_the_total_cap_keeps_a_reserve_and_two_descriptors_a_client(limit: int, cap: int) -> None:
    assert total_cap(limit) == cap


def test_a_configured_total_above_what_the_limit_allows_is_lowered_with_a_reason() -> None:
    assert effective_total(None, 1024) == (384, None)
    assert effective_total(100, 1024) == (100, None)
    assert effective_total(384, 1024) == (384, None)
    cap, warning = effective_total(385, 1024)
    assert cap == 384
    assert warning is not None and warning.startswith(
        "max_clients 385 lowered to 384: the descriptor limit (ulimit -n) is 1024"
    )


def test_the_refusal_is_a_complete_503_that_closes() -> None:
    answer = Answer.TOO_MANY_CLIENTS.render("hermes", "max_clients 2")
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 503 Service Unavailable\r\n")
    assert b"\r\nConnection: close\r\n" in head + b"\r\n"
    assert f"Content-Length: {len(body)}".encode() in head
    assert body == b"rotator: hermes: too many client connections (max_clients 2)\n"


def test_max_clients_at_the_top_and_per_component(tmp_path: Path) -> None:
    path = tmp_path / "rotator.yaml"
    assert parse(HERMES, path).max_clients is None
    assert parse("max_clients: auto\n" + HERMES, path).max_clients is None
    assert parse("max_clients: AUTO\n" + HERMES, path).max_clients is None
    assert parse("max_clients: 500\n" + HERMES, path).max_clients == 500
    assert parse('max_clients: "500"\n' + HERMES, path).max_clients == 500
    text = "defaults:\n  max_clients: 100\n" + HERMES
    assert parse(text, path).components[0].proxy.max_clients == 100
    assert parse(text + "    max_clients: 0\n", path).components[0].proxy.max_clients == 0
    assert parse(HERMES, path).components[0].proxy.max_clients == 0
    # What the component's proxy gets (reloads set it anew the same way).


@pytest.mark.parametrize(
    ("text", "where", "message"),
    [
        ("max_clients: 0\n" + HERMES, "rotator.yaml:1: max_clients", "must be 1 or more"),
        ("max_clients: -5\n" + HERMES, "rotator.yaml:1: max_clients", "must be 1 or more"),
        ("max_clients: lots\n" + HERMES, "rotator.yaml:1: max_clients", "'lots' is not a whole"),
        ("max_clients: 1.5\n" + HERMES, "rotator.yaml:1: max_clients", "1.5 is not a whole"),
        ("max_clients: [1]\n" + HERMES, "rotator.yaml:1: max_clients", "must be a single"),
        ("max_clients:\n" + HERMES, "rotator.yaml:1: max_clients", "needs a value"),
        (
            HERMES + "    max_clients: auto\n",
            "rotator.yaml:6: components.hermes.max_clients",
            "'auto' is not a whole number",
        ),
        (
            "defaults:\n  max_clients: -1\n" + HERMES,
            "rotator.yaml:2: defaults.max_clients",
            "must be 0 or more, not -1",
        ),
        (
            "max_client: 5\n" + HERMES,
            "rotator.yaml:1: max_client",
            "unknown key (did you mean 'max_clients'?)",
        ),
    ],
)
def test_a_bad_max_clients_names_its_line_and_path(
    text: str, where: str, message: str, tmp_path: Path
) -> None:
    with pytest.raises(ConfigError) as info:
        parse(text, tmp_path / "rotator.yaml")
    (problem,) = info.value.problems
    assert str(problem).startswith(f"{tmp_path}/{where}: {message}"), str(problem)


def test_the_accept_backlog_stays_within_the_reserve() -> None:
    # One accept burst of plain asyncio takes up to a backlog's worth of descriptors.
    assert accept_backlog(1024) == 128
    assert accept_backlog(65536) == 1024
    assert accept_backlog(256) == 64
    for limit in (256, 1024, 4096, 65536):
        assert accept_backlog(limit) + total_cap(limit) * 2 <= limit
