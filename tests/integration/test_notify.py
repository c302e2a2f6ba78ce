"""sd_notify with real processes and sockets: instances' readiness, status and watchdog
over the daemon's NOTIFY_SOCKET, and the daemon's own messages to a service manager
(a datagram socket the test binds, standing in for systemd)."""

from __future__ import annotations

import json
import re
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from rotator.notify import parse
from tests.conftest import DEMO, cli, component, wait_until, write_config


def notify_demo(after: float) -> str:
    """The demo app, saying READY=1 `after` seconds after it listens (and answers /health)."""
    return f"{DEMO} --notify-after {after}"


def events(config: Path, kind: str) -> list[dict[str, Any]]:
    path = config.parent / "state" / "events.log"
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in records if r["kind"] == kind]


def ready_times(config: Path, name: str) -> dict[int, float]:
    """pid -> when that instance sent READY=1 (it says so in its log)."""
    found = {}
    for log in (config.parent / "state" / "logs" / name).glob("*.log"):
        for pid, at in re.findall(r"pid (\d+) sent READY=1 at ([\d.]+)", log.read_text()):
            found[int(pid)] = float(at)
    return found


def test_ready_notify_switches_at_ready_not_before(tmp_path: Path, daemon_factory: Any) -> None:
    # /health answers from the start; only READY=1, 2 s later, may let traffic in.
    command = notify_demo(2) + " --status 'warming caches'"
    config = write_config(tmp_path, {"app": component(command=command, health={"ready": "notify"})})
    d = daemon_factory(config)
    first = d.component("app")["active"]["pid"]
    assert d.component("app")["instances"][0]["status"] == "warming caches"
    assert f"app: pid {first} says: warming caches" in cli(config, "status").stdout
    restart = cli(config, "restart", "app")
    assert restart.returncode == 0, restart.stderr
    second = d.component("app")["active"]["pid"]
    assert second != first
    assert wait_until(lambda: {first, second} <= ready_times(config, "app").keys(), 5)
    ready = ready_times(config, "app")
    switched = {e["pid"]: e["time"] for e in events(config, "switched")}
    for pid in (first, second):
        late = switched[pid] - ready[pid]
        assert 0 < late < 0.05, f"pid {pid} switched {late * 1000:.1f} ms after its READY=1"


@pytest.mark.skipif(not hasattr(socket, "SO_PASSCRED"), reason="no sender credentials here")
def test_ready_from_outside_the_instance_tree_is_ignored(
    tmp_path: Path, daemon_factory: Any
) -> None:
    config = write_config(
        tmp_path,
        {"app": component(command=notify_demo(1.5), health={"ready": "notify"})},
    )
    d = daemon_factory(config, wait=False)
    notify_socket = config.parent / "state" / "notify.sock"
    assert wait_until(lambda: events(config, "spawned") if notify_socket.exists() else [], 10)
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:  # the test: not its tree
        sock.sendto(b"READY=1\nSTATUS=forged", str(notify_socket))
    time.sleep(0.5)
    assert not events(config, "switched"), d.output()
    d.wait_running()
    pid = d.component("app")["active"]["pid"]
    assert wait_until(lambda: pid in ready_times(config, "app"), 5)
    assert events(config, "switched")[0]["time"] > ready_times(config, "app")[pid]
    assert d.component("app")["instances"][0]["status"] is None  # the forged STATUS too


def test_watchdog_silence_replaces_the_instance(tmp_path: Path, daemon_factory: Any) -> None:
    # WATCHDOG=1 every 100 ms for 1 s, then silence: replaced 400 ms later, not before.
    command = DEMO + " --watchdog-for 1"
    config = write_config(
        tmp_path, {"app": component(command=command, health={"watchdog": "400ms"})}
    )
    d = daemon_factory(config)
    first = d.component("app")["active"]["pid"]
    spawned = events(config, "spawned")[0]["time"]
    assert wait_until(lambda: d.component("app")["active"]["pid"] != first, 10), d.output()
    unhealthy = events(config, "unhealthy")[0]
    assert unhealthy["pid"] == first and "WATCHDOG=1" in unhealthy["message"]
    assert unhealthy["time"] - spawned > 1.0

    def rotated() -> list[dict[str, Any]]:
        return [e for e in events(config, "rotated") if e["reason"] == "unhealthy"]

    assert wait_until(rotated, 5) and rotated()[0]["outcome"] == "ok"


