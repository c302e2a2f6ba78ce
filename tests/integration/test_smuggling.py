"""Request smuggling (issue 13): hostile and odd requests, sent raw to the proxy's public
address, with a strict recording instance behind it.

Every case is checked on both sides. The client: what it was answered, whether the
connection closed, all within a few seconds. The instance (`Instance` below): every
byte that reached it, per upstream connection, parsed by h11, a strict parser written
independently of the proxy's httptools. A parse error there is a proxy bug. The
instance answers each request with its number (X-Seen), so the test can hold the
proxy to the one property that rules out desynchronisation: the instance parsed
exactly the requests whose answers this client got, in order, and nothing else.
Each forwarded request carries exactly one Host, no forwarding header the client
made up and no header name with `_`. A request the proxy refuses leaves no byte at
the instance; the one exception is a chunked body found broken mid-way, whose head
may have gone out already: that upstream connection must then be cut, so the
instance never holds a complete request (nothing is executed).

Each case runs with a warm pooled upstream connection (the riskier path: a refused
request must not leave bytes on it), and afterwards a fresh request on the warm
client must get its own answer (nothing left behind in the pool).

The cases: gunicorn's request-parser corpus (tests/corpus/README.md says where it
comes from), our own table of the published CL.TE / TE.CL / TE.TE variants, one test
per rule of the issue's fix, and a poisoning run with victims and an attacker on one
component.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import urllib.parse
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, cast

import h11
import pytest

from rotator.proxy.route import Limits, Target
from tests.corpus import gunicorn
from tests.integration.proxykit import (
    HOST,
    Client,
    Proxy,
    Response,
    aio,
    running_proxy,
    until,
)

pytestmark = pytest.mark.skipif(os.name != "posix", reason="process groups are POSIX")

# The proxy's own answers to a request it refuses.
REFUSALS = (400, 405, 408, 431)
BAD_REQUEST = b"rotator: demo: bad request\n"
# Headers that only the proxy may set (when the component does not trust a proxy in front).
OURS = (b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host")
FORWARDING = re.compile(rb"forwarded|x-real-ip|x-forwarded-.*")
# Hop-by-hop headers that never reach the instance (Connection and Upgrade do, for a
# websocket handshake; Transfer-Encoding is framing, checked on its own).
NEVER_FORWARDED = frozenset(
    {b"keep-alive", b"proxy-connection", b"proxy-authenticate", b"proxy-authorization"}
    | {b"te", b"trailer"}
)
# How long a client waits for a first answer before it half-closes: the proxy is then
# waiting for bytes that will never come (a truncated request).
QUIET = 1.0


# -- the recording instance ---------------------------------------------------------------

HEAD_END = re.compile(rb"\n\r?\n")  # where h11 ends a head, too
H11_LIMIT = 1024 * 1024  # above the proxy's max_header_size: a big head is not h11's error


@dataclass
class Seen:
    """One request the instance parsed completely (and answered)."""

    index: int  # in the order the instance completed them, over all its connections
    conn: int
    method: bytes
    target: bytes
    headers: list[tuple[bytes, bytes]]  # lower-cased names, as h11 parsed them
    codings: list[bytes]  # the Transfer-Encoding values as they arrived
    body: bytes = b""

    def get_all(self, name: bytes) -> list[bytes]:
        return [v for n, v in self.headers if n == name]

    def names(self) -> list[bytes]:
        return [n for n, _ in self.headers]


def h11_view(head: bytes) -> tuple[bytes, list[bytes]]:
    """h11 implements only the chunked coding. A head whose codings end in chunked
    (`gzip, chunked`, which the proxy forwards) is shown to h11 as plain chunked, which
    is all the framing there is; the codings as sent are returned to be checked."""
    lines = head.split(b"\r\n")
    te = [i for i, line in enumerate(lines) if line.lower().startswith(b"transfer-encoding:")]
    codings = [lines[i].split(b":", 1)[1].strip() for i in te]
    joined = [c.strip().lower() for v in codings for c in v.split(b",")]
    if len(joined) > 1 and joined[-1] == b"chunked":
        lines[te[0]] = b"Transfer-Encoding: chunked"
        lines = [line for i, line in enumerate(lines) if i not in te[1:]]
    return b"\r\n".join(lines), codings


def answer(seen: Seen) -> bytes:
    """The default answer: names the request it answers."""
    body = b"#%d %b %b\n" % (seen.index, seen.method, seen.target)
    head = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nX-Seen: %d\r\n\r\n" % (len(body), seen.index)
    return head if seen.method == b"HEAD" else head + body


class InstanceConn(asyncio.Protocol):
    """One upstream connection as the instance sees it: raw bytes in, h11 requests out."""

    def __init__(self, instance: Instance) -> None:
        self.instance = instance
        self.index = len(instance.conns)
        instance.conns.append(self)
        self.transport: asyncio.Transport | None = None
        self.raw = bytearray()
        self.tunnel = bytearray()  # what came after a 101 it sent
        self.early = b""  # what came after a request before its (delayed) answer went out
        self.closed = False
        self.upgraded = False
        self.failed = False
        self._buffer = bytearray()
        self._parser: h11.Connection | None = None
        self._codings: list[bytes] = []
        self._current: Seen | None = None
        self._answering = False  # a delayed answer is pending: parse nothing meanwhile

    @property
    def partial(self) -> bool:
        """It holds bytes of a request that never ended (so was never executed)."""
        return self._parser is not None or bool(self._buffer)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True

    def data_received(self, data: bytes) -> None:
        self.raw += data
        if self.upgraded:
            self.tunnel += data
            return
        self._buffer += data
        self._parse()

    def _parse(self) -> None:
        while not (self.failed or self.upgraded or self._answering):
            if self._parser is None:
                end = HEAD_END.search(self._buffer)
                if end is None:
                    return
                head, codings = h11_view(bytes(self._buffer[: end.end()]))
                del self._buffer[: end.end()]
                self._parser = h11.Connection(h11.SERVER, max_incomplete_event_size=H11_LIMIT)
                self._parser.receive_data(head)
                self._codings = codings
            # What follows the head goes in whole: h11 stops at the end of the request
            # and hands back the rest (whose head then gets the view above).
            if self._buffer:  # (b"" would tell h11 the connection closed)
                self._parser.receive_data(bytes(self._buffer))
                self._buffer.clear()
            if not self._events(self._parser):
                return

    def _events(self, parser: h11.Connection) -> bool:
        """Run the parser; True when a request ended (the rest is back in the buffer)."""
        while True:
            try:
                event = parser.next_event()
            except h11.RemoteProtocolError as exc:
                self.failed = True
                self.instance.errors.append(f"upstream connection {self.index}: {exc}")
                if self.transport is not None:
                    self.transport.close()
                return False
            if event is h11.NEED_DATA:
                return False
            if isinstance(event, h11.Request):
                headers = [(n, v) for n, v in event.headers]
                if self._codings:  # as they arrived, not as h11 was shown them
                    headers = [(n, v) for n, v in headers if n != b"transfer-encoding"]
                    headers += [(b"transfer-encoding", c) for c in self._codings]
                self._current = Seen(
                    -1, self.index, event.method, event.target, headers, self._codings
                )
            elif isinstance(event, h11.Data):
                assert self._current is not None
                self._current.body += event.data
            elif isinstance(event, h11.EndOfMessage):
                assert self._current is not None
                self._buffer[:0] = parser.trailing_data[0]
                self._parser = None
                self._complete(self._current)
                return True

    def _complete(self, seen: Seen) -> None:
        instance = self.instance
        seen.index = len(instance.requests)
        instance.requests.append(seen)
        reply = instance.respond(seen)
        if instance.delay:
            self._answering = True
            asyncio.get_running_loop().call_later(instance.delay, self._send, reply)
        else:
            self._send(reply)

    def _send(self, reply: bytes) -> None:
        self._answering = False
        self.early = bytes(self._buffer)
        if self.transport is None or self.closed:
            return
        self.transport.write(reply)
        if reply.startswith(b"HTTP/1.1 101 "):
            self.upgraded = True
            self.tunnel += self._buffer
            self._buffer.clear()
        else:
            self._parse()


@dataclass(frozen=True)
class Mark:
    requests: int
    sizes: tuple[int, ...]  # bytes received so far, per upstream connection


class Instance:
    """A recording instance on 127.0.0.1: every upstream connection, byte and request."""

    def __init__(self, respond: Callable[[Seen], bytes] = answer, delay: float = 0.0) -> None:
        self.respond = respond
        self.delay = delay  # seconds before each answer goes out
        self.conns: list[InstanceConn] = []
        self.requests: list[Seen] = []
        self.errors: list[str] = []
        self.server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> Instance:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(lambda: InstanceConn(self), HOST, 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def close(self) -> None:
        for c in self.conns:
            if c.transport is not None:
                c.transport.abort()
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()

    def target(self) -> Target:
        return Target(HOST, self.port)

    def mark(self) -> Mark:
        return Mark(len(self.requests), tuple(len(c.raw) for c in self.conns))

    def since(self, mark: Mark) -> dict[int, bytes]:
        """The bytes each upstream connection received after `mark` (only those with some)."""
        got = {}
        for c in self.conns:
            start = mark.sizes[c.index] if c.index < len(mark.sizes) else 0
            if len(c.raw) > start:
                got[c.index] = bytes(c.raw[start:])
        return got


@dataclass
class Setup:
    proxy: Proxy
    instance: Instance
    warm: Client  # keeps a pooled upstream connection between cases
    rounds: int = 0

    @property
    def host(self) -> bytes:
        """The Host the proxy gives a request that has none: its own listen address."""
        return f"{HOST}:{self.proxy.port}".encode()


@contextlib.asynccontextmanager
async def recording(
    limits: Limits | None = None, respond: Callable[[Seen], bytes] = answer, delay: float = 0.0
) -> AsyncIterator[Setup]:
    instance = await Instance(respond, delay).start()
    try:
        async with running_proxy(instance.target(), limits=limits) as p:
            s = Setup(p, instance, await p.connect())
            await warm_up(s)
            yield s
    finally:
        await instance.close()


async def warm_up(s: Setup) -> None:
    """Leave an idle pooled upstream connection: the riskier path for the next request."""
    s.rounds += 1
    path = f"/warm-{s.rounds}"
    r = await s.warm.request("GET", path, timeout=3)
    assert (r.status, r.body.split(b" ", 1)[1]) == (200, f"GET {path}\n".encode()), r
    target = s.proxy.route.target
    assert target is not None
    await until(lambda: bool(target.idle), 2)


# -- the client side ------------------------------------------------------------------------


@dataclass
class Outcome:
    responses: list[Response] = field(default_factory=list)
    closed: bool = False  # the proxy closed the connection
    half_closed: bool = False  # the client had to half-close (the proxy waited for more)

    @property
    def seen(self) -> list[int]:
        """The instance's numbers of the requests answered (X-Seen), in order."""
        return [int(v) for r in self.responses if (v := r.get("X-Seen")) is not None]

    @property
    def own(self) -> list[Response]:
        """The proxy's own answers (no instance answered them)."""
        return [r for r in self.responses if r.get("X-Seen") is None]

    @property
    def statuses(self) -> list[int]:
        return [r.status for r in self.responses]


