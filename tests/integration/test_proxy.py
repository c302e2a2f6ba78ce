"""The data plane (rotator/proxy) end to end.

A real Listener runs in the test's own event loop; behind it run real demo
backends (subprocesses, module-scoped) or, where the exact bytes the proxy sends
upstream matter, an in-process FakeBackend that records them. Clients are raw
sockets: exact bytes in, exact bytes parsed out.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import gzip
import os
import socket
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import aiohttp
import httptools
import psutil
import pytest

from rotator.config import Endpoint
from rotator.proxy import protocol
from rotator.proxy.protocol import HOP_BY_HOP, RESPONSE_FRAMING
from rotator.proxy.route import Limits, Target
from tests.integration.proxykit import (
    HOST,
    Backend,
    Client,
    aio,
    free_port,
    request_bytes,
    running_proxy,
    until,
)

pytestmark = pytest.mark.skipif(os.name != "posix", reason="process groups are POSIX")

MiB = 1024 * 1024
# /bytes: byte i is i % 256. Slices of this (offset % 256) are what any read must equal.
PATTERN_BIG = bytes(range(256)) * (4 * MiB // 256 + 1)


def pattern(n: int, offset: int = 0) -> bytes:
    start = offset % 256
    return PATTERN_BIG[start : start + n]


@pytest.fixture(scope="module")
def backends(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Backend]]:
    logs = tmp_path_factory.mktemp("proxy-backends")
    started: dict[str, Backend] = {}
    try:
        for key, flags in (("a", ()), ("b", ()), ("close", ("--close",))):
            started[key] = Backend(logs / f"{key}.log", *flags, name=key)
        for b in started.values():
            b.wait_ready()
        yield started
    finally:
        for b in started.values():
            b.kill()


@pytest.fixture
def backend(backends: dict[str, Backend]) -> Backend:
    return backends["a"]


@pytest.fixture
def backend_b(backends: dict[str, Backend]) -> Backend:
    return backends["b"]


@pytest.fixture
def closing_backend(backends: dict[str, Backend]) -> Backend:
    return backends["close"]


# -- an in-process backend that records exactly what reaches it ---------------------


@dataclass
class Seen:
    conn: int  # index of the upstream connection it came on
    method: bytes = b""
    url: bytes = b""
    version: str = ""
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: bytes = b""


OK_RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
Responder = Callable[["FakeConn", Seen], bytes | None]  # None: close without answering


class FakeConn(asyncio.Protocol):
    def __init__(self, backend: FakeBackend) -> None:
        self.backend = backend
        self.index = len(backend.conns)
        backend.conns.append(self)
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.raw = bytearray()
        self.current = Seen(self.index)
        self.answered = 0
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        self.raw += data
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.backend.errors += 1
            if self.transport is not None:
                self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True

    def on_message_begin(self) -> None:
        self.current = Seen(self.index)

    def on_url(self, url: bytes) -> None:
        self.current.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.current.headers.append((name, value))

    def on_headers_complete(self) -> None:
        self.current.method = self.parser.get_method()
        self.current.version = self.parser.get_http_version()
        if self.backend.on_head is not None:
            self.backend.on_head(self, self.current)

    def on_body(self, body: bytes) -> None:
        self.current.body += body

    def on_message_complete(self) -> None:
        seen = self.current
        self.backend.requests.append(seen)
        reply = self.backend.respond(self, seen)
        assert self.transport is not None
        if reply is None:
            self.transport.close()
        elif reply:
            self.answered += 1
            self.transport.write(reply)


class FakeBackend:
    def __init__(
        self,
        respond: Responder | None = None,
        on_head: Callable[[FakeConn, Seen], None] | None = None,
        rcvbuf: int = 0,
    ) -> None:
        self.respond: Responder = respond or (lambda conn, seen: OK_RESPONSE)
        self.on_head = on_head
        self.rcvbuf = rcvbuf
        self.conns: list[FakeConn] = []
        self.requests: list[Seen] = []
        self.errors = 0
        self.server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> FakeBackend:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if self.rcvbuf:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.rcvbuf)
        sock.bind((HOST, 0))
        self.port = sock.getsockname()[1]
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(lambda: FakeConn(self), sock=sock)
        return self

    def target(self) -> Target:
        return Target(Endpoint(HOST, self.port))

    @property
    def raw(self) -> bytes:
        return b"".join(bytes(c.raw) for c in self.conns)

    async def close(self) -> None:
        for c in self.conns:
            if c.transport is not None:
                c.transport.abort()
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


@contextlib.asynccontextmanager
async def fake_backend(**kw: Any) -> AsyncIterator[FakeBackend]:
    fb = await FakeBackend(**kw).start()
    try:
        yield fb
    finally:
        await fb.close()


def without_date(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    return [(n, v) for n, v in headers if n.lower() != b"date"]


# == 1. basic GET ====================================================================


@aio(10)
async def test_get_passes_status_body_and_headers(backend: Backend) -> None:
    direct = await Client.open(backend.port)
    want = await direct.request("GET", "/cookies")
    direct.close()
    async with running_proxy(Target(Endpoint(HOST, backend.port))) as p:
        c = await p.connect()
        r = await c.request("GET", "/some/where?a=1&b=two")
        assert (r.version, r.status, r.reason) == (b"HTTP/1.1", 200, b"OK")
        assert r.json() == {
            "name": "a",
            "pid": backend.pid,
            "port": backend.port,
            "method": "GET",
            "path": "/some/where",
            "query": "a=1&b=two",
        }
        assert r.get("X-Instance-Pid") == str(backend.pid).encode()
        assert r.get("X-Instance-Port") == str(backend.port).encode()
        assert r.get("Content-Type") == b"application/json; charset=utf-8"
        assert r.get("Content-Length") == str(len(r.body)).encode()

        # Every response header the instance sent arrives, in its order, nothing added.
        got = await c.request("GET", "/cookies")
        assert (got.status, got.body) == (want.status, want.body) == (200, b"cookies")
        assert without_date(got.headers) == without_date(want.headers)

        r = await c.request("GET", "/status/404")
        assert (r.status, r.reason) == (404, b"Not Found")
        r = await c.request("GET", "/status/503")
        assert (r.status, r.reason) == (503, b"Service Unavailable")
        assert r.get("X-Instance-Pid") == str(backend.pid).encode()  # the instance's, not ours


@aio(10)
async def test_aiohttp_client_through_proxy(backend: Backend) -> None:
    async with (
        running_proxy(Target(Endpoint(HOST, backend.port))) as p,
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session,
    ):

        async def one(i: int) -> tuple[int, Any]:
            async with session.get(f"http://{HOST}:{p.port}/c/{i}?q={i}") as resp:
                return resp.status, await resp.json()

        results = await asyncio.gather(*(one(i) for i in range(50)))
        assert [s for s, _ in results] == [200] * 50
        assert [(j["path"], j["query"]) for _, j in results] == [
            (f"/c/{i}", f"q={i}") for i in range(50)
        ]
        assert p.route.requests == 50


# == 2. keep-alive and pipelining ========================================================


@aio(10)
async def test_keep_alive_reuses_both_connections(backend: Backend) -> None:
    target = Target(Endpoint(HOST, backend.port))
    async with running_proxy(target) as p:
        c = await p.connect()
        for i in range(5):
            r = await c.request("GET", f"/k{i}")
            assert r.status == 200 and r.json()["path"] == f"/k{i}"
            assert r.get("Connection") is None
        assert len(target.connections) == 1  # one upstream connection, reused
        assert p.listener is not None and len(p.listener.connections) == 1
        assert (target.served, target.in_flight, p.route.requests) == (5, 0, 5)
        # The client asks to close: said and done.
        r = await c.request("GET", "/last", [("Connection", "close")])
        assert r.status == 200 and r.get("Connection") == b"close"
        assert await c.rest() == b""
        assert len(target.connections) == 1  # the instance connection stays pooled


@aio(10)
async def test_pipelined_requests_answered_in_order(backend: Backend) -> None:
    async with running_proxy(Target(Endpoint(HOST, backend.port))) as p:
        c = await p.connect()
        c.send(
            request_bytes("GET", "/slow?seconds=0.2")
            + request_bytes("GET", "/p2")
            + request_bytes("GET", "/headers?n=3")
        )
        r1, r2, r3 = [await c.response() for _ in range(3)]
        assert r1.status == 200 and r1.json()["slept"] == 0.2
        assert r2.status == 200 and r2.json()["path"] == "/p2"
        assert r3.status == 200 and r3.json()["path_qs"] == "/headers?n=3"
        # and the connection still serves
        assert (await c.request("GET", "/p4")).json()["path"] == "/p4"
        # pipelined requests with bodies, behind a slow one
        c.send(
            request_bytes("GET", "/slow?seconds=0.1")
            + request_bytes("POST", "/echo", body=b"first body")
            + b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
            + b"6\r\nsecond\r\n5\r\n body\r\n0\r\n\r\n"
            + request_bytes("GET", "/p8")
        )
        rs = [await c.response() for _ in range(4)]
        assert [r.status for r in rs] == [200] * 4
        assert rs[0].json()["slept"] == 0.1
        assert (rs[1].body, rs[2].body) == (b"first body", b"second body")
        assert rs[3].json()["path"] == "/p8"


@aio(10)
async def test_closed_connections_are_freed_without_the_cycle_collector(backend: Backend) -> None:
    """A closed connection, client or upstream, must leave no reference cycle: with a new
    connection per request, each one's objects would otherwise wait for the cyclic
    collector, whose passes pause the proxy's loop."""
    target = Target(Endpoint(HOST, backend.port))
    async with running_proxy(target) as p:
        gc.collect()
        gc.set_debug(gc.DEBUG_SAVEALL)  # what the collector finds stays in gc.garbage
        try:
            for i in range(20):
                c = await p.connect()
                assert (await c.request("GET", f"/n/{i}", [("Connection", "close")])).status == 200
                c.close()
            target.close_all()  # the upstream side too
            await asyncio.sleep(0.05)  # connection_lost runs on the loop
            gc.collect()
            cyclic = [type(o).__name__ for o in gc.garbage]
        finally:
            gc.set_debug(0)
            gc.garbage.clear()
        assert p.route.requests == 20
        assert not {"ClientConnection", "UpstreamConnection"} & set(cyclic), cyclic


