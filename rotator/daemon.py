"""The daemon: the one place that builds the real, side-effecting objects.

serve() = startup (admin API, public listeners, components health-gated),
then wait for a shutdown request (signal or admin API), then an ordered
shutdown: stop accepting, let requests in flight finish, stop every instance
and its tree, release the admin API. Signals only set state; serve() acts.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import secrets
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from rotator import __version__
from rotator.admin import make_app
from rotator.component import Component
from rotator.config import Config
from rotator.events import Event, EventBus
from rotator.health import HealthCheck
from rotator.ports import describe_holders, port_holders, probe_port
from rotator.proxy.protocol import Listener
from rotator.proxy.route import Route


class DaemonError(Exception):
    """Startup failed for a reason the user can act on; the message says which."""


class Daemon:
    def __init__(self, config: Config, out: Callable[[str], None] | None = None) -> None:
        self.config = config
        self.bus = EventBus()
        self.components: dict[str, Component] = {}
        self.listeners: list[Listener] = []
        self.out = out or _print
        self.event_loop = "asyncio"
        self._shutdown: asyncio.Event | None = None
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None
        self.bus.subscribe(self._print_event)

    # -- lifecycle ------------------------------------------------------------
    async def serve(self, shutdown_trigger: asyncio.Event | None = None) -> None:
        loop = asyncio.get_running_loop()
        self.event_loop = type(loop).__module__.split(".")[0]
        self._shutdown = shutdown_trigger or asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self.request_shutdown)
        startup = asyncio.ensure_future(self._startup())
        stopping = asyncio.ensure_future(self._shutdown.wait())
        try:
            await asyncio.wait({startup, stopping}, return_when=asyncio.FIRST_COMPLETED)
            if not startup.done():  # told to stop while still starting
                startup.cancel()
                await asyncio.gather(startup, return_exceptions=True)
            elif startup.exception() is None:
                await stopping
        finally:
            stopping.cancel()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)
            await self._stop_everything()
        if not startup.cancelled() and startup.exception() is not None:
            raise startup.exception()  # type: ignore[misc]

    def request_shutdown(self) -> None:
        if self._shutdown is not None:
            self._shutdown.set()

    async def _startup(self) -> None:
        config = self.config
        config.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        token = secrets.token_urlsafe(32)
        await self._start_admin(token)
        # Only once the admin address is ours: a second daemon for the same
        # config must not replace the token of the first.
        _write_private(config.token_path, token)
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(force_close=True, limit=0), trust_env=False
        )
        for spec in config.components:
            route = Route(spec.name, spec.hold_timeout)
            listener = Listener(route, spec.listen.host, spec.listen.port)
            try:
                await listener.start()
            except OSError as exc:
                raise DaemonError(
                    _bind_error(f"components.{spec.name}.listen", str(spec.listen), exc)
                ) from None
            self.listeners.append(listener)
            self.components[spec.name] = Component(
                spec,
                route,
                self.bus,
                health=HealthCheck(self._session, spec.health),
                log_path=config.log_path(spec.name),
                probe=probe_port,
            )
        self.out(
            f"rotator {__version__}: admin on http://{config.admin.listen}, "
            f"{len(self.components)} component(s), event loop {self.event_loop}"
        )
        results = await asyncio.gather(
            *(c.rotate() for c in self.components.values()), return_exceptions=True
        )
        failed = [
            c.name for c, r in zip(self.components.values(), results, strict=True) if r is not None
        ]
        ready = len(results) - len(failed)
        self.out(
            f"rotator: {ready} of {len(results)} component(s) running"
            + (f"; failed: {', '.join(failed)}" if failed else "")
        )

    async def _start_admin(self, token: str) -> None:
        listen = self.config.admin.listen
        app = make_app(self, token)
        app["daemon"] = self
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, listen.host, listen.port, reuse_address=True)
        try:
            await site.start()
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise DaemonError(
                    f"admin address {listen} is in use: is rotator already running for "
                    f"{self.config.path}? (try: rotator status)"
                ) from None
            raise DaemonError(_bind_error("admin.listen", str(listen), exc)) from None

    async def _stop_everything(self) -> None:
        if self.components:
            self.out("rotator: shutting down: no new connections, finishing requests in flight")
        deadline = max((spec.drain_timeout for spec in self.config.components), default=0.0)
        await asyncio.gather(*(listener.shutdown(deadline) for listener in self.listeners))
        await asyncio.gather(*(c.stop() for c in self.components.values()), return_exceptions=True)
        await self._release()
        if self.components:
            self.out("rotator: stopped")

    async def _release(self) -> None:
        for listener in self.listeners:
            listener.stop_accepting()
        if self._session is not None:
            await self._session.close()
        if self._runner is not None:
            await self._runner.cleanup()
            with contextlib.suppress(FileNotFoundError):
                self.config.token_path.unlink()

    # -- reporting --------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        return {
            "daemon": {
                "pid": os.getpid(),
                "version": __version__,
                "config": str(self.config.path),
                "event_loop": self.event_loop,
            },
            "components": [c.status() for c in self.components.values()],
        }

    def _print_event(self, event: Event) -> None:
        if event.kind == "state":
            return
        stamp = time.strftime("%H:%M:%S", time.localtime(event.time))
        self.out(f"{stamp} {event.component}: {event.message}")
        for line in event.data.get("log_tail", []):
            self.out(f"    | {line}")


def _print(line: str) -> None:
    print(line, flush=True)


def _write_private(path: Path, text: str) -> None:
    """Write a file only the owner can read, replacing any old one atomically."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _bind_error(field: str, address: str, exc: OSError) -> str:
    message = f"{field}: cannot bind {address}: {exc.strerror or exc}"
    if exc.errno == errno.EADDRINUSE:
        port = int(address.rsplit(":", 1)[1])
        message += f" ({describe_holders(port, port_holders([port]))})"
    return message


def run(config: Config) -> int:
    """Run the daemon in the foreground until it is told to stop; the exit code."""
    loop_factory = None
    try:
        import uvloop

        loop_factory = uvloop.new_event_loop
    except ImportError:
        pass
    daemon = Daemon(config)
    try:
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            runner.run(daemon.serve())
    except DaemonError as exc:
        print(f"rotator: {exc}", file=sys.stderr)
        return 1
    return 0
