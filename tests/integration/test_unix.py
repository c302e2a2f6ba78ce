"""Unix-socket backends (`transport: unix`), end to end: a real daemon, real instances
listening on Unix sockets behind the public TCP address, real load, the real CLI."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import tempfile
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import PY, Load, alive, cli, free_ports, wait_until, write_config

DEMO_UNIX = f"{PY} -m rotator.demo --unix {{socket}} --name {{name}}"


@pytest.fixture
def state_dir() -> Iterator[Path]:
    """A short state_dir: socket paths must fit in a sockaddr_un (about 100 bytes), and
    pytest's tmp_path can be long (macOS)."""
    path = Path(tempfile.mkdtemp(prefix="rot-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def unix_component(command: str = DEMO_UNIX, **extra: Any) -> dict[str, Any]:
    return {
        "listen": f"127.0.0.1:{free_ports(1)[0]}",
        "transport": "unix",
        "command": command,
        **extra,
    }


def get(url: str) -> tuple[int, dict[str, str], Any]:
    with urllib.request.urlopen(url, timeout=10) as resp:
        return resp.status, dict(resp.headers), json.load(resp)


def socket_files(state_dir: Path) -> list[str]:
    directory = state_dir / "sockets"
    return sorted(os.listdir(directory)) if directory.exists() else []


def stale_socket(path: Path) -> None:
    """A socket file nobody listens on: what a server killed with SIGKILL leaves."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.bind(str(path))


def test_unix_component_serves_through_its_public_tcp_address(
    tmp_path: Path, state_dir: Path, daemon_factory
) -> None:
    config = write_config(tmp_path, {"web": unix_component()}, state_dir=str(state_dir))
    daemon = daemon_factory(config)
    active = daemon.component("web")["active"]
    path = str(state_dir / "sockets" / "web.0.sock")
    assert active["port"] is None and active["socket"] == path
    code, headers, body = get(daemon.url("web", "/hello?x=1"))
    assert code == 200 and body["path"] == "/hello" and body["query"] == "x=1"
    assert headers["X-Instance-Socket"] == path and headers["X-Instance-Port"] == "0"
    assert int(headers["X-Instance-Pid"]) == active["pid"]
    assert (state_dir / "sockets").stat().st_mode & 0o077 == 0
    # Recorded with its path: adopted after a daemon crash (see the test below).
    state = json.loads((state_dir / "state.json").read_text())
    (record,) = state["components"]["web"]["instances"]
    assert record["socket"] == path and record["port"] is None and record["pid"] == active["pid"]
    status = cli(config, "status")
    assert status.returncode == 0 and "web" in status.stdout, status.stderr
    assert cli(config, "down").returncode == 0
    assert daemon.proc.wait(20) == 0
    assert not alive(active["pid"])
    assert socket_files(state_dir) == []  # removed once the instance stopped


def test_ten_restarts_under_load_lose_nothing_and_leave_no_socket_files(
    tmp_path: Path, state_dir: Path, daemon_factory
) -> None:
    config = write_config(tmp_path, {"web": unix_component()}, state_dir=str(state_dir))
    daemon = daemon_factory(config)
    pids = {daemon.component("web")["active"]["pid"]}
    used: list[str] = []
    with Load(daemon.url("web"), clients=8) as load:
        for i in range(10):
            result = cli(config, "restart", "web")
            assert result.returncode == 0, f"restart {i}: {result.stdout}{result.stderr}"
            assert "switched web." in result.stdout and "stopped pid" in result.stdout
            active = daemon.component("web")["active"]
            pids.add(active["pid"])
            used.append(os.path.basename(active["socket"]))
    report = load.report
    assert report.failed == 0, (report.failures, report.samples[:5])
    assert report.ok > 100
    assert len(report.pids) >= 5  # traffic really moved from instance to instance
    status = daemon.component("web")
    assert status["restarts"] == 10 and status["draining"] == []
    current = status["active"]["pid"]
    assert len(pids) == 11
    assert not [pid for pid in pids - {current} if alive(pid)]
    # Round-robin through the default pool of 4, starting after web.0.
    assert used[:5] == ["web.1.sock", "web.2.sock", "web.3.sock", "web.0.sock", "web.1.sock"]
    # Only the active instance's socket is left; the stopped ones' files are gone.
    assert socket_files(state_dir) == [os.path.basename(status["active"]["socket"])]


def test_stale_socket_file_is_removed_and_a_foreign_listener_skipped(
    tmp_path: Path, state_dir: Path, daemon_factory
) -> None:
    # This instance refuses to start where a file is left, as a plain bind() would fail:
    # only rotator removing the stale file lets it start.
    script = tmp_path / "instance.sh"
    script.write_text(
        f"""#!/bin/sh
if [ -e "$ROTATOR_SOCKET" ]; then echo "socket file exists: $ROTATOR_SOCKET"; exit 7; fi
exec {DEMO_UNIX.replace("{socket}", '"$ROTATOR_SOCKET"').replace("{name}", "web")}
"""
    )
    config = write_config(
        tmp_path, {"web": unix_component(f"sh {script}")}, state_dir=str(state_dir)
    )
    daemon = daemon_factory(config)
    sockets = state_dir / "sockets"
    assert daemon.component("web")["active"]["socket"] == str(sockets / "web.0.sock")
    stale_socket(sockets / "web.1.sock")
    with Load(daemon.url("web"), clients=4) as load:
        result = cli(config, "restart", "web")
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"removed the stale socket file {sockets / 'web.1.sock'}" in result.stdout
    assert daemon.component("web")["active"]["socket"] == str(sockets / "web.1.sock")
    assert load.report.failed == 0, load.report.failures

    # Someone else listens on web.2.sock: it is skipped like a busy port, and left alone.
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as foreign:
        foreign.bind(str(sockets / "web.2.sock"))
        foreign.listen()
        result = cli(config, "restart", "web")
        assert result.returncode == 0, result.stdout + result.stderr
        assert daemon.component("web")["active"]["socket"] == str(sockets / "web.3.sock")
        assert (sockets / "web.2.sock").exists()
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            client.connect(str(sockets / "web.2.sock"))  # still the foreign listener's


def test_killed_unix_instance_is_replaced_and_its_socket_removed(
    tmp_path: Path, state_dir: Path, daemon_factory
) -> None:
    spec = unix_component(restart_backoff="100ms", hold_timeout="5s")
    config = write_config(tmp_path, {"web": spec}, state_dir=str(state_dir))
    daemon = daemon_factory(config)
    old = daemon.component("web")["active"]
    with Load(daemon.url("web"), clients=8) as load:
        assert wait_until(lambda: load.report.ok > 200)
        os.kill(old["pid"], signal.SIGKILL)  # leaves its socket file behind
        assert wait_until(
            lambda: (daemon.component("web")["active"] or {}).get("pid") not in (None, old["pid"])
        )
        served = load.report.ok
        assert wait_until(lambda: load.report.ok > served + 50)
    assert load.report.failed == 0, (load.report.failures, load.report.samples[:5])
    new = daemon.component("web")["active"]
    assert new["socket"] != old["socket"]
    assert wait_until(lambda: socket_files(state_dir) == [os.path.basename(new["socket"])])


def test_unix_instances_of_a_killed_daemon_are_adopted(
    tmp_path: Path, state_dir: Path, daemon_factory
) -> None:
    config = write_config(tmp_path, {"web": unix_component()}, state_dir=str(state_dir))
    first = daemon_factory(config)
    old = first.component("web")["active"]
    first.proc.kill()  # the daemon only: its instance lives on
    first.proc.wait(10)
    first.log = first.log.rename(first.log.with_name("daemon-first.out"))
    assert alive(old["pid"])

    second = daemon_factory(config)
    new = second.component("web")["active"]
    assert new["pid"] == old["pid"] and new["adopted"] is True
    assert new["socket"] == old["socket"]
    code, headers, _ = get(second.url("web"))
    assert code == 200 and int(headers["X-Instance-Pid"]) == old["pid"]
    # The next rotation moves on to another path of the pool, and removes the old file.
    assert cli(config, "restart", "web").returncode == 0
    newest = second.component("web")["active"]
    assert newest["socket"] != old["socket"] and not alive(old["pid"])
    assert socket_files(state_dir) == [os.path.basename(newest["socket"])]


def test_max_connections_from_the_config_reaches_the_proxy(
    tmp_path: Path, state_dir: Path, daemon_factory
) -> None:
    spec = unix_component(max_connections=1, hold_timeout="300ms")
    config = write_config(tmp_path, {"web": spec}, state_dir=str(state_dir))
    daemon = daemon_factory(config)
    slow: dict[str, int] = {}

    def request() -> None:
        slow["status"] = get(daemon.url("web", "/slow?seconds=2"))[0]

    thread = threading.Thread(target=request)
    thread.start()
    assert wait_until(lambda: daemon.component("web")["in_flight"] == 1)
    with pytest.raises(urllib.error.HTTPError) as refused:
        get(daemon.url("web"))  # the one slot is taken: held 300ms, then 503
    assert refused.value.code == 503
    thread.join(10)
    assert slow == {"status": 200}
    assert get(daemon.url("web"))[0] == 200  # the slot is free again
