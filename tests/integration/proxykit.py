"""What the proxy tests share: an in-process proxy on a Route, a raw-socket client,
the demo backend as a subprocess, and a runner for async tests.

test_proxy.py (the data plane end to end) and test_smuggling.py (the request
smuggling corpus) both use these; each keeps its own backends that record.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from rotator.proxy.protocol import Listener
from rotator.proxy.route import Limits, Route, Target

ROOT = Path(__file__).resolve().parents[2]
HOST = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """PROXY_TEST_LOOP=uvloop runs the proxy on uvloop, as the daemon does when it can."""
    if os.environ.get("PROXY_TEST_LOOP") == "uvloop":
        uvloop = pytest.importorskip("uvloop")
        return uvloop.new_event_loop  # type: ignore[no-any-return]
    return None


def aio(
    timeout: float,
) -> Callable[[Callable[..., Coroutine[Any, Any, None]]], Callable[..., None]]:
    """Run an async test in its own event loop, bounded by `timeout` seconds."""

    def deco(fn: Callable[..., Coroutine[Any, Any, None]]) -> Callable[..., None]:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> None:
            errors: list[dict[str, Any]] = []
            with asyncio.Runner(loop_factory=loop_factory()) as runner:
                # Anything reaching the loop's handler ("Fatal error: protocol.data_received()
                # call failed", a never-retrieved task exception) is a proxy bug.
                runner.get_loop().set_exception_handler(lambda loop, ctx: errors.append(ctx))
                runner.run(asyncio.wait_for(fn(*args, **kwargs), timeout))
            assert not errors, f"errors reported to the event loop: {errors}"

        return wrapper

    return deco


async def until(predicate: Callable[[], bool], timeout: float = 3.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.005)


# -- the demo backend, as a real subprocess -----------------------------------------


class Backend:
    def __init__(self, log: Path, *flags: str, port: int = 0, name: str = "demo") -> None:
        self.log = log
        self.port = port
        env = {k: v for k, v in os.environ.items() if k not in ("PORT", "HOST", "NAME")}
        env["PYTHONPATH"] = str(ROOT)
        with log.open("wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "rotator.demo", "--port", str(port), "--name", name, *flags],
                cwd=ROOT,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def healthy(self) -> bool:
        try:
            with socket.create_connection((HOST, self.port), timeout=1) as sock:
                sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                data = b""
                while chunk := sock.recv(65536):
                    data += chunk
            return data.startswith(b"HTTP/1.1 200 ")
        except OSError:
            return False

    def wait_ready(self, timeout: float = 15) -> Backend:
        """Blocking on purpose: callers may rely on the event loop not running meanwhile."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = re.search(r"listening on \S+:(\d+)", self.output())
            if m:
                self.port = int(m.group(1))
                if self.healthy():
                    return self
            if self.proc.poll() is not None:
                break
            time.sleep(0.02)
        raise AssertionError(f"demo backend not ready: {self.output()!r}")

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(5)


# -- raw-socket client --------------------------------------------------------------


@dataclass
class Response:
    version: bytes
    status: int
    reason: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes = b""
    chunks: list[bytes] | None = None  # the chunks, when the body came chunked

    def get(self, name: str) -> bytes | None:
        values = self.get_all(name)
        return values[0] if values else None

    def get_all(self, name: str) -> list[bytes]:
        low = name.lower().encode()
        return [v for n, v in self.headers if n.lower() == low]

    def names(self) -> list[bytes]:
        return [n.lower() for n, _ in self.headers]

    def json(self) -> Any:
        return json.loads(self.body)


class Client:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, port: int) -> Client:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(HOST, port), 5)
        return cls(reader, writer)

    def send(self, data: bytes) -> None:
        self.writer.write(data)

    def close(self) -> None:
        self.writer.transport.abort()

    async def head(self, timeout: float = 5.0) -> Response:
        raw = await asyncio.wait_for(self.reader.readuntil(b"\r\n\r\n"), timeout)
        lines = raw[:-4].split(b"\r\n")
        version, status, reason = [*lines[0].split(b" ", 2), b""][:3]
        headers = []
        for line in lines[1:]:
            name, sep, value = line.partition(b":")
            assert sep, f"bad header line {line!r}"
            headers.append((name, value.strip()))
        return Response(version, int(status), reason, headers)

    async def response(self, *, head_only: bool = False, timeout: float = 5.0) -> Response:
        return await asyncio.wait_for(self._response(head_only), timeout)

    async def _response(self, head_only: bool) -> Response:
        r = await self.head()
        te = r.get("Transfer-Encoding")
        cl = r.get("Content-Length")
        if head_only or r.status < 200 or r.status in (204, 304):
            return r
        if te is not None:
            assert te.lower() == b"chunked", te
            r.chunks = []
            while True:
                size_line = await self.reader.readuntil(b"\r\n")
                size = int(size_line.split(b";")[0].strip(), 16)
                if size == 0:
                    while await self.reader.readuntil(b"\r\n") != b"\r\n":
                        pass  # trailers
                    break
                r.chunks.append(await self.reader.readexactly(size))
                assert await self.reader.readexactly(2) == b"\r\n"
            r.body = b"".join(r.chunks)
        elif cl is not None:
            r.body = await self.reader.readexactly(int(cl))
        else:
            r.body = await self.reader.read()  # close-delimited
        return r

    async def request(
        self,
        method: str = "GET",
        path: str = "/",
        headers: Iterable[tuple[str, str]] = (),
        body: bytes | None = None,
        *,
        host: str = "proxy.test",
        timeout: float = 5.0,
    ) -> Response:
        self.send(request_bytes(method, path, headers, body, host=host))
        return await self.response(head_only=method == "HEAD", timeout=timeout)

    async def rest(self, timeout: float = 3.0) -> bytes:
        """Everything until the server closes (b"" = closed with nothing more)."""
        return await asyncio.wait_for(self.reader.read(), timeout)


def request_bytes(
    method: str = "GET",
    path: str = "/",
    headers: Iterable[tuple[str, str]] = (),
    body: bytes | None = None,
    *,
    host: str = "proxy.test",
) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}"]
    lines += [f"{k}: {v}" for k, v in headers]
    if body is not None:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (body or b"")


# -- the proxy under test ---------------------------------------------------------------


@dataclass
class Proxy:
    route: Route
    port: int
    listener: Listener | None = None
    targets: list[Target] = field(default_factory=list)
    clients: list[Client] = field(default_factory=list)

    def swap(self, target: Target | None) -> Target | None:
        if target is not None:
            self.targets.append(target)
        return self.route.swap(target)

    async def connect(self) -> Client:
        c = await Client.open(self.port)
        self.clients.append(c)
        return c


@contextlib.asynccontextmanager
async def running_proxy(
    target: Target | None,
    *,
    name: str = "demo",
    hold_timeout: float = 1.0,
    keepalive_timeout: float = 60.0,
    limits: Limits | None = None,
) -> AsyncIterator[Proxy]:
    limits = dataclasses.replace(
        limits or Limits(), hold_timeout=hold_timeout, keepalive_timeout=keepalive_timeout
    )
    p = Proxy(Route(name, limits), free_port())
    p.swap(target)
    p.listener = Listener(p.route, HOST, p.port)
    await p.listener.start()
    try:
        yield p
    finally:
        for c in p.clients:
            c.close()
        # A few turns of the loop let the proxy see them go: the shutdown then has no
        # connection left to poll for (which costs 20 ms a test).
        for _ in range(3):
            await asyncio.sleep(0)
        await p.listener.shutdown(0.5)
        for t in p.targets:
            t.close_all()
        await asyncio.sleep(0.01)