def test_no_ready_within_start_timeout_fails_the_start(tmp_path: Path, daemon_factory: Any) -> None:
    # It answers /health at once but never says READY=1.
    health = {"ready": "notify", "start_timeout": "1s"}
    config = write_config(tmp_path, {"app": component(health=health)})
    d = daemon_factory(config)
    app = d.component("app")
    assert app["state"] == "failed" and app["active"] is None
    assert "sent no READY=1 within start_timeout 1s (health.ready: notify)" in app["last_error"]


@pytest.fixture
def service_manager(tmp_path: Path) -> Iterator[socket.socket]:
    """A fake systemd: the datagram socket NOTIFY_SOCKET names."""
    path = tmp_path / "systemd-notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.settimeout(20)
        yield sock


def heard(sock: socket.socket, *, until: str) -> list[dict[str, str]]:
    """The messages received up to the first that has the variable `until`."""
    messages = []
    while True:
        messages.append(parse(sock.recv(4096)))
        if until in messages[-1]:
            return messages


def test_the_daemon_speaks_sd_notify_to_its_service_manager(
    tmp_path: Path,
    daemon_factory: Any,
    service_manager: socket.socket,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", service_manager.getsockname())
    config = write_config(tmp_path, {"app": component()})
    old = daemon_factory(config)
    ready = heard(service_manager, until="READY")[-1]
    assert ready["READY"] == "1" and ready["STATUS"] == "1 of 1 component(s) running"
    # The instance talks to rotator, not to the service manager.
    inst = psutil.Process(old.component("app")["active"]["pid"])
    assert inst.environ()["NOTIFY_SOCKET"] == str(config.parent / "state" / "notify.sock")

    assert cli(config, "reload").returncode == 0
    reloading = heard(service_manager, until="RELOADING")[-1]
    assert reloading["RELOADING"] == "1"
    assert abs(int(reloading["MONOTONIC_USEC"]) - time.monotonic_ns() // 1000) < 10_000_000
    assert heard(service_manager, until="READY")[-1]["READY"] == "1"

    # A takeover started by hand (no NOTIFY_SOCKET of its own) learns the old daemon's.
    monkeypatch.delenv("NOTIFY_SOCKET")
    new = daemon_factory(config, args=("--takeover",))
    told = heard(service_manager, until="MAINPID")
    assert told[-1]["MAINPID"] == str(new.proc.pid)
    assert old.proc.wait(20) == 0
    assert heard(service_manager, until="READY")[-1]["READY"] == "1"

    new.stop()
    stopping = heard(service_manager, until="STOPPING")
    assert stopping[-1]["STOPPING"] == "1"
    # The old daemon said nothing of stopping when it handed over: the service went on.
    assert not any("STOPPING" in m for m in told)


def test_reload_rejected_still_says_ready(
    tmp_path: Path,
    daemon_factory: Any,
    service_manager: socket.socket,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", service_manager.getsockname())
    config = write_config(tmp_path, {"app": component()})
    d = daemon_factory(config)
    heard(service_manager, until="READY")
    config.write_text(config.read_text() + "\nbogus: 1\n")
    d.proc.send_signal(signal.SIGHUP)  # `rotator reload` would refuse it before the daemon
    assert "RELOADING" in heard(service_manager, until="RELOADING")[-1]
    assert heard(service_manager, until="READY")[-1]["READY"] == "1"


def test_a_service_manager_that_is_gone_is_reported_once(
    tmp_path: Path, daemon_factory: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody-listens.sock"))
    config = write_config(tmp_path, {"app": component()})
    d = daemon_factory(config)
    assert cli(config, "reload").returncode == 0  # RELOADING=1, READY=1: not said again
    assert d.component("app")["state"] == "running"
    d.stop()
    assert d.output().count("cannot notify the service manager") == 1, d.output()