async def play(s: Setup, data: bytes, answers: int = 1, *, client: Client | None = None) -> Outcome:
    """Send `data` raw on a new connection and read up to `answers` answers, or until the
    proxy closes. A proxy still waiting after QUIET gets a half-close (it has been sent
    a truncated request): it must then answer what it has and close."""
    c = client or await s.proxy.connect()
    c.send(data)
    out = Outcome()
    while len(out.responses) < answers:
        try:
            r = await c.response(timeout=3.0 if out.half_closed else QUIET)
        except TimeoutError:
            assert not out.half_closed, "no answer and no close within 3 s of a half-close"
            c.writer.write_eof()
            out.half_closed = True
            continue
        except (asyncio.IncompleteReadError, ConnectionResetError) as exc:
            partial = getattr(exc, "partial", b"")
            assert partial == b"", f"the connection broke mid-answer: {partial!r}"
            out.closed = True
            break
        out.responses.append(r)
        if r.get("Connection") == b"close":
            assert await c.rest(timeout=3) == b"", "bytes after an answer with Connection: close"
            out.closed = True
            break
    return out


async def settle() -> None:
    # The proxy, the instance and the clients share one event loop: a few turns of it
    # deliver whatever the proxy wrote upstream while answering.
    for _ in range(3):
        await asyncio.sleep(0.005)