# == 3. encoded paths and queries byte for byte ==========================================


@aio(10)
async def test_encoded_path_and_query_unchanged(backend: Backend) -> None:
    async with running_proxy(Target(Endpoint(HOST, backend.port))) as p:
        c = await p.connect()
        r = await c.request("GET", "/headers?x=%20y&z=1&p=a%2Fb%3F&e=%E2%82%AC+&empty=&flag")
        assert r.json()["path_qs"] == "/headers?x=%20y&z=1&p=a%2Fb%3F&e=%E2%82%AC+&empty=&flag"

    async with fake_backend() as fb, running_proxy(fb.target()) as p:
        c = await p.connect()
        paths = ["/a%2Fb/c?x=%20y&z=1", "/%7Euser/..%2F/x;p=1?q=a+b&r=%2B", "/?", "*"]
        for path in paths:
            method = "OPTIONS" if path == "*" else "GET"
            assert (await c.request(method, path)).status == 200
        assert [s.url for s in fb.requests] == [p.encode() for p in paths]


# == 4. no open proxy ===================================================================


@aio(10)
async def test_absolute_form_goes_to_our_backend_in_origin_form(backend: Backend) -> None:
    target = Target(Endpoint(HOST, backend.port))
    async with running_proxy(target) as p:
        c = await p.connect()
        c.send(
            b"GET http://evil.example:1234/headers?q=1 HTTP/1.1\r\nHost: evil.example:1234\r\n\r\n"
        )
        r = await c.response()
        assert r.status == 200
        assert r.get("X-Instance-Pid") == str(backend.pid).encode()
        data = r.json()
        assert data["path_qs"] == "/headers?q=1"
        assert ["Host", "evil.example:1234"] in data["headers"]

        c.send(b"GET https://evil.example/ HTTP/1.1\r\nHost: evil.example\r\n\r\n")
        r = await c.response()
        assert r.status == 200 and r.json()["pid"] == backend.pid and r.json()["path"] == "/"

        # A Host of another site: still our backend.
        r = await c.request("GET", "/headers", host="www.google.com")
        assert r.status == 200 and r.get("X-Instance-Pid") == str(backend.pid).encode()
        assert ["X-Forwarded-Host", "www.google.com"] in r.json()["headers"]
        assert target.served == 3

        c.send(b"CONNECT evil.example:443 HTTP/1.1\r\nHost: evil.example:443\r\n\r\n")
        r = await c.response()
        assert (r.status, r.reason) == (405, b"Method Not Allowed")
        assert r.body == b"rotator: demo: method not allowed\n"
        assert r.get("Connection") == b"close"
        assert await c.rest() == b""
        assert target.served == 3  # the CONNECT never reached an instance


@aio(10)
async def test_absolute_form_without_path_and_foreign_scheme() -> None:
    async with fake_backend() as fb, running_proxy(fb.target()) as p:
        c = await p.connect()
        c.send(b"GET http://evil.example:99 HTTP/1.1\r\nHost: evil.example:99\r\n\r\n")
        assert (await c.response()).status == 200
        assert fb.requests[0].url == b"/"
        c2 = await p.connect()
        c2.send(b"GET ftp://evil.example/x HTTP/1.1\r\nHost: evil.example\r\n\r\n")
        r = await c2.response()
        assert r.status == 400 and r.body == b"rotator: demo: bad request\n"
        assert await c2.rest() == b""
        assert len(fb.requests) == 1


# == 5. malformed requests ===============================================================

MALFORMED = {
    "garbage": b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\x00\xff\r\n\r\n",
    "bad header line": b"GET / HTTP/1.1\r\nHost: x\r\nBad Header Line\r\n\r\n",
    "space in header name": b"GET / HTTP/1.1\r\nHost: x\r\nX Y: 1\r\n\r\n",
    "bad version": b"GET / HTTP/9.z\r\nHost: x\r\n\r\n",
    "bad content-length": b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
    "two content-lengths": (
        b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab"
    ),
    "content-length and chunked": (
        b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
    ),
    "bad chunk size": (
        b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"zz\r\nhello\r\n0\r\n\r\n"
    ),
    "chunk longer than its size": (
        b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"2\r\nhello\r\n0\r\n\r\n"
    ),
    # Request smuggling vectors: each could make the instance see a different
    # request boundary than the proxy.
    "two equal content-lengths": (
        b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\nab"
    ),
    "obs-fold header": b"GET / HTTP/1.1\r\nHost: x\r\nX-A: 1\r\n  folded\r\n\r\n",
    "chunked then content-length": (
        b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
        b"Content-Length: 5\r\n\r\n0\r\n\r\n"
    ),
    "space before colon": b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length : 0\r\n\r\n",
}


@pytest.mark.parametrize("raw", list(MALFORMED.values()), ids=list(MALFORMED))
@aio(10)
async def test_malformed_request_gets_400_and_never_reaches_backend(raw: bytes) -> None:
    async with fake_backend() as fb, running_proxy(fb.target()) as p:
        warm = await p.connect()  # leaves a pooled upstream connection: the riskier path
        assert (await warm.request("GET", "/warm")).status == 200
        raw_before = fb.raw

        c = await p.connect()
        c.send(raw)
        r = await c.response()
        assert (r.status, r.reason) == (400, b"Bad Request")
        assert r.get("Connection") == b"close"
        assert r.body == b"rotator: demo: bad request\n"
        assert await c.rest() == b""

        await asyncio.sleep(0.05)
        assert [s.url for s in fb.requests] == [b"/warm"]  # no request completed upstream
        # A request goes upstream only once the read that brought it is parsed: its
        # broken body (in the same read) stops it before one byte of it left.
        assert fb.raw == raw_before
        # The proxy is fine afterwards.
        assert (await warm.request("GET", "/after")).status == 200
        assert fb.requests[-1].url == b"/after"


