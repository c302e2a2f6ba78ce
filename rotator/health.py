"""Health checks: is the instance at its Endpoint (host:port, or a Unix socket) answering its health path?

Two rules, each in one place. `wait_until_healthy` is the gate a new instance (or an
adopted one) must pass: the first healthy probe, polled fast so that the switch follows
readiness closely, giving up early when the process exits. `watch` is how a serving
instance is judged (the component's guard and a deploy's verify window): a probe every
`interval`, unhealthy after `unhealthy_threshold` failures in a row; its clock is
injected, so the component's tests step a fake one. They report; the component decides.

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

`health: {tcp: true}` only connects (and closes first, for the same reason).
`health: {exec: ...}` runs a command in the cwd and with the env the instance was
started from (`definition`: a deployed one's included; else the component's), PORT/HOST
or ROTATOR_SOCKET set as for the instance; exit 0 is healthy. It is started
by the daemon's spawner, like an instance, in a session of its own that is killed as a
whole at the timeout: an asyncio subprocess holds the event loop, and the proxy on it,
until the child has exec'd, on every check. Measured with uvloop (the daemon's loop when
installed, which has no `process_group`, so a preexec setpgrp), 300 checks of `true` on
a loaded 2-core machine: the loop's p99 stall was 14-15 ms (max 20-24) that way, 2-4 ms
(max 7-8) through the spawner; with the stdlib loop, 6-7 ms against 5.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import signal
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Protocol

import httptools
from tenacity import AsyncRetrying, RetryError, retry_if_result, stop_after_delay, wait_fixed

from rotator.config import ComponentSpec, Endpoint, HealthSpec
from rotator.printer import duration
from rotator.spawner import SpawnerGone

# The gap between a process becoming ready and traffic reaching it is at most
# this, plus one probe; probes that are refused cost next to nothing.
START_POLL = 0.025
# A health answer larger than this is not read to its end (and counts as an answer).
MAX_ANSWER = 1024 * 1024
# The end of an exec check's output kept for the message of a failed check.
EXEC_OUTPUT = 4096
# How long a killed exec check may take to be reported gone (SIGKILL: at once, normally).
KILL_WAIT = 1.0


class Clock(Protocol):
    """Monotonic time and sleeping on it: SystemClock, or a test's fake that is stepped."""

    def now(self) -> float: ...

    async def sleep(self, seconds: float) -> None: ...


class SystemClock:
    def now(self) -> float:
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


async def watch(
    check: Callable[[], Awaitable[str | None]],
    *,
    interval: float,
    threshold: int,
    clock: Clock,
    on_check: Callable[[str | None, int], None] | None = None,
    until: float | None = None,
) -> str | None:
    """Run `check` every `interval` seconds until `threshold` checks in a row have failed,
    and return the last one's problem; or, given `until` (a time of `clock`), return None
    once it has passed with fewer. `on_check(problem, failures in a row)` hears each."""
    failures = 0
    while True:
        wait = interval if until is None else max(0.0, min(interval, until - clock.now()))
        await clock.sleep(wait)
        problem = await check()
        failures = failures + 1 if problem is not None else 0
        if on_check is not None:
            on_check(problem, failures)
        if failures >= threshold:
            return problem
        if until is not None and clock.now() >= until:
            return None


class NotHealthy(Exception):
    """The instance did not become healthy; the message says why."""


class Spawn(Protocol):
    """How an exec check starts its command: spawner.Spawner.spawn (in a session of its
    own, output appended to the file `log`)."""

    def __call__(
        self, argv: list[str], cwd: Path, env: dict[str, str], log: Path
    ) -> Awaitable[_Child]: ...


class _Child(Protocol):
    pid: int

    async def wait(self) -> int: ...


