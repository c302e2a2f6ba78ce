"""Socket activation: `rotator up` serves on listening sockets it inherits (systemd's
LISTEN_FDS protocol) instead of binding, including connections that queued on them
before it was ready; a socket named after no component is closed with a warning, a
socket bound elsewhere than its component's address stops the start."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import yaml

from tests.conftest import PY, RunningDaemon, component, free_ports, write_config

REPO = Path(__file__).resolve().parents[2]
# Moves the inherited sockets to fds 3, 4, ... and execs rotator with LISTEN_PID set to
# its own pid, which exec keeps: what systemd and systemd-socket-activate do.
WRAPPER = """
import fcntl, os, sys
fds = [int(fd) for fd in sys.argv[1].split(",")]
moved = [fcntl.fcntl(fd, fcntl.F_DUPFD, 100) for fd in fds]
for fd in fds:
    os.close(fd)
for i, fd in enumerate(moved):
    os.dup2(fd, 3 + i)
    os.close(fd)
os.environ["LISTEN_PID"] = str(os.getpid())
os.execv(sys.executable, [sys.executable, *sys.argv[2:]])
"""


def listening(port: int) -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", port))
    sock.listen(16)
    return sock


class ActivatedDaemon(RunningDaemon):
    """`rotator up` started the way a service manager starts it: by `argv`, with
    the sockets and variables the manager hands over."""

    def __init__(self, config: Path, argv: list[str], env: dict[str, str], fds: list[int]):
        self.config = config
        self.data = yaml.safe_load(config.read_text())
        self.admin = f"http://{self.data['admin']['listen']}"
        self.log = config.parent / "daemon.out"
        self.errors = config.parent / "daemon.err"
        with self.log.open("wb") as out, self.errors.open("wb") as err:
            self.proc = subprocess.Popen(
                argv,
                cwd=REPO,
                env=env,
                pass_fds=fds,
                stdout=out,
                stderr=err,
                start_new_session=True,
            )
        self.pids_seen: set[int] = set()

    def output(self) -> str:
        return self.log.read_text(errors="replace") + self.errors.read_text(errors="replace")


@pytest.fixture
def activated(tmp_path: Path) -> Iterator[Any]:
    started: list[ActivatedDaemon] = []

    def start(config: Path, sockets: dict[str, socket.socket]) -> ActivatedDaemon:
        env = {
            **os.environ,
            "LISTEN_FDS": str(len(sockets)),
            "LISTEN_FDNAMES": ":".join(sockets),
        }
        fds = [s.fileno() for s in sockets.values()]
        argv = [PY, "-c", WRAPPER, ",".join(map(str, fds)), "-m", "rotator", "up"]
        d = ActivatedDaemon(config, [*argv, "-c", str(config)], env, fds)
        started.append(d)
        return d

    yield start
    for d in started:
        d.stop()
        d.kill_everything()
        print(f"---- daemon output:\n{d.output()}")


def get(port: int, sock: socket.socket | None = None) -> tuple[int, dict[str, Any]]:
    """One GET on a raw connection (given, or new); status and JSON body."""
    if sock is None:
        sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    with sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


def listening_fds(pid: int, port: int) -> list[int]:
    return [
        c.fd
        for c in psutil.Process(pid).net_connections(kind="tcp")
        if c.status == psutil.CONN_LISTEN and c.laddr.port == port
    ]


def config_for(tmp_path: Path, *names: str) -> tuple[Path, dict[str, int]]:
    components = {name: component(pool=2, hold_timeout="20s") for name in names}
    ports = {name: int(c["listen"].rsplit(":", 1)[1]) for name, c in components.items()}
    return write_config(tmp_path, components), ports


def test_serves_inherited_sockets_and_what_queued_before_it_was_ready(
    tmp_path: Path, activated: Any
) -> None:
    config, ports = config_for(tmp_path, "web", "api")
    sockets = {name: listening(port) for name, port in ports.items()}
    # Accepted by the kernel into the backlog while nothing serves the socket yet.
    early = socket.create_connection(("127.0.0.1", ports["web"]), timeout=30)
    early.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    d = activated(config, sockets)
    for s in sockets.values():
        s.close()  # the daemon has its own copies now, as under systemd
    status, body = get(ports["web"], early)
    assert status == 200 and body["name"] == "web"
    d.wait_running()
    assert get(ports["api"])[1]["name"] == "api"
    out = d.output()
    assert "web: serving on the activated socket fd 3" in out
    assert "api: serving on the activated socket fd 4" in out
    if sys.platform.startswith("linux"):  # psutil names a socket's fd on Linux only
        assert listening_fds(d.proc.pid, ports["web"]) == [3]  # not bound anew
        assert listening_fds(d.proc.pid, ports["api"]) == [4]
    # Instances must not see variables that were meant for the daemon.
    instance = psutil.Process(body["pid"])
    assert not {"LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES"} & set(instance.environ())
    assert d.stop() == 0


def test_a_socket_named_after_no_component_is_closed_with_a_warning(
    tmp_path: Path, activated: Any
) -> None:
    config, ports = config_for(tmp_path, "web", "api")
    stray_port = free_ports(1)[0]
    # api has no socket: it binds its address itself, as without activation.
    sockets = {"web": listening(ports["web"]), "typo": listening(stray_port)}
    d = activated(config, sockets)
    for s in sockets.values():
        s.close()
    d.wait_running()
    assert get(ports["web"])[1]["name"] == "web"
    assert get(ports["api"])[1]["name"] == "api"
    assert "activated socket fd 4 (127.0.0.1:" in d.output()
    assert "is named 'typo', which is no component (have: web, api); closing it" in d.output()
    with pytest.raises(ConnectionRefusedError):  # its last copy was the daemon's
        socket.create_connection(("127.0.0.1", stray_port), timeout=5).close()


@pytest.mark.parametrize("case", ["elsewhere", "not listening"])
def test_a_socket_that_does_not_fit_stops_the_start(
    tmp_path: Path, activated: Any, case: str
) -> None:
    config, ports = config_for(tmp_path, "web")
    if case == "elsewhere":
        sock = listening(free_ports(1)[0])
        expected = f"rotator: components.web.listen is 127.0.0.1:{ports['web']} but the socket"
    else:
        sock = socket.socket()
        sock.bind(("127.0.0.1", ports["web"]))
        expected = "rotator: the activated socket 'web' (fd 3) is not listening"
    d = activated(config, {"web": sock})
    sock.close()
    assert d.proc.wait(30) == 1
    errors = d.errors.read_text()
    assert errors.startswith(expected) and errors.count("\n") == 1, errors
    assert "Traceback" not in d.output()


@pytest.mark.skipif(
    shutil.which("systemd-socket-activate") is None, reason="systemd-socket-activate is missing"
)
def test_under_systemd_socket_activate(tmp_path: Path) -> None:
    config, ports = config_for(tmp_path, "web")
    argv = ["systemd-socket-activate", "-l", f"127.0.0.1:{ports['web']}", "--fdname=web"]
    argv += ["-E", "PATH", PY, "-m", "rotator", "up", "-c", str(config)]
    d = ActivatedDaemon(config, argv, dict(os.environ), [])
    try:
        # It binds, waits for the first connection, then execs rotator with the socket.
        deadline = time.monotonic() + 10
        while True:
            try:
                first = socket.create_connection(("127.0.0.1", ports["web"]), timeout=30)
                break
            except ConnectionRefusedError:
                assert time.monotonic() < deadline, d.output()
                time.sleep(0.05)
        assert get(ports["web"], first)[1]["name"] == "web"
        d.wait_running()
        assert "web: serving on the activated socket fd 3" in d.output()
        assert d.stop() == 0
    finally:
        d.stop()
        d.kill_everything()
        print(f"---- output:\n{d.output()}")