@dataclass
class Verdict:
    out: Outcome
    new: list[Seen]  # the requests the instance parsed for the case
    leaked: dict[int, bytes]  # what reached the instance for the case, per upstream connection

    def refused(self, status: int = 400) -> None:
        """Refused with `status`, and not one byte of the request reached the instance."""
        assert self.out.statuses[-1:] == [status], self.out.statuses
        assert self.out.closed
        assert not self.new and self.leaked == {}, f"bytes of a refused request: {self.leaked}"


async def check(s: Setup, out: Outcome, mark: Mark, *, trusted: bool = False) -> Verdict:
    """The checks every case gets."""
    await settle()
    instance = s.instance
    assert not instance.errors, f"the instance could not parse what it got: {instance.errors}"
    new = instance.requests[mark.requests :]
    assert out.seen == [r.index for r in new], (
        f"the instance parsed {[(r.method, r.target, r.body[:40]) for r in new]}, "
        f"but the client got answers to #{out.seen} (statuses {out.statuses})"
    )
    for r in out.own:
        assert r is out.responses[-1], f"the proxy's own {r.status} was not the last answer"
        assert r.status in REFUSALS, f"{r.status} {r.body!r}"
        assert r.get("Connection") == b"close" and out.closed, "a refusal must close"
        if r.status == 400:
            assert r.body == BAD_REQUEST
    for r in new:
        assert_clean(r, trusted)
    # A request cut short at the instance was never executed; its connection must not
    # stay open (the rest of it would be read as the next request).
    for c in instance.conns:
        if c.partial:
            await until(lambda c=c: c.closed, 2)  # type: ignore[misc]
    leaked = instance.since(mark)
    # The proxy is fine afterwards, and the warm client gets the answer to its own next
    # request (not one the case left in the pool).
    await warm_up(s)
    return Verdict(out, new, leaked)