class HealthCheck:
    def __init__(
        self,
        spec: HealthSpec,
        component: ComponentSpec | None = None,
        *,
        spawn: Spawn | None = None,
        output_dir: Path | None = None,
    ) -> None:
        """An exec check needs `component` (placeholders, cwd, env), `spawn`, and
        `output_dir`, where each run's output is kept until it has been read."""
        if spec.exec and (component is None or spawn is None or output_dir is None):
            raise ValueError("an exec health check needs its component, spawn and output_dir")
        self.spec = spec
        self.component = component
        self._spawn = spawn
        self.output_dir = output_dir or Path()
        # One idle connection per instance, between probes (taken out while in use).
        self._kept: dict[Endpoint, _Connection] = {}

    def forget(self, endpoint: Endpoint) -> None:
        """Close the connection kept to this instance (it is about to be stopped)."""
        conn = self._kept.pop(endpoint, None)
        if conn is not None:
            conn.close()

    def close(self) -> None:
        """Close every kept connection (this check is being replaced)."""
        for conn in self._kept.values():
            conn.close()
        self._kept.clear()

    async def probe(
        self, endpoint: Endpoint, *, definition: ComponentSpec | None = None, replica: int = 0
    ) -> str | None:
        """None when healthy, otherwise what was wrong (for messages). An exec check runs
        in `definition`'s cwd and env (default: the component's), as replica `replica`."""
        if self.spec.exec:
            return await self._exec(endpoint, definition or self.component, replica)
        if self.spec.tcp:
            return await self._connect(endpoint)
        path = self.spec.path
        try:
            status = await asyncio.wait_for(self._get(endpoint), self.spec.timeout)
        except TimeoutError:
            return f"{path} did not answer within {duration(self.spec.timeout)}"
        except ConnectionRefusedError:
            return f"{path}: connection refused"
        except FileNotFoundError:
            return f"{path}: no socket at {endpoint.path}"
        except (OSError, httptools.HttpParserError, EOFError) as exc:
            return f"{path}: {_describe(exc)}"
        if 200 <= status < 400:
            return None
        return f"{path} answered {status}"

    async def _connect(self, endpoint: Endpoint) -> str | None:
        where, unix = endpoint.path or f"port {endpoint.port}", endpoint.path
        try:
            async with asyncio.timeout(self.spec.timeout):
                _, writer = await _open(endpoint)
        except TimeoutError:
            return f"connecting to {where} took more than {duration(self.spec.timeout)}"
        except ConnectionRefusedError:
            return f"connecting to {where}: connection refused"
        except FileNotFoundError:
            return f"no socket at {unix}"
        except OSError as exc:
            return f"connecting to {where}: {_describe(exc)}"
        writer.close()
        return None

    async def _exec(
        self, endpoint: Endpoint, component: ComponentSpec | None, replica: int
    ) -> str | None:
        assert component is not None
        argv, env = dataclasses.replace(component, command=self.spec.exec).render(
            endpoint.port, endpoint.host, endpoint.path, replica=replica
        )
        # The spawner appends output to an existing file: one per probe, read once it exits.
        self.output_dir.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f"{component.name}.", suffix=".out", dir=self.output_dir)
        os.close(fd)
        output = Path(name)
        try:
            return await self._run(argv, component.cwd, {**os.environ, **env}, output)
        finally:
            with contextlib.suppress(OSError):
                output.unlink()

    async def _run(
        self, argv: list[str], cwd: Path, env: dict[str, str], output: Path
    ) -> str | None:
        assert self._spawn is not None
        try:
            child = await self._spawn(argv, cwd, env, output)
        except FileNotFoundError as exc:
            if exc.filename == str(cwd):
                return f"working directory not found: {cwd}"
            return f"exec: command not found: {argv[0]}"
        except (OSError, SpawnerGone) as exc:
            return f"exec: cannot start {argv[0]!r}: {_describe(exc)}"
        code: int | None = None
        try:
            async with asyncio.timeout(self.spec.timeout):
                code = await child.wait()
        except TimeoutError:
            return f"exec {argv[0]} did not finish within {duration(self.spec.timeout)}"
        except SpawnerGone:
            return f"exec {argv[0]}: the spawner exited, its exit code is unknown"
        finally:
            if code is None:  # timed out or cancelled: it leads a session; all of it goes
                await asyncio.shield(_kill_session(child))
        if code == 0:
            return None
        said = _last_line(output)
        return f"exec {argv[0]} exited with code {code}" + (f": {said}" if said else "")

    async def wait_until_healthy(
        self,
        endpoint: Endpoint,
        exited: Awaitable[int],
        *,
        definition: ComponentSpec | None = None,
        timeout: float | None = None,
        replica: int = 0,
        ready: Awaitable[None] | None = None,
    ) -> float:
        """Seconds until the first healthy probe. Raises NotHealthy when the process
        exits first or `timeout` (default: start_timeout) passes. Given `ready` (`ready:
        notify`: the instance's READY=1), the first probe waits for it, then follows at
        once, polling as usual if that one fails."""
        began = time.monotonic()
        timeout = self.spec.start_timeout if timeout is None else timeout
        polling = asyncio.ensure_future(
            self._poll(endpoint, definition, timeout, replica)
            if ready is None
            else self._notified(ready, endpoint, definition, timeout, replica)
        )
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

    async def _notified(
        self,
        ready: Awaitable[None],
        endpoint: Endpoint,
        definition: ComponentSpec | None,
        timeout: float,
        replica: int,
    ) -> None:
        began = time.monotonic()
        try:
            await asyncio.wait_for(asyncio.shield(ready), timeout)
        except TimeoutError:
            raise NotHealthy(
                f"sent no READY=1 within {'start_timeout ' if timeout == self.spec.start_timeout else ''}"
                f"{duration(timeout)} (health.ready: notify)"
            ) from None
        await self._poll(
            endpoint, definition, max(0.0, timeout - (time.monotonic() - began)), replica
        )

    async def _poll(
        self, endpoint: Endpoint, definition: ComponentSpec | None, timeout: float, replica: int
    ) -> None:
        last: list[str | None] = [None]

        async def attempt() -> str | None:
            last[0] = await self.probe(endpoint, definition=definition, replica=replica)
            return last[0]

        retrying = AsyncRetrying(
            stop=stop_after_delay(timeout),
            wait=wait_fixed(min(START_POLL, self.spec.interval)),
            retry=retry_if_result(lambda problem: problem is not None),
        )
        try:
            await retrying(attempt)
        except RetryError:
            raise NotHealthy(
                f"not healthy within {'start_timeout ' if timeout == self.spec.start_timeout else ''}"
                f"{duration(timeout)} (last check: {last[0]})"
            ) from None

    async def _get(self, endpoint: Endpoint) -> int:
        kept = self._kept.pop(endpoint, None)
        if kept is not None:
            try:
                return await self._ask(kept, endpoint)
            except (OSError, EOFError, httptools.HttpParserError):
                pass  # the instance closed it meanwhile (its idle timeout): not a verdict
        reader, writer = await _open(endpoint)
        return await self._ask(_Connection(reader, writer), endpoint)

    async def _ask(self, conn: _Connection, endpoint: Endpoint) -> int:
        """One GET on `conn`; afterwards the connection is kept if the answer allows, else
        closed (also when the probe fails or is cancelled by its timeout)."""
        host, port = endpoint.host, endpoint.port
        # A socket has no host:port of its own.
        authority = (
            "localhost"
            if endpoint.path
            else f"[{host}]:{port}"
            if ":" in host
            else f"{host}:{port}"
        )
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
            if reusable and endpoint not in self._kept:
                self._kept[endpoint] = conn
            else:
                conn.close()


