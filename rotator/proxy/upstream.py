"""The instance side of the proxy: one keep-alive HTTP/1.1 connection to an instance.

An UpstreamConnection parses responses with httptools and hands each event to the
Exchange it currently serves (see protocol.py), through the narrow face `Receiver`;
between exchanges it waits in its Target's idle pool. It decides nothing about framing
or status codes, and never reaches the client connection itself.

A response head is handed on as the bytes it arrived as, once httptools has parsed
and validated it: no Python call per header field (see `on_headers_complete`).
"""

from __future__ import annotations

import asyncio
import re
from typing import Protocol, cast

import httptools

from rotator.proxy.route import Target, clock
from rotator.proxy.websocket import FrameBoundary

CONNECTION = re.compile(rb"^connection:(.*)\r$", re.M)  # in a lowercased head


class Receiver(Protocol):
    """What an UpstreamConnection needs of the exchange it serves (protocol.Exchange)."""

    def response_head(self, conn: UpstreamConnection, status: int, head: bytes) -> bool: ...
    def response_body(self, data: bytes) -> None: ...
    def response_complete(self, conn: UpstreamConnection | None, keep_alive: bool) -> None: ...
    def upstream_lost(
        self, conn: UpstreamConnection, exc: Exception | None, *, retry: bool = True
    ) -> None: ...
    def upstream_failed(self, conn: UpstreamConnection, exc: Exception | None) -> None: ...
    def tunnel_bytes(self, data: bytes) -> None: ...  # a websocket's, straight to the client
    def flush(self) -> None: ...  # what this read produced for the client goes out
    def upstream_full(self, full: bool) -> None: ...  # stop (or resume) reading the client


