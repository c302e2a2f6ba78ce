"""The demo component as a real subprocess: every route and every misbehaviour flag."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest

pytestmark = pytest.mark.skipif(os.name != "posix", reason="process groups and signals are POSIX")

ROOT = Path(__file__).resolve().parents[2]
HOST = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


class Demo:
    def __init__(self, args: list[str], env: dict[str, str], log: Path) -> None:
        self.log = log
        self.port = int(args[args.index("--port") + 1]) if "--port" in args else 0
        full_env = {k: v for k, v in os.environ.items() if k not in ("PORT", "HOST", "NAME")}
        full_env.update(PYTHONPATH=str(ROOT), **env)
        with log.open("wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "rotator.demo", *args],
                cwd=ROOT,
                env=full_env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own group: the finalizer kills the whole tree
            )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for_output(self, pattern: str, timeout: float = 10) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if m := re.search(pattern, self.output()):
                return m
            if self.proc.poll() is not None:
                break
            time.sleep(0.02)
        raise AssertionError(f"no {pattern!r} in demo output: {self.output()!r}")

    def wait_listening(self) -> Demo:
        m = self.wait_for_output(r"listening on \S+:(\d+)")
        self.port = int(m.group(1))
        return self

    def get(self, path: str, **kw: object) -> tuple[int, http.client.HTTPMessage, bytes]:
        return request(self.port, "GET", path, **kw)  # type: ignore[arg-type]

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def request(
    port: int,
    method: str,
    path: str,
    body: bytes | Iterator[bytes] | None = None,
    headers: dict[str, str] | None = None,
    **kw: object,
) -> tuple[int, http.client.HTTPMessage, bytes]:
    conn = http.client.HTTPConnection(HOST, port, timeout=10)
    try:
        conn.request(method, path, body=body, headers=headers or {}, **kw)  # type: ignore[arg-type]
        resp = conn.getresponse()
        return resp.status, resp.msg, resp.read()
    finally:
        conn.close()


StartDemo = Callable[..., Demo]


@pytest.fixture
def start_demo(tmp_path: Path) -> Iterator[StartDemo]:
    started: list[Demo] = []

    def start(*args: str, env: dict[str, str] | None = None) -> Demo:
        demo = Demo(list(args), env or {}, tmp_path / f"demo{len(started)}.log")
        started.append(demo)
        return demo

    yield start
    for demo in started:
        demo.kill()


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Demo]:
    port = free_port()
    log = tmp_path_factory.mktemp("demo") / "demo.log"
    d = Demo(["--port", str(port), "--name", "alpha"], {}, log)
    try:
        yield d.wait_listening()
    finally:
        d.kill()


def test_health_and_instance_headers(demo: Demo) -> None:
    status, headers, body = demo.get("/health")
    assert (status, body) == (200, b"ok")
    assert headers["X-Instance-Pid"] == str(demo.pid)
    assert headers["X-Instance-Port"] == str(demo.port)
    assert f"demo alpha pid {demo.pid} listening on {HOST}:{demo.port}" in demo.output()


def test_index_describes_instance_and_request(demo: Demo) -> None:
    status, _, body = demo.get("/some/path?x=1&y=%20z")
    assert status == 200
    assert json.loads(body) == {
        "name": "alpha",
        "pid": demo.pid,
        "port": demo.port,
        "method": "GET",
        "path": "/some/path",
        "query": "x=1&y=%20z",
    }
    assert json.loads(demo.get("/")[2])["path"] == "/"


def test_slow_sleeps(demo: Demo) -> None:
    started = time.monotonic()
    status, _, body = demo.get("/slow?seconds=0.2")
    assert time.monotonic() - started >= 0.2
    assert status == 200 and json.loads(body)["pid"] == demo.pid


def test_bytes_returns_n_patterned_bytes(demo: Demo) -> None:
    n = 3 * 65536 + 123
    status, headers, body = demo.get(f"/bytes?n={n}")
    assert status == 200 and headers["Content-Length"] == str(n)
    assert body == bytes(i % 256 for i in range(n))
    assert demo.get("/bytes?n=0")[2] == b""


def test_echo_streams_body_back(demo: Demo) -> None:
    payload = os.urandom(300_000)
    status, headers, body = request(
        demo.port, "POST", "/echo", payload, {"Content-Type": "application/x-test; v=1"}
    )
    assert status == 200 and body == payload
    assert headers["Content-Type"] == "application/x-test; v=1"
    assert headers["X-Echo-Length"] == str(len(payload))


def test_echo_chunked_upload_has_no_length(demo: Demo) -> None:
    parts = [b"a" * 1000, b"b" * 70000, b"c"]
    status, headers, body = request(demo.port, "POST", "/echo", iter(parts), encode_chunked=True)
    assert status == 200 and body == b"".join(parts)
    assert "X-Echo-Length" not in headers


def test_headers_reports_request_as_received(demo: Demo) -> None:
    conn = http.client.HTTPConnection(HOST, demo.port, timeout=10)
    try:
        conn.putrequest("GET", "/headers?a=%20b&c", skip_accept_encoding=True)
        conn.putheader("X-Multi", "one")
        conn.putheader("X-Multi", "two")
        conn.endheaders()
        resp = conn.getresponse()
        data = json.loads(resp.read())
    finally:
        conn.close()
    assert data["method"] == "GET"
    assert data["path_qs"] == "/headers?a=%20b&c"
    assert data["http_version"] == "1.1"
    assert [h for h in data["headers"] if h[0] == "X-Multi"] == [
        ["X-Multi", "one"],
        ["X-Multi", "two"],
    ]
    assert ["Host", f"{HOST}:{demo.port}"] in data["headers"]


def test_chunked_response(demo: Demo) -> None:
    status, headers, body = demo.get("/chunked?n=4")
    assert status == 200 and headers["Transfer-Encoding"] == "chunked"
    assert body == b"chunk 0\nchunk 1\nchunk 2\nchunk 3\n"


def test_cookies_sets_two_cookies(demo: Demo) -> None:
    _, headers, _ = demo.get("/cookies")
    cookies = headers.get_all("Set-Cookie") or []
    assert len(cookies) == 2
    assert cookies[0].startswith("a=1") and cookies[1].startswith("b=2")


@pytest.mark.parametrize("code", [201, 204, 404, 418, 503])
def test_status_route(demo: Demo, code: int) -> None:
    status, headers, body = demo.get(f"/status/{code}")
    assert (status, body) == (code, b"")
    assert headers["X-Instance-Pid"] == str(demo.pid)


def test_close_flag_closes_every_connection_server_side(start_demo: StartDemo) -> None:
    d = start_demo("--port", str(free_port()), "--close").wait_listening()
    with socket.create_connection((HOST, d.port), timeout=5) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        data = b""
        while chunk := sock.recv(65536):  # ends only because the server closes
            data += chunk
    head = data.split(b"\r\n\r\n")[0].lower()
    assert head.startswith(b"http/1.1 200") and b"\r\nconnection: close" in head
    if sys.platform.startswith("linux"):  # the server closed first: TIME_WAIT on its port
        time.sleep(0.05)
        conns = psutil.net_connections(kind="tcp")
        assert any(
            getattr(c.laddr, "port", None) == d.port and c.status == psutil.CONN_TIME_WAIT
            for c in conns
        )


def test_crash_on_start_exits_3_quickly(start_demo: StartDemo) -> None:
    port = free_port()
    d = start_demo("--port", str(port), "--crash-on-start")
    assert d.proc.wait(5) == 3
    assert "crash" in d.output()
    with socket.socket() as sock:  # it never bound
        sock.bind((HOST, port))


def test_port_taken_exits_1_with_message(start_demo: StartDemo) -> None:
    with socket.socket() as holder:
        holder.bind((HOST, 0))
        holder.listen()
        d = start_demo("--port", str(holder.getsockname()[1]))
        assert d.proc.wait(10) == 1
    assert "cannot listen on" in d.output()


def test_never_healthy(start_demo: StartDemo) -> None:
    d = start_demo("--port", str(free_port()), "--never-healthy").wait_listening()
    assert d.get("/health")[0] == 503
    assert d.get("/")[0] == 200


def test_sigterm_drains_and_exits_0(start_demo: StartDemo) -> None:
    # Port, name from the environment; port 0 picks any and the log says which.
    d = start_demo(env={"PORT": "0", "NAME": "envname"}).wait_listening()
    assert json.loads(d.get("/")[2])["name"] == "envname"
    idle = http.client.HTTPConnection(HOST, d.port, timeout=5)  # idle keep-alive connection
    idle.request("GET", "/health")
    idle.getresponse().read()
    results: list[int] = []
    slow = threading.Thread(target=lambda: results.append(d.get("/slow?seconds=0.5")[0]))
    slow.start()
    time.sleep(0.2)  # the slow request is in flight
    started = time.monotonic()
    d.proc.send_signal(signal.SIGTERM)
    assert d.proc.wait(3) == 0
    slow.join(5)
    idle.close()
    assert time.monotonic() - started < 3
    assert results == [200]
    assert f"demo envname pid {d.pid} stopping" in d.output()


def test_ignore_sigterm_needs_sigkill(start_demo: StartDemo) -> None:
    d = start_demo("--port", str(free_port()), "--ignore-sigterm").wait_listening()
    d.proc.send_signal(signal.SIGTERM)
    with pytest.raises(subprocess.TimeoutExpired):
        d.proc.wait(0.5)
    assert d.get("/health")[0] == 200
    d.proc.send_signal(signal.SIGKILL)
    assert d.proc.wait(3) == -signal.SIGKILL


def gone(proc: psutil.Process) -> bool:
    try:
        return proc.status() == psutil.STATUS_ZOMBIE  # orphans may linger unreaped in containers
    except psutil.NoSuchProcess:
        return True


def test_spawn_child_stays_in_process_group(start_demo: StartDemo) -> None:
    d = start_demo("--port", str(free_port()), "--spawn-child").wait_listening()
    child = psutil.Process(int(d.wait_for_output(r"spawned child pid (\d+)").group(1)))
    assert child.ppid() == d.pid
    assert os.getpgid(child.pid) == os.getpgid(d.pid) == d.pid
    d.kill()  # kills the group
    deadline = time.monotonic() + 3
    while not gone(child) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert gone(child)


def test_startup_delay_postpones_binding(start_demo: StartDemo) -> None:
    started = time.monotonic()
    start_demo("--port", str(free_port()), "--startup-delay", "0.5").wait_listening()
    assert time.monotonic() - started >= 0.5


def test_port_is_required(start_demo: StartDemo) -> None:
    d = start_demo()
    assert d.proc.wait(10) == 2
    assert "--port or $PORT is required" in d.output()
