"""sd_notify's pure parts: the message format, a Channel, which instance a message is
for (real pids: this process and its ancestors, no spawning), and the health block's
`ready` and `watchdog` keys in the config file."""

from __future__ import annotations

import asyncio
import os
import textwrap
import time
from pathlib import Path

import pytest

from rotator.config import ConfigError
from rotator.configfile import parse as parse_config
from rotator.notify import Message, NotifySocket, parse


def test_parse_takes_assignments_and_skips_the_rest() -> None:
    data = b"READY=1\nSTATUS=warming: 3/10 = 30%\n\njunk\n=nameless\nX_Y2=\nSTATUS=later wins"
    assert parse(data) == {"READY": "1", "STATUS": "later wins", "X_Y2": ""}


def test_parse_survives_what_is_not_utf8_or_not_a_name() -> None:
    assert parse(b"STATUS=caf\xe9\nBAD NAME=1\nR\xc3\xa9=2") == {"STATUS": "caf\ufffd"}
    assert parse(b"") == {}


def test_a_channel_hears_ready_status_and_watchdog() -> None:
    async def scenario() -> None:
        sock = NotifySocket(Path("unused.sock"), "MARKER")
        channel = sock.watch(os.getpid(), "m")
        sock.deliver(Message({"STATUS": "  two\tlines  "}, os.getpid(), os.geteuid()))
        assert channel.status == "two lines" and not channel.ready.done()
        sock.deliver(Message({"READY": "0", "WATCHDOG": "1"}, os.getpid(), os.geteuid()))
        assert not channel.ready.done() and channel.alive.is_set()
        sock.deliver(Message({"READY": "1"}, os.getpid(), os.geteuid()))
        assert channel.ready.done()
        sock.deliver(Message({"READY": "1"}, os.getpid(), os.geteuid()))  # twice: no error

    asyncio.run(scenario())


def test_a_message_counts_for_the_instance_whose_tree_sent_it() -> None:
    async def scenario() -> None:
        sock = NotifySocket(Path("unused.sock"), "MARKER")
        parent = sock.watch(os.getppid(), "p")  # we are in its tree
        other = sock.watch(2**22 + 7, "o")  # no such process
        sock.deliver(Message({"READY": "1"}, os.getpid(), os.geteuid()))
        assert parent.ready.done() and not other.ready.done()

    asyncio.run(scenario())


def test_other_users_and_strangers_are_not_heard() -> None:
    async def scenario() -> None:
        sock = NotifySocket(Path("unused.sock"), "MARKER")
        channel = sock.watch(os.getpid(), "m")
        sock.deliver(Message({"READY": "1"}, os.getpid(), os.geteuid() + 1))
        assert not channel.ready.done()
        stranger = sock.watch(2**22 + 7, "s")
        sock.deliver(Message({"READY": "1"}, 1, os.geteuid()))  # init: nobody's tree
        assert not stranger.ready.done() and not channel.ready.done()

    asyncio.run(scenario())


def test_what_an_instance_said_before_it_was_watched_is_kept() -> None:
    # A fast app may say READY=1 before its spawn has returned to the component.
    async def scenario() -> None:
        sock = NotifySocket(Path("unused.sock"), "MARKER")
        sock.deliver(
            Message({"READY": "1", "STATUS": "up"}, os.getpid(), os.geteuid(), time.monotonic())
        )
        channel = sock.watch(os.getpid(), "m")
        assert channel.ready.done() and channel.status == "up"
        sock.forget(os.getpid())
        assert not sock.watch(os.getpid(), "m").ready.done()  # heard once, not again

    asyncio.run(scenario())


def test_without_credentials_mainpid_names_the_instance() -> None:
    # macOS: no SO_PASSCRED. MAINPID= names one; a bare READY=1 counts for all (each
    # still confirmed by its own health probe); a bare STATUS= for no one.
    async def scenario() -> None:
        sock = NotifySocket(Path("unused.sock"), "MARKER")
        a, b = sock.watch(101, "a"), sock.watch(102, "b")
        sock.deliver(Message({"STATUS": "nobody's"}))
        sock.deliver(Message({"MAINPID": "102", "STATUS": "b's"}))
        assert (a.status, b.status) == (None, "b's")
        sock.deliver(Message({"READY": "1"}))
        assert a.ready.done() and b.ready.done()

    asyncio.run(scenario())


HERMES = """\
components:
  hermes:
    listen: 127.0.0.1:8001
    ports: 18001-18010
    command: run --port {port}
    health:
"""


def test_health_ready_and_watchdog_in_the_config(tmp_path: Path) -> None:
    text = HERMES + "      ready: Notify\n      watchdog: 10s\n"
    health = parse_config(text, tmp_path / "rotator.yaml").component("hermes").health
    assert (health.ready, health.watchdog) == ("notify", 10.0)
    default = parse_config(HERMES + "      path: /up\n", tmp_path / "r.yaml")
    assert (
        default.component("hermes").health.ready,
        default.component("hermes").health.watchdog,
    ) == (
        "poll",
        0.0,
    )


@pytest.mark.parametrize(
    ("line", "key", "message"),
    [
        ("ready: push", "ready", "'push' is not a readiness mode (use poll or notify)"),
        ("watchdog: soon", "watchdog", "soon"),
    ],
)
def test_health_ready_and_watchdog_errors(
    tmp_path: Path, line: str, key: str, message: str
) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(textwrap.dedent(HERMES + f"      {line}\n"), tmp_path / "rotator.yaml")
    [problem] = info.value.problems
    assert (problem.line, problem.path) == (7, f"components.hermes.health.{key}")
    assert message in problem.message


def test_a_socket_that_cannot_be_bound_leaves_readiness_to_the_probe(tmp_path: Path) -> None:
    # `ready: notify` then behaves as `poll`: READY=1 counts as said, the probe decides.
    async def scenario() -> None:
        sock = NotifySocket(tmp_path / "missing" / "notify.sock", "MARKER")
        with pytest.raises(OSError):
            sock.open()
        assert sock.watch(os.getpid(), "m").ready.done()

    asyncio.run(scenario())
