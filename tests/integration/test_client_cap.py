"""max_clients at the Listener: real sockets, a real Listener in the test's own loop, and a
tiny in-process backend. At a cap the longest idle connections make room; when none is
idle, a new connection gets 503 at once."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from typing import Any, cast

import pytest

from rotator.config import Endpoint
from rotator.proxy.clients import Clients
from rotator.proxy.protocol import Listener
from rotator.proxy.route import Limits, Route, Target

HOST = "127.0.0.1"
Conn = tuple[asyncio.StreamReader, asyncio.StreamWriter]


def run(test: Callable[[], Coroutine[Any, Any, None]]) -> None:
    """The test on its own loop (uvloop with PROXY_TEST_LOOP=uvloop, as test_proxy.py),
    failing on anything reported to the loop's exception handler."""
    factory = None
    if os.environ.get("PROXY_TEST_LOOP") == "uvloop":
        factory = pytest.importorskip("uvloop").new_event_loop
    errors: list[dict[str, Any]] = []
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.get_loop().set_exception_handler(lambda loop, ctx: errors.append(ctx))
        runner.run(asyncio.wait_for(test(), 10))
    assert not errors


class Answer(asyncio.Protocol):
    """The backend: answers every request head 200 "ok", keep-alive."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.pending = b""

    def data_received(self, data: bytes) -> None:
        self.pending += data
        while b"\r\n\r\n" in self.pending:
            self.pending = self.pending.partition(b"\r\n\r\n")[2]
            self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")


@asynccontextmanager
async def backend() -> AsyncIterator[Target]:
    server = await asyncio.get_running_loop().create_server(Answer, HOST, 0)
    try:
        yield Target(Endpoint(HOST, server.sockets[0].getsockname()[1]))
    finally:
        server.close()


@asynccontextmanager
async def listening(route: Route, clients: Clients | None = None) -> AsyncIterator[Listener]:
    listener = Listener(route, HOST, 0, clients=clients)
    await listener.start()
    assert listener.server is not None
    listener.port = listener.server.sockets[0].getsockname()[1]
    try:
        yield listener
    finally:
        await listener.shutdown(0)


async def connect(listener: Listener) -> Conn:
    """A client connection, once the listener has counted it in."""
    before = set(listener.connections)
    conn = await asyncio.open_connection(HOST, listener.port)
    await until(lambda: bool(set(listener.connections) - before))
    return conn


async def request(conn: Conn) -> tuple[int, bytes]:
    reader, writer = conn
    writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    return await response(reader)


async def response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    length = next(
        int(line.split(b":")[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    return int(head.split()[1]), await reader.readexactly(length)


async def closed(conn: Conn) -> bool:
    """The proxy closed it (EOF within half a second)."""
    try:
        return await asyncio.wait_for(conn[0].read(1), 0.5) == b""
    except TimeoutError:
        return False


async def until(predicate: Callable[[], bool], timeout: float = 3.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.005)


def test_at_its_own_cap_a_new_client_closes_the_longest_idle_one() -> None:
    async def test() -> None:
        route = Route("web", Limits(max_clients=2))
        async with backend() as target, listening(route) as listener:
            route.swap(target)
            first, second = await connect(listener), await connect(listener)
            # The first one was opened first but answered last: the second is idle longest.
            assert await request(first) == (200, b"ok")
            third = await connect(listener)
            assert await request(third) == (200, b"ok")
            assert await closed(second)
            assert await request(first) == (200, b"ok")
            assert (route.clients, route.clients_evicted, route.clients_refused) == (2, 1, 0)

    run(test)


def test_with_none_idle_a_new_client_gets_503_at_once_and_the_busy_one_is_kept() -> None:
    async def test() -> None:
        route = Route(
            "web", Limits(max_clients=1, hold_timeout=0.5)
        )  # no target: a request is held
        async with listening(route) as listener:
            busy = await connect(listener)
            busy[1].write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            await until(lambda: any(c.queue for c in listener.connections))
            started = time.monotonic()
            reader, _ = await asyncio.open_connection(HOST, listener.port)
            status, body = await response(reader)
            assert time.monotonic() - started < 0.3  # not after the busy one's hold_timeout
            assert (status, body) == (
                503,
                b"rotator: web: too many client connections (max_clients 1)\n",
            )
            assert await reader.read() == b""
            assert (route.clients, route.clients_refused, route.requests) == (1, 1, 0)
            # The busy one was not closed to make room: it gets its own answer.
            assert (await response(busy[0]))[0] == 503
            assert route.clients_evicted == 0

    run(test)


def test_over_the_total_the_longest_idle_of_any_component_makes_room() -> None:
    async def test() -> None:
        clients = Clients(cap=2)
        api, web = Route("api"), Route("web")
        async with (
            backend() as target,
            listening(api, clients) as api_listener,
            listening(web, clients) as web_listener,
        ):
            api.swap(target)
            web.swap(target)
            idle_api = await connect(api_listener)
            idle_web = await connect(web_listener)
            newcomer = await connect(web_listener)
            assert await request(newcomer) == (200, b"ok")
            assert await closed(idle_api)
            assert not await closed(idle_web)
            assert (api.clients_evicted, web.clients_evicted, clients.open) == (1, 0, 2)

    run(test)


def test_at_a_cap_an_eighth_of_the_connections_go_at_once() -> None:
    async def test() -> None:
        route = Route("web", Limits(max_clients=16))
        async with listening(route) as listener:
            conns = [await connect(listener) for _ in range(16)]
            conns.append(await connect(listener))
            # 16 idle: 2 closed, the two opened first; the next arrival finds room.
            assert [await closed(c) for c in conns[:3]] == [True, True, False]
            conns.append(await connect(listener))
            assert (route.clients, route.clients_evicted) == (16, 2)

    run(test)


def test_a_trickling_request_head_counts_as_idle_and_makes_room() -> None:
    async def test() -> None:
        route = Route("web", Limits(max_clients=1))
        async with backend() as target, listening(route) as listener:
            route.swap(target)
            trickle = await connect(listener)
            trickle[1].write(b"GET / HTTP/1.1\r\nHo")  # a head that never ends (slowloris)
            newcomer = await connect(listener)
            assert await request(newcomer) == (200, b"ok")
            assert await closed(trickle)

    run(test)