async def _open(endpoint: Endpoint) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    if endpoint.path is not None:
        return await asyncio.open_unix_connection(endpoint.path)
    return await asyncio.open_connection(endpoint.host, endpoint.port)


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


async def _kill_session(child: _Child) -> None:
    """SIGKILL to the check's session, and again once its leader is gone: a child that
    was being forked during the first one may have escaped it."""
    for _ in range(2):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(child.pid, signal.SIGKILL)
        with contextlib.suppress(TimeoutError, SpawnerGone):
            await asyncio.wait_for(child.wait(), KILL_WAIT)


def _last_line(path: Path) -> str:
    """The last non-blank line of what an exec check wrote (read from its last few KiB)."""
    try:
        with open(path, "rb") as f:
            size = f.seek(0, os.SEEK_END)
            tail = os.pread(f.fileno(), EXEC_OUTPUT, max(0, size - EXEC_OUTPUT))
    except OSError:
        return ""
    lines = [line.strip() for line in tail.decode(errors="replace").splitlines()]
    return next((line for line in reversed(lines) if line), "")


def _describe(exc: BaseException) -> str:
    if isinstance(exc, httptools.HttpParserError):
        return "answered something that is not HTTP"
    if isinstance(exc, OSError):
        return exc.strerror or type(exc).__name__
    return str(exc)
