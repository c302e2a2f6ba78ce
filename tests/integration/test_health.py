"""Health checks against real servers on 127.0.0.1."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator

import pytest

from rotator.config import Endpoint, HealthSpec
from rotator.health import HealthCheck, NotHealthy
from rotator.ports import PortState, probe_port
from tests.conftest import free_ports, wait_until

HOST = "127.0.0.1"


@contextlib.contextmanager
def demo(*flags: str) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    port = free_ports(1)[0]
    proc = subprocess.Popen(
        [sys.executable, "-m", "rotator.demo", "--port", str(port), *flags],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        yield proc, port
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def check(**spec: object) -> HealthCheck:
    return HealthCheck(HealthSpec(**{"timeout": 1.0, "start_timeout": 5.0, **spec}))  # type: ignore[arg-type]


def test_probes_leave_no_time_wait_on_the_instance_port() -> None:
    # The port must be clean for the next instance once this one is gone.
    with demo() as (proc, port):
        health = check()

        async def probes() -> list[str | None]:
            await health.wait_until_healthy(Endpoint(HOST, port), asyncio.Event().wait())
            results = [await health.probe(Endpoint(HOST, port)) for _ in range(20)]
            health.forget(Endpoint(HOST, port))  # as the component does before it stops an instance
            await asyncio.sleep(0.05)
            return results

        assert asyncio.run(probes()) == [None] * 20
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)
    assert probe_port(HOST, port) is PortState.FREE


def test_unhealthy_answers_are_described() -> None:
    with demo("--never-healthy") as (_, port):
        health = check()

        async def scenario() -> None:
            assert wait_until(lambda: probe_port(HOST, port) is PortState.BUSY, timeout=10)
            assert await health.probe(Endpoint(HOST, port)) == "/health answered 503"
            assert (
                await check(path="/status/302").probe(Endpoint(HOST, port)) is None
            )  # 3xx counts as healthy

        asyncio.run(scenario())
    assert (
        asyncio.run(check().probe(Endpoint(HOST, free_ports(1)[0])))
        == "/health: connection refused"
    )


def test_silent_and_garbage_servers() -> None:
    silent = socket.socket()
    silent.bind((HOST, 0))
    silent.listen()
    port = silent.getsockname()[1]

    async def garbage_server() -> int:
        async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.read(1000)
            writer.write(b"SSH-2.0-OpenSSH_9.0\r\n\r\n")
            await writer.drain()
            writer.close()

        server = await asyncio.start_server(answer, HOST, 0)
        garbage = server.sockets[0].getsockname()[1]
        try:
            assert (
                await check(timeout=0.3).probe(Endpoint(HOST, port))
                == "/health did not answer within 300ms"
            )
            assert (
                await check().probe(Endpoint(HOST, garbage))
                == "/health: answered something that is not HTTP"
            )
        finally:
            server.close()
        return garbage

    try:
        asyncio.run(garbage_server())
    finally:
        silent.close()


def test_wait_until_healthy_fails_fast_when_the_process_exits() -> None:
    with demo("--crash-on-start") as (proc, port):

        async def scenario() -> None:
            loop = asyncio.get_running_loop()
            exited = loop.run_in_executor(None, proc.wait)
            with pytest.raises(NotHealthy, match="exited with code 3 before becoming healthy"):
                await asyncio.wait_for(check().wait_until_healthy(Endpoint(HOST, port), exited), 4)

        asyncio.run(scenario())


def test_wait_until_healthy_gives_up_after_start_timeout() -> None:
    with demo("--never-healthy") as (_, port):

        async def scenario() -> None:
            health = check(start_timeout=1.0)
            with pytest.raises(
                NotHealthy,
                match=r"not healthy within start_timeout 1s \(last check: /health answered 503\)",
            ):
                await health.wait_until_healthy(Endpoint(HOST, port), asyncio.Event().wait())

        asyncio.run(scenario())


class CountingServer:
    """A tiny HTTP server in the test's loop: counts connections, answers every request
    200, optionally with `Connection: close`, or closes each connection `idle_close`
    seconds after answering (an idle timeout shorter than the probe interval)."""

    def __init__(self, close: bool = False, idle_close: float | None = None) -> None:
        self.close, self.idle_close = close, idle_close
        self.accepted = 0
        self.closed_by_peer = 0
        self.port = 0

    async def start(self) -> asyncio.Server:
        server = await asyncio.start_server(self._serve, HOST, 0)
        self.port = server.sockets[0].getsockname()[1]
        return server

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        extra = "Connection: close\r\n" if self.close else ""
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                assert head.startswith(b"GET /health HTTP/1.1")
                writer.write(f"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n{extra}\r\nok".encode())
                if self.close:
                    break
                if self.idle_close is not None:
                    await asyncio.sleep(self.idle_close)
                    break
        except asyncio.IncompleteReadError:
            self.closed_by_peer += 1
        writer.close()


def probe_many(server: CountingServer, count: int, pause: float = 0.0) -> list[str | None]:
    async def run() -> list[str | None]:
        listening = await server.start()
        health = check()
        results = []
        for _ in range(count):
            results.append(await health.probe(Endpoint(HOST, server.port)))
            await asyncio.sleep(pause)
        health.forget(Endpoint(HOST, server.port))
        await asyncio.sleep(0.05)
        listening.close()
        return results

    return asyncio.run(run())


def test_probes_reuse_one_connection() -> None:
    server = CountingServer()
    assert probe_many(server, 10) == [None] * 10
    assert server.accepted == 1
    assert server.closed_by_peer == 1  # forget() closed it, from our side


def test_a_server_that_closes_gets_a_fresh_connection_per_probe() -> None:
    server = CountingServer(close=True)
    assert probe_many(server, 5) == [None] * 5
    assert server.accepted == 5


def test_a_kept_connection_closed_meanwhile_is_not_a_failure() -> None:
    # The instance's idle timeout closes the kept connection between two probes: the
    # probe notices, opens a fresh one, and reports the fresh answer.
    server = CountingServer(idle_close=0.02)
    assert probe_many(server, 4, pause=0.1) == [None] * 4
    assert server.accepted == 4
