"""The daemon: the one place that builds the real, side-effecting objects.

serve() = startup, then wait for a shutdown request (signal or admin API),
then an ordered shutdown. Startup: take the state_dir lock (one daemon per
state_dir), bind the admin API, bind every public address, read the state
file, adopt the instances an earlier daemon left running (identity: pid and
create time; health-checked), stop whatever else that daemon left behind
(found by the marker in its environment), then start the remaining
components in dependency order, each health-gated. Shutdown: stop accepting,
let requests in flight finish, stop components in reverse dependency order,
release everything. The state file is rewritten after every change.
Signals only set state; serve() acts.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import os
import secrets
import signal
import sys
import time
from collections.abc import Callable, Iterable
from typing import Any

from aiohttp import web

from rotator import __version__
from rotator.admin import make_app
from rotator.component import Component, RotationFailed, probe_socket
from rotator.config import ComponentSpec, Config, apply_definition
from rotator.events import Event, EventBus
from rotator.health import HealthCheck
from rotator.instance import Instance, marked_processes
from rotator.ports import describe_holders, port_holders, probe_port
from rotator.proxy.protocol import Listener
from rotator.proxy.route import Limits, Route
from rotator.state import (
    AlreadyRunning,
    ComponentRecord,
    DaemonLock,
    State,
    StateError,
    StateFile,
    StateTooNew,
    write_private,
)

# An instance found from an earlier run must answer its health check within this to be adopted.
ADOPT_CHECK_TIMEOUT = 3.0
# Events that do not change what the state file records.
NO_STATE_CHANGE = frozenset(
    {"healthy", "waiting", "unhealthy", "backoff", "port", "verified", "start", "rotated"}
)


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
        self.ready = False  # startup done: every component started, adopted or given up
        self.scope = hashlib.sha1(str(config.state_dir).encode()).hexdigest()[:10]
        self.state_file = StateFile(config.state_dir / "state.json")
        self._can_save = False
        self._saving: asyncio.Task[None] | None = None
        self._save_again = False
        self._lock = DaemonLock(config.state_dir / "daemon.lock")
        self._shutdown: asyncio.Event | None = None
        self._runner: web.AppRunner | None = None
        self.bus.subscribe(self._on_event)

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
        try:
            self._lock.acquire()
        except AlreadyRunning as exc:
            raise DaemonError(
                f"rotator is already running for {config.path} (pid {exc.pid or 'unknown'}); "
                "stop it with: rotator down"
            ) from None
        for spec in config.components:
            await self._add_component(spec)
        token = secrets.token_urlsafe(32)
        await self._start_admin(token)
        # Only once the admin address is ours: a second daemon must not replace the token.
        write_private(config.token_path, token)
        self.out(
            f"rotator {__version__}: admin on http://{config.admin.listen}, "
            f"{len(self.components)} component(s), event loop {self.event_loop}"
        )
        state = self._load_state()
        kept = await self._adopt(state)
        await self._stop_leftovers(state, kept)
        self._save()
        skip = {
            name
            for name, c in self.components.items()
            if c.active is not None or c.stopped_on_purpose
        }
        await self._in_dependency_order(self._start_one, skip)
        self.ready = True
        running = sum(c.state == "running" for c in self.components.values())
        failed = [c.name for c in self.components.values() if c.state == "failed"]
        self.out(
            f"rotator: {running} of {len(self.components)} component(s) running"
            + (f"; failed: {', '.join(failed)}" if failed else "")
        )

    async def _add_component(self, spec: ComponentSpec) -> None:
        limits = Limits(
            connect_timeout=spec.connect_timeout,
            read_timeout=spec.read_timeout,
            request_timeout=spec.request_timeout,
            trust_forwarded=spec.trust_forwarded,
            max_header_size=spec.max_header_size,
            max_headers=spec.max_headers,
            max_connections=spec.max_connections,
        )
        route = Route(spec.name, spec.hold_timeout, limits)
        listener = Listener(route, spec.listen.host, spec.listen.port, spec.keepalive_timeout)
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
            health=HealthCheck(spec.health),
            log_path=self.config.log_path(spec.name),
            probe=probe_port,
            socket_probe=probe_socket,
            marker_scope=self.scope,
        )

    async def _start_admin(self, token: str) -> None:
        listen = self.config.admin.listen
        app = make_app(self, token)
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

    async def _start_one(self, comp: Component, deps_ok: bool) -> bool:
        if not deps_ok:
            comp.mark_failed("not started: a component it depends on is not running")
            return False
        try:
            await comp.rotate()
        except RotationFailed:
            return False
        return True

    async def _in_dependency_order(
        self,
        action: Callable[[Component, bool], Any],
        skip: Iterable[str] = (),
        reverse: bool = False,
    ) -> None:
        """Run `action` on every component once what it must follow is done: its
        dependencies when starting, its dependents when stopping."""
        skip = set(skip)
        loop = asyncio.get_running_loop()
        done: dict[str, asyncio.Future[bool]] = {
            name: loop.create_future() for name in self.components
        }

        def after(name: str) -> list[str]:
            if not reverse:
                return list(self.components[name].spec.depends_on)
            return [n for n, c in self.components.items() if name in c.spec.depends_on]

        async def one(name: str) -> None:
            comp = self.components[name]
            ok = all(await asyncio.gather(*(done[n] for n in after(name))))
            result = True if name in skip else await action(comp, ok)
            done[name].set_result(bool(result))

        await asyncio.gather(*(one(name) for name in self.components))

    async def _stop_everything(self) -> None:
        if self.components:
            self.out("rotator: shutting down: no new connections, finishing requests in flight")
        deadline = max((spec.drain_timeout for spec in self.config.components), default=0.0)
        await asyncio.gather(*(listener.shutdown(deadline) for listener in self.listeners))

        async def stop(comp: Component, _: bool) -> bool:
            await comp.shutdown()
            return True

        if self.components:
            await self._in_dependency_order(stop, reverse=True)
            if self._saving is not None:
                await asyncio.gather(self._saving, return_exceptions=True)
            self._save()
        await self._release()
        if self.components:
            self.out("rotator: stopped")

    async def _release(self) -> None:
        for listener in self.listeners:
            listener.stop_accepting()
        if self._runner is not None:
            await self._runner.cleanup()
            with contextlib.suppress(FileNotFoundError):
                self.config.token_path.unlink()
        self._lock.release()

    # -- the earlier run --------------------------------------------------------------
    def _load_state(self) -> State:
        try:
            state = self.state_file.load()
        except StateTooNew as exc:
            raise DaemonError(str(exc)) from None
        except StateError as exc:
            self.out(f"rotator: {exc}")
            state = State(components={})
        self._can_save = True
        for name, record in state.components.items():
            comp = self.components.get(name)
            if comp is not None:
                _restore_definition(comp, record, self.out)
        return state

    async def _adopt(self, state: State) -> set[str]:
        """Adopt each recorded active instance that still runs and is healthy; the
        markers of the adopted ones."""
        kept: set[str] = set()
        for name, record in state.components.items():
            comp = self.components.get(name)
            r = record.active
            if comp is None or r is None or record.stopped:
                continue
            inst = Instance.adopt(
                name, r.port, r.pid, r.create_time, r.marker, r.started, comp.log_path
            )
            if inst is None:
                self.out(f"{name}: pid {r.pid} of the earlier run is gone")
                continue
            problem = await _check_adoptable(comp, inst)
            if problem is None:
                comp.adopt(inst)
                kept.add(r.marker)
            else:
                self.out(f"{name}: not adopting pid {r.pid}: {problem}")
        return kept

    async def _stop_leftovers(self, state: State, kept: set[str]) -> None:
        """Stop every process an earlier daemon of this state_dir started and nobody
        adopted: draining or unhealthy instances, removed components, and instances
        the state file never learnt of. The marker proves they are ours."""
        for marker, procs in marked_processes(f"{self.scope}:").items():
            if marker in kept:
                continue
            name = marker.split(":")[1]
            comp = self.components.get(name)
            spec = comp.spec if comp is not None else None
            root = min(procs, key=lambda p: p.create_time())
            inst = Instance(
                name,
                0,
                root.pid,
                marker,
                self.config.log_path(name),
                0,
                create_time=root.create_time(),
            )
            result = await inst.stop(
                spec.stop_signal if spec else signal.SIGTERM, spec.stop_timeout if spec else 10.0
            )
            why = "of a removed component" if comp is None else "left from the earlier run"
            self.out(f"{name}: stopped pid {root.pid} {why} ({result.outcome})")

    # -- state ------------------------------------------------------------------------
    def _on_event(self, event: Event) -> None:
        self._print_event(event)
        if event.kind not in NO_STATE_CHANGE:
            self._save_soon()

    def _save_soon(self) -> None:
        """Write the state file in a thread: its fsyncs take milliseconds that the
        proxy, on this loop, must not wait for (they showed as gaps at switches).
        One writer at a time; changes during a write cause one more write."""
        if not self._can_save:
            return  # never overwrite a state file we have not read
        if self._saving is not None and not self._saving.done():
            self._save_again = True
            return
        self._saving = asyncio.ensure_future(self._write_state())

    async def _write_state(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            self._save_again = False
            state = self._snapshot()  # taken on the loop: consistent
            await loop.run_in_executor(None, self._write, state)
            if not self._save_again:
                return

    def _save(self) -> None:
        """Write the state file now (startup and shutdown, where nothing else runs)."""
        if self._can_save:
            self._write(self._snapshot())

    def _write(self, state: State) -> None:
        try:
            self.state_file.save(state)
        except OSError as exc:
            self.out(f"rotator: cannot write the state file {self.state_file.path}: {exc.strerror}")

    def _snapshot(self) -> State:
        return State(
            components={name: comp.record() for name, comp in self.components.items()},
            daemon_pid=os.getpid(),
            written_at=time.time(),
        )

    # -- reporting --------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        return {
            "daemon": {
                "pid": os.getpid(),
                "version": __version__,
                "config": str(self.config.path),
                "event_loop": self.event_loop,
                "ready": self.ready,
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


async def _check_adoptable(comp: Component, inst: Instance) -> str | None:
    """None when `inst` answers its health check now (a few tries), else why not."""
    deadline = time.monotonic() + ADOPT_CHECK_TIMEOUT
    problem: str | None = "not checked"
    while time.monotonic() < deadline:
        problem = await comp.health.probe(comp.host, inst.port)
        if problem is None:
            return None
        await asyncio.sleep(0.2)
    return problem


def _restore_definition(
    comp: Component, record: ComponentRecord, out: Callable[[str], None]
) -> None:
    comp.stopped_on_purpose = record.stopped
    comp.route.holding = not record.stopped
    if record.definition is None:
        return
    try:
        comp.spec = apply_definition(comp.config_spec, record.definition)
        comp.previous = (
            apply_definition(comp.config_spec, record.previous_definition)
            if record.previous_definition is not None
            else comp.config_spec
        )
    except ValueError as exc:
        out(
            f"{comp.name}: the deployed definition in the state file is unusable ({exc}); using the config's"
        )
        return
    comp.definition_source = "deployed"
    comp.deployed_at = record.deployed_at


def _print(line: str) -> None:
    print(line, flush=True)


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