class UpstreamConnection(asyncio.Protocol):
    __slots__ = (
        "_at",
        "_heading",
        "_raw",
        "_reset_parser",
        "exchange",
        "frames",
        "head",
        "last_read",
        "parser",
        "paused",
        "target",
        "transport",
        "tunnel",
        "used",
    )

    def __init__(self, target: Target) -> None:
        self.target = target
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.exchange: Receiver | None = None
        self.head = b""  # the last response head: status line, header lines, empty line
        # The bytes of a response's head(s) as they arrive (until the final head is
        # parsed), and where in them the next head begins (after an interim 1xx).
        self._heading = True
        self._raw: list[bytes] = []
        self._at = 0
        self.used = False  # served a response before: a failure may be a stale keep-alive
        self.paused = False  # reading, stopped while the client's socket is full
        self.last_read = 0.0  # clock() of the last bytes from the instance (read_timeout)
        self.tunnel = False  # a websocket: bytes go to the client untouched
        self.frames = FrameBoundary()  # where the websocket's frames end, once it is one
        self._reset_parser = False

    @property
    def usable(self) -> bool:
        return self.transport is not None and not self.transport.is_closing()

    # -- asyncio.Protocol --------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but behave as one.
        self.transport = cast(asyncio.Transport, transport)
        self.target.connections.add(self)

    def data_received(self, data: bytes) -> None:
        ex = self.exchange
        if ex is None:
            # Bytes nobody asked for: the connection's framing can't be trusted.
            self.close()
            return
        self.last_read = clock()
        if self.tunnel:
            self.frames.feed(data)
            ex.tunnel_bytes(data)
            return
        if self._heading:
            self._raw.append(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            # A 101. For a websocket, what follows its head is the first frames.
            if self.tunnel and len(data) > exc.args[0]:
                self.frames.feed(data[exc.args[0] :])
                ex.response_body(data[exc.args[0] :])
        except httptools.HttpParserError as exc:
            ex.upstream_failed(self, exc)
            return
        if self._reset_parser:
            # A response without a body where the parser expected one (HEAD):
            # start afresh for the next response on this connection.
            self._reset_parser = False
            keep_alive = self._keeps_alive()
            self.parser = httptools.HttpResponseParser(self)
            ex.response_complete(self, keep_alive=keep_alive)
        ex.flush()

    def _keeps_alive(self) -> bool:
        # The parser's own verdict counts a response with no length as ending at
        # EOF, which a reply to HEAD does not: only the Connection header decides.
        tokens = {
            t.strip() for value in CONNECTION.findall(self.head.lower()) for t in value.split(b",")
        }
        if self.parser.get_http_version() == "1.0":
            return b"keep-alive" in tokens
        return b"close" not in tokens

    def eof_received(self) -> bool | None:
        return None  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self.target.connections.discard(self)
        self.transport = None
        del self.parser  # a reference cycle through its callbacks (see ClientConnection)
        ex, self.exchange = self.exchange, None
        if ex is not None:
            ex.upstream_lost(self, exc)

    def pause_writing(self) -> None:
        if self.exchange is not None:
            self.exchange.upstream_full(True)

    def resume_writing(self) -> None:
        if self.exchange is not None:
            self.exchange.upstream_full(False)

    # -- httptools callbacks -------------------------------------------------
    # No on_status or on_header: httptools then calls no Python per field. The head is
    # cut from the bytes read instead, once the parser has accepted all of it; it
    # rejects bare LF, CR or NUL in a value, obs-fold and a space before a colon, so
    # the first empty line after the head's start is where the parser saw it end.
    def on_headers_complete(self) -> None:
        assert self.exchange is not None
        raw = b"".join(self._raw)
        start = self._at
        while raw.startswith(b"\r\n", start):  # empty lines before a status line are skipped
            start += 2
        end = raw.find(b"\r\n\r\n", start)
        if end < 0:
            raise ValueError("response head not found where the parser ended it")
        self.head = raw[start : end + 4]  # with the empty line that ends it
        status = self.parser.get_status_code()
        if status < 200 and status != 101:
            self._raw, self._at = [raw], end + 4  # an interim response: another head follows
        else:
            self._heading, self._raw = False, []
        if not self.exchange.response_head(self, status, self.head):
            self._reset_parser = True

    def on_body(self, body: bytes) -> None:
        if self.exchange is not None and not self._reset_parser:
            self.exchange.response_body(body)

    def on_message_complete(self) -> None:
        if self.exchange is not None and not self._reset_parser:
            self.exchange.response_complete(self, self.parser.should_keep_alive())

    # -- used by Exchange ----------------------------------------------------
    def send(self, exchange: Receiver, request: bytes) -> None:
        """Serve `exchange`: send its request; what comes back is its response."""
        self.exchange = exchange
        self.last_read = clock()  # read_timeout counts from the send
        self._heading, self._raw, self._at = True, [], 0
        if self.transport is not None:
            self.transport.write(request)

    def write(self, data: bytes) -> None:
        if self.transport is not None:
            self.transport.write(data)

    def pause_reading(self, paused: bool) -> None:
        if paused == self.paused:
            return
        self.paused = paused
        if self.transport is not None and not self.transport.is_closing():
            if paused:
                self.transport.pause_reading()
            else:
                self.transport.resume_reading()

    def release(self) -> None:
        """The exchange is over and left the connection clean: back to the pool."""
        self.exchange = None
        self.used = True
        if self.paused:
            self.pause_reading(False)
        self.target.put_idle(self)

    def close(self) -> None:
        """Done with this connection (its exchange, if any, is already settled)."""
        self.exchange = None
        if self.transport is not None:
            self.transport.close()

    def cut(self) -> None:
        """Close it under a request in flight (drain deadline): the exchange learns
        of it now and is not retried elsewhere."""
        ex, self.exchange = self.exchange, None
        if self.transport is not None:
            self.transport.close()
        if ex is not None:
            ex.upstream_lost(self, ConnectionAbortedError("cut at the drain deadline"), retry=False)


async def connect(target: Target, timeout: float) -> UpstreamConnection:
    """A new connection to the instance (its Unix socket when `target.path` is set);
    an instance that accepts nothing within `timeout` is treated as gone (TimeoutError:
    504, or a retry elsewhere)."""
    loop = asyncio.get_running_loop()
    if target.path is not None:
        _, conn = await asyncio.wait_for(
            loop.create_unix_connection(lambda: UpstreamConnection(target), target.path),
            timeout,
        )
        return conn
    _, conn = await asyncio.wait_for(
        loop.create_connection(lambda: UpstreamConnection(target), target.host, target.port),
        timeout,
    )
    return conn


async def preconnect(target: Target, count: int, timeout: float) -> int:
    """Open up to `count` connections to `target` into its idle pool, each within
    `timeout`; the number opened. Failures are not errors: a request connects by itself."""
    results = await asyncio.gather(
        *(connect(target, timeout) for _ in range(count)), return_exceptions=True
    )
    opened = [conn for conn in results if isinstance(conn, UpstreamConnection)]
    for conn in opened:
        target.put_idle(conn)
    return len(opened)
