"""The proxy balancing a component's requests over several replicas: real sockets, a real
Listener, and in-process replicas that record which of them got each request.

The choice itself (route.pick) is tested without sockets in tests/unit/test_route.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
import struct
import time
from collections.abc import AsyncIterator

from rotator.config import Endpoint
from rotator.proxy.route import Target
from tests.integration.proxykit import (
    HOST,
    Client,
    Proxy,
    aio,
    free_port,
    request_bytes,
    running_proxy,
    until,
)

WEBSOCKET = [("Connection", "Upgrade"), ("Upgrade", "websocket"), ("Sec-WebSocket-Version", "13")]


class Replica:
    """An instance that answers each request with its name, after `delay` seconds (or
    the seconds a `/sleep/S` path names). `reset`: once a request is read, the
    connection is reset (RST) instead of answered. `/ws` is accepted as a websocket
    (101), held open until the proxy closes it."""

    def __init__(self, name: str, delay: float = 0.0, reset: bool = False) -> None:
        self.name = name
        self.delay = delay
        self.reset = reset
        self.seen: list[tuple[str, str]] = []  # (method, path) of each request read
        self.server: asyncio.Server | None = None
        self.port = 0
        self.target = Target(Endpoint(HOST, 0), label=name)

    async def start(self) -> Replica:
        self.server = await asyncio.start_server(self._serve, HOST, 0)
        self.port = self.server.sockets[0].getsockname()[1]
        self.target = Target(Endpoint(HOST, self.port), label=self.name)
        return self

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.server.wait_closed(), 0.5)

    def paths(self, method: str = "GET") -> list[str]:
        return [p for m, p in self.seen if m == method]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                method, path, _ = head.split(b"\r\n", 1)[0].decode().split(" ")
                length = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
                if length:
                    await reader.readexactly(int(length.group(1)))
                self.seen.append((method, path))
                if self.reset:
                    sock = writer.get_extra_info("socket")
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    writer.transport.abort()
                    return
                if path == "/ws":
                    writer.write(
                        b"HTTP/1.1 101 Switching Protocols\r\n"
                        b"Upgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
                    )
                    await reader.read()  # until the proxy closes the tunnel
                    return
                sleep = path.removeprefix("/sleep/")
                await asyncio.sleep(float(sleep) if sleep != path else self.delay)
                body = self.name.encode()
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%b" % (len(body), body))
        writer.close()


@contextlib.asynccontextmanager
async def balanced(*replicas: Replica, hold_timeout: float = 5.0) -> AsyncIterator[Proxy]:
    """A proxy whose route balances over `replicas` (all started), in their order."""
    for r in replicas:
        await r.start()
    try:
        async with running_proxy(None, hold_timeout=hold_timeout) as p:
            for r in replicas:
                p.route.add(r.target)
                p.targets.append(r.target)
            yield p
    finally:
        for r in replicas:
            await r.close()


async def body_of(
    c: Client, method: str = "GET", path: str = "/", body: bytes | None = None
) -> str:
    r = await c.request(method, path, body=body)
    assert r.status == 200, (r.status, r.body)
    return r.body.decode()


# -- least outstanding requests, ties in turn ------------------------------------------


@aio(10)
async def test_one_keepalive_connection_alternates_between_equal_replicas() -> None:
    a, b = Replica("a"), Replica("b")
    async with balanced(a, b) as p:
        c = await p.connect()
        answers = [await body_of(c, path=f"/{i}") for i in range(6)]
        assert answers == ["a", "b"] * 3
        # The replicas' own record: each request went to one, in turn.
        assert (a.paths(), b.paths()) == (["/0", "/2", "/4"], ["/1", "/3", "/5"])
        assert (a.target.served, b.target.served) == (3, 3)


@aio(10)
async def test_slow_replica_gets_fewer_concurrent_requests() -> None:
    # Round-robin would give the slow one half; least outstanding gives it only what
    # keeps its in-flight count level with the fast one's. 8 clients for 0.3 s.
    slow, fast = Replica("slow", delay=0.2), Replica("fast")
    async with balanced(slow, fast) as p:
        deadline = time.monotonic() + 0.3

        async def client(n: int) -> list[str]:
            c = await p.connect()
            answers = []
            while time.monotonic() < deadline:
                answers.append(await body_of(c, path=f"/{n}-{len(answers)}"))
            return answers

        answers = [x for one in await asyncio.gather(*(client(n) for n in range(8))) for x in one]
        count = {name: answers.count(name) for name in ("slow", "fast")}
        assert count["fast"] >= 40, count  # enough requests to tell a balance
        assert count["slow"] < len(answers) / 5, count
        assert (slow.target.served, fast.target.served) == (count["slow"], count["fast"])
        assert slow.target.in_flight == fast.target.in_flight == 0


@aio(10)
async def test_open_websocket_counts_in_flight_and_pick_avoids_its_replica() -> None:
    a, b = Replica("a"), Replica("b")
    async with balanced(a, b) as p:
        ws = await p.connect()
        ws.send(request_bytes("GET", "/ws", WEBSOCKET))
        assert (await ws.head()).status == 101
        assert (a.target.in_flight, b.target.in_flight) == (1, 0)
        c = await p.connect()
        assert [await body_of(c, path=f"/{i}") for i in range(4)] == ["b"] * 4
        ws.close()
        await until(lambda: a.target.in_flight == 0)
        assert a.target.served == 1  # the websocket, once closed
        assert {await body_of(c) for _ in range(2)} == {"a", "b"}


# -- leaving the set -----------------------------------------------------------------


@aio(10)
async def test_removed_replica_gets_no_new_request_and_finishes_its_own() -> None:
    a, b = Replica("a"), Replica("b")
    async with balanced(a, b) as p:
        held = await p.connect()
        held.send(request_bytes("GET", "/sleep/0.3"))
        await until(lambda: a.target.in_flight == 1)
        assert p.route.remove(a.target)
        assert not p.route.remove(a.target)  # gone already
        c = await p.connect()
        assert [await body_of(c, path=f"/{i}") for i in range(4)] == ["b"] * 4
        r = await held.response()
        assert (r.status, r.body) == (200, b"a")  # the one in flight there completed
        assert a.paths() == ["/sleep/0.3"]
        assert (a.target.in_flight, a.target.served) == (0, 1)


# -- retries on another replica --------------------------------------------------------


@aio(10)
async def test_refused_replica_is_skipped_at_once() -> None:
    # A refused connect reached no instance: any method goes to the other replica,
    # without waiting (hold_timeout is 5 s).
    gone = Target(Endpoint(HOST, free_port()), label="gone")
    good = Replica("good")
    async with balanced(good, hold_timeout=5.0) as p:
        p.route.replace(good.target, gone)
        p.route.add(good.target)
        assert p.route.targets == (gone, good.target)
        c = await p.connect()
        started = time.monotonic()
        answers = [await body_of(c, path=f"/{i}") for i in range(4)]
        answers.append(await body_of(c, "POST", "/charge", body=b"1"))
        assert answers == ["good"] * 5
        assert time.monotonic() - started < 1.0
        assert good.paths() == ["/0", "/1", "/2", "/3"] and good.paths("POST") == ["/charge"]
        assert (gone.in_flight, gone.served) == (0, 0)


@aio(10)
async def test_get_reset_before_any_answer_is_retried_on_another_replica() -> None:
    broken, good = Replica("broken", reset=True), Replica("good")
    async with balanced(broken, good) as p:
        c = await p.connect()
        started = time.monotonic()
        assert await body_of(c, path="/x") == "good"
        assert time.monotonic() - started < 1.0
        assert broken.paths() == ["/x"] and good.paths() == ["/x"]
        assert (broken.target.in_flight, broken.target.served) == (0, 0)
        assert (good.target.in_flight, good.target.served) == (0, 1)


@aio(10)
async def test_post_reset_after_it_was_sent_is_not_retried() -> None:
    broken, good = Replica("broken", reset=True), Replica("good")
    async with balanced(broken, good) as p:
        c = await p.connect()
        r = await c.request("POST", "/charge", body=b"card=1")
        # The instance may have acted on it: sending it again could charge twice.
        assert (r.status, r.body) == (502, b"rotator: demo: bad gateway\n")
        assert broken.paths("POST") == ["/charge"] and good.seen == []