def assert_clean(r: Seen, trusted: bool) -> None:
    hosts = r.get_all(b"host")
    assert len(hosts) == 1, f"{r.target!r} reached the instance with Host lines {hosts}"
    names = r.names()
    assert not [n for n in names if b"_" in n], f"header names with '_': {names}"
    assert not NEVER_FORWARDED & set(names), f"hop-by-hop headers forwarded: {names}"
    if not trusted:
        assert r.get_all(b"x-forwarded-for") == [b"127.0.0.1"], r.headers
        assert r.get_all(b"x-forwarded-proto") == [b"http"], r.headers
        assert r.get_all(b"x-forwarded-host") in ([], hosts), r.headers
        theirs = [n for n in names if FORWARDING.fullmatch(n) and n not in OURS]
        assert not theirs, f"client-supplied forwarding headers reached the instance: {theirs}"


def origin_form(target: str) -> str:
    if target.startswith("/") or target == "*":
        return target
    parts = urllib.parse.urlsplit(target)
    return (parts.path or "/") + (f"?{parts.query}" if parts.query else "")


# == gunicorn's request-parser corpus =========================================================


def corpus(kind: str) -> list[Any]:
    """The corpus's cases as test parameters named by file, or one skipped parameter
    saying why the corpus is not there."""
    try:
        return [pytest.param(case, id=case.name) for case in gunicorn.cases(kind)]
    except LookupError as exc:
        return [pytest.param(None, id=f"{kind}-corpus", marks=pytest.mark.skip(reason=str(exc)))]


NO_HOST = "HTTP/1.1 without Host (issue 13, rule 4)"
# gunicorn accepts these (some only with a setting that loosens its parser); the proxy is
# stricter. Each: how many of the file's requests are forwarded before the refusal, the
# status of the refusal, and why. A change in the proxy's strictness shows up here.
VALID_REFUSED: dict[str, tuple[int, int, str]] = {
    "valid/004": (0, 400, NO_HOST),
    "valid/005": (0, 400, NO_HOST),
    "valid/006": (0, 400, NO_HOST),
    "valid/007": (0, 400, NO_HOST),
    "valid/010": (0, 400, NO_HOST),
    "valid/011": (0, 400, NO_HOST),
    "valid/012": (0, 400, NO_HOST),
    "valid/013": (0, 400, NO_HOST),
    "valid/014": (0, 400, NO_HOST),
    "valid/018": (0, 400, NO_HOST),
    "valid/021": (0, 400, NO_HOST),
    "valid/022": (1, 400, "its second request is " + NO_HOST),
    "valid/023": (0, 400, NO_HOST),
    "valid/025": (0, 400, NO_HOST),
    "valid/025_line": (0, 400, NO_HOST),
    "valid/028": (0, 400, "space before the colon (gunicorn: strip_header_spaces); " + NO_HOST),
    "valid/029": (0, 400, NO_HOST),
    "valid/030": (0, 400, NO_HOST),
    "valid/031": (0, 400, "method '-BLARGH' is not one httptools knows; " + NO_HOST),
    "valid/031compat": (0, 400, "method '-BLARGH' is not one httptools knows; " + NO_HOST),
    "valid/031compat2": (0, 400, "method '-blargh' is not one httptools knows; " + NO_HOST),
    "valid/100": (0, 400, NO_HOST),
    "valid/compat_obs_fold": (0, 400, "obs-fold (gunicorn: permit_obsolete_folding)"),
    "valid/compat_obs_fold_huge": (0, 400, "obs-fold (gunicorn: permit_obsolete_folding)"),
    "valid/pp_01": (0, 400, "PROXY protocol v1 preamble (gunicorn: proxy_protocol)"),
    "valid/pp_02": (0, 400, "PROXY protocol v1 preamble (gunicorn: proxy_protocol)"),
    "valid/pp_04": (0, 400, "PROXY protocol v2 preamble (gunicorn: proxy_protocol)"),
    "valid/pp_05": (0, 400, "PROXY protocol v2 preamble (gunicorn: proxy_protocol)"),
    "valid/rfc9112_target_authority_connect_01": (0, 405, "CONNECT is not proxied"),
    "valid/rfc9112_target_authority_ipv6_01": (0, 405, "CONNECT is not proxied"),
}

