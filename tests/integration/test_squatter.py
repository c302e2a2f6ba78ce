"""A port squatter never gets the traffic: before the switch, the socket listening on
the new instance's port must be the instance's own, and no other one besides.

Real daemon, real instances, the real CLI; the squatter is a thread of the test that
does what any local user can: read the new instance's command line (ps), then bind
its port before the app does."""

from __future__ import annotations

import os
import re
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import psutil
import pytest

from tests.conftest import DEMO, Load, alive, cli, component, wait_until, write_config
from tests.integration.test_lifecycle import kill_daemon_only, up


class Squatter:
    """Waits for a demo process whose command line names `port`, then listens there
    (with SO_REUSEPORT when `share`), answering every request with `status` and
    keeping what it was asked."""

    def __init__(self, port: int, status: int, *, share: bool = False) -> None:
        self.port, self.status, self.share = port, status, share
        self.requests: list[str] = []
        self.listening = threading.Event()
        self.server: ThreadingHTTPServer | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Squatter:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)
        if self.server is not None:
            self.server.server_close()

    def _run(self) -> None:
        wanted = ["--port", str(self.port)]
        while not self._stop.is_set() and not self._started(wanted):
            time.sleep(0.002)
        if self._stop.is_set():
            return
        squatter = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                squatter.requests.append(self.path)
                self.send_response(squatter.status)
                self.send_header("Content-Length", "8")
                self.end_headers()
                self.wfile.write(b"squatted")

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler, False)
        if self.share:
            self.server.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        self.server.server_bind()
        self.server.server_activate()
        self.server.timeout = 0.05
        self.listening.set()
        while not self._stop.is_set():
            self.server.handle_request()

    @staticmethod
    def _started(wanted: list[str]) -> bool:
        for proc in psutil.process_iter(["cmdline"]):
            cmdline = proc.info["cmdline"] or []
            if "rotator.demo" in cmdline and any(
                cmdline[i : i + 2] == wanted for i in range(len(cmdline))
            ):
                return True
        return False


@pytest.fixture
def two_ports(tmp_path: Path) -> Iterator[tuple[Path, int]]:
    """A config whose second pool port is where the next instance goes: (config, port)."""
    spec = component(pool=2, command=DEMO + " --startup-delay 0.5 --reuse-port")
    yield write_config(tmp_path, {"web": spec}), spec["ports"][1]


@pytest.mark.parametrize("share", [False, True], ids=["first", "reuseport"])
def test_a_squatter_on_the_new_port_fails_the_restart_and_gets_no_request(
    two_ports: tuple[Path, int], daemon_factory, share: bool
) -> None:
    # first: it binds before the app and answers the health check, the app cannot bind.
    # reuseport: it shares the port with the app, which passes the health check itself.
    config, port = two_ports
    daemon = daemon_factory(config)
    old = daemon.component("web")["active"]["pid"]
    with Squatter(port, 503 if share else 200, share=share) as squatter:
        with Load(daemon.url("web"), clients=4) as load:
            restart = cli(config, "restart", "web")
        assert squatter.listening.is_set()
    assert restart.returncode == 1, restart.stdout + restart.stderr
    new = int(re.search(rf"started pid (\d+) on port {port}", restart.stdout)[1])  # type: ignore[index]
    me = f"pid {os.getpid()} ({psutil.Process().name()})"
    if share:
        assert f"port {port} is also held by {me}, besides the instance pid {new}" in restart.stderr
    else:
        assert f"port {port} is held by {me}, not by the instance pid {new}" in restart.stderr
    assert "not switching to it" in restart.stderr
    assert not alive(new)
    assert load.report.failed == 0, (load.report.failures, load.report.samples[:5])
    assert set(load.report.pids) == {old}
    assert set(squatter.requests) <= {"/health"}  # never a client's request
    after = daemon.component("web")
    assert after["active"]["pid"] == old and after["state"] == "running"
    assert after["restarts"] == 0


def test_an_instance_of_the_earlier_run_sharing_its_port_is_not_adopted(
    two_ports: tuple[Path, int], daemon_factory
) -> None:
    config, _ = two_ports
    first = up(daemon_factory, config)
    old = first.component("web")["active"]
    kill_daemon_only(first)
    with Squatter(old["port"], 200, share=True) as squatter:
        assert squatter.listening.wait(10)
        second = up(daemon_factory, config)
        me = f"pid {os.getpid()} ({psutil.Process().name()})"
        assert (
            f"not adopting pid {old['pid']}: port {old['port']} is also held by {me}"
            in second.output()
        )
        assert wait_until(lambda: not alive(old["pid"]), timeout=10)
        new = second.component("web")["active"]
        assert new["port"] != old["port"] and new["adopted"] is False
