"""The client side of the proxy: one Protocol per client connection, one Exchange per request.

ClientConnection parses requests with httptools, queues them (pipelined requests
are answered in order, one at a time) and binds each to the Target its Route
picks when the request's turn comes: each request, not each client connection,
so a keep-alive client's requests spread over the replicas. Exchange forwards
that request to an instance, streams both bodies without holding them whole,
and maps failures to status codes in `Answer`, the one place that does so.

Flow control: while the instance's socket is full, the client is not read;
while the client's socket is full, the instance is not read. A websocket
handshake answered 101 turns its exchange into a byte pump both ways. The
Listener enforces the per-component limits (timeouts by a periodic sweep,
max_connections by slots, max_clients by admitting connections: clients.py).
"""

from __future__ import annotations

import asyncio
import collections
import re
import socket
from collections.abc import Callable
from enum import Enum
from typing import Any, NamedTuple, cast

import httptools

from rotator.printer import duration
from rotator.proxy.clients import Clients
from rotator.proxy.route import Route, Target, clock
from rotator.proxy.upstream import UpstreamConnection, connect
from rotator.proxy.websocket import GOING_AWAY

HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)
# Never hop-by-hop, whatever Connection names: they frame the message or name its
# target, and dropping one would make the instance read another request than we did.
NEVER_HOP = frozenset({b"content-length", b"transfer-encoding", b"host"})
# What a client may claim about where a request came from. Unless the component has
# trust_forwarded (rotator behind another proxy), the client's own are dropped (every
# X-Forwarded-* too, see end_to_end) and X-Forwarded-For/-Proto/-Host set by us.
FORWARDED = frozenset({b"forwarded", b"x-real-ip", b"x-client-ip"})
# A client's choice of side while a canary runs (X-Rotator-Canary: always | never): meant
# for rotator alone, so it never reaches an instance, trusted or not.
CANARY = b"x-rotator-canary"
CANARY_SIDES = {b"always": True, b"never": False}
REQUEST_DROP = HOP_BY_HOP | FORWARDED | {CANARY}
TRUSTED_DROP = HOP_BY_HOP | {b"x-forwarded-for", CANARY}
# An int, not b"_": `int in bytes` is a byte search; `bytes in bytes` first takes the
# needle's buffer, which made it 6x as slow, once per header line of every request.
UNDERSCORE = ord("_")
IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS", b"PUT", b"DELETE", b"TRACE"})

# A request body buffered while no instance connection is ready yet; past this
# the client is not read until the body can flow.
BODY_BUFFER_LIMIT = 256 * 1024
# The longest a timeout may fire late (the sweep runs at least this often).
SWEEP_INTERVAL = 1.0
# Retries of one request at most (say, a stale keep-alive, then a refused connect).
MAX_TRIES = 2
LAST_CHUNK = b"0\r\n\r\n"
# After the answer that ends a connection, how long a client may go on sending (the rest
# of a body that answer refused) before the connection is closed under it (see Lingering).
LINGER_TIME = 2.0


class Answer(Enum):
    """Why the proxy answers a request itself: the one place that picks those statuses.
    Each is (status, reason phrase, extra header lines, what the body says, detail)."""

    MALFORMED = (400, b"Bad Request")
    HEAD_TIMEOUT = (408, b"Request Timeout")
    CONNECT = (
        405,
        b"Method Not Allowed",
        b"Allow: GET, HEAD, POST, PUT, DELETE, PATCH, OPTIONS\r\n",
    )
    HEAD_TOO_LARGE = (431, b"Request Header Fields Too Large")
    INSTANCE_FAILED = (502, b"Bad Gateway")  # it broke, or spoke something not HTTP
    NO_INSTANCE = (503, b"Service Unavailable", b"Retry-After: 1\r\n")
    BUSY = (503, b"Service Unavailable", b"Retry-After: 1\r\n", b"", "max_connections reached")
    # A connection past max_clients with none idle to close (no request was read).
    TOO_MANY_CLIENTS = (
        503,
        b"Service Unavailable",
        b"Retry-After: 1\r\n",
        b"too many client connections",
    )
    INSTANCE_TIMEOUT = (504, b"Gateway Timeout")

    def __init__(
        self, status: int, reason: bytes, extra: bytes = b"", says: bytes = b"", detail: str = ""
    ) -> None:
        self.status = status
        self.reason = reason
        self.extra = extra
        self.says = says or reason.lower()
        self.default_detail = detail

    def render(
        self, component: str, detail: str = "", keep_alive: bool = False, head_only: bool = False
    ) -> bytes:
        """The whole response: a one-line body naming the component and why (none for a
        HEAD, RFC 9110 9.3.2, though Content-Length says what a GET would get)."""
        detail = detail or self.default_detail
        body = b"rotator: %b: %b%b\n" % (
            component.encode(),
            self.says,
            b" (" + detail.encode() + b")" if detail else b"",
        )
        return (
            b"HTTP/1.1 %d %b\r\nContent-Type: text/plain; charset=utf-8\r\n"
            b"Content-Length: %d\r\nConnection: %b\r\n%b\r\n%b"
            % (
                self.status,
                self.reason,
                len(body),
                b"keep-alive" if keep_alive else b"close",
                self.extra,
                b"" if head_only else body,
            )
        )


def failure(exc: BaseException | None) -> Answer:
    """What the client is told when talking to an instance failed before any answer."""
    return Answer.INSTANCE_TIMEOUT if isinstance(exc, TimeoutError) else Answer.INSTANCE_FAILED


def canary_side(headers: list[tuple[bytes, bytes]]) -> bool | None:
    """The side a request's X-Rotator-Canary names: True (always), False (never) or None.
    Of several, the last decides, as HAProxy's `req.hdr()` reads a header; any other value
    is no choice. A second look at the headers, taken only while a canary runs: returning
    it from end_to_end (which drops the header) cost every request 600 instructions."""
    side = None
    for name, value in headers:
        if name.lower() == CANARY:
            side = CANARY_SIDES.get(value.strip().lower())
    return side


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%b\r\n" % (len(data), data)


