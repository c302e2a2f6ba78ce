"""Health checks: is the instance on host:port (or on its Unix socket) answering its health path?

`wait_until_healthy` polls fast so that the switch follows readiness closely,
and gives up early when the process exits. It reports; the component decides.

A probe is a plain HTTP/1.1 GET on a fresh connection that *we* close once the
answer is read. Asking the instance to close instead (`Connection: close`, as
HTTP clients do for one-off requests) would leave a TIME_WAIT on the instance's
own port after every probe; here it lands on our ephemeral port, and the pool
port stays clean for the next instance.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable

import httptools
from tenacity import AsyncRetrying, RetryError, retry_if_result, stop_after_delay, wait_fixed

from rotator.config import HealthSpec

# The gap between a process becoming ready and traffic reaching it is at most
# this, plus one probe; probes that are refused cost next to nothing.
START_POLL = 0.025
# A health answer larger than this is not read to its end (and counts as an answer).
MAX_ANSWER = 1024 * 1024


class NotHealthy(Exception):
    """The instance did not become healthy; the message says why."""


class HealthCheck:
    def __init__(self, spec: HealthSpec) -> None:
        self.spec = spec

    async def probe(self, host: str, port: int, *, unix: str | None = None) -> str | None:
        """None when healthy, otherwise what was wrong (for messages). With `unix`, the
        probe goes to that Unix socket (host and port only name the Host header)."""
        path = self.spec.path
        try:
            status = await asyncio.wait_for(_get(host, port, path, unix), self.spec.timeout)
        except TimeoutError:
            return f"{path} did not answer within {self.spec.timeout:g}s"
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
                f"not healthy within start_timeout {self.spec.start_timeout:g}s (last check: {last[0]})"
            ) from None


class _Answer:
    """httptools callbacks: the status code, and whether the message is complete."""

    def __init__(self) -> None:
        self.complete = False

    def on_message_complete(self) -> None:
        self.complete = True


async def _get(host: str, port: int, path: str, unix: str | None = None) -> int:
    if unix is not None:
        reader, writer = await asyncio.open_unix_connection(unix)
        authority = "localhost"  # a socket has no host:port of its own
    else:
        reader, writer = await asyncio.open_connection(host, port)
        authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        writer.write(
            f"GET {path} HTTP/1.1\r\nHost: {authority}\r\nUser-Agent: rotator-health\r\n"
            "Accept: */*\r\n\r\n".encode()
        )
        answer = _Answer()
        parser = httptools.HttpResponseParser(answer)
        received = 0
        # Read to the end: closing with unread bytes would reset the connection.
        while not answer.complete and received < MAX_ANSWER:
            data = await reader.read(65536)
            if not data:
                if received:
                    break  # a body delimited by the close: the status is what counts
                raise EOFError("closed the connection without answering")
            received += len(data)
            parser.feed_data(data)
        return parser.get_status_code()
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


def _describe(exc: BaseException) -> str:
    if isinstance(exc, httptools.HttpParserError):
        return "answered something that is not HTTP"
    if isinstance(exc, OSError):
        return exc.strerror or type(exc).__name__
    return str(exc)