# gunicorn's parser test reads what there is of these; a request through a proxy needs
# its whole body before it can be answered.
VALID_TRUNCATED = {"valid/099": "Content-Length: 17914, and 8599 bytes of body follow"}


def end_to_end(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """The headers an instance should see as the client sent them: minus hop-by-hop and
    Connection-named ones, framing, Host, forwarding headers and names with `_`."""
    named = {t.strip().lower() for n, v in headers if n == b"connection" for t in v.split(b",")}
    skip = NEVER_FORWARDED | named | {b"connection", b"upgrade", b"transfer-encoding"}
    skip |= {b"host", b"content-length"}
    return [
        (n, v)
        for n, v in headers
        if n not in skip and b"_" not in n and not FORWARDING.fullmatch(n)
    ]


@pytest.mark.parametrize("case", corpus("valid"))
@aio(15)
async def test_gunicorn_valid_request(case: gunicorn.Case) -> None:
    async with recording() as s:
        mark = s.instance.mark()
        out = await play(s, case.data, answers=len(case.expected))
        v = await check(s, out, mark)
        forwarded = case.expected
        if case.name in VALID_TRUNCATED:
            # No answer can come: the client half-closes, the proxy closes, nothing is executed.
            assert out.half_closed and out.closed and not out.responses and not v.new
            return
        if case.name in VALID_REFUSED:
            count, status, why = VALID_REFUSED[case.name]
            assert out.statuses == [200] * count + [status], f"{out.statuses}: expected ({why})"
            forwarded = forwarded[:count]
            if count == 0:
                v.refused(status)
        assert len(v.new) == len(forwarded)
        for seen, want in zip(v.new, forwarded, strict=True):
            assert seen.method == want.method.encode()
            target = origin_form(want.uri).encode("latin-1")
            # A fragment is no part of a request target: passing it on or dropping it are both fine.
            assert seen.target in (target, target.split(b"#")[0]), (seen.target, target)
            assert seen.body == want.body
            sent = [(n.lower().encode(), v.encode("latin-1")) for n, v in want.headers]
            assert end_to_end(seen.headers) == end_to_end(sent)
            host = [v for n, v in sent if n == b"host"] or [s.host]
            assert seen.get_all(b"host") == host


@pytest.mark.parametrize("case", corpus("invalid"))
@aio(15)
async def test_gunicorn_invalid_request(case: gunicorn.Case) -> None:
    async with recording() as s:
        mark = s.instance.mark()
        out = await play(s, case.data, answers=1)
        v = await check(s, out, mark)
        if v.new:
            # Forwarded: then as exactly one well-formed request (h11 parsed it), the one
            # the file starts with, and the one the client was answered for.
            assert len(v.new) == 1, [(r.method, r.target) for r in v.new]
            method, target = case.data.lstrip(b"\r\n").split(b"\r\n", 1)[0].split(b" ")[:2]
            assert (v.new[0].method, v.new[0].target) == (
                method,
                origin_form(target.decode("latin-1")).encode("latin-1"),
            )
        else:
            assert out.own or out.half_closed, out.statuses
