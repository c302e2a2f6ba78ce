"""Health checks: is the instance on host:port (or on its Unix socket) answering its health path?

`wait_until_healthy` polls fast so that the switch follows readiness closely,
and gives up early when the process exits. It reports; the component decides.

A probe is a plain HTTP/1.1 GET. Its connection is kept open for the next probe
of the same instance when the instance allows keep-alive: a fresh connection per
probe cost four times the CPU (socket, connect, accept, close on both sides), and
a fleet's idle daemon does little but probe. A kept connection that turns out to
be closed is replaced by a fresh one within the same probe; only the fresh one's
answer counts. *We* always close first, and `forget()` closes an instance's kept
connection before the instance is stopped: the side that closes first keeps the
TIME_WAIT, and it must land on our ephemeral port, not on the instance's pool
port (asking the instance to close, `Connection: close`, would put one there after
every probe).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable

import httptools
from tenacity import AsyncRetrying, RetryError, retry_if_result, stop_after_delay, wait_fixed

from rotator.config import HealthSpec
from rotator.printer import duration

# The gap between a process becoming ready and traffic reaching it is at most
# this, plus one probe; probes that are refused cost next to nothing.
START_POLL = 0.025
# A health answer larger than this is not read to its end (and counts as an answer).
MAX_ANSWER = 1024 * 1024


class NotHealthy(Exception):
    """The instance did not become healthy; the message says why."""


Key = tuple[str, int, str | None]


class HealthCheck:
    def __init__(self, spec: HealthSpec) -> None:
        self.spec = spec
        # One idle connection per instance, between probes (taken out while in use).
        self._kept: dict[Key, _Connection] = {}

    def forget(self, host: str, port: int, *, unix: str | None = None) -> None:
        """Close the connection kept to this instance (it is about to be stopped)."""
        conn = self._kept.pop((host, port, unix), None)
        if conn is not None:
            conn.close()

    def close(self) -> None:
        """Close every kept connection (this check is being replaced)."""
        for conn in self._kept.values():
            conn.close()
        self._kept.clear()

    async def probe(self, host: str, port: int, *, unix: str | None = None) -> str | None:
        """None when healthy, otherwise what was wrong (for messages). With `unix`, the
        probe goes to that Unix socket (host and port only name the Host header)."""
        path = self.spec.path
        try:
            status = await asyncio.wait_for(self._get(host, port, unix), self.spec.timeout)
        except TimeoutError:
            return f"{path} did not answer within {duration(self.spec.timeout)}"
        except ConnectionRefusedError:
            return f"{path}: connection refused"
        except FileNotFoundError:
            return f"{path}: no socket at {unix}"
        except (OSError, httptools.HttpParserError, EOFError) as exc:
            return f"{path}: {_describe(exc)}"
        if 200 <= status < 400:
            return None
        return f"{path} answered {status}"

    async def wait_until_healthy(
        self, host: str, port: int, exited: Awaitable[int], *, unix: str | None = None
    ) -> float:
        """Seconds until the first healthy probe (on the Unix socket `unix`, if given).
        Raises NotHealthy when the process exits first or start_timeout passes."""
        began = time.monotonic()
        polling = asyncio.ensure_future(self._poll(host, port, unix))
        exit_wait = asyncio.ensure_future(exited)
        try:
            done, _ = await asyncio.wait({polling, exit_wait}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            polling.cancel()
            exit_wait.cancel()
        if polling in done and not polling.cancelled():
            polling.result()
            return time.monotonic() - began
        code = exit_wait.result()
        raise NotHealthy(f"exited with code {code} before becoming healthy")

    async def _poll(self, host: str, port: int, unix: str | None) -> None:
        last: list[str | None] = [None]

        async def attempt() -> str | None:
            last[0] = await self.probe(host, port, unix=unix)
            return last[0]

        retrying = AsyncRetrying(
            stop=stop_after_delay(self.spec.start_timeout),
            wait=wait_fixed(min(START_POLL, self.spec.interval)),
            retry=retry_if_result(lambda problem: problem is not None),
        )
        try:
            await retrying(attempt)
        except RetryError:
            raise NotHealthy(
                f"not healthy within start_timeout {duration(self.spec.start_timeout)} (last check: {last[0]})"
            ) from None

    async def _get(self, host: str, port: int, unix: str | None) -> int:
        key = (host, port, unix)
        kept = self._kept.pop(key, None)
        if kept is not None:
            try:
                return await self._ask(kept, key)
            except (OSError, EOFError, httptools.HttpParserError):
                pass  # the instance closed it meanwhile (its idle timeout): not a verdict
        if unix is not None:
            reader, writer = await asyncio.open_unix_connection(unix)
        else:
            reader, writer = await asyncio.open_connection(host, port)
        return await self._ask(_Connection(reader, writer), key)

    async def _ask(self, conn: _Connection, key: Key) -> int:
        """One GET on `conn`; afterwards the connection is kept if the answer allows, else
        closed (also when the probe fails or is cancelled by its timeout)."""
        host, port, unix = key
        # A socket has no host:port of its own.
        authority = "localhost" if unix else f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        reusable = False
        try:
            conn.writer.write(
                f"GET {self.spec.path} HTTP/1.1\r\nHost: {authority}\r\n"
                "User-Agent: rotator-health\r\nAccept: */*\r\n\r\n".encode()
            )
            answer = _Answer()
            parser = answer.parser = httptools.HttpResponseParser(answer)
            received = 0
            # Read to the end: closing with unread bytes would reset the connection.
            while not answer.complete and received < MAX_ANSWER:
                data = await conn.reader.read(65536)
                if not data:
                    if received:
                        break  # a body delimited by the close: the status is what counts
                    raise EOFError("closed the connection without answering")
                received += len(data)
                parser.feed_data(data)
            reusable = answer.complete and answer.keep_alive
            return parser.get_status_code()
        finally:
            if reusable and key not in self._kept:
                self._kept[key] = conn
            else:
                conn.close()


class _Connection:
    __slots__ = ("reader", "writer")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    def close(self) -> None:
        # No wait for the close to complete: nothing is pending on it, and waiting
        # would make forget() and a cancelled probe asynchronous for no gain.
        self.writer.close()


class _Answer:
    """httptools callbacks: whether the answer allows keep-alive, whether it is complete."""

    def __init__(self) -> None:
        self.parser: httptools.HttpResponseParser | None = None
        self.keep_alive = False
        self.complete = False

    def on_headers_complete(self) -> None:
        # Asked here: once the message is complete, the parser has reset its flags.
        assert self.parser is not None
        self.keep_alive = self.parser.should_keep_alive()

    def on_message_complete(self) -> None:
        self.complete = True


def _describe(exc: BaseException) -> str:
    if isinstance(exc, httptools.HttpParserError):
        return "answered something that is not HTTP"
    if isinstance(exc, OSError):
        return exc.strerror or type(exc).__name__
    return str(exc)