class Headers(NamedTuple):
    block: bytes  # the end-to-end headers as CRLF-terminated lines, order and repeats kept
    length: bytes | None  # the Content-Length's value, if there was one
    codings: bytes  # the Transfer-Encoding values (dropped from `block`), joined; b"" if none
    hosts: int  # how many Host headers (an empty one is counted, but not kept in `block`)
    host: bytes  # the Host header's value, or b""

    @property
    def chunked(self) -> bool:
        """The message is chunked: Transfer-Encoding's last coding is chunked (RFC 9112 6.3)."""
        return self.codings.rsplit(b",", 1)[-1].strip().lower() == b"chunked"


def end_to_end(
    headers: list[tuple[bytes, bytes]],
    drop: frozenset[bytes],
    *,
    request: bool = False,
    untrusted: bool = False,
) -> Headers:
    """One pass over a message's headers (this is per header line of every request, so
    it counts): what to forward, and the framing facts the proxy needs. A `request`'s
    underscored names are dropped, and an `untrusted` one's X-Forwarded-* too."""
    # The kept lines as their parts, four per field (name, ": ", value, CRLF), joined
    # once: adding a tuple's parts costs a third of concatenating each line.
    parts: list[bytes] = []
    tokens: set[bytes] | None = None  # headers that Connection declares hop-by-hop
    length: bytes | None = None
    codings: list[bytes] | None = None
    hosts = 0
    host = b""
    for name, value in headers:
        low = name.lower()
        if low in drop:
            if low == b"connection":
                tokens = tokens or set()
                tokens.update(t.strip().lower() for t in value.split(b","))
            elif low == b"transfer-encoding":
                codings = [*codings, value] if codings else [value]
            continue
        if request and UNDERSCORE in low:
            # As nginx (underscores_in_headers off): a WSGI or CGI server maps
            # X_Forwarded_For and X-Forwarded-For to one variable.
            continue
        if low == b"content-length":
            length = value
        elif low == b"host":
            hosts += 1
            host = value
            if not value:
                continue  # replaced by ours (see on_headers_complete)
        elif untrusted and low.startswith(b"x-forwarded-"):
            continue
        parts += (name, b": ", value, b"\r\n")
    if tokens:
        # Those are gone already (most often all of them are). Not `-= NEVER_HOP | drop`:
        # that union, built per request, is a set past pymalloc's sizes (a malloc).
        tokens.difference_update(NEVER_HOP, drop)
        if tokens:
            parts = [
                part
                for at in range(0, len(parts), 4)
                if parts[at].lower() not in tokens
                for part in parts[at : at + 4]
            ]
    return Headers(b"".join(parts), length, b", ".join(codings) if codings else b"", hosts, host)


# In a lowercased response head: the fields the proxy must act on (HOP_BY_HOP and
# Content-Length), and their values. Each starts a line: the engine looks for the CRLF
# first, and the names are grouped by first letter, which halves the time it takes.
RESPONSE_FRAMING = re.compile(
    rb"\r\n(c(?:onnection|ontent-length)|keep-alive|proxy-(?:connection|authenticate"
    rb"|authorization)|t(?:e|railer|ransfer-encoding)|upgrade):([^\r]*)"
)


def response_headers(found: list[tuple[bytes, bytes]], block: bytes) -> Headers:
    """A response's header lines (`block`, CRLF-terminated, as the parser accepted them,
    and `found`, what RESPONSE_FRAMING found in them): what to forward, and its framing.
    Unless a field is hop-by-hop, the lines go on as they came, without a Python step
    per field."""
    if not found:
        return Headers(block, None, b"", 0, b"")
    if len(found) == 1 and found[0][0] == b"content-length":
        return Headers(block, found[0][1].strip(), b"", 0, b"")
    fields = []
    for line in block.split(b"\r\n")[:-1]:
        name, _, value = line.partition(b":")
        fields.append((name, value.lstrip(b" \t")))
    return end_to_end(fields, HOP_BY_HOP)


