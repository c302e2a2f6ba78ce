"""Health checks: is the instance on host:port answering its health path?

`wait_until_healthy` polls fast so that the switch follows readiness closely,
and gives up early when the process exits. It reports; the component decides.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable

import aiohttp
from tenacity import AsyncRetrying, RetryError, retry_if_result, stop_after_delay, wait_fixed

from rotator.config import HealthSpec

# The gap between a process becoming ready and traffic reaching it is at most
# this, plus one probe; probes that are refused cost next to nothing.
START_POLL = 0.025


class NotHealthy(Exception):
    """The instance did not become healthy; the message says why."""


class HealthCheck:
    def __init__(self, session: aiohttp.ClientSession, spec: HealthSpec) -> None:
        self.session = session
        self.spec = spec

    async def probe(self, host: str, port: int) -> str | None:
        """None when healthy, otherwise what was wrong (for messages)."""
        url = f"http://{_host(host)}:{port}{self.spec.path}"
        try:
            async with self.session.get(
                url,
                timeout=aiohttp.ClientTimeout(total=self.spec.timeout),
                allow_redirects=False,
            ) as resp:
                await resp.read()
                if 200 <= resp.status < 400:
                    return None
                return f"{self.spec.path} answered {resp.status}"
        except TimeoutError:
            return f"{self.spec.path} did not answer within {self.spec.timeout:g}s"
        except aiohttp.ClientError as exc:
            return f"{self.spec.path}: {_client_error(exc)}"

    async def wait_until_healthy(self, host: str, port: int, exited: Awaitable[int]) -> float:
        """Seconds until the first healthy probe. Raises NotHealthy when the
        process exits first or start_timeout passes."""
        began = time.monotonic()
        polling = asyncio.ensure_future(self._poll(host, port))
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

    async def _poll(self, host: str, port: int) -> None:
        last: list[str | None] = [None]

        async def attempt() -> str | None:
            last[0] = await self.probe(host, port)
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


def _host(host: str) -> str:
    if host in ("0.0.0.0", ""):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host


def _client_error(exc: aiohttp.ClientError) -> str:
    if isinstance(exc, aiohttp.ClientConnectorError):
        return (
            "connection refused"
            if isinstance(exc.os_error, ConnectionRefusedError)
            else str(exc.os_error)
        )
    return type(exc).__name__
