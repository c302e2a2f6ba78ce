"""Descriptor exhaustion: a real daemon started with a small RLIMIT_NOFILE keeps every
address and its admin API answering under a flood of idle client connections, raises
its soft limit at start, and gives its instances the limit it was started with."""

from __future__ import annotations

import json
import resource
import socket
import urllib.request
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.conftest import cli, component, parse_samples, sample, wait_until, write_config

FLOOD = 1100  # idle connections, more than the daemon's whole descriptor table
CAP = 384  # max_clients auto for a limit of 1024 (clients.total_cap)
EXHAUSTION = ("Too many open files", "EMFILE", "out of system resource")


def own_limit_at_least(n: int) -> None:
    """This test process opens the flood: its soft limit must allow it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < n:
        if hard != resource.RLIM_INFINITY and hard < n:
            pytest.skip(f"the hard descriptor limit ({hard}) is below {n}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (n, hard))


def get(url: str) -> tuple[int, bytes]:
    with urllib.request.urlopen(url, timeout=5) as resp:
        return resp.status, resp.read()


def closed_by_peer(sock: socket.socket) -> bool:
    sock.setblocking(False)
    try:
        return sock.recv(1) == b""
    except BlockingIOError:
        return False
    except OSError:  # reset
        return True


def metrics(admin: str) -> Any:
    with urllib.request.urlopen(admin + "/metrics", timeout=5) as resp:
        return parse_samples(resp.read().decode())


@pytest.mark.parametrize("event_loop", ["uvloop", "asyncio"])
def test_an_idle_flood_at_1024_descriptors_leaves_everything_answering(
    tmp_path: Path, daemon_factory: Any, event_loop: str
) -> None:
    if event_loop == "uvloop":
        pytest.importorskip("uvloop")
    own_limit_at_least(FLOOD + 256)
    config = write_config(tmp_path, {"a": component(), "b": component()})
    daemon = daemon_factory(config, fd_limit=(1024, 1024), event_loop=event_loop)
    assert f"event loop {event_loop}, max_clients {CAP} (descriptor limit 1024)" in (
        daemon.output()
    )
    host, port = daemon.data["components"]["a"]["listen"].rsplit(":", 1)
    flood: list[socket.socket] = []
    try:
        for _ in range(FLOOD):
            flood.append(socket.create_connection((host, int(port)), timeout=5))
        # The daemon made room by closing the ones idle longest: the first ones.
        assert wait_until(lambda: closed_by_peer(flood[0]), timeout=10), daemon.output()

        def accepted() -> float:
            samples = metrics(daemon.admin)
            return sum(
                sample(samples, name, component="a") or 0
                for name in (
                    "rotator_client_connections",
                    "rotator_client_connections_evicted_total",
                )
            )

        assert wait_until(lambda: accepted() == FLOOD), accepted()
        samples = metrics(daemon.admin)
        # Each time room is made, a batch goes (an eighth of the idle ones, at most 32).
        assert CAP - 32 < sample(samples, "rotator_client_connections", component="a") <= CAP
        # A new client of the flooded component, another component, the admin API.
        assert get(daemon.url("a"))[0] == 200
        assert get(daemon.url("b"))[0] == 200
        status = cli(config, "status", "--json")
        assert status.returncode == 0, status.stderr
        assert {c["name"]: c["state"] for c in json.loads(status.stdout)["components"]} == {
            "a": "running",
            "b": "running",
        }
        samples = metrics(daemon.admin)
        evicted = sample(samples, "rotator_client_connections_evicted_total", component="a")
        assert evicted is not None and evicted >= FLOOD - CAP
        assert sample(samples, "rotator_client_connections_refused_total", component="a") == 0
        # The newest of the flood are still open: only the longest idle made room.
        assert not any(closed_by_peer(sock) for sock in flood[-CAP // 2 :])
        open_fds = sample(samples, "process_open_fds")
        assert open_fds is not None and open_fds < 1024
    finally:
        for sock in flood:
            sock.close()
    output = daemon.output()
    assert not [line for line in output.splitlines() if any(s in line for s in EXHAUSTION)]
    assert "max_clients 384 over all components reached" in output


def test_the_soft_limit_is_raised_and_instances_get_the_one_rotator_started_with(
    tmp_path: Path, daemon_factory: Any
) -> None:
    if not hasattr(psutil.Process, "rlimit"):
        pytest.skip("psutil reads another process's limits on Linux and FreeBSD only")
    config = write_config(tmp_path, {"a": component()})
    daemon = daemon_factory(config, fd_limit=(512, 2048))
    assert "max_clients 768 (descriptor limit 2048)" in daemon.output()
    assert psutil.Process(daemon.proc.pid).rlimit(psutil.RLIMIT_NOFILE) == (2048, 2048)
    instance = daemon.component("a")["active"]["pid"]
    assert psutil.Process(instance).rlimit(psutil.RLIMIT_NOFILE) == (512, 2048)


def test_max_clients_above_what_the_limit_allows_is_lowered_and_a_reload_sets_it_anew(
    tmp_path: Path, daemon_factory: Any
) -> None:
    config = write_config(tmp_path, {"a": component()}, max_clients=5000)
    daemon = daemon_factory(config, fd_limit=(1024, 1024))
    output = daemon.output()
    assert "max_clients 384 (descriptor limit 1024)" in output
    assert "warning: max_clients 5000 lowered to 384: the descriptor limit" in output
    config.write_text(config.read_text().replace("max_clients: 5000", "max_clients: 1"))
    reload = cli(config, "reload")
    assert reload.returncode == 0, reload.stderr
    assert wait_until(lambda: "rotator: reload: max_clients 384 -> 1" in daemon.output())
    host, port = daemon.data["components"]["a"]["listen"].rsplit(":", 1)
    with socket.create_connection((host, int(port))) as first:
        assert wait_until(
            lambda: sample(metrics(daemon.admin), "rotator_client_connections", component="a") == 1
        )
        assert get(daemon.url("a"))[0] == 200  # made room: the idle one went
        assert wait_until(lambda: closed_by_peer(first))