class Exchange:
    """One request/response through the proxy, bound to one Target for its whole life
    (or, when one failed before answering, to the one its retry picked)."""

    __slots__ = (
        "body_done",
        "buffer",
        "canary",
        "chunked",
        "client",
        "close_delimited",
        "connecting",
        "error",
        "head",
        "head_only",
        "http11",
        "idempotent",
        "interim",
        "keep_alive",
        "pending",
        "received",
        "rechunk",
        "response_done",
        "response_started",
        "retries",
        "slotted",
        "started",
        "status",
        "streamed",
        "target",
        "tunnel",
        "upgrade",
        "upstream",
    )

    def __init__(
        self,
        client: ClientConnection,
        head: bytes,
        *,
        keep_alive: bool,
        chunked: bool = False,
        method: bytes = b"GET",
        http11: bool = True,
        error: Answer | None = None,
        upgrade: bytes = b"",
    ) -> None:
        self.client = client
        self.received = clock()  # the head is in: the request's duration starts
        self.status = 0  # of the answer the client gets, once it is decided
        self.head = head
        self.head_only = method == b"HEAD"
        self.idempotent = method in IDEMPOTENT
        self.http11 = http11
        self.upgrade = upgrade  # the Upgrade header of a websocket handshake, else b""
        self.canary: bool | None = None  # the side the client named (X-Rotator-Canary)
        self.tunnel = False  # after a 101: bytes flow both ways untouched
        self.keep_alive = keep_alive
        self.chunked = chunked
        self.error = error  # refused at the proxy: answered so, in its turn
        self.buffer: list[bytes] = []
        self.pending = 0  # bytes in `buffer` not yet sent
        self.body_done = False
        self.streamed = False  # a body byte went out that `buffer` no longer holds
        self.target: Target | None = None
        self.upstream: UpstreamConnection | None = None
        self.connecting: asyncio.Task[UpstreamConnection] | None = None
        self.interim = False
        self.rechunk = False
        self.close_delimited = False
        self.response_started = False
        self.response_done = False
        self.retries = 0
        self.started = 0.0  # clock() at the first dispatch (request_timeout)
        self.slotted = False  # holds one of the component's max_connections

    # -- request body, from the client ------------------------------------
    def add_body(self, data: bytes) -> None:
        self._send_body(chunk(data) if self.chunked else data)

    def end_body(self) -> None:
        self.body_done = True
        if self.chunked:
            self._send_body(LAST_CHUNK)

    def _send_body(self, data: bytes) -> None:
        if self.upstream is not None:
            self.streamed = True
            self.upstream.write(data)
        else:
            # Kept until the response starts, so that a retry can send it again.
            self.buffer.append(data)
            self.pending += len(data)

    # -- binding to an instance ---------------------------------------------
    def dispatch(self, target: Target, *, fresh: bool = False) -> None:
        if not self.started:
            self.started = clock()
        self.target = target
        target.acquire()
        conn = None if fresh else target.pop_idle()
        if conn is not None:
            self.attach(conn)
            return
        task = self.client.loop.create_task(connect(target, self.client.limits.connect_timeout))
        self.connecting = task
        task.add_done_callback(self._connected)

    def _connected(self, task: asyncio.Task[UpstreamConnection]) -> None:
        self.connecting = None
        if task.cancelled():
            return
        exc = task.exception()
        if self.response_done:  # the client left while we were connecting
            if exc is None:
                task.result().close()
            return
        if isinstance(exc, TimeoutError):  # accepts nothing: not a crash to wait out
            timeout = duration(self.client.limits.connect_timeout)
            self.fail(Answer.INSTANCE_TIMEOUT, detail=f"connect_timeout {timeout}")
        elif exc is not None:
            self._before_response_failed(exc, connect_failed=True)
        else:
            self.attach(task.result())

    def attach(self, conn: UpstreamConnection) -> None:
        self.upstream = conn
        self.pending = 0
        conn.send(self, b"".join([self.head, *self.buffer]) if self.buffer else self.head)
        if self.client.write_paused:
            conn.pause_reading(True)
        if self.client.reading_paused:
            self.client.update_reading()  # the buffered body is on its way: read the client again

    # -- response, from the instance -----------------------------------------
    def response_head(self, conn: UpstreamConnection, status: int, head: bytes) -> bool:
        """Forward a response head (as the parser accepted it, up to its empty line).
        False: the response ends here although the parser may expect a body (a reply
        to HEAD), so it must be reset."""
        client = self.client
        found = RESPONSE_FRAMING.findall(head.lower())
        if (
            status >= 200
            and len(found) == 1
            and found[0][0] == b"content-length"
            and self.keep_alive
            and self.http11
            and not client.closing
            and head.startswith(b"HTTP/1.1 ")
            and head[13:15] != b"\r\n"  # it has a reason phrase
        ):
            # The common answer: HTTP/1.1, a length, nothing hop-by-hop, nothing for us
            # to add. It goes on as it came.
            self.interim = False
            self.response_started = True
            self.status = status
            self.buffer = []
            client.out(head)
            return not self.head_only
        line, _, block = head[:-2].partition(b"\r\n")
        parts = line.split(b" ", 2)  # version, status code, reason phrase (may be empty)
        reason = parts[2] if len(parts) > 2 and parts[2] else b"-"
        headers = response_headers(found, block)
        if status == 101:
            if not self.upgrade:  # a switch nobody asked for: a broken instance
                self.upstream_failed(conn, None)
            else:
                self._open_tunnel(conn, status, reason, headers.block)
            return True
        if status < 200:
            # Interim (100 Continue, 103 Early Hints): pass on, keep waiting.
            self.interim = True
            if self.http11:
                client.out(b"HTTP/1.1 %d %b\r\n%b\r\n" % (status, reason, headers.block))
            return True
        self.interim = False
        self.response_started = True
        self.status = status
        self.buffer = []
        framing = b""
        if not (self.head_only or status in (204, 304) or headers.length is not None):
            self.close_delimited = not headers.chunked
            if self.http11:
                self.rechunk = True
                framing = b"Transfer-Encoding: chunked\r\n"
            else:
                self.keep_alive = False
        if client.closing and len(client.queue) == 1:  # shutting down: nothing follows this one
            self.keep_alive = False
        if not self.keep_alive:
            framing += b"Connection: close\r\n"
        elif not self.http11:
            framing += b"Connection: keep-alive\r\n"
        client.out(b"HTTP/1.1 %d %b\r\n%b%b\r\n" % (status, reason, headers.block, framing))
        return not self.head_only

    def _open_tunnel(
        self, conn: UpstreamConnection, status: int, reason: bytes, block: bytes
    ) -> None:
        """The instance accepted the websocket handshake: pass its 101 on, and from now
        on pump bytes both ways untouched. The exchange (and its in-flight count on the
        target) lasts until either side closes, so a drain waits for it."""
        self.tunnel = conn.tunnel = True
        self.response_started = True
        self.keep_alive = False
        client = self.client
        # Counted now, as answered: its duration is the handshake's, not the websocket's life.
        seconds = clock() - self.received
        client.route.answered(status, seconds)
        if conn.target.figures is not None:
            conn.target.figures.record(status, seconds)
        client.out(
            b"HTTP/1.1 %d %b\r\n%bConnection: Upgrade\r\nUpgrade: %b\r\n\r\n"
            % (status, reason, block, self.upgrade)
        )
        client.tunnel = conn
        client.release_held(conn)

    def response_body(self, data: bytes) -> None:
        self.client.out(chunk(data) if self.rechunk else data)

    def tunnel_bytes(self, data: bytes) -> None:
        self.client.transport_write(data)

    def flush(self) -> None:
        self.client.flush()

    def upstream_full(self, full: bool) -> None:
        self.client.upstream_full(full)

    def response_complete(self, conn: UpstreamConnection | None, keep_alive: bool) -> None:
        if self.interim or self.tunnel:
            self.interim = False
            return
        if self.rechunk:
            self.client.out(LAST_CHUNK)
        if conn is not None:
            if keep_alive and self.body_done and not self.close_delimited:
                conn.release()
            else:
                conn.close()
        self._finish()

    def upstream_lost(
        self, conn: UpstreamConnection, exc: Exception | None, *, retry: bool = True
    ) -> None:
        if self.response_done:
            return
        self.upstream = None
        if self.tunnel:
            if not retry and conn.frames.between_frames:
                # Cut at the drain deadline: tell the client to reconnect (1001).
                self.client.out(GOING_AWAY)
            self._abort_client()
            return
        if self.response_started:
            if self.close_delimited and exc is None:
                self.response_complete(None, keep_alive=False)
            else:
                self._abort_client()
            return
        if retry:
            self._before_response_failed(exc, stale=conn.used)
        else:
            self.fail(failure(exc))

    def upstream_failed(self, conn: UpstreamConnection, exc: Exception | None) -> None:
        """The instance sent something that is not HTTP: nothing of it is passed on."""
        conn.close()
        self.upstream = None
        if self.response_started:
            self._abort_client()
        else:
            self.fail(Answer.INSTANCE_FAILED)

    def _before_response_failed(
        self, exc: BaseException | None, *, stale: bool = False, connect_failed: bool = False
    ) -> None:
        # Safe to send again when nothing of the body is lost and either nothing
        # reached the instance (the connect failed: it just died, or was replaced)
        # or the request is idempotent and no byte of an answer came (RFC 9110
        # 9.2.2: never re-send a POST on a guess). A pooled connection may just
        # have been closed by a healthy instance while idle: that retry goes at
        # once to the target picked, the same one included. Otherwise the instance
        # is likely dying (refused, or reset from a backlog nobody will read):
        # another replica takes it at once; with none, wait, within hold_timeout,
        # for a target other than the one that failed.
        if self.streamed or self.retries >= MAX_TRIES or not (connect_failed or self.idempotent):
            self.fail(failure(exc))
            return
        # The retry stays on the failed one's side while that side has another
        # target: the draw is not made again, so a side's share stays what was drawn.
        self.retries += 1
        failed, self.target = self.target, None
        canary = self.canary
        if failed is not None:
            failed.release(answered=False)
            canary = failed.canary
            if failed.figures is not None and not stale:
                # A canary that fails connections must not look clean because the
                # other side answered for it (a stale pooled connection is no failure).
                failed.figures.failed()
        target = self.client.route.pick(None if stale else failed, canary)
        if target is not None:
            self.dispatch(target, fresh=True)
        else:
            self.client.hold(self, exclude=failed, canary=canary)

    # -- endings ------------------------------------------------------------------
    def fail(self, answer: Answer, detail: str = "") -> None:
        """Answer with an error of the proxy's own (before any response byte went out)."""
        client = self.client
        self.status = answer.status
        self.keep_alive = self.keep_alive and self.body_done
        client.out(answer.render(client.route.name, detail, self.keep_alive, self.head_only))
        self._finish()
        client.flush()

    def timed_out(self, which: str) -> None:
        """The instance took too long: 504 if nothing was answered yet, else cut."""
        if self.upstream is not None:
            self.upstream.close()  # mid-response: it cannot be reused
            self.upstream = None
        if self.connecting is not None:
            self.connecting.cancel()
            self.connecting = None
        if self.response_started:
            self._abort_client()
        else:
            self.fail(Answer.INSTANCE_TIMEOUT, detail=which)

    def _abort_client(self) -> None:
        # Part of the response is out: the only honest signal left is to cut the connection.
        self.keep_alive = False
        self._finish(cut=True)

    def _finish(self, cut: bool = False) -> None:
        """The exchange is over: answered, failed (`fail`), or `cut` mid-answer."""
        self.response_done = True
        self.upstream = None
        if self.target is not None:
            if self.target.figures is not None and not self.tunnel:  # a canary runs
                # Its side counts it (a websocket was counted at its 101). An answer cut
                # short (the instance failed mid-way, a timeout) is a failed request.
                seconds = clock() - self.received
                self.target.figures.record(502 if cut else self.status, seconds)
            self.target.release(self.response_started)
            self.target = None
        if self.slotted:
            self._free_slot()
        self.client.exchange_done(self)

    def _free_slot(self) -> None:
        if self.slotted:
            self.slotted = False
            self.client.listener.release_slot()

    def cancel(self) -> None:
        """The client went away: release everything this exchange holds."""
        if self.connecting is not None:
            self.connecting.cancel()
        if self.upstream is not None:
            self.upstream.close()
            self.upstream = None
        if self.target is not None:
            self.target.release(answered=self.response_started)
            self.target = None
        self._free_slot()
        self.response_done = True


