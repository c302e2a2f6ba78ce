"""The canary's data plane: a Route with a stable and a canary set, real sockets, a real
Listener, and in-process instances that record every request head they read.

Which side each request reaches is counted on the instances' side; what each side's
figures say is checked against what the instances answered. The split and the figures
without sockets: tests/unit/test_route.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import re
import socket
import struct
import time
from collections.abc import AsyncIterator

from rotator.config import Endpoint
from rotator.proxy.route import Limits, Target
from tests.integration.proxykit import (
    HOST,
    Proxy,
    aio,
    free_port,
    request_bytes,
    running_proxy,
    until,
)

CANARY = "X-Rotator-Canary"


class Instance:
    """An instance that answers each request with its name, after `delay` seconds (or the
    seconds a `/sleep/S` path names); every `fail_every`-th request it answers 500. With
    `reset`, it resets (RST) each connection once a request is read; `/cut` gets the head
    of an answer and part of its body, then the reset. `heads` keeps every request head
    as it arrived."""

    def __init__(
        self, name: str, delay: float = 0.0, fail_every: int = 0, reset: bool = False
    ) -> None:
        self.name = name
        self.delay = delay
        self.fail_every = fail_every
        self.reset = reset
        self.heads: list[bytes] = []
        self.failed = 0  # 500s sent
        self.serving = 0  # connections whose handler has not returned yet
        self.took: list[float] = []  # seconds from each request's head to its answer
        self.server: asyncio.Server | None = None
        self.target = Target(Endpoint(HOST, 0), label=name)

    async def start(self) -> Instance:
        self.server = await asyncio.start_server(self._serve, HOST, 0)
        port = self.server.sockets[0].getsockname()[1]
        self.target = Target(Endpoint(HOST, port), label=self.name)
        return self

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.server.wait_closed(), 0.5)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.serving += 1
        try:
            await self._answer(reader, writer)
        finally:
            self.serving -= 1

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                self.heads.append(head)
                fails = self.fail_every and len(self.heads) % self.fail_every == 0
                length = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
                if length:
                    await reader.readexactly(int(length.group(1)))
                path = head.split(b" ", 2)[1].decode()
                if path == "/cut":
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npart")
                    await writer.drain()
                    await asyncio.sleep(0.05)
                if self.reset or path == "/cut":
                    sock = writer.get_extra_info("socket")
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    writer.transport.abort()
                    return
                sleep = path.removeprefix("/sleep/")
                began = time.perf_counter()
                await asyncio.sleep(float(sleep) if sleep != path else self.delay)
                status = b"200 OK"
                if fails:
                    status = b"500 Internal Server Error"
                    self.failed += 1
                body = self.name.encode()
                writer.write(
                    b"HTTP/1.1 %b\r\nContent-Length: %d\r\n\r\n%b" % (status, len(body), body)
                )
                self.took.append(time.perf_counter() - began)
        writer.close()


@contextlib.asynccontextmanager
async def canary(
    stable: Instance, canary: Instance | None, weight: int, limits: Limits | None = None
) -> AsyncIterator[Proxy]:
    """A proxy whose route has `stable` in its set and `canary` (if any) in the canary's,
    at `weight` percent, its figures counting from zero."""
    instances = [stable] if canary is None else [stable, canary]
    for i in instances:
        await i.start()
    try:
        async with running_proxy(None, hold_timeout=5.0, limits=limits) as p:
            p.route.add(stable.target)
            if canary is not None:
                p.route.add(canary.target, canary=True)
            p.route.canary_weight = weight
            p.route.reset_figures()
            p.targets.extend(i.target for i in instances)
            yield p
    finally:
        for i in instances:
            await i.close()


async def answers(p: Proxy, count: int, clients: int = 8, path: str = "/") -> list[str]:
    """`count` GETs over `clients` keep-alive connections at once; each answer's body."""

    async def client(n: int) -> list[str]:
        c = await p.connect()
        got = []
        for _ in range(n):
            r = await c.request("GET", path)
            assert r.status in (200, 500), (r.status, r.body)
            got.append(r.body.decode())
        return got

    shares = [count // clients + (i < count % clients) for i in range(clients)]
    return [b for one in await asyncio.gather(*(client(n) for n in shares)) for b in one]


# -- the split ---------------------------------------------------------------------------


@aio(20)
async def test_ten_percent_of_2000_requests_reach_the_canary() -> None:
    s, c = Instance("stable"), Instance("canary")
    async with canary(s, c, 10) as p:
        got = await answers(p, 2000)
        # Counted where they arrived: 10 +- 4 % (the binomial's deviation is 0.67%).
        assert len(s.heads) + len(c.heads) == 2000
        assert 120 <= len(c.heads) <= 280, len(c.heads)
        assert got.count("canary") == len(c.heads)
        # The figures say the same, side by side.
        assert (p.route.canary_figures.requests, p.route.stable_figures.requests) == (
            len(c.heads),
            len(s.heads),
        )


@aio(10)
async def test_a_keepalive_connection_is_not_pinned_to_a_side() -> None:
    s, c = Instance("stable"), Instance("canary")
    async with canary(s, c, 50) as p:
        assert set(await answers(p, 60, clients=1)) == {"stable", "canary"}


@aio(10)
async def test_header_sends_a_request_to_the_side_it_names() -> None:
    s, c = Instance("stable"), Instance("canary")
    async with canary(s, c, 0) as p:  # 0%: only those that ask reach the canary
        cl = await p.connect()
        spellings = ["always", "ALWAYS", " Always "]
        for name, value in zip([CANARY, CANARY.lower(), CANARY.upper()], spellings, strict=True):
            r = await cl.request("GET", "/a", [(name, value)])
            assert r.body == b"canary", (name, value)
        p.route.canary_weight = 100
        for value in ("never", "Never"):
            r = await cl.request("GET", "/n", [(CANARY, value)])
            assert r.body == b"stable", value
        # Several: the last decides; a value that is neither is no choice (100%: canary).
        r = await cl.request("GET", "/x", [(CANARY, "always"), (CANARY.lower(), "never")])
        assert r.body == b"stable"
        r = await cl.request("GET", "/x", [(CANARY, "sometimes")])
        assert r.body == b"canary"
        # Pipelined requests each keep their own choice.
        cl.send(b"".join(request_bytes("GET", "/p", [(CANARY, v)]) for v in ("never", "always")))
        assert [(await cl.response()).body for _ in range(2)] == [b"stable", b"canary"]
    heads = s.heads + c.heads
    assert len(heads) == 9
    assert not [h for h in heads if b"x-rotator-canary" in h.lower()]


@aio(10)
async def test_header_never_reaches_an_instance_without_a_canary() -> None:
    s = Instance("stable")
    async with canary(s, None, 0) as p:
        cl = await p.connect()
        for value in ("always", "never", "junk"):
            r = await cl.request("GET", "/", [(CANARY, value), (CANARY.upper(), value)])
            assert r.body == b"stable"
    assert len(s.heads) == 3
    assert not [h for h in s.heads if b"x-rotator-canary" in h.lower()]


# -- the figures ---------------------------------------------------------------------------


@aio(20)
async def test_figures_count_each_sides_requests_and_errors() -> None:
    # The canary answers 500 to every fifth request it gets: ~20% errors, the stable none.
    s, c = Instance("stable"), Instance("canary", fail_every=5)
    async with canary(s, c, 50) as p:
        await answers(p, 400)
        stable, canaries = p.route.stable_figures, p.route.canary_figures
        assert (stable.requests, stable.errors) == (len(s.heads), 0)
        assert (canaries.requests, canaries.errors) == (len(c.heads), c.failed)
        assert canaries.requests >= 120, canaries.requests
        assert 0.18 <= canaries.errors / canaries.requests <= 0.2
        p.route.reset_figures()
        assert (stable.requests, stable.errors, stable.p95()) == (0, 0, None)
        assert (canaries.requests, canaries.errors, canaries.p95()) == (0, 0, None)
        # Counting goes on from zero.
        cl = await p.connect()
        await cl.request("GET", "/", [(CANARY, "always")])
        assert (canaries.requests, stable.requests) == (1, 0)


@aio(20)
async def test_p95_of_a_50_ms_instance_is_50_ms_and_the_hop() -> None:
    s, c = Instance("stable"), Instance("canary", delay=0.05)
    async with canary(s, c, 50) as p:
        await answers(p, 120)
        slow, fast = p.route.canary_figures.p95(), p.route.stable_figures.p95()
        assert slow is not None and fast is not None
        # 50 ms as the instance measured its own p95 (a loaded machine wakes a sleeper
        # late), and the hop's own time, which is what the fast side's p95 says.
        took = sorted(c.took)[math.ceil(0.95 * len(c.took)) - 1]
        assert took >= 0.05
        assert 0.975 * took <= slow <= 1.1 * (took + fast), (slow, took, fast)
        assert fast < 0.025, fast


@aio(10)
async def test_a_refused_canary_is_its_error_and_the_stable_side_answers() -> None:
    # The canary's instance is gone (nothing listens): every request drawn for it, of any
    # method, goes on to the stable side at once, and each refusal counts against the canary.
    s = Instance("stable")
    gone = Target(Endpoint(HOST, free_port()), label="gone")
    async with canary(s, None, 100) as p:
        p.route.add(gone, canary=True)
        p.targets.append(gone)
        cl = await p.connect()
        started = time.monotonic()
        for _ in range(3):
            assert (await cl.request("GET", "/")).body == b"stable"
        r = await cl.request("POST", "/charge", [(CANARY, "always")], body=b"1")
        assert (r.status, r.body) == (200, b"stable")
        assert time.monotonic() - started < 1.0
        canaries, stable = p.route.canary_figures, p.route.stable_figures
        assert (canaries.requests, canaries.errors) == (4, 4)
        assert (stable.requests, stable.errors) == (4, 0)
        assert canaries.p95() is None  # refusals are no answers: no latency


@aio(10)
async def test_a_retry_stays_on_its_side_while_that_side_has_another_target() -> None:
    # The draw is not made again: a refused canary target's request goes to the other
    # canary target, so the canary's share stays what was drawn.
    s, c = Instance("stable"), Instance("canary")
    gone = Target(Endpoint(HOST, free_port()), label="gone")
    async with canary(s, c, 100) as p:
        p.route.add(gone, canary=True)
        p.targets.append(gone)
        assert p.route.canary_targets == (c.target, gone)
        assert set(await answers(p, 20, clients=1)) == {"canary"}
        assert s.heads == [] and len(c.heads) == 20
        # Each refusal is one more canary request, and an error.
        figures = p.route.canary_figures
        assert figures.errors >= 1 and figures.requests == 20 + figures.errors


@aio(10)
async def test_proxys_own_502_and_504_count_for_the_side_whose_instance_failed() -> None:
    # A POST reset after it was sent is not retried: the client gets 502, the canary an error.
    s, c = Instance("stable"), Instance("canary", reset=True)
    async with canary(s, c, 0) as p:
        cl = await p.connect()
        r = await cl.request("POST", "/charge", [(CANARY, "always")], body=b"1")
        assert r.status == 502
        assert (p.route.canary_figures.requests, p.route.canary_figures.errors) == (1, 1)
        assert p.route.stable_figures.errors == 0


@aio(10)
async def test_an_answer_cut_short_or_timed_out_is_an_error_of_its_side() -> None:
    s, c = Instance("stable"), Instance("canary")
    async with canary(s, c, 0, Limits(read_timeout=0.2)) as p:  # type: ignore[call-arg]
        cl = await p.connect()
        cl.send(request_bytes("GET", "/cut", [(CANARY, "always")]))
        r = await cl.head()
        assert r.status == 200  # what the instance began to say; then the cut
        assert await cl.rest() == b"part"
        figures = p.route.canary_figures
        await until(lambda: figures.requests == 1)
        assert figures.errors == 1
        started = time.monotonic()
        r = await (await p.connect()).request("GET", "/sleep/0.5", [(CANARY, "always")])
        assert r.status == 504 and time.monotonic() - started < 0.45
        assert (figures.requests, figures.errors) == (2, 2)
        assert (p.route.stable_figures.requests, p.route.stable_figures.errors) == (0, 0)
        # Python 3.11 reports a handler cancelled at the end of a test as an error.
        await until(lambda: c.serving == 0)


@aio(10)
async def test_a_client_that_left_is_no_error() -> None:
    s, c = Instance("stable"), Instance("canary", delay=0.3)
    async with canary(s, c, 100) as p:
        cl = await p.connect()
        cl.send(request_bytes("GET", "/"))
        await until(lambda: c.target.in_flight == 1)
        # Reset, not closed: a FIN is a half-close, after which the answer is still sent.
        sock = cl.writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        cl.close()
        await until(lambda: c.target.in_flight == 0, timeout=0.2)
        figures = p.route.canary_figures
        assert (figures.requests, figures.errors) == (0, 0)
        r = await (await p.connect()).request("GET", "/")
        assert (r.body, figures.requests, figures.errors) == (b"canary", 1, 0)


# -- the canary leaves ---------------------------------------------------------------------


@aio(10)
async def test_removed_canary_finishes_its_requests_and_new_ones_go_to_stable_at_once() -> None:
    s, c = Instance("stable"), Instance("canary")
    async with canary(s, c, 100) as p:
        held = [await p.connect() for _ in range(3)]
        for cl in held:
            cl.send(request_bytes("GET", "/sleep/0.3"))
        await until(lambda: c.target.in_flight == 3)
        assert p.route.remove(c.target)
        fresh = await p.connect()
        assert [(await fresh.request("GET", f"/{i}")).body for i in range(5)] == [b"stable"] * 5
        for cl in held:
            r = await cl.response()
            assert (r.status, r.body) == (200, b"canary")
        assert c.target.in_flight == 0 and len(c.heads) == 3
        # Those that finished on the canary after it left still count as the canary's.
        assert p.route.canary_figures.requests == 3
        # No canary runs now: the stable side is no longer counted.
        assert p.route.only is s.target and s.target.figures is None
