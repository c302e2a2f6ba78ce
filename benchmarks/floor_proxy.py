"""The floor under rotator's proxy: the least a proxy on one uvloop event loop can cost.

    python benchmarks/floor_proxy.py pump|minimal LISTEN_PORT UPSTREAM_PORT

proxy_overhead.py measures these next to rotator, nginx and HAProxy, over the same
backend. Neither is a proxy anyone should run; each pairs every client connection
with a connection of its own to the backend (opened at accept, as a warm pool would
have it ready), and does nothing else:

- `pump` copies bytes both ways and parses nothing: one `data_received` and one
  `write` per direction per request, the event loop's own floor.
- `minimal` parses both ways with httptools, as rotator does (callbacks for the
  request's URL and header fields, the response head cut from the bytes read), and
  sends the request head rebuilt with the X-Forwarded-For, -Proto and -Host headers
  rotator adds, so the backend does the same work behind it. No checks, no limits,
  no pool, no pipelining, no flow control: what parsing HTTP costs in Python and
  nothing more. It assumes a response head arrives in one read (true here).

What rotator costs above `minimal` is what its guarantees and features cost; what
`minimal` costs above `pump` is HTTP parsing; `pump` is uvloop and the kernel.
"""

from __future__ import annotations

import asyncio
import sys

import httptools
import uvloop

HOST = "127.0.0.1"


class Upstream(asyncio.Protocol):
    def __init__(self, client: Client, parse: bool) -> None:
        self.client = client
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self) if parse else None
        self.read = b""
        self.out: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self.parser is None:
            self.client.write(data)
            return
        self.read, self.out = data, []
        self.parser.feed_data(data)
        if self.out:
            self.client.write(b"".join(self.out) if len(self.out) > 1 else self.out[0])

    def on_headers_complete(self) -> None:
        self.out.append(self.read[: self.read.find(b"\r\n\r\n") + 4])

    def on_body(self, body: bytes) -> None:
        self.out.append(body)

    def connection_lost(self, exc: Exception | None) -> None:
        self.client.close()


class Client(asyncio.Protocol):
    def __init__(self, upstream: int, parse: bool) -> None:
        self.upstream_port = upstream
        self.parse = parse
        self.transport: asyncio.Transport | None = None
        self.upstream: Upstream | None = None
        self.waiting: list[bytes] = []  # sent before the upstream connection was open
        self.parser = httptools.HttpRequestParser(self) if parse else None
        self.url = self.host = b""
        self.headers: list[bytes] = []
        self.forwarded = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        ip = transport.get_extra_info("peername")[0].encode()
        self.forwarded = b"X-Forwarded-For: " + ip + b"\r\nX-Forwarded-Proto: http\r\n"
        if self.upstream is None:  # (proxy_instructions.py wires one in beforehand)
            asyncio.get_running_loop().create_task(self._connect())

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        factory = lambda: Upstream(self, self.parse)  # noqa: E731
        _, self.upstream = await loop.create_connection(factory, HOST, self.upstream_port)
        for data in self.waiting:
            self.send(data)
        self.waiting = []

    def send(self, data: bytes) -> None:
        if self.upstream is None or self.upstream.transport is None:
            self.waiting.append(data)
        else:
            self.upstream.transport.write(data)

    def write(self, data: bytes) -> None:
        if self.transport is not None:
            self.transport.write(data)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        if self.parser is None:
            self.send(data)
        else:
            self.parser.feed_data(data)

    def on_message_begin(self) -> None:
        self.headers = []

    def on_url(self, url: bytes) -> None:
        self.url = url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append(name + b": " + value + b"\r\n")
        if name.lower() == b"host":
            self.host = value

    def on_headers_complete(self) -> None:
        assert self.parser is not None
        method = self.parser.get_method()
        line = [method, b" ", self.url, b" HTTP/1.1\r\n"]
        host = [b"X-Forwarded-Host: ", self.host, b"\r\n\r\n"]
        self.send(b"".join([*line, *self.headers, self.forwarded, *host]))

    def on_body(self, body: bytes) -> None:
        self.send(body)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.upstream is not None and self.upstream.transport is not None:
            self.upstream.transport.close()


async def serve(mode: str, listen: int, upstream: int) -> None:
    loop = asyncio.get_running_loop()
    parse = mode == "minimal"
    await loop.create_server(lambda: Client(upstream, parse), HOST, listen, reuse_address=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    mode, listen, upstream = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    if mode not in ("pump", "minimal"):
        sys.exit(f"floor_proxy: mode must be pump or minimal, not {mode!r}")
    uvloop.run(serve(mode, listen, upstream))