def _ends_without_version(data: bytes, url: bytes) -> bool:
    """`data` ends a request line that has no HTTP version (HTTP/0.9's `GET /`); only
    asked when a read left the parser inside a head before any header line."""
    return data.endswith(b"\n") and data.rstrip(b"\r\n").endswith(b" " + url)


class ClientConnection(asyncio.Protocol):
    """One client connection to a component's public address."""

    # Slots, not an instance dict: from 30 attributes on, CPython 3.11 stops sharing a
    # dict's keys between instances and attribute reads lose their fast path; reaching
    # 30 here cost 4,300 more instructions a request (+4.7%).
    __slots__ = (
        "_forwarded",
        "_head_size",
        "_headers",
        "_held_size",
        "_hold",
        "_ip",
        "_out",
        "_ready",
        "_reframe",
        "_reframing",
        "_too_large",
        "_upstream_full",
        "_url",
        "client_done",
        "closing",
        "head_began",
        "held",
        "idle_since",
        "last_request",
        "limits",
        "lingering",
        "listener",
        "loop",
        "parser",
        "queue",
        "reading_paused",
        "route",
        "transport",
        "tunnel",
        "write_paused",
    )

    def __init__(self, listener: Listener) -> None:
        self.listener = listener
        self.route = listener.route
        self.limits = listener.route.limits
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.queue: collections.deque[Exchange] = collections.deque()
        self.write_paused = False
        self.idle_since = 0.0
        self.closing = False  # answer what is queued, then close
        self._out: list[bytes] = []
        self._upstream_full = False
        self.reading_paused = False
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._forwarded = b""
        self._ip = b""
        self._head_size = 0  # bytes of the request head so far (max_header_size)
        self._too_large = False
        self._hold: asyncio.Task[Any] | None = None
        self.tunnel: UpstreamConnection | None = None  # set once a websocket is established
        self.head_began = 0.0  # clock() at a request head's first byte; 0: not in a head
        self._ready: Exchange | None = None  # first in the queue, to start after this read
        self._reframe = b""  # the framing header of an upgrade's body (see _after_upgrade)
        self._reframing = False  # the parser is reading our stand-in head
        # After a websocket handshake: the client's bytes, until the instance answers.
        self.held: list[bytes] | None = None
        self._held_size = 0
        self.client_done = False  # the client half-closed (eof_received)
        self.last_request = False  # the client asked to close after this one (Connection)
        self.lingering = 0.0  # clock() at the last answer, while closing (see Lingering)

    # -- asyncio.Protocol --------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but behave as one.
        self.transport = cast(asyncio.Transport, transport)
        if not self.listener.admit(self):
            return
        peer = transport.get_extra_info("peername")
        ip = peer[0].encode() if isinstance(peer, tuple) else b"unknown"
        self._ip = ip
        self._forwarded = b"X-Forwarded-For: " + ip + b"\r\nX-Forwarded-Proto: http\r\n"
        self.idle_since = clock()

    def data_received(self, data: bytes) -> None:
        if self.tunnel is not None:
            self.tunnel.write(data)
            return
        if self.held is not None:
            self._hold_bytes(data)
            return
        self._feed(data)
        # A request goes upstream only once this read is parsed to its end: an error
        # later in it then stops the request before one byte of it left.
        self._start_ready()
        self.flush()

    def _start_ready(self) -> None:
        ex, self._ready = self._ready, None
        if ex is not None and not ex.response_done:
            self._start(ex)

    def _feed(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            self._after_upgrade(data[exc.args[0] :])
        except httptools.HttpParserError:
            self._reject(Answer.HEAD_TOO_LARGE if self._too_large else Answer.MALFORMED)
        else:
            if self.head_began and not self._headers and _ends_without_version(data, self._url):
                self._reject(Answer.MALFORMED)  # an HTTP/0.9 request line: no more is coming

    def _after_upgrade(self, rest: bytes) -> None:
        """The parser stopped after an upgrade request's head, taking what follows for the
        new protocol's bytes. A websocket's are held until the instance answers (a
        tunnel opens only at its 101); for an upgrade we do not switch to, a new parser
        reads on, starting with a stand-in head that frames the request's body."""
        ex = self.queue[-1] if self.queue else None
        if ex is None or ex.error is not None or ex.response_done:
            self.held = []  # refused (405, 400): the connection closes after the answer
        elif ex.upgrade:
            self.held = []
            self._hold_bytes(rest)
        else:
            self.parser = httptools.HttpRequestParser(self)
            reframe, self._reframe = self._reframe, b""
            if reframe:
                self._reframing = True
                rest = b"POST / HTTP/1.1\r\n" + reframe + b"\r\n" + rest
            if rest:
                self._feed(rest)

    def _hold_bytes(self, data: bytes) -> None:
        assert self.held is not None
        self.held.append(data)
        self._held_size += len(data)
        if self._held_size > BODY_BUFFER_LIMIT:
            self.update_reading()

    def release_held(self, conn: UpstreamConnection) -> None:
        """The instance switched protocols: what the client sent meanwhile goes to it."""
        if self.held:
            conn.write(b"".join(self.held))
        self.held = None
        self._held_size = 0
        self.update_reading()

    def eof_received(self) -> bool | None:
        """The client half-closed. Its complete requests are still answered (then we
        close, as `printf ... | nc` expects); one cut short is never completed upstream."""
        self.client_done = True
        complete = all(ex.body_done or ex.response_done for ex in self.queue)
        if self.tunnel is None and self.queue and not self.head_began and complete:
            self.closing = True
            return True  # keep our side open for the answers
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.listener.forget(self)
        self.transport = None
        # The parser holds this object's bound methods: a reference cycle, which would
        # leave every closed connection (13 objects) to the cyclic collector, whose
        # passes pause the loop. Without it, reference counting frees the connection.
        del self.parser
        self._drop_queue()

    def _drop_queue(self) -> None:
        """Nothing queued will be answered: what each request holds (a target's in-flight
        count, an instance connection, a slot) is released."""
        if self._hold is not None:
            self._hold.cancel()
        for ex in self.queue:
            ex.cancel()
        self.queue.clear()

    def pause_writing(self) -> None:
        self.write_paused = True
        if self.queue and self.queue[0].upstream is not None:
            self.queue[0].upstream.pause_reading(True)

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.queue and self.queue[0].upstream is not None:
            self.queue[0].upstream.pause_reading(False)

    # -- httptools callbacks -------------------------------------------------
    def on_message_begin(self) -> None:
        self._url = b""
        self._headers = []
        self._head_size = 0
        self.head_began = clock()

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._head_size += len(url)
        if self._head_size > self.limits.max_header_size:
            self._head_too_large()

    def on_header(self, name: bytes, value: bytes) -> None:
        headers = self._headers
        headers.append((name, value))
        self._head_size += len(name) + len(value) + 4
        if self._head_size > self.limits.max_header_size or len(headers) > self.limits.max_headers:
            self._head_too_large()

    def _head_too_large(self) -> None:
        # Raising in a callback stops the parser (HttpParserCallbackError): answered 431.
        self._too_large = True
        raise ValueError("request head too large")

    def on_headers_complete(self) -> None:
        self.head_began = 0.0
        if self._reframing:
            self._reframing = False  # our own stand-in head (see _after_upgrade): no new request
            return
        parser = self.parser
        method = parser.get_method()
        version = parser.get_http_version()
        http11 = version == "1.1"
        upgrade = b""  # the Upgrade header of a websocket handshake
        upgrading = parser.should_upgrade()
        if upgrading:
            upgrade = next((v for n, v in self._headers if n.lower() == b"upgrade"), b"")
            if b"websocket" not in upgrade.lower():
                upgrade = b""  # only websockets are tunnelled; others go on as plain requests
        keep_alive = parser.should_keep_alive()
        if not keep_alive:
            self.last_request = True  # the client said so: nothing follows its body
        keep_alive = keep_alive and not upgrading and not self.closing
        if method == b"CONNECT":
            self._enqueue(Exchange(self, b"", keep_alive=False, error=Answer.CONNECT))
            return
        url = self._url if self._url.startswith(b"/") else self._origin_form(self._url)
        if self.limits.trust_forwarded:
            headers, forwarded = self._trusted_forwarding()
        else:
            headers = end_to_end(self._headers, REQUEST_DROP, request=True, untrusted=True)
            forwarded = self._forwarded
            if headers.host:
                forwarded += b"X-Forwarded-Host: " + headers.host + b"\r\n"
        if url is None or not self._acceptable(method, url, version, headers, upgrade):
            self._enqueue(
                Exchange(self, b"", keep_alive=False, method=method, error=Answer.MALFORMED)
            )
            return
        chunked = bool(headers.codings)  # _acceptable made sure it ends in chunked
        if upgrading and not upgrade and (chunked or headers.length is not None):
            # The parser takes an upgrade's body for the new protocol's bytes; as we do
            # not switch, it is framed like any other body (see _after_upgrade).
            if chunked:
                self._reframe = b"Transfer-Encoding: chunked\r\n"
            else:
                self._reframe = b"Content-Length: " + (headers.length or b"0") + b"\r\n"
        head = b"%b %b HTTP/1.1\r\n%b%b%b" % (
            method,
            url,
            headers.block,
            b"Transfer-Encoding: " + headers.codings + b"\r\n" if chunked else b"",
            forwarded,
        )
        if upgrade:
            head += b"Connection: Upgrade\r\nUpgrade: " + upgrade + b"\r\n"
        if not headers.host:
            # HTTP/1.0 needs no Host (and an empty one names none), but we speak
            # HTTP/1.1 to the instance, where it is required.
            head += self.listener.host_header
        head += b"\r\n"
        ex = Exchange(
            self,
            head,
            keep_alive=keep_alive,
            chunked=chunked,
            method=method,
            http11=http11,
            upgrade=upgrade,
        )
        if self.route.canary_targets:  # only then does a client's choice of side count
            ex.canary = canary_side(self._headers)
        self._enqueue(ex)

    @staticmethod
    def _acceptable(
        method: bytes, url: bytes, version: str, headers: Headers, upgrade: bytes
    ) -> bool:
        """The checks that must pass before a byte of the request goes upstream: what
        the parser lets through but the instance could read as another request."""
        if version not in ("1.1", "1.0"):  # HTTP/0.9 has no headers, hence no framing
            return False
        if headers.hosts > 1 or (version == "1.1" and not headers.hosts):  # RFC 9112 3.2
            return False
        if url == b"*" and method != b"OPTIONS":
            return False
        if headers.codings and (version == "1.0" or not headers.chunked):
            # RFC 9112 6.1 and 6.3: unframed, or framing an HTTP/1.0 peer may not know.
            return False
        # A websocket handshake is a GET without a body (RFC 6455 4.1): the bytes after
        # its head belong to the websocket, and are held until the instance accepts.
        return not (upgrade and (headers.codings or headers.length not in (None, b"0")))

    # A response may end before its request body did (an early 413): the
    # exchange is gone then and the rest of the body is dropped with the connection.
    def on_body(self, body: bytes) -> None:
        if self.queue and not self.queue[-1].response_done:
            ex = self.queue[-1]
            ex.add_body(body)
            if ex.pending > BODY_BUFFER_LIMIT:
                self.update_reading()

    def on_message_complete(self) -> None:
        if self._reframe:
            return  # an upgrade's body is still to come (see _after_upgrade)
        if self.queue and not self.queue[-1].response_done:
            self.queue[-1].end_body()

    # -- queue of exchanges ----------------------------------------------------
    def _enqueue(self, ex: Exchange) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        self.queue.append(ex)
        if len(self.queue) == 1:
            self._ready = ex  # started once the read that brought it is parsed
        else:
            self.update_reading()

    def _start(self, ex: Exchange) -> None:
        if ex.error is not None:
            ex.body_done = True
            ex.fail(ex.error)
            return
        if self.limits.max_connections and not ex.slotted:
            if not self.listener.take_slot():
                self._wait_for_slot(ex)
                return
            ex.slotted = True
        target = self.route.only or self.route.pick(None, ex.canary)
        if target is not None:
            ex.dispatch(target)
        else:
            self.hold(ex, canary=ex.canary)

    def _wait_for_slot(self, ex: Exchange) -> None:
        """max_connections are all busy: wait (hold_timeout) for one, else 503."""
        wait = self.loop.create_task(self.listener.wait_slot())
        self._hold = wait

        def slot(task: asyncio.Task[bool]) -> None:
            self._hold = None
            if task.cancelled():
                return
            if task.result():
                ex.slotted = True
                if ex.response_done:  # the client left meanwhile
                    ex._free_slot()
                else:
                    self._start(ex)
            elif not ex.response_done:
                ex.fail(Answer.BUSY)

        wait.add_done_callback(slot)

    def hold(self, ex: Exchange, exclude: Target | None = None, canary: bool | None = None) -> None:
        """Dispatch `ex` once there is a target (not `exclude`; on the side `canary`
        names, as Route.pick), or answer 503 after hold_timeout."""
        hold = self.loop.create_task(self.route.wait_target(exclude, canary))
        self._hold = hold
        hold.add_done_callback(lambda task: self._held(ex, task))

    def _held(self, ex: Exchange, task: asyncio.Task[Target | None]) -> None:
        self._hold = None
        if task.cancelled() or ex.response_done:
            return
        target = task.result()
        if target is None:
            ex.fail(Answer.NO_INSTANCE)
        else:
            ex.dispatch(target, fresh=ex.retries > 0)

    def exchange_done(self, ex: Exchange) -> None:
        if not self.queue or self.queue[0] is not ex:
            return
        self.queue.popleft()
        now = clock()
        if not ex.tunnel:  # a websocket was counted at its 101
            self.route.answered(ex.status, now - ex.received)
        # Back-pressure from the exchange's instance connection ends with the exchange.
        self._upstream_full = False
        if not (ex.keep_alive and ex.body_done) or self.transport is None:
            self._linger(sent_all=self.last_request and ex.body_done and not self.queue)
            return
        if self.queue:
            self._start(self.queue[0])
        else:
            self.idle_since = now
            if self.head_began:  # the next head waited for this answer: its time starts now
                self.head_began = self.idle_since
            self.listener.idled(self)
            if self.closing:
                self.close()
                return
        self.update_reading()

    def head_timed_out(self) -> None:
        """A request head took longer than header_timeout: 408, then close."""
        self.head_began = 0.0
        self.closing = True
        self._enqueue(Exchange(self, b"", keep_alive=False, error=Answer.HEAD_TIMEOUT))
        self._start_ready()

    def _reject(self, answer: Answer) -> None:
        """A malformed request: answered in its turn, then the connection closes."""
        self.closing = True
        last = self.queue[-1] if self.queue else None
        if last is not None and last.error is not None:
            return  # refused already at its head (the parser only now saw it too)
        if last is not None and not last.body_done and last is not self.queue[0]:
            # Its body broke while it waited its turn: not one byte of it went upstream.
            self.queue.pop()
            last.cancel()
            last = None
        if last is None or last.body_done:
            self._enqueue(Exchange(self, b"", keep_alive=False, error=answer))
        elif len(self.queue) == 1 and not last.response_started:
            # Its body broke mid-way: whatever was forwarded of it is void.
            if self._hold is not None:
                self._hold.cancel()
            last.cancel()
            last.keep_alive = False
            last.body_done = True
            last.fail(answer)
        elif self.transport is not None:
            self.transport.abort()

    def _trusted_forwarding(self) -> tuple[Headers, bytes]:
        """trust_forwarded: a proxy in front of rotator is believed. X-Forwarded-For
        gets the client's address appended; Proto and Host are kept when present."""
        chain = [v for n, v in self._headers if n.lower() == b"x-forwarded-for"]
        headers = end_to_end(self._headers, TRUSTED_DROP, request=True)
        names = {n.lower() for n, _ in self._headers}
        forwarded = b"X-Forwarded-For: " + b", ".join([*chain, self._ip]) + b"\r\n"
        if b"x-forwarded-proto" not in names:
            forwarded += b"X-Forwarded-Proto: http\r\n"
        if b"x-forwarded-host" not in names and headers.host:
            forwarded += b"X-Forwarded-Host: " + headers.host + b"\r\n"
        return headers, forwarded

    @staticmethod
    def _origin_form(url: bytes) -> bytes | None:
        """The path and query to send on. An absolute URL's host is ignored: the
        target is always the component's own instance (no open proxy)."""
        if url.startswith(b"/") or url == b"*":
            return url
        try:
            parsed = httptools.parse_url(url)
        except httptools.HttpParserInvalidURLError:
            return None
        if parsed.schema.lower() not in (b"http", b"https"):
            return None
        path = parsed.path or b"/"
        return path + b"?" + parsed.query if parsed.query else path

    # -- output and flow control ---------------------------------------------
    def out(self, data: bytes) -> None:
        self._out.append(data)

    def flush(self) -> None:
        if self._out:
            data = b"".join(self._out) if len(self._out) > 1 else self._out[0]
            self._out = []
            if self.transport is not None:
                self.transport.write(data)

    def transport_write(self, data: bytes) -> None:
        """Straight out, for a tunnel: its bytes need no batching."""
        if self.transport is not None:
            self.transport.write(data)

    def upstream_full(self, full: bool) -> None:
        self._upstream_full = full
        self.update_reading()

    def update_reading(self) -> None:
        if self.transport is None:
            return
        pause = (
            self._upstream_full
            or len(self.queue) > 1
            or (bool(self.queue) and self.queue[0].pending > BODY_BUFFER_LIMIT)
            or self._held_size > BODY_BUFFER_LIMIT
        )
        if pause != self.reading_paused:
            self.reading_paused = pause
            if pause:
                self.transport.pause_reading()
            else:
                self.transport.resume_reading()

    def close(self) -> None:
        self.flush()
        if self.transport is not None:
            self.transport.close()

    def _linger(self, sent_all: bool) -> None:
        """Close after an answer that ends the connection, without losing the answer to a
        reset (see Lingering); at once when nothing more can come from the client: it has
        closed its side, or `sent_all` (it asked to close and its request is all in)."""
        transport = self.transport
        if (
            transport is None
            or transport.is_closing()  # aborted already (a body that broke mid-way)
            or self.client_done
            or sent_all
            or not transport.can_write_eof()
        ):
            self.close()
            return
        self.flush()
        self._drop_queue()  # pipelined requests after this answer: never answered
        self.lingering = clock()
        transport.set_protocol(Lingering(self))
        transport.write_eof()
        if self.reading_paused:
            transport.resume_reading()

    def close_when_idle(self) -> None:
        """Shutdown: finish what is queued, accept nothing more on this connection."""
        self.closing = True
        if not self.queue:
            self.close()


class Lingering(asyncio.Protocol):
    """A client connection after its last answer: our side is shut (a FIN follows the
    answer), and what the client still sends (the rest of a body the answer refused, the
    bytes of a slow head after its 408) is read and dropped, until it closes its side or
    LINGER_TIME passes (the Listener's sweep). Closed at once instead, a socket with
    unread bytes sends a reset, which reaches a client that is still sending before it
    has read the answer: it reports "connection reset" rather than the 408 or the 413.
    nginx's lingering close does the same, for the same reason. asyncio.Protocol's own
    data_received (drop) and eof_received (close) are what lingering needs."""

    def __init__(self, conn: ClientConnection) -> None:
        self.conn = conn

    def connection_lost(self, exc: Exception | None) -> None:
        self.conn.connection_lost(exc)


class Listener:
    """A component's public address: accepts clients for its Route. Bound once."""

    def __init__(
        self,
        route: Route,
        host: str,
        port: int,
        clients: Clients | None = None,
    ) -> None:
        self.route = route
        # Shared by all the daemon's listeners: the total of client connections and its cap.
        self.clients = clients or Clients()
        self.host = host
        self.port = port
        # In the order they went idle (accepted, or their last request done), each with its
        # number in that order over all listeners (Clients.number), which breaks ties
        # between equally idle ones: uvloop's clock counts milliseconds.
        self.connections: dict[ClientConnection, int] = {}
        self.server: asyncio.Server | None = None
        self.slots_in_use = 0  # exchanges counted against max_connections
        self._slot_waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self.host_header = b"Host: " + address.encode() + b"\r\n"
        self._sweeper: asyncio.Task[None] | None = None

    @property
    def keepalive_timeout(self) -> float:
        return self.route.limits.keepalive_timeout

    async def start(self, sock: socket.socket | None = None) -> None:
        """Bind host:port, or serve on `sock`, a listening socket bound by someone else
        (socket activation): connections already queued on it are served too."""
        loop = asyncio.get_running_loop()
        factory: Callable[[], ClientConnection] = lambda: ClientConnection(self)  # noqa: E731
        if sock is not None:
            self.server = await loop.create_server(factory, sock=sock, backlog=self.clients.backlog)
        else:
            self.server = await loop.create_server(
                factory, self.host, self.port, reuse_address=True, backlog=self.clients.backlog
            )
        self._sweeper = loop.create_task(self._sweep())
        self.clients.listeners.add(self)

    def admit(self, conn: ClientConnection) -> bool:
        """A new connection (connection_made): counted in, after making room at a cap
        (this component's max_clients, else the total); when nothing is idle to close,
        answered 503 and closed at once (False)."""
        clients, own = self.clients, self.route.limits.max_clients
        if own and len(self.connections) >= own:
            why = f"max_clients {own}"
            room = clients.make_room((self,), f"{self.route.name}: {why}")
        elif clients.full:
            why = f"max_clients {clients.cap} over all components"
            room = clients.make_room(clients.listeners, why)
        else:
            room = True
        if not room:
            self.route.clients_refused += 1
            transport = cast(asyncio.Transport, conn.transport)
            transport.write(Answer.TOO_MANY_CLIENTS.render(self.route.name, why))
            transport.close()
            return False
        self.connections[conn] = clients.number()
        clients.open += 1
        self.route.clients = len(self.connections)
        return True

    def forget(self, conn: ClientConnection) -> None:
        """A connection closed (connection_lost), or being closed to make room: counted out."""
        if self.connections.pop(conn, None) is not None:
            self.clients.open -= 1
            self.route.clients = len(self.connections)

    def idled(self, conn: ClientConnection) -> None:
        """`conn` has no request left: it goes to the end of the order of idleness."""
        if self.connections.pop(conn, None) is not None:
            self.connections[conn] = self.clients.number()

    def evict(self, conn: ClientConnection) -> None:
        """Close an idle connection to make room for a new one (clients.py chose it)."""
        self.forget(conn)
        self.route.clients_evicted += 1
        conn.close()

    async def _sweep(self) -> None:
        """Enforce keepalive_timeout, header_timeout, read_timeout and request_timeout. One periodic
        pass instead of a timer per request keeps the hot path free of timers; the
        price is that a timeout fires up to one sweep interval late."""
        while True:
            # Read each pass: a reload may change the limits of a running component.
            limits = self.route.limits
            timeouts = [
                self.keepalive_timeout,
                limits.header_timeout,
                limits.read_timeout,
                limits.request_timeout or 1e9,
            ]
            await asyncio.sleep(min(SWEEP_INTERVAL, *(t / 4 for t in timeouts)))
            now = clock()
            for conn in list(self.connections):
                if conn.lingering:
                    if now - conn.lingering > LINGER_TIME and conn.transport is not None:
                        conn.transport.close()
                    continue
                if not conn.queue:
                    if conn.head_began and now - conn.head_began > limits.header_timeout:
                        conn.head_timed_out()
                    elif now - conn.idle_since > self.keepalive_timeout:
                        conn.close()
                    continue
                ex = conn.queue[0]
                if ex.tunnel or not ex.started:
                    continue  # a websocket may be quiet; a held request has hold_timeout
                if limits.request_timeout and now - ex.started > limits.request_timeout:
                    ex.timed_out(f"request_timeout {duration(limits.request_timeout)}")
                elif ex.upstream is not None and now - ex.upstream.last_read > limits.read_timeout:
                    ex.timed_out(f"read_timeout {duration(limits.read_timeout)}")

    def take_slot(self) -> bool:
        if self.slots_in_use < self.route.limits.max_connections:
            self.slots_in_use += 1
            return True
        return False

    async def wait_slot(self) -> bool:
        """Wait up to hold_timeout for a slot; True when one was handed over."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._slot_waiters.append(fut)
        try:
            await asyncio.wait_for(asyncio.shield(fut), self.route.hold_timeout)
        except TimeoutError:
            if not fut.done():
                fut.cancel()
                return False
        except asyncio.CancelledError:  # the client left while waiting
            if fut.done():
                self.release_slot()  # handed over just now: pass it on
            else:
                fut.cancel()
            raise
        return True

    def release_slot(self) -> None:
        # Hand the slot straight to the longest waiter, if any: the count stays.
        while self._slot_waiters:
            fut = self._slot_waiters.popleft()
            if not fut.done():
                fut.set_result(None)
                return
        self.slots_in_use -= 1

    def fileno(self) -> int:
        """The listening socket's descriptor (to hand it to a successor daemon)."""
        assert self.server is not None and self.server.sockets
        return self.server.sockets[0].fileno()

    def stop_accepting(self) -> None:
        if self.server is not None:
            self.server.close()

    async def shutdown(self, timeout: float, idle_grace: float = 0.0) -> None:
        """Stop accepting, let requests in progress finish (up to `timeout`), close the rest.

        With `idle_grace` (a takeover: another daemon accepts on the same socket), an
        idle keep-alive connection is not closed at once but answers its next request
        with `Connection: close`, so a client never sends on a connection we just
        closed; only those still idle after `idle_grace` are closed under them."""
        self.stop_accepting()
        if self._sweeper is not None:
            self._sweeper.cancel()
        for conn in list(self.connections):
            if idle_grace > 0:
                conn.closing = True
            else:
                conn.close_when_idle()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        idle_deadline = loop.time() + idle_grace
        # A lingering connection has had its last answer: it is not waited for.
        while any(not conn.lingering for conn in self.connections) and loop.time() < deadline:
            await asyncio.sleep(0.02)
            if idle_grace > 0 and loop.time() > idle_deadline:
                idle_grace = 0.0
                for conn in list(self.connections):
                    conn.close_when_idle()
        for conn in list(self.connections):
            if conn.lingering:
                self.forget(conn)
                if conn.transport is not None:
                    conn.transport.close()
            elif conn.tunnel is not None:  # a websocket still open: ask its client to reconnect
                if conn.tunnel.frames.between_frames:
                    conn.out(GOING_AWAY)
                conn.close()
            elif conn.transport is not None:
                conn.transport.abort()
        self.clients.listeners.discard(self)