@aio(10)
async def test_body_breaking_in_a_later_read_cuts_the_upstream_connection() -> None:
    # The head went out with the first read; the body breaks in the second. The
    # instance's connection is cut, so it never gets a complete request.
    async with fake_backend() as fb, running_proxy(fb.target()) as p:
        warm = await p.connect()
        assert (await warm.request("GET", "/warm")).status == 200
        c = await p.connect()
        c.send(b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
        await until(lambda: b"POST /echo" in fb.raw)
        c.send(b"zz\r\nhello\r\n0\r\n\r\n")
        r = await c.response()
        assert (r.status, r.get("Connection")) == (400, b"close")
        await until(lambda: fb.conns[0].closed)
        assert [s.url for s in fb.requests] == [b"/warm"] and fb.errors == 0


@aio(10)
async def test_the_proxys_own_answer_to_a_head_has_no_body() -> None:
    async with fake_backend() as fb, running_proxy(fb.target()) as p:
        c = await p.connect()
        c.send(b"HEAD * HTTP/1.1\r\nHost: x\r\n\r\n")
        r = await c.response(head_only=True)
        assert r.status == 400 and int(r.get("Content-Length") or 0) > 0
        assert await c.rest() == b""  # the length is a GET's; not one body byte follows
        assert fb.requests == []


@aio(10)
async def test_malformed_after_good_pipelined_request() -> None:
    async with fake_backend() as fb, running_proxy(fb.target()) as p:
        c = await p.connect()
        c.send(request_bytes("GET", "/first") + b"BLAH\x00 / HTTP/1.1\r\n\r\n")
        r1 = await c.response()
        assert (r1.status, r1.body) == (200, b"ok")
        r2 = await c.response()
        assert r2.status == 400 and r2.get("Connection") == b"close"
        assert await c.rest() == b""
        assert [s.url for s in fb.requests] == [b"/first"]


# == 6. hop-by-hop and forwarding headers ================================================


@aio(10)
async def test_hop_by_hop_request_headers_dropped_and_forwarded_set(backend: Backend) -> None:
    async with running_proxy(Target(Endpoint(HOST, backend.port))) as p:
        c = await p.connect()
        headers = [
            ("Connection", "keep-alive, X-Secret"),
            ("X-Secret", "1"),
            ("Keep-Alive", "5"),
            ("Proxy-Authorization", "x"),
            ("Proxy-Connection", "keep-alive"),
            ("TE", "trailers"),
            ("Upgrade", "foo"),
            ("X-Forwarded-For", "6.6.6.6"),
            ("X-Forwarded-Proto", "https"),
            ("X-Forwarded-Host", "evil.example"),
            ("X-Keep", "yes"),
            ("Accept", "*/*"),
        ]
        r = await c.request("GET", "/headers", headers, host="front.example:8080")
        assert r.status == 200
        assert r.json()["headers"] == [
            ["Host", "front.example:8080"],
            ["X-Keep", "yes"],
            ["Accept", "*/*"],
            ["X-Forwarded-For", "127.0.0.1"],
            ["X-Forwarded-Proto", "http"],
            ["X-Forwarded-Host", "front.example:8080"],
        ]
        assert r.json()["http_version"] == "1.1"
        # The connection stays usable (Connection: keep-alive was honoured, not forwarded).
        assert (await c.request("GET", "/headers")).status == 200


@aio(10)
async def test_hop_by_hop_response_headers_dropped() -> None:
    reply = (
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: X-Internal\r\nX-Internal: 1\r\n"
        b"Keep-Alive: timeout=5\r\nProxy-Authenticate: Basic\r\nTrailer: X-T\r\n"
        b"Upgrade: h2c\r\nX-End: 1\r\nX-End: 2\r\n\r\nok"
    )
    async with (
        fake_backend(respond=lambda conn, seen: reply) as fb,
        running_proxy(fb.target()) as p,
    ):
        c = await p.connect()
        r = await c.request("GET", "/")
        assert (r.status, r.body) == (200, b"ok")
        assert r.headers == [(b"Content-Length", b"2"), (b"X-End", b"1"), (b"X-End", b"2")]
        assert (await c.request("GET", "/again")).body == b"ok"
        assert len(fb.conns) == 1


def test_the_response_framing_expression_finds_every_hop_by_hop_field() -> None:
    # A field it missed would go to the client byte for byte (the plain-head path): the
    # expression, written out for speed, must stay the twin of HOP_BY_HOP.
    for name in [*HOP_BY_HOP, b"content-length"]:
        head = b"http/1.1 200 ok\r\n" + name + b": x\r\n\r\n"
        assert RESPONSE_FRAMING.findall(head) == [(name, b" x")], name
    assert RESPONSE_FRAMING.findall(b"http/1.1 200 ok\r\nx-connection: 1\r\n\r\n") == []


@aio(10)
async def test_plain_response_head_goes_on_byte_for_byte() -> None:
    # Nothing hop-by-hop in it and nothing for the proxy to add: the head is not
    # rebuilt field by field (spacing, case, order and repeats stay as they came).
    reply = (
        b"HTTP/1.1 200 Fine Thanks\r\nX-A:  spaced \t\r\ncontent-length: 2\r\n"
        b"X-Dup: 1\r\nx-dup: 2\r\nSet-Cookie: a=1; Path=/\r\n\r\nok"
    )
    async with (
        fake_backend(respond=lambda conn, seen: reply) as fb,
        running_proxy(fb.target()) as p,
    ):
        c = await p.connect()
        for _ in range(2):
            c.send(request_bytes())
            assert await asyncio.wait_for(c.reader.readexactly(len(reply)), 5) == reply
        assert len(fb.conns) == 1


@aio(10)
async def test_response_head_cut_from_reads_in_pieces_and_after_interim_answers() -> None:
    # The head is cut from the bytes read once the parser accepted it: it may come a
    # byte at a time, or after interim answers in the same read.
    reply = (
        b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>\r\n\r\n"
        b"HTTP/1.1 100 Continue\r\n\r\n"
        b"HTTP/1.1 200 Fine\r\nContent-Length: 2\r\nConnection: X-Hop\r\nX-Hop: 1\r\n"
        b"X-Kept: 1\r\n\r\nok"
    )

    def respond(conn: FakeConn, seen: Seen) -> bytes:
        if seen.url != b"/pieces":
            return reply
        assert conn.transport is not None
        loop = asyncio.get_running_loop()
        for i in range(len(reply)):
            loop.call_later(0.002 * i, conn.transport.write, reply[i : i + 1])
        return b""

    async with fake_backend(respond=respond) as fb, running_proxy(fb.target()) as p:
        c = await p.connect()
        for path in ("/together", "/pieces", "/together"):
            c.send(request_bytes("GET", path))
            early = await c.response()
            assert (early.status, early.headers) == (103, [(b"Link", b"</s.css>")])
            assert (await c.response()).status == 100
            r = await c.response()
            assert (r.status, r.reason, r.body) == (200, b"Fine", b"ok")
            assert r.headers == [(b"Content-Length", b"2"), (b"X-Kept", b"1")]
        assert len(fb.conns) == 1


@aio(10)
async def test_non_websocket_upgrade_is_forwarded_plain_then_connection_closes(
    backend: Backend,
) -> None:
    async with running_proxy(Target(Endpoint(HOST, backend.port))) as p:
        c = await p.connect()
        headers = [("Connection", "Upgrade"), ("Upgrade", "h2c")]
        r = await c.request("GET", "/headers", headers)
        assert r.status == 200
        assert r.get("Connection") == b"close"
        names = [h[0].lower() for h in r.json()["headers"]]
        assert "upgrade" not in names and "connection" not in names
        assert await c.rest() == b""


@aio(10)
async def test_websocket_upgrade_headers_reach_the_instance(backend: Backend) -> None:
    # The instance declines (an ordinary 200): the answer passes, then the connection closes.
    async with running_proxy(Target(Endpoint(HOST, backend.port))) as p:
        c = await p.connect()
        headers = [("Connection", "keep-alive, Upgrade"), ("Upgrade", "websocket")]
        r = await c.request("GET", "/headers", headers)
        assert r.status == 200 and r.get("Connection") == b"close"
        got = {h[0].lower(): h[1] for h in r.json()["headers"]}
        assert got["upgrade"] == "websocket" and got["connection"] == "Upgrade"
        assert await c.rest() == b""


# == 7. Set-Cookie ===================================================================


@aio(10)
async def test_two_set_cookie_headers_preserved(backend: Backend) -> None:
    async with running_proxy(Target(Endpoint(HOST, backend.port))) as p:
        c = await p.connect()
        r = await c.request("GET", "/cookies")
        assert r.status == 200
        assert r.get_all("Set-Cookie") == [b"a=1; Path=/", b"b=2; Path=/"]


# == 8. bodies ===================================================================


async def _upload_5mib(c: Client, timeout: float = 5) -> None:
    body = os.urandom(5 * MiB)
    c.send(request_bytes("POST", "/echo", [("Content-Type", "application/x-t")], body))
    r = await c.response(timeout=timeout)
    assert r.status == 200
    assert r.get("X-Echo-Length") == str(len(body)).encode()
    assert r.get("Content-Type") == b"application/x-t"
    assert len(r.body) == len(body) and r.body == body


@aio(15)
async def test_content_length_upload_5mib_on_pooled_connection(backend: Backend) -> None:
    async with running_proxy(Target(Endpoint(HOST, backend.port))) as p:
        c = await p.connect()
        assert (await c.request("GET", "/warm")).status == 200  # pools an upstream connection
        for _ in range(2):
            await _upload_5mib(c)


@aio(10)
async def test_content_length_upload_5mib_on_new_connection(backend: Backend) -> None:
    # A fresh Target: no pooled connection, so the body arrives while connecting
    # and more than BODY_BUFFER_LIMIT of it is buffered (client reading paused).
    async with running_proxy(Target(Endpoint(HOST, backend.port))) as p:
        c = await p.connect()
        await _upload_5mib(c, timeout=2)


@aio(10)
async def test_chunked_upload_many_chunks(backend: Backend) -> None:
    parts = [os.urandom((i * 37) % 3000 + 1) for i in range(800)]
    wire = b"".join(b"%x\r\n%b\r\n" % (len(x), x) for x in parts) + b"0\r\n\r\n"
    async with running_proxy(Target(Endpoint(HOST, backend.port))) as p:
        c = await p.connect()
        head = b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        c.send(head)
        for i in range(0, len(wire), 7777):  # split at arbitrary points
            c.send(wire[i : i + 7777])
            await asyncio.sleep(0)
        r = await c.response()
        assert r.status == 200 and r.get("X-Echo-Length") is None
        assert r.body == b"".join(parts)
        # with a chunk extension and a trailer
        c.send(head + b"3;ext=1\r\nabc\r\n2\r\nde\r\n0\r\nX-Trailer: 1\r\n\r\n")
        r = await c.response()
        assert (r.status, r.body) == (200, b"abcde")


@aio(10)
async def test_chunked_upload_reaches_backend_chunked() -> None:
    async with fake_backend() as fb, running_proxy(fb.target()) as p:
        c = await p.connect()
        c.send(
            b"POST /up HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
        )
        assert (await c.response()).status == 200
        seen = fb.requests[0]
        assert seen.body == b"hello world"
        assert [n.lower() for n, _ in seen.headers].count(b"transfer-encoding") == 1
        assert b"content-length" not in [n.lower() for n, _ in seen.headers]


@aio(10)
async def test_download_10mb_intact(backend: Backend) -> None:
    n = 10_000_000
    async with running_proxy(Target(Endpoint(HOST, backend.port))) as p:
        c = await p.connect()
        r = await c.request("GET", f"/bytes?n={n}", timeout=8)
        assert r.status == 200 and r.get("Content-Length") == str(n).encode()
        assert len(r.body) == n
        expected = (bytes(range(256)) * (n // 256 + 1))[:n]
        assert r.body == expected


@aio(10)
async def test_chunked_response_streams_in_chunks(backend: Backend) -> None:
    async with running_proxy(Target(Endpoint(HOST, backend.port))) as p:
        c = await p.connect()
        c.send(request_bytes("GET", "/chunked?n=20"))
        started = time.monotonic()
        r = await c.head()
        assert r.status == 200 and r.get("Transfer-Encoding") == b"chunked"
        assert r.get("Content-Length") is None
        first = await asyncio.wait_for(c.reader.readexactly(13), 5)  # size + first chunk
        first_at = time.monotonic() - started
        assert first == b"8\r\nchunk 0\n\r\n"
        rest = await asyncio.wait_for(c.reader.readuntil(b"0\r\n\r\n"), 5)
        done_at = time.monotonic() - started
        body = b"".join(b"8\r\nchunk %d\n\r\n" % i for i in range(1, 10))
        body += b"".join(b"9\r\nchunk %d\n\r\n" % i for i in range(10, 20))
        assert rest == body + b"0\r\n\r\n"
        assert done_at - first_at > 0.1  # streamed, not collected then sent
        assert (await c.request("GET", "/after")).json()["path"] == "/after"


@aio(10)
async def test_http10_client(backend: Backend) -> None:
    async with running_proxy(Target(Endpoint(HOST, backend.port))) as p:
        # A response without length: sent raw, ended by closing.
        c = await p.connect()
        c.send(b"GET /chunked?n=3 HTTP/1.0\r\nHost: old.example\r\n\r\n")
        r = await c.head()
        assert r.status == 200 and r.get("Connection") == b"close"
        assert r.get("Transfer-Encoding") is None and r.get("Content-Length") is None
        assert await c.rest() == b"chunk 0\nchunk 1\nchunk 2\n"

        # With a length, no keep-alive asked: closes after.
        c = await p.connect()
        c.send(b"GET /x HTTP/1.0\r\nHost: old.example\r\n\r\n")
        r = await c.response()
        assert r.status == 200 and r.json()["path"] == "/x"
        assert r.get("Connection") == b"close"
        assert await c.rest() == b""

        # Keep-alive asked and the response has a length: stays open.
        c = await p.connect()
        for path in ("/ka1", "/ka2"):
            c.send(b"GET %b HTTP/1.0\r\nHost: h\r\nConnection: keep-alive\r\n\r\n" % path.encode())
            r = await c.response()
            assert r.status == 200 and r.json()["path"] == path
            assert r.get("Connection") == b"keep-alive"
        # ...until a response without length.
        c.send(b"GET /chunked?n=2 HTTP/1.0\r\nHost: h\r\nConnection: keep-alive\r\n\r\n")
        r = await c.head()
        assert r.get("Connection") == b"close" and r.get("Transfer-Encoding") is None
        assert await c.rest() == b"chunk 0\nchunk 1\n"


@aio(10)
async def test_http10_client_without_host(backend: Backend) -> None:
    async with running_proxy(Target(Endpoint(HOST, backend.port))) as p:
        c = await p.connect()
        c.send(b"GET /x HTTP/1.0\r\n\r\n")  # valid HTTP/1.0: Host is optional
        r = await c.response()
        assert r.status == 200 and r.json()["path"] == "/x"


@aio(10)
async def test_pipelined_http10_then_http11_response_not_chunked(backend: Backend) -> None:
    async with running_proxy(Target(Endpoint(HOST, backend.port))) as p:
        c = await p.connect()
        c.send(
            b"GET /chunked?n=2 HTTP/1.0\r\nHost: h\r\nConnection: keep-alive\r\n\r\n"
            b"GET /after HTTP/1.1\r\nHost: x\r\n\r\n"
        )
        r = await c.head()
        assert r.status == 200
        # An HTTP/1.0 client cannot read chunked encoding (RFC 9112 6.1).
        assert r.get("Transfer-Encoding") is None
        assert r.get("Connection") == b"close"


# == 9/10. responses without body ========================================================


@aio(10)
async def test_head_then_next_request_on_same_connection(backend: Backend) -> None:
    # Only routes built on web.Response: the demo's streamed routes (/bytes, /chunked)
    # send a body even to HEAD (aiohttp StreamResponse), which no proxy can frame.
    target = Target(Endpoint(HOST, backend.port))
    async with running_proxy(target) as p:
        c = await p.connect()
        for path in ("/", "/headers", "/cookies"):
            r = await c.request("HEAD", path)
            assert r.status == 200 and int(r.get("Content-Length") or 0) > 0
            r = await c.request("GET", f"/after{path}")
            assert r.status == 200 and r.json()["path"] == f"/after{path}"
        # pipelined: the HEAD response's announced length must not eat the next response
        c.send(request_bytes("HEAD", "/") + request_bytes("GET", "/second"))
        h = await c.response(head_only=True)
        assert h.status == 200 and int(h.get("Content-Length") or 0) > 0
        r = await c.response()
        assert r.status == 200 and r.json()["path"] == "/second"
        assert len(target.connections) == 1  # the upstream connection survived every HEAD


@aio(10)
async def test_head_with_announced_body_framing() -> None:
    heads = {
        b"/cl": b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n",
        b"/te": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"/none": b"HTTP/1.1 200 OK\r\nX-A: 1\r\n\r\n",
    }

    def respond(conn: FakeConn, seen: Seen) -> bytes:
        return heads[seen.url] if seen.method == b"HEAD" else OK_RESPONSE

    async with fake_backend(respond=respond) as fb, running_proxy(fb.target()) as p:
        c = await p.connect()
        for path in ("/cl", "/te", "/none"):
            c.send(request_bytes("HEAD", path) + request_bytes("GET", "/next"))
            h = await c.head()
            assert h.status == 200
            assert h.get("Content-Length") == (b"1000" if path == "/cl" else None)
            r = await c.response()
            assert (r.status, r.body) == (200, b"ok")
        assert len(fb.conns) == 1
        assert [s.method for s in fb.requests] == [b"HEAD", b"GET"] * 3


@aio(10)
async def test_head_response_with_connection_close_is_not_reused() -> None:
    def respond(conn: FakeConn, seen: Seen) -> bytes:
        if seen.method == b"HEAD":
            assert conn.transport is not None
            asyncio.get_running_loop().call_later(0.3, conn.transport.close)
            return b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close\r\n\r\n"
        return OK_RESPONSE

    async with fake_backend(respond=respond) as fb, running_proxy(fb.target()) as p:
        c = await p.connect()
        assert (await c.request("HEAD", "/h")).status == 200
        assert (await c.request("GET", "/g")).status == 200
        # RFC 9112 9.6: no further request on a connection after "close".
        assert [(s.method, s.conn) for s in fb.requests] == [(b"HEAD", 0), (b"GET", 1)]


@pytest.mark.parametrize("code", [204, 304])
@aio(10)
async def test_no_body_status_then_next_request(backend: Backend, code: int) -> None:
    async with running_proxy(Target(Endpoint(HOST, backend.port))) as p:
        c = await p.connect()
        r = await c.request("GET", f"/status/{code}")
        assert r.status == code
        assert r.get("Transfer-Encoding") is None
        r = await c.request("GET", "/next")
        assert r.status == 200 and r.json()["path"] == "/next"


# == 11. Expect: 100-continue ============================================================


@aio(10)
async def test_expect_100_continue(backend: Backend) -> None:
    async with running_proxy(Target(Endpoint(HOST, backend.port))) as p:
        c = await p.connect()
        body = b"x" * 1000 + b"end"
        c.send(
            b"POST /echo HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
            b"Content-Length: %d\r\n\r\n" % len(body)
        )
        interim = await c.response()
        assert (interim.version, interim.status, interim.reason) == (
            b"HTTP/1.1",
            100,
            b"Continue",
        )
        c.send(body)
        r = await c.response()
        assert (r.status, r.body) == (200, body)
        assert (await c.request("GET", "/next")).status == 200


# == 12/13. no target, dead target ======================================================


@aio(10)
async def test_no_target_503_after_hold_timeout(backend: Backend) -> None:
    async with running_proxy(None, name="shop", hold_timeout=0.5) as p:
        c = await p.connect()
        started = time.monotonic()
        r = await c.request("GET", "/")
        waited = time.monotonic() - started
        assert 0.45 <= waited < 2.0
        assert (r.status, r.reason) == (503, b"Service Unavailable")
        assert r.get("Retry-After") == b"1"
        assert r.body == b"rotator: shop: service unavailable\n"
        assert r.get("Content-Length") == str(len(r.body)).encode()
        # The same connection works once a target exists.
        p.swap(Target(Endpoint(HOST, backend.port)))
        r = await c.request("GET", "/now")
        assert r.status == 200 and r.json()["path"] == "/now"


@aio(10)
async def test_target_appearing_during_hold_is_used(backend: Backend) -> None:
    async with running_proxy(None, hold_timeout=3.0) as p:
        c = await p.connect()
        started = time.monotonic()
        c.send(request_bytes("GET", "/held"))
        await asyncio.sleep(0.2)
        p.swap(Target(Endpoint(HOST, backend.port)))
        r = await c.response()
        assert r.status == 200 and r.json()["path"] == "/held"
        assert 0.2 <= time.monotonic() - started < 1.5


@aio(10)
async def test_client_leaving_while_held_leaves_nothing_behind(backend: Backend) -> None:
    async with running_proxy(None, hold_timeout=3.0) as p:
        c = await p.connect()
        c.send(request_bytes("GET", "/held"))
        await asyncio.sleep(0.1)
        c.close()
        assert p.listener is not None
        await until(lambda: not p.listener.connections if p.listener else True)
        target = Target(Endpoint(HOST, backend.port))
        p.swap(target)
        await asyncio.sleep(0.1)
        assert (target.in_flight, target.served) == (0, 0)
        c2 = await p.connect()
        assert (await c2.request("GET", "/")).status == 200


@aio(10)
async def test_refused_backend_is_held_then_503() -> None:
    # A refused connect means the instance is gone: the request waits (hold_timeout)
    # for a replacement, and without one answers 503, whatever the method.
    async with running_proxy(
        Target(Endpoint(HOST, free_port())), name="shop", hold_timeout=0.3
    ) as p:
        c = await p.connect()
        started = time.monotonic()
        r = await c.request("GET", "/")
        assert time.monotonic() - started >= 0.25
        assert (r.status, r.reason) == (503, b"Service Unavailable")
        assert r.body == b"rotator: shop: service unavailable\n"
        assert r.get("Retry-After") == b"1"
        r = await c.request("POST", "/echo", body=b"abc")
        assert r.status == 503
        assert p.targets[0].in_flight == 0


@aio(10)
async def test_refused_request_is_retried_on_the_replacement(backend: Backend) -> None:
    async with running_proxy(Target(Endpoint(HOST, free_port())), hold_timeout=3.0) as p:
        c = await p.connect()
        c.send(request_bytes("POST", "/echo", body=b"payload"))
        await asyncio.sleep(0.2)  # refused, now held
        p.swap(Target(Endpoint(HOST, backend.port)))
        r = await c.response()
        assert (r.status, r.body) == (200, b"payload")
        assert p.targets[0].in_flight == 0


@aio(10)
async def test_backend_sending_garbage_gives_502() -> None:
    async with (
        fake_backend(respond=lambda conn, seen: b"NOT HTTP AT ALL\r\n\r\n") as fb,
        running_proxy(fb.target()) as p,
    ):
        c = await p.connect()
        r = await c.request("GET", "/")
        assert r.status == 502 and r.body == b"rotator: demo: bad gateway\n"


@aio(10)
async def test_backend_switching_protocols_gives_502() -> None:
    def respond(conn: FakeConn, seen: Seen) -> bytes:
        if seen.url == b"/ws":
            return b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
        return OK_RESPONSE

    async with fake_backend(respond=respond) as fb, running_proxy(fb.target()) as p:
        c = await p.connect()
        r = await c.request("GET", "/ws")
        assert (r.status, r.body) == (502, b"rotator: demo: bad gateway\n")
        r = await c.request("GET", "/next")
        assert (r.status, r.body) == (200, b"ok")
        await until(lambda: fb.conns[0].closed)  # that instance connection is not reused
        assert p.targets[0].in_flight == 0


# == 14. switching targets ===============================================================


@aio(15)
async def test_swap_moves_keepalive_connection_and_drains_old(
    backend: Backend, backend_b: Backend
) -> None:
    old, new = Target(Endpoint(HOST, backend.port)), Target(Endpoint(HOST, backend_b.port))
    async with running_proxy(old) as p:
        c = await p.connect()
        slow = await p.connect()
        for _ in range(3):
            assert (await c.request("GET", "/")).json()["pid"] == backend.pid

        slow.send(request_bytes("GET", "/slow?seconds=1"))
        await until(lambda: old.in_flight == 1)
        started = time.monotonic()
        assert p.swap(new) is old
        old.retire()

        # The next request on the SAME client connection goes to the new instance.
        r = await c.request("GET", "/")
        assert r.status == 200 and r.json()["pid"] == backend_b.pid
        assert r.get("X-Instance-Pid") == str(backend_b.pid).encode()
        assert old.in_flight == 1 and new.in_flight == 0

        drain = asyncio.ensure_future(old.drain(5))
        await asyncio.sleep(0.3)
        assert not drain.done() and old.in_flight == 1

        r = await slow.response()
        finished = time.monotonic()
        assert r.status == 200 and r.json()["pid"] == backend.pid
        assert await asyncio.wait_for(drain, 2) == 0
        assert finished - started >= 0.7
        assert old.in_flight == 0 and old.idle == []
        # The old instance got no new connection after the swap; its last one closes.
        await until(lambda: not old.connections)
        r = await slow.request("GET", "/")
        assert r.json()["pid"] == backend_b.pid


@aio(10)
async def test_drain_times_out_with_count(backend: Backend, backend_b: Backend) -> None:
    old = Target(Endpoint(HOST, backend.port))
    async with running_proxy(old) as p:
        slow = await p.connect()
        slow.send(request_bytes("GET", "/slow?seconds=2"))
        await until(lambda: old.in_flight == 1)
        p.swap(Target(Endpoint(HOST, backend_b.port)))
        started = time.monotonic()
        assert await old.drain(0.2) == 1
        assert 0.15 <= time.monotonic() - started < 1


CLOSE_ALL_ORPHANS = (
    "Target.close_all() orphans in-flight exchanges: UpstreamConnection.close() sets "
    "self.exchange = None before transport.close(), so connection_lost() never calls "
    "Exchange.upstream_lost(); the client hangs and target.in_flight never returns to 0"
)


@aio(10)
async def test_close_all_before_response_answers_502(backend: Backend, backend_b: Backend) -> None:
    old = Target(Endpoint(HOST, backend.port))
    async with running_proxy(old) as p:
        slow = await p.connect()
        slow.send(request_bytes("GET", "/slow?seconds=2"))
        await until(lambda: old.in_flight == 1)
        p.swap(Target(Endpoint(HOST, backend_b.port)))
        assert await old.drain(0.1) == 1
        old.close_all()  # the drain deadline passed: cut what is left
        # Cut before any response byte, on a connection never used before: a 502 now.
        r = await slow.response(timeout=1)
        assert (r.status, r.body) == (502, b"rotator: demo: bad gateway\n")
        assert old.in_flight == 0


@aio(10)
async def test_close_all_mid_response_closes_client(backend: Backend, backend_b: Backend) -> None:
    old = Target(Endpoint(HOST, backend.port))
    async with running_proxy(old) as p:
        c = await p.connect()
        c.send(request_bytes("GET", "/bytes?n=50000000"))
        assert (await c.head()).status == 200
        await asyncio.wait_for(c.reader.readexactly(MiB), 5)
        p.swap(Target(Endpoint(HOST, backend_b.port)))
        old.close_all()
        # Part of the body is out: the client must see the connection end, not wait forever.
        with contextlib.suppress(ConnectionResetError):
            while await asyncio.wait_for(c.reader.read(MiB), 1):
                pass
        assert old.in_flight == 0


@aio(15)
async def test_swap_under_load_loses_nothing(backend: Backend, backend_b: Backend) -> None:
    targets = [Target(Endpoint(HOST, backend.port)), Target(Endpoint(HOST, backend_b.port))]
    async with running_proxy(targets[0]) as p:
        statuses: list[int] = []
        pids: set[int] = set()
        stop = asyncio.Event()

        async def client(keep: bool) -> None:
            connector = aiohttp.TCPConnector(force_close=not keep)
            timeout = aiohttp.ClientTimeout(total=5)
            async with aiohttp.ClientSession(connector=connector, timeout=timeout) as s:
                while not stop.is_set():
                    async with s.get(f"http://{HOST}:{p.port}/") as resp:
                        statuses.append(resp.status)
                        pids.add((await resp.json())["pid"])

        tasks = [asyncio.ensure_future(client(i % 2 == 0)) for i in range(8)]
        for i in range(10):
            await asyncio.sleep(0.06)
            old = p.swap(Target(Endpoint(HOST, targets[(i + 1) % 2].port)))
            assert old is not None
            old.retire()
        stop.set()
        await asyncio.gather(*tasks)
        assert len(statuses) > 50
        assert set(statuses) == {200}
        assert pids == {backend.pid, backend_b.pid}


# == 15. backend that closes every connection ===========================================


@aio(15)
async def test_backend_closing_every_connection(closing_backend: Backend) -> None:
    target = Target(Endpoint(HOST, closing_backend.port))
    async with running_proxy(target) as p:
        c = await p.connect()
        for i in range(200):
            r = await c.request("GET", f"/n{i}")
            assert r.status == 200 and r.json()["path"] == f"/n{i}"
            assert r.get("Connection") is None  # the instance's "close" is not ours
        assert (target.served, target.in_flight) == (200, 0)
        assert len(target.idle) == 0


# == 16. client leaving mid-response =====================================================


@aio(10)
async def test_client_disconnect_mid_response(backend: Backend) -> None:
    target = Target(Endpoint(HOST, backend.port))
    async with running_proxy(target) as p:
        c = await p.connect()
        c.send(request_bytes("GET", "/bytes?n=50000000"))
        r = await c.head()
        assert r.status == 200
        got = 0
        while got < 1 * MiB:
            got += len(await asyncio.wait_for(c.reader.read(65536), 5))
        assert target.in_flight == 1
        c.close()
        await until(lambda: target.in_flight == 0 and not target.connections)
        assert p.listener is not None and not p.listener.connections
        c2 = await p.connect()
        r = await c2.request("GET", "/after")
        assert r.status == 200 and r.json()["path"] == "/after"
        assert target.in_flight == 0


# == 17. flow control: bounded memory ====================================================


async def _rss_sampler(peak: list[int], stop: asyncio.Event) -> None:
    proc = psutil.Process()
    while not stop.is_set():
        peak[0] = max(peak[0], proc.memory_info().rss)
        await asyncio.sleep(0.01)


async def _read_pattern(reader: asyncio.StreamReader, n: int, slow_reads: int) -> int:
    got = 0
    while got < n:
        data = await asyncio.wait_for(reader.read(65536 if slow_reads > 0 else MiB), 5)
        assert data, f"EOF after {got} of {n} bytes"
        assert data == pattern(len(data), got), f"wrong bytes at offset {got}"
        got += len(data)
        if slow_reads > 0:
            slow_reads -= 1
            await asyncio.sleep(0.03)
    return got


@aio(20)
async def test_download_200mb_slow_reader_bounded_memory(backend: Backend) -> None:
    n = 200 * MiB
    async with running_proxy(Target(Endpoint(HOST, backend.port))) as p:
        c = await p.connect()
        c.send(request_bytes("GET", f"/bytes?n={n}"))
        r = await c.head()
        assert r.status == 200 and r.get("Content-Length") == str(n).encode()
        base = psutil.Process().memory_info().rss
        peak, stop = [base], asyncio.Event()
        sampler = asyncio.ensure_future(_rss_sampler(peak, stop))
        try:
            assert await _read_pattern(c.reader, n, slow_reads=15) == n
        finally:
            stop.set()
            await sampler
        assert peak[0] - base < 50 * MiB, f"RSS grew {(peak[0] - base) / MiB:.0f} MiB"
        assert (await c.request("GET", "/after")).status == 200


@aio(25)
async def test_upload_200mb_echo_slow_reader_bounded_memory(backend: Backend) -> None:
    n = 200 * MiB
    block = pattern(MiB)
    async with running_proxy(Target(Endpoint(HOST, backend.port))) as p:
        c = await p.connect()
        assert (await c.request("GET", "/warm")).status == 200  # see the xfail 5 MiB test

        async def upload() -> None:
            c.send(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % n)
            for _ in range(n // MiB):
                c.send(block)
                await c.writer.drain()

        base = psutil.Process().memory_info().rss
        peak, stop = [base], asyncio.Event()
        sampler = asyncio.ensure_future(_rss_sampler(peak, stop))
        writer = asyncio.ensure_future(upload())
        try:
            r = await c.head(timeout=10)
            assert r.status == 200 and r.get("Content-Length") == str(n).encode()
            assert await _read_pattern(c.reader, n, slow_reads=15) == n
            await asyncio.wait_for(writer, 5)
        finally:
            writer.cancel()
            stop.set()
            await sampler
        assert peak[0] - base < 50 * MiB, f"RSS grew {(peak[0] - base) / MiB:.0f} MiB"


# == 18. shutdown =======================================================================


@aio(10)
async def test_shutdown_finishes_in_flight_then_refuses(backend: Backend) -> None:
    target = Target(Endpoint(HOST, backend.port))
    async with running_proxy(target) as p:
        assert p.listener is not None
        idle = await p.connect()
        assert (await idle.request("GET", "/")).status == 200
        slow = await p.connect()
        slow.send(request_bytes("GET", "/slow?seconds=1"))
        await until(lambda: target.in_flight == 1)

        started = time.monotonic()
        shutdown = asyncio.ensure_future(p.listener.shutdown(5))
        assert await idle.rest() == b""  # an idle keep-alive connection closes at once
        assert time.monotonic() - started < 0.5
        with pytest.raises(ConnectionRefusedError):
            await asyncio.open_connection(HOST, p.port)

        r = await slow.response()
        assert r.status == 200 and r.json()["slept"] == 1
        assert await slow.rest() == b""
        await asyncio.wait_for(shutdown, 5)
        assert 0.7 <= time.monotonic() - started < 3
        assert not p.listener.connections
        with pytest.raises(ConnectionRefusedError):
            await asyncio.open_connection(HOST, p.port)


# == 19. stale pooled upstream connections ==============================================


@aio(20)
async def test_backend_replaced_on_same_port(tmp_path: Path) -> None:
    port = free_port()
    first = Backend(tmp_path / "first.log", port=port).wait_ready()
    second: Backend | None = None
    try:
        target = Target(Endpoint(HOST, port))
        async with running_proxy(target) as p:
            c = await p.connect()
            r = await c.request("GET", "/")
            assert r.json()["pid"] == first.pid
            assert len(target.idle) == 1
            # Kill and replace without letting the loop run: the proxy has not
            # seen the pooled connection die when the next request comes.
            first.kill()
            second = Backend(tmp_path / "second.log", port=port).wait_ready()
            r = await c.request("GET", "/again")
            assert r.status == 200
            assert r.json()["pid"] == second.pid and r.json()["path"] == "/again"
    finally:
        first.kill()
        if second is not None:
            second.kill()


def _close_on_reuse(conn: FakeConn, seen: Seen) -> bytes | None:
    """A keep-alive race: the instance answers once per connection, then closes."""
    return None if conn.answered else OK_RESPONSE


@aio(10)
async def test_stale_pooled_connection_get_retried_once() -> None:
    async with fake_backend(respond=_close_on_reuse) as fb, running_proxy(fb.target()) as p:
        c = await p.connect()
        assert (await c.request("GET", "/1")).body == b"ok"
        r = await c.request("GET", "/2")
        assert (r.status, r.body) == (200, b"ok")
        assert [(s.url, s.conn) for s in fb.requests] == [(b"/1", 0), (b"/2", 0), (b"/2", 1)]
        assert p.targets[0].in_flight == 0


@aio(10)
async def test_retry_is_bounded() -> None:
    # Closed without an answer on a pooled connection, then on a fresh one: the
    # instance looks like it is dying, so the GET waits (hold_timeout) for another
    # target; none comes: 503. Never a third send.
    def respond(conn: FakeConn, seen: Seen) -> bytes | None:
        return None if seen.url == b"/die" else OK_RESPONSE

    async with (
        fake_backend(respond=respond) as fb,
        running_proxy(fb.target(), hold_timeout=0.3) as p,
    ):
        c = await p.connect()
        assert (await c.request("GET", "/1")).body == b"ok"
        r = await c.request("GET", "/die")
        assert r.status == 503
        assert [s.url for s in fb.requests] == [b"/1", b"/die", b"/die"]


@aio(10)
async def test_stale_connection_post_not_retried() -> None:
    async with fake_backend(respond=_close_on_reuse) as fb, running_proxy(fb.target()) as p:
        c = await p.connect()
        assert (await c.request("GET", "/1")).body == b"ok"
        r = await c.request("POST", "/charge", body=b"")
        # The instance may have acted on it: sending it again could charge twice.
        assert [s.url for s in fb.requests].count(b"/charge") == 1
        assert r.status == 502


# == more: flow-control state after an early response ====================================


@aio(10)
async def test_early_response_while_upload_buffered_keeps_connection_usable() -> None:
    def early(conn: FakeConn, seen: Seen) -> None:
        # Like a 401/413: answer on the head, read the body only later.
        if seen.method == b"POST" and conn.transport is not None:
            conn.transport.write(OK_RESPONSE)
            conn.answered += 1
            conn.transport.pause_reading()
            asyncio.get_running_loop().call_later(0.3, conn.transport.resume_reading)

    def respond(conn: FakeConn, seen: Seen) -> bytes:
        return b"" if seen.method == b"POST" else OK_RESPONSE

    async with (
        fake_backend(respond=respond, on_head=early, rcvbuf=4096) as fb,
        running_proxy(fb.target()) as p,
    ):
        c = await p.connect()
        assert (await c.request("GET", "/warm")).body == b"ok"
        # Make the pooled upstream socket small so the body cannot all go out at once,
        # and let the whole request reach the proxy in one read.
        (up,) = p.targets[0].idle
        assert up.transport is not None
        up.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        assert p.listener is not None
        (cc,) = p.listener.connections
        assert cc.transport is not None
        cc.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, MiB)
        c.writer.transport.get_extra_info("socket").setsockopt(
            socket.SOL_SOCKET, socket.SO_SNDBUF, MiB
        )
        c.send(request_bytes("POST", "/upload", body=b"u" * 150_000))
        r = await c.response()
        assert (r.status, r.body) == (200, b"ok")
        await asyncio.sleep(0.5)  # the instance has read the body by now
        assert fb.requests[-1].method == b"POST" and len(fb.requests[-1].body) == 150_000
        r = await c.request("GET", "/next", timeout=1)
        assert (r.status, r.body) == (200, b"ok")


@aio(10)
async def test_idle_and_half_sent_connections_are_closed_after_keepalive_timeout(
    backend: Backend,
) -> None:
    async with running_proxy(Target(Endpoint(HOST, backend.port)), keepalive_timeout=0.4) as p:
        idle = await p.connect()
        assert (await idle.request("GET", "/")).status == 200
        slow = await p.connect()
        slow.send(b"GET / HTTP/1.1\r\nHost: x\r\n")  # a head that never ends
        busy = await p.connect()
        busy.send(request_bytes("GET", "/slow?seconds=1"))
        await asyncio.sleep(0.1)
        assert len(p.listener.connections) == 3
        started = time.monotonic()
        assert await asyncio.wait_for(idle.rest(), 2) == b""
        assert time.monotonic() - started >= 0.2  # not before the timeout
        assert await asyncio.wait_for(slow.rest(), 2) == b""
        response = await busy.response()  # in progress: never swept
        assert response.status == 200


# == limits: timeouts, trusted forwarding, header sizes ==================================


@aio(10)
async def test_read_timeout_gives_504_naming_the_component(backend: Backend) -> None:
    limits = Limits(read_timeout=0.3)
    async with running_proxy(Target(Endpoint(HOST, backend.port)), name="shop", limits=limits) as p:
        c = await p.connect()
        started = time.monotonic()
        r = await c.request("GET", "/slow?seconds=3")
        assert time.monotonic() - started < 2
        assert (r.status, r.body) == (504, b"rotator: shop: gateway timeout (read_timeout 300ms)\n")
        assert (await c.request("GET", "/")).status == 200  # the connection goes on
        assert p.targets[0].in_flight == 0


@aio(10)
async def test_read_timeout_mid_body_cuts_the_connection(backend: Backend) -> None:
    # /chunked sends a chunk every 10 ms: never idle long enough for read_timeout...
    limits = Limits(read_timeout=0.5, request_timeout=0.4)
    async with running_proxy(Target(Endpoint(HOST, backend.port)), limits=limits) as p:
        c = await p.connect()
        c.send(request_bytes("GET", "/chunked?n=200"))
        assert (await c.head()).status == 200
        # ...but request_timeout bounds the whole exchange: cut mid-body.
        rest = await c.rest(timeout=3)
        assert not rest.endswith(b"0\r\n\r\n")


@aio(10)
async def test_forwarded_headers_are_replaced_unless_trusted(backend: Backend) -> None:
    claimed = [
        ("X-Forwarded-For", "6.6.6.6"),
        ("X-Forwarded-Proto", "https"),
        ("X-Forwarded-Host", "shop.example"),
    ]
    for trust, expected in (
        (
            False,
            {"x-forwarded-for": "127.0.0.1", "x-forwarded-proto": "http", "x-forwarded-host": "x"},
        ),
        (
            True,
            {
                "x-forwarded-for": "6.6.6.6, 127.0.0.1",
                "x-forwarded-proto": "https",
                "x-forwarded-host": "shop.example",
            },
        ),
    ):
        limits = Limits(trust_forwarded=trust)
        async with running_proxy(Target(Endpoint(HOST, backend.port)), limits=limits) as p:
            c = await p.connect()
            r = await c.request("GET", "/headers", claimed, host="x")
            got = [
                (h[0].lower(), h[1])
                for h in r.json()["headers"]
                if h[0].lower().startswith("x-forwarded")
            ]
            assert sorted(got) == sorted(expected.items()), trust


@aio(10)
async def test_trusted_forwarding_adds_what_is_missing(backend: Backend) -> None:
    async with running_proxy(
        Target(Endpoint(HOST, backend.port)), limits=Limits(trust_forwarded=True)
    ) as p:
        c = await p.connect()
        r = await c.request("GET", "/headers", host="x")
        got = {h[0].lower(): h[1] for h in r.json()["headers"]}
        assert got["x-forwarded-for"] == "127.0.0.1"
        assert got["x-forwarded-proto"] == "http" and got["x-forwarded-host"] == "x"


@aio(10)
async def test_too_many_or_too_large_headers_get_431(backend: Backend) -> None:
    limits = Limits(max_headers=10, max_header_size=2048)
    async with running_proxy(Target(Endpoint(HOST, backend.port)), limits=limits) as p:
        many = await p.connect()
        many.send(request_bytes("GET", "/", [(f"X-H{i}", "v") for i in range(11)]))
        r = await many.response()
        assert r.status == 431 and r.get("Connection") == b"close"
        large = await p.connect()
        large.send(request_bytes("GET", "/", [("X-Big", "v" * 3000)]))
        assert (await large.response()).status == 431
        long_url = await p.connect()
        long_url.send(request_bytes("GET", "/" + "a" * 3000))
        assert (await long_url.response()).status == 431
        ok = await p.connect()
        r = await ok.request("GET", "/", [(f"X-H{i}", "v") for i in range(8)])
        assert r.status == 200
        assert p.targets[0].served == 1  # none of the refused ones reached the instance


@aio(10)
async def test_max_connections_makes_requests_wait_their_turn(backend: Backend) -> None:
    limits = Limits(max_connections=1)
    async with running_proxy(
        Target(Endpoint(HOST, backend.port)), hold_timeout=3.0, limits=limits
    ) as p:
        first, second = await p.connect(), await p.connect()
        started = time.monotonic()
        first.send(request_bytes("GET", "/slow?seconds=0.5"))
        await until(lambda: p.targets[0].in_flight == 1)
        second.send(request_bytes("GET", "/"))
        await asyncio.sleep(0.2)
        assert p.targets[0].in_flight == 1  # the second waits for a slot, not sent yet
        assert (await first.response()).status == 200
        assert (await second.response()).status == 200
        assert time.monotonic() - started >= 0.5


@aio(10)
async def test_max_connections_answers_503_after_hold_and_never_leaks_a_slot(
    backend: Backend,
) -> None:
    limits = Limits(max_connections=1)
    async with running_proxy(
        Target(Endpoint(HOST, backend.port)), hold_timeout=0.3, limits=limits
    ) as p:
        busy = await p.connect()
        busy.send(request_bytes("GET", "/slow?seconds=1"))
        await until(lambda: p.targets[0].in_flight == 1)
        refused = await p.connect()
        r = await refused.request("GET", "/")
        assert r.status == 503 and r.get("Retry-After") == b"1"
        assert b"max_connections reached" in r.body
        leaver = await p.connect()
        leaver.send(request_bytes("GET", "/"))
        await asyncio.sleep(0.1)
        leaver.close()  # gave up while waiting for a slot
        assert (await busy.response()).status == 200
        after = await p.connect()
        assert (await after.request("GET", "/")).status == 200
        assert p.listener is not None and p.listener.slots_in_use == 0


@aio(10)
async def test_compressed_bodies_pass_untouched() -> None:
    body = gzip.compress(b"hello " * 1000)
    head = (
        b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Encoding: gzip\r\n"
        b"Content-Length: %d\r\n\r\n" % len(body)
    )

    def respond(conn: FakeConn, seen: Seen) -> bytes:
        return head + body

    async with fake_backend(respond=respond) as fb, running_proxy(fb.target()) as p:
        c = await p.connect()
        r = await c.request("GET", "/", [("Accept-Encoding", "gzip")])
        assert r.get("Content-Encoding") == b"gzip" and r.body == body
        assert (b"Accept-Encoding", b"gzip") in fb.requests[0].headers


@aio(15)
async def test_many_idle_connections_do_not_stop_others(backend: Backend) -> None:
    async with running_proxy(Target(Endpoint(HOST, backend.port))) as p:
        idle = [await p.connect() for _ in range(300)]
        for c in idle[:100]:
            c.send(b"GET / HTTP/1.1\r\nHost: x\r\n")  # heads that never end
        c = await p.connect()
        started = time.monotonic()
        assert (await c.request("GET", "/")).status == 200
        assert time.monotonic() - started < 1


# == lingering close: the last answer is not lost to a reset ===========================


def blocking_exchange(port: int, head: bytes, body_chunks: int, chunk: bytes) -> bytes:
    """As an upload client does (http.client, curl -T): send the whole request, then read
    the answer. Returns what came back before the end, or raises what the socket raised."""
    with socket.create_connection((HOST, port), timeout=10) as s:
        s.sendall(head)
        for _ in range(body_chunks):
            s.sendall(chunk)
        got = b""
        while data := s.recv(65536):
            got += data
        return got


REFUSE_413 = b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 4\r\nConnection: close\r\n\r\nbig!"


@aio(20)
async def test_an_answer_that_refuses_an_upload_reaches_the_client_still_sending_it() -> None:
    # The instance answers 413 on the head (an app with a body limit), `Connection:
    # close`. The proxy passes it on and ends the connection: closed at once with the rest
    # of 8 MiB unread, its socket would reset the client before it has read the 413.
    def refuse(conn: FakeConn, seen: Seen) -> None:
        if conn.transport is not None:
            conn.transport.write(REFUSE_413)

    async with (
        fake_backend(respond=lambda conn, seen: b"", on_head=refuse) as fb,
        running_proxy(fb.target()) as p,
    ):
        head = request_bytes("POST", "/upload", headers=[("Content-Length", str(8 * MiB))])
        for _ in range(3):
            got = await asyncio.to_thread(blocking_exchange, p.port, head, 128, b"u" * 65536)
            assert got.startswith(b"HTTP/1.1 413 Payload Too Large\r\n") and got.endswith(b"big!")
        assert p.targets[0].in_flight == 0
        # The instance saw each refused upload's head once, on a connection of its own
        # (closed after its 413), and never a request made of the dropped body bytes.
        assert fb.errors == 0 and fb.requests == [] and len(fb.conns) == 3
        assert [bytes(c.raw).count(b"POST /upload HTTP/1.1\r\n") for c in fb.conns] == [1, 1, 1]
        await until(lambda: p.listener is not None and not p.listener.connections)


@aio(20)
async def test_a_431_reaches_a_client_still_sending_its_head() -> None:
    async with running_proxy(None, limits=Limits(max_header_size=8192)) as p:
        head = b"GET / HTTP/1.1\r\nHost: x\r\n"
        for _ in range(3):
            got = await asyncio.to_thread(
                blocking_exchange, p.port, head, 4096, b"X-Filler: " + b"f" * 90 + b"\r\n"
            )
            assert got.startswith(b"HTTP/1.1 431 "), got[:40]


@aio(10)
async def test_a_lingering_connection_is_closed_after_linger_time(
    backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(protocol, "LINGER_TIME", 0.3)
    target = Target(Endpoint(HOST, backend.port))
    async with running_proxy(target) as p:
        assert p.listener is not None
        c = await p.connect()
        # The first asks to close; the one pipelined behind it is dropped, never answered.
        c.send(
            request_bytes("GET", "/", headers=[("Connection", "close")])
            + request_bytes("GET", "/slow?seconds=5")
        )
        r = await c.response()
        assert r.status == 200 and r.get("Connection") == b"close"
        assert await c.rest() == b""  # our side is shut; the client keeps its own open
        assert target.in_flight == 0 and len(p.listener.connections) == 1
        c.send(b"more bytes, dropped")  # read and dropped: no reset
        started = time.monotonic()
        await until(lambda: not p.listener.connections, timeout=3)
        assert 0.2 < time.monotonic() - started < 2.5


@aio(10)
async def test_a_client_that_asked_to_close_is_closed_at_once(backend: Backend) -> None:
    # Nothing more is coming after its whole request: no lingering, no extra cost for a
    # new connection per request.
    async with running_proxy(Target(Endpoint(HOST, backend.port))) as p:
        assert p.listener is not None
        c = await p.connect()
        c.send(request_bytes("GET", "/", headers=[("Connection", "close")]))
        assert (await c.response()).status == 200
        assert await c.rest() == b""
        await until(lambda: not p.listener.connections, timeout=1.0)  # lingering: 2 s or more
